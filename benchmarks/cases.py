"""The benchmark shapes (the suites, here), the workloads, the cost model and the input builder.

Every case is a batch of bags with fixed lengths. ``T`` counts real instances only: the FLOP and
byte counts, and so the roofline floor, are those of the useful work; padded providers also pay
for their padding, which is part of what they cost.

All cases use gated attention with biases on V and U and no score bias (it changes nothing).

Modes (what one timed call does), grouped by workload:

* end-to-end (x requires grad, as when an encoder trains with the pooling): ``fwd`` (the training
  forward, graph recorded), ``bwd`` (backward alone), ``fwd_bwd``;
* frozen features (x does not require grad, the weights do: pre-extracted whole-slide features):
  ``frozen`` = forward + backward;
* inference: ``infer`` = forward under ``torch.no_grad()`` with ``return_attention=True``.

Cost model, per instance (``D`` features, attention size ``L``, ``K`` branches)::

    projections  P = 4·L·D   (V and U)
    scores       S = 2·L·K   (w · hidden)
    pooling      A = 2·D·K   (z = Σ a_k h_k)
    forward  flops = P + S + A
    backward flops = 2·P (dh and dV/dU) + P (recompute of p and q, as the fused kernel does)
                     + 2·S + 2·A
    frozen backward flops = P (dV/dU) + P (recompute) + 2·S + A   (no dh)
    forward  bytes = x once + weights + z           (inference: + the fp32 attention written)
    backward bytes = x once + dx once + weights + their gradients + dz   (frozen: no dx)

Elementwise work (tanh, sigmoid, exp) is not counted.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Case", "FULL_CASES", "SMOKE_CASES", "MODES", "E2E_MODES", "SUITES", "SUITE_PROVIDERS",
           "InputSet",
           "Weights", "all_cases", "get_case", "make_inputs", "n_input_sets", "suite"]

E2E_MODES = ("fwd", "bwd", "fwd_bwd")  # end-to-end: x requires grad
MODES = E2E_MODES + ("frozen", "infer")  # + frozen features (fwd+bwd), inference (fwd)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _draw_lengths(n: int, lo: int, hi: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randint(lo, hi) for _ in range(n))


def _count(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # "wsi" | "batched" | "mnist" | "multibranch"
    lengths: tuple[int, ...] = field(repr=False)
    D: int
    L: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    K: int = 1  # attention branches; K == 1 uses a 1-D score_weight [L]
    smoke: bool = False
    compile_on_cpu: bool = False  # the smoke cases where torch.compile runs on CPU
    # the shape a target of the report is defined on (report.TARGETS); a smoke stand-in carries
    # the role of the shape it stands for
    role: str | None = None

    @property
    def B(self) -> int:
        return len(self.lengths)

    @property
    def T(self) -> int:
        return sum(self.lengths)

    @property
    def N(self) -> int:  # longest bag = padded length
        return max(self.lengths)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def n_weights(self) -> int:
        """Elements of V, U, their biases and w (score bias excluded: it changes nothing)."""
        return 2 * self.L * self.D + 2 * self.L + self.K * self.L

    def flops(self, mode: str) -> float:
        T, D, L, K = self.T, self.D, self.L, self.K
        P = 4 * L * D * T
        S = 2 * L * K * T
        A = 2 * D * K * T
        fwd = P + S + A
        bwd = 3 * P + 2 * S + 2 * A
        frozen_bwd = 2 * P + 2 * S + A
        return float({"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd, "frozen": fwd + frozen_bwd,
                      "infer": fwd}[mode])

    def bytes(self, mode: str) -> float:
        e, W, Z = self.itemsize, self.n_weights, self.B * self.K * self.D
        x = self.T * self.D
        fwd = e * (x + W + Z)
        bwd = e * (2 * x + 2 * W + Z)
        frozen_bwd = e * (x + 2 * W + Z)
        attention = 4 * self.T * self.K  # float32, inference returns it
        return float({"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd, "frozen": fwd + frozen_bwd,
                      "infer": fwd + attention}[mode])

    def describe(self) -> str:
        if self.B == 1:
            bags = f"B=1, N={self.N:,}"
        else:
            bags = (f"B={self.B}, lengths {min(self.lengths):,}–{max(self.lengths):,} "
                    f"(T={self.T:,}, padded N={self.N:,})")
        branches = f", K={self.K}" if self.K > 1 else ""
        return f"{bags}, D={self.D}, L={self.L}{branches}, {self.dtype}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["lengths"] = list(self.lengths)
        d.update(B=self.B, T=self.T, N=self.N, describe=self.describe())
        return d


def _full_cases() -> list[Case]:
    cases = []
    roles = {(100_000, 1024, "bf16"): "wsi-100k-d1024", (100_000, 1536, "bf16"): "wsi-100k-d1536"}
    for dtype in ("bf16", "fp32"):  # whole-slide images, one bag per step
        for D in (1024, 1536):
            for N in (10_000, 100_000, 1_000_000):
                cases.append(Case(f"wsi-n{_count(N)}-d{D}-{dtype}", "wsi", (N,), D, 256, dtype,
                                  role=roles.get((N, D, dtype))))
    lengths = _draw_lengths(8, 2_000, 50_000, seed=0)  # batched slides, packed / padded
    cases.append(Case("batched-8x2k-50k-d1024-bf16", "batched", lengths, 1024, 256, "bf16",
                      role="batched"))
    lengths = _draw_lengths(512, 5, 15, seed=0)  # MNIST-bags (Ilse et al. 2018)
    cases.append(Case("mnist-512x5-15-d500-fp32", "mnist", lengths, 500, 128, "fp32",
                      role="mnist"))
    cases.append(Case("multibranch-k4-n100k-d1024-bf16", "multibranch", (100_000,), 1024, 256,
                      "bf16", K=4))  # CLAM_MB-style
    return cases


def _smoke_cases() -> list[Case]:
    """Tiny stand-ins for each group, for CI on CPU (MNIST-bags is small enough to keep)."""
    cases = [Case(f"smoke-wsi-n{_count(N)}-d64-fp32", "wsi", (N,), 64, 32, "fp32", smoke=True,
                  compile_on_cpu=(N == 2048), role="wsi-100k-d1024" if N == 512 else None)
             for N in (512, 2048, 8192)]
    cases.append(Case("smoke-wsi-n2048-d64-bf16", "wsi", (2048,), 64, 32, "bf16", smoke=True))
    cases.append(Case("smoke-batched-8x64-1k-d64-bf16", "batched",
                      _draw_lengths(8, 64, 1024, seed=0), 64, 32, "bf16", smoke=True,
                      role="batched"))
    cases.append(Case("smoke-mnist-512x5-15-d500-fp32", "mnist",
                      _draw_lengths(512, 5, 15, seed=0), 500, 128, "fp32", smoke=True,
                      role="mnist"))
    cases.append(Case("smoke-multibranch-k4-n2048-d64-bf16", "multibranch", (2048,), 64, 32,
                      "bf16", K=4, smoke=True))
    return cases


def _dry_run_cases() -> list[Case]:
    """CPU stand-ins of the GPU check's shapes (benchmarks/gpu_check.sh --dry-run): small enough
    for Triton's interpreter, which has no bfloat16 (fp16 stands in)."""
    return [
        Case("dry-wsi-n2048-d64-fp16", "wsi", (2048,), 64, 32, "fp16", smoke=True,
             compile_on_cpu=True, role="wsi-100k-d1024"),
        Case("dry-mnist-64x5-15-d64-fp32", "mnist", _draw_lengths(64, 5, 15, seed=0), 64, 32,
             "fp32", smoke=True, compile_on_cpu=True, role="mnist"),
        Case("dry-wsi-n2048-d96-fp16", "wsi", (2048,), 96, 32, "fp16", smoke=True,
             compile_on_cpu=True, role="wsi-100k-d1536"),
        Case("dry-batched-4x64-512-d64-fp16", "batched", _draw_lengths(4, 64, 512, seed=0), 64,
             32, "fp16", smoke=True, compile_on_cpu=True, role="batched"),
    ]


FULL_CASES: list[Case] = _full_cases()
SMOKE_CASES: list[Case] = _smoke_cases()
DRY_RUN_CASES: list[Case] = _dry_run_cases()


def _by_role(cases: list[Case], role: str) -> Case:
    return next(c for c in cases if c.role == role)


def _gpu_check(cases: list[Case]) -> list[tuple[Case, tuple[str, ...]]]:
    """The GPU check's shapes, each in the workload its target is defined on (report.TARGETS),
    most important first (a run that hits its time budget loses the last ones)."""
    return [(_by_role(cases, "wsi-100k-d1024"), ("frozen",)),
            (_by_role(cases, "mnist"), ("fwd_bwd",)),
            (_by_role(cases, "wsi-100k-d1536"), ("infer",)),
            (_by_role(cases, "batched"), ("frozen",))]


def _smoke_suite() -> list[tuple[Case, tuple[str, ...]]]:
    # frozen features and inference on two cases only (neither compiles on CPU), to keep CI's
    # smoke run short
    more = {"smoke-wsi-n512-d64-fp32": ("frozen", "infer"), "smoke-mnist-512x5-15-d500-fp32":
            ("frozen", "infer")}
    return [(c, E2E_MODES + more.get(c.name, ())) for c in SMOKE_CASES]


# suite name -> [(case, modes)], in the order they run (case-major)
SUITES: dict[str, list[tuple[Case, tuple[str, ...]]]] = {
    "full": [(c, MODES) for c in FULL_CASES],
    "smoke": _smoke_suite(),
    "gpu-check": _gpu_check(FULL_CASES),
    "dry-run": _gpu_check(DRY_RUN_CASES),
}


# the providers a suite runs (default: all); the GPU check compares fastmil with the baselines
# of its targets only (no max-autotune compile: minutes per shape)
SUITE_PROVIDERS = {p: ("fastmil_triton", "fastmil_triton_save", "fastmil_triton_cublas",
                       "fastmil_triton_cublas_recompute", "fastmil_triton_cublas_fma",
                       "fastmil_triton_cublas_16sm",
                       "fastmil_torch", "eager",
                       "compile_default", "fastmil_triton_graph", "eager_graph")
                   for p in ("gpu-check", "dry-run")}


def suite(name: str) -> list[tuple[Case, tuple[str, ...]]]:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; one of {sorted(SUITES)}")
    return SUITES[name]


def all_cases() -> dict[str, Case]:
    return {c.name: c for c in FULL_CASES + SMOKE_CASES + DRY_RUN_CASES}


def get_case(name: str) -> Case:
    return all_cases()[name]


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Weights:
    """Shared leaves: V, U [L, D], their biases [L], w [L] (K == 1) or [K, L]."""
    V: torch.Tensor
    U: torch.Tensor
    bV: torch.Tensor
    bU: torch.Tensor
    w: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        return [self.V, self.U, self.bV, self.bU, self.w]


@dataclass
class InputSet:
    """One set of instances in every layout a provider may want. Layouts are converted here,
    outside the timed region; ``x`` is a leaf that requires grad, except in the set that
    :meth:`frozen` returns (the same storage, detached: frozen features)."""
    case: Case
    x: torch.Tensor  # packed [T, D]
    offsets: torch.Tensor  # [B+1] int64
    seg: torch.Tensor  # [T] int64 bag index of every row (PyG's `batch`)
    dz: torch.Tensor  # [B, K, D] upstream gradient
    _padded: tuple | None = None
    _source: InputSet | None = None  # the set this frozen set detaches
    _frozen: InputSet | None = None
    _host_offsets: torch.Tensor | None = None

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, N, D]`` leaf and ``mask [B, N]`` (None for one bag: no padding)."""
        if self._padded is None:
            if self._source is not None:  # share the padded copy of the set this one detaches
                xp, mask = self._source.padded()
                xp = xp.detach()
            elif self.case.B == 1:  # a view of the packed storage, no copy
                xp, mask = self.x.detach()[None].requires_grad_(), None
            else:
                from fastmil.bags import pad

                xp, mask = pad(self.x.detach(), self.offsets)
                xp.requires_grad_()
            self._padded = (xp, mask)
        return self._padded

    def host_offsets(self) -> torch.Tensor:
        """The offsets on the host, as ``fastmil.collate`` makes them (copied once, cached)."""
        if self._host_offsets is None:
            self._host_offsets = self.offsets.cpu()
        return self._host_offsets

    def frozen(self) -> InputSet:
        """The same instances as frozen features: x (and its padded form) without grad."""
        if self._source is not None:
            return self
        if self._frozen is None:
            self._frozen = InputSet(self.case, self.x.detach(), self.offsets, self.seg, self.dz,
                                    _source=self)
        return self._frozen

    def leaves(self) -> list[torch.Tensor]:
        out = [self.x]
        if self._padded is not None:
            out.append(self._padded[0])
        return out

    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()


def n_input_sets(case: Case, device: torch.device) -> int:
    """Rotate over several input sets so that caches flatter no one (the CUDA timer also
    flushes L2 before every call); one set once x passes 256 MiB."""
    if device.type != "cuda":
        return 2
    x_bytes = case.T * case.D * case.itemsize
    return max(1, min(4, (256 << 20) // max(x_bytes, 1)))


def make_inputs(case: Case, device: torch.device, n_sets: int, seed: int = 0
                ) -> tuple[Weights, list[InputSet]]:
    dtype = case.torch_dtype
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)
        return (t * scale).to(dtype).requires_grad_()

    D, L, K = case.D, case.L, case.K
    weights = Weights(V=randn(L, D, scale=D ** -0.5), U=randn(L, D, scale=D ** -0.5),
                      bV=randn(L, scale=0.1), bU=randn(L, scale=0.1),
                      w=randn(L, scale=L ** -0.5) if K == 1 else randn(K, L, scale=L ** -0.5))
    lengths = torch.tensor(case.lengths, dtype=torch.int64)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)
    seg = torch.repeat_interleave(torch.arange(case.B), lengths).to(device)
    sets = []
    for _ in range(n_sets):
        x = randn(case.T, D)
        dz = randn(case.B, K, D).detach()
        sets.append(InputSet(case, x, offsets, seg, dz))
    return weights, sets
