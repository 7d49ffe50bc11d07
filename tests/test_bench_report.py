"""``python -m bench report``: docs/results.md is exactly what the committed result files regenerate, and result
files of benchmarks without a dedicated renderer still render (a table of their rows with command and machine)."""

from __future__ import annotations

import json

import bench.report as report
from bench.common import REPO


def test_committed_results_page_regenerates_byte_for_byte():
    committed = (REPO / "docs" / "results.md").read_text()
    assert report.render() == committed, "docs/results.md is stale: run python -m bench report and commit it"


def test_committed_readme_table_regenerates():
    text = (REPO / "README.md").read_text()
    assert report.BEGIN in text and report.render_readme(text) == text, \
        "README.md's measured table is stale: run python -m bench report and commit it"
    assert "| `w8a8` |" in report.readme_block()  # one row per scored recipe


def test_main_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    page = tmp_path / "results.md"
    monkeypatch.setattr(report, "DOC", page)
    monkeypatch.setattr(report, "README", tmp_path / "README.md")
    assert report.main(["--check"]) == 1 and "stale" in capsys.readouterr().out
    assert report.main([]) == 0 and report.main(["--check"]) == 0


def test_unknown_benchmark_renders_generically(tmp_path):
    machine = {"model": "Some CPU", "cores": 4, "machine": "x86_64", "flags": ["avx2", "avx512_vnni"]}
    (tmp_path / "loadtest.json").write_text(json.dumps({  # a benchmark with no renderer of its own
        "benchmark": "loadtest", "command": "python -m bench loadtest --concurrency 1 4", "data": "dev650 JPEGs",
        "machine": machine, "versions": {"vitq": "0.1.0"}, "date": "2026-01-01T00:00:00+00:00",
        "results": [{"server": "vitq", "concurrency": 1, "p50_ms": 80.04, "errors": 0, "extra": {"nested": 1}},
                    {"server": "triton", "concurrency": 4, "p50_ms": 122.0, "errors": 0, "ok": True}]}))
    text = report.render(tmp_path)
    assert "## loadtest" in text and "`python -m bench loadtest --concurrency 1 4`" in text
    assert "Some CPU, 4 cores, avx2 avx512_vnni" in text
    assert "| server | concurrency | p50_ms | errors | ok |" in text
    assert "| vitq | 1 | 80.04 | 0 | - |" in text and "| triton | 4 | 122.00 | 0 | yes |" in text
    assert report.render(tmp_path) == text  # deterministic


def test_accuracy_recipe_modifiers():
    import pytest

    from bench.accuracy import compile_variant

    assert compile_variant("w4a8") == ("w4a8", {})
    assert compile_variant("w4a8+recon") == ("w4a8", {"reconstruct": 200})
    assert compile_variant("mp:5+recon=100+static4") == ("mp:5", {"reconstruct": 100, "act4": "static"})
    with pytest.raises(SystemExit, match="unknown recipe modifier 'fast'"):
        compile_variant("w4a4+fast")


def test_rows_merged_from_another_cpu_name_it(tmp_path, monkeypatch):
    from bench import common

    avx2 = {"model": "AMD EPYC", "cores": 2, "machine": "x86_64", "flags": ["avx2", "fma"]}
    vnni = {**avx2, "flags": ["avx2", "avx512_vnni"]}
    monkeypatch.setattr(common, "cpu_info", lambda: vnni)
    old, new = [{"model": "a", "recipe": "w8a8", "wall_s": 10.0, "cpu_s": 9.0, "peak_rss_mib": 1.0}], \
        [{"model": "b", "recipe": "w8a8", "wall_s": 20.0, "cpu_s": 19.0, "peak_rss_mib": 2.0}]
    rows = common.stamp_cpu(old, {"machine": avx2}, new)
    assert [r["cpu"] for r in rows] == ["AMD EPYC, 2 cores, avx2 fma", "AMD EPYC, 2 cores, avx2 avx512_vnni"]
    d = {"benchmark": "compile", "command": "python -m bench compile", "machine": vnni, "versions": {},
         "date": "2026-01-01T00:00:00+00:00", "results": {"target": "ort", "rows": rows}}
    (tmp_path / "compile.json").write_text(json.dumps(d))
    text = report.render(tmp_path)
    assert "| CPU |" in text and "| AMD EPYC, 2 cores, avx2 fma |" in text
    for r in rows:  # one CPU: no column
        r["cpu"] = "x"
    (tmp_path / "compile.json").write_text(json.dumps(d))
    assert "| CPU |" not in report.render(tmp_path)


def test_cpu_forms_files_per_isa_render_under_one_title(tmp_path):
    machine = {"model": "Some CPU", "cores": 2, "machine": "x86_64", "flags": ["avx2"]}
    for isa in ("avx2", "vnni"):
        (tmp_path / f"cpu_forms_{isa}.json").write_text(json.dumps({
            "benchmark": "cpu_forms", "command": "python -m bench cpu_forms", "machine": machine, "versions": {},
            "date": "2026-01-01T00:00:00+00:00", "results": {"cpu_isa": isa, "models": {}}}))
    text = report.render(tmp_path)
    assert text.index("## CPU int8 forms (avx2)") < text.index("## CPU int8 forms (vnni)")
    assert "`bench/results/cpu_forms_vnni.json`" in text
