"""ONNX Runtime Q/DQ graph vs the torch simulation of the same recipe, on dev650 (issue #4's central invariant).

    python bench/qdq_agreement.py [--recipes w8a8,w4a8,w4a4,mp5] [--eval N] [--threads 2]

MixA-Q recipes (``--recipe-dir bench/results/mixa_s9 --recipes mixa_2x2_linear_attn_dynamic_1.35x --targets ort``)
are compared with their two-branch simulation (float32 only).

For each recipe file in bench/results/recipes/ (written by bench/mptq.py): apply it to DeiT-Tiny (real weights),
export the prepared model, run the graph passes for each target (ort: ORT-lowered, ORT optimizations on, what
`vitq compile` deploys; trt: the TensorRT graph with plugins expanded, run unoptimized = its exact function), and
compare with the simulation on dev650: top-1 agreement, relative L2 logit error, and each one's top-1 vs labels.
The simulation runs in float32 (what calibration uses) and, with ``--float64`` (default on), also in float64: the
recipe's function without float32 rounding (same integer grids and float32 scales), against which both
implementations are compared; rounding flips between two float32 implementations cascade over the quantizers, so
agreement with the exact function is the better-posed measure of "the graph computes the recipe".
Each realization (float32 sim, float64 sim, each ONNX target) is also scored against the fp32 model like
bench/mptq.py scores the float32 sim (top-1, top-1 agreement with fp32, mean KL(fp32 || quant)): on 650 images the
spread between realizations of one recipe is the noise floor of those numbers.
Prints a table and writes bench/results/qdq_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.evaluate import agreement, kl_mean, kl_per_image, top1  # noqa: E402
from vitq.exporter import export_onnx  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime import Engine  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))


def export_prepared(lm, qm, cfg, path: Path) -> Path:
    """The prepared (calibrated, fake-quantized) model ``qm`` exported to ONNX at ``path``."""
    export_onnx(qm, path, image_size=(cfg.height, cfg.width), metadata={"vitq.model": lm.name})
    return path


def deployed_graph(prepared: Path, rec: Recipe, target: str, path: Path) -> tuple[Path, dict]:
    """What ``vitq compile --target TARGET`` deploys for ``rec`` (the graph passes on the exported ``prepared``
    model), saved at ``path``: ``(path, pass report)``. Shared with bench/realizations.py (``--realization``)."""
    import onnx

    proto, rep = build_deployable(prepared, rec, target, validate=False)
    tgt = proto.metadata_props.add()
    tgt.key, tgt.value = "vitq.target", target
    onnx.save(proto, path)
    return path, rep


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="w8a8,w4a8,w4a4,mp5,w6a6", help="names in --recipe-dir, or .json paths")
    ap.add_argument("--recipe-dir", default=str(REPO / "bench" / "results" / "recipes"))
    ap.add_argument("--targets", default="ort,trt")
    ap.add_argument("--eval", type=int, default=None)
    ap.add_argument("--images", choices=("dev650", "union"), default="dev650", help="union: dev650 plus the 720 "
                    "held-out sample images of bench/heldout.py (1370)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int4-matmul", default="exact", help="comma list of exact,fast: ONNX Runtime's MatMulNBits "
                    "compute for int4 weights (vitq.runtime.ort_backend; fast re-quantizes activations to int8)")
    ap.add_argument("--float64", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare against the simulation evaluated in float64")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "qdq_agreement.json"))
    ap.add_argument("--save-preds", metavar="NPZ", help="also write per-image predictions (labels, fp32 and each "
                    "realization's top-1 class, per-image KL to fp32) for paired statistics (bench/paired_ci.py)")
    args = ap.parse_args()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    dev = open_image_set(SHARED / "imagenet-val-dev650")
    if args.eval:
        dev = dev.subset(args.eval, seed=0)
    x, y = load_array(dev, cfg)
    n_dev = len(x)
    if args.images == "union":
        from heldout import heldout_set

        xh, yh = load_array(heldout_set(), cfg)
        x, y = np.concatenate([x, xh]), np.concatenate([y, yh])
    with torch.no_grad():
        fref = torch.cat([lm.model(torch.from_numpy(x[i:i + 50])) for i in range(0, len(x), 50)]).double()

    preds = {"labels": np.asarray(y), "fp32": fref.argmax(1).numpy(), "n_dev650": np.array(n_dev)}

    def keep(key: str, logits: np.ndarray) -> None:
        preds[f"{key}:pred"] = np.asarray(logits).argmax(1)
        preds[f"{key}:kl"] = kl_per_image(fref, logits)
        if args.save_preds:
            np.savez_compressed(args.save_preds, **preds)

    def vs_fp32(logits: np.ndarray) -> dict:
        return {"top1": top1(logits, y) * 100, "agreement_fp32": agreement(logits, fref) * 100,
                "kl_fp32": kl_mean(fref, logits)}

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="vitq-agree-"))
    for name in args.recipes.split(","):
        path = Path(name) if name.endswith(".json") else Path(args.recipe_dir) / f"{name}.json"
        name = path.stem
        if not path.is_file():
            print(f"skip {name}: {path} not found (run bench/mptq.py first)", flush=True)
            continue
        rec = Recipe.load(path)
        qm, sim = apply_recipe(lm.model, lm.family, rec)
        if rec.mixa is not None:  # a MixA-Q recipe (bench/mixa.py --save-recipes): its two-branch simulation
            sim = MixaSim(sim, rec.mixa)
        t = time.time()
        ref = sim.predict(x, batch_size=50).numpy().astype(np.float64)
        t_sim = time.time() - t
        ref64 = sim.astype(torch.float64).predict(x, batch_size=50).numpy() \
            if args.float64 and rec.mixa is None else None
        prepared = export_prepared(lm, qm, cfg, tmp / f"{name}.prepared.onnx")
        for target in args.targets.split(","):
            mpath, rep = deployed_graph(prepared, rec, target, tmp / f"{name}.{target}.onnx")
            for mode in args.int4_matmul.split(","):
                eng = Engine.load(mpath, backend="ort", threads=args.threads, int4_matmul=mode)
                t = time.time()
                got = np.concatenate([eng.run(x[i:i + 50]) for i in range(0, len(x), 50)]).astype(np.float64)
                t_ort = time.time() - t
                row = {"recipe": name, "target": target, "n": int(len(x)),
                       "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean() * 100),
                       "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
                       "rel_l2_median_per_image": float(np.median(np.linalg.norm(got - ref, axis=1)
                                                                  / np.linalg.norm(ref, axis=1))),
                       "top1_sim": float((ref.argmax(1) == y).mean() * 100),
                       "top1_onnx": float((got.argmax(1) == y).mean() * 100),
                       "plugin_nodes": sum(p.get("stats", {}).get("plugin_nodes", 0) for p in rep["passes"]),
                       "ort_optimization": eng._b.optimization, "int4_matmul": mode, "sim_s": round(t_sim, 1),
                       "onnx_s": round(t_ort, 1)}
                row["vs_fp32"] = {"sim_float32": vs_fp32(ref), "onnx": vs_fp32(got)}
                keep(f"{name}:sim_float32", ref)
                keep(f"{name}:{target}/{mode}", got)
                if ref64 is not None:
                    row["vs_fp32"]["sim_float64"] = vs_fp32(ref64)
                    row.update({"top1_agreement_vs_float64": float((got.argmax(1) == ref64.argmax(1)).mean() * 100),
                                "rel_l2_vs_float64": float(np.linalg.norm(got - ref64) / np.linalg.norm(ref64)),
                                "sim32_vs_float64_agreement": float((ref.argmax(1) == ref64.argmax(1)).mean() * 100),
                                "top1_sim_float64": float((ref64.argmax(1) == y).mean() * 100)})
                row["images"] = args.images
                rows.append(row)
                print(f"{name:6s} {target:4s} agree {row['top1_agreement']:6.2f}%  rel {row['rel_l2']:.3e} "
                      f"(median/img {row['rel_l2_median_per_image']:.3e})  top-1 sim {row['top1_sim']:.2f} onnx "
                      f"{row['top1_onnx']:.2f}  [{row['ort_optimization']}, int4 {mode}, {row['plugin_nodes']} plugins]"
                      + (f"  vs float64 sim: agree {row['top1_agreement_vs_float64']:.2f}% (float32 sim "
                         f"{row['sim32_vs_float64_agreement']:.2f}%)" if ref64 is not None else ""), flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"model": lm.name, "rows": rows}, indent=1))
    print("\n| recipe | target | agreement % (vs float32 sim) | rel L2 | agreement % vs float64 sim | float32 sim vs "
          "float64 sim | top-1 sim | top-1 ONNX |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a64 = f"{r['top1_agreement_vs_float64']:.2f}" if "top1_agreement_vs_float64" in r else "-"
        s64 = f"{r['sim32_vs_float64_agreement']:.2f}" if "sim32_vs_float64_agreement" in r else "-"
        print(f"| {r['recipe']} | {r['target']}/{r.get('int4_matmul', '-')} | {r['top1_agreement']:.2f} | {r['rel_l2']:.3e} | {a64} | {s64} | "
              f"{r['top1_sim']:.2f} | {r['top1_onnx']:.2f} |")
    print("\n| recipe | realization | top-1 | agreement with fp32 | KL |")
    print("|---|---|---|---|---|")
    seen = set()
    for r in rows:
        for k, v in r["vs_fp32"].items():
            key = (r["recipe"], f"{r['target']}/{r.get('int4_matmul', '-')}" if k == "onnx" else k)
            if key in seen:
                continue
            seen.add(key)
            print(f"| {r['recipe']} | {key[1]} | {v['top1']:.2f} | {v['agreement_fp32']:.2f} | {v['kl_fp32']:.4f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
