"""The pure-PyTorch backend of :func:`fastmil.attention_pool`.

Runs on any device and any floating dtype (float64 included), is differentiable by autograd and
traces under ``torch.compile(fullgraph=True)``. It is the fallback wherever the fused Triton kernel
does not run. Compared with the eager formulation it does one GEMM for V and U together, keeps the
score product and the softmax in float32, zeroes padding so that garbage there cannot leak in, and
handles packed bags with a segment softmax and a segment weighted sum (one-hot GEMMs, or
index_add for many small bags) instead of a Python loop over bags.

Speed (the CPU fallback): few, large ops, since on a CPU every op over more than a few thousand
values wakes the thread pool, which costs far more than the op when another process holds a
core. The gated scores' backward is one product (_GatedScores), x's two gradients are added
inside the projection's backward GEMM (_Linear's alias), long bags run their slices as one bmm,
and padded input whose (CPU) mask is all True skips the masked copy of x.

Precision: every softmax normalises along the last dimension (``[B, K, N]``); on float32 input
longer than ``POOL_ROWS`` rows, the softmax normaliser is summed in float64, and the weighted
sum and the weight gradients in slices of at most ``POOL_ROWS`` rows (the BLAS would otherwise
run one float32 sum along all rows, as precise as its thread count happens to make it), the
slices' partials added in float64, so a float32 bag of 10⁶ instances stays closer to float64
than the eager formulation on any machine. The packed one-hot GEMMs sum each bag over its own rows only.
Memory: the packed weighted sum forms its ``a·x`` products one slice at a time (index_add) or
not at all (one-hot GEMMs, whose weights stay within a quarter of x), forward and backward,
never a ``[T, D]`` temporary beyond the gradient of x itself, onto which the projection adds
its part in place.

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
# POOL_ROWS·K·D values and its running sums to POOL_ROWS terms per bag and slice (one slice
# for all rows where no bag is longer). Also, for float32 inputs of more than POOL_ROWS rows,
# the longest float32 running sum over rows that the weight gradients and the padded weighted
# sum may take (their GEMMs go slice by slice), and the length above which the padded softmax
# sums its normaliser in float64. Up to POOL_ROWS rows these are one GEMM each and
# torch.softmax.
POOL_ROWS = 8192
# Rows per slice of a small weight gradient (see _sliced_weight_grad).
SUM_ROWS = 1024
# The packed weighted sum runs as one-hot GEMMs where a slice holds at most this many
# (bag, branch) pairs (and a quarter of D), else as index_add (see _SegmentWeightedSum).
DENSE_COLS = 32


def _dropout(t, p):
    return t if p == 0 else F.dropout(t, p)


def _long_float32(x, rows):
    """Whether the row reductions of ``x`` (float32, more than POOL_ROWS rows) run in slices."""
    return x.dtype == torch.float32 and rows > POOL_ROWS


def _sliced_weight_grad(dy, x):
    """``dy [T, O]``, ``x [T, I]`` -> ``dy^T x [O, I]`` with no float32 running sum over more
    than POOL_ROWS rows: one bmm over the whole slices of the rows ([n, O, I] partials; slices
    of SUM_ROWS rows for a small product, O·I <= 64·(O+I), which BLASes sum as long dot
    products, else of POOL_ROWS rows: partials at most O/POOL_ROWS of x's size) and one GEMM
    for the tail rows, the partials added up in float64."""
    T, O = dy.shape
    I = x.shape[1]
    S = SUM_ROWS if O * I <= 64 * (O + I) else POOL_ROWS
    n = T // S
    head = n * S
    if n == 1:  # one slice and the tail: the tail added onto it inside the GEMM
        w = dy[:head].t() @ x[:head]  # [O, I]
        return torch.addmm(w, dy[head:].t(), x[head:]) if T > head else w
    w = torch.bmm(dy[:head].reshape(n, S, O).transpose(1, 2),
                  x[:head].reshape(n, S, I)).sum(0, dtype=torch.float64)
    if T > head:
        w += dy[head:].t() @ x[head:]
    return w.to(dy.dtype)


class _Linear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with two options for its backward.

    ``sliced``: the weight gradient sums its rows in slices (_sliced_weight_grad). A float32
    GEMM runs its reduction dimension as float32 running sums, in an order the BLAS picks by
    shape and thread count: one ``[O, T] @ [T, I]`` over T = 10⁶ rows came 3·10⁻⁵ off
    (relative) with one thread and 5·10⁻⁷ with 32 (MKL splits T between threads), so the same
    gradient had a different precision on every machine. Slices bound every running sum to
    POOL_ROWS terms on any BLAS and thread count.

    ``alias``: a second output, x itself (a view), for the caller's other use of x (the
    weighted sum): its gradient arrives here with the output's, and the input gradient is
    accumulated onto it inside the GEMM (``addmm_``, beta = 1) instead of by autograd's
    separate [.., D] add of the two. Differentiable twice."""

    @staticmethod
    def forward(ctx, x, weight, bias, sliced, alias):
        ctx.save_for_backward(x, weight)
        ctx.sliced = sliced
        y = F.linear(x, weight, bias)
        return (y, x.view_as(x)) if alias else y

    @staticmethod
    def backward(ctx, dy, dx_alias=None):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy2 = dy.reshape(-1, dy.shape[-1])  # [T, O]
        x2 = x.reshape(-1, x.shape[-1])  # [T, I]
        dx = None
        if need_x and dx_alias is None:
            dx = dy @ weight
        elif need_x and not torch.is_grad_enabled() and dx_alias.is_contiguous():
            dx = dx_alias  # a fresh tensor from the weighted sum's backward, ours to add to
            dx.view(-1, dx.shape[-1]).addmm_(dy2, weight)
        elif need_x:
            dx = dx_alias + dy @ weight
        dw = None
        if need_w:
            dw = _sliced_weight_grad(dy2, x2) if ctx.sliced else dy2.t() @ x2
        db = dy2.sum(0) if need_b else None
        return dx, dw, db, None, None


def _linear(x, weight, bias=None, alias=False):
    """``F.linear``; for a long float32 ``x`` whose weight needs a gradient, with that gradient
    summed in slices (_Linear). Other dtypes accumulate in float32 or wider inside the GEMM
    already, and up to POOL_ROWS rows keep the one GEMM of F.linear. ``alias``: returns
    ``(y, x)`` with x's two gradients added inside the backward's GEMM (see _Linear)."""
    sliced = (weight.requires_grad and torch.is_grad_enabled()
              and _long_float32(x, x.shape[:-1].numel()))
    if alias or sliced:
        return _Linear.apply(x, weight, bias, sliced, alias)
    return F.linear(x, weight, bias)


def _gated_hidden(pq, activation):
    """``pq [..., 2L]`` -> ``act(p) [..., L]``, ``sigmoid(q) [..., L]``."""
    p, q = pq.split(pq.shape[-1] // 2, dim=-1)
    return ACTIVATIONS[activation](p), torch.sigmoid(q)


# g·act'(p), written into ``out``, from the activation's input p and output t
_ACT_GRAD = {
    "tanh": lambda g, p, t, out: torch.ops.aten.tanh_backward.grad_input(g, t, grad_input=out),
    "relu": lambda g, p, t, out: torch.ops.aten.threshold_backward.grad_input(
        g, t, 0, grad_input=out),
    "gelu": lambda g, p, t, out: torch.ops.aten.gelu_backward.grad_input(g, p, grad_input=out),
}


class _GatedScores(torch.autograd.Function):
    """Scores ``s = (act(p) ⊙ sigmoid(q)) @ w^T``: ``pq [..., 2L]`` (float32 / float64),
    ``w [K, L]`` -> ``[..., K]``, without dropout.

    The forward keeps the two factors of the projection's gradient, ``u = sigmoid(q)·act'(p)``
    and ``v = act(p)·sigmoid'(q)`` (``[..., 2, L]``, the memory autograd would keep for act(p)
    and sigmoid(q)), so that the backward is ``dpq = (ds @ w) ⊙ [u, v]``: one product for
    dpq, where autograd runs two products, two activation backwards and the cat of dp and dq.
    The score weight's gradient sums its rows in slices for long float32 input (``sliced``).
    Differentiable twice (recomputed by autograd)."""

    @staticmethod
    def forward(ctx, pq, w, activation, sliced):
        ctx.activation, ctx.sliced = activation, sliced
        t, g = _gated_hidden(pq, activation)
        h = t * g  # [..., L]
        if ctx.needs_input_grad[0]:
            L = w.shape[1]
            uv = pq.new_empty(*pq.shape[:-1], 2, L)
            _ACT_GRAD[activation](g, pq[..., :L], t, uv[..., 0, :])
            torch.ops.aten.sigmoid_backward.grad_input(t, g, grad_input=uv[..., 1, :])
            ctx.save_for_backward(pq, w, h, uv)
        else:
            ctx.save_for_backward(pq, w, h)
        return h @ w.t()

    @staticmethod
    def backward(ctx, ds):
        pq, w, h, *uv = ctx.saved_tensors  # (unpacked once: checkpoint allows no more)
        need_pq, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: the same, by autograd, recomputed
            t, g = _gated_hidden(pq, ctx.activation)
            inputs = [v for v, need in ((pq, need_pq), (w, need_w)) if need]
            got = iter(torch.autograd.grad((t * g) @ w.t(), inputs, ds, create_graph=True))
            return (next(got) if need_pq else None, next(got) if need_w else None, None, None)
        dpq = dw = None
        if need_pq:
            dpq = ((ds @ w).unsqueeze(-2) * uv[0]).view(pq.shape)  # [..., 2L]
        if need_w:
            ds2, h2 = ds.reshape(-1, ds.shape[-1]), h.reshape(-1, h.shape[-1])
            dw = _sliced_weight_grad(ds2, h2) if ctx.sliced else ds2.t() @ h2
        return dpq, dw, None, None


def attention_scores(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight,
                     activation="tanh", dropout_p=0.0, alias=False):
    """Scores ``s = w·(act(V h + b_V) ⊙ sigmoid(U h + b_U))``: x [..., D] -> [..., K].

    With ``dropout_p > 0`` the activation's and the sigmoid's outputs each get their own
    dropout mask (scaled by 1/(1-p)), as in CLAM's ``Attn_Net_Gated``. The projections run as
    one GEMM in x's dtype (float32 accumulation inside the GEMM), the nonlinearities in x's dtype
    as in the eager formulation, and the score product in float32 (float64 for float64 input),
    which is also the dtype of the returned scores. ``alias``: returns ``(s, x')``, x' a view of
    x to pool with, whose gradient the projection's backward adds to its own (see _Linear).
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    L = attn_weight.shape[0]
    act = ACTIVATIONS[activation]
    if gate_weight is None:
        weight, bias = attn_weight, attn_bias
    else:
        weight = torch.cat([attn_weight, gate_weight])  # [2L, D]
        if attn_bias is None and gate_bias is None:
            bias = None
        else:
            zeros = attn_weight.new_zeros(L)
            bias = torch.cat([zeros if attn_bias is None else attn_bias,
                              zeros if gate_bias is None else gate_bias])  # [2L]
    pq = _linear(x, weight, bias, alias)  # [..., L] or [..., 2L]
    if alias:
        pq, x = pq
    if gate_weight is None:
        hidden = _dropout(act(pq), dropout_p)  # [..., L]
    elif (dropout_p == 0 and pq.dtype == acc and activation in _ACT_GRAD
          and torch.is_grad_enabled()):
        sliced = (score_weight.requires_grad
                  and _long_float32(pq, pq.shape[:-1].numel()))
        s = _GatedScores.apply(pq, score_weight, activation, sliced)  # [..., K]
        return (s, x) if alias else s
    else:
        p, q = pq.split(L, dim=-1)  # [..., L] each (split: its backward is one cat, where
        # slicing would zero-fill and copy [.., 2L] twice)
        hidden = _dropout(act(p), dropout_p) * _dropout(torch.sigmoid(q), dropout_p)  # [..., L]
    if hidden.dtype == acc or score_weight.shape[0] > 1:
        s = _linear(hidden.to(acc), score_weight.to(acc))  # [..., K]
    else:
        # one branch of 16-bit input: products in x's dtype, summed in float32 (about twice as
        # fast on CPU as upcasting hidden to float32 first)
        s = (hidden * score_weight[0]).sum(-1, keepdim=True, dtype=acc)  # [..., 1]
    return (s, x) if alias else s


def _softmax_lastdim(st):
    """``torch.softmax(st, -1)``; for long float32 rows with the normaliser summed in float64,
    as the packed path does: torch.softmax runs it (and its backward's Σ a·g) as float32
    running sums, 10⁻⁶ off on 10⁶ instances, an error that every gradient then carries."""
    if not _long_float32(st, st.shape[-1]):
        return torch.softmax(st, dim=-1)
    m = st.detach().amax(-1, keepdim=True)  # -inf for an all-masked row: NaN there, as softmax
    e = torch.exp(st - m)
    return (e / e.sum(-1, keepdim=True, dtype=torch.float64)).to(st.dtype)


class _RowSlicedBmm(torch.autograd.Function):
    """``a [B, K, N] @ x [B, N, D]`` -> ``[B, K, D]`` with the sum over N in slices of POOL_ROWS
    rows, so that no float32 running sum is longer than a slice (see _Linear): one
    bmm over all whole slices ([B·n, K, S] @ [B·n, S, D]; one per bag where x's bags are not one
    stride apart), the partials ([B, n, K, D]) and the tail rows' bmm added up in float64.
    The backward sums over K and D only: one bmm each for dx and da, differentiable (double
    backward), with no [B, N, D] temporary beyond dx itself."""

    @staticmethod
    def forward(ctx, a, x):
        ctx.save_for_backward(a, x)
        B, K, N = a.shape
        D = x.shape[2]
        S = POOL_ROWS
        n = N // S
        head = n * S
        a_s = a[:, :, :head].reshape(B, K, n, S).transpose(1, 2)  # [B, n, K, S]
        if B == 1 or head == N:
            part = torch.bmm(a_s.reshape(B * n, K, S), x[:, :head].reshape(B * n, S, D))
        else:
            part = torch.cat([torch.bmm(a_s[b], x[b, :head].reshape(n, S, D)) for b in range(B)])
        z = part.view(B, n, K, D).sum(1, dtype=torch.float64)  # [B, K, D]
        if N > head:
            z = z + torch.bmm(a[:, :, head:], x[:, head:])
        return z.to(x.dtype)

    @staticmethod
    def backward(ctx, dz):
        a, x = ctx.saved_tensors
        need_a, need_x = ctx.needs_input_grad
        da = torch.bmm(dz, x.transpose(1, 2)) if need_a else None  # [B, K, N]
        dx = torch.bmm(a.transpose(1, 2), dz) if need_x else None  # [B, N, D]
        return da, dx


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
    ad, xd = a.to(dtype), x.to(dtype)
    z = _RowSlicedBmm.apply(ad, xd) if _long_float32(xd, a.shape[-1]) else torch.bmm(ad, xd)
    return z, a.transpose(1, 2)


def _slice_groups(T, batched):
    """The packed rows [0, T) in slices of POOL_ROWS rows, as groups ``(start, n, S)`` of n
    slices of S rows from row ``start``: all whole slices in one group (``batched``: one bmm
    for them all) or one group per slice, and the tail rows (fewer than POOL_ROWS) last."""
    S = POOL_ROWS
    n = T // S
    groups = ([(0, n, S)] if n else []) if batched else [(i * S, 1, S) for i in range(n)]
    return groups + ([(n * S, 1, T - n * S)] if T > n * S else [])


def _local_bags(seg_s, B):
    """Bag ids ``seg_s [n, S]`` of n slices (ascending in each) -> ``local [n, S]``, the rank of
    each row's bag among the bags in its slice (0, 1, …), ``bag [n, nb]``, the bag of each rank
    (0 past the last one: its partial is zero), and nb = min(S, B)."""
    n, S = seg_s.shape
    nb = min(S, B)
    local = torch.zeros_like(seg_s)
    local[:, 1:] = torch.cumsum(seg_s[:, 1:] != seg_s[:, :-1], 1)
    return local, seg_s.new_zeros(n, nb).scatter_(1, local, seg_s), nb


def _few_cols(cols, D):
    """Whether the weighted sum runs as GEMMs with ``cols`` (bag, branch) columns of one-hot
    weights: at most DENSE_COLS of them, and a quarter of D (the weights stay at most a quarter
    of x's size)."""
    return cols <= DENSE_COLS and 4 * cols <= D


def _one_hot_weights(a_s, local, nb):
    """``a_s [n, S, K]``, ``local [n, S]`` -> ``[n, S, nb·K]``: each row holds its K weights in
    the K columns of its bag's rank, zeros elsewhere."""
    n, S, K = a_s.shape
    w = a_s.new_zeros(n, S, nb, K)
    w.scatter_(2, local[:, :, None, None].expand(n, S, 1, K), a_s[:, :, None, :])
    return w.view(n, S, nb * K)


class _SegmentWeightedSum(torch.autograd.Function):
    """z[b, k] = Σ_{n in bag b} a[n, k] x[n] for packed rows ``a [T, K]``, ``x [T, D]``, sorted
    bag ids ``seg [T]`` -> ``z [B, K, D]``. No host sync.

    Few bags (B·K columns, _few_cols): one GEMM of the one-hot weights ``[B·K, T]`` (each row's
    a in its bag's columns, zeros elsewhere) by x, and one GEMM each for dx and da in the
    backward. Zeros add nothing, so a bag's running sum covers its own rows only: one GEMM for
    all rows where T <= POOL_ROWS or ``whole`` (the caller knows that no bag is longer than
    POOL_ROWS rows). Else the rows go in slices of POOL_ROWS, the bags in a slice ranked 0, 1,
    … in row order (at most nb = min(POOL_ROWS, B) of them), and the slices' partials
    ``[nb, K, D]`` are added up in float64: with few bags per slice (_few_cols(nb·K)) each slice
    is one such GEMM (all whole slices of a float32 / float64 x in one bmm), with many each
    slice's products ``[S, K, D]`` are summed per bag by index_add (fine on one thread; with
    several it runs many parallel phases, slow where another process holds a core). No bag
    sums more than POOL_ROWS terms in a row; besides dx, no temporary is larger than one
    slice's products or a quarter of x (the one-hot weights, da's products with every bag).
    Autograd keeps a, x, the bag ids and the one-GEMM path's one-hot weights."""

    @staticmethod
    def forward(ctx, a, x, seg, B, whole):
        T, K = a.shape
        D = x.shape[1]
        ctx.B = B
        ctx.one = (whole or T <= POOL_ROWS) and _few_cols(B * K, D) and (
            T <= POOL_ROWS or x.dtype == a.dtype)
        ctx.dense = _few_cols(min(POOL_ROWS, T, B) * K, D)
        if ctx.one:  # the bags' own ids as ranks
            w = _one_hot_weights(a[None], seg[None], B)[0]  # [T, B·K]
            ctx.save_for_backward(a, x, seg, w)
            return (w.t() @ x.to(a.dtype)).view(B, K, D)
        ctx.save_for_backward(a, x, seg)
        if T <= POOL_ROWS:  # many bags, one slice
            return a.new_zeros(B, K, D).index_add_(0, seg, a[:, :, None] * x.to(a.dtype)[:, None])
        z = a.new_zeros(B, K, D, dtype=torch.float64)
        if not ctx.dense:
            for x_c, a_c, seg_c in zip(x.split(POOL_ROWS), a.split(POOL_ROWS),
                                       seg.split(POOL_ROWS), strict=True):
                prod = a_c[:, :, None] * x_c.to(a.dtype)[:, None, :]  # [S, K, D]
                local, bag, nb = _local_bags(seg_c[None], B)
                part = a.new_zeros(nb, K, D).index_add_(0, local[0], prod)  # [nb, K, D]
                z.index_add_(0, bag[0], part.double())
            return z.to(a.dtype)
        for start, n, S in _slice_groups(T, x.dtype == a.dtype):
            rows = slice(start, start + n * S)
            local, bag, nb = _local_bags(seg[rows].view(n, S), B)
            w = _one_hot_weights(a[rows].view(n, S, K), local, nb)  # [n, S, nb·K]
            part = torch.bmm(w.transpose(1, 2), x[rows].reshape(n, S, D).to(a.dtype))
            z.index_add_(0, bag.flatten(), part.view(n * nb, K, D).double())
        return z.to(a.dtype)

    @staticmethod
    def backward(ctx, dz):
        a, x, seg, *saved_w = ctx.saved_tensors  # (unpacked once: checkpoint allows no more)
        need_a, need_x = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # create_graph=True: the same sums, differentiable, whole
            dz_rows = dz[seg]  # [T, K, D]
            return ((dz_rows * x.to(dz.dtype)[:, None, :]).sum(-1) if need_a else None,
                    (a[:, :, None] * dz_rows).sum(1).to(x.dtype) if need_x else None,
                    None, None, None)
        T, K = a.shape
        D = x.shape[1]
        if ctx.one:
            w = saved_w[0]  # [T, B·K]
            dz2 = dz.reshape(ctx.B * K, D)
            dx = (w @ dz2).to(x.dtype) if need_x else None
            da = None
            if need_a:  # x_row · dz[bag, k] for every bag, each row's own picked
                cols = seg[:, None] * K + torch.arange(K, device=seg.device)  # [T, K]
                da = (x.to(dz.dtype) @ dz2.t()).gather(1, cols)
            return da, dx, None, None, None
        da = torch.empty_like(a) if need_a else None  # [T, K]
        dx = x.new_empty(x.shape) if need_x else None  # [T, D], filled slice by slice
        if not ctx.dense:
            for i, (x_c, a_c, seg_c) in enumerate(zip(x.split(POOL_ROWS), a.split(POOL_ROWS),
                                                      seg.split(POOL_ROWS), strict=True)):
                rows = slice(i * POOL_ROWS, i * POOL_ROWS + x_c.shape[0])
                dz_c = dz[seg_c]  # [S, K, D]
                if need_a:
                    torch.sum(dz_c * x_c.to(dz.dtype)[:, None, :], -1, out=da[rows])  # [S, K]
                if need_x:
                    dx[rows] = (a_c[:, :, None] * dz_c).sum(1)  # [S, D]
            return da, dx, None, None, None
        for start, n, S in _slice_groups(T, x.dtype == a.dtype):
            rows = slice(start, start + n * S)
            local, bag, nb = _local_bags(seg[rows].view(n, S), ctx.B)
            dz_s = dz[bag].view(n, nb * K, D)  # [n, nb·K, D]: the slices' bags
            w = _one_hot_weights(a[rows].view(n, S, K), local, nb)  # [n, S, nb·K]
            if need_x and x.dtype == dz.dtype:
                torch.bmm(w, dz_s, out=dx[rows].view(n, S, D))
            elif need_x:
                dx[rows] = torch.bmm(w, dz_s).view(n * S, D)
            if need_a:  # x_row · dz[bag, k] for every bag of the slice, each row's own picked
                g = torch.bmm(x[rows].reshape(n, S, D).to(dz.dtype), dz_s.transpose(1, 2))
                da[rows] = g.view(n, S, nb, K).gather(
                    2, local[:, :, None, None].expand(n, S, 1, K)).view(n * S, K)
        return da, dx, None, None, None


def _pool_packed(x, s, offsets):
    """x [T, D], s [T, K], offsets [B+1] -> z [B, K, D], a [T, K]."""
    T, K = s.shape
    B = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    # the offsets' values are read on the host where that is free: CPU offsets, not compiling
    host = B > 0 and offsets.device.type == "cpu" and not torch.compiler.is_compiling()
    if host and T > 0 and T % B == 0 and bool((lengths == T // B).all()):
        # bags of one length: a padded batch without padding, as views
        z, a = _pool_padded(x.view(B, T // B, x.shape[1]), s.view(B, T // B, K), None)
        return z, a.reshape(T, K)
    seg = segment_ids(lengths, T)  # [T]
    m = s.new_full((B, K), float("-inf")).scatter_reduce(
        0, seg[:, None].expand(T, K), s.detach(), "amax")  # [B, K]
    e = torch.exp(s - m[seg])  # [T, K]; every row belongs to a non-empty bag, so m is finite
    # the normaliser summed in float64: exact to float32 rounding for bags of any length
    l = torch.zeros(B, K, dtype=torch.float64, device=s.device).index_add(0, seg, e.double())
    a = (e / l[seg]).to(s.dtype)  # [T, K]
    # no bag longer than POOL_ROWS: the weighted sum needs no slices (elsewhere it slices by
    # the static shapes)
    whole = host and T > POOL_ROWS and int(lengths.max()) <= POOL_ROWS
    return _SegmentWeightedSum.apply(a, x, seg, B, whole), a


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
        if (mask is not None and device_type == "cpu" and not torch.compiler.is_compiling()
                and bool(mask.all())):
            mask = None  # no padding: no copy of x (a host read, free on the CPU only)
        if mask is not None:  # padding may hold anything (NaN, inf): keep it out of the math
            x = x.masked_fill(~mask[..., None], 0)
        args = (x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight, activation,
                dropout_p)
        if recompute and torch.is_grad_enabled():
            s = checkpoint(attention_scores, *args, use_reentrant=False)
        elif x.requires_grad and torch.is_grad_enabled():  # the pooling takes the alias of x
            s, x = attention_scores(*args, alias=True)
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
