"""Where one call's time goes, beside the harness's timings.

    python -m benchmarks.profile host [--device cpu|cuda] [--json FILE]
    python -m benchmarks.profile launches [--json FILE]
    python -m benchmarks.profile ncu CASE     (under: ncu --profile-from-start off ...)

**host**: µs of host time per training call (x trainable, forward and backward) and per
inference call, of fastmil's AttentionPool (direct launches, and through ``JITFunction.run``)
and of the eager formulation, at the MNIST-bags shape and one slide. On a CPU fastmil's kernels
are compiled for sm_90 and launched through Triton's whole launch path into a stand-in driver
(``tests/standin_driver.py``) that skips only the final C launch; the aten ops run on CPU
tensors with D = L = 1 and a slide of 1,000 instances, so that their arithmetic stays a few µs
for both. With ``--device cuda``: the real calls at full size, *host* until the call returns
(the GPU idle before it), *wall* until the GPU is done. **launches**: kernels per call (CUDA:
torch.profiler; CPU: Triton launches plus the aten ops that make a kernel). **ncu**: one call of
a GPU-suite case between ``cudaProfilerStart`` and ``cudaProfilerStop``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

import torch

from .harness import SUITES, host_ms, make_inputs, runner, sync

HOST_CASES = ("mnist", "slide")
# aten ops that make no kernel on a GPU (views and metadata)
_NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "permute", "as_strided", "select",
              "slice", "squeeze", "unsqueeze", "expand", "detach", "alias", "reshape",
              "split", "split_with_sizes", "unbind", "narrow", "empty", "empty_strided",
              "new_empty", "new_empty_strided",
              "is_same_size", "_to_copy_view", "lift_fresh", "set_", "_reshape_alias"}


def _host_case(name: str, cuda: bool):
    case = next(c for c in SUITES["gpu"] if c.name == name)
    if cuda:
        return case
    lengths = (1000,) if name == "slide" else case.lengths
    return dataclasses.replace(case, lengths=lengths, D=1, L=1, dtype="fp32")


@contextlib.contextmanager
def standin_kernels(record: bool = True):
    """fastmil's kernels compiled for sm_90 and launched through Triton's launch path into a
    stand-in driver, on CPU tensors (the documented seam: the stand-in driver, and
    ``fastmil.triton_backend.triton_unavailable_reason``, which otherwise sends CPU tensors to
    the interpreter). Yields the list of recorded launches."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the stand-in driver compiles the kernels: unset TRITON_INTERPRET")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tests"))
    import standin_driver
    from triton.runtime.driver import driver

    from fastmil import triton_backend

    driver.set_active(standin_driver.StandInDriver(90, record=record))
    saved = triton_backend.triton_unavailable_reason
    triton_backend.triton_unavailable_reason = lambda x: None
    try:
        yield standin_driver.LAUNCHES
    finally:
        triton_backend.triton_unavailable_reason = saved
        driver._active = None  # (reset_active would look for a real GPU driver)


def measure_host(device, reps: int, warmup: int, rounds: int = 10) -> dict:
    """Host (and on CUDA wall) µs per call of each provider and workload; the calls of all of
    them are interleaved in ``rounds`` rounds, so that a neighbour's load falls on all alike."""
    from fastmil.kernels.config import kernel_options

    torch.set_num_threads(1)
    cuda = device.type == "cuda"
    configs, shapes = [], {}
    for name in HOST_CASES:
        case = _host_case(name, cuda)
        shapes[name] = case.describe()
        inp = make_inputs(case, device)
        for provider, launch in (("fastmil", "direct"), ("fastmil", "jit"), ("eager", None)):
            for workload in ("train", "infer"):
                configs.append(((name, provider, launch, workload),
                                runner(provider, case, workload, inp), []))
    for r in range(rounds):
        for key, run, times in configs:
            with kernel_options(direct_launch=key[2] != "jit"):
                times.append(host_ms(run, device, max(1, reps // rounds), warmup if r == 0 else 0))
    rows = []
    for (name, provider, launch, workload), _, times in configs:
        host = 1e3 * sorted(t[0] for t in times)[len(times) // 2]
        wall = 1e3 * sorted(t[1] for t in times)[len(times) // 2]
        rows.append(dict(shape=name, provider=provider, launch=launch, workload=workload,
                         host_us=round(host, 1), wall_us=round(wall, 1) if cuda else None))
        print(f"{name:<6} {provider:<8} {launch or '':<7} {workload:<6} host {host:8.1f} µs"
              + (f"  wall {wall:8.1f} µs" if cuda else ""), flush=True)
    return dict(device=torch.cuda.get_device_name() if cuda else "CPU, stand-in sm_90 driver",
                torch=torch.__version__, threads=1, reps=reps, shapes=shapes, rows=rows)


def host_table(result: dict) -> str:
    """Markdown: host µs per call, fastmil (direct launches, and through the JIT) and eager."""
    by = {(r["shape"], r["provider"], r["launch"], r["workload"]): r for r in result["rows"]}
    lines = [f"Host time per call, µs ({result['device']}, one thread, {result['reps']} calls "
             "each, interleaved, median of the rounds' medians; "
             f"{'; '.join(f'{k}: {v}' for k, v in result['shapes'].items())}):",
             "", "| shape | workload | fastmil | fastmil, launches through the JIT | eager "
             "| fastmil ÷ eager |", "| :--- | :--- | ---: | ---: | ---: | ---: |"]
    for shape in result["shapes"]:
        for workload in ("train", "infer"):
            mine = by[(shape, "fastmil", "direct", workload)]["host_us"]
            jit = by[(shape, "fastmil", "jit", workload)]["host_us"]
            eager = by[(shape, "eager", None, workload)]["host_us"]
            lines.append(f"| {shape} | {workload} | {mine:.0f} | {jit:.0f} | {eager:.0f} "
                         f"| {mine / eager:.2f} |")
    return "\n".join(lines) + "\n"


class _AtenCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_KERNEL:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_launches(device) -> dict:
    """Kernels per call, per case and workload, for fastmil and eager."""
    from .harness import kernel_profile

    cuda = device.type == "cuda"
    cases = SUITES["gpu"] if cuda else [_host_case(n, False) for n in HOST_CASES]
    rows = []
    for case in cases:
        inp = make_inputs(case, device)
        for provider in ("fastmil", "eager"):
            for workload in ("frozen", "train", "infer"):
                run = runner(provider, case, workload, inp)
                run()
                if cuda:
                    count = kernel_profile(run, device)["launches"]
                else:  # (standin_kernels put tests/ on the path)
                    from standin_driver import LAUNCHES

                    LAUNCHES.clear()
                    with _AtenCounter() as aten:
                        run()
                    count = aten.count + len(LAUNCHES)
                rows.append(dict(case=case.name, provider=provider, workload=workload,
                                 launches=count))
                print(f"{case.name:<16} {provider:<8} {workload:<7} {count}", flush=True)
        del inp
    return dict(device=torch.cuda.get_device_name() if cuda else "CPU proxy (aten ops + Triton "
                "launches)", rows=rows)


def ncu_call(case_name: str) -> None:
    case = next(c for c in SUITES["gpu"] if c.name == case_name)
    device = torch.device("cuda")
    run = runner("fastmil", case, case.workloads[0], make_inputs(case, device))
    run()
    run()  # compiled and cached
    sync(device)
    torch.cuda.cudart().cudaProfilerStart()
    run()
    sync(device)
    torch.cuda.cudart().cudaProfilerStop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    host = sub.add_parser("host", help="host time per call")
    host.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    host.add_argument("--reps", type=int, default=300)
    host.add_argument("--warmup", type=int, default=20)
    host.add_argument("--json")
    launches = sub.add_parser("launches", help="kernels per call")
    launches.add_argument("--json")
    ncu = sub.add_parser("ncu", help="one call for Nsight Compute")
    ncu.add_argument("case")
    args = ap.parse_args(argv)
    if args.what == "ncu":
        ncu_call(args.case)
        return 0
    cuda = torch.cuda.is_available() and getattr(args, "device", "cuda") == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    with contextlib.nullcontext() if cuda else standin_kernels(record=args.what != "host"):
        result = measure_host(device, args.reps, args.warmup) if args.what == "host" \
            else count_launches(device)
    if args.what == "host":
        print(host_table(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
