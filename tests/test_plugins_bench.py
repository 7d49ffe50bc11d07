"""CPU-side parts of the GPU benchmark ``python -m bench gpu`` (the GPU parts need a GPU)."""

from __future__ import annotations

import numpy as np

import bench.gpu as bench
from vitq.plugins.specs import quant_linear_a4_ref


def test_shapes_meet_kernel_preconditions():
    lin = bench.linear_shapes(batch=8)
    assert {s.model for s in lin} == {"deit_tiny", "swin_tiny"} and len(lin) == 20
    assert all(s.K % 8 == 0 and s.K >= 8 and s.M >= 1 and s.N >= 1 for s in lin)
    assert any(s.K % 64 for s in lin)  # Swin-T stage 1 (K=96) exercises the K tail
    assert bench.LinearShape("deit_tiny", "fc2", 8 * 197, 768, 192) in lin


def test_pack_int4_ref_layout():
    w = np.array([[1, -8, 7, -1, 0, 2, -3, 4]], np.int8)
    p = bench.pack_int4_ref(w)
    assert p.tolist() == [[0x81, 0xF7, 0x20, 0x4D]]
    # unpack round-trip
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    un = np.stack([lo, hi], -1).reshape(1, -1)
    np.testing.assert_array_equal(np.where(un > 7, un - 16, un), w)


def test_check_linear_detects_poison_and_error():
    rng = np.random.default_rng(0)
    x, w, ws, b, s = bench.random_linear_case(rng, 5, 16, 3)
    ref = quant_linear_a4_ref(x, w, ws, b, act_scale=s)
    assert bench.check_linear(ref.copy(), ref, False)["ok"]
    assert bench.check_linear(ref.astype(np.float16), ref, True)["ok"]
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert not bench.check_linear(bad, ref, False)["ok"]
    bad = ref.copy()
    bad[1, 1] = np.nextafter(bad[1, 1], np.float32(np.inf))
    assert not bench.check_linear(bad, ref, False)["ok"]  # bit-exact for float32
