"""The TensorRT plugin wrapper (vitq/plugins/trt/QuantLinearA4Plugin.cpp) against TensorRT's public headers:
``g++ -fsyntax-only -Wall -Werror``, both registration modes. Skips where no TensorRT headers are found
(``$VITQ_TRT_INCLUDE``, then the JetPack / Debian package and tarball locations): CI has none; a Jetson or a
TensorRT workstation does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "vitq" / "plugins"
CANDIDATES = [os.environ.get("VITQ_TRT_INCLUDE", ""), "/usr/include/aarch64-linux-gnu", "/usr/include/x86_64-linux-gnu",
              "/usr/local/tensorrt/include", "/opt/tensorrt/include"]
CUDA_INCLUDE = [p for p in ("/usr/local/cuda/include",) if Path(p, "cuda_runtime.h").is_file()]


def _trt_include() -> str:
    for d in CANDIDATES:
        if d and Path(d, "NvInferRuntime.h").is_file():
            return d
    pytest.skip("no TensorRT headers (set VITQ_TRT_INCLUDE to a directory with NvInferRuntime.h)")


@pytest.mark.parametrize("static_reg", [0, 1])
def test_plugin_wrapper_compiles_against_tensorrt_headers(static_reg):
    inc = _trt_include()
    if not CUDA_INCLUDE:
        pytest.skip("no CUDA headers (cuda_runtime.h)")
    cxx = shutil.which("g++") or pytest.skip("no g++")
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-isystem", inc, "-isystem", CUDA_INCLUDE[0],
           f"-I{PLUGINS / 'kernels'}", f"-DVITQ_STATIC_REGISTRATION={static_reg}",
           str(PLUGINS / "trt" / "QuantLinearA4Plugin.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stderr}"
