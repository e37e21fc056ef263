"""One call of fastmil's default path at a target's shape, for Nsight Compute to profile.

    ncu --clock-control none --profile-from-start off -k 'regex:_(fwd|bwd|merge)_kernel' \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \\
        --section WarpStateStats python -m benchmarks.ncu_target --case wsi
    python -m benchmarks.ncu_target --case mnist --dry-run   # CPU: interpreter, tiny shapes

The device time of a kernel says how far it is from the roofline; Nsight Compute says why
(achieved DRAM throughput, occupancy, what the warps stall on). This runs the call twice to
compile and warm up, then once more between ``torch.cuda.profiler.start()`` and ``stop()``:
with ``--profile-from-start off``, ncu profiles only that call's kernels. The cases are the GPU
check's (benchmarks/cases.py), each in the workload its target is defined on: ``wsi`` (B=1,
N=100k, D=1024, bf16, frozen features), ``batched`` (8 packed slides, frozen), ``mnist`` (512
bags of 5–15, fp32, end to end) and ``infer`` (N=100k, D=1536, ``no_grad`` forward with the
attention).

``--dry-run`` runs the same code on CPU tensors in Triton's interpreter at tiny sizes (for CI;
nothing is profiled there).
"""

from __future__ import annotations

import argparse
import os
import random
import sys

# case -> (the GPU check's case, workload)
CASES = {"wsi": ("wsi-n100k-d1024-bf16", "frozen"), "batched": ("batched-8x2k-50k-d1024-bf16",
                                                                 "frozen"),
         "mnist": ("mnist-512x5-15-d500-fp32", "e2e"), "infer": ("wsi-n100k-d1536-bf16", "infer")}
DRY_RUN = {"lengths": lambda rng: [rng.randint(1, 20) for _ in range(6)], "D": 24, "L": 16}


def build(case: str, dry_run: bool):
    """``call()``: one call of the case's workload (fwd, and bwd unless inference)."""
    import torch

    import fastmil

    from .cases import get_case

    name, workload = CASES[case]
    c = get_case(name)
    lengths, D, L, dtype = list(c.lengths), c.D, c.L, c.dtype
    rng = random.Random(0)
    if dry_run:
        lengths, D, L = DRY_RUN["lengths"](rng), DRY_RUN["D"], DRY_RUN["L"]
        dtype = "fp32" if dtype == "fp32" else "fp16"  # the interpreter has no bf16 arithmetic
    device = torch.device("cpu" if dry_run else "cuda")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(  # noqa: E731
        device=device, dtype=dt)
    x = rnd(sum(lengths), D)
    offsets = None if len(lengths) == 1 else torch.tensor([0] + lengths).cumsum(0)  # host
    V, U = rnd(L, D, scale=D ** -0.5), rnd(L, D, scale=D ** -0.5)
    w, bV, bU = rnd(L, scale=L ** -0.5), rnd(L, scale=0.1), rnd(L, scale=0.1)
    weights = [t.requires_grad_() for t in (V, U, w, bV, bU)]
    dz = rnd(len(lengths), D)

    def call():
        for t in weights:
            t.grad = None
        if workload == "infer":
            with torch.no_grad():
                return fastmil.attention_pool(x, V, U, w, attn_bias=bV, gate_bias=bU,
                                              offsets=offsets, return_attention=True,
                                              backend="triton")
        xin = x.detach().requires_grad_(workload == "e2e")
        z = fastmil.attention_pool(xin, V, U, w, attn_bias=bV, gate_bias=bU, offsets=offsets,
                                   backend="triton")
        z.backward(dz.reshape(z.shape))
        return z

    return call, {"case": case, "lengths": len(lengths), "T": sum(lengths), "D": D, "L": L,
                  "dtype": dtype, "workload": workload}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="wsi", choices=sorted(CASES))
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU tensors, Triton's interpreter, tiny sizes (nothing profiled)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("ncu_target: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    call, info = build(args.case, args.dry_run)
    for _ in range(2):  # compile, warm up
        call()
    if args.dry_run:
        call()
    else:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("ncu_target: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
