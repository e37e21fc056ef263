"""Time attention_pool per case, workload and provider (``pytest benchmarks/``).

Each test times batches of calls with pytest-benchmark (one round = ``calls`` calls and a device
synchronisation) and records in ``extra_info``: the wall time per call, the roofline floor and
the fraction of it reached, the host time of a call alone, where one call's device time goes
(CUDA), peak memory, and the error against ``fastmil.reference``.
"""

from __future__ import annotations

import pytest
import torch

from .harness import (
    GPU_ONLY,
    Unavailable,
    batch_size,
    floor_ms,
    host_ms,
    kernel_profile,
    make_inputs,
    memory,
    reference,
    relative_error,
    runner,
    sync,
)

_INPUTS = {}  # the current case's inputs (the tests run case by case)


def _inputs(case, device):
    if case.name not in _INPUTS:
        _INPUTS.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _INPUTS[case.name] = make_inputs(case, device)
    return _INPUTS[case.name]


def test_attention_pool(case, provider, workload, device, peaks, budget, batch_s, benchmark):
    if device.type != "cuda" and provider in GPU_ONLY:
        pytest.skip("a kernel option that only a GPU's timings tell apart")
    inp = _inputs(case, device)
    try:
        run = runner(provider, case, workload, inp)
        out = run()  # (warm-up: compiles)
    except Unavailable as e:
        pytest.skip(str(e))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip("out of memory")
    err = relative_error(out, reference(case, inp, workload), case)
    del out
    calls = batch_size(run, device, batch_s)

    def batch():
        for _ in range(calls):
            run()
        sync(device)

    cuda = device.type == "cuda"  # (a CPU run is CI's smoke test: as few calls as will do)
    benchmark.group = f"{case.name} {workload}"
    benchmark.pedantic(batch, rounds=5 if cuda else 2, warmup_rounds=1 if cuda else 0)
    wall = benchmark.stats.stats.median / calls * 1e3
    floor = floor_ms(case, workload, peaks)
    benchmark.extra_info.update(
        case=case.name, describe=case.describe(), workload=workload, provider=provider,
        wall_ms=wall, calls_per_round=calls, host_ms=host_ms(run, device, 5 if cuda else 1)[0],
        error=err,
        floor_ms=floor, of_floor=None if floor is None else floor / wall,
        **kernel_profile(run, device), **memory(run, device, workload))
    # fastmil's own providers must be right; peers are recorded as they are
    if provider.startswith("fastmil"):
        assert err < (2e-2 if case.dtype != "fp32" else 1e-4), err
