"""ONNX Runtime backend (CPU by default; CUDA when asked and available)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from ..errors import InputError
from .engine import TensorInfo

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorInfo(arg.name, shape, np.dtype(_ORT_TYPES.get(arg.type, np.float32)))


class OrtBackend:
    name = "ort"

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None,
                 optimization: str = "all"):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types; name the file
            raise InputError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.inputs = [_info(a) for a in self.session.get_inputs()]
        self.outputs = [_info(a) for a in self.session.get_outputs()]
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.threads = threads

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.outputs]
        res = self.session.run(names, dict(feeds))
        return dict(zip(names, res))
