"""Small onnx-ir helpers shared by the passes (no pass logic here)."""

from __future__ import annotations

import itertools
from typing import Iterable

import numpy as np
import onnx_ir as ir

from ..onnx_meta import NAME_SCOPES_KEY, module_name as _proto_module_name
from ..plugins.expand import Names
from ..format import NODE_BITS as META_BITS, NODE_MODULE as META_MODULE, NODE_ROLE as META_ROLE
from ..format import NODE_SHIFT as META_SHIFT



class _Prop:
    __slots__ = ("key", "value")

    def __init__(self, key: str, value: str):
        self.key, self.value = key, value


class _PropsView:
    """Adapter so that :func:`vitq.exporter.onnx_export.module_name` (written for NodeProto) reads an ir.Node."""

    def __init__(self, props: dict[str, str]):
        self.metadata_props = [_Prop(k, v) for k, v in props.items() if k == NAME_SCOPES_KEY]


def module_of(node: ir.Node) -> str | None:
    """The timm module path a node came from, through the exporter's name-scope metadata (never node order)."""
    return _proto_module_name(_PropsView(node.metadata_props))


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value`` (an initializer, or a Constant node's output), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    prod = value.producer()
    if prod is not None and prod.op_type == "Constant" and prod.domain in ("", "ai.onnx"):
        attr = prod.attributes.get("value")
        if attr is not None:
            return attr.as_tensor().numpy()
    return None


class Namer(Names):
    """Unique value / node names within one onnx-ir graph (the naming scheme of :class:`vitq.plugins.expand.Names`,
    shared with the runtime's plugin expansion)."""

    def __init__(self, graph: ir.Graph):
        used: set[str] = set()
        for n in graph.all_nodes() if hasattr(graph, "all_nodes") else graph:
            if n.name:
                used.add(n.name)
            for v in n.outputs:
                if v.name:
                    used.add(v.name)
        for v in itertools.chain(graph.inputs, graph.outputs, graph.initializers.values()):
            if v.name:
                used.add(v.name)
        super().__init__(used)


def add_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray,
                    dtype: ir.DataType | None = None) -> ir.Value:
    """Register a new initializer (always a fresh one: passes never mutate an initializer in place, so one shared by
    several nodes cannot change behind another node's back)."""
    tensor = ir.tensor(array, dtype=dtype, name=namer(base)) if dtype is not None else \
        ir.tensor(array, name=namer(base))
    v = ir.Value(name=tensor.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                 const_value=tensor)
    graph.register_initializer(v)
    return v


def drop_unused_initializers(graph: ir.Graph) -> int:
    """Remove every initializer no node reads (and that is no graph input or output); returns how many. A pass that
    rewrites quantizers calls it last, so that no artifact carries dangling constants (ONNX Runtime warns about
    each one on load)."""
    dead = [name for name, v in graph.initializers.items()
            if not v.uses() and not v.is_graph_output() and not v.is_graph_input()]
    for name in dead:
        del graph.initializers[name]
    return len(dead)


def private_initializer(graph: ir.Graph, namer: Namer, node: ir.Node, index: int) -> ir.Value:
    """Copy-on-write: make ``node.inputs[index]`` an initializer used by this node only (copied when shared), and
    return it; a pass may then change it."""
    v = node.inputs[index]
    if v is None or v.const_value is None:
        raise ValueError(f"input {index} of {node.name} is not an initializer")
    if len(v.uses()) == 1 and not v.is_graph_output() and not v.is_graph_input():
        return v
    copy = add_initializer(graph, namer, f"{v.name}_copy", v.const_value.numpy().copy(), v.const_value.dtype)
    node.replace_input_with(index, copy)
    return copy


def nodes_of(graph: ir.Graph, *op_types: str) -> list[ir.Node]:
    return [n for n in graph if n.op_type in op_types and n.domain in ("", "ai.onnx")]


def consumers(value: ir.Value) -> list[ir.Node]:
    return [u.node for u in value.uses()]


def walk_forward(value: ir.Value, through: Iterable[str], max_depth: int = 6) -> Iterable[ir.Node]:
    """Nodes reachable from ``value`` through nodes whose op type is in ``through`` (breadth first, bounded)."""
    through = set(through)
    frontier, seen = [value], set()
    for _ in range(max_depth):
        nxt = []
        for v in frontier:
            for n in consumers(v):
                if id(n) in seen:
                    continue
                seen.add(id(n))
                yield n
                if n.op_type in through:
                    nxt.extend(n.outputs)
        frontier = nxt
        if not frontier:
            break


def walk_backward(value: ir.Value, through: Iterable[str], max_depth: int = 6) -> ir.Node | None:
    """The first producer up the chain of single-input pass-through ops (``through``) that is not one of them."""
    through = set(through)
    v = value
    for _ in range(max_depth):
        p = v.producer()
        if p is None:
            return None
        if p.op_type not in through:
            return p
        v = p.inputs[0]
    return None
