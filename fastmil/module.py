"""``fastmil.AttentionPool``: the nn.Module around :func:`fastmil.attention_pool`."""

from __future__ import annotations

import torch
from torch import nn

from .functional import attention_pool, check_options
from .reference import ACTIVATIONS
from .triton_backend import is_one_block

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
        activation: the attention branch's activation, ``"tanh"``, ``"relu"`` or ``"gelu"``.
        dropout: attention dropout probability, applied in training mode only (CLAM's
            ``dropout=True`` is 0.25): independent masks on the activation's and the sigmoid's
            outputs.
        recompute: what the backward keeps (see :func:`attention_pool`): None picks per
            backend, True is memory-lean (for bags of millions of instances), False saves the
            projections.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``, passed to :func:`attention_pool`.

    ``forward(x, mask=None, offsets=None, return_attention=False, return_scores=False)`` takes
    the layouts of :func:`fastmil.attention_pool`: padded ``[B, N, D]`` + mask, packed
    ``[T, D]`` + offsets, or one bag ``[N, D]``, and returns ``z``, or a tuple of ``z``, the
    attention and the raw scores (those asked for, in that order).
    """

    def __init__(self, in_dim: int, attn_dim: int = 128, *, branches: int | None = None,
                 gated: bool = True, bias: bool = True, activation: str = "tanh",
                 dropout: float = 0.0, recompute: bool | None = None, backend: str = "auto"):
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
        check_options(backend=backend, activation=activation, dropout=dropout,
                      recompute=recompute, dropout_name="dropout")
        self.in_dim, self.attn_dim, self.branches = in_dim, attn_dim, branches
        self.activation, self.dropout, self.recompute = activation, float(dropout), recompute
        self.backend = backend
        self.attn = nn.Linear(in_dim, attn_dim, bias=bias)
        self.gate = nn.Linear(in_dim, attn_dim, bias=bias) if gated else None
        self.score = nn.Linear(attn_dim, branches or 1, bias=bias)
        self._stack_attn_and_gate()
        self.register_load_state_dict_post_hook(_restack)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def _stack_attn_and_gate(self):
        """Lay ``attn.weight`` and ``gate.weight`` out as one block of memory ``[V; U]``
        (and their biases likewise), so that the Triton backend reads them as one ``[2L, D]``
        matrix instead of concatenating them on every call. They stay two parameters, with their
        own gradients and version counters; only their storage is shared. Kept after
        ``.to()``, ``.cuda()``, ``.half()`` and ``load_state_dict``."""
        if self.gate is None:
            return
        for name in ("weight", "bias"):
            a, g = getattr(self.attn, name), getattr(self.gate, name)
            if a is None or g is None or a.shape != g.shape or a.dtype != g.dtype \
                    or a.device != g.device:
                continue
            if is_one_block(a, g):  # already as the Triton backend reads them in place
                continue
            with torch.no_grad():
                block = torch.cat([a, g])
                a.data, g.data = block[:len(a)], block[len(a):]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._stack_attn_and_gate()
        return self

    def __setstate__(self, state):  # copy.deepcopy and pickle
        super().__setstate__(state)
        self._stack_attn_and_gate()

    def forward(self, x, mask=None, offsets=None, return_attention=False, return_scores=False):
        # one branch: w [L] as a view (its backward is free; weight[0]'s would launch a copy)
        score_weight = self.score.weight if self.branches is not None else \
            self.score.weight.view(-1)
        return attention_pool(
            x, self.attn.weight, None if self.gate is None else self.gate.weight, score_weight,
            attn_bias=self.attn.bias, gate_bias=None if self.gate is None else self.gate.bias,
            score_bias=self.score.bias, mask=mask, offsets=offsets, activation=self.activation,
            dropout_p=self.dropout if self.training else 0.0, return_attention=return_attention,
            return_scores=return_scores, recompute=self.recompute, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, attn_dim={self.attn_dim}, branches={self.branches}, "
                f"gated={self.gated}, activation={self.activation!r}, dropout={self.dropout}, "
                f"backend={self.backend!r}")

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

        ``n_classes == 1`` gives one branch (``z [B, D]``), more gives that many branches. CLAM's
        attention dropout (``dropout=True``: p = 0.25 after the tanh and after the sigmoid) is
        carried over. The result matches CLAM in eval mode to float32 rounding. In training
        mode the torch backend on CPU draws CLAM's own masks after the same
        ``torch.manual_seed``; the triton backend draws other masks (Philox) from the same
        distribution. fastmil's own CLAM models are in :mod:`fastmil.integrations.clam`.
        """
        if hasattr(module, "attention_a") and hasattr(module, "attention_c"):
            attn, gate = module.attention_a[0], module.attention_b[0]
            score = module.attention_c
            branch = module.attention_a
        elif hasattr(module, "module") and isinstance(module.module, nn.Sequential):
            layers = [m for m in module.module if isinstance(m, nn.Linear)]
            if len(layers) != 2 or not any(isinstance(m, nn.Tanh) for m in module.module):
                raise ValueError("from_clam expects Attn_Net's Sequential(Linear, Tanh, "
                                 f"[Dropout], Linear), got {module.module}")
            (attn, score), gate = layers, None
            branch = module.module
        else:
            raise TypeError("from_clam expects CLAM's Attn_Net_Gated or Attn_Net, got "
                            f"{type(module).__name__}")
        drops = [m.p for m in branch if isinstance(m, nn.Dropout)]
        kwargs.setdefault("dropout", drops[0] if drops else 0.0)
        K = score.out_features
        return cls._from_linears(attn, gate, score, None if K == 1 else K, **kwargs)

    @classmethod
    def from_torchmil(cls, module: nn.Module, **kwargs) -> AttentionPool:
        """Copy the weights of torchmil's ``torchmil.nn.attention.AttentionPool`` (its
        activation ``act`` included)."""
        act = getattr(module, "act", None)
        if act not in ACTIVATIONS:
            raise ValueError(f"from_torchmil supports torchmil AttentionPool with act in "
                             f"{tuple(ACTIVATIONS)}, got act={act!r}")
        kwargs.setdefault("activation", act)

        def linear(name):
            found = torchmil_linear(getattr(module, name), name, lazy_hint=(
                "run it once or build it with in_dim before converting"))
            if isinstance(found, str):
                raise ValueError(f"from_torchmil: the torchmil module's {found}")
            return found

        attn = linear("fc1")
        gate = linear("fc_gated") if module.gated else None
        return cls._from_linears(attn, gate, module.fc2, None, **kwargs)


def torchmil_linear(layer: nn.Module, name: str, *, lazy_hint: str) -> nn.Linear | str:
    """The nn.Linear that computes torchmil's layer ``name`` (``layer``), or a str saying why it
    cannot be read off: still lazy (then the str ends in ``lazy_hint``), or no plain nn.Linear.

    torchmil's ``LazyLinear`` is no lazy module itself: it wraps an nn.Linear, or, when built with
    ``in_dim=None``, torch's ``nn.LazyLinear``, as ``.module``. That one turns into an nn.Linear on
    its first call; until then it is lazy, even once a state dict has given it weights (its
    ``in_features`` is still 0). The one place that unwraps it: :meth:`AttentionPool.from_torchmil`
    raises the str, :mod:`fastmil.compat` falls back to torchmil's forward with it.
    """
    try:
        from torchmil.nn.utils import LazyLinear
    except ImportError:  # no torchmil, so no torchmil LazyLinear either
        LazyLinear = None
    linear = layer.module if LazyLinear is not None and type(layer) is LazyLinear else layer
    if isinstance(linear, nn.modules.lazy.LazyModuleMixin):
        return f"{name} is still lazy (in_dim=None): {lazy_hint}"
    if type(linear) is not nn.Linear:
        return f"{name} is a {type(layer).__name__}, not torchmil's LazyLinear or an nn.Linear"
    return linear


def _restack(module: AttentionPool, incompatible_keys) -> None:
    """After ``load_state_dict`` (which may assign new tensors): [V; U] in one block again."""
    module._stack_attn_and_gate()
