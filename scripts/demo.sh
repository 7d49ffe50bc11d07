#!/usr/bin/env bash
# The main job: compile DeiT-Tiny to a quantized ONNX Runtime artifact with the recipe best for this CPU, then show
# it side by side with its fp32 export (accuracy, interleaved latency at batch 1 and 8, size) and write report.html.
#
# With the shared data (../shared/data beside the repository, or VITQ_SHARED_DATA): the real ImageNet weights,
# calibration on the sample set, accuracy on imagenet-val-dev650. Without it: random weights calibrated on random
# pixels, latency and size only (accuracy would be meaningless), and the table says so.
#
#   bash scripts/demo.sh                 # RECIPE=... CALIB_COUNT=... OUT=... THREADS=... override the defaults
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${VITQ_SHARED_DATA:-../shared/data}
OUT=${OUT:-build/demo}
CALIB_COUNT=${CALIB_COUNT:-64}
THREADS=${THREADS:-$(nproc)}
VITQ=.venv/bin/vitq
MODEL=deit_tiny_patch16_224
WEIGHTS=$DATA/weights/deit_tiny_patch16_224.wvfunc_matdump.pth

# w8a8 compiles as the best exact form for this CPU: full 8-bit weights with VNNI/AMX/arm64 int8 dot products,
# 7-bit weights on AVX2-only x86, where ONNX Runtime's fast int8 GEMM sums pairs of products in int16
# (docs/targets.md); the compile prints which and why.
RECIPE=${RECIPE:-w8a8}

start=$(date +%s)
if [ -f "$WEIGHTS" ] && [ -d "$DATA/imagenet-sample-eli1000" ] && [ -d "$DATA/imagenet-val-dev650" ]; then
  echo "[demo] $MODEL, real weights, recipe $RECIPE, calibration on $CALIB_COUNT images of $DATA/imagenet-sample-eli1000"
  $VITQ compile $MODEL --weights "$WEIGHTS" --calib "$DATA/imagenet-sample-eli1000" --calib-count "$CALIB_COUNT" \
      --recipe "$RECIPE" --out "$OUT" -q
  $VITQ compare "$OUT" --images "$DATA/imagenet-val-dev650" --batch 1 8 --threads "$THREADS" --for-report \
      --json "$OUT/compare.json"
else
  echo "[demo] $DATA not found: RANDOM weights, calibrated on random pixels; latency and size only" >&2
  CALIB=$OUT.random-calib
  .venv/bin/python -c "
import sys, numpy as np
from pathlib import Path
from PIL import Image
d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); rng = np.random.default_rng(0)
for i in range(16):
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(d / f'{i:02d}.png')
" "$CALIB"
  $VITQ compile $MODEL --calib "$CALIB" --calib-count 16 --recipe "$RECIPE" --out "$OUT" -q
  $VITQ compare "$OUT" --batch 1 8 --threads "$THREADS" --for-report --json "$OUT/compare.json"
fi
$VITQ report "$OUT" > /dev/null
echo "[demo] wrote $OUT/report.html ($(( $(date +%s) - start )) s in all)"
