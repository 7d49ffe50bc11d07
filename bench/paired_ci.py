"""Paired statistics for an accuracy bar: how far a candidate's top-1 drop and agreement change against its base are
pinned down by the labeled images at hand.

    python bench/paired_ci.py PREDS.npz --base w4a8 [--candidates a,b,...] [--realizations sim_float32,ort/exact]
                              [--bar-drop 0.3] [--bar-agree -1] [--boot 10000] [--out bench/results/paired_ci.json]

``PREDS.npz``: from ``bench/qdq_agreement.py --save-preds`` (labels, the fp32 model's and every realization's top-1
class, per-image KL to fp32). For each candidate and realization, against the base's *same* realization on the
*same* images (paired), on dev650 (the first ``n_dev650`` images) and on all of them:

* top-1 drop (base - candidate) and agreement change (candidate - base, agreement = same top-1 class as fp32), in
  points, with percentile-bootstrap 95% intervals (images resampled with replacement, ``--boot`` times);
* ``p_bar``: the fraction of bootstrap resamples meeting the bar (drop <= ``--bar-drop`` and agreement change >=
  ``--bar-agree``): near 1 or 0 the verdict is settled by these images, in between it is not;
* the KL added (candidate - base, mean per image) with its interval.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def paired(base_ok: np.ndarray, cand_ok: np.ndarray, base_agree: np.ndarray, cand_agree: np.ndarray,
           base_kl: np.ndarray, cand_kl: np.ndarray, *, boot: int, bar_drop: float, bar_agree: float,
           seed: int = 0) -> dict:
    """Point estimates, 95% percentile-bootstrap intervals and the bar's bootstrap frequency (all in points)."""
    n = len(base_ok)
    d_top = (base_ok.astype(np.float64) - cand_ok) * 100  # per-image contribution to the drop
    d_agr = (cand_agree.astype(np.float64) - base_agree) * 100
    d_kl = cand_kl.astype(np.float64) - base_kl
    rng = np.random.default_rng(seed)
    tops, agrs, kls = [], [], []
    for chunk in range(0, boot, 1000):
        idx = rng.integers(0, n, size=(min(1000, boot - chunk), n))
        tops.append(d_top[idx].mean(1))
        agrs.append(d_agr[idx].mean(1))
        kls.append(d_kl[idx].mean(1))
    tops, agrs, kls = np.concatenate(tops), np.concatenate(agrs), np.concatenate(kls)

    def ci(a):
        lo, hi = np.percentile(a, [2.5, 97.5])
        return [float(lo), float(hi)]

    return {"n": int(n), "drop": float(d_top.mean()), "drop_ci95": ci(tops),
            "agree_change": float(d_agr.mean()), "agree_change_ci95": ci(agrs),
            "kl_added": float(d_kl.mean()), "kl_added_ci95": ci(kls),
            "discordant_top1": int((base_ok != cand_ok).sum()), "discordant_agree": int((base_agree != cand_agree).sum()),
            "p_bar": float(((tops <= bar_drop) & (agrs >= bar_agree)).mean()),
            "bar_met": bool(d_top.mean() <= bar_drop and d_agr.mean() >= bar_agree)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preds")
    ap.add_argument("--base", required=True)
    ap.add_argument("--candidates", help="comma list (default: every other recipe in the file)")
    ap.add_argument("--realizations", default="sim_float32,ort/exact")
    ap.add_argument("--bar-drop", type=float, default=0.3)
    ap.add_argument("--bar-agree", type=float, default=-1.0)
    ap.add_argument("--boot", type=int, default=10000)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "paired_ci.json"))
    args = ap.parse_args(argv)
    z = np.load(args.preds)
    keys = set(z.files)
    labels, fp32 = z["labels"], z["fp32"]
    n_dev = int(z["n_dev650"]) if "n_dev650" in keys else 650
    recipes = sorted({k.split(":")[0] for k in keys if k.endswith(":pred")})
    if args.base not in recipes:
        print(f"error: base {args.base!r} not in {args.preds} (recipes: {', '.join(recipes)})", file=sys.stderr)
        return 2
    cands = args.candidates.split(",") if args.candidates else [r for r in recipes if r != args.base]
    rows = []
    for real in args.realizations.split(","):
        bk = f"{args.base}:{real}"
        if f"{bk}:pred" not in keys:
            print(f"skip realization {real}: the base has none", file=sys.stderr)
            continue
        for c in cands:
            ck = f"{c}:{real}"
            if f"{ck}:pred" not in keys:
                print(f"skip {ck}: not in {args.preds}", file=sys.stderr)
                continue
            bp, cp, bkl, ckl = z[f"{bk}:pred"], z[f"{ck}:pred"], z[f"{bk}:kl"], z[f"{ck}:kl"]
            for subset, sl in (("dev650", slice(0, n_dev)), (f"all{len(labels)}", slice(None))):
                if subset != "dev650" and len(labels) == n_dev:
                    continue
                r = paired(bp[sl] == labels[sl], cp[sl] == labels[sl], bp[sl] == fp32[sl], cp[sl] == fp32[sl],
                           bkl[sl], ckl[sl], boot=args.boot, bar_drop=args.bar_drop, bar_agree=args.bar_agree)
                rows.append({"candidate": c, "base": args.base, "realization": real, "images": subset, **r})
    print(f"| candidate | realization | images | top-1 drop [95% CI] | agreement change [95% CI] | KL added | "
          f"bar met (point) | P(bar) bootstrap |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['candidate']} | {r['realization']} | {r['images']} | {r['drop']:.2f} [{r['drop_ci95'][0]:.2f}, "
              f"{r['drop_ci95'][1]:.2f}] | {r['agree_change']:+.2f} [{r['agree_change_ci95'][0]:+.2f}, "
              f"{r['agree_change_ci95'][1]:+.2f}] | {r['kl_added']:.4f} | {'yes' if r['bar_met'] else 'no'} | "
              f"{r['p_bar']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"preds": str(args.preds), "bar": {"drop": args.bar_drop, "agree": args.bar_agree},
                               "boot": args.boot, "rows": rows}, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
