"""Accuracy of deployed recipes against fp32, as a user should read it: DeiT-Tiny with the real ImageNet weights.

    python -m bench accuracy [--recipes w8a8,w7a8,w4a8,w4a4+static4,w4a8+recon] [--calib-count 256]
                             [--realizations N] [--count N]

Each recipe is compiled with ``vitq compile`` (calibration on a seeded subset of ``--calib-count`` images of the
sample set; artifacts cached under ``--build``) and its deployed graph (``model.onnx``, ONNX Runtime, optimizations
on) is scored together with the fp32 export on the same preprocessed batches, on

* ``dev650``: the 650 labeled validation images,
* ``heldout``: the sample-set images calibration did not use (744 with 256 calibration images),
* ``all``: both (1394 images).

Per recipe and set: top-1, top-1 agreement with fp32, mean KL(fp32 || quantized), and the top-1 difference to
fp32 with its paired 95% bootstrap interval (:func:`vitq.evaluate.paired_interval`): a difference whose interval
holds 0 is reported as within noise. On 650 images one image is 0.15 points and such an interval spans about
+-1 point, so sub-point differences between recipes need ``all`` or realizations.

``--realizations N`` also scores N perturbed draws: the input multiplied by ``1 + noise * N(0, 1)`` (seeded, the same
draw for every recipe). A quantized network is discontinuous: a perturbation far below anything a camera could
tell apart flips rounding decisions that cascade, so one evaluation is one draw; the mean and spread over draws
say how much of a difference is the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import DEIT_WEIGHTS, DEV650, REPO, SAMPLE1000, stamp_cpu, write_result
from vitq.data import ImageSet, iter_batches, open_image_set
from vitq.evaluate import compare_logits, paired_interval
from vitq.runtime import Engine
from vitq.table import format_table

MODEL = "deit_tiny_patch16_224"


def compile_variant(name: str) -> tuple[str, dict]:
    """A bench recipe name -> (preset, ``CompileOptions`` overrides): ``PRESET[+recon[=STEPS]][+static4]``, e.g.
    ``w4a8+recon`` (block reconstruction, 200 steps) or ``w4a4+static4`` (``--act4 static``)."""
    preset, *mods = name.split("+")
    kw: dict = {}
    for m in mods:
        if m.startswith("recon"):
            kw["reconstruct"] = int(m.split("=", 1)[1]) if "=" in m else 200
        elif m == "static4":
            kw["act4"] = "static"
        else:
            raise SystemExit(f"bench accuracy: unknown recipe modifier {m!r} in {name!r} (recon[=STEPS], static4)")
    return preset, kw


def artifact(recipe: str, calib_count: int, build: Path, echo=print) -> Path:
    """The ``vitq compile`` artifact of ``recipe`` (real weights, calibration on the sample set; modifiers as
    :func:`compile_variant`), reused from ``build`` when its report.json says it was compiled the same way."""
    from vitq.compiler import CompileOptions, compile_model
    from vitq.targets import get_target
    from vitq.targets.ort import OrtOptions

    preset, kw = compile_variant(recipe)
    out = build / f"{MODEL}-{recipe.replace('+', '_').replace('=', '')}-c{calib_count}"
    rep = out / "report.json"
    if rep.is_file() and (out / "model.onnx").is_file():
        r = json.loads(rep.read_text())
        if (r.get("recipe") or {}).get("name") in (recipe, preset) and \
                (r.get("calibration") or {}).get("requested") == calib_count and \
                not (r.get("weights") or {}).get("random_init", True):
            return out
    echo(f"[accuracy] compiling {recipe} ({calib_count} calibration images) into {out}")
    compile_model(CompileOptions(model=MODEL, out=out, weights=DEIT_WEIGHTS, calib=SAMPLE1000,
                                 calib_count=calib_count, recipe=preset,
                                 target=get_target("ort", OrtOptions(keep_bits=True)), **kw),  # each as named
                  echo=lambda s: None)
    return out


def heldout_set(calib_count: int) -> ImageSet:
    """The sample-set images that ``vitq compile --calib-count N`` (seed 0) does not calibrate on."""
    sample = open_image_set(SAMPLE1000)
    used = set(sample.subset(calib_count, seed=0).files)
    keep = [i for i, f in enumerate(sample.files) if f not in used]
    return ImageSet(sample.root, [sample.files[i] for i in keep], [sample.labels[i] for i in keep], sample.layout)


def perturbed(x: np.ndarray, noise: float, seed: int, offset: int) -> np.ndarray:
    """``x * (1 + noise * N(0, 1))``, the same draw for a given (seed, image offset) whatever the batching."""
    if seed == 0:
        return x
    rng = np.random.default_rng([seed, offset])
    return (x * (1.0 + noise * rng.standard_normal(x.shape))).astype(np.float32)


def engine_logits(eng: Engine, images: ImageSet, draws: int, noise: float, cache: Path | None,
                  batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``[draws + 1, N, C]`` of one engine on every draw (0: unperturbed) and the labels, cached under
    ``cache`` by the model file's and the image set's hashes (so separate processes can fill the cache)."""
    path = None
    if cache is not None:
        h = hashlib.sha256(Path(eng.path).read_bytes()).hexdigest()[:16]
        path = cache / f"{h}-{images.fingerprint()[:16]}-d{draws}-n{noise:g}.npz"
        if path.is_file():
            z = np.load(path)
            return z["logits"], z["labels"]
    out, labels, done = [[] for _ in range(draws + 1)], [], 0
    for x, y, _ in iter_batches(images, eng.preprocess, batch):
        for d in range(draws + 1):
            out[d].append(np.asarray(eng.run(perturbed(x, noise, d, done)), dtype=np.float32))
        labels.append(y)
        done += len(x)
        print(f"\r[accuracy] {Path(eng.path).parent.name} on {images.root.name}: {done}/{len(images)}", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    logits, labels = np.stack([np.concatenate(o) for o in out]), np.concatenate(labels)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, logits=logits, labels=labels)
        tmp.replace(path)
    return logits, labels


def score(q: np.ndarray, ref: np.ndarray, y: np.ndarray, boot: int) -> dict:
    c_q, c_f = q.argmax(1) == y, ref.argmax(1) == y
    cmp = compare_logits(q, ref)
    ci = paired_interval(c_f, c_q, boot=boot)
    return {"n": int(len(y)), "top1": float(c_q.mean() * 100), "top1_fp32": float(c_f.mean() * 100),
            "agreement": cmp["agreement"] * 100, "kl": cmp["kl_mean"], "delta_top1": ci["diff"],
            "delta_top1_ci95": ci["ci"], "within_noise": ci["within_noise"]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench accuracy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="w8a8,w7a8,w4a8", help="quantized recipes scored against fp32")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--realizations", type=int, default=0, help="perturbed draws besides the plain evaluation")
    ap.add_argument("--noise", type=float, default=1e-4, help="relative input perturbation of a realization")
    ap.add_argument("--boot", type=int, default=10000, help="bootstrap resamples of the paired interval")
    ap.add_argument("--count", type=int, help="score a seeded subset of this many images per set (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build", type=Path, default=REPO / "build" / "bench")
    ap.add_argument("--cache-only", action="store_true", help="only compute and cache the logits of --recipes (fp32: "
                    "the fp32 export) without writing results; runs in parallel processes fill the cache")
    ap.add_argument("--sets", help="only these of dev650,heldout (default both, and their union 'all')")
    ap.add_argument("--out", type=Path, help="result file (default bench/results/accuracy.json)")
    args = ap.parse_args(argv)
    if not (DEIT_WEIGHTS.is_file() and DEV650.is_dir() and SAMPLE1000.is_dir()):
        print(f"bench accuracy: needs the shared data ({DEIT_WEIGHTS.parent.parent}); set VITQ_SHARED_DATA",
              file=sys.stderr)
        return 2
    t0 = time.time()
    recipes = [r for r in args.recipes.split(",") if r]
    names = recipes if args.cache_only else ["fp32", *recipes]
    dirs = {r: artifact(r, args.calib_count, args.build) for r in names}
    engines = {r: Engine.load(dirs[r] / ("model.fp32.onnx" if r == "fp32" else "model.onnx"), backend="ort",
                              threads=args.threads) for r in names}
    sets = {"dev650": open_image_set(DEV650).subset(args.count),
            "heldout": heldout_set(args.calib_count).subset(args.count)}
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    cache = args.build / "logits"
    logits, labels = {s: {} for s in sets}, {}
    for s, images in sets.items():
        for n, e in engines.items():
            logits[s][n], labels[s] = engine_logits(e, images, args.realizations, args.noise, cache)
    if args.cache_only:
        print(f"cached logits of {', '.join(names)} in {cache} ({time.time() - t0:.0f} s)")
        return 0
    scored = list(sets)
    if len(sets) == 2:
        logits["all"] = {n: np.concatenate([logits[s][n] for s in sets], axis=1) for n in engines}
        labels["all"] = np.concatenate([labels[s] for s in sets])
        scored.append("all")
    rows, table = [], []
    for r in recipes:
        for s in scored:
            row = {"recipe": r, "set": s, **score(logits[s][r][0], logits[s]["fp32"][0], labels[s], args.boot)}
            if args.realizations:
                draws = [score(logits[s][r][d], logits[s]["fp32"][d], labels[s], 200)
                         for d in range(args.realizations + 1)]
                row["realizations"] = {k: {"mean": float(np.mean([x[k] for x in draws])),
                                           "std": float(np.std([x[k] for x in draws], ddof=1))}
                                       for k in ("top1", "agreement", "kl", "delta_top1")}
                row["realizations"]["draws"] = args.realizations + 1
            rows.append(row)
            ci = row["delta_top1_ci95"]
            table.append([r, s, row["n"], f"{row['top1_fp32']:.2f}", f"{row['top1']:.2f}",
                          f"{row['delta_top1']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"
                          + (" (noise)" if row["within_noise"] else ""),
                          f"{row['agreement']:.2f}", f"{row['kl']:.4f}"])
    print(format_table(table, ["recipe", "images", "n", "fp32 top-1", "top-1", "vs fp32 [95% paired]",
                               "agreement %", "KL"], title="DeiT-Tiny, deployed ONNX Runtime graphs vs fp32"))
    data = (f"{MODEL}, real weights ({DEIT_WEIGHTS.name}); calibration: {args.calib_count} images of "
            f"{SAMPLE1000.name} (seed 0); scored on " + " + ".join(
                {"dev650": f"{DEV650.name} ({len(sets[s])})",
                 "heldout": f"the {SAMPLE1000.name} images calibration did not use ({len(sets[s])})"}[s] for s in sets))
    out = args.out or (REPO / "bench" / "results" / "accuracy.json")
    kept, prev = [], {}
    if out.is_file() and not args.count and not args.sets:  # a run of some recipes keeps the others' rows
        prev = json.loads(out.read_text())
        pr = prev.get("results", {})
        if pr.get("calib_count") == args.calib_count and pr.get("n") == {s: int(len(labels[s])) for s in scored}:
            kept = [row for row in pr.get("rows", []) if row["recipe"] not in recipes]
            for row in kept:
                row.setdefault("measured_utc", prev.get("date"))
    rows = stamp_cpu(kept, prev, rows)
    path = write_result("accuracy", {"model": MODEL, "calib_count": args.calib_count, "boot": args.boot,
                                     "noise": args.noise if args.realizations else None,
                                     "fp32": {s: float((logits[s]["fp32"][0].argmax(1) == labels[s]).mean() * 100)
                                              for s in scored},
                                     "n": {s: int(len(labels[s])) for s in scored},
                                     "rows": rows}, data=data, argv=argv, out=out, merged=bool(kept))
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    return 0
