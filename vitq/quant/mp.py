"""Greedy mixed precision.

1. Sensitivity: starting from the all-8-bit recipe, each layer's weight (8 -> 6, 4) and activation (8 -> 6, 4;
   for attention all four operands together) is lowered *alone*; the cost is the KL divergence
   ``KL(softmax(base logits) || softmax(lowered logits))`` averaged over a calibration batch. The forward restarts
   from the cached input of the chain stage that owns the layer (earlier stages are unchanged), so a layer in
   block 10 costs two blocks, not twelve.
2. Greedy: repeatedly apply the single-step lowering (one role of one layer by one step 8->6 or 6->4) with the
   smallest ``delta KL / bit-operations saved`` until the recipe's average bit-width
   (``sqrt(total bitops / total MACs)``, see :mod:`vitq.quant.bitops`) is <= the target. Sensitivities are assumed
   additive. The classifier head stays at 8/8 (not a candidate).
"""

from __future__ import annotations

import copy
import math
import time

import torch

from ..evaluate import kl_mean as kl
from ..recipe.schema import LayerSpec, Recipe
from .bitops import layer_bitops
from .prepare import stage_of

CANDIDATES = (8, 6, 4)


def _combine(lib: dict, module: str, w: int | None, a: int) -> LayerSpec:
    """A layer spec with weight at ``w`` bits and activations at ``a`` bits from the per-bits library."""
    entry = lib[module]
    if w is None:  # attention
        return entry[("a", a)]
    wspec = entry[("w", w)]
    aspec = entry[("a", a)]
    s = copy.copy(aspec)
    s.weight = wspec
    return s


@torch.no_grad()
def greedy_mp(sim, lib: dict, modules: list[str], x: torch.Tensor, target_bits: float,
              candidates=CANDIDATES, log=None) -> tuple[dict, dict]:
    """``lib[module]``: ``{("w", bits): LayerSpec with that weight, ("a", bits): LayerSpec with that input/attn
    operands}``; ``modules``: the layers the search may lower. ``sim`` is a QuantSim already holding the all-8
    recipe. Returns ``({module: (w_bits|None, a_bits)}, info)``."""
    t0 = time.time()
    chain = sim.chain()
    # cache stage inputs of the base model
    inputs = []
    h = x
    for _, fn in chain:
        inputs.append(h)
        h = fn(h)
    base = h
    top = max(candidates)
    state = {m: (None if sim.wrappers[m].__class__.__name__ == "AttnHook" else top, top) for m in modules}
    sens: dict[tuple[str, str, int], float] = {}
    for m in modules:
        si = stage_of(chain, m)
        w0, a0 = state[m]
        for role in ("w", "a"):
            if role == "w" and w0 is None:
                continue
            for b in candidates:
                if b == top:
                    sens[(m, role, b)] = 0.0
                    continue
                spec = _combine(lib, m, b if role == "w" else w0, b if role == "a" else a0)
                sim.set_layer(spec)
                h = inputs[si]
                for _, fn in chain[si:]:
                    h = fn(h)
                sens[(m, role, b)] = max(kl(base, h), 0.0)
        sim.set_layer(_combine(lib, m, w0, a0))
    t_sens = time.time() - t0

    macs = {m: lib[m][("a", top)].macs for m in modules}

    def bo(m, w, a):
        return layer_bitops(_combine(lib, m, w, a))

    fixed_bitops = sum(layer_bitops(l) for l in sim.recipe.layers if l.module not in state)
    fixed_macs = sum(l.macs for l in sim.recipe.layers if l.module not in state)
    total_macs = fixed_macs + sum(macs.values())
    cur = {m: bo(m, *state[m]) for m in modules}

    def avg():
        return math.sqrt((fixed_bitops + sum(cur.values())) / total_macs)

    steps = []
    lower = {candidates[i]: candidates[i + 1] for i in range(len(candidates) - 1)}
    while avg() > target_bits + 1e-9:
        best = None
        for m in modules:
            w, a = state[m]
            for role in ("w", "a"):
                b = w if role == "w" else a
                if b is None or b not in lower:
                    continue
                nb = lower[b]
                nw, na = (nb, a) if role == "w" else (w, nb)
                gain = cur[m] - bo(m, nw, na)
                if gain <= 0:
                    continue
                cost = max(sens[(m, role, nb)] - sens[(m, role, b)], 0.0) + 1e-12
                score = cost / gain
                if best is None or score < best[0]:
                    best = (score, m, role, nw, na, cost)
        if best is None:
            break
        _, m, role, nw, na, cost = best
        state[m] = (nw, na)
        cur[m] = bo(m, nw, na)
        steps.append({"module": m, "role": role, "to": nw if role == "w" else na, "delta_kl": cost})
    for m in modules:
        sim.set_layer(_combine(lib, m, *state[m]))
    h = x
    for _, fn in chain:
        h = fn(h)
    info = {"target_bits": target_bits, "avg_bits": avg(), "steps": len(steps),
            "predicted_kl": sum(s["delta_kl"] for s in steps), "final_kl_vs_w8a8": kl(base, h),
            "sensitivity_s": round(t_sens, 2), "total_s": round(time.time() - t0, 2), "batch": len(x),
            "sensitivity": {f"{m}:{r}{b}": round(v, 6) for (m, r, b), v in sens.items() if b != top}}
    if log:
        log(f"greedy MP: {len(steps)} steps, avg bits {avg():.3f}, sensitivity {t_sens:.1f}s")
    return state, info
