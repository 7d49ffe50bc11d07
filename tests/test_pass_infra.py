"""Pass manager (requires/provides, validation, numeric check) and the cleanup pass."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nph

from test_pass_insert_qdq import lin, recipe_for, tiny_block
from vitq.errors import VerificationError
from vitq.passes.cleanup import Cleanup
from vitq.passes.infra import GraphPass, PassManager, ort_run, to_ir
from vitq.passes.insert_qdq import InsertQDQ
from vitq.passes.lower_ort_cpu import LowerOrtCpu


class _Break(GraphPass):
    """A buggy 'exact' pass: flips an Add into a Sub."""

    NAME = "break"
    SEMANTICS = "exact"

    def call(self, model):
        n = next(n for n in model.graph if n.op_type == "Add")
        n.op_type = "Sub"
        return ir.passes.PassResult(model, True)


class _Invalid(GraphPass):
    NAME = "invalid"

    def call(self, model):
        n = next(n for n in model.graph if n.op_type == "MatMul")
        n.replace_input_with(1, n.inputs[0])  # [B,5,8] @ [B,5,8]: shape inference fails
        return ir.passes.PassResult(model, True)


def _feeds():
    return {"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}


def test_requires_and_records():
    m = to_ir(tiny_block(np.random.default_rng(0)))
    pm = PassManager([InsertQDQ(recipe_for([lin("fc1", 8, 8, 16)])), Cleanup(), LowerOrtCpu()],
                     sample_feeds=_feeds())
    pm.run(m)
    assert [r.name for r in pm.records] == ["insert_qdq", "cleanup", "lower_ort_cpu"]
    assert pm.properties >= {"qdq", "ort_lowered"} and "float" not in pm.properties
    low = pm.records[-1]
    assert low.changed and low.validated and low.numeric_max_abs_diff == 0.0
    with pytest.raises(Exception, match="requires"):
        PassManager([LowerOrtCpu()]).run(to_ir(tiny_block(np.random.default_rng(0))))


def test_numeric_check_catches_a_wrong_exact_pass():
    with pytest.raises(VerificationError, match="break"):
        PassManager([_Break()], sample_feeds=_feeds()).run(to_ir(tiny_block(np.random.default_rng(0))))


def test_validation_catches_an_invalid_graph():
    with pytest.raises(VerificationError, match="invalid"):
        PassManager([_Invalid()]).run(to_ir(tiny_block(np.random.default_rng(0))))


def test_cleanup_folds_constants_but_never_dequantize_and_removes_dead_nodes():
    W = np.random.default_rng(1).integers(-100, 100, (4, 4)).astype(np.int8)
    nodes = [h.make_node("DequantizeLinear", ["W", "s", "zp"], ["Wd"]),
             h.make_node("Shape", ["c"], ["cs"]), h.make_node("Reshape", ["x", "cs"], ["xr"]),  # foldable
             h.make_node("MatMul", ["xr", "Wd"], ["y"]),
             h.make_node("Relu", ["x"], ["dead"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 4])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 4])],
                     [nph.from_array(W, "W"), h.make_tensor("s", T.FLOAT, [], [0.1]),
                      h.make_tensor("zp", T.INT8, [], [0]), nph.from_array(np.zeros((2, 4), np.float32), "c")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    out = ir.serde.serialize_model(PassManager([Cleanup()], properties={"qdq"}).run(to_ir(m)))
    ops = [n.op_type for n in out.graph.node]
    assert "DequantizeLinear" in ops and "Relu" not in ops and "Shape" not in ops
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0])
