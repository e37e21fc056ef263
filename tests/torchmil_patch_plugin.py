"""pytest plugin that runs torchmil's own tests under :func:`fastmil.patch_torchmil`.

``tests/test_torchmil_dropin.py`` starts pytest on torchmil's test files in a subprocess with
``-p torchmil_patch_plugin`` and three variables: ``FASTMIL_PATCH_BACKEND`` (the backend passed to
``patch_torchmil``), ``FASTMIL_PATCH_DEVICE`` (made the default device, so that torchmil's tests
build their tensors and modules where that backend runs; default "cpu") and
``FASTMIL_PATCH_REPORT`` (where this plugin writes its JSON report).

Besides patching, the plugin watches every call of ``AttentionPool.forward``: it counts the fused
calls and the fallbacks (by reason), and runs torchmil's own forward on the same input to compare
``z`` and the raw scores ``f``. The report holds those counts and every mismatch, so that the
outer test can assert that torchmil's tests passed *through fastmil* and with torchmil's numbers.
"""

from __future__ import annotations

import collections
import json
import os

import torch
from conftest import assert_close  # also sets TRITON_INTERPRET where there is no GPU

import fastmil
from fastmil.integrations.torchmil import torchmil_fallback_reason

_report = {"calls": 0, "fused": 0, "fallbacks": collections.Counter(), "mismatches": []}


def _compare(what, actual, expected):
    """Record a mismatch of ``actual`` against torchmil's ``expected`` (conftest's tolerance)."""
    try:
        assert_close(actual, expected, what=what)
    except AssertionError as err:
        _report["mismatches"].append(str(err))


def pytest_configure(config):
    from torchmil.nn.attention.attention_pool import AttentionPool

    original = AttentionPool.forward
    backend = os.environ["FASTMIL_PATCH_BACKEND"]
    device = os.environ.get("FASTMIL_PATCH_DEVICE", "cpu")
    if device != "cpu":  # "cuda" for backend="triton" on a GPU: CPU tensors would fall back
        torch.set_default_device(device)
    fastmil.patch_torchmil(backend=backend)
    patched = AttentionPool.forward

    def watched(self, X, mask=None, return_att=False):
        reason = torchmil_fallback_reason(self, X, mask, backend)
        out = patched(self, X, mask, return_att)
        _report["calls"] += 1
        if reason is not None:
            _report["fallbacks"][reason] += 1
            return out
        _report["fused"] += 1
        with torch.no_grad():
            expected = original(self, X, mask, return_att)
        z, f = out if return_att else (out, None)
        z_ref, f_ref = expected if return_att else (expected, None)
        # torchmil gives NaN for a bag with no real instance, fastmil zeros (documented)
        empty = torch.isnan(z_ref).all(-1, keepdim=True)
        _compare("z", z, torch.where(empty, torch.zeros_like(z_ref), z_ref))
        if return_att:
            _compare("f", f, f_ref)
        return out

    AttentionPool.forward = watched


def pytest_unconfigure(config):
    path = os.environ.get("FASTMIL_PATCH_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump(_report, fh, indent=1)
