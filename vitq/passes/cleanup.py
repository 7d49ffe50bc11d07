"""Cleanup: constant folding (onnxscript's folder, never across Q/DQ), dead nodes and initializers, topological
order (onnx-ir's common passes)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common as irc

from .analysis import QDQ_OPS
from .infra import GraphPass

# Folding these would undo quantization (DQ of an int8 initializer -> float weights) or hide its integer grid.
_NEVER_FOLD = set(QDQ_OPS) | {"Clip"}


def _should_fold(node: ir.Node) -> bool | None:
    if node.op_type in _NEVER_FOLD:
        return False
    return None  # the folder's own default


class Cleanup(GraphPass):
    NAME = "cleanup"
    SEMANTICS = "float"

    def __init__(self, fold_constants: bool = True):
        super().__init__()
        self.fold = fold_constants

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        n0, i0 = model.graph.num_nodes(), len(model.graph.initializers)
        if self.fold:
            from onnxscript.optimizer import fold_constants

            res = fold_constants(model, should_fold=_should_fold)
            modified |= bool(getattr(res, "modified", False))
        for p in (irc.RemoveUnusedNodesPass(), irc.TopologicalSortPass()):
            modified |= p(model).modified
        self.stats = {"nodes_removed": n0 - model.graph.num_nodes(),
                      "initializers_removed": i0 - len(model.graph.initializers)}
        return ir.passes.PassResult(model, modified=modified)


def cleanup(fold_constants: bool = True) -> Cleanup:
    return Cleanup(fold_constants)
