"""``vitq.quant.forced.forced_check``: the deployed graph against the simulation quantizer by quantizer, every
quantizer of the simulation fed the graph's input. On an intact graph every site is matched and everything agrees
to float precision; a wrong activation scale is named as a wrong quantizer, a changed float op as the segment that
follows it, while the logits-only rule of ``matches_simulation`` sees neither as precisely."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("timm")

from test_family import N_IMAGES, TINY, _images, tiny_model  # noqa: E402
from vitq.exporter.models import family_of  # noqa: E402
from vitq.exporter.onnx_export import export_onnx  # noqa: E402
from vitq.quant.forced import ForcedCheck, SiteCheck, forced_check, graph_sites  # noqa: E402
from vitq.quant.pipeline import calibrate  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    m, x = tiny_model("vit"), _images("vit")
    hw = TINY["vit"][1]["img_size"]
    res = calibrate(m, family_of(m), x, parse_recipe_arg("w8a8"), model_name="vit", provenance={}, progress=False,
                    methods={"gptq_images": N_IMAGES})
    path = tmp_path_factory.mktemp("forced") / "prepared.onnx"
    export_onnx(res.model, path, image_size=(hw, hw))
    proto, _ = build_deployable(path, res.recipe, "ort", sample_inputs=x[:2])
    return res, proto, x


def _edited(proto: onnx.ModelProto, name_part: str, fn) -> tuple[onnx.ModelProto, str]:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    init = next(i for i in m.graph.initializer if name_part in i.name)
    init.CopyFrom(onnx.numpy_helper.from_array(fn(onnx.numpy_helper.to_array(init)), init.name))
    return m, init.name


def test_intact_graph_is_consistent_at_every_quantizer(deployed):
    res, proto, x = deployed
    sites = graph_sites(proto)
    # every activation quantizer of the recipe is a site: linear/conv inputs and the four attention operands
    expect = {f"{l.module}.input" for l in res.recipe.layers if l.kind != "attn"} | {
        f"{l.module}.{r}" for l in res.recipe.layers if l.kind == "attn" for r in ("q", "k", "attn", "v")}
    assert set(sites) == expect
    with torch.no_grad():
        before = res.sim(torch.from_numpy(x[:2]))
    fc = forced_check(res.sim, proto, x[:4])
    s = fc.summary()
    assert fc.consistent, s
    assert s["sites"] == len(expect) and not s["unmatched"] and not s["quantizers_wrong"]
    assert s["max_local_rel"] < 1e-5 and s["max_logits_rel"] < 1e-5
    assert fc.describe().startswith(f"quantizer by quantizer the graph computes the recipe ({len(expect)} quantizers")
    # the simulation is left as it was: its own quantizers back in place, the same function
    assert all(type(w.qin).__name__ == "_InputQuant" for w in res.sim.wrappers.values() if hasattr(w, "qin"))
    with torch.no_grad():
        assert torch.equal(res.sim(torch.from_numpy(x[:2])), before)


def test_a_wrong_activation_scale_is_named(deployed):
    res, proto, x = deployed
    bad, _ = _edited(proto, "blocks.1.mlp.fc1.input.scale", lambda a: (a * 1.03).astype(a.dtype))
    fc = forced_check(res.sim, bad, x[:2])
    assert not fc.consistent
    assert fc.summary()["quantizers_wrong"] == ["blocks.1.mlp.fc1.input"]
    assert "quantizer blocks.1.mlp.fc1.input differs" in fc.describe()
    # upstream of it everything still agrees to float precision
    order = [s.site for s in fc.sites]
    assert all(s.local_rel < 1e-5 for s in fc.sites[:order.index("blocks.1.mlp.fc1.input") + 1])


def test_a_changed_float_op_shows_at_the_next_quantizer(deployed):
    res, proto, x = deployed
    ln = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
    bias = ln[-1].input[2]  # the final norm, read by the head's quantizer only
    bad, _ = _edited(proto, bias, lambda a: (a + 0.05).astype(a.dtype))
    fc = forced_check(res.sim, bad, x[:2])
    s = fc.summary()
    assert not fc.consistent and s["worst_site"] == "head.input" and s["max_local_rel"] > 1e-3
    assert not s["quantizers_wrong"]
    assert "before quantizer head.input" in fc.describe()
    assert all(c.local_rel < 1e-5 for c in fc.sites if c.site != "head.input")


def test_w4a4_split_dynamic_and_plugin_quantizers_are_sites(tmp_path):
    """w4a4: OPT-m's split (two quantized halves, two GEMMs) and dynamic 4-bit activations are sites of the ORT
    graph, forced on their inputs, and the graph is consistent; on the TensorRT graph the 4-bit activation
    quantizers live inside ``QuantLinearA4`` plugin nodes, whose module travels with them into the expansion, so
    that graph is checked in full too."""
    m, x = tiny_model("vit"), _images("vit")
    hw = TINY["vit"][1]["img_size"]
    res = calibrate(m, family_of(m), x, parse_recipe_arg("w4a4"), model_name="vit", provenance={}, progress=False,
                    methods={"gptq_images": N_IMAGES})
    split = [l.module for l in res.recipe.layers if l.input_regions is not None]
    assert split  # OPT-m applies to the GELU-fed fc2
    path = tmp_path / "prepared.onnx"
    export_onnx(res.model, path, image_size=(hw, hw))
    proto, _ = build_deployable(path, res.recipe, "ort", sample_inputs=x[:2])
    sites = graph_sites(proto)
    assert all(sites[f"{s}.input"][1] is None for s in split)  # nothing single to hand on: input forced only
    fc = forced_check(res.sim, proto, x[:2])
    assert fc.consistent, fc.summary()
    proto, _ = build_deployable(path, res.recipe, "trt", sample_inputs=x[:2])
    assert any(n.op_type == "QuantLinearA4" for n in proto.graph.node)
    fc = forced_check(res.sim, proto, x[:2])
    assert fc.consistent and not fc.unmatched, fc.summary()


def test_a_quantizer_without_a_site_makes_the_check_partial():
    fc = ForcedCheck([SiteCheck("blocks.0.mlp.fc1.input", 1e-7, 0, 10)], np.zeros(2), unmatched=["head.input"])
    assert not fc.consistent and "partial" in fc.describe() and "head.input" in fc.describe()
