"""torch -> ONNX export (dynamo exporter, opset 21, dynamic batch) and its verification.

The exporter records, per node, the timm module it came from (``pkg.torch.onnx.name_scopes`` in the node's
``metadata_props``); vitq keeps that metadata because the graph passes map nodes back to timm modules through it
(see :func:`module_name`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .. import __version__
from ..errors import UnsupportedError, VerificationError
from ..onnx_meta import NAME_SCOPES_KEY, module_name  # noqa: F401  (re-exported)
from ..runtime.engine import META_MODEL, META_NUM_CLASSES, META_PREPROCESS, META_RECIPE, META_VERSION

OPSET = 21
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_TOLERANCE = 1e-4


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter logs progress and warnings; keep the CLI's output readable."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model: torch.nn.Module, path: str | Path, *, image_size: tuple[int, int] = (224, 224),
                metadata: dict[str, str] | None = None, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``model`` (eval mode) to ``path``: one float32 input ``input [batch,3,H,W]``, one output
    ``logits [batch,classes]``, dynamic batch. ``metadata`` goes into the model's ``metadata_props``."""
    model = model.eval()
    h, w = image_size
    example = torch.randn(2, 3, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    arg_name = _first_arg_name(model)
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], dynamic_shapes={arg_name: {0: batch}},
                                     verbose=False, external_data=False)
    except Exception as e:
        raise UnsupportedError(f"torch.onnx export of {type(model).__name__} failed: "
                               f"{e.__class__.__name__}: {str(e).splitlines()[0][:500]}") from None
    for k, v in (metadata or {}).items():
        prog.model.metadata_props[k] = v
    prog.model.producer_name = "vitq"
    prog.model.producer_version = __version__
    prog.save(str(path), external_data=False)
    return onnx.load(str(path), load_external_data=False)


def _first_arg_name(model: torch.nn.Module) -> str:
    import inspect

    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[0].name if params else "x"


def artifact_metadata(model_name: str, preprocess_cfg: dict, num_classes: int, recipe: str) -> dict[str, str]:
    return {META_MODEL: model_name, META_PREPROCESS: json.dumps(preprocess_cfg, sort_keys=True),
            META_NUM_CLASSES: str(num_classes), META_RECIPE: recipe, META_VERSION: __version__}


def check_onnx(path: str | Path) -> None:
    """Full ONNX checker (with shape inference); raises VerificationError naming the file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise VerificationError(f"ONNX checker rejected {path}: {e}") from None


def verify_against_torch(path: str | Path, model: torch.nn.Module, inputs: np.ndarray,
                         tolerance: float = DEFAULT_TOLERANCE, batch_sizes: tuple[int, ...] = (1, 0)
                         ) -> dict[str, Any]:
    """Run the ONNX model on ONNX Runtime and the torch model on the same inputs; fail loudly when the maximum
    absolute logit difference exceeds ``tolerance``. ``batch_sizes``: 0 means the whole ``inputs`` at once; the
    default also runs batch 1 to exercise the dynamic batch axis."""
    from ..runtime.engine import Engine

    eng = Engine.load(path, backend="ort")
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs)).numpy()
    worst = 0.0
    runs = []
    for bs in batch_sizes:
        bs = bs or len(inputs)
        out = eng.run(inputs, max_batch=bs)
        if out.shape != ref.shape:
            raise VerificationError(f"{path}: output shape {out.shape} differs from torch {ref.shape}")
        d = float(np.abs(out.astype(np.float64) - ref).max())
        runs.append({"batch": bs, "max_abs_diff": d})
        worst = max(worst, d)
    top1 = float((eng.run(inputs).argmax(1) == ref.argmax(1)).mean())
    result = {"max_abs_diff": worst, "tolerance": tolerance, "n": int(len(inputs)), "runs": runs,
              "top1_agreement": top1, "passed": worst <= tolerance}
    if worst > tolerance:
        raise VerificationError(f"{path}: ONNX Runtime and torch disagree: max |logit diff| = {worst:.3e} > "
                                f"{tolerance:.0e}")
    return result
