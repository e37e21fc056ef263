"""Properties of attention pooling that hold whatever the backend: permutation equivariance,
indifference to padding, agreement of layouts; and the bag utilities pack/pad/unpad/collate."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    call,
    clone_weights,
    grads,
    make_bags,
    make_layout,
    make_weights,
    weight_tensors,
)

from fastmil import attention_pool, collate, pack, pad, unpad
from fastmil.bags import lengths_to_offsets

LENGTHS = [5, 0, 1, 33, 8]


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("layout", ["packed", "padded_mask", "single"])
def test_permuting_instances_permutes_attention(backend, device, layout, K):
    D, L = 8, 6
    weights = make_weights(D, L, K, device=device)
    x, kw = make_layout(layout, [33] if layout == "single" else LENGTHS, D, device=device)
    z, a = call(attention_pool, x, weights, return_attention=True, backend=backend, **kw)

    if layout == "packed":  # a random permutation inside each bag's segment
        off = kw["offsets"].tolist()
        perm = torch.cat([s + torch.randperm(e - s) for s, e in zip(off[:-1], off[1:], strict=True)])
        perm = perm.to(device)
        xp, kwp = x[perm], kw
        expected_a = a[perm]
    elif layout == "padded_mask":  # permute every row's slots, padding included
        perm = torch.stack([torch.randperm(x.shape[1]) for _ in range(x.shape[0])])  # [B, N]
        perm = perm.to(device)
        rows = torch.arange(x.shape[0], device=device)[:, None]
        xp, kwp = x[rows, perm], {"mask": kw["mask"][rows, perm]}
        expected_a = a[rows, perm]
    else:
        perm = torch.randperm(x.shape[0]).to(device)
        xp, kwp = x[perm], kw
        expected_a = a[perm]
    assert not torch.equal(xp, x)  # the permutation did move instances
    zp, ap = call(attention_pool, xp, weights, return_attention=True, backend=backend, **kwp)
    assert_close(zp, z, what="z after permutation")
    assert_close(ap, expected_a, what="attention after permutation")


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
def test_extra_masked_padding_changes_nothing(backend, device, K):
    D, L, extra = 8, 6, 13
    weights = make_weights(D, L, K, device=device)
    x, kw = make_layout("padded_mask", LENGTHS, D, device=device)
    B, N, _ = x.shape
    garbage = (torch.randn(B, extra, D) * 100).to(device)
    x2 = torch.cat([x, garbage], dim=1)
    mask2 = torch.cat([kw["mask"], torch.zeros(B, extra, dtype=torch.bool, device=device)], dim=1)

    def run(xx, mask):
        xx, ww = xx.clone().requires_grad_(), clone_weights(weights)
        z, a = call(attention_pool, xx, ww, mask=mask, return_attention=True, backend=backend)
        g = grads(z, torch.ones_like(z), [xx] + [t for _, t in weight_tensors(ww)])
        return z, a, g

    z, a, g = run(x, kw["mask"])
    z2, a2, g2 = run(x2, mask2)
    assert_close(z2, z, what="z")
    assert_close(a2[:, :N], a, what="attention")
    assert torch.equal(a2[:, N:], torch.zeros_like(a2[:, N:]))
    assert torch.equal(g2[0][:, N:], torch.zeros_like(g2[0][:, N:]))  # no grad into padding
    assert_close(g2[0][:, :N], g[0], what="grad of x")
    for gw2, gw in zip(g2[1:], g[1:], strict=True):
        assert_close(gw2, gw, what="grad of a weight")


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_padding_is_ignored(backend, device, fill):
    """Masked slots may hold anything (e.g. torch.empty padding): z and grads stay finite."""
    D, L = 8, 6
    weights = make_weights(D, L, 2, requires_grad=True, device=device)
    x, kw = make_layout("padded_mask", [3, 0, 4], D, device=device)
    clean = x.masked_fill(~kw["mask"][..., None], 0)
    dirty = x.masked_fill(~kw["mask"][..., None], fill).requires_grad_()
    z = call(attention_pool, dirty, weights, backend=backend, **kw)
    z_ref = call(attention_pool, clean, weights, backend=backend, **kw)
    assert_close(z, z_ref, what="z with non-finite padding")
    for t in [dirty] + [t for _, t in weight_tensors(weights)]:
        (g,) = torch.autograd.grad(z.sum(), t, retain_graph=True)
        assert torch.isfinite(g).all()


def test_mask_all_true_equals_no_mask(backend, device):
    weights = make_weights(8, 6, 3, device=device)
    x, _ = make_layout("padded", [9, 9, 9], 8, device=device)
    z0, a0 = call(attention_pool, x, weights, return_attention=True, backend=backend)
    z1, a1 = call(attention_pool, x, weights,
                  mask=torch.ones(3, 9, dtype=torch.bool, device=device),
                  return_attention=True, backend=backend)
    assert_close(z1, z0, what="z")
    assert_close(a1, a0, what="attention")


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_packed_padded_and_per_bag_agree(backend, device, gated, K):
    D, L = 8, 6
    weights = make_weights(D, L, K, gated, device=device)
    bags = make_bags([5, 0, 1, 33, 200], D, device=device)
    x, offsets = pack(bags)
    xp, mask = pad(x, offsets)

    u = torch.randn((D,) if K is None else (K, D)).to(device)  # one upstream gradient, every bag

    def run(xx, **kw):
        xx, ww = xx.clone().requires_grad_(), clone_weights(weights)
        z, a = call(attention_pool, xx, ww, return_attention=True, backend=backend, **kw)
        return z, a, grads(z, u.expand_as(z), [t for _, t in weight_tensors(ww)])

    z_packed, a_packed, g_packed = run(x, offsets=offsets)
    z_padded, a_padded, g_padded = run(xp, mask=mask)
    singles = [run(bag) for bag in bags]

    assert_close(z_padded, z_packed, what="padded vs packed z")
    assert_close(a_padded[mask], a_packed, what="padded vs packed attention")
    assert_close(torch.stack([s[0] for s in singles]), z_packed, what="per-bag vs packed z")
    assert_close(torch.cat([s[1] for s in singles]), a_packed, what="per-bag vs packed attention")
    for i in range(len(g_packed)):
        assert_close(g_padded[i], g_packed[i], what="padded vs packed weight grad")
        assert_close(sum(s[2][i] for s in singles), g_packed[i], what="per-bag vs packed grad")


def test_one_packed_bag_equals_single_bag(backend, device):
    weights = make_weights(8, 6, 2, device=device)
    (bag,) = make_bags([17], 8, device=device)
    z1, a1 = call(attention_pool, bag, weights, return_attention=True, backend=backend)
    z2, a2 = call(attention_pool, bag, weights, offsets=torch.tensor([0, 17], device=device),
                  return_attention=True, backend=backend)
    assert_close(z2[0], z1, what="z")
    assert_close(a2, a1, what="attention")


# ---------------------------------------------------------------- bag utilities


def test_pack_shapes_and_offsets():
    bags = make_bags([3, 0, 2], 4)
    x, offsets = pack(bags)
    assert x.shape == (5, 4) and offsets.dtype == torch.int64
    assert offsets.tolist() == [0, 3, 3, 5]
    assert torch.equal(x, torch.cat(bags))
    x2, offsets2 = pack(tuple(bags))
    assert torch.equal(x2, x) and torch.equal(offsets2, offsets)
    assert lengths_to_offsets(torch.tensor([3, 0, 2])).tolist() == [0, 3, 3, 5]
    assert lengths_to_offsets(torch.tensor([], dtype=torch.int64)).tolist() == [0]


def test_pad_shapes_values_and_mask():
    bags = make_bags([3, 0, 1], 2, torch.float16)
    x, offsets = pack(bags)
    xp, mask = pad(x, offsets, value=-7.0)
    assert xp.shape == (3, 3, 2) and xp.dtype == torch.float16 and mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert torch.equal(xp[0], bags[0]) and torch.equal(xp[2, :1], bags[2])
    assert (xp[~mask] == -7.0).all()
    xp32, mask32 = pad(x, offsets.to(torch.int32))
    assert torch.equal(mask32, mask) and (xp32[~mask] == 0).all()
    xe, me = pad(torch.zeros(0, 5), torch.tensor([0]))
    assert xe.shape == (0, 0, 5) and me.shape == (0, 0)
    xe, me = pad(torch.zeros(0, 5), torch.tensor([0, 0, 0]))
    assert xe.shape == (2, 0, 5) and me.shape == (2, 0)


def test_unpad_keeps_instance_order_with_holes():
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    xu, offsets = unpad(x, mask)
    assert xu.flatten().tolist() == [0.0, 2.0, 3.0, 5.0]
    assert offsets.tolist() == [0, 3, 4] and offsets.dtype == torch.int64


@pytest.mark.parametrize("lengths", [[3, 0, 1, 7], [0], [4], [2, 2]])
def test_pad_unpad_round_trip(lengths):
    x, offsets = pack(make_bags(lengths, 3))
    xp, mask = pad(x, offsets)
    assert mask.sum(1).tolist() == lengths
    x2, offsets2 = unpad(xp, mask)
    assert torch.equal(x2, x) and torch.equal(offsets2, offsets)
    xp3, mask3 = pad(x2, offsets2)
    assert torch.equal(xp3, xp) and torch.equal(mask3, mask)


def test_collate():
    bags = make_bags([2, 0, 3], 4)
    x, offsets, labels = collate([(bags[0], 1), (bags[1], 0), (bags[2], 1)])
    assert torch.equal(x, torch.cat(bags)) and offsets.tolist() == [0, 2, 2, 5]
    assert labels.tolist() == [1, 0, 1] and labels.dtype == torch.int64
    _, _, labels = collate([(bags[0], torch.tensor([1.0, 0.0])), (bags[2], torch.tensor([0., 1.]))])
    assert labels.shape == (2, 2) and labels.dtype == torch.float32
    # what collate returns feeds attention_pool directly
    z = attention_pool(x, *[make_weights(4, 3, None)[n] for n in
                            ("attn_weight", "gate_weight", "score_weight")], offsets=offsets,
                       backend="torch")
    assert z.shape == (3, 4) and torch.equal(z[1], torch.zeros(4))


@pytest.mark.parametrize(("bags", "match"), [
    ([], "non-empty list"),
    (torch.zeros(2, 3), "non-empty list"),
    ([torch.zeros(3)], r"bags\[0\] must be a 2-D"),
    ([torch.zeros(2, 3), "no"], r"bags\[1\] must be a 2-D"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], r"bags\[1\] has D = 4 but bags\[0\] has D = 3"),
    ([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)], r"bags\[1\] is torch.float64"),
])
def test_pack_errors(bags, match):
    with pytest.raises(ValueError, match=match):
        pack(bags)


@pytest.mark.parametrize(("x", "offsets", "match"), [
    (torch.zeros(2, 3, 4), torch.tensor([0, 2]), r"x must be packed \[T, D\]"),
    (torch.zeros(4, 3), torch.tensor([[0, 4]]), "offsets must be 1-D"),
    (torch.zeros(4, 3), torch.zeros(0, dtype=torch.int64), "offsets must be 1-D"),
    (torch.zeros(4, 3), torch.tensor([1, 3, 5]), r"offsets must start at 0, got offsets\[0\] = 1"),
    (torch.zeros(4, 3), torch.tensor([0, 3, 5]), r"must end at x.shape\[0\] = 4 \(T\), got offsets\[-1\] = 5"),
    (torch.zeros(4, 3), torch.tensor([0, 3, 1, 4]), "non-decreasing"),
])
def test_pad_errors(x, offsets, match):
    with pytest.raises(ValueError, match=match):
        pad(x, offsets)


@pytest.mark.parametrize(("x", "mask"), [
    (torch.zeros(4, 3), torch.ones(4, dtype=torch.bool)),
    (torch.zeros(2, 4, 3), torch.ones(2, 5, dtype=torch.bool)),
    (torch.zeros(2, 4, 3), torch.ones(2, 4)),
])
def test_unpad_errors(x, mask):
    with pytest.raises(ValueError, match=r"need x \[B, N, D\] and a bool mask \[B, N\]"):
        unpad(x, mask)


def test_collate_empty_batch():
    with pytest.raises(ValueError, match="collate got an empty batch"):
        collate([])



def test_pad_rejects_float_offsets():
    with pytest.raises(TypeError, match="offsets must be int32 or int64, got torch.float32"):
        pad(torch.zeros(4, 3), torch.tensor([0.0, 4.0]))
