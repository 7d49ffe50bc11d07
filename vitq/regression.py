"""Regression gates: compare a latency or accuracy result JSON against a baseline and say whether it regressed.

``vitq check RESULT.json --baseline BASELINE.json`` exits 1 with a readable diff when a metric got worse by more than
its tolerance, 0 otherwise (2 for unusable input). Supported inputs:

* ``vitq.bench/1`` (one ``vitq bench`` run) and ``vitq.bench-set/1`` (several batch sizes): latency p50/p90/p99 (lower
  is better) and throughput (higher is better), compared with a *relative* tolerance. Entries are matched by batch
  size (and by model name when a set holds several models).
* ``vitq.eval/1``: top-1/top-5 (percent) and top-1 agreement with the reference (reported in percent), compared with
  an *absolute* tolerance in percentage points.

Noise: ``vitq bench --repeats N`` stores the median of each metric over N repeats (the top-level values) plus every
repeat's value under ``"repeats"``. The gate compares the medians and reports each side's spread
(``(max - min) / median``); a spread wider than the tolerance is flagged, because then the gate cannot tell noise from
a regression. Torch-free.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError
from .format import SCHEMA_BENCH as BENCH, SCHEMA_BENCH_SET as BENCH_SET
from .format import SCHEMA_CHECK as CHECK, SCHEMA_EVAL as EVAL


#: latency metric -> (path into the bench dict, True when higher is better)
LATENCY_METRICS: dict[str, tuple[tuple[str, ...], bool]] = {
    "p50": (("latency_ms", "p50"), False),
    "p90": (("latency_ms", "p90"), False),
    "p99": (("latency_ms", "p99"), False),
    "throughput": (("throughput_img_s",), True),
}
ACCURACY_METRICS = ("top1", "top5", "agreement")

DEFAULT_LATENCY_TOL = 0.10   # relative: 10 % slower (or 10 % less throughput) fails
DEFAULT_ACCURACY_TOL = 0.5   # absolute: 0.5 percentage points fails


@dataclass
class Comparison:
    """One metric of one entry: baseline vs result."""

    entry: str
    metric: str
    baseline: float
    result: float
    change: float            # relative (latency) or absolute in points (accuracy); positive = worse
    tolerance: float
    kind: str                # "relative" | "absolute"
    status: str              # "ok" | "improved" | "REGRESSED" | "MISSING"
    spread_baseline: float | None = None
    spread_result: float | None = None
    noisy: bool = False


@dataclass
class CheckReport:
    kind: str                            # "latency" | "accuracy"
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.status in ("REGRESSED", "MISSING")]

    @property
    def ok(self) -> bool:
        return not self.regressions

    def to_dict(self) -> dict:
        return {"schema": CHECK, "kind": self.kind, "ok": self.ok, "regressions": len(self.regressions),
                "comparisons": [asdict(c) for c in self.comparisons], "notes": list(self.notes)}

    def summary(self) -> str:
        from .table import format_table

        rows = []
        for c in self.comparisons:
            if c.status == "MISSING":
                rows.append([c.entry, c.metric, c.baseline, None, None, None, c.status])
                continue
            if c.kind == "relative":
                chg = f"{c.change * 100:+.1f}%"
                tol = f"{c.tolerance * 100:.1f}%"
            else:
                chg = f"{c.change:+.2f}pt"
                tol = f"{c.tolerance:.2f}pt"
            spread = _fmt_spread(c.spread_baseline, c.spread_result)
            rows.append([c.entry, c.metric, c.baseline, c.result, chg + (" (worse)" if c.change > 0 else ""),
                         tol, c.status + (" noisy" if c.noisy else "") + spread])
        title = (f"vitq check ({self.kind}): " +
                 ("OK, no regression" if self.ok else f"{len(self.regressions)} REGRESSION(S)"))
        out = format_table(rows, ["entry", "metric", "baseline", "result", "change", "tolerance", "status"],
                           title=title)
        if self.notes:
            out += "\n" + "\n".join(f"note: {n}" for n in self.notes)
        return out


def _fmt_spread(a: float | None, b: float | None) -> str:
    if a is None and b is None:
        return ""
    f = lambda v: "-" if v is None else f"{v * 100:.1f}%"  # noqa: E731
    return f" [spread {f(a)} -> {f(b)}]"


# -- loading -------------------------------------------------------------------------------------------------------
def load_result(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"result file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or data.get("schema") not in (BENCH, BENCH_SET, EVAL):
        schema = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{p}: unsupported result schema {schema!r} "
                         f"(expected {BENCH}, {BENCH_SET} or {EVAL}, as written by vitq bench/eval --json)")
    return data


def _kind(data: dict) -> str:
    return "accuracy" if data["schema"] == EVAL else "latency"


def _bench_entries(data: dict, where: str) -> dict[str, dict]:
    items = data["results"] if data["schema"] == BENCH_SET else [data]
    if not isinstance(items, list) or not items:
        raise InputError(f"{where}: {BENCH_SET} without results")
    names = {_model_name(r) for r in items}
    out: dict[str, dict] = {}
    for r in items:
        if "batch" not in r or "latency_ms" not in r:
            raise InputError(f"{where}: a bench entry lacks 'batch' or 'latency_ms'")
        key = f"batch={r['batch']}" if len(names) <= 1 else f"{_model_name(r)} batch={r['batch']}"
        if key in out:
            raise InputError(f"{where}: two entries for {key}; merge them with --repeats instead")
        out[key] = r
    return out


def _model_name(r: dict) -> str:
    m = r.get("model") or {}
    return str(m.get("model") or Path(str(m.get("path", "?"))).parent.name or m.get("path"))


def _get(d: dict, path: Iterable[str]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# -- repeats -------------------------------------------------------------------------------------------------------
def merge_repeats(runs: list[dict]) -> dict:
    """Merge several ``vitq.bench/1`` results of the same configuration into one whose top-level latency and
    throughput are the medians over the runs; each run's values are kept under ``"repeats"``."""
    if not runs:
        raise InputError("no benchmark runs to merge")
    if len(runs) == 1:
        return runs[0]
    merged = json.loads(json.dumps(runs[0]))
    lat_keys = [k for k in runs[0]["latency_ms"] if all(k in r["latency_ms"] for r in runs)]
    merged["latency_ms"] = {k: statistics.median(r["latency_ms"][k] for r in runs) for k in lat_keys}
    merged["throughput_img_s"] = statistics.median(r["throughput_img_s"] for r in runs)
    merged["iters"] = sum(r["iters"] for r in runs)
    merged["repeats"] = {"n": len(runs),
                         "latency_ms": {k: [r["latency_ms"][k] for r in runs] for k in ("p50", "p90", "p99")
                                        if k in lat_keys},
                         "throughput_img_s": [r["throughput_img_s"] for r in runs]}
    return merged


def _values(entry: dict, metric: str) -> list[float] | None:
    path, _ = LATENCY_METRICS[metric]
    rep = entry.get("repeats")
    if isinstance(rep, dict):
        vals = _get(rep, path)
        if isinstance(vals, list) and vals:
            return [float(v) for v in vals]
    return None


def spread(values: list[float] | None) -> float | None:
    """``(max - min) / median`` of repeat values; None without at least two."""
    if not values or len(values) < 2:
        return None
    med = statistics.median(values)
    return (max(values) - min(values)) / med if med else None


# -- comparing -----------------------------------------------------------------------------------------------------
def compare(result: dict, baseline: dict, *, latency_tol: float = DEFAULT_LATENCY_TOL,
            accuracy_tol: float = DEFAULT_ACCURACY_TOL, metrics: Iterable[str] | None = None,
            result_name: str = "result", baseline_name: str = "baseline") -> CheckReport:
    """Compare two loaded result dicts (see :func:`load_result`). ``metrics`` restricts the metrics checked."""
    if latency_tol < 0 or accuracy_tol < 0:
        raise InputError("tolerances must be non-negative")
    kr, kb = _kind(result), _kind(baseline)
    if kr != kb:
        raise InputError(f"cannot compare a {kr} result ({result_name}) with a {kb} baseline ({baseline_name})")
    chosen = list(metrics) if metrics else None
    if kr == "latency":
        unknown = [m for m in chosen or () if m not in LATENCY_METRICS]
        if unknown:
            raise InputError(f"unknown latency metric(s) {unknown}; choose from {list(LATENCY_METRICS)}")
        return _compare_latency(result, baseline, latency_tol, chosen or list(LATENCY_METRICS),
                                result_name, baseline_name)
    unknown = [m for m in chosen or () if m not in ACCURACY_METRICS]
    if unknown:
        raise InputError(f"unknown accuracy metric(s) {unknown}; choose from {list(ACCURACY_METRICS)}")
    return _compare_accuracy(result, baseline, accuracy_tol, chosen, result_name)


def _compare_latency(result, baseline, tol, metrics, result_name, baseline_name) -> CheckReport:
    rep = CheckReport("latency")
    res = _bench_entries(result, result_name)
    base = _bench_entries(baseline, baseline_name)
    for key, b in base.items():
        r = res.get(key)
        for m in metrics:
            path, higher_better = LATENCY_METRICS[m]
            bv = _get(b, path)
            if bv is None:
                continue
            if r is None or _get(r, path) is None:
                rep.comparisons.append(Comparison(key, m, float(bv), float("nan"), float("nan"), tol, "relative",
                                                  "MISSING"))
                continue
            rv = float(_get(r, path))
            bv = float(bv)
            if bv <= 0:
                raise InputError(f"{baseline_name}: {key} {m} is {bv}, not a usable baseline")
            change = (bv - rv) / bv if higher_better else (rv - bv) / bv
            sb, sr = spread(_values(b, m)), spread(_values(r, m))
            status = "REGRESSED" if change > tol + 1e-12 else ("improved" if change < -tol else "ok")
            noisy = any(s is not None and s > tol for s in (sb, sr))
            rep.comparisons.append(Comparison(key, m, bv, rv, change, tol, "relative", status, sb, sr, noisy))
    extra = sorted(set(res) - set(base))
    if extra:
        rep.notes.append(f"not in the baseline (not checked): {', '.join(extra)}")
    if any(c.noisy for c in rep.comparisons):
        rep.notes.append("a repeat spread exceeds the tolerance: the gate cannot separate noise from regressions "
                         "there; use more --repeats/--iters, pin --threads, or loosen --latency-tol")
    if not any("repeats" in e for e in list(res.values()) + list(base.values())):
        rep.notes.append("single runs compared (no repeat spread); `vitq bench --repeats N` makes the gate "
                         "noise-aware")
    host_b, host_r = _host(baseline), _host(result)
    if host_b and host_r and host_b != host_r:
        rep.notes.append(f"different hosts: baseline {host_b}, result {host_r}")
    return rep


def _host(data: dict) -> str | None:
    first = data["results"][0] if data.get("schema") == BENCH_SET and data.get("results") else data
    h = first.get("host") or {}
    if not h:
        return None
    return f"{h.get('machine')}/{h.get('cpus')}cpu threads={first.get('threads')}"


def _accuracy_values(d: dict) -> dict[str, float]:
    out = {}
    for k in ("top1", "top5"):
        if isinstance(d.get(k), (int, float)):
            out[k] = float(d[k])
    agr = _get(d, ("reference", "agreement"))
    if isinstance(agr, (int, float)):
        out["agreement"] = float(agr) * 100.0
    return out


def _compare_accuracy(result, baseline, tol, metrics, result_name) -> CheckReport:
    rep = CheckReport("accuracy")
    rv, bv = _accuracy_values(result), _accuracy_values(baseline)
    names = metrics or [m for m in ACCURACY_METRICS if m in bv]
    if not names:
        raise InputError("the baseline has no accuracy metric to check (top1, top5, reference.agreement)")
    for m in names:
        if m not in bv:
            rep.notes.append(f"{m}: not in the baseline (not checked)")
            continue
        if m not in rv:
            rep.comparisons.append(Comparison("eval", m, bv[m], float("nan"), float("nan"), tol, "absolute",
                                              "MISSING"))
            continue
        change = bv[m] - rv[m]
        status = "REGRESSED" if change > tol + 1e-12 else ("improved" if change < -tol else "ok")
        rep.comparisons.append(Comparison("eval", m, bv[m], rv[m], change, tol, "absolute", status))
    nb, nr = baseline.get("n"), result.get("n")
    if nb is not None and nr is not None and nb != nr:
        rep.notes.append(f"different image counts: baseline n={nb}, result n={nr}")
    db, dr = _get(baseline, ("images", "dir")), _get(result, ("images", "dir"))
    if db and dr and Path(str(db)).name != Path(str(dr)).name:
        rep.notes.append(f"different image folders: baseline {db}, result {dr}")
    return rep


def check_files(result_path: str | os.PathLike, baseline_path: str | os.PathLike, **kw: Any) -> CheckReport:
    return compare(load_result(result_path), load_result(baseline_path), result_name=str(result_path),
                   baseline_name=str(baseline_path), **kw)
