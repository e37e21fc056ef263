"""fastmil.patch_torchmil: torchmil's AttentionPool (and every torchmil model built on it) run
through fastmil, against unpatched torchmil: torchmil's own test suite under the patch, outputs
and every gradient, masks, the raw scores, state_dicts, the round trip and the fallback path."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import assert_close, child_env, skip_unsupported
from torch import nn

import fastmil
from fastmil.integrations import torchmil as compat

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops

tm_attention = pytest.importorskip("torchmil.nn.attention",
                                   reason="torchmil (pip install torchmil) is needed")
TorchmilPool = tm_attention.AttentionPool
TORCHMIL_FORWARD = TorchmilPool.forward  # torchmil's own, captured before any patch

# torchmil's test files, as its wheel ships them (site-packages/tests): AttentionPool, ABMIL,
# and CLAM (which picks instances by top-k over the raw scores, padded slots included) on every
# backend; the other models that pool with AttentionPool on the torch backend only (the Triton
# interpreter is slow).
TORCHMIL_TESTS = ["nn/attention/test_attention_pool.py", "models/test_abmil.py",
                  "models/test_clam.py"]
TORCHMIL_MODEL_TESTS = ["models/test_dtfdmil.py", "models/test_patch_gcn.py",
                        "models/test_transformer_abmil.py", "models/test_vaeabmil.py"]


@pytest.fixture(autouse=True)
def _unpatch_after():
    """Every test here leaves torchmil unpatched, whatever happens in it."""
    yield
    fastmil.unpatch_torchmil()


@pytest.fixture
def patched(backend):
    """patch_torchmil(backend) for the test's duration."""
    skip_unsupported(backend, torch.float32)
    fastmil.patch_torchmil(backend=backend)
    return backend


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of fastmil.attention_pool made by the patched forward."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return fastmil.attention_pool(*args, **kwargs)

    monkeypatch.setattr(compat, "attention_pool", counting)
    return calls


def _bags(lengths, D, dtype, device="cpu"):
    """Padded X [B, N, D] with garbage (not zeros) in the padding, and the bool mask [B, N]."""
    N = max(lengths)
    X = torch.randn(len(lengths), N, D, dtype=torch.float64).to(device, dtype)
    mask = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    return X, mask.to(device)


def _run(pool, X, mask, return_att, upstream):
    """Forward and backward of ``pool`` on a fresh copy of X; returns the outputs and the
    gradients of X and of every parameter, by name. ``upstream`` holds the gradient of each
    output (z, then f), None for none."""
    X = X.detach().clone().requires_grad_()
    pool.zero_grad(set_to_none=True)
    out = pool(X, mask, return_att)
    outs = out if return_att else (out,)
    loss = sum((o * u).sum() for o, u in zip(outs, upstream, strict=False) if u is not None)
    loss.backward()
    grads = {"X": X.grad, **{n: p.grad for n, p in pool.named_parameters()}}
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "uint8"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", ["tanh", "relu", "gelu"])
def test_outputs_and_gradients_match_torchmil(backend, device, act, gated, mask_kind, dtype,
                                              fused_calls):
    """z, the raw scores f (padded slots included) and the gradients of X and of every
    parameter, with and without return_att, equal unpatched torchmil's."""
    skip_unsupported(backend, dtype)
    if backend != "torch" and mask_kind == "bool":
        pytest.skip("bool and uint8 masks differ only in fastmil.compat's conversion, which the "
                    "torch backend checks; the kernels see the same bool mask")
    D, L = 12, 8
    pool = TorchmilPool(D, L, act, gated).to(device, dtype)
    with torch.no_grad():  # torchmil's fc2 init is small: make the scores spread out
        pool.fc2.weight.mul_(4)
    X, mask = _bags([9, 3, 1, 6], D, dtype, device)
    mask = {None: None, "bool": mask, "uint8": mask.to(torch.uint8)}[mask_kind]
    upstream = [torch.randn(4, D, dtype=dtype).to(device),
                torch.randn(4, 9, dtype=dtype).to(device)]
    for return_att in (False, True):
        expected = _run(pool, X, mask, return_att, upstream)
        fastmil.patch_torchmil(backend=backend)
        assert compat.torchmil_fallback_reason(pool, X, mask, backend) is None
        actual = _run(pool, X, mask, return_att, upstream)
        fastmil.unpatch_torchmil()
        for i, (a, e) in enumerate(zip(actual[0], expected[0], strict=True)):
            assert a.dtype == e.dtype, f"output {i}: dtype {a.dtype} != torchmil's {e.dtype}"
            assert_close(a, e, what=f"{'zf'[i]} vs torchmil (return_att={return_att})")
        assert actual[1].keys() == expected[1].keys()
        for name, g in expected[1].items():
            assert_close(actual[1][name], g, what=f"grad {name} (return_att={return_att})")
    assert len(fused_calls) == 2 and fused_calls[0]["activation"] == act


def test_all_masked_bag_pools_to_zeros(backend, device, patched):
    """The deliberate difference: torchmil gives NaN for a bag without real instances (a softmax
    over nothing), fastmil zeros with zero gradients; the other bags are unchanged and the raw
    scores are torchmil's everywhere (its models rank instances by them)."""
    D = 6
    pool = TorchmilPool(D, 4, gated=True).to(device)
    X, mask = _bags([4, 3, 1], D, torch.float32, device)
    mask[1] = False
    through_z = [torch.randn(3, D).index_fill(0, torch.tensor([1]), 0).to(device), None]
    through_f = [None, torch.randn(3, 4).to(device)]
    actual = [_run(pool, X, mask, True, u) for u in (through_z, through_f)]
    fastmil.unpatch_torchmil()
    expected = [_run(pool, X, mask, True, u) for u in (through_z, through_f)]
    (z, f), grads = actual[0]
    (z_ref, f_ref), grads_ref = expected[0]
    assert torch.isnan(z_ref[1]).all() and torch.isnan(grads_ref["X"][1]).all()
    assert torch.equal(z[1], torch.zeros(D, device=device))
    assert_close(z[[0, 2]], z_ref[[0, 2]], what="z of the other bags")
    assert_close(f, f_ref, what="raw scores f")
    # through z: zero gradient for the empty bag's rows (torchmil: NaN), torchmil's elsewhere
    assert torch.equal(grads["X"][1], torch.zeros(4, D, device=device))
    assert_close(grads["X"][[0, 2]], grads_ref["X"][[0, 2]], what="grad X via z, other bags")
    # through f: torchmil's gradients everywhere, the empty bag's padded rows included
    for name, g in expected[1][1].items():
        assert_close(actual[1][1][name], g, what=f"grad {name} via f")


# ---------------------------------------------------------------- torchmil models


def _model_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["ABMIL", "CLAM_SB"])
def test_torchmil_models_match(backend, device, name):
    """A torchmil model's training loss and every parameter gradient, on padded bags with
    torchmil's uint8 masks, equal unpatched torchmil's. torchmil's CLAM_SB picks instances by
    top-k over the raw scores without the mask, so its loss checks the padded slots too."""
    skip_unsupported(backend, torch.float32)
    models = pytest.importorskip("torchmil.models")
    from torchmil.data.collate import pad_tensors

    D = 10
    model = getattr(models, name)(in_shape=(D,), att_dim=8, gated=True).to(device)
    if name == "CLAM_SB":
        model.k_sample = 3
    bags = [torch.randn(n, D).to(device) for n in (12, 4, 7)]
    X, mask = pad_tensors(bags)
    assert mask.dtype == torch.uint8  # torchmil's collate
    Y = torch.tensor([1.0, 0.0, 1.0], device=device)

    def loss_fn():
        _, losses = model.compute_loss(Y, X, mask)
        return sum(losses.values())

    expected = _model_grads(model, loss_fn)
    fastmil.patch_torchmil(backend=backend)
    actual = _model_grads(model, loss_fn)
    assert_close(actual[0], expected[0], what=f"{name} loss")
    assert actual[1].keys() == expected[1].keys()
    for n, g in expected[1].items():
        assert_close(actual[1][n], g, what=f"{name} grad {n}")


# ---------------------------------------------------------------- torchmil's own tests


def _torchmil_tests_dir():
    import torchmil

    # torchmil is a namespace package (no __init__.py): no __file__, one __path__ entry
    tests = pathlib.Path(next(iter(torchmil.__path__))).resolve().parent / "tests"
    if not (tests / TORCHMIL_TESTS[0]).is_file():
        pytest.skip(f"torchmil's wheel ships its tests in site-packages/tests; not found at "
                    f"{tests}")
    return tests


def test_torchmil_own_tests_pass_under_the_patch(backend, device, tmp_path):
    """torchmil's own tests of AttentionPool and its models, run by pytest in a subprocess with
    tests/torchmil_patch_plugin.py, which applies the patch and checks that the calls were fused
    and gave torchmil's numbers. The plugin makes the backend's device the default device, so
    that the tests' tensors and modules are where the backend runs."""
    skip_unsupported(backend, torch.float32)
    tests = _torchmil_tests_dir()
    files = TORCHMIL_TESTS + (TORCHMIL_MODEL_TESTS if backend == "torch" else [])
    report = tmp_path / "report.json"
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not fastmil's settings
    here = pathlib.Path(__file__).resolve().parent
    env = child_env(str(here), FASTMIL_PATCH_BACKEND=backend, FASTMIL_PATCH_DEVICE=device,
                    FASTMIL_PATCH_REPORT=str(report),
                    OMP_NUM_THREADS="1")  # tiny ops, as the one_thread fixture
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-p", "torchmil_patch_plugin", "-c", str(tmp_path / "pytest.ini"),
           "--rootdir", str(tmp_path), *(str(tests / f) for f in files)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"torchmil's tests failed under the patch:\n{run.stdout[-6000:]}"
    result = json.loads(report.read_text())
    assert result["mismatches"] == []
    # every call fused, except the first call of a lazy (in_dim=None) module
    assert result["fused"] >= 20, result
    assert result["calls"] == result["fused"] + sum(result["fallbacks"].values())
    assert all("still lazy" in reason for reason in result["fallbacks"]), result["fallbacks"]


# ---------------------------------------------------------------- patch, state_dict, fallback


def test_patch_unpatch_round_trip(fused_calls):
    """The patch covers modules built before it; unpatch restores torchmil's own forward;
    patching twice does not stack; unpatching twice is harmless."""
    pool = TorchmilPool(5, 4, gated=True)
    X = torch.randn(2, 3, 5)
    expected = pool(X)
    fastmil.patch_torchmil(backend="torch")
    fastmil.patch_torchmil(backend="torch")
    assert TorchmilPool.forward is compat._forward
    assert_close(pool(X), expected, what="z, patched")
    assert len(fused_calls) == 1
    fastmil.unpatch_torchmil()
    assert TorchmilPool.forward is TORCHMIL_FORWARD
    assert torch.equal(pool(X), expected)
    assert len(fused_calls) == 1
    fastmil.unpatch_torchmil()
    assert TorchmilPool.forward is TORCHMIL_FORWARD


def test_patch_rejects_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        fastmil.patch_torchmil(backend="cuda")
    assert TorchmilPool.forward is TORCHMIL_FORWARD


def test_import_fastmil_does_not_import_torchmil():
    code = "import sys, fastmil; print(any(m.startswith('torchmil') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_state_dict_and_checkpoints_unchanged(patched, device):
    """Same keys, same tensors; a checkpoint saved without the patch loads with it (and back)
    and gives torchmil's outputs."""
    models = pytest.importorskip("torchmil.models")
    fastmil.unpatch_torchmil()
    torch.manual_seed(1)
    plain = models.ABMIL(in_shape=(6,), att_dim=4, gated=True).to(device)
    keys = list(plain.state_dict())
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    X = torch.randn(2, 5, 6).to(device)
    expected = plain(X, return_att=True)

    fastmil.patch_torchmil(backend=patched)
    torch.manual_seed(2)
    model = models.ABMIL(in_shape=(6,), att_dim=4, gated=True).to(device)
    assert list(model.state_dict()) == keys
    assert "pool.fc1.module.weight" in keys and "pool.fc2.weight" in keys
    buf.seek(0)
    model.load_state_dict(torch.load(buf))
    for a, e in zip(model(X, return_att=True), expected, strict=True):
        assert_close(a, e, what="ABMIL output from the loaded checkpoint")
    for (n, a), e in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, e), n


def _fallback_cases():
    def lazy():
        return TorchmilPool(None, 4, gated=True), "still lazy"

    def silu():
        pool = TorchmilPool(6, 4, gated=True)
        pool.act_layer = nn.SiLU()
        return pool, "act_layer is SiLU()"

    def gelu_tanh():
        pool = TorchmilPool(6, 4, act="gelu")
        pool.act_layer = nn.GELU(approximate="tanh")
        return pool, "act_layer is GELU(approximate='tanh')"

    def hooked():
        pool = TorchmilPool(6, 4)
        pool.fc1.register_forward_hook(lambda m, i, o: o * 2)
        return pool, "hooks are registered"

    def custom_fc2():
        pool = TorchmilPool(6, 4)
        pool.fc2 = nn.Sequential(nn.Linear(4, 1, bias=False))
        return pool, "fc2 is Sequential"

    return {"lazy": lazy, "silu": silu, "gelu_tanh": gelu_tanh, "hooked": hooked,
            "custom_fc2": custom_fc2}


@pytest.mark.parametrize("case", list(_fallback_cases()))
def test_fallback_runs_torchmil_code(patched, device, fused_calls, case):
    """What fastmil cannot fuse runs torchmil's own forward: bit-identical outputs, a reason."""
    pool, why = _fallback_cases()[case]()
    pool = pool.to(device)
    X, mask = _bags([5, 2], 6, torch.float32, device)
    reason = compat.torchmil_fallback_reason(pool, X, mask, patched)
    assert reason is not None and why in reason, reason
    z, f = pool(X, mask, True)
    if case == "lazy":  # the first call set in_dim: fused from now on
        assert compat.torchmil_fallback_reason(pool, X, mask, patched) is None
    assert not fused_calls
    z_ref, f_ref = TORCHMIL_FORWARD(pool, X, mask, True)
    assert torch.equal(z, z_ref) and torch.equal(f, f_ref)


@pytest.mark.parametrize("case", ["mask_broadcast", "mask_complex", "X_2d", "dtype_mismatch"])
def test_fallback_on_input_fastmil_does_not_take(patched, device, fused_calls, case):
    """Input torchmil takes (or rejects) but fastmil does not: torchmil's result, or torchmil's
    own error, never a different number."""
    pool = TorchmilPool(6, 4, gated=True).to(device)
    X, mask = _bags([5, 5], 6, torch.float32, device)
    mask = mask[:1] if case == "mask_broadcast" else mask  # [1, N]: torchmil broadcasts it
    mask = mask.to(torch.complex64) if case == "mask_complex" else mask
    X = X[0] if case == "X_2d" else X
    X = X.double() if case == "dtype_mismatch" else X
    assert compat.torchmil_fallback_reason(pool, X, mask, patched) is not None
    try:
        expected = TORCHMIL_FORWARD(pool, X, mask, False)
    except Exception as err:  # torchmil rejects it: the patched forward raises the same error
        with pytest.raises(type(err), match=None) as info:
            pool(X, mask)
        assert str(info.value) == str(err)
    else:
        assert torch.equal(pool(X, mask), expected)
    assert not fused_calls


def test_autocast(backend, device, fused_calls):
    """Inside autocast (bfloat16, on the backend's device) the patched pool computes in bfloat16
    as torchmil's layers do, and returns z and f in bfloat16, close to torchmil's; where the
    backend cannot take bfloat16 (Triton's interpreter) it runs torchmil's code."""
    pool = TorchmilPool(16, 8, gated=True).to(device)
    X, mask = _bags([7, 3], 16, torch.float32, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = TORCHMIL_FORWARD(pool, X, mask, True)
        fastmil.patch_torchmil(backend=backend)
        reason = compat.torchmil_fallback_reason(pool, X, mask, backend)
        actual = pool(X, mask, True)
    fused = fastmil.triton_backend.triton_available(X.bfloat16()) or backend == "torch"
    assert (reason is None) == fused and len(fused_calls) == int(fused), reason
    for a, e, name in zip(actual, expected, "zf", strict=True):
        assert a.dtype == e.dtype == torch.bfloat16, (name, a.dtype, e.dtype)
        assert_close(a, e, what=f"{name} under autocast")


def test_float_mask_is_fused_with_torchmil_meaning(patched, device):
    """torchmil treats mask == 0 as padding whatever the dtype: a float mask of 0 / 1 is fused as
    that (fastmil's own API rejects float masks as ambiguous)."""
    pool = TorchmilPool(6, 4, gated=True).to(device)
    X, mask = _bags([5, 2], 6, torch.float32, device)
    assert compat.torchmil_fallback_reason(pool, X, mask.float(), patched) is None
    actual = pool(X, mask.float(), True)
    expected = TORCHMIL_FORWARD(pool, X, mask.float(), True)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, what="float mask")
