"""``split_windows``: MixA-Q in the graph. Each routed layer becomes two precision subgraphs, in standard ONNX.

Runs on the float export, before ``insert_qdq`` (:func:`mixa_passes` builds the whole pipeline):

1. **Router**, once per stage, at the input ``X`` of the stage's first block (the input of its ``norm1``
   LayerNormalization; post-norm blocks such as Swin V2's: the block's one float input, :func:`block_inputs`): ``a = ReduceMean(Abs(X), axis=-1)`` (per token), ``Gather(a, table)`` (the static
   group -> token table of :mod:`vitq.mixa.routing`; for shifted Swin blocks the table realizes the roll),
   ``ReduceL2`` over each group's tokens, ``TopK(k = G, sorted)`` -> the group order (descending importance, ties
   to the lower index), and its inverse permutation (``ScatterElements``). Token order = the groups' tokens in
   that order (ViT: prefix tokens first). One order serves every block of the stage (nested high sets); each
   block's static ``n_high`` cuts it. The batch stays dynamic.
2. **Split** of every routed Linear (``MatMul(X, W)``) of a block with ``n_low > 0``: ``GatherND(X, order,
   batch_dims=1)`` (ViT / Swin MLP: tokens of ``X [B, N, C]``; Swin ``qkv``/``proj``: windows of
   ``X [B*G, T, C]`` viewed as ``[B, G, T, C]``), ``Slice`` into the high (first ``n_high`` groups) and low part,
   one ``MatMul`` per branch on the shared weight, ``Concat`` and the exact merge ``GatherND(., inverse
   permutation)``. The low MatMul's name scope is the module plus ``@low``, so ``insert_qdq`` (run on the expanded
   recipe of :func:`expanded_recipe`) gives each branch its own quantizers, OPT-m included.
3. After ``insert_qdq`` (:class:`SplitWindowsAttn`): routed attention operands (``q``, ``k``, ``attn``, ``v``)
   get a second, low-bit Q/DQ on the same float operand, and ``Where(high_mask, dq_high, dq_low)`` feeds the
   matmul (ViT attention is global: per-token precision of its operands; Swin: per window). Branch weights with
   identical quantization are deduplicated (one DequantizeLinear feeds both MatMuls).

With ``n_low = 0`` everywhere the pass changes nothing (the graph equals the uniform one); in float (no
quantizers) the split is a pure permutation of rows around row-independent MatMuls (exact). Pruning
(``n_prune > 0``) is a simulation study only and is rejected here.
"""

from __future__ import annotations

import copy
import json
import numpy as np
import onnx_ir as ir

from ..onnx_meta import NAME_SCOPES_KEY
from ..recipe.schema import QuantSpec, Recipe
from .analysis import find_sites, sites_by_module
from .dynamic_qdq import dynamic_qdq_nodes, log_sqrt2_nodes
from .infra import GraphPass, GraphPassError
from .irutil import META_BITS, META_MODULE, META_ROLE, META_SHIFT, Namer, add_initializer, module_of
from ..format import NODE_BRANCH as META_BRANCH

LOW_SUFFIX = "@low"
I64 = ir.DataType.INT64
F32 = ir.DataType.FLOAT


def expanded_recipe(recipe: Recipe) -> Recipe:
    """The recipe ``insert_qdq`` runs on after the split: each routed layer at its high-branch spec (dropped when
    the high branch is float), plus ``MODULE@low`` layers with the low-branch specs (for split blocks only)."""
    spec = recipe.mixa
    routed = {l.module: l for l in spec.layers}
    layers = []
    for l in recipe.layers:
        m = routed.get(l.module)
        if m is None:
            layers.append(l)
            continue
        if m.high is not None:
            layers.append(m.high)
        blk = spec.block_of(l.module)
        if blk.n_low > 0 and m.low is not None and l.kind != "attn":  # attn operands: SplitWindowsAttn
            low = copy.copy(m.low)
            low.module = l.module + LOW_SUFFIX
            layers.append(low)
    r = copy.copy(recipe)
    r.layers, r.mixa = layers, None
    return r


def _in_scope(n: ir.Node, block: str) -> bool:
    m = module_of(n)
    return m is not None and (m == block or m.startswith(block + "."))


def block_inputs(g: ir.Graph, blocks: set[str]) -> dict[str, tuple[ir.Node, ir.Value]]:
    """Per block path, ``(first consumer node, X)``: the float activation entering the block. Pre-norm blocks: the
    input of ``norm1`` (a LayerNormalization). Otherwise (post-norm, e.g. Swin V2: ``x + norm1(attn(x))``) the one
    float, non-constant value produced outside the block's name scope and consumed inside it."""
    out: dict[str, tuple[ir.Node, ir.Value]] = {}
    nodes = list(g)
    for n in nodes:
        m = module_of(n)
        if n.op_type == "LayerNormalization" and m and m.endswith(".norm1") and m[: -len(".norm1")] in blocks:
            blk = m[: -len(".norm1")]
            p = n.inputs[0].producer()
            if blk not in out and (p is None or not _in_scope(p, blk)):
                out[blk] = (n, n.inputs[0])
    for blk in blocks - set(out):
        found: dict[int, tuple[ir.Node, ir.Value]] = {}
        for n in nodes:
            if not _in_scope(n, blk):
                continue
            for v in n.inputs:
                if v is None or v.const_value is not None or id(v) in found:
                    continue
                p = v.producer()
                if p is not None and (_in_scope(p, blk) or p.op_type == "Constant"):
                    continue
                if v.type is None or v.type.dtype != ir.DataType.FLOAT:
                    continue
                found[id(v)] = (n, v)
        if len(found) == 1:
            out[blk] = next(iter(found.values()))
        elif found:
            raise GraphPassError(f"mixa: block {blk} has {len(found)} float inputs from outside its scope "
                                 f"({', '.join(v.name or '?' for _, v in found.values())}); expected one")
    return out


class _Geom:
    """Static routing geometry of one block, from the recipe's ``mixa`` section (numpy only)."""

    def __init__(self, block, stage_first, layout, table, n_tokens, prefix, shift):
        self.block, self.stage_first, self.layout, self.table = block, stage_first, layout, table
        self.n_tokens, self.prefix, self.shift = n_tokens, prefix, shift

    @property
    def groups(self) -> int:
        return int(self.table.shape[0])

    @classmethod
    def of(cls, spec, b) -> "_Geom":
        from ..recipe.mixa import group_table, stage_first

        pre = spec.prefix if spec.scheme == "tokens" else 0
        table = group_table(spec.scheme, b.grid, spec.group, b.shift, pre)
        return cls(b.block, stage_first(spec.scheme, b.block), spec.scheme, table,
                   pre + b.grid[0] * b.grid[1], pre, b.shift)


class _Builder:
    """Appends nodes right before ``before`` (so they are in topological position)."""

    def __init__(self, g: ir.Graph, nm: Namer, meta: dict[str, str]):
        self.g, self.nm, self.meta = g, nm, meta
        self.before: ir.Node | None = None

    def const(self, base: str, arr) -> ir.Value:
        return add_initializer(self.g, self.nm, base, np.asarray(arr))

    def op(self, op_type: str, inputs, dtype: ir.DataType, base: str, n_out: int = 1, meta=None, **attrs):
        outs = [ir.Value(name=self.nm(f"{base}_{i}" if n_out > 1 else base), type=ir.TensorType(dtype))
                for i in range(n_out)]
        node = ir.node(op_type, list(inputs), attributes=attrs or None, outputs=outs, name=self.nm(f"{base}/node"),
                       metadata_props=dict(meta if meta is not None else self.meta))
        self.g.insert_before(self.before, node)
        return outs if n_out > 1 else outs[0]


class _Router:
    """Router values of one (stage, table): token order/inverse (tokens layout), window order/inverse."""

    def __init__(self, b: _Builder, a: ir.Value, batch: ir.Value, table: np.ndarray, prefix: int, tag: str):
        G, T = table.shape
        self.G, self.T, self.prefix = G, T, prefix
        self.N = prefix + G * T
        tab = b.const(f"{tag}.table", table.astype(np.int64))
        ga = b.op("Gather", [a, tab], F32, f"{tag}.group_a", axis=1)                       # [B, G, T]
        sc = b.op("ReduceL2", [ga, b.const(f"{tag}.axes", np.array([-1], np.int64))], F32, f"{tag}.score",
                  keepdims=0)                                                               # [B, G]
        _, order = b.op("TopK", [sc, b.const(f"{tag}.k", np.array([G], np.int64))], F32, f"{tag}.topk", n_out=2,
                        axis=-1, largest=1, sorted=1)
        order.type = ir.TensorType(I64)
        self.order = order                                                                  # [B, G]
        self.inv_w = self._inverse(b, order, G, f"{tag}.win")
        tp = b.op("Gather", [tab, order], I64, f"{tag}.tok_groups", axis=0)               # [B, G, T]
        tp = b.op("Reshape", [tp, b.const(f"{tag}.shape_bn", np.array([0, G * T], np.int64))], I64,
                  f"{tag}.tok_perm_patches")
        if prefix:
            shp = b.op("Concat", [batch, b.const(f"{tag}.p", np.array([prefix], np.int64))], I64, f"{tag}.pshape",
                       axis=0)
            pre = b.op("Expand", [b.const(f"{tag}.prefix", np.arange(prefix, dtype=np.int64)[None]), shp], I64,
                       f"{tag}.prefix_idx")
            tp = b.op("Concat", [pre, tp], I64, f"{tag}.tok_perm", axis=1)
        self.tok_perm = tp                                                                  # [B, N]
        self.inv_t = self._inverse(b, tp, self.N, f"{tag}.tok")
        u = b.const(f"{tag}.unsq", np.array([-1], np.int64))
        self.tok_idx = b.op("Unsqueeze", [tp, u], I64, f"{tag}.tok_idx")                    # [B, N, 1]
        self.inv_t_idx = b.op("Unsqueeze", [self.inv_t, u], I64, f"{tag}.inv_tok_idx")
        self.win_idx = b.op("Unsqueeze", [order, u], I64, f"{tag}.win_idx")                 # [B, G, 1]
        self.inv_w_idx = b.op("Unsqueeze", [self.inv_w, u], I64, f"{tag}.inv_win_idx")
        self._masks: dict = {}

    @staticmethod
    def _inverse(b: _Builder, perm: ir.Value, n: int, tag: str) -> ir.Value:
        shp = b.op("Shape", [perm], I64, f"{tag}.shape")
        zeros = b.op("ConstantOfShape", [shp], I64, f"{tag}.zeros",
                     value=ir.tensor(np.array([0], np.int64)))
        ar = b.op("Expand", [b.const(f"{tag}.arange", np.arange(n, dtype=np.int64)[None]), shp], I64,
                  f"{tag}.arange_b")
        return b.op("ScatterElements", [zeros, perm, ar], I64, f"{tag}.inverse", axis=1)

    def high_mask(self, b: _Builder, layout: str, n_high: int, tag: str) -> ir.Value:
        """Bool: ``tokens`` ``[B, N]`` (True where the token's rank < prefix + n_high * T); ``windows``
        ``[B*G, 1, 1, 1]``."""
        key = (layout, n_high)
        if key not in self._masks:
            if layout == "windows":
                m = b.op("Less", [self.inv_w, b.const(f"{tag}.nh", np.array(n_high, np.int64))], ir.DataType.BOOL,
                         f"{tag}.win_high")
                m = b.op("Reshape", [m, b.const(f"{tag}.shape_w", np.array([-1, 1, 1, 1], np.int64))],
                         ir.DataType.BOOL, f"{tag}.win_high4")
            else:
                m = b.op("Less", [self.inv_t, b.const(f"{tag}.nh", np.array(self.prefix + n_high * self.T,
                                                                               np.int64))],
                         ir.DataType.BOOL, f"{tag}.tok_high")
            self._masks[key] = m
        return self._masks[key]


def _scopes_with(node: ir.Node, module: str) -> str:
    raw = node.metadata_props.get(NAME_SCOPES_KEY)
    try:
        scopes = json.loads(raw.replace("'", '"')) if raw else ["", "op"]
    except json.JSONDecodeError:
        scopes = ["", "op"]
    return json.dumps([*scopes[:-1], module, scopes[-1]])


class SplitWindows(GraphPass):
    NAME = "split_windows"
    REQUIRES = frozenset({"float"})
    PROVIDES = frozenset({"mixa_split"})
    SEMANTICS = "float"  # in float the split is exact (tests check max |diff| == 0); the manager allows 1e-4

    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self.spec = recipe.mixa
        self.geoms = {b.block: _Geom.of(self.spec, b) for b in self.spec.blocks}
        self.attn_sites: list[tuple[str, str, str, ir.Node, int]] = []  # (module, block, role, node, input idx)
        self.pairs: list[tuple[ir.Node, ir.Node]] = []
        self.routers: dict = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        nm = Namer(g)
        spec = self.spec
        for blk in spec.blocks:
            if blk.n_prune:
                raise GraphPassError(f"mixa block {blk.block}: pruning (n_prune={blk.n_prune}) is a simulation "
                                     f"study; the graph pass routes high/low only")
        active = [b for b in spec.blocks if b.n_low > 0]
        self.stats = {"routed_blocks": len(active), "split_layers": 0, "routers": 0, "attn_operands": 0}
        if not active:
            return ir.passes.PassResult(model, modified=False)
        by_mod = sites_by_module(find_sites(g))
        ln_in = block_inputs(g, {self.geoms[b.block].stage_first for b in active if b.block in self.geoms})
        routed = {l.module: l for l in spec.layers}
        for blk in active:
            geom = self.geoms.get(blk.block)
            if geom is None or geom.groups != blk.groups:
                raise GraphPassError(f"mixa block {blk.block}: not a routable block of this model (or a different "
                                     f"group count than the recipe's {blk.groups})")
            router = self._router(g, nm, geom, ln_in)
            for l in [l for m, l in routed.items() if spec.block_of(m) is blk]:
                kind = (l.high or l.low).kind if (l.high or l.low) else "linear"
                sites = by_mod.get(l.module, [])
                if kind == "attn":
                    qk = [s.node for s in sites if s.kind == "attn_qk"]
                    av = [s.node for s in sites if s.kind == "attn_av"]
                    if len(qk) != 1 or len(av) != 1:
                        raise GraphPassError(f"mixa layer {l.module}: expected one q@k^T and one attn@v MatMul, "
                                             f"found {len(qk)} and {len(av)}")
                    for role, node, idx in (("q", qk[0], 0), ("k", qk[0], 1), ("attn", av[0], 0), ("v", av[0], 1)):
                        self.attn_sites.append((l.module, blk.block, role, node, idx))
                    continue
                lin = [s for s in sites if s.kind == "linear" and s.node.op_type == "MatMul"]
                if len(lin) != 1:
                    raise GraphPassError(f"mixa layer {l.module}: expected one MatMul(X, W) in the graph, found "
                                         f"{len(lin)}")
                layout = "windows" if (geom.layout == "windows" and l.module.startswith(geom.block + ".attn.")) \
                    else "tokens"  # Swin MLP: per token (tokens of the block's shifted windows)
                self._split(g, nm, lin[0].node, l.module, router, blk.n_high, blk.n_low, layout)
                self.stats["split_layers"] += 1
        g.sort()
        return ir.passes.PassResult(model, modified=True)

    def _router(self, g, nm, geom, ln_in) -> _Router:
        key = (geom.stage_first, geom.shift)
        if key in self.routers:
            return self.routers[key]
        if geom.stage_first not in ln_in:
            raise GraphPassError(f"mixa: the input of block {geom.stage_first} is not found in the graph (the router "
                                 f"reads the stage input there)")
        ln, x = ln_in[geom.stage_first]
        tag = f"mixa.{geom.stage_first}.s{geom.shift[0]}"
        b = _Builder(g, nm, {NAME_SCOPES_KEY: json.dumps(["", f"mixa.router.{geom.stage_first}", "router"])})
        b.before = ln
        # importance map: shared per stage (one ReduceMean), cached across the stage's tables
        akey = ("a", geom.stage_first)
        if akey not in self.routers:
            ab = b.op("Abs", [x], F32, f"{tag}.abs")
            a = b.op("ReduceMean", [ab, b.const(f"{tag}.c_axes", np.array([-1], np.int64))], F32, f"{tag}.a",
                     keepdims=0)
            a = b.op("Reshape", [a, b.const(f"{tag}.a_shape", np.array([0, geom.n_tokens], np.int64))], F32,
                     f"{tag}.a_flat")
            batch = b.op("Shape", [x], I64, f"{tag}.batch", start=0, end=1)
            self.routers[akey] = (a, batch)
        a, batch = self.routers[akey]
        r = _Router(b, a, batch, geom.table, geom.prefix, tag)
        r.builder = b
        self.routers[key] = r
        self.stats["routers"] += 1
        return r

    def _split(self, g, nm, mm: ir.Node, module: str, r: _Router, n_high: int, n_low: int, layout: str) -> None:
        x, w = mm.inputs[0], mm.inputs[1]
        co = int(w.const_value.shape[1])
        c = int(w.const_value.shape[0])
        b = _Builder(g, nm, dict(mm.metadata_props))
        b.before = mm
        tag = f"{module}.mixa"
        if layout == "tokens":
            nh = r.prefix + n_high * r.T
            xp = b.op("GatherND", [x, r.tok_idx], F32, f"{tag}.x_perm", batch_dims=1)
            cut, end, ax = nh, r.N, 1
        else:
            nh = n_high
            x4 = b.op("Reshape", [x, b.const(f"{tag}.shape4", np.array([-1, r.G, r.T, c], np.int64))], F32,
                      f"{tag}.x_win")
            xp = b.op("GatherND", [x4, r.win_idx], F32, f"{tag}.x_perm", batch_dims=1)
            cut, end, ax = nh, r.G, 1
        axes = b.const(f"{tag}.axes", np.array([ax], np.int64))
        parts = []
        for br, (s, e) in (("high", (0, cut)), ("low", (cut, end))):
            xs = b.op("Slice", [xp, b.const(f"{tag}.{br}.s", np.array([s], np.int64)),
                                b.const(f"{tag}.{br}.e", np.array([e], np.int64)), axes], F32, f"{tag}.x_{br}")
            if layout == "windows":
                xs = b.op("Reshape", [xs, b.const(f"{tag}.{br}.shape3", np.array([-1, r.T, c], np.int64))], F32,
                          f"{tag}.x_{br}3")
                xs.shape = ir.Shape([None, r.T, c])
            else:
                xs.shape = ir.Shape([None, e - s, c])  # static features: a dynamic quantizer's block size
            meta = dict(mm.metadata_props)
            meta[META_BRANCH] = br
            if br == "low":
                meta[NAME_SCOPES_KEY] = _scopes_with(mm, module + LOW_SUFFIX)
            y = b.op("MatMul", [xs, w], F32, f"{tag}.y_{br}", meta=meta)
            node = y.producer()
            if layout == "windows":
                y = b.op("Reshape", [y, b.const(f"{tag}.{br}.shape4o", np.array([-1, e - s, r.T, co], np.int64))],
                         F32, f"{tag}.y_{br}4")
            parts.append((node, y))
        yc = b.op("Concat", [parts[0][1], parts[1][1]], F32, f"{tag}.y_cat", axis=1)
        if layout == "tokens":
            y = b.op("GatherND", [yc, r.inv_t_idx], F32, f"{tag}.y", batch_dims=1)
        else:
            y = b.op("GatherND", [yc, r.inv_w_idx], F32, f"{tag}.y_win", batch_dims=1)
            y = b.op("Reshape", [y, b.const(f"{tag}.shape3o", np.array([-1, r.T, co], np.int64))], F32, f"{tag}.y")
        old = mm.outputs[0]
        y.shape, y.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, y)
        if old.is_graph_output():
            raise GraphPassError(f"mixa layer {module}: its MatMul output is a graph output")
        g.remove(mm, safe=True)
        self.pairs.append((parts[0][0], parts[1][0]))


def _qtype(bits: int) -> ir.DataType:
    return ir.DataType.INT4 if bits == 4 else ir.DataType.INT8


class SplitWindowsAttn(GraphPass):
    """After ``insert_qdq``: low-bit Q/DQ + ``Where`` for routed attention operands; dedupe branch weights."""

    NAME = "split_windows_attn"
    REQUIRES = frozenset({"qdq", "mixa_split"})
    SEMANTICS = "changes"

    def __init__(self, split: SplitWindows):
        super().__init__()
        self.split = split

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        g = model.graph
        nm = Namer(g)
        sp = self.split
        spec = sp.spec
        self.stats = {"attn_operands": 0, "weights_shared": 0}
        layers = {l.module: l for l in spec.layers}
        for module, block, role, node, idx in sp.attn_sites:
            blk = spec.block(block)
            geom = sp.geoms[block]
            r = sp.routers[(geom.stage_first, geom.shift)]
            layout = geom.layout
            cur = node.inputs[idx]
            t = _float_operand(cur)
            b = _Builder(g, nm, dict(node.metadata_props))
            b.before = node
            mask = r.high_mask(b, layout, blk.n_high, f"mixa.{block}.{layout}")
            if layout == "tokens":  # [B, N] -> [B,1,N,1] (q, attn, v rows) / [B,1,1,N] (k^T columns)
                axes = [1, 2] if role == "k" else [1, 3]
                mask = b.op("Unsqueeze", [mask, b.const(f"{module}.{role}.mask_axes", np.array(axes, np.int64))],
                            ir.DataType.BOOL, f"{module}.{role}.mask")
            low, high = layers[module].low, layers[module].high
            qs = getattr(low, role) if low is not None else None
            qh = getattr(high, role) if high is not None else None
            lo = t if qs is None else self._qdq(b, t, qs, role, module + LOW_SUFFIX)
            # shifted grids: the matmul output gets the high branch's offset back (insert_qdq), so the low operand
            # carries the difference of the two offsets
            adj = (qs.offset if qs is not None else 0.0) - (qh.offset if qh is not None else 0.0)
            if adj:
                lo = b.op("Add", [lo, b.const(f"{module}.{role}.low_offset", np.array(adj, np.float32))], F32,
                          f"{module}.{role}.low_offset")
            sel = b.op("Where", [mask, cur, lo], F32, f"{module}.{role}.mixa_sel")
            node.replace_input_with(idx, sel)
            for u in list(cur.uses()):  # the colsum(v) of a shifted attn follows the matmul's v operand
                if u.node.metadata_props.get(META_ROLE) == "attn.offset" and \
                        u.node.metadata_props.get(META_MODULE) == module:
                    u.node.replace_input_with(u.idx, sel)
            self.stats["attn_operands"] += 1
        for hi, lo in sp.pairs:
            if hi.graph is None or lo.graph is None or hi.inputs[1] is None or lo.inputs[1] is None:
                continue  # rewritten by insert_qdq (OPT-m regions replace the GEMM): nothing to share here
            dh, dl = hi.inputs[1].producer(), lo.inputs[1].producer()
            if dh is None or dl is None or dh is dl or dh.op_type != "DequantizeLinear" or \
                    dl.op_type != "DequantizeLinear":
                continue
            if _same_dq(dh, dl):
                lo.replace_input_with(1, hi.inputs[1])
                self.stats["weights_shared"] += 1
        changed = bool(self.stats["attn_operands"] or self.stats["weights_shared"])
        if changed:
            g.sort()
        return ir.passes.PassResult(model, modified=changed)

    @staticmethod
    def _qdq(b: _Builder, x: ir.Value, spec: QuantSpec, role: str, module: str) -> ir.Value:
        qt = _qtype(spec.bits)
        meta = {**b.meta, META_ROLE: role, META_MODULE: module, META_BITS: str(spec.bits)}
        base = f"{module}.{role}"
        if spec.dynamic == "log_sqrt2":  # the post-softmax operand: per query row
            nodes, y = log_sqrt2_nodes(b.g, b.nm, x, spec.bits, base, meta)
            b.g.insert_before(b.before, nodes)
            return y
        if spec.dynamic:  # per token; the k operand is k^T in the graph (features on axis -2)
            nodes, y = dynamic_qdq_nodes(b.g, b.nm, x, spec.bits, -2 if role == "k" else -1, base, meta,
                                         group=spec.group)
            b.g.insert_before(b.before, nodes)
            return y
        scale = b.const(f"{base}.scale", np.array(spec.scale[0], np.float32))
        zp = add_initializer(b.g, b.nm, f"{base}.zero_point", np.array(0, np.int8), qt)
        if spec.shift:
            x = b.op("Sub", [x, b.const(f"{base}.offset", np.array(spec.offset, np.float32))], F32, f"{base}.shifted",
                     meta={**meta, META_SHIFT: repr(spec.offset)})
        q = b.op("QuantizeLinear", [x, scale, zp], qt, f"{base}.q", meta=meta)
        if spec.bits not in (4, 8):
            q = b.op("Clip", [q, b.const(f"{base}.qmin", np.array(spec.qmin, np.int8)),
                              b.const(f"{base}.qmax", np.array(spec.qmax, np.int8))], qt, f"{base}.q_clip", meta=meta)
        return b.op("DequantizeLinear", [q, scale, zp], F32, f"{base}.dq", meta=meta)


def _float_operand(v: ir.Value) -> ir.Value:
    """The float tensor behind ``DQ(Clip?(Q(Sub?(t))))`` (or ``v`` itself when it is not quantized)."""
    p = v.producer()
    if p is None or p.op_type != "DequantizeLinear":
        return v
    q = p.inputs[0].producer()
    if q is not None and q.op_type == "Clip":
        q = q.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear":
        raise GraphPassError(f"split_windows_attn: {v.name} is a DequantizeLinear output without its QuantizeLinear")
    x = q.inputs[0]
    sub = x.producer()
    if sub is not None and sub.op_type == "Sub" and META_SHIFT in sub.metadata_props:
        x = sub.inputs[0]  # a shifted quantizer: Sub(t, c) -> Q
    return x


def _same_dq(a: ir.Node, b: ir.Node) -> bool:
    if len(a.inputs) != len(b.inputs):
        return False
    ax, bx = a.attributes.get("axis"), b.attributes.get("axis")
    if (ax.as_int() if ax else None) != (bx.as_int() if bx else None):
        return False
    for u, v in zip(a.inputs, b.inputs):
        if u is v:
            continue
        if u is None or v is None or u.const_value is None or v.const_value is None:
            return False
        if u.const_value.dtype != v.const_value.dtype:
            return False
        if not np.array_equal(u.const_value.numpy(), v.const_value.numpy()):
            return False
    return True


def mixa_passes(recipe: Recipe, target: str, base_pipeline) -> list[GraphPass]:
    """The target's usual pipeline (``base_pipeline(recipe, target)``, run on the expanded recipe) with
    ``split_windows`` right before ``insert_qdq`` and ``split_windows_attn`` right after it."""
    from .insert_qdq import InsertQDQ

    split = SplitWindows(recipe)
    passes = list(base_pipeline(expanded_recipe(recipe), target))
    i = next((k for k, p in enumerate(passes) if isinstance(p, InsertQDQ)), None)
    if i is None:
        raise GraphPassError(f"target {target!r}: its pipeline has no insert_qdq pass to route around")
    return passes[:i] + [split, passes[i], SplitWindowsAttn(split)] + passes[i + 1:]
