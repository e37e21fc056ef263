"""Time every candidate tile of fastmil's kernels on this GPU, per class of call.

    python -m benchmarks.tile_sweep [--json FILE] [--budget-s S]   # CUDA
    python -m benchmarks.tile_sweep --dry-run                      # CPU: the plumbing only

A class is a case of the GPU suite (its dtype, D, L, K; gated) in its workload. For each kernel
kind (``fwd``, ``bwd``) and each tile of ``fastmil.kernels.config.TILE_CANDIDATES``, the call
runs under ``kernel_options(tiles={kind: tile})``, z is checked against the default tile's
(same math, another summation order), and the kind's own kernel is timed by its device time
(torch.profiler over a few calls: the wall clock of a host-bound call would hide it). A tile
that does not compile or launch, or gives other numbers, is listed and never chosen. Prints a
table per class and the ``MEASURED_TILES`` entries to paste into fastmil/kernels/config.py
(keyed by ``tile_key``, never by bag lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastmil.kernels import config
from fastmil.kernels.config import kernel_options

from .harness import DTYPES, SUITES, Case, make_inputs, runner, sync
from .report import FASTMIL_KERNELS as KERNELS


def kernel_ms(run, name: str, device, calls: int = 5) -> float:
    """Device time per call of the kernels named ``name`` (median over ``calls``)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        sync(device)
    times = [e.device_time_total / 1e3 for e in prof.events()
             if e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith(name)]
    return sorted(times)[len(times) // 2] if times else float("nan")


def _outputs(case, workload, inp):
    """z and every gradient of one call, flattened in float32."""
    run = runner("fastmil", case, workload, inp)
    z = run()
    z = z[0] if isinstance(z, tuple) else z
    parts = [z] + ([] if workload == "infer" else run.grads())
    return torch.cat([t.detach().float().flatten() for t in parts]), run


def sweep_class(case: Case, device, kinds=("fwd", "bwd")) -> dict:
    workload = case.workloads[0]
    inp = make_inputs(case, device)
    want, _ = _outputs(case, workload, inp)  # the default tile's: what every tile must give
    out = {}
    for kind in kinds:
        if kind == "bwd" and workload == "infer":
            continue
        rows = []
        for tile in config.TILE_CANDIDATES[kind]:
            with kernel_options(tiles={kind: tile}):
                try:
                    got, run = _outputs(case, workload, inp)
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    ms = kernel_ms(run, KERNELS[kind], device) if device.type == "cuda" else \
                        float("nan")
                    rows.append(dict(tile=list(tile), ms=ms, error=err,
                                     ok=err < (1e-3 if case.dtype == "fp32" else 2e-2)))
                except Exception as e:  # noqa: BLE001 - a tile that fails is listed, not fatal
                    rows.append(dict(tile=list(tile), ms=None, error=None, ok=False,
                                     failure=f"{type(e).__name__}: {str(e)[:120]}"))
        good = [r for r in rows if r["ok"] and r["ms"] == r["ms"]]
        best = min(good, key=lambda r: r["ms"]) if good else None
        key = config.tile_key(kind, DTYPES[case.dtype], case.D, case.L, case.K, True)
        out[kind] = dict(key=list(key), rows=rows, best=best and best["tile"])
    return out


def markdown(results: dict) -> str:
    lines = []
    for name, kinds in results.items():
        for kind, res in kinds.items():
            lines += ["", f"**{name}**, `{KERNELS[kind]}` (key {tuple(res['key'])})", "",
                      "| tile | kernel ms | error | |", "| :--- | ---: | ---: | :--- |"]
            for r in res["rows"]:
                mark = "best" if r["tile"] == res["best"] else r.get("failure", "")
                ms = "—" if r["ms"] is None else f"{r['ms']:.4g}"
                err = "—" if r["error"] is None else f"{r['error']:.1e}"
                lines.append(f"| {tuple(r['tile'])} | {ms} | {err} | {mark} |")
    lines += ["", "MEASURED_TILES entries:", "", "```"]
    lines += [f"    {tuple(res['key'])}: {tuple(res['best'])},  # {name}"
              for name, kinds in results.items() for res in kinds.values() if res["best"]]
    return "\n".join(lines + ["```"]) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU: interpreter, tiny shapes")
    args = ap.parse_args(argv)
    if args.dry_run:  # read when the kernels are first imported, by the first call
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.dry_run else "cuda")
    cases = SUITES["smoke"][:1] if args.dry_run else [
        c for c in SUITES["gpu"] if c.name in ("slide", "mnist", "inference", "clam-mb-k4")]
    start, results = time.perf_counter(), {}
    for case in cases:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"budget spent: {case.name} not swept", flush=True)
            continue
        results[case.name] = sweep_class(case, device)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
