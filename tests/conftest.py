"""Shared fixtures. Tests that need real data use ``shared_data`` and skip cleanly when ../shared/data is absent."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The ort target lowers for the compiling machine's CPU by default (--cpu auto); the suite pins the form so that
# graph-structure assertions hold on every machine. Tests of the other forms and of detection set it themselves.
os.environ.setdefault("VITQ_CPU_ISA", "avx2")

SHARED = Path(os.environ.get("VITQ_SHARED_DATA", REPO.parent / "shared" / "data"))
DEIT_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.wvfunc_matdump.pth"
DEV650 = SHARED / "imagenet-val-dev650"
SAMPLE1000 = SHARED / "imagenet-sample-eli1000"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (DEIT_WEIGHTS.is_file() and DEV650.is_dir() and SAMPLE1000.is_dir()):
        pytest.skip(f"real data not available at {SHARED} (needs weights/, imagenet-val-dev650/, "
                    f"imagenet-sample-eli1000/)")
    return SHARED


def make_image_folder(root: Path, n: int = 6, size=(40, 30), labels: bool = True, seed: int = 0) -> Path:
    """A small labeled image folder (labels.csv layout) of random JPEG/PNG images."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["file,label"]
    for i in range(n):
        ext = "png" if i % 2 else "jpg"
        name = f"img_{i:03d}.{ext}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        rows.append(f"{name},{i % 3}")
    if labels:
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_vit_onnx(tmp_path_factory) -> Path:
    """A small exported ViT artifact directory (random weights, 32x32 input, 10 classes), built once per session
    through vitq's own exporter."""
    pytest.importorskip("torch")
    from vitq.exporter.onnx_export import artifact_metadata, export_onnx
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).eval()
    d = tmp_path_factory.mktemp("tiny_vit")
    cfg = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    export_onnx(model, d / "model.onnx", image_size=(32, 32),
                metadata=artifact_metadata("tiny_vit", cfg, 10, "fp32"))
    return d


def _mixa_setup(model, family, hw, group, tmp, methods):
    """A tiny model calibrated at w4a8 with a MixA-Q section (ratio 0.5, linear + attention routed) and its float
    ONNX export: ``(calibration result, recipe, onnx path, images)``."""
    import torch

    from vitq.exporter.onnx_export import export_onnx
    from vitq.mixa.calib import attach, build_mixa_spec
    from vitq.quant.pipeline import calibrate
    from vitq.recipe import parse_recipe_arg

    x = torch.randn(6, 3, hw, hw, generator=torch.Generator().manual_seed(2))
    res = calibrate(model, family, x.numpy(), parse_recipe_arg("w4a8"), model_name="m", provenance={},
                    progress=False, methods={"gptq": False, **methods})
    spec = build_mixa_spec(res.model, res.sim, res.recipe, x, group=group, low_bits=4, routed=("linear", "attn"),
                           ratios=0.5)
    rec = attach(res.recipe, spec)
    path = tmp / f"{family}.onnx"
    export_onnx(res.model, path, image_size=(hw, hw))
    return res, rec, path, x


@pytest.fixture(scope="session")
def vit_setup(tmp_path_factory):
    pytest.importorskip("timm")
    from test_mixa_core import tiny_vit

    return _mixa_setup(tiny_vit(), "vit", 32, (2, 2), tmp_path_factory.mktemp("mixa_vit"), {})


@pytest.fixture(scope="session")
def swin_setup(tmp_path_factory):
    # min/max observers, no SQ-b: the graph/simulation agreement does not depend on how scales were chosen
    pytest.importorskip("timm")
    from test_mixa_core import tiny_swin

    return _mixa_setup(tiny_swin(), "swin", 56, None, tmp_path_factory.mktemp("mixa_swin"),
                       {"observer": "minmax", "sqb": False})


# Per-sample agreement of fp32 kernels that sum in different orders (ONNX Runtime's MLAS vs torch's BLAS): ~1e-7
# relative per op, well under this bound at the depths of the test models.
FLOAT_KERNEL_REL = 1e-5


def assert_same_function(got: np.ndarray, ref: np.ndarray, other: np.ndarray, min_exact: float = 0.5) -> None:
    """Assert that ``got`` (a deployed graph's logits, one row per sample) computes the simulation's function
    ``ref`` and not the alternative ``other`` (e.g. the unrouted base).

    The arithmetic allows two kinds of difference. Float kernels alone keep each sample within
    :data:`FLOAT_KERNEL_REL`. A quantizer whose input lands within an ulp or two of a rounding boundary may round
    the other way when the two runtimes sum in different orders (which orders they use depends on the CPU's vector
    width); one such flip moves a 4-bit code by one step, and in these tiny random models that moves the sample's
    logits as much as the routing itself. Flips need an input on a boundary, so they hit a minority of samples, while
    a graph computing ``other`` misses on every sample: at least ``min_exact`` of the samples must match to float
    precision, and ``other`` must match on none.
    """
    got, ref, other = (np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in (got, ref, other))
    assert got.shape == ref.shape == other.shape, (got.shape, ref.shape, other.shape)

    def rel(a, b):
        return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)

    r_got, r_other = rel(got, ref), rel(other, ref)
    assert (r_other > 10 * FLOAT_KERNEL_REL).all(), f"the alternative matches the simulation: {r_other.min():.2e}"
    exact = r_got <= FLOAT_KERNEL_REL
    assert exact.mean() >= min_exact, (
        f"{int(exact.sum())}/{len(exact)} samples match to {FLOAT_KERNEL_REL:.0e}; per-sample relative error "
        f"{np.array2string(r_got, precision=2)} vs the alternative's {np.array2string(r_other, precision=2)}")
