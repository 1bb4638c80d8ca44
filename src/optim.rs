//! Adam (as `torch.optim.Adam`, with bias correction and optional L2 weight decay) and the
//! learning-rate schedules. Parameters and their gradients come from `Sequential::params_mut`.
//!
//! The update, for every parameter p with gradient g at step t = 1, 2, ...:
//!
//!   g  = g + wd * p                         (weight decay as L2, like torch.optim.Adam)
//!   m  = b1 * m + (1 - b1) * g              first moment
//!   v  = b2 * v + (1 - b2) * g^2            second moment
//!   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

use serde::{Deserialize, Serialize};

use crate::layers::Param;
use crate::tensor::{slice, slice_mut, Float};

#[derive(Clone, Debug)]
pub struct Adam<T: Float> {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Steps taken so far.
    pub t: u64,
    /// First and second moments, one buffer per parameter (created at the first step).
    pub m: Vec<Vec<T>>,
    pub v: Vec<Vec<T>>,
}

impl<T: Float> Adam<T> {
    pub fn new(lr: f64) -> Self {
        Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, t: 0, m: Vec::new(), v: Vec::new() }
    }

    pub fn with_weight_decay(mut self, wd: f64) -> Self {
        self.weight_decay = wd;
        self
    }

    /// One update of every parameter from its accumulated gradient.
    pub fn step(&mut self, params: &mut [&mut Param<T>]) {
        if self.m.is_empty() {
            self.m = params.iter().map(|p| vec![T::zero(); p.value.len()]).collect();
            self.v = self.m.clone();
        }
        assert_eq!(self.m.len(), params.len(), "Adam: parameter count changed between steps");
        self.t += 1;
        let t = self.t as i32;
        let (b1, b2) = (T::f(self.beta1), T::f(self.beta2));
        // 1 - beta in f64, rounded once (as PyTorch): 1 - 0.999f32 would lose most digits.
        let (one_minus_b1, one_minus_b2) = (T::f(1.0 - self.beta1), T::f(1.0 - self.beta2));
        let step_size = T::f(self.lr / (1.0 - self.beta1.powi(t)));
        let bc2_sqrt = T::f((1.0 - self.beta2.powi(t)).sqrt());
        let (eps, wd) = (T::f(self.eps), T::f(self.weight_decay));
        for ((p, m), v) in params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            // Value and gradient are separate fields: borrow both, no copy of the gradient.
            let (value, grad) = (slice_mut(&mut p.value), slice(&p.grad));
            assert!(m.len() == value.len() && v.len() == value.len(), "Adam: moment and parameter sizes differ");
            let moments = m.iter_mut().zip(v.iter_mut());
            for ((value, &grad), (m, v)) in value.iter_mut().zip(grad).zip(moments) {
                let g = grad + wd * *value;
                *m = b1 * *m + one_minus_b1 * g;
                *v = b2 * *v + one_minus_b2 * g * g;
                *value -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
            }
        }
    }
}

/// How the learning rate changes from epoch to epoch (epochs count from 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` every `every` epochs (torch's StepLR).
    Step { every: usize, gamma: f64 },
    /// Cosine from the base rate down to `min_lr` over `epochs` (torch's CosineAnnealingLR).
    Cosine { epochs: usize, min_lr: f64 },
}

impl LrSchedule {
    pub fn lr(&self, base: f64, epoch: usize) -> f64 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1)) as i32),
            LrSchedule::Cosine { epochs, min_lr } => {
                let t = epoch.min(epochs) as f64 / epochs.max(1) as f64;
                min_lr + (base - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(LrSchedule::Constant.lr(0.1, 7), 0.1);
        let s = LrSchedule::Step { every: 2, gamma: 0.5 };
        assert_eq!([s.lr(1.0, 0), s.lr(1.0, 1), s.lr(1.0, 2), s.lr(1.0, 5)], [1.0, 1.0, 0.5, 0.25]);
        let c = LrSchedule::Cosine { epochs: 10, min_lr: 0.0 };
        assert!((c.lr(1.0, 5) - 0.5).abs() < 1e-12 && c.lr(1.0, 10).abs() < 1e-12);
    }

    /// Cosine with a floor: min_lr + (base - min_lr) (1 + cos(pi t / T)) / 2, checked at the
    /// start, the middle, the end and past the end (it stays at min_lr). min_lr = 0.1 is not 0,
    /// so `base - min_lr` and `min_lr + ...` both matter (a schedule test with min_lr = 0
    /// cannot tell `base - min_lr` from `base + min_lr`).
    #[test]
    fn cosine_with_a_floor() {
        let c = LrSchedule::Cosine { epochs: 4, min_lr: 0.1 };
        let got = [c.lr(1.0, 0), c.lr(1.0, 1), c.lr(1.0, 2), c.lr(1.0, 4), c.lr(1.0, 9)];
        let want = [1.0, 0.1 + 0.9 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2), 0.55, 0.1, 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} != {want:?}");
        }
    }

    /// On f(p) = p^2 / 2 (gradient p) the first Adam step moves each parameter by lr * sign(p).
    #[test]
    fn first_step_is_lr_times_sign() {
        let mut p = Param::new(crate::tensor::from_vec(&[2], vec![3.0f64, -2.0]));
        p.grad = p.value.clone();
        let mut adam = Adam::new(0.1);
        adam.step(&mut [&mut p]);
        let v = p.value.as_slice().unwrap();
        assert!((v[0] - 2.9).abs() < 1e-7 && (v[1] + 1.9).abs() < 1e-7, "{v:?}");
    }
}
