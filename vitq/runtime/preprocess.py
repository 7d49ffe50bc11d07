"""Image preprocessing without torch: timm's evaluation transform in PIL + numpy.

timm's eval pipeline for ViT/DeiT/Swin (``resolve_data_config`` + ``create_transform``) is
``Resize(floor(size / crop_pct), interpolation) -> CenterCrop(size) -> ToTensor -> Normalize(mean, std)``. torchvision
runs that on a PIL image with PIL's own resampling, so the same PIL calls plus the same float32 arithmetic give the
same tensor bit for bit (``tests/test_preprocess.py`` checks it against timm). The config travels inside every vitq
artifact (ONNX metadata key ``vitq.preprocess``), so a deployed model carries its own preprocessing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError, UnsupportedError

_PIL_INTERP = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """The subset of timm's data config that defines evaluation preprocessing."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if self.interpolation not in _PIL_INTERP:
            raise UnsupportedError(f"preprocessing: interpolation {self.interpolation!r} is not supported "
                                   f"(supported: {', '.join(sorted(_PIL_INTERP))})")
        if self.crop_mode not in ("center", "squash"):
            raise UnsupportedError(f"preprocessing: crop_mode {self.crop_mode!r} is not supported (center, squash)")
        if len(self.input_size) != 3 or self.input_size[0] != 3:
            raise UnsupportedError(f"preprocessing: input_size {self.input_size} must be (3, H, W)")

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        for k in ("input_size", "mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if kw.get("crop_pct") is None:
            kw.pop("crop_pct", None)
        if kw.get("crop_mode") is None:
            kw.pop("crop_mode", None)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def height(self) -> int:
        return int(self.input_size[1])

    @property
    def width(self) -> int:
        return int(self.input_size[2])


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, forcing a full decode so that truncated/corrupt files fail here, naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None


def decode_image_bytes(data: bytes, what: str = "request body") -> Image.Image:
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode {what} as an image: {e}") from None


def preprocess(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """PIL RGB image -> float32 array ``[3, H, W]``, normalized as ``cfg`` says."""
    th, tw = cfg.height, cfg.width
    interp = _PIL_INTERP[cfg.interpolation]
    if cfg.crop_mode == "squash":
        sh, sw = math.floor(th / cfg.crop_pct), math.floor(tw / cfg.crop_pct)
        img = img.resize((sw, sh), interp)
    else:  # center: torchvision Resize(int) scales the shorter side
        if th != tw:
            sh, sw = math.floor(th / cfg.crop_pct), math.floor(tw / cfg.crop_pct)
            img = img.resize((sw, sh), interp)
        else:
            size = math.floor(th / cfg.crop_pct)
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            if short != size:
                new_short, new_long = size, int(size * long / short)
                new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
                img = img.resize((new_w, new_h), interp)
    w, h = img.size
    if w < tw or h < th:
        raise DataError(f"image of size {w}x{h} is smaller than the crop {tw}x{th} after resizing")
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    img = img.crop((left, top, left + tw, top + th))
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return (arr - mean) / std


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    return np.stack([preprocess(im, cfg) for im in images]).astype(np.float32, copy=False)
