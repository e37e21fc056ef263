"""``fastmil.AttentionPool``: the nn.Module around :func:`fastmil.attention_pool`."""

from __future__ import annotations

import torch
from torch import nn

from .functional import BACKENDS, attention_pool

__all__ = ["AttentionPool"]


class AttentionPool(nn.Module):
    """Gated (or plain) attention-MIL pooling with learnable weights.

    Holds ``attn`` (``V``: Linear(in_dim, attn_dim)), ``gate`` (``U``: Linear(in_dim, attn_dim), or
    None when ``gated=False``) and ``score`` (``w``: Linear(attn_dim, branches or 1)).

    Args:
        in_dim: instance feature size D.
        attn_dim: attention size L.
        branches: None for one attention branch (``z [B, D]``), or K for K branches, each with its
            own softmax (``z [B, K, D]``, as CLAM's multi-branch model).
        gated: tanh ⊙ sigmoid gating (True) or plain tanh attention (False).
        bias: whether the three Linear layers carry biases.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, passed to :func:`attention_pool`.

    ``forward(x, mask=None, offsets=None, return_attention=False)`` takes the layouts of
    :func:`fastmil.attention_pool`: padded ``[B, N, D]`` + mask, packed ``[T, D]`` + offsets, or
    one bag ``[N, D]``.
    """

    def __init__(self, in_dim: int, attn_dim: int = 128, *, branches: int | None = None,
                 gated: bool = True, bias: bool = True, backend: str = "auto"):
        super().__init__()
        def positive_int(value):
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        for name, value in (("in_dim", in_dim), ("attn_dim", attn_dim)):
            if not positive_int(value):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if branches is not None and not positive_int(branches):
            raise ValueError(f"branches must be None or a positive int, got {branches!r}")
        for name, value in (("gated", gated), ("bias", bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_dim, self.attn_dim, self.branches = in_dim, attn_dim, branches
        self.backend = backend
        self.attn = nn.Linear(in_dim, attn_dim, bias=bias)
        self.gate = nn.Linear(in_dim, attn_dim, bias=bias) if gated else None
        self.score = nn.Linear(attn_dim, branches or 1, bias=bias)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def forward(self, x, mask=None, offsets=None, return_attention=False):
        score_weight = self.score.weight if self.branches is not None else self.score.weight[0]
        return attention_pool(
            x, self.attn.weight, None if self.gate is None else self.gate.weight, score_weight,
            attn_bias=self.attn.bias, gate_bias=None if self.gate is None else self.gate.bias,
            score_bias=self.score.bias, mask=mask, offsets=offsets,
            return_attention=return_attention, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, attn_dim={self.attn_dim}, branches={self.branches}, "
                f"gated={self.gated}, backend={self.backend!r}")

    @classmethod
    def _from_linears(cls, attn, gate, score, branches, **kwargs):
        # one bias flag for all three layers: a source bias that is absent becomes a zero bias
        bias = any(m is not None and m.bias is not None for m in (attn, gate, score))
        pool = cls(attn.in_features, attn.out_features, branches=branches,
                   gated=gate is not None, bias=bias, **kwargs)
        pool = pool.to(device=attn.weight.device, dtype=attn.weight.dtype)
        with torch.no_grad():
            for mine, theirs in ((pool.attn, attn), (pool.gate, gate), (pool.score, score)):
                if theirs is None:
                    continue
                mine.weight.copy_(theirs.weight)
                if mine.bias is not None:
                    if theirs.bias is None:
                        mine.bias.zero_()
                    else:
                        mine.bias.copy_(theirs.bias)
        return pool

    @classmethod
    def from_clam(cls, module: nn.Module, **kwargs) -> AttentionPool:
        """Copy the weights of CLAM's ``Attn_Net_Gated`` (``attention_a``/``attention_b``/
        ``attention_c``) or ``Attn_Net`` (``module = Sequential(Linear, Tanh, [Dropout], Linear)``).

        ``n_classes == 1`` gives one branch (``z [B, D]``), more gives that many branches. The
        result matches CLAM in eval mode (fastmil applies no dropout).
        """
        if hasattr(module, "attention_a") and hasattr(module, "attention_c"):
            attn, gate = module.attention_a[0], module.attention_b[0]
            score = module.attention_c
        elif hasattr(module, "module") and isinstance(module.module, nn.Sequential):
            layers = [m for m in module.module if isinstance(m, nn.Linear)]
            if len(layers) != 2 or not any(isinstance(m, nn.Tanh) for m in module.module):
                raise ValueError("from_clam expects Attn_Net's Sequential(Linear, Tanh, "
                                 f"[Dropout], Linear), got {module.module}")
            (attn, score), gate = layers, None
        else:
            raise TypeError("from_clam expects CLAM's Attn_Net_Gated or Attn_Net, got "
                            f"{type(module).__name__}")
        K = score.out_features
        return cls._from_linears(attn, gate, score, None if K == 1 else K, **kwargs)

    @classmethod
    def from_torchmil(cls, module: nn.Module, **kwargs) -> AttentionPool:
        """Copy the weights of torchmil's ``torchmil.nn.attention.AttentionPool`` (act='tanh')."""
        if getattr(module, "act", None) != "tanh":
            raise ValueError("from_torchmil supports torchmil AttentionPool with act='tanh', got "
                             f"act={getattr(module, 'act', None)!r}")

        def linear(m):  # torchmil wraps nn.Linear in its own LazyLinear(module=...)
            m = getattr(m, "module", m)
            if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
                raise ValueError("the torchmil module is still lazy (in_dim=None): run it once "
                                 "or build it with in_dim before converting")
            return m

        gate = linear(module.fc_gated) if module.gated else None
        return cls._from_linears(linear(module.fc1), gate, module.fc2, None, **kwargs)
