r"""Fused Triton kernels for attention-MIL pooling, forward and backward.

Math (per bag ``h_1..h_N``, K branches; ``V = attn_weight [L, D]``, ``U = gate_weight [L, D]``,
``w = score_weight [K, L]``)::

    p_n = V h_n + b_V,   q_n = U h_n + b_U,   t_n = tanh(p_n),   g_n = sigmoid(q_n)
    s_nk = w_k · (t_n ⊙ g_n)                            (plain attention: g_n = 1)
    a_nk = exp(s_nk - lse_k),  lse_k = log Σ_n exp(s_nk)  over the bag's real instances
    z_k  = Σ_n a_nk h_n

Backward, with ``dz_k`` the gradient of z_k, ``gs_nk`` a direct gradient on the scores and
``glse_k`` one on lse (both non-zero only when the caller differentiates the returned attention)::

    Δ_k   = z_k · dz_k
    ds_nk = a_nk (h_n · dz_k − Δ_k + glse_k) + gs_nk
    dH_n  = Σ_k ds_nk w_k,   dp_n = dH_n ⊙ g_n ⊙ (1 − t_n²),   dq_n = dH_n ⊙ t_n ⊙ g_n (1 − g_n)
    dh_n  = Σ_k a_nk dz_k + Vᵀ dp_n + Uᵀ dq_n
    dV = Σ_n dp_n h_nᵀ,  dU = Σ_n dq_n h_nᵀ,  db_V = Σ_n dp_n,  db_U = Σ_n dq_n,
    dw_k = Σ_n ds_nk (t_n ⊙ g_n)

The score bias b_w shifts every score of a branch by the same amount, which the softmax ignores:
it changes neither a nor z, so the kernels leave it out (fastmil.functional gives it an exact
zero gradient).

Layout. Every input is seen as rows ``x [R, D]`` (packed rows, or a padded ``[B, N, D]`` viewed
as ``[B·N, D]``); bag b covers rows ``starts[b] .. starts[b] + lengths[b]``, and an optional
``row_mask [R]`` drops padded rows. Each bag is cut into chunks of ``CHUNK`` rows; one program
handles one chunk (flash-decoding style), so a single bag of 10⁶ instances spreads over the whole
GPU and a batch of tiny bags gets one program per bag. ``chunk_bag[c]`` names the bag of chunk c
(B for unused programs), ``first_chunk[b]`` the first chunk of bag b.

Kernels:

* ``_fwd_kernel``: per chunk, over tiles of BLOCK_N rows: projections p, q as ``tl.dot`` tiles
  (L in BLOCK_L blocks, D in BLOCK_D blocks, fp32 accumulation), tanh ⊙ sigmoid and the scores in
  registers, an online masked softmax (running max m, sum l), and the rescaled weighted sum
  ``acc = Σ exp(s - m) h`` kept in an fp32 partial buffer. Writes the raw scores s [R, K] (−inf
  at masked rows) and per-chunk (m, l, acc). No ``[R, L]`` tensor is ever written.
* ``_merge_kernel``: per bag and D block, merges its chunks' states in chunk order
  (deterministic): ``z = Σ_c e^{m_c - M} acc_c / Σ_c e^{m_c - M} l_c``, ``lse = M + log l``.
  Empty bags give z = 0.
* ``_bwd_kernel``: per chunk, recomputes p and q, forms ds, writes ``dh0 = Σ_k a_nk dz_k`` and
  ``dpq = [dp, dq]`` rows, and per-chunk fp32 partials of dw. The launcher finishes with
  two GEMMs, ``dx = dh0 + dpq @ [V; U]`` and ``d[V; U] = dpqᵀ @ x``, and ordered sums of the
  partials: every reduction has a fixed order, so gradients are bit-identical run to run.

Triton's interpreter (``TRITON_INTERPRET=1``) runs these kernels on CPU tensors: tanh is written
as ``2·sigmoid(2x) − 1`` because the interpreter has no libdevice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_pool_fwd", "attention_pool_bwd", "POISON"]

# Tests set this to True: every output buffer is then filled with NaN before a launch, so an
# element a kernel forgets to write fails the comparison instead of passing by luck.
POISON = False


def _empty(shape, *, dtype, device):
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _hidden_block(x_ptr, v_ptr, u_ptr, bv_ptr, bu_ptr, o_row, m_row, l0, D, L, stride_x,
                  GATED: tl.constexpr, HAS_BV: tl.constexpr, HAS_BU: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
                  PRECISION: tl.constexpr):
    """t = tanh(p) and g = sigmoid(q) for rows o_row and attention columns l0 .. l0+BLOCK_L.
    Returns (t, g), each [BLOCK_N, BLOCK_L] fp32 (g = 1 for plain attention)."""
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
    if HAS_BV:
        b_p += tl.load(bv_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)[None, :]
    b_t = _tanh(b_p)
    if GATED:
        if HAS_BU:
            b_q += tl.load(bu_ptr + o_l, mask=m_l, other=0.0).to(tl.float32)[None, :]
        b_g = tl.sigmoid(b_q)
    else:
        b_g = tl.full([BLOCK_N, BLOCK_L], 1.0, dtype=tl.float32)
    return b_t, b_g


@triton.jit
def _load_w_t(w_ptr, l0, K, L, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
    """wᵀ block [BLOCK_L, BLOCK_K] fp32 (zero outside K and L)."""
    o_l = l0 + tl.arange(0, BLOCK_L)
    o_k = tl.arange(0, BLOCK_K)
    m = (o_l[:, None] < L) & (o_k[None, :] < K)
    return tl.load(w_ptr + o_k[None, :] * L + o_l[:, None], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _chunk_rows(chunk_bag_ptr, first_chunk_ptr, starts_ptr, lengths_ptr, B, CHUNK):
    """This program's chunk c, its bag b and its rows [row_lo, row_hi) (empty for unused
    programs, whose chunk_bag is B)."""
    i_c = tl.program_id(0).to(tl.int64)
    i_b = tl.load(chunk_bag_ptr + i_c).to(tl.int64)
    live = i_b < B
    i_b = tl.minimum(i_b, B - 1)
    start = tl.load(starts_ptr + i_b).to(tl.int64)
    length = tl.load(lengths_ptr + i_b).to(tl.int64)
    row_lo = start + (i_c - tl.load(first_chunk_ptr + i_b).to(tl.int64)) * CHUNK
    row_hi = tl.minimum(start + length, row_lo + CHUNK)
    row_hi = tl.where(live, row_hi, row_lo)
    return i_c, i_b, row_lo, row_hi


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


@triton.jit(do_not_specialize=["B", "CHUNK", "stride_x"])
def _fwd_kernel(
    x_ptr, row_mask_ptr, starts_ptr, lengths_ptr, chunk_bag_ptr, first_chunk_ptr,
    v_ptr, u_ptr, bv_ptr, bu_ptr, w_ptr,
    s_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    B, D, L, CHUNK, stride_x,
    K: tl.constexpr, HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BV: tl.constexpr,
    HAS_BU: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_b, row_lo, row_hi = _chunk_rows(chunk_bag_ptr, first_chunk_ptr, starts_ptr, lengths_ptr,
                                           B, CHUNK)

    o_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    m_k = o_k < K
    b_m = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)  # running max per branch
    b_l = tl.zeros([BLOCK_K], dtype=tl.float32)  # running sum of exp(s - m)
    p_acc = part_acc_ptr + i_c * K * D
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
        # scores [BLOCK_N, BLOCK_K], one attention block of BLOCK_L columns at a time
        b_s = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            b_t, b_g = _hidden_block(x_ptr, v_ptr, u_ptr, bv_ptr, bu_ptr, o_row, m_real, l0, D, L,
                                     stride_x, GATED, HAS_BV, HAS_BU, BLOCK_N, BLOCK_D, BLOCK_L,
                                     PRECISION)
            b_wt = _load_w_t(w_ptr, l0, K, L, BLOCK_L, BLOCK_K)  # [BLOCK_L, BLOCK_K]
            b_s = tl.dot(b_t * b_g, b_wt, b_s, input_precision="ieee")
        b_s = tl.where(m_real[:, None], b_s, float("-inf"))
        tl.store(s_ptr + o_row[:, None] * K + o_k[None, :], b_s, mask=m_row[:, None] & m_k[None, :])

        # online softmax: rescale the running state to the new max
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))  # [BLOCK_K]
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp(b_m - b_m_safe)  # [BLOCK_K]; 0 on the first tile
        b_p = tl.exp(b_s - b_m_safe[None, :])  # [BLOCK_N, BLOCK_K]; 0 at masked rows
        b_l = b_l * b_alpha + tl.sum(b_p, axis=0)
        b_m = b_m_new
        b_pt = tl.trans(b_p)  # [BLOCK_K, BLOCK_N]
        first = n0 == row_lo
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            p_x = x_ptr + o_row[:, None] * stride_x + o_d[None, :]
            b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            o_a = o_k[:, None] * D + o_d[None, :]  # [BLOCK_K, BLOCK_D]
            m_a = m_k[:, None] & m_d[None, :]
            b_acc = tl.where(first, 0.0, tl.load(p_acc + o_a, mask=m_a, other=0.0))
            b_acc = tl.dot(b_pt.to(b_x.dtype), b_x, b_acc * b_alpha[:, None],
                           input_precision=PRECISION)
            tl.store(p_acc + o_a, b_acc, mask=m_a)
    tl.store(part_m_ptr + i_c * K + o_k, b_m, mask=m_k)
    tl.store(part_l_ptr + i_c * K + o_k, b_l, mask=m_k)


@triton.jit(do_not_specialize=["B"])
def _merge_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, first_chunk_ptr, num_chunks_ptr, z_ptr, lse_ptr,
    B, D,
    K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    c0 = tl.load(first_chunk_ptr + i_b).to(tl.int64)
    c1 = c0 + tl.load(num_chunks_ptr + i_b).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_max = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    for c in range(c0, c1):
        b_max = tl.maximum(b_max, tl.load(part_m_ptr + c * K + o_k, mask=m_k, other=float("-inf")))
    b_max = tl.where(b_max == float("-inf"), 0.0, b_max)
    b_l = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for c in range(c0, c1):
        b_scale = tl.exp(tl.load(part_m_ptr + c * K + o_k, mask=m_k, other=float("-inf")) - b_max)
        b_l += b_scale * tl.load(part_l_ptr + c * K + o_k, mask=m_k, other=0.0)
        p_acc = part_acc_ptr + c * K * D + o_k[:, None] * D + o_d[None, :]
        b_part = tl.load(p_acc, mask=m_k[:, None] & m_d[None, :], other=0.0)
        b_acc += b_scale[:, None] * b_part
    b_has = b_l > 0
    b_z = tl.where(b_has[:, None], b_acc / tl.where(b_has, b_l, 1.0)[:, None], 0.0)
    tl.store(z_ptr + i_b * K * D + o_k[:, None] * D + o_d[None, :], b_z,
             mask=m_k[:, None] & m_d[None, :])
    b_lse = tl.where(b_has, b_max + tl.log(tl.where(b_has, b_l, 1.0)), 0.0)
    k_lim = tl.where(i_d == 0, K, 0)  # only the first D block writes lse
    tl.store(lse_ptr + i_b * K + o_k, b_lse, mask=o_k < k_lim)


@triton.jit(do_not_specialize=["B", "CHUNK", "stride_x"])
def _bwd_kernel(
    x_ptr, row_mask_ptr, starts_ptr, lengths_ptr, chunk_bag_ptr, first_chunk_ptr,
    v_ptr, u_ptr, bv_ptr, bu_ptr, w_ptr,
    s_ptr, lse_ptr, dz_ptr, delta_ptr, gs_ptr,
    dh0_ptr, dpq_ptr, part_dw_ptr,
    B, D, L, CHUNK, stride_x,
    K: tl.constexpr, HAS_MASK: tl.constexpr, GATED: tl.constexpr, HAS_BV: tl.constexpr,
    HAS_BU: tl.constexpr, HAS_GS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_b, row_lo, row_hi = _chunk_rows(chunk_bag_ptr, first_chunk_ptr, starts_ptr, lengths_ptr,
                                           B, CHUNK)

    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_lse = tl.load(lse_ptr + i_b * K + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
    b_delta = tl.load(delta_ptr + i_b * K + o_k, mask=m_k, other=0.0)  # [BLOCK_K]
    p_dz = dz_ptr + i_b * K * D
    GL = 2 * L if GATED else L  # row stride of dpq
    for n0 in range(row_lo, row_hi, BLOCK_N):
        o_row, m_row, m_real = _tile_rows(row_mask_ptr, n0, row_hi, HAS_MASK, BLOCK_N)
        m_nk = m_real[:, None] & m_k[None, :]
        b_s = tl.load(s_ptr + o_row[:, None] * K + o_k[None, :], mask=m_nk, other=float("-inf"))
        b_a = tl.exp(b_s - b_lse[None, :])  # [BLOCK_N, BLOCK_K]; 0 at masked rows

        # h_n · dz_k in fp32 on CUDA cores: this difference with Δ cancels, keep it exact
        b_hdz = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            p_x = x_ptr + o_row[:, None] * stride_x + o_d[None, :]
            b_x = tl.load(p_x, mask=m_real[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_dh0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for k in tl.static_range(K):
                b_dzk = tl.load(p_dz + k * D + o_d, mask=m_d, other=0.0)  # [BLOCK_D] fp32
                b_col = tl.sum(b_x * b_dzk[None, :], axis=1)  # [BLOCK_N]
                b_hdz += tl.where(o_k[None, :] == k, b_col[:, None], 0.0)
                b_ak = tl.sum(tl.where(o_k[None, :] == k, b_a, 0.0), axis=1)  # [BLOCK_N]
                b_dh0 += b_ak[:, None] * b_dzk[None, :]
            p_dh0 = dh0_ptr + o_row[:, None] * D + o_d[None, :]
            tl.store(p_dh0, b_dh0.to(dh0_ptr.dtype.element_ty), mask=m_row[:, None] & m_d[None, :])
        b_ds = b_a * (b_hdz - b_delta[None, :])  # [BLOCK_N, BLOCK_K]
        if HAS_GS:
            b_ds += tl.load(gs_ptr + o_row[:, None] * K + o_k[None, :], mask=m_nk, other=0.0)
        b_ds = tl.where(m_nk, b_ds, 0.0)

        for l0 in range(0, L, BLOCK_L):
            b_t, b_g = _hidden_block(x_ptr, v_ptr, u_ptr, bv_ptr, bu_ptr, o_row, m_real, l0, D, L,
                                     stride_x, GATED, HAS_BV, HAS_BU, BLOCK_N, BLOCK_D, BLOCK_L,
                                     PRECISION)
            b_wt = _load_w_t(w_ptr, l0, K, L, BLOCK_L, BLOCK_K)  # [BLOCK_L, BLOCK_K]
            b_dh = tl.dot(b_ds, tl.trans(b_wt), input_precision="ieee")  # [BLOCK_N, BLOCK_L]
            o_l = l0 + tl.arange(0, BLOCK_L)
            m_l = o_l < L
            # dw_k partial: Σ_n ds_nk (t ⊙ g)_n, accumulated in this chunk's fp32 slot
            p_dw = part_dw_ptr + i_c * K * L + o_k[:, None] * L + o_l[None, :]
            m_dw = m_k[:, None] & m_l[None, :]
            b_dw = tl.where(n0 == row_lo, 0.0, tl.load(p_dw, mask=m_dw, other=0.0))
            b_dw = tl.dot(tl.trans(b_ds), b_t * b_g, b_dw, input_precision="ieee")
            tl.store(p_dw, b_dw, mask=m_dw)
            b_dp = b_dh * b_g * (1.0 - b_t * b_t)
            m_out = m_row[:, None] & m_l[None, :]
            p_dpq = dpq_ptr + o_row[:, None] * GL + o_l[None, :]
            tl.store(p_dpq, b_dp.to(dpq_ptr.dtype.element_ty), mask=m_out)
            if GATED:
                b_dq = b_dh * b_t * b_g * (1.0 - b_g)
                tl.store(p_dpq + L, b_dq.to(dpq_ptr.dtype.element_ty), mask=m_out)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


# Tiles (BLOCK_N, BLOCK_D, BLOCK_L, num_warps) of the compiled GPU kernels: the largest that
# spill no registers on sm_90 for every dtype, gating and K, as tests/test_kernel_compile.py checks
# by compiling them ahead of time (no GPU needed). Not yet tuned by timing on a GPU. The
# interpreter runs numpy, where fewer, larger blocks are faster.
GPU_TILES = {"fwd": (64, 32, 64, 8), "bwd": (64, 32, 32, 8)}
INTERPRETER_TILES = {"fwd": (32, 64, 128, 4), "bwd": (32, 64, 128, 4)}


def _config(x, D, L, K, kind):
    """Tile sizes from D, L, K and the device only (never from bag lengths)."""
    block_n, block_d, block_l, num_warps = (GPU_TILES if x.is_cuda else INTERPRETER_TILES)[kind]
    return block_n, min(block_d, _pow2(D)), min(block_l, _pow2(L)), _pow2(K), num_warps


def _precision(x) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _chunks(x, lengths, block_n):
    """Cut bags into chunks. Returns CHUNK, chunk_bag [C], first_chunk [B], num_chunks [B]."""
    R = x.shape[0]
    B = lengths.shape[0]
    if x.is_cuda:
        target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        target = 8
    # rows per program: enough programs to fill the GPU, whole tiles, at most 64 tiles each
    chunk = max(1, min(64, triton.cdiv(triton.cdiv(max(R, 1), target), block_n))) * block_n
    num_chunks = (lengths + (chunk - 1)) // chunk  # [B]
    cum = torch.cumsum(num_chunks, 0)
    first_chunk = cum - num_chunks
    C = triton.cdiv(R, chunk) + B  # static upper bound: each bag adds at most one partial chunk
    o_c = torch.arange(C, device=x.device, dtype=cum.dtype)
    chunk_bag = torch.searchsorted(cum, o_c, right=True)  # [C]; B for unused programs
    return chunk, chunk_bag, first_chunk, num_chunks


def attention_pool_fwd(x, starts, lengths, row_mask, v, bv, u, bu, w):
    """Forward launch. x [R, D] (rows, unit column stride), starts/lengths [B] int64,
    row_mask [R] bool or None, v/u [L, D], bv/bu [L] or None, w [K, L].
    Returns z32 [B, K, D] fp32, s [R, K] fp32 (−inf at masked rows), lse [B, K] fp32."""
    R, D = x.shape
    L, K, B = v.shape[0], w.shape[0], lengths.shape[0]
    dev = x.device
    z32 = _empty((B, K, D), dtype=torch.float32, device=dev)
    s = _empty((R, K), dtype=torch.float32, device=dev)
    lse = _empty((B, K), dtype=torch.float32, device=dev)
    if B == 0:
        return z32, s, lse
    block_n, block_d, block_l, block_k, num_warps = _config(x, D, L, K, "fwd")
    chunk, chunk_bag, first_chunk, num_chunks = _chunks(x, lengths, block_n)
    C = chunk_bag.shape[0]
    part_m = _empty((C, K), dtype=torch.float32, device=dev)
    part_l = _empty((C, K), dtype=torch.float32, device=dev)
    part_acc = _empty((C, K, D), dtype=torch.float32, device=dev)
    dummy = x  # stands in for absent optional pointers (never read)
    _fwd_kernel[(C,)](
        x, dummy if row_mask is None else row_mask, starts, lengths, chunk_bag, first_chunk,
        v, dummy if u is None else u, dummy if bv is None else bv, dummy if bu is None else bu,
        w,
        s, part_m, part_l, part_acc,
        B, D, L, chunk, x.stride(0),
        K=K, HAS_MASK=row_mask is not None, GATED=u is not None, HAS_BV=bv is not None,
        HAS_BU=bu is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k,
        PRECISION=_precision(x), num_warps=num_warps,
    )
    merge_d = min(_pow2(D), 256)
    _merge_kernel[(B, triton.cdiv(D, merge_d))](
        part_m, part_l, part_acc, first_chunk, num_chunks, z32, lse, B, D,
        K=K, BLOCK_K=block_k, BLOCK_D=merge_d, num_warps=4,
    )
    return z32, s, lse


def attention_pool_bwd(dz32, glse, gs, x, starts, lengths, row_mask, v, bv, u, bu, w,
                       z32, s, lse):
    """Backward launch: the gradients of (z32, lse, s) -> dx [R, D], d[V; U] [GL, D],
    d[b_V; b_U] [GL], dw [K, L], all in x's dtype (GL = 2L gated, L plain).
    dz32 [B, K, D] fp32, glse [B, K] fp32 or None, gs [R, K] fp32 or None."""
    R, D = x.shape
    L, K, B = v.shape[0], w.shape[0], lengths.shape[0]
    dev, dt = x.device, x.dtype
    gated = u is not None
    GL = 2 * L if gated else L
    # rows the kernel skips (padding past a bag's last real row) must read as zero
    alloc = torch.zeros if row_mask is not None else _empty
    dh0 = alloc((R, D), dtype=dt, device=dev)
    dpq = alloc((R, GL), dtype=dt, device=dev)
    block_n, block_d, block_l, block_k, num_warps = _config(x, D, L, K, "bwd")
    chunk, chunk_bag, first_chunk, _ = _chunks(x, lengths, block_n)
    C = chunk_bag.shape[0]
    part_dw = _empty((C, K, L), dtype=torch.float32, device=dev)
    delta = (z32 * dz32).sum(-1)  # [B, K]
    if glse is not None:
        delta = delta - glse
    if B > 0:
        dummy = x
        _bwd_kernel[(C,)](
            x, dummy if row_mask is None else row_mask, starts, lengths, chunk_bag, first_chunk,
            v, dummy if u is None else u, dummy if bv is None else bv,
            dummy if bu is None else bu, w,
            s, lse, dz32.contiguous(), delta.contiguous(), dummy if gs is None else gs,
            dh0, dpq, part_dw,
            B, D, L, chunk, x.stride(0),
            K=K, HAS_MASK=row_mask is not None, GATED=gated, HAS_BV=bv is not None,
            HAS_BU=bu is not None, HAS_GS=gs is not None,
            BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k,
            PRECISION=_precision(x), num_warps=num_warps,
        )
    # Chunks of the same bag never overlap and unused chunk slots are never written: zero them
    # so the ordered sums below only see real partials.
    live = (chunk_bag < B)[:, None]
    dw = torch.where(live[:, :, None], part_dw, 0.0).sum(0).to(dt)  # [K, L]
    weight = torch.cat([v, u]) if gated else v  # [GL, D]
    dx = torch.addmm(dh0, dpq, weight)  # [R, D]
    if row_mask is not None:  # padding may hold anything (NaN, inf): 0 · NaN must not leak in
        x = x.masked_fill(~row_mask[:, None], 0)
    dweight = dpq.t() @ x  # [GL, D]
    dbias = dpq.sum(0, dtype=torch.float32).to(dt)  # [GL]
    return dx, dweight, dbias, dw
