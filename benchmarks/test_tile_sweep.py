"""The tile sweep's choice and its hand-off to the launchers, on CPU: the table it writes into
tile_sweep.json is the table ``FASTMIL_TILES`` makes the launchers use. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from . import tile_sweep

kernels = pytest.importorskip("fastmil.kernels.attention_pool")


def _kind(key, default, times, ok=()):
    """One kind's entry of a class as sweep_class writes it; ``times``: tile -> ms."""
    rows = [{"tile": list(t), "ms": ms, "ok": t not in ok, "rel_err": 0.0, "compile_s": 1.0}
            for t, ms in times.items()]
    good = [r for r in rows if r["ok"]]
    best = min(good, key=lambda r: r["ms"])
    return {"rows": rows, "default": list(default), "key": list(key), "best": best["tile"],
            "speedup_over_default": times[default] / best["ms"]}


def _class(name, D, kinds):
    c = tile_sweep.TileClass(name, D, 256, 1, "bf16", True, (1000,), False)
    return {"class": {**c.__dict__, "lengths": list(c.lengths)}, "kinds": kinds}


def test_shared_key_gets_smallest_summed_slowdown_and_round_trips(tmp_path, monkeypatch):
    A, B, C = kernels.TILE_CANDIDATES["fwd"][:3]
    key = kernels.tile_key("fwd", torch.bfloat16, 1024, 256, 1, True)
    # two classes share a key (D=1000 and D=1024 both round to 1024): A is best for the first
    # (1.0 vs 1.1 vs 3.0), C for the second (1.0 vs 1.05 vs 2.0) but far worse on the first;
    # B loses neither by much: slowdowns A 1 + 2 = 3, B 1.1 + 1.05 = 2.15, C 3 + 1 = 4
    one = _class("one", 1000, {"fwd": _kind(key, A, {A: 1.0, B: 1.1, C: 3.0})})
    two = _class("two", 1024, {"fwd": _kind(key, A, {A: 2.0, B: 1.05, C: 1.0})})
    # a tile that gave wrong numbers is never chosen, even when fastest
    bkey = kernels.tile_key("bwd", torch.bfloat16, 1024, 256, 1, True)
    P, Q = kernels.TILE_CANDIDATES["bwd"][:2]
    three = _class("three", 1024, {"bwd": _kind(bkey, P, {P: 2.0, Q: 0.5}, ok=(Q,))})
    result = {"env": {"device": "test", "fastmil_commit": "x", "torch": "t", "triton": "t",
                      "date_utc": "now", "dry_run": False},
              "classes": [one, two, three], "not_run": []}
    table = tile_sweep.choose_tiles(result)
    assert [(tuple(e["key"]), tuple(e["tile"])) for e in table] == [(key, B), (bkey, P)]
    assert table[0]["note"] == "vs the default: one 0.91x, two 1.90x"
    result["measured_tiles"] = table
    lines = tile_sweep.measured_tiles(result)
    assert f"    {key!r}: {B!r},  # vs the default: one 0.91x, two 1.90x" in lines
    path = tmp_path / "tile_sweep.json"
    path.write_text(json.dumps(result))
    assert kernels.load_tiles(str(path)) == {key: B, bkey: P}
    monkeypatch.setattr(kernels, "_FILE_TILES", {})
    monkeypatch.setenv(kernels.TILES_ENV, str(path))
    assert kernels.gpu_tiles("fwd", torch.float16, 1000, 256, 1, True) == B
    assert tile_sweep.default_tile(kernels, tile_sweep.CLASSES[0], "bwd") == P


def test_kernel_ms_adds_up_the_kinds_own_kernels_per_call(monkeypatch):
    """The tile is chosen by the device time of the kind's own kernels: a forward's merge
    counts, the backward's forward (its set-up) and cuBLAS do not; per call over the reps."""
    from . import timing

    calls = []
    breakdown = {"kernels": [{"name": "_bwd_kernel", "count": 5, "ms": 2.0},
                             {"name": "_fwd_kernel", "count": 5, "ms": 1.0},
                             {"name": "_merge_kernel", "count": 5, "ms": 0.5},
                             {"name": "nvjet_sm90_tst_128x256", "count": 5, "ms": 4.0}]}

    def fake_profile(setup, step, top=8):
        assert top > len(breakdown["kernels"])  # no kernel of ours hides in "(other)"
        step(*setup())
        return breakdown

    monkeypatch.setattr(timing, "profile_kernels", fake_profile)
    monkeypatch.setattr(timing, "_l2_flush", lambda: lambda: calls.append("flush"))
    setup, step = (lambda: calls.append("setup")), (lambda: calls.append("step"))
    assert tile_sweep.kernel_ms(setup, step, "bwd_pq", reps=5) == pytest.approx(0.4)
    assert calls == ["setup", "flush", "step"] * 5
    assert tile_sweep.kernel_ms(setup, step, "fwd", reps=5) == pytest.approx(0.3)
    breakdown["kernels"] = breakdown["kernels"][3:]
    assert tile_sweep.kernel_ms(setup, step, "fwd_pq", reps=5) is None  # the profiler saw none
