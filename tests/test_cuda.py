"""CUDA-only checks of the triton backend: a training step never synchronises the host with the
GPU, a CUDA graph of forward + backward replays to the eager results, and offsets on the host are
still checked with a clear error.

* ``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising call torch knows of
  (``.item()``, ``bool(tensor)``, ``nonzero``, a blocking copy to the host, ...) raise. It does
  not see a copy from pageable host memory, before which the driver may wait for the stream to
  drain: the chunk map built on the host (offsets on the host, as ``fastmil.collate`` makes
  them, or unmasked padding) goes from pinned memory, and a step queued behind a long GPU kernel
  must return to the host long before that kernel ends.
* A CUDA graph capture fails on any synchronisation and on copies from pageable memory, so the
  graph tests keep every input on the GPU (offsets too) and check replays on new values against
  eager calls.

Every test here skips without a CUDA GPU.
"""

from __future__ import annotations

import time

import pytest
import torch
from conftest import assert_close, call, make_layout, make_weights

import fastmil

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
D, L = 48, 32
LENGTHS = [3, 0, 17, 1, 40]


def _inputs(layout, dtype, *, grad_x=True, seed=0):
    """x, layout kwargs, weights (leaves requiring grad) and dz, all on the GPU except the
    offsets of ``packed_cpu_offsets``."""
    torch.manual_seed(seed)
    base = "padded_mask" if layout == "padded_mask" else "packed"
    x, kw = make_layout(base, LENGTHS, D, dtype, device="cuda")
    if layout == "packed_cpu_offsets":
        kw["offsets"] = kw["offsets"].cpu()
    x = x.detach().requires_grad_(grad_x)
    weights = make_weights(D, L, None, dtype=dtype, requires_grad=True, device="cuda")
    dz = torch.randn(len(LENGTHS), D, device="cuda").to(dtype)
    return x, kw, weights, dz


def _leaves(x, weights):
    return [t for t in [x, *weights.values()] if t is not None and t.requires_grad]


def _step(x, kw, weights, dz, backend="triton", **options):
    """One training step's worth of attention pooling: forward, a loss, backward."""
    for t in _leaves(x, weights):
        t.grad = None
    out = call(fastmil.attention_pool, x, weights, backend=backend, **kw, **options)
    z = out[0] if isinstance(out, tuple) else out
    loss = (z.float() * dz.float()).sum()
    if isinstance(out, tuple):  # the attention feeds the loss too (e.g. an attention regulariser)
        loss = loss + out[1].square().sum()
    loss.backward()
    return z


def _reference_step(x, kw, weights, dz, **options):
    """The same step on the torch backend in float32 (gradients of x and the weights)."""
    kw32 = {k: v.cuda() for k, v in kw.items()}
    x32 = x.detach().float().requires_grad_(x.requires_grad)
    w32 = {n: None if t is None else t.detach().float().requires_grad_() for n, t in
           weights.items()}
    options = {k: v for k, v in options.items() if k != "recompute"}
    out = call(fastmil.attention_pool, x32, w32, backend="torch", **kw32, **options)
    z = out[0] if isinstance(out, tuple) else out
    loss = (z * dz.float()).sum() + (out[1].square().sum() if isinstance(out, tuple) else 0)
    loss.backward()
    return z, x32, w32


SYNC_CASES = [
    pytest.param("packed_cpu_offsets", torch.float32, True, {}, id="packed-cpu-offsets-fp32"),
    pytest.param("packed_cpu_offsets", torch.bfloat16, True, {}, id="packed-cpu-offsets-bf16"),
    pytest.param("packed_cuda_offsets", torch.float32, True, {}, id="packed-cuda-offsets-fp32"),
    pytest.param("packed_cuda_offsets", torch.bfloat16, True, {}, id="packed-cuda-offsets-bf16"),
    pytest.param("padded_mask", torch.float32, True, {}, id="padded-mask-fp32"),
    pytest.param("padded_mask", torch.bfloat16, True, {}, id="padded-mask-bf16"),
    pytest.param("packed_cpu_offsets", torch.bfloat16, False, {}, id="frozen-x-bf16"),
    pytest.param("packed_cuda_offsets", torch.bfloat16, True, {"recompute": False},
                 id="saved-projections-bf16"),
    pytest.param("packed_cpu_offsets", torch.float32, True, {"return_attention": True},
                 id="attention-packed-fp32"),
    pytest.param("padded_mask", torch.float32, True, {"return_attention": True},
                 id="attention-padded-fp32"),
]


@pytest.mark.parametrize("layout,dtype,grad_x,options", SYNC_CASES)
def test_training_step_never_syncs(layout, dtype, grad_x, options):
    x, kw, weights, dz = _inputs(layout, dtype, grad_x=grad_x)
    for _ in range(2):  # compile the kernels and warm the allocator outside the check
        _step(x, kw, weights, dz, **options)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z = _step(x, kw, weights, dz, **options)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    # and the step computed the right thing
    z_ref, x_ref, w_ref = _reference_step(x, kw, weights, dz, **options)
    assert_close(z, z_ref, dtype, what="z")
    if grad_x:
        assert_close(x.grad, x_ref.grad, dtype, what="dx")
    else:
        assert x.grad is None
    for name, t in weights.items():
        if t is not None and name != "score_bias":
            assert_close(t.grad, w_ref[name].grad, dtype, what=f"d {name}")


@pytest.mark.parametrize("layout", ["packed_cpu_offsets", "padded"])
def test_step_with_host_chunk_map_does_not_wait_for_the_gpu(layout):
    """A step whose chunk map is built on the host, queued behind a GPU kernel that spins for
    about 0.2 s: the host gets the step back in a fraction of that (no wait for the stream to
    drain). Not a speed test: a wait would take the whole spin, the step itself takes about a
    millisecond of host time."""
    if layout == "padded":
        torch.manual_seed(0)
        x = torch.randn(4, 9, D, device="cuda", requires_grad=True)
        kw, weights = {}, make_weights(D, L, None, requires_grad=True, device="cuda")
        dz = torch.randn(4, D, device="cuda")
    else:
        x, kw, weights, dz = _inputs(layout, torch.float32)
    for _ in range(2):  # compile the kernels and warm both allocators outside the check
        _step(x, kw, weights, dz)
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(400_000_000)  # clock cycles: about 0.2 s at an H100's 1.98 GHz
    end.record()
    t0 = time.perf_counter()
    z = _step(x, kw, weights, dz)
    host_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    spin_s = begin.elapsed_time(end) / 1e3
    assert spin_s > 0.05, f"the spinning kernel took only {spin_s:.3f} s: no test"
    assert host_s < spin_s / 4, (f"the step held the host {host_s:.3f} s behind a "
                                 f"{spin_s:.3f} s GPU kernel: it waited for the stream")
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["packed_cuda_offsets", "padded_mask"])
def test_cuda_graph_replay_matches_eager(layout, dtype):
    x, kw, weights, dz = _inputs(layout, dtype)
    leaves = _leaves(x, weights)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up on the capture stream (compiles, cuBLAS workspace)
        for _ in range(3):
            _step(x, kw, weights, dz)
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:  # gradients allocated during capture live in the graph's pool
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        z_static = _step(x, kw, weights, dz)
    grads_static = [t.grad for t in leaves]

    for seed in (1, 2):  # replay on new values copied into the captured inputs
        x_new, _, _, dz_new = _inputs(layout, dtype, seed=seed)
        with torch.no_grad():
            x.copy_(x_new)
            dz.copy_(dz_new)
        graph.replay()
        torch.cuda.synchronize()
        x_eager = x_new.detach().clone().requires_grad_()
        w_eager = {n: None if t is None else t.detach().clone().requires_grad_()
                   for n, t in weights.items()}
        z_eager = _step(x_eager, kw, w_eager, dz_new)
        assert_close(z_static, z_eager, dtype, what=f"replayed z (seed {seed})")
        for t, e in zip(grads_static, _leaves(x_eager, w_eager), strict=True):
            assert_close(t, e.grad, dtype, what=f"replayed gradient (seed {seed})")


@pytest.mark.parametrize("bad,message", [
    ([1, 3, 61], "must start at 0"),
    ([0, 30, 20, 61], "non-decreasing"),
    ([0, 3, 60], "must end at x.shape"),
], ids=["start", "decreasing", "end"])
def test_bad_cpu_offsets_with_cuda_x_raise_value_error(bad, message):
    x = torch.randn(61, D, device="cuda")
    weights = make_weights(D, L, None, device="cuda")
    offsets = torch.tensor(bad)  # on the host, as fastmil.collate makes them
    with pytest.raises(ValueError, match=message):
        call(fastmil.attention_pool, x, weights, offsets=offsets, backend="triton")
    with pytest.raises(ValueError, match=message):  # auto dispatches CUDA x to triton
        call(fastmil.attention_pool, x, weights, offsets=offsets)


@pytest.mark.parametrize("bad,message", [([0, 10, 5, 61], "non-decreasing"),
                                         ([0, 10, 70], "must end at"), ([2, 10, 61], "start at 0")])
def test_bad_gpu_offsets_on_the_torch_backend_raise_value_error(bad, message):
    """The torch backend's CUDA kernels would fail on bad offsets (a device-side assert that
    poisons the process): it checks offsets on the GPU first."""
    x = torch.randn(61, D, device="cuda")
    weights = make_weights(D, L, None, device="cuda")
    with pytest.raises(ValueError, match=message):
        call(fastmil.attention_pool, x, weights, offsets=torch.tensor(bad, device="cuda"),
             backend="torch")
    torch.cuda.synchronize()  # and the device is fine afterwards


def test_torch_backend_with_cpu_offsets_never_syncs():
    """CPU offsets are checked on the host; the torch backend then needs no sync either."""
    x, kw, weights, dz = _inputs("packed_cpu_offsets", torch.float32)
    for _ in range(2):
        _step(x, kw, weights, dz, backend="torch")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        z = _step(x, kw, weights, dz, backend="torch")
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    z_ref, _, _ = _reference_step(x, kw, weights, dz)
    assert_close(z, z_ref, torch.float32, what="z")
