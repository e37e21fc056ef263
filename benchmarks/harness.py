"""The attention_pool benchmark: cases (shapes and workloads), providers, and timing.

Workloads, one timed call: ``frozen`` (x without grad, the weights with it: forward + backward,
as whole-slide pipelines train on extracted features), ``train`` (x with grad too), ``infer``
(forward under ``torch.no_grad()``, returning the attention). Roofline floor per instance (D
features, L attention, K branches; P = 4·L·D, S = 2·L·K, A = 2·D·K): flops infer P + S + A,
frozen 3P + 3S + 2A, train 4P + 3S + 3A; bytes: x read once per pass, dx written (train), the
attention written (infer). Timing is the wall clock of a loop: calls back to back, the device
synchronised after each batch, per call = batch ÷ calls; on CUDA each test also records one
call's kernels (torch.profiler), its host time, its peak memory and its error against
``fastmil.reference``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import statistics
import subprocess
import time
from dataclasses import dataclass

import torch

import fastmil
from fastmil.kernels.config import kernel_options

from .eager import eager_attention_pool

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WORKLOADS = ("frozen", "train", "infer")


def commit() -> str:
    """This tree's commit; FASTMIL_COMMIT where the tree has no .git (a copied work tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:  # no git here
        out = ""
    return out or os.environ.get("FASTMIL_COMMIT", "unknown")


def draw_lengths(n: int, lo: int, hi: int, seed: int = 0) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randint(lo, hi) for _ in range(n))


@dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]
    D: int
    L: int
    dtype: str
    workloads: tuple[str, ...]
    K: int = 1

    @property
    def B(self) -> int:
        return len(self.lengths)

    @property
    def T(self) -> int:
        return sum(self.lengths)

    def flops(self, workload: str) -> float:
        P, S, A = 4 * self.L * self.D, 2 * self.L * self.K, 2 * self.D * self.K
        per = {"infer": P + S + A, "frozen": 3 * P + 3 * S + 2 * A, "train": 4 * P + 3 * S + 3 * A}
        return float(self.T * per[workload])

    def bytes(self, workload: str) -> float:
        x = self.T * self.D * DTYPES[self.dtype].itemsize
        return float({"infer": x + 4 * self.T * self.K, "frozen": 2 * x, "train": 3 * x}[workload])

    def describe(self) -> str:
        bags = f"B=1, N={self.T:,}" if self.B == 1 else \
            f"B={self.B}, {min(self.lengths):,}–{max(self.lengths):,} each (T={self.T:,})"
        return f"{bags}, D={self.D}, L={self.L}{f', K={self.K}' if self.K > 1 else ''}, " \
               f"{self.dtype}"


SUITES = {
    # the shapes of the targets, each in its workload (benchmarks/gpu_check.sh)
    "gpu": [
        Case("slide", (100_000,), 1024, 256, "bf16", ("frozen",)),
        Case("slides-8", draw_lengths(8, 1_000, 50_000), 1024, 256, "bf16", ("frozen",)),
        Case("clam-step-fp32", (15_000,), 512, 256, "fp32", ("train",)),
        Case("clam-step-bf16", (15_000,), 512, 256, "bf16", ("train",)),
        Case("mnist", draw_lengths(512, 5, 15), 500, 128, "fp32", ("train",)),
        Case("inference", (100_000,), 1536, 256, "bf16", ("infer",)),
        Case("clam-mb-k4", (100_000,), 1024, 256, "bf16", ("frozen",), K=4),
    ],
    # tiny stand-ins for a CPU (CI): fastmil's kernels run in Triton's interpreter
    "smoke": [
        Case("smoke-slide", (300,), 16, 16, "fp32", WORKLOADS),
        Case("smoke-slides", draw_lengths(4, 20, 120), 16, 16, "fp32", ("frozen",)),
        Case("smoke-mnist", draw_lengths(16, 5, 15), 16, 16, "fp32", ("train",)),
        Case("smoke-k4", (200,), 16, 16, "fp32", ("frozen",), K=4),
    ],
}


class Unavailable(Exception):
    """A provider that cannot run here (a library not installed, a backend not usable)."""


@dataclass
class Inputs:
    """One case's tensors on the device: packed x [T, D] with host offsets, the same bags padded
    [B, N, D] with a mask, the weights (leaves with grad) and the upstream gradient of z."""

    x: torch.Tensor
    offsets: torch.Tensor
    xp: torch.Tensor
    mask: torch.Tensor
    V: torch.Tensor
    U: torch.Tensor
    bV: torch.Tensor
    bU: torch.Tensor
    w: torch.Tensor
    dz: torch.Tensor


def make_inputs(case: Case, device) -> Inputs:
    g = torch.Generator().manual_seed(0)
    dt = DTYPES[case.dtype]
    rnd = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device, dt)  # noqa: E731
    bags = [rnd(n, case.D) for n in case.lengths]
    x, offsets = fastmil.pack(bags)
    xp, mask = fastmil.pad(x, offsets)
    del bags
    leaf = lambda t: t.requires_grad_()  # noqa: E731
    w = rnd(case.L) if case.K == 1 else rnd(case.K, case.L)
    dz = rnd(case.B, case.D) if case.K == 1 else rnd(case.B, case.K, case.D)
    return Inputs(x, offsets.cpu(), xp, mask, leaf(rnd(case.L, case.D, std=case.D ** -0.5)),
                  leaf(rnd(case.L, case.D, std=case.D ** -0.5)), leaf(rnd(case.L, std=0.5)),
                  leaf(rnd(case.L, std=0.5)), leaf(w), dz)


def _module(inp: Inputs, case: Case, **kwargs) -> fastmil.AttentionPool:
    pool = fastmil.AttentionPool(case.D, case.L, branches=None if case.K == 1 else case.K,
                                 **kwargs).to(inp.x.device, inp.x.dtype)
    with torch.no_grad():
        for mine, theirs in ((pool.attn.weight, inp.V), (pool.gate.weight, inp.U),
                             (pool.attn.bias, inp.bV), (pool.gate.bias, inp.bU),
                             (pool.score.weight, inp.w.reshape(case.K, case.L))):
            mine.copy_(theirs)
        pool.score.bias.zero_()
    return pool


def _fastmil(backend="triton", options=None, padded=False, **kwargs):
    """fastmil's AttentionPool (what users hold: [V; U] in one block), packed bags with their
    offsets on the host (as fastmil.collate makes them), or ``padded`` with a mask;
    ``options``: kernel options."""
    def build(case, inp):
        x = inp.xp if padded else inp.x
        if backend == "triton" and fastmil.triton_backend.triton_unavailable_reason(x):
            raise Unavailable(fastmil.triton_backend.triton_unavailable_reason(x))
        pool = _module(inp, case, backend=backend, **kwargs)
        scope = (lambda: kernel_options(**options)) if options else contextlib.nullcontext
        layout = dict(mask=inp.mask) if padded else dict(offsets=inp.offsets)

        def call(x, attention=False):
            with scope():
                return pool(x, return_attention=attention, **layout)
        return call, x, list(pool.parameters())
    return build


def _eager(compiled=False):
    """The padded formulation MIL code runs today (``benchmarks/eager.py``), or torch.compile of
    it (default mode, static shapes)."""
    def build(case, inp):
        fn = torch.compile(eager_attention_pool) if compiled else eager_attention_pool

        def call(xp, attention=False):
            return fn(xp, inp.V, inp.U, inp.w, attn_bias=inp.bV, gate_bias=inp.bU,
                      mask=inp.mask, return_attention=attention)
        return call, inp.xp, [inp.V, inp.U, inp.bV, inp.bU, inp.w]
    return build


def _torchmil(case, inp):
    try:
        from torchmil.nn.attention import AttentionPool
    except ImportError as e:
        raise Unavailable("torchmil is not installed") from e
    if case.K > 1:
        raise Unavailable("torchmil's AttentionPool has one branch")
    pool = AttentionPool(in_dim=case.D, att_dim=case.L, act="tanh", gated=True)
    pool = pool.to(inp.x.device, inp.x.dtype)
    # torchmil wraps nn.Linear in its own LazyLinear (.module)
    lin = lambda m: getattr(m, "module", m)  # noqa: E731
    with torch.no_grad():
        for layer, weight, bias in ((lin(pool.fc1), inp.V, inp.bV),
                                    (lin(pool.fc_gated), inp.U, inp.bU)):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        pool.fc2.weight.copy_(inp.w[None])

    def call(xp, attention=False):
        if attention:
            z, f = pool(xp, mask=inp.mask, return_att=True)
            return z, torch.softmax(f.masked_fill(~inp.mask, float("-inf")), dim=1)
        return pool(xp, mask=inp.mask)
    return call, inp.xp, list(pool.parameters())


def _pyg(case, inp):
    try:
        from torch_geometric.utils import scatter, softmax
    except ImportError as e:
        raise Unavailable("torch-geometric is not installed") from e
    index = fastmil.bags.segment_ids(inp.offsets[1:] - inp.offsets[:-1], case.T).to(inp.x.device)
    w = inp.w.reshape(case.K, case.L)

    def call(x, attention=False):
        h = torch.tanh(x @ inp.V.t() + inp.bV) * torch.sigmoid(x @ inp.U.t() + inp.bU)
        a = softmax(h @ w.t(), index, num_nodes=case.T, dim=0)  # [T, K]
        z = scatter(a[:, :, None] * x[:, None, :], index, dim=0, dim_size=case.B, reduce="sum")
        z = z[:, 0] if case.K == 1 else z
        return (z, a[:, 0] if case.K == 1 else a) if attention else z
    return call, inp.x, [inp.V, inp.U, inp.bV, inp.bU, inp.w]


PROVIDERS = {
    "fastmil": _fastmil(),
    "fastmil-recompute": _fastmil(recompute=True),
    "fastmil-fma-sum": _fastmil(options=dict(fma_sum=True)),
    "fastmil-16-per-sm": _fastmil(options=dict(programs_per_sm=16)),
    "fastmil-torch": _fastmil("torch"),
    "fastmil-torch-padded": _fastmil("torch", padded=True),
    "eager": _eager(),
    "compile": _eager(compiled=True),
    "torchmil": _torchmil,
    "pyg": _pyg,
}
# the fastmil variants that only the GPU can tell apart
GPU_ONLY = ("fastmil-fma-sum", "fastmil-16-per-sm")


def runner(provider: str, case: Case, workload: str, inp: Inputs):
    """A function that makes one call of ``workload`` and returns the output to check (z; in
    inference z and the attention); after a backward, ``run.grads()`` gives the gradients."""
    call, x, params = PROVIDERS[provider](case, inp)
    xin = x.detach().requires_grad_(workload == "train")

    def run():
        if workload == "infer":
            with torch.no_grad():
                return call(x, attention=True)
        for p in params:
            p.grad = None
        xin.grad = None
        z = call(xin)
        z.backward(inp.dz)
        return z

    run.grads = lambda: [p.grad for p in params] + ([xin.grad] if xin.requires_grad else [])
    return run


def reference(case: Case, inp: Inputs, workload: str):
    """z (and the attention in inference) from ``fastmil.reference``, in float64 on the CPU for
    small cases, else in float32 on the device (bags of 10⁵ in float64 on a GPU take seconds)."""
    small = case.T * case.D <= 4_000_000
    dt = torch.float64 if small else torch.float32
    dev = "cpu" if small else inp.x.device
    t = lambda v: v.detach().to(dev, dt)  # noqa: E731
    out = fastmil.reference.attention_pool_reference(
        t(inp.x), t(inp.V), t(inp.U), t(inp.w), attn_bias=t(inp.bV), gate_bias=t(inp.bU),
        offsets=inp.offsets, return_attention=workload == "infer")
    return out


def relative_error(out, ref, case: Case) -> float:
    """max |out − ref| ÷ max |ref| over z (and the attention), as the packed layout aligns it."""
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    err = 0.0
    for o, r in zip(outs, refs, strict=True):
        if o.shape != r.shape:  # a padded provider's attention [B, N(, K)]: its real slots
            mask = torch.arange(o.shape[1], device=o.device)[None] < torch.tensor(
                case.lengths, device=o.device)[:, None]
            o = o[mask]
        o, r = o.detach().double().cpu(), r.detach().double().cpu()
        err = max(err, ((o - r).abs().max() / r.abs().max().clamp(min=1e-30)).item())
    return err


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_size(run, device, target_s: float) -> int:
    """Calls per timed batch: at least ``target_s`` seconds of them (and at least one)."""
    sync(device)
    t0 = time.perf_counter()
    run()
    sync(device)
    return max(1, int(target_s / max(time.perf_counter() - t0, 1e-6)))


def host_ms(run, device, reps: int = 5, warmup: int = 0) -> tuple[float, float]:
    """Medians over ``reps`` calls, each with the device idle before it, of the host time (until
    the call returns) and of the wall time (until the device has finished it), in ms."""
    for _ in range(warmup):
        run()
    host, wall = [], []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        run()
        host.append(time.perf_counter() - t0)
        sync(device)
        wall.append(time.perf_counter() - t0)
    return statistics.median(host) * 1e3, statistics.median(wall) * 1e3


def kernel_profile(run, device) -> dict:
    """Device time of one call per kernel (torch.profiler): total ms, count, and the top
    kernels by time (name -> [count, ms])."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    run()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        sync(device)
    kernels, copies = {}, 0
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name
        if name.startswith(("Memcpy", "Memset", "[memory]")):
            copies += 1
            continue
        count, ms = kernels.get(name, (0, 0.0))
        kernels[name] = (count + 1, ms + e.device_time_total / 1e3)
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1][1])[:6])
    return dict(kernels_ms=sum(ms for _, ms in kernels.values()),
                launches=sum(n for n, _ in kernels.values()), copies=copies,
                top={n[:80]: [c, round(ms, 4)] for n, (c, ms) in top.items()})


def memory(run, device, workload: str) -> dict:
    """Peak memory of one call, and what the forward keeps for the backward (CUDA)."""
    if device.type != "cuda":
        return {}
    sync(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    sync(device)
    return dict(peak_mib=(torch.cuda.max_memory_allocated() - base) / 2**20)


@functools.cache
def measure_peaks(device) -> dict:
    """bf16 and fp32 matmul TFLOP/s and device copy GB/s, measured here (the roofline)."""
    if device.type != "cuda":
        return {}
    out = {}
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(8192, 8192, device=device, dtype=dt)
        ms = _best_ms(lambda a=a: a @ a, device)
        out[f"{name}_tflops"] = 2 * 8192 ** 3 / ms / 1e9
    src = torch.empty(2**28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    out["copy_gbs"] = 2 * src.numel() * 4 / _best_ms(lambda: dst.copy_(src), device) / 1e6
    return out


def _best_ms(fn, device, reps: int = 10) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def floor_ms(case: Case, workload: str, peaks: dict) -> float | None:
    """The roofline floor: the slower of the FLOPs at the matmul peak and the bytes at the copy
    bandwidth (None without measured peaks)."""
    if not peaks:
        return None
    tflops = peaks["bf16_tflops" if case.dtype != "fp32" else "fp32_tflops"]
    return max(case.flops(workload) / tflops / 1e9, case.bytes(workload) / peaks["copy_gbs"] / 1e6)
