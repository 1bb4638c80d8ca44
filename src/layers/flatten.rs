//! Flatten: (N, C, H, W) -> (N, C*H*W). Only the shape changes; the data and its row-major
//! order do not, so backward reshapes dy back to the input's shape.

use super::{Ctx, Layer};
use crate::tensor::{Float, Tensor};

#[derive(Default)]
pub struct Flatten {
    input_shape: Vec<usize>,
}

impl Flatten {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<T: Float> Layer<T> for Flatten {
    fn describe(&self) -> String {
        "Flatten".into()
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        vec![s[0], s[1..].iter().product()]
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        self.input_shape = x.shape().to_vec();
        let out = <Self as Layer<T>>::output_shape(self, x.shape());
        crate::tensor::from_vec(&out, crate::tensor::slice(x).to_vec())
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        crate::tensor::from_vec(&self.input_shape, crate::tensor::slice(dy).to_vec())
    }
}
