"""``insert_qdq(recipe)``: the recipe's quantizers become QuantizeLinear/DequantizeLinear in the float graph.

Placement (TensorRT explicit quantization; also what ORT's QDQ fusions match):

* weights: an int8 / int4 initializer (per output channel, symmetric, zero point 0) -> DequantizeLinear ->
  the GEMM/Conv weight input. The integers are computed from the graph's float initializer with the recipe's scales
  exactly as :func:`vitq.quant.functional.quantize` does (float32 ``w / s``, round half to even, clamp). Axis: 1 for
  a Linear exported as ``MatMul(X, W^T)`` (``W^T`` is ``[in, out]``), 0 for ``Gemm(transB=1)`` and Conv.
  Bits < 8 other than 4 are stored as int8 holding values in the narrower range. Group-wise weight scales (the
  recipe's ``weight.group``) become a blocked DequantizeLinear (``block_size`` along the input axis; ONNX opset
  21, which ONNX Runtime runs on CPU).
* activations: QuantizeLinear -> DequantizeLinear directly on the GEMM/Conv input edge (zero point 0; int8, or
  ONNX INT4 at 4 bits). Bits < 8 other than 4 (e.g. 6): int8 Q -> Clip(qmin, qmax) on the int8 tensor -> DQ, the
  exact narrower grid. Both operands of both attention matmuls are quantized the same way (``k`` is quantized on
  the ``k^T`` operand: per-tensor quantization commutes with the transpose, and TensorRT wants the Q/DQ directly on
  the GEMM input).
* nothing else: no Q/DQ on LayerNorm / Softmax / GELU inputs, none on residual adds (TensorRT keeps the residual
  stream and LayerNorm in float and fuses the bias/residual adds into the int8 GEMM epilogue; a Q/DQ on the
  residual branch only pays off for Conv+Add fusions in CNNs).
* OPT-m (``input_regions``): ``x -> Relu -> Q/DQ(pos)`` and ``x -> Min(x, 0) -> Q/DQ(neg)``, two GEMMs sharing the
  one weight DQ, then Add; a Gemm/Conv bias goes to the positive branch only (a MatMul's bias Add follows the Add).

* shifted quantizers (schema ``shift``, offset ``c = scale * shift``): ``Sub(x, c) -> Q -> DQ`` on the GEMM input
  (still zero point 0: TensorRT fuses the Sub into the producer and the Q/DQ into the int8 GEMM) and ``c`` restored
  after the GEMM: a Linear adds the constant ``c * rowsum(Wq)`` (folded into its bias when the bias is a constant
  Add / Gemm ``C``), the ``attn @ v`` matmul adds ``c * ReduceSum(v, axis=-2)``. Only Linear inputs (OPT-m regions
  included) and the post-softmax ``attn`` operand may be shifted.

SQ-b ``smooth`` is already folded into the exported model: it is only counted here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ..onnx_meta import NAME_SCOPES_KEY
from ..recipe.schema import LayerSpec, QuantSpec, Recipe
from .analysis import Site, find_sites, has_qdq, sites_by_module
from .dynamic_qdq import dynamic_qdq_nodes, log_sqrt2_nodes
from .infra import GraphPass, GraphPassError
from .irutil import META_BITS, META_MODULE, META_ROLE, META_SHIFT, Namer, add_initializer, const_array


def quantize_weight(w: np.ndarray, scale: np.ndarray, bits: int, axis: int | None) -> np.ndarray:
    """Integer weights, exactly ``functional.quantize`` (float32 division, round half to even, clamp). ``scale``: one
    value, one per index of ``axis``, or an array that already broadcasts against ``w`` (``axis`` None)."""
    w = np.asarray(w, dtype=np.float32)
    s = np.asarray(scale, dtype=np.float32)
    if axis is not None:
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    elif s.ndim != w.ndim:
        s = s.reshape(())
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(np.round(w / s), lo, hi).astype(np.int8)


def _qtype(bits: int) -> ir.DataType:
    return ir.DataType.INT4 if bits == 4 else ir.DataType.INT8


class InsertQDQ(GraphPass):
    NAME = "insert_qdq"
    REQUIRES = frozenset({"float"})
    PROVIDES = frozenset({"qdq"})
    INVALIDATES = frozenset({"float"})
    SEMANTICS = "changes"

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe

    # -- helpers -------------------------------------------------------------------------------------------------
    def _meta(self, consumer: ir.Node, role: str, module: str, bits: int) -> dict[str, str]:
        m = {META_ROLE: role, META_MODULE: module, META_BITS: str(bits)}
        if NAME_SCOPES_KEY in consumer.metadata_props:
            m[NAME_SCOPES_KEY] = consumer.metadata_props[NAME_SCOPES_KEY]
        return m

    def _act_qdq(self, x: ir.Value, spec: QuantSpec, role: str, module: str, before: ir.Node) -> ir.Value:
        """Q(->Clip)->DQ on activation ``x``; returns the DQ output (cached per (tensor, bits, scale)). Dynamic
        per-token specs: :func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes` over the feature axis (``-2`` for the
        attention's ``k`` operand, which the graph feeds transposed)."""
        if spec.dynamic:
            key = (id(x), spec.bits, spec.dynamic, spec.group)
            if key not in self._cache:
                if spec.dynamic == "log_sqrt2":
                    nodes, y = log_sqrt2_nodes(self._graph, self._namer, x, spec.bits, f"{module}.{role}",
                                               self._meta(before, role, module, spec.bits))
                else:
                    nodes, y = dynamic_qdq_nodes(self._graph, self._namer, x, spec.bits,
                                                 -2 if role == "k" else -1, f"{module}.{role}",
                                                 self._meta(before, role, module, spec.bits), group=spec.group)
                self._graph.insert_before(before, nodes)
                self._cache[key] = y
                self.stats["qdq_pairs"] += 1
            return self._cache[key]
        if len(spec.scale) != 1:
            raise GraphPassError(f"{module}.{role}: activations are quantized per tensor (got {len(spec.scale)} "
                                 f"scales)")
        key = (id(x), spec.bits, float(spec.scale[0]), spec.shift)
        if key in self._cache:
            return self._cache[key]
        g, nm = self._graph, self._namer
        base = f"{module}.{role}"
        qt = _qtype(spec.bits)
        scale = add_initializer(g, nm, f"{base}.scale", np.array(spec.scale[0], dtype=np.float32))
        zp = add_initializer(g, nm, f"{base}.zero_point", np.array(0, dtype=np.int8), qt)
        meta = self._meta(before, role, module, spec.bits)
        nodes = []
        if spec.shift:
            c = add_initializer(g, nm, f"{base}.offset", np.array(spec.offset, dtype=np.float32))
            xs = ir.Value(name=nm(f"{base}.shifted"), shape=x.shape, type=x.type)
            nodes.append(ir.node("Sub", [x, c], outputs=[xs], name=nm(f"{base}/Sub"),
                                 metadata_props={**meta, META_SHIFT: repr(spec.offset)}))
            x = xs
            self.stats["shifted"] += 1
        q_out = ir.Value(name=nm(f"{base}.q"), shape=x.shape, type=ir.TensorType(qt))
        nodes.append(ir.node("QuantizeLinear", [x, scale, zp], outputs=[q_out], name=nm(f"{base}/QuantizeLinear"),
                             metadata_props=dict(meta)))
        if spec.bits not in (4, 8):
            lo = add_initializer(g, nm, f"{base}.qmin", np.array(spec.qmin, dtype=np.int8))
            hi = add_initializer(g, nm, f"{base}.qmax", np.array(spec.qmax, dtype=np.int8))
            c_out = ir.Value(name=nm(f"{base}.q_clip"), shape=x.shape, type=ir.TensorType(qt))
            nodes.append(ir.node("Clip", [q_out, lo, hi], outputs=[c_out], name=nm(f"{base}/Clip"),
                                 metadata_props=dict(meta)))
            q_out = c_out
        dq_out = ir.Value(name=nm(f"{base}.dq"), shape=x.shape, type=ir.TensorType(ir.DataType.FLOAT))
        nodes.append(ir.node("DequantizeLinear", [q_out, scale, zp], outputs=[dq_out],
                             name=nm(f"{base}/DequantizeLinear"), metadata_props=dict(meta)))
        g.insert_before(before, nodes)
        self._cache[key] = dq_out
        self.stats["qdq_pairs"] += 1
        return dq_out

    def _weight_dq(self, site: Site, spec: QuantSpec, module: str) -> ir.Value:
        node = site.node
        w_val = node.inputs[site.weight_index]
        w = np.asarray(w_val.const_value.numpy(), np.float32)
        scales = self._group_scales if spec.group else self._channel_scales
        s_init, s_b, attrs = scales(site, spec, module, w, w_val.name)
        q = quantize_weight(w, s_b, spec.bits, None)
        self._wdq[id(node)] = q.astype(np.float32) * s_b
        g, nm = self._graph, self._namer
        base = f"{module}.weight"
        qt = _qtype(spec.bits)
        q_init = add_initializer(g, nm, f"{base}.int{4 if spec.bits == 4 else 8}", q, qt)
        scale = add_initializer(g, nm, f"{base}.scale", s_init)
        zp = add_initializer(g, nm, f"{base}.zero_point", np.zeros(s_init.shape, np.int8), qt)
        dq_out = ir.Value(name=nm(f"{base}.dq"), shape=ir.Shape(list(w.shape)),
                          type=ir.TensorType(ir.DataType.FLOAT))
        dq = ir.node("DequantizeLinear", [q_init, scale, zp], attributes=attrs, outputs=[dq_out],
                     name=nm(f"{base}/DequantizeLinear"),
                     metadata_props=self._meta(node, "weight", module, spec.bits))
        g.insert_before(node, dq)
        node.replace_input_with(site.weight_index, dq_out)
        if not w_val.uses() and not w_val.is_graph_output():  # the float weight is dead now (others keep theirs)
            g.initializers.pop(w_val.name, None)
        return dq_out

    @staticmethod
    def _channel_scales(site: Site, spec: QuantSpec, module: str, w: np.ndarray, name: str):
        """(scale initializer, scale broadcast against ``w``, DQ attributes): one scale, or one per output channel
        on the graph weight's output axis."""
        n = len(spec.scale)
        if n != 1 and n != site.out_channels:
            raise GraphPassError(f"{module}.weight: {n} scales, but the graph weight {name} {list(w.shape)} "
                                 f"has {site.out_channels} output channels (axis {site.weight_axis})")
        s = np.asarray(spec.scale, np.float32)
        if n == 1:
            return s.reshape(()), s.reshape([1] * w.ndim), {}
        axis = site.weight_axis
        return s, s.reshape([-1 if d == axis else 1 for d in range(w.ndim)]), {"axis": axis}

    @staticmethod
    def _group_scales(site: Site, spec: QuantSpec, module: str, w: np.ndarray, name: str):
        """As :meth:`_channel_scales` for group-wise scales: a blocked ``DequantizeLinear`` (opset 21 ``block_size``
        along the input axis of the 2-D graph weight; ``[K, N]`` MatMul weights block axis 0, ``[N, K]`` Gemm
        weights axis 1)."""
        if w.ndim != 2 or site.weight_axis not in (0, 1):
            raise GraphPassError(f"{module}.weight: group-wise scales need a 2-D Linear weight, the graph has "
                                 f"{name} {list(w.shape)}")
        out_axis, in_axis = site.weight_axis, 1 - site.weight_axis
        o, c = w.shape[out_axis], w.shape[in_axis]
        if c % spec.group or len(spec.scale) != o * (c // spec.group):
            raise GraphPassError(f"{module}.weight: {len(spec.scale)} scales in groups of {spec.group} do not fit "
                                 f"the graph weight {name} {list(w.shape)} ({o} outputs x {c} inputs)")
        compact = np.asarray(spec.scale, np.float32).reshape(o, c // spec.group)  # [outputs, groups]
        s_g = compact if out_axis == 0 else compact.T  # the weight's layout with the input axis in blocks
        return s_g, np.repeat(s_g, spec.group, axis=in_axis), {"axis": in_axis, "block_size": spec.group}

    def _regions(self, site: Site, layer: LayerSpec) -> None:
        """OPT-m: x = relu(x) + min(x, 0), each part its own quantizer, two GEMMs sharing the weight."""
        node, g, nm, module = site.node, self._graph, self._namer, layer.module
        reg = layer.input_regions
        x = node.inputs[0]
        meta = self._meta(node, "input.regions", module, max(reg.pos.bits, reg.neg.bits))
        zero = add_initializer(g, nm, f"{module}.regions.zero", np.array(0.0, np.float32))
        xp = ir.Value(name=nm(f"{module}.input.pos"), shape=x.shape, type=x.type)
        xn = ir.Value(name=nm(f"{module}.input.neg"), shape=x.shape, type=x.type)
        g.insert_before(node, [ir.node("Relu", [x], outputs=[xp], name=nm(f"{module}/regions/Relu"),
                                       metadata_props=dict(meta)),
                               ir.node("Min", [x, zero], outputs=[xn], name=nm(f"{module}/regions/Min"),
                                       metadata_props=dict(meta))])
        dq_p = self._act_qdq(xp, reg.pos, "input.pos", module, node)
        dq_n = self._act_qdq(xn, reg.neg, "input.neg", module, node)
        w_in = node.inputs[1]  # already the weight DQ output when the layer has a weight quantizer
        y = node.outputs[0]
        attrs = {k: a for k, a in node.attributes.items()}
        y_p = ir.Value(name=nm(f"{y.name}.pos"), shape=y.shape, type=y.type)
        y_n = ir.Value(name=nm(f"{y.name}.neg"), shape=y.shape, type=y.type)
        pos_inputs = [dq_p, w_in, *node.inputs[2:]]  # bias (Gemm C / Conv B) once, on the positive branch
        n_p = ir.Node("", node.op_type, pos_inputs, attributes=list(attrs.values()), outputs=[y_p],
                      name=nm(f"{node.name}.pos"), metadata_props=dict(node.metadata_props))
        n_n = ir.Node("", node.op_type, [dq_n, w_in], attributes=list(attrs.values()), outputs=[y_n],
                      name=nm(f"{node.name}.neg"), metadata_props=dict(node.metadata_props))
        y_sum = ir.Value(name=nm(f"{y.name}.regions"), shape=y.shape, type=y.type)
        add = ir.node("Add", [y_p, y_n], outputs=[y_sum], name=nm(f"{module}/regions/Add"),
                      metadata_props=dict(meta))
        g.insert_after(node, [n_p, n_n, add])
        was_output = y.is_graph_output()
        y.replace_all_uses_with(y_sum, replace_graph_outputs=True)
        if was_output:
            y_sum.name, y.name = y.name, nm(f"{y.name}.orig")
        shifts = [q.offset for q in (reg.pos, reg.neg) if q.shift]
        if shifts:
            self._restore_linear(y_sum, add, site, sum(shifts), module, "input.regions", n_p)
        g.remove(node, safe=True)

    def _weight_values(self, site: Site) -> np.ndarray:
        """The GEMM's weight as the graph computes with it (dequantized when quantized)."""
        w = self._wdq.get(id(site.node))
        if w is None:
            w = const_array(site.node.inputs[site.weight_index])
        if w is None:
            raise GraphPassError(f"{site.name}: weight is not a constant")
        return np.asarray(w, np.float32)

    def _restore_linear(self, y: ir.Value, after: ir.Node, site: Site, offset: float, module: str, role: str,
                        gemm: ir.Node | None = None) -> None:
        """Add ``offset * rowsum(Wq)`` to the GEMM output ``y`` (produced by ``after``): folded into a constant
        bias (Gemm ``C``, or the constant of the Add consuming ``y``) when there is one, else a new Add."""
        w = self._weight_values(site)
        red = tuple(d for d in range(w.ndim) if d != site.weight_axis)
        corr = (np.float64(offset) * w.astype(np.float64).sum(axis=red)).astype(np.float32)
        g, nm = self._graph, self._namer
        gemm = gemm or site.node
        meta = self._meta(gemm, f"{role}.offset", module, 0)
        if gemm.op_type == "Gemm" and len(gemm.inputs) > 2 and const_array(gemm.inputs[2]) is not None and \
                gemm.outputs[0] is y:
            c0 = const_array(gemm.inputs[2]).astype(np.float32)
            gemm.replace_input_with(2, add_initializer(g, nm, f"{module}.bias_shifted", (c0 + corr).astype(np.float32)))
            return
        uses = list(y.uses())
        if len(uses) == 1 and not y.is_graph_output():
            n, i = uses[0].node, uses[0].idx
            if n.op_type == "Add" and len(n.inputs) == 2:
                b = const_array(n.inputs[1 - i])
                if b is not None and b.shape == corr.shape:
                    n.replace_input_with(1 - i, add_initializer(g, nm, f"{module}.bias_shifted",
                                                                (b.astype(np.float32) + corr).astype(np.float32)))
                    return
        cv = add_initializer(g, nm, f"{module}.{role}.offset_out", corr)
        self._add_after(y, after, cv, f"{module}/{role}/offset", meta)

    def _add_after(self, y: ir.Value, after: ir.Node, other: ir.Value, name: str, meta: dict,
                   extra: list[ir.Node] = ()) -> None:
        g, nm = self._graph, self._namer
        y2 = ir.Value(name=nm(f"{y.name}.shifted"), shape=y.shape, type=y.type)
        was_output = y.is_graph_output()
        y.replace_all_uses_with(y2, replace_graph_outputs=True)
        add = ir.node("Add", [y, other], outputs=[y2], name=nm(name), metadata_props=dict(meta))
        g.insert_after(after, [*extra, add])
        if was_output:
            y2.name, y.name = y.name, nm(f"{y.name}.orig")

    def _restore_attn(self, site: Site, offset: float, module: str) -> None:
        """``attn @ v`` with a shifted ``attn``: add ``offset * ReduceSum(v, axes=-2, keepdims)``."""
        g, nm, node = self._graph, self._namer, site.node
        meta = self._meta(node, "attn.offset", module, 0)
        v = node.inputs[1]
        axes = add_initializer(g, nm, f"{module}.attn.colsum_axes", np.array([-2], np.int64))
        c = add_initializer(g, nm, f"{module}.attn.offset", np.array(offset, np.float32))
        cs = ir.Value(name=nm(f"{module}.attn.colsum_v"), type=v.type)
        sc = ir.Value(name=nm(f"{module}.attn.offset_out"), type=v.type)
        extra = [ir.node("ReduceSum", [v, axes], attributes={"keepdims": 1}, outputs=[cs],
                         name=nm(f"{module}/attn/colsum_v"), metadata_props=dict(meta)),
                 ir.node("Mul", [cs, c], outputs=[sc], name=nm(f"{module}/attn/offset_out"),
                         metadata_props=dict(meta))]
        self._add_after(node.outputs[0], node, sc, f"{module}/attn/offset", meta, extra)

    # -- the pass ------------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        if has_qdq(g):
            raise GraphPassError("insert_qdq: the graph already has QuantizeLinear/DequantizeLinear nodes; it expects "
                                 "the float export")
        if model.opset_imports.get("", 0) < 21 and any(
                (l.weight is not None and l.weight.bits == 4) or any(q.bits == 4 for q in l.quantizers().values())
                for l in self.recipe.layers):
            raise GraphPassError(f"insert_qdq: int4 Q/DQ needs opset >= 21 (graph has "
                                 f"{model.opset_imports.get('', 0)})")
        self._graph, self._namer, self._cache, self._wdq = g, Namer(g), {}, {}
        self.stats = {"layers": [], "qdq_pairs": 0, "weights": 0, "smooth_folded_at_export": 0, "shifted": 0}
        for layer in self.recipe.layers:
            bad = [r for r, q in layer.quantizers().items() if q.shift and not (
                (layer.kind == "linear" and r in ("input", "input.pos", "input.neg")) or
                (layer.kind == "attn" and r == "attn"))]
            if bad:
                raise GraphPassError(f"recipe layer {layer.module!r}: a grid shift is supported on Linear inputs and "
                                     f"the post-softmax 'attn' operand only, not on {', '.join(bad)}")
        by_mod = sites_by_module(find_sites(g))
        for layer in self.recipe.layers:
            sites = by_mod.get(layer.module, [])
            entry: dict[str, Any] = {"module": layer.module, "kind": layer.kind, "nodes": []}
            if layer.kind in ("linear", "conv"):
                want = "linear" if layer.kind == "linear" else "conv"
                sites = [s for s in sites if s.kind == want]
                if not sites:
                    raise GraphPassError(
                        f"recipe layer {layer.module!r} ({layer.kind}): no {want} node in the graph maps to this "
                        f"module (through the exporter's name scopes); modules with {want} nodes: "
                        f"{_preview(m for m, ss in by_mod.items() if any(s.kind == want for s in ss))}")
                for s in sites:
                    entry["nodes"].append(s.name)
                    if layer.weight is not None:
                        self._weight_dq(s, layer.weight, layer.module)
                        self.stats["weights"] += 1
                        entry["weight"] = {"bits": layer.weight.bits,
                                           "axis": s.weight_axis if len(layer.weight.scale) > 1 else None}
                        if layer.weight.group:
                            entry["weight"]["group"] = layer.weight.group
                    if layer.input is not None:
                        dq = self._act_qdq(s.node.inputs[0], layer.input, "input", layer.module, s.node)
                        s.node.replace_input_with(0, dq)
                        entry["input"] = {"bits": layer.input.bits}
                        if layer.input.shift:
                            self._restore_linear(s.node.outputs[0], s.node, s, layer.input.offset, layer.module,
                                                 "input")
                            entry["input"]["shift"] = layer.input.shift
                    elif layer.input_regions is not None:
                        self._regions(s, layer)
                        entry["input_regions"] = {"pos_bits": layer.input_regions.pos.bits,
                                                  "neg_bits": layer.input_regions.neg.bits,
                                                  "m": layer.input_regions.m}
                if layer.smooth is not None:
                    self.stats["smooth_folded_at_export"] += 1
            else:  # attn
                qk = [s for s in sites if s.kind == "attn_qk"]
                av = [s for s in sites if s.kind == "attn_av"]
                if not qk or not av:
                    raise GraphPassError(
                        f"recipe layer {layer.module!r} (attn): found {len(qk)} q@k^T and {len(av)} attn@v MatMuls "
                        f"under this module; export with fused_attn=False on every attention module so that the "
                        f"two matmuls and the Softmax appear in the graph")
                for s in qk + av:
                    entry["nodes"].append(s.name)
                for role, sites_, idx in (("q", qk, 0), ("k", qk, 1), ("attn", av, 0), ("v", av, 1)):
                    spec = getattr(layer, role)
                    if spec is None:
                        continue
                    for s in sites_:
                        dq = self._act_qdq(s.node.inputs[idx], spec, role, layer.module, s.node)
                        s.node.replace_input_with(idx, dq)
                    entry[role] = {"bits": spec.bits}
                if layer.attn is not None and layer.attn.shift:
                    for s in av:
                        self._restore_attn(s, layer.attn.offset, layer.module)
                    entry["attn"]["shift"] = layer.attn.shift
            self.stats["layers"].append(entry)
        g.sort()
        del self._graph, self._namer, self._cache, self._wdq
        return ir.passes.PassResult(model, modified=bool(self.recipe.layers))


def _preview(items, n: int = 8) -> str:
    items = sorted(items)
    s = ", ".join(items[:n])
    return s + (f", ... ({len(items)} in all)" if len(items) > n else "") if items else "(none)"


def insert_qdq(recipe: Recipe) -> InsertQDQ:
    return InsertQDQ(recipe)
