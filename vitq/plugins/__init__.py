"""Custom op specs, their standard-ONNX expansion, CUDA kernels and TensorRT plugin sources: a leaf package (numpy
and onnx only; the runtime imports it).

- :mod:`vitq.plugins.specs`: op definitions and numpy reference implementations (the semantic truth).
- :mod:`vitq.plugins.expand`: ``expand_plugins`` (plugin nodes back to standard ONNX opset 21) and the onnx-only
  builder of the dynamic per-row activation chain. The lowering to plugin nodes is the onnx-ir pass
  :mod:`vitq.passes.lower_trt`.
- ``kernels/`` (CUDA, C API) and ``trt/`` (TensorRT IPluginV3): see docs/plugins.md for what was compiled and
  run.
"""
