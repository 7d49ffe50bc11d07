#!/usr/bin/env python
"""ONNX Runtime fp32 latency of DeiT-Tiny and Swin-T at batch 1 and 8 (median of >= 20 runs after warm-up).

Compiles each model with vitq (real DeiT-Tiny weights when ../shared/data is present, random weights otherwise:
latency does not depend on weight values), then times it with vitq's own benchmark. Prints a table and writes JSON
to bench/results/fp32_latency.json.

    .venv/bin/python bench/fp32_latency.py [--threads 2] [--iters 30] [--out bench/results/fp32_latency.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.benchmark import benchmark  # noqa: E402
from vitq.compiler import CompileOptions, compile_model  # noqa: E402
from vitq.runtime import Engine  # noqa: E402
from vitq.table import format_table  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
DEIT_W = SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth"


def artifact(name: str, build: Path) -> Path:
    out = build / name
    if not (out / "model.onnx").is_file():
        weights = DEIT_W if name.startswith("deit_tiny") and DEIT_W.is_file() else None
        compile_model(CompileOptions(model=name, out=out, weights=weights, verify_count=2), echo=lambda s: None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--build", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fp32_latency.json")
    args = ap.parse_args()
    rows, results = [], []
    for name in ("deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"):
        eng = Engine.load(artifact(name, args.build), threads=args.threads)
        for b in (1, 8):
            r = benchmark(eng, batch=b, warmup=args.warmup, iters=args.iters)
            r["model_name"] = name
            results.append(r)
            lat = r["latency_ms"]
            rows.append([name, b, r["iters"], lat["p50"], lat["p90"], lat["p99"], r["throughput_img_s"]])
    print(format_table(rows, ["model", "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "img/s"],
                       title=f"ONNX Runtime CPU fp32, {args.threads} threads"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"schema": "vitq.bench-set/1", "threads": args.threads, "results": results},
                                   indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
