"""Pass infrastructure, built on onnx-ir's own (``onnx_ir.passes``: PassBase / InPlacePass / PassResult).

A :class:`GraphPass` is an onnx-ir ``InPlacePass`` that also declares

* ``requires`` / ``provides``: named graph properties (e.g. ``"float"``, ``"qdq"``, ``"ort_lowered"``). The
  :class:`PassManager` tracks which properties hold and refuses to run a pass whose requirements are missing
  (so "lower_ort_cpu before insert_qdq" is an error, not a silent no-op). ``invalidates``: properties it breaks.
* ``semantics``: ``"exact"`` (the graph function is unchanged bit for bit: lowering), ``"float"`` (unchanged up to
  float re-association: cleanup / constant folding), ``"rounding"`` (the same quantized function up to float32
  rounding before a quantizer, which can flip single grid steps that a quantized network then propagates:
  :mod:`.fold_shift`; the difference is recorded, not bounded) or ``"changes"`` (quantization itself). The
  manager's optional numeric check compares ONNX Runtime outputs before/after a pass on sample inputs with a
  tolerance picked from it.

(onnx-ir's ``PassBase.requires(model)`` / ``ensures(model)`` are its pre/post-condition hooks; the declarative
property sets are named ``REQUIRES`` / ``PROVIDES`` here to keep the two apart.)

After every pass the manager validates: the ONNX checker (full check, i.e. with strict shape inference) on the
serialized model, and optionally the numeric check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir import passes as irp

from ..errors import VerificationError, VitqError


class GraphPassError(VitqError):
    """A graph pass cannot do what was asked (e.g. a recipe layer with no matching node); names the culprit."""


class GraphPass(irp.InPlacePass):
    REQUIRES: ClassVar[frozenset[str]] = frozenset()
    PROVIDES: ClassVar[frozenset[str]] = frozenset()
    INVALIDATES: ClassVar[frozenset[str]] = frozenset()
    SEMANTICS: ClassVar[str] = "exact"  # "exact" | "float" | "rounding" | "changes"
    NAME: ClassVar[str] = ""

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.NAME or type(self).__name__


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    validated: bool = False
    validate_seconds: float = 0.0
    numeric_max_abs_diff: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "changed": self.changed, "seconds": round(self.seconds, 4),
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "validated": self.validated,
                "validate_seconds": round(self.validate_seconds, 4),
                "numeric_max_abs_diff": self.numeric_max_abs_diff, "stats": self.stats}


NUMERIC_TOLERANCE = {"exact": 0.0, "float": 1e-4}


def ort_session(model: onnx.ModelProto | ir.Model, extra_outputs: tuple[str, ...] | list[str] = ()):
    """An ONNX Runtime CPU session on the graph itself (all graph optimizations off), vitq plugin nodes expanded to
    their standard-ONNX definition first; ``extra_outputs``: intermediate values it returns after the graph's
    outputs."""
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    from ..plugins.expand import expand_plugins, has_plugins

    if has_plugins(proto):  # TensorRT plugin nodes: run their exact standard-ONNX expansion
        proto, _ = expand_plugins(proto)
    if extra_outputs:
        have = {o.name for o in proto.graph.output}
        proto = onnx.ModelProto.FromString(proto.SerializeToString())  # the caller's model is not modified
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra_outputs) if n not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model on ONNX Runtime (:func:`ort_session`: the graph itself, plugin nodes expanded)."""
    return ort_session(model).run(None, feeds)


def check_model(model: ir.Model, where: str) -> None:
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # checker / shape-inference errors
        raise VerificationError(f"after pass {where}: ONNX checker rejected the graph: {e}") from None


class PassManager:
    """Runs :class:`GraphPass` es in order, enforcing ``REQUIRES``, validating after each, recording timings.

    ``properties``: what holds for the input graph (default ``{"float"}``: an exported float model).
    ``validate``: run the ONNX full checker after each changing pass. ``sample_feeds``: if given, ONNX Runtime
    outputs are compared before/after every ``exact``/``float`` pass (``exact`` must be bit-identical).
    """

    def __init__(self, passes: Sequence[GraphPass], *, properties: set[str] | None = None, validate: bool = True,
                 sample_feeds: dict[str, np.ndarray] | None = None):
        self.passes = list(passes)
        self.properties = set(properties if properties is not None else {"float"})
        self.validate = validate
        self.sample_feeds = sample_feeds
        self.records: list[PassRecord] = []

    def run(self, model: ir.Model) -> ir.Model:
        ref = None
        if self.sample_feeds is not None:
            ref = ort_run(model, self.sample_feeds)
        for p in self.passes:
            missing = p.REQUIRES - self.properties
            if missing:
                raise irp.PreconditionError(f"pass {p.name} requires {sorted(missing)}, but only "
                                            f"{sorted(self.properties)} hold (passes run: "
                                            f"{[r.name for r in self.records]})")
            n0 = model.graph.num_nodes()
            t0 = time.perf_counter()
            result = p(model)
            dt = time.perf_counter() - t0
            rec = PassRecord(p.name, bool(result.modified), dt, n0, model.graph.num_nodes(), stats=dict(p.stats))
            self.properties -= p.INVALIDATES
            self.properties |= p.PROVIDES
            if self.validate and result.modified:
                t1 = time.perf_counter()
                check_model(model, p.name)
                rec.validated = True
                rec.validate_seconds = time.perf_counter() - t1
            if self.sample_feeds is not None and result.modified:
                out = ort_run(model, self.sample_feeds)
                if p.SEMANTICS != "changes" and ref is not None:
                    diff = max(float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0
                               for a, b in zip(out, ref))
                    rec.numeric_max_abs_diff = diff
                    tol = NUMERIC_TOLERANCE.get(p.SEMANTICS, float("inf"))
                    if diff > tol:
                        raise VerificationError(f"pass {p.name} ({p.SEMANTICS}) changed the outputs on the sample "
                                                f"inputs: max |diff| {diff:.3e} > {tol:.0e}")
                ref = out
            self.records.append(rec)
        return model


def to_ir(model: onnx.ModelProto | ir.Model | str) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return ir.load(str(model))


def run_passes(model: onnx.ModelProto | ir.Model | str, passes: Sequence[GraphPass], **kw) -> ir.Model:
    """Convenience: run ``passes`` through a :class:`PassManager` and return the (in-place changed) ir.Model."""
    m = to_ir(model)
    return PassManager(passes, **kw).run(m)
