"""Bit-operation accounting for MixA-Q (extends :mod:`vitq.quant.bitops`).

Per routed block, with ``f_h``, ``f_l``, ``f_p`` the fractions of its tokens in the high, low and pruned groups
(ViT: prefix tokens count as high; Swin: fractions of windows):

* Linear: ``macs * (f_h * w_h * a_h + f_l * w_l * a_l)`` (pruned tokens cost nothing);
* ViT attention (global, per-token operand precision): ``q @ k^T`` costs ``macs/2 * E[b_q] * E[b_k]`` and
  ``attn @ v`` ``macs/2 * E[b_attn] * E[b_v]`` with ``E[b] = f_h b_h + f_l b_l`` over non-pruned tokens (a pruned
  token is neither query nor key), i.e. the sum over all (query, key) pairs of the product of their bits;
* Swin window attention: ``macs/2 * (f_h b_q^h b_k^h + f_l b_q^l b_k^l) + macs/2 * (...attn, v...)``.

Layers not routed (patch embed, head, Swin downsample, and the attention when ``attn`` is not routed) keep the
base recipe's bit-operations (:func:`vitq.quant.bitops.layer_bitops`). Float operands count 32 bits. The
reduction is ``base_total / mixa_total`` against the uniform base recipe.
"""

from __future__ import annotations

from ..quant.bitops import layer_bitops
from ..recipe.schema import LayerSpec, Recipe
from ..recipe.mixa import MixaBlock, MixaSpec


def _b(q) -> int:
    return q.bits if q is not None else 32


def _wa(s: LayerSpec | None) -> tuple[int, int]:
    if s is None:
        return 32, 32
    return _b(s.weight), (s.act_bits or 32)


def fractions(b: MixaBlock, prefix_tokens: int = 0, tokens_per_group: int = 1) -> tuple[float, float, float]:
    """(f_h, f_l, f_p) of a block's tokens (ViT: ``prefix_tokens`` always high)."""
    n = prefix_tokens + b.groups * tokens_per_group
    return ((prefix_tokens + b.n_high * tokens_per_group) / n, b.n_low * tokens_per_group / n,
            b.n_prune * tokens_per_group / n)


def routed_layer_bitops(macs: int, kind: str, high: LayerSpec | None, low: LayerSpec | None,
                        f: tuple[float, float, float], windows: bool) -> float:
    fh, fl, _ = f
    if kind != "attn":
        (wh, ah), (wl, al) = _wa(high), _wa(low)
        return macs * (fh * wh * ah + fl * wl * al)
    half = macs / 2
    bh = {r: _b(getattr(high, r)) if high is not None else 32 for r in ("q", "k", "attn", "v")}
    bl = {r: _b(getattr(low, r)) if low is not None else 32 for r in ("q", "k", "attn", "v")}
    if windows:
        return half * (fh * bh["q"] * bh["k"] + fl * bl["q"] * bl["k"]) + \
            half * (fh * bh["attn"] * bh["v"] + fl * bl["attn"] * bl["v"])
    e = {r: fh * bh[r] + fl * bl[r] for r in bh}
    return half * e["q"] * e["k"] + half * e["attn"] * e["v"]


def mixa_bitops(recipe: Recipe, spec: MixaSpec, *, prefix_tokens: int | None = None) -> dict:
    """``{"base_total", "total", "reduction", "per_block": {block: {"ratio", "n_low", "n_prune", "groups",
    "base", "mixa"}}}``. ``prefix_tokens``: ViT class/register tokens (default: the spec's; ignored for Swin)."""
    windows = spec.scheme == "windows"
    tpg = 1 if windows else spec.group[0] * spec.group[1]
    pre = 0 if windows else (spec.prefix if prefix_tokens is None else prefix_tokens)
    routed = {l.module: l for l in spec.layers}
    base_total = total = 0.0
    per_block: dict[str, dict] = {b.block: {"ratio": b.ratio, "n_low": b.n_low, "n_prune": b.n_prune,
                                            "groups": b.groups, "base": 0.0, "mixa": 0.0} for b in spec.blocks}
    for l in recipe.layers:
        bo = float(layer_bitops(l))
        base_total += bo
        blk = spec.block_of(l.module)
        if l.module in routed and blk is not None:
            m = routed[l.module]
            f = fractions(blk, pre, tpg)
            v = routed_layer_bitops(l.macs, l.kind, m.high, m.low, f, windows)
        elif blk is not None and blk.n_prune > 0:  # unrouted layer of a block with pruning: pruned tokens skip it
            fh, fl, fp = fractions(blk, pre, tpg)
            v = bo * (1 - fp) ** (2 if (l.kind == "attn" and not windows) else 1)
        else:
            v = bo
        total += v
        if blk is not None:
            per_block[blk.block]["base"] += bo
            per_block[blk.block]["mixa"] += v
    return {"base": spec.base or recipe.name, "base_total": base_total, "total": total,
            "reduction": base_total / total if total else 0.0, "per_block": per_block}
