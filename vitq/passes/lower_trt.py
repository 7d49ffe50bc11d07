"""``lower_trt``: the TensorRT lowering as a pass: int4-activation Q/DQ + MatMul patterns (static per tensor, or the
dynamic per-token uint4 chain) become ``QuantLinearA4`` plugin nodes (:func:`vitq.plugins.lowering.lower_trt`); every
other node stays native.

Requires ``qdq``; provides ``trt_lowered``. Semantics ``exact``: the plugin's ONNX expansion
(:func:`vitq.plugins.lowering.expand_plugins`) is the same function bit for bit, and that is what the pass manager's
numeric check runs on ONNX Runtime (see :func:`vitq.passes.infra.ort_run`).
"""

from __future__ import annotations

import onnx_ir as ir

from .infra import GraphPass


class LowerTrt(GraphPass):
    NAME = "lower_trt"
    REQUIRES = frozenset({"qdq"})
    PROVIDES = frozenset({"trt_lowered"})
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from ..plugins.lowering import lower_trt

        proto = ir.serde.serialize_model(model)
        lowered, n = lower_trt(proto)
        self.stats = {"plugin_nodes": n}
        if n == 0:
            return ir.passes.PassResult(model, modified=False)
        # The rewrite itself is written against ModelProto (vitq.plugins.lowering, shared with expand_plugins);
        # keep this pass in place by moving the rewritten graph into the given model object.
        model.graph = ir.serde.deserialize_model(lowered).graph
        return ir.passes.PassResult(model, modified=True)


META_LOWERED = "vitq.lowered"


class DynamicQdqFloat(GraphPass):
    """Dynamic per-token activation quantizers that no plugin took (MixA-Q's dynamic low branch: the attention
    operands, 8-bit chains) become float arithmetic on the same per-token scale and zero point
    (:func:`vitq.passes.dynamic_qdq.float_dynamic_qdq`): TensorRT has no blocked activation Q/DQ, and runs these as
    element-wise ops with the consuming matmul in float (``trt_check``: ``DYNAMIC_ACT_FLOAT``). Exact (checked
    numerically by the pass manager)."""

    NAME = "dynamic_qdq_float"
    REQUIRES = frozenset({"qdq"})
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from .dynamic_qdq import float_dynamic_qdq

        n = float_dynamic_qdq(model.graph)
        self.stats = {"dynamic_quantizers_as_float": n}
        return ir.passes.PassResult(model, modified=n > 0)


class ClipSub8Activations(GraphPass):
    """Sub-8-bit activation quantizers that no plugin took (attention-matmul operands at 4 bits, 6-bit inputs, ...)
    become ``Clip(x, qmin*s, qmax*s) -> QuantizeLinear(int8, s) -> DequantizeLinear``: the same grid, so the same
    function bit for bit, in the form TensorRT fuses into an int8 GEMM (a Clip on the *integer* tensor between Q
    and DQ, or an INT4 activation Q, it cannot build). They run as int8 kernels: correct, without sub-8-bit speed,
    which ``trt_check`` reports as a warning (``SUB8_ACT_AS_INT8``).

    Exactness: for ``x`` inside ``[qmin*s, qmax*s]`` nothing changes; outside, ``fl(qmax*s)/s`` rounds to ``qmax``
    (it is within an ulp of it), which is what saturating ``round(x/s)`` to ``qmax`` gives. Checked numerically by
    the pass manager (``exact``).
    """

    NAME = "clip_sub8_activations"
    REQUIRES = frozenset({"qdq"})
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import numpy as np

        from .irutil import META_BITS, Namer, add_initializer, const_array, consumers

        g = model.graph
        nm = Namer(g)
        n_rew = 0
        for q in [n for n in g if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]:
            zp_v = q.inputs[2] if len(q.inputs) > 2 else None
            s = const_array(q.inputs[1])
            zp = const_array(zp_v)
            if zp_v is None or s is None or zp is None or s.size != 1 or np.any(zp.astype(np.int64) != 0):
                continue
            users = consumers(q.outputs[0])
            if zp_v.dtype == ir.DataType.INT4:
                bits, lo, hi = 4, -8, 7
                dqs = users
            elif zp_v.dtype == ir.DataType.INT8 and users and all(u.op_type == "Clip" for u in users):
                clip = users[0]
                lo_a, hi_a = const_array(clip.inputs[1]), const_array(clip.inputs[2])
                if lo_a is None or hi_a is None:
                    continue
                lo, hi = int(lo_a), int(hi_a)
                bits = int(q.metadata_props.get(META_BITS, 0)) or None
                dqs = [d for c in users for d in consumers(c.outputs[0])]
            else:
                continue
            if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
                continue
            x = q.inputs[0]
            meta = dict(q.metadata_props)
            meta[META_LOWERED] = "clip_int8"
            if bits:
                meta[META_BITS] = str(bits)
            base = q.name or "act"
            scale = q.inputs[1]
            s32 = np.float32(s.reshape(()))
            lo_f = add_initializer(g, nm, f"{base}.clip_min", np.array(np.float32(lo) * s32, dtype=np.float32))
            hi_f = add_initializer(g, nm, f"{base}.clip_max", np.array(np.float32(hi) * s32, dtype=np.float32))
            zp8 = add_initializer(g, nm, f"{base}.zero_point_i8", np.array(0, dtype=np.int8), ir.DataType.INT8)
            c_out = ir.Value(name=nm(f"{base}.clipped"), shape=x.shape, type=x.type)
            q_out = ir.Value(name=nm(f"{base}.q8"), shape=x.shape, type=ir.TensorType(ir.DataType.INT8))
            d_out = ir.Value(name=nm(f"{base}.dq8"), shape=x.shape, type=ir.TensorType(ir.DataType.FLOAT))
            new = [ir.node("Clip", [x, lo_f, hi_f], outputs=[c_out], name=nm(f"{base}/ClipFloat"),
                           metadata_props=dict(meta)),
                   ir.node("QuantizeLinear", [c_out, scale, zp8], outputs=[q_out], name=nm(f"{base}/Int8"),
                           metadata_props=dict(meta)),
                   ir.node("DequantizeLinear", [q_out, scale, zp8], outputs=[d_out], name=nm(f"{base}/Int8DQ"),
                           metadata_props=dict(meta))]
            g.insert_before(q, new)
            for d in dqs:
                d.outputs[0].replace_all_uses_with(d_out)
            dead = list(dict.fromkeys(dqs + [u for u in users if u not in dqs] + [q]))
            for n in dead:  # detach first: a removed node must not stay a user of its inputs
                for i in range(len(n.inputs)):
                    n.replace_input_with(i, None)
                g.remove(n, safe=False)
            n_rew += 1
        self.stats = {"activations_clipped_to_int8": n_rew}
        return ir.passes.PassResult(model, modified=n_rew > 0)
