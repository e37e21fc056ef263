"""The Triton kernels compile for NVIDIA GPUs as the JIT compiles them, without register spills
(no GPU needed).

The interpreter tests check the kernels' numbers; this checks that the same source goes through
Triton's NVIDIA compiler (down to ptxas), with the JIT's own specialization and the tiles the
launchers use on CUDA. It runs tests/aot_compile.py in a fresh process, because the kernels must
be decorated with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

triton = pytest.importorskip("triton", reason="needs triton")


def _has_nvidia_toolchain() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    tools = Path(nvidia.__file__).parent / "bin"
    return (tools / "ptxas").exists() and (tools / "cuobjdump").exists()


@pytest.mark.skipif(not _has_nvidia_toolchain(),
                    reason="triton's NVIDIA backend (ptxas, cuobjdump) is not installed here")
def test_kernels_compile_for_hopper_without_spills():
    env = child_env(compiled=True)
    script = Path(__file__).with_name("aot_compile.py")
    out = subprocess.run([sys.executable, str(script), "90"], capture_output=True, text=True,
                         env=env, timeout=600)
    report = out.stdout + out.stderr[-3000:]
    assert out.returncode == 0, report
    total = int(report.rsplit(" variants, 0 failed", 1)[0].rsplit("\n", 1)[-1])
    # every variant reports its resources: all spill-free; the merge kernel at eight shapes
    assert report.count("stack 0 B") == total >= 48, report
    assert "<-" not in report and report.count("sm_90 merge K=") == 8, report
