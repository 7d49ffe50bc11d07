"""The ORT CPU target knows its instruction set: ISA detection from CPU-flag fixtures, the form each ISA gets, the
recipe each ISA turns ``w8a8`` into, the runtime's warning, and each form's exactness on the CPU running the tests
(ORT's fused kernels against the unoptimized graph: exact where the form's arithmetic says so, and the saturation
observed where it says it is not)."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from test_pass_insert_qdq import dq_of, gemm_inputs, inits, lin, recipe_for, tiny_block
from test_pass_lower_ort_cpu import saturating_matmul
from vitq.passes.infra import run_passes
from vitq.passes.insert_qdq import InsertQDQ
from vitq.passes.lower_ort_cpu import LowerOrtCpu
from vitq.runtime import cpu

# /proc/cpuinfo flag lines of real CPUs (trimmed to the int8-relevant part)
EPYC_ZEN2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 ssse3 sse4_1 avx f16c fma avx2 bmi2\n"
SKYLAKE_X = "flags\t\t: fpu sse2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl\n"
CASCADE_LAKE = "flags\t\t: fpu avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni\n"
ALDER_LAKE = "flags\t\t: fpu avx2 fma avx_vnni\n"
SAPPHIRE_RAPIDS = ("flags\t\t: fpu avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile "
                   "amx_int8\n")
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve i8mm\n"

CPUS = {"avx2": EPYC_ZEN2, "avx512": SKYLAKE_X, "vnni": CASCADE_LAKE, "amx": SAPPHIRE_RAPIDS, "arm64": GRAVITON3}


@pytest.mark.parametrize("isa,text", [*CPUS.items(), ("vnni", ALDER_LAKE)])
def test_isa_from_cpuinfo_fixtures(isa, text):
    info = cpu.detect(text, machine="aarch64" if isa == "arm64" else "x86_64")
    assert info.isa == isa and info.source == "given"
    assert ("asimddp" in info.flags) == (isa == "arm64")


def test_detect_fallbacks(tmp_path):
    """No flags line: arm64 reads AT_HWCAP/AT_HWCAP2 from /proc/self/auxv; otherwise the architecture decides, with
    the form exact on every CPU of it (avx2's on x86)."""
    (tmp_path / "self").mkdir()
    auxv = struct.pack("<QQQQQQ", 16, 1 << 20, 26, 1 << 13, 0, 0)  # HWCAP_ASIMDDP, HWCAP2_I8MM
    (tmp_path / "self" / "auxv").write_bytes(auxv)
    (tmp_path / "cpuinfo").write_text("processor\t: 0\n")
    arm = cpu.detect(machine="aarch64", proc=tmp_path, sys_root=tmp_path)
    assert arm.isa == "arm64" and arm.source == "/proc/self/auxv" and {"asimddp", "i8mm"} <= set(arm.flags)
    x86 = cpu.detect(machine="x86_64", proc=tmp_path / "missing", sys_root=tmp_path)
    assert x86.isa == "avx2" and x86.source == "platform.machine()"


def test_running_cpu_and_resolve(monkeypatch):
    monkeypatch.setenv("VITQ_CPU_ISA", "amx")
    assert cpu.running_cpu().isa == "amx" and cpu.resolve_isa("auto")[0] == "amx"
    assert cpu.resolve_isa("vnni") == ("vnni", "given")
    with pytest.raises(ValueError, match="unknown --cpu 'avx9'"):
        cpu.resolve_isa("avx9")
    with pytest.raises(ValueError, match="unknown isa"):
        LowerOrtCpu("sse")


def test_choose_form_w8a8_is_the_best_exact_form_per_isa():
    """``--recipe w8a8``: full 8-bit weights where U8S8 accumulates in int32 (vnni, amx, arm64); 7-bit weights on
    avx2/avx512, where they are the only exact way into the fast U8S8 kernel. Other widths keep their bits."""
    got = {isa: cpu.choose_form(8, isa) for isa in cpu.ISAS}
    assert {isa: g[:2] for isa, g in got.items()} == {"avx2": ("u8u8", 7), "avx512": ("u8u8", 7),
                                                      "vnni": ("u8s8", 8), "amx": ("u8s8", 8),
                                                      "arm64": ("s8s8", 8)}
    assert "vpmaddubsw" in got["avx2"][2] and "int32" in got["vnni"][2]
    assert cpu.choose_form(4, "avx2")[:2] == ("u8u8", 4) and cpu.choose_form(7, "vnni")[:2] == ("u8s8", 7)


def test_form_check_matrix():
    ok = {("u8u8", isa) for isa in ("avx2", "avx512", "arm64")} | \
         {(f, isa) for f in ("u8s8", "s8s8") for isa in ("vnni", "amx", "arm64")}
    for form in cpu.FORMS:
        for isa in cpu.ISAS:
            msg = cpu.form_check(form, cpu.CpuInfo(isa, (), "given"))
            assert (msg is None) == ((form, isa) in ok), (form, isa, msg)
            if msg and form != "u8u8":
                assert "NOT exact" in msg
    assert "faster" in cpu.form_check("u8u8", cpu.CpuInfo("amx", (), "given"))
    assert cpu.form_check(None) is None and cpu.form_check("unknown-form") is None


def _block_qdq():
    att = {"module": "attn", "kind": "attn", **{r: {"bits": 8, "scale": [s]} for r, s in
                                                  (("q", 0.1), ("k", 0.1), ("attn", 1 / 127), ("v", 0.2))}}
    # fc1 full-range int8 weights (small scale), fc2 7-bit weights, attention 8-bit
    rec = recipe_for([lin("fc1", 8, 8, 16, scale=0.005), lin("fc2", 7, 8, 8), lin("head", 8, 8, 4), att])
    return ir.serde.serialize_model(run_passes(tiny_block(np.random.default_rng(0)), [InsertQDQ(rec)]))


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_emitted_structure_per_cpu(isa):
    """Which signedness each --cpu value emits, and the form recorded in the metadata."""
    p = LowerOrtCpu(isa)
    low = ir.serde.serialize_model(run_passes(_block_qdq(), [p], properties={"qdq"}))
    onnx.checker.check_model(low, full_check=True)
    meta = {m.key: m.value for m in low.metadata_props}
    assert meta[cpu.META_CPU_FORM] == cpu.form_for(isa) and meta[cpu.META_CPU_ISA] == isa
    I = inits(low)
    fc1, fc2 = gemm_inputs(low, "fc1/MatMul")[0], gemm_inputs(low, "fc2/MatMul")[0]
    a_dq = dq_of(low, fc1.input[0])[0]
    w1, w2 = dq_of(low, fc1.input[1])[0], dq_of(low, fc2.input[1])[0]
    act_type = I[a_dq.input[2]].data_type
    if isa == "arm64":  # S8S8: nothing rewritten
        assert act_type == T.INT8 and I[w1.input[0]].data_type == T.INT8 and p.stats["activations_to_u8"] == 0
    elif isa in ("vnni", "amx"):  # U8S8 with full 8-bit weights
        assert act_type == T.UINT8 and I[w1.input[0]].data_type == T.INT8
        assert p.stats["matmul_weights_to_u8"] == 0
    else:  # avx2/avx512: U8U8 for full-range weights, U8S8 for 7-bit ones
        assert act_type == T.UINT8 and I[w1.input[0]].data_type == T.UINT8
        assert p.stats["matmul_weights_to_u8"] == 1 and p.stats["matmul_weights_7bit_s8"] == 1
    assert I[w2.input[0]].data_type == T.INT8  # 7-bit weights are int8 in every form


def _saturating_matmul():
    """One Q/DQ MatMul whose u8*s8 pair sums exceed int16 with full-range 8-bit weights."""
    return saturating_matmul(8)


def _fused_and_plain(model: onnx.ModelProto, feeds, tmp_path=None):
    import onnxruntime as ort

    outs, ops = [], None
    for lvl in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = lvl
        so.log_severity_level = 3
        if tmp_path is not None and lvl == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        outs.append(ort.InferenceSession(model.SerializeToString(), so,
                                         providers=["CPUExecutionProvider"]).run(None, feeds)[0])
    if tmp_path is not None:
        ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    return outs[0], outs[1], ops


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_form_exact_on_this_cpu_iff_its_arithmetic_says_so(isa, tmp_path):
    """Each form's graph with ORT's optimizations (fused int8 kernels, LayerNorm/GELU fusions) against the
    unoptimized graph, on the CPU running the tests. The u8u8 form is exact on every CPU; u8s8 and s8s8 (ORT turns
    int8 activations into uint8 on x86, making it U8S8) are exact where U8S8 accumulates in int32 (VNNI, AMX, ARM)
    and, on a CPU without VNNI, show the int16 saturation the runtime warns about (on this saturating MatMul)."""
    here = cpu.detect().isa  # the hardware itself, not the suite's pinned VITQ_CPU_ISA (conftest)
    m, feeds = _saturating_matmul()
    p = LowerOrtCpu(isa)
    low = ir.serde.serialize_model(run_passes(m, [p], properties={"qdq"}))
    plain, fused, ops = _fused_and_plain(low, feeds, tmp_path)
    assert "MatMulIntegerToFloat" in ops and "MatMul" not in ops  # the Q/DQ MatMul runs ORT's int8 GEMM
    exact = cpu.form_for(isa) == "u8u8" or cpu.full_range_u8s8_exact(here)
    rel = float(np.linalg.norm(fused - plain) / np.linalg.norm(plain))
    if exact:  # integer GEMM exact: only the float epilogue's rounding (scale multiply) differs
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-4)
    else:
        assert rel > 1e-2, f"form {cpu.form_for(isa)} on {here}: expected int16 saturation, rel error {rel:.2e}"
        assert cpu.form_check(cpu.form_for(isa), cpu.CpuInfo(here, (), "given")) is not None


def test_avx2_form_block_fuses_every_int8_gemm_exactly(tmp_path):
    """The avx2 form of a transformer block (LayerNorm, Linear + bias, GELU, attention with 8-bit operands): ORT
    fuses all four Q/DQ MatMuls into MatMulIntegerToFloat (weights and the two attention GEMMs) and the bias + GELU
    into BiasGelu, and the optimized session equals the unoptimized one."""
    low = ir.serde.serialize_model(run_passes(_block_qdq(), [LowerOrtCpu("avx2")], properties={"qdq"}))
    x = np.random.default_rng(1).standard_normal((3, 5, 8)).astype(np.float32) * 2
    plain, fused, ops = _fused_and_plain(low, {"x": x}, tmp_path)
    assert ops.count("MatMulIntegerToFloat") == 4 and "MatMul" not in ops and "BiasGelu" in ops
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)


def _tiny_artifact(path, form):
    m, _ = _saturating_matmul()
    m.metadata_props.add(key=cpu.META_CPU_FORM, value=form)
    onnx.save(m, str(path))
    return path


def test_runtime_warns_once_when_the_cpu_lacks_the_form(tmp_path, monkeypatch):
    from vitq.runtime import ort_backend
    from vitq.runtime.engine import Engine

    monkeypatch.setattr(ort_backend, "_WARNED", set())
    monkeypatch.setenv("VITQ_CPU_ISA", "avx2")
    f = _tiny_artifact(tmp_path / "m.onnx", "u8s8")
    with pytest.warns(RuntimeWarning, match="NOT exact"):
        eng = Engine.load(f)
    assert any("NOT exact" in n for n in eng._b.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine.load(f)  # once per process
        monkeypatch.setattr(ort_backend, "_WARNED", set())
        Engine.load(f, optimization="disable")  # unoptimized: no fused kernels, nothing to warn about
        monkeypatch.setenv("VITQ_CPU_ISA", "vnni")
        Engine.load(f)  # the form's own CPU
    g = _tiny_artifact(tmp_path / "g.onnx", "u8u8")
    with pytest.warns(RuntimeWarning, match="faster"):
        Engine.load(g)


def test_recipe_for_cpu_maps_presets_only():
    assert cpu.recipe_for_cpu("w8a8", "avx2")[:2] == ("w7a8", "u8u8")
    assert cpu.recipe_for_cpu("w8a8", "amx")[:2] == ("w8a8", "u8s8")
    assert cpu.recipe_for_cpu("w4a8", "avx512")[:2] == ("w4a8", "u8u8")
    assert cpu.recipe_for_cpu("mp:5", "avx2")[:2] == ("mp:5", "u8u8")
    assert cpu.recipe_for_cpu("fp32", "arm64")[:2] == ("fp32", "s8s8")


@pytest.mark.parametrize("cpu_name,keep,recipe,expect", [
    ("avx2", False, "w8a8", "w7a8"), ("avx512", False, "w8a8", "w7a8"), ("vnni", False, "w8a8", "w8a8"),
    ("amx", False, "w8a8", "w8a8"), ("arm64", False, "w8a8", "w8a8"), ("avx2", True, "w8a8", "w8a8"),
    ("avx2", False, "w4a8", "w4a8"), ("avx2", False, "mp:5", "mp:5"), ("avx2", False, "fp32", "fp32")])
def test_a_preset_compiles_as_the_best_exact_form_of_the_cpu(cpu_name, keep, recipe, expect, tmp_path):
    """``--recipe w8a8 --target ort`` is 7-bit weights where full 8-bit ones saturate the fast kernel; the compile
    says so (echo and report) and ``--keep-bits`` keeps the name's bits."""
    from vitq.compiler import CompileOptions, _validate
    from vitq.targets import get_target
    from vitq.targets.ort import OrtOptions

    said = []
    job = _validate(CompileOptions(model="deit_tiny_patch16_224", out=tmp_path / "o", calib=tmp_path,
                                   recipe=recipe, target=get_target("ort", OrtOptions(cpu=cpu_name, keep_bits=keep))),
                    said.append)
    assert job.recipe.name == expect and job.requested == recipe
    assert (job.recipe_reason is not None) == (expect != recipe)
    if expect != recipe:
        assert job.recipe.weight_bits == 7 and "saturates" in job.recipe_reason and any("w7a8" in s for s in said)
    assert job.report["target_options"]["keep_bits"] is keep


def test_trt_targets_keep_the_preset(tmp_path):
    from vitq.compiler import CompileOptions, _validate

    for t in ("trt", "jetson"):
        job = _validate(CompileOptions(model="deit_tiny_patch16_224", out=tmp_path / "o", calib=tmp_path,
                                       recipe="w8a8", target=t), lambda s: None)
        assert job.recipe.name == "w8a8" and job.recipe_reason is None


def test_compile_rejects_an_unknown_cpu_before_any_work(tmp_path, capsys):
    from vitq.cli import main
    from vitq.errors import InputError
    from vitq.targets import OrtOptions

    with pytest.raises(InputError, match="--cpu 'avx9'"):
        OrtOptions(cpu="avx9")
    with pytest.raises(SystemExit) as e:  # argparse: usage error, exit 2, before the model is loaded
        main(["compile", "deit_tiny_patch16_224", "--cpu", "avx9", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "avx9" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
