"""The ViT family: one tiny random-weight configuration per architecture family (ViT with layer scale and register
tokens, EVA02 with rotary embeddings and SwiGLU, BEiT v2 with relative position bias, Swin V2 in both timm
implementations) goes through vitq's export, calibration (w8a8, w4a8) and the ORT and TensorRT graph pipelines,
and the deployed Q/DQ graph on ONNX Runtime computes the torch simulation's function; MixA-Q windows on Swin V2;
unsupported models are refused naming the class and what is missing.

Bound: the graph and the simulation run the same quantizers, so they differ by float summation order only (~1e-7
relative, asserted per image on most images); now and then a rounding flip at one quantizer propagates a grid step
(measured on one of eight swinv2_cr images), so the whole batch is held to the compiler's own bound (relative logit
error below half the simulation's quantization error, ``vitq.compiler.SIM_REL_FRACTION``). The exact statement is
the teacher-forced check (``vitq.quant.forced``): with every quantizer of the simulation fed the graph's input,
every quantizer, float segment and logit agrees to float precision.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from conftest import FLOAT_KERNEL_REL  # noqa: E402
from vitq.errors import UnsupportedError  # noqa: E402
from vitq.exporter.models import create_model, family_of  # noqa: E402
from vitq.exporter.onnx_export import export_onnx, verify_against_torch  # noqa: E402
from vitq.targets import build_deployable  # noqa: E402
from vitq.passes.infra import ort_run  # noqa: E402
from vitq.quant.pipeline import calibrate  # noqa: E402
from vitq.quant.forced import forced_check  # noqa: E402
from vitq.quant.simulate import float_sensitivity, matches_simulation  # noqa: E402
from vitq.quant.prepare import enumerate_points, head_module_name, model_chain, prepare_model  # noqa: E402
from vitq.recipe import parse_recipe_arg  # noqa: E402

#: family -> (timm name, tiny overrides); image size = kwargs["img_size"]
TINY = {
    "vit": ("deit3_small_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                            reg_tokens=2, num_classes=10)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=64, num_heads=2, num_classes=10)),
    "beitv2": ("beitv2_base_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                               num_classes=10)),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32,
                                               window_size=4, num_classes=10)),
    "swinv2_cr": ("swinv2_cr_tiny_224", dict(img_size=64, depths=(2, 2), num_heads=(2, 4), embed_dim=32,
                                             window_size=4, num_classes=10)),
}
N_IMAGES = 8


def tiny_model(fam: str) -> torch.nn.Module:
    """Random weights; biases, norms, layer scales, logit scales and tokens perturbed so that none is trivially
    zero / one (timm initializes several of them to constants); the classifier redrawn at std 0.02 (EVA scales its
    initial head by 1e-3, which would leave the logits all bias)."""
    name, kw = TINY[fam]
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("head"):
                continue
            if n.endswith("bias") or any(k in n for k in ("norm", "gamma", "logit_scale", "token", "ls1", "ls2")):
                p.add_(torch.randn_like(p) * 0.2)
        head = m.get_submodule(head_module_name(m))
        torch.nn.init.trunc_normal_(head.weight, std=0.02)
    return m


def _images(fam: str, n: int = N_IMAGES) -> np.ndarray:
    hw = TINY[fam][1]["img_size"]
    return torch.randn(n, 3, hw, hw, generator=torch.Generator().manual_seed(2)).numpy()


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=list(TINY))
def fam(request):
    return request.param


def test_family_detection_prepare_and_chain_are_exact(fam):
    """Detected family; the prepared copy (explicit attention, constant position biases, folded q/v biases) and
    the stage chain (used by GPTQ, reconstruction and MixA-Q calibration) compute timm's function."""
    m = tiny_model(fam)
    family = family_of(m)
    assert family == ("swin" if fam.startswith("swin") else "vit")
    p = prepare_model(m)
    x = torch.from_numpy(_images(fam, 2))
    with torch.no_grad():
        ref = m(x)
        assert float((p(x) - ref).abs().max()) <= 1e-5
        y = x
        for _, f in model_chain(p, family):
            y = f(y)
        assert float((y - ref).abs().max()) <= 1e-5


def test_sqb_and_optm_applicability_follow_the_data_flow():
    """SQ-b groups are LayerNorm -> Linear edges of the data flow: pre-norm blocks have them, Swin V2's post-norm
    blocks do not (only the v2_cr patch merging's norm -> reduction); OPT-m candidates are GELU-fed Linears:
    EVA02's SwiGLU fc2 is not one."""
    groups = {f: enumerate_points(prepare_model(tiny_model(f)), (TINY[f][1]["img_size"],) * 2) for f in TINY}
    for f in ("vit", "eva02", "beitv2"):
        g = groups[f].norm_groups
        assert g["blocks.0.norm1"] == ["blocks.0.attn.qkv"] and g["blocks.1.norm2"] == ["blocks.1.mlp.fc1"]
    assert not any(".blocks." in ln for ln in groups["swinv2"].norm_groups)
    assert set(groups["swinv2_cr"].norm_groups) == {"stages.1.downsample.norm"}
    assert not any(p.post_gelu for p in groups["eva02"].points)
    for f in ("vit", "beitv2", "swinv2"):
        assert {p.module for p in groups[f].points if p.post_gelu} >= {
            ("layers.0.blocks.0.mlp.fc2" if f == "swinv2" else "blocks.0.mlp.fc2")}
    # Swin V2's position-bias MLP runs on constants: folded into a buffer, never a quantization point
    assert not any("cpb_mlp" in p.module or "meta_mlp" in p.module for f in ("swinv2", "swinv2_cr")
                   for p in groups[f].points)


@pytest.fixture(scope="module")
def exported(fam, tmp_path_factory):
    m = tiny_model(fam)
    x = _images(fam)
    hw = TINY[fam][1]["img_size"]
    d = tmp_path_factory.mktemp(f"family_{fam}")
    export_onnx(m, d / "fp32.onnx", image_size=(hw, hw))
    ver = verify_against_torch(d / "fp32.onnx", m, x[:4])  # raises beyond 1e-4
    assert ver["passed"]
    return m, x, d


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4a8-g16"])
def test_family_compiles_and_graph_matches_simulation(exported, fam, recipe, request):
    """``w4a8-g16``: group-wise 4-bit weights (one scale per 16 inputs), the ORT target's form; TensorRT refuses it
    (``BLOCKED_WEIGHT``), the ORT graph matches the simulation like the others."""
    m, x, d = exported
    hw = TINY[fam][1]["img_size"]
    preset, _, grp = recipe.partition("-g")
    res = calibrate(m, family_of(m), x, parse_recipe_arg(preset), model_name=fam, provenance={}, progress=False,
                    methods={"gptq_images": N_IMAGES, "weight_group": int(grp or 0)})
    if grp:
        assert any(l.weight is not None and l.weight.group == int(grp) for l in res.recipe.layers)
    path = d / f"{recipe}.prepared.onnx"
    export_onnx(res.model, path, image_size=(hw, hw))
    with torch.no_grad():
        sim = res.sim(torch.from_numpy(x)).numpy()
        flt = res.model(torch.from_numpy(x)).numpy()
    qerr = _rel(sim, flt)
    assert qerr > 1e-3  # the quantization is really there
    # the recipe's own float32 sensitivity (float64 twin, one-ulp input perturbations): a quantizer input within an
    # ulp of a rounding boundary flips; in some architectures, e.g. swinv2_cr's cosine attention, one flip cascades
    # to ~2e-3 at the logits on a third of the images, with no ONNX involved
    fp_sens = float_sensitivity(res.sim, x)
    sensitive = (fp_sens > FLOAT_KERNEL_REL).mean()
    n_attn = sum(1 for l in res.recipe.layers if l.kind == "attn")
    assert n_attn == sum(1 for b in m.modules() if type(b).__name__.endswith("Block") and hasattr(b, "attn"))
    if grp:
        _, rep = build_deployable(path, res.recipe, "trt", sample_inputs=x[:2])
        assert not rep["trt_check"]["ok"] and "BLOCKED_WEIGHT" in {e["code"] for e in rep["trt_check"]["errors"]}
    for target in ("ort",) if grp else ("ort", "trt"):
        proto, rep = build_deployable(path, res.recipe, target, sample_inputs=x[:2])
        got = ort_run(proto, {"input": x})[0]
        assert got.shape == sim.shape
        # the same function up to float summation order: no image further from the simulation than float32 moves
        # the simulation itself, and (where that sensitivity is rare) most images equal to float precision
        ok, per_image = matches_simulation(got, sim, fp_sens, floor=FLOAT_KERNEL_REL)
        assert ok, (fam, recipe, target, per_image, fp_sens)
        if sensitive < 0.25:
            assert (per_image <= FLOAT_KERNEL_REL).mean() >= 0.5, (fam, recipe, target, per_image, fp_sens)
        assert _rel(got, sim) < 0.5 * qerr, (fam, recipe, target, _rel(got, sim), qerr)
        # quantizer by quantizer, the simulation fed the graph's values: no flip can cascade, so every float segment,
        # every quantizer (up to rounding-boundary ties) and the logits agree to float precision
        fc = forced_check(res.sim, proto, x)
        assert fc.consistent and not fc.unmatched, (fam, recipe, target, fc.summary())
        assert len(fc.sites) == sum(4 if l.kind == "attn" else 1 for l in res.recipe.layers)
        assert (got.argmax(1) == sim.argmax(1)).mean() >= 0.75
        if target == "trt":
            chk = rep["trt_check"]
            assert chk["ok"], rep["trt_check_text"]
            # every GEMM is quantized (no float MatMul left: position-bias MLPs are constants), w4 runs weight-only
            assert {w["code"] for w in chk["warnings"]} <= {"INT4_WEIGHT"}, rep["trt_check_text"]


def test_mixa_windows_on_swin_v2(tmp_path):
    """MixA-Q on Swin V2 (post-norm blocks: the router reads the block input, not norm1's): the deployed
    two-precision graph equals the MixA-Q simulation."""
    from vitq.mixa.calib import attach, build_mixa_spec
    from vitq.mixa.sim import MixaSim

    m = tiny_model("swinv2")
    x = torch.from_numpy(_images("swinv2", 6))
    res = calibrate(m, "swin", x.numpy(), parse_recipe_arg("w4a8"), model_name="swinv2", provenance={},
                    progress=False, methods={"gptq": False, "observer": "minmax", "sqb": False})
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, group=None, low_bits=4, routed=("linear", "attn"),
                           ratios=0.5)
    rec = attach(res.recipe, spec)
    path = tmp_path / "swinv2.onnx"
    export_onnx(res.model, path, image_size=(64, 64))
    proto, rep = build_deployable(path, rec, "ort", sample_inputs=x[:2].numpy())
    assert [p["name"] for p in rep["passes"]][:3] == ["split_windows", "insert_qdq", "split_windows_attn"]
    assert rep["passes"][0]["stats"]["routers"] >= 1 and rep["passes"][0]["stats"]["split_layers"] > 0
    sim = MixaSim(res.sim, rec.mixa)
    for b in (1, 6):  # dynamic batch
        xb = x[:b].numpy()
        got = ort_run(proto, {"input": xb})[0]
        ref = sim(torch.from_numpy(xb)).numpy()
        base = res.sim(torch.from_numpy(xb)).numpy()
        per_image = np.abs(got - ref).max(1)
        routing = np.abs(base - ref).max(1)
        assert routing.max() > 1e-3  # the routing does something
        # per image: the same function up to float summation order (<= 1e-5), or one 4-bit rounding flip
        # propagated (measured 5e-4 on one of six images), far below what the routing changes
        assert (per_image <= 1e-5).mean() >= 0.5 and per_image.max() <= 0.5 * routing.max(), (per_image, routing)
        assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name, kwargs, culprit", [
    ("resnet18", {}, "ResNet"),
    ("cait_xxs24_224", dict(depth=1, depth_token_only=1, img_size=32), "TalkingHeadAttn"),
    ("vit_tiny_patch16_224", dict(depth=1, img_size=32, global_pool="map"), "AttentionPoolLatent"),
])
def test_unsupported_models_are_refused_naming_class_and_gap(name, kwargs, culprit):
    with pytest.raises(UnsupportedError) as ei:
        create_model(name, **kwargs)
    msg = str(ei.value)
    assert culprit in msg and name in msg
    assert "supported attention" in msg or "not a ViT-family model" in msg


def _bench_models():
    """``bench/models.py`` (the model matrix), imported with the repository root on the path."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import bench.models

    return bench.models


@pytest.mark.slow
@pytest.mark.parametrize("name", _bench_models().MODELS)
def test_model_matrix(name, tmp_path):
    """The full matrix at its real sizes (random weights, 8 images): fp32 export verified, w8a8 and w4a8 compile,
    their ORT graphs agree with the simulation (quantizer by quantizer too), trt_check is clean."""
    from types import SimpleNamespace

    args = SimpleNamespace(images=8, verify=4, recipes=["w8a8", "w4a8"], latency_runs=0)
    row = _bench_models().one_model(name, args, tmp_path)
    assert row["fp32"]["passed"], row
    for r in args.recipes:
        assert "error" not in row[r], row[r]
        assert row[r]["agrees"] and row[r]["forced"]["consistent"] and row[r]["trt_check"]["ok"], row[r]
