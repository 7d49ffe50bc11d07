"""ONNX Runtime backend (CPU by default; CUDA when asked and available)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime as ort

from ..errors import InputError
from ..format import META_TARGET, TRT_TARGETS
from .base import TensorInfo

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in arg.shape)
    return TensorInfo(arg.name, shape, np.dtype(_ORT_TYPES.get(arg.type, np.float32)))


#: ONNX Runtime session option: compute type of MatMulNBits made by the int4 DQ -> MatMul fusion (0 unset, 1 fp32,
#: 2 fp16, 3 bf16, 4 int8: activations re-quantized)
QDQ_MATMULNBITS_ACCURACY = "session.qdq_matmulnbits_accuracy_level"

_WARNED: set[str] = set()  # CPU-form warnings already given in this process


def _cpu_form_note(meta: dict[str, str], optimization: str) -> str | None:
    """The artifact's int8 form (``vitq.cpu_form``) against this CPU: a note, warned once per process. Unoptimized
    sessions run no fused int8 kernels, so they have nothing to warn about."""
    from .cpu import META_CPU_FORM, form_check

    if optimization == "disable":
        return None
    msg = form_check(meta.get(META_CPU_FORM))
    if msg and msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"vitq: {msg}", RuntimeWarning, stacklevel=3)
    return msg


class OrtBackend:
    name = "ort"

    def __init__(self, path: Path, threads: int | None = None, providers: list[str] | None = None,
                 optimization: str = "auto", int4_matmul: str = "exact"):
        """``optimization``: ORT graph optimization level, or ``"auto"``: ``"all"``, except for graphs compiled for
        TensorRT (``vitq.target`` trt/jetson metadata: signed int8 Q/DQ, vitq plugin nodes), which run with graph
        optimizations off: ONNX Runtime's fused S8S8 int8 kernels can saturate on AVX2 CPUs, and the point of
        running a TensorRT graph on the CPU is to check its exact function. vitq plugin nodes are expanded to their
        standard-ONNX definition (:func:`vitq.plugins.expand.expand_plugins`) before the session is created.

        ``int4_matmul``: at ``extended``/``all``, ONNX Runtime fuses an int4 weight ``DequantizeLinear -> MatMul`` into
        ``MatMulNBits``, whose default compute (accuracy level 4) quantizes the *activations* to int8 again, per
        block of 32 along K, with their own scales: a different function from the graph's (measured on one W4 layer
        behind a dynamic uint4 activation: 7% relative error). ``"exact"`` (default) sets
        ``session.qdq_matmulnbits_accuracy_level = 1`` (float compute: the Q/DQ function, up to float rounding);
        ``"fast"`` keeps ONNX Runtime's default."""
        self.notes: list[str] = []
        model_src: str | bytes = str(path)
        try:
            import onnx

            head = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise InputError(f"ONNX Runtime cannot load {path}: {e}") from None
        meta = {p.key: p.value for p in head.metadata_props}
        from ..plugins.expand import expand_plugins, has_plugins

        if has_plugins(head):
            full = onnx.load(str(path))
            expanded, n = expand_plugins(full)
            model_src = expanded.SerializeToString()
            self.notes.append(f"{n} vitq plugin node(s) expanded to standard ONNX for ONNX Runtime")
        if optimization == "auto":
            optimization = "disable" if meta.get(META_TARGET) in TRT_TARGETS else "all"
            if optimization == "disable":
                self.notes.append("graph compiled for TensorRT: ONNX Runtime runs it unoptimized (exact, slow); "
                                  "compile with --target ort for fast CPU inference")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }.get(optimization)
        if level is None:
            raise InputError(f"optimization must be auto, disable, basic, extended or all (got {optimization!r})")
        so.graph_optimization_level = level
        if int4_matmul == "exact":
            so.add_session_config_entry(QDQ_MATMULNBITS_ACCURACY, "1")
        elif int4_matmul != "fast":
            raise InputError(f"int4_matmul must be exact or fast (got {int4_matmul!r})")
        self.optimization = optimization
        self.int4_matmul = int4_matmul
        cpu_note = _cpu_form_note(meta, optimization)
        if cpu_note:
            self.notes.append(cpu_note)
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(model_src, sess_options=so,
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
