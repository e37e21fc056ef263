"""examples/mnist_bags.py under torchrun: 2 CPU processes (gloo, DistributedDataParallel,
DistributedSampler) reach the same weights as one process on the same global batches."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import child_env

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist_bags.py"


sys.path.insert(0, str(EXAMPLE.parent))  # the examples import their shared helpers, _common.py
mb = importlib.import_module("mnist_bags")


def test_ranks_together_cover_the_single_process_global_batch():
    ds = mb.BagDataset(mb.load_digits_data().train, 48, 1, rng=np.random.default_rng(0))
    single = mb.make_loader(ds, 8, shuffle=True, seed=3)
    ranks = [mb.make_loader(ds, 4, shuffle=True, seed=3, world=2, rank=r) for r in range(2)]
    for loader in (single, *ranks):
        loader.sampler.set_epoch(5)
    order = list(single.sampler)
    parts = [list(loader.sampler) for loader in ranks]
    assert sorted(order) == list(range(48))
    for k in range(6):  # step k: the 8 bags of one process = 4 bags of rank 0 + 4 of rank 1
        assert sorted(order[8 * k:8 * k + 8]) == sorted(parts[0][4 * k:4 * k + 4]
                                                         + parts[1][4 * k:4 * k + 4])
    # and the loaders batch exactly those bags, packed
    x, offsets, labels = next(iter(ranks[1]))
    assert torch.equal(labels, ds.labels[parts[1][:4]])
    assert torch.equal(x, torch.cat([ds[i][0] for i in parts[1][:4]]))


def _run(cmd, tmp_path):
    proc = subprocess.run(cmd, cwd=tmp_path, env=child_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_ddp_two_processes_match_one_process(tmp_path):
    common = ["--dataset", "digits", "--device", "cpu", "--train-bags", "48", "--val-bags", "16",
              "--batch-size", "8", "--epochs", "2", "--patience", "5", "--attn-dim", "32",
              "--plot-bags", "1", "--no-progress", "--seed", "3"]
    one = _run([sys.executable, str(EXAMPLE), *common, "--out-dir", "one"], tmp_path)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", str(EXAMPLE), *common, "--out-dir", "two"], tmp_path)
    assert "distributed" not in one
    assert "distributed: 2 processes (gloo), 4 bags each per step" in two
    assert two.count("validation (model)") == 1  # only rank 0 reports

    a = torch.load(tmp_path / "one" / "model_0.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "model_0.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] >= 1
    torch.manual_seed(3)
    init = mb.MILClassifier((8, 8), attn_dim=32).state_dict()
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    moved = [k for k, v in a["model"].items() if not torch.equal(v, init[k])]
    assert "encoder.net.0.weight" in moved and "pool.attn.weight" in moved and "head.weight" in moved
