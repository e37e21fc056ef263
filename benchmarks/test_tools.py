"""The GPU check's tools on CPU, in seconds: the targets table from a GPU-like run, the launch
counter's CPU proxy, the tile sweep's plumbing, and the scripts' syntax. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import types
from pathlib import Path

import pytest
import torch

from . import launch_count, report, tile_sweep
from .cases import SUITES, get_case

HERE = Path(__file__).parent


def test_every_target_is_measured_by_the_gpu_check_and_its_dry_run():
    for name in ("gpu-check", "dry-run"):
        runs = {(c.role, m) for c, modes in SUITES[name] for m in modes}
        for t in report.TARGETS:
            assert (t["role"], t["mode"]) in runs, (name, t)


def _record(case, provider, mode, ms, **extra):
    return {"extra_info": {"case": case, "provider": provider, "mode": mode, "median_ms": ms,
                           **extra}}


def _gpu_like_run(tmp_path) -> str:
    """A bench.json as the GPU check writes it, with made-up numbers."""
    wsi, mnist, infer, batched = (c.name for c, _ in SUITES["gpu-check"])
    recs = [
        _record(wsi, "fastmil_triton", "frozen", 1.0, saved_bytes=1 << 20, kept_bytes=2 << 20),
        _record(wsi, "fastmil_triton_save", "frozen", 0.8, saved_bytes=100 << 20),
        _record(wsi, "eager", "frozen", 2.5, saved_bytes=150 << 20, kept_bytes=160 << 20),
        _record(wsi, "compile_default", "frozen", 1.2, saved_bytes=120 << 20),
        _record(mnist, "fastmil_triton", "fwd_bwd", 0.1),
        _record(mnist, "eager", "fwd_bwd", 0.4),
        _record(infer, "fastmil_triton", "infer", 0.5, floor_fraction=0.7),
        _record(infer, "eager", "infer", 1.1),
        _record(batched, "fastmil_triton", "frozen", 3.0),
        _record(wsi, "fastmil_triton", "fwd_bwd", 1.5),  # for the plot
    ]
    data = {"benchmarks": recs, "fastmil": {
        "env": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "suite": "gpu-check",
                "peak_bf16_tflops": 780.0, "peak_copy_gbps": 3000.0},
        "cases": {c.name: c.as_dict() for c, _ in SUITES["gpu-check"]},
        "skipped": [{"case": batched, "provider": "eager", "mode": "frozen", "status": "OOM",
                     "reason": "out of memory"},
                    {"case": mnist, "provider": "fastmil_triton_save", "mode": "fwd_bwd",
                     "status": "failed", "reason": "boom"}]}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_targets_table_from_a_gpu_like_run(tmp_path):
    res = report.Results([_gpu_like_run(tmp_path)])
    rows = {(r[0], r[3].strip("`")): r for r in report.target_rows(res)}
    wsi, mnist, infer, batched = (c.name for c, _ in SUITES["gpu-check"])
    frozen = rows[("frozen features, fwd+bwd", wsi)]
    # recompute: 2.5× eager but only 1.2× compile; save: 3.1× eager, 1.5× compile
    assert "2.50× eager" in frozen[4] and "1.20× compile" in frozen[4]
    assert frozen[-1] == "met by triton save"
    assert rows[("frozen features, fwd+bwd", batched)][-1] == "met by triton recompute"  # OOM
    assert rows[("end-to-end, fwd+bwd", mnist)][-1] == "**not met**"  # 4×
    assert "failed" in rows[("end-to-end, fwd+bwd", mnist)][5]
    assert "70% of the floor" in rows[("inference, fwd", infer)][4]
    assert rows[("inference, fwd", infer)][-1] == "met by triton recompute"
    memory = rows[("memory kept for backward", wsi)]
    assert "0.7% of eager's" in memory[4] and memory[-1] == "met by triton recompute"
    assert report.plot(res, str(tmp_path / "plot.png"))
    text = report.render(res, None, ["a note"], None)
    assert "## Targets (NVIDIA H100 80GB HBM3)" in text and "CPU smoke run" not in text
    assert "device: NVIDIA H100 80GB HBM3" in report.summary(res)


def test_launch_count_cpu_proxy(tmp_path):
    args = types.SimpleNamespace(device="cpu", dtype="fp32", bags=5, min_len=1, max_len=4, D=16,
                                 L=16, providers=["fastmil_triton", "eager"],
                                 workloads=list(launch_count.WORKLOADS))
    if not os.environ.get("TRITON_INTERPRET"):
        args.providers.remove("fastmil_triton")
    result = launch_count.measure(args)
    rows = {(r["provider"], r["workload"]): r for r in result["rows"]}
    for (provider, _), r in rows.items():
        assert "error" not in r, r
        assert r["proxy"] == r["aten_ops"] + r["triton_launches"] > 0
        assert (r["triton_launches"] > 0) == (provider == "fastmil_triton")
    # eager: the backward adds ops; inference has the fewest
    assert rows[("eager", "infer")]["proxy"] < rows[("eager", "frozen")]["proxy"]
    table = launch_count.markdown(result, result)
    assert "not CUDA launches" in table and "| eager | infer |" in table
    (tmp_path / "launches.json").write_text(json.dumps(result))
    assert "CPU proxy, not CUDA launches" in report.launches_section(
        [str(tmp_path / "launches.json")])


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"),
                    reason="fastmil triton runs on CPU in Triton's interpreter only")
def test_tile_sweep_plumbing(monkeypatch):
    from fastmil.kernels import attention_pool as kernels

    c = tile_sweep.TileClass("tiny", 24, 16, 1, "fp32", True, (7, 12), True)
    default = {k: tile_sweep.default_tile(kernels, c, k) for k in tile_sweep.KINDS}
    monkeypatch.setattr(kernels, "TILE_CANDIDATES", {k: [t] for k, t in default.items()})
    out = tile_sweep.sweep_class(c, kernels, torch.device("cpu"), 10.0, lambda msg: None)
    assert kernels.TILE_OVERRIDE == {}  # restored
    for kind in tile_sweep.KINDS:
        (row,) = out["kinds"][kind]["rows"]
        assert row["ok"], row
        assert out["kinds"][kind]["best"] == list(default[kind])
    text = tile_sweep.markdown({"env": {"device": "CPU", "fastmil_commit": "x", "torch": "t",
                                        "triton": "t", "date_utc": "now", "dry_run": True},
                                "classes": [out], "not_run": []})
    assert "MEASURED_TILES = {" in text
    assert f"{tuple(out['kinds']['bwd']['key'])!r}: {default['bwd']!r}" in text


@pytest.mark.parametrize("script", ["gpu_check.sh", "tile_sweep.sh", "run_gpu.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(HERE / script)], check=True)


def test_gpu_check_cases_exist():
    for c, _ in SUITES["gpu-check"]:
        assert get_case(c.name) is c
