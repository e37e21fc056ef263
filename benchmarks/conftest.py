"""pytest configuration of the benchmarks (``pytest benchmarks/``, pytest-benchmark).

Options: ``--suite gpu|smoke`` (default: gpu on CUDA, else the CPU smoke suite, fastmil's
kernels in Triton's interpreter), ``--providers A,B`` (of harness.PROVIDERS), ``--bench-budget-s
S`` (later tests skip, so a time-boxed run still writes its JSON), ``--bench-batch-s S`` (seconds
of calls per timed batch). The numbers go to ``--benchmark-json=PATH``: each test's
``extra_info``, and a top-level ``"fastmil"`` entry with the device, peaks and versions;
``python -m benchmarks.report PATH`` makes RESULTS.md from it.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

# Without a GPU fastmil's kernels run in Triton's interpreter; it is read on the kernels' import
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .harness import PROVIDERS, SUITES, commit, measure_peaks  # noqa: E402

_START = time.perf_counter()


def pytest_addoption(parser):
    group = parser.getgroup("fastmil benchmarks")
    group.addoption("--suite", choices=sorted(SUITES), default=None)
    group.addoption("--providers", default=None)
    group.addoption("--bench-budget-s", type=float, default=None)
    group.addoption("--bench-batch-s", type=float, default=None)


def suite_name(config) -> str:
    return config.getoption("--suite") or ("gpu" if torch.cuda.is_available() else "smoke")


def pytest_generate_tests(metafunc):
    if {"case", "provider", "workload"} <= set(metafunc.fixturenames):
        wanted = metafunc.config.getoption("--providers")
        providers = wanted.split(",") if wanted else list(PROVIDERS)
        smoke = suite_name(metafunc.config) == "smoke"  # (on a CPU torch.compile is timed on
        # one case: its compiles would cost CI minutes)
        params = [pytest.param(c, p, w, id=f"{c.name}-{w}-{p}")
                  for c in SUITES[suite_name(metafunc.config)] for w in c.workloads
                  for p in providers if not (smoke and p == "compile" and c.name != "smoke-slide")]
        metafunc.parametrize(("case", "provider", "workload"), params)


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def peaks(device):
    return measure_peaks(device)


@pytest.fixture
def budget(request):
    """Skips the test once the run's time budget is spent."""
    limit = request.config.getoption("--bench-budget-s")
    if limit is not None and time.perf_counter() - _START > limit:
        pytest.skip(f"the run's time budget of {limit:.0f} s was spent first")


@pytest.fixture
def batch_s(request, device):
    value = request.config.getoption("--bench-batch-s")
    return value if value is not None else (0.2 if device.type == "cuda" else 0.05)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    import triton  # present wherever the suite runs fastmil's kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    output_json["fastmil"] = dict(
        suite=suite_name(config), commit=commit(),
        device=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        torch=torch.__version__, triton=triton.__version__,
        cuda=torch.version.cuda, peaks=measure_peaks(device))
