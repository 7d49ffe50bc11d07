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

from . import observers as ob
from .functional import fake_quant
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


def fold_v_smoothing(attn: nn.Module, s: torch.Tensor) -> None:
    """Fold per-channel ``s`` between the attention output and ``attn.proj`` (float-exact): the ``v`` rows of
    ``attn.qkv`` (output rows ``2C + j``) are divided by ``s_j``, column ``j`` of ``proj`` multiplied by it."""
    qkv, proj = attn.qkv, attn.proj
    c = proj.in_features
    if qkv.out_features != 3 * c or s.numel() != c:
        raise ValueError(f"v smoothing needs qkv [3C, *] and proj [*, C] (C = {c}), got qkv {tuple(qkv.weight.shape)}")
    qkv.weight[2 * c:].copy_(qkv.weight[2 * c:] / s[:, None])
    if qkv.bias is not None:
        qkv.bias[2 * c:].copy_(qkv.bias[2 * c:] / s)
    proj.weight.copy_(proj.weight * s[None, :])


def v_smoothing_candidates(x_amax: torch.Tensor, w: torch.Tensor, alphas=(0.25, 0.5, 0.75)):
    """``(alpha, s)`` per candidate: ``s = max|X_j|^alpha / max|W_:,j|^(1-alpha)``, normalized to geometric mean 1."""
    out = []
    wmax = w.detach().abs().amax(0).clamp(min=1e-5)
    for a in alphas:
        sc = x_amax.clamp(min=1e-5) ** a / wmax ** (1 - a)
        sc = sc / sc.log().mean().exp()
        out.append((a, sc.clamp(1e-3, 1e3)))
    return out


@dataclass
class VSmoothChoice:
    alpha: float | None  # None: not smoothed (no candidate lowered the error)
    s: torch.Tensor | None
    err: float
    err_plain: float
    reason: str


def _v_proj_error(a: torch.Tensor, v: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor,
                  wbits: int, abits: int) -> float:
    """Relative proj-output error from quantizing the proj input ``x / s`` (with ``W * s``) plus the one from
    quantizing ``v / s`` per tensor (through ``attn @`` and ``proj``): what the smoothing trades."""
    heads, hd = v.shape[1], v.shape[3]
    sv = s.reshape(1, heads, 1, hd)
    ws = w * s[None, :]
    xs = x / s[None, :]
    ex = search_linear(xs, ws, wbits, abits, float(xs.abs().max()), fast=True, shifted=True).a
    vs = v / sv
    qv = fake_quant(vs, ob.act_mse(vs, abits), abits)

    def out(t):  # [n, H, N, hd] -> proj output [n*N, O]
        return (a @ t * sv).permute(0, 2, 1, 3).reshape(-1, heads * hd) @ ws.t()

    ref = out(vs)
    ev = float((out(qv) - ref).double().pow(2).sum()) / max(float(ref.double().pow(2).sum()), 1e-30)
    return ex.err / max(ex.ref, 1e-30) + ev


def search_v_smoothing(att_stats, proj_stats, w: torch.Tensor, wbits: int, abits: int,
                       alphas=(0.25, 0.5, 0.75)) -> VSmoothChoice:
    """Pick ``alpha`` (or none) for the v -> proj smoothing by :func:`_v_proj_error` on the calibration samples."""
    a, v = att_stats.sample("attn"), att_stats.sample("v")
    x = subsample(proj_stats.sample)
    amax = torch.maximum(proj_stats.chmin.abs(), proj_stats.chmax.abs())
    one = torch.ones(w.shape[1])
    plain = _v_proj_error(a, v, x, w, one, wbits, abits)
    best = (plain, None, None)
    for al, sc in v_smoothing_candidates(amax, w, alphas):
        e = _v_proj_error(a, v, x, w, sc, wbits, abits)
        if e < best[0]:
            best = (e, al, sc)
    e, al, sc = best
    reason = (f"alpha={al}" if al is not None else "off (no gain)") + f" err {e:.4g} vs {plain:.4g}"
    return VSmoothChoice(al, sc, e, plain, reason)


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
