"""fastmil inside CLAM's CLAM_SB / CLAM_MB (the README's edit) against CLAM's own classes
(faithful copies in clam_models.py): checkpoints both ways, the training trajectory with
dropout off, and the distribution of z and of the raw scores with CLAM's attention dropout on."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from clam_models import CLAM_MB, CLAM_SB, Attn_Net, Attn_Net_Gated, FastCLAM_MB, FastCLAM_SB
from conftest import assert_close, backend_device, skip_unsupported

import fastmil
from fastmil.compat import clam_to_fastmil_state_dict, fastmil_to_clam_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops

TWINS = {CLAM_SB: FastCLAM_SB, CLAM_MB: FastCLAM_MB}
EMBED = 24  # instance features; the "tiny" size then gives fc 24 -> 32, attention size 16


def _pair(cls, backend, *, gate=True, dropout=0.0, n_classes=3, size_arg="tiny", k_sample=4):
    """A CLAM model and its fastmil twin holding the same weights (loaded through the key
    mapping, as a CLAM checkpoint would be), both on the backend's device."""
    kwargs = dict(gate=gate, size_arg=size_arg, dropout=dropout, k_sample=k_sample,
                  n_classes=n_classes, embed_dim=EMBED)
    device = backend_device(backend)
    clam = cls(**kwargs).to(device)
    twin = TWINS[cls](**kwargs, backend=backend).to(device)
    twin.load_state_dict(clam_to_fastmil_state_dict(clam.state_dict()))  # strict
    return clam, twin


def _outputs(model, h, label):
    """Everything CLAM's forward returns, instance evaluation included."""
    logits, Y_prob, Y_hat, A_raw, extra = model(h, label=label, instance_eval=True,
                                                return_features=True)
    return {"logits": logits, "Y_prob": Y_prob, "Y_hat": Y_hat, "A_raw": A_raw,
            "M": extra["features"], "instance_loss": extra["instance_loss"]}


def _assert_same_outputs(actual, expected, what):
    for name, e in expected.items():
        a = actual[name]
        if name == "Y_hat":
            assert torch.equal(a, e), f"{what}: Y_hat {a} != {e}"
        else:
            assert_close(a, e, what=f"{what}: {name}")


# ---------------------------------------------------------------- checkpoints


CHECKPOINT_CASES = [  # (class, gated, dropout): Attn_Net's score layer is module.3 with dropout
    (CLAM_SB, True, 0.25), (CLAM_SB, False, 0.25), (CLAM_SB, False, 0.0),
    (CLAM_MB, True, 0.0), (CLAM_MB, False, 0.25),
]


@pytest.mark.parametrize("cls, gate, dropout", [
    pytest.param(*c, id=f"{c[0].__name__}-{'gated' if c[1] else 'plain'}-p{c[2]}")
    for c in CHECKPOINT_CASES])
def test_checkpoint_round_trip(backend, device, cls, gate, dropout):
    """A CLAM state_dict loads into the twin (strict), which then gives CLAM's outputs in eval
    mode; the twin's state_dict maps back to exactly CLAM's keys and tensors."""
    skip_unsupported(backend, torch.float32)
    clam, twin = _pair(cls, backend, gate=gate, dropout=dropout)
    clam.eval(), twin.eval()
    assert twin.attention_pool.dropout == (0.25 if dropout else 0.0)  # CLAM's p carried over
    h, label = torch.randn(30, EMBED).to(device), torch.tensor([1], device=device)
    expected = _outputs(clam, h, label)
    _assert_same_outputs(_outputs(twin, h, label), expected, "twin vs CLAM")
    assert expected["A_raw"].shape == (1 if cls is CLAM_SB else 3, 30)

    back = fastmil_to_clam_state_dict(twin.state_dict(), dropout=dropout)
    theirs = clam.state_dict()
    assert sorted(back) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(back[key], value), key
    fresh = cls(gate=gate, size_arg="tiny", dropout=dropout, k_sample=4, n_classes=3,
                embed_dim=EMBED).to(device).eval()
    fresh.load_state_dict(back)
    _assert_same_outputs(_outputs(fresh, h, label), expected, "CLAM from the twin's checkpoint")


def test_checkpoint_keys_of_clam_sb():
    """The mapping of the README, on CLAM_SB's real default size (1024 -> 512 -> 256)."""
    clam = CLAM_SB(gate=True, dropout=0.25)
    mapped = clam_to_fastmil_state_dict(clam.state_dict())
    renamed = {k: v for k, v in mapped.items() if k not in clam.state_dict()}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == {
        "attention_pool.attn.weight": (256, 512), "attention_pool.attn.bias": (256,),
        "attention_pool.gate.weight": (256, 512), "attention_pool.gate.bias": (256,),
        "attention_pool.score.weight": (1, 256), "attention_pool.score.bias": (1,)}
    gate = clam.attention_net[3].attention_b[0].weight  # shared, not copied
    assert renamed["attention_pool.gate.weight"].data_ptr() == gate.data_ptr()
    assert list(mapped)[:2] == ["attention_net.0.weight", "attention_net.0.bias"]  # order kept


@pytest.mark.parametrize("net_cls", [Attn_Net_Gated, Attn_Net])
def test_bare_attention_net_state_dict(net_cls):
    """Empty prefixes map a bare Attn_Net(_Gated) to a bare AttentionPool and back."""
    net = net_cls(L=16, D=8, dropout=True, n_classes=2).eval()
    pool = fastmil.AttentionPool(16, 8, branches=2, gated=net_cls is Attn_Net_Gated,
                                 backend="torch")
    pool.load_state_dict(clam_to_fastmil_state_dict(net.state_dict(), attention_net="",
                                                    pool=""))
    h = torch.randn(11, 16)
    A, _ = net(h)
    assert_close(pool(h), F.softmax(A.t(), dim=1) @ h, what="z vs CLAM's net")
    back = fastmil_to_clam_state_dict(pool.state_dict(), dropout=True, attention_net="",
                                      pool="")
    assert back.keys() == net.state_dict().keys()


def test_state_dict_mapping_errors():
    with pytest.raises(ValueError, match=r"no CLAM attention net at attention_net="
                       r"'attention_net.3': expected the key 'attention_net.3.attention_a.0"
                       r".weight' \(Attn_Net_Gated\) or .* found \['attention_net.3.other'\]"):
        clam_to_fastmil_state_dict({"attention_net.3.other": torch.zeros(1)})
    plain = fastmil.AttentionPool(8, 4, gated=False)
    sd = {f"attention_pool.{k}": v for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match="dropout is None, but this AttentionPool is plain"):
        fastmil_to_clam_state_dict(sd)
    no_bias = fastmil.AttentionPool(8, 4, bias=False).state_dict()
    with pytest.raises(ValueError, match=r"no key 'attn.bias': expected a fastmil "
                       r"AttentionPool with biases"):
        fastmil_to_clam_state_dict(no_bias, pool="")
    both = {"attention_net.3.module.0.weight": 0, "attention_net.3.module.2.weight": 0,
            "attention_net.3.module.3.weight": 0}
    with pytest.raises(ValueError, match=r"module.2 \(no dropout\) or module.3 \(dropout\), got "
                       r"\['module.2', 'module.3'\]"):
        clam_to_fastmil_state_dict(both)


# ---------------------------------------------------------------- training, dropout off


@pytest.mark.parametrize("cls, gate", [(CLAM_SB, True), (CLAM_SB, False), (CLAM_MB, True)],
                         ids=["SB-gated", "SB-plain", "MB-gated"])
def test_training_trajectory_matches_clam(backend, device, cls, gate):
    """30 steps of CLAM's training loop (utils/core_utils.py train_loop_clam: one bag per step,
    instance evaluation on, total loss 0.7·bag CE + 0.3·instance loss, Adam lr 1e-4 with
    weight decay 1e-5, CLAM's defaults) give the same loss at every step, dropout off."""
    skip_unsupported(backend, torch.float32)
    if backend != "torch" and (cls, gate) != (CLAM_SB, True):
        pytest.skip("the Triton interpreter is slow: CLAM_SB gated only (the checkpoint test "
                    "runs the others' forward)")
    clam, twin = _pair(cls, backend, gate=gate)
    gen = torch.Generator().manual_seed(5)
    bags = [(torch.randn(int(torch.randint(8, 40, (), generator=gen)), EMBED, generator=gen),
             torch.randint(0, 3, (1,), generator=gen)) for _ in range(30)]
    bags = [(h.to(device), label.to(device)) for h, label in bags]
    losses = {}
    for name, model in (("clam", clam), ("twin", twin)):
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
        losses[name] = []
        for h, label in bags:
            out = _outputs(model, h, label)
            loss = 0.7 * F.cross_entropy(out["logits"], label) + 0.3 * out["instance_loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.detach())
    clam_losses, twin_losses = torch.stack(losses["clam"]), torch.stack(losses["twin"])
    assert_close(twin_losses, clam_losses, what="loss trajectory")
    # the steps move the weights: the loss changes over the 30 steps
    assert (clam_losses[:10].mean() - clam_losses[-10:].mean()).abs() > 1e-3


# ---------------------------------------------------------------- training, dropout on


def assert_same_distribution(a, b, *, alpha=1e-3, what=""):
    """Two samples of draws, ``a`` and ``b`` ``[R, F]`` (R independent draws of F features), have
    the same per-feature mean and variance within sampling error.

    For each feature, two asymptotically standard-normal statistics: the difference of the
    means over its standard error, and the difference of the variances over its standard error
    (from the fourth central moments, so no normality is assumed). The family of 2·F two-sided
    tests is held to level ``alpha`` by Bonferroni: every |statistic| must stay below
    Φ⁻¹(1 − alpha / (4F)). A feature constant in both samples (a ReLU feature that is 0 for the
    whole bag) must have the same value in both; one constant in one sample only fails. Returns
    the largest |statistic| of each kind.
    """
    assert a.shape == b.shape and a.dim() == 2, f"{what}: shapes {a.shape} and {b.shape}"
    a, b = a.double(), b.double()
    const_a, const_b = (a == a[0]).all(0), (b == b[0]).all(0)
    assert torch.equal(const_a, const_b), \
        f"{what}: features {(const_a ^ const_b).nonzero().flatten().tolist()} vary in one sample only"
    assert_close(a[0, const_a], b[0, const_b], what=f"{what}, constant features")
    a, b = a[:, ~const_a], b[:, ~const_b]
    R, Fn = a.shape
    da, db = a - a.mean(0), b - b.mean(0)
    va, vb = da.pow(2).mean(0), db.pow(2).mean(0)
    t_mean = (a.mean(0) - b.mean(0)) / ((va + vb) / R).sqrt()
    t_var = (va - vb) / ((da.pow(2).var(0) + db.pow(2).var(0)) / R).sqrt()
    limit = statistics.NormalDist().inv_cdf(1 - alpha / (4 * Fn))
    worst = t_mean.abs().max().item(), t_var.abs().max().item()
    assert worst[0] < limit, f"{what}: means differ, |t| = {worst[0]:.2f} >= {limit:.2f}"
    assert worst[1] < limit, f"{what}: variances differ, |t| = {worst[1]:.2f} >= {limit:.2f}"
    return worst


def dropout_draws(clam, twin, h, R):
    """R independent forward draws of CLAM_SB and of its twin in training mode on the bag
    ``h [N, E]``: ``(z, A_raw)`` of each, ``z [R, 32]`` (CLAM's M) and ``A_raw [R, N]``.

    The draws run as one batch of R copies of the bag (each row gets its own dropout masks, as in
    R separate calls): CLAM's forward per bag (transpose, softmax over N, M = A @ h) vectorised
    over the copies, and the twin's pool on the packed copies."""
    N = h.shape[0]
    rows = h.repeat(R, 1)  # [R·N, E]
    clam.train(), twin.train()
    with torch.no_grad():
        A, feats = clam.attention_net(rows)  # [R·N, 1], [R·N, 32]
        A_raw = A.view(R, N)
        M = (F.softmax(A_raw, dim=1)[:, None, :] @ feats.view(R, N, -1))[:, 0]
        feats = twin.attention_net(rows)
        offsets = torch.arange(R + 1, device=h.device) * N
        z, scores = twin.attention_pool(feats, offsets=offsets, return_scores=True)
    return (M, A_raw), (z, scores.view(R, N))


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "plain"])
def test_dropout_matches_clam_in_distribution(backend, device, gate):
    """With CLAM's attention dropout on (p = 0.25 after the tanh and, gated, after the sigmoid,
    independent masks), z and the raw scores of the twin have CLAM's mean and variance, feature by
    feature, over many draws (assert_same_distribution); in eval mode they equal CLAM's.

    The criterion fails for a wrong dropout: with the torch backend's dropout mutated (R=4000,
    gated), one mask shared by both branches gives |t| = 12.6 on z and 34 on the scores, no
    1/(1-p) scaling 18 / 49, p doubled 6.2 / 34, no dropout no variance at all; every
    mutant still fails on the scores (|t| >= 7.1 at R=200, the Triton run). The eval-mode check
    catches dropout applied in eval mode."""
    skip_unsupported(backend, torch.float32)
    if backend != "torch" and not gate:
        pytest.skip("the Triton interpreter runs one bag per program: the gated case only")
    clam, twin = _pair(CLAM_SB, backend, gate=gate, dropout=0.25)
    assert twin.attention_pool.dropout == 0.25
    net = clam.attention_net[3]
    with torch.no_grad():  # spread the scores, so that dropout moves z visibly
        (net.attention_c if gate else net.module[3]).weight.mul_(4)
    twin.load_state_dict(clam_to_fastmil_state_dict(clam.state_dict()))
    # CLAM's dropout=0.25 also drops features in its first layer (the same nn.Dropout in both
    # models): off here, so that the randomness of z is the attention dropout's alone
    clam.attention_net[2].p = twin.attention_net[2].p = 0.0
    h = torch.randn(6, EMBED).to(device)
    R = 4000 if backend == "torch" else 200  # the Triton interpreter runs one bag per program
    (M, A_raw), (z, scores) = dropout_draws(clam, twin, h, R)
    assert_same_distribution(z, M, what="z")
    assert_same_distribution(scores, A_raw, what="raw scores")
    clam.eval(), twin.eval()
    with torch.no_grad():
        label = torch.tensor([0], device=device)
        _assert_same_outputs(_outputs(twin, h, label), _outputs(clam, h, label), "eval mode")
