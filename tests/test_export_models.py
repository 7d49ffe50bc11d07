"""Export of the model families vitq supports, verified against torch on ONNX Runtime."""

import numpy as np
import pytest

from vitq.compiler import CompileOptions, compile_model
from vitq.runtime import Engine


def test_swin_tiny_exports_verifies_and_runs_batch_1_and_8(tmp_path):
    out = tmp_path / "swin"
    r = compile_model(CompileOptions(model="swin_tiny_patch4_window7_224", out=out, verify_count=4),
                      echo=lambda s: None)
    assert r["model"]["family"] == "swin" and r["verification"]["export"]["max_abs_diff"] <= 1e-4
    e = Engine.load(out)
    for b in (1, 8):
        y = e.run(np.random.default_rng(b).standard_normal((b, 3, 224, 224)).astype(np.float32))
        assert y.shape == (b, 1000) and np.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_small_patch16_224", "vit_small_patch16_224"])
def test_other_vit_sizes_export(tmp_path, name):
    r = compile_model(CompileOptions(model=name, out=tmp_path / name, verify_count=2), echo=lambda s: None)
    assert r["verification"]["export"]["passed"]
