"""One epoch of whole-slide training, in slides per second: the benchmark a pathology user
judges fastmil by.

Cohort, made on the device: ``--slides`` slides, lengths from a two-piece log-normal (median
12,000 patches, 5th percentile 2,000, 95th 45,000, capped at 150,000), D = 1024 bf16 features as
one packed [T, D] tensor + offsets; half the slides positive, 1-5% of their patches moved along
a hidden direction (the idea of examples/synthetic_wsi.py); 80/20 train/validation split. Model:
CLAM's small ABMIL (Linear 1024->512, ReLU, Dropout 0.25, gated attention L = 256 with dropout
0.25, Linear 512->2), cross-entropy, AdamW; the same weights from one seed in every provider
(``SPECS``), pooled eagerly (``eager_pool``) or by ``fastmil.AttentionPool``. Placements: ``gpu``
(resident) and ``pinned`` (host memory, each step's slides copied on a side stream, one step
ahead). Per provider: slides/s over a full epoch after ``--warmup`` steps, ms/step, GPU busy,
peak memory; per precision and placement the epoch's roofline floor; then validation AUC of the
one-slide and packed variants over ``--auc-seeds`` paired seeds; a targets table.

    python -m benchmarks.epoch --out epoch.json --budget-s 200     # the GPU check (bf16)
    python -m benchmarks.epoch --smoke                             # tiny, CPU
    python -m benchmarks.epoch --render epoch.json --md epoch.md --png epoch.png

Estimated default run on an H100 behind a slow host (~10 us a launch, ~2-3 ms of host per eager
training step): an epoch is 800 slides, 12.9 M patches, 47 TFLOP (0.07 s at 700 TFLOP/s),
53 GB of feature reads (0.02 s), 26 GB over PCIe when pinned (~1 s). Start-up and CUDA ~10 s;
cohort (33 GB) + its 32 GiB pinned copy ~11 s; peaks ~3 s. GPU placement: the three one-slide
loops (CLAM, fastmil, CLAM_SB twin) 800 steps of 2.5-5 ms, ~9 s; the batched ones ~1 s; first
compiles: fastmil's Triton kernels ~15 s, torch.compile of the padded step (cold, dynamic) ~40 s;
profiling ~4 s: ~70 s. Pinned: ~17 s. CUDA graphs (captures + epochs) ~5 s. AUC (2 seeds x 2
epochs; one-slide ~3 s an epoch) ~30 s. In all ~150 s, the compile times least certain.
``--providers all`` adds compile_1 (~40 s), ``--dtype both`` fp32 (~90 s).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastmil

D, HIDDEN, ATTN, CLASSES = 1024, 512, 256, 2
MEDIAN, P5, P95, CAP = 12_000, 2_000, 45_000, 150_000
Z95 = 1.6448536  # the standard normal's 95th percentile
SIGMA_LO, SIGMA_HI = math.log(MEDIAN / P5) / Z95, math.log(P95 / MEDIAN) / Z95
TYPES, SIGNAL, STAIN, REGION, VAL = 5, 3.0, 0.05, (0.01, 0.05), 0.2
LR, WEIGHT_DECAY, DROPOUT = 2e-4, 1e-5, 0.25
FLOPS_PER_PATCH = 4 * D * HIDDEN + 12 * HIDDEN * ATTN  # fc1 fwd + dW; V, U fwd, dh, dW
LADDER = 2 ** 0.25  # CUDA-graph buckets: T rounded up to 1024 * LADDER^k rows
SCHEMA = "fastmil-epoch/1"


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    pooling: str  # "eager" or "fastmil"
    layout: str  # "one", "padded" or "packed"
    per_step: int
    compiled: bool = False
    graphs: bool = False


SPECS = [
    Spec("clam_1", "CLAM's loop (eager, 1 slide/step)", "eager", "one", 1),
    Spec("fastmil_1", "fastmil, 1 slide/step", "fastmil", "one", 1),
    Spec("eager_padded_16", "eager padded, 16/step", "eager", "padded", 16),
    Spec("compile_padded_16", "torch.compile padded, 16/step", "eager", "padded", 16, True),
    Spec("compile_1", "torch.compile, 1 slide/step", "eager", "one", 1, True),
    Spec("fastmil_packed_16", "fastmil packed, 16/step", "fastmil", "packed", 16),
    Spec("fastmil_packed_64", "fastmil packed, 64/step", "fastmil", "packed", 64),
    Spec("fastmil_graphs_16", "fastmil packed + CUDA graphs, 16/step", "fastmil", "packed", 16,
         graphs=True),
]
try:
    from fastmil.integrations.clam import CLAM_SB
    SPECS.append(Spec("clam_sb_1", "CLAM_SB (fastmil twin), 1 slide/step, instance loss",
                      "clam_sb", "one", 1))
except ImportError:  # not in this fastmil
    CLAM_SB = None
BY_NAME = {s.name: s for s in SPECS}
AUC_VARIANTS = ("clam_1", "fastmil_1", "fastmil_packed_16", "fastmil_packed_64",
                "fastmil_graphs_16")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_for(spec):
    return LR * min(spec.per_step, 16)  # one packed step moves as far as the steps it replaces


# The cohort ---------------------------------------------------------------------------------

def slide_lengths(n, median=MEDIAN, seed=0):
    """Patches per slide: median * exp(sigma * z), sigma = SIGMA_LO below the median, SIGMA_HI
    above, clipped to [max(8, median / 100), CAP scaled like the median]."""
    z = np.random.default_rng([seed, 1]).standard_normal(n)
    raw = median * np.exp(np.where(z < 0, SIGMA_LO, SIGMA_HI) * z)
    return np.clip(np.rint(raw), max(8, median // 100), CAP * median // MEDIAN).astype(np.int64)


@dataclass
class Cohort:
    lengths: np.ndarray  # [S] patches per slide
    offsets: np.ndarray  # [S+1]
    labels: np.ndarray  # [S] 0 / 1
    train: np.ndarray  # slide ids
    val: np.ndarray
    feats: torch.Tensor | None  # [T, D] bf16 on the device (placement gpu)
    host: torch.Tensor | None  # [T, D] bf16 in pinned host memory (placement pinned)
    missing: list  # why a wanted placement could not be allocated
    regions: np.ndarray  # [S, 2] the signal's rows (start, count) per slide; count 0: none
    direction: torch.Tensor  # [D] the signal's direction, a unit vector


def _alloc(wanted, make, missing):
    try:
        return make() if wanted else None
    except (RuntimeError, torch.OutOfMemoryError) as e:  # that placement is then skipped
        missing.append(f"{type(e).__name__}: {str(e).strip()[:200]}")
        return None


def make_cohort(slides, device, *, median=MEDIAN, seed=0, resident=True, pinned=False):
    """The cohort; ``missing`` lists what could not be allocated (that placement is skipped)."""
    missing = []
    rng = np.random.default_rng([seed, 2])
    lengths = slide_lengths(slides, median, seed)
    regions = np.zeros((slides, 2), np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    labels = rng.permutation(np.arange(slides) % 2)
    val = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c),
                                             max(1, round(VAL * (labels == c).sum())), False)
                                  for c in (0, 1)]))
    train = np.setdiff1d(np.arange(slides), val)
    gen = torch.Generator(device).manual_seed(seed)
    centers = torch.randn(TYPES, D, generator=gen, device=device) * (4 / math.sqrt(2 * D))
    tumour = torch.randn(D, generator=gen, device=device)
    tumour /= tumour.norm()
    T = int(offsets[-1])
    # a spare leading row: no slide starts at storage offset 0, which torch.compile would
    # specialize on (a recompile in the middle of a timed epoch)
    feats = _alloc(resident, lambda: torch.empty(T + 1, D, dtype=torch.bfloat16,
                                                 device=device)[1:], missing)
    host = _alloc(pinned, lambda: torch.empty(T, D, dtype=torch.bfloat16, pin_memory=True),
                  missing)
    for i, n in enumerate(lengths.tolist()):
        x = torch.randn(n, D, generator=gen, device=device)
        x += centers[torch.randint(TYPES, (n,), generator=gen, device=device)]
        x += STAIN * torch.randn(D, generator=gen, device=device)
        if labels[i]:
            k = max(1, round(rng.uniform(*REGION) * n))
            a = int(rng.integers(0, n - k + 1))
            x[a:a + k] += SIGNAL * tumour
            regions[i] = a, k
        x, o = x.to(torch.bfloat16), int(offsets[i])
        if feats is not None:
            feats[o:o + n] = x
        if host is not None:
            host[o:o + n].copy_(x, non_blocking=True)
    sync(device)
    return Cohort(lengths, offsets, labels, train, val, feats, host, missing, regions, tumour)


# The model ----------------------------------------------------------------------------------

def eager_pool(pool, h, mask=None):
    """CLAM's gated attention, eagerly: h [N, E] (one bag) or [B, N, E] + mask [B, N]."""
    p = pool.dropout if pool.training else 0.0
    a = F.dropout(torch.tanh(pool.attn(h)), p, pool.training)
    g = F.dropout(torch.sigmoid(pool.gate(h)), p, pool.training)
    s = pool.score(a * g).squeeze(-1)  # [N] or [B, N]
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return (torch.softmax(s, dim=-1).unsqueeze(-2) @ h).squeeze(-2)  # mm / bmm


class ABMIL(nn.Module):
    """CLAM's small ABMIL. The gated attention's weights live in a fastmil.AttentionPool
    however it is computed, so both poolings build the same parameters from one seed."""

    def __init__(self, pooling="eager", dropout=DROPOUT, fp32=False):
        super().__init__()
        self.fastmil, self.fp32 = pooling == "fastmil", fp32
        self.fc = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Dropout(dropout))
        self.pool = fastmil.AttentionPool(HIDDEN, ATTN, dropout=dropout)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, mask=None, offsets=None):
        h = self.fc(x.float() if self.fp32 else x)  # features are stored in bf16
        z = (self.pool(h, mask=mask, offsets=offsets) if self.fastmil
             else eager_pool(self.pool, h, mask))
        return self.classifier(z if z.dim() == 2 else z[None])


class ClamTwin(nn.Module):
    """fastmil's CLAM_SB (fastmil/integrations/clam.py), trained as CLAM trains it: instance
    evaluation on every step (k_sample 8; it reads its instance labels back to the host, a
    sync per step, as CLAM does), loss = 0.7 bag + 0.3 instance (CLAM's bag_weight)."""

    def __init__(self, dropout=DROPOUT, fp32=False):
        super().__init__()
        self.fp32 = fp32
        self.clam = CLAM_SB(gate=True, size_arg="small", dropout=dropout, n_classes=CLASSES,
                            embed_dim=D)

    def forward(self, x, label=None):
        logits, _, _, _, out = self.clam(x.float() if self.fp32 else x, label=label,
                                         instance_eval=label is not None)
        return logits, out.get("instance_loss")


# One epoch's steps --------------------------------------------------------------------------

class Batches:
    """One epoch's steps for one provider: slide ids per step, and the inputs a trainer asks
    for, with no host sync (labels and lengths go to the device once per epoch). Pinned: each
    step's slides are copied into one of two device buffers on a side stream, one step ahead;
    ``done(i)`` marks step i's buffer free once the work queued on it is done."""

    def __init__(self, cohort, order, per_step, device, placement="gpu"):
        self.c, self.device, self.pinned = cohort, device, placement == "pinned"
        self.steps = [order[i:i + per_step] for i in range(0, len(order), per_step)]
        self.rows = [int(cohort.lengths[s].sum()) for s in self.steps]
        self.start = np.concatenate([[0], np.cumsum([len(s) for s in self.steps])])
        self.y = torch.as_tensor(cohort.labels[order]).to(device)
        self.lens = torch.as_tensor(cohort.lengths[order]).to(device)
        if self.pinned:
            self.stream, self.held = torch.cuda.Stream(device), [-1, -1]
            self.bufs = [torch.empty(max(self.rows), D, dtype=torch.bfloat16, device=device)
                         for _ in range(2)]
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]

    def __len__(self):
        return len(self.steps)

    def labels(self, i):
        return self.y[self.start[i]:self.start[i + 1]]

    def offsets(self, i):  # on the host, as fastmil.collate makes them
        return torch.from_numpy(np.concatenate([[0], np.cumsum(self.c.lengths[self.steps[i]])]))

    def _load(self, i):  # queue the copy of step i into buffer i % 2, unless it is there
        k = i % 2
        if i >= len(self.steps) or self.held[k] == i:
            return
        self.held[k] = i
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.free[k])
            r, o = 0, self.c.offsets
            for s in self.steps[i].tolist():
                n = int(self.c.lengths[s])
                self.bufs[k][r:r + n].copy_(self.c.host[o[s]:o[s] + n], non_blocking=True)
                r += n
            self.ready[k].record(self.stream)

    def _buffer(self, i):
        self._load(i)
        self._load(i + 1)  # the prefetch, overlapping step i's compute
        torch.cuda.current_stream(self.device).wait_event(self.ready[i % 2])
        return self.bufs[i % 2][:self.rows[i]]

    def done(self, i):
        if self.pinned:
            self.free[i % 2].record(torch.cuda.current_stream(self.device))

    def slices(self, i):
        if self.pinned:
            return list(self._buffer(i).split(self.c.lengths[self.steps[i]].tolist()))
        o, n = self.c.offsets, self.c.lengths
        return [self.c.feats[o[s]:o[s] + n[s]] for s in self.steps[i].tolist()]

    def packed(self, i, out=None):
        """[T, D] of step i, into ``out[:T]`` when given (the CUDA graphs' static input)."""
        if self.pinned:
            x = self._buffer(i)
            return x if out is None else out[:len(x)].copy_(x)
        parts = self.slices(i)
        if out is None:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return torch.cat(parts, out=out[:self.rows[i]])

    def padded(self, i):
        x = nn.utils.rnn.pad_sequence(self.slices(i), batch_first=True)
        lens = self.lens[self.start[i]:self.start[i + 1]]
        return x, torch.arange(x.shape[1], device=self.device) < lens[:, None]


# Trainers -----------------------------------------------------------------------------------

class Trainer:
    """Model, AdamW and one training step of a provider; ``step`` queues work without a host
    sync and adds the loss to ``loss_sum`` on the device. ``compiled``: a (model, compiled
    model) pair to reuse with fresh weights instead of compiling again."""

    def __init__(self, spec, dtype, device, *, seed=0, dropout=DROPOUT, lr=None, compiled=None,
                 compile_backend="inductor"):
        self.spec, self.device, self.bf16 = spec, device, dtype == "bf16"
        torch.manual_seed(seed)
        fresh = (ClamTwin if spec.pooling == "clam_sb" else partial(ABMIL, spec.pooling))(
            dropout, fp32=not self.bf16)
        if compiled is not None:
            self.model, self.fwd = compiled
            self.model.load_state_dict(fresh.state_dict())
        else:
            self.model = self.fwd = fresh.to(device)
            if spec.compiled:
                self.fwd = torch.compile(self.model, dynamic=True, backend=compile_backend)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr or lr_for(spec),
                                     weight_decay=WEIGHT_DECAY,
                                     capturable=spec.graphs and device.type == "cuda")
        self.loss_sum = torch.zeros((), device=device)

    def autocast(self, cache=True):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16,
                              cache_enabled=cache)

    def prepare(self, b):
        pass

    def step(self, b, i):
        if self.spec.layout == "padded":
            x, mask = b.padded(i)
            kw = {"mask": mask}
        else:
            x = b.packed(i)
            kw = {"offsets": b.offsets(i)} if self.spec.layout == "packed" else {}
        if self.spec.pooling == "clam_sb":
            kw = {"label": int(b.c.labels[b.steps[i][0]])}
        with self.autocast():
            logits, instance_loss = logits_of(self.fwd(x, **kw))
            loss = F.cross_entropy(logits.float(), b.labels(i))
            if instance_loss is not None:
                loss = 0.7 * loss + 0.3 * instance_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach()


def bucket(rows):
    """The CUDA-graph bucket of a step of ``rows`` rows: the next 1024 * LADDER^k, rounded up
    to a multiple of 64."""
    k = max(0, math.ceil(4 * math.log2(max(rows, 1) / 1024)))
    while 64 * math.ceil(1024 * LADDER ** k / 64) < rows:
        k += 1
    return 64 * math.ceil(1024 * LADDER ** k / 64)


class GraphTrainer(Trainer):
    """fastmil packed, forward + backward + AdamW captured in one CUDA graph per bucket of T.
    Static inputs: x [rows, D] (sized for the per_step longest slides, zeros at first so that
    stale rows stay finite), offsets [B+2] on the GPU (B bags, the padding rows as one more bag;
    empty bags pad a short last step) and labels [B+1] (-100: ignored). The graphs share one
    memory pool; what outlives a replay (weights, AdamW state, static inputs, loss_sum) lives
    outside it. Every bucket is warmed up eagerly before its capture (Triton compiles)."""

    def __init__(self, spec, dtype, device, **kw):
        super().__init__(spec, dtype, device, **kw)
        self.x, B = None, spec.per_step
        self.off = torch.zeros(B + 2, dtype=torch.int64, device=device)
        self.y = torch.full((B + 1,), -100, dtype=torch.int64, device=device)
        self.graphs, self.pool, self.stepped = {}, None, False

    def _loss(self, rows):
        with self.autocast(cache=False):  # autocast's cast cache cannot live in a graph
            logits = self.model(self.x[:rows], offsets=self.off)
            return F.cross_entropy(logits.float(), self.y, ignore_index=-100)

    def _train_step(self, rows):  # what a graph holds
        loss = self._loss(rows)
        loss.backward()
        self.opt.step()
        self.loss_sum.add_(loss.detach())

    def prepare(self, b):
        """Per step its bucket, offsets and labels (one copy to the GPU per epoch); a graph
        for every new bucket, captured here, outside the timed loop."""
        B, c = self.spec.per_step, b.c
        if self.x is None:
            most = bucket(int(np.sort(c.lengths[c.train])[-B:].sum()))
            self.x = torch.zeros(most, D, dtype=torch.bfloat16, device=self.device)
        self.buckets = [bucket(r) for r in b.rows]
        offs, ys = np.zeros((len(b), B + 2), np.int64), np.full((len(b), B + 1), -100)
        for i, s in enumerate(b.steps):
            offs[i, 1:len(s) + 1] = np.cumsum(c.lengths[s])
            offs[i, len(s) + 1:] = b.rows[i]
            offs[i, -1] = self.buckets[i]
            ys[i, :len(s)] = c.labels[s]
        self.offs, self.ys = (torch.as_tensor(t).to(self.device) for t in (offs, ys))
        for rows in sorted(set(self.buckets) - set(self.graphs)):
            i = self.buckets.index(rows)
            self._fill(b, i)
            self._capture(rows)
            b.done(i)

    def _fill(self, b, i):
        b.packed(i, out=self.x)
        self.off.copy_(self.offs[i])
        self.y.copy_(self.ys[i])

    def _capture(self, rows):
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):  # warm-up: lazy inits, Triton compiles, AdamW state
            self.opt.zero_grad(set_to_none=True)
            self._loss(rows).backward()
            if not self.stepped:
                self.opt.step()
                self.stepped = True
        main.wait_stream(side)
        self.opt.zero_grad(set_to_none=True)  # the graph allocates .grad in its pool
        g, self.pool = torch.cuda.CUDAGraph(), self.pool or torch.cuda.graph_pool_handle()
        with torch.cuda.graph(g, pool=self.pool):
            self._train_step(rows)
        self.graphs[rows] = g

    def step(self, b, i):
        self._fill(b, i)
        self.graphs[self.buckets[i]].replay()


def logits_of(out):
    return out if isinstance(out, tuple) else (out, None)


# AdamW(capturable=True) warns when it steps outside a capture, as the graphs' warm-up does
warnings.filterwarnings("ignore", message=".*capturable=True.*")


def make_trainer(spec, dtype, device, **kw):
    return (GraphTrainer if spec.graphs else Trainer)(spec, dtype, device, **kw)


def run_steps(trainer, b, steps, deadline=None):
    """Queue these training steps; returns how many ran (fewer once past ``deadline``)."""
    for k, i in enumerate(steps):
        trainer.step(b, i)
        b.done(i)
        if deadline is not None and time.perf_counter() > deadline:
            return k + 1
    return len(steps)


# Measurements -------------------------------------------------------------------------------

def gpu_busy(trainer, b, steps, device):
    """The fraction of the wall time the GPU was busy over these steps (sync to sync).

    Default: the union of the kernels' device intervals under torch.profiler (CUDA activity
    only; copies apart), after a spin kernel that makes sure the profiler is capturing; CUPTI
    is detached afterwards, so later timings run without it. CUDA graphs: no profiler (CUPTI
    teardown can crash a process holding graphs, and CUPTI misreports graph kernels): the sum
    of each step's device span between two CUDA events, a proxy that counts any gap inside a
    step (two host calls per step here) as busy."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if trainer.spec.graphs:
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in steps]
        sync(device)
        t0 = time.perf_counter()
        for (start, end), i in zip(marks, steps, strict=True):
            start.record()
            run_steps(trainer, b, [i])
            end.record()
        sync(device)
        wall = time.perf_counter() - t0
        busy = sum(start.elapsed_time(end) for start, end in marks) * 1e-3
        return {"gpu_busy": busy / wall, "busy_method": "CUDA events per step / wall"}
    sync(device)
    old = os.environ.get("TEARDOWN_CUPTI")
    os.environ["TEARDOWN_CUPTI"] = "0"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(2_000_000)
        sync(device)
        t0 = time.perf_counter()
        run_steps(trainer, b, steps)
        sync(device)
        wall = time.perf_counter() - t0
    os.environ["TEARDOWN_CUPTI"] = "1"
    with profile(activities=[ProfilerActivity.CUDA]):
        pass
    if old is None:
        del os.environ["TEARDOWN_CUPTI"]
    else:
        os.environ["TEARDOWN_CUPTI"] = old
    spans, lead_in = {"gpu_busy": [], "copy_busy": []}, False
    for e in prof.events():
        name = e.name.lower()
        if e.device_type != DeviceType.CUDA:
            continue
        if "spin_kernel" in name:  # seen: the capture began before the steps
            lead_in = True
            continue
        key = "copy_busy" if "memcpy" in name or "memset" in name else "gpu_busy"
        spans[key].append((e.time_range.start, e.time_range.end))
    if not spans["gpu_busy"]:
        return {"gpu_busy": None, "busy_method": "torch.profiler recorded no kernels"}
    out = {"kernels_per_step": len(spans["gpu_busy"]) / len(steps), "profiler_lead_in": lead_in,
           "busy_method": "torch.profiler: union of kernel intervals / wall"}
    for key, s in spans.items():
        busy, end = 0.0, -math.inf
        for a, z in sorted(s):  # union of intervals, us
            busy, end = busy + max(0.0, z - max(a, end)), max(end, z)
        out[key] = busy * 1e-6 / wall
    return out


def measure_peaks(device):
    """Matmul TFLOP/s (bf16; fp32 at the run's matmul precision), device copy GB/s (read +
    write) and pinned host-to-device GB/s, measured now: best of 3 runs of 10 calls."""
    def timed(fn):
        fn()
        best = math.inf
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            sync(device)
            best = min(best, (time.perf_counter() - t0) / 10)
        return best

    cuda = device.type == "cuda"
    n, nbytes, out = (8192, 1 << 30, {}) if cuda else (256, 16 << 20, {})
    for key, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=device, dtype=dt)
        c = torch.empty_like(a)
        out[f"{key}_tflops"] = 2 * n ** 3 / timed(lambda a=a, c=c: torch.mm(a, a, out=c)) / 1e12
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    out["copy_gbps"] = 2 * nbytes / timed(lambda: dst.copy_(src)) / 1e9
    if cuda:
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        out["h2d_gbps"] = nbytes / timed(lambda: dst.copy_(host, non_blocking=True)) / 1e9
    out["method"] = f"{n}^3 torch.mm, {nbytes >> 20} MiB copies"
    return out


def floor(patches, slides, dtype, placement, peaks):
    """The epoch's roofline floor: the largest of GEMM FLOPs / matmul peak, features read twice
    (forward GEMM and its weight gradient) / copy bandwidth, features over PCIe (pinned)."""
    t = {"compute": FLOPS_PER_PATCH * patches / (peaks[f"{dtype}_tflops"] * 1e12),
         "hbm": 4 * patches * D / (peaks["copy_gbps"] * 1e9)}
    if placement == "pinned" and "h2d_gbps" in peaks:
        t["pcie"] = 2 * patches * D / (peaks["h2d_gbps"] * 1e9)
    bound = max(t, key=t.get)
    return {"flops": FLOPS_PER_PATCH * patches, "hbm_bytes": 4 * patches * D, "bound": bound,
            "seconds": t[bound], "terms_s": t, "slides_per_s": slides / t[bound]}


def evaluate(model, cohort, ids, device, bf16):
    """P(positive) per slide, one slide per call, eval mode, through the model's own pooling."""
    src = cohort.feats if cohort.feats is not None else cohort.host
    model.eval()
    probs = torch.empty(len(ids), device=device)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        for k, s in enumerate(ids.tolist()):
            o, n = int(cohort.offsets[s]), int(cohort.lengths[s])
            logits = logits_of(model(src[o:o + n].to(device)))[0]
            probs[k] = torch.softmax(logits.float(), -1)[0, 1]
    model.train()
    return probs.cpu().numpy()


def auc_score(labels, scores):
    """scikit-learn's roc_auc_score where it is installed, else the same number from all
    positive-negative pairs (ties count half)."""
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        pos, neg = scores[labels == 1][:, None], scores[labels == 0][None]
        return float(((pos > neg) + 0.5 * (pos == neg)).mean())
    return float(roc_auc_score(labels, scores))


# The run ------------------------------------------------------------------------------------

def environment(device):
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.machine(), "torch": torch.__version__, "fastmil": fastmil.__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(),
           "tf32": torch.get_float32_matmul_precision() != "highest",
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with contextlib.suppress(Exception):
        import triton
        env["triton"] = triton.__version__
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       capture_output=True, timeout=5).stdout.strip() or None
    return env


class Run:
    """The jobs, each isolated (an OOM or error is recorded and the run goes on); the results
    JSON is rewritten after each."""

    def __init__(self, args, device, cohort, specs):
        self.args, self.device, self.c, self.cuda = args, device, cohort, device.type == "cuda"
        self.t0, self.compiled, self.broken = time.perf_counter(), {}, None
        self.deadline = self.t0 + args.budget_s if args.budget_s else None
        n = cohort.lengths
        config = {k: getattr(args, k) for k in (
            "slides", "median", "dtype", "placement", "warmup", "profile_steps", "auc_epochs",
            "auc_seeds", "seed", "compile_backend", "budget_s", "smoke")}
        config.update(
            providers=[s.name for s in specs], train_slides=len(cohort.train),
            val_slides=len(cohort.val), patches=int(n.sum()),
            train_patches=int(n[cohort.train].sum()), feature_bytes=int(n.sum()) * D * 2,
            lengths={"median": float(np.median(n)), "p5": float(np.percentile(n, 5)),
                     "p95": float(np.percentile(n, 95)), "max": int(n.max()),
                     "mean": float(n.mean())},
            model={"D": D, "hidden": HIDDEN, "L": ATTN, "dropout": DROPOUT, "lr": LR,
                   "lr_rule": "LR x min(slides per step, 16)", "signal": SIGNAL})
        self.res = {"schema": SCHEMA, "env": environment(device), "config": config,
                    "peaks": {}, "floor": {}, "results": [],
                    "auc": {"runs": [], "summary": {}}, "targets": [], "wall_s": 0.0}

    def save(self):
        self.res["wall_s"] = time.perf_counter() - self.t0
        self.res["targets"] = targets(self.res)
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(self.res, f, separators=(",", ":"), default=float)

    def unavailable(self, spec, placement):
        if not self.cuda and (placement == "pinned" or spec.graphs):
            return "CUDA only (" + ("CUDA graphs" if spec.graphs else "pinned placement") + ")"
        if (self.c.feats if placement == "gpu" else self.c.host) is None:
            return f"no {placement} cohort: {'; '.join(self.c.missing) or 'not asked for'}"
        if self.deadline is not None and time.perf_counter() > self.deadline:
            return "budget"
        return self.broken

    def guarded(self, row, job):
        """Run ``job(row)``; record a skip, OOM or error in ``row`` instead of raising."""
        try:
            reason = self.unavailable(BY_NAME[row["provider"]], row["placement"])
            if reason:
                raise LookupError(reason)
            job(row)
        except LookupError as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - OOM included: one failure must not end the run
            text = str(e).strip().splitlines()
            row.update(status="oom" if isinstance(e, torch.OutOfMemoryError) else "error",
                       reason=f"{type(e).__name__}: {text[0][:300] if text else ''}")
        try:  # a prefetch may still be writing into buffers about to be freed
            sync(self.device)
            if row["status"] == "error":  # a failed capture can leave the CUDA RNG unusable
                F.dropout(torch.ones(8, device=self.device), 0.5).sum().item()
        except Exception as e:  # noqa: BLE001
            self.broken = f"device unusable after an error: {type(e).__name__}"
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return row

    def time_provider(self, spec, dtype, placement):
        a, dev = self.args, self.device

        def job(row):
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            t = time.perf_counter()
            tr = make_trainer(spec, dtype, dev, seed=a.seed, compile_backend=a.compile_backend,
                              compiled=self.compiled.get((spec.name, dtype)))
            if spec.compiled:
                self.compiled[(spec.name, dtype)] = (tr.model, tr.fwd)
            order = np.random.default_rng([a.seed, 3]).permutation(self.c.train)
            b = Batches(self.c, order, spec.per_step, dev, placement)
            tr.prepare(b)
            run_steps(tr, b, range(min(a.warmup, len(b))))
            before = tr.loss_sum.clone()
            sync(dev)
            row["warmup_s"] = time.perf_counter() - t  # model, compiles, captures, warm-up
            t = time.perf_counter()
            n = run_steps(tr, b, range(len(b)), self.deadline)
            sync(dev)
            wall = time.perf_counter() - t
            slides = int(b.start[n])
            row.update(status="ok" if n == len(b) else "partial", steps=n, slides=slides,
                       wall_s=wall, slides_per_s=slides / wall, ms_per_step=1e3 * wall / n,
                       loss_mean=float(tr.loss_sum - before) / n)
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(dev)
                row.update(peak_mem_gb=peak / 1e9, extra_mem_gb=(peak - base) / 1e9)
                if a.profile_steps > 0 and not self.unavailable(spec, placement):
                    row.update(gpu_busy(tr, b, range(min(a.profile_steps, len(b))), dev))

        row = self.guarded({"provider": spec.name, "label": spec.label, "dtype": dtype,
                            "placement": placement, "slides_per_step": spec.per_step}, job)
        self.res["results"].append(row)
        self.save()
        return row

    def auc_run(self, spec, seed, dtype):
        a, dev, c = self.args, self.device, self.c
        placement = "gpu" if c.feats is not None else "pinned"

        def job(row):
            t = time.perf_counter()
            tr = make_trainer(spec, dtype, dev, seed=seed, compile_backend=a.compile_backend)
            rng = np.random.default_rng([seed, 4])
            for _ in range(a.auc_epochs):
                b = Batches(c, rng.permutation(c.train), spec.per_step, dev, placement)
                tr.prepare(b)
                if run_steps(tr, b, range(len(b)), self.deadline) < len(b):
                    raise LookupError("budget")
            probs = evaluate(tr.model, c, c.val, dev, dtype == "bf16")
            row.update(status="ok", auc=auc_score(c.labels[c.val], probs),
                       train_s=time.perf_counter() - t)

        row = self.guarded({"provider": spec.name, "seed": seed, "dtype": dtype,
                            "placement": placement}, job)
        auc = self.res["auc"]
        auc["runs"].append(row)
        aucs = [r["auc"] for r in auc["runs"] if r["provider"] == spec.name and "auc" in r]
        if aucs:
            auc["summary"][spec.name] = {"mean": float(np.mean(aucs)), "n": len(aucs),
                                         "sd": float(np.std(aucs, ddof=1)) if aucs[1:] else None}
        self.save()
        return row


# Targets and reports ------------------------------------------------------------------------

RATIO_TARGETS = [("fastmil packed 16/step vs CLAM's loop", "fastmil_packed_16", "clam_1", 10),
                 ("fastmil packed vs eager padded, 16/step", "fastmil_packed_16",
                  "eager_padded_16", 2),
                 ("fastmil packed vs torch.compile padded, 16/step", "fastmil_packed_16",
                  "compile_padded_16", 1.5),
                 ("fastmil 1 slide/step vs CLAM's loop", "fastmil_1", "clam_1", 1.5)]


def targets(res):
    """Per precision and placement: the slides/s ratios of RATIO_TARGETS and the best fastmil
    variant within 3x of the roofline floor. AUC: fastmil packed 16/step and 1 slide/step equal
    when their means differ by at most max(0.01, two standard errors of the difference from
    the spread over seeds)."""
    sps = {(r["provider"], r["dtype"], r["placement"]): r["slides_per_s"]
           for r in res["results"] if r.get("slides_per_s")}
    rows = []

    def add(target, group, measured, want, met):
        rows.append({"target": target, "group": group, "measured": measured, "want": want,
                     "met": None if measured is None else met(measured)})

    for group in sorted({(r["dtype"], r["placement"]) for r in res["results"]}):
        g = "/".join(group)
        for name, mine, theirs, want in RATIO_TARGETS:
            a, b = sps.get((mine,) + group), sps.get((theirs,) + group)
            add(name, g, a / b if a and b else None, f">= {want}x", lambda v, w=want: v >= w)
        best = max(((v, p) for (p, *k), v in sps.items()
                    if tuple(k) == group and BY_NAME[p].pooling == "fastmil"), default=None)
        fl = res["floor"].get(g)
        add(f"roofline floor / best fastmil ({best[1] if best else '-'})", g,
            fl["slides_per_s"] / best[0] if best and fl else None, "<= 3x", lambda v: v <= 3)
    a, b = (res["auc"]["summary"].get(k) for k in ("fastmil_packed_16", "fastmil_1"))
    if a and b and a["sd"] is not None and b["sd"] is not None:
        noise = max(0.01, 2 * math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]))
        add("val AUC, packed 16/step vs 1 slide/step: mean difference", "auc",
            abs(a["mean"] - b["mean"]), f"<= noise ({noise:.3f})", lambda v: v <= noise)
    else:
        add("val AUC, packed 16/step vs 1 slide/step", "auc", None, "<= noise", None)
    return rows


def _f(v, fmt="{:.3g}"):
    return "-" if v is None else fmt.format(v)


def render_markdown(res):
    """The results JSON as markdown: one table per precision and placement, targets, AUC."""
    cfg, env = res["config"], res["env"]
    out = [f"One training epoch of {cfg['train_slides']} synthetic slides "
           f"({cfg['train_patches']:,} patches, median {cfg['lengths']['median']:,.0f}), "
           f"{env['device']}, torch {env['torch']}, commit {env.get('commit') or '-'}.", ""]
    for group in sorted({(r["dtype"], r["placement"]) for r in res["results"]}):
        rows = [r for r in res["results"] if (r["dtype"], r["placement"]) == group]
        clam = next((r.get("slides_per_s") for r in rows if r["provider"] == "clam_1"), None)
        out += [f"**{'/'.join(group)}**", "", "| provider | slides/step | slides/s | ms/step | "
                "x CLAM | GPU busy | peak GB (extra) | status |",
                "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            v = r.get("slides_per_s")
            mem = f"{r['peak_mem_gb']:.1f} ({r['extra_mem_gb']:.1f})" if "peak_mem_gb" in r else "-"
            out.append(f"| {r['label']} | {r['slides_per_step']} | {_f(v, '{:,.0f}')} | "
                       f"{_f(r.get('ms_per_step'), '{:.2f}')} | "
                       f"{_f(v / clam if v and clam else None, '{:.1f}')} | "
                       f"{_f(r.get('gpu_busy'), '{:.0%}')} | {mem} | {r['status']}"
                       f"{': ' + r['reason'] if r.get('reason') else ''} |")
        fl = res["floor"].get("/".join(group))
        if fl:
            out.append(f"| roofline floor ({fl['bound']}) | | {fl['slides_per_s']:,.0f} "
                       "| | | | | |")
        out.append("")
    out += ["| target | group | measured | target | met |", "|---|---|---:|---|---|"]
    for t in res["targets"]:
        met = {True: "met", False: "not met", None: "n/a"}[t["met"]]
        out.append(f"| {t['target']} | {t['group']} | {_f(t['measured'])} | {t['want']} | {met} |")
    if res["auc"]["summary"]:
        out += ["", f"Validation AUC after {cfg['auc_epochs']} epoch(s) per seed:", "",
                "| variant | AUC per seed | mean | sd |", "|---|---|---:|---:|"]
        for name, s in res["auc"]["summary"].items():
            per = ", ".join(f"{r['auc']:.3f}" for r in res["auc"]["runs"]
                            if r["provider"] == name and "auc" in r)
            out.append(f"| {name} | {per} | {s['mean']:.3f} | {_f(s['sd'], '{:.3f}')} |")
    return "\n".join(out) + "\n"


def plot(res, path):
    """Bar plot of slides/s per provider, one bar per precision and placement, log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["dtype"], r["placement"]) for r in res["results"] if r.get("slides_per_s")})
    labels = dict.fromkeys(r["label"] for r in res["results"])
    fig, ax = plt.subplots(figsize=(9, 1 + 0.3 * len(labels) * len(groups)))
    h = 0.8 / max(1, len(groups))
    for k, group in enumerate(groups):
        v = {r["label"]: r.get("slides_per_s") or 0 for r in res["results"]
             if (r["dtype"], r["placement"]) == group}
        ax.barh([i + k * h for i in range(len(labels))], [v.get(n, 0) for n in labels], h,
                label="/".join(group))
    ax.set_yticks([i + h * (len(groups) - 1) / 2 for i in range(len(labels))], list(labels))
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("slides / s over one training epoch")
    ax.set_title(f"ABMIL training, {res['env']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.epoch",
                                description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--device", help="cuda (the default where there is one) or cpu")
    add("--slides", type=int, default=1000)
    add("--median", type=int, default=MEDIAN, help="median patches per slide")
    add("--dtype", choices=("fp32", "bf16", "both"), help="bf16 (fp32 with --smoke)")
    add("--placement", choices=("gpu", "pinned", "both"), default="both")
    add("--providers", default="default", help="default (all but compile_1: ~40 s of "
        "compiling), all, or comma-separated names: " + ", ".join(BY_NAME))
    add("--budget-s", type=float, default=0.0, help="skip what would start after this (0: no)")
    add("--out", help="the results JSON, rewritten after every job")
    add("--md", help="write the markdown tables here")
    add("--png", help="write the slides/s bar plot here")
    add("--render", metavar="JSON", help="render a results JSON (to stdout, --md, --png) only")
    add("--smoke", action="store_true", help="tiny: 32 slides of median 48 patches, CPU")
    add("--warmup", type=int, default=3, help="steps before the timed epoch")
    add("--profile-steps", type=int, default=8, help="steps under the profiler (0: none)")
    add("--auc-epochs", type=int, default=2)
    add("--auc-seeds", type=int, default=2)
    add("--seed", type=int, default=0)
    add("--tf32", action="store_true", help="fp32 matmuls on TF32 tensor cores")
    add("--compile-backend", help="torch.compile backend: inductor (aot_eager with --smoke)")
    args = p.parse_args(argv)
    if args.smoke:
        args.slides = args.slides if "--slides" in argv else 32
        args.median, args.auc_epochs = min(args.median, 48), min(args.auc_epochs, 1)
        args.device = args.device or "cpu"
    args.dtype = args.dtype or ("fp32" if args.smoke else "bf16")
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    return args


def run(args):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a bare GPU image: no progress bar
        tqdm = _NoBar

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    placements = ["gpu", "pinned"] if args.placement == "both" else [args.placement]
    wanted = {"all": list(BY_NAME), "default": [n for n in BY_NAME if n != "compile_1"]}.get(
        args.providers, args.providers.split(","))
    if set(wanted) - set(BY_NAME):
        raise SystemExit(f"unknown providers in {wanted}; choose from {list(BY_NAME)}")
    specs = [s for s in SPECS if s.name in wanted]
    cuda = device.type == "cuda"
    cohort = make_cohort(args.slides, device, median=args.median, seed=args.seed,
                         resident="gpu" in placements or not cuda,
                         pinned="pinned" in placements and cuda)
    r = Run(args, device, cohort, specs)
    r.res["peaks"] = measure_peaks(device)
    for dt in dtypes:
        for pl in placements:
            r.res["floor"][f"{dt}/{pl}"] = floor(r.res["config"]["train_patches"],
                                                 len(cohort.train), dt, pl, r.res["peaks"])
    # timings first, AUC last; CUDA-graph captures after the other timings: a failed capture
    # can leave the CUDA RNG unusable for what follows (then skipped, with that reason)
    auc = [s for s in specs if s.name in AUC_VARIANTS] if args.auc_epochs > 0 else []
    jobs = [(r.time_provider, s, dt, pl) for graphs in (False, True) for pl in placements
            for dt in dtypes for s in specs if s.graphs == graphs]
    jobs += [(r.auc_run, s, k + args.seed, dtypes[-1]) for graphs in (False, True) for s in auc
             for k in range(args.auc_seeds) if s.graphs == graphs]
    bar = tqdm(jobs, desc="epoch benchmark", file=sys.stderr, mininterval=1.0)
    try:
        for fn, spec, x, y in bar:
            bar.set_postfix_str(f"{fn.__name__} {spec.name} {x} {y}")
            fn(spec, x, y)
    except KeyboardInterrupt:  # e.g. timeout -s INT: keep and report what was measured
        r.res["interrupted"] = True
    r.save()
    return r.res


class _NoBar(list):
    def __init__(self, items, **_):
        super().__init__(items)

    def set_postfix_str(self, text):
        print(text, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else list(argv))
    if args.render:
        with open(args.render) as f:
            res = json.load(f)
        res["targets"] = targets(res)
    else:
        res = run(args)
    text = render_markdown(res)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    if args.png:
        plot(res, args.png)
    return res


if __name__ == "__main__":
    main()
