"""``lower_trt``: the TensorRT lowering, an onnx-ir pass: int4-activation Q/DQ + MatMul patterns (static per
tensor, or the dynamic per-token uint4 chain) become ``QuantLinearA4`` plugin nodes; every other node stays native.
Also ``dynamic_qdq_float`` and ``clip_sub8_activations``, the other TensorRT lowerings.

TensorRT runs int8 activations and int4 weights natively but has no int4-activation path. Its ONNX parser sends a
node whose op_type is not a built-in importer to the fallback plugin importer, which looks a plugin creator up by
``(op_type, plugin_version attr, plugin_namespace attr)`` and passes the other attributes as ``PluginField`` s
(FLOAT -> kFLOAT32, INT -> kINT32, STRING -> kCHAR); initializer inputs become constant tensors. The node sits in
the custom domain ``trt.plugins`` so that no ONNX tool mistakes it for a standard op.

Patterns lowered (everything else, including int8-activation Q/DQ, stays native)::

    X -> QuantizeLinear(s_a, zp: INT4 scalar 0) -> DequantizeLinear(s_a, 0) --+
    W (INT4|INT8 initializer [K,N]) -> DequantizeLinear(w_s [N], axis=1) -----+-> MatMul [-> Add(bias [N])]

    ... or the same into Gemm(A, B, C?) with transA=0, alpha=beta=1, where transB=1 means W is [N,K] and the
    weight DequantizeLinear is per-axis over axis 0 (transB=0: W [K,N], axis 1); or the activation is the dynamic
    per-token (per-group) uint4 chain of :func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes`.

The plugin node stores W as an int8 initializer [N, K] (one int8 per weight, int4 values in [-8, 7]); the TensorRT
plugin packs it for the CUDA kernel (two int4 per byte, see ``vitq/plugins/NOTES.md``).

Requires ``qdq``; provides ``trt_lowered``. Semantics ``exact``: the plugin's ONNX expansion
(:func:`vitq.plugins.expand.expand_plugins`) is the same function bit for bit, and that is what the pass manager's
numeric check runs on ONNX Runtime (see :func:`vitq.passes.infra.ort_run`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from ..plugins.specs import ACT_GROUPS, DOMAIN, DYN_EPS, DYN_LEVELS, NAMESPACE, QUANT_LINEAR_A4, VERSION
from .infra import GraphPass
from .irutil import META_MODULE, META_ROLE, Namer, add_initializer, drop_unused_initializers
from ..format import NODE_LOWERED as META_LOWERED

_INT_BITS = {ir.DataType.INT4: 4, ir.DataType.INT8: 8}


def _is_std(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _prod(v: ir.Value | None) -> ir.Node | None:
    return v.producer() if v is not None else None


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _const(v: ir.Value | None) -> tuple[np.ndarray, ir.DataType] | None:
    """(value, data type) of an initializer or Constant-node output (int4 widened to int8); None if not constant."""
    if v is None:
        return None
    t = v.const_value
    if t is None:
        p = v.producer()
        if not _is_std(p, "Constant") or "value" not in p.attributes:
            return None
        t = p.attributes["value"].as_tensor()
    arr = t.numpy()
    if t.dtype == ir.DataType.INT4:
        arr = arr.astype(np.int8)
    return arr, t.dtype


def _single_consumer(v: ir.Value) -> ir.Node | None:
    uses = v.uses()
    if len(uses) != 1 or v.is_graph_output():
        return None
    return uses[0].node


@dataclass
class _Match:
    x: ir.Value
    act_scale: float
    w_nk: np.ndarray  # int8 [N, K]
    weight_bits: int
    w_scale: np.ndarray  # float32 [N]
    bias: np.ndarray | None
    output: ir.Value
    remove: list  # nodes replaced outright (MatMul/Gemm, Add)
    maybe_dead: list  # Q, DQ, weight DQ, dynamic chain: removed if nothing else uses them
    name: str
    dynamic: bool = False  # per-row dynamic activation quantizer (act_dynamic=1)
    group: int = 0  # with dynamic: one grid per this many features of a row (act_group)


def _match_act_int4(v: ir.Value) -> tuple[ir.Value, float, list] | None:
    """``v`` = DequantizeLinear(QuantizeLinear(x, s, zp=int4 0), s, 0), per-tensor: (x, s, [q, dq])."""
    dq = _prod(v)
    if not _is_std(dq, "DequantizeLinear"):
        return None
    q = _prod(dq.inputs[0])
    if not _is_std(q, "QuantizeLinear"):
        return None
    if _attr(q, "block_size", 0) or _attr(dq, "block_size", 0):
        return None
    # the quantized type: from the zero point, else (opset 21) the output_dtype attribute
    zp_v = _input(q, 2)
    zp = _const(zp_v)
    if zp_v is not None:
        if zp is None or zp[1] != ir.DataType.INT4 or np.any(zp[0] != 0):
            return None
    elif _attr(q, "output_dtype", 0) != onnx.TensorProto.INT4:
        return None
    s = _const(q.inputs[1])
    if s is None or s[0].size != 1 or s[1] != ir.DataType.FLOAT:
        return None
    s2 = _const(dq.inputs[1])
    if s2 is None or s2[0].size != 1 or np.float32(s2[0].reshape(())) != np.float32(s[0].reshape(())):
        return None
    if not _zero_point_absent_or_zero(dq):
        return None
    scale = float(np.float32(s[0].reshape(())))
    if not scale > 0:
        return None
    return q.inputs[0], scale, [q, dq]


def _zero_point_absent_or_zero(node: ir.Node) -> bool:
    """A Q/DQ node's optional zero point (input 2) is absent or a constant of zeros."""
    v = _input(node, 2)
    if v is None:
        return True
    zp = _const(v)
    return zp is not None and not np.any(zp[0] != 0)


def _match_weight(v: ir.Value, w_is_kn: bool) -> tuple[np.ndarray, int, np.ndarray, ir.Node] | None:
    """``v`` = DequantizeLinear(W int4/int8 const, per-axis (or per-tensor) scale, zp 0):
    (W as int8 [N, K], bits, scale [N], dq node)."""
    dq = _prod(v)
    if not _is_std(dq, "DequantizeLinear") or _attr(dq, "block_size", 0):
        return None
    w = _const(dq.inputs[0])
    if w is None or w[1] not in _INT_BITS or w[0].ndim != 2:
        return None
    bits = _INT_BITS[w[1]]
    w_nk = (w[0].T if w_is_kn else w[0]).astype(np.int8)
    n = w_nk.shape[0]
    s = _const(dq.inputs[1])
    if s is None or s[1] != ir.DataType.FLOAT:
        return None
    if not _zero_point_absent_or_zero(dq):
        return None
    if s[0].size == 1:
        w_scale = np.full(n, s[0].reshape(()), np.float32)
    else:
        axis = _attr(dq, "axis", 1)
        axis = axis + 2 if axis < 0 else axis
        if s[0].ndim != 1 or s[0].size != n or axis != (1 if w_is_kn else 0):
            return None
        w_scale = s[0].astype(np.float32)
    return w_nk, bits, w_scale, dq


def _bias_const(v: ir.Value | None, n: int) -> np.ndarray | None:
    b = _const(v)
    if b is None or b[1] != ir.DataType.FLOAT or b[0].size != n or (b[0].ndim and b[0].shape[-1] != n):
        return None
    return b[0].reshape(n).astype(np.float32)


def _match_act_dynamic(v: ir.Value, k: int) -> tuple[ir.Value, int, list] | None:
    """``v`` = the dynamic per-token uint4 Q/DQ chain of :func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes` over the
    last axis (block size ``k``), or its grouped form (block size G, reductions over ``Reshape(x, [0, ..., 0, k / G,
    G])`` without keepdims), every node and constant checked: (x, G or 0, [its nodes])."""
    dq = _prod(v)
    if not _is_std(dq, "DequantizeLinear") or len(dq.inputs) < 3:
        return None
    q = _prod(dq.inputs[0])
    if (not _is_std(q, "QuantizeLinear") or len(q.inputs) < 3 or q.inputs[1] is not dq.inputs[1]
            or q.inputs[2] is not dq.inputs[2] or q.inputs[1] is None or q.inputs[2] is None):
        return None
    block = _attr(q, "block_size", 0)
    group = 0 if block == k else block
    if group and (group not in ACT_GROUPS or k % group):
        return None
    for n in (q, dq):
        if _attr(n, "axis", 1) != -1 or _attr(n, "block_size", 0) != block:
            return None
    x, s, z = q.inputs[0], q.inputs[1], q.inputs[2]

    def prod(val, op, n_in=None):
        p = _prod(val)
        return p if _is_std(p, op) and (n_in is None or len(p.inputs) == n_in) else None

    def is_const(val, value, dtype=ir.DataType.FLOAT):
        c = _const(val)
        return c is not None and c[1] == dtype and c[0].size == 1 and np.float32(c[0].reshape(())) == np.float32(value)

    cast = prod(z, "Cast")
    if cast is None or _attr(cast, "to") != onnx.TensorProto.UINT4:
        return None
    rnd = prod(cast.inputs[0], "Round")
    neg = prod(rnd.inputs[0], "Neg") if rnd else None
    div_lo = prod(neg.inputs[0], "Div", 2) if neg else None
    if div_lo is None or div_lo.inputs[1] is not s:
        return None
    smax = prod(s, "Max", 2)
    if smax is None or not is_const(smax.inputs[1], DYN_EPS):
        return None
    div_r = prod(smax.inputs[0], "Div", 2)
    if div_r is None or not is_const(div_r.inputs[1], DYN_LEVELS[4]):
        return None
    sub = prod(div_r.inputs[0], "Sub", 2)
    if sub is None or sub.inputs[1] is not div_lo.inputs[0]:
        return None
    chain = [q, dq, cast, rnd, neg, div_lo, smax, div_r, sub]
    reduced = None  # what the reductions read: x, or (grouped) the Reshape of x
    for val, bound, red in ((sub.inputs[0], "Max", "ReduceMax"), (sub.inputs[1], "Min", "ReduceMin")):
        b = prod(val, bound, 2)
        r = prod(b.inputs[0], red, 2) if b else None
        if r is None or not is_const(b.inputs[1], 0.0) or _attr(r, "keepdims", 1) != (0 if group else 1):
            return None
        if reduced is None:
            reduced = r.inputs[0]
        if r.inputs[0] is not reduced:
            return None
        axes = _const(r.inputs[1])
        if axes is None or axes[0].reshape(-1).tolist() != [-1]:
            return None
        chain += [b, r]
    if not group:
        return (x, 0, chain) if reduced is x else None
    rs = prod(reduced, "Reshape", 2)
    shape = _const(rs.inputs[1]) if rs else None
    if (rs is None or rs.inputs[0] is not x or _attr(rs, "allowzero", 0) or shape is None
            or shape[1] != ir.DataType.INT64):
        return None
    dims = shape[0].reshape(-1).tolist()
    if len(dims) < 3 or any(d != 0 for d in dims[:-2]) or dims[-2:] != [k // group, group]:
        return None
    return x, group, chain + [rs]


def _match(node: ir.Node) -> _Match | None:
    if _is_std(node, "MatMul"):
        w_is_kn = True
    elif _is_std(node, "Gemm"):
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return None
        w_is_kn = not _attr(node, "transB", 0)
    else:
        return None
    if len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    wt = _match_weight(node.inputs[1], w_is_kn)
    if wt is None:
        return None
    w_nk, bits, w_scale, wdq = wt
    act = _match_act_int4(node.inputs[0])
    group = 0
    if act is not None:
        x, act_scale, act_nodes = act
        dynamic = False
    else:
        dyn = _match_act_dynamic(node.inputs[0], w_nk.shape[1])
        if dyn is None:
            return None
        (x, group, act_nodes), act_scale, dynamic = dyn, 0.0, True
    n = w_nk.shape[0]
    bias, out, remove = None, node.outputs[0], [node]
    if node.op_type == "Gemm" and _input(node, 2) is not None:
        bias = _bias_const(node.inputs[2], n)
        if bias is None:
            return None
    elif node.op_type == "MatMul":
        add = _single_consumer(out)
        if _is_std(add, "Add"):
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            b = _bias_const(other, n)
            if b is not None:
                bias, out, remove = b, add.outputs[0], [node, add]
    return _Match(x, act_scale, w_nk, bits, w_scale, bias, out, remove, act_nodes + [wdq],
                  node.name or f"{node.op_type}_{out.name}", dynamic, group)


def _detach(g: ir.Graph, node: ir.Node, freed: list[ir.Value]) -> None:
    freed.extend(v for v in node.inputs if v is not None)
    for i in range(len(node.inputs)):
        node.replace_input_with(i, None)
    g.remove(node, safe=False)


def lower_trt_graph(model: ir.Model) -> int:
    """Replace int4-activation linear patterns of ``model``'s main graph by ``QuantLinearA4`` plugin nodes, in place;
    returns the number of rewrites. What a rewrite leaves unused (its Q/DQ chain, the weight's initializers) goes;
    nodes and initializers something else still reads stay. Subgraphs (If/Loop bodies) are not visited."""
    g = model.graph
    matches = [m for m in (_match(n) for n in list(g)) if m is not None]
    if not matches:
        return 0
    nm = Namer(g)
    freed: list[ir.Value] = []
    dead: list[ir.Node] = []
    for m in matches:
        inputs = [m.x, add_initializer(g, nm, f"{m.name}.vitq_w_nk", m.w_nk.astype(np.int8)),
                  add_initializer(g, nm, f"{m.name}.vitq_w_scale", m.w_scale.astype(np.float32))]
        if m.bias is not None:
            inputs.append(add_initializer(g, nm, f"{m.name}.vitq_bias", m.bias))
        act = ({"act_dynamic": 1, **({"act_group": m.group} if m.group else {})} if m.dynamic
               else {"act_scale": m.act_scale})
        attrs = {"plugin_namespace": NAMESPACE, "plugin_version": VERSION, "act_bits": 4,
                 "weight_bits": m.weight_bits, **act}
        y = ir.Value(shape=m.output.shape, type=m.output.type)
        node = ir.node(QUANT_LINEAR_A4.name, inputs, attributes=attrs, domain=DOMAIN, outputs=[y],
                       name=nm(f"{m.name}.vitq_qlinear_a4"))
        # the module its activation quantizer belongs to travels on the plugin node, so that the expanded graph
        # names that quantizer again (vitq.quant.forced finds quantizers by it)
        module = next((n.metadata_props[META_MODULE] for n in m.maybe_dead
                       if n.metadata_props.get(META_ROLE) == "input" and META_MODULE in n.metadata_props), None)
        if module:
            node.metadata_props[META_MODULE] = module
        g.insert_before(m.remove[0], node)
        out_name = m.output.name
        m.output.replace_all_uses_with(y, replace_graph_outputs=True)
        for r in reversed(m.remove):  # the Add (reads the MatMul) first
            _detach(g, r, freed)
        m.output.name = None
        y.name = out_name
        dead.extend(m.maybe_dead)
    changed = True
    while changed:  # the replaced chains, as far as nothing else reads them
        changed = False
        for n in dead:
            if n.graph is g and not any(o.uses() or o.is_graph_output() for o in n.outputs):
                _detach(g, n, freed)
                changed = True
    for v in freed:
        if v.name in g.initializers and g.initializers[v.name] is v and not v.uses() and not v.is_graph_output():
            del g.initializers[v.name]
    model.opset_imports.setdefault(DOMAIN, 1)
    return len(matches)


def lower_trt(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """:func:`lower_trt_graph` on a ``ModelProto``: returns (new model, rewrites); the input is not modified."""
    m = ir.serde.deserialize_model(model)
    n = lower_trt_graph(m)
    return ir.serde.serialize_model(m), n


class LowerTrt(GraphPass):
    NAME = "lower_trt"
    REQUIRES = frozenset({"qdq"})
    PROVIDES = frozenset({"trt_lowered"})
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        n = lower_trt_graph(model)
        self.stats = {"plugin_nodes": n}
        return ir.passes.PassResult(model, modified=n > 0)




class DynamicQdqFloat(GraphPass):
    """Dynamic per-token activation quantizers that no plugin took (MixA-Q's dynamic low branch: the attention
    operands, 8-bit chains) become float arithmetic on the same per-token scale and zero point
    (:func:`vitq.passes.dynamic_qdq.float_dynamic_qdq`): TensorRT has no blocked activation Q/DQ, and runs these as
    element-wise ops with the consuming matmul in float (``trt_check``: ``DYNAMIC_ACT_FLOAT``). Exact (checked
    numerically by the pass manager)."""

    NAME = "dynamic_qdq_float"
    REQUIRES = frozenset({"qdq"})
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .dynamic_qdq import float_dynamic_qdq

        n = float_dynamic_qdq(model.graph)
        drop_unused_initializers(model.graph)
        self.stats = {"dynamic_quantizers_as_float": n}
        return ir.passes.PassResult(model, modified=n > 0)


class ClipSub8Activations(GraphPass):
    """Sub-8-bit activation quantizers that no plugin took (attention-matmul operands at 4 bits, 6-bit inputs, ...)
    become ``Clip(x, qmin*s, qmax*s) -> QuantizeLinear(int8, s) -> DequantizeLinear``: the same grid, so the same
    function bit for bit, in the form TensorRT fuses into an int8 GEMM (a Clip on the *integer* tensor between Q
    and DQ, or an INT4 activation Q, it cannot build). They run as int8 kernels: correct, without sub-8-bit speed,
    which ``trt_check`` reports as a warning (``SUB8_ACT_AS_INT8``).

    Exactness: for ``x`` inside ``[qmin*s, qmax*s]`` nothing changes; outside, ``fl(qmax*s)/s`` rounds to ``qmax``
    (it is within an ulp of it), which is what saturating ``round(x/s)`` to ``qmax`` gives. Checked numerically by
    the pass manager (``exact``).
    """

    NAME = "clip_sub8_activations"
    REQUIRES = frozenset({"qdq"})
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import numpy as np

        from .irutil import META_BITS, Namer, add_initializer, const_array, consumers

        g = model.graph
        nm = Namer(g)
        n_rew = 0
        for q in [n for n in g if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]:
            zp_v = q.inputs[2] if len(q.inputs) > 2 else None
            s = const_array(q.inputs[1])
            zp = const_array(zp_v)
            if zp_v is None or s is None or zp is None or s.size != 1 or np.any(zp.astype(np.int64) != 0):
                continue
            users = consumers(q.outputs[0])
            if zp_v.dtype == ir.DataType.INT4:
                bits, lo, hi = 4, -8, 7
                dqs = users
            elif zp_v.dtype == ir.DataType.INT8 and users and all(u.op_type == "Clip" for u in users):
                clip = users[0]
                lo_a, hi_a = const_array(clip.inputs[1]), const_array(clip.inputs[2])
                if lo_a is None or hi_a is None:
                    continue
                lo, hi = int(lo_a), int(hi_a)
                bits = int(q.metadata_props.get(META_BITS, 0)) or None
                dqs = [d for c in users for d in consumers(c.outputs[0])]
            else:
                continue
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
                continue
            x = q.inputs[0]
            meta = dict(q.metadata_props)
            meta[META_LOWERED] = "clip_int8"
            if bits:
                meta[META_BITS] = str(bits)
            base = q.name or "act"
            scale = q.inputs[1]
            s32 = np.float32(s.reshape(()))
            lo_f = add_initializer(g, nm, f"{base}.clip_min", np.array(np.float32(lo) * s32, dtype=np.float32))
            hi_f = add_initializer(g, nm, f"{base}.clip_max", np.array(np.float32(hi) * s32, dtype=np.float32))
            zp8 = add_initializer(g, nm, f"{base}.zero_point_i8", np.array(0, dtype=np.int8), ir.DataType.INT8)
            c_out = ir.Value(name=nm(f"{base}.clipped"), shape=x.shape, type=x.type)
            q_out = ir.Value(name=nm(f"{base}.q8"), shape=x.shape, type=ir.TensorType(ir.DataType.INT8))
            d_out = ir.Value(name=nm(f"{base}.dq8"), shape=x.shape, type=ir.TensorType(ir.DataType.FLOAT))
            new = [ir.node("Clip", [x, lo_f, hi_f], outputs=[c_out], name=nm(f"{base}/ClipFloat"),
                           metadata_props=dict(meta)),
                   ir.node("QuantizeLinear", [c_out, scale, zp8], outputs=[q_out], name=nm(f"{base}/Int8"),
                           metadata_props=dict(meta)),
                   ir.node("DequantizeLinear", [q_out, scale, zp8], outputs=[d_out], name=nm(f"{base}/Int8DQ"),
                           metadata_props=dict(meta))]
            g.insert_before(q, new)
            for d in dqs:
                d.outputs[0].replace_all_uses_with(d_out)
            dead = list(dict.fromkeys(dqs + [u for u in users if u not in dqs] + [q]))
            for n in dead:  # detach first: a removed node must not stay a user of its inputs
                for i in range(len(n.inputs)):
                    n.replace_input_with(i, None)
                g.remove(n, safe=False)
            n_rew += 1
        drop_unused_initializers(g)
        self.stats = {"activations_clipped_to_int8": n_rew}
        return ir.passes.PassResult(model, modified=n_rew > 0)
