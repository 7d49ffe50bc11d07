"""Regenerate ``docs/results.md`` and the README's measured table (between its ``results`` markers) from the
committed result files ``bench/results/*.json``.

    python -m bench report [--check]

The page is a pure function of those files (no clock, no machine state), so regenerating it on any machine gives
the committed page byte for byte (``tests/test_bench_report.py`` checks it); ``--check`` exits 1 when the page is
stale. Known benchmarks get a dedicated table; any other result file renders generically: a table of its
``results`` rows (a list of dicts, or a dict with ``rows``), with its command, data, machine and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from bench.common import REPO, RESULTS, flags_str
from vitq.recipe import UNIFORM_PRESETS

DOC = REPO / "docs" / "results.md"
ORDER = ("accuracy", "latency", "compile", "mixa", "cpu_forms", "models", "serve", "gpu")
TITLES = {"accuracy": "Accuracy of the deployed recipes", "latency": "Latency on ONNX Runtime (CPU)",
          "compile": "Compile cost", "mixa": "MixA-Q (simulation)", "cpu_forms": "CPU int8 forms",
          "models": "Model matrix (random weights)", "serve": "Serving under load", "gpu": "Plugin kernels on a GPU"}


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "\\|")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out


def _kind(name: str) -> str:
    """The benchmark a result file belongs to: ``cpu_forms_vnni`` -> ``cpu_forms`` (one file per CPU ISA class)."""
    return "cpu_forms" if name.startswith("cpu_forms_") else name


def _commands(name: str, d: dict) -> list[str]:
    runs = d.get("runs") or []
    if len(runs) <= 1:
        return [f"`{d.get('command', 'python -m bench ' + name)}` (`bench/results/{name}.json`, {d.get('date', '?')})"]
    return [f"`bench/results/{name}.json` holds the rows of {len(runs)} runs:", "",
            *[f"- `{r['command']}` ({r['date']})" for r in runs]]


def _as_flags(recipe: str) -> str:
    """A bench recipe name as the compile flags that build it: ``w4a8+recon`` -> ``w4a8 --reconstruct``."""
    base, *mods = recipe.split("+")
    flags = {"recon": "--reconstruct", "static4": "--act4 static"}
    return " ".join([base] + [flags.get(m.split("=")[0], "+" + m) + (" " + m.split("=")[1] if "=" in m else "")
                              for m in mods])


def _header(name: str, d: dict) -> list[str]:
    v = d.get("versions") or {}
    title = TITLES.get(_kind(name), name) + (f" ({name.split('_', 2)[2]})" if _kind(name) != name else "")
    return [f"## {title}", "",
            *_commands(name, d), "",
            f"- data: {d.get('data', '-')}",
            f"- machine: {flags_str(d['machine']) if d.get('machine') else '-'}",
            "- versions: " + (", ".join(f"{k} {v[k]}" for k in sorted(v)) or "-"), ""]


def _rows(results: Any) -> list[dict]:
    if isinstance(results, dict):
        results = results.get("rows", results.get("results", []))
    return [r for r in results if isinstance(r, dict)] if isinstance(results, list) else []


def _with_cpu(head: list[str], table: list[list[Any]], rows: list[dict], d: dict) -> list[str]:
    """``head``/``table`` as a table, with a CPU column when the file's rows come from runs on different CPUs
    (a row without ``cpu`` ran on the file's ``machine``)."""
    here = flags_str(d["machine"]) if d.get("machine") else "-"
    cpus = [x.get("cpu", here) for x in rows]
    if len(set(cpus)) <= 1:
        return _table(head, table)
    return _table(head + ["CPU"], [line + [c] for line, c in zip(table, cpus)])


def render_accuracy(d: dict) -> list[str]:
    r = d["results"]
    fp = r.get("fp32", {})
    sets = [s for s in ("dev650", "heldout", "all") if s in fp]
    n = r.get("n") or {s: next((x["n"] for x in r["rows"] if x["set"] == s), None) for s in sets}
    out = [f"fp32 top-1: " + ", ".join(f"{s} ({n[s]} images) {_f(fp.get(s))}" for s in sets) + ".", "",
           "Top-1 difference to fp32 with its paired 95% bootstrap interval; *noise*: the interval holds 0.", ""]
    rows = []
    for x in r["rows"]:
        lo, hi = x["delta_top1_ci95"]
        rows.append([x["recipe"], x["set"], x["n"], x["top1"], f"{x['delta_top1']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                     + (" *noise*" if x["within_noise"] else ""), x["agreement"], _f(x["kl"], 4)])
    if not rows:
        return out[:1]
    out += _with_cpu(["recipe", "images", "n", "top-1", "vs fp32 [95%]", "agreement with fp32 %", "KL(fp32 ‖ q)"],
                     rows, r["rows"], d)
    real = [x for x in r["rows"] if x.get("realizations")]
    if real:
        out += ["", f"Over {real[0]['realizations']['draws']} realizations (input x (1 + {r.get('noise')} N(0,1))), "
                "mean ± std:", ""]
        out += _table(["recipe", "images", "top-1", "vs fp32", "agreement %", "KL"],
                      [[x["recipe"], x["set"]] + [f"{x['realizations'][k]['mean']:.2f} ± "
                                                  f"{x['realizations'][k]['std']:.2f}"
                                                  for k in ("top1", "delta_top1", "agreement")]
                       + [f"{x['realizations']['kl']['mean']:.4f}"] for x in real])
    return out


def render_latency(d: dict) -> list[str]:
    r = d["results"]
    out = [f"{r['threads']} ONNX Runtime threads, {r['rounds']} interleaved rounds of {r['per_round']} runs per model; "
           f"load average at start {r['loadavg_at_start'][0]} on {d['machine']['cores']} cores (the machine was "
           "shared with other jobs: read the ratios, not the milliseconds).", ""]
    out += _table(["recipe", "batch", "p50 ms", "p90 ms", "vs fp32 (spread over rounds)"],
                  [[x["recipe"], x["batch"], _f(x["p50_ms"], 1), _f(x["p90_ms"], 1),
                    f"{x['ratio']:.2f} ({x['ratio_min']:.2f}..{x['ratio_max']:.2f})"] for x in r["rows"]])
    return out


def _busy(x: dict) -> str:
    """' (busy N%)' when other processes took more than a tenth of the machine's CPU during the measurement."""
    share = x.get("others_cpu_share")
    return f" (busy {share:.0%})" if share is not None and share > 0.1 else ""


def render_compile(d: dict) -> list[str]:
    def steps(x):
        cal = x.get("calibration_s") or {}
        return ", ".join(f"{k[:-2]} {v:.0f}" for k, v in cal.items() if k != "total_s" and v >= 1) or "-"

    r = d["results"]
    out = _with_cpu(
        ["model", "recipe", "calibration images", "params M", "wall s", "CPU s", "peak RSS MiB",
         "calibration steps s", "budget s"],
        [[x.get("model", r.get("model", "-")),
          x["recipe"] if x.get("requested", x["recipe"]) == x["recipe"] else f"{x['requested']} (as {x['recipe']})",
          _f(x.get("calib_count", r.get("calib_count"))), _f(x.get("params_m")), _f(x["wall_s"], 0) + _busy(x),
          _f(x["cpu_s"], 0), _f(x["peak_rss_mib"], 0), steps(x),
          _f(x.get("limit_s"), 0) + (f" ({x['note']})" if x.get("note") else "")] for x in _rows(r)], _rows(r), d)
    # scaling with model size: wall time ratio next to the parameter ratio (FLOPs per image scale alike for ViTs
    # of one patch size and resolution)
    by = {(x.get("model"), x.get("requested", x["recipe"]), x.get("calib_count", r.get("calib_count"))): x
          for x in _rows(r)}
    base = by.get(("deit_tiny_patch16_224", "w4a4", 64))
    lines = []
    for m in ("deit_small_patch16_224", "vit_base_patch16_224"):
        x = by.get((m, "w4a4", 64))
        if base and x:
            lines.append(f"- {m} w4a4, 64 images: {x['wall_s'] / base['wall_s']:.2f}x DeiT-Tiny's compile time for "
                         f"{x['params_m'] / base['params_m']:.1f}x its parameters")
    return out + ([""] + lines if lines else [])


def render_mixa(d: dict) -> list[str]:
    r = d["results"]
    out = [f"fp32 top-1 {_f(r.get('fp32_top1'))}; base W4A8 top-1 {_f(r.get('base_top1'))}, agreement "
           f"{_f(r.get('base_agreement'))} ({r.get('eval')} images).", ""]
    out += _table(["kind", "configuration", "top-1", "drop vs base", "agreement % (vs base)", "Gbit-ops",
                   "reduction vs W4A8"],
                  [[x["kind"], x["config"], x["top1"], f"{x['drop_vs_base']:+.2f}",
                    f"{x['agreement']:.2f} ({x['agreement_vs_base_pts']:+.2f})", x["gbitops"],
                    f"{x['reduction_vs_w4a8']:.2f}x"] for x in r["rows"]])
    return out


def render_gpu(d: dict) -> list[str]:
    r = d["results"]
    checks = [c for k in ("pack", "api", "linear", "window") for c in r.get(k, []) if isinstance(c, dict)]
    ok = sum(1 for c in checks if c.get("ok"))
    return [f"Device {r.get('device')} (sm_{r.get('sm')}): {ok} of {len(checks)} kernel checks pass against the "
            "numpy references (QuantLinearA4 float32 output bit-exact)."]


def render_serve(d: dict) -> list[str]:
    r = d["results"]
    rows = [[x["server"], x["concurrency"], x["ok"], x["errors"], x["lost"], x["latency_ms"]["p50"],
             x["latency_ms"]["p99"], x["throughput_req_s"], x.get("mean_batch")] for x in r.get("levels", [])]
    agree = r.get("top1_agree") or {}
    return _table(["server", "concurrency", "ok", "errors", "lost", "p50 ms", "p99 ms", "req/s", "mean batch"], rows) + [
        "", f"{r.get('model')} {r.get('recipe')}; top-1 identical from both servers on {agree.get('same')} of "
            f"{agree.get('images')} images. {r.get('note', '')}"]


def render_cpu_forms(d: dict) -> list[str]:
    r, out = d["results"], []
    for model, forms in (r.get("models") or {}).items():
        if "candidates" in forms:
            out += _cpu_forms_model(model, forms, r)
            continue
        rows = []
        for form, v in forms.items():
            if not isinstance(v, dict):
                continue
            lat = v.get("ratio_to_float") or {}
            rows.append([form, v.get("fused_vs_unoptimized_rel_l2"), lat.get("ratio_median"),
                         f"{_f(lat.get('ratio_min'))}..{_f(lat.get('ratio_max'))}"])
        shape = f" (shape {forms['shape']})" if isinstance(forms.get("shape"), list) else ""
        out += [f"{model}{shape}, CPU ISA class {r.get('cpu_isa')}:", ""]
        out += _table(["form", "ORT fused vs unoptimized (rel. L2)", "latency / fp32 (median)", "range"], rows) + [""]
    return out + [r.get("note", "")] if out else ["(no rows)"]


def _cpu_forms_model(key: str, m: dict, r: dict) -> list[str]:
    """One model's candidates: vitq's forms, ONNX Runtime's ``quantize_static`` configurations, fp32."""
    rows = []
    for name, c in m["candidates"].items():
        if "agreement" not in c:
            rows.append([name, "-", "-", "-", "-", "-", "-", (c.get("error") or "")[:60]])
            continue
        lat = c.get("latency") or {}

        def ratio(b):
            v = lat.get(b)
            return f"{v['ratio_median']:.3f} ({v['ratio_min']:.2f}..{v['ratio_max']:.2f})" if v else "-"

        rows.append([name, _f(c["agreement"]), _f(c.get("kl"), 4), _f(c.get("top1")), ratio("b1"), ratio("b8"),
                     "exact" if c.get("exact_by_form") else ("-" if c["kind"] == "fp32" else
                                                               ("not exact" if c["kind"] == "vitq" else "n/a")),
                     ""])
    head = [f"{m['model']} ({m['weights']} weights), {m['eval_images']} images, CPU ISA class {m.get('cpu_isa')}:", ""]
    out = head + _table(["candidate", "agreement with fp32 %", "KL", "top-1 %", "batch 1 / fp32", "batch 8 / fp32",
                         "int8 kernels on this CPU", "note"], rows) + [""]
    v = m.get("default_vs_ort_best")
    if v:
        d, o, kl = v["agreement"], v["b8_ratio"], v.get("kl") or [None, None]
        ci = v.get("agreement_diff_ci95")
        noise = (f", difference {ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]"
                 f"{' (within noise)' if v.get('agreement_within_noise') else ''}" if ci else "")
        out += [f"Default `--recipe w8a8` against ONNX Runtime's best `quantize_static` ({m['ort_best_by_agreement']}): "
                f"agreement {d[0]:.2f}% vs {d[1]:.2f}%{noise}; KL {_f(kl[0], 4)} vs {_f(kl[1], 4)}; "
                f"batch-8 latency {o[0]:.3f} vs {o[1]:.3f} of fp32 (goal <= {v['goal_b8_ratio']:.2f}).", ""]
    return out


def _agreement(v: dict) -> str:
    """The graph-vs-simulation verdict of a matrix cell: nothing when the logits agree within the float-sensitivity
    bound, a note when only the teacher-forced check shows it (a rounding flip moved the logits), else differs."""
    if not v.get("agrees"):
        return " (differs)"
    per, sens = v.get("graph_vs_sim_per_image"), v.get("sim_fp32_sensitivity_per_image")
    if per and sens and max(per) > max(1e-5, 3 * max(sens)):
        if v.get("forced"):
            where = (v["forced"].get("first_flip") or "a quantizer").split(" ")[0]
            return f" (flip at {where}; forced check ok)"
    return ""


def render_models(d: dict) -> list[str]:
    """Per architecture: the fp32 export check, then per recipe the compile time, the deployed graph against the
    simulation (relative L2, next to the simulation's own float32 sensitivity: float64 vs float32), and
    ``trt_check``."""
    r = d["results"]
    recipes = r.get("recipes", [])
    rows = []
    for x in _rows(r):
        line = [x["model"], x.get("class", "-"), _f(x.get("params_m"))]
        fp = x.get("fp32")
        line.append(f"{fp['max_abs_diff']:.1e}" if fp else (x.get("error") or "-")[:50])
        for rc in recipes:
            v = x.get(rc) or {}
            if "error" in v:
                line += ["-", v["error"][:50], "-"]
                continue
            busy = x.get("others_cpu_share")
            line += [_f(v.get("compile_s"), 0) + (" (load unknown)" if busy is None else _busy(x)),
                     f"{v['graph_vs_sim_rel_l2']:.1e} / {v.get('sim64_vs_sim_rel_l2', float('nan')):.1e}"
                     f"{_agreement(v)}" if "graph_vs_sim_rel_l2" in v else "-",
                     ("ok" if v["trt_check"]["ok"] else "FAIL " + ",".join(v["trt_check"]["errors"]))
                     if "trt_check" in v else "-"]
        lat = (x.get("w8a8") or {}).get("ort_latency")
        line.append(f"{1 / lat['ratio_fp32_over_w8a8']:.2f}" if lat else "-")
        rows.append(line)
    head = ["model", "class", "params M", "fp32 export max diff"]
    for rc in recipes:
        head += [f"{rc} compile s", f"{rc} graph vs sim / sim float64 vs float32", f"{rc} trt_check"]
    head.append("w8a8 / fp32 latency (batch 1, 1 thread)")
    return [f"{r.get('images')} calibration images per model (synthetic pixels through the model's preprocessing). "
            "*busy N%*: other processes used N% of the machine's CPU during that model's compiles, so its times "
            "are not comparable; *load unknown*: measured before the matrix recorded it. *forced check ok*: an "
            "image's logits moved beyond the float-sensitivity bound by a rounding flip at the quantizer named, "
            "while every quantizer and float segment agrees with the simulation fed the graph's values "
            "(`vitq.quant.forced`).", ""] + \
        _with_cpu(head, rows, _rows(r), d)


def render_generic(d: dict) -> list[str]:
    rows = _rows(d.get("results"))
    if not rows:
        return ["(no rows)"]
    cols: list[str] = []
    for x in rows:
        cols += [k for k, v in x.items() if k not in cols and (v is None or isinstance(v, (str, int, float, bool)))]
    return _table(cols, [[x.get(c) for c in cols] for x in rows])


RENDER: dict[str, Callable[[dict], list[str]]] = {
    "accuracy": render_accuracy, "latency": render_latency, "compile": render_compile, "mixa": render_mixa,
    "gpu": render_gpu, "serve": render_serve, "cpu_forms": render_cpu_forms, "models": render_models}


def render(results_dir: Path = RESULTS) -> str:
    """The text of docs/results.md for the result files in ``results_dir``."""
    files = {p.stem: p for p in sorted(results_dir.glob("*.json"))}
    names = [n for k in ORDER for n in sorted(files) if _kind(n) == k]
    names += sorted(n for n in files if n not in names)
    out = ["# Measured results", "",
           "Generated by `python -m bench report` from `bench/results/*.json`; do not edit by hand. Each section",
           "names the command that wrote its file, the data, the CPU (model, cores, int8-relevant ISA flags), the",
           "package versions and the date. Latency ratios come from interleaved rounds in one process.", ""]
    for n in names:
        d = json.loads(files[n].read_text())
        out += _header(n, d) + RENDER.get(_kind(n), render_generic)(d) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


README = REPO / "README.md"
BEGIN, END = "<!-- results:begin (python -m bench report) -->", "<!-- results:end -->"


def readme_block(results: Path = RESULTS) -> str:
    """The README's measured table: every recipe of ``accuracy.json`` on all its images, with its batch-8 latency
    ratio from ``latency.json`` where that recipe was timed."""
    f = results / "accuracy.json"
    if not f.is_file():
        return ""
    d = json.loads(f.read_text())
    r = d["results"]
    lat: dict[str, str] = {}
    lf = results / "latency.json"
    lat_cpu = "-"
    if lf.is_file():
        ld = json.loads(lf.read_text())
        lat_cpu = flags_str(ld["machine"]) if ld.get("machine") else "-"
        for x in ld["results"]["rows"]:
            if x["batch"] == 8:
                lat[x["recipe"]] = f"{x['ratio']:.2f}x"
    order = [*UNIFORM_PRESETS, "mp:5"]  # the presets from the widest down

    def rank(x):
        base = x["recipe"].split("+")[0]
        return order.index(base) if base in order else len(order), x["recipe"]

    rows = sorted((x for x in r["rows"] if x["set"] == "all"), key=rank)
    n = rows[0]["n"] if rows else 0
    lines = [f"DeiT-Tiny with the real weights, calibrated on {r['calib_count']} sample images, deployed ONNX Runtime "
             f"graph, on {n} labeled images (`python -m bench accuracy`); batch-8 latency relative to fp32 on "
             f"{lat_cpu} (`python -m bench latency`, interleaved rounds):", "",
             f"| recipe | top-1 (fp32: {_f(r['fp32'].get('all'))}) | vs fp32 [paired 95%] | agreement with fp32 | "
             f"KL(fp32 ‖ q) | batch-8 latency vs fp32 |", "|---|---|---|---|---|---|"]
    for x in rows:
        lo, hi = x["delta_top1_ci95"]
        lines.append(f"| `{_as_flags(x['recipe'])}` | {x['top1']:.2f} | {x['delta_top1']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                     f"{': within noise' if x['within_noise'] else ''} | {x['agreement']:.2f}% | {x['kl']:.4f} | "
                     f"{lat.get(x['recipe'], '-')} |")
    return "\n".join(lines) + "\n"


def render_readme(text: str) -> str:
    """``text`` (the README) with the block between the markers regenerated."""
    if BEGIN not in text or END not in text:
        return text
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + readme_block() + END + tail


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/results.md differs from the regenerated page")
    args = ap.parse_args(argv)
    pages = {DOC: render()}
    if README.is_file():
        pages[README] = render_readme(README.read_text())
    if args.check:
        stale = [p for p, text in pages.items() if not (p.is_file() and p.read_text() == text)]
        for p in pages:
            print(f"{p}: " + ("stale: run python -m bench report" if p in stale else "up to date"))
        return 1 if stale else 0
    for p, text in pages.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(p)
        print(f"wrote {p}")
    return 0
