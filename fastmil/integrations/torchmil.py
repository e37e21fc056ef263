"""The torchmil drop-in: run ``torchmil.nn.attention.AttentionPool`` through fastmil.

:func:`patch_torchmil` replaces the ``forward`` of ``torchmil.nn.attention.AttentionPool`` (the
pooling of torchmil's ABMIL, CLAM, DTFDMIL, PatchGCN, TransformerABMIL, VAEABMIL …) by one that
runs :func:`fastmil.attention_pool` on the module's own parameters, with torchmil's signature
``forward(X, mask=None, return_att=False)`` and return values (``return_att=True`` gives the raw
scores ``f`` too). Parameter names, ``state_dict`` and checkpoints stay torchmil's. Calls that
fastmil cannot fuse run torchmil's own code (:func:`torchmil_fallback_reason` says why).
:func:`unpatch_torchmil` undoes it. torchmil is imported only when :func:`patch_torchmil` runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import attention_pool, check_backend
from ..module import torchmil_linear
from ..triton_backend import triton_unavailable_reason

__all__ = ["patch_torchmil", "torchmil_fallback_reason", "unpatch_torchmil"]


# torchmil's own AttentionPool.forward while the patch is applied (None when it is not), and the
# backend the patched forward passes to fastmil.attention_pool.
_patch = {"forward": None, "backend": "auto"}

# the attention branch's activation layer (torchmil's ``act``) -> fastmil's activation
_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.GELU: "gelu"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# why a still-lazy layer (torchmil's in_dim=None) is not fused, after "fc1 is still lazy (...): "
_LAZY_HINT = "torchmil's first call sets its size, later calls are fused"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _torchmil_attention_pool_class():
    from torchmil.nn.attention.attention_pool import AttentionPool

    return AttentionPool


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(getattr(nn_module, n, None) for n in names)


def _parts(pool):
    """(fc1 Linear, fc_gated Linear or None, activation name) of a torchmil AttentionPool, or a
    str saying why its structure is not the one fastmil fuses."""
    fc1 = torchmil_linear(pool.fc1, "fc1", lazy_hint=_LAZY_HINT)
    if isinstance(fc1, str):
        return fc1
    gate = None
    if pool.gated:
        gate = torchmil_linear(pool.fc_gated, "fc_gated", lazy_hint=_LAZY_HINT)
        if isinstance(gate, str):
            return gate
        if type(pool.act_gated) is not nn.Sigmoid:
            return f"act_gated is {type(pool.act_gated).__name__}, not nn.Sigmoid"
        if gate.weight.shape != fc1.weight.shape:
            return (f"fc_gated's weight has shape {tuple(gate.weight.shape)}, fc1's "
                    f"{tuple(fc1.weight.shape)}: they must match")
    act = _ACTIVATIONS.get(type(pool.act_layer))
    if act is None or (act == "gelu" and pool.act_layer.approximate != "none"):
        return (f"act_layer is {pool.act_layer!r}; fastmil fuses nn.Tanh, nn.ReLU and the exact "
                "nn.GELU")
    fc2 = pool.fc2
    if type(fc2) is not nn.Linear or fc2.out_features != 1 \
            or fc2.in_features != fc1.out_features:
        return (f"fc2 is {fc2!r}; fastmil fuses an nn.Linear({fc1.out_features}, 1) score "
                "layer")
    modules = [pool.fc1, fc1, pool.act_layer, fc2]
    if gate is not None:
        modules += [pool.fc_gated, gate, pool.act_gated]
    if _global_hooks() or any(getattr(m, d, None) for m in modules for d in _HOOK_DICTS):
        return "hooks are registered on its layers (or globally), which fastmil would bypass"
    return fc1, gate, act


def _fusable(pool, X, mask, backend):
    """The parts of :func:`_parts` when fastmil can fuse this call, else a str saying why not."""
    if not isinstance(X, torch.Tensor) or X.dim() != 3 or X.dtype not in _FLOAT_DTYPES:
        what = (f"a {X.dim()}-D {X.dtype} tensor" if isinstance(X, torch.Tensor)
                else type(X).__name__)
        return f"X must be a 3-D floating tensor [B, N, D], got {what}"
    parts = _parts(pool)
    if isinstance(parts, str):
        return parts
    fc1, gate, _ = parts
    if X.shape[-1] != fc1.in_features:
        return f"X has {X.shape[-1]} features but fc1 takes {fc1.in_features}"
    tensors = [t for m in (fc1, gate, pool.fc2) if m is not None
               for t in (m.weight, m.bias) if t is not None]
    if any(t.device != X.device for t in tensors):
        return "X and the module's parameters are on different devices"
    dtype = X.dtype  # the dtype fastmil computes in
    if torch.is_autocast_enabled(X.device.type):
        if torch.float64 in {X.dtype, *(t.dtype for t in tensors)}:
            return "float64 tensors inside torch.autocast (which leaves float64 alone)"
        dtype = torch.get_autocast_dtype(X.device.type)
    elif any(t.dtype != X.dtype for t in tensors):
        return f"X is {X.dtype} but the module's parameters are not"
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(X.shape[:2]):
            what = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            return f"mask must be a tensor of shape [B, N] = {tuple(X.shape[:2])}, got {what}"
        if mask.is_complex() or mask.device != X.device:
            return f"mask must be a real tensor on X's device, got {mask.dtype} on {mask.device}"
    if backend == "triton":
        reason = triton_unavailable_reason(X.new_empty(0, dtype=dtype))
        if reason is not None:
            return f"backend='triton' cannot run here: {reason}"
    return parts


def torchmil_fallback_reason(pool, X, mask=None, backend: str = "auto") -> str | None:
    """Why the patched torchmil ``AttentionPool`` runs torchmil's own code for this call, or None
    when fastmil fuses it.

    Args:
        pool: a ``torchmil.nn.attention.AttentionPool``.
        X: the call's bag features, padded ``[B, N, D]``.
        mask: the call's mask, ``[B, N]`` or None (bool, integer or floating; torchmil treats 0
            as padding).
        backend: the backend the fused call would use (see :func:`patch_torchmil`).
    """
    parts = _fusable(pool, X, mask, backend)
    return parts if isinstance(parts, str) else None


def _torchmil_scores(pool, rows):
    """torchmil's raw scores ``f`` of some instances ``rows [M, D]`` -> ``[M]``, computed with the
    module's own layers exactly as its forward does."""
    H = pool.act_layer(pool.fc1(rows))
    if pool.gated:
        H = H * pool.act_gated(pool.fc_gated(rows))
    return pool.fc2(H).squeeze(-1)


def _forward(self, X, mask=None, return_att=False):
    """torchmil's ``AttentionPool.forward(X, mask=None, return_att=False)``, fused by fastmil.

    X ``[B, N, D]``, mask ``[B, N]`` (0 = padding) -> ``z [B, D]``, and with ``return_att`` the raw
    scores ``f [B, N]``. Installed by :func:`fastmil.patch_torchmil`.
    """
    original = _patch["forward"]
    if original is None:  # unpatched since this forward was looked up: torchmil's own
        return _torchmil_attention_pool_class().forward(self, X, mask, return_att)
    parts = _fusable(self, X, mask, _patch["backend"])
    if isinstance(parts, str):
        return original(self, X, mask, return_att)
    fc1, gate, act = parts
    keep = None if mask is None else (mask if mask.dtype == torch.bool else mask != 0)
    out = attention_pool(
        X, fc1.weight, None if gate is None else gate.weight, self.fc2.weight[0],
        attn_bias=fc1.bias, gate_bias=None if gate is None else gate.bias,
        score_bias=self.fc2.bias, mask=keep, activation=act, return_scores=bool(return_att),
        backend=_patch["backend"])
    if not return_att:
        return out
    z, f = out
    f = f.to(z.dtype)  # torchmil's f has the dtype of its layers' output, as z does
    if keep is not None:
        # torchmil returns the scores it computed at padded slots too, and its models use them
        # (its CLAM picks instances by top-k over f, mask ignored): fill them in from the padded
        # rows alone, with torchmil's own layers, so that f and its gradient are torchmil's.
        pad = (~keep).nonzero(as_tuple=True)
        f = f.index_put(pad, _torchmil_scores(self, X[pad]).to(f.dtype))
    return z, f


def patch_torchmil(backend: str = "auto") -> None:
    """Run every ``torchmil.nn.attention.AttentionPool`` through fastmil (Liger-style).

    Patches the class's ``forward``, so it applies to modules built before and after the call and
    to every torchmil model that pools with it (ABMIL, CLAM, DTFDMIL, PatchGCN,
    TransformerABMIL, VAEABMIL …). Signature, return values, parameters and ``state_dict`` stay
    torchmil's. A call fastmil cannot fuse (a still-lazy ``in_dim``, an activation layer other
    than tanh / relu / exact gelu, hooks on the layers, input torchmil takes but fastmil does
    not …) runs torchmil's own code; :func:`torchmil_fallback_reason` says why. Calling it
    again only changes the backend. One deliberate difference: a bag whose mask is all zeros
    pools to zeros (torchmil: NaN, from a softmax over nothing).

    Args:
        backend: passed to :func:`fastmil.attention_pool` (``"auto"``: the Triton kernels for
            CUDA tensors, PyTorch otherwise).
    """
    check_backend(backend)
    cls = _torchmil_attention_pool_class()
    if _patch["forward"] is None:
        _patch["forward"] = cls.forward
        cls.forward = _forward
    _patch["backend"] = backend


def unpatch_torchmil() -> None:
    """Undo :func:`patch_torchmil`: torchmil's ``AttentionPool`` runs its own forward again.
    Does nothing when the patch is not applied."""
    if _patch["forward"] is None:
        return
    _torchmil_attention_pool_class().forward = _patch["forward"]
    _patch["forward"] = None
    _patch["backend"] = "auto"
