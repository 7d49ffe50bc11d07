"""Bit-operation accounting.

Per layer and image: ``bitops = macs * w_bits * a_bits`` for Linear/Conv (OPT-m layers count once at the wider
region's bits: the two region GEMMs partition the input, so their useful MACs add up to one GEMM); attention
``macs`` covers both matmuls (``q @ k^T`` and ``attn @ v``, equal halves for self-attention) and counts
``macs/2 * bits(q) * bits(k) + macs/2 * bits(attn) * bits(v)``. Unquantized operands count 32 bits.

``fp32_equivalent = total_macs * 32 * 32``. The **average bit-width** of a recipe is the uniform bit-width with
the same bit-operations: ``avg_bits = sqrt(total_bitops / total_macs)`` (w8a8 -> 8, w4a4 -> 4, w4a8 -> 5.66);
this is what ``mp:<bits>`` targets.
"""

from __future__ import annotations

import math

from ..recipe.schema import LayerSpec, Recipe


def _b(spec) -> int:
    return spec.bits if spec is not None else 32


def layer_bitops(l: LayerSpec) -> int:
    if l.kind == "attn":
        half = l.macs / 2
        return int(half * _b(l.q) * _b(l.k) + half * _b(l.attn) * _b(l.v))
    a = l.act_bits or 32
    return int(l.macs * _b(l.weight) * a)


def bitops_report(recipe: Recipe, base: tuple[int, int] = (8, 8)) -> dict:
    """``{"total", "fp32_equivalent", "ratio" (vs fp32), "ratio_vs_base" (vs uniform ``base``), "avg_bits",
    "total_macs", "per_layer": [{module, macs, w_bits, a_bits, bitops}]}``."""
    per = []
    total = macs = 0
    for l in recipe.layers:
        bo = layer_bitops(l)
        total += bo
        macs += l.macs
        per.append({"module": l.module, "kind": l.kind, "macs": int(l.macs), "w_bits": l.weight_bits,
                    "a_bits": l.act_bits, "bitops": bo})
    fp32 = macs * 32 * 32
    base_total = macs * base[0] * base[1]
    return {"total": int(total), "fp32_equivalent": int(fp32), "ratio": total / fp32 if fp32 else 0.0,
            "ratio_vs_base": total / base_total if base_total else 0.0, "base": f"w{base[0]}a{base[1]}",
            "avg_bits": math.sqrt(total / macs) if macs else 0.0, "total_macs": int(macs), "per_layer": per}


def avg_bits(recipe: Recipe) -> float:
    return bitops_report(recipe)["avg_bits"]
