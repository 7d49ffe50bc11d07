"""vitq plugin nodes back to standard ONNX (onnx and numpy only: the runtime imports this module).

:func:`expand_plugins` rewrites every ``QuantLinearA4`` node (made by the ``lower_trt`` pass,
:mod:`vitq.passes.lower_trt`) into its standard-ONNX opset 21 definition, so that ONNX Runtime (or any ONNX tool)
runs a graph compiled for TensorRT; ``lower_trt`` followed by ``expand_plugins`` computes the same function as the
original graph (checked numerically in ``tests/test_plugins_lowering.py`` and ``tests/test_plugins_dynamic.py``).

The dynamic per-row activation chain is built by :func:`dynamic_qdq_protos`, node for node the chain of
:func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes` (the same names, constants and attributes; a test compares the
two), written with ``onnx.helper`` so that the runtime needs no onnx-ir.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import InputError
from ..format import NODE_DYNAMIC as META_DYNAMIC, NODE_LOWERED, NODE_MODULE, NODE_ROLE
from .specs import DOMAIN, DYN_EPS, NAMESPACE, QUANT_LINEAR_A4, qrange

_UTYPES = {4: TensorProto.UINT4, 8: TensorProto.UINT8}


class Names:
    """Unique names within one graph (``base``, ``base_1``, ...): the scheme of :class:`vitq.passes.irutil.Namer`."""

    def __init__(self, used: set[str]):
        self.used = used

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> "Names":
        return cls({t.name for t in graph.initializer} | {i.name for i in graph.input} | {
            o for n in graph.node for o in n.output} | {n.name for n in graph.node} | {o.name for o in graph.output})

    def __call__(self, base: str) -> str:
        base = base or "v"
        name, i = base, 0
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Emit:
    """Nodes and initializers of one chain, named under ``base`` (as :class:`vitq.passes.dynamic_qdq._Emit`)."""

    def __init__(self, names: Names, base: str, meta: dict[str, str]):
        self.names, self.base, self.meta = names, base, meta
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def c(self, name: str, arr) -> str:
        t = numpy_helper.from_array(np.asarray(arr), self.names(f"{self.base}.{name}"))
        self.inits.append(t)
        return t.name

    def op(self, op_type: str, inputs, name: str, **attrs) -> str:
        out = self.names(f"{self.base}.{name}")
        n = helper.make_node(op_type, list(inputs), [out], name=self.names(f"{self.base}/{op_type}"), **attrs)
        for k, v in self.meta.items():
            n.metadata_props.add(key=k, value=v)
        self.nodes.append(n)
        return out


def dynamic_qdq_protos(x_name: str, k: int, bits: int, base: str, used: set[str], group: int = 0, rank: int = 0,
                       as_float: bool = False, meta: dict[str, str] | None = None
                       ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The dynamic per-token (per ``group`` features) Q/DQ chain over the last axis (static size ``k``) of the tensor
    named ``x_name``: (nodes in order, initializers, output name). With ``group`` > 0 the tensor's ``rank`` (>= 2)
    must be given (the chain reshapes it). New names avoid ``used``, which is updated. ``meta``: more metadata for
    every node (the quantizer's module and role).

    ``as_float``: the ``QuantizeLinear -> DequantizeLinear`` pair becomes the exact float arithmetic of
    :func:`vitq.passes.dynamic_qdq.float_dynamic_qdq` (for runtimes without blocked or 4-bit Q/DQ)."""
    if bits not in _UTYPES:
        raise InputError(f"{base}: dynamic activation quantizers are 4 or 8 bits, not {bits}")
    if group and rank < 2:
        raise InputError(f"{base}: a grouped dynamic chain needs the rank (>= 2) of {x_name}, got {rank}")
    if group and k % group:
        raise InputError(f"{base}: the feature size {k} is not a multiple of the group size {group}")
    qt = _UTYPES[bits]
    names = Names(used)
    names.used.add(x_name)
    e = _Emit(names, base, {META_DYNAMIC: "token", **(meta or {})})
    c, op = e.c, e.op
    axes = c("dyn_axes", np.array([-1], np.int64))
    zero = c("dyn_zero", np.array(0.0, np.float32))
    red, keep, block = x_name, 1, k
    if group:
        red = op("Reshape", [x_name, c("dyn_group_shape", np.array([0] * (rank - 1) + [k // group, group],
                                                                    np.int64))], "dyn_groups")
        keep, block = 0, group
    lo = op("Min", [op("ReduceMin", [red, axes], "dyn_min", keepdims=keep), zero], "dyn_lo")
    hi = op("Max", [op("ReduceMax", [red, axes], "dyn_max", keepdims=keep), zero], "dyn_hi")
    rng = op("Div", [op("Sub", [hi, lo], "dyn_range"), c("dyn_levels", np.array((1 << bits) - 1, np.float32))],
             "dyn_scale0")
    s = op("Max", [rng, c("dyn_eps", np.array(DYN_EPS, np.float32))], "dyn_scale")
    zf = op("Round", [op("Neg", [op("Div", [lo, s], "dyn_lo_steps")], "dyn_neg")], "dyn_zf")
    if not as_float:
        z = op("Cast", [zf], "dyn_zero_point", to=qt)
        q = op("QuantizeLinear", [x_name, s, z], "dyn_q", axis=-1, block_size=block)
        y = op("DequantizeLinear", [q, s, z], "dyn_dq", axis=-1, block_size=block)
    else:  # float_dynamic_qdq's form, op for op
        e.meta = {**e.meta, NODE_LOWERED: "dynamic_float"}
        clip_lo = c("clip_lo", np.array(0.0, np.float32))
        clip_hi = c("clip_hi", np.array(float((1 << bits) - 1), np.float32))
        if group:
            last = c("last_axis", np.array([-1], np.int64))
            s = op("Unsqueeze", [s, last], "scale_g")
            zf = op("Unsqueeze", [zf, last], "zf_g")
        t = op("Round", [op("Div", [red, s], "steps")], "rounded")
        t = op("Clip", [op("Add", [t, zf], "shifted"), clip_lo, clip_hi], "clipped")
        y = op("Mul", [op("Sub", [t, zf], "centered"), s], "dq_g" if group else "dq")
        if group:
            y = op("Reshape", [y, op("Shape", [x_name], "x_shape")], "dq")
    return e.nodes, e.inits, y


def is_plugin(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a vitq plugin node (by domain, or by the TensorRT plugin namespace attribute)."""
    return node.op_type == QUANT_LINEAR_A4.name and (
        node.domain == DOMAIN or _attrs(node).get("plugin_namespace", b"") in (NAMESPACE, NAMESPACE.encode()))


def has_plugins(model: onnx.ModelProto) -> bool:
    """Whether the main graph has vitq plugin nodes (what :func:`expand_plugins` rewrites)."""
    return any(is_plugin(n) for n in model.graph.node)


class _Consts:
    """Initializer and Constant-node values of a graph, by name (int4 widened to int8)."""

    def __init__(self, graph: onnx.GraphProto):
        self.tensors = {t.name: t for t in graph.initializer}
        for n in graph.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and "value" in _attrs(n):
                self.tensors.setdefault(n.output[0], _attrs(n)["value"])

    def __call__(self, name: str) -> np.ndarray | None:
        t = self.tensors.get(name) if name else None
        if t is None:
            return None
        arr = numpy_helper.to_array(t)
        return arr.astype(np.int8) if t.data_type == TensorProto.INT4 else arr


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


def _remove_unused(graph: onnx.GraphProto, freed: set[str]) -> None:
    """Drop the initializers named in ``freed`` that no node reads any more, and stale value_info."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in list(graph.initializer):
        if t.name in freed and t.name not in used:
            graph.initializer.remove(t)
    names = used | {o for n in graph.node for o in n.output}
    for vi in list(graph.value_info):
        if vi.name not in names:
            graph.value_info.remove(vi)


def expand_plugins(model: onnx.ModelProto, int4: str = "native") -> tuple[onnx.ModelProto, int]:
    """Rewrite every vitq plugin node back to standard ONNX opset 21; returns (new model, rewrites). The input model
    is not modified.

    ``int4="native"`` (default) emits INT4 QuantizeLinear/DequantizeLinear: onnxruntime 1.31 CPU runs them at opset
    21 (checked in the tests). ``int4="emulate"`` emits the bit-identical form for runtimes without int4 or blocked
    Q/DQ: QuantizeLinear(int8, zp 0) -> DequantizeLinear -> Clip(-8*s, 7*s) in float, float32 weights folded from
    their DequantizeLinear (fl(w * w_scale), the very values DequantizeLinear produces), and the dynamic per-row
    chain as float arithmetic. Rounding, saturating to [-128, 127] and clipping to [-8, 7] equals rounding and
    saturating to [-8, 7]; the float Clip equals the integer one exactly (see the comment in the code).
    """
    if int4 not in ("native", "emulate"):
        raise InputError(f"expand_plugins: int4 must be 'native' or 'emulate', got {int4!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = Names.of(g)
    const = _Consts(g)
    freed: set[str] = set()
    count = 0
    ranks: dict[str, int] = {}  # filled on first use by _rank_of (shape inference)
    default_opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    native = int4 == "native"
    for node in list(g.node):
        if not is_plugin(node):
            continue
        if (native or _attrs(node).get("act_dynamic", 0)) and default_opset < 21:
            raise InputError(f"{node.name}: expanding to INT4 QuantizeLinear needs opset >= 21 (model has "
                             f"{default_opset})", hint="use expand_plugins(model, int4='emulate')")
        try:
            a = QUANT_LINEAR_A4.resolve_attrs(_attrs(node))
        except InputError as e:
            raise InputError(f"{node.name}: {e}") from None
        w = const(node.input[1])
        if w is None or w.ndim != 2:
            raise InputError(f"{node.name}: QuantLinearA4 W_q must be a constant [N, K] tensor")
        w_nk = w.astype(np.int8)
        lo, hi = qrange(a["weight_bits"])
        if w_nk.min(initial=0) < lo or w_nk.max(initial=0) > hi:
            raise InputError(f"{node.name}: W_q values outside int{a['weight_bits']} range")
        n = w_nk.shape[0]
        base = node.name or "QuantLinearA4"
        p = lambda s: names(f"{base}.{s}")  # noqa: E731
        s_a, zp_a = p("act_scale"), p("act_zp")
        q, qc, xd = p("xq"), p("xq_clip"), p("xdq")
        w_name, ws_name, wzp_name, wd, mm = p("w_kn"), p("w_scale"), p("w_zp"), p("wdq"), p("matmul")
        w_kn = np.ascontiguousarray(w_nk.T)
        w_scale = const(node.input[2]).astype(np.float32).reshape(n)
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
        # the activation quantizer's nodes named by the plugin node's module (what lower_trt put there)
        module = next((p_.value for p_ in node.metadata_props if p_.key == NODE_MODULE), None)
        act_meta = {NODE_MODULE: module, NODE_ROLE: "input"} if module else {}
        if a["act_dynamic"]:
            # the per-row (per-group) uint4 chain, node for node insert_qdq's; emulate: its float form
            rank = 0
            if a["act_group"]:
                if w_nk.shape[1] % a["act_group"]:
                    raise InputError(f"{node.name}: K={w_nk.shape[1]} is not a multiple of act_group="
                                     f"{a['act_group']}")
                rank = _rank_of(model, node.input[0], ranks)
            nodes, inits, xd = dynamic_qdq_protos(node.input[0], w_nk.shape[1], 4, f"{base}.act", names.used,
                                                  group=a["act_group"], rank=rank, as_float=not native,
                                                  meta=act_meta)
            new_inits += inits
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
            for n_ in nodes:
                for k_, v_ in act_meta.items():
                    n_.metadata_props.add(key=k_, value=v_)
        if native:
            nodes.append(helper.make_node("DequantizeLinear", [w_name, ws_name, wzp_name], [wd], axis=1,
                                          name=p("DequantizeLinear_w")))
        has_bias = len(node.input) > 3 and node.input[3]
        nodes.append(helper.make_node("MatMul", [xd, wd], [mm if has_bias else node.output[0]], name=p("MatMul")))
        if has_bias:
            b = const(node.input[3])
            if b is None:
                raise InputError(f"{node.name}: QuantLinearA4 bias must be a constant [N] tensor")
            b_name = p("bias")
            new_inits.append(numpy_helper.from_array(b.astype(np.float32).reshape(n), b_name))
            nodes.append(helper.make_node("Add", [mm, b_name], [node.output[0]], name=p("Add")))
        pos = list(g.node).index(node)
        freed.update(node.input)
        g.node.remove(node)
        for i, nn in enumerate(nodes):
            g.node.insert(pos + i, nn)
        g.initializer.extend(new_inits)
        count += 1
    if count:
        _remove_unused(g, freed)
        if not any(n.domain == DOMAIN for n in g.node):
            for op in list(out.opset_import):
                if op.domain == DOMAIN:
                    out.opset_import.remove(op)
    return out, count
