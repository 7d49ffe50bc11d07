"""The CPU an ONNX Runtime artifact runs on: its int8 instruction set, and which int8 form is exact and fast there.

ONNX Runtime's CPU int8 GEMMs (MLAS, ``onnxruntime/core/mlas/lib/platform.cpp``) pick their kernel from the CPU:

=======  =====================================================  ===========================================
ISA      U8S8 kernel (uint8 activations x int8 weights)         U8U8 kernel
=======  =====================================================  ===========================================
avx2     ``vpmaddubsw``: u8*s8 pairs summed in **int16 with      ``vpmaddwd`` on 16-bit widened bytes: exact
         saturation**: exact only when ``2*255*|w| < 2^15``,
         i.e. 7-bit weights (``|w| <= 64``)
avx512   AVX512-Core: the same ``vpmaddubsw`` (saturates)        AVX512-Core ``vpmaddwd``: exact
vnni     ``vpdpbusd(s)`` (AVX512-VNNI or AVX-VNNI): int32        AVX2/AVX512 ``vpmaddwd``: exact, slower
         accumulation, exact with full 8-bit weights
amx      AMX tiles (``tdpbusd``, int32) for U8S8 only, VNNI for   as vnni
         small shapes: exact with full 8-bit weights
arm64    ``udot``/``sdot``/``ummla``/``smmla`` (int32): exact     exact
=======  =====================================================  ===========================================

ORT's QDQ fusion (``qdq_selectors.cc``, ``MatMulNodeGroupSelector``) turns ``DQ(A) x DQ(B) -> MatMul [-> Q]`` into
``MatMulIntegerToFloat`` (``QLinearMatMul`` with the Q) for uint8 ``A`` and either signedness of ``B``; int8 ``A`` is
fused only where ``QDQIsInt8Allowed()`` (ARM builds). On x86 ORT first runs ``QDQS8ToU8Transformer``, which turns
every int8 activation Q/DQ pair into uint8 (zero point + 128), so activation x activation MatMuls (attention) are
always U8U8 there, and int8 weights meet uint8 activations (U8S8). ORT's own remedy for the avx2 saturation is the
session option ``session.x64quantprecision`` (``Avx2WeightS8ToU8Transformer``, only where
``MlasPlatformU8S8Overflow()``): weights to uint8 at load time, what the ``u8u8`` form does at compile time.

The forms vitq's ``lower_ort_cpu`` emits (``vitq.cpu_form`` in the artifact's metadata):

* ``u8u8``: uint8 activations (zero point 128); full-range 8-bit MatMul weights and the B operand of activation x
  activation MatMuls as uint8 too (U8U8), 7-bit weights as int8 (U8S8). Exact on every CPU; the form for avx2 and
  avx512.
* ``u8s8``: uint8 activations, int8 weights of any range and int8 B operands (U8S8). Exact and fastest on vnni and
  amx; **not exact** on avx2/avx512 (int16 saturation).
* ``s8s8``: the recipe's int8 activations and weights as they are (S8S8, ``sdot``/``smmla``). The form for arm64;
  on x86 ORT turns it into ``u8s8`` (see above): exact on vnni/amx only.

Which kernels a vitq Q/DQ graph reaches at ORT's ``all`` level (``tests/test_cpu_forms.py`` checks the optimized
graph): every Q/DQ MatMul (Linear weights and both attention GEMMs) becomes ``MatMulIntegerToFloat`` (a Q right
after the MatMul would make it ``QLinearMatMul``; vitq's Linear is followed by its bias Add, so it is not), the bias
Add + GELU become ``BiasGelu``, LayerNormalization stays one op. These fusions compute the same function up to float32
rounding. ORT's ``AttentionFusion`` matches float attention only, and ``QAttention`` / ``DynamicQuantizeMatMul``
come from ORT's dynamic quantizer (activation scales computed per run): a different function from a calibrated
recipe, so vitq emits neither.

This module reads only ``/proc`` and ``/sys`` (no third-party imports): the runtime uses it on devices.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

ISAS = ("avx2", "avx512", "vnni", "amx", "arm64")
CPU_CHOICES = ("auto", *ISAS)
FORMS = ("u8u8", "u8s8", "s8s8")
META_CPU_FORM = "vitq.cpu_form"
META_CPU_ISA = "vitq.cpu_isa"

#: largest |int8 weight| whose u8*s8 pair sums cannot saturate int16 on avx2/avx512 (2 * 255 * 64 = 32640)
SAFE_S8 = 64

_AT_HWCAP, _AT_HWCAP2 = 16, 26
_HWCAP_ASIMDDP, _HWCAP2_I8MM = 1 << 20, 1 << 13


@dataclass(frozen=True)
class CpuInfo:
    """The running (or a described) CPU: its int8 ISA class, the flags that decided it, and where they came from."""

    isa: str
    flags: tuple[str, ...]
    source: str  # "/proc/cpuinfo", "/proc/self/auxv", "platform.machine()" or "given"

    def to_dict(self) -> dict:
        return {"isa": self.isa, "flags": list(self.flags), "source": self.source}


def isa_from_flags(flags: set[str] | list[str] | tuple[str, ...], machine: str = "x86_64") -> str:
    """The int8 ISA class of a CPU with these ``/proc/cpuinfo`` flags (x86) or Features (arm64).

    x86 without AVX2 maps to ``avx2``: its MLAS kernels (SSE) saturate no less, so the avx2 form (exact everywhere)
    is the safe one."""
    f = set(flags)
    if machine.lower() in ("aarch64", "arm64") or "asimd" in f:
        return "arm64"
    if "amx_int8" in f and "amx_tile" in f:
        return "amx"
    if "avx512_vnni" in f or "avx_vnni" in f:
        return "vnni"
    if "avx512bw" in f:
        return "avx512"
    return "avx2"


_INT8_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "asimd", "asimddp",
               "i8mm")


def _parse_cpuinfo(text: str) -> set[str] | None:
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return None


def _auxv_flags(raw: bytes) -> set[str]:
    """arm64 ``AT_HWCAP``/``AT_HWCAP2`` bits from ``/proc/self/auxv`` (pairs of native unsigned longs)."""
    import struct

    vals = dict(struct.iter_unpack("<QQ", raw[: len(raw) // 16 * 16]))
    hw, hw2 = vals.get(_AT_HWCAP, 0), vals.get(_AT_HWCAP2, 0)
    out = {"asimd"}
    if hw & _HWCAP_ASIMDDP:
        out.add("asimddp")
    if hw2 & _HWCAP2_I8MM:
        out.add("i8mm")
    return out


def detect(cpuinfo: str | None = None, machine: str | None = None, proc: Path = Path("/proc"),
           sys_root: Path = Path("/sys")) -> CpuInfo:
    """The ISA class of the running CPU (or of the ``cpuinfo`` text given).

    Order: ``/proc/cpuinfo`` flags; on arm64 without a Features line, ``/proc/self/auxv``; else the architecture
    (``platform.machine()``, or ``/sys/devices/system/cpu/modalias`` naming an x86 CPU) with the conservative form for
    it (``avx2`` on x86: exact everywhere)."""
    machine = machine or platform.machine()
    source = "given"
    flags = None
    if cpuinfo is None:
        try:
            cpuinfo = (proc / "cpuinfo").read_text(encoding="utf-8", errors="replace")
            source = "/proc/cpuinfo"
        except OSError:
            cpuinfo = ""
    flags = _parse_cpuinfo(cpuinfo)
    if flags is None and machine.lower() in ("aarch64", "arm64"):
        try:
            flags, source = _auxv_flags((proc / "self" / "auxv").read_bytes()), "/proc/self/auxv"
        except OSError:
            flags = None
    if flags is None:
        try:
            alias = (sys_root / "devices" / "system" / "cpu" / "modalias").read_text()
            if alias.startswith("cpu:type:x86"):
                machine = "x86_64"
        except OSError:
            pass
        return CpuInfo("arm64" if machine.lower() in ("aarch64", "arm64") else "avx2", (), "platform.machine()")
    return CpuInfo(isa_from_flags(flags, machine), tuple(f for f in _INT8_FLAGS if f in flags), source)


_DETECTED: CpuInfo | None = None


def running_cpu() -> CpuInfo:
    """:func:`detect` for this process, cached (``VITQ_CPU_ISA`` overrides it: one of :data:`ISAS`)."""
    global _DETECTED
    forced = os.environ.get("VITQ_CPU_ISA")
    if forced in ISAS:
        return CpuInfo(forced, (), "VITQ_CPU_ISA")
    if _DETECTED is None:
        _DETECTED = detect()
    return _DETECTED


def resolve_isa(cpu: str) -> tuple[str, str]:
    """``--cpu`` value -> ``(isa, how)``; ``auto`` is the compiling machine. Raises ValueError on unknown values."""
    if cpu == "auto":
        info = running_cpu()
        return info.isa, f"auto: this machine ({info.source}: {' '.join(info.flags) or 'no int8 flags'})"
    if cpu not in ISAS:
        raise ValueError(f"unknown --cpu {cpu!r} (expected one of: {', '.join(CPU_CHOICES)})")
    return cpu, "given"


def form_for(isa: str) -> str:
    """The exact and fastest int8 form on ``isa`` (see the module docstring)."""
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r} (expected one of: {', '.join(ISAS)})")
    return {"avx2": "u8u8", "avx512": "u8u8", "vnni": "u8s8", "amx": "u8s8", "arm64": "s8s8"}[isa]


def full_range_u8s8_exact(isa: str) -> bool:
    """Whether ORT's U8S8 GEMM is exact with full-range (8-bit) int8 B on ``isa`` (no int16 pair saturation)."""
    return isa in ("vnni", "amx", "arm64")


def choose_form(weight_bits: int, isa: str) -> tuple[str, int, str]:
    """What a uniform ``w{weight_bits}a8`` recipe becomes on ``isa``: ``(form, weight_bits, reason)``.

    "A recipe name means the best for the target": where full 8-bit weights only run exactly in the slower U8U8
    kernel (avx2, avx512 without VNNI), 8-bit weights become 7-bit (ORT's ``reduce_range``), which runs the fast
    U8S8 kernel exactly (one GEMM: bench/results/cpu_forms_avx2.json; on DeiT-Tiny, w7a8 and w8a8 agree with fp32
    equally on 1394 images: bench/results/accuracy.json). Other bit widths and ISAs keep their bits."""
    form = form_for(isa)
    if weight_bits == 8 and not full_range_u8s8_exact(isa):
        return form, 7, (f"{isa}: ORT's fast U8S8 GEMM sums u8*s8 pairs in int16 (vpmaddubsw) and saturates with "
                         f"full 8-bit weights; 7-bit weights (|w| <= {SAFE_S8}) run it exactly, the 8-bit "
                         f"alternative (U8U8) is exact but slower")
    if form == "u8s8":
        return form, weight_bits, (f"{isa}: U8S8 accumulates in int32 (VNNI vpdpbusd / AMX tiles): full-range "
                                   f"int8 weights are exact in the fastest kernel")
    if form == "s8s8":
        return form, weight_bits, ("arm64: ORT fuses signed int8 Q/DQ on ARM and its sdot/smmla GEMMs accumulate in "
                                   "int32: the recipe's int8 runs as is")
    return form, weight_bits, (f"{isa}: uint8 activations; weights within 7 bits run U8S8 (exact), wider ones U8U8 "
                               f"(vpmaddwd, exact)")


def recipe_for_cpu(recipe: str, isa: str) -> tuple[str, str, str]:
    """A uniform preset name (``w{W}a{A}``) as compiled for ``isa``: ``(recipe, form, reason)``, e.g. ``("w8a8",
    "avx2") -> ("w7a8", "u8u8", ...)``. Other recipes (fp32, mp:N, files) keep their name; the reason then names the
    form only."""
    import re

    m = re.fullmatch(r"w(\d+)a(\d+)", recipe)
    if m is None:
        form = form_for(isa)
        return recipe, form, f"{isa}: {form} int8 form"
    form, bits, reason = choose_form(int(m.group(1)), isa)
    return f"w{bits}a{m.group(2)}", form, reason


def form_check(form: str | None, cpu: CpuInfo | None = None) -> str | None:
    """A one-line warning when the running CPU lacks what the artifact's form needs (exactness or speed); None
    when it fits (or the artifact names no form)."""
    if form is None or form not in FORMS:
        return None
    cpu = cpu or running_cpu()
    isa = cpu.isa
    if form == "u8s8" and not full_range_u8s8_exact(isa):
        return (f"this artifact was compiled for VNNI/AMX CPUs (U8S8 int8 form); this CPU ({isa}) sums u8*s8 pairs "
                f"in int16, so ONNX Runtime's fused int8 GEMMs can saturate and the outputs are NOT exact: recompile "
                f"with --cpu auto (or --cpu {isa})")
    if form == "s8s8" and not full_range_u8s8_exact(isa):
        return (f"this artifact was compiled for arm64 (S8S8 int8 form); ONNX Runtime on {isa} runs it as U8S8, which "
                f"sums u8*s8 pairs in int16 and can saturate, so the outputs are NOT exact: recompile with --cpu auto "
                f"(or --cpu {isa})")
    if form == "u8u8" and isa in ("vnni", "amx"):
        return (f"this artifact was compiled for CPUs without VNNI (U8U8 int8 form); this CPU ({isa}) runs the "
                f"faster U8S8 form exactly: recompile with --cpu auto for speed")
    return None
