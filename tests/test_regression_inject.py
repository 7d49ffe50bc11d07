"""`vitq check` end to end on real runs: a baseline from `vitq eval`/`vitq bench`, then a *regressed artifact* (an
injected change to the ONNX model, not an edited JSON) makes the gate fail, and a rerun of the untouched artifact
passes it again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import make_image_folder
from vitq.cli import main


def _copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_classifier(model_path: Path) -> None:
    """Accuracy regression: negate the classifier's weight (the 2-D initializer with 10 = num_classes rows or
    columns that feeds the last Gemm/MatMul), which reverses the logit ranking."""
    m = onnx.load(model_path)
    inits = {i.name: i for i in m.graph.initializer}
    last = [n for n in m.graph.node if n.op_type in ("Gemm", "MatMul") and any(i in inits for i in n.input)][-1]
    name = next(i for i in last.input if i in inits and 10 in numpy_helper.to_array(inits[i]).shape)
    w = numpy_helper.to_array(inits[name])
    inits[name].CopyFrom(numpy_helper.from_array(-w, name))
    onnx.save(m, model_path)


def _add_dead_compute(model_path: Path, layers: int = 8, width: int = 3072) -> None:
    """Latency regression: a chain of ``layers`` [N,3072]x[3072,3072] MatMuls (3072 = the flattened 3x32x32 input)
    computed from the input and added to the logits times zero (outputs unchanged; nothing to constant-fold)."""
    m = onnx.load(model_path)
    g = m.graph
    x, y = g.input[0].name, g.output[0].name
    rng = np.random.default_rng(0)
    new_out = y + "_pre_slow"
    for n in g.node:
        n.output[:] = [new_out if o == y else o for o in n.output]
    nodes = [helper.make_node("Flatten", [x], ["slow_0"], axis=1)]
    w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    g.initializer.append(numpy_helper.from_array(w, "slow_w"))  # one weight shared by the chain: a small file
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"slow_{i * 2}", "slow_w"], [f"slow_{i * 2 + 1}"]))
        nodes.append(helper.make_node("Tanh", [f"slow_{i * 2 + 1}"], [f"slow_{i * 2 + 2}"]))
    last = f"slow_{layers * 2}"
    g.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "slow_zero"))
    nodes += [helper.make_node("ReduceSum", [last], ["slow_sum"], keepdims=1),
              helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_dead"]),
              helper.make_node("Add", [new_out, "slow_dead"], [y])]
    g.node.extend(nodes)
    onnx.checker.check_model(m)
    onnx.save(m, model_path)


def _check(result: Path, baseline: Path, *extra: str) -> tuple[int, dict]:
    verdict = result.with_suffix(".check.json")
    rc = main(["check", str(result), "--baseline", str(baseline), "--json", str(verdict), *extra])
    return rc, json.loads(verdict.read_text())


def test_accuracy_gate_fails_on_injected_regression_and_passes_on_rerun(tiny_vit_onnx, tmp_path, capsys):
    images = make_image_folder(tmp_path / "img", n=24, size=(40, 36), seed=3)
    good = tiny_vit_onnx
    ref = str(good / "model.onnx")
    base, rerun, bad_json = tmp_path / "base.json", tmp_path / "rerun.json", tmp_path / "bad.json"
    ev = ["--images", str(images), "--reference", ref, "--threads", "1"]
    assert main(["eval", str(good), *ev, "--json", str(base)]) == 0
    assert json.loads(base.read_text())["reference"]["agreement"] == 1.0

    bad = _copy_artifact(good, tmp_path / "bad")
    _flip_classifier(bad / "model.onnx")
    assert main(["eval", str(bad), *ev, "--json", str(bad_json)]) == 0
    capsys.readouterr()
    rc, v = _check(bad_json, base)
    assert rc == 1 and not v["ok"], v
    regressed = {c["metric"] for c in v["comparisons"] if c["status"] == "REGRESSED"}
    assert "agreement" in regressed
    assert "REGRESSION" in capsys.readouterr().out

    assert main(["eval", str(good), *ev, "--json", str(rerun)]) == 0
    rc, v = _check(rerun, base)
    assert rc == 0 and v["ok"] and all(c["status"] == "ok" for c in v["comparisons"]), v
    assert {c["metric"] for c in v["comparisons"]} == {"top1", "top5", "agreement"}


def test_latency_gate_fails_on_injected_slowdown_and_passes_on_rerun(tiny_vit_onnx, tmp_path, capsys):
    """Tolerance 100% on p50 (this 2-core CI machine is shared and noisy); the injected work makes the model
    several times slower, far outside it."""
    good = tiny_vit_onnx
    bench = ["--batch", "1", "--threads", "1", "--warmup", "3", "--iters", "15", "--repeats", "3"]
    base, rerun, slow_json = tmp_path / "base.json", tmp_path / "rerun.json", tmp_path / "slow.json"
    assert main(["bench", str(good), *bench, "--json", str(base)]) == 0
    slow = _copy_artifact(good, tmp_path / "slow")
    _add_dead_compute(slow / "model.onnx")
    assert main(["bench", str(slow), *bench, "--json", str(slow_json)]) == 0
    gate = ["--metrics", "p50", "--latency-tol", "1.0"]
    rc, v = _check(slow_json, base, *gate)
    (c,) = v["comparisons"]
    assert rc == 1 and c["status"] == "REGRESSED" and c["change"] > 1.0, v
    assert main(["bench", str(good), *bench, "--json", str(rerun)]) == 0
    rc, v = _check(rerun, base, *gate)
    (c,) = v["comparisons"]
    assert rc == 0 and c["status"] in ("ok", "improved"), v


def test_injected_models_compute_the_same_logits(tiny_vit_onnx, tmp_path):
    """The latency injection leaves the outputs unchanged (so only speed regresses); the accuracy one negates them."""
    from vitq.runtime import Engine

    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    ref = Engine.load(tiny_vit_onnx, backend="ort").run(x)
    slow = _copy_artifact(tiny_vit_onnx, tmp_path / "slow")
    _add_dead_compute(slow / "model.onnx", layers=2, width=64 * 48)
    np.testing.assert_allclose(Engine.load(slow, backend="ort").run(x), ref, rtol=0, atol=1e-6)
    flip = _copy_artifact(tiny_vit_onnx, tmp_path / "flip")
    _flip_classifier(flip / "model.onnx")
    out = Engine.load(flip, backend="ort").run(x)
    assert (out.argmax(1) != ref.argmax(1)).all()
