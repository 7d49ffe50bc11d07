"""``--target ort``: Q/DQ ONNX for ONNX Runtime's CPU kernels; the artifact is the graph itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError
from ..options import arg_type
from ..runtime.cpu import CPU_CHOICES, form_for, full_range_u8s8_exact, recipe_for_cpu, resolve_isa, running_cpu
from .base import Target


def parse_cpu(v: str | None) -> str:
    cpu = (v or "auto").strip().lower()
    if cpu not in CPU_CHOICES:
        raise InputError(f"--cpu {v!r}: expected one of {', '.join(CPU_CHOICES)}")
    return cpu


@dataclass
class OrtOptions:
    """The ``ONNX Runtime (--target ort)`` option group. Validated on construction."""

    cpu: str = "auto"
    keep_bits: bool = False  # compile a preset's weight bits as named even where the CPU's fast exact form needs fewer

    FLAGS = ("--cpu", "--keep-bits")

    def __post_init__(self):
        self.cpu = parse_cpu(self.cpu)

    @staticmethod
    def add_args(parser) -> None:
        g = parser.add_argument_group("ONNX Runtime (--target ort)")
        g.add_argument("--cpu", type=arg_type(parse_cpu, "cpu"), metavar="{" + ",".join(CPU_CHOICES) + "}",
                       help="instruction set of the CPU the graph is lowered for (default auto)")
        g.add_argument("--keep-bits", action="store_true", default=None,
                       help="keep a preset's weight bits as named (by default w8a8 on a CPU without VNNI/AMX/arm64 "
                            "int8 dot products compiles 7-bit weights: exact in ORT's fast U8S8 kernel)")

    @classmethod
    def from_args(cls, args: Any) -> "OrtOptions":
        return cls(cpu=getattr(args, "cpu", None) or "auto", keep_bits=bool(getattr(args, "keep_bits", None)))

    @staticmethod
    def given(args: Any) -> list[str]:
        """The flags of this group set on the command line."""
        return [f for f, a in (("--cpu", "cpu"), ("--keep-bits", "keep_bits")) if getattr(args, a, None) is not None]

    def isa(self) -> tuple[str, str]:
        """``(isa, how it was chosen)``: ``auto`` resolves to the compiling machine's instruction set."""
        return resolve_isa(self.cpu)

    def to_dict(self) -> dict[str, Any]:
        isa, how = self.isa()
        return {"cpu": self.cpu, "isa": isa, "isa_source": how, "form": form_for(isa), "keep_bits": self.keep_bits}


class OrtTarget(Target):
    name = "ort"
    summary = "ONNX Runtime on CPU (Q/DQ ONNX lowered to its int8 kernels)"
    options_type = OrtOptions
    default_act_group = 32  # grouped dynamic activations are plain ONNX ops there
    #: group-wise 4-bit weight scales: a blocked DequantizeLinear, standard ONNX that ONNX Runtime runs on CPU
    default_weight_group = 32

    def resolve_recipe(self, request):
        """``w8a8`` on a CPU whose fast U8S8 GEMM saturates with full 8-bit weights (avx2, avx512 without VNNI)
        compiles as ``w7a8`` (:func:`vitq.runtime.cpu.recipe_for_cpu`: exact there, faster, and as accurate on
        DeiT-Tiny: bench/results/accuracy.json); ``keep_bits`` keeps the name's bits."""
        from ..recipe import parse_recipe_arg

        if request.kind != "uniform" or self.options.keep_bits:
            return request, None
        name, _form, reason = recipe_for_cpu(request.name, self.options.isa()[0])
        return (request, None) if name == request.name else (parse_recipe_arg(name), reason)

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
        """``lower_ort_cpu`` in the int8 form of the chosen CPU (vitq.runtime.cpu)."""
        from ..passes.lower_ort_cpu import LowerOrtCpu

        return LowerOrtCpu(isa=self.options.isa()[0])

    def verify_optimization(self) -> str:
        """A form whose fused kernels this machine does not run exactly (e.g. ``--cpu vnni`` compiled on an AVX2
        CPU, where U8S8 pair sums saturate) is verified unoptimized: its graph is what is checked."""
        isa = self.options.isa()[0]
        return "auto" if form_for(isa) == "u8u8" or full_range_u8s8_exact(running_cpu().isa) else "disable"

    def check_lowered(self, pass_report: dict, echo: Callable[[str], None]) -> list[str]:
        from ..passes.lower_ort_cpu import ort_u8u8_hint

        hint = ort_u8u8_hint(pass_report)
        return [hint] if hint else []
