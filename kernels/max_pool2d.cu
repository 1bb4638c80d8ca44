// 2-D max pooling with PyTorch's semantics, as src/layers/max_pool2d.rs: windows k x k at
// `stride`, implicit -inf padding `pad` (a window is clipped to the plane), the output size
// (floor or ceil mode) chosen on the host. Planes are independent: (N*C or C*N, H, W).
//
// forward:  y[p, o] = max of the window; argmax[p, o] = ih*W + iw of the first maximum in
//           row-major window order (`!(v <= best)`, so a NaN wins and propagates).
// backward: dx[p, ih, iw] = sum of dy[p, o] over the windows o whose argmax is (ih, iw).
//           Gathered per input pixel in window order (no atomics; the same order as the
//           CPU's `+=`). With relu_mask, dx is also zeroed where x <= 0: the backward of a
//           ReLU feeding the pool (x is then the ReLU's output).

#include "common.cuh"

// The input range [lo, hi) of window o along an axis of length len.
__device__ __forceinline__ void pool_window(int o, int len, const PoolParams& p, int& lo, int& hi) {
    const int start = o * p.stride - p.pad;
    lo = max(start, 0);
    hi = min(start + p.k, len);
}

extern "C" __global__ void max_pool_forward(const PoolParams p, const float* __restrict__ x, float* __restrict__ y,
                                            int* __restrict__ argmax) {
    const int outs = p.oh * p.ow;
    const int total = p.planes * outs;
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int plane = e / outs;
        const int o = e - plane * outs;
        const int oh = o / p.ow;
        const int ow = o - oh * p.ow;
        int h0, h1, w0, w1;
        pool_window(oh, p.h, p, h0, h1);
        pool_window(ow, p.w, p, w0, w1);
        const float* xp = x + (size_t)plane * p.h * p.w;
        int best = h0 * p.w + w0;
        float bv = xp[best];
        for (int ih = h0; ih < h1; ++ih)
            for (int iw = w0; iw < w1; ++iw) {
                const float v = xp[ih * p.w + iw];
                if (!(v <= bv)) {
                    best = ih * p.w + iw;
                    bv = v;
                }
            }
        y[e] = bv;
        argmax[e] = best;
    }
}

// x is the pool's input (read only when relu_mask is set).
extern "C" __global__ void max_pool_backward(const PoolParams p, const float* __restrict__ dy,
                                             const int* __restrict__ argmax, const float* __restrict__ x,
                                             float* __restrict__ dx) {
    const int hw = p.h * p.w;
    const int total = p.planes * hw;
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int plane = e / hw;
        const int pix = e - plane * hw;
        const int ih = pix / p.w;
        const int iw = pix - ih * p.w;
        float sum = 0.0f;
        if (!(p.relu_mask && x[e] <= 0.0f)) {
            // Windows containing ih: o*stride - pad <= ih < o*stride - pad + k.
            const int oh_lo = max(0, (ih + p.pad - p.k + p.stride) / p.stride);
            const int oh_hi = min(p.oh - 1, (ih + p.pad) / p.stride);
            const int ow_lo = max(0, (iw + p.pad - p.k + p.stride) / p.stride);
            const int ow_hi = min(p.ow - 1, (iw + p.pad) / p.stride);
            const size_t base = (size_t)plane * p.oh * p.ow;
            for (int oh = oh_lo; oh <= oh_hi; ++oh)
                for (int ow = ow_lo; ow <= ow_hi; ++ow) {
                    const size_t o = base + oh * p.ow + ow;
                    if (argmax[o] == pix) sum += dy[o];
                }
        }
        dx[e] = sum;
    }
}
