"""Output-aware refinement of per-tensor activation scales.

The per-layer searches (:mod:`.search`) score a scale on the *layer's* output error. For some quantizers that is a
poor proxy of what the classifier needs: the post-softmax ``attn`` operand at 6/4 bits (a symmetric grid leaves
it only ``2^(b-1)`` non-negative levels) loses most of the accuracy at w6a6, and which clipping is best depends
on which attention rows matter downstream (e.g. the class token's). This pass revisits chosen quantizers in
forward order and picks, among multiples of the current scale, the one that minimizes
``KL(float logits || quantized logits)`` on a calibration batch, with every other quantizer as in the recipe
(earlier layers already refined). The forward restarts from the cached input of the stage owning the layer.
The quantizers stay symmetric per-tensor; only their scale values change.
"""

from __future__ import annotations

import copy

import torch

from ..recipe.schema import QuantSpec
from ..evaluate import kl_mean as kl
from .prepare import stage_of

FACTORS = (0.6, 0.8, 1.25, 1.5)


@torch.no_grad()
def refine_scales(sim, recipe, x: torch.Tensor, ref_logits: torch.Tensor, targets: list[tuple[str, str]],
                  factors=FACTORS, batch_size: int = 32, max_bits: int = 8, log=None) -> dict:
    """``targets``: ``(module, role)`` with role one of ``q``/``k``/``attn``/``v`` (attention) or ``input``;
    quantizers at ``max_bits`` or more are left alone (8-bit ones lose next to nothing).
    Updates ``sim`` and ``recipe.layers`` in place; returns ``{"module:role": {"factor", "kl_before",
    "kl_after"}}``."""
    chain = sim.chain()

    def run_from(si, h):
        outs = []
        for i in range(0, len(h), batch_size):
            t = h[i:i + batch_size]
            for _, fn in chain[si:]:
                t = fn(t)
            outs.append(t)
        return torch.cat(outs)

    def stage_fwd(si, h):
        return torch.cat([chain[si][1](h[i:i + batch_size]) for i in range(0, len(h), batch_size)])

    idx = {l.module: i for i, l in enumerate(recipe.layers)}
    targets = [t for t in targets if t[0] in idx and getattr(recipe.layers[idx[t[0]]], t[1], None) is not None
               and getattr(recipe.layers[idx[t[0]]], t[1]).bits < max_bits]
    targets.sort(key=lambda t: (stage_of(chain, t[0]), list(sim.wrappers).index(t[0])))
    cache = {0: x}
    cur_stage = 0
    report = {}
    base_kl = None
    for module, role in targets:
        si = stage_of(chain, module)
        while cur_stage < si:
            cache[cur_stage + 1] = stage_fwd(cur_stage, cache[cur_stage])
            del cache[cur_stage]
            cur_stage += 1
        h = cache[si]
        spec0 = recipe.layers[idx[module]]
        q0 = getattr(spec0, role)
        if base_kl is None:
            base_kl = kl(ref_logits, run_from(si, h))
        best = (base_kl, 1.0, spec0)
        for f in factors:
            spec = copy.copy(spec0)
            setattr(spec, role, QuantSpec(q0.bits, [float(q0.scale[0]) * f], axis=q0.axis, method="search",
                                            shift=q0.shift))
            sim.set_layer(spec)
            k = kl(ref_logits, run_from(si, h))
            if k < best[0]:
                best = (k, f, spec)
        sim.set_layer(best[2])
        recipe.layers[idx[module]] = best[2]
        report[f"{module}:{role}"] = {"factor": best[1], "kl_before": base_kl, "kl_after": best[0]}
        base_kl = best[0]
    if log and report:
        first = next(iter(report.values()))["kl_before"]
        log(f"scale refinement: {len(report)} quantizers, calibration-batch KL {first:.4f} -> {base_kl:.4f}")
    return report
