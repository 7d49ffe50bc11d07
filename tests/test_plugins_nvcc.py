"""CI compile check: every vitq/plugins/kernels/*.cu compiles with nvcc for sm_87 (Orin) and sm_90 (Hopper).

Compiles only (-c); nothing here runs a kernel. Skips when nvcc is absent. The four compiles run in parallel."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "vitq" / "plugins" / "kernels"
NVCC = os.environ.get("VITQ_NVCC", "/usr/local/bin/nvcc")
ARCHS = ("sm_87", "sm_90")


def _nvcc() -> str:
    if not (Path(NVCC).is_file() or shutil.which(NVCC)):
        pytest.skip(f"nvcc not found at {NVCC}")
    return NVCC


def test_kernel_sources_present():
    names = sorted(p.name for p in KERNELS.glob("*.cu"))
    assert names == ["quant_linear_a4.cu"]
    assert (KERNELS / "vitq_kernels.h").is_file()


def test_nvcc_compiles_all_kernels(tmp_path):
    nvcc = _nvcc()
    sources = sorted(KERNELS.glob("*.cu"))
    assert sources
    procs = []
    for arch in ARCHS:
        for src in sources:
            obj = tmp_path / f"{src.stem}.{arch}.o"
            cmd = [nvcc, "-std=c++17", f"-arch={arch}", "-Xptxas", "-warn-spills", "-c", str(src), "-o", str(obj)]
            procs.append((cmd, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True)))
    failures = []
    for cmd, obj, p in procs:
        out, _ = p.communicate(timeout=240)
        if p.returncode != 0 or not obj.is_file() or obj.stat().st_size == 0:
            failures.append(f"{' '.join(cmd)}\n{out}")
    assert not failures, "\n\n".join(failures)


def test_s4_mma_is_emitted_for_sm87(tmp_path):
    """The int4 tensor-core instruction really is in the sm_87 PTX (not compiled away)."""
    nvcc = _nvcc()
    ptx = tmp_path / "q.ptx"
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_87", "-ptx", str(KERNELS / "quant_linear_a4.cu"), "-o", str(ptx)],
                   check=True, capture_output=True, timeout=240)
    text = ptx.read_text()
    assert "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32" in text
    assert "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32" in text
    entries = [ln.split()[-1] for ln in text.splitlines() if ln.startswith(".visible .entry") or ".entry " in ln]
    assert "shfl.sync.bfly" in text  # the dynamic mode's row min/max warp reduction
    # row quantizer (static and dynamic, int8 and packed int4 operands), weight preparation, and the cp.async /
    # ldmatrix GEMM on the S4 and S8 paths, with the dynamic per-row epilogue, and the grouped dynamic mode's
    # quantizer and GEMM (per-group float accumulation)
    for name in ("quantize_rows_kernelILb0ELb0E", "quantize_rows_kernelILb0ELb1E", "quantize_rows_kernelILb1ELb0E",
                 "qgemm_kernelILb1ELb0ELb0ELb0E", "qgemm_kernelILb0ELb1ELb1ELb0E", "prepare_weights_kernelILb1E",
                 "quantize_groups_kernel", "qgemm_kernelILb0ELb0ELb1ELb1E", "qgemm_kernelILb0ELb1ELb1ELb1E"):
        assert any(name in e for e in entries), (name, entries)
    assert "cp.async.cg.shared.global" in text and "cp.async.wait_group" in text
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in text
