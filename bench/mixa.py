"""MixA-Q on DeiT-Tiny (real weights): token-group mixed-precision activations, measured on imagenet-val-dev650.

    python -m bench mixa [--groups 2x2] [--routed linear+attn,linear] [--targets 1.2,1.35,1.5]
                         [--low-quant static,dynamic:32:log] [--prune 0.1,0.2,0.3] [--calib 32]
                         [--search-batch 16] [--eval N] [--append] [--replot] [--save-recipes DIR]

Base: the W4A8 recipe calibrated on 256 sample images (cached in ``build/bench/recipes/w4a8.json``, re-applied
with ``apply_recipe``). Low branch: W4A4 (weights shared), its
activation quantizers calibrated on the low tokens of ``--calib`` images at ``--calib-ratio``. Ratios per block:
:func:`vitq.mixa.search.search_ratios` on ``--search-batch`` calibration images (KL vs the base), one greedy run
per configuration; each target takes the first point of the greedy trace that reaches it.

Rows: uniform recipes (w8a8, w6a6, w4a8, w4a4 from ``build/bench/recipes`` when present), MixA-Q points, SparseViT-style
pruning points (base precision, a uniform fraction of groups skipped in every block), and the native ORT pair
(high fp32, low W8A8) in simulation. Per row: top-1, drop vs fp32 and vs the W4A8 base, top-1 agreement with fp32,
bit-operations per image and the reduction vs the uniform W4A8 base. Writes ``bench/results/mixa.json`` after
every row and ``build/bench/mixa.png`` (top-1 vs bit-operations).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import REPO, RESULTS, SHARED, write_result
from vitq.data import load_array, open_image_set
from vitq.exporter.models import data_config, load_model
from vitq.mixa.bitops import mixa_bitops
from vitq.mixa.calib import attach, build_mixa_spec
from vitq.mixa.search import search_ratios
from vitq.mixa.sim import MixaSim
from vitq.quant.bitops import bitops_report
from vitq.quant.pipeline import apply_recipe, calibrate
from vitq.recipe import parse_recipe_arg
from vitq.recipe.schema import Recipe
from vitq.runtime.preprocess import PreprocessConfig

RECIPES = REPO / "build" / "bench" / "recipes"
PLOT = REPO / "build" / "bench" / "mixa.png"


@torch.no_grad()
def predict(fn, x, bs=50):
    return torch.cat([fn(torch.from_numpy(x[i:i + bs])) for i in range(0, len(x), bs)])


def _save(res: dict, out: Path, argv: list[str]) -> None:
    write_result("mixa", res, data=f"deit_tiny_patch16_224, real weights; calibration and ratio search on the "
                 f"sample set; scored on imagenet-val-dev650 ({res['eval']} images), torch simulation",
                 argv=argv, out=out)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench mixa")
    ap.add_argument("--groups", default="2x2")
    ap.add_argument("--routed", default="linear+attn,linear")
    ap.add_argument("--targets", default="1.2,1.35,1.5")
    ap.add_argument("--prune", default="0.1,0.2,0.3")
    ap.add_argument("--low-quant", default="static", help="comma list of the low branch's activation quantizers: "
                    "static (calibrated on the branch's tokens) and/or dynamic (per token), dynamic:G (per G "
                    "features of a token), dynamic[:G]:log (post-softmax operand on the log-sqrt(2) grid)")
    ap.add_argument("--calib", type=int, default=32, help="images for the low-branch calibration")
    ap.add_argument("--calib-ratio", type=float, default=0.6)
    ap.add_argument("--search-batch", type=int, default=16)
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--base", default="w4a8", help="base recipe: a preset name (cached in build/bench/recipes) "
                    "or a recipe .json path")
    ap.add_argument("--uniform", default="w8a8,w6a6,w4a8,w4a4")
    ap.add_argument("--native", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--save-recipes", default=None, metavar="DIR", help="write each MixA-Q point's recipe here "
                    "(compile one with vitq compile MODEL --recipe FILE)")
    ap.add_argument("--out", type=Path, default=RESULTS / "mixa.json")
    ap.add_argument("--append", action="store_true", help="keep the rows (and searches) already in --out and add "
                    "this run's (e.g. a later run with --groups '' --uniform '' --prune ...)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    args = ap.parse_args(argv)
    if args.replot:
        res = json.loads(Path(args.out).read_text())["results"]
        plot(res, PLOT)
        print_table(res)
        return 0
    torch.manual_seed(0)
    t0 = time.time()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    calib_all = open_image_set(SHARED / "imagenet-sample-eli1000")
    xc, _ = load_array(calib_all.subset(max(args.calib, args.search_batch), seed=0), cfg)
    dev = open_image_set(SHARED / "imagenet-val-dev650")
    if args.eval:
        dev = dev.subset(args.eval, seed=0)
    xd, yd = load_array(dev, cfg)
    yd = torch.from_numpy(yd)
    xs = torch.from_numpy(xc[:args.search_batch])
    print(f"data loaded in {time.time() - t0:.0f}s: calib {len(xc)}, eval {len(xd)}", flush=True)
    ref = predict(lm.model, xd)
    fp32_top1 = float((ref.argmax(-1) == yd).float().mean() * 100)
    res = {"model": "deit_tiny_patch16_224", "eval": len(xd), "calib": len(xc), "search_batch": len(xs),
           "fp32_top1": fp32_top1, "torch_threads": torch.get_num_threads(),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": []}
    if args.append and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())["results"]
        if old.get("eval") != len(xd):
            raise SystemExit(f"--append: {args.out} was measured on {old.get('eval')} images, not {len(xd)}")
        res["rows"] = old["rows"]
        res["searches"] = old.get("searches", [])
        res["previous_args"] = old.get("args")

    def recipe_sim(name):
        p = Path(name) if name.endswith(".json") else RECIPES / f"{name}.json"
        if p.is_file():
            rec = Recipe.load(p)
            prepared, sim = apply_recipe(lm.model, lm.family, rec)
            return rec, prepared, sim, f"loaded {p.resolve().relative_to(REPO) if p.resolve().is_relative_to(REPO) else p}"
        xcal, _ = load_array(calib_all.subset(256, seed=0), cfg)
        r = calibrate(lm.model, lm.family, xcal, parse_recipe_arg(name), model_name=lm.name,
                      provenance={"calib_count": 256}, progress=True)
        if not name.endswith(".json") and "+" not in name:  # a preset: cache it
            RECIPES.mkdir(parents=True, exist_ok=True)
            r.recipe.save(p)
        return r.recipe, r.model, r.sim, "calibrated here (256 images)"

    base_rec, base_prep, base_sim, how = recipe_sim(args.base)
    base_total = bitops_report(base_rec)["total"]
    base_out = predict(base_sim, xd)
    base_top1 = float((base_out.argmax(-1) == yd).float().mean() * 100)
    base_agree = float((base_out.argmax(-1) == ref.argmax(-1)).float().mean() * 100)
    res.update({"base": args.base, "base_recipe": how, "base_top1": base_top1, "base_agreement": base_agree,
                "base_gbitops": base_total / 1e9})
    print(f"fp32 {fp32_top1:.2f}; base w4a8 ({how}) top-1 {base_top1:.2f} agreement {base_agree:.2f}", flush=True)

    def add(kind, label, out, gbitops, **extra):
        top1 = float((out.argmax(-1) == yd).float().mean() * 100)
        agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean() * 100)
        row = {"kind": kind, "config": label, "top1": top1, "drop_vs_fp32": fp32_top1 - top1,
               "drop_vs_base": base_top1 - top1, "agreement": agree, "agreement_vs_base_pts": agree - base_agree,
               "gbitops": gbitops, "reduction_vs_w4a8": base_total / 1e9 / gbitops, **extra}
        res["rows"].append(row)
        print(f"{kind:8s} {label:34s} top1 {top1:6.2f} (base {base_top1 - top1:+5.2f}) agree {agree:6.2f} "
              f"Gbitops {gbitops:7.2f} red {row['reduction_vs_w4a8']:.3f}x  [{time.time() - t0:.0f}s]", flush=True)
        _save(res, args.out, argv)
        plot(res, PLOT)
        return row

    for name in [u for u in args.uniform.split(",") if u]:
        if name == args.base:
            out, tot = base_out, base_total
        elif (RECIPES / f"{name}.json").is_file():
            rec, _, sim, _ = recipe_sim(name)
            out, tot = predict(sim, xd), bitops_report(rec)["total"]
        else:
            print(f"uniform {name}: no recipe file, skipped", flush=True)
            continue
        add("uniform", name, out, tot / 1e9)

    targets = [float(t) for t in args.targets.split(",") if t]
    for grp in [g for g in args.groups.split(",") if g]:
        gh, gw = (int(v) for v in grp.split("x"))
        for routed_s, lq in [(r, q) for r in args.routed.split(",") if r for q in args.low_quant.split(",") if q]:
            routed = tuple(routed_s.split("+"))
            lq, *mods = lq.split(":")
            lg = next((m for m in mods if m.isdigit()), "")
            lsm = "log" if "log" in mods else "uniform"
            tag = routed_s + ("" if lq == "static" else f" {lq}") + (f" g{lg}" if lg else "") + \
                (" logsm" if lsm == "log" else "")
            t = time.time()
            spec = build_mixa_spec(base_prep, base_sim, base_rec, xc[:args.calib], group=(gh, gw), low_bits=4,
                                   routed=routed, ratios=0.0, calib_ratios=args.calib_ratio, low_quant=lq,
                                   low_group=int(lg or 0), low_softmax=lsm)
            msim = MixaSim(base_sim, spec)
            tcal = time.time() - t
            try:
                _, info = search_ratios(msim, base_rec, xs, max(targets), log=print)
            except Exception as e:  # unreachable target: search to the maximum instead
                print(f"{grp} {tag}: {e}", flush=True)
                mx = mixa_bitops(base_rec, spec.with_ratios({b.block: 0.8 for b in spec.blocks}))["reduction"]
                _, info = search_ratios(msim, base_rec, xs, mx - 1e-6, log=print)
            for tg in targets:
                pt = next((p for p in info["trace"] if p["reduction"] >= tg - 1e-9), None)
                if pt is None:
                    print(f"{grp} {tag}: target {tg} not reached (max {info['trace'][-1]['reduction']:.3f})")
                    continue
                ratios = {u: pt["ratios"][u] for u in info["units"]}
                s2 = msim.set_ratios(ratios)
                bo = mixa_bitops(base_rec, s2)
                out = predict(msim, xd)
                add("mixa", f"{grp} {tag} @{tg}x", out, bo["total"] / 1e9, group=grp, routed=list(routed),
                    target=tg, low_quant=lq, low_group=int(lg or 0), low_softmax=lsm, ratios=ratios,
                    predicted_kl=pt["predicted_kl"],
                    calib_s=round(tcal, 1), search_s=info["total_s"])
                if args.save_recipes:
                    d = Path(args.save_recipes)
                    d.mkdir(parents=True, exist_ok=True)
                    attach(base_rec, s2).save(d / f"mixa_{grp}_{tag.replace('+', '_').replace(' ', '_')}_{tg}x.json")
            res.setdefault("searches", []).append({"group": grp, "routed": list(routed), "low_quant": lq, **{
                k: v for k, v in info.items() if k != "sensitivity"}})
            _save(res, args.out, argv)

    # SparseViT-style pruning: base precision, a uniform fraction of 2x2 groups skipped in every block
    prunes = [float(p) for p in args.prune.split(",") if p]
    if prunes:
        spec = build_mixa_spec(base_prep, base_sim, base_rec, xc[:8], group=(2, 2), high_bits=8, low_bits=8,
                               routed=("linear", "attn"), ratios=0.0)
        msim = MixaSim(base_sim, spec)
        for p in prunes:
            s2 = msim.set_ratios({b.block: 0.0 for b in spec.blocks}, prune={b.block: p for b in spec.blocks})
            bo = mixa_bitops(base_rec, s2)
            add("prune", f"2x2 prune {p:.0%} of groups", predict(msim, xd), bo["total"] / 1e9, prune=p)

    if args.native and (RECIPES / "w8a8.json").is_file():
        rec8, prep8, sim8, _ = recipe_sim("w8a8")
        spec = build_mixa_spec(prep8, sim8, rec8, xc[:8], group=(2, 2), high_bits=32, low_bits=8,
                               routed=("linear",), ratios=0.0)
        msim = MixaSim(sim8, spec)
        fp_total = sum(l.macs for l in rec8.layers) * 32 * 32
        for r in (0.25, 0.5, 0.8):
            s2 = msim.set_ratios({b.block: r for b in spec.blocks})
            bo = mixa_bitops(rec8, s2)
            add("native", f"high fp32 / low w8a8, r={r}", predict(msim, xd), bo["total"] / 1e9, ratio=r,
                reduction_vs_fp32=fp_total / bo["total"])
    res["total_s"] = round(time.time() - t0, 1)
    _save(res, args.out, argv)
    print_table(res)
    return 0


def print_table(res):
    print("\n| kind | config | top-1 | drop vs base | agreement (base) | Gbit-ops | reduction vs W4A8 |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['kind']} | {r['config']} | {r['top1']:.2f} | {r['drop_vs_base']:+.2f} | {r['agreement']:.2f} "
              f"({r['agreement_vs_base_pts']:+.2f}) | {r['gbitops']:.2f} | {r['reduction_vs_w4a8']:.3f}x |")


def plot(res, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    style = {"uniform": ("s", "tab:gray"), "prune": ("v", "tab:red"), "native": ("D", "tab:green")}
    mixa_colors = ["tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:olive", "tab:brown"]
    seen = {}
    for r in res["rows"]:
        if r["kind"] == "mixa":
            key = f"MixA-Q {r['group']} {'+'.join(r['routed'])}"
            if key not in seen:
                seen[key] = mixa_colors[len(seen) % len(mixa_colors)]
            m, c = "o", seen[key]
        else:
            key = {"uniform": "uniform recipes", "prune": "SparseViT-style pruning (W4A8)",
                   "native": "MixA-Q high fp32 / low W8A8"}[r["kind"]]
            m, c = style[r["kind"]]
        ax.scatter(r["gbitops"], r["top1"], marker=m, color=c, label=key, s=40, zorder=3)
        if r["kind"] == "uniform":
            ax.annotate(r["config"], (r["gbitops"], r["top1"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
    for key, c in seen.items():
        pts = sorted((r["gbitops"], r["top1"]) for r in res["rows"] if r["kind"] == "mixa" and
                     f"MixA-Q {r['group']} {'+'.join(r['routed'])}" == key)
        ax.plot(*zip(*pts), color=c, lw=1, alpha=0.6)
    ax.axhline(res["fp32_top1"], color="k", ls=":", lw=1, label=f"fp32 {res['fp32_top1']:.2f}")
    ax.axhline(res["base_top1"] - 0.3, color="tab:blue", ls="--", lw=0.8, label="W4A8 base - 0.3")
    h, l = ax.get_legend_handles_labels()
    uniq = dict(zip(l, h))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="lower right")
    ax.set_xlabel("bit-operations per image (G)")
    ax.set_ylabel(f"top-1 on dev650 ({res['eval']} images), %")
    ax.set_title("DeiT-Tiny: MixA-Q token groups vs uniform recipes and pruning")
    lo = min([r["top1"] for r in res["rows"] if r["top1"] > 60] + [res["base_top1"]]) - 2
    ax.set_ylim(max(lo, 0), res["fp32_top1"] + 1.5)
    for r in res["rows"]:  # points below the visible range: marked at the bottom edge with their value
        if r["top1"] < max(lo, 0):
            y = max(lo, 0) + 0.25
            ax.scatter(r["gbitops"], y, marker="v", color="tab:gray", s=40, zorder=3)
            ax.annotate(f"{r['config']}: {r['top1']:.1f}% (off scale)", (r["gbitops"], y), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

