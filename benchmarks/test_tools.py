"""The GPU check's tools on CPU, in seconds: the targets table and the time split from a GPU-like
run, the reduction of profiler events to per-kernel times, the launch counter's CPU proxy, the
tile sweep's plumbing, and the scripts' syntax. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import types
from pathlib import Path

import pytest
import torch

from . import host_time, launch_count, report, tile_sweep, timing
from .cases import SUITES, get_case

HERE = Path(__file__).parent
FUSED = "fastmil triton, fused projection"  # report.LABELS of the fused-projection columns


def test_every_target_is_measured_by_the_gpu_check_and_its_dry_run():
    for name in ("gpu-check", "dry-run"):
        runs = {(c.role, m) for c, modes in SUITES[name] for m in modes}
        for t in report.TARGETS:
            assert (t["role"], t["mode"]) in runs, (name, t)


def _record(case, provider, mode, ms, **extra):
    return {"extra_info": {"case": case, "provider": provider, "mode": mode, "median_ms": ms,
                           **extra}}


# made-up device kernels of one call, as the profiler names them
_TANH = ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::"
         "tanh_kernel_cuda(at::TensorIteratorBase&)::{lambda()#2}::operator()() const::"
         "{lambda()#1}::operator()() const::{lambda(float)#1}, at::detail::Array<char*, 2> >(int, "
         "at::native::(anonymous namespace)::tanh_kernel_cuda(at::TensorIteratorBase&)::"
         "{lambda()#2}::operator()() const::{lambda()#1}::operator()() const::{lambda(float)#1}, "
         "at::detail::Array<char*, 2>)")
_CUBLAS = ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_"
           "execute_segment_k_off_kernel__5x_cublas")
_REDUCE = ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::"
           "func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()"
           "(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4> >"
           "(at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::"
           "sum_functor<float, float, float>::operator()(at::TensorIterator&)::"
           "{lambda(float, float)#1}>, unsigned int, float, 4, 4>)")


def _profile(pairs) -> dict:
    return {**timing.kernel_breakdown(pairs), "kernels_attempts": 1,
            "launch_us_after_profile": 4.0 + 0.1 * len(pairs)}


def _gemm(proj: float, dw: float, dx: float, dtype: str) -> dict:
    return {"proj_ms": proj, "proj_tflops": 700.0, "dw_ms": dw, "dw_tflops": 900.0,
            "dx_ms": dx, "dx_tflops": 850.0, "dtype": dtype,
            "float32_matmul_precision": "highest"}


def _gpu_like_run(tmp_path, profiled: bool = False) -> str:
    """A bench.json as the GPU check writes it, with made-up numbers; ``profiled``: with
    per-kernel times and the cuBLAS GEMM reference, as on CUDA."""
    wsi, mnist, infer, batched = (c.name for c, _ in SUITES["gpu-check"])
    prof = {}
    if profiled:
        prof = {
            "recompute": _profile([("_fwd_kernel", 0.6), ("_bwd_kernel", 0.25),
                                   ("_merge_kernel", 0.05), ("Memset (Device)", 0.01)]),
            "save": {**_profile([("_fwd_kernel", 0.4), ("_bwd_kernel", 0.2)]),
                     "kernels_note": "the lead-in kernel is missing"},
            "eager": _profile([(_CUBLAS, 0.4), (_CUBLAS, 0.4), (_TANH, 0.3),
                               (_TANH.replace("float", "c10::BFloat16"), 0.2), (_REDUCE, 0.2)]),
            "compile": {"kernels_error": "RuntimeError: no CUPTI"},
            "mnist": _profile([("_fwd_kernel", 0.012), ("_bwd_kernel", 0.008)]
                              + [(f"aten_k{i}", 0.001) for i in range(8)]),
        }
    recs = [
        _record(wsi, "fastmil_triton", "frozen", 1.0, saved_bytes=1 << 20, kept_bytes=2 << 20,
                **prof.get("recompute", {})),
        _record(wsi, "fastmil_triton_save", "frozen", 0.8, saved_bytes=100 << 20,
                **prof.get("save", {})),
        _record(wsi, "eager", "frozen", 2.5, saved_bytes=150 << 20, kept_bytes=160 << 20,
                **prof.get("eager", {})),
        _record(wsi, "compile_default", "frozen", 1.2, saved_bytes=120 << 20,
                **prof.get("compile", {})),
        _record(mnist, "fastmil_triton", "fwd_bwd", 0.1, **prof.get("mnist", {})),
        _record(mnist, "eager", "fwd_bwd", 0.4),
        _record(infer, "fastmil_triton", "infer", 0.5, floor_fraction=0.7),
        _record(infer, "eager", "infer", 1.1),
        _record(batched, "fastmil_triton", "frozen", 3.0),
        _record(wsi, "fastmil_triton", "fwd_bwd", 1.5),  # for the plot
    ]
    data = {"benchmarks": recs, "fastmil": {
        "env": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "suite": "gpu-check",
                "peak_bf16_tflops": 780.0, "peak_copy_gbps": 3000.0,
                "tiles": {"source": "FASTMIL_TILES=/out/tile_sweep.json", "entries": [
                    [["fwd", "16-bit", True, 1024, 256, 1], [128, 32, 64, 8, 3]]]}},
        "cases": {c.name: c.as_dict() for c, _ in SUITES["gpu-check"]},
        "skipped": [{"case": batched, "provider": "eager", "mode": "frozen", "status": "OOM",
                     "reason": "out of memory"},
                    {"case": mnist, "provider": "fastmil_triton_save", "mode": "fwd_bwd",
                     "status": "failed", "reason": "boom"}]}}
    if profiled:
        data["fastmil"]["cases"][wsi]["gemm"] = _gemm(0.2, 0.15, 0.16, "bfloat16")
        data["fastmil"]["cases"][mnist]["gemm"] = _gemm(0.01, 0.008, 0.006, "float32")
        data["fastmil"]["env"]["launch_us"] = 4.31
    path = tmp_path / ("profiled.json" if profiled else "bench.json")
    path.write_text(json.dumps(data))
    return str(path)


def test_targets_table_from_a_gpu_like_run(tmp_path):
    res = report.Results([_gpu_like_run(tmp_path)])
    rows = {(r[0], r[3].strip("`")): r for r in report.target_rows(res)}
    wsi, mnist, infer, batched = (c.name for c, _ in SUITES["gpu-check"])
    col = {s: 4 + i for i, s in enumerate(report.TARGET_SUBJECTS)}  # the subjects' columns
    recompute, save = col["fastmil_triton"], col["fastmil_triton_save"]
    frozen = rows[("frozen features, fwd+bwd", wsi)]
    # recompute: 2.5× eager but only 1.2× compile; save: 3.1× eager, 1.5× compile
    assert "2.50× eager" in frozen[recompute] and "1.20× compile" in frozen[recompute]
    assert frozen[col["fastmil_triton_cublas"]] == "n/a"  # not in this run
    assert frozen[-1] == "met by triton fused save"
    assert rows[("frozen features, fwd+bwd", batched)][-1] == "met by triton fused recompute"
    assert rows[("end-to-end, fwd+bwd", mnist)][-1] == "**not met**"  # 4×
    assert "failed" in rows[("end-to-end, fwd+bwd", mnist)][save]
    assert "70% of the floor" in rows[("inference, fwd", infer)][recompute]
    assert rows[("inference, fwd", infer)][-1] == "met by triton fused recompute"
    memory = rows[("memory kept for backward", wsi)]
    assert "0.7% of eager's" in memory[recompute]
    assert memory[-1] == "met by triton fused recompute"
    assert report.plot(res, str(tmp_path / "plot.png"))
    text = report.render(res, None, ["a note"], None)
    assert "## Targets (NVIDIA H100 80GB HBM3)" in text and "CPU smoke run" not in text
    assert "## Where the time goes" not in text  # no profile in this run
    assert "device: NVIDIA H100 80GB HBM3" in report.summary(res)
    assert "time split" not in report.summary(res)


def test_kernel_breakdown_reduces_profiler_events():
    pairs = [("_fwd_kernel", 0.6), ("_bwd_kernel", 0.25), (_TANH, 0.05),
             (_TANH.replace("float", "c10::Half"), 0.05), ("_merge_kernel", 0.05),
             ("Memset (Device)", 0.01), ("Memcpy DtoD (Device -> Device)", 0.002),
             ("Memcpy DtoD (Device -> Device)", 0.003)]
    tanh = "vectorized_elementwise_kernel<4, tanh_kernel_cuda, at::deta…"
    assert timing.kernel_breakdown(pairs, top=3) == {
        "kernels": [{"name": "_fwd_kernel", "count": 1, "ms": 0.6},
                    {"name": "_bwd_kernel", "count": 1, "ms": 0.25},
                    {"name": tanh, "count": 2, "ms": 0.1},  # both dtypes: one name
                    {"name": "(other)", "count": 1, "ms": 0.05}],
        "kernels_total_ms": 1.0, "kernels_count": 5,
        "memcpy_count": 2, "memcpy_ms": 0.005, "memset_count": 1, "memset_ms": 0.01}
    many = timing.kernel_breakdown([(f"k{i:02d}", float(i + 1)) for i in range(12)])
    assert [k["name"] for k in many["kernels"]] == [f"k{i:02d}" for i in range(11, 3, -1)] + [
        "(other)"]
    assert many["kernels"][-1] == {"name": "(other)", "count": 4, "ms": 10.0}
    assert many["kernels_total_ms"] == 78.0 and many["kernels_count"] == 12
    assert timing.kernel_breakdown([])["kernels"] == []


def test_short_kernel_name():
    assert timing.short_kernel_name("_fwd_kernel") == "_fwd_kernel"
    assert timing.short_kernel_name(_CUBLAS) == _CUBLAS[:59] + "…"
    assert timing.short_kernel_name(_REDUCE).startswith("reduce_kernel<512, 1, ReduceOp<float,")
    cutlass = "cutlass::Kernel2<cutlass_80_wmma_tensorop_s161616gemm_f16_16x16_32x1_tn_align8>"
    assert timing.short_kernel_name(  # "void" and the parameter list dropped, then cut
        f"void {cutlass}(cutlass_80_wmma_tensorop_s161616gemm_f16_16x16_32x1_tn_align8::Params)"
    ) == cutlass[:59] + "…"
    assert timing.short_kernel_name(cutlass, width=100) == cutlass
    assert len(timing.short_kernel_name(_TANH)) == 60


def test_device_events_reads_both_profiler_layouts():
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval, Kernel

    def event(name, device, **kw):
        return types.SimpleNamespace(name=name, device_type=device, kernels=[], **kw)

    new = [event("aten::mm", DeviceType.CPU, time_range=Interval(0, 900)),
           event("_fwd_kernel", DeviceType.CUDA, time_range=Interval(100, 510)),
           event("Memset (Device)", DeviceType.CUDA, device_time_total=10.0)]
    assert timing.device_events(new) == [("_fwd_kernel", pytest.approx(0.41)),
                                         ("Memset (Device)", pytest.approx(0.01))]
    old = [event("aten::mm", DeviceType.CPU, time_range=Interval(0, 900))]
    old[0].kernels = [Kernel("gemm", 0, 250)]  # an older profiler: kernels on their CPU op
    assert timing.device_events(old) == [("gemm", pytest.approx(0.25))]
    with torch.profiler.profile() as prof:  # this torch's events: CPU ops, no device activity
        torch.ones(3).add_(1)
    assert timing.device_events(prof.events()) == []


def test_profile_kernels_reports_a_failure_instead_of_raising():
    before = os.environ.get("TEARDOWN_CUPTI")
    out = timing.profile_kernels(lambda: (), lambda: None)
    assert "kernels" not in out and out["kernels_error"]
    assert os.environ.get("TEARDOWN_CUPTI") == before


@pytest.mark.parametrize(("traces", "attempts", "sleep", "expected"), [
    # nothing recorded, then the call without the lead-in, then both: the third one is kept
    ([[], [("_fwd_kernel", 0.5)], [("spin_kernel", 0.5), ("_fwd_kernel", 0.4)]], 3, True,
     {"kernels_attempts": 3, "kernels_total_ms": 0.4}),
    # out of attempts without the lead-in: kept, with a note
    ([[], [("_fwd_kernel", 0.5)]], 2, True,
     {"kernels_attempts": 2, "kernels_total_ms": 0.5, "kernels_note": True}),
    ([[]], 1, True, {"kernels_attempts": 1, "kernels_error": True}),
    # no torch.cuda._sleep: one attempt, nothing to prove the capture started in time
    ([[("_fwd_kernel", 0.3)], []], 3, False,
     {"kernels_attempts": 1, "kernels_total_ms": 0.3, "kernels_note": True}),
])
def test_profile_call_retries_until_it_sees_the_lead_in(monkeypatch, traces, attempts, sleep,
                                                         expected):
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    if sleep:
        monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None, raising=False)
    else:
        monkeypatch.delattr(torch.cuda, "_sleep", raising=False)
    traces, calls = iter(traces), []

    class Session:
        def __enter__(self):
            self.trace = next(traces)
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [types.SimpleNamespace(name=n, device_type=DeviceType.CUDA, kernels=[],
                                          time_range=Interval(0, 1000 * ms))
                    for n, ms in self.trace]

    out = timing._profile_call(lambda: (len(calls),), calls.append, attempts, Session,
                               lambda: None)
    assert calls == list(range(expected["kernels_attempts"]))  # a fresh setup() per attempt
    assert out["kernels_attempts"] == expected["kernels_attempts"]
    assert ("kernels_note" in out) == bool(expected.get("kernels_note"))
    assert ("kernels_error" in out) == bool(expected.get("kernels_error"))
    if "kernels_total_ms" in expected:
        assert out["kernels_total_ms"] == pytest.approx(expected["kernels_total_ms"])
        assert [k["name"] for k in out["kernels"]] == ["_fwd_kernel"]  # the lead-in left out


@pytest.mark.parametrize("preset", [None, "0"])
def test_profile_kernels_detaches_cupti_after_its_sessions(monkeypatch, preset):
    """Kineto tears CUPTI down when a session stops with TEARDOWN_CUPTI=1: the measured sessions
    run with 0, one empty session with 1 closes them; a value set outside is left alone."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    if preset is None:
        monkeypatch.delenv("TEARDOWN_CUPTI", raising=False)
    else:
        monkeypatch.setenv("TEARDOWN_CUPTI", preset)
    seen = []  # TEARDOWN_CUPTI when each session stops

    class Session:
        def __init__(self, activities):
            self.activities = activities

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append(os.environ.get("TEARDOWN_CUPTI"))
            return False

        def events(self):
            return [types.SimpleNamespace(name=n, device_type=DeviceType.CUDA, kernels=[],
                                          time_range=Interval(0, 500)) for n in
                    ("at::cuda::(anonymous namespace)::spin_kernel(long)", "_fwd_kernel")]

    for name, value in (("synchronize", lambda: None), ("is_available", lambda: True),
                        ("_sleep", lambda cycles: None)):
        monkeypatch.setattr(torch.cuda, name, value, raising=False)
    monkeypatch.setattr(torch.profiler, "profile", Session)
    monkeypatch.setattr(timing, "_l2_flush", lambda: lambda: None)
    monkeypatch.setattr(timing, "launch_us", lambda: 4.5)
    out = timing.profile_kernels(lambda: (), lambda: None)
    assert out["kernels"] == [{"name": "_fwd_kernel", "count": 1, "ms": 0.5}]
    assert out["kernels_attempts"] == 1 and out["launch_us_after_profile"] == 4.5
    assert seen == (["0", "1"] if preset is None else [preset])
    assert os.environ.get("TEARDOWN_CUPTI") == preset


def test_gemm_reference_runs_each_gemm_on_the_case_shape(monkeypatch):
    """The GEMMs (shapes, out= buffers) on CPU, with cuda_bench stubbed: median and TFLOP/s."""
    shapes = []

    def bench(setup, step, rep_ms):
        step(*setup())
        shapes.append((rep_ms, tuple(step.__defaults__[2].shape)))  # the out= buffer
        return [3.0, 2.0, 1.0]

    monkeypatch.setattr(timing, "cuda_bench", bench)
    out = timing.gemm_reference(torch.randn(30, 8, requires_grad=True), 12, rep_ms=5.0)
    assert shapes == [(5.0, (30, 12)), (5.0, (12, 8)), (5.0, (30, 8))]  # proj, dw, dx
    assert out["proj_ms"] == out["dw_ms"] == out["dx_ms"] == 2.0
    assert out["dw_tflops"] == pytest.approx(2 * 30 * 8 * 12 / 2e-3 / 1e12)
    assert (out["T"], out["D"], out["GL"], out["dtype"]) == (30, 8, 12, "float32")


def test_where_the_time_goes_from_a_profiled_run(tmp_path):
    res = report.Results([_gpu_like_run(tmp_path, profiled=True)])
    wsi, mnist, infer, batched = (c.name for c, _ in SUITES["gpu-check"])
    assert report.gemm_counts("fastmil_triton", "frozen") == {"proj": 2, "dw": 1}
    assert report.gemm_counts("eager", "fwd_bwd") == {"proj": 1, "dw": 1, "dx": 1}
    assert report.gemm_counts("fastmil_triton", "infer") == {"proj": 1}
    text = report.breakdown_section(res)
    lines = text.splitlines()
    assert ("Host time per launch of a trivial kernel: 4.3 µs before the first profile, 4.2–5.0 "
            "µs after each (a profiler left attached would slow the launches of the tests timed "
            "after it).") in lines
    # one block per target shape with a profile, in the order of TARGETS (memory: same shape)
    heads = [ln for ln in lines if ln.startswith("**`")]
    assert [h.split("`")[1] for h in heads] == [wsi, mnist]
    assert heads[0].startswith(f"**`{wsi}`**, frozen fwd+bwd (B=1, N=100,000, D=1024, L=256, "
                               "bf16). cuBLAS alone on this shape (torch.mm, bfloat16): "
                               "projection x [T, D] @ W [D, 2L] 0.200 ms (700 TFLOP/s), weight "
                               "gradient dpqᵀ @ x 0.150 ms (900 TFLOP/s).")
    assert "fp32 matmul precision 'highest'" in heads[1] and "input gradient dpq @ Wᵀ 0.006" \
        in heads[1]
    # measured 1.0 = kernels 0.9 + memset 0.01 + rest 0.09; GEMMs 2 × 0.2 + 0.15 (recompute)
    assert (f"| {FUSED} (recompute=True) | 1.00 | 0.900 (3) | 0 / 1 (0.010 ms) | "
            "0.090 (9.0%) | 0.550 | 1.64× | `_fwd_kernel` 0.600 (67%); `_bwd_kernel` 0.250 (28%); "
            "`_merge_kernel` 0.050 (5.6%) |") in lines
    assert f"⚠ {FUSED} (recompute=False): the lead-in kernel is missing." in lines
    assert (f"| {FUSED} (recompute=False) ⚠ | 0.800 | 0.600 (2) | 0 / 0 | 0.200 (25%) | "
            "0.350 | 1.71× | `_fwd_kernel` 0.400 (67%); `_bwd_kernel` 0.200 (33%) |") in lines
    assert ("| eager (fastmil.reference) | 2.50 | 1.50 (5) | 0 / 0 | 1.00 (40%) | 0.350 | 4.29× | "
            f"`{_CUBLAS[:59]}…` 0.800 (53%) ×2; `vectorized_elementwise_kernel<4, "
            "tanh_kernel_cuda, at::deta…` 0.500 (33%) ×2; `reduce_kernel<512, 1, ReduceOp<float, "
            "func_wrapper_t<float,…` 0.200 (13%) |") in lines
    assert ("| torch.compile (default) | 1.20 | n/a | n/a | n/a | n/a | n/a | "
            "profile failed: RuntimeError: no CUPTI |") in lines
    # MNIST: 10 kernels, the JSON keeps 8 + "(other)"; the table shows 4 and the 6 others;
    # GEMMs end to end with recompute: 2 × 0.01 + 0.008 + 0.006
    assert (f"| {FUSED} (recompute=True) | 0.100 | 0.028 (10) | 0 / 0 | 0.072 (72%) | "
            "0.034 | 0.82× | `_fwd_kernel` 0.012 (43%); `_bwd_kernel` 0.008 (29%); `aten_k0` "
            "0.001 (3.6%); `aten_k1` 0.001 (3.6%); 6 more 0.006 (21%) |") in lines
    assert (f"- {FUSED} (recompute=True): `_fwd_kernel` 0.012 ms = 1.20× cuBLAS's 0.010 ms "
            "for the projection; `_bwd_kernel` 0.008 ms = 0.33× cuBLAS's 0.024 ms for the "
            "backward's GEMMs.") in lines
    assert (f"- {FUSED} (recompute=True): `_fwd_kernel` 0.600 ms = 3.00× cuBLAS's 0.200 ms "
            "for the projection; `_bwd_kernel` 0.250 ms = 0.71× cuBLAS's 0.350 ms for the "
            "backward's GEMMs.") in lines
    assert (f"- {FUSED} (recompute=False): `_fwd_kernel` 0.400 ms = 2.00× cuBLAS's 0.200 ms "
            "for the projection; `_bwd_kernel` 0.200 ms = 1.33× cuBLAS's 0.150 ms for the "
            "backward's GEMMs.") in lines
    full = report.render(res, None, None, None)
    assert full.index("## Targets") < full.index("## Where the time goes") < full.index(
        "## Environment")
    summary = report.summary(res).splitlines()
    split = [ln for ln in summary if ln.startswith("time split")]
    assert split[0] == (f"time split, {wsi} frozen fwd+bwd: triton fused recompute 1.00 ms = "
                        "kernels 0.900 (_fwd_kernel 67%, _bwd_kernel 28%) + memcpy / memset "
                        "0.010 + rest 0.090, cuBLAS GEMMs 0.550; triton fused save 0.800 ms = "
                        "kernels 0.600 "
                        "(_fwd_kernel 67%, _bwd_kernel 33%) + rest 0.200, cuBLAS GEMMs 0.350")
    assert len(split) == 2 and split[1].startswith(f"time split, {mnist} fwd+bwd: triton ")
    assert f"kernel profile failed (1×): compile on {wsi}: RuntimeError: no CUPTI" in summary
    # the targets table still comes after the time split
    assert summary.index(split[-1]) < next(i for i, ln in enumerate(summary)
                                           if ln.startswith("| workload"))
    # a run whose profiles all failed still says so, with no time split
    for r in res.records.values():
        r.pop("kernels", None)
    assert "**`" + wsi in report.breakdown_section(res)
    assert "time split" not in report.summary(res)


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


def test_ncu_target_runs_each_case_in_its_targets_workload(monkeypatch):
    """The Nsight Compute target: each case is a GPU-check case, in the workload of its target,
    and one call runs (CPU, interpreter, tiny sizes: ``--dry-run``)."""
    from . import ncu_target

    modes = {c.name: m for c, m in SUITES["gpu-check"]}
    workload = {"frozen": "frozen", "fwd_bwd": "e2e", "infer": "infer"}
    for case, (name, wl) in ncu_target.CASES.items():
        assert wl in {workload[m] for m in modes[name]}, (case, name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for case in ncu_target.CASES:
        call, info = ncu_target.build(case, dry_run=True)
        out = call()
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()
        assert info["workload"] == ncu_target.CASES[case][1]


def test_gpu_check_cases_exist():
    for c, _ in SUITES["gpu-check"]:
        assert get_case(c.name) is c


def test_host_time_runs_both_paths_and_restores_the_kernels():
    from fastmil import triton_backend as ops
    from fastmil.kernels import attention_pool as kernels

    before = (kernels._fwd_kernel, kernels._bwd_kernel, kernels._merge_kernel, ops._pool_fwd,
              ops.triton_unavailable_reason)
    args = types.SimpleNamespace(bags=16, min_len=1, max_len=9, D=1, L=1, reps=3, warmup=1,
                                 workloads=["e2e", "infer"], device="cpu", profile=None)
    threads = torch.get_num_threads()
    try:
        result = host_time.measure(args)
    finally:
        torch.set_num_threads(threads)
    assert [(r["path"], r["workload"]) for r in result["rows"]] == [
        ("eager Function", "e2e"), ("eager Function", "infer"), ("custom ops", "e2e"),
        ("custom ops", "infer")]
    assert all(r["median_us"] > 0 for r in result["rows"])
    for r, us in zip(result["rows"], (100.0, 90.0, 160.0, 95.0), strict=True):
        r["median_us"] = us
    table = host_time.markdown(result)
    assert "| end-to-end fwd+bwd | 100 µs | 160 µs | 60 µs |" in table
    assert "| inference fwd (with the attention) | 90 µs | 95 µs | 5 µs |" in table
    assert (kernels._fwd_kernel, kernels._bwd_kernel, kernels._merge_kernel, ops._pool_fwd,
            ops.triton_unavailable_reason) == before


def test_tile_tables_recorded_and_shown(tmp_path, monkeypatch):
    from fastmil.kernels import attention_pool as kernels

    monkeypatch.delenv(kernels.TILES_ENV, raising=False)
    monkeypatch.setattr(kernels, "MEASURED_TILES", {})
    assert timing.tile_tables() == {"source": "defaults", "entries": []}
    key = ("bwd", "fp32", True, 512, 128, 1)
    path = tmp_path / "tile_sweep.json"
    path.write_text(json.dumps({"measured_tiles": [{"key": list(key),
                                                    "tile": [64, 32, 32, 4, 2]}]}))
    monkeypatch.setattr(kernels, "_FILE_TILES", {})
    monkeypatch.setenv(kernels.TILES_ENV, str(path))
    got = timing.tile_tables()
    assert got == {"source": f"FASTMIL_TILES={path}", "entries": [[list(key), [64, 32, 32, 4, 2]]]}
    path.write_text("{}")
    monkeypatch.setattr(kernels, "_FILE_TILES", {})
    assert "could not read it" in timing.tile_tables()["error"]
    table = report.env_table(report.Results([_gpu_like_run(tmp_path)]))
    assert ("| GPU tiles | FASTMIL_TILES=/out/tile_sweep.json: ('fwd', '16-bit', True, 1024, 256, "
            "1) → (128, 32, 64, 8, 3) |") in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("name", ["fastmil_triton_graph", "eager_graph"])
def test_graph_providers_refuse_without_cuda(name):
    from .providers import Unavailable, build_provider

    case = next(c for c, _ in SUITES["gpu-check"] if c.group == "mnist")
    with pytest.raises(Unavailable, match="CUDA graphs need a CUDA GPU"):
        build_provider(name, case, None, torch.device("cpu"))


def test_git_commit_falls_back_to_the_callers_commit(tmp_path, monkeypatch):
    """A remote GPU runner gets the work tree without .git: the caller names the commit."""
    monkeypatch.setenv("FASTMIL_COMMIT", "abc1234")
    assert timing.git_commit(str(tmp_path)) == "abc1234"
    monkeypatch.delenv("FASTMIL_COMMIT")
    assert timing.git_commit(str(tmp_path)) is None
    assert timing.git_commit() not in (None, "abc1234")  # this checkout has its history
