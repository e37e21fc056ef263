"""Time every candidate tile of fastmil's Triton kernels per class of problem, on this GPU.

    python -m benchmarks.tile_sweep --out out/tile_sweep          # CUDA, ~5 min on an H100
    python -m benchmarks.tile_sweep --dry-run --out out/tile_sweep # CPU: interpreter, plumbing only

A class is (D, L, K, dtype, gated) and a kernel, timed on one shape that stands for it (never
keyed on bag lengths). Kernels (``--kinds``, the default path's first): ``fwd_pq`` and
``bwd_pq``, the forward and backward of the default path (projections from cuBLAS, kept for the
backward), then ``fwd`` and ``bwd``, those of the fused projection (recompute=True). For each
candidate of ``fastmil.kernels.attention_pool.TILE_CANDIDATES[kind]`` — a tuple ``(BLOCK_N, BLOCK_D,
BLOCK_L, num_warps, num_stages)`` — the sweep sets ``TILE_OVERRIDE[kind]`` to it (the CUDA
launchers then use it), checks z (fwd) or every gradient (bwd) against fastmil's torch backend
in float32, and times the kernel's pass (``fwd*`` = the training forward, ``bwd*`` =
``backward()`` alone in the class's workload: frozen features for the whole-slide classes,
end-to-end for MNIST-bags) twice: the device time of the kind's own Triton kernels
(``kernel_ms``, torch.profiler), which chooses the tile, and the whole call's CUDA-event time
(median, L2 flushed), which a host-bound machine inflates (on the H100 of 2026-11-26 it did,
and chose a forward tile that was slower on the device). A candidate that does
not compile or launch (shared memory, registers) or gives wrong numbers is listed and never
chosen.

Writes ``tile_sweep.json`` (every number, and the chosen table as ``"measured_tiles"``) and
``tile_sweep.md``: a table per class and a ``MEASURED_TILES`` dict to paste into the kernel
module, keyed as the module keys it (``tile_key``: kind, dtype class, gated, D class, L, K);
classes that share a key get the tile with the smallest summed slowdown over them. Without
editing fastmil, ``FASTMIL_TILES=OUT/tile_sweep.json`` makes the launchers use that table (the
GPU check does this for its benchmarks). ``--budget-s`` bounds the run: classes
still left when it is spent are listed as not run, and the files are rewritten after every class,
so a run cut short keeps what it measured. On CPU (``--dry-run``) the launchers ignore
``TILE_OVERRIDE`` (the interpreter has its own tiles): the dry run checks the plumbing only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass

KINDS = ("fwd_pq", "bwd_pq", "fwd", "bwd")  # the default path's kernels first
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2, "bf16": 3e-2}  # as the benchmark suite's


@dataclass(frozen=True)
class TileClass:
    name: str
    D: int
    L: int
    K: int
    dtype: str
    gated: bool
    lengths: tuple[int, ...]  # the shape timed for this class
    grad_x: bool  # bwd workload: end-to-end (True) or frozen features (False)

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]


def _mnist_lengths(n: int) -> tuple[int, ...]:
    rng = random.Random(0)
    return tuple(rng.randint(5, 15) for _ in range(n))


CLASSES = [  # the targets' classes first: a run that spends its budget loses the last ones
    TileClass("wsi-d1024-l256-bf16", 1024, 256, 1, "bf16", True, (100_000,), False),
    TileClass("mnist-d500-l128-fp32", 500, 128, 1, "fp32", True, _mnist_lengths(512), True),
    TileClass("wsi-d1536-l256-bf16", 1536, 256, 1, "bf16", True, (100_000,), False),
    TileClass("clam-mb-d1024-l256-k4-bf16", 1024, 256, 4, "bf16", True, (100_000,), False),
    TileClass("plain-d1024-l256-bf16", 1024, 256, 1, "bf16", False, (100_000,), False),
]
DRY_RUN_CLASSES = [
    TileClass("dry-d64-l32-fp32", 64, 32, 1, "fp32", True, (600,), False),
    TileClass("dry-mnist-d40-l24-fp16", 40, 24, 1, "fp16", True, _mnist_lengths(16), True),
]


def _inputs(c: TileClass, device):
    import torch

    dtype = c.torch_dtype
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    T = sum(c.lengths)
    x = rnd(T, c.D)
    offsets = torch.tensor((0,) + c.lengths).cumsum(0)  # host offsets, as collate gives
    w = {"V": rnd(c.L, c.D, scale=c.D ** -0.5), "U": rnd(c.L, c.D, scale=c.D ** -0.5)
         if c.gated else None, "w": rnd(c.L, scale=c.L ** -0.5) if c.K == 1
         else rnd(c.K, c.L, scale=c.L ** -0.5), "bV": rnd(c.L, scale=0.1),
         "bU": rnd(c.L, scale=0.1) if c.gated else None}
    dz = rnd(len(c.lengths), *((c.K,) if c.K > 1 else ()), c.D)
    return x, offsets, w, dz


def _run(c, x, offsets, w, dz, backend, kind, upcast=False):
    """One call: returns (a callable for the timed part, its setup, the outputs to check)."""
    import fastmil

    def prep(t):
        if t is None:
            return None
        t = t.detach().float() if upcast else t.detach()
        return t.requires_grad_()

    from .providers import kernel_design, recompute_option

    # the benchmark column whose kernels the kind's tiles are for: the default path (cuBLAS
    # projection, p and q kept) for fwd_pq / bwd_pq, the fused projection recomputing for the rest
    column = "fastmil_triton_cublas" if kind.endswith("_pq") else "fastmil_triton"

    def forward():
        leaves = {n: prep(t) for n, t in w.items()}
        xin = x.detach().float() if upcast else x.detach()
        xin.requires_grad_(c.grad_x and kind.startswith("bwd"))
        extra = recompute_option(column) if backend == "triton" else {}
        with kernel_design(column):  # the backward makes p and q as its forward did
            z = fastmil.attention_pool(xin, leaves["V"], leaves["U"], leaves["w"],
                                       attn_bias=leaves["bV"], gate_bias=leaves["bU"],
                                       offsets=None if len(c.lengths) == 1 else offsets,
                                       backend=backend, **extra)
        return z, xin, leaves

    def check():
        z, xin, leaves = forward()
        out = {"z": z.detach().float()}
        if kind.startswith("bwd"):
            z.backward(dz.to(z.dtype).reshape(z.shape))
            grads = {"x": xin} if c.grad_x else {}
            grads.update({n: t for n, t in leaves.items() if t is not None})
            out.update({f"d{n}": t.grad.detach().float() for n, t in grads.items()})
        return out

    if kind.startswith("fwd"):
        return (lambda: (), lambda: forward()), check
    state = {}

    def setup():
        state["z"] = forward()[0]
        return ()

    def step():
        state["z"].backward(dz.to(state["z"].dtype).reshape(state["z"].shape))

    return (setup, step), check


# the Triton kernels whose tiles a kind sets (what kernel_ms adds up)
KERNELS = {"fwd": ("_fwd_kernel", "_merge_kernel"), "fwd_pq": ("_fwd_kernel", "_merge_kernel"),
           "bwd": ("_bwd_kernel",), "bwd_pq": ("_bwd_kernel",)}


def kernel_ms(setup, step, kind: str, reps: int = 5) -> float | None:
    """Device time per call of the kind's own Triton kernels (``KERNELS``), from one
    torch.profiler session around ``reps`` calls (L2 flushed before each); None when the
    profiler saw none of them. Unlike the CUDA-event time of the whole call, this does not move
    with the host's speed: on a host-bound machine a call's wall time hides its kernels."""
    from .timing import _l2_flush, profile_kernels

    flush = _l2_flush()

    def calls():
        for _ in range(reps):
            setup()
            flush()
            step()

    prof = profile_kernels(lambda: (), calls, top=64)
    ms = [k["ms"] for k in prof.get("kernels", []) if k["name"] in KERNELS[kind]]
    return sum(ms) / reps if ms else None


def _time_ms(setup, step, cuda: bool, rep_ms: float) -> float:
    if cuda:
        from .timing import cuda_bench

        return statistics.median(cuda_bench(lambda: (setup(), ())[1], lambda: step(),
                                            rep_ms=rep_ms, warmup=2, min_reps=5))
    times = []
    for _ in range(3):
        setup()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def default_tile(kernels, c: TileClass, kind: str) -> tuple:
    """The tile the launchers pick for this class without an override."""
    return tuple(kernels.gpu_tiles(kind, c.torch_dtype, c.D, c.L, c.K, c.gated))


def table_key(kernels, c: TileClass, kind: str) -> tuple:
    """The key of the kernel module's measured tile tables for this class."""
    return kernels.tile_key(kind, c.torch_dtype, c.D, c.L, c.K, c.gated)


def sweep_class(c: TileClass, kernels, device, rep_ms: float, log, kinds=KINDS) -> dict:
    import torch

    cuda = device.type == "cuda"
    x, offsets, w, dz = _inputs(c, device)
    out = {"class": asdict(c), "kinds": {}}
    for kind in KINDS:
        kernels.TILE_OVERRIDE.pop(kind, None)
    for kind in kinds:
        ref = _run(c, x, offsets, w, dz, "torch", kind, upcast=True)[1]()
        rows = []
        for tile in kernels.TILE_CANDIDATES[kind]:
            row = {"tile": list(tile)}
            kernels.TILE_OVERRIDE[kind] = tuple(tile)
            try:
                t0 = time.perf_counter()
                (setup, step), check = _run(c, x, offsets, w, dz, "triton", kind)
                got = check()  # compiles this variant
                row["compile_s"] = time.perf_counter() - t0
                errs = {n: _rel(got[n], ref[n]) for n in got}
                row["rel_err"] = max(errs.values())
                row["worst"] = max(errs, key=errs.get)
                row["ok"] = row["rel_err"] <= TOLERANCE[c.dtype]
                row["call_ms"] = _time_ms(setup, step, cuda, rep_ms)
                # choose by the kernels' device time where a profiler sees it (CUDA)
                row["kernel_ms"] = kernel_ms(setup, step, kind) if cuda else None
                row["ms"] = row["kernel_ms"] or row["call_ms"]
            except Exception as e:  # does not compile / launch: listed, never chosen
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                           if str(e) else type(e).__name__)
            finally:
                kernels.TILE_OVERRIDE.pop(kind, None)
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            log(f"  {c.name} {kind} {tuple(tile)}: " + (
                f"{row['ms']:.4g} ms, rel err {row['rel_err']:.1e}"
                + ("" if row["ok"] else f" > {TOLERANCE[c.dtype]:g} ({row['worst']})")
                if "ms" in row else f"failed: {row.get('error')}"))
        default = default_tile(kernels, c, kind)
        good = [r for r in rows if r["ok"] and "ms" in r]
        best = min(good, key=lambda r: r["ms"]) if good else None
        base = next((r for r in rows if tuple(r["tile"]) == default and "ms" in r), None)
        out["kinds"][kind] = {"rows": rows, "default": list(default),
                              "key": list(table_key(kernels, c, kind)),
                              "best": None if best is None else best["tile"],
                              "speedup_over_default": (base["ms"] / best["ms"])
                              if best and base else None}
    return out


def markdown(result: dict) -> str:
    env = result["env"]
    out = [f"# Tile sweep: {env['device']}", "",
           f"fastmil {env['fastmil_commit']}, torch {env['torch']}, triton {env['triton']}, "
           f"{env['date_utc']}; `python -m benchmarks.tile_sweep`"
           + (" **(CPU dry run: the interpreter ignores TILE_OVERRIDE; not a measurement)**"
              if env["dry_run"] else "") + ".", "",
           "Tiles are `(BLOCK_N, BLOCK_D, BLOCK_L, num_warps, num_stages)` (fwd_pq / bwd_pq: "
           "the default path, cuBLAS projection kept for the backward; fwd / bwd: the fused "
           "projection, recompute=True). *kernels ms*: device time per call of the kind's own "
           "Triton kernels (torch.profiler), which chooses the tile; *call ms*: median "
           "CUDA-event time of the whole call (fwd*: the training forward, bwd*: backward() "
           "alone), host time included. rel. err is the worst of z / the gradients vs "
           "fastmil's torch backend in float32. ✗ = wrong numbers or failed to compile / "
           "launch.", ""]
    for entry in result["classes"]:
        c = entry["class"]
        shape = (f"B=1, N={c['lengths'][0]:,}" if len(c["lengths"]) == 1 else
                 f"{len(c['lengths'])} bags of {min(c['lengths'])}–{max(c['lengths'])}")
        workload = "end-to-end" if c["grad_x"] else "frozen features"
        out += [f"## {c['name']}", "",
                f"D={c['D']}, L={c['L']}, K={c['K']}, {c['dtype']}, "
                f"{'gated' if c['gated'] else 'plain'}; timed on {shape}; bwd workload: "
                f"{workload}.", ""]
        for kind, k in entry["kinds"].items():
            out += [f"{kind}: default {tuple(k['default'])}, best "
                    f"{tuple(k['best']) if k['best'] else 'none'}"
                    + (f" ({k['speedup_over_default']:.2f}× the default)"
                       if k["speedup_over_default"] else ""), "",
                    "| tile | kernels ms | call ms | rel. err | compile s | |",
                    "| :--- | ---: | ---: | ---: | ---: | :--- |"]
            for r in k["rows"]:
                mark = ("best" if k["best"] == r["tile"] else "") + (
                    " default" if r["tile"] == k["default"] else "")
                if "ms" not in r:
                    out.append(f"| `{tuple(r['tile'])}` | ✗ | | | | {r.get('error', '')} |")
                    continue
                ok = "" if r["ok"] else " ✗"
                kms = "—" if r.get("kernel_ms") is None else f"{r['kernel_ms']:.4g}"
                cms = f"{r.get('call_ms', r['ms']):.4g}"
                out.append(f"| `{tuple(r['tile'])}` | {kms} | {cms} | {r['rel_err']:.1e}{ok} | "
                           f"{r['compile_s']:.1f} | {mark.strip()} |")
            out.append("")
    if result.get("not_run"):
        out += ["Not run (time budget spent): " + ", ".join(result["not_run"]) + ".", ""]
    out += ["## To paste into `fastmil/kernels/attention_pool.py`", "", "```python",
            *measured_tiles(result), "```", ""]
    return "\n".join(out)


def choose_tiles(result: dict) -> list[dict]:
    """The measured tile table: per key the tile with the smallest summed slowdown (time ÷ that
    class's best time) over the classes that share the key, among the tiles that ran correctly
    in all of them. ``[{"key": [...], "tile": [...], "note": "vs the default: ..."}]``: the
    ``"measured_tiles"`` list of tile_sweep.json, which ``FASTMIL_TILES`` reads."""
    groups: dict[tuple, list[tuple[str, dict]]] = {}
    for entry in result["classes"]:
        for k in entry["kinds"].values():
            if k["best"]:
                groups.setdefault(tuple(k["key"]), []).append((entry["class"]["name"], k))
    table = []
    for key, members in groups.items():
        scores = {}
        for _, k in members:
            best_ms = min(r["ms"] for r in k["rows"] if r["ok"] and "ms" in r)
            for r in k["rows"]:
                if r["ok"] and "ms" in r:
                    scores.setdefault(tuple(r["tile"]), []).append(r["ms"] / best_ms)
        scores = {t: sum(v) / len(v) for t, v in scores.items() if len(v) == len(members)}
        if not scores:
            continue
        tile = min(scores, key=scores.get)
        gains = []
        for name, k in members:
            by_tile = {tuple(r["tile"]): r["ms"] for r in k["rows"] if "ms" in r}
            base = by_tile.get(tuple(k["default"]))
            gains.append(f"{name} {base / by_tile[tile]:.2f}x" if base else name)
        note = "vs the default: " + ", ".join(gains)
        if len({tuple(k["default"]) for _, k in members}) > 1:
            note += " (defaults differ)"
        table.append({"key": list(key), "tile": list(tile), "note": note})
    return table


def measured_tiles(result: dict) -> list[str]:
    """``MEASURED_TILES = {...}`` lines of ``choose_tiles``, to paste into the kernel module."""
    lines = ["MEASURED_TILES = {",
             "    # (kind, dtype class, gated, D class, L, K): (BLOCK_N, BLOCK_D, BLOCK_L, "
             "num_warps, num_stages)"]
    for entry in result.get("measured_tiles") or choose_tiles(result):
        lines.append(f"    {tuple(entry['key'])!r}: {tuple(entry['tile'])!r},  # {entry['note']}")
    lines.append("}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/tile_sweep",
                    help="folder for tile_sweep.json and tile_sweep.md (default $OUT)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU: tiny classes in Triton's interpreter (checks the plumbing)")
    ap.add_argument("--classes", default=None,
                    help="comma-separated class names (default: all of the mode)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma-separated kernels to sweep (default {','.join(KINDS)})")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="start no class after this many seconds (default 300)")
    ap.add_argument("--rep-ms", type=float, default=60.0,
                    help="CUDA: milliseconds of timed calls per candidate (default 60)")
    args = ap.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        ap.error(f"--kinds: expected a comma-separated subset of {','.join(KINDS)}, "
                 f"got {args.kinds!r}")
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    from .timing import _version, git_commit

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tile_sweep: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    from fastmil.kernels import attention_pool as kernels

    missing = [n for n in ("TILE_CANDIDATES", "TILE_OVERRIDE") if not hasattr(kernels, n)]
    if missing:
        print(f"tile_sweep: fastmil.kernels.attention_pool has no {', '.join(missing)}: the "
              "kernel module predates the tile interface", file=sys.stderr)
        return 2
    classes = DRY_RUN_CLASSES if args.dry_run else CLASSES
    if args.classes:
        wanted = set(args.classes.split(","))
        classes = [c for c in CLASSES + DRY_RUN_CLASSES if c.name in wanted]
    os.makedirs(args.out, exist_ok=True)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
           "torch": torch.__version__, "triton": _version("triton"),
           "fastmil_commit": git_commit(), "dry_run": args.dry_run,
           "candidates": {k: [list(t) for t in v] for k, v in kernels.TILE_CANDIDATES.items()},
           "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
               "%Y-%m-%d %H:%M UTC")}
    result = {"env": env, "classes": [], "not_run": []}
    deadline = time.monotonic() + args.budget_s

    def log(msg):
        print(msg, flush=True)

    def write():
        result["measured_tiles"] = choose_tiles(result)
        with open(os.path.join(args.out, "tile_sweep.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(args.out, "tile_sweep.md"), "w") as fh:
            fh.write(markdown(result))

    for c in classes:
        if time.monotonic() > deadline:
            result["not_run"].append(c.name)
            continue
        t0 = time.perf_counter()
        log(f"{c.name}:")
        try:
            result["classes"].append(sweep_class(c, kernels, device, args.rep_ms, log, kinds))
        except Exception as e:  # e.g. out of memory building the inputs: go on with the next
            log(f"  {c.name} failed: {type(e).__name__}: {e}")
            result["not_run"].append(f"{c.name} (failed: {type(e).__name__})")
        log(f"  {c.name}: {time.perf_counter() - t0:.0f} s")
        write()
    write()
    print()
    print(markdown(result).split("## To paste")[1].split("\n", 1)[1])
    return 0 if result["classes"] else 1


if __name__ == "__main__":
    sys.exit(main())
