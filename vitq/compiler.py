"""``vitq compile``: load a timm model, export it, (calibrate and quantize), verify, and write an artifact
directory atomically::

    DIR/model.fp32.onnx   the verified float export (reference for evaluation)
    DIR/model.onnx        the deployable model for the target
    DIR/report.json       what was done, measured and verified (schema ``vitq.report/1``)
"""

from __future__ import annotations

import copy

import datetime as _dt
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .artifacts import atomic_output_dir, check_writable_parent, sha256_file, write_json_atomic
from .errors import InputError, UnsupportedError
from .plugins.specs import ACT_GROUPS
from .recipe import RecipeRequest, parse_recipe_arg
from .runtime.engine import ARTIFACT_FP32, ARTIFACT_MODEL, ARTIFACT_REPORT, META_TARGET
from .runtime.preprocess import PreprocessConfig

TARGETS = ("ort", "trt", "jetson")


@dataclass
class CompileOptions:
    model: str
    out: Path
    weights: Path | None = None
    calib: Path | None = None
    calib_count: int = 256
    seed: int = 0
    recipe: str = "fp32"
    target: str = "ort"
    skip_bad: bool = False
    verify_count: int = 8
    tolerance: float = 1e-4
    progress: bool | None = None
    trt: Any = None  # vitq.trt.common.TrtBuildOptions for --target trt|jetson (None: defaults)
    mixa: str | None = None        # MixA-Q: "1.35x" (target reduction) or a ratios .json (vitq/mixa/compile.py)
    mixa_bits: str | None = None   # "8/4", "fp32/8"
    mixa_group: str | None = None  # ViT token group, "2x2"
    mixa_routed: str | None = None  # "linear+attn" (default) | "linear"
    # MixA-Q low branch; None: vitq.mixa.compile.low_branch_defaults (4 low bits: dynamic, groups of 32 on ort, log)
    mixa_low_quant: str | None = None  # "static" (the paper's) | "dynamic" (per-token low-branch activations)
    mixa_low_group: int | None = None  # dynamic low branch: one grid per this many features of a token (0: per token)
    mixa_low_softmax: str | None = None  # dynamic low branch's post-softmax grid: "uniform" | "log"
    reconstruct: int | None = None  # block reconstruction iterations per stage (vitq/quant/reconstruct.py); None: off


@dataclass
class _Log:
    steps: dict[str, float] = field(default_factory=dict)
    echo: Callable[[str], None] = print

    def step(self, name: str):
        log = self

        class _Step:
            def __enter__(self):
                log.echo(f"[vitq] {name} ...")
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                log.steps[name] = round(time.perf_counter() - self.t, 3)

        return _Step()


def _verification_inputs(opts: CompileOptions, cfg: PreprocessConfig) -> tuple[np.ndarray, str]:
    """Real images for export verification: the first ``verify_count`` of the calibration set, else a seeded batch
    of synthetic images pushed through the model's own preprocessing (so value ranges are realistic)."""
    from PIL import Image

    from .data import load_array, open_image_set
    from .runtime.preprocess import preprocess_batch

    if opts.calib is not None:
        images = open_image_set(opts.calib).subset(opts.verify_count, seed=opts.seed)
        x, _ = load_array(images, cfg, skip_bad=opts.skip_bad)
        return x, f"{len(x)} calibration images from {opts.calib}"
    rng = np.random.default_rng(opts.seed)
    imgs = [Image.fromarray(rng.integers(0, 256, (cfg.height + 32, cfg.width + 48, 3), dtype=np.uint8))
            for _ in range(opts.verify_count)]
    return preprocess_batch(imgs, cfg), f"{opts.verify_count} synthetic random-pixel images (no --calib given)"


def compile_model(opts: CompileOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the compile pipeline; returns the report (also written to ``out/report.json``)."""
    from .exporter import check_onnx, data_config, export_onnx, load_model, verify_against_torch
    from .exporter.onnx_export import artifact_metadata

    t_start = time.perf_counter()
    if opts.target not in TARGETS:
        raise InputError(f"unknown target {opts.target!r} (expected one of: {', '.join(TARGETS)})")
    recipe: RecipeRequest = parse_recipe_arg(opts.recipe)
    if recipe.kind == "file":
        from .recipe.schema import Recipe

        Recipe.load(recipe.path)  # validate before any model work
    if opts.reconstruct and (recipe.kind == "file" or not recipe.quantized):
        raise InputError(f"--reconstruct refines a calibration; recipe {opts.recipe!r} is "
                         f"{'a recipe file (already calibrated)' if recipe.kind == 'file' else 'not quantized'}")
    if recipe.quantized and recipe.kind != "file" and opts.calib is None:
        raise InputError(f"recipe {recipe.name!r} needs calibration images: pass --calib DIR")
    for flag, val in (("--mixa-low-quant", opts.mixa_low_quant), ("--mixa-low-group", opts.mixa_low_group),
                      ("--mixa-low-softmax", opts.mixa_low_softmax)):
        if val is not None and opts.mixa is None:
            raise InputError(f"{flag} needs --mixa (a recipe file's mixa section already fixes its quantizers)")
    if opts.mixa_low_quant is not None and opts.mixa_low_quant not in ("static", "dynamic"):
        raise InputError(f"--mixa-low-quant {opts.mixa_low_quant!r}: expected static or dynamic")
    if opts.mixa_low_group is not None:
        if opts.mixa_low_quant == "static":
            raise InputError("--mixa-low-group needs the dynamic low branch (groups split a token's dynamic grid): "
                             "drop --mixa-low-quant static")
        if opts.mixa_low_group == 1 or opts.mixa_low_group < 0:
            raise InputError(f"--mixa-low-group {opts.mixa_low_group}: expected a group size >= 2 (e.g. 32), or 0 "
                             f"for one grid per token")
        if opts.target != "ort" and opts.mixa_low_group not in ACT_GROUPS:
            raise InputError(f"--mixa-low-group {opts.mixa_low_group} with --target {opts.target}: the TensorRT "
                             f"plugin (QuantLinearA4) takes groups of {', '.join(map(str, ACT_GROUPS[1:]))}")
    if opts.mixa_low_softmax is not None:
        if opts.mixa_low_softmax not in ("uniform", "log"):
            raise InputError(f"--mixa-low-softmax {opts.mixa_low_softmax!r}: expected uniform or log")
        if opts.mixa_low_quant == "static":
            raise InputError("--mixa-low-softmax needs the dynamic low branch (the grid is per query row, computed "
                             "at run time): drop --mixa-low-quant static")
    trt_opts = None
    if opts.target != "ort":
        from .trt.common import TrtBuildOptions

        trt_opts = opts.trt if opts.trt is not None else TrtBuildOptions()
    check_writable_parent(Path(opts.out))  # fail before minutes of work
    log = _Log(echo=echo)
    report: dict[str, Any] = {"schema": "vitq.report/1", "vitq_version": __version__,
                              "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "target": opts.target}
    calib = None
    if opts.calib is not None:  # open (and list) the image folder before minutes of model work
        from .data import open_image_set

        calib = open_image_set(opts.calib).subset(opts.calib_count, seed=opts.seed)
    with log.step(f"loading {opts.model}"):
        lm = load_model(opts.model, opts.weights)
    if lm.weights["random_init"]:
        echo("[vitq] WARNING: no --weights given: the model has RANDOM weights; accuracy numbers are meaningless")
    cfg_dict = data_config(lm.model)
    cfg = PreprocessConfig.from_dict(cfg_dict)
    report["model"] = lm.describe()
    report["weights"] = lm.weights
    report["preprocess"] = cfg.to_dict()
    report["recipe"] = {"name": recipe.name, "kind": recipe.kind, "file": None, "layers": []}
    report["calibration"] = None
    if calib is not None:
        report["calibration"] = {**calib.describe(), "seed": opts.seed, "requested": opts.calib_count,
                                 "used": False, "note": "fp32 recipe: calibration images only verify the export"}
    report["bitops"] = None  # filled by quantized recipes: {"total", "fp32_equivalent", "ratio", "per_layer"}
    x_verify, verify_desc = _verification_inputs(opts, cfg)  # decodes images now: a corrupt one fails early

    with atomic_output_dir(opts.out) as stage:
        fp32_path = stage / ARTIFACT_FP32
        meta = artifact_metadata(opts.model, cfg.to_dict(), lm.num_classes, recipe.name)
        with log.step("exporting to ONNX (opset 21, dynamic batch)"):
            export_onnx(lm.model, fp32_path, image_size=(cfg.height, cfg.width), metadata=meta)
        with log.step("verifying the export (ONNX checker, ONNX Runtime vs torch)"):
            check_onnx(fp32_path)
            ver = verify_against_torch(fp32_path, lm.model, x_verify, tolerance=opts.tolerance)
            ver["inputs"] = where = verify_desc
            ver["onnx_checker"] = "passed (full_check)"
        report["verification"] = {"export": ver}
        echo(f"[vitq] export verified: max |logit diff| {ver['max_abs_diff']:.2e} <= {opts.tolerance:.0e} "
             f"on {where}")
        model_path = stage / ARTIFACT_MODEL
        if recipe.quantized:
            _quantize(opts, recipe, lm, calib, cfg, x_verify, stage, report, log, echo)
        else:
            shutil.copyfile(fp32_path, model_path)  # fp32 recipe: the deployable model is the float export
            if opts.target != "ort":
                from .passes.trt_check import check

                chk = check(str(model_path))
                report["passes"] = {"target": opts.target, "trt_check": chk.to_dict()}
                _stop_on_trt_errors(chk, echo)
        bundle_manifest = None
        if opts.target == "trt":
            from .trt.builder import build_trt_target
            from .trt.bundle import _copy_plugins, _custom_ops, default_plugin_sources

            plugins_dir = _copy_plugins(default_plugin_sources(), stage) if _custom_ops(model_path) else None
            with log.step("TensorRT engine (or the script that builds it on the target)"):
                report["tensorrt"] = build_trt_target(model_path, stage, trt_opts, echo=echo, plugins_dir=plugins_dir)
            report["tensorrt"]["plugin_sources"] = plugins_dir
            if report["tensorrt"].get("reason"):  # name the final folder, not the staging one
                report["tensorrt"]["reason"] = report["tensorrt"]["reason"].replace(f"{stage.name}/",
                                                                                    f"{Path(opts.out).name}/")
            if report["tensorrt"].get("engine") is None:
                echo(f"[vitq] {report['tensorrt']['reason']}")
        elif opts.target == "jetson":
            from .trt.bundle import default_plugin_sources, populate_bundle

            recipe_file = stage / "recipe.json"
            recipe_hash = sha256_file(recipe_file) if recipe_file.is_file() else f"preset:{recipe.name}"
            with log.step("Jetson bundle (plugin sources, build_engine.sh, manifest)"):
                bundle_manifest = populate_bundle(stage, model_path, model_name=opts.model, recipe_hash=recipe_hash,
                                                  preprocess=cfg.to_dict(), opts=trt_opts,
                                                  num_classes=lm.num_classes,
                                                  plugin_sources_dir=default_plugin_sources())
            report["jetson"] = {"bundle": True, "manifest": "manifest.json", "recipe_hash": recipe_hash,
                                "custom_ops": bundle_manifest["plugins"]["custom_ops"],
                                "engine": "built on the device: ./build_engine.sh (see README.md)"}
        report["artifacts"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                               for p in sorted(stage.iterdir()) if p.is_file() and not p.name.startswith(".")}
        report["timings_s"] = {**log.steps, "total": round(time.perf_counter() - t_start, 3)}
        write_json_atomic(stage / ARTIFACT_REPORT, report)
        if bundle_manifest is not None:
            from .trt.bundle import finalize_bundle

            finalize_bundle(stage, bundle_manifest)  # last: hashes every file, report.json included
    return report


def _stop_on_trt_errors(chk, echo) -> None:
    """``--target trt|jetson``: print the trt_check report; its errors stop the build (TensorRT would reject the
    graph or silently run it in float)."""
    echo(chk.format_text())
    if not chk.ok:
        raise UnsupportedError(f"TensorRT cannot build this graph ({len(chk.errors)} trt_check error"
                               f"{'s' if len(chk.errors) != 1 else ''}; see the report above)",
                               hint="use a recipe TensorRT supports (int8/int4 weights, int8/int4 activations) or "
                                    "--target ort")


#: The Q/DQ graph on ONNX Runtime and the torch simulation compute the same quantizers (each Q/DQ pair equals
#: ``functional.fake_quant`` bit for bit; single layers agree to 1e-5..1e-4 relative). Over a whole network they still
#: drift apart: different float kernels upstream of a quantizer (LayerNorm, GELU, softmax, summation order) move a
#: few values across a rounding boundary, and a one-step flip perturbs every later quantizer's input, so flips
#: cascade. The compile check therefore asks that the deployed graph stays well inside the quantization error
#: itself: relative logit error vs the simulation <= max(SIM_REL_FRACTION x (simulation vs float model),
#: SIM_REL_FLOOR). This catches gross mismatches (a wrong scale, a missing or misplaced quantizer); top-1 agreement
#: on a real evaluation set is the stronger check (``python -m bench accuracy``). Measured: DeiT-Tiny real weights
#: w8a8, 4.9e-2 vs a quantization error of 1.4e-1; random weights on random pixels, 6.1e-2 vs 2.7e-2.
SIM_REL_FRACTION = 0.5
#: ... and no tighter than the simulation agrees with itself: the float32 simulation vs its float64 evaluation (the
#: recipe's exact function) shows the cascade level of the recipe; flip-sensitive recipes (many 4-bit layers: mp:5,
#: w4a4 on DeiT-Tiny) reach the quantization error itself there (dev650: float32 vs float64 simulation agree on
#: 94% / 88% of the images). The graph must stay within CASCADE_FACTOR x that.
CASCADE_FACTOR = 2.0
SIM_REL_FLOOR = 0.1


def _quantize(opts, req, lm, calib, cfg, x_verify, stage: Path, report: dict, log: _Log, echo) -> None:
    """Calibrate (or re-apply a recipe file), export the prepared float model, run the target's graph passes and
    verify the deployable Q/DQ graph against the torch simulation."""
    import torch

    from .data import load_array
    from .exporter import export_onnx
    from .exporter.onnx_export import artifact_metadata
    from .passes.lower_ort_cpu import ort_u8u8_hint
    from .passes.pipeline import build_deployable
    from .quant.bitops import bitops_report
    from .quant.pipeline import apply_recipe, calibrate
    from .recipe.schema import Recipe
    from .runtime.engine import Engine

    layer_stats: dict = {}
    if req.kind == "file":
        rec = Recipe.load(req.path)
        if rec.model != opts.model:
            raise InputError(f"recipe file {req.path} is for model {rec.model!r}, not {opts.model!r}")
        with log.step(f"applying recipe {req.path}"):
            qmodel, sim = apply_recipe(lm.model, lm.family, rec)
    else:
        with log.step(f"reading {len(calib)} calibration images"):
            x_calib, _ = load_array(calib, cfg, skip_bad=opts.skip_bad, progress=opts.progress,
                                    desc="calibration images")
        provenance = {"weights_sha256": lm.weights.get("sha256"), "random_init": lm.weights["random_init"],
                      "calib_sha256": calib.fingerprint(), "calib_count": int(len(x_calib)), "seed": opts.seed,
                      "vitq_version": __import__("vitq").__version__}
        with log.step(f"calibrating {req.name} (MPTQ-ViT)"):
            methods = {"recon": {"iters": int(opts.reconstruct)}} if opts.reconstruct else None
            res = calibrate(lm.model, lm.family, x_calib, req, model_name=opts.model, provenance=provenance,
                            progress=opts.progress if opts.progress is not None else True, methods=methods)
        qmodel, rec, sim, layer_stats = res.model, res.recipe, res.sim, res.layer_stats
        report["calibration"]["used"] = True
        report["calibration"].pop("note", None)
        report["calibration"]["timings_s"] = res.timings
    if opts.mixa is not None or rec.mixa is not None:  # MixA-Q (vitq/mixa/compile.py)
        from .mixa.compile import apply_mixa

        rec, sim = apply_mixa(opts, rec, qmodel, sim, lm, calib, cfg, report, log, echo)
    rec.save(stage / "recipe.json")
    prepared = stage / ".prepared.onnx"
    meta = artifact_metadata(opts.model, cfg.to_dict(), lm.num_classes, rec.name)
    with log.step("exporting the prepared (SQ-b folded) float model"):
        export_onnx(qmodel, prepared, image_size=(cfg.height, cfg.width), metadata=meta)
    with log.step(f"graph passes for target {opts.target}"):
        proto, passes = build_deployable(prepared, rec, opts.target, sample_inputs=x_verify[:2])
    prepared.unlink()
    hint = ort_u8u8_hint(passes)
    if hint:
        echo(f"[vitq] note: {hint}")
        report.setdefault("notes", []).append(hint)
    import onnx

    tgt = next((p for p in proto.metadata_props if p.key == META_TARGET), None) or proto.metadata_props.add()
    tgt.key, tgt.value = META_TARGET, opts.target
    if opts.target != "ort":
        from .passes.trt_check import TrtReport

        _stop_on_trt_errors(TrtReport.from_dict(passes["trt_check"]), echo)
    onnx.save(proto, stage / ARTIFACT_MODEL)
    with log.step("verifying the Q/DQ graph on ONNX Runtime against the torch simulation"):
        eng = Engine.load(stage / ARTIFACT_MODEL, backend="ort")
        got = eng.run(x_verify).astype(np.float64)
        with torch.no_grad():
            ref = sim(torch.from_numpy(x_verify)).numpy().astype(np.float64)
            flt = qmodel(torch.from_numpy(x_verify)).numpy().astype(np.float64)
            ref64 = copy.deepcopy(sim).astype(torch.float64)(torch.from_numpy(x_verify)).numpy()
        rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
        qerr = float(np.linalg.norm(ref - flt) / max(np.linalg.norm(flt), 1e-30))
        cascade = float(np.linalg.norm(ref - ref64) / max(np.linalg.norm(ref64), 1e-30))
        tol = max(SIM_REL_FRACTION * qerr, SIM_REL_FLOOR, CASCADE_FACTOR * cascade)
        agree = float((got.argmax(1) == ref.argmax(1)).mean())
        ver = {"rel_l2_error": rel, "max_abs_diff": float(np.abs(got - ref).max()), "top1_agreement": agree,
               "sim_vs_float_rel_l2": qerr, "sim_float32_vs_float64_rel_l2": cascade,
               "qdq_vs_float64_sim_rel_l2": float(np.linalg.norm(got - ref64) / max(np.linalg.norm(ref64), 1e-30)),
               "tolerance_rel_l2": tol, "n": int(len(x_verify)),
               "passed": rel <= tol}
    report["verification"]["qdq_vs_simulation"] = ver
    echo(f"[vitq] Q/DQ graph vs simulation: relative logit error {rel:.2e} (quantization error of the simulation "
         f"{qerr:.2e}), top-1 agreement {agree * 100:.1f}%")
    if not ver["passed"]:
        from .errors import VerificationError

        raise VerificationError(f"the Q/DQ graph disagrees with the simulation of recipe {rec.name!r}: relative "
                                f"logit error {rel:.3e} > {tol:.3e} (simulation's own quantization error {qerr:.3e}, "
                                f"float32 vs float64 simulation {cascade:.3e})")
    report["recipe"] = {"name": rec.name, "kind": req.kind, "file": "recipe.json",
                        "defaults": rec.defaults, "layers": [
                            {"module": l.module, "kind": l.kind, "w_bits": l.weight_bits, "a_bits": l.act_bits,
                             "smooth": l.smooth is not None, "optm": l.input_regions is not None,
                             **({k: v for k, v in layer_stats.get(l.module, {}).items()
                                 if k in ("sqnr_db", "method")})}
                            for l in rec.layers]}
    if "__recon__" in layer_stats:
        report["recipe"]["reconstruction"] = layer_stats["__recon__"]
    report["bitops"] = bitops_report(rec)
    report["passes"] = {k: v for k, v in passes.items() if k != "trt_check_text"}


def summarize_report(r: dict) -> str:
    from .table import format_kv

    w = r["weights"]
    wdesc = "RANDOM (no --weights)" if w["random_init"] else f"{w['source']} (sha256 {w['sha256'][:12]})"
    rows = [["model", f"{r['model']['name']} ({r['model']['class']}, {r['model']['num_params'] / 1e6:.2f}M params)"],
            ["weights", wdesc], ["recipe", r["recipe"]["name"]], ["target", r["target"]]]
    ver = r.get("verification", {}).get("export")
    if ver:
        rows.append(["export check", f"max |logit diff| {ver['max_abs_diff']:.2e} (tol {ver['tolerance']:.0e}), "
                                     f"top-1 agreement {ver['top1_agreement'] * 100:.1f}%"])
    if r.get("bitops"):
        rows.append(["bit-ops", f"{r['bitops']['ratio']:.3f}x of fp32"])
    if r.get("mixa"):
        mx = r["mixa"]
        rows.append(["MixA-Q", f"{mx['bitops_reduction']:.3f}x fewer bit-ops than uniform {mx['base']} (high a"
                               f"{mx['high_bits']} / low a{mx['low_bits']}"
                               f"{' dynamic per token' if mx.get('low_quant') == 'dynamic' else ''}, {mx['scheme']} {mx['group'][0]}x"
                               f"{mx['group'][1]})"])
    q = (r.get("verification") or {}).get("qdq_vs_simulation")
    if q:
        rows.append(["Q/DQ vs sim", f"rel logit error {q['rel_l2_error']:.2e} (tol {q['tolerance_rel_l2']:.2e}), "
                                    f"top-1 agreement {q['top1_agreement'] * 100:.1f}% on {q['n']} images"])
    chk = (r.get("passes") or {}).get("trt_check")
    if chk:
        plug = sum(p.get("stats", {}).get("plugin_nodes", 0) for p in (r.get("passes") or {}).get("passes", []))
        rows.append(["trt_check", f"{'ok' if chk['ok'] else 'FAILED'}: {len(chk['errors'])} errors, "
                                  f"{len(chk['warnings'])} warnings; {plug} plugin node(s)"])
    if r.get("tensorrt"):
        e = r["tensorrt"]
        rows.append(["TensorRT", f"engine {e['engine']}" if e.get("engine") else
                     f"no engine here; build on the target with {e['build_script']}"])
    if r.get("jetson"):
        rows.append(["Jetson bundle", "manifest.json + README.md (engine built on the device)"])
    rows.append(["time", f"{r['timings_s']['total']:.1f}s"])
    return format_kv([tuple(r) for r in rows])
