"""Tests of examples/wsi_abmil.py and examples/synthetic_wsi.py on tiny synthetic cohorts.

Inputs in both formats (CLAM / TRIDENT .h5, CLAM .pt), the CSV variants, every bad-input error,
the model, a short training run, checkpoint resume, the attention export, the heatmaps, the
default (synthetic) run and the thread choice beside a busy process. The DDP equivalence test
lives in test_wsi_ddp.py.
"""

from __future__ import annotations

import csv
import importlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_usage_error

import fastmil

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "wsi_abmil.py"
sys.path.insert(0, str(EXAMPLE.parent))  # the examples import their shared helpers, _common.py
wsi = importlib.import_module("wsi_abmil")
syn = importlib.import_module("synthetic_wsi")
common = importlib.import_module("_common")

# 12 slides of ~1,100-4,000 patches, D=16; a stronger tumour signal than the default cohort's, so
# that a few epochs on 8 training slides learn it
TINY = dict(slides=12, dim=16, median_patches=1100, signal=8.0, region=(0.04, 0.05))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (see _common.set_threads)


@pytest.fixture(scope="module")
def h5_cohort(tmp_path_factory):
    return syn.make_cohort(tmp_path_factory.mktemp("h5"), syn.CohortConfig(**TINY),
                           progress=False)


@pytest.fixture(scope="module")
def pt_cohort(tmp_path_factory):
    return syn.make_cohort(tmp_path_factory.mktemp("pt"), syn.CohortConfig(**TINY, fmt="pt"),
                           progress=False)


def cohort_args(root, out, *extra):
    return ["--features", str(root / "h5_files"), "--labels", str(root / "labels.csv"),
            "--split", str(root / "splits.csv"), "--masks", str(root / "tumor_masks"),
            "--out-dir", str(out), "--no-progress", "--threads", "1", *extra]


def load(root, **kw):
    kw.setdefault("masks", root / "tumor_masks")
    return wsi.load_cohort(root / "h5_files", root / "labels.csv", root / "splits.csv", **kw)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


# ------------------------------------------------------------------------------------------------
# synthetic cohort
# ------------------------------------------------------------------------------------------------

def test_synthetic_cohort_files_and_ground_truth(h5_cohort):
    from scipy import ndimage

    cfg = syn.read_config(h5_cohort)
    assert cfg == syn.CohortConfig(**TINY)
    with open(h5_cohort / "labels.csv") as f:
        labels = list(csv.DictReader(f))
    assert list(labels[0]) == ["case_id", "slide_id", "label"] and len(labels) == 12
    assert {r["label"] for r in labels} == {"normal", "tumor"}
    n_tumor = sum(r["label"] == "tumor" for r in labels)
    assert n_tumor == round(0.4 * 12)
    for r in labels:
        with h5py.File(h5_cohort / "h5_files" / f"{r['slide_id']}.h5") as f:
            x, coords = f["features"][()], f["coords"][()]
            assert f["coords"].attrs["patch_size"] == syn.PATCH_SIZE
        mask = np.load(h5_cohort / "tumor_masks" / f"{r['slide_id']}.npy")
        n = len(x)
        assert x.shape == (n, 16) and x.dtype == np.float16 and 1000 <= n <= 30000
        assert coords.shape == (n, 2) and coords.dtype == np.int32
        assert not (coords % syn.PATCH_SIZE).any()  # a grid of 256-px patches
        assert len(np.unique(coords, axis=0)) == n  # no patch twice
        assert mask.shape == (n,) and mask.dtype == bool
        if r["label"] == "normal":
            assert not mask.any()
            continue
        assert cfg.region[0] - 0.005 <= mask.mean() <= cfg.region[1] + 0.005
        # one contiguous region (4-connected on the patch grid), give or take a stray patch
        cells = coords // syn.PATCH_SIZE - coords.min(0) // syn.PATCH_SIZE
        grid = np.zeros(cells.max(0) + 1, dtype=bool)
        grid[cells[mask, 0], cells[mask, 1]] = True
        parts, count = ndimage.label(grid)
        assert np.bincount(parts.ravel())[1:].max() >= 0.9 * mask.sum()
        # the tumour patches carry the signal: their mean moves by ~signal noise-stds
        shift = x[mask].astype(np.float64).mean(0) - x[~mask].astype(np.float64).mean(0)
        assert 0.6 * cfg.signal < np.linalg.norm(shift) < 2.5 * cfg.signal
    with open(h5_cohort / "splits.csv") as f:
        split = {r["slide_id"]: r["split"] for r in csv.DictReader(f)}
    val = [r["label"] for r in labels if split[r["slide_id"]] == "val"]
    assert sorted(val) == ["normal"] * 2 + ["tumor"] * 2  # stratified 30%


def test_pt_and_h5_cohorts_hold_the_same_slides(h5_cohort, pt_cohort):
    a = load(h5_cohort)
    b = wsi.load_cohort(pt_cohort / "pt_files", pt_cohort / "labels.csv",
                        pt_cohort / "splits.csv", coords=pt_cohort / "h5_files")
    assert a.classes == b.classes == ["normal", "tumor"] and a.dim == b.dim == 16
    for sa, sb in zip(a.slides["train"] + a.slides["val"], b.slides["train"] + b.slides["val"],
                      strict=True):
        assert sb.path.suffix == ".pt" and sb.coords_path.parent.name == "h5_files"
        assert (sa.slide_id, sa.label, sa.n) == (sb.slide_id, sb.label, sb.n)
        assert torch.equal(wsi.read_features(sa.path), wsi.read_features(sb.path))
        np.testing.assert_array_equal(wsi.read_coords(sa.coords_path, sa.n),
                                      wsi.read_coords(sb.coords_path, sb.n))
    with h5py.File(pt_cohort / "h5_files" / f"{b.slides['val'][0].slide_id}.h5") as f:
        assert "features" not in f  # the pt cohort's .h5 files hold only the coords
    # a .pt slide without --coords: no coords (attention CSV without x, y; no heatmap)
    c = wsi.load_cohort(pt_cohort / "pt_files", pt_cohort / "labels.csv", pt_cohort / "splits.csv")
    assert all(s.coords_path is None for s in c.slides["val"])
    assert "12 slides have no coords" in c.notes[0]


def test_cohort_description(h5_cohort):
    c = load(h5_cohort)
    text = c.describe()
    assert re.search(r"train: 8 slides \(5 normal, 3 tumor\), \d+\.\.\d+ patches, median", text)
    assert "val: 4 slides (2 normal, 2 tumor)" in text and "test" not in text
    assert all(s.mask_path is not None for s in c.slides["val"])


# ------------------------------------------------------------------------------------------------
# CSV variants
# ------------------------------------------------------------------------------------------------

def test_labels_csv_variants(tmp_path):
    a = write_csv(tmp_path / "a.csv", [["slide_id", "label"], ["s1", "tumor"], ["s2", "normal"]])
    b = write_csv(tmp_path / "b.csv", [["case_id", "slide_id", "label", "site"],
                                       ["c1", "s1", "tumor", "x"], ["c1", "s2", " normal", "y"]])
    c = tmp_path / "c.csv"  # a BOM and CRLF, as Excel writes them
    c.write_bytes("\ufeffslide_id,label\r\ns1,tumor\r\ns2,normal\r\n".encode())
    expected = {"s1": "tumor", "s2": "normal"}
    assert wsi.read_labels(a) == wsi.read_labels(b) == wsi.read_labels(c) == expected


def test_split_csv_variants(tmp_path):
    long = write_csv(tmp_path / "long.csv", [["slide_id", "split"], ["s1", "train"],
                                              ["s2", "train"], ["s3", "VAL"], ["s4", "test"]])
    # CLAM's splits_k.csv: an unnamed index column, one column per split, blank padding
    clam = write_csv(tmp_path / "clam.csv", [["", "train", "val", "test"], ["0", "s1", "s3", "s4"],
                                             ["1", "s2", "", ""]])
    expected = {"s1": "train", "s2": "train", "s3": "val", "s4": "test"}
    assert wsi.read_split(long) == wsi.read_split(clam) == expected


def test_test_split_and_no_split(h5_cohort, tmp_path):
    rows = [["slide_id", "split"]]
    with open(h5_cohort / "splits.csv") as f:
        for i, r in enumerate(csv.DictReader(f)):
            rows.append([r["slide_id"], "test" if i == 0 and r["split"] == "train" else r["split"]])
    rows = rows[:-1]  # the last slide is in no split
    split = write_csv(tmp_path / "split.csv", rows)
    c = wsi.load_cohort(h5_cohort / "h5_files", h5_cohort / "labels.csv", split)
    assert len(c.slides["test"]) == (rows[1][1] == "test")
    assert c.notes == ["1 labelled slides are in no split and are left out"]
    # no --split: a stratified random share, said so
    c = wsi.load_cohort(h5_cohort / "h5_files", h5_cohort / "labels.csv", val_fraction=0.5, seed=3)
    assert len(c.slides["val"]) == 6 and sum(s.label for s in c.slides["val"]) == 2
    assert "no --split" in c.notes[0]


def test_classes_order_and_numeric_labels(h5_cohort, tmp_path):
    c = load(h5_cohort, classes=["tumor", "normal"])
    assert c.classes == ["tumor", "normal"]
    assert all((s.label == 0) == (s.mask_path is not None and np.load(s.mask_path).any())
               for s in c.slides["val"])
    with open(h5_cohort / "labels.csv") as f:
        rows = [[r["slide_id"], {"normal": "0", "tumor": "10"}[r["label"]]]
                for r in csv.DictReader(f)]
    numeric = write_csv(tmp_path / "labels.csv", [["slide_id", "label"], *rows])
    c = wsi.load_cohort(h5_cohort / "h5_files", numeric, h5_cohort / "splits.csv")
    assert c.classes == ["0", "10"]  # numbers sort as numbers ("10" after "2")


# ------------------------------------------------------------------------------------------------
# bad input: clear errors that name the file and the problem
# ------------------------------------------------------------------------------------------------

def make_bad_cohort(tmp_path, damage):
    """Four .h5 slides s0..s3 of [30, 8] features with labels and a split, then ``damage``.
    Returns the arguments of load_cohort and the file damaged."""
    folder = tmp_path / "feat"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        with h5py.File(folder / f"s{i}.h5", "w") as f:
            f["features"] = rng.normal(size=(30, 8)).astype(np.float32)
            f["coords"] = np.stack([np.arange(30) * 256, np.zeros(30)], 1).astype(np.int32)
    labels = [["slide_id", "label"], ["s0", "a"], ["s1", "b"], ["s2", "a"], ["s3", "b"]]
    split = [["slide_id", "split"], ["s0", "train"], ["s1", "train"], ["s2", "val"],
             ["s3", "val"]]
    kw = {}
    target = folder / "s1.h5"
    if damage == "missing":
        target.unlink()
    elif damage in ("empty", "1d", "3d", "int", "other_d"):
        data = {"empty": np.zeros((0, 8), np.float32), "1d": np.zeros(8, np.float32),
                "3d": np.zeros((1, 30, 8), np.float32), "int": np.zeros((30, 8), np.int64),
                "other_d": np.zeros((30, 9), np.float32)}[damage]
        with h5py.File(target, "w") as f:
            f["features"] = data
    elif damage == "no_features":
        with h5py.File(target, "w") as f:
            f["feats"] = np.zeros((30, 8), np.float32)
    elif damage == "not_h5":
        target.write_bytes(b"this is not an HDF5 file")
    elif damage == "coords":
        with h5py.File(target, "a") as f:
            del f["coords"]
            f["coords"] = np.zeros((29, 2), np.int32)
    elif damage == "coords_dir":  # a --coords file must hold coords
        (tmp_path / "coords").mkdir()
        target = tmp_path / "coords" / "s1.h5"
        with h5py.File(target, "w") as f:
            f["features"] = np.zeros((30, 8), np.float32)
        kw["coords"] = tmp_path / "coords"
    elif damage in ("pt_dict", "pt_garbage", "pt_empty"):
        target.unlink()
        target = folder / "s1.pt"
        if damage == "pt_dict":
            torch.save({"features": torch.zeros(30, 8)}, target)
        elif damage == "pt_empty":
            torch.save(torch.zeros(0, 8), target)
        else:
            target.write_bytes(b"garbage")
    elif damage == "label":
        labels[2][1] = "c"
        kw["classes"] = ["a", "b"]
        target = tmp_path / "labels.csv"
    elif damage == "one_class":
        labels = [row if row[0] == "slide_id" else [row[0], "a"] for row in labels]
        target = tmp_path / "labels.csv"
    elif damage == "labels_columns":
        labels = [["slide", "class"]] + labels[1:]
        target = tmp_path / "labels.csv"
    elif damage == "labels_twice":
        labels.append(["s1", "a"])
        target = tmp_path / "labels.csv"
    elif damage == "labels_blank":
        labels[3][1] = ""
        target = tmp_path / "labels.csv"
    elif damage == "split_name":
        split[2][1] = "training"
        target = tmp_path / "split.csv"
    elif damage == "split_stray":
        split.append(["s9", "train"])
        target = tmp_path / "split.csv"
    elif damage == "split_no_val":
        split = [row if row[0] == "slide_id" else [row[0], "train"] for row in split]
        target = tmp_path / "split.csv"
    elif damage == "split_both":
        split.append(["s0", "val"])
        target = tmp_path / "split.csv"
    elif damage == "mask":
        (tmp_path / "masks").mkdir()
        np.save(tmp_path / "masks" / "s2.npy", np.zeros(29, dtype=bool))
        kw["masks"] = tmp_path / "masks"
        target = tmp_path / "masks" / "s2.npy"
    write_csv(tmp_path / "labels.csv", labels)
    write_csv(tmp_path / "split.csv", split)
    return (folder, tmp_path / "labels.csv", tmp_path / "split.csv"), kw, target


BAD_INPUTS = [
    ("missing", r"no feature file for 1 of 4 slides in .*feat: 's1' has neither s1.h5 nor s1.pt"),
    ("empty", r"s1.h5: features are empty \(shape \(0, 8\)\): no patches"),
    ("1d", r"s1.h5: features have shape \(8,\), expected \[N, D\]"),
    ("3d", r"s1.h5: features have shape \(1, 30, 8\), expected \[N, D\]"),
    ("int", r"s1.h5: features are int64, expected a floating-point type"),
    ("other_d", r"feature size differs between slides: .*s0.h5 has D = 8 but .*s1.h5 has D = 9"),
    ("no_features", r"s1.h5: no 'features' dataset \(it holds feats\)"),
    ("not_h5", r"s1.h5: cannot be read as HDF5"),
    ("coords", r"s1.h5: coords have shape \(29, 2\), expected \[30, 2\]"),
    ("coords_dir", r"coords/s1.h5: no 'coords' dataset \(it holds features\)"),
    ("pt_dict", r"s1.pt: holds a dict, expected a \[N, D\] tensor"),
    ("pt_garbage", r"s1.pt: cannot be read by torch.load\(weights_only=True\)"),
    ("pt_empty", r"s1.pt: features are empty"),
    ("label", r"labels.csv: slide 's1' has label 'c', not one of --classes a b"),
    ("one_class", r"labels.csv: needs at least 2 classes, found a"),
    ("labels_columns", r"labels.csv: needs columns slide_id and label .* found slide,class"),
    ("labels_twice", r"labels.csv: slide 's1' is listed twice \(lines 3 and 6\)"),
    ("labels_blank", r"labels.csv line 4: empty label"),
    ("split_name", r"split.csv line 3: split 'training' for slide 's1', expected one of train"),
    ("split_stray", r"split.csv: slide 's9' is not in the labels file"),
    ("split_no_val", r"split.csv puts no slide in val"),
    ("split_both", r"split.csv line 6: slide 's0' is in both train and val"),
]


@pytest.mark.parametrize("damage, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_errors_name_the_file_and_the_problem(tmp_path, damage, message):
    args, kw, _ = make_bad_cohort(tmp_path, damage)
    with pytest.raises(common.DataError, match=message):
        wsi.load_cohort(*args, **kw)


def test_h5_features_without_coords_load(tmp_path):
    args, _, _ = make_bad_cohort(tmp_path, None)
    with h5py.File(args[0] / "s0.h5", "a") as f:
        del f["coords"]
    c = wsi.load_cohort(*args)
    assert [s.coords_path is None for s in c.slides["train"]] == [True, False]
    assert c.notes == ["1 slides have no coords (.pt without --coords, or .h5 without a coords "
                       "dataset): no heatmap, and no x, y in their attention files"]


def test_bad_input_through_the_command_line_has_no_traceback(tmp_path, capsys):
    (features, labels, split), _, _ = make_bad_cohort(tmp_path, "missing")
    argv = ["--features", str(features), "--labels", str(labels), "--split", str(split),
            "--out-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1"]
    with pytest.raises(SystemExit) as info:
        wsi.main(argv)
    assert str(info.value).startswith("wsi_abmil.py: error: no feature file for 1 of 4 slides")
    # a mask of the wrong length and non-finite features surface while running, as clearly
    (features, labels, split), kw, _ = make_bad_cohort(tmp_path / "m", "mask")
    argv[1:6:2] = [str(features), str(labels), str(split)]
    with pytest.raises(SystemExit, match=r"s2.npy: mask has shape \(29,\), expected \[30\]"):
        wsi.main([*argv, "--masks", str(kw["masks"]), "--epochs", "1", "--batch-slides", "2"])
    with h5py.File(features / "s0.h5", "a") as f:
        f["features"][3, 2] = np.nan
    with pytest.raises(SystemExit, match=r"s0.h5: features hold NaN or infinite values"):
        wsi.main([*argv, "--epochs", "1", "--batch-slides", "2"])
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# model, metrics, localisation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("branches", [False, True])
def test_abmil_on_packed_slides(branches):
    torch.manual_seed(0)
    model = wsi.ABMIL(16, 3, hidden=12, attn_dim=6, dropout=0.25, branches=branches).eval()
    assert isinstance(model.pool, fastmil.AttentionPool) and model.pool.gated
    assert [type(m) for m in model.fc] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout]
    x, offsets = fastmil.pack([torch.randn(n, 16) for n in (5, 1, 9)])
    logits, a = model(x, offsets)
    assert logits.shape == (3, 3) and a.shape == ((15, 3) if branches else (15,))
    sums = torch.stack([a[offsets[b]:offsets[b + 1]].sum(0) for b in range(3)])
    torch.testing.assert_close(sums, torch.ones_like(sums))
    # the same slides one at a time give the same logits (packing changes nothing)
    for b in range(3):
        xb = x[offsets[b]:offsets[b + 1]]
        one, _ = model(xb, torch.tensor([0, len(xb)]))
        torch.testing.assert_close(one[0], logits[b])
    # by hand: z = sum_k a_k h_k; with branches class c reads only branch c
    h = model.fc(x)
    w = a if branches else a[:, None].expand(-1, 3)
    for b in range(3):
        sl = slice(int(offsets[b]), int(offsets[b + 1]))
        z = w[sl].T @ h[sl]  # [3, 12]: the pooled vector of each class's branch
        expected = ((z * model.classifier.weight).sum(-1) + model.classifier.bias if branches
                    else model.classifier(z[0]))
        torch.testing.assert_close(logits[b], expected)


def test_default_sizes_follow_clam():
    assert wsi.default_sizes(1024, None, None) == (512, 256)  # CLAM's "small"
    assert wsi.default_sizes(1536, None, None) == (512, 256)
    assert wsi.default_sizes(128, None, None) == (64, 32)
    assert wsi.default_sizes(128, 100, None) == (100, 50)
    assert wsi.default_sizes(128, None, 7) == (64, 7)


def test_slide_metrics_binary_and_multiclass():
    from sklearn.metrics import roc_auc_score

    p1 = np.array([0.9, 0.2, 0.6, 0.4])
    m = wsi.slide_metrics(np.stack([1 - p1, p1], 1), [1, 0, 0, 1], 2)
    assert m["auc"] == 0.75 and m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.4])))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 30)
    labels = np.arange(30) % 3
    m = wsi.slide_metrics(probs, labels, 3)
    assert m["auc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert np.isnan(wsi.slide_metrics(probs[:4], [0, 1, 0, 1], 3)["auc"])  # class 2 missing


def test_localisation_scores_attention_against_the_mask(tmp_path):
    mask = np.zeros(10, dtype=bool)
    mask[2:4] = True
    np.save(tmp_path / "t.npy", mask)
    np.save(tmp_path / "n.npy", np.zeros(10, dtype=bool))
    slides = [wsi.Slide("t", 1, tmp_path / "t.h5", 10, None, tmp_path / "t.npy"),
              wsi.Slide("n", 0, tmp_path / "n.h5", 10, None, tmp_path / "n.npy"),
              wsi.Slide("x", 1, tmp_path / "x.h5", 10, None, None)]
    good = np.where(mask, 0.3, 0.05)
    mean, per = wsi.localisation(slides, [good, np.full(10, 0.1), np.full(10, 0.1)])
    assert (mean, per) == (1.0, [1.0])  # only the slide with tumour and normal patches counts
    assert wsi.localisation(slides[:1], [0.4 - good])[0] == 0.0
    both = np.stack([0.4 - good, good], 1)  # with branches: the true class's branch (1)
    assert wsi.localisation(slides[:1], [both])[0] == 1.0


# ------------------------------------------------------------------------------------------------
# training, resume, outputs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(h5_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = wsi.main(cohort_args(h5_cohort, out, "--epochs", "8", "--batch-slides", "2",
                                  "--lr", "1e-2", "--hidden", "16", "--heatmaps", "3"))
    return out, result


def test_training_lowers_the_loss_and_writes_metrics(trained):
    out, result = trained
    history = result["history"]
    assert len(history) == 8
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.7 * history[0]["val_loss"]
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("val_auc", "val_balanced_accuracy", "val_loss", "localisation_auc",
                "slides_per_s"):
        assert saved[key] == pytest.approx(result[key], nan_ok=True), key
    assert saved["val_auc"] == 1.0 and saved["localisation_auc"] > 0.95  # an easy cohort
    assert saved["localisation_slides"] == 2 and saved["slides_per_s"] > 0
    assert saved["train_slides"] == 8 and saved["val_slides"] == 4 and saved["batch_slides"] == 2
    # the best epoch's weights are in model.pt, and they are what the metrics were taken on
    ckpt = torch.load(out / "model.pt", weights_only=True)  # tensors and plain values only
    assert ckpt["epoch"] == result["best_epoch"] and ckpt["classes"] == ["normal", "tumor"]
    best = min(history, key=lambda r: r["val_loss"])
    assert ckpt["epoch"] == best["epoch"]
    assert result["val_loss"] == pytest.approx(best["val_loss"], rel=1e-6)
    model = wsi.ABMIL(**ckpt["config"])
    model.load_state_dict(ckpt["model"])


def test_attention_export_sums_to_one_and_follows_the_coords(trained, h5_cohort):
    out, _ = trained
    cohort = load(h5_cohort)
    for s in cohort.slides["val"]:
        with open(out / "attention" / f"{s.slide_id}.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["patch", "x", "y", "attention"]
        table = np.array(rows[1:], dtype=np.float64)
        assert table.shape == (s.n, 4)
        np.testing.assert_array_equal(table[:, 0], np.arange(s.n))
        np.testing.assert_array_equal(table[:, 1:3], wsi.read_coords(s.coords_path, s.n))
        assert table[:, 3].sum() == pytest.approx(1.0, abs=1e-4) and (table[:, 3] > 0).all()
    # the exported values are the model's attention for those patches, computed as the run
    # computed them: on its device (CUDA where there is one: bf16 features under bf16 autocast)
    # and in its batch (the first two val slides, packed: --batch-slides 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ckpt = torch.load(out / "model.pt", weights_only=True)
    model = wsi.ABMIL(**ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    first, second = cohort.slides["val"][:2]
    x = torch.cat([wsi.read_features(s.path) for s in (first, second)]).to(device, dtype)
    with torch.no_grad(), wsi.autocast(device):
        _, a = model(x, torch.tensor([0, first.n, first.n + second.n], device=device))
    table = np.loadtxt(out / "attention" / f"{first.slide_id}.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(table[:, 3], a[:first.n].float().cpu().numpy(), rtol=1e-5,
                               atol=1e-9)


def test_heatmap_files_and_pixels(trained, h5_cohort):
    out, _ = trained
    pngs = sorted((out / "heatmaps").glob("*.png"))
    assert len(pngs) == 3 and (out / "heatmaps.png").is_file()
    for png in [*pngs, out / "heatmaps.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # tumour slides first: two of the three drawn slides are the two val tumour slides
    cohort = load(h5_cohort)
    tumour = {s.slide_id for s in cohort.slides["val"] if s.label == 1}
    assert len(tumour & {p.stem for p in pngs}) == 2
    # each patch's cell holds N·a (attention x patches: 1 = uniform); cells without a patch are
    # empty; the colour scale is the log scale 1/8 .. 8 it was given
    from matplotlib.figure import Figure

    coords = np.array([[512, 256], [768, 256], [512, 512], [1280, 512]])
    attention = np.array([0.1, 0.4, 0.2, 0.3])
    ax = Figure().subplots()
    im = wsi.draw_heatmap(ax, coords, attention, 8.0, mask=np.array([0, 1, 0, 0], bool))
    img = np.ma.filled(im.get_array(), np.nan)
    assert img.shape == (2, 4)
    expected = np.full((2, 4), np.nan)
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 3] = 0.4, 1.6, 0.8, 1.2
    np.testing.assert_allclose(img, expected)
    assert (im.norm.vmin, im.norm.vmax) == (1 / 8, 8.0) and im.norm(1.0) == pytest.approx(0.5)
    assert im.get_cmap().name == "coolwarm"  # N·a = 1 (uniform) is its grey middle
    # beyond the scale the end colours: a weight that underflowed to 0 is no empty cell
    im = wsi.draw_heatmap(ax, coords, np.array([0.0, 0.5, 0.25, 0.25]), 2.0)
    assert np.ma.filled(im.get_array(), np.nan)[0, :2].tolist() == [0.5, 2.0]


def test_heatmap_scale_is_shared_and_flat_attention_looks_flat(tmp_path, monkeypatch):
    # the scale: the power of 2 at or above the largest slide's 99.5th percentile of N·a
    flat = np.full(400, 1 / 400)
    peaked = np.ones(1000)
    peaked[:10] = 50.0  # 10 patches at N·a = 500 * 1000 / 1490 = 33.6, the rest at 0.67
    peaked /= peaked.sum()
    assert wsi.heatmap_scale([flat]) == 2.0  # all flat: 1/2 .. 2
    assert wsi.heatmap_scale([peaked]) == 64.0
    assert wsi.heatmap_scale([flat, peaked]) == wsi.heatmap_scale([peaked, flat]) == 64.0
    # save_heatmaps draws every slide on that one scale: the flat slide is N·a = 1 everywhere,
    # the grey middle of the scale, the peaked one red on its 10 patches (above 8x uniform)
    side = {400: 20, 1000: 40}
    slides, attention = [], []
    for sid, label, a in (("flat", 0, flat), ("peaked", 1, peaked)):
        n = len(a)
        g = np.arange(n)
        with h5py.File(tmp_path / f"{sid}.h5", "w") as f:
            f["coords"] = np.stack([g % side[n], g // side[n]], 1).astype(np.int32) * 256
        slides.append(wsi.Slide(sid, label, tmp_path / f"{sid}.h5", n, tmp_path / f"{sid}.h5"))
        attention.append(a)
    drawn = []
    draw = wsi.draw_heatmap

    def spy(ax, coords, a, scale, mask=None, title=""):
        im = draw(ax, coords, a, scale, mask, title)
        drawn.append((len(a), scale, im.norm(np.ma.filled(im.get_array(), np.nan)), title))
        return im

    monkeypatch.setattr(wsi, "draw_heatmap", spy)
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    files = wsi.save_heatmaps(tmp_path / "out", slides, attention, probs, ["normal", "tumor"], 2)
    assert [f.name for f in files] == ["peaked.png", "flat.png", "heatmaps.png"]
    assert len(drawn) == 4 and {scale for _, scale, _, _ in drawn} == {64.0}
    for n, _, colour, _ in drawn:
        colour = colour[np.isfinite(colour)]
        if n == 400:
            np.testing.assert_allclose(colour, 0.5)  # grey: flat attention looks flat
        else:
            assert int((colour > 0.9).sum()) == 10 and float(colour.max()) < 1  # 33.6 < 64
            assert bool((np.abs(colour - 0.5) < 0.1).sum() == 990)  # the rest near uniform
    titles = {n: title for n, _, _, title in drawn}
    assert titles[400] == ("flat: true normal, pred normal (p=0.90)\n"
                           "400 patches; the top 1% hold 1% of the attention")
    assert titles[1000] == ("peaked: true tumor, pred tumor (p=0.80)\n"
                            "1000 patches; the top 1% hold 34% of the attention")


def test_early_stopping_waits_for_min_epochs():
    model = torch.nn.Linear(2, 1)
    loader = common.make_loader([(torch.ones(3, 2), torch.tensor(0.0))] * 4, 2, shuffle=True)

    def train_loss(net, batch):
        x, _, y = batch
        return net(x).mean(), len(y)

    for min_epochs, expected in ((0, 2), (5, 5)):
        val_losses = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])  # never better than epoch 1
        _, info = common.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                             train_loss, lambda m, it=val_losses: {"loss": next(it)}, epochs=7,
                             patience=1, ctx=common.Dist(), min_epochs=min_epochs,
                             progress=False)
        assert info["epochs_run"] == expected and info["best_epoch"] == 1


def test_resume_goes_on_exactly_as_an_uninterrupted_run(h5_cohort, tmp_path):
    flags = ("--batch-slides", "4", "--lr", "5e-3", "--heatmaps", "0", "--patience", "9")
    straight = wsi.main(cohort_args(h5_cohort, tmp_path / "a", "--epochs", "4", *flags))
    wsi.main(cohort_args(h5_cohort, tmp_path / "b", "--epochs", "2", *flags))
    resumed = wsi.main(cohort_args(h5_cohort, tmp_path / "b", "--epochs", "4", "--resume",
                                   *flags))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss"):
        assert [r[key] for r in resumed["history"]] == [r[key] for r in straight["history"]]
    # the training states hold only tensors and plain values: they load with weights_only=True
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and set(common.RESUME_KEYS) <= set(b)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert straight["val_auc"] == resumed["val_auc"]
    assert straight["localisation_auc"] == resumed["localisation_auc"]
    with pytest.raises(SystemExit, match="--resume: no .*last.pt to go on from"):
        wsi.main(cohort_args(h5_cohort, tmp_path / "c", "--resume", *flags))
    with pytest.raises(SystemExit, match="--resume: .*last.pt holds a model of"):
        wsi.main(cohort_args(h5_cohort, tmp_path / "b", "--resume", "--hidden", "5", *flags))


class _Payload:
    """Unpickled, it writes a file: what a hostile checkpoint could do with os.system."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


def test_resume_refuses_a_checkpoint_with_a_pickled_object(h5_cohort, tmp_path):
    flags = ("--batch-slides", "4", "--heatmaps", "0", "--epochs", "2")  # epoch 2 to go
    wsi.main(cohort_args(h5_cohort, tmp_path / "run", "--batch-slides", "4", "--heatmaps", "0",
                         "--epochs", "1"))
    state = tmp_path / "run" / "last.pt"
    saved = torch.load(state, weights_only=True)
    marker = tmp_path / "marker"
    torch.save({**saved, "note": _Payload(marker)}, state)
    torch.load(state, weights_only=False)  # the payload is live: an unsafe load runs it ...
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(SystemExit, match=r"wsi_abmil.py: error: .*last.pt: refused: it holds a "
                                         r"pickled object \(getattr\), not only tensors"):
        wsi.main(cohort_args(h5_cohort, tmp_path / "run", "--resume", *flags))
    assert not marker.exists()  # ... the example's load does not
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"last.pt: cannot be read by torch.load\(weights_only"):
        wsi.main(cohort_args(h5_cohort, tmp_path / "run", "--resume", *flags))
    torch.save({"config": saved["config"], "classes": saved["classes"]}, state)
    with pytest.raises(SystemExit, match=r"last.pt: not a training state to resume from \(no "
                                         r"model, optimizer, epoch, best, history"):
        wsi.main(cohort_args(h5_cohort, tmp_path / "run", "--resume", *flags))


def test_random_states_round_trip_through_a_safe_checkpoint(tmp_path):
    import random

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # numpy's cached second gaussian is part of its state
    random.gauss(0, 1)  # python's too
    state = common._rng_state()
    expected = (torch.rand(3), np.random.normal(size=3), [random.gauss(0, 1) for _ in range(3)])
    torch.save({"rng": state}, tmp_path / "rng.pt")
    loaded = common.load_checkpoint(tmp_path / "rng.pt")["rng"]
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    common._set_rng_state(loaded)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.normal(size=3), expected[1])
    assert [random.gauss(0, 1) for _ in range(3)] == expected[2]


def test_multiclass_branches_from_pt_files(tmp_path):
    root = syn.make_cohort(tmp_path / "c3", syn.CohortConfig(**{**TINY, "slides": 15},
                                                             classes=3, fmt="pt"),
                           progress=False)
    out = tmp_path / "out"
    result = wsi.main(["--features", str(root / "pt_files"), "--coords", str(root / "h5_files"),
                       "--labels", str(root / "labels.csv"), "--split", str(root / "splits.csv"),
                       "--masks", str(root / "tumor_masks"), "--branches", "--epochs", "8",
                       "--lr", "1e-2", "--hidden", "16", "--batch-slides", "4", "--out-dir",
                       str(out), "--no-progress", "--threads", "1", "--heatmaps", "2"])
    assert result["classes"] == ["normal", "tumor_a", "tumor_b"] and result["model"]["branches"]
    # 9 normal, 3 + 3 tumour slides; 30% of each class held out: 3 + 1 + 1 val slides
    assert (result["train_slides"], result["val_slides"], result["epochs_run"]) == (10, 5, 8)
    # on this seed 8 epochs separate the three classes (macro AUC 1.0 here) and the true class's
    # branch finds the tumour patches (0.96 here)
    assert result["val_auc"] >= 0.9 and result["localisation_auc"] > 0.9
    assert result["localisation_slides"] == 2
    assert len(list((out / "attention").glob("*.csv"))) == 5
    s = next(iter(sorted((out / "attention").glob("*.csv"))))
    table = np.loadtxt(s, delimiter=",", skiprows=1)
    with open(s) as f:
        assert f.readline().strip() == ("patch,x,y,attention_normal,attention_tumor_a,"
                                        "attention_tumor_b")
    np.testing.assert_allclose(table[:, 3:].sum(0), [1, 1, 1], atol=1e-4)
    assert (out / "heatmaps.png").is_file() and len(list((out / "heatmaps").glob("*.png"))) == 2


# ------------------------------------------------------------------------------------------------
# the default run, the command line, threads
# ------------------------------------------------------------------------------------------------

def test_default_run_makes_the_synthetic_cohort_once(tmp_path, capsys):
    small = ["--synthetic-dir", str(tmp_path / "cohort"), "--synthetic-slides", "10",
             "--synthetic-dim", "8", "--epochs", "1", "--batch-slides", "2", "--heatmaps", "1",
             "--out-dir", str(tmp_path / "out"), "--no-progress", "--threads", "1"]
    wsi.main(small)
    out = capsys.readouterr().out
    assert "synthetic cohort: wrote 10 slides (D=8, h5)" in out
    assert "throughput:" in out and "slides/s of training (2 slides per step" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # 10 slides: 4 tumour, 6 normal; 30% of each class held out (1 + 2)
    assert (metrics["train_slides"], metrics["val_slides"], metrics["epochs_run"]) == (7, 3, 1)
    assert metrics["dim"] == 8 and metrics["classes"] == ["normal", "tumor"]
    assert metrics["localisation_slides"] == 1 and metrics["slides_per_s"] > 0
    with open(tmp_path / "cohort" / "labels.csv") as f:  # the one slide drawn: the val tumour
        tumour = {r["slide_id"] for r in csv.DictReader(f) if r["label"] == "tumor"}
    with open(tmp_path / "cohort" / "splits.csv") as f:
        (val_tumour,) = [r["slide_id"] for r in csv.DictReader(f)
                         if r["split"] == "val" and r["slide_id"] in tumour]
    assert [p.name for p in (tmp_path / "out" / "heatmaps").iterdir()] == [f"{val_tumour}.png"]
    wsi.main(small)
    assert "(made before; delete it to make it again)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds a synthetic cohort made with other settings"):
        wsi.main([*small, "--synthetic-dim", "9"])
    wsi.main(["--make-synthetic", str(tmp_path / "made"), "--synthetic-slides", "4",
              "--synthetic-dim", "4", "--no-progress", "--threads", "1"])
    out = capsys.readouterr().out
    assert f"--features {tmp_path / 'made' / 'h5_files'} --labels" in out
    assert syn.read_config(tmp_path / "made").slides == 4


def test_help_lists_the_real_data_flags(capsys):
    with pytest.raises(SystemExit) as info:
        wsi.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--features", "--labels", "--split", "--classes", "--coords", "--masks",
                 "--batch-slides", "--branches", "--resume", "--threads", "--make-synthetic"):
        assert flag in text, flag
    # the heatmaps' colour scale, said where --heatmaps is
    assert " ".join(wsi.HEATMAP_SCALE.split()) in " ".join(text.split())
    assert "N·a" in wsi.HEATMAP_SCALE and "one log scale shared by all" in wsi.HEATMAP_SCALE


@pytest.mark.parametrize("argv, message", [
    (["--batch-slides", "0"], "--batch-slides must be at least 1"),
    (["--hidden", "0"], "--hidden must be at least 1"),
    (["--threads", "-1"], "--threads must be at least 1"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--min-epochs", "-1"], "--min-epochs must be 0 or more"),
    (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["--features", "x"], "--features and --labels go together"),
    (["--classes", "a", "a"], "--classes lists a label twice"),
    (["--synthetic-classes", "1"], "--synthetic-classes must be at least 2"),
    (["--synthetic-format", "zarr"], "invalid choice: 'zarr'"),
])
def test_bad_flags_give_usage_errors(argv, message, capsys):
    assert_usage_error(wsi.main, argv, message, "wsi_abmil.py", capsys)


def test_batch_larger_than_the_training_set(h5_cohort, tmp_path):
    with pytest.raises(SystemExit, match="--batch-slides 9 is more than the 8 training slides"):
        wsi.main(cohort_args(h5_cohort, tmp_path, "--batch-slides", "9"))


def test_examples_take_fewer_threads_beside_a_busy_process(tmp_path, monkeypatch, capsys):
    """Both examples, run while another process keeps one CPU busy, take fewer threads than
    CPUs: the MNIST one one thread (small steps), the WSI one the idle CPUs. (With a thread per
    core, PyTorch's threads wait for the busy core on every small step: 254 s instead of 3 s for
    the MNIST example on a 2-core machine.)"""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    mb = importlib.import_module("mnist_bags")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        # on CPU (the default on a GPU machine is CUDA, which takes no threads)
        mb.main(["--dataset", "digits", "--train-bags", "16", "--val-bags", "8", "--epochs", "1",
                 "--plot-bags", "0", "--no-progress", "--device", "cpu",
                 "--out-dir", str(tmp_path / "mnist")])
        mnist = capsys.readouterr().out
        wsi.main(["--synthetic-dir", str(tmp_path / "cohort"), "--synthetic-slides", "8",
                  "--synthetic-dim", "8", "--epochs", "1", "--batch-slides", "2", "--heatmaps",
                  "0", "--no-progress", "--device", "cpu", "--out-dir", str(tmp_path / "wsi")])
        out = capsys.readouterr().out
    finally:
        busy.kill()
        busy.wait()
    assert "threads: 1 (small steps" in mnist
    cpus = common.usable_cpus()
    line = re.search(r"threads: (\d+) \(([\d.]+) of (\d+) CPUs idle", out)
    assert line, out
    assert 1 <= int(line.group(1)) <= max(1, cpus - 1) and float(line.group(2)) <= cpus - 0.5
