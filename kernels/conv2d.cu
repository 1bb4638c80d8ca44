// Convolution's data movement: im2col and its adjoint col2im, over the whole batch. The
// products themselves are SGEMMs (gemm.cu) and the bias is bias.cu or the GEMM epilogue:
//
//   forward   y (OC, N*L)   = W (OC, K) col (K, N*L) + b          sgemm_nn, bias per row
//   backward  dW (OC, K)    = dy (OC, N*L) col^T                  sgemm_nt, split-K
//             db            = row sums of dy                      bias_grad
//             dcol (K, N*L) = W^T dy                              sgemm_tn
//             dx            = col2im(dcol)
//
// with K = C*KH*KW, L = OH*OW, x (C, N, H, W) and y (OC, N, OH, OW) channel-major ("CNHW"),
// so that the batch is the inner part of the GEMM's column index: col[(c,i,j), (n,oh,ow)] =
// x[c, n, oh*S-P+i, ow*S-P+j], 0 in the padding. With N = 1 this is the CPU's im2col.
//
// col2im gathers instead of scattering: each thread owns one pixel of dx and adds the
// entries of dcol that were copied from it, in (i, j) order, the order the CPU adds them.

#include "common.cuh"

extern "C" __global__ void im2col(const ConvParams p, const float* __restrict__ x, float* __restrict__ col) {
    const int l = p.oh * p.ow;
    const int cols = p.n * l;
    const int total = p.c * p.kh * p.kw * cols;
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int row = e / cols;  // (c, i, j)
        const int q = e - row * cols;  // (n, oh, ow)
        const int j = row % p.kw;
        const int i = (row / p.kw) % p.kh;
        const int c = row / (p.kw * p.kh);
        const int n = q / l;
        const int r = q - n * l;
        const int oh = r / p.ow;
        const int ow = r - oh * p.ow;
        const int ih = oh * p.stride - p.pad + i;
        const int iw = ow * p.stride - p.pad + j;
        const bool inside = ih >= 0 && ih < p.h && iw >= 0 && iw < p.w;
        col[e] = inside ? x[(((size_t)c * p.n + n) * p.h + ih) * p.w + iw] : 0.0f;
    }
}

extern "C" __global__ void col2im(const ConvParams p, const float* __restrict__ dcol, float* __restrict__ dx) {
    const int l = p.oh * p.ow;
    const size_t cols = (size_t)p.n * l;
    const int total = p.c * p.n * p.h * p.w;
    for (int e = global_thread(); e < total; e = grid_next(e)) {
        const int iw = e % p.w;
        const int ih = (e / p.w) % p.h;
        const int n = (e / (p.w * p.h)) % p.n;
        const int c = e / (p.w * p.h * p.n);
        float sum = 0.0f;
        for (int i = 0; i < p.kh; ++i) {
            const int th = ih + p.pad - i;  // = oh * stride when (ih, iw) is under tap i
            if (th < 0 || th % p.stride != 0) continue;
            const int oh = th / p.stride;
            if (oh >= p.oh) continue;
            for (int j = 0; j < p.kw; ++j) {
                const int tw = iw + p.pad - j;
                if (tw < 0 || tw % p.stride != 0) continue;
                const int ow = tw / p.stride;
                if (ow >= p.ow) continue;
                const int row = (c * p.kh + i) * p.kw + j;
                sum += dcol[row * cols + (size_t)n * l + oh * p.ow + ow];
            }
        }
        dx[e] = sum;
    }
}
