"""Jetson bundle: contents, hashes, verify catching tampered/missing files, build_trt_target's fallback."""

from __future__ import annotations

import json
import os

import pytest

from vitq.artifacts import sha256_file
from vitq.cli import main
from vitq.errors import VerificationError
from vitq.trt.bundle import check_bundle, verify_bundle, write_bundle
from vitq.trt.common import TrtBuildOptions

PRE = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.fixture
def plugin_src(tmp_path):
    src = tmp_path / "plugins_src"
    (src / "kernels").mkdir(parents=True)
    (src / "kernels" / "gelu.cu").write_text("// kernel\n")
    (src / "trt").mkdir()
    (src / "trt" / "plugin.cpp").write_text("// plugin\n")
    (src / "trt" / "__pycache__").mkdir()
    (src / "trt" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\n")
    return src


@pytest.fixture
def bundle(tiny_vit_onnx, tmp_path, plugin_src):
    out = tmp_path / "bundle"
    m = write_bundle(tiny_vit_onnx / "model.onnx", out, model_name="tiny_vit", recipe_hash="abc123",
                     preprocess=PRE, batch_range="1:4:16", plugin_sources_dir=plugin_src, num_classes=10)
    return out, m


def test_bundle_contents(bundle):
    out, m = bundle
    files = set(m["files"])
    assert {"model.onnx", "build_engine.sh", "README.md", "model.engine.json", "plugins/CMakeLists.txt",
            "plugins/kernels/gelu.cu", "plugins/trt/plugin.cpp"} <= files
    assert not any("__pycache__" in f for f in files) and "manifest.json" not in files
    assert (out / "manifest.json").is_file() and not list(out.parent.glob(".bundle.partial-*"))
    for rel, e in m["files"].items():
        assert sha256_file(out / rel) == e["sha256"]
    assert m["io"]["inputs"] == [{"name": "input", "shape": [m["io"]["inputs"][0]["shape"][0], 3, 32, 32],
                                  "dtype": "float32"}]
    assert m["io"]["outputs"][0]["name"] == "logits"
    assert m["target"]["sm"] == "8.7"
    assert {t["tensorrt"] for t in m["target"]["tensorrt"]} == {">=10.3,<11", ">=11.4.1"}
    assert m["batch_range"] == {"min": 1, "opt": 4, "max": 16} and m["engine"]["built"] is False
    assert "--stronglyTyped" in m["engine"]["trtexec"]["tensorrt10"]
    assert "--stronglyTyped" not in m["engine"]["trtexec"]["tensorrt11"]
    assert m["plugins"] == {"custom_ops": [], "sources": True, "cmake_dir": "plugins"}
    assert os.access(out / "build_engine.sh", os.X_OK)
    side = json.loads((out / "model.engine.json").read_text())
    assert side["metadata"]["vitq.model"] == "tiny_vit" and side["metadata"]["vitq.num_classes"] == "10"
    assert json.loads(side["metadata"]["vitq.preprocess"])["input_size"] == [3, 32, 32]
    readme = (out / "README.md").read_text()
    for s in ("vitq bundle verify", "./build_engine.sh", "vitq bench", "vitq eval", "cmake -S plugins"):
        assert s in readme


def test_verify_ok_and_cli(bundle, capsys):
    out, _ = bundle
    res = verify_bundle(out)
    assert res["ok"] and res["problems"] == [] and res["files_checked"] >= 7
    (out / "model.engine").write_bytes(b"built on device")  # created later on the device: not a problem
    assert verify_bundle(out)["unlisted"] == ["model.engine"]
    (out / "plugins" / "build" / "CMakeFiles").mkdir(parents=True)  # the plugin build on the device: one entry
    for name in ("CMakeCache.txt", "libvitq_plugins.so", "CMakeFiles/x.o"):
        (out / "plugins" / "build" / name).write_bytes(b"")
    assert verify_bundle(out)["unlisted"] == ["model.engine", "plugins/build/ (3 files)"]
    assert main(["bundle", "verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_detects_tampered_and_missing(bundle, capsys):
    out, _ = bundle
    with open(out / "plugins" / "trt" / "plugin.cpp", "a") as f:
        f.write("// edited\n")
    data = bytearray((out / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(data))
    (out / "README.md").unlink()
    res = verify_bundle(out)
    assert not res["ok"]
    text = "\n".join(res["problems"])
    assert "README.md: missing" in text
    assert "model.onnx: sha256 mismatch" in text and "plugins/trt/plugin.cpp: s" in text
    with pytest.raises(VerificationError, match="3 problems"):
        check_bundle(out)
    assert main(["bundle", "verify", str(out)]) == 3
    err = capsys.readouterr().err
    assert "README.md: missing" in err and "Traceback" not in err


def test_verify_bad_manifest(bundle, tmp_path):
    out, _ = bundle
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["../escape"] = {"sha256": "0", "bytes": 0}
    del m["files"]["build_engine.sh"]
    (out / "manifest.json").write_text(json.dumps(m))
    probs = verify_bundle(out)["problems"]
    assert any("../escape: invalid path" in p for p in probs)
    assert any("build_engine.sh: required file not listed" in p for p in probs)
    (out / "manifest.json").write_text("{not json")
    assert "not valid JSON" in verify_bundle(out)["problems"][0]
    assert "manifest.json is missing" in verify_bundle(tmp_path)["problems"][0]


def test_bundle_without_plugin_sources(tiny_vit_onnx, tmp_path):
    m = write_bundle(tiny_vit_onnx / "model.onnx", tmp_path / "b", model_name="tiny_vit", recipe_hash="h",
                     preprocess=json.dumps(PRE), batch_range=None, plugin_sources_dir=tmp_path / "absent")
    assert m["plugins"] == {"custom_ops": [], "sources": False, "cmake_dir": None}
    assert not (tmp_path / "b" / "plugins").exists()
    assert verify_bundle(tmp_path / "b")["ok"]
    assert "cmake" not in (tmp_path / "b" / "build_engine.sh").read_text()


def test_bundle_flags_custom_ops_without_plugins(tiny_vit_onnx, tmp_path):
    import onnx
    from onnx import helper

    model = onnx.load(str(tiny_vit_onnx / "model.onnx"))
    out_name = model.graph.output[0].name
    model.graph.node[-1].output[0] = "pre"
    model.graph.node.append(helper.make_node("VitqGelu", ["pre"], [out_name], domain="vitq.plugins"))
    model.opset_import.append(helper.make_opsetid("vitq.plugins", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    m = write_bundle(path, tmp_path / "b", model_name="t", recipe_hash="h", preprocess=None,
                     plugin_sources_dir=tmp_path / "absent")
    assert m["plugins"]["custom_ops"] == [{"domain": "vitq.plugins", "op_type": "VitqGelu"}]
    probs = verify_bundle(tmp_path / "b")["problems"]
    assert any("custom ops (vitq.plugins::VitqGelu)" in p for p in probs)
    assert "PLUGIN_LIB" in (tmp_path / "b" / "README.md").read_text()


def test_failed_bundle_leaves_nothing(tiny_vit_onnx, tmp_path):
    from vitq.errors import InputError

    with pytest.raises(InputError):
        write_bundle(tiny_vit_onnx / "model.onnx", tmp_path / "b", model_name="t", recipe_hash="h",
                     preprocess=None, batch_range="1:2:3", opts=TrtBuildOptions())
    with pytest.raises(InputError, match="--batch-range"):
        write_bundle(tiny_vit_onnx / "model.onnx", tmp_path / "b", model_name="t", recipe_hash="h",
                     preprocess=None, batch_range="9:1:2")
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(_trt_importable(), reason="TensorRT is importable here: the real build path is tested instead")
def test_build_trt_target_without_tensorrt_writes_script(tiny_vit_onnx, tmp_path):
    from vitq.trt.builder import build_trt_target

    out = tmp_path / "art"
    entry = build_trt_target(tiny_vit_onnx / "model.onnx", out, TrtBuildOptions(batch_range="1:2:8"), echo=print)
    assert entry["engine"] is None and "must be built on the target" in entry["reason"]
    assert "build_engine.sh" in entry["reason"]
    assert (out / "model.onnx").is_file() and (out / "build_engine.sh").is_file()
    assert not (out / "model.engine").exists()
    side = json.loads((out / "model.engine.json").read_text())
    assert side["metadata"]["vitq.model"] == "tiny_vit" and side["tensorrt_version"] is None
    assert "--maxShapes=input:8x3x32x32" in entry["trtexec"]["tensorrt10"]
