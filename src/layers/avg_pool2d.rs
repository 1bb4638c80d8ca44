//! Average pooling: `AvgPool2d` (PyTorch's, with kernel, stride, zero padding and ceil mode per
//! axis, and its default `count_include_pad=True`) and `GlobalAvgPool2d` (PyTorch's
//! `AdaptiveAvgPool2d(1)`: the mean of each channel, (N, C, H, W) -> (N, C, 1, 1)). Not here:
//! `count_include_pad=False` and `divisor_override`.
//!
//! Shapes: x (N, C, H, W) -> y (N, C, OH, OW), OH and OW as for max pooling
//! (`layers::window_out_hw`, floor or ceil mode).
//!
//! The math. Along one axis, output o's window in padded coordinates is [o*S, o*S + K) clipped
//! to the padded input [0, H + 2P); in input coordinates that is [o*S - P, end - P). The padding
//! counts as zeros, so it adds nothing to the sum but does count in the divisor, which is the
//! size of the window in the padded input: a ceil-mode window that hangs past the padded edge
//! divides by fewer (PyTorch's `hend = min(hstart + kH, iH + padH)`, size taken before clipping
//! to the real input). With d = |window in the padded input| (rows times columns):
//!
//!   y[n, c, oh, ow] = (1/d) * sum over the window's real inputs of x
//!
//! so every real input of the window gets the same share of the gradient:
//!
//!   dx[n, c, ih, iw] += dy[n, c, oh, ow] / d     for each window containing (ih, iw)
//!
//! The global pool is the same with one window covering the whole plane: dx = dy / (H*W).

use rayon::prelude::*;

use super::{nchw, window_out_hw, Ctx, Hw, Layer};
use crate::tensor::{slice, slice_mut, sum, zeros, Float, Tensor};

pub struct AvgPool2d {
    kernel: Hw,
    stride: Hw,
    padding: Hw,
    ceil_mode: bool,
    input_shape: Vec<usize>,
}

/// One window along one axis: the real inputs [lo, hi) it covers, and its length in the padded
/// input (its share of the divisor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    lo: usize,
    hi: usize,
    padded: usize,
}

/// The windows along one axis of `len` inputs, `outs` of them.
fn spans(outs: usize, len: usize, k: usize, stride: usize, pad: usize) -> Vec<Span> {
    (0..outs)
        .map(|o| {
            let start = o * stride; // padded coordinates
            let end = (start + k).min(len + 2 * pad);
            Span { lo: start.saturating_sub(pad), hi: end.saturating_sub(pad).min(len), padded: end - start }
        })
        .collect()
}

impl AvgPool2d {
    /// PyTorch's `AvgPool2d(kernel, stride)` (no padding, floor mode). Kernel and stride take an
    /// int or an (h, w) pair.
    pub fn new(kernel: impl Into<Hw>, stride: impl Into<Hw>) -> Self {
        Self::with_options(kernel, stride, 0, false)
    }

    /// PyTorch's `AvgPool2d(kernel, stride, padding, ceil_mode=ceil_mode)` with
    /// `count_include_pad=True`. Panics on a zero kernel or stride, or a padding over half the
    /// kernel on either axis (PyTorch refuses those too).
    pub fn with_options(kernel: impl Into<Hw>, stride: impl Into<Hw>, padding: impl Into<Hw>, ceil_mode: bool) -> Self {
        let (kernel, stride, padding) = (kernel.into(), stride.into(), padding.into());
        assert!(
            kernel.h > 0 && kernel.w > 0 && stride.h > 0 && stride.w > 0,
            "AvgPool2d: kernel ({kernel}) and stride ({stride}) must be positive"
        );
        assert!(
            2 * padding.h <= kernel.h && 2 * padding.w <= kernel.w,
            "AvgPool2d: padding {padding} must be at most half the kernel {kernel} (as in PyTorch)"
        );
        AvgPool2d { kernel, stride, padding, ceil_mode, input_shape: Vec::new() }
    }

    pub fn kernel(&self) -> Hw {
        self.kernel
    }
    pub fn stride(&self) -> Hw {
        self.stride
    }
    pub fn padding(&self) -> Hw {
        self.padding
    }
    pub fn ceil_mode(&self) -> bool {
        self.ceil_mode
    }

    /// The output (OH, OW) of an (H, W) input, or None when the window is larger than the
    /// padded input on either axis.
    pub fn checked_out_hw(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        window_out_hw(h, w, self.kernel, self.stride, self.padding, self.ceil_mode)
    }

    /// The output (OH, OW) of an (H, W) input. Panics when the window does not fit.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        self.checked_out_hw(h, w).unwrap_or_else(|| {
            panic!("AvgPool2d: window {} (padding {}) larger than the {h}x{w} input", self.kernel, self.padding)
        })
    }

    /// The row and column windows of an (H, W) input.
    fn windows(&self, h: usize, w: usize) -> (Vec<Span>, Vec<Span>) {
        let (oh, ow) = self.out_hw(h, w);
        (
            spans(oh, h, self.kernel.h, self.stride.h, self.padding.h),
            spans(ow, w, self.kernel.w, self.stride.w, self.padding.w),
        )
    }
}

impl<T: Float> Layer<T> for AvgPool2d {
    fn describe(&self) -> String {
        // `AvgPool2d(k2, s2)` as before when unpadded and in floor mode.
        let mut d = format!("AvgPool2d(k{}, s{}", self.kernel, self.stride);
        if self.padding != Hw::square(0) {
            d += &format!(", p{}", self.padding);
        }
        if self.ceil_mode {
            d += ", ceil";
        }
        d + ")"
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        let (oh, ow) = self.out_hw(s[2], s[3]);
        vec![s[0], s[1], oh, ow]
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let (n, c, h, w) = nchw("AvgPool2d", x);
        let (rows, cols) = self.windows(h, w);
        let (oh, ow) = (rows.len(), cols.len());
        let mut y = zeros(&[n, c, oh, ow]);
        slice_mut(&mut y).par_chunks_mut(oh * ow).zip(slice(x).par_chunks(h * w)).for_each(|(yp, xp)| {
            for (i, r) in rows.iter().enumerate() {
                for (j, q) in cols.iter().enumerate() {
                    let mut sum = T::zero();
                    for ih in r.lo..r.hi {
                        for iw in q.lo..q.hi {
                            sum += xp[ih * w + iw];
                        }
                    }
                    yp[i * ow + j] = sum / T::f((r.padded * q.padded) as f64);
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
        let (rows, cols) = self.windows(h, w);
        let (oh, ow) = (rows.len(), cols.len());
        assert_eq!(&dy.shape()[2..], &[oh, ow], "AvgPool2d: dy shape");
        let mut dx = zeros(&s_in);
        slice_mut(&mut dx).par_chunks_mut(h * w).zip(slice(dy).par_chunks(oh * ow)).for_each(|(dxp, dyp)| {
            for (i, r) in rows.iter().enumerate() {
                for (j, q) in cols.iter().enumerate() {
                    let share = dyp[i * ow + j] / T::f((r.padded * q.padded) as f64);
                    for ih in r.lo..r.hi {
                        for iw in q.lo..q.hi {
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
        let y: Vec<T> = slice(x).chunks_exact(h * w).map(|p| sum(p) * scale).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's divisors for AvgPool2d(3, 2, padding=1, ceil_mode=True) on 6 inputs: windows
    /// start at padded 0, 2, 4, 6; the last one, [6, 9), hangs past the padded input [0, 8) and
    /// counts 2 (one real input, one padding), the others 3.
    #[test]
    fn ceil_mode_windows_divide_by_their_padded_size() {
        let s = spans(4, 6, 3, 2, 1);
        let got: Vec<(usize, usize, usize)> = s.iter().map(|s| (s.lo, s.hi, s.padded)).collect();
        assert_eq!(got, vec![(0, 2, 3), (1, 4, 3), (3, 6, 3), (5, 6, 2)]);
    }
}
