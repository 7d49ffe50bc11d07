"""Re-quantize a MixA-Q recipe's dynamic low branch per group: the same ratios, weights and high branch, with each
low-branch Linear input's dynamic grid split into groups of G features (``"group": G``; attention operands stay per
token), and with ``--softmax log`` the low branch's post-softmax operand on the log-sqrt(2) grid per query row
(``"dynamic": "log_sqrt2"``, what ``--mixa-low-softmax log`` compiles). Bit-operations are unchanged (the
activations stay at the low bits).

    python bench/mixa_group_variant.py RECIPE.json [--group 32] [--softmax log] [--out OUT.json]

``--group 0`` leaves the Linear inputs as they are.
The weights file (which must sit next to its recipe) is copied next to the output when that is another folder. Score the result with
``bench/realizations.py`` or ``bench/qdq_agreement.py``; compile it with ``vitq compile MODEL --recipe OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def group_variant(d: dict, group: int) -> tuple[dict, int]:
    """(the recipe dict with grouped low-branch Linear inputs, how many quantizers changed)."""
    if not d.get("mixa"):
        raise SystemExit("not a MixA-Q recipe (no mixa section)")
    n = 0
    for l in d["mixa"]["layers"]:
        low = l.get("low")
        if low and low.get("kind") == "linear" and (low.get("input") or {}).get("dynamic"):
            low["input"]["group"] = group
            n += 1
    if not n:
        raise SystemExit("no dynamic low-branch Linear inputs (compile with --mixa-low-quant dynamic)")
    d["mixa"].setdefault("info", {})["low_group"] = group
    return d, n


def softmax_variant(d: dict) -> tuple[dict, int]:
    """(the recipe dict with the low branch's dynamic post-softmax operands on the log-sqrt(2) grid, how many)."""
    if not d.get("mixa"):
        raise SystemExit("not a MixA-Q recipe (no mixa section)")
    n = 0
    for l in d["mixa"]["layers"]:
        low = l.get("low")
        if low and low.get("kind") == "attn" and (low.get("attn") or {}).get("dynamic"):
            low["attn"] = {"bits": low["attn"]["bits"], "dynamic": "log_sqrt2", "method": "dynamic"}
            n += 1
    if not n:
        raise SystemExit("no dynamic low-branch post-softmax operands (compile with --mixa-low-quant dynamic and "
                         "the attention routed)")
    d["mixa"].setdefault("info", {})["low_softmax"] = "log"
    return d, n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--group", type=int, default=32, help="0: keep the Linear inputs' grids")
    ap.add_argument("--softmax", choices=("keep", "log"), default="keep")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    d = json.loads(args.recipe.read_text())
    n = m = 0
    tag = ""
    if args.group:
        d, n = group_variant(d, args.group)
        tag += f"_g{args.group}"
    if args.softmax == "log":
        d, m = softmax_variant(d)
        tag += "_logsm"
    if not tag:
        raise SystemExit("nothing to change: give --group G and/or --softmax log")
    out = args.out or args.recipe.with_name(f"{args.recipe.stem}{tag}.json")
    w = d.get("weights")
    if w and w.get("file") and out.parent.resolve() != args.recipe.parent.resolve():
        shutil.copy2(args.recipe.parent / w["file"], out.parent / w["file"])
    d["name"] = f"{d.get('name', args.recipe.stem)}{tag}"
    out.write_text(json.dumps(d, indent=1))
    print(f"{out}: {n} low-branch Linear inputs grouped by {args.group}, {m} post-softmax operands on the log grid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
