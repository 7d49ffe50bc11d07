"""The split_windows graph pass on ONNX Runtime: exact routing in float (difference 0), r = 0 equals the uniform
graph, the deployed two-precision graph equals the MixA-Q simulation, dynamic batch (1 and 3), ViT token groups
and Swin (shifted) windows. Tiny random timm models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

timm = pytest.importorskip("timm")

from vitq.mixa.calib import attach, build_mixa_spec  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.passes.infra import ort_run, run_passes  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.passes.split_windows import SplitWindows  # noqa: E402
from conftest import assert_same_function  # noqa: E402

# fixtures vit_setup / swin_setup (session-scoped, shared with test_mixa_dynamic.py): tests/conftest.py


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_float_routing_is_exact(which, vit_setup, swin_setup):
    res, rec, path, x = vit_setup if which == "vit" else swin_setup
    fl = onnx.load(str(path))
    routed = run_passes(fl, [SplitWindows(rec)], validate=True)
    ops = [n.op_type for n in routed.graph]
    assert "TopK" in ops and "GatherND" in ops and "ReduceL2" in ops and "ScatterElements" in ops
    for b in (1, 3):
        xb = x[:b].numpy()
        assert np.array_equal(ort_run(fl, {"input": xb})[0], ort_run(routed, {"input": xb})[0])


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_deployed_graph_matches_simulation(which, vit_setup, swin_setup):
    res, rec, path, x = vit_setup if which == "vit" else swin_setup
    proto, rep = build_deployable(path, rec, "ort", sample_inputs=x[:2].numpy())
    names = [p["name"] for p in rep["passes"]]
    assert names[:3] == ["split_windows", "insert_qdq", "split_windows_attn"]
    sim = MixaSim(res.sim, rec.mixa)
    more = torch.randn(26, *x.shape[1:], generator=torch.Generator().manual_seed(5))
    rows = {"got": [], "ref": [], "base": []}
    for xb in (x[:1], x[1:4], torch.cat([x[4:], more])):  # dynamic batch: 1, 3 and 28 (32 distinct samples)
        got = ort_run(proto, {"input": xb.numpy()})[0]
        assert got.shape == (len(xb), 10)
        with torch.no_grad():
            rows["ref"].append(sim(xb).numpy())
            rows["base"].append(res.sim(xb).numpy())
        rows["got"].append(got)
    got, ref, base = (np.concatenate(rows[k]) for k in ("got", "ref", "base"))
    assert _rel(base, ref) > 1e-3  # the routing does something
    # equal up to float kernels, except on the few samples where a quantizer flips (conftest.assert_same_function)
    assert_same_function(got, ref, base)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.5
    # each split layer: a high and a low MatMul; the low one quantized at 4 bits
    low_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and
             any(p.key == "vitq.module" and p.value.endswith("@low") for p in n.metadata_props)]
    assert low_q and all(any(p.key == "vitq.bits" and p.value == "4" for p in n.metadata_props) for n in low_q)
    if which == "vit":  # searched scales: the 4-bit branch takes shifted grids (post-softmax attn at least);
        # on the ORT target their Sub is folded into the uint8 zero point (fold_shift_zero_point)
        zps = {i.name: i for i in proto.graph.initializer}
        shifted = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and
                   int(onnx.numpy_helper.to_array(zps[n.input[2]])) != 128]
        fold = next(p for p in rep["passes"] if p["name"] == "fold_shift_zero_point")
        assert fold["stats"]["folded"] == len(shifted) > 0
        assert any("@low" in n.name for n in shifted) and any(".attn.attn" in n.name for n in shifted), \
            [n.name for n in shifted]


def test_ratio_zero_graph_equals_uniform(vit_setup):
    res, rec, path, x = vit_setup
    spec = rec.mixa.with_ratios({})
    spec = spec.with_ratios({b.block: 0.0 for b in spec.blocks})
    rec0 = attach(res.recipe, spec)
    p0, _ = build_deployable(path, rec0, "ort", validate=False)
    pb, _ = build_deployable(path, res.recipe, "ort", validate=False)
    assert [n.op_type for n in p0.graph.node] == [n.op_type for n in pb.graph.node]
    xb = x[:3].numpy()
    assert np.array_equal(ort_run(p0, {"input": xb})[0], ort_run(pb, {"input": xb})[0])


def test_pruning_is_rejected_in_graph(vit_setup):
    from vitq.passes.infra import GraphPassError

    res, rec, path, x = vit_setup
    spec = rec.mixa
    spec = spec.with_ratios({}, prune={spec.blocks[0].block: 0.25})
    with pytest.raises(GraphPassError, match="pruning"):
        build_deployable(path, attach(res.recipe, spec), "ort", validate=False)


def test_native_pair_float_high_branch(vit_setup):
    """high = fp32 (no quantizers), low = the base's 8-bit quantizers: the graph has float MatMuls for the high
    tokens and Q/DQ ones for the low tokens, and equals the simulation."""
    res, rec, path, x = vit_setup
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, group=(2, 2), high_bits=32, low_bits=8,
                           routed=("linear",), ratios=0.5)
    assert all(l.high is None and l.low is res.recipe.layer(l.module) for l in spec.layers)
    r2 = attach(res.recipe, spec)
    proto, _ = build_deployable(path, r2, "ort", validate=False)
    xb = x[:3].numpy()
    got = ort_run(proto, {"input": xb})[0]
    ref = MixaSim(res.sim, spec)(torch.from_numpy(xb)).numpy()
    base = res.sim(torch.from_numpy(xb)).numpy()
    assert _rel(got, ref) < 0.05 * _rel(base, ref), (_rel(got, ref), _rel(base, ref))
