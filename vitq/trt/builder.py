"""Build a TensorRT engine from an ONNX file (TensorRT 10.x / 11.x Python API), or, where ``tensorrt`` does not
import, write ``build_engine.sh`` so the engine is built on the target.

TensorRT API used (checked against NVIDIA's Python API docs and the pybind sources in NVIDIA/TensorRT
``python/src/infer/pyCore.cpp`` / ``python/src/parsers/pyOnnx.cpp``):

* ``trt.Logger``, ``trt.Builder(logger)``, ``builder.get_plugin_registry().load_library(path)``
* ``builder.create_network(flags)``; flags ``1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)`` on 10.x.
  On 11.x the flag is deprecated and ignored ("Strongly typed mode is always enabled"), so vitq passes 0.
* ``trt.OnnxParser(network, logger)``, ``parser.parse_from_file(path)``, ``parser.num_errors``,
  ``parser.get_error(i)`` -> ``ParserError`` with ``code() desc() node() node_name() node_operator()``
* ``builder.create_optimization_profile()``, ``profile.set_shape(name, min, opt, max)``,
  ``config.add_optimization_profile(profile)``
* ``builder.create_builder_config()``, ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, bytes)``,
  ``config.builder_optimization_level``, ``config.hardware_compatibility_level =
  trt.HardwareCompatibilityLevel.AMPERE_PLUS``, ``config.create_timing_cache(bytes)``,
  ``config.set_timing_cache(cache, ignore_mismatch) -> bool``, ``config.get_timing_cache()`` (may be None)
* ``builder.build_serialized_network(network, config)`` -> ``IHostMemory`` (buffer protocol) or ``None``

The plugin library is loaded once through the registry (``load_library``, the dynamic-plugin entry points
``getCreators``/``setLoggerFinder``) and is NOT serialized into the engine: ``plugins_to_serialize`` is for
version-compatible engines, which vitq does not build; the runtime loads the same library (recorded in the
``model.engine.json`` sidecar) before deserializing.

Where ``tensorrt`` imports, the module is imported by name inside the functions below, so that ``mypy`` checks
every call against ``tensorrt-stubs`` (tests/test_trt_typecheck.py). None of this has run in vitq's CI (TensorRT
cannot be installed there); tests that need it use ``pytest.importorskip("tensorrt")``.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import __version__
from ..artifacts import sha256_file, write_json_atomic
from ..errors import InputError, UnsupportedError, VitqError
from ..format import ARTIFACT_ENGINE, META_MODEL
from .common import (ENGINE_META_SCHEMA, ENGINE_META_SUFFIX, TrtBuildOptions, TrtUnavailableError, check_trt_version,
                     load_plugin_library, profile_shapes, read_onnx_io)
from .trtexec import render_build_script, trtexec_command

if TYPE_CHECKING:  # for mypy with tensorrt-stubs (tests/test_trt_typecheck.py)
    import tensorrt  # type: ignore[import-not-found, unused-ignore]

ENGINE_NAME = ARTIFACT_ENGINE
SCRIPT_NAME = "build_engine.sh"
DEFAULT_TIMING_CACHE = "timing.cache"


def import_tensorrt() -> tuple[Any, int]:
    """``(tensorrt module, major)``; raises :class:`TrtUnavailableError` ("TensorRT not found ...") naming why it is
    unusable. A ``tensorrt`` that imports without ``__version__`` (a namespace package left by type stubs, or a
    half-removed install) counts as not installed."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer
        raise TrtUnavailableError(f"TensorRT not found: the TensorRT Python bindings do not import here "
                                  f"({type(e).__name__}: {e})",
                                  hint="on a Jetson use JetPack's python3-libnvinfer; elsewhere pip install "
                                       "'vitq[trt]' on a machine with an NVIDIA GPU") from None
    version = getattr(trt, "__version__", None)
    if not isinstance(version, str):
        raise TrtUnavailableError(f"TensorRT not found: 'tensorrt' imports from {list(getattr(trt, '__path__', []))} "
                                  f"but is not the TensorRT bindings (no __version__; type stubs only?)",
                                  hint="install TensorRT's Python bindings (JetPack: python3-libnvinfer)")
    return trt, check_trt_version(version)


def engine_meta_path(engine_path: str | os.PathLike) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ENGINE_META_SUFFIX)


# -- parser errors -------------------------------------------------------------------------------------------------
def format_parser_errors(errors: Sequence[dict], onnx_path: str | os.PathLike | None = None) -> str:
    """Readable lines for ONNX-parser errors (dicts with ``node`` index, optional ``node_name``/``node_operator``,
    ``code``, ``desc``). Missing names are filled from the ONNX graph by node index."""
    nodes: list = []
    if onnx_path is not None and any(not e.get("node_name") for e in errors):
        try:
            import onnx

            nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
        except Exception:
            nodes = []
    lines = []
    for e in errors:
        idx = e.get("node", -1)
        name, op = e.get("node_name") or "", e.get("node_operator") or ""
        if (not name or not op) and isinstance(idx, int) and 0 <= idx < len(nodes):
            name = name or nodes[idx].name
            op = op or nodes[idx].op_type
        where = f"node #{idx}" if isinstance(idx, int) and idx >= 0 else "graph"
        if name:
            where += f" {name!r}"
        if op:
            where += f" ({op})"
        lines.append(f"  {where}: {e.get('code', 'ERROR')}: {e.get('desc', '').strip()}")
    return "\n".join(lines)


def _parser_errors(parser) -> list[dict]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        d = {"node": int(err.node()), "code": str(err.code()), "desc": str(err.desc())}
        for attr in ("node_name", "node_operator"):  # present in TensorRT 10.x; guard anyway
            fn = getattr(err, attr, None)
            if callable(fn):
                try:
                    d[attr] = str(fn())
                except Exception:
                    pass
        out.append(d)
    return out


# -- timing cache ---------------------------------------------------------------------------------------------------
def _use_timing_cache(config: "tensorrt.IBuilderConfig", cache_path: Path) -> str | None:
    """Attach the timing cache at ``cache_path`` (an empty one when the file is absent, unreadable or from another
    device/TensorRT: ``set_timing_cache(..., ignore_mismatch=False)`` returns False for those). Returns a warning
    or None."""
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    note = None
    cache = None
    try:
        cache = config.create_timing_cache(blob)
    except Exception as e:
        note = f"ignored unreadable timing cache {cache_path} ({e})"
    if cache is not None and config.set_timing_cache(cache, False):  # never reuse timings from another device
        return note
    if blob:
        note = note or f"ignored timing cache {cache_path}: TensorRT rejected it (from another device or version)"
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, False):
        return (note + "; " if note else "") + "TensorRT could not create a timing cache; building without one"
    return note


def _save_timing_cache(config: "tensorrt.IBuilderConfig", cache_path: Path) -> str | None:
    """Write the builder's timing cache to ``cache_path``; a warning (not an error) when there is none."""
    cache = config.get_timing_cache()
    if cache is None:
        return f"TensorRT returned no timing cache; {cache_path} is unchanged"
    data = cache.serialize()
    if data is None:
        return f"TensorRT could not serialize the timing cache; {cache_path} is unchanged"
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes_atomic(cache_path, memoryview(data))
    return None


# -- the build -----------------------------------------------------------------------------------------------------
def _write_bytes_atomic(path: Path, data) -> None:
    from ..artifacts import write_bytes_atomic

    write_bytes_atomic(path, bytes(data))


def sidecar_plugin_path(lib: str | os.PathLike | None, engine_dir: str | os.PathLike) -> str | None:
    """How ``model.engine.json`` names the plugin library: relative to the engine's folder when inside it (the
    folder can move), else absolute. :class:`vitq.runtime.trt_backend.TrtBackend` resolves it to an absolute path."""
    if lib is None:
        return None
    path, base = Path(lib).expanduser().absolute(), Path(engine_dir).absolute()
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def engine_metadata(onnx_path: str | os.PathLike, opts: TrtBuildOptions, *, tensorrt_version: str | None = None,
                    plugin_lib: str | None = None, engine_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The sidecar ``model.engine.json``: the ONNX model's ``vitq.*`` metadata (same keys as in the ONNX file),
    expected I/O and build settings, the TensorRT version and the plugin library the engine needs (see
    :func:`sidecar_plugin_path`; ``build_engine.sh`` fills both in on the device).
    :class:`vitq.runtime.trt_backend.TrtBackend` reads it."""
    ins, outs, meta = read_onnx_io(onnx_path)
    base = engine_dir if engine_dir is not None else Path(onnx_path).parent
    return {"schema": ENGINE_META_SCHEMA, "metadata": {k: v for k, v in meta.items() if k.startswith("vitq.")},
            "onnx": {"file": Path(onnx_path).name, "sha256": sha256_file(onnx_path)},
            "inputs": ins, "outputs": outs, "build": opts.to_dict(), "tensorrt_version": tensorrt_version,
            "plugin_library": sidecar_plugin_path(plugin_lib, base), "vitq_version": __version__}


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, opts: TrtBuildOptions, *,
                 echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Build ``engine_path`` (plus ``<engine>.json``) from ``onnx_path`` with the TensorRT Python API.
    Raises :class:`TrtUnavailableError` when TensorRT or a GPU is not usable here."""
    _, major = import_tensorrt()
    import tensorrt as trt  # type: ignore[import-not-found, unused-ignore]  # (checked above; typed by the stubs)

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX file not found: {onnx_path}")
    opts.check_plugin_lib()
    inputs, _, _ = read_onnx_io(onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as e:
        raise TrtUnavailableError(f"TensorRT {trt.__version__} imports but cannot create a builder "
                                  f"(no usable CUDA device?): {e}") from None
    if builder is None:
        raise TrtUnavailableError(f"TensorRT {trt.__version__} imports but cannot create a builder (no CUDA device?)")

    plugin_path = None
    if opts.plugin_lib is not None:
        plugin_path = load_plugin_library(builder.get_plugin_registry(), opts.plugin_lib, what="--plugin-lib")

    # 10.x: opt in to strong typing. 11.x: strong typing is the only mode and STRONGLY_TYPED is deprecated/ignored.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major == 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    echo(f"[vitq] TensorRT {trt.__version__}: parsing {onnx_path.name}")
    if not parser.parse_from_file(str(onnx_path)):
        errs = _parser_errors(parser)
        raise UnsupportedError(f"TensorRT {trt.__version__} cannot parse {onnx_path}:\n"
                               + format_parser_errors(errs, onnx_path),
                               hint="custom ops need --plugin-lib; unsupported ops need a graph pass")

    config = builder.create_builder_config()
    prof = profile_shapes(inputs, opts.batch_range)
    if prof:
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in prof:
                raise UnsupportedError(f"TensorRT network input {name!r} is not an input of {onnx_path.name}")
            lo, opt, hi = (trt.Dims(list(shape)) for shape in prof[name])
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if opts.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mib) << 20)
    if opts.opt_level is not None:
        config.builder_optimization_level = opts.opt_level
    if opts.hw_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    cache_path = opts.timing_cache
    cache_note = None
    if cache_path is not None:
        cache_note = _use_timing_cache(config, cache_path)
        if cache_note:
            echo(f"[vitq] WARNING: {cache_note}")

    echo(f"[vitq] building the engine (batch {opts.batch_range}; this takes minutes on a Jetson)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UnsupportedError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                               f"(the TensorRT log above names the layer)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_bytes_atomic(engine_path, memoryview(plan))
    if cache_path is not None:
        cache_note = _save_timing_cache(config, cache_path) or cache_note
    meta = engine_metadata(onnx_path, opts, tensorrt_version=trt.__version__, plugin_lib=plugin_path,
                           engine_dir=engine_path.parent)
    write_json_atomic(engine_meta_path(engine_path), meta)
    return {"engine": engine_path.name, "sha256": sha256_file(engine_path), "bytes": engine_path.stat().st_size,
            "tensorrt": trt.__version__, "strongly_typed": True, "batch_range": opts.batch_range.to_dict(),
            "timing_cache": str(cache_path) if cache_path else None, "timing_cache_note": cache_note,
            "plugin_library": meta["plugin_library"], "plugins_serialized": []}


def write_build_script(out_dir: str | os.PathLike, onnx_name: str, inputs: Sequence[dict], opts: TrtBuildOptions, *,
                       plugins_dir: str | None = None, model_name: str | None = None, cuda_arch: str | None = None,
                       build_plugins: bool = True) -> Path:
    """Write ``out_dir/build_engine.sh`` (:func:`vitq.trt.trtexec.render_build_script`), executable."""
    out_dir = Path(out_dir)
    cache = opts.timing_cache.name if opts.timing_cache else DEFAULT_TIMING_CACHE
    text = render_build_script(onnx=onnx_name, inputs=inputs, opts=opts, engine=ENGINE_NAME, timing_cache=cache,
                               plugins_dir=plugins_dir, model_name=model_name, cuda_arch=cuda_arch,
                               build_plugins=build_plugins)
    path = out_dir / SCRIPT_NAME
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def build_trt_target(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, opts: TrtBuildOptions | None = None,
                     *, echo: Callable[[str], None] = print, plugins_dir: str | None = None) -> dict[str, Any]:
    """What ``vitq compile --target trt`` calls after writing ``out_dir/model.onnx``.

    Always writes ``build_engine.sh`` (to rebuild on the device) and ``model.engine.json``. Builds ``model.engine``
    when TensorRT and a GPU are usable here; otherwise returns ``{"engine": None, "reason": ...}`` (not an error: the
    engine must be built on the target). ``plugins_dir``: folder (relative to ``out_dir``) with the plugin sources'
    CMakeLists.txt, built by the script before the engine. Returns the ``report["tensorrt"]`` entry."""
    opts = opts or TrtBuildOptions()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if onnx_path.resolve().parent != out_dir.resolve():
        shutil.copyfile(onnx_path, out_dir / onnx_path.name)
        onnx_path = out_dir / onnx_path.name
    inputs, outputs, meta = read_onnx_io(onnx_path)
    script = write_build_script(out_dir, onnx_path.name, inputs, opts, model_name=meta.get(META_MODEL),
                                plugins_dir=plugins_dir)
    cache = opts.timing_cache.name if opts.timing_cache else DEFAULT_TIMING_CACHE
    cmds = {f"tensorrt{m}": trtexec_command(m, onnx=onnx_path.name, engine=ENGINE_NAME, inputs=inputs, opts=opts,
                                            timing_cache=cache,
                                            plugin_lib=str(opts.plugin_lib) if opts.plugin_lib else None)
            for m in (10, 11)}
    entry: dict[str, Any] = {"engine": None, "build_script": script.name, "trtexec": cmds,
                             "options": opts.to_dict(), "inputs": inputs, "outputs": outputs}
    try:
        res = build_engine(onnx_path, out_dir / ENGINE_NAME, opts, echo=echo)
    except TrtUnavailableError as e:
        write_json_atomic(engine_meta_path(out_dir / ENGINE_NAME), engine_metadata(onnx_path, opts))
        entry["reason"] = (f"{e.args[0]}. The engine must be built on the target: copy {out_dir.name}/ there and "
                           f"run ./{script.name}")
        return entry
    except VitqError:
        raise
    except Exception as e:  # TensorRT raises plain RuntimeError/TypeError; name what failed
        raise UnsupportedError(f"TensorRT engine build from {onnx_path} failed: {type(e).__name__}: {e}") from None
    entry.update(res)
    return entry
