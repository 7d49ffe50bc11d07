"""Per-layer scale searches that minimize a layer's *output* error (the quantity accuracy depends on).

Each candidate activation scale (min/max, percentiles, tensor-MSE, and a grid of clip fractions) is scored by
``|| fq(X) fq(W)^T - X W^T ||^2`` on cached calibration tokens; the winner's observer name goes into the recipe
(``search`` for a grid point that beat every named observer). Weights: per-channel MSE clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import observers as ob
from .functional import fake_quant

MAX_SEARCH_TOKENS = 1024


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


def act_candidates(x: torch.Tensor, bits: int, amax: float, fast: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Named candidate per-tensor scales for ``x`` (amax: the max over all calibration data)."""
    c = [("minmax", ob.scale_from_clip(amax, bits).reshape(1)),
         ("mse", ob.act_mse(x, bits, grid=ob.clip_grid(16 if fast else 40, 0.05), amax=amax))]
    if not fast:
        c.append(("percentile", ob.act_percentile(x, bits, 99.99)))
        c.append(("percentile", ob.act_percentile(x, bits, 99.9)))
        for r in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3):
            c.append(("search", ob.scale_from_clip(amax * r, bits).reshape(1)))
    return c


def best_act_scale(x: torch.Tensor, bits: int, amax: float, out_fn, ref: torch.Tensor,
                   fast: bool = False) -> ActChoice:
    """``out_fn(xq)`` maps a fake-quantized input to the layer output to compare with ``ref``."""
    best = None
    ref_e = float(ref.double().pow(2).sum())
    for name, s in act_candidates(x, bits, amax, fast):
        err = float((out_fn(fake_quant(x, s, bits)) - ref).double().pow(2).sum())
        if best is None or err < best.err:
            best = ActChoice(s, name, err, ref_e)
    return best


@dataclass
class LinearChoice:
    w_scale: torch.Tensor
    a: ActChoice


def search_linear(x: torch.Tensor, w: torch.Tensor, wbits: int, abits: int, amax: float,
                  fast: bool = False) -> LinearChoice:
    """Weight (per-channel MSE) and input scale for a Linear (``w`` [O, C]) with input tokens ``x`` [T, C]."""
    ws = ob.weight_mse(w, wbits, grid=ob.clip_grid(8, 0.5) if fast else ob.clip_grid(30, 0.4))
    wq = ob.fake_quant_weight(w, ws, wbits)
    ref = x @ w.t()
    a = best_act_scale(x, abits, amax, lambda xq: xq @ wq.t(), ref, fast)
    return LinearChoice(ws, a)


def search_conv(x: torch.Tensor, conv: torch.nn.Conv2d, wbits: int, abits: int, amax: float) -> LinearChoice:
    w = conv.weight.detach()
    ws = ob.weight_mse(w, wbits)
    wq = ob.fake_quant_weight(w, ws, wbits)
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    ref = F.conv2d(x, w, None, **kw)
    a = best_act_scale(x, abits, amax, lambda xq: F.conv2d(xq, wq, None, **kw), ref)
    return LinearChoice(ws, a)


def search_attn(samples: dict, amax: dict, bits: dict) -> dict[str, ActChoice]:
    """Scales for q, k (scored on ``q @ k^T``) and attn, v (scored on ``attn @ v``); each operand searched with
    the other one already quantized (q first with k float, then k with q quantized; same for attn, v)."""
    q, k, a, v = (samples[r] for r in ("q", "k", "attn", "v"))
    out = {}
    ref = q @ k.transpose(-2, -1)
    out["q"] = best_act_scale(q, bits["q"], amax["q"], lambda t: t @ k.transpose(-2, -1), ref)
    qq = fake_quant(q, out["q"].scale, bits["q"])
    out["k"] = best_act_scale(k, bits["k"], amax["k"], lambda t: qq @ t.transpose(-2, -1), ref)
    ref = a @ v
    out["attn"] = best_act_scale(a, bits["attn"], amax["attn"], lambda t: t @ v, ref)
    aq = fake_quant(a, out["attn"].scale, bits["attn"])
    out["v"] = best_act_scale(v, bits["v"], amax["v"], lambda t: aq @ t, ref)
    return out
