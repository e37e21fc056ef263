"""CPU checks of the epoch benchmark (benchmarks/epoch.py): the cohort's length distribution,
every provider's loss equal to the others' on the same batch before and after one step, the
CUDA-graph bucket ladder, and a smoke run whose JSON, markdown and plot are complete. Nothing
here asserts a timing."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from . import epoch as E


def test_lengths_follow_the_pathology_distribution():
    n = E.slide_lengths(20_000, seed=1)  # lengths only: cheap at any count
    assert abs(np.median(n) / 12_000 - 1) < 0.03  # median 12,000
    assert abs(np.percentile(n, 5) / 2_000 - 1) < 0.08  # 5th percentile 2,000
    assert abs(np.percentile(n, 95) / 45_000 - 1) < 0.08  # 95th percentile 45,000
    assert n.max() <= 150_000 and n.min() >= 120


@pytest.fixture(scope="module")
def cohort():
    return E.make_cohort(12, torch.device("cpu"), median=40, seed=0)


def test_cohort_is_balanced_split_and_learnable(cohort):
    c = cohort
    assert c.feats.shape == (c.offsets[-1], E.D) and c.feats.dtype == torch.bfloat16
    assert c.labels.sum() == 6 and set(c.labels[c.val]) == {0, 1}
    assert sorted(np.concatenate([c.train, c.val])) == list(range(12))
    # the signal: in positive slides only, a run of 1-5% of the patches lies SIGNAL noise
    # standard deviations along one direction, the other patches near 0 along it
    assert ((c.regions[:, 1] > 0) == (c.labels == 1)).all()
    proj = (c.feats.float() @ c.direction).numpy()
    inside = np.zeros(len(proj), bool)
    for (a, k), o, n in zip(c.regions, c.offsets[:-1], c.lengths, strict=True):
        inside[o + a:o + a + k] = True
        assert k <= 0.05 * n + 1
    assert abs(proj[inside].mean() - E.SIGNAL) < 1 and abs(proj[~inside].mean()) < 0.5


def losses(spec, cohort, ids, steps=2):
    """The loss of each of ``steps`` training steps on the same batch (dropout off, one lr)."""
    tr = E.make_trainer(spec, "fp32", torch.device("cpu"), seed=3, dropout=0.0, lr=1e-3,
                        compile_backend="aot_eager")
    b = E.Batches(cohort, np.asarray(ids), spec.per_step, torch.device("cpu"))
    tr.prepare(b)
    out, before = [], 0.0
    for _ in range(steps):
        tr.step(b, 0)
        out.append(float(tr.loss_sum) - before)
        before = float(tr.loss_sum)
    return out


@pytest.mark.parametrize("ids", [[4], [1, 6, 9]], ids=["one-slide", "three-slides"])
def test_providers_agree_before_and_after_one_step(cohort, ids):
    specs = [s for s in E.SPECS if not s.graphs and not s.compiled and s.pooling != "clam_sb"
             and (len(ids) == 1 or s.per_step > 1)]
    got = {s.name: losses(s, cohort, ids) for s in specs}
    ref = got["clam_1" if len(ids) == 1 else "eager_padded_16"]
    assert ref[1] < ref[0]  # the step learned something
    for name, loss in got.items():
        np.testing.assert_allclose(loss, ref, rtol=2e-5, err_msg=name)


@pytest.mark.slow
def test_compiled_providers_agree(cohort):
    for spec, ids, ref in ((E.BY_NAME["compile_1"], [4], "clam_1"),
                           (E.BY_NAME["compile_padded_16"], [1, 6, 9], "eager_padded_16")):
        np.testing.assert_allclose(losses(spec, cohort, ids), losses(E.BY_NAME[ref], cohort, ids),
                                   rtol=2e-5, err_msg=spec.name)


def test_graph_step_without_the_graph_agrees(cohort, monkeypatch):
    """The CUDA-graph provider's step, replayed eagerly on CPU: static buffers, the bucket's
    padding rows as one ignored bag and 13 empty bags give packed fastmil's losses."""
    def capture(self, rows):
        self.graphs[rows] = types.SimpleNamespace(replay=lambda: self._train_step(rows))

    monkeypatch.setattr(E.GraphTrainer, "_capture", capture)
    ids = [1, 6, 9]
    np.testing.assert_allclose(losses(E.BY_NAME["fastmil_graphs_16"], cohort, ids),
                               losses(E.BY_NAME["fastmil_packed_16"], cohort, ids), rtol=2e-5)


def test_pinned_prefetch_gives_each_step_its_slides(cohort, monkeypatch):
    """The pinned placement's double buffer, with CUDA streams and events stubbed out (run in
    order on CPU): every step, in any order of asking, reads its own slides."""
    stub = types.SimpleNamespace(wait_event=lambda e: None, record=lambda s=None: None)
    for name, fake in (("Stream", lambda *a: stub), ("Event", lambda *a: stub),
                       ("current_stream", lambda *a: stub),
                       ("stream", lambda s: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, fake)
    host = dataclasses.replace(cohort, host=cohort.feats.clone(), feats=None)
    cpu = torch.device("cpu")
    for per_step in (1, 4):
        ref = E.Batches(cohort, cohort.train, per_step, cpu)
        b = E.Batches(host, cohort.train, per_step, cpu, "pinned")
        for i in [0, 1, 2, 0, 1, 2, 2, 0] + list(range(len(b))):
            i %= len(b)
            assert torch.equal(b.packed(i), ref.packed(i)), (per_step, i)
            x, mask = b.padded(i)
            assert torch.equal(x, ref.padded(i)[0]) and torch.equal(mask, ref.padded(i)[1])
            b.done(i)


def test_packed_into_a_static_buffer(cohort):
    b = E.Batches(cohort, cohort.train, 4, torch.device("cpu"))
    out = torch.full((sum(b.rows), E.D), float("nan"), dtype=torch.bfloat16)
    for i in range(len(b)):
        assert torch.equal(b.packed(i, out=out), b.packed(i))
    x, mask = b.padded(0)
    assert torch.equal(x[mask], b.packed(0)) and mask.sum() == b.rows[0]
    assert torch.equal(b.offsets(0)[1:] - b.offsets(0)[:-1],
                       torch.from_numpy(cohort.lengths[b.steps[0]]))


def test_auc_without_scikit_learn_agrees(monkeypatch):
    rng = np.random.default_rng(0)
    labels, scores = np.arange(40) % 2, rng.integers(0, 6, 40) / 5  # with ties
    got = E.auc_score(labels, scores)
    monkeypatch.setitem(sys.modules, "sklearn.metrics", None)  # as if not installed
    assert E.auc_score(labels, scores) == pytest.approx(got, abs=1e-12)


def test_bucket_ladder():
    rows = np.unique(np.geomspace(1, 3e6, 400).astype(int))
    got = [E.bucket(int(r)) for r in rows]
    assert all(g >= r and g % 64 == 0 for g, r in zip(got, rows, strict=True))
    assert all(g <= max(1024, 1.19 * r + 64) for g, r in zip(got, rows, strict=True))
    assert got == sorted(got) and len(set(got)) < 60  # a few buckets, not one per size


def test_smoke_run_writes_complete_results(benchmark, tmp_path):
    out, md, png = tmp_path / "epoch.json", tmp_path / "epoch.md", tmp_path / "epoch.png"
    providers = ["clam_1", "fastmil_packed_16", "fastmil_graphs_16"] + (
        ["clam_sb_1"] if E.CLAM_SB is not None else [])  # few steps: AdamW is slow on CPU
    plots = importlib.util.find_spec("matplotlib") is not None  # a bare GPU image has none
    argv = ["--smoke", "--slides", "8", "--median", "24", "--warmup", "1", "--auc-seeds", "2",
            "--out", str(out), "--md", str(md), "--providers", ",".join(providers)]
    argv += ["--png", str(png)] if plots else []
    res = benchmark.pedantic(E.main, args=(argv,), rounds=1, iterations=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=float))
    assert set(res) == {"schema", "env", "config", "peaks", "floor", "results", "auc",
                        "targets", "wall_s"} and res["schema"] == E.SCHEMA
    assert res["config"]["train_slides"] + res["config"]["val_slides"] == 8
    assert set(res["floor"]) == {"fp32/gpu", "fp32/pinned"}
    rows = {(r["provider"], r["placement"]): r for r in res["results"]}
    assert len(rows) == 2 * len(providers)
    for (name, placement), r in rows.items():
        if placement == "pinned" or name == "fastmil_graphs_16":  # CUDA only
            assert r["status"] == "skipped" and r["reason"].startswith("CUDA only"), r
            continue
        assert r["status"] == "ok", r
        assert r["slides_per_s"] > 0 and r["ms_per_step"] > 0 and np.isfinite(r["loss_mean"])
        assert r["slides"] == res["config"]["train_slides"]
    runs = res["auc"]["runs"]
    assert {r["provider"] for r in runs if r["status"] == "ok"} == {"clam_1", "fastmil_packed_16"}
    assert all(0 <= r["auc"] <= 1 for r in runs if r["status"] == "ok")
    assert {t["target"] for t in res["targets"]} >= {t[0] for t in E.RATIO_TARGETS}
    assert all(t["met"] in (True, False, None) for t in res["targets"])
    text = md.read_text()
    assert "| provider | slides/step | slides/s |" in text and "| target |" in text
    assert not plots or png.stat().st_size > 1000
    assert E.main(["--render", str(out)])["results"] == json.loads(out.read_text())["results"]


def test_budget_skips_what_would_start_late(tmp_path):
    res = E.main(["--smoke", "--slides", "8", "--median", "24", "--budget-s", "1e-6",
                  "--auc-seeds", "2", "--providers", "clam_1,fastmil_packed_16"])
    assert all(r["status"] == "skipped" for r in res["results"] + res["auc"]["runs"])
    assert {r["reason"] for r in res["results"] if r["placement"] == "gpu"} == {"budget"}
    assert all(t["met"] is None for t in res["targets"])


def test_targets_judge_auc_by_seed_noise():
    res = {"results": [], "floor": {}, "auc": {"summary": {
        "fastmil_packed_16": {"mean": 0.80, "sd": 0.02, "n": 3},
        "fastmil_1": {"mean": 0.83, "sd": 0.02, "n": 3}}}}
    (auc,) = E.targets(res)
    assert auc["met"] is True  # 0.03 <= 2 * sqrt(2 * 0.02^2 / 3) = 0.033
    res["auc"]["summary"]["fastmil_1"]["mean"] = 0.90
    assert E.targets(res)[0]["met"] is False
