"""Options, validation and version logic shared by the TensorRT builder, the trtexec generator and the bundle.

Pure Python (numpy/onnx only): everything here is testable without TensorRT.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InputError, UnsupportedError
from ..format import ENGINE_META_SUFFIX, SCHEMA_ENGINE_META as ENGINE_META_SCHEMA  # noqa: F401 - re-exported

if TYPE_CHECKING:  # for mypy with tensorrt-stubs (tests/test_trt_typecheck.py); never imported at run time here
    import tensorrt  # type: ignore[import-not-found, unused-ignore]

#: TensorRT major versions this code targets. 10: JetPack 6.x (TensorRT 10.3) and desktop 10.x; 11: JetPack 7.2.2+
#: (TensorRT 11.4.1+, strongly typed networks only).
SUPPORTED_TRT_MAJORS = (10, 11)

#: Which TensorRT a Jetson Orin (SM 8.7) needs, per NVIDIA's TensorRT 11.4.1 Jetson migration page: Orin on JetPack 6.x
#: stays on TensorRT 10.x (JetPack 6 ships 10.3); TensorRT 11.4.1 supports JetPack 7.2.2 or later.
REQUIRED_TENSORRT = [
    {"jetpack": "6.x", "tensorrt": ">=10.3,<11", "major": 10},
    {"jetpack": ">=7.2.2", "tensorrt": ">=11.4.1", "major": 11},
]
TARGET_SM = "8.7"  # Jetson AGX Orin / Orin NX / Orin Nano
#: The CUDA architecture the Jetson bundle's plugin build passes to CMake (``CMAKE_CUDA_ARCHITECTURES``).
TARGET_CUDA_ARCH = TARGET_SM.replace(".", "")
#: What vitq/plugins/trt/CMakeLists.txt builds when no architecture is given (A100, RTX 30xx/A10, Orin, H100).
DEFAULT_CUDA_ARCHITECTURES = ("80", "86", "87", "90")


DEFAULT_BATCH_RANGE = "1:8:32"
MAX_BATCH = 4096  # the exporter's dynamic batch dim is declared with max=4096
MAX_OPT_LEVEL = 5  # trtexec --help (10.x): "integers from 0 to the maximum optimization level, which is currently 5"
HW_COMPAT_LEVELS = ("none", "ampere+")  # trtexec --hardwareCompatibilityLevel=mode ::= "none" | "ampere+"


class TrtUnavailableError(UnsupportedError):
    """``tensorrt`` (or cuda-python) does not import here, or is a version vitq does not support."""


@dataclass(frozen=True)
class BatchRange:
    """An optimization-profile batch range: ``min <= opt <= max``."""

    min: int
    opt: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    def shapes(self, name: str, shape: tuple[int | str, ...] | list) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) shapes for input ``name`` whose dim 0 is the batch; every other dim must be static."""
        shape = tuple(shape)
        if not shape:
            raise InputError(f"input {name!r} is a scalar; a batch range needs a batch dimension")
        rest = []
        for i, d in enumerate(shape[1:], start=1):
            if not (isinstance(d, int) and d > 0):
                raise UnsupportedError(f"input {name!r} has a dynamic dimension {i} ({d!r}) besides the batch; "
                                       f"vitq builds profiles over the batch dimension only")
            rest.append(d)
        d0 = shape[0]
        if isinstance(d0, int) and d0 > 0 and not (self.min == self.opt == self.max == d0):
            raise InputError(f"input {name!r} has a static batch of {d0}; --batch-range {self} does not fit it "
                             f"(use --batch-range {d0}, or export with a dynamic batch)")
        return tuple((b, *rest) for b in (self.min, self.opt, self.max))


def parse_batch_range(text: str | BatchRange | None) -> BatchRange:
    """Parse ``MIN:OPT:MAX`` (or a single ``N`` for a fixed batch) with readable errors."""
    if isinstance(text, BatchRange):
        return text
    if text is None:
        text = DEFAULT_BATCH_RANGE
    raw = str(text).strip()
    parts = raw.split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise InputError(f"--batch-range {raw!r}: expected MIN:OPT:MAX (e.g. 1:8:32) or a single batch size N")
    vals = []
    for label, p in zip(("MIN", "OPT", "MAX"), parts):
        p = p.strip()
        if not re.fullmatch(r"[0-9]+", p):
            raise InputError(f"--batch-range {raw!r}: {label} must be a positive integer, got {p!r}")
        v = int(p)
        if v < 1:
            raise InputError(f"--batch-range {raw!r}: {label} must be >= 1, got {v}")
        if v > MAX_BATCH:
            raise InputError(f"--batch-range {raw!r}: {label} {v} exceeds the maximum batch {MAX_BATCH}")
        vals.append(v)
    lo, opt, hi = vals
    if not lo <= opt <= hi:
        raise InputError(f"--batch-range {raw!r}: need MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
    return BatchRange(lo, opt, hi)


def parse_opt_level(v: int | str | None) -> int | None:
    if v is None:
        return None
    try:
        level = int(v)
    except (TypeError, ValueError):
        raise InputError(f"--opt-level: expected an integer 0..{MAX_OPT_LEVEL}, got {v!r}") from None
    if not 0 <= level <= MAX_OPT_LEVEL:
        raise InputError(f"--opt-level: expected 0..{MAX_OPT_LEVEL} (TensorRT builder optimization level), "
                         f"got {level}")
    return level


def parse_hw_compat(v: str | None) -> str:
    level = (v or "none").strip().lower()
    if level not in HW_COMPAT_LEVELS:
        raise InputError(f"--hw-compat: expected one of {', '.join(HW_COMPAT_LEVELS)}, got {v!r}")
    return level


@dataclass(init=False)
class TrtBuildOptions:
    """What the TensorRT build needs besides the ONNX file. Validated on construction: ``batch_range`` accepts
    ``"MIN:OPT:MAX"``/``N``/None and is a :class:`BatchRange` afterwards; paths become :class:`Path` (the plugin
    library absolute, since TensorRT and trtexec open it from other working directories)."""

    batch_range: BatchRange
    timing_cache: Path | None
    opt_level: int | None
    hw_compat: str
    plugin_lib: Path | None
    workspace_mib: int | None
    extra: dict[str, Any]

    def __init__(self, batch_range: BatchRange | str | None = None, timing_cache: str | os.PathLike | None = None,
                 opt_level: int | str | None = None, hw_compat: str | None = "none",
                 plugin_lib: str | os.PathLike | None = None, workspace_mib: int | None = None,
                 extra: dict[str, Any] | None = None):
        self.batch_range = parse_batch_range(batch_range)
        self.opt_level = parse_opt_level(opt_level)
        self.hw_compat = parse_hw_compat(hw_compat)
        self.timing_cache = Path(timing_cache) if timing_cache is not None else None
        if self.timing_cache is not None and self.timing_cache.is_dir():
            raise InputError(f"--timing-cache {self.timing_cache} is a directory; give a file path")
        self.plugin_lib = Path(plugin_lib).expanduser().absolute() if plugin_lib is not None else None
        if workspace_mib is not None and int(workspace_mib) <= 0:
            raise InputError(f"workspace must be a positive number of MiB, got {workspace_mib}")
        self.workspace_mib = int(workspace_mib) if workspace_mib is not None else None
        self.extra = dict(extra or {})

    #: argparse dest -> flag of the ``TensorRT (--target trt|jetson)`` option group
    FLAGS = {"batch_range": "--batch-range", "timing_cache": "--timing-cache", "opt_level": "--opt-level",
             "hw_compat": "--hw-compat", "plugin_lib": "--plugin-lib"}

    @staticmethod
    def add_args(parser) -> None:
        """The TensorRT option group of ``vitq compile``; each value checked by the parser the options apply."""
        from ..options import arg_type

        g = parser.add_argument_group("TensorRT (--target trt|jetson)")
        g.add_argument("--batch-range", metavar="MIN:OPT:MAX", type=arg_type(parse_batch_range, "batch_range"),
                       help=f"optimization-profile batch range, e.g. {DEFAULT_BATCH_RANGE} (default "
                            f"{DEFAULT_BATCH_RANGE}), or one fixed batch N")
        g.add_argument("--timing-cache", type=Path, metavar="FILE",
                       help="persistent TensorRT timing cache (read if present, updated after the build)")
        g.add_argument("--opt-level", type=arg_type(parse_opt_level, "opt_level"), metavar=f"0-{MAX_OPT_LEVEL}",
                       help="TensorRT builder optimization level (TensorRT default 3)")
        g.add_argument("--hw-compat", type=arg_type(parse_hw_compat, "hw_compat"),
                       metavar="{" + ",".join(HW_COMPAT_LEVELS) + "}",
                       help="TensorRT hardware compatibility level (default none; --target trt only: TensorRT "
                            "has no hardware-compatible engines on Jetson)")
        g.add_argument("--plugin-lib", type=Path, metavar="LIB.so",
                       help="custom-op plugin library to load for the build (recorded in model.engine.json, "
                            "loaded by the runtime; not embedded in the engine)")

    @classmethod
    def given(cls, args: Any) -> list[str]:
        """The flags of this group set on the command line."""
        return [flag for dest, flag in cls.FLAGS.items() if getattr(args, dest, None) is not None]

    @classmethod
    def from_args(cls, args: Any) -> "TrtBuildOptions":
        """From an argparse namespace (``vitq compile`` options; absent attributes take defaults)."""
        return cls(batch_range=getattr(args, "batch_range", None), timing_cache=getattr(args, "timing_cache", None),
                   opt_level=getattr(args, "opt_level", None), hw_compat=getattr(args, "hw_compat", None) or "none",
                   plugin_lib=getattr(args, "plugin_lib", None))

    def check_for_jetson(self) -> None:
        """Refuse options that TensorRT does not support on a Jetson: hardware-compatible engines (``ampere+``) are
        a desktop/server-GPU feature, so a Jetson engine is always built for the device it runs on."""
        if self.hw_compat != "none":
            raise InputError(f"--hw-compat {self.hw_compat} is not supported for --target jetson: TensorRT builds "
                             f"hardware-compatible engines for desktop/server GPUs only; a Jetson engine is built on "
                             f"the device that runs it (drop --hw-compat, or use --target trt)")

    def check_plugin_lib(self) -> None:
        """For a real build: the plugin library must exist now."""
        if self.plugin_lib is not None and not self.plugin_lib.is_file():
            raise InputError(f"--plugin-lib {self.plugin_lib}: no such file")

    def to_dict(self) -> dict[str, Any]:
        return {"batch_range": self.batch_range.to_dict(), "timing_cache": str(self.timing_cache) if self.timing_cache
                else None, "opt_level": self.opt_level, "hw_compat": self.hw_compat,
                "plugin_lib": str(self.plugin_lib) if self.plugin_lib else None, "workspace_mib": self.workspace_mib}


#: Plugin libraries loaded into this process's TensorRT plugin registry: absolute path -> library handle.
_LOADED_PLUGIN_LIBRARIES: dict[str, Any] = {}


def load_plugin_library(registry: "tensorrt.IPluginRegistry", lib: str | os.PathLike, *,
                        what: str = "plugin library") -> str:
    """Load ``lib`` into TensorRT's (process-global) plugin registry once, by its absolute path, and return that
    path. Absolute, because a bare file name makes ``dlopen`` search the system library paths instead of the
    engine's folder; once, because ``load_library`` fails (returns None) when any of the library's creators is
    already registered. None also means: not openable, or no ``getCreators`` entry point; or a library built with
    ``VITQ_STATIC_REGISTRATION=ON``, which ``dlopen`` registers before TensorRT asks it."""
    path = Path(lib).expanduser().absolute()
    key = str(path)
    if key in _LOADED_PLUGIN_LIBRARIES:
        return key
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        handle = registry.load_library(key)
    except Exception as e:
        raise InputError(f"{what} {path}: TensorRT could not load it: {e}") from None
    if handle is None:
        raise InputError(f"{what} {path}: TensorRT's plugin registry refused it (not a plugin library exporting "
                         f"getCreators, a missing dependency, or its creators are already registered)",
                         hint="build it with the bundled CMakeLists.txt (VITQ_STATIC_REGISTRATION=OFF) and let vitq "
                              "load it; the TensorRT log above names the reason")
    _LOADED_PLUGIN_LIBRARIES[key] = handle
    return key


def parse_trt_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.30"`` / ``"10.3.0.30-1+cuda12.5"`` / trtexec's ``"v100300"`` / ``"v110401"`` -> (major, minor, patch)."""
    s = text.strip()
    m = re.fullmatch(r"v?([0-9]{5,6})", s)
    if m:  # trtexec banner encoding: major*10000 + minor*100 + patch
        n = int(m.group(1))
        return n // 10000, (n // 100) % 100, n % 100
    m = re.match(r"([0-9]+)\.([0-9]+)(?:\.([0-9]+))?", s)
    if not m:
        raise ValueError(f"not a TensorRT version: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def check_trt_version(version: str) -> int:
    """Return the major version, or raise :class:`TrtUnavailableError` for one vitq does not target."""
    major, minor, _ = parse_trt_version(version)
    if major not in SUPPORTED_TRT_MAJORS:
        raise TrtUnavailableError(f"TensorRT {version} is not supported: vitq targets TensorRT 10.x (>= 10.3) and 11.x")
    if major == 10 and minor < 3:
        raise TrtUnavailableError(f"TensorRT {version} is too old: vitq needs >= 10.3 (JetPack 6)")
    return major


def read_onnx_io(onnx_path: str | os.PathLike) -> tuple[list[dict], list[dict], dict[str, str]]:
    """Inputs, outputs (``{"name", "shape", "dtype"}``; symbolic dims as strings) and metadata_props of an ONNX file,
    without loading external weights."""
    import onnx
    from onnx import helper

    p = Path(onnx_path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError & co.
        raise InputError(f"{p} is not a readable ONNX model: {e}") from None
    inits = {t.name for t in model.graph.initializer}

    def info(vi) -> dict:
        tt = vi.type.tensor_type
        dims: list[int | str] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:
            dtype = f"onnx:{tt.elem_type}"
        return {"name": vi.name, "shape": dims, "dtype": dtype}

    ins = [info(v) for v in model.graph.input if v.name not in inits]
    outs = [info(v) for v in model.graph.output]
    meta = {kv.key: kv.value for kv in model.metadata_props}
    return ins, outs, meta


def profile_shapes(inputs: Sequence[dict], batch_range: BatchRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` for a model whose inputs have a dynamic batch dim; ``{}`` when every input is
    fully static (no optimization profile is needed then)."""
    dynamic = any(not (isinstance(d, int) and d > 0) for t in inputs for d in t["shape"])
    if not dynamic:
        return {}
    return {t["name"]: batch_range.shapes(t["name"], t["shape"]) for t in inputs}
