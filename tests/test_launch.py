"""fastmil's direct launcher makes exactly the launches ``JITFunction.run`` would make.

:class:`fastmil.kernels.launch.Launcher` skips Triton's per-launch Python once a specialization
has been seen. Here the kernels are compiled for sm_90 through Triton's NVIDIA pipeline against
a stand-in driver (``tests/standin_driver.py``: no GPU needed) and every launch is recorded: for
arguments that differ in what Triton specializes on (pointer alignment, dtypes, integer
divisibility and width, constexprs, launch options), the direct launch must use the compiled
kernel the JIT picks for those arguments and hand the launcher the same arguments; arguments
that Triton does not specialize on (``do_not_specialize``) must reuse the kernel. It runs in a
fresh process, because the kernels must be decorated with TRITON_INTERPRET unset.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env

triton = pytest.importorskip("triton", reason="needs triton")

SCRIPT = r'''
import weakref

import torch
from triton.runtime.driver import driver
import standin_driver as sd

driver.set_active(sd.StandInDriver(90))
from fastmil.kernels import attention_pool as k

def launches(launcher, grid, args, kwargs):
    """(kernel, recorded launch) of a launch through fastmil's launcher, once the
    specialization is cached (the third call), and of the same launch through the JIT."""
    for _ in range(3):
        mine = launcher[grid](*args, **kwargs)
    ours = sd.LAUNCHES[-1]
    jit = launcher.fn[grid](*args, **kwargs)
    theirs = sd.LAUNCHES[-1]
    return mine, ours, jit, theirs

def same(a, b):
    """Two recorded launches: the same kernel, grid, stream and arguments (tensors: the same
    objects, recorded by weak reference)."""
    deref = lambda v: v() if isinstance(v, weakref.ref) else v  # noqa: E731
    return a[:3] == b[:3] and len(a[3]) == len(b[3]) and all(
        deref(x) is deref(y) or (not isinstance(x, weakref.ref) and x == y)
        for x, y in zip(a[3], b[3]))

f32 = torch.empty(4096, dtype=torch.float32)
bf16 = torch.empty(4096, dtype=torch.bfloat16)
part = torch.empty(64 * 768, dtype=torch.float32)
base = (part, f32, f32, f32, 64, 256, 768, 1)
opts = dict(NEED_DW=True, NEED_DB=True, NEED_DBW=True, BLOCK_C=16, BLOCK_J=128, num_warps=4)
scenarios = {
    "base": (base, opts),
    "chunk count (not specialized)": ((part, f32, f32, f32, 63, 256, 768, 1), opts),
    "misaligned pointer": ((part, f32[1:], f32, f32, 64, 256, 768, 1), opts),
    "dtype": ((part, bf16, bf16, bf16, 64, 256, 768, 1), opts),
    "integer not divisible by 16": ((part, f32, f32, f32, 64, 250, 762, 1), opts),
    "64-bit integer": ((part, f32, f32, f32, 64, 256, 2 ** 33, 1), opts),
    "integer 1 or not": ((part, f32, f32, f32, 64, 256, 768, 4), opts),
    "constexpr": (base, opts | dict(NEED_DB=False)),
    "num_warps": (base, opts | dict(num_warps=8)),
}
kernels = {}
for name, (args, kwargs) in scenarios.items():
    mine, ours, jit, theirs = launches(k._sum_kernel, (6,), args, kwargs)
    assert mine is jit, name  # the compiled kernel the JIT picks for these arguments
    assert same(ours, theirs), (name, ours, theirs)
    kernels[name] = mine
distinct = {n: kernels[n] is not kernels["base"] for n in scenarios if n != "base"}
assert distinct == {n: n != "chunk count (not specialized)" for n in distinct}, distinct

# the forward kernel as its launcher calls it (stand-ins for absent pointers, a float, bools,
# None), one program per bag and the general path with its merge
x = torch.randn(300, 64)
w = torch.randn(1, 32)
from fastmil.kernels.config import KernelOptions
opts = KernelOptions()
captured, jit_calls = [], []
fwd = k._fwd_kernel
real_launch, real_fn = fwd.launch, fwd.fn

class JitSpy:
    def __getattr__(self, name):
        return getattr(real_fn, name)

    def __getitem__(self, grid):
        return lambda *a, **kw: jit_calls.append(grid) or real_fn[grid](*a, **kw)

fwd.launch = lambda grid, args, kwargs: captured.append((grid, args, kwargs)) or real_launch(
    grid, args, kwargs)
for offsets in ([0, 5, 300], [0, 100, 250, 300]):
    meta, single = k.host_chunk_map(torch.tensor(offsets).numpy(), 128, True)
    B = len(offsets) - 1
    layout = k.Layout.of(torch.from_numpy(meta), B, 128, single)
    pq = x @ torch.randn(64, 64)
    for _ in range(2):  # compiled, then cached
        k.forward(x, pq, None, layout, None, w, None, 0.0, 0, True, True, opts)
    fwd.fn, jit_calls[:] = JitSpy(), []
    k.forward(x, pq, None, layout, None, w, None, 0.0, 0, True, True, opts)  # direct
    fwd.fn = real_fn
    assert not jit_calls, "a cached forward went through the JIT"
    ours = sd.LAUNCHES[-1] if single else sd.LAUNCHES[-2]  # (the merge launches last)
    grid, args, kwargs = captured[-1]
    real_fn[grid](*args, **kwargs)
    assert same(ours, sd.LAUNCHES[-1]), (offsets, ours, sd.LAUNCHES[-1])
print("ok")
'''


def test_direct_launches_match_the_jit(tmp_path):
    env = child_env(str(Path(__file__).parent), compiled=True)
    script = tmp_path / "launch_check.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=900, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), \
        out.stdout[-2000:] + out.stderr[-4000:]
