"""Graph passes over the exported ONNX (onnx-ir based): Q/DQ insertion from a recipe, target lowering, lints.

* :mod:`.infra`        pass base (onnx-ir ``InPlacePass`` + REQUIRES/PROVIDES/SEMANTICS), PassManager, validation
* :mod:`.analysis`     quantizable sites (Linear MatMul/Gemm, Conv, attention q@k^T / attn@v), module mapping
* :mod:`.insert_qdq`   recipe -> Q/DQ (TensorRT explicit-quantization placement)
* :mod:`.cleanup`      constant folding (never across Q/DQ), dead code, topological order
* :mod:`.lower_ort_cpu` exact int8 -> uint8(zp 128) activation rewrite for ORT's U8S8 CPU kernels
* :mod:`.fold_shift`    shifted quantizers' ``Sub`` -> uint8 zero point (ORT CPU; equal up to float32 rounding ties)
* :mod:`.lower_trt`    ``lower_trt`` (int4-activation linears -> vitq plugin nodes) and ``clip_sub8_activations``
                       (other sub-8-bit activations -> float Clip + int8 Q/DQ, exact; used by both targets)
* :mod:`.split_windows` MixA-Q: router + two-precision subgraphs per routed block (ViT token groups, Swin windows)
* :mod:`.trt_check`    TensorRT lint (errors / warnings, text formatter)
* :mod:`.pipeline`     ``run_pipeline(model, recipe, passes, target=...) -> (ModelProto, report)``; the pass lists
                       live with the targets (:func:`vitq.targets.build_deployable`)
"""

from .infra import GraphPass, GraphPassError, PassManager, PassRecord, run_passes  # noqa: F401
from .pipeline import run_pipeline  # noqa: F401
