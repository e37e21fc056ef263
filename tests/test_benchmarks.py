"""The tools of benchmarks/ on a CPU: the eager baseline against the reference (a benchmark against a
wrong baseline means nothing), the report's targets from known numbers, the committed GPU run's
report, the tile sweep's plumbing, and the kernels per call (counted through Triton's launch path
on a stand-in driver). Nothing here asserts a timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, call, child_env, make_layout, make_weights

import fastmil
from benchmarks import report
from benchmarks.eager import eager_attention_pool
from benchmarks.harness import SUITES
from fastmil.reference import attention_pool_reference


def _row(case, provider, workload, wall, **extra):
    return dict(case=case, provider=provider, workload=workload, wall_ms=wall, describe=case,
                host_ms=0.1, error=0.0, **extra)


def test_targets_from_known_numbers():
    rows = [_row("slide", "fastmil", "frozen", 0.5, launches=5, kernels_ms=0.4,
                 top={"_fwd_kernel": [1, 0.1], "_bwd_kernel": [1, 0.2]}),
            _row("slide", "eager", "frozen", 1.2), _row("slide", "compile", "frozen", 0.7),
            _row("mnist", "fastmil", "train", 0.7, launches=7),
            _row("mnist", "eager", "train", 1.3),
            _row("inference", "fastmil", "infer", 0.3, of_floor=0.65),
            _row("inference", "eager", "infer", 0.6), _row("inference", "compile", "infer", 0.5)]
    run = dict(env=dict(peaks=dict(copy_gbs=3000.0)), rows=rows)
    host = dict(device="cpu", rows=[
        dict(shape="slide", provider="fastmil", launch="direct", workload="train", host_us=50),
        dict(shape="slide", provider="eager", launch=None, workload="train", host_us=100),
        dict(shape="mnist", provider="fastmil", launch="direct", workload="train", host_us=90),
        dict(shape="mnist", provider="eager", launch=None, workload="train", host_us=100)])
    got = {(t[0], t[1]): (t[3], t[4]) for t in report.targets(run, host)}
    assert got[("frozen features, fwd+bwd", "slide")] == ("0.5 ms: 2.40× eager, 1.40× compile",
                                                          "not met")  # 1.4 < 1.5
    assert got[("end to end, fwd+bwd", "mnist")] == ("0.7 ms: 1.86× eager", "not met")
    assert got[("inference (+ attention)", "inference")][1] == "**met**"  # 2×, 1.67×
    assert got[("inference, roofline", "inference")] == ("65%", "**met**")
    assert got[("host time per training call", "slide (cpu)")][1] == "**met**"  # 0.5 ≤ 0.6
    assert got[("host time per training call", "mnist (cpu)")][1] == "not met"  # 0.9 > 0.8
    assert got[("kernels per training call", "every workload")] == (
        "slide frozen: 5, mnist train: 7", "not met")
    # 100k rows × (1024 + 512) × 2 bytes + the scores, in 0.1 ms, of 3 TB/s
    assert got[("forward kernel, HBM", "slide, bf16")] == ("103%", "**met**")
    assert got[("CLAM's step, x trainable", "clam-step-fp32")][1] == "not measured"


def test_committed_run_renders(tmp_path):
    """The committed GPU run (one compact file) makes the report and its plot."""
    runs = sorted((Path(ROOT) / "benchmarks" / "gpu_runs").glob("*.json"))
    assert runs, "no GPU run in benchmarks/gpu_runs"
    out, plot = tmp_path / "RESULTS.md", tmp_path / "results.png"
    report.main([str(runs[-1]), "--out", str(out), "--plot", str(plot)])
    text = out.read_text()
    assert "## Targets" in text and "| eager |" in text and plot.stat().st_size > 10_000
    run = json.loads(runs[-1].read_text())
    assert run["env"]["device"] in text
    assert os.path.getsize(runs[-1]) < 100_000  # compact: no raw logs


def _fresh_process(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(compiled=True), timeout=timeout, cwd=ROOT)


def test_kernels_per_call():
    """Kernels per call of fastmil's AttentionPool, counted through Triton's launch path (a
    stand-in sm_90 driver) plus the aten ops that launch a kernel, the chunk map's copy to the GPU
    (once per batch) apart. Small bags (one program each): 5 with x frozen (p, q GEMM, forward,
    backward, dW GEMM, partial sums), 6 with x trainable (+ dx GEMM), 3 in inference (+ the
    attention); a bag split over programs adds the merge of its chunks."""
    pytest.importorskip("triton")
    out = _fresh_process(
        "import json\nfrom benchmarks import profile\nimport torch\n"
        "with profile.standin_kernels():\n"
        "    res = profile.count_launches(torch.device('cpu'))\n"
        "print(json.dumps(res))\n")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])["rows"]
    mine = {(r["case"], r["workload"]): r["launches"] for r in rows if r["provider"] == "fastmil"}
    eager = {(r["case"], r["workload"]): r["launches"] for r in rows if r["provider"] == "eager"}
    merge = {"mnist": 0, "slide": 1}
    assert mine == {(c, w): {"frozen": 5, "train": 6, "infer": 3}[w] + merge[c]
                    for c, w in mine}, mine
    assert all(eager[k] > mine[k] for k in mine), (mine, eager)


def test_tile_sweep_dry_run(tmp_path, monkeypatch):
    """Every candidate tile runs (in the interpreter) and gives the default tile's numbers."""
    pytest.importorskip("triton")
    from benchmarks import tile_sweep

    results = tile_sweep.sweep_class(SUITES["smoke"][0], torch.device("cpu"))
    for kind, res in results.items():
        assert len(res["rows"]) == len(fastmil.kernels.config.TILE_CANDIDATES[kind])
        assert all(r["ok"] and r["error"] < 1e-5 for r in res["rows"]), res["rows"]
    assert "MEASURED_TILES entries" in tile_sweep.markdown({"smoke-slide": results})


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_eager_matches_reference(masked, gated, K):
    D, L = 16, 8
    layout, lengths = ("padded_mask", [3, 1, 7, 50]) if masked else ("padded", [9, 9, 9])
    x, kw = make_layout(layout, lengths, D)
    weights = make_weights(D, L, K, gated)
    z, a = call(eager_attention_pool, x, weights, return_attention=True, **kw)
    z_ref, a_ref = call(attention_pool_reference, x, weights, return_attention=True, **kw)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
