"""The public functional API: :func:`attention_pool`.

This module validates the arguments, works out the layout (padded, packed or a single bag),
brings the weights to one canonical form and dispatches to a backend:

* ``"torch"``: :mod:`fastmil.torch_backend`, pure PyTorch, any device;
* ``"triton"``: :mod:`fastmil.ops`, the fused Triton kernels (CUDA, or CPU under
  ``TRITON_INTERPRET=1``);
* ``"auto"``: triton for CUDA tensors when Triton is usable, torch otherwise.
"""

from __future__ import annotations

import torch

from . import ops
from .bags import check_offsets_values
from .torch_backend import attention_pool_torch

__all__ = ["attention_pool", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t) -> str:
    return str(tuple(t.shape))


def _check_tensor(name, t, ndims, *, optional=False):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got a {t.dim()}-D tensor of shape {_shape(t)}")


def _check_dim(name, t, axis, size, what):
    if t.shape[axis] != size:
        raise ValueError(f"{name} has shape {_shape(t)}: its size {t.shape[axis]} at dim "
                         f"{axis} must equal {what} = {size}")


def _validate(x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias,
              mask, offsets, return_attention, backend):
    """Raise a TypeError / ValueError naming the argument for every malformed input."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(return_attention, bool):
        raise TypeError(f"return_attention must be a bool, got {type(return_attention).__name__}")
    _check_tensor("x", x, (2, 3))
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    D = x.shape[-1]
    _check_tensor("attn_weight", attn_weight, (2,))
    L = attn_weight.shape[0]
    _check_dim("attn_weight", attn_weight, 1, D, "x.shape[-1] (D)")
    _check_tensor("gate_weight", gate_weight, (2,), optional=True)
    if gate_weight is not None:
        if gate_weight.shape != attn_weight.shape:
            raise ValueError(f"gate_weight has shape {_shape(gate_weight)} but must match "
                             f"attn_weight's [L, D] = {_shape(attn_weight)}")
    elif gate_bias is not None:
        raise ValueError("gate_bias was given without gate_weight; plain (non-gated) attention "
                         "takes gate_weight=None and gate_bias=None")
    _check_tensor("score_weight", score_weight, (1, 2))
    _check_dim("score_weight", score_weight, -1, L, "attn_weight.shape[0] (L)")
    K = score_weight.shape[0] if score_weight.dim() == 2 else 1
    _check_tensor("attn_bias", attn_bias, (1,), optional=True)
    if attn_bias is not None:
        _check_dim("attn_bias", attn_bias, 0, L, "attn_weight.shape[0] (L)")
    _check_tensor("gate_bias", gate_bias, (1,), optional=True)
    if gate_bias is not None:
        _check_dim("gate_bias", gate_bias, 0, L, "attn_weight.shape[0] (L)")
    _check_tensor("score_bias", score_bias, (0, 1), optional=True)
    if score_bias is not None and score_bias.numel() != K:
        raise ValueError(f"score_bias has shape {_shape(score_bias)} but must hold one value per "
                         f"branch: shape ({K},) for score_weight of shape {_shape(score_weight)}")

    named = [("attn_weight", attn_weight), ("gate_weight", gate_weight),
             ("score_weight", score_weight), ("attn_bias", attn_bias), ("gate_bias", gate_bias),
             ("score_bias", score_bias)]
    for name, t in named:
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all tensors must "
                            "share one dtype (cast the weights, e.g. module.to(dtype), or run "
                            "under torch.autocast)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must "
                             "be on one device")

    if mask is not None:
        if offsets is not None:
            raise ValueError("mask and offsets were both given: use mask with padded x [B, N, D] "
                             "or offsets with packed x [T, D], not both")
        if x.dim() != 3:
            raise ValueError(f"mask is for padded x [B, N, D], but x is 2-D with shape "
                             f"{_shape(x)}; for packed bags pass offsets instead")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real instance), got {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask has shape {_shape(mask)} but must be [B, N] = "
                             f"{tuple(x.shape[:2])} to match x of shape {_shape(x)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")

    if offsets is not None:
        if x.dim() != 2:
            raise ValueError(f"offsets are for packed x [T, D], but x is {x.dim()}-D with shape "
                             f"{_shape(x)}; for padded bags pass mask instead")
        if not isinstance(offsets, torch.Tensor):
            raise TypeError(f"offsets must be a torch.Tensor, got {type(offsets).__name__}")
        if offsets.dim() != 1 or offsets.shape[0] < 1:
            raise ValueError(f"offsets must be 1-D [B+1], got shape {_shape(offsets)}")
        if offsets.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
        if offsets.device != x.device:
            raise ValueError(f"offsets is on {offsets.device} but x is on {x.device}")
        # Value checks read the data, which would break a torch.compile graph: they run in
        # eager mode only. Inside a compiled function, offsets are trusted as given.
        if not torch.compiler.is_compiling():
            check_offsets_values(offsets, x.shape[0])


def _autocast(tensors, device_type):
    """Inside torch.autocast, run in the autocast dtype, as nn.Linear would. Like torch's own
    autocast, float64 input is left alone."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    x = tensors[0]
    if isinstance(x, torch.Tensor) and x.dtype == torch.float64:
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in tensors]


def _resolve_backend(backend, x):
    if backend == "auto":
        return "triton" if x.is_cuda and ops.triton_available(x) else "torch"
    if backend == "triton":
        ops.require_triton(x)
    return backend


def attention_pool(x, attn_weight, gate_weight, score_weight, *, attn_bias=None, gate_bias=None,
                   score_bias=None, mask=None, offsets=None, return_attention=False,
                   backend="auto"):
    """Gated (or plain) attention-MIL pooling of bags of instances (Ilse et al. 2018).

    Per bag ``h_1..h_N``, with ``V = attn_weight``, ``U = gate_weight``, ``w = score_weight``::

        s_k = w · (tanh(V h_k + attn_bias) ⊙ sigmoid(U h_k + gate_bias)) + score_bias
        a   = softmax(s) over the bag's real instances,   z = Σ_k a_k h_k

    Args:
        x: instances, in one of three layouts:
            padded ``[B, N, D]`` (with optional ``mask [B, N]``), packed ``[T, D]`` (with
            ``offsets [B+1]``), or one bag ``[N, D]`` (neither mask nor offsets).
        attn_weight: ``V``, ``[L, D]`` (``nn.Linear`` layout).
        gate_weight: ``U``, ``[L, D]``, or None for plain attention ``w · tanh(V h + b)``.
        score_weight: ``w``, ``[L]`` for one attention branch or ``[K, L]`` for K branches, each
            with its own softmax.
        attn_bias, gate_bias: ``[L]`` or None. score_bias: ``[K]`` (``[1]`` or ``[]`` for 1-D
            score_weight) or None; it shifts all scores of a branch equally, so it changes
            neither z nor the attention, and its gradient is exactly zero.
        mask: ``[B, N]`` bool, True marks real instances (padded layout only; default all True).
        offsets: ``[B+1]`` int32/int64, bag b is ``x[offsets[b]:offsets[b+1]]`` (packed only).
            Checked (starts at 0, non-decreasing, ends at T) in eager mode; inside
            ``torch.compile`` these value checks are skipped so as not to break the graph.
        return_attention: also return the softmax weights.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``z``: ``[B, D]`` (``[B, K, D]`` for 2-D score_weight; ``[D]`` / ``[K, D]`` for a single
        bag) in x's dtype. With ``return_attention=True``, ``(z, attention)`` where attention is
        aligned with x's instance axis: ``[B, N]`` / ``[B, N, K]`` padded (exactly 0 at masked
        slots), ``[T]`` / ``[T, K]`` packed, ``[N]`` / ``[N, K]`` single, in float32 (float64
        for float64 x). An empty bag pools to zeros with zero gradients.

    All tensors must share one dtype (float16, bfloat16, float32 or float64) and one device;
    inside ``torch.autocast`` they are cast to the autocast dtype. Accumulation is float32.
    """
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias = _autocast(
        [x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias],
        device_type)
    _validate(x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias,
              mask, offsets, return_attention, backend)
    backend = _resolve_backend(backend, x)

    single_branch = score_weight.dim() == 1
    w = score_weight[None, :] if single_branch else score_weight  # [K, L]
    single_bag = x.dim() == 2 and offsets is None
    xb = x[None] if single_bag else x  # a single bag is a padded batch of one, without mask

    impl = ops.attention_pool_triton if backend == "triton" else attention_pool_torch
    z, attn = impl(xb, attn_weight, attn_bias, gate_weight, gate_bias, w, mask, offsets,
                   need_attention=return_attention)
    # z [B, K, D]; attn [B, N, K] padded or [T, K] packed
    if score_bias is not None and score_bias.requires_grad:
        # The score bias shifts every score of a branch alike, which the softmax ignores, so the
        # backends leave it out. Link it to z with an exact zero gradient (not rounding noise
        # that Adam would turn into steps), so that it still gets a .grad, as DDP expects.
        z = z + (score_bias.sum() * 0).to(z.dtype)
    if single_bag:
        z = z[0]
    if single_branch:
        z = z.squeeze(-2)
    if not return_attention:
        return z
    if single_bag:
        attn = attn[0]
    return z, (attn.squeeze(-1) if single_branch else attn)
