#!/usr/bin/env bash
# Regenerate the committed regression baselines for DeiT-Tiny on ONNX Runtime CPU, through the vitq CLI only:
#
#   bench/baselines/deit_tiny_fp32_ort_eval.json    vitq eval  (imagenet-val-dev650, 650 images; top-1/top-5)
#   bench/baselines/deit_tiny_w8a8_ort_eval.json    vitq eval  (same images, --reference the fp32 export:
#                                                              top-1/top-5 + top-1 agreement, KL, cosine)
#   bench/baselines/deit_tiny_fp32_ort_bench.json   vitq bench (batch 1 and 8, 2 ORT threads, REPEATS x ITERS runs;
#   bench/baselines/deit_tiny_w8a8_ort_bench.json              medians kept, every repeat stored for the spread)
#
# Steps: (1) `vitq compile deit_tiny_patch16_224` with the real weights, recipes fp32 and w8a8 (w8a8 calibrated on
# CALIB_COUNT images of imagenet-sample-eli1000, seed 0), into build/baselines/deit_tiny_{fp32,w8a8}; an existing
# artifact there is reused when REUSE=1. (2) `vitq eval` of both on imagenet-val-dev650. (3) `vitq bench` of both.
#
# Usage (from anywhere; run the latency part on a QUIET machine: nothing else running, the numbers are the gate):
#
#   bash bench/make_baselines.sh            # everything: compile, eval, bench
#   bash bench/make_baselines.sh eval       # compile + eval only (accuracy baselines are machine-independent)
#   bash bench/make_baselines.sh bench      # compile + bench only
#   SHARED=/path/to/shared/data REPEATS=5 ITERS=50 THREADS=2 CALIB_COUNT=16 REUSE=1 bash bench/make_baselines.sh
#
# Then gate a new run with e.g.
#   vitq bench build/deit_w8a8 --batch 1 8 --threads 2 --repeats 5 --json /tmp/b.json
#   vitq check /tmp/b.json --baseline bench/baselines/deit_tiny_w8a8_ort_bench.json --latency-tol 0.15
#   vitq eval build/deit_w8a8 --images ../shared/data/imagenet-val-dev650 \
#       --reference build/deit_w8a8/model.fp32.onnx --json /tmp/e.json
#   vitq check /tmp/e.json --baseline bench/baselines/deit_tiny_w8a8_ort_eval.json
#
# Needs ../shared/data (weights/deit_tiny_patch16_224.wvfunc_matdump.pth, imagenet-sample-eli1000,
# imagenet-val-dev650). Every output JSON is written atomically by the CLI (--json).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
WHAT="${1:-all}"
case "$WHAT" in all|eval|bench) ;; *) echo "usage: $0 [all|eval|bench]" >&2; exit 2 ;; esac

SHARED="${SHARED:-../shared/data}"
VITQ="${VITQ:-$REPO/.venv/bin/vitq}"
[ -x "$VITQ" ] || VITQ="vitq"
WEIGHTS="$SHARED/weights/deit_tiny_patch16_224.wvfunc_matdump.pth"
CALIB="$SHARED/imagenet-sample-eli1000"
VAL="$SHARED/imagenet-val-dev650"
CALIB_COUNT="${CALIB_COUNT:-16}"
REPEATS="${REPEATS:-5}"
ITERS="${ITERS:-50}"
WARMUP="${WARMUP:-10}"
THREADS="${THREADS:-2}"
REUSE="${REUSE:-0}"
OUTDIR=bench/baselines
BUILD=build/baselines

for p in "$WEIGHTS" "$CALIB" "$VAL"; do
  [ -e "$p" ] || { echo "make_baselines: missing $p (set SHARED=...)" >&2; exit 2; }
done
mkdir -p "$OUTDIR" "$BUILD"

compile() {  # $1 = recipe
  local out="$BUILD/deit_tiny_$1"
  if [ "$REUSE" = 1 ] && [ -f "$out/report.json" ] && [ -f "$out/model.onnx" ]; then
    echo "== reusing $out"
    return
  fi
  echo "== vitq compile deit_tiny_patch16_224 --recipe $1 -> $out"
  "$VITQ" compile deit_tiny_patch16_224 --weights "$WEIGHTS" --calib "$CALIB" --calib-count "$CALIB_COUNT" \
    --seed 0 --recipe "$1" --target ort --out "$out" -q
}

for r in fp32 w8a8; do
  compile "$r"
  art="$BUILD/deit_tiny_$r"
  if [ "$WHAT" != bench ]; then
    ref=()
    [ "$r" = fp32 ] || ref=(--reference "$art/model.fp32.onnx")
    echo "== vitq eval $art on $VAL"
    "$VITQ" eval "$art" --images "$VAL" "${ref[@]}" --threads "$THREADS" --json "$OUTDIR/deit_tiny_${r}_ort_eval.json"
  fi
  if [ "$WHAT" != eval ]; then
    echo "== vitq bench $art (batch 1 8, $THREADS threads, $REPEATS x $ITERS runs)"
    "$VITQ" bench "$art" --batch 1 8 --threads "$THREADS" --warmup "$WARMUP" --iters "$ITERS" \
      --repeats "$REPEATS" --json "$OUTDIR/deit_tiny_${r}_ort_bench.json"
  fi
done
echo "== baselines in $OUTDIR:"
ls -l "$OUTDIR"/deit_tiny_*_ort_*.json
