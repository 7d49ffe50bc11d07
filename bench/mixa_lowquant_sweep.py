"""What-if sweep of a MixA-Q recipe's dynamic low-branch quantizer on dev650, in simulation (DeiT-Tiny).

    python bench/mixa_lowquant_sweep.py RECIPE.json [--clip 1.0,0.9,0.8] [--group 64,32] [--group-all 32] [--base w4a8]
                                        [--out bench/results/mixa_lowquant_sweep.json]

Same ratios and weights; only the low branch's 4-bit dynamic quantizer changes:

* ``clip c``: each token's grid spans ``c`` times its [min, max] (values outside saturate) instead of all of it;
* ``group g``: each Linear input's grid is per ``g`` consecutive features (what ``--mixa-low-group g`` compiles;
  attention operands stay per token);
* ``group-all g``: the attention's q / k / v head channels grouped by ``g`` as well (not a compile option).

The variants are applied by replacing the simulator's dynamic quantizer function for the run (an experiment, not a
compile option). Prints top-1, agreement with fp32 and KL(fp32 || q) per variant and the base's, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import vitq.quant.simulate as simulate  # noqa: E402
from realizations import dev650_scoring  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.quant.functional import fake_quant_dynamic  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import DYN_EPS, Recipe  # noqa: E402


def clipped_dynamic(c: float):
    """fake_quant_dynamic whose 4-bit grids span c x [min, max] of each token (8-bit quantizers unchanged)."""
    def fq(x, bits, axis=-1, group=None):
        if bits != 4 or group:
            return fake_quant_dynamic(x, bits, axis, group or 0)
        n = float((1 << bits) - 1)
        lo = torch.clamp(x.amin(axis, keepdim=True), max=0.0) * c
        hi = torch.clamp(x.amax(axis, keepdim=True), min=0.0) * c
        s = torch.clamp((hi - lo) / n, min=DYN_EPS)
        z = torch.round(-lo / s)
        return (torch.clamp(torch.round(x / s) + z, 0.0, n) - z) * s
    return fq


def grouped_dynamic(g: int):
    """fake_quant_dynamic with the 4-bit Linear inputs grouped by g, as ``--mixa-low-group g`` compiles them (the
    simulator passes ``group`` for Linear inputs only; attention operands stay per token)."""
    def fq(x, bits, axis=-1, group=None):
        if group is not None and bits == 4:
            return fake_quant_dynamic(x, bits, axis, g)
        return fake_quant_dynamic(x, bits, axis, group or 0)
    return fq


def grouped_all_dynamic(g: int):
    """Every 4-bit quantizer over a last axis of more than ``g`` features (a multiple of ``g``) grouped by ``g``:
    Linear inputs and the q / k / v head channels (the attention row over keys, 197 wide, stays per row)."""
    def fq(x, bits, axis=-1, group=None):
        if bits == 4 and axis in (-1, x.dim() - 1) and x.shape[-1] > g and x.shape[-1] % g == 0:
            return fake_quant_dynamic(x, bits, group=g)
        return fake_quant_dynamic(x, bits, axis, group or 0)
    return fq


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--clip", default="1.0,0.9,0.8")
    ap.add_argument("--group", default="64,32")
    ap.add_argument("--group-all", default="32")
    ap.add_argument("--base", default="w4a8", help="base recipe in bench/results/recipes ('' to skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mixa_lowquant_sweep.json"))
    args = ap.parse_args(argv)
    lm, score, base_row = dev650_scoring(args.base)
    rows = []
    if base_row:
        rows.append(base_row)
        print(rows[-1], flush=True)
    rec = Recipe.load(args.recipe)
    _, sim = apply_recipe(lm.model, lm.family, rec)
    msim = MixaSim(sim, rec.mixa)
    variants = [(f"clip {c}", clipped_dynamic(float(c))) for c in args.clip.split(",") if c] + \
               [(f"group {g}", grouped_dynamic(int(g))) for g in args.group.split(",") if g] + \
               [(f"group-all {g}", grouped_all_dynamic(int(g))) for g in args.group_all.split(",") if g]
    orig = simulate.fake_quant_dynamic
    try:
        for name, fn in variants:
            t = time.time()
            simulate.fake_quant_dynamic = fn
            rows.append({"variant": name, **score(msim), "s": round(time.time() - t, 1)})
            print(rows[-1], flush=True)
    finally:
        simulate.fake_quant_dynamic = orig
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": str(args.recipe), "images": "dev650", "rows": rows}, indent=1))
    print(f"\n{args.recipe.name}, dev650\n| variant | top-1 | agreement | KL |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['top1']:.2f} | {r['agreement_fp32']:.2f} | {r['kl_fp32']:.4f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
