#!/usr/bin/env bash
# The runtime-only install, checked end to end: what a device gets from `pip install .` (no extras: numpy, onnx,
# onnxruntime, Pillow, tqdm) evaluates, benches, serves and verifies the artifacts the compiler writes.
#
#   bash scripts/runtime_check.sh            # after scripts/setup.sh (the dev venv compiles the artifacts)
#
# 1. The dev venv (.venv) compiles a tiny deit_tiny_patch16_224 (64x64 input, 2 blocks, random weights, 8 synthetic
#    calibration images) through `vitq compile` as fp32, w8a8, MixA-Q (w4a8 base, explicit ratios: no search), and
#    w4a4 for --target trt (plugin nodes) and --target jetson (plugin nodes + bundle), under build/runtime_check/.
# 2. A fresh venv, build/runtime-venv (kept between runs: vitq is reinstalled, its dependencies only when
#    pyproject.toml changes), gets `pip install .`; torch, timm, onnx_ir and onnxscript must not be importable there.
# 3. From outside the checkout (so the installed package is what runs), with that venv: `vitq info`, `vitq eval`,
#    `vitq bench`, `vitq serve` + one request, `vitq bundle verify` and `Engine.load(...).run(...)` on each artifact.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
DEV=${VITQ_DEV_PYTHON:-$REPO/.venv/bin/python}
WORK=$REPO/build/runtime_check
RT=$REPO/build/runtime-venv
MODEL=deit_tiny_patch16_224
t0=$(date +%s)
say() { echo "[runtime_check $(( $(date +%s) - t0 ))s] $*"; }

rm -rf "$WORK" && mkdir -p "$WORK"
say "images"
"$DEV" - "$WORK/images" <<'EOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
root = Path(sys.argv[1]); root.mkdir(parents=True)
rng = np.random.default_rng(0)
rows = ["file,label"]
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / f"img_{i}.jpg")
    rows.append(f"img_{i}.jpg,{i % 5}")
(root / "labels.csv").write_text("\n".join(rows) + "\n")
EOF
say "compile (dev venv): fp32, w8a8, MixA-Q, w4a4 --target trt, w4a4 --target jetson"
"$DEV" - "$WORK" "$MODEL" <<'EOF'
# The compiler, unchanged, on a tiny configuration of the model (64x64 input, 2 blocks, random weights): the point is
# the artifact kinds, not accuracy, and a full DeiT-Tiny calibration takes minutes per recipe on a CI machine.
import json
import sys
from pathlib import Path

import onnx

import vitq.exporter.models as models
from vitq.cli import main
from vitq.plugins.expand import has_plugins

work, model = Path(sys.argv[1]), sys.argv[2]
_create = models.create_model


def tiny(name, **kw):
    model, family = _create(name, img_size=64, depth=2, **kw)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 64, 64)}  # what data_config reads
    return model, family


models.create_model = tiny
(work / "ratios.json").write_text(json.dumps({"blocks.0": 0.5, "blocks.1": 0.5}))
common = ["compile", model, "--calib", str(work / "images"), "--calib-count", "8", "-q"]
for name, args in (("fp32", ["--recipe", "fp32"]), ("w8a8", ["--recipe", "w8a8"]),
                   ("mixa", ["--recipe", "w4a8", "--mixa", str(work / "ratios.json")]),
                   ("trt", ["--recipe", "w4a4", "--target", "trt"]),
                   ("jetson", ["--recipe", "w4a4", "--target", "jetson"])):
    rc = main(common + ["--out", str(work / name)] + args)
    assert rc == 0, f"vitq compile {name}: exit {rc}"
for name in ("trt", "jetson"):
    assert has_plugins(onnx.load(str(work / name / "model.onnx"), load_external_data=False)), f"{name}: no plugins"
EOF

stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x "$RT/bin/python" ] || [ "$(cat "$RT/.pyproject" 2>/dev/null)" != "$stamp" ]; then
  say "fresh venv $RT"
  rm -rf "$RT"
  python3 -m venv "$RT"
  "$RT/bin/python" -m pip install -q --upgrade pip
  "$RT/bin/python" -m pip install -q "$REPO"
  echo "$stamp" > "$RT/.pyproject"
else
  say "reusing $RT (reinstalling vitq)"
  "$RT/bin/python" -m pip install -q --no-deps --force-reinstall "$REPO"
fi
rm -rf "$REPO/build/lib" "$REPO"/build/bdist.* "$REPO"/*.egg-info  # setuptools' build leftovers

cd "$(mktemp -d)"  # outside the checkout: the installed vitq runs, not the source tree
"$RT/bin/python" - <<'EOF'
import importlib.util
present = [m for m in ("torch", "timm", "torchvision", "onnx_ir", "onnxscript") if importlib.util.find_spec(m)]
assert not present, f"the runtime-only venv has compiler packages: {present}"
import vitq
assert "site-packages" in vitq.__file__, vitq.__file__
EOF
VITQ="$RT/bin/vitq"
for name in fp32 w8a8 mixa trt jetson; do
  a=$WORK/$name
  say "runtime: $name"
  "$VITQ" info "$a" > /dev/null
  "$VITQ" eval "$a" --images "$WORK/images" --batch 4 --json "$WORK/$name.eval.json" > /dev/null
  "$VITQ" bench "$a" --batch 1 --iters 3 --warmup 1 > /dev/null
  "$RT/bin/python" - "$a" <<'EOF'
import sys
import numpy as np
from vitq.runtime import Engine
eng = Engine.load(sys.argv[1])
c, h, w = eng.inputs[0].shape[1:]
y = eng.run(np.random.default_rng(0).standard_normal((2, c, h, w)).astype(np.float32))
assert y.shape == (2, 1000) and np.isfinite(y).all(), y.shape
EOF
done
say "runtime: serve (one request)"
log=$WORK/serve.log
"$VITQ" serve "$WORK/mixa" --port 0 2> "$log" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "http://" "$log" && break; sleep 0.2; done
url=$(grep -o "http://[0-9.:]*" "$log" | head -1)
[ -n "$url" ] || { cat "$log"; echo "vitq serve did not start"; exit 1; }
"$RT/bin/python" - "$url" "$WORK/images/img_0.jpg" <<'EOF'
import json, sys, urllib.request
url, img = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url + "/v1/classify?k=3", data=open(img, "rb").read(),
                             headers={"Content-Type": "image/jpeg"})
out = json.load(urllib.request.urlopen(req, timeout=60))
assert len(out["topk"]) == 3, out
EOF
kill $pid; wait $pid 2>/dev/null || true
trap - EXIT
say "runtime: bundle verify"
"$VITQ" bundle verify "$WORK/jetson"
say "OK: a runtime-only install evaluates, benches, serves and verifies fp32, w8a8, MixA-Q, trt and jetson artifacts"
