"""QuantLinearA4's dynamic per-row mode (MixA-Q's dynamic low branch on TensorRT) and ``dynamic_qdq_float``:
the chain of :func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes` feeding a linear layer lowers to one plugin node and
expands back to the same function; the rest becomes exact float arithmetic. Numerics on ONNX Runtime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from vitq.errors import InputError
from vitq.passes.dynamic_qdq import META_DYNAMIC, dynamic_qdq_nodes, float_dynamic_qdq
from vitq.passes.irutil import Namer
from vitq.passes.lower_trt import lower_trt
from vitq.plugins.expand import dynamic_qdq_protos, expand_plugins
from vitq.plugins.specs import (DYN_EPS, dynamic_row_params_ref, quant_linear_a4_ref, quantize_act_dynamic_ref)
from vitq.quant.functional import fake_quant_dynamic
from vitq.recipe.schema import DYN_EPS as SCHEMA_EPS

from vitq.runtime.ort_backend import QDQ_MATMULNBITS_ACCURACY, OrtBackend


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """ORT at full optimization, with MatMulNBits (the int4-weight DQ -> MatMul fusion) computing in float, as
    vitq.runtime runs it: its default (accuracy level 4) re-quantizes the activations to int8."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry(QDQ_MATMULNBITS_ACCURACY, "1")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})

K, N = 32, 12
X_SHAPE = (2, 5, K)


def rand_x(seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(X_SHAPE) * rng.random((*X_SHAPE[:-1], 1)) * 3).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token: scale eps, zero point 0
    x[0, 1] = np.abs(x[0, 1])  # a token with no negative value: lo = 0
    x[1, 2] = -np.abs(x[1, 2])  # and one with no positive value: hi = 0
    return x


def make_dynamic_linear(form="matmul_bias", bits=4, w_bits=4, seed=0, eps=None):
    """x -> dynamic per-token Q/DQ (the builder's own chain) -> MatMul|Gemm(., DQ(W)) [-> Add(b)] -> y."""
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 7) if w_bits == 4 else (-128, 127)
    w_nk = rng.integers(lo, hi + 1, (N, K)).astype(np.int8)
    w_scale = (rng.random(N) * 0.05 + 0.01).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    used: set[str] = {"x", "x2", "y"}
    trans_b = form == "gemm_t_bias"  # Gemm wants 2-D: the chain runs on x reshaped to [B*T, K]
    nodes, inits, xd = dynamic_qdq_protos("x2" if trans_b else "x", K, bits, "act", used)
    if eps is not None:  # a chain that is not the builder's: other eps constant
        for t in inits:
            if t.name.endswith("dyn_eps"):
                t.CopyFrom(nh.from_array(np.array(eps, np.float32), t.name))
    w_np = ml_dtypes.int4 if w_bits == 4 else np.int8
    inits = list(inits) + [nh.from_array(np.ascontiguousarray(w_nk if trans_b else w_nk.T).astype(w_np), "w"),
                           nh.from_array(w_scale, "ws"), nh.from_array(np.zeros(N, w_np), "wzp")]
    if form != "matmul":
        inits.append(nh.from_array(bias, "b"))
    nodes = list(nodes) + [h.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=0 if trans_b else 1)]
    if form == "matmul":
        nodes.append(h.make_node("MatMul", [xd, "wd"], ["y"]))
    elif form == "matmul_bias":
        nodes += [h.make_node("MatMul", [xd, "wd"], ["mm"]), h.make_node("Add", ["mm", "b"], ["y"])]
    else:
        nodes = [h.make_node("Reshape", ["x", "shp"], ["x2"])] + nodes
        nodes += [h.make_node("Gemm", [xd, "wd", "b"], ["y2"], transB=1),
                  h.make_node("Reshape", ["y2", "shp_out"], ["y"])]
        inits += [nh.from_array(np.array([-1, K], np.int64), "shp"),
                  nh.from_array(np.array([*X_SHAPE[:-1], N], np.int64), "shp_out")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(X_SHAPE))],
                     [h.make_tensor_value_info("y", T.FLOAT, [*X_SHAPE[:-1], N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m, (w_nk, w_scale, None if form == "matmul" else bias)


def plugin_attrs(m):
    nodes = [n for n in m.graph.node if n.op_type == "QuantLinearA4"]
    return [{a.name: h.get_attribute_value(a) for a in n.attribute} for n in nodes]


def test_eps_constants_agree():
    assert np.float32(DYN_EPS) == np.float32(SCHEMA_EPS)


def test_row_params_match_torch_fake_quant():
    x = rand_x()
    d, s, z = quantize_act_dynamic_ref(x)
    np.testing.assert_array_equal(d.astype(np.float32) * s, fake_quant_dynamic(torch.from_numpy(x), 4).numpy())
    assert d.min() >= -15 and d.max() <= 15 and z.min() >= 0 and z.max() <= 15
    s0, z0 = dynamic_row_params_ref(x[0, 0])
    assert s0.item() == np.float32(DYN_EPS) and z0.item() == 0.0
    with pytest.raises(InputError, match="4 bits"):
        dynamic_row_params_ref(x, 8)


def test_reference_dynamic_vs_ort_chain():
    m, (w_nk, w_scale, bias) = make_dynamic_linear()
    x = rand_x()
    y = run_ort(m, x)[0]
    ref = quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1)
    np.testing.assert_allclose(ref, y, atol=2e-5, rtol=0)  # same real number, other float rounding order
    with pytest.raises(InputError, match="act_scale"):
        quant_linear_a4_ref(x, w_nk, w_scale, bias)  # static without a scale


def test_runtime_backend_runs_int4_matmul_exactly(tmp_path):
    """vitq.runtime's ORT backend (default int4_matmul="exact") computes the graph's function; ORT's default
    MatMulNBits compute (int4_matmul="fast") re-quantizes the dynamic uint4 activations to int8 and does not."""
    m, (w_nk, w_scale, bias) = make_dynamic_linear()
    onnx.save(m, tmp_path / "m.onnx")
    x = rand_x()
    ref = quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1)
    got = {mode: OrtBackend(tmp_path / "m.onnx", int4_matmul=mode).run({"x": x})["y"] for mode in ("exact", "fast")}
    np.testing.assert_allclose(got["exact"], ref, atol=2e-5, rtol=0)
    assert np.abs(got["fast"] - ref).max() > 1e-3  # the reason for the default (ORT 1.31)
    with pytest.raises(InputError, match="int4_matmul"):
        OrtBackend(tmp_path / "m.onnx", int4_matmul="int8")


@pytest.mark.parametrize("form", ["matmul", "matmul_bias", "gemm_t_bias"])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_dynamic_chain_lowers_and_expands(form, w_bits):
    m, (w_nk, w_scale, bias) = make_dynamic_linear(form, w_bits=w_bits)
    low, n = lower_trt(m)
    assert n == 1
    (a,) = plugin_attrs(low)
    assert a["act_dynamic"] == 1 and a["act_bits"] == 4 and a["weight_bits"] == w_bits and "act_scale" not in a
    ops = {x.op_type for x in low.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "ReduceMin", "ReduceMax", "Round", "Cast"}, ops
    assert len(low.graph.initializer) == (3 if bias is not None else 2) + (2 if form == "gemm_t_bias" else 0)
    x = rand_x()
    y0 = run_ort(m, x)[0]
    exp, k = expand_plugins(low)
    assert k == 1 and not plugin_attrs(exp)
    onnx.checker.check_model(exp, full_check=True)
    assert sum(nd.op_type == "QuantizeLinear" for nd in exp.graph.node) == 1
    y1 = run_ort(exp, x)[0]
    if form == "gemm_t_bias":  # Gemm -> MatMul + Add: other float summation
        np.testing.assert_allclose(y1, y0, atol=2e-5, rtol=0)
    else:
        np.testing.assert_array_equal(y1, y0)
    ref = quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1, weight_bits=w_bits)
    np.testing.assert_allclose(y1, ref, atol=2e-5 * (1 if w_bits == 4 else 16), rtol=0)
    emu, _ = expand_plugins(low, int4="emulate")  # no blocked / int4 Q/DQ: float arithmetic, bit-identical
    assert not any(nd.op_type in ("QuantizeLinear", "DequantizeLinear") for nd in emu.graph.node)
    np.testing.assert_array_equal(run_ort(emu, x)[0], y1)


@pytest.mark.parametrize("kw", [{"bits": 8}, {"eps": 1e-6}])
def test_other_dynamic_chains_not_lowered(kw):
    m, _ = make_dynamic_linear(**kw)
    assert lower_trt(m)[1] == 0


def _chains_model(specs):
    """x [2, 5, K] -> one dynamic Q/DQ per (bits, axis) in ``specs``, each a graph output."""
    x = ir.Value(name="x", shape=ir.Shape(list(X_SHAPE)), type=ir.TensorType(ir.DataType.FLOAT))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    nm = Namer(g)
    for i, (bits, axis) in enumerate(specs):
        nodes, y = dynamic_qdq_nodes(g, nm, x, bits, axis, f"q{i}", {"vitq.bits": str(bits)})
        g.extend(nodes)
        y.name = f"y{i}"
        g.outputs.append(y)
    return ir.Model(g, ir_version=10)


def test_float_dynamic_qdq_is_exact():
    specs = [(4, -1), (8, -1), (4, -2), (8, -2)]
    model = _chains_model(specs)
    ref_proto = ir.serde.serialize_model(model)
    n = float_dynamic_qdq(model.graph)
    assert n == len(specs)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [nd.op_type for nd in proto.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops and "Cast" not in ops
    lowered = [nd for nd in proto.graph.node if any(p.key == "vitq.lowered" for p in nd.metadata_props)]
    assert lowered and all(any(p.key == META_DYNAMIC for p in nd.metadata_props) for nd in lowered)
    for seed in range(3):
        x = rand_x(seed)
        for a, b in zip(run_ort(ref_proto, x), run_ort(proto, x)):
            np.testing.assert_array_equal(a, b)


# --- the grouped dynamic mode (act_group: one grid per G features of a row, --mixa-low-group) ---

KG, G = 96, 32  # three groups of 32 (96 is not a multiple of 64: the kernel's zero-padded tail group)
XG_SHAPE = (2, 5, KG)


def rand_xg(seed=1):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(XG_SHAPE) * rng.random((*XG_SHAPE[:-1], KG // G)).repeat(G, -1) * 3).astype(np.float32)
    x[0, 0] = 0.0
    x[0, 1, :G] = np.abs(x[0, 1, :G])  # a group with no negative value
    x[1, 2, G:2 * G] = 0.0  # an all-zero group: scale eps
    return x


def make_grouped_linear(form="matmul_bias", w_bits=4, group=G, seed=0):
    """x [2, 5, 96] -> the builder's grouped dynamic chain -> MatMul|Gemm(., DQ(W)) [-> Add(b)] -> y."""
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 7) if w_bits == 4 else (-128, 127)
    w_nk = rng.integers(lo, hi + 1, (N, KG)).astype(np.int8)
    w_scale = (rng.random(N) * 0.05 + 0.01).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    gemm = form == "gemm_t_bias"
    nodes, inits, xd = dynamic_qdq_protos("x2" if gemm else "x", KG, 4, "act", {"x", "x2", "y"}, group=group,
                                          rank=2 if gemm else 3)
    w_np = ml_dtypes.int4 if w_bits == 4 else np.int8
    inits = list(inits) + [nh.from_array(np.ascontiguousarray(w_nk if gemm else w_nk.T).astype(w_np), "w"),
                           nh.from_array(w_scale, "ws"), nh.from_array(np.zeros(N, w_np), "wzp"),
                           nh.from_array(bias, "b")]
    nodes = list(nodes) + [h.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], axis=0 if gemm else 1)]
    if form == "matmul_bias":
        nodes += [h.make_node("MatMul", [xd, "wd"], ["mm"]), h.make_node("Add", ["mm", "b"], ["y"])]
    else:
        nodes = [h.make_node("Reshape", ["x", "shp"], ["x2"])] + nodes
        nodes += [h.make_node("Gemm", [xd, "wd", "b"], ["y2"], transB=1),
                  h.make_node("Reshape", ["y2", "shp_out"], ["y"])]
        inits += [nh.from_array(np.array([-1, KG], np.int64), "shp"),
                  nh.from_array(np.array([*XG_SHAPE[:-1], N], np.int64), "shp_out")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(XG_SHAPE))],
                     [h.make_tensor_value_info("y", T.FLOAT, [*XG_SHAPE[:-1], N])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m, (w_nk, w_scale, bias)


def test_grouped_reference_matches_torch_and_ort():
    x = rand_xg()
    d, s, z = quantize_act_dynamic_ref(x, group=G)
    assert s.shape == (*XG_SHAPE[:-1], KG // G) and d.shape == XG_SHAPE
    deq = (d.reshape(*XG_SHAPE[:-1], KG // G, G).astype(np.float32) * s[..., None]).reshape(XG_SHAPE)
    np.testing.assert_array_equal(deq, fake_quant_dynamic(torch.from_numpy(x), 4, group=G).numpy())
    assert s[1, 2, 1] == np.float32(DYN_EPS) and z[0, 1, 0] == 0.0
    m, (w_nk, w_scale, bias) = make_grouped_linear()
    ref = quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1, act_group=G)
    np.testing.assert_allclose(ref, run_ort(m, x)[0], atol=3e-5, rtol=0)
    # one group spanning the row is the per-row mode, bit for bit
    np.testing.assert_array_equal(quant_linear_a4_ref(x, w_nk[:, :], w_scale, bias, act_dynamic=1, act_group=0),
                                  quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1))
    with pytest.raises(InputError, match="act_group"):
        quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1, act_group=48)
    with pytest.raises(InputError, match="act_group"):
        quant_linear_a4_ref(x, w_nk, w_scale, bias, act_scale=0.1, act_group=32)  # static mode
    with pytest.raises(InputError, match="multiple"):
        quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1, act_group=64)  # 96 % 64


@pytest.mark.parametrize("form", ["matmul_bias", "gemm_t_bias"])
@pytest.mark.parametrize("w_bits", [4, 8])
def test_grouped_chain_lowers_and_expands(form, w_bits):
    m, (w_nk, w_scale, bias) = make_grouped_linear(form, w_bits=w_bits)
    low, n = lower_trt(m)
    assert n == 1
    (a,) = plugin_attrs(low)
    assert a["act_dynamic"] == 1 and a["act_group"] == G and a["weight_bits"] == w_bits
    ops = {x.op_type for x in low.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "ReduceMin", "ReduceMax", "Round", "Cast"}, ops
    assert sum(nd.op_type == "Reshape" for nd in low.graph.node) == (2 if form == "gemm_t_bias" else 0)
    x = rand_xg()
    y0 = run_ort(m, x)[0]
    exp, k = expand_plugins(low)
    assert k == 1 and not plugin_attrs(exp)
    onnx.checker.check_model(exp, full_check=True)
    q = [nd for nd in exp.graph.node if nd.op_type == "QuantizeLinear"]
    assert len(q) == 1 and {at.name: h.get_attribute_value(at) for at in q[0].attribute}["block_size"] == G
    y1 = run_ort(exp, x)[0]
    if form == "gemm_t_bias":
        np.testing.assert_allclose(y1, y0, atol=3e-5 * (1 if w_bits == 4 else 16), rtol=0)
    else:
        np.testing.assert_array_equal(y1, y0)
    ref = quant_linear_a4_ref(x, w_nk, w_scale, bias, act_dynamic=1, act_group=G, weight_bits=w_bits)
    np.testing.assert_allclose(y1, ref, atol=3e-5 * (1 if w_bits == 4 else 16), rtol=0)
    emu, _ = expand_plugins(low, int4="emulate")  # grouped float form, bit-identical
    assert not any(nd.op_type in ("QuantizeLinear", "DequantizeLinear") for nd in emu.graph.node)
    np.testing.assert_array_equal(run_ort(emu, x)[0], y1)


def test_grouped_chain_with_unsupported_group_not_lowered():
    m, _ = make_grouped_linear(group=16)  # the kernel takes 32, 64, 128, 256
    assert lower_trt(m)[1] == 0


def test_expand_grouped_needs_rank():
    m, _ = make_grouped_linear()
    low, _ = lower_trt(m)
    del low.graph.input[0].type.tensor_type.shape.dim[:]  # x of unknown rank
    low.graph.input[0].type.tensor_type.ClearField("shape")
    with pytest.raises(InputError, match="rank"):
        expand_plugins(low)


def test_float_dynamic_qdq_grouped_is_exact():
    x = ir.Value(name="x", shape=ir.Shape(list(XG_SHAPE)), type=ir.TensorType(ir.DataType.FLOAT))
    g = ir.Graph([x], [], nodes=[], opset_imports={"": 21}, name="g")
    nm = Namer(g)
    for i, (bits, group) in enumerate([(4, 32), (8, 32), (4, 48)]):
        nodes, y = dynamic_qdq_nodes(g, nm, x, bits, -1, f"q{i}", {"vitq.bits": str(bits)}, group=group)
        g.extend(nodes)
        y.name = f"y{i}"
        g.outputs.append(y)
    model = ir.Model(g, ir_version=10)
    ref_proto = ir.serde.serialize_model(model)
    assert float_dynamic_qdq(model.graph) == 3
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [nd.op_type for nd in proto.graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    for seed in range(3):
        xv = rand_xg(seed)
        for a, b in zip(run_ort(ref_proto, xv), run_ort(proto, xv)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("group", [0, 32])
def test_onnx_only_chain_builder_equals_the_pass_builder(group):
    """The runtime's onnx-only chain (vitq.plugins.expand.dynamic_qdq_protos) is insert_qdq's chain
    (vitq.passes.dynamic_qdq.dynamic_qdq_nodes) node for node: names, op types, inputs, attributes, constants."""
    k = 64
    shape = [2, 5, k]
    g = ir.Graph([], [], nodes=[])
    nm = Namer(g)
    nm.used |= {"x"}
    x = ir.Value(name="x", shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, y = dynamic_qdq_nodes(g, nm, x, 4, -1, "act", {}, group=group)
    want = [ir.serde.serialize_node(n) for n in nodes]
    want_inits = {v.name: v.const_value.numpy() for v in g.initializers.values()}
    got, inits, out = dynamic_qdq_protos("x", k, 4, "act", {"x"}, group=group, rank=len(shape))
    assert out == y.name
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in got] == \
        [(n.name, n.op_type, list(n.input), list(n.output)) for n in want]
    for a, b in zip(got, want):
        assert {at.name: h.get_attribute_value(at) for at in a.attribute} == \
            {at.name: h.get_attribute_value(at) for at in b.attribute}
        assert {p.key: p.value for p in a.metadata_props} == {p.key: p.value for p in b.metadata_props}
    got_inits = {t.name: nh.to_array(t) for t in inits}
    assert got_inits.keys() == want_inits.keys()
    for name, arr in got_inits.items():
        assert arr.dtype == want_inits[name].dtype
        np.testing.assert_array_equal(arr, want_inits[name])
