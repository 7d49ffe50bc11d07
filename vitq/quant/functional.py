"""The quantization arithmetic, defined once.

``fake_quant(x, scale, bits)`` is exactly what ONNX ``QuantizeLinear`` (zero point 0, saturating to the signed
``bits`` range, round half to even) followed by ``DequantizeLinear`` computes in float32, so the torch simulation and
the Q/DQ graph agree bit for bit on each quantizer:

    q = clamp(round_half_even(x / scale), -2^(bits-1), 2^(bits-1) - 1)
    y = q * scale

With a grid ``shift`` (recipe schema) the quantizer acts on ``x - c`` and the dequantized value is ``q * scale + c``.

For bits < 8 other than 4 (e.g. 6) the graph realizes the narrower range with int8 Q/DQ plus a ``Clip`` on the
integer tensor, which computes the same function.

**Dynamic per-token** activations (recipe ``"dynamic": "token"``, :func:`fake_quant_dynamic`): each token (each
slice along the feature ``axis``) gets its own asymmetric grid from its own min and max at run time, the function of
ONNX blocked ``QuantizeLinear``/``DequantizeLinear`` (``uint{bits}``, block = the whole feature axis) with scale and
zero point computed in the graph from ``ReduceMin``/``ReduceMax``:

    lo = min(min_axis x, 0), hi = max(max_axis x, 0), s = max((hi - lo) / (2^bits - 1), DYN_EPS)
    z = round_half_even(-lo / s), q = clamp(round_half_even(x / s) + z, 0, 2^bits - 1), y = (q - z) * s

With a ``group`` size g (recipe ``"group": g``), each token's features are split into consecutive groups of g along
the last axis and each group gets its own grid (ONNX: the same chain with ``block_size = g``).

**Dynamic log-sqrt(2)** (recipe ``"dynamic": "log_sqrt2"``, :func:`fake_quant_log_sqrt2`; the post-softmax operand
only): per row (last axis) with ``m = max(max x, DYN_EPS)``, code ``c = #{t : x / m < t}`` over the thresholds of
:func:`vitq.recipe.schema.log_sqrt2_grid` and ``y = m * level[c]`` (``level[c] = 2^(-c/2)``, the last code 0). In
ONNX: ``ReduceMax``, ``Div``, ``Less`` against the thresholds, ``ReduceSum``, ``Gather`` from the levels, ``Mul``.
"""

from __future__ import annotations

import torch

from ..recipe.schema import DYN_EPS, log_sqrt2_grid


def fake_quant_dynamic(x: torch.Tensor, bits: int, axis: int = -1, group: int = 0) -> torch.Tensor:
    """Per-token dynamic asymmetric quantize-dequantize over ``axis`` (see the module docstring); with ``group``, per
    group of ``group`` consecutive features along the last axis."""
    if group:
        k = x.shape[-1]
        if axis not in (-1, x.dim() - 1) or k % group:
            raise ValueError(f"grouped dynamic quantization: the last axis (size {k}) must be a multiple of the "
                             f"group size {group}, and axis must be -1 (got {axis})")
        return fake_quant_dynamic(x.reshape(*x.shape[:-1], k // group, group), bits).reshape(x.shape)
    n = float((1 << bits) - 1)
    lo = torch.clamp(x.amin(axis, keepdim=True), max=0.0)
    hi = torch.clamp(x.amax(axis, keepdim=True), min=0.0)
    s = torch.clamp((hi - lo) / n, min=DYN_EPS)
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0.0, n) - z) * s


def fake_quant_log_sqrt2(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row (last axis) dynamic log-sqrt(2) quantize-dequantize relative to the row max (module docstring)."""
    th, lv = (torch.from_numpy(a).to(x.dtype) for a in log_sqrt2_grid(bits))
    m = torch.clamp(x.amax(-1, keepdim=True), min=DYN_EPS)
    r = x / m
    c = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for t in th:  # one comparison per threshold (no [..., n] intermediate)
        c += r < t
    return lv.to(x.device)[c] * m


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer grid values (as float tensor). ``scale`` broadcasts against ``x``."""
    lo, hi = qrange(bits)
    return torch.clamp(torch.round(x / scale), lo, hi)  # torch.round: half to even, like ONNX


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, bits: int, shift: int = 0) -> torch.Tensor:
    """Quantize-dequantize in float32 (the function a Q/DQ pair computes). ``shift`` (integer grid steps, per-tensor
    scales only) shifts the grid: ``fq(x - c) + c`` with ``c = float32(scale * shift)``, exactly the graph's
    ``Sub(x, c) -> Q -> DQ`` plus the constant restored after the GEMM."""
    if not torch.is_tensor(scale):
        scale = torch.tensor(scale, dtype=torch.float32, device=x.device)
    scale = scale.to(x.dtype)
    if shift:
        c = shift_offset(scale, shift).to(x.dtype)
        return quantize(x - c, scale, bits) * scale + c
    return quantize(x, scale, bits) * scale


def shift_offset(scale: torch.Tensor | float, shift: int) -> torch.Tensor:
    """``c = scale * shift`` rounded to float32 once (the constant the graph stores)."""
    return torch.tensor(float(torch.as_tensor(scale, dtype=torch.float32).reshape(-1)[0]) * shift,
                        dtype=torch.float32)


def fake_quant_spec(x: torch.Tensor, spec) -> torch.Tensor:
    """``fake_quant`` with a recipe ``QuantSpec`` (per-tensor)."""
    return fake_quant(x, torch.tensor(spec.scale, dtype=torch.float32), spec.bits, spec.shift)


def weight_scale_map(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A weight quantizer's scales broadcast against ``w`` [O, ...]: one per output channel (``scale`` [O], or one
    for the tensor), or one per group of ``g`` consecutive input features of a row (``scale`` [O * C/g] row-major,
    ``C = w[0].numel()``, groups along the flattened input: the recipe's weight ``group``). The scale count alone
    decides, so every caller handles both."""
    scale = scale.to(w.dtype)
    o, n = w.shape[0], scale.numel()
    if n in (1, o):
        return channel_scale(scale, w.ndim, 0)
    c = w[0].numel()
    if n % o or c % (n // o):
        raise ValueError(f"{n} weight scales fit neither {o} output channels nor groups of the {c} inputs per row")
    return scale.reshape(o, n // o).repeat_interleave(c // (n // o), dim=1).reshape(w.shape)


def channel_scale(scale: torch.Tensor, ndim: int, axis: int = 0) -> torch.Tensor:
    """Reshape a per-channel scale vector to broadcast along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)
