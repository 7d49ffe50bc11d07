"""bench/paired_ci.py on synthetic predictions: the paired bootstrap's point estimates, intervals and bar frequency."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

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


def test_realizations_base_from_an_earlier_run(tmp_path, capsys):
    """--base-from pairs a candidate with an earlier run's base by seed; mismatched images refuse."""
    import json

    def run(top1s, agrs):
        rows = [{"seed": s, "top1": t, "agreement_fp32": a, "kl_fp32": 0.1} for s, (t, a) in enumerate(zip(top1s, agrs))]
        return {"realizations": rows, **{k: rz.summarize([r[k] for r in rows])
                                        for k in ("top1", "agreement_fp32", "kl_fp32")}}
    old = {"images": "union", "n": 10, "noise": 1e-4, "seeds": 3, "recipes": {"w4a8": run([80, 81, 82, 83],
                                                                                            [90, 90, 91, 91])}}
    new = {"images": "union", "n": 10, "noise": 1e-4, "seeds": 4,
           "recipes": {"cand": run([79, 81, 81.5, 83, 70], [89, 90.5, 91, 90, 50])}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert rz.main(["--report", str(tmp_path / "new.json"), "--base", "w4a8",
                    "--base-from", str(tmp_path / "old.json")]) == 0
    out = capsys.readouterr().out
    # seeds 0-3 pair up (seed 4 has no base): drops 1, 0, 0.5, 0 -> mean 0.375; agreement -1, +0.5, 0, -1
    assert "| cand |" in out and "0.38 [0.00, 1.00]" in out and "-0.38 [-1.00, +0.50]" in out
    assert not list(tmp_path.glob("combined*"))  # --report writes nothing without --out
    assert rz.main(["--report", str(tmp_path / "new.json"), "--base", "w4a8", "--base-from", str(tmp_path / "old.json"),
                    "--out", str(tmp_path / "combined.json")]) == 0
    comb = json.loads((tmp_path / "combined.json").read_text())
    assert set(comb["recipes"]) == {"cand", "w4a8"} and comb["recipes"]["cand"]["vs_base"]["seeds"] == [0, 1, 2, 3]
    res = rz.with_base_from(new["recipes"], "w4a8", tmp_path / "old.json", "union", 10, 1e-4)
    rz.compare(res, "w4a8")
    assert res["cand"]["vs_base"]["seeds"] == [0, 1, 2, 3]
    with pytest.raises(SystemExit, match="differ"):
        rz.with_base_from(new["recipes"], "w4a8", tmp_path / "old.json", "dev650", 10, 1e-4)
    with pytest.raises(SystemExit, match="realization 'sim' differs from this run's 'ort'"):
        rz.with_base_from(new["recipes"], "w4a8", tmp_path / "old.json", "union", 10, 1e-4, "ort")


def test_realizations_dev650_view():
    """Union runs also score each realization on dev650 alone (the first 650); the view pairs those by seed."""
    def rows(top1s, dev_top1s):
        return [{"seed": s, "top1": t, "agreement_fp32": 90.0, "kl_fp32": 0.1,
                 "dev650": {"top1": d, "agreement_fp32": 92.0 - s, "kl_fp32": 0.05}}
                for s, (t, d) in enumerate(zip(top1s, dev_top1s))]
    res = {"w4a8": {"realizations": rows([80, 81], [79, 80])}, "cand": {"realizations": rows([79, 81], [80, 78])}}
    dev = rz.dev650_view(res, "w4a8")
    assert dev["cand"]["top1"]["mean"] == 79.0 and dev["cand"]["vs_base"]["drop"]["mean"] == 0.5  # drops -1, 2
    assert dev["cand"]["vs_base"]["agree_change"]["mean"] == 0.0
    assert rz.dev650_view({"x": {"realizations": [{"seed": 0, "top1": 1.0}]}}, "w4a8") == {}  # older files


def test_realizations_pooled_runs(tmp_path, capsys):
    """--report A,B pools two implementations' realizations; pairs stay within one implementation and seed."""
    import json

    def run(real, base_top1, cand_top1):
        def rec(t):
            rows = [{"seed": s, "top1": v, "agreement_fp32": 90.0, "kl_fp32": 0.1} for s, v in enumerate(t)]
            return {"realizations": rows}
        return {"images": "union", "n": 10, "noise": 1e-4, "realization": real,
                "recipes": {"w4a8": rec(base_top1), "cand": rec(cand_top1), **({"only_here": rec([1])}
                                                                              if real == "ort" else {})}}
    (tmp_path / "sim.json").write_text(json.dumps(run("sim", [80, 81], [80, 80])))  # drops 0, 1
    (tmp_path / "ort.json").write_text(json.dumps(run("ort", [82, 82], [80, 81])))  # drops 2, 1
    d = rz.pooled([tmp_path / "sim.json", tmp_path / "ort.json"])
    assert set(d["recipes"]) == {"w4a8", "cand"} and d["realization"] == "sim+ort"
    assert [q["seed"] for q in d["recipes"]["cand"]["realizations"]] == ["sim:0", "sim:1", "ort:0", "ort:1"]
    assert rz.main(["--report", f"{tmp_path / 'sim.json'},{tmp_path / 'ort.json'}",
                    "--out", str(tmp_path / "pooled.json")]) == 0
    assert "1.00 [0.00, 2.00]" in capsys.readouterr().out  # mean of the within-pair drops 0, 1, 2, 1
    assert json.loads((tmp_path / "pooled.json").read_text())["recipes"]["cand"]["vs_base"]["drop"]["mean"] == 1.0
    with pytest.raises(SystemExit, match="same realization and seed"):
        rz.pooled([tmp_path / "sim.json", tmp_path / "sim.json"])
    more = run("sim", [80], [79])  # a --seed-from 2 run: seed 2 of the simulation
    for r in more["recipes"].values():
        r["realizations"][0]["seed"] = 2
    (tmp_path / "sim_more.json").write_text(json.dumps(more))
    d = rz.pooled([tmp_path / "sim.json", tmp_path / "ort.json", tmp_path / "sim_more.json"])
    assert d["realization"] == "sim+ort" and len(d["recipes"]["cand"]["realizations"]) == 5
    (tmp_path / "other.json").write_text(json.dumps({**run("trt", [1], [1]), "noise": 1e-3}))
    with pytest.raises(SystemExit, match="differ in images/n/noise"):
        rz.pooled([tmp_path / "sim.json", tmp_path / "other.json"])
