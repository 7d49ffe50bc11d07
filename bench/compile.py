"""Compile cost: wall time, CPU time, peak memory and the time of each step of a full ``vitq compile``, per model
and recipe (budgets: DeiT-Tiny ``mp:5`` within 5 minutes on 2 cores; ViT-Base ``w4a4`` with 64 images within 45
minutes; cost at most linear in model FLOPs). Each compile runs in its own process (calibration on
``--calib-count`` sample images, export, graph passes, verification), measured from outside with
``resource.getrusage(RUSAGE_CHILDREN)`` (peak RSS of the compile process) and wall clock; the step times come from
its ``report.json`` (``timings_s``, ``calibration.timings_s``). DeiT-Tiny uses the real weights when the shared data
has them, the other models random weights.

    python -m bench compile [--models deit_tiny_patch16_224,deit_small_patch16_224] [--recipes w8a8,w4a4]
                            [--calib-count 64] [--target ort]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import DEIT_WEIGHTS as DEIT_W, SAMPLE1000 as CALIB, busy, others_share, stamp_cpu, write_result
from vitq.table import format_table

LIMIT_S = {("deit_tiny_patch16_224", "mp:5"): 300.0, ("deit_tiny_patch16_224", "w4a4"): 360.0,
           ("vit_base_patch16_224", "w4a4"): 2700.0}
MODELS = "deit_tiny_patch16_224,deit_small_patch16_224,vit_base_patch16_224,swin_tiny_patch4_window7_224"


def one(model: str, recipe: str, args, out: Path) -> dict:
    """One compile in a fresh child process; returns wall seconds, the child's peak RSS and the step times."""
    cmd = [sys.executable, "-m", "vitq", "compile", model, "--recipe", recipe, "--calib-count",
           str(args.calib_count), "--target", args.target, "--out", str(out), "--quiet"]
    if DEIT_W.is_file() and model.startswith("deit_tiny"):
        cmd += ["--weights", str(DEIT_W)]
    if CALIB.is_dir():
        cmd += ["--calib", str(CALIB)]
    code = ("import resource, subprocess, sys, time, json\n"
            "t = time.time(); rc = subprocess.run(sys.argv[1:]).returncode; dt = time.time() - t\n"
            "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "print(json.dumps({'rc': rc, 'wall_s': dt, 'peak_rss_mib': ru.ru_maxrss / 1024, "
            "'cpu_s': ru.ru_utime + ru.ru_stime}))")
    b0 = busy()
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    share = others_share(b0, busy())  # CPU other processes took meanwhile: times compare only on a quiet machine
    if r.returncode != 0 or not r.stdout.strip():
        raise SystemExit(f"compile of {recipe} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"vitq compile {recipe} exited {res['rc']}:\n{r.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    cal = (report.get("calibration") or {}).get("timings_s") or {}
    res.update({"model": model, "recipe": report["recipe"]["name"], "requested": recipe, "calib_count": args.calib_count,
                "params_m": round(report["model"]["num_params"] / 1e6, 2), "steps_s": report.get("timings_s"),
                "calibration_s": {k: round(v, 2) for k, v in cal.items()}, "resources": report.get("resources"),
                "others_cpu_share": round(share, 3)})
    return res


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS, help="comma-separated timm names")
    ap.add_argument("--recipes", default="w8a8,w4a4")
    ap.add_argument("--calib-count", type=int, default=64)
    ap.add_argument("--target", default="ort")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/compile.json)")
    args = ap.parse_args(argv)
    if not CALIB.is_dir():
        print(f"bench compile: needs the shared data ({CALIB}); set VITQ_SHARED_DATA", file=sys.stderr)
        return 2
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="vitq-cost-") as tmp:
        for model in args.models.split(","):
            for rec in args.recipes.split(","):
                res = one(model, rec, args, Path(tmp) / f"{model}-{rec.replace(':', '')}")
                lim = LIMIT_S.get((model, rec))
                res["limit_s"], res["met"] = lim, (None if lim is None else res["wall_s"] <= lim)
                results.append(res)
                cal = res["calibration_s"]
                rows.append([model, res["recipe"], res["params_m"], f"{res['wall_s']:.0f}", f"{res['cpu_s']:.0f}",
                             f"{res['peak_rss_mib']:.0f}", f"{cal.get('total_s', 0):.0f}",
                             ", ".join(f"{k[:-2]} {v:.0f}" for k, v in cal.items() if k != "total_s" and v >= 1),
                             "" if lim is None else (f"<= {lim:.0f} s " + ("met" if res["met"] else "MISSED"))])
                print(rows[-1], flush=True)
    print(format_table(rows, ["model", "recipe", "params M", "wall s", "cpu s", "peak RSS MiB", "calibration s",
                              "calibration steps s", "budget"],
                       title=f"vitq compile --target {args.target}, full pipeline, one process per compile"))
    out = args.out or (Path(__file__).resolve().parent / "results" / "compile.json")
    merged, prev_file = False, {}
    if out.is_file():  # a run of some models, recipes and image counts keeps the other rows (same target)
        prev_file = json.loads(out.read_text())
        prev = prev_file.get("results", {})
        if prev.get("target") == args.target:
            key = lambda r, n=prev.get("calib_count"): (r.get("model"), r.get("requested"), r.get("calib_count", n))
            done = {key(r) for r in results}
            kept = [r for r in prev.get("rows", []) if key(r) not in done]
            for r in kept:
                r.setdefault("calib_count", prev.get("calib_count"))
            results, merged = stamp_cpu(kept, prev_file, results), bool(kept)
    path = write_result("compile", {"target": args.target, "rows": results},
                        data=f"DeiT-Tiny with real weights when present, other models random weights; calibration: "
                             f"the first images of {CALIB.name} (count per row)", argv=argv, out=out, merged=merged)
    print(f"wrote {path}")
    return 0
