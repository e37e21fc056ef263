"""The session object behind the benchmark tests: inputs of the current case, providers built,
warmed up (compiled), checked against ``fastmil.reference`` and measured for memory once per
(case, provider), then timed per mode.

Tests run case by case (see ``conftest.pytest_generate_tests``): when the case changes, the
previous case's inputs and providers are dropped before the next ones are built.
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass

import torch

from .cases import Case, InputSet, Weights, make_inputs, n_input_sets
from .providers import Provider, Unavailable, build_provider
from .timing import cuda_memory, env_info, measure_peaks, saved_tensor_bytes

__all__ = ["Bench", "Skip", "derived_metrics", "make_runner"]

# Relative-RMS error of z against fastmil.reference above which a result is flagged
# (fastmil providers fail the test; third-party ones are timed and flagged in the report).
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2, "bf16": 3e-2}


@dataclass
class Skip:
    reason: str
    status: str  # "unavailable" | "OOM"


@dataclass
class Broken:
    message: str
    error: BaseException | None = None


def _oom_types() -> tuple[type[BaseException], ...]:
    return (torch.cuda.OutOfMemoryError,)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _zero_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def make_runner(prov: Provider, weights: Weights, sets: list[InputSet], mode: str):
    """``(setup, step)``: ``setup()`` returns the positional arguments of ``step`` and is never
    timed. It picks the next input set (round robin), drops gradients (so no accumulation kernel
    is timed) and, for ``bwd``, runs the forward pass."""
    counter = itertools.count()
    leaves = weights.leaves() + prov.params

    def pick() -> InputSet:
        s = sets[next(counter) % len(sets)]
        _zero_grads(leaves + s.leaves())
        return s

    if mode == "fwd":
        def setup():
            return (pick(),)

        def step(s):
            return prov.fn(s)
    elif mode == "bwd":
        def setup():
            s = pick()
            z = prov.fn(s)
            return z, s.dz.reshape(z.shape)

        def step(z, dz):
            z.backward(dz)
    elif mode == "fwd_bwd":
        def setup():
            return (pick(),)

        def step(s):
            z = prov.fn(s)
            z.backward(s.dz.reshape(z.shape))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return setup, step


def derived_metrics(case: Case, mode: str, median_ms: float, peaks: dict) -> dict:
    """Achieved TFLOP/s and GB/s, and the roofline floor max(flops / peak, bytes / bandwidth)
    from the peaks measured in this run (bf16 peak for 16-bit cases, tf32 for fp32 on CUDA)."""
    flops, nbytes = case.flops(mode), case.bytes(mode)
    t = median_ms * 1e-3
    out = {"flops": flops, "bytes": nbytes, "tflops": flops / t / 1e12, "gbps": nbytes / t / 1e9}
    if case.dtype in ("bf16", "fp16"):
        key = "peak_bf16_tflops"
    else:
        key = "peak_tf32_tflops" if "peak_tf32_tflops" in peaks else "peak_fp32_tflops"
    if key in peaks and "peak_copy_gbps" in peaks:
        compute_s = flops / (peaks[key] * 1e12)
        memory_s = nbytes / (peaks["peak_copy_gbps"] * 1e9)
        floor_s = max(compute_s, memory_s)
        out.update(floor_ms=floor_s * 1e3, floor_fraction=floor_s / t,
                   floor_bound="compute" if compute_s >= memory_s else "memory",
                   floor_peak=key)
    return out


class Bench:
    def __init__(self, device: torch.device, smoke: bool, rounds: int, rep_ms: float):
        self.device, self.smoke, self.rounds, self.rep_ms = device, smoke, rounds, rep_ms
        self._env: dict | None = None
        self._case: Case | None = None
        self._weights: Weights | None = None
        self._sets: list[InputSet] = []
        self._ref: torch.Tensor | None = None
        self._providers: dict[str, Provider | Skip | Broken] = {}
        self.skipped: list[dict] = []
        self.cases: dict[str, dict] = {}

    # -- environment ---------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        if self._env is None:
            env = env_info(self.device, self.smoke)
            env.update(measure_peaks(self.device))
            self._env = env
        return self._env

    @property
    def env_if_measured(self) -> dict | None:
        return self._env

    # -- cases ---------------------------------------------------------------------------------
    def use_case(self, case: Case) -> None:
        self.cases.setdefault(case.name, case.as_dict())
        if self._case is not None and self._case.name == case.name:
            return
        self._case, self._weights, self._sets, self._ref = None, None, [], None
        self._providers = {}
        _free(self.device)
        self._weights, self._sets = make_inputs(case, self.device,
                                                n_input_sets(case, self.device))
        self._case = case

    @property
    def weights(self) -> Weights:
        return self._weights

    @property
    def sets(self) -> list[InputSet]:
        return self._sets

    def _reference(self) -> torch.Tensor:
        if self._ref is None:
            from fastmil.reference import attention_pool_reference

            case, W, s = self._case, self._weights, self._sets[0]
            with torch.no_grad():
                z = attention_pool_reference(
                    s.x.detach(), W.V.detach(), W.U.detach(), W.w.detach(),
                    attn_bias=W.bV.detach(), gate_bias=W.bU.detach(),
                    offsets=None if case.B == 1 else s.offsets)
            self._ref = z.float().reshape(case.B, case.K, case.D)
            _free(self.device)
        return self._ref

    def record_skip(self, provider: str, mode: str | None, skip: Skip) -> None:
        self.skipped.append({"case": self._case.name, "provider": provider, "mode": mode,
                             "status": skip.status, "reason": skip.reason})

    # -- providers -----------------------------------------------------------------------------
    def provider(self, name: str) -> Provider | Skip | Broken:
        if name not in self._providers:
            self._providers[name] = self._prepare(name)
            _free(self.device)
        return self._providers[name]

    def _prepare(self, name: str) -> Provider | Skip | Broken:
        case, W, sets, device = self._case, self._weights, self._sets, self.device
        try:
            prov = build_provider(name, case, W, device)
        except Unavailable as e:
            return Skip(str(e), "unavailable")
        leaves = W.leaves() + prov.params
        try:
            # warm-up: compile / autotune, both passes, every input set
            t0 = time.perf_counter()
            for s in sets:
                _zero_grads(leaves + s.leaves())
                z = prov.fn(s)
                z.backward(s.dz.reshape(z.shape))
                del z
            if device.type == "cuda":
                torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            # accuracy of z against the reference (with grad on, as timed: no recompile)
            s = sets[0]
            z = prov.fn(s).detach().float().reshape(case.B, case.K, case.D)
            ref = self._reference()
            rel_err = float((z - ref).norm() / ref.norm().clamp_min(1e-30))
            del z
            _zero_grads(leaves + s.leaves())
            _free(device)
            if device.type == "cuda":
                mem = cuda_memory(lambda: prov.fn(s), lambda z: z.backward(s.dz.reshape(z.shape)))
            else:
                mem = saved_tensor_bytes(lambda: prov.fn(s), leaves + s.leaves())
            _zero_grads(leaves + s.leaves())
        except _oom_types() as e:
            return Skip(f"out of memory while warming up: {str(e).splitlines()[0]}", "OOM")
        except NotImplementedError as e:
            if name != "fastmil_triton":
                raise
            return Skip(f"fastmil backend='triton' not implemented: {e}", "unavailable")
        except Exception as e:  # a provider that crashes fails its tests, with the cause
            return Broken(f"{name} failed on {case.name}: {type(e).__name__}: {e}", e)
        tol = TOLERANCE[case.dtype]
        prov.info = {"warmup_s": warmup_s, "rel_err": rel_err, "rel_err_tol": tol,
                     "accurate": rel_err <= tol, **mem}
        if name.startswith("fastmil") and rel_err > tol:
            return Broken(f"{name} on {case.name}: relative RMS error of z vs "
                          f"fastmil.reference is {rel_err:.3g} > {tol:g}")
        return prov
