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


@pytest.mark.skipif(_trt_importable(), reason="TensorRT is importable here")
@pytest.mark.parametrize("command", ["bench", "eval"])
def test_cli_picks_tensorrt_for_an_engine_and_says_it_is_missing(tmp_path, capsys, command):
    """`vitq bench|eval model.engine` go to the TensorRT backend (not ONNX Runtime's "runs on the 'trt' backend"
    refusal) and stop with exit 2 and "TensorRT not found" where TensorRT is not installed."""
    from vitq.cli import main

    eng = tmp_path / "model.engine"
    eng.write_bytes(b"not really an engine")
    args = [command, str(eng)] + (["--images", str(tmp_path)] if command == "eval" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "TensorRT not found" in err and "'trt' backend" not in err and "Traceback" not in err


def test_tensorrt_namespace_package_counts_as_missing(tmp_path, monkeypatch):
    """A ``tensorrt`` folder holding only type stubs imports as an empty namespace package: not TensorRT."""
    from vitq.runtime.trt_backend import _import_trt
    from vitq.trt.builder import import_tensorrt
    from vitq.trt.common import TrtUnavailableError

    if _trt_importable():
        pytest.skip("TensorRT is importable here")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    for fn in (_import_trt, import_tensorrt):
        with pytest.raises(TrtUnavailableError, match="TensorRT not found.*no __version__"):
            fn()


class _Registry:
    """A stand-in plugin registry: what ``load_library`` returns is set by the test. It checks vitq's handling of
    the documented results (a handle, or None on failure); it does not exercise TensorRT."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def load_library(self, path):
        self.calls.append(path)
        return self.result


def test_plugin_library_is_loaded_once_by_absolute_path(tmp_path, monkeypatch):
    from vitq.trt import common

    monkeypatch.setattr(common, "_LOADED_PLUGIN_LIBRARIES", {})
    (tmp_path / "libvitq_plugins.so").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    reg = _Registry(result=object())
    path = common.load_plugin_library(reg, "libvitq_plugins.so")
    assert path == str(tmp_path / "libvitq_plugins.so") and reg.calls == [path]
    assert common.load_plugin_library(reg, tmp_path / "libvitq_plugins.so") == path
    assert reg.calls == [path]  # a second load_library would fail: the creators are registered already
    with pytest.raises(InputError, match="no such file"):
        common.load_plugin_library(reg, tmp_path / "absent.so")


def test_plugin_library_refused_by_the_registry_is_an_error(tmp_path, monkeypatch):
    from vitq.trt import common

    monkeypatch.setattr(common, "_LOADED_PLUGIN_LIBRARIES", {})
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"")
    with pytest.raises(InputError, match="refused it") as ei:
        common.load_plugin_library(_Registry(result=None), lib, what="--plugin-lib")
    assert str(lib) in str(ei.value) and "getCreators" in str(ei.value)
    assert common._LOADED_PLUGIN_LIBRARIES == {}


class _Config:
    """A stand-in builder config with the documented results of the timing-cache calls (``set_timing_cache``
    returns False for a cache from another device/version; ``get_timing_cache`` may return None). Checks vitq's
    handling only."""

    def __init__(self, accept_blob: bool, cache_after_build=True):
        self.accept_blob, self.cache_after_build, self.set = accept_blob, cache_after_build, []

    def create_timing_cache(self, blob):
        return ("cache", bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        ok = self.accept_blob or cache[1] == b""
        if ok:
            self.set.append(cache)
        return ok

    def get_timing_cache(self):
        if not self.cache_after_build:
            return None

        class _C:
            def serialize(self):
                return b"new-cache"

        return _C()


def test_timing_cache_rejected_or_absent_is_handled(tmp_path):
    from vitq.trt.builder import _save_timing_cache, _use_timing_cache

    cache = tmp_path / "t.cache"
    cache.write_bytes(b"from another device")
    cfg = _Config(accept_blob=False)
    note = _use_timing_cache(cfg, cache)
    assert "rejected" in note and cfg.set == [("cache", b"")]  # fell back to a fresh cache
    cfg = _Config(accept_blob=True)
    assert _use_timing_cache(cfg, cache) is None and cfg.set == [("cache", b"from another device")]
    assert _save_timing_cache(cfg, cache) is None and cache.read_bytes() == b"new-cache"
    note = _save_timing_cache(_Config(accept_blob=True, cache_after_build=False), cache)
    assert "no timing cache" in note and cache.read_bytes() == b"new-cache"


def test_sidecar_plugin_path_is_relative_inside_the_folder(tmp_path):
    from vitq.trt.builder import sidecar_plugin_path

    assert sidecar_plugin_path(tmp_path / "plugins" / "lib.so", tmp_path) == "plugins/lib.so"
    assert sidecar_plugin_path("/opt/x/lib.so", tmp_path) == "/opt/x/lib.so"
    assert sidecar_plugin_path(None, tmp_path) is None
