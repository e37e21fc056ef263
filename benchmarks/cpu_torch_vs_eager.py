"""fastmil's torch backend vs the eager padded formulation on CPU, at sizes above the smoke set.

    python -m benchmarks.cpu_torch_vs_eager [--busy] [--threads N] [--rounds R] [--case NAME]

Forward+backward wall time of ``benchmarks.eager.eager_attention_pool`` on padded + mask input,
``attention_pool(..., backend="torch")`` on its native layout (one bag, or packed + offsets),
and the same on padded + mask. A shared machine drifts between runs, so the three calls of a
case alternate (in a rotating order) for ``--rounds`` rounds after two warm-ups, and the table
gives each one's median and eager's median over it (the speed-up; above 1: fastmil is faster).
``--busy`` runs a neighbour process that spins on one core for the whole run, as a second job on
the machine would. ``--threads`` sets torch's intra-op threads (default 2; 0 keeps torch's own
default). The pytest-benchmark suite (``pytest benchmarks/``) stays on tiny shapes on CPU so
that CI is quick; this script answers "is the torch backend slower than eager on a CPU?".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time

import torch

import fastmil
from benchmarks.eager import eager_attention_pool

CASES = {  # name: (bag lengths, D, L, dtype, rounds, or None for --rounds)
    "8x1500": ([1500] * 8, 512, 128, torch.float32, None),
    # the same rows, but bags of two lengths: packed goes through the segment weighted sum (bags
    # of one length pool as the padded batch they are), eager pads 8 rows
    "8x1500-uneven": ([1501, 1499] * 4, 512, 128, torch.float32, None),
    "ragged4": ([3000, 800, 1500, 2200], 512, 128, torch.float32, None),
    "20k": ([20_000], 1024, 256, torch.float32, None),
    "20k-bf16": ([20_000], 1024, 256, torch.bfloat16, None),
    "256x10": ([10] * 256, 500, 128, torch.float32, None),
    "300k": ([300_000], 512, 128, torch.float32, 5),
}


@contextlib.contextmanager
def neighbour(busy):
    """A process spinning on one core while the block runs (``busy``), else nothing."""
    if not busy:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()


def run_case(lengths, D, L, dtype, rounds):
    """One table row: the median milliseconds of eager, fastmil native and fastmil padded."""
    x, offsets = fastmil.pack([torch.randn(n, D, dtype=dtype) for n in lengths])
    xp, mask = fastmil.pad(x, offsets)
    x.requires_grad_()
    xp.requires_grad_()
    V, U = ((torch.randn(L, D) * D ** -0.5).to(dtype).requires_grad_() for _ in range(2))
    w = torch.randn(L).to(dtype).requires_grad_()
    bV, bU = (torch.zeros(L, dtype=dtype, requires_grad=True) for _ in range(2))
    native = {} if len(lengths) == 1 else {"offsets": offsets}  # one bag: x [N, D] as it is

    def eager():
        z = eager_attention_pool(xp, V, U, w, attn_bias=bV, gate_bias=bU, mask=mask)
        z.float().sum().backward()

    def ours(inp, **layout):
        z = fastmil.attention_pool(inp, V, U, w, attn_bias=bV, gate_bias=bU, backend="torch",
                                   **layout)
        z.float().sum().backward()

    calls = [eager, lambda: ours(x, **native), lambda: ours(xp, mask=mask)]
    for fn in calls * 2:  # warm-ups
        fn()
    times = [[] for _ in calls]
    for r in range(rounds):
        for i in range(len(calls)):
            j = (i + r) % len(calls)  # rotate the order, so that none always runs first
            t0 = time.perf_counter()
            calls[j]()
            times[j].append(time.perf_counter() - t0)
            for t in (x, xp, V, U, w, bV, bU):
                t.grad = None
    return [statistics.median(t) * 1e3 for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", action="store_true", help="a neighbour spins on one core")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (0: default)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per case")
    parser.add_argument("--case", action="append", choices=list(CASES),
                        help="run only these cases (repeatable; default: all)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, {'busy' if args.busy else 'no neighbour'}, "
          f"median of {args.rounds} alternating rounds (300k: 5)")
    print("| case | bags | dtype | eager, padded + mask | fastmil torch, native layout "
          "| fastmil torch, padded + mask |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    with neighbour(args.busy):
        for name in args.case or list(CASES):
            lengths, D, L, dtype, rounds = CASES[name]
            t_eager, t_native, t_padded = run_case(lengths, D, L, dtype, rounds or args.rounds)
            desc = f"{len(lengths)} of {sum(lengths) // len(lengths)} avg, D={D}, L={L}"
            print(f"| {name} | {desc} | {str(dtype)[6:]} | {t_eager:.1f} ms "
                  f"| {t_native:.1f} ms ({t_eager / t_native:.2f}×) "
                  f"| {t_padded:.1f} ms ({t_eager / t_padded:.2f}×) |", flush=True)


if __name__ == "__main__":
    main()
