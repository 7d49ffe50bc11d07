"""Per-kernel device time of the QuantLinearA4 two-kernel pipeline (quantize_rows + qgemm) at the model shapes,
from torch.profiler's CUDA kernel records (needs an sm_80+ GPU, nvcc and torch with CUDA).

    python bench/plugins_gpu_profile.py [--out bench/results/plugins_gpu_profile.json] [--calls 20]

bench/plugins_gpu.py checks correctness and times whole calls; this splits a call's time between its kernels, so a
slow stage can be found without hardware counters.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import plugins_gpu as pg  # noqa: E402


def main(argv=None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=pg.REPO / "bench" / "results" / "plugins_gpu_profile.json")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated layers (e.g. swin_tiny.s1.proj), for ncu runs")
    ap.add_argument("--dynamic", default="0,1,g32", help="which modes: 0 (static), 1 (dynamic per row), gG "
                    "(dynamic per G features, e.g. g32)")
    args = ap.parse_args(argv)
    major, minor = torch.cuda.get_device_capability()
    lib = pg.load_library(pg.build_library(Path(tempfile.mkdtemp(prefix="vitq_kernels_")), f"sm_{major}{minor}"))
    dev, rng = torch.device("cuda"), np.random.default_rng(0)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    rows = []
    only = {o for o in args.only.split(",") if o}
    for sh in pg.linear_shapes(args.batch):
        if only and f"{sh.model}.{sh.layer}" not in only:
            continue
        x, w, ws, b, s = pg.random_linear_case(rng, sh.M, sh.K, sh.N, 4)
        xt, wst, bt = (torch.from_numpy(a).to(dev) for a in (x, ws, b))
        packed = torch.from_numpy(pg.pack_int4_ref(w)).to(dev)
        for mode in args.dynamic.split(","):
            dyn, gs = (1, int(mode[1:])) if mode.startswith("g") else (int(mode), 0)
            if gs and sh.K % gs:
                continue
            path = pg.PATH_S8
            wq = torch.empty(lib.vitq_prepared_weight_bytes(sh.N, sh.K, path), dtype=torch.uint8, device=dev)
            assert lib.vitq_prepare_weights(packed.data_ptr(), pg.W_INT4_PACKED, sh.N, sh.K, path, wq.data_ptr(),
                                            stream) == 0
            work = torch.empty(lib.vitq_act_workspace_bytes(sh.M, sh.K, path, dyn, gs), dtype=torch.uint8, device=dev)
            y = torch.empty((sh.M, sh.N), dtype=torch.float16, device=dev)

            def call():
                rc = lib.vitq_quant_linear_a4_prepared(xt.data_ptr(), wq.data_ptr(), wst.data_ptr(), bt.data_ptr(),
                                                       y.data_ptr(), pg.OUT_F16, sh.M, sh.N, sh.K, ctypes.c_float(s),
                                                       dyn, gs, path, work.data_ptr(), stream)
                assert rc == 0, rc

            for _ in range(3):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    call()
                torch.cuda.synchronize()
            per = collections.defaultdict(list)
            for ev in prof.events():
                if ev.device_type == torch.autograd.DeviceType.CUDA:
                    name = ("quantize_rows" if "quantize_rows" in ev.name or "quantize_groups" in ev.name
                            else "qgemm" if "qgemm" in ev.name else ev.name)
                    per[name].append(ev.device_time)
            row = {"layer": f"{sh.model}.{sh.layer}", "M": sh.M, "K": sh.K, "N": sh.N, "dynamic": mode,
                   **{k: float(np.median(v)) for k, v in per.items()}}
            rows.append(row)
            print(row, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print("| layer | M | K | N | dyn | quantize_rows us | qgemm us |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['M']} | {r['K']} | {r['N']} | {r['dynamic']} | {r.get('quantize_rows', 0):.1f} | "
              f"{r.get('qgemm', 0):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
