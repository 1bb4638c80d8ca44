//! Average pooling: `AvgPool2d` (kernel, stride, no padding) and `GlobalAvgPool2d` (PyTorch's
//! `AdaptiveAvgPool2d(1)`: the mean of each channel, (N, C, H, W) -> (N, C, 1, 1)).
//!
//! The math. y = (1/|window|) * sum over the window of x, so every input of the window gets
//! the same share of the gradient:
//!
//!   dx[n, c, ih, iw] += dy[n, c, oh, ow] / |window|     for each window containing (ih, iw)
//!
//! The global pool is the same with one window covering the whole plane: dx = dy / (H*W).

use rayon::prelude::*;

use super::{nchw, out_len, Ctx, Layer};
use crate::tensor::{slice, slice_mut, zeros, Float, Tensor};

pub struct AvgPool2d {
    pub kernel: usize,
    pub stride: usize,
    input_shape: Vec<usize>,
}

impl AvgPool2d {
    pub fn new(kernel: usize, stride: usize) -> Self {
        assert!(kernel > 0 && stride > 0, "AvgPool2d: kernel and stride must be positive");
        AvgPool2d { kernel, stride, input_shape: Vec::new() }
    }
}

impl<T: Float> Layer<T> for AvgPool2d {
    fn describe(&self) -> String {
        format!("AvgPool2d(k{}, s{})", self.kernel, self.stride)
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        vec![s[0], s[1], out_len(s[2], self.kernel, self.stride, 0), out_len(s[3], self.kernel, self.stride, 0)]
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let (n, c, h, w) = nchw("AvgPool2d", x);
        let (k, s) = (self.kernel, self.stride);
        let (oh, ow) = (out_len(h, k, s, 0), out_len(w, k, s, 0));
        let scale = T::one() / T::f((k * k) as f64);
        let mut y = zeros(&[n, c, oh, ow]);
        slice_mut(&mut y).par_chunks_mut(oh * ow).zip(slice(x).par_chunks(h * w)).for_each(|(yp, xp)| {
            for i in 0..oh {
                for j in 0..ow {
                    let mut sum = T::zero();
                    for ih in i * s..i * s + k {
                        for iw in j * s..j * s + k {
                            sum += xp[ih * w + iw];
                        }
                    }
                    yp[i * ow + j] = sum * scale;
                }
            }
        });
        self.input_shape = x.shape().to_vec();
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let s_in = self.input_shape.clone();
        assert!(!s_in.is_empty(), "AvgPool2d::backward called before forward");
        let (h, w) = (s_in[2], s_in[3]);
        let (k, s) = (self.kernel, self.stride);
        let (oh, ow) = (dy.shape()[2], dy.shape()[3]);
        let scale = T::one() / T::f((k * k) as f64);
        let mut dx = zeros(&s_in);
        slice_mut(&mut dx).par_chunks_mut(h * w).zip(slice(dy).par_chunks(oh * ow)).for_each(|(dxp, dyp)| {
            for i in 0..oh {
                for j in 0..ow {
                    let share = dyp[i * ow + j] * scale;
                    for ih in i * s..i * s + k {
                        for iw in j * s..j * s + k {
                            dxp[ih * w + iw] += share;
                        }
                    }
                }
            }
        });
        dx
    }
}

/// The mean of each channel: (N, C, H, W) -> (N, C, 1, 1).
#[derive(Default)]
pub struct GlobalAvgPool2d {
    input_shape: Vec<usize>,
}

impl GlobalAvgPool2d {
    pub fn new() -> Self {
        Self::default()
    }
}

impl<T: Float> Layer<T> for GlobalAvgPool2d {
    fn describe(&self) -> String {
        "GlobalAvgPool2d".into()
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        vec![s[0], s[1], 1, 1]
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let (n, c, h, w) = nchw("GlobalAvgPool2d", x);
        let scale = T::one() / T::f((h * w) as f64);
        let y: Vec<T> = slice(x).chunks_exact(h * w).map(|p| p.iter().fold(T::zero(), |s, &v| s + v) * scale).collect();
        self.input_shape = x.shape().to_vec();
        crate::tensor::from_vec(&[n, c, 1, 1], y)
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let s = self.input_shape.clone();
        assert!(!s.is_empty(), "GlobalAvgPool2d::backward called before forward");
        let hw = s[2] * s[3];
        let scale = T::one() / T::f(hw as f64);
        let mut dx = zeros(&s);
        for (dxp, &d) in slice_mut(&mut dx).chunks_exact_mut(hw).zip(slice(dy)) {
            dxp.fill(d * scale);
        }
        dx
    }
}
