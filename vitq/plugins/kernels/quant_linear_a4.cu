// QuantLinearA4: int4-activation linear layer (semantics: vitq/plugins/specs.py::quant_linear_a4_ref).
//
// One kernel template, two tensor-core paths:
//   S4 path (sm_80/86/87/89): mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32, A = activations quantized to int4
//        on the fly while staging the tile in shared memory, B = packed int4 weights.
//   S8 path (sm_80+, used on sm_90 where there is no s4 mma.sync): mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32
//        on the same int4 values widened to int8 (weights unpacked while staging), or on int8 weights (W8A4).
// Both paths stage 32 bytes of K per row per step (64 int4 or 32 int8 values), so the fragment loads are the same.
//
// Tiling: block = 128 threads (4 warps) computes a 64x64 tile of Y; warp (wm, wn) owns 32x32 = 2 (m16) x 4 (n8)
// mma tiles. Correctness over speed: no cp.async pipelining, no double buffering, scalar X loads.
#include "vitq_kernels.h"

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int BM = 64;
constexpr int BN = 64;
constexpr int WORDS = 8;      // 32-bit words of K per row per step (32 bytes)
constexpr int SROW = WORDS + 1;  // padded shared-memory row (words)
constexpr int THREADS = 128;

// ONNX QuantizeLinear to int4 with zero point 0: saturate(rint(x / s)). __fdiv_rn keeps the IEEE division even
// under --use_fast_math; rintf rounds half to even.
__device__ __forceinline__ int quant_s4(float x, float s) {
    float v = rintf(__fdiv_rn(x, s));
    v = fminf(fmaxf(v, -8.0f), 7.0f);  // NaN -> -8 (fmaxf returns the non-NaN operand)
    return static_cast<int>(v);
}

// The dynamic per-row mode: ONNX QuantizeLinear to uint4 with the row's zero point z, minus z again (what
// DequantizeLinear subtracts): clamp(rint(x / s) + z, 0, 15) - z, an integer in [-15, 15] (int8 operand, S8 path).
__device__ __forceinline__ int quant_u4_centered(float x, float s, float z) {
    float v = rintf(__fdiv_rn(x, s)) + z;  // both integer-valued: exact
    v = fminf(fmaxf(v, 0.0f), 15.0f);
    return static_cast<int>(v - z);
}

__device__ __forceinline__ void mma_s4(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();
#endif
}

// S4: int4 operands (8 values per word); otherwise int8 operands (4 per word).
// W_PACKED: weights are packed int4 [N, K/2]; otherwise int8 [N, K].
// DYN: per-row scale / zero point (row_scale[m], row_zp[m], from dynamic_row_params_kernel) instead of act_scale.
template <bool S4, bool W_PACKED, bool OUT_F16, bool DYN>
__global__ void __launch_bounds__(THREADS)
qlinear_a4_kernel(const float* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                  const float* __restrict__ bias, void* __restrict__ y, int M, int N, int K, float act_scale,
                  const float* __restrict__ row_scale, const float* __restrict__ row_zp) {
    static_assert(S4 ? W_PACKED : true, "the s4 path needs packed int4 weights");
    static_assert(!(S4 && DYN), "the dynamic mode's operands are in [-15, 15]: int8 (S8 path) only");
    constexpr int EPW = S4 ? 8 : 4;        // elements per 32-bit word
    constexpr int KSTEP = WORDS * EPW;     // K elements per step (64 or 32)
    constexpr int EBITS = S4 ? 4 : 8;
    constexpr uint32_t EMASK = S4 ? 0xFu : 0xFFu;

    __shared__ uint32_t As[BM][SROW];
    __shared__ uint32_t Bs[BN][SROW];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;  // groupID, threadID_in_group (PTX fragment notation)
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    int acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

    for (int k0 = 0; k0 < K; k0 += KSTEP) {
        // ---- stage A: quantize + pack 64 rows x KSTEP values of X ----
        for (int i = tid; i < BM * WORDS; i += THREADS) {
            const int r = i / WORDS, wd = i % WORDS;
            const int m = m0 + r, k = k0 + wd * EPW;
            uint32_t word = 0;
            if (m < M) {
                const float* xr = x + static_cast<size_t>(m) * K;
                const float rs = DYN ? row_scale[m] : act_scale;
                const float rz = DYN ? row_zp[m] : 0.0f;
#pragma unroll
                for (int e = 0; e < EPW; ++e) {
                    if (k + e < K) {
                        const int q = DYN ? quant_u4_centered(xr[k + e], rs, rz) : quant_s4(xr[k + e], rs);
                        word |= (static_cast<uint32_t>(q) & EMASK) << (EBITS * e);
                    }
                }
            }
            As[r][wd] = word;
        }
        // ---- stage B: 64 output channels x KSTEP weights ----
        for (int i = tid; i < BN * WORDS; i += THREADS) {
            const int r = i / WORDS, wd = i % WORDS;
            const int n = n0 + r, k = k0 + wd * EPW;
            uint32_t word = 0;
            if (n < N && k < K) {  // K % 8 == 0, so a word is either fully inside or fully outside K
                if (S4) {
                    word = *reinterpret_cast<const uint32_t*>(w + static_cast<size_t>(n) * (K / 2) + k / 2);
                } else if (W_PACKED) {  // widen 4 int4 (2 bytes) to 4 int8
                    const uint32_t h = *reinterpret_cast<const uint16_t*>(w + static_cast<size_t>(n) * (K / 2) + k / 2);
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int v = static_cast<int>((h >> (4 * e)) & 0xFu);
                        const int sv = (v ^ 8) - 8;  // sign-extend 4 bits
                        word |= (static_cast<uint32_t>(sv) & 0xFFu) << (8 * e);
                    }
                } else {
                    word = *reinterpret_cast<const uint32_t*>(w + static_cast<size_t>(n) * K + k);
                }
            }
            Bs[r][wd] = word;
        }
        __syncthreads();

        // ---- tensor-core step: fragment layout from the PTX ISA (m16n8k64 .s4 / m16n8k32 .s8 share it in words)
        uint32_t a[2][4], b[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int r = wm * 32 + i * 16 + g;
            a[i][0] = As[r][t];
            a[i][1] = As[r + 8][t];
            a[i][2] = As[r][t + 4];
            a[i][3] = As[r + 8][t + 4];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = wn * 32 + j * 8 + g;
            b[j][0] = Bs[c][t];
            b[j][1] = Bs[c][t + 4];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                if (S4) mma_s4(acc[i][j], a[i], b[j]);
                else mma_s8(acc[i][j], a[i], b[j]);
            }
        __syncthreads();
    }

    // ---- epilogue: ((float(acc) * act_scale) * w_scale[n]) + bias[n], no FMA contraction (DYN: row_scale[m]) ----
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m = m0 + wm * 32 + i * 16 + g + (r >= 2 ? 8 : 0);
                const int n = n0 + wn * 32 + j * 8 + t * 2 + (r & 1);
                if (m < M && n < N) {
                    const float rs = DYN ? row_scale[m] : act_scale;
                    float v = __fmul_rn(__fmul_rn(static_cast<float>(acc[i][j][r]), rs), w_scale[n]);
                    if (bias) v = __fadd_rn(v, bias[n]);
                    const size_t o = static_cast<size_t>(m) * N + n;
                    if (OUT_F16) reinterpret_cast<__half*>(y)[o] = __float2half_rn(v);
                    else reinterpret_cast<float*>(y)[o] = v;
                }
            }
}

// One warp per row: lo = min(min_k x, 0), hi = max(max_k x, 0), s = max((hi - lo) / 15, 1e-8), z = rint(-(lo / s)),
// op for op the standard-ONNX chain (ReduceMin/ReduceMax -> Min/Max -> Sub -> Div -> Max -> Div -> Neg -> Round).
constexpr int ROW_WARPS = 4;
__global__ void __launch_bounds__(ROW_WARPS * 32)
dynamic_row_params_kernel(const float* __restrict__ x, float* __restrict__ row_scale, float* __restrict__ row_zp,
                          int M, int K) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    const float* xr = x + static_cast<size_t>(m) * K;
    float mn = 0.0f, mx = 0.0f;  // the clamp to 0 of lo / hi, folded into the initial values
    for (int k = lane; k < K; k += 32) {
        const float v = xr[k];
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    }
    if (lane == 0) {
        const float s = fmaxf(__fdiv_rn(__fsub_rn(mx, mn), 15.0f), 1e-8f);
        row_scale[m] = s;
        row_zp[m] = rintf(-__fdiv_rn(mn, s));
    }
}

__global__ void pack_int4_kernel(const int8_t* __restrict__ w, uint8_t* __restrict__ packed, size_t n_bytes) {
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n_bytes;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const uint32_t lo = static_cast<uint32_t>(w[2 * i]) & 0xFu;
        const uint32_t hi = static_cast<uint32_t>(w[2 * i + 1]) & 0xFu;
        packed[i] = static_cast<uint8_t>(lo | (hi << 4));
    }
}

template <bool S4, bool W_PACKED, bool DYN = false>
int launch_typed(const float* x, const uint8_t* w, const float* ws, const float* b, void* y, int out_dtype, int M,
                 int N, int K, float s, cudaStream_t stream, const float* rs = nullptr, const float* rz = nullptr) {
    const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
    if (out_dtype == VITQ_OUT_F16)
        qlinear_a4_kernel<S4, W_PACKED, true, DYN><<<grid, THREADS, 0, stream>>>(x, w, ws, b, y, M, N, K, s, rs, rz);
    else
        qlinear_a4_kernel<S4, W_PACKED, false, DYN><<<grid, THREADS, 0, stream>>>(x, w, ws, b, y, M, N, K, s, rs, rz);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

int device_cc() {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return -1;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return -1;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return -1;
    return major * 10 + minor;
}

}  // namespace

extern "C" int vitq_pack_int4(const int8_t* w, uint8_t* packed, int N, int K, cudaStream_t stream) {
    if (!w || !packed) return VITQ_ERR_ARG;
    if (N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    const size_t n_bytes = static_cast<size_t>(N) * (K / 2);
    const int blocks = static_cast<int>((n_bytes + 255) / 256 < 4096 ? (n_bytes + 255) / 256 : 4096);
    pack_int4_kernel<<<blocks, 256, 0, stream>>>(w, packed, n_bytes);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

extern "C" int vitq_select_path(int weight_format) {
    const int cc = device_cc();
    if (cc < 0) return -VITQ_ERR_CUDA;
    if (cc < 80) return -VITQ_ERR_ARCH;
    if (weight_format == VITQ_W_INT4_PACKED && cc < 90) return VITQ_PATH_S4_MMA;
    return VITQ_PATH_S8_MMA;
}

extern "C" int vitq_quant_linear_a4(const float* x, const void* w, int weight_format, const float* w_scale,
                                    const float* bias, void* y, int out_dtype, int M, int N, int K, float act_scale,
                                    int path, cudaStream_t stream) {
    if (!x || !w || !w_scale || !y) return VITQ_ERR_ARG;
    if (weight_format != VITQ_W_INT4_PACKED && weight_format != VITQ_W_INT8) return VITQ_ERR_ARG;
    if (out_dtype != VITQ_OUT_F32 && out_dtype != VITQ_OUT_F16) return VITQ_ERR_ARG;
    if (!(act_scale > 0.0f) || act_scale == __builtin_huge_valf()) return VITQ_ERR_ARG;
    if (M < 1 || N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    if ((M + BM - 1) / BM > 65535) return VITQ_ERR_SHAPE;  // grid.y limit
    if (path == VITQ_PATH_AUTO) {
        path = vitq_select_path(weight_format);
        if (path < 0) return -path;
    } else if (path == VITQ_PATH_S4_MMA) {
        const int cc = device_cc();
        if (cc < 0) return VITQ_ERR_CUDA;
        if (cc < 80 || cc >= 90) return VITQ_ERR_ARCH;
        if (weight_format != VITQ_W_INT4_PACKED) return VITQ_ERR_ARG;
    } else if (path == VITQ_PATH_S8_MMA) {
        const int cc = device_cc();
        if (cc < 0) return VITQ_ERR_CUDA;
        if (cc < 80) return VITQ_ERR_ARCH;
    } else {
        return VITQ_ERR_ARG;
    }
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    if (path == VITQ_PATH_S4_MMA)
        return launch_typed<true, true>(x, wb, w_scale, bias, y, out_dtype, M, N, K, act_scale, stream);
    if (weight_format == VITQ_W_INT4_PACKED)
        return launch_typed<false, true>(x, wb, w_scale, bias, y, out_dtype, M, N, K, act_scale, stream);
    return launch_typed<false, false>(x, wb, w_scale, bias, y, out_dtype, M, N, K, act_scale, stream);
}

extern "C" int vitq_dynamic_row_params(const float* x, float* row_scale, float* row_zp, int M, int K,
                                       cudaStream_t stream) {
    if (!x || !row_scale || !row_zp) return VITQ_ERR_ARG;
    if (M < 1 || K < 1) return VITQ_ERR_SHAPE;
    dynamic_row_params_kernel<<<(M + ROW_WARPS - 1) / ROW_WARPS, ROW_WARPS * 32, 0, stream>>>(x, row_scale, row_zp,
                                                                                              M, K);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

extern "C" int vitq_quant_linear_a4_dynamic(const float* x, const void* w, int weight_format, const float* w_scale,
                                            const float* bias, void* y, int out_dtype, int M, int N, int K,
                                            float* row_params, int path, cudaStream_t stream) {
    if (!x || !w || !w_scale || !y || !row_params) return VITQ_ERR_ARG;
    if (weight_format != VITQ_W_INT4_PACKED && weight_format != VITQ_W_INT8) return VITQ_ERR_ARG;
    if (out_dtype != VITQ_OUT_F32 && out_dtype != VITQ_OUT_F16) return VITQ_ERR_ARG;
    if (path != VITQ_PATH_AUTO && path != VITQ_PATH_S8_MMA) return VITQ_ERR_ARG;  // operands in [-15, 15]: s8 only
    if (M < 1 || N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    if ((M + BM - 1) / BM > 65535) return VITQ_ERR_SHAPE;
    const int cc = device_cc();
    if (cc < 0) return VITQ_ERR_CUDA;
    if (cc < 80) return VITQ_ERR_ARCH;
    float* rs = row_params;
    float* rz = row_params + M;
    const int rc = vitq_dynamic_row_params(x, rs, rz, M, K, stream);
    if (rc != VITQ_OK) return rc;
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    if (weight_format == VITQ_W_INT4_PACKED)
        return launch_typed<false, true, true>(x, wb, w_scale, bias, y, out_dtype, M, N, K, 0.0f, stream, rs, rz);
    return launch_typed<false, false, true>(x, wb, w_scale, bias, y, out_dtype, M, N, K, 0.0f, stream, rs, rz);
}

// ================================================================================================================
// Two-kernel pipeline (session 11): quantize X once per row, then a cp.async-pipelined tensor-core GEMM.
// The single-kernel version above re-quantizes every X tile once per 64 output channels (N / 64 times, with an
// IEEE division per element) and has no pipelining; measured on an H100 it runs 3-10x over torch's fp16 matmul.
// Integer accumulation is exact in any order and the epilogue is the same, so this path is bit-exact too.
//   prepared weights: bytes [N, Kb]    activations: bytes [M, Kb] (+ float row_scale[M], row_zp[M] if dynamic)
//   S8: Kb = Kp = roundup(K, 64), int8 operands;  S4: Kp = roundup(K, 128), Kb = Kp / 2, packed int4 operands.
//   The padding (k >= K) is zero in both operands, so it adds nothing to the integer sums.
// ================================================================================================================
namespace {

constexpr int P_BM = 64, P_BN = 64;
constexpr int P_BKB = 64;                 // bytes of K per pipeline stage (two mma k-steps)
constexpr int P_WORDS = P_BKB / 4;        // 16 words per row per stage
constexpr int P_SROW = P_WORDS + 4;       // + 16 bytes: rows stay 16-byte aligned, fragment loads conflict-free
constexpr int P_STAGES = 3;
constexpr int P_THREADS = 128;

inline int padded_k(int K, bool s4) { return s4 ? (K + 127) / 128 * 128 : (K + 63) / 64 * 64; }
inline int k_bytes(int K, bool s4) { return s4 ? padded_k(K, true) / 2 : padded_k(K, false); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// One warp per row. DYN: row min/max first (order-free, so exact), then the same scale / zero point arithmetic as
// dynamic_row_params_kernel. Each lane quantizes 8 consecutive k (two float4 loads) per iteration.
template <bool S4, bool DYN>
__global__ void __launch_bounds__(ROW_WARPS * 32)
quantize_rows_kernel(const float* __restrict__ x, uint8_t* __restrict__ xq, float* __restrict__ row_scale,
                     float* __restrict__ row_zp, int M, int K, int Kp, float act_scale) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    const float* xr = x + static_cast<size_t>(m) * K;
    float s = act_scale, z = 0.0f;
    if (DYN) {
        float mn = 0.0f, mx = 0.0f;
        for (int k = lane * 4; k < K; k += 128) {
            const float4 v = *reinterpret_cast<const float4*>(xr + k);
            mn = fminf(fminf(mn, v.x), fminf(fminf(v.y, v.z), v.w));
            mx = fmaxf(fmaxf(mx, v.x), fmaxf(fmaxf(v.y, v.z), v.w));
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        }
        s = fmaxf(__fdiv_rn(__fsub_rn(mx, mn), 15.0f), 1e-8f);
        z = rintf(-__fdiv_rn(mn, s));
        if (lane == 0) {
            row_scale[m] = s;
            row_zp[m] = z;
        }
    }
    const size_t rb = static_cast<size_t>(m) * (S4 ? Kp / 2 : Kp);
    for (int k = lane * 8; k < Kp; k += 256) {
        int q[8];
        if (k < K) {  // K % 8 == 0: a chunk of 8 is fully inside or fully outside
            const float4 v0 = *reinterpret_cast<const float4*>(xr + k);
            const float4 v1 = *reinterpret_cast<const float4*>(xr + k + 4);
            const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) q[e] = DYN ? quant_u4_centered(v[e], s, z) : quant_s4(v[e], s);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) q[e] = 0;
        }
        if (S4) {
            uint32_t w = 0;
#pragma unroll
            for (int e = 0; e < 8; ++e) w |= (static_cast<uint32_t>(q[e]) & 0xFu) << (4 * e);
            *reinterpret_cast<uint32_t*>(xq + rb + k / 2) = w;
        } else {
            uint2 w = make_uint2(0u, 0u);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                w.x |= (static_cast<uint32_t>(q[e]) & 0xFFu) << (8 * e);
                w.y |= (static_cast<uint32_t>(q[e + 4]) & 0xFFu) << (8 * e);
            }
            *reinterpret_cast<uint2*>(xq + rb + k) = w;
        }
    }
}

// Prepared weights [N, Kb] from the plugin's format (zero padding for k >= K).
template <bool S4>
__global__ void prepare_weights_kernel(const uint8_t* __restrict__ w, bool packed_in, uint8_t* __restrict__ wq,
                                       int N, int K, int Kb) {
    const size_t total = static_cast<size_t>(N) * Kb;
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const int n = static_cast<int>(i / Kb), j = static_cast<int>(i % Kb);
        uint8_t v = 0;
        if (S4) {  // packed out: byte j holds k = 2j (low nibble), 2j + 1
            if (2 * j < K) {
                if (packed_in) {
                    v = w[static_cast<size_t>(n) * (K / 2) + j];
                } else {  // int8 holding int4 values
                    const uint8_t* r = w + static_cast<size_t>(n) * K + 2 * j;
                    v = static_cast<uint8_t>((r[0] & 0xF) | ((r[1] & 0xF) << 4));
                }
            }
        } else if (j < K) {
            if (packed_in) {
                const int nib = (w[static_cast<size_t>(n) * (K / 2) + j / 2] >> (4 * (j & 1))) & 0xF;
                v = static_cast<uint8_t>(static_cast<int8_t>((nib ^ 8) - 8));
            } else {
                v = w[static_cast<size_t>(n) * K + j];
            }
        }
        wq[i] = v;
    }
}

template <bool S4, bool OUT_F16, bool DYN>
__global__ void __launch_bounds__(P_THREADS)
qgemm_kernel(const uint8_t* __restrict__ aq, const uint8_t* __restrict__ wq, const float* __restrict__ w_scale,
             const float* __restrict__ bias, void* __restrict__ y, int M, int N, int Kb, float act_scale,
             const float* __restrict__ row_scale) {
    __shared__ __align__(16) uint32_t As[P_STAGES][P_BM][P_SROW];
    __shared__ __align__(16) uint32_t Bs[P_STAGES][P_BN][P_SROW];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * P_BM, n0 = blockIdx.x * P_BN;
    const int nk = Kb / P_BKB;

    auto load_stage = [&](int stage, int kt) {
        const size_t kb = static_cast<size_t>(kt) * P_BKB;
#pragma unroll
        for (int i = 0; i < (P_BM * P_BKB / 16) / P_THREADS; ++i) {  // 2 chunks of 16 bytes per thread
            const int c = tid + i * P_THREADS, r = c >> 2, c16 = c & 3;
            const int m = min(m0 + r, M - 1);  // rows past M / N load a valid row; the epilogue never stores them
            const int n = min(n0 + r, N - 1);
            cp_async16(&As[stage][r][c16 * 4], aq + static_cast<size_t>(m) * Kb + kb + c16 * 16);
            cp_async16(&Bs[stage][r][c16 * 4], wq + static_cast<size_t>(n) * Kb + kb + c16 * 16);
        }
    };

    int acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
    for (int s = 0; s < P_STAGES - 1; ++s) {
        if (s < nk) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<P_STAGES - 2>();
        __syncthreads();  // stage kt landed for all threads; everyone is done with stage kt - 1
        if (kt + P_STAGES - 1 < nk) load_stage((kt + P_STAGES - 1) % P_STAGES, kt + P_STAGES - 1);
        cp_async_commit();
        const int st = kt % P_STAGES;
#pragma unroll
        for (int kk = 0; kk < P_WORDS / 8; ++kk) {
            // ldmatrix.x4: lanes 8q..8q+7 address the 8 rows of matrix q (16 bytes each); lane l receives word l % 4
            // of row l / 4 of every matrix, which is the mma fragment layout (register q = matrix q).
            uint32_t a[2][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {  // matrices: rows 0-7 / 8-15 x words 0-3 / 4-7 -> a0, a1, a2, a3
                const int r = wm * 32 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(a[i], &As[st][r][kk * 8 + (lane >> 4) * 4]);
            }
#pragma unroll
            for (int jp = 0; jp < 2; ++jp) {  // matrices: (cols j, words 0-3), (j, 4-7), (j+1, 0-3), (j+1, 4-7)
                const int c = wn * 32 + (2 * jp + (lane >> 4)) * 8 + (lane & 7);
                uint32_t q[4];
                ldmatrix_x4(q, &Bs[st][c][kk * 8 + ((lane >> 3) & 1) * 4]);
                b[2 * jp][0] = q[0];
                b[2 * jp][1] = q[1];
                b[2 * jp + 1][0] = q[2];
                b[2 * jp + 1][1] = q[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (S4) mma_s4(acc[i][j], a[i], b[j]);
                    else mma_s8(acc[i][j], a[i], b[j]);
                }
        }
    }
    cp_async_wait<0>();

    // Epilogue. The per-column scale / bias and per-row scale are loaded once into registers (loading them inside
    // the store loop made every store wait on a global load: ncu, session 11).
    float wsc[4][2], bsv[4][2], rsv[2][2];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int n = n0 + wn * 32 + j * 8 + t * 2 + e;
            wsc[j][e] = n < N ? __ldg(w_scale + n) : 0.0f;
            bsv[j][e] = (bias && n < N) ? __ldg(bias + n) : 0.0f;
        }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int m = m0 + wm * 32 + i * 16 + g + 8 * h;
            rsv[i][h] = DYN ? (m < M ? __ldg(row_scale + m) : 0.0f) : act_scale;
        }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // h: rows g and g + 8; each thread holds 2 adjacent columns
            const int m = m0 + wm * 32 + i * 16 + g + 8 * h;
            if (m >= M) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int n = n0 + wn * 32 + j * 8 + t * 2;
                if (n >= N) continue;  // n < N, n + 1 may be past the row's end (checked below)
                float v[2];
#pragma unroll
                for (int e = 0; e < 2; ++e) {  // ((acc * s) * w_scale) + bias, no FMA contraction
                    v[e] = __fmul_rn(__fmul_rn(static_cast<float>(acc[i][j][2 * h + e]), rsv[i][h]), wsc[j][e]);
                    if (bias) v[e] = __fadd_rn(v[e], bsv[j][e]);
                }
                const size_t o = static_cast<size_t>(m) * N + n;
                if (OUT_F16) {
                    __half* yh = reinterpret_cast<__half*>(y) + o;
                    if (n + 1 < N && (o & 1) == 0) *reinterpret_cast<__half2*>(yh) = __floats2half2_rn(v[0], v[1]);
                    else {
                        yh[0] = __float2half_rn(v[0]);
                        if (n + 1 < N) yh[1] = __float2half_rn(v[1]);
                    }
                } else {
                    float* yf = reinterpret_cast<float*>(y) + o;
                    if (n + 1 < N && (o & 1) == 0) *reinterpret_cast<float2*>(yf) = make_float2(v[0], v[1]);
                    else {
                        yf[0] = v[0];
                        if (n + 1 < N) yf[1] = v[1];
                    }
                }
            }
        }
}

int resolve_path(int path, int weight_format, int act_dynamic) {
    const int cc = device_cc();
    if (cc < 0) return -VITQ_ERR_CUDA;
    if (cc < 80) return -VITQ_ERR_ARCH;
    if (path == VITQ_PATH_AUTO)
        return (weight_format == VITQ_W_INT4_PACKED && !act_dynamic && cc < 90) ? VITQ_PATH_S4_MMA : VITQ_PATH_S8_MMA;
    if (path == VITQ_PATH_S4_MMA) {
        if (cc >= 90) return -VITQ_ERR_ARCH;
        if (weight_format != VITQ_W_INT4_PACKED || act_dynamic) return -VITQ_ERR_ARG;
        return path;
    }
    return path == VITQ_PATH_S8_MMA ? path : -VITQ_ERR_ARG;
}

}  // namespace

extern "C" size_t vitq_prepared_weight_bytes(int N, int K, int path) {
    if (N < 1 || K < 8 || K % 8 != 0 || (path != VITQ_PATH_S4_MMA && path != VITQ_PATH_S8_MMA)) return 0;
    return static_cast<size_t>(N) * k_bytes(K, path == VITQ_PATH_S4_MMA);
}

extern "C" size_t vitq_act_workspace_bytes(int M, int K, int path, int act_dynamic) {
    if (M < 1 || K < 8 || K % 8 != 0 || (path != VITQ_PATH_S4_MMA && path != VITQ_PATH_S8_MMA)) return 0;
    const size_t q = (static_cast<size_t>(M) * k_bytes(K, path == VITQ_PATH_S4_MMA) + 255) / 256 * 256;
    return q + (act_dynamic ? 2 * static_cast<size_t>(M) * sizeof(float) : 0);
}

extern "C" int vitq_resolve_path(int path, int weight_format, int act_dynamic) {
    return resolve_path(path, weight_format, act_dynamic);
}

extern "C" int vitq_prepare_weights(const void* w, int weight_format, int N, int K, int path, void* wq,
                                    cudaStream_t stream) {
    if (!w || !wq) return VITQ_ERR_ARG;
    if (weight_format != VITQ_W_INT4_PACKED && weight_format != VITQ_W_INT8) return VITQ_ERR_ARG;
    if (N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    if (path != VITQ_PATH_S4_MMA && path != VITQ_PATH_S8_MMA) return VITQ_ERR_ARG;
    const bool s4 = path == VITQ_PATH_S4_MMA;
    const int Kb = k_bytes(K, s4);
    const size_t total = static_cast<size_t>(N) * Kb;
    const int blocks = static_cast<int>((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    uint8_t* out = static_cast<uint8_t*>(wq);
    const bool packed_in = weight_format == VITQ_W_INT4_PACKED;
    if (s4) prepare_weights_kernel<true><<<blocks, 256, 0, stream>>>(wb, packed_in, out, N, K, Kb);
    else prepare_weights_kernel<false><<<blocks, 256, 0, stream>>>(wb, packed_in, out, N, K, Kb);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

extern "C" int vitq_quant_linear_a4_prepared(const float* x, const void* wq, const float* w_scale, const float* bias,
                                             void* y, int out_dtype, int M, int N, int K, float act_scale,
                                             int act_dynamic, int path, void* workspace, cudaStream_t stream) {
    if (!x || !wq || !w_scale || !y || !workspace) return VITQ_ERR_ARG;
    if (out_dtype != VITQ_OUT_F32 && out_dtype != VITQ_OUT_F16) return VITQ_ERR_ARG;
    if (act_dynamic != 0 && act_dynamic != 1) return VITQ_ERR_ARG;
    if (!act_dynamic && (!(act_scale > 0.0f) || act_scale == __builtin_huge_valf())) return VITQ_ERR_ARG;
    if (path != VITQ_PATH_S4_MMA && path != VITQ_PATH_S8_MMA) return VITQ_ERR_ARG;  // resolve AUTO first
    if (path == VITQ_PATH_S4_MMA && act_dynamic) return VITQ_ERR_ARG;
    if (M < 1 || N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    if ((M + P_BM - 1) / P_BM > 65535) return VITQ_ERR_SHAPE;
    // float4 loads of x rows and 16-byte cp.async of the operands need 16-byte aligned buffers
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(wq) | reinterpret_cast<uintptr_t>(workspace)) & 15)
        return VITQ_ERR_ARG;
    const bool s4 = path == VITQ_PATH_S4_MMA;
    const int Kp = padded_k(K, s4), Kb = k_bytes(K, s4);
    uint8_t* aq = static_cast<uint8_t*>(workspace);
    const size_t qbytes = (static_cast<size_t>(M) * Kb + 255) / 256 * 256;
    float* rs = act_dynamic ? reinterpret_cast<float*>(aq + qbytes) : nullptr;
    float* rz = act_dynamic ? rs + M : nullptr;
    const int qblocks = (M + ROW_WARPS - 1) / ROW_WARPS;
    if (s4) quantize_rows_kernel<true, false><<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_scale);
    else if (act_dynamic) quantize_rows_kernel<false, true><<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_scale);
    else quantize_rows_kernel<false, false><<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_scale);
    if (cudaGetLastError() != cudaSuccess) return VITQ_ERR_CUDA;
    const dim3 grid((N + P_BN - 1) / P_BN, (M + P_BM - 1) / P_BM);
    const uint8_t* w8 = static_cast<const uint8_t*>(wq);
#define VITQ_GEMM(S4_, F16_, DYN_) \
    qgemm_kernel<S4_, F16_, DYN_><<<grid, P_THREADS, 0, stream>>>(aq, w8, w_scale, bias, y, M, N, Kb, act_scale, rs)
    const bool f16 = out_dtype == VITQ_OUT_F16;
    if (s4) { if (f16) VITQ_GEMM(true, true, false); else VITQ_GEMM(true, false, false); }
    else if (act_dynamic) { if (f16) VITQ_GEMM(false, true, true); else VITQ_GEMM(false, false, true); }
    else { if (f16) VITQ_GEMM(false, true, false); else VITQ_GEMM(false, false, false); }
#undef VITQ_GEMM
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}
