r"""Fused Triton kernels for attention-MIL pooling, forward and backward, and their launchers.

Math (per bag ``h_1..h_N``, K branches; ``W = [V; U] [GL, D]`` with ``GL = 2L`` gated and ``L``
plain, biases ``b = [b_V; b_U]``, ``w = score_weight [K, L]``, ``act`` = tanh, relu or gelu)::

    [p_n | q_n] = W h_n                                 (one cuBLAS GEMM before the launch)
    t_n = act(p_n + b_V),   g_n = sigmoid(q_n + b_U)
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
    dh_n  = Σ_k a_nk dz_k + Wᵀ [dp_n | dq_n]
    dW = Σ_n [dp_n | dq_n] h_nᵀ,   db = Σ_n [dp_n | dq_n],   dw_k = Σ_n ds_nk e_n

``(h_n − z_k) · dz_k`` is the textbook ``h_n·dz_k − z_k·dz_k`` with the subtraction done first:
where a bag's attention is one-hot (a one-instance bag, say) ``h_n = z_k`` exactly, so ds and
every attention-weight gradient come out exactly zero, as in the eager formulation, instead of
rounding noise that Adam would turn into full-size steps. The score bias shifts every score of a
branch alike, which the softmax ignores: the kernels leave it out.

Layout. Every input is seen as rows ``x [R, D]`` (packed rows, or a padded ``[B, N, D]`` as
``[B·N, D]``); bag b covers rows ``starts[b] .. starts[b] + lengths[b]``, and an optional
``row_mask [R]`` drops padded rows. Each bag is cut into chunks of ``CHUNK`` rows; one program
handles one chunk (flash-decoding style), so a single bag of 10⁶ instances spreads over the whole
GPU and a batch of tiny bags gets one program per bag. The chunk map is one int64 tensor
``meta = [starts (B) | lengths (B) | first_chunk (B) | num_chunks (B) | chunk_bag (C)]``
(``chunk_bag[c]`` is the bag of chunk c, B for an idle program), made by :func:`host_chunk_map`
or :func:`device_chunk_map`. Row reads are clamped to ``[0, R)``: offsets that do not describe x
give wrong numbers, never an out-of-bounds access. Every tensor is read through its strides
(incoming gradients of ``.sum()`` are stride-0 views, transposed ones have swapped strides), and
every value is cast in registers: no copy or cast is launched around the kernels.

Kernels:

* ``_fwd_kernel``: per chunk, in two passes. Pass 1, over tiles of BLOCK_N rows: p and q read
  from the GEMM's output, the biases added, activation, dropout, gate and the scores in fp32
  registers, and the chunk's running max m and sum l of ``exp(s - m)`` (masked rows excluded);
  the raw scores s [R, K] are stored (−inf at masked rows). Pass 2, per D block: ``acc = Σ
  exp(s - m) h`` over the chunk's rows, by ``tl.dot`` (or, with ``FMA_SUM`` for one branch, by
  FMA into a [BLOCK_N, BLOCK_D] fp32 tile). With ``SINGLE`` (every bag fits one chunk, known on
  the host) a program owns a whole bag and writes z (x's dtype, and fp32 for the backward) and
  lse itself; otherwise it writes its chunk's (m, l, acc).
* ``_merge_kernel``: per bag and D block, merges its chunks' states in chunk order
  (deterministic): ``z = Σ_c e^{m_c - M} acc_c / Σ_c e^{m_c - M} l_c``, ``lse = M + log l``.
  Empty bags give z = 0.
* ``_bwd_kernel``: per chunk, forms ds, reads p and q back (saved, or made again by the GEMM),
  regenerates the dropout masks and writes what autograd asks for: ``dh0 = Σ_k a_nk dz_k`` and
  ``dpq = [dp | dq]`` rows, and per-chunk fp32 partials of dw and db.
* ``_sum_kernel``: the partials summed over chunks in a fixed order and written as dw and db in
  their parameters' dtypes. The launcher adds ``dx = dh0 + dpq @ W`` and ``dW = dpqᵀ @ x``
  (cuBLAS). Every reduction has a fixed order: gradients are bit-identical run to run.

Triton's interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors: tanh is written
as ``2·sigmoid(2x) − 1`` because the interpreter has no libdevice.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .config import cdiv, pow2, tiles
from .launch import launcher

__all__ = ["ACTIVATION_CODES", "Layout", "attention", "backward", "device_chunk_map", "forward",
           "host_chunk_map", "meta_length"]

ACTIVATION_CODES = {"tanh": 0, "relu": 1, "gelu": 2}


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
def _load_pq(pq_ptr, b_ptr, stride_b, o_row, m_row, l0, L,
             GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr):
    """p = V h + b_V and q = U h + b_U for rows o_row and attention columns l0 .. l0+BLOCK_L:
    two [BLOCK_N, BLOCK_L] fp32 tiles (q = 0 for plain attention). pq [R, GL] holds V h | U h
    (the GEMM's output, without the biases, which are added here in fp32)."""
    GL = 2 * L if GATED else L
    o_l = l0 + tl.arange(0, BLOCK_L)  # [BLOCK_L]
    m_l = o_l < L
    m = m_row[:, None] & m_l[None, :]
    p_pq = pq_ptr + o_row[:, None] * GL + o_l[None, :]
    b_p = tl.load(p_pq, mask=m, other=0.0).to(tl.float32)
    b_q = b_p * 0.0
    if GATED:
        b_q = tl.load(p_pq + L, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_p += tl.load(b_ptr + o_l * stride_b, mask=m_l, other=0.0).to(tl.float32)[None, :]
        if GATED:
            b_q += tl.load(b_ptr + (L + o_l) * stride_b, mask=m_l,
                           other=0.0).to(tl.float32)[None, :]
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
def _load_w_t(w_ptr, stride_wk, stride_wl, l0, K, L, BLOCK_L: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """wᵀ block [BLOCK_L, BLOCK_K] fp32 (zero outside K and L)."""
    o_l = l0 + tl.arange(0, BLOCK_L)
    o_k = tl.arange(0, BLOCK_K)
    m = (o_l[:, None] < L) & (o_k[None, :] < K)
    p_w = w_ptr + o_k[None, :] * stride_wk + o_l[:, None] * stride_wl
    return tl.load(p_w, mask=m, other=0.0).to(tl.float32)


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

@launcher
@triton.jit(do_not_specialize=["B", "R", "CHUNK", "p_drop"])
def _fwd_kernel(
    x_ptr, pq_ptr, row_mask_ptr, meta_ptr, b_ptr, w_ptr, seed_ptr,
    s_ptr, z_ptr, z32_ptr, lse_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    B, R, D, L, CHUNK, p_drop, stride_xr, stride_xd, stride_b, stride_wk, stride_wl,
    K: tl.constexpr, HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, DROPOUT: tl.constexpr, SINGLE: tl.constexpr, STORE_Z32: tl.constexpr,
    FMA_SUM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_c, live, i_b, row_lo, row_hi = _chunk_rows(meta_ptr, B, R, CHUNK)
    o_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_k = o_k < K
    # pass 1: the scores of the chunk's rows (stored), their running max m and sum l of exp(s - m)
    b_m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
        b_s = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # [BLOCK_N, BLOCK_K]
        for l0 in range(0, L, BLOCK_L):
            b_p, b_q = _load_pq(pq_ptr, b_ptr, stride_b, o_row, m_real, l0, L, GATED, HAS_BIAS,
                                BLOCK_L)
            b_e, _, _ = _hidden(b_p, b_q, seed_ptr, p_drop, o_row, l0, L, ACT, GATED, DROPOUT,
                                BLOCK_N, BLOCK_L)
            b_wt = _load_w_t(w_ptr, stride_wk, stride_wl, l0, K, L, BLOCK_L, BLOCK_K)
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
    # in registers over the chunk's rows; with SINGLE (the program owns bag i_b) normalised by l
    # and written as z. By tl.dot of [BLOCK_K, BLOCK_N] @ [BLOCK_N, BLOCK_D] (a rounded to x's
    # dtype), or with FMA_SUM (K == 1) by FMA into a [BLOCK_N, BLOCK_D] fp32 register tile
    # reduced once per D block, without the mma's trip through shared memory for one real row.
    b_m_safe = tl.where(b_m == float("-inf"), 0.0, b_m)  # [BLOCK_K]
    b_m1 = tl.sum(tl.where(o_k == 0, b_m_safe, 0.0), axis=0)  # branch 0's (K == 1: the) max
    b_has = b_l > 0
    b_scale = tl.full([BLOCK_K], 1.0, dtype=tl.float32)
    if SINGLE:  # an empty bag gets z = 0, lse = 0
        b_scale = tl.where(b_has, 1.0 / tl.where(b_has, b_l, 1.0), 0.0)
    m_kl = o_k < tl.where(live, K, 0)  # [BLOCK_K]: idle programs write nothing
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        m_d = o_d < D
        if FMA_SUM:
            b_acc_n = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for n0 in range(row_lo, row_hi, BLOCK_N):
                o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
                b_s1 = tl.load(s_ptr + o_row, mask=m_row, other=float("-inf"))  # [BLOCK_N]
                b_a1 = tl.exp(b_s1 - b_m1)  # [BLOCK_N]; 0 at masked rows
                p_x = x_ptr + o_row[:, None] * stride_xr + o_d[None, :] * stride_xd
                b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0)
                b_acc_n += b_a1[:, None] * b_x.to(tl.float32)  # [BLOCK_N, BLOCK_D]
            b_acc = tl.where(o_k[:, None] == 0, tl.sum(b_acc_n, axis=0)[None, :], 0.0)
        else:
            b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
            for n0 in range(row_lo, row_hi, BLOCK_N):
                o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
                b_s = tl.load(s_ptr + o_row[:, None] * K + o_k[None, :],
                              mask=m_row[:, None] & m_k[None, :], other=float("-inf"))
                b_a = tl.exp(b_s - b_m_safe[None, :])  # [BLOCK_N, BLOCK_K]; 0 at masked rows
                p_x = x_ptr + o_row[:, None] * stride_xr + o_d[None, :] * stride_xd
                b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0)
                b_acc = tl.dot(tl.trans(b_a).to(b_x.dtype), b_x, b_acc,
                               input_precision=PRECISION)
        b_acc = b_acc * b_scale[:, None]  # [BLOCK_K, BLOCK_D]
        m_out = m_kl[:, None] & m_d[None, :]
        if SINGLE:
            o_z = i_b * K * D + o_k[:, None] * D + o_d[None, :]
            tl.store(z_ptr + o_z, b_acc.to(z_ptr.dtype.element_ty), mask=m_out)
            if STORE_Z32:
                tl.store(z32_ptr + o_z, b_acc, mask=m_out)
        else:
            tl.store(part_acc_ptr + i_c * K * D + o_k[:, None] * D + o_d[None, :], b_acc,
                     mask=m_out)
    if SINGLE:
        b_lse = tl.where(b_has, b_m + tl.log(tl.where(b_has, b_l, 1.0)), 0.0)
        tl.store(lse_ptr + i_b * K + o_k, b_lse, mask=m_kl)
    else:
        tl.store(part_m_ptr + i_c * K + o_k, b_m, mask=m_k)
        tl.store(part_l_ptr + i_c * K + o_k, b_l, mask=m_k)


@launcher
@triton.jit(do_not_specialize=["B", "C"])
def _merge_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, meta_ptr, z_ptr, z32_ptr, lse_ptr,
    B, C, D,
    K: tl.constexpr, STORE_Z32: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
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
        b_z = tl.where(b_has, b_z, 0.0)
        p_z = (i_b * K + k) * D + o_d
        tl.store(z_ptr + p_z, b_z.to(z_ptr.dtype.element_ty), mask=m_d)
        if STORE_Z32:
            tl.store(z32_ptr + p_z, b_z, mask=m_d)
        if i_d == 0:  # only the first D block writes lse
            tl.store(lse_ptr + i_b * K + k,
                     tl.where(b_has, b_top + tl.log(tl.where(b_has, b_lsum, 1.0)), 0.0))


@launcher
@triton.jit(do_not_specialize=["B", "R", "CHUNK"])
def _attention_kernel(s_ptr, lse_ptr, meta_ptr, a_ptr, B, R, CHUNK,
                      K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The attention a = exp(s − lse of the row's bag), per chunk of rows (0 at masked rows,
    whose scores are −inf)."""
    i_c, live, i_b, row_lo, row_hi = _chunk_rows(meta_ptr, B, R, CHUNK)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m = (o_row < row_hi)[:, None] & m_k[None, :]
        o_s = o_row[:, None] * K + o_k[None, :]
        b_s = tl.load(s_ptr + o_s, mask=m, other=float("-inf"))
        tl.store(a_ptr + o_s, tl.exp(b_s - b_lse[None, :]), mask=m)


@launcher
@triton.jit(do_not_specialize=["B", "R", "CHUNK", "p_drop"])
def _bwd_kernel(
    x_ptr, pq_ptr, row_mask_ptr, meta_ptr, b_ptr, w_ptr, seed_ptr,
    s_ptr, lse_ptr, z32_ptr, dz_ptr, glse_ptr, gs_ptr,
    dh0_ptr, dpq_ptr, part_ptr,
    B, R, D, L, CHUNK, p_drop, stride_xr, stride_xd, stride_b, stride_wk, stride_wl,
    stride_dzb, stride_dzk, stride_dzd, stride_glb, stride_glk, stride_gsr, stride_gsk,
    K: tl.constexpr, HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, DROPOUT: tl.constexpr, HAS_DZ: tl.constexpr, HAS_GLSE: tl.constexpr,
    HAS_GS: tl.constexpr, NEED_DH0: tl.constexpr, NEED_DPQ: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
):
    i_c, live, i_b, row_lo, row_hi = _chunk_rows(meta_ptr, B, R, CHUNK)
    GL = 2 * L if GATED else L  # row stride of dpq and pq
    PW = K * L + GL  # partial row: [dw (K·L) | db (GL)]
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
        b_glse = tl.load(glse_ptr + i_b * stride_glb + o_k * stride_glk, mask=m_k,
                         other=0.0).to(tl.float32)
    p_dz = dz_ptr + i_b * stride_dzb
    p_z = z32_ptr + i_b * K * D
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
        m_nk = m_real[:, None] & m_k[None, :]
        b_s = tl.load(s_ptr + o_row[:, None] * K + o_k[None, :], mask=m_nk, other=float("-inf"))
        b_a = tl.exp(b_s - b_lse[None, :])  # [BLOCK_N, BLOCK_K]; 0 at masked rows

        # (h_n − z_k) · dz_k in fp32 on CUDA cores, and dh0 = Σ_k a_nk dz_k
        b_hdz = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if HAS_DZ:
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < D
                p_x = x_ptr + o_row[:, None] * stride_xr + o_d[None, :] * stride_xd
                b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0)
                b_x = b_x.to(tl.float32)  # [BLOCK_N, BLOCK_D]
                b_dh0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                for k in tl.static_range(K):
                    b_dzk = tl.load(p_dz + k * stride_dzk + o_d * stride_dzd, mask=m_d,
                                    other=0.0).to(tl.float32)  # [BLOCK_D]
                    b_zk = tl.load(p_z + k * D + o_d, mask=m_d, other=0.0)  # [BLOCK_D] fp32
                    b_col = tl.sum((b_x - b_zk[None, :]) * b_dzk[None, :], axis=1)  # [BLOCK_N]
                    b_hdz += tl.where(o_k[None, :] == k, b_col[:, None], 0.0)
                    if NEED_DH0:
                        b_ak = tl.sum(tl.where(o_k[None, :] == k, b_a, 0.0), axis=1)  # [BLOCK_N]
                        b_dh0 += b_ak[:, None] * b_dzk[None, :]
                if NEED_DH0:
                    p_dh0 = dh0_ptr + o_row[:, None] * D + o_d[None, :]
                    tl.store(p_dh0, b_dh0.to(dh0_ptr.dtype.element_ty),
                             mask=m_row[:, None] & m_d[None, :])
        b_ds = b_a * (b_hdz + b_glse[None, :])  # [BLOCK_N, BLOCK_K]
        if HAS_GS:
            p_gs = gs_ptr + o_row[:, None] * stride_gsr + o_k[None, :] * stride_gsk
            b_ds += tl.load(p_gs, mask=m_nk, other=0.0).to(tl.float32)
        b_ds = tl.where(m_nk, b_ds, 0.0)

        if NEED_DW or NEED_DPQ:
            for l0 in range(0, L, BLOCK_L):
                b_p, b_q = _load_pq(pq_ptr, b_ptr, stride_b, o_row, m_real, l0, L, GATED,
                                    HAS_BIAS, BLOCK_L)
                b_e, b_dedp, b_dedq = _hidden(b_p, b_q, seed_ptr, p_drop, o_row, l0, L, ACT,
                                              GATED, DROPOUT, BLOCK_N, BLOCK_L)
                b_wt = _load_w_t(w_ptr, stride_wk, stride_wl, l0, K, L, BLOCK_L, BLOCK_K)
                o_l = l0 + tl.arange(0, BLOCK_L)
                m_l = o_l < L
                if NEED_DW:  # dw_k partial: Σ_n ds_nk e_n, accumulated in this chunk's row
                    p_dw = p_part + o_k[:, None] * L + o_l[None, :]
                    m_dw = m_k[:, None] & m_l[None, :]
                    b_dw = tl.load(p_dw, mask=m_dw, other=0.0)
                    b_dw = tl.dot(tl.trans(b_ds), b_e, b_dw, input_precision="ieee")
                    tl.store(p_dw, b_dw, mask=m_dw)
                if NEED_DPQ:
                    b_de = tl.dot(b_ds, tl.trans(b_wt), input_precision="ieee")  # [N, L] block
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


@launcher
@triton.jit(do_not_specialize=["C"])
def _sum_kernel(part_ptr, dw_ptr, db_ptr, dbw_ptr, C, KL, PW, K,
                NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, NEED_DBW: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """dw = Σ_c part[c, :KL] and db = Σ_c part[c, KL:], over the chunks in a fixed order, written
    in their parameters' dtypes; and the score bias's gradient, exactly zero (the softmax
    ignores a shift), so that it costs no launch of its own."""
    o_j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BLOCK_J]
    if NEED_DBW:
        tl.store(dbw_ptr + tl.minimum(o_j, K - 1), tl.zeros([BLOCK_J], dtype=tl.float32).to(
            dbw_ptr.dtype.element_ty), mask=o_j < K)
    m_j = o_j < PW
    b_acc = tl.zeros([BLOCK_C, BLOCK_J], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        o_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)  # [BLOCK_C]
        p_part = part_ptr + o_c[:, None] * PW + o_j[None, :]
        b_acc += tl.load(p_part, mask=(o_c < C)[:, None] & m_j[None, :], other=0.0)
    b_sum = tl.sum(b_acc, axis=0)  # [BLOCK_J]
    if NEED_DW:
        tl.store(dw_ptr + tl.minimum(o_j, KL - 1), b_sum.to(dw_ptr.dtype.element_ty),
                 mask=o_j < KL)
    if NEED_DB:
        tl.store(db_ptr + tl.maximum(o_j - KL, 0), b_sum.to(db_ptr.dtype.element_ty),
                 mask=(o_j >= KL) & m_j)


# ---------------------------------------------------------------------------------------------
# Chunk maps
# ---------------------------------------------------------------------------------------------

class Layout(NamedTuple):
    """Where the bags of a call lie, as the kernels read it: the chunk map ``meta`` on x's device,
    B bags cut into C programs of ``chunk`` rows, and whether each bag is one program
    (``single``: no merge)."""

    meta: torch.Tensor
    B: int
    C: int
    chunk: int
    single: bool

    @classmethod
    def of(cls, meta: torch.Tensor, B: int, chunk: int, single: bool = False) -> Layout:
        """The layout of the chunk map ``meta`` of B bags (C: its entries past the 4·B)."""
        return cls(meta, B, meta.shape[0] - 4 * B, chunk, single)


def meta_length(R: int, B: int, chunk: int) -> int:
    """A static bound on the chunk map's length: 4 per bag plus the chunks (each bag adds at most
    one partial chunk)."""
    return 4 * B + cdiv(R, chunk) + B


def host_chunk_map(offsets: np.ndarray, chunk: int, single: bool, pad_to: int | None = None):
    """The chunk map from offsets on the host (int64 numpy ``[B+1]``): ``(meta, single)``, with
    exactly as many programs as chunks (or idle ones up to ``pad_to`` entries). ``single``:
    whether to give each bag one program without a merge where every bag fits one chunk."""
    B = offsets.shape[0] - 1
    starts, lengths = offsets[:-1], np.diff(offsets)
    single = single and (B == 0 or int(lengths.max()) <= chunk)
    num_chunks = np.ones(B, np.int64) if single else -(-np.maximum(lengths, 0) // chunk)
    first_chunk = np.cumsum(num_chunks) - num_chunks
    chunk_bag = np.repeat(np.arange(B, dtype=np.int64), num_chunks)
    if pad_to is not None:
        chunk_bag = np.concatenate([chunk_bag, np.full(pad_to - 4 * B - chunk_bag.shape[0], B)])
    return np.concatenate([starts, lengths, first_chunk, num_chunks, chunk_bag]), single


def device_chunk_map(offsets: torch.Tensor, R: int, chunk: int) -> torch.Tensor:
    """The chunk map from offsets on a device, with torch ops (a few small launches, no sync),
    padded with idle programs to :func:`meta_length` entries."""
    offsets = offsets.to(torch.int64)
    B = offsets.shape[0] - 1
    lengths = offsets[1:] - offsets[:-1]
    num_chunks = (lengths.clamp(min=0) + (chunk - 1)) // chunk  # [B]
    cum = torch.cumsum(num_chunks, 0)
    o_c = torch.arange(meta_length(R, B, chunk) - 4 * B, device=offsets.device)
    chunk_bag = torch.searchsorted(cum, o_c, right=True)  # [C]; B for idle programs
    return torch.cat([offsets[:-1], lengths, cum - num_chunks, num_chunks, chunk_bag])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _precision(x) -> str:
    """tl.dot's precision for x's dtype: TF32 for float32 only where torch allows it for its own
    matmuls (``torch.backends.cuda.matmul.allow_tf32``), as the cuBLAS GEMMs around it do."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _empty(shape, dtype, device, poison):
    if poison:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def forward(x, pq, row_mask, layout, b, w, seed, p_drop, act, gated, need_z32, opts):
    """Forward launch. x [R, D] (any strides), pq [R, GL] (the GEMM's V h | U h, contiguous),
    row_mask [R] bool or None, layout the call's :class:`Layout`, b [GL] or None, w [K, L] (any
    strides), seed [2] int64 on x's device or None (no dropout), p_drop the dropout probability,
    act a code of ACTIVATION_CODES, need_z32 whether the backward needs z in fp32, opts the
    call's KernelOptions.

    Returns z [B, K, D] in x's dtype, z32 (fp32: z itself for fp32 x; None unless need_z32), the
    raw scores s [R, K] fp32 (−inf at masked rows) and lse [B, K] fp32."""
    R, D = x.shape
    K, L = w.shape
    meta, B, C, chunk, single = layout
    dev, poison = x.device, opts.poison
    z = _empty((B, K, D), x.dtype, dev, poison)
    store_z32 = need_z32 and x.dtype != torch.float32
    z32 = _empty((B, K, D), torch.float32, dev, poison) if store_z32 else z
    s = _empty((R, K), torch.float32, dev, poison)
    lse = _empty((B, K), torch.float32, dev, poison)
    if B == 0:
        return z, z32 if need_z32 else None, s, lse
    block_n, block_d, block_l, block_k, num_warps, num_stages = tiles(
        "fwd", x.dtype, D, L, K, gated, x.is_cuda, opts, dropout=seed is not None)
    if single:
        part_m = part_l = part_acc = lse  # not used
    else:
        part_m = _empty((C, K), torch.float32, dev, poison)
        part_l = _empty((C, K), torch.float32, dev, poison)
        part_acc = _empty((C, K, D), torch.float32, dev, poison)
    _fwd_kernel[(C,)](
        x, pq, x if row_mask is None else row_mask, meta, x if b is None else b, w,
        meta if seed is None else seed,
        s, z, z32, lse, part_m, part_l, part_acc,
        B, R, D, L, chunk, float(p_drop), x.stride(0), x.stride(1),
        0 if b is None else b.stride(0), w.stride(0), w.stride(1),
        K=K, HAS_MASK=row_mask is not None, GATED=gated, HAS_BIAS=b is not None, ACT=act,
        DROPOUT=seed is not None, SINGLE=single, STORE_Z32=store_z32,
        FMA_SUM=opts.fma_sum and K == 1, PRECISION=_precision(x),
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        merge_d = min(pow2(D), 256)  # narrower D blocks until bags × blocks fill the GPU
        while merge_d > 32 and B * cdiv(D, merge_d) < 256:
            merge_d //= 2
        _merge_kernel[(B, cdiv(D, merge_d))](
            part_m, part_l, part_acc, meta, z, z32, lse, B, C, D,
            K=K, STORE_Z32=store_z32, BLOCK_C=32, BLOCK_D=merge_d, num_warps=4,
        )
    return z, z32 if need_z32 else None, s, lse


def attention(s, lse, layout, opts):
    """The attention [R, K] fp32 from the raw scores s [R, K] and each bag's lse [B, K]."""
    R, K = s.shape
    meta, B, C, chunk, _ = layout
    a = _empty((R, K), torch.float32, s.device, opts.poison)
    if B > 0 and C > 0:
        _attention_kernel[(C,)](s, lse, meta, a, B, R, chunk, K=K, BLOCK_N=128,
                                BLOCK_K=pow2(K, 1), num_warps=4)
    return a


def backward(dz, glse, gs, x, pq, row_mask, layout, b, w, bw, seed, p_drop, act, gated, z32,
             s, lse, need_dh0, need_dpq, need_dw, need_db, need_dbw, opts):
    """Backward launch, from the gradients of (z, lse, s) — dz [B, K, D], glse [B, K], gs [R, K],
    each None when that output was not differentiated, of any dtype and strides (stride 0
    included) — and what the forward kept (pq [R, GL]: saved, or made again by the caller's
    GEMM; z32 [B, K, D] fp32). Forms only what is asked for: ``dh0 = Σ_k a_k dz_k`` [R, D]
    (need_dh0, with dz) and ``dpq = [dp | dq]`` [R, GL] (need_dpq) in x's dtype, dw [K, L] in
    w's dtype (need_dw), db [GL] in b's dtype (need_db), and the score bias bw's gradient,
    exact zeros (need_dbw); None where not asked for. Rows no program reaches (masked rows,
    empty batches) read as zero."""
    R, D = x.shape
    K, L = w.shape
    meta, B, C, chunk, _ = layout
    dev, dt, poison = x.device, x.dtype, opts.poison
    GL = 2 * L if gated else L
    need_dh0 = need_dh0 and dz is not None
    zero_fill = row_mask is not None or B == 0  # rows that no program writes
    out = {}
    for name, need, shape, dtype in (("dh0", need_dh0, (R, D), dt), ("dpq", need_dpq, (R, GL), dt),
                                     ("dw", need_dw, (K, L), w.dtype),
                                     ("db", need_db, (GL,), None if b is None else b.dtype)):
        if not need:
            out[name] = None
        elif zero_fill:
            out[name] = torch.zeros(shape, dtype=dtype, device=dev)
        else:
            out[name] = _empty(shape, dtype, dev, poison)
    dh0, dpq, dw, db = out["dh0"], out["dpq"], out["dw"], out["db"]
    part_needed = (need_dw or need_db) and B > 0
    dbw = None
    if need_dbw:  # written by the partial sums' kernel when it runs
        dbw = _empty(bw.shape, bw.dtype, dev, poison) if part_needed else torch.zeros_like(bw)
    if B == 0 or not (need_dpq or need_dw or need_db or need_dh0):
        return dh0, dpq, dw, db, dbw
    block_n, block_d, block_l, block_k, num_warps, num_stages = tiles(
        "bwd", dt, D, L, K, gated, x.is_cuda, opts, dropout=seed is not None)
    PW = K * L + GL
    part = _empty((C, PW), torch.float32, dev, poison) if (need_dw or need_db) else None
    dummy = x  # stands in for absent optional pointers (never read)
    _bwd_kernel[(C,)](
        x, pq, dummy if row_mask is None else row_mask, meta, dummy if b is None else b, w,
        meta if seed is None else seed,
        s, lse, z32, dummy if dz is None else dz, dummy if glse is None else glse,
        dummy if gs is None else gs,
        dummy if dh0 is None else dh0, dummy if dpq is None else dpq,
        dummy if part is None else part,
        B, R, D, L, chunk, float(p_drop), x.stride(0), x.stride(1),
        0 if b is None else b.stride(0), w.stride(0), w.stride(1),
        *(dz.stride() if dz is not None else (0, 0, 0)),
        *(glse.stride() if glse is not None else (0, 0)),
        *(gs.stride() if gs is not None else (0, 0)),
        K=K, HAS_MASK=row_mask is not None, GATED=gated, HAS_BIAS=b is not None, ACT=act,
        DROPOUT=seed is not None, HAS_DZ=dz is not None, HAS_GLSE=glse is not None,
        HAS_GS=gs is not None, NEED_DH0=need_dh0, NEED_DPQ=need_dpq, NEED_DW=need_dw,
        NEED_DB=need_db,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    if part is not None:
        block_j = 128
        _sum_kernel[(cdiv(PW, block_j),)](
            part, dummy if dw is None else dw, dummy if db is None else db,
            dummy if dbw is None else dbw, C, K * L, PW, K,
            NEED_DW=need_dw, NEED_DB=need_db, NEED_DBW=dbw is not None, BLOCK_C=16,
            BLOCK_J=block_j, num_warps=4,
        )
    return dh0, dpq, dw, db, dbw
