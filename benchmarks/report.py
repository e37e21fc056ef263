"""Turn benchmark JSON into ``benchmarks/RESULTS.md`` and a plot of time vs bag size.

    python -m benchmarks.report .benchmarks/smoke.json
    python -m benchmarks.report .benchmarks/gpu/*.json          # several runs are merged
    python -m benchmarks.report out/gpu_check/bench.json --launches out/gpu_check/launches.json

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

# also the order in which a case's providers run: the slow-to-compile ones last
PROVIDERS = ("fastmil_triton", "fastmil_triton_save", "fastmil_triton_cublas",
             "fastmil_triton_cublas_recompute", "fastmil_triton_cublas_fma",
             "fastmil_triton_cublas_16sm", "fastmil_torch", "eager", "compile_default",
             "compile_max_autotune", "torchmil", "pyg",
             # CUDA graphs last: no profiler session of another provider runs while a captured
             # graph is alive (tearing CUPTI down under live graphs has crashed processes)
             "fastmil_triton_graph", "eager_graph")
LABELS = {
    "fastmil_triton": "fastmil triton, fused projection (recompute=True)",
    "fastmil_triton_save": "fastmil triton, fused projection (recompute=False)",
    "fastmil_triton_cublas": "fastmil triton, cuBLAS projection (recompute=False; the default)",
    "fastmil_triton_cublas_recompute": "fastmil triton, cuBLAS projection (recompute=True)",
    "fastmil_triton_cublas_fma": "fastmil triton, cuBLAS projection, one-branch sum by FMA "
                                 "(recompute=False)",
    "fastmil_triton_cublas_16sm": "fastmil triton, cuBLAS projection, chunks for 16 programs "
                                  "per SM (recompute=False)",
    "fastmil_torch": "fastmil torch",
    "eager": "eager (fastmil.reference)",
    "fastmil_triton_graph": "fastmil triton, fwd+bwd replayed as CUDA graphs",
    "eager_graph": "eager, fwd+bwd replayed as CUDA graphs",
    "compile_default": "torch.compile (default)",
    "compile_max_autotune": "torch.compile (max-autotune-no-cudagraphs)",
    "torchmil": "torchmil AttentionPool",
    "pyg": "PyG AttentionalAggregation",
}
SHORT = {
    "fastmil_triton": "triton fused recompute", "fastmil_triton_save": "triton fused save",
    "fastmil_triton_cublas": "triton cuBLAS (default)",
    "fastmil_triton_cublas_recompute": "triton cuBLAS recompute",
    "fastmil_triton_cublas_fma": "triton cuBLAS FMA-sum",
    "fastmil_triton_cublas_16sm": "triton cuBLAS 16/SM",
    "fastmil_torch": "fastmil torch", "eager": "eager",
    "fastmil_triton_graph": "triton graphed", "eager_graph": "eager graphed",
    "compile_default": "compile", "compile_max_autotune": "compile max-AT",
    "torchmil": "torchmil", "pyg": "PyG",
}
MODES = ("fwd", "bwd", "fwd_bwd", "frozen", "infer")  # as benchmarks.cases.MODES
MODE_LABELS = {"fwd": "fwd", "bwd": "bwd", "fwd_bwd": "fwd+bwd", "frozen": "frozen fwd+bwd",
               "infer": "inference fwd"}
WORKLOADS = {"fwd": "end-to-end", "bwd": "end-to-end", "fwd_bwd": "end-to-end",
             "frozen": "frozen features", "infer": "inference"}
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
        return {"OOM": "OOM", "failed": "failed", "budget": "no time"}.get(skip["status"], "—")

    def modes(self, case: str) -> list[str]:
        """The modes this case was run (or skipped) in, in MODES order."""
        seen = {k[2] for k in self.records if k[0] == case}
        seen |= {k[2] for k in self.skipped if k[0] == case}
        return [m for m in MODES if m in seen]

    def find_role(self, role: str, mode: str) -> str | None:
        """The case standing for ``role`` with records in ``mode``: a full-size one if the run
        has one, else a smoke stand-in."""
        names = [n for n in self.case_names() if self.cases[n].get("role") == role
                 and mode in self.modes(n)]
        names.sort(key=lambda n: bool(self.cases[n].get("smoke")))
        return names[0] if names else None

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

# The targets of issue 8, each on the shape (case role, see benchmarks.cases) and mode it is
# defined on. "speed": (other provider, minimum speed-up of fastmil over it); "floor": minimum
# fraction of the measured roofline floor; "memory": maximum ratio of the bytes saved for
# backward to eager's. The subjects are fastmil's triton columns.
TARGETS = [
    {"workload": "frozen features, fwd+bwd", "shape": "B=1, N=100k, D=1024, L=256, bf16",
     "role": "wsi-100k-d1024", "mode": "frozen",
     "speed": [("eager", 2.0), ("compile_default", 1.3)]},
    {"workload": "frozen features, fwd+bwd",
     "shape": "8–16 slides packed, 1k–50k each, D=1024, L=256, bf16", "role": "batched",
     "mode": "frozen", "speed": [("eager", 2.0)], "note": "eager on padded + mask"},
    {"workload": "end-to-end, fwd+bwd", "shape": "512 bags of 5–15, D=500, L=128, fp32",
     "role": "mnist", "mode": "fwd_bwd", "speed": [("eager", 5.0)]},
    {"workload": "inference, fwd", "shape": "B=1, N=100k, D=1536, L=256, bf16",
     "role": "wsi-100k-d1536", "mode": "infer", "speed": [("eager", 2.0)], "floor": 0.6},
    {"workload": "memory kept for backward", "shape": "N=100k, D=1024, L=256 (frozen features)",
     "role": "wsi-100k-d1024", "mode": "frozen", "memory": 0.1,
     "subjects": ["fastmil_triton", "fastmil_triton_cublas_recompute"]},
]
TARGET_SUBJECTS = ("fastmil_triton_cublas", "fastmil_triton_cublas_recompute", "fastmil_triton",
                   "fastmil_triton_save", "fastmil_triton_cublas_fma",
                   "fastmil_triton_cublas_16sm")


def _target_text(t: dict) -> str:
    parts = [f"≥ {x:g}× {SHORT[o]}" for o, x in t.get("speed", [])]
    if "floor" in t:
        parts.append(f"≥ {100 * t['floor']:.0f}% of the measured roofline floor")
    if "memory" in t:
        parts.append(f"saved for backward ≤ {100 * t['memory']:.0f}% of eager's "
                     "(recompute=True)")
    return "; ".join(parts) + (f" ({t['note']})" if t.get("note") else "")


def _target_cell(res: Results, t: dict, case: str, subject: str) -> tuple[str, bool | None]:
    """(what was measured, whether the target is met: None when it could not be judged)."""
    mode = t["mode"]
    if "memory" in t:
        mine, eager = res.get(case, subject, mode), res.get(case, "eager", mode)
        if not mine or not eager or mine.get("saved_bytes") is None or not eager.get(
                "saved_bytes"):
            return res.status(case, subject, mode) if not mine else "n/a", None
        ratio = mine["saved_bytes"] / eager["saved_bytes"]
        text = (f"{fmt_mib(mine['saved_bytes'])} MiB = {fmt_pct(ratio)} of eager's "
                f"{fmt_mib(eager['saved_bytes'])} MiB")
        if mine.get("kept_bytes") is not None and eager.get("kept_bytes"):
            text += (f" (allocator: {fmt_mib(mine['kept_bytes'])} vs "
                     f"{fmt_mib(eager['kept_bytes'])} MiB)")
        return text, ratio <= t["memory"]
    ts = res.time(case, subject, mode)
    if ts is None:
        return res.status(case, subject, mode), None
    parts, verdicts = [f"{fmt_ms(ts)} ms"], []
    for other, need in t.get("speed", []):
        to = res.time(case, other, mode)
        if to is None:
            status = res.status(case, other, mode)
            parts.append(f"{SHORT[other]} {status}")
            verdicts.append(True if status == "OOM" else None)  # it ran where the other did not
        else:
            parts.append(f"{fmt_x(to / ts)} {SHORT[other]}")
            verdicts.append(to / ts >= need)
    if "floor" in t:
        frac = (res.get(case, subject, mode) or {}).get("floor_fraction")
        parts.append("floor n/a" if frac is None else f"{fmt_pct(frac)} of the floor")
        verdicts.append(None if frac is None else frac >= t["floor"])
    if False in verdicts:
        return ", ".join(parts), False
    return ", ".join(parts), None if None in verdicts else True


def target_rows(res: Results) -> list[list[str]]:
    rows = []
    for t in TARGETS:
        case = res.find_role(t["role"], t["mode"])
        subjects = t.get("subjects", TARGET_SUBJECTS)
        if case is None:
            rows.append([t["workload"], t["shape"], _target_text(t), "not in this run"]
                        + ["n/a" for _ in TARGET_SUBJECTS] + ["no data"])
            continue
        cells, verdicts = [], {}
        for sub in TARGET_SUBJECTS:
            if sub not in subjects:
                cells.append("—")
                continue
            text, verdicts[sub] = _target_cell(res, t, case, sub)
            cells.append(text)
        met = [SHORT[s] for s, ok in verdicts.items() if ok]
        if met:
            status = "met by " + ", ".join(met)
        elif False in verdicts.values():
            status = "**not met**"
        else:
            status = "no data"
        if res.cases[case].get("smoke") and status != "no data":
            status += " (on a smoke stand-in)"
        rows.append([t["workload"], t["shape"], _target_text(t), f"`{case}`"] + cells
                    + [status])
    return rows


def targets_table(res: Results) -> str:
    header = (["workload", "shape", "target", "measured on"] + [LABELS[s] for s in TARGET_SUBJECTS]
              + ["status"])
    return table(header, target_rows(res), "l" * len(header))


# ------------------------------------------------------------------------------------- tables

def speedup_table(res: Results, subject: str, mode: str) -> str | None:
    names = [n for n in res.case_names() if res.time(n, subject, mode) is not None]
    if not names:
        return None
    others = [p for p in PROVIDERS if p != subject
              and any(res.get(n, p, mode) or (n, p, mode) in res.skipped for n in names)]
    rows = []
    for n in names:
        ts = res.time(n, subject, mode)
        cells = []
        for o in others:
            t = res.time(n, o, mode)
            cells.append(fmt_x(t / ts) if t is not None else res.status(n, o, mode))
        rows.append([f"`{n}`", fmt_ms(ts)] + cells)
    return table(["case", f"{SHORT[subject]} ms"] + [SHORT[o] for o in others], rows)


def _per_workload(recs: dict, key: str, fmt) -> str:
    """One value per workload present (e2e from fwd_bwd, else any e2e mode), joined by ' / '."""
    vals = []
    for modes in (("fwd_bwd", "fwd", "bwd"), ("frozen",), ("infer",)):
        rec = next((recs[m] for m in modes if recs.get(m)), None)
        if any(m in recs for m in modes):
            vals.append(fmt(rec.get(key)) if rec else "n/a")
    return " / ".join(vals) or "n/a"


def case_section(res: Results, name: str, subjects: list[str]) -> str:
    case = res.cases[name]
    modes = res.modes(name)
    out = [f"### `{name}`", "",
           f"{GROUP_LABELS.get(case['group'], case['group'])}: {case['describe']}; "
           f"workloads: {', '.join(MODE_LABELS[m] for m in modes)}."]
    floors = {m: rec.get("floor_ms") for m in modes if (rec := res.any_record(name, m))}
    if any(v is not None for v in floors.values()):
        out.append("Roofline floor: " + ", ".join(
            f"{MODE_LABELS[m]} {fmt_ms(floors[m])} ms" for m in modes if floors.get(m)) + ".")
    out.append("")
    workloads = " / ".join(w for w, ms in (("e2e", ("fwd", "bwd", "fwd_bwd")),
                                          ("frozen", ("frozen",)), ("infer", ("infer",)))
                           if any(m in modes for m in ms))
    header = (["provider"] + [f"{MODE_LABELS[m]} ms" for m in modes]
              + [f"% floor {' / '.join(MODE_LABELS[m] for m in modes)}",
                 f"saved for bwd MiB ({workloads})", f"peak MiB ({workloads})", "rel. err"])
    rows, notes = [], {}
    for p in PROVIDERS:
        recs = {m: res.get(name, p, m) for m in modes}
        if not any(recs.values()):
            skips = [res.skipped.get((name, p, m)) for m in modes]
            skip = next((s for s in skips if s), None)
            if skip is not None:
                notes[p] = skip
            continue
        cells = [LABELS[p]]
        for m in modes:
            cells.append(fmt_ms(recs[m]["median_ms"]) if recs[m] else res.status(name, p, m))
        cells.append(" / ".join(fmt_pct(recs[m].get("floor_fraction")) if recs[m] else "n/a"
                                for m in modes))
        present = {m: r for m, r in recs.items() if r}
        cells.append(_per_workload(present | {m: None for m in modes if m not in present},
                                   "saved_bytes", fmt_mib))
        cells.append(_per_workload(present | {m: None for m in modes if m not in present},
                                   "peak_bytes", fmt_mib))
        errs = [r.get("rel_err") for r in present.values() if r.get("rel_err") is not None]
        flag = "" if all(r.get("accurate", True) for r in present.values()) else " ⚠"
        cells.append((f"{max(errs):.1e}" if errs else "n/a") + flag)
        rows.append(cells)
    out.append(table(header, rows) if rows else "No provider ran.")
    if notes:
        out.append("")
        out.append("Not run: " + "; ".join(
            f"{SHORT[p]} ({'OOM' if s['status'] == 'OOM' else s['reason']})"
            for p, s in notes.items()) + ".")
    return "\n".join(out)


# ------------------------------------------------------------------------- where the time goes

BREAKDOWN_PROVIDERS = ("fastmil_triton", "fastmil_triton_save", "fastmil_triton_cublas",
                       "fastmil_triton_cublas_recompute", "fastmil_triton_cublas_fma",
                       "fastmil_triton_cublas_16sm", "eager", "compile_default",
                       "fastmil_triton_graph", "eager_graph")
GEMM_LABELS = {"proj": "projection x [T, D] @ W [D, 2L]", "dw": "weight gradient dpqᵀ @ x",
               "dx": "input gradient dpq @ Wᵀ"}


def gemm_counts(provider: str, mode: str) -> dict[str, int]:
    """The GEMMs of one call of ``mode``, in units of the cuBLAS reference (``"gemm"`` of a case,
    benchmarks.timing.gemm_reference): the projection in the forward, and again in the backward
    of fastmil triton with recompute=True; the weight gradient in every backward; the input
    gradient end to end."""
    backward = mode in ("bwd", "fwd_bwd", "frozen")
    recompute = provider in ("fastmil_triton", "fastmil_triton_cublas_recompute")
    counts = {"proj": (mode != "bwd") + (backward and recompute),
              "dw": backward, "dx": mode in ("bwd", "fwd_bwd")}
    return {k: int(n) for k, n in counts.items() if n}


def gemm_ms(gemm: dict | None, provider: str, mode: str) -> float | None:
    """cuBLAS time of the GEMMs ``provider`` does in one call of ``mode`` (``gemm_counts``)."""
    if not gemm or "proj_ms" not in gemm:
        return None
    return sum(n * gemm[f"{k}_ms"] for k, n in gemm_counts(provider, mode).items())


def time_split(rec: dict, gemm: dict | None, provider: str, mode: str) -> dict | None:
    """The numbers of one profiled record: kernel time, memcpy / memset time, the rest of the
    measured median (launch, host and idle time between kernels) and the provider's GEMMs in
    cuBLAS time; None without a profile."""
    if not rec.get("kernels"):
        return None
    kernels = rec["kernels_total_ms"]
    copies = (rec.get("memcpy_ms") or 0) + (rec.get("memset_ms") or 0)
    return {"measured": rec["median_ms"], "kernels": kernels, "copies": copies,
            "rest": rec["median_ms"] - kernels - copies, "gemm": gemm_ms(gemm, provider, mode)}


def _share(ms: float, total: float) -> str:
    return fmt_pct(ms / total) if total else "n/a"


def _clip(name: str, width: int) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def _code(name: str) -> str:
    """A kernel name as inline code in a markdown table."""
    return "`" + name.replace("|", "\\|") + "`"


def _kernel_list(rec: dict, n: int = 4) -> str:
    total, ks = rec["kernels_total_ms"], rec["kernels"]
    parts = [f"{_code(k['name'])} {fmt_ms(k['ms'])} ({_share(k['ms'], total)})"
             + (f" ×{k['count']}" if k["count"] > 1 else "") for k in ks[:n]]
    if ks[n:]:
        ms = sum(k["ms"] for k in ks[n:])
        parts.append(f"{sum(k['count'] for k in ks[n:])} more {fmt_ms(ms)} ({_share(ms, total)})")
    return "; ".join(parts)


def _profiled(rec: dict | None) -> bool:
    """Whether a record went through the kernel profile (with a result or an error)."""
    return bool(rec and (rec.get("kernels") or rec.get("kernels_error")))


def _breakdown_cases(res: Results) -> list[tuple[str, str]]:
    """(case, mode) of each target with a profiled record, in the order of TARGETS."""
    out = []
    for t in TARGETS:
        case = res.find_role(t["role"], t["mode"])
        if case is None or (case, t["mode"]) in out:
            continue
        if any(_profiled(res.get(case, p, t["mode"])) for p in BREAKDOWN_PROVIDERS):
            out.append((case, t["mode"]))
    return out


def _gemm_line(gemm: dict | None, mode: str) -> str:
    if not gemm:
        return "No cuBLAS reference for this case."
    if "error" in gemm:
        return f"cuBLAS reference failed: {gemm['error']}."
    precision = (f", fp32 matmul precision {gemm.get('float32_matmul_precision')!r}"
                 if gemm.get("dtype") == "float32" else "")
    used = {k for p in BREAKDOWN_PROVIDERS for k in gemm_counts(p, mode)}
    return (f"cuBLAS alone on this shape (torch.mm, {gemm.get('dtype')}{precision}): "
            + ", ".join(f"{GEMM_LABELS[k]} {fmt_ms(gemm[f'{k}_ms'])} ms "
                        f"({fmt_num(gemm[f'{k}_tflops'])} TFLOP/s)" for k in GEMM_LABELS
                        if k in used) + ".")


def _fused_vs_cublas(res: Results, case: str, mode: str, gemm: dict | None) -> list[str]:
    """fastmil's forward / backward kernels against cuBLAS's time for the GEMMs they fuse."""
    if not gemm or "proj_ms" not in gemm:
        return []
    out = []
    for p in ("fastmil_triton", "fastmil_triton_save"):
        rec = res.get(case, p, mode) or {}
        fwd = gemm["proj_ms"] if mode != "bwd" else None
        bwd = (gemm_ms(gemm, p, mode) or 0) - (fwd or 0)
        parts = []
        for k in rec.get("kernels") or []:
            ref, what = ((fwd, "the projection") if "fwd_kernel" in k["name"] else
                         (bwd, "the backward's GEMMs") if "bwd_kernel" in k["name"] else
                         (None, None))
            if ref:
                parts.append(f"{_code(k['name'])} {fmt_ms(k['ms'])} ms = {fmt_x(k['ms'] / ref)} "
                             f"cuBLAS's {fmt_ms(ref)} ms for {what}")
        if parts:
            out.append(f"- {LABELS[p]}: " + "; ".join(parts) + ".")
    return out


def breakdown_section(res: Results) -> str | None:
    """Per target shape: the device time per kernel of one call of each provider, the rest of
    the measured time, and the cuBLAS reference of the case's GEMMs."""
    cases = _breakdown_cases(res)
    if not cases:
        return None
    out = ["Device time per kernel of one call (torch.profiler after the timed calls, L2 "
           "flushed) beside the measured median. *rest* = measured − kernels − memcpy / memset: "
           "launch, host and idle time between kernels. *cuBLAS GEMMs* = torch.mm's time, "
           "measured alone in the same run, for the GEMMs that provider's algorithm does (the "
           "projection; again in a recompute=True backward; the weight gradient; end to end the "
           "input gradient): what those GEMMs cost at cuBLAS speed; *kernels ÷ GEMMs* = how far "
           "all of the provider's kernels are from it.", ""]
    after = [r["launch_us_after_profile"] for r in res.records.values()
             if r.get("launch_us_after_profile") is not None]
    if after and res.env.get("launch_us") is not None:
        out += [f"Host time per launch of a trivial kernel: {res.env['launch_us']:.1f} µs before "
                f"the first profile, {min(after):.1f}–{max(after):.1f} µs after each (a profiler "
                "left attached would slow the launches of the tests timed after it).", ""]
    header = ["provider", "measured ms", "kernels ms (launches)", "memcpy / memset",
              "rest ms", "cuBLAS GEMMs ms", "kernels ÷ GEMMs", "top kernels: ms (% of kernels)"]
    for case, mode in cases:
        gemm = res.cases[case].get("gemm")
        rows, notes = [], []
        for p in BREAKDOWN_PROVIDERS:
            rec = res.get(case, p, mode)
            if not _profiled(rec):
                continue
            s = time_split(rec, gemm, p, mode)
            if s is None:
                rows.append([LABELS[p], fmt_ms(rec["median_ms"])] + ["n/a"] * 5
                            + [f"profile failed: {rec['kernels_error']}"])
                continue
            copies = f"{rec.get('memcpy_count', 0)} / {rec.get('memset_count', 0)}"
            if s["copies"]:
                copies += f" ({fmt_ms(s['copies'])} ms)"
            if rec.get("kernels_note"):
                notes.append(f"⚠ {LABELS[p]}: {rec['kernels_note']}.")
            rows.append([LABELS[p] + (" ⚠" if rec.get("kernels_note") else ""),
                         fmt_ms(s["measured"]),
                         f"{fmt_ms(s['kernels'])} ({rec.get('kernels_count', '?')})", copies,
                         f"{fmt_ms(s['rest'])} ({_share(s['rest'], s['measured'])})",
                         fmt_ms(s["gemm"]),
                         fmt_x(s["kernels"] / s["gemm"]) if s["gemm"] else "n/a",
                         _kernel_list(rec)])
        out += [f"**`{case}`**, {MODE_LABELS[mode]} ({res.cases[case].get('describe')}). "
                + _gemm_line(gemm, mode), "", table(header, rows, "lrrrrrrl"), ""]
        notes = _fused_vs_cublas(res, case, mode, gemm) + notes
        out += notes + ([""] if notes else [])
    return "\n".join(out).rstrip()


def time_split_lines(res: Results) -> list[str]:
    """One line per target shape for the summary: fastmil's time = kernels (+ memcpy / memset)
    + rest, its top two kernels, and its GEMMs at cuBLAS speed."""
    lines = []
    for case, mode in _breakdown_cases(res):
        gemm = res.cases[case].get("gemm")
        parts = []
        for p in TARGET_SUBJECTS:
            rec = res.get(case, p, mode) or {}
            s = time_split(rec, gemm, p, mode)
            if s is None:
                continue
            top = ", ".join(f"{_clip(k['name'], 24)} {_share(k['ms'], s['kernels'])}"
                            for k in rec["kernels"][:2])
            copies = f" + memcpy / memset {fmt_ms(s['copies'])}" if s["copies"] else ""
            parts.append(f"{SHORT[p]} {fmt_ms(s['measured'])} ms = kernels "
                         f"{fmt_ms(s['kernels'])} ({top}){copies} + rest {fmt_ms(s['rest'])}, "
                         f"cuBLAS GEMMs {fmt_ms(s['gemm'])}")
        if parts:
            lines.append(f"time split, {case} {MODE_LABELS[mode]}: " + "; ".join(parts))
    failed = [f"{SHORT[p]} on {case}: {rec['kernels_error']}" for case, mode in
              _breakdown_cases(res) for p in BREAKDOWN_PROVIDERS
              if (rec := res.get(case, p, mode)) and rec.get("kernels_error")]
    if failed:
        lines.append(f"kernel profile failed ({len(failed)}×): " + failed[0]
                     + ("; ..." if len(failed) > 1 else ""))
    return lines


# ----------------------------------------------------------------------------- kernel launches

def launches_section(paths: list[str]) -> str:
    """Tables of ``python -m benchmarks.launch_count`` JSON files."""
    out = []
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        out += [launch_table(data), ""]
    return "\n".join(out).rstrip()


def launch_table(data: dict) -> str:
    env = data.get("env", {})
    cuda = data.get("method") == "cuda"
    head = (f"{data.get('shape')}, {env.get('device')}, fastmil {env.get('fastmil_commit')}: "
            + ("CUDA kernel launches of one call (torch.profiler CUDA kernel events; memcpy / "
               "memset counted apart)" if cuda else
               "**CPU proxy, not CUDA launches**: the aten ops that do work, called from Python, "
               "autograd or a custom op (views, allocations, no-op conversions left out; "
               "\"int-only\" ops work on offsets / lengths / masks, which on a GPU run launch "
               "nothing when those live on the host) + Triton kernel launches (interpreter); see "
               "benchmarks/launch_count.py"))
    workloads = [w for w in ("frozen", "e2e", "infer")
                 if any(r["workload"] == w for r in data["rows"])]
    header = ["provider"] + [WORKLOAD_LABELS[w] for w in workloads]
    by = {(r["provider"], r["workload"]): r for r in data["rows"]}
    rows = []
    for p in PROVIDERS:
        if not any((p, w) in by for w in workloads):
            continue
        cells = [LABELS[p]]
        for w in workloads:
            r = by.get((p, w))
            cells.append("n/a" if r is None else r.get("error") and "failed" or _launch_cell(r))
        rows.append(cells)
    return head + "\n\n" + table(header, rows)


WORKLOAD_LABELS = {"frozen": "frozen features fwd+bwd", "e2e": "end-to-end fwd+bwd",
                   "infer": "inference fwd"}


def _launch_cell(r: dict) -> str:
    if "cuda_kernels" in r:
        extra = [f"{r[k]} {k}" for k in ("memcpy", "memset") if r.get(k)]
        return str(r["cuda_kernels"]) + (f" (+ {', '.join(extra)})" if extra else "")
    return (f"{r['proxy']} ({r['aten_ops']} aten, {r.get('int_ops', '?')} of them int-only, "
            f"+ {r['triton_launches']} triton)")


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
    colors = {p: plt.get_cmap("tab20")(i) for i, p in enumerate(PROVIDERS)}
    markers = dict(zip(PROVIDERS, "oPXds^*hDv<>pH", strict=True))
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

# the GPU check: CUDA kernel tests, the targets' shapes in their workloads, kernel launches
benchmarks/gpu_check.sh                     # ~7 min on an H100; results under $OUT or out/gpu_check
benchmarks/gpu_check.sh --dry-run           # the same on CPU: tiny shapes, Triton's interpreter
python -m benchmarks.report OUT/bench.json --launches OUT/launches.json   # into this page

# full suite on a CUDA machine (splits into chunks, merges them into this page)
benchmarks/run_gpu.sh                       # or: benchmarks/run_gpu.sh wsi-bf16 batched ...
```

Select with `-k` on the test ids `<case>-<provider>-<mode>`, e.g. `-k "wsi and bf16"`,
`-k "not max_autotune"`, `-k frozen`. Options: `--suite full|smoke|gpu-check|dry-run`
(`--smoke` = `--suite smoke`), `--bench-rounds N` (pytest-benchmark rounds, default 5),
`--bench-rep-ms MS` (CUDA: time spent in timed calls per test, default 200), `--bench-budget-s S`
(skip what would start after S seconds), `--fastmil-json PATH` (results written after every
test), `--cpu-threads N`, `--tf32`, `--kernel-profile auto|on|off` (CUDA: per-kernel device time
and the cuBLAS GEMM reference; auto = in the gpu-check suite)."""

METHOD = """\
- **Providers.** fastmil `backend="triton"` (CUDA; the GPU check's dry run uses Triton's
  interpreter on CPU) with `recompute=True` (memory-lean: the backward recomputes the
  projections) and `recompute=False` (the forward saves them), and `backend="torch"` (its
  default), on their native layout (one bag `[N, D]`, or packed `[T, D]` + offsets on x's
  device); the eager padded formulation users write today
  (`fastmil.reference.eager_attention_pool`, `[B, N, D]` + mask); `torch.compile` of it
  (`dynamic=False`, default and `max-autotune-no-cudagraphs`); torchmil's `AttentionPool`
  (padded + mask, one branch only); PyG's `AttentionalAggregation` (packed rows + `index`; for
  K > 1 the same `softmax` + `scatter` recipe on K columns). All use the same weights; gated
  attention with biases on V and U; the weights require grad. Layout conversions happen outside
  the timed region.
- **Workloads and modes.** End-to-end (x requires grad): `fwd` (the training forward, graph
  recorded), `bwd` (backward alone; the forward runs untimed before each call), `fwd+bwd`.
  Frozen features (x does not require grad, the weights do): `frozen fwd+bwd`. Inference:
  `inference fwd` under `torch.no_grad()` with `return_attention=True` (torchmil returns its raw
  scores; PyG cannot return the weights and is not run). Gradients are dropped before each call.
- **Timing.** CUDA: CUDA events around each call after an untimed setup and a 256 MiB L2 flush,
  inputs rotated over up to 4 sets (while x is under 256 MiB), 3 warm-up calls, then calls for
  `--bench-rep-ms` (at least 10); the median is reported (p20/p80 in the JSON). CPU:
  pytest-benchmark's `pedantic` (perf_counter, 1 warm-up round, 2 input sets). Warm-up / compile
  time is recorded separately.
- **Cost model** (per real instance; padding is not useful work): forward `4·L·D + 2·L·K +
  2·D·K` flops; backward `3 × 4·L·D` (dh, dV/dU and the recompute of the projections) `+
  4·L·K + 4·D·K`, frozen backward `2 × 4·L·D` (no dh) `+ 4·L·K + 2·D·K`; bytes: x read once
  forward, read once and dx written once backward (frozen: no dx), plus weights (and their
  gradients) and z / dz; inference also writes the fp32 attention.
- **Roofline floor** `max(flops / peak, bytes / bandwidth)` with the peaks measured at the
  start of the same run: a bf16 matmul (16-bit cases), a tf32 matmul (fp32 cases on CUDA; strict
  fp32 on CPU) and a device-to-device copy counted as read + write. "% floor" = floor / time.
  The backward count includes the recompute of the projections, so a provider that stores them
  instead (eager, compile, torchmil, PyG, fastmil with `recompute=False`) does less work than
  counted and can pass 100%.
- **Memory.** `saved for bwd` = bytes of the distinct storages autograd saves for backward,
  seen through `torch.autograd.graph.saved_tensors_hooks` (inputs and weights left out), on
  every device; the memory target compares these. On CUDA also `kept` = allocator growth across
  the forward minus its outputs (in the JSON and the targets table) and `peak` =
  `max_memory_allocated` over forward (+ backward) above the inputs (gradients included).
- **Where the time goes** (CUDA, the GPU check): after a test's timed calls, one more call under
  torch.profiler (CUDA activity, L2 flushed, behind a short spin kernel that shows the capture
  started in time) gives the device time per kernel; the median minus the kernels and memcpy /
  memset is launch, host and idle time. Per case, `torch.mm` (cuBLAS) is timed alone on the
  case's GEMMs: the projection x [T, D] @ W [D, 2L], the weight gradient dpqᵀ @ x and the input
  gradient dpq @ Wᵀ, in the case's dtype (fp32 at the run's matmul precision).
- **Accuracy.** z (and for inference the attention) is compared with
  `fastmil.reference.attention_pool_reference` (relative RMS); fastmil providers fail above
  5e-3 (fp32) / 3e-2 (16-bit); others are timed and flagged ⚠."""


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
    tiles = env.get("tiles")
    if tiles:
        entries = "; ".join(f"{tuple(k)} → {tuple(t)}" for k, t in tiles.get("entries", []))
        rows.append(["GPU tiles", tiles["source"] + (f": {entries}" if entries else "")
                     + (f" (error: {tiles['error']})" if tiles.get("error") else "")])
    if res.mixed_devices:
        rows.append(["warning", "merged runs come from different devices: "
                     + ", ".join(map(str, res.mixed_devices))])
    return table(["", ""], rows, "ll")


def _banner(res: Results) -> list[str]:
    env = res.env
    if env.get("device_type") == "cuda" and not res.smoke:
        return []
    if env.get("suite") == "dry-run":
        return ["> **CPU dry run of the GPU check: not a measurement.** Tiny stand-ins of the "
                "targets' shapes, fastmil triton in Triton's interpreter: they show that "
                "`benchmarks/gpu_check.sh` runs end to end, not how fast anything is.", ""]
    return ["> **CPU smoke run: GPU numbers are still missing.** These are the tiny smoke "
            "shapes on CPU, with the torch-backend providers only (the fastmil triton column is "
            "GPU-only; torch.compile runs on one shape). They show that the suite runs, not how "
            "fast fastmil is. Run `benchmarks/gpu_check.sh` (or `benchmarks/run_gpu.sh`) on a "
            "CUDA machine and commit the RESULTS.md it writes.", ""]


def render(res: Results, plot_name: str | None, notes: list[str] | None = None,
           launches: list[str] | None = None) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = ", ".join(f"`{os.path.relpath(p)}`" for p in res.paths + (launches or []))
    out = ["# fastmil benchmarks: `attention_pool`", "",
           f"Generated by `python -m benchmarks.report` on {now} from {sources}.", ""]
    out += _banner(res)
    for note in notes or []:
        out += [f"> {note}", ""]
    out += [f"## Targets ({res.env.get('device')})", "",
            "Each target on the shape and workload it is defined on, for each variant "
            "of the fused kernels; speed-ups are the other provider's median time ÷ fastmil's.",
            "", targets_table(res), ""]
    breakdown = breakdown_section(res)
    if breakdown:
        out += ["## Where the time goes", "", breakdown, ""]
    out += ["## Environment", "", env_table(res), ""]
    subjects = [s for s in ("fastmil_triton_cublas", "fastmil_triton", "fastmil_triton_save",
                            "fastmil_triton_cublas_recompute", "fastmil_triton_cublas_fma",
                            "fastmil_triton_cublas_16sm", "fastmil_torch")
                if any(res.time(n, s, m) is not None for n in res.case_names() for m in MODES)]
    out += ["## Speedups", ""]
    if not subjects:
        out += ["No fastmil timings in this run.", ""]
    for mode in ("frozen", "fwd_bwd", "infer"):  # one table per workload, vs the fused kernel
        tab, s = next(((t, s) for s in subjects if (t := speedup_table(res, s, mode))),
                      (None, None))
        if tab is None:
            continue
        out += [f"{MODE_LABELS[mode]} ({WORKLOADS[mode]}): time of each provider ÷ time of "
                f"**{LABELS[s]}** (> 1: {SHORT[s]} is faster; — = not available here, OOM = out "
                "of memory).", "", tab, ""]
    if launches:
        out += ["## Kernel launches (MNIST-bags shape)", "", launches_section(launches), ""]
    if plot_name:
        out += ["## Time vs bag size", "", f"![forward+backward time vs bag size]({plot_name})",
                ""]
    out += ["## Results per case", "",
            "Median times; rel. err = relative RMS error of z (and the attention) vs "
            "`fastmil.reference`, the largest over the workloads.", ""]
    for name in res.case_names():
        out += [case_section(res, name, subjects), ""]
    out += ["## Running the suite", "", HOW_TO_RUN, "", "## Method", "", METHOD, ""]
    return "\n".join(out).rstrip() + "\n"


def summary(res: Results, launches: list[str] | None = None) -> str:
    """The short table the GPU check prints last."""
    env = res.env
    out = [f"device: {env.get('device')}; fastmil {env.get('fastmil_commit')}; torch "
           f"{env.get('torch')}, triton {env.get('triton')}"]
    peaks = [f"{k[5:-7]} {fmt_num(env[k])} TFLOP/s" for k in ("peak_bf16_tflops",
                                                            "peak_tf32_tflops") if env.get(k)]
    if env.get("peak_copy_gbps"):
        peaks.append(f"copy {fmt_num(env['peak_copy_gbps'])} GB/s")
    out += ["measured peaks: " + ", ".join(peaks), ""]
    split = time_split_lines(res)
    out += split + ([""] if split else []) + [targets_table(res)]
    if launches:
        out += ["", launches_section(launches)]
    failed = sorted({(k[0], k[1]) for k, v in res.skipped.items() if v["status"] == "failed"})
    if failed:
        out += ["", "failed: " + "; ".join(f"{p} on {c}" for c, p in failed)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) from pytest benchmarks/")
    ap.add_argument("--out", default=os.path.join(here, "RESULTS.md"))
    ap.add_argument("--plot", default=None,
                    help="PNG path (default: time_vs_bag_size.png next to --out)")
    ap.add_argument("--no-plot", action="store_true", help="write no plot")
    ap.add_argument("--note", action="append", default=[],
                    help="a remark to print under the title (repeatable)")
    ap.add_argument("--launches", action="append", default=[],
                    help="JSON of python -m benchmarks.launch_count (repeatable)")
    ap.add_argument("--summary", action="store_true",
                    help="also print the targets (and launches) table to stdout")
    args = ap.parse_args(argv)
    res = Results(args.json)
    if not res.records:
        print("no benchmark records in " + ", ".join(args.json), file=sys.stderr)
        return 1
    plot_path = args.plot or os.path.join(os.path.dirname(os.path.abspath(args.out)),
                                          "time_vs_bag_size.png")
    plotted = not args.no_plot and plot(res, plot_path)
    rel = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.out)))
    text = render(res, rel if plotted else None, args.note, args.launches)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(f"wrote {args.out}" + (f" and {plot_path}" if plotted else ""))
    if args.summary:
        print()
        print(summary(res, args.launches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
