"""The artifact format, in one place: file names, ONNX metadata keys, JSON schema ids, target names.

Plain constants (stdlib only): the compiler writes them, ``vitq.runtime`` and the tools read them, so a key is
spelled once. Changing a value changes the on-disk format.
"""

from __future__ import annotations

# -- compile targets -------------------------------------------------------------------------------------------------
TARGET_ORT = "ort"
TARGET_TRT = "trt"
TARGET_JETSON = "jetson"
#: every target ``vitq compile --target`` takes; the graph of a TensorRT-family target holds signed int8 Q/DQ and
#: may hold vitq plugin nodes
TARGETS = (TARGET_ORT, TARGET_TRT, TARGET_JETSON)
TRT_TARGETS = (TARGET_TRT, TARGET_JETSON)

# -- files of an artifact directory ----------------------------------------------------------------------------------
ARTIFACT_MODEL = "model.onnx"
ARTIFACT_FP32 = "model.fp32.onnx"
ARTIFACT_REPORT = "report.json"
ARTIFACT_RECIPE = "recipe.json"
ARTIFACT_ENGINE = "model.engine"
#: a TensorRT engine's sidecar metadata file: ``<engine file> + ENGINE_META_SUFFIX``
ENGINE_META_SUFFIX = ".json"

# -- keys of the ONNX model's metadata_props -------------------------------------------------------------------------
META_PREPROCESS = "vitq.preprocess"
META_MODEL = "vitq.model"
META_NUM_CLASSES = "vitq.num_classes"
META_RECIPE = "vitq.recipe"
META_RECIPE_HASH = "vitq.recipe_hash"
META_VERSION = "vitq.version"
META_TARGET = "vitq.target"  # the compile target the graph was lowered for: one of TARGETS
META_PLUGIN_LIBRARY = "vitq.plugin_library"  # Triton config parameter: the TensorRT plugin library

# -- keys of node metadata_props (written by the passes, read by the lint and the lowerings) -------------------------
NODE_ROLE = "vitq.role"        # "weight", "input", "input.pos", "input.neg", "q", "k", "attn", "v"
NODE_MODULE = "vitq.module"    # timm module path of the quantized layer
NODE_BITS = "vitq.bits"        # the recipe's bit-width (the graph may hold it in a wider container)
NODE_SHIFT = "vitq.shift"      # on the Sub before a shifted quantizer's QuantizeLinear: the offset it subtracts
NODE_DYNAMIC = "vitq.dynamic"  # "token" / "log_sqrt2" on every node of a dynamic quantizer
NODE_LOWERED = "vitq.lowered"  # "clip_int8" / "dynamic_float": the TensorRT lowering that made the node
NODE_BRANCH = "vitq.mixa.branch"  # MixA-Q: "high" / "low" on the two branches of a routed linear

# -- JSON schema ids -------------------------------------------------------------------------------------------------
SCHEMA_RECIPE = "vitq.recipe/1"
SCHEMA_REPORT = "vitq.report/1"
SCHEMA_PASSES = "vitq.passes/1"
SCHEMA_EVAL = "vitq.eval/1"
SCHEMA_BENCH = "vitq.bench/1"
SCHEMA_BENCH_SET = "vitq.bench-set/1"
SCHEMA_CHECK = "vitq.check/1"
SCHEMA_POINTS = "vitq.points/1"
SCHEMA_ENGINE_META = "vitq.engine-meta/1"
SCHEMA_JETSON_BUNDLE = "vitq.jetson-bundle/1"
