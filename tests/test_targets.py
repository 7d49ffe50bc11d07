"""Targets and compile options as objects: target capabilities and pass lists, option groups, MixaConfig and
QuantMethods validation (clear messages, exit 2)."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest

from vitq.cli import build_parser, main
from vitq.errors import InputError
from vitq.mixa.config import MixaConfig
from vitq.targets import TARGET_NAMES, JetsonTarget, OrtTarget, TrtTarget, get_target, target_from_args

MODEL = "deit_tiny_patch16_224"


def test_target_names_and_lookup():
    assert TARGET_NAMES == ("ort", "trt", "jetson")
    assert [type(get_target(n)) for n in TARGET_NAMES] == [OrtTarget, TrtTarget, JetsonTarget]
    t = get_target("trt")
    assert get_target(t) is t
    with pytest.raises(InputError, match="unknown target 'tpu'"):
        get_target("tpu")
    with pytest.raises(InputError, match="options must be TrtBuildOptions"):
        get_target("jetson", get_target("ort").options)


def test_activation_group_capability():
    from vitq.plugins.specs import ACT_GROUPS

    ort, trt, jet = (get_target(n) for n in TARGET_NAMES)
    assert ort.act_groups() is None and ort.default_act_group == 32
    ort.check_act_group(16, "--mixa-low-group")  # any group: plain ONNX ops
    for t in (trt, jet):
        assert t.act_groups() == ACT_GROUPS and t.default_act_group == 0
        t.check_act_group(64, "--mixa-low-group")
        with pytest.raises(InputError, match=rf"--mixa-low-group 16 with --target {t.name}: the TensorRT plugin"):
            t.check_act_group(16, "--mixa-low-group")


def test_pass_lists():
    pytest.importorskip("onnx_ir")
    from vitq.recipe.schema import Recipe

    rec = Recipe("w8a8", MODEL, [], {"weight_bits": 8, "act_bits": 8})
    names = {n: [p.NAME for p in get_target(n).passes(rec)] for n in TARGET_NAMES}
    assert names["ort"] == ["insert_qdq", "cleanup", "clip_sub8_activations", "lower_ort_cpu",
                            "fold_shift_zero_point"]
    assert names["trt"] == names["jetson"] == ["insert_qdq", "cleanup", "lower_trt", "dynamic_qdq_float",
                                               "clip_sub8_activations", "cleanup", "trt_check"]


def _args(*argv):
    return build_parser().parse_args(["compile", MODEL, "--out", "o", *argv])


def test_target_option_groups():
    t = target_from_args(_args("--cpu", "AVX512"))
    assert isinstance(t, OrtTarget) and t.options.cpu == "avx512" and t.to_dict() == {"name": "ort", "cpu": "avx512", "isa": "avx512",
                                                                             "isa_source": "given", "form": "u8u8",
                                                                             "keep_bits": False}
    assert target_from_args(_args("--keep-bits")).options.keep_bits is True
    assert target_from_args(_args()).options.cpu == "auto"
    t = target_from_args(_args("--target", "jetson", "--batch-range", "1:2:4", "--opt-level", "2"))
    assert isinstance(t, JetsonTarget) and str(t.options.batch_range) == "1:2:4" and t.options.opt_level == 2
    with pytest.raises(InputError, match=r"--cpu applies to --target ort, not --target trt"):
        target_from_args(_args("--target", "trt", "--cpu", "avx2"))
    with pytest.raises(InputError, match=r"--keep-bits applies to --target ort, not --target jetson"):
        target_from_args(_args("--target", "jetson", "--keep-bits"))
    with pytest.raises(InputError, match=r"--batch-range applies to --target trt\|jetson, not --target ort"):
        target_from_args(_args("--batch-range", "1:2:4"))
    for bad in (["--target", "tpu"], ["--cpu", "sse2"], ["--hw-compat", "hopper+"], ["--batch-range", "4:2:1"]):
        with pytest.raises(SystemExit) as ei:
            _args(*bad)
        assert ei.value.code == 2


@pytest.mark.parametrize("argv,msg", [
    (["--target", "trt", "--cpu", "avx2"], "--cpu applies to --target ort"),
    (["--opt-level", "3"], "--opt-level applies to --target trt|jetson"),
    (["--mixa-bits", "8/4"], "--mixa-bits needs --mixa"),
    (["--recipe", "w8a8", "--mixa", "1.2x", "--mixa-routed", "attn"], "--mixa-routed 'attn': expected linear+attn or linear"),
    (["--recipe", "w8a8", "--mixa", "1.2x", "--mixa-low-quant", "half"], "--mixa-low-quant 'half'"),
    (["--recipe", "w8a8", "--mixa", "1.2x", "--mixa-low-softmax", "exp"], "--mixa-low-softmax 'exp'"),
    (["--recipe", "w8a8", "--mixa", "1.2x", "--mixa-group", "2by2"], "--mixa-group '2by2': expected HxW"),
    (["--recipe", "w8a8", "--mixa", "1.2x", "--mixa-bits", "4/8"], "more bits"),
    (["--mixa", "1.2x"], "recipe 'fp32' is not quantized"),
])
def test_compile_option_errors_exit_2(tmp_path, capsys, argv, msg):
    pytest.importorskip("torch")
    code = main(["compile", MODEL, "--calib", str(tmp_path), "--out", str(tmp_path / "o"), *argv])
    assert code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mixa_config():
    c = MixaConfig("1.35x")
    assert (c.kind, c.value, c.token_group, c.routed_roles) == ("target", 1.35, (2, 2), ("linear", "attn"))
    assert c.resolve(get_target("ort")).default_low_group == 32
    assert c.resolve(get_target("trt")).default_low_group == 0
    assert MixaConfig("1.2x", group="1x2", routed="linear").token_group == (1, 2)
    assert MixaConfig.from_args(NS(mixa=None, mixa_bits=None)) is None
    with pytest.raises(InputError, match="--mixa-low-group needs --mixa"):
        MixaConfig.from_args(NS(mixa=None, mixa_low_group=32))
    with pytest.raises(InputError, match="group size >= 2"):
        MixaConfig("1.2x", low_group=-1)
    with pytest.raises(InputError, match="takes groups of 32, 64, 128, 256"):
        MixaConfig("1.2x", low_group=48).resolve(get_target("jetson"))


def test_quant_methods():
    pytest.importorskip("torch")
    from vitq.quant.pipeline import QuantMethods

    assert QuantMethods.of(None) == QuantMethods()
    m = QuantMethods.of({"gptq": False, "refine": ()})
    assert not m.gptq and m.refine == () and m.sqb and QuantMethods.of(m) is m
    with pytest.raises(InputError, match=r"unknown calibration method key\(s\) 'stats_cache'"):
        QuantMethods.of({"stats_cache": {}})
    with pytest.raises(InputError, match="observer='max'"):
        QuantMethods(observer="max")


def test_compile_help_groups(capsys):
    with pytest.raises(SystemExit):
        main(["compile", "--help"])
    out = capsys.readouterr().out
    for group in ("recipe and calibration:", "MixA-Q (mixed-precision activations):", "target:",
                  "ONNX Runtime (--target ort):", "TensorRT (--target trt|jetson):"):
        assert group in out


@pytest.mark.slow
def test_report_records_target_options(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "o"
    assert main(["compile", MODEL, "--cpu", "avx2", "--out", str(out), "-q"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["target"] == "ort" and r["target_options"] == {"cpu": "avx2", "isa": "avx2", "isa_source": "given",
                                                            "form": "u8u8", "keep_bits": False}
