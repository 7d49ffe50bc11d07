"""MPTQ-ViT on DeiT-Tiny (real weights): calibrate on imagenet-sample-eli1000 (256 images), measure on dev650.

    python bench/mptq.py [--calib 256] [--configs w8a8,w6a6,w4a8,w4a4,mp:5] [--no-ablations] [--eval N]
    python bench/mptq.py --configs w4a4+recon,mp:5+recon --no-ablations   # with block-wise reconstruction
    python bench/mptq.py --configs w4a4+recon --no-ablations --methods '{"recon": {"wscale": true}}'  # its options

Per configuration: top-1, drop vs fp32, top-1 agreement with fp32, mean KL(fp32 || quant) of the logits, average
bit-width and bit-op ratio, calibration time. Ablations (on w4a4 and mp:5): plain min/max observers, +searched
observers, +SQ-b, +OPT-m (+ KL scale refinement + GPTQ = full), Greedy MP vs the naive uniform recipe at the same
budget, w4a8 without GPTQ / w6a6 without the attention-scale refinement, w4a4 / w6a6 without shifted grids
(symmetric only) and with the v -> proj smoothing. Prints a table and writes
``bench/results/mptq.json`` after every configuration; recipes (with their GPTQ ``.weights.safetensors`` sidecars)
go to ``--save-recipes``. Run with ``OMP_NUM_THREADS=1`` on a shared machine (many small ops: oversubscribed
threads are >10x slower).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.evaluate import agreement, kl_mean, top1 as top1_of  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.quant.bitops import bitops_report  # noqa: E402
from vitq.quant.pipeline import collect_statistics, finish_calibration, start_calibration  # noqa: E402
from vitq.recipe import RecipeRequest, parse_recipe_arg  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
FP32_REF = 81.54
TARGETS = {"w8a8": (0.3, 98.0), "w6a6": (1.0, None), "w4a8": (1.5, 93.0), "w4a4": (8.0, None), "mp:5": (2.0, None)}


@torch.no_grad()
def predict(fn, x, bs=50):
    return torch.cat([fn(torch.from_numpy(x[i:i + bs])) for i in range(0, len(x), bs)])


def calibrate_cached(model, family, x, req, cache: dict, *, model_name, provenance, methods):
    """``vitq.quant.pipeline.calibrate`` with the (pre-SQ-b) statistics collected once and reused across
    configurations: they depend on the model and the images only."""
    c = start_calibration(model, family, x, methods=methods, progress=True)
    if "stats" in cache:
        t = time.time()
        c.stats = copy.deepcopy(cache["stats"])
        c.timings["collect_s"] = time.time() - t
    else:
        collect_statistics(c)
        cache["stats"] = copy.deepcopy(c.stats)
    return finish_calibration(c, req, model_name=model_name, provenance=provenance)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--configs", default="w8a8,w6a6,w4a8,w4a4,mp:5")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mptq.json"))
    ap.add_argument("--save-recipes", default=str(REPO / "bench" / "results" / "recipes"),
                    help="folder for each configuration's recipe JSON (reused by bench/qdq_agreement.py)")
    ap.add_argument("--methods", default="{}",
                    help="JSON dict of calibration methods applied to every configuration (experiments), e.g. "
                         "'{\"refine\": [\"attn\", \"input\"]}'")
    args = ap.parse_args()
    extra_methods = json.loads(args.methods)
    torch.manual_seed(0)
    t0 = time.time()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    calib_set = open_image_set(SHARED / "imagenet-sample-eli1000").subset(args.calib, seed=0)
    dev = open_image_set(SHARED / "imagenet-val-dev650")
    if args.eval:
        dev = dev.subset(args.eval, seed=0)
    xc, _ = load_array(calib_set, cfg)
    xd, yd = load_array(dev, cfg)
    yd = torch.from_numpy(yd)
    print(f"data loaded in {time.time() - t0:.0f}s: calib {len(xc)}, eval {len(xd)}", flush=True)
    t = time.time()
    ref = predict(lm.model, xd)
    fp32_top1 = float((ref.argmax(-1) == yd).float().mean() * 100)
    print(f"fp32 top-1 {fp32_top1:.2f} ({time.time() - t:.0f}s)", flush=True)
    results = {"model": "deit_tiny_patch16_224", "calib": len(xc), "eval": len(xd), "fp32_top1": fp32_top1,
               "fp32_reference": FP32_REF, "torch_threads": torch.get_num_threads(), "rows": []}
    cache: dict = {}
    # "<preset>+recon": the preset with block-wise reconstruction (vitq/quant/reconstruct.py, opt-in)
    # (options from --methods '{"recon": {...}}' apply to it, e.g. {"recon": {"iters": 400}})
    recon = {"recon": extra_methods.get("recon") or {}}
    runs = [(c, c.split("+")[0], recon if c.endswith("+recon") else {}) for c in args.configs.split(",")]
    if not args.no_ablations:
        runs += [
            ("w4a4 minmax", "w4a4", {"observer": "minmax", "sqb": False, "optm": False}),
            ("w4a4 +search-obs", "w4a4", {"sqb": False, "optm": False}),
            ("w4a4 +SQ-b", "w4a4", {"optm": False}),
            ("w4a8 minmax", "w4a8", {"observer": "minmax", "sqb": False, "optm": False}),
            ("mp:5 naive w4a6", "mp:5", {"mp": False}),
            ("w4a8 no-GPTQ", "w4a8", {"gptq": False}),
            ("w6a6 no-refine", "w6a6", {"refine": ()}),
            ("w4a4 no-shift", "w4a4", {"shift_max_bits": 0}),
            ("w6a6 no-shift", "w6a6", {"shift_max_bits": 0}),
            ("w6a6 +v-smooth", "w6a6", {"vsmooth": True}),
            ("w4a4 +v-smooth", "w4a4", {"vsmooth": True}),
        ]
    for label, preset, methods in runs:
        req = parse_recipe_arg(preset)
        t = time.time()
        res = calibrate_cached(lm.model, lm.family, xc, req, cache, model_name=lm.name,
                               provenance={"calib_count": len(xc)}, methods={**extra_methods, **methods})
        tc = time.time() - t
        if args.save_recipes:
            Path(args.save_recipes).mkdir(parents=True, exist_ok=True)
            res.recipe.save(Path(args.save_recipes) / (label.replace(" ", "_").replace(":", "") + ".json"))
        t = time.time()
        out = predict(res.sim, xd)
        te = time.time() - t
        top1 = top1_of(out, yd) * 100
        agree = agreement(out, ref) * 100
        bo = bitops_report(res.recipe)
        n_split = sum(1 for l in res.recipe.layers if l.input_regions is not None)
        n_smooth = sum(1 for l in res.recipe.layers if l.smooth is not None)
        row = {"config": label, "preset": preset, "methods": {**extra_methods, **methods}, "top1": top1, "drop": fp32_top1 - top1,
               "agreement": agree, "kl": kl_mean(ref, out), "avg_bits": bo["avg_bits"], "bitops_ratio_vs_w8a8":
               bo["ratio_vs_base"], "smoothed_layers": n_smooth, "optm_split_layers": n_split,
               "calib_s": round(tc, 1), "eval_s": round(te, 1), "timings": {k: round(v, 1) for k, v in
                                                                            res.timings.items()}}
        if preset in TARGETS and label in (preset, preset + "+recon"):
            d, a = TARGETS[preset]
            row["target"] = {"max_drop": d, "min_agreement": a,
                             "met": row["drop"] <= d and (a is None or agree >= a)}
        if "__mp__" in res.layer_stats:
            row["mp"] = res.layer_stats["__mp__"]
            row["mp_bits"] = {m: v["mp"] for m, v in res.layer_stats.items() if isinstance(v, dict) and "mp" in v}
        results["rows"].append(row)
        print(f"{label:22s} top1 {top1:6.2f} drop {row['drop']:+5.2f} agree {agree:6.2f} KL {row['kl']:.4f} "
              f"avg_bits {bo['avg_bits']:.2f} calib {tc:.0f}s eval {te:.0f}s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| config | top-1 | drop | agree | KL | avg bits | target |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        tgt = r.get("target")
        ts = "" if not tgt else ("met" if tgt["met"] else "MISSED")
        print(f"| {r['config']} | {r['top1']:.2f} | {r['drop']:+.2f} | {r['agreement']:.2f} | {r['kl']:.4f} | "
              f"{r['avg_bits']:.2f} | {ts} |")
    print(f"total {time.time() - t0:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
