"""Prepare a timm ViT/DeiT/Swin for quantization and enumerate its quantization points.

``prepare_model`` returns a deep copy in eval mode whose attention modules run timm's *explicit* path
(``fused_attn = False``): ``q = q * scale; attn = q @ k.transpose(-2, -1); (+ rel-pos bias / mask); softmax;
attn @ v``. That copy is what SQ-b folds into, what the simulation wraps and what gets exported to ONNX, so the
exported graph has the two attention MatMuls whose inputs the recipe's ``q``/``k``/``attn``/``v`` quantizers name.

:func:`attention_forward` is vitq's re-implementation of that explicit path (same ops, same order) with a hook
``qfn(role, tensor)`` applied to each matmul operand; with ``qfn=None`` it equals timm's forward (tests check
``max|diff| <= 1e-5`` on logits).

Quantization points (:func:`enumerate_points`): every ``nn.Linear`` (qkv, proj, fc1, fc2, head, Swin
``downsample.reduction``), the patch-embed ``Conv2d``, and per attention module its four matmul operands.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UnsupportedError

QFn = Optional[Callable[[str, torch.Tensor], torch.Tensor]]


def is_attention(m: nn.Module) -> bool:
    """timm ``Attention`` (vision_transformer) or ``WindowAttention`` (swin_transformer)."""
    name = type(m).__name__
    return name in ("Attention", "WindowAttention") and hasattr(m, "qkv") and hasattr(m, "proj") \
        and hasattr(m, "scale") and hasattr(m, "num_heads")


def is_window_attention(m: nn.Module) -> bool:
    return hasattr(m, "relative_position_bias_table")


def prepare_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (eval mode) with every attention on the explicit (non-SDPA) path."""
    m = copy.deepcopy(model).eval()
    n_attn = 0
    for mod in m.modules():
        if is_attention(mod):
            if getattr(mod, "gate", None) is not None:
                raise UnsupportedError("gated attention is not supported by vitq quantization")
            mod.fused_attn = False
            n_attn += 1
    if n_attn == 0:
        raise UnsupportedError(f"{type(model).__name__}: no timm Attention/WindowAttention module found")
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def attention_forward(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None, qfn: QFn = None,
                      is_causal: bool = False) -> torch.Tensor:
    """timm's explicit attention path, op for op, with ``qfn`` applied to the matmul operands ``q`` (after
    ``* scale``), ``k`` (before the transpose), ``attn`` (post-softmax) and ``v``. ``mask``: ViT ``attn_mask`` or
    Swin's shifted-window mask."""
    B, N, C = x.shape
    qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    window = is_window_attention(mod)
    if not window:
        q, k = mod.q_norm(q), mod.k_norm(k)
    q = q * mod.scale
    if qfn is not None:
        q, k, v = qfn("q", q), qfn("k", k), qfn("v", v)
    attn = q @ k.transpose(-2, -1)
    if window:
        attn = attn + mod._get_rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, mod.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, mod.num_heads, N, N)
        attn = mod.softmax(attn)
    else:
        if is_causal or mask is not None:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, mask, is_causal))
        attn = attn.softmax(dim=-1)
    if qfn is not None:
        attn = qfn("attn", attn)
    x = attn @ v
    x = x.transpose(1, 2).reshape(B, N, -1)
    if not window:
        x = mod.norm(x)
    return mod.proj(x)


class AttnHook(nn.Module):
    """Wraps an attention module so that :func:`attention_forward` runs with a per-module ``qfn``."""

    def __init__(self, inner: nn.Module, qfn: QFn = None):
        super().__init__()
        self.inner = inner
        self.qfn = qfn

    def forward(self, x, attn_mask=None, is_causal: bool = False, mask=None):
        return attention_forward(self.inner, x, mask if mask is not None else attn_mask, self.qfn, is_causal)


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


class Instrumented:
    """Temporary instrumentation of a model for a calibration pass, as a context manager: forward pre-hooks,
    forward hooks and submodule swaps (an attention module behind an :class:`AttnHook`) installed inside the
    ``with`` block are all removed, and the original submodules put back, when it exits, also on error; so a
    failed calibration never leaves a model hooked."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list = []
        self._swapped: dict[str, nn.Module] = {}

    def pre_hook(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def hook(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def swap(self, path: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Replace the submodule at ``path`` by ``make(original)`` until exit; returns the original."""
        orig = self.model.get_submodule(path)
        self._swapped.setdefault(path, orig)
        set_submodule(self.model, path, make(orig))
        return orig

    def __enter__(self) -> "Instrumented":
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for path, orig in self._swapped.items():
            set_submodule(self.model, path, orig)
        self._handles, self._swapped = [], {}


@dataclass
class Point:
    """A quantized layer: a Linear/Conv2d (weight + input) or an attention module (q, k, attn, v)."""

    module: str
    kind: str  # "linear" | "conv" | "attn"
    macs: int = 0  # per image
    norm: str | None = None  # LayerNorm that feeds this Linear (SQ-b candidate)
    post_gelu: bool = False  # fc2: input is a GELU output (OPT-m candidate)
    is_head: bool = False


@dataclass
class Graph:
    """The quantization points of a prepared model, in forward order, plus the LN -> Linear feed groups."""

    points: list[Point]
    norm_groups: dict[str, list[str]] = field(default_factory=dict)  # LayerNorm path -> Linear paths it feeds

    def get(self, module: str) -> Point:
        for p in self.points:
            if p.module == module:
                return p
        raise KeyError(module)


def head_module_name(model: nn.Module) -> str | None:
    for name in ("head", "head.fc"):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(m, nn.Linear):
            return name
    return None


def enumerate_points(model: nn.Module, image_size: tuple[int, int] | None = None) -> Graph:
    """Quantization points of a prepared model, ordered as executed, with per-image MACs (measured by a 1-image
    forward). LayerNorm feeders are found structurally: ``norm1 -> attn.qkv``, ``norm2 -> mlp.fc1`` in every
    block, ``norm -> reduction`` in Swin's PatchMerging."""
    if image_size is None:
        image_size = tuple(model.patch_embed.img_size) if hasattr(model, "patch_embed") else (224, 224)
    mods = dict(model.named_modules())
    order: list[str] = []
    macs: dict[str, int] = {}

    def lin_hook(name):
        def h(mod, inp, out):
            x = inp[0]
            if isinstance(mod, nn.Linear):
                n = x.numel() // x.shape[-1] * mod.in_features * mod.out_features
            else:
                n = out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            if name not in macs:
                order.append(name)
            macs[name] = macs.get(name, 0) + n
        return h

    attn_names = [n for n, m in mods.items() if is_attention(m)]
    with Instrumented(model) as ins, torch.no_grad():
        for n, m in mods.items():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                ins.hook(m, lin_hook(n))
        for n in attn_names:
            ins.swap(n, lambda inner, n=n: _CountingAttn(inner, n, order, macs))
        model(torch.zeros(1, 3, *image_size))
    head = head_module_name(model)
    norm_groups: dict[str, list[str]] = {}
    for n, m in mods.items():
        pre = n + "." if n else ""
        if isinstance(getattr(m, "norm1", None), nn.LayerNorm) and is_attention(getattr(m, "attn", nn.Identity())):
            norm_groups[pre + "norm1"] = [pre + "attn.qkv"]
            if isinstance(getattr(m, "norm2", None), nn.LayerNorm) and hasattr(getattr(m, "mlp", None), "fc1"):
                norm_groups[pre + "norm2"] = [pre + "mlp.fc1"]
        if isinstance(getattr(m, "norm", None), nn.LayerNorm) and isinstance(getattr(m, "reduction", None),
                                                                             nn.Linear):
            norm_groups[pre + "norm"] = [pre + "reduction"]
    fed = {lin: ln for ln, lins in norm_groups.items() for lin in lins}
    points = []
    for n in order:
        m = mods[n]
        kind = "attn" if n in attn_names else ("conv" if isinstance(m, nn.Conv2d) else "linear")
        if kind == "conv" and m.groups != 1:
            continue
        post_gelu = kind == "linear" and n.endswith("mlp.fc2") and \
            isinstance(model.get_submodule(n.rsplit(".", 1)[0]).act, nn.GELU)
        points.append(Point(n, kind, int(macs[n]), fed.get(n), post_gelu, n == head))
    return Graph(points, norm_groups)


class _CountingAttn(nn.Module):
    def __init__(self, inner, name, order, macs):
        super().__init__()
        self.inner, self.name, self.order, self.macs = inner, name, order, macs

    def forward(self, x, attn_mask=None, is_causal: bool = False, mask=None):
        shapes = {}

        def qfn(role, t):
            shapes[role] = t.shape
            return t

        if self.name not in self.macs:
            self.order.append(self.name)
            self.macs[self.name] = 0
        out = attention_forward(self.inner, x, mask if mask is not None else attn_mask, qfn, is_causal)
        q, v = shapes["q"], shapes["v"]
        n_q = q.numel() // q[-1]  # B*H*N
        self.macs[self.name] += n_q * v[-2] * q[-1] + n_q * v[-2] * v[-1]
        return out


def model_chain(model: nn.Module, family: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The model as a chain of stages ``(prefix, fn)`` (embedding, each block, tail) so searches can restart a
    forward from a cached stage input. ``prefix`` is the module path prefix the stage owns."""
    chain: list[tuple[str, Callable]] = []
    if family == "vit":
        def embed(x, m=model):
            x = m.patch_embed(x)
            x = m._pos_embed(x)
            x = m.patch_drop(x)
            return m.norm_pre(x)

        chain.append(("patch_embed", embed))
        for i, b in enumerate(model.blocks):
            chain.append((f"blocks.{i}.", b))
        chain.append(("", lambda x, m=model: m.forward_head(m.norm(x))))
    elif family == "swin":
        chain.append(("patch_embed", model.patch_embed))
        for i, stage in enumerate(model.layers):
            chain.append((f"layers.{i}.downsample", stage.downsample))
            for j, b in enumerate(stage.blocks):
                chain.append((f"layers.{i}.blocks.{j}.", b))
        chain.append(("", lambda x, m=model: m.forward_head(m.norm(x))))
    else:
        raise UnsupportedError(f"model family {family!r} is not supported for quantization")
    return chain


def stage_of(chain, module: str) -> int:
    """Index of the chain stage that owns ``module`` (the tail owns what no other stage does)."""
    for i, (prefix, _) in enumerate(chain[:-1]):
        if prefix and (module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + ".")):
            return i
    return len(chain) - 1
