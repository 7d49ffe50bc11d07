#!/usr/bin/env python
"""Wall time and peak memory of a full ``vitq compile`` (issue #3: DeiT-Tiny ``mp:5`` <= 5 minutes on this machine,
peak memory reported): each recipe compiles in its own process (calibration on ``--calib-count`` sample images,
export, graph passes, verification), measured from outside with ``resource.getrusage(RUSAGE_CHILDREN)`` (peak RSS
of the compile process) and wall clock.

    .venv/bin/python bench/compile_cost.py [--recipes mp:5,w8a8] [--calib-count 256] [--target ort]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.table import format_table  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
DEIT_W = SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth"
CALIB = SHARED / "imagenet-sample-eli1000"
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--recipes", default="mp:5")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--target", default="ort")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compile_cost.json")
    args = ap.parse_args()
    if not CALIB.is_dir():
        print(f"note: {CALIB} not found: calibrating on random images is not supported; skipping", file=sys.stderr)
        return 0
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"schema": "vitq.bench-compile/1", "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
