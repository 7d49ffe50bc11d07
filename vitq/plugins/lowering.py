"""Late lowering between standard ONNX and vitq plugin nodes (plain functions over ``onnx.ModelProto``).

Standard ONNX with Q/DQ is the canonical IR. :func:`lower_trt` is the last step before handing a model to
TensorRT: it replaces the W4A4/W8A4 linear pattern, which TensorRT cannot run natively (no int4 activations), by one
``QuantLinearA4`` plugin node. :func:`expand_plugins` is its inverse, back to standard ONNX opset 21, so that
onnxruntime (or any ONNX tool) can run a lowered model; ``lower_trt`` followed by ``expand_plugins`` computes the same
function as the original graph (checked numerically in ``tests/test_plugins_lowering.py``).

How TensorRT's ONNX parser finds the plugin: a node whose op_type is not a built-in importer goes to the parser's
fallback plugin importer, which looks up a plugin creator by ``(op_type, plugin_version attr, plugin_namespace attr)``
in the plugin registry and passes the remaining node attributes as ``PluginField`` s (FLOAT -> kFLOAT32, INT ->
kINT32, STRING -> kCHAR); initializer inputs become constant tensors. The domain is not used for the lookup; we put
the node in the custom domain ``trt.plugins`` so no ONNX tool mistakes it for a standard op.

Patterns lowered (everything else, including int8-activation Q/DQ, stays native)::

    X -> QuantizeLinear(s_a, zp: INT4 scalar 0) -> DequantizeLinear(s_a, 0) --+
    W (INT4|INT8 initializer [K,N]) -> DequantizeLinear(w_s [N], axis=1) -----+-> MatMul [-> Add(bias [N])]

    ... or the same into Gemm(A, B, C?) with transA=0, alpha=beta=1, where transB=1 means W is [N,K] and the
    weight DequantizeLinear is per-axis over axis 0 (transB=0: W [K,N], axis 1).

The plugin node stores W as an int8 initializer [N, K] (one int8 per weight, int4 values in [-8, 7]); the TensorRT
plugin packs it for the CUDA kernel (two int4 per byte, see docs/plugins.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from ..passes.dynamic_qdq import dynamic_qdq_protos
from .specs import ACT_GROUPS, DOMAIN, DYN_EPS, DYN_LEVELS, NAMESPACE, QUANT_LINEAR_A4, VERSION, qrange

_INT_TYPES = {TensorProto.INT4: 4, TensorProto.INT8: 8}


class _Index:
    """Producer/consumer/constant lookups over a graph (rebuilt after each rewrite batch)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in graph.output}

    def const(self, name: str) -> tuple[np.ndarray, int] | None:
        """(value, onnx elem type) of an initializer or Constant-node output; None if not constant."""
        if not name:
            return None
        t = self.inits.get(name)
        if t is None:
            p = self.producer.get(name)
            if p is None or p.op_type != "Constant" or p.domain not in ("", "ai.onnx"):
                return None
            attrs = {a.name: a for a in p.attribute}
            if "value" not in attrs:
                return None
            t = attrs["value"].t
        arr = numpy_helper.to_array(t)
        if t.data_type == TensorProto.INT4:
            arr = arr.astype(np.int8)
        return arr, t.data_type

    def single_consumer(self, name: str) -> onnx.NodeProto | None:
        c = self.consumers.get(name, [])
        if len(c) != 1 or name in self.graph_outputs:
            return None
        return c[0]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _is_std(node: onnx.NodeProto | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


@dataclass
class _Match:
    x: str
    act_scale: float
    w_nk: np.ndarray  # int8 [N, K]
    weight_bits: int
    w_scale: np.ndarray  # float32 [N]
    bias: np.ndarray | None
    output: str
    remove: list  # nodes replaced outright (MatMul/Gemm, Add)
    maybe_dead: list  # Q, DQ, weight DQ: removed if nothing else uses them
    name: str
    dynamic: bool = False  # per-row dynamic activation quantizer (act_dynamic=1)
    group: int = 0  # with dynamic: one grid per this many features of a row (act_group)


def _match_act_int4(ix: _Index, name: str) -> tuple[str, float, list] | None:
    """``name`` = DequantizeLinear(QuantizeLinear(x, s, zp=int4 0), s, 0), per-tensor: (x, s, [q, dq])."""
    dq = ix.producer.get(name)
    if not _is_std(dq, "DequantizeLinear"):
        return None
    q = ix.producer.get(dq.input[0])
    if not _is_std(q, "QuantizeLinear"):
        return None
    qa, dqa = _attrs(q), _attrs(dq)
    if qa.get("block_size", 0) or dqa.get("block_size", 0):
        return None
    # the quantized type: from the zero point, else (opset 21) the output_dtype attribute
    zp = ix.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if zp is not None:
        if zp[1] != TensorProto.INT4 or np.any(zp[0] != 0):
            return None
    elif qa.get("output_dtype", 0) != TensorProto.INT4:
        return None
    s = ix.const(q.input[1])
    if s is None or s[0].size != 1 or s[1] != TensorProto.FLOAT:
        return None
    s2 = ix.const(dq.input[1])
    if s2 is None or s2[0].size != 1 or np.float32(s2[0].reshape(())) != np.float32(s[0].reshape(())):
        return None
    dzp = ix.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if len(dq.input) > 2 and dq.input[2] and (dzp is None or np.any(dzp[0] != 0)):
        return None
    scale = float(np.float32(s[0].reshape(())))
    if not scale > 0:
        return None
    return q.input[0], scale, [q, dq]


def _match_weight(ix: _Index, name: str, w_is_kn: bool) -> tuple[np.ndarray, int, np.ndarray, onnx.NodeProto] | None:
    """``name`` = DequantizeLinear(W int4/int8 const, per-axis (or per-tensor) scale, zp 0):
    (W as int8 [N, K], bits, scale [N], dq node)."""
    dq = ix.producer.get(name)
    if not _is_std(dq, "DequantizeLinear"):
        return None
    a = _attrs(dq)
    if a.get("block_size", 0):
        return None
    w = ix.const(dq.input[0])
    if w is None or w[1] not in _INT_TYPES or w[0].ndim != 2:
        return None
    bits = _INT_TYPES[w[1]]
    w_nk = (w[0].T if w_is_kn else w[0]).astype(np.int8)
    n = w_nk.shape[0]
    s = ix.const(dq.input[1])
    if s is None or s[1] != TensorProto.FLOAT:
        return None
    if len(dq.input) > 2 and dq.input[2]:
        zp = ix.const(dq.input[2])
        if zp is None or np.any(zp[0] != 0):
            return None
    if s[0].size == 1:
        w_scale = np.full(n, s[0].reshape(()), np.float32)
    else:
        axis = a.get("axis", 1)
        axis = axis + 2 if axis < 0 else axis
        if s[0].ndim != 1 or s[0].size != n or axis != (1 if w_is_kn else 0):
            return None
        w_scale = s[0].astype(np.float32)
    return w_nk, bits, w_scale, dq


def _bias_const(ix: _Index, name: str, n: int) -> np.ndarray | None:
    b = ix.const(name)
    if b is None or b[1] != TensorProto.FLOAT or b[0].size != n or (b[0].ndim and b[0].shape[-1] != n):
        return None
    return b[0].reshape(n).astype(np.float32)


def _match_act_dynamic(ix: _Index, name: str, k: int) -> tuple[str, int, list] | None:
    """``name`` = the dynamic per-token uint4 Q/DQ chain of :func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes` over
    the last axis (block size ``k``), or its grouped form (block size G, reductions over ``Reshape(x, [0, ..., 0,
    k / G, G])`` without keepdims), every node and constant checked: (x, G or 0, [its nodes])."""
    dq = ix.producer.get(name)
    if not _is_std(dq, "DequantizeLinear") or len(dq.input) < 3:
        return None
    q = ix.producer.get(dq.input[0])
    if not _is_std(q, "QuantizeLinear") or list(q.input[1:3]) != list(dq.input[1:3]):
        return None
    block = _attrs(q).get("block_size", 0)
    group = 0 if block == k else block
    if group and (group not in ACT_GROUPS or k % group):
        return None
    for n in (q, dq):
        a = _attrs(n)
        if a.get("axis", 1) != -1 or a.get("block_size", 0) != block:
            return None
    x, s_name, z_name = q.input[0], q.input[1], q.input[2]

    def prod(v, op, n_in=None):
        p = ix.producer.get(v)
        return p if _is_std(p, op) and (n_in is None or len(p.input) == n_in) else None

    def is_const(v, value, dtype=TensorProto.FLOAT):
        c = ix.const(v)
        return c is not None and c[1] == dtype and c[0].size == 1 and np.float32(c[0].reshape(())) == np.float32(value)

    cast = prod(z_name, "Cast")
    if cast is None or _attrs(cast).get("to") != TensorProto.UINT4:
        return None
    rnd = prod(cast.input[0], "Round")
    neg = prod(rnd.input[0], "Neg") if rnd else None
    div_lo = prod(neg.input[0], "Div", 2) if neg else None
    if div_lo is None or div_lo.input[1] != s_name:
        return None
    smax = prod(s_name, "Max", 2)
    if smax is None or not is_const(smax.input[1], DYN_EPS):
        return None
    div_r = prod(smax.input[0], "Div", 2)
    if div_r is None or not is_const(div_r.input[1], DYN_LEVELS[4]):
        return None
    sub = prod(div_r.input[0], "Sub", 2)
    if sub is None or sub.input[1] != div_lo.input[0]:
        return None
    chain = [q, dq, cast, rnd, neg, div_lo, smax, div_r, sub]
    reduced = None  # what the reductions read: x, or (grouped) the Reshape of x
    for v, bound, red in ((sub.input[0], "Max", "ReduceMax"), (sub.input[1], "Min", "ReduceMin")):
        b = prod(v, bound, 2)
        r = prod(b.input[0], red, 2) if b else None
        if r is None or not is_const(b.input[1], 0.0) or _attrs(r).get("keepdims", 1) != (0 if group else 1):
            return None
        if reduced is None:
            reduced = r.input[0]
        if r.input[0] != reduced:
            return None
        axes = ix.const(r.input[1])
        if axes is None or axes[0].reshape(-1).tolist() != [-1]:
            return None
        chain += [b, r]
    if not group:
        return (x, 0, chain) if reduced == x else None
    rs = prod(reduced, "Reshape", 2)
    shape = ix.const(rs.input[1]) if rs else None
    if (rs is None or rs.input[0] != x or _attrs(rs).get("allowzero", 0) or shape is None
            or shape[1] != TensorProto.INT64):
        return None
    dims = shape[0].reshape(-1).tolist()
    if len(dims) < 3 or any(d != 0 for d in dims[:-2]) or dims[-2:] != [k // group, group]:
        return None
    return x, group, chain + [rs]


def _match(ix: _Index, node: onnx.NodeProto) -> _Match | None:
    if _is_std(node, "MatMul"):
        w_is_kn = True
    elif _is_std(node, "Gemm"):
        a = _attrs(node)
        if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            return None
        w_is_kn = not a.get("transB", 0)
    else:
        return None
    wt = _match_weight(ix, node.input[1], w_is_kn)
    if wt is None:
        return None
    w_nk, bits, w_scale, wdq = wt
    act = _match_act_int4(ix, node.input[0])
    group = 0
    if act is not None:
        x, act_scale, act_nodes = act
        dynamic = False
    else:
        dyn = _match_act_dynamic(ix, node.input[0], w_nk.shape[1])
        if dyn is None:
            return None
        (x, group, act_nodes), act_scale, dynamic = dyn, 0.0, True
    n = w_nk.shape[0]
    bias, out, remove = None, node.output[0], [node]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = _bias_const(ix, node.input[2], n)
        if bias is None:
            return None
    elif node.op_type == "MatMul":
        add = ix.single_consumer(node.output[0])
        if _is_std(add, "Add"):
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            b = _bias_const(ix, other, n)
            if b is not None:
                bias, out, remove = b, add.output[0], [node, add]
    return _Match(x, act_scale, w_nk, bits, w_scale, bias, out, remove, act_nodes + [wdq],
                  node.name or f"{node.op_type}_{out}", dynamic, group)


class _Names:
    def __init__(self, graph: onnx.GraphProto):
        self.used = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {
            o for n in graph.node for o in n.output} | {n.name for n in graph.node}

    def __call__(self, base: str) -> str:
        for i in itertools.count():
            cand = base if i == 0 else f"{base}_{i}"
            if cand not in self.used:
                self.used.add(cand)
                return cand
        raise AssertionError  # pragma: no cover


def _cleanup(graph: onnx.GraphProto, candidates: list[onnx.NodeProto], freed: set[str]) -> None:
    """Remove candidate nodes whose outputs are unused (repeat until stable), then the initializers named in
    ``freed`` or read by a removed node that nothing reads any more, and stale value_info."""
    cand_ids = {id(n) for n in candidates}
    freed = set(freed)
    changed = True
    while changed:
        changed = False
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for n in list(graph.node):
            if id(n) in cand_ids and not any(o in used for o in n.output):
                freed.update(n.input)
                graph.node.remove(n)
                changed = True
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in list(graph.initializer):
        if t.name in freed and t.name not in used:
            graph.initializer.remove(t)
    names = used | {o for n in graph.node for o in n.output}
    for vi in list(graph.value_info):
        if vi.name not in names:
            graph.value_info.remove(vi)


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for op in model.opset_import:
        if op.domain == domain:
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def lower_trt(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace int4-activation linear patterns by ``QuantLinearA4`` plugin nodes; returns (new model, rewrites).

    The input model is not modified. Subgraphs (If/Loop bodies) are not visited."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    ix = _Index(g)
    matches = [m for m in (_match(ix, n) for n in g.node) if m is not None]
    if not matches:
        return out, 0
    names = _Names(g)
    dead: list = []
    freed: set[str] = set()
    for m in matches:
        pos = list(g.node).index(m.remove[0])
        w_name = names(f"{m.name}.vitq_w_nk")
        s_name = names(f"{m.name}.vitq_w_scale")
        inputs = [m.x, w_name, s_name]
        g.initializer.append(numpy_helper.from_array(m.w_nk.astype(np.int8), w_name))
        g.initializer.append(numpy_helper.from_array(m.w_scale.astype(np.float32), s_name))
        if m.bias is not None:
            b_name = names(f"{m.name}.vitq_bias")
            g.initializer.append(numpy_helper.from_array(m.bias, b_name))
            inputs.append(b_name)
        act = ({"act_dynamic": 1, **({"act_group": m.group} if m.group else {})} if m.dynamic
               else {"act_scale": m.act_scale})
        node = helper.make_node(
            QUANT_LINEAR_A4.name, inputs, [m.output], name=names(f"{m.name}.vitq_qlinear_a4"), domain=DOMAIN,
            plugin_namespace=NAMESPACE, plugin_version=VERSION, act_bits=4, weight_bits=m.weight_bits, **act)
        for r in m.remove:
            freed.update(r.input)
            g.node.remove(r)
        g.node.insert(pos, node)
        dead.extend(m.maybe_dead)
    _cleanup(g, dead, freed)
    _ensure_opset(out, DOMAIN, 1)
    return out, len(matches)


def _is_plugin(node: onnx.NodeProto) -> bool:
    return node.op_type == QUANT_LINEAR_A4.name and (
        node.domain == DOMAIN or _attrs(node).get("plugin_namespace", b"") in (NAMESPACE, NAMESPACE.encode()))


def has_plugins(model: onnx.ModelProto) -> bool:
    """Whether the main graph has vitq plugin nodes (what :func:`expand_plugins` rewrites)."""
    return any(_is_plugin(n) for n in model.graph.node)


def _rank_of(model: onnx.ModelProto, name: str, ranks: dict[str, int]) -> int:
    """Rank of tensor ``name`` from the model's inputs / value_info, after ONNX shape inference (once, into
    ``ranks``). The grouped dynamic chain reshapes X to [..., K / G, G], which needs it."""
    if not ranks:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - fall back to what the model declares
            inferred = model
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                ranks[vi.name] = len(t.shape.dim)
        ranks.setdefault("", -1)  # mark as filled
    r = ranks.get(name, 0)
    if r < 2:
        raise InputError(f"QuantLinearA4 with act_group: the rank of its input {name!r} is unknown (needs >= 2)",
                         hint="run ONNX shape inference on the model first, or give the graph input a shape")
    return r


def expand_plugins(model: onnx.ModelProto, int4: str = "native") -> tuple[onnx.ModelProto, int]:
    """Rewrite every vitq plugin node back to standard ONNX opset 21; returns (new model, rewrites).

    ``int4="native"`` (default) emits INT4 QuantizeLinear/DequantizeLinear: onnxruntime 1.31 CPU runs them at opset
    21 (checked in the tests). ``int4="emulate"`` emits the bit-identical int8 form for runtimes without int4:
    QuantizeLinear(int8, zp 0) -> DequantizeLinear -> Clip(-8*s, 7*s) in float, and float32 weights folded
    from their DequantizeLinear (fl(w * w_scale), the very values DequantizeLinear produces). Rounding, saturating to [-128, 127] and clipping to [-8, 7] equals rounding and
    saturating to [-8, 7]; the float Clip equals the integer one exactly (see the comment in the code).
    """
    if int4 not in ("native", "emulate"):
        raise InputError(f"expand_plugins: int4 must be 'native' or 'emulate', got {int4!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    ix = _Index(g)
    names = _Names(g)
    freed: set[str] = set()
    count = n_dynamic = 0
    ranks: dict[str, int] = {}  # filled on first use by _rank_of (shape inference)
    default_opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    for node in list(g.node):
        if not _is_plugin(node):
            continue
        if (int4 == "native" or _attrs(node).get("act_dynamic", 0)) and default_opset < 21:
            raise InputError(f"{node.name}: expanding to INT4 QuantizeLinear needs opset >= 21 (model has "
                             f"{default_opset})", hint="use expand_plugins(model, int4='emulate')")
        try:
            a = QUANT_LINEAR_A4.resolve_attrs({k: v for k, v in _attrs(node).items()})
        except InputError as e:
            raise InputError(f"{node.name}: {e}") from None
        w = ix.const(node.input[1])
        if w is None or w[0].ndim != 2:
            raise InputError(f"{node.name}: QuantLinearA4 W_q must be a constant [N, K] tensor")
        w_nk = w[0].astype(np.int8)
        lo, hi = qrange(a["weight_bits"])
        if w_nk.min(initial=0) < lo or w_nk.max(initial=0) > hi:
            raise InputError(f"{node.name}: W_q values outside int{a['weight_bits']} range")
        n = w_nk.shape[0]
        base = node.name or "QuantLinearA4"
        p = lambda s: names(f"{base}.{s}")  # noqa: E731
        s_a, zp_a = p("act_scale"), p("act_zp")
        q, qc, xd = p("xq"), p("xq_clip"), p("xdq")
        w_name, ws_name, wzp_name, wd, mm = p("w_kn"), p("w_scale"), p("w_zp"), p("wdq"), p("matmul")
        native = int4 == "native"
        w_kn = np.ascontiguousarray(w_nk.T)
        w_scale = ix.const(node.input[2])[0].astype(np.float32).reshape(n)
        new_inits = []
        if native:
            new_inits.append(numpy_helper.from_array(w_scale, ws_name))
        if a["weight_bits"] == 4 and native:
            new_inits += [numpy_helper.from_array(w_kn.astype(ml_dtypes.int4), w_name),
                          numpy_helper.from_array(np.zeros(n, ml_dtypes.int4), wzp_name)]
        elif native:
            new_inits += [numpy_helper.from_array(w_kn, w_name),
                          numpy_helper.from_array(np.zeros(n, np.int8), wzp_name)]
        else:
            # emulate: the weights pre-dequantized, fl(w * s) exactly as DequantizeLinear computes it. (With an int8
            # weight DequantizeLinear, onnxruntime 1.31 at ORT_ENABLE_ALL fuses DQ(W)+MatMul into a *dynamically
            # re-quantized* int8 MatMul, which changes the result by ~1e-3.)
            new_inits.append(numpy_helper.from_array(w_kn.astype(np.float32) * w_scale[None, :], wd))
        if a["act_dynamic"]:
            # the per-row (per-group) uint4 chain, from the one builder insert_qdq uses; emulate: made float below
            rank = 0
            if a["act_group"]:
                if w_nk.shape[1] % a["act_group"]:
                    raise InputError(f"{node.name}: K={w_nk.shape[1]} is not a multiple of act_group="
                                     f"{a['act_group']}")
                rank = _rank_of(model, node.input[0], ranks)
            nodes, inits, xd = dynamic_qdq_protos(node.input[0], w_nk.shape[1], 4, f"{base}.act", names.used,
                                                  group=a["act_group"], rank=rank)
            new_inits += inits
            n_dynamic += 1
        else:
            new_inits.append(numpy_helper.from_array(np.array(a["act_scale"], np.float32), s_a))
            new_inits.append(numpy_helper.from_array(np.array(0, ml_dtypes.int4 if native else np.int8), zp_a))
            nodes = [helper.make_node("QuantizeLinear", [node.input[0], s_a, zp_a], [q], name=p("QuantizeLinear"))]
            if native:
                nodes.append(helper.make_node("DequantizeLinear", [q, s_a, zp_a], [xd], name=p("DequantizeLinear")))
            else:
                # Clip in float after the DequantizeLinear: fl(q*s) is monotone in q and fl(-8*s) / fl(7*s) are
                # exactly the dequantized ends, so this equals DequantizeLinear(clip(q, -8, 7)). (An int8 Clip
                # between Q and DQ is equivalent too, but onnxruntime 1.31's QDQ MatMul fusion fails on that form.)
                lo_c, hi_c = p("clip_lo"), p("clip_hi")
                sa32 = np.float32(a["act_scale"])
                new_inits += [numpy_helper.from_array(np.array(np.float32(-8) * sa32, np.float32), lo_c),
                              numpy_helper.from_array(np.array(np.float32(7) * sa32, np.float32), hi_c)]
                nodes += [helper.make_node("DequantizeLinear", [q, s_a, zp_a], [qc], name=p("DequantizeLinear")),
                          helper.make_node("Clip", [qc, lo_c, hi_c], [xd], name=p("Clip"))]
        if native:
            nodes.append(helper.make_node("DequantizeLinear", [w_name, ws_name, wzp_name], [wd], axis=1,
                                          name=p("DequantizeLinear_w")))
        has_bias = len(node.input) > 3 and node.input[3]
        nodes.append(helper.make_node("MatMul", [xd, wd], [mm if has_bias else node.output[0]], name=p("MatMul")))
        if has_bias:
            b = ix.const(node.input[3])
            if b is None:
                raise InputError(f"{node.name}: QuantLinearA4 bias must be a constant [N] tensor")
            b_name = p("bias")
            new_inits.append(numpy_helper.from_array(b[0].astype(np.float32).reshape(n), b_name))
            nodes.append(helper.make_node("Add", [mm, b_name], [node.output[0]], name=p("Add")))
        pos = list(g.node).index(node)
        freed.update(node.input)
        g.node.remove(node)
        for i, nn in enumerate(nodes):
            g.node.insert(pos + i, nn)
        g.initializer.extend(new_inits)
        count += 1
    if count:
        _cleanup(g, [], freed)
        if not any(n.domain == DOMAIN for n in g.node):
            for op in list(out.opset_import):
                if op.domain == DOMAIN:
                    out.opset_import.remove(op)
    if n_dynamic and int4 == "emulate":
        import onnx_ir as ir

        from ..passes.dynamic_qdq import float_dynamic_qdq

        m = ir.serde.deserialize_model(out)
        float_dynamic_qdq(m.graph)
        out = ir.serde.serialize_model(m)
    return out, count
