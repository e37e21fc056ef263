"""The pure-PyTorch backend of :func:`fastmil.attention_pool`.

Runs on any device and any floating dtype (float64 included), is differentiable by autograd and
traces under ``torch.compile(fullgraph=True)``. It is the fallback wherever the fused Triton kernel
does not run. Compared with the eager formulation it does one GEMM for V and U together, keeps the
score product and the softmax in float32, zeroes padding so that garbage there cannot leak in, and
handles packed bags with a segment softmax (scatter / index_add) instead of a Python loop over
bags.

Inputs arrive validated and canonical (see :mod:`fastmil.functional`): ``score_weight`` is 2-D
``[K, L]`` (the score bias, which the softmax ignores, stays with the caller), ``x`` is padded
``[B, N, D]`` (``mask`` optional) or packed ``[T, D]`` with ``offsets [B+1]``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["attention_pool_torch", "attention_scores", "segment_ids"]


def segment_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """Bag index of every packed row: offsets [B+1] -> [T] int64."""
    lengths = offsets[1:] - offsets[:-1]
    bags = torch.arange(lengths.shape[0], device=offsets.device)
    return torch.repeat_interleave(bags, lengths, output_size=total)


def attention_scores(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight):
    """Scores ``s = w·(tanh(V h + b_V) ⊙ sigmoid(U h + b_U))``: x [..., D] -> [..., K].

    The projections run as one GEMM in x's dtype (float32 accumulation inside the GEMM), the
    nonlinearities in x's dtype as in the eager formulation, and the score product in float32
    (float64 for float64 input), which is also the dtype of the returned scores.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    L = attn_weight.shape[0]
    if gate_weight is None:
        hidden = torch.tanh(F.linear(x, attn_weight, attn_bias))  # [..., L]
    else:
        weight = torch.cat([attn_weight, gate_weight])  # [2L, D]
        if attn_bias is None and gate_bias is None:
            bias = None
        else:
            zeros = attn_weight.new_zeros(L)
            bias = torch.cat([zeros if attn_bias is None else attn_bias,
                              zeros if gate_bias is None else gate_bias])  # [2L]
        pq = F.linear(x, weight, bias)  # [..., 2L]
        hidden = torch.tanh(pq[..., :L]) * torch.sigmoid(pq[..., L:])  # [..., L]
    if hidden.dtype == acc or score_weight.shape[0] > 1:
        return F.linear(hidden.to(acc), score_weight.to(acc))  # [..., K]
    # one branch of 16-bit input: products in x's dtype, summed in float32 (about twice as fast
    # on CPU as upcasting hidden to float32 first)
    return (hidden * score_weight[0]).sum(-1, keepdim=True, dtype=acc)  # [..., 1]


def _pool_padded(x, s, mask):
    """x [B, N, D], s [B, N, K] -> z [B, K, D], a [B, N, K]."""
    if mask is None:
        a = torch.softmax(s, dim=1)
    else:
        keep = mask[..., None]  # [B, N, 1]
        a = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=1)
        # An all-masked bag gives NaN rows in softmax; zero them. The gradient reaching s there
        # is zeroed by the masked_fill above, so no NaN leaks backward either.
        a = a.masked_fill(~keep, 0.0)
    # float16 goes through float32: the backward forms h·dz, which overflows float16's range
    # for large h. bfloat16 has float32's range and stays in bfloat16 (float32 accumulation
    # inside the GEMM), which halves the time of this step on CPU.
    dtype = x.dtype if x.dtype == torch.bfloat16 else a.dtype
    z = torch.bmm(a.transpose(1, 2).to(dtype), x.to(dtype))  # [B, K, D]
    return z, a


def _pool_packed(x, s, offsets):
    """x [T, D], s [T, K], offsets [B+1] -> z [B, K, D], a [T, K]."""
    T, K = s.shape
    B = offsets.shape[0] - 1
    seg = segment_ids(offsets, T)  # [T]
    idx = seg[:, None].expand(T, K)
    m = s.new_full((B, K), float("-inf")).scatter_reduce(0, idx, s.detach(), "amax")  # [B, K]
    e = torch.exp(s - m[seg])  # [T, K]; every row belongs to a non-empty bag, so m is finite
    l = s.new_zeros(B, K).index_add(0, seg, e)  # [B, K]
    a = e / l[seg]  # [T, K]
    xa = x.to(a.dtype)
    z = torch.stack([a.new_zeros(B, x.shape[1]).index_add(0, seg, a[:, k, None] * xa)
                     for k in range(K)], dim=1)  # [B, K, D]
    return z, a


def attention_pool_torch(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight,
                         mask=None, offsets=None, need_attention=True):
    """Pool padded ``x [B, N, D]`` (optional ``mask [B, N]``) or packed ``x [T, D]`` with
    ``offsets [B+1]``. Returns ``z [B, K, D]`` in x's dtype and the attention weights
    (``[B, N, K]`` or ``[T, K]``) in the accumulation dtype; this backend forms them on the way
    to z, so ``need_attention`` changes nothing here."""
    # The inputs arrive already cast to the autocast dtype (fastmil.functional); disable autocast
    # here so that it does not also downcast the float32 score product, softmax and pooling.
    device_type = x.device.type
    no_autocast = (torch.autocast(device_type, enabled=False)
                   if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext())
    with no_autocast:
        if mask is not None:  # padding may hold anything (NaN, inf): keep it out of the math
            x = x.masked_fill(~mask[..., None], 0)
        s = attention_scores(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight)
        if offsets is None:
            z, a = _pool_padded(x, s, mask)
        else:
            z, a = _pool_packed(x, s, offsets)
    return z.to(x.dtype), a
