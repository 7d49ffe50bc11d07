"""lower_trt / expand_plugins over tiny hand-built Q/DQ graphs: structure after lowering, and numerics on ORT."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from vitq.errors import InputError
from vitq.passes.lower_trt import lower_trt
from vitq.plugins.expand import expand_plugins
from vitq.plugins.specs import DOMAIN, NAMESPACE, VERSION, quant_linear_a4_ref

K, N = 16, 12
ACT_SCALE = np.float32(0.173)


def _q_type(bits):
    return (T.INT4, ml_dtypes.int4) if bits == 4 else (T.INT8, np.int8)


def make_linear(form="matmul_bias", act_bits=4, w_bits=4, x_shape=(2, 5, K), seed=0, zp_value=0,
                dq_scale_factor=1.0, w_scale_axis_ok=True, n_consumers=1):
    """X -> Q(act) -> DQ -> {MatMul|Gemm}(., DQ(W)) [-> Add(b)] -> Y (n_consumers copies sharing the Q/DQ)."""
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 7) if w_bits == 4 else (-128, 127)
    a_type, a_np = _q_type(act_bits)
    w_type, w_np = _q_type(w_bits)
    inits = [nh.from_array(np.array(ACT_SCALE), "s_a"),
             nh.from_array(np.array(zp_value, a_np), "zp_a"),
             nh.from_array(np.array(ACT_SCALE * np.float32(dq_scale_factor)), "s_a_dq")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s_a", "zp_a"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "s_a_dq", "zp_a"], ["xd"])]
    outputs, params = [], []
    for c in range(n_consumers):
        w_nk = rng.integers(lo, hi + 1, (N, K)).astype(np.int8)
        w_scale = (rng.random(N) * 0.05 + 0.01).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        gemm = form.startswith("gemm")
        trans_b = form in ("gemm_t", "gemm_t_bias")
        w_stored = w_nk if trans_b else w_nk.T
        axis = (0 if trans_b else 1) if w_scale_axis_ok else (1 if trans_b else 0)
        if not w_scale_axis_ok:  # wrong axis: make the scale length match the wrong axis so the graph is valid
            w_scale = (rng.random(K) * 0.05 + 0.01).astype(np.float32)
        inits += [nh.from_array(np.ascontiguousarray(w_stored).astype(w_np), f"w{c}"),
                  nh.from_array(w_scale, f"ws{c}"), nh.from_array(np.zeros(w_scale.size, w_np), f"wzp{c}"),
                  nh.from_array(bias, f"b{c}")]
        nodes.append(h.make_node("DequantizeLinear", [f"w{c}", f"ws{c}", f"wzp{c}"], [f"wd{c}"], axis=axis))
        y = f"y{c}"
        if form == "matmul":
            nodes.append(h.make_node("MatMul", ["xd", f"wd{c}"], [y]))
        elif form == "matmul_bias":
            nodes += [h.make_node("MatMul", ["xd", f"wd{c}"], [f"mm{c}"]),
                      h.make_node("Add", [f"b{c}", f"mm{c}"], [y])]  # bias first: the matcher takes either order
        elif gemm:
            ins = ["xd", f"wd{c}"] + ([f"b{c}"] if form.endswith("bias") else [])
            nodes.append(h.make_node("Gemm", ins, [y], transB=1 if trans_b else 0))
        outputs.append(h.make_tensor_value_info(y, T.FLOAT, list(x_shape[:-1]) + [N]))
        params.append((w_nk, w_scale, bias if form.endswith("bias") else None))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(x_shape))], outputs,
                     [i for i in inits if any(i.name in n.input for n in nodes)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return m, params


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def rand_x(shape, seed=1):
    # spread over more than the int4 range so clipping is exercised, plus exact half-way points
    x = (np.random.default_rng(seed).standard_normal(shape) * 1.2).astype(np.float32)
    x.reshape(-1)[:8] = (np.array([0.5, 1.5, 2.5, -0.5, -1.5, 7.5, -8.5, 20]) * ACT_SCALE).astype(np.float32)
    return x


def plugin_nodes(m):
    return [n for n in m.graph.node if n.op_type == "QuantLinearA4"]


def check_roundtrip(m, params, x_shape=(2, 5, K), expect_bias=True):
    low, count = lower_trt(m)
    assert count == len(params)
    nodes = plugin_nodes(low)
    assert len(nodes) == len(params)
    # only the plugin nodes remain: Q/DQ/MatMul/Add/Gemm are gone
    assert {n.op_type for n in low.graph.node} == {"QuantLinearA4"}
    for node, (w_nk, w_scale, bias) in zip(nodes, params):
        a = {at.name: h.get_attribute_value(at) for at in node.attribute}
        assert node.domain == DOMAIN
        assert a["plugin_namespace"] == NAMESPACE.encode() and a["plugin_version"] == VERSION.encode()
        assert a["act_bits"] == 4 and np.float32(a["act_scale"]) == ACT_SCALE
        inits = {t.name: nh.to_array(t) for t in low.graph.initializer}
        w = inits[node.input[1]]
        assert w.dtype == np.int8 and w.shape == (N, K)
        np.testing.assert_array_equal(w, w_nk)
        np.testing.assert_array_equal(inits[node.input[2]], w_scale)
        assert (len(node.input) == 4) == (bias is not None)
        if bias is not None:
            np.testing.assert_array_equal(inits[node.input[3]], bias)
    assert any(o.domain == DOMAIN for o in low.opset_import)
    exp, n_exp = expand_plugins(low)
    assert n_exp == len(params)
    assert not plugin_nodes(exp)
    onnx.checker.check_model(exp, full_check=True)
    x = rand_x(x_shape)
    ys0, ys1 = run_ort(m, x), run_ort(exp, x)
    for (w_nk, w_scale, bias), y0, y1 in zip(params, ys0, ys1):
        np.testing.assert_allclose(y1, y0, atol=2e-6, rtol=0)
        ref = quant_linear_a4_ref(x, w_nk, w_scale, bias, act_scale=float(ACT_SCALE), weight_bits=4)
        np.testing.assert_allclose(y1, ref, atol=2e-6, rtol=0)
    return low, exp


def test_matmul_no_bias():
    m, p = make_linear("matmul")
    check_roundtrip(m, p)


def test_matmul_add_bias():
    m, p = make_linear("matmul_bias")
    check_roundtrip(m, p)


def test_gemm_transb_bias():
    m, p = make_linear("gemm_t_bias", x_shape=(7, K))
    check_roundtrip(m, p, x_shape=(7, K))


def test_gemm_no_transb():
    m, p = make_linear("gemm_n", x_shape=(7, K))
    check_roundtrip(m, p, x_shape=(7, K))


def test_w8a4_lowers_with_weight_bits_8():
    m, p = make_linear("matmul_bias", w_bits=8)
    low, count = lower_trt(m)
    assert count == 1
    a = {at.name: h.get_attribute_value(at) for at in plugin_nodes(low)[0].attribute}
    assert a["weight_bits"] == 8
    exp, _ = expand_plugins(low)
    x = rand_x((2, 5, K))
    np.testing.assert_allclose(run_ort(exp, x)[0], run_ort(m, x)[0], atol=5e-6, rtol=0)
    w_nk, ws, b = p[0]
    np.testing.assert_allclose(run_ort(exp, x)[0],
                               quant_linear_a4_ref(x, w_nk, ws, b, act_scale=float(ACT_SCALE), weight_bits=8),
                               atol=5e-6, rtol=0)


def test_shared_quantized_input_two_linears():
    m, p = make_linear("matmul_bias", n_consumers=2)
    low, _ = check_roundtrip(m, p)
    assert all(n.input[0] == "x" for n in plugin_nodes(low))


def test_int8_activation_not_lowered():
    m, _ = make_linear("matmul_bias", act_bits=8, w_bits=4)
    low, count = lower_trt(m)
    assert count == 0
    assert [n.op_type for n in low.graph.node] == [n.op_type for n in m.graph.node]
    m2, _ = make_linear("gemm_t_bias", act_bits=8, w_bits=8, x_shape=(3, K))
    assert lower_trt(m2)[1] == 0


def test_nonzero_act_zero_point_not_lowered():
    m, _ = make_linear("matmul_bias", zp_value=1)
    assert lower_trt(m)[1] == 0


def test_mismatched_q_dq_scale_not_lowered():
    m, _ = make_linear("matmul_bias", dq_scale_factor=2.0)
    assert lower_trt(m)[1] == 0


def test_weight_scale_on_wrong_axis_not_lowered():
    m, _ = make_linear("matmul", w_scale_axis_ok=False)
    assert lower_trt(m)[1] == 0


def test_matmul_output_used_twice_keeps_add_separate():
    # MatMul output also a graph output: the Add cannot be fused, but the MatMul still lowers (bias stays an Add)
    m, p = make_linear("matmul_bias")
    m.graph.output.append(h.make_tensor_value_info("mm0", T.FLOAT, [2, 5, N]))
    low, count = lower_trt(m)
    assert count == 1
    assert sorted(n.op_type for n in low.graph.node) == ["Add", "QuantLinearA4"]
    assert len(plugin_nodes(low)[0].input) == 3
    exp, _ = expand_plugins(low)
    x = rand_x((2, 5, K))
    for a, b in zip(run_ort(exp, x), run_ort(m, x)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_expand_emulate_is_bit_identical_to_native():
    m, _ = make_linear("matmul_bias")
    low, _ = lower_trt(m)
    nat, _ = expand_plugins(low, int4="native")
    emu, _ = expand_plugins(low, int4="emulate")
    assert any(n.op_type == "Clip" for n in emu.graph.node)
    assert not any(t.data_type == T.INT4 for t in emu.graph.initializer)
    assert any(t.data_type == T.INT4 for t in nat.graph.initializer)
    x = rand_x((2, 5, K), seed=5) * 3
    np.testing.assert_array_equal(run_ort(emu, x)[0], run_ort(nat, x)[0])


def test_input_model_not_modified_and_idempotent():
    m, _ = make_linear("matmul_bias")
    before = m.SerializeToString()
    low, _ = lower_trt(m)
    assert m.SerializeToString() == before
    assert lower_trt(low)[1] == 0
    assert expand_plugins(m)[1] == 0


def test_expand_native_needs_opset_21():
    m, _ = make_linear("matmul_bias")
    low, _ = lower_trt(m)
    for op in low.opset_import:
        if op.domain == "":
            op.version = 20
    with pytest.raises(InputError, match="opset"):
        expand_plugins(low)
    assert expand_plugins(low, int4="emulate")[1] == 1
