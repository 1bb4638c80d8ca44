// Softmax cross-entropy on logits, fused forward and backward, as
// src/layers/cross_entropy.rs (PyTorch's CrossEntropyLoss, mean over the batch):
//
//   lse_n = m_n + log sum_k exp(z[n,k] - m_n),  m_n = max_k z[n,k]
//   loss_n = lse_n - z[n, t_n]
//   dz[n,k] = (exp(z[n,k] - lse_n) - [k == t_n]) / N
//
// It also counts the rows whose first maximal logit is the target (argmax as the CPU:
// `z[j] > z[best]`). One block of MEDCNN_THREADS threads does the whole batch: thread t takes
// rows t, t + 256, ... in order and the block sums the per-thread losses and counts in a fixed
// tree, then thread 0 adds them to stats[0] (loss sum) and stats[1] (correct), doubles that
// live on the device across steps. Launch with exactly one block.

#include "common.cuh"

extern "C" __global__ void __launch_bounds__(MEDCNN_THREADS)
    cross_entropy_forward_backward(const CrossEntropyParams p, const float* __restrict__ logits,
                                   const int* __restrict__ targets, float* __restrict__ dlogits,
                                   double* __restrict__ stats) {
    __shared__ float scratch[MEDCNN_THREADS];
    const float inv_n = 1.0f / (float)p.n;
    float loss = 0.0f;
    float correct = 0.0f;
    for (int r = threadIdx.x; r < p.n; r += MEDCNN_THREADS) {
        const float* z = logits + (size_t)r * p.k;
        float* dz = dlogits + (size_t)r * p.k;
        const int t = targets[r];
        float m = z[0];
        int best = 0;
        for (int j = 1; j < p.k; ++j) {
            m = fmaxf(m, z[j]);
            if (z[j] > z[best]) best = j;
        }
        float sum = 0.0f;
        for (int j = 0; j < p.k; ++j) sum += expf(z[j] - m);
        const float lse = m + logf(sum);
        loss += lse - z[t];
        correct += best == t ? 1.0f : 0.0f;
        for (int j = 0; j < p.k; ++j) {
            float g = expf(z[j] - lse);
            if (j == t) g -= 1.0f;
            dz[j] = g * inv_n;
        }
    }
    const float loss_sum = block_sum(loss, scratch);
    const float correct_sum = block_sum(correct, scratch);
    if (threadIdx.x == 0) {
        stats[0] += (double)loss_sum;
        stats[1] += (double)correct_sum;
    }
}
