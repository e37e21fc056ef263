"""pytest configuration of the benchmark suite (``pytest benchmarks/``).

Options:
  --suite NAME       which shapes and workloads (cases.SUITES): ``full`` (the default on CUDA),
                     ``smoke`` (tiny shapes, the default without CUDA, so ``pytest benchmarks/``
                     on a CPU machine is the CI smoke run), ``gpu-check`` (the key shapes of the
                     targets, each in its workload: benchmarks/gpu_check.sh) and ``dry-run``
                     (their CPU stand-ins, fastmil triton in Triton's interpreter).
  --smoke            same as --suite smoke.
  --bench-budget-s S stop timing after S seconds: the remaining tests skip (and are listed as
                     skipped in the JSON), so a time-boxed run still ends with its report.
  --fastmil-json P   write the results to P after every test (same layout as below), so a run
                     cut short keeps what it measured.
  --bench-rounds N   pytest-benchmark rounds per test (CPU timing; on CUDA only its wall-clock
                     table uses them), default 5.
  --bench-rep-ms MS  CUDA: milliseconds of timed calls per test (at least 10 calls), default 200.
  --tf32             torch.set_float32_matmul_precision("high") for every provider (fp32 matmuls
                     on TF32 tensor cores, as Triton's tl.dot does by default); off by default.
  --cpu-threads N    CPU: torch.set_num_threads(N) first (0 = torch's default); 1 gives stable
                     numbers on a shared machine.
  --kernel-profile W CUDA: where the time goes, ``auto`` (the default: in the gpu-check and
                     dry-run suites), ``on`` (every suite) or ``off``: each test records the
                     device time per kernel of one call (torch.profiler, ``kernels`` ... in its
                     ``extra_info``) and each case the cuBLAS time of its GEMMs (``"gemm"`` in
                     its entry of ``fastmil.cases``); see benchmarks/timing.py. Nothing on CPU.

The results go to pytest-benchmark's JSON (``--benchmark-json=PATH``): every timed test carries
its numbers in ``extra_info``, and a top-level ``"fastmil"`` entry holds the environment, the
measured peaks, the cases and the skipped (unavailable / OOM) combinations. Without
pytest-benchmark installed, a minimal stand-in fixture times the same way and writes the same
JSON layout for ``--benchmark-json``. ``python -m benchmarks.report`` turns JSON into RESULTS.md.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time

import pytest
import torch

# Without a GPU, fastmil's Triton kernels can only run in Triton's interpreter (the dry-run
# suite); the variable is read when the kernels are first imported, after this line.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cases import SUITE_PROVIDERS, SUITES, suite  # noqa: E402
from .harness import Bench  # noqa: E402
from .providers import PROVIDERS  # noqa: E402

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False

_BENCH_KEY = pytest.StashKey[Bench]()
_MINI_RECORDS = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("fastmil benchmarks")
    group.addoption("--suite", default=None, choices=sorted(SUITES),
                    help="shapes and workloads: full (default on CUDA), smoke (default "
                         "without CUDA), gpu-check, dry-run")
    group.addoption("--smoke", action="store_true", default=False,
                    help="tiny CPU-sized shapes (the default when CUDA is absent)")
    group.addoption("--bench-budget-s", type=float, default=None,
                    help="skip the tests that would start after this many seconds")
    group.addoption("--fastmil-json", default=None,
                    help="write the results here after every test")
    group.addoption("--bench-rounds", type=int, default=5,
                    help="pytest-benchmark rounds per test (default 5)")
    group.addoption("--bench-rep-ms", type=float, default=200.0,
                    help="CUDA: milliseconds of timed calls per test (default 200)")
    group.addoption("--tf32", action="store_true", default=False,
                    help='torch.set_float32_matmul_precision("high") for the whole run')
    group.addoption("--cpu-threads", type=int, default=0,
                    help="CPU: torch.set_num_threads(N) before timing (0 = torch's default)")
    group.addoption("--kernel-profile", default="auto", choices=("auto", "on", "off"),
                    help="CUDA: per-kernel device time of each test and cuBLAS GEMM time of "
                         "each case (auto: in the gpu-check and dry-run suites)")
    if not HAVE_PYTEST_BENCHMARK:
        group.addoption("--benchmark-json", default=None,
                        help="(stand-in for pytest-benchmark) write the results as JSON here")


def _suite(config) -> str:
    if config.getoption("--suite"):
        return config.getoption("--suite")
    if config.getoption("--smoke") or not torch.cuda.is_available():
        return "smoke"
    return "full"


def _smoke(config) -> bool:
    return _suite(config) in ("smoke", "dry-run")


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    plugin = "pytest-benchmark" if HAVE_PYTEST_BENCHMARK else "stand-in timer (no pytest-benchmark)"
    return f"fastmil benchmarks: {device}, suite {_suite(config)!r}, {plugin}"


def pytest_generate_tests(metafunc):
    if {"case_name", "provider", "mode"} <= set(metafunc.fixturenames):
        # case-major order: each case's inputs are built once and freed before the next
        name = _suite(metafunc.config)
        providers = [p for p in PROVIDERS if p in SUITE_PROVIDERS.get(name, PROVIDERS)]
        params = [pytest.param(c.name, p, m, id=f"{c.name}-{p}-{m}")
                  for c, modes in suite(name) for p in providers for m in modes]
        # CUDA-graph captures last of all: a capture that fails leaves the CUDA RNG in capture
        # state, which would fail every provider timed after it in the process
        params.sort(key=lambda p: p.values[1].endswith("_graph"))
        metafunc.parametrize(("case_name", "provider", "mode"), params)


@pytest.fixture(scope="session")
def bench(request) -> Bench:
    config = request.config
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = config.getoption("--cpu-threads")
    if device.type == "cpu" and threads > 0:
        torch.set_num_threads(threads)
    if config.getoption("--tf32"):
        torch.set_float32_matmul_precision("high")
    name = _suite(config)
    profile = config.getoption("--kernel-profile")
    b = Bench(device, _smoke(config), config.getoption("--bench-rounds"),
              config.getoption("--bench-rep-ms"), suite=name,
              interpret=name == "dry-run" and device.type == "cpu",
              budget_s=config.getoption("--bench-budget-s"),
              json_path=config.getoption("--fastmil-json"),
              kernel_profile=profile == "on" or (profile == "auto"
                                                 and name in ("gpu-check", "dry-run")))
    config.stash[_BENCH_KEY] = b
    return b


def _fastmil_section(config) -> dict | None:
    b = config.stash.get(_BENCH_KEY, None)
    return None if b is None else b.section()


if HAVE_PYTEST_BENCHMARK:
    @pytest.hookimpl(optionalhook=True)
    def pytest_benchmark_update_json(config, benchmarks, output_json):
        section = _fastmil_section(config)
        if section is not None:
            output_json["fastmil"] = section

else:
    class _Stats:
        def __init__(self, data):
            self.data = data
            self.median = statistics.median(data)
            self.min, self.max, self.mean = min(data), max(data), statistics.fmean(data)

    class _StandInBenchmark:
        """The part of pytest-benchmark's fixture the suite uses: ``pedantic``, ``group``,
        ``extra_info`` and ``stats.stats``."""

        def __init__(self, node):
            self.name, self.fullname = node.name, node.nodeid
            callspec = getattr(node, "callspec", None)
            self.params = dict(callspec.params) if callspec else None
            self.group, self.extra_info, self.stats = None, {}, None

        def pedantic(self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1,
                     warmup_rounds=0, iterations=1):
            data, result = [], None
            for i in range(warmup_rounds + rounds):
                a, k = (setup() or (args, kwargs)) if setup else (args, kwargs)
                t0 = time.perf_counter()
                for _ in range(iterations):
                    result = target(*a, **(k or {}))
                dt = (time.perf_counter() - t0) / iterations
                if teardown is not None:
                    teardown(*a, **(k or {}))
                if i >= warmup_rounds:
                    data.append(dt)
            self.stats = type("Metadata", (), {"stats": _Stats(data)})()
            return result

        def as_dict(self):
            s = self.stats.stats
            return {"group": self.group, "name": self.name, "fullname": self.fullname,
                    "params": self.params, "extra_info": self.extra_info,
                    "stats": {"min": s.min, "max": s.max, "mean": s.mean, "median": s.median,
                              "rounds": len(s.data), "data": s.data}}

    @pytest.fixture
    def benchmark(request):
        bm = _StandInBenchmark(request.node)
        yield bm
        if bm.stats is not None:
            request.config.stash.setdefault(_MINI_RECORDS, []).append(bm)

    def pytest_sessionfinish(session, exitstatus):
        path = session.config.getoption("--benchmark-json")
        records = session.config.stash.get(_MINI_RECORDS, [])
        if not path or not records:
            return
        out = {"machine_info": {}, "benchmarks": [bm.as_dict() for bm in records],
               "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "version": "stand-in", "fastmil": _fastmil_section(session.config)}
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
