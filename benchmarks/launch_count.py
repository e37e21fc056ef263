"""Count the kernels one call of attention-MIL pooling launches, per provider and workload.

    python -m benchmarks.launch_count                       # MNIST-bags shape, this machine
    python -m benchmarks.launch_count --json out/launches.json --md benchmarks/LAUNCHES.md
    python -m benchmarks.launch_count --fastmil-root /tmp/before ...   # another checkout's fastmil
    python -m benchmarks.launch_count --before B.json --after A.json --md LAUNCHES.md  # a table

The shape is MNIST-bags (512 bags of 5–15 instances, D=500, L=128, fp32; ``--bags``, ``--D``
... change it), where every kernel is tiny and the launch count decides the time. Workloads:
``frozen`` (x without grad, forward + backward), ``e2e`` (x requires grad, forward + backward)
and ``infer`` (``torch.no_grad()``, forward with ``return_attention=True``). Packed offsets are
on the host, as ``fastmil.collate`` makes them; eager gets padded ``[B, N, D]`` + mask.

* **CUDA**: the kernels of one call as torch.profiler records them on the device (CUDA
  activities: kernels; memcpy and memset counted apart), after a warm-up call.
* **CPU proxy** (always recorded, the only count on a CPU machine): the aten ops called from
  Python, from an autograd node or from a custom op (not from inside another aten op) that do
  work — views, allocations, metadata and no-op conversions left out — plus the Triton kernel
  launches (``kernel[grid](...)`` calls, counted by wrapping Triton's launcher; on CPU the
  kernels run in Triton's interpreter, whose own tensor copies are left out). It tracks the
  CUDA count of a change ("before" vs "after") but is not a CUDA launch count: an aten op may
  launch several kernels or none (work on host tensors, such as checking offsets that live on
  the CPU, launches nothing on a GPU), a copy may be a memcpy, and cuBLAS may add its own.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import os
import random
import sys
from collections import Counter

# aten ops that launch no kernel: views, allocations, metadata, host-side scalars
NO_KERNEL = frozenset(f"aten::{n}" for n in """
    empty empty_strided empty_like new_empty new_empty_strided view _unsafe_view reshape
    _reshape_alias as_strided expand expand_as t transpose permute unsqueeze squeeze select slice
    narrow split split_with_sizes unbind chunk diagonal view_as detach alias lift_fresh
    resolve_conj resolve_neg set_ result_type size stride sym_size sym_stride is_same_size
    _has_compatible_shallow_copy_type scalar_tensor record_stream is_nonzero numel dim
    _local_scalar_dense item to _to_copy contiguous resize_ flatten ravel unflatten movedim
    promote_types is_floating_point is_complex
    """.split())
# reads of a tensor's value on the host: a device-to-host sync when the tensor is on a GPU
HOST_READS = frozenset({"aten::_local_scalar_dense"})
WORKLOADS = ("frozen", "e2e", "infer")
PROVIDERS = ("fastmil_triton_cublas", "fastmil_triton", "fastmil_triton_save", "fastmil_torch",
             "eager")


def _use_fastmil_root(root: str | None) -> None:
    """Import fastmil from ``root`` (another checkout, e.g. a ``git worktree`` of an older
    commit) instead of this one."""
    if root is None:
        return
    root = os.path.abspath(root)
    sys.path.insert(0, root)
    import fastmil

    where = os.path.dirname(os.path.dirname(os.path.abspath(fastmil.__file__)))
    if where != root:
        raise SystemExit(f"--fastmil-root {root}: fastmil was imported from {where}")


@contextlib.contextmanager
def count_triton_launches():
    """Counter of ``kernel[grid](...)`` launches by kernel name, while the block runs."""
    import torch

    counts: Counter = Counter()
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        yield counts
        return
    original = KernelInterface.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)
        name = getattr(getattr(self, "fn", None), "__name__", None) or type(self).__name__

        def counted(*args, **kwargs):
            counts[name] += 1
            # a marker for profile_once: the interpreter's own copies inside are not the op's
            with torch.profiler.record_function(f"{_LAUNCH}{name}"):
                return launch(*args, **kwargs)

        return counted

    KernelInterface.__getitem__ = getitem
    try:
        yield counts
    finally:
        KernelInterface.__getitem__ = original


_LAUNCH = "triton_launch::"


def _inside_launch(e) -> bool:
    while e is not None:
        if e.name.startswith(_LAUNCH):
            return True
        e = e.cpu_parent
    return False


def _is_aten(e) -> bool:
    return e is not None and e.name.startswith("aten::")


def _does_work(e) -> bool:
    """An aten op that computes something: one outside NO_KERNEL, or one that calls such (a
    conversion ``to`` calls ``copy_``; a ``to`` that returns its input calls nothing)."""
    return e.name not in NO_KERNEL or any(_does_work(c) for c in e.cpu_children if _is_aten(c))


_FLOATS = ("float", "double", "Half", "BFloat16")


def _integer_only(e) -> bool:
    """An op on integer / bool tensors only (offsets, lengths, masks): on a GPU run such ops on
    host offsets launch nothing; on device offsets or masks they are kernels like any other."""
    dtypes = [d for d in (getattr(e, "input_dtypes", None) or []) if d and d not in
              ("Scalar", "ScalarList", "TensorList", "GenericList")]
    return bool(dtypes) and not any(f in d for d in dtypes for f in _FLOATS)


def _is_device_kernel(e, DeviceType) -> bool:
    return getattr(e, "device_type", None) == DeviceType.CUDA


def profile_once(run, cuda: bool) -> dict:
    """Counts of one ``run()`` (already warmed up)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with count_triton_launches() as triton_counts, \
            profile(activities=activities, record_shapes=True) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = list(prof.events())
    aten = Counter()
    host_reads = int_only = 0
    for e in events:
        if _is_device_kernel(e, DeviceType) or not _is_aten(e):
            continue
        if e.name in HOST_READS:
            host_reads += 1
        if _is_aten(e.cpu_parent) or _inside_launch(e):
            continue  # counted with the op that called it / Triton's interpreter at work
        if _does_work(e):
            aten[e.name] += 1
            int_only += _integer_only(e)
    out = {"aten_ops": sum(aten.values()), "triton_launches": sum(triton_counts.values()),
           "int_ops": int_only, "host_reads": host_reads, "aten_by_op": dict(aten.most_common()),
           "triton_by_kernel": dict(triton_counts)}
    out["proxy"] = out["aten_ops"] + out["triton_launches"]
    if cuda:
        from .timing import device_events, device_kind

        names = [name for name, _ in device_events(events)]
        kinds = Counter(map(device_kind, names))
        kernels = Counter(n for n in names if device_kind(n) == "kernel")
        out.update(cuda_kernels=kinds["kernel"], memcpy=kinds["memcpy"], memset=kinds["memset"],
                   cuda_by_kernel=dict(kernels.most_common()))
    return out


def _draw_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)  # as benchmarks.cases draws the MNIST-bags case
    return [rng.randint(lo, hi) for _ in range(n)]


def measure(args) -> dict:
    import torch

    import fastmil
    from benchmarks.eager import eager_attention_pool

    from .providers import kernel_design, recompute_option
    from .timing import git_commit

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    lengths = _draw_lengths(args.bags, args.min_len, args.max_len)
    D, L = args.D, args.L
    x = torch.randn(sum(lengths), D, device=device).to(dtype)
    offsets = torch.tensor([0] + lengths).cumsum(0)  # on the host, as fastmil.collate gives
    xp, mask = fastmil.pad(x, offsets.to(device))
    weights = [(torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()
               for shape, scale in (((L, D), D ** -0.5), ((L, D), D ** -0.5), ((L,), L ** -0.5),
                                    ((L,), 0.1), ((L,), 0.1))]
    V, U, w, bV, bU = weights
    dz = torch.randn(len(lengths), D, device=device).to(dtype)
    has_recompute = "recompute" in inspect.signature(fastmil.attention_pool).parameters

    def pool(provider, inp, attention):
        if provider == "eager":
            return eager_attention_pool(inp, V, U, w, attn_bias=bV, gate_bias=bU, mask=mask,
                                        return_attention=attention)
        backend = provider.split("_")[1]
        extra = {}
        if provider != "fastmil_torch":
            if not has_recompute:
                if provider != "fastmil_triton":
                    raise NotImplementedError("attention_pool has no recompute keyword at this "
                                              "commit")
            else:
                extra = recompute_option(provider)
        with kernel_design(provider):  # the backward makes p and q as its forward did
            return fastmil.attention_pool(inp, V, U, w, attn_bias=bV, gate_bias=bU,
                                          offsets=offsets, return_attention=attention,
                                          backend=backend, **extra)

    def make_run(provider, workload):
        base = xp if provider == "eager" else x

        def run():
            for t in weights:
                t.grad = None
            if workload == "infer":
                with torch.no_grad():
                    pool(provider, base, True)
                return
            inp = base.detach().requires_grad_(workload == "e2e")
            z = pool(provider, inp, False)
            z.backward(dz.reshape(z.shape))

        return run

    rows = []
    for provider in args.providers:
        for workload in args.workloads:
            row = {"provider": provider, "workload": workload}
            try:
                run = make_run(provider, workload)
                run()  # warm-up: JIT compiles, cuBLAS handles, caches
                run()
                row.update(profile_once(run, cuda))
            except Exception as e:  # one provider failing must not lose the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            rows.append(row)
            print(_line(row), flush=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastmil.__file__)))
    env = {"device": torch.cuda.get_device_name(device) if cuda else "CPU",
           "torch": torch.__version__, "fastmil_root": root,
           "fastmil_commit": git_commit(root),
           "triton_interpret": os.environ.get("TRITON_INTERPRET"),
           "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
               "%Y-%m-%d %H:%M UTC")}
    shape = (f"{args.bags} bags of {args.min_len}–{args.max_len} instances (T={sum(lengths)}), "
             f"D={D}, L={L}, {args.dtype}")
    return {"method": "cuda" if cuda else "cpu-proxy", "shape": shape, "env": env, "rows": rows,
            "offsets": "host (as fastmil.collate gives them)"}


def _line(row: dict) -> str:
    head = f"{row['provider']:<22} {row['workload']:<7}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    cuda = f"CUDA kernels {row['cuda_kernels']} (+{row['memcpy']} memcpy, {row['memset']} " \
           f"memset); " if "cuda_kernels" in row else ""
    return (f"{head} {cuda}CPU proxy {row['proxy']} = {row['aten_ops']} aten ops (of which "
            f"{row['int_ops']} on integer/bool tensors only) + {row['triton_launches']} triton "
            f"launches; host reads {row['host_reads']}")


def markdown(before: dict | None, after: dict) -> str:
    """A before/after table of the CPU proxy (or of the CUDA counts, when both have them)."""
    cuda = after["method"] == "cuda" and (before is None or before["method"] == "cuda")
    key = "cuda_kernels" if cuda else "proxy"
    what = ("CUDA kernel launches (torch.profiler)" if cuda else
            "**CPU proxy of the launch count, not CUDA launches**: the aten ops that do work "
            "(views, allocations and no-op conversions left out) + Triton kernel launches (in "
            "the interpreter); \"int-only\" ops work on offsets / lengths / masks only and "
            "launch nothing on a GPU when those live on the host")
    runs = [("before", before), ("after", after)] if before else [("now", after)]
    out = ["# Kernel launches of one call, MNIST-bags shape", "",
           f"{what}, one call, {after['shape']}, packed offsets on the host, eager on padded + "
           "mask. Written by `python -m benchmarks.launch_count` (its docstring says what is "
           "counted); on a GPU, `benchmarks/gpu_check.sh` counts the CUDA kernels "
           "(torch.profiler) and puts them into RESULTS.md.", ""]
    for label, run in runs:
        out.append(f"- {label}: fastmil {run['env']['fastmil_commit']} "
                   f"({run['env']['device']}, torch {run['env']['torch']}, "
                   f"{run['env']['date_utc']})")
    if before:
        commit = (before["env"]["fastmil_commit"] or "REV").split()[0]
        out += ["", "Reproduce:", "", "```bash",
                f"git worktree add /tmp/before {commit}",
                "python -m benchmarks.launch_count --fastmil-root /tmp/before --json before.json",
                "python -m benchmarks.launch_count --json after.json",
                "python -m benchmarks.launch_count --before before.json --after after.json "
                "--md benchmarks/LAUNCHES.md", "```"]
    out.append("")
    header = ["provider", "workload"] + [label for label, _ in runs]
    if before:
        header.append("change")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * 2 + " ---: |" * (len(header) - 2)]

    def cell(run, p, w):
        r = next((r for r in run["rows"] if r["provider"] == p and r["workload"] == w), None)
        if r is None:
            return None, "n/a"
        if "error" in r:
            return None, "— (" + r["error"][:60] + ")"
        detail = (f" ({r['aten_ops']} aten, {r.get('int_ops', '?')} of them int-only, + "
                  f"{r['triton_launches']} triton)" if key == "proxy" else "")
        return r[key], f"{r[key]}{detail}"

    for p in PROVIDERS:
        for w in WORKLOADS:
            vals = [cell(run, p, w) for _, run in runs]
            if all(v is None and t == "n/a" for v, t in vals):
                continue
            row = [p, w] + [t for _, t in vals]
            if before:
                a, b = vals[0][0], vals[-1][0]
                row.append(f"{b - a:+d}" if a is not None and b is not None else "")
            lines.append("| " + " | ".join(row) + " |")
    details = ["", f"What fastmil triton calls by default ({runs[-1][0]}):", ""]
    for r in runs[-1][1]["rows"]:
        if r["provider"] == PROVIDERS[0] and "error" not in r:  # the default path
            ops = ", ".join(f"{n.removeprefix('aten::')} {c}" for n, c in r["aten_by_op"].items())
            kernels = ", ".join(f"{n} {c}" for n, c in r["triton_by_kernel"].items())
            details.append(f"- {r['workload']}: {ops}; Triton: {kernels}")
    return "\n".join(out + lines + details) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--bags", type=int, default=512)
    ap.add_argument("--min-len", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=15)
    ap.add_argument("--D", type=int, default=500)
    ap.add_argument("--L", type=int, default=128)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help=f"comma-separated, of {', '.join(PROVIDERS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--fastmil-root", default=None,
                    help="import fastmil from this checkout (e.g. a git worktree of an older "
                         "commit)")
    ap.add_argument("--json", default=None, help="write the counts here")
    ap.add_argument("--before", default=None,
                    help="JSON of an earlier run: --md then writes a before/after table")
    ap.add_argument("--after", default=None,
                    help="JSON of a later run: with --before and --md, only write the table")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    args = ap.parse_args(argv)
    args.providers = [p for p in args.providers.split(",") if p]
    args.workloads = [w for w in args.workloads.split(",") if w]

    if args.after:  # render two earlier runs, measure nothing
        with open(args.after) as fh:
            _write_markdown(args, json.load(fh))
        return 0

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":  # fastmil triton in Triton's interpreter; set before it is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    _use_fastmil_root(args.fastmil_root)
    result = measure(args)
    if args.json:
        from .timing import write_json

        write_json(args.json, result)
    if args.md:
        _write_markdown(args, result)
    return 1 if all("error" in r for r in result["rows"]) else 0


def _write_markdown(args, after: dict) -> None:
    before = None
    if args.before:
        with open(args.before) as fh:
            before = json.load(fh)
    with open(args.md, "w") as fh:
        fh.write(markdown(before, after))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    sys.exit(main())
