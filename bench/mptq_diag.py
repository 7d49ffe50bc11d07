#!/usr/bin/env python
"""Where a recipe loses accuracy: the logit KL vs fp32 of DeiT-Tiny (real weights) with one class of activation
quantizers switched off (float) at a time, on ``--eval`` dev650 images (seeded subset).

    .venv/bin/python bench/mptq_diag.py bench/results/recipes/w4a4.json [--eval 200]

Classes: the inputs of qkv / proj / fc1 / fc2 (OPT-m regions included) / the patch embedding, and the attention
operands q, k, attn (post-softmax), v. (Weights are not a class: GPTQ weights are folded into the prepared model.)
Prints a table and writes ``bench/results/mptq_diag.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.quant.mp import kl  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.quant.simulate import QuantSim  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402
from vitq.table import format_table  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
CLASSES = {
    "qkv input": lambda l, r: l.module.endswith("qkv") and r == "input",
    "proj input": lambda l, r: l.module.endswith("proj") and r == "input",
    "fc1 input": lambda l, r: l.module.endswith("fc1") and r == "input",
    "fc2 input": lambda l, r: l.module.endswith("fc2") and r in ("input", "input_regions"),
    "patch-embed input": lambda l, r: "patch" in l.module and r == "input",
    "q": lambda l, r: r == "q", "k": lambda l, r: r == "k", "attn (post-softmax)": lambda l, r: r == "attn",
    "v": lambda l, r: r == "v",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mptq_diag.json")
    args = ap.parse_args()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    xd, _ = load_array(open_image_set(SHARED / "imagenet-val-dev650").subset(args.eval, seed=0), cfg)
    xd = torch.from_numpy(xd)
    rec = Recipe.load(args.recipe)
    prepared, _ = apply_recipe(lm.model, lm.family, rec)
    with torch.no_grad():
        ref = torch.cat([lm.model(xd[i:i + 50]) for i in range(0, len(xd), 50)])

    def measure(r):
        out = QuantSim(prepared, r, lm.family).predict(xd, 50)
        return kl(ref, out), float((out.argmax(-1) == ref.argmax(-1)).float().mean() * 100)

    full_kl, full_agree = measure(rec)
    rows, res = [["(all quantized)", f"{full_kl:.4f}", "", f"{full_agree:.2f}"]], []
    for name, pred in CLASSES.items():
        r = copy.deepcopy(rec)
        for l in r.layers:
            for role in ("input", "input_regions", "q", "k", "attn", "v"):
                if getattr(l, role, None) is not None and pred(l, role):
                    setattr(l, role, None)
        k, a = measure(r)
        res.append({"float_class": name, "kl": k, "kl_removed": full_kl - k, "agreement": a})
        rows.append([name, f"{k:.4f}", f"{full_kl - k:+.4f}", f"{a:.2f}"])
        print(rows[-1], flush=True)
    print(format_table(rows, ["class in float", "KL vs fp32", "KL removed", "agreement %"],
                       title=f"{args.recipe.name}: one activation class in float, {len(xd)} dev650 images"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": str(args.recipe), "eval": len(xd), "kl": full_kl,
                                    "agreement": full_agree, "rows": res}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
