"""Timers, device peaks, memory probes, per-kernel device time and the environment record.

CUDA timing follows ``triton.testing.do_bench``: warm-up, then per call an untimed ``setup``
(next input set, gradients reset, and for backward the forward pass), an L2 flush (a 256 MiB
write), and the call itself between two CUDA events; the median is reported. CPU timing is
pytest-benchmark's own (``time.perf_counter`` around each round, setup untimed).

Where the time of one call goes: ``profile_kernels`` (torch.profiler, CUDA activity) reduced by
``kernel_breakdown``; what cuBLAS takes for the same GEMMs: ``gemm_reference``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from importlib import metadata

import torch

__all__ = ["cuda_bench", "summarize", "measure_peaks", "cuda_memory", "saved_tensor_bytes",
           "env_info", "git_commit", "write_json", "device_events", "device_kind", "short_kernel_name",
           "kernel_breakdown", "profile_kernels", "gemm_reference", "error_text", "launch_us"]

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


def _l2_flush() -> Callable[[], None]:
    """A function that evicts the L2 cache (writes 256 MiB), on the current CUDA device."""
    return torch.empty(_FLUSH_BYTES, dtype=torch.int8, device="cuda").zero_


def cuda_bench(setup: Callable[[], tuple], step: Callable, *, rep_ms: float = 200.0,
               warmup: int = 3, min_reps: int = 10, max_reps: int = 500,
               flush: bool = True) -> list[float]:
    """Milliseconds of ``step(*setup())`` per call, measured with CUDA events."""
    flush_l2 = _l2_flush() if flush else None
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
        if flush_l2 is not None:
            flush_l2()
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


# ----------------------------------------------------------------- where the time of one call goes

OTHER_KERNELS = "(other)"  # the bucket of the kernels past the top ones
_LEAD_IN = "spin_kernel"  # torch.cuda._sleep's kernel, launched first in each profiled session
_LEAD_IN_CYCLES = 1_000_000  # about half a millisecond of GPU clock
_NAME_NOISE = [re.compile(p) for p in (
    r"\(anonymous namespace\)::", r"\bat::native::", r"::operator\(\)\([^()]*\)(?: const)?",
    r"::\{lambda\([^()]*\)#\d+\}", r"\((?:at::)?TensorIterator(?:Base)?&\)")]


def device_kind(name: str) -> str:
    """What a device activity of torch.profiler is: ``memcpy``, ``memset`` or ``kernel``."""
    if name.startswith("Memcpy"):
        return "memcpy"
    return "memset" if name.startswith("Memset") else "kernel"


def short_kernel_name(name: str, width: int = 60) -> str:
    """A device kernel's name as a report shows it: Triton kernels keep their function name;
    C++ kernels lose ``void``, their parameter list and the lambda / namespace noise of ATen's
    templates (``vectorized_elementwise_kernel<4, tanh_kernel_cuda, ...>``); at most ``width``
    characters (cuBLAS / CUTLASS names are cut, with "…")."""
    n = name.strip().removeprefix("void ")
    if n.endswith(")"):  # drop the trailing parameter list: the template arguments say more
        depth = 0
        for i in range(len(n) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(n[i], 0)
            if depth == 0:
                n = n[:i] if i > 0 else n
                break
    for pattern in _NAME_NOISE:
        n = pattern.sub("", n)
    n = " ".join(n.split())
    return n if len(n) <= width else n[:width - 1] + "…"


def _device_us(e) -> float:
    """Duration in µs of a device activity (a profiler event, or a ``Kernel`` of an older
    profiler), by whichever attribute this torch has: ``time_range`` in torch 1.x to 2.13."""
    time_range = getattr(e, "time_range", None)
    if time_range is not None:
        return float(time_range.elapsed_us())
    for attr in ("device_time_total", "device_time", "cuda_time_total", "cuda_time", "duration"):
        value = getattr(e, attr, None)
        if value is not None:
            return float(value)
    raise AttributeError(f"no duration on the profiler event {getattr(e, 'name', e)!r}")


def device_events(events) -> list[tuple[str, float]]:
    """``(name, device ms)`` of every device activity (kernels, memcpy, memset) among
    torch.profiler's ``prof.events()``: the events whose ``device_type`` is CUDA, or where a
    profiler records none, the ``kernels`` it attaches to their CPU ops."""
    from torch.autograd import DeviceType

    events = list(events)
    out = [(e.name, _device_us(e) / 1e3) for e in events
           if getattr(e, "device_type", None) == DeviceType.CUDA]
    if not out:  # older profilers attach the kernels to their CPU op only
        out = [(k.name, _device_us(k) / 1e3) for e in events for k in getattr(e, "kernels", [])]
    return out


def kernel_breakdown(events: Iterable[tuple[str, float]], top: int = 8) -> dict:
    """Reduce ``(device activity name, device ms)`` pairs (``device_events``) to what a record
    keeps: ``kernels``, a list of ``{"name", "count", "ms"}`` per kernel name (shortened by
    ``short_kernel_name``), by time, the ``top`` first and then one ``"(other)"`` entry for the
    rest; ``kernels_total_ms`` and ``kernels_count`` over all kernels; memcpy and memset apart
    (``memcpy_count``, ``memcpy_ms``, ``memset_count``, ``memset_ms``)."""
    kernels: dict[str, list] = {}
    copies = {"memcpy": [0, 0.0], "memset": [0, 0.0]}
    for name, ms in events:
        kind = device_kind(name)
        slot = (copies[kind] if kind != "kernel"
                else kernels.setdefault(short_kernel_name(name), [0, 0.0]))
        slot[0] += 1
        slot[1] += ms
    ranked = sorted(kernels.items(), key=lambda kv: (-kv[1][1], kv[0]))
    rows = [{"name": n, "count": c, "ms": round(ms, 5)} for n, (c, ms) in ranked[:top]]
    if len(ranked) > top:
        rest = [v for _, v in ranked[top:]]
        rows.append({"name": OTHER_KERNELS, "count": sum(c for c, _ in rest),
                     "ms": round(sum(ms for _, ms in rest), 5)})
    out = {"kernels": rows, "kernels_total_ms": round(sum(ms for _, ms in kernels.values()), 5),
           "kernels_count": sum(c for c, _ in kernels.values())}
    for kind, (count, ms) in copies.items():
        out.update({f"{kind}_count": count, f"{kind}_ms": round(ms, 5)})
    return out


def error_text(e: BaseException) -> str:
    """``Type: first line of the message``."""
    msg = str(e).splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


@contextlib.contextmanager
def _environ(key: str, value: str | None):
    """Set (or with None, leave alone) one environment variable while the block runs."""
    old = os.environ.get(key)
    if value is not None:
        os.environ[key] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def launch_us(n: int = 200, repeats: int = 3) -> float:
    """Host time per launch of a trivial CUDA kernel (a one-element ``add_``), µs: the best of
    ``repeats`` batches of ``n`` launches (then one synchronize), after a warm-up. A profiler
    that stays attached after its session shows here."""
    t = torch.zeros(1, device="cuda")
    best = float("inf")
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            t.add_(1)
        torch.cuda.synchronize()
        if i:  # the first batch warms up
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def profile_kernels(setup: Callable[[], tuple], step: Callable, *, attempts: int = 3,
                    top: int = 8) -> dict:
    """Where the device time of one ``step(*setup())`` goes (CUDA, warmed up already): the
    fields of ``kernel_breakdown``, ``kernels_attempts``, and ``launch_us_after_profile``
    (``launch_us`` once the profiler is closed). Never raises: a failure gives
    ``{"kernels_error": "..."}`` (``kernels_teardown_error`` when only the closing failed).

    ``top``: how many kernel names ``kernel_breakdown`` keeps before "(other)".

    One torch.profiler session (CPU and CUDA activity) around one call, after an L2 flush as in
    ``cuda_bench``. The session launches a short spin kernel (``torch.cuda._sleep``) first, which
    the call's kernels queue behind and which is left out: seeing it proves that the capture
    began before the call (a profiler may drop a session's first device events, or record none
    in a process's first session). Without it the call is profiled again, up to ``attempts``
    times; a last miss is kept, with a ``kernels_note``. Kineto keeps CUPTI attached after a
    session unless ``TEARDOWN_CUPTI=1``, which could slow down the tests timed next: the sessions
    here run with ``TEARDOWN_CUPTI=0`` and an empty one with ``TEARDOWN_CUPTI=1`` closes them,
    unless the variable is set outside (then it is left alone).
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    manage = "TEARDOWN_CUPTI" not in os.environ
    try:
        with _environ("TEARDOWN_CUPTI", "0" if manage else None):
            out = _profile_call(setup, step, attempts, lambda: profile(activities=activities),
                                _l2_flush(), top)
    except Exception as e:  # a profile is extra information: it never fails a test
        out = {"kernels_error": error_text(e)}
    if torch.cuda.is_available():
        try:
            if manage:  # detach CUPTI; the teardown runs at the next CUDA call
                with _environ("TEARDOWN_CUPTI", "1"), profile(activities=activities):
                    pass
            out["launch_us_after_profile"] = launch_us()
        except Exception as e:
            out["kernels_teardown_error"] = error_text(e)
    return out


def _profile_call(setup: Callable[[], tuple], step: Callable, attempts: int,
                  session: Callable, flush: Callable, top: int = 8) -> dict:
    """``profile_kernels`` minus its set-up: ``session()`` opens a profiler, ``flush()`` evicts
    the L2 cache."""
    sleep = getattr(torch.cuda, "_sleep", None)
    for attempt in range(1, attempts + 1):
        args = setup()
        flush()
        torch.cuda.synchronize()
        with session() as prof:
            if sleep is not None:
                sleep(_LEAD_IN_CYCLES)
            step(*args)
            torch.cuda.synchronize()
        del args
        events = device_events(prof.events())
        mine = [(n, ms) for n, ms in events if _LEAD_IN not in n]
        seen = len(mine) < len(events)
        if seen or sleep is None or attempt == attempts:
            break
    if not mine:
        return {"kernels_error": "the profiler recorded no device kernel of the call",
                "kernels_attempts": attempt}
    out = {**kernel_breakdown(mine, top), "kernels_attempts": attempt}
    if not seen:
        out["kernels_note"] = ("the lead-in kernel is missing from the profile: the call's first "
                               "kernels may be missing too")
    return out


def gemm_reference(x: torch.Tensor, GL: int, rep_ms: float = 100.0) -> dict:
    """What cuBLAS (``torch.mm``) takes for the GEMMs of attention-MIL pooling on x's shape and
    dtype (fp32 at this run's ``float32_matmul_precision``): median CUDA time as in
    ``cuda_bench`` (L2 flushed) and TFLOP/s of ``proj``, the projection x [T, D] @ W [D, GL]
    (every forward does it; W is the transpose of a [GL, D] tensor, as V and U are stored);
    ``dw``, the weight gradient dpqᵀ [GL, T] @ x [T, D] (every backward); ``dx``, the input
    gradient dpq [T, GL] @ Wᵀ [GL, D] (end-to-end backward)."""
    T, D = x.shape
    x = x.detach()
    W = torch.randn(GL, D, device=x.device, dtype=x.dtype).t()
    dpq = torch.randn(T, GL, device=x.device, dtype=x.dtype)
    out = {"T": T, "D": D, "GL": GL, "dtype": str(x.dtype).removeprefix("torch."),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "method": "torch.mm (cuBLAS), CUDA events, L2 flushed, median"}
    for key, a, b in (("proj", x, W), ("dw", dpq.t(), x), ("dx", dpq, W.t())):
        c = torch.empty(a.shape[0], b.shape[1], device=x.device, dtype=x.dtype)
        ms = statistics.median(cuda_bench(lambda: (), lambda a=a, b=b, c=c: torch.mm(a, b, out=c),
                                          rep_ms=rep_ms))
        out[f"{key}_ms"], out[f"{key}_tflops"] = ms, 2.0 * T * D * GL / (ms * 1e-3) / 1e12
        del c
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` as indented JSON, making its folder first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)


def git_commit(root: str | None = None) -> str | None:
    """Short commit of the checkout at ``root`` (default: this one), marked when its fastmil/
    has uncommitted changes; in a copy without git history (a remote GPU runner gets the work
    tree only), ``$FASTMIL_COMMIT`` as the caller set it, else None."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    given = os.environ.get("FASTMIL_COMMIT") or None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "fastmil"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return given
    if out.returncode != 0:
        return given
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
    info["tiles"] = tile_tables()
    return info


def tile_tables() -> dict:
    """The measured tile tables fastmil's GPU launchers read (``MEASURED_TILES`` in the kernel
    module, and the file named by ``FASTMIL_TILES``), as ``{"source": ..., "entries": [[key,
    tile], ...]}``; ``{"source": "defaults"}`` when both are empty."""
    try:
        from fastmil.kernels import attention_pool as kernels
    except ImportError as e:  # no triton
        return {"source": f"n/a ({error_text(e)})"}
    path = os.environ.get(kernels.TILES_ENV)
    try:
        table = {**kernels.MEASURED_TILES, **kernels._file_tiles()}
    except ValueError as e:
        return {"source": f"{kernels.TILES_ENV}={path}", "error": str(e)}
    sources = (["MEASURED_TILES"] if kernels.MEASURED_TILES else []) + (
        [f"{kernels.TILES_ENV}={path}"] if path else [])
    return {"source": " + ".join(sources) or "defaults",
            "entries": [[list(k), list(t)] for k, t in table.items()]}
