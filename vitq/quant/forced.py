"""Teacher-forced comparison of a deployed Q/DQ graph with its torch simulation, quantizer by quantizer.

Comparing logits alone cannot tell a wrong graph from a rounding flip: the graph sums in other orders than torch, a
quantizer input within an ulp of a rounding boundary then rounds the other way, and in some models one flip moves
the logits far (docs/models.md). :func:`forced_check` removes the flips instead of bounding them. ONNX Runtime runs
the graph (optimizations off: the graph itself) and returns every activation quantizer's input; the simulation
runs the same images with each quantizer fed the *graph's* input at that point, so both sides quantize identical
values, and continues from the graph's quantized output. Then

* per quantizer, the simulation's own input (computed from the forced upstream) against the graph's: the float
  segment between two quantizers, which must agree to float precision (``local_rel``);
* per quantizer, the simulation's quantizer on the graph's input against the graph's quantizer: equal, except one
  grid step where the input lies on a rounding boundary to float precision (the ORT target's folded zero points
  round ``x / s - h`` where the simulation rounds ``(x - c) / s``: ``vitq.passes.fold_shift``); any other
  difference is a wrong scale, bit-width or grid (``q_wrong``);
* the simulation's logits, every quantizer forced, against the graph's (``logits_rel``);
* per static quantizer, how many elements the simulation's own input and the graph's put on different grid points
  (``flips``): where an unforced comparison starts to diverge, and why.

A wrong scale, op or layout shows as a quantizer mismatch or as a large ``local_rel`` at the next quantizer or in the
logits; float summation order shows only at float precision. Quantizers are matched by the node
metadata the graph passes write (``vitq.module``, ``vitq.role``; a ``QuantLinearA4`` plugin node's expansion carries
them too); simulation quantizers without a graph site (MixA-Q branches) run unforced and are listed in
``unmatched``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..format import NODE_BRANCH, NODE_MODULE, NODE_ROLE
from .functional import fake_quant, shift_offset
from .prepare import AttnHook
from .simulate import QuantLayer, SimModule

#: roles of activation quantizers in the graph, and the simulation role each one's input belongs to
_ACT_ROLES = {"input": "input", "input.regions": "input", "input.pos": "input", "input.neg": "input", "q": "q",
              "k": "k", "attn": "attn", "v": "v"}
#: float kernels that sum in other orders, per segment between two quantizers (a GEMM, a normalization, a softmax)
FORCED_REL = 1e-4
#: a quantizer input this close to a rounding boundary (in grid steps) may round either way in float32
BOUNDARY_STEPS = 1e-3


@dataclass
class SiteCheck:
    site: str                 # "module.role"
    local_rel: float          # max |sim input - graph input| / max |graph input|, upstream forced
    flips: int | None         # elements rounded to different grid points by the two inputs (static quantizers)
    elements: int
    q_boundary: int = 0       # graph and simulation quantizers differ by one step on a rounding boundary
    q_wrong: int = 0          # ... differ otherwise (static: more than one step or off the boundary; dynamic: any)


@dataclass
class ForcedCheck:
    sites: list[SiteCheck]
    logits_rel: np.ndarray    # per image: max |forced sim - graph| / max |graph|
    unmatched: list[str] = field(default_factory=list)
    tolerance: float = FORCED_REL

    @property
    def consistent(self) -> bool:
        """Every quantizer matched and equal up to rounding-boundary ties, every float segment and the logits equal
        to float precision, with the graph's quantized values forced. (An unmatched quantizer runs unforced: its
        flips cascade, so the check is partial and says nothing.)"""
        return (not self.unmatched and all(s.local_rel <= self.tolerance and not s.q_wrong for s in self.sites)
                and bool((self.logits_rel <= self.tolerance).all()))

    def worst(self) -> SiteCheck | None:
        return max(self.sites, key=lambda s: s.local_rel, default=None)

    def first_flip(self) -> SiteCheck | None:
        return next((s for s in self.sites if s.flips), None)

    def describe(self) -> str:
        """One line for a user: where the graph departs from the recipe, or that it does not."""
        wrong = [s for s in self.sites if s.q_wrong]
        if self.unmatched:
            return (f"{len(self.unmatched)} of the simulation's quantizers have no site in the graph (e.g. "
                    f"{self.unmatched[0]}: e.g. a MixA-Q branch), so the quantizer-by-quantizer "
                    f"check is partial")
        if wrong:
            w = wrong[0]
            return (f"the graph's quantizer {w.site} differs from the recipe's on {w.q_wrong} of {w.elements} "
                    f"elements fed the same input (a wrong scale, bit-width or grid)")
        w = self.worst()
        if w is not None and w.local_rel > self.tolerance:
            return (f"the float computation before quantizer {w.site} differs from the simulation's by {w.local_rel:.1e} "
                    f"(relative) with identical quantized inputs (an op or constant that differs)")
        if self.logits_rel.size and self.logits_rel.max() > self.tolerance:
            return (f"the computation after the last quantizer differs from the simulation's by "
                    f"{self.logits_rel.max():.1e} (relative logits) with identical quantized inputs")
        f = self.first_flip()
        return (f"quantizer by quantizer the graph computes the recipe ({len(self.sites)} quantizers, float segments "
                f"within {self.tolerance:.0e}); " + (f"unforced, rounding flips start at {f.site}" if f else
                                                    "no rounding flips"))

    def summary(self) -> dict:
        w, f = self.worst(), self.first_flip()
        wrong = [s.site for s in self.sites if s.q_wrong]
        return {"consistent": self.consistent, "tolerance": self.tolerance, "sites": len(self.sites),
                "max_local_rel": w.local_rel if w else 0.0, "worst_site": w.site if w else None,
                "max_logits_rel": float(self.logits_rel.max()) if self.logits_rel.size else 0.0,
                "quantizer_ties": sum(s.q_boundary for s in self.sites), "quantizers_wrong": wrong,
                "flips": sum(s.flips or 0 for s in self.sites),
                "first_flip": f"{f.site} ({f.flips} of {f.elements})" if f else None,
                "unmatched": self.unmatched}


def graph_sites(proto: onnx.ModelProto) -> dict[str, tuple[str, str | None]]:
    """``{"module.role": (value the quantizer reads, value it hands on or None)}`` for every activation quantizer
    of the graph. Its nodes (Sub, QuantizeLinear, Clip, DequantizeLinear, or a dynamic quantizer's chain; OPT-m's
    split, two quantizers and their sum, as one site) carry its metadata; the input is what the first of them reads
    (not an initializer or a constant), the output what the last of them makes (None for OPT-m, whose two quantized
    halves feed two GEMMs). MixA-Q branches are left out (two quantizers read one value under one name)."""
    inits = {i.name for i in proto.graph.initializer}
    consts = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        meta = {p.key: p.value for p in n.metadata_props}
        role = _ACT_ROLES.get(meta.get(NODE_ROLE, ""))
        if role is None or NODE_MODULE not in meta or NODE_BRANCH in meta:
            continue
        groups.setdefault(f"{meta[NODE_MODULE]}.{role}", []).append(n)
    readers: dict[str, set[int]] = {}
    for n in proto.graph.node:
        for v in n.input:
            readers.setdefault(v, set()).add(id(n))
    graph_out = {o.name for o in proto.graph.output}
    sites = {}
    for site, nodes in groups.items():  # nodes in graph (topological) order
        mine = {id(n) for n in nodes}
        ext = [v for v in nodes[0].input if v and v not in inits and v not in consts]
        last = [v for v in nodes[-1].output if v in graph_out or readers.get(v, set()) - mine]
        split = any(p.key == NODE_ROLE and p.value == "input.regions" for n in nodes for p in n.metadata_props)
        if ext:  # OPT-m's split hands on two quantized values (each to its own GEMM): none is forced
            sites[site] = (ext[0], last[0] if len(last) == 1 and not split else None)
    return sites


def _sim_quantizers(sim: SimModule) -> dict[str, object]:
    """``{module path: QuantLayer or AttnHook}`` of the simulation (paths as the recipe names them)."""
    return {name.replace(".inner.", ".").removesuffix(".inner"): m for name, m in sim.model.named_modules()
            if isinstance(m, (QuantLayer, AttnHook))}


def _like(g: np.ndarray, t: torch.Tensor, site: str, k_role: bool) -> torch.Tensor:
    """The graph's value ``g`` in the simulation's layout of ``t`` (the graph may read k after its transpose)."""
    gt = torch.from_numpy(np.asarray(g)).to(t.dtype)
    if k_role and gt.ndim == t.ndim >= 2 and gt.shape == t.shape[:-2] + t.shape[-2:][::-1]:
        tr = gt.transpose(-2, -1)
        if gt.shape != t.shape or (tr - t).abs().max() < (gt - t).abs().max():  # square: the closer layout
            return tr
    if gt.shape == t.shape:
        return gt
    if gt.numel() == t.numel():
        return gt.reshape(t.shape)
    raise ValueError(f"forced_check: {site}: graph value {tuple(gt.shape)} vs simulation {tuple(t.shape)}")


def _offsets(*steps) -> tuple[float, ...]:
    """0 and the sums of every subset of the shifted grids' constants ``float32(scale * shift)`` among ``steps``."""
    cs = [float(shift_offset(st[0], st[2])) for st in steps if st is not None and st[2]]
    sums = {0.0}
    for c in cs:
        sums |= {v + c for v in sums}
    return tuple(sorted(sums))


def forced_check(sim: SimModule, proto: onnx.ModelProto, x: np.ndarray, *, input_name: str = "input",
                 tolerance: float = FORCED_REL) -> ForcedCheck:
    """The deployed graph ``proto`` against ``sim`` on images ``x`` ([B, 3, H, W] float32), one image at a time,
    every quantizer of the simulation fed the graph's input at that quantizer and continuing from the graph's
    quantized output (module docstring). ``sim`` is left as it was."""
    from ..passes.infra import ort_session
    from ..plugins.expand import expand_plugins, has_plugins

    if has_plugins(proto):  # the sites are found in the expansion, which is what runs
        proto, _ = expand_plugins(proto)
    sites = graph_sites(proto)
    sess = ort_session(proto, [v for io in sites.values() for v in io if v])
    out_names = [o.name for o in sess.get_outputs()]
    stats: dict[str, SiteCheck] = {}
    maxabs: dict[str, float] = {}
    unmatched: set[str] = set()
    run: dict = {"vals": {}, "by_id": {}}

    def force(site: str, role: str, t: torch.Tensor, quant, step, offsets: tuple[float, ...]) -> torch.Tensor:
        """The simulation's quantizer ``quant`` at ``site`` on input ``t``; ``step``: (scale, bits, shift) of a
        static per-tensor quantizer, else None; ``offsets``: the shifted grids' constants the graph may restore only
        after the GEMM (so that it hands on ``dq(x - c)``) or carry in the DequantizeLinear's zero point (ORT's folded
        form hands on ``dq(x)``): the hand-on value tells which."""
        by_id = run["by_id"]
        io = sites.get(site)
        if io is None:  # a quantizer the graph shares with another one reading the same tensor, or none at all
            seen = by_id.get(id(t))
            if seen is not None and seen[0] is t:
                return quant(seen[1])
            unmatched.add(site)
            return quant(t)
        gx = _like(run["vals"][io[0]], t, site, role == "k")
        s = stats.setdefault(site, SiteCheck(site, 0.0, None, 0))
        d = float((t - gx).abs().max())
        maxabs[site] = max(maxabs.get(site, 0.0), float(gx.abs().max()))
        s.local_rel = max(s.local_rel, d / max(maxabs[site], 1e-30))
        s.elements += t.numel()
        if step is not None:
            s.flips = (s.flips or 0) + int((fake_quant(t, *step) != fake_quant(gx, *step)).sum())
        by_id[id(t)] = (t, gx)  # the tensor kept alive: its id cannot be reused meanwhile
        mine = quant(gx)
        if io[1] is None:
            return mine
        gy = _like(run["vals"][io[1]], mine, site, role == "k")
        if len(offsets) > 1:
            m = float((mine - gy).median())
            gy = gy + min(offsets, key=lambda c: abs(m - c))
        diff = (mine - gy).abs()
        bad = diff > 1e-6 * max(float(gy.abs().max()), 1e-30)
        if bool(bad.any()):
            if step is None:
                s.q_wrong += int(bad.sum())
            else:
                scale = float(step[0])
                v = gx.double()[bad] / scale
                tie = ((v - v.floor() - 0.5).abs() <= BOUNDARY_STEPS) & (diff[bad].double() <= scale * 1.001)
                s.q_boundary += int(tie.sum())
                s.q_wrong += int((~tie).sum())
        return gy

    undo = []
    for path, w in _sim_quantizers(sim).items():
        if isinstance(w, AttnHook):
            inner = w.qfn

            grids = {r: (op, _offsets(op)) for r, op in getattr(inner, "ops", {}).items()}

            def qfn(role, t, _inner=inner, _path=path, _grids=grids):
                step, offsets = _grids.get(role, (None, (0.0,)))
                return force(f"{_path}.{role}", role, t, lambda u: _inner(role, u), step, offsets)

            undo.append((w, "qfn", inner))
            w.qfn = qfn
        else:
            inner = w.qin

            step = getattr(inner, "plain", None)
            r = getattr(inner, "regions", None)  # (s_pos, bits, s_neg, bits, shift_pos, shift_neg)
            offsets = _offsets(step) if r is None else _offsets((r[0], r[1], r[4]), (r[2], r[3], r[5]))

            def qin(t, _inner=inner, _path=path, _step=step, _offsets=offsets):
                return force(f"{_path}.input", "input", t, _inner, _step, _offsets)

            undo.append((w, "qin", inner))
            w.qin = qin
    logits_rel = []
    try:
        for i in range(len(x)):
            xi = np.ascontiguousarray(x[i:i + 1], dtype=np.float32)
            outs = sess.run(None, {input_name: xi})
            run["vals"], run["by_id"] = dict(zip(out_names, outs)), {}
            got = outs[0].astype(np.float64)
            with torch.no_grad():
                ref = sim(torch.from_numpy(xi)).double().numpy()
            logits_rel.append(float(np.abs(ref - got).max() / max(np.abs(got).max(), 1e-30)))
    finally:
        for w, attr, inner in undo:
            setattr(w, attr, inner)
        run.clear()
    return ForcedCheck(list(stats.values()), np.asarray(logits_rel), sorted(unmatched), tolerance)
