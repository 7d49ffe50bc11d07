"""One definition per vitq custom op: name, namespace, version, attributes, I/O, and a numpy reference.

The numpy reference functions here are the **semantic truth** for each op. Every other implementation (the
standard-ONNX expansion in :mod:`vitq.plugins.expand`, the CUDA kernels in ``kernels/``, the TensorRT plugin in
``trt/``) is checked against them.

QuantLinearA4
    A linear layer with per-tensor symmetric int4 activations and per-output-channel symmetric int4 (or int8)
    weights. TensorRT runs int8 activations and int4 weights natively but has no int4-activation path, so W4A4 needs
    this plugin. It is exactly what standard ONNX computes for::

        X -> QuantizeLinear(act_scale, zp=int4 0) -> DequantizeLinear -> MatMul(., DequantizeLinear(W, w_scale, axis))
          [-> Add(bias)]

    up to float rounding of the products and summation order (see :func:`quant_linear_a4_ref`). With
    ``act_dynamic=1`` the activation quantizer is instead the per-row (per-token) asymmetric uint4 one of MixA-Q's
    dynamic low branch (``vitq.passes.dynamic_qdq``): scale and zero point from each row's own min/max at run time;
    with ``act_group=G`` too, one per G consecutive features of a row (``--mixa-low-group``).

"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InputError

#: TensorRT plugin namespace of every vitq plugin (the ``plugin_namespace`` node attribute).
NAMESPACE = "vitq"
#: ONNX domain of vitq plugin nodes. TensorRT's ONNX parser finds plugins by op_type (= plugin name) plus the
#: ``plugin_version`` / ``plugin_namespace`` attributes and does not look at the domain; a non-default domain keeps
#: the node from being mistaken for a standard op by ONNX tools. "trt.plugins" is what NVIDIA ModelOpt uses.
DOMAIN = "trt.plugins"
VERSION = "1"


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "float" | "int"
    default: Any = None  # None: required
    doc: str = ""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, or "float32|float16"
    shape: str  # symbolic, for documentation
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class OpSpec:
    name: str
    attrs: tuple[AttrSpec, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    reference: Callable[..., Any]
    doc: str
    #: True when the lowering pass emits this op by default (a plugin exists and was justified).
    shipped: bool = True
    namespace: str = NAMESPACE
    version: str = VERSION
    domain: str = DOMAIN
    notes: tuple[str, ...] = field(default=())
    #: cross-attribute check on the resolved attributes (raises :class:`InputError`), or None
    check: Callable[[dict[str, Any]], None] | None = None

    def attr(self, name: str) -> AttrSpec:
        for a in self.attrs:
            if a.name == name:
                return a
        raise KeyError(name)

    def resolve_attrs(self, given: dict[str, Any]) -> dict[str, Any]:
        """Given attributes plus defaults; raises :class:`InputError` naming a missing/unknown attribute."""
        known = {a.name for a in self.attrs}
        unknown = set(given) - known - {"plugin_namespace", "plugin_version"}
        if unknown:
            raise InputError(f"{self.name}: unknown attribute(s) {sorted(unknown)}")
        out = {}
        for a in self.attrs:
            if a.name in given:
                out[a.name] = float(given[a.name]) if a.type == "float" else int(given[a.name])
            elif a.default is None:
                raise InputError(f"{self.name}: required attribute {a.name!r} missing")
            else:
                out[a.name] = a.default
        if self.check is not None:
            self.check(out)
        return out


# ---------------------------------------------------------------------------------------------------------------
# QuantLinearA4
# ---------------------------------------------------------------------------------------------------------------

def qrange(bits: int) -> tuple[int, int]:
    """Symmetric signed range of a ``bits``-bit integer: (-2^(b-1), 2^(b-1)-1)."""
    if bits not in (4, 8):
        raise InputError(f"unsupported bit width {bits} (expected 4 or 8)")
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_act_ref(x: np.ndarray, act_scale: float, act_bits: int = 4) -> np.ndarray:
    """ONNX QuantizeLinear(x, scale, zp=0) into a signed ``act_bits`` integer, as int32.

    ``round(x / scale)`` with round-half-to-even, the division done in float32 (onnxruntime divides; it does not
    multiply by a reciprocal, and neither may the CUDA kernel), then saturation to the integer range."""
    lo, hi = qrange(act_bits)
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(x / np.float32(act_scale))  # np.rint rounds half to even
    return np.clip(q, lo, hi).astype(np.int32)


DYN_LEVELS = {4: 15}  # uint4 grid of the dynamic per-row mode: 0..15
DYN_EPS = 1e-8  # == vitq.recipe.schema.DYN_EPS (a test keeps them equal; the runtime imports neither torch nor this)


ACT_GROUPS = (0, 32, 64, 128, 256)  # act_group values the dynamic mode takes (0: one grid per row)


def _grouped(x: np.ndarray, group: int) -> np.ndarray:
    """x [..., K] as [..., K / group, group] (``group`` 0: [..., 1, K])."""
    k = x.shape[-1]
    g = group or k
    if k % g:
        raise InputError(f"QuantLinearA4: K={k} is not a multiple of act_group={group}")
    return x.reshape(*x.shape[:-1], k // g, g)


def dynamic_row_params_ref(x: np.ndarray, act_bits: int = 4, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (last axis) scale and zero point of the dynamic mode, in float32, op for op as the standard-ONNX chain
    of :func:`vitq.passes.dynamic_qdq.dynamic_qdq_nodes` computes them (and ``fake_quant_dynamic`` in torch)::

        lo = min(min_k x, 0); hi = max(max_k x, 0); s = max((hi - lo) / 15, 1e-8); z = rint(-(lo / s))

    Returns (s, z) with shape ``x.shape[:-1] + (1,)``; z holds integers in [0, 15] as float32. With ``group`` G > 0
    the same per G consecutive features of a row (the chain's ``Reshape`` to [..., K / G, G]): shape
    ``x.shape[:-1] + (K / G,)``."""
    if act_bits not in DYN_LEVELS:
        raise InputError(f"QuantLinearA4: the dynamic mode quantizes activations to 4 bits, not {act_bits}")
    xg = _grouped(np.asarray(x, dtype=np.float32), group)
    lo = np.minimum(xg.min(axis=-1), np.float32(0))
    hi = np.maximum(xg.max(axis=-1), np.float32(0))
    s = np.maximum((hi - lo) / np.float32(DYN_LEVELS[act_bits]), np.float32(DYN_EPS)).astype(np.float32)
    z = np.rint(-(lo / s)).astype(np.float32)
    return s, z


def quantize_act_dynamic_ref(x: np.ndarray, act_bits: int = 4, group: int = 0
                             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row (per-group with ``group`` > 0) asymmetric quantization of the dynamic mode: (q - z as int32 in
    [-15, 15], s, z). ``q = clip(rint(x / s) + z, 0, 15)``: ONNX QuantizeLinear to uint4 with one block per row
    (per group)."""
    s, z = dynamic_row_params_ref(x, act_bits, group)
    xg = _grouped(np.asarray(x, dtype=np.float32), group)
    q = np.clip(np.rint(xg / s[..., None]) + z[..., None], 0, DYN_LEVELS[act_bits])
    return (q - z[..., None]).astype(np.int32).reshape(np.shape(x)), s, z


def quant_linear_a4_ref(x: np.ndarray, w_q: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None = None, *,
                        act_scale: float = 0.0, act_bits: int = 4, weight_bits: int = 4,
                        act_dynamic: int = 0, act_group: int = 0) -> np.ndarray:
    """Reference QuantLinearA4 (float32 output).

    Static (``act_dynamic=0``): ``Y = ((float(xq @ W_q^T) * act_scale) * w_scale) + bias`` with
    ``xq = clip(round_half_even(x / act_scale), -8, 7)``.

    Dynamic per row (``act_dynamic=1``, ``act_scale`` unused): per row m, ``s_m, z_m`` from the row's own min/max
    (:func:`dynamic_row_params_ref`), ``d = clip(rint(x / s_m) + z_m, 0, 15) - z_m`` (integers in [-15, 15]) and
    ``Y = ((float(d @ W_q^T) * s_m) * w_scale) + bias``. This is what standard ONNX computes for the blocked uint4
    Q/DQ chain of ``vitq.passes.dynamic_qdq`` feeding the MatMul, up to float rounding of the products and the
    summation order.

    Dynamic per group (``act_dynamic=1, act_group=G``): the same per G consecutive features of a row (scale
    ``s_mg``, zero point ``z_mg``), one exact integer sum per group, then in float32, groups in order::

        t = 0;  for g in 0 .. K/G - 1:  t = t + float(acc_g) * s_mg;   Y = (t * w_scale) + bias

    (``acc_g = sum_{k in group g} d[m,k] W[n,k]``, exact; every product and sum rounded once, no FMA.)

    x: float32 [..., K]; w_q: int8 [N, K] holding values in the ``weight_bits`` range; w_scale: float32 [N];
    bias: float32 [N] or None.

    The integer product is exact (int64 here, int32 in the kernel: |acc| <= K * 15 * 128 < 2^31 for any realistic
    K), then scaled in the exact float32 order above; the CUDA kernel uses the same order with no FMA contraction,
    so for float32 output it is bit-exact while |acc| < 2^24.

    Standard ONNX (QuantizeLinear -> DequantizeLinear -> MatMul with DequantizeLinear'd weights -> Add) computes
    ``sum_k (xq_k * act_scale) * (w_nk * w_scale_n) + bias_n``: the same real number; the float32 results differ
    only by rounding of the per-term products and the summation order (|diff| <= ~K * eps * sum_k |term_k|).
    """
    lo_w, hi_w = qrange(weight_bits)
    w_q = np.asarray(w_q)
    if w_q.ndim != 2:
        raise InputError(f"QuantLinearA4: W_q must be 2-D [N, K], got shape {w_q.shape}")
    if w_q.size and (w_q.min() < lo_w or w_q.max() > hi_w):
        raise InputError(f"QuantLinearA4: W_q values outside the int{weight_bits} range [{lo_w}, {hi_w}]")
    n, k = w_q.shape
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] != k:
        raise InputError(f"QuantLinearA4: X last dim {x.shape[-1]} != K={k}")
    w_scale = np.asarray(w_scale, dtype=np.float32).reshape(-1)
    if w_scale.shape != (n,):
        raise InputError(f"QuantLinearA4: w_scale must have shape [{n}], got {w_scale.shape}")
    if act_dynamic not in (0, 1):
        raise InputError(f"QuantLinearA4: act_dynamic must be 0 or 1, got {act_dynamic}")
    if act_group not in ACT_GROUPS or (act_group and not act_dynamic):
        raise InputError(f"QuantLinearA4: act_group must be one of {ACT_GROUPS[1:]} with act_dynamic=1, or 0; got "
                         f"{act_group}")
    if act_group:
        d, s, _ = quantize_act_dynamic_ref(x, act_bits, act_group)
        ng = k // act_group
        dg = d.reshape(-1, ng, act_group).astype(np.int64)
        wg = w_q.astype(np.int64).reshape(n, ng, act_group)
        sg = s.reshape(-1, ng)
        y = np.zeros((dg.shape[0], n), np.float32)
        for gi in range(ng):  # float32 steps in group order, as the kernel does
            acc_g = (dg[:, gi, :] @ wg[:, gi, :].T).astype(np.float32)  # exact
            y = (y + acc_g * sg[:, gi:gi + 1]).astype(np.float32)
    elif act_dynamic:
        d, s, _ = quantize_act_dynamic_ref(x, act_bits)
        xq, row_scale = d.astype(np.int64), s.reshape(-1, 1)
    else:
        if not np.float32(act_scale) > 0:
            raise InputError(f"QuantLinearA4: act_scale must be > 0 in the static mode, got {act_scale}")
        xq, row_scale = quantize_act_ref(x, act_scale, act_bits).astype(np.int64), np.float32(act_scale)
    if not act_group:
        acc = xq.reshape(-1, k) @ w_q.astype(np.int64).T  # exact
        y = acc.astype(np.float32) * row_scale
    y = y * w_scale[None, :]
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float32).reshape(1, n)
    return y.astype(np.float32).reshape(*x.shape[:-1], n)


def _check_quant_linear(a: dict[str, Any]) -> None:
    if a["act_dynamic"] not in (0, 1):
        raise InputError(f"QuantLinearA4: act_dynamic must be 0 or 1, got {a['act_dynamic']}")
    if a["act_bits"] != 4:
        raise InputError(f"QuantLinearA4: act_bits={a['act_bits']} unsupported (only 4)")
    if a["act_group"] not in ACT_GROUPS or (a["act_group"] and not a["act_dynamic"]):
        raise InputError(f"QuantLinearA4: act_group must be one of {ACT_GROUPS[1:]} with act_dynamic=1, or 0; got "
                         f"{a['act_group']}")
    if not a["act_dynamic"] and not (a["act_scale"] > 0 and math.isfinite(a["act_scale"])):
        raise InputError(f"QuantLinearA4: the static mode (act_dynamic=0) needs act_scale > 0, got {a['act_scale']}")


QUANT_LINEAR_A4 = OpSpec(
    name="QuantLinearA4",
    attrs=(
        AttrSpec("act_scale", "float", 0.0, "per-tensor symmetric activation scale (float32, > 0); static mode only"),
        AttrSpec("act_bits", "int", 4, "activation bit width; only 4 is supported"),
        AttrSpec("weight_bits", "int", 4, "4 (W_q values in [-8, 7]) or 8 (values in [-128, 127])"),
        AttrSpec("act_dynamic", "int", 0, "0: static per-tensor act_scale; 1: per-row asymmetric uint4 scale and "
                                          "zero point from the row's min/max (MixA-Q's dynamic low branch)"),
        AttrSpec("act_group", "int", 0, "with act_dynamic=1: one scale / zero point per this many consecutive "
                                        "features of a row (32, 64, 128 or 256; K a multiple of it); 0: per row"),
    ),
    inputs=(
        TensorSpec("X", "float32", "[..., K]"),
        TensorSpec("W_q", "int8", "[N, K]", doc="one int8 per weight (int4 values in [-8,7] when weight_bits=4), "
                                              "row n = output channel; the CUDA side packs it (see docs/plugins.md)"),
        TensorSpec("w_scale", "float32", "[N]", doc="per-output-channel symmetric weight scale"),
        TensorSpec("bias", "float32", "[N]", optional=True),
    ),
    outputs=(TensorSpec("Y", "float32", "[..., N]"),),
    reference=quant_linear_a4_ref,
    check=_check_quant_linear,
    doc="W4A4 / W8A4 linear layer with fused int4 activation quantization (static per tensor, or dynamic per row).",
)


SPECS: dict[str, OpSpec] = {s.name: s for s in (QUANT_LINEAR_A4,)}
