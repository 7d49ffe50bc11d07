"""``--target trt`` (an engine built here when TensorRT and a GPU are usable, else the script that builds it) and
``--target jetson`` (a hashed bundle whose engine is built on the device)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import UnsupportedError
from ..trt.common import TrtBuildOptions
from .base import PackageJob, Packaged, Target


def _stop_on_trt_errors(chk, echo: Callable[[str], None]) -> None:
    """Print the trt_check report; its errors stop the build (TensorRT would reject the graph or silently run it in
    float)."""
    echo(chk.format_text())
    if not chk.ok:
        raise UnsupportedError(f"TensorRT cannot build this graph ({len(chk.errors)} trt_check error"
                               f"{'s' if len(chk.errors) != 1 else ''}; see the report above)",
                               hint="use a recipe TensorRT supports (int8/int4 weights, int8/int4 activations) or "
                                    "--target ort")


class TrtTarget(Target):
    name = "trt"
    summary = "TensorRT engine (vitq plugin nodes for int4 activations)"
    options_type = TrtBuildOptions
    #: the QuantLinearA4 plugin's grouped mode has not run on a GPU: one grid per token unless asked
    default_act_group = 0
    #: TensorRT runs block-quantized int4 weights only in weight-only quantization (float activations), and the
    #: QuantLinearA4 plugin takes per-channel weight scales: one scale per output channel
    default_weight_group = 0

    def act_groups(self) -> tuple[int, ...]:
        from ..plugins.specs import ACT_GROUPS

        return ACT_GROUPS

    def _act_group_reason(self, ok: tuple[int, ...]) -> str:
        return f"the TensorRT plugin (QuantLinearA4) takes groups of {', '.join(map(str, ok[1:]))}"

    def base_passes(self, recipe) -> list:
        """insert_qdq -> cleanup -> lower_trt (int4-activation linears, static or dynamic per token -> vitq plugin
        nodes) -> dynamic_qdq_float (other dynamic per-token quantizers -> exact float arithmetic) ->
        clip_sub8_activations (other sub-8-bit activations -> float Clip + int8 Q/DQ, exact) -> cleanup -> trt_check
        (lint; its errors are reported, :meth:`check_lowered` decides)."""
        from ..passes.cleanup import Cleanup
        from ..passes.insert_qdq import InsertQDQ
        from ..passes.lower_trt import ClipSub8Activations, DynamicQdqFloat, LowerTrt
        from ..passes.trt_check import TrtCheck

        return [InsertQDQ(recipe), Cleanup(), LowerTrt(), DynamicQdqFloat(), ClipSub8Activations(), Cleanup(),
                TrtCheck()]

    def check_float_graph(self, model_path: Path, echo: Callable[[str], None]) -> dict:
        from ..passes.trt_check import check

        chk = check(str(model_path))
        _stop_on_trt_errors(chk, echo)
        return {"target": self.name, "trt_check": chk.to_dict()}

    def check_lowered(self, pass_report: dict, echo: Callable[[str], None]) -> list[str]:
        from ..passes.trt_check import TrtReport

        _stop_on_trt_errors(TrtReport.from_dict(pass_report["trt_check"]), echo)
        return []

    def package(self, job: PackageJob) -> Packaged:
        from ..trt.builder import build_trt_target
        from ..trt.bundle import _copy_plugins, _custom_ops, default_plugin_sources

        stage = job.stage
        plugins_dir = _copy_plugins(default_plugin_sources(), stage) if _custom_ops(job.model_path) else None
        with job.step("TensorRT engine (or the script that builds it on the target)"):
            entry = build_trt_target(job.model_path, stage, self.options, echo=job.echo, plugins_dir=plugins_dir)
        entry["plugin_sources"] = plugins_dir
        if entry.get("reason"):  # name the final folder, not the staging one
            entry["reason"] = entry["reason"].replace(f"{stage.name}/", f"{Path(job.out).name}/")
        if entry.get("engine") is None:
            job.echo(f"[vitq] {entry['reason']}")
        return Packaged({"tensorrt": entry})

    def output_files(self, report: dict) -> list[str]:
        return ["build_engine.sh"] + (["model.engine"] if (report.get("tensorrt") or {}).get("engine") else [])


class JetsonTarget(TrtTarget):
    name = "jetson"
    summary = "Jetson bundle (plugin sources, build_engine.sh, hashed manifest; engine built on the device)"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.options.check_for_jetson()  # options TensorRT does not support on Jetson: before minutes of work

    def package(self, job: PackageJob) -> Packaged:
        from ..artifacts import sha256_file
        from ..trt.bundle import default_plugin_sources, finalize_bundle, populate_bundle

        recipe_file = job.stage / "recipe.json"
        recipe_hash = sha256_file(recipe_file) if recipe_file.is_file() else f"preset:{job.recipe_name}"
        with job.step("Jetson bundle (plugin sources, build_engine.sh, manifest)"):
            manifest = populate_bundle(job.stage, job.model_path, model_name=job.model_name, recipe_hash=recipe_hash,
                                       preprocess=job.preprocess, opts=self.options, num_classes=job.num_classes,
                                       plugin_sources_dir=default_plugin_sources())
        section = {"bundle": True, "manifest": "manifest.json", "recipe_hash": recipe_hash,
                   "custom_ops": manifest["plugins"]["custom_ops"],
                   "engine": "built on the device: ./build_engine.sh (see README.md)"}
        # last: the manifest hashes every file, report.json included
        return Packaged({"jetson": section}, finalize=lambda stage: finalize_bundle(stage, manifest))

    def output_files(self, report: dict) -> list[str]:
        return ["manifest.json", "README.md", "build_engine.sh", "plugins/"]

    def next_steps(self, out: Path) -> list[str]:
        return [f"copy {out}/ to the Jetson and follow its README.md (check it with: vitq bundle verify {out})"]
