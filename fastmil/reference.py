"""Reference formulations of attention-MIL pooling, in plain PyTorch.

:func:`attention_pool_reference` is the obviously-correct ground truth: it walks the bags one
by one in a Python loop, upcasts everything to float32 (float64 stays float64) and applies the
textbook formula. Tests and benchmarks compare every backend against it. Nothing else of fastmil
is imported here.

Math, per bag ``h_1..h_N`` (``V = attn_weight``, ``U = gate_weight``, ``w = score_weight``)::

    s_k = w · (tanh(V h_k + b_V) ⊙ sigmoid(U h_k + b_U)) + b_w
    a   = softmax(s) over the bag's own instances,   z = Σ_k a_k h_k
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "attention_pool_reference", "scores"]

# The attention branch's activation, by name (torchmil's ``act``): GELU is the exact erf form,
# as ``nn.GELU()``.
ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def scores(h, attn_weight, gate_weight, score_weight, attn_bias=None, gate_bias=None,
           score_bias=None, activation="tanh"):
    """The textbook scores ``w · (act(V h + b_V) ⊙ sigmoid(U h + b_U)) + b_w``: h [..., D] ->
    [..., K] for a 2-D score_weight [K, L], in h's dtype, as two ``F.linear`` and the
    elementwise ops (the eager formulation)."""
    hidden = ACTIVATIONS[activation](F.linear(h, attn_weight, attn_bias))
    if gate_weight is not None:
        hidden = hidden * torch.sigmoid(F.linear(h, gate_weight, gate_bias))
    return F.linear(hidden, score_weight, score_bias)


def attention_pool_reference(
    x,
    attn_weight,
    gate_weight,
    score_weight,
    *,
    attn_bias=None,
    gate_bias=None,
    score_bias=None,
    mask=None,
    offsets=None,
    activation="tanh",
    return_attention=False,
    return_scores=False,
):
    """Ground-truth attention pooling, one bag at a time. Same contract as
    :func:`fastmil.attention_pool` (layouts, shapes, empty bags, outputs ``z``, then the
    attention if ``return_attention``, then the raw scores if ``return_scores``), without input
    validation and without dropout. ``mask`` may be bool or integer (nonzero = real instance).

    Computes in float32 (float64 for float64 input) and returns ``z`` in x's dtype; the
    attention weights and the scores (score bias included, ``-inf`` at padded slots) come back
    in the accumulation dtype.
    """
    acc = _acc_dtype(x.dtype)
    out_dtype = x.dtype
    single_branch = score_weight.dim() == 1
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    V, U, w = cast(attn_weight), cast(gate_weight), cast(score_weight)
    bV, bU, bw = cast(attn_bias), cast(gate_bias), cast(score_bias)
    if single_branch:
        w = w[None, :]
        bw = None if bw is None else bw.reshape(1)
    K, D = w.shape[0], x.shape[-1]

    # Cut the input into a list of bags [n_b, D] and remember where each instance came from.
    if x.dim() == 3:  # padded
        B, N = x.shape[:2]
        keep = torch.ones(B, N, dtype=torch.bool, device=x.device) if mask is None else mask != 0
        rows = [torch.nonzero(keep[b]).flatten() for b in range(B)]
        bags = [x[b, r].to(acc) for b, r in enumerate(rows)]
    elif offsets is not None:  # packed
        bounds = [int(o) for o in offsets.tolist()]
        bags = [x[s:e].to(acc) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    else:  # single bag
        bags = [x.to(acc)]

    zs, attns, raw = [], [], []
    for h in bags:
        s = scores(h, V, U, w, bV, bU, bw, activation)  # [n, K]
        a = torch.softmax(s, dim=0)  # [n, K]
        zs.append(a.t() @ h)  # [K, D]; zeros for an empty bag
        attns.append(a)
        raw.append(s)
    z = torch.stack(zs) if zs else torch.zeros(0, K, D, dtype=acc, device=x.device)

    def align(per_bag, fill):  # per-bag [n_b, K] values -> aligned with x's instance axis
        if x.dim() == 3:
            out = torch.full((x.shape[0], x.shape[1], K), fill, dtype=acc, device=x.device)
            for b, (r, v) in enumerate(zip(rows, per_bag, strict=True)):
                out[b, r] = v
            return out
        return torch.cat(per_bag) if per_bag else torch.zeros(0, K, dtype=acc, device=x.device)

    outs = [z]
    if return_attention:
        outs.append(align(attns, 0.0))
    if return_scores:
        outs.append(align(raw, float("-inf")))
    if x.dim() == 2 and offsets is None:  # single bag
        outs[0] = z[0]
    if single_branch:
        outs = [outs[0].squeeze(-2)] + [t.squeeze(-1) for t in outs[1:]]
    outs[0] = outs[0].to(out_dtype)
    return outs[0] if len(outs) == 1 else tuple(outs)
