// Dropout with inverted scaling, as src/layers/dropout.rs, and with the same counter-based
// mask: element i at optimizer step `step` is kept when
//
//   dropout_bits(seed, step, i) = top 24 bits of mix64(mix64(mix64(seed) ^ step) ^ i)
//
// is >= threshold = round(p * 2^24). mix64 is the splitmix64 finaliser. CPU and GPU therefore
// drop the same elements, and the backward recomputes the mask instead of storing it.
//
// forward:  y = x * (kept ? scale : 0),  scale = 1 / (1 - p)
// backward: dx = dy * (kept ? scale : 0)   (dx may alias dy)

#include "common.cuh"

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned int dropout_bits(unsigned long long seed, unsigned long long step,
                                                     unsigned long long index) {
    return (unsigned int)(mix64(mix64(mix64(seed) ^ step) ^ index) >> 40);
}

__device__ __forceinline__ float dropout_factor(const DropoutParams& p, int i) {
    return dropout_bits(p.seed, p.step, (unsigned long long)i) >= p.threshold ? p.scale : 0.0f;
}

extern "C" __global__ void dropout_forward(const DropoutParams p, const float* x, float* y) {
    for (int e = global_thread(); e < (int)p.n; e = grid_next(e)) y[e] = x[e] * dropout_factor(p, e);
}

extern "C" __global__ void dropout_backward(const DropoutParams p, const float* dy, float* dx) {
    for (int e = global_thread(); e < (int)p.n; e = grid_next(e)) dx[e] = dy[e] * dropout_factor(p, e);
}
