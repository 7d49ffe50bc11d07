"""`vitq compare` and vitq.compare on two tiny hand-built ONNX classifiers: the side-by-side numbers are the ones
the pieces compute (top-1, agreement, KL, interleaved ratio, size), and bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_image_folder
from vitq.cli import main
from vitq.compare import compare_artifact, cpu_info, format_compare, interleaved_latency
from vitq.runtime import Engine

SIZE = 16
PRE = {"input_size": [3, SIZE, SIZE], "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
       "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _linear_model(path: Path, w: np.ndarray) -> Path:
    """x [N,3,S,S] -> Flatten -> MatMul(w) -> logits [N,3], with vitq's preprocessing metadata."""
    g = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["logits"])],
        "lin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w.astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    helper.set_model_props(m, {"vitq.preprocess": json.dumps(PRE), "vitq.model": "lin"})
    onnx.save(m, path)
    return path


@pytest.fixture()
def artifact(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * SIZE * SIZE, 3))
    d = tmp_path / "art"
    d.mkdir()
    _linear_model(d / "model.fp32.onnx", w)
    _linear_model(d / "model.onnx", np.round(w * 4) / 4)  # a coarse "quantized" copy
    (d / "report.json").write_text(json.dumps({"model": {"name": "lin"}, "recipe": {"name": "w2"},
                                               "weights": {"random_init": True}}))
    return d, w


def test_interleaved_ratio_of_identical_models_is_about_one(artifact):
    d, _ = artifact
    a = Engine.load(d / "model.fp32.onnx", threads=1)
    b = Engine.load(d / "model.fp32.onnx", threads=1)
    t = interleaved_latency({"a": a, "b": b}, 2, rounds=4, per_round=2)
    assert t["a"]["runs"] == t["b"]["runs"] == 8 and "ratio" not in t["a"]
    assert t["b"]["ratio_min"] <= t["b"]["ratio"] <= t["b"]["ratio_max"] and 0.2 < t["b"]["ratio"] < 5
    assert len(t["b"]["round_medians"]) == 4


def test_compare_numbers_match_a_direct_evaluation(artifact, tmp_path):
    d, w = artifact
    imgs = make_image_folder(tmp_path / "imgs", n=6, size=(20, 20))
    r = compare_artifact(d, images=__import__("vitq.data", fromlist=["x"]).open_image_set(imgs), batches=(1, 2),
                         threads=1, rounds=2, per_round=1)
    assert r["schema"] == "vitq.compare/1" and r["recipe"] == "w2" and r["random_weights"] is True
    ev = r["eval"]
    assert ev["schema"] == "vitq.eval/1" and ev["n"] == 6
    assert 0 <= ev["reference"]["agreement"] <= 1 and ev["reference"]["kl_mean"] >= 0
    assert [x["batch"] for x in r["latency"]] == [1, 2]
    assert r["size_bytes"]["fp32"] == (d / "model.fp32.onnx").stat().st_size
    assert [b["batch"] for b in r["bench"]["results"]] == [1, 1, 2, 2]
    text = format_compare(r)
    assert "top-1 agreement with fp32" in text and "p50 latency, batch 2" in text and "RANDOM weights" in text
    assert " ".join(cpu_info()["flags"]) in text


def test_cli_compare_writes_report_inputs(artifact, capsys):
    d, _ = artifact
    assert main(["compare", str(d), "--batch", "1", "--threads", "1", "--rounds", "2", "--per-round", "1",
                 "--for-report", "--json", str(d / "compare.json")]) == 0
    out = capsys.readouterr().out
    assert "size on disk (MB)" in out and "p50 latency, batch 1" in out
    assert json.loads((d / "bench.json").read_text())["schema"] == "vitq.bench-set/1"
    assert not (d / "eval.json").exists()  # no --images: latency and size only
    assert json.loads((d / "compare.json").read_text())["schema"] == "vitq.compare/1"


def test_cli_compare_bad_dir_exits_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "model.fp32.onnx not found" in capsys.readouterr().err
