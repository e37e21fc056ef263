"""A synthetic whole-slide-image cohort, written as feature-extraction pipelines write real ones.

Each slide is a tissue-shaped set of patches on a grid (coords in level-0 pixels, 256 px
patches), its features drawn around a few "tissue type" clusters that form spatially coherent
regions, with a per-slide stain shift. A tumour slide holds one contiguous tumour region (1-5% of
its patches) whose features are moved along a "tumour" direction (one per tumour class) by a few
noise standard deviations: a weak signal per patch in D dimensions, hidden among thousands of
normal patches, as in CAMELYON16.

Layout under ``root`` (``make_cohort``)::

    h5_files/SLIDE_ID.h5     features [N, D] float16 + coords [N, 2] int32 (CLAM / TRIDENT)
    pt_files/SLIDE_ID.pt     with fmt="pt": features [N, D] (CLAM's pt_files); the .h5 files then
                             hold only the coords
    labels.csv               case_id,slide_id,label
    splits.csv               slide_id,split (train / val)
    tumor_masks/SLIDE_ID.npy ground truth: bool [N], True = tumour patch (row-aligned)
    cohort.json              the settings it was made with

Used by ``wsi_abmil.py`` (``--make-synthetic DIR``, and its default run).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

PATCH_SIZE = 256  # level-0 pixels per patch side
TISSUE_TYPES = ("stroma", "epithelium", "fat", "lymphocytes", "necrosis")


@dataclass(frozen=True)
class CohortConfig:
    slides: int = 160
    dim: int = 128  # feature size D
    classes: int = 2  # normal + (classes - 1) tumour classes
    tumor_fraction: float = 0.4  # share of tumour slides
    val_fraction: float = 0.3
    fmt: str = "h5"  # "h5" or "pt"
    seed: int = 0
    median_patches: int = 3000  # patches per slide ~ lognormal; 1,000..30,000 patches a slide
    signal: float = 3.5  # tumour feature shift along one direction, in per-feature noise stds
    stain: float = 0.1  # per-slide feature shift (scanner, stain), per feature
    region: tuple[float, float] = (0.01, 0.05)  # tumour region size, share of the patches

    @property
    def class_names(self) -> list[str]:
        if self.classes == 2:
            return ["normal", "tumor"]
        return ["normal"] + [f"tumor_{chr(ord('a') + c)}" for c in range(self.classes - 1)]


def _smooth_field(rng, n_waves=6, low=1.0, high=4.0):
    """A smooth random function on the unit square (a sum of random plane waves), in ~[-1, 1]."""
    freq = rng.uniform(low, high, (n_waves, 1)) * np.exp(1j * rng.uniform(0, 2 * np.pi,
                                                                           (n_waves, 1)))
    phase = rng.uniform(0, 2 * np.pi, (n_waves, 1))
    amp = rng.uniform(0.5, 1.0, (n_waves, 1)) / math.sqrt(n_waves / 2)

    def f(u, v):  # u, v: [M] in [0, 1]
        return (amp * np.sin(2 * np.pi * (freq.real * u + freq.imag * v) + phase)).sum(0)
    return f


def _tissue_grid(rng, n_target):
    """Grid cells (gx, gy) of a tissue-shaped region of about ``n_target`` cells: a union of 1-3
    random ellipses with a wobbly border."""
    ellipses = []
    for _ in range(rng.integers(1, 4)):
        ellipses.append((rng.uniform(0.3, 0.7, 2), rng.uniform(0.12, 0.3, 2),
                         rng.uniform(0, np.pi)))
    wobble = _smooth_field(rng, low=1.0, high=3.0)

    def inside(g):
        gy, gx = np.mgrid[0:g, 0:g]
        u, v = (gx.ravel() + 0.5) / g, (gy.ravel() + 0.5) / g
        level = np.full(u.shape, -np.inf)
        for (cx, cy), (a, b), angle in ellipses:
            du, dv = u - cx, v - cy
            ru = (du * np.cos(angle) + dv * np.sin(angle)) / a
            rv = (-du * np.sin(angle) + dv * np.cos(angle)) / b
            level = np.maximum(level, 1 - ru ** 2 - rv ** 2)
        keep = level + 0.35 * wobble(u, v) > 0
        return np.stack([gx.ravel()[keep], gy.ravel()[keep]], 1), u[keep], v[keep]

    share = len(inside(96)[0]) / 96 ** 2
    return inside(max(8, math.ceil(math.sqrt(n_target / max(share, 1e-3)))))


def make_slide(rng, n_target, label, centers, tumor_dirs, cfg: CohortConfig) -> dict:
    """One slide: ``features [N, D]`` float16, ``coords [N, 2]`` int32 (top-left corners, level-0
    pixels), ``tumor [N]`` bool and ``tissue [N]`` int8 (the tissue type of each patch)."""
    cells, u, v = _tissue_grid(rng, n_target)
    n, d = len(cells), cfg.dim
    fields = np.stack([_smooth_field(rng, low=2.0, high=6.0)(u, v) for _ in TISSUE_TYPES])
    tissue = np.argmax(fields + rng.normal(0, 0.15, fields.shape), axis=0).astype(np.int8)
    stain = rng.normal(0, cfg.stain, d)  # per-slide shift: scanner and stain differences
    features = centers[tissue] + stain + rng.normal(0, 1.0, (n, d))
    tumor = np.zeros(n, dtype=bool)
    if label > 0:  # one contiguous region around a random tissue patch, its border wobbly
        k = max(1, int(round(rng.uniform(*cfg.region) * n)))
        wobble = _smooth_field(rng, low=3.0, high=8.0)
        c = rng.integers(n)
        dist = np.hypot(u - u[c], v - v[c]) * (1 + 0.25 * wobble(u, v))
        tumor[np.argsort(dist)[:k]] = True
        features[tumor] += cfg.signal * tumor_dirs[label - 1]
    origin = rng.integers(2, 40, 2) * PATCH_SIZE  # where the tissue starts on the glass
    coords = (cells * PATCH_SIZE + origin).astype(np.int32)
    return {"features": features.astype(np.float16), "coords": coords, "tumor": tumor,
            "tissue": tissue}


def make_cohort(root, cfg: CohortConfig = CohortConfig(), progress=True) -> Path:
    """Write the cohort of ``cfg`` under ``root`` (layout in the module docstring); returns
    ``root``. ``cohort.json`` is written last, so a folder with it is complete."""
    if cfg.classes < 2 or cfg.slides < 2 * cfg.classes or cfg.dim < 2:
        raise ValueError(f"a synthetic cohort needs at least 2 classes, 2 slides per class and "
                         f"D >= 2, got {cfg.classes} classes, {cfg.slides} slides, D={cfg.dim}")
    root = Path(root)
    for sub in ("h5_files", "tumor_masks") + (("pt_files",) if cfg.fmt == "pt" else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 2024])
    d = cfg.dim
    # tissue types: cluster centres ~4 noise-stds apart; tumour directions: unit vectors
    centers = rng.normal(0, 4.0 / math.sqrt(2 * d), (len(TISSUE_TYPES), d))
    tumor_dirs = rng.normal(size=(cfg.classes - 1, d))
    tumor_dirs /= np.linalg.norm(tumor_dirs, axis=1, keepdims=True)
    # labels: a share tumour_fraction of tumour slides, split evenly over the tumour classes
    n_tumor = max(cfg.classes - 1, round(cfg.tumor_fraction * cfg.slides))
    labels = np.zeros(cfg.slides, dtype=np.int64)
    labels[:n_tumor] = 1 + np.arange(n_tumor) % (cfg.classes - 1)
    labels = rng.permutation(labels)
    # target sizes kept inside 1,100..28,000: a tissue shape lands within a few % of its target
    sizes = np.clip(np.rint(cfg.median_patches * np.exp(rng.normal(0, 0.7, cfg.slides))),
                    1100, 28000).astype(int)
    ids = [f"slide_{i:04d}" for i in range(cfg.slides)]
    split = np.array(["train"] * cfg.slides, dtype=object)
    for c in range(cfg.classes):  # stratified: each class keeps its val share
        members = np.flatnonzero(labels == c)
        n_val = max(1, round(cfg.val_fraction * len(members)))
        split[rng.choice(members, n_val, replace=False)] = "val"

    names = cfg.class_names
    for i in tqdm(range(cfg.slides), desc="synthetic cohort", disable=not progress, leave=False):
        slide = make_slide(np.random.default_rng([cfg.seed, i]), sizes[i], int(labels[i]),
                           centers, tumor_dirs, cfg)
        with h5py.File(root / "h5_files" / f"{ids[i]}.h5", "w") as f:
            if cfg.fmt == "h5":
                f.create_dataset("features", data=slide["features"])
            coords = f.create_dataset("coords", data=slide["coords"])
            coords.attrs["patch_size"] = PATCH_SIZE
            coords.attrs["patch_level"] = 0
        if cfg.fmt == "pt":
            torch.save(torch.from_numpy(slide["features"]), root / "pt_files" / f"{ids[i]}.pt")
        np.save(root / "tumor_masks" / f"{ids[i]}.npy", slide["tumor"])
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "slide_id", "label"])
        w.writerows([f"case_{i:04d}", s, names[c]] for i, (s, c) in enumerate(zip(ids, labels, strict=True)))
    with open(root / "splits.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "split"])
        w.writerows(zip(ids, split, strict=True))
    (root / "cohort.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return root


def read_config(root) -> CohortConfig | None:
    """The settings of the complete cohort under ``root``, or None when there is none."""
    path = Path(root) / "cohort.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    saved["region"] = tuple(saved["region"])
    return CohortConfig(**saved)
