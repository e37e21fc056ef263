"""examples/wsi_abmil.py under torchrun: 2 CPU processes (gloo, DistributedDataParallel, a
DistributedSampler, validation sharded over the ranks) reach the same weights, metrics and
attention files as one process on the same global batches."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import child_env

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "wsi_abmil.py"
sys.path.insert(0, str(EXAMPLE.parent))  # the examples import their shared helpers, _common.py
wsi = importlib.import_module("wsi_abmil")
syn = importlib.import_module("synthetic_wsi")


def test_ddp_two_processes_match_one_process(tmp_path):
    root = syn.make_cohort(tmp_path / "cohort", syn.CohortConfig(slides=12, dim=16,
                                                                 median_patches=1100),
                           progress=False)
    # 8 training slides, 4 per step: 2 per rank, no slide repeated to even out the ranks;
    # no dropout, so that both runs draw no random numbers while training
    common = ["--features", str(root / "h5_files"), "--labels", str(root / "labels.csv"),
              "--split", str(root / "splits.csv"), "--masks", str(root / "tumor_masks"),
              "--batch-slides", "4", "--epochs", "3", "--dropout", "0", "--lr", "1e-2",
              "--heatmaps", "1", "--no-progress", "--threads", "1", "--seed", "5"]
    threads = torch.get_num_threads()
    one = wsi.main([*common, "--out-dir", str(tmp_path / "one")])
    assert torch.get_num_threads() == threads
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(EXAMPLE), *common, "--out-dir",
                           str(tmp_path / "two")], cwd=tmp_path, env=child_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    assert "distributed: 2 processes (gloo), 2 slides each per step" in proc.stdout
    assert proc.stdout.count("val: AUC") == 1  # only rank 0 reports

    a = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] >= 1
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(5)
    init = wsi.ABMIL(**a["config"]).state_dict()
    moved = [k for k, v in a["model"].items() if not torch.equal(v, init[k])]
    assert {"fc.0.weight", "pool.attn.weight", "classifier.weight"} <= set(moved)

    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world"] == 2 and two["train_slides"] == 8
    for key in ("val_loss", "val_auc", "localisation_auc"):
        assert two[key] == np.float64(one[key]) or abs(two[key] - one[key]) < 1e-5, key
    for r1, r2 in zip(one["history"], two["history"], strict=True):
        assert abs(r1["train_loss"] - r2["train_loss"]) < 1e-5
    # every validation slide's attention, predicted by one rank or the other, is written
    for csv_one in sorted((tmp_path / "one" / "attention").glob("*.csv")):
        t1 = np.loadtxt(csv_one, delimiter=",", skiprows=1)
        t2 = np.loadtxt(tmp_path / "two" / "attention" / csv_one.name, delimiter=",", skiprows=1)
        np.testing.assert_allclose(t2, t1, rtol=1e-4, atol=1e-8)
    assert len(list((tmp_path / "two" / "attention").glob("*.csv"))) == 4
