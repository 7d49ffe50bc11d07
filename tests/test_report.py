"""`vitq report DIR`: the HTML parses, holds the sections/tables/plots, its numbers equal report.json / eval / bench
JSON, and the embedded PNGs decode to readable sizes (and equal the PNG files written beside the HTML)."""

from __future__ import annotations

import base64
import io
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from vitq.cli import main  # noqa: E402
from vitq.report import layer_sqnr, normalize_points, pareto_front  # noqa: E402


# -- a compile report like vitq compile writes, built in code -------------------------------------------------------
def make_report(blocks: int = 4, recipe: str = "mp:5", mixa: dict | None = None) -> dict:
    """A DeiT-like vitq.report/1 (patch_embed, per block attn/qkv/proj/fc1/fc2, head) with mixed bit-widths, per-layer
    SQNR dicts over the candidate bit-widths (as the calibration stores them) and bit-ops by vitq's formula."""
    layers, per = [], []
    total = macs_total = 0

    def add(module, kind, w, a, macs, smooth=False, optm=False):
        nonlocal total, macs_total
        if kind == "attn":
            sq = {f"a{b}": 30.0 + b - 0.01 * len(layers) for b in (4, 6, 8)}
            bo = macs * a * a
        else:
            sq = {f"w{b}a{b}": 25.0 + 2 * b + 0.1 * len(layers) for b in (4, 6, 8)}
            sq[f"w{w}a{a}"] = 24.0 + w + a + 0.1 * len(layers)
            bo = macs * w * a
        layers.append({"module": module, "kind": kind, "w_bits": w, "a_bits": a, "smooth": smooth, "optm": optm,
                       "sqnr_db": sq, "method": "search"})
        per.append({"module": module, "kind": kind, "macs": macs, "w_bits": w, "a_bits": a, "bitops": bo})
        total += bo
        macs_total += macs

    add("patch_embed.proj", "conv", 8, 8, 28901376)
    for b in range(blocks):
        bits = (4, 6, 8)[b % 3]
        add(f"blocks.{b}.attn", "attn", None, 8 if b % 2 else 6, 14902656)
        add(f"blocks.{b}.attn.qkv", "linear", bits, bits, 11440128, smooth=True)
        add(f"blocks.{b}.attn.proj", "linear", 8, bits, 3813376)
        add(f"blocks.{b}.mlp.fc1", "linear", bits, bits, 15253504, smooth=True)
        add(f"blocks.{b}.mlp.fc2", "linear", 6, 6, 15253504, optm=True)
    add("head", "linear", 8, 8, 192000)
    fp32 = macs_total * 32 * 32
    rep = {
        "schema": "vitq.report/1", "vitq_version": "0.1.0", "created_utc": "2026-11-22T06:44:54+00:00",
        "target": "ort",
        "model": {"name": "deit_tiny_patch16_224", "family": "vit", "class": "VisionTransformer",
                  "num_params": 5717416, "num_classes": 1000},
        "weights": {"source": "weights/deit.pth", "sha256": "4f207632149fb938", "random_init": False, "notes": []},
        "preprocess": {"input_size": [3, 224, 224]},
        "recipe": {"name": recipe, "kind": "mp", "file": "recipe.json", "defaults": {}, "layers": layers},
        "calibration": {"dir": "calib", "count": 16, "sha256": "d64590fbd816", "seed": 0, "used": True},
        "bitops": {"total": total, "fp32_equivalent": fp32, "ratio": total / fp32,
                   "ratio_vs_base": total / (macs_total * 64), "base": "w8a8",
                   "avg_bits": math.sqrt(total / macs_total), "total_macs": macs_total, "per_layer": per},
        "verification": {
            "export": {"max_abs_diff": 1.28e-05, "tolerance": 1e-4, "n": 8, "top1_agreement": 1.0, "passed": True,
                       "inputs": "8 calibration images"},
            "qdq_vs_simulation": {"rel_l2_error": 0.0487, "max_abs_diff": 0.278, "top1_agreement": 1.0,
                                  "sim_vs_float_rel_l2": 0.142, "tolerance_rel_l2": 0.0712, "n": 8,
                                  "passed": True}},
        "passes": {"schema": "vitq.passes/1", "passes": [
            {"name": "insert_qdq", "changed": True, "seconds": 0.05, "nodes_before": 347, "nodes_after": 665,
             "validated": True, "numeric_max_abs_diff": None}],
            "qdq": {"QuantizeLinear": 110, "DequantizeLinear": 160},
            "trt_check": {"ok": False, "errors": [{"severity": "error", "code": "QDQ_AXIS", "message":
                                                   "weight <scale> axis 0 on MatMul", "node": "n1",
                                                   "module": "blocks.0.attn.qkv"}],
                          "warnings": [], "stats": {"gemms": 26, "gemms_int8": 25}}},
        "timings_s": {"calibrating": 24.7, "total": 51.4},
    }
    if mixa is not None:
        rep["mixa"] = mixa
    return rep


def make_eval(path: str, top1: float, ref_top1: float | None = 81.54, agreement: float = 0.975) -> dict:
    e = {"schema": "vitq.eval/1", "model": {"path": path, "backend": "ort"},
         "images": {"dir": "../shared/data/imagenet-val-dev650", "count": 650}, "n": 650, "batch_size": 32,
         "top1": top1, "top5": 94.9, "elapsed_s": 10.0}
    if ref_top1 is not None:
        e["reference"] = {"path": "model.fp32.onnx", "top1": ref_top1, "top5": 95.23, "agreement": agreement,
                          "kl_mean": 0.0123, "cosine_mean": 0.99, "max_abs_diff": 1.0}
    return e


def make_bench_set() -> dict:
    def one(batch, p50s):
        s = sorted(p50s)
        return {"schema": "vitq.bench/1", "model": {"path": "build/x/model.onnx", "backend": "ort"},
                "batch": batch, "iters": 60, "threads": 2,
                "latency_ms": {"p50": s[1], "p90": s[1] * 1.1, "p99": s[1] * 1.3},
                "throughput_img_s": batch * 1e3 / s[1], "host": {"machine": "x86_64", "cpus": 2},
                "repeats": {"n": 3, "latency_ms": {"p50": p50s}}}
    return {"schema": "vitq.bench-set/1", "results": [one(1, [12.0, 11.0, 13.0]), one(8, [70.0, 72.0, 75.0])]}


def write(p: Path, obj) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj))
    return p


# -- HTML parsing ---------------------------------------------------------------------------------------------------
class Doc(HTMLParser):
    """ids, h2 section ids, tables (by id: rows of cell texts) and img srcs of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.ids: set[str] = set()
        self.h2: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.imgs: list[str] = []
        self._table = None
        self._row = None
        self._cell = None
        self._in_head = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids.add(a["id"])
        if tag == "h2":
            self.h2.append(a.get("id"))
        elif tag == "table":
            self._table = self.tables.setdefault(a.get("id", f"_{len(self.tables)}"), [])
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr" and self._table is not None and not self._in_head:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "thead":
            self._in_head = False
        elif tag == "tr" and self._row is not None:
            self._table.append(self._row)
            self._row = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def decode_png(src: str):
    from PIL import Image

    assert src.startswith("data:image/png;base64,")
    raw = base64.b64decode(src.split(",", 1)[1], validate=True)
    im = Image.open(io.BytesIO(raw))
    im.load()
    return raw, im


# -- tests ----------------------------------------------------------------------------------------------------------
def test_report_with_eval_bench_points(tmp_path, capsys):
    d = tmp_path / "deit_mp5"
    rep = make_report(blocks=12, mixa={"bitops_reduction": 1.42, "scheme": "token-group",
                            "ratios": {"blocks.0": 0.5, "blocks.1": 0.25},
                            "groups": [{"stage": 0, "group": "2x2", "ratio": 0.5, "low_bits": 4}]})
    write(d / "report.json", rep)
    write(d / "recipe.json", {"schema": "vitq.recipe/1"})
    write(d / "eval.json", make_eval(str(d / "model.onnx"), top1=79.23))  # picked up from DIR
    write(d / "notes.json", {"something": "else"})                        # not a vitq result: ignored
    bench = write(tmp_path / "b.json", make_bench_set())
    mptq = write(tmp_path / "mptq.json", {"fp32_top1": 81.54, "rows": [
        {"config": "w8a8", "top1": 81.69, "avg_bits": 8.0, "bitops_ratio_vs_w8a8": 1.0},
        {"config": "w4a4", "top1": 74.0, "avg_bits": 4.0, "bitops_ratio_vs_w8a8": 0.25},
        {"config": "w4a4 minmax", "top1": 60.0, "avg_bits": 4.0, "bitops_ratio_vs_w8a8": 0.25}]})
    mixa_pts = write(tmp_path / "mixa.json", [{"label": "MixA-Q 1.35x", "kind": "mixa", "top1": 79.5,
                                                "bitops_ratio": 0.37},
                                               {"label": "no top1", "kind": "mixa", "avg_bits": 5}])
    assert main(["report", str(d), "--bench", str(bench), "--points", str(mptq), "--points", str(mixa_pts)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "79.23" in out and "-2.31 pt" in out and "latency b=8" in out
    assert f"wrote {d / 'report.html'}" in out

    doc = Doc((d / "report.html").read_text())
    for sec in ("summary", "bitops", "recipe", "accuracy", "latency", "trt-check", "mixa", "passes", "plots",
                "notes"):
        assert sec in doc.h2, (sec, doc.h2)
    # recipe table: one row per layer, values equal report.json (SQNR at the layer's chosen bits)
    layers = rep["recipe"]["layers"]
    rows = doc.tables["recipe-table"]
    assert len(rows) == len(layers) == 62  # DeiT-Tiny's 62 quantized layers
    for row, l, p in zip(rows, layers, rep["bitops"]["per_layer"]):
        assert row[1] == l["module"] and row[2] == l["kind"]
        assert row[3] == (str(l["w_bits"]) if l["w_bits"] is not None else "-") and row[4] == str(l["a_bits"])
        assert row[5] == ("yes" if l["smooth"] else "") and row[6] == ("yes" if l["optm"] else "")
        key = f"a{l['a_bits']}" if l["w_bits"] is None else f"w{l['w_bits']}a{l['a_bits']}"
        assert float(row[7]) == pytest.approx(l["sqnr_db"][key], abs=0.005)
        assert float(row[8]) == pytest.approx(p["bitops"] / 1e9, abs=5e-4)
    assert sum(float(r[9]) for r in rows) == pytest.approx(100, abs=0.05 * len(rows))  # rounded to 0.1
    kv = dict((r[0], r[1]) for r in doc.tables["bitops-table"])
    assert kv["vs fp32"].startswith(f"{rep['bitops']['ratio']:.4f}x")
    assert kv["vs uniform W8A8"] == f"{rep['bitops']['ratio_vs_base']:.4f}x"
    assert kv["average bit-width"].startswith(f"{rep['bitops']['avg_bits']:.3f}")
    # accuracy and latency tables carry the JSON's numbers
    (arow,) = doc.tables["accuracy-table"]
    assert arow[0] == "eval.json" and arow[4] == "79.23" and arow[6] == "81.54" and arow[7] == "97.50"
    assert "accuracy-delta" in doc.ids
    lrows = doc.tables["latency-table"]
    assert [(r[3], r[7], r[11]) for r in lrows] == [("1", "12.00", "16.7"), ("8", "72.00", "6.9")]
    summary = dict((r[0], r[1]) for r in doc.tables["summary-table"])
    assert summary["model"].startswith("deit_tiny_patch16_224") and "passed" in summary["Q/DQ vs simulation"]
    assert doc.tables["trt-check-table"][0][1] == "QDQ_AXIS"
    assert dict(doc.tables["mixa-table"])["bitops_reduction"] == "1.4200"
    assert doc.tables["mixa-ratios"] == [["blocks.0", "0.500"], ["blocks.1", "0.250"]]
    assert doc.tables["mixa-groups"][0] == ["0", "2x2", "0.500", "4"]
    pts = doc.tables["points-table"]
    assert [r[0] for r in pts] == ["w4a4", "w4a4 minmax", "MixA-Q 1.35x", "w8a8"]
    assert {r[0]: r[1] for r in pts} == {"w4a4": "uniform", "w4a4 minmax": "ablation", "MixA-Q 1.35x": "mixa",
                                         "w8a8": "uniform"}
    assert "mixa.json: skipped 1 point(s) without top1 and bit-ops: no top1" in (d / "report.html").read_text()
    # three plots, embedded and beside the HTML, identical, readable sizes
    assert len(doc.imgs) == 3 and {"plot-bits", "plot-pareto", "plot-sqnr"} <= doc.ids
    for src, name in zip(doc.imgs, ("bits", "pareto", "sqnr")):
        raw, im = decode_png(src)
        assert raw == (d / f"report_{name}.png").read_bytes()
        assert im.format == "PNG" and im.width >= 800 and im.height >= 500
    assert decode_png(doc.imgs[0])[1].height > 62 * 20  # a row per layer, tall enough for readable labels
    assert not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_report_without_eval_or_bench(tmp_path, capsys):
    d = tmp_path / "a"
    r = make_report(blocks=2, recipe="w8a8")
    r["passes"] = {"target": "trt", "trt_check": {"ok": True, "errors": [], "warnings": [], "stats": {}}}
    r["tensorrt"] = {"engine": None, "reason": "TensorRT is not installed: no engine built",
                     "batch_range": [1, 8, 32]}
    write(d / "report.json", r)
    out_html = tmp_path / "site" / "deit.html"
    assert main(["report", str(d), "--out", str(out_html)]) == 0
    out = capsys.readouterr().out
    assert "no pareto plot: no accuracy data" in out
    doc = Doc(out_html.read_text())
    assert "accuracy" in doc.h2 and "latency" in doc.h2 and "mixa" not in doc.h2
    assert "accuracy-table" not in doc.tables and "latency-table" not in doc.tables
    assert "plot-pareto-missing" in doc.ids and len(doc.imgs) == 2
    assert sorted(p.name for p in out_html.parent.iterdir()) == ["deit.html", "deit_bits.png", "deit_sqnr.png"]
    assert not (d / "report.html").exists()
    assert len(doc.tables["recipe-table"]) == 12
    assert "trt-check" in doc.h2 and "trt-check-table" not in doc.tables and "passes" not in doc.h2
    assert dict(doc.tables["tensorrt-table"]) == {"engine": "-", "reason": "TensorRT is not installed: no engine built",
                                                  "batch_range": "[1, 8, 32]"}

    # an fp32 compile: no layers, no bit-ops, no plots, still a valid report
    f = tmp_path / "fp32"
    r = make_report(blocks=1, recipe="fp32")
    r["recipe"] = {"name": "fp32", "kind": "preset", "file": None, "layers": []}
    r["bitops"] = None
    write(f / "report.json", r)
    assert main(["report", str(f)]) == 0
    doc = Doc((f / "report.html").read_text())
    assert doc.imgs == [] and {"plot-bits-missing", "plot-sqnr-missing", "plot-pareto-missing"} <= doc.ids


def test_report_errors_name_the_culprit(tmp_path, capsys):
    def fails(args, *needles):
        assert main(["report", *map(str, args)]) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert str(n) in err, err
        return err

    fails([tmp_path / "nope"], "artifact directory not found", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    fails([tmp_path / "empty"], tmp_path / "empty" / "report.json", "not found", "vitq compile")
    bad = write(tmp_path / "bad" / "report.json", {"schema": "vitq.eval/1"})
    fails([bad.parent], "unsupported report schema", bad)
    (tmp_path / "bad" / "report.json").write_text("{oops")
    fails([bad.parent], "not readable JSON", bad)
    d = tmp_path / "ok"
    write(d / "report.json", make_report(blocks=1))
    bench = write(tmp_path / "bench.json", make_bench_set())
    fails([d, "--eval", bench], bench, "not a `vitq eval --json` result")
    fails([d, "--bench", tmp_path / "missing.json"], "bench result not found", tmp_path / "missing.json")
    fails([d, "--points", write(tmp_path / "p.json", {"x": 1})], "not a points file")
    fails([d, "--out", tmp_path / "r.txt"], "expected an .html path")
    assert not (d / "report.html").exists()


def test_points_normalization_and_front():
    pts, fp32, skipped = normalize_points({"schema": "vitq.points/1", "fp32_top1": 81.5, "points": [
        {"label": "a", "top1": 80, "avg_bits": 6, "kind": "uniform"},
        {"label": "b", "top1": 79, "bitops_ratio_vs_fp32": 0.03125},
        {"label": "c", "top1": 78, "bitops_ratio": 0.3, "kind": "prune"},
        {"label": "d", "bitops_ratio": 0.3}]})
    assert fp32 == 81.5 and skipped == ["d"]
    assert [(p["label"], p["kind"], p["x"]) for p in pts] == [("a", "uniform", 36 / 64), ("b", "other", 0.5),
                                                              ("c", "prune", 0.3)]
    front = pareto_front(pts + [{"label": "e", "top1": 77, "x": 0.6}])
    assert [p["label"] for p in front] == ["c", "b", "a"]
    assert layer_sqnr({"w_bits": 4, "a_bits": 8, "sqnr_db": {"w4a8": 20.0, "w8a8": 30.0}}) == 20.0
    assert layer_sqnr({"w_bits": None, "a_bits": 6, "sqnr_db": {"a6": 12.5}}) == 12.5
    assert layer_sqnr({"w_bits": 8, "a_bits": 8, "sqnr_db": 33.0}) == 33.0
    assert layer_sqnr({"w_bits": 8, "a_bits": 8, "sqnr_db": {"w4a4": 1.0, "w6a6": 2.0}}) is None


@pytest.mark.slow
def test_report_of_a_real_deit_tiny_w8a8_compile(shared_data, tmp_path, capsys):
    """The real thing (1-4 min, depending on machine load): compile DeiT-Tiny w8a8 with the real weights, evaluate 64 dev650 images, and
    report; the HTML's tables equal report.json/eval.json and the three plots decode."""
    from conftest import DEIT_WEIGHTS, DEV650, SAMPLE1000

    d = tmp_path / "deit_w8a8"
    assert main(["compile", "deit_tiny_patch16_224", "--weights", str(DEIT_WEIGHTS), "--calib", str(SAMPLE1000),
                 "--calib-count", "8", "--recipe", "w8a8", "--out", str(d), "-q"]) == 0
    assert main(["eval", str(d), "--images", str(DEV650), "--count", "64", "--reference",
                 str(d / "model.fp32.onnx"), "--json", str(d / "eval.json")]) == 0
    capsys.readouterr()
    assert main(["report", str(d)]) == 0
    rep, ev = json.loads((d / "report.json").read_text()), json.loads((d / "eval.json").read_text())
    doc = Doc((d / "report.html").read_text())
    rows = doc.tables["recipe-table"]
    assert [r[1] for r in rows] == [l["module"] for l in rep["recipe"]["layers"]] and len(rows) == 62
    for r, l in zip(rows, rep["recipe"]["layers"]):
        assert float(r[7]) == pytest.approx(layer_sqnr(l), abs=0.005)
    (arow,) = doc.tables["accuracy-table"]
    assert float(arow[4]) == pytest.approx(ev["top1"], abs=0.005)
    assert len(doc.imgs) == 3
    for src in doc.imgs:
        _, im = decode_png(src)
        assert im.width >= 800 and im.height >= 500
