"""Real DeiT-Tiny ImageNet weights on the dev650 images: vitq's own compile + eval reproduce the fp32 numbers
(81.54 top-1 / 95.23 top-5, PROVENANCE.md). Skips when ../shared/data is absent."""

import json

import pytest

from conftest import DEIT_WEIGHTS, DEV650, SAMPLE1000
from vitq.cli import main


@pytest.mark.shared_data
def test_deit_tiny_fp32_dev650(shared_data, tmp_path, capsys):
    out = tmp_path / "deit"
    assert main(["compile", "deit_tiny_patch16_224", "--weights", str(DEIT_WEIGHTS), "--calib", str(SAMPLE1000),
                 "--out", str(out), "-q"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["weights"]["random_init"] is False
    assert r["weights"]["sha256"] == "4f207632149fb938851cbd1603077cf4000ca0e96e50c581b02d4085f0af1ac9"
    assert r["verification"]["export"]["max_abs_diff"] <= 1e-4
    js = tmp_path / "eval.json"
    assert main(["eval", str(out), "--images", str(DEV650), "--json", str(js), "--batch", "50"]) == 0
    e = json.loads(js.read_text())
    assert e["n"] == 650
    assert abs(e["top1"] - 81.54) <= 0.1 and abs(e["top5"] - 95.23) <= 0.1
