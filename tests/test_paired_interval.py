"""vitq.evaluate.paired_interval on synthetic per-image correctness: point estimate, interval and the noise verdict;
and the seeded input perturbation of ``python -m bench accuracy --realizations``."""

from __future__ import annotations

import numpy as np
import pytest

from vitq.errors import InputError
from vitq.evaluate import paired_interval


def _case(n=1000, flips=0, fixes=0, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    base = labels.copy()
    base[:100] = (labels[:100] + 1) % 5  # the base is wrong on 10%
    cand = base.copy()
    cand[200:200 + flips] = (cand[200:200 + flips] + 2) % 5  # the candidate breaks `flips` correct images
    cand[:fixes] = labels[:fixes]  # and gets `fixes` of the base's errors right
    return base == labels, cand == labels


def test_identical_predictions_give_a_zero_interval():
    a, b = _case()
    r = paired_interval(a, b, boot=500)
    assert r["diff"] == 0 and r["ci"] == [0.0, 0.0] and r["discordant"] == 0 and r["within_noise"]


def test_a_clear_regression_is_settled():
    a, b = _case(flips=50)  # 5 points worse
    r = paired_interval(a, b, boot=2000)
    assert abs(r["diff"] + 5.0) < 1e-9 and r["ci"][1] < -3 and not r["within_noise"] and r["discordant"] == 50


def test_small_differences_are_noise():
    a, b = _case(flips=6, fixes=3)  # 0.3 points on 1000 images, 9 discordant images
    r = paired_interval(a, b, boot=2000)
    assert abs(r["diff"] + 0.3) < 1e-9 and r["discordant"] == 9
    assert r["ci"][0] < 0.0 < r["ci"][1] and r["within_noise"] and r["n"] == 1000


def test_paired_interval_is_seeded_and_checks_shapes():
    a, b = _case(flips=10)
    assert paired_interval(a, b, boot=300, seed=3) == paired_interval(a, b, boot=300, seed=3)
    with pytest.raises(InputError):
        paired_interval(a, b[:-1])


def test_realization_perturbation_is_seeded_and_tiny():
    from bench.accuracy import perturbed

    x = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    assert perturbed(x, 1e-4, 0, 0) is x  # realization 0 is the plain evaluation
    a, b = perturbed(x, 1e-4, 1, 0), perturbed(x, 1e-4, 1, 0)
    assert np.array_equal(a, b) and not np.array_equal(a, perturbed(x, 1e-4, 2, 0))
    assert not np.array_equal(a, perturbed(x, 1e-4, 1, 4))  # another image offset, another draw
    rel = np.abs((a - x) / x).max()
    assert 0 < rel < 1e-3
