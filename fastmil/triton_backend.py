"""The Triton backend of :func:`fastmil.attention_pool`: the layout of a call, its autograd, and
the ``torch.library`` custom ops that ``torch.compile`` traces.

An eager call runs the launchers of :mod:`fastmil.kernels.attention_pool` inside one
``torch.autograd.Function`` (``_Pool``); a compiled call traces the custom ops
``fastmil::attention_pool_fwd`` / ``_bwd`` (fake implementations and the same autograd formula),
so ``torch.compile(fullgraph=True)`` runs without a graph break. Both share one forward and one
backward (``_forward``, ``_backward``). Neither has a second derivative: differentiating
fastmil's gradients again raises an error.

Per call the host does only what depends on the call: the layout of a batch (its chunk map,
built and copied to the GPU once) is kept with the batch's offsets tensor (or, for the padded
layout, with its shape) and reused by every call on it, the stacked weights ``[V; U]`` are read in
place where they lie in one block of memory (as ``fastmil.AttentionPool`` keeps them), and every
cast happens in the kernels.

Triton is imported lazily, on the first call: ``import fastmil`` never touches Triton or a GPU
driver.
"""

from __future__ import annotations

import collections
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .bags import derived, segment_ids
from .kernels import config

__all__ = ["attention_pool_triton", "require_triton", "triton_available",
           "triton_unavailable_reason"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_KERNELS = None  # fastmil.kernels.attention_pool, once imported


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from .kernels import attention_pool  # imports triton

        _KERNELS = attention_pool
    return _KERNELS


def triton_unavailable_reason(x: Tensor) -> str | None:
    """Why backend='triton' cannot run on x, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if x.dtype not in _TRITON_DTYPES:
        return f"the Triton kernels take float16, bfloat16 or float32, got {x.dtype}"
    if x.is_cuda:
        return None
    if x.device.type == "cpu" and _interpreting():
        if x.dtype == torch.bfloat16:
            return "Triton's CPU interpreter has no bfloat16 arithmetic; use float16 or float32"
        return None
    return (f"the Triton kernels run on CUDA tensors, got a tensor on {x.device} (on CPU, set "
            "TRITON_INTERPRET=1 before the first triton import to run them in the interpreter)")


def triton_available(x: Tensor) -> bool:
    return triton_unavailable_reason(x) is None


def require_triton(x: Tensor) -> None:
    reason = triton_unavailable_reason(x)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run here: {reason}; use backend='torch'")


# ---------------------------------------------------------------------------------------------
# Layout: where the bags lie, worked out once per batch
# ---------------------------------------------------------------------------------------------

def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# (B, N) -> the offsets of a padded batch, on the host; a few shapes are enough for a loop
_PADDED = collections.OrderedDict()


def _padded_offsets(B: int, N: int) -> Tensor:
    offsets = _PADDED.get((B, N))
    if offsets is None:
        offsets = torch.arange(B + 1, dtype=torch.int64) * N
        _PADDED[(B, N)] = offsets
        if len(_PADDED) > 64:
            _PADDED.popitem(last=False)
    else:
        _PADDED.move_to_end((B, N))
    return offsets


def _build_layout(offsets: Tensor, R: int, device: torch.device, chunk: int, single: bool,
                  pad_to: int | None = None) -> object:
    """The :class:`~fastmil.kernels.attention_pool.Layout` of bags ``offsets [B+1]`` over R rows
    in chunks of ``chunk`` rows, its chunk map on ``device``. Host offsets: the map is built on
    the host (padded with idle programs to ``pad_to`` entries where given) and copied (pinned,
    asynchronously). Device offsets: built on the device with a few small launches and no sync
    (always padded to the static bound)."""
    k = _kernels()
    if offsets.device.type == "cpu":
        meta, single = k.host_chunk_map(offsets.numpy().astype("int64", copy=False), chunk,
                                        single, pad_to=pad_to)
        meta = torch.from_numpy(meta)
        if device.type == "cuda":  # queued from pinned memory: the host goes on at once
            meta = meta.pin_memory().to(device, non_blocking=True)
    else:
        meta, single = k.device_chunk_map(offsets, R, chunk), False
    return k.Layout.of(meta, offsets.shape[0] - 1, chunk, single)


def _layout(offsets: Tensor, R: int, device: torch.device, opts) -> object:
    """The layout of an eager call (:func:`_build_layout`), kept with the offsets tensor and
    reused by every call on it (except inside a CUDA graph capture, which must record the
    build)."""
    capturing = _capturing(device)
    memo = None if capturing else derived(offsets)
    key = ("layout", R, device, opts.chunk_rows, opts.programs_per_sm, opts.single)
    if memo is not None and key in memo:
        return memo[key]
    if capturing and offsets.device.type == "cpu":
        raise ValueError("offsets are on the CPU but x is on the GPU inside a CUDA graph "
                         "capture, which cannot copy from host memory: pass offsets on x's "
                         "device for capture")
    layout = _build_layout(offsets, R, device, config.chunk_size(R, device, opts), opts.single)
    if memo is not None:
        memo[key] = layout
    return layout


def is_one_block(a: Tensor, b: Tensor) -> bool:
    """Whether b lies right after a in one block of memory (both contiguous, of one shape and
    dtype, in one storage), so that ``[a; b]`` is a view: how ``fastmil.AttentionPool`` keeps
    ``[V; U]``."""
    return (a.is_contiguous() and b.is_contiguous() and a.shape == b.shape
            and a.dtype == b.dtype
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _stacked(a: Tensor, b: Tensor | None) -> Tensor:
    """``[a; b]`` along dim 0 (a alone when b is None): in place where b lies right after a in
    one block of memory (:func:`is_one_block`), else one copy."""
    if b is None:
        return a
    if is_one_block(a, b):
        return a.as_strided((2 * a.shape[0], *a.shape[1:]), a.stride())
    return torch.cat([a, b])


def _stacked_bias(bv: Tensor | None, bu: Tensor | None, gated: bool) -> Tensor | None:
    """``[b_V; b_U]`` [GL] or None; a missing half of a gated bias is zero."""
    if bv is None and bu is None:
        return None
    if not gated:
        return bv
    if bv is None or bu is None:
        present = bv if bu is None else bu
        zero = torch.zeros_like(present)
        return torch.cat([present, zero] if bu is None else [zero, present])
    return _stacked(bv, bu)


# ---------------------------------------------------------------------------------------------
# Forward and backward, shared by the eager Function and the custom ops
# ---------------------------------------------------------------------------------------------

class _Call(NamedTuple):
    """What a call is, apart from its tensors."""

    layout: object  # kernels.attention_pool.Layout
    act: int
    p_drop: float
    need_grad: bool  # a gradient will be asked for: keep what the backward reads
    save_pq: bool  # keep p and q (recompute=False) rather than make them again
    opts: config.KernelOptions


def _forward(x, row_mask, v, u, bv, bu, w, seed, call: _Call):
    """-> z [B, K, D] (x's dtype), s [R, K], lse [B, K], and what the backward needs: pq
    [R, GL] (empty unless saved), z32 (None when no gradient is needed), and the stacked
    weight [V; U] [GL, D] and bias [GL] (or None)."""
    k = _kernels()
    gated = u is not None
    weight = _stacked(v, u)  # [GL, D]
    bias = _stacked_bias(bv, bu, gated)
    pq = x @ weight.t() if call.layout.B > 0 else x.new_empty(0)  # [R, GL]: cuBLAS
    z, z32, s, lse = k.forward(x, pq, row_mask, call.layout, bias, w, seed, call.p_drop,
                               call.act, gated, call.need_grad, call.opts)
    return z, s, lse, pq if call.save_pq else x.new_empty(0), z32, weight, bias


def _backward(needs, dz, gs, glse, x, row_mask, weight, bias, gated, w, bw, seed, pq, z32, s,
              lse, call: _Call):
    """Gradients dx [R, D], dW = d[V; U] [GL, D], db = d[b_V; b_U] [GL], dw [K, L] and the
    score bias's (exact zeros) where ``needs`` = (x, v, u, bv, bu, w, bw) asks for them (None
    elsewhere); ``weight`` and ``bias`` are the forward's stacked ones."""
    k = _kernels()
    need_x, need_v, need_u, need_bv, need_bu, need_w, need_bw = needs
    need_dweight, need_db = need_v or need_u, need_bv or need_bu
    if not (need_x or need_dweight or need_db or need_w or need_bw):
        return None, None, None, None, None
    if pq.numel() == 0 and call.layout.B > 0:  # recompute=True: make p and q again
        pq = x @ weight.t()
    dh0, dpq, dw, db, dbw = k.backward(
        dz, glse, gs, x, pq, row_mask, call.layout, bias, w, bw, seed, call.p_drop, call.act,
        gated, z32, s, lse, need_x, need_x or need_dweight or need_db, need_w, need_db, need_bw,
        call.opts)
    dx = dweight = None
    if need_x:
        dx = dpq @ weight if dh0 is None else torch.addmm(dh0, dpq, weight)  # [R, D]
    if need_dweight:
        if row_mask is not None:  # padding may hold anything (NaN, inf): 0 · NaN must not leak
            x = x.masked_fill(~row_mask[:, None], 0)
        dweight = dpq.t() @ x  # [GL, D]
    return dx, dweight, db, dw, dbw


def _split(grads, needs, L):
    """(dx, dW, db, dw, dbw) of :func:`_backward` -> the gradients of (x, v, u, bv, bu, w,
    bw)."""
    dx, dweight, db, dw, dbw = grads
    _, need_v, need_u, need_bv, need_bu, _, _ = needs
    return (dx, dweight[:L] if need_v else None, dweight[L:] if need_u else None,
            db[:L] if need_bv else None, db[L:] if need_bu else None, dw, dbw)


_NO_DOUBLE_BACKWARD = ("fastmil's triton backward has no derivative of its own, so it cannot be "
                       "differentiated again (a gradient of a gradient: create_graph=True, "
                       "gradient penalties); use backend='torch' for higher-order gradients")


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Passes gradients through; differentiating them again raises a clear error (as the
    custom ops do), instead of silently giving the part of a second derivative that flows
    through the torch ops around the kernels."""

    @staticmethod
    def forward(ctx, n, *tensors):
        """The first ``n`` tensors, passed through; the rest (what the gradients depend on)
        only connect them to the graph, so that differentiating them reaches ``backward``."""
        return tuple(g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(_NO_DOUBLE_BACKWARD)


class _Pool(torch.autograd.Function):
    """An eager call: inputs (x, row_mask, v, u, bv, bu, w, bw, seed, call), outputs (z, s,
    lse). The score bias bw is an input only to get its exact zero gradient."""

    @staticmethod
    def forward(ctx, x, row_mask, v, u, bv, bu, w, bw, seed, call):
        z, s, lse, pq, z32, weight, bias = _forward(x, row_mask, v, u, bv, bu, w, seed, call)
        ctx.save_for_backward(x, row_mask, weight, bias, w, bw, seed, pq, z32, s, lse)
        ctx.call, ctx.gated, ctx.L = call, u is not None, v.shape[0]
        # outputs nobody differentiated reach the backward as None, not as zeros to read
        ctx.set_materialize_grads(False)
        return z, s, lse

    @staticmethod
    def backward(ctx, dz, gs, glse):
        x, row_mask, weight, bias, w, bw, seed, pq, z32, s, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        args = ((needs[0], *needs[2:8]), dz, gs, glse, x, row_mask, weight, bias, ctx.gated, w,
                bw, seed, pq, z32, s, lse, ctx.call)
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            grads = _split(_backward(*args), args[0], ctx.L)
        else:  # create_graph=True: tie the gradients to a node that refuses to be differentiated
            with torch.no_grad():
                grads = _split(_backward(*args), args[0], ctx.L)
            live = [g for g in grads if g is not None]
            sources = [t for t in (*ctx.saved_tensors, dz, gs, glse)
                       if t is not None and t.requires_grad]
            if live and sources:
                wrapped = iter(_NotTwiceDifferentiable.apply(len(live), *live, *sources))
                grads = tuple(None if g is None else next(wrapped) for g in grads)
        dx, dv, du, dbv, dbu, dw, dbw = grads
        return dx, None, dv, du, dbv, dbu, dw, dbw, None, None


# ---------------------------------------------------------------------------------------------
# Custom ops (what torch.compile traces)
# ---------------------------------------------------------------------------------------------

def _compiled_call(x, offsets, p_drop, act, save_pq):
    """The call of a compiled forward: its layout built inside the op (padded to the static
    bound that the fake implementation reports)."""
    R, B, opts = x.shape[0], offsets.shape[0] - 1, config.options()
    chunk = config.chunk_size(R, x.device, opts)
    layout = _build_layout(offsets, R, x.device, chunk, opts.single,
                           pad_to=_kernels().meta_length(R, B, chunk))
    return _Call(layout, act, p_drop, True, save_pq, opts)


@torch.library.custom_op("fastmil::attention_pool_fwd", mutates_args=())
def _fwd_op(x: Tensor, offsets: Tensor, row_mask: Tensor | None, v: Tensor, u: Tensor | None,
            bv: Tensor | None, bu: Tensor | None, w: Tensor, bw: Tensor | None,
            seed: Tensor | None, p_drop: float, act: int, save_pq: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> z, s, lse, and for the backward pq and z32 (each empty when not kept: z32 is z for
    float32 x) and the chunk map."""
    call = _compiled_call(x, offsets, p_drop, act, save_pq)
    z, s, lse, pq, z32, _, _ = _forward(x, row_mask, v, u, bv, bu, w, seed, call)
    z32 = x.new_empty(0, dtype=torch.float32) if z32 is z else z32
    return z, s, lse, pq, z32, call.layout.meta


@_fwd_op.register_fake
def _(x, offsets, row_mask, v, u, bv, bu, w, bw, seed, p_drop, act, save_pq):
    k = _kernels()
    (R, D), (K, L), B = x.shape, w.shape, offsets.shape[0] - 1
    GL = 2 * L if u is not None else L
    chunk = config.chunk_size(R, x.device, config.options())
    f32 = torch.float32
    z32 = (B, K, D) if x.dtype != f32 else (0,)
    return (x.new_empty((B, K, D)), x.new_empty((R, K), dtype=f32), x.new_empty((B, K), dtype=f32),
            x.new_empty((R, GL) if save_pq else (0,)), x.new_empty(z32, dtype=f32),
            x.new_empty(k.meta_length(R, B, chunk), dtype=torch.int64))


@torch.library.custom_op("fastmil::attention_pool_bwd", mutates_args=())
def _bwd_op(dz: Tensor | None, gs: Tensor | None, glse: Tensor | None, x: Tensor,
            row_mask: Tensor | None, v: Tensor, u: Tensor | None, bv: Tensor | None,
            bu: Tensor | None, w: Tensor, seed: Tensor | None, pq: Tensor, z: Tensor,
            z32: Tensor, s: Tensor, lse: Tensor, meta: Tensor, p_drop: float, act: int,
            needs: list[bool]) -> list[Tensor]:
    """-> dx, d[V; U], d[b_V; b_U], dw as :func:`_backward` gives them, empty tensors where not
    asked for (outputs may be neither None nor views of each other)."""
    k, B, opts = _kernels(), lse.shape[0], config.options()
    chunk = config.chunk_size(x.shape[0], x.device, opts)
    layout = k.Layout.of(meta, B, chunk)  # (single: forward only)
    call = _Call(layout, act, p_drop, True, pq.numel() > 0, opts)
    weight, bias = _stacked(v, u), _stacked_bias(bv, bu, u is not None)
    grads = _backward((*needs, False), dz, gs, glse, x, row_mask, weight, bias, u is not None, w,
                      None, seed, pq, z if z32.numel() == 0 else z32, s, lse, call)[:4]
    return [x.new_empty(0) if g is None else g for g in grads]


@_bwd_op.register_fake
def _(dz, gs, glse, x, row_mask, v, u, bv, bu, w, seed, pq, z, z32, s, lse, meta, p_drop, act,
      needs):
    need_x, need_v, need_u, need_bv, need_bu, need_w = needs
    GL = v.shape[0] * (2 if u is not None else 1)
    shapes = (x.shape if need_x else (0,), (GL, v.shape[1]) if need_v or need_u else (0,),
              (GL,) if need_bv or need_bu else (0,), w.shape if need_w else (0,))
    return [x.new_empty(shape) for shape in shapes]


_OP_INPUTS = ("x", "offsets", "row_mask", "v", "u", "bv", "bu", "w", "bw", "seed", "p_drop",
              "act", "save_pq")


def _op_setup_context(ctx, inputs, output):
    x, offsets, row_mask, v, u, bv, bu, w, bw, seed, p_drop, act, save_pq = inputs
    z, s, lse, pq, z32, meta = output
    ctx.save_for_backward(x, row_mask, v, u, bv, bu, w, bw, seed, pq, z, z32, s, lse, meta)
    ctx.p_drop, ctx.act = p_drop, act
    ctx.set_materialize_grads(False)


def _op_backward(ctx, dz, gs, glse, *_):
    x, row_mask, v, u, bv, bu, w, bw, seed, pq, z, z32, s, lse, meta = ctx.saved_tensors
    needs = dict(zip(_OP_INPUTS, ctx.needs_input_grad, strict=True))
    wanted = [needs[n] for n in ("x", "v", "u", "bv", "bu", "w")]
    grads = dict.fromkeys(_OP_INPUTS)
    if any(wanted):
        out = _bwd_op(dz, gs, glse, x, row_mask, v, u, bv, bu, w, seed, pq, z, z32, s, lse,
                      meta, ctx.p_drop, ctx.act, wanted)
        x_, v_, u_, bv_, bu_, w_ = wanted  # which of (dx, dW, db, dw) hold a gradient
        kept = (x_, v_ or u_, bv_ or bu_, w_)
        split = _split([g if keep else None for g, keep in zip(out, kept, strict=True)] + [None],
                       (*wanted, False), v.shape[0])[:6]
        grads.update(zip(("x", "v", "u", "bv", "bu", "w"), split, strict=True))
    if needs["bw"]:
        grads["bw"] = torch.zeros_like(bw)
    return tuple(grads[n] for n in _OP_INPUTS)


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------------------------
# Layout adapter (called by fastmil.functional with validated, canonical arguments)
# ---------------------------------------------------------------------------------------------

def attention_pool_triton(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight,
                          mask=None, offsets=None, *, score_bias=None, activation="tanh",
                          dropout_p=0.0, recompute=None, need_attention=True,
                          need_scores=False):
    """Same contract as :func:`fastmil.torch_backend.attention_pool_torch`: padded ``x [B, N, D]``
    (optional bool ``mask``) or packed ``x [T, D]`` with ``offsets`` (on x's device or the
    CPU); returns ``(z [B, K, D]`` in x's dtype, the attention, the raw scores``)``, the last two
    ``[B, N, K]`` or ``[T, K]`` float32 or None when not asked for (the kernels never form the
    attention; it is derived from the scores and each bag's log-sum-exp)."""
    D = x.shape[-1]
    K = score_weight.shape[0]
    row_mask = None
    if offsets is None:  # padded: rows of x.view(B*N, D); bag b starts at row b*N
        B, N = x.shape[:2]
        rows = x.reshape(B * N, D)
        if _capturing(x.device):  # a capture cannot copy from host memory: made on the device
            offsets = torch.arange(B + 1, device=x.device, dtype=torch.int64) * N
        else:
            offsets = _padded_offsets(B, N)
        if mask is not None:
            row_mask = mask.reshape(B * N).contiguous()
    else:
        rows = x
    seed = None
    if dropout_p > 0:  # from PyTorch's generator of x's device: torch.manual_seed reproduces
        seed = torch.randint(0, 2**31 - 1, (2,), device=x.device, dtype=torch.int64)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, attn_weight, gate_weight, attn_bias, gate_bias, score_weight, score_bias))
    save_pq = need_grad and recompute is not True  # None: save
    act = _kernels().ACTIVATION_CODES[activation]
    if torch.compiler.is_compiling():
        z, s, lse, *_ = _fwd_op(rows, offsets, row_mask, attn_weight, gate_weight, attn_bias,
                                gate_bias, score_weight, score_bias, seed, float(dropout_p), act,
                                save_pq)
    else:
        opts = config.options()
        layout = _layout(offsets, rows.shape[0], x.device, opts)
        call = _Call(layout, act, float(dropout_p), need_grad, save_pq, opts)
        if need_grad:
            z, s, lse = _Pool.apply(rows, row_mask, attn_weight, gate_weight, attn_bias,
                                    gate_bias, score_weight, score_bias, seed, call)
        else:  # no graph to record: the forward alone
            z, s, lse, *_ = _forward(rows, row_mask, attn_weight, gate_weight, attn_bias,
                                     gate_bias, score_weight, seed, call)
    if not (need_attention or need_scores):
        return z, None, None
    attn = None
    if need_attention and (torch.compiler.is_compiling() or s.requires_grad):
        # a = exp(s - lse of the row's bag), differentiable (a training loop that uses the
        # attention, CLAM's instance loss for one)
        lengths = offsets[1:] - offsets[:-1] if torch.compiler.is_compiling() else \
            layout.meta[layout.B:2 * layout.B]  # (on the device already: no copy, no sync)
        lse_rows = lse[segment_ids(lengths.to(x.device), rows.shape[0])]
        attn = torch.exp(s - lse_rows)
    elif need_attention:  # the same without a graph, in one launch
        attn = _kernels().attention(s, lse, layout, opts)
    if x.dim() == 3:  # (s is -inf at masked slots: the kernels write every row of a bag)
        s = s.view(B, N, K)
        attn = None if attn is None else attn.view(B, N, K)
    return z, attn, s if need_scores else None
