#!/usr/bin/env bash
# Create .venv and install vitq with its compiler and test dependencies (idempotent; no network beyond PyPI).
# torch 2.14.1 / torchvision 0.29.1 are installed first and explicitly: on this project's machines pip takes them
# from local disk; everything else is pinned in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e '.[dev]'
# TensorRT's type stubs for tests/test_trt_typecheck.py (mypy over vitq/trt): kept out of the venv, since an
# installed stub package makes `import tensorrt` succeed without TensorRT
[ -d build/typestubs/tensorrt ] || .venv/bin/python -m pip install -q --no-deps --target build/typestubs \
    tensorrt-stubs==10.13.0.35.1
.venv/bin/vitq --version
