"""Every artifact kind vitq writes loads into ONNX Runtime without a single warning (default log severity).

A tiny ViT (random weights) is calibrated at each default recipe and lowered for each target; the graph (its plugin
nodes expanded, as ``vitq.runtime`` does) is loaded at ONNX Runtime's default severity (warnings on) with its own
stderr captured at the file-descriptor level. Dangling initializers ("Removing initializer ... It is not used by
any node") or any other warning fail the test.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from test_mixa_core import tiny_vit  # noqa: E402

from vitq.exporter.onnx_export import export_onnx  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.plugins.expand import expand_plugins, has_plugins  # noqa: E402
from vitq.quant.pipeline import calibrate  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402

RECIPES = ("w8a8", "w7a8", "w4a8", "w4a4", "mp:5")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float export path, images, {recipe name: Recipe}) for the tiny ViT."""
    d = tmp_path_factory.mktemp("clean")
    model = tiny_vit()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    recipes = {}
    for name in RECIPES:
        res = calibrate(tiny_vit(), "vit", x.numpy(), parse_recipe_arg(name), model_name="m", provenance={},
                        progress=False, methods={"gptq": False})
        recipes[name] = (res.recipe, res.model)
    path = d / "float.onnx"
    export_onnx(model, path, image_size=(32, 32))
    return d, path, x.numpy(), recipes


def ort_warnings(proto: onnx.ModelProto, capfd) -> str:
    """What ONNX Runtime writes to stderr while creating a session at its default severity (2: warnings)."""
    import onnxruntime as ort

    if has_plugins(proto):
        proto, _ = expand_plugins(proto)
    capfd.readouterr()
    so = ort.SessionOptions()
    so.log_severity_level = 2
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return capfd.readouterr().err


def test_float_export_loads_cleanly(tiny, capfd):
    _, path, _, _ = tiny
    assert ort_warnings(onnx.load(str(path)), capfd) == ""


@pytest.mark.parametrize("target", ["ort", "trt"])
@pytest.mark.parametrize("name", RECIPES)
def test_quantized_artifact_loads_cleanly(tiny, capfd, name, target):
    d, _, x, recipes = tiny
    rec, qmodel = recipes[name]
    path = d / f"{name.replace(':', '_')}.onnx"
    if not path.exists():  # the calibrated model (smoothing folds into its weights), exported once per recipe
        export_onnx(qmodel, path, image_size=(32, 32))
    proto, _ = build_deployable(path, rec, target)
    dangling = [t.name for t in proto.graph.initializer
                if t.name not in {i for n in proto.graph.node for i in n.input}]
    assert not dangling, dangling[:5]
    assert ort_warnings(proto, capfd) == ""


@pytest.mark.parametrize("target", ["ort", "trt"])
def test_mixa_artifact_loads_cleanly(vit_setup, capfd, target):
    _, rec, path, _ = vit_setup
    proto, _ = build_deployable(path, rec, target)
    assert ort_warnings(proto, capfd) == ""


def test_the_check_sees_a_dangling_initializer(tiny, capfd):
    """The check can fail: an unused initializer makes ONNX Runtime warn, and the capture sees it."""
    _, path, _, _ = tiny
    m = onnx.load(str(path))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(3, np.float32), "vitq_unused_const"))
    assert "vitq_unused_const" in ort_warnings(m, capfd)
