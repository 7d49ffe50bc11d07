import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vitq.errors import InputError
from vitq.runtime import Engine, topk


def test_engine_dir_and_file(tiny_vit_onnx):
    e1 = Engine.load(tiny_vit_onnx, threads=1)
    e2 = Engine.load(tiny_vit_onnx / "model.onnx")
    assert e1.backend == "ort"
    assert [t.name for t in e1.inputs] == ["input"] and [t.name for t in e1.outputs] == ["logits"]
    assert e1.inputs[0].shape[1:] == (3, 32, 32) and isinstance(e1.inputs[0].shape[0], str)  # dynamic batch
    assert e1.preprocess.input_size == (3, 32, 32) and e1.num_classes == 10
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(e1.run(x), e2.run(x))


@pytest.mark.parametrize("n", [1, 5, 9])
def test_any_batch_size_and_chunking(tiny_vit_onnx, n):
    e = Engine.load(tiny_vit_onnx)
    x = np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)
    full = e.run(x)
    chunked = e.run(x, max_batch=2)
    assert full.shape == (n, 10)
    np.testing.assert_allclose(chunked, full, atol=1e-5)
    out = e.run({"input": x})
    assert set(out) == {"logits"}


def test_static_batch_model_is_padded(tmp_path):
    # a model with a static batch of 4: y = x * 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "g", [x], [y], [two])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, tmp_path / "m.onnx")
    e = Engine.load(tmp_path / "m.onnx")
    data = np.arange(21, dtype=np.float32).reshape(7, 3)
    np.testing.assert_array_equal(e.run(data), data * 2)


def test_bad_inputs(tiny_vit_onnx, tmp_path):
    e = Engine.load(tiny_vit_onnx)
    with pytest.raises(InputError, match="expects"):
        e.run(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InputError, match="dtype"):
        e.run(np.zeros((1, 3, 32, 32), np.int64))
    with pytest.raises(InputError, match="missing"):
        e.run({"wrong": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(InputError, match="not found"):
        Engine.load(tmp_path / "nope.onnx")
    with pytest.raises(InputError, match="not a vitq artifact"):
        Engine.load(tmp_path)
    (tmp_path / "junk.onnx").write_bytes(b"garbage")
    with pytest.raises(InputError, match="junk.onnx"):
        Engine.load(tmp_path / "junk.onnx")


def test_topk_probabilities():
    res = topk(np.array([[0.0, 2.0, 1.0]]), k=2)
    assert [c for c, _ in res[0]] == [1, 2] and abs(sum(p for _, p in topk(np.zeros((1, 4)), 4)[0]) - 1) < 1e-9


def test_runtime_does_not_import_torch():
    # vitq.plugins.expand: the ORT backend expands plugin nodes (static and dynamic per-row) without torch
    code = ("import sys, vitq.runtime, vitq.evaluate, vitq.benchmark, vitq.data, vitq.cli, vitq.plugins.expand; "
            "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
