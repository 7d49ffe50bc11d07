"""Custom op specs, lowering passes, CUDA kernels and TensorRT plugin wrappers.

- :mod:`vitq.plugins.specs`: op definitions and numpy reference implementations (the semantic truth).
- :mod:`vitq.plugins.lowering`: ``lower_trt`` (int4-activation linear -> ``QuantLinearA4`` plugin node) and
  ``expand_plugins`` (back to standard ONNX opset 21).
- ``kernels/`` (CUDA, C API) and ``trt/`` (TensorRT IPluginV3): see docs/plugins.md for what was compiled and run.
"""
