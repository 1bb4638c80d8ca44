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

/// Planes per parallel task in the 2x2 loops (at least): one plane is too little work to split.
const PLANES: usize = 16;

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

    /// Whether the (OH, OW) windows of an (H, W) input are PyTorch's `AvgPool2d(2)` ones:
    /// kernel 2, stride 2, no padding, and every window whole (floor mode, or an even plane in
    /// ceil mode; a remainder row or column of an odd plane in floor mode is in no window). The
    /// common pool, run by a loop of its own in the general loop's order of operations (the
    /// same bits; the general loop's window bounds keep it scalar).
    fn is_2x2(&self, oh: usize, ow: usize, h: usize, w: usize) -> bool {
        (self.kernel, self.stride, self.padding) == (Hw::square(2), Hw::square(2), Hw::square(0))
            && (oh, ow) == (h / 2, w / 2)
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
        let planes = slice_mut(&mut y).par_chunks_mut(oh * ow).zip(slice(x).par_chunks(h * w));
        if self.is_2x2(oh, ow, h, w) {
            planes.with_min_len(PLANES).for_each(|(yp, xp)| pool_2x2(xp, w, yp, ow));
        } else {
            planes.for_each(|(yp, xp)| pool(xp, w, &rows, &cols, yp));
        }
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
        let planes = slice_mut(&mut dx).par_chunks_mut(h * w).zip(slice(dy).par_chunks(oh * ow));
        if self.is_2x2(oh, ow, h, w) {
            planes.with_min_len(PLANES).for_each(|(dxp, dyp)| spread_2x2(dyp, ow, dxp, w));
        } else {
            planes.for_each(|(dxp, dyp)| spread(dyp, &rows, &cols, dxp, w));
        }
        dx
    }
}

/// One plane's pool: yp (OH, OW) from xp (H, W), the windows `rows` x `cols`.
fn pool<T: Float>(xp: &[T], w: usize, rows: &[Span], cols: &[Span], yp: &mut [T]) {
    let ow = cols.len();
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
}

/// `pool` for 2x2 windows at stride 2 (`AvgPool2d::is_2x2`), the same operations in the same
/// order (the sum from +0, so that -0 sums as it does there).
fn pool_2x2<T: Float>(xp: &[T], w: usize, yp: &mut [T], ow: usize) {
    for (i, yrow) in yp.chunks_exact_mut(ow).enumerate() {
        let (top, bottom) = (&xp[2 * i * w..][..2 * ow], &xp[(2 * i + 1) * w..][..2 * ow]);
        for ((v, t), b) in yrow.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
            *v = (T::zero() + t[0] + t[1] + b[0] + b[1]) / T::f(4.0);
        }
    }
}

/// One plane's backward: dxp (H, W), zero on entry, += each window's share of dyp (OH, OW).
fn spread<T: Float>(dyp: &[T], rows: &[Span], cols: &[Span], dxp: &mut [T], w: usize) {
    let ow = cols.len();
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
}

/// `spread` for 2x2 windows at stride 2: each pixel is in one window at most, so it gets
/// +0 + share, as there.
fn spread_2x2<T: Float>(dyp: &[T], ow: usize, dxp: &mut [T], w: usize) {
    for (i, dyrow) in dyp.chunks_exact(ow).enumerate() {
        let (top, bottom) = dxp[2 * i * w..].split_at_mut(w);
        let quads = top.chunks_exact_mut(2).zip(bottom[..2 * ow].chunks_exact_mut(2));
        for ((t, b), &d) in quads.zip(dyrow) {
            let share = T::zero() + d / T::f(4.0);
            [t[0], t[1], b[0], b[1]] = [share; 4];
        }
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

    /// The 2x2 loops give the general loops' bits, forward and backward, on even and odd
    /// planes (the remainder row and column in no window), with signed zeros, infinities and a
    /// NaN among the values; and the layer takes them exactly where the windows are 2x2 ones.
    #[test]
    fn the_2x2_loops_give_the_general_loops_bits() {
        fn check<T: Float>() {
            let odd = [T::neg_zero(), T::zero(), T::infinity(), T::neg_infinity(), T::nan()];
            let value = |i: usize| if i % 7 == 3 { odd[i / 7 % 5] } else { T::f((i as f64 * 0.61).sin() - 0.1) };
            for (h, w) in [(4, 4), (5, 7), (6, 3), (2, 2), (3, 2), (8, 9)] {
                let (oh, ow) = (h / 2, w / 2);
                let pool2 = AvgPool2d::new(2, 2);
                let (rows, cols) = pool2.windows(h, w);
                assert!(pool2.is_2x2(rows.len(), cols.len(), h, w), "{h}x{w}");
                let xp: Vec<T> = (0..h * w).map(value).collect();
                let (mut a, mut b) = (vec![T::one(); oh * ow], vec![T::one(); oh * ow]);
                pool(&xp, w, &rows, &cols, &mut a);
                pool_2x2(&xp, w, &mut b, ow);
                let bits = |v: &[T]| v.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "{h}x{w} forward");
                let dyp: Vec<T> = (0..oh * ow).map(|i| value(i + 2)).collect();
                let (mut a, mut b) = (vec![T::zero(); h * w], vec![T::zero(); h * w]);
                spread(&dyp, &rows, &cols, &mut a, w);
                spread_2x2(&dyp, ow, &mut b, w);
                assert_eq!(bits(&a), bits(&b), "{h}x{w} backward");
            }
            // The layer takes the 2x2 loops and gives the general loops' bits, plane by plane.
            let (n, c, h, w) = (2, 3, 5, 6);
            let mut layer = AvgPool2d::new(2, 2);
            let x = crate::tensor::from_vec(&[n, c, h, w], (0..n * c * h * w).map(value).collect());
            let y = layer.forward(&x, Ctx::eval());
            let dy = crate::tensor::from_vec(y.shape(), (0..y.len()).map(|i| value(i + 5)).collect());
            let dx = layer.backward(&dy);
            let (rows, cols) = layer.windows(h, w);
            let (mut want_y, mut want_dx) = (vec![T::one(); y.len()], vec![T::zero(); x.len()]);
            for p in 0..n * c {
                pool(&slice(&x)[p * h * w..][..h * w], w, &rows, &cols, &mut want_y[p * 6..][..6]);
                spread(&slice(&dy)[p * 6..][..6], &rows, &cols, &mut want_dx[p * h * w..][..h * w], w);
            }
            let bits = |v: &[T]| v.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!((y.shape(), bits(slice(&y))), (&[n, c, 2, 3][..], bits(&want_y)), "layer forward");
            assert_eq!(bits(slice(&dx)), bits(&want_dx), "layer backward");
            assert!(!AvgPool2d::with_options(2, 2, 0, true).is_2x2(3, 3, 5, 5), "ceil mode, odd plane");
            assert!(!AvgPool2d::with_options(2, 2, 1, false).is_2x2(3, 3, 4, 4), "padded");
            assert!(!AvgPool2d::new(2, 1).is_2x2(2, 3, 3, 4), "stride 1");
            assert!(!AvgPool2d::new(3, 2).is_2x2(2, 2, 5, 5), "kernel 3");
        }
        check::<f32>();
        check::<f64>();
    }
}
