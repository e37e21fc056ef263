"""Timers, device peaks, memory probes and the environment record.

CUDA timing follows ``triton.testing.do_bench``: warm-up, then per call an untimed ``setup``
(next input set, gradients reset, and for backward the forward pass), an L2 flush (a 256 MiB
write), and the call itself between two CUDA events; the median is reported. CPU timing is
pytest-benchmark's own (``time.perf_counter`` around each round, setup untimed).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from importlib import metadata

import torch

__all__ = ["cuda_bench", "summarize", "measure_peaks", "cuda_memory", "saved_tensor_bytes",
           "env_info", "git_commit"]

_FLUSH_BYTES = 256 << 20


def _percentile(sorted_data: list[float], q: float) -> float:
    if not sorted_data:
        return float("nan")
    pos = q * (len(sorted_data) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def summarize(samples_ms: list[float]) -> dict:
    data = sorted(samples_ms)
    return {"median_ms": statistics.median(data), "p20_ms": _percentile(data, 0.2),
            "p80_ms": _percentile(data, 0.8), "min_ms": data[0], "mean_ms": statistics.fmean(data),
            "n_samples": len(data)}


def cuda_bench(setup: Callable[[], tuple], step: Callable, *, rep_ms: float = 200.0,
               warmup: int = 3, min_reps: int = 10, max_reps: int = 500,
               flush: bool = True) -> list[float]:
    """Milliseconds of ``step(*setup())`` per call, measured with CUDA events."""
    cache = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush else None
    for _ in range(warmup):
        step(*setup())
    torch.cuda.synchronize()
    # estimate the time of one call to choose the number of repetitions
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    args = setup()
    start.record()
    step(*args)
    end.record()
    torch.cuda.synchronize()
    del args
    estimate = max(start.elapsed_time(end), 1e-3)
    n = int(min(max(rep_ms / estimate, min_reps), max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        args = setup()
        if cache is not None:
            cache.zero_()
        starts[i].record()
        step(*args)
        ends[i].record()
        del args
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def cpu_median(fn: Callable, rounds: int = 5) -> float:
    """Median wall time in seconds of ``rounds`` calls of fn, after one warm-up call."""
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(device: torch.device) -> dict:
    """Peak matmul rates and copy bandwidth measured on this device, now.

    CUDA: bf16 and tf32 (and strict fp32) 8192³ matmuls, a 1 GiB device-to-device copy counted
    as read + write. CPU: the same at 2048³ / 256 MiB (what torch reaches here, not a datasheet).
    """
    if device.type == "cuda":
        n, copy_bytes = 8192, 1 << 30

        def timed(fn):
            return statistics.median(cuda_bench(lambda: (), fn, rep_ms=300, flush=False)) * 1e-3
    else:
        n, copy_bytes = 2048, 256 << 20

        def timed(fn):
            return cpu_median(fn)

    out = {}
    for key, dtype, precision in (("bf16", torch.bfloat16, "highest"),
                                  ("tf32", torch.float32, "high"),  # fp32 matmul on TF32 cores
                                  ("fp32", torch.float32, "highest")):
        if device.type == "cpu" and key == "tf32":
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            t = timed(lambda a=a, b=b, c=c: torch.mm(a, b, out=c))
        finally:
            torch.set_float32_matmul_precision(old)
        out[f"peak_{key}_tflops"] = 2 * n ** 3 / t / 1e12
        del a, b, c
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda src=src, dst=dst: dst.copy_(src))
    out["peak_copy_gbps"] = 2 * copy_bytes / t / 1e9
    out["peak_method"] = (f"median of {n}^3 torch.mm per dtype and a {copy_bytes >> 20} MiB "
                          f"copy_ (read + write) on {device.type}")
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def cuda_memory(run: Callable[[], torch.Tensor | tuple],
                backward: Callable[[torch.Tensor], None] | None) -> dict:
    """Memory of one forward (+ backward) above what is allocated before it (inputs, weights):
    ``kept_bytes`` is what the allocator still holds after the forward, minus z itself (what is
    kept for backward), ``peak_bytes`` the high-water mark over both (gradients included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    outs = out if isinstance(out, tuple) else (out,)
    out_bytes = sum(t.untyped_storage().nbytes() for t in outs if t is not None)
    kept = torch.cuda.memory_allocated() - base - out_bytes
    if backward is not None:
        backward(outs[0])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out, outs
    return {"kept_bytes": int(kept), "peak_bytes": int(peak),
            "memory_method": "torch.cuda allocator, above the inputs"}


def saved_tensor_bytes(run: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> dict:
    """Bytes of the distinct storages autograd saves for backward (inputs and weights
    excluded), seen through ``saved_tensors_hooks``: the CPU stand-in for ``cuda_memory``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = run()
    del z
    return {"saved_bytes": int(sum(seen.values())), "peak_bytes": None,
            "memory_method": "saved_tensors_hooks (distinct storages, inputs excluded)"}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: str | None = None) -> str | None:
    """Short commit of the checkout at ``root`` (default: this one), marked when its fastmil/
    has uncommitted changes."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "fastmil"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (fastmil/ modified)" if dirty.stdout.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device, smoke: bool) -> dict:
    import fastmil

    info = {
        "device_type": device.type,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU: {_cpu_name()}"),
        "cpu_threads": torch.get_num_threads(),
        "smoke": smoke,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "fastmil": fastmil.__version__,
        "fastmil_commit": git_commit(),
        "torchmil": _version("torchmil"),
        "torch_geometric": _version("torch_geometric") or _version("torch-geometric"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
    return info
