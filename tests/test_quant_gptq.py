"""GPTQ weight rounding and the recipe's weights sidecar (tiny models built in code)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from vitq.errors import InputError  # noqa: E402
from vitq.quant import observers as ob  # noqa: E402
from vitq.quant.functional import qrange  # noqa: E402
from vitq.quant.gptq import Hessian, gptq_quantize  # noqa: E402
from vitq.quant.pipeline import apply_recipe, calibrate  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.recipe.schema import Recipe, RecipeError  # noqa: E402


def _correlated_inputs(t=2048, c=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(t, 8, generator=g)
    mix = torch.randn(8, c, generator=g)
    return base @ mix + 0.1 * torch.randn(t, c, generator=g) + torch.linspace(-1, 3, c)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_round_to_nearest_and_stays_on_grid(bits):
    torch.manual_seed(0)
    x = _correlated_inputs()
    w = torch.randn(32, 64) * 0.1
    s = ob.weight_mse(w, bits)
    lin = torch.nn.Linear(64, 32, bias=False)
    hs = Hessian(lin)
    hs.add(x[:1000])
    hs.add(x[1000:])
    res = gptq_quantize(w, hs.matrix(), s, bits)
    lo, hi = qrange(bits)
    q = res.q
    assert torch.equal(q, torch.round(q)) and q.min() >= lo and q.max() <= hi
    # symmetric, zero point 0: dequantized weight is exactly q * s, and re-quantizing it gives q back (float32)
    assert res.wq.dtype == torch.float32
    assert torch.equal(res.wq, q * s[:, None])
    assert torch.equal(torch.clamp(torch.round(res.wq / s[:, None]), lo, hi), q)
    rtn = ob.fake_quant_weight(w, s, bits)
    ref = x @ w.t()
    e_rtn = float((x @ rtn.t() - ref).pow(2).sum())
    e_gptq = float((x @ res.wq.t() - ref).pow(2).sum())
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert res.err_gptq < res.err_rtn


def test_gptq_conv_hessian_matches_unfold():
    conv = torch.nn.Conv2d(3, 4, 4, stride=4)
    x = torch.randn(2, 3, 8, 8)
    hs = Hessian(conv)
    hs.add(x)
    cols = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2).reshape(-1, 48).double()
    assert torch.allclose(hs.matrix(), 2 * cols.t() @ cols / cols.shape[0], atol=1e-5)
    res = gptq_quantize(conv.weight, hs.matrix(), ob.weight_mse(conv.weight, 4), 4)
    assert res.wq.shape == conv.weight.shape


@pytest.fixture(scope="module")
def tiny_w4():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=10).eval()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    res = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w4a8"), model_name="tiny", provenance={})
    return m, x, res


def test_gptq_weights_are_exact_grid_values(tiny_w4):
    _, _, res = tiny_w4
    assert res.recipe.weight_tensors, "GPTQ changed no layer"
    for name, w in res.recipe.weight_tensors.items():
        spec = res.recipe.layer(name)
        s = torch.tensor(spec.weight.scale).reshape([-1] + [1] * (w.ndim - 1))
        wt = torch.from_numpy(w)
        assert torch.equal(res.model.get_submodule(name).weight, wt)
        q = torch.round(wt / s)
        assert torch.equal(q * s, wt), name  # round((q*s)/s) == q and q*s reproduces the stored float
        lo, hi = qrange(spec.weight.bits)
        assert q.min() >= lo and q.max() <= hi


def test_sidecar_roundtrip_reproduces_simulation_bit_for_bit(tiny_w4, tmp_path):
    m, x, res = tiny_w4
    path = tmp_path / "recipe.json"
    res.recipe.save(path)
    side = tmp_path / "recipe.weights.safetensors"
    assert side.is_file()
    d = json.loads(path.read_text())
    assert d["weights"]["file"] == side.name and d["weights"]["method"] == "gptq"
    assert sorted(d["weights"]["layers"]) == sorted(res.recipe.weight_tensors)
    r2 = Recipe.load(path)
    prepared, sim = apply_recipe(m, "vit", r2)
    with torch.no_grad():
        assert torch.equal(sim(x), res.sim(x))
        assert torch.equal(prepared(x), res.model(x))
    # without the sidecar tensors the recipe does not reproduce the model: refuse
    r3 = Recipe.from_dict(d)
    with pytest.raises(RecipeError, match="load it with Recipe.load"):
        apply_recipe(m, "vit", r3)


def test_sidecar_missing_or_tampered_is_a_clear_error(tiny_w4, tmp_path):
    _, _, res = tiny_w4
    path = tmp_path / "r.json"
    res.recipe.save(path)
    side = tmp_path / "r.weights.safetensors"
    blob = side.read_bytes()
    side.unlink()
    with pytest.raises(RecipeError, match="sidecar .* is missing"):
        Recipe.load(path)
    side.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(RecipeError, match="sha256"):
        Recipe.load(path)
    d = json.loads(path.read_text())
    d["weights"]["file"] = "../elsewhere.safetensors"
    with pytest.raises(RecipeError, match="weights.file"):
        Recipe.from_dict(d)
    d["weights"]["file"] = "x.safetensors"
    d["weights"]["layers"] = ["not.a.layer"]
    with pytest.raises(RecipeError, match="weights.layers"):
        Recipe.from_dict(d)


def test_sidecar_off_grid_weights_rejected(tiny_w4, tmp_path):
    m, _, res = tiny_w4
    r = Recipe.from_dict(json.loads(res.recipe.to_json()))
    name = sorted(res.recipe.weight_tensors)[0]
    bad = {k: v.copy() for k, v in res.recipe.weight_tensors.items()}
    s = np.asarray(r.layer(name).weight.scale, dtype=np.float32).reshape([-1] + [1] * (bad[name].ndim - 1))
    bad[name] = bad[name] + 0.37 * s
    r.weight_tensors = bad
    with pytest.raises(RecipeError, match="not on its 4-bit weight grid"):
        apply_recipe(m, "vit", r)


def test_w8_layers_get_no_gptq_and_no_sidecar(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    res = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w8a8"), model_name="tiny", provenance={})
    assert not res.recipe.weight_tensors
    res.recipe.save(tmp_path / "r.json")
    assert "weights" not in json.loads((tmp_path / "r.json").read_text())
    assert not (tmp_path / "r.weights.safetensors").exists()


def test_refine_scales_recovers_a_bad_attention_scale(tiny_w4):
    """A post-softmax scale made 4x too coarse is pulled back (factor < 1) and the calibration-batch KL drops."""
    import copy

    from vitq.quant.mp import kl
    from vitq.quant.refine import refine_scales
    from vitq.quant.simulate import QuantSim
    from vitq.recipe.schema import QuantSpec

    m, x, res = tiny_w4
    rec = copy.deepcopy(res.recipe)
    for i, l in enumerate(rec.layers):
        if l.module == "blocks.0.attn":
            l = copy.copy(l)
            l.attn = QuantSpec(6, [4 / 31], method="search")  # probabilities <= 1: 1/31 already spans them
            rec.layers[i] = l
    sim = QuantSim(res.model, rec, "vit")
    with torch.no_grad():
        ref = m(x)
        before = kl(ref, sim(x))
    targets = [("blocks.0.attn", "attn"), ("blocks.0.attn", "q"), ("blocks.0.attn.qkv", "input")]
    rep = refine_scales(sim, rec, x, ref, targets, factors=(0.25, 0.5, 2.0))
    # q (8 bits here) is left alone; the corrupted post-softmax scale comes back down
    assert set(rep) == {"blocks.0.attn:attn"}  # q and the qkv input are 8-bit in this w4a8 recipe: untouched
    assert rep["blocks.0.attn:attn"]["factor"] < 1
    with torch.no_grad():
        after = kl(ref, sim(x))
    assert after < before and abs(after - list(rep.values())[-1]["kl_after"]) < 1e-9
    a0 = rec.layer("blocks.0.attn").attn
    assert a0.bits == 6 and a0.scale[0] > 0 and a0.method == "search"
    with torch.no_grad():  # the recipe object and the simulation agree after the refinement
        assert torch.equal(QuantSim(res.model, rec, "vit")(x), sim(x))


@pytest.mark.slow
def test_compile_w4a8_gptq_sidecar_and_recompile_from_file(tmp_path):
    """`vitq compile --recipe w4a8`: GPTQ weights go to recipe.weights.safetensors in the artifact and the Q/DQ
    graph verifies against the simulation; `--recipe <that recipe.json>` reproduces the same model; a tampered
    sidecar is refused with a clear message."""
    import onnx
    from conftest import make_image_folder
    from vitq.cli import main

    calib = make_image_folder(tmp_path / "calib", n=4, size=(64, 48))
    out = tmp_path / "q"
    assert main(["compile", "deit_tiny_patch16_224", "--calib", str(calib), "--recipe", "w4a8", "--out", str(out),
                 "-q"]) == 0
    side = out / "recipe.weights.safetensors"
    assert side.is_file()
    r = json.loads((out / "report.json").read_text())
    assert r["verification"]["qdq_vs_simulation"]["passed"]
    out2 = tmp_path / "q2"
    assert main(["compile", "deit_tiny_patch16_224", "--recipe", str(out / "recipe.json"), "--out", str(out2),
                 "-q"]) == 0
    assert json.loads((out2 / "report.json").read_text())["verification"]["qdq_vs_simulation"]["passed"]
    a, b = onnx.load(out / "model.onnx"), onnx.load(out2 / "model.onnx")
    ia = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    ib = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    side.write_bytes(side.read_bytes()[:-8])
    assert main(["compile", "deit_tiny_patch16_224", "--recipe", str(out / "recipe.json"), "--out",
                 str(tmp_path / "q3"), "-q"]) != 0


def test_refinement_is_kept_only_if_held_out_calibration_kl_drops():
    """The KL-driven scale refinement fits ``refine_images`` calibration images; it is kept only when the next
    ``refine_holdout`` calibration images agree (else the searched scales come back), and the report says which."""
    from vitq.quant.mp import kl

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=10).eval()
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    meth = {"gptq": False, "refine_images": 4, "refine_holdout": 8}
    res = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w6a6"), model_name="tiny", provenance={}, methods=meth)
    info = res.layer_stats["__refine__"]
    assert info["holdout_images"] == 8
    assert info["kept"] == (info["holdout_kl_after"] < info["holdout_kl_before"])
    ref = res.layer_stats
    per = [v["refine"]["attn"] for k, v in ref.items() if isinstance(v, dict) and "refine" in v]
    assert per and all(p["kept"] == info["kept"] for p in per)
    with torch.no_grad():  # the returned simulation is the returned recipe's
        hold = kl(m(x[4:]), res.sim(x[4:]))
    assert abs(hold - min(info["holdout_kl_before"], info["holdout_kl_after"])) < 1e-6
    none = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w6a6"), model_name="tiny", provenance={},
                     methods={**meth, "refine": ()})
    attn = lambda r: [l.attn.scale[0] for l in r.layers if l.kind == "attn"]  # noqa: E731
    if not info["kept"]:
        assert attn(res.recipe) == attn(none.recipe)


def test_gptq_with_group_scales_beats_round_to_nearest_and_stays_on_each_groups_grid():
    from vitq.quant.functional import weight_scale_map

    torch.manual_seed(0)
    x = _correlated_inputs()
    w = torch.randn(32, 64) * 0.1
    s = ob.weight_mse(w, 4, group=16)
    assert s.shape == (32 * 4,)
    smap = weight_scale_map(s, w)
    assert torch.equal(smap[:, :16], s.reshape(32, 4)[:, :1].expand(32, 16))  # channel 0's groups first
    hs = Hessian(torch.nn.Linear(64, 32, bias=False))
    hs.add(x)
    res = gptq_quantize(w, hs.matrix(), s, 4)
    lo, hi = qrange(4)
    assert torch.equal(res.wq, res.q * smap) and res.q.min() >= lo and res.q.max() <= hi
    assert torch.equal(ob.fake_quant_weight(res.wq, s, 4), res.wq)  # the simulation re-quantizes it to itself
    rtn = ob.fake_quant_weight(w, s, 4)
    assert float((rtn - w).norm()) < float((ob.fake_quant_weight(w, ob.weight_mse(w, 4), 4) - w).norm())
    ref = x @ w.t()
    assert float((x @ res.wq.t() - ref).pow(2).sum()) < 0.8 * float((x @ rtn.t() - ref).pow(2).sum())
    with pytest.raises(ValueError, match="fit neither 32 output channels nor groups"):
        weight_scale_map(torch.ones(96), w.reshape(32, 64)[:, :40])


def test_group_wise_weights_calibrate_and_replay_from_the_recipe_file(tmp_path):
    """``weight_group``: 4-bit Linear weights get one scale per group of inputs (the patch-embedding conv and the
    8-bit head keep one per channel); the recipe file with its GPTQ sidecar reproduces the simulation bit for bit."""
    from vitq.quant.pipeline import QuantMethods

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    res = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w4a8"), model_name="tiny", provenance={},
                    methods=QuantMethods(weight_group=32))
    groups = {l.module: l.weight.group for l in res.recipe.layers if l.weight is not None}
    assert groups["patch_embed.proj"] == 0 and groups["head"] == 0
    assert groups["blocks.0.attn.qkv"] == 32 and groups["blocks.0.mlp.fc2"] == 32
    qkv = res.recipe.layer("blocks.0.attn.qkv").weight
    assert len(qkv.scale) == 576 * 192 // 32
    path = tmp_path / "recipe.json"
    res.recipe.save(path)
    saved = {l["module"]: l for l in json.loads(path.read_text())["layers"]}
    assert saved["blocks.0.attn.qkv"]["weight"]["group"] == 32 and "group" not in saved["head"]["weight"]
    _, sim = apply_recipe(m, "vit", Recipe.load(path))
    with torch.no_grad():
        assert torch.equal(sim(x), res.sim(x))


def test_group_field_is_validated():
    base = {"schema": "vitq.recipe/1", "name": "t", "model": "m"}
    for q, msg in (({"bits": 8, "scale": [0.1], "group": 32}, "only weight quantizers"),
                   ({"bits": 4, "scale": [0.1, 0.2], "axis": 0, "group": 1}, "group size >= 2")):
        with pytest.raises(RecipeError, match=msg):
            Recipe.from_dict({**base, "layers": [{"module": "fc", "kind": "linear", "input": q}]})


def test_hessian_weighted_scales_apply_to_sub_8_bit_linear_weights_only():
    """``weight_search="hessian"`` (the default) re-weighs the scale search of 4-bit Linear weights by their inputs'
    mean squares; the 8-bit head and the patch-embedding conv keep the plain search."""
    from vitq.quant.pipeline import QuantMethods

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32).numpy()
    assert QuantMethods().weight_search == "hessian"
    scales = {}
    for how in ("hessian", "mse"):
        res = calibrate(m, "vit", x, parse_recipe_arg("w4a8"), model_name="tiny", provenance={},
                        methods=QuantMethods(weight_search=how, gptq=False, weight_group=32))
        scales[how] = {l.module: l.weight.scale for l in res.recipe.layers if l.weight is not None}
    h, p = scales["hessian"], scales["mse"]
    assert h["head"] == p["head"] and h["patch_embed.proj"] == p["patch_embed.proj"]
    assert h["blocks.0.attn.qkv"] != p["blocks.0.attn.qkv"] and h["blocks.0.mlp.fc1"] != p["blocks.0.mlp.fc1"]
    with pytest.raises(InputError, match="weight_search='l1'"):
        QuantMethods(weight_search="l1")
