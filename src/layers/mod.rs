//! The layers, one file each, forward and backward side by side.
//!
//! Every layer follows the same contract (the `Layer` trait):
//! - `forward` takes the input and keeps exactly what `backward` will need;
//! - `backward` takes dy = dL/dy (same shape as the output) and returns dx = dL/dx; it
//!   *accumulates* (`+=`) dL/dw and dL/db into the layer's `Param::grad`, so gradients of
//!   several backward calls add up until `zero_grad`.
//!
//! Who accumulates gradients and who overwrites them (said here once for the whole crate):
//! - **Accumulate**: every layer in this folder, hence `model::Sequential` and the CPU backend
//!   (`backend::CpuBackend`), in f32 and f64. `CpuBackend::train_step` calls `zero_grad` before
//!   each backward, so a step's gradient is that batch's alone. `tests/gradcheck.rs` proves the
//!   `+=`: it fills every gradient with random values before `backward` and checks the difference.
//! - **Overwrite**: the CUDA engine (`cuda::engine`, on a GPU and in the CPU emulator). Its
//!   backward stores every gradient buffer afresh each step (GEMMs with beta = 0, bias sums with
//!   beta = 0), so it never zeroes them, and two backward calls there do not add up.
//!
//! Shapes are NCHW for images and (N, features) after `Flatten`. This is the CPU path, the
//! reference that every CUDA kernel (`kernels/*.cu`) is tested against.

/// The vector builds of a fast path's portable code, written once for every fast path:
///
/// `vector_builds!(pub fn name / name_on = name_impl(a: A, b: B, ...));` defines
/// - `name_on(build, a, b, ...)`: `name_impl` compiled with AVX-512F enabled, with AVX2
///   enabled, or as it is (SSE2 on x86-64), as `build` says; the caller has checked that this CPU
///   runs it (the tests call each build this way);
/// - `name(a, b, ...)`: `name_on` in the widest build this CPU runs (`isa()`).
///
/// `name_impl` is `#[inline(always)]`, so each build gets its own copy, which the compiler
/// vectorises 16, 8 or 4 floats wide. No FMA is enabled, so every build gives the portable
/// code's bits (each fast path's tests check it, build by build). The type parameter is `T:
/// Float`, named `T` in the signature.
macro_rules! vector_builds {
    ($(#[$doc:meta])* $vis:vis fn $name:ident / $on:ident = $body:ident ($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<T: Float>($($arg: $ty),*) {
            $on($crate::layers::isa(), $($arg),*)
        }

        #[doc = concat!("`", stringify!($name), "` in a given build, which the caller has checked this CPU runs.")]
        #[allow(clippy::too_many_arguments)]
        fn $on<T: Float>(build: $crate::layers::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            fn avx512<T: Float>($($arg: $ty),*) {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            #[allow(clippy::too_many_arguments)]
            fn avx2<T: Float>($($arg: $ty),*) {
                $body($($arg),*)
            }
            match build {
                // SAFETY: the caller checked that the CPU has AVX-512F.
                #[cfg(target_arch = "x86_64")]
                $crate::layers::Isa::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: the caller checked that the CPU has AVX2.
                #[cfg(target_arch = "x86_64")]
                $crate::layers::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => $body($($arg),*),
            }
        }
    };
}

pub mod avg_pool2d;
pub mod conv2d;
pub mod conv_block;
pub mod cross_entropy;
pub mod direct_conv;
pub mod dropout;
pub mod flatten;
pub mod gemm;
pub mod linear;
pub mod max_pool2d;
pub mod relu;
pub mod winograd;
pub mod winograd4;
pub mod winograd_conv;

pub use avg_pool2d::{AvgPool2d, GlobalAvgPool2d};
pub use conv2d::Conv2d;
pub use conv_block::{ConvAlgo, ConvReluPool};
pub use cross_entropy::SoftmaxCrossEntropy;
pub use dropout::Dropout;
pub use flatten::Flatten;
pub use linear::Linear;
pub use max_pool2d::MaxPool2d;
pub use relu::Relu;

use std::ops::Range;

use crate::tensor::{zeros, Float, Tensor};

/// A learnable tensor and the gradient accumulated for it.
#[derive(Clone, Debug)]
pub struct Param<T: Float> {
    pub value: Tensor<T>,
    pub grad: Tensor<T>,
}

impl<T: Float> Param<T> {
    pub fn new(value: Tensor<T>) -> Self {
        let grad = zeros(value.shape());
        Param { value, grad }
    }
}

/// What a forward pass needs to know besides its input.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    /// Training mode (dropout active) or evaluation mode (dropout is the identity).
    pub train: bool,
    /// The optimizer step; dropout derives its mask from it, so a resumed run repeats exactly.
    pub step: u64,
}

impl Ctx {
    pub fn train(step: u64) -> Self {
        Ctx { train: true, step }
    }
    pub fn eval() -> Self {
        Ctx { train: false, step: 0 }
    }
}

/// One layer: forward, backward and its parameters.
pub trait Layer<T: Float>: Send {
    /// A short name of the layer type and its settings, e.g. `Conv2d(1->32, k3, s1, p0)`.
    fn describe(&self) -> String;
    /// y = f(x). Keeps what backward needs.
    fn forward(&mut self, x: &Tensor<T>, ctx: Ctx) -> Tensor<T>;
    /// `forward` taking the input by value: a layer that keeps its input for backward can keep
    /// this one instead of a copy. The default borrows it and drops it.
    fn forward_owned(&mut self, x: Tensor<T>, ctx: Ctx) -> Tensor<T> {
        self.forward(&x, ctx)
    }
    /// dx from dy; accumulates parameter gradients. Must follow a forward call.
    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T>;
    /// The output shape for an input shape (no computation).
    fn output_shape(&self, input: &[usize]) -> Vec<usize>;
    /// Learnable parameters, in a fixed order (weight, then bias).
    fn params(&self) -> Vec<&Param<T>> {
        Vec::new()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        Vec::new()
    }
    /// Forward floating-point operations for one input of this shape (a multiply-add is 2).
    fn flops(&self, _input: &[usize]) -> u64 {
        0
    }
}

/// Splits `0..n` into `parts` contiguous ranges of nearly equal size, in order.
///
/// Layers that sum gradients over the batch give each range to one rayon task and then add
/// the per-task partial sums in range order: the result depends only on the thread count, so
/// a run with a fixed seed and thread count repeats bit for bit.
pub fn batch_ranges(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.clamp(1, n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Splits `buf` into one slice per range, `per_item` elements per item of the range (the dx of
/// each range's images, for the task that computes them). `per_item` may be 0 (no dx wanted).
pub fn split_by_ranges<'a, T>(buf: &'a mut [T], ranges: &[Range<usize>], per_item: usize) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(ranges.len());
    let mut rest = buf;
    for r in ranges {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * per_item);
        parts.push(head);
        rest = tail;
    }
    parts
}

/// Panics with a readable message if `x` does not have `rank` dimensions.
pub(crate) fn expect_rank<T: Float>(layer: &str, x: &Tensor<T>, rank: usize) {
    assert_eq!(x.ndim(), rank, "{layer}: expected a rank-{rank} input, got shape {:?}", x.shape());
}

/// The (N, C, H, W) of an image batch.
pub(crate) fn nchw<T: Float>(layer: &str, x: &Tensor<T>) -> (usize, usize, usize, usize) {
    expect_rank(layer, x, 4);
    let s = x.shape();
    (s[0], s[1], s[2], s[3])
}

/// A (height, width) pair: a kernel size, stride or padding.
///
/// PyTorch takes either an int (the same on both axes) or an `(h, w)` tuple; `From` does the
/// same here, so `Conv2d::new(1, 32, 3, 1, 0)` and `Conv2d::new(1, 32, (3, 5), (2, 1), (1, 2))`
/// both read as they would in PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Hw {
    pub h: usize,
    pub w: usize,
}

impl Hw {
    /// The same value on both axes (PyTorch's int argument).
    pub const fn square(n: usize) -> Hw {
        Hw { h: n, w: n }
    }
    pub fn is_square(&self) -> bool {
        self.h == self.w
    }
}

impl From<usize> for Hw {
    fn from(n: usize) -> Hw {
        Hw::square(n)
    }
}

impl From<(usize, usize)> for Hw {
    fn from((h, w): (usize, usize)) -> Hw {
        Hw { h, w }
    }
}

/// PyTorch's spelling: `3` when square, `(3, 5)` otherwise.
impl std::fmt::Display for Hw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_square() {
            write!(f, "{}", self.h)
        } else {
            write!(f, "({}, {})", self.h, self.w)
        }
    }
}

/// Output length of a sliding window as PyTorch computes it, or None when the window is
/// larger than the padded input (or the stride is 0).
///
/// Floor mode: floor((len + 2*pad - k) / stride) + 1, the number of window starts
/// 0, stride, 2*stride, ... (in padded coordinates) whose window fits in the padded input.
///
/// ceil_mode: round up instead, so a last, partial window that hangs over the right edge is
/// kept; but the last window must start inside the input or the left padding, i.e.
/// (out - 1) * stride < len + pad, else it is dropped (PyTorch's `pooling_output_shape`).
/// A window starting in the right padding would see nothing but padding.
/// [`window_out_len`] on both axes of an (h, w) input: (OH, OW), or None when the window does
/// not fit on either. Every windowed layer (conv, max and average pool) and the spec use it.
pub fn window_out_hw(h: usize, w: usize, k: Hw, stride: Hw, pad: Hw, ceil_mode: bool) -> Option<(usize, usize)> {
    Some((window_out_len(h, k.h, stride.h, pad.h, ceil_mode)?, window_out_len(w, k.w, stride.w, pad.w, ceil_mode)?))
}

pub fn window_out_len(len: usize, k: usize, stride: usize, pad: usize, ceil_mode: bool) -> Option<usize> {
    let span = len + 2 * pad;
    if stride == 0 || k == 0 || span < k {
        return None;
    }
    let steps = span - k;
    let mut out = if ceil_mode { steps.div_ceil(stride) } else { steps / stride } + 1;
    if ceil_mode && (out - 1) * stride >= len + pad {
        out -= 1;
    }
    Some(out)
}

/// Output length of a sliding window in floor mode (a convolution's): floor((len + 2*pad - k)
/// / stride) + 1. Panics when the window is larger than the padded input; `window_out_len` is
/// the checked form.
pub fn out_len(len: usize, k: usize, stride: usize, pad: usize) -> usize {
    window_out_len(len, k, stride, pad, false)
        .unwrap_or_else(|| panic!("window {k} (stride {stride}) larger than padded input {}", len + 2 * pad))
}

/// The unit tests' form of `tests/common::skip_unless_required`: a test that cannot do its job
/// on this machine prints `skipped: WHY` and returns, unless `MEDCNN_REQUIRE_<THING>=1` (CI sets
/// `MEDCNN_REQUIRE_AVX512`), when it fails with the same reason.
#[cfg(test)]
pub(crate) fn skip_unless_required(thing: &str, why: &str) {
    let var = format!("MEDCNN_REQUIRE_{thing}");
    if std::env::var(&var).as_deref() == Ok("1") {
        panic!("{var}=1 but {why}");
    }
    eprintln!("skipped: {why} (set {var}=1 to make this a failure)");
}

/// The widest vectors this CPU runs, which picks the build of the direct and Winograd fast
/// paths (detected once, then cached by std). `Portable` is the x86-64 baseline's SSE2, or any
/// other architecture.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// For the fast paths' unit tests: runs `check` on each vector build this CPU runs (an AVX-512
/// CPU runs both), and says `skipped` (or fails, under MEDCNN_REQUIRE_*) for each it lacks.
#[cfg(test)]
pub(crate) fn check_each_vector_isa(what: &str, mut check: impl FnMut(Isa)) {
    #[cfg(target_arch = "x86_64")]
    let builds = [
        (Isa::Avx512, "AVX512", is_x86_feature_detected!("avx512f")),
        (Isa::Avx2, "AVX2", is_x86_feature_detected!("avx2")),
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let builds = [(Isa::Avx512, "AVX512", false), (Isa::Avx2, "AVX2", false)];
    for (isa, thing, has) in builds {
        if has {
            check(isa);
        } else {
            skip_unless_required(thing, &format!("no {thing} on this CPU: {what} is not checked"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ranges_cover_in_order() {
        let r = batch_ranges(10, 3);
        assert_eq!(r, vec![0..4, 4..7, 7..10]);
        assert_eq!(batch_ranges(2, 8), vec![0..1, 1..2]);
        assert_eq!(batch_ranges(0, 2), vec![0..0]);
    }

    #[test]
    fn hw_reads_and_prints_like_pytorch() {
        assert_eq!(Hw::from(3), Hw { h: 3, w: 3 });
        assert_eq!(Hw::from((3, 5)), Hw { h: 3, w: 5 });
        assert_eq!(Hw::square(2).to_string(), "2");
        assert_eq!(Hw::from((3, 5)).to_string(), "(3, 5)");
        assert!(Hw::square(4).is_square() && !Hw::from((1, 2)).is_square());
    }

    /// Sizes checked against torch 2.x (`nn.MaxPool2d(k, s, p, ceil_mode=c)(torch.zeros(1, 1, n, n)).shape`
    /// and `nn.Conv2d`'s formula).
    #[test]
    fn window_out_len_follows_pytorch() {
        assert_eq!(window_out_len(62, 2, 2, 0, false), Some(31));
        assert_eq!(window_out_len(29, 2, 2, 0, false), Some(14));
        assert_eq!(window_out_len(29, 2, 2, 0, true), Some(15));
        // The 4th window would start at padded index 6 = len + pad: all padding, dropped.
        assert_eq!(window_out_len(5, 2, 2, 1, true), Some(3));
        assert_eq!(window_out_len(6, 3, 2, 1, true), Some(4));
        assert_eq!(window_out_len(7, 3, 2, 1, true), Some(4));
        assert_eq!(window_out_len(5, 5, 1, 2, false), Some(5));
        assert_eq!(window_out_len(2, 3, 1, 0, false), None);
        assert_eq!(window_out_len(2, 3, 1, 0, true), None);
        assert_eq!(window_out_len(1, 3, 1, 1, false), Some(1));
        assert_eq!(window_out_len(4, 2, 0, 0, false), None);
        assert_eq!(out_len(7, 3, 2, 1), 4);
    }
}
