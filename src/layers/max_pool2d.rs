//! 2-D max pooling with PyTorch's semantics: kernel, stride, implicit -inf padding and floor or
//! ceil mode. The gradient is routed to the input that won each window.
//!
//! Shapes: x (N, C, H, W) -> y (N, C, OH, OW) with OH = floor((H + 2P - K) / S) + 1 (floor
//! mode); ceil mode rounds up but, as PyTorch does, drops a last window that would start in
//! the right padding.
//!
//! The math. y[n,c,oh,ow] = max over the window of x. The max is piecewise the identity of one
//! input, its argmax a*, so dy/dx = 1 at a* and 0 elsewhere:
//!
//!   dx[n, c, a*(oh, ow)] += dy[n, c, oh, ow]
//!
//! Ties go to the first maximum in row-major window order (PyTorch does the same); overlapping
//! windows (stride < kernel) may route several dy into one input, hence `+=`.

use rayon::prelude::*;

use super::{nchw, Ctx, Layer};
use crate::tensor::{slice, slice_mut, zeros, Float, Tensor};

pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub ceil_mode: bool,
    /// For each output, the flat index (ih * W + iw) of its argmax within its (H, W) plane.
    argmax: Vec<u32>,
    input_shape: Vec<usize>,
}

impl MaxPool2d {
    /// PyTorch's `MaxPool2d(kernel, stride)` (floor mode, no padding).
    pub fn new(kernel: usize, stride: usize) -> Self {
        Self::with_options(kernel, stride, 0, false)
    }

    pub fn with_options(kernel: usize, stride: usize, padding: usize, ceil_mode: bool) -> Self {
        assert!(kernel > 0 && stride > 0, "MaxPool2d: kernel and stride must be positive");
        assert!(2 * padding <= kernel, "MaxPool2d: padding must be at most half the kernel (as in PyTorch)");
        MaxPool2d { kernel, stride, padding, ceil_mode, argmax: Vec::new(), input_shape: Vec::new() }
    }

    /// Output length along one axis of length `len`.
    pub fn out_len(&self, len: usize) -> usize {
        let span = len + 2 * self.padding;
        assert!(span >= self.kernel, "MaxPool2d: window {} larger than input {len}", self.kernel);
        let steps = span - self.kernel;
        let mut out = if self.ceil_mode { steps.div_ceil(self.stride) } else { steps / self.stride } + 1;
        if self.ceil_mode && (out - 1) * self.stride >= len + self.padding {
            out -= 1;
        }
        out
    }

    /// The input indices [lo, hi) covered by window `o` along an axis of length `len`.
    #[inline]
    fn window(&self, o: usize, len: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.kernel as isize) as usize).min(len);
        (lo, hi)
    }
}

/// Forward of one (H, W) plane: writes y (OH, OW) and the argmax of every window.
// `!(v <= best)` rather than `v > best`: the two differ for NaN, which must win (as in PyTorch).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn max_pool_plane<T: Float>(p: &MaxPool2d, x: &[T], h: usize, w: usize, y: &mut [T], arg: &mut [u32]) {
    let (oh, ow) = (p.out_len(h), p.out_len(w));
    for i in 0..oh {
        let (h0, h1) = p.window(i, h);
        for j in 0..ow {
            let (w0, w1) = p.window(j, w);
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
        format!(
            "MaxPool2d(k{}, s{}, p{}{})",
            self.kernel,
            self.stride,
            self.padding,
            if self.ceil_mode { ", ceil" } else { "" }
        )
    }

    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        vec![s[0], s[1], self.out_len(s[2]), self.out_len(s[3])]
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let (n, c, h, w) = nchw("MaxPool2d", x);
        let (oh, ow) = (self.out_len(h), self.out_len(w));
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
        assert_eq!(MaxPool2d::new(2, 2).out_len(62), 31);
        assert_eq!(MaxPool2d::new(2, 2).out_len(29), 14);
        assert_eq!(MaxPool2d::with_options(2, 2, 0, true).out_len(29), 15);
        // ceil mode must not start a window in the padding: k2 s2 p1 on 5 -> 3, not 4
        // (the 4th window would start at padded index 6 = 5 + 1, all padding).
        assert_eq!(MaxPool2d::with_options(2, 2, 1, true).out_len(5), 3);
        assert_eq!(MaxPool2d::with_options(3, 2, 1, true).out_len(6), 4);
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
