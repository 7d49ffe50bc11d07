"""The ``vitq`` command line.

    vitq compile MODEL [--weights PATH] [--calib DIR] [--recipe NAME|FILE] [--target ort|trt|jetson] --out DIR
    vitq eval DIR|MODEL.onnx|MODEL.engine --images DIR [--reference DIR|MODEL.onnx] [--backend auto|ort|trt]
    vitq bench DIR|MODEL.onnx|MODEL.engine [--batch N ...] [--threads N] [--backend auto|ort|trt]
    vitq info DIR|MODEL.onnx
    vitq compare DIR [--images DIR] [--batch 1 8] [--threads N]
    vitq bundle verify DIR
    vitq check RESULT.json --baseline BASELINE.json [--latency-tol 0.1] [--accuracy-tol 0.5]
    vitq report DIR [--eval EVAL.json ...] [--bench BENCH.json ...] [--points POINTS.json ...] [--out FILE.html]
    vitq serve DIR [--port N] [--host 127.0.0.1] [--max-batch 8] [--max-wait-ms 5] [--threads N]
    vitq export-triton DIR --out REPO [--backend onnxruntime|python|tensorrt] [--preprocess] [--instances N]

Errors caused by input print one message naming the culprit and exit non-zero (2; 3 for failed verification);
``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import VitqError
from .format import SCHEMA_BENCH_SET
from .mixa.config import MixaConfig
from .targets import add_target_args


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {v}")
        return v
    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", type=Path, help="also write the result as JSON to PATH")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="what to print on stdout (default: a readable table)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitq", description="vitq: deployment compiler for quantized vision "
                                 "transformers (timm ViT/DeiT/Swin -> Q/DQ ONNX -> ONNX Runtime / TensorRT).")
    ap.add_argument("--version", action="version", version=f"vitq {__version__}")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("compile", help="export, calibrate, quantize and verify a timm model",
                       description="Compile a timm ViT/DeiT/Swin into a verified deployable ONNX artifact directory "
                                   "(model.fp32.onnx, model.onnx, report.json), written atomically.")
    c.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224, swin_tiny_patch4_window7_224")
    c.add_argument("--weights", type=Path, help="local weights (.pth via torch.load(weights_only=True), or "
                                                ".safetensors); without it the model has random weights")
    c.add_argument("--out", required=True, type=Path, help="output artifact directory (replaced atomically)")
    c.add_argument("--tolerance", type=float, default=1e-4,
                   help="max |logit diff| allowed between ONNX Runtime and torch (default 1e-4)")
    c.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    r = c.add_argument_group("recipe and calibration")
    r.add_argument("--recipe", default="fp32", help="fp32 | w8a8 | w7a8 | w6a6 | w4a8 | w4a4 | mp:<bits> | "
                                                    "recipe.json (w7a8: 7-bit weights, exact fast int8 GEMMs on "
                                                    "ORT CPU without VNNI)")
    r.add_argument("--calib", type=Path, help="calibration image folder (labels.csv or ImageFolder layout)")
    r.add_argument("--calib-count", type=_positive_int, default=256, help="calibration images (default 256)")
    r.add_argument("--seed", type=int, default=0, help="seed for subset selection (default 0)")
    r.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    r.add_argument("--reconstruct", metavar="STEPS", type=_positive_int, nargs="?", const=200,
                   help="block-wise reconstruction after calibration: weight rounding and activation scales "
                        "fitted per transformer block, STEPS steps each (default 200; 5-15 minutes for "
                        "DeiT-Tiny on 2 cores); replaces GPTQ. Off by default")
    r.add_argument("--act4", choices=("dynamic", "static"), default="dynamic",
                   help="4-bit activations (w4a4, mp:N): dynamic scales computed at run time per group of 32 "
                        "features on --target ort and per token on TensorRT, post-softmax on a log-sqrt(2) grid "
                        "(default: DeiT-Tiny w4a4 top-1 drop 4.6 vs 14.5 points static), or static calibrated "
                        "scales")
    MixaConfig.add_args(c)
    add_target_args(c)
    c.set_defaults(func=cmd_compile)

    e = sub.add_parser("eval", help="accuracy of an artifact on a labeled image folder",
                       description="Top-1/top-5 on ONNX Runtime; with --reference also top-1 agreement, mean KL "
                                   "and cosine of logits against the reference model.")
    e.add_argument("model", type=Path, help="artifact directory, .onnx file or TensorRT .engine")
    _add_backend_arg(e)
    e.add_argument("--images", required=True, type=Path, help="image folder (labels.csv or ImageFolder layout)")
    e.add_argument("--reference", type=Path, help="reference artifact or .onnx (e.g. DIR/model.fp32.onnx)")
    e.add_argument("--count", type=_positive_int, help="evaluate a seeded subset of this many images")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=_positive_int, default=32, help="batch size (default 32)")
    e.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    e.add_argument("--skip-bad", action="store_true", help="skip unreadable images (counted in the result)")
    _add_output_args(e)
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="latency of an artifact (p50/p90/p99, throughput)",
                       description="Warm-up, then repeated timed runs on random inputs.")
    b.add_argument("model", type=Path, help="artifact directory, .onnx file or TensorRT .engine")
    _add_backend_arg(b)
    b.add_argument("--batch", type=_positive_int, nargs="+", default=[1], help="batch size(s) (default 1)")
    b.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    b.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    b.add_argument("--iters", type=_positive_int, default=50, help="timed runs (default 50)")
    b.add_argument("--min-time", type=float, default=0.0, help="keep timing until this many seconds passed")
    b.add_argument("--repeats", type=_positive_int, default=1,
                   help="repeat the whole measurement N times; the JSON keeps the medians and every repeat's "
                        "values (for noise-aware `vitq check`) (default 1)")
    _add_output_args(b)
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="describe an artifact (I/O, metadata, report summary)")
    i.add_argument("model", type=Path, help="artifact directory or .onnx file")
    i.set_defaults(func=cmd_info)
    _add_bundle_parsers(sub)
    _add_ops_parsers(sub)
    _add_report_parser(sub)
    _add_compare_parser(sub)
    return ap


def _emit(result, args, summary: str) -> None:
    if args.json:
        from .artifacts import write_json_atomic

        write_json_atomic(args.json, result)
    if args.format == "json":
        print(json.dumps(result, indent=2))
    else:
        print(summary)
        if args.json:
            print(f"wrote {args.json}")


def cmd_compile(args) -> int:
    from .compiler import CompileOptions, compile_model, summarize_report

    opts = CompileOptions.from_args(args)
    echo = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    report = compile_model(opts, echo=echo)
    print(summarize_report(report))
    extra = "".join(f", {f}" for f in opts.target.output_files(report))
    print(f"wrote {args.out}/ (model.onnx, model.fp32.onnx, report.json{extra})")
    for line in opts.target.next_steps(args.out):
        print(line)
    return 0


def cmd_eval(args) -> int:
    from .data import open_image_set
    from .evaluate import evaluate, summarize_eval
    from .runtime import Engine

    eng = Engine.load(args.model, backend=args.backend, threads=args.threads)
    ref = Engine.load(args.reference, backend="ort", threads=args.threads) if args.reference else None
    images = open_image_set(args.images).subset(args.count, seed=args.seed)
    result = evaluate(eng, images, reference=ref, batch_size=args.batch, skip_bad=args.skip_bad)
    _emit(result, args, summarize_eval(result))
    return 0


def cmd_bench(args) -> int:
    from .benchmark import benchmark, summarize_bench
    from .runtime import Engine

    eng = Engine.load(args.model, backend=args.backend, threads=args.threads)
    from .regression import merge_repeats

    results = [merge_repeats([benchmark(eng, batch=bs, warmup=args.warmup, iters=args.iters,
                                        min_time_s=args.min_time) for _ in range(args.repeats)])
               for bs in args.batch]
    out = results[0] if len(results) == 1 else {"schema": SCHEMA_BENCH_SET, "results": results}
    _emit(out, args, summarize_bench(results))
    return 0


def cmd_info(args) -> int:
    from .runtime import Engine
    from .format import ARTIFACT_REPORT

    eng = Engine.load(args.model, backend="ort")
    info = eng.describe()
    info["preprocess"] = eng.preprocess.to_dict() if eng.preprocess else None
    rep = (Path(args.model) / ARTIFACT_REPORT) if Path(args.model).is_dir() else None
    if rep and rep.is_file():
        r = json.loads(rep.read_text())
        info["report"] = {k: r.get(k) for k in ("model", "weights", "recipe", "target", "bitops", "verification")}
    print(json.dumps(info, indent=2))
    return 0


def _add_ops_parsers(sub) -> None:
    """`check`, `serve`, `export-triton` (regression gates, HTTP serving, Triton repository)."""
    k = sub.add_parser("check", help="regression gate: compare a bench/eval JSON with a baseline (exit 1 if worse)",
                       description="Compare latency (p50/p90/p99, throughput; relative tolerance; medians when the "
                                   "JSON holds --repeats) or accuracy (top-1/top-5/agreement; absolute tolerance in "
                                   "percentage points). Exit 0: no regression, 1: regression, 2: unusable input.")
    k.add_argument("result", type=Path, help="result JSON (vitq bench/eval --json)")
    k.add_argument("--baseline", required=True, type=Path, help="baseline JSON of the same kind")
    k.add_argument("--latency-tol", type=float, default=0.10,
                   help="relative latency/throughput tolerance (default 0.10 = 10%%)")
    k.add_argument("--accuracy-tol", type=float, default=0.5,
                   help="absolute accuracy tolerance in percentage points (default 0.5)")
    k.add_argument("--metrics", help="comma-separated subset: p50,p90,p99,throughput or top1,top5,agreement")
    _add_output_args(k)
    k.set_defaults(func=cmd_check)

    s = sub.add_parser("serve", help="HTTP inference server with dynamic batching (POST /v1/classify)",
                       description="Serve an artifact over HTTP: POST /v1/classify (image/jpeg, image/png, "
                                   "multipart or JSON with base64 images), GET /health, GET /metrics (Prometheus).")
    s.add_argument("model", type=Path, help="artifact directory, .onnx file or TensorRT .engine (with vitq "
                                            "preprocessing metadata)")
    _add_backend_arg(s)
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--max-batch", type=_positive_int, default=8, help="max images per engine call (default 8)")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="max wait after the first queued request before running a batch (default 5)")
    s.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    s.add_argument("--max-bytes", type=_positive_int, default=16 * 1024 * 1024,
                   help="max request body in bytes; larger gets 413 (default 16 MiB)")
    s.add_argument("--topk", type=_positive_int, default=5, help="classes per image in replies (default 5)")
    s.set_defaults(func=cmd_serve)

    t = sub.add_parser("export-triton", help="write a Triton Inference Server model repository",
                       description="Write REPO/<name>/config.pbtxt (dynamic batching, I/O from the model) and "
                                   "REPO/<name>/1/ for one Triton backend, atomically. --preprocess adds "
                                   "<name>_preprocess and the ensemble <name>_image, which take encoded images.")
    t.add_argument("model", type=Path, help="artifact directory (or .onnx file for onnxruntime/python)")
    t.add_argument("--out", required=True, type=Path, help="model repository directory")
    t.add_argument("--name", help="model name in the repository (default: the model's name)")
    t.add_argument("--backend", choices=("onnxruntime", "python", "tensorrt"),
                   help="onnxruntime: Triton's ORT backend, platform onnxruntime_onnx (default); python: "
                        "vitq.runtime in Triton's python backend (vitq's exact ORT settings); tensorrt: "
                        "platform tensorrt_plan from model.engine")
    t.add_argument("--format", dest="fmt", choices=("onnx", "plan"), help=argparse.SUPPRESS)  # older --backend
    t.add_argument("--preprocess", action="store_true",
                   help="add a preprocessing model and an ensemble that take JPEG/PNG bytes")
    t.add_argument("--max-batch", type=_positive_int,
                   help="max_batch_size (default 8; tensorrt: the engine profile's max)")
    delay = t.add_mutually_exclusive_group()
    delay.add_argument("--queue-delay-us", type=_nonneg_int,
                       help="dynamic batching max queue delay in microseconds (default 5000)")
    delay.add_argument("--max-wait-ms", type=float, help="the same in milliseconds")
    t.add_argument("--preferred-batch", type=_positive_int, nargs="+", metavar="N",
                   help="dynamic batching preferred batch sizes (default: max/2 and max; tensorrt: the profile's "
                        "opt and max)")
    t.add_argument("--instances", type=_positive_int, default=1, help="instance_group count (default 1)")
    t.add_argument("--threads", type=_positive_int,
                   help="ONNX Runtime intra-op threads per instance (python, onnxruntime)")
    t.add_argument("--gpu", action="store_true", help="instance kind KIND_GPU (default KIND_CPU for onnxruntime)")
    t.add_argument("--plugin-lib", help="TensorRT plugin library path to note in the config (LD_PRELOAD)")
    t.set_defaults(func=cmd_export_triton)


def _add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="write an HTML report (tables + plots) of a compiled artifact directory",
                       description="Read DIR/report.json (and every vitq eval/bench/points JSON found in DIR, e.g. "
                                   "DIR/eval.json, DIR/bench.json) and write a self-contained HTML report with "
                                   "the PNG plots embedded (also written beside it): per-layer bit-widths, "
                                   "per-layer SQNR, top-1 vs bit-operations. Needs matplotlib (vitq[compile]).")
    r.add_argument("dir", type=Path, help="artifact directory written by vitq compile")
    r.add_argument("--eval", dest="evals", type=Path, action="append", default=[], metavar="EVAL.json",
                   help="vitq eval --json result to include (repeatable)")
    r.add_argument("--bench", dest="benches", type=Path, action="append", default=[], metavar="BENCH.json",
                   help="vitq bench --json result to include (repeatable)")
    r.add_argument("--points", type=Path, action="append", default=[], metavar="POINTS.json",
                   help="accuracy/bit-ops points for the Pareto plot: [{label, top1, bitops_ratio|avg_bits, "
                        "kind}] or a benchmark JSON with rows (repeatable)")
    r.add_argument("--out", type=Path, help="output HTML (default DIR/report.html); PNGs go beside it")
    r.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from .report import write_report

    built, written = write_report(args.dir, out=args.out, evals=args.evals, benches=args.benches,
                                  points=args.points)
    print(built.text)
    for key, why in built.skipped_plots.items():
        print(f"no {key} plot: {why}")
    print(f"wrote {written['html']} (" + ", ".join(p.name for k, p in written.items() if k != "html") + ")")
    return 0


def _add_compare_parser(sub) -> None:
    m = sub.add_parser("compare", help="the quantized model side by side with its fp32 export (accuracy, "
                                       "interleaved latency, size)",
                       description="Evaluate DIR/model.onnx and DIR/model.fp32.onnx on the same images (top-1, "
                                   "agreement with fp32, KL) and time both in interleaved rounds (the ratio is the "
                                   "median over rounds), then print one table. Without --images: latency and size.")
    m.add_argument("dir", type=Path, help="artifact directory written by vitq compile")
    m.add_argument("--images", type=Path, help="labeled image folder to evaluate both models on")
    m.add_argument("--count", type=_positive_int, help="evaluate a seeded subset of this many images")
    m.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    m.add_argument("--threads", type=_positive_int, help="ONNX Runtime intra-op threads")
    m.add_argument("--rounds", type=_positive_int, default=7, help="interleaved rounds per batch (default 7)")
    m.add_argument("--per-round", type=_positive_int, default=3, help="runs per model per round (default 3)")
    m.add_argument("--for-report", action="store_true", help="also write DIR/eval.json and DIR/bench.json "
                   "(vitq eval / vitq bench formats), which vitq report DIR picks up")
    _add_output_args(m)
    m.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    from .artifacts import write_json_atomic
    from .compare import compare_artifact, format_compare
    from .data import open_image_set

    images = open_image_set(args.images).subset(args.count) if args.images else None
    result = compare_artifact(args.dir, images=images, batches=tuple(args.batch), threads=args.threads,
                              rounds=args.rounds, per_round=args.per_round)
    if args.for_report:
        if "eval" in result:
            write_json_atomic(args.dir / "eval.json", result["eval"])
        write_json_atomic(args.dir / "bench.json", result["bench"])
    _emit(result, args, format_compare(result))
    return 0


def cmd_check(args) -> int:
    from .regression import check_files

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    report = check_files(args.result, args.baseline, latency_tol=args.latency_tol, accuracy_tol=args.accuracy_tol,
                         metrics=metrics)
    _emit(report.to_dict(), args, report.summary())
    return 0 if report.ok else 1


def cmd_serve(args) -> int:
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          threads=args.threads, max_bytes=args.max_bytes, topk=args.topk, backend=args.backend,
          echo=lambda s: print(s, file=sys.stderr, flush=True))
    return 0


def cmd_export_triton(args) -> int:
    from .triton import export_triton

    dest = export_triton(args.model, args.out, name=args.name, backend=args.backend, fmt=args.fmt,
                         max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_delay_us=args.queue_delay_us,
                         preferred_batch=args.preferred_batch, instances=args.instances, gpu=args.gpu,
                         plugin_lib=args.plugin_lib, preprocess=args.preprocess, threads=args.threads)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest}/ ({', '.join(files)})")
    if args.preprocess:
        print(f"wrote {dest.parent / (dest.name + '_preprocess')}/ and {dest.parent / (dest.name + '_image')}/ "
              f"(the ensemble: send encoded images as {dest.name}_image input IMAGE)")
    return 0


def _add_bundle_parsers(sub) -> None:
    bd = sub.add_parser("bundle", help="Jetson deployment bundles",
                        description="Inspect a Jetson bundle written by 'vitq compile --target jetson'.")
    bsub = bd.add_subparsers(dest="bundle_command", metavar="ACTION")
    bsub.required = True
    bv = bsub.add_parser("verify", help="check a bundle's file hashes and completeness",
                         description="Re-hash every file listed in DIR/manifest.json and check that nothing is "
                                     "missing; exits 3 with the list of problems when the bundle is not intact.")
    bv.add_argument("dir", type=Path, help="bundle directory")
    bv.add_argument("--json", action="store_true", help="print the verification result as JSON")
    bv.set_defaults(func=cmd_bundle_verify)


def _add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("auto", "ort", "trt"), default="auto",
                   help="auto (default): from the artifact (.onnx: ONNX Runtime, .engine: TensorRT; a directory: its "
                        "model.engine where TensorRT imports, else model.onnx); ort; trt")


def cmd_bundle_verify(args) -> int:
    from .trt.bundle import check_bundle, verify_bundle

    if args.json:
        res = verify_bundle(args.dir)
        print(json.dumps(res, indent=2))
        return 0 if res["ok"] else 3
    res = check_bundle(args.dir)
    print(f"bundle {args.dir}: OK ({res['files_checked']} files verified; model {res['manifest']['model']})")
    if res["unlisted"]:
        print(f"  not in the manifest (created on the device?): {', '.join(res['unlisted'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except VitqError as e:
        if args.debug:
            raise
        print(f"vitq {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vitq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
