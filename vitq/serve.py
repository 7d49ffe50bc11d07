"""An HTTP inference server over the runtime :class:`~vitq.runtime.Engine`, with dynamic batching. Torch-free.

    vitq serve build/deit --port 8080 [--host 127.0.0.1] [--max-batch 8] [--max-wait-ms 5] [--threads N]

Endpoints:

* ``POST /v1/classify`` (``?k=5`` sets how many classes come back):
  - body ``image/jpeg`` / ``image/png`` (also webp, bmp, ``application/octet-stream``): one image ->
    ``{"topk": [{"class": int, "score": float}, ...]}``;
  - ``multipart/form-data`` (every file part is an image) or ``application/json``
    ``{"images": ["<base64>", ...], "k": 5}``: a batch -> a JSON list of ``{"topk": ...}``, in request order.
    (``{"image": "<base64>"}`` is a single image.)
  Images are preprocessed with the model's own config (``engine.preprocess``, carried in the ONNX metadata).
* ``GET /health``: ``{"status": "ok", "model": ..., ...}``.
* ``GET /metrics``: Prometheus text format (requests by path and status, request latency and batch size
  histograms, images processed, queue depth).

Request handler threads decode and preprocess; one batcher thread collects queued requests until ``max_batch`` images
or ``max_wait_ms`` after the first one, runs a single engine call and hands each request its rows. Bad requests get a
4xx with ``{"error": message}`` (400 undecodable, 404 unknown path, 405 wrong method, 411 no length, 413 too large,
415 wrong content type); an engine failure is a 500 for the requests of that batch only.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from . import __version__
from .errors import InputError, VitqError
from .runtime.engine import Engine, softmax
from .runtime.preprocess import PreprocessConfig, decode_image_bytes, preprocess

IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "application/octet-stream")
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
MAX_BATCH_IMAGES = 256  # per request (multipart/JSON)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


# -- metrics -------------------------------------------------------------------------------------------------------
class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_num(self.sum)}")
        lines.append(f"{name}_count {self.count}")
        return lines


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"


class Metrics:
    """Thread-safe counters and histograms rendered in the Prometheus text exposition format (version 0.0.4)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch = _Histogram(BATCH_BUCKETS)
        self.images = 0
        self.engine_seconds = 0.0

    def request(self, method: str, path: str, status: int, seconds: float | None) -> None:
        with self._lock:
            k = (method, path, int(status))
            self.requests[k] = self.requests.get(k, 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch_run(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batch.observe(size)
            self.images += size
            self.engine_seconds += seconds

    def render(self, queue_depth: int) -> str:
        with self._lock:
            out = ["# HELP vitq_requests_total HTTP requests by method, path and status code.",
                   "# TYPE vitq_requests_total counter"]
            for (m, p, s), n in sorted(self.requests.items()):
                out.append(f'vitq_requests_total{{method="{m}",path="{_label(p)}",code="{s}"}} {n}')
            out += ["# HELP vitq_request_latency_seconds Latency of POST /v1/classify requests (receive to reply).",
                    "# TYPE vitq_request_latency_seconds histogram"]
            out += self.latency.render("vitq_request_latency_seconds")
            out += ["# HELP vitq_batch_size Images per engine call made by the dynamic batcher.",
                    "# TYPE vitq_batch_size histogram"]
            out += self.batch.render("vitq_batch_size")
            out += ["# HELP vitq_images_total Images classified.", "# TYPE vitq_images_total counter",
                    f"vitq_images_total {self.images}",
                    "# HELP vitq_engine_seconds_total Time spent in engine calls.",
                    "# TYPE vitq_engine_seconds_total counter", f"vitq_engine_seconds_total {_num(self.engine_seconds)}",
                    "# HELP vitq_queue_depth Requests waiting for the batcher.", "# TYPE vitq_queue_depth gauge",
                    f"vitq_queue_depth {queue_depth}"]
        return "\n".join(out) + "\n"


def _label(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- dynamic batching ----------------------------------------------------------------------------------------------
class Batcher:
    """Collects submitted arrays ``[n, C, H, W]`` into engine calls of up to ``max_batch`` images, waiting at most
    ``max_wait_ms`` after the first queued request. One thread; ``submit`` returns a Future of the logits."""

    def __init__(self, engine: Engine, max_batch: int = 8, max_wait_ms: float = 5.0, metrics: Metrics | None = None):
        if max_batch <= 0 or max_wait_ms < 0:
            raise InputError("max_batch must be positive and max_wait_ms non-negative")
        self.engine = engine
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1e3
        self.metrics = metrics or Metrics()
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="vitq-batcher", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray) -> Future:
        fut: Future = Future()
        if self._stop.is_set():
            fut.set_exception(HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down"))
            return fut
        self._q.put((x, fut))
        return fut

    def depth(self) -> int:
        return self._q.qsize()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._q.put(None)
        self._thread.join(timeout)
        while True:  # fail whatever is still queued
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if item is not None and not item[1].done():
                item[1].set_exception(HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down"))

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self._q.get()
            if item is None:
                continue
            items = [item]
            n = len(item[0])
            deadline = time.perf_counter() + self.max_wait
            while n < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    break
                items.append(nxt)
                n += len(nxt[0])
            self._run(items)

    def _run(self, items: list) -> None:
        try:
            x = np.concatenate([a for a, _ in items]) if len(items) > 1 else items[0][0]
            t0 = time.perf_counter()
            logits = np.asarray(self.engine.run(x, max_batch=self.max_batch))
            self.metrics.batch_run(len(x), time.perf_counter() - t0)
        except BaseException as e:  # the engine failed: those requests get a 500, the server lives on
            for _, f in items:
                if not f.done():
                    f.set_exception(e)
            return
        s = 0
        for a, f in items:
            f.set_result(logits[s:s + len(a)])
            s += len(a)


# -- request parsing -----------------------------------------------------------------------------------------------
def _split_multipart(body: bytes, content_type: str) -> list[bytes]:
    from email import message_from_bytes
    from email.policy import HTTP

    msg = message_from_bytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body, policy=HTTP)
    if not msg.is_multipart():
        raise HttpError(HTTPStatus.BAD_REQUEST, "malformed multipart body")
    parts = []
    for part in msg.iter_parts():
        payload = part.get_payload(decode=True)
        if payload is None:
            continue
        if part.get_filename() is None and part.get_content_maintype() == "text":
            continue  # a plain form field, not an image
        parts.append(payload)
    if not parts:
        raise HttpError(HTTPStatus.BAD_REQUEST, "multipart body holds no file parts")
    return parts


def _parse_json(body: bytes) -> tuple[list[bytes], bool, int | None]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"invalid JSON: {e}") from None
    if not isinstance(doc, dict) or not ("images" in doc or "image" in doc):
        raise HttpError(HTTPStatus.BAD_REQUEST, 'JSON body must be {"images": ["<base64>", ...]} or '
                                                '{"image": "<base64>"}')
    batch = "images" in doc
    raw = doc["images"] if batch else [doc["image"]]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
        raise HttpError(HTTPStatus.BAD_REQUEST, '"images" must be a non-empty list of base64 strings')
    out = []
    for i, s in enumerate(raw):
        if s.startswith("data:") and "," in s:
            s = s.split(",", 1)[1]
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"images[{i}] is not valid base64") from None
    k = doc.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool)):
        raise HttpError(HTTPStatus.BAD_REQUEST, '"k" must be an integer')
    return out, batch, k


# -- the server ----------------------------------------------------------------------------------------------------
class _HTTPServer(ThreadingHTTPServer):
    # the listen backlog (socketserver's default is 5): a burst of new connections beyond it is reset by the kernel
    # while the accept loop waits for the GIL, and those clients see "connection reset" instead of a queued request
    request_queue_size = 1024


class ClassifyServer:
    """The HTTP server: ``start()`` serves in a background thread (tests), ``serve_forever()`` blocks (CLI)."""

    def __init__(self, engine: Engine, *, host: str = "127.0.0.1", port: int = 0, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_bytes: int = DEFAULT_MAX_BYTES, topk: int = 5,
                 request_timeout_s: float = 30.0, preprocess_config: PreprocessConfig | None = None):
        cfg = preprocess_config or engine.preprocess
        if cfg is None:
            raise InputError(f"{engine.path} carries no preprocessing config (metadata 'vitq.preprocess'); "
                             f"serve an artifact compiled by vitq")
        if len(engine.inputs) != 1:
            raise InputError(f"{engine.path}: serving needs a single-input model, it has {len(engine.inputs)}")
        if max_bytes <= 0 or topk <= 0:
            raise InputError("max_bytes and topk must be positive")
        self.engine = engine
        self.cfg = cfg
        self.max_bytes = int(max_bytes)
        self.topk = int(topk)
        self.request_timeout_s = float(request_timeout_s)
        self.metrics = Metrics()
        self.batcher = Batcher(engine, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=self.metrics)
        self.started = time.time()
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = _HTTPServer((host, port), handler)
        except OSError as e:
            self.batcher.stop()
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.httpd.server_address[0], self.httpd.server_address[1]

    @property
    def url(self) -> str:
        h, p = self.address
        return f"http://{h}:{p}"

    def start(self) -> "ClassifyServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="vitq-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.close()

    def close(self) -> None:
        self.batcher.stop()
        self.httpd.server_close()

    def __enter__(self) -> "ClassifyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- request logic (called from handler threads) ---------------------------------------------------------------
    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": e.metadata.get("vitq.model"), "path": str(e.path), "backend": e.backend,
                "input": e.inputs[0].to_dict(), "num_classes": e.num_classes, "max_batch": self.batcher.max_batch,
                "uptime_s": round(time.time() - self.started, 3), "vitq_version": __version__}

    def classify(self, content_type: str, body: bytes, query: dict) -> Any:
        ctype = content_type.split(";", 1)[0].strip().lower()
        k = self.topk
        if "k" in query:
            try:
                k = int(query["k"][-1])
            except ValueError:
                raise HttpError(HTTPStatus.BAD_REQUEST, "query parameter k must be an integer") from None
        if ctype in IMAGE_TYPES:
            blobs, batch = [body], False
        elif ctype == "multipart/form-data":
            blobs, batch = _split_multipart(body, content_type), True
        elif ctype == "application/json":
            blobs, batch, jk = _parse_json(body)
            k = jk if jk is not None else k
        else:
            raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                            f"unsupported content type {ctype or '(none)'!r}; send image/jpeg, image/png, "
                            f"multipart/form-data or application/json with base64 images")
        if k <= 0:
            raise HttpError(HTTPStatus.BAD_REQUEST, "k must be positive")
        if len(blobs) > MAX_BATCH_IMAGES:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"{len(blobs)} images in one request; at most {MAX_BATCH_IMAGES}")
        arrays = []
        for i, blob in enumerate(blobs):
            if not blob:
                raise HttpError(HTTPStatus.BAD_REQUEST, "empty image" + (f" (image {i})" if batch else ""))
            try:
                img = decode_image_bytes(blob, what=f"image {i}" if batch else "request body")
                arrays.append(preprocess(img, self.cfg))
            except VitqError as e:
                raise HttpError(HTTPStatus.BAD_REQUEST, str(e)) from None
            except Exception as e:  # PIL can raise odd things on hostile input (e.g. DecompressionBombError)
                raise HttpError(HTTPStatus.BAD_REQUEST, f"cannot decode image {i}: {e.__class__.__name__}: {e}") \
                    from None
        x = np.stack(arrays).astype(self.engine.inputs[0].dtype, copy=False)
        fut = self.batcher.submit(x)
        try:
            logits = fut.result(timeout=self.request_timeout_s)
        except FutureTimeout:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "timed out waiting for the model") from None
        except HttpError:
            raise
        except Exception as e:
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"inference failed: {e}") from None
        res = [_topk_row(row, k) for row in logits]
        return res if batch else res[0]


def _topk_row(logits: np.ndarray, k: int) -> dict:
    p = softmax(np.asarray(logits, dtype=np.float64)[None])[0]
    k = min(k, p.shape[0])
    idx = np.argsort(-p, kind="stable")[:k]
    return {"topk": [{"class": int(c), "score": float(p[c])} for c in idx]}


class _Handler(BaseHTTPRequestHandler):
    app: ClassifyServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a connection may sit idle or stall mid-request before its thread gives up
    server_version = f"vitq/{__version__}"

    def log_message(self, format, *args):  # quiet by default; metrics carry the counts
        pass

    def _reply(self, status: int, payload: Any, ctype: str = "application/json", t0: float | None = None,
               close: bool = False) -> None:
        body = payload if isinstance(payload, bytes) else (json.dumps(payload) + "\n").encode()
        path = urlsplit(self.path).path
        known = path if path in ("/v1/classify", "/health", "/metrics") else "other"
        self.app.metrics.request(self.command, known, status,
                                 (time.perf_counter() - t0) if t0 is not None and known == "/v1/classify" else None)
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, status: int, message: str, t0: float | None = None, close: bool = False) -> None:
        self._reply(status, {"error": message, "status": int(status)}, t0=t0, close=close)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":
            self._reply(200, self.app.health())
        elif path == "/metrics":
            self._reply(200, self.app.metrics.render(self.app.batcher.depth()).encode(),
                        ctype="text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/classify":
            self._error(405, "use POST for /v1/classify")
        else:
            self._error(404, f"unknown path {path!r}; endpoints: POST /v1/classify, GET /health, GET /metrics")

    def do_POST(self):
        t0 = time.perf_counter()
        parts = urlsplit(self.path)
        if parts.path != "/v1/classify":
            self._drain()
            if parts.path in ("/health", "/metrics"):
                return self._error(405, f"use GET for {parts.path}")
            return self._error(404, f"unknown path {parts.path!r}; endpoints: POST /v1/classify, GET /health, "
                                    f"GET /metrics")
        try:
            length = self.headers.get("Content-Length")
            if length is None:
                return self._error(411, "Content-Length is required (chunked bodies are not supported)", t0,
                                   close=True)
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                return self._error(400, f"bad Content-Length {length!r}", t0, close=True)
            if n > self.app.max_bytes:
                self._discard(n)  # read what the client sends so that the reply is not lost to a TCP reset
                return self._error(413, f"request body of {n} bytes exceeds the limit of {self.app.max_bytes} "
                                        f"bytes", t0, close=True)
            body = self.rfile.read(n)
            if len(body) != n:
                return self._error(400, "request body shorter than Content-Length", t0, close=True)
            if n == 0:
                return self._error(400, "empty request body", t0)
            result = self.app.classify(self.headers.get("Content-Type", ""), body, parse_qs(parts.query))
            self._reply(200, result, t0=t0)
        except HttpError as e:
            self._error(e.status, str(e), t0)
        except Exception as e:  # never take the server down
            self._error(500, f"internal error: {e.__class__.__name__}: {e}", t0)

    def _discard(self, n: int, cap: int = 64 * 1024 * 1024) -> None:
        left = min(n, cap)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _drain(self) -> None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = 0
        if n > 0:
            self._discard(n)
            self.close_connection = n > self.app.max_bytes

    def do_PUT(self):
        self._drain()
        self._error(405, f"method PUT not allowed on {urlsplit(self.path).path!r}")

    do_DELETE = do_PATCH = do_PUT


def serve(model, *, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8, max_wait_ms: float = 5.0,
          threads: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES, topk: int = 5, backend: str = "auto",
          echo=print) -> None:
    """Load ``model`` and serve it until interrupted."""
    engine = Engine.load(model, backend=backend, threads=threads)
    srv = ClassifyServer(engine, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_bytes=max_bytes, topk=topk)
    echo(f"vitq serve: {engine.metadata.get('vitq.model') or engine.path} ({engine.backend}) on {srv.url} "
         f"(max batch {max_batch}, max wait {max_wait_ms} ms); POST /v1/classify, GET /health, GET /metrics")
    srv.serve_forever()
