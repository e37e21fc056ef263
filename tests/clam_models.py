"""Faithful copies of CLAM's models, and their fastmil twins, for the tests.

The copies: ``Attn_Net``, ``Attn_Net_Gated``, ``CLAM_SB`` and ``CLAM_MB`` from
github.com/mahmoodlab/CLAM, models/model_clam.py at commit 53e2409d4a8189c682c173382964a85f114f923c
(CLAM is GPL-3.0 and not pip-installable; these test-only copies are not part of the fastmil
package). The code is CLAM's, verbatim, except: imports sorted (and ``pdb`` dropped), CLAM's
comment blocks and trailing whitespace dropped, and a ``"tiny"`` entry in ``size_dict`` (CLAM has
``"small"`` [embed_dim, 512, 256] and ``"big"`` [embed_dim, 512, 384]) so that the tests can run
the Triton kernels in the interpreter at small sizes. CLAM names the instance feature size L and
the attention size D (fastmil: D and L).

The twins, :func:`fast_clam`, are CLAM's classes with the edit the README shows: the attention net
becomes a :class:`fastmil.AttentionPool` (``from_clam``), and the forward pools with it
(``CLAM_FORWARD_EDIT``).
"""
# ruff: noqa: B008, UP008 (CLAM's code, kept as written)

from __future__ import annotations

import inspect
import textwrap

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastmil

# ---------------------------------------------------------------- CLAM's code, verbatim


class Attn_Net(nn.Module):

    def __init__(self, L = 1024, D = 256, dropout = False, n_classes = 1):
        super(Attn_Net, self).__init__()
        self.module = [
            nn.Linear(L, D),
            nn.Tanh()]

        if dropout:
            self.module.append(nn.Dropout(0.25))

        self.module.append(nn.Linear(D, n_classes))

        self.module = nn.Sequential(*self.module)

    def forward(self, x):
        return self.module(x), x # N x n_classes


class Attn_Net_Gated(nn.Module):
    def __init__(self, L = 1024, D = 256, dropout = False, n_classes = 1):
        super(Attn_Net_Gated, self).__init__()
        self.attention_a = [
            nn.Linear(L, D),
            nn.Tanh()]

        self.attention_b = [nn.Linear(L, D),
                            nn.Sigmoid()]
        if dropout:
            self.attention_a.append(nn.Dropout(0.25))
            self.attention_b.append(nn.Dropout(0.25))

        self.attention_a = nn.Sequential(*self.attention_a)
        self.attention_b = nn.Sequential(*self.attention_b)

        self.attention_c = nn.Linear(D, n_classes)

    def forward(self, x):
        a = self.attention_a(x)
        b = self.attention_b(x)
        A = a.mul(b)
        A = self.attention_c(A)  # N x n_classes
        return A, x


class CLAM_SB(nn.Module):
    def __init__(self, gate = True, size_arg = "small", dropout = 0., k_sample=8, n_classes=2,
        instance_loss_fn=nn.CrossEntropyLoss(), subtyping=False, embed_dim=1024):
        super().__init__()
        self.size_dict = {"small": [embed_dim, 512, 256], "big": [embed_dim, 512, 384],
                          "tiny": [embed_dim, 32, 16]}  # fastmil tests: "tiny" added
        size = self.size_dict[size_arg]
        fc = [nn.Linear(size[0], size[1]), nn.ReLU(), nn.Dropout(dropout)]
        if gate:
            attention_net = Attn_Net_Gated(L = size[1], D = size[2], dropout = dropout, n_classes = 1)
        else:
            attention_net = Attn_Net(L = size[1], D = size[2], dropout = dropout, n_classes = 1)
        fc.append(attention_net)
        self.attention_net = nn.Sequential(*fc)
        self.classifiers = nn.Linear(size[1], n_classes)
        instance_classifiers = [nn.Linear(size[1], 2) for i in range(n_classes)]
        self.instance_classifiers = nn.ModuleList(instance_classifiers)
        self.k_sample = k_sample
        self.instance_loss_fn = instance_loss_fn
        self.n_classes = n_classes
        self.subtyping = subtyping

    @staticmethod
    def create_positive_targets(length, device):
        return torch.full((length, ), 1, device=device).long()

    @staticmethod
    def create_negative_targets(length, device):
        return torch.full((length, ), 0, device=device).long()

    #instance-level evaluation for in-the-class attention branch
    def inst_eval(self, A, h, classifier):
        device=h.device
        if len(A.shape) == 1:
            A = A.view(1, -1)
        top_p_ids = torch.topk(A, self.k_sample)[1][-1]
        top_p = torch.index_select(h, dim=0, index=top_p_ids)
        top_n_ids = torch.topk(-A, self.k_sample, dim=1)[1][-1]
        top_n = torch.index_select(h, dim=0, index=top_n_ids)
        p_targets = self.create_positive_targets(self.k_sample, device)
        n_targets = self.create_negative_targets(self.k_sample, device)

        all_targets = torch.cat([p_targets, n_targets], dim=0)
        all_instances = torch.cat([top_p, top_n], dim=0)
        logits = classifier(all_instances)
        all_preds = torch.topk(logits, 1, dim = 1)[1].squeeze(1)
        instance_loss = self.instance_loss_fn(logits, all_targets)
        return instance_loss, all_preds, all_targets

    #instance-level evaluation for out-of-the-class attention branch
    def inst_eval_out(self, A, h, classifier):
        device=h.device
        if len(A.shape) == 1:
            A = A.view(1, -1)
        top_p_ids = torch.topk(A, self.k_sample)[1][-1]
        top_p = torch.index_select(h, dim=0, index=top_p_ids)
        p_targets = self.create_negative_targets(self.k_sample, device)
        logits = classifier(top_p)
        p_preds = torch.topk(logits, 1, dim = 1)[1].squeeze(1)
        instance_loss = self.instance_loss_fn(logits, p_targets)
        return instance_loss, p_preds, p_targets

    def forward(self, h, label=None, instance_eval=False, return_features=False, attention_only=False):
        A, h = self.attention_net(h)  # NxK
        A = torch.transpose(A, 1, 0)  # KxN
        if attention_only:
            return A
        A_raw = A
        A = F.softmax(A, dim=1)  # softmax over N

        if instance_eval:
            total_inst_loss = 0.0
            all_preds = []
            all_targets = []
            inst_labels = F.one_hot(label, num_classes=self.n_classes).squeeze() #binarize label
            for i in range(len(self.instance_classifiers)):
                inst_label = inst_labels[i].item()
                classifier = self.instance_classifiers[i]
                if inst_label == 1: #in-the-class:
                    instance_loss, preds, targets = self.inst_eval(A, h, classifier)
                    all_preds.extend(preds.cpu().numpy())
                    all_targets.extend(targets.cpu().numpy())
                else: #out-of-the-class
                    if self.subtyping:
                        instance_loss, preds, targets = self.inst_eval_out(A, h, classifier)
                        all_preds.extend(preds.cpu().numpy())
                        all_targets.extend(targets.cpu().numpy())
                    else:
                        continue
                total_inst_loss += instance_loss

            if self.subtyping:
                total_inst_loss /= len(self.instance_classifiers)

        M = torch.mm(A, h)
        logits = self.classifiers(M)
        Y_hat = torch.topk(logits, 1, dim = 1)[1]
        Y_prob = F.softmax(logits, dim = 1)
        if instance_eval:
            results_dict = {'instance_loss': total_inst_loss, 'inst_labels': np.array(all_targets),
            'inst_preds': np.array(all_preds)}
        else:
            results_dict = {}
        if return_features:
            results_dict.update({'features': M})
        return logits, Y_prob, Y_hat, A_raw, results_dict


class CLAM_MB(CLAM_SB):
    def __init__(self, gate = True, size_arg = "small", dropout = 0., k_sample=8, n_classes=2,
        instance_loss_fn=nn.CrossEntropyLoss(), subtyping=False, embed_dim=1024):
        nn.Module.__init__(self)
        self.size_dict = {"small": [embed_dim, 512, 256], "big": [embed_dim, 512, 384],
                          "tiny": [embed_dim, 32, 16]}  # fastmil tests: "tiny" added
        size = self.size_dict[size_arg]
        fc = [nn.Linear(size[0], size[1]), nn.ReLU(), nn.Dropout(dropout)]
        if gate:
            attention_net = Attn_Net_Gated(L = size[1], D = size[2], dropout = dropout, n_classes = n_classes)
        else:
            attention_net = Attn_Net(L = size[1], D = size[2], dropout = dropout, n_classes = n_classes)
        fc.append(attention_net)
        self.attention_net = nn.Sequential(*fc)
        bag_classifiers = [nn.Linear(size[1], 1) for i in range(n_classes)] #use an indepdent linear layer to predict each class
        self.classifiers = nn.ModuleList(bag_classifiers)
        instance_classifiers = [nn.Linear(size[1], 2) for i in range(n_classes)]
        self.instance_classifiers = nn.ModuleList(instance_classifiers)
        self.k_sample = k_sample
        self.instance_loss_fn = instance_loss_fn
        self.n_classes = n_classes
        self.subtyping = subtyping

    def forward(self, h, label=None, instance_eval=False, return_features=False, attention_only=False):
        A, h = self.attention_net(h)  # NxK
        A = torch.transpose(A, 1, 0)  # KxN
        if attention_only:
            return A
        A_raw = A
        A = F.softmax(A, dim=1)  # softmax over N

        if instance_eval:
            total_inst_loss = 0.0
            all_preds = []
            all_targets = []
            inst_labels = F.one_hot(label, num_classes=self.n_classes).squeeze() #binarize label
            for i in range(len(self.instance_classifiers)):
                inst_label = inst_labels[i].item()
                classifier = self.instance_classifiers[i]
                if inst_label == 1: #in-the-class:
                    instance_loss, preds, targets = self.inst_eval(A[i], h, classifier)
                    all_preds.extend(preds.cpu().numpy())
                    all_targets.extend(targets.cpu().numpy())
                else: #out-of-the-class
                    if self.subtyping:
                        instance_loss, preds, targets = self.inst_eval_out(A[i], h, classifier)
                        all_preds.extend(preds.cpu().numpy())
                        all_targets.extend(targets.cpu().numpy())
                    else:
                        continue
                total_inst_loss += instance_loss

            if self.subtyping:
                total_inst_loss /= len(self.instance_classifiers)

        M = torch.mm(A, h)

        logits = torch.empty(1, self.n_classes).float().to(M.device)
        for c in range(self.n_classes):
            logits[0, c] = self.classifiers[c](M[c])

        Y_hat = torch.topk(logits, 1, dim = 1)[1]
        Y_prob = F.softmax(logits, dim = 1)
        if instance_eval:
            results_dict = {'instance_loss': total_inst_loss, 'inst_labels': np.array(all_targets),
            'inst_preds': np.array(all_preds)}
        else:
            results_dict = {}
        if return_features:
            results_dict.update({'features': M})
        return logits, Y_prob, Y_hat, A_raw, results_dict


# ---------------------------------------------------------------- the fastmil twins

# The README's edit of CLAM_SB.forward / CLAM_MB.forward (identical in both): the attention net
# now returns the features h only, fastmil pools them and returns the attention A and the raw
# scores A_raw (pre-softmax, score bias included), CLAM's K x N layout restored; M = A @ h comes
# out of the fused op instead of torch.mm.
CLAM_FORWARD_EDIT = [
    ("""\
        A, h = self.attention_net(h)  # NxK
        A = torch.transpose(A, 1, 0)  # KxN
        if attention_only:
            return A
        A_raw = A
        A = F.softmax(A, dim=1)  # softmax over N
""", """\
        h = self.attention_net(h)  # N x 512: Linear, ReLU, Dropout
        M, A, A_raw = self.attention_pool(h, return_attention=True, return_scores=True)
        A, A_raw = A.reshape(len(h), -1).t(), A_raw.reshape(len(h), -1).t()  # KxN
        M = M.reshape(len(A), -1)  # K x 512
        if attention_only:
            return A_raw
"""),
    ("""\
        M = torch.mm(A, h)
""", ""),
]


def _edited_forward(cls):
    """``cls.forward`` (CLAM's source) with CLAM_FORWARD_EDIT applied."""
    src = textwrap.dedent(inspect.getsource(cls.forward))
    for old, new in CLAM_FORWARD_EDIT:
        old, new = textwrap.dedent(old), textwrap.dedent(new)
        old = textwrap.indent(old, "    ")
        assert src.count(old) == 1, f"{cls.__name__}.forward no longer holds {old!r}"
        src = src.replace(old, textwrap.indent(new, "    "))
    namespace = dict(cls.forward.__globals__)
    exec(compile(src, f"<{cls.__name__}.forward, fastmil edit>", "exec"), namespace)
    return namespace["forward"]


def fast_clam(cls):
    """The fastmil twin of CLAM's ``CLAM_SB`` or ``CLAM_MB``: same constructor (plus a
    ``backend`` keyword), same outputs; ``attention_net`` keeps CLAM's Linear, ReLU, Dropout and
    the attention net becomes ``attention_pool``, a :class:`fastmil.AttentionPool` with its
    weights and its dropout p."""

    class Twin(cls):
        def __init__(self, *args, backend="auto", **kwargs):
            super().__init__(*args, **kwargs)
            *fc, net = self.attention_net  # Linear, ReLU, Dropout, Attn_Net(_Gated)
            self.attention_net = nn.Sequential(*fc)
            self.attention_pool = fastmil.AttentionPool.from_clam(net, backend=backend)

        forward = _edited_forward(cls)

    Twin.__name__ = Twin.__qualname__ = f"Fast{cls.__name__}"
    return Twin


FastCLAM_SB = fast_clam(CLAM_SB)
FastCLAM_MB = fast_clam(CLAM_MB)
