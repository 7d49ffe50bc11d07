"""The recipe's per-layer quantizer specs (:class:`QuantSpec`, :class:`LayerSpec`, ...) and the checks they share:
plain typed data, parsed and validated from the JSON layout described in :mod:`vitq.recipe.schema`."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

KINDS = ("linear", "conv", "attn")
ATTN_OPERANDS = ("q", "k", "attn", "v")
METHODS = ("minmax", "percentile", "mse", "fixed", "search", "recon", "dynamic")
DYNAMIC = ("token", "log_sqrt2")
DYN_EPS = 1e-8  # floor of a dynamic scale (an all-zero token): vitq.quant.functional.fake_quant_dynamic


def log_sqrt2_grid(bits: int):
    """The ``"dynamic": "log_sqrt2"`` grid (per row, relative to the row's max ``m``), as float32 numpy arrays
    ``(thresholds [n], levels [n + 1])`` with ``n = 2^bits - 1``: code ``c < n`` dequantizes to
    ``m * 2^(-c/2)``, code ``n`` to 0; a value ``x`` gets the code ``c = #{t in thresholds : x / m < t}``
    (thresholds ``2^(-(c + 1/2)/2)``: round to nearest in the log domain). Comparisons against fixed float32
    thresholds, so torch (:func:`vitq.quant.functional.fake_quant_log_sqrt2`) and the graph
    (:func:`vitq.passes.dynamic_qdq.log_sqrt2_nodes`) compute it bit for bit alike. Used for the non-negative
    post-softmax operand, where a uniform 4-bit grid rounds most probabilities to 0."""
    import numpy as np

    n = (1 << bits) - 1
    c = np.arange(n, dtype=np.float64)
    return (np.exp2(-(c + 0.5) / 2).astype(np.float32),
            np.concatenate([np.exp2(-c / 2), [0.0]]).astype(np.float32))


def _f32(v: float) -> float:
    """Round to float32 (the precision the graph stores constants in)."""
    return struct.unpack("f", struct.pack("f", v))[0]


class RecipeError(InputError):
    """A malformed recipe; the message names the field path."""


@dataclass
class QuantSpec:
    bits: int
    scale: list[float]
    axis: int | None = None
    method: str = "minmax"
    shift: int = 0  # grid shift in steps (per-tensor activations only): x^ = (q + shift) * scale
    dynamic: str | None = None  # "token": per-token asymmetric scale and zero point computed at run time (no scale);
    # "log_sqrt2": per row, log-sqrt(2) grid relative to the row's max (the attention's post-softmax operand only)
    group: int = 0  # dynamic: one scale / zero point per `group` consecutive features of a token (0: per token);
    # weights (axis 0): one scale per `group` consecutive input features of each output channel (0: per channel)

    @property
    def offset(self) -> float:
        """The float the graph subtracts before QuantizeLinear and adds back after the GEMM (0 when unshifted)."""
        return _f32(_f32(self.scale[0]) * self.shift) if self.shift else 0.0

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @classmethod
    def dynamic_token(cls, bits: int, group: int = 0) -> "QuantSpec":
        return cls(bits, [], None, "dynamic", 0, "token", group)

    @classmethod
    def dynamic_log(cls, bits: int) -> "QuantSpec":
        return cls(bits, [], None, "dynamic", 0, "log_sqrt2")

    def to_dict(self) -> dict:
        if self.dynamic:
            d = {"bits": self.bits, "dynamic": self.dynamic, "method": "dynamic"}
            if self.group:
                d["group"] = int(self.group)
            return d
        d: dict[str, Any] = {"bits": self.bits, "scale": [float(s) for s in self.scale], "method": self.method}
        if self.axis is not None:
            d["axis"] = self.axis
        if self.shift:
            d["shift"] = int(self.shift)
        if self.group:
            d["group"] = int(self.group)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "QuantSpec":
        _require_obj(d, where)
        _only_keys(d, where, {"bits", "scale", "axis", "method", "shift", "dynamic", "group"})
        bits = d.get("bits")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
            raise RecipeError(f"{where}.bits: expected an integer in 2..8, got {bits!r}")
        if d.get("dynamic") is not None:
            dyn = d["dynamic"]
            if dyn not in DYNAMIC:
                raise RecipeError(f"{where}.dynamic: {dyn!r} is not one of {', '.join(DYNAMIC)}")
            if bits not in (4, 8):
                raise RecipeError(f"{where}.bits: dynamic quantizers are 4 or 8 bits, got {bits}")
            extra = [k for k in ("scale", "axis", "shift") if d.get(k) not in (None, [], 0)]
            if extra:
                raise RecipeError(f"{where}: a dynamic quantizer computes its scale at run time; remove "
                                  f"{', '.join(repr(k) for k in extra)}")
            if d.get("method", "dynamic") != "dynamic":
                raise RecipeError(f"{where}.method: a dynamic quantizer's method is 'dynamic', got {d['method']!r}")
            group = d.get("group", 0)
            if not isinstance(group, int) or isinstance(group, bool) or group < 0 or group == 1:
                raise RecipeError(f"{where}.group: expected 0 (per token) or a group size >= 2, got {group!r}")
            if dyn == "log_sqrt2":
                if group:
                    raise RecipeError(f"{where}.group: a log_sqrt2 quantizer is per row (no groups)")
                return cls.dynamic_log(bits)
            return cls.dynamic_token(bits, group)
        scale = d.get("scale")
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = [scale]
        if not isinstance(scale, list) or not scale:
            raise RecipeError(f"{where}.scale: expected a non-empty list of positive numbers")
        for i, s in enumerate(scale):
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or s <= 0:
                raise RecipeError(f"{where}.scale[{i}]: expected a positive finite number, got {s!r}")
        axis = d.get("axis")
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise RecipeError(f"{where}.axis: expected an integer or null, got {axis!r}")
        if len(scale) > 1 and axis is None:
            raise RecipeError(f"{where}: {len(scale)} scales need an 'axis'")
        method = d.get("method", "minmax")
        if method not in METHODS:
            raise RecipeError(f"{where}.method: {method!r} is not one of {', '.join(METHODS)}")
        if method == "dynamic":
            raise RecipeError(f"{where}.method: 'dynamic' needs \"dynamic\": \"token\" (and no scale)")
        shift = d.get("shift", 0)
        if not isinstance(shift, int) or isinstance(shift, bool) or abs(shift) > (1 << (bits - 1)):
            raise RecipeError(f"{where}.shift: expected an integer with |shift| <= 2^(bits-1) = {1 << (bits - 1)}, "
                              f"got {shift!r}")
        if shift and (len(scale) != 1 or axis is not None):
            raise RecipeError(f"{where}.shift: only per-tensor (activation) quantizers can be shifted")
        group = d.get("group", 0)
        if group not in (None, 0):
            if not isinstance(group, int) or isinstance(group, bool) or group < 2:
                raise RecipeError(f"{where}.group: expected a group size >= 2, got {group!r}")
            if axis != 0 or len(scale) < 2:
                raise RecipeError(f"{where}.group: only weight quantizers (axis 0, one scale per group) have static "
                                  f"groups")
        return cls(bits, [float(s) for s in scale], axis, method, shift, group=group or 0)


SMOOTH_INTO = ("norm", "v")


@dataclass
class SmoothSpec:
    alpha: float
    scale: list[float]
    shift: list[float]
    into: str = "norm"  # "norm": the preceding LayerNorm (SQ-b); "v": the attention's v projection (proj inputs)

    def to_dict(self) -> dict:
        d = {"alpha": self.alpha, "scale": [float(s) for s in self.scale], "shift": [float(z) for z in self.shift]}
        if self.into != "norm":
            d["into"] = self.into
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "SmoothSpec":
        _require_obj(d, where)
        _only_keys(d, where, {"alpha", "scale", "shift", "into"})
        into = d.get("into", "norm")
        if into not in SMOOTH_INTO:
            raise RecipeError(f"{where}.into: {into!r} is not one of {', '.join(SMOOTH_INTO)}")
        alpha = d.get("alpha")
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise RecipeError(f"{where}.alpha: expected a number in [0, 1], got {alpha!r}")
        s, z = d.get("scale"), d.get("shift")
        if not isinstance(s, list) or not isinstance(z, list) or len(s) != len(z) or not s:
            raise RecipeError(f"{where}: 'scale' and 'shift' must be non-empty lists of equal length")
        for i, v in enumerate(s):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise RecipeError(f"{where}.scale[{i}]: expected a positive finite number, got {v!r}")
        for i, v in enumerate(z):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RecipeError(f"{where}.shift[{i}]: expected a finite number, got {v!r}")
        if into == "v" and any(z):
            raise RecipeError(f"{where}: smoothing into 'v' is a pure per-channel scale ('shift' must be all 0)")
        return cls(float(alpha), [float(v) for v in s], [float(v) for v in z], into)


@dataclass
class RegionSpec:
    m: float
    pos: QuantSpec
    neg: QuantSpec

    def to_dict(self) -> dict:
        return {"m": self.m, "pos": self.pos.to_dict(), "neg": self.neg.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "RegionSpec":
        _require_obj(d, where)
        _only_keys(d, where, {"m", "pos", "neg"})
        m = d.get("m")
        if not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0:
            raise RecipeError(f"{where}.m: expected a positive number, got {m!r}")
        pos = QuantSpec.from_dict(d.get("pos"), f"{where}.pos")
        neg = QuantSpec.from_dict(d.get("neg"), f"{where}.neg")
        for nm, q in (("pos", pos), ("neg", neg)):
            if len(q.scale) != 1 or q.dynamic:
                raise RecipeError(f"{where}.{nm}: region quantizers are per tensor (one scale)")
        return cls(float(m), pos, neg)


@dataclass
class LayerSpec:
    module: str
    kind: str
    macs: int = 0
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    input_regions: RegionSpec | None = None
    smooth: SmoothSpec | None = None
    q: QuantSpec | None = None
    k: QuantSpec | None = None
    attn: QuantSpec | None = None
    v: QuantSpec | None = None

    def quantizers(self) -> dict[str, QuantSpec]:
        """Role -> spec for every quantizer present (``input_regions`` as ``input.pos``/``input.neg``)."""
        out = {}
        for role in ("weight", "input", *ATTN_OPERANDS):
            spec = getattr(self, role)
            if spec is not None:
                out[role] = spec
        if self.input_regions is not None:
            out["input.pos"] = self.input_regions.pos
            out["input.neg"] = self.input_regions.neg
        return out

    @property
    def weight_bits(self) -> int | None:
        return self.weight.bits if self.weight else None

    @property
    def act_bits(self) -> int | None:
        """Activation bits for bit-op accounting: the input's (or the widest region's); for attention the widest
        operand."""
        if self.input is not None:
            return self.input.bits
        if self.input_regions is not None:
            return max(self.input_regions.pos.bits, self.input_regions.neg.bits)
        ops = [getattr(self, r) for r in ATTN_OPERANDS if getattr(self, r) is not None]
        return max(o.bits for o in ops) if ops else None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"module": self.module, "kind": self.kind, "macs": int(self.macs)}
        for f in ("weight", "input", "input_regions", "smooth", *ATTN_OPERANDS):
            v = getattr(self, f)
            if v is not None:
                d[f] = v.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "LayerSpec":
        _require_obj(d, where)
        _only_keys(d, where, {"module", "kind", "macs", "weight", "input", "input_regions", "smooth",
                              *ATTN_OPERANDS})
        module = d.get("module")
        if not isinstance(module, str) or not module:
            raise RecipeError(f"{where}.module: expected a timm module path string, got {module!r}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise RecipeError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}")
        macs = d.get("macs", 0)
        if not isinstance(macs, int) or macs < 0:
            raise RecipeError(f"{where}.macs: expected a non-negative integer, got {macs!r}")
        opt = lambda k, c: c.from_dict(d[k], f"{where}.{k}") if d.get(k) is not None else None  # noqa: E731
        spec = cls(module, kind, macs, weight=opt("weight", QuantSpec), input=opt("input", QuantSpec),
                   input_regions=opt("input_regions", RegionSpec), smooth=opt("smooth", SmoothSpec),
                   **{r: opt(r, QuantSpec) for r in ATTN_OPERANDS})
        if spec.input is not None and spec.input.dynamic == "log_sqrt2":
            raise RecipeError(f"{where}.input: the log_sqrt2 grid is for the non-negative post-softmax 'attn' "
                              f"operand only")
        if spec.weight is not None and spec.weight.dynamic:
            raise RecipeError(f"{where}.weight: weights are quantized statically (dynamic is for activations)")
        if kind == "attn":
            if spec.weight or spec.input or spec.input_regions or spec.smooth:
                raise RecipeError(f"{where}: an 'attn' layer has only q, k, attn, v quantizers")
            for r in ("q", "k", "v"):
                q = getattr(spec, r)
                if q is not None and q.dynamic == "log_sqrt2":
                    raise RecipeError(f"{where}.{r}: the log_sqrt2 grid is for the non-negative post-softmax "
                                      f"'attn' operand only")
        else:
            if any(getattr(spec, r) for r in ATTN_OPERANDS):
                raise RecipeError(f"{where}: q/k/attn/v quantizers belong to 'attn' layers, not {kind!r}")
            if spec.input and spec.input_regions:
                raise RecipeError(f"{where}: 'input' and 'input_regions' are mutually exclusive")
            if spec.weight and len(spec.weight.scale) > 1 and spec.weight.axis != 0:
                raise RecipeError(f"{where}.weight.axis: per-channel weight scales are along axis 0 (output "
                                  f"channels), got {spec.weight.axis}")
            for nm, q in (("input", spec.input),):
                if q is not None and len(q.scale) != 1 and not q.dynamic:
                    raise RecipeError(f"{where}.{nm}: activations are quantized per tensor (one scale) or "
                                      f"dynamically per token")
        return spec


SOFTMAX_GRIDS = ("uniform", "log")  # the post-softmax operand of a dynamic layer: uniform per token, or log-sqrt(2)


def dynamic_layer(base: LayerSpec, bits: int, group: int = 0, softmax: str = "uniform") -> LayerSpec:
    """``base`` with every activation quantizer dynamic (scales computed at run time) at ``bits``, weights kept: a
    Linear's input per token, or per ``group`` consecutive features when ``group`` > 0; attention operands per token;
    the post-softmax operand per query row on the log-sqrt(2) grid with ``softmax="log"``. The low branch of MixA-Q
    and the 4-bit activations of the presets (vitq.quant.pipeline) are this one form, which ONNX Runtime runs as
    plain ops and TensorRT as the QuantLinearA4 plugin's dynamic mode."""
    import copy

    if bits not in (4, 8):
        raise InputError(f"dynamic per-token activations are 4 or 8 bits, not {bits}")
    if softmax not in SOFTMAX_GRIDS:
        raise InputError(f"post-softmax grid {softmax!r} is not one of {', '.join(SOFTMAX_GRIDS)}")
    s = copy.copy(base)
    if base.kind == "attn":
        for r in ATTN_OPERANDS:
            if getattr(base, r) is not None:
                setattr(s, r, QuantSpec.dynamic_log(bits) if r == "attn" and softmax == "log"
                        else QuantSpec.dynamic_token(bits))
    else:
        s.input, s.input_regions = QuantSpec.dynamic_token(bits, group), None
    return s


def _require_obj(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected an object, got {type(d).__name__}")


def _only_keys(d: dict, where: str, allowed: set[str]) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} "
                          f"(allowed: {', '.join(sorted(allowed))})")
