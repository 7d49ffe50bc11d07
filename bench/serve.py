"""Serving load test: `vitq serve` and Triton Inference Server on the same artifact, driven by the same client.

    python -m bench serve [--model build/bench/deit_tiny_patch16_224-w8a8] [--concurrency 1 4 16 64]
                          [--requests 128] [--max-seconds 120] [--max-batch 8] [--max-wait-ms 5] [--threads N]

Both servers run on 127.0.0.1 at once, each with one model instance, dynamic batching up to ``--max-batch`` images
and ``--max-wait-ms`` of queueing, and take the same request: one JPEG, answered with the top-5 classes.

* ``vitq serve MODEL``: ``POST /v1/classify`` with the JPEG as the body;
* Triton (``tritonserver`` of the pinned nvidia-pytriton wheel, Python environment from ``scripts/triton_env.sh``):
  the repository of ``vitq export-triton MODEL --backend python --preprocess``, request ``POST
  /v2/models/<name>_image/infer`` (KServe v2, the JPEG as binary tensor data, Triton's classification extension
  for the top 5). The ensemble decodes and preprocesses in its ``<name>_preprocess`` model (vitq's preprocessing),
  then runs ``vitq.runtime.Engine`` in ``<name>``.

For each concurrency level C the client sends ``--requests`` requests from C threads, each on its own keep-alive
connection (stopping after ``--max-seconds``); the two servers take turns per level (vitq first on even levels,
Triton first on odd ones), so that drift in the load of a shared machine hits both. Counts:

* errors: replies other than 200 (or without classes); lost: requests without any reply (connection error or
  timeout); not_sent: left out when the level's time ran out (a bounded run, not a failure);
* server_ok: the server's own count of successful requests over the level (vitq ``/metrics``, Triton's statistics
  extension); it must equal the client's ``ok``; mean_batch: images per classifier call (dynamic batching);
* top1_agree: the fraction of images whose top-1 class is the same from both servers.

Prints a table and the Triton/vitq ratios, writes ``bench/results/serve.json``. Exits 1 if any request errored or was
lost, or a server's count differs from the client's. Without an artifact at ``--model`` but with ../shared/data, it
compiles deit_tiny_patch16_224 (w8a8, 16 calibration images of imagenet-sample-eli1000, seed 0) there first.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench.common import DEIT_WEIGHTS, DEV650, REPO, SAMPLE1000, cpu_info, flags_str, write_result

HOST = "127.0.0.1"
DEFAULT_MODEL = REPO / "build" / "bench" / "deit_tiny_patch16_224-w8a8"


def ensure_model(model: Path) -> Path:
    if (model / "model.onnx").is_file():
        return model
    if not (DEIT_WEIGHTS.is_file() and SAMPLE1000.is_dir()):
        sys.exit(f"no artifact at {model} and no {DEIT_WEIGHTS} to compile one; pass --model DIR")
    print(f"compiling deit_tiny_patch16_224 (w8a8) into {model} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "vitq", "compile", "deit_tiny_patch16_224", "--weights", str(DEIT_WEIGHTS),
                    "--calib", str(SAMPLE1000), "--calib-count", "16", "--seed", "0", "--recipe", "w8a8",
                    "--target", "ort", "--out", str(model), "-q"], check=True)
    return model


def load_bodies(n: int, seed: int = 0) -> tuple[list[bytes], str]:
    folder = DEV650 / "images"
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
        if files:
            return [p.read_bytes() for p in files], f"the first {len(files)} JPEGs of imagenet-val-dev650"
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, f"{n} synthetic 500x375 JPEGs"


# -- the two servers, one client protocol each ---------------------------------------------------------------------
class Target:
    """How the client talks to one server: ``encode(jpeg) -> (path, body, headers)``, ``top1(reply) -> class``
    (None: not a classification reply), ``counts()``: the server's own counts of successful requests (``ok``),
    and of images and model executions of the classifier (``images``, ``batches``)."""

    name: str
    port: int
    encode: Callable[[bytes], tuple[str, bytes, dict[str, str]]]
    top1: Callable[[bytes], int | None]
    counts: Callable[[], dict[str, float]]


def _get(port: int, path: str) -> bytes:
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
        return body
    finally:
        c.close()


def start_vitq(model: Path, args) -> tuple[subprocess.Popen, Target]:
    cmd = [sys.executable, "-m", "vitq", "serve", str(model), "--host", HOST, "--port", "0",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline, line = time.time() + 180, ""
    while time.time() < deadline:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            # keep draining stderr so the server never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            port = int(m.group(1))
            break
        if not line and p.poll() is not None:
            break
    else:
        port = 0
    if not port:
        p.kill()
        sys.exit(f"vitq serve did not start: {line}")

    def top1(data: bytes) -> int | None:
        topk = json.loads(data).get("topk")
        return int(topk[0]["class"]) if topk else None

    def counts() -> dict[str, float]:
        text = _get(port, "/metrics").decode()
        ok = re.search(r'^vitq_requests_total\{method="POST",path="/v1/classify",code="200"\} (\d+)$', text, re.M)
        bs = re.search(r"^vitq_batch_size_sum (\S+)$", text, re.M)
        bc = re.search(r"^vitq_batch_size_count (\S+)$", text, re.M)
        return {"ok": int(ok.group(1)) if ok else 0, "images": float(bs.group(1)) if bs else 0.0,
                "batches": float(bc.group(1)) if bc else 0.0}

    t = Target()
    t.name, t.port, t.top1, t.counts = "vitq serve", port, top1, counts
    t.encode = lambda jpeg: ("/v1/classify", jpeg, {"Content-Type": "image/jpeg"})
    return p, t


def triton_target(srv, model_name: str, output: str) -> Target:
    ens = f"{model_name}_image"
    port = srv.http_port

    def encode(jpeg: bytes):
        hdr = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES",
                                      "parameters": {"binary_data_size": len(jpeg) + 4}}],
                          "outputs": [{"name": output, "parameters": {"classification": 5}}]}).encode()
        return (f"/v2/models/{ens}/infer", hdr + struct.pack("<I", len(jpeg)) + jpeg,
                {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(hdr))})

    def top1(data: bytes) -> int | None:
        outs = json.loads(data).get("outputs") or []
        vals = outs[0].get("data") if outs else None
        return int(str(vals[0]).split(":")[1]) if vals else None  # "score:class"

    def counts() -> dict[str, float]:
        ens_stats = json.loads(_get(port, f"/v2/models/{ens}/stats"))["model_stats"][0]
        cls_stats = json.loads(_get(port, f"/v2/models/{model_name}/stats"))["model_stats"][0]
        return {"ok": int(ens_stats["inference_stats"]["success"]["count"]),
                "images": float(cls_stats["inference_count"]), "batches": float(cls_stats["execution_count"])}

    t = Target()
    t.name, t.port, t.encode, t.top1, t.counts = "triton", port, encode, top1, counts
    return t


# -- the client ----------------------------------------------------------------------------------------------------
def run_level(t: Target, bodies: list[bytes], concurrency: int, n_requests: int, max_seconds: float,
              timeout: float, answers: dict[int, int]) -> dict:
    lock = threading.Lock()
    next_i = [0]
    lat_ms: list[float] = []
    errors: list[str] = []
    lost: list[str] = []
    encoded = [t.encode(b) for b in bodies]
    t_start = time.perf_counter()
    deadline = t_start + max_seconds

    def take() -> int | None:
        with lock:
            if next_i[0] >= n_requests or time.perf_counter() > deadline:
                return None
            next_i[0] += 1
            return next_i[0] - 1

    def worker():
        conn = http.client.HTTPConnection(HOST, t.port, timeout=timeout)
        try:
            while (i := take()) is not None:
                path, body, headers = encoded[i % len(encoded)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        lost.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, t.port, timeout=timeout)
                    continue
                dt = (time.perf_counter() - t0) * 1e3
                try:
                    cls = t.top1(data) if r.status == 200 else None
                except (ValueError, KeyError, IndexError, TypeError):
                    cls = None
                with lock:
                    if cls is not None:
                        lat_ms.append(dt)
                        answers.setdefault(i % len(encoded), cls)
                    else:
                        errors.append(f"{r.status}: {data[:200]!r}")
        finally:
            conn.close()

    before = t.counts()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(max_seconds + timeout + 30)
    wall = time.perf_counter() - t_start
    after = t.counts()
    settle = time.monotonic() + 5  # Triton updates its statistics just after the reply is sent
    while after["ok"] - before["ok"] < len(lat_ms) and time.monotonic() < settle:
        time.sleep(0.1)
        after = t.counts()
    server_ok = after["ok"] - before["ok"]
    batches = after["batches"] - before["batches"]
    sent = next_i[0]
    ms = np.asarray(lat_ms) if lat_ms else np.asarray([np.nan])
    return {"server": t.name, "concurrency": concurrency, "requests": n_requests, "sent": sent, "ok": len(lat_ms),
            "errors": len(errors), "lost": len(lost), "not_sent": n_requests - sent, "server_ok": server_ok,
            "wall_s": round(wall, 3), "throughput_req_s": round(len(lat_ms) / wall, 3) if wall > 0 else 0.0,
            "latency_ms": {k: round(float(v), 2) for k, v in (
                ("p50", np.percentile(ms, 50)), ("p90", np.percentile(ms, 90)), ("p99", np.percentile(ms, 99)),
                ("mean", ms.mean()), ("max", ms.max()))},
            "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else None,
            "error_samples": errors[:5], "lost_samples": lost[:5]}


def warm_up(t: Target, bodies: list[bytes], n: int, timeout: float) -> None:
    for i in range(n):
        path, body, headers = t.encode(bodies[i % len(bodies)])
        c = http.client.HTTPConnection(HOST, t.port, timeout=timeout)
        try:
            c.request("POST", path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        if r.status != 200:
            sys.exit(f"{t.name}: warm-up request failed with {r.status}: {data[:300]!r}")


def triton_env() -> Path:
    r = subprocess.run(["bash", str(REPO / "scripts" / "triton_env.sh")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    if r.returncode != 0:
        sys.exit(f"scripts/triton_env.sh failed ({r.returncode}): {r.stderr[-2000:]}")
    return REPO / r.stdout.strip().splitlines()[-1]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="artifact dir (default %(default)s)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=128, help="requests per server and level (default 128)")
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time budget per server and level")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout (default 60)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed warm-up requests per server (default 8)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of each server's model")
    ap.add_argument("--out", type=Path, help="result JSON (default bench/results/serve.json)")
    args = ap.parse_args(argv)
    if args.requests <= 0 or args.max_seconds <= 0 or min(args.concurrency) <= 0 or args.max_batch <= 0:
        ap.error("requests, max-seconds, concurrency and max-batch must be positive")

    from vitq.runtime import Engine
    from vitq.table import format_table
    from vitq.triton import TritonServer, export_triton

    model = ensure_model(args.model)
    engine = Engine.load(model, threads=1)
    bodies, source = load_bodies(64)
    env = triton_env()
    probe = "import numpy, onnxruntime; print(numpy.__version__, onnxruntime.__version__)"
    env_versions = subprocess.run([str(env / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                                  check=True).stdout.split()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="vitq-serve-bench-"))
    vitq_proc = None
    try:
        repo = work / "repo"
        dest = export_triton(model, repo, backend="python", preprocess=True, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, instances=1, threads=args.threads)
        with TritonServer(repo, env, log=work / "tritonserver.log") as srv:
            vitq_proc, vt = start_vitq(model, args)
            tt = triton_target(srv, dest.name, engine.outputs[0].name)
            for t in (vt, tt):
                warm_up(t, bodies, args.warmup, args.timeout)
            answers: dict[str, dict[int, int]] = {vt.name: {}, tt.name: {}}
            levels = []
            for k, c in enumerate(args.concurrency):
                for t in ((vt, tt) if k % 2 == 0 else (tt, vt)):
                    levels.append(run_level(t, bodies, c, args.requests, args.max_seconds, args.timeout,
                                            answers[t.name]))
            triton_version = json.loads(_get(srv.http_port, "/v2")).get("version")
    finally:
        if vitq_proc is not None:
            vitq_proc.terminate()
            try:
                vitq_proc.wait(10)
            except subprocess.TimeoutExpired:
                vitq_proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    common = sorted(set(answers[vt.name]) & set(answers[tt.name]))
    agree = sum(answers[vt.name][i] == answers[tt.name][i] for i in common)
    by = {(lv["server"], lv["concurrency"]): lv for lv in levels}
    ratios = []
    for c in args.concurrency:
        a, b = by[(vt.name, c)], by[(tt.name, c)]
        ratios.append({"concurrency": c,
                       "throughput": round(b["throughput_req_s"] / a["throughput_req_s"], 3)
                       if a["throughput_req_s"] else None,
                       "p50": round(b["latency_ms"]["p50"] / a["latency_ms"]["p50"], 3),
                       "p99": round(b["latency_ms"]["p99"] / a["latency_ms"]["p99"], 3)})
    results = {
        "model": engine.metadata.get("vitq.model"), "recipe": engine.metadata.get("vitq.recipe"),
        "artifact": str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model),
        "servers": {
            vt.name: {"command": f"vitq serve MODEL --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}"
                                 + (f" --threads {args.threads}" if args.threads else ""),
                      "request": "POST /v1/classify, body: the JPEG; reply: top-5 JSON"},
            tt.name: {"command": f"vitq export-triton MODEL --backend python --preprocess --max-batch "
                                 f"{args.max_batch} --queue-delay-us {int(round(args.max_wait_ms * 1000))} "
                                 f"--instances 1" + (f" --threads {args.threads}" if args.threads else ""),
                      "server": f"tritonserver {triton_version} (nvidia-pytriton 0.7.0 wheel), python backend",
                      "python_env": f"{env.relative_to(REPO)}: numpy {env_versions[0]}, onnxruntime {env_versions[1]}",
                      "request": f"POST /v2/models/{dest.name}_image/infer, the JPEG as binary BYTES tensor data; "
                                 f"reply: top-5 (classification extension)"}},
        "bodies": source, "levels": levels, "ratios_triton_over_vitq": ratios,
        "top1_agree": {"images": len(common), "same": agree},
        "note": "both servers on 127.0.0.1 of one machine shared with other jobs; they take turns per level",
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    rows = [[lv["server"], lv["concurrency"], f"{lv['ok']} / {lv['sent']}", lv["errors"], lv["lost"],
             lv["server_ok"], lv["throughput_req_s"], lv["latency_ms"]["p50"], lv["latency_ms"]["p99"],
             lv["mean_batch"]]
            for lv in sorted(levels, key=lambda lv: (lv["concurrency"], lv["server"] != vt.name))]
    print(format_table(rows, ["server", "conc", "ok / sent", "errors", "lost", "server ok", "req/s", "p50 ms",
                              "p99 ms", "mean batch"],
                       title=f"serving {results['model']} ({results['recipe']}) on {HOST}: {source}; max batch "
                             f"{args.max_batch}, max wait {args.max_wait_ms} ms; {flags_str(cpu_info())}"))
    print(format_table([[r["concurrency"], r["throughput"], r["p50"], r["p99"]] for r in ratios],
                       ["conc", "req/s ratio", "p50 ratio", "p99 ratio"], title="Triton / vitq serve"))
    print(f"top-1 agreement between the servers: {agree} / {len(common)} images")
    path = write_result("serve", results, data=source, argv=argv, out=args.out)
    print(f"wrote {path}")
    bad = [lv for lv in levels if lv["errors"] or lv["lost"] or lv["server_ok"] != lv["ok"]]
    for lv in bad:
        print(f"FAIL {lv['server']} at concurrency {lv['concurrency']}: errors={lv['errors']} lost={lv['lost']} "
              f"server_ok={lv['server_ok']} client_ok={lv['ok']} {lv['error_samples'] + lv['lost_samples']}",
              file=sys.stderr)
    return 1 if bad else 0
