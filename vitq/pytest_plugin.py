"""pytest plugin: latency regression tests over vitq artifacts in a few lines.

Enabled automatically once vitq is installed (``pytest11`` entry point ``vitq.pytest_plugin``), or explicitly with
``pytest -p vitq.pytest_plugin`` / ``pytest_plugins = ["vitq.pytest_plugin"]`` in a root conftest.py::

    import pytest

    @pytest.mark.bench
    def test_deit_latency(vitq_latency):
        vitq_latency("build/deit", baseline="bench/baselines/deit_b1.json", batch=1, tolerance=0.15)

The fixture benchmarks the artifact (``repeats`` x ``iters`` timed runs, medians kept), compares it with the baseline
JSON through :mod:`vitq.regression`, and fails the test with the readable diff on a regression. A missing baseline
skips the test unless ``--vitq-update-baselines`` is given, which (re)writes baselines from the current run instead
of checking. ``--vitq-latency-tol`` overrides every test's tolerance; ``--vitq-threads`` pins ORT threads.

Benchmark tests should carry the ``bench`` marker (registered here). They are skipped unless selected (``-m bench``,
any ``-m`` expression naming bench, or ``--vitq-bench``); the project's default run also deselects them
(``-m "not slow and not bench"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("vitq", "vitq latency regression tests")
    g.addoption("--vitq-update-baselines", action="store_true", default=False,
                help="write latency baselines from this run instead of checking against them")
    g.addoption("--vitq-latency-tol", type=float, default=None,
                help="relative latency tolerance for every vitq_latency check (overrides the tests' own)")
    g.addoption("--vitq-threads", type=int, default=None, help="ONNX Runtime intra-op threads for vitq_latency")
    g.addoption("--vitq-bench", action="store_true", default=False,
                help="run tests marked `bench` (also enabled by any -m expression that names bench)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: latency benchmark (slow, machine-dependent); deselect with "
                                       "-m 'not bench'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``bench`` tests are skipped unless asked for (``-m bench`` or ``--vitq-bench``), so that a plain ``pytest``
    never runs machine-dependent latency gates by accident."""
    if config.getoption("--vitq-bench") or "bench" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="latency benchmark: run with -m bench (or --vitq-bench)")
    for item in items:
        if item.get_closest_marker("bench") is not None:
            item.add_marker(skip)


class LatencyChecker:
    """The callable behind the ``vitq_latency`` fixture; returns the :class:`vitq.regression.CheckReport`."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.reports: list[Any] = []

    def measure(self, model: str | Path, *, batch: int = 1, iters: int = 30, warmup: int = 5, repeats: int = 3,
                threads: int | None = None) -> dict:
        from .benchmark import benchmark
        from .regression import merge_repeats
        from .runtime import Engine

        threads = self.config.getoption("--vitq-threads") or threads
        eng = Engine.load(model, backend="ort", threads=threads)
        return merge_repeats([benchmark(eng, batch=batch, warmup=warmup, iters=iters, progress=False)
                              for _ in range(repeats)])

    def __call__(self, model: str | Path, *, baseline: str | Path, batch: int = 1, tolerance: float = 0.10,
                 metrics: tuple[str, ...] = ("p50", "throughput"), iters: int = 30, warmup: int = 5,
                 repeats: int = 3, threads: int | None = None, result: dict | None = None):
        from .artifacts import write_json_atomic
        from .regression import compare, load_result

        baseline = Path(baseline)
        res = result if result is not None else self.measure(model, batch=batch, iters=iters, warmup=warmup,
                                                             repeats=repeats, threads=threads)
        if self.config.getoption("--vitq-update-baselines"):
            baseline.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(baseline, res)
            return None
        if not baseline.is_file():
            pytest.skip(f"no latency baseline at {baseline}; create it with --vitq-update-baselines")
        tol = self.config.getoption("--vitq-latency-tol")
        report = compare(res, load_result(baseline), latency_tol=tolerance if tol is None else tol,
                         metrics=list(metrics), result_name=str(model), baseline_name=str(baseline))
        self.reports.append(report)
        if not report.ok:
            pytest.fail("latency regression against " + str(baseline) + "\n" + report.summary(), pytrace=False)
        return report


@pytest.fixture
def vitq_latency(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """``vitq_latency(model, baseline=PATH, batch=1, tolerance=0.10, metrics=("p50", "throughput"))``: benchmark and
    gate against a baseline JSON (see the module docstring)."""
    return LatencyChecker(request.config)
