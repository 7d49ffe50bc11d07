"""Dynamic per-token low-branch activations (``--mixa-low-quant dynamic``): the arithmetic, the recipe schema, the
ONNX builder (exact on ONNX Runtime), the MixA-Q graph against its simulation (ViT tokens, Swin windows, dynamic
batch) and the TensorRT check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vitq.recipe.schema import LayerSpec, QuantSpec, RecipeError

timm = pytest.importorskip("timm")

from vitq.mixa.calib import attach, build_mixa_spec  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.passes.infra import ort_run  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.quant.functional import fake_quant_dynamic  # noqa: E402

from test_mixa_graph import _rel  # noqa: E402


def _np_dynamic(x, bits, axis):
    n = np.float32((1 << bits) - 1)
    lo = np.minimum(x.min(axis, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis, keepdims=True), np.float32(0))
    s = np.maximum((hi - lo) / n, np.float32(1e-8))
    z = np.round(-lo / s)
    return (np.clip(np.round(x / s) + z, 0, n) - z) * s


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_dynamic_is_per_token_asymmetric(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g) * torch.rand(3, 7, 1, generator=g) * 5 + 0.3
    x[0, 0] = 0.0  # an all-zero token stays zero
    x[0, 1] = torch.linspace(0.1, 2.0, 16)  # all positive: the grid still contains 0
    y = fake_quant_dynamic(x, bits)
    assert np.array_equal(y.numpy(), _np_dynamic(x.numpy(), bits, -1))
    assert torch.equal(y[0, 0], torch.zeros(16))
    for t in range(7):  # at most 2^bits levels per token, max error half a step
        v = y[1, t]
        s = (max(float(x[1, t].max()), 0) - min(float(x[1, t].min()), 0)) / ((1 << bits) - 1)
        assert len(torch.unique(v)) <= 1 << bits
        assert float((v - x[1, t]).abs().max()) <= s / 2 + 1e-6
    # each token's grid is its own: scaling one token does not change the others
    x2 = x.clone()
    x2[2, 3] *= 100
    y2 = fake_quant_dynamic(x2, bits)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[2, 3] = False
    assert torch.equal(y2[keep], y[keep])
    # the feature axis is a parameter (the graph quantizes k^T over axis -2)
    assert torch.equal(fake_quant_dynamic(x.transpose(-2, -1), bits, axis=-2), y.transpose(-2, -1))


def _chain_model(shape, build):
    """A checked one-input model ``x`` (float, ``shape``) -> ``build(g, namer, x)`` -> ``(nodes, y)``; returns
    ``(model, graph, x)`` (the graph to build more chains on, e.g. for error checks)."""
    import onnx_ir as ir

    from vitq.passes.irutil import Namer

    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    nodes, y = build(g, Namer(g), x)
    g.extend(nodes)
    g.outputs.append(y)
    y.dtype = ir.DataType.FLOAT
    model = ir.serde.serialize_model(ir.Model(g, ir_version=10))
    onnx.checker.check_model(model, full_check=True)
    return model, g, x


@pytest.mark.parametrize("bits,axis", [(4, -1), (8, -1), (4, -2)])
def test_onnx_dynamic_qdq_equals_torch(bits, axis):
    from vitq.passes.dynamic_qdq import dynamic_qdq_nodes

    shape = [None, 5, 12] if axis == -1 else [None, 12, 5]
    model, _, _ = _chain_model(shape, lambda g, nm, x: dynamic_qdq_nodes(g, nm, x, bits, axis, "t", {}))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 1 and "ReduceMax" in ops and "ReduceMin" in ops
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert {a.name: a.i for a in q.attribute} == {"axis": axis, "block_size": 12}
    xs = (np.random.default_rng(1).standard_normal((4, *shape[1:])) * 3).astype(np.float32)
    xs[0, 0] = 0
    got = ort_run(model, {"x": xs})[0]
    ref = fake_quant_dynamic(torch.from_numpy(xs), bits, axis).numpy()
    assert np.array_equal(got, ref)


def test_schema_dynamic_round_trip_and_errors():
    d = {"bits": 4, "dynamic": "token"}
    q = QuantSpec.from_dict(d, "x")
    assert q.dynamic == "token" and q.scale == [] and q.to_dict() == {"bits": 4, "dynamic": "token",
                                                                       "method": "dynamic"}
    assert QuantSpec.from_dict(q.to_dict(), "x") == q
    lay = LayerSpec.from_dict({"module": "m", "kind": "linear", "input": d,
                               "weight": {"bits": 4, "scale": [0.1, 0.2], "axis": 0}}, "layers[0]")
    assert lay.input.dynamic and lay.act_bits == 4
    bad = [({"bits": 4, "dynamic": "channel"}, "dynamic"), ({"bits": 6, "dynamic": "token"}, "4 or 8"),
           ({"bits": 4, "dynamic": "token", "scale": [0.1]}, "'scale'"),
           ({"bits": 4, "scale": [0.1], "method": "dynamic"}, "dynamic")]
    for spec, msg in bad:
        with pytest.raises(RecipeError, match=msg):
            QuantSpec.from_dict(spec, "layers[3].input")
    with pytest.raises(RecipeError, match="weights are quantized statically"):
        LayerSpec.from_dict({"module": "m", "kind": "linear", "weight": d}, "layers[0]")


def _dyn_setup(setup):
    res, rec, path, x = setup
    fam = res.sim.family
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, group=(2, 2) if fam == "vit" else None, low_bits=4,
                           routed=("linear", "attn"), ratios=0.5, low_quant="dynamic")
    return res, attach(res.recipe, spec), spec, path, x


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_dynamic_low_branch_graph_matches_simulation(which, vit_setup, swin_setup):
    res, rec, spec, path, x = _dyn_setup(vit_setup if which == "vit" else swin_setup)
    assert spec.low_quant == "dynamic"
    for l in spec.layers:  # low branch: every activation quantizer dynamic; high branch: the base's
        assert all(q.dynamic == "token" and q.bits == 4 for r, q in l.low.quantizers().items() if r != "weight")
        assert l.high is res.recipe.layer(l.module)
        assert l.low.weight == l.high.weight
    proto, rep = build_deployable(path, rec, "ort", sample_inputs=x[:2].numpy())
    dyn_q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and
             any(p.key == "vitq.dynamic" for p in n.metadata_props)]
    n_lin = sum(1 for l in spec.layers if l.low.kind == "linear" and spec.block_of(l.module).n_low)
    n_att = sum(4 for l in spec.layers if l.low.kind == "attn" and spec.block_of(l.module).n_low)
    assert len(dyn_q) == n_lin + n_att > 0
    assert all(any(p.key == "vitq.module" and p.value.endswith("@low") for p in n.metadata_props) for n in dyn_q)
    sim = MixaSim(res.sim, rec.mixa)
    static = MixaSim(res.sim, vit_setup[1].mixa if which == "vit" else swin_setup[1].mixa)
    for b in (1, 3):  # dynamic batch
        xb = x[:b].numpy()
        got = ort_run(proto, {"input": xb})[0]
        ref = sim(torch.from_numpy(xb)).numpy()
        other = static(torch.from_numpy(xb)).numpy()
        assert got.shape == (b, 10)
        assert _rel(other, ref) > 1e-3  # dynamic and static low branches differ
        assert _rel(got, ref) < 0.05 * _rel(other, ref), (_rel(got, ref), _rel(other, ref))
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_dynamic_low_branch_at_base_bits(vit_setup):
    """``--mixa-bits 8/8 --mixa-low-quant dynamic``: the low branch is dynamic uint8 although its bits equal the
    base's (asked for explicitly), and the graph still equals the simulation."""
    res, rec, path, x = vit_setup
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, group=(2, 2), high_bits=8, low_bits=8,
                           routed=("linear",), ratios=0.5, low_quant="dynamic")
    assert all(l.high is res.recipe.layer(l.module) and l.low.input.dynamic and l.low.input.bits == 8
               for l in spec.layers)
    proto, _ = build_deployable(path, attach(res.recipe, spec), "ort", validate=False)
    xb = x[:3].numpy()
    got = ort_run(proto, {"input": xb})[0]
    ref = MixaSim(res.sim, spec)(torch.from_numpy(xb)).numpy()
    base = res.sim(torch.from_numpy(xb)).numpy()
    assert _rel(base, ref) > 1e-4
    assert _rel(got, ref) < 0.05 * _rel(base, ref), (_rel(got, ref), _rel(base, ref))


def test_trt_check_reports_dynamic_activations(vit_setup):
    from vitq.passes.trt_check import check

    res, rec, spec, path, x = _dyn_setup(vit_setup)
    proto, _ = build_deployable(path, rec, "ort", validate=False)
    rep = check(proto)
    codes = [i.code for i in rep.issues]
    assert "DYNAMIC_ACTIVATION" in codes
    assert not any(i.code == "QDQ_PARAMS_NOT_CONST" for i in rep.issues)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_dynamic_low_branch_trt_target(which, vit_setup, swin_setup):
    """--target trt: each low-branch linear's dynamic uint4 chain becomes a QuantLinearA4 plugin node in its per-row
    mode, the attention operands' chains exact float arithmetic; both rewrites checked exact on ORT by the pass
    manager (sample inputs), the lint is clean of DYNAMIC_ACTIVATION, and the graph still computes the simulation."""
    from vitq.plugins.expand import has_plugins

    res, rec, spec, path, x = _dyn_setup(vit_setup if which == "vit" else swin_setup)
    proto, rep = build_deployable(path, rec, "trt", sample_inputs=x[:2].numpy())
    stats = {p["name"]: p["stats"] for p in rep["passes"]}
    n_lin = sum(1 for l in spec.layers if l.low.kind == "linear" and spec.block_of(l.module).n_low)
    n_att = sum(4 for l in spec.layers if l.low.kind == "attn" and spec.block_of(l.module).n_low)
    plugins = [n for n in proto.graph.node if n.op_type == "QuantLinearA4"]
    dyn = [n for n in plugins if any(a.name == "act_dynamic" and a.i == 1 for a in n.attribute)]
    assert has_plugins(proto) and len(dyn) == n_lin > 0
    assert stats["dynamic_qdq_float"]["dynamic_quantizers_as_float"] == n_att > 0
    assert not [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and any(p.key == "vitq.dynamic" for p in n.metadata_props)]
    codes = [i["code"] for i in rep["trt_check"]["errors"] + rep["trt_check"]["warnings"]]
    assert "DYNAMIC_ACTIVATION" not in codes and codes.count("DYNAMIC_ACT_FLOAT") == n_att
    sim = MixaSim(res.sim, rec.mixa)
    base = res.sim
    for b in (1, 3):
        xb = x[:b].numpy()
        got = ort_run(proto, {"input": xb})[0]  # plugin nodes expanded to standard ONNX
        ref = sim(torch.from_numpy(xb)).numpy()
        other = base(torch.from_numpy(xb)).numpy()
        assert _rel(got, ref) < 0.05 * _rel(other, ref), (_rel(got, ref), _rel(other, ref))
        assert (got.argmax(1) == ref.argmax(1)).all()


# ---- grouped dynamic quantization (--mixa-low-group): one grid per `group` features of a token ----

def test_fake_quant_dynamic_grouped_is_per_group():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 24, generator=g) * 2
    x[0, 0, 8:16] *= 50  # one loud group: the other groups of that token keep their fine grids
    y = fake_quant_dynamic(x, 4, group=8)
    for i in range(3):  # each group of 8 equals a per-token quantizer applied to that group alone
        sl = slice(8 * i, 8 * (i + 1))
        assert torch.equal(y[..., sl], fake_quant_dynamic(x[..., sl], 4))
    assert not torch.equal(y, fake_quant_dynamic(x, 4))
    err_g = float((y[0, 0, :8] - x[0, 0, :8]).abs().max())
    err_t = float((fake_quant_dynamic(x, 4)[0, 0, :8] - x[0, 0, :8]).abs().max())
    assert err_g < err_t / 10  # the quiet group no longer shares the loud group's step
    assert torch.equal(fake_quant_dynamic(x, 4, group=24), fake_quant_dynamic(x, 4))  # one group = per token
    with pytest.raises(ValueError, match="multiple of the group size"):
        fake_quant_dynamic(x, 4, group=7)


@pytest.mark.parametrize("bits,group", [(4, 4), (4, 6), (8, 4)])
def test_onnx_grouped_dynamic_qdq_equals_torch(bits, group):
    import onnx_ir as ir

    from vitq.passes.dynamic_qdq import dynamic_qdq_nodes
    from vitq.passes.infra import GraphPassError
    from vitq.passes.irutil import Namer

    model, g, x = _chain_model([None, 5, 12],
                               lambda g, nm, x: dynamic_qdq_nodes(g, nm, x, bits, -1, "t", {}, group=group))
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert {a.name: a.i for a in q.attribute} == {"axis": -1, "block_size": group}
    assert [n.op_type for n in model.graph.node].count("Reshape") == 1
    xs = (np.random.default_rng(3).standard_normal((4, 5, 12)) * 3).astype(np.float32)
    xs[0, 0] = 0
    xs[1, 2, :group] *= 40
    got = ort_run(model, {"x": xs})[0]
    ref = fake_quant_dynamic(torch.from_numpy(xs), bits, group=group).numpy()
    assert np.array_equal(got, ref)
    with pytest.raises(GraphPassError, match="multiple of the group size"):
        dynamic_qdq_nodes(g, Namer(g), x, bits, -1, "t2", {}, group=5)
    xk = ir.Value(name="xk", shape=ir.Shape([None, 12, 5]), type=ir.TensorType(ir.DataType.FLOAT))
    with pytest.raises(GraphPassError, match="feature axis last"):
        dynamic_qdq_nodes(g, Namer(g), xk, bits, -2, "t3", {}, group=4)


def test_schema_grouped_dynamic_round_trip_and_errors():
    q = QuantSpec.from_dict({"bits": 4, "dynamic": "token", "group": 32}, "x")
    assert q.group == 32 and q.to_dict() == {"bits": 4, "dynamic": "token", "method": "dynamic", "group": 32}
    assert QuantSpec.from_dict(q.to_dict(), "x") == q
    assert QuantSpec.from_dict({"bits": 4, "dynamic": "token"}, "x").group == 0
    for spec, msg in [({"bits": 4, "dynamic": "token", "group": 1}, "group size >= 2"),
                      ({"bits": 4, "dynamic": "token", "group": "32"}, "group"),
                      ({"bits": 4, "scale": [0.1], "group": 32}, "only weight quantizers")]:
        with pytest.raises(RecipeError, match=msg):
            QuantSpec.from_dict(spec, "layers[0].input")


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_grouped_dynamic_low_branch_graph_matches_simulation(which, vit_setup, swin_setup):
    """``--mixa-low-quant dynamic --mixa-low-group 16``: Linear inputs of the low branch per 16 features (attention
    operands per token); the ORT graph equals the simulation, which differs from the per-token one."""
    res, rec0, path, x = vit_setup if which == "vit" else swin_setup
    kw = dict(group=(2, 2) if which == "vit" else None, low_bits=4, routed=("linear", "attn"), ratios=0.5,
              low_quant="dynamic")
    gs = 16 if which == "vit" else 8  # the tiny Swin's first stage has 24 features
    if which == "swin":
        with pytest.raises(Exception, match="24 input features, not a multiple"):
            build_mixa_spec(res.model, res.sim, res.recipe, x, low_group=16, **kw)
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, low_group=gs, **kw)
    assert spec.low_group == gs and spec.info["low_group"] == gs
    for l in spec.layers:
        for r, q in l.low.quantizers().items():
            if r != "weight":
                assert q.dynamic == "token" and q.group == (gs if l.low.kind == "linear" else 0), (l.module, r)
    rec = attach(res.recipe, spec)
    assert rec.mixa.low_group == gs  # survives the recipe round trip
    proto, _ = build_deployable(path, rec, "ort", sample_inputs=x[:2].numpy())
    blocked = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"
               and any(a.name == "block_size" and a.i == gs for a in n.attribute)]
    assert len(blocked) == sum(1 for l in spec.layers if l.low.kind == "linear" and spec.block_of(l.module).n_low)
    sim = MixaSim(res.sim, spec)
    per_token = MixaSim(res.sim, build_mixa_spec(res.model, res.sim, res.recipe, x, **kw))
    for b in (1, 3):
        xb = x[:b].numpy()
        got = ort_run(proto, {"input": xb})[0]
        ref = sim(torch.from_numpy(xb)).numpy()
        other = per_token(torch.from_numpy(xb)).numpy()
        assert _rel(other, ref) > 1e-4
        assert _rel(got, ref) < 0.05 * _rel(other, ref), (_rel(got, ref), _rel(other, ref))
        assert (got.argmax(1) == ref.argmax(1)).all()
    with pytest.raises(Exception, match="dynamic low branch"):
        build_mixa_spec(res.model, res.sim, res.recipe, x, group=kw["group"], low_bits=4, routed=("linear",),
                        ratios=0.5, low_group=gs)


@pytest.fixture(scope="module")
def vit64_setup(tmp_path_factory):
    """A tiny ViT with 64 features (the plugin's groups are 32..256; the shared tiny ViT has 48)."""
    pytest.importorskip("timm")
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                              embed_dim=64, num_heads=2, num_classes=10).eval()
    from conftest import _mixa_setup

    return _mixa_setup(model, "vit", 32, (2, 2), tmp_path_factory.mktemp("mixa_vit64"), {})


def test_grouped_dynamic_low_branch_trt_target(vit64_setup):
    """--target trt with --mixa-low-group 32: each low-branch linear's grouped chain becomes one QuantLinearA4 node
    with act_group=32 (checked exact on ORT by the pass manager through its expansion), the attention operands
    float; the graph computes the grouped simulation, which differs from the per-token one."""
    res, _, path, x = vit64_setup
    kw = dict(group=(2, 2), low_bits=4, routed=("linear", "attn"), ratios=0.5, low_quant="dynamic")
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, low_group=32, **kw)
    rec = attach(res.recipe, spec)
    proto, rep = build_deployable(path, rec, "trt", sample_inputs=x[:2].numpy())
    n_lin = sum(1 for l in spec.layers if l.low.kind == "linear" and spec.block_of(l.module).n_low)
    grouped = [n for n in proto.graph.node if n.op_type == "QuantLinearA4"
               and {a.name: a.i for a in n.attribute if a.name in ("act_dynamic", "act_group")} ==
               {"act_dynamic": 1, "act_group": 32}]
    assert len(grouped) == n_lin > 0
    assert not [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and any(p.key == "vitq.dynamic" for p in n.metadata_props)]
    assert not rep["trt_check"]["errors"], rep["trt_check"]["errors"]
    ort_proto, _ = build_deployable(path, rec, "ort")
    sim = MixaSim(res.sim, spec)
    per_token = MixaSim(res.sim, build_mixa_spec(res.model, res.sim, res.recipe, x, **kw))
    for b in (1, 3):
        xb = x[:b].numpy()
        got = ort_run(proto, {"input": xb})[0]  # plugin nodes expanded to standard ONNX
        assert _rel(got, ort_run(ort_proto, {"input": xb})[0]) < 1e-5  # the lowering is exact
        ref = sim(torch.from_numpy(xb)).numpy()
        other = per_token(torch.from_numpy(xb)).numpy()
        # graph vs simulation: float summation order may flip a rounding (one image of three here: 0.3%)
        assert _rel(got, ref) < 0.25 * _rel(other, ref), (_rel(got, ref), _rel(other, ref))
        assert (got.argmax(1) == ref.argmax(1)).all()


# ---- log-sqrt(2) post-softmax grid (--mixa-low-softmax log) ----

def test_fake_quant_log_sqrt2_grid():
    from vitq.quant.functional import fake_quant_log_sqrt2
    from vitq.recipe.schema import log_sqrt2_grid

    th, lv = log_sqrt2_grid(4)
    assert th.dtype == lv.dtype == np.float32 and len(th) == 15 and len(lv) == 16 and lv[0] == 1 and lv[-1] == 0
    assert np.all(np.diff(lv[:-1]) < 0) and np.all((th < lv[:-1]) & (th > lv[1:]))  # thresholds between levels
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(3, 4, 50, generator=g) * 3, -1)
    y = fake_quant_log_sqrt2(p, 4)
    m = p.amax(-1, keepdim=True)
    assert torch.equal(y.amax(-1, keepdim=True), m)  # the row max is exact
    codes = torch.round(-2 * torch.log2(p / m).double())  # round to nearest in the log domain
    ref = torch.where(codes > 14, torch.zeros_like(p), m * torch.exp2(-codes / 2).float())
    near_tie = ((-2 * torch.log2(p / m).double()) % 1 - 0.5).abs() < 1e-5
    assert torch.allclose(y[~near_tie], ref[~near_tie], rtol=1e-6, atol=0)
    assert ((y == 0) == (codes > 14) | near_tie & (codes == 15)).all()
    # relative error of the nonzero levels: at most 2^(1/4) - 1 (half a step in the log domain)
    nz = y > 0
    assert float(((y[nz] - p[nz]).abs() / p[nz]).max()) <= 2 ** 0.25 - 1 + 1e-6
    # far better than a uniform 4-bit grid per row on small probabilities (uniform: 0 or m / 15 there)
    yu = fake_quant_dynamic(p, 4)
    small = (p >= m / 128) & (p < m / 30)
    assert float((y - p)[small].abs().sum()) < 0.2 * float((yu - p)[small].abs().sum())
    assert torch.equal(fake_quant_log_sqrt2(torch.zeros(2, 5), 4), torch.zeros(2, 5))  # all-zero row: zeros


@pytest.mark.parametrize("bits", [4, 8])
def test_onnx_log_sqrt2_equals_torch(bits):
    from vitq.passes.dynamic_qdq import log_sqrt2_nodes
    from vitq.passes.infra import GraphPassError
    from vitq.passes.irutil import Namer
    from vitq.quant.functional import fake_quant_log_sqrt2

    model, g, x = _chain_model([None, 3, 7, 40], lambda g, nm, x: log_sqrt2_nodes(g, nm, x, bits, "t", {}))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" not in ops and {"ReduceMax", "Less", "Gather"} <= set(ops)
    assert all(p.key == "vitq.dynamic" and p.value == "log_sqrt2" for n in model.graph.node
               for p in n.metadata_props)
    rng = np.random.default_rng(5)
    xs = torch.softmax(torch.from_numpy(rng.standard_normal((2, 3, 7, 40)).astype(np.float32) * 4), -1).numpy()
    xs[0, 0, 0] = 0  # an all-zero row
    th, _ = __import__("vitq.recipe.schema", fromlist=["x"]).log_sqrt2_grid(bits)
    xs[1, 0, 0, :3] = xs[1, 0, 0].max() * th[:3]  # exactly on thresholds
    got = ort_run(model, {"x": xs})[0]
    ref = fake_quant_log_sqrt2(torch.from_numpy(xs), bits).numpy()
    assert np.array_equal(got, ref)
    with pytest.raises(GraphPassError, match="4 or 8 bits"):
        log_sqrt2_nodes(g, Namer(g), x, 6, "t2", {})


def test_schema_log_sqrt2_round_trip_and_errors():
    q = QuantSpec.from_dict({"bits": 4, "dynamic": "log_sqrt2"}, "x")
    assert q.dynamic == "log_sqrt2" and q.to_dict() == {"bits": 4, "dynamic": "log_sqrt2", "method": "dynamic"}
    assert QuantSpec.from_dict(q.to_dict(), "x") == q
    lay = LayerSpec.from_dict({"module": "a", "kind": "attn", "attn": q.to_dict(),
                               "q": {"bits": 4, "dynamic": "token"}}, "layers[0]")
    assert lay.attn.dynamic == "log_sqrt2"
    with pytest.raises(RecipeError, match="per row"):
        QuantSpec.from_dict({"bits": 4, "dynamic": "log_sqrt2", "group": 8}, "x")
    with pytest.raises(RecipeError, match=r"layers\[0\]\.k: the log_sqrt2 grid is for .* 'attn' operand only"):
        LayerSpec.from_dict({"module": "a", "kind": "attn", "k": q.to_dict()}, "layers[0]")
    with pytest.raises(RecipeError, match=r"layers\[0\]\.input: the log_sqrt2"):
        LayerSpec.from_dict({"module": "m", "kind": "linear", "input": q.to_dict()}, "layers[0]")


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_log_softmax_low_branch_graph_matches_simulation(which, vit_setup, swin_setup):
    """``--mixa-low-softmax log``: the low branch's post-softmax operand on the log-sqrt(2) grid (the other
    operands per token); the ORT graph (ort and trt targets) equals the simulation, which differs from the uniform
    grid's."""
    res, rec0, path, x = vit_setup if which == "vit" else swin_setup
    kw = dict(group=(2, 2) if which == "vit" else None, low_bits=4, routed=("linear", "attn"), ratios=0.5,
              low_quant="dynamic")
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, low_softmax="log", **kw)
    assert spec.low_softmax == "log" and spec.info["low_softmax"] == "log"
    for l in spec.layers:
        if l.low.kind == "attn":
            assert l.low.attn.dynamic == "log_sqrt2" and l.low.q.dynamic == l.low.v.dynamic == "token"
            assert l.high.attn.dynamic is None
    rec = attach(res.recipe, spec)
    assert rec.mixa.low_softmax == "log"
    n_att = sum(1 for l in spec.layers if l.low.kind == "attn" and spec.block_of(l.module).n_low)
    sim = MixaSim(res.sim, spec)
    uniform = MixaSim(res.sim, build_mixa_spec(res.model, res.sim, res.recipe, x, **kw))
    for target in ("ort", "trt"):
        proto, rep = build_deployable(path, rec, target, sample_inputs=x[:2].numpy())
        less = [n for n in proto.graph.node if n.op_type == "Less"
                and any(p.key == "vitq.dynamic" and p.value == "log_sqrt2" for p in n.metadata_props)]
        assert len(less) == n_att > 0
        if target == "trt":
            assert not rep["trt_check"]["errors"], rep["trt_check"]["errors"]
            assert [i["code"] for i in rep["trt_check"]["warnings"]].count("LOG_ACT_FLOAT") == n_att
        for b in (1, 3):
            xb = x[:b].numpy()
            got = ort_run(proto, {"input": xb})[0]
            ref = sim(torch.from_numpy(xb)).numpy()
            other = uniform(torch.from_numpy(xb)).numpy()
            assert _rel(other, ref) > 1e-4
            assert _rel(got, ref) < 0.05 * _rel(other, ref), (target, _rel(got, ref), _rel(other, ref))
            assert (got.argmax(1) == ref.argmax(1)).all()
    with pytest.raises(Exception, match="softmax grid needs the dynamic low branch"):
        build_mixa_spec(res.model, res.sim, res.recipe, x, group=kw["group"], low_bits=4,
                        routed=("linear", "attn"), ratios=0.5, low_softmax="log")
