"""The ``trtexec`` command equivalent to :func:`vitq.trt.builder.build_engine`, for TensorRT 10.x and 11.x, and the
``build_engine.sh`` script that picks between them on the device.

Flag spellings follow ``trtexec --help`` of TensorRT 10.x (``--onnx``, ``--saveEngine``, ``--minShapes/--optShapes/
--maxShapes``, ``--timingCacheFile``, ``--builderOptimizationLevel``, ``--hardwareCompatibilityLevel``,
``--memPoolSize=workspace:<MiB>``, ``--dynamicPlugins``, ``--setPluginsToSerialize``, ``--stronglyTyped``,
``--skipInference``) and NVIDIA's "Migrating trtexec Usage from TensorRT 10.x to 11.x" page: 11.x removed the
precision flags (``--fp16 --int8 --bf16 --fp8 --int4 --best``) and made ``--stronglyTyped`` unnecessary (always on),
so the 11.x command simply omits it. vitq never emits precision flags: precision lives in the Q/DQ graph.
Because the 11.x flag set was checked against documentation only, the script also checks every flag it uses
against the device's own ``trtexec --help`` before building.
"""

from __future__ import annotations

import re
import shlex
from typing import Sequence

from .. import __version__
from ..errors import UnsupportedError
from .common import SUPPORTED_TRT_MAJORS, TrtBuildOptions, profile_shapes

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
        args += [f"--dynamicPlugins={plugin_lib}", f"--setPluginsToSerialize={plugin_lib}"]
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


def render_build_script(*, onnx: str, inputs: Sequence[dict], opts: TrtBuildOptions, engine: str = "model.engine",
                        timing_cache: str = "timing.cache", plugins_dir: str | None = None,
                        model_name: str | None = None) -> str:
    """``build_engine.sh``: builds ``engine`` from ``onnx`` (paths relative to the script's folder) with the
    device's trtexec, choosing the TensorRT 10.x or 11.x command by detecting the installed version."""
    common = dict(onnx="${ONNX}", engine="${ENGINE}", inputs=inputs, opts=opts, timing_cache="${TIMING_CACHE}")
    a10 = trtexec_args(10, **common)
    a11 = trtexec_args(11, **common)
    plugin_block = ""
    if plugins_dir:
        plugin_block = f"""
# --- plugins: build the custom-op library from the bundled sources (skip with PLUGIN_LIB=/path/lib.so) ---------------
if [ -z "${{PLUGIN_LIB:-}}" ] && [ -f "{plugins_dir}/CMakeLists.txt" ]; then
  echo "[build_engine] building plugins in {plugins_dir}/ with cmake"
  cmake -S "{plugins_dir}" -B "{plugins_dir}/build" -DCMAKE_BUILD_TYPE=Release
  cmake --build "{plugins_dir}/build" -j"$(nproc 2>/dev/null || echo 2)"
  PLUGIN_LIB=$(find "{plugins_dir}/build" -maxdepth 3 -name 'lib*.so' -type f | sort | head -n1)
  if [ -z "$PLUGIN_LIB" ]; then
    echo "[build_engine] error: the plugin build produced no lib*.so under {plugins_dir}/build" >&2
    exit 3
  fi
  PLUGIN_LIB="$(pwd)/$PLUGIN_LIB"
fi
"""
    return f"""#!/usr/bin/env bash
# Generated by vitq {__version__}{f' for {model_name}' if model_name else ''}.
# Builds the TensorRT engine on THIS device (engines are specific to the GPU and the TensorRT version).
#
#   ./build_engine.sh                       # detect TensorRT 10.x / 11.x, build {engine}
#   VITQ_TRT_MAJOR=10 ./build_engine.sh     # skip detection
#   TRTEXEC=/path/to/trtexec ENGINE=out.engine TIMING_CACHE=/var/cache/vitq.cache PLUGIN_LIB=/path/lib.so ...
#
# Equivalent commands (batch range {opts.batch_range}):
#   TensorRT 10.x: trtexec {' '.join(a10)}
#   TensorRT 11.x: trtexec {' '.join(a11)}
set -euo pipefail
cd "$(dirname "$0")"

ONNX="{onnx}"
ENGINE="${{ENGINE:-{engine}}}"
TIMING_CACHE="${{TIMING_CACHE:-{timing_cache}}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ ! -x "$TRTEXEC" ]; then
  echo "[build_engine] error: trtexec not found (looked on PATH and at /usr/src/tensorrt/bin/trtexec);" \\
       "install TensorRT (JetPack: apt install tensorrt) or set TRTEXEC=/path/to/trtexec" >&2
  exit 2
fi
[ -f "$ONNX" ] || {{ echo "[build_engine] error: $ONNX is missing next to this script" >&2; exit 2; }}

HELP="$("$TRTEXEC" --help 2>&1 || true)"

# --- which TensorRT? trtexec's banner ("TensorRT v100300"), else dpkg, else the Python bindings ----------------------
TRT_VERSION=""
detect_major() {{
  local v
  v=$(grep -o 'TensorRT v[0-9]\\+' <<<"$HELP" | sed -n '1s/TensorRT v//p' || true)
  if [ -n "$v" ]; then
    TRT_VERSION="$((10#$v / 10000)).$(((10#$v / 100) % 100)).$((10#$v % 100))"
    echo $((10#$v / 10000)); return
  fi
  v=$(dpkg-query -W -f='${{Version}}' libnvinfer-bin 2>/dev/null || dpkg-query -W -f='${{Version}}' tensorrt 2>/dev/null || true)
  if [ -n "$v" ]; then TRT_VERSION="$v"; echo "${{v%%.*}}"; return; fi
  v=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
  if [ -n "$v" ]; then TRT_VERSION="$v"; echo "${{v%%.*}}"; return; fi
  echo unknown
}}
if [ -n "${{VITQ_TRT_MAJOR:-}}" ]; then MAJOR="$VITQ_TRT_MAJOR"; else MAJOR="$(detect_major)"; fi
echo "[build_engine] TensorRT major version: $MAJOR ${{TRT_VERSION:+($TRT_VERSION)}}"
{plugin_block}
case "$MAJOR" in
  10) ARGS={_bash_array(a10)} ;;
  11) ARGS={_bash_array(a11)} ;;
  *)
    echo "[build_engine] error: cannot tell the TensorRT major version (got '$MAJOR');" \\
         "set VITQ_TRT_MAJOR=10 (JetPack 6.x) or VITQ_TRT_MAJOR=11 (JetPack 7.2.2+)" >&2
    exit 2 ;;
esac
if [ -n "${{PLUGIN_LIB:-}}" ]; then
  ARGS+=("--dynamicPlugins=$PLUGIN_LIB" "--setPluginsToSerialize=$PLUGIN_LIB")
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
"""


def script_flags(major: int, **kw) -> list[str]:
    """Flag names (``--onnx`` ...) used for ``major``; handy for tests and reports."""
    return _flag_names(trtexec_args(major, **kw))
