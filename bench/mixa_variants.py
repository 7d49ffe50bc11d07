"""Variants of one MixA-Q point (DeiT-Tiny): what else could close the agreement gap at a given reduction.

    python bench/mixa_variants.py RECIPE.json [--target 1.35] [--variants refine,no-fc2,kv-high]
                                  [--save-dir DIR] [--out bench/results/mixa_variants.json]

``RECIPE.json``: a MixA-Q recipe from ``bench/mixa.py --save-recipes`` (its branch quantizers are reused; its
ratios are the ``searched`` row). Variants, each re-reaching ``--target``:

* ``refine``: the searched ratios, then pairwise moves (one unit +0.1, another -0.1, reduction kept >= target)
  accepted when they lower the joint KL against the base recipe on 64 *other* sample images (seed 1), up to three
  sweeps: does the search's additivity assumption cost accuracy?
* ``no-fc2``: fc2 (the post-GELU input) not routed; ratios re-searched (``search_ratios``, 16 images, as
  ``bench/mixa.py``);
* ``kv-high``: the low branch's attention keys and values at the high branch's bits (low tokens then change no
  high token's attention inputs but their own k/v projection); ratios re-searched.

Per variant: top-1, agreement with fp32 and KL(fp32 || variant) on dev650, the reduction; ``--save-dir`` writes each
variant's recipe (score them on held-out images with ``bench/heldout.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from vitq.evaluate import agreement, kl_mean  # noqa: E402
from mixa import RECIPES, SHARED, predict  # noqa: E402
from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.mixa.bitops import mixa_bitops  # noqa: E402
from vitq.mixa.calib import attach  # noqa: E402
from vitq.mixa.search import search_ratios  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.recipe.mixa import MixaSpec  # noqa: E402
from vitq.quant.mp import kl  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402


def refine(ms: MixaSim, rec: Recipe, spec: MixaSpec, x: torch.Tensor, target: float, sweeps: int = 3, log=print):
    """Pairwise moves on the joint KL against the base (r = 0) on ``x``; returns the ratios."""
    blocks = [b.block for b in spec.blocks]
    state = {b.block: b.ratio for b in spec.blocks}
    chain = ms.chain()
    idx = {p.rstrip("."): i for i, (p, _) in enumerate(chain)}

    def red(st):
        return mixa_bitops(rec, spec.with_ratios(st))["reduction"]

    def forward(st, si, inputs):
        ms.set_ratios(st)
        new, h = list(inputs), inputs[si]
        with torch.no_grad():
            for k in range(si, len(chain)):
                new[k] = h
                h = chain[k][1](h)
        return h, new

    with torch.no_grad():
        ms.set_ratios({b: 0.0 for b in blocks})
        base = ms(x)
    out, inputs = forward(state, 0, [x] * len(chain))
    cur = kl(base, out)
    t0 = time.time()
    for sweep in range(sweeps):
        improved = False
        for i in blocks:
            for j in blocks:
                if i == j or state[i] + 0.1 > 0.8 + 1e-9 or state[j] - 0.1 < -1e-9:
                    continue
                st = {**state, i: round(state[i] + 0.1, 6), j: round(state[j] - 0.1, 6)}
                if red(st) < target:
                    continue
                o2, new = forward(st, min(idx[i], idx[j]), inputs)
                v = kl(base, o2)
                if v < cur - 1e-5:
                    state, cur, inputs, improved = st, v, new, True
                    log(f"  refine sweep {sweep}: +{i} -{j}: KL vs base {v:.4f}, {red(st):.3f}x "
                        f"[{time.time() - t0:.0f}s]")
        if not improved:
            break
    return state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("--target", type=float, default=1.35)
    ap.add_argument("--variants", default="refine,no-fc2,kv-high")
    ap.add_argument("--save-dir", default=None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mixa_variants.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    mrec = Recipe.load(Path(args.recipe))
    if mrec.mixa is None:
        raise SystemExit(f"{args.recipe}: no mixa section (use a recipe from bench/mixa.py --save-recipes)")
    spec0 = mrec.mixa
    base = Recipe.load(RECIPES / f"{spec0.base}.json")
    _, sim = apply_recipe(lm.model, lm.family, base)
    sample = open_image_set(SHARED / "imagenet-sample-eli1000")
    xs = torch.from_numpy(load_array(sample.subset(32, seed=0), cfg)[0][:16])  # bench/mixa.py's search batch
    dev = open_image_set(SHARED / "imagenet-val-dev650")
    xd, yd = load_array(dev, cfg)
    yd = torch.from_numpy(yd)
    fo = predict(lm.model, xd)
    res = {"recipe": args.recipe, "target": args.target, "rows": []}

    def add(name, ms, ratios):
        s2 = ms.set_ratios(ratios)
        o = predict(ms, xd)
        row = {"variant": name, "reduction": mixa_bitops(base, s2)["reduction"],
               "top1": float((o.argmax(-1) == yd).float().mean() * 100),
               "agreement": agreement(o, fo) * 100, "kl": kl_mean(fo, o),
               "ratios": ratios}
        res["rows"].append(row)
        print(f"{name:10s} {row['reduction']:.3f}x top-1 {row['top1']:.2f} agreement {row['agreement']:.2f} "
              f"KL {row['kl']:.4f} [{time.time() - t0:.0f}s]", flush=True)
        if args.save_dir:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            attach(base, s2).save(Path(args.save_dir) / f"mixa_{name}_{args.target}x.json")
        Path(args.out).write_text(json.dumps(res, indent=1))

    def searched(spec):
        ms = MixaSim(sim, spec.with_ratios({b.block: 0.0 for b in spec.blocks}))
        _, info = search_ratios(ms, base, xs, args.target, log=print)
        return ms, {b.block: b.ratio for b in ms.spec.blocks}

    ms = MixaSim(sim, spec0)
    add("searched", ms, {b.block: b.ratio for b in spec0.blocks})
    for v in [v for v in args.variants.split(",") if v]:
        if v == "refine":
            xr = torch.from_numpy(load_array(sample.subset(64, seed=1), cfg)[0])
            ms = MixaSim(sim, spec0)
            add(v, ms, refine(ms, base, spec0, xr, args.target))
        elif v == "no-fc2":
            s = copy.deepcopy(spec0)
            s.layers = [l for l in s.layers if not l.module.endswith(".mlp.fc2")]
            add(v, *searched(s))
        elif v == "kv-high":
            s = copy.deepcopy(spec0)
            for l in s.layers:
                if l.module.endswith(".attn") and l.low is not None:
                    l.low = copy.copy(l.low)
                    l.low.k, l.low.v = l.high.k, l.high.v
            add(v, *searched(s))
        else:
            raise SystemExit(f"--variants: unknown {v!r} (refine, no-fc2, kv-high)")
    print("\n| variant | reduction | top-1 | agreement | KL |\n|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['variant']} | {r['reduction']:.3f}x | {r['top1']:.2f} | {r['agreement']:.2f} | {r['kl']:.4f} |")


if __name__ == "__main__":
    main()
