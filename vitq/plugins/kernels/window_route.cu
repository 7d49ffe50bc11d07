// WindowRoute / WindowMerge kernels (semantics: vitq/plugins/specs.py::window_route_ref / window_merge_ref).
// Simple, bounds-checked kernels meant for the measurement that decides whether these plugins ship at all
// (the default is TensorRT's native TopK/Gather/ScatterElements chain).
#include "vitq_kernels.h"

#include <stdint.h>

namespace {

constexpr int MAX_WINDOWS = 4096;

// One block per (b, w); each warp reduces whole tokens: a_t = mean_c |x|, then sum_t a_t^2, sqrt.
__global__ void importance_kernel(const float* __restrict__ x, float* __restrict__ imp, int T, int C) {
    __shared__ float warp_sums[32];
    const size_t base = static_cast<size_t>(blockIdx.x) * T * C;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float sq = 0.0f;
    for (int t = warp; t < T; t += nwarps) {
        const float* row = x + base + static_cast<size_t>(t) * C;
        float s = 0.0f;
        for (int c = lane; c < C; c += 32) s += fabsf(row[c]);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const float a = __fdiv_rn(s, static_cast<float>(C));
        sq += a * a;  // identical on all lanes
    }
    if (lane == 0) warp_sums[warp] = sq;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int i = 0; i < nwarps; ++i) total += warp_sums[i];
        imp[blockIdx.x] = sqrtf(total);
    }
}

// One block per batch row: rank every window (descending importance, lower index first on ties), then place it.
__global__ void rank_kernel(const float* __restrict__ imp, int64_t* __restrict__ idx_high,
                            int64_t* __restrict__ idx_low, int nW, int n_high) {
    __shared__ float s_imp[MAX_WINDOWS];
    __shared__ int s_rank[MAX_WINDOWS];
    const int b = blockIdx.x;
    const int n_low = nW - n_high;
    for (int w = threadIdx.x; w < nW; w += blockDim.x) s_imp[w] = imp[static_cast<size_t>(b) * nW + w];
    __syncthreads();
    for (int w = threadIdx.x; w < nW; w += blockDim.x) {
        const float v = s_imp[w];
        int rank = 0;
        for (int u = 0; u < nW; ++u) {
            const float o = s_imp[u];
            rank += (o > v) || (o == v && u < w);
        }
        s_rank[w] = rank;
    }
    __syncthreads();
    for (int w = threadIdx.x; w < nW; w += blockDim.x) {
        const int rank = s_rank[w];
        if (rank < n_high) {
            idx_high[static_cast<size_t>(b) * n_high + rank] = w;
        } else {
            int pos = 0;  // low windows before w
            for (int u = 0; u < w; ++u) pos += s_rank[u] >= n_high;
            idx_low[static_cast<size_t>(b) * n_low + pos] = w;
        }
    }
}

// dst[b, j, :] = src[b, idx[b, j], :] (gather), or dst[b, idx[b, j], :] = src[b, j, :] (scatter); row = T*C floats.
template <bool SCATTER>
__global__ void move_windows_kernel(const float* __restrict__ src, float* __restrict__ dst,
                                    const int64_t* __restrict__ idx, int B, int nW, int nSel, size_t row) {
    const size_t total = static_cast<size_t>(B) * nSel * row;
    for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<size_t>(gridDim.x) * blockDim.x) {
        const size_t e = i % row;
        const size_t bj = i / row;  // b * nSel + j
        const size_t b = bj / nSel;
        const int64_t w = idx[bj];
        if (w < 0 || w >= nW) continue;  // corrupt index: leave the destination untouched
        if (SCATTER) dst[(b * nW + w) * row + e] = src[i];
        else dst[i] = src[(b * nW + w) * row + e];
    }
}

int grid_for(size_t n) {
    const size_t blocks = (n + 255) / 256;
    return static_cast<int>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

bool bad_dims(int B, int nW, int T, int C) { return B < 1 || nW < 1 || T < 1 || C < 1 || nW > MAX_WINDOWS; }

}  // namespace

extern "C" int vitq_window_importance(const float* x, float* imp, int B, int nW, int T, int C, cudaStream_t stream) {
    if (!x || !imp) return VITQ_ERR_ARG;
    if (bad_dims(B, nW, T, C)) return VITQ_ERR_SHAPE;
    importance_kernel<<<B * nW, 256, 0, stream>>>(x, imp, T, C);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

extern "C" int vitq_window_route(const float* x, float* imp, float* x_high, float* x_low, int64_t* idx_high,
                                 int64_t* idx_low, int B, int nW, int T, int C, int n_high, cudaStream_t stream) {
    if (!x || !imp || (n_high > 0 && !idx_high) || (n_high < nW && !idx_low)) return VITQ_ERR_ARG;
    if (bad_dims(B, nW, T, C) || n_high < 0 || n_high > nW) return VITQ_ERR_SHAPE;
    int rc = vitq_window_importance(x, imp, B, nW, T, C, stream);
    if (rc != VITQ_OK) return rc;
    rank_kernel<<<B, 256, 0, stream>>>(imp, idx_high, idx_low, nW, n_high);
    if (cudaGetLastError() != cudaSuccess) return VITQ_ERR_CUDA;
    const size_t row = static_cast<size_t>(T) * C;
    const int n_low = nW - n_high;
    if (x_high && n_high > 0)
        move_windows_kernel<false><<<grid_for(B * n_high * row), 256, 0, stream>>>(x, x_high, idx_high, B, nW,
                                                                                    n_high, row);
    if (x_low && n_low > 0)
        move_windows_kernel<false><<<grid_for(B * n_low * row), 256, 0, stream>>>(x, x_low, idx_low, B, nW, n_low,
                                                                                   row);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}

extern "C" int vitq_window_merge(const float* y_high, const float* y_low, const int64_t* idx_high,
                                 const int64_t* idx_low, float* y, int B, int nW, int T, int C, int n_high,
                                 cudaStream_t stream) {
    const int n_low = nW - n_high;
    if (!y || (n_high > 0 && (!y_high || !idx_high)) || (n_low > 0 && (!y_low || !idx_low))) return VITQ_ERR_ARG;
    if (bad_dims(B, nW, T, C) || n_high < 0 || n_high > nW) return VITQ_ERR_SHAPE;
    const size_t row = static_cast<size_t>(T) * C;
    if (n_high > 0)
        move_windows_kernel<true><<<grid_for(B * n_high * row), 256, 0, stream>>>(y_high, y, idx_high, B, nW,
                                                                                   n_high, row);
    if (n_low > 0)
        move_windows_kernel<true><<<grid_for(B * n_low * row), 256, 0, stream>>>(y_low, y, idx_low, B, nW, n_low,
                                                                                  row);
    return cudaGetLastError() == cudaSuccess ? VITQ_OK : VITQ_ERR_CUDA;
}
