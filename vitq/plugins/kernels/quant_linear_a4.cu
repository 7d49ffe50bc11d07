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
