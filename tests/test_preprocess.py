"""The torch-free preprocessing must equal timm's own eval transform bit for bit."""

import numpy as np
import pytest
from PIL import Image

from vitq.runtime.preprocess import PreprocessConfig, preprocess
from vitq.errors import UnsupportedError


@pytest.mark.parametrize("model_name", ["deit_tiny_patch16_224", "vit_small_patch16_224"])
@pytest.mark.parametrize("size,mode", [((500, 375), "RGB"), ((227, 227), "RGB"), ((300, 640), "RGB"),
                                       ((200, 150), "L"), ((640, 481), "RGB")])
def test_matches_timm_transform(model_name, size, mode):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(model_name, pretrained=False, num_classes=2)
    cfg = resolve_data_config({}, model=model)
    rng = np.random.default_rng(sum(size))
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).convert("RGB")
    ref = create_transform(**cfg)(img).numpy()
    ours = preprocess(img, PreprocessConfig.from_dict(cfg))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_squash_mode_and_roundtrip():
    cfg = PreprocessConfig(crop_mode="squash", crop_pct=1.0, input_size=(3, 32, 32))
    img = Image.new("RGB", (80, 20), (255, 0, 0))
    x = preprocess(img, cfg)
    assert x.shape == (3, 32, 32)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


def test_unsupported_modes_are_named():
    with pytest.raises(UnsupportedError, match="border"):
        PreprocessConfig(crop_mode="border")
    with pytest.raises(UnsupportedError, match="interpolation"):
        PreprocessConfig(interpolation="magic")
