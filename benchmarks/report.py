"""benchmarks/RESULTS.md from one run: the targets, then each case's providers, and a plot.

    python -m benchmarks.report RUN.json [--host HOST.json] [--epoch EPOCH.json] \
        [--out benchmarks/RESULTS.md] [--plot benchmarks/results.png] [--note TEXT]

RUN.json is pytest-benchmark's JSON of ``pytest benchmarks/ --benchmark-json=RUN.json``,
HOST.json ``python -m benchmarks.profile host --json``'s, EPOCH.json ``python -m
benchmarks.epoch --out``'s. A GPU run's files are kept as one compact results file:
``python -m benchmarks.report RUN.json --host HOST.json --epoch EPOCH.json --compact FILE``.
"""

from __future__ import annotations

import argparse
import json
import sys

FASTMIL_KERNELS = {"fwd": "_fwd_kernel", "bwd": "_bwd_kernel"}
LAUNCH_LIMIT = 6


def load(path: str) -> dict:
    """{"env": ..., "rows": [extra_info of each timed test]} from pytest-benchmark's JSON (or a
    compact results file)."""
    with open(path) as fh:
        data = json.load(fh)
    if "rows" in data:  # already compact
        return data
    return dict(env=data.get("fastmil", {}),
                rows=[b["extra_info"] for b in data["benchmarks"] if "wall_ms" in b["extra_info"]])


def _row(rows, case, provider, workload):
    return next((r for r in rows if (r["case"], r["provider"], r["workload"])
                 == (case, provider, workload)), None)


def _ratio(rows, case, workload, other, provider="fastmil"):
    """other's wall time ÷ fastmil's (> 1: fastmil faster), or None."""
    mine, theirs = _row(rows, case, provider, workload), _row(rows, case, other, workload)
    if mine is None or theirs is None:
        return None
    return theirs["wall_ms"] / mine["wall_ms"]


def _status(value, target, higher=True):
    if value is None:
        return "not measured"
    return "**met**" if (value >= target if higher else value <= target) else "not met"


def _kernel_bandwidth(run, case_name="slide"):
    """Fraction of the measured copy bandwidth reached by fastmil's forward and backward kernels
    on the slide (frozen features), from their device time and the bytes they must move."""
    row = _row(run["rows"], case_name, "fastmil", "frozen")
    gbs = run["env"].get("peaks", {}).get("copy_gbs")
    if row is None or not gbs or "top" not in row:
        return {}
    from .harness import DTYPES, SUITES  # (torch: only for a run that has kernel times)

    case = next(c for c in SUITES["gpu"] if c.name == case_name)  # gated (GL = 2L), K = 1
    T, D, L, e = case.T, case.D, case.L, DTYPES[case.dtype].itemsize
    moved = {"fwd": T * (D + 2 * L) * e + 4 * T,  # x, p and q read; the scores written
             "bwd": T * (D + 4 * L) * e + 4 * T}  # x, p and q read; dp, dq written; scores read
    out = {}
    for kind, name in FASTMIL_KERNELS.items():
        hit = [ms for kernel, (_, ms) in row["top"].items() if kernel.startswith(name)]
        if hit:
            out[kind] = moved[kind] / (hit[0] / 1e3) / 1e9 / gbs
    return out


def targets(run: dict, host: dict | None) -> list[tuple]:
    """(workload, shape, target, measured, status) per target of the wall-clock issue."""
    rows, out = run["rows"], []

    def speed(label, case, workload, goals):
        parts, ok = [], []
        for other, goal in goals:
            r = _ratio(rows, case, workload, other)
            parts.append(f"{'—' if r is None else f'{r:.2f}×'} {other}")
            ok.append(r is not None and r >= goal)
        measured = ", ".join(parts)
        row = _row(rows, case, "fastmil", workload)
        if row is not None:
            measured = f"{row['wall_ms']:.3g} ms: " + measured
        target = ", ".join(f"≥ {g}× {o}" for o, g in goals)
        status = "not measured" if row is None else ("**met**" if all(ok) else "not met")
        out.append((label, row["describe"] if row else case, target, measured, status))

    speed("frozen features, fwd+bwd", "slide", "frozen", [("eager", 2), ("compile", 1.5)])
    speed("frozen features, fwd+bwd", "slides-8", "frozen", [("eager", 2), ("compile", 1.5)])
    speed("CLAM's step, x trainable", "clam-step-fp32", "train", [("eager", 1.5)])
    speed("CLAM's step, x trainable", "clam-step-bf16", "train", [("eager", 1.5)])
    speed("end to end, fwd+bwd", "mnist", "train", [("eager", 2)])
    speed("inference (+ attention)", "inference", "infer", [("eager", 1.5), ("compile", 1.3)])
    row = _row(rows, "inference", "fastmil", "infer")
    share = None if row is None else row.get("of_floor")
    out.append(("inference, roofline", row["describe"] if row else "inference", "≥ 60% of the "
                "floor", "—" if share is None else f"{share:.0%}", _status(share, 0.6)))
    if host:
        for shape, goal in (("slide", 0.6), ("mnist", 0.8)):
            r = {(h["provider"], h["launch"]): h["host_us"] for h in host["rows"]
                 if h["shape"] == shape and h["workload"] == "train"}
            mine, eager = r.get(("fastmil", "direct")), r.get(("eager", None))
            ratio = mine / eager if mine and eager else None
            out.append(("host time per training call", f"{shape} ({host['device']})",
                        f"≤ {goal}× eager's", "—" if ratio is None else
                        f"{mine:.0f} µs = {ratio:.2f}× eager's {eager:.0f} µs",
                        _status(ratio, goal, higher=False)))
    counts = {f"{r['case']} {r['workload']}": r["launches"] for r in rows
              if r["provider"] == "fastmil" and "launches" in r}
    worst = max(counts.values(), default=None)
    out.append(("kernels per training call", "every workload", f"≤ {LAUNCH_LIMIT}, copies apart",
                ", ".join(f"{k}: {v}" for k, v in counts.items()) or "—",
                _status(worst, LAUNCH_LIMIT, higher=False)))
    bw = _kernel_bandwidth(run)
    for kind, goal in (("fwd", 0.75), ("bwd", 0.65)):
        value = bw.get(kind)
        out.append((f"{'forward' if kind == 'fwd' else 'backward'} kernel, HBM", "slide, bf16",
                    f"≥ {goal:.0%} of the copy bandwidth",
                    "—" if value is None else f"{value:.0%}", _status(value, goal)))
    return out


def case_tables(run: dict) -> list[str]:
    lines = []
    for key in dict.fromkeys((r["case"], r["workload"]) for r in run["rows"]):
        rows = [r for r in run["rows"] if (r["case"], r["workload"]) == key]
        eager = next((r["wall_ms"] for r in rows if r["provider"] == "eager"), None)
        lines += ["", f"**{key[0]}**, {key[1]} ({rows[0]['describe']})", "",
                  "| provider | wall ms | vs eager | kernels ms (launches) | host ms | peak MiB "
                  "| of floor | error |", "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(rows, key=lambda r: r["wall_ms"]):
            kern = f"{r['kernels_ms']:.3g} ({r['launches']})" if "kernels_ms" in r else "—"
            vs = f"{eager / r['wall_ms']:.2f}×" if eager else "—"
            floor = f"{r['of_floor']:.0%}" if r.get("of_floor") else "—"
            peak = "—" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
            host = "—" if r.get("host_ms") is None else f"{r['host_ms']:.3g}"
            lines.append(f"| {r['provider']} | {r['wall_ms']:.3g} | {vs} | {kern} | {host} | "
                         f"{peak} | {floor} | {r['error']:.1e} |")
    return lines


def plot(run: dict, path: str) -> None:
    """Speed-up over eager of each provider, per case (one group of bars per case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys((r["case"], r["workload"]) for r in run["rows"]))
    providers = [p for p in dict.fromkeys(r["provider"] for r in run["rows"]) if p != "eager"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)), 3.6))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        values = [_ratio(run["rows"], c, w, "eager", provider=p) or 0 for c, w in keys]
        ax.bar([k + i * width for k in range(len(keys))], values, width, label=p)
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(keys))],
                  [f"{c}\n{w}" for c, w in keys], fontsize=8)
    ax.set_ylabel("speed-up over eager (wall clock)")
    ax.set_title(f"attention_pool per call, {run['env'].get('device', '?')}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(run: dict, host: dict | None, epoch: dict | None, note: str = "") -> str:
    env = run["env"]
    lines = ["# fastmil benchmark results", "",
             f"{env.get('device', '?')}; fastmil {env.get('commit', '?')}, torch "
             f"{env.get('torch', '?')}, Triton {env.get('triton', '?')}. Generated by "
             "`python -m benchmarks.report`. " + note]
    if epoch:
        from .epoch import render_markdown

        lines += ["", "## One epoch of whole-slide training", "", render_markdown(epoch)]
    lines += ["", "## Targets", "", "| workload | shape | target | measured | status |",
              "| :--- | :--- | :--- | :--- | :--- |"]
    lines += [f"| {' | '.join(row)} |" for row in targets(run, host)]
    if host:
        from .profile import host_table

        lines += ["", "## Host time", "", host_table(host)]
    lines += ["", "## Per call", "", "Wall time per call in a loop of calls; kernels = device "
              "time of one call (torch.profiler); host = one call with the GPU idle; error = max "
              "|z − reference| ÷ max |reference|."] + case_tables(run)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--host")
    ap.add_argument("--epoch")
    ap.add_argument("--out", default="benchmarks/RESULTS.md")
    ap.add_argument("--plot", default=None)
    ap.add_argument("--note", default="")
    ap.add_argument("--compact", help="write the run, host and epoch numbers as one file here")
    args = ap.parse_args(argv)
    run = load(args.run)
    host = (run.get("host") if args.host is None else json.load(open(args.host)))
    epoch = (run.get("epoch") if args.epoch is None else json.load(open(args.epoch)))
    if args.compact:
        with open(args.compact, "w") as fh:
            json.dump(dict(env=run["env"], rows=run["rows"], host=host, epoch=epoch), fh,
                      indent=1)
    with open(args.out, "w") as fh:
        fh.write(render(run, host, epoch, args.note))
    if args.plot:
        plot(run, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
