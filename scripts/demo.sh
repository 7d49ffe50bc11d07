#!/usr/bin/env bash
# The main job on a default that needs no extra data: compile DeiT-Tiny and evaluate/benchmark it.
# With ../shared/data present: real ImageNet weights, calibration on the sample set, accuracy on dev650.
# Without it: random weights (the report says so) and a latency benchmark only.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${VITQ_SHARED_DATA:-../shared/data}
RECIPE=${RECIPE:-fp32}
OUT=${OUT:-build/deit}
W=$DATA/weights/deit_tiny_patch16_224.wvfunc_matdump.pth
if [ -f "$W" ] && [ -d "$DATA/imagenet-sample-eli1000" ]; then
  .venv/bin/vitq compile deit_tiny_patch16_224 --weights "$W" --calib "$DATA/imagenet-sample-eli1000" \
      --recipe "$RECIPE" --out "$OUT"
  .venv/bin/vitq eval "$OUT" --images "$DATA/imagenet-val-dev650" --reference "$OUT/model.fp32.onnx" \
      --json "$OUT/eval.dev650.json"
else
  echo "[demo] $DATA not found: compiling with RANDOM weights (accuracy is meaningless)" >&2
  .venv/bin/vitq compile deit_tiny_patch16_224 --recipe "$RECIPE" --out "$OUT"
fi
.venv/bin/vitq bench "$OUT" --batch 1 8 --threads 2 --iters 20 --json "$OUT/bench.json"
