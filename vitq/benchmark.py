"""Latency benchmark of a runtime engine: warm-up, repeated timed runs, percentiles and throughput. Torch-free."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np

from . import __version__
from .errors import InputError
from .format import SCHEMA_BENCH
from .progress import progress_bar
from .runtime.engine import Engine


def percentiles(ms: np.ndarray) -> dict[str, float]:
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max()), "std": float(ms.std())}


def make_inputs(engine: Engine, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in engine.inputs:
        shape = [batch] + [d if isinstance(d, int) and d > 0 else 1 for d in t.shape[1:]]
        feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feeds


def benchmark(engine: Engine, *, batch: int = 1, warmup: int = 10, iters: int = 50, min_time_s: float = 0.0,
              progress: bool | None = None) -> dict[str, Any]:
    """Time ``engine.run`` on random inputs of batch ``batch``. Runs at least ``iters`` timed iterations and keeps
    going until ``min_time_s`` has passed."""
    if batch <= 0 or iters <= 0 or warmup < 0:
        raise InputError("batch and iters must be positive, warmup non-negative")
    feeds = make_inputs(engine, batch)
    for _ in range(warmup):
        engine.run(feeds)
    times = []
    t_start = time.perf_counter()
    with progress_bar(total=iters, desc=f"bench b={batch}", unit="run", enable=progress) as bar:
        while len(times) < iters or time.perf_counter() - t_start < min_time_s:
            t0 = time.perf_counter()
            engine.run(feeds)
            times.append((time.perf_counter() - t0) * 1e3)
            bar.update(1)
    ms = np.asarray(times)
    lat = percentiles(ms)
    return {
        "schema": SCHEMA_BENCH, "vitq_version": __version__, "model": engine.describe(), "batch": batch,
        "warmup": warmup, "iters": len(times), "latency_ms": lat,
        "throughput_img_s": batch * 1e3 / lat["p50"],
        "threads": getattr(engine._b, "threads", None),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "runtime": _runtime_versions(engine.backend)},
    }


def _runtime_versions(backend: str) -> dict[str, str]:
    if backend == "ort":
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}
    return {}


def summarize_bench(results: list[dict]) -> str:
    from .table import format_table

    rows = [[r["model"]["path"], r["batch"], r["iters"], r["latency_ms"]["p50"], r["latency_ms"]["p90"],
             r["latency_ms"]["p99"], r["throughput_img_s"]] for r in results]
    return format_table(rows, ["model", "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "img/s"])
