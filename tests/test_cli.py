"""End-to-end CLI tests: compile/eval/bench/info, and every bad input gives a clear message, a non-zero exit and
no partial output."""

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder
from vitq.cli import main

MODEL = "deit_tiny_patch16_224"


def _no_leftovers(parent: Path):
    left = [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert not left, left


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    calib = make_image_folder(root / "calib", n=4, size=(64, 48))
    out = root / "deit"
    assert main(["compile", MODEL, "--calib", str(calib), "--out", str(out), "-q"]) == 0
    return out, calib


def test_compile_writes_artifact(compiled, capsys):
    out, _ = compiled
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.fp32.onnx", "report.json"}
    r = json.loads((out / "report.json").read_text())
    assert r["schema"] == "vitq.report/1" and r["weights"]["random_init"] is True
    assert r["recipe"]["name"] == "fp32" and r["target"] == "ort"
    v = r["verification"]["export"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and "calibration images" in v["inputs"]
    assert [x["batch"] for x in v["runs"]] == [1, 4]
    assert r["artifacts"]["model.onnx"]["bytes"] > 1_000_000
    _no_leftovers(out.parent)


def test_export_keeps_module_metadata(compiled):
    import onnx

    from vitq.exporter import module_name

    m = onnx.load(compiled[0] / "model.onnx")
    mods = {module_name(n) for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")}
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.11.mlp.fc2", "head", "blocks.5.attn"} <= mods
    props = {p.key: p.value for p in m.metadata_props}
    assert props["vitq.model"] == MODEL and json.loads(props["vitq.preprocess"])["crop_pct"] == 0.9
    assert m.opset_import[0].version == 21


def test_eval_bench_info(compiled, capsys, tmp_path):
    out, calib = compiled
    js = tmp_path / "eval.json"
    assert main(["eval", str(out), "--images", str(calib), "--reference", str(out / "model.fp32.onnx"),
                 "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["n"] == 4 and r["reference"]["agreement"] == 1.0 and "top1" in r
    assert "top-1 agreement" in capsys.readouterr().out
    bj = tmp_path / "bench.json"
    assert main(["bench", str(out), "--batch", "1", "2", "--iters", "3", "--warmup", "1", "--json", str(bj)]) == 0
    b = json.loads(bj.read_text())
    assert [x["batch"] for x in b["results"]] == [1, 2]
    lat = b["results"][0]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert main(["info", str(out)]) == 0
    assert '"recipe": "fp32"' in capsys.readouterr().out


def _fails(args, capsys, match, code=2):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == code, err
    assert match in err, err
    assert "Traceback" not in err


def test_bad_model_name(tmp_path, capsys):
    _fails(["compile", "deit_tiny_patch16_244", "--out", str(tmp_path / "o")], capsys, "deit_tiny_patch16_224")
    assert not (tmp_path / "o").exists()


def test_missing_weights(tmp_path, capsys):
    _fails(["compile", MODEL, "--weights", str(tmp_path / "w.pth"), "--out", str(tmp_path / "o")], capsys,
           "weights file not found")
    assert not (tmp_path / "o").exists()


def test_state_dict_mismatch(tmp_path, capsys):
    import timm

    torch.save(timm.create_model("deit_small_patch16_224", pretrained=False).state_dict(), tmp_path / "s.pth")
    _fails(["compile", MODEL, "--weights", str(tmp_path / "s.pth"), "--out", str(tmp_path / "o")], capsys,
           "shape mismatch")
    assert not (tmp_path / "o").exists()


def test_corrupt_calibration_image_leaves_no_output(tmp_path, capsys):
    calib = make_image_folder(tmp_path / "calib", n=3)
    (calib / "img_001.png").write_bytes(b"\x89PNG broken")
    _fails(["compile", MODEL, "--calib", str(calib), "--out", str(tmp_path / "o")], capsys, "img_001.png")
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)


def test_failed_compile_keeps_previous_artifact(tmp_path, capsys):
    old = tmp_path / "o"
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    calib = make_image_folder(tmp_path / "calib", n=2)
    (calib / "img_000.jpg").write_bytes(b"junk")
    assert main(["compile", MODEL, "--calib", str(calib), "--out", str(old), "-q"]) == 2
    assert (old / "keep.txt").read_text() == "previous"
    _no_leftovers(tmp_path)


def test_non_writable_output(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _fails(["compile", MODEL, "--out", str(f / "out")], capsys, "not a directory")
    if os.geteuid() == 0:  # root ignores permission bits; /proc refuses file creation even for root
        _fails(["compile", MODEL, "--out", "/proc/vitq-test-out"], capsys, "not writable")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        _fails(["compile", MODEL, "--out", str(ro / "out")], capsys, "not writable")


def test_unknown_recipe_and_not_yet_supported(tmp_path, capsys):
    _fails(["compile", MODEL, "--recipe", "w3a9", "--out", str(tmp_path / "o")], capsys, "unknown recipe")
    _fails(["compile", MODEL, "--recipe", str(tmp_path / "r.json"), "--out", str(tmp_path / "o")], capsys,
           "recipe file not found")


def test_eval_bad_paths(tmp_path, capsys, compiled):
    _fails(["eval", str(tmp_path / "nope"), "--images", str(tmp_path)], capsys, "not found")
    _fails(["eval", str(compiled[0]), "--images", str(tmp_path / "noimg")], capsys, "image folder not found")


def test_help_everywhere(capsys):
    for cmd in ([], ["compile"], ["eval"], ["bench"], ["info"]):
        with pytest.raises(SystemExit) as ei:
            main(cmd + ["--help"])
        assert ei.value.code == 0
    assert "--calib-count" in capsys.readouterr().out


def test_quantized_compile_w8a8_end_to_end(compiled, tmp_path):
    """Calibrate -> export the prepared model -> graph passes -> verify the Q/DQ graph against the simulation."""
    import onnx

    _, calib = compiled
    out = tmp_path / "q"
    assert main(["compile", MODEL, "--calib", str(calib), "--recipe", "w8a8", "--out", str(out), "-q"]) == 0
    assert {"model.onnx", "model.fp32.onnx", "report.json", "recipe.json"} <= {p.name for p in out.iterdir()}
    r = json.loads((out / "report.json").read_text())
    v = r["verification"]["qdq_vs_simulation"]
    assert v["passed"] and v["rel_l2_error"] <= v["tolerance_rel_l2"]
    assert r["bitops"]["total"] == r["bitops"]["total_macs"] * 64  # every layer at 8x8 bits
    assert r["calibration"]["used"] and all(l["w_bits"] in (8, None) for l in r["recipe"]["layers"])
    m = onnx.load(out / "model.onnx")
    ops = {n.op_type for n in m.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_quantized_recipe_needs_calibration(tmp_path, capsys):
    _fails(["compile", MODEL, "--recipe", "w8a8", "--out", str(tmp_path / "o")], capsys, "needs calibration images")
