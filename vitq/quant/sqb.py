"""SQ-b: shift-and-scale smoothing of LayerNorm-fed Linear inputs (qkv, fc1, Swin ``downsample.reduction``).

Per input channel ``j``: shift ``z_j = (max_j + min_j) / 2`` (midpoint of the channel's calibration range) and
scale ``s_j = max|X_j - z_j|^alpha / max_i |W_ij|^(1 - alpha)`` (max over output rows of every Linear the
LayerNorm feeds). Folding (exact in float):

    LayerNorm: gamma' = gamma / s,  beta' = (beta - z) / s         ->  X' = (X - z) / s
    Linear:    W' = W * s (per input column),  b' = b + W z         ->  X' W'^T + b' = X W^T + b

``alpha`` is searched per group on calibration tokens (grid 0.3..0.8), minimizing the quantized output error of
the Linear(s); "no smoothing" is a candidate too and wins when smoothing does not help (then no ``smooth`` is
recorded). If the LayerNorm feeds several Linears they share ``z, s`` (one LN output) and the error is summed.
Groups whose parameters are shared with any other module (tied weights) are skipped: folding would change the
other user.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .search import search_linear, subsample

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
S_MIN, S_MAX = 1e-4, 1e4


def smooth_params(chmin: torch.Tensor, chmax: torch.Tensor, weights: list[torch.Tensor],
                  alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` per input channel."""
    z = (chmax + chmin) / 2
    r = ((chmax - chmin) / 2).clamp(min=1e-6)
    wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-6)
    s = (r.pow(alpha) / wmax.pow(1 - alpha)).clamp(S_MIN, S_MAX)
    return s, z


@torch.no_grad()
def fold_smoothing(ln: nn.LayerNorm, linears: list[nn.Linear], s: torch.Tensor, z: torch.Tensor) -> None:
    """Fold ``(s, z)`` into ``ln`` and its consumer ``linears`` in place (float-exact)."""
    if ln.weight is None or ln.bias is None:
        raise ValueError("SQ-b needs an affine LayerNorm")
    ln.weight.copy_(ln.weight / s)
    ln.bias.copy_((ln.bias - z) / s)
    for lin in linears:
        w = lin.weight.detach().clone()
        shift = w @ z
        if lin.bias is None:
            lin.bias = nn.Parameter(shift.clone(), requires_grad=False)
        else:
            lin.bias.copy_(lin.bias + shift)
        lin.weight.copy_(w * s[None, :])


def shared_params(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module path (tied weights)."""
    seen: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def group_foldable(model: nn.Module, ln_name: str, lin_names: list[str], shared: set[int]) -> str | None:
    """None if the group can be folded, else the reason it is skipped."""
    ln = model.get_submodule(ln_name)
    if not isinstance(ln, nn.LayerNorm) or ln.weight is None or ln.bias is None:
        return "not an affine LayerNorm"
    mods = [ln] + [model.get_submodule(n) for n in lin_names]
    if any(id(p) in shared for m in mods for p in m.parameters(recurse=False)):
        return "shared (tied) parameters"
    return None


@dataclass
class SmoothChoice:
    alpha: float | None  # None: no smoothing
    s: torch.Tensor | None
    z: torch.Tensor | None
    err: float
    err_plain: float


def search_alpha(x: torch.Tensor, chmin: torch.Tensor, chmax: torch.Tensor, weights: list[torch.Tensor],
                 wbits: int, abits: int, alphas=ALPHAS) -> SmoothChoice:
    """Pick alpha (or no smoothing) minimizing the summed quantized output error over the consumer Linears."""
    x = subsample(x, 512)

    def err_of(xs, ws, amax):
        return sum(search_linear(xs, w, wbits, abits, amax, fast=True).a.err for w in ws)

    plain = err_of(x, weights, float(torch.maximum(chmax.abs(), chmin.abs()).max()))
    best = SmoothChoice(None, None, None, plain, plain)
    for a in alphas:
        s, z = smooth_params(chmin, chmax, weights, a)
        xs = (x - z) / s
        amax = float((torch.maximum((chmax - z).abs(), (chmin - z).abs()) / s).max())
        e = err_of(xs, [w * s[None, :] for w in weights], amax)
        if e < best.err:
            best = SmoothChoice(a, s, z, e, plain)
    return best
