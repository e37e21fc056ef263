"""The pure-PyTorch backend of :func:`fastmil.attention_pool`.

Runs on any device and any floating dtype (float64 included), is differentiable by autograd and
traces under ``torch.compile(fullgraph=True)``. It is the fallback wherever the fused Triton kernel
does not run. Compared with the eager formulation it does one GEMM for V and U together, keeps the
score product and the softmax in float32, zeroes padding so that garbage there cannot leak in, and
handles packed bags with a segment softmax (scatter / index_add) instead of a Python loop over
bags.

Precision: every softmax normalises along the last dimension (``[B, K, N]``); on float32 input
longer than ``POOL_ROWS`` rows, the softmax normaliser is summed in float64, and the weighted
sum and the weight gradients in slices of at most ``POOL_ROWS`` rows (the BLAS would otherwise
run one float32 sum along all rows, as precise as its thread count happens to make it), so a
float32 bag of 10⁶ instances stays closer to float64 than the eager formulation on any machine.
Memory: the packed weighted sum forms its ``a·x`` products one slice at a time, forward and
backward, never a ``[T, D]`` temporary beyond the gradient of x itself.

Inputs arrive validated and canonical (see :mod:`fastmil.functional`): ``score_weight`` is 2-D
``[K, L]`` (the score bias, which the softmax ignores, stays with the caller), ``x`` is padded
``[B, N, D]`` (``mask`` optional, bool) or packed ``[T, D]`` with ``offsets [B+1]``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .bags import segment_ids
from .reference import ACTIVATIONS

__all__ = ["attention_pool_torch", "attention_scores", "POOL_ROWS"]

# Rows per slice of the packed weighted sum: bounds its temporary memory to
# POOL_ROWS·K·D values and its sequential (index_add) summation to POOL_ROWS terms per slice.
# Also, for float32 inputs of more than POOL_ROWS rows, the longest float32 running sum over
# rows that the weight gradients and the padded weighted sum may take (their GEMMs go slice by
# slice), and the length above which the padded softmax sums its normaliser in float64. Up to
# POOL_ROWS rows these are one GEMM each and torch.softmax.
POOL_ROWS = 8192
# Rows per slice of a small weight gradient (see _sliced_weight_grad).
SUM_ROWS = 1024


def _dropout(t, p):
    return t if p == 0 else F.dropout(t, p)


def _long_float32(x, rows):
    """Whether the row reductions of ``x`` (float32, more than POOL_ROWS rows) run in slices."""
    return x.dtype == torch.float32 and rows > POOL_ROWS


def _sliced_weight_grad(dy, x):
    """``dy [T, O]``, ``x [T, I]`` -> ``dy^T x [O, I]`` with no float32 running sum over more
    than POOL_ROWS rows. A small product (O·I <= 64·(O+I): memory-bound, and BLASes sum such
    shapes as long dot products) goes as one bmm over SUM_ROWS-row slices, whose partials
    (at most 1/16 of the inputs' size) torch.sum adds up, cascaded. A large one goes as one
    multithreaded GEMM per POOL_ROWS-row slice, the slices added up in float64."""
    T, O = dy.shape
    I = x.shape[1]
    if O * I <= 64 * (O + I):
        S = SUM_ROWS
        head = T // S * S
        w = torch.bmm(dy[:head].reshape(-1, S, O).transpose(1, 2),
                      x[:head].reshape(-1, S, I)).sum(0)  # [O, I]
        return w + dy[head:].t() @ x[head:] if T > head else w
    w = dy.new_zeros(O, I, dtype=torch.float64)
    for dy_c, x_c in zip(dy.split(POOL_ROWS), x.split(POOL_ROWS), strict=True):
        w = w + dy_c.t() @ x_c
    return w.to(dy.dtype)


class _RowSlicedLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient sums its rows in slices (_sliced_weight_grad).

    A float32 GEMM runs its reduction dimension as float32 running sums, in an order the BLAS
    picks by shape and thread count: one ``[O, T] @ [T, I]`` over T = 10⁶ rows came 3·10⁻⁵ off
    (relative) with one thread and 5·10⁻⁷ with 32 (MKL splits T between threads), so the same
    gradient had a different precision on every machine. Slices bound every running sum to
    POOL_ROWS terms on any BLAS and thread count. The input and bias gradients are
    F.linear's. Differentiable twice."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])  # [T, O]
        dx = dy @ weight if need_x else None
        dw = _sliced_weight_grad(dy2, x.reshape(-1, x.shape[-1])) if need_w else None
        db = dy2.sum(0) if need_b else None
        return dx, dw, db


def _linear(x, weight, bias=None):
    """``F.linear``; for a long float32 ``x`` whose weight needs a gradient, with that gradient
    summed in slices (_RowSlicedLinear). Other dtypes accumulate in float32 or wider inside the
    GEMM already, and up to POOL_ROWS rows keep the one GEMM of F.linear."""
    if (weight.requires_grad and torch.is_grad_enabled()
            and _long_float32(x, x.shape[:-1].numel())):
        return _RowSlicedLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def attention_scores(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight,
                     activation="tanh", dropout_p=0.0):
    """Scores ``s = w·(act(V h + b_V) ⊙ sigmoid(U h + b_U))``: x [..., D] -> [..., K].

    With ``dropout_p > 0`` the activation's and the sigmoid's outputs each get their own
    dropout mask (scaled by 1/(1-p)), as in CLAM's ``Attn_Net_Gated``. The projections run as
    one GEMM in x's dtype (float32 accumulation inside the GEMM), the nonlinearities in x's dtype
    as in the eager formulation, and the score product in float32 (float64 for float64 input),
    which is also the dtype of the returned scores.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    L = attn_weight.shape[0]
    act = ACTIVATIONS[activation]
    if gate_weight is None:
        hidden = _dropout(act(_linear(x, attn_weight, attn_bias)), dropout_p)  # [..., L]
    else:
        weight = torch.cat([attn_weight, gate_weight])  # [2L, D]
        if attn_bias is None and gate_bias is None:
            bias = None
        else:
            zeros = attn_weight.new_zeros(L)
            bias = torch.cat([zeros if attn_bias is None else attn_bias,
                              zeros if gate_bias is None else gate_bias])  # [2L]
        p, q = _linear(x, weight, bias).split(L, dim=-1)  # [..., L] each (split: its
        # backward is one cat, where slicing would zero-fill and copy [.., 2L] twice)
        hidden = _dropout(act(p), dropout_p) * _dropout(torch.sigmoid(q), dropout_p)  # [..., L]
    if hidden.dtype == acc or score_weight.shape[0] > 1:
        return _linear(hidden.to(acc), score_weight.to(acc))  # [..., K]
    # one branch of 16-bit input: products in x's dtype, summed in float32 (about twice as fast
    # on CPU as upcasting hidden to float32 first)
    return (hidden * score_weight[0]).sum(-1, keepdim=True, dtype=acc)  # [..., 1]


def _softmax_lastdim(st):
    """``torch.softmax(st, -1)``; for long float32 rows with the normaliser summed in float64,
    as the packed path does: torch.softmax runs it (and its backward's Σ a·g) as float32
    running sums, 10⁻⁶ off on 10⁶ instances, an error that every gradient then carries."""
    if not _long_float32(st, st.shape[-1]):
        return torch.softmax(st, dim=-1)
    m = st.detach().amax(-1, keepdim=True)  # -inf for an all-masked row: NaN there, as softmax
    e = torch.exp(st - m)
    return (e / e.sum(-1, keepdim=True, dtype=torch.float64)).to(st.dtype)


def _sliced_bmm(a, x):
    """``a [B, K, N] @ x [B, N, D]``; for long float32 bags one bmm per POOL_ROWS-row slice of
    N, the slices added up in float64, so that no float32 running sum is longer than a slice
    (see _RowSlicedLinear)."""
    if not _long_float32(x, a.shape[-1]):
        return torch.bmm(a, x)
    z = None
    for a_c, x_c in zip(a.split(POOL_ROWS, -1), x.split(POOL_ROWS, 1), strict=True):
        part = torch.bmm(a_c, x_c).double()  # [B, K, D]
        z = part if z is None else z + part
    return z.to(x.dtype)


def _pool_padded(x, s, mask):
    """x [B, N, D], s [B, N, K] -> z [B, K, D], a [B, N, K]."""
    st = s.transpose(1, 2)  # [B, K, N]: the softmax runs along the last dim, where it is exact
    if mask is None:
        a = _softmax_lastdim(st)
    else:
        keep = mask[:, None, :]  # [B, 1, N]
        a = _softmax_lastdim(st.masked_fill(~keep, float("-inf")))
        # An all-masked bag gives NaN rows in softmax; zero them. The gradient reaching s there
        # is zeroed by the masked_fill above, so no NaN leaks backward either.
        a = a.masked_fill(~keep, 0.0)
    # float16 goes through float32: the backward forms h·dz, which overflows float16's range
    # for large h. bfloat16 has float32's range and stays in bfloat16 (float32 accumulation
    # inside the GEMM), which halves the time of this step on CPU.
    dtype = x.dtype if x.dtype == torch.bfloat16 else a.dtype
    z = _sliced_bmm(a.to(dtype), x.to(dtype))  # [B, K, D]
    return z, a.transpose(1, 2)


class _SegmentWeightedSum(torch.autograd.Function):
    """z[b, k] = Σ_{n in bag b} a[n, k] x[n] for packed rows, one slice of POOL_ROWS rows at a
    time: each slice's products [S, K, D] are summed per bag into a partial (the bags present in
    a slice get local ids 0, 1, … in row order), and the partials into z. No bag sums more than
    POOL_ROWS terms in a row, and no temporary (forward or backward) or saved tensor is larger
    than one slice: autograd keeps only a, x and the bag ids. No host sync."""

    @staticmethod
    def forward(ctx, a, x, seg, B):
        T, K = a.shape
        z = a.new_zeros(B, K, x.shape[1])
        for x_c, a_c, seg_c in zip(x.split(POOL_ROWS), a.split(POOL_ROWS), seg.split(POOL_ROWS),
                                   strict=True):
            prod = a_c[:, :, None] * x_c.to(a.dtype)[:, None, :]  # [S, K, D]
            if T <= POOL_ROWS:
                z.index_add_(0, seg_c, prod)
                break
            starts = torch.ones_like(seg_c)
            starts[1:] = seg_c[1:] != seg_c[:-1]
            local = torch.cumsum(starts, 0) - 1  # [S]: rank of the row's bag in this slice
            nb = min(seg_c.shape[0], B)
            part = a.new_zeros(nb, K, x.shape[1]).index_add_(0, local, prod)  # [nb, K, D]
            bag = seg_c.new_zeros(nb).scatter_(0, local, seg_c)  # local id -> bag (unused: +0)
            z.index_add_(0, bag, part)
        ctx.save_for_backward(a, x, seg)
        return z

    @staticmethod
    def backward(ctx, dz):
        a, x, seg = ctx.saved_tensors
        need_a, need_x = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: the same sums, differentiable, whole
            dz_rows = dz[seg]  # [T, K, D]
            return ((dz_rows * x.to(dz.dtype)[:, None, :]).sum(-1) if need_a else None,
                    (a[:, :, None] * dz_rows).sum(1).to(x.dtype) if need_x else None, None, None)
        da = torch.empty_like(a) if need_a else None  # [T, K]
        dx = torch.empty_like(x) if need_x else None  # [T, D], filled slice by slice
        for i, (x_c, a_c, seg_c) in enumerate(zip(x.split(POOL_ROWS), a.split(POOL_ROWS),
                                                  seg.split(POOL_ROWS), strict=True)):
            rows = slice(i * POOL_ROWS, i * POOL_ROWS + x_c.shape[0])
            dz_c = dz[seg_c]  # [S, K, D]
            if need_a:
                torch.sum(dz_c * x_c.to(dz.dtype)[:, None, :], -1, out=da[rows])  # [S, K]
            if need_x:
                dx[rows] = (a_c[:, :, None] * dz_c).sum(1)  # [S, D]
        return da, dx, None, None


def _pool_packed(x, s, offsets):
    """x [T, D], s [T, K], offsets [B+1] -> z [B, K, D], a [T, K]."""
    T, K = s.shape
    B = offsets.shape[0] - 1
    seg = segment_ids(offsets[1:] - offsets[:-1], T)  # [T]
    m = s.new_full((B, K), float("-inf")).scatter_reduce(
        0, seg[:, None].expand(T, K), s.detach(), "amax")  # [B, K]
    e = torch.exp(s - m[seg])  # [T, K]; every row belongs to a non-empty bag, so m is finite
    # the normaliser summed in float64: exact to float32 rounding for bags of any length
    l = torch.zeros(B, K, dtype=torch.float64, device=s.device).index_add(0, seg, e.double())
    a = (e / l[seg]).to(s.dtype)  # [T, K]
    return _SegmentWeightedSum.apply(a, x, seg, B), a


def attention_pool_torch(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight,
                         mask=None, offsets=None, *, score_bias=None, activation="tanh",
                         dropout_p=0.0, recompute=None, need_attention=True, need_scores=False):
    """Pool padded ``x [B, N, D]`` (optional bool ``mask [B, N]``) or packed ``x [T, D]`` with
    ``offsets [B+1]``.

    Returns ``(z, attention, scores)``: ``z [B, K, D]`` in x's dtype, the attention weights and
    the raw scores (``-inf`` at masked slots, no score bias), each ``[B, N, K]`` or ``[T, K]``
    in the accumulation dtype, or None when not needed. ``recompute=True`` keeps only the inputs
    for backward and recomputes the scores there (activation checkpointing, same dropout
    masks); None or False lets autograd save the intermediate ``[.., L]`` tensors.
    ``score_bias`` is left out of the math (the softmax ignores it) but linked to z with an
    exactly zero gradient, so that it still gets a ``.grad`` (as DDP expects).
    """
    # The inputs arrive already cast to the autocast dtype (fastmil.functional); disable autocast
    # here so that it does not also downcast the float32 score product, softmax and pooling.
    device_type = x.device.type
    # CPU and CUDA always have autocast: asking torch.amp only for other devices keeps
    # torch._C._is_autocast_available, which Dynamo cannot trace (torch 2.11), out of
    # torch.compile's way
    has_autocast = device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
    no_autocast = (torch.autocast(device_type, enabled=False) if has_autocast
                   else contextlib.nullcontext())
    with no_autocast:
        if mask is not None:  # padding may hold anything (NaN, inf): keep it out of the math
            x = x.masked_fill(~mask[..., None], 0)
        args = (x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight, activation,
                dropout_p)
        if recompute and torch.is_grad_enabled():
            s = checkpoint(attention_scores, *args, use_reentrant=False)
        else:
            s = attention_scores(*args)
        if offsets is None:
            z, a = _pool_padded(x, s, mask)
        else:
            z, a = _pool_packed(x, s, offsets)
        if need_scores and mask is not None:
            s = s.masked_fill(~mask[..., None], float("-inf"))
    z = z.to(x.dtype)
    a = a if need_attention else None
    if score_bias is not None and score_bias.requires_grad and torch.is_grad_enabled():
        # the softmax ignores the shift: an exact zero gradient through z and the attention,
        # not rounding noise for Adam (the scores carry the bias's real gradient)
        zero = score_bias.sum() * 0
        z = z + zero.to(z.dtype)
        a = None if a is None else a + zero.to(a.dtype)
    return z, a, s if need_scores else None
