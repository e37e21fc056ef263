"""Compile fastmil's Triton kernels for an NVIDIA GPU ahead of time, without a GPU, exactly as
the JIT would compile them at the first launch.

    python tests/aot_compile.py [ARCH]      (ARCH: 90 for Hopper, the default; 80 for Ampere)

Each variant is compiled through ``JITFunction.warmup`` with real (CPU) arguments against a
stand-in driver that reports an sm_ARCH GPU: the JIT's own binder then applies its own
specialization (16-byte-aligned pointers, integers divisible by 16, ``do_not_specialize``), so the
program checked here is the program that runs. Triton's full NVIDIA pipeline runs down to a
cubin (ptxas included). One line per variant: registers, stack (register spills) and shared
memory. It exits 1 if a variant fails to compile or spills. Run with TRITON_INTERPRET unset.

Variants: every dtype × gating × mask × branch count with the default tiles, forward and
backward; every candidate tile of ``TILE_CANDIDATES`` on the key shape; every entry of
``MEASURED_TILES``; a row stride that is not a multiple of 16 elements (the JIT's second
variant); the optional paths (gelu, dropout, one program per bag, z in fp32 beside x's dtype, a
backward for frozen x, one that forms only dw, TF32, the one-branch weighted sum by FMA); the
merge kernel and the partial sums.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from standin_driver import StandInDriver

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _args(kind, dt, D, L, K, gated, masked, R=4096, B=4):
    """Arguments of one launch as the launchers pass them (CPU tensors stand in for CUDA ones:
    the binder looks only at dtypes, alignment and integer values)."""
    x = torch.empty(R, D, dtype=dt)
    f32 = lambda *s: torch.empty(*s, dtype=torch.float32)  # noqa: E731
    meta = torch.empty(4 * B + 64, dtype=torch.int64)
    GL = 2 * L if gated else L
    bias = torch.empty(GL, dtype=dt)
    w = torch.empty(K, L, dtype=dt)
    seed = torch.empty(2, dtype=torch.int64)
    row_mask = torch.empty(R, dtype=torch.bool) if masked else x
    pq = torch.empty(R, GL, dtype=dt)
    C = 64
    strides = [x.stride(0), x.stride(1), bias.stride(0), w.stride(0), w.stride(1)]
    if kind == "fwd":
        return [x, pq, row_mask, meta, bias, w, seed,
                f32(R, K), torch.empty(B, K, D, dtype=dt), f32(B, K, D), f32(B, K), f32(C, K),
                f32(C, K), f32(C, K, D), B, R, D, L, 512, 0.25, *strides]
    dz = torch.empty(B, K, D, dtype=dt)
    return [x, pq, row_mask, meta, bias, w, seed,
            f32(R, K), f32(B, K), f32(B, K, D), dz, f32(B, K), f32(R, K),
            torch.empty(R, D, dtype=dt), torch.empty(R, GL, dtype=dt), f32(C, K * L + GL),
            B, R, D, L, 512, 0.25, *strides, *dz.stride(), K, 1, K, 1]


def _variants():
    """(name, kind, dtype, D, L, K, gated, masked, tiles, constexpr flags)."""
    from fastmil.kernels import config

    base = dict(ACT=0, DROPOUT=False, SINGLE=False, STORE_Z32=False, FMA_SUM=False,
                PRECISION="ieee", HAS_DZ=True, HAS_GLSE=True, HAS_GS=True, NEED_DH0=True,
                NEED_DPQ=True, NEED_DW=True, NEED_DB=True)

    def tile(kind, dt, D, L, K, gated, chosen=None, dropout=False):
        """The launchers' tiles on CUDA (BLOCK_N, BLOCK_D, BLOCK_L, BLOCK_K, warps, stages):
        the table's, or ``chosen`` (a candidate or measured tile) in its place."""
        opts = config.KernelOptions(tiles={kind: chosen}) if chosen else None
        return config.tiles(kind, DTYPES[dt], D, L, K, gated, True, opts, dropout=dropout)

    out = []
    for dt, gated, masked, K in itertools.product(DTYPES, (True, False), (True, False), (1, 4)):
        for kind in ("fwd", "bwd"):
            tiles = tile(kind, dt, 1024, 256, K, gated)
            name = f"{kind} {dt} {'gated' if gated else 'plain'} " \
                   f"{'mask' if masked else 'nomask'} K={K} tiles={tiles}"
            out.append((name, kind, dt, 1024, 256, K, gated, masked, tiles, base))
    for kind, candidates in config.TILE_CANDIDATES.items():
        for chosen in candidates:
            tiles = tile(kind, "bf16", 1024, 256, 1, True, chosen)
            out.append((f"{kind} bf16 gated nomask K=1 candidate tiles={tiles}", kind, "bf16",
                        1024, 256, 1, True, False, tiles, base))
    for key, chosen in config.MEASURED_TILES.items():
        kind, cls, gated, D, L, K = key
        dt = "fp32" if cls == "fp32" else "bf16"
        tiles = tile(kind, dt, D, L, K, gated, chosen)
        out.append((f"{kind} {dt} {'gated' if gated else 'plain'} nomask K={K} D={D} L={L} "
                    f"measured tiles={tiles}", kind, dt, D, L, K, gated, False, tiles, base))
    extras = {
        "gelu+dropout": ("both", dict(ACT=2, DROPOUT=True)),
        "one program per bag, z32": ("fwd", dict(SINGLE=True, STORE_Z32=True)),
        "merge path, z32": ("fwd", dict(STORE_Z32=True)),
        "frozen x": ("bwd", dict(NEED_DH0=False, HAS_GLSE=False, HAS_GS=False)),
        "relu, only dw": ("bwd", dict(ACT=1, NEED_DH0=False, NEED_DPQ=False, NEED_DB=False)),
        "no dz (only the scores used)": ("bwd", dict(HAS_DZ=False, NEED_DH0=False)),
    }
    for label, (kinds, flags) in extras.items():
        for kind in ("fwd", "bwd") if kinds == "both" else (kinds,):
            tiles = tile(kind, "bf16", 1024, 256, 1, True, dropout=flags.get("DROPOUT", False))
            out.append((f"{kind} bf16 gated nomask K=1 {label} tiles={tiles}", kind, "bf16",
                        1024, 256, 1, True, False, tiles, base | flags))
    for kind, dt in itertools.product(("fwd", "bwd"), DTYPES):  # dropout, masked, K=4
        tiles = tile(kind, dt, 1024, 256, 4, True, dropout=True)
        out.append((f"{kind} {dt} gated mask K=4 dropout tiles={tiles}", kind, dt, 1024, 256, 4,
                    True, True, tiles, base | dict(DROPOUT=True)))
    for kind in ("fwd", "bwd"):
        out.append((f"{kind} fp32 tf32 gated nomask K=1", kind, "fp32", 1024, 256, 1, True,
                    False, tile(kind, "fp32", 1024, 256, 1, True), base | dict(PRECISION="tf32")))
        # the JIT's second variant: a row stride that is not a multiple of 16 elements (D=500,
        # MNIST-bags): its loads are not 16-byte aligned
        out.append((f"{kind} bf16 gated nomask K=1 D=500 (row stride not a multiple of 16)",
                    kind, "bf16", 500, 128, 1, True, False, tile(kind, "bf16", 500, 128, 1, True),
                    base))
    # the one-branch weighted sum by FMA (kernel_options(fma_sum=True))
    for dt, gated, masked in itertools.product(DTYPES, (True, False), (True, False)):
        tiles = tile("fwd", dt, 1024, 256, 1, gated)
        out.append((f"fwd {dt} {'gated' if gated else 'plain'} {'mask' if masked else 'nomask'} "
                    f"K=1 sum by FMA tiles={tiles}", "fwd", dt, 1024, 256, 1, gated, masked,
                    tiles, base | dict(FMA_SUM=True)))
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


def _report(name, compiled):
    """(report line, passed) of one compiled kernel: registers, spills, shared memory."""
    regs, stack = _cuobjdump(compiled.asm["cubin"])
    line = (f"{name}: registers {regs}, stack {stack} B, shared {compiled.metadata.shared} B"
            + ("  <- spills" if stack else ""))
    return line, not stack


def compile_variant(variant, arch=90):
    """Compile one variant through the JIT; returns its report line and whether it passed."""
    name, kind, dt, D, L, K, gated, masked, tiles, flags = variant
    from triton.runtime.driver import driver

    driver.set_active(StandInDriver(arch))
    from fastmil.kernels import attention_pool as k

    block_n, block_d, block_l, block_k, num_warps, num_stages = tiles
    fn = k._fwd_kernel if kind == "fwd" else k._bwd_kernel
    consts = dict(K=K, HAS_MASK=masked, GATED=gated, HAS_BIAS=True, BLOCK_N=block_n,
                  BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_K=block_k) | flags
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    try:
        compiled = fn.warmup(*_args(kind, DTYPES[dt], D, L, K, gated, masked), grid=(1,),
                             num_warps=num_warps, num_stages=num_stages, **consts)
        return _report(f"sm_{arch} {name}", compiled)
    except Exception as e:  # noqa: BLE001 - report every variant, then fail
        return f"sm_{arch} {name}: FAILED {type(e).__name__}: {e}", False


def _compile_small_kernels(arch):
    """(report line, passed) of the merge kernel at the launcher's narrowest and widest D
    blocks, one and four branches, with and without z in fp32, and of the partial sums."""
    from triton.runtime.driver import driver

    driver.set_active(StandInDriver(arch))
    from fastmil.kernels import attention_pool as k

    f32 = torch.empty(64, 4, 1024, dtype=torch.float32)
    bf16 = f32.to(torch.bfloat16)
    meta = torch.empty(80, dtype=torch.int64)
    part, dw = torch.empty(64, 2048, dtype=torch.float32), torch.empty(256, dtype=torch.bfloat16)
    kernels = []  # (name, kernel, arguments, options)
    for K, block_d, z32 in itertools.product((1, 4), (32, 256), (False, True)):
        kernels.append((f"merge K={K} BLOCK_D={block_d} z32={z32}", k._merge_kernel,
                        (f32, f32, f32, meta, bf16, f32, f32, 4, 64, 1024),
                        dict(K=K, STORE_Z32=z32, BLOCK_C=32, BLOCK_D=block_d)))
    for need_dw, need_db in ((True, True), (True, False), (False, True)):
        kernels.append((f"partial sums dw={need_dw} db={need_db}", k._sum_kernel,
                        (part, dw, dw, dw, 64, 256, 768, 1),
                        dict(NEED_DW=need_dw, NEED_DB=need_db, NEED_DBW=True, BLOCK_C=16,
                             BLOCK_J=128)))
    for K in (1, 4):
        kernels.append((f"attention K={K}", k._attention_kernel,
                        (part, part, meta, part, 4, 4096, 512),
                        dict(K=K, BLOCK_N=128, BLOCK_K=max(1, K))))
    out = []
    for name, kernel, args, consts in kernels:
        name = f"sm_{arch} {name}"
        try:
            out.append(_report(name, kernel.warmup(*args, grid=(1,), num_warps=4, **consts)))
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            out.append((f"{name}: FAILED {type(e).__name__}: {e}", False))
    return out


def main(arch: int = 90) -> int:
    variants = _variants()
    workers = max(1, min(len(variants), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(compile_variant, variants, [arch] * len(variants)))
    results += _compile_small_kernels(arch)
    failures = 0
    for line, ok in results:
        print(line)
        failures += not ok
    print(f"{len(results)} variants, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
