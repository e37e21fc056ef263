"""The fused Triton kernels (backend="triton") against the reference.

On a CUDA machine these run the compiled kernels on the GPU (bf16 included); elsewhere they run the
same kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py before
Triton is first imported), with small shapes because the interpreter is slow. Every output buffer
is poisoned with NaN before each launch, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import pytest
import torch
from conftest import OpCounter, assert_close, call, make_layout, make_weights

import fastmil
from fastmil.reference import attention_pool_reference

triton = pytest.importorskip("triton", reason="the Triton kernel tests need triton installed")
kernels = pytest.importorskip("fastmil.kernels.attention_pool")
from fastmil.kernels import config  # noqa: E402
from fastmil.kernels.config import kernel_options  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# the interpreter has no bfloat16 arithmetic
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _poison():
    with kernel_options(poison=True):
        yield


@pytest.fixture(params=["host-single", "general"])
def chunk_mode(request):
    """The two launch paths: one program per bag without a merge (lengths on the host, every bag
    within a chunk), and the general chunk map with merges, with chunks of 16 rows so that
    small bags span several programs. Pass the layout's kwargs through
    :func:`_chunk_mode_kwargs`."""
    if request.param == "general":
        with kernel_options(single=False, chunk_rows=16):
            yield request.param
    else:
        yield request.param


def _chunk_mode_kwargs(kwargs, chunk_mode):
    """The layout's kwargs for ``chunk_mode``: "host-single" takes its path only with the lengths
    on the host, so packed offsets go on the CPU there (x stays on DEVICE; a mask stays on x's
    device, where the lengths are then derived, and takes the general path)."""
    if chunk_mode == "host-single" and "offsets" in kwargs:
        return kwargs | {"offsets": kwargs["offsets"].cpu()}
    return kwargs


def _run(fn, x, weights, *, seed=1, **kwargs):
    """z, attention and the gradients of a random loss on both w.r.t. x and every weight."""
    x = x.detach().clone().requires_grad_(True)
    leaves = {n: (None if t is None else t.detach().clone().requires_grad_(True))
              for n, t in weights.items()}
    z, a = call(fn, x, leaves, return_attention=True, **kwargs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    gz = torch.randn(z.shape, generator=g).to(z.device)
    ga = torch.randn(a.shape, generator=g).to(a.device)
    if "mask" in kwargs:  # attention at masked slots is exactly 0 and carries no gradient
        ga = ga * kwargs["mask"].reshape(*kwargs["mask"].shape, *([1] * (a.dim() - 2)))
    loss = (z.float() * gz).sum() + (a.float() * ga).sum()
    inputs = [x] + [t for t in leaves.values() if t is not None]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = ["x"] + [n for n, t in leaves.items() if t is not None]
    return z, a, dict(zip(names, grads, strict=True))


def _check(x, weights, dtype, options=None, **kwargs):
    """fastmil's triton backend (with ``options``: recompute, activation) against the float64
    reference: z, the attention and every gradient."""
    options = options or {}
    z, a, g = _run(fastmil.attention_pool, x, weights, backend="triton", **options, **kwargs)
    if "activation" in options:
        kwargs = kwargs | {"activation": options["activation"]}
    zr, ar, gr = _run(attention_pool_reference, x.double(),
                      {n: None if t is None else t.double() for n, t in weights.items()}, **kwargs)
    assert z.dtype == x.dtype and a.dtype == torch.float32
    assert_close(z, zr, dtype, what="z")
    assert_close(a, ar, dtype, what="attention")
    for name, grad in g.items():
        if name == "score_bias":  # softmax ignores a shift: zero up to rounding
            assert_close(grad, torch.zeros_like(gr[name]), dtype, what="d score_bias")
            continue
        ref = torch.zeros_like(gr[name]) if gr[name] is None else gr[name]
        assert grad is not None, f"no gradient for {name}"
        assert_close(grad, ref, dtype, what=f"d {name}")


CASES = [
    ("packed", [3, 0, 1, 33, 70]),
    ("padded_mask", [3, 0, 1, 33, 12]),
    ("padded_holes", [3, 0, 1, 33, 12]),
    ("padded", [9, 9]),
    ("single", [41]),
]


@pytest.mark.parametrize("layout,lengths", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(layout, lengths, K, gated, bias, chunk_mode):
    """Every layout on both launch paths; p and q saved on one (the default), made again by the
    backward (recompute=True) on the other (the battery crosses the rest)."""
    D, L = 40, 24  # neither a power of two
    x, kw = make_layout(layout, lengths, D, device=DEVICE)
    w = make_weights(D, L, K, gated, bias, device=DEVICE)
    _check(x, w, torch.float32, {"recompute": chunk_mode == "general"},
           **_chunk_mode_kwargs(kw, chunk_mode))


@pytest.mark.parametrize("recompute", [False, True], ids=["save", "recompute"])
def test_projection_gemms(recompute):
    """p and q come from one GEMM in the forward; the backward makes them again only with
    recompute=True. With x frozen the backward runs one GEMM (dW), end to end two (dW, dx)."""
    x, kw = make_layout("packed", [5, 0, 9], 24, device=DEVICE)
    w = make_weights(24, 16, None, device=DEVICE, requires_grad=True)
    for frozen in (True, False):
        xin = x.detach().clone().requires_grad_(not frozen)
        with OpCounter() as fwd:
            z = call(fastmil.attention_pool, xin, w, backend="triton", recompute=recompute, **kw)
        with OpCounter() as bwd:
            z.square().sum().backward()
        assert fwd.counts.get("mm", 0) == 1, fwd.counts
        gemms = bwd.counts.get("mm", 0) + bwd.counts.get("addmm", 0)
        assert gemms == (1 if frozen else 2) + recompute, (frozen, bwd.counts)


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, then
    launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []  # [(grid, kwargs)]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("fma_sum", [True, False], ids=["fma-sum", "dot-sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,lengths", CASES, ids=[c[0] for c in CASES])
def test_one_branch_weighted_sum_both_ways(fma_sum, dtype, layout, lengths, chunk_mode,
                                           monkeypatch):
    """Pass 2's Σ exp(s - m) h for one branch, by tl.dot (the default, as for K > 1) and by FMA
    into a register tile (``kernel_options(fma_sum=True)``): both right, and the option reaches
    the launch for one branch only."""
    spy = _LaunchSpy(kernels._fwd_kernel)
    monkeypatch.setattr(kernels, "_fwd_kernel", spy)
    D, L = 40, 24
    x, kw = make_layout(layout, lengths, D, dtype=dtype, device=DEVICE)
    with kernel_options(fma_sum=fma_sum):
        _check(x, make_weights(D, L, None, dtype=dtype, device=DEVICE), dtype,
               **_chunk_mode_kwargs(kw, chunk_mode))
        assert spy.launches and all(k["FMA_SUM"] is fma_sum for _, k in spy.launches)
        spy.launches.clear()
        _check(x, make_weights(D, L, 2, dtype=dtype, device=DEVICE), dtype,
               **_chunk_mode_kwargs(kw, chunk_mode))
    assert spy.launches and all(k["FMA_SUM"] is False for _, k in spy.launches)


@pytest.mark.parametrize("missing", ["attn_bias", "gate_bias"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "save"])
def test_one_bias_missing(missing, recompute):
    """The kernels add b_V and b_U themselves (p and q are made and saved without them): either
    alone is right, whether p and q were saved or made again."""
    x, kw = make_layout("packed", [7, 0, 19], 24, device=DEVICE)
    w = make_weights(24, 16, None, device=DEVICE)
    w[missing] = None
    _check(x, w, torch.float32, {"recompute": recompute}, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout,lengths", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_dtypes(dtype, layout, lengths):
    D, L = 48, 32
    x, kw = make_layout(layout, lengths, D, dtype=dtype, device=DEVICE)
    _check(x, make_weights(D, L, 2, dtype=dtype, device=DEVICE), dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_dtypes_and_activations(dtype, activation):
    x, kw = make_layout("padded_mask", [3, 0, 1, 33, 12], 48, dtype=dtype, device=DEVICE)
    _check(x, make_weights(48, 32, 2, dtype=dtype, device=DEVICE), dtype,
           {"activation": activation}, **kw)


def test_frozen_x_and_nan_padding():
    """Padding full of NaN gives NaN projections in its rows, which the kernels never use; x
    without grad still gets every weight gradient."""
    x, kw = make_layout("padded_mask", [3, 9, 0], 24, device=DEVICE)
    x_nan = torch.where(kw["mask"][..., None], x, float("nan"))
    w = make_weights(24, 16, 2, device=DEVICE, requires_grad=True)
    z = call(fastmil.attention_pool, x_nan, w, backend="triton", **kw)
    z.square().sum().backward()
    w32 = {n: None if t is None else t.detach().double().requires_grad_() for n, t in w.items()}
    zr = call(attention_pool_reference, x.double(), w32, **kw)
    zr.square().sum().backward()
    assert_close(z, zr, torch.float32, what="z")
    for name, t in w.items():
        if t is not None and name != "score_bias":
            assert_close(t.grad, w32[name].grad, torch.float32, what=f"d {name}")


def test_long_bag_is_split_across_programs():
    """One long bag is cut into several chunks whose (max, sum, acc) states get merged; the
    host's and the device's chunk maps agree (the device's padded with idle programs)."""
    lengths = [2900, 5, 1]
    x, kw = make_layout("packed", lengths, 24, device=DEVICE)
    R, B = x.shape[0], 3
    chunk = config.chunk_size(R, x.device)
    offsets = kw["offsets"].cpu()
    meta, single = kernels.host_chunk_map(offsets.numpy(), chunk, True)
    assert not single
    num_chunks, chunk_bag = meta[3 * B:4 * B], meta[4 * B:]
    assert num_chunks.tolist() == [-(-n // chunk) for n in lengths] and num_chunks[0] > 1
    assert chunk_bag.tolist() == sorted(chunk_bag.tolist()) and len(chunk_bag) == sum(num_chunks)
    on_device = kernels.device_chunk_map(offsets, R, chunk)
    assert on_device.shape[0] == kernels.meta_length(R, B, chunk)
    assert on_device[:meta.shape[0]].tolist() == meta.tolist()
    assert set(on_device[meta.shape[0]:].tolist()) <= {B}  # idle programs
    _check(x, make_weights(24, 16, None, device=DEVICE), torch.float32, **kw)


def test_small_bags_take_one_program_each_without_merge(monkeypatch):
    """Bags within a chunk, lengths on the host: one program per bag and no merge launch. The
    offsets are passed on the CPU (only host lengths take this path); x is on DEVICE."""
    lengths = torch.tensor([3, 0, 17])
    B = 3
    meta, single = kernels.host_chunk_map(torch.tensor([0, 3, 3, 20]).numpy(), 128, True)
    assert single and meta[4 * B:].tolist() == [0, 1, 2]
    merges = _LaunchSpy(kernels._merge_kernel)
    monkeypatch.setattr(kernels, "_merge_kernel", merges)
    x, kw = make_layout("packed", lengths.tolist(), 16, device=DEVICE)
    _check(x, make_weights(16, 8, 2, device=DEVICE), torch.float32,
           offsets=kw["offsets"].cpu())
    assert merges.launches == []


def test_chunk_size_aims_at_programs_per_sm(monkeypatch):
    """Chunks of a multiple of CHUNK_ALIGN rows, about ``programs_per_sm`` per SM (132 SMs: an
    H100), at most 64·CHUNK_ALIGN rows; the numbers of docs/gpu-runs.md."""
    monkeypatch.setattr(config, "_multi_processors", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert config.chunk_size(100_000, gpu) == 256  # 391 chunks: one round of 396 slots
    assert config.chunk_size(200_195, gpu) == 384  # 522 (+ partials): two rounds
    assert config.chunk_size(10 ** 8, gpu) == 64 * config.CHUNK_ALIGN
    with kernel_options(programs_per_sm=16):
        assert config.chunk_size(200_195, gpu) == 128  # 1,564 chunks (+ partials)
        assert config.chunk_size(10 ** 6, gpu) == 512
        assert config.chunk_size(5, gpu) == config.CHUNK_ALIGN


@pytest.mark.parametrize("kind,tiles", [(k, t) for k in config.TILE_CANDIDATES
                                        for t in config.TILE_CANDIDATES[k]],
                         ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)))
def test_every_gpu_tile_candidate(kind, tiles, monkeypatch):
    """Each tile configuration the GPU may pick, run (in the interpreter on CPU) on shapes that
    take several D and L blocks (ragged ends) and several row tiles and chunks."""
    name = {"fwd": "_fwd_kernel", "bwd": "_bwd_kernel"}[kind]
    spy = _LaunchSpy(getattr(kernels, name))
    monkeypatch.setattr(kernels, name, spy)
    D, L = 2 * tiles[1] + 7, 2 * tiles[2] + 5
    x, kw = make_layout("packed", [tiles[0] + 3, 0, 2], D, device=DEVICE)
    with kernel_options(tiles={kind: tiles}, single=False):
        _check(x, make_weights(D, L, 2, device=DEVICE), torch.float32, **kw)
    launched = {(k["BLOCK_N"], k["num_warps"], k["num_stages"]) for _, k in spy.launches}
    assert launched == {(tiles[0], tiles[3], tiles[4])}, launched  # the tile these are for ran


def test_tile_key_classes():
    """Measured tiles are keyed by class, never by bag lengths: D rounds up to a power of two."""
    key = config.tile_key
    assert key("fwd", torch.bfloat16, 1536, 256, 1, True) == ("fwd", "16-bit", True, 2048, 256, 1)
    assert key("bwd", torch.float32, 500, 128, 4, False) == ("bwd", "fp32", False, 512, 128, 4)
    assert key("fwd", torch.float16, 1024, 256, 1, True) == key("fwd", torch.bfloat16, 1000,
                                                                   256, 1, True)


def test_measured_tiles_are_candidates():
    """A pasted table holds only tiles that the interpreter and sm_90 compile tests cover."""
    for key, tile in config.MEASURED_TILES.items():
        kind = key[0]
        assert key == config.tile_key(kind, torch.float32 if key[1] == "fp32" else
                                      torch.bfloat16, key[3], key[4], key[5], key[2]), key
        assert tuple(tile) in config.TILE_CANDIDATES[kind], (key, tile)


def test_tile_table_precedence(monkeypatch):
    """The options' tile, then MEASURED_TILES, then the defaults; a class missing from the
    table falls through to the default; BLOCK_D and BLOCK_L no wider than D and L need."""
    args = ("fwd", torch.bfloat16, 1024, 256, 1, True, True)
    key = config.tile_key(*args[:-1])
    default = config.GPU_TILES[("fwd", "16-bit", 1)]
    a, b = config.TILE_CANDIDATES["fwd"][1:3]
    monkeypatch.setattr(config, "MEASURED_TILES", {})  # whatever the GPU runs pasted there
    config._tiles.cache_clear()
    blocks = lambda t: (t[0], min(t[1], 1024), min(t[2], 256), 16, t[3], t[4])  # noqa: E731
    assert config.tiles(*args) == blocks(default)
    monkeypatch.setitem(config.MEASURED_TILES, key, a)
    config._tiles.cache_clear()
    assert config.tiles(*args) == blocks(a)
    assert config.tiles("fwd", torch.bfloat16, 1536, 256, 1, True, True) == blocks(default)
    with kernel_options(tiles={"fwd": b}):
        assert config.tiles(*args) == blocks(b)
    assert config.tiles("fwd", torch.float32, 20, 12, 1, True, True)[1:3] == (32, 16)
    config._tiles.cache_clear()


def test_wide_features_and_attention_take_several_blocks():
    """D and L larger than one tile: the D and L loops run more than once, with ragged ends."""
    D, L = 200, 150
    x, kw = make_layout("packed", [17, 40], D, device=DEVICE)
    _check(x, make_weights(D, L, 2, device=DEVICE), torch.float32, **kw)


@pytest.mark.parametrize("layout,lengths", [("packed", [0, 0]), ("padded_mask", [0, 0]),
                                            ("packed", []), ("padded", [0, 0])],
                         ids=["packed-empty", "padded-all-masked", "packed-B0", "padded-N0"])
def test_empty_bags_pool_to_zero_with_zero_grads(layout, lengths):
    x, kw = make_layout(layout, lengths, 16, device=DEVICE)
    w = make_weights(16, 16, None, device=DEVICE)
    z, a, g = _run(fastmil.attention_pool, x, w, backend="triton", **kw)
    assert torch.equal(z, torch.zeros_like(z))
    assert torch.equal(a, torch.zeros_like(a))
    for name, grad in g.items():
        assert grad is None or torch.equal(grad, torch.zeros_like(grad)), name


def test_huge_scores_stay_finite():
    x, kw = make_layout("packed", [5, 30], 32, scale=1e4, device=DEVICE)
    w = make_weights(32, 16, 2, scale=30.0, device=DEVICE)
    z, a, g = _run(fastmil.attention_pool, x, w, backend="triton", **kw)
    for t in [z, a, *[t for t in g.values() if t is not None]]:
        assert torch.isfinite(t).all()
    # forward against the reference; the gradients here are dominated by the fp32 cancellation
    # in h·dz − Δ (|h| ~ 1e4), which no fp32 implementation avoids, so only their finiteness counts
    zr, ar = call(attention_pool_reference, x.double(),
                  {n: None if t is None else t.double() for n, t in w.items()},
                  return_attention=True, **kw)
    assert_close(z, zr, torch.float32, what="z")
    assert_close(a, ar, torch.float32, what="attention")


def test_backward_is_deterministic():
    x, kw = make_layout("packed", [700, 3, 90], 32, device=DEVICE)
    w = make_weights(32, 24, 2, device=DEVICE)
    _, _, g1 = _run(fastmil.attention_pool, x, w, backend="triton", **kw)
    _, _, g2 = _run(fastmil.attention_pool, x, w, backend="triton", **kw)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_module_and_torch_backend_agree():
    pool = fastmil.AttentionPool(32, 16, branches=2).to(DEVICE)
    x, kw = make_layout("packed", [4, 9, 1], 32, device=DEVICE)
    z_torch = pool(x, **kw)
    pool.backend = "triton"
    assert_close(pool(x, **kw), z_torch, what="module z")


def test_torch_compile_fullgraph():
    """Compiled calls trace the torch.library custom ops, eager calls run the same launchers
    through a plain autograd.Function: both give the same z and gradients."""
    x, kw = make_layout("packed", [5, 12], 24, device=DEVICE)
    w = make_weights(24, 16, None, device=DEVICE)
    names = ("attn_weight", "gate_weight", "score_weight")

    def f(x, offsets, V, U, s):
        return fastmil.attention_pool(x, V, U, s, offsets=offsets, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    runs = []
    for fn in (f, compiled):
        leaves = [x.clone().requires_grad_(True)] + [w[n].clone().requires_grad_(True)
                                                     for n in names]
        out = fn(leaves[0], kw["offsets"], *leaves[1:])
        out.pow(2).sum().backward()
        runs.append((out, [t.grad for t in leaves]))
    (z, grads), (z_c, grads_c) = runs
    assert_close(z_c, z, what="compiled z")
    for name, g, g_c in zip(("x",) + names, grads, grads_c, strict=True):
        assert_close(g_c, g, what=f"compiled d{name}")


def test_eager_calls_skip_the_custom_op_dispatch(monkeypatch):
    """Eager forward and backward run without the custom ops' dispatch (host time that a
    launch-bound call pays in full); only torch.compile goes through them."""
    from fastmil import triton_backend as ops

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through a torch.library custom op")

    monkeypatch.setattr(ops, "_fwd_op", refuse)
    monkeypatch.setattr(ops, "_bwd_op", refuse)
    x, kw = make_layout("packed", [5, 12], 24, device=DEVICE)
    x.requires_grad_(True)
    w = make_weights(24, 16, None, device=DEVICE, requires_grad=True)
    z = call(fastmil.attention_pool, x, w, backend="triton", **kw)
    z.sum().backward()
    assert x.grad is not None and w["attn_weight"].grad is not None


@pytest.mark.parametrize("wrt", ["x", "attn_weight"])
def test_triton_second_derivative_raises_a_clear_error(wrt):
    """The fused backward has no derivative of its own: a gradient of a gradient through it
    must fail with a message saying what to use, never return a partial second derivative."""
    x, kw = make_layout("packed", [3, 5], 8, device=DEVICE)
    w = make_weights(8, 4, None, device=DEVICE, requires_grad=True)
    x.requires_grad_()
    z = call(fastmil.attention_pool, x, w, backend="triton", **kw)
    target = x if wrt == "x" else w[wrt]
    (g,) = torch.autograd.grad(z.square().sum(), target, create_graph=True)
    z_t = call(fastmil.attention_pool, x, w, backend="torch", **kw)
    (g_t,) = torch.autograd.grad(z_t.square().sum(), target)
    assert_close(g, g_t, torch.float32, what=f"first derivative wrt {wrt}")
    with pytest.raises(RuntimeError, match="backend='torch' for higher-order gradients"):
        g.square().sum().backward()


def test_autocast():
    dtype = torch.bfloat16 if CUDA else torch.float16
    x, kw = make_layout("packed", [6, 11], 32, device=DEVICE)
    w = make_weights(32, 16, None, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        z = call(fastmil.attention_pool, x, w, backend="triton", **kw)
    assert z.dtype == dtype
    ref = call(attention_pool_reference, x.double(),
               {n: None if t is None else t.double() for n, t in w.items()}, **kw)
    assert_close(z, ref, dtype, what="autocast z")


def test_auto_backend_dispatch():
    x, kw = make_layout("packed", [6, 11], 32, device=DEVICE)
    w = make_weights(32, 16, None, device=DEVICE)
    auto = call(fastmil.attention_pool, x, w, backend="auto", **kw)
    expected = "triton" if CUDA else "torch"
    assert torch.equal(auto, call(fastmil.attention_pool, x, w, backend=expected, **kw))


def test_triton_backend_errors(monkeypatch):
    w64 = make_weights(8, 4, None, dtype=torch.float64, device=DEVICE)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32, got torch.float64"):
        call(fastmil.attention_pool, torch.randn(3, 8, dtype=torch.float64, device=DEVICE), w64,
             backend="triton")
    if not CUDA:
        w16 = make_weights(8, 4, None, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match="interpreter has no bfloat16"):
            call(fastmil.attention_pool, torch.randn(3, 8, dtype=torch.bfloat16), w16,
                 backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="run on CUDA tensors, got a tensor on cpu"):
            call(fastmil.attention_pool, torch.randn(3, 8), make_weights(8, 4), backend="triton")


@needs_cuda
def test_fp32_honours_tf32_setting(monkeypatch):
    D, L = 256, 128
    x, kw = make_layout("packed", [300, 200], D, device=DEVICE)
    w = make_weights(D, L, None, device=DEVICE)
    spy = _LaunchSpy(kernels._fwd_kernel)
    monkeypatch.setattr(kernels, "_fwd_kernel", spy)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _check(x, w, torch.float32, **kw)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    call(fastmil.attention_pool, x, w, backend="triton", **kw)
    assert [k["PRECISION"] for _, k in spy.launches] == ["ieee", "tf32"]


@needs_cuda
def test_no_recompilation_per_bag_count_or_length():
    """Two forward variants in all (one program per bag, or chunks and a merge), never one per
    bag count or length. The offsets are on the host, as fastmil.collate makes them: only there
    do bags within a chunk take one program each."""
    D, L = 64, 32
    w = make_weights(D, L, None, device=DEVICE)
    for lengths in ([5, 7], [5000]):
        x, kw = make_layout("packed", lengths, D, device=DEVICE)
        call(fastmil.attention_pool, x, w, backend="triton", offsets=kw["offsets"].cpu())
    sizes = {k: len(k.device_caches[0][0]) if hasattr(k, "device_caches") else len(k.cache)
             for k in (kernels._fwd_kernel, kernels._merge_kernel)}
    for lengths in ([1], [100, 3, 17], [33] * 40, [2000]):
        x, kw = make_layout("packed", lengths, D, device=DEVICE)
        call(fastmil.attention_pool, x, w, backend="triton", offsets=kw["offsets"].cpu())
    after = {k: len(k.device_caches[0][0]) if hasattr(k, "device_caches") else len(k.cache)
             for k in sizes}
    assert after == sizes


def _dropout_loss(x, weights, seed, upstream, **kwargs):
    torch.manual_seed(seed)
    z = call(fastmil.attention_pool, x, weights, backend="triton", dropout_p=0.3, **kwargs)
    return (z.double() * upstream).sum()


@pytest.mark.parametrize("name", ["x", "attn_weight", "gate_weight", "score_weight", "gate_bias"])
def test_dropout_gradient_matches_finite_differences(name):
    """Under a fixed seed the dropout masks are fixed, so the kernels' gradient is the derivative
    of a smooth function: check it along a random direction by central differences."""
    x, kw = make_layout("packed", [7, 1, 20], 12, device=DEVICE)
    weights = make_weights(12, 8, 2, device=DEVICE)
    up = torch.randn(3, 2, 12, dtype=torch.float64, device=DEVICE)
    leaves = {"x": x.clone()} | {n: t.clone() for n, t in weights.items()}
    target = leaves[name].requires_grad_()
    loss = _dropout_loss(leaves["x"], {n: leaves[n] for n in weights}, 5, up, **kw)
    (grad,) = torch.autograd.grad(loss, [target])
    direction = torch.randn_like(target)
    eps = 1e-3 * target.detach().abs().max().item()
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            moved = dict(leaves) | {name: target + sign * eps * direction}
            values.append(_dropout_loss(moved["x"], {n: moved[n] for n in weights}, 5, up, **kw))
    numeric = (values[0] - values[1]).item() / (2 * eps)
    analytic = (grad.double() * direction.double()).sum().item()
    assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (numeric, analytic)


def test_dropout_triton_and_torch_agree_in_distribution():
    """Mean and variance of z over many dropout draws: the fused kernels (Philox masks) and the
    torch backend (F.dropout) sample the same distribution, and it is not the no-dropout one."""
    n = 400
    x, kw = make_layout("packed", [6, 9], 8, device=DEVICE)
    weights = make_weights(8, 6, None, device=DEVICE, scale=2.0)

    def draws(backend):
        torch.manual_seed(11)
        return torch.stack([call(fastmil.attention_pool, x, weights, backend=backend,
                                 dropout_p=0.5, **kw).double() for _ in range(n)]).flatten(1)

    zt, zr = draws("triton"), draws("torch")
    z0 = call(fastmil.attention_pool, x, weights, backend="torch", **kw).double().flatten()
    se = (zt.var(0) / n + zr.var(0) / n).sqrt()
    assert ((zt.mean(0) - zr.mean(0)).abs() / se).max() < 4.5  # Bonferroni over 16 numbers
    log_ratio = (zt.var(0) / zr.var(0)).log()
    assert log_ratio.abs().max() < 0.45  # sd of a log variance ratio at n = 400: ~0.1
    assert ((zt.mean(0) - z0).abs() / (zt.var(0) / n).sqrt()).max() > 6  # dropout shows


def test_nan_padding_is_never_read():
    x, kw = make_layout("padded_mask", [3, 9, 0], 24, device=DEVICE)
    x_nan = torch.where(kw["mask"][..., None], x, float("nan"))
    w = make_weights(24, 16, 2, device=DEVICE)
    z, a, g = _run(fastmil.attention_pool, x_nan, w, backend="triton", **kw)
    zc, ac, gc = _run(fastmil.attention_pool, x, w, backend="triton", **kw)
    assert torch.equal(z, zc) and torch.equal(a, ac)
    for name in g:
        assert torch.isfinite(g[name]).all(), name
        assert_close(g[name], gc[name], what=f"d {name}")


def test_import_touches_neither_triton_nor_a_gpu_driver():
    """`import fastmil` and a torch-backend call must work on a machine without a GPU driver."""
    import subprocess
    import sys

    code = ("import sys, torch, fastmil\n"
            "fastmil.attention_pool(torch.randn(4, 8), torch.randn(3, 8), None, torch.randn(3),"
            " backend='auto')\n"
            "print('triton' in sys.modules, 'fastmil.kernels.attention_pool' in sys.modules,"
            " torch.cuda.is_initialized())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
