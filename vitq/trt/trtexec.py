"""The ``trtexec`` command equivalent to :func:`vitq.trt.builder.build_engine`, for TensorRT 10.x and 11.x, and the
``build_engine.sh`` script that picks between them on the device.

Flag spellings follow ``trtexec --help`` of TensorRT 10.x (``--onnx``, ``--saveEngine``, ``--minShapes/--optShapes/
--maxShapes``, ``--timingCacheFile``, ``--builderOptimizationLevel``, ``--hardwareCompatibilityLevel``,
``--memPoolSize=workspace:<MiB>``, ``--dynamicPlugins``, ``--stronglyTyped``, ``--skipInference``) and NVIDIA's "Migrating trtexec Usage from TensorRT 10.x to 11.x" page: 11.x removed the
precision flags (``--fp16 --int8 --bf16 --fp8 --int4 --best``) and made ``--stronglyTyped`` unnecessary (always on),
so the 11.x command simply omits it. vitq never emits precision flags: precision lives in the Q/DQ graph.
Because the 11.x flag set was checked against documentation only, the script also checks every flag it uses
against the device's own ``trtexec --help`` before building.

The plugin library is passed with ``--dynamicPlugins`` only (loaded through ``getCreators``), never with
``--setPluginsToSerialize``: serialized plugin libraries are for version-compatible engines, and the runtime loads
the library named in ``model.engine.json`` itself.
"""

from __future__ import annotations

import re
import shlex
from typing import Sequence

from .. import __version__
from ..errors import UnsupportedError
from .common import DEFAULT_CUDA_ARCHITECTURES, SUPPORTED_TRT_MAJORS, TrtBuildOptions, profile_shapes

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.:/\-]+")
_SAFE_VALUE = re.compile(r"[^\"`\\]*")  # safe inside double quotes apart from $-expansions we write ourselves


def _shape_spec(shapes: dict[str, tuple[int, ...]]) -> str:
    parts = []
    for name, shape in shapes.items():
        if not _SAFE_NAME.fullmatch(name) or ":" in name:
            raise UnsupportedError(f"input name {name!r} cannot be written in a trtexec shape spec; rename the input")
        parts.append(f"{name}:{'x'.join(str(d) for d in shape)}")
    return ",".join(parts)


def trtexec_args(major: int, *, onnx: str, engine: str, inputs: Sequence[dict], opts: TrtBuildOptions,
                 timing_cache: str | None = None, plugin_lib: str | None = None) -> list[str]:
    """The trtexec arguments (without the program name) for TensorRT ``major`` (10 or 11)."""
    if major not in SUPPORTED_TRT_MAJORS:
        raise UnsupportedError(f"no trtexec command for TensorRT {major}.x (supported: "
                               f"{', '.join(f'{m}.x' for m in SUPPORTED_TRT_MAJORS)})")
    args = [f"--onnx={onnx}", f"--saveEngine={engine}"]
    if major == 10:
        args.append("--stronglyTyped")  # 11.x: strongly typed is the only mode, the flag is not needed
    prof = profile_shapes(inputs, opts.batch_range)
    if prof:
        for i, key in enumerate(("--minShapes", "--optShapes", "--maxShapes")):
            args.append(f"{key}={_shape_spec({n: s[i] for n, s in prof.items()})}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if opts.opt_level is not None:
        args.append(f"--builderOptimizationLevel={opts.opt_level}")
    if opts.hw_compat != "none":
        args.append(f"--hardwareCompatibilityLevel={opts.hw_compat}")
    if opts.workspace_mib:
        args.append(f"--memPoolSize=workspace:{int(opts.workspace_mib)}M")
    if plugin_lib:
        args.append(f"--dynamicPlugins={plugin_lib}")
    args.append("--skipInference")
    return args


def trtexec_command(major: int, **kw) -> str:
    """One shell-quoted command line (``trtexec ...``) for documentation and reports."""
    return " ".join(["trtexec"] + [shlex.quote(a) for a in trtexec_args(major, **kw)])


def _bash_array(args: Sequence[str]) -> str:
    out = []
    for a in args:
        if not _SAFE_VALUE.fullmatch(a):
            raise UnsupportedError(f"cannot write trtexec argument {a!r} into build_engine.sh")
        out.append(f'"{a}"')
    return "(\n    " + "\n    ".join(out) + "\n  )"


def _flag_names(args: Sequence[str]) -> list[str]:
    names = []
    for a in args:
        n = a.split("=", 1)[0]
        if n not in names:
            names.append(n)
    return names


_SAFE_ARCH = re.compile(r"[0-9]{2,3}[af]?(;[0-9]{2,3}[af]?)*")


def render_build_script(*, onnx: str, inputs: Sequence[dict], opts: TrtBuildOptions, engine: str = "model.engine",
                        timing_cache: str = "timing.cache", plugins_dir: str | None = None,
                        model_name: str | None = None, cuda_arch: str | None = None,
                        build_plugins: bool = True) -> str:
    """``build_engine.sh``: builds ``engine`` from ``onnx`` (paths relative to the script's folder) with the
    device's trtexec, choosing the TensorRT 10.x or 11.x command by detecting the installed version.

    Order: find TensorRT (trtexec; stops with "TensorRT not found" before any other work), build the plugin library
    from ``plugins_dir`` with CMake when ``build_plugins`` (the model has custom ops; ``VITQ_BUILD_PLUGINS=0|1``
    overrides) for ``cuda_arch`` (CMake's ``CMAKE_CUDA_ARCHITECTURES``; None: the GPU's compute capability from
    ``nvidia-smi``, else the CMake project's default set), with nvcc from ``PATH`` or ``/usr/local/cuda/bin``
    (JetPack's place, often not on ``PATH``); then run trtexec and record the TensorRT version and the plugin
    library in ``<engine>.json``."""
    a10 = trtexec_args(10, onnx="${ONNX}", engine="${ENGINE}", inputs=inputs, opts=opts,
                       timing_cache="${TIMING_CACHE}")
    a11 = trtexec_args(11, onnx="${ONNX}", engine="${ENGINE}", inputs=inputs, opts=opts,
                       timing_cache="${TIMING_CACHE}")
    if cuda_arch is not None and not _SAFE_ARCH.fullmatch(cuda_arch):
        raise UnsupportedError(f"CUDA architecture {cuda_arch!r}: expected e.g. 87 or 80;86")
    default_set = ";".join(DEFAULT_CUDA_ARCHITECTURES)
    plugin_block = ""
    if plugins_dir:
        if not _SAFE_NAME.fullmatch(plugins_dir):
            raise UnsupportedError(f"plugin folder {plugins_dir!r} cannot be written into build_engine.sh")
        arch_default = (f'"${{CUDA_ARCH:-{cuda_arch}}}"' if cuda_arch else
                        '"${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null '
                        '| head -n1 | tr -d \'. \' || true)}"')
        plugin_block = f"""
# --- plugins: build the custom-op library from the bundled sources (skip with PLUGIN_LIB=/path/lib.so) ---------------
BUILD_PLUGINS="${{VITQ_BUILD_PLUGINS:-{1 if build_plugins else 0}}}"  # 1 when the model has custom ops
if [ -z "${{PLUGIN_LIB:-}}" ] && [ "$BUILD_PLUGINS" = 1 ] && [ -f "{plugins_dir}/CMakeLists.txt" ]; then
  # nvcc: $CUDACXX, else PATH, else JetPack's /usr/local/cuda/bin (often not on PATH)
  NVCC="${{CUDACXX:-$(command -v nvcc || true)}}"
  if [ -z "$NVCC" ]; then
    for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
      if [ -x "$c" ]; then NVCC="$c"; break; fi
    done
  fi
  if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "[build_engine] error: nvcc not found (looked at \\$CUDACXX, on PATH and in /usr/local/cuda/bin);" \\
         "install the CUDA toolkit (JetPack: sudo apt install cuda-toolkit) or set CUDACXX=/path/to/nvcc" >&2
    exit 2
  fi
  command -v cmake >/dev/null || {{ echo "[build_engine] error: cmake not found (sudo apt install cmake)" >&2; exit 2; }}
  CUDA_ARCH={arch_default}
  CUDA_ARCH="${{CUDA_ARCH:-{default_set}}}"
  echo "[build_engine] building plugins in {plugins_dir}/ (nvcc $NVCC, CUDA architectures $CUDA_ARCH)"
  cmake -S "{plugins_dir}" -B "{plugins_dir}/build" -DCMAKE_BUILD_TYPE=Release \\
        -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \\
        ${{TENSORRT_ROOT:+-DTENSORRT_ROOT="$TENSORRT_ROOT"}}
  cmake --build "{plugins_dir}/build" --target vitq_plugins -j"$(nproc 2>/dev/null || echo 2)"
  PLUGIN_LIB="$(pwd)/{plugins_dir}/build/libvitq_plugins.so"
  if [ ! -f "$PLUGIN_LIB" ]; then
    echo "[build_engine] error: the plugin build produced no $PLUGIN_LIB" >&2
    exit 3
  fi
fi
if [ -n "${{PLUGIN_LIB:-}}" ]; then
  case "$PLUGIN_LIB" in /*) ;; *) PLUGIN_LIB="$CALLER_DIR/$PLUGIN_LIB" ;; esac  # absolute: a bare name makes dlopen search the system paths
  [ -f "$PLUGIN_LIB" ] || {{ echo "[build_engine] error: PLUGIN_LIB=$PLUGIN_LIB: no such file" >&2; exit 2; }}
fi
"""
    return f"""#!/usr/bin/env bash
# Generated by vitq {__version__}{f' for {model_name}' if model_name else ''}.
# Builds the TensorRT engine on THIS device (engines are specific to the GPU and the TensorRT version).
#
#   ./build_engine.sh                       # detect TensorRT 10.x / 11.x, build {engine}
#   VITQ_TRT_MAJOR=10 ./build_engine.sh     # skip detection
#   TRTEXEC=/path/to/trtexec ENGINE=out.engine TIMING_CACHE=/var/cache/vitq.cache PLUGIN_LIB=/path/lib.so ...
#   CUDACXX=/path/to/nvcc CUDA_ARCH=87 TENSORRT_ROOT=/usr VITQ_BUILD_PLUGINS=1 ...   # plugin build settings
#
# Equivalent commands (batch range {opts.batch_range}):
#   TensorRT 10.x: trtexec {' '.join(a10)}
#   TensorRT 11.x: trtexec {' '.join(a11)}
set -euo pipefail
CALLER_DIR="$(pwd)"
cd "$(dirname "$0")"

ONNX="{onnx}"
ENGINE="${{ENGINE:-{engine}}}"
TIMING_CACHE="${{TIMING_CACHE:-{timing_cache}}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "[build_engine] error: TensorRT not found: trtexec not found (looked on PATH and at" \\
       "/usr/src/tensorrt/bin/trtexec); install TensorRT (JetPack: sudo apt install tensorrt) or set" \\
       "TRTEXEC=/path/to/trtexec" >&2
  exit 2
fi
[ -f "$ONNX" ] || {{ echo "[build_engine] error: $ONNX is missing next to this script" >&2; exit 2; }}

HELP="$("$TRTEXEC" --help 2>&1 || true)"

# --- which TensorRT? trtexec's banner ("TensorRT v100300"), else dpkg, else the Python bindings ----------------------
TRT_VERSION=""
MAJOR="${{VITQ_TRT_MAJOR:-}}"
detect_major() {{  # sets MAJOR and TRT_VERSION
  local v
  v=$(grep -o 'TensorRT v[0-9]\\+' <<<"$HELP" | sed -n '1s/TensorRT v//p' || true)
  if [ -n "$v" ]; then
    TRT_VERSION="$((10#$v / 10000)).$(((10#$v / 100) % 100)).$((10#$v % 100))"; MAJOR=$((10#$v / 10000)); return
  fi
  v=$(dpkg-query -W -f='${{Version}}' libnvinfer-bin 2>/dev/null || dpkg-query -W -f='${{Version}}' tensorrt 2>/dev/null || true)
  if [ -n "$v" ]; then TRT_VERSION="$v"; MAJOR="${{v%%.*}}"; return; fi
  v=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
  if [ -n "$v" ]; then TRT_VERSION="$v"; MAJOR="${{v%%.*}}"; return; fi
  MAJOR=unknown
}}
[ -n "$MAJOR" ] || detect_major
echo "[build_engine] TensorRT major version: $MAJOR ${{TRT_VERSION:+($TRT_VERSION)}}"
case "$MAJOR" in
  10) ARGS={_bash_array(a10)} ;;
  11) ARGS={_bash_array(a11)} ;;
  *)
    echo "[build_engine] error: cannot tell the TensorRT major version (got '$MAJOR');" \\
         "set VITQ_TRT_MAJOR=10 (JetPack 6.x) or VITQ_TRT_MAJOR=11 (JetPack 7.2.2+)" >&2
    exit 2 ;;
esac
{plugin_block}
if [ -n "${{PLUGIN_LIB:-}}" ]; then
  ARGS+=("--dynamicPlugins=$PLUGIN_LIB")
fi

# --- refuse flags this trtexec does not know (the 11.x flag set is documented, not yet run by vitq) -----------------
MISSING=""
for a in "${{ARGS[@]}}"; do
  f="${{a%%=*}}"
  # (a here-string, not a pipe: with pipefail, grep -q closing the pipe early would look like a failure)
  if [ -n "$HELP" ] && ! grep -q -e "$f" <<<"$HELP"; then MISSING="$MISSING $f"; fi
done
if [ -n "$MISSING" ]; then
  echo "[build_engine] error: this trtexec does not list:$MISSING (see '$TRTEXEC --help')" >&2
  exit 2
fi

echo "[build_engine] $TRTEXEC ${{ARGS[*]}}"
"$TRTEXEC" "${{ARGS[@]}}"
echo "[build_engine] wrote $ENGINE (timing cache: $TIMING_CACHE)"

# --- record what was built in $ENGINE.json (the TensorRT backend loads the plugin library named there) --------------
if command -v python3 >/dev/null; then
  python3 - "{engine}.json" "$ENGINE.json" "$ENGINE" "${{PLUGIN_LIB:-}}" "${{TRT_VERSION:-$MAJOR}}" "${{CUDA_ARCH:-}}" <<'PY'
import datetime, json, os, sys
src, dst, engine, lib, version, arch = sys.argv[1:7]
meta = {{}}
for p in (dst, src):
    if os.path.isfile(p):
        with open(p) as f:
            meta = json.load(f)
        break
base = os.path.dirname(os.path.abspath(engine))
if lib:
    lib = os.path.abspath(lib)
    rel = os.path.relpath(lib, base)
    lib = lib if rel.startswith("..") else rel  # inside the engine's folder: relative, so the folder can move
meta["plugin_library"] = lib or None
meta["tensorrt_version"] = version
meta["built"] = {{"utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "engine": os.path.basename(engine), "cuda_architectures": arch or None}}
tmp = dst + ".tmp"
with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\\n")
os.replace(tmp, dst)
print(f"[build_engine] recorded plugin_library={{meta['plugin_library']}} tensorrt_version={{version}} in {{dst}}")
PY
else
  echo "[build_engine] warning: python3 not found: $ENGINE.json does not name the plugin library (pass it to" \\
       "the runtime yourself)" >&2
fi
"""


def script_flags(major: int, **kw) -> list[str]:
    """Flag names (``--onnx`` ...) used for ``major``; handy for tests and reports."""
    return _flag_names(trtexec_args(major, **kw))
