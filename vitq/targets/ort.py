"""``--target ort``: Q/DQ ONNX for ONNX Runtime's CPU kernels; the artifact is the graph itself."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError
from ..options import arg_type
from .base import Target

#: CPUs the ORT graph can be lowered for (``--cpu``); ``auto``: the compiling machine's
CPU_CHOICES = ("auto", "avx2", "avx512", "vnni", "amx", "arm64")


def parse_cpu(v: str | None) -> str:
    cpu = (v or "auto").strip().lower()
    if cpu not in CPU_CHOICES:
        raise InputError(f"--cpu {v!r}: expected one of {', '.join(CPU_CHOICES)}")
    return cpu


@dataclass
class OrtOptions:
    """The ``ONNX Runtime (--target ort)`` option group. Validated on construction."""

    cpu: str = "auto"

    FLAGS = ("--cpu",)

    def __post_init__(self):
        self.cpu = parse_cpu(self.cpu)

    @staticmethod
    def add_args(parser) -> None:
        g = parser.add_argument_group("ONNX Runtime (--target ort)")
        g.add_argument("--cpu", type=arg_type(parse_cpu, "cpu"), metavar="{" + ",".join(CPU_CHOICES) + "}",
                       help="instruction set of the CPU the graph is lowered for (default auto)")

    @classmethod
    def from_args(cls, args: Any) -> "OrtOptions":
        return cls(cpu=getattr(args, "cpu", None) or "auto")

    @staticmethod
    def given(args: Any) -> list[str]:
        """The flags of this group set on the command line."""
        return ["--cpu"] if getattr(args, "cpu", None) is not None else []

    def to_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu}


class OrtTarget(Target):
    name = "ort"
    summary = "ONNX Runtime on CPU (Q/DQ ONNX lowered to its int8 kernels)"
    options_type = OrtOptions
    default_act_group = 32  # grouped dynamic activations are plain ONNX ops there

    def base_passes(self, recipe) -> list:
        """insert_qdq -> cleanup -> clip_sub8_activations -> lower_ort_cpu (int4 / 6-bit activations as float Clip +
        int8 Q/DQ, then int8 as uint8 zp 128: exact rewrites onto ORT's fast u8 kernels; ORT's optimizer miscompiles
        int4 Q/DQ behind Relu, see clip_sub8_activations) -> fold_shift_zero_point (shifted quantizers' Sub into the
        uint8 zero point; equal up to float32 rounding ties)."""
        from ..passes.cleanup import Cleanup
        from ..passes.fold_shift import FoldShiftZeroPoint
        from ..passes.insert_qdq import InsertQDQ
        from ..passes.lower_trt import ClipSub8Activations

        return [InsertQDQ(recipe), Cleanup(), ClipSub8Activations(), self._lower_cpu(), FoldShiftZeroPoint()]

    def _lower_cpu(self):
        """``lower_ort_cpu`` for the chosen CPU (the pass takes ``isa`` where it has ISA-specific forms)."""
        from ..passes.lower_ort_cpu import LowerOrtCpu

        if "isa" in inspect.signature(LowerOrtCpu).parameters:
            return LowerOrtCpu(isa=self.options.cpu)
        return LowerOrtCpu()

    def check_lowered(self, pass_report: dict, echo: Callable[[str], None]) -> list[str]:
        from ..passes.lower_ort_cpu import ort_u8u8_hint

        hint = ort_u8u8_hint(pass_report)
        return [hint] if hint else []
