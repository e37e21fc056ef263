"""Host time of one call of fastmil's triton backend, with the Triton kernels stubbed out.

    python -m benchmarks.host_time                 # MNIST-bags counts, D=1, L=1, on CPU
    python -m benchmarks.host_time --json out/host_time.json --md benchmarks/HOST_TIME.md

A launch-bound call (hundreds of tiny bags, MNIST-bags) costs what the host spends on it:
Python, argument checks, the chunk map, allocations, autograd and the launches. This measures
that part on any machine: the three Triton kernels are replaced by launches that do nothing, so
what is left is the host's work plus the few aten ops fastmil runs around the kernels. The host's
work does not depend on D and L, the arithmetic of those ops does: D=1 and L=1 by default keep
it to a few microseconds on a CPU (at D=8, L=8 the two weight-gradient GEMMs alone take about
130 µs on one core of the CI machine). Paths, per workload
(``e2e``: x requires grad, forward + backward; ``infer``: ``torch.no_grad()`` forward):

* ``eager Function``: what an eager call runs (the launchers behind a plain autograd.Function);
* ``custom ops``: the same through the ``torch.library`` custom ops, what ``torch.compile``
  traces (and what eager calls ran before 83e408b).

Median of ``--reps`` calls after a warm-up, one thread. A CUDA launch of a real kernel adds its
own host time on a GPU (a few µs per launch, two or three launches per call); this is not a GPU
measurement.

On a GPU, ``--device cuda`` runs the real kernels instead (x and the weights on the GPU, the
offsets on the host, as a data loader hands them over), for the cuBLAS projection (the default)
and the fused one: *host* is the time until the call returns (the GPU drained before each call,
so no launch waits on a full queue), *wall* the time until the GPU has finished it too.
``--profile FILE`` writes cProfile's table of where that host time goes (the first path and
workload, ``--reps`` calls).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_kernels(custom_ops: bool):
    """The Triton kernels launch nothing; with ``custom_ops`` every call goes through the
    torch.library custom ops."""
    from fastmil import triton_backend as ops
    from fastmil.kernels import attention_pool as kernels

    saved = {n: getattr(kernels, n) for n in ("_fwd_kernel", "_bwd_kernel", "_merge_kernel")}
    saved_reason, saved_fwd = ops.triton_unavailable_reason, ops._pool_fwd
    try:
        for n in saved:
            setattr(kernels, n, _NoLaunch())
        ops.triton_unavailable_reason = lambda x: None  # CPU tensors, no interpreter
        if custom_ops:
            ops._pool_fwd = ops._fwd_op
        yield
    finally:
        for n, k in saved.items():
            setattr(kernels, n, k)
        ops.triton_unavailable_reason, ops._pool_fwd = saved_reason, saved_fwd


def _paths(device: str):
    """(name, context) of each path timed: stubbed kernels on CPU, real ones on CUDA."""
    if device == "cpu":
        return [("eager Function", lambda: stubbed_kernels(False)),
                ("custom ops", lambda: stubbed_kernels(True))]
    from .providers import kernel_design

    return [("cuBLAS projection", lambda: kernel_design("fastmil_triton_cublas")),
            ("fused projection", lambda: kernel_design("fastmil_triton_save"))]


def measure(args) -> dict:
    import torch

    import fastmil

    torch.set_num_threads(1)
    rng = random.Random(0)  # as benchmarks.cases draws MNIST-bags
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.bags)]
    D, L = args.D, args.L
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = torch.randn(sum(lengths), D, device=dev)
    offsets = torch.tensor([0] + lengths).cumsum(0)  # on the host
    V, U = (torch.randn(L, D, device=dev, requires_grad=True) for _ in range(2))
    w, bV, bU = (torch.randn(L, device=dev, requires_grad=True) for _ in range(3))
    dz = torch.randn(len(lengths), D, device=dev)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def call(workload):
        if workload == "infer":
            with torch.no_grad():
                fastmil.attention_pool(x, V, U, w, attn_bias=bV, gate_bias=bU, offsets=offsets,
                                       backend="triton", return_attention=True)
            return
        xin = x.detach().requires_grad_()
        z = fastmil.attention_pool(xin, V, U, w, attn_bias=bV, gate_bias=bU, offsets=offsets,
                                   backend="triton")
        z.backward(dz)

    rows = []
    for i, (path, context) in enumerate(_paths(args.device)):
        with context():
            for workload in args.workloads:
                for _ in range(args.warmup):
                    call(workload)
                times, walls = [], []
                for _ in range(args.reps):
                    sync()
                    t0 = time.perf_counter()
                    call(workload)
                    times.append(time.perf_counter() - t0)
                    sync()
                    walls.append(time.perf_counter() - t0)
                row = {"path": path, "workload": workload,
                       "median_us": statistics.median(times) * 1e6,
                       "p10_us": statistics.quantiles(times, n=10)[0] * 1e6}
                if cuda:
                    row["wall_median_us"] = statistics.median(walls) * 1e6
                rows.append(row)
                wall = f", wall {row['wall_median_us']:7.1f} µs" if cuda else ""
                print(f"{path:<17} {workload:<6} host {row['median_us']:7.1f} µs{wall}",
                      flush=True)
        if args.profile and i == 0:
            _profile(args, context, lambda: call(args.workloads[0]), sync)
    from .timing import git_commit

    shape = (f"{args.bags} bags of {args.min_len}–{args.max_len} (T={sum(lengths)}), D={D}, "
             f"L={L}, fp32, offsets on the host")
    device = torch.cuda.get_device_name() if cuda else "CPU (kernels stubbed)"
    return {"shape": shape, "rows": rows, "torch": torch.__version__, "device": device,
            "fastmil_commit": git_commit(), "reps": args.reps}


def _profile(args, context, call, sync) -> None:
    """cProfile's table of ``args.reps`` calls (the GPU drained after each), sorted by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    with context():
        for _ in range(args.reps):
            prof.enable()
            call()
            prof.disable()
            sync()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    with open(args.profile, "w") as fh:
        fh.write(f"{args.reps} calls of {args.workloads[0]}\n" + out.getvalue())


_WORKLOAD_LABELS = {"e2e": "end-to-end fwd+bwd", "infer": "inference fwd (with the attention)"}


def _markdown_cuda(result: dict) -> str:
    paths = list(dict.fromkeys(r["path"] for r in result["rows"]))
    lines = [f"# Host time per call, real kernels on {result['device']}", "",
             f"`python -m benchmarks.host_time --device cuda`, {result['shape']}; median of "
             f"{result['reps']} calls, the GPU drained before each; fastmil "
             f"{result['fastmil_commit']}, torch {result['torch']}. host: until the call "
             "returns; wall: until the GPU has finished it.", "",
             "| workload | " + " | ".join(f"{p}: host / wall" for p in paths) + " |",
             "| :--- |" + " ---: |" * len(paths)]
    for w in dict.fromkeys(r["workload"] for r in result["rows"]):
        cells = []
        for p in paths:
            r = next((r for r in result["rows"] if (r["path"], r["workload"]) == (p, w)), None)
            cells.append("—" if r is None else
                         f"{r['median_us']:.0f} / {r['wall_median_us']:.0f} µs")
        lines.append(f"| {_WORKLOAD_LABELS.get(w, w)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    if any("wall_median_us" in r for r in result["rows"]):  # --device cuda
        return _markdown_cuda(result)
    by = {(r["path"], r["workload"]): r["median_us"] for r in result["rows"]}
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    lines = ["# Host time per call, Triton kernels stubbed out", "",
             f"`python -m benchmarks.host_time`, {result['shape']}; one CPU thread, median of "
             f"{result['reps']} calls; fastmil {result['fastmil_commit']}, torch "
             f"{result['torch']}. What the host spends on one call of the triton backend besides "
             "the kernels (see the module docstring); not a GPU measurement.", "",
             "| workload | eager calls (autograd.Function) | custom ops (torch.compile's path) "
             "| saved |", "| :--- | ---: | ---: | ---: |"]
    for w in workloads:
        a, b = by.get(("eager Function", w)), by.get(("custom ops", w))
        if a is None or b is None:
            continue
        lines.append(f"| {_WORKLOAD_LABELS.get(w, w)} | {a:.0f} µs | {b:.0f} µs | {b - a:.0f} µs |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bags", type=int, default=512)
    ap.add_argument("--min-len", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=15)
    ap.add_argument("--D", type=int, default=1)
    ap.add_argument("--L", type=int, default=1)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--workloads", default="e2e,infer")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu: kernels stubbed; cuda: the real kernels on the GPU")
    ap.add_argument("--profile", default=None, help="write cProfile's table here")
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    os.environ.pop("TRITON_INTERPRET", None)  # CPU: the kernels never run; CUDA: real ones
    result = measure(args)
    if args.json:
        from .timing import write_json

        write_json(args.json, result)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
