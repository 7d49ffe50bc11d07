"""GPTQ: Hessian-aware rounding of per-output-channel symmetric weights, with error feedback.

For a Linear ``y = x W^T`` (``W`` [O, C]) and calibration inputs ``X`` [T, C] (the inputs the layer sees in the
*quantized* model: earlier layers already quantized, the layer's own input quantizer applied), GPTQ minimizes
``|| X (W - Wq)^T ||^2`` column by column: each input column ``j`` of ``W`` is rounded to the grid of its row's
scale ``s_o`` (``q = clamp(round(w / s), qmin, qmax)``, zero point 0: the deployable quantizer is unchanged) and
the rounding error is spread over the not yet quantized columns through the inverse Hessian
``H = 2 X^T X / T + damp * mean(diag H) I`` (Frantar et al., 2023; lazy block updates, optional act-order).

GPTQ changes the integer weights, not only the scales, so the calibrated model keeps the result as float weights
that are *exactly* ``q * s``: QuantSim and the Q/DQ graph quantize ``round(w / s)`` and recover ``q`` (the test
suite asserts ``round((q * s) / s) == q`` elementwise in float32). A recipe file carries these weights in a sidecar
(see :mod:`vitq.recipe.schema`, ``weights``).

Conv2d (the patch embedding) is handled as the Linear over unfolded patches (``weight.reshape(O, -1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import observers as ob
from .functional import qrange, weight_scale_map
from .prepare import Instrumented

DAMP = 0.01
BLOCK = 128


@dataclass
class GPTQResult:
    q: torch.Tensor  # integer grid values (float tensor), shape of w
    wq: torch.Tensor  # q * scale (float32): the weight QuantSim / insert_qdq re-quantize to exactly q
    err_rtn: float  # || X (W - Wq_rtn)^T ||^2 / T  (proxy via H)
    err_gptq: float


class Hessian:
    """Running ``sum x x^T`` over input tokens (float64), for a Linear (``x`` [..., C]) or a Conv2d (unfolded)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.conv = isinstance(module, torch.nn.Conv2d) or hasattr(module, "conv")
        self.h = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        if self.conv:
            c = self.module.conv if hasattr(self.module, "conv") else self.module
            x = F.unfold(x, c.kernel_size, c.dilation, c.padding, c.stride)  # [B, C*kh*kw, L]
            x = x.transpose(1, 2)
        x = x.reshape(-1, x.shape[-1]).float()
        h = (x.t() @ x).double()
        self.h = h if self.h is None else self.h + h
        self.n += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return 2 * self.h / max(self.n, 1)


def _rtn(w: torch.Tensor, s: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / s), lo, hi)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, bits: int, *, damp: float = DAMP,
                  block: int = BLOCK, act_order: bool = True) -> GPTQResult:
    """GPTQ for ``w`` [O, C(, kh, kw)] with per-output-channel ``scale`` [O] (or per group of inputs: [O * C'/g],
    :func:`~vitq.quant.functional.weight_scale_map`) and Hessian ``H`` [C', C'] (C' = ``w[0].numel()``). Returns
    the integer weights and ``q * scale``. Group scales are static (fixed before rounding), so act-order only
    changes the order columns are rounded in, not their grid."""
    shape = w.shape
    W = w.detach().reshape(shape[0], -1).double().clone()
    O, C = W.shape
    if H.shape != (C, C):
        raise ValueError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match the weight's {C} input columns")
    lo, hi = qrange(bits)
    s32 = weight_scale_map(scale.detach().float(), W.float()).expand(O, C).contiguous()  # [O, C]
    s = s32.double()
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H, s = W[:, perm], H[perm][:, perm], s[:, perm]
    W0 = W.clone()
    Hd = H + damp * torch.mean(torch.diag(H)) * torch.eye(C, dtype=H.dtype)
    L = torch.linalg.cholesky(Hd)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hi1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            d = Hi1[i, i]
            sc = s[:, i1 + i]
            q = torch.clamp(torch.round(col / sc), lo, hi)
            Q1[:, i] = q
            e = (col - q * sc) / d
            W1[:, i:] -= e[:, None] @ Hi1[i, i:][None, :]
            E1[:, i] = e
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]

    def err(Qm):
        D = W0 - Qm * s
        return float(((D @ H) * D).sum() / 2)

    e_g = err(Q)
    e_r = err(_rtn(W0, s, lo, hi))
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
    Q = Q.float().reshape(shape)
    wq = (Q.reshape(O, -1) * s32).reshape(shape)  # s32 is in the original column order
    return GPTQResult(Q, wq, e_r, e_g)


class _Cross:
    """Running ``sum x_float^T x_quant`` (float64) over aligned tokens of the float and the quantized model."""

    def __init__(self, module):
        self.hq = Hessian(module)
        self.hf = Hessian(module)  # only used to unfold convs
        self.c = None
        self.xf = None

    def add_float(self, x):
        self.xf = x

    def add_quant(self, x):
        self.hq.add(x)
        xf, xq = self.xf, x
        if xf is None:  # classic GPTQ: no float reference
            return
        if self.hq.conv:
            c = self.hq.module.conv
            xf = F.unfold(xf, c.kernel_size, c.dilation, c.padding, c.stride).transpose(1, 2)
            xq = F.unfold(xq, c.kernel_size, c.dilation, c.padding, c.stride).transpose(1, 2)
        xf = xf.reshape(-1, xf.shape[-1]).float()
        xq = xq.reshape(-1, xq.shape[-1]).float()
        cr = (xf.t() @ xq).double()
        self.c = cr if self.c is None else self.c + cr
        self.xf = None


def float_target(w: torch.Tensor, H: torch.Tensor, cross: torch.Tensor, n: int, damp: float) -> torch.Tensor:
    """``A = argmin || Xq A^T - Xf W^T ||^2`` (ridge ``damp * mean diag``): the weight that, fed the quantized
    inputs, best reproduces the float layer output. ``H = 2 Xq^T Xq / n``, ``cross = Xf^T Xq`` (sums)."""
    shape = w.shape
    W = w.detach().reshape(shape[0], -1).double()
    Hs = H * n / 2
    Hs = Hs + damp * torch.mean(torch.diag(Hs)) * torch.eye(Hs.shape[0], dtype=Hs.dtype)
    A = torch.linalg.solve(Hs, (W @ cross).t()).t()  # Hs symmetric: A = W C Hs^-1
    return A.float().reshape(shape)


@torch.no_grad()
def sequential_gptq(sim, prepared: torch.nn.Module, x: torch.Tensor, modules: list[str], *, batch_size: int = 32,
                    act_order: bool = True, damp: float = DAMP, target: str = "quant", rescale=None,
                    log=None) -> dict:
    """GPTQ every Linear/Conv2d in ``modules`` in forward order on the quantized model ``sim`` (a
    :class:`~vitq.quant.simulate.QuantSim` holding the final recipe). Each layer's Hessian is built from the
    inputs ``Xq`` it sees with every earlier layer already GPTQ-quantized and its own input quantizer applied.

    ``target="quant"``: classic GPTQ, minimize ``|| Xq (W - Wq)^T ||``. ``target="float"``: first the ridge
    least-squares weight ``A`` mapping ``Xq`` to the *float* model's output ``Xf W^T`` (``Xf``: the float model's
    input to that layer on the same images), then GPTQ around ``A``; this also compensates the activation
    quantization error and the error accumulated upstream (the two error terms are orthogonal, so rounding ``A``
    with GPTQ minimizes the total). EXPERIMENTAL: on DeiT-T (64 calibration images) it measured far worse than
    the classic target (w4a8 top-1 42.5 vs 85.0 on a 200-image dev subset; overfitting of the ridge fit or a
    defect not yet found), so the pipeline default is ``"quant"``. ``rescale(module, A) -> QuantSpec``: new
    per-channel weight scales for the target (the caller updates the recipe).

    The result replaces the layer's float weight in ``sim`` *and* in ``prepared`` by ``q * scale`` (so the
    recipe's scales reproduce ``q``). A layer keeps its previous weights when the update does not lower the
    Hessian-weighted error against the target. Returns ``{module: {...}}`` and the new weights / specs under
    ``"__weights__"`` / ``"__specs__"``."""
    import copy

    from .prepare import model_chain, stage_of

    chain = sim.chain()
    fchain = None
    fmods = {}
    if target == "float":
        fmodel = copy.deepcopy(prepared).eval()
        fchain = model_chain(fmodel, sim.family)
        fmods = dict(fmodel.named_modules())
    todo = set(modules)
    order = [m for m in sim.wrappers if m in todo]
    by_stage: dict[int, list[str]] = {}
    for m in order:
        by_stage.setdefault(stage_of(chain, m), []).append(m)
    out: dict = {"__weights__": {}, "__specs__": {}}
    h = x
    hf = x

    def run(fn, t):
        return torch.cat([fn(t[i:i + batch_size]) for i in range(0, len(t), batch_size)])

    for si, (_, fn) in enumerate(chain):
        for m in by_stage.get(si, []):
            wr = sim.wrappers[m]
            spec = wr.spec
            if spec.weight is None:
                continue
            acc = _Cross(wr)
            with Instrumented(wr) as ins:
                ins.pre_hook(wr, lambda mod, inp, acc=acc: acc.add_quant(mod.qin(inp[0]).float()))
                if fchain is not None:
                    ins.pre_hook(fmods[m], lambda mod, inp, acc=acc: acc.add_float(inp[0]))
                for i in range(0, len(h), batch_size):
                    if fchain is not None:
                        fchain[si][1](hf[i:i + batch_size])
                    fn(h[i:i + batch_size])
            H = acc.hq.matrix()
            w = wr.float_weight
            tgt = w
            if fchain is not None:
                tgt = float_target(w, H, acc.c, acc.hq.n, damp)
            new_spec = spec
            if rescale is not None:
                new_spec = copy.copy(spec)
                new_spec.weight = rescale(m, tgt)
            scale = torch.tensor(new_spec.weight.scale, dtype=torch.float32)
            res = gptq_quantize(tgt, H, scale, new_spec.weight.bits, damp=damp, act_order=act_order)
            # error of the current (round-to-nearest) weights measured against the same target
            cur = ob.fake_quant_weight(w, torch.tensor(spec.weight.scale, dtype=torch.float32), spec.weight.bits)
            D = (tgt - cur).reshape(tgt.shape[0], -1).double()
            e_cur = float(((D @ H) * D).sum() / 2)
            used = res.err_gptq < e_cur
            out[m] = {"err_rtn": e_cur, "err_gptq": res.err_gptq, "used": bool(used)}
            if not used:
                continue
            wr.float_weight = res.wq
            wr.set_spec(new_spec)
            prepared.get_submodule(m).weight.copy_(res.wq)
            out["__weights__"][m] = res.wq.clone()
            out["__specs__"][m] = new_spec
        h = run(fn, h)
        if fchain is not None:
            hf = run(fchain[si][1], hf)
    if log:
        n = sum(1 for k, v in out.items() if not k.startswith("__") and v["used"])
        log(f"GPTQ ({target} target): {n}/{len(order)} layers updated")
    return out
