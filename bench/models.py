"""Model matrix: every supported ViT-family architecture through export, calibration and the graph pipelines.

Per model (timm random weights, seed 0; synthetic random-pixel images through the model's own preprocessing):

* ``fp32``: export (dynamo, opset 21, dynamic batch) and ONNX Runtime vs torch on ``--verify`` images (max |logit
  diff|, tolerance 1e-4);
* per recipe (default w8a8, w4a8): calibration on ``--images`` images, the prepared export, the ORT graph pipeline
  (compile time = calibration + export + passes), the deployed Q/DQ graph vs the torch simulation (relative logit
  error, top-1 agreement) next to the simulation's own float32 sensitivity
  (:func:`vitq.quant.simulate.float_sensitivity`) and its quantization error, and the teacher-forced check of
  :func:`vitq.quant.forced.forced_check` (every quantizer fed the graph's input: float segments, quantizers and
  logits to float precision); the graph agrees when the forced check is consistent or no image is further from the
  simulation than :func:`~vitq.quant.simulate.matches_simulation` allows (rows measured before the forced check
  have only the latter); the TensorRT pipeline's ``trt_check`` (ok, error and warning codes);
* ORT latency ratio fp32 / w8a8 graph at batch 1 (``--latency-runs`` interleaved pairs in one process, median of
  the per-pair ratios; > 1 means the quantized graph is faster). The machine may be shared: only ratios are kept.

    python -m bench models [--models deit_tiny_patch16_224,swinv2_tiny_window8_256] [--images 32]
                           [--recipes w8a8,w4a8] [--verify 4] [--latency-runs 20] [--out PATH]

Random weights make accuracy meaningless; the matrix checks that each architecture compiles and that the deployed
graph computes what the simulation computes. One recipe serves both pipelines, so its 4-bit weights are per output
channel (the TensorRT form); ``--target ort``'s group-wise 4-bit weights are checked per architecture family by
``tests/test_family.py`` (``w4a8-g16``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from bench.common import busy, flags_str, others_share, stamp_cpu, write_result

#: the architectures of the matrix (issue #29): DeiT, ViT, DeiT III, register tokens, Swin, Swin V2, EVA02, BEiT
MODELS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "vit_small_patch16_224",
          "vit_base_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
          "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swinv2_tiny_window8_256",
          "eva02_tiny_patch14_224", "beit_base_patch16_224"]


def _images(cfg, n: int, seed: int = 0) -> np.ndarray:
    from PIL import Image

    from vitq.runtime.preprocess import preprocess_batch

    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(rng.integers(0, 256, (cfg.height + 32, cfg.width + 48, 3), dtype=np.uint8))
            for _ in range(n)]
    return preprocess_batch(imgs, cfg)


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _latency_ratio(fp32_path: Path, q_proto, x: np.ndarray, runs: int) -> dict:
    """Median over ``runs`` interleaved (fp32, quantized) pairs of t_fp32 / t_quant at batch 1."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    a = ort.InferenceSession(str(fp32_path), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(q_proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    xb = x[:1]
    for s in (a, b):  # warm-up
        s.run(None, {"input": xb})
    ratios, ta, tb = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        a.run(None, {"input": xb})
        t1 = time.perf_counter()
        b.run(None, {"input": xb})
        t2 = time.perf_counter()
        ta.append(t1 - t)
        tb.append(t2 - t1)
        ratios.append((t1 - t) / (t2 - t1))
    return {"batch": 1, "threads": 1, "runs": runs, "ratio_fp32_over_w8a8": statistics.median(ratios),
            "fp32_ms_median": 1e3 * statistics.median(ta), "w8a8_ms_median": 1e3 * statistics.median(tb)}


def one_model(name: str, args, tmp: Path) -> dict:
    import torch

    from vitq.exporter import data_config, export_onnx, load_model, verify_against_torch
    from vitq.targets import build_deployable
    from vitq.passes.infra import ort_run
    from vitq.quant.pipeline import calibrate
    from vitq.quant.forced import forced_check
    from vitq.quant.simulate import float_sensitivity, matches_simulation
    from vitq.recipe import parse_recipe_arg
    from vitq.runtime.preprocess import PreprocessConfig

    row: dict = {"model": name}
    t0 = time.perf_counter()
    lm = load_model(name)
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    row.update({"class": type(lm.model).__name__, "family": lm.family, "params_m": round(lm.num_params / 1e6, 2),
                "input": [cfg.height, cfg.width]})
    x = _images(cfg, args.images)
    fp32 = tmp / f"{name}.fp32.onnx"
    t = time.perf_counter()
    export_onnx(lm.model, fp32, image_size=(cfg.height, cfg.width))
    ver = verify_against_torch(fp32, lm.model, x[:args.verify], batch_sizes=(0,))
    row["fp32"] = {"max_abs_diff": ver["max_abs_diff"], "passed": ver["passed"],
                   "export_s": round(time.perf_counter() - t, 1)}
    for recipe in args.recipes:
        r: dict = {}
        row[recipe] = r
        try:
            t = time.perf_counter()
            res = calibrate(lm.model, lm.family, x, parse_recipe_arg(recipe), model_name=name, provenance={},
                            progress=False)
            r["calibrate_s"] = round(time.perf_counter() - t, 1)
            prepared = tmp / f"{name}.{recipe}.prepared.onnx"
            export_onnx(res.model, prepared, image_size=(cfg.height, cfg.width))
            proto, _ = build_deployable(prepared, res.recipe, "ort", sample_inputs=x[:2])
            r["compile_s"] = round(time.perf_counter() - t, 1)
            xv = x[:args.verify]
            got = ort_run(proto, {"input": xv})[0]
            with torch.no_grad():
                sim = res.sim(torch.from_numpy(xv)).numpy()
                flt = res.model(torch.from_numpy(xv)).numpy()
                sim64 = copy.deepcopy(res.sim).astype(torch.float64)(torch.from_numpy(xv).double()).numpy()
            # the recipe's own float32 sensitivity (float64 twin and one-ulp input perturbations): a rounding flip at
            # one quantizer moves the logits of random-weight models far, with no ONNX involved (docs/models.md);
            # the graph agrees by the rule of tests/test_family.py
            fp_sens = float_sensitivity(res.sim, xv)
            agrees, per_image = matches_simulation(got, sim, fp_sens)
            # quantizer by quantizer, the simulation fed the graph's values: flips cannot cascade there, so a graph
            # that computes the recipe's function passes even where one flip moves the logits beyond the bound above
            forced = forced_check(res.sim, proto, xv).summary()
            r.update({"graph_vs_sim_rel_l2": _rel(got, sim), "sim_vs_float_rel_l2": _rel(sim, flt),
                      "graph_vs_sim_per_image": [float(v) for v in per_image],
                      "sim_fp32_sensitivity_per_image": [float(v) for v in fp_sens],
                      "sim64_vs_sim_rel_l2": _rel(sim, sim64),
                      "top1_agreement": float((got.argmax(1) == sim.argmax(1)).mean()),
                      "sqb_layers": sum(1 for l in res.recipe.layers if l.smooth is not None),
                      "optm_layers": sum(1 for l in res.recipe.layers if l.input_regions is not None),
                      "layers": len(res.recipe.layers)})
            r["forced"] = forced
            r["agrees"] = agrees or forced["consistent"]
            _, rep = build_deployable(prepared, res.recipe, "trt", validate=False)
            chk = rep["trt_check"]
            r["trt_check"] = {"ok": chk["ok"], "errors": sorted({e["code"] for e in chk["errors"]}),
                              "warnings": sorted({w["code"] for w in chk["warnings"]})}
            if recipe == "w8a8" and args.latency_runs:
                r["ort_latency"] = _latency_ratio(fp32, proto, x, args.latency_runs)
            prepared.unlink()
        except Exception as e:  # one architecture's failure is a result of the matrix, not the end of it
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            traceback.print_exc()
    row["total_s"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict], recipes: list[str]) -> str:
    from vitq.table import format_table

    head = ["model", "class", "fp32 diff"]
    for r in recipes:
        head += [f"{r} s", f"{r} graph vs sim / sim fp32 sens.", f"{r} trt_check"]
    head.append("ORT fp32/w8a8")
    body = []
    for row in rows:
        line = [row["model"], row.get("class", "-"),
                f"{row['fp32']['max_abs_diff']:.1e}" if "fp32" in row else row.get("error", "-")]
        for rc in recipes:
            r = row.get(rc) or {}
            if "error" in r:
                line += ["-", r["error"][:40], "-"]
                continue
            line += [f"{r.get('compile_s', '-')}",
                     f"{r['graph_vs_sim_rel_l2']:.1e} / {r['sim64_vs_sim_rel_l2']:.1e}" if "graph_vs_sim_rel_l2" in r
                     else "-",
                     ("ok" if r["trt_check"]["ok"] else "FAIL " + ",".join(r["trt_check"]["errors"]))
                     if "trt_check" in r else "-"]
        lat = (row.get("w8a8") or {}).get("ort_latency")
        line.append(f"{lat['ratio_fp32_over_w8a8']:.2f}x" if lat else "-")
        body.append(line)
    return format_table(body, head)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench models", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names (default: the matrix)")
    ap.add_argument("--images", type=int, default=32, help="calibration images per model (default 32)")
    ap.add_argument("--verify", type=int, default=4, help="images for the export and graph checks (default 4)")
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--latency-runs", type=int, default=20, help="interleaved latency pairs (0: skip)")
    ap.add_argument("--out", type=Path, default=None, help="result file (default bench/results/models.json)")
    args = ap.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    if args.images < max(2, args.verify):
        print(f"--images {args.images}: needs at least --verify ({args.verify}) and 2", file=sys.stderr)
        return 2
    data = (f"timm random weights (seed 0), {args.images} synthetic random-pixel images per model through its own "
            f"preprocessing; checks on the first {args.verify}")
    out = args.out or (Path(__file__).resolve().parent / "results" / "models.json")
    prev_rows, prev_file = [], {}
    if out.is_file():  # a run of some models keeps the other models' rows (same images and recipes)
        import json

        prev_file = json.loads(out.read_text())
        prev = prev_file.get("results", {})
        if prev.get("recipes") == args.recipes and prev.get("images") == args.images:
            prev_rows = prev.get("rows", [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        for name in [m for m in args.models.split(",") if m]:
            print(f"[bench models] {name} ...", file=sys.stderr, flush=True)
            busy0 = busy()
            try:
                rows.append(one_model(name, args, Path(d)))
            except Exception as e:
                rows.append({"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                traceback.print_exc()
            # CPU time other processes took meanwhile: compile times are only comparable on a quiet machine
            rows[-1]["others_cpu_share"] = round(others_share(busy0, busy()), 3)
            print(_table(rows[-1:], args.recipes), file=sys.stderr, flush=True)
            done = {row["model"] for row in rows}  # written after each model: a long run keeps what it finished
            all_rows = stamp_cpu([row for row in prev_rows if row["model"] not in done], prev_file, rows)
            path = write_result("models", {"rows": all_rows, "recipes": args.recipes, "images": args.images},
                                data=data, argv=argv, out=out, merged=bool(prev_rows))
    rows = all_rows
    from bench.common import cpu_info

    print(_table(rows, args.recipes))
    print(f"CPU: {flags_str(cpu_info())}\nwritten: {path}")
    ok = all("error" not in row and row["fp32"]["passed"] and all(
        "error" not in row[r] and row[r]["agrees"] and row[r]["trt_check"]["ok"] for r in args.recipes)
        for row in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
