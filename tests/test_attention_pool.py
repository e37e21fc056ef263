"""fastmil.attention_pool against fastmil.reference: values, attention, gradients, dtypes,
empty bags, numeric stability, autocast, torch.compile, and the AttentionPool module."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LAYOUTS,
    WEIGHT_NAMES,
    assert_close,
    call,
    clone_weights,
    grads,
    layout_cases,
    make_layout,
    make_weights,
    skip_unsupported,
    weight_tensors,
)

import fastmil
from fastmil import attention_pool
from fastmil.reference import attention_pool_reference

LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def _run_both(backend, x, weights, kwargs, *, dtype_ref=None):
    """Forward + backward of attention_pool and of the reference on copies of the same inputs.

    Returns ((z, attn, grads), (z_ref, attn_ref, grads_ref)) where grads are [x, *weights]
    for an upstream gradient drawn at random.
    """
    x1 = x.detach().clone().requires_grad_()
    w1 = clone_weights(weights)
    z, a = call(attention_pool, x1, w1, return_attention=True, backend=backend, **kwargs)
    x2 = x.detach().clone().requires_grad_()
    w2 = clone_weights(weights)
    z_ref, a_ref = call(attention_pool_reference, x2, w2, return_attention=True, **kwargs)
    g = torch.randn(z_ref.shape, dtype=torch.float64).to(z_ref.device, z_ref.dtype)
    names = [n for n, _ in weight_tensors(weights)]
    got = grads(z, g, [x1] + [w1[n] for n in names])
    want = grads(z_ref, g, [x2] + [w2[n] for n in names])
    return (z, a, dict(zip(["x"] + names, got, strict=True)),
            z_ref, a_ref, dict(zip(["x"] + names, want, strict=True)))


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize(("layout", "lengths"), layout_cases())
def test_matches_reference(backend, device, layout, lengths, gated, bias, K):
    D, L = 16, 8
    x, kw = make_layout(layout, lengths, D, device=device)
    weights = make_weights(D, L, K, gated, bias, device=device)
    z, a, g, z_ref, a_ref, g_ref = _run_both(backend, x, weights, kw)

    assert z.dtype == x.dtype and a.dtype == torch.float32
    assert_close(z, z_ref, what="z")
    assert_close(a, a_ref, what="attention")
    for name in g_ref:
        assert_close(g[name], g_ref[name], torch.float32, what=f"grad of {name}")
    if bias:  # a per-branch constant shift of the scores: no effect, zero gradient
        assert torch.equal(g["score_bias"], torch.zeros_like(g["score_bias"]))
    # not vacuous: with a bag of 2+ instances, outputs and weight gradients are non-trivial
    if max(lengths, default=0) > 1:
        assert z_ref.abs().max() > 0.01 and g_ref["attn_weight"].abs().max() > 1e-4


@pytest.mark.parametrize("K", [None, 2], ids=["K1", "K2"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_float64(layout, gated, K):
    lengths = {"single": [4], "padded": [3, 3], "padded_mask": [2, 0, 3, 1],
               "packed": [2, 0, 3, 1]}[layout]
    D, L = 5, 3
    x, kw = make_layout(layout, lengths, D, torch.float64)
    weights = make_weights(D, L, K, gated, bias=True, dtype=torch.float64)
    names = [n for n, _ in weight_tensors(weights)]

    def f(x, *ws):
        w = dict.fromkeys(WEIGHT_NAMES)
        w.update(zip(names, ws, strict=True))
        return call(attention_pool, x, w, return_attention=True, backend="torch", **kw)

    inputs = [x.requires_grad_()] + [weights[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("recompute", [None, True], ids=["default", "checkpointed"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradgradcheck_float64_torch_backend(layout, recompute):
    """Second derivatives (gradient penalties, create_graph=True) on the torch backend."""
    lengths = {"single": [4], "padded": [3, 3], "padded_mask": [2, 0, 3, 1],
               "packed": [2, 0, 3, 1]}[layout]
    D, L = 4, 3
    x, kw = make_layout(layout, lengths, D, torch.float64)
    weights = make_weights(D, L, 2, True, bias=True, dtype=torch.float64)
    names = ["attn_weight", "gate_weight", "score_weight"]

    def f(x, *ws):
        w = dict(weights) | dict(zip(names, ws, strict=True))
        return call(attention_pool, x, w, backend="torch", recompute=recompute, **kw)

    inputs = [x.requires_grad_()] + [weights[n].clone().requires_grad_() for n in names]
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("layout", ["padded_mask", "packed", "single"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_dtypes_match_reference(backend, device, dtype, layout, K):
    skip_unsupported(backend, dtype)
    D, L = 32, 16
    lengths = [300] if layout == "single" else [3, 0, 1, 7, 300]
    x, kw = make_layout(layout, lengths, D, dtype, device=device)
    weights = make_weights(D, L, K, gated=True, bias=True, dtype=dtype, device=device)
    z, a, g, z_ref, a_ref, g_ref = _run_both(backend, x, weights, kw)

    assert z.dtype == dtype and a.dtype == torch.float32
    assert_close(z, z_ref, dtype, what="z")
    assert_close(a, a_ref, dtype, what="attention")
    for name in g_ref:
        assert g[name].dtype == dtype
        assert_close(g[name], g_ref[name], dtype, what=f"grad of {name}")


@pytest.mark.parametrize(("layout", "lengths"), [
    ("packed", [0, 0]), ("packed", []), ("packed", [0, 4, 0]),
    ("padded_mask", [0, 0]), ("padded_mask", [0, 4, 0]),
    ("padded", [0, 0]), ("single", [0]),
])
@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
def test_empty_bags_pool_to_zero(backend, device, layout, lengths, K):
    D, L = 6, 4
    x, kw = make_layout(layout, lengths, D, device=device)
    x.requires_grad_()
    weights = make_weights(D, L, K, requires_grad=True, device=device)
    z, a = call(attention_pool, x, weights, return_attention=True, backend=backend, **kw)
    inputs = [x] + [t for _, t in weight_tensors(weights)]
    gs = grads(z, torch.randn_like(z), inputs)

    empty = [b for b, n in enumerate(lengths) if n == 0]
    zb = z[None] if layout == "single" else z
    assert zb.shape[0] == len(lengths)
    for b in empty:
        assert torch.equal(zb[b], torch.zeros_like(zb[b])), f"bag {b} is empty but z != 0"
    if "mask" in kw:  # exactly zero attention on padding
        assert torch.equal(a[~kw["mask"]], torch.zeros_like(a[~kw["mask"]]))
    for t, gr in zip(inputs, gs, strict=True):
        assert torch.isfinite(gr).all()
        if all(n == 0 for n in lengths):
            assert torch.equal(gr, torch.zeros_like(t))
    if "mask" in kw:  # no gradient reaches padding rows
        gx = gs[0]
        assert torch.equal(gx[~kw["mask"]], torch.zeros_like(gx[~kw["mask"]]))
    if any(lengths):
        assert gs[1].abs().max() > 0  # the non-empty bag still trains attn_weight


@pytest.mark.parametrize("case", ["big_x", "big_weights"])
@pytest.mark.parametrize("layout", ["padded_mask", "packed"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_numeric_stability(backend, device, dtype, layout, case):
    skip_unsupported(backend, dtype)
    D, L, K = 16, 8, 2
    x_scale, w_scale = (1e4, 1.0) if case == "big_x" else (1.0, 1e3)
    x, kw = make_layout(layout, [5, 1, 0, 200], D, dtype, scale=x_scale, device=device)
    weights = make_weights(D, L, K, dtype=dtype, scale=w_scale, device=device)
    z, a, g, z_ref, a_ref, g_ref = _run_both(backend, x, weights, kw)

    for name, t in [("z", z), ("attention", a)] + [(f"grad {n}", t) for n, t in g.items()]:
        assert torch.isfinite(t).all(), f"{name} has inf/NaN"
    assert_close(z, z_ref, dtype, what="z")
    assert_close(a, a_ref, dtype, what="attention")
    if case == "big_weights":  # scores span thousands: attention is nearly one-hot, not NaN
        assert a.max() > 0.99


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("K", [None, 1, 3], ids=["K=None", "K1", "K3"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_shapes_and_dtypes(backend, device, layout, K, dtype):
    skip_unsupported(backend, dtype)
    D, L = 6, 4
    lengths = {"single": [5], "padded": [4, 4, 4], "padded_mask": [4, 2, 1],
               "packed": [4, 2, 1]}[layout]
    x, kw = make_layout(layout, lengths, D, dtype, device=device)
    weights = make_weights(D, L, K, dtype=dtype, device=device)
    z, a = call(attention_pool, x, weights, return_attention=True, backend=backend, **kw)
    z_only = call(attention_pool, x, weights, backend=backend, **kw)

    branch = () if K is None else (K,)
    batch = () if layout == "single" else (len(lengths),)
    inst = {"single": (5,), "padded": (3, 4), "padded_mask": (3, 4), "packed": (7,)}[layout]
    assert z.shape == batch + branch + (D,)
    assert a.shape == inst + branch
    assert z.dtype == dtype
    assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert isinstance(z_only, torch.Tensor) and torch.equal(z_only, z)
    # and the values: the reference's, on the same (rounded) inputs, computed in float64
    z_ref, a_ref = call(attention_pool_reference, x.double(),
                        {n: None if t is None else t.double() for n, t in weights.items()},
                        return_attention=True, **kw)
    assert_close(z, z_ref, dtype, what="z")
    assert_close(a, a_ref, dtype, what="attention")


def test_score_bias_0d_for_single_branch(backend, device):
    x, kw = make_layout("packed", [3, 4], 6, device=device)
    weights = make_weights(6, 4, None, device=device)
    z1 = call(attention_pool, x, weights, backend=backend, **kw)
    weights["score_bias"] = weights["score_bias"].reshape(())
    z0 = call(attention_pool, x, weights, backend=backend, **kw)
    torch.testing.assert_close(z0, z1, rtol=0, atol=1e-6)


def test_attention_is_a_distribution(backend, device):
    x, kw = make_layout("padded_mask", [3, 0, 1, 7, 100], 8, device=device)
    weights = make_weights(8, 4, 3, device=device)
    _, a = call(attention_pool, x, weights, return_attention=True, backend=backend, **kw)
    sums = a.sum(1)  # [B, K]
    torch.testing.assert_close(sums[[0, 2, 3, 4]], torch.ones(4, 3, device=device), rtol=0,
                               atol=1e-6)
    assert torch.equal(sums[1], torch.zeros(3, device=device))
    assert (a >= 0).all()


@pytest.mark.parametrize("layout", ["padded_mask", "packed"])
def test_autocast_bf16(backend, device, layout):
    skip_unsupported(backend, torch.bfloat16)
    D, L, K = 32, 16, 2
    x, kw = make_layout(layout, [3, 0, 9, 150], D, device=device)
    weights = make_weights(D, L, K, device=device)
    x1, w1 = x.clone().requires_grad_(), clone_weights(weights)
    with torch.autocast(device, dtype=torch.bfloat16):
        z, a = call(attention_pool, x1, w1, return_attention=True, backend=backend, **kw)
    # like nn.Linear under autocast: the output is bf16; the attention stays float32
    assert z.dtype == torch.bfloat16
    assert a.dtype == torch.float32
    x2, w2 = x.clone().requires_grad_(), clone_weights(weights)
    z_ref, a_ref = call(attention_pool_reference, x2, w2, return_attention=True, **kw)
    assert_close(z, z_ref, torch.bfloat16, what="z")
    assert_close(a, a_ref, torch.bfloat16, what="attention")

    g = torch.randn_like(z_ref)
    names = [n for n, _ in weight_tensors(weights)]
    got = grads(z.float(), g, [x1] + [w1[n] for n in names])
    want = grads(z_ref, g, [x2] + [w2[n] for n in names])
    for name, gg, gw in zip(["x"] + names, got, want, strict=True):
        assert gg.dtype == torch.float32, name  # gradients in the leaves' dtype
        assert_close(gg, gw, torch.bfloat16, what=f"grad of {name}")


def test_autocast_leaves_float64_alone():
    """Like torch's own autocast, float64 input is not cast down."""
    x, kw = make_layout("packed", [3, 4], 8, torch.float64)
    weights = make_weights(8, 4, None, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = call(attention_pool, x, weights, backend="torch", **kw)
    assert z.dtype == torch.float64
    assert_close(z, call(attention_pool_reference, x, weights, **kw), what="z")


@pytest.mark.parametrize("layout", ["padded_mask", "packed"])
def test_torch_compile_fullgraph(layout):
    """attention_pool traces without graph breaks; forward and backward match eager."""
    D, L, K = 8, 4, 2
    x, kw = make_layout(layout, [3, 0, 5, 1], D)
    weights = make_weights(D, L, K)
    torch._dynamo.reset()
    compiled = torch.compile(attention_pool, fullgraph=True)

    def run(fn):
        xx, ww = x.clone().requires_grad_(), clone_weights(weights)
        z, a = call(fn, xx, ww, return_attention=True, backend="torch", **kw)
        names = [n for n, _ in weight_tensors(ww)]
        g = grads(z, torch.ones_like(z), [xx] + [ww[n] for n in names])
        return z, a, g

    z_c, a_c, g_c = run(compiled)
    z_e, a_e, g_e = run(attention_pool)
    assert_close(z_c, z_e, what="compiled z")
    assert_close(a_c, a_e, what="compiled attention")
    for gc, ge in zip(g_c, g_e, strict=True):
        assert torch.isfinite(gc).all()
        assert_close(gc, ge, what="compiled grad")
    assert torch.equal(z_c[1], torch.zeros_like(z_c[1]))  # the empty bag


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("branches", [None, 3])
def test_module_matches_functional(backend, device, branches, gated, bias):
    pool = fastmil.AttentionPool(12, 5, branches=branches, gated=gated, bias=bias,
                                 backend=backend).to(device)
    assert pool.gated is gated and (pool.gate is None) is (not gated)
    assert (pool.attn.bias is None) is (not bias) and (pool.score.bias is None) is (not bias)
    assert pool.score.weight.shape == (branches or 1, 5)
    x, kw = make_layout("packed", [4, 0, 6], 12, device=device)
    z, a = pool(x, return_attention=True, **kw)
    weights = {
        "attn_weight": pool.attn.weight, "attn_bias": pool.attn.bias,
        "gate_weight": None if pool.gate is None else pool.gate.weight,
        "gate_bias": None if pool.gate is None else pool.gate.bias,
        "score_weight": pool.score.weight if branches else pool.score.weight[0],
        "score_bias": pool.score.bias,
    }
    z_ref, a_ref = call(attention_pool_reference, x, weights, return_attention=True, **kw)
    assert z.shape == ((3, 12) if branches is None else (3, branches, 12))
    assert_close(z, z_ref, what="module z")
    assert_close(a, a_ref, what="module attention")
    z.sum().backward()
    assert pool.attn.weight.grad is not None and pool.attn.weight.grad.abs().max() > 0
    if bias:  # a real, exactly-zero gradient (DDP expects every parameter to get one)
        assert torch.equal(pool.score.bias.grad, torch.zeros_like(pool.score.bias))
    assert f"branches={branches}" in repr(pool) and f"gated={gated}" in repr(pool)

