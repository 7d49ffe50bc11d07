"""Dynamic per-token activation Q/DQ in standard ONNX (opset 21): one builder shared by ``insert_qdq`` and
``split_windows_attn``.

The function is :func:`vitq.quant.functional.fake_quant_dynamic` over the feature ``axis``, op for op::

    lo = Min(ReduceMin(x, axis), 0)          hi = Max(ReduceMax(x, axis), 0)
    s  = Max(Div(Sub(hi, lo), 2^bits - 1), DYN_EPS)
    z  = Cast(Round(Neg(Div(lo, s))), uint{bits})
    y  = DequantizeLinear(QuantizeLinear(x, s, z, axis, block_size = dim), s, z, axis, block_size = dim)

Blocked quantization (one block = the whole feature axis) is how ONNX expresses a scale per token: ``s`` and ``z``
have ``x``'s shape with the feature axis reduced to 1. With a ``group`` size g (feature axis last), the reductions
run on ``Reshape(x, [..., dim / g, g])`` over its last axis without keepdims, so ``s`` and ``z`` have ``x``'s shape
with the feature axis reduced to ``dim / g``, and the Q/DQ pair uses ``block_size = g``. ONNX Runtime 1.31 runs it on CPU (uint4 and uint8), exactly
equal to the torch arithmetic. TensorRT has no blocked activation quantizer: for it, ``lower_trt`` turns a 4-bit
chain feeding a linear layer into a ``QuantLinearA4`` plugin node in its dynamic per-row mode, and
``dynamic_qdq_float`` rewrites the rest (attention operands, 8-bit chains) into exact float arithmetic
(:func:`float_dynamic_qdq`).

The log-sqrt(2) grid (recipe ``"dynamic": "log_sqrt2"``, the post-softmax operand) is not affine, so it has no
Q/DQ pair: :func:`log_sqrt2_nodes` builds :func:`vitq.quant.functional.fake_quant_log_sqrt2` from standard float
ops (``ReduceMax``, ``Div``, ``Less`` against float32 thresholds, ``ReduceSum``, ``Gather`` of the levels,
``Mul``). Every step is exact in float32 or a comparison, so it equals the torch function bit for bit, and
TensorRT runs it as is (element-wise ops before a float matmul).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..recipe.schema import DYN_EPS, log_sqrt2_grid
from .infra import GraphPassError
from .irutil import Namer, add_initializer
from ..format import NODE_DYNAMIC as META_DYNAMIC, NODE_LOWERED

F32 = ir.DataType.FLOAT


def _utype(bits: int) -> ir.DataType:
    if bits == 4:
        return ir.DataType.UINT4
    if bits == 8:
        return ir.DataType.UINT8
    raise GraphPassError(f"dynamic activation quantizers are 4 or 8 bits, not {bits}")


class _Emit:
    """Appends nodes (with ``meta``) and initializers named under ``base`` for one quantizer's chain."""

    def __init__(self, g: ir.Graph, nm: Namer, base: str, meta: dict[str, str]):
        self.g, self.nm, self.base, self.meta = g, nm, base, meta
        self.nodes: list[ir.Node] = []

    def c(self, name: str, arr) -> ir.Value:
        return add_initializer(self.g, self.nm, f"{self.base}.{name}", np.asarray(arr))

    def op(self, op_type: str, inputs, name: str, dtype=F32, **attrs) -> ir.Value:
        out = ir.Value(name=self.nm(f"{self.base}.{name}"), type=ir.TensorType(dtype))
        self.nodes.append(ir.node(op_type, list(inputs), attributes=attrs or None, outputs=[out],
                                  name=self.nm(f"{self.base}/{op_type}"), metadata_props=dict(self.meta)))
        return out


def dynamic_qdq_nodes(g: ir.Graph, nm: Namer, x: ir.Value, bits: int, axis: int, base: str,
                      meta: dict[str, str], group: int = 0) -> tuple[list[ir.Node], ir.Value]:
    """The nodes (in order, not yet inserted) of a dynamic per-token Q/DQ of ``x`` over ``axis`` (per ``group``
    consecutive features when ``group`` > 0: ``axis`` must then be the last), and its output. ``x``'s size along
    ``axis`` must be static (the block size)."""
    qt = _utype(bits)
    shape = x.shape
    if shape is None or not isinstance(shape[axis], int):
        raise GraphPassError(f"{base}: dynamic quantization needs a static size along axis {axis} of {x.name} "
                             f"(shape {shape})")
    block = int(shape[axis])
    if group and (axis not in (-1, len(shape) - 1) or block % group):
        raise GraphPassError(f"{base}: grouped dynamic quantization needs the feature axis last and its size "
                             f"({block}) a multiple of the group size {group}")
    e = _Emit(g, nm, base, {**meta, META_DYNAMIC: "token"})
    c, op, nodes = e.c, e.op, e.nodes
    axes = c("dyn_axes", np.array([axis], np.int64))
    zero = c("dyn_zero", np.array(0.0, np.float32))
    red, keep = x, 1
    if group:
        red = op("Reshape", [x, c("dyn_group_shape", np.array([0] * (len(shape) - 1) + [block // group, group],
                                                               np.int64))], "dyn_groups")
        red.shape = ir.Shape([*list(shape)[:-1], block // group, group])
        keep, block = 0, group
    lo = op("Min", [op("ReduceMin", [red, axes], "dyn_min", keepdims=keep), zero], "dyn_lo")
    hi = op("Max", [op("ReduceMax", [red, axes], "dyn_max", keepdims=keep), zero], "dyn_hi")
    rng = op("Div", [op("Sub", [hi, lo], "dyn_range"), c("dyn_levels", np.array((1 << bits) - 1, np.float32))],
             "dyn_scale0")
    s = op("Max", [rng, c("dyn_eps", np.array(DYN_EPS, np.float32))], "dyn_scale")
    z = op("Cast", [op("Round", [op("Neg", [op("Div", [lo, s], "dyn_lo_steps")], "dyn_neg")], "dyn_zf")],
           "dyn_zero_point", dtype=qt, to=qt)
    q = op("QuantizeLinear", [x, s, z], "dyn_q", dtype=qt, axis=axis, block_size=block)
    y = op("DequantizeLinear", [q, s, z], "dyn_dq", axis=axis, block_size=block)
    y.shape = shape
    return nodes, y


def log_sqrt2_nodes(g: ir.Graph, nm: Namer, x: ir.Value, bits: int, base: str, meta: dict[str, str]
                    ) -> tuple[list[ir.Node], ir.Value]:
    """The nodes (in order, not yet inserted) of a per-row (last axis) log-sqrt(2) quantize-dequantize of ``x``
    relative to the row max (see the module docstring), and its output."""
    if bits not in (4, 8):
        raise GraphPassError(f"{base}: log_sqrt2 activation quantizers are 4 or 8 bits, not {bits}")
    th, lv = log_sqrt2_grid(bits)
    e = _Emit(g, nm, base, {**meta, META_DYNAMIC: "log_sqrt2"})
    c, op, nodes = e.c, e.op, e.nodes
    last = c("log_axes", np.array([-1], np.int64))
    m = op("Max", [op("ReduceMax", [x, last], "log_rowmax", keepdims=1), c("log_eps", np.array(DYN_EPS, np.float32))],
           "log_m")
    r = op("Div", [x, m], "log_ratio")
    below = op("Less", [op("Unsqueeze", [r, last], "log_ratio_u"), c("log_thresholds", th)], "log_below",
               dtype=ir.DataType.BOOL)
    code = op("Cast", [op("ReduceSum", [op("Cast", [below], "log_below_f", to=F32), last], "log_code_f",
                          keepdims=0)], "log_code", dtype=ir.DataType.INT64, to=ir.DataType.INT64)
    y = op("Mul", [op("Gather", [c("log_levels", lv), code], "log_level", axis=0), m], "log_dq")
    y.shape = x.shape
    return nodes, y


def _levels(cast: ir.Node | None) -> int | None:
    """2^bits - 1 of the zero point's Cast (from its ``to``: value types need not be known)."""
    if cast is None or cast.op_type != "Cast" or "to" not in cast.attributes:
        return None
    return {ir.DataType.UINT4: 15, ir.DataType.UINT8: 255}.get(ir.DataType(cast.attributes["to"].as_int()))


def _grouped_input(q: ir.Node, x: ir.Value, s: ir.Value) -> ir.Value | None:
    """For a grouped quantizer built by :func:`dynamic_qdq_nodes`, the ``Reshape`` of ``x`` (to [..., dim / g, g])
    its reductions read; None for a per-token one (the reductions read ``x``). Found from the chain itself, so no
    shape need be known. Raises if the chain is not the builder's."""

    def prod(v, op):
        n = v.producer() if v is not None else None
        if n is None or n.op_type != op:
            raise GraphPassError(f"{q.name}: a dynamic quantizer not built by dynamic_qdq_nodes "
                                 f"(expected {op} before {v.name if v is not None else '?'})")
        return n

    sub = prod(prod(prod(s, "Max").inputs[0], "Div").inputs[0], "Sub")
    red = prod(prod(sub.inputs[0], "Max").inputs[0], "ReduceMax").inputs[0]
    if red is x:
        return None
    if prod(red, "Reshape").inputs[0] is not x:
        raise GraphPassError(f"{q.name}: the dynamic quantizer's reductions read neither {x.name} nor a Reshape of it")
    return red


def float_dynamic_qdq(g: ir.Graph) -> int:
    """Rewrite every dynamic quantizer's ``QuantizeLinear -> DequantizeLinear`` pair (as built by
    :func:`dynamic_qdq_nodes`) into float arithmetic on the same scale ``s`` and the float zero point ``zf`` (the
    ``Round`` before the ``Cast``)::

        y = Mul(Sub(Clip(Add(Round(Div(x, s)), zf), 0, 2^bits - 1), zf), s)

    (grouped: the same on the chain's ``Reshape(x, [..., dim / g, g])`` with ``s`` and ``zf`` unsqueezed over the
    group, reshaped back to ``x``'s shape.) Exact: ``x / s`` is the same float32 division QuantizeLinear does, everything up to the ``Mul`` is integer-valued
    and small, and the ``Mul`` is DequantizeLinear's ``(q - z) * s``. For runtimes without blocked (per-token) Q/DQ,
    e.g. TensorRT, which runs these as float element-wise ops. Returns the number of quantizers rewritten."""
    from .irutil import consumers

    nm = Namer(g)
    n_rew = 0
    for q in [n for n in g if n.op_type == "QuantizeLinear" and n.metadata_props.get(META_DYNAMIC)]:
        x, s, z = (list(q.inputs) + [None, None, None])[:3]
        cast = z.producer() if z is not None else None
        levels = _levels(cast)
        dqs = consumers(q.outputs[0])
        if (levels is None or not dqs
                or any(d.op_type != "DequantizeLinear" or d.inputs[1] is not s or d.inputs[2] is not z
                       for d in dqs)):
            raise GraphPassError(f"{q.name}: not a dynamic quantizer built by dynamic_qdq_nodes")
        zf = cast.inputs[0]
        meta = {**q.metadata_props, NODE_LOWERED: "dynamic_float"}
        base = q.name or "dyn"
        lo = add_initializer(g, nm, f"{base}.clip_lo", np.array(0.0, np.float32))
        hi = add_initializer(g, nm, f"{base}.clip_hi", np.array(float(levels), np.float32))
        new: list[ir.Node] = []
        red = _grouped_input(q, x, s)  # grouped: the chain's Reshape(x, [..., dim / g, g]); else None

        def op(op_type, inputs, name, shape="x", dtype=F32):  # shape "x": x's shape; None: unknown
            out = ir.Value(name=nm(f"{base}.{name}"), type=ir.TensorType(dtype), shape=x.shape if shape == "x" else shape)
            new.append(ir.node(op_type, inputs, outputs=[out], name=nm(f"{base}/{op_type}F"),
                               metadata_props=dict(meta)))
            return out

        if red is None:
            t = op("Round", [op("Div", [x, s], "steps")], "rounded")
            t = op("Clip", [op("Add", [t, zf], "shifted"), lo, hi], "clipped")
            y = op("Mul", [op("Sub", [t, zf], "centered"), s], "dq")
        else:  # the same on the grouped view, scale / zero point broadcast over each group, then x's shape again
            rsh = red.shape
            last = add_initializer(g, nm, f"{base}.last_axis", np.array([-1], np.int64))
            sg = op("Unsqueeze", [s, last], "scale_g", shape=None)
            zg = op("Unsqueeze", [zf, last], "zf_g", shape=None)
            t = op("Round", [op("Div", [red, sg], "steps", rsh)], "rounded", rsh)
            t = op("Clip", [op("Add", [t, zg], "shifted", rsh), lo, hi], "clipped", rsh)
            yg = op("Mul", [op("Sub", [t, zg], "centered", rsh), sg], "dq_g", rsh)
            y = op("Reshape", [yg, op("Shape", [x], "x_shape", ir.Shape([len(x.shape)]) if x.shape else None,
                                      ir.DataType.INT64)], "dq")
        g.insert_before(q, new)
        keep_name = None
        for d in dqs:
            if d.outputs[0].is_graph_output():
                keep_name = d.outputs[0].name
            d.outputs[0].replace_all_uses_with(y, replace_graph_outputs=True)
        dead = list(dqs) + [q] + ([cast] if all(u.node in dqs or u.node is q for u in z.uses()) else [])
        for n in dead:
            for i in range(len(n.inputs)):
                n.replace_input_with(i, None)
            g.remove(n, safe=False)
        if keep_name is not None:  # a graph output keeps its name
            for n in dqs:
                n.outputs[0].name = None
            y.name = keep_name
        n_rew += 1
    return n_rew
