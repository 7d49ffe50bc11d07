"""Where a MixA-Q recipe's low branch loses accuracy: one role at a time raised to 8 bits, in simulation (DeiT-Tiny).

    python bench/mixa_low_ablation.py RECIPE.json [--roles qkv,proj,fc1,fc2,qk,attn,v] [--base w4a8]
                                      [--out bench/results/mixa_low_ablation.json]

Same ratios and weights. For each variant the low branch's quantizer of one role (a Linear's input: ``qkv``,
``proj``, ``fc1``, ``fc2``; an attention operand: ``qk`` (q and k), ``attn``, ``v``) becomes dynamic per token
at 8 bits in every routed block; everything else stays as the recipe says. The KL(fp32 || q) each variant removes
is that role's share of what the low branch adds; the bit-operation reduction each variant keeps is printed beside
it (raising a role costs reduction). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from realizations import dev650_scoring  # noqa: E402
from vitq.mixa.bitops import mixa_bitops  # noqa: E402
from vitq.mixa.sim import MixaSim  # noqa: E402
from vitq.recipe.mixa import MixaSpec  # noqa: E402
from vitq.quant.pipeline import apply_recipe  # noqa: E402
from vitq.recipe.schema import QuantSpec, Recipe  # noqa: E402

LINEAR_ROLES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
ATTN_ROLES = {"qk": ("q", "k"), "attn": ("attn",), "v": ("v",)}


def raised(spec: MixaSpec, role: str, bits: int = 8) -> MixaSpec:
    """``spec`` with the low branch's ``role`` quantizer dynamic per token at ``bits`` in every routed layer."""
    out = copy.deepcopy(spec)
    for l in out.layers:
        if l.low is None:
            continue
        if role in LINEAR_ROLES and l.module.endswith("." + LINEAR_ROLES[role]) and l.low.input is not None:
            l.low.input, l.low.input_regions = QuantSpec.dynamic_token(bits), None
        elif role in ATTN_ROLES and l.low.kind == "attn":
            for r in ATTN_ROLES[role]:
                if getattr(l.low, r) is not None:
                    setattr(l.low, r, QuantSpec.dynamic_token(bits))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--roles", default="qkv,proj,fc1,fc2,qk,attn,v")
    ap.add_argument("--base", default="w4a8", help="base recipe in bench/results/recipes ('' to skip)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mixa_low_ablation.json"))
    args = ap.parse_args(argv)
    roles = [r for r in args.roles.split(",") if r]
    bad = [r for r in roles if r not in LINEAR_ROLES and r not in ATTN_ROLES]
    if bad:
        ap.error(f"--roles: unknown {', '.join(bad)} (known: {', '.join([*LINEAR_ROLES, *ATTN_ROLES])})")
    lm, score, base_row = dev650_scoring(args.base)
    rows = []
    if base_row:
        rows.append({**base_row, "reduction": 1.0})
        print(rows[-1], flush=True)
    rec = Recipe.load(args.recipe)
    _, sim = apply_recipe(lm.model, lm.family, rec)
    spec = rec.mixa
    for name in ["as is", *roles]:
        t = time.time()
        s = spec if name == "as is" else raised(spec, name)
        rows.append({"variant": name if name == "as is" else f"{name} at 8",
                     "reduction": mixa_bitops(rec, s)["reduction"], **score(MixaSim(sim, s)),
                     "s": round(time.time() - t, 1)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": str(args.recipe), "images": "dev650", "rows": rows}, indent=1))
    print(f"\n{args.recipe.name}, dev650\n| variant | reduction | top-1 | agreement | KL |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['reduction']:.3f}x | {r['top1']:.2f} | {r['agreement_fp32']:.2f} | "
              f"{r['kl_fp32']:.4f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
