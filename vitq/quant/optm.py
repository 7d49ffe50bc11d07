"""OPT-m: region-wise scales for post-GELU activations (fc2 inputs).

The input is split ``x = relu(x) + min(x, 0)``; each region has its own per-tensor symmetric quantizer
(schema ``input_regions``): ``pos`` (scale ``s_p``, uses the grid ``0..qmax``) and ``neg`` (scale ``s_n``, uses
``qmin..0``; GELU's negative lobe is >= -0.17 so ``s_n`` is far finer). ``m = s_p / s_n`` is searched per layer:
``s_p`` minimizes the fc2 output error of the positive part, then ``s_n = s_p / m`` over a grid of ``m`` (powers of
two and the values implied by clip fractions of ``|min x|``) minimizing the full fc2 output error
``|| (fq_p(relu x) + fq_n(min(x,0))) Wq^T - x W^T ||^2``.

The split costs a second GEMM in the graph, so it is kept only if it lowers the output error by at least
``MIN_GAIN`` (relative) versus the best plain ``input`` quantizer; the decision is returned for the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import observers as ob
from .functional import fake_quant, qrange
from .search import best_act_scale, search_linear, subsample

MIN_GAIN = 0.10


@dataclass
class RegionChoice:
    use: bool
    m: float
    pos_scale: torch.Tensor
    neg_scale: torch.Tensor
    err: float
    err_plain: float
    plain: object  # LinearChoice of the plain quantizer
    reason: str
    pos_shift: int = 0
    neg_shift: int = 0


def region_fq(x: torch.Tensor, sp, sn, bits_p: int, bits_n: int, shift_p: int = 0, shift_n: int = 0) -> torch.Tensor:
    """The OPT-m input as the graph computes it: ``fq_p(relu(x)) + fq_n(min(x, 0))``."""
    return fake_quant(torch.relu(x), sp, bits_p, shift_p) + fake_quant(torch.clamp(x, max=0.0), sn, bits_n, shift_n)


def search_regions(x: torch.Tensor, w: torch.Tensor, wbits: int, abits: int, amax: float,
                   xmin: float, shifted: bool = False, group: int = 0) -> RegionChoice:
    """With ``shifted`` each region may use its whole ``2^bits`` grid (positive: ``shift = 2^(bits-1)``,
    negative: ``shift = -(2^(bits-1)-1)``; zero stays exact) and the plain quantizer an asymmetric one."""
    x = subsample(x)
    plain = search_linear(x, w, wbits, abits, amax, shifted=shifted, group=group)
    wq = ob.fake_quant_weight(w, plain.w_scale, wbits)
    return fit_regions(x, w, wq, abits, amax, xmin, plain, plain.a.err, shifted)


def fit_regions(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor, abits: int, amax: float, xmin: float,
                plain, plain_err: float, shifted: bool = False) -> RegionChoice:
    """The region scales for a fixed quantized weight ``wq``, compared with a plain quantizer of error
    ``plain_err`` (``plain`` is returned as is)."""
    ref = x @ w.t()
    pos, neg = torch.relu(x), torch.clamp(x, max=0.0)
    neg_out = neg @ wq.t()
    pmax = max(float(pos.max()), 1e-8)
    pc = best_act_scale(pos, abits, max(amax, pmax), lambda t: t @ wq.t() + neg_out, ref, shifted=shifted)
    sp, hp = pc.scale, pc.shift
    pos_out = fake_quant(pos, sp, abits, hp) @ wq.t()
    nmax = max(-xmin, 1e-8)
    lo = -qrange(abits)[0]  # negative region uses qmin..0
    cands = [(float(sp) / 2 ** k, 0) for k in range(0, 13)]
    cands += [(nmax * r / lo, 0) for r in torch.linspace(1.0, 0.3, 15).tolist()]
    if shifted:
        full = (1 << abits) - 1
        cands += [(nmax * r / full, -(lo - 1)) for r in torch.linspace(1.0, 0.3, 15).tolist()]
    best = None
    for sn, hn in cands:
        s = torch.tensor([sn], dtype=torch.float32)
        e = float((pos_out + fake_quant(neg, s, abits, hn) @ wq.t() - ref).double().pow(2).sum())
        if best is None or e < best[0]:
            best = (e, s, hn)
    err, sn, hn = best
    use = err < (1.0 - MIN_GAIN) * plain_err
    reason = (f"split err {err:.4g} vs plain {plain_err:.4g} ("
              f"{100 * (1 - err / max(plain_err, 1e-30)):.1f}% lower)")
    return RegionChoice(bool(use), float(sp) / float(sn), sp.reshape(1), sn, err, plain_err, plain,
                        ("split: " if use else "plain kept: ") + reason, hp, hn)
