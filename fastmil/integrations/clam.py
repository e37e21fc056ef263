"""CLAM (Lu et al. 2021, github.com/mahmoodlab/CLAM) on fastmil: models and checkpoint key maps.

:class:`CLAM_SB` and :class:`CLAM_MB` are fastmil's own implementations of CLAM's single- and
multi-branch models, built from a description of them: the same constructor arguments, layer
sizes, dropout, forward signature and outputs, with the attention net and the pooling
``M = A @ h`` done in one :class:`fastmil.AttentionPool` (``self.attention_pool``).

:func:`clam_to_fastmil_state_dict` turns a CLAM ``state_dict`` or checkpoint (keys such as
``attention_net.3.attention_a.0.weight``) into one that these models load (keys such as
``attention_pool.attn.weight``); :func:`fastmil_to_clam_state_dict` goes back. See
``docs/clam.md`` for the move from CLAM to fastmil.

Nothing in this module is CLAM's code; CLAM itself is never imported.
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

import fastmil

__all__ = ["CLAM_MB", "CLAM_SB", "clam_to_fastmil_state_dict", "fastmil_to_clam_state_dict"]

# ---------------------------------------------------------------- checkpoint key maps

# CLAM's gated attention net (Attn_Net_Gated) -> AttentionPool's layers
_CLAM_GATED = {"attention_a.0": "attn", "attention_b.0": "gate", "attention_c": "score"}
_PARAMS = ("weight", "bias")
# the module whose state CLAM's checkpoints may carry and CLAM's own loader drops
_LOSS_MODULE = "instance_loss_fn"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _rename(state_dict, renames):
    """A copy of ``state_dict`` with keys renamed by ``renames`` (old -> new), order kept;
    tensors are shared, not copied."""
    out = OrderedDict()
    for key, value in state_dict.items():
        out[renames.get(key, key)] = value
    return out


def _check_mapping(state_dict, name):
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name} expects a state_dict (a mapping of key -> tensor; read a "
                        f"checkpoint file with torch.load(path, map_location='cpu', "
                        f"weights_only=True)), got {type(state_dict).__name__}")


def _as_saved_by_clam(state_dict, attention_net):
    """``state_dict`` without what CLAM's checkpoints carry beyond the model's own keys.

    Drops the entries of ``instance_loss_fn`` (a loss with buffers, such as the smooth-top-k SVM
    CLAM trains with, saves them), and removes the ``module`` segment that ``nn.DataParallel``
    around CLAM's ``attention_net`` Sequential inserts (``attention_net.module.0.weight`` ->
    ``attention_net.0.weight``). Only the segment right after the Sequential's name is removed:
    ``Attn_Net`` keeps its own ``module`` attribute (``attention_net.3.module.0.weight``).
    """
    container = attention_net.rpartition(".")[0]  # "attention_net" for "attention_net.3"
    wrapped = f"{container}.module." if container else None
    out = OrderedDict()
    for key, value in state_dict.items():
        if _LOSS_MODULE in key.split("."):
            continue
        if wrapped is not None and key.startswith(wrapped):
            plain = _join(container, key[len(wrapped):])
            if plain in state_dict:
                raise ValueError(f"state_dict holds both {key!r} (saved through "
                                 f"nn.DataParallel) and {plain!r}: expected one of the two")
            key = plain
        out[key] = value
    return out


def clam_to_fastmil_state_dict(state_dict, *, attention_net: str = "attention_net.3",
                               pool: str = "attention_pool"):
    """A CLAM ``state_dict`` or checkpoint, renamed for :class:`CLAM_SB` / :class:`CLAM_MB` (or
    any module that holds a :class:`fastmil.AttentionPool` at ``pool``).

    CLAM keeps its attention net (``Attn_Net_Gated`` or ``Attn_Net``) at index 3 of
    ``attention_net = Sequential(Linear, ReLU, Dropout, net)``; its keys become the pool's
    (``.{weight,bias}`` each)::

        attention_net.3.attention_a.0   ->  attention_pool.attn     (Attn_Net_Gated)
        attention_net.3.attention_b.0   ->  attention_pool.gate
        attention_net.3.attention_c     ->  attention_pool.score
        attention_net.3.module.0        ->  attention_pool.attn     (Attn_Net)
        attention_net.3.module.{2|3}    ->  attention_pool.score    (3 with dropout)

    Checkpoints are taken as CLAM writes them: entries of ``instance_loss_fn`` (e.g.
    ``instance_loss_fn.labels``) are dropped, and the ``.module`` that ``nn.DataParallel``
    put after ``attention_net`` (``attention_net.module.3.attention_a.0.weight``) is removed,
    as CLAM's own loader does. Every other key (``attention_net.0.*``, the classifiers …) passes
    through unchanged, in its order. A checkpoint saved on a GPU holds CUDA tensors: read it with
    ``torch.load(path, map_location="cpu", weights_only=True)``.

    Args:
        state_dict: CLAM's ``model.state_dict()`` or a checkpoint file's contents.
        attention_net: the prefix of the attention net's keys (``""`` for a bare
            ``Attn_Net_Gated`` / ``Attn_Net`` state_dict).
        pool: the prefix of the fastmil ``AttentionPool``'s keys (``""`` to load into a bare
            ``AttentionPool``).

    Returns:
        A new ``OrderedDict`` sharing the tensors.

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        ValueError: no CLAM attention net under ``attention_net`` (the message names the key
            expected and the keys found), or an ambiguous ``Attn_Net``.
    """
    _check_mapping(state_dict, "clam_to_fastmil_state_dict")
    state_dict = _as_saved_by_clam(state_dict, attention_net)
    keys = set(state_dict)
    if _join(attention_net, "attention_a.0.weight") in keys:
        layers = dict(_CLAM_GATED)
    elif _join(attention_net, "module.0.weight") in keys:
        scores = [f"module.{i}" for i in (2, 3) if _join(attention_net, f"module.{i}.weight")
                  in keys]
        if len(scores) != 1:
            raise ValueError(f"state_dict has an Attn_Net at {attention_net!r} whose score "
                             f"layer must be module.2 (no dropout) or module.3 (dropout), got "
                             f"{scores or 'neither'}")
        layers = {"module.0": "attn", scores[0]: "score"}
    else:
        under = _join(attention_net, "")
        seen = sorted(k for k in keys if k.startswith(under))[:6]
        found = (seen if seen else f"no key under {under!r} (its first keys: "
                 f"{list(state_dict)[:6]})")
        raise ValueError(f"state_dict has no CLAM attention net at attention_net="
                         f"{attention_net!r}: expected the key "
                         f"{_join(attention_net, 'attention_a.0.weight')!r} (Attn_Net_Gated) "
                         f"or {_join(attention_net, 'module.0.weight')!r} (Attn_Net), found "
                         f"{found}")
    renames = {_join(attention_net, f"{theirs}.{p}"): _join(pool, f"{mine}.{p}")
               for theirs, mine in layers.items() for p in _PARAMS}
    return _rename(state_dict, renames)


def fastmil_to_clam_state_dict(state_dict, *, dropout=None,
                               attention_net: str = "attention_net.3",
                               pool: str = "attention_pool"):
    """The inverse of :func:`clam_to_fastmil_state_dict`: a fastmil ``AttentionPool``'s keys back
    to CLAM's attention net, every other key unchanged, for CLAM's ``load_state_dict``.

    Args:
        state_dict: the ``state_dict`` of :class:`CLAM_SB` / :class:`CLAM_MB` (or of a module
            holding an ``AttentionPool`` at ``pool``).
        dropout: CLAM's ``dropout`` argument (truthy: its ``Attn_Net`` holds a Dropout, which
            moves the score layer from ``module.2`` to ``module.3``). Needed only for plain
            attention (a ``state_dict`` without ``{pool}.gate.weight``); gated attention
            ignores it.
        attention_net, pool: the key prefixes, as in :func:`clam_to_fastmil_state_dict`.

    Returns:
        A new ``OrderedDict`` sharing the tensors.
    """
    _check_mapping(state_dict, "fastmil_to_clam_state_dict")
    keys = set(state_dict)
    for layer in ("attn", "score"):
        for p in _PARAMS:
            if _join(pool, f"{layer}.{p}") not in keys:
                raise ValueError(f"state_dict has no key {_join(pool, f'{layer}.{p}')!r}: "
                                 f"expected a fastmil AttentionPool with biases (CLAM's layers "
                                 f"all carry one) under pool={pool!r}")
    if _join(pool, "gate.weight") in keys:
        layers = {mine: theirs for theirs, mine in _CLAM_GATED.items()}
    elif dropout is None:
        raise ValueError("dropout is None, but this AttentionPool is plain (no gate), i.e. "
                         "CLAM's Attn_Net, whose score layer is module.2 without dropout and "
                         "module.3 with it: pass dropout= as given to CLAM_SB / CLAM_MB")
    else:
        layers = {"attn": "module.0", "score": "module.3" if dropout else "module.2"}
    renames = {_join(pool, f"{mine}.{p}"): _join(attention_net, f"{theirs}.{p}")
               for mine, theirs in layers.items() for p in _PARAMS}
    return _rename(state_dict, renames)


# ---------------------------------------------------------------- models

# size_arg -> (hidden width after the first Linear, attention width): CLAM's two model sizes
CLAM_SIZES = {"small": (512, 256), "big": (512, 384)}
# the attention dropout CLAM applies inside its attention net whenever its dropout is nonzero
CLAM_ATTENTION_DROPOUT = 0.25


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class _CLAMBase(nn.Module):
    """What :class:`CLAM_SB` and :class:`CLAM_MB` share; they differ in the number of attention
    branches (:attr:`_branches`) and in the bag classifier (:meth:`_bag_logits`)."""

    def __init__(self, gate=True, size_arg="small", dropout=0.0, k_sample=8, n_classes=2,
                 instance_loss_fn=None, subtyping=False, embed_dim=1024, *, backend="auto"):
        super().__init__()
        name = type(self).__name__
        for arg, value in (("gate", gate), ("subtyping", subtyping)):
            if not isinstance(value, bool):
                raise TypeError(f"{name}: {arg} must be a bool, got {value!r}")
        if size_arg not in CLAM_SIZES:
            raise ValueError(f"{name}: size_arg must be one of {sorted(CLAM_SIZES)}, got "
                             f"{size_arg!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0 <= dropout < 1:
            raise ValueError(f"{name}: dropout must be a number in [0, 1) (CLAM trains with "
                             f"0.25), got {dropout!r}")
        for arg, value in (("k_sample", k_sample), ("n_classes", n_classes),
                           ("embed_dim", embed_dim)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
        if instance_loss_fn is not None and not callable(instance_loss_fn):
            raise TypeError(f"{name}: instance_loss_fn must be None (cross-entropy) or a "
                            f"callable loss(logits, targets), got {instance_loss_fn!r}")
        hidden, attn = CLAM_SIZES[size_arg]
        self.embed_dim, self.n_classes, self.k_sample = embed_dim, n_classes, k_sample
        self.subtyping, self.size_arg, self.dropout = subtyping, size_arg, float(dropout)
        # the first layer, CLAM's attention_net[0:3]: the instance features h
        self.attention_net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(),
                                           nn.Dropout(dropout))
        # CLAM's attention_net[3] and its pooling M = softmax(A) @ h, fused
        self.attention_pool = fastmil.AttentionPool(
            hidden, attn, branches=self._branches(n_classes), gated=gate,
            dropout=CLAM_ATTENTION_DROPOUT if dropout else 0.0, backend=backend)
        self.classifiers = self._make_bag_classifiers(hidden, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2)
                                                  for _ in range(n_classes))
        self.instance_loss_fn = (nn.CrossEntropyLoss() if instance_loss_fn is None
                                 else instance_loss_fn)

    # -- what the subclasses define

    @staticmethod
    def _branches(n_classes):
        raise NotImplementedError

    @staticmethod
    def _make_bag_classifiers(hidden, n_classes):
        raise NotImplementedError

    def _bag_logits(self, M):
        raise NotImplementedError

    # -- the forward

    def forward(self, h, label=None, instance_eval=False, return_features=False,
                attention_only=False):
        """One bag, as CLAM's ``forward``.

        Args:
            h: the bag's instance features, ``[N, embed_dim]``.
            label: the bag's class, an int or a one-element integer tensor (CLAM's loaders
                give ``[1]``) in ``[0, n_classes)``; needed only with ``instance_eval``.
            instance_eval: also run CLAM's instance-level evaluation: for the label's class
                (and, with ``subtyping``, for every other class) the ``k_sample`` instances of
                highest attention in that class's branch are scored by the class's instance
                classifier, the in-class ones as positives together with its ``k_sample``
                lowest as negatives, the out-of-class ones as negatives. Needs
                ``N >= k_sample``.
            return_features: also return the pooled features ``M`` in ``results_dict``.
            attention_only: return only ``A_raw``.

        Returns:
            ``A_raw`` when ``attention_only``, else ``(logits, Y_prob, Y_hat, A_raw,
            results_dict)``, K = 1 for :class:`CLAM_SB` and ``n_classes`` for :class:`CLAM_MB`:

            - ``logits``, ``Y_prob`` (softmax of the logits): ``[1, n_classes]``;
            - ``Y_hat``: ``[1, 1]`` int64, the class of the largest logit;
            - ``A_raw``: ``[K, N]``, the raw attention scores (score bias included; before the
              softmax over the bag), float32 for float32 and 16-bit input;
            - ``results_dict``: with ``instance_eval``, ``"instance_loss"`` (a scalar tensor:
              the instance losses summed over the classes evaluated, divided by
              ``n_classes`` when ``subtyping``), ``"inst_labels"`` and ``"inst_preds"``
              (numpy int64 arrays of the instance targets and predicted classes, class by
              class); with ``return_features``, ``"features"``: ``M``, ``[K, hidden]``
              (hidden = 512); else empty.
        """
        if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.shape[1] != self.embed_dim:
            raise ValueError(f"{type(self).__name__}: h must be one bag of instance features "
                             f"[N, embed_dim={self.embed_dim}], got "
                             f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h)}")
        if instance_eval:  # check the inputs before any work
            cls = self._class_of(label)
            if h.shape[0] < self.k_sample:
                raise ValueError(f"{type(self).__name__}: instance_eval takes the k_sample="
                                 f"{self.k_sample} instances of highest and lowest attention, "
                                 f"but the bag has N={h.shape[0]} < k_sample: pass a bag of "
                                 f"at least {self.k_sample} instances or build the model "
                                 f"with a smaller k_sample")
        N = h.shape[0]
        feats = self.attention_net(h)  # [N, hidden]
        z, attention, scores = self.attention_pool(feats, return_attention=True,
                                                   return_scores=True)
        # one branch: z [hidden], attention and scores [N]; K branches: [K, hidden], [N, K]
        A_raw = scores.reshape(N, -1).t()  # [K, N]
        if attention_only:
            return A_raw
        A = attention.reshape(N, -1).t()  # [K, N]
        M = z.reshape(A.shape[0], -1)  # [K, hidden]
        results_dict = self._instance_eval(A, feats, cls) if instance_eval else {}
        logits = self._bag_logits(M)  # [1, n_classes]
        Y_hat = logits.topk(1, dim=1).indices  # [1, 1]
        Y_prob = F.softmax(logits, dim=1)
        if return_features:
            results_dict["features"] = M
        return logits, Y_prob, Y_hat, A_raw, results_dict

    def _class_of(self, label):
        """``label`` as a Python int in ``[0, n_classes)``, or a ValueError saying what it is."""
        value = label
        if isinstance(label, torch.Tensor) and label.numel() == 1 \
                and not label.is_floating_point() and not label.is_complex():
            value = label.item()
        if not _is_int(value) or not 0 <= value < self.n_classes:
            seen = (f"a tensor of shape {tuple(label.shape)} and dtype {label.dtype}"
                    if isinstance(label, torch.Tensor) and label.numel() != 1 else repr(label))
            raise ValueError(f"{type(self).__name__}: instance_eval needs label, the bag's "
                             f"class: an int or one-element integer tensor in [0, "
                             f"n_classes={self.n_classes}), got {seen}")
        return int(value)

    def _instance_eval(self, A, h, cls):
        """CLAM's instance-level evaluation of one bag (see :meth:`forward`).

        ``A``: the attention ``[K, N]``, ``h``: the features ``[N, hidden]``, ``cls``: the
        bag's class. Branch ``c`` ranks the instances for class ``c`` (K = 1: the one branch
        for every class).
        """
        k = self.k_sample
        total = 0.0
        preds, targets = [], []
        for c, classifier in enumerate(self.instance_classifiers):
            in_class = c == cls
            if not (in_class or self.subtyping):
                continue
            a = A[c if A.shape[0] > 1 else 0]  # [N]
            picked = a.topk(k).indices  # the k of highest attention
            target = torch.full((k,), int(in_class), dtype=torch.long, device=h.device)
            if in_class:  # with the k of lowest attention as negatives
                picked = torch.cat([picked, (-a).topk(k).indices])
                target = torch.cat([target, torch.zeros_like(target)])
            logits = classifier(h[picked])  # [k or 2k, 2]
            total = total + self.instance_loss_fn(logits, target)
            preds.append(logits.topk(1, dim=1).indices[:, 0])
            targets.append(target)
        if self.subtyping:
            total = total / len(self.instance_classifiers)
        return {"instance_loss": total,
                "inst_labels": torch.cat(targets).cpu().numpy(),
                "inst_preds": torch.cat(preds).cpu().numpy()}

    def extra_repr(self) -> str:
        return (f"n_classes={self.n_classes}, k_sample={self.k_sample}, "
                f"subtyping={self.subtyping}, size_arg={self.size_arg!r}, "
                f"dropout={self.dropout}")


class CLAM_SB(_CLAMBase):
    """CLAM's single-branch model on fastmil: one attention branch pools the bag, one Linear
    classifies it.

    Layers (hidden = 512; attention size 256 for ``size_arg="small"``, 384 for ``"big"``):

    - ``attention_net``: ``Sequential(Linear(embed_dim, 512), ReLU, Dropout(dropout))``;
    - ``attention_pool``: a :class:`fastmil.AttentionPool` ``(512, attention size)``, gated
      (``gate=True``) or plain, one branch, attention dropout 0.25 when ``dropout`` is nonzero
      (CLAM's ``Attn_Net_Gated`` / ``Attn_Net``), pooling with the ``backend`` given;
    - ``classifiers``: ``Linear(512, n_classes)``;
    - ``instance_classifiers``: ``n_classes`` times ``Linear(512, 2)``.

    Args:
        gate: gated (tanh ⊙ sigmoid) attention, or plain tanh attention.
        size_arg: ``"small"`` or ``"big"``.
        dropout: the Dropout probability after the first layer; nonzero also turns on the
            attention dropout (p = 0.25), as in CLAM. Both act in training mode only.
        k_sample: instances per side in the instance-level evaluation.
        n_classes: bag classes.
        instance_loss_fn: the instance loss ``loss(logits [n, 2], targets [n])``; None:
            ``nn.CrossEntropyLoss()`` (a new one per model).
        subtyping: also evaluate the out-of-class branches (the classes are subtypes, so
            the other classes' top instances are negatives for them).
        embed_dim: the instance feature size of ``h``.
        backend: the ``AttentionPool``'s backend, ``"auto"``, ``"torch"`` or ``"triton"``.

    Its ``state_dict`` is CLAM's with the attention net's keys renamed (see
    :func:`clam_to_fastmil_state_dict`). ``forward``: see :meth:`_CLAMBase.forward`.
    """

    @staticmethod
    def _branches(n_classes):
        return None  # one branch

    @staticmethod
    def _make_bag_classifiers(hidden, n_classes):
        return nn.Linear(hidden, n_classes)

    def _bag_logits(self, M):  # M [1, hidden] -> [1, n_classes]
        return self.classifiers(M)


class CLAM_MB(_CLAMBase):
    """CLAM's multi-branch model on fastmil: one attention branch per class, each class's logit
    from its own branch's pooled features.

    As :class:`CLAM_SB` (same arguments, ``attention_net``, ``instance_classifiers``), except:

    - ``attention_pool`` has ``n_classes`` branches, each with its own softmax over the bag,
      so ``M`` is ``[n_classes, 512]`` and ``A_raw`` ``[n_classes, N]``;
    - ``classifiers``: ``n_classes`` times ``Linear(512, 1)``, the one of class ``c`` applied
      to ``M[c]``;
    - the instance evaluation of class ``c`` ranks the instances by branch ``c``.
    """

    @staticmethod
    def _branches(n_classes):
        return n_classes

    @staticmethod
    def _make_bag_classifiers(hidden, n_classes):
        return nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))

    def _bag_logits(self, M):  # M [n_classes, hidden] -> [1, n_classes]
        return torch.cat([classifier(M[c]) for c, classifier in enumerate(self.classifiers)])[None]
