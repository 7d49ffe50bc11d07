"""TensorRT runtime backend. Without TensorRT only the import behaviour and the error messages are testable; the
engine build + run test needs TensorRT and a GPU and is skipped elsewhere (it has not run in vitq's CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from vitq.errors import InputError, UnsupportedError


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


def test_module_imports_without_tensorrt_or_torch():
    code = ("import sys; import vitq.runtime.trt_backend, vitq.trt.bundle, vitq.trt.builder; "
            "bad = [m for m in ('torch', 'timm', 'tensorrt') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_missing_engine_is_named(tmp_path):
    from vitq.runtime.trt_backend import TrtBackend

    with pytest.raises(InputError, match="engine not found"):
        TrtBackend(tmp_path / "nope.engine")


@pytest.mark.skipif(_trt_importable(), reason="TensorRT is importable here")
def test_clear_error_without_tensorrt(tmp_path):
    from vitq.runtime import Engine
    from vitq.runtime.trt_backend import TrtBackend
    from vitq.trt.common import TrtUnavailableError

    eng = tmp_path / "model.engine"
    eng.write_bytes(b"not really an engine")
    with pytest.raises(TrtUnavailableError, match="'tensorrt' Python bindings") as ei:
        TrtBackend(eng)
    assert "--backend ort" in str(ei.value)
    with pytest.raises(UnsupportedError, match="tensorrt"):
        Engine.load(eng)


def test_sidecar_metadata(tmp_path):
    from vitq.runtime.trt_backend import read_sidecar, sidecar_path

    eng = tmp_path / "model.engine"
    assert read_sidecar(eng) == {}
    sidecar_path(eng).write_text(json.dumps({"metadata": {"vitq.model": "m"}}))
    assert read_sidecar(eng)["metadata"] == {"vitq.model": "m"}
    sidecar_path(eng).write_text("[1]")
    with pytest.raises(InputError, match="JSON object"):
        read_sidecar(eng)


def test_real_build_and_run(tiny_vit_onnx, tmp_path):
    """Needs TensorRT 10.3+/11.x, cuda-python and an NVIDIA GPU."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda")
    from vitq.runtime import Engine
    from vitq.trt.builder import build_trt_target
    from vitq.trt.common import TrtBuildOptions

    out = tmp_path / "art"
    entry = build_trt_target(tiny_vit_onnx / "model.onnx", out,
                             TrtBuildOptions(batch_range="1:2:4", timing_cache=tmp_path / "t.cache", opt_level=1))
    if entry["engine"] is None:
        pytest.skip(entry["reason"])
    assert (tmp_path / "t.cache").stat().st_size > 0
    trt_eng = Engine.load(out / "model.engine")
    ort_eng = Engine.load(out / "model.onnx")
    assert trt_eng.backend == "trt" and trt_eng.metadata["vitq.model"] == "tiny_vit"
    x = np.random.default_rng(0).standard_normal((7, 3, 32, 32)).astype(np.float32)  # > profile max: split
    np.testing.assert_allclose(trt_eng.run(x), ort_eng.run(x), atol=1e-2)
