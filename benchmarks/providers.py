"""The providers: one builder per way of computing attention-MIL pooling.

A builder takes ``(case, weights, device, interpret)`` and returns a :class:`Provider` whose
``fn(inputs, attention=False)`` maps an :class:`~benchmarks.cases.InputSet` to ``z`` (any shape
with ``B·K·D`` elements in ``[B, K, D]`` order), or to ``(z, attention)`` when ``attention`` is
True (the inference workload; ``Provider.infer`` is False where a provider cannot). It raises
:class:`Unavailable` with a reason when the provider cannot run here (package missing, no GPU,
unsupported case). Layout conversion happens in the InputSet, outside the timed region: fastmil
gets its native layout (one bag ``[N, D]``, or packed ``[T, D]`` + offsets on the host, as
``fastmil.collate`` makes them; the CUDA-graph providers take them on the GPU, which a capture
needs), the padded formulations get ``[B, N, D]`` + mask, PyG gets packed rows + a bag index.

``interpret=True`` (the GPU check's CPU dry run) lets fastmil's Triton providers run in Triton's
interpreter on CPU tensors (``TRITON_INTERPRET=1``); otherwise they are GPU-only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cases import Case, InputSet, Weights
from .report import PROVIDERS

__all__ = ["PROVIDERS", "Provider", "Unavailable", "build_provider"]


class Unavailable(Exception):
    """The provider cannot run for this case on this machine (the message says why)."""


@dataclass
class Provider:
    name: str
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    params: list[torch.Tensor] = field(default_factory=list)  # own leaves (module parameters)
    uses_padded: bool = False
    info: dict = field(default_factory=dict)  # warm-up time, accuracy, memory (harness)
    infer: str | None = None  # why fn cannot return the attention (None: it can)


# ------------------------------------------------------------------------------------ fastmil

# The fastmil columns: (projection, recompute) each times, named outright rather than left to
# the library's defaults, so that a column means the same at every commit: the projection from
# one cuBLAS GEMM (True; the default since 2026-11-26) or inside the fused kernel (False), and
# recompute (True: only the scores kept for the backward). fastmil torch runs its defaults.
FASTMIL_VARIANTS = {"fastmil_triton": (False, True), "fastmil_triton_save": (False, False),
                    "fastmil_triton_cublas": (True, False),
                    "fastmil_triton_cublas_recompute": (True, True),
                    "fastmil_triton_cublas_fma": (True, False),
                    "fastmil_triton_cublas_16sm": (True, False),
                    "fastmil_torch": (None, None)}
# Other switches of the kernel module a column sets (the others keep the module's defaults):
# "fastmil_triton_cublas_fma" is the default path with the forward's one-branch weighted sum by
# FMA in registers instead of tl.dot (DOT_WEIGHTED_SUM = False), "fastmil_triton_cublas_16sm"
# with chunks for 16 programs per SM instead of 4 (PROGRAMS_PER_SM), each to time against the
# default.
KERNEL_FLAGS = {"fastmil_triton_cublas_fma": {"DOT_WEIGHTED_SUM": False},
                "fastmil_triton_cublas_16sm": {"PROGRAMS_PER_SM": 16}}


def recompute_option(name: str) -> dict:
    """``{"recompute": ...}`` of a fastmil column (``{}``: the backend's default)."""
    recompute = FASTMIL_VARIANTS[name][1]
    return {} if recompute is None else {"recompute": recompute}


@contextlib.contextmanager
def kernel_design(name: str):
    """While the block runs, fastmil's kernels take their projections as the column ``name``
    says (the kernel module's CUBLAS_PROJECTION) and its other switches (KERNEL_FLAGS); nothing
    changes for fastmil torch."""
    cublas = FASTMIL_VARIANTS.get(name, (None, None))[0]
    if cublas is None:
        yield
        return
    from fastmil.kernels import attention_pool as kernels

    flags = {"CUBLAS_PROJECTION": cublas, **KERNEL_FLAGS.get(name, {})}
    before = {k: getattr(kernels, k) for k in flags}
    for k, v in flags.items():
        setattr(kernels, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(kernels, k, v)


def _fastmil(name: str):
    backend = name.split("_")[1]

    def build(case: Case, W: Weights, device: torch.device, interpret: bool = False
              ) -> Provider:
        import fastmil
        from fastmil import triton_backend as ops

        if backend == "triton":
            if device.type != "cuda" and not interpret:
                raise Unavailable("fastmil triton is GPU-only (CUDA tensors); this column is "
                                  "measured on CUDA machines")
            probe = torch.empty(1, device=device, dtype=case.torch_dtype)
            try:
                reason = ops.triton_unavailable_reason(probe)
            except NotImplementedError as e:
                raise Unavailable(f"fastmil backend='triton' not implemented: {e}") from e
            if reason is not None:
                raise Unavailable(f"fastmil backend='triton' cannot run here: {reason}")
        options = recompute_option(name)

        def fn(s: InputSet, attention: bool = False):
            offsets = None if case.B == 1 else s.host_offsets()  # as fastmil.collate gives
            with kernel_design(name):  # the backward makes p and q as its forward did
                return fastmil.attention_pool(s.x, W.V, W.U, W.w, attn_bias=W.bV,
                                              gate_bias=W.bU, offsets=offsets,
                                              return_attention=attention, backend=backend,
                                              **options)

        return Provider(name, fn)

    return build


# ------------------------------------------------------------------------------ CUDA graphs

def _graphed(name: str):
    """fastmil triton (``fastmil_triton_graph``) or the eager formulation (``eager_graph``)
    with forward and backward captured once in CUDA graphs (``torch.cuda.make_graphed_callables``)
    and replayed: an end-to-end step with no host work per kernel, the bound of what graphs do
    for a launch-bound call. MNIST-bags only (the launch-bound target), x with grad. The inputs
    are copied into the graph's static buffers and z out of it (a few small copies more)."""

    def build(case: Case, W: Weights, device: torch.device, interpret: bool = False
              ) -> Provider:
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA GPU")
        if case.group != "mnist":
            raise Unavailable("CUDA-graph replay is timed on the launch-bound MNIST-bags shape "
                              "only")
        leaves = W.leaves()  # V, U, bV, bU, w
        eager = name == "eager_graph"
        state: dict = {}

        def pool(x, V, U, bV, bU, w, layout):
            if eager:
                from benchmarks.eager import eager_attention_pool

                return eager_attention_pool(x, V, U, w, attn_bias=bV, gate_bias=bU, mask=layout)
            import fastmil

            return fastmil.attention_pool(x, V, U, w, attn_bias=bV, gate_bias=bU,
                                          offsets=layout, backend="triton")

        def fn(s: InputSet, attention: bool = False):
            x, layout = s.padded() if eager else (s.x, s.offsets)  # offsets on the GPU
            if attention or not x.requires_grad:
                raise NotImplementedError("the CUDA graphs are captured for end-to-end "
                                          "training (x with grad, no attention returned)")
            if "graphed" not in state:  # warm-up and capture: in the harness's untimed warm-up
                # fresh leaves: tensors that earlier calls used on the default stream carry
                # autograd nodes bound to it, which a backward capture on the side stream must
                # not touch ("operation would make the legacy stream depend on a capturing
                # blocking stream"); the graphed callable copies the real inputs in per call
                sample = [t.detach().clone().requires_grad_(t.requires_grad)
                          for t in (x, *leaves)]
                state["graphed"] = torch.cuda.make_graphed_callables(
                    pool, (*sample, layout), allow_unused_input=True)
            return state["graphed"](x, *leaves, layout).clone()  # z lives in a static buffer

        return Provider(name, fn, uses_padded=eager,
                        infer="captured for training only (x with grad)")

    return build


# ------------------------------------------------------------------------- eager and compile

def _eager_fn(pool, W: Weights):
    def fn(s: InputSet, attention: bool = False):
        xp, mask = s.padded()
        return pool(xp, W.V, W.U, W.w, attn_bias=W.bV, gate_bias=W.bU, mask=mask,
                    return_attention=attention)

    return fn


def _eager(case: Case, W: Weights, device: torch.device, interpret: bool = False) -> Provider:
    from benchmarks.eager import eager_attention_pool

    return Provider("eager", _eager_fn(eager_attention_pool, W), uses_padded=True)


def _raise_recompile_limits() -> None:
    """Every case is a new static shape: keep dynamo from falling back to eager after 8."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))


def _compiled(mode: str | None, name: str):
    def build(case: Case, W: Weights, device: torch.device, interpret: bool = False
              ) -> Provider:
        from benchmarks.eager import eager_attention_pool

        if device.type == "cpu":
            if mode is not None:
                raise Unavailable(f"torch.compile(mode={mode!r}) autotunes far too slowly on "
                                  "CPU for the smoke run; it runs on CUDA")
            if not case.compile_on_cpu:
                raise Unavailable("torch.compile runs on few smoke cases only on CPU (compile "
                                  "takes ~20 s per shape on 2 cores)")
        _raise_recompile_limits()
        # dynamic=False: each case is specialised to its shapes, as a user with fixed bag
        # sizes would get; compilation happens in the untimed warm-up.
        pool = torch.compile(eager_attention_pool, mode=mode, dynamic=False)
        return Provider(name, _eager_fn(pool, W), uses_padded=True)

    return build


# -------------------------------------------------------------------------------- torchmil

def _torchmil(case: Case, W: Weights, device: torch.device, interpret: bool = False
              ) -> Provider:
    try:
        from torchmil.nn.attention import AttentionPool
    except ImportError as e:
        raise Unavailable(f"torchmil is not installed ({e})") from e
    if case.K != 1:
        raise Unavailable(f"torchmil's AttentionPool has one attention branch (case has "
                          f"K={case.K})")
    pool = AttentionPool(in_dim=case.D, att_dim=case.L, act="tanh", gated=True)
    pool = pool.to(device=device, dtype=case.torch_dtype)

    def linear(m):  # torchmil wraps nn.Linear in its own LazyLinear(module=...)
        return getattr(m, "module", m)

    with torch.no_grad():
        linear(pool.fc1).weight.copy_(W.V)
        linear(pool.fc1).bias.copy_(W.bV)
        linear(pool.fc_gated).weight.copy_(W.U)
        linear(pool.fc_gated).bias.copy_(W.bU)
        pool.fc2.weight.copy_(W.w.reshape(1, -1))

    def fn(s: InputSet, attention: bool = False):
        xp, mask = s.padded()
        return pool(xp, mask=mask, return_att=attention)  # attention: its raw scores

    return Provider("torchmil", fn, params=list(pool.parameters()), uses_padded=True)


# ------------------------------------------------------------------------ PyTorch Geometric

class _GatedScore(torch.nn.Module):
    """``h -> w · (tanh(V h + b_V) ⊙ sigmoid(U h + b_U))``, [T, D] -> [T, K], on the shared
    weight leaves (held as plain attributes, not Parameters)."""

    def __init__(self, W: Weights):
        super().__init__()
        self.W = W

    def forward(self, x):
        W = self.W
        hidden = torch.tanh(F.linear(x, W.V, W.bV)) * torch.sigmoid(F.linear(x, W.U, W.bU))
        return F.linear(hidden, W.w.reshape(-1, W.w.shape[-1]))


def _pyg(case: Case, W: Weights, device: torch.device, interpret: bool = False) -> Provider:
    try:
        from torch_geometric.nn.aggr import AttentionalAggregation
        from torch_geometric.utils import scatter
        from torch_geometric.utils import softmax as segment_softmax
    except ImportError as e:
        raise Unavailable(f"torch_geometric is not installed ({e})") from e
    score = _GatedScore(W)
    B = case.B
    if case.K == 1:  # the library's own module: softmax by `index`, then a scatter-sum
        aggr = AttentionalAggregation(gate_nn=score)

        def fn(s: InputSet, attention: bool = False) -> torch.Tensor:
            return aggr(s.x, index=s.seg, dim_size=B)  # [B, D]
    else:  # AttentionalAggregation takes one gate column: the same recipe, K columns
        def fn(s: InputSet, attention: bool = False) -> torch.Tensor:
            a = segment_softmax(score(s.x), s.seg, num_nodes=B, dim=0)  # [T, K]
            return scatter(a[:, :, None] * s.x[:, None, :], s.seg, dim=0, dim_size=B,
                           reduce="sum")  # [B, K, D]

    return Provider("pyg", fn, infer="PyG's AttentionalAggregation does not return the "
                                   "attention weights")


# ---------------------------------------------------------------------------------- registry

_BUILDERS = {
    "fastmil_triton": _fastmil("fastmil_triton"),
    "fastmil_triton_save": _fastmil("fastmil_triton_save"),
    "fastmil_triton_cublas": _fastmil("fastmil_triton_cublas"),
    "fastmil_triton_cublas_recompute": _fastmil("fastmil_triton_cublas_recompute"),
    "fastmil_triton_cublas_fma": _fastmil("fastmil_triton_cublas_fma"),
    "fastmil_triton_cublas_16sm": _fastmil("fastmil_triton_cublas_16sm"),
    "fastmil_triton_graph": _graphed("fastmil_triton_graph"),
    "eager_graph": _graphed("eager_graph"),
    "fastmil_torch": _fastmil("fastmil_torch"),
    "eager": _eager,
    "compile_default": _compiled(None, "compile_default"),
    "compile_max_autotune": _compiled("max-autotune-no-cudagraphs", "compile_max_autotune"),
    "torchmil": _torchmil,
    "pyg": _pyg,
}
# the provider names and their order live in report.py, which must import without torch
assert set(_BUILDERS) == set(PROVIDERS), "report.PROVIDERS and the builders disagree"


def build_provider(name: str, case: Case, W: Weights, device: torch.device, *,
                   interpret: bool = False) -> Provider:
    return _BUILDERS[name](case, W, device, interpret)
