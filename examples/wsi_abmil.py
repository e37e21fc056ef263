#!/usr/bin/env python
"""Train ABMIL on whole-slide images from per-slide feature files, several slides per step.

Patch features were extracted once per slide by a foundation model (CLAM, TRIDENT, ...) and
saved per slide. This trains the attention-MIL aggregator the field uses (ABMIL: Linear + ReLU +
dropout, gated attention pooling, a linear classifier; ``--branches`` for CLAM's one attention
branch per class) on packed batches of whole slides (``fastmil.collate``: no padding, no
one-slide-per-step), then writes validation metrics, each slide's attention and heatmaps.

Usage::

    python examples/wsi_abmil.py                  # synthetic cohort (made once under runs/)
    python examples/wsi_abmil.py --features FEATURES_DIR --labels labels.csv [--split splits.csv]
    python examples/wsi_abmil.py --make-synthetic DIR   # write a synthetic cohort, then stop
    torchrun --nproc_per_node=4 examples/wsi_abmil.py --features ... --labels ...

Inputs: ``--features DIR`` holds ``SLIDE_ID.h5`` (datasets ``features [N, D]`` and ``coords
[N, 2]``, as CLAM and TRIDENT write them) or ``SLIDE_ID.pt`` (a ``[N, D]`` tensor, CLAM's
``pt_files``); ``.h5`` wins where a slide has both. ``--coords DIR`` points at ``.h5`` files with
the coords of ``.pt`` slides (CLAM's ``h5_files``). ``--labels`` is a CSV with ``slide_id,label``
(CLAM's ``case_id,slide_id,label`` too); ``--split`` a CSV with ``slide_id,split`` (train / val /
test) or CLAM's ``splits_k.csv`` (columns train, val, test of slide ids); without it a stratified
random share ``--val-fraction`` of the slides is held out. ``--masks DIR`` (optional): per-slide
``SLIDE_ID.npy`` bool arrays ``[N]`` (True = tumour patch) for the localisation score.

Outputs (``--out-dir``, default ``runs/wsi_abmil``): ``metrics.json``, ``model.pt`` (best
weights), ``last.pt`` (for ``--resume``; both hold only tensors and plain values and are read
with ``torch.load(..., weights_only=True)``, so a file holding any other object is refused),
``attention/SLIDE_ID.csv`` (patch, x, y, attention: one row per patch, in the order of the
feature file), ``heatmaps/SLIDE_ID.png`` and the overview ``heatmaps.png`` (attention relative
to uniform, N·a, on one log colour scale shared by all the slides drawn, so that a slide with
flat attention looks flat: see ``--heatmaps``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import (
    DataError,
    Dist,
    add_run_flags,
    check_flags,
    class_weights,
    fit,
    load_training_state,
    make_loader,
    run_cli,
)
from torch import nn
from torch.utils.data import Dataset, Subset

import fastmil

PROG = "wsi_abmil.py"
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------
# Inputs: labels and split CSVs, per-slide feature files
# ------------------------------------------------------------------------------------------------

def _read_csv(path, what: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and ``(line number, row)`` pairs of a CSV; a missing or empty file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k})
                for row in reader]
    if not header:
        raise DataError(f"{what} {path} is empty")
    return header, rows


def read_labels(path) -> dict[str, str]:
    """``slide_id -> label`` from a CSV with columns ``slide_id,label`` (CLAM's
    ``case_id,slide_id,label`` too; other columns are ignored)."""
    header, rows = _read_csv(path, "labels file")
    if not {"slide_id", "label"} <= set(header):
        raise DataError(f"labels file {path}: needs columns slide_id and label (CLAM's "
                        f"case_id,slide_id,label works too), found {','.join(header)}")
    labels, seen = {}, {}
    for line, row in rows:
        sid, label = row.get("slide_id", ""), row.get("label", "")
        if not sid or not label:
            raise DataError(f"labels file {path} line {line}: empty "
                            f"{'slide_id' if not sid else 'label'}")
        if sid in labels:
            raise DataError(f"labels file {path}: slide {sid!r} is listed twice (lines "
                            f"{seen[sid]} and {line})")
        labels[sid], seen[sid] = label, line
    if not labels:
        raise DataError(f"labels file {path} lists no slides")
    return labels


def read_split(path) -> dict[str, str]:
    """``slide_id -> "train" | "val" | "test"`` from a CSV with columns ``slide_id,split``, or from
    CLAM's ``splits_k.csv`` (columns ``train``, ``val`` and optionally ``test``, each listing
    slide ids; shorter columns are padded with empty cells)."""
    header, rows = _read_csv(path, "split file")
    split: dict[str, str] = {}

    def put(sid, name, line):
        if sid in split and split[sid] != name:
            raise DataError(f"split file {path} line {line}: slide {sid!r} is in both "
                            f"{split[sid]} and {name}")
        split[sid] = name

    if {"slide_id", "split"} <= set(header):
        for line, row in rows:
            name = row["split"].lower()
            if name not in SPLITS:
                raise DataError(f"split file {path} line {line}: split {row['split']!r} for "
                                f"slide {row['slide_id']!r}, expected one of {', '.join(SPLITS)}")
            if row["slide_id"]:
                put(row["slide_id"], name, line)
    elif {"train", "val"} <= set(header):
        for line, row in rows:
            for name in SPLITS:
                if row.get(name):
                    put(row[name], name, line)
    else:
        raise DataError(f"split file {path}: needs columns slide_id,split or CLAM's train,val"
                        f"[,test], found {','.join(header)}")
    if "val" not in split.values():
        raise DataError(f"split file {path} puts no slide in val")
    return split


def _h5_error(path, e) -> DataError:
    return DataError(f"{path}: cannot be read as HDF5 ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else 'no details'})")


def _check_features_shape(path, shape, dtype) -> tuple[int, int]:
    if len(shape) != 2:
        raise DataError(f"{path}: features have shape {tuple(shape)}, expected [N, D] (patches "
                        f"by features)")
    if shape[0] == 0 or shape[1] == 0:
        raise DataError(f"{path}: features are empty (shape {tuple(shape)}): no patches"
                        if shape[0] == 0 else f"{path}: features have D = 0")
    if not (dtype.is_floating_point if isinstance(dtype, torch.dtype)
            else np.issubdtype(dtype, np.floating)):
        raise DataError(f"{path}: features are {dtype}, expected a floating-point type")
    return int(shape[0]), int(shape[1])


def _load_pt(path, mmap: bool):
    try:
        t = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        if mmap and "mmap" in str(e):  # an old (non-zip) file: read it whole
            return _load_pt(path, False)
        first = str(e).strip().splitlines()[0] if str(e).strip() else "no details"
        raise DataError(f"{path}: cannot be read by torch.load(weights_only=True) "
                        f"({type(e).__name__}: {first})") from None
    if not isinstance(t, torch.Tensor):
        raise DataError(f"{path}: holds a {type(t).__name__}, expected a [N, D] tensor of "
                        f"features")
    return t


def probe_features(path: Path) -> tuple[int, int]:
    """``(N, D)`` of a feature file without reading its data (h5 metadata, or a memory-mapped
    .pt). A DataError names the file and what is wrong with it."""
    if path.suffix == ".h5":
        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise DataError(f"{path}: no 'features' dataset (it holds "
                                    f"{', '.join(f.keys()) or 'nothing'}); expected features "
                                    f"[N, D] and coords [N, 2]")
                ds = f["features"]
                return _check_features_shape(path, ds.shape, ds.dtype)
        except OSError as e:
            raise _h5_error(path, e) from None
    t = _load_pt(path, mmap=True)
    return _check_features_shape(path, t.shape, t.dtype)


def read_features(path: Path) -> torch.Tensor:
    """The ``[N, D]`` features of one slide, as stored (float16/bfloat16/float32/float64)."""
    if path.suffix == ".h5":
        try:
            with h5py.File(path, "r") as f:
                t = torch.from_numpy(f["features"][()])
        except (OSError, KeyError) as e:
            raise _h5_error(path, e) from None
    else:
        t = _load_pt(path, mmap=False)
    _check_features_shape(path, t.shape, t.dtype)
    return t


def read_coords(path: Path, n: int, data: bool = True, required: bool = True):
    """``coords [N, 2]`` of an .h5 file (x, y of each patch's top-left corner in level-0
    pixels, row-aligned with the features). ``data=False`` only checks them (True when they are
    there); ``required=False`` returns None (False) where the file has none."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                if not required:
                    return None if data else False
                raise DataError(f"{path}: no 'coords' dataset (it holds "
                                f"{', '.join(f.keys()) or 'nothing'})")
            shape = f["coords"].shape
            if shape != (n, 2):
                raise DataError(f"{path}: coords have shape {shape}, expected [{n}, 2] (one x, "
                                f"y per patch of the features)")
            return f["coords"][()] if data else True
    except OSError as e:
        raise _h5_error(path, e) from None


@dataclass
class Slide:
    slide_id: str
    label: int  # class index
    path: Path  # features file
    n: int  # patches
    coords_path: Path | None = None  # .h5 file with coords, if any
    mask_path: Path | None = None  # tumour mask .npy, if any


@dataclass
class Cohort:
    classes: list[str]
    dim: int
    slides: dict[str, list[Slide]]  # split -> slides
    notes: list[str]

    def describe(self) -> str:
        lines = []
        for name, slides in self.slides.items():
            if not slides:
                continue
            counts = np.bincount([s.label for s in slides], minlength=len(self.classes))
            n = np.array([s.n for s in slides])
            lines.append(f"{name}: {len(slides)} slides ("
                         + ", ".join(f"{c} {k}" for k, c in zip(self.classes, counts, strict=True))
                         + f"), {n.min()}..{n.max()} patches, median {int(np.median(n))}")
        return "\n".join(lines)


def _natural(label: str):
    return (0, int(label), "") if re.fullmatch(r"-?\d+", label) else (1, 0, label)


def find_feature_file(features: Path, sid: str) -> Path | None:
    for suffix in (".h5", ".pt"):
        if (features / f"{sid}{suffix}").is_file():
            return features / f"{sid}{suffix}"
    return None


def load_cohort(features, labels_csv, split_csv=None, *, classes=None, coords=None, masks=None,
                val_fraction=0.25, seed=0) -> Cohort:
    """Check every input and describe the cohort: labels, split, one feature file per slide (all
    with the same D), coords and masks where given. Reads no feature data (only shapes)."""
    features = Path(features)
    if not features.is_dir():
        raise DataError(f"--features {features} is not a folder of per-slide feature files")
    labels = read_labels(labels_csv)
    if classes is None:
        classes = sorted(set(labels.values()), key=_natural)
    else:
        unknown = sorted({v for v in labels.values()} - set(classes))
        if unknown:
            sid = next(s for s, v in labels.items() if v == unknown[0])
            raise DataError(f"labels file {labels_csv}: slide {sid!r} has label {unknown[0]!r}, "
                            f"not one of --classes {' '.join(classes)}")
    if len(classes) < 2:
        raise DataError(f"labels file {labels_csv}: needs at least 2 classes, found "
                        f"{', '.join(classes)}")
    notes = []
    if split_csv is not None:
        split = read_split(split_csv)
        stray = [s for s in split if s not in labels]
        if stray:
            raise DataError(f"split file {split_csv}: slide {stray[0]!r} is not in the labels "
                            f"file {labels_csv} ({len(stray)} such slides)")
        left = len(labels) - len(split)
        if left:
            notes.append(f"{left} labelled slides are in no split and are left out")
    else:
        from sklearn.model_selection import train_test_split

        ids = list(labels)
        y = [labels[s] for s in ids]
        try:
            train, val = train_test_split(ids, test_size=val_fraction, random_state=seed,
                                          stratify=y)
        except ValueError as e:
            raise DataError(f"cannot hold out --val-fraction {val_fraction} of {len(ids)} slides "
                            f"stratified by label ({e}); pass --split") from None
        split = {**{s: "train" for s in train}, **{s: "val" for s in val}}
        notes.append(f"no --split: a stratified {val_fraction:.0%} of the slides (seed {seed}) "
                     f"is the validation set")

    index = {c: i for i, c in enumerate(classes)}
    missing, slides, dims = [], {name: [] for name in SPLITS}, {}
    for sid, name in split.items():
        path = find_feature_file(features, sid)
        if path is None:
            missing.append(sid)
            continue
        n, d = probe_features(path)
        dims.setdefault(d, path)
        if len(dims) > 1:
            (d0, p0), = list(dims.items())[:1]
            raise DataError(f"feature size differs between slides: {p0} has D = {d0} but {path} "
                            f"has D = {d}")
        coords_path = None  # --coords first (a file there must hold them), else the .h5 itself
        if coords is not None and (Path(coords) / f"{sid}.h5").is_file():
            coords_path = Path(coords) / f"{sid}.h5"
            read_coords(coords_path, n, data=False)
        elif path.suffix == ".h5" and read_coords(path, n, data=False, required=False):
            coords_path = path
        mask_path = Path(masks) / f"{sid}.npy" if masks is not None else None
        slides[name].append(Slide(sid, index[labels[sid]], path, n, coords_path,
                                  mask_path if mask_path is not None and mask_path.is_file()
                                  else None))
    if missing:
        raise DataError(f"no feature file for {len(missing)} of {len(split)} slides in {features}"
                        f": {missing[0]!r} has neither {missing[0]}.h5 nor {missing[0]}.pt"
                        + (f" (also {', '.join(map(repr, missing[1:4]))}"
                           f"{', ...' if len(missing) > 4 else ''})" if len(missing) > 1 else ""))
    if not slides["train"]:
        raise DataError("no training slides: the split puts every slide in val or test")
    no_coords = sum(s.coords_path is None for group in slides.values() for s in group)
    if no_coords:
        notes.append(f"{no_coords} slides have no coords (.pt without --coords, or .h5 without "
                     f"a coords dataset): no heatmap, and no x, y in their attention files")
    return Cohort(list(classes), next(iter(dims)), slides, notes)


class SlideDataset(Dataset):
    """Item ``i`` is ``(features [N_i, D] in dtype, label int64)``, read from its file on access
    (features are not held in memory: real cohorts are far larger than RAM)."""

    def __init__(self, slides: list[Slide], dtype=torch.float32):
        self.slides, self.dtype = slides, dtype
        self.checked = set()  # slides whose values were checked once (finite)

    def __len__(self):
        return len(self.slides)

    def __getitem__(self, i):
        s = self.slides[i]
        x = read_features(s.path)
        if x.shape[0] != s.n:
            raise DataError(f"{s.path}: now holds {x.shape[0]} patches, {s.n} at start")
        if i not in self.checked:  # a full pass over the values: once per slide, not per epoch
            if not bool(torch.isfinite(x).all()):
                raise DataError(f"{s.path}: features hold NaN or infinite values")
            self.checked.add(i)
        return x.to(self.dtype), torch.tensor(s.label)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class ABMIL(nn.Module):
    """ABMIL (Ilse et al. 2018) as CLAM configures it, on packed slides.

    ``fc``: Linear(in_dim, hidden) + ReLU + Dropout; ``pool``: fastmil gated attention pooling
    (``branches``: one attention branch per class, as CLAM_MB); ``classifier``: Linear(hidden,
    n_classes), with branches class c reads only branch c.

    ``forward(x [T, in_dim], offsets [B+1])`` -> logits ``[B, n_classes]`` and attention ``[T]``
    (``[T, n_classes]`` with branches), each slide's weights summing to 1.
    """

    def __init__(self, in_dim, n_classes, hidden=512, attn_dim=256, dropout=0.25,
                 branches=False, backend="auto"):
        super().__init__()
        self.config = dict(in_dim=in_dim, n_classes=n_classes, hidden=hidden,
                           attn_dim=attn_dim, dropout=dropout, branches=branches)
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = fastmil.AttentionPool(hidden, attn_dim, gated=True,
                                          branches=n_classes if branches else None,
                                          backend=backend)
        self.classifier = nn.Linear(hidden, n_classes)
        self.branches = branches

    def forward(self, x, offsets):
        h = self.fc(x)  # [T, hidden]
        z, attention = self.pool(h, offsets=offsets, return_attention=True)
        if self.branches:  # z [B, C, hidden]: class c from branch c
            logits = (z * self.classifier.weight).sum(-1) + self.classifier.bias
        else:  # z [B, hidden]
            logits = self.classifier(z)
        return logits, attention


def default_sizes(dim: int, hidden: int | None, attn_dim: int | None) -> tuple[int, int]:
    """CLAM's 1024 -> 512 -> 256, scaled: hidden = min(512, D / 2), attention = hidden / 2."""
    hidden = hidden or max(8, min(512, dim // 2))
    return hidden, attn_dim or max(4, hidden // 2)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=device.type == "cuda")


# ------------------------------------------------------------------------------------------------
# Prediction and metrics
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, ds: SlideDataset, ctx: Dist, batch_slides=8, attention=False):
    """Class probabilities ``[n, C]`` (numpy) of every slide of ``ds`` and, with ``attention``,
    each slide's attention (``[N_i]``, or ``[N_i, C]`` with branches). Under torchrun each rank
    predicts every world-th slide and all ranks receive everything."""
    model.eval()
    mine = list(range(ctx.rank, len(ds), ctx.world))
    probs, attn = [], []
    for x, offsets, _ in make_loader(Subset(ds, mine), batch_slides):
        with autocast(ctx.device):
            logits, a = model(x.to(ctx.device, non_blocking=True), offsets.to(ctx.device))
        probs.append(torch.softmax(logits.double(), -1).cpu())
        if attention:
            sizes = (offsets[1:] - offsets[:-1]).tolist()
            attn += [t.numpy() for t in torch.split(a.float().cpu(), sizes)]
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, 0))
    if ctx.world == 1:
        return (probs, attn) if attention else probs
    parts = [None] * ctx.world
    dist.all_gather_object(parts, (mine, probs, attn))
    order = np.concatenate([p[0] for p in parts]).astype(int)
    all_probs = np.zeros((len(ds), parts[0][1].shape[1]))
    all_probs[order] = np.concatenate([p[1] for p in parts if len(p[0])])
    if not attention:
        return all_probs
    all_attn = [None] * len(ds)
    for idx, _, a in parts:
        for i, t in zip(idx, a, strict=True):
            all_attn[i] = t
    return all_probs, all_attn


def slide_metrics(probs, labels, n_classes) -> dict:
    """Loss (cross-entropy), accuracy, balanced accuracy and ROC AUC (one-vs-rest macro for more
    than two classes; NaN when a class is missing) of slide probabilities ``[n, C]``."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    labels = np.asarray(labels, dtype=int)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0)
    p /= p.sum(1, keepdims=True)
    pred = p.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class never predicted is fine here
        out = {"loss": float(-np.mean(np.log(p[np.arange(len(labels)), labels]))),
               "accuracy": float(np.mean(pred == labels)),
               "balanced_accuracy": float(balanced_accuracy_score(labels, pred))}
    present = len(set(labels.tolist())) == n_classes
    if not present:
        out["auc"] = float("nan")
    elif n_classes == 2:
        out["auc"] = float(roc_auc_score(labels, p[:, 1]))
    else:
        out["auc"] = float(roc_auc_score(labels, p, multi_class="ovr", average="macro",
                                         labels=list(range(n_classes))))
    return out


def branch_of(attention: np.ndarray, c: int) -> np.ndarray:
    """The attention ``[N]`` of class c's branch (the only branch without branches)."""
    return attention if attention.ndim == 1 else attention[:, c]


def localisation(slides: list[Slide], attention, probs=None) -> tuple[float, list[float]]:
    """ROC AUC of each slide's attention against its tumour mask (slides with a mask holding
    both tumour and normal patches), and their mean (NaN when there are none). With branches,
    the true class's branch is scored."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for s, a in zip(slides, attention, strict=True):
        if s.mask_path is None:
            continue
        mask = load_mask(s)
        if mask.any() and not mask.all():
            aucs.append(float(roc_auc_score(mask, branch_of(a, s.label))))
    return (float(np.mean(aucs)) if aucs else float("nan")), aucs


def load_mask(s: Slide) -> np.ndarray:
    try:
        mask = np.load(s.mask_path)
    except (OSError, ValueError) as e:
        raise DataError(f"{s.mask_path}: cannot be read as a .npy mask ({e})") from None
    if mask.shape != (s.n,):
        raise DataError(f"{s.mask_path}: mask has shape {mask.shape}, expected [{s.n}] (one "
                        f"value per patch of {s.path})")
    return mask.astype(bool)


# ------------------------------------------------------------------------------------------------
# Outputs: attention files and heatmaps
# ------------------------------------------------------------------------------------------------

def write_attention(folder: Path, s: Slide, attention: np.ndarray, classes) -> Path:
    """``folder/SLIDE_ID.csv``: ``patch,x,y,attention`` (``attention_<class>`` per branch), one row
    per patch in the order of the feature file; x, y are left out where there are no coords."""
    folder.mkdir(parents=True, exist_ok=True)
    a = attention.reshape(len(attention), -1)
    cols = [np.arange(s.n)[:, None]]
    header = ["patch"]
    if s.coords_path is not None:
        cols.append(read_coords(s.coords_path, s.n))
        header += ["x", "y"]
    cols.append(a)
    header += ["attention"] if a.shape[1] == 1 else [f"attention_{c}" for c in classes]
    fmt = ["%d"] * (len(header) - a.shape[1]) + ["%.6g"] * a.shape[1]
    path = folder / f"{s.slide_id}.csv"
    np.savetxt(path, np.hstack(cols), delimiter=",", header=",".join(header), comments="",
               fmt=fmt)
    return path


def _grid(coords: np.ndarray):
    """Patch coords -> integer grid cells (gx, gy) and the step between patches in pixels."""
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)]
    steps = [st[st > 0].min() if (st > 0).any() else 1 for st in steps]
    step = int(min(steps))
    cells = np.rint((coords - coords.min(0)) / step).astype(int)
    return cells, step


HEATMAP_QUANTILE = 99.5  # the colour scale reaches the largest slide's 99.5th percentile of N·a
HEATMAP_SCALE = ("colour: N·a, a patch's attention times its slide's number of patches N "
                 "(1 = uniform, grey; red above, blue below), on one log scale shared by all the "
                 "slides drawn, symmetric about 1: from 1/M to M, M the power of 2 at or above "
                 f"the largest {HEATMAP_QUANTILE:g}th percentile of N·a of a drawn slide (at least "
                 "2); values beyond it take the end colours")


def relative_attention(attention: np.ndarray) -> np.ndarray:
    """N·a: each patch's attention times the slide's number of patches N. A slide whose attention
    is flat is 1 everywhere whatever its size; 10 means ten times a uniform patch's share."""
    a = np.asarray(attention, dtype=np.float64)
    return a * len(a)


def heatmap_scale(attentions) -> float:
    """M of the shared colour scale 1/M .. M of N·a (see HEATMAP_SCALE) for the slides'
    ``attentions`` (a list of ``[N_i]`` arrays): the smallest power of 2 at or above the largest
    slide's ``HEATMAP_QUANTILE`` percentile of N·a, and at least 2 (all flat: 1/2 .. 2)."""
    top = max([float(np.percentile(relative_attention(a), HEATMAP_QUANTILE))
               for a in attentions if len(a)] + [2.0])
    return float(2.0 ** math.ceil(math.log2(top)))


def draw_heatmap(ax, coords, attention, scale: float, mask=None, title=""):
    """Patches at their coords coloured by N·a (:func:`relative_attention`, clipped to the scale)
    on the log colour scale 1/scale .. scale (coolwarm: grey at 1 = uniform), the same for every
    slide drawn with the same ``scale``; the true tumour outline in green where a mask is given."""
    from matplotlib.colors import LogNorm

    cells, _ = _grid(coords)
    h, w = cells[:, 1].max() + 1, cells[:, 0].max() + 1
    img = np.full((h, w), np.nan)
    # clipped to the scale: beyond it the end colours (a weight that underflowed to 0 would
    # otherwise be masked by the log scale and look like a cell without tissue)
    img[cells[:, 1], cells[:, 0]] = np.clip(relative_attention(attention), 1 / scale, scale)
    im = ax.imshow(img, cmap="coolwarm", norm=LogNorm(1 / scale, scale), interpolation="nearest")
    if mask is not None and mask.any():
        m = np.zeros((h, w))
        m[cells[:, 1], cells[:, 0]] = mask
        ax.contour(m, levels=[0.5], colors="lime", linewidths=1.2)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return im


def _scale_colorbar(fig, im, scale: float, **kw):
    """A colour bar of N·a with ticks at powers of 2 (1/M, ..., 1, ..., M), written as numbers."""
    k = int(round(math.log2(scale)))
    step = max(1, math.ceil(k / 3))  # at most 7 ticks, symmetric about 1, none crowding M
    up = {0, k} | {e for e in range(step, k, step) if e < k - step / 2}
    powers = sorted(up | {-e for e in up})
    bar = fig.colorbar(im, extend="both", **kw)
    bar.set_ticks([2.0 ** e for e in powers])
    bar.set_ticklabels([f"{2 ** e:g}" if e >= 0 else f"1/{2 ** -e:g}" for e in powers])
    bar.minorticks_off()
    bar.set_label("N·a (attention × patches; 1 = uniform), shared log scale", fontsize=8)
    return bar


def heatmap_title(s: Slide, classes, probs, pred: int, attention: np.ndarray, mask) -> str:
    """Three lines: the slide, its true and predicted class; its patches and the share of the
    attention its top 1% of patches hold; for a slide with tumour, the tumour's share of the
    patches and of the attention."""
    a = np.asarray(attention, dtype=np.float64)
    top = np.sort(a)[::-1][:max(1, math.ceil(0.01 * len(a)))].sum() / a.sum()
    lines = [f"{s.slide_id}: true {classes[s.label]}, pred {classes[pred]} (p={probs[pred]:.2f})",
             f"{s.n} patches; the top 1% hold {top:.0%} of the attention"]
    if mask is not None and mask.any():
        lines.append(f"tumour: {mask.mean():.1%} of the patches, {a[mask].sum() / a.sum():.0%} "
                     f"of the attention")
    return "\n".join(lines)


def save_heatmaps(out: Path, slides, attention, probs, classes, n: int) -> list[Path]:
    """Heatmaps of up to ``n`` slides with coords, taking the classes in turn, all on one colour
    scale (HEATMAP_SCALE): one PNG per slide under ``out/heatmaps`` and the overview
    ``out/heatmaps.png``. Returns the files written."""
    from matplotlib.figure import Figure

    by_class = [[i for i, s in enumerate(slides) if s.label == c and s.coords_path is not None]
                for c in range(len(classes))]
    chosen = []
    while len(chosen) < n and any(by_class):
        for group in by_class[::-1]:  # tumour classes first: they are the interesting ones
            if group and len(chosen) < n:
                chosen.append(group.pop(0))
    if not chosen:
        return []
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    panels = []
    for i in chosen:
        s = slides[i]
        coords = read_coords(s.coords_path, s.n)
        pred = int(np.argmax(probs[i]))
        a = branch_of(attention[i], pred)  # CLAM: the predicted class's branch
        mask = load_mask(s) if s.mask_path is not None else None
        panels.append((coords, a, mask, heatmap_title(s, classes, probs[i], pred, a, mask)))
    scale = heatmap_scale([a for _, a, _, _ in panels])
    files = []
    for (coords, a, mask, title), i in zip(panels, chosen, strict=True):
        fig = Figure(figsize=(4.4, 4.4), layout="constrained")
        ax = fig.subplots()
        im = draw_heatmap(ax, coords, a, scale, mask, title)
        _scale_colorbar(fig, im, scale, ax=ax, fraction=0.04)
        files.append(out / "heatmaps" / f"{slides[i].slide_id}.png")
        fig.savefig(files[-1], dpi=100)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols + 0.8, 3.7 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (coords, a, mask, title) in zip(axes, panels, strict=False):
        ax.set_axis_on()
        im = draw_heatmap(ax, coords, a, scale, mask, title)
    _scale_colorbar(fig, im, scale, ax=list(axes), fraction=0.02)
    fig.suptitle(f"validation slides: attention relative to uniform, N·a = attention × patches, "
                 f"one log colour scale for all slides (1/{scale:g} .. {scale:g}; grey = uniform, "
                 f"red = above, blue = below)\ngreen: true tumour outline", fontsize=9)
    files.append(out / "heatmaps.png")
    fig.savefig(files[-1], dpi=100)
    return files


# ------------------------------------------------------------------------------------------------
# Synthetic cohort (the default run)
# ------------------------------------------------------------------------------------------------

def synthetic_config(args):
    from synthetic_wsi import CohortConfig

    return CohortConfig(slides=args.synthetic_slides, dim=args.synthetic_dim,
                        classes=args.synthetic_classes, fmt=args.synthetic_format,
                        seed=args.synthetic_seed)


def ensure_synthetic(args, ctx: Dist, log) -> None:
    """Make the synthetic cohort under ``--synthetic-dir`` unless it is there already, and point
    ``--features``, ``--labels``, ``--split``, ``--masks`` (and ``--coords``) at it."""
    from synthetic_wsi import make_cohort, read_config

    root, cfg = Path(args.synthetic_dir), synthetic_config(args)
    if ctx.main:
        have = read_config(root)
        if have is None:
            t0 = time.perf_counter()
            make_cohort(root, cfg, progress=not args.no_progress)
            log(f"synthetic cohort: wrote {cfg.slides} slides (D={cfg.dim}, {cfg.fmt}) to {root} "
                f"in {time.perf_counter() - t0:.1f} s")
        elif have != cfg:
            raise DataError(f"{root} holds a synthetic cohort made with other settings ({have}); "
                            f"delete it or pass another --synthetic-dir")
        else:
            log(f"synthetic cohort: {root} (made before; delete it to make it again)")
    if ctx.world > 1:
        dist.barrier()
    pt = cfg.fmt == "pt"
    args.features = root / ("pt_files" if pt else "h5_files")
    args.coords = root / "h5_files" if pt else None
    args.labels, args.split, args.masks = root / "labels.csv", root / "splits.csv", root / \
        "tumor_masks"


# ------------------------------------------------------------------------------------------------
# Training and the run
# ------------------------------------------------------------------------------------------------

def build_model(args, cohort: Cohort) -> ABMIL:
    hidden, attn_dim = default_sizes(cohort.dim, args.hidden, args.attn_dim)
    return ABMIL(cohort.dim, len(cohort.classes), hidden, attn_dim, args.dropout,
                 args.branches, args.backend)


def train(args, cohort: Cohort, ctx: Dist, log):
    """Train on the cohort's train slides with early stopping on the val slides. Returns the
    model (best weights) and fit's summary."""
    out = Path(args.out_dir)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    train_ds = SlideDataset(cohort.slides["train"], dtype)
    val_ds = SlideDataset(cohort.slides["val"], dtype)
    torch.manual_seed(args.seed)
    model = build_model(args, cohort).to(ctx.device)
    weights = class_weights([s.label for s in train_ds.slides], len(cohort.classes),
                            cohort.classes, item="slide",
                            hint="every class needs training slides").to(ctx.device)
    log(f"model: ABMIL {cohort.dim} -> {model.config['hidden']} (ReLU, dropout "
        f"{args.dropout}) -> gated attention {model.config['attn_dim']}"
        f"{f' x {len(cohort.classes)} branches' if args.branches else ''} -> "
        f"{len(cohort.classes)} classes; class weights "
        + ", ".join(f"{c} {w:.2f}" for c, w in zip(cohort.classes, weights.tolist(), strict=True)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = make_loader(train_ds, args.batch_slides // ctx.world, shuffle=True, seed=args.seed,
                         world=ctx.world, rank=ctx.rank, num_workers=args.workers,
                         pin_memory=ctx.device.type == "cuda")

    def train_loss(net, batch):
        x, offsets, y = (t.to(ctx.device, non_blocking=True) for t in batch)
        with autocast(ctx.device):
            logits, _ = net(x, offsets)
        loss = F.cross_entropy(logits.float(), y, reduction="none") * weights[y]
        return loss.mean(), len(y)  # a mean over the local batch: DDP averages the ranks

    def evaluate(m):
        probs = predict(m, val_ds, ctx, args.batch_slides)
        return slide_metrics(probs, [s.label for s in val_ds.slides], len(cohort.classes))

    state = out / "last.pt"
    extra = {"config": model.config, "classes": cohort.classes, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.resume:
        if not state.is_file():
            raise DataError(f"--resume: no {state} to go on from (it is written after every "
                            f"epoch)")
        saved = load_training_state(state)  # weights_only=True: other objects are refused
        if saved.get("config") != model.config or saved.get("classes") != cohort.classes:
            raise DataError(f"--resume: {state} holds a model of {saved.get('config')} for "
                            f"classes {saved.get('classes')}, but these flags and data give "
                            f"{model.config} for {cohort.classes}")
        log(f"resuming from {state} after epoch {saved['epoch']}")
    model, info = fit(model, opt, loader, train_loss, evaluate, epochs=args.epochs,
                      patience=args.patience, ctx=ctx, min_epochs=args.min_epochs,
                      checkpoint=out / "model.pt", extra=extra,
                      state_path=state, resume=args.resume, progress=not args.no_progress,
                      desc="train")
    return model, info


def evaluate_and_write(args, model, cohort: Cohort, ctx: Dist, log) -> dict:
    """Metrics, attention files and heatmaps of the val (and test) slides."""
    out = Path(args.out_dir)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    result = {}
    for name in ("val", "test"):
        slides = cohort.slides[name]
        if not slides:
            continue
        probs, attention = predict(model, SlideDataset(slides, dtype), ctx, args.batch_slides,
                                   attention=True)
        m = slide_metrics(probs, [s.label for s in slides], len(cohort.classes))
        loc, per_slide = localisation(slides, attention)
        result.update({f"{name}_{k}": v for k, v in m.items()})
        if name == "val":
            result.update(localisation_auc=loc, localisation_slides=len(per_slide))
        log(f"{name}: AUC {m['auc']:.4f}{' (macro, one-vs-rest)' if len(cohort.classes) > 2 else ''}"
            f", balanced accuracy {m['balanced_accuracy']:.4f}, loss {m['loss']:.4f} "
            f"({len(slides)} slides)")
        if per_slide:
            log(f"{name} localisation: attention vs true tumour patches, AUC {loc:.4f} "
                f"(mean over {len(per_slide)} slides with a tumour mask)")
        if ctx.main:
            for s, a in zip(slides, attention, strict=True):
                write_attention(out / "attention", s, a, cohort.classes)
            if name == "val":
                files = save_heatmaps(out, slides, attention, probs, cohort.classes,
                                      args.heatmaps)
                if files:
                    log(f"heatmaps: {files[-1]} and {len(files) - 1} in {out / 'heatmaps'}")
    if ctx.main:
        log(f"attention: one CSV per slide in {out / 'attention'}")
    return result


def run(args, ctx: Dist, log) -> dict:
    t_start = time.perf_counter()
    out = Path(args.out_dir)
    if args.make_synthetic:
        if ctx.main:
            from synthetic_wsi import make_cohort

            cfg = synthetic_config(args)
            make_cohort(args.make_synthetic, cfg, progress=not args.no_progress)
            root = Path(args.make_synthetic)
            features = root / ("pt_files" if cfg.fmt == "pt" else "h5_files")
            log(f"wrote a synthetic cohort of {cfg.slides} slides to {root}; train on it with\n"
                f"  python examples/wsi_abmil.py --features {features} --labels "
                f"{root / 'labels.csv'} --split {root / 'splits.csv'} --masks "
                f"{root / 'tumor_masks'}" + (f" --coords {root / 'h5_files'}"
                                             if cfg.fmt == "pt" else ""))
        return {}
    if args.features is None:
        ensure_synthetic(args, ctx, log)
    cohort = load_cohort(args.features, args.labels, args.split, classes=args.classes,
                         coords=args.coords, masks=args.masks, val_fraction=args.val_fraction,
                         seed=args.seed)
    log(f"cohort: {args.features} (D={cohort.dim}), classes {', '.join(cohort.classes)}")
    log(cohort.describe())
    for note in cohort.notes:
        log(f"note: {note}")
    if args.batch_slides > len(cohort.slides["train"]):
        raise DataError(f"--batch-slides {args.batch_slides} is more than the "
                        f"{len(cohort.slides['train'])} training slides")
    out.mkdir(parents=True, exist_ok=True)
    if ctx.world > 1:
        log(f"distributed: {ctx.world} processes ({dist.get_backend()}), "
            f"{args.batch_slides // ctx.world} slides each per step")
    model, info = train(args, cohort, ctx, log)
    history = info["history"]
    rates = [r["bags_per_s"] for r in history[1:]] or [r["bags_per_s"] for r in history]
    slides_per_s = float(np.median(rates)) if rates else float("nan")
    log(f"training: best epoch {info['best_epoch']} of {info['epochs_run']}, val loss "
        f"{info['best_val_loss']:.4f} (saved {out / 'model.pt'})")
    per_step = (f"{args.batch_slides} slides per step, packed" if args.batch_slides > 1
                else "1 slide per step")
    n = torch.get_num_threads()
    threads = f", {n} thread{'s' if n > 1 else ''}" if ctx.device.type == "cpu" else ""
    log(f"throughput: {slides_per_s:.1f} slides/s of training ({per_step}; median over "
        f"{len(rates)} epochs; {ctx.device.type}{threads}"
        f"{f', {ctx.world} processes' if ctx.world > 1 else ''})")
    result = evaluate_and_write(args, model, cohort, ctx, log)
    result.update(slides_per_s=slides_per_s, batch_slides=args.batch_slides,
                  best_epoch=info["best_epoch"], epochs_run=info["epochs_run"],
                  best_val_loss=info["best_val_loss"], classes=cohort.classes,
                  train_slides=len(cohort.slides["train"]), val_slides=len(cohort.slides["val"]),
                  dim=cohort.dim, model=model.config, device=str(ctx.device),
                  threads=torch.get_num_threads(), world=ctx.world, history=history,
                  seconds=time.perf_counter() - t_start)
    if ctx.main:
        with open(out / "metrics.json", "w") as f:
            json.dump(result, f, indent=2)
        log(f"metrics: {out / 'metrics.json'}")
    log(f"done in {result['seconds']:.1f} s")
    return result


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data (without --features: the synthetic cohort)")
    g.add_argument("--features", type=Path, default=None,
                   help="folder of per-slide feature files SLIDE_ID.h5 (features [N, D], coords "
                        "[N, 2]) or SLIDE_ID.pt ([N, D] tensor)")
    g.add_argument("--labels", type=Path, default=None,
                   help="CSV with columns slide_id,label (or case_id,slide_id,label)")
    g.add_argument("--split", type=Path, default=None,
                   help="CSV with slide_id,split (train/val/test) or CLAM's splits_k.csv")
    g.add_argument("--classes", nargs="+", default=None, metavar="LABEL",
                   help="the label set, in class order (default: the labels found, sorted); "
                        "with two classes the second is the positive one")
    g.add_argument("--coords", type=Path, default=None,
                   help="folder of SLIDE_ID.h5 files with coords, for .pt features (CLAM's "
                        "h5_files)")
    g.add_argument("--masks", type=Path, default=None,
                   help="folder of SLIDE_ID.npy bool arrays [N] (tumour patches) for the "
                        "localisation score")
    g.add_argument("--val-fraction", type=float, default=0.25,
                   help="validation share of a stratified random split when there is no --split")
    g = p.add_argument_group("synthetic cohort")
    g.add_argument("--make-synthetic", type=Path, default=None, metavar="DIR",
                   help="write a synthetic cohort to DIR and stop")
    g.add_argument("--synthetic-dir", default="runs/wsi_synthetic",
                   help="where the default run keeps its synthetic cohort")
    g.add_argument("--synthetic-slides", type=int, default=160)
    g.add_argument("--synthetic-dim", type=int, default=128, help="feature size D")
    g.add_argument("--synthetic-classes", type=int, default=2,
                   help="normal + (N - 1) tumour classes")
    g.add_argument("--synthetic-format", choices=("h5", "pt"), default="h5")
    g.add_argument("--synthetic-seed", type=int, default=0)
    g = p.add_argument_group("model and training")
    g.add_argument("--hidden", type=int, default=None,
                   help="size of the Linear+ReLU projection (default min(512, D/2): CLAM's 512 "
                        "for D=1024)")
    g.add_argument("--attn-dim", type=int, default=None,
                   help="attention size (default hidden/2: CLAM's 256)")
    g.add_argument("--dropout", type=float, default=0.25, help="dropout after the projection")
    g.add_argument("--branches", action="store_true",
                   help="one attention branch per class (CLAM_MB)")
    g.add_argument("--batch-slides", type=int, default=8,
                   help="slides per optimizer step over all processes, packed")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--epochs", type=int, default=50, help="maximum epochs")
    g.add_argument("--patience", type=int, default=10,
                   help="early stopping: epochs without a better validation loss")
    g.add_argument("--min-epochs", type=int, default=20,
                   help="no early stopping before this epoch (a warm-up, as CLAM's stop_epoch)")
    g.add_argument("--resume", action="store_true",
                   help="go on from --out-dir/last.pt (same flags and data)")
    add_run_flags(g, threads_help="CPU threads (default: the CPUs idle at start)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/wsi_abmil")
    g.add_argument("--heatmaps", type=int, default=4,
                   help="validation slides drawn (tumour classes first); " + HEATMAP_SCALE)
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args, {
        "--batch-slides": args.batch_slides, "--epochs": args.epochs, "--patience": args.patience,
        "--synthetic-slides": args.synthetic_slides, "--synthetic-dim": args.synthetic_dim,
        "--hidden": args.hidden, "--attn-dim": args.attn_dim, "--threads": args.threads},
        "--batch-slides")
    if args.synthetic_classes < 2:
        parser.error(f"--synthetic-classes must be at least 2, got {args.synthetic_classes}")
    if args.synthetic_slides < 2 * args.synthetic_classes:
        parser.error(f"--synthetic-slides must be at least 2 per class "
                     f"({2 * args.synthetic_classes}), got {args.synthetic_slides}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if not args.lr > 0 or args.weight_decay < 0:
        parser.error(f"--lr must be positive and --weight-decay 0 or more, got {args.lr} and "
                     f"{args.weight_decay}")
    for flag in ("--heatmaps", "--workers", "--min-epochs"):
        if getattr(args, flag[2:].replace("-", "_")) < 0:
            parser.error(f"{flag} must be 0 or more, got "
                         f"{getattr(args, flag[2:].replace('-', '_'))}")
    if (args.features is None) != (args.labels is None) and not args.make_synthetic:
        parser.error("--features and --labels go together (without both: the synthetic cohort)")
    if args.classes is not None and len(set(args.classes)) != len(args.classes):
        parser.error(f"--classes lists a label twice: {' '.join(args.classes)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    return run_cli(PROG, args, lambda ctx, log: run(args, ctx, log), small_steps=False)


if __name__ == "__main__":
    main()
