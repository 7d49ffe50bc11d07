"""The plugin project (vitq/plugins/trt/CMakeLists.txt) configured by the real CMake with the real nvcc.

One build folder, reconfigured four times (compiler detection runs once, ~20 s; the sm_87 kernel build ~15 s):

1. ``-DVITQ_KERNELS_ONLY=ON``, no architecture given: configures without TensorRT, and the generated nvcc flags hold
   the documented default set (``DEFAULT_CUDA_ARCHITECTURES``: 80, 86, 87, 90), not the compiler's own default;
2. the full project with no TensorRT anywhere: stops with "TensorRT not found";
3. with a stand-in TensorRT root (empty ``include/NvInfer.h`` and ``lib/libnvinfer.so``: enough for CMake's
   ``find_path``/``find_library``, nothing is compiled against it): the plugin library target gets the same flags;
4. ``-DCMAKE_CUDA_ARCHITECTURES=87`` (what the Jetson bundle passes): only sm_87, and ``vitq_kernels`` builds; each
   object file's fatbinary holds an sm_87 cubin.

The plugin library itself is not built here (it needs real TensorRT headers and libnvinfer).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vitq.trt.common import DEFAULT_CUDA_ARCHITECTURES, TARGET_CUDA_ARCH

PROJECT = Path(__file__).resolve().parents[1] / "vitq" / "plugins" / "trt"
NVCC = os.environ.get("VITQ_NVCC", "/usr/local/bin/nvcc")


def _tools() -> tuple[str, str]:
    cmake = shutil.which("cmake") or pytest.skip("cmake not found")
    if not (Path(NVCC).is_file() or shutil.which(NVCC)):
        pytest.skip(f"nvcc not found at {NVCC}")
    return cmake, NVCC


def _configure(cmake: str, build: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDAARCHS", "TENSORRT_ROOT")}
    return subprocess.run([cmake, "-S", str(PROJECT), "-B", str(build), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def _cuda_flags(build: Path, target: str) -> str:
    text = (build / "CMakeFiles" / f"{target}.dir" / "flags.make").read_text()
    m = re.search(r"^CUDA_FLAGS = (.*)$", text, re.M)
    assert m, text
    return m.group(1)


def _archs(flags: str) -> set[str]:
    return set(re.findall(r"code=\[?[^\]\s]*sm_([0-9]+[af]?)", flags))


def _fatbin_entries(obj: Path) -> set[tuple[str, int]]:
    """(kind, sm) of each entry of the fatbinary nvcc embeds in an object file (kind "ptx" or "elf")."""
    data = obj.read_bytes()
    i = data.find(struct.pack("<I", 0xBA55ED50))
    assert i >= 0, f"{obj}: no fatbinary"
    _, _, header, size = struct.unpack_from("<IHHQ", data, i)
    off, end, out = i + header, i + header + size, set()
    while off < end:
        kind, _, entry_header, padded = struct.unpack_from("<HHIQ", data, off)
        sm = struct.unpack_from("<I", data, off + 28)[0]
        out.add(({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
        off += entry_header + padded
    return out


def test_configure_default_architectures_and_sm87_kernel_build(tmp_path):
    cmake, nvcc = _tools()
    build = tmp_path / "build"
    default = set(DEFAULT_CUDA_ARCHITECTURES)
    assert TARGET_CUDA_ARCH in default
    assert f'VITQ_DEFAULT_CUDA_ARCHITECTURES "{";".join(DEFAULT_CUDA_ARCHITECTURES)}"' in \
        (PROJECT / "CMakeLists.txt").read_text()

    # 1. kernels only: no TensorRT needed; the default set, not nvcc's own default (sm_75 for nvcc 13)
    r = _configure(cmake, build, f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DVITQ_KERNELS_ONLY=ON")
    assert r.returncode == 0, r.stdout + r.stderr
    flags = _cuda_flags(build, "vitq_kernels")
    assert _archs(flags) == default, flags
    assert "sm_87" in flags and "compute_87" in flags

    # 2. the plugin library without TensorRT: a clear stop (a host with TensorRT installed finds it instead)
    r = _configure(cmake, build, "-DVITQ_KERNELS_ONLY=OFF")
    if r.returncode != 0:
        assert "TensorRT not found" in r.stdout + r.stderr, r.stdout + r.stderr
    else:
        assert "NvInfer.h" not in r.stderr

    # 3. a stand-in TensorRT root: both targets configured with the default set
    stub = tmp_path / "trt-root"
    (stub / "include").mkdir(parents=True)
    (stub / "lib").mkdir()
    (stub / "include" / "NvInfer.h").write_text("")
    (stub / "lib" / "libnvinfer.so").write_bytes(b"")
    r = _configure(cmake, build, f"-DTENSORRT_ROOT={stub}")  # (a TensorRT found in step 2 stays cached)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _archs(_cuda_flags(build, "vitq_kernels")) == default
    assert (build / "CMakeFiles" / "vitq_plugins.dir").is_dir()

    # 4. the Jetson bundle's setting: sm_87 only, and the kernel objects build
    r = _configure(cmake, build, f"-DCMAKE_CUDA_ARCHITECTURES={TARGET_CUDA_ARCH}")
    assert r.returncode == 0, r.stdout + r.stderr
    flags = _cuda_flags(build, "vitq_kernels")
    assert _archs(flags) == {"87"}, flags
    r = subprocess.run([cmake, "--build", str(build), "--target", "vitq_kernels", "-j2"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    objs = sorted(build.rglob("*.cu.o"))
    assert sorted(o.name for o in objs) == ["quant_linear_a4.cu.o"]
    for o in objs:
        assert ("elf", 87) in _fatbin_entries(o), (o, _fatbin_entries(o))
