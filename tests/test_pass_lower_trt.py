"""lower_trt pass wrapper and clip_sub8_activations: tiny hand-built graphs, structure + exact numerics on ORT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from vitq.passes.infra import PassManager, ort_run, to_ir
from vitq.passes.lower_trt import ClipSub8Activations, LowerTrt
from vitq.passes.trt_check import check

S_A, S_B = np.float32(0.05), np.float32(0.11)


def act_matmul(bits_a: int, bits_b: int) -> onnx.ModelProto:
    """Two activations, each Q/DQ'd (int4, int8, or 6-bit int8+Clip), into a MatMul (an attention-style GEMM)."""
    nodes, inits = [], []
    for name, s, bits in (("a", S_A, bits_a), ("b", S_B, bits_b)):
        qt = T.INT4 if bits == 4 else T.INT8
        inits += [nh.from_array(np.array(s), f"{name}_s"), h.make_tensor(f"{name}_zp", qt, [], [0])]
        q = h.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_zp"], [f"{name}_q"], name=f"{name}/Q")
        q.metadata_props.add(key="vitq.bits", value=str(bits))
        nodes.append(q)
        src = f"{name}_q"
        if bits not in (4, 8):
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            inits += [nh.from_array(np.array(lo, np.int8), f"{name}_lo"), nh.from_array(np.array(hi, np.int8),
                                                                                       f"{name}_hi")]
            nodes.append(h.make_node("Clip", [src, f"{name}_lo", f"{name}_hi"], [f"{name}_c"]))
            src = f"{name}_c"
        nodes.append(h.make_node("DequantizeLinear", [src, f"{name}_s", f"{name}_zp"], [f"{name}_d"]))
    nodes.append(h.make_node("MatMul", ["a_d", "b_d"], ["y"]))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("a", T.FLOAT, ["n", 4, 8]),
                                  h.make_tensor_value_info("b", T.FLOAT, ["n", 8, 5])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["n", 4, 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)


def feeds(seed=0):
    rng = np.random.default_rng(seed)  # wide enough to saturate every grid, plus exact boundary values
    a = (rng.standard_normal((3, 4, 8)) * 0.6).astype(np.float32)
    a[0, 0, :4] = [7 * S_A, -8 * S_A, 7.5 * S_A, -8.5 * S_A]
    b = (rng.standard_normal((3, 8, 5)) * 3.0).astype(np.float32)
    return {"a": a, "b": b}


@pytest.mark.parametrize("bits", [(4, 4), (4, 8), (6, 8), (6, 4)])
def test_sub8_activations_become_clip_int8_exactly(bits):
    proto = act_matmul(*bits)
    ref = ort_run(proto, feeds())[0]
    m = to_ir(proto)
    pm = PassManager([ClipSub8Activations()], properties={"qdq"}, sample_feeds=feeds(1))
    pm.run(m)
    n_sub8 = sum(b < 8 for b in bits)
    rec = pm.records[0]
    assert rec.stats["activations_clipped_to_int8"] == n_sub8 and rec.numeric_max_abs_diff == 0.0
    out = onnx.shape_inference.infer_shapes(__import__("onnx_ir").serde.serialize_model(m))
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_array_equal(ort_run(out, feeds())[0], ref)
    inits = {i.name: i for i in out.graph.initializer}
    for n in out.graph.node:  # no int4 Q/DQ and no Clip on an integer tensor are left
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert inits[n.input[2]].data_type == T.INT8
    clips = [n for n in out.graph.node if n.op_type == "Clip"]
    assert len(clips) == n_sub8 and all(inits[c.input[1]].data_type == T.FLOAT for c in clips)
    rep = check(out)
    assert rep.ok, rep.format_text()
    assert len([w for w in rep.warnings if w.code == "SUB8_ACT_AS_INT8"]) == n_sub8


def test_int8_activations_untouched():
    m = to_ir(act_matmul(8, 8))
    pm = PassManager([ClipSub8Activations()], properties={"qdq"})
    pm.run(m)
    assert not pm.records[0].changed


def test_lower_trt_pass_requires_qdq_and_is_noop_without_int4_linears():
    from onnx_ir.passes import PreconditionError

    with pytest.raises(PreconditionError, match="requires"):
        PassManager([LowerTrt()], properties={"float"}).run(to_ir(act_matmul(4, 4)))
    m = to_ir(act_matmul(4, 4))  # activation x activation: not a linear, no plugin
    pm = PassManager([LowerTrt()], properties={"qdq"})
    pm.run(m)
    assert not pm.records[0].changed and pm.records[0].stats == {"plugin_nodes": 0}
