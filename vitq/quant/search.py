"""Per-layer scale searches that minimize a layer's *output* error (the quantity accuracy depends on).

Each candidate activation scale (min/max, percentiles, tensor-MSE, and a grid of clip fractions) is scored by
``|| fq(X) fq(W)^T - X W^T ||^2`` on cached calibration tokens; the winner's observer name goes into the recipe
(``search`` for a grid point that beat every named observer). Where allowed, shifted grids (schema ``shift``: an
asymmetric range on a symmetric quantizer) compete with the symmetric ones. Weights: per-channel (or per-group)
MSE clipping, for sub-8-bit Linear weights each input feature's error weighted by the input Hessian's diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import observers as ob
from .functional import fake_quant

MAX_SEARCH_TOKENS = 1024
SHIFT_MAX_BITS = 8  # activations at up to this many bits may take a shifted grid (all, by default)


def subsample(x: torch.Tensor, n: int = MAX_SEARCH_TOKENS) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.linspace(0, x.shape[0] - 1, n).round().long()
    return x[idx]


@dataclass
class ActChoice:
    scale: torch.Tensor  # [1]
    method: str
    err: float  # output squared error
    ref: float  # output energy (for SQNR)
    shift: int = 0  # grid shift in steps (schema ``shift``)


def act_candidates(x: torch.Tensor, bits: int, amax: float, fast: bool = False,
                   shifted: bool = False) -> list[tuple[str, torch.Tensor, int]]:
    """Named candidate per-tensor ``(name, scale, shift)`` for ``x`` (amax: the max over all calibration data);
    with ``shifted`` also the shifted grids of :func:`shifted_candidates`."""
    c = [("minmax", ob.scale_from_clip(amax, bits).reshape(1)),
         ("mse", ob.act_mse(x, bits, grid=ob.clip_grid(16 if fast else 40, 0.05), amax=amax))]
    if not fast:
        c.append(("percentile", ob.act_percentile(x, bits, 99.99)))
        c.append(("percentile", ob.act_percentile(x, bits, 99.9)))
        for r in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
            c.append(("search", ob.scale_from_clip(amax * r, bits).reshape(1)))
    out = [(n, s, 0) for n, s in c]
    if shifted:
        out += shifted_candidates(x, bits, amax, fast)
    return out


SHIFT_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)


def shifted_candidates(x: torch.Tensor, bits: int, amax: float, fast: bool = False,
                       fractions=SHIFT_FRACTIONS) -> list[tuple[str, torch.Tensor, int]]:
    """Shifted grids (all ``2^bits`` levels on the data's range, zero point realized by the schema's ``shift``):
    non-negative data (post-softmax, OPT-m's positive region): ``shift = 2^(bits-1)``, grid ``0..(2^bits-1)*s``;
    non-positive data: ``shift = -(2^(bits-1)-1)``; otherwise the asymmetric range ``[lo, hi]``, each over clip
    fractions of the range (the best by quantization MSE is named ``mse``)."""
    n = (1 << bits) - 1
    half = 1 << (bits - 1)
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0:
        hi = max(hi, float(amax))
    if hi <= 0:
        lo = min(lo, -float(amax))
    if hi - lo <= 0:
        return []
    grid = ob.clip_grid(16 if fast else 40, 0.05).tolist()
    cands = []
    for r in sorted(set(list(fractions) + grid), reverse=True):
        if lo >= 0:
            s, sh = hi * r / n, half
        elif hi <= 0:
            s, sh = -lo * r / n, -(half - 1)
        else:
            s = (hi - lo) * r / n
            sh = int(round(lo * r / s)) + half
            sh = max(-half, min(half, sh))
            if sh == 0:
                continue
        cands.append((r, torch.tensor([max(s, ob.EPS)], dtype=torch.float32), sh))
    if not cands:
        return []
    errs = [float((fake_quant(x, s, bits, sh) - x).pow(2).sum()) for _, s, sh in cands]
    k = min(range(len(cands)), key=errs.__getitem__)
    out = [("mse", cands[k][1], cands[k][2])]
    out += [("minmax" if r == 1.0 else "search", s, sh) for r, s, sh in cands if r in fractions]
    return out


def best_act_scale(x: torch.Tensor, bits: int, amax: float, out_fn, ref: torch.Tensor,
                   fast: bool = False, shifted: bool = False) -> ActChoice:
    """``out_fn(xq)`` maps a fake-quantized input to the layer output to compare with ``ref``."""
    best = None
    ref_e = float(ref.double().pow(2).sum())
    for name, s, sh in act_candidates(x, bits, amax, fast, shifted):
        err = float((out_fn(fake_quant(x, s, bits, sh)) - ref).double().pow(2).sum())
        if best is None or err < best.err:
            best = ActChoice(s, name, err, ref_e, sh)
    return best


@dataclass
class LinearChoice:
    w_scale: torch.Tensor
    a: ActChoice


def hessian_diag(x: torch.Tensor) -> torch.Tensor:
    """The diagonal of a Linear's input Hessian ``E[x x^T]`` from its input tokens ``x`` [T, C] -> [C]."""
    return x.reshape(-1, x.shape[-1]).double().pow(2).mean(0)


def search_linear(x: torch.Tensor, w: torch.Tensor, wbits: int, abits: int, amax: float,
                  fast: bool = False, shifted: bool = False, group: int = 0) -> LinearChoice:
    """Weight (per-channel, or per-``group``, MSE) and input scale for a Linear (``w`` [O, C]) with input tokens
    ``x`` [T, C]."""
    ws = ob.weight_mse(w, wbits, grid=ob.clip_grid(8, 0.5) if fast else ob.clip_grid(30, 0.4), group=group)
    wq = ob.fake_quant_weight(w, ws, wbits)
    ref = x @ w.t()
    a = best_act_scale(x, abits, amax, lambda xq: xq @ wq.t(), ref, fast, shifted)
    return LinearChoice(ws, a)


def search_conv(x: torch.Tensor, conv: torch.nn.Conv2d, wbits: int, abits: int, amax: float) -> LinearChoice:
    w = conv.weight.detach()
    ws = ob.weight_mse(w, wbits)
    wq = ob.fake_quant_weight(w, ws, wbits)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    ref = F.conv2d(x, w, None, **kw)
    a = best_act_scale(x, abits, amax, lambda xq: F.conv2d(xq, wq, None, **kw), ref)
    return LinearChoice(ws, a)


def search_attn(samples: dict, amax: dict, bits: dict, shifted: bool = False) -> dict[str, ActChoice]:
    """Scales for q, k (scored on ``q @ k^T``) and attn, v (scored on ``attn @ v``); each operand searched with
    the other one already quantized (q first with k float, then k with q quantized; same for attn, v). With
    ``shifted`` the post-softmax ``attn`` may take a shifted (unsigned) grid; the graph adds ``c * colsum(v)``."""
    q, k, a, v = (samples[r] for r in ("q", "k", "attn", "v"))
    out = {}
    ref = q @ k.transpose(-2, -1)
    out["q"] = best_act_scale(q, bits["q"], amax["q"], lambda t: t @ k.transpose(-2, -1), ref)
    qq = fake_quant(q, out["q"].scale, bits["q"])
    out["k"] = best_act_scale(k, bits["k"], amax["k"], lambda t: qq @ t.transpose(-2, -1), ref)
    ref = a @ v
    out["attn"] = best_act_scale(a, bits["attn"], amax["attn"], lambda t: t @ v, ref, shifted=shifted)
    aq = fake_quant(a, out["attn"].scale, bits["attn"], out["attn"].shift)
    out["v"] = best_act_scale(v, bits["v"], amax["v"], lambda t: aq @ t, ref)
    return out
