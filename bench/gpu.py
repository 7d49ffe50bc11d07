"""GPU check + benchmark of the vitq plugin kernels (needs an sm_80+ GPU, nvcc and torch with CUDA).

    python -m bench gpu [--out bench/results/gpu.json] [--iters 50] [--quick] [--force-s4]

1. compiles vitq/plugins/kernels/*.cu into a shared library with nvcc (for the local GPU's arch) and loads it with
   ctypes;
2. checks every kernel against the numpy references in vitq.plugins.specs on random inputs and on real DeiT-T /
   Swin-T shapes, with poisoned outputs (output buffers filled with NaN before each launch) and fresh inputs per
   run; QuantLinearA4 float32 output must be bit-exact (see specs.quant_linear_a4_ref), both GEMM paths are run
   where the device has them;
3. times them with CUDA events (median of --iters) next to torch fp16 matmul and torch._int_mm (int8) at the same
   shapes, and writes JSON + a markdown table.

Timings are device times from CUDA-graph replays (host launch cost excluded), with inputs resident in L2. The
CPU-side parts (shape lists, reference comparisons) are unit-tested in tests/test_plugins_bench.py; docs/plugins.md
describes the kernels.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.common import REPO, write_result
from vitq.plugins.specs import dynamic_row_params_ref, quant_linear_a4_ref

KERNELS = REPO / "vitq" / "plugins" / "kernels"
W_INT4_PACKED, W_INT8 = 0, 1
OUT_F32, OUT_F16 = 0, 1
PATH_AUTO, PATH_S4, PATH_S8 = 0, 1, 2


@dataclass(frozen=True)
class LinearShape:
    model: str
    layer: str
    M: int  # tokens (batch * tokens per image)
    K: int
    N: int


def linear_shapes(batch: int = 8) -> list[LinearShape]:
    """The linear layers of DeiT-Tiny (197 tokens, dim 192, mlp 768) and Swin-Tiny (window 7, dims 96..768)."""
    out = []
    m = batch * 197
    for layer, k, n in (("qkv", 192, 576), ("proj", 192, 192), ("fc1", 192, 768), ("fc2", 768, 192)):
        out.append(LinearShape("deit_tiny", layer, m, k, n))
    for stage, (tokens, c) in enumerate(((56 * 56, 96), (28 * 28, 192), (14 * 14, 384), (7 * 7, 768)), start=1):
        m = batch * tokens
        for layer, k, n in (("qkv", c, 3 * c), ("proj", c, c), ("fc1", c, 4 * c), ("fc2", 4 * c, c)):
            out.append(LinearShape("swin_tiny", f"s{stage}.{layer}", m, k, n))
    return out


def random_linear_case(rng: np.random.Generator, M: int, K: int, N: int, weight_bits: int = 4):
    lo, hi = (-8, 7) if weight_bits == 4 else (-128, 127)
    x = (rng.standard_normal((M, K)) * 1.5).astype(np.float32)
    act_scale = float(np.float32(np.abs(x).max() / 7.5))
    x.reshape(-1)[:4] = np.float32([0.5, 1.5, -2.5, 100.0]) * np.float32(act_scale)  # ties + saturation
    w = rng.integers(lo, hi + 1, (N, K)).astype(np.int8)
    w_scale = (rng.random(N) * 0.02 + 0.001).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    return x, w, w_scale, bias, act_scale


def pack_int4_ref(w: np.ndarray) -> np.ndarray:
    """int8 [N, K] (values -8..7) -> uint8 [N, K/2]: low nibble = even k, high nibble = odd k (vitq_kernels.h)."""
    u = (w.astype(np.int16) & 0xF).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def check_linear(y: np.ndarray, ref: np.ndarray, out_f16: bool) -> dict:
    """Bit-exact for float32 output; float16 output must equal the reference rounded to fp16."""
    expect = ref.astype(np.float16).astype(np.float32) if out_f16 else ref
    y = y.astype(np.float32)
    nan = int(np.isnan(y).sum())
    diff = float(np.nanmax(np.abs(y - expect))) if y.size else 0.0
    return {"ok": nan == 0 and bool(np.array_equal(y, expect)), "nan": nan, "max_abs_diff": diff}


# ------------------------------------------------------------------------------------------------------------------
# GPU side (torch + ctypes), only imported/used by main()
# ------------------------------------------------------------------------------------------------------------------

def build_library(out_dir: Path, arch: str) -> Path:
    lib = out_dir / "libvitq_kernels.so"
    cmd = ["nvcc", "-std=c++17", "-O3", "-lineinfo", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-o", str(lib),
           *map(str, sorted(KERNELS.glob("*.cu")))]
    subprocess.run(cmd, check=True)
    return lib


def load_library(path: Path):
    lib = ctypes.CDLL(str(path))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.vitq_pack_int4.argtypes = [p, p, i, i, p]
    lib.vitq_prepared_weight_bytes.argtypes = [i, i, i]
    lib.vitq_act_workspace_bytes.argtypes = [i, i, i, i, i]
    lib.vitq_prepared_weight_bytes.restype = lib.vitq_act_workspace_bytes.restype = ctypes.c_size_t
    lib.vitq_resolve_path.argtypes = [i, i, i]
    lib.vitq_prepare_weights.argtypes = [p, i, i, i, i, p, p]
    lib.vitq_quant_linear_a4_prepared.argtypes = [p, p, p, p, p, i, i, i, i, f, i, i, i, p, p]
    for fn in (lib.vitq_pack_int4, lib.vitq_resolve_path, lib.vitq_prepare_weights, lib.vitq_quant_linear_a4_prepared):
        fn.restype = ctypes.c_int
    return lib


REPS = 20  # launches per timed sample


def _time(fn, iters: int, reps: int = REPS) -> float:
    """Device time of one call of `fn`, in microseconds: `reps` calls are captured into a CUDA graph and the median
    over `iters` replays (CUDA events), divided by `reps`, is returned, so host-side launch cost (Python, ctypes,
    torch dispatch) stays out. `fn` must launch on torch's current stream (the capture stream). Falls back to
    back-to-back launches between events if capture fails (then host cost can dominate small kernels)."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm-up on the side stream (torch's recommendation before capture)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(reps):
                rc = fn()
                if isinstance(rc, int) and rc != 0:  # a launch refused during capture: time it uncaptured
                    raise RuntimeError(f"launch returned {rc} during capture")
        run = g.replay
    except RuntimeError:
        def run():
            for _ in range(reps):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    return statistics.median(times)


def run_gpu(iters: int, batch: int, seed: int, quick: bool = False, force_s4: bool = False) -> dict:
    import torch

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    assert cc >= 80, f"needs sm_80+, device is sm_{cc}"
    tmp = Path(tempfile.mkdtemp(prefix="vitq_kernels_"))
    lib = load_library(build_library(tmp, f"sm_{cc}"))
    class _CurrentStream:  # ctypes argument: torch's current stream at call time (the capture stream in _time)
        @property
        def _as_parameter_(self):
            return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    stream = _CurrentStream()
    dev = torch.device("cuda")
    rng = np.random.default_rng(seed)
    # the S4 path is dispatched on sm_80..sm_89 only. On sm_90+ ptxas lowers the s4 mma to an s8 IMMA sequence
    # (cuobjdump shows it), so --force-s4 runs it there to check its function (packing, fragments), not its speed
    paths = [PATH_S8] + ([PATH_S4] if 80 <= cc < 90 or force_s4 else [])
    results = {"device": torch.cuda.get_device_name(), "sm": cc, "s4_emulated": PATH_S4 in paths and cc >= 90,
               "auto_path_int4": lib.vitq_resolve_path(0, W_INT4_PACKED, 0),
               "pack": [], "linear": []}

    def T(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    cases = [LinearShape("random", f"r{i}", int(m), int(k), int(n)) for i, (m, k, n) in
             enumerate(((1, 8, 1), (63, 64, 65), (130, 136, 72), (257, 520, 200), (33, 96, 40), (70, 256, 48)))]
    if not quick:  # + DeiT-T at batch 1 (M = 197): the edge-latency case
        cases += linear_shapes(batch) + [LinearShape("deit_tiny_b1", sh.layer, sh.M, sh.K, sh.N)
                                         for sh in linear_shapes(1) if sh.model == "deit_tiny"]
    for sh in cases:
        for wbits in (4, 8):
            x, w, ws, b, s = random_linear_case(rng, sh.M, sh.K, sh.N, wbits)
            ref = quant_linear_a4_ref(x, w, ws, b, act_scale=s, weight_bits=wbits)
            xt, wt, wst, bt = T(x), T(w), T(ws), T(b)
            if wbits == 4:
                packed = torch.empty((sh.N, sh.K // 2), dtype=torch.uint8, device=dev)
                rc_pack = lib.vitq_pack_int4(wt.data_ptr(), packed.data_ptr(), sh.N, sh.K, stream)
                torch.cuda.synchronize()
                results["pack"].append({**asdict(sh), "rc": rc_pack, "ok": rc_pack == 0 and bool(
                    np.array_equal(packed.cpu().numpy(), pack_int4_ref(w)))})
                wbuf, fmt = packed, W_INT4_PACKED
            else:
                wbuf, fmt = wt, W_INT8
            # dynamic modes: per row (group 0), and per group of 32 / 64 features where K allows (--mixa-low-group)
            groups = [gs for gs in (0, 32, 64) if gs == 0 or sh.K % gs == 0]
            ref_d = {gs: quant_linear_a4_ref(x, w, ws, b, weight_bits=wbits, act_dynamic=1, act_group=gs)
                     for gs in groups}
            params_ref = {gs: dynamic_row_params_ref(x, group=gs) for gs in groups}
            # weights prepared once, then per call: activations quantized once per row, pipelined GEMM; static and
            # dynamic per-row mode (row scale / zero point bit-exact), both GEMM paths where the device has them
            for path in paths if wbits == 4 else [PATH_S8]:
                wq = torch.empty(lib.vitq_prepared_weight_bytes(sh.N, sh.K, path), dtype=torch.uint8, device=dev)
                prep = lambda: lib.vitq_prepare_weights(wbuf.data_ptr(), fmt, sh.N, sh.K, path,  # noqa: E731
                                                        wq.data_ptr(), stream)
                rc_prep = prep()
                torch.cuda.synchronize()
                if wbits == 4:  # the plugin prepares from its int8 [N, K] weights: same bytes as from packed int4
                    wq8 = torch.full_like(wq, 0xAA)
                    rc8 = lib.vitq_prepare_weights(wt.data_ptr(), W_INT8, sh.N, sh.K, path, wq8.data_ptr(), stream)
                    torch.cuda.synchronize()
                    results["pack"].append({**asdict(sh), "check": "prepare int8 == prepare packed", "path": path,
                                            "rc": rc8, "ok": rc8 == 0 and bool(torch.equal(wq8, wq))})
                prep_us = _time(prep, iters) if sh.model != "random" else None
                modes = [(0, 0)] + ([(1, gs) for gs in groups] if path == PATH_S8 else [])
                for dyn, gs in modes:
                    ng = sh.K // gs if gs else 1
                    wsb = lib.vitq_act_workspace_bytes(sh.M, sh.K, path, dyn, gs)
                    work = torch.full((wsb,), 0xFF, dtype=torch.uint8, device=dev)  # poisoned (NaN row params)
                    for out_dt in (OUT_F32, OUT_F16):
                        y = torch.full((sh.M, sh.N), float("nan"), device=dev,
                                       dtype=torch.float32 if out_dt == OUT_F32 else torch.float16)
                        launch = lambda: lib.vitq_quant_linear_a4_prepared(  # noqa: E731
                            xt.data_ptr(), wq.data_ptr(), wst.data_ptr(), bt.data_ptr(), y.data_ptr(), out_dt,
                            sh.M, sh.N, sh.K, ctypes.c_float(s), dyn, gs, path, work.data_ptr(), stream)
                        rc = rc_prep or launch()
                        torch.cuda.synchronize()
                        name = {PATH_S4: "s4_mma", PATH_S8: "s8_mma"}[path] + ("_dynamic" if dyn else "") + (
                            f"_g{gs}" if gs else "")
                        row = {**asdict(sh), "weight_bits": wbits, "path": name,
                               "out": "f32" if out_dt == OUT_F32 else "f16", "rc": rc}
                        row.update(check_linear(y.cpu().numpy(), ref_d[gs] if dyn else ref, out_dt == OUT_F16)
                                   if rc == 0 else {"ok": False})
                        if dyn and rc == 0:
                            mg = sh.M * ng
                            pr = work[wsb - 8 * mg:].cpu().numpy().view(np.float32)
                            rs_ref, rz_ref = params_ref[gs]
                            row["row_params_exact"] = bool(np.array_equal(pr[:mg], rs_ref.reshape(-1))
                                                           and np.array_equal(pr[mg:], rz_ref.reshape(-1)))
                            row["ok"] = row["ok"] and row["row_params_exact"]
                        if rc == 0 and sh.model != "random" and out_dt == OUT_F16:
                            row["us"] = _time(launch, iters)
                            row["prepare_weights_us"] = prep_us
                        results["linear"].append(row)
            if sh.model != "random" and wbits == 4:
                a16 = torch.randn(sh.M, sh.K, device=dev, dtype=torch.float16)
                w16 = torch.randn(sh.K, sh.N, device=dev, dtype=torch.float16)
                a8 = torch.randint(-8, 8, (sh.M, sh.K), device=dev, dtype=torch.int8)
                w8 = torch.randint(-8, 8, (sh.K, sh.N), device=dev, dtype=torch.int8)
                base = {**asdict(sh), "weight_bits": 16, "path": "torch_fp16_matmul", "out": "f16", "ok": True}
                results["linear"].append({**base, "us": _time(lambda: a16 @ w16, iters)})
                try:
                    us = _time(lambda: torch._int_mm(a8, w8), iters)
                    results["linear"].append({**base, "weight_bits": 8, "path": "torch_int_mm_int8", "out": "i32",
                                              "us": us})
                except RuntimeError as e:  # _int_mm shape limits (M > 16, K, N multiples of 8)
                    results["linear"].append({**base, "path": "torch_int_mm_int8", "ok": False, "error": str(e)})

    # argument checks of the C API: each call must be refused with the documented status and launch nothing
    x = T(np.ones((8, 64), np.float32))
    wq = torch.zeros(lib.vitq_prepared_weight_bytes(8, 64, PATH_S8), dtype=torch.uint8, device=dev)
    work = torch.zeros(lib.vitq_act_workspace_bytes(8, 64, PATH_S8, 1, 32), dtype=torch.uint8, device=dev)
    ones = T(np.ones(8, np.float32))
    y = torch.full((8, 8), float("nan"), device=dev)

    def call(xp=x.data_ptr(), k=64, scale=1.0, dyn=0, path=PATH_S8, group=0):
        return lib.vitq_quant_linear_a4_prepared(xp, wq.data_ptr(), ones.data_ptr(), None, y.data_ptr(), OUT_F32, 8,
                                                 8, k, ctypes.c_float(scale), dyn, group, path, work.data_ptr(), stream)
    expect = {"x not 16-byte aligned": (call(xp=x.data_ptr() + 4), 3), "K % 8 != 0": (call(k=60), 1),
              "static act_scale 0": (call(scale=0.0), 3), "static act_scale inf": (call(scale=float("inf")), 3),
              "dynamic on the S4 path": (call(dyn=1, path=PATH_S4), 3), "path AUTO unresolved": (call(path=0), 3),
              "group without dynamic": (call(group=32), 3), "group 48": (call(dyn=1, group=48), 3),
              "K % group != 0": (call(dyn=1, k=64 + 32, group=64), 1),
              "S4 path on sm_90+": (lib.vitq_resolve_path(PATH_S4, W_INT4_PACKED, 0), -2 if cc >= 90 else PATH_S4),
              "AUTO, dynamic": (lib.vitq_resolve_path(0, W_INT4_PACKED, 1), PATH_S8),
              "AUTO, int8 weights": (lib.vitq_resolve_path(0, W_INT8, 0), PATH_S8)}
    torch.cuda.synchronize()
    untouched = bool(torch.isnan(y).all())
    results["api"] = [{"check": k, "got": got, "want": want, "ok": got == want and untouched}
                      for k, (got, want) in expect.items()]

    return results


def table(results: dict) -> str:
    lines = ["| model | layer | M | K | N | wbits | path | out | ok | median us |", "|" + "---|" * 10]
    for r in results["linear"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['weight_bits']} | "
                     f"{r['path']} | {r['out']} | {r.get('ok')} | {r.get('us', '')} |")
    return "\n".join(lines)


def speed_table(results: dict) -> str:
    """Per layer (int4 weights, fp16 out): median us per call of each implementation."""
    cols = ["s8_mma", "s4_mma", "s8_mma_dynamic", "torch_fp16_matmul", "torch_int_mm_int8"]
    rows: dict = {}
    for r in results["linear"]:
        if r["model"] == "random" or "us" not in r:
            continue
        if r["path"].startswith(("s8", "s4")) and r["weight_bits"] != 4:
            continue
        rows.setdefault((r["model"], r["layer"], r["M"], r["K"], r["N"]), {})[r["path"]] = (r["us"],
                                                                                         r.get("prepare_weights_us"))
    present = [c for c in cols if any(c in v for v in rows.values())]
    lines = ["| layer | M | K | N | " + " | ".join(present) + " | prepare weights (once) | s8 / fp16 |",
             "|" + "---|" * (6 + len(present))]
    for (model, layer, m, k, n), v in rows.items():
        f = [f"{v[c][0]:.1f}" if c in v else "" for c in present]
        prep = f"{v['s8_mma'][1]:.1f}" if "s8_mma" in v and v["s8_mma"][1] is not None else ""
        ratio = (f"{v['s8_mma'][0] / v['torch_fp16_matmul'][0]:.2f}"
                 if "s8_mma" in v and "torch_fp16_matmul" in v else "")
        lines.append(f"| {model}.{layer} | {m} | {k} | {n} | " + " | ".join(f) + f" | {prep} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="result file (default bench/results/gpu.json)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="random shapes only, no model shapes (for compute-sanitizer)")
    ap.add_argument("--force-s4", action="store_true",
                    help="also run the S4 (int4 mma) path on sm_90+, where it is emulated: a function check only")
    args = ap.parse_args(argv)
    results = run_gpu(args.iters, args.batch, args.seed, args.quick, args.force_s4)
    out = write_result("gpu", results, data="random inputs at DeiT-Tiny / Swin-T layer shapes (batch "
                       f"{args.batch}) and random shapes", argv=argv, out=args.out)
    print(table(results))
    print()
    print(speed_table(results))
    bad = [r for r in results["pack"] + results["api"] + results["linear"] if not r.get("ok")]
    for r in bad[:40]:
        print("FAIL", {k: r.get(k) for k in ("check", "got", "want", "model", "layer", "stage", "op", "M", "K", "N",
                                           "weight_bits", "path",
                                           "out", "rc", "nan", "max_abs_diff", "row_params_exact", "problems")
                       if k in r})
    print(f"\n{len(bad)} failing checks; wrote {out}")
    return 1 if bad else 0

