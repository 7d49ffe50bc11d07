"""trtexec command generation for TensorRT 10.x and 11.x, and build_engine.sh's version switch.

The script test runs bash with a stand-in ``trtexec`` (a shell script that prints a version banner and its
arguments). It tests only the script's own logic (version detection, flag selection, flag checks); it does not
exercise TensorRT."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import pytest

from vitq.errors import UnsupportedError
from vitq.trt.common import TrtBuildOptions
from vitq.trt.trtexec import render_build_script, script_flags, trtexec_args, trtexec_command

IMG = [{"name": "input", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]


def _args(major, **kw):
    opts = kw.pop("opts", TrtBuildOptions(batch_range="1:8:32"))
    return trtexec_args(major, onnx="model.onnx", engine="model.engine", inputs=IMG, opts=opts, **kw)


def test_trt10_command():
    a = _args(10, timing_cache="timing.cache", plugin_lib="/p/libvitq.so",
              opts=TrtBuildOptions(batch_range="1:8:32", opt_level=4, hw_compat="ampere+", workspace_mib=512))
    assert a == ["--onnx=model.onnx", "--saveEngine=model.engine", "--stronglyTyped",
                 "--minShapes=input:1x3x224x224", "--optShapes=input:8x3x224x224", "--maxShapes=input:32x3x224x224",
                 "--timingCacheFile=timing.cache", "--builderOptimizationLevel=4",
                 "--hardwareCompatibilityLevel=ampere+", "--memPoolSize=workspace:512M",
                 "--dynamicPlugins=/p/libvitq.so", "--skipInference"]
    # the library is loaded at run time, not embedded: serialized plugin libraries are for version-compatible engines
    assert not any(x.startswith("--setPluginsToSerialize") for x in a)


def test_trt11_command_is_strongly_typed_without_flag():
    a10, a11 = _args(10), _args(11)
    assert "--stronglyTyped" in a10 and "--stronglyTyped" not in a11
    assert [x for x in a10 if x != "--stronglyTyped"] == a11
    removed_in_11 = {"--fp16", "--int8", "--bf16", "--fp8", "--int4", "--best", "--calib"}
    for major in (10, 11):
        assert not removed_in_11 & set(script_flags(major, onnx="m", engine="e", inputs=IMG,
                                                    opts=TrtBuildOptions()))


def test_static_model_gets_no_shapes():
    a = trtexec_args(10, onnx="m.onnx", engine="m.engine", inputs=[{"name": "x", "shape": [1, 3, 8, 8]}],
                     opts=TrtBuildOptions())
    assert not any(x.startswith(("--minShapes", "--optShapes", "--maxShapes")) for x in a)


def test_unsupported_major_and_names():
    with pytest.raises(UnsupportedError, match="TensorRT 9.x"):
        _args(9)
    with pytest.raises(UnsupportedError, match="input name"):
        trtexec_args(10, onnx="m", engine="e", inputs=[{"name": "a b", "shape": ["n", 3]}], opts=TrtBuildOptions())
    assert trtexec_command(11, onnx="my model.onnx", engine="e", inputs=IMG, opts=TrtBuildOptions()) \
        .startswith("trtexec '--onnx=my model.onnx'")


_FAKE = textwrap.dedent("""\
    #!/usr/bin/env bash
    # stand-in for trtexec: prints a TensorRT banner, its flags in --help, and the argv it was called with
    if [ "$1" = "--help" ]; then
      echo "&&&& RUNNING TensorRT.trtexec [TensorRT v${FAKE_V}] [b1] # trtexec --help"
      echo "  --onnx --saveEngine --minShapes --optShapes --maxShapes --timingCacheFile --skipInference"
      echo "  --builderOptimizationLevel --hardwareCompatibilityLevel --dynamicPlugins --setPluginsToSerialize"
      [ "${FAKE_V:0:2}" = "10" ] && echo "  --stronglyTyped"
      exit 0
    fi
    printf '%s\\n' "$@" > "$FAKE_OUT"
    """)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("banner,major", [("100300", 10), ("110401", 11)])
def test_build_script_switches_on_detected_version(tmp_path, banner, major):
    fake = tmp_path / "trtexec"
    fake.write_text(_FAKE)
    fake.chmod(0o755)
    (tmp_path / "model.onnx").write_bytes(b"x")
    script = tmp_path / "build_engine.sh"
    script.write_text(render_build_script(onnx="model.onnx", inputs=IMG, opts=TrtBuildOptions(opt_level=3)))
    out = tmp_path / "argv.txt"
    env = {**os.environ, "TRTEXEC": str(fake), "FAKE_V": banner, "FAKE_OUT": str(out)}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"TensorRT major version: {major}" in r.stdout
    got = out.read_text().split()
    assert got == _args(major, timing_cache="timing.cache", opts=TrtBuildOptions(opt_level=3))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_script_errors_are_readable(tmp_path):
    script = tmp_path / "build_engine.sh"
    script.write_text(render_build_script(onnx="model.onnx", inputs=IMG, opts=TrtBuildOptions()))
    (tmp_path / "model.onnx").write_bytes(b"x")
    env = {**os.environ, "TRTEXEC": str(tmp_path / "nope")}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "trtexec not found" in r.stderr
    fake = tmp_path / "trtexec"
    fake.write_text("#!/usr/bin/env bash\necho 'no banner'\n")
    fake.chmod(0o755)
    env = {**os.environ, "TRTEXEC": str(fake), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    if "cannot tell the TensorRT major version" not in r.stderr:  # host has dpkg/python TensorRT: detection worked
        pytest.skip("this host reports a TensorRT version through dpkg or python")
    assert r.returncode == 2 and "VITQ_TRT_MAJOR" in r.stderr
