"""MixaSim: the torch simulation of a recipe with a ``mixa`` section.

It wraps a :class:`vitq.quant.simulate.QuantSim` (deep copy): every routed layer's wrapper is replaced by one that
computes both branches and picks, per token (ViT / Swin MLP) or per window (Swin ``qkv``/``proj`` and attention
operands), the high or the low branch's result from the router's levels. Fake quantization is elementwise and the
branches share the float weight, so "gather the group, run the branch, scatter back" (the graph) and "run both,
select per token" (here) compute the same function; with ``n_low = 0`` a block runs exactly the base wrappers.

Pruned groups (level 2, SparseViT-style): the block's output for their tokens is its input (identity); in ViT
attention they are also masked out as keys, so they cost nothing (Swin windows are independent anyway).

Importance is computed by forward pre-hooks on each stage's first block from its input (float path of the
*simulated* model, i.e. what the deployed graph sees at that point).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ..quant.observers import fake_quant_weight
from ..quant.prepare import AttnHook, attention_forward, set_submodule
from ..quant.simulate import QuantSim, SimModule, _AttnQ, _InputQuant, _t
from ..recipe.schema import LayerSpec
from .routing import BlockGeom, block_geometry, group_levels, group_scores, rank_groups, token_importance, \
    token_levels
from ..recipe.mixa import MixaSpec

LINEAR_ROLES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def layer_layout(geom: BlockGeom, module: str) -> str:
    """``tokens`` (input ``[B, n_tokens, C]``) or ``windows`` (input ``[B * G, T, ...]``) for a routed layer."""
    rel = module[len(geom.block) + 1:]
    if geom.layout == "windows" and (rel.startswith("attn.") or rel == "attn"):
        return "windows"
    return "tokens"


def routed_modules(geom: BlockGeom, roles=("linear",)) -> list[str]:
    out = []
    if "linear" in roles:
        out += [f"{geom.block}.{r}" for r in LINEAR_ROLES]
    if "attn" in roles:
        out.append(f"{geom.block}.attn")
    return out


class Router:
    def __init__(self, geoms: list[BlockGeom], spec: MixaSpec):
        self.geoms = {g.block: g for g in geoms}
        self.stage_a: dict[str, torch.Tensor] = {}
        self.set_spec(spec)

    def set_spec(self, spec: MixaSpec) -> None:
        self.cfg = {}
        for b in spec.blocks:
            g = self.geoms.get(b.block)
            if g is None:
                raise UnsupportedError(f"mixa block {b.block!r} is not a routable block of this model "
                                       f"({', '.join(list(self.geoms)[:4])}, ...)")
            if g.groups != b.groups:
                raise UnsupportedError(f"mixa block {b.block}: {b.groups} groups in the recipe, the model has "
                                       f"{g.groups} (group size {g.group})")
            self.cfg[b.block] = (b.n_high, b.n_low, b.n_prune)
        self._cache: dict = {}

    def active(self, block: str) -> bool:
        c = self.cfg.get(block)
        return c is not None and (c[1] > 0 or c[2] > 0)

    def set_importance(self, stage_first: str, x: torch.Tensor) -> None:
        self.stage_a[stage_first] = token_importance(x)
        self._cache = {}

    def glevel(self, block: str) -> torch.Tensor:
        key = ("g", block)
        if key not in self._cache:
            g = self.geoms[block]
            a = self.stage_a.get(g.stage_first)
            if a is None:
                raise RuntimeError(f"MixA-Q router: no importance for stage starting at {g.stage_first}")
            nh, nl, _ = self.cfg[block]
            self._cache[key] = group_levels(rank_groups(group_scores(a, g.table)), nh, nl)
        return self._cache[key]

    def tlevel(self, block: str) -> torch.Tensor:
        key = ("t", block)
        if key not in self._cache:
            self._cache[key] = token_levels(self.glevel(block), self.geoms[block])
        return self._cache[key]

    def high_mask(self, block: str, layout: str, like: torch.Tensor, token_dim: int) -> torch.Tensor | None:
        """Bool mask (True = high branch; pruned counts as high, its result is discarded) broadcastable to
        ``like``: ``tokens`` layout: ``[B, N]`` placed on dims 0 and ``token_dim``; ``windows``: ``[B * G]`` on
        dim 0."""
        if not self.active(block):
            return None
        if layout == "windows":
            m = self.glevel(block).reshape(-1) != 1
            return m.reshape([-1] + [1] * (like.dim() - 1))
        m = self.tlevel(block) != 1
        shape = [1] * like.dim()
        shape[0], shape[token_dim] = m.shape[0], m.shape[1]
        return m.reshape(shape)


def _wq(w: torch.Tensor, spec: LayerSpec | None) -> torch.Tensor:
    if spec is None or spec.weight is None:
        return w
    return fake_quant_weight(w, _t(spec.weight.scale), spec.weight.bits)


def _same_weight(a: LayerSpec | None, b: LayerSpec | None) -> bool:
    wa, wb = (a.weight if a else None), (b.weight if b else None)
    if wa is None or wb is None:
        return wa is wb
    return wa is wb or (wa.bits == wb.bits and list(wa.scale) == list(wb.scale))


class _FloatIn:
    def __call__(self, x):
        return x


class MixLinear(nn.Module):
    """A routed Linear: per token (or per window) the high or the low branch (own input quantizer, own weight
    quantization when the branches' weight specs differ)."""

    def __init__(self, float_weight, bias, high: LayerSpec | None, low: LayerSpec | None, router: Router,
                 block: str, layout: str, base):
        super().__init__()
        self.float_weight, self.bias = float_weight, bias
        self.router, self.block, self.layout = router, block, layout
        self.base = base  # the QuantSim wrapper (used when the block is not routed)
        self.high, self.low = high, low
        self.wh = _wq(float_weight, high)
        self.wl = self.wh if _same_weight(high, low) else _wq(float_weight, low)
        self.qh = _InputQuant(high) if high is not None else _FloatIn()
        self.ql = _InputQuant(low) if low is not None else _FloatIn()

    def forward(self, x):
        m = self.router.high_mask(self.block, self.layout, x, 1)
        if m is None:
            return F.linear(self.qh(x), self.wh, self.bias)
        if self.wl is self.wh:
            return F.linear(torch.where(m, self.qh(x), self.ql(x)), self.wh, self.bias)
        return torch.where(m, F.linear(self.qh(x), self.wh, self.bias), F.linear(self.ql(x), self.wl, self.bias))


class MixAttnQ:
    """Per-token (ViT: q/k/v rows are tokens, attn rows are queries, all on dim 2) or per-window (Swin: dim 0)
    choice between the two branches' attention operand quantizers."""

    def __init__(self, high: LayerSpec | None, low: LayerSpec | None, router: Router, block: str, layout: str):
        self.spec = high
        self.qh = _AttnQ(high) if high is not None else None
        self.ql = _AttnQ(low) if low is not None else None
        self.router, self.block, self.layout = router, block, layout

    def __call__(self, role: str, t: torch.Tensor) -> torch.Tensor:
        h = self.qh(role, t) if self.qh is not None else t
        m = self.router.high_mask(self.block, self.layout, t, 2)
        if m is None:
            return h
        lo = self.ql(role, t) if self.ql is not None else t
        return torch.where(m, h, lo)


class MixAttnHook(AttnHook):
    """ViT attention with pruned tokens masked out as keys."""

    def __init__(self, inner, qfn, router: Router, block: str, vit: bool):
        super().__init__(inner, qfn)
        self.router, self.block, self.vit = router, block, vit

    def forward(self, x, attn_mask=None, is_causal: bool = False, mask=None, rope=None, shared_rel_pos_bias=None):
        mask = mask if mask is not None else attn_mask
        if self.vit and self.router.active(block := self.block) and self.router.cfg[block][2] > 0:
            pruned = self.router.tlevel(block) == 2  # [B, N]
            add = torch.zeros(pruned.shape, dtype=x.dtype).masked_fill(pruned, float("-inf"))[:, None, None, :]
            mask = add if mask is None else mask + add
        return attention_forward(self.inner, x, mask, self.qfn, is_causal, rope, shared_rel_pos_bias)


def _set_inner(root: nn.Module, path: str, new: nn.Module) -> None:
    """``set_submodule`` that looks through attention hooks (``attn.qkv`` lives on the hook's inner module,
    which is what :func:`attention_forward` calls)."""
    parent, _, name = path.rpartition(".")
    p = root.get_submodule(parent) if parent else root
    while isinstance(p, AttnHook):
        p = p.inner
    setattr(p, name, new)


class MixaSim(SimModule):
    """``MixaSim(quant_sim, spec)(x)`` -> logits with per-group activation precision."""

    def __init__(self, qsim: QuantSim, spec: MixaSpec):
        super().__init__()
        self.qsim = copy.deepcopy(qsim)
        self.model = self.qsim.model
        self.family = self.qsim.family
        self.spec = spec
        if (spec.scheme == "windows") != (self.family == "swin"):
            raise UnsupportedError(f"mixa scheme {spec.scheme!r} does not fit a {self.family} model "
                                   f"(ViT/DeiT: 'tokens', Swin: 'windows')")
        self.geoms = block_geometry(self.model, self.family, spec.group)
        self.router = Router(self.geoms, spec)
        gmap = {g.block: g for g in self.geoms}
        self._hooks = []
        for first in sorted({g.stage_first for g in self.geoms if g.block in self.router.cfg}):
            mod = self.model.get_submodule(first)
            self._hooks.append(mod.register_forward_pre_hook(
                lambda m, args, first=first: self.router.set_importance(first, args[0])))
        for b in spec.blocks:
            self._hooks.append(self.model.get_submodule(b.block).register_forward_hook(self._prune_hook(b.block)))
        for l in spec.layers:
            b = spec.block_of(l.module)
            geom = gmap[b.block]
            layout = layer_layout(geom, l.module)
            w = self.qsim.wrappers.get(l.module)
            if w is None:
                raise UnsupportedError(f"mixa layer {l.module!r} is not quantized by the base recipe")
            if isinstance(w, AttnHook):
                hook = MixAttnHook(w.inner, MixAttnQ(l.high, l.low, self.router, b.block, layout), self.router,
                                   b.block, self.family == "vit")
                set_submodule(self.model, l.module, hook)
            else:
                _set_inner(self.model, l.module, MixLinear(w.float_weight, w.bias, l.high, l.low, self.router,
                                                           b.block, layout, w))

    def _prune_hook(self, block: str):
        def h(mod, args, out):
            if not self.router.active(block) or self.router.cfg[block][2] == 0:
                return out
            keep = (self.router.tlevel(block) == 2).reshape(out.shape[0], *out.shape[1:-1], 1)
            return torch.where(keep, args[0], out)
        return h

    def set_spec(self, spec: MixaSpec) -> None:
        """New ratios / pruning (same layers): only the router changes."""
        self.spec = spec
        self.router.set_spec(spec)

    def set_ratios(self, ratios: dict[str, float], prune: dict[str, float] | None = None) -> MixaSpec:
        spec = self.spec.with_ratios(ratios, prune)
        self.set_spec(spec)
        return spec

