r"""Fused Triton kernels for attention-MIL pooling, forward and backward.

Math (per bag ``h_1..h_N``, K branches; ``V = attn_weight [L, D]``, ``U = gate_weight [L, D]``,
``w = score_weight [K, L]``, ``act`` = tanh, relu or gelu)::

    p_n = V h_n + b_V,   q_n = U h_n + b_U,   t_n = act(p_n),   g_n = sigmoid(q_n)
    e_n = t_n ⊙ m_n ⊙ g_n ⊙ m'_n                        (plain attention: g_n = m'_n = 1)
    s_nk = w_k · e_n
    a_nk = exp(s_nk - lse_k),  lse_k = log Σ_n exp(s_nk)  over the bag's real instances
    z_k  = Σ_n a_nk h_n

``m_n``, ``m'_n`` are the attention-dropout masks, each element 0 or 1/(1-p) (all 1 without
dropout), drawn by Philox from a seed pair and the element's index (row·L + column): the
backward regenerates exactly the forward's masks, and no mask is ever stored.

Backward, with ``dz_k`` the gradient of z_k, ``gs_nk`` a direct gradient on the scores and
``glse_k`` one on lse (both non-zero only when the caller differentiates the returned attention
or scores)::

    ds_nk = a_nk ((h_n − z_k) · dz_k + glse_k) + gs_nk
    dE_n  = Σ_k ds_nk w_k
    dp_n  = dE_n ⊙ act'(p_n) ⊙ m_n ⊙ g_n ⊙ m'_n,   dq_n = dE_n ⊙ t_n ⊙ m_n ⊙ g_n (1 − g_n) ⊙ m'_n
    dh_n  = Σ_k a_nk dz_k + Vᵀ dp_n + Uᵀ dq_n
    dV = Σ_n dp_n h_nᵀ,  dU = Σ_n dq_n h_nᵀ,  db_V = Σ_n dp_n,  db_U = Σ_n dq_n,
    dw_k = Σ_n ds_nk e_n

``(h_n − z_k) · dz_k`` is the textbook ``h_n·dz_k − z_k·dz_k`` with the subtraction done first:
where a bag's attention is one-hot (a one-instance bag, say) ``h_n = z_k`` exactly, so ds and
every attention-weight gradient come out exactly zero, as in the eager formulation, instead of
rounding noise that Adam would turn into full-size steps.

The score bias b_w shifts every score of a branch by the same amount, which the softmax ignores:
it changes neither a nor z, so the kernels leave it out (its gradient through z is exactly 0).

Layout. Every input is seen as rows ``x [R, D]`` (packed rows, or a padded ``[B, N, D]`` viewed
as ``[B·N, D]``); bag b covers rows ``starts[b] .. starts[b] + lengths[b]``, and an optional
``row_mask [R]`` drops padded rows. Each bag is cut into chunks of ``CHUNK`` rows; one program
handles one chunk (flash-decoding style), so a single bag of 10⁶ instances spreads over the whole
GPU and a batch of tiny bags gets one program per bag. The chunk map lives in one int64 tensor
``meta = [starts (B) | lengths (B) | first_chunk (B) | num_chunks (B) | chunk_bag (C)]``
(``chunk_bag[c]`` is the bag of chunk c, B for an idle program). It is built on the host when
the bag lengths are there (CPU offsets, unmasked padding: free, one copy to the GPU) and on the
device otherwise (no host sync). All row reads are clamped to ``[0, R)``, so offsets that do not
describe x give wrong numbers, never an out-of-bounds access.

Kernels:

* ``_fwd_kernel``: per chunk, in two passes. Pass 1, over tiles of BLOCK_N rows: projections
  p, q as ``tl.dot`` tiles (L in BLOCK_L blocks, D in BLOCK_D blocks, fp32 accumulation),
  activation, dropout, gate and the scores in registers, and the chunk's running max m and sum
  l of ``exp(s - m)`` (masked rows excluded); it writes the raw scores s [R, K] (−inf at masked
  rows) and optionally p and q (``SAVE_PQ``, for a backward without the projection GEMM;
  stored, like the cuBLAS GEMM's, without their biases, which the kernels add in fp32).
  Pass 2, per D block of BLOCK_D columns: ``acc = Σ exp(s - m) h`` over the chunk's rows, s read
  back, accumulated in registers (a streaming loop, no rescaling: m is final): by ``tl.dot``
  (or, for K = 1 with ``LOAD_PQ`` and ``DOT_WEIGHTED_SUM = False``, by FMA into a
  ``[BLOCK_N, BLOCK_D]`` fp32 tile).
  Writes per-chunk (m, l, acc). With ``LOAD_PQ`` it reads p and q from one cuBLAS GEMM made
  before the launch instead of projecting (``CUBLAS_PROJECTION``, the default: faster on an
  H100 than the fused projection's tl.dot tiles); x is then read once, in pass 2. With
  ``SINGLE`` (every bag fits one chunk, known on the host) a program owns a whole bag and writes
  z = acc / l and lse itself: no merge launch.
* ``_merge_kernel``: per bag and D block, merges its chunks' states in chunk order
  (deterministic): ``z = Σ_c e^{m_c - M} acc_c / Σ_c e^{m_c - M} l_c``, ``lse = M + log l``.
  Empty bags give z = 0.
* ``_bwd_kernel``: per chunk, forms ds; recomputes p and q (or reads them back), regenerates
  the dropout masks and writes what autograd asks for: ``dh0 = Σ_k a_nk dz_k`` and
  ``dpq = [dp, dq]`` rows (``NEED_DX`` / ``NEED_DPQ``) and per-chunk fp32 partials of dw and
  d[b_V; b_U] (``NEED_DW`` / ``NEED_DB``). The launcher finishes with
  ``dx = dh0 + dpq @ [V; U]``, ``d[V; U] = dpqᵀ @ x`` and one ordered sum of the partials:
  every reduction has a fixed order, so gradients are bit-identical run to run.

Triton's interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors: tanh is written
as ``2·sigmoid(2x) − 1`` because the interpreter has no libdevice.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["attention_pool_fwd", "attention_pool_bwd", "chunk_size", "meta_length",
           "ACTIVATION_CODES", "POISON"]

# Tests set this to True: every output buffer is then filled with NaN before a launch, so an
# element a kernel forgets to write fails the comparison instead of passing by luck.
POISON = False

ACTIVATION_CODES = {"tanh": 0, "relu": 1, "gelu": 2}


def _empty(shape, *, dtype, device):
    if POISON:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

@triton.jit
def _activation(b_p, ACT: tl.constexpr):
    """act(p) and act'(p), elementwise fp32: tanh (0), relu (1) or exact-erf gelu (2)."""
    if ACT == 0:
        b_t = 2.0 * tl.sigmoid(2.0 * b_p) - 1.0  # tanh without libdevice (interpreter)
        b_dt = 1.0 - b_t * b_t
    elif ACT == 1:
        b_t = tl.maximum(b_p, 0.0)
        b_dt = tl.where(b_p > 0.0, 1.0, 0.0)
    else:
        b_cdf = 0.5 + 0.5 * tl.erf(b_p * 0.7071067811865476)  # Φ(p)
        b_t = b_p * b_cdf
        b_dt = b_cdf + b_p * tl.exp(-0.5 * b_p * b_p) * 0.3989422804014327  # Φ(p) + p φ(p)
    return b_t, b_dt


@triton.jit
def _project(x_ptr, v_ptr, u_ptr, o_row, m_row, l0, D, L, stride_x,
             GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    """V h and U h, without the biases (``_add_bias``), for rows o_row and attention columns
    l0 .. l0+BLOCK_L: two [BLOCK_N, BLOCK_L] fp32 tiles (q = 0 for plain attention)."""
    o_l = l0 + tl.arange(0, BLOCK_L)  # [BLOCK_L]
    m_l = o_l < L
    b_p = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    b_q = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        m_d = o_d < D
        p_x = x_ptr + o_row[:, None] * stride_x + o_d[None, :]
        b_x = tl.load(p_x, mask=m_row[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        o_w = o_l[None, :].to(tl.int64) * D + o_d[:, None]  # [BLOCK_D, BLOCK_L]: Vᵀ block
        m_w = m_l[None, :] & m_d[:, None]
        b_v = tl.load(v_ptr + o_w, mask=m_w, other=0.0)
        b_p = tl.dot(b_x, b_v, b_p, input_precision=PRECISION)
        if GATED:
            b_u = tl.load(u_ptr + o_w, mask=m_w, other=0.0)
            b_q = tl.dot(b_x, b_u, b_q, input_precision=PRECISION)
    return b_p, b_q


@triton.jit
def _add_bias(b_p, b_q, bv_ptr, bu_ptr, l0, L, HAS_BV: tl.constexpr, HAS_BU: tl.constexpr,
              BLOCK_L: tl.constexpr):
    """p = V h + b_V and q = U h + b_U, in fp32, from the bias-free tiles that ``_project``
    makes or that ``_load_pq`` reads (p and q are stored and saved without their biases)."""
    o_l = l0 + tl.arange(0, BLOCK_L)  # [BLOCK_L]
    m_l = o_l < L
    if HAS_BV:
        b_p += tl.load(bv_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)[None, :]
    if HAS_BU:
        b_q += tl.load(bu_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)[None, :]
    return b_p, b_q


@triton.jit
def _keep(seed, o_row, o_l, L, p_drop):
    """Dropout factor per element: 1/(1-p) with probability 1-p, else 0. [BLOCK_N, BLOCK_L]"""
    b_r = tl.rand(seed, o_row[:, None] * L + o_l[None, :])  # o_row is int64: no overflow
    return tl.where(b_r >= p_drop, 1.0 / (1.0 - p_drop), 0.0)


@triton.jit
def _hidden(b_p, b_q, seed_ptr, p_drop, o_row, l0, L,
            ACT: tl.constexpr, GATED: tl.constexpr, DROPOUT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    """e = act(p) ⊙ m ⊙ sigmoid(q) ⊙ m' and its partial derivatives de/dp, de/dq.
    Returns three [BLOCK_N, BLOCK_L] fp32 tiles (the forward uses only e; the compiler drops
    the rest)."""
    b_t, b_dt = _activation(b_p, ACT)
    if GATED:
        b_sig = tl.sigmoid(b_q)
        b_g = b_sig
    else:
        b_sig = tl.zeros([BLOCK_N, BLOCK_L], dtype=tl.float32)
        b_g = tl.full([BLOCK_N, BLOCK_L], 1.0, dtype=tl.float32)
    if DROPOUT:
        o_l = l0 + tl.arange(0, BLOCK_L)
        b_g = b_g * _keep(tl.load(seed_ptr), o_row, o_l, L, p_drop)
        if GATED:
            b_g = b_g * _keep(tl.load(seed_ptr + 1), o_row, o_l, L, p_drop)
    # b_g now holds m ⊙ g ⊙ m' (the gate with both dropout factors folded in)
    return b_t * b_g, b_dt * b_g, b_t * b_g * (1.0 - b_sig)


@triton.jit
def _load_pq(pq_ptr, o_row, m_row, l0, L, GATED: tl.constexpr, BLOCK_L: tl.constexpr):
    """V h and U h (no biases) saved by the forward (``SAVE_PQ``) or made by cuBLAS
    (``project``), as fp32 [BLOCK_N, BLOCK_L] tiles."""
    GL = 2 * L if GATED else L
    o_l = l0 + tl.arange(0, BLOCK_L)
    m = m_row[:, None] & (o_l < L)[None, :]
    p_pq = pq_ptr + o_row[:, None] * GL + o_l[None, :]
    b_p = tl.load(p_pq, mask=m, other=0.0).to(tl.float32)
    b_q = b_p * 0.0
    if GATED:
        b_q = tl.load(p_pq + L, mask=m, other=0.0).to(tl.float32)
    return b_p, b_q


@triton.jit
def _load_w_t(w_ptr, l0, K, L, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """wᵀ block [BLOCK_L, BLOCK_K] fp32 (zero outside K and L)."""
    o_l = l0 + tl.arange(0, BLOCK_L)
    o_k = tl.arange(0, BLOCK_K)
    m = (o_l[:, None] < L) & (o_k[None, :] < K)
    return tl.load(w_ptr + o_k[None, :] * L + o_l[:, None], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _chunk_rows(meta_ptr, B, R, CHUNK):
    """This program's chunk c, whether it is live (idle programs have chunk_bag = B), its bag b
    and its rows [row_lo, row_hi), clamped to [0, R) (empty for idle programs)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.load(meta_ptr + 4 * B + i_c)
    live = (i_b >= 0) & (i_b < B)
    i_b = tl.minimum(tl.maximum(i_b, 0), B - 1)
    start = tl.load(meta_ptr + i_b)
    length = tl.load(meta_ptr + B + i_b)
    row_lo = start + (i_c - tl.load(meta_ptr + 2 * B + i_b)) * CHUNK
    row_hi = tl.minimum(start + length, row_lo + CHUNK)
    row_lo = tl.maximum(row_lo, 0)
    row_hi = tl.where(live, tl.minimum(row_hi, R), row_lo)
    return i_c, live, i_b, row_lo, row_hi


@triton.jit
def _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows of the tile starting at n0: (o_row [BLOCK_N] int64, m_row: inside the chunk,
    m_real: inside the chunk and not masked out)."""
    o_row = n0 + tl.arange(0, BLOCK_N)
    m_row = o_row < row_hi
    m_real = m_row
    if HAS_MASK:
        m_real = m_row & (tl.load(row_mask_ptr + o_row, mask=m_row, other=0) != 0)
    return o_row, m_row, m_real


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["B", "R", "CHUNK", "p_drop"])
def _fwd_kernel(
    x_ptr, row_mask_ptr, meta_ptr, v_ptr, u_ptr, bv_ptr, bu_ptr, w_ptr, seed_ptr,
    s_ptr, pq_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, lse_ptr,
    B, R, D, L, CHUNK, stride_x, p_drop,
    K: tl.constexpr, HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BV: tl.constexpr,
    HAS_BU: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, SAVE_PQ: tl.constexpr,
    LOAD_PQ: tl.constexpr, SINGLE: tl.constexpr, DOT_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, live, i_b, row_lo, row_hi = _chunk_rows(meta_ptr, B, R, CHUNK)
    GL = 2 * L if GATED else L  # row stride of pq

    o_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_k = o_k < K
    # pass 1: the scores of the chunk's rows (stored), their running max m and sum l of exp(s - m)
    b_m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
        # scores [BLOCK_N, BLOCK_K], one attention block of BLOCK_L columns at a time
        b_s = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            if LOAD_PQ:  # V h, U h from a GEMM before the launch (cuBLAS projection)
                b_p, b_q = _load_pq(pq_ptr, o_row, m_real, l0, L, GATED, BLOCK_L)
            else:
                b_p, b_q = _project(x_ptr, v_ptr, u_ptr, o_row, m_real, l0, D, L, stride_x,
                                    GATED, BLOCK_N, BLOCK_D, BLOCK_L, PRECISION)
            if SAVE_PQ and not LOAD_PQ:
                o_l = l0 + tl.arange(0, BLOCK_L)
                m_pq = m_row[:, None] & (o_l < L)[None, :]
                p_pq = pq_ptr + o_row[:, None] * GL + o_l[None, :]
                tl.store(p_pq, b_p.to(pq_ptr.dtype.element_ty), mask=m_pq)
                if GATED:
                    tl.store(p_pq + L, b_q.to(pq_ptr.dtype.element_ty), mask=m_pq)
            b_p, b_q = _add_bias(b_p, b_q, bv_ptr, bu_ptr, l0, L, HAS_BV, HAS_BU, BLOCK_L)
            b_e, _, _ = _hidden(b_p, b_q, seed_ptr, p_drop, o_row, l0, L, ACT, GATED, DROPOUT,
                                BLOCK_N, BLOCK_L)
            b_wt = _load_w_t(w_ptr, l0, K, L, BLOCK_L, BLOCK_K)  # [BLOCK_L, BLOCK_K]
            b_s = tl.dot(b_e, b_wt, b_s, input_precision="ieee")
        b_s = tl.where(m_real[:, None], b_s, float("-inf"))
        tl.store(s_ptr + o_row[:, None] * K + o_k[None, :], b_s, mask=m_row[:, None] & m_k[None, :])
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))  # [BLOCK_K]
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_l = b_l * tl.exp(b_m - b_m_safe) + tl.sum(tl.exp(b_s - b_m_safe[None, :]), axis=0)
        b_m = b_m_new
    # the scores stored above are read back below, by threads of other layouts
    tl.debug_barrier()

    # pass 2: acc = Σ exp(s - m) h with the chunk's final m, one D block at a time, accumulated
    # in registers over the chunk's rows (a streaming loop); with SINGLE (the program owns bag
    # i_b) normalised by l and written straight into z (part_acc is z). DOT_SUM: by tl.dot of
    # [BLOCK_K, BLOCK_N] @ [BLOCK_N, BLOCK_D] (a rounded to x's dtype); else (K == 1) by FMA
    # into a [BLOCK_N, BLOCK_D] fp32 register tile reduced once per D block: x goes from global
    # memory to registers, without the mma's trip through shared memory for one real row of 16.
    b_m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)  # [BLOCK_K]
    b_m1 = tl.sum(tl.where(o_k == 0, b_m_safe, 0.0), axis=0)  # branch 0's (K == 1: the) max
    b_has = b_l > 0
    b_scale = tl.full([BLOCK_K], 1.0, dtype=tl.float32)
    if SINGLE:  # an empty bag gets z = 0, lse = 0
        b_scale = tl.where(b_has, 1.0 / tl.where(b_has, b_l, 1.0), 0.0)
    p_acc = part_acc_ptr + (i_b if SINGLE else i_c) * K * D
    m_kl = o_k < tl.where(live, K, 0)  # [BLOCK_K]: idle programs write nothing
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        m_d = o_d < D
        if DOT_SUM:
            b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
            for n0 in range(row_lo, row_hi, BLOCK_N):
                o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
                b_s = tl.load(s_ptr + o_row[:, None] * K + o_k[None, :],
                              mask=m_row[:, None] & m_k[None, :], other=float("-inf"))
                b_a = tl.exp(b_s - b_m_safe[None, :])  # [BLOCK_N, BLOCK_K]; 0 at masked rows
                p_x = x_ptr + o_row[:, None] * stride_x + o_d[None, :]
                b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0)
                b_acc = tl.dot(tl.trans(b_a).to(b_x.dtype), b_x, b_acc, input_precision=PRECISION)
        else:
            b_acc_n = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for n0 in range(row_lo, row_hi, BLOCK_N):
                o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
                b_s1 = tl.load(s_ptr + o_row, mask=m_row, other=float("-inf"))  # [BLOCK_N]
                b_a1 = tl.exp(b_s1 - b_m1)  # [BLOCK_N]; 0 at masked rows
                p_x = x_ptr + o_row[:, None] * stride_x + o_d[None, :]
                b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0)
                b_acc_n += b_a1[:, None] * b_x.to(tl.float32)  # [BLOCK_N, BLOCK_D]
            b_acc = tl.where(o_k[:, None] == 0, tl.sum(b_acc_n, axis=0)[None, :], 0.0)
        o_a = o_k[:, None] * D + o_d[None, :]  # [BLOCK_K, BLOCK_D]
        tl.store(p_acc + o_a, b_acc * b_scale[:, None], mask=m_kl[:, None] & m_d[None, :])
    if SINGLE:
        b_lse = tl.where(b_has, b_m + tl.log(tl.where(b_has, b_l, 1.0)), 0.0)
        tl.store(lse_ptr + i_b * K + o_k, b_lse, mask=m_kl)
    else:
        tl.store(part_m_ptr + i_c * K + o_k, b_m, mask=m_k)
        tl.store(part_l_ptr + i_c * K + o_k, b_l, mask=m_k)


@triton.jit(do_not_specialize=["B", "C"])
def _merge_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, meta_ptr, z_ptr, lse_ptr,
    B, C, D,
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    c0 = tl.minimum(tl.maximum(tl.load(meta_ptr + 2 * B + i_b), 0), C)
    c1 = tl.minimum(tl.maximum(c0 + tl.load(meta_ptr + 3 * B + i_b), c0), C)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_d = o_d < D
    for k in tl.static_range(K):
        # the bag's chunks BLOCK_C at a time: a few wide loads instead of one per chunk
        b_max = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
        for cb in range(c0, c1, BLOCK_C):
            o_c = cb + tl.arange(0, BLOCK_C)  # [BLOCK_C]
            b_max = tl.maximum(b_max, tl.load(part_m_ptr + o_c.to(tl.int64) * K + k,
                                              mask=o_c < c1, other=float("-inf")))
        b_top = tl.max(b_max, axis=0)
        b_top = tl.where(b_top == float("-inf"), 0.0, b_top)
        b_l = tl.zeros([BLOCK_C], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
        for cb in range(c0, c1, BLOCK_C):
            o_c = cb + tl.arange(0, BLOCK_C)  # [BLOCK_C]
            m_c = o_c < c1
            o_ck = o_c.to(tl.int64) * K + k
            b_scale = tl.exp(tl.load(part_m_ptr + o_ck, mask=m_c, other=float("-inf")) - b_top)
            b_l += b_scale * tl.load(part_l_ptr + o_ck, mask=m_c, other=0.0)
            p_acc = part_acc_ptr + o_ck[:, None] * D + o_d[None, :]  # [BLOCK_C, BLOCK_D]
            b_part = tl.load(p_acc, mask=m_c[:, None] & m_d[None, :], other=0.0)
            b_acc += b_scale[:, None] * b_part
        b_lsum = tl.sum(b_l, axis=0)
        b_has = b_lsum > 0
        b_z = tl.sum(b_acc, axis=0) / tl.where(b_has, b_lsum, 1.0)  # [BLOCK_D]
        tl.store(z_ptr + (i_b * K + k) * D + o_d, tl.where(b_has, b_z, 0.0), mask=m_d)
        if i_d == 0:  # only the first D block writes lse
            tl.store(lse_ptr + i_b * K + k,
                     tl.where(b_has, b_top + tl.log(tl.where(b_has, b_lsum, 1.0)), 0.0))


@triton.jit(do_not_specialize=["B", "R", "CHUNK", "p_drop"])
def _bwd_kernel(
    x_ptr, row_mask_ptr, meta_ptr, v_ptr, u_ptr, bv_ptr, bu_ptr, w_ptr, seed_ptr, pq_ptr,
    s_ptr, lse_ptr, z_ptr, dz_ptr, glse_ptr, gs_ptr,
    dh0_ptr, dpq_ptr, part_ptr,
    B, R, D, L, CHUNK, stride_x, p_drop,
    K: tl.constexpr, HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BV: tl.constexpr,
    HAS_BU: tl.constexpr, ACT: tl.constexpr, DROPOUT: tl.constexpr, SAVED_PQ: tl.constexpr,
    HAS_GLSE: tl.constexpr, HAS_GS: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DPQ: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, live, i_b, row_lo, row_hi = _chunk_rows(meta_ptr, B, R, CHUNK)
    GL = 2 * L if GATED else L  # row stride of dpq and pq
    PW = K * L + GL  # partial row: [dw (K·L) | d[b_V; b_U] (GL)]
    p_part = part_ptr + i_c * PW
    if NEED_DW or NEED_DB:  # every program (idle ones too) starts its partial row at zero
        for j0 in range(0, PW, BLOCK_L):
            o_j = j0 + tl.arange(0, BLOCK_L)
            tl.store(p_part + o_j, tl.zeros([BLOCK_L], dtype=tl.float32), mask=o_j < PW)
        tl.debug_barrier()  # the zeros are read back below by threads of other layouts

    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
    b_glse = tl.zeros([BLOCK_K], dtype=tl.float32)
    if HAS_GLSE:
        b_glse = tl.load(glse_ptr + i_b * K + o_k, mask=m_k, other=0.0)
    p_dz = dz_ptr + i_b * K * D
    p_z = z_ptr + i_b * K * D
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
        m_nk = m_real[:, None] & m_k[None, :]
        b_s = tl.load(s_ptr + o_row[:, None] * K + o_k[None, :], mask=m_nk, other=float("-inf"))
        b_a = tl.exp(b_s - b_lse[None, :])  # [BLOCK_N, BLOCK_K]; 0 at masked rows

        # (h_n − z_k) · dz_k in fp32 on CUDA cores, and dh0 = Σ_k a_nk dz_k
        b_hdz = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            p_x = x_ptr + o_row[:, None] * stride_x + o_d[None, :]
            b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_dh0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for k in tl.static_range(K):
                b_dzk = tl.load(p_dz + k * D + o_d, mask=m_d, other=0.0)  # [BLOCK_D] fp32
                b_zk = tl.load(p_z + k * D + o_d, mask=m_d, other=0.0)  # [BLOCK_D] fp32
                b_col = tl.sum((b_x - b_zk[None, :]) * b_dzk[None, :], axis=1)  # [BLOCK_N]
                b_hdz += tl.where(o_k[None, :] == k, b_col[:, None], 0.0)
                if NEED_DX:
                    b_ak = tl.sum(tl.where(o_k[None, :] == k, b_a, 0.0), axis=1)  # [BLOCK_N]
                    b_dh0 += b_ak[:, None] * b_dzk[None, :]
            if NEED_DX:
                p_dh0 = dh0_ptr + o_row[:, None] * D + o_d[None, :]
                tl.store(p_dh0, b_dh0.to(dh0_ptr.dtype.element_ty),
                         mask=m_row[:, None] & m_d[None, :])
        b_ds = b_a * (b_hdz + b_glse[None, :])  # [BLOCK_N, BLOCK_K]
        if HAS_GS:
            b_ds += tl.load(gs_ptr + o_row[:, None] * K + o_k[None, :], mask=m_nk, other=0.0)
        b_ds = tl.where(m_nk, b_ds, 0.0)

        if NEED_DW or NEED_DPQ:
            for l0 in range(0, L, BLOCK_L):
                if SAVED_PQ:
                    b_p, b_q = _load_pq(pq_ptr, o_row, m_real, l0, L, GATED, BLOCK_L)
                else:
                    b_p, b_q = _project(x_ptr, v_ptr, u_ptr, o_row, m_real, l0, D, L,
                                        stride_x, GATED, BLOCK_N, BLOCK_D, BLOCK_L, PRECISION)
                b_p, b_q = _add_bias(b_p, b_q, bv_ptr, bu_ptr, l0, L, HAS_BV, HAS_BU, BLOCK_L)
                b_e, b_dedp, b_dedq = _hidden(b_p, b_q, seed_ptr, p_drop, o_row, l0, L, ACT,
                                              GATED, DROPOUT, BLOCK_N, BLOCK_L)
                b_wt = _load_w_t(w_ptr, l0, K, L, BLOCK_L, BLOCK_K)  # [BLOCK_L, BLOCK_K]
                o_l = l0 + tl.arange(0, BLOCK_L)
                m_l = o_l < L
                if NEED_DW:  # dw_k partial: Σ_n ds_nk e_n, accumulated in this chunk's row
                    p_dw = p_part + o_k[:, None] * L + o_l[None, :]
                    m_dw = m_k[:, None] & m_l[None, :]
                    b_dw = tl.load(p_dw, mask=m_dw, other=0.0)
                    b_dw = tl.dot(tl.trans(b_ds), b_e, b_dw, input_precision="ieee")
                    tl.store(p_dw, b_dw, mask=m_dw)
                if NEED_DPQ:
                    b_de = tl.dot(b_ds, tl.trans(b_wt), input_precision="ieee")  # [BLOCK_N, BLOCK_L]
                    b_dp = b_de * b_dedp
                    m_out = m_row[:, None] & m_l[None, :]
                    p_dpq = dpq_ptr + o_row[:, None] * GL + o_l[None, :]
                    tl.store(p_dpq, b_dp.to(dpq_ptr.dtype.element_ty), mask=m_out)
                    if NEED_DB:
                        p_db = p_part + K * L + o_l
                        tl.store(p_db, tl.load(p_db, mask=m_l, other=0.0) + tl.sum(b_dp, axis=0),
                                 mask=m_l)
                    if GATED:
                        b_dq = b_de * b_dedq
                        tl.store(p_dpq + L, b_dq.to(dpq_ptr.dtype.element_ty), mask=m_out)
                        if NEED_DB:
                            p_db = p_part + K * L + L + o_l
                            tl.store(p_db, tl.load(p_db, mask=m_l, other=0.0)
                                     + tl.sum(b_dq, axis=0), mask=m_l)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Host-side integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are
# constexpr functions that cost about a microsecond and a half per call on the host, and a small
# launch-bound call (MNIST-bags) makes a dozen such calls.
def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


# Tiles (BLOCK_N, BLOCK_D, BLOCK_L, num_warps, num_stages) of the compiled GPU kernels, per
# kernel and dtype class. The defaults are spill-free on sm_90 with software-pipelined
# projection loops (asynchronous copies, wgmma kept in flight) for every dtype, gating, mask and
# K, as tests/test_kernel_compile.py checks by compiling them ahead of time exactly as the JIT
# does (no GPU needed), on Triton 3.6 and 3.9; timed on a GPU only where MEASURED_TILES says
# so (its comments). A measured table overrides them per class of calls, keyed by ``tile_key``
# — (kind, dtype class, gated, D class, L, K), never bag lengths: MEASURED_TILES (pasted here
# from a tile sweep on a GPU, benchmarks/), and above it the table of the JSON file named by the
# environment variable FASTMIL_TILES (a tile sweep's tile_sweep.json: a sweep on your own GPU
# applies without editing fastmil).
# TILE_OVERRIDE (kind -> tile) overrides everything, for the sweep itself. TILE_CANDIDATES are
# the tiles a sweep may pick: tests run each in the interpreter and compile each for sm_90.
# Kinds: "fwd" (the forward with its fused projection), "fwd_pq" (the forward reading p and q
# from a cuBLAS GEMM, CUBLAS_PROJECTION: no projection loop; BLOCK_D is then the width of the
# weighted sum's x tiles), "bwd" (the backward projecting again inside, recompute=True with the
# fused projection) and "bwd_pq" (the backward reading p and q, saved or from cuBLAS: BLOCK_D is
# the width of the (h - z)·dz loop's x tiles).
GPU_TILES = {
    ("fwd", "16-bit"): (64, 32, 64, 8, 3),
    ("fwd", "fp32"): (64, 32, 32, 8, 3),
    ("fwd_pq", "16-bit"): (64, 32, 64, 4, 3),
    ("fwd_pq", "fp32"): (64, 32, 64, 4, 3),
    ("bwd", "16-bit"): (64, 32, 16, 8, 3),
    ("bwd", "fp32"): (64, 32, 16, 8, 3),
    ("bwd_pq", "16-bit"): (16, 256, 64, 4, 3),
    ("bwd_pq", "fp32"): (64, 32, 16, 8, 3),
}
TILE_CANDIDATES = {
    "fwd": [(64, 32, 64, 8, 3), (64, 32, 32, 8, 3), (64, 64, 64, 8, 3), (128, 32, 64, 8, 3),
            (64, 32, 128, 8, 3), (64, 16, 64, 8, 3)],
    "fwd_pq": [(64, 32, 64, 4, 3), (64, 64, 64, 4, 3), (128, 32, 64, 8, 3), (128, 32, 64, 4, 3),
               (32, 64, 64, 4, 2), (64, 256, 64, 8, 3)],
    "bwd": [(64, 32, 16, 8, 3), (64, 32, 32, 4, 2), (32, 32, 64, 4, 3)],
    "bwd_pq": [(64, 32, 16, 8, 3), (32, 64, 64, 8, 3), (64, 64, 64, 8, 3), (32, 128, 64, 8, 3),
               (32, 256, 64, 8, 3), (16, 256, 64, 4, 3)],
}
# Measured on an NVIDIA H100 80GB HBM3 (torch 2.11, Triton 3.6; benchmarks/tile_sweep.py in the
# GPU check of 2026-11-26, fastmil 75bf919), with each entry's speed-up over the default then;
# where the fastest tile spills registers in a variant on Triton 3.9 (tests/aot_compile.py), the
# fastest that does not (fwd d1024: 6% slower than (128, 32, 64, 8, 3)).
MEASURED_TILES: dict = {
    # (kind, dtype class, gated, D class, L, K): (BLOCK_N, BLOCK_D, BLOCK_L, num_warps, stages)
    ("fwd", "16-bit", True, 1024, 256, 1): (64, 64, 64, 8, 3),  # wsi-d1024-l256-bf16 1.22x
    ("fwd", "16-bit", True, 2048, 256, 1): (64, 64, 64, 8, 3),  # wsi-d1536-l256-bf16 1.18x
    ("fwd", "16-bit", True, 1024, 256, 4): (64, 64, 64, 8, 3),  # clam-mb-d1024-l256-k4 1.19x
    ("fwd", "16-bit", False, 1024, 256, 1): (64, 32, 128, 8, 3),  # plain-d1024-l256-bf16 1.28x
    ("bwd", "16-bit", True, 1024, 256, 1): (32, 32, 64, 4, 3),  # wsi-d1024-l256-bf16 1.91x
    ("bwd", "fp32", True, 512, 128, 1): (32, 32, 64, 4, 3),  # mnist-d500-l128-fp32 3.68x
    ("bwd", "16-bit", True, 2048, 256, 1): (32, 32, 64, 4, 3),  # wsi-d1536-l256-bf16 1.94x
    ("bwd", "16-bit", True, 1024, 256, 4): (32, 32, 64, 4, 3),  # clam-mb-d1024-l256-k4 2.84x
    ("bwd", "16-bit", False, 1024, 256, 1): (32, 32, 64, 4, 3),  # plain-d1024-l256-bf16 1.99x
    # the third GPU check of that day (fastmil 7c9ce98, the two-pass forward; fwd_pq and bwd_pq
    # swept): speed-ups over the defaults then, fwd_pq (64, 32, 64, 4, 3) and bwd_pq
    # (64, 32, 16, 8, 3). The 16-bit bwd_pq default is now the tile that won 2 of the 3 16-bit
    # classes (and beat the old default in all 4 classes swept). Winners that spill in some
    # variant stay out: fwd_pq (64, 64, 64, 4, 3) as a default (K=4, no gate), bwd_pq
    # (16, 256, 64, 4, 3) as the fp32 default (K=4), and fwd_pq (32, 64, 64, 4, 2) on Triton 3.6
    # (mnist: 1.80x, 8 B of stack; the entry below is the fastest tile that does not spill).
    ("fwd_pq", "16-bit", True, 1024, 256, 1): (64, 64, 64, 4, 3),  # wsi-d1024-l256-bf16 1.27x
    ("bwd_pq", "16-bit", True, 1024, 256, 1): (16, 256, 64, 4, 3),  # wsi-d1024-l256-bf16 1.52x*
    ("fwd_pq", "fp32", True, 512, 128, 1): (64, 64, 64, 4, 3),  # mnist-d500-l128-fp32 1.22x
    ("bwd_pq", "fp32", True, 512, 128, 1): (16, 256, 64, 4, 3),  # mnist-d500-l128-fp32 3.94x
    ("fwd_pq", "16-bit", True, 2048, 256, 1): (64, 64, 64, 4, 3),  # wsi-d1536-l256-bf16 1.37x
    ("bwd_pq", "16-bit", True, 2048, 256, 1): (16, 256, 64, 4, 3),  # wsi-d1536-l256-bf16 2.43x
    ("fwd_pq", "16-bit", True, 1024, 256, 4): (64, 32, 64, 4, 3),  # clam-mb-d1024-l256-k4 1.00x
    ("bwd_pq", "16-bit", True, 1024, 256, 4): (64, 64, 64, 8, 3),  # clam-mb-d1024-l256-k4 1.55x
    # * measured in the second check (0.347 -> 0.267 ms on B=1, N=100k; 0.926 -> 0.708 ms on 8
    # packed slides); the third ran with it already in this table
}
TILE_OVERRIDE: dict = {}
INTERPRETER_TILES = {"fwd": (32, 64, 128, 4, 1), "fwd_pq": (32, 64, 128, 4, 1),
                     "bwd": (32, 64, 128, 4, 1), "bwd_pq": (32, 64, 128, 4, 1)}
TILES_ENV = "FASTMIL_TILES"


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16-bit"


def tile_key(kind: str, dtype: torch.dtype, D: int, L: int, K: int, gated: bool) -> tuple:
    """The key of a class of calls in a measured tile table: (kind, dtype class, gated,
    D class, L, K), the D class being D rounded up to a power of two (500 → 512, 1536 → 2048)."""
    return (kind, dtype_class(dtype), bool(gated), _pow2(D), int(L), int(K))


def load_tiles(path: str) -> dict:
    """The measured tile table of a tile sweep's JSON file (its ``"measured_tiles"`` list of
    ``{"key": [...], "tile": [...]}``), as ``{tile_key: tile}``. Raises ValueError naming the
    file and the entry when the file is not such a table."""
    import json

    try:
        with open(path) as fh:
            entries = json.load(fh)["measured_tiles"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{TILES_ENV}={path!r}: expected a tile sweep's JSON file with a "
                         f"'measured_tiles' list (benchmarks/tile_sweep.sh writes one); "
                         f"could not read it: {type(e).__name__}: {e}") from None
    table = {}
    for i, entry in enumerate(entries):
        try:
            kind, cls, gated, dcls, L, K = entry["key"]
            tile = tuple(int(v) for v in entry["tile"])
            ok = (kind in TILE_CANDIDATES and cls in ("16-bit", "fp32") and len(tile) == 5
                  and all(v > 0 for v in tile)
                  and all(v == _pow2(v, 1) for v in tile[:4]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            kinds = "|".join(repr(k) for k in TILE_CANDIDATES)
            raise ValueError(f"{TILES_ENV}={path!r}: entry {i} of 'measured_tiles' is {entry!r}; "
                             f"expected {{'key': [kind ({kinds}), dtype class ('16-bit'|'fp32'), "
                             "gated, D class, L, K], 'tile': [BLOCK_N, BLOCK_D, BLOCK_L, "
                             "num_warps (powers of two), num_stages]}")
        table[(kind, cls, bool(gated), int(dcls), int(L), int(K))] = tile
    return table


_FILE_TILES: dict = {}  # path -> table, read once per process


def _file_tiles() -> dict:
    import os

    path = os.environ.get(TILES_ENV)
    if not path:
        return {}
    if path not in _FILE_TILES:
        _FILE_TILES[path] = load_tiles(path)
    return _FILE_TILES[path]


def gpu_tiles(kind: str, dtype: torch.dtype, D: int, L: int, K: int, gated: bool) -> tuple:
    """The GPU tile of a kernel ("fwd", "fwd_pq", "bwd" or "bwd_pq") for a class of calls (never
    for bag lengths): TILE_OVERRIDE, else the FASTMIL_TILES file's table, else MEASURED_TILES,
    else the default."""
    if kind in TILE_OVERRIDE:
        return TILE_OVERRIDE[kind]
    key = tile_key(kind, dtype, D, L, K, gated)
    for table in (_file_tiles(), MEASURED_TILES):
        if key in table:
            return table[key]
    return GPU_TILES[(kind, dtype_class(dtype))]


# Where the forward's projections p, q come from: True (the default), one cuBLAS GEMM before the
# launch, ``project``, whose [R, GL] result the kernels read (kept for the backward unless
# recompute=True, else made again there); False, inside the fused kernel (tl.dot tiles, nothing
# stored). The GEMM writes and reads R·GL values more and needs them in memory at once, but runs
# at library speed: on an H100 (2026-11-26, Triton 3.6) the fused projection's tl.dot tiles ran
# at a fifth of cuBLAS's rate (fp32 MNIST-bags: a thirtieth), and the cuBLAS design was the
# faster in every target workload (benchmarks/RESULTS.md, "fastmil triton, cuBLAS projection").
CUBLAS_PROJECTION = True


def _stacked(v, u):
    """[V; U] [GL, D] (V alone for plain attention)."""
    return torch.cat([v, u]) if u is not None else v


def project(x, v, u):
    """[V h | U h] for every row, without the biases (the kernels add them in fp32), in x's
    dtype: [R, GL], one GEMM (cuBLAS on CUDA)."""
    return x @ _stacked(v, u).t()


# How the forward that reads p and q (the cuBLAS projection) sums Σ exp(s - m) h in its pass 2
# for one branch (K = 1): True (the default), by tl.dot, as for K > 1 and in the fused-projection
# forward; False, by FMA into a [BLOCK_N, BLOCK_D] fp32 register tile reduced once per D block
# (x from global memory to registers, the attention kept in fp32). On the third H100 check
# (2026-11-26) the tl.dot sum ran at 34% of HBM bandwidth, bound by L1/shared memory (Nsight
# Compute: its mma has one real row of 16 and stages every x tile through shared memory).
# The FMA sum has not run on a GPU yet; the benchmark column
# "fastmil_triton_cublas_fma" times it beside the default, which it replaces if faster.
DOT_WEIGHTED_SUM = True


def dot_sum(K: int, load_pq: bool) -> bool:
    """Whether the forward's pass 2 sums by tl.dot (its ``DOT_SUM``): always for K > 1 and for
    the fused projection, else as DOT_WEIGHTED_SUM says."""
    return DOT_WEIGHTED_SUM or K > 1 or not load_pq


# Chunks are a multiple of this many rows (every BLOCK_N divides it); tests lower it to cut
# small bags into several chunks.
CHUNK_ALIGN = 128
# One program per bag, without a merge, when the lengths are on the host and every bag fits one
# chunk; tests switch it off to run the general path on small inputs.
SINGLE_CHUNK = True


def _config(x, D, L, K, gated, kind):
    """Tile sizes from the dtype, D, L, K, gating and the device only (never bag lengths)."""
    tiles = gpu_tiles(kind, x.dtype, D, L, K, gated) if x.is_cuda else INTERPRETER_TILES[kind]
    block_n, block_d, block_l, num_warps, num_stages = tiles
    return (block_n, min(block_d, _pow2(D)), min(block_l, _pow2(L)), _pow2(K), num_warps,
            num_stages)


def _precision(x) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.cache
def _multi_processors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Programs per SM that the chunk size aims at (a GPU's SM count times this many chunks). On the
# third H100 check (2026-11-26) the kernels fitted 3 programs per SM (registers and shared
# memory), so 4 per SM ran 8 packed slides (200k rows, 530 programs) in two rounds of 396: the
# second a third full. More, smaller chunks bound that loss (16: 1,572 programs, 3.97 rounds)
# for more partial sums to merge and shorter loops per chunk; the benchmark column
# "fastmil_triton_cublas_16sm" times 16 beside the default (not yet run on a GPU).
PROGRAMS_PER_SM = 4


def chunk_size(R: int, device: torch.device) -> int:
    """Rows per chunk, from the row count and the device only: enough programs to fill the GPU
    (PROGRAMS_PER_SM per SM), a multiple of CHUNK_ALIGN, at most 64·CHUNK_ALIGN rows."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        target = PROGRAMS_PER_SM * _multi_processors(index)
    else:
        target = 8
    return max(1, min(64, _cdiv(_cdiv(max(R, 1), target), CHUNK_ALIGN))) * CHUNK_ALIGN


def meta_length(R: int, B: int, chunk: int) -> int:
    """Length of the chunk map ``meta``: 4 per bag plus a static bound on the chunk count (each
    bag adds at most one partial chunk)."""
    return 4 * B + _cdiv(R, chunk) + B


def _chunk_map(starts, lengths, R, chunk, device):
    """The chunk map ``meta`` (see the module docstring) on ``device``, and whether every bag is
    one chunk (``SINGLE``). Built where ``lengths`` live: on the host it costs the GPU one
    asynchronous copy from pinned memory; on the GPU it takes a few small launches and no sync."""
    B = lengths.shape[0]
    n_prog = meta_length(R, B, chunk) - 4 * B
    host = lengths.device.type == "cpu"
    o_b = torch.arange(B, device=lengths.device)
    single = SINGLE_CHUNK and host and (B == 0 or int(lengths.max()) <= chunk)
    if single:  # program b owns bag b (empty bags included: they write z = 0)
        num_chunks = torch.ones_like(lengths)
        first_chunk = o_b
        chunk_bag = torch.cat([o_b, o_b.new_full((n_prog - B,), B)])
    else:
        num_chunks = (lengths.clamp(min=0) + (chunk - 1)) // chunk  # [B]
        cum = torch.cumsum(num_chunks, 0)
        first_chunk = cum - num_chunks
        o_c = torch.arange(n_prog, device=lengths.device, dtype=cum.dtype)
        chunk_bag = torch.searchsorted(cum, o_c, right=True)  # [C]; B for idle programs
    meta = torch.cat([starts, lengths, first_chunk, num_chunks, chunk_bag]).to(torch.int64)
    if host and torch.device(device).type == "cuda":
        # from pinned memory the copy is queued and the host goes on; from pageable memory the
        # driver may first wait for the stream to drain (CUDA's "API synchronization behavior")
        meta = meta.pin_memory()
    return meta.to(device, non_blocking=True), single


def attention_pool_fwd(x, starts, lengths, row_mask, v, bv, u, bu, w, seed, p_drop, act,
                       save_pq):
    """Forward launch. x [R, D] (rows, unit column stride), starts/lengths [B] int64 (on the host
    or on x's device), row_mask [R] bool or None, v/u [L, D], bv/bu [L] or None, w [K, L],
    seed [2] int64 on x's device (or None: no dropout), p_drop the dropout probability, act a
    code of ACTIVATION_CODES, save_pq whether to keep p and q for the backward.

    Returns z32 [B, K, D] fp32, s [R, K] fp32 (−inf at masked rows), lse [B, K] fp32,
    pq [R, GL] in x's dtype, V h | U h without the biases (empty unless save_pq), and the chunk
    map meta (int64)."""
    R, D = x.shape
    L, K, B = v.shape[0], w.shape[0], lengths.shape[0]
    GL = 2 * L if u is not None else L
    dev = x.device
    chunk = chunk_size(R, dev)
    z32 = _empty((B, K, D), dtype=torch.float32, device=dev)
    s = _empty((R, K), dtype=torch.float32, device=dev)
    lse = _empty((B, K), dtype=torch.float32, device=dev)
    load_pq = CUBLAS_PROJECTION and B > 0 and R > 0
    if load_pq:
        pq = project(x, v, u)  # [R, GL]
    else:
        pq = _empty((R, GL) if save_pq else (0,), dtype=x.dtype, device=dev)
    meta, single = _chunk_map(starts, lengths, R, chunk, dev)
    if B == 0:
        return z32, s, lse, pq, meta
    gated = u is not None
    block_n, block_d, block_l, block_k, num_warps, num_stages = _config(
        x, D, L, K, gated, "fwd_pq" if load_pq else "fwd")
    C = meta.shape[0] - 4 * B
    if single:
        part_m = part_l = part_acc = z32
    else:
        part_m = _empty((C, K), dtype=torch.float32, device=dev)
        part_l = _empty((C, K), dtype=torch.float32, device=dev)
        part_acc = _empty((C, K, D), dtype=torch.float32, device=dev)
    dummy = x  # stands in for absent optional pointers (never read)
    _fwd_kernel[(C,)](
        x, dummy if row_mask is None else row_mask, meta,
        v, dummy if u is None else u, dummy if bv is None else bv, dummy if bu is None else bu,
        w, meta if seed is None else seed,
        s, pq, part_m, part_l, part_acc, lse,
        B, R, D, L, chunk, x.stride(0), float(p_drop),
        K=K, HAS_MASK=row_mask is not None, GATED=u is not None, HAS_BV=bv is not None,
        HAS_BU=bu is not None, ACT=act, DROPOUT=seed is not None, SAVE_PQ=save_pq,
        LOAD_PQ=load_pq, SINGLE=single, DOT_SUM=dot_sum(K, load_pq),
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k,
        PRECISION=_precision(x), num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        merge_d = min(_pow2(D), 256)  # narrower D blocks until bags × blocks fill the GPU
        while merge_d > 32 and B * _cdiv(D, merge_d) < 256:
            merge_d //= 2
        _merge_kernel[(B, _cdiv(D, merge_d))](
            part_m, part_l, part_acc, meta, z32, lse, B, C, D,
            K=K, BLOCK_C=32, BLOCK_D=merge_d, num_warps=4,
        )
    if load_pq and not save_pq:  # recompute: the backward projects again
        pq = pq.new_empty(0)
    return z32, s, lse, pq, meta


def attention_pool_bwd(dz32, glse, gs, x, row_mask, meta, v, bv, u, bu, w, seed, p_drop, act,
                       z32, s, lse, pq, project_pq, need_dx, need_dvu, need_dw):
    """Backward launch: from the gradients of (z32, lse, s) — dz32 [B, K, D] fp32, glse [B, K]
    fp32 or None, gs [R, K] fp32 or None — forms only what is asked for: dx [R, D]
    (``need_dx``) and d[V; U] [GL, D] (``need_dvu``) in x's dtype, and ``sums``, the fp32
    vector [dw (K·L) | d[b_V; b_U] (GL)] (dw when ``need_dw``, the bias part when ``need_dvu``
    and a bias exists; zeros where not asked for), each None when nothing of it is asked for
    (GL = 2L gated, L plain). Without saved p and q (``pq`` empty) the kernel recomputes them,
    or with ``project_pq`` (the forward took them from cuBLAS) one cuBLAS GEMM makes them."""
    R, D = x.shape
    L, K, B = v.shape[0], w.shape[0], lse.shape[0]
    dev, dt = x.device, x.dtype
    gated = u is not None
    GL = 2 * L if gated else L
    need_db = need_dvu and (bv is not None or bu is not None)
    need_dpq = need_dx or need_dvu
    if B == 0 or R == 0:  # nothing to scan: every gradient is zero
        zeros = lambda *shape: torch.zeros(shape, dtype=dt, device=dev)  # noqa: E731
        return (zeros(R, D) if need_dx else None, zeros(GL, D) if need_dvu else None,
                torch.zeros(K * L + GL, device=dev) if (need_dw or need_db) else None)
    if not (need_dpq or need_dw):
        return None, None, None
    # rows the kernel skips (padding past a bag's last real row) must read as zero
    alloc = torch.zeros if row_mask is not None else _empty
    dh0 = alloc((R, D), dtype=dt, device=dev) if need_dx else None
    dpq = alloc((R, GL), dtype=dt, device=dev) if need_dpq else None
    if project_pq and pq.numel() == 0:  # recompute p and q as the forward made them
        pq = project(x, v, u)
    block_n, block_d, block_l, block_k, num_warps, num_stages = _config(
        x, D, L, K, gated, "bwd_pq" if pq.numel() > 0 else "bwd")
    C = meta.shape[0] - 4 * B
    PW = K * L + GL
    part = _empty((C, PW), dtype=torch.float32, device=dev) if (need_dw or need_db) else None
    dummy = x
    _bwd_kernel[(C,)](
        x, dummy if row_mask is None else row_mask, meta,
        v, dummy if u is None else u, dummy if bv is None else bv,
        dummy if bu is None else bu, w, meta if seed is None else seed,
        dummy if pq.numel() == 0 else pq,
        s, lse, z32, dz32, dummy if glse is None else glse, dummy if gs is None else gs,
        dummy if dh0 is None else dh0, dummy if dpq is None else dpq,
        dummy if part is None else part,
        B, R, D, L, chunk_size(R, dev), x.stride(0), float(p_drop),
        K=K, HAS_MASK=row_mask is not None, GATED=gated, HAS_BV=bv is not None,
        HAS_BU=bu is not None, ACT=act, DROPOUT=seed is not None, SAVED_PQ=pq.numel() > 0,
        HAS_GLSE=glse is not None, HAS_GS=gs is not None,
        NEED_DX=need_dx, NEED_DPQ=need_dpq, NEED_DW=need_dw, NEED_DB=need_db,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k,
        PRECISION=_precision(x), num_warps=num_warps, num_stages=num_stages,
    )
    dx = dweight = None
    sums = None if part is None else part.sum(0)  # one ordered sum: [dw | d[b_V; b_U]]
    if need_dx:
        dx = torch.addmm(dh0, dpq, _stacked(v, u))  # [R, D]
    if need_dvu:
        if row_mask is not None:  # padding may hold anything (NaN, inf): 0 · NaN must not leak
            x = x.masked_fill(~row_mask[:, None], 0)
        dweight = dpq.t() @ x  # [GL, D]
    return dx, dweight, sums
