// QuantLinearA4: int4-activation linear layer (semantics: vitq/plugins/specs.py::quant_linear_a4_ref).
//
// Two kernels per call, after a one-time weight preparation:
//   quantize_rows_kernel: one warp per row of X quantizes it once (static: round(x / act_scale) clamped to int4;
//        dynamic: the row's scale / zero point from its min / max, then the centered uint4 code) into a zero-padded
//        int8 (S8 path) or packed int4 (S4 path) operand in the workspace;
//   qgemm_kernel: a 3-stage cp.async pipeline, ldmatrix fragments and tensor-core mma.sync:
//        S4 path (sm_80/86/87/89, Orin): mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 on packed int4 operands;
//        S8 path (sm_80+, and sm_90, which has no s4 mma.sync): mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 on
//        the int4 values widened to int8, or on int8 weights (W8A4), or on the dynamic mode's [-15, 15] codes.
//   Integer accumulation is exact in any order, and the epilogue is ((float(acc) * s) * w_scale) + bias without
//   FMA contraction, so float32 output is bit-exact to the reference (checked by python -m bench gpu).
//   Grouped dynamic mode (act_group = G in {32, 64, 128, 256}): one scale / zero point per G consecutive features
//        of a row; the GEMM keeps one int32 sum per mma k-step (32 k), folds it into a float32 accumulator at every
//        group boundary (t = t + float(acc_g) * s_mg, groups in order, no FMA) and the epilogue is (t * w_scale) + bias.
//   prepared weights: bytes [N, Kb]    activations: bytes [M, Kb] (+ float row_scale[M * ng], row_zp[M * ng] if
//   dynamic, ng = K / G groups per row, 1 without groups)
//   S8: Kb = Kp = roundup(K, 64), int8 operands;  S4: Kp = roundup(K, 128), Kb = Kp / 2, packed int4 operands.
//   The padding (k >= K) is zero in both operands, so it adds nothing to the integer sums.
// X is quantized once per row before the GEMM, not inside it: quantizing each X tile once per 64 output channels
// without pipelining is bit-exact too, but several times slower at DeiT-T / Swin-T shapes (docs/plugins.md).
#include "vitq_kernels.h"

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

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

constexpr int ROW_WARPS = 4;  // warps per block of the row quantizer (one row per warp)

__global__ void pack_int4_kernel(const int8_t* __restrict__ w, uint8_t* __restrict__ packed, size_t n_bytes) {
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n_bytes;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const uint32_t lo = static_cast<uint32_t>(w[2 * i]) & 0xFu;
        const uint32_t hi = static_cast<uint32_t>(w[2 * i + 1]) & 0xFu;
        packed[i] = static_cast<uint8_t>(lo | (hi << 4));
    }
}

int device_cc() {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return -1;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return -1;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return -1;
    return major * 10 + minor;
}

constexpr int BM = 64, BN = 64;
constexpr int BKB = 64;                 // bytes of K per pipeline stage (two mma k-steps)
constexpr int WORDS = BKB / 4;        // 16 words per row per stage
constexpr int SROW = WORDS + 4;       // + 16 bytes: rows stay 16-byte aligned, fragment loads conflict-free
constexpr int STAGES = 3;
constexpr int THREADS = 128;

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
// ONNX chain (ReduceMin/ReduceMax -> Min/Max -> Sub -> Div -> Max -> Div -> Neg -> Round).
// Each lane quantizes 8 consecutive k (two float4 loads) per iteration.
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

// Grouped dynamic mode: one warp per row, G / 8 lanes per group (each lane holds 8 consecutive k). All 32 lanes run
// every iteration (the shuffles need the full warp); k >= K holds zeros (K % G == 0: whole groups are in or out).
// Per group the same arithmetic as the per-row mode on its G values (ONNX: Reshape -> ReduceMin/ReduceMax over the
// group -> ...), scales / zero points stored [M, K / G].
__global__ void __launch_bounds__(ROW_WARPS * 32)
quantize_groups_kernel(const float* __restrict__ x, uint8_t* __restrict__ xq, float* __restrict__ g_scale,
                       float* __restrict__ g_zp, int M, int K, int Kp, int G) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * ROW_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;  // whole warps only: ROW_WARPS rows per block, one per warp
    const float* xr = x + static_cast<size_t>(m) * K;
    const int lanes = G / 8, ng = K / G;
    for (int base = 0; base < Kp; base += 256) {
        const int k = base + lane * 8;
        float v[8];
        float mn = 0.0f, mx = 0.0f;
        if (k < K) {
            const float4 v0 = *reinterpret_cast<const float4*>(xr + k);
            const float4 v1 = *reinterpret_cast<const float4*>(xr + k + 4);
            v[0] = v0.x; v[1] = v0.y; v[2] = v0.z; v[3] = v0.w; v[4] = v1.x; v[5] = v1.y; v[6] = v1.z; v[7] = v1.w;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                mn = fminf(mn, v[e]);
                mx = fmaxf(mx, v[e]);
            }
        }
        for (int off = lanes >> 1; off > 0; off >>= 1) {  // within aligned groups of `lanes` lanes
            mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        }
        if (k >= Kp) continue;
        int q[8];
        if (k < K) {
            const float s = fmaxf(__fdiv_rn(__fsub_rn(mx, mn), 15.0f), 1e-8f);
            const float z = rintf(-__fdiv_rn(mn, s));
            const int gi = k / G;
            if ((lane & (lanes - 1)) == 0 && gi < ng) {
                g_scale[static_cast<size_t>(m) * ng + gi] = s;
                g_zp[static_cast<size_t>(m) * ng + gi] = z;
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) q[e] = quant_u4_centered(v[e], s, z);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) q[e] = 0;
        }
        uint2 w = make_uint2(0u, 0u);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            w.x |= (static_cast<uint32_t>(q[e]) & 0xFFu) << (8 * e);
            w.y |= (static_cast<uint32_t>(q[e + 4]) & 0xFFu) << (8 * e);
        }
        *reinterpret_cast<uint2*>(xq + static_cast<size_t>(m) * Kp + k) = w;
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

template <bool S4, bool OUT_F16, bool DYN, bool GRP>
__global__ void __launch_bounds__(THREADS)
qgemm_kernel(const uint8_t* __restrict__ aq, const uint8_t* __restrict__ wq, const float* __restrict__ w_scale,
             const float* __restrict__ bias, void* __restrict__ y, int M, int N, int Kb, float act_scale,
             const float* __restrict__ row_scale, int G, int ng) {
    static_assert(!GRP || (DYN && !S4), "the grouped mode is dynamic and runs on the S8 path");
    __shared__ __align__(16) uint32_t As[STAGES][BM][SROW];
    __shared__ __align__(16) uint32_t Bs[STAGES][BN][SROW];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int nk = Kb / BKB;

    auto load_stage = [&](int stage, int kt) {
        const size_t kb = static_cast<size_t>(kt) * BKB;
#pragma unroll
        for (int i = 0; i < (BM * BKB / 16) / THREADS; ++i) {  // 2 chunks of 16 bytes per thread
            const int c = tid + i * THREADS, r = c >> 2, c16 = c & 3;
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
    float facc[2][4][4];  // GRP: the float32 sum over finished groups
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) facc[i][j][r] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load_stage(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed for all threads; everyone is done with stage kt - 1
        if (kt + STAGES - 1 < nk) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
        cp_async_commit();
        const int st = kt % STAGES;
#pragma unroll
        for (int kk = 0; kk < WORDS / 8; ++kk) {
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
            if (GRP) {  // S8: one mma k-step = 32 k; fold the integer sum in at the end of each group, in order
                const int k_end = kt * BKB + (kk + 1) * 32;
                const int gi = k_end / G - 1;
                if (k_end % G == 0 && gi < ng) {  // groups past K (zero padding) hold 0: skipped
#pragma unroll
                    for (int i = 0; i < 2; ++i)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const int m = min(m0 + wm * 32 + i * 16 + g + 8 * h, M - 1);  // rows >= M never stored
                            const float sg = __ldg(row_scale + static_cast<size_t>(m) * ng + gi);
#pragma unroll
                            for (int j = 0; j < 4; ++j)
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    facc[i][j][2 * h + e] = __fadd_rn(
                                        facc[i][j][2 * h + e], __fmul_rn(static_cast<float>(acc[i][j][2 * h + e]), sg));
                                    acc[i][j][2 * h + e] = 0;
                                }
                        }
                }
            }
        }
    }
    cp_async_wait<0>();

    // Epilogue. The per-column scale / bias and per-row scale are loaded once into registers (loading them inside
    // the store loop made every store wait on a global load, as ncu shows).
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
            rsv[i][h] = GRP ? 1.0f : DYN ? (m < M ? __ldg(row_scale + m) : 0.0f) : act_scale;
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
                for (int e = 0; e < 2; ++e) {  // ((acc * s) * w_scale) + bias (GRP: t * w_scale + bias), no FMA
                    v[e] = GRP ? __fmul_rn(facc[i][j][2 * h + e], wsc[j][e])
                               : __fmul_rn(__fmul_rn(static_cast<float>(acc[i][j][2 * h + e]), rsv[i][h]), wsc[j][e]);
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

bool group_ok(int act_group, int act_dynamic, int K, int path) {
    if (act_group == 0) return true;
    return (act_group == 32 || act_group == 64 || act_group == 128 || act_group == 256) && act_dynamic == 1 &&
           path == VITQ_PATH_S8_MMA && K % act_group == 0;
}

extern "C" size_t vitq_act_workspace_bytes(int M, int K, int path, int act_dynamic, int act_group) {
    if (M < 1 || K < 8 || K % 8 != 0 || (path != VITQ_PATH_S4_MMA && path != VITQ_PATH_S8_MMA)) return 0;
    if (!group_ok(act_group, act_dynamic, K, path)) return 0;
    const size_t q = (static_cast<size_t>(M) * k_bytes(K, path == VITQ_PATH_S4_MMA) + 255) / 256 * 256;
    const size_t ng = act_group ? static_cast<size_t>(K / act_group) : 1;
    return q + (act_dynamic ? 2 * static_cast<size_t>(M) * ng * sizeof(float) : 0);
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
                                             int act_dynamic, int act_group, int path, void* workspace,
                                             cudaStream_t stream) {
    if (!x || !wq || !w_scale || !y || !workspace) return VITQ_ERR_ARG;
    if (out_dtype != VITQ_OUT_F32 && out_dtype != VITQ_OUT_F16) return VITQ_ERR_ARG;
    if (act_dynamic != 0 && act_dynamic != 1) return VITQ_ERR_ARG;
    if (!act_dynamic && (!(act_scale > 0.0f) || act_scale == __builtin_huge_valf())) return VITQ_ERR_ARG;
    if (path != VITQ_PATH_S4_MMA && path != VITQ_PATH_S8_MMA) return VITQ_ERR_ARG;  // resolve AUTO first
    if (path == VITQ_PATH_S4_MMA && act_dynamic) return VITQ_ERR_ARG;
    if (M < 1 || N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    if ((M + BM - 1) / BM > 65535) return VITQ_ERR_SHAPE;
    if (act_group != 0 && (act_dynamic != 1 || path != VITQ_PATH_S8_MMA ||
                           (act_group != 32 && act_group != 64 && act_group != 128 && act_group != 256)))
        return VITQ_ERR_ARG;
    if (act_group != 0 && K % act_group != 0) return VITQ_ERR_SHAPE;
    // float4 loads of x rows and 16-byte cp.async of the operands need 16-byte aligned buffers
    if ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(wq) | reinterpret_cast<uintptr_t>(workspace)) & 15)
        return VITQ_ERR_ARG;
    const bool s4 = path == VITQ_PATH_S4_MMA;
    const int Kp = padded_k(K, s4), Kb = k_bytes(K, s4);
    uint8_t* aq = static_cast<uint8_t*>(workspace);
    const size_t qbytes = (static_cast<size_t>(M) * Kb + 255) / 256 * 256;
    const int ng = act_group ? K / act_group : 1;
    float* rs = act_dynamic ? reinterpret_cast<float*>(aq + qbytes) : nullptr;
    float* rz = act_dynamic ? rs + static_cast<size_t>(M) * ng : nullptr;
    const int qblocks = (M + ROW_WARPS - 1) / ROW_WARPS;
    if (act_group) quantize_groups_kernel<<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_group);
    else if (s4) quantize_rows_kernel<true, false><<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_scale);
    else if (act_dynamic) quantize_rows_kernel<false, true><<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_scale);
    else quantize_rows_kernel<false, false><<<qblocks, ROW_WARPS * 32, 0, stream>>>(x, aq, rs, rz, M, K, Kp, act_scale);
    if (cudaGetLastError() != cudaSuccess) return VITQ_ERR_CUDA;
    const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
    const uint8_t* w8 = static_cast<const uint8_t*>(wq);
#define VITQ_GEMM(S4_, F16_, DYN_, GRP_) \
    qgemm_kernel<S4_, F16_, DYN_, GRP_><<<grid, THREADS, 0, stream>>>(aq, w8, w_scale, bias, y, M, N, Kb, act_scale, \
                                                                      rs, act_group, ng)
    const bool f16 = out_dtype == VITQ_OUT_F16;
    if (act_group) { if (f16) VITQ_GEMM(false, true, true, true); else VITQ_GEMM(false, false, true, true); }
    else if (s4) { if (f16) VITQ_GEMM(true, true, false, false); else VITQ_GEMM(true, false, false, false); }
    else if (act_dynamic) { if (f16) VITQ_GEMM(false, true, true, false); else VITQ_GEMM(false, false, true, false); }
    else { if (f16) VITQ_GEMM(false, true, false, false); else VITQ_GEMM(false, false, false, false); }
#undef VITQ_GEMM
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

extern "C" int vitq_pack_int4(const int8_t* w, uint8_t* packed, int N, int K, cudaStream_t stream) {
    if (!w || !packed) return VITQ_ERR_ARG;
    if (N < 1 || K < 8 || K % 8 != 0) return VITQ_ERR_SHAPE;
    const size_t n_bytes = static_cast<size_t>(N) * (K / 2);
    const int blocks = static_cast<int>((n_bytes + 255) / 256 < 4096 ? (n_bytes + 255) / 256 : 4096);
    pack_int4_kernel<<<blocks, 256, 0, stream>>>(w, packed, n_bytes);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}
