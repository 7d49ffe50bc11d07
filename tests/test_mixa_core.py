"""MixA-Q core (vitq/mixa): importance math (incl. the roll of shifted Swin windows), nested index sets, the
recipe's mixa section (round trip, malformed sections), the simulation (r = 0 equals the base), bit-operations,
the ratio search. Tiny random timm models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

timm = pytest.importorskip("timm")

from vitq.mixa.bitops import mixa_bitops  # noqa: E402
from vitq.mixa.calib import attach, build_mixa_spec  # noqa: E402
from vitq.mixa.routing import (block_geometry, group_levels, group_scores, rank_groups, token_importance,  # noqa
                               token_levels)
from vitq.mixa.search import search_ratios  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.recipe.mixa import group_table, n_low_groups  # noqa: E402
from vitq.quant.bitops import bitops_report  # noqa: E402
from vitq.quant.pipeline import calibrate  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402
from vitq.recipe.schema import Recipe, RecipeError  # noqa: E402


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=2,
                             embed_dim=48, num_heads=2, num_classes=10).eval()


def tiny_swin():
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=24,
                             depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()


@pytest.fixture(scope="module")
def vit_w4a8():
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = calibrate(tiny_vit(), "vit", x.numpy(), parse_recipe_arg("w4a8"), model_name="vit_tiny_patch16_224",
                    provenance={}, progress=False, methods={"gptq": False})
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, group=(2, 2), low_bits=4,
                           routed=("linear", "attn"), ratios=0.5)
    return res, spec, x


# ---- importance, ranking, nesting --------------------------------------------------------------------------

def test_importance_vit_groups_by_hand():
    x = torch.randn(2, 1 + 16, 5)
    table = torch.from_numpy(group_table("tokens", (4, 4), (2, 2), (0, 0), 1))
    assert table.shape == (4, 4)
    assert table[0].tolist() == [1, 2, 5, 6] and table[3].tolist() == [11, 12, 15, 16]
    a = token_importance(x)
    assert torch.allclose(a, x.abs().mean(-1))
    sc = group_scores(a, table)
    for b in range(2):
        for g in range(4):
            ref = torch.linalg.vector_norm(a[b, table[g]])
            assert torch.allclose(sc[b, g], ref)


def test_importance_swin_shift_rolls_like_features():
    """Window scores through the shifted table equal: roll the importance map by -shift exactly as timm rolls the
    features, window_partition it, L2 per window."""
    from timm.models.swin_transformer import window_partition

    H = W = 14
    x = torch.randn(2, H, W, 6)
    a = token_importance(x)  # [B, H*W]
    for shift in ((0, 0), (3, 3)):
        table = torch.from_numpy(group_table("windows", (H, W), (7, 7), shift))
        sc = group_scores(a, table)
        rolled = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2)).abs().mean(-1, keepdim=True)
        win = window_partition(rolled, (7, 7)).reshape(2, 4, 49)
        assert torch.allclose(sc, win.pow(2).sum(-1).sqrt(), atol=1e-6)
        # and the table maps each window position to the token timm puts there
        feats = torch.arange(H * W, dtype=torch.float32).reshape(1, H, W, 1)
        wp = window_partition(torch.roll(feats, shifts=(-shift[0], -shift[1]), dims=(1, 2)), (7, 7))
        assert torch.equal(wp.reshape(4, 49).long(), table)


def test_rank_ties_lower_index_first_and_nested_sets():
    sc = torch.tensor([[1.0, 3.0, 3.0, 0.5, 2.0]])
    rank = rank_groups(sc)
    assert rank.tolist() == [[3, 0, 1, 4, 2]]
    prev = None
    for n_low in range(0, 5):
        hi = set((group_levels(rank, 5 - n_low, n_low)[0] == 0).nonzero().flatten().tolist())
        if prev is not None:
            assert hi <= prev  # more low groups -> the high set shrinks, never swaps
        prev = hi
    lv = group_levels(rank, 2, 2)
    assert lv.tolist() == [[1, 0, 0, 2, 1]]


def test_token_levels_prefix_high():
    geom = block_geometry(tiny_vit(), "vit", (2, 2))[0]
    lv = torch.tensor([[1, 0, 2, 1] + [0] * (geom.groups - 4)])
    t = token_levels(lv, geom)
    assert t.shape == (1, geom.n_tokens) and t[0, 0] == 0
    for g in range(4):
        assert set(t[0, geom.table[g]].tolist()) == {int(lv[0, g])}


# ---- recipe section ---------------------------------------------------------------------------------------

def test_recipe_round_trip(vit_w4a8, tmp_path):
    res, spec, _ = vit_w4a8
    rec = attach(res.recipe, spec)
    p = tmp_path / "r.json"
    rec.save(p)
    back = Recipe.load(p)
    assert back.to_dict() == rec.to_dict()
    s2 = back.mixa
    assert s2.to_dict() == spec.to_dict()
    assert {b.n_low for b in s2.blocks} == {n_low_groups(s2.blocks[0].groups, 0.5)}
    # recipes without a mixa section stay valid and unchanged
    assert Recipe.from_dict(res.recipe.to_dict()).mixa is None


@pytest.mark.parametrize("mutate,msg", [
    (lambda m: m.update(scheme="pixels"), "mixa.scheme"),
    (lambda m: m.update(low_bits=9), "mixa.low_bits"),
    (lambda m: m.update(low_bits=8, high_bits=4), "above high_bits"),
    (lambda m: m["blocks"][0].update(ratio=0.95), "blocks[0].ratio"),
    (lambda m: m["blocks"][0].update(n_low=1), "blocks[0].n_low"),
    (lambda m: m["blocks"][0].update(groups=5), "blocks[0].groups"),
    (lambda m: m["layers"][0].update(module="blocks.0.attn.nope"), "is not a layer of the recipe"),
    (lambda m: m["layers"][0].update(module="head"), "not inside any routed block"),
    (lambda m: m["layers"][0].pop("low"), "layers[0].low"),
    (lambda m: m["layers"][0]["low"].update(kind="conv"), "layers[0].low"),
    (lambda m: m.update(routed=["linear"]), "'attn' is not in"),
    (lambda m: m.update(extra=1), "unknown field"),
])
def test_malformed_mixa_sections(vit_w4a8, mutate, msg):
    res, spec, _ = vit_w4a8
    d = attach(res.recipe, spec).to_dict()
    mutate(d["mixa"])
    with pytest.raises(RecipeError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        Recipe.from_dict(json.loads(json.dumps(d)))


# ---- simulation, bit-operations, search --------------------------------------------------------------------

def test_sim_r0_equals_base_and_routing_changes_outputs(vit_w4a8):
    res, spec, x = vit_w4a8
    ms = MixaSim(res.sim, spec)
    base = res.sim(x)
    routed = ms(x)
    assert (routed - base).abs().max() > 1e-4
    ms.set_ratios({b.block: 0.0 for b in spec.blocks})
    assert torch.equal(ms(x), base)


def test_sim_float_branches_are_exact(vit_w4a8):
    """Both branches float -> routing is a no-op (difference 0) at any ratio."""
    res, spec, x = vit_w4a8
    s = copy.deepcopy(spec)
    for l in s.layers:
        l.high = l.low = None
    ms = MixaSim(res.sim, s)
    float_sim = copy.deepcopy(res.sim)
    for l in s.layers:  # the reference: the same layers float in the base simulation
        float_sim.set_layer(type(res.recipe.layer(l.module))(l.module, res.recipe.layer(l.module).kind,
                                                            res.recipe.layer(l.module).macs))
    assert torch.equal(ms(x), float_sim(x))


def test_bitops_reduction(vit_w4a8):
    res, spec, _ = vit_w4a8
    rec = res.recipe
    s0 = spec.with_ratios({b.block: 0.0 for b in spec.blocks})
    b0 = mixa_bitops(rec, s0)
    assert b0["reduction"] == pytest.approx(1.0) and b0["base_total"] == pytest.approx(bitops_report(rec)["total"])
    s8 = spec.with_ratios({b.block: 0.8 for b in spec.blocks})
    b8 = mixa_bitops(rec, s8)
    # by hand: linear layers a8 -> a4 on the low fraction; attention E[bq] E[bk]
    blk = s8.blocks[0]
    n = 1 + blk.groups * 4
    fl = blk.n_low * 4 / n
    fh = 1 - fl
    exp = 0.0
    for l in rec.layers:
        from vitq.quant.bitops import layer_bitops

        if s8.layer(l.module) is None:
            exp += layer_bitops(l)
        elif l.kind == "attn":
            e = fh * 8 + fl * 4
            exp += l.macs / 2 * e * e * 2
        else:
            exp += l.macs * 4 * (fh * 8 + fl * 4)
    assert b8["total"] == pytest.approx(exp, rel=1e-9)
    assert b8["reduction"] > 1.2


def test_search_reaches_target_and_is_monotone(vit_w4a8):
    res, spec, x = vit_w4a8
    ms = MixaSim(res.sim, spec)
    s, info = search_ratios(ms, res.recipe, x[:4], 1.15, step=0.2)
    assert info["reduction"] >= 1.15
    assert mixa_bitops(res.recipe, s)["reduction"] == pytest.approx(info["reduction"])
    reds = [t["reduction"] for t in info["trace"]]
    assert reds == sorted(reds) and info["trace"][0]["reduction"] == pytest.approx(1.0)
    with pytest.raises(Exception, match="largest reachable"):
        search_ratios(ms, res.recipe, x[:4], 5.0, step=0.2)


def test_swin_sim_pairs_and_geometry():
    m = tiny_swin()
    geoms = block_geometry(m, "swin")
    assert [g.block for g in geoms] == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                        "layers.1.blocks.1"]
    assert geoms[1].shift == (3, 3) and geoms[0].shift == (0, 0) and geoms[1].stage_first == "layers.0.blocks.0"
    assert [g.groups for g in geoms] == [4, 4, 1, 1]
