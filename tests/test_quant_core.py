"""vitq.quant on tiny random timm models: preparation, observers, SQ-b, OPT-m, simulation, bit-ops, Greedy MP."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from vitq.quant import observers as ob  # noqa: E402
from vitq.quant.bitops import bitops_report, layer_bitops  # noqa: E402
from vitq.quant.functional import fake_quant  # noqa: E402
from vitq.quant.optm import search_regions  # noqa: E402
from vitq.quant.pipeline import apply_recipe, calibrate  # noqa: E402
from vitq.quant.prepare import AttnHook, enumerate_points, is_attention, prepare_model, set_submodule  # noqa
from vitq.quant.simulate import QuantSim  # noqa: E402
from vitq.quant.sqb import fold_smoothing, group_foldable, shared_params, smooth_params  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.recipe.schema import LayerSpec, QuantSpec, Recipe, RecipeError  # noqa: E402


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10).eval()


def tiny_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def x32():
    torch.manual_seed(1)
    return torch.randn(8, 3, 32, 32)


@pytest.fixture(scope="module")
def vit_w8a8(vit, x32):
    return calibrate(vit, "vit", x32.numpy(), parse_recipe_arg("w8a8"), model_name="tiny", provenance={"t": 1})


# ---- prepare ----

@pytest.mark.parametrize("maker,size", [(tiny_vit, 32), (tiny_swin, 56)])
def test_prepare_matches_timm_and_reimplementation(maker, size):
    m = maker()
    x = torch.randn(2, 3, size, size)
    p = prepare_model(m)
    assert p is not m
    attn = [n for n, mod in p.named_modules() if is_attention(mod)]
    assert attn and all(not p.get_submodule(n).fused_attn for n in attn)
    with torch.no_grad():
        ref = m(x)
        assert (p(x) - ref).abs().max() <= 1e-5
        for n in attn:  # vitq's re-implementation in place of timm's forward
            set_submodule(p, n, AttnHook(p.get_submodule(n)))
        assert (p(x) - ref).abs().max() <= 1e-5


def test_enumerate_points_vit(vit):
    g = enumerate_points(prepare_model(vit))
    kinds = {p.module: p.kind for p in g.points}
    assert kinds["patch_embed.proj"] == "conv" and kinds["blocks.0.attn"] == "attn"
    assert kinds["blocks.1.mlp.fc2"] == "linear" and kinds["head"] == "linear"
    n_tok = 17  # 4x4 patches + cls
    assert g.get("blocks.0.attn.qkv").macs == n_tok * 192 * 576
    assert g.get("blocks.0.attn").macs == 2 * 3 * n_tok * n_tok * 64
    assert g.get("patch_embed.proj").macs == 16 * 192 * 3 * 8 * 8
    assert g.get("blocks.0.mlp.fc2").post_gelu and not g.get("blocks.0.mlp.fc1").post_gelu
    assert g.get("head").is_head
    assert g.norm_groups["blocks.0.norm2"] == ["blocks.0.mlp.fc1"]


def test_enumerate_points_swin_has_reduction():
    g = enumerate_points(prepare_model(tiny_swin()))
    names = [p.module for p in g.points]
    assert "layers.1.downsample.reduction" in names and "head.fc" in names
    assert g.norm_groups["layers.1.downsample.norm"] == ["layers.1.downsample.reduction"]


# ---- observers ----

def test_observers_known_tensors():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.27])
    assert float(ob.act_minmax(x, 8)) == pytest.approx(2.0 / 127)
    assert float(ob.act_minmax(x, 4)) == pytest.approx(2.0 / 7)
    big = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([100.0])])
    # percentile ignores the single outlier, min/max does not
    assert float(ob.act_percentile(big, 8, 99.9)) == pytest.approx(1.0 / 127, rel=0.01)
    assert float(ob.act_minmax(big, 8)) == pytest.approx(100.0 / 127)
    # MSE clipping beats min/max on the outlier tensor and never loses to it
    s_mse = ob.act_mse(big, 4)
    err = lambda s: float((fake_quant(big, s, 4) - big).pow(2).sum())  # noqa: E731
    assert err(s_mse) <= err(ob.act_minmax(big, 4))
    w = torch.tensor([[1.0, -3.0, 0.5], [0.1, 0.2, -0.05]])
    assert torch.allclose(ob.weight_minmax(w, 8), torch.tensor([3.0 / 127, 0.2 / 127]))
    ws = ob.weight_mse(w, 4)
    assert ws.shape == (2,) and (ws <= ob.weight_minmax(w, 4) + 1e-9).all()
    assert ob.sqnr_db(torch.ones(4), torch.ones(4) * 1.1) == pytest.approx(20.0, abs=1e-4)


def test_weight_mse_column_weights_move_the_clip_toward_the_heavy_feature():
    """With one input feature carrying all the signal (Hessian diagonal), the group's scale is the one that
    represents that feature's weight best, not the one with the least summed error over all weights."""
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    w[:, 0] = 2.9 * w.abs().amax(1)  # an outlier column, clipped by plain MSE
    plain = ob.weight_mse(w, 4, group=16)
    h = torch.full((32,), 1e-3)
    h[0] = 1.0
    heavy = ob.weight_mse(w, 4, group=16, col_weight=h)
    assert plain.shape == heavy.shape == (16,)
    col0 = lambda s: float((ob.fake_quant_weight(w, s, 4) - w)[:, 0].pow(2).sum())  # noqa: E731
    assert col0(heavy) < 0.5 * col0(plain)
    assert torch.equal(ob.weight_mse(w, 4, group=16, col_weight=torch.ones(32)), plain)  # uniform = plain


def test_fake_quant_matches_manual_and_onnx_rounding():
    x = torch.tensor([0.5, 1.5, 2.5, -2.5, 300.0, -300.0])
    assert fake_quant(x, 1.0, 8).tolist() == [0.0, 2.0, 2.0, -2.0, 127.0, -128.0]  # half to even, saturate
    assert fake_quant(x, 1.0, 4).tolist() == [0.0, 2.0, 2.0, -2.0, 7.0, -8.0]


# ---- SQ-b ----

def test_sqb_folding_keeps_float_model(vit, x32, vit_w8a8):
    with torch.no_grad():
        assert (vit_w8a8.model(x32) - vit(x32)).abs().max() <= 1e-4
    smoothed = [l for l in vit_w8a8.recipe.layers if l.smooth is not None and l.smooth.into == "norm"]
    assert smoothed, "SQ-b should smooth at least one LN-fed layer of the tiny ViT"
    assert all(l.module.endswith(("qkv", "fc1")) for l in smoothed)
    assert all(l.module.endswith("attn.proj") for l in vit_w8a8.recipe.layers
               if l.smooth is not None and l.smooth.into == "v")
    # the caller's model is untouched
    assert vit.blocks[0].attn.fused_attn == timm.layers.use_fused_attn()
    assert not torch.equal(vit_w8a8.model.blocks[0].norm1.weight, vit.blocks[0].norm1.weight) or \
        vit_w8a8.recipe.layer("blocks.0.attn.qkv").smooth is None


def test_v_smoothing_fold_is_float_exact_and_replayed_by_apply_recipe(vit, x32, vit_w8a8):
    """SmoothQuant between v and proj: folding any positive per-channel s into qkv's v rows and proj's columns keeps
    the float model; a recipe carrying it (smooth.into = "v") is replayed by apply_recipe onto a fresh model."""
    import copy

    from vitq.quant.sqb import fold_v_smoothing
    from vitq.recipe.schema import SmoothSpec

    m = copy.deepcopy(vit_w8a8.model)
    att = m.blocks[1].attn
    s = torch.rand(att.proj.in_features, generator=torch.Generator().manual_seed(0)) * 4 + 0.25
    with torch.no_grad():
        before = m(x32)
        fold_v_smoothing(att, s)
        assert (m(x32) - before).abs().max() <= 1e-4
    assert not torch.equal(att.proj.weight, vit_w8a8.model.blocks[1].attn.proj.weight)
    r = copy.deepcopy(vit_w8a8.recipe)
    i = next(k for k, l in enumerate(r.layers) if l.module == "blocks.1.attn.proj")
    r.layers[i].smooth = SmoothSpec(0.5, s.tolist(), [0.0] * s.numel(), into="v")
    r2 = Recipe.from_dict(json.loads(r.to_json()))
    assert r2.layer("blocks.1.attn.proj").smooth.into == "v"
    prepared, _ = apply_recipe(vit, "vit", r2)
    r0 = copy.deepcopy(r)
    r0.layers[i].smooth = None
    base, _ = apply_recipe(vit, "vit", r0)
    torch.testing.assert_close(prepared.blocks[1].attn.proj.weight, base.blocks[1].attn.proj.weight * s[None, :])
    c = att.proj.in_features
    torch.testing.assert_close(prepared.blocks[1].attn.qkv.weight[2 * c:], base.blocks[1].attn.qkv.weight[2 * c:]
                               / s[:, None])
    with pytest.raises(RecipeError, match="into"):
        SmoothSpec.from_dict({"alpha": 0.5, "scale": [1.0], "shift": [0.0], "into": "k"}, "x")
    with pytest.raises(RecipeError, match="shift"):
        SmoothSpec.from_dict({"alpha": 0.5, "scale": [1.0], "shift": [0.1], "into": "v"}, "x")


class TwoHead(nn.Module):
    """One LayerNorm feeding two Linears (parallel branches)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 4, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.a(h), self.b(h)], -1)


def test_sqb_ln_feeding_two_linears_and_tied_params():
    torch.manual_seed(0)
    m = TwoHead()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 2)
        m.norm.bias.uniform_(-1, 1)
    x = torch.randn(64, 16) * 3 + 1
    ref = m(x).detach()
    h = m.norm(x).detach()
    s, z = smooth_params(h.amin(0), h.amax(0), [m.a.weight.detach(), m.b.weight.detach()], 0.5)
    assert group_foldable(m, "norm", ["a", "b"], shared_params(m)) is None
    fold_smoothing(m.norm, [m.a, m.b], s, z)
    assert (m(x) - ref).abs().max() <= 1e-4
    hs = m.norm(x).detach()
    assert torch.allclose(hs, (h - z) / s, atol=1e-4)
    # tied weights: the group is skipped
    m2 = TwoHead()
    m2.extra = nn.Linear(16, 8)
    m2.extra.weight = m2.a.weight
    assert group_foldable(m2, "norm", ["a", "b"], shared_params(m2)) == "shared (tied) parameters"


# ---- OPT-m ----

def test_optm_split_helps_on_gelu_inputs():
    torch.manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(1024, 64))
    w = torch.randn(32, 64) / 8
    rc = search_regions(x, w, 8, 4, float(x.abs().max()), float(x.min()))
    assert rc.err < 0.9 * rc.err_plain and rc.use
    assert rc.m == pytest.approx(float(rc.pos_scale) / float(rc.neg_scale))
    assert rc.m > 1  # the negative lobe is much narrower


# ---- simulation ----

def test_quantsim_linear_equals_manual():
    torch.manual_seed(0)
    lin = nn.Linear(8, 3)
    spec = LayerSpec("lin", "linear", 24, weight=QuantSpec(4, [0.1, 0.05, 0.2], axis=0, method="mse"),
                     input=QuantSpec(8, [0.02], method="mse"))
    model = nn.Sequential()
    model.add_module("lin", lin)
    from vitq.quant.simulate import QLinear

    q = QLinear(lin, spec)
    x = torch.randn(5, 8)
    w = lin.weight.detach()
    sc = torch.tensor([0.1, 0.05, 0.2])[:, None]
    wq = torch.clamp(torch.round(w / sc), -8, 7) * sc
    xq = torch.clamp(torch.round(x / 0.02), -128, 127) * 0.02
    assert torch.allclose(q(x), xq @ wq.t() + lin.bias, atol=1e-6)


def test_w8a8_close_and_recipe_roundtrip(vit, x32, vit_w8a8, tmp_path):
    with torch.no_grad():
        ref, out = vit(x32), vit_w8a8.sim(x32)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    r = vit_w8a8.recipe
    kinds = {l.kind for l in r.layers}
    assert kinds == {"linear", "conv", "attn"}
    head = r.layer("head")
    assert head.weight.bits == 8 and head.input.bits == 8
    path = tmp_path / "r.json"
    r.save(path)
    r2 = Recipe.load(path)
    assert r2.to_dict() == json.loads(r.to_json())
    prepared, sim = apply_recipe(vit, "vit", r2)
    with torch.no_grad():
        assert (sim(x32) - out).abs().max() <= 1e-5
        assert (prepared(x32) - vit_w8a8.model(x32)).abs().max() <= 1e-5
    stats = vit_w8a8.layer_stats["blocks.0.attn.qkv"]
    assert stats["sqnr"] > 20  # dB at 8 bits
    # OPT-m is not searched at 8-bit activations (optm_max_bits = 7): fc2 stays one GEMM
    assert all(l.input_regions is None for l in r.layers)
    assert "optm" not in vit_w8a8.layer_stats["blocks.0.mlp.fc2"]


def test_optm_searched_below_optm_max_bits(vit, x32):
    res = calibrate(vit, "vit", x32.numpy(), parse_recipe_arg("w8a8"), model_name="tiny", provenance={},
                    methods={"optm_max_bits": 8, "gptq": False})
    assert "a8" in res.layer_stats["blocks.0.mlp.fc2"]["optm"]  # the decision is searched (and reported)


def test_recipe_validation_errors():
    base = {"schema": "vitq.recipe/1", "name": "x", "model": "m", "layers": []}
    Recipe.from_dict(base)
    bad = [
        ({**base, "schema": "v0"}, "schema"),
        ({**base, "layers": [{"module": "a", "kind": "linear", "weight": {"bits": 9, "scale": [1]}}]}, "bits"),
        ({**base, "layers": [{"module": "a", "kind": "linear", "input": {"bits": 8, "scale": [1, 2], "axis": 0}}]},
         "per tensor"),
        ({**base, "layers": [{"module": "a", "kind": "attn", "weight": {"bits": 8, "scale": [1]}}]}, "attn"),
        ({**base, "layers": [{"module": "a", "kind": "linear", "input": {"bits": 8, "scale": [-1]}}]}, "scale"),
        ({**base, "layers": [{"module": "a", "kind": "linear"}, {"module": "a", "kind": "linear"}]}, "already"),
        ({**base, "layers": [{"module": "a", "kind": "linear", "input": {"bits": 8, "scale": [1]},
                              "input_regions": {"m": 2, "pos": {"bits": 8, "scale": [1]},
                                                "neg": {"bits": 8, "scale": [0.5]}}}]}, "mutually exclusive"),
    ]
    for d, msg in bad:
        with pytest.raises(RecipeError, match=msg):
            Recipe.from_dict(d)


def test_apply_recipe_rejects_unknown_module(vit):
    r = Recipe("x", "m", [LayerSpec("blocks.9.attn.qkv", "linear", 1)])
    with pytest.raises(RecipeError, match="does not exist"):
        apply_recipe(vit, "vit", r)


# ---- bit-ops and Greedy MP ----

def test_bitops_accounting():
    lin = LayerSpec("l", "linear", 100, weight=QuantSpec(4, [1.0]), input=QuantSpec(8, [1.0]))
    att = LayerSpec("a", "attn", 200, q=QuantSpec(8, [1.0]), k=QuantSpec(8, [1.0]), attn=QuantSpec(4, [1.0]),
                    v=QuantSpec(6, [1.0]))
    assert layer_bitops(lin) == 100 * 4 * 8
    assert layer_bitops(att) == 100 * 64 + 100 * 24
    rep = bitops_report(Recipe("x", "m", [lin, att]))
    assert rep["total"] == 3200 + 8800 and rep["fp32_equivalent"] == 300 * 1024
    assert rep["avg_bits"] == pytest.approx(math.sqrt(12000 / 300))
    assert rep["ratio_vs_base"] == pytest.approx(12000 / (300 * 64))


def test_greedy_mp_respects_budget(vit, x32):
    res = calibrate(vit, "vit", x32.numpy(), parse_recipe_arg("mp:5"), model_name="tiny", provenance={},
                    methods={"sqb": False})
    rep = bitops_report(res.recipe)
    assert rep["avg_bits"] <= 5.0 + 1e-6
    assert rep["avg_bits"] > 4.0  # it stops once the budget is met, not at all-4
    bits = {(l.weight_bits, l.act_bits) for l in res.recipe.layers if l.module != "head"}
    assert len(bits) > 1  # mixed
    assert res.recipe.layer("head").weight.bits == 8
    Recipe.from_dict(json.loads(res.recipe.to_json()))  # valid against the schema
    with torch.no_grad():
        assert torch.isfinite(res.sim(x32)).all()


def test_embed_bits_pins_the_patch_embedding(vit, x32):
    """``embed_bits``: the patch embedding keeps its bits in every preset and is left out of Greedy MP (like the
    head), and the budget still holds."""
    res = calibrate(vit, "vit", x32.numpy(), parse_recipe_arg("mp:5"), model_name="tiny", provenance={},
                    methods={"sqb": False, "embed_bits": (8, 8), "gptq": False, "refine": ()})
    pe = res.recipe.layer("patch_embed.proj")
    assert (pe.weight.bits, pe.input.bits) == (8, 8)
    sens = res.layer_stats["__mp_sensitivity__"]
    assert any(k.startswith("blocks.0.attn.qkv:") for k in sens)
    assert not any(k.startswith("patch_embed.proj:") for k in sens)
    assert bitops_report(res.recipe)["avg_bits"] <= 5.0 + 1e-6
    res4 = calibrate(vit, "vit", x32.numpy(), parse_recipe_arg("w4a4"), model_name="tiny", provenance={},
                     methods={"sqb": False, "embed_bits": (8, 8), "gptq": False, "refine": ()})
    assert (res4.recipe.layer("patch_embed.proj").weight.bits, res4.recipe.layer("blocks.0.attn.qkv").weight.bits) \
        == (8, 4)


def test_sim_astype_float64_is_the_same_function(vit, x32, vit_w8a8):
    """The float64 evaluation of a recipe (the exact reference of a recipe's function) differs from the float32 one
    only by rounding: same logits to float32-rounding level (a few grid flips at most), float64 output."""
    import copy

    sim64 = copy.deepcopy(vit_w8a8.sim).astype(torch.float64)
    with torch.no_grad():
        a, b = vit_w8a8.sim(x32), sim64(x32)
    assert b.dtype == torch.float64 and a.dtype == torch.float32
    rel = float((a.double() - b).norm() / b.norm())
    assert 0 < rel < 5e-2, rel
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9


def test_float_sensitivity_and_the_graph_rule(vit_w8a8, x32):
    from vitq.quant.simulate import float_sensitivity, matches_simulation

    sim = vit_w8a8.sim
    sens = float_sensitivity(sim, x32, perturbations=2)
    assert sens.shape == (len(x32),) and (sens >= 0).all()
    # most images sit far from every rounding boundary: float rounding moves them by float precision only
    assert (sens < 1e-5).mean() >= 0.5, sens
    assert sim.dtype == torch.float32  # not in place
    with torch.no_grad():
        ref = sim(x32).numpy()
    ok, per_image = matches_simulation(ref, ref, sens)
    assert ok and (per_image == 0).all()
    # one image moved beyond 3x the batch's largest sensitivity (and the float-kernel floor) fails the rule
    bad = ref.copy()
    bad[3] += 4 * max(1e-5, 3 * sens.max()) * np.abs(ref[3]).max()
    ok, per_image = matches_simulation(bad, ref, sens)
    assert not ok and per_image.argmax() == 3
