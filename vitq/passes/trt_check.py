"""``trt_check``: a lint (no rewrite) for TensorRT explicit quantization.

Reports what TensorRT's ONNX parser will reject (**errors**) or build into slow / float kernels (**warnings**):

errors
  ``ASYMMETRIC_ZERO_POINT``  a Q/DQ zero point that is not 0 (TensorRT quantization is symmetric)
  ``UINT8_QDQ``              uint8 Q/DQ (e.g. an ORT-lowered graph): TensorRT Q/DQ are int8 / int4 / fp8 / fp4
  ``QDQ_PARAMS_NOT_CONST``   scale / zero point not initializers (required by the parser)
  ``INT4_ACTIVATION``        int4 QuantizeLinear on an activation: no native kernel; needs vitq's plugin lowering
                             (``vitq.passes.lower_trt``)
  ``DYNAMIC_ACTIVATION``     a blocked (per-token) uint Q/DQ left in the graph: needs ``lower_trt`` /
                             ``dynamic_qdq_float``
  ``SUB8_ACTIVATION``        a Clip on the integer tensor between Q and DQ (6-bit etc. activations): breaks the Q/DQ
                             pair, TensorRT cannot fuse it into an int8 GEMM
  ``AXIS``                   per-channel weight DQ along the wrong axis for its consumer (or scale length mismatch)
  ``BLOCKED_WEIGHT``         a blocked weight DQ (group-wise scales, an ORT-target recipe): TensorRT runs block-
                             quantized weights only weight-only; the TensorRT targets calibrate per channel
  ``UNSUPPORTED_OP``         an op outside onnx-tensorrt's operator support (or a custom domain without a plugin)
warnings
  ``FLOAT_GEMM``             a MatMul/Gemm/Conv with no Q/DQ on its inputs: runs in float
  ``PARTIAL_QDQ``            a GEMM with only one operand quantized: no int8 kernel (weight-only / act-only)
  ``QDQ_NOT_ADJACENT``       a DQ reaches a GEMM input only through other ops (TensorRT may not propagate it)
  ``QDQ_ON_NORM_SOFTMAX``    Q/DQ on a LayerNormalization / Softmax input (those run in float: extra reformat)
  ``INT4_WEIGHT``            int4 weights: TensorRT runs them weight-only (dequantized), not as an int4 GEMM
  ``SUB8_WEIGHT``            6-bit (etc.) weights stored as int8: run as int8 (correct, no extra speed)
  ``SUB8_ACT_AS_INT8``       a sub-8-bit activation lowered to float Clip + int8 Q/DQ (``clip_sub8_activations``):
                             exact, runs as an int8 GEMM (no sub-8-bit speed)
  ``DYNAMIC_ACT_FLOAT``      a dynamic per-token quantizer lowered to float arithmetic (``dynamic_qdq_float``):
                             exact, its matmul runs in float
  ``LOG_ACT_FLOAT``          a log-sqrt(2) post-softmax quantizer (float element-wise ops by construction): exact,
                             its ``attn @ v`` matmul runs in float
  ``DECOMPOSED_LAYERNORM``   ReduceMean/Sub/Pow/.../Div LayerNorm: slower, fp16-overflow prone; export at opset
                             >= 17 to keep LayerNormalization
  ``OPSET``                  opset outside the range this list was written for

The operator list follows onnx-tensorrt's ``docs/operators.md`` (TensorRT 10.x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from ..format import NODE_LOWERED
from .analysis import QDQ_OPS
from .dynamic_qdq import META_DYNAMIC
from .infra import GraphPass, to_ir
from .irutil import META_BITS, META_MODULE, const_array, consumers, module_of

# onnx-tensorrt docs/operators.md (TensorRT 10.x): ops marked supported. (Not supported there, among others:
# BitShift, Compress, ConcatFromSequence, ConvInteger, DFT, Det, DynamicQuantizeLinear, MatMulInteger, MaxRoiPool,
# MaxUnpool, Multinomial, Optional*, QLinearConv, QLinearMatMul, Sequence*, SplitToSequence, STFT, StringNormalizer,
# TfIdfVectorizer, Unique, and all com.microsoft contrib ops.)
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Bernoulli
BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast CastLike Ceil Celu CenterCropPad Clip Col2Im Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow
HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow
PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
TRT_OPSET_RANGE = (9, 22)
PLUGIN_DOMAINS = ("vitq", "trt", "trt.plugins")  # custom ops backed by a TensorRT plugin (vitq.plugins)
GEMM_OPS = ("MatMul", "Gemm", "Conv")
_PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")


@dataclass
class TrtIssue:
    severity: str  # "error" | "warning"
    code: str
    message: str
    node: str | None = None
    module: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrtReport:
    issues: list[TrtIssue] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[TrtIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[TrtIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def codes(self, severity: str | None = None) -> set[str]:
        return {i.code for i in self.issues if severity is None or i.severity == severity}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "errors": [i.to_dict() for i in self.errors],
                "warnings": [i.to_dict() for i in self.warnings], "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrtReport":
        """Inverse of :meth:`to_dict` (e.g. from ``build_deployable``'s report)."""
        return cls([TrtIssue(**i) for i in list(d.get("errors", [])) + list(d.get("warnings", []))],
                   dict(d.get("stats", {})))

    def format_text(self, max_per_code: int = 5) -> str:
        lines = [f"trt_check: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
                 + (f"; {self.stats['gemms_int8']}/{self.stats['gemms']} GEMM/Conv nodes fully quantized"
                    if "gemms" in self.stats else "")]
        for sev in ("error", "warning"):
            by_code: dict[str, list[TrtIssue]] = {}
            for i in self.issues:
                if i.severity == sev:
                    by_code.setdefault(i.code, []).append(i)
            for code, items in sorted(by_code.items()):
                lines.append(f"  {sev.upper()} {code} ({len(items)}):")
                for i in items[:max_per_code]:
                    where = ", ".join(x for x in (f"module {i.module}" if i.module else "",
                                                  f"node {i.node}" if i.node else "") if x)
                    lines.append(f"    - {i.message}" + (f"  [{where}]" if where else ""))
                if len(items) > max_per_code:
                    lines.append(f"    ... and {len(items) - max_per_code} more")
        return "\n".join(lines)


def _mod(n: ir.Node) -> str | None:
    return n.metadata_props.get(META_MODULE) or module_of(n)


def _expected_weight_axis(consumer: ir.Node, index: int, ndim: int) -> int | None:
    if index != 1:
        return None
    if consumer.op_type == "MatMul":
        return ndim - 1
    if consumer.op_type == "Gemm":
        tb = consumer.attributes.get("transB")
        return 0 if tb is not None and tb.as_int() == 1 else 1
    if consumer.op_type == "Conv":
        return 0
    return None


def check(model: onnx.ModelProto | ir.Model | str) -> TrtReport:
    m = to_ir(model)
    g = m.graph
    rep = TrtReport()
    add = lambda sev, code, msg, n=None: rep.issues.append(  # noqa: E731
        TrtIssue(sev, code, msg, n.name if n is not None else None, _mod(n) if n is not None else None))

    opset = m.opset_imports.get("", m.opset_imports.get("ai.onnx", 0))
    if not TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]:
        add("warning", "OPSET", f"opset {opset} outside {TRT_OPSET_RANGE[0]}..{TRT_OPSET_RANGE[1]} (onnx-tensorrt "
                                f"10.x)")
    n_gemm = n_int8 = 0
    for n in g:
        std = n.domain in ("", "ai.onnx")
        if not std:
            if n.domain not in PLUGIN_DOMAINS:
                add("error", "UNSUPPORTED_OP", f"{n.domain}::{n.op_type} is a custom-domain op with no TensorRT "
                                               f"plugin", n)
            continue
        if n.op_type not in TRT_SUPPORTED_OPS:
            add("error", "UNSUPPORTED_OP", f"{n.op_type} is not in onnx-tensorrt's supported operators", n)
        if n.op_type in QDQ_OPS:
            _check_qdq(n, add)
        if n.op_type in GEMM_OPS:
            n_gemm += 1
            if _check_gemm(n, add):
                n_int8 += 1
        if n.op_type in ("LayerNormalization", "Softmax"):
            p = n.inputs[0].producer() if n.inputs[0] is not None else None
            if p is not None and p.op_type == "DequantizeLinear":
                add("warning", "QDQ_ON_NORM_SOFTMAX", f"Q/DQ on the input of {n.op_type} (runs in float in "
                                                      f"TensorRT): an extra reformat, no int8 kernel", n)
        if n.op_type == "ReduceMean":
            _check_decomposed_ln(n, add)
        if n.op_type == "Less" and n.metadata_props.get(META_DYNAMIC) == "log_sqrt2":
            add("warning", "LOG_ACT_FLOAT", f"log-sqrt(2) {n.metadata_props.get(META_BITS, '?')}-bit post-softmax "
                                            f"activation as float element-wise ops (exact; its matmul runs in "
                                            f"float)", n)
        if n.op_type == "Round" and n.metadata_props.get(NODE_LOWERED) == "dynamic_float":
            add("warning", "DYNAMIC_ACT_FLOAT", f"dynamic per-token {n.metadata_props.get(META_BITS, '?')}-bit "
                                                f"activation as float element-wise ops (exact; its matmul runs in "
                                                f"float)", n)
    rep.stats = {"gemms": n_gemm, "gemms_int8": n_int8, "nodes": g.num_nodes(), "opset": opset}
    return rep


def _check_qdq(n: ir.Node, add) -> None:
    if n.metadata_props.get(META_DYNAMIC):
        if n.op_type == "QuantizeLinear":
            add("error", "DYNAMIC_ACTIVATION", f"dynamic per-token {n.metadata_props.get(META_BITS, '?')}-bit "
                                               f"activation (blocked uint Q/DQ): TensorRT has no such quantizer; "
                                               f"build with the trt target's pipeline (lower_trt takes 4-bit linear "
                                               f"inputs into the QuantLinearA4 plugin, dynamic_qdq_float makes the "
                                               f"rest float)", n)
        return
    scale = const_array(n.inputs[1])
    zp_v = n.inputs[2] if len(n.inputs) > 2 else None
    zp = const_array(zp_v)
    if scale is None or (zp_v is not None and zp is None):
        add("error", "QDQ_PARAMS_NOT_CONST", f"{n.op_type}: scale and zero point must be initializers", n)
    if zp is not None and np.any(zp.astype(np.int64) != 0):
        add("error", "ASYMMETRIC_ZERO_POINT", f"{n.op_type}: zero point {zp.reshape(-1)[:4].tolist()} is not 0 "
                                              f"(TensorRT quantization is symmetric)", n)
    qt = zp_v.dtype if zp_v is not None else ir.DataType.UINT8
    if n.op_type == "QuantizeLinear" and "output_dtype" in n.attributes:
        qt = ir.DataType(n.attributes["output_dtype"].as_int())
    elif n.op_type == "DequantizeLinear" and n.inputs[0] is not None and n.inputs[0].dtype is not None:
        qt = n.inputs[0].dtype
    if qt in (ir.DataType.UINT8, ir.DataType.UINT4):
        add("error", "UINT8_QDQ", f"{n.op_type} on {qt.name}: TensorRT Q/DQ are signed (int8/int4); build the TRT "
                                  f"target from the un-lowered Q/DQ graph", n)
    if n.op_type == "QuantizeLinear":
        if n.metadata_props.get(NODE_LOWERED) == "clip_int8":
            bits = n.metadata_props.get(META_BITS, "?")
            add("warning", "SUB8_ACT_AS_INT8", f"{bits}-bit activation runs as int8 (float Clip to the {bits}-bit "
                                               f"range, then int8 Q/DQ: exact, no sub-8-bit speed)", n)
        if qt == ir.DataType.INT4:
            add("error", "INT4_ACTIVATION", "int4 activation quantization has no native TensorRT kernel; lower it "
                                            "with vitq.passes.lower_trt (plugin)", n)
        for c in consumers(n.outputs[0]):
            if c.op_type == "Clip":
                bits = n.metadata_props.get(META_BITS, "?")
                add("error", "SUB8_ACTIVATION", f"{bits}-bit activation (int8 Q -> Clip -> DQ): TensorRT cannot fuse "
                                                f"the Clip on the int8 tensor; the GEMM input falls out of int8", n)
    else:  # DequantizeLinear
        w = const_array(n.inputs[0])
        if w is None:
            return
        if qt == ir.DataType.INT4:
            add("warning", "INT4_WEIGHT", "int4 weights run weight-only in TensorRT (dequantized before the GEMM); "
                                          "no int4 GEMM kernel for per-channel W4A8", n)
        blk = n.attributes.get("block_size")
        if blk is not None and blk.as_int():
            add("error", "BLOCKED_WEIGHT", f"group-wise weight scales (block_size {blk.as_int()}): TensorRT takes "
                                           f"block-quantized weights only with float activations; recalibrate for "
                                           f"--target trt (one scale per output channel)", n)
            return
        bits = n.metadata_props.get(META_BITS)
        if bits is not None and int(bits) not in (4, 8):
            add("warning", "SUB8_WEIGHT", f"{bits}-bit weights stored as int8 run as int8 (correct; no extra speed)",
                n)
        ax_attr = n.attributes.get("axis")
        axis = ax_attr.as_int() if ax_attr is not None else 1
        if scale is not None and scale.size > 1:
            axis_n = axis % w.ndim
            for c, idx in ((u.node, u.idx) for u in n.outputs[0].uses()):
                exp = _expected_weight_axis(c, idx, w.ndim)
                if exp is not None and axis_n != exp:
                    add("error", "AXIS", f"per-channel weight DQ on axis {axis} but {c.op_type} input {idx} has its "
                                         f"output channels on axis {exp}", n)
            if scale.size != w.shape[axis_n]:
                add("error", "AXIS", f"{scale.size} scales for axis {axis} of a {list(w.shape)} weight", n)


def _dq_reaches(v: ir.Value | None) -> str:
    """'direct' if ``v`` is a DQ output, 'indirect' through pass-through ops, else ''."""
    p = v.producer() if v is not None else None
    if p is None:
        return ""
    if p.op_type == "DequantizeLinear":
        return "direct"
    for _ in range(4):
        if p is None or p.op_type not in _PASS_THROUGH:
            return ""
        p = p.inputs[0].producer() if p.inputs[0] is not None else None
        if p is not None and p.op_type == "DequantizeLinear":
            return "indirect"
    return ""


def _check_gemm(n: ir.Node, add) -> bool:
    r = [_dq_reaches(v) for v in n.inputs[:2]]
    if not any(r):
        add("warning", "FLOAT_GEMM", f"{n.op_type} has no Q/DQ on its inputs: runs in float", n)
        return False
    if not all(r):
        which = "input" if not r[0] else "weight/second operand"
        add("warning", "PARTIAL_QDQ", f"{n.op_type}: {which} is not quantized: no int8 kernel", n)
        return False
    if "indirect" in r:
        add("warning", "QDQ_NOT_ADJACENT", f"{n.op_type}: a DQ reaches an input only through reshape/transpose ops; "
                                           f"place Q/DQ directly on the GEMM input", n)
    return True


def _check_decomposed_ln(n: ir.Node, add) -> None:
    for sub in consumers(n.outputs[0]):
        if sub.op_type != "Sub":
            continue
        for sq in consumers(sub.outputs[0]):
            if sq.op_type in ("Pow", "Mul") and any(c.op_type == "ReduceMean" for c in consumers(sq.outputs[0])):
                add("warning", "DECOMPOSED_LAYERNORM", "LayerNorm decomposed into ReduceMean/Sub/Pow/ReduceMean/Sqrt/"
                                                       "Div: slower and fp16-overflow prone; export at opset >= 17 to "
                                                       "keep LayerNormalization", n)
                return


class TrtCheck(GraphPass):
    """The lint as a (non-modifying) pass; the report lands in ``self.report`` and ``stats``."""

    NAME = "trt_check"
    SEMANTICS = "exact"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = check(model)
        self.stats = {"errors": len(self.report.errors), "warnings": len(self.report.warnings)}
        return ir.passes.PassResult(model, modified=False)


def trt_check() -> TrtCheck:
    return TrtCheck()
