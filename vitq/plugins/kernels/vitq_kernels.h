/*
 * vitq CUDA kernels: C API (device pointers + cudaStream_t; all launches are asynchronous on `stream`).
 *
 * Semantics are defined by the numpy references in vitq/plugins/specs.py; see vitq/plugins/NOTES.md for what has
 * and has not been compiled / run.
 *
 * Weight packing for VITQ_W_INT4_PACKED ("packed int4"): a uint8 array [N, K/2], row n = output channel, element
 * (n, k) in byte n*(K/2) + k/2, low nibble for even k, high nibble for odd k, two's complement (-8..7). This is the
 * layout the s4 mma.sync B operand (.col) wants: 8 consecutive k of one column in one 32-bit register, lowest k in
 * the lowest bits. vitq_pack_int4() makes it from the int8 [N, K] tensor the ONNX plugin node carries.
 */
#ifndef VITQ_KERNELS_H
#define VITQ_KERNELS_H

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes (0 = launched). */
enum vitq_status {
    VITQ_OK = 0,
    VITQ_ERR_SHAPE = 1,      /* a shape precondition failed (see each function) */
    VITQ_ERR_ARCH = 2,       /* device compute capability < 8.0 */
    VITQ_ERR_ARG = 3,        /* null pointer, bad enum or non-positive / non-finite scale */
    VITQ_ERR_CUDA = 4        /* a CUDA runtime call or launch failed (cudaGetLastError) */
};

enum vitq_weight_format {
    VITQ_W_INT4_PACKED = 0,  /* uint8 [N, K/2], see above; values -8..7 */
    VITQ_W_INT8 = 1          /* int8 [N, K] row-major, values -128..127 (W8A4) */
};

enum vitq_out_dtype { VITQ_OUT_F32 = 0, VITQ_OUT_F16 = 1 };

enum vitq_gemm_path {
    VITQ_PATH_AUTO = 0,      /* s4 mma on sm_80..sm_89 with packed int4 weights, else s8 mma */
    VITQ_PATH_S4_MMA = 1,    /* mma.sync m16n8k64 s4.s4 (sm_80..sm_89 only; int4 weights only) */
    VITQ_PATH_S8_MMA = 2     /* mma.sync m16n8k32 s8.s8 on int4 values widened to int8 (sm_80+, incl. sm_90) */
};

/* Pack int8 [N, K] (values must be -8..7; not checked on device) into packed int4 [N, K/2]. K % 8 == 0. */
int vitq_pack_int4(const int8_t* w, uint8_t* packed, int N, int K, cudaStream_t stream);

/*
 * QuantLinearA4 (semantics: vitq/plugins/specs.py::quant_linear_a4_ref), per call
 *   static  (act_dynamic = 0): xq = clamp(rint(X / act_scale), -8, 7)   (IEEE division, round-half-even: exactly
 *           ONNX QuantizeLinear to int4), Y[m, n] = ((float(sum_k xq[m,k] * W[n,k]) * act_scale) * w_scale[n]) + bias[n]
 *   dynamic (act_dynamic = 1, MixA-Q's per-token low branch), per row m:
 *           lo = min(min_k x, 0), hi = max(max_k x, 0), s_m = max((hi - lo) / 15, 1e-8), z_m = rint(-(lo / s_m)),
 *           d = clamp(rint(X / s_m) + z_m, 0, 15) - z_m   (ONNX uint4 QuantizeLinear minus its zero point),
 *           Y[m, n] = ((float(sum_k d[m,k] * W[n,k]) * s_m) * w_scale[n]) + bias[n]
 *   grouped dynamic (act_dynamic = 1, act_group = G in {32, 64, 128, 256}, K % G == 0, S8 path): s_mg, z_mg and d
 *           as above over each group g of G consecutive k of row m; acc_g = sum_{k in g} d[m,k] * W[n,k] (exact), and
 *           in float32, groups in order: t = 0; t = t + float(acc_g) * s_mg; Y[m, n] = (t * w_scale[n]) + bias[n]
 * x: float32 [M, K] row-major, 16-byte aligned; w_scale: float32 [N]; bias: float32 [N] or NULL; y: float32 or
 * float16 [M, N] row-major. Float32 output is bit-exact w.r.t. the reference while |acc| < 2^24 (always for
 * K <= 2^14 with int4 weights). Preconditions (else VITQ_ERR_SHAPE): M >= 1, N >= 1, K >= 8, K % 8 == 0.
 *
 * Two kernels: the activations are quantized once per row into a workspace, then a cp.async-pipelined
 * tensor-core GEMM runs on the prepared operands.
 *   1. once per weight tensor: vitq_prepare_weights(w, weight_format, N, K, path, wq) into a device buffer of
 *      vitq_prepared_weight_bytes(N, K, path) bytes (16-byte aligned): int8 (S8 path) or packed int4 (S4 path)
 *      rows zero-padded to a multiple of 64 bytes. Either weight format works for either path; VITQ_W_INT8 input
 *      for the S4 path must hold int4 values (-8..7, not checked), as the ONNX plugin node's int8 [N, K] does;
 *   2. per call: vitq_quant_linear_a4_prepared(..., act_scale, act_dynamic, path, workspace) with a 16-byte
 *      aligned workspace of vitq_act_workspace_bytes(M, K, path, act_dynamic, act_group) bytes (quantized rows,
 *      then for act_dynamic = 1 the scales s and zero points z, M * ng floats each ([M, ng] row-major; ng = K / G
 *      with groups, else 1), at the workspace's last 8 * M * ng bytes).
 * path must be concrete (S4_MMA or S8_MMA): vitq_resolve_path(VITQ_PATH_AUTO, weight_format, act_dynamic) gives
 * the one AUTO means on the current device (S4 on sm_80..sm_89 for static int4 weights, else S8), or a negative
 * vitq_status. The dynamic mode runs on the S8 path only (its codes span [-15, 15]). act_scale is ignored when
 * act_dynamic = 1, else it must be finite and > 0 (VITQ_ERR_ARG). act_group must be 0, or with act_dynamic = 1 and
 * the S8 path one of 32, 64, 128, 256 (else VITQ_ERR_ARG) dividing K (else VITQ_ERR_SHAPE). Size functions return 0
 * on bad arguments.
 */
size_t vitq_prepared_weight_bytes(int N, int K, int path);
size_t vitq_act_workspace_bytes(int M, int K, int path, int act_dynamic, int act_group);
int vitq_resolve_path(int path, int weight_format, int act_dynamic);
int vitq_prepare_weights(const void* w, int weight_format, int N, int K, int path, void* wq, cudaStream_t stream);
int vitq_quant_linear_a4_prepared(const float* x, const void* wq, const float* w_scale, const float* bias, void* y,
                                  int out_dtype, int M, int N, int K, float act_scale, int act_dynamic,
                                  int act_group, int path, void* workspace, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* VITQ_KERNELS_H */
