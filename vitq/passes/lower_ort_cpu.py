"""``lower_ort_cpu``: exact rewrites onto ONNX Runtime's fast CPU int8 kernels, for one instruction set.

``isa`` (``avx2`` | ``avx512`` | ``vnni`` | ``amx`` | ``arm64``) picks the form (:mod:`vitq.runtime.cpu` has the
MLAS kernel table behind it); every form keeps the recipe's grids, so the function is unchanged bit for bit on the
unoptimized graph, and ORT's fused kernels compute it exactly on the ISA the form is for:

* ``u8u8`` (avx2, avx512): symmetric int8 activations ``Q(x, s, 0:int8) [-> Clip(lo, hi)] -> DQ(s, 0:int8)`` become
  uint8 with zero point 128 (``Q(x, s, 128:u8) [-> Clip(lo+128, hi+128)] -> DQ(s, 128:u8)``: the same grid
  ``{-128..127} * s``); x86 ORT fuses uint8-activation Q/DQ MatMuls only (``QDQIsInt8Allowed()`` is false there)
  into MatMulIntegerToFloat / QLinearMatMul. MatMul weights beyond 7 bits (``|w| > 64``) become uint8 zero point 128
  too (U8U8, ``vpmaddwd``): ORT's U8S8 kernel sums u8*s8 pairs in int16 (``vpmaddubsw``), which saturates for
  full-range weights (21% relative error measured on one such MatMul). 7-bit weights (the ``w7a8`` preset, ORT's
  ``reduce_range``) stay int8 and run the faster U8S8 kernel exactly (``2 * 255 * 64 < 2^15``). Activation x
  activation MatMuls (attention) are U8U8 (both operands uint8).
* ``u8s8`` (vnni, amx): uint8 activations, int8 weights of any range: U8S8, which VNNI (``vpdpbusd``) and AMX
  accumulate in int32, exactly. Attention MatMuls stay U8U8: on x86 ORT's ``QDQS8ToU8Transformer`` turns every int8
  activation Q/DQ pair into uint8 anyway, so no activation operand reaches a GEMM as int8.
* ``s8s8`` (arm64): nothing is rewritten: ORT fuses signed Q/DQ on ARM (``QDQIsInt8Allowed()``) and its
  ``sdot``/``smmla`` GEMMs accumulate in int32. On x86 ORT converts its activations to uint8 itself, which makes it
  the ``u8s8`` form there (not exact on avx2/avx512).

Conv and Gemm weights (measured exact) stay int8. Int4 activations stay int4 Q/DQ: ORT 1.31 runs
QuantizeLinear/DequantizeLinear on INT4 at opset 21 on CPU (checked in tests/test_pass_lower_ort_cpu.py), as
emulated (dequantized) float math. The pass writes the form and ISA into the model's metadata
(``vitq.cpu_form``, ``vitq.cpu_isa``), which the runtime checks against the CPU it runs on.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..runtime.cpu import ISAS, META_CPU_FORM, META_CPU_ISA, SAFE_S8, form_for, isa_from_flags
from .infra import GraphPass
from .irutil import Namer, add_initializer, const_array, consumers, drop_unused_initializers

_ZP = 128


def _zero_int8_scalar(v: ir.Value | None) -> bool:
    a = const_array(v)
    return a is not None and v.dtype == ir.DataType.INT8 and a.size == 1 and int(a.reshape(())) == 0


def _same_const(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is b:
        return True
    x, y = const_array(a), const_array(b)
    return x is not None and y is not None and x.shape == y.shape and np.array_equal(x, y)


class LowerOrtCpu(GraphPass):
    NAME = "lower_ort_cpu"
    REQUIRES = frozenset({"qdq"})
    PROVIDES = frozenset({"ort_lowered"})
    SEMANTICS = "exact"

    def __init__(self, isa: str = "avx2"):
        super().__init__()
        if isa not in ISAS:
            raise ValueError(f"lower_ort_cpu: unknown isa {isa!r} (expected one of: {', '.join(ISAS)})")
        self.isa = isa
        self.form = form_for(isa)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        nm = Namer(g)
        rewritten = skipped = 0
        model.metadata_props[META_CPU_FORM] = self.form
        model.metadata_props[META_CPU_ISA] = self.isa
        quantizers = [] if self.form == "s8s8" else \
            [n for n in g if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]
        for q in quantizers:
            if len(q.inputs) < 3 or not _zero_int8_scalar(q.inputs[2]):
                continue
            sc = const_array(q.inputs[1])
            if "output_dtype" in q.attributes or sc is None or sc.size != 1:  # per-tensor activations only
                skipped += 1
                continue
            scale = q.inputs[1]
            clips, dqs, ok = [], [], True
            for c in consumers(q.outputs[0]):
                if c.op_type == "DequantizeLinear":
                    dqs.append(c)
                elif c.op_type == "Clip" and all(const_array(v) is not None for v in c.inputs[1:3]) \
                        and len(c.inputs) == 3:
                    clips.append(c)
                    for d in consumers(c.outputs[0]):
                        if d.op_type == "DequantizeLinear":
                            dqs.append(d)
                        else:
                            ok = False
                else:
                    ok = False
            if q.outputs[0].is_graph_output() or any(c.outputs[0].is_graph_output() for c in clips):
                ok = False
            for d in dqs:
                if len(d.inputs) < 3 or not _zero_int8_scalar(d.inputs[2]) or not _same_const(d.inputs[1], scale):
                    ok = False
            if not ok or not dqs:
                skipped += 1
                continue
            base = q.name or "q"
            old = [q.inputs[2], *(d.inputs[2] for d in dqs), *(v for c in clips for v in c.inputs[1:3])]
            zp = add_initializer(g, nm, f"{base}.zero_point_u8", np.array(_ZP, np.uint8))
            q.replace_input_with(2, zp)
            q.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
            for c in clips:
                for i in (1, 2):
                    v = const_array(c.inputs[i]).astype(np.int32) + _ZP
                    c.replace_input_with(i, add_initializer(g, nm, f"{base}.clip{i}_u8", v.astype(np.uint8)))
                c.outputs[0].type = ir.TensorType(ir.DataType.UINT8)
            for d in dqs:
                d.replace_input_with(2, zp)
            for v in old:  # drop the int8 zero points / clip bounds nobody uses any more
                if v is not None and v.is_initializer() and not v.uses() and not v.is_graph_output():
                    g.initializers.pop(v.name, None)
            rewritten += 1
        weights, s8 = self._weights_to_u8(g, nm) if self.form == "u8u8" else (0, 0)
        drop_unused_initializers(g)
        self.stats = {"activations_to_u8": rewritten, "left_as_is": skipped, "matmul_weights_to_u8": weights,
                      "matmul_weights_7bit_s8": s8}
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _weights_to_u8(g: ir.Graph, nm: Namer) -> tuple[int, int]:
        n = s8 = 0
        for d in [n for n in g if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")]:
            w = d.inputs[0]
            wa = const_array(w)
            if wa is None or w.dtype != ir.DataType.INT8 or len(d.inputs) < 3:
                continue
            za = const_array(d.inputs[2])
            if za is None or d.inputs[2].dtype != ir.DataType.INT8 or np.any(za != 0):
                continue
            users = consumers(d.outputs[0])
            if not users or any(u.op_type != "MatMul" for u in users) or d.outputs[0].is_graph_output():
                continue
            if wa.size and int(np.abs(wa.astype(np.int16)).max()) <= SAFE_S8:
                s8 += 1  # U8S8 cannot saturate: keep the faster kernel
                continue
            base = d.name or "w"
            old_w, old_z = w, d.inputs[2]
            d.replace_input_with(0, add_initializer(g, nm, f"{base}.weight_u8",
                                                    (wa.astype(np.int16) + _ZP).astype(np.uint8)))
            d.replace_input_with(2, add_initializer(g, nm, f"{base}.zero_point_u8",
                                                    np.full(za.shape, _ZP, np.uint8)))
            for v in (old_w, old_z):
                if v.is_initializer() and not v.uses() and not v.is_graph_output():
                    g.initializers.pop(v.name, None)
            n += 1
        return n, s8


def cpu_has_vnni(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI) per ``/proc/cpuinfo``; None when unknown."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    flags = next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), None)
    if flags is None:
        return None
    return isa_from_flags(flags) in ("vnni", "amx")


def ort_u8u8_hint(passes_report: dict, cpuinfo: str | None = None) -> str | None:
    """A user-facing hint when the ORT artifact needed the slow U8U8 form for full 8-bit MatMul weights on a CPU
    without VNNI: the ``w7a8`` preset (7-bit weights) runs ORT's U8S8 kernel exactly (measured on DeiT-Tiny /
    Swin-T at batch 8: 0.70x / 0.68x of fp32 vs 0.81x / 0.79x for w8a8, the same accuracy bar)."""
    rec = next((p for p in passes_report.get("passes", []) if p.get("name") == LowerOrtCpu.NAME), None)
    if rec is None or not rec.get("stats", {}).get("matmul_weights_to_u8") or cpu_has_vnni(cpuinfo) is not False:
        return None
    n = rec["stats"]["matmul_weights_to_u8"]
    return (f"{n} MatMul weights use the full 8-bit range, which ONNX Runtime runs in its slower U8U8 form on this "
            f"CPU (no VNNI); --recipe w7a8 (7-bit weights) is ~15% faster on ORT CPU at w8a8's accuracy")


def lower_ort_cpu(isa: str = "avx2") -> LowerOrtCpu:
    """The pass for the ORT CPU form of ``isa`` (one of :data:`vitq.runtime.cpu.ISAS`)."""
    return LowerOrtCpu(isa)
