//! 2-D max pooling with PyTorch's semantics: kernel, stride, implicit -inf padding and floor or
//! ceil mode, each per axis (height, width). The gradient is routed to the input that won each
//! window. Not here: dilation and `return_indices`.
//!
//! Shapes: x (N, C, H, W) -> y (N, C, OH, OW) with OH = floor((H + 2PH - KH) / SH) + 1 (floor
//! mode), OW likewise; ceil mode rounds up but, as PyTorch does, drops a last window that would
//! start in the right padding (`layers::window_out_len`).
//!
//! The math. y[n,c,oh,ow] = max over the window of x. The padding is -inf, so it never wins:
//! the max runs over the window clipped to the input, which is never empty (a window starts
//! inside the input or the left padding, and the padding is at most half the kernel). The max
//! is piecewise the identity of one input, its argmax a*, so dy/dx = 1 at a* and 0 elsewhere:
//!
//!   dx[n, c, a*(oh, ow)] += dy[n, c, oh, ow]
//!
//! Ties go to the first maximum in row-major window order (PyTorch does the same); overlapping
//! windows (stride < kernel) may route several dy into one input, hence `+=`.

use rayon::prelude::*;

use super::{nchw, window_out_hw, Ctx, Hw, Layer};
use crate::tensor::{slice, slice_mut, zeros, Float, Tensor};

pub struct MaxPool2d {
    kernel: Hw,
    stride: Hw,
    padding: Hw,
    ceil_mode: bool,
    /// For each output, the flat index (ih * W + iw) of its argmax within its (H, W) plane.
    argmax: Vec<u32>,
    input_shape: Vec<usize>,
}

impl MaxPool2d {
    /// PyTorch's `MaxPool2d(kernel, stride)` (floor mode, no padding). Kernel and stride take an
    /// int or an (h, w) pair.
    pub fn new(kernel: impl Into<Hw>, stride: impl Into<Hw>) -> Self {
        Self::with_options(kernel, stride, 0, false)
    }

    /// PyTorch's `MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)`. Panics on a zero
    /// kernel or stride, or a padding over half the kernel on either axis (PyTorch refuses those
    /// too); a model spec checks them first and says which layer is wrong.
    pub fn with_options(kernel: impl Into<Hw>, stride: impl Into<Hw>, padding: impl Into<Hw>, ceil_mode: bool) -> Self {
        let (kernel, stride, padding) = (kernel.into(), stride.into(), padding.into());
        assert!(
            kernel.h > 0 && kernel.w > 0 && stride.h > 0 && stride.w > 0,
            "MaxPool2d: kernel ({kernel}) and stride ({stride}) must be positive"
        );
        assert!(
            2 * padding.h <= kernel.h && 2 * padding.w <= kernel.w,
            "MaxPool2d: padding {padding} must be at most half the kernel {kernel} (as in PyTorch)"
        );
        MaxPool2d { kernel, stride, padding, ceil_mode, argmax: Vec::new(), input_shape: Vec::new() }
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
            panic!("MaxPool2d: window {} (padding {}) larger than the {h}x{w} input", self.kernel, self.padding)
        })
    }

    /// The input rows [lo, hi) covered by window row `o` of an input `len` rows high.
    #[inline]
    pub(crate) fn rows(&self, o: usize, len: usize) -> (usize, usize) {
        clip(o * self.stride.h, self.kernel.h, self.padding.h, len)
    }

    /// The input columns [lo, hi) covered by window column `o` of an input `len` wide.
    #[inline]
    pub(crate) fn cols(&self, o: usize, len: usize) -> (usize, usize) {
        clip(o * self.stride.w, self.kernel.w, self.padding.w, len)
    }
}

/// The window [start - pad, start - pad + k) of padded coordinates, clipped to the input [0, len).
#[inline]
fn clip(start: usize, k: usize, pad: usize, len: usize) -> (usize, usize) {
    let lo = start.saturating_sub(pad);
    let hi = (start + k).saturating_sub(pad).min(len);
    (lo, hi)
}

/// Forward of one (H, W) plane: writes y (OH, OW) and the argmax of every window.
// `!(v <= best)` rather than `v > best`: the two differ for NaN, which must win (as in PyTorch).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn max_pool_plane<T: Float>(p: &MaxPool2d, x: &[T], h: usize, w: usize, y: &mut [T], arg: &mut [u32]) {
    let (oh, ow) = p.out_hw(h, w);
    for i in 0..oh {
        let (h0, h1) = p.rows(i, h);
        for j in 0..ow {
            let (w0, w1) = p.cols(j, w);
            let mut best = h0 * w + w0;
            for ih in h0..h1 {
                for iw in w0..w1 {
                    // `!(v <= best)` also takes a NaN, which then propagates as in PyTorch.
                    if !(x[ih * w + iw] <= x[best]) {
                        best = ih * w + iw;
                    }
                }
            }
            y[i * ow + j] = x[best];
            arg[i * ow + j] = best as u32;
        }
    }
}

impl<T: Float> Layer<T> for MaxPool2d {
    fn describe(&self) -> String {
        // `k2, s2, p0` for square settings, `k(3, 2)` for pairs.
        format!(
            "MaxPool2d(k{}, s{}, p{}{})",
            self.kernel,
            self.stride,
            self.padding,
            if self.ceil_mode { ", ceil" } else { "" }
        )
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        let (oh, ow) = self.out_hw(s[2], s[3]);
        vec![s[0], s[1], oh, ow]
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let (n, c, h, w) = nchw("MaxPool2d", x);
        let (oh, ow) = self.out_hw(h, w);
        let mut y = zeros(&[n, c, oh, ow]);
        let mut argmax = std::mem::take(&mut self.argmax);
        argmax.resize(n * c * oh * ow, 0);
        let this = &*self;
        slice_mut(&mut y)
            .par_chunks_mut(oh * ow)
            .zip(argmax.par_chunks_mut(oh * ow))
            .zip(slice(x).par_chunks(h * w))
            .for_each(|((yp, ap), xp)| max_pool_plane(this, xp, h, w, yp, ap));
        self.argmax = argmax;
        self.input_shape = x.shape().to_vec();
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let s = self.input_shape.clone();
        assert!(!s.is_empty(), "MaxPool2d::backward called before forward");
        let (h, w) = (s[2], s[3]);
        let plane_out = dy.shape()[2] * dy.shape()[3];
        let mut dx = zeros(&s);
        slice_mut(&mut dx)
            .par_chunks_mut(h * w)
            .zip(slice(dy).par_chunks(plane_out))
            .zip(self.argmax.par_chunks(plane_out))
            .for_each(|((dxp, dyp), ap)| {
                for (&d, &a) in dyp.iter().zip(ap) {
                    dxp[a as usize] += d;
                }
            });
        dx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_follow_pytorch() {
        // torch.nn.MaxPool2d(2, 2) on 62 -> 31, 29 -> 14 (floor), ceil_mode on 29 -> 15.
        assert_eq!(MaxPool2d::new(2, 2).out_hw(62, 29), (31, 14));
        assert_eq!(MaxPool2d::with_options(2, 2, 0, true).out_hw(29, 29), (15, 15));
        // ceil mode must not start a window in the padding: k2 s2 p1 on 5 -> 3, not 4
        // (the 4th window would start at padded index 6 = 5 + 1, all padding).
        assert_eq!(MaxPool2d::with_options(2, 2, 1, true).out_hw(5, 6), (3, 4));
        // Per axis: torch.nn.MaxPool2d((3, 2), (2, 1), (1, 0))(torch.zeros(1, 1, 7, 5)) is 4x4.
        assert_eq!(MaxPool2d::with_options((3, 2), (2, 1), (1, 0), false).out_hw(7, 5), (4, 4));
        assert_eq!(MaxPool2d::new(3, 1).checked_out_hw(2, 5), None);
    }

    #[test]
    fn routes_gradient_to_the_first_maximum() {
        let mut p = MaxPool2d::new(2, 2);
        // One 2x2 window with a tie between (0,1) and (1,0): the first, (0,1), wins.
        let x = crate::tensor::from_vec(&[1, 1, 2, 2], vec![1.0f64, 3.0, 3.0, 2.0]);
        let y = p.forward(&x, Ctx::eval());
        assert_eq!(y.as_slice().unwrap(), &[3.0]);
        let dx = Layer::<f64>::backward(&mut p, &crate::tensor::from_vec(&[1, 1, 1, 1], vec![5.0]));
        assert_eq!(dx.as_slice().unwrap(), &[0.0, 5.0, 0.0, 0.0]);
    }
}
