"""A compiled artifact's quantized model side by side with its own fp32 export: accuracy, latency, size.

``vitq compare DIR [--images VAL]`` loads ``DIR/model.fp32.onnx`` and ``DIR/model.onnx`` (both written by
``vitq compile``), evaluates both on the same preprocessed batches (top-1, top-1 agreement with fp32, mean
KL(fp32 || quantized)) and times both **interleaved**: in every round each model runs ``per_round`` times back to
back (order alternating between rounds), and the ratio is the median over rounds of the two round medians. A busy
machine slows both models of a round alike, so the ratio stays meaningful where two separately timed numbers do
not. Torch-free (runtime layer only).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import __version__
from .benchmark import make_inputs, percentiles
from .data import ImageSet
from .errors import InputError
from .runtime.engine import Engine
from .table import format_table

#: CPU features that decide which int8 kernels ONNX Runtime (MLAS) picks; named next to every latency figure
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16", "asimd", "asimddp", "i8mm", "sve")


def cpu_info() -> dict[str, Any]:
    """CPU model name, logical cores and the ISA flags relevant to int8 inference (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = val.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "machine": platform.machine(),
            "flags": [f for f in ISA_FLAGS if f in flags]}


def _timed(eng: Engine, feeds: Mapping[str, np.ndarray], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        eng.run(feeds)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def interleaved_latency(engines: Mapping[str, Engine], batch: int, *, rounds: int = 7, per_round: int = 3,
                        warmup: int = 2) -> dict[str, dict[str, Any]]:
    """Time every engine in the same rounds (order rotating and alternating). The first engine is the baseline.

    Returns per engine ``{"latency_ms": percentiles of all runs, "runs", "round_medians"}`` and, for every engine
    but the baseline, ``ratio`` (median over rounds of its round median / the baseline's), ``ratio_min`` and
    ``ratio_max`` (the spread over rounds)."""
    if rounds <= 0 or per_round <= 0 or batch <= 0:
        raise InputError("batch, rounds and per_round must be positive")
    names = list(engines)
    feeds = {n: make_inputs(engines[n], batch) for n in names}
    for n in names:
        _timed(engines[n], feeds[n], warmup)
    times: dict[str, list[float]] = {n: [] for n in names}
    meds: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        order = names[k:] + names[:k]
        for n in (order if i % 2 == 0 else order[::-1]):
            t = _timed(engines[n], feeds[n], per_round)
            times[n] += t
            meds[n].append(float(np.median(t)))
    out: dict[str, dict[str, Any]] = {}
    base = np.asarray(meds[names[0]])
    for n in names:
        r: dict[str, Any] = {"latency_ms": percentiles(np.asarray(times[n])), "runs": len(times[n]),
                             "round_medians": meds[n]}
        if n != names[0]:
            ratios = np.asarray(meds[n]) / base
            r.update(ratio=float(np.median(ratios)), ratio_min=float(ratios.min()), ratio_max=float(ratios.max()))
        out[n] = r
    return out


def model_size(path: Path) -> int:
    """Bytes on disk of an ONNX model, its external-data file included."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.is_file() else 0)


def compare_artifact(directory: str | os.PathLike, *, images: ImageSet | None = None,
                     batches: tuple[int, ...] = (1, 8), threads: int | None = None, rounds: int = 7,
                     per_round: int = 3, batch_size: int = 32, progress: bool | None = None) -> dict[str, Any]:
    """Compare ``DIR/model.onnx`` with ``DIR/model.fp32.onnx``: accuracy on ``images`` (when given), interleaved
    latency at each batch size, and size on disk. Returns a ``vitq.compare/1`` dict; its ``eval`` and ``bench``
    entries are in the ``vitq eval`` / ``vitq bench`` formats (what ``vitq report`` reads)."""
    from .evaluate import evaluate

    d = Path(directory)
    fp32_path, quant_path = d / "model.fp32.onnx", d / "model.onnx"
    for p in (fp32_path, quant_path):
        if not p.is_file():
            raise InputError(f"{p} not found: vitq compare takes an artifact directory written by vitq compile")
    rep = json.loads((d / "report.json").read_text()) if (d / "report.json").is_file() else {}
    fp32 = Engine.load(fp32_path, backend="ort", threads=threads)
    quant = Engine.load(quant_path, backend="ort", threads=threads)
    recipe = rep.get("recipe") or {}
    result: dict[str, Any] = {
        "schema": "vitq.compare/1", "vitq_version": __version__, "dir": str(d),
        "model": (rep.get("model") or {}).get("name"),
        "recipe": recipe.get("name") if isinstance(recipe, dict) else recipe,
        "random_weights": bool((rep.get("weights") or {}).get("random_init", False)),
        "threads": threads, "cpu": cpu_info(),
        "size_bytes": {"fp32": model_size(fp32_path), "quant": model_size(quant_path)},
    }
    if images is not None:
        result["eval"] = evaluate(quant, images, reference=fp32, batch_size=batch_size, progress=progress)
    lat, bench = [], []
    for b in batches:
        t = interleaved_latency({"fp32": fp32, "quant": quant}, b, rounds=rounds, per_round=per_round)
        lat.append({"batch": b, "fp32_p50_ms": t["fp32"]["latency_ms"]["p50"],
                    "quant_p50_ms": t["quant"]["latency_ms"]["p50"], "ratio": t["quant"]["ratio"],
                    "ratio_min": t["quant"]["ratio_min"], "ratio_max": t["quant"]["ratio_max"],
                    "rounds": rounds, "per_round": per_round})
        for name, eng in (("fp32", fp32), ("quant", quant)):
            p50 = t[name]["latency_ms"]["p50"]
            bench.append({"schema": "vitq.bench/1", "vitq_version": __version__, "model": eng.describe(),
                          "batch": b, "warmup": 2, "iters": t[name]["runs"], "latency_ms": t[name]["latency_ms"],
                          "throughput_img_s": b * 1e3 / p50, "threads": threads,
                          "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                   "python": platform.python_version()}})
    result["latency"] = lat
    result["bench"] = {"schema": "vitq.bench-set/1", "results": bench}
    return result


def format_compare(r: dict[str, Any]) -> str:
    """One side-by-side table: fp32 | quantized | quantized vs fp32."""
    ev = r.get("eval")
    rows: list[list[Any]] = []
    if ev is not None and "top1" in ev:
        ref = ev["reference"]
        rows.append(["top-1 (%)", f"{ref['top1']:.2f}", f"{ev['top1']:.2f}", f"{ev['top1'] - ref['top1']:+.2f}"])
    if ev is not None:
        ref = ev["reference"]
        rows.append(["top-1 agreement with fp32 (%)", "100", f"{ref['agreement'] * 100:.2f}", ""])
        rows.append(["KL(fp32 || quantized), nats", "0", f"{ref['kl_mean']:.4f}", ""])
    for x in r["latency"]:
        rows.append([f"p50 latency, batch {x['batch']} (ms)", f"{x['fp32_p50_ms']:.1f}", f"{x['quant_p50_ms']:.1f}",
                     f"{x['ratio']:.2f}x ({x['ratio_min']:.2f}..{x['ratio_max']:.2f})"])
    s = r["size_bytes"]
    rows.append(["size on disk (MB)", f"{s['fp32'] / 1e6:.1f}", f"{s['quant'] / 1e6:.1f}",
                 f"{s['quant'] / s['fp32']:.2f}x"])
    cpu = r["cpu"]
    title = f"{r.get('model') or r['dir']}: fp32 vs {r.get('recipe') or 'quantized'}"
    if ev is not None:
        title += f" on {ev['images']['dir']} ({ev['n']} images)"
    lines = [format_table(rows, ["", "fp32", str(r.get("recipe") or "quantized"), "quantized vs fp32"], title=title)]
    lines.append(f"latency: ONNX Runtime, {r['threads'] or 'default'} threads, interleaved rounds (ratio: median over "
                 f"rounds, spread in brackets); CPU {cpu['model']}, {cpu['cores']} cores, "
                 f"{' '.join(cpu['flags']) or 'no int8 ISA flags'}")
    if r.get("random_weights"):
        lines.append("RANDOM weights: accuracy is meaningless, latency and size are not")
    return "\n".join(lines)
