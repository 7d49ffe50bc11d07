"""Ratio search under a bit-operation budget.

Units: each ViT/DeiT block, each Swin block *pair* (regular + shifted block share one ratio). Candidate ratios
``0, step, ..., 0.8``.

1. Sensitivity: on a calibration batch, each unit is moved alone to each candidate ratio; the cost is
   ``KL(softmax(base) || softmax(mixa))`` against the base recipe's logits (``r = 0`` everywhere). The forward
   restarts from the cached input of the unit's first block (earlier blocks are unchanged).
2. Greedy (as :mod:`vitq.quant.mp`): repeatedly raise one unit by one step, the one with the smallest
   ``delta KL / bit-operations saved``, until the reduction vs the base reaches the target. Sensitivities are
   assumed additive; the final KL is measured. Every greedy step is a (bit-ops, predicted KL) point: the trace is
   the search's accuracy / bit-operation path (the Pareto front under the additivity assumption).
"""

from __future__ import annotations

import time

import torch

from ..errors import InputError
from ..evaluate import kl_mean as kl
from ..quant.prepare import stage_of
from .bitops import mixa_bitops
from ..recipe.mixa import MAX_RATIO, MixaSpec


def units_of(spec: MixaSpec) -> list[list[str]]:
    """Search units: ViT blocks one by one; Swin blocks in pairs within a stage."""
    if spec.scheme == "tokens":
        return [[b.block] for b in spec.blocks]
    units: dict[tuple, list[str]] = {}
    for b in spec.blocks:
        j = int(b.block.rsplit(".", 1)[1])
        units.setdefault((b.stage, j // 2), []).append(b.block)
    return list(units.values())


def unit_name(u: list[str]) -> str:
    return u[0] if len(u) == 1 else f"{u[0]}+{u[-1].rsplit('.', 1)[1]}"


@torch.no_grad()
def search_ratios(msim, recipe, x: torch.Tensor, target: float, *, step: float = 0.1, max_ratio: float = MAX_RATIO,
                  prefix_tokens: int | None = None, log=None) -> tuple[MixaSpec, dict]:
    """Per-unit ratios reaching ``base_bitops / mixa_bitops >= target``; returns ``(spec, info)`` and leaves
    ``msim`` at the chosen ratios."""
    t0 = time.time()
    spec0 = msim.spec
    units = units_of(spec0)
    cands = [round(i * step, 6) for i in range(int(max_ratio / step + 1e-9) + 1)]
    zero = {b.block: 0.0 for b in spec0.blocks}

    def bo(ratios: dict) -> float:
        return mixa_bitops(recipe, spec0.with_ratios(ratios), prefix_tokens=prefix_tokens)["reduction"]

    best_possible = bo({b.block: cands[-1] for b in spec0.blocks})
    if target > best_possible + 1e-9:
        raise InputError(f"--mixa {target:g}x: the largest reachable bit-operation reduction with every ratio at "
                         f"{cands[-1]} is {best_possible:.3f}x (route more roles or lower the low bits)")
    msim.set_ratios(zero)
    chain = msim.chain()
    inputs, h = [], x
    for _, fn in chain:
        inputs.append(h)
        h = fn(h)
    base = h
    sens: dict[tuple[int, float], float] = {}
    for ui, u in enumerate(units):
        si = stage_of(chain, u[0] + ".")
        for r in cands[1:]:
            msim.set_ratios({**zero, **{b: r for b in u}})
            h = inputs[si]
            for _, fn in chain[si:]:
                h = fn(h)
            sens[(ui, r)] = max(kl(base, h), 0.0)
        sens[(ui, 0.0)] = 0.0
    t_sens = time.time() - t0
    state = {ui: 0.0 for ui in range(len(units))}

    def ratios_of(st):
        return {b: st[ui] for ui, u in enumerate(units) for b in u}

    cur = bo(ratios_of(state))
    trace = [{"reduction": cur, "predicted_kl": 0.0, "ratios": {unit_name(u): 0.0 for u in units}}]
    pred = 0.0
    while cur < target - 1e-12:
        best = None
        for ui in range(len(units)):
            r = state[ui]
            i = cands.index(r)
            if i + 1 >= len(cands):
                continue
            nr = cands[i + 1]
            st = {**state, ui: nr}
            red = bo(ratios_of(st))
            gain = red - cur
            if gain <= 0:
                continue
            cost = max(sens[(ui, nr)] - sens[(ui, r)], 0.0) + 1e-12
            score = cost / gain
            if best is None or score < best[0]:
                best = (score, ui, nr, red, cost)
        if best is None:
            break
        _, ui, nr, red, cost = best
        state[ui] = nr
        cur = red
        pred += cost
        trace.append({"reduction": cur, "predicted_kl": pred,
                      "ratios": {unit_name(u): state[i] for i, u in enumerate(units)}})
    spec = msim.set_ratios(ratios_of(state))
    out = msim(x)
    info = {"target": target, "reduction": cur, "steps": len(trace) - 1, "predicted_kl": pred,
            "measured_kl_vs_base": kl(base, out), "sensitivity_s": round(t_sens, 2),
            "total_s": round(time.time() - t0, 2), "batch": int(len(x)), "candidates": cands,
            "units": [unit_name(u) for u in units], "trace": trace,
            "sensitivity": {f"{unit_name(units[ui])}@{r}": round(v, 6) for (ui, r), v in sens.items() if r > 0}}
    if log:
        log(f"mixa search: {info['steps']} steps to {cur:.3f}x, KL vs base {info['measured_kl_vs_base']:.4f} "
            f"(sensitivity {t_sens:.1f}s)")
    return spec, info
