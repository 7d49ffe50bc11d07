"""Building a recipe's ``mixa`` section: geometry, ratios, and the two branches' quantizers.

Per routed layer with base spec ``S`` (the uniform recipe's layer):

* a branch whose bits equal ``S``'s activation bits *is* ``S`` (so ``r = 0`` is exactly the base recipe, and the
  usual PTQ default "base W4A8, low windows W4A4" keeps the base's a8 quantizers in the high branch);
* a branch at 32 bits is float (no weight or activation quantizer: the "high = fp32" deployment pair);
* any other branch gets new activation quantizers, calibrated **on its own tokens/windows only** (the groups the
  router sends to that branch on the calibration images at the calibration ratios), by the same output-error
  scale search as the base pipeline (:func:`vitq.quant.search.best_act_scale`), with the weight kept at ``S``'s
  quantized weight (the branches share weights). OPT-m layers (post-GELU ``fc2``) get their region quantizers
  re-searched at the branch's bits; attention operands are scored on their own matmul
  (``q`` on ``q @ k^T`` with float ``k``, ``k`` with float ``q``, ``attn`` on ``attn @ v``, ``v`` with float
  ``attn``), restricted to the branch's tokens (ViT: rows; Swin: whole windows).

``low_quant="dynamic"``: the low branch's activation quantizers are dynamic per token instead (recipe
``"dynamic": "token"``, :func:`vitq.quant.functional.fake_quant_dynamic`): each low token's Linear input, and each
low token's ``q``/``k``/``v`` row and ``attn`` row, gets its own asymmetric grid from its own min/max at run time
(4 or 8 bits; nothing to calibrate, weights still shared; dynamic even when its bits equal the base's). Same bit-operations; the graph computes the scales with
``ReduceMin``/``ReduceMax`` and blocked ``QuantizeLinear`` (ONNX Runtime; for TensorRT, ``lower_trt`` makes the
Linear inputs ``QuantLinearA4`` plugin nodes in their per-row mode and ``dynamic_qdq_float`` the rest float).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from ..quant.functional import fake_quant
from ..quant.observers import fake_quant_weight
from ..quant.optm import fit_regions
from ..quant.prepare import AttnHook, Instrumented
from ..quant.search import SHIFT_MAX_BITS, best_act_scale, subsample
from ..quant.simulate import QuantSim, _t
from ..errors import InputError, UnsupportedError
from ..recipe.schema import ATTN_OPERANDS, LayerSpec, QuantSpec, Recipe, RegionSpec
from ..recipe.spec import dynamic_layer
from .config import LOW_QUANT, LOW_SOFTMAX
from .routing import BlockGeom, block_geometry
from .sim import Router, layer_layout, routed_modules
from ..recipe.mixa import FLOAT_BITS, MixaBlock, MixaLayer, MixaSpec, n_low_groups

DEFAULT_GROUP_VIT = (2, 2)


def _act_bits(s: LayerSpec) -> int | None:
    return s.act_bits


def skeleton(model: nn.Module, family: str, recipe: Recipe, *, group=None, high_bits: int | None = None,
             low_bits: int = 4, routed=("linear",), ratios: float | dict = 0.0) -> tuple[MixaSpec, list[BlockGeom]]:
    """A spec whose branches are still the base layers (no calibration): blocks, ratios, routed layers."""
    if family == "vit" and group is None:
        group = DEFAULT_GROUP_VIT
    geoms = block_geometry(model, family, group)
    base_bits = recipe.defaults.get("act_bits")
    if high_bits is None:
        high_bits = base_bits if isinstance(base_bits, int) else 8
    blocks = []
    for g in geoms:
        r = float(ratios.get(g.block, 0.0) if isinstance(ratios, dict) else ratios)
        blocks.append(MixaBlock(g.block, g.stage, g.groups, r, n_low_groups(g.groups, r), 0, g.shift, g.grid))
    layers = []
    for g in geoms:
        for m in routed_modules(g, routed):
            s = recipe.layer(m)
            if s is None:
                continue
            layers.append(MixaLayer(m, s, s))
    scheme = "windows" if family == "swin" else "tokens"
    grp = geoms[0].group
    spec = MixaSpec(scheme, tuple(grp), int(high_bits), int(low_bits), blocks, layers, tuple(routed), recipe.name,
                    geoms[0].prefix)
    spec.validate()
    return spec, geoms


@torch.no_grad()
def collect_branch_samples(prepared: nn.Module, family: str, spec: MixaSpec, geoms: list[BlockGeom],
                           x: torch.Tensor, *, batch_size: int = 16, tokens_per_image: int = 48,
                           keep_images: int = 8, seed: int = 0) -> dict:
    """Float forward of ``prepared`` over ``x`` with the router of ``spec``; per routed layer and level (0 high,
    1 low): token samples and max|x| (Linears), operand tensors of the first ``keep_images`` images plus the
    levels (attention). Returns ``{module: {...}}``."""
    gen = torch.Generator().manual_seed(seed)
    router = Router(geoms, spec)
    gmap = {g.block: g for g in geoms}
    out: dict = {}
    state = {"seen": 0}
    mods = dict(prepared.named_modules())
    with Instrumented(prepared) as ins:
        for first in sorted({g.stage_first for g in geoms}):
            ins.pre_hook(mods[first], lambda m, a, first=first: router.set_importance(first, a[0]))
        for l in spec.layers:
            b = spec.block_of(l.module)
            g = gmap[b.block]
            layout = layer_layout(g, l.module)
            kind = (l.high or l.low).kind
            if kind == "attn":
                st = out.setdefault(l.module, {"kind": "attn", "layout": layout, "t": {r: [] for r in
                                                                                        ("q", "k", "attn", "v")},
                                               "lvl": [], "amax": {}})

                def qfn(role, t, st=st, blk=b.block, layout=layout):
                    n_img = max(0, keep_images - state["seen"])
                    if n_img:
                        per = t.shape[0] // state["batch"]
                        st["t"][role].append(t[: n_img * per].clone())
                        if role == "q":
                            lv = router.glevel(blk) if layout == "windows" else router.tlevel(blk)
                            st["lvl"].append(lv[:n_img].clone())
                    return t

                ins.swap(l.module, lambda inner, qfn=qfn: AttnHook(inner, qfn))
                continue
            st = out.setdefault(l.module, {"kind": "linear", "layout": layout, 0: [], 1: [], "amax": {0: 0.0, 1: 0.0},
                                           "min": {0: 0.0, 1: 0.0}})

            def pre(mod, args, st=st, blk=b.block, layout=layout):
                t = args[0]
                if layout == "windows":
                    lv = router.glevel(blk).reshape(-1)  # [B*G]
                    rows = {k: t[lv == k].reshape(-1, t.shape[-1]) for k in (0, 1)}
                else:
                    lv = router.tlevel(blk)  # [B, N]
                    rows = {k: t[lv == k] for k in (0, 1)}
                for k, r in rows.items():
                    if r.numel() == 0:
                        continue
                    st["amax"][k] = max(st["amax"][k], float(r.abs().max()))
                    st["min"][k] = min(st["min"][k], float(r.min()))
                    n = min(r.shape[0], tokens_per_image * state["batch"])
                    idx = torch.randperm(r.shape[0], generator=gen)[:n]
                    st[k].append(r[idx].clone())

            ins.pre_hook(mods[l.module], pre)
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size]
            state["batch"] = len(xb)
            prepared(xb)
            state["seen"] += len(xb)
    for st in out.values():
        if st["kind"] == "linear":
            for k in (0, 1):
                st[k] = torch.cat(st[k]) if st[k] else None
        else:
            st["t"] = {r: torch.cat(v) for r, v in st["t"].items()}
            st["lvl"] = torch.cat(st["lvl"])
    return out


def _regions_fixed_w(x, w, wq, bits, amax, xmin, shifted=False):
    """OPT-m region scales at ``bits`` for a fixed quantized weight ``wq`` (:func:`vitq.quant.optm.fit_regions`,
    without re-searching the weight). Returns (RegionSpec | None, plain QuantSpec)."""
    plain = best_act_scale(x, bits, amax, lambda xq: xq @ wq.t(), x @ w.t(), shifted=shifted)
    rc = fit_regions(x, w, wq, bits, amax, xmin, plain, plain.err, shifted)
    pq = QuantSpec(bits, [float(plain.scale)], method="search", shift=plain.shift)
    if rc.use:
        return RegionSpec(rc.m, QuantSpec(bits, [float(rc.pos_scale)], method="search", shift=rc.pos_shift),
                          QuantSpec(bits, [float(rc.neg_scale)], method="search", shift=rc.neg_shift)), pq
    return None, pq


def _calib_linear(base: LayerSpec, w: torch.Tensor, st: dict, level: int, bits: int) -> LayerSpec:
    xs = st[level]
    if xs is None or xs.shape[0] == 0:  # a block with one group (e.g. Swin's last stage) never routes: any tokens
        level = 1 - level
        xs = st[level]
    if xs is None or xs.shape[0] == 0:
        raise ValueError(f"{base.module}: no calibration tokens reached either branch")
    xs = subsample(xs, 2048)
    wq = fake_quant_weight(w, _t(base.weight.scale), base.weight.bits) if base.weight is not None else w
    amax = st["amax"][level]
    s = copy.copy(base)
    if base.input_regions is not None:
        reg, plain = _regions_fixed_w(xs, w, wq, bits, amax, st["min"][level], shifted=bits <= SHIFT_MAX_BITS)
        s.input_regions, s.input = (reg, None) if reg is not None else (None, plain)
    else:
        c = best_act_scale(xs, bits, amax, lambda xq: xq @ wq.t(), xs @ w.t(), shifted=bits <= SHIFT_MAX_BITS)
        s.input = QuantSpec(bits, [float(c.scale)], method="search", shift=c.shift)
        s.input_regions = None
    return s


def _calib_attn(base: LayerSpec, st: dict, level: int, bits: int) -> LayerSpec:
    t, lvl = st["t"], st["lvl"]
    q, k, a, v = t["q"], t["k"], t["attn"], t["v"]
    out = {}
    if st["layout"] == "windows":  # whole windows: [B*G, h, T, *]
        sel = lvl.reshape(-1) == level
        if not sel.any():  # one-window stage: never routed, calibrate on all windows
            sel = torch.ones_like(sel)
        q, k, a, v = q[sel], k[sel], a[sel], v[sel]
        pairs = {"q": (q, lambda x: x @ k.transpose(-2, -1)), "k": (k, lambda x: q @ x.transpose(-2, -1)),
                 "attn": (a, lambda x: x @ v), "v": (v, lambda x: a @ x)}
        for r, (val, fn) in pairs.items():
            out[r] = best_act_scale(val, bits, float(val.abs().max()), fn, fn(val),
                                    shifted=r == "attn" and bits <= SHIFT_MAX_BITS)
    else:  # ViT tokens: rows of q/k/v are tokens, rows of attn are queries (dim 2); per image
        m = (lvl == level)  # [n, N]
        if not m.any():
            m = torch.ones_like(m)
        # per image, this branch's rows of each operand and the matmul it feeds (other operand float)
        ops = {"q": [], "k": [], "attn": [], "v": []}
        for i in range(m.shape[0]):
            idx = m[i].nonzero().flatten()
            if idx.numel() == 0:
                continue
            qi, ki, ai, vi = q[i], k[i], a[i], v[i]
            ops["q"].append((qi[:, idx], lambda x, kk=ki: x @ kk.transpose(-2, -1)))
            ops["k"].append((ki[:, idx], lambda x, qq=qi: qq @ x.transpose(-2, -1)))
            ops["attn"].append((ai[:, idx], lambda x, vv=vi: x @ vv))
            ops["v"].append((vi[:, idx], lambda x, aa=ai[:, :, idx]: aa @ x))
        from ..quant.search import act_candidates

        for r, lst in ops.items():
            allv = torch.cat([val.reshape(-1) for val, _ in lst])
            amax = float(allv.abs().max())
            refs_ = [fn(val) for val, fn in lst]
            best = None
            for name, s, sh in act_candidates(allv, bits, amax, shifted=r == "attn" and bits <= SHIFT_MAX_BITS):
                e = sum(float((fn(fake_quant(val, s, bits, sh)) - ref).double().pow(2).sum())
                        for (val, fn), ref in zip(lst, refs_))
                if best is None or e < best[0]:
                    best = (e, s, sh)
            out[r] = SimpleNamespace(scale=best[1], shift=best[2])
    s = copy.copy(base)
    for r in ("q", "k", "attn", "v"):
        if getattr(base, r) is not None:
            setattr(s, r, QuantSpec(bits, [float(out[r].scale)], method="search", shift=out[r].shift))
    return s


def dynamic_branch(base: LayerSpec, bits: int, group: int = 0, softmax: str = "uniform") -> LayerSpec:
    """The low branch's layer: :func:`vitq.recipe.spec.dynamic_layer` (unsupported bits or grids are refused as
    :class:`UnsupportedError`)."""
    try:
        return dynamic_layer(base, bits, group, softmax)
    except InputError as e:
        raise UnsupportedError(str(e)) from None


def build_mixa_spec(prepared: nn.Module, qsim: QuantSim, recipe: Recipe, calib_x, *, group=None,
                    high_bits: int | None = None, low_bits: int = 4, routed=("linear",),
                    ratios: float | dict = 0.5, calib_ratios: float | dict | None = None,
                    low_quant: str = "static", low_group: int = 0, low_softmax: str = "uniform",
                    progress=None) -> MixaSpec:
    """The full ``mixa`` section: skeleton at ``ratios``, branch quantizers calibrated at ``calib_ratios``
    (default: ``ratios``; where that is 0 for a block, 0.5, so every block's low branch sees tokens), or, for the
    low branch with ``low_quant="dynamic"``, dynamic per token (a Linear's input per ``low_group`` features when
    ``low_group`` > 0; the post-softmax operand on the log-sqrt(2) grid per query row with ``low_softmax="log"``)."""
    if low_quant not in LOW_QUANT:
        raise UnsupportedError(f"low_quant {low_quant!r} is not one of {', '.join(LOW_QUANT)}")
    dyn_low = low_quant == "dynamic" and low_bits != FLOAT_BITS
    if low_group and not dyn_low:
        raise UnsupportedError("a low-branch group size needs the dynamic low branch (low_quant='dynamic')")
    if low_softmax != "uniform" and not dyn_low:
        raise UnsupportedError("a low-branch softmax grid needs the dynamic low branch (low_quant='dynamic')")
    if dyn_low and low_bits not in (4, 8):
        raise UnsupportedError(f"a dynamic low branch is 4 or 8 bits, not {low_bits}")
    family = qsim.family
    x = calib_x if torch.is_tensor(calib_x) else torch.from_numpy(np.ascontiguousarray(calib_x, np.float32))
    spec, geoms = skeleton(prepared, family, recipe, group=group, high_bits=high_bits, low_bits=low_bits,
                           routed=routed, ratios=ratios)
    cr = ratios if calib_ratios is None else calib_ratios
    cr = {b.block: (cr.get(b.block, 0.0) if isinstance(cr, dict) else cr) for b in spec.blocks}
    cr = {k: (v if v > 0 else 0.5) for k, v in cr.items()}
    cr = {b.block: min(max(cr[b.block], 1.0 / b.groups), 0.8) for b in spec.blocks}  # >= 1 low group if G >= 2
    cspec = spec.with_ratios(cr)
    need = []
    for l in spec.layers:
        ab = _act_bits(l.high)
        calibrated = (spec.high_bits,) if dyn_low else (spec.high_bits, spec.low_bits)
        if any(b not in (ab, FLOAT_BITS) for b in calibrated):
            need.append(l.module)
    samples = collect_branch_samples(prepared, family, cspec, geoms, x) if need else {}
    layers = []
    for l in spec.layers:
        base = recipe.layer(l.module)
        ab = _act_bits(base)
        br = {}
        for level, bits in ((0, spec.high_bits), (1, spec.low_bits)):
            if bits == FLOAT_BITS:
                br[level] = None
            elif level == 1 and dyn_low:  # asked for explicitly: dynamic even at the base's bits
                if low_group and base.kind == "linear":
                    k = int(qsim.wrappers[l.module].float_weight.shape[1])
                    if k % low_group:
                        raise UnsupportedError(f"low-branch group size {low_group}: {l.module} has {k} input "
                                               f"features, not a multiple of it")
                br[level] = dynamic_branch(base, bits, low_group, low_softmax)
            elif bits == ab:
                br[level] = base
            elif base.kind == "attn":
                br[level] = _calib_attn(base, samples[l.module], level, bits)
            else:
                w = qsim.wrappers[l.module].float_weight
                br[level] = _calib_linear(base, w, samples[l.module], level, bits)
        layers.append(MixaLayer(l.module, br[0], br[1]))
        if progress:
            progress(f"mixa: {l.module} calibrated")
    spec.layers = layers
    spec.info = {"calib_ratios": {k: round(v, 4) for k, v in cr.items()}, "calib_images": int(len(x)),
                 "low_quant": low_quant, **({"low_group": int(low_group)} if low_group else {}),
                 **({"low_softmax": low_softmax} if low_softmax != "uniform" else {})}
    return spec


def attach(recipe: Recipe, spec: MixaSpec) -> Recipe:
    """A copy of ``recipe`` carrying ``spec`` as its ``mixa`` section: the spec as the recipe file would give it back
    (written and parsed once, so that it is validated as on load)."""
    r = copy.copy(recipe)
    r.mixa = MixaSpec.from_dict(spec.to_dict(), "mixa", layers=recipe.layers)
    return r
