"""`vitq export-triton`: a Triton model repository whose config parses with Triton's own ModelConfig protobuf."""

from __future__ import annotations

import json
import shutil

import pytest

from vitq.cli import main
from vitq.runtime import Engine
from vitq.triton import export_triton

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (dev extra) not installed")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_export_onnx_repository_parses_with_triton_protobuf(tiny_vit_onnx, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--max-batch", "16",
                 "--max-wait-ms", "2.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    d = repo / "tiny_vit"
    assert (d / "1" / "model.onnx").read_bytes() == (tiny_vit_onnx / "model.onnx").read_bytes()
    cfg = parse(d / "config.pbtxt")
    eng = Engine.load(tiny_vit_onnx)
    assert cfg.name == "tiny_vit" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    (inp,), (out,) = cfg.input, cfg.output
    assert inp.name == eng.inputs[0].name and list(inp.dims) == [3, 32, 32]
    assert inp.data_type == mc.DataType.Value("TYPE_FP32")
    assert out.name == eng.outputs[0].name and list(out.dims) == [10]
    assert out.data_type == mc.DataType.Value("TYPE_FP32")
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2500
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value("KIND_CPU")
    pre = json.loads(cfg.parameters["vitq.preprocess"].string_value)
    assert pre == eng.preprocess.to_dict()
    # re-export replaces the model directory atomically, leaves no staging dirs and other models untouched
    (repo / "other").mkdir()
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--name", "vit-b", "--gpu"]) == 0
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--name", "vit-b"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["other", "tiny_vit", "vit-b"]
    assert parse(repo / "vit-b" / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value(
        "KIND_CPU")


def test_export_plan_with_plugin_note(tiny_vit_onnx, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_vit_onnx, art)
    (art / "model.engine").write_bytes(b"fake-serialized-plan")
    dest = export_triton(art, tmp_path / "repo", fmt="plan", plugin_lib="/opt/vitq/libvitq_plugins.so")
    assert (dest / "1" / "model.plan").read_bytes() == b"fake-serialized-plan"
    assert not (dest / "1" / "model.onnx").exists()
    text = (dest / "config.pbtxt").read_text()
    assert "LD_PRELOAD=/opt/vitq/libvitq_plugins.so" in text
    cfg = parse(dest / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert cfg.parameters["vitq.plugin_library"].string_value == "/opt/vitq/libvitq_plugins.so"
    assert "LD_PRELOAD" in (dest / "README.txt").read_text()


def test_static_batch_model_has_no_dynamic_batching(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    dest = export_triton(tmp_path / "m.onnx", tmp_path / "repo", name="relu")
    cfg = parse(dest / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 3, 8, 8]


def test_export_errors(tiny_vit_onnx, tmp_path, capsys):
    assert main(["export-triton", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "r"), "--format", "plan"]) == 2
    assert "model.engine" in capsys.readouterr().err
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "r"), "--name", "bad name!"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "file")]) == 2
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_string_escaping_round_trips_through_protobuf():
    from vitq.triton import _q

    v = 'a"b\\c\nd\te\x01 é {"x": [1, 2]}'
    assert text_format.Parse("name: " + _q(v), mc.ModelConfig()).name == v
