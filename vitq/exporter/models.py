"""timm model loading: by name, ``pretrained=False``, weights from a local file, strict key matching."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..artifacts import sha256_file
from ..errors import InputError, ModelError, UnsupportedError

#: timm model classes vitq knows how to quantize (DeiT is a VisionTransformer in timm).
SUPPORTED_FAMILIES = {
    "VisionTransformer": "vit",
    "VisionTransformerDistilled": "vit",
    "SwinTransformer": "swin",
}

_CHECKPOINT_WRAPPERS = ("state_dict", "model", "model_ema", "module")


@dataclass
class LoadedModel:
    name: str
    family: str  # "vit" | "swin"
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
    cls = type(model).__name__
    family = SUPPORTED_FAMILIES.get(cls)
    if family is None:
        raise UnsupportedError(f"model {name!r} is a {cls}; vitq supports ViT, DeiT and Swin "
                               f"({', '.join(sorted(SUPPORTED_FAMILIES))})")
    return model.eval(), family


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
