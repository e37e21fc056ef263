"""Autograd glue for the fused Triton kernels: ``torch.library`` custom ops and the layout adapter.

``fastmil::attention_pool_fwd`` and ``fastmil::attention_pool_bwd`` wrap the launchers of
:mod:`fastmil.kernels.attention_pool` as opaque custom ops with fake (meta) implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through them without a graph break.
Eager calls run the same launchers and the same autograd formula through a plain
``torch.autograd.Function`` (``_EagerPool``), which skips the custom ops' Python dispatch (about
100 µs of host time per training step, ``python -m benchmarks.host_time``). Neither path has a
second derivative: differentiating fastmil's gradients again raises an error.

Triton is imported lazily, on the first triton-backend call: ``import fastmil`` never touches
Triton or a GPU driver.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .bags import segment_ids

__all__ = ["attention_pool_triton", "require_triton", "triton_available", "triton_unavailable_reason"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _capturing(x: Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _kernels():
    from .kernels import attention_pool as kernels  # imports triton

    return kernels


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
# Custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("fastmil::attention_pool_fwd", mutates_args=())
def _fwd_op(x: Tensor, starts: Tensor, lengths: Tensor, row_mask: Tensor | None, v: Tensor,
            bv: Tensor | None, u: Tensor | None, bu: Tensor | None, w: Tensor,
            bw: Tensor | None, seed: Tensor | None, p_drop: float, act: int, save_pq: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # bw (the score bias) is not read: it is an input only to get its exact zero gradient
    return _kernels().attention_pool_fwd(x, starts, lengths, row_mask, v, bv, u, bu, w, seed,
                                         p_drop, act, save_pq)


@_fwd_op.register_fake
def _(x, starts, lengths, row_mask, v, bv, u, bu, w, bw, seed, p_drop, act, save_pq):
    k = _kernels()
    B, K, (R, D), L = lengths.shape[0], w.shape[0], x.shape, v.shape[0]
    GL = 2 * L if u is not None else L
    f32 = torch.float32
    meta = x.new_empty(k.meta_length(R, B, k.chunk_size(R, x.device)), dtype=torch.int64)
    return (x.new_empty((B, K, D), dtype=f32), x.new_empty((R, K), dtype=f32),
            x.new_empty((B, K), dtype=f32), x.new_empty((R, GL) if save_pq else (0,)), meta)


@torch.library.custom_op("fastmil::attention_pool_bwd", mutates_args=())
def _bwd_op(dz32: Tensor, glse: Tensor | None, gs: Tensor | None, x: Tensor,
            row_mask: Tensor | None, meta: Tensor, v: Tensor, bv: Tensor | None,
            u: Tensor | None, bu: Tensor | None, w: Tensor, seed: Tensor | None, p_drop: float,
            act: int, z32: Tensor, s: Tensor, lse: Tensor, pq: Tensor, project_pq: bool,
            need_dx: bool, need_dvu: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> dx [R, D], d[V; U] [GL, D] and the float32 sums [dw (K·L) | d[b_V; b_U] (GL)], each
    an empty tensor when not asked for (outputs may not alias: a fresh one each)."""
    outs = _kernels().attention_pool_bwd(
        dz32, glse, gs, x, row_mask, meta, v, bv, u, bu, w, seed, p_drop, act, z32, s, lse, pq,
        project_pq, need_dx, need_dvu, need_dw)
    return tuple(x.new_empty(0) if t is None else t for t in outs)


@_bwd_op.register_fake
def _(dz32, glse, gs, x, row_mask, meta, v, bv, u, bu, w, seed, p_drop, act, z32, s, lse, pq,
      project_pq, need_dx, need_dvu, need_dw):
    L, (K, _), (R, D) = v.shape[0], w.shape, x.shape
    GL = 2 * L if u is not None else L
    need_sums = need_dw or (need_dvu and (bv is not None or bu is not None))
    return (x.new_empty((R, D) if need_dx else (0,)), x.new_empty((GL, D) if need_dvu else (0,)),
            x.new_empty((K * L + GL,) if need_sums else (0,),
                        dtype=torch.float32 if need_sums else x.dtype))


_FWD_INPUTS = ("x", "starts", "lengths", "row_mask", "v", "bv", "u", "bu", "w", "bw", "seed",
               "p_drop", "act", "save_pq")


def _setup_context(ctx, inputs, output):
    x, starts, lengths, row_mask, v, bv, u, bu, w, bw, seed, p_drop, act, save_pq = inputs
    z32, s, lse, pq, meta = output
    ctx.save_for_backward(x, row_mask, meta, v, bv, u, bu, w, bw, seed, z32, s, lse, pq)
    ctx.p_drop, ctx.act = p_drop, act
    # the backward makes p and q (when not kept) the way this forward did
    ctx.project_pq = _kernels().CUBLAS_PROJECTION
    # outputs nobody differentiated (the scores and lse, unless the attention or the scores were
    # returned and used) reach the backward as None, not as zero tensors to launch and to read
    ctx.set_materialize_grads(False)


def _backward(ctx, dz32, gs, glse, _dpq, _dmeta):
    x, row_mask, meta, v, bv, u, bu, w, bw, seed, z32, s, lse, pq = ctx.saved_tensors
    bwd = _kernels().attention_pool_bwd if getattr(ctx, "eager", False) else _bwd_op
    needs = dict(zip(_FWD_INPUTS, ctx.needs_input_grad, strict=True))
    need_dx, need_dw = needs["x"], needs["w"]
    need_dvu = any(needs[n] for n in ("v", "bv", "u", "bu"))
    grads = dict.fromkeys(_FWD_INPUTS)
    if needs["bw"]:  # the softmax ignores a shift of all scores: exactly zero
        grads["bw"] = torch.zeros_like(bw)
    if need_dx or need_dvu or need_dw:
        if dz32 is None:  # only the attention or the scores are differentiated
            dz32 = torch.zeros_like(z32)
        dx, dweight, sums = bwd(dz32.float().contiguous(), glse, gs, x, row_mask, meta, v, bv,
                                u, bu, w, seed, ctx.p_drop, ctx.act, z32, s, lse, pq,
                                ctx.project_pq, need_dx, need_dvu, need_dw)
        L, K = v.shape[0], w.shape[0]
        if need_dx:
            grads["x"] = dx
        if need_dvu:
            grads["v"], grads["u"] = dweight[:L], (dweight[L:] if u is not None else None)
            bias_sums = sums[K * L:]
            grads["bv"] = bias_sums[:L].to(v.dtype) if bv is not None else None
            grads["bu"] = bias_sums[L:].to(v.dtype) if bu is not None else None
        if need_dw:
            grads["w"] = sums[:K * L].view(K, L).to(w.dtype)
    return tuple(grads[n] for n in _FWD_INPUTS)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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


class _EagerPool(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch: what eager
    calls run (``torch.compile`` traces the custom ops instead). The custom ops' Python
    dispatch costs about 100 µs of host time per training step (benchmarks/HOST_TIME.md),
    which a launch-bound call (hundreds of tiny bags) pays in full."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _kernels().attention_pool_fwd(*inputs[:9], *inputs[10:])  # bw is not read
        _setup_context(ctx, inputs, out)
        ctx.eager = True
        return out

    @staticmethod
    def backward(ctx, *grad_outputs):
        if not torch.is_grad_enabled():  # the usual backward (create_graph=False)
            return _backward(ctx, *grad_outputs)
        # create_graph=True: the gradients, computed without a graph, are tied to what they
        # depend on (the saved inputs, the incoming gradients) through a node that refuses to
        # be differentiated
        with torch.no_grad():
            grads = _backward(ctx, *grad_outputs)
        live = [g for g in grads if g is not None]
        sources = [t for t in (*ctx.saved_tensors, *grad_outputs)
                   if t is not None and t.requires_grad]
        if not (live and sources):
            return grads
        wrapped = iter(_NotTwiceDifferentiable.apply(len(live), *live, *sources))
        return tuple(None if g is None else next(wrapped) for g in grads)


def _pool_fwd(*inputs):
    return _fwd_op(*inputs) if torch.compiler.is_compiling() else _EagerPool.apply(*inputs)


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
    attention; it is derived from the saved scores)."""
    D = x.shape[-1]
    K = score_weight.shape[0]
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    if offsets is None:  # padded: rows of x.view(B*N, D); bag b starts at row b*N
        B, N = x.shape[:2]
        rows = x.reshape(B * N, D)
        if mask is None:  # lengths known on the host: the chunk map costs the GPU one copy
            # (inside a CUDA graph capture, which cannot copy from host memory, on the device)
            where = x.device if _capturing(x) else "cpu"
            starts = torch.arange(B, dtype=torch.int64, device=where) * N
            lengths = torch.full((B,), N, dtype=torch.int64, device=where)
            row_mask = None
        else:
            # scan each bag only up to its last real instance: trailing padding costs nothing
            pos = torch.arange(1, N + 1, device=mask.device, dtype=torch.int64)
            lengths = (mask * pos).amax(1) if N > 0 else torch.zeros(B, dtype=torch.int64,
                                                                      device=mask.device)
            starts = torch.arange(B, device=mask.device, dtype=torch.int64) * N
            row_mask = mask.reshape(B * N).contiguous()
    else:
        if offsets.device != x.device and _capturing(x):
            raise ValueError("offsets are on the CPU but x is on the GPU inside a CUDA graph "
                             "capture, which cannot copy from host memory: pass offsets on x's "
                             "device for capture")
        rows = x
        offsets = offsets.to(torch.int64)
        starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
        row_mask = None
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    seed = None
    if dropout_p > 0:  # from PyTorch's generator of x's device: torch.manual_seed reproduces
        seed = torch.randint(0, 2**31 - 1, (2,), device=x.device, dtype=torch.int64)
    save_pq = recompute is not True and torch.is_grad_enabled()  # None: save
    z32, s, lse, _, meta = _pool_fwd(
        rows, starts, lengths, row_mask, contig(attn_weight), contig(attn_bias),
        contig(gate_weight), contig(gate_bias), contig(score_weight), score_bias, seed,
        float(dropout_p), _kernels().ACTIVATION_CODES[activation], save_pq)
    z = z32.to(x.dtype)
    if not (need_attention or need_scores):
        return z, None, None
    if offsets is None:
        s = s.view(B, N, K)
        if mask is not None:  # rows past a bag's last real instance are never written
            s = s.masked_fill(~mask[..., None], float("-inf"))
        lse_rows = lse[:, None, :]
    else:  # each row's bag, from the device copy of the lengths (no host sync)
        B = lse.shape[0]
        lse_rows = lse[segment_ids(meta[B:2 * B], x.shape[0])]
    attn = torch.exp(s - lse_rows) if need_attention else None  # a = exp(s - lse of the bag)
    return z, attn, s if need_scores else None
