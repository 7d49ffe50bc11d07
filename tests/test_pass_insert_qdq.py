"""insert_qdq on tiny graphs built in code (ModelOpt style): which tensors get Q/DQ, at which bits, which axis, and
the integer weights against ``functional.quantize``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nph

from vitq.passes.infra import GraphPassError, ort_run, run_passes, to_ir
from vitq.passes.insert_qdq import InsertQDQ, quantize_weight
from vitq.recipe.schema import Recipe

SCOPES = "pkg.torch.onnx.name_scopes"


def _node(op, ins, outs, scope, **attrs):
    n = h.make_node(op, ins, outs, name=f"{scope}/{op}_{outs[0]}", **attrs)
    if scope is not None:
        parts = scope.split(".")
        mods = [""] + [".".join(parts[:i + 1]) for i in range(len(parts))] if scope else [""]
        p = n.metadata_props.add()
        p.key, p.value = SCOPES, str(mods + [op.lower()])
    return n


def tiny_block(rng, d=8, hidden=16, out=4):
    """LayerNorm -> fc1 (MatMul + Add, W^T [d, hidden]) -> Gelu -> fc2 (MatMul + Add) -> residual Add -> head Gemm
    (transB=1), plus an attention core q@k^T -> Softmax -> @v under module 'attn'; fc1's and fc2's biases share one
    initializer (as the exporter's dedup does)."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [nph.from_array(f(d), "ln.w"), nph.from_array(f(d), "ln.b"), nph.from_array(f(d, hidden), "W1t"),
             nph.from_array(f(hidden), "b1"), nph.from_array(f(hidden, d), "W2t"),
             nph.from_array(f(out, d), "head.weight"), nph.from_array(f(out), "head.bias"),
             nph.from_array(np.array(0.5, np.float32), "qscale")]
    inits.append(nph.from_array(f(d), "bshared"))
    nodes = [
        _node("LayerNormalization", ["x", "ln.w", "ln.b"], ["ln"], "norm", axis=-1),
        _node("MatMul", ["ln", "W1t"], ["mm1"], "fc1"), _node("Add", ["mm1", "b1"], ["y1"], "fc1"),
        _node("Gelu", ["y1"], ["g"], "act"),
        _node("MatMul", ["g", "W2t"], ["mm2"], "fc2"), _node("Add", ["mm2", "bshared"], ["y2"], "fc2"),
        _node("Add", ["x", "y2"], ["res"], ""),
        # attention core on the residual stream: q = res*scale, k = res, v = y2  ([B, N, d])
        _node("Mul", ["res", "qscale"], ["q"], "attn"),
        _node("Transpose", ["res"], ["kt"], "attn", perm=[0, 2, 1]),
        _node("MatMul", ["q", "kt"], ["s"], "attn"), _node("Softmax", ["s"], ["p"], "attn", axis=-1),
        _node("MatMul", ["p", "y2"], ["o"], "attn"),
        _node("ReduceMean", ["o"], ["pool"], "", axes=None) if False else
        _node("Gather", ["o", "idx0"], ["pool"], ""),
        _node("Gemm", ["pool", "head.weight", "head.bias"], ["logits"], "head", transB=1),
    ]
    inits.append(nph.from_array(np.array(0, np.int64), "idx0"))
    g = h.make_graph(nodes, "tiny", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 5, d])],
                     [h.make_tensor_value_info("logits", T.FLOAT, ["batch", out])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    m.metadata_props.add(key="vitq.model", value="tiny")
    onnx.checker.check_model(m, full_check=True)
    return m


def recipe_for(layers):
    return Recipe.from_dict({"schema": "vitq.recipe/1", "name": "t", "model": "tiny", "layers": layers})


def lin(module, wbits, abits, n_out, scale=0.05, **extra):
    d = {"module": module, "kind": "linear", "weight": {"bits": wbits, "scale": [scale * (1 + i / 10) for i in
                                                                                  range(n_out)], "axis": 0}}
    if abits is not None:
        d["input"] = {"bits": abits, "scale": [0.03]}
    d.update(extra)
    return d


def run(model, recipe):
    out = run_passes(model, [InsertQDQ(recipe)])
    import onnx_ir as ir

    proto = ir.serde.serialize_model(out)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def producers(m):
    return {o: n for n in m.graph.node for o in n.output}


def inits(m):
    return {i.name: i for i in m.graph.initializer}


def gemm_inputs(m, module_op):
    return [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.name.startswith(module_op)]


def dq_of(m, tensor):
    """(dq node, q node or None, clip node or None) behind a GEMM input tensor."""
    pr = producers(m)
    dq = pr[tensor]
    assert dq.op_type == "DequantizeLinear", (tensor, dq.op_type)
    src = pr.get(dq.input[0])
    clip = None
    if src is not None and src.op_type == "Clip":
        clip, src = src, pr.get(src.input[0])
    return dq, src, clip


def test_weights_and_activations_bits_axis_values():
    rng = np.random.default_rng(0)
    m = tiny_block(rng)
    r = recipe_for([lin("fc1", 8, 8, 16), lin("fc2", 4, 6, 8), lin("head", 8, 8, 4)])
    q = run(m, r)
    I = inits(q)
    fc1 = gemm_inputs(q, "fc1/MatMul")[0]
    dqw, qw, _ = dq_of(q, fc1.input[1])
    assert qw is None  # weights: int initializer -> DQ only
    w_int = I[dqw.input[0]]
    assert w_int.data_type == T.INT8 and list(w_int.dims) == [8, 16]
    assert h.get_attribute_value(dqw.attribute[0]) == 1  # MatMul(X, W^T): [in, out] -> axis 1
    W1t = nph.to_array(inits(m)["W1t"])
    s1 = np.array(r.layer("fc1").weight.scale, np.float32)
    np.testing.assert_array_equal(nph.to_array(w_int), quantize_weight(W1t, s1, 8, 1))
    # the same integers as functional.quantize on the torch-layout weight [out, in] along axis 0
    import torch

    from vitq.quant.functional import channel_scale, quantize

    tq = quantize(torch.from_numpy(W1t.T.copy()), channel_scale(torch.from_numpy(s1), 2, 0), 8).numpy()
    np.testing.assert_array_equal(nph.to_array(w_int), tq.T.astype(np.int8))
    dqa, qa, clip = dq_of(q, fc1.input[0])
    assert qa.op_type == "QuantizeLinear" and qa.input[0] == "ln" and clip is None
    assert I[qa.input[2]].data_type == T.INT8 and nph.to_array(I[qa.input[2]]) == 0
    # fc2: int4 weights (ONNX INT4), 6-bit activations (int8 Q -> Clip(-32, 31) -> DQ)
    fc2 = gemm_inputs(q, "fc2/MatMul")[0]
    dqw2, _, _ = dq_of(q, fc2.input[1])
    assert I[dqw2.input[0]].data_type == T.INT4 and I[dqw2.input[2]].data_type == T.INT4
    v = nph.to_array(I[dqw2.input[0]]).astype(int)
    assert v.min() >= -8 and v.max() <= 7 and v.min() == -8  # clamped (scales 0.05.. are small)
    dqa2, qa2, clip2 = dq_of(q, fc2.input[0])
    assert clip2 is not None and [int(nph.to_array(I[i])) for i in clip2.input[1:]] == [-32, 31]
    assert qa2.input[0] == "g"  # on the GEMM input (after Gelu), not on the Gelu input
    # head: Gemm transB=1 -> axis 0, weight [out, in]
    head = gemm_inputs(q, "head/Gemm")[0]
    dqh, _, _ = dq_of(q, head.input[1])
    assert h.get_attribute_value(dqh.attribute[0]) == 0 and list(I[dqh.input[0]].dims) == [4, 8]
    # nothing on LayerNorm / Softmax inputs, residual add, bias adds
    pr = producers(q)
    for n in q.graph.node:
        if n.op_type in ("LayerNormalization", "Softmax", "Add", "Gelu"):
            for t in n.input:
                assert t not in pr or pr[t].op_type != "DequantizeLinear", (n.name, t)
    # model metadata kept; node metadata kept (module mapping still works on the result)
    assert {p.key: p.value for p in q.metadata_props} == {"vitq.model": "tiny"}
    from vitq.exporter.onnx_export import module_name

    assert module_name(qa) == "fc1" and module_name(fc1) == "fc1"


def test_6bit_weight_is_int8_in_range_and_per_tensor_scale():
    m = tiny_block(np.random.default_rng(1))
    layer = lin("fc1", 6, 8, 16)
    layer["weight"] = {"bits": 6, "scale": [0.01]}  # per tensor
    q = run(m, recipe_for([layer]))
    fc1 = gemm_inputs(q, "fc1/MatMul")[0]
    dqw, _, _ = dq_of(q, fc1.input[1])
    w = nph.to_array(inits(q)[dqw.input[0]])
    assert w.dtype == np.int8 and w.min() == -32 and w.max() == 31
    assert not dqw.attribute and nph.to_array(inits(q)[dqw.input[1]]).shape == ()


def test_attention_operands_identified_structurally():
    m = tiny_block(np.random.default_rng(2))
    att = {"module": "attn", "kind": "attn", "q": {"bits": 8, "scale": [0.1]}, "k": {"bits": 8, "scale": [0.2]},
           "attn": {"bits": 8, "scale": [1 / 127]}, "v": {"bits": 4, "scale": [0.3]}}
    q = run(m, recipe_for([att]))
    mms = [n for n in q.graph.node if n.op_type == "MatMul" and n.name.startswith("attn/")]
    qk = next(n for n in mms if any(c.op_type == "Softmax" and n.output[0] in c.input for c in q.graph.node))
    av = next(n for n in mms if n is not qk)
    I = inits(q)
    scale = lambda t: float(nph.to_array(I[dq_of(q, t)[0].input[1]]))  # noqa: E731
    assert scale(qk.input[0]) == pytest.approx(0.1) and dq_of(q, qk.input[0])[1].input[0] == "q"
    assert scale(qk.input[1]) == pytest.approx(0.2) and dq_of(q, qk.input[1])[1].input[0] == "kt"
    assert scale(av.input[0]) == pytest.approx(1 / 127) and dq_of(q, av.input[0])[1].input[0] == "p"
    dq_v, q_v, _ = dq_of(q, av.input[1])
    assert scale(av.input[1]) == pytest.approx(0.3) and I[q_v.input[2]].data_type == T.INT4
    # the fc2 output feeding v is not quantized for other consumers (residual add keeps the float tensor)
    res = next(n for n in q.graph.node if n.op_type == "Add" and n.output[0] == "res")
    assert res.input[1] == "y2"


def test_opt_m_regions_two_gemms_share_weight_bias_once():
    rng = np.random.default_rng(3)
    m = tiny_block(rng)
    layer = lin("fc2", 8, None, 8, input_regions={"m": 4.0, "pos": {"bits": 8, "scale": [0.04]},
                                                  "neg": {"bits": 8, "scale": [0.01]}})
    hl = lin("head", 8, None, 4, input_regions={"m": 2.0, "pos": {"bits": 8, "scale": [0.04]},
                                                "neg": {"bits": 8, "scale": [0.02]}})
    q = run(m, recipe_for([layer, hl]))
    mms = [n for n in q.graph.node if n.op_type == "MatMul" and n.name.startswith("fc2/")]
    assert len(mms) == 2
    assert mms[0].input[1] == mms[1].input[1]  # one weight DQ, shared
    pr = producers(q)
    srcs = sorted(pr[dq_of(q, n.input[0])[1].input[0]].op_type for n in mms)
    assert srcs == ["Min", "Relu"]
    add = next(n for n in q.graph.node if n.op_type == "Add" and set(n.input) == {mms[0].output[0], mms[1].output[0]})
    bias = next(n for n in q.graph.node if n.op_type == "Add" and add.output[0] in n.input)
    assert "bshared" in bias.input  # the bias Add once, after the region sum
    gemms = [n for n in q.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 2 and sorted(len(n.input) for n in gemms) == [2, 3]  # Gemm bias on one branch only


def _fq(x, s, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    s = np.float32(s)
    return (np.clip(np.round(x / s), lo, hi) * s).astype(np.float32)


def test_opt_m_numerics_match_two_fake_quant_branches():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((6, 3)).astype(np.float32)  # [in, out] (Linear exported as MatMul(X, W^T))
    g = h.make_graph([_node("MatMul", ["x", "W"], ["y"], "fc")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, [4, 6])], [h.make_tensor_value_info("y", T.FLOAT, [4, 3])],
                     [nph.from_array(W, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    ws = [0.02, 0.03, 0.025]
    layer = {"module": "fc", "kind": "linear", "weight": {"bits": 8, "scale": ws, "axis": 0},
             "input_regions": {"m": 4.0, "pos": {"bits": 8, "scale": [0.02]}, "neg": {"bits": 6, "scale": [0.005]}}}
    q = run(m, recipe_for([layer]))
    assert q.graph.output[0].name == "y"  # the graph output keeps its name
    x = (rng.standard_normal((4, 6)) * 0.5).astype(np.float32)
    wq = _fq(W, np.array(ws, np.float32)[None, :], 8)
    want = _fq(np.maximum(x, 0), 0.02, 8) @ wq + _fq(np.minimum(x, 0), 0.005, 6) @ wq
    got = ort_run(q, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - x @ W).max() > 1e-3  # really quantized


def test_shared_float_initializer_is_not_mutated():
    """Two Linears whose exported weights are one deduplicated initializer: each gets its own integer weights from
    its own scales; the float initializer stays for any float user."""
    rng = np.random.default_rng(4)
    W = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [_node("MatMul", ["x", "W"], ["a"], "l1"), _node("MatMul", ["a", "W"], ["b"], "l2"),
             _node("MatMul", ["b", "W"], ["y"], "l3")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 8])], [nph.from_array(W, "W")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    r = recipe_for([lin("l1", 8, 8, 8, scale=0.02), lin("l2", 8, 8, 8, scale=0.04)])
    q = run(m, r)
    I = inits(q)
    np.testing.assert_array_equal(nph.to_array(I["W"]), W)  # untouched, still used by l3
    l1, l2, l3 = (next(n for n in q.graph.node if n.name.startswith(f"{k}/MatMul")) for k in ("l1", "l2", "l3"))
    assert l3.input[1] == "W"
    w1 = nph.to_array(I[dq_of(q, l1.input[1])[0].input[0]])
    w2 = nph.to_array(I[dq_of(q, l2.input[1])[0].input[0]])
    assert not np.array_equal(w1, w2)


def test_missing_module_is_a_clear_error():
    m = tiny_block(np.random.default_rng(5))
    with pytest.raises(GraphPassError, match=r"blocks\.7\.mlp\.fc9.*no linear node"):
        run(m, recipe_for([lin("blocks.7.mlp.fc9", 8, 8, 16)]))
    with pytest.raises(GraphPassError, match="fused_attn=False"):
        run(m, recipe_for([{"module": "fc1", "kind": "attn", "q": {"bits": 8, "scale": [0.1]}}]))


def test_scale_count_mismatch_and_requires_float_graph():
    m = tiny_block(np.random.default_rng(6))
    with pytest.raises(GraphPassError, match="fc1.weight: 3 scales"):
        run(m, recipe_for([lin("fc1", 8, 8, 3)]))
    q = run(m, recipe_for([lin("fc1", 8, 8, 16)]))
    with pytest.raises(Exception, match="requires|already has"):
        run(q, recipe_for([lin("fc2", 8, 8, 8)]))


# ---- shifted quantizers (schema ``shift``): Sub -> Q/DQ on the GEMM input, the offset restored after the GEMM ----

def _fq_shift(x, s, bits, shift):
    """The torch simulation's arithmetic (vitq.quant.functional.fake_quant with a shift), in numpy."""
    import torch

    from vitq.quant.functional import fake_quant
    return fake_quant(torch.from_numpy(np.asarray(x, np.float32)), float(s), bits, shift).numpy()


def _linear_graph(rng, bias: str | None, n_in=6, n_out=3):
    W = rng.standard_normal((n_in, n_out)).astype(np.float32)
    inits_ = [nph.from_array(W, "W")]
    if bias == "gemm":
        inits_ = [nph.from_array(W.T.copy(), "W"), nph.from_array(rng.standard_normal(n_out).astype(np.float32), "b")]
        nodes = [_node("Gemm", ["x", "W", "b"], ["y"], "fc", transB=1)]
    elif bias == "add":
        inits_.append(nph.from_array(rng.standard_normal(n_out).astype(np.float32), "b"))
        nodes = [_node("MatMul", ["x", "W"], ["mm"], "fc"), _node("Add", ["mm", "b"], ["y"], "fc")]
    else:
        nodes = [_node("MatMul", ["x", "W"], ["y"], "fc")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, n_in])],
                     [h.make_tensor_value_info("y", T.FLOAT, [4, n_out])], inits_)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10), inits_


@pytest.mark.parametrize("bias", ["add", "gemm", None])
@pytest.mark.parametrize("bits,shift", [(4, 8), (6, -31), (8, 100)])
def test_shifted_linear_input_matches_simulation(bias, bits, shift):
    rng = np.random.default_rng(11)
    m, ini = _linear_graph(rng, bias)
    ws = [0.02, 0.03, 0.025]
    layer = {"module": "fc", "kind": "linear", "weight": {"bits": 8, "scale": ws, "axis": 0},
             "input": {"bits": bits, "scale": [0.07], "shift": shift}}
    q = run(m, recipe_for([layer]))
    assert q.graph.output[0].name == "y"
    mm = next(n for n in q.graph.node if n.op_type in ("MatMul", "Gemm"))
    dq, qn, _ = dq_of(q, mm.input[0])
    sub = producers(q)[qn.input[0]]
    assert sub.op_type == "Sub" and sub.input[0] == "x"
    c = float(nph.to_array(inits(q)[sub.input[1]]))
    assert c == pytest.approx(0.07 * shift, rel=1e-6)
    n_add = sum(n.op_type == "Add" for n in q.graph.node)
    assert n_add == (1 if bias != "gemm" else 0)  # folded into the constant bias (or one new Add when none)
    # one-signed data beyond the symmetric grid's half: the shifted grid covers it, the symmetric one clips
    x = (np.sign(shift) * np.abs(rng.standard_normal((4, 6))) * 0.07 * (1 << (bits - 1)) * 1.2).astype(np.float32)
    W = nph.to_array(ini[0])
    Wt = W.T if bias == "gemm" else W  # [in, out]
    wq = _fq(Wt, np.array(ws, np.float32)[None, :], 8)
    b = nph.to_array(ini[1]) if bias else 0.0
    want = _fq_shift(x, 0.07, bits, shift) @ wq + b
    got = ort_run(q, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=2e-5 * (1 << (bits - 1)))
    unshifted = _fq(x, 0.07, bits) @ wq + b
    assert np.abs(got - unshifted).max() > 1e-3  # the shift changes the function (it is not silently dropped)


def test_shifted_opt_m_regions_match_simulation():
    rng = np.random.default_rng(12)
    m, ini = _linear_graph(rng, "add")
    ws = [0.02, 0.03, 0.025]
    layer = {"module": "fc", "kind": "linear", "weight": {"bits": 4, "scale": ws, "axis": 0},
             "input_regions": {"m": 4.0, "pos": {"bits": 4, "scale": [0.1], "shift": 8},
                               "neg": {"bits": 4, "scale": [0.01], "shift": -7}}}
    q = run(m, recipe_for([layer]))
    x = (rng.standard_normal((4, 6)) * 0.6).astype(np.float32)
    wq = _fq(nph.to_array(ini[0]), np.array(ws, np.float32)[None, :], 4)
    want = (_fq_shift(np.maximum(x, 0), 0.1, 4, 8) + _fq_shift(np.minimum(x, 0), 0.01, 4, -7)) @ wq + \
        nph.to_array(ini[1])
    np.testing.assert_allclose(ort_run(q, {"x": x})[0], want, atol=2e-5)
    # zero stays exact on both shifted grids: an all-zero input gives exactly the bias
    np.testing.assert_allclose(ort_run(q, {"x": np.zeros((4, 6), np.float32)})[0],
                               np.broadcast_to(nph.to_array(ini[1]), (4, 3)), atol=1e-5)


def test_shifted_attention_probabilities_colsum_restore():
    m = tiny_block(np.random.default_rng(13))
    att = {"module": "attn", "kind": "attn", "attn": {"bits": 4, "scale": [1 / 15], "shift": 8},
           "v": {"bits": 8, "scale": [0.05]}}
    q = run(m, recipe_for([att]))
    av = next(n for n in q.graph.node if n.op_type == "MatMul" and n.name.startswith("attn/")
              and producers(q)[n.input[0]].op_type == "DequantizeLinear"
              and producers(q)[dq_of(q, n.input[0])[1].input[0]].op_type == "Sub")
    red = next(n for n in q.graph.node if n.op_type == "ReduceSum")
    assert red.input[0] == av.input[1]  # colsum of the quantized v the matmul uses
    add = next(n for n in q.graph.node if n.op_type == "Add" and av.output[0] in n.input)
    assert add.name.startswith("attn/")
    # numerics: the attention core of the tiny block, quantized operands as the simulation computes them
    ref = tiny_block(np.random.default_rng(13))
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    taps = ["p", "y2"]
    from onnx import helper as hh
    for t in taps:
        ref.graph.output.append(hh.make_tensor_value_info(t, T.FLOAT, None))
    _, p, v = ort_run(ref, {"x": x})
    want_o = _fq_shift(p, 1 / 15, 4, 8) @ _fq(v, 0.05, 8)
    q.graph.output.append(hh.make_tensor_value_info(add.output[0], T.FLOAT, None))
    got_o = ort_run(q, {"x": x})[1]
    np.testing.assert_allclose(got_o, want_o, atol=1e-5)


@pytest.mark.parametrize("role", ["q", "k", "v"])
def test_shift_on_unsupported_operand_is_an_error(role):
    m = tiny_block(np.random.default_rng(14))
    att = {"module": "attn", "kind": "attn", role: {"bits": 8, "scale": [0.1], "shift": 3}}
    with pytest.raises(GraphPassError, match="grid shift"):
        run(m, recipe_for([att]))


def test_shift_schema_round_trip_and_errors():
    from vitq.recipe.schema import QuantSpec, RecipeError
    q = QuantSpec.from_dict({"bits": 4, "scale": [0.1], "shift": 8}, "x")
    assert q.shift == 8 and q.to_dict()["shift"] == 8 and q.offset == pytest.approx(0.8)
    assert "shift" not in QuantSpec.from_dict({"bits": 4, "scale": [0.1]}, "x").to_dict()
    with pytest.raises(RecipeError, match=r"x\.shift"):
        QuantSpec.from_dict({"bits": 4, "scale": [0.1], "shift": 9}, "x")
    with pytest.raises(RecipeError, match=r"x\.shift"):
        QuantSpec.from_dict({"bits": 8, "scale": [0.1, 0.2], "axis": 0, "shift": 1}, "x")
    with pytest.raises(RecipeError, match=r"x\.shift"):
        QuantSpec.from_dict({"bits": 8, "scale": [0.1], "shift": 1.5}, "x")


def test_group_wise_weights_become_a_blocked_dequantize_linear():
    """``weight.group``: one scale per g inputs of each output channel -> DQ(block_size g) along the input axis, for
    a MatMul weight [in, out] (axis 0) and a Gemm(transB=1) weight [out, in] (axis 1); the integers and the ONNX
    Runtime function equal the torch fake quantization."""
    import torch

    from vitq.quant.observers import fake_quant_weight

    rng = np.random.default_rng(1)
    d, hidden, g = 32, 64, 16
    m = tiny_block(rng, d=d, hidden=hidden, out=4)
    fc1 = lin("fc1", 4, 8, 1) | {"weight": {"bits": 4, "axis": 0, "group": g, "scale": [
        0.3 * (1 + (i % 7) / 5) for i in range(hidden * (d // g))]}}
    head = {"module": "head", "kind": "linear", "weight": {"bits": 4, "axis": 0, "group": g, "scale": [
        0.4 * (1 + (i % 3) / 4) for i in range(4 * (d // g))]}}
    r = recipe_for([fc1, head])
    q = run(m, r)
    I = inits(q)
    W1t, Wh = nph.to_array(inits(m)["W1t"]), nph.to_array(inits(m)["head.weight"])
    for op, w_graph, torch_w, axis, spec in (("fc1/MatMul", W1t, W1t.T, 0, r.layer("fc1").weight),
                                              ("head/Gemm", Wh, Wh, 1, r.layer("head").weight)):
        node = gemm_inputs(q, op)[0]
        dq, qn, _ = dq_of(q, node.input[1])
        attrs = {a.name: h.get_attribute_value(a) for a in dq.attribute}
        assert qn is None and attrs == {"axis": axis, "block_size": g}
        assert I[dq.input[0]].data_type == T.INT4 and list(I[dq.input[0]].dims) == list(w_graph.shape)
        ref = fake_quant_weight(torch.from_numpy(np.array(torch_w)), torch.tensor(spec.scale), 4).numpy()
        s = nph.to_array(I[dq.input[1]])
        deq = nph.to_array(I[dq.input[0]]).astype(np.float32) * np.repeat(s, g, axis=axis)
        np.testing.assert_array_equal(deq if op == "head/Gemm" else deq.T, ref)
    import onnxruntime as ort

    from vitq.runtime.ort_backend import QDQ_MATMULNBITS_ACCURACY

    x = rng.standard_normal((2, 5, d)).astype(np.float32)
    plain = ort_run(q, {"x": x})[0]
    so = ort.SessionOptions()
    so.add_session_config_entry(QDQ_MATMULNBITS_ACCURACY, "1")  # the runtime's exact int4 mode
    fused = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)


def test_group_wise_weights_that_do_not_fit_the_graph_are_named():
    m = tiny_block(np.random.default_rng(2))
    bad = {"module": "fc1", "kind": "linear", "weight": {"bits": 4, "axis": 0, "group": 4, "scale": [0.1] * 16}}
    with pytest.raises(GraphPassError, match=r"fc1.weight: 16 scales in groups of 4"):
        run(m, recipe_for([bad]))
