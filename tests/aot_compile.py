"""Compile fastmil's Triton kernels for an NVIDIA GPU ahead of time, without a GPU.

    python tests/aot_compile.py [ARCH]      (ARCH: 90 for Hopper, the default; 80 for Ampere)

For each kernel, dtype, gating, masking and branch count it runs Triton's full NVIDIA pipeline
down to a cubin (ptxas included) with the tiles the launchers use on CUDA, and prints one line per
variant: registers, stack (register spills) and shared memory. It exits 1 if a variant fails to
compile or spills. The interpreter, which CI otherwise uses, checks numbers but not that the
kernels compile for a GPU: this closes that gap. Run with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastmil.kernels import attention_pool as k


def _pointer_types(dt):
    f32 = ["s_ptr", "part_m_ptr", "part_l_ptr", "part_acc_ptr", "lse_ptr", "dz_ptr", "delta_ptr",
           "gs_ptr", "part_dw_ptr", "z_ptr"]
    i64 = ["starts_ptr", "lengths_ptr", "chunk_bag_ptr", "first_chunk_ptr", "num_chunks_ptr"]
    xdt = ["x_ptr", "v_ptr", "u_ptr", "bv_ptr", "bu_ptr", "w_ptr", "dh0_ptr", "dpq_ptr"]
    types = {n: "*fp32" for n in f32} | {n: "*i64" for n in i64} | {n: f"*{dt}" for n in xdt}
    types["row_mask_ptr"] = "*i1"
    return types


def _compile(fn, dt, consts, num_warps, target):
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    types = _pointer_types(dt)
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                          target=target, options={"num_warps": num_warps})


def _resources(compiled):
    """(registers, stack bytes) of a compiled kernel, read from its cubin with cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    fields = dict(item.split(":") for item in out.split("REG", 1)[1].split() if ":" in item)
    return int(out.split("REG:", 1)[1].split()[0]), int(fields["STACK"])


def main(arch: int = 90) -> int:
    target = GPUTarget("cuda", arch, 32)
    failures = 0
    for dt, gated, masked, K in itertools.product(("bf16", "fp16", "fp32"), (True, False),
                                                  (True, False), (1, 4)):
        for kind, fn in (("fwd", k._fwd_kernel), ("bwd", k._bwd_kernel)):
            block_n, block_d, block_l, num_warps = k.GPU_TILES[kind]
            consts = dict(K=K, HAS_MASK=masked, GATED=gated, HAS_BV=True, HAS_BU=gated,
                          HAS_GS=True, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l,
                          BLOCK_K=16, PRECISION="tf32" if dt == "fp32" else "ieee")
            name = f"sm_{arch} {kind} {dt} {'gated' if gated else 'plain'} " \
                   f"{'mask' if masked else 'nomask'} K={K}"
            try:
                compiled = _compile(fn, dt, consts, num_warps, target)
                regs, stack = _resources(compiled)
            except Exception as e:  # noqa: BLE001 - report every variant, then fail
                print(f"{name}: FAILED {type(e).__name__}: {e}")
                failures += 1
                continue
            ok = stack == 0
            failures += not ok
            print(f"{name}: registers {regs}, stack {stack} B, shared {compiled.metadata.shared} B"
                  f"{'' if ok else '  <- spills'}")
    consts = dict(K=4, BLOCK_K=16, BLOCK_D=256)
    _compile(k._merge_kernel, "fp32", consts, 4, target)
    print(f"sm_{arch} merge: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
