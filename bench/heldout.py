"""Recipe files scored on two labeled sets: dev650 and the calibration set's held-out images.

    python bench/heldout.py RECIPE.json [RECIPE.json ...] [--calib 256] [--dynamic-low]
                            [--out bench/results/heldout.json]

On 650 images one image is 0.15 top-1 points, so choosing a calibration option by its dev650 score alone selects
noise. The labeled sample set (imagenet-sample-eli1000) has 1000 images of which ``bench/mptq.py`` calibrates on a
seeded subset of 256 (and ``bench/mixa.py`` calibrates MixA-Q's branches and searches its ratios on a seeded
subset of 32); the remaining images are a second, independent measurement (never seen by calibration). Per recipe
(its torch simulation, float32, as bench/mptq.py evaluates it): top-1, top-1 agreement with fp32 and mean
KL(fp32 || quant) on both sets, and on their union (1394 images). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.data import ImageSet, load_array, open_image_set  # noqa: E402
from vitq.evaluate import agreement, kl_mean, top1  # noqa: E402,F401 - kl_mean: used by other bench scripts
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.mixa.calib import dynamic_branch  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.recipe.mixa import MixaLayer  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))


@torch.no_grad()
def predict(fn, x, bs=50):
    return torch.cat([fn(torch.from_numpy(x[i:i + bs])) for i in range(0, len(x), bs)])


def score(out, ref, y):
    return {"n": int(len(y)), "top1": top1(out, y) * 100, "agreement": agreement(out, ref) * 100,
            "kl": kl_mean(ref, out)}


def heldout_set(calib: int = 256, extra: int = 32) -> ImageSet:
    """The labeled sample images that neither bench/mptq.py's calibration subset (``calib``) nor bench/mixa.py's
    branch-calibration / search subset (``extra``) uses."""
    sample = open_image_set(SHARED / "imagenet-sample-eli1000")
    used = set(sample.subset(calib, seed=0).files)
    if extra:
        used |= set(sample.subset(extra, seed=0).files)
    keep = [i for i, f in enumerate(sample.files) if f not in used]
    return ImageSet(sample.root, [sample.files[i] for i in keep], [sample.labels[i] for i in keep], sample.layout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--calib", type=int, default=256, help="the calibration subset to exclude (bench/mptq.py's)")
    ap.add_argument("--exclude-extra", type=int, default=32, help="also exclude this seeded subset (bench/mixa.py's "
                    "branch calibration and ratio-search images)")
    ap.add_argument("--dynamic-low", action="store_true", help="also score each MixA-Q recipe with its low branch's "
                    "activation quantizers made dynamic per token (same ratios and weights)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "heldout.json"))
    args = ap.parse_args()
    t0 = time.time()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    held = heldout_set(args.calib, args.exclude_extra)
    sets = {"dev650": open_image_set(SHARED / "imagenet-val-dev650"), "sample_heldout": held}
    data = {}
    for name, s in sets.items():
        x, y = load_array(s, cfg)
        ref = predict(lm.model, x)
        data[name] = (x, torch.from_numpy(y), ref)
    print(f"data loaded in {time.time() - t0:.0f}s: " + ", ".join(f"{k} {len(v[0])}" for k, v in data.items()),
          flush=True)
    res = {"model": "deit_tiny_patch16_224", "calib_excluded": args.calib, "extra_excluded": args.exclude_extra, "rows": [],
           "fp32": {k: score(v[2], v[2], v[1]) for k, v in data.items()}}
    jobs = []
    for p in args.recipes:
        rec = Recipe.load(Path(p))
        jobs.append((p, rec, False))
        if args.dynamic_low and rec.mixa is not None and \
                rec.mixa.low_quant != "dynamic":
            jobs.append((p + " [low dynamic]", rec, True))
    for p, rec, dyn in jobs:
        _, sim = apply_recipe(lm.model, lm.family, rec)
        if rec.mixa is not None:  # MixA-Q recipe (bench/mixa.py --save-recipes): its two-branch simulation
            spec = rec.mixa
            if dyn:
                spec.layers = [MixaLayer(l.module, l.high, None if l.low is None else
                                         dynamic_branch(l.low, spec.low_bits)) for l in spec.layers]
            sim = MixaSim(sim, spec)
        row = {"recipe": p, "name": rec.name, "recon": rec.defaults.get("recon"),
               "low_quant": None if rec.mixa is None else ("dynamic" if dyn else spec.low_quant)}
        outs = []
        for name, (x, y, ref) in data.items():
            out = predict(sim, x)
            row[name] = score(out, ref, y)
            outs.append((out, ref, y))
        row["union"] = score(torch.cat([o for o, _, _ in outs]), torch.cat([r for _, r, _ in outs]),
                             torch.cat([y for _, _, y in outs]))
        res["rows"].append(row)
        print(f"{p}: " + "  ".join(f"{k} {row[k]['top1']:.2f}/{row[k]['agreement']:.2f}/{row[k]['kl']:.4f}"
                                   for k in ("dev650", "sample_heldout", "union")), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    print("\n| recipe | dev650 top-1 / agree / KL | held-out sample top-1 / agree / KL | union top-1 / agree / KL |")
    print("|---|---|---|---|")
    print("| fp32 | " + " | ".join(f"{res['fp32'][k]['top1']:.2f}" for k in data) + " | |")
    for r in res["rows"]:
        print(f"| {r['recipe']} | " + " | ".join(f"{r[k]['top1']:.2f} / {r[k]['agreement']:.2f} / {r[k]['kl']:.4f}"
                                                for k in ("dev650", "sample_heldout", "union")) + " |")
    print(f"total {time.time() - t0:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
