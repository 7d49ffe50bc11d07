"""vitq's runtime: serve a compiled artifact with ONNX Runtime (CPU) or TensorRT (GPU/Jetson) behind one API.

Imports neither torch nor timm (checked by ``tests/test_runtime.py``), so ``pip install vitq[runtime]`` is enough on a
device.
"""

from .engine import (ARTIFACT_FP32, ARTIFACT_MODEL, ARTIFACT_REPORT, Engine, TensorInfo, load, resolve_artifact,
                     softmax, topk)
from .preprocess import PreprocessConfig, load_image, preprocess, preprocess_batch

__all__ = ["Engine", "TensorInfo", "load", "resolve_artifact", "softmax", "topk", "PreprocessConfig", "load_image",
           "preprocess", "preprocess_batch", "ARTIFACT_MODEL", "ARTIFACT_FP32", "ARTIFACT_REPORT"]
