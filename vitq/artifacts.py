"""Atomic artifact directories and small file helpers.

A compile writes into a hidden staging directory beside the destination and renames it into place only when
everything succeeded, so a failed or interrupted run never leaves a half-written artifact behind. An existing
destination is replaced only after the new one is complete (the old one is moved aside first, then removed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and ``os.replace`` (a reader never
    sees a half-written file; a failure leaves the previous file, if any)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def check_writable_parent(dest: Path) -> None:
    """Fail early, naming the path, if ``dest`` cannot be created: probe the nearest existing ancestor by actually
    creating (and removing) a file there, which also catches read-only mounts where permission bits say yes."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InputError(f"output path {dest} exists and is not a directory")
    probe = dest.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"output path {dest}: {probe} exists and is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vitq-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(f"output directory {dest} is not writable ({probe}: {e.strerror or e})") from None


@contextlib.contextmanager
def atomic_output_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging directory; on success it becomes ``dest``, on any exception it is removed.

    >>> with atomic_output_dir("build/deit") as d:   # doctest: +SKIP
    ...     (d / "model.onnx").write_bytes(...)
    """
    dest = Path(dest)
    check_writable_parent(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:
        raise InputError(f"cannot create output directory {dest}: {e.strerror or e}") from None
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.rmdir(old)
        os.replace(dest, old)
    try:
        os.replace(stage, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
