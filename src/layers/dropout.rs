//! Dropout with inverted scaling: in training each element is kept with probability 1 - p and
//! scaled by 1/(1 - p), so evaluation (the identity) needs no rescaling.
//!
//! The mask is not drawn from a stateful RNG: element i at optimizer step t is kept when a hash
//! of (seed, t, i) clears a threshold. The CUDA kernel computes the same hash, so CPU and GPU
//! drop the same elements, and a resumed run drops what the uninterrupted run would have.
//!
//! The math. y = x * m / (1 - p) with m in {0, 1} fixed by the forward pass, so
//!
//!   dx = dy * m / (1 - p)

use super::{Ctx, Layer};
use crate::tensor::{slice, slice_mut, Float, Tensor};

/// The splitmix64 finaliser: a bijective mix of 64 bits.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 24 random bits for element `index` at `step` (same formula in `kernels/dropout.cu`).
#[inline]
pub fn dropout_bits(seed: u64, step: u64, index: u64) -> u32 {
    (mix64(mix64(mix64(seed) ^ step) ^ index) >> 40) as u32
}

/// Elements whose 24 bits are below this are dropped: round(p * 2^24).
pub fn drop_threshold(p: f64) -> u32 {
    (p * (1u64 << 24) as f64).round() as u32
}

pub struct Dropout<T: Float> {
    pub p: f64,
    pub seed: u64,
    /// The mask times 1/(1-p) of the last training forward: 0 or 1/(1-p) per element.
    scale: Option<Tensor<T>>,
}

impl<T: Float> Dropout<T> {
    pub fn new(p: f64, seed: u64) -> Self {
        assert!((0.0..1.0).contains(&p), "Dropout: p must be in [0, 1), got {p}");
        Dropout { p, seed, scale: None }
    }
}

impl<T: Float> Layer<T> for Dropout<T> {
    fn describe(&self) -> String {
        format!("Dropout(p={})", self.p)
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        s.to_vec()
    }

    fn forward(&mut self, x: &Tensor<T>, ctx: Ctx) -> Tensor<T> {
        if !ctx.train || self.p == 0.0 {
            self.scale = None;
            return x.clone();
        }
        let keep = T::one() / T::f(1.0 - self.p);
        let threshold = drop_threshold(self.p);
        let mut scale = x.clone();
        for (i, s) in slice_mut(&mut scale).iter_mut().enumerate() {
            let kept = dropout_bits(self.seed, ctx.step, i as u64) >= threshold;
            *s = if kept { keep } else { T::zero() };
        }
        let mut y = x.clone();
        slice_mut(&mut y).iter_mut().zip(slice(&scale)).for_each(|(v, &s)| *v *= s);
        self.scale = Some(scale);
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        match &self.scale {
            None => dy.clone(), // evaluation mode: the identity
            Some(scale) => dy * scale,
        }
    }
}
