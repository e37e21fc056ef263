"""One epoch of whole-slide training, in slides/s, per provider, precision and placement.

Synthetic cohort: log-normal lengths (median 12,000 patches, P5 2,000, P95 45,000), D = 1024 bf16,
half positive (1-5% of their patches moved along a hidden direction). Per job: slides/s, ms/step,
GPU busy, peak memory over an epoch; then the roofline floor, validation AUC over seeds, targets.
Jobs are isolated, none starts after --budget-s, the JSON is rewritten after each. H100: ~110 s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

import fastmil
from fastmil.integrations.clam import CLAM_SB

from .harness import commit, measure_peaks, sync

D, HIDDEN, ATTN, CLASSES, DROPOUT, LR, WEIGHT_DECAY = 1024, 512, 256, 2, 0.25, 2e-4, 1e-5
MEDIAN, P5, P95, CAP, Z95 = 12_000, 2_000, 45_000, 150_000, 1.6448536
SIGNAL, REGION, VAL, WARMUP, PROFILE_STEPS = 3.0, (0.01, 0.05), 0.2, 3, 8
FLOPS_PER_PATCH = 4 * D * HIDDEN + 12 * HIDDEN * ATTN  # fc1 fwd + dW; V, U fwd, dh, dW
FIXED = {"warmup": WARMUP, "profile_steps": PROFILE_STEPS, "D": D, "hidden": HIDDEN, "L": ATTN,
         "dropout": DROPOUT, "lr": LR, "lr_rule": "LR x min(slides per step, 16)", "signal": SIGNAL}
Spec = namedtuple("Spec", "name label pooling layout per_step compiled graphs", defaults=(0, 0))
SPECS = [Spec(*s) for s in (
    ("clam_1", "CLAM's loop (eager, 1 slide/step)", "eager", "one", 1),
    ("fastmil_1", "fastmil, 1 slide/step", "fastmil", "one", 1),
    ("eager_padded_16", "eager padded, 16/step", "eager", "padded", 16),
    ("compile_padded_16", "torch.compile padded, 16/step", "eager", "padded", 16, 1),
    ("fastmil_packed_16", "fastmil packed, 16/step", "fastmil", "packed", 16),
    ("fastmil_packed_64", "fastmil packed, 64/step", "fastmil", "packed", 64),
    ("fastmil_graphs_16", "fastmil packed + CUDA graphs, 16/step", "fastmil", "packed", 16, 0, 1),
    ("clam_sb_1", "CLAM_SB (fastmil twin), 1 slide/step, instance loss", "clam_sb", "one", 1))]
BY_NAME = {s.name: s for s in SPECS}
AUC_VARIANTS = [s.name for s in SPECS if s.pooling == "fastmil" or s.name == "clam_1"]
RATIO_TARGETS = [("fastmil_packed_16", "clam_1", 10), ("fastmil_packed_16", "eager_padded_16", 2),
                 ("fastmil_packed_16", "compile_padded_16", 1.5), ("fastmil_1", "clam_1", 1.5)]


class Cohort:
    """lengths, offsets, labels, train and val ids; features on the device (and ``host``)."""

    @staticmethod
    def draw_lengths(n, median=MEDIAN, seed=0):
        """median * exp(sigma z), sigma fitted to P5 below the median and P95 above, clipped."""
        z = np.random.default_rng([seed, 1]).standard_normal(n)
        sigma = np.where(z < 0, math.log(MEDIAN / P5), math.log(P95 / MEDIAN)) / Z95
        return np.clip(np.rint(median * np.exp(sigma * z)), max(8, median // 100),
                       CAP * median // MEDIAN).astype(np.int64)

    def __init__(self, slides, device, median=MEDIAN, pinned=False, seed=0):
        rng, gen = np.random.default_rng([seed, 2]), torch.Generator(device).manual_seed(seed)
        self.lengths, self.labels = self.draw_lengths(slides, median, seed), np.arange(slides) % 2
        self.offsets, rows, k = np.cumsum([0, *self.lengths]), int(self.lengths.sum()), 2 * max(
            1, round(VAL * slides / 2))  # validation: the last k slides, half of them positive
        self.train, self.val = np.arange(slides - k), np.arange(slides - k, slides)
        direction = F.normalize(torch.randn(D, generator=gen, device=device), dim=0)
        self.feats = torch.empty(rows, D, dtype=torch.bfloat16, device=device)
        self.host = torch.empty(rows, D, dtype=torch.bfloat16, pin_memory=True) if pinned else None
        for i, n in enumerate(self.lengths.tolist()):
            x = torch.randn(n, D, generator=gen, device=device)
            if self.labels[i]:  # the signal: a run of 1-5% of the patches
                a = int(rng.integers(0, n - (k := max(1, round(rng.uniform(*REGION) * n))) + 1))
                x[a:a + k] += SIGNAL * direction
            for dst in (d for d in (self.feats, self.host) if d is not None):
                dst[self.offsets[i]:self.offsets[i + 1]].copy_(x, non_blocking=True)
        sync(device)


class ABMIL(nn.Module):
    """CLAM's small ABMIL pooled by fastmil, or eagerly (CLAM's code, the same weights)."""

    def __init__(self, pooling, dropout=DROPOUT):
        super().__init__()
        self.fastmil = pooling == "fastmil"
        self.fc = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Dropout(dropout))
        self.pool = fastmil.AttentionPool(HIDDEN, ATTN, dropout=dropout)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, mask=None, offsets=None):  # x [N, D], packed with offsets, or padded
        h, p = self.fc(x), self.pool
        if self.fastmil:
            z = p(h, mask=mask, offsets=offsets)
        else:
            drop = lambda t: F.dropout(t, p.dropout, p.training)  # noqa: E731
            s = p.score(drop(torch.tanh(p.attn(h))) * drop(torch.sigmoid(p.gate(h))))[..., 0]
            s = s if mask is None else s.masked_fill(~mask, torch.finfo(s.dtype).min)
            z = (s.softmax(-1).unsqueeze(-2) @ h).squeeze(-2)
        return self.classifier(z if z.dim() == 2 else z[None])


class Trainer:
    """A provider's model, AdamW (lr LR x min(slides a step, 16)) and epoch; ``step(i)`` queues
    a step with no host sync. CLAM_SB: instance loss every step, 0.7 bag + 0.3 instance. Pinned:
    step i + 1 is copied on a side stream while step i runs. CUDA graphs: a graph per bucket of
    rows on static x (zeros at first), offsets [B+2] on the device (empty bags pad a short step,
    the padding rows are a bag) and labels [B+1] (-100 past the step's bags: ignored)."""

    def __init__(self, spec, dtype, c, device, pinned=False, seed=0, dropout=DROPOUT, compiled=0):
        self.spec, self.c, self.device, self.pinned = spec, c, device, pinned
        self.bf16, self.graphs, self.pool, self.ahead = dtype == "bf16", {}, None, None
        torch.manual_seed(seed)
        fresh = ABMIL(spec.pooling, dropout) if spec.pooling != "clam_sb" else CLAM_SB(
            gate=True, size_arg="small", dropout=dropout, n_classes=CLASSES, embed_dim=D)
        self.model, self.fwd = compiled or (fresh.to(device),) * 2  # compiled: no recompiling
        if compiled:
            self.model.load_state_dict(fresh.state_dict())
        elif spec.compiled:
            self.fwd = torch.compile(self.model, dynamic=True, backend="inductor" if device.type
                                     == "cuda" else "aot_eager")  # aot_eager: no C++ compiler
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR * min(spec.per_step, 16),
                                     weight_decay=WEIGHT_DECAY,
                                     capturable=bool(spec.graphs) and device.type == "cuda")
        self.loss_sum, self.stream = torch.zeros((), device=device), pinned and torch.cuda.Stream()
        if spec.graphs:  # static inputs, x sized for the per_step longest slides
            rows = self.bucket(np.sort(c.lengths[c.train])[-spec.per_step:].sum())
            self.x = torch.zeros(rows, D, dtype=torch.bfloat16, device=device)
            self.soff, self.sy = (torch.zeros(spec.per_step + k, dtype=int, device=device)
                                  for k in (2, 1))

    @staticmethod
    def bucket(rows):  # the CUDA-graph bucket of a step: 1024 * 2^(k/4) rows, rounded up to 64
        k = max(0, math.ceil(4 * math.log2(max(rows, 1) / 1024)))
        return 64 * math.ceil(16 * 2 ** (k / 4))

    def epoch(self, order):  # the steps over order; CUDA graphs: a graph per new bucket
        B, c, dev = self.spec.per_step, self.c, self.device
        self.steps = [order[i:i + B] for i in range(0, len(order), B)]
        self.rows = [int(c.lengths[s].sum()) for s in self.steps]
        self.start = np.cumsum([0] + [len(s) for s in self.steps])
        self.offs = [torch.from_numpy(np.cumsum([0, *c.lengths[s]])) for s in self.steps]  # host
        self.y, self.lens = (torch.as_tensor(v[order]).to(dev) for v in (c.labels, c.lengths))
        if self.spec.graphs:
            self.buckets = [self.bucket(r) for r in self.rows]
            offs = [np.cumsum([0, *c.lengths[s], *[0] * (B - len(s)), k - r])
                    for s, k, r in zip(self.steps, self.buckets, self.rows, strict=True)]
            ys = [[*c.labels[s], *[-100] * (B + 1 - len(s))] for s in self.steps]
            self.goffs, self.ys = (torch.as_tensor(np.array(t)).to(dev) for t in (offs, ys))
            for rows in sorted(set(self.buckets) - set(self.graphs)):
                self.step(self.buckets.index(rows))  # captures, does not train
        return len(self.steps)

    def _copy(self, i):  # step i's slides, host to device, queued on the side stream
        c, o = self.c, self.offs[i]
        with torch.cuda.stream(self.stream):
            x = torch.empty(self.rows[i], D, dtype=torch.bfloat16, device=self.device)
            for k, s in enumerate(self.steps[i]):
                x[o[k]:o[k + 1]].copy_(c.host[c.offsets[s]:c.offsets[s + 1]], non_blocking=True)
        return i, x

    def inputs(self, i, out=None):  # x and the model's keywords; packed x into out if given
        c, spec, steps = self.c, self.spec, self.steps[i]
        if self.pinned:  # record_stream: the memory is not reused before the compute is done
            main = torch.cuda.current_stream(self.device)
            x = self.ahead[1] if self.ahead and self.ahead[0] == i else self._copy(i)[1]
            main.wait_stream(self.stream)
            x.record_stream(main)
            self.ahead = self._copy(i + 1) if i + 1 < len(self.steps) else None
            parts = x.split(c.lengths[steps].tolist())
        else:
            parts = [c.feats[c.offsets[s]:c.offsets[s + 1]] for s in steps]
            x = parts[0] if len(parts) == 1 else None  # None: not contiguous
        if spec.layout == "padded":
            x, n = nn.utils.rnn.pad_sequence(parts, batch_first=True), self.lens[
                self.start[i]:self.start[i + 1]]
            return x, {"mask": torch.arange(x.shape[1], device=self.device) < n[:, None]}
        if x is None or out is not None:
            x = torch.cat(parts, out=None if out is None else out[:self.rows[i]])
        if spec.pooling == "clam_sb":
            return x, {"label": int(c.labels[steps[0]]), "instance_eval": True}
        return x, {"offsets": self.offs[i]} if spec.layout == "packed" else {}

    def train(self, x, y, kw, step=True):  # forward, backward, AdamW: what a CUDA graph holds
        self.opt.zero_grad(set_to_none=True)  # in a capture: .grad from the graph's pool
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16,
                            cache_enabled=False):  # the cast cache cannot live in a graph
            out = self.fwd(x if self.bf16 else x.float(), **kw)  # CLAM_SB: (logits, ..., dict)
            loss = F.cross_entropy((out[0] if self.spec.pooling == "clam_sb" else out).float(), y,
                                   ignore_index=-100)
            loss = 0.7 * loss + 0.3 * out[4]["instance_loss"] if kw.get("instance_eval") else loss
        loss.backward()
        if step:
            self.opt.step()
            self.loss_sum += loss.detach()

    def step(self, i):  # CUDA graphs: its bucket's graph (a new bucket is captured, not trained)
        if not self.spec.graphs:
            x, kw = self.inputs(i)
            return self.train(x, self.y[self.start[i]:self.start[i + 1]], kw)
        self.inputs(i, out=self.x)
        self.soff.copy_(self.goffs[i])
        self.sy.copy_(self.ys[i])
        if (k := self.buckets[i]) in self.graphs:
            return self.graphs[k].replay()
        self.graphs[k] = self._capture(self.x[:k], self.sy, {"offsets": self.soff})

    def _capture(self, *args):  # a warm-up on a side stream (Triton compiles, AdamW's state)
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.train(*args, step=not self.opt.state)  # AdamW steps once
        main.wait_stream(side)
        g, self.pool = torch.cuda.CUDAGraph(), self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g, pool=self.pool):  # one memory pool for all the buckets
            self.train(*args)
        return g

    def run(self, steps, deadline=math.inf):  # queue these steps; how many ran (fewer if late)
        for k, i in enumerate(steps, 1):
            self.step(i)
            if time.perf_counter() > deadline:
                return k
        return len(steps)

    def busy(self, steps):
        """The share of the wall time the GPU was busy over these steps: kernel time under
        torch.profiler (one compute stream; copies apart), CUPTI detached afterwards. CUDA
        graphs (CUPTI teardown can crash a process holding graphs): each step's CUDA events."""
        from torch.profiler import DeviceType, ProfilerActivity, profile

        marks = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in steps]
        os.environ["TEARDOWN_CUPTI"] = "0"
        with contextlib.nullcontext() if self.spec.graphs else profile(
                activities=[ProfilerActivity.CUDA]) as prof:
            torch.cuda._sleep(2_000_000)
            sync(self.device)
            t0 = time.perf_counter()
            for (a, z), i in zip(marks, steps, strict=True):
                a.record()
                self.step(i)
                z.record()
            sync(self.device)
            wall = time.perf_counter() - t0
        if self.spec.graphs:
            return {"gpu_busy": sum(a.elapsed_time(z) for a, z in marks) * 1e-3 / wall,
                    "busy_method": "CUDA events per step / wall"}
        os.environ["TEARDOWN_CUPTI"] = "1"
        with profile(activities=[ProfilerActivity.CUDA]):  # detaches CUPTI
            pass
        ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        copies = [e for e in ev if any(k in e.name.lower() for k in ("memcpy", "memset"))]
        kernels = [e for e in ev if e not in copies and "spin_kernel" not in e.name]
        busy = lambda es: sum(e.time_range.elapsed_us() for e in es) * 1e-6 / wall  # noqa: E731
        return {"gpu_busy": busy(kernels) if kernels else None, "copy_busy": busy(copies),
                "kernels_per_step": len(kernels) / len(steps), "profiler_lead_in": len(ev) > len(
                    kernels) + len(copies), "busy_method": "torch.profiler: kernel time / wall"}


def summarize(res):
    """Per precision/placement the roofline floor (the slowest of: GEMM FLOPs at the matmul peak,
    features read twice at copy bandwidth, pinned ones sent over PCIe) and the targets; the AUC
    per variant, packed 16/step's equal to 1 slide/step's within max(0.01, 2 standard errors)."""
    aucs, rows, cfg, peaks = {}, [], res["config"], res["peaks"]  # rows: target, group, x, op, want
    for r in (r for r in res["auc"]["runs"] if "auc" in r):
        aucs.setdefault(r["provider"], []).append(r["auc"])
    s = res["auc"]["summary"] = {k: {"mean": float(np.mean(v)), "n": len(v), "sd": float(
        np.std(v, ddof=1)) if v[1:] else None} for k, v in aucs.items()}
    sps = {(r["provider"], f"{r['dtype']}/{r['placement']}"): r["slides_per_s"]
           for r in res["results"] if r.get("slides_per_s")}
    for g in sorted({f"{r['dtype']}/{r['placement']}" for r in res["results"]}):
        if "copy_gbs" in peaks:  # the roofline floor
            n = cfg["train_patches"]
            t = {"compute": FLOPS_PER_PATCH * n / peaks[f"{g[:4]}_tflops"] / 1e12,
                 "hbm": 4 * n * D / peaks["copy_gbs"] / 1e9}
            if g.endswith("pinned") and "h2d_gbs" in peaks:
                t["pcie"] = 2 * n * D / peaks["h2d_gbs"] / 1e9
            b = max(t, key=t.get)
            res["floor"][g] = {"flops": FLOPS_PER_PATCH * n, "hbm_bytes": 4 * n * D, "bound": b,
                               "seconds": t[b], "terms_s": t,
                               "slides_per_s": cfg["train_slides"] / t[b]}
        for mine, theirs, want in RATIO_TARGETS:  # slides/s of mine / theirs
            a, b = sps.get((mine, g)), sps.get((theirs, g))
            rows.append((f"{mine} vs {theirs}", g, a / b if a and b else None, ">=", want))
        best = max(((v, p) for (p, h), v in sps.items() if h == g and p in BY_NAME
                    and BY_NAME[p].pooling == "fastmil"), default=None)
        fl = res["floor"].get(g)
        rows.append((f"roofline floor / best fastmil ({best[1] if best else '-'})", g,
                     fl["slides_per_s"] / best[0] if best and fl else None, "<=", 3))
    a, b = s.get("fastmil_packed_16"), s.get("fastmil_1")
    ok = a and b and a["sd"] is not None and b["sd"] is not None
    rows.append(("val AUC, packed 16/step vs 1 slide/step: mean difference", "auc",
                 abs(a["mean"] - b["mean"]) if ok else None, "<=", max(0.01, 2 * math.sqrt(
                     a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])) if ok else 0.01))
    res["targets"] = [{"target": t, "group": g, "measured": v, "want": f"{op} {w:.3g}", "met":
                       None if v is None else bool(v >= w if op == ">=" else v <= w)}
                      for t, g, v, op, w in rows]
    return res


def render_markdown(res):
    """The results JSON as markdown: the jobs and the roofline floors, the targets, the AUC."""
    res, cfg, env = summarize(res), res["config"], res["env"]
    f = lambda v, fmt="{:.3g}": "-" if v is None else fmt.format(v)  # noqa: E731
    table = lambda head, rows: [  # noqa: E731
        *("| " + " | ".join(map(str, r)) + " |" for r in (head, ["---"] * len(head), *rows)), ""]
    jobs = [(r["label"], f"{r['dtype']}/{r['placement']}", r["per_step"],
             f(r.get("slides_per_s"), "{:,.0f}"), f(r.get("ms_per_step"), "{:.2f}"),
             f(r.get("gpu_busy"), "{:.0%}"), f(r.get("peak_mem_gb"), "{:.1f}"),
             f(r.get("extra_mem_gb"), "{:.1f}"), r["status"] + (f": {r['reason']}" if r.get(
                 "reason") else "")) for r in res["results"]]
    jobs += [(f"roofline floor ({fl['bound']})", g, "", f"{fl['slides_per_s']:,.0f}", *"-" * 5)
             for g, fl in res["floor"].items()]
    return "\n".join([
        f"One training epoch of {cfg['train_slides']} synthetic slides ({cfg['train_patches']:,} "
        f"patches, median {cfg['lengths']['median']:,.0f}), {env['device']}, torch "
        f"{env['torch']}, commit {env.get('commit') or '-'}.", "",
        *table(("provider", "precision/placement", "slides/step", "slides/s", "ms/step",
                "GPU busy", "peak GB", "extra GB", "status"), jobs),
        *table(("target", "group", "measured", "want", "met"), [(
            t["target"], t["group"], f(t["measured"]), t["want"],
            {True: "met", False: "not met"}.get(t["met"], "n/a")) for t in res["targets"]]),
        f"Validation AUC after {cfg['auc_epochs']} epoch(s):", "", *(
            f"- {k}: {s['mean']:.3f} (sd {f(s['sd'])} over {s['n']} seeds)"
            for k, s in res["auc"]["summary"].items())])


def plot(res, path):
    """Slides/s per job, log scale."""
    from matplotlib.figure import Figure

    rows = [r for r in res["results"] if r.get("slides_per_s")][::-1]
    ax = (fig := Figure(figsize=(9, 1 + 0.3 * len(rows)), layout="tight")).subplots()
    ax.barh([f"{r['label']} ({r['dtype']}/{r['placement']})" for r in rows],
            [r["slides_per_s"] for r in rows])
    ax.set(xscale="log", xlabel="slides / s over one training epoch", title=res["env"]["device"])
    fig.savefig(path, dpi=120)


def run(args):
    """The jobs: timings then AUC, CUDA graphs last in each (a failed capture can break CUDA)."""
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke
                                       else "cpu"))
    cuda, t0, compiled = dev.type == "cuda", time.perf_counter(), {}
    deadline = t0 + args.budget_s if args.budget_s else math.inf
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    places = ["gpu", "pinned"] if args.placement == "both" else [args.placement]
    names = list(BY_NAME) if args.providers == "all" else args.providers.split(",")
    if set(names) - set(BY_NAME):
        raise SystemExit(f"unknown providers in {names}; choose from {list(BY_NAME)}")
    c = Cohort(args.slides, dev, args.median, "pinned" in places and cuda)
    n, peaks = c.lengths, measure_peaks(dev)  # {} on a CPU: no floor
    if peaks and c.host is not None:  # pinned host-to-device GB/s: 5 copies of host onto feats
        t = time.perf_counter()
        for _ in range(5):
            c.feats[:1 << 17].copy_(c.host[:1 << 17], non_blocking=True)  # the same values
        sync(dev)
        peaks["h2d_gbs"] = 5 * c.host[:1 << 17].nbytes / (time.perf_counter() - t) / 1e9
    res = {"schema": "fastmil-epoch/2", "env": {
        "device": torch.cuda.get_device_name(dev) if cuda else "CPU", "torch": torch.__version__,
        "fastmil": fastmil.__version__, "time_utc": time.strftime("%FT%TZ", time.gmtime()),
        "commit": commit()},
        "config": {**vars(args), **FIXED, "providers": names,
        "train_slides": len(c.train), "val_slides": len(c.val), "patches": int(n.sum()),
        "train_patches": int(n[c.train].sum()), "feature_bytes": int(n.sum()) * D * 2,
        "lengths": {"max": int(n.max()), "mean": float(n.mean()), **dict(zip(
            ("p5", "median", "p95"), np.percentile(n, [5, 50, 95]).tolist(), strict=True))}},
        "peaks": peaks, "floor": {}, "results": [], "auc": {"runs": []}, "targets": []}

    def save():
        res["wall_s"] = time.perf_counter() - t0
        if args.out:
            Path(args.out).write_text(json.dumps(summarize(res), default=float))

    def job(spec, dtype, pl, seed=None):  # timing (seed None) or AUC; failures go in its row
        row = dict(provider=spec.name, dtype=dtype, placement=pl, status="interrupted", **(
            {"seed": seed} if seed is not None else dict(label=spec.label, per_step=spec.per_step)))
        try:
            if why := ("CUDA only" if not cuda and (pl == "pinned" or spec.graphs) else
                       "budget" if time.perf_counter() > deadline else None):
                raise LookupError(why)
            gc.collect()  # the last job's trainer is gone now: free its memory
            torch.cuda.empty_cache()  # (a no-op without CUDA)
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            base, t = torch.cuda.memory_allocated(dev) if cuda else 0, time.perf_counter()
            tr = Trainer(spec, dtype, c, dev, pl == "pinned", seed or 0,
                         compiled=compiled.get((spec, dtype)))
            compiled.update({(spec, dtype): (tr.model, tr.fwd)} if spec.compiled else {})
            if seed is not None:  # AUC: train, then P(positive) one slide a call, eval mode
                rng = np.random.default_rng([seed, 4])
                for _ in range(args.auc_epochs):
                    if tr.run(range(k := tr.epoch(rng.permutation(c.train))), deadline) < k:
                        raise LookupError("budget")
                tr.model.eval()
                with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=tr.bf16):
                    out = [tr.model(c.feats[c.offsets[s]:c.offsets[s + 1]].float()) for s in c.val]
                p = torch.cat([z[0] if isinstance(z, tuple) else z for z in out]).float()
                p, y = p.softmax(-1)[:, 1].cpu().numpy(), c.labels[c.val]
                return row.update(status="ok", train_s=time.perf_counter() - t,
                                  auc=float(roc_auc_score(y, p)))
            steps = tr.epoch(np.random.default_rng(3).permutation(c.train))
            tr.run(range(min(WARMUP, steps)))
            before = float(tr.loss_sum)  # a sync; warmup_s: model, compiles, captures, warm-up
            t, row["warmup_s"] = time.perf_counter(), time.perf_counter() - t
            k = tr.run(range(steps), deadline)
            sync(dev)
            wall = time.perf_counter() - t
            row.update(status="ok" if k == steps else "partial", steps=k, wall_s=wall,
                       slides=int(tr.start[k]), slides_per_s=int(tr.start[k]) / wall,
                       ms_per_step=1e3 * wall / k, loss_mean=(float(tr.loss_sum) - before) / k)
            if cuda:
                peak = torch.cuda.max_memory_allocated(dev)
                row.update(peak_mem_gb=peak / 1e9, extra_mem_gb=(peak - base) / 1e9)
                if time.perf_counter() < deadline:
                    row.update(tr.busy(range(min(PROFILE_STEPS, steps))))
        except LookupError as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - OOM included: one failure must not end the run
            row.update(status="oom" if isinstance(e, torch.OutOfMemoryError) else "error",
                       reason=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        finally:
            with contextlib.suppress(Exception):  # copies may still write into memory to free
                sync(dev)
            (res["results"] if seed is None else res["auc"]["runs"]).append(row)
            save()

    specs = [BY_NAME[k] for k in names]
    jobs = [(s, dt, pl, None) for g in (0, 1) for pl in places for dt in dtypes
            for s in specs if s.graphs == g] + [
        (s, dtypes[-1], "gpu", seed) for g in (0, 1) for s in specs
             if s.graphs == g and s.name in AUC_VARIANTS for seed in range(args.auc_seeds)]
    if not args.no_progress:  # (where tqdm is not installed: --no-progress)
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc="epoch benchmark", file=sys.stderr, mininterval=1)
    try:
        for spec, dtype, pl, seed in jobs:
            if args.no_progress:
                print(spec.name, dtype, pl, "" if seed is None else f"AUC seed {seed}",
                      file=sys.stderr, flush=True)
            job(spec, dtype, pl, seed)
    except KeyboardInterrupt:  # e.g. timeout -s INT: keep what was measured
        res["interrupted"] = True
    save()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.epoch",
                                description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--device", help="cuda (the default where there is one) or cpu")
    add("--slides", type=int, help="slides in the cohort, 80%% trained on (400; --smoke: 32)")
    add("--dtype", choices=("bf16", "fp32", "both"), help="bf16 autocast (default) or fp32")
    add("--placement", choices=("gpu", "pinned", "both"), default="both")
    add("--providers", default="all", help="all, or some of: " + ", ".join(BY_NAME))
    add("--budget-s", type=float, default=0.0, help="start no job after this (0: no limit)")
    add("--out", help="the results JSON, rewritten after every job")
    add("--png", help="a bar plot of slides/s")
    add("--smoke", action="store_true", help="tiny: 32 slides of median 48 patches, CPU, fp32")
    add("--auc-epochs", type=int, default=2, help="training epochs per AUC run")
    add("--auc-seeds", type=int, default=2, help="AUC runs per variant (0: none)")
    add("--render", metavar="JSON", help="only print this results JSON as markdown (and --png)")
    add("--no-progress", action="store_true", help="a line per job instead of a progress bar")
    a = p.parse_args(argv)
    a.slides, a.median = a.slides or (32 if a.smoke else 400), 48 if a.smoke else MEDIAN
    a.dtype = a.dtype or ("fp32" if a.smoke else "bf16")
    res = json.loads(Path(a.render).read_text()) if a.render else run(a)
    print(render_markdown(res))
    if a.png:
        plot(res, a.png)
    return res


if __name__ == "__main__":
    main()
