"""Turn benchmark JSON into ``benchmarks/RESULTS.md`` and a plot of time vs bag size.

    python -m benchmarks.report .benchmarks/smoke.json
    python -m benchmarks.report .benchmarks/gpu/*.json          # several runs are merged

Reads pytest-benchmark's ``--benchmark-json`` output (or the suite's stand-in JSON): the numbers
live in each benchmark's ``extra_info`` and in the top-level ``"fastmil"`` entry (environment,
measured peaks, cases, skipped combinations). Later files win on duplicates. Needs only the
standard library and matplotlib (no torch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from collections import defaultdict

PROVIDERS = ("fastmil_triton", "fastmil_torch", "eager", "compile_default",
             "compile_max_autotune", "torchmil", "pyg")
LABELS = {
    "fastmil_triton": "fastmil triton",
    "fastmil_torch": "fastmil torch",
    "eager": "eager (fastmil.reference)",
    "compile_default": "torch.compile (default)",
    "compile_max_autotune": "torch.compile (max-autotune-no-cudagraphs)",
    "torchmil": "torchmil AttentionPool",
    "pyg": "PyG AttentionalAggregation",
}
SHORT = {
    "fastmil_triton": "fastmil triton", "fastmil_torch": "fastmil torch", "eager": "eager",
    "compile_default": "compile", "compile_max_autotune": "compile max-AT",
    "torchmil": "torchmil", "pyg": "PyG",
}
MODES = ("fwd", "bwd", "fwd_bwd")
MODE_LABELS = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd"}
GROUP_LABELS = {"wsi": "whole-slide image", "batched": "batched slides", "mnist": "MNIST-bags",
                "multibranch": "multi-branch"}


# ------------------------------------------------------------------------------------ loading

class Results:
    def __init__(self, paths: list[str]):
        self.paths = paths
        self.records: dict[tuple[str, str, str], dict] = {}
        self.skipped: dict[tuple[str, str, str], dict] = {}
        self.cases: dict[str, dict] = {}
        self.envs: list[dict] = []
        for path in paths:
            with open(path) as fh:
                data = json.load(fh)
            section = data.get("fastmil") or {}
            if section.get("env"):
                self.envs.append(section["env"])
            self.cases.update(section.get("cases") or {})
            for skip in section.get("skipped") or []:
                key = (skip["case"], skip["provider"], skip["mode"])
                self.skipped[key] = skip
                self.records.pop(key, None)
            for bench in data.get("benchmarks", []):
                info = dict(bench.get("extra_info") or {})
                if "provider" not in info:
                    continue
                if "median_ms" not in info and bench.get("stats"):
                    info["median_ms"] = bench["stats"]["median"] * 1e3
                if "median_ms" not in info:
                    continue
                key = (info["case"], info["provider"], info["mode"])
                self.records[key] = info
                self.skipped.pop(key, None)
        self.env = self.envs[-1] if self.envs else {}
        devices = sorted({e.get("device") for e in self.envs})
        self.mixed_devices = devices if len(devices) > 1 else None

    def case_names(self) -> list[str]:
        seen = {k[0] for k in self.records} | {k[0] for k in self.skipped}
        return [name for name in self.cases if name in seen]

    def get(self, case: str, provider: str, mode: str) -> dict | None:
        return self.records.get((case, provider, mode))

    def any_record(self, case: str, mode: str) -> dict | None:
        """A record of this case and mode from any provider (for case-wide numbers)."""
        return next((r for p in PROVIDERS if (r := self.get(case, p, mode))), None)

    def time(self, case: str, provider: str, mode: str = "fwd_bwd") -> float | None:
        rec = self.get(case, provider, mode)
        return None if rec is None else rec["median_ms"]

    def status(self, case: str, provider: str, mode: str) -> str:
        skip = self.skipped.get((case, provider, mode))
        if skip is None:
            return "n/a"
        return "OOM" if skip["status"] == "OOM" else "—"

    @property
    def smoke(self) -> bool:
        return bool(self.env.get("smoke")) or all(c.get("smoke") for c in self.cases.values())


# --------------------------------------------------------------------------------- formatting

def _count(n: int) -> str:
    for unit, name in ((1_000_000, "M"), (1000, "k")):
        if n >= unit and n % (unit // 10) == 0:
            return f"{n / unit:g}{name}"
    return str(n)


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%" if v < 0.1 else f"{100 * v:.0f}%"


def fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else fmt_num(v / 2**20)


def fmt_x(v: float | None) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "∞ (other OOM)"
    return f"{v:.2f}×"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ targets

def _speedup(res: Results, case: str, subject: str, others: list[str]) -> tuple | None:
    """(speedup of subject over the best of others, which other) for fwd+bwd, or None."""
    ts = res.time(case, subject)
    if ts is None:
        return None
    times = [(res.time(case, o), o) for o in others]
    ran = [(t, o) for t, o in times if t is not None]
    if ran:
        t, o = min(ran)
        return t / ts, o
    if any(res.status(case, o, "fwd_bwd") == "OOM" for o in others):
        return math.inf, others[0]
    return None


def target_rows(res: Results, subject: str = "fastmil_triton") -> list[list[str]]:
    full = [n for n in res.case_names() if not res.cases[n].get("smoke")]
    by_group = defaultdict(list)
    for n in full:
        by_group[res.cases[n]["group"]].append(n)
    no_data = ("no data: needs the full suite on a CUDA GPU with the fused kernel"
               if not full else "no data")
    rows = []

    def speed_target(label, groups, others, threshold):
        names = [n for g in groups for n in by_group.get(g, [])]
        got = [(s, n) for n in names if (s := _speedup(res, n, subject, others)) is not None]
        if not got:
            rows.append([label, no_data, "—"])
            return
        (worst, other), case = min(got)
        ok = all(s[0] >= threshold for s, _ in got)
        rows.append([label, f"worst {fmt_x(worst)} vs {SHORT[other]} on `{case}` "
                            f"({len(got)}/{len(names)} cases measured)",
                     "met" if ok else "**not met**"])

    compiles = ["compile_default", "compile_max_autotune"]
    speed_target("fwd+bwd ≥ 2× faster than eager (whole-slide, batched)", ["wsi", "batched"],
                 ["eager"], 2.0)
    speed_target("fwd+bwd ≥ 1.3× faster than the best torch.compile mode (whole-slide, "
                 "batched)", ["wsi", "batched"], compiles, 1.3)
    speed_target("fwd+bwd ≥ 5× faster than eager (MNIST-bags)", ["mnist"], ["eager"], 5.0)

    wsi100k = [n for n in by_group.get("wsi", []) if res.cases[n]["N"] == 100_000]
    for mode in ("fwd", "bwd"):
        label = f"≥ 60% of the measured roofline floor, {MODE_LABELS[mode]} (whole-slide 100k)"
        fr = [(rec["floor_fraction"], n) for n in wsi100k
              if (rec := res.get(n, subject, mode)) and rec.get("floor_fraction") is not None]
        if not fr:
            rows.append([label, no_data, "—"])
        else:
            worst, case = min(fr)
            rows.append([label, f"worst {fmt_pct(worst)} on `{case}` ({len(fr)}/{len(wsi100k)} "
                                "cases)", "met" if worst >= 0.6 else "**not met**"])

    label = "activation memory for backward ≤ 10% of eager's (whole-slide)"
    ratios = []
    for n in by_group.get("wsi", []):
        mine, eager = res.get(n, subject, "fwd_bwd"), res.get(n, "eager", "fwd_bwd")
        if mine and eager and mine.get("saved_bytes") is not None and eager.get("saved_bytes"):
            ratios.append((mine["saved_bytes"] / eager["saved_bytes"], n))
    if not ratios:
        rows.append([label, no_data, "—"])
    else:
        worst, case = max(ratios)
        rows.append([label, f"worst {fmt_pct(worst)} on `{case}` ({len(ratios)} cases)",
                     "met" if worst <= 0.1 else "**not met**"])
    return rows


# ------------------------------------------------------------------------------------- tables

def speedup_table(res: Results, subject: str) -> str | None:
    names = [n for n in res.case_names() if res.time(n, subject) is not None]
    if not names:
        return None
    others = [p for p in PROVIDERS if p != subject]
    rows = []
    for n in names:
        ts = res.time(n, subject)
        cells = []
        for o in others:
            t = res.time(n, o)
            cells.append(fmt_x(t / ts) if t is not None else res.status(n, o, "fwd_bwd"))
        rows.append([f"`{n}`", fmt_ms(ts)] + cells)
    return table(["case", f"{SHORT[subject]} ms"] + [SHORT[o] for o in others], rows)


def case_section(res: Results, name: str, subjects: list[str]) -> str:
    case = res.cases[name]
    out = [f"### `{name}`", "",
           f"{GROUP_LABELS.get(case['group'], case['group'])}: {case['describe']}."]
    floors = {m: rec.get("floor_ms") for m in MODES if (rec := res.any_record(name, m))}
    if any(v is not None for v in floors.values()):
        out.append("Roofline floor: " + ", ".join(
            f"{MODE_LABELS[m]} {fmt_ms(floors[m])} ms" for m in MODES if floors.get(m)) + ".")
    out.append("")
    speed_subject = next((s for s in subjects if res.time(name, s) is not None), None)
    header = (["provider"] + [f"{MODE_LABELS[m]} ms" for m in MODES]
              + ([f"{SHORT[speed_subject]} speedup"] if speed_subject else [])
              + ["fwd+bwd TFLOP/s", "fwd+bwd GB/s", "% floor fwd / bwd / fwd+bwd",
                 "saved for bwd MiB", "peak MiB", "rel. err"])
    rows, notes = [], {}
    for p in PROVIDERS:
        recs = {m: res.get(name, p, m) for m in MODES}
        if not any(recs.values()):
            skips = [res.skipped.get((name, p, m)) for m in MODES]
            skip = next((s for s in skips if s), None)
            if skip is not None:
                notes[p] = skip
            continue
        cells = [LABELS[p]]
        for m in MODES:
            cells.append(fmt_ms(recs[m]["median_ms"]) if recs[m] else res.status(name, p, m))
        if speed_subject:
            ts, t = res.time(name, speed_subject), res.time(name, p)
            cells.append("—" if p == speed_subject else fmt_x(t / ts) if t else "n/a")
        fb = recs["fwd_bwd"]
        cells.append(fmt_num(fb["tflops"]) if fb else "n/a")
        cells.append(fmt_num(fb["gbps"]) if fb else "n/a")
        cells.append(" / ".join(fmt_pct(recs[m].get("floor_fraction")) if recs[m] else "n/a"
                                for m in MODES))
        any_rec = next(r for r in recs.values() if r)
        cells.append(fmt_mib(any_rec.get("saved_bytes")))
        cells.append(fmt_mib(any_rec.get("peak_bytes")))
        err = any_rec.get("rel_err")
        flag = "" if any_rec.get("accurate", True) else " ⚠"
        cells.append(("n/a" if err is None else f"{err:.1e}") + flag)
        rows.append(cells)
    if rows:
        out.append(table(header, rows))
    else:
        out.append("No provider ran.")
    if notes:
        out.append("")
        out.append("Not run: " + "; ".join(
            f"{SHORT[p]} ({'OOM' if s['status'] == 'OOM' else s['reason']})"
            for p, s in notes.items()) + ".")
    return "\n".join(out)


# --------------------------------------------------------------------------------------- plot

def plot(res: Results, path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = defaultdict(list)  # (D, dtype) -> whole-slide cases
    for n in res.case_names():
        c = res.cases[n]
        if c["group"] == "wsi":
            panels[(c["D"], c["dtype"])].append(n)
    panels = {k: v for k, v in panels.items()
              if any(res.time(n, p) is not None for n in v for p in PROVIDERS)}
    if not panels:
        return False
    keys = sorted(panels, key=lambda k: (k[1], k[0]))
    ncols = min(2, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    colors = dict(zip(PROVIDERS, plt.get_cmap("tab10").colors, strict=False))
    markers = dict(zip(PROVIDERS, "o^sDv<>", strict=True))
    for ax, key in zip(axes.flat, keys, strict=False):
        names = sorted(panels[key], key=lambda n: res.cases[n]["N"])
        for p in PROVIDERS:
            pts = [(res.cases[n]["N"], res.time(n, p)) for n in names]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=markers[p], color=colors[p], label=SHORT[p],
                        linewidth=2.4 if p.startswith("fastmil") else 1.3)
        floor = [(res.cases[n]["N"], rec["floor_ms"]) for n in names
                 if (rec := res.any_record(n, "fwd_bwd")) and rec.get("floor_ms")]
        if floor:
            ax.plot(*zip(*floor, strict=True), "k--", marker="_", markersize=12, linewidth=1,
                    label="roofline floor")
        ns = [res.cases[n]["N"] for n in names]
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ns, [_count(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if len(ns) == 1:
            ax.set_xlim(ns[0] / 2, ns[0] * 2)
        ax.set_xlabel("instances per bag N")
        ax.set_ylabel("forward+backward time (ms, median)")
        ax.set_title(f"whole-slide, D={key[0]}, {key[1]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    device = res.env.get("device", "?")
    kind = "CPU smoke run" if res.smoke else "full suite"
    fig.suptitle(f"attention_pool forward+backward vs bag size — {device} ({kind})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------- report

HOW_TO_RUN = """\
```bash
# CI smoke run (tiny shapes, CPU; smoke is also the default when CUDA is absent)
pytest benchmarks/ --smoke -q

# this page, from a run
pytest benchmarks/ -q --benchmark-json=.benchmarks/run.json   # add --cpu-threads 1 on a busy CPU
python -m benchmarks.report .benchmarks/run.json                # writes RESULTS.md + the plot

# full suite on a CUDA machine (splits into chunks, merges them into this page)
benchmarks/run_gpu.sh                       # or: benchmarks/run_gpu.sh wsi-bf16 batched ...
```

Select with `-k` on the test ids `<case>-<provider>-<mode>`, e.g. `-k "wsi and bf16"`,
`-k "not max_autotune"`. Options: `--smoke`, `--bench-rounds N` (pytest-benchmark rounds, default
5), `--bench-rep-ms MS` (CUDA: time spent in timed calls per test, default 200),
`--cpu-threads N`, `--tf32`."""

METHOD = """\
- **Providers.** fastmil `backend="triton"` (CUDA only) and `backend="torch"` on their native
  layout (one bag `[N, D]`, or packed `[T, D]` + offsets); the eager padded formulation users
  write today (`fastmil.reference.eager_attention_pool`, `[B, N, D]` + mask); `torch.compile` of
  it (`dynamic=False`, default and `max-autotune-no-cudagraphs`); torchmil's `AttentionPool`
  (padded + mask, one branch only); PyG's `AttentionalAggregation` (packed rows + `index`; for
  K > 1 the same `softmax` + `scatter` recipe on K columns). All use the same weights; gated
  attention with biases on V and U; every x and weight requires grad. Layout conversions happen
  outside the timed region.
- **Modes.** `fwd`: the training forward (graph recorded); `bwd`: backward alone (the forward
  runs untimed before each call); `fwd+bwd`: both. Gradients are dropped before each call.
- **Timing.** CUDA: CUDA events around each call after an untimed setup and a 256 MiB L2 flush,
  inputs rotated over up to 4 sets (while x is under 256 MiB), 3 warm-up calls, then calls for
  `--bench-rep-ms` (at least 10); the median is reported (p20/p80 in the JSON). CPU:
  pytest-benchmark's `pedantic` (perf_counter, 1 warm-up round, 2 input sets). Warm-up / compile
  time is recorded separately.
- **Cost model** (per real instance; padding is not useful work): forward `4·L·D + 2·L·K +
  2·D·K` flops; backward `3 × 4·L·D` (dh, dV/dU and the recompute of the projections) `+
  4·L·K + 4·D·K`; bytes: x read once forward, read once and dx written once backward, plus
  weights (and their gradients) and z / dz.
- **Roofline floor** `max(flops / peak, bytes / bandwidth)` with the peaks measured at the
  start of the same run: a bf16 matmul (16-bit cases), a tf32 matmul (fp32 cases on CUDA; strict
  fp32 on CPU) and a device-to-device copy counted as read + write. "% floor" = floor / time.
  The backward count includes the recompute of the projections, so a provider that stores them
  instead (eager, compile, torchmil, PyG) does less work than counted and can pass 100%.
- **Memory.** CUDA: `saved for bwd` = allocator growth across the forward minus z (what is held
  for backward), `peak` = `max_memory_allocated` over forward + backward above the inputs
  (gradients included). CPU: bytes of the distinct storages autograd saves
  (`saved_tensors_hooks`, inputs and weights excluded); no peak.
- **Accuracy.** z is compared with `fastmil.reference.attention_pool_reference` (relative RMS);
  fastmil providers fail above 5e-3 (fp32) / 3e-2 (bf16); others are timed and flagged ⚠."""


def env_table(res: Results) -> str:
    env = res.env
    peaks = []
    for key, label in (("peak_bf16_tflops", "bf16 matmul"), ("peak_tf32_tflops", "tf32 matmul"),
                       ("peak_fp32_tflops", "fp32 matmul")):
        if env.get(key) is not None:
            peaks.append(f"{label} {fmt_num(env[key])} TFLOP/s")
    if env.get("peak_copy_gbps") is not None:
        peaks.append(f"copy {fmt_num(env['peak_copy_gbps'])} GB/s")
    rows = [["device", str(env.get("device"))
             + (f" ({env.get('device_memory_gib')} GiB, {env.get('sm_count')} SMs)"
                if env.get("device_type") == "cuda" else
                f", torch threads: {env.get('cpu_threads')}")],
            ["measured peaks", ", ".join(peaks) or "n/a"],
            ["date", str(env.get("date_utc"))],
            ["fastmil", f"{env.get('fastmil')} (commit {env.get('fastmil_commit')})"],
            ["torch / CUDA / triton", f"{env.get('torch')} / {env.get('cuda')} / "
                                      f"{env.get('triton')}"],
            ["torchmil / torch_geometric", f"{env.get('torchmil')} / "
                                           f"{env.get('torch_geometric')}"],
            ["pytest-benchmark / python", f"{env.get('pytest_benchmark')} / "
                                          f"{env.get('python')}"],
            ["fp32 matmul", f"allow_tf32={env.get('allow_tf32_matmul')}, "
                            f"float32_matmul_precision={env.get('float32_matmul_precision')!r} "
                            "(eager / compile / torchmil / PyG run fp32 as configured here)"]]
    if res.mixed_devices:
        rows.append(["warning", "merged runs come from different devices: "
                     + ", ".join(map(str, res.mixed_devices))])
    return table(["", ""], rows, "ll")


def render(res: Results, plot_name: str | None, note: str | None = None) -> str:
    env = res.env
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = ", ".join(f"`{os.path.relpath(p)}`" for p in res.paths)
    out = ["# fastmil benchmarks: `attention_pool`", "",
           f"Generated by `python -m benchmarks.report` on {now} from {sources}.", ""]
    if res.smoke or env.get("device_type") != "cuda":
        out += ["> **CPU smoke run: GPU numbers are still missing.** These are the tiny smoke "
                "shapes on CPU, with the torch-backend providers only (the fastmil triton "
                "column is GPU-only; torch.compile runs on one shape). They show that the "
                "suite runs, not how fast fastmil is. Run `benchmarks/run_gpu.sh` on a CUDA "
                "machine and commit the RESULTS.md and plot it writes.", ""]
    if note:
        out += [f"> {note}", ""]
    out += ["## Running the suite", "", HOW_TO_RUN, "", "## Method", "", METHOD, "",
            "## Environment", "", env_table(res), "",
            "## Targets (fused kernel, forward+backward unless stated)", "",
            table(["target", "measured", "status"], target_rows(res), "lll"), ""]

    subjects = [s for s in ("fastmil_triton", "fastmil_torch")
                if any(res.time(n, s) is not None for n in res.case_names())]
    out += ["## Speedups (forward+backward)", ""]
    if not subjects:
        out += ["No fastmil timings in this run.", ""]
    for s in subjects:
        out += [f"Time of each provider ÷ time of **{LABELS[s]}** (> 1: {SHORT[s]} is faster; "
                "— = not available here, OOM = out of memory).", "",
                speedup_table(res, s), ""]
    if plot_name:
        out += ["## Time vs bag size", "", f"![forward+backward time vs bag size]({plot_name})",
                ""]
    out += ["## Results per case", "",
            "Median times; TFLOP/s and GB/s from the cost model above; rel. err = relative RMS "
            "error of z vs `fastmil.reference`.", ""]
    for name in res.case_names():
        out += [case_section(res, name, subjects), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) from pytest benchmarks/")
    ap.add_argument("--out", default=os.path.join(here, "RESULTS.md"))
    ap.add_argument("--plot", default=None,
                    help="PNG path (default: time_vs_bag_size.png next to --out)")
    ap.add_argument("--note", default=None, help="a remark to print under the title")
    args = ap.parse_args(argv)
    res = Results(args.json)
    if not res.records:
        print("no benchmark records in " + ", ".join(args.json), file=sys.stderr)
        return 1
    plot_path = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                          "time_vs_bag_size.png")
    plotted = plot(res, plot_path)
    rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.out)))
    text = render(res, rel if plotted else None, args.note)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}" + (f" and {plot_path}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
