"""Sub-8-bit presets: dynamic 4-bit activations (``QuantMethods.act4``) calibrate, and the deployed graphs compute
the simulation's function on both targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from conftest import assert_same_function  # noqa: E402
from test_mixa_core import tiny_vit  # noqa: E402
from vitq.errors import InputError  # noqa: E402
from vitq.exporter.onnx_export import export_onnx  # noqa: E402
from vitq.passes.infra import ort_run  # noqa: E402
from vitq.plugins.expand import expand_plugins, has_plugins  # noqa: E402
from vitq.quant.pipeline import QuantMethods, calibrate  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("presets")
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5)).numpy()
    out = {}
    for name, act4, group in (("static", "static", 16), ("dynamic", "dynamic", 16), ("dynamic0", "dynamic", 0)):
        res = calibrate(tiny_vit(), "vit", x[:16], parse_recipe_arg("w4a4"), model_name="m", provenance={},
                        progress=False, methods={"act4": act4, "act4_group": group, "gptq_images": 16})
        path = d / f"{name}.onnx"
        export_onnx(res.model, path, image_size=(32, 32))
        out[name] = (res, path)
    return x, out


def test_dynamic_act4_recipe_form(calibrated):
    _, out = calibrated
    rec = out["dynamic"][0].recipe
    for l in rec.layers:
        if l.module == "head":
            assert l.act_bits == 8 and l.input.dynamic is None  # fixed 8/8: stays static
        elif l.kind == "conv":
            assert not l.input.dynamic  # the pixels: static
        elif l.kind == "attn":
            assert l.attn.dynamic == "log_sqrt2" and l.q.dynamic == l.k.dynamic == l.v.dynamic == "token"
        else:
            assert l.input.dynamic == "token" and l.input.group == 16 and l.input_regions is None
    assert all(not getattr(l.input, "dynamic", None) for l in out["static"][0].recipe.layers if l.input)
    assert rec.defaults["act4"] == {"quant": "dynamic", "group": 16, "softmax": "log"}
    assert "act4" not in out["static"][0].recipe.defaults


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_dynamic_act4_graph_is_the_simulation(calibrated, target):
    """The deployed graph (trt: per-token grids, the QuantLinearA4 plugin expanded to its ONNX reference) computes
    the dynamic simulation, not the static one."""
    x, out = calibrated
    res, path = out["dynamic" if target == "ort" else "dynamic0"]
    xe = x[16:]
    with torch.no_grad():
        sim = res.sim(torch.from_numpy(xe)).numpy()
        other = out["static"][0].sim(torch.from_numpy(xe)).numpy()
    proto, _ = build_deployable(path, res.recipe, target, sample_inputs=xe[:2])
    assert has_plugins(proto) == (target == "trt")  # TensorRT runs 4-bit activations in the plugin
    if target == "trt":
        proto, _ = expand_plugins(proto)
    got = ort_run(proto, {"input": xe})[0]
    assert_same_function(got, sim, other)
    assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.75


def test_act4_options_are_checked():
    with pytest.raises(InputError, match="act4='half'"):
        QuantMethods(act4="half")
    with pytest.raises(InputError, match="act4_softmax"):
        QuantMethods(act4_softmax="exp")


def test_cli_act4_choices(tmp_path, capsys):
    from vitq.cli import main
    from vitq.compiler import CompileOptions, _validate

    with pytest.raises(SystemExit) as e:
        main(["compile", "deit_tiny_patch16_224", "--act4", "half", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "--act4" in capsys.readouterr().err
    with pytest.raises(InputError, match="--act4 'half'"):
        _validate(CompileOptions(model="deit_tiny_patch16_224", out=tmp_path / "o", act4="half"), print)
    assert CompileOptions(model="m", out=tmp_path).act4 == "dynamic"  # the preset default
