"""timm model loading: by name, ``pretrained=False``, weights from a local file, strict key matching."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import sha256_file
from ..errors import InputError, ModelError, UnsupportedError

#: The attention variants vitq quantizes, by what identifies them structurally (attributes and the forward's
#: keyword arguments), with the timm classes that use them. A model is supported when every transformer block holds
#: one of these and the blocks sit in a layout vitq can restart stage by stage (``blocks`` of a token model, or
#: ``layers``/``stages`` of windowed stages).
ATTENTION_KINDS = {
    "vit": "q@k^T softmax attention, forward(x, attn_mask) (ViT, DeiT, DeiT III, register/distillation tokens)",
    "window": "window attention with a relative position bias table, forward(x, mask) (Swin)",
    "cosine": "cosine window attention with a learned logit scale and a continuous position bias (Swin V2)",
    "rope": "attention with rotary position embeddings, forward(x, rope) (EVA, EVA02)",
    "relpos": "attention with a relative position bias, forward(x, shared_rel_pos_bias) (BEiT, BEiT v2)",
}
_CHECKPOINT_WRAPPERS = ("state_dict", "model", "model_ema", "module")


@dataclass
class LoadedModel:
    name: str
    family: str  # "vit" (token sequence) | "swin" (windowed stages): see :func:`family_of`
    model: torch.nn.Module
    weights: dict[str, Any] = field(default_factory=dict)  # report entry: source, sha256, random_init, notes

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {"name": self.name, "family": self.family, "class": type(self.model).__name__,
                "num_params": self.num_params, "num_classes": self.num_classes}


def create_model(name: str, **kwargs: Any) -> tuple[torch.nn.Module, str]:
    """Create a timm model by name with random init (never downloads). Raises ModelError with close matches."""
    import timm

    base = name.split(".", 1)[0]
    if not timm.is_model(base):
        all_names = timm.list_models()
        close = difflib.get_close_matches(base, all_names, n=5, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}?" if close else "see `timm.list_models('*vit*')` for names"
        raise ModelError(f"unknown model name {name!r}", hint=hint)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as e:
        raise ModelError(f"timm cannot create {name!r}: {e}") from None
    return model.eval(), family_of(model, name)


def _forward_params(m: torch.nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(type(m).forward).parameters)
    except (TypeError, ValueError):
        return set()


def _is_linear(m) -> bool:
    return isinstance(m, torch.nn.Linear)


def attention_kind(m: torch.nn.Module) -> str | None:
    """The :data:`ATTENTION_KINDS` entry ``m`` is, or None. Structural: ``num_heads``, a Linear ``proj``, a fused
    ``qkv`` Linear (or ``q_proj``/``k_proj``/``v_proj``), and the forward's keyword arguments (they decide which
    position information reaches the attention logits)."""
    if not hasattr(m, "num_heads") or not _is_linear(getattr(m, "proj", None)):
        return None
    fused = _is_linear(getattr(m, "qkv", None))
    split = all(_is_linear(getattr(m, n, None)) for n in ("q_proj", "k_proj", "v_proj"))
    if not (fused or split):
        return None
    params = _forward_params(m)
    if "mask" in params and isinstance(getattr(m, "logit_scale", None), torch.nn.Parameter) and fused:
        return "cosine"
    if "rope" in params:
        return "rope"
    if "shared_rel_pos_bias" in params and fused:
        return "relpos"
    if "mask" in params and hasattr(m, "relative_position_bias_table") and fused:
        return "window"
    if "attn_mask" in params and fused and hasattr(m, "q_norm"):
        return "vit"
    return None


def _attention_like(m: torch.nn.Module) -> bool:
    return hasattr(m, "num_heads") and (hasattr(m, "proj") or hasattr(m, "qkv") or hasattr(m, "kv"))


def _missing(m: torch.nn.Module) -> str:
    """Why :func:`attention_kind` does not recognize an attention-like module (for the refusal message)."""
    if not _is_linear(getattr(m, "proj", None)):
        return "no Linear output projection 'proj'"
    if not (_is_linear(getattr(m, "qkv", None)) or _is_linear(getattr(m, "q_proj", None))):
        return "no fused 'qkv' (or q_proj/k_proj/v_proj) Linear"
    return f"a forward({', '.join(sorted(_forward_params(m) - {'self'}))}) vitq has no quantization rule for"


def transformer_blocks(model: torch.nn.Module) -> tuple[str, list[tuple[str, torch.nn.Module]]]:
    """``(layout, [(path, block)])``: ``"tokens"`` for ``model.blocks``, ``"stages"`` for the blocks of
    ``model.layers[i]`` / ``model.stages[i]``; ``("", [])`` when neither exists."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) and len(blocks):
        return "tokens", [(f"blocks.{i}", b) for i, b in enumerate(blocks)]
    for attr in ("layers", "stages"):
        stages = getattr(model, attr, None)
        if isinstance(stages, (torch.nn.ModuleList, torch.nn.Sequential)) and len(stages) and \
                all(hasattr(s, "blocks") for s in stages):
            return "stages", [(f"{attr}.{i}.blocks.{j}", b) for i, s in enumerate(stages)
                              for j, b in enumerate(s.blocks)]
    return "", []


def family_of(model: torch.nn.Module, name: str | None = None) -> str:
    """``"vit"`` (a token sequence through ``model.blocks``) or ``"swin"`` (windowed stages), decided from the
    module structure; raises :class:`UnsupportedError` naming the model class and what is missing."""
    cls = type(model).__name__
    what = f"model {name!r} ({cls})" if name else f"model {cls}"
    kinds = ", ".join(ATTENTION_KINDS)
    for path, m in model.named_modules():
        if attention_kind(m) is None and _attention_like(m) and path:
            raise UnsupportedError(f"{what}: module {path} ({type(m).__name__}) is an attention vitq cannot quantize: "
                                   f"{_missing(m)} (supported attention: {kinds})")
        if attention_kind(m) is not None and getattr(m, "gate", None) is not None:
            raise UnsupportedError(f"{what}: module {path} ({type(m).__name__}) is a gated attention; vitq has no "
                                   f"quantization rule for its sigmoid gate")
    layout, blocks = transformer_blocks(model)
    if not blocks:
        raise UnsupportedError(f"{what} is not a ViT-family model: no transformer blocks ('blocks', or "
                               f"'layers'/'stages' holding 'blocks') with a timm attention module "
                               f"(supported attention: {kinds})")
    for path, b in blocks:
        attn = getattr(b, "attn", None)
        if attn is None or attention_kind(attn) is None:
            raise UnsupportedError(f"{what}: block {path} ({type(b).__name__}) has no 'attn' module of a supported "
                                   f"kind ({kinds})")
    if not hasattr(model, "patch_embed") or not hasattr(model, "forward_head"):
        raise UnsupportedError(f"{what}: vitq needs a 'patch_embed' stem and a 'forward_head' classifier")
    kinds_used = {attention_kind(b.attn) for _, b in blocks}
    windowed = kinds_used <= {"window", "cosine"}
    if layout == "stages" and windowed:
        return "swin"
    if layout == "tokens" and not (kinds_used & {"window", "cosine"}):
        return "vit"
    raise UnsupportedError(f"{what}: attention kinds {sorted(kinds_used)} in a '{layout}' block layout are not a "
                           f"combination vitq supports (token blocks: vit/rope/relpos; stages: window/cosine)")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Read a state dict from ``.pth/.pt/.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``.
    Unwraps common checkpoint containers (``{'model': ...}``, ``{'state_dict': ...}``) and a DDP ``module.``
    prefix; what was unwrapped is returned as notes for the report."""
    p = Path(path)
    notes: list[str] = []
    if not p.exists():
        raise InputError(f"weights file not found: {p}")
    if not p.is_file():
        raise InputError(f"weights path is not a file: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        elif suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar"):
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        else:
            raise InputError(f"weights file {p}: unknown extension {suffix!r} (expected .pth, .pt, .bin or "
                             f".safetensors)")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read weights file {p}: {e.__class__.__name__}: {str(e).splitlines()[0][:300]}") \
            from None
    for _ in range(2):
        if isinstance(sd, dict) and not _is_tensor_dict(sd):
            key = next((k for k in _CHECKPOINT_WRAPPERS if k in sd and isinstance(sd[k], dict)), None)
            if key is None:
                break
            notes.append(f"unwrapped checkpoint key {key!r}")
            sd = sd[key]
    if not isinstance(sd, dict) or not _is_tensor_dict(sd):
        raise InputError(f"weights file {p} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
        notes.append("stripped 'module.' prefix")
    return sd, notes


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def state_dict_diff(model: torch.nn.Module, sd: dict[str, torch.Tensor], limit: int = 12) -> str | None:
    """A readable description of how ``sd`` fails to match ``model`` (None when it matches exactly)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if not (missing or unexpected or shape):
        return None
    lines = []

    def section(title: str, keys: list[str], fmt):
        if keys:
            lines.append(f"  {title} ({len(keys)}):")
            lines.extend(f"    {fmt(k)}" for k in keys[:limit])
            if len(keys) > limit:
                lines.append(f"    ... and {len(keys) - limit} more")

    section("missing in file", missing, lambda k: f"{k} {list(own[k].shape)}")
    section("unexpected in file", unexpected, lambda k: f"{k} {list(sd[k].shape)}")
    section("shape mismatch", shape, lambda k: f"{k}: model {list(own[k].shape)} vs file {list(sd[k].shape)}")
    return "\n".join(lines)


def load_model(name: str, weights: str | Path | None = None) -> LoadedModel:
    """Create ``name`` and load ``weights`` strictly; without weights the model keeps timm's random init (seeded
    0 for reproducibility) and the returned ``weights`` entry says ``random_init: true``."""
    if weights is None:
        torch.manual_seed(0)
        model, family = create_model(name)
        return LoadedModel(name, family, model, {"source": None, "sha256": None, "random_init": True,
                                                 "notes": ["no weights given: random initialization (seed 0)"]})
    sd, notes = read_state_dict(weights)  # check the file before building the model
    model, family = create_model(name)
    diff = state_dict_diff(model, sd)
    if diff is not None:
        raise ModelError(f"weights file {weights} does not match model {name!r}:\n{diff}",
                         hint="check the model name (size, patch, window) matches the checkpoint")
    sd = {k: v.to(model.state_dict()[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    model.eval()
    return LoadedModel(name, family, model, {"source": str(weights), "sha256": sha256_file(weights),
                                             "random_init": False, "notes": notes})


def data_config(model: torch.nn.Module) -> dict:
    """The model's own timm evaluation preprocessing config."""
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)
