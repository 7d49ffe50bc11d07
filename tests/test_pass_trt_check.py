"""trt_check: the lint reports what TensorRT rejects (errors) or runs slowly (warnings), with node and module."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nph

from test_pass_insert_qdq import _node, lin, recipe_for, tiny_block
from vitq.passes.infra import run_passes
from vitq.passes.insert_qdq import InsertQDQ
from vitq.passes.lower_ort_cpu import LowerOrtCpu
from vitq.passes.trt_check import check


def _q(layers, seed=0):
    return run_passes(tiny_block(np.random.default_rng(seed)), [InsertQDQ(recipe_for(layers))])


ATT8 = {"module": "attn", "kind": "attn", **{r: {"bits": 8, "scale": [0.1]} for r in ("q", "k", "attn", "v")}}


def test_clean_w8a8_graph_has_no_errors_or_warnings():
    rep = check(_q([lin("fc1", 8, 8, 16), lin("fc2", 8, 8, 8), lin("head", 8, 8, 4), ATT8]))
    assert rep.ok and not rep.issues, rep.format_text()
    assert rep.stats["gemms"] == rep.stats["gemms_int8"] == 5


def test_float_and_partial_gemms_are_warnings_with_module():
    rep = check(_q([lin("fc1", 8, 8, 16), lin("fc2", 8, None, 8)]))
    assert rep.ok
    fl = {i.module for i in rep.warnings if i.code == "FLOAT_GEMM"}
    assert fl == {"head", "attn"}
    part = [i for i in rep.warnings if i.code == "PARTIAL_QDQ"]
    assert [i.module for i in part] == ["fc2"] and part[0].node.startswith("fc2/")
    txt = rep.format_text()
    assert "WARNING FLOAT_GEMM (3)" in txt and "module head" in txt


def test_int4_activation_6bit_and_int4_weight():
    att = {**ATT8, "v": {"bits": 4, "scale": [0.2]}}
    rep = check(_q([lin("fc1", 4, 8, 16), lin("fc2", 6, 6, 8), lin("head", 8, 8, 4), att]))
    errs = {(i.code, i.module) for i in rep.errors}
    assert ("INT4_ACTIVATION", "attn") in errs
    assert ("SUB8_ACTIVATION", "fc2") in errs
    assert "lower_trt" in next(i.message for i in rep.errors if i.code == "INT4_ACTIVATION")
    warns = {(i.code, i.module) for i in rep.warnings}
    assert ("INT4_WEIGHT", "fc1") in warns and ("SUB8_WEIGHT", "fc2") in warns
    assert not rep.ok


def test_uint8_lowered_graph_and_asymmetric_zero_point_are_errors():
    m = run_passes(tiny_block(np.random.default_rng(1)), [InsertQDQ(recipe_for([lin("fc1", 8, 8, 16)])),
                                                          LowerOrtCpu()])
    codes = check(m).codes("error")
    assert "UINT8_QDQ" in codes and "ASYMMETRIC_ZERO_POINT" in codes


def test_axis_error_and_unsupported_op_and_decomposed_layernorm():
    rng = np.random.default_rng(2)
    W = rng.integers(-8, 8, (6, 3)).astype(np.int8)  # [in, out] for MatMul -> channels on axis 1
    nodes = [
        h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="qx"),
        h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dqx"),
        h.make_node("DequantizeLinear", ["W", "ws", "wzp"], ["Wd"], name="dqw", axis=0),  # wrong: axis 0
        _node("MatMul", ["xd", "Wd"], ["y"], "fc"),
        # decomposed LayerNorm on y
        h.make_node("ReduceMean", ["y", "ax"], ["mu"], name="rm1"), h.make_node("Sub", ["y", "mu"], ["c"], name="sub"),
        h.make_node("Mul", ["c", "c"], ["c2"], name="sq"), h.make_node("ReduceMean", ["c2", "ax"], ["var"], name="rm2"),
        h.make_node("Add", ["var", "eps"], ["ve"]), h.make_node("Sqrt", ["ve"], ["sd"]),
        h.make_node("Div", ["c", "sd"], ["ln"]),
        h.make_node("Einsum", ["ln"], ["z0"], equation="ij->ij"),
        h.make_node("Unique", ["z0"], ["z"], name="uniq"),
    ]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 6])],
                     [h.make_tensor_value_info("z", T.FLOAT, None)],
                     [h.make_tensor("s", T.FLOAT, [], [0.1]), h.make_tensor("zp", T.INT8, [], [0]),
                      nph.from_array(W, "W"), nph.from_array(np.full(3, 0.1, np.float32), "ws"),
                      nph.from_array(np.zeros(3, np.int8), "wzp"), nph.from_array(np.array([-1]), "ax"),
                      nph.from_array(np.array(1e-5, np.float32), "eps")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    rep = check(m)
    errs = {(i.code, i.node) for i in rep.errors}
    assert ("AXIS", "dqw") in errs  # MatMul weight channels are on axis 1, and 3 scales != 6 rows
    assert ("UNSUPPORTED_OP", "uniq") in errs
    assert all(i.node != "Einsum" for i in rep.errors if i.code == "UNSUPPORTED_OP")
    assert ("DECOMPOSED_LAYERNORM", "rm1") in {(i.code, i.node) for i in rep.warnings}
    d = rep.to_dict()
    assert d["ok"] is False and {"severity", "code", "message", "node", "module"} <= set(d["errors"][0])


def test_group_wise_weights_are_an_error_naming_the_fix():
    fc1 = lin("fc1", 4, 8, 1) | {"weight": {"bits": 4, "axis": 0, "group": 4, "scale": [0.1] * 32}}
    rep = check(_q([fc1, lin("fc2", 8, 8, 8)]))
    blocked = [i for i in rep.errors if i.code == "BLOCKED_WEIGHT"]
    assert [i.module for i in blocked] == ["fc1"] and "--target trt" in blocked[0].message
    assert "AXIS" not in rep.codes("error")
