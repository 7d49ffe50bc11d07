"""``vitq compile``: load a timm model, export it, (calibrate and quantize), verify, and write an artifact
directory atomically::

    DIR/model.fp32.onnx   the verified float export (reference for evaluation)
    DIR/model.onnx        the deployable model for the target
    DIR/report.json       what was done, measured and verified (schema ``vitq.report/1``)
"""

from __future__ import annotations

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
from .recipe import RecipeRequest, parse_recipe_arg
from .runtime.engine import ARTIFACT_FP32, ARTIFACT_MODEL, ARTIFACT_REPORT
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
    if recipe.quantized:
        raise UnsupportedError(f"recipe {recipe.name!r}: quantized recipes need the MPTQ-ViT calibration, which this "
                               f"build of vitq does not include yet; use --recipe fp32")
    if opts.target != "ort":
        raise UnsupportedError(f"target {opts.target!r} is not available in this build of vitq (TensorRT lowering "
                               f"and trt_check are not implemented yet); use --target ort")
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
        shutil.copyfile(fp32_path, model_path)  # fp32 recipe: the deployable model is the float export
        report["artifacts"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                               for p in (fp32_path, model_path)}
        report["timings_s"] = {**log.steps, "total": round(time.perf_counter() - t_start, 3)}
        write_json_atomic(stage / ARTIFACT_REPORT, report)
    return report


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
    rows.append(["time", f"{r['timings_s']['total']:.1f}s"])
    return format_kv([tuple(r) for r in rows])
