"""TensorRT target: engine build (``builder``), equivalent ``trtexec`` commands (``trtexec``), and the Jetson
deployment bundle (``bundle``).

Nothing here imports ``tensorrt`` at module import time: the package is usable (command generation, bundles,
validation) on machines without TensorRT, and the engine build itself runs only where ``tensorrt`` imports.
"""

from .common import (ENGINE_META_SUFFIX, SUPPORTED_TRT_MAJORS, BatchRange, TrtBuildOptions, TrtUnavailableError,
                     parse_batch_range, parse_hw_compat, parse_opt_level)

__all__ = ["BatchRange", "TrtBuildOptions", "TrtUnavailableError", "parse_batch_range", "parse_hw_compat",
           "parse_opt_level", "SUPPORTED_TRT_MAJORS", "ENGINE_META_SUFFIX"]
