"""`vitq serve`: HTTP classification with dynamic batching, health/metrics, bad requests, torch-free import."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from vitq.runtime import Engine, preprocess
from vitq.serve import Batcher, ClassifyServer, Metrics


def image_bytes(fmt="JPEG", size=(48, 40), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def request(srv, method, path, body=None, ctype=None, headers=None):
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        h = dict(headers or {})
        if ctype:
            h["Content-Type"] = ctype
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
        return r.status, r.getheader("Content-Type", ""), data
    finally:
        conn.close()


def post_json(srv, path, body, ctype):
    status, rtype, data = request(srv, "POST", path, body, ctype)
    assert rtype.startswith("application/json"), (status, rtype, data)
    return status, json.loads(data)


@pytest.fixture(scope="module")
def engine(tiny_vit_onnx):
    return Engine.load(tiny_vit_onnx, threads=1)


@pytest.fixture
def server(engine):
    with ClassifyServer(engine, port=0, max_batch=8, max_wait_ms=20, max_bytes=200_000) as srv:
        yield srv


def expected_topk(engine, blob, k=5):
    img = Image.open(io.BytesIO(blob)).convert("RGB")
    logits = engine.run(preprocess(img, engine.preprocess)[None])[0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    idx = np.argsort(-p, kind="stable")[:k]
    return [int(i) for i in idx], p[idx]


def test_classify_single_jpeg_and_png_match_the_engine(server, engine):
    for fmt, ctype in (("JPEG", "image/jpeg"), ("PNG", "image/png")):
        blob = image_bytes(fmt, seed=3)
        status, res = post_json(server, "/v1/classify", blob, ctype)
        assert status == 200, res
        classes, scores = expected_topk(engine, blob)
        assert [t["class"] for t in res["topk"]] == classes
        np.testing.assert_allclose([t["score"] for t in res["topk"]], scores, rtol=1e-4, atol=1e-6)
    status, res = post_json(server, "/v1/classify?k=3", image_bytes(), "image/jpeg")
    assert status == 200 and len(res["topk"]) == 3


def test_classify_json_and_multipart_batches(server, engine):
    blobs = [image_bytes("PNG" if i % 2 else "JPEG", seed=i, size=(40 + 8 * i, 36)) for i in range(3)]
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in blobs], "k": 2}).encode()
    status, res = post_json(server, "/v1/classify", body, "application/json")
    assert status == 200 and isinstance(res, list) and len(res) == 3
    for blob, r in zip(blobs, res):
        assert [t["class"] for t in r["topk"]] == expected_topk(engine, blob, 2)[0]
    # multipart/form-data with two files (and a plain text field that is ignored)
    bnd = "vitqBoundary42"
    parts = [f'--{bnd}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'.encode()]
    for i, b in enumerate(blobs[:2]):
        parts.append(f'--{bnd}\r\nContent-Disposition: form-data; name="file"; filename="{i}.img"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + b + b"\r\n")
    body = b"".join(parts) + f"--{bnd}--\r\n".encode()
    status, res = post_json(server, "/v1/classify", body, f"multipart/form-data; boundary={bnd}")
    assert status == 200 and len(res) == 2, res
    assert [t["class"] for t in res[1]["topk"]] == expected_topk(engine, blobs[1])[0]


def test_bad_requests_get_4xx_json_and_server_survives(server):
    cases = [
        ("POST", "/v1/classify", b"this is not an image", "image/jpeg", 400),
        ("POST", "/v1/classify", image_bytes()[:200], "image/jpeg", 400),           # truncated JPEG
        ("POST", "/v1/classify", b"hello", "text/plain", 415),
        ("POST", "/v1/classify", b"x" * 300_000, "image/png", 413),               # over max_bytes
        ("POST", "/v1/classify", b"{not json", "application/json", 400),
        ("POST", "/v1/classify", json.dumps({"images": ["@@@"]}).encode(), "application/json", 400),
        ("POST", "/v1/classify", json.dumps({"pics": []}).encode(), "application/json", 400),
        ("POST", "/v1/classify", b"--x--\r\n", "multipart/form-data; boundary=x", 400),
        ("POST", "/v1/nope", b"abc", "image/png", 404),
        ("GET", "/nope", None, None, 404),
        ("GET", "/v1/classify", None, None, 405),
        ("POST", "/health", b"abc", "image/png", 405),
    ]
    for method, path, body, ctype, want in cases:
        status, rtype, data = request(server, method, path, body, ctype)
        assert status == want, (path, ctype, status, data)
        assert rtype.startswith("application/json")
        msg = json.loads(data)
        assert msg["status"] == want and msg["error"]
    status, _, data = request(server, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"
    status, res = post_json(server, "/v1/classify", image_bytes(), "image/jpeg")
    assert status == 200 and len(res["topk"]) == 5


def test_metrics_prometheus_text(server):
    for _ in range(3):
        assert post_json(server, "/v1/classify", image_bytes(), "image/jpeg")[0] == 200
    assert request(server, "POST", "/v1/classify", b"nope", "text/plain")[0] == 415
    status, rtype, data = request(server, "GET", "/metrics")
    assert status == 200 and rtype.startswith("text/plain")
    text = data.decode()
    assert 'vitq_requests_total{method="POST",path="/v1/classify",code="200"} 3' in text
    assert 'vitq_requests_total{method="POST",path="/v1/classify",code="415"} 1' in text
    assert "# TYPE vitq_request_latency_seconds histogram" in text
    assert "# TYPE vitq_batch_size histogram" in text
    assert "vitq_images_total 3" in text
    for name in ("vitq_request_latency_seconds", "vitq_batch_size"):
        buckets = [int(v) for v in re.findall(rf'^{name}_bucket{{le="[^"]+"}} (\d+)$', text, re.M)]
        count = int(re.search(rf"^{name}_count (\d+)$", text, re.M).group(1))
        assert buckets == sorted(buckets) and buckets[-1] == count  # cumulative; +Inf equals count
    assert int(re.search(r"^vitq_request_latency_seconds_count (\d+)$", text, re.M).group(1)) == 4
    # every sample line is `name{labels} value` or `name value`
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r'[a-z_]+(\{[^}]*\})? [0-9.e+-]+', line), line


def test_concurrent_requests_are_batched_and_all_answered(engine, tiny_vit_onnx):
    with ClassifyServer(engine, port=0, max_batch=8, max_wait_ms=100) as srv:
        blobs = [image_bytes(seed=i) for i in range(12)]
        with ThreadPoolExecutor(12) as ex:
            results = list(ex.map(lambda b: post_json(srv, "/v1/classify", b, "image/jpeg"), blobs))
        assert all(s == 200 for s, _ in results)
        for blob, (_, r) in zip(blobs, results):  # each request got its own row back
            assert [t["class"] for t in r["topk"]] == expected_topk(engine, blob)[0]
        text = request(srv, "GET", "/metrics")[2].decode()
        n_calls = int(re.search(r"^vitq_batch_size_count (\d+)$", text, re.M).group(1))
        assert float(re.search(r"^vitq_batch_size_sum (\S+)$", text, re.M).group(1)) == 12
        assert n_calls < 12  # some engine calls served several requests


class _RecordingEngine:
    def __init__(self, fail_on=None):
        self.sizes = []
        self.fail_on = fail_on

    def run(self, x, max_batch=None):
        self.sizes.append(len(x))
        if self.fail_on is not None and len(self.sizes) == self.fail_on:
            raise RuntimeError("boom")
        return x.reshape(len(x), -1)[:, :2] * 2


def test_batcher_groups_up_to_max_batch_and_isolates_failures():
    eng = _RecordingEngine()
    b = Batcher(eng, max_batch=4, max_wait_ms=300, metrics=Metrics())
    try:
        xs = [np.full((1, 2), i, np.float32) for i in range(10)]
        futs = [b.submit(x) for x in xs]
        outs = [f.result(timeout=10) for f in futs]
        for i, o in enumerate(outs):
            np.testing.assert_array_equal(o, [[2 * i, 2 * i]])
        assert sum(eng.sizes) == 10 and max(eng.sizes) <= 4 and len(eng.sizes) < 10
    finally:
        b.stop()
    eng = _RecordingEngine(fail_on=1)
    b = Batcher(eng, max_batch=4, max_wait_ms=0, metrics=Metrics())
    try:
        with pytest.raises(RuntimeError, match="boom"):
            b.submit(np.zeros((1, 2), np.float32)).result(timeout=10)
        ok = b.submit(np.ones((1, 2), np.float32)).result(timeout=10)  # the batcher thread survived
        np.testing.assert_array_equal(ok, [[2, 2]])
    finally:
        b.stop()


def test_engine_failure_is_a_500_not_a_crash(engine):
    class Flaky:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, x, max_batch=None):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("simulated engine fault")
            return self.inner.run(x, max_batch=max_batch)

    with ClassifyServer(Flaky(engine), port=0, max_wait_ms=0) as srv:
        status, res = post_json(srv, "/v1/classify", image_bytes(), "image/jpeg")
        assert status == 500 and "simulated engine fault" in res["error"]
        assert post_json(srv, "/v1/classify", image_bytes(), "image/jpeg")[0] == 200


def test_serve_module_does_not_import_torch():
    code = ("import sys, vitq.serve, vitq.triton, vitq.regression; "
            "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cli_serve_subprocess(tiny_vit_onnx):
    p = subprocess.Popen([sys.executable, "-m", "vitq", "serve", str(tiny_vit_onnx), "--port", "0", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while time.time() < deadline and "http://" not in line:
            line = p.stderr.readline()
            if not line and p.poll() is not None:
                break
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert m, line + (p.stderr.read() if p.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=30)
        conn.request("POST", "/v1/classify", body=image_bytes(), headers={"Content-Type": "image/jpeg"})
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["topk"]) == 5
        conn.close()
    finally:
        p.terminate()
        p.wait(10)


def test_cli_serve_rejects_model_without_preprocessing(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    from vitq.cli import main

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 4, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    assert main(["serve", str(tmp_path / "m.onnx"), "--port", "0"]) == 2
    assert "no preprocessing config" in capsys.readouterr().err
