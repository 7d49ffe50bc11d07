"""MPTQ-ViT calibration: the entry point ``vitq compile`` calls.

``calibrate(model, family, calib_x, request, ...)``:

1. ``prepare_model`` (deep copy, explicit attention path) and enumerate the quantization points;
2. one float forward over the calibration images collecting per-point statistics (:mod:`.calibrate`);
3. SQ-b (:mod:`.sqb`): per LayerNorm -> Linear group, alpha searched on the quantized output error and folded
   into the copy (float-exact);
4. per layer: weight scales (per-channel MSE clipping) and the input scale chosen best-of {min/max, percentiles,
   tensor-MSE, clip grid} by the layer's output error; OPT-m (:mod:`.optm`) for post-GELU fc2 inputs;
   attention operands scored on the matmul outputs;
5. uniform presets: every layer at (w, a) bits; ``mp:<bits>``: Greedy MP (:mod:`.mp`) over {8, 6, 4};
6. scale refinement (:mod:`.refine`): the sub-8-bit attention operands named by ``methods["refine"]``
   (default the post-softmax ``attn``) re-pick their scale among multiples of the searched one by the KL of the
   final logits on ``refine_images`` calibration images; the refined scales are kept only if they also lower the
   KL on the next ``refine_holdout`` calibration images (a validation split of the calibration set; default
   ``None``: all the remaining ones, 224 of the default 256. With 64 the decision was too noisy: on DeiT-Tiny w6a6
   it kept a refinement whose held-out KL fell 0.0595 -> 0.052 on those 64 images while dev650's KL rose
   0.0461 -> 0.0505);
7. GPTQ (:mod:`.gptq`) on every sub-8-bit weight (``gptq_max_bits``), sequentially on the quantized model with
   ``gptq_images`` calibration images; the new weights (exactly ``q * scale``) replace the prepared model's and go
   to ``Recipe.weight_tensors`` (saved as the recipe's ``.weights.safetensors`` sidecar);
8. opt-in (``methods["recon"]``: ``True`` or a dict of :data:`.reconstruct.DEFAULTS` overrides; ``vitq compile
   --reconstruct``): block-wise reconstruction (:mod:`.reconstruct`) re-rounds the sub-8-bit weights (instead of
   GPTQ) and re-fits the sub-8-bit activation scales per block; its grid weights go to the same sidecar.

With ``act4="dynamic"`` the 4-bit activation candidates are made dynamic between steps 4 and 5, so Greedy MP,
refinement, GPTQ and reconstruction all see the deployed form.

Defaults (documented contract): the classifier head is quantized at 8/8 in every preset (it is <0.1% of the
MACs and the most sensitive layer); the patch-embed conv is quantized at the preset's bits; residual adds,
LayerNorm, softmax, GELU stay float (only matmul inputs are quantized, as the schema states).

``methods`` (ablations): ``{"observer": "search"|"minmax", "sqb": bool, "optm": bool, "mp": bool,
"head_bits": (8, 8), "mp_batch": 16, "sqb_bits": None, "gptq": bool, "gptq_images": 128,
"gptq_target": "quant"|"float", "gptq_rescale": bool, "gptq_max_bits": 7, "refine": roles, "refine_images": 32,
"shift_max_bits": 8, "vsmooth": False, "optm_max_bits": 7, "act4": "static", "act4_group": 32,
"act4_softmax": "log", "weight_group": 0, "weight_group_max_bits": 4, "weight_search": "hessian"}``
(``weight_search="hessian"``: a sub-8-bit weight's clip per channel or group minimizes its rounding error with each
input feature weighted by the mean square of that input over the calibration tokens (the input Hessian's
diagonal, which GPTQ then rounds against), so the features that carry the signal are represented best;
``"mse"``: the plain per-weight error; ``weight_group``: Linear weights at up to
``weight_group_max_bits`` get one scale per this many inputs, searched per group, GPTQ-rounded against them;
``vitq compile`` sets the target's ``default_weight_group``, 32 on ``--target ort``: on DeiT-Tiny, 1394 images,
w4a8 agreement 91.68 -> 92.97%, w4a4 top-1 75.25 -> 76.40, mp:5 78.34 -> 79.27; ``act4="dynamic"``: every 4-bit activation candidate gets run-time scales,
:func:`_dynamic_act4`; ``vitq compile`` sets it, with the target's grouping, unless ``--act4 static``: on DeiT-Tiny
w4a4, 1394 images, top-1 75.47 / agreement 86.66% / KL 0.150 with groups of 32, 72.67 / 81.35% / 0.335 per token,
65.57 / 71.95% / 0.586 static. ``optm_max_bits``: OPT-m is searched only for
activations at up to this many bits. Its split runs fc2 as two GEMMs, one per region (a third more Linear MACs
per block on ORT CPU / TensorRT); at 8 bits the shifted single grid is as good: measured on DeiT-Tiny w8a8
without OPT-m 81.85 top-1 / agreement 98.77% / KL 0.0056 vs 82.00 / 98.62% / 0.0045 with it, while the split
fc2 costs ~15% of the w7a8 ORT CPU latency at batch 8. ``shift_max_bits``: activations at up to this many bits may take a shifted
grid, schema ``shift``; 0 disables. Measured on DeiT-Tiny w8a8: KL 0.0099 -> 0.0045, agreement 98.00 -> 98.62%.
``vsmooth``: SmoothQuant between v and proj (:func:`.sqb.search_v_smoothing`); off by default: measured on
DeiT-Tiny it moved the logit KL by -9% (w6a6), -3% (w4a8), +1.4% (w4a4), +9% (w8a8), i.e. no consistent gain)
(``gptq_target="float"`` fits the float layer output first; measured worse on DeiT-T, experimental); with
``mp=False`` an ``mp:<b>`` request becomes the uniform recipe with w = 4 and the smallest a in {8, 6, 4} whose average bit-width is <= b (the naive
baseline Greedy MP is compared against).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..recipe import RecipeRequest
from ..recipe.schema import LayerSpec, QuantSpec, Recipe, RecipeError, RegionSpec, SmoothSpec
from ..recipe.spec import SOFTMAX_GRIDS, dynamic_layer
from . import observers as ob
from .calibrate import collect_stats
from .functional import weight_scale_map
from .gptq import sequential_gptq
from .reconstruct import reconstruct
from .refine import refine_scales
from .mp import greedy_mp
from .optm import search_regions
from .prepare import Graph, enumerate_points, is_attention, prepare_model
from .search import (SHIFT_MAX_BITS, LinearChoice, hessian_diag, search_attn, search_conv, search_linear,
                     subsample)
from .simulate import QuantSim
from .sqb import fold_smoothing, fold_v_smoothing, group_foldable, search_alpha, search_v_smoothing, shared_params

@dataclass(frozen=True)
class QuantMethods:
    """The calibration's method switches (ablations and experiments); the defaults are the documented contract
    (module docstring). A dict of the same keys converts with :meth:`of`; an unknown key is an error."""

    observer: str = "search"  # "search" | "minmax" (plain min/max observers, no search, no refinement, no GPTQ)
    sqb: bool = True
    optm: bool = True
    mp: bool = True
    head_bits: tuple[int, int] = (8, 8)
    mp_batch: int = 16
    sqb_bits: tuple[int, int] | None = None  # (w, a) bits SQ-b's alpha is searched at; None: the request's
    gptq: bool = True
    gptq_images: int = 128
    gptq_target: str = "quant"  # "quant" | "float"
    gptq_rescale: bool = False
    refine: tuple[str, ...] = ("attn",)
    refine_images: int = 32
    refine_holdout: int | None = None
    embed_bits: tuple[int, int] | None = None
    gptq_max_bits: int = 7
    shift_max_bits: int = SHIFT_MAX_BITS
    vsmooth: bool = False
    optm_max_bits: int = 7
    recon: dict | bool | None = None
    act4: str = "static"  # "static" | "dynamic": 4-bit activations with run-time scales (see _dynamic_act4)
    act4_group: int = 32  # dynamic 4-bit Linear inputs: one grid per this many features (0: per token)
    act4_softmax: str = "log"  # dynamic 4-bit post-softmax operand: "log" (log-sqrt(2) per query row) | "uniform"
    weight_group: int = 0  # Linear weights at <= weight_group_max_bits: one scale per this many inputs (0: per channel)
    weight_group_max_bits: int = 4
    weight_search: str = "hessian"  # "hessian" | "mse": sub-8-bit weight scales by input-Hessian-weighted error or not

    def __post_init__(self):
        if self.observer not in ("search", "minmax"):
            raise InputError(f"calibration method observer={self.observer!r}: expected 'search' or 'minmax'")
        if self.weight_search not in ("mse", "hessian"):
            raise InputError(f"calibration method weight_search={self.weight_search!r}: expected 'mse' or 'hessian'")
        if self.act4 not in ("static", "dynamic"):
            raise InputError(f"calibration method act4={self.act4!r}: expected 'static' or 'dynamic'")
        if self.act4_softmax not in SOFTMAX_GRIDS:
            raise InputError(f"calibration method act4_softmax={self.act4_softmax!r}: expected one of "
                             f"{', '.join(SOFTMAX_GRIDS)}")
        if self.gptq_target not in ("quant", "float"):
            raise InputError(f"calibration method gptq_target={self.gptq_target!r}: expected 'quant' or 'float'")
        if self.weight_group < 0 or self.weight_group == 1:
            raise InputError(f"calibration method weight_group={self.weight_group!r}: expected 0 (per channel) or "
                             f"a group size >= 2")

    @classmethod
    def of(cls, methods: "QuantMethods | Mapping[str, Any] | None") -> "QuantMethods":
        """``methods`` itself, the defaults (None), or the defaults overridden by a dict's keys."""
        if methods is None:
            return cls()
        if isinstance(methods, QuantMethods):
            return methods
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise InputError(f"unknown calibration method key(s) {', '.join(map(repr, unknown))} (expected: "
                             f"{', '.join(sorted(known))})")
        return cls(**methods)


@dataclass
class CalibrationResult:
    model: nn.Module  # prepared, SQ-b-folded float model (what gets exported)
    recipe: Recipe
    sim: QuantSim
    layer_stats: dict = field(default_factory=dict)  # module -> {sqnr_db, w_bits, a_bits, method, ...}
    timings: dict = field(default_factory=dict)


@dataclass
class Calibration:
    """The state one calibration's steps share, in the order :func:`calibrate` runs them: :func:`start_calibration`
    (prepared copy, quantization points), :func:`collect_statistics`, then :func:`finish_calibration`'s steps
    (bit plan, SQ-b, v-smoothing, per-layer scales, the recipe, Greedy MP, scale refinement, GPTQ, block
    reconstruction, per-layer statistics)."""

    prepared: nn.Module
    family: str
    x: torch.Tensor
    graph: Graph
    meth: QuantMethods
    progress: bool | None
    t0: float
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict | None = None
    layer_stats: dict[str, dict] = field(default_factory=dict)
    smooth: dict[str, SmoothSpec] = field(default_factory=dict)
    # bit plan
    bits_w: list[int] = field(default_factory=list)
    bits_a: list[int] = field(default_factory=list)
    search_bits: tuple[int, int] = (8, 8)
    lib: dict[str, dict] = field(default_factory=dict)
    recipe: Recipe | None = None
    sim: QuantSim | None = None

    @property
    def minmax(self) -> bool:
        return self.meth.observer == "minmax"

    def fixed_bits(self, p) -> tuple[int, int] | None:
        """Bits a layer keeps whatever the preset (the head; the patch embedding with ``embed_bits``)."""
        if p.is_head:
            return tuple(self.meth.head_bits)
        if self.meth.embed_bits and p.kind == "conv":
            return tuple(self.meth.embed_bits)
        return None

    def weight_group(self, p, w: torch.Tensor, bits: int) -> int:
        """The weight group size of layer ``p`` at ``bits`` (0: per output channel): Linear weights at up to
        ``weight_group_max_bits`` whose input width the group divides."""
        g = int(self.meth.weight_group)
        ok = g and p.kind == "linear" and bits <= self.meth.weight_group_max_bits and w[0].numel() % g == 0
        return g if ok and w[0].numel() > g else 0

    def log(self, msg: str) -> None:
        _log(self.progress, msg)


def _log(progress, msg):
    if progress:
        import sys

        print(f"[vitq.quant] {msg}", file=sys.stderr, flush=True)


def _db(ref: float, err: float) -> float:
    return 10 * math.log10(max(ref, 1e-30) / err) if err > 0 else float("inf")


def calibrate(model: nn.Module, family: str, calib_x: np.ndarray, request: RecipeRequest, *, model_name: str,
              provenance: dict, progress: bool | None = None,
              methods: QuantMethods | Mapping[str, Any] | None = None) -> CalibrationResult:
    """MPTQ-ViT calibration of ``request`` (a uniform or ``mp:`` preset) on ``calib_x`` (module docstring)."""
    c = start_calibration(model, family, calib_x, methods=methods, progress=progress)
    collect_statistics(c)
    return finish_calibration(c, request, model_name=model_name, provenance=provenance)


def start_calibration(model: nn.Module, family: str, calib_x: np.ndarray, *,
                      methods: QuantMethods | Mapping[str, Any] | None = None,
                      progress: bool | None = None) -> Calibration:
    """Prepare a copy of ``model`` (explicit attention path) and enumerate its quantization points."""
    meth = QuantMethods.of(methods)
    t0 = time.time()
    torch.manual_seed(0)
    prepared = prepare_model(model)
    x = torch.from_numpy(np.ascontiguousarray(calib_x, dtype=np.float32))
    graph = enumerate_points(prepared, image_size=tuple(x.shape[-2:]))
    c = Calibration(prepared, family, x, graph, meth, progress, t0)
    c.timings["prepare_s"] = time.time() - t0
    return c


def collect_statistics(c: Calibration) -> None:
    """One float forward over the calibration images: per-point statistics (before SQ-b)."""
    t = time.time()
    c.stats = collect_stats(c.prepared, c.graph, c.x, progress=c.progress)
    c.timings["collect_s"] = time.time() - t
    c.log(f"statistics over {len(c.x)} images in {c.timings['collect_s']:.1f}s")


def finish_calibration(c: Calibration, request: RecipeRequest, *, model_name: str,
                       provenance: dict) -> CalibrationResult:
    """The steps after the statistics, in order; returns the calibrated recipe and its simulation."""
    _plan_bits(c, request)
    _sq_b(c)
    _v_smoothing(c)
    _layer_scales(c)
    _dynamic_act4(c)
    _initial_recipe(c, request, model_name, provenance)
    _greedy_mp(c, request)
    _refine(c)
    recon = c.meth.recon
    if recon is True:
        recon = {}
    float_ref = copy.deepcopy(c.prepared) if recon is not None else None
    # block reconstruction rounds the weights itself (SignRound from round-to-nearest; measured better than
    # starting it from GPTQ's rounding, see reconstruct.py), so GPTQ is skipped when it fits the weights
    gptq_on = c.meth.gptq and not c.minmax and not (recon is not None and recon.get("weights", True))
    if gptq_on:
        _gptq(c)
    if recon is not None:
        _reconstruct(c, float_ref, recon, gptq_on)
        del float_ref
    _final_layer_stats(c)
    if any(c.layer_stats.get(l.module, {}).get("act4") for l in c.recipe.layers):  # what was applied, recorded
        c.recipe.defaults["act4"] = {"quant": "dynamic", "group": int(c.meth.act4_group),
                                     "softmax": c.meth.act4_softmax}
    c.timings["total_s"] = time.time() - c.t0
    return CalibrationResult(c.prepared, c.recipe, c.sim, c.layer_stats, c.timings)


def _plan_bits(c: Calibration, request: RecipeRequest) -> None:
    """The candidate bit-widths: one (w, a) pair for a uniform preset (and for ``mp:`` with ``mp=False``, the naive
    baseline), {8, 6, 4} for Greedy MP; and the bits SQ-b searches at."""
    meth = c.meth
    if request.kind == "uniform" or (request.kind == "mp" and not meth.mp):
        if request.kind == "mp":
            wb, ab = 4, next((a for a in (8, 6, 4) if math.sqrt(4 * a) <= request.mp_target_bits + 1e-9), 4)
        else:
            wb, ab = request.weight_bits, request.act_bits
        c.bits_w, c.bits_a = [wb], [ab]
        c.search_bits = (wb, ab)
    elif request.kind == "mp":
        c.bits_w, c.bits_a = [8, 6, 4], [8, 6, 4]
        c.search_bits = (6, 6)
    else:
        raise RecipeError(f"recipe request {request.name!r} ({request.kind}) is not calibrated")
    if meth.sqb_bits:
        c.search_bits = tuple(meth.sqb_bits)


def _sq_b(c: Calibration) -> None:
    """SQ-b: per LayerNorm -> Linear group, alpha searched on the quantized output error and folded into the copy."""
    t = time.time()
    prepared, stats, layer_stats = c.prepared, c.stats, c.layer_stats
    if c.meth.sqb:
        shared = shared_params(prepared)
        for ln_name, lins in c.graph.norm_groups.items():
            lins = [l for l in lins if l in stats]
            if not lins:
                continue
            why = group_foldable(prepared, ln_name, lins, shared)
            if why:
                for l in lins:
                    layer_stats.setdefault(l, {})["sqb"] = f"skipped: {why}"
                continue
            st = stats[lins[0]]
            ws = [prepared.get_submodule(l).weight.detach() for l in lins]
            ch = search_alpha(st.sample, st.chmin, st.chmax, ws, *c.search_bits)
            for l in lins:
                layer_stats.setdefault(l, {})["sqb"] = (
                    f"alpha={ch.alpha}" if ch.alpha is not None else "off (no gain)") + \
                    f" err {ch.err:.4g} vs {ch.err_plain:.4g}"
            if ch.alpha is None:
                continue
            fold_smoothing(prepared.get_submodule(ln_name), [prepared.get_submodule(l) for l in lins], ch.s, ch.z)
            st.samples = [(st.sample - ch.z) / ch.s]
            st.chmin, st.chmax = (st.chmin - ch.z) / ch.s, (st.chmax - ch.z) / ch.s
            st.amax = float(torch.maximum(st.chmin.abs(), st.chmax.abs()).max())
            for l in lins:
                c.smooth[l] = SmoothSpec(ch.alpha, ch.s.tolist(), ch.z.tolist())
    c.timings["sqb_s"] = time.time() - t
    c.log(f"SQ-b: {len(c.smooth)} layers smoothed in {c.timings['sqb_s']:.1f}s")


def _v_smoothing(c: Calibration) -> None:
    """v -> proj smoothing (SmoothQuant on the attention output, folded into qkv's v rows and proj); opt-in."""
    if not c.meth.vsmooth or c.minmax:
        return
    t = time.time()
    prepared, stats = c.prepared, c.stats
    shared = shared_params(prepared)
    n_v = 0
    for p in c.graph.points:
        proj_name = p.module + ".proj"
        if p.kind != "attn" or proj_name not in stats or not hasattr(prepared.get_submodule(p.module), "qkv"):
            continue
        attn_mod = prepared.get_submodule(p.module)
        if any(id(q) in shared for m in (attn_mod.qkv, attn_mod.proj) for q in m.parameters()):
            c.layer_stats.setdefault(proj_name, {})["vsmooth"] = "skipped: shared parameters"
            continue
        ch = search_v_smoothing(stats[p.module], stats[proj_name], attn_mod.proj.weight.detach(), *c.search_bits)
        c.layer_stats.setdefault(proj_name, {})["vsmooth"] = ch.reason
        if ch.alpha is None:
            continue
        with torch.no_grad():
            fold_v_smoothing(attn_mod, ch.s)
        c.smooth[proj_name] = SmoothSpec(ch.alpha, ch.s.tolist(), [0.0] * ch.s.numel(), into="v")
        n_v += 1
    if n_v:  # re-collect: the v and proj-input statistics changed (float function unchanged)
        c.stats = collect_stats(prepared, c.graph, c.x, progress=c.progress)
    c.timings["vsmooth_s"] = time.time() - t
    c.log(f"v->proj smoothing: {n_v} attention layers in {c.timings['vsmooth_s']:.1f}s")


def _layer_scales(c: Calibration) -> None:
    """Per layer, for every bit-width the request needs: weight scales (per-channel MSE clipping) and the input
    scale chosen by the layer's output error; OPT-m for post-GELU fc2 inputs; attention operands on the matmul
    outputs."""
    t = time.time()
    meth, minmax, prepared = c.meth, c.minmax, c.prepared
    for p in c.graph.points:
        st = c.stats[p.module]
        entry: dict = {}
        ls = c.layer_stats.setdefault(p.module, {})
        if p.kind == "attn":
            for a in c.bits_a:
                if minmax:
                    ch = {r: ob.scale_from_clip(st.amax[r], a).reshape(1) for r in ("q", "k", "attn", "v")}
                    specs = {r: QuantSpec(a, [float(ch[r])], method="minmax") for r in ch}
                    sq = None
                else:
                    samples = {r: st.sample(r) for r in ("q", "k", "attn", "v")}
                    ch = search_attn(samples, st.amax, {r: a for r in ("q", "k", "attn", "v")},
                                     shifted=a <= meth.shift_max_bits)
                    specs = {r: QuantSpec(a, [float(cc.scale)], method=_meth(cc.method), shift=cc.shift)
                             for r, cc in ch.items()}
                    sq = 0.5 * (_db(ch["k"].ref, ch["k"].err) + _db(ch["v"].ref, ch["v"].err))
                entry[("a", a)] = LayerSpec(p.module, "attn", p.macs, **specs)
                ls.setdefault("sqnr_db", {})[f"a{a}"] = sq
            c.lib[p.module] = entry
            continue
        mod = prepared.get_submodule(p.module)
        w = mod.weight.detach()
        fb = c.fixed_bits(p)
        wl = [fb[0]] if fb else c.bits_w
        al = [fb[1]] if fb else c.bits_a
        # the patch embedding keeps the plain search: its pixels carry no feature imbalance to weigh
        hessian = meth.weight_search == "hessian" and p.kind == "linear" and not minmax and min(wl) < 8
        hd = hessian_diag(st.sample) if hessian else None
        for wb in wl:
            g = c.weight_group(p, w, wb)
            ws = ob.weight_minmax(w, wb, group=g) if minmax else \
                ob.weight_mse(w, wb, group=g, col_weight=hd if wb < 8 else None)
            entry[("w", wb)] = QuantSpec(wb, ws.tolist(), axis=0, method="minmax" if minmax else "mse", group=g)
        for a in al:
            wb = a if a in wl else wl[-1]
            wspec = entry[("w", wb)]
            spec = LayerSpec(p.module, p.kind, p.macs, weight=wspec, smooth=c.smooth.get(p.module))
            xs = st.sample if p.kind == "conv" else subsample(st.sample)
            if minmax:
                spec.input = QuantSpec(a, [float(ob.scale_from_clip(st.amax, a))], method="minmax")
                sq = None
            elif p.kind == "conv":
                cc = search_conv(xs, mod, wb, a, st.amax)
                spec.input = QuantSpec(a, [float(cc.a.scale)], method=_meth(cc.a.method))
                sq = _db(cc.a.ref, cc.a.err)
            elif p.post_gelu and meth.optm and a <= meth.optm_max_bits:
                rc = search_regions(xs, w, wb, a, st.amax, float(st.chmin.min()), shifted=a <= meth.shift_max_bits,
                                    group=wspec.group)
                ls.setdefault("optm", {})[f"a{a}"] = rc.reason
                ref = float((xs @ w.t()).double().pow(2).sum())
                if rc.use:
                    spec.input_regions = RegionSpec(
                        rc.m, QuantSpec(a, [float(rc.pos_scale)], method="search", shift=rc.pos_shift),
                        QuantSpec(a, [float(rc.neg_scale)], method="search", shift=rc.neg_shift))
                    sq = _db(ref, rc.err)
                else:
                    spec.input = QuantSpec(a, [float(rc.plain.a.scale)], method=_meth(rc.plain.a.method),
                                           shift=rc.plain.a.shift)
                    sq = _db(ref, rc.err_plain)
            else:
                cc = search_linear(xs, w, wb, a, st.amax, shifted=a <= meth.shift_max_bits, group=wspec.group)
                spec.input = QuantSpec(a, [float(cc.a.scale)], method=_meth(cc.a.method), shift=cc.a.shift)
                sq = _db(cc.a.ref, cc.a.err)
            entry[("a", a)] = spec
            ls.setdefault("sqnr_db", {})[f"w{wb}a{a}"] = sq
        c.lib[p.module] = entry
    c.timings["scales_s"] = time.time() - t
    c.log(f"scales for {len(c.graph.points)} layers in {c.timings['scales_s']:.1f}s")


def _dynamic_act4(c: Calibration) -> None:
    """``act4="dynamic"``: every 4-bit activation candidate (Linear inputs, attention operands; not the patch
    embedding's pixels, not fixed-bits layers) becomes dynamic (:func:`vitq.recipe.spec.dynamic_layer`): Linear
    inputs per ``act4_group`` features (per token where the input width is not a multiple), attention operands
    per token, the post-softmax operand on ``act4_softmax``'s grid. Greedy MP then weighs these candidates, and
    GPTQ / reconstruction fit the weights to them."""
    if c.meth.act4 != "dynamic" or 4 not in c.bits_a or c.minmax:
        return
    g, n = int(c.meth.act4_group), 0
    for p in c.graph.points:
        e = c.lib[p.module]
        if ("a", 4) not in e or c.fixed_bits(p) or p.kind == "conv":
            continue
        k = getattr(c.prepared.get_submodule(p.module), "in_features", 0)
        e[("a", 4)] = dynamic_layer(e[("a", 4)], 4, g if g and k % g == 0 else 0, c.meth.act4_softmax)
        c.layer_stats.setdefault(p.module, {})["act4"] = "dynamic"
        n += 1
    c.log(f"4-bit activations dynamic in {n} layers (group {g}, {c.meth.act4_softmax} softmax grid)")


def _initial_recipe(c: Calibration, request: RecipeRequest, model_name: str, provenance: dict) -> None:
    """Every layer at the first candidate bits (the preset's), and its simulation."""

    def spec_at(p, w, a):
        e = c.lib[p.module]
        if p.kind == "attn":
            return e[("a", a)]
        if c.fixed_bits(p):
            w, a = c.fixed_bits(p)
        s = copy.copy(e[("a", a)])
        s.weight = e[("w", w)]
        return s

    w0, a0 = (c.bits_w[0], c.bits_a[0])
    head_w, head_a = c.meth.head_bits
    layers = [spec_at(p, w0, a0) for p in c.graph.points]
    defaults = {"weight_bits": w0, "act_bits": a0, "head_bits": [head_w, head_a]}
    c.recipe = Recipe(request.name, model_name, layers, defaults, dict(provenance))
    c.sim = QuantSim(c.prepared, c.recipe, c.family)


def _greedy_mp(c: Calibration, request: RecipeRequest) -> None:
    """``mp:<bits>``: Greedy MP over {8, 6, 4} under the average bit-width target."""
    if not (request.kind == "mp" and c.meth.mp):
        return
    t = time.time()
    sim, recipe, graph = c.sim, c.recipe, c.graph
    head_w, head_a = c.meth.head_bits
    n = min(int(c.meth.mp_batch), len(c.x))
    modules = [p.module for p in graph.points if not c.fixed_bits(p)]
    state, info = greedy_mp(sim, c.lib, modules, c.x[:n], request.mp_target_bits, log=c.log)
    recipe.layers = [sim.wrappers[p.module].qfn.spec if p.kind == "attn" else sim.wrappers[p.module].spec
                     for p in graph.points]
    recipe.defaults = {"weight_bits": None, "act_bits": None, "head_bits": [head_w, head_a],
                       "mp_target_bits": request.mp_target_bits, "avg_bits": round(info["avg_bits"], 4),
                       "mp_candidates": [8, 6, 4], "mp_metric": "sqrt(total_bitops / total_macs)"}
    c.timings["mp_s"] = time.time() - t
    for m, (wb, ab) in state.items():
        c.layer_stats[m]["mp"] = {"w_bits": wb, "a_bits": ab}
    c.layer_stats["__mp__"] = {k: v for k, v in info.items() if k != "sensitivity"}
    c.layer_stats["__mp_sensitivity__"] = info["sensitivity"]


def _refine(c: Calibration) -> None:
    """Scale refinement of the sub-8-bit roles ``refine`` names, kept only if the held-out calibration KL drops."""
    recipe, sim, x, stats = c.recipe, c.sim, c.x, c.stats
    roles = tuple(c.meth.refine) if not c.minmax else ()
    targets = [(l.module, r) for l in recipe.layers for r in roles
               if (l.kind == "attn") == (r != "input") and not c.fixed_bits(c.graph.get(l.module))
               and getattr(l, r, None) is not None and getattr(l, r).bits < 8 and not getattr(l, r).dynamic]
    if not targets:
        return
    t = time.time()
    n = min(int(c.meth.refine_images), len(x))
    before = list(recipe.layers)
    hh = c.meth.refine_holdout
    hold = slice(n, len(x) if hh is None else min(len(x), n + int(hh)))
    kl0 = _holdout_kl(sim, x[hold], stats["__logits__"][hold])
    rr = refine_scales(sim, recipe, x[:n], stats["__logits__"][:n], targets, log=c.log)
    kl1 = _holdout_kl(sim, x[hold], stats["__logits__"][hold])
    kept = rr and (kl0 is None or kl1 < kl0)
    if rr and not kept:  # the refined scales fit the refinement batch but not held-out calibration images
        recipe.layers = before
        for l in before:
            sim.set_layer(l)
    if rr:
        c.log(f"scale refinement {'kept' if kept else 'reverted'}: held-out calibration KL "
              f"{kl0 if kl0 is None else round(kl0, 4)} -> {kl1 if kl1 is None else round(kl1, 4)}")
    c.layer_stats["__refine__"] = {"kept": bool(kept), "holdout_kl_before": kl0, "holdout_kl_after": kl1,
                                   "holdout_images": hold.stop - hold.start}
    for k, v in rr.items():
        m, r = k.rsplit(":", 1)
        c.layer_stats.setdefault(m, {}).setdefault("refine", {})[r] = {**v, "kept": bool(kept)}
    c.timings["refine_s"] = time.time() - t


def _gptq(c: Calibration) -> None:
    """GPTQ on every weight at up to ``gptq_max_bits``, sequentially on the quantized model; the new weights go to
    the prepared model and ``Recipe.weight_tensors``."""
    t = time.time()
    meth, recipe = c.meth, c.recipe
    n = min(int(meth.gptq_images), len(c.x))
    rescale = None
    if meth.gptq_rescale:
        def rescale(m, w):
            old = recipe.layer(m).weight
            return QuantSpec(old.bits, ob.weight_mse(w, old.bits, group=old.group).tolist(), axis=0, method="mse",
                             group=old.group)
    todo = [l.module for l in recipe.layers if l.weight is not None and l.weight.bits <= meth.gptq_max_bits]
    g = sequential_gptq(c.sim, c.prepared, c.x[:n], todo, target=meth.gptq_target, rescale=rescale, log=c.log)
    new = g.pop("__weights__")
    new_specs = g.pop("__specs__")
    recipe.layers = [new_specs.get(l.module, l) for l in recipe.layers]
    for m, v in g.items():
        c.layer_stats.setdefault(m, {})["gptq"] = {"err_rtn": v["err_rtn"], "err_gptq": v["err_gptq"],
                                                   "used": v["used"]}
    if new:
        recipe.weight_tensors = {m: w.detach().numpy().copy() for m, w in new.items()}
        c.sim = QuantSim(c.prepared, recipe, c.family)
    c.timings["gptq_s"] = time.time() - t


def _reconstruct(c: Calibration, float_ref: nn.Module, recon: dict, gptq_on: bool) -> None:
    """Block-wise reconstruction (opt-in): sub-8-bit weights re-rounded and activation scales re-fitted per block."""
    t = time.time()
    recipe, x = c.recipe, c.x
    n = len(x) if not recon.get("images") else min(int(recon["images"]), len(x))
    rr = reconstruct(c.sim, float_ref, recipe, x[:n], recon, log=c.log, progress=c.progress)
    new = rr.pop("weights")
    with torch.no_grad():
        for m, w in new.items():
            c.prepared.get_submodule(m).weight.copy_(w)
    if new:
        tensors = dict(recipe.weight_tensors or {})
        tensors.update({m: w.detach().numpy().copy() for m, w in new.items()})
        recipe.weight_tensors = tensors
        recipe.defaults["weight_rounding"] = "gptq+signround" if gptq_on else "signround"
    recipe.defaults["recon"] = {k: v for k, v in rr["options"].items()}
    c.layer_stats["__recon__"] = rr
    c.timings["recon_s"] = time.time() - t
    c.log(f"block reconstruction: {len(rr['stages'])} stages in {c.timings['recon_s']:.0f}s")


def _final_layer_stats(c: Calibration) -> None:
    for l in c.recipe.layers:
        ls = c.layer_stats.setdefault(l.module, {})
        ls["w_bits"], ls["a_bits"] = l.weight_bits, l.act_bits
        key = f"a{l.act_bits}" if l.kind == "attn" else f"w{l.weight_bits}a{l.act_bits}"
        sq = ls.get("sqnr_db", {})
        ls["sqnr"] = sq.get(key) if isinstance(sq, dict) else sq


@torch.no_grad()
def _holdout_kl(sim, x: torch.Tensor, ref_logits: torch.Tensor) -> float | None:
    """Mean KL(float || quantized) of the logits on held-out calibration images (None when there are none)."""
    from ..evaluate import kl_mean as kl

    if len(x) == 0:
        return None
    return float(kl(ref_logits, sim.predict(x, batch_size=32)))


def _meth(m: str) -> str:
    return m if m in ("minmax", "percentile", "mse", "search") else "search"


def apply_recipe(model: nn.Module, family: str, recipe: Recipe) -> tuple[nn.Module, QuantSim]:
    """Re-apply a stored recipe to a fresh (unprepared) model: prepare, fold the recorded SQ-b smoothing (once
    per LayerNorm), and build the simulation with the recipe's scales."""
    prepared = prepare_model(model)
    mods = dict(prepared.named_modules())
    for l in recipe.layers:
        if l.module not in mods:
            raise RecipeError(f"recipe layer {l.module!r} does not exist in model {type(model).__name__}")
        kind = "attn" if is_attention(mods[l.module]) else \
            ("conv" if isinstance(mods[l.module], nn.Conv2d) else "linear")
        if kind != l.kind:
            raise RecipeError(f"recipe layer {l.module!r}: kind {l.kind!r} but the model has a {kind}")
    graph = enumerate_points(prepared)
    for ln_name, lins in graph.norm_groups.items():
        specs = [recipe.layer(l) for l in lins]
        sm = [s.smooth for s in specs if s is not None and s.smooth is not None]
        if not sm:
            continue
        if len(sm) != len(lins):
            raise RecipeError(f"recipe: LayerNorm {ln_name} feeds {lins} but only some carry 'smooth'")
        s0 = sm[0]
        s = torch.tensor(s0.scale, dtype=torch.float32)
        z = torch.tensor(s0.shift, dtype=torch.float32)
        fold_smoothing(prepared.get_submodule(ln_name), [prepared.get_submodule(l) for l in lins], s, z)
    for l in recipe.layers:  # v -> proj smoothing, folded into the parent attention's qkv (v rows) and proj
        if l.smooth is not None and l.smooth.into == "v":
            parent = l.module.rpartition(".")[0]
            att = mods.get(parent)
            if att is None or not hasattr(att, "qkv") or mods.get(parent + ".proj") is not mods[l.module]:
                raise RecipeError(f"recipe layer {l.module!r}: smooth.into 'v' needs it to be an attention's proj")
            with torch.no_grad():
                fold_v_smoothing(att, torch.tensor(l.smooth.scale, dtype=torch.float32))
    _load_gptq_weights(prepared, recipe)
    return prepared, QuantSim(prepared, recipe, family)


@torch.no_grad()
def _load_gptq_weights(prepared: nn.Module, recipe: Recipe) -> None:
    """Overwrite the weights of the recipe's GPTQ layers (after SQ-b folding) with the sidecar tensors, checking
    shape and that every element lies on the layer's weight grid (``w / scale`` integral)."""
    if recipe.weights is None and not recipe.weight_tensors:
        return
    if not recipe.weight_tensors:
        raise RecipeError(f"recipe {recipe.name!r} lists GPTQ weights ({(recipe.weights or {}).get('file')}) but "
                          f"none are loaded: load it with Recipe.load(path) so the sidecar next to it is read")
    for m, arr in recipe.weight_tensors.items():
        spec = recipe.layer(m)
        if spec is None or spec.weight is None:
            raise RecipeError(f"recipe weights sidecar: {m!r} is not a weight-quantized layer of the recipe")
        mod = prepared.get_submodule(m)
        w = torch.as_tensor(np.asarray(arr, dtype=np.float32))
        if tuple(w.shape) != tuple(mod.weight.shape):
            raise RecipeError(f"recipe weights sidecar: {m!r} has shape {tuple(w.shape)}, the model's weight is "
                              f"{tuple(mod.weight.shape)}")
        s = weight_scale_map(torch.tensor(spec.weight.scale, dtype=torch.float32), w)
        r = w / s
        off = float((r - torch.round(r)).abs().max()) if w.numel() else 0.0
        if off > 1e-3 or float(torch.round(r).abs().max()) > (1 << (spec.weight.bits - 1)):
            raise RecipeError(f"recipe weights sidecar: {m!r} is not on its {spec.weight.bits}-bit weight grid "
                              f"(max |w/scale - round| = {off:.3g}); sidecar and recipe do not belong together")
        mod.weight.copy_(w)
