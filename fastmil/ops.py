"""Autograd glue for the fused Triton kernels: ``torch.library`` custom ops and the layout adapter.

``fastmil::attention_pool_fwd`` and ``fastmil::attention_pool_bwd`` wrap the launchers of
:mod:`fastmil.kernels.attention_pool` as opaque custom ops with fake (meta) implementations and an
autograd formula, so ``torch.compile(fullgraph=True)`` traces through them without a graph break.

Triton is imported lazily, on the first triton-backend call: ``import fastmil`` never touches
Triton or a GPU driver.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .torch_backend import segment_ids

__all__ = ["attention_pool_triton", "require_triton", "triton_available", "triton_unavailable_reason"]

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
            bv: Tensor | None, u: Tensor | None, bu: Tensor | None, w: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().attention_pool_fwd(x, starts, lengths, row_mask, v, bv, u, bu, w)


@_fwd_op.register_fake
def _(x, starts, lengths, row_mask, v, bv, u, bu, w):
    B, K, D, R = lengths.shape[0], w.shape[0], x.shape[1], x.shape[0]
    f32 = torch.float32
    return (x.new_empty((B, K, D), dtype=f32), x.new_empty((R, K), dtype=f32),
            x.new_empty((B, K), dtype=f32))


@torch.library.custom_op("fastmil::attention_pool_bwd", mutates_args=())
def _bwd_op(dz32: Tensor, glse: Tensor | None, gs: Tensor | None, x: Tensor,
            starts: Tensor, lengths: Tensor, row_mask: Tensor | None, v: Tensor,
            bv: Tensor | None, u: Tensor | None, bu: Tensor | None, w: Tensor,
            z32: Tensor, s: Tensor, lse: Tensor
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels().attention_pool_bwd(dz32, glse, gs, x, starts, lengths, row_mask, v, bv,
                                         u, bu, w, z32, s, lse)


@_bwd_op.register_fake
def _(dz32, glse, gs, x, starts, lengths, row_mask, v, bv, u, bu, w, z32, s, lse):
    L, D, K = v.shape[0], x.shape[1], w.shape[0]
    GL = 2 * L if u is not None else L
    return torch.empty_like(x), x.new_empty((GL, D)), x.new_empty(GL), x.new_empty((K, L))


def _setup_context(ctx, inputs, output):
    x, starts, lengths, row_mask, v, bv, u, bu, w = inputs
    z32, s, lse = output
    ctx.save_for_backward(x, starts, lengths, row_mask, v, bv, u, bu, w, z32, s, lse)
    ctx.has = (bv is not None, u is not None, bu is not None)


def _backward(ctx, dz32, ds, dlse):
    x, starts, lengths, row_mask, v, bv, u, bu, w, z32, s, lse = ctx.saved_tensors
    if dz32 is None:
        dz32 = torch.zeros_like(z32)
    dx, dweight, dbias, dw = _bwd_op(dz32.float().contiguous(), dlse, ds, x, starts, lengths,
                                     row_mask, v, bv, u, bu, w, z32, s, lse)
    has_bv, has_u, has_bu = ctx.has
    L = v.shape[0]
    dv, du = dweight[:L], (dweight[L:] if has_u else None)
    dbv, dbu = (dbias[:L] if has_bv else None), (dbias[L:] if has_bu else None)
    return dx, None, None, None, dv, dbv, du, dbu, dw


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Layout adapter (called by fastmil.functional with validated, canonical arguments)
# ---------------------------------------------------------------------------------------------

def attention_pool_triton(x, attn_weight, attn_bias, gate_weight, gate_bias, score_weight,
                          mask=None, offsets=None, *, activation="tanh", dropout_p=0.0,
                          recompute=None, need_attention=True, need_scores=False):
    """Same contract as :func:`fastmil.torch_backend.attention_pool_torch`: padded ``x [B, N, D]``
    (optional ``mask``) or packed ``x [T, D]`` with ``offsets``; returns ``z [B, K, D]`` in x's
    dtype and the attention (``[B, N, K]`` or ``[T, K]``) in float32, or None when
    ``need_attention`` is False (the kernels never form it; it is derived from the saved scores)."""
    if activation != "tanh" or dropout_p > 0 or recompute is False:
        raise NotImplementedError("WIP")
    D = x.shape[-1]
    K = score_weight.shape[0]
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    if offsets is None:  # padded: rows of x.view(B*N, D); bag b starts at row b*N
        B, N = x.shape[:2]
        rows = x.reshape(B * N, D)
        starts = torch.arange(B, device=x.device, dtype=torch.int64) * N
        if mask is None:
            lengths = torch.full((B,), N, device=x.device, dtype=torch.int64)
            row_mask = None
        else:
            # scan each bag only up to its last real instance: trailing padding costs nothing
            pos = torch.arange(1, N + 1, device=x.device, dtype=torch.int64)
            lengths = (mask * pos).amax(1) if N > 0 else torch.zeros_like(starts)
            row_mask = mask.reshape(B * N).contiguous()
    else:
        rows = x
        offsets = offsets.to(torch.int64)
        starts, lengths = offsets[:-1].contiguous(), offsets[1:] - offsets[:-1]
        row_mask = None
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    z32, s, lse = _fwd_op(rows, starts, lengths, row_mask, contig(attn_weight), contig(attn_bias),
                          contig(gate_weight), contig(gate_bias), contig(score_weight))
    if not (need_attention or need_scores):
        return z32.to(x.dtype), None, None
    # attention from the saved scores: a = exp(s - lse of the row's bag)
    if offsets is None:
        s = s.view(B, N, K)
        if mask is not None:
            s = s.masked_fill(~mask[..., None], float("-inf"))
        attn = torch.exp(s - lse[:, None, :])
    else:
        attn = torch.exp(s - lse[segment_ids(offsets, x.shape[0])])
    return z32.to(x.dtype), attn if need_attention else None, s if need_scores else None
