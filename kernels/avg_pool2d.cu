// Average pooling, as src/layers/avg_pool2d.rs: AvgPool2d (k x k windows at `stride`, no
// padding: PoolParams::pad must be 0) and the global average pool (PyTorch's
// AdaptiveAvgPool2d(1): the mean of each plane). Planes are independent.
//
// avg_pool_forward:   y[p, o] = (sum of the window, in row-major order) * (1 / k^2)
// avg_pool_backward:  dx[p, ih, iw] = sum over windows o containing (ih, iw) of dy[p, o] / k^2
//                     (gathered in window order, as the CPU adds them)
// global_avg_pool_forward:  y[p] = (sum of plane p in order) * (1 / hw)
// global_avg_pool_backward: dx[p, i] = dy[p] * (1 / hw)

#include "common.cuh"

extern "C" __global__ void avg_pool_forward(const PoolParams p, const float* __restrict__ x, float* __restrict__ y) {
    const int outs = p.oh * p.ow;
    const int total = p.planes * outs;
    const float scale = 1.0f / (float)(p.k * p.k);
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int plane = e / outs;
        const int o = e - plane * outs;
        const int oh = o / p.ow;
        const int ow = o - oh * p.ow;
        const float* xp = x + (size_t)plane * p.h * p.w;
        float sum = 0.0f;
        for (int ih = oh * p.stride; ih < oh * p.stride + p.k; ++ih)
            for (int iw = ow * p.stride; iw < ow * p.stride + p.k; ++iw) sum += xp[ih * p.w + iw];
        y[e] = sum * scale;
    }
}

extern "C" __global__ void avg_pool_backward(const PoolParams p, const float* __restrict__ dy, float* __restrict__ dx) {
    const int hw = p.h * p.w;
    const int total = p.planes * hw;
    const float scale = 1.0f / (float)(p.k * p.k);
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int plane = e / hw;
        const int pix = e - plane * hw;
        const int ih = pix / p.w;
        const int iw = pix - ih * p.w;
        // Windows containing ih: o*stride <= ih < o*stride + k.
        const int oh_lo = max(0, (ih - p.k + p.stride) / p.stride);
        const int oh_hi = min(p.oh - 1, ih / p.stride);
        const int ow_lo = max(0, (iw - p.k + p.stride) / p.stride);
        const int ow_hi = min(p.ow - 1, iw / p.stride);
        const float* dyp = dy + (size_t)plane * p.oh * p.ow;
        float sum = 0.0f;
        for (int oh = oh_lo; oh <= oh_hi; ++oh)
            for (int ow = ow_lo; ow <= ow_hi; ++ow) sum += dyp[oh * p.ow + ow] * scale;
        dx[e] = sum;
    }
}

extern "C" __global__ void global_avg_pool_forward(const GlobalPoolParams p, const float* __restrict__ x,
                                                   float* __restrict__ y) {
    const float scale = 1.0f / (float)p.hw;
    for (int plane = global_thread(); plane < p.planes; plane = grid_next(plane)) {
        const float* xp = x + (size_t)plane * p.hw;
        float sum = 0.0f;
        for (int i = 0; i < p.hw; ++i) sum += xp[i];
        y[plane] = sum * scale;
    }
}

extern "C" __global__ void global_avg_pool_backward(const GlobalPoolParams p, const float* __restrict__ dy,
                                                    float* __restrict__ dx) {
    const float scale = 1.0f / (float)p.hw;
    const int total = p.planes * p.hw;
    for (int e = global_thread(); e < total; e = grid_next(e)) dx[e] = dy[e / p.hw] * scale;
}
