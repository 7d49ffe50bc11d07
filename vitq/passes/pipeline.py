"""``build_deployable``: recipe + float export -> the deployable Q/DQ ONNX for a target, with a report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import InputError
from ..recipe.schema import Recipe
from .cleanup import Cleanup
from .infra import GraphPass, PassManager, to_ir
from .insert_qdq import InsertQDQ
from .fold_shift import FoldShiftZeroPoint
from .lower_ort_cpu import LowerOrtCpu
from .lower_trt import ClipSub8Activations, DynamicQdqFloat, LowerTrt
from .trt_check import TrtCheck
from ..format import SCHEMA_PASSES as REPORT_SCHEMA, TARGETS



def pipeline_for(recipe: Recipe, target: str, isa: str = "avx2") -> list[GraphPass]:
    """The target's passes; ``isa``: the CPU instruction set the ort target lowers for (vitq.runtime.cpu.ISAS)."""
    if recipe.mixa is not None and target in TARGETS:  # MixA-Q: split_windows around insert_qdq
        from .split_windows import mixa_passes

        return mixa_passes(recipe, target, lambda r, t: pipeline_for(r, t, isa))
    if target == "ort":
        return [InsertQDQ(recipe), Cleanup(), ClipSub8Activations(), LowerOrtCpu(isa), FoldShiftZeroPoint()]
    if target in ("trt", "jetson"):
        return [InsertQDQ(recipe), Cleanup(), LowerTrt(), DynamicQdqFloat(), ClipSub8Activations(), Cleanup(),
                TrtCheck()]
    raise InputError(f"unknown target {target!r} (expected one of: {', '.join(TARGETS)})")


def build_deployable(model: onnx.ModelProto | str | Path, recipe: Recipe | dict | str | Path, target: str, *,
                     validate: bool = True, sample_inputs: np.ndarray | None = None, isa: str = "avx2"
                     ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run the target's pass pipeline on the float export ``model`` (a ModelProto or a path; not modified).

    ort:        insert_qdq -> cleanup -> clip_sub8_activations -> lower_ort_cpu (int4 / 6-bit activations as float
                Clip + int8 Q/DQ, then int8 as uint8 zp 128: exact rewrites onto ORT's fast u8 kernels; ORT's
                optimizer miscompiles int4 Q/DQ behind Relu, see clip_sub8_activations) -> fold_shift_zero_point
                (shifted quantizers' Sub into the uint8 zero point; equal up to float32 rounding ties)
    trt/jetson: insert_qdq -> cleanup -> lower_trt (int4-activation linears, static or dynamic per token -> vitq
                plugin nodes) -> dynamic_qdq_float (other dynamic per-token quantizers -> exact float arithmetic) ->
                clip_sub8_activations (other sub-8-bit activations -> float Clip + int8 Q/DQ, exact) -> cleanup ->
                trt_check (lint; TensorRT errors are reported, not raised: the caller decides)

    ``isa``: the CPU instruction set ``--target ort`` lowers for (``lower_ort_cpu``'s form; ignored by trt/jetson).
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
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r} (expected one of: {', '.join(TARGETS)})")
    if isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    elif isinstance(recipe, (str, Path)):
        recipe = Recipe.load(recipe)
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
    passes = pipeline_for(recipe, target, isa)
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
