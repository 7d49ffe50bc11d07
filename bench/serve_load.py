#!/usr/bin/env python
"""Loopback load test of `vitq serve`: throughput, p50/p99 latency, errors and lost requests per concurrency level.

    python bench/serve_load.py [--model build/deit] [--concurrency 1 4 16] [--requests 96] [--max-seconds 60]
                               [--baseline-out bench/baselines/serve_load.json]

Starts `vitq serve MODEL --host 127.0.0.1 --port 0` in a subprocess (only loopback is ever used), warms it up, then
for each concurrency level C sends a bounded number of requests (``--requests``) from C client threads, each on its
own keep-alive connection, and stops issuing new ones after ``--max-seconds``. Request bodies are real JPEGs from
../shared/data (imagenet-val-dev650) when present, synthetic ones otherwise. Counts:

* errors: replies other than 200;  lost: requests sent without any reply (connection error / timeout);
* not_sent: requests skipped because the level's time budget ran out (bounded run, not a failure);
* the server's own /metrics count of 200 replies must equal the client's (checked per level).

Prints a table, writes ``bench/results/serve_load-<time>.json`` (gitignored) and, with ``--baseline-out``, the same
JSON there (e.g. the committed ``bench/baselines/serve_load.json``). Exits 1 if any request errored or was lost.
Without an artifact at ``--model`` but with ../shared/data, it compiles deit_tiny_patch16_224 there first.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
HOST = "127.0.0.1"


def ensure_model(model: Path) -> Path:
    if (model / "model.onnx").is_file() or model.suffix == ".onnx" and model.is_file():
        return model
    weights = SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth"
    if not weights.is_file():
        sys.exit(f"no artifact at {model} and no {weights} to compile one; pass --model DIR")
    print(f"compiling deit_tiny_patch16_224 into {model} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "vitq", "compile", "deit_tiny_patch16_224", "--weights", str(weights),
                    "--out", str(model), "--quiet"], check=True)
    return model


def load_bodies(n: int, seed: int = 0) -> tuple[list[bytes], str]:
    folder = SHARED / "imagenet-val-dev650" / "images"
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
        if files:
            return [p.read_bytes() for p in files], f"{len(files)} JPEGs from {folder}"
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out, f"{n} synthetic 500x375 JPEGs"


def start_server(model: Path, args) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "vitq", "serve", str(model), "--host", HOST, "--port", "0",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline:
        line = p.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if m:
            # keep draining stderr so the server never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, int(m.group(1))
        if not line and p.poll() is not None:
            break
    p.kill()
    sys.exit(f"server did not start: {line}")


def get(port: int, path: str) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def scrape(port: int) -> dict[str, float]:
    _, body = get(port, "/metrics")
    text = body.decode()
    ok = re.search(r'^vitq_requests_total\{method="POST",path="/v1/classify",code="200"\} (\d+)$', text, re.M)
    bs = re.search(r"^vitq_batch_size_sum (\S+)$", text, re.M)
    bc = re.search(r"^vitq_batch_size_count (\S+)$", text, re.M)
    return {"ok": int(ok.group(1)) if ok else 0, "batch_sum": float(bs.group(1)) if bs else 0.0,
            "batch_count": float(bc.group(1)) if bc else 0.0}


def run_level(port: int, bodies: list[bytes], concurrency: int, n_requests: int, max_seconds: float,
              timeout: float) -> dict:
    lock = threading.Lock()
    next_i = [0]
    lat_ms: list[float] = []
    errors: list[str] = []
    lost: list[str] = []
    t_start = time.perf_counter()
    deadline = t_start + max_seconds

    def take() -> int | None:
        with lock:
            if next_i[0] >= n_requests or time.perf_counter() > deadline:
                return None
            next_i[0] += 1
            return next_i[0] - 1

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            while (i := take()) is not None:
                body = bodies[i % len(bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/classify", body=body, headers={"Content-Type": "image/jpeg"})
                    r = conn.getresponse()
                    data = r.read()
                except (OSError, http.client.HTTPException) as e:
                    with lock:
                        lost.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
                    continue
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    if r.status == 200 and "topk" in json.loads(data):
                        lat_ms.append(dt)
                    else:
                        errors.append(f"{r.status}: {data[:200]!r}")
        finally:
            conn.close()

    before = scrape(port)
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + timeout + 30)
    wall = time.perf_counter() - t_start
    after = scrape(port)
    sent = next_i[0]
    ms = np.asarray(lat_ms) if lat_ms else np.asarray([np.nan])
    batches = after["batch_count"] - before["batch_count"]
    return {
        "concurrency": concurrency, "requests": n_requests, "sent": sent, "ok": len(lat_ms),
        "errors": len(errors), "lost": len(lost), "not_sent": n_requests - sent,
        "server_ok": int(after["ok"] - before["ok"]), "wall_s": round(wall, 3),
        "throughput_req_s": len(lat_ms) / wall if wall > 0 else 0.0,
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                       "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "max": float(ms.max())},
        "mean_batch": (after["batch_sum"] - before["batch_sum"]) / batches if batches else None,
        "error_samples": errors[:5], "lost_samples": lost[:5],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / "build" / "deit", help="artifact dir (default build/deit)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=96, help="requests per concurrency level (default 96)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time budget per level (default 60)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-request client timeout (default 30)")
    ap.add_argument("--warmup", type=int, default=8, help="untimed warm-up requests (default 8)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="server ONNX Runtime threads")
    ap.add_argument("--baseline-out", type=Path, help="also write the JSON here (a committed baseline)")
    args = ap.parse_args(argv)
    if args.requests <= 0 or args.max_seconds <= 0 or min(args.concurrency) <= 0:
        ap.error("requests, max-seconds and concurrency must be positive")

    sys.path.insert(0, str(REPO))
    from vitq.artifacts import write_json_atomic
    from vitq.table import format_table

    model = ensure_model(args.model)
    bodies, source = load_bodies(64)
    proc, port = start_server(model, args)
    try:
        for i in range(args.warmup):
            c = http.client.HTTPConnection(HOST, port, timeout=args.timeout)
            c.request("POST", "/v1/classify", body=bodies[i % len(bodies)], headers={"Content-Type": "image/jpeg"})
            r = c.getresponse()
            r.read()
            c.close()
            if r.status != 200:
                sys.exit(f"warm-up request failed with {r.status}")
        levels = [run_level(port, bodies, c, args.requests, args.max_seconds, args.timeout)
                  for c in args.concurrency]
        health = json.loads(get(port, "/health")[1])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    result = {"schema": "vitq.serve-load/1", "model": health.get("model"), "path": str(model),
              "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "threads": args.threads},
              "bodies": source, "levels": levels,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rows = [[lv["concurrency"], lv["sent"], lv["ok"], lv["errors"], lv["lost"], lv["not_sent"],
             lv["throughput_req_s"], lv["latency_ms"]["p50"], lv["latency_ms"]["p99"], lv["mean_batch"]]
            for lv in levels]
    print(format_table(rows, ["conc", "sent", "ok", "errors", "lost", "not sent", "req/s", "p50 ms", "p99 ms",
                              "mean batch"],
                       title=f"vitq serve load test: {result['model']} on {HOST} ({source}; max batch "
                             f"{args.max_batch}, max wait {args.max_wait_ms} ms)"))
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    if args.baseline_out:
        args.baseline_out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.baseline_out, result)
        print(f"wrote {args.baseline_out}")
    bad = [lv for lv in levels if lv["errors"] or lv["lost"] or lv["server_ok"] != lv["ok"]]
    for lv in bad:
        print(f"FAIL at concurrency {lv['concurrency']}: errors={lv['errors']} lost={lv['lost']} "
              f"server_ok={lv['server_ok']} client_ok={lv['ok']} {lv['error_samples'] + lv['lost_samples']}",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
