"""``run_pipeline``: recipe + float export + a target's pass list -> the deployable Q/DQ ONNX, with a report.

The pass lists live with the targets (:mod:`vitq.targets`; ``vitq.targets.build_deployable`` picks one)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..format import SCHEMA_PASSES as REPORT_SCHEMA
from ..recipe.schema import Recipe
from .infra import GraphPass, PassManager, to_ir
from .trt_check import TrtCheck


def load_recipe(recipe: Recipe | dict | str | Path) -> Recipe:
    """A :class:`Recipe` from itself, its dict, or its file."""
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return Recipe.load(recipe)
    return recipe


def run_pipeline(model: onnx.ModelProto | str | Path, recipe: Recipe, passes: list[GraphPass], *, target: str,
                 validate: bool = True, sample_inputs: np.ndarray | None = None
                 ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run ``passes`` (a target's pass list, :meth:`vitq.targets.Target.passes`) on the float export ``model`` (a
    ModelProto or a path; not modified); ``target`` names the target in the report.

    ``validate``: ONNX full checker after each changing pass. ``sample_inputs`` (``[N,3,H,W]`` float32): also check
    that the function-preserving passes (cleanup, lowering) keep ONNX Runtime's outputs (exact for lowering).
    Model-level ``metadata_props`` are kept. Returns ``(model_proto, report)``; report::

        {"schema": "vitq.passes/1", "target": "trt", "recipe": "w8a8",
         "passes": [{"name", "changed", "seconds", "nodes_before", "nodes_after", "validated", "validate_seconds",
                     "numeric_max_abs_diff", "stats"}, ...],
         "nodes": {"before": 70, "after": 160}, "qdq": {"QuantizeLinear": 24, "DequantizeLinear": 38},
         "trt_check": {"ok", "errors": [{severity, code, message, node, module}], "warnings": [...], "stats"} | None,
         "trt_check_text": "...", "seconds": 1.23}
    """
    t0 = time.perf_counter()
    if isinstance(model, (str, Path)):
        proto = onnx.load(str(model), load_external_data=True)
    else:
        proto = model
    meta = {p.key: p.value for p in proto.metadata_props}
    m = to_ir(proto)
    n_before = m.graph.num_nodes()
    feeds = None
    if sample_inputs is not None:
        feeds = {m.graph.inputs[0].name: np.ascontiguousarray(sample_inputs, dtype=np.float32)}
    pm = PassManager(passes, properties={"float"}, validate=validate, sample_feeds=feeds)
    pm.run(m)
    out = ir.serde.serialize_model(m)
    have = {p.key for p in out.metadata_props}
    for k, v in meta.items():  # onnx-ir keeps them; make sure
        if k not in have:
            out.metadata_props.add(key=k, value=v)
    counts: dict[str, int] = {}
    for n in out.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    chk = next((p for p in passes if isinstance(p, TrtCheck)), None)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "target": target, "recipe": recipe.name,
        "passes": [r.to_dict() for r in pm.records],
        "nodes": {"before": n_before, "after": len(out.graph.node)}, "qdq": counts,
        "trt_check": chk.report.to_dict() if chk is not None else None,
        "trt_check_text": chk.report.format_text() if chk is not None else None,
        "seconds": round(time.perf_counter() - t0, 3)}
    return out, report
