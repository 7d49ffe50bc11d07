"""Scale observers for symmetric quantizers (zero point 0).

Activations are per tensor: ``minmax`` (``max|x| / qmax``), ``percentile`` (the p-th percentile of ``|x|``),
``mse`` (the clipping value on a grid of fractions of ``max|x|`` that minimizes ``||fake_quant(x) - x||^2``).
Weights are per output channel (axis 0), or per group of consecutive input features of a row (``group``):
``minmax`` and ``mse`` (per-row clipping search).

The scale for a clipping value ``c`` is ``c / qmax`` with ``qmax = 2^(bits-1) - 1``; all error evaluation uses
:func:`vitq.quant.functional.fake_quant`, so what an observer optimizes is what the graph computes.
"""

from __future__ import annotations

import torch

from .functional import fake_quant, qrange, weight_scale_map

EPS = 1e-8


def qmax(bits: int) -> int:
    return qrange(bits)[1]


def scale_from_clip(clip: torch.Tensor | float, bits: int) -> torch.Tensor:
    clip = torch.as_tensor(clip, dtype=torch.float32)
    return torch.clamp(clip / qmax(bits), min=EPS)


def clip_grid(n: int = 40, lo: float = 0.2) -> torch.Tensor:
    """Clipping fractions of max|x| from 1 down to ``lo`` (denser near 1)."""
    return torch.linspace(1.0, lo, n)


# ---- activations (per tensor) ----

def act_minmax(x: torch.Tensor, bits: int) -> torch.Tensor:
    return scale_from_clip(x.detach().abs().max(), bits).reshape(1)


def act_percentile(x: torch.Tensor, bits: int, p: float = 99.99) -> torch.Tensor:
    a = x.detach().abs().flatten().float()
    if a.numel() > 4_000_000:
        a = a[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
    k = max(1, min(a.numel(), int(round(a.numel() * p / 100.0))))
    c = torch.kthvalue(a, k).values
    return scale_from_clip(c, bits).reshape(1)


def act_mse(x: torch.Tensor, bits: int, grid: torch.Tensor | None = None, amax: float | None = None) -> torch.Tensor:
    """Per-tensor scale minimizing the quantization MSE of ``x`` over clip fractions of ``amax`` (default
    ``max|x|``)."""
    x = x.detach().float()
    amax = float(x.abs().max()) if amax is None else float(amax)
    if amax <= 0:
        return scale_from_clip(1.0, bits).reshape(1)
    grid = clip_grid() if grid is None else grid
    best, best_s = None, None
    for r in grid.tolist():
        s = scale_from_clip(amax * r, bits)
        err = float((fake_quant(x, s, bits) - x).pow(2).sum())
        if best is None or err < best:
            best, best_s = err, s
    return best_s.reshape(1)


def act_scale(x: torch.Tensor, bits: int, method: str, **kw) -> torch.Tensor:
    if method == "minmax":
        return act_minmax(x, bits)
    if method == "percentile":
        return act_percentile(x, bits, **kw)
    if method == "mse":
        return act_mse(x, bits, **kw)
    raise ValueError(f"unknown activation observer {method!r}")


# ---- weights (per output channel, axis 0) ----

def _rows(w: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` as rows that each get one scale: [O, C], or [O * C/group, group] (``group`` consecutive inputs)."""
    w2 = w.detach().reshape(w.shape[0], -1).float()
    return w2.reshape(-1, group) if group else w2


def weight_minmax(w: torch.Tensor, bits: int, group: int = 0) -> torch.Tensor:
    amax = _rows(w, group).abs().amax(dim=1)
    return scale_from_clip(amax, bits)


def weight_mse(w: torch.Tensor, bits: int, grid: torch.Tensor | None = None, p: float = 2.0,
               group: int = 0, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel scales (or per ``group`` consecutive inputs of a row: [O * C/group]): for each row the
    clip fraction (of the row's max|w|) minimizing ``sum |fake_quant(w) - w|^p``, each input column weighted by
    ``col_weight`` [C] when given (the diagonal of the layer's input Hessian: an error on a feature that carries
    more signal costs more output error)."""
    w2 = _rows(w, group)
    cw = None
    if col_weight is not None:
        cw = col_weight.float().reshape(1, -1).expand(w.shape[0], -1).reshape(w2.shape)
    amax = w2.abs().amax(dim=1)
    grid = clip_grid(50, 0.3) if grid is None else grid
    best_err = torch.full((w2.shape[0],), float("inf"))
    best_s = scale_from_clip(amax, bits)
    for r in grid.tolist():
        s = scale_from_clip(amax * r, bits)
        err = (fake_quant(w2, s[:, None], bits) - w2).abs().pow(p)
        err = (err if cw is None else err * cw).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


def weight_scale(w: torch.Tensor, bits: int, method: str = "mse") -> torch.Tensor:
    if method == "minmax":
        return weight_minmax(w, bits)
    if method == "mse":
        return weight_mse(w, bits)
    raise ValueError(f"unknown weight observer {method!r}")


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake quantization of a Linear/Conv weight, per output channel or per group (:func:`weight_scale_map`)."""
    return fake_quant(w, weight_scale_map(scale, w), bits)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - test|^2)`` in dB."""
    num = float(ref.double().pow(2).sum())
    den = float((ref.double() - test.double()).pow(2).sum())
    if den <= 0:
        return float("inf")
    import math

    return 10.0 * math.log10(max(num, 1e-30) / den)
