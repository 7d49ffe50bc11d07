"""vitq's ORT CPU int8 forms against fp32 and ONNX Runtime's own ``quantize_static``, on the CPU that runs this.

    python -m bench cpu_forms [--models deit,swin] [--threads 2] [--rounds 8] [--per-round 3] [--batch 1 8]
                              [--methods percentile] [--ort NAMES] [--skip-vnni] [--gemm] [--swin-eval 256]
                              [--build build/cpu_forms]

``--gemm``: also one DeiT-Tiny-sized Q/DQ GEMM (1576 x 192 x 768) in each form against its float MatMul: exactness
(ORT fused vs unoptimized) and latency ratio; ``--models ""`` runs only that. Run with ``VITQ_SHARED_DATA`` set
when the shared data is not at ``../shared/data``.

Per model, in one process:

* fp32: the compiled artifact's verified float export (``model.fp32.onnx``).
* vitq forms (``vitq.runtime.cpu``): ``w8a8`` lowered for avx2 (``u8u8``: full-range weights U8U8), ``w7a8``
  (what ``--recipe w8a8`` means on a CPU without VNNI: 7-bit weights, U8S8; ``choose_form``), and ``w8a8`` lowered
  for vnni (``u8s8``). Each is marked exact or not on this CPU (its form's arithmetic, and measured: ORT optimized vs
  unoptimized on 4 images).
* ONNX Runtime ``quantize_static`` configurations built here from the same fp32 model and the same calibration
  images (uint8/int8 activations, per-channel int8/uint8 weights, reduce_range, QDQ/QOperator, weight GEMMs only
  or every MatMul, MinMax/Percentile/Entropy); the best by agreement and those within 1 point of it are timed.

Accuracy: top-1 agreement with fp32 (and top-1 against labels for DeiT-Tiny) on 1394 images: dev650 plus the 744
sample images outside the 256-image calibration subset (``open_image_set(sample).subset(256, seed=0)``, as
``vitq compile --calib-count 256`` picks it). Swin-T has random weights: agreement with its own fp32 on the first
``--swin-eval`` of those images, calibrated on 32. Latency: interleaved rounds (each round runs every session
``--per-round`` times, order rotating); a round's ratio is median(candidate)/median(fp32); reported: the median
ratio over rounds and its spread. The machine's CPU flags are in the result file (``machine``), one file per CPU
ISA class (``bench/results/cpu_forms_avx2.json``, ``cpu_forms_vnni.json``, ...), so each kind of CPU keeps its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import DEIT_WEIGHTS, DEV650, SAMPLE1000, cpu_info, flags_str, write_result

REPO = Path(__file__).resolve().parents[1]
MODELS = {"deit": ("deit_tiny_patch16_224", 256), "swin": ("swin_tiny_patch4_window7_224", 32)}
CALIB_SEED = 0


def _sets(calib_count: int):
    from vitq.data import ImageSet, open_image_set

    sample = open_image_set(SAMPLE1000)
    calib = sample.subset(calib_count, seed=CALIB_SEED)
    used = set(calib.files)
    keep = [i for i, f in enumerate(sample.files) if f not in used]
    held = ImageSet(sample.root, [sample.files[i] for i in keep], [sample.labels[i] for i in keep], sample.layout)
    return calib, [open_image_set(DEV650), held]


def _arrays(sets, cfg, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    from vitq.data import load_array

    key = hashlib.sha256((json.dumps(cfg.to_dict(), sort_keys=True) +
                          "".join(s.fingerprint() for s in sets)).encode()).hexdigest()[:16]
    f = cache / f"images-{key}.npz"
    if f.is_file():
        z = np.load(f)
        return z["x"], z["y"]
    xs, ys = [], []
    for s in sets:
        x, _ = load_array(s, cfg, progress=False)
        xs.append(x)
        ys.append(np.asarray(s.labels))
    x, y = np.concatenate(xs), np.concatenate(ys)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, x=x, y=y)
    return x, y


def _compile(model: str, out: Path, recipe: str, calib_count: int, cpu: str = "avx2") -> Path:
    from vitq.compiler import CompileOptions, compile_model
    from vitq.targets import get_target
    from vitq.targets.ort import OrtOptions

    if (out / "model.onnx").is_file():
        return out
    weights = DEIT_WEIGHTS if model.startswith("deit") and DEIT_WEIGHTS.is_file() else None
    print(f"[cpu_forms] compiling {model} {Path(recipe).name} --cpu {cpu} -> {out}", flush=True)
    compile_model(CompileOptions(model=model, out=out, weights=weights, calib=SAMPLE1000, calib_count=calib_count,
                                 recipe=recipe, target=get_target("ort", OrtOptions(cpu=cpu, keep_bits=True))),
                  echo=lambda s: None)
    return out


def _session(path: Path | bytes, threads: int, optimized: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path) if isinstance(path, Path) else path, so,
                                providers=["CPUExecutionProvider"])


def _predict(sess, x: np.ndarray, bs: int = 32) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + bs]})[0] for i in range(0, len(x), bs)])


def _logits(path: Path, x: np.ndarray, threads: int, cache: Path) -> np.ndarray:
    """ORT (all optimizations) logits of the model at ``path`` on ``x``, cached by the model graph's and the inputs'
    hashes (metadata does not change logits)."""
    import onnx

    g = hashlib.sha256(onnx.load(str(path)).graph.SerializeToString())
    g.update(hashlib.sha256(np.ascontiguousarray(x).data).digest())
    g.update(str(threads).encode())
    f = cache / f"logits-{g.hexdigest()[:20]}.npy"
    if f.is_file():
        return np.load(f)
    out = _predict(_session(path, threads), x)
    np.save(f, out)
    return out


def _fused_vs_plain(path: Path, x: np.ndarray, threads: int) -> float:
    """Relative L2 difference of ORT's optimized (fused int8 kernels) vs unoptimized session on ``x``."""
    a = _predict(_session(path, threads, True), x).astype(np.float64)
    b = _predict(_session(path, threads, False), x).astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ort_configs(methods: list[str]):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    U8, S8 = QuantType.QUInt8, QuantType.QInt8
    base = dict(quant_format=QuantFormat.QDQ, activation_type=U8, weight_type=S8, per_channel=True,
                reduce_range=False, calibrate_method=CalibrationMethod.MinMax, scope="weight_gemms")
    out = [("qdq_u8s8_pc_minmax", {**base}),
           ("qdq_u8s8_pc_rr_minmax", {**base, "reduce_range": True}),
           ("qdq_u8u8_pc_minmax", {**base, "weight_type": U8}),
           ("qop_u8s8_pc_rr_minmax", {**base, "quant_format": QuantFormat.QOperator, "reduce_range": True})]
    if "allmatmul" in methods:  # attention MatMuls quantized too
        out.append(("qdq_u8s8_pc_rr_minmax_allmatmul", {**base, "reduce_range": True, "scope": "all_matmul"}))
    if "s8s8" in methods:  # int8 activations (ORT turns them into uint8 on x86)
        out.append(("qdq_s8s8_pc_rr_minmax", {**base, "activation_type": S8, "reduce_range": True}))
    if "percentile" in methods:
        out.append(("qdq_u8s8_pc_rr_percentile", {**base, "reduce_range": True,
                                                  "calibrate_method": CalibrationMethod.Percentile}))
    if "entropy" in methods:
        out.append(("qdq_u8s8_pc_rr_entropy", {**base, "reduce_range": True,
                                               "calibrate_method": CalibrationMethod.Entropy}))
    return out


def _ort_quantize(fp32: Path, out: Path, xcal: np.ndarray, cfg: dict) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    m = onnx.load(str(fp32))
    src = hashlib.sha256(m.graph.SerializeToString()).hexdigest()  # the float graph (not its metadata)
    stamp = out.with_suffix(".src")
    if out.is_file() and stamp.is_file() and stamp.read_text() == src:
        return out
    inits = {i.name for i in m.graph.initializer}
    name = m.graph.input[0].name
    gemms = [n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and
             any(i in inits for i in n.input[1:2])]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(len(xcal)))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {name: xcal[i:i + 1]}

    kw = {k: v for k, v in cfg.items() if k != "scope"}
    if cfg["scope"] == "weight_gemms":
        kw["nodes_to_quantize"] = gemms
    kw["op_types_to_quantize"] = ["MatMul", "Gemm", "Conv"]
    tmp = out.with_suffix(".tmp.onnx")
    quantize_static(str(fp32), str(tmp), Reader(), extra_options={"CalibTensorRangeSymmetric": False}, **kw)
    os.replace(tmp, out)
    stamp.write_text(src)
    return out


def _timed(sess, x: np.ndarray, n: int) -> list[float]:
    name = sess.get_inputs()[0].name
    out = []
    for _ in range(n):
        t = time.perf_counter()
        sess.run(None, {name: x})
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _latency(sessions: dict, x_all: np.ndarray, batches: list[int], rounds: int, per_round: int) -> dict:
    res: dict = {}
    names = list(sessions)
    for b in batches:
        x = np.ascontiguousarray(x_all[:b])
        for s in sessions.values():
            _timed(s, x, 2)
        ratios = {n: [] for n in names}
        ms = {n: [] for n in names}
        for i in range(rounds):
            k = i % len(names)
            order = names[k:] + names[:k]
            if i % 2:
                order.reverse()
            med = {}
            for n in order:
                t = _timed(sessions[n], x, per_round)
                ms[n] += t
                med[n] = float(np.median(t))
            for n in names:
                ratios[n].append(med[n] / med["fp32"])
        for n in names:
            res.setdefault(n, {})[f"b{b}"] = {
                "p50_ms": round(float(np.median(ms[n])), 2), "ratio_median": round(float(np.median(ratios[n])), 4),
                "ratio_min": round(float(np.min(ratios[n])), 4), "ratio_max": round(float(np.max(ratios[n])), 4)}
        print(f"[cpu_forms] batch {b}: " + ", ".join(f"{n} {res[n][f'b{b}']['ratio_median']:.3f}" for n in names),
              flush=True)
    return res


def run_model(key: str, args, isa: str) -> dict:
    from vitq.runtime.cpu import choose_form, form_for, full_range_u8s8_exact
    from vitq.runtime.preprocess import PreprocessConfig

    model, calib_count = MODELS[key]
    build = args.build
    w8 = _compile(model, build / f"{key}-w8a8", "w8a8", calib_count)
    form, bits, reason = choose_form(8, isa)
    w7 = _compile(model, build / f"{key}-w7a8", "w7a8", calib_count)
    vnni = None if args.skip_vnni and bits == 7 else \
        _compile(model, build / f"{key}-w8a8-vnni", str(w8 / "recipe.json"), calib_count, cpu="vnni")
    cfg = PreprocessConfig.from_dict(json.loads((w8 / "report.json").read_text())["preprocess"])
    calib, evals = _sets(calib_count)
    x, y = _arrays(evals, cfg, build)
    xcal, _ = _arrays([calib], cfg, build)
    if key == "swin":
        x, y = x[:args.swin_eval], None
    fp32 = w8 / "model.fp32.onnx"
    here_exact = full_range_u8s8_exact(isa)
    default_name = f"vitq w8a8 default ({bits}-bit weights on {isa})"
    cands = {"fp32": {"kind": "fp32", "path": fp32},
             default_name: {"kind": "vitq", "path": (w7 if bits == 7 else vnni) / "model.onnx", "form": form,
                            "recipe": f"w{bits}a8", "cpu": isa, "reason": reason, "default": True},
             "vitq w8a8 --cpu avx2 (u8u8)": {"kind": "vitq", "path": w8 / "model.onnx", "form": "u8u8",
                                             "recipe": "w8a8", "cpu": "avx2"}}
    if bits == 7 and vnni is not None:  # the full 8-bit u8s8 form, exact only where the CPU has VNNI/AMX
        cands["vitq w8a8 --cpu vnni (u8s8)"] = {"kind": "vitq", "path": vnni / "model.onnx",
                                                "form": form_for("vnni"), "recipe": "w8a8", "cpu": "vnni"}
    if bits == 8:  # the AVX2 default (7-bit weights, u8s8: exact everywhere) next to the full 8-bit one
        cands["vitq w7a8 --cpu avx2 (7-bit weights)"] = {"kind": "vitq", "path": w7 / "model.onnx",
                                                        "form": "u8s8", "recipe": "w7a8", "cpu": "avx2",
                                                        "exact_by_form": True}
    for c in cands.values():
        if c["kind"] == "vitq":
            c.setdefault("exact_by_form", c["form"] == "u8u8" or here_exact)
    for name, cfg_q in _ort_configs(args.methods):
        if args.ort and name not in args.ort:
            continue
        path = build / f"{key}-ort-{name}.onnx"
        t = time.perf_counter()
        try:
            _ort_quantize(fp32, path, xcal, cfg_q)
        except Exception as e:  # a configuration ORT's quantizer rejects for this graph: recorded, not fatal
            cands[f"ort {name}"] = {"kind": "ort", "error": f"{type(e).__name__}: {e}"[:300]}
            continue
        cands[f"ort {name}"] = {"kind": "ort", "path": path, "config": {
            k: (v.name if hasattr(v, "name") else v) for k, v in cfg_q.items()},
            "quantize_s": round(time.perf_counter() - t, 1)}
    from vitq.evaluate import kl_per_image

    ref = ref_logits = None
    tops = {}
    for name, c in cands.items():
        if "path" not in c:
            continue
        t = time.perf_counter()
        logits = _logits(c["path"], x, args.threads, build)
        top = tops[name] = logits.argmax(1)
        if ref is None:
            ref, ref_logits = top, logits
        c["agreement"] = round(float((top == ref).mean()) * 100, 2)
        c["kl"] = round(float(kl_per_image(ref_logits, logits).mean()), 5)
        if y is not None:
            c["top1"] = round(float((top == y).mean()) * 100, 2)
        if c["kind"] != "fp32":
            c["fused_vs_unoptimized_rel_l2"] = _fused_vs_plain(c["path"], x[:4], args.threads)
        top1 = f", top-1 {c['top1']}%" if "top1" in c else ""
        print(f"[cpu_forms] {key} {name}: agreement {c['agreement']}%{top1} ({time.perf_counter() - t:.0f}s)",
              flush=True)
    ort_ok = [n for n, c in cands.items() if c["kind"] == "ort" and "agreement" in c]
    best = max(ort_ok, key=lambda n: cands[n]["agreement"]) if ort_ok else None
    timed = ["fp32", *[n for n, c in cands.items() if c["kind"] == "vitq"]]
    if best:
        near = sorted((n for n in ort_ok if cands[n]["agreement"] >= cands[best]["agreement"] - 1.0),
                      key=lambda n: -cands[n]["agreement"])[:4]
        timed += near
    lat = _latency({n: _session(cands[n]["path"], args.threads) for n in timed}, x, args.batch, args.rounds,
                   args.per_round)
    for n, v in lat.items():
        cands[n]["latency"] = v
    out = {"model": model, "weights": "real (shared data)" if key == "deit" else "random", "calib_images": calib_count,
           "eval_images": int(len(x)), "cpu_isa": isa, "ort_best_by_agreement": best,
           "candidates": {n: {k: (str(v) if isinstance(v, Path) else v) for k, v in c.items()}
                          for n, c in cands.items()}}
    if best and 8 in args.batch:
        d, o = cands[default_name], cands[best]
        from vitq.evaluate import paired_interval

        ci = paired_interval((tops[best] == ref).astype(float), (tops[default_name] == ref).astype(float))
        out["default_vs_ort_best"] = {
            "agreement": [d["agreement"], o["agreement"]],
            "agreement_diff_ci95": [ci["diff"], *ci["ci"]], "agreement_within_noise": ci["within_noise"],
            "kl": [d["kl"], o["kl"]],
            "b8_ratio": [d["latency"]["b8"]["ratio_median"], o["latency"]["b8"]["ratio_median"]],
            "beats_on_both": d["agreement"] > o["agreement"] and not ci["within_noise"] and
            d["latency"]["b8"]["ratio_median"] < o["latency"]["b8"]["ratio_median"],
            "goal_b8_ratio": 0.70 if isa in ("avx2", "avx512") else 0.60,
        }
    return out


def gemm_forms(threads: int, rounds: int, per_round: int, M: int = 8 * 197, K: int = 192, N: int = 768) -> dict:
    """One DeiT-Tiny fc1-sized Q/DQ GEMM (batch 8: 1576 x 192 x 768) in each form, interleaved with its float
    MatMul: latency ratio to float, and the fused-vs-unoptimized relative error (the form's exactness here)."""
    import onnx_ir as ir
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nph

    from vitq.passes.infra import run_passes
    from vitq.passes.lower_ort_cpu import LowerOrtCpu

    rng = np.random.default_rng(0)
    Wf = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    ws = np.abs(Wf).max(0) / 127
    models = {"float": None}
    for label, top, isa in (("u8u8 (avx2 form, 8-bit weights)", 127, "avx2"),
                            ("u8s8 7-bit weights (avx2 form of w7)", 63, "avx2"),
                            ("u8s8 8-bit weights (vnni form)", 127, "vnni")):
        W = np.clip(np.round(Wf / ws * top / 127), -top, top).astype(np.int8)
        init = [nph.from_array(W, "W"), nph.from_array((ws * 127 / top).astype(np.float32), "ws"),
                nph.from_array(np.array(0.05, np.float32), "as"), nph.from_array(np.array(0, np.int8), "az"),
                nph.from_array(np.zeros(N, np.int8), "wz")]
        nodes = [h.make_node("QuantizeLinear", ["x", "as", "az"], ["xq"]),
                 h.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"]),
                 h.make_node("DequantizeLinear", ["W", "ws", "wz"], ["Wd"], axis=1),
                 h.make_node("MatMul", ["xd", "Wd"], ["y"])]
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, M, K])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, M, N])], init)
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
        models[label] = ir.serde.serialize_model(run_passes(m, [LowerOrtCpu(isa)], properties={"qdq"}))
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "f",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, M, K])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, M, N])], [nph.from_array(Wf, "W")])
    models["float"] = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    x = (rng.standard_normal((1, M, K)) * 2).astype(np.float32)
    sess = {n: _session(m.SerializeToString(), threads) for n, m in models.items()}
    out: dict = {"shape": [M, K, N]}
    for n, m in models.items():
        if n != "float":
            a = sess[n].run(None, {"x": x})[0].astype(np.float64)
            b = _session(m.SerializeToString(), threads, False).run(None, {"x": x})[0].astype(np.float64)
            out[n] = {"fused_vs_unoptimized_rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b))}
    sess = {("fp32" if n == "float" else n): s for n, s in sess.items()}
    lat = _latency(sess, x, [1], rounds, per_round)
    for n, v in lat.items():
        out.setdefault(n, {})["ratio_to_float"] = v["b1"]
    return out


def _table(results: dict, machine: dict) -> str:
    from vitq.table import format_table

    rows = []
    for key, r in results.items():
        for n, c in r.get("candidates", {}).items():
            if "agreement" not in c:
                rows.append([key, n, "-", "-", "-", "-", "-", c.get("error", "")[:40]])
                continue
            lat = c.get("latency", {})
            rows.append([key, n, f"{c['agreement']:.2f}", f"{c['kl']:.4f}" if "kl" in c else "-",
                         f"{c['top1']:.2f}" if "top1" in c else "-",
                         f"{lat['b1']['ratio_median']:.3f}" if "b1" in lat else "-",
                         f"{lat['b8']['ratio_median']:.3f} ({lat['b8']['ratio_min']:.2f}..{lat['b8']['ratio_max']:.2f})"
                         if "b8" in lat else "-",
                         "-" if c["kind"] == "fp32" else f"{c['fused_vs_unoptimized_rel_l2']:.1e}"])
    return format_table(rows, ["model", "candidate", "agree %", "KL", "top-1 %", "b1 / fp32", "b8 / fp32 (spread)",
                               "fused vs plain"], title=f"ORT CPU int8 forms on {flags_str(machine)}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench cpu_forms", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deit,swin")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--methods", default="percentile", help="ORT configurations besides the four MinMax ones: "
                                                             "percentile, entropy, allmatmul, s8s8 (comma-separated)")
    ap.add_argument("--ort", default="", help="only these ORT configurations (comma-separated names; default all)")
    ap.add_argument("--gemm", action="store_true", help="also time one DeiT-Tiny-sized GEMM in each form")
    ap.add_argument("--skip-vnni", action="store_true", help="leave out the vnni (u8s8) form of w8a8")
    ap.add_argument("--swin-eval", type=int, default=256)
    ap.add_argument("--build", type=Path, default=REPO / "build" / "cpu_forms")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.methods = args.methods.split(",")
    args.ort = [n for n in args.ort.split(",") if n]
    if not SAMPLE1000.is_dir() or not DEV650.is_dir():
        print(f"cpu_forms: needs the shared image sets ({SAMPLE1000}, {DEV650})", file=sys.stderr)
        return 2
    from vitq.runtime.cpu import running_cpu

    isa = running_cpu().isa
    machine = cpu_info()
    results = {}
    if args.gemm:
        results["gemm"] = gemm_forms(args.threads, args.rounds, args.per_round)
        print(json.dumps(results["gemm"], indent=1))
    for key in [k for k in args.models.split(",") if k]:
        if key not in MODELS:
            print(f"cpu_forms: unknown model {key!r} (one of: {', '.join(MODELS)})", file=sys.stderr)
            return 2
        results[key] = run_model(key, args, isa)
    out = args.out or (Path(__file__).resolve().parent / "results" / f"cpu_forms_{isa}.json")
    kept = {}
    if out.is_file():  # a run of some models keeps the others' results
        prev = json.loads(out.read_text()).get("results", {}).get("models", {})
        kept = {k: v for k, v in prev.items() if k not in results}
        results = {**kept, **results}
    print(_table(results, machine))
    load = os.getloadavg()
    path = write_result("cpu_forms", {"cpu_isa": isa, "threads": args.threads, "rounds": args.rounds,
                                      "per_round": args.per_round, "loadavg_at_end": list(load),
                                      "note": "shared machine: latency as interleaved ratios to fp32",
                                      "models": results},
                        data="dev650 + 744 held-out sample images (calibration: 256 of the sample set, seed 0); "
                             "Swin-T: random weights, first --swin-eval of them, calibration 32",
                        argv=argv, out=out, merged=bool(kept))
    print(f"wrote {path}")
    return 0
