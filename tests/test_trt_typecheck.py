"""``mypy`` over vitq/trt and vitq/runtime/trt_backend.py against ``tensorrt-stubs`` (PyPI): zero errors.

The TensorRT code cannot run here, so a type check against the stubs of TensorRT's Python API is what catches a
misspelled method, a wrong argument count, or an unhandled ``None`` (``load_library``, ``get_timing_cache``). The
builder and the backend import ``tensorrt`` by name, so every call is checked against the stubs.

Where the stubs come from: ``tensorrt-stubs`` requires the real ``tensorrt`` wheel, and installed into the
environment it leaves an importable ``tensorrt`` namespace package (which would make TensorRT look installed), so
install it apart, without dependencies::

    pip install --no-deps --target build/typestubs tensorrt-stubs==10.13.0.35.1

(or point ``VITQ_TRT_STUBS`` at such a folder). The generated stubs of 10.13 contain a few lines that are not
valid Python (a parameter named ``in``; a parameter without a default after defaulted ones, in methods vitq does not
call); the test copies them and repairs those signatures before checking. Skips when mypy or the stubs are missing.
"""

from __future__ import annotations

import ast
import importlib.util
import keyword
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["vitq/trt", "vitq/runtime/trt_backend.py"]
MYPY_INI = """\
[mypy]
python_version = 3.10
check_untyped_defs = True
follow_imports = silent
warn_unused_ignores = False
[mypy-tensorrt,tensorrt_bindings,tensorrt_bindings.*]
ignore_errors = True
[mypy-tensorrt_libs]
ignore_missing_imports = True
[mypy-cuda,cuda.*]
ignore_missing_imports = True
follow_imports = skip
"""


def _stubs_dir() -> Path:
    for cand in (os.environ.get("VITQ_TRT_STUBS"), ROOT / "build" / "typestubs"):
        if cand and Path(cand, "tensorrt", "__init__.pyi").is_file():
            return Path(cand)
    pytest.skip("tensorrt-stubs not found: pip install --no-deps --target build/typestubs "
                "tensorrt-stubs==10.13.0.35.1 (or set VITQ_TRT_STUBS)")


def _split_params(params: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in params:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def _repair_signature(line: str) -> str:
    """A stub ``def`` line made valid: keyword parameter names get a trailing ``_``; parameters without a default
    after a defaulted one get ``= ...``."""
    m = re.match(r"(\s*def \w+\()(.*)(\)\s*(?:->.*)?:\s*)$", line)
    if not m:
        return line
    out, seen_default = [], False
    for p in _split_params(m.group(2)):
        name = p.strip().split(":")[0].split("=")[0].strip()
        if keyword.iskeyword(name):
            p = p.replace(name, name + "_", 1)
        s = p.strip()
        if not (s.startswith("*") or s == "/"):
            if "=" in s:
                seen_default = True
            elif seen_default:
                p += " = ..."
        out.append(p)
    return m.group(1) + ",".join(out) + m.group(3)


def _repaired_copy(src: Path, dst: Path) -> int:
    fixed = 0
    for pyi in src.rglob("*.pyi"):
        lines = pyi.read_text().splitlines()
        for _ in range(500):
            try:
                ast.parse("\n".join(lines))
                break
            except SyntaxError as e:
                i = (e.lineno or 1) - 1
                new = _repair_signature(lines[i])
                assert new != lines[i], f"{pyi}:{e.lineno}: cannot repair: {e.msg}"
                lines[i] = new
                fixed += 1
        out = dst / pyi.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
    return fixed


def test_mypy_trt_code_against_tensorrt_stubs(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install 'vitq[dev]')")
    stubs = tmp_path / "stubs"
    _repaired_copy(_stubs_dir(), stubs)
    ini = tmp_path / "mypy.ini"
    ini.write_text(MYPY_INI)
    env = {**os.environ, "MYPYPATH": str(stubs)}
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ini), "--no-incremental",
                        "--cache-dir", str(tmp_path / "cache"), *TARGETS],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Success" in r.stdout, r.stdout + r.stderr
    # the stubs were really used: a wrong TensorRT call must be an error
    bad = tmp_path / "bad_trt_use.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f() -> None:\n"
                   "    builder = trt.Builder(trt.Logger(trt.Logger.WARNING))\n"
                   "    builder.create_network(1, 2, 3)\n"
                   "    builder.get_plugin_registry().load_libary('x.so')\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ini), "--no-incremental",
                        "--cache-dir", str(tmp_path / "cache"), str(bad)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "load_libary" in r.stdout and "create_network" in r.stdout, r.stdout + r.stderr
