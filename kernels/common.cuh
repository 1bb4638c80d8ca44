// Shared by every kernel file: the parameter structs (each mirrored field for field by a
// #[repr(C)] struct in src/cuda/params.rs and passed to its kernel by value), the launch
// constants, and a few small device helpers.
//
// This header is not a CUDA runtime: NVRTC provides the built-ins (blockIdx, float4, expf...)
// and, for the CPU emulator, kernels/emulate/cuda_emu.hpp does. At run time the Rust side
// prepends this file to each .cu (NVRTC sees no #include); the emulator includes it.
//
// Layout. The CUDA backend keeps image activations channel-major, (C, N, H, W) ("CNHW"), so a
// convolution over the whole batch is one matrix product: y (OC, N*OH*OW) = W (OC, K) col.
// Every kernel that only walks (H, W) planes treats a plane index uniformly, so it works on
// NCHW (plane = n*C + c) and CNHW (plane = c*N + n) alike.

#pragma once

#ifdef MEDCNN_EMULATE
#include "emulate/cuda_emu.hpp"
#endif

// Threads per block of the elementwise kernels (grid-stride loops) and of the fixed-order
// block reductions. The reductions assume exactly this many threads.
#define MEDCNN_THREADS 256

// ---- parameter structs (src/cuda/params.rs mirrors each one) ----

// conv2d.cu: im2col / col2im. x is (C, N, H, W), col is (C*KH*KW, N*OH*OW).
struct ConvParams {
    int n, c, h, w;
    int oc, kh, kw;
    int stride, pad;
    int oh, ow;
};

// gemm.cu: C = alpha * op(A) op(B) + beta * C [+ bias] [relu], row-major, op(A) m x k,
// op(B) k x n. Leading dimensions are the row strides of A, B, C as stored. beta == 0 never
// reads C. Split-K: block z sums k in [z*k_chunk, (z+1)*k_chunk) and writes its partial
// product to c + z*m*ldc (alpha, beta, bias and relu are then left to sgemm_reduce_splits).
struct GemmParams {
    int m, n, k;
    int lda, ldb, ldc;
    float alpha, beta;
    int k_chunk;
    int bias_mode;  // 0: none, 1: bias[row], 2: bias[col]
    int relu;       // 1: max(v, 0) after the bias
};

// gemm.cu: c = alpha * sum_z ws[z] + beta * c [+ bias] [relu], ws is (splits, m, n) dense.
struct SplitKParams {
    int m, n, ldc, splits;
    float alpha, beta;
    int bias_mode, relu;
};

// bias.cu: y[r, c] += bias[r] (mode 1) or bias[c] (mode 2), y is (rows, cols) row-major.
struct BiasAddParams {
    int rows, cols, mode;
};

// bias.cu: out[o] = beta * out[o] + sum_{i < len} in[o*so + i*si], one block per output.
struct BiasGradParams {
    int outputs, len, so, si;
    float beta;
};

// relu.cu
struct ReluParams {
    int n;
};

// max_pool2d.cu, avg_pool2d.cu: planes of (h, w) -> (oh, ow); windows k x k, stride, zero
// (avg) or -inf (max) padding. relu_mask (max-pool backward only): also zero dx where the
// pool's input is <= 0, which is the backward of a ReLU placed before the pool.
struct PoolParams {
    int planes, h, w, oh, ow;
    int k, stride, pad;
    int relu_mask;
};

// avg_pool2d.cu: global average pool, one value per plane of hw elements.
struct GlobalPoolParams {
    int planes, hw;
};

// dropout.cu: element i is kept when dropout_bits(seed, step, i) >= threshold.
struct DropoutParams {
    unsigned long long seed, step;
    unsigned int n, threshold;
    float scale;  // 1 / (1 - p), rounded to f32 as the CPU does
    unsigned int pad_;
};

// cross_entropy.cu: logits (n, k), targets (n).
struct CrossEntropyParams {
    int n, k;
};

// adam.cu: the f32 constants of one Adam step, computed on the host as src/optim.rs does.
struct AdamParams {
    int n;
    float b1, b2, one_minus_b1, one_minus_b2;
    float step_size, bc2_sqrt, eps, wd;
};

// ---- helpers ----

// A grid-stride loop over e in [0, total), total <= INT_MAX (the host checks, `ops::int`):
//
//     for (int e = global_thread(); e < total; e = grid_next(e)) { ... }
//
// Indices stay 32-bit (cheaper division on the GPU), but the step is taken in 64 bits and
// clamped to INT_MAX: with `e += gridDim.x * blockDim.x` a total within one grid of 2^31
// (im2col of the first stage near batch 8,865) would overflow e to a negative index, which
// passes `e < total` and writes out of bounds. A clamped e == INT_MAX >= total ends the loop.
__device__ __forceinline__ int clamp_index(long long i) { return i > 0x7fffffffLL ? 0x7fffffff : (int)i; }
__device__ __forceinline__ int global_thread() {
    return clamp_index((long long)blockIdx.x * blockDim.x + threadIdx.x);
}
__device__ __forceinline__ int grid_next(int e) { return clamp_index((long long)e + (long long)gridDim.x * blockDim.x); }

// Sums v over the MEDCNN_THREADS threads of a block in a fixed tree order (so the result is
// the same on every run) and returns the total to every thread. `scratch` is the caller's
// shared array of MEDCNN_THREADS floats. Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (int half = MEDCNN_THREADS / 2; half > 0; half /= 2) {
        if (t < half) scratch[t] += scratch[t + half];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();  // scratch may be reused right after
    return total;
}
