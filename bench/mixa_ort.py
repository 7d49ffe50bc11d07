"""MixA-Q graphs on ONNX Runtime (CPU): the native pair (high fp32 / low int8) on DeiT-Tiny, and the routing
overhead of the split_windows graph on DeiT-Tiny and Swin-T (random weights).

    python bench/mixa_ort.py [--ratios 0.25,0.5,0.8] [--eval N] [--iters 20] [--repeats 3] [--no-swin]

DeiT-Tiny (real weights): the W8A8 recipe of bench/mptq.py (bench/results/recipes/w8a8.json) with a ``mixa``
section high = fp32 (no quantizers), low = W8A8, 2x2 token groups, uniform ratio r per block (Linears routed; the
attention matmuls stay at the recipe's int8 Q/DQ). Per graph: ORT batch-8 latency (p50 over ``--iters`` runs,
median of ``--repeats`` interleaved rounds, all graphs in one process so they share the machine's load), top-1 on
dev650 through ORT, and the graph-vs-simulation check. Routing overhead: the float export vs the same float graph
after split_windows alone (identical function, see tests/test_mixa_graph.py) at r = 0.5.

Swin-T (``swin_tiny_patch4_window7_224``, random weights, pretrained=False; base W8A8 calibrated with plain min/max
observers on 4 random-pixel images, which is all random weights merit): the two-branch graph (base W8A8, low
windows W8A4 incl. the window-attention operands, r = 0.5) is built and checked against the MixA-Q simulation on
random-pixel images; routing overhead: the float export vs float + split_windows alone (r = 0.5), ORT batch 8.
Writes bench/results/mixa_ort.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.evaluate import top1 as top1_of  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.exporter.onnx_export import export_onnx  # noqa: E402
from vitq.mixa.bitops import mixa_bitops  # noqa: E402
from vitq.mixa.calib import attach, build_mixa_spec  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.passes.infra import run_passes  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.passes.split_windows import SplitWindows  # noqa: E402
from vitq.quant.pipeline import apply_recipe, calibrate  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))


def session(proto, threads=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    b = proto.SerializeToString() if isinstance(proto, onnx.ModelProto) else onnx.load(str(proto)).SerializeToString()
    return ort.InferenceSession(b, so, providers=["CPUExecutionProvider"])


def latency(sessions: dict, batch: int, iters: int, repeats: int) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"input": x})
    per = {k: [] for k in sessions}
    for _ in range(repeats):  # interleaved rounds: every graph sees the same load
        for k, s in sessions.items():
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                s.run(None, {"input": x})
                ts.append(time.perf_counter() - t)
            per[k].append(float(np.median(ts)) * 1e3)
    return {k: {"p50_ms": float(np.median(v)), "rounds_ms": v} for k, v in per.items()}


def top1(sess, x, y, bs=16):
    out = np.concatenate([sess.run(None, {"input": x[i:i + bs]})[0] for i in range(0, len(x), bs)])
    return top1_of(out, y) * 100, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.25,0.5,0.8")
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swin", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mixa_ort.json"))
    ap.add_argument("--work", default="/tmp/vitq_mixa_ort")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.time()
    res = {"note": "latencies measured in one process on a shared, loaded 2-core machine; compare ratios within "
                   "this run only", "threads": args.threads, "batch": 8}

    def save():
        Path(args.out).write_text(json.dumps(res, indent=1))

    # ---- DeiT-Tiny native pair ----
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    rec8 = Recipe.load(REPO / "bench" / "results" / "recipes" / "w8a8.json")
    prep, sim8 = apply_recipe(lm.model, lm.family, rec8)
    xc, _ = load_array(open_image_set(SHARED / "imagenet-sample-eli1000").subset(8, seed=0), cfg)
    dev = open_image_set(SHARED / "imagenet-val-dev650")
    if args.eval:
        dev = dev.subset(args.eval, seed=0)
    xd, yd = load_array(dev, cfg)
    export_onnx(lm.model, work / "deit_fp32.onnx")
    export_onnx(prep, work / "deit_prep.onnx")
    graphs = {"fp32": onnx.load(str(work / "deit_fp32.onnx"))}
    graphs["w8a8"], _ = build_deployable(work / "deit_prep.onnx", rec8, "ort")
    spec = build_mixa_spec(prep, sim8, rec8, xc, group=(2, 2), high_bits=32, low_bits=8, routed=("linear",),
                           ratios=0.0)
    fp_total = sum(l.macs for l in rec8.layers) * 32 * 32
    rows = {}
    for r in [float(v) for v in args.ratios.split(",") if v]:
        s = spec.with_ratios({b.block: r for b in spec.blocks})
        rec = attach(rec8, s)
        g, _ = build_deployable(work / "deit_prep.onnx", rec, "ort", sample_inputs=xc[:2])
        graphs[f"mixa fp32/int8 r={r}"] = g
        ms = MixaSim(sim8, s)
        with torch.no_grad():
            ref = ms(torch.from_numpy(xc)).numpy()
        got = session(g).run(None, {"input": xc})[0]
        bo = mixa_bitops(rec8, s)
        rows[f"mixa fp32/int8 r={r}"] = {
            "ratio": r, "bitops_reduction_vs_fp32": fp_total / bo["total"], "bitops_vs_w8a8": bo["reduction"],
            "graph_vs_sim_rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "graph_vs_sim_top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}
    # routing overhead: float graph + split_windows only (same function)
    sr = attach(rec8, spec.with_ratios({b.block: 0.5 for b in spec.blocks}))
    graphs["fp32 + routing only (r=0.5)"] = run_passes(onnx.load(str(work / "deit_prep.onnx")), [SplitWindows(sr)],
                                                       validate=False)
    graphs["fp32 (prepared, SQ-b folded)"] = onnx.load(str(work / "deit_prep.onnx"))
    import onnx_ir as ir

    sess = {k: session(v if isinstance(v, onnx.ModelProto) else ir.serde.serialize_model(v), args.threads)
            for k, v in graphs.items()}
    fp_top1, fp_out = top1(sess["fp32"], xd, yd)
    res["deit"] = {"eval": len(xd), "fp32_top1": fp_top1, "graphs": {}}
    for k, s in sess.items():
        t1, out = top1(s, xd, yd) if k != "fp32" else (fp_top1, fp_out)
        res["deit"]["graphs"][k] = {"top1": t1, "drop_vs_fp32": fp_top1 - t1,
                                   "agreement_vs_fp32": float((out.argmax(1) == fp_out.argmax(1)).mean() * 100),
                                   **rows.get(k, {})}
        print(f"deit {k:34s} top1 {t1:6.2f}  [{time.time() - t0:.0f}s]", flush=True)
        save()
    lat = latency(sess, 8, args.iters, args.repeats)
    for k, v in lat.items():
        res["deit"]["graphs"][k].update(v)
        res["deit"]["graphs"][k]["latency_ratio_vs_fp32"] = v["p50_ms"] / lat["fp32"]["p50_ms"]
        print(f"deit {k:34s} batch-8 p50 {v['p50_ms']:7.1f} ms  ratio vs fp32 "
              f"{v['p50_ms'] / lat['fp32']['p50_ms']:.3f}", flush=True)
    save()

    # ---- Swin-T, random weights ----
    if args.swin:
        lm = load_model("swin_tiny_patch4_window7_224", None)
        rng = np.random.default_rng(0)
        xs = rng.standard_normal((4, 3, 224, 224)).astype(np.float32)
        t = time.time()
        r = calibrate(lm.model, "swin", xs, parse_recipe_arg("w8a8"), model_name=lm.name, provenance={},
                      progress=False, methods={"observer": "minmax", "sqb": False, "optm": False, "gptq": False})
        spec = build_mixa_spec(r.model, r.sim, r.recipe, xs, high_bits=8, low_bits=4, routed=("linear", "attn"),
                               ratios=0.5)
        rec = attach(r.recipe, spec)
        export_onnx(r.model, work / "swin_prep.onnx")
        g, rep = build_deployable(work / "swin_prep.onnx", rec, "ort", sample_inputs=xs[:2])
        ms = MixaSim(r.sim, spec)
        got = session(g).run(None, {"input": xs[:3]})[0]
        with torch.no_grad():
            ref = ms(torch.from_numpy(xs[:3])).numpy()
            base = r.sim(torch.from_numpy(xs[:3])).numpy()
        routed = run_passes(onnx.load(str(work / "swin_prep.onnx")), [SplitWindows(rec)], validate=False)
        flt = onnx.load(str(work / "swin_prep.onnx"))
        fs = session(flt, args.threads)
        rs = session(ir.serde.serialize_model(routed), args.threads)
        exact = float(np.abs(fs.run(None, {"input": xs[:3]})[0] - rs.run(None, {"input": xs[:3]})[0]).max())
        lat = latency({"float": fs, "float + routing (r=0.5)": rs}, 8, max(5, args.iters // 2), args.repeats)
        res["swin"] = {
            "model": "swin_tiny_patch4_window7_224 (random weights)", "build_s": round(time.time() - t, 1),
            "mixa_bits": "8/4 (base w8a8)", "bitops_reduction_vs_w8a8": mixa_bitops(r.recipe, spec)["reduction"],
            "graph_vs_sim_rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
            "sim_vs_base_rel_l2": float(np.linalg.norm(base - ref) / np.linalg.norm(ref)),
            "float_routing_max_abs_diff": exact, "passes": [(p["name"], p["stats"]) for p in rep["passes"][:3]],
            "latency": lat,
            "routing_overhead": lat["float + routing (r=0.5)"]["p50_ms"] / lat["float"]["p50_ms"] - 1.0}
        print(f"swin: graph vs sim {res['swin']['graph_vs_sim_rel_l2']:.2e}, float routing diff {exact}, overhead "
              f"{res['swin']['routing_overhead'] * 100:+.1f}%", flush=True)
        save()
    res["total_s"] = round(time.time() - t0, 1)
    save()


if __name__ == "__main__":
    main()
