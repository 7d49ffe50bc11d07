"""TensorRT target: option validation, batch-range/profile computation, version parsing, parser-error formatting.
Pure Python: none of this needs TensorRT."""

from __future__ import annotations

import pytest

from vitq.cli import build_parser
from vitq.errors import InputError, UnsupportedError
from vitq.trt.builder import format_parser_errors
from vitq.trt.common import (BatchRange, TrtBuildOptions, TrtUnavailableError, check_trt_version, parse_batch_range,
                             parse_hw_compat, parse_opt_level, parse_trt_version, profile_shapes)

IMG = [{"name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]


@pytest.mark.parametrize("text,expect", [("1:8:32", (1, 8, 32)), (" 2:2:2 ", (2, 2, 2)), ("16", (16, 16, 16)),
                                         (None, (1, 8, 32))])
def test_batch_range_ok(text, expect):
    br = parse_batch_range(text)
    assert (br.min, br.opt, br.max) == expect
    assert str(br) == ":".join(map(str, expect))


@pytest.mark.parametrize("text,msg", [("8:1:32", "MIN <= OPT <= MAX"), ("1:8", "MIN:OPT:MAX"), ("0:1:2", ">= 1"),
                                      ("1:x:4", "OPT must be a positive integer"), ("1:2:99999", "exceeds"),
                                      ("-1:2:3", "MIN must be"), ("1:2:3:4", "MIN:OPT:MAX"), ("", "MIN")])
def test_batch_range_errors(text, msg):
    with pytest.raises(InputError, match=msg) as ei:
        parse_batch_range(text)
    assert "--batch-range" in str(ei.value)


def test_profile_shapes_dynamic_batch():
    prof = profile_shapes(IMG, BatchRange(1, 8, 32))
    assert prof == {"input": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}


def test_profile_shapes_static_model_needs_no_profile():
    assert profile_shapes([{"name": "x", "shape": [4, 3, 8, 8]}], BatchRange(1, 8, 32)) == {}


def test_profile_shapes_rejects_other_dynamic_dims():
    with pytest.raises(UnsupportedError, match="dimension 2"):
        profile_shapes([{"name": "x", "shape": ["b", 3, "h", 8]}], BatchRange(1, 2, 4))


def test_static_batch_mismatch_is_named():
    with pytest.raises(InputError, match="static batch of 4"):
        BatchRange(1, 8, 32).shapes("x", (4, 3, 8, 8))


def test_opt_level_and_hw_compat():
    assert parse_opt_level(None) is None and parse_opt_level("5") == 5 and parse_opt_level(0) == 0
    for bad in (6, -1, "x"):
        with pytest.raises(InputError, match="--opt-level"):
            parse_opt_level(bad)
    assert parse_hw_compat(None) == "none" and parse_hw_compat("Ampere+") == "ampere+"
    with pytest.raises(InputError, match="--hw-compat"):
        parse_hw_compat("hopper+")


def test_build_options(tmp_path):
    o = TrtBuildOptions(batch_range="1:4:8", opt_level=2, timing_cache=tmp_path / "t.cache")
    assert o.batch_range == BatchRange(1, 4, 8) and o.to_dict()["batch_range"] == {"min": 1, "opt": 4, "max": 8}
    with pytest.raises(InputError, match="is a directory"):
        TrtBuildOptions(timing_cache=tmp_path)
    with pytest.raises(InputError, match="no such file"):
        TrtBuildOptions(plugin_lib=tmp_path / "missing.so").check_plugin_lib()


def test_cli_compile_accepts_trt_options(tmp_path):
    args = build_parser().parse_args(["compile", "deit_tiny_patch16_224", "--out", str(tmp_path / "o"),
                                      "--batch-range", "1:8:32", "--timing-cache", str(tmp_path / "c"),
                                      "--opt-level", "4", "--hw-compat", "ampere+", "--plugin-lib", "x.so"])
    o = TrtBuildOptions.from_args(args)
    assert (str(o.batch_range), o.opt_level, o.hw_compat, o.plugin_lib.name) == ("1:8:32", 4, "ampere+", "x.so")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compile", "m", "--out", "o", "--opt-level", "9"])


@pytest.mark.parametrize("text,expect", [("10.3.0.30", (10, 3, 0)), ("10.3.0.30-1+cuda12.5", (10, 3, 0)),
                                         ("v100300", (10, 3, 0)), ("110401", (11, 4, 1)), ("11.4.1", (11, 4, 1))])
def test_parse_trt_version(text, expect):
    assert parse_trt_version(text) == expect


def test_check_trt_version():
    assert check_trt_version("10.3.0") == 10 and check_trt_version("11.4.1.2") == 11
    for bad in ("8.6.1", "10.2.0", "12.0.0"):
        with pytest.raises(TrtUnavailableError):
            check_trt_version(bad)


def test_parser_errors_name_the_node(tiny_vit_onnx):
    import onnx

    nodes = onnx.load(str(tiny_vit_onnx / "model.onnx"), load_external_data=False).graph.node
    text = format_parser_errors([{"node": 1, "code": "UNSUPPORTED_NODE", "desc": "no importer"},
                                 {"node": -1, "code": "INVALID_GRAPH", "desc": "bad"},
                                 {"node": 0, "node_name": "n0", "node_operator": "Foo", "code": "X", "desc": "d"}],
                                tiny_vit_onnx / "model.onnx")
    lines = text.splitlines()
    assert f"node #1 {nodes[1].name!r} ({nodes[1].op_type}): UNSUPPORTED_NODE: no importer" in lines[0]
    assert lines[1].strip().startswith("graph: INVALID_GRAPH")
    assert "node #0 'n0' (Foo)" in lines[2]


def test_jetson_rejects_hw_compat_before_compiling(tmp_path, capsys):
    from vitq.cli import main

    o = TrtBuildOptions(hw_compat="ampere+")
    with pytest.raises(InputError, match="not supported for --target jetson"):
        o.check_for_jetson()
    TrtBuildOptions().check_for_jetson()
    rc = main(["compile", "no_such_model_xyz", "--target", "jetson", "--hw-compat", "ampere+",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--hw-compat ampere+ is not supported for --target jetson" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_plugin_lib_option_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrtBuildOptions(plugin_lib="lib.so").plugin_lib == tmp_path / "lib.so"
