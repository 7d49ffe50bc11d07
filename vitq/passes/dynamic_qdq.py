"""Dynamic per-token activation Q/DQ in standard ONNX (opset 21): one builder shared by ``insert_qdq`` and
``split_windows_attn``.

The function is :func:`vitq.quant.functional.fake_quant_dynamic` over the feature ``axis``, op for op::

    lo = Min(ReduceMin(x, axis), 0)          hi = Max(ReduceMax(x, axis), 0)
    s  = Max(Div(Sub(hi, lo), 2^bits - 1), DYN_EPS)
    z  = Cast(Round(Neg(Div(lo, s))), uint{bits})
    y  = DequantizeLinear(QuantizeLinear(x, s, z, axis, block_size = dim), s, z, axis, block_size = dim)

Blocked quantization (one block = the whole feature axis) is how ONNX expresses a scale per token: ``s`` and ``z``
have ``x``'s shape with the feature axis reduced to 1. ONNX Runtime 1.31 runs it on CPU (uint4 and uint8), exactly
equal to the torch arithmetic. TensorRT has no such int4 quantizer (``trt_check`` reports ``DYNAMIC_ACTIVATION``).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..recipe.schema import DYN_EPS
from .infra import GraphPassError
from .irutil import Namer, add_initializer

META_DYNAMIC = "vitq.dynamic"  # "token" on every node of a dynamic quantizer
F32 = ir.DataType.FLOAT


def _utype(bits: int) -> ir.DataType:
    if bits == 4:
        return ir.DataType.UINT4
    if bits == 8:
        return ir.DataType.UINT8
    raise GraphPassError(f"dynamic activation quantizers are 4 or 8 bits, not {bits}")


def dynamic_qdq_nodes(g: ir.Graph, nm: Namer, x: ir.Value, bits: int, axis: int, base: str,
                      meta: dict[str, str]) -> tuple[list[ir.Node], ir.Value]:
    """The nodes (in order, not yet inserted) of a dynamic per-token Q/DQ of ``x`` over ``axis``, and its output.
    ``x``'s size along ``axis`` must be static (the block size)."""
    qt = _utype(bits)
    shape = x.shape
    if shape is None or not isinstance(shape[axis], int):
        raise GraphPassError(f"{base}: dynamic quantization needs a static size along axis {axis} of {x.name} "
                             f"(shape {shape})")
    block = int(shape[axis])
    meta = {**meta, META_DYNAMIC: "token"}
    nodes: list[ir.Node] = []

    def c(name, arr):
        return add_initializer(g, nm, f"{base}.{name}", np.asarray(arr))

    def op(op_type, inputs, name, dtype=F32, **attrs):
        out = ir.Value(name=nm(f"{base}.{name}"), type=ir.TensorType(dtype))
        nodes.append(ir.node(op_type, list(inputs), attributes=attrs or None, outputs=[out],
                             name=nm(f"{base}/{op_type}"), metadata_props=dict(meta)))
        return out

    axes = c("dyn_axes", np.array([axis], np.int64))
    zero = c("dyn_zero", np.array(0.0, np.float32))
    lo = op("Min", [op("ReduceMin", [x, axes], "dyn_min", keepdims=1), zero], "dyn_lo")
    hi = op("Max", [op("ReduceMax", [x, axes], "dyn_max", keepdims=1), zero], "dyn_hi")
    rng = op("Div", [op("Sub", [hi, lo], "dyn_range"), c("dyn_levels", np.array((1 << bits) - 1, np.float32))],
             "dyn_scale0")
    s = op("Max", [rng, c("dyn_eps", np.array(DYN_EPS, np.float32))], "dyn_scale")
    z = op("Cast", [op("Round", [op("Neg", [op("Div", [lo, s], "dyn_lo_steps")], "dyn_neg")], "dyn_zf")],
           "dyn_zero_point", dtype=qt, to=qt)
    q = op("QuantizeLinear", [x, s, z], "dyn_q", dtype=qt, axis=axis, block_size=block)
    y = op("DequantizeLinear", [q, s, z], "dyn_dq", axis=axis, block_size=block)
    y.shape = shape
    return nodes, y
