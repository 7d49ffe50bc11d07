"""Block-wise reconstruction: learned activation scales and learned weight rounding, one chain stage at a time.

The per-layer searches (:mod:`.search`, :mod:`.optm`, :mod:`.gptq`) each minimize one layer's own output error.
At 4-bit activations that is not enough: errors of the 4-bit quantizers inside a transformer block interact
(the post-softmax ``attn`` grid and the fc2 input decide what the residual stream receives). In the manner of
BRECQ (Li et al., 2021), each stage of the model chain (patch embedding, every block; Swin: downsampling too) is
fitted so that its quantized output matches the float stage's output on the calibration images:

* **weights** (SignRound, Cheng et al., 2023, the few-step form of AdaRound): every quantized weight of the stage
  is ``s * clamp(round(w / s + V), qmin, qmax)`` with the recipe's per-channel scale ``s`` fixed and a learned
  offset ``V`` in [-0.5, 0.5] (start 0 = round-to-nearest; straight-through gradient; signed steps of linearly
  decaying size ``lr_v``, default ``1 / iters``). AdaRound's soft rounding was tried first: in a few hundred
  steps its annealing leaves most weights undecided and the hard result far from the fitted one (DeiT-Tiny patch
  embedding at w4a4: soft 0.0067, hard 0.0194 vs 0.0231 round-to-nearest; SignRound 0.0083, no gap). The result
  is an integer grid value per weight (``round(w'/s)`` recovers it exactly), deployed as GPTQ's weights are, in
  the recipe's weights sidecar. It starts from round-to-nearest of the float weights and replaces GPTQ
  (started from GPTQ's rounding instead, most stages' fits were reverted and DeiT-Tiny mp:5 measured 78.77 /
  agreement 90.15% / KL 0.115 vs 79.38 / 91.38% / 0.104 from round-to-nearest);
* **activation scales** (LSQ, Esser et al., 2020; option ``acts``, on by default): every per-tensor activation
  quantizer of the stage (Linear inputs, OPT-m regions, the four attention operands) below ``max_bits`` gets a
  learnable ``log scale`` (straight-through rounding, Adam, cosine-decayed ``lr_s``); grid shifts stay the
  recipe's integers, so the quantizers stay what the schema and TensorRT accept (symmetric, per tensor). The
  step size matters: on DeiT-Tiny w4a4 (dev650) weights alone gave 71.23 top-1 / agreement 77.38% / KL 0.519,
  weights + scales at ``lr_s`` 4e-3 73.08 / 81.69% / 0.338, while at 1e-2 the scales alone never lowered a block's
  fitted error (200 dev images, first five stages) and over all blocks (300 steps, before the class-token
  weighting) the model fell to 61.7;
* **loss** (``target="float"``, the default): mean squared error between the stage's quantized output
  and the float model's stage output (BRECQ; the upstream error is fitted too), normalized by its mean square,
  with QDrop's input mixing (Wei et al., 2022: the quantized stage's input is, element by element, the quantized
  model's with probability 1 - ``drop``, else the float model's; ``drop`` 0.5). ``target="local"``
  fits each stage's own error only: the float stage *on the same quantized input*, as GPTQ's
  target. DeiT-Tiny w4a4 (256 calibration images, 200 steps, ``lr_s`` 4e-3), top-1 /
  agreement / KL on dev650 and on the 744 held-out sample images: float target 75.23 / 83.38% / 0.273 and
  70.03 / 75.54% / 0.356; local 73.08 / 81.69% / 0.338 and 68.01 / 73.12% / 0.437 (the KL is lower by a fifth
  on both sets). An earlier float-target run (300 steps, scales at ``lr_s`` 1e-2, before the class-token share)
  had fallen to 61.4 (KL 1.14): the step size, not the target, was at fault;
* ``prefix_weight`` (ViT/DeiT, default 0.5): the class token, the only one the head reads, gets that share of
  the loss (the other share is the mean over all tokens). With plain MSE over tokens the last blocks' fits
  raised the logit KL (DeiT-Tiny w4a4, 100 steps, 200 dev images: weights fitted through block 7: KL 0.418 /
  agreement 82.5%; through block 11: 0.72 / 83.0%; through block 11 with ``prefix_weight`` 0.5: 0.43 / 81.5%);
* a stage whose fitted error on the calibration images is not lower than before is reverted (its quantizers
  and weights as calibrated).
* ``wscale`` (off; measured with the local target): the per-channel weight scales are learned too (LSQ on their logs, with the activation
  scales; the recipe then carries the learned scales, the sidecar the grid weights on them). DeiT-Tiny w4a4:
  dev650 74.62 top-1 / agreement 80.92% / KL 0.334 vs 73.08 / 81.69% / 0.338 without, but on the 744 held-out
  images of the calibration set 66.26 / 73.52% / 0.425 vs 68.01 / 73.12% / 0.437: the
  dev650 gain is noise, so it stays off. ``lr_s`` 2e-3 instead of 4e-3 lowered the KL on both sets
  (dev650 0.323 vs 0.338, held-out 0.417 vs 0.437) at the same top-1 over both (70.37), but on mp:5
  (dev650) it measured 78.15 / 91.38% / KL 0.0844 vs 78.92 / 90.77% / 0.0805: the default stays 4e-3.
* measured with the local target and not adopted (DeiT-Tiny w4a4, 256 calibration images, dev650): BRECQ's
  Fisher-weighted stage loss (72.00 / 78.92% / KL 0.399 vs 73.08 / 81.69% / 0.338 with the MSE + class-token
  loss); all activation scales learned end to end on the logit KL after the stage fits (the calibration images'
  own KL rose, 0.358 -> 0.365); 600 instead of 200 steps (no lower stage errors).

Quantizers at 8 bits or more (``max_bits``) are left as they are (they lose next to nothing; the head stays 8/8;
the tail stage is not fitted). Stages run in forward order; each stage's quantized input is produced by the
already-reconstructed quantized model. Cost: ``iters`` steps of ``batch`` images per stage (DeiT-Tiny, 200 x 16:
~24 s per block on two cores, ~5 minutes in all), so it is opt-in
(``methods["recon"]``, ``vitq compile --reconstruct``).
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe.schema import QuantSpec
from .functional import qrange
from .prepare import AttnHook, model_chain, stage_of
from .simulate import QConv, QLinear

DEFAULTS = {"iters": 200, "batch": 16, "images": None, "lr_v": None, "lr_s": 4e-3, "drop": 0.5, "max_bits": 8, "weights": True, "acts": True, "seed": 0, "stages": None,
            "target": "float", "loss": "mse", "prefix_weight": 0.5, "wscale": False}


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return (torch.round(v) - v).detach() + v


class LearnedQuant(nn.Module):
    """A per-tensor symmetric quantizer with learnable ``log scale`` and a fixed integer grid ``shift``."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.log_s = nn.Parameter(torch.tensor(math.log(float(spec.scale[0])), dtype=torch.float32))
        self.lo, self.hi = qrange(spec.bits)
        self.shift = int(spec.shift or 0)

    def forward(self, x):
        s = self.log_s.exp()
        v = x / s - self.shift
        return (torch.clamp(_round_ste(v), self.lo, self.hi) + self.shift) * s

    def result(self) -> QuantSpec:
        return QuantSpec(self.spec.bits, [float(self.log_s.detach().exp())], axis=self.spec.axis, method="recon",
                         shift=self.spec.shift)


class RoundingWeight(nn.Module):
    """``s * clamp(round(w / s + V), qmin, qmax)`` with per-output-channel (or per-group) ``s`` and a learned rounding
    offset ``V`` in [-0.5, 0.5] (SignRound, Cheng et al., 2023: the forward is always the hard grid value, with
    a straight-through gradient, so there is no soft/hard gap to anneal away in a few hundred steps; ``V``
    moves by signed gradient steps of a linearly decaying size, ``V = 0`` is round-to-nearest)."""

    def __init__(self, w: torch.Tensor, scale: list[float], bits: int, learn_scale: bool = False):
        super().__init__()
        o = w.shape[0]
        k = max(1, len(scale) // o)  # scales per output channel: 1, or one per group of inputs
        self.shape = w.shape
        s = torch.tensor(scale, dtype=torch.float32).reshape(o, k, 1) if len(scale) > 1 else \
            torch.tensor(scale, dtype=torch.float32).reshape(1, 1, 1)
        self.w = w.detach().reshape(o, k, -1)  # rows x groups x inputs of a group: one scale per group
        self.r = self.w / s
        self.s0 = s
        # option ``wscale``: the per-channel scale is learned too (LSQ on its log, as OmniQuant's learnable
        # clipping); the grid offset V stays relative to the calibrated grid
        self.log_s = nn.Parameter(s.log()) if learn_scale else None
        self.V = nn.Parameter(torch.zeros_like(self.r))
        self.lo, self.hi = qrange(bits)

    @property
    def s(self) -> torch.Tensor:
        return self.s0 if self.log_s is None else self.log_s.exp()

    def _r(self) -> torch.Tensor:
        return self.r if self.log_s is None else self.w / self.s

    def forward(self) -> torch.Tensor:
        return (torch.clamp(_round_ste(self._r() + self.V), self.lo, self.hi) * self.s).reshape(self.shape)

    @torch.no_grad()
    def sign_step(self, lr: float) -> None:
        if self.V.grad is not None:
            self.V.sub_(lr * torch.sign(self.V.grad)).clamp_(-0.5, 0.5)

    @torch.no_grad()
    def hard(self) -> torch.Tensor:
        return (torch.clamp(torch.round(self._r() + self.V), self.lo, self.hi) * self.s).reshape(self.shape)

    def scale(self) -> list[float]:
        return [float(v) for v in self.s.detach().flatten()]


class _LearnedInput:
    def __init__(self, spec, qs: dict):
        self.plain = qs.get("input")
        self.pos, self.neg = qs.get("pos"), qs.get("neg")
        self.fixed = spec

    def __call__(self, x):
        if self.plain is not None:
            return self.plain(x)
        if self.pos is not None:
            return self.pos(torch.relu(x)) + self.neg(torch.clamp(x, max=0.0))
        return x


class _LearnedAttn:
    def __init__(self, base, qs: dict):
        self.base, self.qs = base, qs

    def __call__(self, role, t):
        q = self.qs.get(role)
        return q(t) if q is not None else self.base(role, t)


class _StageParams:
    """The learnable quantizers of one chain stage, installed into the simulation's wrappers (and removed)."""

    def __init__(self, sim, modules: list[str], opts: dict, float_weights: dict | None = None):
        float_weights = float_weights or {}
        self.sim = sim
        self.acts: dict[tuple[str, str], LearnedQuant] = {}
        self.weights: dict[str, RoundingWeight] = {}
        self.saved: dict[str, tuple] = {}
        mb = opts["max_bits"]
        for m in modules:
            wr = sim.wrappers[m]
            if isinstance(wr, AttnHook):
                spec = wr.qfn.spec
                qs = {}
                if opts["acts"]:
                    for r in ("q", "k", "attn", "v"):
                        q = getattr(spec, r)
                        if q is not None and q.bits < mb and not q.dynamic:  # dynamic: no scale to learn
                            qs[r] = self.acts[(m, r)] = LearnedQuant(q)
                if qs:
                    self.saved[m] = ("qfn", wr.qfn)
                    wr.qfn = _LearnedAttn(wr.qfn, qs)
                continue
            spec = wr.spec
            qs = {}
            if opts["acts"]:
                if spec.input is not None and spec.input.bits < mb and not spec.input.dynamic:
                    qs["input"] = self.acts[(m, "input")] = LearnedQuant(spec.input)
                r = spec.input_regions
                if r is not None and min(r.pos.bits, r.neg.bits) < mb:
                    qs["pos"] = self.acts[(m, "pos")] = LearnedQuant(r.pos)
                    qs["neg"] = self.acts[(m, "neg")] = LearnedQuant(r.neg)
            if qs:
                self.saved[m] = ("qin", wr.qin)
                wr.qin = _LearnedInput(spec, qs)
            if opts["weights"] and spec.weight is not None and spec.weight.bits < mb:
                w0 = float_weights.get(m, wr.float_weight)  # the float weight (the simulation's may be GPTQ's)
                self.weights[m] = RoundingWeight(w0, spec.weight.scale, spec.weight.bits, bool(opts["wscale"]))
                wr.weight_fn = self.weights[m]

    def params(self):
        scales = [q.log_s for q in self.acts.values()] + [a.log_s for a in self.weights.values()
                                                          if a.log_s is not None]
        return scales, [a.V for a in self.weights.values()]

    def finish(self) -> dict:
        """Write the learned quantizers back as recipe specs (and grid weights); return ``{module: spec}``."""
        out = {}
        for m, wr in self.sim.wrappers.items():
            mine = {k: q for k, q in self.acts.items() if k[0] == m}
            if not mine and m not in self.weights:
                continue
            if isinstance(wr, AttnHook):
                spec = copy.copy(self.saved[m][1].spec)
                for (_, r), q in mine.items():
                    setattr(spec, r, q.result())
                wr.qfn = self.saved[m][1]
            else:
                spec = copy.copy(wr.spec)
                if (m, "input") in mine:
                    spec.input = mine[(m, "input")].result()
                if (m, "pos") in mine:
                    r = copy.copy(spec.input_regions)
                    r.pos, r.neg = mine[(m, "pos")].result(), mine[(m, "neg")].result()
                    r.m = float(r.pos.scale[0]) / float(r.neg.scale[0])
                    spec.input_regions = r
                if m in self.saved:
                    wr.qin = self.saved[m][1]
                if m in self.weights:
                    rw = self.weights[m]
                    with torch.no_grad():
                        wr.float_weight = rw.hard().clone()
                    if rw.log_s is not None:  # the learned per-channel scale is the recipe's weight scale
                        spec.weight = QuantSpec(spec.weight.bits, rw.scale(), axis=spec.weight.axis,
                                                method=spec.weight.method, shift=spec.weight.shift,
                                                group=spec.weight.group)
                    wr.weight_fn = None
            self.sim.set_layer(spec)
            out[m] = spec
        return out


def reconstruct(sim, float_model: nn.Module, recipe, x: torch.Tensor, options: dict | None = None,
                log=None, progress: bool = False) -> dict:
    """Block-wise reconstruction of ``sim`` (a :class:`~vitq.quant.simulate.QuantSim` of ``recipe``) against
    ``float_model`` (the prepared, SQ-b-folded float model the recipe was calibrated on) on images ``x``.

    Updates ``sim`` and ``recipe.layers`` in place; returns ``{"weights": {module: grid weight}, "stages":
    [{stage, loss_before, loss_after, seconds}], ...}``."""
    o = {**DEFAULTS, **(options or {})}
    unknown = set(o) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"reconstruction options: unknown {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    if o["loss"] not in ("mse", "channel"):
        raise ValueError(f"reconstruction option loss: {o['loss']!r} is not 'mse' or 'channel'")
    if o["target"] not in ("local", "float"):
        raise ValueError(f"reconstruction option target: {o['target']!r} is not 'local' or 'float'")
    if o["images"]:
        x = x[: int(o["images"])]
    gen = torch.Generator().manual_seed(int(o["seed"]))
    chain_q = sim.chain()
    chain_f = model_chain(float_model, sim.family)
    by_stage: dict[int, list[str]] = {}
    for m in sim.wrappers:
        by_stage.setdefault(stage_of(chain_q, m), []).append(m)
    idx = {l.module: i for i, l in enumerate(recipe.layers)}
    bs = 32

    def run(fn, t):
        with torch.no_grad():
            return torch.cat([fn(t[i:i + bs]) for i in range(0, len(t), bs)])

    hf, hq = x, x
    pw = float(o["prefix_weight"])
    npre = int(getattr(float_model, "num_prefix_tokens", 0)) if (sim.family == "vit" and pw > 0) else 0
    report = {"weights": {}, "stages": [], "options": {k: v for k, v in o.items()}}
    n_stages = len(chain_q) - 1  # the tail (final norm + 8/8 head) is left as calibrated
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_stages, desc="reconstruction", unit="stage", leave=False)
    for si in range(n_stages):
        prefix, fq = chain_q[si]
        ff = chain_f[si][1]
        yf = run(ff, hf)
        mods = by_stage.get(si, []) if o["stages"] is None or si in o["stages"] else []
        local = o["target"] == "local"
        # local: the float stage on the *quantized* input (only this stage's own quantization error is fitted);
        # float: the float model's stage output (upstream error too; QDrop input mixing)
        yt = run(ff, hq) if (local and mods) else yf
        if o["loss"] == "channel":  # every output channel weighted by 1 / its own mean square
            wgt = 1.0 / yt.pow(2).mean(dim=tuple(range(yt.ndim - 1)), keepdim=True).clamp_min(1e-8)
        else:  # plain MSE, normalized by the target's mean square
            wgt = 1.0 / max(float(yt.pow(2).mean()), 1e-30)
        loss0 = float(_err(run(fq, hq), yt, wgt)) if mods else None  # the stage as calibrated
        saved = {m: (copy.copy(_spec_of(sim.wrappers[m])), getattr(sim.wrappers[m], "float_weight", None))
                 for m in mods}
        fw = {m: float_model.get_submodule(m).weight.detach() for m in mods
              if not isinstance(sim.wrappers[m], AttnHook)}
        sp = _StageParams(sim, mods, o, fw)
        acts, ws = sp.params()
        t0 = time.time()
        entry = {"stage": prefix, "quantizers": len(acts), "weights": len(ws)}
        if acts or ws:
            opt = torch.optim.Adam(acts, lr=o["lr_s"]) if acts else None
            iters = int(o["iters"])
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters, eta_min=0.0) if opt else None
            lr_v = float(o["lr_v"]) if o["lr_v"] else 1.0 / iters  # total travel ~0.5 grid step
            entry["loss_before"] = loss0
            for it in range(iters):
                sel = torch.randint(0, len(x), (min(int(o["batch"]), len(x)),), generator=gen)
                xin = hq[sel]
                if o["drop"] > 0 and not local:
                    keep = torch.rand(xin.shape, generator=gen) < o["drop"]
                    xin = torch.where(keep, hf[sel], xin)
                out = fq(xin)
                loss = _err(out, yt[sel], wgt)
                if npre:  # ViT: the class token (what the head reads) gets its own share of the loss
                    loss = (1 - pw) * loss + pw * _err(out[:, :npre], yt[sel][:, :npre], wgt)
                for p in acts + ws:
                    p.grad = None
                loss.backward()
                if opt:
                    opt.step()
                    sched.step()
                for a in sp.weights.values():
                    a.sign_step(lr_v * (1 - it / iters))
            with torch.no_grad():
                if sp.weights:
                    vs = torch.cat([(torch.round(a.r + a.V) != torch.round(a.r)).flatten()
                                    for a in sp.weights.values()])
                    entry["flipped"] = float(vs.float().mean())
        new = sp.finish()
        if new:
            out = run(fq, hq)
            entry["loss_after"] = float(_err(out, yt, wgt))
            entry["kept"] = entry["loss_after"] < loss0
            if not entry["kept"]:  # the fit did not lower the stage's error on the calibration images: undo it
                for m, (spec, fw) in saved.items():
                    if fw is not None:
                        sim.wrappers[m].float_weight = fw
                    sim.set_layer(spec)
                new = {}
                out = run(fq, hq)
            hq = out
        else:
            hq = run(fq, hq)
        for m, spec in new.items():
            recipe.layers[idx[m]] = spec
            if m in sp.weights:
                report["weights"][m] = sim.wrappers[m].float_weight.clone()
        hf = yf
        if acts or ws:
            entry["seconds"] = round(time.time() - t0, 2)
            if log:
                log(f"reconstruction {prefix or 'tail'}: output MSE/MS {entry['loss_before']:.4g} -> "
                    f"{entry['loss_after']:.4g}{'' if entry['kept'] else ' (reverted)'} ({len(acts)} scales, "
                    f"{len(ws)} weights, {entry['seconds']:.0f}s)")
        report["stages"].append(entry)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return report


def _spec_of(wr):
    return wr.qfn.spec if isinstance(wr, AttnHook) else wr.spec


def _err(a: torch.Tensor, b: torch.Tensor, wgt) -> torch.Tensor:
    return ((a - b).pow(2) * wgt).mean()
