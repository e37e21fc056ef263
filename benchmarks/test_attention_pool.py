"""Time attention-MIL pooling per provider, case and mode (workload).

Parametrised in conftest.py (case × provider × mode, case-major, from the chosen suite). Each
test records in pytest-benchmark's ``extra_info``: the median time (CUDA events on GPU,
perf_counter on CPU), achieved TFLOP/s and GB/s, the roofline floor from the peaks measured in
this run and the fraction of it reached, memory (saved for backward, and on CUDA kept after the
forward and the peak), warm-up / compile time, and the relative error of z (and of the attention,
for inference) against ``fastmil.reference``. With ``--kernel-profile`` (CUDA, by default in the
gpu-check suite) also where the device time of one call goes, per kernel: ``kernels`` (name,
count, ms; the top 8 and "(other)"), ``kernels_total_ms``, ``kernels_count``, ``memcpy_*`` /
``memset_*``, ``kernels_attempts``, ``launch_us_after_profile`` (or ``kernels_error``), from
``timing.profile_kernels``; the cuBLAS time of the case's GEMMs goes to ``fastmil.cases``.
"""

from __future__ import annotations

import pytest
import torch

from .cases import get_case
from .harness import Broken, Skip, derived_metrics, make_runner
from .timing import cuda_bench, profile_kernels, summarize


def test_attention_pool(case_name, provider, mode, bench, benchmark):
    case = get_case(case_name)
    env = bench.env  # measures the device peaks on first use
    bench.use_case(case)
    if bench.over_budget():
        skip = Skip("the run's time budget (--bench-budget-s) was spent first", "budget")
        bench.record_skip(provider, mode, skip)
        pytest.skip(f"{provider}: {skip.reason}")
    prov = bench.workload(provider, mode)
    if isinstance(prov, Skip):
        bench.record_skip(provider, mode, prov)
        pytest.skip(f"{provider}: {prov.reason}")
    if isinstance(prov, Broken):
        bench.record_skip(provider, mode, Skip(prov.message, "failed"))
        raise AssertionError(prov.message) from prov.error

    benchmark.group = f"{case.name} {mode}"
    info = benchmark.extra_info
    info.update(case=case.name, case_group=case.group, provider=provider, mode=mode,
                device=env["device"], smoke=case.smoke, n_input_sets=len(bench.sets), **prov)
    setup, step = make_runner(bench.provider(provider), bench.weights, bench.sets, mode)

    if bench.device.type == "cuda":
        try:
            samples = cuda_bench(setup, step, rep_ms=bench.rep_ms)
        except torch.cuda.OutOfMemoryError as e:
            skip = Skip(f"out of memory while timing {mode}: {str(e).splitlines()[0]}", "OOM")
            del e
            bench.record_skip(provider, mode, skip)
            torch.cuda.empty_cache()
            pytest.skip(f"{provider}: {skip.reason}")
        info.update(summarize(samples), timer="CUDA events, L2 flushed, median")

        def setup_synced():
            args = setup()
            torch.cuda.synchronize()
            return args, {}

        def step_synced(*args):
            step(*args)
            torch.cuda.synchronize()

        # pytest-benchmark's own table: wall clock of a few synchronised calls (includes launch
        # and sync overhead); the numbers above are the ones the report uses.
        benchmark.pedantic(step_synced, setup=setup_synced, rounds=bench.rounds)
        if bench.kernel_profile and not provider.endswith("_graph"):  # one more call, profiled
            # (not graph replays: see report.PROVIDERS)
            info.update(profile_kernels(setup, step))
    else:
        benchmark.pedantic(step, setup=lambda: (setup(), {}), rounds=bench.rounds,
                           warmup_rounds=1)
        if benchmark.stats is None:  # --benchmark-disable
            return
        info.update(summarize([t * 1e3 for t in benchmark.stats.stats.data]),
                    timer="perf_counter (pytest-benchmark), median")
    info.update(derived_metrics(case, mode, info["median_ms"], env))
    bench.add_record(info)
