"""Export a vitq artifact as a Triton Inference Server model repository, and run one locally. Torch-free.

    vitq export-triton build/deit --out REPO [--backend onnxruntime|python|tensorrt] [--name deit] [--preprocess]
                       [--max-batch 8] [--queue-delay-us 5000] [--preferred-batch 4 8] [--instances 1] [--gpu]

writes ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/`` for one of three Triton backends:

* ``onnxruntime`` (default): ``platform: "onnxruntime_onnx"`` with ``1/model.onnx``; Triton's ONNX Runtime backend
  runs the graph with its own session settings (it needs an ORT build that has the graph's ops: vitq's Q/DQ graphs
  need ONNX Runtime >= 1.18 for int4/uint4 Q/DQ, and do not expand vitq plugin nodes).
* ``python``: ``backend: "python"`` with ``1/model.onnx`` and ``1/model.py``, a python-backend model that runs
  :class:`vitq.runtime.Engine` (vitq's exact ONNX Runtime settings, plugin nodes expanded) over each dynamic batch.
  Triton's python environment needs ``pip install vitq`` (no extras).
* ``tensorrt``: ``platform: "tensorrt_plan"`` with ``1/model.plan`` (the artifact's ``model.engine``); the batch
  sizes come from the engine's optimization profile (``model.engine.json``). A plan with vitq plugins needs the plugin
  library loaded into tritonserver: ``LD_PRELOAD=/path/libvitq_plugins.so tritonserver --model-repository REPO``.

Input/output names, dtypes and dims come from the model; with a dynamic batch dimension the config enables dynamic
batching (``max_batch_size``, preferred batch sizes, queue delay), otherwise ``max_batch_size: 0`` and full shapes.
``--preprocess`` adds ``<name>_preprocess`` (a python-backend model: encoded image bytes -> the model's input, with
the model's own preprocessing from :mod:`vitq.runtime.preprocess`) and ``<name>_image``, an ensemble of the two, so
clients send JPEG/PNG bytes. Each model directory is written atomically (staged, then renamed into place).

:class:`TritonServer` starts a ``tritonserver`` from the ``nvidia-pytriton`` wheel on 127.0.0.1 (free ports) for a
repository, waits until it is ready and always stops its whole process group (``scripts/triton_env.sh`` builds the
Python environment it runs in).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

import numpy as np

from .artifacts import atomic_output_dir
from .errors import InputError, UnsupportedError, VitqError
from .format import ARTIFACT_ENGINE, ARTIFACT_MODEL, META_MODEL, META_PLUGIN_LIBRARY, META_PREPROCESS
from .runtime.engine import Engine, TensorInfo

BACKENDS = ("onnxruntime", "python", "tensorrt")
_LEGACY_FORMATS = {"onnx": "onnxruntime", "plan": "tensorrt"}
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 5000
IMAGE_INPUT = "IMAGE"  # the ensemble's input: encoded image bytes (TYPE_STRING)

_TRITON_TYPES = {
    np.dtype(np.float32): "TYPE_FP32", np.dtype(np.float16): "TYPE_FP16", np.dtype(np.float64): "TYPE_FP64",
    np.dtype(np.int64): "TYPE_INT64", np.dtype(np.int32): "TYPE_INT32", np.dtype(np.int16): "TYPE_INT16",
    np.dtype(np.int8): "TYPE_INT8", np.dtype(np.uint8): "TYPE_UINT8", np.dtype(np.bool_): "TYPE_BOOL",
}

_MODEL_PY = '''"""Triton python-backend model written by `vitq export-triton --backend {backend}`.

{what} Triton's python environment needs vitq {version} (`pip install vitq`, no extras).
"""

from vitq.triton import {cls} as TritonPythonModel  # noqa: F401
'''


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


# -- config.pbtxt --------------------------------------------------------------------------------------------------
def _tensor_block(kind: str, tensors: Sequence[tuple[str, str, list[int]]]) -> list[str]:
    lines = [f"{kind} ["]
    for i, (name, dtype, dims) in enumerate(tensors):
        sep = "," if i < len(tensors) - 1 else ""
        lines += ["  {", f"    name: {_q(name)}", f"    data_type: {dtype}",
                  f"    dims: [ {', '.join(str(d) for d in dims)} ]", "  }" + sep]
    return lines + ["]"]


def _io(tensors: list[TensorInfo], batched: bool) -> list[tuple[str, str, list[int]]]:
    return [(t.name, triton_dtype(t.dtype), _dims(t.shape, batched)) for t in tensors]


def _batching_block(preferred: Sequence[int], queue_delay_us: int) -> list[str]:
    return ["dynamic_batching {", f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]",
            f"  max_queue_delay_microseconds: {int(queue_delay_us)}", "}"]


def _instances_block(count: int, kind: str) -> list[str]:
    return ["instance_group [", "  {", f"    count: {count}", f"    kind: {kind}", "  }", "]"]


def _params_block(params: dict[str, str]) -> list[str]:
    lines = []
    for k, v in params.items():
        lines += ["parameters {", f"  key: {_q(k)}", f"  value: {{ string_value: {_q(v)} }}", "}"]
    return lines


def _preferred(max_batch: int, preferred: Sequence[int] | None, lo: int = 1) -> list[int]:
    if preferred is None:
        return sorted({b for b in (max_batch // 2, max_batch) if b >= max(lo, 1)})
    bad = [b for b in preferred if not lo <= int(b) <= max_batch]
    if bad:
        raise InputError(f"--preferred-batch {bad[0]} is outside 1..{max_batch} (the max batch)")
    return sorted({int(b) for b in preferred})


def render_config(engine: Engine, *, name: str, backend: str = "onnxruntime", max_batch: int = DEFAULT_MAX_BATCH,
                  queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, preferred_batch: Sequence[int] | None = None,
                  instances: int = 1, gpu: bool = False, plugin_lib: str | None = None,
                  threads: int | None = None) -> str:
    """The ``config.pbtxt`` text (protobuf text format of ``inference.ModelConfig``) of the classifier model."""
    if backend not in BACKENDS:
        raise InputError(f"unknown Triton backend {backend!r} (one of {', '.join(BACKENDS)})")
    if max_batch <= 0 or queue_delay_us < 0 or instances <= 0:
        raise InputError("max batch and instances must be positive, the queue delay non-negative")
    batched = _batched(engine.inputs)
    lines = []
    if plugin_lib:
        lines += [f"# TensorRT plugins: start tritonserver with LD_PRELOAD={plugin_lib}",
                  "# (or --backend-config=tensorrt,plugins=<lib>) so that the plan can deserialize."]
    lines.append(f"name: {_q(name)}")
    if backend == "python":
        lines.append('backend: "python"')
    else:
        lines.append(f"platform: {_q('tensorrt_plan' if backend == 'tensorrt' else 'onnxruntime_onnx')}")
    lines.append(f"max_batch_size: {max_batch if batched else 0}")
    lines += _tensor_block("input", _io(engine.inputs, batched))
    lines += _tensor_block("output", _io(engine.outputs, batched))
    if batched:
        lines += _batching_block(_preferred(max_batch, preferred_batch), queue_delay_us)
    kind = "KIND_GPU" if gpu or backend == "tensorrt" else "KIND_CPU"
    lines += _instances_block(instances, kind)
    params = {}
    pre = engine.metadata.get(META_PREPROCESS)
    if pre:
        params[META_PREPROCESS] = pre
    if engine.metadata.get(META_MODEL):
        params[META_MODEL] = engine.metadata[META_MODEL]
    if plugin_lib:
        params[META_PLUGIN_LIBRARY] = plugin_lib
    if threads and backend == "python":
        params["vitq.threads"] = str(int(threads))
    elif threads and backend == "onnxruntime":  # Triton's ORT backend reads these
        params["intra_op_thread_count"] = str(int(threads))
        params["inter_op_thread_count"] = "1"
    return "\n".join(lines + _params_block(params)) + "\n"


def _image_input(engine: Engine) -> TensorInfo:
    if len(engine.inputs) != 1 or len(engine.inputs[0].shape) != 4:
        raise InputError(f"--preprocess needs a model with one image input [N, 3, H, W]; "
                         f"{engine.path} has {[t.to_dict() for t in engine.inputs]}")
    return engine.inputs[0]


def _image_dims(inp: TensorInfo, batched: bool) -> list[int]:
    # one encoded image per batch row; a static batch B takes B images per request
    return [1] if batched else [int(inp.shape[0])]


def render_preprocess_config(engine: Engine, *, name: str, max_batch: int, queue_delay_us: int,
                             preferred_batch: Sequence[int] | None, instances: int) -> str:
    """``<name>_preprocess``: encoded image bytes ``IMAGE`` -> the classifier's input tensor (python backend)."""
    inp = _image_input(engine)
    pre = engine.metadata.get(META_PREPROCESS)
    if not pre:
        raise InputError(f"{engine.path} carries no preprocessing config ({META_PREPROCESS} metadata); "
                         f"--preprocess needs a model compiled by vitq")
    batched = _batched(engine.inputs)
    lines = [f"name: {_q(name)}", 'backend: "python"', f"max_batch_size: {max_batch if batched else 0}"]
    lines += _tensor_block("input", [(IMAGE_INPUT, "TYPE_STRING", _image_dims(inp, batched))])
    lines += _tensor_block("output", _io([inp], batched))
    if batched:
        lines += _batching_block(_preferred(max_batch, preferred_batch), queue_delay_us)
    lines += _instances_block(instances, "KIND_CPU")
    return "\n".join(lines + _params_block({META_PREPROCESS: pre})) + "\n"


def render_ensemble_config(engine: Engine, *, name: str, classifier: str, preprocessor: str,
                           max_batch: int) -> str:
    """``<name>_image``: the ensemble ``IMAGE`` bytes -> ``<name>_preprocess`` -> ``<name>`` -> logits."""
    inp = _image_input(engine)
    batched = _batched(engine.inputs)
    lines = [f"name: {_q(name)}", 'platform: "ensemble"', f"max_batch_size: {max_batch if batched else 0}"]
    lines += _tensor_block("input", [(IMAGE_INPUT, "TYPE_STRING", _image_dims(inp, batched))])
    lines += _tensor_block("output", _io(engine.outputs, batched))
    pixels = "pixels"
    lines += ["ensemble_scheduling {", "  step [",
              "    {", f"      model_name: {_q(preprocessor)}", "      model_version: -1",
              f"      input_map {{ key: {_q(IMAGE_INPUT)} value: {_q(IMAGE_INPUT)} }}",
              f"      output_map {{ key: {_q(inp.name)} value: {_q(pixels)} }}", "    },",
              "    {", f"      model_name: {_q(classifier)}", "      model_version: -1",
              f"      input_map {{ key: {_q(inp.name)} value: {_q(pixels)} }}"]
    lines += [f"      output_map {{ key: {_q(t.name)} value: {_q(t.name)} }}" for t in engine.outputs]
    lines += ["    }", "  ]", "}"]
    return "\n".join(lines) + "\n"


# -- export --------------------------------------------------------------------------------------------------------
def _engine_batch_range(src: Path) -> dict[str, int] | None:
    """The optimization profile's batch range from ``model.engine.json`` (written by ``vitq compile --target trt``)."""
    side = src / (ARTIFACT_ENGINE + ".json")
    if not side.is_file():
        return None
    try:
        rng = json.loads(side.read_text()).get("build", {}).get("batch_range")
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {side}: {e}") from None
    if rng and all(isinstance(rng.get(k), int) for k in ("min", "opt", "max")):
        return rng
    return None


def export_triton(model: str | Path, out: str | Path, *, name: str | None = None, backend: str | None = None,
                  fmt: str | None = None, max_batch: int | None = None, max_wait_ms: float | None = None,
                  queue_delay_us: int | None = None, preferred_batch: Sequence[int] | None = None,
                  instances: int = 1, gpu: bool = False, plugin_lib: str | None = None, preprocess: bool = False,
                  threads: int | None = None) -> Path:
    """Write ``out/<name>/`` (config.pbtxt, 1/...) for ``backend``; with ``preprocess`` also ``<name>_preprocess``
    and the ensemble ``<name>_image``. Returns the classifier's directory.

    ``fmt`` (``onnx``/``plan``) is the older spelling of ``backend`` (``onnxruntime``/``tensorrt``); ``max_wait_ms``
    the older spelling of ``queue_delay_us``. ``max_batch`` defaults to 8, or for ``tensorrt`` to the profile's max."""
    src = Path(model)
    if fmt is not None:
        if fmt not in _LEGACY_FORMATS:
            raise InputError(f"unknown format {fmt!r} (onnx or plan)")
        if backend is not None and backend != _LEGACY_FORMATS[fmt]:
            raise InputError(f"--format {fmt} contradicts --backend {backend}")
        backend = _LEGACY_FORMATS[fmt]
    backend = backend or "onnxruntime"
    if backend not in BACKENDS:
        raise InputError(f"unknown Triton backend {backend!r} (one of {', '.join(BACKENDS)})")
    if max_wait_ms is not None and queue_delay_us is not None:
        raise InputError("give the queue delay once (--queue-delay-us or --max-wait-ms)")
    if max_wait_ms is not None:
        if max_wait_ms < 0:
            raise InputError(f"--max-wait-ms must be non-negative, got {max_wait_ms}")
        queue_delay_us = int(round(max_wait_ms * 1000))
    queue_delay_us = DEFAULT_QUEUE_DELAY_US if queue_delay_us is None else int(queue_delay_us)
    onnx_file = src / ARTIFACT_MODEL if src.is_dir() else src
    if backend == "tensorrt":
        plan = src / ARTIFACT_ENGINE if src.is_dir() else None
        if plan is None or not plan.is_file():
            raise InputError(f"{src}: --backend tensorrt needs an artifact directory with {ARTIFACT_ENGINE} "
                             f"(compile with --target trt)")
        if not onnx_file.is_file():
            raise InputError(f"{src}: {ARTIFACT_MODEL} is needed beside {ARTIFACT_ENGINE} to read the I/O "
                             f"signature")
    elif plugin_lib:
        raise InputError("--plugin-lib applies to --backend tensorrt only")
    if threads is not None and (backend == "tensorrt" or threads <= 0):
        raise InputError("--threads (a positive ONNX Runtime thread count) applies to --backend python or "
                         "onnxruntime")
    if backend == "python" and gpu:
        raise InputError("--gpu does not apply to --backend python (it runs vitq.runtime on ONNX Runtime's CPU "
                         "provider); use --backend onnxruntime or tensorrt for GPU instances")
    engine = Engine.load(onnx_file, backend="ort", threads=1)  # I/O signature and metadata
    name = model_name(engine, name)
    if backend == "tensorrt" and _batched(engine.inputs):
        rng = _engine_batch_range(src)
        if rng is not None:
            if rng["min"] > 1:
                raise InputError(f"{src}: the engine's optimization profile starts at batch {rng['min']}, but "
                                 f"Triton's dynamic batcher sends batches from 1; rebuild with --batch-range "
                                 f"1:{rng['opt']}:{rng['max']}")
            if max_batch is not None and max_batch > rng["max"]:
                raise InputError(f"--max-batch {max_batch} exceeds the engine's optimization profile "
                                 f"(batch {rng['min']}..{rng['max']})")
            max_batch = max_batch or rng["max"]
            if preferred_batch is None:
                preferred_batch = sorted({b for b in (rng["opt"], max_batch) if b <= max_batch})
    max_batch = max_batch or DEFAULT_MAX_BATCH
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory")
    config = render_config(engine, name=name, backend=backend, max_batch=max_batch, queue_delay_us=queue_delay_us,
                           preferred_batch=preferred_batch, instances=instances, gpu=gpu, plugin_lib=plugin_lib,
                           threads=threads)
    extra: dict[str, str] = {}
    if preprocess:  # render (and so validate) everything before writing anything
        pre_name, ens_name = f"{name}_preprocess", f"{name}_image"
        extra[pre_name] = render_preprocess_config(engine, name=pre_name, max_batch=max_batch,
                                                   queue_delay_us=queue_delay_us, preferred_batch=preferred_batch,
                                                   instances=instances)
        extra[ens_name] = render_ensemble_config(engine, name=ens_name, classifier=name, preprocessor=pre_name,
                                                 max_batch=max_batch)
    from . import __version__

    dest = out / name
    with atomic_output_dir(dest) as stage:
        (stage / "1").mkdir()
        if backend == "tensorrt":
            shutil.copyfile(src / ARTIFACT_ENGINE, stage / "1" / "model.plan")
        else:
            _copy_onnx(Path(engine.path), stage / "1" / "model.onnx")
        if backend == "python":
            (stage / "1" / "model.py").write_text(_MODEL_PY.format(
                backend=backend, version=__version__, cls="ClassifierModel",
                what="Runs 1/model.onnx on vitq.runtime.Engine (vitq's ONNX Runtime settings, plugin nodes expanded)."))
        (stage / "config.pbtxt").write_text(config)
        if plugin_lib:
            (stage / "README.txt").write_text(
                f"This TensorRT plan uses vitq plugins. Start Triton with the plugin library preloaded:\n\n"
                f"  LD_PRELOAD={plugin_lib} tritonserver --model-repository {out.resolve()}\n")
    for extra_name, text in extra.items():
        with atomic_output_dir(out / extra_name) as stage:
            (stage / "config.pbtxt").write_text(text)
            (stage / "1").mkdir()
            if extra_name.endswith("_preprocess"):
                (stage / "1" / "model.py").write_text(_MODEL_PY.format(
                    backend=backend, version=__version__, cls="PreprocessModel",
                    what="Decodes encoded image bytes and applies the model's own preprocessing "
                         "(vitq.runtime.preprocess)."))
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


# -- python-backend models (run inside Triton's python backend stub) -----------------------------------------------
def _pb():
    import triton_python_backend_utils as pb  # provided by Triton's python backend

    return pb


def _error_response(pb, message: str, invalid: bool):
    """A response carrying an error; ``invalid`` maps to INVALID_ARG (HTTP 400) where the backend supports codes."""
    code = getattr(pb.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    err = pb.TritonError(message, code) if code is not None else pb.TritonError(message)
    return pb.InferenceResponse(output_tensors=[], error=err)


def _config_params(config: dict) -> dict[str, str]:
    return {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


class ClassifierModel:
    """Triton python-backend model over :class:`vitq.runtime.Engine`: the requests of one ``execute`` call (Triton's
    dynamic batch) run as one engine call, so the served function is exactly ``Engine.run``."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = _config_params(config)
        path = Path(args["model_repository"]) / str(args["model_version"]) / ARTIFACT_MODEL
        threads = int(params["vitq.threads"]) if params.get("vitq.threads") else None
        self.engine = Engine.load(path, backend="ort", threads=threads)
        self.inputs = [t.name for t in self.engine.inputs]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.run(feeds)

    def execute(self, requests):
        pb = _pb()
        feeds = [{n: pb.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        groups = [feeds] if self.batched else [[f] for f in feeds]
        responses = []
        for group in groups:
            sizes = [next(iter(f.values())).shape[0] for f in group]
            try:
                out = self._run({n: np.concatenate([f[n] for f in group]) for n in self.inputs})
            except Exception as e:  # one failed engine call fails the requests of that call only
                responses += [_error_response(pb, f"vitq: {e}", isinstance(e, VitqError)) for _ in group]
                continue
            start = 0
            for n in sizes:
                responses.append(pb.InferenceResponse(output_tensors=[
                    pb.Tensor(k, np.ascontiguousarray(out[k][start:start + n])) for k in self.outputs]))
                start += n
        return responses

    def finalize(self) -> None:
        self.engine = None


class PreprocessModel:
    """Triton python-backend model: encoded image bytes -> the model's input tensor, with the preprocessing config
    the artifact carries (the same :func:`vitq.runtime.preprocess.preprocess` that ``vitq serve`` and ``vitq eval``
    use). An undecodable image fails its own request with INVALID_ARG."""

    def initialize(self, args: dict) -> None:
        from .runtime.preprocess import PreprocessConfig

        config = json.loads(args["model_config"])
        self.cfg = PreprocessConfig.from_dict(json.loads(_config_params(config)[META_PREPROCESS]))
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]
        self.dtype = np.dtype(_pb().triton_string_to_numpy(config["output"][0]["data_type"]))

    def execute(self, requests):
        from .runtime.preprocess import decode_image_bytes, preprocess

        pb = _pb()
        responses = []
        for r in requests:
            data = pb.get_input_tensor_by_name(r, self.input).as_numpy()
            try:
                x = np.stack([preprocess(decode_image_bytes(bytes(b), what=f"image {i}"), self.cfg)
                              for i, b in enumerate(data.reshape(-1))]).astype(self.dtype)
            except VitqError as e:
                responses.append(_error_response(pb, f"vitq: {e}", True))
                continue
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(self.output, x)]))
        return responses


# -- a local tritonserver (nvidia-pytriton wheel) ------------------------------------------------------------------
def _free_ports(n: int, host: str) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pytriton_dir(env: str | Path) -> Path:
    """The ``pytriton/tritonserver`` directory of the nvidia-pytriton wheel installed in the venv ``env``."""
    hits = sorted(Path(env).glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    if not hits:
        raise InputError(f"no nvidia-pytriton install in {env} (run scripts/triton_env.sh)")
    return hits[0].parent.parent


def backend_directory(env: str | Path) -> Path:
    """``env/tritonserver-backends``: the wheel's python backend with the stub for ``env``'s Python beside it (the
    layout tritonserver's ``--backend-directory`` expects). Built on first use."""
    env = Path(env)
    src = pytriton_dir(env)
    ver = src.parent.parent.parent.name.removeprefix("python")  # lib/python3.X/site-packages/pytriton/tritonserver
    stub = src / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise UnsupportedError(f"nvidia-pytriton in {env} has no python backend stub for Python {ver}")
    dst = env / "tritonserver-backends"
    if not (dst / "python" / stub.name).is_file():
        stage = Path(tempfile.mkdtemp(prefix=".backends-", dir=env))
        shutil.copytree(src / "backends", stage / "backends")
        shutil.copy2(stub, stage / "backends" / "python" / stub.name)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(stage / "backends", dst)
        shutil.rmtree(stage, ignore_errors=True)
    return dst


class TritonServer:
    """A local ``tritonserver`` serving ``repo`` on 127.0.0.1 with free HTTP/gRPC/metrics ports.

    ``env`` is a venv holding the ``nvidia-pytriton`` wheel and what the python-backend models import (numpy<2 with
    this wheel's stub, onnx, onnxruntime, Pillow, vitq): its ``bin`` goes first on PATH because the python backend
    runs the first ``python3`` found there. The server runs in its own process group (its python-backend stubs
    included), which :meth:`stop` always ends (also at interpreter exit, and the server gets SIGTERM if the thread
    that started it dies); use it as a context manager.
    """

    def __init__(self, repo: str | Path, env: str | Path, *, host: str = "127.0.0.1", log: str | Path | None = None,
                 timeout: float = 180.0, args: Sequence[str] = ()):
        self.repo, self.env, self.host, self.timeout = Path(repo), Path(env), host, float(timeout)
        self.log = Path(log) if log else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list[str]:
        tdir = pytriton_dir(self.env)
        return [str(tdir / "bin" / "tritonserver"), f"--model-repository={self.repo.resolve()}",
                f"--backend-directory={backend_directory(self.env)}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", "--exit-timeout-secs=10", "--strict-readiness=true",
                "--exit-on-error=true", "--log-verbose=0", *self.args]

    def environment(self) -> dict[str, str]:
        tdir = pytriton_dir(self.env)
        libs = tdir.parent.parent / "nvidia_pytriton.libs"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = os.pathsep.join([str(self.env.resolve() / "bin"), env.get("PATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p)
        env["VIRTUAL_ENV"] = str(self.env.resolve())
        return env

    def start(self) -> "TritonServer":
        if self.proc is not None:
            raise RuntimeError("server already started")
        self.http_port, self.grpc_port, self.metrics_port = _free_ports(3, self.host)
        cmd, env = self.command(), self.environment()
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tritonserver exited with {self.proc.returncode} before it was ready:\n"
                                       f"{self.log_tail()}")
                if self.ready():
                    return self
                time.sleep(0.25)
            raise RuntimeError(f"tritonserver not ready after {self.timeout:.0f} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (OSError, urllib.error.URLError):
            return 0

    def ready(self) -> bool:
        return self._get("/v2/health/ready") == 200

    def model_ready(self, name: str) -> bool:
        return self._get(f"/v2/models/{name}/ready") == 200

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def group_alive(self) -> bool:
        """Whether any process of the server's group (server, python-backend stubs) still exists."""
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL to the whole group after ``timeout``."""
        if self.proc is None:
            return None
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (the server, stubs that outlived it)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + 10
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.proc.returncode

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
