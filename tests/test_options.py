"""The options that make fastmil a drop-in for MIL training code, on every backend: activations,
raw scores, integer masks, attention dropout, recompute / save, gradients only where autograd
asks, exact zeros for one-hot attention, and float32 precision on long bags."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    OpCounter,
    assert_close,
    backend_device,
    call,
    clone_weights,
    grads,
    make_layout,
    make_weights,
    skip_unsupported,
    weight_tensors,
)

import fastmil
from fastmil import attention_pool
from fastmil.reference import attention_pool_reference

ACTS = ["tanh", "relu", "gelu"]


def _fwd_bwd(fn, x, weights, upstream_seed=1, **kwargs):
    """All outputs of fn and the gradients of a random loss on them w.r.t. x and every weight."""
    x = x.detach().clone().requires_grad_()
    w = clone_weights(weights)
    outs = call(fn, x, w, **kwargs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else outs
    g = torch.Generator().manual_seed(upstream_seed)
    loss = 0
    for o in outs:
        up = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
        loss = loss + (torch.where(torch.isfinite(o), o, 0) * up).sum()  # -inf scores at padding
    names = [n for n, _ in weight_tensors(w)]
    gs = grads(loss, torch.ones_like(loss), [x] + [w[n] for n in names])
    return outs, dict(zip(["x"] + names, gs, strict=True))


def _assert_matches_reference(backend, layout, lengths, D, L, K, *, dtype=torch.float32,
                              recompute=None, **kw):
    device = backend_device(backend)
    x, lay = make_layout(layout, lengths, D, dtype, device=device)
    weights = make_weights(D, L, K, dtype=dtype, device=device)
    got, g = _fwd_bwd(attention_pool, x, weights, backend=backend, recompute=recompute, **lay,
                      **kw)
    want, g_ref = _fwd_bwd(attention_pool_reference, x.double(),
                           {n: None if t is None else t.double() for n, t in weights.items()},
                           **lay, **kw)
    for i, (o, r) in enumerate(zip(got, want, strict=True)):
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(o), finite), f"output {i}: -inf at other places"
        assert_close(torch.where(finite, o.double(), 0), torch.where(finite, r, 0), dtype,
                     what=f"output {i}")
    for name in g_ref:
        assert_close(g[name], g_ref[name], dtype, what=f"grad of {name}")
    return got, g


# ---------------------------------------------------------------- activations, scores, masks


@pytest.mark.parametrize("K", [None, 2], ids=["K1", "K2"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize(("layout", "lengths"), [("packed", [3, 0, 1, 40]),
                                                 ("padded_mask", [5, 0, 12]), ("single", [9])])
def test_activation_and_scores_match_reference(backend, device, layout, lengths, activation,
                                               gated, K):
    D, L = 20, 12
    x, lay = make_layout(layout, lengths, D, device=device)
    weights = make_weights(D, L, K, gated, device=device)
    got, g = _fwd_bwd(attention_pool, x, weights, backend=backend, activation=activation,
                      return_attention=True, return_scores=True, **lay)
    want, g_ref = _fwd_bwd(attention_pool_reference, x.double(),
                           {n: None if t is None else t.double() for n, t in weights.items()},
                           activation=activation, return_attention=True, return_scores=True,
                           **lay)
    z, a, s = got
    assert s.shape == a.shape and s.dtype == a.dtype == torch.float32
    if "mask" in lay:  # padded slots: attention 0, scores -inf
        pad = ~lay["mask"]
        assert torch.equal(a[pad], torch.zeros_like(a[pad]))
        assert (s[pad] == float("-inf")).all()
    finite = torch.isfinite(want[2])
    assert torch.equal(torch.isfinite(s), finite)
    assert_close(z, want[0], torch.float32, what="z")
    assert_close(a, want[1], torch.float32, what="attention")
    assert_close(torch.where(finite, s.double(), 0), torch.where(finite, want[2], 0),
                 torch.float32, what="scores")
    for name in g_ref:  # the scores carry the score bias, so it gets a real gradient here
        assert_close(g[name], g_ref[name], torch.float32, what=f"grad of {name}")
    assert g_ref["score_bias"].abs().max() > 0.1


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("layout", ["packed", "padded_mask"])
def test_gradcheck_activations_and_scores_float64(layout, activation):
    D, L = 5, 4
    x, lay = make_layout(layout, [3, 0, 2], D, torch.float64)
    weights = make_weights(D, L, 2, dtype=torch.float64)
    names = [n for n, _ in weight_tensors(weights)]

    def f(x, *ws):
        w = dict(zip(names, ws, strict=True)) | {n: None for n in weights if n not in names}
        z, a, s = call(attention_pool, x, w, activation=activation, return_attention=True,
                       return_scores=True, backend="torch", **lay)
        return z, a, torch.where(torch.isfinite(s), s, 0)

    inputs = [x.requires_grad_()] + [weights[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_return_order_and_module_forward(backend, device):
    x, lay = make_layout("packed", [4, 6], 8, device=device)
    pool = fastmil.AttentionPool(8, 4, activation="gelu", backend=backend).to(device)
    z, a, s = pool(x, return_attention=True, return_scores=True, **lay)
    z2, s2 = pool(x, return_scores=True, **lay)
    assert torch.equal(z, z2) and torch.equal(s, s2) and torch.equal(z, pool(x, **lay))
    b = pool.score.bias
    seg = torch.repeat_interleave(torch.arange(2, device=device),
                                  torch.tensor([4, 6], device=device))
    # the attention is the per-bag softmax of the scores (the score bias cancels)
    soft = torch.cat([torch.softmax(s[seg == i] - b, 0) for i in range(2)])
    torch.testing.assert_close(a, soft, rtol=1e-5, atol=1e-6)
    assert "activation='gelu'" in repr(pool)


@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int32, torch.int64, torch.int8])
def test_integer_masks_equal_bool(backend, device, mask_dtype):
    x, lay = make_layout("padded_mask", [3, 0, 7], 8, device=device)
    weights = make_weights(8, 4, None, device=device)
    want = call(attention_pool, x, weights, return_attention=True, backend=backend, **lay)
    as_int = lay["mask"].to(mask_dtype) * 3  # any nonzero marks a real instance
    got = call(attention_pool, x, weights, return_attention=True, backend=backend, mask=as_int)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


# ---------------------------------------------------------------- dropout


def _dropout_run(backend, seed, p, *, layout="packed", K=2, gated=True):
    torch.manual_seed(100)  # the same data every call; the seed below draws the masks
    device = backend_device(backend)
    x, lay = make_layout(layout, [6, 0, 30, 1], 16, device=device)
    weights = make_weights(16, 8, K, gated, device=device)
    torch.manual_seed(seed)
    return _fwd_bwd(attention_pool, x, weights, backend=backend, dropout_p=p,
                    return_attention=True, **lay)


def test_dropout_p0_is_exactly_no_dropout(backend, device):
    out_p0, g_p0 = _dropout_run(backend, 0, 0.0)
    torch.manual_seed(100)
    x, lay = make_layout("packed", [6, 0, 30, 1], 16, device=device)
    weights = make_weights(16, 8, 2, device=device)
    out, g = _fwd_bwd(attention_pool, x, weights, backend=backend, return_attention=True, **lay)
    for a, b in zip(out_p0, out, strict=True):
        assert torch.equal(a, b)
    for name in g:
        assert torch.equal(g_p0[name], g[name]), name


@pytest.mark.parametrize("layout", ["packed", "padded_mask"])
def test_dropout_same_seed_same_bits_other_seed_differs(backend, layout):
    (z1, a1), g1 = _dropout_run(backend, 7, 0.25, layout=layout)
    (z2, a2), g2 = _dropout_run(backend, 7, 0.25, layout=layout)
    (z3, a3), g3 = _dropout_run(backend, 8, 0.25, layout=layout)
    (z0, _), _ = _dropout_run(backend, 7, 0.0, layout=layout)
    assert torch.equal(z1, z2) and torch.equal(a1, a2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name
    assert not torch.equal(z1, z3) and not torch.equal(g1["attn_weight"], g3["attn_weight"])
    assert not torch.equal(z1, z0)  # dropout does change the pooling
    assert torch.isfinite(z1).all()


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_dropout_keeps_a_fraction_1_minus_p_per_branch(backend, device, gated):
    """With one attention column (L = 1), each score is w·t·g·m·m'/(1-p)² (gated) or w·t·m/(1-p)
    (plain): the kept fraction is (1-p)² for two independent masks, (1-p) for one, and each
    kept score is scaled by 1/(1-p) per mask."""
    p, n, D = 0.3, 4000, 4
    x = torch.randn(n, D).to(device)
    weights = make_weights(D, 1, None, gated, bias=True, device=device)
    # tanh(p) far from 0: no score is zero by chance
    weights["attn_bias"] = torch.full((1,), 2.0, device=device)
    base = call(attention_pool, x, weights, return_scores=True, backend=backend)[1]
    torch.manual_seed(3)
    drop = call(attention_pool, x, weights, return_scores=True, dropout_p=p,
                backend=backend)[1]
    b = weights["score_bias"]
    ratio = (drop - b) / (base - b)
    kept = ratio != 0
    want = (1 - p) ** 2 if gated else 1 - p
    se = (want * (1 - want) / n) ** 0.5
    assert abs(kept.float().mean().item() - want) < 4 * se
    scale = (1 / (1 - p)) ** (2 if gated else 1)
    torch.testing.assert_close(ratio[kept], torch.full_like(ratio[kept], scale), rtol=1e-4,
                               atol=0)


def test_module_applies_dropout_in_training_only(backend, device):
    x, lay = make_layout("packed", [5, 20], 12, device=device)
    pool = fastmil.AttentionPool(12, 6, dropout=0.5, backend=backend).to(device)
    torch.manual_seed(0)
    z_train = pool(x, **lay)
    pool.eval()
    z_eval = pool(x, **lay)
    z_nodrop = fastmil.attention_pool(x, pool.attn.weight, pool.gate.weight, pool.score.weight[0],
                                      attn_bias=pool.attn.bias, gate_bias=pool.gate.bias,
                                      offsets=lay["offsets"], backend=backend)
    assert torch.equal(z_eval, z_nodrop) and not torch.equal(z_train, z_eval)


def test_dropout_under_torch_compile(backend, device):
    x, lay = make_layout("packed", [5, 9], 8, device=device)
    weights = make_weights(8, 4, None, device=device)
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(x, offsets, V, U, w):
        return attention_pool(x, V, U, w, offsets=offsets, dropout_p=0.5, backend=backend)

    def run(seed):
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        z = f(xx, lay["offsets"], weights["attn_weight"], weights["gate_weight"],
              weights["score_weight"])
        z.sum().backward()
        return z, xx.grad

    (z1, g1), (z2, g2), (z3, _) = run(0), run(0), run(1)
    assert torch.equal(z1, z2) and torch.equal(g1, g2) and not torch.equal(z1, z3)
    assert torch.isfinite(z1).all() and torch.isfinite(g1).all()


def test_dropout_under_autocast(backend, device):
    skip_unsupported(backend, torch.bfloat16)
    x, lay = make_layout("packed", [5, 9], 8, device=device)
    weights = make_weights(8, 4, None, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        torch.manual_seed(0)
        z1 = call(attention_pool, x, weights, dropout_p=0.25, backend=backend, **lay)
        torch.manual_seed(0)
        z2 = call(attention_pool, x, weights, dropout_p=0.25, backend=backend, **lay)
    assert z1.dtype == torch.bfloat16 and torch.equal(z1, z2) and torch.isfinite(z1).all()


# ---------------------------------------------------------------- one-hot attention


@pytest.mark.parametrize("layout", ["packed", "padded_mask", "single"])
@pytest.mark.parametrize("K", [None, 2], ids=["K1", "K2"])
def test_one_hot_attention_gives_exactly_zero_attention_gradients(backend, device, layout, K):
    """A one-instance bag, and a bag whose scores are so far apart that the attention is exactly
    one-hot: the attention net gets exactly zero gradient, not rounding noise."""
    D, L = 24, 16
    lengths = [1] if layout == "single" else [1, 6]
    x, lay = make_layout(layout, lengths, D, device=device)
    weights = make_weights(D, L, K, scale=1.0, device=device)
    if layout != "single":  # bag 1: instance 2 dominates by far more than exp's fp32 range
        big = torch.full((D,), 200.0, device=device)
        if layout == "packed":
            x[1 + 2] = big
        else:
            x[1, 2] = big
        weights["score_weight"] = weights["score_weight"].abs() * 20
        weights["attn_weight"] = weights["attn_weight"].abs()
        weights["gate_weight"] = weights["gate_weight"].abs() + 0.1
        weights["attn_bias"] = weights["attn_bias"] * 0 - 1.0
        weights["gate_bias"] = weights["gate_bias"] * 0 - 20.0
    (z, a), g = _fwd_bwd(attention_pool, x, weights, backend=backend, return_attention=True,
                         **lay)
    a_real = a if layout == "single" else (a[lay["mask"]] if "mask" in lay else a)
    assert ((a_real == 0) | (a_real == 1)).all(), "the attention is not exactly one-hot"
    for name in ("attn_weight", "gate_weight", "score_weight", "attn_bias", "gate_bias"):
        assert torch.equal(g[name], torch.zeros_like(g[name])), name
    assert g["x"].abs().max() > 0  # x still gets its gradient a·dz


# ---------------------------------------------------------------- recompute, gradients asked for


def _saved_bytes(fn):
    """Bytes of the tensors autograd keeps for backward while fn() runs (inputs included)."""
    seen = {}

    def pack(t):  # count each storage once (views of x are saved per slice)
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("recompute", [None, True, False])
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_recompute_modes_match_reference(backend, recompute, activation):
    _assert_matches_reference(backend, "packed", [7, 0, 50, 1], 24, 16, 2,
                              activation=activation, recompute=recompute)
    _assert_matches_reference(backend, "padded_mask", [7, 0, 20], 24, 16, None,
                              activation=activation, recompute=recompute)


def test_recompute_true_keeps_less_memory(backend, device):
    """recompute=True keeps no [T, L] activations for backward; False keeps 2·L per instance
    (the triton backend: p and q in x's dtype; torch: autograd's intermediates)."""
    T, D, L = 300, 16, 32
    x = torch.randn(T, D).to(device)
    weights = make_weights(D, L, None, requires_grad=True, device=device)
    inputs = T * D * 4 + sum(t.numel() * 4 for _, t in weight_tensors(weights))

    def run(recompute):
        return _saved_bytes(lambda: call(attention_pool, x, weights, recompute=recompute,
                                         backend=backend,
                                         offsets=torch.tensor([0, 100, T], device=device)))[0]

    lean, saving = run(True), run(False)
    assert lean - inputs < T * L * 4 / 2  # the scores and a few [T] vectors, nothing [T, L]
    assert saving - inputs >= T * 2 * L * 4  # p and q (or more), float32


@pytest.mark.parametrize("frozen", ["x", "weights", "score_weight_only", "x_and_projection"])
def test_gradients_only_where_asked(backend, device, frozen, monkeypatch):
    x, lay = make_layout("packed", [9, 0, 33], 20, device=device)
    weights = make_weights(20, 12, 2, device=device)
    x_grad = frozen not in ("x", "x_and_projection")
    xx = x.clone().requires_grad_(x_grad)
    ww = clone_weights(weights, requires_grad=False)
    trainable = {"x": list(ww), "weights": [], "score_weight_only": ["score_weight"],
                 "x_and_projection": ["score_weight"]}[frozen]
    for n in trainable:
        if ww[n] is not None:
            ww[n].requires_grad_()
    calls = []
    if backend == "triton":
        kernels = pytest.importorskip("fastmil.kernels.attention_pool")
        real = kernels.backward

        def spy(*args):
            out = real(*args)
            calls.append((args[-6:-2], [t is None for t in out]))
            return out

        monkeypatch.setattr(kernels, "backward", spy)
    z = call(attention_pool, xx, ww, backend=backend, **lay)
    up = torch.randn_like(z)
    leaves = ([xx] if x_grad else []) + [ww[n] for n in trainable if ww[n] is not None]
    got = torch.autograd.grad(z, leaves, up)
    xr, wr = x.double().requires_grad_(), clone_weights(weights, dtype=torch.float64)
    zr = call(attention_pool_reference, xr, wr, **lay)
    ref_leaves = ([xr] if x_grad else []) + [wr[n] for n in trainable if wr[n] is not None]
    want = torch.autograd.grad(zr, ref_leaves, up.double())
    for gg, gw in zip(got, want, strict=True):
        assert_close(gg, gw, torch.float32, what="grad")
    if backend == "triton":
        (need, none), = calls
        need_dh0, need_dpq, need_dw, need_db = need
        assert need_dh0 is x_grad
        assert need_dpq is (x_grad or frozen == "x")  # dx and the projection weights need it
        assert need_dw is (frozen != "weights")
        assert need_dpq is not (frozen == "x_and_projection")  # only dw: no [T, 2L] buffer
        assert need_db is (frozen == "x")
        assert none[0] is not x_grad  # no dx (and no [T, D] buffer) when x is frozen
        assert none[1] is not need_dpq


@pytest.mark.parametrize("lengths", [[3, 0, 7, 1, 12, 0, 0, 0, 0, 0, 0, 2, 9], [40], [2] * 9])
def test_torch_packed_weighted_sum_in_slices(monkeypatch, lengths):
    """The torch backend's packed weighted sum runs slice by slice: with slices of 5 rows, bags
    cross slice borders, and the bag ids within one slice span more than its rows (empty bags
    between)."""
    import fastmil.torch_backend as tb

    monkeypatch.setattr(tb, "POOL_ROWS", 5)
    _assert_matches_reference("torch", "packed", lengths, 6, 4, 2, return_attention=True)


@pytest.mark.parametrize(("layout", "lengths", "D", "L"), [
    ("packed", [3, 40, 0, 21], 6, 4), ("padded_mask", [37, 5, 0], 6, 4), ("single", [45], 6, 4),
    ("packed", [30, 19], 200, 100),  # weight gradients large enough for one GEMM per slice
], ids=["packed", "padded_mask", "single", "packed-large-weights"])
def test_torch_long_float32_sums_in_slices(monkeypatch, layout, lengths, D, L):
    """The torch backend's float32 sums over more rows than POOL_ROWS (weight gradients, the
    padded weighted sum, the softmax normaliser) run in slices: with slices of 16 (and 4) rows,
    every output and gradient still matches the float64 reference, and a second derivative
    through the sliced weight gradient does too."""
    import fastmil.torch_backend as tb

    monkeypatch.setattr(tb, "POOL_ROWS", 16)
    monkeypatch.setattr(tb, "SUM_ROWS", 4)
    sliced = []
    real = tb._sliced_weight_grad
    monkeypatch.setattr(tb, "_sliced_weight_grad", lambda *a: sliced.append(1) or real(*a))
    _assert_matches_reference("torch", layout, lengths, D, L, 2, return_attention=True)
    assert sliced  # the sliced weight gradient ran

    x, lay = make_layout(layout, lengths, D)
    weights = clone_weights(make_weights(D, L, None))
    w64 = clone_weights(weights, dtype=torch.float64)
    second = []
    for w, xx, fn in ((weights, x, attention_pool), (w64, x.double(), attention_pool_reference)):
        extra = {"backend": "torch"} if fn is attention_pool else {}
        z = call(fn, xx, w, **lay, **extra)
        (g,) = torch.autograd.grad(z.square().sum(), [w["attn_weight"]], create_graph=True)
        second.append(torch.autograd.grad(g.square().sum(), [w["gate_weight"]])[0])
    assert_close(second[0], second[1], torch.float32, what="d/dU |d/dV sum z²|²")


# ---------------------------------------------------------------- precision on long bags


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.slow
def test_float32_long_bag_at_least_as_precise_as_eager():
    """One bag of 10⁶ float32 instances: attention, z and every gradient of the torch backend are
    at least as close to float64 as CLAM's eager formulation (softmax along the last dim, one
    mm), in each layout, and the attention sums to 1. With 1 and with 16 intra-op threads, on
    any machine: a float32 GEMM over 10⁶ rows is precise to 3·10⁻⁵ or to 5·10⁻⁷ depending on
    how many threads split it, and eager takes whatever split it gets."""
    N, D, L = 10**6, 8, 4
    x = torch.randn(N, D)
    weights = make_weights(D, L, None, scale=2.0)
    weights["score_bias"] = None
    w64 = {n: None if t is None else t.double() for n, t in weights.items()}
    want, g_want = _fwd_bwd(attention_pool_reference, x.double(), w64, return_attention=True)

    def clam(x, V, U, w, *, attn_bias, gate_bias, score_bias, return_attention):
        h = torch.tanh(torch.nn.functional.linear(x, V, attn_bias))
        h = h * torch.sigmoid(torch.nn.functional.linear(x, U, gate_bias))
        A = torch.softmax((h @ w[:, None]).t(), dim=1)  # [1, N], softmax over the last dim
        return (A @ x)[0], A[0]

    layouts = {"single": (x, {}), "packed": (x, {"offsets": torch.tensor([0, N])}),
               "padded": (x[None], {})}
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 16):
            torch.set_num_threads(n_threads)
            eager, g_eager = _fwd_bwd(clam, x, weights, return_attention=True)
            tol = {"z": _rel_err(eager[0], want[0]), "attention": _rel_err(eager[1], want[1])}
            tol |= {n: _rel_err(g_eager[n], g_want[n]) for n in g_want}
            for layout, (xx, lay) in layouts.items():
                got, g = _fwd_bwd(attention_pool, xx, weights, backend="torch",
                                  return_attention=True, **lay)
                z, a = (got[0][0], got[1][0]) if layout == "padded" else got
                assert abs(a.double().sum().item() - 1) < 1e-6, (n_threads, layout)
                errs = {"z": _rel_err(z, want[0]), "attention": _rel_err(a, want[1])}
                errs |= {n: _rel_err(g[n].reshape(g_want[n].shape), g_want[n]) for n in g_want}
                for name, err in errs.items():
                    assert err <= 1.05 * tol[name] + 1e-7, (n_threads, layout, name, err,
                                                            tol[name])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("path", "pool_rows", "dense_cols", "lengths"), [
    ("one", 16, 32, [3, 0, 16, 9, 12]),  # T > POOL_ROWS, no bag longer: one GEMM for all rows
    ("sliced", 16, 32, [3, 40, 0, 21]),  # a bag longer than POOL_ROWS: one bmm over the slices
    ("index_add", 16, 0, [3, 40, 0, 21]),  # no GEMM: index_add slice by slice
    ("index_add", 64, 0, [3, 40, 0, 21]),  # ... in one slice
], ids=["one", "sliced", "index_add-sliced", "index_add-one-slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_packed_weighted_sum_paths(monkeypatch, path, pool_rows, dense_cols, lengths,
                                         dtype):
    """Each way the torch backend's packed weighted sum runs (one GEMM of one-hot weights, one
    per slice, index_add) matches the float64 reference, forward and backward; 16-bit x goes
    slice by slice (each converted to float32 on its own)."""
    import fastmil.torch_backend as tb

    monkeypatch.setattr(tb, "POOL_ROWS", pool_rows)
    monkeypatch.setattr(tb, "DENSE_COLS", dense_cols)
    rows = []  # rows of the slices that one-hot GEMMs ran on
    real = tb._one_hot_weights
    monkeypatch.setattr(tb, "_one_hot_weights",
                        lambda a_s, *rest: rows.append(tuple(a_s.shape[:2])) or real(a_s, *rest))
    _assert_matches_reference("torch", "packed", lengths, 64, 8, 2, dtype=dtype,
                              return_attention=True)
    T = sum(lengths)
    if path == "index_add":
        assert rows == []
    elif path == "one" and dtype == torch.float32:
        assert rows == [(1, T)]  # forward only: the backward reuses the weights
    else:
        assert rows and all(S <= pool_rows for _, S in rows)
        assert dtype == torch.float32 or all(n == 1 for n, _ in rows)


@pytest.mark.parametrize(("dense_cols", "lengths"), [
    (32, [190, 210] * 4),  # no bag longer than POOL_ROWS: one GEMM
    (32, [30, 400, 0, 210, 900, 20]),  # one GEMM per slice
    (0, [30, 400, 0, 210, 900, 20]),  # index_add per slice
    (32, [12] * 130),  # too many bags per slice for GEMMs: index_add per slice
], ids=["one", "sliced", "index_add", "many-bags"])
def test_torch_packed_keeps_no_x_sized_temporary(monkeypatch, dense_cols, lengths):
    """Forward and backward of the torch backend's packed path (x and every weight trained)
    make no tensor of a quarter of x's size or more but x's gradient: the weighted sum's
    products stay within one slice, its one-hot weights within a quarter of x, and x's two
    gradients (the projection's, the weighted sum's) are added in place, not as a third."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fastmil.torch_backend as tb

    monkeypatch.setattr(tb, "POOL_ROWS", 256)
    monkeypatch.setattr(tb, "DENSE_COLS", dense_cols)
    D = 128
    x, lay = make_layout("packed", lengths, D)
    T = x.shape[0]
    big = {}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.numel() * 4 >= T * D:
                    big[t.untyped_storage().data_ptr()] = (str(func), tuple(t.shape))
            return out

    weights = clone_weights(make_weights(D, 4, None))
    xx = x.clone().requires_grad_()
    big[xx.untyped_storage().data_ptr()] = "x"  # views of x itself
    with Watch():
        z = call(attention_pool, xx, weights, backend="torch", **lay)
        (gx,) = torch.autograd.grad(z.square().sum(), [xx])
    del big[xx.untyped_storage().data_ptr()]
    assert [shape for _, shape in big.values()] == [(T, D)], big
    assert gx.untyped_storage().data_ptr() in big


def test_torch_all_true_mask_is_no_mask():
    """Padded input whose CPU mask is all True pools as without the mask (the same results,
    bit for bit), without the masked copy of x."""
    x, _ = make_layout("padded", [9, 9, 9], 16)
    weights = make_weights(16, 8, 2)
    with OpCounter() as ops:
        got, g = _fwd_bwd(attention_pool, x, weights, backend="torch", return_attention=True,
                          mask=torch.ones(3, 9, dtype=torch.bool))
    want, g_want = _fwd_bwd(attention_pool, x, weights, backend="torch", return_attention=True)
    assert ops.counts and "masked_fill" not in ops.counts
    for t, u in zip([*got, *g.values()], [*want, *g_want.values()], strict=True):
        assert torch.equal(t, u)


@pytest.mark.parametrize("lengths", [[40, 40], [32, 32], [7] * 5, [45]],
                         ids=["sliced-per-bag", "sliced-one-bmm", "short", "one-bag"])
def test_torch_packed_bags_of_one_length_pool_as_padded(monkeypatch, lengths):
    """Packed bags that all have one length (CPU offsets) are pooled as the padded batch they
    are, through views of x (slices of 16 rows, so that long bags go slice by slice): the same
    results as the float64 reference, without the segment weighted sum."""
    import fastmil.torch_backend as tb

    monkeypatch.setattr(tb, "POOL_ROWS", 16)

    def segment_sum(*args):
        raise AssertionError("the segment weighted sum ran")

    monkeypatch.setattr(tb._SegmentWeightedSum, "apply", segment_sum)
    _assert_matches_reference("torch", "packed", lengths, 6, 4, 2, return_attention=True)
