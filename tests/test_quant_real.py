"""w8a8 on real DeiT-Tiny weights and ImageNet images stays close to fp32 (32 calibration, 64 eval images)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import DEIT_WEIGHTS, DEV650, SAMPLE1000  # noqa: E402


def test_w8a8_real_images_close_to_fp32(shared_data):
    from vitq.data import load_array, open_image_set
    from vitq.exporter.models import data_config, load_model
    from vitq.quant.pipeline import calibrate
    from vitq.recipe import parse_recipe_arg
    from vitq.runtime.preprocess import PreprocessConfig

    lm = load_model("deit_tiny_patch16_224", DEIT_WEIGHTS)
    cfg = PreprocessConfig.from_dict(data_config(lm.model))
    xc, _ = load_array(open_image_set(SAMPLE1000).subset(32, seed=0), cfg)
    xe, _ = load_array(open_image_set(DEV650).subset(64, seed=1), cfg)
    res = calibrate(lm.model, lm.family, xc, parse_recipe_arg("w8a8"), model_name=lm.name, provenance={},
                    methods={"sqb": False})
    x = torch.from_numpy(xe)
    with torch.no_grad():
        ref = lm.model(x)
        out = res.sim(x)
    agree = float((ref.argmax(-1) == out.argmax(-1)).float().mean())
    p = torch.log_softmax(ref, -1)
    kl = float((p.exp() * (p - torch.log_softmax(out, -1))).sum(-1).mean())
    assert agree >= 0.95, agree
    assert kl < 0.05, kl
