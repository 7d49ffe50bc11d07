"""Analysis (read only): the quantizable sites of an exported graph, mapped to timm modules.

* ``linear``: ``MatMul(X, W)`` with a 2-D initializer ``W [in, out]`` (a Linear exported as ``X @ W^T``: output
  channels on axis 1), or ``Gemm(X, W)`` with an initializer ``W`` (``transB=1``: ``[out, in]``, axis 0).
* ``conv``: ``Conv(X, W)`` with an initializer ``W [out, in, kh, kw]`` (axis 0).
* ``attn_qk`` / ``attn_av``: the two activation-by-activation MatMuls of an attention module, identified
  structurally: ``q @ k^T`` is the MatMul whose output reaches a Softmax (through the bias / mask adds, scalings and
  reshapes of e.g. Swin's window attention); ``attn @ v`` is the MatMul whose first operand comes from a Softmax.

Sites are mapped to modules through the exporter's name-scope metadata (:func:`vitq.passes.irutil.module_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from .irutil import module_of, walk_backward, walk_forward

# ops between q@k^T and Softmax in timm attention variants (scale, rel-pos bias, window mask, reshapes)
_QK_TO_SOFTMAX = ("Add", "Mul", "Div", "Reshape", "Where", "Cast", "Unsqueeze", "Squeeze", "Transpose", "Identity")
_SOFTMAX_TO_AV = ("Reshape", "Cast", "Identity", "Dropout")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Site:
    kind: str                 # "linear" | "conv" | "attn_qk" | "attn_av" | "matmul" (unrecognized act x act)
    node: ir.Node
    module: str | None
    weight_index: int | None = None
    weight_axis: int | None = None  # output-channel axis of the *graph* weight tensor
    out_channels: int | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.op_type


def _initializer(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None


def _is_std(n: ir.Node) -> bool:
    return n.domain in ("", "ai.onnx")


def classify(node: ir.Node) -> Site | None:
    """The site a single node is, or None (not a GEMM/Conv)."""
    if not _is_std(node):
        return None
    mod = module_of(node)
    if node.op_type == "MatMul":
        a, b = node.inputs[0], node.inputs[1]
        if _initializer(b) and len(b.const_value.shape) == 2:
            return Site("linear", node, mod, 1, 1, int(b.const_value.shape[1]))
        if _initializer(a) or _initializer(b):
            return Site("matmul", node, mod)
        if any(n.op_type == "Softmax" for n in walk_forward(node.outputs[0], _QK_TO_SOFTMAX)):
            return Site("attn_qk", node, mod)
        p = walk_backward(a, _SOFTMAX_TO_AV)
        if p is not None and p.op_type == "Softmax":
            return Site("attn_av", node, mod)
        return Site("matmul", node, mod)
    if node.op_type == "Gemm":
        b = node.inputs[1]
        if _initializer(b) and len(b.const_value.shape) == 2:
            tb = node.attributes.get("transB")
            axis = 0 if (tb is not None and tb.as_int() == 1) else 1
            return Site("linear", node, mod, 1, axis, int(b.const_value.shape[axis]))
        return Site("matmul", node, mod)
    if node.op_type == "Conv":
        w = node.inputs[1]
        if _initializer(w):
            return Site("conv", node, mod, 1, 0, int(w.const_value.shape[0]))
        return Site("matmul", node, mod)
    return None


def find_sites(graph: ir.Graph) -> list[Site]:
    """All GEMM/Conv sites of a float graph, in graph order."""
    return [s for s in (classify(n) for n in graph) if s is not None]


def sites_by_module(sites: list[Site]) -> dict[str, list[Site]]:
    out: dict[str, list[Site]] = {}
    for s in sites:
        if s.module is not None:
            out.setdefault(s.module, []).append(s)
    return out


def has_qdq(graph: ir.Graph) -> bool:
    return any(n.op_type in QDQ_OPS for n in graph)


def gemm_input_producers(node: ir.Node) -> list[ir.Node | None]:
    return [v.producer() if v is not None else None for v in node.inputs[:2]]
