"""``fold_shift_zero_point``: shifted quantizers' ``Sub`` folded into the uint8 QuantizeLinear zero point (ORT CPU).

A shifted quantizer (recipe ``shift`` = ``h`` grid steps, offset ``c = float32(s * h)``) is emitted by
``insert_qdq`` as ``Sub(x, c) -> Q(s, 0) -> DQ(s, 0) -> GEMM`` (zero point 0: what TensorRT accepts) and turned by
``lower_ort_cpu`` into ``Sub(x, c) -> Q(s, 128:u8) -> DQ(s, 128:u8)``. ONNX Runtime accepts any uint8 zero point,
so the ``Sub`` folds into the quantizer::

    Q(x - c, s, 128) = clamp(round((x - c) / s) + 128, 0, 255)
                    ~= clamp(round(x / s) + (128 - h), 0, 255) = Q(x, s, 128 - h)

while the DequantizeLinear keeps zero point 128, so the GEMM still sees ``dq(x - c)`` and the offset correction
``insert_qdq`` put after it (bias fold / Add) stays valid. One elementwise pass over every shifted activation is
saved (57 ``Sub`` nodes in a DeiT-Tiny w8a8 graph, ~6% of its ORT CPU latency at batch 8).

Semantics ``"rounding"``: per element the two forms agree except where ``(x - c) / s`` and ``x / s - h`` land on
different sides of a rounding boundary because of float32 rounding (about 1 element in 10^6 on random data, one
grid step each; ``tests/test_pass_fold_shift.py``). A quantized network propagates such flips, so the pass
manager records the output difference but does not bound it; the compiler's end-to-end verification against the
simulation (relative logit error, top-1 agreement) covers the artifact that runs. TensorRT targets keep the
``Sub`` (TensorRT requires zero point 0 and fuses the ``Sub`` into the preceding pointwise kernel).

Sub-8-bit activations (``Sub -> Clip(lo, hi) -> Q(int8)`` after ``clip_sub8_activations``) fold as well, the
float Clip bounds moving by ``c`` (``Clip(x, lo + c, hi + c)``: grid points, far from rounding boundaries).
The post-softmax operand's offset restore (``+ c * ReduceSum(v, -2)`` after ``attn @ v``) goes as well: its
DequantizeLinear takes the shifted zero point, and ORT's integer GEMM then carries the offset exactly.

Folded only when: the ``Sub`` carries ``vitq.shift`` metadata, its only consumer is the QuantizeLinear (or Clip), ``c`` is
exactly ``float32(s * h)`` for an integer ``h`` and ``128 - h`` fits uint8 (``h = 128``, the non-negative grids,
gives zero point 0; ``h = -127`` gives 255).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .infra import GraphPass
from .irutil import META_ROLE, META_SHIFT, Namer, add_initializer, const_array, consumers, drop_unused_initializers

_ZP = 128


def _u8_zp128(v: ir.Value | None) -> bool:
    a = const_array(v)
    return a is not None and v.dtype == ir.DataType.UINT8 and a.size == 1 and int(a.reshape(())) == _ZP


class FoldShiftZeroPoint(GraphPass):
    NAME = "fold_shift_zero_point"
    REQUIRES = frozenset({"ort_lowered"})
    PROVIDES = frozenset({"shift_folded"})
    SEMANTICS = "rounding"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        nm = Namer(g)
        folded = kept = attn_restored = 0
        for q in [n for n in g if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]:
            sub = q.inputs[0].producer() if q.inputs[0] is not None else None
            clip = None
            if sub is not None and sub.op_type == "Clip" and len(sub.inputs) == 3 \
                    and consumers(sub.outputs[0]) == [q] and not sub.outputs[0].is_graph_output():
                clip, sub = sub, sub.inputs[0].producer()  # sub-8-bit: Sub -> float Clip -> Q(int8)
                if any(const_array(v) is None or const_array(v).size != 1 for v in clip.inputs[1:3]):
                    continue
            if sub is None or sub.op_type != "Sub" or META_SHIFT not in sub.metadata_props:
                continue
            user = clip if clip is not None else q
            if len(q.inputs) < 3 or not _u8_zp128(q.inputs[2]):
                kept += 1
                continue
            s, c = const_array(q.inputs[1]), const_array(sub.inputs[1])
            if s is None or c is None or s.size != 1 or c.size != 1 or sub.outputs[0].is_graph_output() \
                    or consumers(sub.outputs[0]) != [user]:
                kept += 1
                continue
            s32, c32 = np.float32(s.reshape(())), np.float32(c.reshape(()))
            h = int(np.rint(np.float64(c32) / np.float64(s32)))
            if np.float32(s32 * np.float32(h)) != c32 or not 0 <= _ZP - h <= 255:
                kept += 1
                continue
            zp = add_initializer(g, nm, f"{q.name or 'q'}.zero_point_shifted", np.array(_ZP - h, np.uint8))
            user.replace_input_with(0, sub.inputs[0])
            q.replace_input_with(2, zp)
            if clip is not None:  # the float clip bounds (grid points of x - c) move by c
                for i in (1, 2):
                    b = np.float32(const_array(clip.inputs[i]).reshape(())) + c32
                    clip.replace_input_with(i, add_initializer(g, nm, f"{clip.name or 'clip'}.bound{i}_shifted",
                                                               np.array(b, np.float32)))
            c_val = sub.inputs[1]
            g.remove(sub, safe=True)
            self._drop_if_unused(g, c_val)
            folded += 1
            attn_restored += self._attn_offset_into_dq(g, q, zp)
        drop_unused_initializers(g)
        self.stats = {"folded": folded, "kept": kept, "attn_offsets_into_dq": attn_restored}
        return ir.passes.PassResult(model, modified=folded > 0)


    @staticmethod
    def _drop_if_unused(g: ir.Graph, v: ir.Value | None) -> None:
        if v is not None and v.is_initializer() and not v.uses() and not v.is_graph_output():
            g.initializers.pop(v.name, None)

    def _attn_offset_into_dq(self, g: ir.Graph, q: ir.Node, zp: ir.Value) -> int:
        """Post-softmax operand: ``DQ(u, s, 128) @ v + c * ReduceSum(v, -2)`` (``insert_qdq``'s offset restore, role
        ``attn.offset``) becomes ``DQ(u, s, 128 - h) @ v``: the DequantizeLinear takes the shifted zero point too, so
        it returns ``dq(x - c) + c`` itself and ORT's integer GEMM accumulates the offset exactly
        (``(u - zp) * v_q`` in int32) instead of a float ReduceSum / Mul / Add. Only when every DequantizeLinear of
        ``q`` feeds exactly that pattern (MixA-Q's routed operands go through Where and keep their Add)."""
        dqs = consumers(q.outputs[0])
        plan = []
        for d in dqs:
            users = consumers(d.outputs[0])
            if d.op_type != "DequantizeLinear" or d.outputs[0].is_graph_output() or len(users) != 1:
                return 0
            mm = users[0]
            if mm.op_type != "MatMul" or mm.inputs[0] is not d.outputs[0] or mm.outputs[0].is_graph_output():
                return 0
            adds = consumers(mm.outputs[0])
            if len(adds) != 1 or adds[0].op_type != "Add" or adds[0].metadata_props.get(META_ROLE) != "attn.offset":
                return 0
            add = adds[0]
            mul = add.inputs[1].producer() if add.inputs[0] is mm.outputs[0] else None
            if mul is None or mul.op_type != "Mul" or len(consumers(mul.outputs[0])) != 1:
                return 0
            rs = mul.inputs[0].producer()
            if rs is None or rs.op_type != "ReduceSum" or rs.inputs[0] is not mm.inputs[1] \
                    or len(consumers(rs.outputs[0])) != 1:
                return 0
            plan.append((d, mm, add, mul, rs))
        if not plan:
            return 0
        for d, mm, add, mul, rs in plan:
            old_zp = d.inputs[2]
            d.replace_input_with(2, zp)
            add.outputs[0].replace_all_uses_with(mm.outputs[0], replace_graph_outputs=True)
            consts = [v for n in (mul, rs) for v in n.inputs[1:]]
            g.remove([add, mul, rs], safe=True)
            for v in [old_zp, *consts]:
                self._drop_if_unused(g, v)
        return len(plan)


def fold_shift_zero_point() -> FoldShiftZeroPoint:
    return FoldShiftZeroPoint()
