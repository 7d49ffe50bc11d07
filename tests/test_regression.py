"""Regression gates: `vitq check` on bench (single, set, repeats) and eval JSON, and the pytest plugin."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitq.cli import main
from vitq.errors import InputError
from vitq.regression import compare, merge_repeats, spread


def bench(p50=10.0, p90=12.0, p99=15.0, batch=1, model="deit"):
    return {"schema": "vitq.bench/1", "model": {"path": f"build/{model}/model.onnx", "model": model},
            "batch": batch, "iters": 50, "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "mean": p50},
            "throughput_img_s": batch * 1e3 / p50, "threads": 2,
            "host": {"machine": "x86_64", "cpus": 2}}


def ev(top1=72.0, top5=91.0, agreement=0.99):
    return {"schema": "vitq.eval/1", "model": {"path": "m"}, "images": {"dir": "/d/val"}, "n": 650,
            "top1": top1, "top5": top5, "reference": {"agreement": agreement, "kl_mean": 0.01}}


def write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_latency_within_tolerance_passes_and_slower_fails():
    base = bench()
    assert compare(bench(p50=10.5, p90=12.5, p99=16.0), base, latency_tol=0.10).ok
    rep = compare(bench(p50=12.0), base, latency_tol=0.10)
    assert not rep.ok
    bad = {(c.metric, c.status) for c in rep.regressions}
    assert ("p50", "REGRESSED") in bad and ("throughput", "REGRESSED") in bad
    p50 = next(c for c in rep.comparisons if c.metric == "p50")
    assert p50.change == pytest.approx(0.2)
    # faster is never a regression
    rep = compare(bench(p50=5.0, p90=6.0, p99=7.0), base)
    assert rep.ok and {c.status for c in rep.comparisons} == {"improved"}


def test_throughput_direction_higher_is_better():
    base, res = bench(), bench()
    res["throughput_img_s"] = base["throughput_img_s"] * 0.8
    rep = compare(res, base, metrics=["throughput"])
    assert [c.metric for c in rep.regressions] == ["throughput"]
    res["throughput_img_s"] = base["throughput_img_s"] * 1.5
    assert compare(res, base, metrics=["throughput"]).ok


def test_bench_set_matches_by_batch_and_missing_entry_fails():
    base = {"schema": "vitq.bench-set/1", "results": [bench(batch=1), bench(p50=40, p90=45, p99=50, batch=8)]}
    res = copy.deepcopy(base)
    res["results"][1]["latency_ms"]["p99"] = 70.0
    rep = compare(res, base)
    assert [(c.entry, c.metric) for c in rep.regressions] == [("batch=8", "p99")]
    # result lacks batch 8 entirely: every baseline metric of it is MISSING and fails the gate
    rep = compare(bench(batch=1), base)
    assert not rep.ok and {c.entry for c in rep.regressions} == {"batch=8"}
    assert all(c.status == "MISSING" for c in rep.regressions)


def test_repeats_compare_medians_and_report_spread():
    runs = [bench(p50=v) for v in (10.0, 30.0, 11.0)]  # one outlier repeat
    merged = merge_repeats(runs)
    assert merged["latency_ms"]["p50"] == 11.0
    assert merged["repeats"]["n"] == 3 and merged["repeats"]["latency_ms"]["p50"] == [10.0, 30.0, 11.0]
    assert spread(merged["repeats"]["latency_ms"]["p50"]) == pytest.approx(20.0 / 11.0)
    base = merge_repeats([bench(p50=v) for v in (10.0, 10.2, 10.1)])
    rep = compare(merged, base, metrics=["p50"], latency_tol=0.1)
    (c,) = rep.comparisons
    assert c.result == 11.0 and c.status == "ok"        # median, not the outlier or the mean
    assert c.spread_result == pytest.approx(20.0 / 11.0) and c.noisy
    assert "spread" in rep.summary() and any("spread exceeds" in n for n in rep.notes)


def test_accuracy_absolute_tolerance():
    base = ev()
    assert compare(ev(top1=71.7, agreement=0.988), base, accuracy_tol=0.5).ok
    rep = compare(ev(top1=71.0), base, accuracy_tol=0.5)
    assert [c.metric for c in rep.regressions] == ["top1"]
    assert rep.regressions[0].change == pytest.approx(1.0)
    rep = compare(ev(agreement=0.98), base, accuracy_tol=0.5)  # agreement compared in percent: -1.0 pt
    assert [c.metric for c in rep.regressions] == ["agreement"]


def test_kind_mismatch_and_bad_schema_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="cannot compare"):
        compare(ev(), bench())
    with pytest.raises(InputError, match="unknown latency metric"):
        compare(bench(), bench(), metrics=["p42"])
    r = write(tmp_path, "r.json", {"schema": "something/9"})
    b = write(tmp_path, "b.json", bench())
    assert main(["check", str(r), "--baseline", str(b)]) == 2
    (tmp_path / "x.json").write_text("{not json")
    assert main(["check", str(tmp_path / "x.json"), "--baseline", str(b)]) == 2
    assert main(["check", str(tmp_path / "nope.json"), "--baseline", str(b)]) == 2


def test_cli_check_exit_codes_and_readable_diff(tmp_path, capsys):
    b = write(tmp_path, "base.json", bench())
    ok = write(tmp_path, "ok.json", bench(p50=10.3))
    slow = write(tmp_path, "slow.json", bench(p50=13.0, p90=16.0, p99=20.0))
    assert main(["check", str(ok), "--baseline", str(b)]) == 0
    assert "OK, no regression" in capsys.readouterr().out
    assert main(["check", str(slow), "--baseline", str(b)]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "REGRESSED" in out and "+30.0%" in out
    # a looser tolerance lets it pass; --json writes the machine-readable verdict
    assert main(["check", str(slow), "--baseline", str(b), "--latency-tol", "0.5", "--json",
                 str(tmp_path / "v.json")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["schema"] == "vitq.check/1" and v["ok"] is True
    # accuracy via the CLI
    eb, er = write(tmp_path, "eb.json", ev()), write(tmp_path, "er.json", ev(top1=70.0))
    assert main(["check", str(er), "--baseline", str(eb)]) == 1
    assert main(["check", str(er), "--baseline", str(eb), "--accuracy-tol", "2.5"]) == 0


def test_bench_repeats_end_to_end(tiny_vit_onnx, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(tiny_vit_onnx), "--iters", "5", "--warmup", "1", "--repeats", "3", "--threads", "1",
                 "--batch", "1", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["schema"] == "vitq.bench-set/1"
    for r in data["results"]:
        assert r["repeats"]["n"] == 3 and len(r["repeats"]["latency_ms"]["p50"]) == 3
        assert r["latency_ms"]["p50"] == sorted(r["repeats"]["latency_ms"]["p50"])[1]
    # the same file against itself is never a regression; a baseline claiming 100x faster is
    assert main(["check", str(out), "--baseline", str(out)]) == 0
    fast = copy.deepcopy(data)
    for r in fast["results"]:
        r["latency_ms"] = {k: v / 100 for k, v in r["latency_ms"].items()}
        r["throughput_img_s"] *= 100
        del r["repeats"]
    fb = write(tmp_path, "fast.json", fast)
    capsys.readouterr()
    assert main(["check", str(out), "--baseline", str(fb)]) == 1
    assert "batch=2" in capsys.readouterr().out


PLUGIN_TEST = '''
import json, pytest

@pytest.mark.bench
def test_latency(vitq_latency):
    vitq_latency(MODEL, baseline=BASE, batch=1, iters=5, warmup=1, repeats=2, tolerance=0.10, threads=1)
'''


def test_pytest_plugin_gates_latency(tiny_vit_onnx, tmp_path):
    base = tmp_path / "baselines" / "tiny.json"
    (tmp_path / "test_lat.py").write_text(f"MODEL = {str(tiny_vit_onnx)!r}\nBASE = {str(base)!r}\n" + PLUGIN_TEST)
    cmd = [sys.executable, "-m", "pytest", "-p", "vitq.pytest_plugin", "-q", "-p", "no:cacheprovider",
           "-m", "bench", "--rootdir", str(tmp_path), str(tmp_path / "test_lat.py")]

    def run(*extra):
        return subprocess.run(cmd + list(extra), capture_output=True, text=True, cwd=tmp_path, timeout=120)

    r = run()  # no baseline yet: skipped, telling how to create one
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stdout + r.stderr
    r = run("--vitq-update-baselines")
    assert r.returncode == 0 and base.is_file(), r.stdout + r.stderr
    assert json.loads(base.read_text())["repeats"]["n"] == 2
    # a baseline 100x faster than reality must fail the test with the diff
    b = json.loads(base.read_text())
    b["latency_ms"] = {k: v / 100 for k, v in b["latency_ms"].items()}
    b["throughput_img_s"] *= 100
    del b["repeats"]
    base.write_text(json.dumps(b))
    r = run()
    assert r.returncode == 1 and "latency regression" in r.stdout and "REGRESSED" in r.stdout, r.stdout
    # the bench marker is registered (no unknown-marker warning) and deselectable
    r = run("--strict-markers", "-m", "not bench")
    assert "1 deselected" in r.stdout, r.stdout + r.stderr
    # without any -m, bench tests are skipped (not run by default)
    plain = cmd[:cmd.index("bench") - 1] + cmd[cmd.index("bench") + 1:] + ["-rs"]
    r = subprocess.run(plain, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "1 skipped" in r.stdout and "run with -m bench" in r.stdout + r.stderr, r.stdout
