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

from vitq.errors import InputError, UnsupportedError
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


# --- the plugin build and the sidecar record of build_engine.sh (stand-in trtexec and cmake; real bash, python3) -----
_FAKE_CMAKE = textwrap.dedent("""\
    #!/usr/bin/env bash
    # stand-in for cmake: records its arguments; "--build DIR" creates DIR/libvitq_plugins.so
    printf '%s\\n' "$*" >> "$FAKE_CMAKE_LOG"
    if [ "$1" = "--build" ]; then touch "$2/libvitq_plugins.so"; fi
    if [ "$1" = "-S" ]; then mkdir -p "$4"; fi
    """)


def _bundle_like(tmp_path, *, build_plugins: bool):
    d = tmp_path / "bundle"
    (d / "plugins" / "trt").mkdir(parents=True)
    (d / "plugins" / "trt" / "CMakeLists.txt").write_text("# stand-in\n")
    (d / "model.onnx").write_bytes(b"x")
    (d / "model.engine.json").write_text('{"metadata": {"vitq.model": "m"}, "plugin_library": null}\n')
    script = d / "build_engine.sh"
    script.write_text(render_build_script(onnx="model.onnx", inputs=IMG, opts=TrtBuildOptions(),
                                          plugins_dir="plugins/trt", cuda_arch="87", build_plugins=build_plugins))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("trtexec", _FAKE), ("cmake", _FAKE_CMAKE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_ARCH", "PLUGIN_LIB", "TENSORRT_ROOT",
                                                            "VITQ_BUILD_PLUGINS", "VITQ_TRT_MAJOR")}
    # no nvcc on PATH (it is /usr/local/bin/nvcc here): the script must find JetPack's /usr/local/cuda/bin/nvcc
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_V="100300", FAKE_OUT=str(tmp_path / "argv.txt"),
               FAKE_CMAKE_LOG=str(tmp_path / "cmake.txt"))
    return d, script, env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_script_builds_plugins_for_sm87_with_jetpack_nvcc_and_records_them(tmp_path):
    import json

    if not os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        pytest.skip("no /usr/local/cuda/bin/nvcc on this host")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 (the script records the build with python3)")
    d, script, env = _bundle_like(tmp_path, build_plugins=True)
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    configure, build = (tmp_path / "cmake.txt").read_text().splitlines()
    assert "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc" in configure.split()
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in configure.split()
    assert build.split()[:4] == ["--build", "plugins/trt/build", "--target", "vitq_plugins"]
    lib = d / "plugins" / "trt" / "build" / "libvitq_plugins.so"
    argv = (tmp_path / "argv.txt").read_text().split()
    assert f"--dynamicPlugins={lib}" in argv  # absolute: a bare name makes dlopen search the system paths
    assert not any(a.startswith("--setPluginsToSerialize") for a in argv)
    side = json.loads((d / "model.engine.json").read_text())
    assert side["plugin_library"] == "plugins/trt/build/libvitq_plugins.so"  # relative to the engine's folder
    assert side["tensorrt_version"] == "10.3.0" and side["built"]["cuda_architectures"] == "87"
    assert side["metadata"] == {"vitq.model": "m"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_build_script_skips_plugins_the_model_does_not_need(tmp_path):
    import json

    d, script, env = _bundle_like(tmp_path, build_plugins=False)
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "cmake.txt").exists()
    assert not any(a.startswith("--dynamicPlugins") for a in (tmp_path / "argv.txt").read_text().split())
    if os.access("/usr/bin/python3", os.X_OK):
        assert json.loads((d / "model.engine.json").read_text())["plugin_library"] is None
    # a relative PLUGIN_LIB is taken from the caller's folder and passed absolute
    (tmp_path / "mylib.so").write_bytes(b"")
    r = subprocess.run(["bash", str(script)], env={**env, "PLUGIN_LIB": "mylib.so"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"--dynamicPlugins={tmp_path / 'mylib.so'}" in (tmp_path / "argv.txt").read_text().split()


def test_build_script_content_for_jetson(tiny_vit_onnx, tmp_path):
    """The bundle's script: valid bash, nvcc lookup in JetPack's place, sm_87 passed explicitly, TensorRT checked
    first, and no flag TensorRT does not support on a Jetson (hardware compatibility) or for this engine kind
    (serialized plugin libraries)."""
    from vitq.trt.bundle import write_bundle

    write_bundle(tiny_vit_onnx / "model.onnx", tmp_path / "b", model_name="t", recipe_hash="h", preprocess=None)
    text = (tmp_path / "b" / "build_engine.sh").read_text()
    if shutil.which("bash"):
        r = subprocess.run(["bash", "-n", str(tmp_path / "b" / "build_engine.sh")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert "/usr/local/cuda/bin/nvcc" in text and 'CUDA_ARCH="${CUDA_ARCH:-87}"' in text
    assert '-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH"' in text and '-DCMAKE_CUDA_COMPILER="$NVCC"' in text
    assert text.index("TensorRT not found") < text.index("cmake -S")
    for flag in ("--hardwareCompatibilityLevel", "--setPluginsToSerialize"):
        assert flag not in text
    with pytest.raises(InputError, match="--hw-compat ampere\\+ is not supported for --target jetson"):
        write_bundle(tiny_vit_onnx / "model.onnx", tmp_path / "c", model_name="t", recipe_hash="h",
                     preprocess=None, opts=TrtBuildOptions(hw_compat="ampere+"))
    assert not (tmp_path / "c").exists()
