"""`vitq compile ... --mixa`: argument parsing and errors (fast), and one end-to-end compile (slow)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("timm")

from conftest import make_image_folder  # noqa: E402
from vitq.cli import main  # noqa: E402
from vitq.errors import InputError  # noqa: E402
from vitq.mixa.config import parse_bits_arg, parse_mixa_arg  # noqa: E402
from vitq.recipe.schema import Recipe  # noqa: E402

MODEL = "deit_tiny_patch16_224"


def test_parse_mixa_arg(tmp_path):
    assert parse_mixa_arg("1.35x") == ("target", 1.35)
    assert parse_mixa_arg("1.5") == ("target", 1.5)
    with pytest.raises(InputError, match=">= 1"):
        parse_mixa_arg("0.8x")
    with pytest.raises(InputError, match="reduction target like 1.35x"):
        parse_mixa_arg("fast")
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"blocks.0": 0.5, "default": 0.2}))
    assert parse_mixa_arg(str(p)) == ("ratios", {"blocks.0": 0.5, "default": 0.2})
    p.write_text(json.dumps({"blocks.0": 0.95}))
    with pytest.raises(InputError, match=r"ratio in \[0, 0.8\]"):
        parse_mixa_arg(str(p))
    p.write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        parse_mixa_arg(str(p))


def test_parse_bits_arg():
    rec = Recipe("w4a8", MODEL, [], {"weight_bits": 4, "act_bits": 8})
    assert parse_bits_arg(None, rec) == (8, 4)
    assert parse_bits_arg("fp32/8", rec) == (32, 8)
    assert parse_bits_arg("8/4", rec) == (8, 4)
    for bad, msg in (("4/8", "more bits"), ("9/4", "2..8"), ("eight/4", "HIGH/LOW")):
        with pytest.raises(InputError, match=msg):
            parse_bits_arg(bad, rec)


def test_mixa_needs_calibration_images(tmp_path, capsys):
    code = main(["compile", MODEL, "--recipe", "w4a8", "--mixa", "1.2x", "--out", str(tmp_path / "o")])
    assert code == 2 and "calibration images" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,msg", [
    (["--mixa-low-quant", "dynamic"], "needs --mixa"),
    (["--mixa-low-softmax", "log"], "--mixa-low-softmax needs --mixa"),
    (["--mixa", "1.2x", "--mixa-low-quant", "static", "--mixa-low-group", "32"], "needs the dynamic low branch"),
    (["--mixa", "1.2x", "--mixa-low-quant", "dynamic", "--mixa-low-group", "1"], "group size >= 2"),
    (["--mixa", "1.2x", "--mixa-low-quant", "dynamic", "--mixa-low-group", "16", "--target", "trt"],
     "takes groups of 32, 64, 128, 256"),
    (["--mixa", "1.2x", "--mixa-low-quant", "static", "--mixa-low-softmax", "log"],
     "--mixa-low-softmax needs the dynamic low branch"),
])
def test_mixa_low_quant_errors(tmp_path, capsys, args, msg):
    calib = make_image_folder(tmp_path / "calib", n=2, size=(32, 32))
    code = main(["compile", MODEL, "--recipe", "w4a8", "--calib", str(calib), *args, "--out", str(tmp_path / "o")])
    assert code != 0 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compile_mixa_end_to_end(tmp_path):
    """DeiT-Tiny (random weights), w4a8 + MixA-Q at 1.2x: report contract, two-precision graph, verification."""
    calib = make_image_folder(tmp_path / "calib", n=6, size=(64, 48))
    out = tmp_path / "out"
    assert main(["compile", MODEL, "--calib", str(calib), "--recipe", "w4a8", "--mixa", "1.2x", "--out", str(out),
                 "-q"]) == 0
    r = json.loads((out / "report.json").read_text())
    mx = r["mixa"]
    assert isinstance(mx["bitops_reduction"], float) and mx["bitops_reduction"] >= 1.2
    assert set(mx["ratios"]) == {f"blocks.{i}" for i in range(12)}
    assert all(g["groups"] == 49 for g in mx["groups"].values())
    # the default low branch at 4 bits: dynamic, 32 features per grid (DeiT's 192 / 768 allow it), log softmax
    assert (mx["low_quant"], mx["low_group"], mx["low_softmax"]) == ("dynamic", 32, "log")
    assert r["verification"]["qdq_vs_simulation"]["passed"]
    rec = Recipe.load(out / "recipe.json")
    assert rec.mixa is not None and rec.mixa.low_bits == 4 and rec.mixa.high_bits == 8
    import onnx

    m = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("TopK") == 1 and "GatherND" in ops


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "trt"])
def test_compile_mixa_dynamic_low_branch(tmp_path, target):
    """``--mixa-low-quant dynamic`` per token (``--mixa-low-group 0``, uniform softmax) with explicit ratios: the
    recipe's low branch is dynamic per token, the graph
    computes its scales (ReduceMax, blocked QuantizeLinear) and verifies against the simulation. ``--target trt``:
    the low-branch Linears are QuantLinearA4 plugin nodes in their per-row mode, the attention operands float."""
    calib = make_image_folder(tmp_path / "calib", n=4, size=(64, 48))
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps({"default": 0.5, "blocks.0": 0.0}))
    out = tmp_path / "out"
    assert main(["compile", MODEL, "--calib", str(calib), "--recipe", "w4a8", "--mixa", str(ratios),
                 "--mixa-low-quant", "dynamic", "--mixa-low-group", "0", "--mixa-low-softmax", "uniform",
                 "--target", target, "--out", str(out), "-q"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["mixa"]["low_quant"] == "dynamic" and r["mixa"]["ratios"]["blocks.0"] == 0.0
    assert r["verification"]["qdq_vs_simulation"]["passed"]
    rec = Recipe.load(out / "recipe.json")
    lows = [l["low"] for l in rec.mixa.to_dict()["layers"]]
    assert all(l["input"] == {"bits": 4, "dynamic": "token", "method": "dynamic"} for l in lows if "input" in l)
    import onnx

    m = onnx.load(str(out / "model.onnx"))
    dyn = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and
           any(p.key == "vitq.dynamic" for p in n.metadata_props)]
    if target == "ort":
        assert len(dyn) == 11 * 8  # blocks 1-11: 4 Linears + 4 attention operands each
    else:
        plug = [n for n in m.graph.node if n.op_type == "QuantLinearA4"
                and any(a.name == "act_dynamic" and a.i == 1 for a in n.attribute)]
        assert not dyn and len(plug) == 11 * 4  # blocks 1-11: 4 Linears each; attention operands as float
        chk = r["passes"]["trt_check"]
        assert chk["ok"] and [i["code"] for i in chk["warnings"]].count("DYNAMIC_ACT_FLOAT") == 11 * 4


def test_low_branch_defaults():
    """--mixa's low branch when not given: at 4 bits dynamic, groups of 32 on ort where every Linear allows it (per
    token on TensorRT targets and otherwise), log softmax; at 8 bits static; explicit options win."""
    from types import SimpleNamespace as NS

    import torch

    from vitq.mixa.compile import low_branch_defaults
    from vitq.mixa.config import MixaConfig
    from vitq.targets import get_target

    class W:
        def __init__(self, k):
            self.float_weight = torch.zeros(4, k)

    rec = NS(layer=lambda n: NS(kind="linear" if n.startswith("fc") else "attn"))
    sim = NS(wrappers={"fc1": W(192), "fc2": W(768), "attn": object()})

    def o(target="ort", mixa_low_quant=None, mixa_low_group=None, mixa_low_softmax=None):
        return MixaConfig("1.2x", low_quant=mixa_low_quant, low_group=mixa_low_group,
                          low_softmax=mixa_low_softmax).resolve(get_target(target))

    assert low_branch_defaults(o(), 4, rec, sim) == ("dynamic", 32, "log")
    assert low_branch_defaults(o(target="trt"), 4, rec, sim) == ("dynamic", 0, "log")
    assert low_branch_defaults(o(target="jetson", mixa_low_group=64), 4, rec, sim) == ("dynamic", 64, "log")
    assert low_branch_defaults(o(), 8, rec, sim) == ("static", 0, "uniform")
    assert low_branch_defaults(o(mixa_low_quant="static"), 4, rec, sim) == ("static", 0, "uniform")
    assert low_branch_defaults(o(mixa_low_group=0), 4, rec, sim) == ("dynamic", 0, "log")
    assert low_branch_defaults(o(mixa_low_softmax="uniform"), 8, rec, sim) == ("dynamic", 32, "uniform")
    assert low_branch_defaults(o(), 4, rec, NS(wrappers={"fc1": W(48), "fc2": W(192)})) == ("dynamic", 0, "log")
