// One Adam step over every parameter at once (parameters, gradients and both moments are
// each one flat buffer), exactly the update of src/optim.rs in f32:
//
//   g  = grad + wd * p
//   m  = b1 * m + (1 - b1) * g
//   v  = b2 * v + (1 - b2) * g^2
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
//
// with 1 - b1, 1 - b2, step_size = lr / (1 - b1^t) and bc2_sqrt = sqrt(1 - b2^t) computed on
// the host in f64 and rounded once to f32 (AdamParams), as the CPU does. The __f*_rn intrinsics keep the compiler from fusing
// multiply-adds, so each operation rounds as the CPU's does and both devices agree to the bit
// given the same gradients.

#include "common.cuh"

extern "C" __global__ void adam_step(const AdamParams p, float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v) {
    for (int i = global_thread(); i < p.n; i = grid_next(i)) {
        const float w = param[i];
        const float g = __fadd_rn(grad[i], __fmul_rn(p.wd, w));
        const float mi = __fadd_rn(__fmul_rn(p.b1, m[i]), __fmul_rn(p.one_minus_b1, g));
        const float vi = __fadd_rn(__fmul_rn(p.b2, v[i]), __fmul_rn(__fmul_rn(p.one_minus_b2, g), g));
        m[i] = mi;
        v[i] = vi;
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), p.bc2_sqrt), p.eps);
        param[i] = __fsub_rn(w, __fdiv_rn(__fmul_rn(p.step_size, mi), denom));
    }
}
