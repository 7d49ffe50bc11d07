"""The TensorRT lowering is exact on real data: build the TRT graph of a DeiT-Tiny recipe with the pass manager's
numeric check fed with dev650 images, so that ``lower_trt`` (plugin nodes, run through their standard-ONNX
expansion) and ``clip_sub8_activations`` must reproduce the preceding graph's outputs bit for bit (issue #6).

    python bench/trt_lowering_exact.py [--recipe bench/results/recipes/w4a4.json] [--images 64] [--batch 16]

Prints each pass's max |diff| on the images and writes bench/results/trt_lowering_exact.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.exporter import export_onnx  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(REPO / "bench" / "results" / "recipes" / "w4a4.json"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "trt_lowering_exact.json"))
    args = ap.parse_args()
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    x, _ = load_array(open_image_set(SHARED / "imagenet-val-dev650").subset(args.images, seed=0), cfg)
    rec = Recipe.load(args.recipe)
    qm, _ = apply_recipe(lm.model, lm.family, rec)
    prepared = Path(tempfile.mkdtemp()) / "prepared.onnx"
    export_onnx(qm, prepared, image_size=(cfg.height, cfg.width), metadata={"vitq.model": lm.name})
    rows = []
    for i in range(0, len(x), args.batch):  # the manager's check is exact (0.0 tolerance) for exact passes
        _, rep = build_deployable(prepared, rec, "trt", sample_inputs=x[i:i + args.batch])
        for p in rep["passes"]:
            if p["name"] in ("lower_trt", "clip_sub8_activations"):
                rows.append({"images": [i, min(i + args.batch, len(x))], "pass": p["name"], "changed": p["changed"],
                             "stats": p["stats"], "max_abs_diff": p["numeric_max_abs_diff"]})
                print(rows[-1], flush=True)
    ok = all(r["max_abs_diff"] == 0.0 for r in rows if r["changed"])
    Path(args.out).write_text(json.dumps({"recipe": rec.name, "images": len(x), "exact": ok, "rows": rows},
                                         indent=1))
    print(f"exact on {len(x)} dev650 images: {ok}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
