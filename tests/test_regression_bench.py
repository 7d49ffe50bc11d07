"""Latency regression test over the real DeiT-tiny artifact, written with the vitq pytest plugin (`vitq_latency`).

Marked ``bench``: deselected by the default run (-m "not slow and not bench"); run with ``pytest -m bench``.
Refresh the baseline on the reference machine with ``pytest -m bench --vitq-update-baselines``.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEIT = REPO / "build" / "deit"


@pytest.mark.bench
def test_deit_tiny_latency_b1(vitq_latency):
    if not (DEIT / "model.onnx").is_file():
        pytest.skip(f"no artifact at {DEIT} (vitq compile deit_tiny_patch16_224 ... --out build/deit)")
    vitq_latency(DEIT, baseline=REPO / "bench" / "baselines" / "deit_tiny_b1_latency.json", batch=1,
                 tolerance=0.25, metrics=("p50", "throughput"), iters=30, repeats=3, threads=2)
