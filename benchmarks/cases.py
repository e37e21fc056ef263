"""The benchmark shapes (one list, here), the cost model and the input builder.

Every case is a batch of bags with fixed lengths. ``T`` counts real instances only: the FLOP and
byte counts, and so the roofline floor, are those of the useful work; padded providers also pay
for their padding, which is part of what they cost.

All cases use gated attention with biases on V and U and no score bias (it changes nothing).

Cost model, per instance (``D`` features, attention size ``L``, ``K`` branches)::

    projections  P = 4·L·D   (V and U)
    scores       S = 2·L·K   (w · hidden)
    pooling      A = 2·D·K   (z = Σ a_k h_k)
    forward  flops = P + S + A
    backward flops = 2·P (dh and dV/dU) + P (recompute of p and q, as the fused kernel does)
                     + 2·S + 2·A
    forward  bytes = x once + weights + z
    backward bytes = x once + dx once + weights + their gradients + dz

Elementwise work (tanh, sigmoid, exp) is not counted.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["Case", "FULL_CASES", "SMOKE_CASES", "MODES", "InputSet", "Weights", "all_cases",
           "get_case", "make_inputs", "n_input_sets"]

MODES = ("fwd", "bwd", "fwd_bwd")
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
    compile_on_cpu: bool = False  # the one smoke case where torch.compile runs on CPU

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
        return float({"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode])

    def bytes(self, mode: str) -> float:
        e, W, Z = self.itemsize, self.n_weights, self.B * self.K * self.D
        fwd = e * (self.T * self.D + W + Z)
        bwd = e * (2 * self.T * self.D + 2 * W + Z)
        return float({"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[mode])

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
    for dtype in ("bf16", "fp32"):  # whole-slide images, one bag per step
        for D in (1024, 1536):
            for N in (10_000, 100_000, 1_000_000):
                cases.append(Case(f"wsi-n{_count(N)}-d{D}-{dtype}", "wsi", (N,), D, 256, dtype))
    lengths = _draw_lengths(8, 2_000, 50_000, seed=0)  # batched slides, packed / padded
    cases.append(Case("batched-8x2k-50k-d1024-bf16", "batched", lengths, 1024, 256, "bf16"))
    lengths = _draw_lengths(512, 5, 15, seed=0)  # MNIST-bags (Ilse et al. 2018)
    cases.append(Case("mnist-512x5-15-d500-fp32", "mnist", lengths, 500, 128, "fp32"))
    cases.append(Case("multibranch-k4-n100k-d1024-bf16", "multibranch", (100_000,), 1024, 256,
                      "bf16", K=4))  # CLAM_MB-style
    return cases


def _smoke_cases() -> list[Case]:
    """Tiny stand-ins for each group, for CI on CPU (MNIST-bags is small enough to keep)."""
    cases = [Case(f"smoke-wsi-n{_count(N)}-d64-fp32", "wsi", (N,), 64, 32, "fp32", smoke=True,
                  compile_on_cpu=(N == 2048))
             for N in (512, 2048, 8192)]
    cases.append(Case("smoke-wsi-n2048-d64-bf16", "wsi", (2048,), 64, 32, "bf16", smoke=True))
    cases.append(Case("smoke-batched-8x64-1k-d64-bf16", "batched",
                      _draw_lengths(8, 64, 1024, seed=0), 64, 32, "bf16", smoke=True))
    cases.append(Case("smoke-mnist-512x5-15-d500-fp32", "mnist",
                      _draw_lengths(512, 5, 15, seed=0), 500, 128, "fp32", smoke=True))
    cases.append(Case("smoke-multibranch-k4-n2048-d64-bf16", "multibranch", (2048,), 64, 32,
                      "bf16", K=4, smoke=True))
    return cases


FULL_CASES: list[Case] = _full_cases()
SMOKE_CASES: list[Case] = _smoke_cases()


def all_cases() -> dict[str, Case]:
    return {c.name: c for c in FULL_CASES + SMOKE_CASES}


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
    outside the timed region; every ``x`` is a leaf that requires grad."""
    case: Case
    x: torch.Tensor  # packed [T, D]
    offsets: torch.Tensor  # [B+1] int64
    seg: torch.Tensor  # [T] int64 bag index of every row (PyG's `batch`)
    dz: torch.Tensor  # [B, K, D] upstream gradient
    _padded: tuple | None = None

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, N, D]`` leaf and ``mask [B, N]`` (None for one bag: no padding)."""
        if self._padded is None:
            if self.case.B == 1:  # a view of the packed storage, no copy
                xp, mask = self.x.detach()[None].requires_grad_(), None
            else:
                from fastmil.bags import pad

                xp, mask = pad(self.x.detach(), self.offsets)
                xp.requires_grad_()
            self._padded = (xp, mask)
        return self._padded

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
