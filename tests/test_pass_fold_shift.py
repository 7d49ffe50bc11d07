"""fold_shift_zero_point: shifted quantizers' Sub folded into the uint8 zero point after lower_ort_cpu."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import numpy_helper as nph

from test_pass_insert_qdq import dq_of, gemm_inputs, inits, lin, recipe_for, tiny_block
from vitq.passes.fold_shift import FoldShiftZeroPoint
from vitq.passes.infra import ort_run, run_passes
from vitq.passes.insert_qdq import InsertQDQ
from vitq.passes.lower_ort_cpu import LowerOrtCpu
from vitq.passes.lower_trt import ClipSub8Activations


def _build(layers, seed=0):
    m = tiny_block(np.random.default_rng(seed))
    lowered = ir.serde.serialize_model(run_passes(m, [InsertQDQ(recipe_for(layers)), ClipSub8Activations(),
                                                      LowerOrtCpu()]))
    p = FoldShiftZeroPoint()
    folded = ir.serde.serialize_model(run_passes(lowered, [p], properties={"qdq", "ort_lowered"}))
    onnx.checker.check_model(folded, full_check=True)
    return lowered, folded, p.stats


def _att(shift):
    return {"module": "attn", "kind": "attn", "q": {"bits": 8, "scale": [0.1]}, "k": {"bits": 8, "scale": [0.1]},
            "attn": {"bits": 8, "scale": [1 / 255], "shift": shift}, "v": {"bits": 8, "scale": [0.2]}}


@pytest.mark.parametrize("abits,shift", [(8, 100), (8, 128), (8, -127), (6, -31), (6, 32)])
def test_sub_folds_into_the_zero_point(abits, shift):
    fc1 = lin("fc1", 8, None, 16)
    fc1["input"] = {"bits": abits, "scale": [0.03], "shift": shift}
    lowered, folded, stats = _build([fc1, lin("head", 8, 8, 4), _att(128)])
    assert stats == {"folded": 2, "kept": 0, "attn_offsets_into_dq": 1}  # fc1 input, the post-softmax operand
    assert not [n for n in folded.graph.node if n.op_type == "Sub"]
    # the post-softmax offset restore (+ c * ReduceSum(v)) is gone: its DQ takes the shifted zero point (0 here)
    assert [n for n in lowered.graph.node if n.op_type == "ReduceSum"]
    assert not [n for n in folded.graph.node if n.op_type in ("ReduceSum", "Mul") and n.name.startswith("attn/attn")]
    av = [n for n in folded.graph.node if n.op_type == "MatMul" and n.name.startswith("attn/")][-1]
    dqa, qa, _ = dq_of(folded, av.input[0])
    assert int(nph.to_array(inits(folded)[dqa.input[2]])) == 0 == int(nph.to_array(inits(folded)[qa.input[2]]))
    assert av.output[0] == "o"  # the Add after it was removed, its consumers re-pointed
    I = inits(folded)
    mm = gemm_inputs(folded, "fc1/MatMul")[0]
    dq, q, clip = dq_of(folded, mm.input[0])
    assert int(nph.to_array(I[q.input[2]])) == 128 - shift and I[q.input[2]].data_type == T.UINT8
    assert int(nph.to_array(I[dq.input[2]])) == 128  # the GEMM still sees dq(x - c): offsets stay valid
    pre = {o: n for n in folded.graph.node for o in n.output}.get(q.input[0])
    if abits < 8:  # float Clip before the int8 Q, its bounds moved by c = s * shift onto the grid of x
        assert pre.op_type == "Clip" and pre.input[0] == "ln"
        lo, hi = (float(nph.to_array(I[i])) for i in pre.input[1:])
        assert lo == pytest.approx(0.03 * (shift - 32), abs=1e-6) and hi == pytest.approx(0.03 * (shift + 31), abs=1e-6)
    else:
        assert q.input[0] == "ln" and clip is None
    # the same function up to float32 rounding ties: on data spread over the whole grid, outputs equal to float
    # tolerance (a rare tie flip moves one element by one grid step)
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32) * 2
    a, b = ort_run(lowered, {"x": x})[0], ort_run(folded, {"x": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_rounding_ties_are_rare_per_element():
    """The quantizer alone on 10^6 values: ``Q(x - c, s, 128)`` vs ``Q(x, s, 128 - h)`` differ in very few
    elements, each by one step."""
    from onnx import helper as h

    s, hh = np.float32(0.0123), 100
    c = np.float32(s * np.float32(hh))
    x = (np.random.default_rng(0).standard_normal(1_000_000) * 2).astype(np.float32)

    def model(fold):
        init = [nph.from_array(np.array(s), "s"), nph.from_array(np.array(128, np.uint8), "z"),
                nph.from_array(np.array(c), "c"), nph.from_array(np.array(128 - hh, np.uint8), "zf")]
        nodes = ([h.make_node("QuantizeLinear", ["x", "s", "zf"], ["q"])] if fold else
                 [h.make_node("Sub", ["x", "c"], ["xs"]), h.make_node("QuantizeLinear", ["xs", "s", "z"], ["q"])])
        nodes.append(h.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]))
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [None])],
                         [h.make_tensor_value_info("y", T.FLOAT, [None])], init)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)

    a, b = ort_run(model(False), {"x": x})[0], ort_run(model(True), {"x": x})[0]
    d = np.abs(a - b)
    assert (d > 0).sum() <= 10 and d.max() <= s * 1.0001


def test_not_folded_when_zero_point_out_of_range_or_shared():
    fc1 = lin("fc1", 8, None, 16)
    fc1["input"] = {"bits": 8, "scale": [0.03], "shift": -128}  # 128 - (-128) = 256 does not fit uint8
    _, folded, stats = _build([fc1, lin("head", 8, 8, 4)])
    assert stats == {"folded": 0, "kept": 1, "attn_offsets_into_dq": 0}
    assert len([n for n in folded.graph.node if n.op_type == "Sub"]) == 1


def test_requires_the_ort_lowering():
    m = tiny_block(np.random.default_rng(0))
    q = ir.serde.serialize_model(run_passes(m, [InsertQDQ(recipe_for([lin("fc1", 8, 8, 16)]))]))
    with pytest.raises(ir.passes.PreconditionError, match="ort_lowered"):
        run_passes(q, [FoldShiftZeroPoint()], properties={"qdq"})
