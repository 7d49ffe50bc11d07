"""TensorRT backend for :class:`vitq.runtime.Engine`: a serialized engine (``model.engine``), its sidecar
``model.engine.json`` (vitq metadata), device buffers and a CUDA stream through cuda-python.

Imports neither torch nor timm. ``tensorrt`` and cuda-python are imported when a backend is constructed, so this
module imports everywhere and constructing one where they are missing raises a readable
:class:`vitq.trt.common.TrtUnavailableError`.

TensorRT API used (NVIDIA Python API docs; ``python/src/infer/pyCore.cpp`` and ``samples/python/common_runtime.py`` in
NVIDIA/TensorRT; type-checked against ``tensorrt-stubs`` by tests/test_trt_typecheck.py): ``trt.Runtime(logger)``,
``runtime.get_plugin_registry().load_library(path)`` (once per process, absolute path, None checked),
``runtime.deserialize_cuda_engine(bytes)``, ``engine.num_io_tensors``, ``engine.get_tensor_name(i)``,
``engine.get_tensor_mode(name)`` (``trt.TensorIOMode.INPUT``), ``engine.get_tensor_dtype(name)``, ``trt.nptype``,
``engine.get_tensor_shape(name)``, ``engine.get_tensor_profile_shape(name, 0)`` -> (min, opt, max),
``engine.create_execution_context()``, ``context.set_input_shape(name, shape)``, ``context.get_tensor_shape(name)``,
``context.set_tensor_address(name, ptr)``, ``context.execute_async_v3(stream_handle)``.
cuda-python (``cuda.bindings.runtime``; ``from cuda import cudart`` for cuda-python < 12.6): ``cudaSetDevice``,
``cudaStreamCreate``, ``cudaMalloc``, ``cudaMemcpyAsync``, ``cudaStreamSynchronize``, ``cudaFree``,
``cudaStreamDestroy``; each returns ``(cudaError_t, *results)``.

Never run in vitq's CI (no TensorRT, no GPU): see docs/jetson.md for what has and has not run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from ..trt.common import ENGINE_META_SUFFIX, TrtUnavailableError, check_trt_version, load_plugin_library
from .base import TensorInfo


def _import_trt() -> Any:
    """The ``tensorrt`` module, or :class:`TrtUnavailableError` ("TensorRT not found ..."). A ``tensorrt`` without
    ``__version__`` (the namespace package that type stubs leave behind) counts as not installed."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]
    except Exception as e:
        raise TrtUnavailableError(f"TensorRT not found: the TensorRT backend needs the 'tensorrt' Python bindings, "
                                  f"which do not import here ({type(e).__name__}: {e})",
                                  hint=_TRT_HINT) from None
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        raise TrtUnavailableError("TensorRT not found: the TensorRT backend needs the 'tensorrt' Python bindings; "
                                  "'tensorrt' imports here but has no __version__ (type stubs only?)", hint=_TRT_HINT)
    check_trt_version(version)
    return trt


_TRT_HINT = ("on a Jetson use JetPack's python3-libnvinfer; elsewhere pip install 'vitq[trt]'; or run model.onnx "
             "with --backend ort")


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (13.x: the only location)
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python (JetPack 6 era)
        except ImportError as e:
            raise TrtUnavailableError(f"the TensorRT backend needs cuda-python, which does not import here ({e})",
                                      hint="pip install 'cuda-python' matching the device's CUDA major version "
                                           "(JetPack 6 = CUDA 12: cuda-python>=12,<13)") from None
    return cudart


def _dims(d: Any) -> tuple[int, ...]:
    """A ``trt.Dims`` as a tuple of ints (by index: ``Dims`` is a sequence, not declared iterable in the stubs)."""
    return tuple(int(d[i]) for i in range(len(d)))


def sidecar_path(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ENGINE_META_SUFFIX)


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """The ``<engine>.json`` written at build/bundle time, or ``{}`` when absent."""
    p = sidecar_path(engine_path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: unreadable engine metadata ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: engine metadata must be a JSON object")
    return data


class TrtBackend:
    name = "trt"

    def __init__(self, path: str | Path, plugin_library: str | Path | None = None, device: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"TensorRT engine not found: {self.path}")
        sidecar = read_sidecar(self.path)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (sidecar.get("metadata") or {}).items()}
        _import_trt()
        import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]  # (checked above; typed by the stubs)

        cudart = self._cudart = _import_cudart()
        self._trt = trt
        self._buffers: dict[str, tuple[int, int]] = {}
        self._stream: Any = None  # cudaStream_t once created
        self._check(cudart.cudaSetDevice(int(device)), f"cudaSetDevice({device})")

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        lib = plugin_library or sidecar.get("plugin_library")
        self.plugin_library: str | None = None
        if lib:
            lib_path = Path(lib).expanduser()
            if not lib_path.is_absolute():  # the sidecar names it relative to the engine's folder
                lib_path = self.path.parent / lib_path
            if not lib_path.is_file():
                raise InputError(f"plugin library {lib_path} (needed by {self.path.name}) not found",
                                 hint="build the plugins on the device (see README.md of the bundle) or pass "
                                      "plugin_library=")
            # once per process, by absolute path, into the (process-global) registry; the engine does not embed it
            self.plugin_library = load_plugin_library(self._runtime.get_plugin_registry(), lib_path,
                                                      what=f"plugin library of {self.path.name}")
        self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise InputError(f"{self.path}: TensorRT {trt.__version__} cannot deserialize this engine (built by a "
                             f"different TensorRT version or for a different GPU, or a plugin is missing)",
                             hint="rebuild it on this device with build_engine.sh")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise InputError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")

        self.inputs: list[TensorInfo] = []
        self.outputs: list[TensorInfo] = []
        self._profile: dict[str, tuple[int, int]] = {}
        for i in range(self._engine.num_io_tensors):
            tname = self._engine.get_tensor_name(i)
            try:
                dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(tname)))
            except TypeError:
                raise InputError(f"{self.path}: I/O tensor {tname!r} has type {self._engine.get_tensor_dtype(tname)} "
                                 f"which has no numpy equivalent") from None
            dims = _dims(self._engine.get_tensor_shape(tname))
            shape = tuple(d if d >= 0 else ("batch" if j == 0 else f"d{j}") for j, d in enumerate(dims))
            info = TensorInfo(tname, shape, dtype)
            if self._engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                self.inputs.append(info)
                if any(d < 0 for d in dims):
                    lo, _opt, hi = self._engine.get_tensor_profile_shape(tname, 0)
                    self._profile[tname] = (int(lo[0]), int(hi[0]))
            else:
                self.outputs.append(info)
        self._stream = self._check(cudart.cudaStreamCreate(), "cudaStreamCreate")

    # -- cuda helpers ----------------------------------------------------------------------------------------------
    def _check(self, res: Any, what: str) -> Any:
        err, rest = (res[0], res[1:]) if isinstance(res, tuple) else (res, ())
        if err != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA error in {what}: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(self._check(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    # -- execution -------------------------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch; batches above the engine's profile max are split, below its min zero-padded."""
        n = int(next(iter(feeds.values())).shape[0])
        if self._profile:
            lo = max(v[0] for v in self._profile.values())
            hi = min(v[1] for v in self._profile.values())
            if n > hi:
                parts = [self.run({k: v[s:s + hi] for k, v in feeds.items()}) for s in range(0, n, hi)]
                return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            if n < lo:
                padded = {k: np.concatenate([v, np.zeros((lo - n,) + v.shape[1:], v.dtype)]) for k, v in feeds.items()}
                return {k: v[:n] for k, v in self._run_once(padded).items()}
        return self._run_once(feeds)

    def _run_once(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, ctx = self._cudart, self._context
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        keep = []
        for info in self.inputs:
            arr = np.ascontiguousarray(feeds[info.name], dtype=info.dtype)
            keep.append(arr)
            if info.name in self._profile and not ctx.set_input_shape(info.name, tuple(arr.shape)):
                raise InputError(f"TensorRT rejected input shape {arr.shape} for {info.name!r} (engine profile "
                                 f"batch range {self._profile[info.name]})")
            ptr = self._buffer(info.name, arr.nbytes)
            self._check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream),
                        f"cudaMemcpyAsync({info.name})")
            ctx.set_tensor_address(info.name, ptr)
        results = {}
        for info in self.outputs:
            shape = _dims(ctx.get_tensor_shape(info.name))
            host = np.empty(shape, info.dtype)
            ctx.set_tensor_address(info.name, self._buffer(info.name, host.nbytes))
            results[info.name] = host
        if not ctx.execute_async_v3(int(self._stream)):
            raise RuntimeError(f"{self.path.name}: TensorRT execute_async_v3 failed (see the TensorRT log)")
        for name, host in results.items():
            self._check(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h,
                                               self._stream), f"cudaMemcpyAsync({name})")
        self._check(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        del keep
        return results

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):  # pragma: no cover - needs a GPU
        try:
            self.close()
        except Exception:
            pass
