"""ONNX Runtime CPU latency of quantized DeiT-Tiny artifacts relative to fp32, measured interleaved.

    python -m bench latency [--recipes w8a8,w7a8] [--batch 1 8] [--threads 2] [--rounds 15] [--per-round 3]

All artifacts are loaded in one process and timed in the same rounds (:func:`vitq.compare.interleaved_latency`:
each model runs ``--per-round`` times back to back per round, order rotating and alternating); each quantized
model's ratio is the median over rounds of its round median over fp32's, with the spread over rounds. A slow phase
of a busy machine hits every model of a round, so the ratios hold where absolute milliseconds do not. Artifacts come
from ``python -m bench accuracy``'s cache (real weights, calibrated on the sample set; compiled when missing), so
the shared data is needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.accuracy import artifact
from bench.common import DEIT_WEIGHTS, REPO, SAMPLE1000, flags_str, write_result
from vitq.compare import cpu_info, interleaved_latency
from vitq.runtime import Engine
from vitq.table import format_table


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="w8a8,w7a8", help="quantized recipes timed against fp32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--build", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/latency.json)")
    args = ap.parse_args(argv)
    if not (DEIT_WEIGHTS.is_file() and SAMPLE1000.is_dir()):
        print(f"bench latency: needs the shared data ({DEIT_WEIGHTS.parent.parent}); set VITQ_SHARED_DATA",
              file=sys.stderr)
        return 2
    recipes = [r for r in args.recipes.split(",") if r]
    dirs = {"fp32": artifact("fp32", args.calib_count, args.build)}
    dirs.update({r: artifact(r, args.calib_count, args.build) for r in recipes})
    engines = {"fp32": Engine.load(dirs["fp32"] / "model.fp32.onnx", backend="ort", threads=args.threads)}
    engines.update({r: Engine.load(dirs[r] / "model.onnx", backend="ort", threads=args.threads) for r in recipes})
    load = os.getloadavg()
    rows, table = [], []
    for b in args.batch:
        t = interleaved_latency(engines, b, rounds=args.rounds, per_round=args.per_round)
        for r in engines:
            lat = t[r]["latency_ms"]
            row = {"recipe": r, "batch": b, "p50_ms": lat["p50"], "p90_ms": lat["p90"], "runs": t[r]["runs"],
                   "ratio": t[r].get("ratio", 1.0), "ratio_min": t[r].get("ratio_min", 1.0),
                   "ratio_max": t[r].get("ratio_max", 1.0)}
            rows.append(row)
            table.append([r, b, f"{row['p50_ms']:.1f}", f"{row['p90_ms']:.1f}",
                          f"{row['ratio']:.2f} ({row['ratio_min']:.2f}..{row['ratio_max']:.2f})"])
    cpu = cpu_info()
    print(format_table(table, ["recipe", "batch", "p50 ms", "p90 ms", "vs fp32 (spread over rounds)"],
                       title=f"DeiT-Tiny on ONNX Runtime, {args.threads} threads, interleaved rounds; {flags_str(cpu)}"))
    path = write_result("latency", {"model": "deit_tiny_patch16_224", "threads": args.threads, "rounds": args.rounds,
                                    "per_round": args.per_round, "loadavg_at_start": [round(x, 2) for x in load],
                                    "rows": rows},
                        data="random inputs; artifacts: DeiT-Tiny real weights, calibrated on "
                             f"{args.calib_count} sample images (python -m bench accuracy's)", argv=argv, out=args.out)
    print(f"wrote {path} (load average at start {load[0]:.1f}: other processes shared the CPU; read the ratios)")
    return 0
