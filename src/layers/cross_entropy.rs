//! Softmax cross-entropy, fused and numerically stable, averaged over the batch (PyTorch's
//! `nn.CrossEntropyLoss()` on logits).
//!
//! Shapes: logits z (N, K), targets t (N) class indices, loss a scalar.
//!
//! The math. With the log-sum-exp trick (m = max_k z_k, so no exp overflows):
//!
//!   log p_k = z_k - lse,   lse = m + log sum_k exp(z_k - m)
//!   L = (1/N) sum_n (lse_n - z[n, t_n])
//!
//! and, because d lse / d z_k = p_k, the gradient is simply
//!
//!   dz[n, k] = (p[n, k] - [k == t_n]) / N

use crate::tensor::{from_vec, slice, Float, Tensor};

#[derive(Default)]
pub struct SoftmaxCrossEntropy<T: Float> {
    /// Softmax probabilities of the last forward, (N, K).
    probs: Option<Tensor<T>>,
    targets: Vec<usize>,
}

impl<T: Float> SoftmaxCrossEntropy<T> {
    pub fn new() -> Self {
        SoftmaxCrossEntropy { probs: None, targets: Vec::new() }
    }

    /// The mean loss over the batch. Keeps the probabilities for `backward`.
    pub fn forward(&mut self, logits: &Tensor<T>, targets: &[usize]) -> T {
        assert_eq!(logits.ndim(), 2, "cross-entropy: logits must be (N, K), got {:?}", logits.shape());
        let (n, k) = (logits.shape()[0], logits.shape()[1]);
        assert_eq!(targets.len(), n, "cross-entropy: {n} logits rows but {} targets", targets.len());
        let mut probs = Vec::with_capacity(n * k);
        let mut total = T::zero();
        for (z, &t) in slice(logits).chunks_exact(k).zip(targets) {
            assert!(t < k, "cross-entropy: target {t} out of range for {k} classes");
            let m = z.iter().fold(T::neg_infinity(), |a, &b| a.max(b));
            let sum = z.iter().fold(T::zero(), |s, &v| s + (v - m).exp());
            let lse = m + sum.ln();
            total += lse - z[t];
            probs.extend(z.iter().map(|&v| (v - lse).exp()));
        }
        self.probs = Some(from_vec(&[n, k], probs));
        self.targets = targets.to_vec();
        total / T::f(n as f64)
    }

    /// dL/dz for the last forward (the loss itself has gradient 1).
    pub fn backward(&self) -> Tensor<T> {
        let probs = self.probs.as_ref().expect("cross-entropy backward called before forward");
        let (n, k) = (probs.shape()[0], probs.shape()[1]);
        let inv_n = T::one() / T::f(n as f64);
        let mut dz = probs.clone();
        for (row, &t) in dz.as_slice_mut().unwrap().chunks_exact_mut(k).zip(&self.targets) {
            row[t] -= T::one();
            row.iter_mut().for_each(|v| *v *= inv_n);
        }
        dz
    }

    /// The softmax probabilities of the last forward, (N, K).
    pub fn probs(&self) -> Option<&Tensor<T>> {
        self.probs.as_ref()
    }
}

/// The index of the largest logit of each row (the predicted class).
pub fn argmax_rows<T: Float>(logits: &Tensor<T>) -> Vec<usize> {
    let k = logits.shape()[1];
    slice(logits).chunks_exact(k).map(argmax).collect()
}

/// The index of the largest value, the first of equal ones (as `torch.argmax`); 0 when empty.
/// The one argmax of the crate: every predicted class comes from here.
pub fn argmax<T: PartialOrd>(v: &[T]) -> usize {
    (0..v.len()).fold(0, |best, j| if v[j] > v[best] { j } else { best })
}

/// Softmax of one row of logits, in f64: p_k = exp(z_k - m) / sum_j exp(z_j - m) with
/// m = max z (the same log-sum-exp shift as the loss, so nothing overflows). The one softmax
/// of the crate for reporting probabilities.
pub fn softmax<T: Float>(z: &[T]) -> Vec<f64> {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, b| a.max(b.as_f64()));
    let e: Vec<f64> = z.iter().map(|v| (v.as_f64() - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The cross-entropy of one row against class `t`, in f64 (`lse - z_t`, as in the loss).
pub fn row_loss<T: Float>(z: &[T], t: usize) -> f64 {
    let m = z.iter().fold(f64::NEG_INFINITY, |a, b| a.max(b.as_f64()));
    let lse = m + z.iter().map(|v| (v.as_f64() - m).exp()).sum::<f64>().ln();
    lse - z[t].as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_the_largest() {
        assert_eq!(argmax(&[5.0, 1.0, 2.0]), 0);
        assert_eq!(argmax(&[1.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[1.0, 2.0, 5.0]), 2);
        assert_eq!(argmax(&[-1.0, -0.5, -2.0]), 1);
        assert_eq!(argmax(&[3.0, 1.0, 3.0]), 0, "ties go to the first, as torch.argmax");
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1, "ties go to the first, as torch.argmax");
        assert_eq!(argmax::<f32>(&[]), 0);
    }

    #[test]
    fn argmax_rows_gives_each_rows_winner() {
        let z = from_vec(&[3, 4], vec![0.1f32, 0.2, 0.9, 0.3, 7.0, -1.0, 2.0, 6.5, -3.0, -2.0, -4.0, -1.5]);
        assert_eq!(argmax_rows(&z), vec![2, 0, 3]);
    }

    /// Against values worked out by hand (exp(z) / sum exp(z)), and for logits whose exp
    /// overflows f64 without the max shift.
    #[test]
    fn softmax_is_the_normalised_exponential() {
        let p = softmax(&[1.0f64, 2.0, 3.0]);
        let want = [0.09003057317038046, 0.24472847105479764, 0.6652409557748219];
        assert_eq!(p.len(), 3);
        for (a, b) in p.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{p:?}");
        }
        assert_eq!(softmax(&[1000.0f32, 1000.0]), vec![0.5, 0.5]);
        let p = softmax(&[800.0f64, 0.0]);
        assert!(p[0] == 1.0 && p[1] >= 0.0 && p[1] < 1e-300, "{p:?}");
    }

    /// One row's loss, the reporting form (validation and test loss): against the value worked
    /// out by hand, against the layer's own forward on a batch of one, and with logits whose
    /// exp overflows without the max shift.
    #[test]
    fn row_loss_is_log_sum_exp_minus_the_target_logit() {
        // log(e^1 + e^2 + e^3) - 3
        assert!((row_loss(&[1.0f64, 2.0, 3.0], 2) - 0.40760596444437994).abs() < 1e-15);
        assert!((row_loss(&[1.0f64, 2.0, 3.0], 0) - 2.40760596444438).abs() < 1e-14);
        let z = [0.3f64, -1.2, 2.5, 0.0];
        let layer = SoftmaxCrossEntropy::<f64>::new().forward(&from_vec(&[1, 4], z.to_vec()), &[1]);
        assert!((row_loss(&z, 1) - layer).abs() < 1e-15, "{} vs the layer's {layer}", row_loss(&z, 1));
        assert!((row_loss(&[1000.0f32, 1000.0], 1) - std::f64::consts::LN_2).abs() < 1e-12);
    }

    /// `probs` is None before any forward, then the rows' softmax of the last forward.
    #[test]
    fn probs_are_kept_from_the_last_forward() {
        let mut ce = SoftmaxCrossEntropy::<f64>::new();
        assert!(ce.probs().is_none());
        let rows = [[0.5, -1.0, 2.0], [3.0, 3.0, -2.0]];
        let z = from_vec(&[2, 3], rows.concat());
        ce.forward(&z, &[2, 0]);
        let p = ce.probs().expect("probabilities after forward");
        assert_eq!(p.shape(), &[2, 3]);
        for (got, row) in slice(p).chunks_exact(3).zip(&rows) {
            for (a, b) in got.iter().zip(softmax(row)) {
                assert!((a - b).abs() < 1e-15, "{got:?} vs the softmax of {row:?}");
            }
        }
    }
}
