"""The runtime API: one :class:`Engine` over several backends.

``Engine.load(path)`` accepts an artifact directory (as written by ``vitq compile``), an ``.onnx`` file, or (with the
TensorRT backend) a serialized engine. ``engine.run(x)`` takes numpy arrays of any batch size and returns numpy
arrays. This module and its backends import neither torch nor timm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError, UnsupportedError
from .base import Backend, TensorInfo  # noqa: F401 - TensorInfo re-exported
from .preprocess import PreprocessConfig

from ..format import (ARTIFACT_ENGINE, ARTIFACT_FP32, ARTIFACT_MODEL, ARTIFACT_REPORT,  # noqa: F401 - re-exported
                      META_MODEL, META_NUM_CLASSES, META_PREPROCESS, META_RECIPE, META_TARGET, META_VERSION)


def resolve_artifact(path: str | os.PathLike, backend: str = "auto") -> tuple[Path, str]:
    """Map a user path (artifact dir, .onnx, .engine/.plan) to ``(file, backend)``, naming what is missing."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model path not found: {p}")
    if p.is_dir():
        candidates = []
        if backend in ("auto", "trt"):
            candidates.append((p / ARTIFACT_ENGINE, "trt"))
        if backend in ("auto", "ort"):
            candidates.append((p / ARTIFACT_MODEL, "ort"))
        if backend == "auto":  # an engine only counts when the TensorRT runtime is importable
            candidates = [c for c in candidates if c[1] != "trt" or _trt_available()] or candidates[-1:]
        for f, b in candidates:
            if f.is_file():
                return f, b
        names = ", ".join(c[0].name for c in candidates)
        raise InputError(f"{p} is not a vitq artifact directory (no {names} inside)")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        if backend not in ("auto", "ort"):
            raise UnsupportedError(f"{p}: an .onnx file runs on the 'ort' backend, not {backend!r}")
        return p, "ort"
    if suffix in (".engine", ".plan", ".trt"):
        if backend not in ("auto", "trt"):
            raise UnsupportedError(f"{p}: a TensorRT engine runs on the 'trt' backend, not {backend!r}")
        return p, "trt"
    raise InputError(f"{p}: unknown model file type {suffix!r} (expected a directory, .onnx or .engine)")


def _trt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


class Engine:
    """A loaded model: inspect its I/O, run numpy arrays of any batch size.

    >>> eng = Engine.load("build/deit", threads=2)        # doctest: +SKIP
    >>> logits = eng.run(np.zeros((5, 3, 224, 224), np.float32))   # doctest: +SKIP
    """

    def __init__(self, backend: Backend, path: Path):
        self._b = backend
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", threads: int | None = None,
             **options: Any) -> "Engine":
        file, kind = resolve_artifact(path, backend)
        if kind == "ort":
            from .ort_backend import OrtBackend

            return cls(OrtBackend(file, threads=threads, **options), file)
        if kind == "trt":
            try:
                from .trt_backend import TrtBackend  # type: ignore[import-not-found]
            except ImportError as e:
                raise UnsupportedError(f"{file}: the TensorRT backend is not available here ({e})",
                                       hint="install vitq[trt] on a host with TensorRT, or run the .onnx "
                                            "with --backend ort") from None
            return cls(TrtBackend(file, **options), file)
        raise UnsupportedError(f"unknown backend {backend!r}")  # pragma: no cover

    # -- introspection ---------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._b.name

    @property
    def inputs(self) -> list[TensorInfo]:
        return list(self._b.inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        return list(self._b.outputs)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._b.metadata)

    @property
    def preprocess(self) -> PreprocessConfig | None:
        raw = self._b.metadata.get(META_PREPROCESS)
        return PreprocessConfig.from_dict(json.loads(raw)) if raw else None

    @property
    def num_classes(self) -> int | None:
        raw = self._b.metadata.get(META_NUM_CLASSES)
        return int(raw) if raw else None

    def describe(self) -> dict:
        return {"path": str(self.path), "backend": self.backend,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "model": self._b.metadata.get(META_MODEL), "recipe": self._b.metadata.get(META_RECIPE)}

    # -- execution -------------------------------------------------------------------------------------------------
    def run(self, x: np.ndarray | Mapping[str, np.ndarray], max_batch: int | None = None):
        """Run the model. A single array feeds the only input and the first output is returned; a mapping feeds
        inputs by name and a dict of all outputs is returned. Batches larger than a static batch dimension (or than
        ``max_batch``) are split into chunks; a short final chunk against a static batch is zero-padded."""
        single = not isinstance(x, Mapping)
        if single:
            if len(self._b.inputs) != 1:
                raise InputError(f"model has {len(self._b.inputs)} inputs; pass a dict of name -> array")
            feeds = {self._b.inputs[0].name: x}
        else:
            feeds = dict(x)
        feeds = self._check_feeds(feeds)
        n = next(iter(feeds.values())).shape[0]
        static = self._static_batch()
        chunk = min(v for v in (static, max_batch, n) if v) if n else 0
        if n == 0:
            raise InputError("empty batch")
        if chunk >= n and (static is None or static == n):
            out = self._b.run(feeds)
        else:
            parts: list[dict[str, np.ndarray]] = []
            for s in range(0, n, chunk):
                piece = {k: v[s:s + chunk] for k, v in feeds.items()}
                m = next(iter(piece.values())).shape[0]
                if static is not None and m < static:
                    piece = {k: np.concatenate([v, np.zeros((static - m,) + v.shape[1:], v.dtype)])
                             for k, v in piece.items()}
                res = self._b.run(piece)
                parts.append({k: v[:m] for k, v in res.items()})
            out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return out[self._b.outputs[0].name] if single else out

    __call__ = run

    def _static_batch(self) -> int | None:
        dims = [t.shape[0] for t in self._b.inputs if t.shape]
        ints = [d for d in dims if isinstance(d, int) and d > 0]
        return ints[0] if ints else None

    def _check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        want = {t.name: t for t in self._b.inputs}
        missing = set(want) - set(feeds)
        extra = set(feeds) - set(want)
        if missing or extra:
            raise InputError(f"inputs do not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        out = {}
        batch = None
        for name, arr in feeds.items():
            info = want[name]
            arr = np.asarray(arr)
            if arr.dtype != info.dtype:
                if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(info.dtype, np.floating):
                    arr = arr.astype(info.dtype)
                else:
                    raise InputError(f"input {name!r}: dtype {arr.dtype} but the model expects {info.dtype}")
            if arr.ndim != len(info.shape):
                raise InputError(f"input {name!r}: got shape {arr.shape}, the model expects {list(info.shape)}")
            for i, (got, exp) in enumerate(zip(arr.shape, info.shape)):
                if i > 0 and isinstance(exp, int) and exp > 0 and got != exp:
                    raise InputError(f"input {name!r}: got shape {arr.shape}, the model expects {list(info.shape)}")
            if batch is None:
                batch = arr.shape[0]
            elif arr.shape[0] != batch:
                raise InputError("all inputs must have the same batch size")
            out[name] = np.ascontiguousarray(arr)
        return out


def load(path: str | os.PathLike, backend: str = "auto", threads: int | None = None, **options: Any) -> Engine:
    """Shorthand for :meth:`Engine.load`."""
    return Engine.load(path, backend=backend, threads=threads, **options)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def topk(logits: np.ndarray, k: int = 5) -> Sequence[list[tuple[int, float]]]:
    """Per row: ``[(class, probability), ...]`` for the k best classes."""
    p = softmax(logits.astype(np.float64))
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return [[(int(c), float(p[r, c])) for c in row] for r, row in enumerate(idx)]
