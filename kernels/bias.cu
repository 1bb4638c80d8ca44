// Bias add and bias gradient, shared by the convolution and the linear layer (their GEMMs can
// also fuse the bias add into the store; see gemm.cu).
//
// bias_add:  y[r, c] += bias[r] (mode 1, conv: one bias per output channel row of
//            y (OC, N*OH*OW)) or bias[c] (mode 2, linear: one bias per column of y (N, OUT)).
// bias_grad: db[o] = beta * db[o] + sum_i dy[o*so + i*si]: row sums (so = len, si = 1) for a
//            conv's dy (OC, N*OH*OW), column sums (so = 1, si = OUT) for a linear dy (N, OUT).
//            One block per output; each thread sums a strided share in index order, then the
//            block adds the shares in a fixed tree, so db is the same on every run (no float
//            atomics).

#include "common.cuh"

extern "C" __global__ void bias_add(const BiasAddParams p, float* __restrict__ y, const float* __restrict__ bias) {
    const int total = p.rows * p.cols;
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int r = e / p.cols;
        y[e] += p.mode == 1 ? bias[r] : bias[e - r * p.cols];
    }
}

extern "C" __global__ void __launch_bounds__(MEDCNN_THREADS)
    bias_grad(const BiasGradParams p, float* __restrict__ db, const float* __restrict__ dy) {
    __shared__ float scratch[MEDCNN_THREADS];
    for (int o = blockIdx.x; o < p.outputs; o += gridDim.x) {
        const float* row = dy + (size_t)o * p.so;
        float s = 0.0f;
        for (int i = threadIdx.x; i < p.len; i += MEDCNN_THREADS) s += row[(size_t)i * p.si];
        const float total = block_sum(s, scratch);
        if (threadIdx.x == 0) db[o] = p.beta != 0.0f ? p.beta * db[o] + total : total;
    }
}
