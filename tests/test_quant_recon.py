"""Block-wise reconstruction (learned activation scales + AdaRound weights): tiny models built in code."""

from __future__ import annotations

import copy
import json

import pytest
import torch

timm = pytest.importorskip("timm")

from vitq.quant.functional import fake_quant, qrange  # noqa: E402
from vitq.quant.pipeline import apply_recipe, calibrate  # noqa: E402
from vitq.quant.reconstruct import LearnedQuant, RoundingWeight, reconstruct  # noqa: E402
from vitq.quant.simulate import QuantSim  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.recipe.schema import QuantSpec, Recipe  # noqa: E402


@pytest.mark.parametrize("bits,shift", [(4, 0), (4, 8), (6, -31), (8, 0)])
def test_learned_quant_starts_as_the_recipe_quantizer(bits, shift):
    x = torch.randn(4096) * 3
    spec = QuantSpec(bits, [0.37], method="search", shift=shift)
    q = LearnedQuant(spec)
    y = q(x)
    ref = fake_quant(x, torch.tensor([0.37]), bits, shift)
    # same grid; the training form computes (q + shift) * s instead of q * s + float32(s * shift)
    assert torch.allclose(y, ref, atol=1e-5)
    assert q.result().scale == pytest.approx([0.37], rel=1e-6) and q.result().shift == shift
    # the scale gets a gradient (LSQ) through the straight-through rounding
    y.pow(2).sum().backward()
    assert q.log_s.grad is not None and float(q.log_s.grad.abs()) > 0


def test_rounding_weight_starts_at_nearest_and_stays_on_the_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 32) * 0.1
    s = (w.abs().amax(1) / 7).tolist()
    a = RoundingWeight(w, s, 4)
    st = torch.tensor(s).reshape(-1, 1)
    lo, hi = qrange(4)
    nearest = torch.clamp(torch.round(w / st), lo, hi) * st
    assert torch.equal(a(), nearest) and torch.equal(a.hard(), nearest)  # V = 0: round to nearest
    # a signed step moves V within [-0.5, 0.5]; the forward stays a grid value, equal to hard()
    a(). mul(torch.randn_like(w)).sum().backward()
    for _ in range(40):
        a.sign_step(0.05)
    assert float(a.V.detach().abs().max()) <= 0.5 and float(a.V.detach().abs().max()) > 0.4
    q = torch.round(a.hard() / st)
    assert torch.equal(q * st, a.hard()) and q.min() >= lo and q.max() <= hi
    assert torch.equal(a(), a.hard())
    assert (a.hard() != nearest).any() and ((a.hard() - w).abs() <= st + 1e-6).all()  # one step at most


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          num_classes=10).eval()
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w4a4"), model_name="tiny", provenance={},
                    methods={"gptq": False, "refine": ()})
    return m, x, res


def _out_err(sim, float_model, x):
    with torch.no_grad():
        return float((sim(x) - float_model(x)).pow(2).mean())


def test_reconstruction_recovers_a_corrupted_quantizer_and_stays_deployable(tiny):
    """A post-softmax scale made 4x too coarse and an fc1 input scale 3x too fine are pulled back by the block
    reconstruction (the stage output error drops), bits/shifts stay, weights stay on their grids."""
    m, x, res = tiny
    rec = copy.deepcopy(res.recipe)
    for i, l in enumerate(rec.layers):
        if l.module == "blocks.0.attn":
            l = copy.copy(l)
            l.attn = QuantSpec(l.attn.bits, [l.attn.scale[0] * 4], method="search", shift=l.attn.shift)
        elif l.module == "blocks.1.mlp.fc1":
            l = copy.copy(l)
            l.input = QuantSpec(l.input.bits, [l.input.scale[0] / 3], method="search", shift=l.input.shift)
        rec.layers[i] = l
    sim = QuantSim(res.model, rec, "vit")
    err0 = _out_err(sim, res.model, x)
    before = copy.deepcopy(rec)
    rr = reconstruct(sim, res.model, rec, x, {"iters": 80, "batch": 8, "acts": True, "lr_s": 1e-2})
    assert _out_err(sim, res.model, x) < 0.7 * err0
    st = {s["stage"]: s for s in rr["stages"]}
    assert st["blocks.0."]["loss_after"] < st["blocks.0."]["loss_before"]
    a0 = rec.layer("blocks.0.attn").attn
    assert a0.scale[0] < 0.8 * before.layer("blocks.0.attn").attn.scale[0] and a0.method == "recon"
    assert rec.layer("blocks.1.mlp.fc1").input.scale[0] > before.layer("blocks.1.mlp.fc1").input.scale[0]
    for l0, l1 in zip(before.layers, rec.layers):
        assert l0.module == l1.module and l0.weight_bits == l1.weight_bits and l0.act_bits == l1.act_bits
        for r in ("input", "q", "k", "attn", "v"):
            if getattr(l0, r) is not None:
                assert getattr(l1, r).shift == getattr(l0, r).shift
    assert rr["weights"], "weight rounding produced no weights"
    for name, w in rr["weights"].items():
        spec = rec.layer(name)
        s = torch.tensor(spec.weight.scale).reshape([-1] + [1] * (w.ndim - 1))
        q = torch.round(w / s)
        lo, hi = qrange(spec.weight.bits)
        assert torch.equal(q * s, w) and q.min() >= lo and q.max() <= hi
        assert torch.equal(sim.wrappers[name].weight, w)  # the simulation re-quantizes it to itself
    # nothing trainable is left behind in the simulation
    assert all(getattr(w, "weight_fn", None) is None for w in sim.wrappers.values())


def test_reconstruction_options_are_checked(tiny):
    m, x, res = tiny
    sim = QuantSim(res.model, copy.deepcopy(res.recipe), "vit")
    with pytest.raises(ValueError, match="unknown"):
        reconstruct(sim, res.model, sim.recipe, x, {"itres": 3})


@pytest.mark.parametrize("wscale", [False, True])
def test_pipeline_recon_writes_rounding_sidecar_that_reproduces_the_simulation(tmp_path, wscale):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                          num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    base = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w4a4"), model_name="tiny", provenance={},
                     methods={"gptq": False}) if wscale else None
    res = calibrate(m, "vit", x.numpy(), parse_recipe_arg("w4a4"), model_name="tiny", provenance={},
                    methods={"recon": {"iters": 10, "batch": 4, "wscale": wscale}})
    if wscale:  # the kept stages' learned per-channel weight scales are the recipe's
        kept_mods = [l for l in res.recipe.layers if l.weight is not None and l.weight.bits < 8 and
                     any(l.module.startswith(st["stage"]) for st in res.layer_stats["__recon__"]["stages"]
                         if st["kept"])]
        assert kept_mods and any(l.weight.scale != base.recipe.layer(l.module).weight.scale for l in kept_mods)
    assert "gptq_s" not in res.timings and res.timings["recon_s"] > 0  # the learned rounding replaces GPTQ
    assert res.recipe.defaults["weight_rounding"] == "signround"
    assert res.recipe.defaults["recon"]["iters"] == 10
    stages = res.layer_stats["__recon__"]["stages"]
    assert [st["stage"] for st in stages] == ["patch_embed", "blocks.0."]  # the tail (8/8 head) is not fitted
    assert all(st["kept"] == (st["loss_after"] < st["loss_before"]) for st in stages)
    assert any(st["kept"] for st in stages)
    path = tmp_path / "r.json"
    res.recipe.save(path)
    d = json.loads(path.read_text())
    assert d["weights"]["method"] == "signround"
    kept = [st["stage"] for st in stages if st["kept"]]
    assert d["weights"]["layers"] and all(any(m.startswith(k) for k in kept) for m in d["weights"]["layers"])
    prepared, sim = apply_recipe(m, "vit", Recipe.load(path))
    with torch.no_grad():
        assert torch.equal(sim(x), res.sim(x))
        assert torch.equal(prepared(x), res.model(x))
