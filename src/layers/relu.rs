//! ReLU: y = max(x, 0), elementwise, any shape.
//!
//! The math. dy/dx = 1 where x > 0 and 0 elsewhere (PyTorch also takes 0 at x == 0), so
//!
//!   dx = dy * [y > 0]
//!
//! The output alone decides it (y > 0 exactly when x > 0), so forward keeps y, not x.

use super::{Ctx, Layer};
use crate::tensor::{Float, Tensor};

#[derive(Default)]
pub struct Relu<T: Float> {
    y: Option<Tensor<T>>,
}

impl<T: Float> Relu<T> {
    pub fn new() -> Self {
        Relu { y: None }
    }
}

impl<T: Float> Layer<T> for Relu<T> {
    fn describe(&self) -> String {
        "ReLU".into()
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        s.to_vec()
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        // `v > 0 ? v : 0`, written so that a NaN stays NaN (as in PyTorch) instead of vanishing.
        let y = x.mapv(|v| if v < T::zero() { T::zero() } else { v });
        self.y = Some(y.clone());
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let y = self.y.as_ref().expect("ReLU::backward called before forward");
        let mut dx = dy.clone();
        dx.zip_mut_with(y, |d, &v| {
            if v <= T::zero() {
                *d = T::zero()
            }
        });
        dx
    }
}
