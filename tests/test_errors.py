"""Every malformed input raises the promised error type, with a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WEIGHT_NAMES, call, make_weights

from fastmil import AttentionPool, attention_pool

D, L, K = 6, 4, 3


def _inputs(layout="padded", K=K):
    """A valid call: (x, weights, kwargs). Padded x [2, 5, D] or packed x [7, D]."""
    w = make_weights(D, L, K)
    if layout == "padded":
        return torch.randn(2, 5, D), w, {"mask": torch.ones(2, 5, dtype=torch.bool)}
    return torch.randn(7, D), w, {"offsets": torch.tensor([0, 3, 7])}


def _raises(exc, match, x, weights, **kwargs):
    with pytest.raises(exc, match=match):
        call(attention_pool, x, weights, backend="torch", **kwargs)


def test_valid_inputs_do_not_raise():
    for layout in ("padded", "packed"):
        x, w, kw = _inputs(layout)
        assert call(attention_pool, x, w, backend="torch", **kw).shape[-2:] == (K, D)


@pytest.mark.parametrize("shape", [(D,), (1, 2, 3, D)])
def test_x_ndim(shape):
    _, w, _ = _inputs()
    _raises(ValueError, r"x must be 2-D or 3-D, got a \d-D tensor", torch.randn(shape), w)


@pytest.mark.parametrize("x", [[[1.0] * D], np.ones((3, D), dtype=np.float32), None],
                         ids=["list", "numpy", "None"])
def test_x_not_a_tensor(x):
    _, w, _ = _inputs()
    _raises(TypeError, "x must be a torch.Tensor", x, w)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_x_dtype(dtype):
    _, w, _ = _inputs()
    _raises(TypeError, "x must be float16, bfloat16, float32 or float64",
            torch.ones(3, D, dtype=dtype), w)


@pytest.mark.parametrize(("name", "shape", "match"), [
    ("attn_weight", (L,), "attn_weight must be 2-D, got a 1-D"),
    ("attn_weight", (1, L, D), "attn_weight must be 2-D, got a 3-D"),
    ("gate_weight", (L,), "gate_weight must be 2-D, got a 1-D"),
    ("score_weight", (1, K, L), "score_weight must be 1-D or 2-D, got a 3-D"),
    ("attn_bias", (1, L), "attn_bias must be 1-D, got a 2-D"),
    ("gate_bias", (1, L), "gate_bias must be 1-D, got a 2-D"),
    ("score_bias", (1, K), "score_bias must be 0-D or 1-D, got a 2-D"),
])
def test_weight_ndim(name, shape, match):
    x, w, kw = _inputs()
    w[name] = torch.randn(shape)
    _raises(ValueError, match, x, w, **kw)


@pytest.mark.parametrize(("name", "shape", "match"), [
    ("attn_weight", (L, D + 1), r"attn_weight has shape \(4, 7\).*x.shape\[-1\] \(D\) = 6"),
    ("gate_weight", (L, D + 1), r"gate_weight has shape \(4, 7\) but must match attn_weight"),
    ("gate_weight", (L + 1, D), r"gate_weight has shape \(5, 6\) but must match attn_weight"),
    ("score_weight", (K, L + 1), r"score_weight has shape \(3, 5\).*\(L\) = 4"),
    ("attn_bias", (L + 1,), r"attn_bias has shape \(5,\).*\(L\) = 4"),
    ("gate_bias", (L - 1,), r"gate_bias has shape \(3,\).*\(L\) = 4"),
    ("score_bias", (K + 1,), r"score_bias has shape \(4,\).*shape \(3,\)"),
    ("score_bias", (), r"score_bias has shape \(\).*shape \(3,\)"),
])
def test_size_mismatch(name, shape, match):
    x, w, kw = _inputs()
    w[name] = torch.randn(shape)
    _raises(ValueError, match, x, w, **kw)


def test_score_bias_size_for_1d_score_weight():
    x, w, kw = _inputs(K=None)
    w["score_bias"] = torch.randn(2)
    _raises(ValueError, r"score_bias has shape \(2,\).*shape \(1,\)", x, w, **kw)


def test_gate_bias_without_gate_weight():
    x, w, kw = _inputs()
    w["gate_weight"] = None
    _raises(ValueError, "gate_bias was given without gate_weight", x, w, **kw)


@pytest.mark.parametrize("name", ["attn_weight", "score_weight"])
def test_required_weight_is_none(name):
    x, w, kw = _inputs()
    w[name] = None
    _raises(TypeError, f"{name} must be a torch.Tensor, got None", x, w, **kw)


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_weight_not_a_tensor(name):
    x, w, kw = _inputs()
    w[name] = w[name].tolist()
    _raises(TypeError, f"{name} must be a torch.Tensor, got list", x, w, **kw)


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_mixed_dtypes(name):
    x, w, kw = _inputs()
    w[name] = w[name].double()
    _raises(TypeError, f"{name} has dtype torch.float64 but x has torch.float32", x, w, **kw)


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_mixed_devices(name):
    # a "meta" tensor stands in for a second device: validation reads only shapes and devices
    x, w, kw = _inputs()
    w[name] = w[name].to("meta")
    _raises(ValueError, f"{name} is on meta but x is on cpu", x, w, **kw)


def test_mask_with_offsets():
    x, w, kw = _inputs("packed")
    _raises(ValueError, "mask and offsets were both given", x, w, **kw,
            mask=torch.ones(7, dtype=torch.bool))


def test_mask_with_2d_x():
    x, w, _ = _inputs("packed")
    _raises(ValueError, r"mask is for padded x \[B, N, D\], but x is 2-D", x, w,
            mask=torch.ones(7, dtype=torch.bool))


@pytest.mark.parametrize(("mask", "exc", "match"), [
    (torch.ones(2, 4, dtype=torch.bool), ValueError, r"mask has shape \(2, 4\) but must be"),
    (torch.ones(2, 5, 1, dtype=torch.bool), ValueError, r"mask has shape \(2, 5, 1\)"),
    (torch.ones(10, dtype=torch.bool), ValueError, r"mask has shape \(10,\)"),
    (torch.ones(2, 5), TypeError, "mask must be bool or an integer dtype.*got torch.float32: a "
     "floating mask is ambiguous"),
    (torch.ones(2, 5, dtype=torch.float16), TypeError, "mask must be bool.*torch.float16"),
    ([[True] * 5] * 2, TypeError, "mask must be a torch.Tensor, got list"),
    (torch.ones(2, 5, dtype=torch.bool, device="meta"), ValueError, "mask is on meta"),
])
def test_bad_mask(mask, exc, match):
    x, w, _ = _inputs()
    _raises(exc, match, x, w, mask=mask)


def test_offsets_with_3d_x():
    x, w, _ = _inputs()
    _raises(ValueError, r"offsets are for packed x \[T, D\], but x is 3-D", x, w,
            offsets=torch.tensor([0, 5]))


@pytest.mark.parametrize(("offsets", "exc", "match"), [
    (torch.tensor([[0, 3, 7]]), ValueError, r"offsets must be 1-D \[B\+1\], got shape \(1, 3\)"),
    (torch.zeros(0, dtype=torch.int64), ValueError, r"offsets must be 1-D \[B\+1\].*\(0,\)"),
    (torch.tensor([0.0, 3.0, 7.0]), TypeError, "offsets must be int32 or int64.*float32"),
    (torch.tensor([0, 3, 7], dtype=torch.int16), TypeError, "offsets must be int32 or int64"),
    ([0, 3, 7], TypeError, "offsets must be a torch.Tensor, got list"),
    (torch.tensor([1, 3, 7]), ValueError, r"offsets must start at 0, got offsets\[0\] = 1"),
    (torch.tensor([0, 5, 3, 7]), ValueError,
     r"offsets must be non-decreasing, but offsets\[2\] = 3 < offsets\[1\] = 5"),
    (torch.tensor([0, 3, 6]), ValueError,
     r"offsets must end at x.shape\[0\] = 7 \(T\), got offsets\[-1\] = 6"),
    (torch.tensor([0, 3, 8]), ValueError, r"offsets must end at x.shape\[0\] = 7"),
    (torch.tensor([0]), ValueError, r"offsets must end at x.shape\[0\] = 7"),
    (torch.tensor([0, 3, 7], device="meta"), ValueError, "offsets is on meta"),
])
def test_bad_offsets(offsets, exc, match):
    x, w, _ = _inputs("packed")
    _raises(exc, match, x, w, offsets=offsets)


def test_check_offsets_values_directly():
    """The public check (numpy on the host): fine offsets of either int dtype and any stride
    pass; every kind of bad offsets names what is wrong."""
    from fastmil.bags import check_offsets_values

    check_offsets_values(torch.tensor([0, 3, 3, 7]), 7)
    check_offsets_values(torch.tensor([0, 3, 3, 7], dtype=torch.int32), 7)
    check_offsets_values(torch.tensor([0, 9, 3, 9, 7])[::2], 7)  # [0, 3, 7], strided
    for offsets, match in [([], "got an empty tensor"), ([2, 7], "start at 0"),
                           ([0, 4, 3, 7], r"offsets\[2\] = 3 < offsets\[1\] = 4"),
                           ([0, 3, 6], "end at x.shape")]:
        with pytest.raises(ValueError, match=match):
            check_offsets_values(torch.tensor(offsets, dtype=torch.int64), 7)


def test_int32_offsets_accepted():
    x, w, kw = _inputs("packed")
    z64 = call(attention_pool, x, w, backend="torch", **kw)
    z32 = call(attention_pool, x, w, backend="torch", offsets=kw["offsets"].int())
    assert torch.equal(z32, z64)


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None, 1])
def test_unknown_backend(backend):
    x, w, kw = _inputs()
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\)"):
        call(attention_pool, x, w, backend=backend, **kw)


@pytest.mark.parametrize("value", [1, 0, "yes", None, torch.tensor(True)])
@pytest.mark.parametrize("name", ["return_attention", "return_scores"])
def test_return_flags_not_bool(name, value):
    x, w, kw = _inputs()
    _raises(TypeError, f"{name} must be a bool", x, w, **{name: value}, **kw)


@pytest.mark.parametrize("value", ["sigmoid", "Tanh", None, 1])
def test_unknown_activation(value):
    x, w, kw = _inputs()
    _raises(ValueError, r"activation must be one of \('tanh', 'relu', 'gelu'\)", x, w,
            activation=value, **kw)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, True, "0.25", None, float("nan")])
def test_bad_dropout_p(value):
    x, w, kw = _inputs()
    _raises(ValueError, r"dropout_p must be a number in \[0, 1\)", x, w, dropout_p=value, **kw)


@pytest.mark.parametrize("value", [1, "yes", torch.tensor(True)])
def test_bad_recompute(value):
    x, w, kw = _inputs()
    _raises(TypeError, "recompute must be None, True or False", x, w, recompute=value, **kw)


def test_x_not_a_tensor_under_autocast():
    _, w, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _raises(TypeError, "x must be a torch.Tensor", [[1.0] * D], w)


# ---------------------------------------------------------------- AttentionPool


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(in_dim=0), "in_dim must be a positive int, got 0"),
    (dict(in_dim=-3), "in_dim must be a positive int, got -3"),
    (dict(in_dim=2.5), "in_dim must be a positive int, got 2.5"),
    (dict(in_dim="8"), "in_dim must be a positive int, got '8'"),
    (dict(in_dim=8, attn_dim=0), "attn_dim must be a positive int, got 0"),
    (dict(in_dim=8, attn_dim=None), "attn_dim must be a positive int, got None"),
    (dict(in_dim=8, branches=0), "branches must be None or a positive int, got 0"),
    (dict(in_dim=8, branches=2.0), "branches must be None or a positive int, got 2.0"),
    (dict(in_dim=True, attn_dim=4), "in_dim must be a positive int, got True"),
    (dict(in_dim=8, backend="cuda"), r"backend must be one of \('auto', 'torch', 'triton'\)"),
    (dict(in_dim=8, activation="sigmoid"), r"activation must be one of \('tanh', 'relu', "
     r"'gelu'\), got 'sigmoid'"),
    (dict(in_dim=8, dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(in_dim=8, dropout=-0.5), r"dropout must be a number in \[0, 1\), got -0.5"),
])
def test_attention_pool_module_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionPool(**kwargs)


@pytest.mark.parametrize("name", ["gated", "bias"])
def test_attention_pool_module_flags_must_be_bool(name):
    with pytest.raises(TypeError, match=f"{name} must be a bool, got 'yes'"):
        AttentionPool(8, **{name: "yes"})


def test_module_forward_validates():
    pool = AttentionPool(8, 4, backend="torch")
    with pytest.raises(ValueError, match=r"attn_weight has shape \(4, 8\).*\(D\) = 6"):
        pool(torch.randn(3, 6))
    with pytest.raises(TypeError, match="attn_weight has dtype torch.float32 but x has "
                                        "torch.float64"):
        pool(torch.randn(3, 8, dtype=torch.float64))


def test_module_recompute_must_be_bool_or_none():
    with pytest.raises(TypeError, match="recompute must be None, True or False, got 'yes'"):
        AttentionPool(8, recompute="yes")


def test_from_torchmil_rejects_lazy_module():
    tm = pytest.importorskip("torchmil.nn.attention",
                             reason="torchmil (pip install torchmil) is needed for this test")
    lazy = tm.AttentionPool(in_dim=None, att_dim=4, gated=True)
    msg = (r"from_torchmil: the torchmil module's fc1 is still lazy \(in_dim=None\): run it once "
           "or build it with in_dim before converting")
    with pytest.raises(ValueError, match=msg):
        AttentionPool.from_torchmil(lazy)
    # a state dict gives the lazy layers weights but not their size (in_features stays 0):
    # still lazy until the first call, not "in_dim must be a positive int, got 0"
    lazy.load_state_dict(tm.AttentionPool(in_dim=8, att_dim=4, gated=True).state_dict())
    with pytest.raises(ValueError, match=msg):
        AttentionPool.from_torchmil(lazy)
    lazy(torch.randn(1, 3, 8))  # the first call sets the size: converts from then on
    assert AttentionPool.from_torchmil(lazy).in_dim == 8


def test_from_torchmil_rejects_a_layer_other_than_linear():
    tm = pytest.importorskip("torchmil.nn.attention",
                             reason="torchmil (pip install torchmil) is needed for this test")
    pool = tm.AttentionPool(in_dim=8, att_dim=4, gated=True)
    pool.fc_gated = torch.nn.Sequential(torch.nn.Linear(8, 4))
    with pytest.raises(ValueError, match="from_torchmil: the torchmil module's fc_gated is a "
                                         "Sequential, not torchmil's LazyLinear or an nn.Linear"):
        AttentionPool.from_torchmil(pool)


def test_from_torchmil_rejects_other_module():
    with pytest.raises(ValueError, match="from_torchmil supports torchmil AttentionPool"):
        AttentionPool.from_torchmil(torch.nn.Linear(3, 4))


def test_from_clam_rejects_other_modules():
    with pytest.raises(TypeError, match="from_clam expects CLAM's Attn_Net_Gated or Attn_Net, "
                                        "got Linear"):
        AttentionPool.from_clam(torch.nn.Linear(3, 4))

    class NotAttnNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(),
                                              torch.nn.Linear(4, 1))

    with pytest.raises(ValueError, match=r"from_clam expects Attn_Net's Sequential\(Linear, "
                                         r"Tanh"):
        AttentionPool.from_clam(NotAttnNet())
