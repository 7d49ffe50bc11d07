"""bench/paired_ci.py on synthetic predictions: the paired bootstrap's point estimates, intervals and bar frequency."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location("paired_ci", Path(__file__).resolve().parents[1] / "bench" /
                                               "paired_ci.py")
pc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pc)


def _case(n=1000, flips=0, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    fp32 = labels.copy()
    fp32[:100] = (labels[:100] + 1) % 5  # fp32 is wrong on 10%
    base = fp32.copy()
    cand = base.copy()
    cand[200:200 + flips] = (cand[200:200 + flips] + 2) % 5  # the candidate breaks `flips` correct images
    return labels, fp32, base, cand


def test_identical_predictions_pin_the_bar():
    labels, fp32, base, cand = _case()
    kl = np.zeros(len(labels))
    r = pc.paired(base == labels, cand == labels, base == fp32, cand == fp32, kl, kl, boot=500, bar_drop=0.3,
                  bar_agree=-1.0)
    assert r["drop"] == 0 and r["drop_ci95"] == [0.0, 0.0] and r["agree_change"] == 0
    assert r["p_bar"] == 1.0 and r["bar_met"] and r["discordant_top1"] == 0


def test_a_clear_regression_is_settled():
    labels, fp32, base, cand = _case(flips=50)  # 5 points worse on top-1 and on agreement
    kl = np.zeros(len(labels))
    r = pc.paired(base == labels, cand == labels, base == fp32, cand == fp32, kl, kl + 0.01, boot=2000,
                  bar_drop=0.3, bar_agree=-1.0)
    assert abs(r["drop"] - 5.0) < 1e-9 and abs(r["agree_change"] + 5.0) < 1e-9
    assert r["drop_ci95"][0] > 0.3 and r["agree_change_ci95"][1] < -1  # the interval excludes the bar
    assert r["p_bar"] == 0.0 and not r["bar_met"] and abs(r["kl_added"] - 0.01) < 1e-12


def test_small_differences_are_not_settled():
    labels, fp32, base, cand = _case(flips=4)  # 0.4 points on 1000 images
    kl = np.zeros(len(labels))
    r = pc.paired(base == labels, cand == labels, base == fp32, cand == fp32, kl, kl, boot=2000, bar_drop=0.3,
                  bar_agree=-1.0)
    assert r["drop_ci95"][0] <= 0.3 <= r["drop_ci95"][1] and 0.0 < r["p_bar"] < 1.0


def test_main_reads_npz_and_writes_json(tmp_path, capsys):
    labels, fp32, base, cand = _case(n=800, flips=8)
    z = {"labels": labels, "fp32": fp32, "n_dev650": np.array(650)}
    for name, p in (("base", base), ("cand", cand)):
        z[f"{name}:sim_float32:pred"] = p
        z[f"{name}:sim_float32:kl"] = np.zeros(len(p))
    np.savez(tmp_path / "p.npz", **z)
    out = tmp_path / "ci.json"
    assert pc.main([str(tmp_path / "p.npz"), "--base", "base", "--boot", "200", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["candidate"], r["realization"], r["images"]) for r in rows] == [
        ("cand", "sim_float32", "dev650"), ("cand", "sim_float32", "all800")]
    assert rows[1]["drop"] == 1.0 and "| cand | sim_float32 | all800 |" in capsys.readouterr().out
    assert pc.main([str(tmp_path / "p.npz"), "--base", "nope", "--out", str(out)]) == 2


_rspec = importlib.util.spec_from_file_location("realizations", Path(__file__).resolve().parents[1] / "bench" /
                                                "realizations.py")
rz = importlib.util.module_from_spec(_rspec)
_rspec.loader.exec_module(rz)


def test_realizations_perturbation_and_scores():
    import torch

    x = torch.randn(4, 3, 8, 8)
    assert rz.perturbed(x, 1e-4, 0) is x
    a, b = rz.perturbed(x, 1e-4, 1), rz.perturbed(x, 1e-4, 1)
    assert torch.equal(a, b) and not torch.equal(a, rz.perturbed(x, 1e-4, 2))  # seeded: the same draw per recipe
    rel = ((a - x).abs() / x.abs().clamp_min(1e-12)).max().item()
    assert 0 < rel < 1e-3
    f = np.eye(3)[[0, 1, 2, 0]] * 5.0
    s = rz.scores(f, f, np.array([0, 1, 1, 0]))
    assert s["top1"] == 75.0 and s["agreement_fp32"] == 100.0 and abs(s["kl_fp32"]) < 1e-12
    m = rz.summarize([1.0, 3.0])
    assert m == {"mean": 2.0, "std": 2 ** 0.5, "min": 1.0, "max": 3.0}
