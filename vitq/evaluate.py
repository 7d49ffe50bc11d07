"""Accuracy evaluation on ONNX Runtime (or any runtime backend): top-1/top-5 against labels, and agreement, KL and
cosine against a reference model's logits. Torch-free."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from . import __version__
from .data import ImageSet, iter_batches
from .errors import DataError, InputError
from .format import SCHEMA_EVAL
from .progress import progress_bar
from .runtime.engine import Engine
from .runtime.preprocess import PreprocessConfig
from .table import format_table


def log_softmax(z) -> np.ndarray:
    """Row-wise log-softmax in float64 (``z``: [N, classes], numpy or a CPU torch tensor)."""
    if hasattr(z, "detach"):  # a torch tensor
        z = z.detach().cpu()
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_per_image(ref, logits) -> np.ndarray:
    """``KL(softmax(ref) || softmax(logits))`` per row, in nats, float64: how far a model's output distribution is
    from the reference's. The one implementation vitq uses (calibration search, evaluation, benchmarks)."""
    lp, lq = log_softmax(ref), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def kl_mean(ref, logits) -> float:
    """Mean of :func:`kl_per_image` over the rows."""
    return float(kl_per_image(ref, logits).mean())


def agreement(logits, ref) -> float:
    """Fraction of rows whose top-1 class equals the reference's."""
    return float((np.asarray(logits).argmax(1) == np.asarray(ref).argmax(1)).mean())


def top1(logits, labels) -> float:
    """Fraction of rows whose top-1 class is the label."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, kth=k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(axis=1)


def compare_logits(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Agreement of top-1, mean KL(ref || model) in nats, mean cosine similarity, max abs difference."""
    if logits.shape != ref.shape:
        raise InputError(f"logit shapes differ: {logits.shape} vs reference {ref.shape}")
    kl = kl_per_image(ref, logits)
    a, b = logits.astype(np.float64), ref.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"agreement": agreement(logits, ref), "kl_mean": float(kl.mean()),
            "cosine_mean": float(cos.mean()), "max_abs_diff": float(np.abs(a - b).max())}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"top1": float(topk_correct(logits, labels, 1).mean() * 100),
            "top5": float(topk_correct(logits, labels, 5).mean() * 100)}


def collect_logits(engines: list[Engine], images: ImageSet, cfg: PreprocessConfig, *, batch_size: int = 32,
                   skip_bad: bool = False, progress: bool | None = None, desc: str = "eval"):
    """Run every engine over the same preprocessed batches; returns ([logits per engine], labels or None)."""
    outs: list[list[np.ndarray]] = [[] for _ in engines]
    labels = []
    with progress_bar(total=len(images), desc=desc, unit="img", enable=progress) as bar:
        for x, y, _ in iter_batches(images, cfg, batch_size, skip_bad=skip_bad):
            for i, e in enumerate(engines):
                outs[i].append(np.asarray(e.run(x), dtype=np.float32))
            if y is not None:
                labels.append(y)
            bar.update(len(x))
    if not outs[0]:
        raise DataError(f"no readable images in {images.root}")
    return [np.concatenate(o) for o in outs], (np.concatenate(labels) if labels else None)


def evaluate(engine: Engine, images: ImageSet, *, reference: Engine | None = None, batch_size: int = 32,
             skip_bad: bool = False, progress: bool | None = None) -> dict[str, Any]:
    cfg = engine.preprocess
    if cfg is None:
        raise InputError(f"{engine.path} carries no preprocessing config (metadata 'vitq.preprocess'); "
                         f"compile it with vitq or pass a model exported by vitq")
    if reference is not None and reference.preprocess not in (None, cfg):
        raise InputError(f"reference {reference.path} uses different preprocessing than {engine.path}")
    t0 = time.perf_counter()
    engines = [engine] + ([reference] if reference is not None else [])
    logits, labels = collect_logits(engines, images, cfg, batch_size=batch_size, skip_bad=skip_bad,
                                    progress=progress)
    result: dict[str, Any] = {
        "schema": SCHEMA_EVAL, "vitq_version": __version__, "model": engine.describe(),
        "images": images.describe(), "n": int(len(logits[0])), "batch_size": batch_size,
    }
    if labels is not None:
        result.update(accuracy(logits[0], labels))
    if reference is not None:
        ref = {"path": str(reference.path)}
        if labels is not None:
            ref.update(accuracy(logits[1], labels))
        ref.update(compare_logits(logits[0], logits[1]))
        result["reference"] = ref
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    return result


def summarize_eval(r: dict) -> str:
    rows = []
    if "top1" in r:
        rows.append(["top-1 (%)", r["top1"], r.get("reference", {}).get("top1")])
        rows.append(["top-5 (%)", r["top5"], r.get("reference", {}).get("top5")])
    ref = r.get("reference")
    if ref:
        rows.append(["top-1 agreement (%)", ref["agreement"] * 100, None])
        rows.append(["mean KL (nats)", ref["kl_mean"], None])
        rows.append(["mean cosine", ref["cosine_mean"], None])
    title = f"{r['model']['path']} on {r['images']['dir']} ({r['n']} images, {r['elapsed_s']:.1f}s)"
    if r["images"].get("skipped"):
        title += f"; skipped {r['images']['skipped']} unreadable"
    return format_table(rows, ["metric", "model", "reference"], title=title)


def paired_interval(base: np.ndarray, cand: np.ndarray, *, boot: int = 10000, seed: int = 0,
                    level: float = 0.95) -> dict[str, Any]:
    """Mean per-image difference ``cand - base`` with a paired percentile-bootstrap interval.

    ``base`` and ``cand`` hold one value per image for the *same* images (e.g. 0/1 top-1 correctness of fp32 and of
    a quantized model); values are returned in points (x100). Resampling images, not models, is what makes the
    interval paired: an image both models get right or wrong contributes no variance. On 650 images a top-1
    difference has an interval of roughly +-1 point, so a smaller difference whose interval holds 0 is noise."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise InputError(f"paired values need two equal-length 1-D arrays, got {a.shape} and {b.shape}")
    d = (b - a) * 100.0
    rng = np.random.default_rng(seed)
    means = np.empty(boot)
    for i in range(0, boot, 1000):  # chunks keep memory flat for large sets
        n = min(1000, boot - i)
        means[i:i + n] = d[rng.integers(0, len(d), size=(n, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return {"diff": float(d.mean()), "ci": [float(lo), float(hi)], "level": level, "n": int(len(d)),
            "discordant": int((a != b).sum()), "within_noise": bool(lo <= 0.0 <= hi)}
