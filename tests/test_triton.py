"""`vitq export-triton`: repositories whose configs parse with Triton's own ModelConfig protobuf, and a real
tritonserver (the pinned nvidia-pytriton wheel) serving one: READY, logits equal to ``Engine.run`` over HTTP and gRPC,
the JPEG ensemble equal to vitq's own preprocessing, 4xx for bad requests, a clean stop."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitq.cli import main
from vitq.runtime import Engine
from vitq.runtime.preprocess import decode_image_bytes, preprocess
from vitq.triton import TritonServer, export_triton

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] (dev extra) not installed")
text_format = pytest.importorskip("google.protobuf.text_format")


def parse(path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_export_onnx_repository_parses_with_triton_protobuf(tiny_vit_onnx, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--max-batch", "16",
                 "--max-wait-ms", "2.5"]) == 0
    assert "wrote" in capsys.readouterr().out
    d = repo / "tiny_vit"
    assert (d / "1" / "model.onnx").read_bytes() == (tiny_vit_onnx / "model.onnx").read_bytes()
    cfg = parse(d / "config.pbtxt")
    eng = Engine.load(tiny_vit_onnx)
    assert cfg.name == "tiny_vit" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    (inp,), (out,) = cfg.input, cfg.output
    assert inp.name == eng.inputs[0].name and list(inp.dims) == [3, 32, 32]
    assert inp.data_type == mc.DataType.Value("TYPE_FP32")
    assert out.name == eng.outputs[0].name and list(out.dims) == [10]
    assert out.data_type == mc.DataType.Value("TYPE_FP32")
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2500
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value("KIND_CPU")
    pre = json.loads(cfg.parameters["vitq.preprocess"].string_value)
    assert pre == eng.preprocess.to_dict()
    # re-export replaces the model directory atomically, leaves no staging dirs and other models untouched
    (repo / "other").mkdir()
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--name", "vit-b", "--gpu"]) == 0
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--name", "vit-b"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == ["other", "tiny_vit", "vit-b"]
    assert parse(repo / "vit-b" / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value(
        "KIND_CPU")


def test_export_plan_with_plugin_note(tiny_vit_onnx, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_vit_onnx, art)
    (art / "model.engine").write_bytes(b"fake-serialized-plan")
    dest = export_triton(art, tmp_path / "repo", fmt="plan", plugin_lib="/opt/vitq/libvitq_plugins.so")
    assert (dest / "1" / "model.plan").read_bytes() == b"fake-serialized-plan"
    assert not (dest / "1" / "model.onnx").exists()
    text = (dest / "config.pbtxt").read_text()
    assert "LD_PRELOAD=/opt/vitq/libvitq_plugins.so" in text
    cfg = parse(dest / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.Kind.Value("KIND_GPU")
    assert cfg.parameters["vitq.plugin_library"].string_value == "/opt/vitq/libvitq_plugins.so"
    assert "LD_PRELOAD" in (dest / "README.txt").read_text()


def test_static_batch_model_has_no_dynamic_batching(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    dest = export_triton(tmp_path / "m.onnx", tmp_path / "repo", name="relu")
    cfg = parse(dest / "config.pbtxt")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [1, 3, 8, 8]


def test_export_errors(tiny_vit_onnx, tmp_path, capsys):
    assert main(["export-triton", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "r"), "--format", "plan"]) == 2
    assert "model.engine" in capsys.readouterr().err
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "r"), "--name", "bad name!"]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "file")]) == 2
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_string_escaping_round_trips_through_protobuf():
    from vitq.triton import _q

    v = 'a"b\\c\nd\te\x01 é {"x": [1, 2]}'
    assert text_format.Parse("name: " + _q(v), mc.ModelConfig()).name == v



def test_python_backend_and_preprocess_ensemble_configs(tiny_vit_onnx, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--backend", "python", "--preprocess",
                 "--max-batch", "16", "--queue-delay-us", "750", "--preferred-batch", "4", "16", "--instances", "3",
                 "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny_vit_image" in out and "1/model.py" in out
    cfg = parse(repo / "tiny_vit" / "config.pbtxt")
    assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 750
    assert cfg.instance_group[0].count == 3 and cfg.parameters["vitq.threads"].string_value == "2"
    assert "from vitq.triton import ClassifierModel" in (repo / "tiny_vit" / "1" / "model.py").read_text()
    assert (repo / "tiny_vit" / "1" / "model.onnx").read_bytes() == (tiny_vit_onnx / "model.onnx").read_bytes()
    pre = parse(repo / "tiny_vit_preprocess" / "config.pbtxt")
    assert pre.backend == "python" and pre.max_batch_size == 16
    assert pre.input[0].data_type == mc.DataType.Value("TYPE_STRING") and list(pre.input[0].dims) == [1]
    assert pre.output[0].name == "input" and list(pre.output[0].dims) == [3, 32, 32]
    assert json.loads(pre.parameters["vitq.preprocess"].string_value) == Engine.load(tiny_vit_onnx).preprocess.to_dict()
    ens = parse(repo / "tiny_vit_image" / "config.pbtxt")
    assert ens.platform == "ensemble" and ens.max_batch_size == 16
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["tiny_vit_preprocess", "tiny_vit"]
    assert steps[0].output_map["input"] == steps[1].input_map["input"] and steps[1].output_map["logits"] == "logits"
    # onnxruntime: --threads maps to the ORT backend's own parameters
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--threads", "3"]) == 0
    assert parse(repo / "tiny_vit" / "config.pbtxt").parameters["intra_op_thread_count"].string_value == "3"


def test_tensorrt_batch_sizes_follow_the_engine_profile(tiny_vit_onnx, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_vit_onnx, art)
    (art / "model.engine").write_bytes(b"fake-serialized-plan")
    (art / "model.engine.json").write_text(json.dumps({"build": {"batch_range": {"min": 1, "opt": 4, "max": 16}}}))
    dest = export_triton(art, tmp_path / "repo", backend="tensorrt")
    cfg = parse(dest / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert main(["export-triton", str(art), "--out", str(tmp_path / "r2"), "--backend", "tensorrt",
                 "--max-batch", "32"]) == 2
    assert "optimization profile" in capsys.readouterr().err
    (art / "model.engine.json").write_text(json.dumps({"build": {"batch_range": {"min": 2, "opt": 4, "max": 16}}}))
    assert main(["export-triton", str(art), "--out", str(tmp_path / "r3"), "--backend", "tensorrt"]) == 2
    assert "--batch-range 1:4:16" in capsys.readouterr().err


def test_export_option_errors(tiny_vit_onnx, tmp_path, capsys):
    base = ["export-triton", str(tiny_vit_onnx), "--out", str(tmp_path / "r")]
    for extra, msg in ((["--backend", "python", "--gpu"], "--gpu"),
                       (["--preferred-batch", "16"], "--preferred-batch 16"),
                       (["--backend", "python", "--format", "plan"], "contradicts"),
                       (["--plugin-lib", "/x.so"], "--plugin-lib")):
        assert main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra
    with pytest.raises(SystemExit) as ei:  # argparse: one queue delay only
        main(base + ["--queue-delay-us", "10", "--max-wait-ms", "1"])
    assert ei.value.code == 2
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


# -- against the real server ---------------------------------------------------------------------------------------
# A tritonserver from the pinned nvidia-pytriton wheel (scripts/triton_env.sh builds its Python environment under
# build/, reused while its spec is unchanged) serves a repository exported with --backend python --preprocess.

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tiny_vit", "tiny_vit_preprocess", "tiny_vit_image")


@pytest.fixture(scope="module")
def triton_env():
    r = subprocess.run(["bash", str(REPO / "scripts" / "triton_env.sh")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable}, timeout=1800)
    if r.returncode == 3:
        pytest.skip(f"the nvidia-pytriton wheel cannot be installed here: {r.stderr.strip()[-400:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    return REPO / r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def server(triton_env, tiny_vit_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repo = root / "repo"
    assert main(["export-triton", str(tiny_vit_onnx), "--out", str(repo), "--backend", "python", "--preprocess",
                 "--max-batch", "8", "--queue-delay-us", "20000", "--instances", "2", "--threads", "1"]) == 0
    assert sorted(p.name for p in repo.iterdir()) == sorted(MODELS)
    srv = TritonServer(repo, triton_env, log=root / "tritonserver.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        assert not srv.group_alive(), "tritonserver processes left behind"


@pytest.fixture(scope="module")
def engine(tiny_vit_onnx):
    return Engine.load(tiny_vit_onnx)


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Real ImageNet JPEGs (../shared/data) when present, else generated ones."""
    shared = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
    folder = shared / "imagenet-val-dev650" / "images"
    if folder.is_dir():
        files = sorted(folder.glob("*.JPEG"))[:6]
        if files:
            return [f.read_bytes() for f in files]
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 56, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@contextlib.contextmanager
def _clients(srv):
    """(tritonclient.http, its client, tritonclient.grpc, its client), closed on exit: an open keep-alive connection
    would hold the server's graceful shutdown."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    hc, gc = th.InferenceServerClient(srv.http_url, concurrency=16), tg.InferenceServerClient(srv.grpc_url)
    try:
        yield th, hc, tg, gc
    finally:
        hc.close()
        gc.close()


def _infer(mod, client, model, name, x, dtype):
    inp = mod.InferInput(name, list(x.shape), dtype)
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("logits")


def test_every_model_is_ready(server):
    with _clients(server) as (th, hc, tg, gc):
        _check_ready(server, hc, gc)


def _check_ready(server, hc, gc):
    assert hc.is_server_ready() and gc.is_server_ready()
    for m in MODELS:
        assert hc.is_model_ready(m) and gc.is_model_ready(m) and server.model_ready(m), m
    cfg = hc.get_model_config("tiny_vit")
    assert cfg["backend"] == "python" and cfg["max_batch_size"] == 8
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 20000
    assert gc.get_model_metadata("tiny_vit_image").platform == "ensemble"


def test_logits_over_http_and_grpc_equal_engine_run(server, engine):
    x = np.random.default_rng(1).standard_normal((5, 3, 32, 32)).astype(np.float32)
    want = engine.run(x)
    with _clients(server) as (th, hc, tg, gc):
        for mod, client in ((th, hc), (tg, gc)):
            got = _infer(mod, client, "tiny_vit", "input", x, "FP32")
            assert got.shape == want.shape == (5, 10)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            assert (got.argmax(1) == want.argmax(1)).all()


def test_concurrent_requests_are_batched_dynamically(server, engine):
    xs = [np.random.default_rng(10 + i).standard_normal((1, 3, 32, 32)).astype(np.float32) for i in range(16)]
    with _clients(server) as (th, hc, _, _):
        before = hc.get_inference_statistics("tiny_vit")["model_stats"][0]
        pending = []
        for x in xs:
            inp = th.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            pending.append(hc.async_infer("tiny_vit", [inp]))
        for x, p in zip(xs, pending):
            np.testing.assert_allclose(p.get_result().as_numpy("logits"), engine.run(x), rtol=0, atol=1e-5)
        after = hc.get_inference_statistics("tiny_vit")["model_stats"][0]
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 16 and executions < inferences, (inferences, executions)


def test_ensemble_takes_jpegs_with_vitqs_preprocessing(server, engine, jpegs):
    cfg = engine.preprocess
    pixels = np.stack([preprocess(decode_image_bytes(b), cfg) for b in jpegs])
    want = engine.run(pixels)
    batch = np.array(jpegs, dtype=np.object_).reshape(-1, 1)
    with _clients(server) as (th, hc, tg, gc):
        for mod, client in ((th, hc), (tg, gc)):
            # the preprocessing model alone: the same tensor as vitq's own preprocessing, bit for bit
            inp = mod.InferInput("IMAGE", list(batch.shape), "BYTES")
            inp.set_data_from_numpy(batch)
            np.testing.assert_array_equal(client.infer("tiny_vit_preprocess", [inp]).as_numpy("input"), pixels)
            got = client.infer("tiny_vit_image", [inp]).as_numpy("logits")
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            assert (got.argmax(1) == want.argmax(1)).all()
            one = mod.InferInput("IMAGE", [1, 1], "BYTES")  # one image per request, as clients usually send
            one.set_data_from_numpy(batch[:1])
            assert client.infer("tiny_vit_image", [one]).as_numpy("logits").argmax(1)[0] == want[0].argmax()


def _post(srv, path: str, body: dict | bytes) -> tuple[int, str]:
    host, port = srv.http_url.split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        c.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def _tensor(name, shape, dtype, data):
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": dtype, "data": data}]}


def test_bad_requests_get_4xx_and_the_server_stays_ready(server, engine, jpegs):
    ok = np.zeros((1, 3, 32, 32), np.float32)
    bad = {
        "wrong shape": ("tiny_vit", _tensor("input", (1, 3, 16, 16), "FP32", [0.0] * 768)),
        "wrong dtype": ("tiny_vit", _tensor("input", (1, 3, 32, 32), "FP64", [0.0] * 3072)),
        "too large a batch": ("tiny_vit", _tensor("input", (9, 3, 32, 32), "FP32", [0.0] * 9 * 3072)),
        "wrong input name": ("tiny_vit", _tensor("pixels", (1, 3, 32, 32), "FP32", [0.0] * 3072)),
        "garbage image bytes": ("tiny_vit_image", _tensor("IMAGE", (1, 1), "BYTES", ["not an image at all"])),
        "truncated JPEG": ("tiny_vit_preprocess", _tensor("IMAGE", (1, 1), "BYTES", ["\xff\xd8\xff\xe0"])),
        "unknown model": ("no_such_model", _tensor("input", (1, 3, 32, 32), "FP32", [0.0] * 3072)),
    }
    for what, (model, body) in bad.items():
        status, text = _post(server, f"/v2/models/{model}/infer", body)
        assert 400 <= status < 500, (what, status, text)
        assert "error" in json.loads(text), (what, text)
        assert server.ready(), f"server not ready after {what}"
    assert "cannot decode" in _post(server, "/v2/models/tiny_vit_image/infer", bad["garbage image bytes"][1])[1]
    # a body that is not JSON: Triton's HTTP frontend answers 500 (its own choice, before any model runs)
    status, text = _post(server, "/v2/models/tiny_vit/infer", b'{"inputs": [ {')
    assert status == 500 and "failed to parse the request JSON" in text and server.ready()
    # gRPC says INVALID_ARGUMENT for the same mistakes
    from tritonclient.utils import InferenceServerException

    with _clients(server) as (th, hc, tg, gc):
        for what, (name, x, dtype, model) in {
            "wrong shape": ("input", np.zeros((1, 3, 16, 16), np.float32), "FP32", "tiny_vit"),
            "wrong dtype": ("input", np.zeros((1, 3, 32, 32), np.float64), "FP64", "tiny_vit"),
            "garbage image bytes": ("IMAGE", np.array([[b"garbage"]], dtype=np.object_), "BYTES", "tiny_vit_image"),
        }.items():
            inp = tg.InferInput(name, list(x.shape), dtype)
            inp.set_data_from_numpy(x)
            with pytest.raises(InferenceServerException) as ei:
                gc.infer(model, [inp])
            assert ei.value.status() == "StatusCode.INVALID_ARGUMENT", (what, ei.value)
        # and still serves good requests, on every model
        got = _infer(th, hc, "tiny_vit", "input", ok, "FP32")
        np.testing.assert_allclose(got, engine.run(ok), rtol=0, atol=1e-5)
        one = np.array([[jpegs[0]]], dtype=np.object_)
        assert _infer(tg, gc, "tiny_vit_image", "IMAGE", one, "BYTES").shape == (1, 10)
    for m in MODELS:
        assert server.model_ready(m)


def _group_members(pgid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                out.append(int(p.name))
    return out


def test_server_stops_cleanly_with_its_backend_stubs(server):
    """Last in this module: SIGTERM stops the server (exit 0) and its python-backend stub processes with it."""
    members = _group_members(server.proc.pid)
    assert server.proc.pid in members and len(members) >= 4, members  # the server + one stub per model instance
    assert server.stop() == 0, server.log_tail()
    assert not server.group_alive() and not [p for p in members if Path(f"/proc/{p}").exists()]


def test_server_dies_with_the_process_that_started_it(server, triton_env):
    """A test run killed outright (SIGKILL: no finally, no atexit) leaves no tritonserver behind."""
    code = ("import sys, time; from vitq.triton import TritonServer; "
            "s = TritonServer(sys.argv[1], sys.argv[2]).start(); print(s.proc.pid, flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(server.repo), str(triton_env)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pgid = int(child.stdout.readline())
        assert _group_members(pgid)
    finally:
        child.kill()
        child.wait()
    deadline = time.monotonic() + 60
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_members(pgid)
