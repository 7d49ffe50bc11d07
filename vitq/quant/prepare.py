"""Prepare a timm ViT-family model for quantization and enumerate its quantization points.

``prepare_model`` returns a deep copy in eval mode whose attention modules run the *explicit* path
(``fused_attn = False``): ``q@k^T`` (scaled, or cosine with a learned logit scale), position bias / mask adds,
softmax, ``attn @ v``. That copy is what SQ-b folds into, what the simulation wraps and what gets exported to ONNX,
so the exported graph has the two attention MatMuls whose inputs the recipe's ``q``/``k``/``attn``/``v`` quantizers
name. Input-independent parts are made constants once: a ``q_bias``/``v_bias`` pair joins ``qkv.bias``, Swin V2's
continuous position bias (an MLP over log-spaced coordinates) and BEiT's relative position bias become buffers.

:func:`attention_forward` is vitq's re-implementation of the explicit path for every attention kind
(:data:`vitq.exporter.models.ATTENTION_KINDS`; same ops, same order) with a hook ``qfn(role, tensor)`` applied to
each matmul operand; with ``qfn=None`` it equals timm's forward (tests check ``max|diff| <= 1e-5`` on logits).

Quantization points (:func:`enumerate_points`): every ``nn.Linear`` the forward runs (qkv or q/k/v projections,
proj, MLP fc1/fc2 incl. SwiGLU's, head, patch-merging reductions), the patch-embed ``Conv2d``, and per attention
module its four matmul operands. LayerNorm -> Linear groups (SQ-b) and post-GELU Linears (OPT-m) are found from the
data flow of one probe forward, so pre-norm blocks get SQ-b and post-norm ones (Swin V2) do not.
"""

from __future__ import annotations

import copy
import math
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedError
from ..exporter.models import attention_kind, transformer_blocks

QFn = Optional[Callable[[str, torch.Tensor], torch.Tensor]]
_KIND = "_vitq_attn_kind"


def is_attention(m: nn.Module) -> bool:
    """An attention module of a kind vitq quantizes (:func:`vitq.exporter.models.attention_kind`)."""
    return attention_kind(m) is not None


def _kind(m: nn.Module) -> str | None:
    k = m.__dict__.get(_KIND)
    return k if k is not None else attention_kind(m)


def is_window_attention(m: nn.Module) -> bool:
    """Attention over windows (batch dim = windows x images): Swin's and Swin V2's."""
    return _kind(m) in ("window", "cosine")


@torch.no_grad()
def _fold_qkv_bias(mod: nn.Module) -> None:
    """``q_bias``/``k_bias``/``v_bias`` (BEiT, EVA, Swin V2) -> ``qkv.bias``, so that ``qkv`` is one affine Linear."""
    q = getattr(mod, "q_bias", None)
    if q is None or not isinstance(getattr(mod, "qkv", None), nn.Linear):
        return
    k = getattr(mod, "k_bias", None)
    k = torch.zeros_like(q) if k is None else k
    b = torch.cat((q, k, mod.v_bias)).detach().clone()
    if mod.qkv.bias is not None:
        b = b + mod.qkv.bias.detach()
    mod.qkv.bias = nn.Parameter(b, requires_grad=False)
    mod.q_bias = None
    mod.k_bias = None
    mod.v_bias = None


@torch.no_grad()
def _const_position_bias(mod: nn.Module, kind: str) -> torch.Tensor | None:
    """The attention-logit position bias ``[1, heads, N, N]`` as timm computes it (it depends on no input)."""
    if kind == "cosine":
        if hasattr(mod, "cpb_mlp"):  # swin_transformer_v2: 16 * sigmoid(MLP(log-spaced coordinates))
            t = mod.cpb_mlp(mod.relative_coords_table).view(-1, mod.num_heads)
            n = mod.window_size[0] * mod.window_size[1]
            t = t[mod.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
            return (16 * torch.sigmoid(t)).unsqueeze(0)
        if hasattr(mod, "_relative_positional_encodings"):  # swin_transformer_v2_cr
            return mod._relative_positional_encodings()
        raise UnsupportedError(f"{type(mod).__name__}: cosine attention without a known position bias "
                               f"(cpb_mlp / meta_mlp)")
    if kind == "relpos" and getattr(mod, "relative_position_bias_table", None) is not None:
        return mod._get_rel_pos_bias()
    return None


def _prepared_forward(self, x, attn_mask=None, is_causal: bool = False, mask=None, rope=None,
                      shared_rel_pos_bias=None):
    return attention_forward(self, x, mask if mask is not None else attn_mask, None, is_causal, rope,
                             shared_rel_pos_bias)


def prepare_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (eval mode) with every attention on the explicit (non-SDPA) path; for the kinds
    timm computes with extra input-independent work (cosine, rope, relpos) the forward is :func:`attention_forward`
    with the constants precomputed."""
    m = copy.deepcopy(model).eval()
    n_attn = 0
    for mod in m.modules():
        kind = attention_kind(mod)
        if kind is None:
            continue
        if getattr(mod, "gate", None) is not None:
            raise UnsupportedError("gated attention is not supported by vitq quantization")
        mod.fused_attn = False
        mod.__dict__[_KIND] = kind
        if kind in ("cosine", "rope", "relpos"):
            _fold_qkv_bias(mod)
            bias = _const_position_bias(mod, kind)
            if bias is not None:
                mod.register_buffer("vitq_pos_bias", bias.detach().clone(), persistent=False)
            if kind == "cosine":
                for name in ("cpb_mlp", "meta_mlp"):  # replaced by the buffer; no longer quantization points
                    if hasattr(mod, name):
                        delattr(mod, name)
            mod.forward = types.MethodType(_prepared_forward, mod)
        n_attn += 1
    if n_attn == 0:
        raise UnsupportedError(f"{type(model).__name__}: no timm attention module vitq can quantize found")
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _rope(mod: nn.Module, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from timm.layers import apply_rot_embed_cat

    npt = int(getattr(mod, "num_prefix_tokens", 0))
    half = getattr(mod, "rotate_half", False)
    return torch.cat([t[:, :, :npt, :], apply_rot_embed_cat(t[:, :, npt:, :], rope, half=half)], dim=2).type_as(like)


def attention_forward(mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None, qfn: QFn = None,
                      is_causal: bool = False, rope: torch.Tensor | None = None,
                      rel_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's explicit attention path, op for op, with ``qfn`` applied to the matmul operands ``q`` (after
    ``* scale``; cosine attention: the L2-normalized ``q``), ``k`` (before the transpose), ``attn`` (post-softmax)
    and ``v``. ``mask``: ViT ``attn_mask`` or Swin's shifted-window mask; ``rope``: EVA's rotary embedding;
    ``rel_bias``: BEiT's shared relative position bias."""
    kind = _kind(mod)
    B, N, C = x.shape
    if getattr(mod, "qkv", None) is not None:  # (a Linear, or the simulation's quantized one)
        qkv = mod.qkv(x).reshape(B, N, 3, mod.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
    else:
        q = mod.q_proj(x).reshape(B, N, mod.num_heads, -1).transpose(1, 2)
        k = mod.k_proj(x).reshape(B, N, mod.num_heads, -1).transpose(1, 2)
        v = mod.v_proj(x).reshape(B, N, mod.num_heads, -1).transpose(1, 2)
    window = kind in ("window", "cosine")
    if kind in ("vit", "rope"):
        q, k = mod.q_norm(q), mod.k_norm(k)
    if kind == "rope" and rope is not None:
        q, k = _rope(mod, q, rope, v), _rope(mod, k, rope, v)
    if kind == "cosine":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    else:
        q = q * mod.scale
    if qfn is not None:
        q, k, v = qfn("q", q), qfn("k", k), qfn("v", v)
    attn = q @ k.transpose(-2, -1)
    if kind == "cosine":
        attn = attn * torch.clamp(mod.logit_scale.reshape(1, mod.num_heads, 1, 1), max=math.log(1. / 0.01)).exp()
        attn = attn + mod.vitq_pos_bias
    elif kind == "window":
        attn = attn + mod._get_rel_pos_bias()
    if window:
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, mod.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, mod.num_heads, N, N)
        attn = attn.softmax(dim=-1)
    elif kind == "relpos":
        if getattr(mod, "vitq_pos_bias", None) is not None:
            attn = attn + mod.vitq_pos_bias
        elif getattr(mod, "relative_position_bias_table", None) is not None:
            attn = attn + mod._get_rel_pos_bias()
        if rel_bias is not None:
            attn = attn + rel_bias
        attn = attn.softmax(dim=-1)
    else:
        if is_causal or mask is not None:
            from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, mask, is_causal))
        attn = attn.softmax(dim=-1)
    if qfn is not None:
        attn = qfn("attn", attn)
    x = attn @ v
    x = x.transpose(1, 2).reshape(B, N, -1)
    if kind in ("vit", "rope"):
        x = mod.norm(x)
    return mod.proj(x)


class AttnHook(nn.Module):
    """Wraps an attention module so that :func:`attention_forward` runs with a per-module ``qfn``."""

    def __init__(self, inner: nn.Module, qfn: QFn = None):
        super().__init__()
        self.inner = inner
        self.qfn = qfn

    def forward(self, x, attn_mask=None, is_causal: bool = False, mask=None, rope=None, shared_rel_pos_bias=None):
        return attention_forward(self.inner, x, mask if mask is not None else attn_mask, self.qfn, is_causal, rope,
                                 shared_rel_pos_bias)


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


def _signature(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (last dim) min and max over every other dim: equal for a tensor and any re-layout of it
    (reshape, permute, roll, window partition), different for another tensor."""
    t = t.detach().reshape(-1, t.shape[-1])
    return t.amin(0), t.amax(0)


def _same(a, b) -> bool:
    return a is not None and b is not None and a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and \
        torch.equal(a[1], b[1])


def _is_gelu(m: nn.Module) -> bool:
    return "GELU" in type(m).__name__ or "Gelu" in type(m).__name__


def _image_size(model: nn.Module) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None:
        return (224, 224)
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def enumerate_points(model: nn.Module, image_size: tuple[int, int] | None = None) -> Graph:
    """Quantization points of a prepared model, ordered as executed, with per-image MACs (measured by a 1-image
    probe forward on a seeded random image). From the same forward: a LayerNorm feeds a Linear when the Linear's
    input is the LayerNorm's output up to a re-layout (equal per-channel min/max: pre-norm ``norm1 -> qkv``,
    ``norm2 -> fc1``, sub-LN ``norm -> proj/fc2``, ``norm -> reduction``; not Swin V2's post-norm), and every
    group is checked to fold exactly (a random SQ-b shift/scale leaves the logits unchanged), else dropped. A
    Linear is post-GELU (OPT-m candidate) when its input is a GELU module's output."""
    if image_size is None:
        image_size = _image_size(model)
    mods = dict(model.named_modules())
    order: list[str] = []
    macs: dict[str, int] = {}
    in_sig: dict[str, tuple] = {}
    out_sig: dict[str, tuple] = {}
    calls: dict[str, int] = {}

    def lin_hook(name):
        def h(mod, inp, out):
            x = inp[0]
            if isinstance(mod, nn.Linear):
                n = x.numel() // x.shape[-1] * mod.in_features * mod.out_features
                in_sig.setdefault(name, _signature(x))
            else:
                n = out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            if name not in macs:
                order.append(name)
            macs[name] = macs.get(name, 0) + n
        return h

    def out_hook(name):
        def h(mod, inp, out):
            calls[name] = calls.get(name, 0) + 1
            out_sig[name] = _signature(out)
        return h

    attn_names = [n for n, m in mods.items() if is_attention(m)]
    x = torch.randn(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    dtype = next(model.parameters()).dtype
    with Instrumented(model) as ins, torch.no_grad():
        for n, m in mods.items():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                ins.hook(m, lin_hook(n))
            elif isinstance(m, nn.LayerNorm) or _is_gelu(m):
                ins.hook(m, out_hook(n))
        for n in attn_names:
            ins.swap(n, lambda inner, n=n: _CountingAttn(inner, n, order, macs))
        ref = model(x.to(dtype))
    head = head_module_name(model)
    once = {n for n, c in calls.items() if c == 1}
    norm_groups: dict[str, list[str]] = {}
    for ln in (n for n in order_of(mods, once) if isinstance(mods[n], nn.LayerNorm)):
        lins = [l for l in order if isinstance(mods[l], nn.Linear) and _same(out_sig[ln], in_sig.get(l))]
        if lins and mods[ln].weight is not None and mods[ln].bias is not None:
            norm_groups[ln] = lins
    norm_groups = _exact_groups(model, norm_groups, x.to(dtype), ref)
    fed = {lin: ln for ln, lins in norm_groups.items() for lin in lins}
    gelus = [out_sig[n] for n in once if _is_gelu(mods[n])]
    points = []
    for n in order:
        m = mods[n]
        kind = "attn" if n in attn_names else ("conv" if isinstance(m, nn.Conv2d) else "linear")
        if kind == "conv" and m.groups != 1:
            continue
        post_gelu = kind == "linear" and any(_same(g, in_sig.get(n)) for g in gelus)
        points.append(Point(n, kind, int(macs[n]), fed.get(n), post_gelu, n == head))
    return Graph(points, norm_groups)


def order_of(mods: dict, names) -> list[str]:
    """``names`` in module-registration order."""
    names = set(names)
    return [n for n in mods if n in names]


@torch.no_grad()
def _exact_groups(model: nn.Module, groups: dict[str, list[str]], x: torch.Tensor, ref: torch.Tensor
                  ) -> dict[str, list[str]]:
    """The LayerNorm -> Linear groups whose SQ-b fold leaves the model's function unchanged (the LayerNorm's
    output reaches nothing but those Linears): checked all at once, then one by one when that fails."""
    from .sqb import fold_smoothing

    if not groups:
        return groups

    def exact(sel: dict[str, list[str]]) -> bool:
        m = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        for ln, lins in sel.items():
            c = m.get_submodule(ln).normalized_shape[0]
            s = torch.rand(c, generator=g) + 0.5
            z = torch.randn(c, generator=g) * 0.1
            fold_smoothing(m.get_submodule(ln), [m.get_submodule(l) for l in lins], s.to(x.dtype), z.to(x.dtype))
        y = m(x)
        return float((y - ref).abs().max()) <= 1e-3 * max(float(ref.abs().max()), 1.0)

    if exact(groups):
        return groups
    return {ln: lins for ln, lins in groups.items() if exact({ln: lins})}


class _CountingAttn(nn.Module):
    def __init__(self, inner, name, order, macs):
        super().__init__()
        self.inner, self.name, self.order, self.macs = inner, name, order, macs

    def forward(self, x, attn_mask=None, is_causal: bool = False, mask=None, rope=None, shared_rel_pos_bias=None):
        shapes = {}

        def qfn(role, t):
            shapes[role] = t.shape
            return t

        if self.name not in self.macs:
            self.order.append(self.name)
            self.macs[self.name] = 0
        out = attention_forward(self.inner, x, mask if mask is not None else attn_mask, qfn, is_causal, rope,
                                shared_rel_pos_bias)
        q, v = shapes["q"], shapes["v"]
        n_q = q.numel() // q[-1]  # B*H*N
        self.macs[self.name] += n_q * v[-2] * q[-1] + n_q * v[-2] * v[-1]
        return out


class _StopAtBlock(Exception):
    pass


def _run_to_first_block(model: nn.Module, first: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Run ``model.forward_features`` up to ``first`` (the first transformer block): its input and the keyword
    arguments the model passes to its blocks (EVA's ``rope``, BEiT's ``shared_rel_pos_bias``; constants)."""
    got = {}

    def pre(mod, args, kwargs):
        got["x"], got["kw"] = args[0], dict(kwargs)
        raise _StopAtBlock

    h = first.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model.forward_features(x)
    except _StopAtBlock:
        pass
    finally:
        h.remove()
    if "x" not in got:
        raise UnsupportedError(f"{type(model).__name__}: forward_features never reached its first block")
    return got["x"], got["kw"]


def _tail(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(getattr(model, "norm", None), nn.Module):
        return lambda x, m=model: m.forward_head(m.norm(x))
    return lambda x, m=model: m.forward_head(x)


def model_chain(model: nn.Module, family: str) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """The model as a chain of stages ``(prefix, fn)`` (embedding, each block, tail) so searches can restart a
    forward from a cached stage input. ``prefix`` is the module path prefix the stage owns. Token models: the
    embedding is ``forward_features`` up to the first block, each block gets the constant keyword arguments the
    model passes to it; windowed models: each stage's ``downsample`` then its blocks (``[B, C, H, W]`` stages, as
    in ``swin_transformer_v2_cr``, are permuted to ``[B, H, W, C]`` and back)."""
    chain: list[tuple[str, Callable]] = []
    if family == "vit":
        blocks = list(model.blocks)
        p = next(model.parameters())
        _, kw = _run_to_first_block(model, blocks[0], torch.zeros(1, 3, *_image_size(model), dtype=p.dtype))
        kw = {k: v for k, v in kw.items() if v is not None and k != "is_causal"}

        chain.append(("patch_embed", lambda x, m=model, b0=blocks[0]: _run_to_first_block(m, b0, x)[0]))
        for i, b in enumerate(blocks):
            chain.append((f"blocks.{i}.", (lambda x, b=b, kw=kw: b(x, **kw)) if kw else b))
        chain.append(("", _tail(model)))
    elif family == "swin":
        _, blocks = transformer_blocks(model)
        attr = blocks[0][0].split(".")[0]
        stages = getattr(model, attr)
        with torch.no_grad():
            probe = model.patch_embed(torch.zeros(1, 3, *_image_size(model), dtype=next(model.parameters()).dtype))
        dim = blocks[0][1].norm1.normalized_shape[0]
        nchw = probe.ndim == 4 and probe.shape[-1] != dim and probe.shape[1] == dim
        chain.append(("patch_embed", model.patch_embed))
        for i, stage in enumerate(stages):
            pre = (lambda x: x.permute(0, 2, 3, 1)) if nchw else (lambda x: x)
            chain.append((f"{attr}.{i}.downsample", lambda x, s=stage, pre=pre: s.downsample(pre(x))))
            nb = len(stage.blocks)
            for j, b in enumerate(stage.blocks):
                if nchw and j == nb - 1:
                    chain.append((f"{attr}.{i}.blocks.{j}.", lambda x, b=b: b(x).permute(0, 3, 1, 2)))
                else:
                    chain.append((f"{attr}.{i}.blocks.{j}.", b))
        chain.append(("", _tail(model)))
    else:
        raise UnsupportedError(f"model family {family!r} is not supported for quantization")
    return chain


def stage_of(chain, module: str) -> int:
    """Index of the chain stage that owns ``module`` (the tail owns what no other stage does)."""
    for i, (prefix, _) in enumerate(chain[:-1]):
        if prefix and (module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + ".")):
            return i
    return len(chain) - 1
