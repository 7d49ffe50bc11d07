"""QuantSim: the torch simulation of a recipe on a prepared (SQ-b-folded) float model.

Every quantizer is :func:`vitq.quant.functional.fake_quant` at exactly the position the recipe schema names:

* ``linear``/``conv``: weight fake-quantized per output channel once (cached), input per tensor
  (``input``), or the OPT-m split ``fq_pos(relu(x)) + fq_neg(min(x, 0))`` (``input_regions``);
* ``attn``: ``q`` after ``* scale``, ``k`` (before the transpose), ``attn`` post-softmax, ``v``;
* a shifted quantizer (``shift``) dequantizes to ``q * scale + c`` (the graph restores ``c`` after the GEMM).

Layers absent from the recipe stay float. The wrapped model is a deep copy; ``set_layer`` swaps one layer's spec
in place (re-quantizing only its weight), which is what the mixed-precision search uses.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..exporter.models import family_of
from ..recipe.schema import LayerSpec, Recipe
from .functional import fake_quant, fake_quant_dynamic, fake_quant_log_sqrt2
from .observers import fake_quant_weight
from .optm import region_fq
from .prepare import AttnHook, model_chain, set_submodule


def _t(scale) -> torch.Tensor:
    return torch.tensor(scale, dtype=torch.float32)


class _InputQuant:
    def __init__(self, spec: LayerSpec):
        self.dyn = spec.input.bits if spec.input is not None and spec.input.dynamic else None
        self.group = spec.input.group if self.dyn else 0
        self.plain = (_t(spec.input.scale), spec.input.bits, spec.input.shift) \
            if spec.input is not None and not self.dyn else None
        r = spec.input_regions
        self.regions = (_t(r.pos.scale), r.pos.bits, _t(r.neg.scale), r.neg.bits, r.pos.shift, r.neg.shift) \
            if r is not None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dyn is not None:
            return fake_quant_dynamic(x, self.dyn, group=self.group)
        if self.plain is not None:
            return fake_quant(x, *self.plain)
        if self.regions is not None:
            sp, bp, sn, bn, hp, hn = self.regions
            return region_fq(x, sp, sn, bp, bn, hp, hn)
        return x


class QuantLayer(nn.Module):
    """The fake-quant weight layer: the weight fake-quantized once per spec (cached; ``weight_fn``, when block
    reconstruction installs one, gives a trainable weight instead), the input through :class:`_InputQuant`, then
    the float op (:meth:`op`) of the subclass. ``set_spec`` swaps the spec in place."""

    def __init__(self, float_weight: torch.Tensor, spec: LayerSpec):
        super().__init__()
        self.float_weight = float_weight
        self.weight_fn = None  # block reconstruction (:mod:`.reconstruct`) installs a trainable weight here
        self.set_spec(spec)

    def set_spec(self, spec: LayerSpec) -> None:
        self.spec = spec
        w = self.float_weight
        self.weight = fake_quant_weight(w, _t(spec.weight.scale), spec.weight.bits) if spec.weight else w
        self.qin = _InputQuant(spec)

    def op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        return self.op(self.qin(x), self.weight if self.weight_fn is None else self.weight_fn())


class QLinear(QuantLayer):
    def __init__(self, lin: nn.Linear, spec: LayerSpec):
        super().__init__(lin.weight.detach(), spec)
        self.bias = None if lin.bias is None else lin.bias.detach()

    def op(self, x, w):
        return F.linear(x, w, self.bias)


class QConv(QuantLayer):
    def __init__(self, conv: nn.Conv2d, spec: LayerSpec):
        super().__init__(conv.weight.detach(), spec)
        self.conv = conv

    def op(self, x, w):
        c = self.conv
        return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)


class _AttnQ:
    def __init__(self, spec: LayerSpec):
        self.spec = spec
        qs = {r: getattr(spec, r) for r in ("q", "k", "attn", "v") if getattr(spec, r) is not None}
        self.ops = {r: (_t(q.scale), q.bits, q.shift) for r, q in qs.items() if not q.dynamic}
        self.dyn = {r: q.bits for r, q in qs.items() if q.dynamic == "token"}
        self.log = {r: q.bits for r, q in qs.items() if q.dynamic == "log_sqrt2"}

    def __call__(self, role: str, t: torch.Tensor) -> torch.Tensor:
        if role in self.dyn:  # per token (q, k, v: over head channels) / per query row (attn: over keys)
            return fake_quant_dynamic(t, self.dyn[role])
        if role in self.log:  # per query row over keys, relative to the row max
            return fake_quant_log_sqrt2(t, self.log[role])
        op = self.ops.get(role)
        return t if op is None else fake_quant(t, *op)


class SimModule(nn.Module):
    """What every simulation exposes: ``self.model`` (the wrapped copy) and ``self.family``; forward = logits."""

    dtype = torch.float32

    def chain(self):
        return model_chain(self.model, self.family)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))

    @torch.no_grad()
    def predict(self, x, batch_size: int = 64) -> torch.Tensor:
        if not torch.is_tensor(x):
            x = torch.from_numpy(x)
        return torch.cat([self.model(x[i:i + batch_size].to(self.dtype)) for i in range(0, len(x), batch_size)])

    def astype(self, dtype: torch.dtype) -> "SimModule":
        """Evaluate in ``dtype`` (e.g. float64: the recipe's function without float32 rounding in GEMMs, softmax,
        LayerNorm; the quantizer grids and scales are the same float32 numbers). In place; returns self."""
        self.model.to(dtype)
        for m in self.model.modules():
            for k, v in list(vars(m).items()):
                if torch.is_tensor(v) and v.is_floating_point() and not isinstance(v, nn.Parameter):
                    setattr(m, k, v.to(dtype))
        self.dtype = dtype
        return self


def float_sensitivity(sim: SimModule, x, *, perturbations: int = 4, seed: int = 0) -> "np.ndarray":
    """Per image, how far float rounding alone moves the recipe's logits: max |logit difference| / max |logit|
    between ``sim`` in float32 and (a) the same simulation in float64, (b) ``perturbations`` float32 runs with the
    input and every normalization's output moved by one ulp per element in random directions.

    A deployed graph sums in other orders than torch; a quantizer input within an ulp of a rounding boundary then
    rounds the other way, and in some models one such flip moves the logits far (docs/models.md). Which element
    flips differs from run to run, so the float64 twin alone samples one flip pattern; the perturbed runs sample
    more. Not in place: ``sim`` stays float32."""
    import numpy as np

    xt = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
    xt = xt.float()
    gen = torch.Generator().manual_seed(seed)

    def ulp(t: torch.Tensor) -> torch.Tensor:  # every element one ulp up or down, at random
        sign = torch.randint(0, 2, t.shape, generator=gen).to(t.dtype) * 2 - 1
        return torch.nextafter(t, sign * torch.inf)

    # the first quantizer absorbs an input ulp, so the perturbed runs move every GEMM's and normalization's output
    # too: what a different summation order does to the float values between quantizers
    perturbed = [m for m in sim.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, QuantLayer)) or
                 type(m).__name__ in ("RmsNorm", "LayerNorm2d", "LayerNormFp32")]
    with torch.no_grad():
        ref = sim.predict(xt).double()
        runs = [copy.deepcopy(sim).astype(torch.float64).predict(xt.double())]
        hooks = [m.register_forward_hook(lambda mod, inp, out: ulp(out) if torch.is_tensor(out) else out)
                 for m in perturbed]
        try:
            for _ in range(perturbations):
                runs.append(sim.predict(ulp(xt)).double())
        finally:
            for h in hooks:
                h.remove()
    scale = ref.abs().amax(1).clamp_min(1e-30)
    return torch.stack([(r - ref).abs().amax(1) / scale for r in runs]).amax(0).numpy()


def matches_simulation(got, sim_logits, sensitivity, *, floor: float = 1e-5):
    """``(ok, per_image)``: a deployed graph's logits ``got`` compute the simulation's function when no image is
    further from ``sim_logits`` (max |difference| / max |logit|) than ``floor`` (float kernels summing in other
    orders) or 3x the largest :func:`float_sensitivity` of the batch, whichever is larger."""
    import numpy as np

    got, ref = np.asarray(got, np.float64), np.asarray(sim_logits, np.float64)
    per_image = np.abs(got - ref).max(1) / np.maximum(np.abs(ref).max(1), 1e-30)
    return bool((per_image <= max(floor, 3 * float(np.max(sensitivity)))).all()), per_image


class QuantSim(SimModule):
    """``QuantSim(prepared_model, recipe)(x)`` -> logits of the fake-quantized model."""

    def __init__(self, prepared_model: nn.Module, recipe: Recipe, family: str | None = None):
        super().__init__()
        self.model = copy.deepcopy(prepared_model).eval()
        self.family = family or family_of(prepared_model)
        self.recipe = recipe
        self.wrappers: dict[str, nn.Module] = {}
        # Linears/convs first (they live inside attention modules), then attention wrappers.
        specs = sorted(recipe.layers, key=lambda l: l.kind == "attn")
        for spec in specs:
            self._install(spec)

    def _install(self, spec: LayerSpec) -> None:
        m = self.model.get_submodule(spec.module)
        if spec.kind == "attn":
            w = AttnHook(m, _AttnQ(spec))
        elif spec.kind == "conv":
            w = QConv(m, spec)
        else:
            w = QLinear(m, spec)
        set_submodule(self.model, spec.module, w)
        self.wrappers[spec.module] = w

    def set_layer(self, spec: LayerSpec) -> None:
        """Swap the spec of an already-quantized layer (fast: only that layer's weight is re-quantized)."""
        w = self.wrappers[spec.module]
        if isinstance(w, AttnHook):
            w.qfn = _AttnQ(spec)
        else:
            w.set_spec(spec)

