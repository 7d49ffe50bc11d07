"""The recipe: a versioned JSON document that says, per quantized timm module, every bit-width and scale.

A recipe is the single contract between calibration (``vitq.quant``, torch) and the graph passes
(``vitq.passes.insert_qdq``, ONNX): both read the same numbers and apply the same arithmetic
(:mod:`vitq.quant.functional`), so what was calibrated is what deploys.

Deployability rule: every quantizer is **symmetric** (zero point 0), weights per output channel (or per group of
input features), activations per tensor. Bits are 2..8; only 8 (and 4 for weights) run natively in TensorRT; 4-bit activations need vitq's plugin,
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
* ``weight.scale``: one per output channel (``axis`` 0 of the torch weight ``[out, in(, kh, kw)]``); with
  ``weight.group`` = g, one per g consecutive input features of each output channel (``out * in / g`` scales,
  row-major: channel 0's groups first). Linear weights only; the graph carries them as a blocked
  ``DequantizeLinear`` (``block_size`` g along the input axis, ONNX opset 21).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..format import SCHEMA_RECIPE as SCHEMA
from .mixa import MixaSpec
from .spec import (ATTN_OPERANDS, DYN_EPS, DYNAMIC, KINDS, METHODS, SMOOTH_INTO, LayerSpec,  # noqa: F401 - re-exported
                   QuantSpec, RecipeError, RegionSpec, SmoothSpec, _only_keys, _require_obj, log_sqrt2_grid)

@dataclass
class Recipe:
    name: str
    model: str
    layers: list[LayerSpec] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    mixa: MixaSpec | None = None  # the MixA-Q section (vitq/recipe/mixa.py), parsed
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
            d["mixa"] = self.mixa.to_dict()
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
        if mixa is not None:  # MixA-Q section (vitq/recipe/mixa.py), parsed once
            mixa = MixaSpec.from_dict(mixa, f"{where}.mixa", layers=specs)
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
