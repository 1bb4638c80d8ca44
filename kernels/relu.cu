// ReLU, elementwise: y = max(x, 0) (a NaN stays NaN, as on the CPU) and dx = dy * [y > 0].
//
// The CUDA backend fuses both into neighbours (the forward into the convolution's GEMM store,
// the backward into the max-pool backward via PoolParams::relu_mask); these standalone
// kernels serve any other placement and are tested against src/layers/relu.rs like the rest.

#include "common.cuh"

extern "C" __global__ void relu_forward(const ReluParams p, const float* __restrict__ x, float* __restrict__ y) {
    for (int e = global_thread(); e < p.n; e = grid_next(e)) {
        const float v = x[e];
        y[e] = v < 0.0f ? 0.0f : v;
    }
}

// dx may alias dy (in place).
extern "C" __global__ void relu_backward(const ReluParams p, const float* y, const float* dy, float* dx) {
    for (int e = global_thread(); e < p.n; e = grid_next(e)) dx[e] = y[e] <= 0.0f ? 0.0f : dy[e];
}
