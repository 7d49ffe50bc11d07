"""The recipe: a versioned JSON document that says, per quantized timm module, every bit-width and scale.

A recipe is the single contract between calibration (``vitq.quant``, torch) and the graph passes
(``vitq.passes.insert_qdq``, ONNX): both read the same numbers and apply the same arithmetic
(:mod:`vitq.quant.functional`), so what was calibrated is what deploys.

Deployability rule: every quantizer is **symmetric** (zero point 0), weights per output channel, activations per
tensor. Bits are 2..8; only 8 (and 4 for weights) run natively in TensorRT; 4-bit activations need vitq's plugin,
6-bit is an ORT/simulation precision (trt_check reports both).

JSON layout (``schema: "vitq.recipe/1"``)::

    {"schema": "vitq.recipe/1", "name": "w8a8", "model": "deit_tiny_patch16_224",
     "provenance": {"weights_sha256": ..., "calib_sha256": ..., "calib_count": 256, "vitq_version": ...},
     "defaults": {"weight_bits": 8, "act_bits": 8},
     "layers": [
       {"module": "blocks.0.attn.qkv", "kind": "linear", "macs": 7451136,
        "weight": {"bits": 8, "scale": [... one per output channel ...], "axis": 0, "method": "mse"},
        "input":  {"bits": 8, "scale": [0.031], "method": "percentile"},
        "smooth": {"alpha": 0.5, "scale": [... per input channel ...], "shift": [...]}},
       {"module": "blocks.0.mlp.fc2", "kind": "linear", ...,
        "input": null, "input_regions": {"m": 4.0, "pos": {"bits": 8, "scale": [..]}, "neg": {...}}},
       {"module": "blocks.0.attn", "kind": "attn", "macs": ...,
        "q": {...}, "k": {...}, "attn": {...}, "v": {...}}
     ]}

Field meanings:

* ``module``: the timm module path (``model.get_submodule(module)``). For ``linear``/``conv`` it is the Linear /
  Conv2d; for ``attn`` it is the attention module whose two matmuls ``(q*scale) @ k^T`` and ``softmax(..) @ v`` get
  their operands quantized (``q`` is taken *after* the ``* scale``; ``k`` before the transpose: per-tensor
  quantization commutes with it).
* ``weight.scale``: one per output channel (``axis`` 0 of the torch weight ``[out, in(, kh, kw)]``).
* ``input.scale``: one value (per tensor).
* ``smooth`` (SQ-b): per input channel shift ``z`` and scale ``s``, already **folded** into the model that is
  exported and simulated: preceding LayerNorm ``gamma' = gamma / s``, ``beta' = (beta - z) / s``; Linear
  ``W' = W * s`` (per input column), ``b' = b + W z``. Weight scales are those of the folded ``W'``.
* ``smooth`` with ``"into": "v"`` (on an attention's ``proj``): SmoothQuant between the attention output and
  ``proj``, folded into the same attention's ``qkv`` (the ``v`` rows ``2C + j``: weight and bias divided by
  ``s_j``) and ``proj`` (input column ``j`` multiplied by ``s_j``); float-exact since ``attn @ (v / s) = (attn @
  v) / s`` per channel. ``shift`` is all 0. It evens out the per-channel ranges of the 4/6-bit per-tensor ``proj``
  input at the cost of ``v``'s.
* ``input_regions`` (OPT-m, post-GELU inputs): the input is split ``x = relu(x) + min(x, 0)``; each part has its
  own per-tensor quantizer, realized in the graph as two int8 GEMMs sharing the weight (deployable in TensorRT).
  ``m`` is the searched ratio ``pos.scale / neg.scale``. Mutually exclusive with ``input``.
* ``shift`` (optional integer, activations only, default 0): the grid is shifted by ``shift`` steps, i.e. an
  asymmetric range realized with a **symmetric** quantizer: ``q = clamp(round((x - c) / scale))``,
  ``x^ = q * scale + c`` with ``c = scale * shift`` (float32). The graph computes ``Sub(x, c) -> Q -> DQ`` (zero
  point 0) into the GEMM and adds the constant back after it: a Linear gets ``+ c * rowsum(Wq)`` (a bias), the
  ``attn @ v`` matmul ``+ c * colsum(v)``; so TensorRT still sees a plain int8 GEMM. Used for one-signed tensors:
  post-softmax probabilities and OPT-m's positive region (``shift = 2^(bits-1)``: the grid ``0..(2^bits-1)*scale``),
  OPT-m's negative region (``shift = -(2^(bits-1)-1)``), and asymmetric Linear inputs. Zero stays exactly
  representable when ``|shift| <= 2^(bits-1)``. Recipes without it are unchanged.
* ``dynamic`` (activations only; MixA-Q's dynamic low branch): no ``scale``, computed at run time.
  ``"token"``: per token, asymmetric (``group``: per ``group`` consecutive features of a Linear input);
  ``"log_sqrt2"``: the post-softmax ``attn`` operand only, per query row on the grid ``m * 2^(-c/2)`` relative to
  the row max ``m`` (:func:`log_sqrt2_grid`). See :mod:`vitq.quant.functional`.
* ``macs``: multiply-accumulates per image for this layer (bit-operations = macs * w_bits * a_bits).
* ``weights`` (optional, top level; GPTQ): ``{"file": "<stem>.weights.safetensors", "sha256": ..., "method":
  "gptq", "layers": [module, ...]}``. GPTQ changes the integer weights, so the listed layers' (post-``smooth``)
  float weights, each exactly ``q * weight.scale``, live in that sidecar next to the recipe JSON; applying the
  recipe overwrites those weights after folding ``smooth``. ``Recipe.save`` writes it, ``Recipe.load`` checks its
  presence and sha256 (tensors kept in ``Recipe.weight_tensors`` as numpy arrays).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError

SCHEMA = "vitq.recipe/1"
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
    group: int = 0  # dynamic only: one scale / zero point per `group` consecutive features of a token (0: per token)

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
        if d.get("group") not in (None, 0):
            raise RecipeError(f"{where}.group: only dynamic quantizers have groups")
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
        return cls(bits, [float(s) for s in scale], axis, method, shift)


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


@dataclass
class Recipe:
    name: str
    model: str
    layers: list[LayerSpec] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    mixa: dict[str, Any] | None = None
    schema: str = SCHEMA
    weights: dict[str, Any] | None = None  # GPTQ sidecar reference (see module doc)
    weight_tensors: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # module -> ndarray

    def layer(self, module: str) -> LayerSpec | None:
        for l in self.layers:
            if l.module == module:
                return l
        return None

    def to_dict(self) -> dict:
        d = {"schema": self.schema, "name": self.name, "model": self.model, "defaults": self.defaults,
             "provenance": self.provenance, "layers": [l.to_dict() for l in self.layers]}
        if self.mixa is not None:
            d["mixa"] = self.mixa
        if self.weights is not None:
            d["weights"] = self.weights
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        from ..artifacts import write_json_atomic

        if self.weight_tensors:  # GPTQ sidecar first: its sha256 goes into the JSON
            self.weights = _save_sidecar(Path(path), self.weight_tensors, (self.weights or {}).get("method")
                                         or self.defaults.get("weight_rounding", "gptq"))
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> "Recipe":
        _require_obj(d, where)
        schema = d.get("schema")
        if schema != SCHEMA:
            raise RecipeError(f"{where}.schema: expected {SCHEMA!r}, got {schema!r}")
        _only_keys(d, where, {"schema", "name", "model", "defaults", "provenance", "layers", "mixa", "weights"})
        for k in ("name", "model"):
            if not isinstance(d.get(k), str) or not d[k]:
                raise RecipeError(f"{where}.{k}: expected a non-empty string")
        layers = d.get("layers")
        if not isinstance(layers, list):
            raise RecipeError(f"{where}.layers: expected a list")
        specs = [LayerSpec.from_dict(l, f"{where}.layers[{i}]") for i, l in enumerate(layers)]
        seen: dict[str, int] = {}
        for i, s in enumerate(specs):
            if s.module in seen:
                raise RecipeError(f"{where}.layers[{i}].module: {s.module!r} already appears in "
                                  f"layers[{seen[s.module]}]")
            seen[s.module] = i
        for k in ("defaults", "provenance"):
            if not isinstance(d.get(k, {}), dict):
                raise RecipeError(f"{where}.{k}: expected an object")
        mixa = d.get("mixa")
        if mixa is not None:  # MixA-Q section: validated here (vitq/mixa/spec.py), kept as the plain dict
            from ..mixa.spec import MixaSpec

            MixaSpec.from_dict(mixa, f"{where}.mixa", layers=specs)
        weights = d.get("weights")
        if weights is not None:
            _require_obj(weights, f"{where}.weights")
            _only_keys(weights, f"{where}.weights", {"file", "sha256", "method", "layers"})
            f, h, wl = weights.get("file"), weights.get("sha256"), weights.get("layers")
            if not isinstance(f, str) or not f or "/" in f or "\\" in f:
                raise RecipeError(f"{where}.weights.file: expected a file name next to the recipe, got {f!r}")
            if not isinstance(h, str) or len(h) != 64:
                raise RecipeError(f"{where}.weights.sha256: expected a 64-hex-digit sha256, got {h!r}")
            if not isinstance(wl, list) or not all(isinstance(m, str) and m in seen for m in wl):
                raise RecipeError(f"{where}.weights.layers: expected a list of this recipe's layer modules")
        rec = cls(d["name"], d["model"], specs, dict(d.get("defaults", {})), dict(d.get("provenance", {})),
                  mixa)
        rec.weights = weights
        return rec

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise RecipeError(f"recipe file not found: {p}") from None
        except OSError as e:
            raise RecipeError(f"cannot read recipe file {p}: {e}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecipeError(f"recipe file {p} is not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") \
                from None
        rec = cls.from_dict(d, where=str(p))
        if rec.weights is not None:
            rec.weight_tensors = _load_sidecar(p, rec.weights)
        return rec


def _save_sidecar(recipe_path: Path, tensors: dict, method: str) -> dict:
    """Write ``<stem>.weights.safetensors`` beside ``recipe_path``; return the recipe's ``weights`` section."""
    import os
    import tempfile

    import numpy as np
    from safetensors.numpy import save_file

    from ..artifacts import sha256_file

    side = recipe_path.with_name(recipe_path.stem + ".weights.safetensors")
    arrays = {m: np.ascontiguousarray(np.asarray(t, dtype=np.float32)) for m, t in sorted(tensors.items())}
    fd, tmp = tempfile.mkstemp(prefix=f".{side.name}.", suffix=".tmp", dir=side.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp)
        os.replace(tmp, side)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"file": side.name, "sha256": sha256_file(side), "method": method, "layers": list(arrays)}


def _load_sidecar(recipe_path: Path, weights: dict) -> dict:
    """The GPTQ sidecar's tensors (numpy), after checking it exists, matches its sha256 and holds the listed
    layers."""
    from safetensors.numpy import load_file

    from ..artifacts import sha256_file

    side = recipe_path.parent / weights["file"]
    if not side.is_file():
        raise RecipeError(f"{recipe_path}: weights sidecar {side} is missing (the recipe's 'weights.file'; GPTQ "
                          f"recipes need the .weights.safetensors file saved next to the JSON)")
    h = sha256_file(side)
    if h != weights["sha256"]:
        raise RecipeError(f"{recipe_path}: weights sidecar {side} has sha256 {h}, the recipe expects "
                          f"{weights['sha256']} (file modified or from another calibration)")
    try:
        t = load_file(str(side))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on corrupt files
        raise RecipeError(f"{recipe_path}: weights sidecar {side} is not a valid safetensors file: {e}") from None
    if sorted(t) != sorted(weights["layers"]):
        raise RecipeError(f"{recipe_path}: weights sidecar {side} holds {sorted(t)}, the recipe lists "
                          f"{sorted(weights['layers'])}")
    return t


def _require_obj(d: Any, where: str) -> None:
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected an object, got {type(d).__name__}")


def _only_keys(d: dict, where: str, allowed: set[str]) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise RecipeError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} "
                          f"(allowed: {', '.join(sorted(allowed))})")
