"""Export a vitq artifact as a Triton Inference Server model repository. Torch-free.

    vitq export-triton build/deit --out triton_repo [--name deit] [--max-batch 8] [--max-wait-ms 5] [--gpu]
    vitq export-triton build/deit --out triton_repo --format plan [--plugin-lib /path/libvitq_plugins.so]

writes ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/model.onnx`` (platform ``onnxruntime_onnx``) or
``REPO/<name>/1/model.plan`` (platform ``tensorrt_plan``, from the artifact's ``model.engine``). Input/output names,
dtypes and dims come from the model itself; with a dynamic batch dimension the config enables dynamic batching with
``max_batch_size``, otherwise ``max_batch_size: 0`` and full shapes. The model's preprocessing config travels as a
``parameters`` entry (``vitq.preprocess``) for the client side. ``REPO/<name>`` is written atomically (staged, then
renamed into place).

A TensorRT plan that uses vitq's plugins needs the plugin library loaded into tritonserver: start it with
``LD_PRELOAD=/path/libvitq_plugins.so tritonserver --model-repository REPO`` (the config names the library in a
comment and a ``parameters`` entry; a README.txt beside the config says the same).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

from .artifacts import atomic_output_dir
from .errors import InputError, UnsupportedError
from .format import ARTIFACT_ENGINE, ARTIFACT_MODEL, META_MODEL, META_PLUGIN_LIBRARY, META_PREPROCESS
from .runtime.engine import Engine, TensorInfo

_TRITON_TYPES = {
    np.dtype(np.float32): "TYPE_FP32", np.dtype(np.float16): "TYPE_FP16", np.dtype(np.float64): "TYPE_FP64",
    np.dtype(np.int64): "TYPE_INT64", np.dtype(np.int32): "TYPE_INT32", np.dtype(np.int16): "TYPE_INT16",
    np.dtype(np.int8): "TYPE_INT8", np.dtype(np.uint8): "TYPE_UINT8", np.dtype(np.bool_): "TYPE_BOOL",
}


def triton_dtype(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in _TRITON_TYPES:
        raise UnsupportedError(f"dtype {dt} has no Triton equivalent")
    return _TRITON_TYPES[dt]


def _dims(shape, batched: bool) -> list[int]:
    dims = list(shape[1:] if batched else shape)
    return [int(d) if isinstance(d, int) and d > 0 else -1 for d in dims]


def _batched(inputs: list[TensorInfo]) -> bool:
    """True when every input has a leading symbolic (dynamic) batch dimension."""
    return all(t.shape and not (isinstance(t.shape[0], int) and t.shape[0] > 0) for t in inputs)


def _q(s: str) -> str:
    """A protobuf text-format string literal (C escapes; non-ASCII stays UTF-8)."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\{ord(ch):03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def model_name(engine: Engine, name: str | None) -> str:
    raw = name or engine.metadata.get(META_MODEL) or Path(engine.path).parent.name or Path(engine.path).stem
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", raw).strip(".")
    if not clean:
        raise InputError(f"cannot derive a Triton model name from {raw!r}; pass --name")
    if name is not None and clean != name:
        raise InputError(f"Triton model name {name!r} may only contain letters, digits, '_', '-' and '.'")
    return clean


def render_config(engine: Engine, *, name: str, platform: str = "onnxruntime_onnx", max_batch: int = 8,
                  max_wait_ms: float = 5.0, instances: int = 1, gpu: bool = False,
                  plugin_lib: str | None = None) -> str:
    """The ``config.pbtxt`` text (protobuf text format of ``inference.ModelConfig``)."""
    if max_batch <= 0 or max_wait_ms < 0 or instances <= 0:
        raise InputError("max batch and instances must be positive, max wait non-negative")
    batched = _batched(engine.inputs)
    lines = []
    if plugin_lib:
        lines += [f"# TensorRT plugins: start tritonserver with LD_PRELOAD={plugin_lib}",
                  "# (or --backend-config=tensorrt,plugins=<lib>) so that the plan can deserialize."]
    lines += [f"name: {_q(name)}", f"platform: {_q(platform)}", f"max_batch_size: {max_batch if batched else 0}"]
    for kind, tensors in (("input", engine.inputs), ("output", engine.outputs)):
        lines.append(f"{kind} [")
        for i, t in enumerate(tensors):
            dims = ", ".join(str(d) for d in _dims(t.shape, batched))
            sep = "," if i < len(tensors) - 1 else ""
            lines += ["  {", f"    name: {_q(t.name)}", f"    data_type: {triton_dtype(t.dtype)}",
                      f"    dims: [ {dims} ]", "  }" + sep]
        lines.append("]")
    if batched:
        preferred = sorted({b for b in (max_batch // 2, max_batch) if b > 0})
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
                  f"  max_queue_delay_microseconds: {int(round(max_wait_ms * 1000))}", "}"]
    kind = "KIND_GPU" if gpu or platform == "tensorrt_plan" else "KIND_CPU"
    lines += ["instance_group [", "  {", f"    count: {instances}", f"    kind: {kind}", "  }", "]"]
    params = {}
    pre = engine.metadata.get(META_PREPROCESS)
    if pre:
        params[META_PREPROCESS] = pre
    if engine.metadata.get(META_MODEL):
        params[META_MODEL] = engine.metadata[META_MODEL]
    if plugin_lib:
        params[META_PLUGIN_LIBRARY] = plugin_lib
    for k, v in params.items():
        lines += ["parameters {", f"  key: {_q(k)}", f"  value: {{ string_value: {_q(v)} }}", "}"]
    return "\n".join(lines) + "\n"


def export_triton(model: str | Path, out: str | Path, *, name: str | None = None, fmt: str = "onnx",
                  max_batch: int = 8, max_wait_ms: float = 5.0, instances: int = 1, gpu: bool = False,
                  plugin_lib: str | None = None) -> Path:
    """Write ``out/<name>/`` (config.pbtxt, 1/model.onnx or 1/model.plan); returns that directory."""
    src = Path(model)
    if fmt not in ("onnx", "plan"):
        raise InputError(f"unknown format {fmt!r} (onnx or plan)")
    onnx_file = src / ARTIFACT_MODEL if src.is_dir() else src
    if fmt == "plan":
        plan = src / ARTIFACT_ENGINE if src.is_dir() else None
        if plan is None or not plan.is_file():
            raise InputError(f"{src}: --format plan needs an artifact directory with {ARTIFACT_ENGINE} "
                             f"(compile with --target trt)")
        if not onnx_file.is_file():
            raise InputError(f"{src}: {ARTIFACT_MODEL} is needed beside {ARTIFACT_ENGINE} to read the I/O "
                             f"signature")
    elif plugin_lib:
        raise InputError("--plugin-lib applies to --format plan only")
    engine = Engine.load(onnx_file, backend="ort", threads=1)  # I/O signature and metadata
    name = model_name(engine, name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    platform = "tensorrt_plan" if fmt == "plan" else "onnxruntime_onnx"
    config = render_config(engine, name=name, platform=platform, max_batch=max_batch, max_wait_ms=max_wait_ms,
                           instances=instances, gpu=gpu, plugin_lib=plugin_lib)
    dest = out / name
    with atomic_output_dir(dest) as stage:
        (stage / "1").mkdir()
        if fmt == "plan":
            shutil.copyfile(src / ARTIFACT_ENGINE, stage / "1" / "model.plan")
        else:
            _copy_onnx(Path(engine.path), stage / "1" / "model.onnx")
        (stage / "config.pbtxt").write_text(config)
        if plugin_lib:
            (stage / "README.txt").write_text(
                f"This TensorRT plan uses vitq plugins. Start Triton with the plugin library preloaded:\n\n"
                f"  LD_PRELOAD={plugin_lib} tritonserver --model-repository {out.resolve()}\n")
    return dest


def _copy_onnx(src: Path, dst: Path) -> None:
    """Copy the ONNX file and any external-data files it references (kept beside it, same relative names)."""
    shutil.copyfile(src, dst)
    import onnx

    try:
        m = onnx.load(str(src), load_external_data=False)
    except Exception as e:  # pragma: no cover - Engine.load already parsed it
        raise InputError(f"cannot read {src}: {e}") from None
    locations = set()
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    for loc in locations:
        f = (src.parent / loc).resolve()
        if not f.is_file() or src.parent.resolve() not in f.parents:
            raise InputError(f"{src}: external data file {loc!r} not found beside the model")
        (dst.parent / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst.parent / loc)
