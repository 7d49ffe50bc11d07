"""``vitq report DIR``: a self-contained HTML report of a compile, with plots.

Inputs:

* ``DIR/report.json`` (schema ``vitq.report/1``, written by ``vitq compile``): required.
* ``DIR/recipe.json``: noted when present (the per-layer numbers come from report.json).
* Evaluation and latency results: every ``DIR/*.json`` whose ``schema`` is ``vitq.eval/1``, ``vitq.bench/1``,
  ``vitq.bench-set/1`` or ``vitq.points/1`` is picked up (convention: ``vitq eval DIR ... --reference
  DIR/model.fp32.onnx --json DIR/eval.json`` and ``vitq bench DIR ... --json DIR/bench.json``), plus the files given
  with ``--eval``, ``--bench`` and ``--points``.
* Pareto points (``--points``), in any of these shapes:

  - a list of points, or ``{"schema": "vitq.points/1", "points": [...]}``, each point
    ``{"label": str, "top1": float, "kind": "uniform"|"mp"|"mixa"|"prune"|..., and one of
    "bitops_ratio" (bit-operations relative to uniform W8A8), "bitops_ratio_vs_w8a8" (the same),
    "bitops_ratio_vs_fp32", "avg_bits" (uniform-equivalent bit-width: ratio vs W8A8 = avg_bits^2 / 64)}``;
  - a benchmark JSON with ``"rows"`` (``config``/``top1``/``avg_bits``/``bitops_ratio_vs_w8a8``;
    the kind is ``uniform`` for ``wXaY``, ``mp`` for ``mp:...`` and ``ablation`` for anything else) or with
    ``"points"`` (read as above). A top-level ``fp32_top1`` becomes the fp32 reference line.

Outputs (atomically written): ``OUT`` (default ``DIR/report.html``) with the PNGs embedded as base64 data URIs, and
the same PNGs beside it: ``<stem>_bits.png`` (per-layer weight/activation bit-widths), ``<stem>_sqnr.png``
(per-layer SQNR) and ``<stem>_pareto.png`` (top-1 vs bit-operations); a plot without data is left out and the HTML
says why. ``matplotlib`` (headless, Agg) is needed: it comes with ``vitq[compile]``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import InputError, UnsupportedError
from .format import (ARTIFACT_FP32, ARTIFACT_RECIPE, ARTIFACT_REPORT, SCHEMA_BENCH, SCHEMA_BENCH_SET,
                     SCHEMA_EVAL as EVAL_SCHEMA, SCHEMA_POINTS as POINTS_SCHEMA, SCHEMA_REPORT as REPORT_SCHEMA)

BENCH_SCHEMAS = (SCHEMA_BENCH, SCHEMA_BENCH_SET)

#: plot style per point kind: (marker, colour, legend label)
KIND_STYLE = {
    "uniform": ("o", "#1f77b4", "uniform precision"),
    "mp": ("s", "#2ca02c", "mixed precision (Greedy MP)"),
    "mixa": ("^", "#d62728", "MixA-Q"),
    "prune": ("X", "#9467bd", "token pruning"),
    "ablation": ("d", "#8c8c8c", "ablation"),
}
OTHER_STYLE = ("P", "#e377c2", None)


# -- small helpers ---------------------------------------------------------------------------------------------------
from .artifacts import write_bytes_atomic  # noqa: E402  (re-exported for callers of vitq.report)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _get(d: Any, *path: str) -> Any:
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _read_json(p: Path, what: str) -> Any:
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{what} {p} is not readable JSON: {e}") from None


# -- loading ---------------------------------------------------------------------------------------------------------
@dataclass
class ReportInputs:
    dir: Path
    report: dict
    recipe_file: Path | None = None
    evals: list[tuple[Path, dict]] = field(default_factory=list)
    benches: list[tuple[Path, dict]] = field(default_factory=list)
    points: list[dict] = field(default_factory=list)
    points_fp32_top1: float | None = None
    notes: list[str] = field(default_factory=list)


def load_inputs(directory: str | os.PathLike, *, evals: Iterable[str | os.PathLike] = (),
                benches: Iterable[str | os.PathLike] = (), points: Iterable[str | os.PathLike] = (),
                discover: bool = True) -> ReportInputs:
    """Read ``DIR/report.json`` and the eval/bench/points JSON (found in DIR and/or given explicitly)."""
    d = Path(directory)
    if not d.exists():
        raise InputError(f"artifact directory not found: {d}")
    if not d.is_dir():
        raise InputError(f"{d} is not a directory (expected an artifact directory written by vitq compile)")
    rp = d / ARTIFACT_REPORT
    if not rp.is_file():
        raise InputError(f"no compile report in {d}: {rp} not found",
                         hint="vitq report reads the directory written by `vitq compile ... --out DIR`")
    report = _read_json(rp, "compile report")
    if not isinstance(report, dict) or report.get("schema") != REPORT_SCHEMA:
        schema = report.get("schema") if isinstance(report, dict) else type(report).__name__
        raise InputError(f"{rp}: unsupported report schema {schema!r} (expected {REPORT_SCHEMA!r})")
    for key in ("model", "recipe"):
        if not isinstance(report.get(key), dict):
            raise InputError(f"{rp}: malformed report: {key!r} is missing or not an object")
    inp = ReportInputs(d, report, d / ARTIFACT_RECIPE if (d / ARTIFACT_RECIPE).is_file() else None)
    explicit = {Path(p).resolve() for p in [*evals, *benches, *points]}
    if discover:
        for p in sorted(d.glob("*.json")):
            if p.name in (ARTIFACT_REPORT, ARTIFACT_RECIPE) or p.resolve() in explicit:
                continue
            try:
                data = json.loads(p.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                inp.notes.append(f"skipped {p.name}: not readable JSON")
                continue
            schema = data.get("schema") if isinstance(data, dict) else None
            if schema == EVAL_SCHEMA:
                inp.evals.append((p, data))
            elif schema in BENCH_SCHEMAS:
                inp.benches.append((p, data))
            elif schema == POINTS_SCHEMA:
                _add_points(inp, p, data)
    for p in evals:
        p = Path(p)
        data = _read_json(p, "eval result")
        if not isinstance(data, dict) or data.get("schema") != EVAL_SCHEMA:
            raise InputError(f"{p}: not a `vitq eval --json` result (schema {EVAL_SCHEMA!r})")
        inp.evals.append((p, data))
    for p in benches:
        p = Path(p)
        data = _read_json(p, "bench result")
        if not isinstance(data, dict) or data.get("schema") not in BENCH_SCHEMAS:
            raise InputError(f"{p}: not a `vitq bench --json` result (schema {' or '.join(BENCH_SCHEMAS)})")
        inp.benches.append((p, data))
    for p in points:
        p = Path(p)
        _add_points(inp, p, _read_json(p, "points file"))
    return inp


def _add_points(inp: ReportInputs, path: Path, data: Any) -> None:
    pts, fp32, skipped = normalize_points(data, str(path))
    inp.points.extend(pts)
    if fp32 is not None and inp.points_fp32_top1 is None:
        inp.points_fp32_top1 = fp32
    if skipped:
        inp.notes.append(f"{path.name}: skipped {len(skipped)} point(s) without top1 and bit-ops: "
                         + ", ".join(skipped[:6]) + (" ..." if len(skipped) > 6 else ""))


def _kind_of(label: str) -> str:
    if re.fullmatch(r"w\d+a\d+", label):
        return "uniform"
    if label.startswith("mp:") and " " not in label:
        return "mp"
    return "ablation"


def normalize_points(data: Any, where: str = "points") -> tuple[list[dict], float | None, list[str]]:
    """Points in any accepted shape (see the module doc) -> ``([{label, kind, top1, x}], fp32_top1, skipped)``
    where ``x`` is bit-operations relative to uniform W8A8."""
    fp32 = None
    rows: Any
    from_rows = False
    if isinstance(data, list):
        rows = data
    elif isinstance(data, dict) and isinstance(data.get("points"), list):
        rows = data["points"]
        fp32 = _num(data.get("fp32_top1"))
    elif isinstance(data, dict) and isinstance(data.get("rows"), list):
        rows, from_rows = data["rows"], True
        fp32 = _num(data.get("fp32_top1"))
    else:
        raise InputError(f"{where}: not a points file (expected a list of points, {{\"points\": [...]}} or a "
                         f"benchmark JSON with \"rows\")")
    out, skipped = [], []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"{where}: point {i} is not an object")
        label = str(r.get("label") or r.get("config") or r.get("name") or f"#{i}")
        kind = str(r.get("kind") or (_kind_of(label) if from_rows else "other"))
        top1 = _num(r.get("top1"))
        x = _num(r.get("bitops_ratio", r.get("bitops_ratio_vs_w8a8")))
        if x is None and _num(r.get("bitops_ratio_vs_fp32")) is not None:
            x = _num(r["bitops_ratio_vs_fp32"]) * 16.0
        if x is None and _num(r.get("avg_bits")) is not None:
            x = _num(r["avg_bits"]) ** 2 / 64.0
        if top1 is None or x is None:
            skipped.append(label)
            continue
        out.append({"label": label, "kind": kind, "top1": top1, "x": x})
    return out, fp32, skipped


# -- derived numbers -------------------------------------------------------------------------------------------------
def layer_sqnr(layer: dict) -> float | None:
    """The SQNR (dB) of a layer at its chosen bits: ``sqnr`` (a number) when present, else ``sqnr_db``: a number or
    a dict keyed ``w{w}a{a}`` (``a{a}`` for attention) holding every calibrated bit-width's value."""
    if _num(layer.get("sqnr")) is not None:
        return _num(layer["sqnr"])
    s = layer.get("sqnr_db")
    if isinstance(s, dict):
        w, a = layer.get("w_bits"), layer.get("a_bits")
        key = f"a{a}" if w is None else f"w{w}a{a}"
        if key in s:
            return _num(s[key])
        vals = [v for v in s.values() if _num(v) is not None]
        return _num(vals[0]) if len(vals) == 1 else None
    return _num(s)


def bitops_vs_w8a8(bitops: dict | None) -> float | None:
    if not isinstance(bitops, dict):
        return None
    if bitops.get("base") == "w8a8" and _num(bitops.get("ratio_vs_base")) is not None:
        return float(bitops["ratio_vs_base"])
    r = _num(bitops.get("ratio"))
    return r * 16.0 if r is not None else None


def _is_fp32_model(path: Any) -> bool:
    return Path(str(path or "")).name == ARTIFACT_FP32


def accuracy_summary(inp: ReportInputs) -> dict:
    """``{"model": eval dict of the deployed model | None, "fp32_top1", "fp32_top5", "source"}``."""
    main = next((e for _, e in inp.evals if not _is_fp32_model(_get(e, "model", "path"))), None)
    fp32_eval = next((e for _, e in inp.evals if _is_fp32_model(_get(e, "model", "path"))), None)
    fp1 = fp5 = None
    src = None
    if main is not None and _num(_get(main, "reference", "top1")) is not None:
        fp1, fp5, src = _num(main["reference"]["top1"]), _num(main["reference"].get("top5")), "eval reference"
    elif fp32_eval is not None and _num(fp32_eval.get("top1")) is not None:
        fp1, fp5, src = _num(fp32_eval["top1"]), _num(fp32_eval.get("top5")), "fp32 eval"
    elif _get(inp.report, "recipe", "name") == "fp32" and main is not None:
        fp1, fp5, src = _num(main.get("top1")), _num(main.get("top5")), "this model (fp32 recipe)"
    elif inp.points_fp32_top1 is not None:
        fp1, src = inp.points_fp32_top1, "points file"
    return {"model": main, "fp32_top1": fp1, "fp32_top5": fp5, "source": src}


def _bench_entries(data: dict) -> list[dict]:
    if data.get("schema") == SCHEMA_BENCH_SET:
        return [r for r in data.get("results") or [] if isinstance(r, dict)]
    return [data]


def _spread(entry: dict) -> float | None:
    vals = _get(entry, "repeats", "latency_ms", "p50")
    if isinstance(vals, list) and len(vals) >= 2:
        s = sorted(float(v) for v in vals)
        med = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        return (s[-1] - s[0]) / med if med else None
    return None


# -- plots -----------------------------------------------------------------------------------------------------------
def _mpl():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedError("vitq report needs matplotlib for its plots",
                               hint="pip install 'vitq[compile]' (or matplotlib==3.11.2)") from None
    return Figure, FigureCanvasAgg


def _png(fig) -> bytes:
    _, Canvas = _mpl()
    Canvas(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _short(module: str) -> str:
    return module.replace("blocks.", "b").replace("layers.", "L")


def _block_of(module: str) -> str:
    m = re.match(r"((?:layers\.\d+\.)?blocks\.\d+)", module)
    return m.group(1) if m else module


def _shade_blocks(ax, layers: list[dict]) -> None:
    """Alternate a light background per transformer block (rows grouped by block)."""
    start, cur, band = 0, None, 0
    for i, l in enumerate(layers + [{"module": "\0"}]):
        b = _block_of(l["module"])
        if cur is not None and b != cur:
            if band % 2:
                ax.axhspan(start - 0.5, i - 0.5, color="#f0f0f0", zorder=0)
            band += 1
            start = i
        cur = b


def plot_bits(layers: list[dict], title: str) -> bytes:
    """Horizontal grouped bars: weight and activation bits per layer (top to bottom in network order)."""
    Figure, _ = _mpl()
    n = len(layers)
    fig = Figure(figsize=(8.5, max(3.0, 0.24 * n + 1.6)), layout="constrained")
    ax = fig.add_subplot(111)
    ys = list(range(n))
    h = 0.38
    wb = [l.get("w_bits") or 0 for l in layers]
    ab = [l.get("a_bits") or 0 for l in layers]
    _shade_blocks(ax, layers)
    ax.barh([y - h / 2 for y in ys], wb, height=h, color="#1f77b4", label="weight bits", zorder=2)
    ax.barh([y + h / 2 for y in ys], ab, height=h, color="#ff7f0e", label="activation bits", zorder=2)
    top = max([8] + wb + ab)
    for y, l in enumerate(layers):
        if l.get("w_bits") is None:
            ax.text(0.1, y - h / 2, "no weights (q/k/attn/v)", va="center", fontsize=6.5, color="#555", zorder=3)
        else:
            ax.text(l["w_bits"] + 0.08, y - h / 2, str(l["w_bits"]), va="center", fontsize=6.5, zorder=3)
        if l.get("a_bits") is not None:
            ax.text(l["a_bits"] + 0.08, y + h / 2, str(l["a_bits"]), va="center", fontsize=6.5, zorder=3)
    ax.set_yticks(ys)
    ax.set_yticklabels([_short(l["module"]) for l in layers], fontsize=7.5)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, top + 1)
    ax.set_xticks(range(0, top + 1, 2 if top > 8 else 1))
    ax.set_xlabel("bits")
    ax.grid(axis="x", color="#ddd", zorder=1)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_sqnr(layers: list[dict], title: str) -> bytes:
    Figure, _ = _mpl()
    n = len(layers)
    fig = Figure(figsize=(8.5, max(3.0, 0.2 * n + 1.6)), layout="constrained")
    ax = fig.add_subplot(111)
    colours = {"attn": "#d62728", "conv": "#9467bd"}
    vals = [layer_sqnr(l) for l in layers]
    _shade_blocks(ax, layers)
    for y, (l, v) in enumerate(zip(layers, vals)):
        if v is None:
            ax.text(0.3, y, "n/a", va="center", fontsize=6.5, color="#777")
            continue
        c = colours.get(l.get("kind"), "#2ca02c" if l.get("optm") else "#1f77b4")
        ax.barh(y, v, height=0.7, color=c, zorder=2)
        ax.text(v + 0.3, y, f"{v:.1f}", va="center", fontsize=6.5, zorder=3)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{_short(l['module'])}  " + (f"w{l['w_bits']}" if l.get("w_bits") else "")
                        + f"a{l.get('a_bits') or '-'}" for l in layers], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    good = [v for v in vals if v is not None]
    ax.set_xlim(min(0.0, min(good, default=0.0)), max(good, default=10.0) * 1.12 + 1)
    ax.set_xlabel("SQNR (dB, higher is better) of the layer output at its chosen bits, on calibration data")
    ax.grid(axis="x", color="#ddd", zorder=1)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="#1f77b4", label="linear"), Patch(color="#2ca02c", label="linear, OPT-m split"),
                       Patch(color="#d62728", label="attention (mean of k, v)"), Patch(color="#9467bd", label="conv")],
              loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=4, fontsize=7.5, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated by another (fewer or equal bit-ops and higher or equal top-1), by increasing bit-ops."""
    best = -math.inf
    front = []
    for p in sorted(points, key=lambda p: (p["x"], -p["top1"])):
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


#: the Pareto plot's y axis spans at most this many top-1 points below the best; collapsed configurations further
#: down are drawn on the bottom edge (downward triangle, true value in the label) so they do not squash the rest.
PARETO_Y_WINDOW = 12.0


def plot_pareto(points: list[dict], own: dict | None, fp32_top1: float | None, title: str) -> bytes:
    Figure, _ = _mpl()
    fig = Figure(figsize=(8.5, 5.6), layout="constrained")
    ax = fig.add_subplot(111)
    allp = points + ([own] if own else [])
    tops = [p["top1"] for p in allp] + ([fp32_top1] if fp32_top1 is not None else [])
    best, worst = max(tops), min(tops)
    clip = best - PARETO_Y_WINDOW if worst < best - PARETO_Y_WINDOW else None
    span = (best - (clip if clip is not None else worst)) or 1.0
    y_lo = clip if clip is not None else worst - max(span * 0.1, 0.3)
    y_hi = best + max(span * 0.15, 0.45)

    def shown(p: dict) -> dict:
        if clip is not None and p["top1"] < clip:
            return {**p, "top1": clip + span * 0.02, "label": f"{p['label']} ({p['top1']:.1f}, off scale)",
                    "clipped": True}
        return p

    front = pareto_front(allp)
    if len(front) >= 2:
        ax.step([p["x"] for p in front], [p["top1"] for p in front], where="post", color="#bbb", lw=1.2,
                zorder=1, label="Pareto front")
    kinds: dict[str, list[dict]] = {}
    for p in points:
        kinds.setdefault(p["kind"], []).append(shown(p))
    for kind, ps in kinds.items():
        marker, colour, name = KIND_STYLE.get(kind, OTHER_STYLE)
        for clipped in (False, True):
            sel = [p for p in ps if bool(p.get("clipped")) == clipped]
            if sel:
                ax.scatter([p["x"] for p in sel], [p["top1"] for p in sel], marker="v" if clipped else marker,
                           s=55, color=colour, edgecolor="black", linewidth=0.5, zorder=3,
                           label=None if clipped else (name or kind))
    if own:
        o = shown(own)
        ax.scatter([o["x"]], [o["top1"]], marker="*", s=260, color="#ffbf00", edgecolor="black",
                   linewidth=0.8, zorder=4, label=own["label"])
    if fp32_top1 is not None:
        ax.axhline(fp32_top1, color="#444", ls="--", lw=1, zorder=1)
        ax.annotate(f"fp32 {fp32_top1:.2f} (16x the W8A8 bit-ops)", (0.01, fp32_top1), xycoords=("axes fraction",
                    "data"), textcoords="offset points", xytext=(0, 4), fontsize=8, color="#444")
    xs = [p["x"] for p in allp]
    lo, hi = min(xs), max(xs)
    pad = max((hi - lo) * 0.12, 0.05)
    ax.set_xlim(max(0.0, lo - pad), hi + pad * 1.8)
    ax.set_ylim(y_lo, y_hi)
    _place_labels(fig, ax, [shown(p) for p in allp])
    ax.set_xlabel("bit-operations relative to uniform W8A8 (lower is cheaper)")
    ax.set_ylabel("top-1 (%)" + (f"; points below {clip:.1f} drawn on the bottom edge" if clip is not None else ""))
    ax.grid(color="#e5e5e5", zorder=0)
    ax.legend(loc="best", fontsize=8, framealpha=0.95)
    ax.set_title(title, fontsize=10)
    return _png(fig)


_OFFSETS = [(6, 5, "left"), (6, -13, "left"), (-6, 5, "right"), (-6, -13, "right"), (6, 17, "left"),
            (6, -25, "left"), (-6, 17, "right"), (-6, -25, "right"), (0, 29, "center"), (0, -37, "center")]


def _place_labels(fig, ax, points: list[dict]) -> None:
    """Annotate every point, trying a few offsets per label so that labels do not overlap each other or other
    markers (greedy; falls back to the first offset)."""
    _, Canvas = _mpl()
    canvas = Canvas(fig)
    renderer = canvas.get_renderer()
    trans = ax.transData
    markers = []
    for p in points:
        x, y = trans.transform((p["x"], p["top1"]))
        markers.append((x - 5, y - 5, x + 5, y + 5))
    placed: list[tuple[float, float, float, float]] = []

    def hits(b, boxes):
        return any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in boxes)

    for i, p in enumerate(sorted(points, key=lambda p: (p["x"], -p["top1"]))):
        first = None
        for dx, dy, ha in _OFFSETS:
            ann = ax.annotate(p["label"], (p["x"], p["top1"]), textcoords="offset points", xytext=(dx, dy),
                              fontsize=7.5, ha=ha, zorder=5)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            own = trans.transform((p["x"], p["top1"]))
            others = [m for m in markers if not (abs((m[0] + 5) - own[0]) < 1e-6 and abs((m[1] + 5) - own[1]) < 1e-6)]
            if not hits(box, placed) and not hits(box, others):
                placed.append(box)
                if first is not None:
                    first.remove()
                break
            if first is None:
                first, first_box = ann, box
            else:
                ann.remove()
        else:
            placed.append(first_box)


# -- HTML ------------------------------------------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _f(v: Any, digits: int = 2) -> str:
    n = _num(v)
    if n is None:
        return "-" if v is None else _e(v)
    if n != 0 and (abs(n) < 1e-3 or abs(n) >= 1e6):
        return f"{n:.3e}"
    return f"{n:.{digits}f}"


def _table(headers: list[str], rows: list[list[Any]], tid: str, cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{tid}" class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: list[tuple[str, str]], tid: str) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table id="{tid}" class="kv"><tbody>{body}</tbody></table>'


CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.5em;border-bottom:2px solid #333;padding-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;
border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}td.n,th.n{text-align:right}thead th{background:#f2f2f2}table.kv th{background:#f7f7f7;width:14em}
tbody tr:nth-child(even){background:#fafafa}.ok{color:#17803d;font-weight:600}.bad{color:#b00020;font-weight:600}
.note{color:#666;font-size:.85em}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
pre{background:#f6f6f6;padding:.6em;font-size:.8em;overflow-x:auto}
"""


def _status(ok: Any) -> str:
    return '<span class="ok">passed</span>' if ok else '<span class="bad">FAILED</span>'


@dataclass
class Built:
    html: str
    pngs: dict[str, bytes]            # suffix ("bits", "sqnr", "pareto") -> png
    skipped_plots: dict[str, str]     # suffix -> reason
    text: str                         # readable stdout summary


def build(inp: ReportInputs) -> Built:
    r = inp.report
    model = r.get("model") or {}
    recipe = r.get("recipe") or {}
    layers = [l for l in recipe.get("layers") or [] if isinstance(l, dict) and "module" in l]
    bitops = r.get("bitops") if isinstance(r.get("bitops"), dict) else None
    acc = accuracy_summary(inp)
    name = model.get("name", "?")
    rname = recipe.get("name", "?")
    pngs: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    text: list[tuple[str, Any]] = []

    if layers:
        pngs["bits"] = plot_bits(layers, f"{name} {rname}: bit-widths per layer ({len(layers)} layers)")
        if any(layer_sqnr(l) is not None for l in layers):
            pngs["sqnr"] = plot_sqnr(layers, f"{name} {rname}: per-layer SQNR")
        else:
            skipped["sqnr"] = ("no per-layer SQNR in report.json (recipes applied from a file carry no calibration "
                               "statistics)")
    else:
        skipped["bits"] = skipped["sqnr"] = f"recipe {rname!r} has no quantized layers"
    x_own = bitops_vs_w8a8(bitops)
    own = None
    if acc["model"] is not None and _num(acc["model"].get("top1")) is not None and x_own is not None:
        own = {"label": f"this compile ({rname})", "kind": "self", "top1": float(acc["model"]["top1"]),
               "x": x_own}
    if own or inp.points:
        pngs["pareto"] = plot_pareto(inp.points, own, acc["fp32_top1"],
                                     f"{name}: top-1 vs bit-operations"
                                     + (f" on {Path(str(acc['model']['images'].get('dir', ''))).name}"
                                        if acc["model"] and isinstance(acc["model"].get("images"), dict) else ""))
    else:
        skipped["pareto"] = ("no accuracy data: pass --eval EVAL.json (vitq eval --json) for this compile's point "
                             "and/or --points POINTS.json for other configurations")

    h: list[str] = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>vitq report: "
                    f"{_e(name)} {_e(rname)}</title><style>{CSS}</style></head><body>",
                    f"<h1>vitq compile report: {_e(name)} &middot; recipe {_e(rname)} &middot; target "
                    f"{_e(r.get('target', '?'))}</h1>"]
    # summary
    w = r.get("weights") or {}
    wdesc = ('<span class="bad">RANDOM weights (no --weights): accuracy numbers are meaningless</span>'
             if w.get("random_init") else f"{_e(w.get('source'))} (sha256 {_e(str(w.get('sha256', ''))[:12])})")
    cal = r.get("calibration") or {}
    rows = [("model", f"{_e(name)} ({_e(model.get('class', '?'))}, "
                      f"{_f((model.get('num_params') or 0) / 1e6)}M params, {_e(model.get('num_classes', '?'))} "
                      f"classes)"),
            ("weights", wdesc),
            ("recipe", f"{_e(rname)} ({_e(recipe.get('kind', '?'))}"
                       + (f"; {_e(inp.recipe_file.name)} in the directory" if inp.recipe_file else "") + ")"),
            ("target", _e(r.get("target", "?"))),
            ("calibration", (f"{_e(cal.get('count'))} images from {_e(cal.get('dir'))} (seed {_e(cal.get('seed'))}, "
                             f"sha256 {_e(str(cal.get('sha256', ''))[:12])})" + ("" if cal.get("used") else
                                                                                 " &mdash; not used (fp32)"))
             if cal else "none"),
            ("vitq", f"{_e(r.get('vitq_version', '?'))}, compiled {_e(r.get('created_utc', '?'))}")]
    text += [("model", name), ("weights", "RANDOM" if w.get("random_init") else w.get("source")),
             ("recipe", rname), ("target", r.get("target"))]
    ver = r.get("verification") or {}
    ex = ver.get("export")
    if isinstance(ex, dict):
        rows.append(("export check", f"{_status(ex.get('passed', True))}: max |logit diff| "
                                     f"{_f(ex.get('max_abs_diff'))} (tolerance {_f(ex.get('tolerance'))}), top-1 "
                                     f"agreement {_f((_num(ex.get('top1_agreement')) or 0) * 100, 1)}% on "
                                     f"{_e(ex.get('inputs', ex.get('n', '?')))}"))
        text.append(("export check", f"max |logit diff| {_f(ex.get('max_abs_diff'))}"))
    qv = ver.get("qdq_vs_simulation")
    if isinstance(qv, dict):
        rows.append(("Q/DQ vs simulation", f"{_status(qv.get('passed'))}: relative logit error "
                                           f"{_f(qv.get('rel_l2_error'), 4)} (tolerance "
                                           f"{_f(qv.get('tolerance_rel_l2'), 4)}; the simulation's own quantization "
                                           f"error {_f(qv.get('sim_vs_float_rel_l2'), 4)}), top-1 agreement "
                                           f"{_f((_num(qv.get('top1_agreement')) or 0) * 100, 1)}% on "
                                           f"{_e(qv.get('n'))} images"))
        text.append(("Q/DQ vs simulation", f"rel err {_f(qv.get('rel_l2_error'), 4)} "
                                           f"(tol {_f(qv.get('tolerance_rel_l2'), 4)}), "
                                           f"{'passed' if qv.get('passed') else 'FAILED'}"))
    t = r.get("timings_s") or {}
    if _num(t.get("total")) is not None:
        rows.append(("compile time", f"{_f(t['total'], 1)} s"))
    h.append('<h2 id="summary">Summary</h2>' + _kv(rows, "summary-table"))

    # bit-ops
    h.append('<h2 id="bitops">Bit-operations</h2>')
    if bitops:
        per = {p.get("module"): p for p in bitops.get("per_layer") or [] if isinstance(p, dict)}
        brows = [("total", f"{_num(bitops.get('total')) / 1e9:.2f} G bit-ops per image"
                           if _num(bitops.get('total')) is not None else "-"),
                 ("vs fp32", f"{_f(bitops.get('ratio'), 4)}x (fp32 = 32x32-bit MACs: "
                             f"{_num(bitops.get('fp32_equivalent') or 0) / 1e9:.1f} G)"),
                 (f"vs uniform {bitops.get('base', 'w8a8').upper()}", f"{_f(bitops.get('ratio_vs_base'), 4)}x"),
                 ("average bit-width", f"{_f(bitops.get('avg_bits'), 3)} (uniform-equivalent: "
                                       f"sqrt(bit-ops / MACs))"),
                 ("MACs", f"{_num(bitops.get('total_macs') or 0) / 1e9:.3f} G per image")]
        h.append(_kv(brows, "bitops-table"))
        text += [("bit-ops", f"{_f(bitops.get('ratio'), 4)}x of fp32, {_f(bitops.get('ratio_vs_base'), 3)}x of "
                             f"{bitops.get('base', 'w8a8')}, avg {_f(bitops.get('avg_bits'), 2)} bits")]
    else:
        per = {}
        h.append(f'<p class="note">No bit-operation accounting: recipe {_e(rname)} is not quantized.</p>')

    # recipe table
    h.append(f'<h2 id="recipe">Recipe: {len(layers)} layers</h2>')
    if layers:
        tot = _num(bitops.get("total")) if bitops else None
        lrows = []
        for i, l in enumerate(layers):
            bo = _num(per.get(l["module"], {}).get("bitops"))
            sq = layer_sqnr(l)
            lrows.append([str(i), f"<code>{_e(l['module'])}</code>", _e(l.get("kind", "")),
                          _e(l.get("w_bits") if l.get("w_bits") is not None else "-"),
                          _e(l.get("a_bits") if l.get("a_bits") is not None else "-"),
                          "yes" if l.get("smooth") else "", "yes" if l.get("optm") else "",
                          f"{sq:.2f}" if sq is not None else "-",
                          f"{bo / 1e9:.3f}" if bo is not None else "-",
                          f"{bo / tot * 100:.1f}" if bo is not None and tot else "-"])
        h.append(_table(["#", "module", "kind", "w bits", "a bits", "SQ-b", "OPT-m", "SQNR (dB)", "G bit-ops",
                         "share %"], lrows, "recipe-table", "layers"))
        nsm = sum(bool(l.get("smooth")) for l in layers)
        nop = sum(bool(l.get("optm")) for l in layers)
        h.append(f'<p class="note">SQ-b: smoothing folded into the preceding LayerNorm ({nsm} layers); OPT-m: '
                 f'the post-GELU input split into positive/negative regions ({nop} layers). SQNR: the layer\'s '
                 f'output SQNR on calibration data at the chosen bit-widths (attention: mean over k and v).</p>')
        text.append(("layers", f"{len(layers)} ({nsm} SQ-b, {nop} OPT-m); bits w "
                               f"{sorted({l.get('w_bits') for l in layers if l.get('w_bits')})} a "
                               f"{sorted({l.get('a_bits') for l in layers if l.get('a_bits')})}"))
    else:
        h.append('<p class="note">No quantized layers.</p>')

    # accuracy
    h.append('<h2 id="accuracy">Accuracy vs fp32</h2>')
    if inp.evals:
        arows = []
        for p, e in inp.evals:
            ref = e.get("reference") if isinstance(e.get("reference"), dict) else {}
            arows.append([_e(p.name), f"<code>{_e(_get(e, 'model', 'path'))}</code>",
                          _e(_get(e, "images", "dir")), _e(e.get("n")), _f(e.get("top1")), _f(e.get("top5")),
                          _f(ref.get("top1")), _f((_num(ref.get("agreement")) or 0) * 100 if ref else None),
                          _f(ref.get("kl_mean"), 4) if ref else "-"])
        h.append(_table(["file", "model", "images", "n", "top-1 %", "top-5 %", "reference top-1 %",
                         "top-1 agreement %", "mean KL (nats)"], arows, "accuracy-table"))
        m = acc["model"]
        if m is not None and _num(m.get("top1")) is not None and acc["fp32_top1"] is not None:
            d = float(m["top1"]) - acc["fp32_top1"]
            h.append(f'<p id="accuracy-delta">top-1 <b>{_f(m["top1"])}</b> vs fp32 <b>{_f(acc["fp32_top1"])}</b> '
                     f'({acc["source"]}): <b>{d:+.2f}</b> points.</p>')
            text.append(("top-1", f"{_f(m['top1'])} (fp32 {_f(acc['fp32_top1'])}, {d:+.2f} pt)"
                                  + (f", agreement {_f(m['reference']['agreement'] * 100, 1)}%"
                                     if _num(_get(m, 'reference', 'agreement')) is not None else "")))
        elif m is not None:
            text.append(("top-1", _f(m.get("top1"))))
    else:
        h.append('<p class="note">No evaluation result: run <code>vitq eval DIR --images VAL --reference '
                 'DIR/model.fp32.onnx --json DIR/eval.json</code> (picked up automatically) or pass '
                 '<code>--eval</code>.</p>')

    # latency
    h.append('<h2 id="latency">Latency</h2>')
    if inp.benches:
        lrows = []
        for p, b in inp.benches:
            for e in _bench_entries(b):
                lat = e.get("latency_ms") or {}
                sp = _spread(e)
                host = e.get("host") or {}
                lrows.append([_e(p.name), f"<code>{_e(_get(e, 'model', 'path'))}</code>",
                              _e(_get(e, "model", "backend")), _e(e.get("batch")), _e(e.get("threads")),
                              _e(_get(e, "repeats", "n") or 1), _e(e.get("iters")), _f(lat.get("p50")),
                              _f(lat.get("p90")), _f(lat.get("p99")), _f(e.get("throughput_img_s"), 1),
                              f"{sp * 100:.1f}" if sp is not None else "-",
                              _e(f"{host.get('machine', '?')}/{host.get('cpus', '?')} cpu")])
                text.append((f"latency b={e.get('batch')}", f"p50 {_f(lat.get('p50'))} ms, "
                                                            f"{_f(e.get('throughput_img_s'), 1)} img/s "
                                                            f"({Path(str(_get(e, 'model', 'path'))).name})"))
        h.append(_table(["file", "model", "backend", "batch", "threads", "repeats", "runs", "p50 ms", "p90 ms",
                         "p99 ms", "img/s", "p50 spread %", "host"], lrows, "latency-table"))
        h.append('<p class="note">Medians over repeats when the file holds several (<code>vitq bench '
                 '--repeats N</code>); spread = (max - min) / median of the repeats\' p50.</p>')
    else:
        h.append('<p class="note">No latency result: run <code>vitq bench DIR --batch 1 8 --repeats 3 --json '
                 'DIR/bench.json</code> (picked up automatically) or pass <code>--bench</code>.</p>')

    # trt_check
    passes = r.get("passes") if isinstance(r.get("passes"), dict) else {}
    tc = passes.get("trt_check") if passes else None
    if isinstance(tc, dict):
        errs, warns = tc.get("errors") or [], tc.get("warnings") or []
        st = tc.get("stats") or {}
        h.append('<h2 id="trt-check">TensorRT compatibility (trt_check)</h2>')
        h.append(f'<p>{_status(tc.get("ok", not errs))}: {len(errs)} error(s), {len(warns)} warning(s)'
                 + (f"; {_e(st.get('gemms_int8'))}/{_e(st.get('gemms'))} GEMM/Conv nodes fully quantized"
                    if "gemms" in st else "") + "</p>")
        issues = [["error", i] for i in errs] + [["warning", i] for i in warns]
        if issues:
            h.append(_table(["severity", "code", "message", "module", "node"],
                            [[s, _e(i.get("code")), _e(i.get("message")), _e(i.get("module") or ""),
                              _e(i.get("node") or "")] for s, i in issues[:50] if isinstance(i, dict)],
                            "trt-check-table"))
            if len(issues) > 50:
                h.append(f'<p class="note">... and {len(issues) - 50} more.</p>')
        text.append(("trt_check", f"{len(errs)} error(s), {len(warns)} warning(s)"))

    # TensorRT engine build / Jetson bundle (targets trt, jetson): scalar fields as written by the compile
    for key, title in (("tensorrt", "TensorRT engine"), ("jetson", "Jetson bundle")):
        sec = r.get(key)
        if isinstance(sec, dict) and sec:
            h.append(f'<h2 id="{key}">{title}</h2>' + _kv(
                [(k, _cell(v)) for k, v in sec.items()], f"{key}-table"))
            if key == "tensorrt":
                text.append(("TensorRT engine", sec.get("engine") or sec.get("reason") or "-"))

    # MixA-Q
    mixa = r.get("mixa")
    if mixa is not None:
        h.append('<h2 id="mixa">MixA-Q</h2>' + _mixa_html(mixa))
        red = _num(mixa.get("bitops_reduction")) if isinstance(mixa, dict) else None
        text.append(("MixA-Q", f"{red:.3f}x bit-op reduction vs the uniform base" if red else "present"))

    # graph passes
    if passes and isinstance(passes.get("passes"), list):
        prow = [[_e(p.get("name")), _e(p.get("changed")), _e(p.get("nodes_before")), _e(p.get("nodes_after")),
                 _e(p.get("validated")), _f(p.get("numeric_max_abs_diff"), 4), _f(p.get("seconds"), 3)]
                for p in passes["passes"] if isinstance(p, dict)]
        h.append('<h2 id="passes">Graph passes</h2>' + _table(
            ["pass", "changed", "nodes before", "nodes after", "validated", "max |diff|", "seconds"], prow,
            "passes-table"))
        q = passes.get("qdq") or {}
        if q:
            h.append(f'<p class="note">Q/DQ nodes: {", ".join(f"{_e(k)} {_e(v)}" for k, v in q.items())}</p>')

    # plots
    h.append('<h2 id="plots">Plots</h2>')
    captions = {"bits": "Weight and activation bit-width per layer (network order, top to bottom; shaded rows "
                        "group transformer blocks).",
                "pareto": "Top-1 vs bit-operations (relative to uniform W8A8). Star: this compile; other markers: "
                          "the points files; grey steps: the Pareto front.",
                "sqnr": "Per-layer output SQNR at the chosen bit-widths (calibration data)."}
    for key in ("bits", "pareto", "sqnr"):
        if key in pngs:
            uri = "data:image/png;base64," + base64.b64encode(pngs[key]).decode("ascii")
            h.append(f'<figure id="plot-{key}"><img alt="{key} plot" src="{uri}"><figcaption class="note">'
                     f'{_e(captions[key])}</figcaption></figure>')
        else:
            h.append(f'<p class="note" id="plot-{key}-missing">No {key} plot: {_e(skipped[key])}.</p>')
    if inp.points:
        prow = [[_e(p["label"]), _e(p["kind"]), _f(p["top1"]), _f(p["x"], 3)]
                for p in sorted(inp.points, key=lambda p: p["x"])]
        h.append(_table(["point", "kind", "top-1 %", "bit-ops vs W8A8"], prow, "points-table"))
    # timings
    if t:
        h.append('<h2 id="timings">Compile timings</h2>' + _table(
            ["step", "seconds"], [[_e(k), _f(v, 2)] for k, v in t.items()], "timings-table"))
    if inp.notes:
        h.append('<h2 id="notes">Notes</h2><ul>' + "".join(f"<li>{_e(n)}</li>" for n in inp.notes) + "</ul>")
    h.append("</body></html>")

    from .table import format_kv

    summary = format_kv([(k, v) for k, v in text], title=f"vitq report: {name} {rname}")
    return Built("\n".join(h), pngs, skipped, summary)


def _mixa_html(mixa: Any) -> str:
    """Tolerant rendering of report.json's ``mixa`` section (bitops_reduction, ratios, groups; shape may vary)."""
    if not isinstance(mixa, dict):
        return f"<pre>{_e(json.dumps(mixa, indent=1, default=str)[:4000])}</pre>"
    out = []
    kv = [(k, _f(v, 4) if _num(v) is not None else _e(v)) for k, v in mixa.items()
          if not isinstance(v, (dict, list))]
    if kv:
        out.append(_kv(kv, "mixa-table"))
    for key in ("ratios", "groups"):
        v = mixa.get(key)
        if v is None:
            continue
        out.append(f"<h3>{_e(key)}</h3>")
        if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
            out.append(_table([key[:-1] if key.endswith("s") else key, "value"],
                              [[_e(k), _f(x, 3) if _num(x) is not None else _e(x)] for k, x in v.items()],
                              f"mixa-{key}"))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            cols = list(dict.fromkeys(k for x in v for k in x))
            out.append(_table(cols, [[_cell(x.get(c)) for c in cols] for x in v], f"mixa-{key}"))
        elif isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()):
            cols = list(dict.fromkeys(k for x in v.values() for k in x))
            out.append(_table([""] + cols, [[_e(k)] + [_cell(x.get(c)) for c in cols] for k, x in v.items()],
                              f"mixa-{key}"))
        elif isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
            out.append(_table(["#", "value"], [[str(i), _cell(x)] for i, x in enumerate(v)], f"mixa-{key}"))
        else:
            out.append(f"<pre>{_e(json.dumps(v, indent=1, default=str)[:4000])}</pre>")
    rest = {k: v for k, v in mixa.items() if isinstance(v, (dict, list)) and k not in ("ratios", "groups")}
    if rest:
        out.append(f"<pre>{_e(json.dumps(rest, indent=1, default=str)[:4000])}</pre>")
    return "".join(out)


def _cell(v: Any) -> str:
    if _num(v) is not None and not isinstance(v, int):
        return _f(v, 3)
    if isinstance(v, (dict, list)):
        return _e(json.dumps(v, default=str)[:200])
    return _e("-" if v is None else v)


# -- entry point -----------------------------------------------------------------------------------------------------
def write_report(directory: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 evals: Iterable[str | os.PathLike] = (), benches: Iterable[str | os.PathLike] = (),
                 points: Iterable[str | os.PathLike] = ()) -> tuple[Built, dict[str, Path]]:
    """Load, build and write the report; returns the built report and ``{"html", "bits", "sqnr", "pareto"}`` paths
    written (absent plots are not in the dict)."""
    inp = load_inputs(directory, evals=list(evals), benches=list(benches), points=list(points))
    out_p = Path(out) if out is not None else Path(directory) / "report.html"
    if out_p.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--out {out_p}: expected an .html path")
    if out_p.exists() and out_p.is_dir():
        raise InputError(f"--out {out_p} is a directory; give a file path such as {out_p / 'report.html'}")
    try:
        out_p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output directory {out_p.parent}: {e.strerror or e}") from None
    built = build(inp)
    written: dict[str, Path] = {}
    try:
        for key, data in built.pngs.items():
            p = out_p.with_name(f"{out_p.stem}_{key}.png")
            write_bytes_atomic(p, data)
            written[key] = p
        write_bytes_atomic(out_p, built.html.encode("utf-8"))
    except OSError as e:
        raise InputError(f"cannot write the report to {out_p.parent}: {e.strerror or e}") from None
    written["html"] = out_p
    return built, written
