#!/usr/bin/env python
"""ONNX Runtime CPU latency of w8a8 artifacts relative to fp32 (issue #4 targets: DeiT-Tiny w8a8 batch 8 <= 0.75x
fp32; Swin-T w8a8 batch 8 <= 0.7x), measured as **interleaved ratios**: in each round, both sessions run
``--per-round`` times back to back (order alternating), the round's ratio is median(quant)/median(fp32), and the
reported ratio is the median over rounds, with the spread (min..max over rounds). A slow phase of a noisy machine
hits both models of a round, so the ratio holds up better than two separately timed numbers.

Artifacts (reused from --build when present): DeiT-Tiny with the real weights and the calibrated w8a8 recipe of
bench/mptq.py (``bench/results/recipes/w8a8.json``) when ../shared/data is there (else random weights); Swin-T with
random weights, calibrated w8a8 on 32 images (latency does not depend on weight values).

    .venv/bin/python bench/quant_latency.py [--threads 2] [--rounds 15] [--per-round 5] [--batch 1 8] \
        [--recipes w8a8,w7a8]

``--recipes``: each recipe's artifact is timed in the same rounds (order rotating); ``w7a8`` (7-bit weights) runs
ORT's U8S8 kernel exactly on AVX2 (see vitq/passes/lower_ort_cpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.compiler import CompileOptions, compile_model  # noqa: E402
from vitq.runtime import Engine  # noqa: E402
from vitq.table import format_table  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
DEIT_W = SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth"
CALIB = SHARED / "imagenet-sample-eli1000"
RECIPES = REPO / "bench" / "results" / "recipes"
TARGET = {"deit_tiny_patch16_224": 0.75, "swin_tiny_patch4_window7_224": 0.70}


def artifact(name: str, recipe: str, build: Path) -> Path:
    out = build / f"{name}-{recipe}"
    if (out / "model.onnx").is_file():
        return out
    deit = name.startswith("deit_tiny") and DEIT_W.is_file()
    calib = CALIB if CALIB.is_dir() else None
    if recipe == "w8a8" and deit and (RECIPES / "w8a8.json").is_file():
        recipe = str(RECIPES / "w8a8.json")
    if calib is None and recipe != "fp32":
        raise SystemExit(f"{CALIB} not found: this benchmark calibrates on the shared sample images")
    compile_model(CompileOptions(model=name, out=out, weights=DEIT_W if deit else None, calib=calib, calib_count=32,
                                 recipe=recipe, verify_count=2), echo=lambda s: None)
    return out


def timed(eng: Engine, x: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        eng.run(x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--models", default="deit_tiny_patch16_224,swin_tiny_patch4_window7_224")
    ap.add_argument("--build", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "quant_latency.json")
    ap.add_argument("--recipes", default="w8a8", help="comma-separated recipes timed against fp32")
    args = ap.parse_args()
    recipes = args.recipes.split(",")
    rows, results = [], []
    load = os.getloadavg()
    for name in args.models.split(","):
        engs = {r: Engine.load(artifact(name, r, args.build), threads=args.threads) for r in ("fp32", *recipes)}
        for b in args.batch:
            x = np.random.default_rng(0).standard_normal((b, 3, 224, 224)).astype(np.float32)
            for e in engs.values():
                timed(e, x, 3)  # warm-up
            names = list(engs)
            ratios = {r: [] for r in recipes}
            ms = {r: [] for r in names}
            for i in range(args.rounds):
                k = i % len(names)
                order = names[k:] + names[:k] if i % 2 == 0 else list(reversed(names[k:] + names[:k]))
                med = {}
                for r in order:
                    t = timed(engs[r], x, args.per_round)
                    ms[r] += t
                    med[r] = float(np.median(t))
                for r in recipes:
                    ratios[r].append(med[r] / med["fp32"])
            for r in recipes:
                ratio = float(np.median(ratios[r]))
                res = {"model": name, "recipe": r, "batch": b, "threads": args.threads, "rounds": args.rounds,
                       "per_round": args.per_round, "fp32_p50_ms": float(np.median(ms["fp32"])),
                       "quant_p50_ms": float(np.median(ms[r])), "ratio_median": ratio,
                       "ratio_min": float(np.min(ratios[r])), "ratio_max": float(np.max(ratios[r])),
                       "target": TARGET.get(name) if b == 8 else None}
                if r == "w8a8":
                    res["w8a8_p50_ms"] = res["quant_p50_ms"]
                res["met"] = None if res["target"] is None else ratio <= res["target"]
                results.append(res)
                rows.append([name, r, b, f"{res['fp32_p50_ms']:.1f}", f"{res['quant_p50_ms']:.1f}",
                             f"{ratio:.3f} ({res['ratio_min']:.2f}..{res['ratio_max']:.2f})",
                             "" if res["target"] is None else (f"<= {res['target']} " + ("met" if res["met"] else
                                                                                         "MISSED"))])
                print(rows[-1], flush=True)
    print(format_table(rows, ["model", "recipe", "batch", "fp32 p50 ms", "quant p50 ms", "ratio (spread)", "target"],
                       title=f"ONNX Runtime CPU, {args.threads} threads, quantized vs fp32 (interleaved rounds)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"schema": "vitq.bench-ratio/1", "loadavg_at_start": load, "results": results},
                                   indent=2))
    print(f"wrote {args.out} (load average at start {load[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
