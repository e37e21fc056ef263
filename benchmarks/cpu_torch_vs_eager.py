"""fastmil's torch backend against the eager padded formulation on a CPU, at sizes above the smoke
suite's.

    python -m benchmarks.cpu_torch_vs_eager [--busy] [--threads N] [--rounds R] [--case NAME]

Forward + backward (x trainable) of the harness's providers ``eager`` (padded + mask),
``fastmil-torch`` (packed: its native layout) and ``fastmil-torch-padded`` (padded + mask). A
shared machine drifts, so the three alternate in a rotating order for ``--rounds`` rounds after
two warm-ups; the table gives their medians and eager's ÷ each (above 1: fastmil is faster).
``--busy`` runs a neighbour spinning on one core for the whole run, as a second job would;
``--threads`` sets torch's intra-op threads (default 2; 0 keeps torch's own).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import torch

from .harness import Case, make_inputs, runner

PROVIDERS = ("eager", "fastmil-torch", "fastmil-torch-padded")
CASES = {c.name: c for c in [
    Case("8x1500", (1500,) * 8, 512, 128, "fp32", ("train",)),
    # bags of two lengths: the general packed path (bags of one length pool as a padded batch)
    Case("8x1500-uneven", (1501, 1499) * 4, 512, 128, "fp32", ("train",)),
    Case("ragged4", (3000, 800, 1500, 2200), 512, 128, "fp32", ("train",)),
    Case("20k", (20_000,), 1024, 256, "fp32", ("train",)),
    Case("20k-bf16", (20_000,), 1024, 256, "bf16", ("train",)),
    Case("256x10", (10,) * 256, 500, 128, "fp32", ("train",)),
    Case("300k", (300_000,), 512, 128, "fp32", ("train",)),
]}


@contextlib.contextmanager
def neighbour(busy):
    """A process spinning on one core while the block runs (``busy``), else nothing."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0)
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def run_case(case, rounds):
    """The median milliseconds of each provider on ``case``, in rotating order."""
    inp = make_inputs(case, torch.device("cpu"))
    runs = [runner(p, case, "train", inp) for p in PROVIDERS]
    for run in runs * 2:  # warm-ups
        run()
    times = [[] for _ in runs]
    for r in range(rounds):
        for i in range(len(runs)):
            j = (i + r) % len(runs)  # none always runs first
            t0 = time.perf_counter()
            runs[j]()
            times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", action="store_true", help="a neighbour spins on one core")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0: default)")
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds per case")
    ap.add_argument("--case", action="append", choices=list(CASES), help="only these cases")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, {'busy' if args.busy else 'no neighbour'}, median "
          f"of {args.rounds} alternating rounds (300k: 5)\n\n| case | shape | eager, padded + "
          "mask | fastmil torch, packed | fastmil torch, padded + mask |\n| --- | --- | ---: "
          "| ---: | ---: |")
    with neighbour(args.busy):
        for name in args.case or list(CASES):
            case = CASES[name]
            eager, packed, padded = run_case(case, 5 if name == "300k" else args.rounds)
            print(f"| {name} | {case.describe()} | {eager:.1f} ms | {packed:.1f} ms "
                  f"({eager / packed:.2f}×) | {padded:.1f} ms ({eager / padded:.2f}×) |",
                  flush=True)


if __name__ == "__main__":
    main()
