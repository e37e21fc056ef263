"""Compile fastmil's Triton kernels for an NVIDIA GPU ahead of time, without a GPU, exactly as
the JIT would compile them at the first launch.

    python tests/aot_compile.py [ARCH]      (ARCH: 90 for Hopper, the default; 80 for Ampere)

Each variant is compiled through ``JITFunction.warmup`` with real (CPU) arguments against a
stand-in driver that reports an sm_ARCH GPU: the JIT's own binder then applies its own
specialization (16-byte-aligned pointers, integers divisible by 16, ``do_not_specialize``), so the
program checked here is the program that runs. Triton's full NVIDIA pipeline runs down to a
cubin (ptxas included). One line per variant: registers, stack (register spills), shared memory,
asynchronous copies and how many wgmma groups stay in flight. It exits 1 if a variant fails to
compile or spills, or if a 16-bit projection loop on Hopper is not software-pipelined (no
``cp.async`` copies, or every wgmma waited on at once). Run with TRITON_INTERPRET unset.

Variants: every dtype × gating × mask × branch count with the default tiles, forward and
backward; every candidate tile of ``TILE_CANDIDATES`` on the key shape; every entry of the
measured tile tables (``MEASURED_TILES``, and the ``FASTMIL_TILES`` file's when that is set); a
row stride that is not a multiple of 16 elements (the JIT's second variant); and the optional
paths (gelu, dropout, saved projections, one program per bag, a backward for frozen x, the
other one-branch weighted sum, ``DOT_WEIGHTED_SUM`` switched).
``fwd_pq`` is the forward that reads its projections from a cuBLAS GEMM (``CUBLAS_PROJECTION``,
the default), ``bwd_pq`` the backward that reads them (saved, or from cuBLAS), each with its own
tiles.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class _StandInDriver:
    """Just enough of a driver for the JIT to compile (never launch) for sm_ARCH."""

    def __init__(self, arch):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _args(kind, dt, D, L, K, gated, masked, R=4096, B=4):
    """Arguments of one launch as the launchers pass them (CPU tensors stand in for CUDA ones:
    the binder looks only at dtypes, alignment and integer values)."""
    x = torch.empty(R, D, dtype=dt)
    f32 = lambda *s: torch.empty(*s, dtype=torch.float32)  # noqa: E731
    meta = torch.empty(4 * B + 64, dtype=torch.int64)
    v = torch.empty(L, D, dtype=dt)
    bias = torch.empty(L, dtype=dt)
    w = torch.empty(K, L, dtype=dt)
    seed = torch.empty(2, dtype=torch.int64)
    row_mask = torch.empty(R, dtype=torch.bool) if masked else x
    GL = 2 * L if gated else L
    pq = torch.empty(R, GL, dtype=dt)
    C = 64
    if kind.startswith("fwd"):
        return [x, row_mask, meta, v, v, bias, bias, w, seed,
                f32(R, K), pq, f32(C, K), f32(C, K), f32(C, K, D), f32(B, K),
                B, R, D, L, 512, x.stride(0), 0.25]
    return [x, row_mask, meta, v, v, bias, bias, w, seed, pq,
            f32(R, K), f32(B, K), f32(B, K, D), f32(B, K, D), f32(B, K), f32(R, K),
            torch.empty(R, D, dtype=dt), torch.empty(R, GL, dtype=dt), f32(C, K * L + GL),
            B, R, D, L, 512, x.stride(0), 0.25]


def _variants():
    """(name, kind, dtype, D, L, K, gated, masked, tiles, constexpr flags, must_pipeline)."""
    from fastmil.kernels import attention_pool as k

    base = dict(ACT=0, DROPOUT=False, SAVE_PQ=False, LOAD_PQ=False, SINGLE=False, SAVED_PQ=False,
                HAS_GLSE=True, HAS_GS=True, NEED_DX=True, NEED_DPQ=True, NEED_DW=True,
                NEED_DB=True, PRECISION="ieee")
    # fwd_pq / bwd_pq read p and q (from a cuBLAS GEMM, or saved): no projection loop to
    # pipeline
    pq_flags = {"fwd_pq": dict(LOAD_PQ=True), "bwd_pq": dict(SAVED_PQ=True)}
    out = []
    for dt, gated, masked, K in itertools.product(DTYPES, (True, False), (True, False), (1, 4)):
        for kind in ("fwd", "fwd_pq", "bwd", "bwd_pq"):
            tiles = k.gpu_tiles(kind, DTYPES[dt], 1024, 256, K, gated)
            name = f"{kind} {dt} {'gated' if gated else 'plain'} " \
                   f"{'mask' if masked else 'nomask'} K={K} tiles={tiles}"
            flags = base | pq_flags.get(kind, {})
            out.append((name, kind, dt, 1024, 256, K, gated, masked, tiles, flags,
                        kind not in pq_flags))
    for kind, candidates in k.TILE_CANDIDATES.items():
        for tiles in candidates:
            out.append((f"{kind} bf16 gated nomask K=1 candidate tiles={tiles}", kind, "bf16",
                        1024, 256, 1, True, False, tiles, base | pq_flags.get(kind, {}),
                        kind not in pq_flags))
    for kind in ("fwd", "bwd"):
        tiles = k.gpu_tiles(kind, torch.float32, 1024, 256, 1, True)
        out.append((f"{kind} fp32 tf32 gated nomask K=1 tiles={tiles}", kind, "fp32", 1024, 256,
                    1, True, False, tiles, base | dict(PRECISION="tf32"), True))
        # the JIT's second variant: a row stride that is not a multiple of 16 elements (D=500,
        # MNIST-bags). Correct and spill-free, but its loads are not 16-byte aligned, so Triton
        # does not pipeline them: reported, not required.
        tiles = k.gpu_tiles(kind, torch.bfloat16, 500, 128, 1, True)
        out.append((f"{kind} bf16 gated nomask K=1 D=500 (row stride not a multiple of 16)",
                    kind, "bf16", 500, 128, 1, True, False, tiles, base, False))
    # every entry of a measured table: MEASURED_TILES, and the FASTMIL_TILES file's when set
    for key, tiles in {**k.MEASURED_TILES, **k._file_tiles()}.items():
        kind, cls, gated, D, L, K = key
        dt = "fp32" if cls == "fp32" else "bf16"
        out.append((f"{kind} {dt} {'gated' if gated else 'plain'} nomask K={K} D={D} L={L} "
                    f"measured tiles={tiles}", kind, dt, D, L, K, gated, False, tiles,
                    base | pq_flags.get(kind, {}), dt != "fp32" and kind not in pq_flags))
    extras = {
        "gelu+dropout+save": dict(ACT=2, DROPOUT=True, SAVE_PQ=True, SAVED_PQ=True),
        "one program per bag": dict(SINGLE=True),
        "frozen x": dict(NEED_DX=False, HAS_GLSE=False, HAS_GS=False),
        "relu, only dw": dict(ACT=1, NEED_DX=False, NEED_DPQ=False, NEED_DB=False),
    }
    for label, flags in extras.items():
        for kind in ("fwd", "bwd"):
            if kind == "fwd" and label in ("frozen x", "relu, only dw"):
                continue
            if kind == "bwd" and flags.get("SAVED_PQ"):
                kind = "bwd_pq"  # as the launcher picks: p and q read back, no GEMM to pipeline
            tiles = k.gpu_tiles(kind, torch.bfloat16, 1024, 256, 1, True)
            out.append((f"{kind} bf16 gated nomask K=1 {label}", kind, "bf16", 1024, 256, 1,
                        True, False, tiles, base | flags, kind != "bwd_pq"))
    # the other one-branch weighted sum of the forward reading p, q (DOT_WEIGHTED_SUM switched)
    other = not k.DOT_WEIGHTED_SUM
    for kind, dt, gated, masked in itertools.product(("fwd_pq",), DTYPES, (True, False),
                                                     (True, False)):
        tiles = k.gpu_tiles(kind, DTYPES[dt], 1024, 256, 1, gated)
        out.append((f"{kind} {dt} {'gated' if gated else 'plain'} "
                    f"{'mask' if masked else 'nomask'} K=1 sum by {'tl.dot' if other else 'FMA'} "
                    f"tiles={tiles}", kind, dt, 1024, 256, 1, gated, masked, tiles,
                    base | pq_flags.get(kind, {}) | dict(DOT_SUM=other), kind not in pq_flags))
    return out


def _cuobjdump(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of a cubin."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(item.split(":") for item in out.split("REG", 1)[1].split() if ":" in item)
    return int(out.split("REG:", 1)[1].split()[0]), int(fields["STACK"])


def compile_variant(variant, arch=90):
    """Compile one variant through the JIT; returns its report line and whether it passed."""
    name, kind, dt, D, L, K, gated, masked, tiles, flags, must_pipeline = variant
    from triton.runtime.driver import driver

    driver.set_active(_StandInDriver(arch))
    from fastmil.kernels import attention_pool as k

    block_n, block_d, block_l, num_warps, num_stages = tiles
    fn = k._fwd_kernel if kind.startswith("fwd") else k._bwd_kernel
    # the forward's weighted sum as the launcher picks it, unless the variant says
    consts = dict(K=K, HAS_MASK=masked, GATED=gated, HAS_BV=True, HAS_BU=gated, BLOCK_N=block_n,
                  BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=16,
                  DOT_SUM=k.dot_sum(K, flags["LOAD_PQ"])) | flags
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    name = f"sm_{arch} {name}"
    try:
        compiled = fn.warmup(*_args(kind, DTYPES[dt], D, L, K, gated, masked), grid=(1,),
                             num_warps=num_warps, num_stages=num_stages, **consts)
        regs, stack = _cuobjdump(compiled.asm["cubin"])
    except Exception as e:  # noqa: BLE001 - report every variant, then fail
        return f"{name}: FAILED {type(e).__name__}: {e}", False
    ptx = compiled.asm["ptx"]
    copies = ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk")
    in_flight = max((int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)),
                    default=None)
    problems = []
    if stack:
        problems.append("spills")
    if arch >= 90 and must_pipeline:
        # the projection loop (forward, and backward recompute) must overlap loads and MMAs
        if copies == 0:
            problems.append("no asynchronous copies")
        if in_flight == 0:  # None: no wgmma at all (fp32 without tf32 runs on CUDA cores)
            problems.append("every wgmma waited on at once")
    line = (f"{name}: registers {regs}, stack {stack} B, shared {compiled.metadata.shared} B, "
            f"async copies {copies}, wgmma in flight {in_flight}"
            + (f"  <- {', '.join(problems)}" if problems else ""))
    return line, not problems


def _compile_merge(arch):
    """(report line, passed) of the merge kernel at the launcher's narrowest and widest D
    blocks, one and four branches."""
    from triton.runtime.driver import driver

    driver.set_active(_StandInDriver(arch))
    from fastmil.kernels import attention_pool as k

    f32 = torch.empty(64, 4, 1024, dtype=torch.float32)
    meta = torch.empty(80, dtype=torch.int64)
    out = []
    for K, block_d in itertools.product((1, 4), (32, 256)):
        name = f"sm_{arch} merge K={K} BLOCK_D={block_d}"
        try:
            compiled = k._merge_kernel.warmup(f32, f32, f32, meta, f32, f32, 4, 64, 1024, K=K,
                                              BLOCK_C=32, BLOCK_D=block_d, grid=(1,),
                                              num_warps=4)
            regs, stack = _cuobjdump(compiled.asm["cubin"])
        except Exception as e:  # noqa: BLE001
            out.append((f"{name}: FAILED {type(e).__name__}: {e}", False))
            continue
        out.append((f"{name}: registers {regs}, stack {stack} B"
                    + ("  <- spills" if stack else ""), not stack))
    return out


def main(arch: int = 90) -> int:
    variants = _variants()
    workers = max(1, min(len(variants), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(compile_variant, variants, [arch] * len(variants)))
    results += _compile_merge(arch)
    failures = 0
    for line, ok in results:
        print(line)
        failures += not ok
    print(f"{len(results)} variants, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
