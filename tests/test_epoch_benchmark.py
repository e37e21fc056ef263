"""CPU checks of benchmarks/epoch.py: lengths, losses of every provider equal (CUDA graphs replayed
eagerly), the pinned prefetch (CUDA stubbed), targets, a smoke run's JSON, markdown, plot."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import types

import numpy as np
import pytest
import torch

from benchmarks import epoch as E

CPU = torch.device("cpu")


def test_lengths_follow_the_pathology_distribution():
    n = E.Cohort.draw_lengths(20_000, seed=1)
    assert abs(np.median(n) / 12_000 - 1) < 0.03 and abs(np.percentile(n, 5) / 2_000 - 1) < 0.08
    assert abs(np.percentile(n, 95) / 45_000 - 1) < 0.08 and 120 <= n.min() <= n.max() <= 150_000
    rows = np.unique(np.geomspace(1, 3e6, 300).astype(int))  # the CUDA-graph buckets
    got = [E.Trainer.bucket(r) for r in rows]
    assert got == sorted(got) and len(set(got)) < 60 and all(g % 64 == 0 for g in got)
    assert all(r <= g <= max(1024, 1.19 * r + 64) for g, r in zip(got, rows, strict=True))


@pytest.fixture(scope="module")
def cohort():
    c = E.Cohort(12, CPU, median=40)
    assert c.feats.shape == (c.offsets[-1], E.D) and c.labels[c.val].tolist() == [0, 1]
    return c


@pytest.mark.parametrize("ids", [[4], [1, 6, 9]], ids=["one-slide", "three-slides"])
def test_providers_agree_before_and_after_one_step(cohort, ids, monkeypatch):
    def losses(name):  # the losses of two steps on the same batch, dropout off
        tr = E.Trainer(E.BY_NAME[name], "fp32", cohort, CPU, seed=3, dropout=0.0)
        tr.epoch(np.asarray(ids))
        return np.diff([0.0] + [float(tr.step(0) or tr.loss_sum) for _ in range(2)])

    # the CUDA graph, replayed eagerly: static x with stale rows, a padding bag, 13 empty bags
    monkeypatch.setattr(E.Trainer, "_capture", lambda tr, *a: types.SimpleNamespace(
        replay=lambda: tr.train(*a)))
    names = [s.name for s in E.SPECS if not s.compiled and s.pooling != "clam_sb"
             and (s.per_step > 1) == (len(ids) > 1)]
    got = {name: losses(name) for name in names}
    ref = got["clam_1" if len(ids) == 1 else "eager_padded_16"]
    assert ref[1] < ref[0] and len(got) == (2 if len(ids) == 1 else 4)
    for name, loss in got.items():
        np.testing.assert_allclose(loss, ref, rtol=2e-5, err_msg=name)


def test_pinned_prefetch_gives_each_step_its_slides(cohort, monkeypatch):
    stub = types.SimpleNamespace(wait_stream=lambda s: None)  # CUDA streams, run in order
    for name, fake in (("Stream", lambda *a: stub), ("current_stream", lambda *a: stub),
                       ("stream", lambda s: contextlib.nullcontext())):
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda x, s: None)
    monkeypatch.setattr(E.Trainer, "_capture", lambda tr, *a: None)
    host = types.SimpleNamespace(**{**vars(cohort), "host": cohort.feats.clone(), "feats": None})
    for name in ("fastmil_1", "eager_padded_16", "fastmil_packed_16", "fastmil_graphs_16"):
        ref, tr = (E.Trainer(E.BY_NAME[name], "fp32", c, CPU, pinned=c is host)
                   for c in (cohort, host))
        ref.epoch(cohort.train[::-1]), tr.epoch(cohort.train[::-1])
        for i in [0, 1, 2, 0, 2, 1, *range(len(tr.steps))]:
            i %= len(tr.steps)  # CUDA graphs: into the static input
            (x, kw), (rx, rkw) = tr.inputs(i, tr.x if tr.spec.graphs else None), ref.inputs(i)
            assert torch.equal(x, rx) and str(kw) == str(rkw), (name, i)


def test_targets_floor_and_auc_noise():
    sps, aucs = {"clam_1": 10, "fastmil_packed_16": 200, "fastmil_1": 12}, (0.78, 0.8, 0.82)
    res = E.summarize({
        "config": {"train_patches": 10**6, "train_slides": 100}, "floor": {},
        "peaks": {"bf16_tflops": 1000.0, "copy_gbs": 1000.0, "h2d_gbs": 10.0},
        "results": [{"provider": p, "dtype": "bf16", "placement": pl, "slides_per_s": v}
                    for p, v in sps.items() for pl in ("gpu", "pinned")],
        "auc": {"runs": [{"provider": p, "auc": a + d} for p, d in (
            ("fastmil_packed_16", 0), ("fastmil_1", 0.03)) for a in aucs]}})
    t = {(x["target"], x["group"]): x["met"] for x in res["targets"]}
    assert t["fastmil_packed_16 vs clam_1", "bf16/gpu"] and not t["fastmil_1 vs clam_1", "bf16/gpu"]
    assert t["fastmil_packed_16 vs eager_padded_16", "bf16/gpu"] is None  # not measured
    assert [f["bound"] for f in res["floor"].values()] == ["hbm", "pcie"]  # 3.7, 4.1, 205 ms
    best = "roofline floor / best fastmil (fastmil_packed_16)"
    assert not t[best, "bf16/gpu"] and t[best, "bf16/pinned"]  # 122x and 2.4x the best
    assert res["targets"][-1]["measured"] == pytest.approx(0.03) and res["targets"][-1]["met"]
    for r in res["auc"]["runs"][3:]:  # 0.03 <= 2 * sqrt(2 * 0.02^2 / 3): met; 0.13: not
        r["auc"] += 0.1
    assert not E.summarize(res)["targets"][-1]["met"]


def test_smoke_run_writes_complete_results(tmp_path, capsys):
    out, png = tmp_path / "epoch.json", tmp_path / "epoch.png"
    plots = importlib.util.find_spec("matplotlib") is not None  # a bare GPU image has none
    argv = ["--smoke", "--slides", "8", "--providers",
            "clam_1,fastmil_packed_16,fastmil_graphs_16,clam_sb_1", "--no-progress"]
    res = E.main(argv + ["--auc-epochs", "1", "--out", str(out)] + ["--png", str(png)] * plots)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=float))
    assert set(res) == set("schema env config peaks floor results auc targets wall_s".split())
    assert {"train_patches": res["config"]["train_patches"], "train_slides": 6, "val_slides": 2,
            "warmup": 3}.items() <= res["config"].items() and "median" in res["config"]["lengths"]
    assert len(rows := {(r["provider"], r["placement"]): r for r in res["results"]}) == 8
    for (name, placement), r in rows.items():
        if placement == "pinned" or name == "fastmil_graphs_16":
            assert r["status"] == "skipped" and r["reason"] == "CUDA only", r
        else:
            assert r["status"] == "ok" and r["slides"] == 6 and np.isfinite(r["loss_mean"]), r
            assert r["slides_per_s"] > 0 and r["ms_per_step"] > 0 and r["warmup_s"] > 0
    ok = {r["provider"]: 0 <= r["auc"] <= 1 for r in res["auc"]["runs"] if r["status"] == "ok"}
    assert ok == {"clam_1": True, "fastmil_packed_16": True} and len(res["auc"]["runs"]) == 6
    assert len(res["targets"]) == 11 and {t["met"] for t in res["targets"]} <= {True, False, None}
    text = capsys.readouterr().out  # the markdown
    assert text == E.render_markdown(res) + "\n" and "| provider | precision/placement |" in text
    assert "| target |" in text and "Validation AUC" in text and (not plots or png.stat().st_size)
    assert E.main(["--render", str(out)])["results"] == res["results"]
    late = E.main(argv + ["--budget-s", "1e-9"])  # every job would start too late
    assert {r["reason"] for r in late["results"] + late["auc"]["runs"]} == {"budget", "CUDA only"}
