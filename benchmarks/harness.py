"""The session object behind the benchmark tests: inputs of the current case, providers built
once per (case, provider), warmed up (compiled), checked against ``fastmil.reference`` and
measured for memory once per (case, provider, workload), then timed per mode.

With ``kernel_profile`` (CUDA; by default in the gpu-check suite) each case also gets the cuBLAS
time of its GEMMs, ``cases[name]["gemm"]`` in the JSON (``timing.gemm_reference``), and each
test the per-kernel device time of one call (``timing.profile_kernels``, in its record).

Tests run case by case (see ``conftest.pytest_generate_tests``): when the case changes, the
previous case's inputs and providers are dropped before the next ones are built.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import time
from dataclasses import dataclass

import torch

from .cases import Case, InputSet, Weights, make_inputs, n_input_sets
from .providers import Provider, Unavailable, build_provider
from .timing import (
    cuda_memory,
    env_info,
    error_text,
    gemm_reference,
    launch_us,
    measure_peaks,
    saved_tensor_bytes,
)

__all__ = ["Bench", "Broken", "Skip", "WORKLOAD", "derived_metrics", "make_runner"]

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


# the modes that share one warm-up, accuracy check and memory probe
WORKLOAD = {"fwd": "e2e", "bwd": "e2e", "fwd_bwd": "e2e", "frozen": "frozen", "infer": "infer"}
# providers whose returned attention is the softmax weights (torchmil returns raw scores, PyG none)
_ATTENTION_CHECKED = ("fastmil_triton", "fastmil_triton_save", "fastmil_torch", "eager",
                      "compile_default", "compile_max_autotune")


def _forward(prov: Provider, s: InputSet, mode: str):
    """The forward pass of ``mode`` on ``s``: z (and the attention for ``infer``)."""
    if mode == "infer":
        with torch.no_grad():
            return prov.fn(s, attention=True)
    return prov.fn(s.frozen() if mode == "frozen" else s)


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

    if mode in ("fwd", "infer"):
        def setup():
            return (pick(),)

        def step(s):
            return _forward(prov, s, mode)
    elif mode == "bwd":
        def setup():
            s = pick()
            z = prov.fn(s)
            return z, s.dz.reshape(z.shape)

        def step(z, dz):
            z.backward(dz)
    elif mode in ("fwd_bwd", "frozen"):
        def setup():
            return (pick(),)

        def step(s):
            z = _forward(prov, s, mode)
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
    def __init__(self, device: torch.device, smoke: bool, rounds: int, rep_ms: float, *,
                 suite: str = "full", interpret: bool = False, budget_s: float | None = None,
                 json_path: str | None = None, kernel_profile: bool = False):
        self.device, self.smoke, self.rounds, self.rep_ms = device, smoke, rounds, rep_ms
        self.suite, self.interpret, self.json_path = suite, interpret, json_path
        # per-kernel profile of each test and cuBLAS GEMM reference of each case (CUDA only)
        self.kernel_profile = kernel_profile and device.type == "cuda"
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self._env: dict | None = None
        self._case: Case | None = None
        self._weights: Weights | None = None
        self._sets: list[InputSet] = []
        self._ref: tuple[torch.Tensor, torch.Tensor] | None = None
        self._providers: dict[str, Provider | Skip | Broken] = {}
        self._workloads: dict[tuple[str, str], dict | Skip | Broken] = {}
        self.skipped: list[dict] = []
        self.cases: dict[str, dict] = {}
        self.records: list[dict] = []

    # -- environment ---------------------------------------------------------------------------
    @property
    def env(self) -> dict:
        if self._env is None:
            env = env_info(self.device, self.smoke)
            env.update(measure_peaks(self.device))
            env["suite"] = self.suite
            if self.kernel_profile:  # before any profile: see launch_us_after_profile
                env["launch_us"] = launch_us()
            self._env = env
        return self._env

    @property
    def env_if_measured(self) -> dict | None:
        return self._env

    def over_budget(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    # -- results -------------------------------------------------------------------------------
    def section(self) -> dict:
        """The top-level ``"fastmil"`` entry of the JSON."""
        return {"env": self._env, "cases": self.cases, "skipped": self.skipped,
                "suite": self.suite}

    def add_record(self, info: dict) -> None:
        """Keep one test's numbers; with ``json_path``, rewrite that file at once, so a run cut
        short (a time limit, a crash) keeps what it measured."""
        self.records.append(dict(info))
        self._write()

    def record_skip(self, provider: str, mode: str | None, skip: Skip) -> None:
        self.skipped.append({"case": self._case.name, "provider": provider, "mode": mode,
                             "status": skip.status, "reason": skip.reason})
        self._write()

    def _write(self) -> None:
        if not self.json_path:
            return
        out = {"benchmarks": [{"extra_info": r} for r in self.records],
               "version": "fastmil incremental", "fastmil": self.section()}
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
        os.replace(tmp, self.json_path)

    # -- cases ---------------------------------------------------------------------------------
    def use_case(self, case: Case) -> None:
        self.cases.setdefault(case.name, case.as_dict())
        if self._case is not None and self._case.name == case.name:
            return
        self._case, self._weights, self._sets, self._ref = None, None, [], None
        self._providers, self._workloads = {}, {}
        _free(self.device)
        self._weights, self._sets = make_inputs(case, self.device,
                                                n_input_sets(case, self.device))
        self._case = case
        if self.kernel_profile and "gemm" not in self.cases[case.name]:
            self.cases[case.name]["gemm"] = self._gemm_reference(case)

    def _gemm_reference(self, case: Case) -> dict:
        """cuBLAS time of the case's GEMMs (``timing.gemm_reference``; every case is gated: the
        projection has 2·L columns), or ``{"error": ...}``: a reference never fails a test."""
        try:
            return gemm_reference(self._sets[0].x, 2 * case.L, self.rep_ms)
        except Exception as e:
            return {"error": error_text(e)}
        finally:
            _free(self.device)

    @property
    def weights(self) -> Weights:
        return self._weights

    @property
    def sets(self) -> list[InputSet]:
        return self._sets

    def _reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """z [B, K, D] and the attention [T, K] (packed order) of the first input set."""
        if self._ref is None:
            from fastmil.reference import attention_pool_reference

            case, W, s = self._case, self._weights, self._sets[0]
            with torch.no_grad():
                z, a = attention_pool_reference(
                    s.x.detach(), W.V.detach(), W.U.detach(), W.w.detach(),
                    attn_bias=W.bV.detach(), gate_bias=W.bU.detach(),
                    offsets=None if case.B == 1 else s.offsets, return_attention=True)
            self._ref = (z.float().reshape(case.B, case.K, case.D),
                         a.float().reshape(case.T, case.K))
            _free(self.device)
        return self._ref

    def _packed_attention(self, prov: Provider, s: InputSet, a: torch.Tensor) -> torch.Tensor:
        """A provider's attention in packed order, [T, K]."""
        case = self._case
        if prov.uses_padded and case.B > 1:
            a = a.reshape(case.B, case.N, case.K)[s.padded()[1]]
        return a.float().reshape(case.T, case.K)

    # -- providers -----------------------------------------------------------------------------
    def provider(self, name: str) -> Provider | Skip | Broken:
        if name not in self._providers:
            try:
                self._providers[name] = build_provider(name, self._case, self._weights,
                                                       self.device, interpret=self.interpret)
            except Unavailable as e:
                self._providers[name] = Skip(str(e), "unavailable")
            _free(self.device)
        return self._providers[name]

    def workload(self, name: str, mode: str) -> dict | Skip | Broken:
        """Per provider and workload (``WORKLOAD[mode]``), once: warm-up (compile, autotune) on
        every input set, accuracy of z (and of the attention, for inference) against
        ``fastmil.reference``, and memory. The dict goes into each record's ``extra_info``."""
        prov = self.provider(name)
        if not isinstance(prov, Provider):
            return prov
        key = (name, WORKLOAD[mode])
        if key not in self._workloads:
            self._workloads[key] = self._prepare(prov, mode)
            _free(self.device)
        return self._workloads[key]

    def _prepare(self, prov: Provider, mode: str) -> dict | Skip | Broken:
        case, W, sets, device, name = self._case, self._weights, self._sets, self.device, prov.name
        workload = WORKLOAD[mode]
        if workload == "infer" and prov.infer:
            return Skip(prov.infer, "unavailable")
        if workload == "infer" and name == "fastmil_triton_save":
            return Skip("recompute=False only changes the backward: inference is the fastmil "
                        "triton column", "unavailable")
        warm = "fwd_bwd" if workload == "e2e" else mode
        leaves = W.leaves() + prov.params
        attn_err = None
        try:
            t0 = time.perf_counter()
            first = None
            for s in sets:  # warm-up: compile / autotune, every input set
                _zero_grads(leaves + s.leaves())
                out = _forward(prov, s, warm)
                z = out[0] if isinstance(out, tuple) else out
                if first is None:
                    first = (z.detach().float().reshape(case.B, case.K, case.D),
                             out[1].detach() if isinstance(out, tuple) else None)
                if warm != "infer":
                    z.backward(s.dz.reshape(z.shape))
                del out, z
            if device.type == "cuda":
                torch.cuda.synchronize()
            warmup_s = time.perf_counter() - t0
            z_ref, a_ref = self._reference()
            rel_err = _rel_err(first[0], z_ref)
            if first[1] is not None and name in _ATTENTION_CHECKED:
                attn_err = _rel_err(self._packed_attention(prov, sets[0], first[1]), a_ref)
            del first
            s = sets[0]
            _zero_grads(leaves + s.leaves())
            _free(device)
            mem = self._memory(prov, s, warm, leaves)
            _zero_grads(leaves + s.leaves())
        except _oom_types() as e:
            return Skip(f"out of memory while warming up: {str(e).splitlines()[0]}", "OOM")
        except NotImplementedError as e:
            if name.endswith("_graph"):  # captured for one workload only
                return Skip(str(e), "unavailable")
            if not name.startswith("fastmil_triton"):
                raise
            return Skip(f"not implemented in fastmil yet: {e}", "unavailable")
        except Exception as e:  # a provider that crashes fails its tests, with the cause
            return Broken(f"{name} failed on {case.name} ({workload}): {type(e).__name__}: {e}",
                          e)
        tol = TOLERANCE[case.dtype]
        info = {"workload": workload, "warmup_s": warmup_s, "rel_err": rel_err,
                "rel_err_tol": tol, "accurate": rel_err <= tol, **mem}
        if attn_err is not None:
            info.update(attn_rel_err=attn_err, accurate=info["accurate"] and attn_err <= tol)
        if name.startswith("fastmil") and not info["accurate"]:
            what = f"z {rel_err:.3g}" + ("" if attn_err is None else f", attention {attn_err:.3g}")
            return Broken(f"{name} on {case.name} ({workload}): relative RMS error vs "
                          f"fastmil.reference: {what} > {tol:g}")
        return info

    def _memory(self, prov: Provider, s: InputSet, mode: str, leaves) -> dict:
        """Bytes autograd saves for backward (saved_tensors_hooks, every device) and, on CUDA,
        the allocator's view: kept across the forward, and the peak over forward + backward."""
        xs = s.frozen() if mode == "frozen" else s
        if mode == "infer":
            if self.device.type != "cuda":
                return {"saved_bytes": 0, "memory_method": "no_grad: nothing saved"}
            mem = cuda_memory(lambda: _forward(prov, s, mode), None)
            return {"saved_bytes": 0, "peak_bytes": mem["peak_bytes"],
                    "memory_method": "no_grad: nothing saved; peak: " + mem["memory_method"]}
        out = saved_tensor_bytes(lambda: _forward(prov, s, mode), leaves + xs.leaves())
        _zero_grads(leaves + s.leaves())
        if self.device.type == "cuda":
            mem = cuda_memory(lambda: _forward(prov, s, mode),
                              lambda z: z.backward(s.dz.reshape(z.shape)))
            out.update(kept_bytes=mem["kept_bytes"], peak_bytes=mem["peak_bytes"],
                       memory_method=out["memory_method"] + "; kept / peak: "
                       + mem["memory_method"])
        return out


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-30))
