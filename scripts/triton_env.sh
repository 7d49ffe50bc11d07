#!/usr/bin/env bash
# Build (once; reused while its spec is unchanged) the Python environment a local Triton server runs in:
#   build/triton-env (or $VITQ_TRITON_ENV): the nvidia-pytriton wheel (tritonserver, libtritonserver.so, the python
#   backend and its stubs) and what vitq's python-backend models import: vitq (editable, no extras) with its runtime
#   dependencies from pyproject.toml, and numpy<2 (this wheel's python-backend stub returns empty output tensors
#   with numpy 2).
# The venv's Python must have a stub in the wheel (3.8-3.13); $PYTHON picks it (default: python3).
# Prints the environment's path. Exit 3: the nvidia-pytriton wheel cannot be installed here (no network, platform).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${VITQ_TRITON_ENV:-build/triton-env}
PY=${PYTHON:-python3}
PYTRITON="nvidia-pytriton==0.7.0"
# rebuilt when this script, pyproject.toml (vitq's runtime pins) or the Python version changes
SPEC="$(cat "$0" pyproject.toml | sha256sum | cut -c1-16) $("$PY" -c 'import sys; print(sys.version.split()[0])')"

if [ -f "$ENV/.vitq-env" ] && [ "$(cat "$ENV/.vitq-env")" = "$SPEC" ] && [ -x "$ENV/bin/python" ]; then
    echo "$ENV"
    exit 0
fi
rm -rf "$ENV"
mkdir -p "$(dirname "$ENV")"
"$PY" -m venv "$ENV" >&2
PIP=("$ENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade "pip>=24" "setuptools>=68" >&2
echo "numpy<2" > "$ENV/constraints.txt"
"${PIP[@]}" -c "$ENV/constraints.txt" --no-build-isolation -e . >&2
# --no-deps: only the server binaries are used (the wheel's own Python client side is not)
if ! "${PIP[@]}" --no-deps "$PYTRITON" >&2; then
    echo "triton_env: cannot install $PYTRITON here" >&2
    rm -rf "$ENV"
    exit 3
fi
"$ENV/bin/python" -c "import numpy, onnxruntime, PIL, vitq.triton; assert numpy.__version__ < '2'" >&2
echo "$SPEC" > "$ENV/.vitq-env"
echo "$ENV"
