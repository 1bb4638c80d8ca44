//! Fully connected layer: y = x W^T + b, as PyTorch's `nn.Linear`.
//!
//! Shapes: x (N, IN), weight (OUT, IN), bias (OUT), y (N, OUT).
//!
//! The math. y[n,o] = sum_i x[n,i] W[o,i] + b[o], so
//!
//!   dW += dy^T x      (OUT, N) x (N, IN)
//!   db += sum_n dy[n, :]
//!   dx  = dy W        (N, OUT) x (OUT, IN)

use super::{expect_rank, Ctx, Layer, Param};
use crate::tensor::{gemm, slice, slice_mut, zeros, Float, Tensor};

pub struct Linear<T: Float> {
    pub in_features: usize,
    pub out_features: usize,
    /// (OUT, IN)
    pub weight: Param<T>,
    /// (OUT)
    pub bias: Param<T>,
    x: Option<Tensor<T>>,
}

impl<T: Float> Linear<T> {
    /// A zero-initialised layer; `model::init_pytorch_default` gives PyTorch's initialisation.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Linear {
            in_features,
            out_features,
            weight: Param::new(zeros(&[out_features, in_features])),
            bias: Param::new(zeros(&[out_features])),
            x: None,
        }
    }
}

impl<T: Float> Layer<T> for Linear<T> {
    fn describe(&self) -> String {
        format!("Linear({}->{})", self.in_features, self.out_features)
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        vec![s[0], self.out_features]
    }

    fn flops(&self, s: &[usize]) -> u64 {
        (2 * s[0] * self.in_features * self.out_features) as u64
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        expect_rank("Linear", x, 2);
        let (n, i, o) = (x.shape()[0], self.in_features, self.out_features);
        assert_eq!(x.shape()[1], i, "Linear: expected {i} input features, got shape {:?}", x.shape());
        let mut y = zeros(&[n, o]);
        let ys = slice_mut(&mut y);
        // Start from the bias in every row, then y += x W^T.
        for row in ys.chunks_exact_mut(o) {
            row.copy_from_slice(slice(&self.bias.value));
        }
        gemm(false, true, n, o, i, T::one(), slice(x), slice(&self.weight.value), T::one(), ys);
        self.x = Some(x.clone());
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let x = self.x.as_ref().expect("Linear::backward called before forward");
        let (n, i, o) = (x.shape()[0], self.in_features, self.out_features);
        assert_eq!(dy.shape(), &[n, o], "Linear: dy shape");
        let dys = slice(dy);
        // dW += dy^T x
        gemm(true, false, o, i, n, T::one(), dys, slice(x), T::one(), slice_mut(&mut self.weight.grad));
        // db += column sums of dy
        let db = slice_mut(&mut self.bias.grad);
        for row in dys.chunks_exact(o) {
            db.iter_mut().zip(row).for_each(|(g, &d)| *g += d);
        }
        // dx = dy W
        let mut dx = zeros(&[n, i]);
        gemm(false, false, n, i, o, T::one(), dys, slice(&self.weight.value), T::zero(), slice_mut(&mut dx));
        dx
    }

    fn params(&self) -> Vec<&Param<T>> {
        vec![&self.weight, &self.bias]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        vec![&mut self.weight, &mut self.bias]
    }
}
