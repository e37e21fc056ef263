"""fastmil's CLAM models (fastmil.integrations.clam) against numbers of CLAM's own code.

The numbers in tests/clam_reference.json come from CLAM's CLAM_SB / CLAM_MB (written by
tests/clam_reference.py, which runs a CLAM checkout); the tests rebuild the same weights and
inputs for fastmil's twins and compare: eval-mode outputs on both backends, training-mode
outputs with dropout on the torch backend (it draws CLAM's masks on CPU), a few training steps,
and checkpoints both ways. The tests marked ``real CLAM`` run CLAM itself from the checkout that
FASTMIL_CLAM_DIR names, and are skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import OrderedDict

import clam_reference as ref
import numpy as np
import pytest
import torch
from conftest import ROOT, backend_device, child_env, skip_unsupported

import fastmil
import fastmil.compat
from fastmil.integrations.clam import (
    CLAM_MB,
    CLAM_SB,
    clam_to_fastmil_state_dict,
    fastmil_to_clam_state_dict,
)
from fastmil.reference import scores as reference_scores

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops

with open(ref.DATA) as f:
    REFERENCE = json.load(f)
CLASSES = {"SB": CLAM_SB, "MB": CLAM_MB}
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 rounding
FLOATS = ("logits", "Y_prob", "A_raw", "features", "instance_loss")
INTS = ("Y_hat", "inst_preds", "inst_labels")
CASE_NAMES = [case["name"] for case in ref.CASES]
DROPOUT_CASES = [case["name"] for case in ref.CASES if case["dropout"]]


def _twin(config, weights, backend):
    """fastmil's twin of a CLAM configuration, loaded (strictly) from CLAM-keyed ``weights``
    through the key map, on the backend's device."""
    twin = CLASSES[config["model"]](**ref.model_kwargs(config), backend=backend)
    twin.load_state_dict(clam_to_fastmil_state_dict(weights))
    return twin.to(backend_device(backend))


def _case(name, backend):
    """(entry of the reference, twin with the case's weights, h, label) of a reference case."""
    entry = REFERENCE["cases"][name]
    index = CASE_NAMES.index(name)
    w_seed, h_seed, _ = ref.seeds(index)
    weights = ref.seeded_weights(entry["state_dict_shapes"], w_seed)
    h = ref.seeded_bag(entry["config"]["N"], h_seed)
    # the same inputs as the generator's (a change in torch's generator would show here first)
    total = sum(t.double().sum() for t in weights.values()).item()
    assert total == pytest.approx(entry["weights_sum"], rel=1e-6), "weights differ"
    assert h.double().sum().item() == pytest.approx(entry["h_sum"], rel=1e-6), "inputs differ"
    device = backend_device(backend)
    label = torch.tensor([entry["config"]["label"]], device=device)
    return entry, _twin(entry["config"], weights, backend), h.to(device), label


def _assert_matches(actual, expected, what):
    """``actual`` (ref.outputs of a twin) equals CLAM's stored ``expected``: floats to float32
    rounding, integers exactly."""
    for name in expected:
        a = actual[name]
        a = a.detach().cpu() if isinstance(a, torch.Tensor) else torch.as_tensor(a)
        if name in INTS:
            assert a.tolist() == expected[name], f"{what}: {name} {a.tolist()} != {expected[name]}"
        else:
            e = torch.tensor(expected[name], dtype=torch.float32)
            torch.testing.assert_close(a.float(), e, **TOL,
                                       msg=lambda m, n=name: f"{what}: {n}: {m}")


# ---------------------------------------------------------------- CLAM's numbers


@pytest.mark.parametrize("name", CASE_NAMES)
def test_eval_outputs_match_clam(backend, name):
    """Eval mode, instance evaluation on: every output CLAM gives (logits, Y_prob, Y_hat, A_raw,
    features, instance loss, instance predictions and targets) equals CLAM's."""
    skip_unsupported(backend, torch.float32)
    entry, twin, h, label = _case(name, backend)
    twin.eval()
    out = ref.outputs(twin, h, label)
    _assert_matches(out, entry["eval"], f"{name}, {backend}")
    assert isinstance(out["inst_preds"], np.ndarray) and out["inst_preds"].dtype == np.int64
    assert isinstance(out["inst_labels"], np.ndarray) and out["inst_labels"].dtype == np.int64
    with torch.no_grad():
        A_raw = twin(h, attention_only=True)
        logits, Y_prob, Y_hat, A_raw2, results = twin(h)  # no instance evaluation, no features
    assert torch.equal(A_raw, A_raw2) and torch.equal(A_raw, out["A_raw"])
    assert torch.equal(logits, out["logits"]) and results == {}


@pytest.mark.parametrize("name", DROPOUT_CASES)
def test_training_mode_draws_clam_dropout_masks(name):
    """Training mode with dropout (CLAM's p after the first layer, 0.25 in the attention net):
    after the same torch.manual_seed, the torch backend on CPU draws exactly CLAM's masks, so
    the outputs equal CLAM's (which differ from the eval-mode ones)."""
    entry, twin, h, label = _case(name, "torch")
    twin.train()
    torch.manual_seed(ref.seeds(CASE_NAMES.index(name))[2])
    out = ref.outputs(twin, h, label)
    _assert_matches(out, entry["train"], f"{name}, training mode")
    assert twin.attention_pool.dropout == 0.25 and twin.attention_net[2].p == 0.25
    eval_logits = torch.tensor(entry["eval"]["logits"])
    assert (out["logits"] - eval_logits).abs().max() > 1e-2  # dropout did act


@pytest.mark.parametrize("index", range(len(ref.TRAINING)),
                         ids=[run["name"] for run in ref.TRAINING])
def test_training_steps_match_clam(backend, index):
    """A few steps of CLAM's training loop (one bag per step, 0.7 · bag loss + 0.3 · instance
    loss, Adam with CLAM's lr and weight decay, two passes over the bags) give CLAM's losses at
    every step: the gradients of every parameter, the pool's included, are CLAM's. With dropout,
    the torch backend only (the triton backend draws other masks)."""
    skip_unsupported(backend, torch.float32)
    if backend_device(backend) != "cpu":
        pytest.skip("the stored losses were made on the CPU, and Adam's CUDA kernels round "
                    "differently")
    run = ref.TRAINING[index]
    expected = REFERENCE["training"][run["name"]]
    if run["dropout"] and backend != "torch":
        pytest.skip(f"backend={backend!r} draws its own dropout masks (Philox), not CLAM's")
    twin = CLASSES[run["model"]](**ref.model_kwargs(run), backend=backend)
    shapes = {k: v.shape for k, v in
              fastmil_to_clam_state_dict(twin.state_dict(), dropout=run["dropout"]).items()}
    twin.load_state_dict(clam_to_fastmil_state_dict(ref.seeded_weights(shapes, 6000 + index)))
    losses = ref.train_losses(twin, index)
    for key in ("loss", "bag_loss", "instance_loss"):
        torch.testing.assert_close(torch.tensor(losses[key]), torch.tensor(expected[key]), **TOL,
                                   msg=lambda m, k=key: f"{run['name']}, {backend}: {k}: {m}")
    # the steps move the weights: each bag's loss changes from the first pass to the second
    first, second = np.array(expected["loss"][:ref.BAGS]), np.array(expected["loss"][ref.BAGS:])
    assert np.abs(second - first).max() > 1e-1


# ---------------------------------------------------------------- checkpoints

ROUND_TRIPS = [("SB", True, 0.25), ("SB", False, 0.25), ("SB", False, 0.0), ("MB", True, 0.0),
               ("MB", False, 0.25)]


@pytest.mark.parametrize("model, gate, dropout", ROUND_TRIPS,
                         ids=[f"{m}-{'gated' if g else 'plain'}-p{p}" for m, g, p in ROUND_TRIPS])
def test_checkpoint_round_trips(model, gate, dropout):
    """CLAM -> twin -> CLAM gives CLAM's keys (in CLAM's order, as the real CLAM model has them),
    shapes and the very tensors; twin -> CLAM -> a fresh twin gives the same outputs."""
    config = next(c for c in ref.CASES if (c["model"], c["gate"], c["dropout"])
                  == (model, gate, dropout))
    shapes = REFERENCE["cases"][config["name"]]["state_dict_shapes"]  # real CLAM's keys
    clam_sd = ref.seeded_weights(shapes, 7)
    twin = _twin(config, clam_sd, "torch").eval()
    back = fastmil_to_clam_state_dict(twin.state_dict(), dropout=dropout)
    assert list(back) == list(shapes)
    for key, value in clam_sd.items():
        assert torch.equal(back[key], value), key

    h, label = ref.seeded_bag(30, 8), torch.tensor([config["n_classes"] - 1])
    fresh = CLASSES[model](**ref.model_kwargs(config), backend="torch").eval()
    fresh.load_state_dict(clam_to_fastmil_state_dict(back))
    expected = ref.outputs(twin, h, label)
    for name, value in ref.outputs(fresh, h, label).items():
        assert np.array_equal(np.asarray(value), np.asarray(expected[name])), name


# CLAM's demo checkpoint (heatmaps/demo/ckpts/s_0_checkpoint.pt): CLAM_SB with its default sizes
# (1024 -> 512 -> 256, gated, 2 classes), saved from a DataParallel attention_net, with the
# instance loss's buffer
DEMO_SHAPES = {
    "attention_net.module.0.weight": (512, 1024), "attention_net.module.0.bias": (512,),
    "attention_net.module.3.attention_a.0.weight": (256, 512),
    "attention_net.module.3.attention_a.0.bias": (256,),
    "attention_net.module.3.attention_b.0.weight": (256, 512),
    "attention_net.module.3.attention_b.0.bias": (256,),
    "attention_net.module.3.attention_c.weight": (1, 256),
    "attention_net.module.3.attention_c.bias": (1,),
    "classifiers.weight": (2, 512), "classifiers.bias": (2,),
    "instance_classifiers.0.weight": (2, 512), "instance_classifiers.0.bias": (2,),
    "instance_classifiers.1.weight": (2, 512), "instance_classifiers.1.bias": (2,),
    "instance_loss_fn.labels": (2,),
}


def _saved_by_clam(clam_sd):
    """``clam_sd`` as an old CLAM run writes it: DataParallel's ``.module`` after
    ``attention_net``, and the instance loss's ``labels`` buffer."""
    out = OrderedDict((k.replace("attention_net.", "attention_net.module.", 1), v)
                      for k, v in clam_sd.items())
    out["instance_loss_fn.labels"] = torch.tensor([0, 1])
    return out


def test_demo_checkpoint_layout_loads_into_the_default_twin():
    """A state_dict with the demo checkpoint's keys and shapes loads (strict) into CLAM_SB()
    with its defaults; .module is stripped and instance_loss_fn dropped; back to CLAM's keys, it
    is what CLAM's loader makes of the checkpoint."""
    saved = OrderedDict((k, torch.randn(s) if k != "instance_loss_fn.labels"
                         else torch.tensor([0, 1])) for k, s in DEMO_SHAPES.items())
    twin = CLAM_SB()
    mapped = clam_to_fastmil_state_dict(saved)
    twin.load_state_dict(mapped)  # strict
    assert "instance_loss_fn.labels" not in mapped
    assert mapped["attention_pool.gate.weight"] is saved[
        "attention_net.module.3.attention_b.0.weight"]  # shared, not copied
    back = fastmil_to_clam_state_dict(twin.state_dict())
    loaded_by_clam = {k.replace(".module", ""): v for k, v in saved.items()
                      if "instance_loss_fn" not in k}
    assert list(back) == list(loaded_by_clam)
    assert all(torch.equal(back[k], v) for k, v in loaded_by_clam.items())


@pytest.mark.parametrize("name", ["sb-gated-small-n2", "sb-plain-big-n3-subtyping",
                                  "mb-plain-big-n2"])
def test_checkpoint_as_saved_by_clam(name):
    """The saved layout (.module, instance_loss_fn) of any configuration, plain Attn_Net (whose
    own ``module`` stays) included, loads to the same twin as the model's own state_dict."""
    entry = REFERENCE["cases"][name]
    clam_sd = ref.seeded_weights(entry["state_dict_shapes"], 3)
    mapped = clam_to_fastmil_state_dict(_saved_by_clam(clam_sd))
    assert list(mapped) == list(clam_to_fastmil_state_dict(clam_sd))
    assert all(mapped[k] is v for k, v in clam_to_fastmil_state_dict(clam_sd).items())
    _twin(entry["config"], _saved_by_clam(clam_sd), "torch")  # strict load


def test_bare_attention_net_maps_to_a_bare_pool():
    """Empty prefixes map the state_dict of a bare Attn_Net_Gated / Attn_Net to a bare
    AttentionPool and back; the pool then computes CLAM's attention on those weights."""
    gen = torch.Generator().manual_seed(0)
    V, U, b_V, b_U = (torch.randn(*s, generator=gen) for s in ((16, 8), (16, 8), (16,), (16,)))
    w, b_w, h = torch.randn(2, 16, generator=gen), torch.randn(2, generator=gen), torch.randn(
        11, 8, generator=gen)
    gated = {"attention_a.0.weight": V, "attention_a.0.bias": b_V, "attention_b.0.weight": U,
             "attention_b.0.bias": b_U, "attention_c.weight": w, "attention_c.bias": b_w}
    plain = {"module.0.weight": V, "module.0.bias": b_V, "module.3.weight": w,
             "module.3.bias": b_w}
    for sd, is_gated in ((gated, True), (plain, False)):
        pool = fastmil.AttentionPool(8, 16, branches=2, gated=is_gated, backend="torch")
        pool.load_state_dict(clam_to_fastmil_state_dict(sd, attention_net="", pool=""))
        A = reference_scores(h, V, U if is_gated else None, w, b_V, b_U if is_gated else None, b_w).t()
        z, A_raw = pool(h, return_scores=True)
        torch.testing.assert_close(A_raw.t(), A, **TOL)
        torch.testing.assert_close(z, torch.softmax(A, dim=1) @ h, **TOL)
        back = fastmil_to_clam_state_dict(pool.state_dict(), dropout=0.25, attention_net="",
                                          pool="")
        assert list(back) == list(sd)
        assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_key_map_errors():
    with pytest.raises(ValueError, match=r"no CLAM attention net at attention_net="
                       r"'attention_net.3': expected the key 'attention_net.3.attention_a.0"
                       r".weight' \(Attn_Net_Gated\) or .* found \['attention_net.3.other'\]"):
        clam_to_fastmil_state_dict({"attention_net.3.other": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"found no key under 'attention_net.3.' \(its first "
                       r"keys: \['fc.weight', 'fc.bias'\]\)"):
        clam_to_fastmil_state_dict({"fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"expects a state_dict .*torch.load\(path, "
                       r"map_location='cpu', weights_only=True\)\), got str"):
        clam_to_fastmil_state_dict("s_0_checkpoint.pt")
    both = {"attention_net.module.0.weight": 0, "attention_net.0.weight": 0}
    with pytest.raises(ValueError, match=r"holds both 'attention_net.module.0.weight' \(saved "
                       r"through nn.DataParallel\) and 'attention_net.0.weight'"):
        clam_to_fastmil_state_dict(both)
    scores = {"attention_net.3.module.0.weight": 0, "attention_net.3.module.2.weight": 0,
              "attention_net.3.module.3.weight": 0}
    with pytest.raises(ValueError, match=r"module.2 \(no dropout\) or module.3 \(dropout\), got "
                       r"\['module.2', 'module.3'\]"):
        clam_to_fastmil_state_dict(scores)
    plain = CLAM_SB(gate=False, embed_dim=8).state_dict()
    with pytest.raises(ValueError, match="dropout is None, but this AttentionPool is plain"):
        fastmil_to_clam_state_dict(plain)
    no_bias = fastmil.AttentionPool(8, 4, bias=False).state_dict()
    with pytest.raises(ValueError, match=r"no key 'attn.bias': expected a fastmil "
                       r"AttentionPool with biases"):
        fastmil_to_clam_state_dict(no_bias, pool="")
    with pytest.raises(TypeError, match=r"fastmil_to_clam_state_dict expects a state_dict"):
        fastmil_to_clam_state_dict([("attention_pool.attn.weight", 0)])


def test_compat_reexports_the_key_maps():
    assert fastmil.compat.clam_to_fastmil_state_dict is clam_to_fastmil_state_dict
    assert fastmil.compat.fastmil_to_clam_state_dict is fastmil_to_clam_state_dict


# ---------------------------------------------------------------- the models' own checks


def test_model_layout():
    """CLAM's layer sizes and dropout placement, the pool in place of the attention net."""
    sb = CLAM_SB(gate=True, size_arg="big", dropout=0.1, n_classes=3, embed_dim=64,
                 backend="torch")
    assert [type(m) for m in sb.attention_net] == [torch.nn.Linear, torch.nn.ReLU,
                                                   torch.nn.Dropout]
    assert sb.attention_net[0].weight.shape == (512, 64) and sb.attention_net[2].p == 0.1
    pool = sb.attention_pool
    assert (pool.in_dim, pool.attn_dim, pool.branches, pool.gated, pool.dropout, pool.backend) \
        == (512, 384, None, True, 0.25, "torch")
    assert sb.classifiers.weight.shape == (3, 512)
    assert [c.weight.shape for c in sb.instance_classifiers] == [(2, 512)] * 3
    assert isinstance(sb.instance_loss_fn, torch.nn.CrossEntropyLoss)
    mb = CLAM_MB(gate=False, n_classes=4, embed_dim=16)
    assert (mb.attention_pool.attn_dim, mb.attention_pool.branches, mb.attention_pool.gated,
            mb.attention_pool.dropout, mb.attention_pool.backend) == (256, 4, False, 0.0, "auto")
    assert [c.weight.shape for c in mb.classifiers] == [(1, 512)] * 4
    assert CLAM_MB().instance_loss_fn is not CLAM_MB().instance_loss_fn  # one loss per model


def test_multi_branch_shapes(backend):
    """CLAM_MB with n_classes branches: A_raw [K, N], features [K, 512], logits [1, K]."""
    skip_unsupported(backend, torch.float32)
    device = backend_device(backend)
    mb = CLAM_MB(n_classes=3, embed_dim=8, k_sample=2, subtyping=True, backend=backend)
    mb = mb.to(device).eval()
    logits, Y_prob, Y_hat, A_raw, results = mb(torch.randn(5, 8, device=device), label=2,
                                               instance_eval=True, return_features=True)
    assert (logits.shape, Y_prob.shape, Y_hat.shape, A_raw.shape, results["features"].shape) \
        == ((1, 3), (1, 3), (1, 1), (3, 5), (3, 512))
    # subtyping: 2k for the label's class, k for each other class
    assert results["inst_labels"].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert results["inst_preds"].shape == (8,) and results["instance_loss"].dim() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"size_arg must be one of \['big', 'small'\], got "
                       r"'tiny'"):
        CLAM_SB(size_arg="tiny")
    with pytest.raises(ValueError, match=r"CLAM_MB: dropout must be a number in \[0, 1\) "
                       r"\(CLAM trains with 0.25\), got True"):
        CLAM_MB(dropout=True)
    with pytest.raises(ValueError, match="k_sample must be a positive int, got 0"):
        CLAM_SB(k_sample=0)
    with pytest.raises(TypeError, match="gate must be a bool, got 1"):
        CLAM_SB(gate=1)
    with pytest.raises(ValueError, match="backend"):
        CLAM_SB(backend="cuda")
    model = CLAM_SB(embed_dim=8, k_sample=8)
    with pytest.raises(ValueError, match=r"instance_eval takes the k_sample=8 instances of "
                       r"highest and lowest attention, but the bag has N=5 < k_sample"):
        model(torch.randn(5, 8), label=torch.tensor([1]), instance_eval=True)
    with pytest.raises(ValueError, match=r"h must be one bag of instance features \[N, "
                       r"embed_dim=8\], got \(2, 5, 8\)"):
        model(torch.randn(2, 5, 8))
    bad_labels = ((None, "None"), (2, "2"), (torch.tensor([1.0]), r"tensor\(\[1.\]\)"),
                  (torch.tensor([0, 1]), r"a tensor of shape \(2,\) and dtype torch.int64"))
    for label, seen in bad_labels:
        with pytest.raises(ValueError, match=r"instance_eval needs label, the bag's class: an "
                           rf"int or one-element integer tensor in \[0, n_classes=2\), got {seen}"):
            model(torch.randn(9, 8), label=label, instance_eval=True)


# ---------------------------------------------------------------- against a real CLAM checkout

CLAM_DIR = os.environ.get("FASTMIL_CLAM_DIR")
real_clam = pytest.mark.skipif(not CLAM_DIR, reason="FASTMIL_CLAM_DIR is not set: it names a "
                               "CLAM checkout (github.com/mahmoodlab/CLAM) to test against")
DEMO = os.path.join("heatmaps", "demo", "ckpts", "s_0_checkpoint.pt")


def _demo_checkpoint():
    path = os.path.join(CLAM_DIR, DEMO)
    if not os.path.isfile(path):
        pytest.skip(f"no demo checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


@real_clam
def test_real_clam_demo_checkpoint(backend):
    """CLAM's demo checkpoint, loaded into CLAM's own CLAM_SB as CLAM's eval code loads it
    (.module stripped, instance_loss_fn dropped) and into the twin through the key map: the
    same outputs to float32 rounding; in training mode (dropout on), the torch backend draws
    CLAM's masks: the same raw scores over 100 draws."""
    skip_unsupported(backend, torch.float32)
    checkpoint = _demo_checkpoint()
    clam_cls = ref.load_clam_models(CLAM_DIR).CLAM_SB
    device = backend_device(backend)
    clam = clam_cls(dropout=0.25)
    clam.load_state_dict({k.replace(".module", ""): v for k, v in checkpoint.items()
                          if "instance_loss_fn" not in k})
    twin = CLAM_SB(dropout=0.25, backend=backend)
    twin.load_state_dict(clam_to_fastmil_state_dict(checkpoint))
    clam, twin = clam.to(device).eval(), twin.to(device).eval()
    h = torch.randn(300, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    label = torch.tensor([1], device=device)
    expected = ref.outputs(clam, h, label)
    actual = ref.outputs(twin, h, label)
    for name in FLOATS:
        torch.testing.assert_close(actual[name], expected[name], **TOL,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name in INTS:
        assert np.array_equal(np.asarray(actual[name].cpu() if name == "Y_hat" else actual[name]),
                              np.asarray(expected[name].cpu() if name == "Y_hat"
                                         else expected[name])), name
    if backend != "torch" or device != "cpu":
        return
    clam.train(), twin.train()
    # a fifth of the demo's weights are denormal floats, which make CPU matmuls ~100x slower:
    # flushed to zero for the draws (in both models alike)
    torch.set_flush_denormal(True)  # False where the CPU cannot: then only slower
    try:
        with torch.no_grad():
            for seed in range(100):
                torch.manual_seed(seed)
                theirs = clam(h[:64])[3]
                torch.manual_seed(seed)
                torch.testing.assert_close(twin(h[:64])[3], theirs, **TOL)
    finally:
        torch.set_flush_denormal(False)


@real_clam
def test_real_clam_gives_the_stored_reference():
    """The committed reference is what the CLAM checkout gives now."""
    fresh = ref.make_reference(CLAM_DIR)
    assert fresh["model_clam_sha256"] == REFERENCE["model_clam_sha256"], \
        "CLAM's models/model_clam.py changed: run tests/clam_reference.py again"

    def floats(value):
        return np.asarray(value, dtype=np.float64)

    for section in ("cases", "training"):
        assert list(fresh[section]) == list(REFERENCE[section])
        for name, entry in fresh[section].items():
            for part in ("eval", "train") if section == "cases" else (None,):
                got = entry.get(part) if part else entry
                want = REFERENCE[section][name].get(part) if part else REFERENCE[section][name]
                if got is None:
                    continue
                for key, value in got.items():
                    if key in INTS or isinstance(value, (str, dict)):
                        assert value == want[key], (name, part, key)
                    elif key not in ("config",):
                        np.testing.assert_allclose(floats(value), floats(want[key]), rtol=1e-5,
                                                   atol=1e-6, err_msg=f"{name} {part} {key}")


RECIPES = [("docs/clam.md", "recipe"), ("README.md", "clam recipe")]


def _docs_blocks(path, marker):
    """A recipe's code and its printed output from a page (the fenced blocks after the
    ``<!-- MARKER -->`` and ``<!-- MARKER output -->`` markers)."""
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()

    def block(marker):
        found = re.findall(rf"<!-- {marker} -->\n```\w*\n(.*?)```", text, flags=re.S)
        assert len(found) == 1, f"{path}: expected one block marked <!-- {marker} -->"
        return found[0]

    return block(marker), block(f"{marker} output")


@pytest.mark.parametrize("path,marker", RECIPES)
def test_docs_recipe_blocks_are_marked(path, marker):
    code, output = _docs_blocks(path, marker)
    assert "CLAM_DIR" in code and output.strip()


@real_clam
@pytest.mark.parametrize("path,marker", RECIPES)
def test_real_clam_docs_recipe_runs_as_printed(path, marker):
    """The page's CLAM recipe runs as printed (CLAM_DIR from the environment) and prints the
    output the page shows."""
    code, output = _docs_blocks(path, marker)
    _demo_checkpoint()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(CLAM_DIR=CLAM_DIR), cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout == output
