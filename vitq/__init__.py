"""vitq: a deployment compiler for quantized vision transformers.

The package is split so that the *runtime* (``vitq.runtime``, ``vitq.evaluate``, ``vitq.benchmark``) needs only
numpy, Pillow and ONNX Runtime, while the *compiler* (``vitq.exporter``, ``vitq.passes``, calibration) needs torch
and timm. Nothing imported by ``import vitq`` pulls in torch.
"""

__version__ = "0.1.0"
