"""The eager baseline computes what the reference computes: a benchmark against a wrong baseline
would mean nothing."""

from __future__ import annotations

import pytest
import torch

import fastmil
from fastmil.reference import attention_pool_reference

from .eager import eager_attention_pool


@pytest.mark.parametrize("K", [None, 3], ids=["K1", "K3"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_eager_matches_reference(masked, gated, K):
    torch.manual_seed(0)
    D, L = 16, 8
    lengths = [3, 1, 7, 50] if masked else [9, 9, 9]
    x, offsets = fastmil.pack([torch.randn(n, D) for n in lengths])
    x, mask = fastmil.pad(x, offsets)
    kw = dict(mask=mask if masked else None)
    V, U = torch.randn(L, D) / D ** 0.5, (torch.randn(L, D) / D ** 0.5 if gated else None)
    w = torch.randn(L) if K is None else torch.randn(K, L)
    bias = dict(attn_bias=torch.randn(L), gate_bias=torch.randn(L) if gated else None)
    z, a = eager_attention_pool(x, V, U, w, return_attention=True, **bias, **kw)
    z_ref, a_ref = attention_pool_reference(x, V, U, w, return_attention=True, **bias, **kw)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
