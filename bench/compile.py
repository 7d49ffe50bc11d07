"""Compile cost: wall time, CPU time and peak memory of a full ``vitq compile`` (budget: DeiT-Tiny ``mp:5`` within
5 minutes on 2 cores). Each recipe compiles in its own process (calibration on ``--calib-count`` sample images,
export, graph passes, verification), measured from outside with ``resource.getrusage(RUSAGE_CHILDREN)`` (peak RSS
of the compile process) and wall clock.

    python -m bench compile [--recipes mp:5,w8a8] [--calib-count 256] [--target ort]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import DEIT_WEIGHTS as DEIT_W, SAMPLE1000 as CALIB, write_result
from vitq.table import format_table

LIMIT_S = {"mp:5": 300.0}


def one(recipe: str, args, out: Path) -> dict:
    """One compile in a fresh child process; returns wall seconds and the child's peak RSS."""
    cmd = [sys.executable, "-m", "vitq", "compile", args.model, "--recipe", recipe, "--calib-count",
           str(args.calib_count), "--target", args.target, "--out", str(out), "--quiet"]
    if DEIT_W.is_file() and args.model.startswith("deit_tiny"):
        cmd += ["--weights", str(DEIT_W)]
    if CALIB.is_dir():
        cmd += ["--calib", str(CALIB)]
    code = ("import resource, subprocess, sys, time, json\n"
            "t = time.time(); rc = subprocess.run(sys.argv[1:]).returncode; dt = time.time() - t\n"
            "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': rc, 'wall_s': dt, 'peak_rss_mib': ru.ru_maxrss / 1024, "
            "'cpu_s': ru.ru_utime + ru.ru_stime}))")
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise SystemExit(f"compile of {recipe} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"vitq compile {recipe} exited {res['rc']}:\n{r.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    res.update({"recipe": recipe, "timings": report.get("timings"), "load_avg_after": os.getloadavg()[0]})
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--recipes", default="mp:5")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--target", default="ort")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/compile.json)")
    args = ap.parse_args(argv)
    if not CALIB.is_dir():
        print(f"bench compile: needs the shared data ({CALIB}); set VITQ_SHARED_DATA", file=sys.stderr)
        return 2
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="vitq-cost-") as tmp:
        for rec in args.recipes.split(","):
            res = one(rec, args, Path(tmp) / rec.replace(":", ""))
            lim = LIMIT_S.get(rec)
            res["limit_s"], res["met"] = lim, (None if lim is None else res["wall_s"] <= lim)
            results.append(res)
            rows.append([args.model, rec, args.calib_count, f"{res['wall_s']:.0f}", f"{res['cpu_s']:.0f}",
                         f"{res['peak_rss_mib']:.0f}", "" if lim is None else
                         (f"<= {lim:.0f} s " + ("met" if res["met"] else "MISSED"))])
            print(rows[-1], flush=True)
    print(format_table(rows, ["model", "recipe", "calib images", "wall s", "cpu s", "peak RSS MiB", "target"],
                       title=f"vitq compile --target {args.target}, full pipeline, one process per recipe"))
    path = write_result("compile", {"model": args.model, "target": args.target, "calib_count": args.calib_count,
                                    "rows": results},
                        data=f"{args.model}" + (", real weights" if DEIT_W.is_file() else ", random weights")
                             + f"; calibration: {args.calib_count} images of {CALIB.name}", argv=argv, out=args.out)
    print(f"wrote {path}")
    return 0
