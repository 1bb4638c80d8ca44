// SGEMM: C = alpha * op(A) op(B) + beta * C, with an optional bias (per row or per column)
// and ReLU fused into the store, for every transpose the CPU `tensor::gemm` supports.
// Row-major, any sizes (tiles at the edges are zero-filled), no cuBLAS.
//
// Tiling. A block computes a BM x BN tile of C, walking k in steps of BK: each step it copies
// the BM x BK slice of op(A) and the BK x BN slice of op(B) into shared memory, stored k-major
// (As[k][m], Bs[k][n]) whatever the transposes, and every thread accumulates a TM x TN
// micro-tile in registers from them. Shared memory is double-buffered: the global loads for
// step t+1 are issued before the arithmetic of step t and land in the other buffer after it,
// so one __syncthreads per step suffices.
//
// A thread's micro-tile is split in two halves: rows ty*TM/2 + i and BM/2 + ty*TM/2 + i
// (columns likewise), so the vector loads of a warp from shared memory fall in distinct banks.
// The rows of As/Bs are padded by 4 floats so the transposing stores do not conflict either.
//
// Split-K (gridDim.z > 1): block z sums only k in [z*k_chunk, (z+1)*k_chunk) and stores its raw
// partial product at c + z*m*ldc; sgemm_reduce_splits then adds the partials in z order. Sums
// are therefore fixed-order (no atomics) and runs repeat bit for bit.
//
// Configurations (extern "C" names sgemm_<ta><tb>_<BM>):
//   128: 128x128x8 tile, 8x8 per thread, 256 threads  (large products)
//    64:  64x64x8  tile, 4x4 per thread, 256 threads  (skinny products, split-K)
//    16:  16x16x4  tile, 2x2 per thread,  64 threads  (tiny products and the CPU emulator)

#include "common.cuh"

template <int N>
__device__ __forceinline__ void load_frag(float* dst, const float* src);

template <>
__device__ __forceinline__ void load_frag<4>(float* dst, const float* src) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
}

template <>
__device__ __forceinline__ void load_frag<2>(float* dst, const float* src) {
    const float2 v = *reinterpret_cast<const float2*>(src);
    dst[0] = v.x;
    dst[1] = v.y;
}

template <>
__device__ __forceinline__ void load_frag<1>(float* dst, const float* src) {
    dst[0] = src[0];
}

template <int BM, int BN, int BK, int TM, int TN, bool TA, bool TB>
__device__ __forceinline__ void sgemm_tile(const GemmParams p, const float* __restrict__ a,
                                           const float* __restrict__ b, float* __restrict__ c,
                                           const float* __restrict__ bias) {
    constexpr int TX = BN / TN;  // threads along n
    constexpr int TY = BM / TM;  // threads along m
    constexpr int NT = TX * TY;
    constexpr int LA = BM * BK / NT;  // elements of the A slice each thread copies per step
    constexpr int LB = BN * BK / NT;
    constexpr int PAD = 4;
    static_assert(TM % 2 == 0 && TN % 2 == 0, "micro-tile halves");
    static_assert((BM * BK) % NT == 0 && (BN * BK) % NT == 0, "even copy split");
    static_assert(NT % BK == 0 && NT % BM == 0 && NT % BN == 0, "copy index pattern");

    __shared__ __align__(16) float As[2][BK][BM + PAD];
    __shared__ __align__(16) float Bs[2][BK][BN + PAD];

    const int tid = threadIdx.x;
    const int tx = tid % TX;
    const int ty = tid / TX;
    const int bm = blockIdx.y * BM;
    const int bn = blockIdx.x * BN;
    const int kbeg = blockIdx.z * p.k_chunk;
    const int kend = min(p.k, kbeg + p.k_chunk);
    const int steps = kend > kbeg ? (kend - kbeg + BK - 1) / BK : 0;

    // Which elements of each slice this thread copies: fixed (m, k) offsets inside the slice,
    // chosen so that consecutive threads read consecutive addresses of the stored matrix.
    // Copy i of A is at slice row am0 + i*DA_M, slice column ak0 + i*DA_K.
    const int am0 = TA ? tid % BM : tid / BK;
    const int ak0 = TA ? tid / BM : tid % BK;
    constexpr int DA_M = TA ? 0 : NT / BK;
    constexpr int DA_K = TA ? NT / BM : 0;
    const int bn0 = TB ? tid / BK : tid % BN;
    const int bk0 = TB ? tid % BK : tid / BN;
    constexpr int DB_N = TB ? NT / BK : 0;
    constexpr int DB_K = TB ? 0 : NT / BN;

    float ra[LA];
    float rb[LB];

    // Global -> registers for the slice at k0 (zero outside the matrices).
    auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < LA; ++i) {
            const int gm = bm + am0 + i * DA_M;
            const int gk = k0 + ak0 + i * DA_K;
            const bool ok = gm < p.m && gk < kend;
            const size_t off = TA ? (size_t)gk * p.lda + gm : (size_t)gm * p.lda + gk;
            ra[i] = ok ? a[off] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < LB; ++i) {
            const int gn = bn + bn0 + i * DB_N;
            const int gk = k0 + bk0 + i * DB_K;
            const bool ok = gn < p.n && gk < kend;
            const size_t off = TB ? (size_t)gn * p.ldb + gk : (size_t)gk * p.ldb + gn;
            rb[i] = ok ? b[off] : 0.0f;
        }
    };
    // Registers -> shared buffer `buf`.
    auto stash = [&](int buf) {
#pragma unroll
        for (int i = 0; i < LA; ++i) As[buf][ak0 + i * DA_K][am0 + i * DA_M] = ra[i];
#pragma unroll
        for (int i = 0; i < LB; ++i) Bs[buf][bk0 + i * DB_K][bn0 + i * DB_N] = rb[i];
    };

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    if (steps > 0) {
        fetch(kbeg);
        stash(0);
        __syncthreads();
    }
    for (int s = 0; s < steps; ++s) {
        const int cur = s & 1;
        const bool more = s + 1 < steps;
        if (more) fetch(kbeg + (s + 1) * BK);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float af[TM];
            float bf[TN];
            load_frag<TM / 2>(af, &As[cur][kk][ty * (TM / 2)]);
            load_frag<TM / 2>(af + TM / 2, &As[cur][kk][BM / 2 + ty * (TM / 2)]);
            load_frag<TN / 2>(bf, &Bs[cur][kk][tx * (TN / 2)]);
            load_frag<TN / 2>(bf + TN / 2, &Bs[cur][kk][BN / 2 + tx * (TN / 2)]);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(af[i], bf[j], acc[i][j]);
        }
        if (more) stash(cur ^ 1);
        __syncthreads();
    }

    // Epilogue: alpha, beta, bias, ReLU, bounds-checked store (block z of a split-K launch
    // writes its own partial slab).
    float* cz = c + (size_t)blockIdx.z * p.m * p.ldc;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int r = bm + (i < TM / 2 ? ty * (TM / 2) + i : BM / 2 + ty * (TM / 2) + i - TM / 2);
        if (r >= p.m) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int col = bn + (j < TN / 2 ? tx * (TN / 2) + j : BN / 2 + tx * (TN / 2) + j - TN / 2);
            if (col >= p.n) continue;
            float* out = cz + (size_t)r * p.ldc + col;
            float v = p.alpha * acc[i][j];
            if (p.beta != 0.0f) v += p.beta * *out;
            if (p.bias_mode == 1) v += bias[r];
            if (p.bias_mode == 2) v += bias[col];
            if (p.relu && v < 0.0f) v = 0.0f;
            *out = v;
        }
    }
}

#define MEDCNN_SGEMM(name, BM, BN, BK, TM, TN, TA, TB)                                           \
    extern "C" __global__ void __launch_bounds__((BM / TM) * (BN / TN))                          \
        name(const GemmParams p, const float* __restrict__ a, const float* __restrict__ b,       \
             float* __restrict__ c, const float* __restrict__ bias) {                           \
        sgemm_tile<BM, BN, BK, TM, TN, TA, TB>(p, a, b, c, bias);                                 \
    }

#define MEDCNN_SGEMM_ALL(suffix, BM, BN, BK, TM, TN)                                            \
    MEDCNN_SGEMM(sgemm_nn_##suffix, BM, BN, BK, TM, TN, false, false)                            \
    MEDCNN_SGEMM(sgemm_nt_##suffix, BM, BN, BK, TM, TN, false, true)                             \
    MEDCNN_SGEMM(sgemm_tn_##suffix, BM, BN, BK, TM, TN, true, false)                             \
    MEDCNN_SGEMM(sgemm_tt_##suffix, BM, BN, BK, TM, TN, true, true)

MEDCNN_SGEMM_ALL(128, 128, 128, 8, 8, 8)
MEDCNN_SGEMM_ALL(64, 64, 64, 8, 4, 4)
MEDCNN_SGEMM_ALL(16, 16, 16, 4, 2, 2)

// The second half of a split-K product: c = alpha * (ws[0] + ws[1] + ... ) + beta * c, then
// bias and ReLU as in the fused epilogue. One thread per element of C, partials added in z
// order. ws is (splits, m, n), dense.
extern "C" __global__ void sgemm_reduce_splits(const SplitKParams p, const float* __restrict__ ws,
                                               float* __restrict__ c, const float* __restrict__ bias) {
    const int total = p.m * p.n;
    const size_t slab = (size_t)p.m * p.n;
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int r = e / p.n;
        const int col = e - r * p.n;
        float sum = 0.0f;
        for (int z = 0; z < p.splits; ++z) sum += ws[z * slab + e];
        float* out = c + (size_t)r * p.ldc + col;
        float v = p.alpha * sum;
        if (p.beta != 0.0f) v += p.beta * *out;
        if (p.bias_mode == 1) v += bias[r];
        if (p.bias_mode == 2) v += bias[col];
        if (p.relu && v < 0.0f) v = 0.0f;
        *out = v;
    }
}
