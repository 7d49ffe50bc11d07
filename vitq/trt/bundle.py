"""The Jetson deployment bundle: one folder to copy to the device, build the engine there, and run.

    BUNDLE/
      model.onnx            the (TensorRT-lowered) model; external-data files beside it when it has them
      model.engine.json     vitq metadata for the engine built on the device (read by the TensorRT backend)
      build_engine.sh       builds plugins (cmake) and model.engine with the device's trtexec (TensorRT 10.x or 11.x)
      plugins/              custom-op sources + CMakeLists.txt (only when vitq/plugins has them)
      README.md             the on-device steps
      manifest.json         model, recipe hash, expected I/O, required TensorRT/JetPack, SM, sha256 of every file

``verify_bundle`` / ``vitq bundle verify DIR`` re-hashes every file and checks completeness and consistency.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from .. import __version__
from ..artifacts import atomic_output_dir, sha256_file, write_json_atomic
from ..errors import InputError, VerificationError
from ..format import (ARTIFACT_MODEL, META_MODEL, META_NUM_CLASSES, META_PREPROCESS, META_RECIPE_HASH,
                      SCHEMA_JETSON_BUNDLE)
from .builder import ENGINE_NAME, SCRIPT_NAME, engine_meta_path, engine_metadata, write_build_script
from .common import REQUIRED_TENSORRT, TARGET_CUDA_ARCH, TARGET_SM, TrtBuildOptions, read_onnx_io
from .trtexec import trtexec_command

BUNDLE_SCHEMA = SCHEMA_JETSON_BUNDLE
MANIFEST = "manifest.json"
README = "README.md"
MODEL = ARTIFACT_MODEL
PLUGINS = "plugins"
REQUIRED_FILES = (MODEL, SCRIPT_NAME, README, ENGINE_NAME + ".json")
_STANDARD_DOMAINS = ("", "ai.onnx")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "build", ".*", "*.o", "*.so")


def default_plugin_sources() -> Path:
    return Path(__file__).resolve().parents[1] / "plugins"


def _custom_ops(onnx_path: Path) -> list[dict[str, str]]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    seen: dict[tuple[str, str], None] = {}
    for node in model.graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            seen[(node.domain, node.op_type)] = None
    return [{"domain": d, "op_type": o} for d, o in seen]


def _external_data_files(onnx_path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files: list[str] = []
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in files:
                files.append(loc)
    return files


def _copy_plugins(src: Path | None, stage: Path) -> str | None:
    """Copy ``src/kernels``, ``src/trt`` and ``src/CMakeLists.txt`` into ``stage/plugins``. Returns the bundle path of
    the folder holding the top-level CMakeLists.txt, or None when there is nothing (yet) to build."""
    if src is None or not src.is_dir():
        return None
    dest = stage / PLUGINS
    copied = False
    for sub in ("kernels", "trt"):
        if (src / sub).is_dir() and any((src / sub).iterdir()):
            shutil.copytree(src / sub, dest / sub, ignore=_IGNORE)
            copied = True
    if (src / "CMakeLists.txt").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / "CMakeLists.txt", dest / "CMakeLists.txt")
        copied = True
    if not copied:
        return None
    for cand in (dest, dest / "trt", dest / "kernels"):
        if (cand / "CMakeLists.txt").is_file():
            return cand.relative_to(stage).as_posix()
    return None


def _readme(manifest: Mapping[str, Any]) -> str:
    br = manifest["batch_range"]
    plugins = manifest["plugins"]
    inp = manifest["io"]["inputs"][0] if manifest["io"]["inputs"] else {"name": "input", "shape": []}
    d = plugins["cmake_dir"]
    arch = manifest["target"].get("cuda_architectures") or TARGET_CUDA_ARCH
    when = ("`build_engine.sh` does this for you" if plugins["custom_ops"] else
            "The model uses no custom ops: `build_engine.sh` skips this step (`VITQ_BUILD_PLUGINS=1 ./build_engine.sh` "
            "builds the library anyway)")
    plugin_step = (f"""## 2. Build the plugins (custom ops: {', '.join(o['op_type'] for o in plugins['custom_ops']) or 'none'})

{when}. It builds `{d}/build/libvitq_plugins.so` for SM {manifest['target']['sm']} with nvcc from `PATH` or
`/usr/local/cuda/bin` (override: `CUDACXX=`, `CUDA_ARCH=`, `TENSORRT_ROOT=`), and records it in
`{ENGINE_NAME}.json`, from where vitq's TensorRT backend loads it. By hand:

```bash
cmake -S {d} -B {d}/build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES={arch} \\
      -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc
cmake --build {d}/build --target vitq_plugins -j$(nproc)
PLUGIN_LIB={d}/build/libvitq_plugins.so ./build_engine.sh   # uses it and records it in {ENGINE_NAME}.json
```

`-DVITQ_KERNELS_ONLY=ON` configures only the CUDA kernels (no TensorRT needed): a check of the CUDA toolchain.
""" if d else "## 2. Plugins\n\nThis bundle carries no plugin sources"
       + (" although the model uses custom ops "
          + ", ".join(f"{o['domain']}::{o['op_type']}" for o in plugins["custom_ops"])
          + ": the engine build will fail until a plugin library is given with `PLUGIN_LIB=/path/lib.so`.\n"
          if plugins["custom_ops"] else " and the model needs none.\n"))
    return f"""# vitq Jetson bundle: {manifest['model']}

Created by vitq {manifest['vitq_version']} on {manifest['created_utc']} (recipe hash `{manifest['recipe_hash']}`).
Target: Jetson Orin (SM {manifest['target']['sm']}) with TensorRT 10.3+ (JetPack 6.x) or TensorRT 11.4.1+
(JetPack 7.2.2+). Engines are specific to the GPU and the TensorRT version, so the engine is built **on the device**.

## 1. Check the bundle (on the device or before copying)

```bash
pip install 'vitq[runtime]'          # no torch needed
vitq bundle verify .                 # sha256 of every file, completeness
```

{plugin_step}
## 3. Build the engine

```bash
./build_engine.sh                    # detects TensorRT 10.x/11.x, writes {ENGINE_NAME} and timing.cache
```

Without TensorRT the script stops first, with `TensorRT not found` (exit 2).

Batch range (min:opt:max) {br['min']}:{br['opt']}:{br['max']} on input `{inp['name']}` {inp['shape']}.
The equivalent commands are in `manifest.json` (`engine.trtexec`). Set `VITQ_TRT_MAJOR=10|11` to skip detection,
`TRTEXEC=` for a trtexec that is not on PATH (JetPack: `/usr/src/tensorrt/bin/trtexec`).

## 4. Run

```bash
pip install 'vitq[runtime]'          # numpy + onnxruntime; TensorRT comes from JetPack (python3-libnvinfer)
pip install 'cuda-python>=12,<13'    # JetPack 6 (CUDA 12); JetPack 7 (CUDA 13): cuda-python>=13
vitq bench {ENGINE_NAME} --batch 1 {br['opt']}
vitq eval {ENGINE_NAME} --images /path/to/labeled/images
```

`vitq bench`/`vitq eval` run the engine through vitq's TensorRT backend (metadata from `{ENGINE_NAME}.json`).
`model.onnx` also runs on the CPU with ONNX Runtime: `vitq bench model.onnx`.
"""


def write_bundle(onnx_path: str | os.PathLike, out_dir: str | os.PathLike, *, model_name: str, recipe_hash: str,
                 preprocess: Mapping[str, Any] | str | None, batch_range: str | None = None,
                 plugin_sources_dir: str | os.PathLike | None = None, opts: TrtBuildOptions | None = None,
                 num_classes: int | None = None) -> dict[str, Any]:
    """Write the bundle atomically to ``out_dir``; returns the manifest. ``plugin_sources_dir`` defaults to
    ``vitq/plugins`` (its ``kernels/``, ``trt/`` and ``CMakeLists.txt`` are copied when they exist)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX file not found: {onnx_path}")
    if opts is None:
        opts = TrtBuildOptions(batch_range=batch_range)
    elif batch_range is not None:
        raise InputError("give the batch range either in opts or as batch_range=, not both")
    pre: Mapping[str, Any] | None
    if isinstance(preprocess, str):
        try:
            pre = json.loads(preprocess)
        except ValueError as e:
            raise InputError(f"preprocess: not a JSON object ({e})") from None
    else:
        pre = preprocess
    src = Path(plugin_sources_dir) if plugin_sources_dir is not None else default_plugin_sources()

    with atomic_output_dir(out_dir) as stage:
        manifest = populate_bundle(stage, onnx_path, model_name=model_name, recipe_hash=recipe_hash,
                                   preprocess=pre, opts=opts, num_classes=num_classes, plugin_sources_dir=src)
        finalize_bundle(stage, manifest)
    return manifest


def populate_bundle(stage: Path, onnx_path: Path, *, model_name: str, recipe_hash: str,
                    preprocess: Mapping[str, Any] | None, opts: TrtBuildOptions, num_classes: int | None,
                    plugin_sources_dir: Path | None) -> dict[str, Any]:
    """Write the bundle's files into the (staging) folder ``stage``: the model (unless it already is
    ``stage/model.onnx``), its external data, plugin sources, ``build_engine.sh`` and the engine metadata sidecar.
    Returns the manifest without its ``files`` table: :func:`finalize_bundle` adds it (so that a caller, e.g.
    ``vitq compile --target jetson``, can add its own files first and have them hashed too)."""
    stage, onnx_path = Path(stage), Path(onnx_path)
    opts.check_for_jetson()
    inputs, outputs, meta = read_onnx_io(onnx_path)
    custom = _custom_ops(onnx_path)
    if onnx_path.resolve() != (stage / MODEL).resolve():
        shutil.copyfile(onnx_path, stage / MODEL)
        for rel in _external_data_files(onnx_path):
            if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
                raise InputError(f"{onnx_path}: external data location {rel!r} escapes the model folder")
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(onnx_path.parent / rel, stage / rel)
    cmake_dir = _copy_plugins(plugin_sources_dir, stage)
    write_build_script(stage, MODEL, inputs, opts, plugins_dir=cmake_dir, model_name=model_name,
                       cuda_arch=TARGET_CUDA_ARCH, build_plugins=bool(custom))

    side = engine_metadata(stage / MODEL, opts)
    md = side["metadata"]
    md.setdefault(META_MODEL, model_name)
    if preprocess is not None:
        md.setdefault(META_PREPROCESS, json.dumps(dict(preprocess), sort_keys=True))
    if num_classes is not None:
        md.setdefault(META_NUM_CLASSES, str(int(num_classes)))
    md.setdefault(META_RECIPE_HASH, recipe_hash)
    write_json_atomic(engine_meta_path(stage / ENGINE_NAME), side)

    return {
        "schema": BUNDLE_SCHEMA, "vitq_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name, "recipe_hash": recipe_hash, "num_classes": num_classes,
        "preprocess": dict(preprocess) if preprocess is not None else None,
        "target": {"device": "Jetson Orin", "sm": TARGET_SM, "cuda_architectures": TARGET_CUDA_ARCH,
                   "tensorrt": REQUIRED_TENSORRT},
        "io": {"inputs": inputs, "outputs": outputs},
        "batch_range": opts.batch_range.to_dict(), "build": opts.to_dict(),
        "engine": {"file": ENGINE_NAME, "built": False, "script": SCRIPT_NAME,
                   "trtexec": {f"tensorrt{m}": trtexec_command(m, onnx=MODEL, engine=ENGINE_NAME, inputs=inputs,
                                                               opts=opts, timing_cache="timing.cache")
                               for m in (10, 11)}},
        "plugins": {"custom_ops": custom, "sources": cmake_dir is not None, "cmake_dir": cmake_dir},
    }


def finalize_bundle(stage: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the device README and ``manifest.json`` with the sha256 of every file now in ``stage``."""
    stage = Path(stage)
    (stage / README).write_text(_readme(manifest))
    manifest["files"] = {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                         for p in sorted(stage.rglob("*")) if p.is_file() and p.name != MANIFEST
                         and not p.name.startswith(".")}
    write_json_atomic(stage / MANIFEST, manifest)
    return manifest


def verify_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Check a bundle's integrity and completeness. Returns ``{"ok", "problems", "files_checked", "unlisted"}``;
    files created on the device afterwards (``model.engine``, ``timing.cache``, ``plugins/build``) are reported as
    unlisted, not as problems."""
    d = Path(bundle_dir)
    problems: list[str] = []
    result: dict[str, Any] = {"bundle": str(d), "ok": False, "problems": problems, "files_checked": 0, "unlisted": []}
    if not d.is_dir():
        problems.append(f"{d} is not a directory")
        return result
    mpath = d / MANIFEST
    if not mpath.is_file():
        problems.append(f"{MANIFEST} is missing")
        return result
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{MANIFEST} is not valid JSON ({e})")
        return result
    if not isinstance(manifest, dict) or manifest.get("schema") != BUNDLE_SCHEMA:
        problems.append(f"{MANIFEST}: schema is {manifest.get('schema') if isinstance(manifest, dict) else None!r}, "
                        f"expected {BUNDLE_SCHEMA!r}")
        return result
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        problems.append(f"{MANIFEST}: no 'files' table")
        return result
    for req in REQUIRED_FILES:
        if req not in files:
            problems.append(f"{req}: required file not listed in {MANIFEST}")
    for rel, entry in sorted(files.items()):
        pp = PurePosixPath(rel)
        if pp.is_absolute() or ".." in pp.parts or rel == MANIFEST:
            problems.append(f"{rel}: invalid path in {MANIFEST}")
            continue
        f = d / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        result["files_checked"] += 1
        if not isinstance(entry, dict) or "sha256" not in entry:
            problems.append(f"{rel}: no sha256 in {MANIFEST}")
            continue
        if f.stat().st_size != entry.get("bytes", f.stat().st_size):
            problems.append(f"{rel}: size {f.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(f) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (modified or corrupted)")
    listed = set(files) | {MANIFEST}
    unlisted = sorted(p.relative_to(d).as_posix() for p in d.rglob("*")
                      if p.is_file() and p.relative_to(d).as_posix() not in listed)
    cmake_dir = (manifest.get("plugins") or {}).get("cmake_dir")
    if cmake_dir:  # the plugin build folder (hundreds of CMake files) is one entry
        build = f"{cmake_dir}/build/"
        inside = [u for u in unlisted if u.startswith(build)]
        if inside:
            unlisted = [u for u in unlisted if not u.startswith(build)] + [f"{build} ({len(inside)} files)"]
    result["unlisted"] = unlisted
    onnx_ok = (d / MODEL).is_file() and not any(p.startswith(f"{MODEL}:") for p in problems)
    if onnx_ok:
        try:
            ins, outs, _ = read_onnx_io(d / MODEL)
            io = manifest.get("io", {})
            if [(t["name"], t["shape"], t["dtype"]) for t in ins] != \
                    [(t["name"], t["shape"], t["dtype"]) for t in io.get("inputs", [])] or \
                    [(t["name"], t["shape"], t["dtype"]) for t in outs] != \
                    [(t["name"], t["shape"], t["dtype"]) for t in io.get("outputs", [])]:
                problems.append(f"{MODEL}: inputs/outputs differ from the manifest's 'io'")
        except InputError as e:
            problems.append(str(e))
    plugins = manifest.get("plugins") or {}
    if plugins.get("custom_ops") and not plugins.get("sources"):
        ops = ", ".join(f"{o.get('domain')}::{o.get('op_type')}" for o in plugins["custom_ops"])
        problems.append(f"the model uses custom ops ({ops}) but the bundle has no plugin sources to build them")
    result["ok"] = not problems
    result["manifest"] = {k: manifest.get(k) for k in ("model", "recipe_hash", "vitq_version", "created_utc")}
    return result


def check_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """:func:`verify_bundle`, raising :class:`VerificationError` listing every problem."""
    res = verify_bundle(bundle_dir)
    if not res["ok"]:
        raise VerificationError(f"bundle {bundle_dir} failed verification ({len(res['problems'])} problem"
                                f"{'s' if len(res['problems']) != 1 else ''}):\n"
                                + "\n".join(f"  - {p}" for p in res["problems"]))
    return res
