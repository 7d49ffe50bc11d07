"""How much of a recipe's accuracy is the recipe, and how much the realization: score the simulation under tiny
input perturbations.

    python bench/realizations.py --recipes w4a8,PATH.json,... [--base w4a8] [--noise 1e-4] [--seeds 4]
                                 [--images union|dev650] [--out bench/results/realizations.json]
                                 [--base-from EARLIER.json]
    python bench/realizations.py --report RESULTS.json [--base w4a8 --base-from EARLIER.json]
    python bench/realizations.py --report SIM.json,ORT.json [--out POOLED.json]   # pool the realizations

A quantized network is a discontinuous function: a perturbation far below anything a camera or a float
reordering could tell apart flips rounding decisions, and the flips cascade. ``bench/qdq_agreement.py`` shows
the simulation and the ONNX Runtime graph of one recipe differing by a median relative logit error of 6.5% (W4A8)
to 20% (MixA-Q 1.6x, dynamic low branch); multiplying the input by ``1 + noise * N(0, 1)`` with ``noise = 1e-4``
moves the simulation by the same amounts (this script prints it). So a recipe's top-1 on 1370 images is one draw
from a spread of realizations; this script measures the spread and scores each recipe's *mean over realizations*:

* realization 0 is the unperturbed simulation, realizations 1..``--seeds`` perturb the input (seed k, the same
  perturbation for every recipe, so the base and a candidate are compared on the same draw);
* per recipe: top-1, agreement with fp32 and KL(fp32 || q) per realization, their mean and standard deviation, and
  the median relative logit change of each perturbed realization against realization 0;
* per candidate, against ``--base``: the top-1 drop and agreement change per realization, their mean, min and max.

MixA-Q recipes (a ``mixa`` section) run their two-branch simulation. ``--realization ort`` (or ``trt``) scores the
deployed graph instead: what ``vitq compile --target ort`` writes, run on ONNX Runtime (the TensorRT graph runs
there unoptimized, plugins expanded to their exact ONNX form), under the same perturbations; the graph is one more
float32 implementation of the recipe, so its mean over realizations is the deployed recipe's score.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from vitq.data import load_array, open_image_set  # noqa: E402
from vitq.evaluate import agreement, kl_mean, top1  # noqa: E402
from vitq.exporter.models import data_config, load_model  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402
from vitq.runtime.preprocess import PreprocessConfig  # noqa: E402

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))


def perturbed(x: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Realization ``seed`` of the input: ``x`` itself for seed 0, else ``x * (1 + noise * N(0, 1))``."""
    if seed == 0:
        return x
    g = torch.Generator().manual_seed(seed)
    return x * (1 + noise * torch.randn(x.shape, generator=g))


def scores(logits: np.ndarray, fref: np.ndarray, y: np.ndarray) -> dict:
    return {"top1": top1(logits, y) * 100, "agreement_fp32": agreement(logits, fref) * 100,
            "kl_fp32": kl_mean(fref, logits)}


def dev650_scoring(base: str | None):
    """DeiT-Tiny (real weights) and dev650 for the simulation what-if benches: ``(lm, score, base_row)`` with
    ``score(sim) -> scores(...)`` on dev650 and ``base_row`` the base recipe's (``bench/results/recipes/{base}``;
    None when ``base`` is empty)."""
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    x, y = load_array(open_image_set(SHARED / "imagenet-val-dev650"), cfg)
    x = torch.from_numpy(x)
    with torch.no_grad():
        fref = torch.cat([lm.model(x[i:i + 50]) for i in range(0, len(x), 50)]).double().numpy()

    def score(sim):
        with torch.no_grad():
            return scores(sim.predict(x, batch_size=50).numpy().astype(np.float64), fref, y)

    row = None
    if base:
        _, bsim = apply_recipe(lm.model, lm.family, Recipe.load(REPO / "bench" / "results" / "recipes" /
                                                                 f"{base}.json"))
        row = {"variant": f"base {base}", **score(bsim)}
    return lm, score, row


def graph_predictor(lm, qm, rec: Recipe, cfg, target: str, stem: Path, threads: int):
    """``predict(x) -> logits`` of the graph ``vitq compile --target TARGET`` deploys for ``rec`` (``qm`` is its
    prepared model), run on ONNX Runtime in batches of 50 (int4 MatMul exact)."""
    from qdq_agreement import deployed_graph, export_prepared

    from vitq.runtime import Engine

    stem.parent.mkdir(parents=True, exist_ok=True)
    prepared = export_prepared(lm, qm, cfg, stem.with_suffix(".prepared.onnx"))
    mpath, _ = deployed_graph(prepared, rec, target, stem.with_suffix(f".{target}.onnx"))
    eng = Engine.load(mpath, backend="ort", threads=threads, int4_matmul="exact")

    def predict(x: torch.Tensor) -> np.ndarray:
        xs = x.numpy()
        return np.concatenate([eng.run(xs[i:i + 50]) for i in range(0, len(xs), 50)])

    return predict


def summarize(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals)}


def with_base_from(res: dict, base: str, path: Path, images: str, n: int, noise: float,
                   realization: str = "sim") -> dict:
    """``res`` plus recipe ``base`` taken from an earlier run's JSON (same images, count and noise: its seed k is
    the same perturbation as this run's seed k), listed first."""
    old = json.loads(path.read_text())
    if (old.get("images"), old.get("n"), old.get("noise")) != (images, n, noise):  # realization: checked by caller
        raise SystemExit(f"--base-from {path}: images/n/noise {old.get('images')}/{old.get('n')}/{old.get('noise')} "
                         f"differ from this run's {images}/{n}/{noise}")
    if old.get("realization", "sim") != realization:
        raise SystemExit(f"--base-from {path}: realization {old.get('realization', 'sim')!r} differs from this "
                         f"run's {realization!r}")
    if base not in old.get("recipes", {}):
        raise SystemExit(f"--base-from {path}: no recipe {base!r} in it")
    return {base: {**old["recipes"][base], "from": str(path)}, **{k: v for k, v in res.items() if k != base}}


def compare(res: dict, base: str) -> None:
    """Per candidate, ``vs_base``: top-1 drop and agreement change per realization, paired by seed (the seeds both
    ran), with mean, min and max."""
    b = res.get(base)
    if b is None:
        return
    by_seed = {r["seed"]: r for r in b["realizations"]}
    for name, r in res.items():
        if name == base:
            continue
        pairs = [(by_seed[c["seed"]], c) for c in r["realizations"] if c["seed"] in by_seed]
        drops = [p["top1"] - c["top1"] for p, c in pairs]
        agrs = [c["agreement_fp32"] - p["agreement_fp32"] for p, c in pairs]
        r["vs_base"] = {"base": base, "seeds": [c["seed"] for _, c in pairs], "drop": summarize(drops),
                        "agree_change": summarize(agrs)}


N_DEV650 = 650


def dev650_view(res: dict, base: str) -> dict:
    """The same results scored on dev650 alone (each realization's ``dev650`` scores), compared with ``base``;
    empty when the realizations have none (a dev650-only run, or an older results file)."""
    out = {}
    for name, r in res.items():
        rows = [{"seed": q["seed"], **q["dev650"]} for q in r["realizations"] if "dev650" in q]
        if rows and len(rows) == len(r["realizations"]):
            out[name] = {"realizations": rows, **{k: summarize([q[k] for q in rows])
                                                  for k in ("top1", "agreement_fp32", "kl_fp32")}}
    compare(out, base)
    return out


def table(res: dict) -> str:
    lines = ["| recipe | top-1 mean ± std [min, max] | agreement mean ± std | KL mean | drop vs base mean [min, max] | "
             "agreement change mean [min, max] |", "|---|---|---|---|---|---|"]
    for name, r in res.items():
        vb = r.get("vs_base")
        lines.append(
            f"| {name} | {r['top1']['mean']:.2f} ± {r['top1']['std']:.2f} [{r['top1']['min']:.2f}, "
            f"{r['top1']['max']:.2f}] | {r['agreement_fp32']['mean']:.2f} ± {r['agreement_fp32']['std']:.2f} | "
            f"{r['kl_fp32']['mean']:.4f} | "
            + (f"{vb['drop']['mean']:.2f} [{vb['drop']['min']:.2f}, {vb['drop']['max']:.2f}] | "
               f"{vb['agree_change']['mean']:+.2f} [{vb['agree_change']['min']:+.2f}, "
               f"{vb['agree_change']['max']:+.2f}] |" if vb else "- | - |"))
    return "\n".join(lines)


def pooled(paths: list[Path]) -> dict:
    """Several runs' results as one: the recipes every run scored, each with all the runs' realizations, a
    realization's ``seed`` becoming ``"{realization}:{seed}"`` (``sim:2``, ``ort:2``) so that a base and a candidate
    still pair up within one implementation and one perturbation. The runs must share images, count and noise.
    The simulation and a deployed graph are float32 implementations of one recipe that differ by as much as two
    perturbations do, so their realizations are draws of the same kind (see the module docstring)."""
    runs = [json.loads(p.read_text()) for p in paths]
    key = {(r.get("images"), r.get("n"), r.get("noise")) for r in runs}
    if len(key) != 1:
        raise SystemExit(f"--report {','.join(map(str, paths))}: the runs differ in images/n/noise: {sorted(key)}")
    reals = [r.get("realization", "sim") for r in runs]
    names = [n for n in runs[0]["recipes"] if all(n in r["recipes"] for r in runs)]
    for name in names:
        seen = [(real, q["seed"]) for real, r in zip(reals, runs) for q in r["recipes"][name]["realizations"]]
        if len(set(seen)) != len(seen):
            raise SystemExit(f"--report: {name} has the same realization and seed in two runs; pool different "
                             "implementations or disjoint seeds (--seed-from)")
    res = {}
    for name in names:
        rows = [{**q, "seed": f"{real}:{q['seed']}"} for real, r in zip(reals, runs)
                for q in r["recipes"][name]["realizations"]]
        res[name] = {"realizations": rows, **{k: summarize([q[k] for q in rows])
                                              for k in ("top1", "agreement_fp32", "kl_fp32")}}
    images, n, noise = next(iter(key))
    return {"images": images, "n": n, "noise": noise, "realization": "+".join(dict.fromkeys(reals)),
            "pooled": [str(p) for p in paths], "recipes": res}


def report(path: Path | list[Path], base: str, base_from: Path | None, out: Path | None = None) -> int:
    """Re-print (and, with ``base_from``, re-compare) a results file without recomputing; with ``out``, also write
    the combined results there (e.g. a run's recipes with the base's realizations from another run). A list of
    files is pooled first (``pooled``)."""
    if isinstance(path, list) and len(path) == 1:
        path = path[0]
    d = pooled(path) if isinstance(path, list) else json.loads(path.read_text())
    if isinstance(path, list) and base_from is not None:
        raise SystemExit("--base-from does not combine with pooled runs")
    res = d["recipes"]
    if base_from is not None:
        res = with_base_from(res, base, base_from, d["images"], d["n"], d["noise"], d.get("realization", "sim"))
    compare(res, base)
    print(f"{d['n']} images, noise {d['noise']:g}, realizations: {d.get('realization', 'sim')}")
    print(table(res))
    dev = dev650_view(res, base)
    if dev:
        print(f"\ndev650 alone (the first {N_DEV650} of the {d['n']})")
        print(table(dev))
    if out is not None:
        _write(out, {**d, "recipes": res, "base_from": None if base_from is None else str(base_from),
                     **({"recipes_dev650": dev} if dev else {})})
    return 0


def _write(out: Path, d: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(d, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", help="comma list: names in --recipe-dir or .json paths")
    ap.add_argument("--base-from", metavar="JSON", help="take --base's realizations from an earlier run's results "
                    "(same --images and --noise) instead of recomputing them")
    ap.add_argument("--report", metavar="JSON", help="only print (and compare) an earlier run's results; a comma "
                    "list pools the runs' realizations (e.g. the simulation's and the ORT graph's)")
    ap.add_argument("--recipe-dir", default=str(REPO / "bench" / "results" / "recipes"))
    ap.add_argument("--base", default="w4a8", help="the recipe (stem) the others are compared with")
    ap.add_argument("--noise", type=float, default=1e-4)
    ap.add_argument("--seeds", type=int, default=4, help="perturbed realizations besides the unperturbed one")
    ap.add_argument("--seed-from", type=int, default=0, help="run seeds K..--seeds only (more draws for an earlier "
                    "run, pooled with it by --report A,B)")
    ap.add_argument("--images", choices=("dev650", "union"), default="union")
    ap.add_argument("--realization", choices=("sim", "ort", "trt"), default="sim",
                    help="what is perturbed and scored: the torch simulation (float32), or the deployed graph for "
                    "that target run on ONNX Runtime (bench/qdq_agreement.py's graphs)")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (--realization ort|trt)")
    ap.add_argument("--out", help="results JSON (default bench/results/realizations.json; with --report: written "
                    "only when given)")
    args = ap.parse_args(argv)
    if args.report:
        return report([Path(p) for p in args.report.split(",")], args.base, Path(args.base_from) if args.base_from else None,
                      Path(args.out) if args.out else None)
    args.out = args.out or str(REPO / "bench" / "results" / "realizations.json")
    if not args.recipes:
        ap.error("--recipes is required (or --report)")
    if args.seed_from > args.seeds:
        ap.error(f"--seed-from {args.seed_from} is past --seeds {args.seeds}: no realization to run")
    lm = load_model("deit_tiny_patch16_224", SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth")
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    x, y = load_array(open_image_set(SHARED / "imagenet-val-dev650"), cfg)
    if args.images == "union":
        from heldout import heldout_set

        xh, yh = load_array(heldout_set(), cfg)
        x, y = np.concatenate([x, xh]), np.concatenate([y, yh])
    x = torch.from_numpy(x)
    with torch.no_grad():
        fref = torch.cat([lm.model(x[i:i + 50]) for i in range(0, len(x), 50)]).double().numpy()
    seeds = list(range(args.seed_from, args.seeds + 1))
    res: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="vitq-real-")) if args.realization != "sim" else None
    for name in args.recipes.split(","):
        path = Path(name) if name.endswith(".json") else Path(args.recipe_dir) / f"{name}.json"
        rec = Recipe.load(path)
        qm, sim = apply_recipe(lm.model, lm.family, rec)
        if rec.mixa is not None:
            sim = MixaSim(sim, rec.mixa)
        predict = graph_predictor(lm, qm, rec, cfg, args.realization, tmp / path.stem, args.threads) \
            if tmp is not None else (lambda xs: sim.predict(xs, batch_size=50).numpy())
        rows, preds, ref0 = [], [], None
        for s in seeds:
            t = time.time()
            with torch.no_grad():
                logits = np.asarray(predict(perturbed(x, args.noise, s)), np.float64)
            r = {"seed": s, **scores(logits, fref, y), "s": round(time.time() - t, 1)}
            if args.images == "union":  # the set alone too: the union starts with dev650
                r["dev650"] = scores(logits[:N_DEV650], fref[:N_DEV650], y[:N_DEV650])
            if ref0 is None:  # seed 0, or the first seed run (--seed-from)
                ref0 = logits
            else:
                r["median_rel_change_vs_seed0"] = float(np.median(np.linalg.norm(logits - ref0, axis=1)
                                                                  / np.linalg.norm(ref0, axis=1)))
                r["top1_agreement_vs_seed0"] = float((logits.argmax(1) == ref0.argmax(1)).mean() * 100)
            rows.append(r)
            preds.append(logits.argmax(1))
            print(f"{path.stem} seed {s}: top-1 {r['top1']:.2f} agree {r['agreement_fp32']:.2f} KL {r['kl_fp32']:.4f}"
                  + (f"  vs seed 0: rel {r['median_rel_change_vs_seed0']:.3f}, top-1 agree "
                     f"{r['top1_agreement_vs_seed0']:.2f}%" if "median_rel_change_vs_seed0" in r else ""), flush=True)
        res[path.stem] = {"path": str(path), "realizations": rows,
                          **{k: summarize([r[k] for r in rows]) for k in ("top1", "agreement_fp32", "kl_fp32")}}
    if args.base_from:
        res = with_base_from(res, args.base, Path(args.base_from), args.images, int(len(x)), args.noise,
                             args.realization)
    compare(res, args.base)
    print(f"\n{len(x)} images, noise {args.noise:g}, realizations: unperturbed + {args.seeds}")
    print(table(res))
    dev = dev650_view(res, args.base)
    if dev:
        print(f"\ndev650 alone (the first {N_DEV650} of the {len(x)})")
        print(table(dev))
    _write(Path(args.out), {"images": args.images, "n": int(len(x)), "noise": args.noise, "seeds": args.seeds,
                            "realization": args.realization,
                            "recipes": res, **({"recipes_dev650": dev} if dev else {})})
    return 0


if __name__ == "__main__":
    sys.exit(main())
