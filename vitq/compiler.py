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
from .errors import InputError, VerificationError
from .mixa.config import MixaConfig
from .recipe import RecipeRequest, parse_recipe_arg
from .format import ARTIFACT_FP32, ARTIFACT_MODEL, ARTIFACT_REPORT, META_TARGET, SCHEMA_REPORT
from .runtime.preprocess import PreprocessConfig
from .targets import PackageJob, Target, build_deployable, get_target, target_from_args


@dataclass
class CompileOptions:
    model: str
    out: Path
    weights: Path | None = None
    calib: Path | None = None
    calib_count: int = 256
    seed: int = 0
    recipe: str = "fp32"
    target: str | Target = "ort"  # a target name (default options), or a Target carrying its options
    skip_bad: bool = False
    verify_count: int = 8
    tolerance: float = 1e-4
    progress: bool | None = None
    mixa: MixaConfig | str | None = None  # MixA-Q: its options, or just the --mixa value (1.35x, ratios.json)
    reconstruct: int | None = None  # block reconstruction iterations per stage (vitq/quant/reconstruct.py); None: off
    act4: str = "dynamic"  # 4-bit activations: "dynamic" (run-time scales, the target's grouping) | "static"

    @classmethod
    def from_args(cls, args) -> "CompileOptions":
        """From ``vitq compile``'s argparse namespace: the target with its option group, MixA-Q's options."""
        return cls(model=args.model, out=args.out, weights=args.weights, calib=args.calib,
                   calib_count=args.calib_count, seed=args.seed, recipe=args.recipe, target=target_from_args(args),
                   skip_bad=args.skip_bad, tolerance=args.tolerance, mixa=MixaConfig.from_args(args),
                   reconstruct=args.reconstruct, act4=args.act4)


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


@dataclass
class _Job:
    """One compile: the validated request (every input error is raised before any model work), then the loaded
    model and data the steps share."""

    opts: CompileOptions
    recipe: RecipeRequest
    target: Target
    mixa: MixaConfig | None
    log: _Log
    report: dict[str, Any]
    echo: Callable[[str], None]
    lm: Any = None  # vitq.exporter.LoadedModel
    cfg: PreprocessConfig | None = None
    calib: Any = None  # vitq.data image subset, or None
    x_verify: np.ndarray | None = None
    requested: str = ""  # the --recipe name as given (``recipe`` is what the target compiles it as)
    recipe_reason: str | None = None  # why the target changed it (None: compiled as asked)


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
    """Run the compile pipeline (validate, export, calibrate, MixA-Q, lower for the target, verify, package); returns
    the report (also written to ``out/report.json``)."""
    t_start = time.perf_counter()
    job = _validate(opts, echo)
    check_writable_parent(Path(opts.out))  # fail before minutes of work
    verify_desc = _load(job)
    with atomic_output_dir(opts.out) as stage:
        _export(job, stage, verify_desc)
        if job.recipe.quantized:
            qmodel, rec, sim, layer_stats = _calibrate(job)
            if job.mixa is not None or rec.mixa is not None:  # MixA-Q (vitq/mixa/compile.py)
                from .mixa.compile import apply_mixa

                rec, sim = apply_mixa(job.mixa, rec, qmodel, sim, job.lm, job.calib, job.cfg, job.report, job.log,
                                      echo, seed=opts.seed, skip_bad=opts.skip_bad)
            rec.save(stage / "recipe.json")
            passes = _lower(job, rec, qmodel, stage)
            _verify_qdq(job, rec, qmodel, sim, stage / ARTIFACT_MODEL)
            _recipe_report(job, rec, layer_stats, passes)
        else:
            shutil.copyfile(stage / ARTIFACT_FP32, stage / ARTIFACT_MODEL)  # the deployable model is the export
            checked = job.target.check_float_graph(stage / ARTIFACT_MODEL, echo)
            if checked is not None:
                job.report["passes"] = checked
        _package(job, stage, t_start)
    return job.report


def _validate(opts: CompileOptions, echo: Callable[[str], None]) -> _Job:
    """Resolve the target, the recipe request and the MixA-Q options; raise :class:`InputError` for bad input."""
    target = get_target(opts.target)
    mixa = MixaConfig(opts.mixa) if isinstance(opts.mixa, str) else opts.mixa
    recipe: RecipeRequest = parse_recipe_arg(opts.recipe)
    if recipe.kind == "file":
        from .recipe.schema import Recipe

        Recipe.load(recipe.path)  # validate before any model work
    if opts.reconstruct and (recipe.kind == "file" or not recipe.quantized):
        raise InputError(f"--reconstruct refines a calibration; recipe {opts.recipe!r} is "
                         f"{'a recipe file (already calibrated)' if recipe.kind == 'file' else 'not quantized'}")
    if opts.act4 not in ("dynamic", "static"):
        raise InputError(f"--act4 {opts.act4!r}: expected 'dynamic' or 'static'")
    if recipe.quantized and recipe.kind != "file" and opts.calib is None:
        raise InputError(f"recipe {recipe.name!r} needs calibration images: pass --calib DIR")
    if mixa is not None:
        if not recipe.quantized:
            raise InputError(f"--mixa mixes the activation bits of a quantized recipe; recipe {opts.recipe!r} is "
                             f"not quantized")
        mixa.resolve(target)
    report: dict[str, Any] = {"schema": SCHEMA_REPORT, "vitq_version": __version__,
                              "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "target": target.name, "target_options": target.options.to_dict()}
    requested = recipe.name
    recipe, reason = target.resolve_recipe(recipe)
    if reason:
        echo(f"[vitq] --recipe {requested} on --target {target.name}: compiling {recipe.name} ({reason})")
    return _Job(opts, recipe, target, mixa, _Log(echo=echo), report, echo, requested=requested,
                recipe_reason=reason)


def _load(job: _Job) -> str:
    """Open the calibration images, load the model, start the report, decode the verification images (a corrupt
    one fails now). Returns what the verification images are."""
    from .exporter import data_config, load_model

    opts, report, echo = job.opts, job.report, job.echo
    if opts.calib is not None:  # open (and list) the image folder before minutes of model work
        from .data import open_image_set

        job.calib = open_image_set(opts.calib).subset(opts.calib_count, seed=opts.seed)
    with job.log.step(f"loading {opts.model}"):
        job.lm = lm = load_model(opts.model, opts.weights)
    if lm.weights["random_init"]:
        echo("[vitq] WARNING: no --weights given: the model has RANDOM weights; accuracy numbers are meaningless")
    job.cfg = cfg = PreprocessConfig.from_dict(data_config(lm.model))
    report["model"] = lm.describe()
    report["weights"] = lm.weights
    report["preprocess"] = cfg.to_dict()
    report["recipe"] = {"name": job.recipe.name, "kind": job.recipe.kind, "file": None, "layers": []}
    if job.recipe_reason:
        report["recipe"].update(requested=job.requested, chosen_because=job.recipe_reason)
    report["calibration"] = None
    if job.calib is not None:
        report["calibration"] = {**job.calib.describe(), "seed": opts.seed, "requested": opts.calib_count,
                                 "used": False, "note": "fp32 recipe: calibration images only verify the export"}
    report["bitops"] = None  # filled by quantized recipes: {"total", "fp32_equivalent", "ratio", "per_layer"}
    job.x_verify, verify_desc = _verification_inputs(opts, cfg)
    return verify_desc


def _export(job: _Job, stage: Path, verify_desc: str) -> None:
    """The float export (``model.fp32.onnx``), checked by the ONNX checker and against torch."""
    from .exporter import check_onnx, export_onnx, verify_against_torch
    from .exporter.onnx_export import artifact_metadata

    opts, log, lm, cfg, x_verify = job.opts, job.log, job.lm, job.cfg, job.x_verify
    fp32_path = stage / ARTIFACT_FP32
    meta = artifact_metadata(opts.model, cfg.to_dict(), lm.num_classes, job.recipe.name)
    with log.step("exporting to ONNX (opset 21, dynamic batch)"):
        export_onnx(lm.model, fp32_path, image_size=(cfg.height, cfg.width), metadata=meta)
    with log.step("verifying the export (ONNX checker, ONNX Runtime vs torch)"):
        check_onnx(fp32_path)
        ver = verify_against_torch(fp32_path, lm.model, x_verify, tolerance=opts.tolerance)
        ver["inputs"] = verify_desc
        ver["onnx_checker"] = "passed (full_check)"
    job.report["verification"] = {"export": ver}
    job.echo(f"[vitq] export verified: max |logit diff| {ver['max_abs_diff']:.2e} <= {opts.tolerance:.0e} "
             f"on {verify_desc}")


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


def _calibrate(job: _Job):
    """Calibrate the preset (MPTQ-ViT), or re-apply a recipe file. Returns ``(prepared float model, recipe,
    simulation, per-layer statistics)``."""
    from .data import load_array
    from .quant.pipeline import QuantMethods, apply_recipe, calibrate
    from .recipe.schema import Recipe

    opts, req, log, lm, calib = job.opts, job.recipe, job.log, job.lm, job.calib
    if req.kind == "file":
        rec = Recipe.load(req.path)
        if rec.model != opts.model:
            raise InputError(f"recipe file {req.path} is for model {rec.model!r}, not {opts.model!r}")
        with log.step(f"applying recipe {req.path}"):
            qmodel, sim = apply_recipe(lm.model, lm.family, rec)
        return qmodel, rec, sim, {}
    with log.step(f"reading {len(calib)} calibration images"):
        x_calib, _ = load_array(calib, job.cfg, skip_bad=opts.skip_bad, progress=opts.progress,
                                desc="calibration images")
    provenance = {"weights_sha256": lm.weights.get("sha256"), "random_init": lm.weights["random_init"],
                  "calib_sha256": calib.fingerprint(), "calib_count": int(len(x_calib)), "seed": opts.seed,
                  "vitq_version": __version__}
    with log.step(f"calibrating {req.name} (MPTQ-ViT)"):
        methods = QuantMethods(recon={"iters": int(opts.reconstruct)} if opts.reconstruct else None,
                               act4=opts.act4, act4_group=job.target.default_act_group,
                               weight_group=job.target.default_weight_group)
        res = calibrate(lm.model, lm.family, x_calib, req, model_name=opts.model, provenance=provenance,
                        progress=opts.progress if opts.progress is not None else True, methods=methods)
    cal = job.report["calibration"]
    cal["used"] = True
    cal.pop("note", None)
    cal["timings_s"] = res.timings
    return res.model, res.recipe, res.sim, res.layer_stats


def _lower(job: _Job, rec, qmodel, stage: Path) -> dict:
    """Export the prepared float model, run the target's passes, let the target check the result, and write
    ``model.onnx``. Returns the passes report."""
    import onnx

    from .exporter import export_onnx
    from .exporter.onnx_export import artifact_metadata

    opts, target, log, cfg = job.opts, job.target, job.log, job.cfg
    prepared = stage / ".prepared.onnx"
    meta = artifact_metadata(opts.model, cfg.to_dict(), job.lm.num_classes, rec.name)
    with log.step("exporting the prepared (SQ-b folded) float model"):
        export_onnx(qmodel, prepared, image_size=(cfg.height, cfg.width), metadata=meta)
    with log.step(f"graph passes for target {target.name}"):
        proto, passes = build_deployable(prepared, rec, target, sample_inputs=job.x_verify[:2])
    prepared.unlink()
    for note in target.check_lowered(passes, job.echo):
        job.echo(f"[vitq] note: {note}")
        job.report.setdefault("notes", []).append(note)
    tgt = next((p for p in proto.metadata_props if p.key == META_TARGET), None) or proto.metadata_props.add()
    tgt.key, tgt.value = META_TARGET, target.name
    onnx.save(proto, stage / ARTIFACT_MODEL)
    return passes


def _verify_qdq(job: _Job, rec, qmodel, sim, model_path: Path) -> None:
    """The deployable graph on ONNX Runtime against the torch simulation (tolerances above)."""
    import torch

    from .runtime.engine import Engine

    x_verify = job.x_verify
    with job.log.step("verifying the Q/DQ graph on ONNX Runtime against the torch simulation"):
        eng = Engine.load(model_path, backend="ort", optimization=job.target.verify_optimization())
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
    job.report["verification"]["qdq_vs_simulation"] = ver
    job.echo(f"[vitq] Q/DQ graph vs simulation: relative logit error {rel:.2e} (quantization error of the "
             f"simulation {qerr:.2e}), top-1 agreement {agree * 100:.1f}%")
    if not ver["passed"]:
        # where it departs: the teacher-forced check on the graph itself (unoptimized), quantizer by quantizer
        import onnx

        from .quant.forced import forced_check

        fc = forced_check(sim, onnx.load(str(model_path)), x_verify[:4])
        ver["forced"] = fc.summary()
        raise VerificationError(f"the Q/DQ graph disagrees with the simulation of recipe {rec.name!r}: relative "
                                f"logit error {rel:.3e} > {tol:.3e} (simulation's own quantization error {qerr:.3e}, "
                                f"float32 vs float64 simulation {cascade:.3e}); {fc.describe()}")


def _recipe_report(job: _Job, rec, layer_stats: dict, passes: dict) -> None:
    from .quant.bitops import bitops_report

    report = job.report
    report["recipe"] = {"name": rec.name, "kind": job.recipe.kind, "file": "recipe.json",
                        "defaults": rec.defaults, "layers": [
                            {"module": l.module, "kind": l.kind, "w_bits": l.weight_bits, "a_bits": l.act_bits,
                             "smooth": l.smooth is not None, "optm": l.input_regions is not None,
                             **({k: v for k, v in layer_stats.get(l.module, {}).items()
                                 if k in ("sqnr_db", "method")})}
                            for l in rec.layers]}
    if job.recipe_reason:
        report["recipe"].update(requested=job.requested, chosen_because=job.recipe_reason)
    if "__recon__" in layer_stats:
        report["recipe"]["reconstruction"] = layer_stats["__recon__"]
    report["bitops"] = bitops_report(rec)
    report["passes"] = {k: v for k, v in passes.items() if k != "trt_check_text"}


def _package(job: _Job, stage: Path, t_start: float) -> None:
    """The target's packaging, then ``report.json`` (hashes of every artifact), then what the packaging finishes
    after it."""
    report = job.report
    packaged = job.target.package(PackageJob(stage=stage, out=Path(job.opts.out), model_path=stage / ARTIFACT_MODEL,
                                             model_name=job.opts.model, recipe_name=job.recipe.name,
                                             preprocess=job.cfg.to_dict(), num_classes=job.lm.num_classes,
                                             step=job.log.step, echo=job.echo))
    report.update(packaged.report)
    report["artifacts"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                           for p in sorted(stage.iterdir()) if p.is_file() and not p.name.startswith(".")}
    report["timings_s"] = {**job.log.steps, "total": round(time.perf_counter() - t_start, 3)}
    report["resources"] = _resources()
    write_json_atomic(stage / ARTIFACT_REPORT, report)
    if packaged.finalize is not None:
        packaged.finalize(stage)


def _resources() -> dict[str, Any]:
    """Peak resident memory and CPU time of this process so far (what the compile cost), and the threads it had."""
    import os

    out: dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        out.update(peak_rss_mib=round(ru.ru_maxrss / 1024, 1), cpu_s=round(ru.ru_utime + ru.ru_stime, 1))
    except ImportError:  # not on POSIX
        pass
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return out


def summarize_report(r: dict) -> str:
    from .table import format_kv

    w = r["weights"]
    wdesc = "RANDOM (no --weights)" if w["random_init"] else f"{w['source']} (sha256 {w['sha256'][:12]})"
    rows = [["model", f"{r['model']['name']} ({r['model']['class']}, {r['model']['num_params'] / 1e6:.2f}M params)"],
            ["weights", wdesc], ["recipe", r["recipe"]["name"] + (f" (asked: {r['recipe']['requested']})"
                                                             if r["recipe"].get("requested") else "")],
            ["target", r["target"]]]
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
