"""fastmil against independent implementations of attention-MIL pooling: torchmil's
AttentionPool and PyTorch Geometric's segment softmax, and the conversion of CLAM-layout
attention nets (CLAM's own models are checked in test_clam_dropin.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, make_bags, make_layout, make_weights
from torch import nn

import fastmil
from fastmil import AttentionPool

# ---------------------------------------------------------------- torchmil


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_torchmil_attention_pool(backend, device, gated, masked):
    tm = pytest.importorskip("torchmil.nn.attention",
                             reason="torchmil (pip install torchmil) is needed for this test")
    D, L = 16, 8
    peer = tm.AttentionPool(in_dim=D, att_dim=L, act="tanh", gated=gated).to(device).eval()
    with torch.no_grad():  # torchmil's fc2 has default init; make scores spread out
        peer.fc2.weight.mul_(4)
    pool = AttentionPool.from_torchmil(peer, backend=backend)
    assert pool.gated is gated

    # torchmil returns NaN for a fully masked bag, so every bag here has an instance
    x, kw = make_layout("padded_mask", [3, 1, 7, 40], D, device=device) if masked else \
        make_layout("padded", [9, 9, 9], D, device=device)
    mask = kw.get("mask")
    z_peer, f_peer = peer(x, mask=mask, return_att=True)
    z, a = pool(x, mask=mask, return_attention=True)
    assert z.shape == z_peer.shape == (x.shape[0], D)
    assert_close(z, z_peer, what="z vs torchmil")
    # torchmil returns the raw scores f; its attention is their masked softmax
    s = f_peer if mask is None else f_peer.masked_fill(~mask, float("-inf"))
    assert_close(a, torch.softmax(s, dim=1), what="attention vs torchmil")
    assert a.max() > 2 * a[a > 0].min()  # not uniform: the scores matter


def test_torchmil_lazy_module_after_first_call(backend, device):
    tm = pytest.importorskip("torchmil.nn.attention",
                             reason="torchmil (pip install torchmil) is needed for this test")
    peer = tm.AttentionPool(in_dim=None, att_dim=8, gated=True).to(device).eval()
    x = torch.randn(2, 6, 12).to(device)
    z_peer = peer(x)  # materializes the lazy layers
    pool = AttentionPool.from_torchmil(peer, backend=backend)
    assert pool.in_dim == 12 and pool.attn_dim == 8
    assert_close(pool(x), z_peer, what="z vs torchmil (lazy)")


# ---------------------------------------------------------------- CLAM layout
# Attention nets laid out as CLAM's Attn_Net_Gated / Attn_Net are (attribute names and layer
# order: facts of CLAM's models/model_clam.py), built here, and the pooling CLAM's models do
# with them, written out: scores A = net(h) [N, K], softmax over N, M = Aᵀ h.


def clam_layout_net(feat, hidden, gated, n_classes, dropout):
    net = nn.Module()
    drop = [nn.Dropout(0.25)] if dropout else []
    if gated:
        net.attention_a = nn.Sequential(nn.Linear(feat, hidden), nn.Tanh(), *drop)
        net.attention_b = nn.Sequential(nn.Linear(feat, hidden), nn.Sigmoid(), *drop)
        net.attention_c = nn.Linear(hidden, n_classes)
    else:
        net.module = nn.Sequential(nn.Linear(feat, hidden), nn.Tanh(), *drop,
                                   nn.Linear(hidden, n_classes))
    return net


def clam_layout_pool(net, h):
    """M [K, feat] and A [K, N] of one bag h [N, feat], from the net's layers."""
    if hasattr(net, "attention_a"):
        scores = net.attention_c(net.attention_a(h) * net.attention_b(h))
    else:
        scores = net.module(h)
    A = F.softmax(scores.t(), dim=1)
    return A @ h, A


@pytest.mark.parametrize("n_classes", [1, 3])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_clam_layout(backend, device, gated, n_classes):
    feat, hidden = 32, 16
    net = clam_layout_net(feat, hidden, gated, n_classes, dropout=True).to(device).eval()
    with torch.no_grad():  # spread the scores out
        score = net.attention_c if gated else net.module[-1]
        score.weight.mul_(4)
    pool = AttentionPool.from_clam(net, backend=backend).eval()
    assert pool.dropout == 0.25  # CLAM's dropout=True, applied in training mode only
    assert pool.gated is gated
    assert pool.branches == (None if n_classes == 1 else n_classes)

    bags = make_bags([1, 9, 300], feat, device=device)
    x, offsets = fastmil.pack(bags)
    with torch.no_grad():
        z_packed, a_packed = pool(x, offsets=offsets, return_attention=True)
        for b, h in enumerate(bags):
            M, A = clam_layout_pool(net, h)
            z, a = pool(h, return_attention=True)
            if n_classes == 1:
                M, A = M[0], A[0]
                assert z.shape == (feat,)
            else:
                A = A.t()  # fastmil's attention is [N, K]
                assert z.shape == (n_classes, feat)
            assert_close(z, M, what=f"z vs the CLAM-layout net, bag {b}")
            assert_close(a, A, what=f"attention vs the CLAM-layout net, bag {b}")
            assert_close(z_packed[b], M, what=f"packed z vs the CLAM-layout net, bag {b}")
        assert A.max() > 2 * A.min()  # the last, large bag has non-uniform attention


# ---------------------------------------------------------------- PyTorch Geometric


def _scores(x, w):
    """Attention scores written out independently of fastmil: x [T, D] -> [T, K]."""
    hidden = torch.tanh(x @ w["attn_weight"].T + w["attn_bias"])
    if w["gate_weight"] is not None:
        hidden = hidden * torch.sigmoid(x @ w["gate_weight"].T + w["gate_bias"])
    return hidden @ w["score_weight"].reshape(-1, hidden.shape[-1]).T + w["score_bias"]


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_pyg_segment_softmax(backend, device, gated, K):
    pyg = pytest.importorskip("torch_geometric.utils",
                              reason="torch-geometric (pip install torch-geometric) is needed")
    D, L = 16, 8
    lengths = [4, 0, 1, 37, 250, 0]
    w = make_weights(D, L, K, gated, device=device)
    x, offsets = fastmil.pack(make_bags(lengths, D, device=device))
    B = len(lengths)
    index = torch.repeat_interleave(torch.arange(B, device=device),
                                    torch.tensor(lengths, device=device))

    a_pyg = pyg.softmax(_scores(x, w), index, num_nodes=x.shape[0])  # [T, K]
    z_pyg = torch.stack([pyg.scatter(a_pyg[:, k, None] * x, index, dim=0, dim_size=B,
                                     reduce="sum") for k in range(a_pyg.shape[1])], dim=1)
    z, a = fastmil.attention_pool(x, w["attn_weight"], w["gate_weight"], w["score_weight"],
                                  attn_bias=w["attn_bias"], gate_bias=w["gate_bias"],
                                  score_bias=w["score_bias"], offsets=offsets,
                                  return_attention=True, backend=backend)
    if K is None:
        z_pyg, a_pyg = z_pyg[:, 0], a_pyg[:, 0]
    assert_close(z, z_pyg, what="z vs PyG")
    assert_close(a, a_pyg, what="attention vs PyG")
    assert torch.equal(z[1], torch.zeros_like(z[1])) and torch.equal(z[5], torch.zeros_like(z[5]))


@pytest.mark.parametrize("use_ptr", [False, True], ids=["index", "ptr"])
def test_pyg_attentional_aggregation(backend, device, use_ptr):
    aggr = pytest.importorskip("torch_geometric.nn.aggr",
                               reason="torch-geometric (pip install torch-geometric) is needed")
    D, L = 16, 8
    lengths = [4, 0, 1, 37, 250]
    w = make_weights(D, L, None, gated=True, device=device)
    x, offsets = fastmil.pack(make_bags(lengths, D, device=device))
    B = len(lengths)

    class Gate(nn.Module):
        def forward(self, h):
            return _scores(h, w)  # [T, 1]

    peer = aggr.AttentionalAggregation(gate_nn=Gate())
    if use_ptr:
        z_pyg = peer(x, ptr=offsets, dim_size=B)
    else:
        index = torch.repeat_interleave(torch.arange(B, device=device),
                                        torch.tensor(lengths, device=device))
        z_pyg = peer(x, index=index, dim_size=B)
    pool = AttentionPool(D, L, backend=backend).to(device)
    with torch.no_grad():
        pool.attn.weight.copy_(w["attn_weight"])
        pool.attn.bias.copy_(w["attn_bias"])
        pool.gate.weight.copy_(w["gate_weight"])
        pool.gate.bias.copy_(w["gate_bias"])
        pool.score.weight.copy_(w["score_weight"][None])
        pool.score.bias.copy_(w["score_bias"])
    z = pool(x, offsets=offsets)
    assert_close(z, z_pyg, what="z vs PyG AttentionalAggregation")


def test_converter_keeps_a_gate_bias_when_the_attention_layer_has_none():
    """One bias flag covers the three layers: a missing source bias becomes a zero bias."""
    net = clam_layout_net(16, 8, gated=True, n_classes=1, dropout=False).eval()
    net.attention_a[0].bias = None
    pool = AttentionPool.from_clam(net, backend="torch")
    assert torch.equal(pool.attn.bias, torch.zeros(8))
    assert torch.equal(pool.gate.bias, net.attention_b[0].bias)
    h = make_bags([7], 16)[0]
    with torch.no_grad():
        M, _ = clam_layout_pool(net, h)
        assert_close(pool(h), M[0], what="z vs the CLAM-layout net without attention bias")
