"""The numpy references in vitq.plugins.specs against standard ONNX on onnxruntime, and their own invariants."""

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
from vitq.plugins.specs import SPECS, quant_linear_a4_ref, quantize_act_ref


def _run(nodes, inputs, outputs, inits, feeds):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_spec_registry():
    q = SPECS["QuantLinearA4"]
    assert (q.namespace, q.version, q.shipped) == ("vitq", "1", True)
    assert [a.name for a in q.attrs] == ["act_scale", "act_bits", "weight_bits", "act_dynamic", "act_group"]
    assert q.resolve_attrs({"act_scale": 0.5}) == {"act_scale": 0.5, "act_bits": 4, "weight_bits": 4,
                                                   "act_dynamic": 0, "act_group": 0}
    assert q.resolve_attrs({"act_dynamic": 1})["act_scale"] == 0.0  # the dynamic mode has no static scale
    for bad in ({}, {"act_scale": -1.0}, {"act_dynamic": 2}, {"act_scale": 0.5, "act_bits": 8}):
        with pytest.raises(InputError):
            q.resolve_attrs(bad)
    assert list(SPECS) == ["QuantLinearA4"]  # every spec is one the lowering emits


@pytest.mark.parametrize("scale", [0.1, 0.0371, 0.003])
def test_quantize_matches_onnx_int4(scale):
    s = np.float32(scale)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * s * 6).astype(np.float32)
    x[:64] = ((np.arange(64) - 32) / 2).astype(np.float32) * s  # exact half-way points
    # onnxruntime cannot hand int4 tensors to numpy: read q back through DequantizeLinear with scale 1
    q = _run([h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
              h.make_node("DequantizeLinear", ["q", "one", "zp"], ["qf"])],
             [h.make_tensor_value_info("x", T.FLOAT, [x.size])], [h.make_tensor_value_info("qf", T.FLOAT, [x.size])],
             [nh.from_array(np.array(s), "s"), nh.from_array(np.array(0, ml_dtypes.int4), "zp"),
              nh.from_array(np.array(1, np.float32), "one")], {"x": x})[0]
    np.testing.assert_array_equal(quantize_act_ref(x, float(s)), q.astype(np.int32))
    assert quantize_act_ref(np.float32([2.5, 3.5, -2.5, 100, -100]) * s, float(s)).tolist() == [2, 4, -2, 7, -8]


@pytest.mark.parametrize("weight_bits", [4, 8])
def test_quant_linear_ref_matches_onnx_qdq_matmul(weight_bits):
    rng = np.random.default_rng(weight_bits)
    k, n, s_a = 64, 24, np.float32(0.21)
    lo, hi = (-8, 7) if weight_bits == 4 else (-128, 127)
    w = rng.integers(lo, hi + 1, (n, k)).astype(np.int8)
    ws = (rng.random(n) * 0.1 + 0.01).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((3, 7, k)) * 1.5).astype(np.float32)
    wt = ml_dtypes.int4 if weight_bits == 4 else np.int8
    y = _run([h.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
              h.make_node("DequantizeLinear", ["q", "s", "zp"], ["xd"]),
              h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
              h.make_node("MatMul", ["xd", "wd"], ["mm"]), h.make_node("Add", ["mm", "b"], ["y"])],
             [h.make_tensor_value_info("x", T.FLOAT, list(x.shape))],
             [h.make_tensor_value_info("y", T.FLOAT, [3, 7, n])],
             [nh.from_array(np.array(s_a), "s"), nh.from_array(np.array(0, ml_dtypes.int4), "zp"),
              nh.from_array(np.ascontiguousarray(w.T).astype(wt), "w"), nh.from_array(ws, "ws"),
              nh.from_array(b, "b")], {"x": x})[0]
    ref = quant_linear_a4_ref(x, w, ws, b, act_scale=float(s_a), weight_bits=weight_bits)
    assert ref.shape == (3, 7, n) and ref.dtype == np.float32
    # same real number; float32 results differ only by product rounding / summation order
    np.testing.assert_allclose(ref, y, atol=5e-6 * (1 if weight_bits == 4 else 16), rtol=0)


def test_quant_linear_ref_rejects_out_of_range_weights():
    with pytest.raises(InputError, match="int4"):
        quant_linear_a4_ref(np.zeros((1, 8), np.float32), np.full((2, 8), 9, np.int8), np.ones(2, np.float32),
                            act_scale=1.0)
    with pytest.raises(InputError, match="last dim"):
        quant_linear_a4_ref(np.zeros((1, 9), np.float32), np.zeros((2, 8), np.int8), np.ones(2, np.float32),
                            act_scale=1.0)
