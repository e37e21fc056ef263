"""The public functional API: :func:`attention_pool`.

This module validates the arguments, works out the layout (padded, packed or a single bag),
brings the weights to one canonical form and dispatches to a backend:

* ``"torch"``: :mod:`fastmil.torch_backend`, pure PyTorch, any device;
* ``"triton"``: :mod:`fastmil.triton_backend`, the fused Triton kernels (CUDA, or CPU under
  ``TRITON_INTERPRET=1``);
* ``"auto"``: triton for CUDA tensors when Triton is usable, torch otherwise.
"""

from __future__ import annotations

import torch

from . import triton_backend
from .bags import check_offsets_values, derived
from .reference import ACTIVATIONS
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


def check_backend(backend):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_options(*, backend, activation, dropout, recompute, dropout_name="dropout_p"):
    """The checks :func:`attention_pool` and ``AttentionPool`` share: a ValueError / TypeError
    naming the argument for a bad backend, activation, dropout probability or recompute."""
    check_backend(backend)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0 <= dropout < 1:
        raise ValueError(f"{dropout_name} must be a number in [0, 1), got {dropout!r}")
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute must be None, True or False, got {recompute!r}")


def _check_options(activation, dropout_p, return_attention, return_scores, recompute, backend):
    check_options(backend=backend, activation=activation, dropout=dropout_p,
                  recompute=recompute)
    for name, flag in (("return_attention", return_attention), ("return_scores", return_scores)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def _well_formed(x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias,
                 mask, offsets) -> bool:
    """Whether every input is as :func:`_validate` requires, checked as cheaply as possible (a
    training loop calls this on every step); False sends the call through ``_validate`` for the
    error that names what is wrong."""
    try:
        dtype, device, D = x.dtype, x.device, x.shape[-1]
        L = attn_weight.shape[0]
        if x.dim() not in (2, 3) or dtype not in _FLOAT_DTYPES or attn_weight.shape != (L, D):
            return False
        K = score_weight.shape[0] if score_weight.dim() == 2 else 1
        if score_weight.shape[-1] != L or score_weight.dim() not in (1, 2):
            return False
        if gate_weight is None and gate_bias is not None:
            return False
        for t, shape in ((attn_weight, None), (gate_weight, (L, D)), (score_weight, None),
                         (attn_bias, (L,)), (gate_bias, (L,)), (score_bias, None)):
            if t is not None and (t.dtype != dtype or t.device != device
                                  or (shape is not None and t.shape != shape)):
                return False
        if score_bias is not None and (score_bias.numel() != K or score_bias.dim() > 1):
            return False
        if mask is not None and (offsets is not None or x.dim() != 3
                                 or mask.shape != x.shape[:2] or mask.is_floating_point()
                                 or mask.is_complex() or mask.device != device):
            return False
        if offsets is not None and (x.dim() != 2 or offsets.dim() != 1 or len(offsets) < 1
                                    or offsets.dtype not in (torch.int32, torch.int64)
                                    or (offsets.device != device
                                        and offsets.device.type != "cpu")):
            return False
        return True
    except (AttributeError, TypeError, IndexError):  # not a tensor, or no such dimension
        return False


def _validate(x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias,
              mask, offsets):
    """Raise a TypeError / ValueError naming the argument for every malformed input."""
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
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask must be bool or an integer dtype (True / nonzero = real "
                            f"instance), got {mask.dtype}: a floating mask is ambiguous (an "
                            "additive mask of 0 / -inf means the opposite of a keep mask); "
                            "convert it, e.g. mask.bool() or mask == 0, as you mean it")
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
        if offsets.device != x.device and offsets.device.type != "cpu":
            raise ValueError(f"offsets is on {offsets.device} but x is on {x.device}: pass "
                             "them on x's device or on the CPU")


def _check_offsets(x, offsets):
    """The offsets' values: start at 0, never decrease, end at T. Reading them is free on the
    host, and done once per offsets tensor (``bags.derived``); on a GPU it would stall the host
    until the device catches up, so offsets on the GPU are trusted as given (the kernels never
    read outside x, whatever the offsets hold). Inside a compiled function nothing is read, so
    as not to break the graph."""
    if offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        memo = derived(offsets)
        if memo.get("checked") != x.shape[0]:
            check_offsets_values(offsets, x.shape[0])
            memo["checked"] = x.shape[0]


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
        return "triton" if x.is_cuda and triton_backend.triton_available(x) else "torch"
    if backend == "triton":
        triton_backend.require_triton(x)
    return backend


def attention_pool(x, attn_weight, gate_weight, score_weight, *, attn_bias=None, gate_bias=None,
                   score_bias=None, mask=None, offsets=None, activation="tanh", dropout_p=0.0,
                   return_attention=False, return_scores=False, recompute=None,
                   backend="auto"):
    """Gated (or plain) attention-MIL pooling of bags of instances (Ilse et al. 2018).

    Per bag ``h_1..h_N``, with ``V = attn_weight``, ``U = gate_weight``, ``w = score_weight``::

        s_k = w · (act(V h_k + attn_bias) ⊙ sigmoid(U h_k + gate_bias)) + score_bias
        a   = softmax(s) over the bag's real instances,   z = Σ_k a_k h_k

    Args:
        x: instances, in one of three layouts:
            padded ``[B, N, D]`` (with optional ``mask [B, N]``), packed ``[T, D]`` (with
            ``offsets [B+1]``), or one bag ``[N, D]`` (neither mask nor offsets).
        attn_weight: ``V``, ``[L, D]`` (``nn.Linear`` layout).
        gate_weight: ``U``, ``[L, D]``, or None for plain attention ``w · act(V h + b)``.
        score_weight: ``w``, ``[L]`` for one attention branch or ``[K, L]`` for K branches, each
            with its own softmax.
        attn_bias, gate_bias: ``[L]`` or None. score_bias: ``[K]`` (``[1]`` or ``[]`` for 1-D
            score_weight) or None; it shifts all scores of a branch equally, so it changes
            neither z nor the attention (its gradient through them is exactly zero), only the
            raw scores.
        mask: ``[B, N]``, bool or any integer dtype, True / nonzero marks real instances (padded
            layout only; default all real).
        offsets: ``[B+1]`` int32/int64, bag b is ``x[offsets[b]:offsets[b+1]]`` (packed only),
            on x's device or on the CPU (``fastmil.collate`` makes CPU offsets). CPU offsets are
            checked (start at 0, non-decreasing, end at T) at no cost to the GPU; offsets on a
            GPU are trusted as given by the triton backend, since reading them would stall the
            host (check them yourself once with ``fastmil.bags.check_offsets_values``), and
            checked by the torch backend (one sync). Inside ``torch.compile`` the value checks
            are skipped.
        activation: the attention branch's activation: ``"tanh"`` (the paper's), ``"relu"`` or
            ``"gelu"`` (exact erf form, as ``nn.GELU()``).
        dropout_p: attention dropout probability: independent dropout masks on the activation's
            and the sigmoid's outputs (plain attention: the activation's only), each scaled by
            1/(1-p), as CLAM's ``Attn_Net_Gated(dropout=True)``. Applied whenever > 0 (like
            ``F.scaled_dot_product_attention``; ``AttentionPool`` passes it in training mode
            only). Random numbers come from PyTorch's generator: ``torch.manual_seed`` makes a
            run reproducible; the backward reuses the forward's masks.
        return_attention: also return the softmax weights.
        return_scores: also return the raw (pre-softmax) scores ``s``, score bias included,
            aligned like the attention, ``-inf`` at masked slots; differentiable.
        recompute: what the backward keeps. ``True``: memory-lean, keep only the scores (4·K
            bytes per instance) and recompute the projections in backward (one more ``4·L·D``
            flop per instance). ``False``: save the projections (triton: ``p, q`` in x's dtype,
            ``2·L`` values per instance; torch: autograd's usual intermediates) and skip that
            GEMM. ``None`` (default): save (both backends; triton keeps ``2·L`` values per
            instance, less than eager PyTorch's intermediates, and the backward is faster).
            Only the backward's cost changes, never the numbers.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``z``: ``[B, D]`` (``[B, K, D]`` for 2-D score_weight; ``[D]`` / ``[K, D]`` for a single
        bag) in x's dtype, alone when neither flag is set; otherwise a tuple ``(z, attention,
        scores)`` holding the ones asked for, in that order. Attention and scores are aligned
        with x's instance axis: ``[B, N]`` / ``[B, N, K]`` padded (attention exactly 0 and
        scores ``-inf`` at masked slots), ``[T]`` / ``[T, K]`` packed, ``[N]`` / ``[N, K]``
        single, in float32 (float64 for float64 x). An empty bag pools to zeros with zero
        gradients.

    All tensors must share one dtype (float16, bfloat16, float32 or float64) and one device;
    inside ``torch.autocast`` they are cast to the autocast dtype. Accumulation is float32
    (float64 for float64 input).
    """
    _check_options(activation, dropout_p, return_attention, return_scores, recompute, backend)
    device_type = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias = _autocast(
        [x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias],
        device_type)
    args = (x, attn_weight, gate_weight, score_weight, attn_bias, gate_bias, score_bias, mask,
            offsets)
    if not _well_formed(*args):
        _validate(*args)
    if offsets is not None:
        _check_offsets(x, offsets)
    backend = _resolve_backend(backend, x)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    if offsets is not None and backend == "torch":
        if offsets.device != x.device and torch.compiler.is_compiling():
            offsets = offsets.to(x.device)
        elif offsets.device != x.device:  # on the host, and checked there already (_validate)
            memo, key = derived(offsets), ("on", x.device)
            if key not in memo:  # pinned: the copy is queued without waiting for the stream
                memo[key] = (offsets.pin_memory() if x.is_cuda else offsets).to(
                    x.device, non_blocking=True)
            offsets = memo[key]
        elif x.is_cuda and not torch.compiler.is_compiling():
            # offsets on the GPU: the torch backend's own kernels would fail (a device-side
            # assert) on bad ones, so it checks them, at one sync (the triton backend, the
            # default on CUDA, never reads outside x and needs no check)
            check_offsets_values(offsets, x.shape[0])

    single_branch = score_weight.dim() == 1
    w = score_weight[None, :] if single_branch else score_weight  # [K, L]
    single_bag = x.dim() == 2 and offsets is None
    xb = x[None] if single_bag else x  # a single bag is a padded batch of one, without mask

    impl = triton_backend.attention_pool_triton if backend == "triton" else attention_pool_torch
    # The score bias shifts every score of a branch alike, which the softmax ignores: the backends
    # leave it out of z and the attention and give it an exact zero gradient there (not rounding
    # noise that Adam would turn into steps), so that it still gets a .grad, as DDP expects.
    z, attn, scores = impl(xb, attn_weight, attn_bias, gate_weight, gate_bias, w, mask, offsets,
                           score_bias=score_bias, activation=activation,
                           dropout_p=float(dropout_p), recompute=recompute,
                           need_attention=return_attention, need_scores=return_scores)
    # z [B, K, D]; attn, scores [B, N, K] padded or [T, K] packed
    if return_scores and score_bias is not None:
        scores = scores + score_bias.reshape(-1).to(scores.dtype)
        if mask is not None:  # padded slots stay -inf, and no gradient reaches the bias there
            scores = scores.masked_fill(~mask[..., None], float("-inf"))
    outs = [z] + [t for t, flag in ((attn, return_attention), (scores, return_scores)) if flag]
    if single_bag:
        outs = [t[0] for t in outs]
    if single_branch:
        outs = [outs[0].squeeze(-2)] + [t.squeeze(-1) for t in outs[1:]]
    return outs[0] if len(outs) == 1 else tuple(outs)
