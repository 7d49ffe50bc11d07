"""Recipes: what precision every quantized tensor gets, and how it was calibrated.

``--recipe`` takes a preset name or a recipe JSON file. The presets are ``fp32`` (no quantization), the uniform
``w8a8``, ``w6a6``, ``w4a8``, ``w4a4`` and the mixed-precision ``mp:<avg bits>`` (e.g. ``mp:5``). ``w7a8`` (7-bit
weights) is the ONNX Runtime CPU preset for x86 without VNNI: its weights fit ORT's fast U8S8 kernel without the
int16 saturation full-range int8 weights hit there (see :mod:`vitq.passes.lower_ort_cpu`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

UNIFORM_PRESETS = {"w8a8": (8, 8), "w7a8": (7, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}
_MP = re.compile(r"^mp:(\d+(?:\.\d+)?)$")


@dataclass(frozen=True)
class RecipeRequest:
    """What the user asked for with ``--recipe`` (before calibration turns it into a full recipe)."""

    name: str  # "fp32", "w8a8", ..., "mp:5", or the file stem
    kind: str  # "fp32" | "uniform" | "mp" | "file"
    weight_bits: int | None = None
    act_bits: int | None = None
    mp_target_bits: float | None = None
    path: Path | None = None

    @property
    def quantized(self) -> bool:
        return self.kind != "fp32"


def parse_recipe_arg(arg: str | None) -> RecipeRequest:
    if arg is None or arg == "fp32":
        return RecipeRequest("fp32", "fp32")
    if arg in UNIFORM_PRESETS:
        w, a = UNIFORM_PRESETS[arg]
        return RecipeRequest(arg, "uniform", weight_bits=w, act_bits=a)
    m = _MP.match(arg)
    if m:
        target = float(m.group(1))
        if not 4.0 <= target <= 8.0:
            raise InputError(f"recipe {arg!r}: the mixed-precision target must lie in [4, 8] average bits")
        return RecipeRequest(arg, "mp", mp_target_bits=target)
    p = Path(arg)
    if p.suffix.lower() == ".json" or p.exists():
        if not p.is_file():
            raise InputError(f"recipe file not found: {p}")
        return RecipeRequest(p.stem, "file", path=p)
    presets = ", ".join(["fp32", *UNIFORM_PRESETS, "mp:<bits>"])
    raise InputError(f"unknown recipe {arg!r}: expected a preset ({presets}) or a .json recipe file")
