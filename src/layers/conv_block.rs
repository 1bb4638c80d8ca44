//! Conv2d + ReLU + MaxPool2d fused into one layer: the same math as the three layers in a row,
//! done image by image so the full-resolution conv output never leaves the cache. This is the
//! layer the CPU training path runs; the separate layers stay the readable reference, and a
//! test checks that both give the same outputs and gradients.
//!
//! Shapes: x (N, C, H, W) -> conv (N, OC, OH, OW) -> pooled y (N, OC, PH, PW).
//!
//! The math, per image. Forward: c = W col(x) + b (see `conv2d.rs`), then for each pooling
//! window y = max(0, max_window c). Since ReLU is monotone, pooling first and clamping after is
//! the same as clamping every element first. Backward: the pooled gradient dy goes to the
//! window's argmax a* if that maximum was positive (else ReLU's derivative is 0):
//!
//!   dc[a*] += dy   when max_window c > 0
//!
//! and dc feeds the convolution's backward unchanged: dW += dc col^T, db += sum dc,
//! dx = col2im(W^T dc).
//!
//! Any conv (kernel, stride, padding per axis) and any max pool (kernel, stride, -inf padding,
//! ceil mode per axis) fuse: the pooling window is clipped to the conv plane exactly as
//! `MaxPool2d` clips it to its input, so padding never wins, and every window holds at least one
//! conv value (see `max_pool2d.rs`); `ConvReluPool::can_fuse` says so in code.
//!
//! Three ways to compute it (`ConvAlgo`), one per shape of block in the model (each checked
//! against the im2col + GEMM way written here, which also serves every other shape):
//! - one input channel, 3x3, pool 2: `direct_conv.rs` (the first block; K = 9 is a poor GEMM);
//! - several channels, 3x3, pool 2: Winograd (`Winograd` below): `winograd.rs`, F(2x2, 3x3),
//!   2.25x fewer multiplies, or on large maps `winograd4.rs`, F(4x4, 3x3), 4x fewer: the
//!   backward on maps of at least 2x2 four-window tiles, the forward on maps of 4x4 tiles;
//!   the other three blocks of the reference;
//! - anything else: im2col + GEMM, below.
//!
//! The two fast paths compute an unpadded 3x3 conv. A padded one (PyTorch's usual
//! `Conv2d(c, 3, padding=1)`) is the same conv, unpadded, on the input with its zero border
//! written out, x_p (C, H + 2PH, W + 2PW) with x_p[c, i + PH, j + PW] = x[c, i, j]: both give
//! the same conv plane, so the same winners. Backward, the border's gradient belongs to
//! constants and is dropped: dx[c, i, j] = dx_p[c, i + PH, j + PW] (`conv2d::Padded`).

use rayon::prelude::*;

use super::conv2d::{col2im, group_size, im2col_group, weight_grad, ConvGeometry, Padded};
use super::gemm::gemm_nn;
use super::{batch_ranges, nchw, split_by_ranges, Conv2d, Ctx, Hw, Layer, MaxPool2d, Param};
use super::{direct_conv, winograd, winograd4};
use crate::tensor::{slice, slice_mut, with_scratch, zero_vec, zeros, Float, Tensor};

/// The three ways to compute a block; all keep the same winners (`argmax`), so any backward
/// can follow any forward.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConvAlgo {
    /// One input channel: `direct_conv.rs`.
    Direct,
    /// Several channels, 3x3, pool 2: `winograd.rs` (and `winograd4.rs` for the backward of
    /// large maps).
    Winograd,
    /// Anything else: im2col + GEMM, in this file.
    Gemm,
}

/// Marks a window whose maximum was not positive: no gradient flows back through it.
pub(crate) const DEAD: u32 = u32::MAX;

/// One 2x2 window's ReLU + max from its four conv values c (row-major), as the Winograd
/// paths pool a tile: candidates in row-major order, a later one wins only if `!(v <= best)`
/// (a NaN wins and spreads), and the window is dead (0, `DEAD`) if the best is <= 0. The
/// winner comes back as its offset in the window, one of `offs`.
#[inline(always)]
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub(super) fn pool_window<T: Float>(c: [T; 4], offs: [u32; 4]) -> (T, u32) {
    let (mut best, mut off) = (c[0], offs[0]);
    for (v, d) in [(c[1], offs[1]), (c[2], offs[2]), (c[3], offs[3])] {
        let take = !(v <= best);
        best = if take { v } else { best };
        off = if take { d } else { off };
    }
    let dead = best <= T::zero();
    (if dead { T::zero() } else { best }, if dead { DEAD } else { off })
}

/// A block's Winograd algorithm, with the transformed weights it multiplies by: F(4x4, 3x3)
/// (`winograd4.rs`) or F(2x2, 3x3) (`winograd.rs`). Each way picks its own (`for_forward`,
/// `for_backward`): the backward takes only the forward's winners, and both give the same
/// gradients up to rounding.
enum Winograd<T> {
    F2(winograd::Plan, Vec<T>),
    F4(winograd4::Plan, Vec<T>),
}

impl<T: Float> Winograd<T> {
    /// The forward's algorithm for `n` images of the unpadded conv geometry `g`, OC filters
    /// `wt` (OC, C, 3, 3): F(4x4) on maps of 4x4 tiles or more (`winograd4::pays_forward`).
    fn for_forward(g: &ConvGeometry, wt: &[T], oc: usize, n: usize) -> Self {
        Self::new(winograd4::pays_forward(g), g, wt, oc, n)
    }
    /// The backward's: F(4x4) on maps of 2x2 tiles or more (`winograd4::pays`).
    fn for_backward(g: &ConvGeometry, wt: &[T], oc: usize, n: usize) -> Self {
        Self::new(winograd4::pays(g), g, wt, oc, n)
    }
    fn new(four: bool, g: &ConvGeometry, wt: &[T], oc: usize, n: usize) -> Self {
        if four {
            let p = winograd4::Plan::new(g, oc, n);
            let u = winograd4::transform_weights(&p, wt);
            Winograd::F4(p, u)
        } else {
            let p = winograd::Plan::new(g, oc, n);
            let u = winograd::transform_weights(&p, wt);
            Winograd::F2(p, u)
        }
    }
    /// Images per group.
    fn group(&self) -> usize {
        match self {
            Winograd::F2(p, _) => p.group,
            Winograd::F4(p, _) => p.group,
        }
    }
    /// Elements of a transformed tile: Mw has this many (OC, C) planes.
    fn xi(&self) -> usize {
        match self {
            Winograd::F2(..) => winograd::XI,
            Winograd::F4(..) => winograd4::XI,
        }
    }
    /// Floats of one thread's scratch for the forward, and the u32s of its winners.
    fn forward_scratch(&self) -> (usize, usize) {
        match self {
            Winograd::F2(p, _) => (p.forward_scratch(), p.group * p.tiles()),
            Winograd::F4(p, _) => (winograd4::forward_scratch(p), 4 * p.group * p.tiles()),
        }
    }
    /// y and the winners of a group of images `xs`, biases `b`.
    #[allow(clippy::too_many_arguments)]
    fn forward_group(&self, b: &[T], xs: &[T], y: &mut [T], arg: &mut [u32], s: &mut [T], wins: &mut [u32]) {
        match self {
            Winograd::F2(p, u) => winograd::forward_group(p, u, b, xs, y, arg, s, wins),
            Winograd::F4(p, u) => winograd4::forward_group(p, u, b, xs, y, arg, s, wins),
        }
    }
    /// Floats of one thread's scratch for the backward.
    fn scratch(&self) -> usize {
        match self {
            Winograd::F2(p, _) => winograd::backward_scratch(p),
            Winograd::F4(p, _) => winograd4::backward_scratch(p),
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn backward_group(
        &self,
        xs: &[T],
        dy: &[T],
        arg: &[u32],
        mw: &mut [T],
        db: &mut [T],
        dx: Option<&mut [T]>,
        s: &mut [T],
    ) {
        match self {
            Winograd::F2(p, u) => winograd::backward_group(p, u, xs, dy, arg, mw, db, dx, s),
            Winograd::F4(p, u) => winograd4::backward_group(p, u, xs, dy, arg, mw, db, dx, s),
        }
    }
    fn finish_weight_grad(&self, mw: &[T], dw: &mut [T]) {
        match self {
            Winograd::F2(p, _) => winograd::finish_weight_grad(p, mw, dw),
            Winograd::F4(p, _) => winograd4::finish_weight_grad(p, mw, dw),
        }
    }
}

pub struct ConvReluPool<T: Float> {
    pub conv: Conv2d<T>,
    pub pool: MaxPool2d,
    /// The first layer's input gradient is thrown away; skipping it saves a GEMM and col2im.
    pub input_grad: bool,
    /// Run a one-channel input through `direct_conv.rs` instead of im2col + GEMM (the model's
    /// first block). On by default; tests turn it off to compare the two paths.
    pub direct: bool,
    /// Run the forward of a several-channel 3x3 block by Winograd F(2x2, 3x3) (`winograd.rs`)
    /// instead of im2col + GEMM. On by default; tests turn it off to compare the two paths.
    pub winograd: bool,
    x: Option<Tensor<T>>,
    /// Per pooled output: the index (oh * OW + ow) of its winner in the conv plane, or DEAD.
    argmax: Vec<u32>,
    /// A padded conv on a fast path: the last forward's input with its zero border written
    /// out (see the module docs); empty otherwise. Kept, buffer and all, for the backward.
    padded: Vec<T>,
}

impl<T: Float> ConvReluPool<T> {
    /// The block `conv` + ReLU + `pool`, for any pair `can_fuse` accepts (today: all).
    pub fn new(conv: Conv2d<T>, pool: MaxPool2d) -> Self {
        assert!(Self::can_fuse(&conv, &pool), "ConvReluPool: this conv and pool do not fuse");
        ConvReluPool {
            conv,
            pool,
            input_grad: true,
            direct: true,
            winograd: true,
            x: None,
            argmax: Vec::new(),
            padded: Vec::new(),
        }
    }

    /// The last forward's winners: per pooled output (N, OC, PH, PW), the index oh * OW + ow of
    /// its window's maximum in the conv plane, or `u32::MAX` where the window was dead (its
    /// maximum <= 0, so no gradient flows back through it).
    pub fn winners(&self) -> &[u32] {
        &self.argmax
    }

    /// Whether the fused block computes conv + ReLU + pool exactly as the three layers in a row.
    ///
    /// It does for every conv and every max pool: the GEMM path takes any conv geometry
    /// (`im2col` is the plain layer's), and its ReLU + pool step clips each window to the conv
    /// plane as `MaxPool2d` does (padding is -inf, so it never wins; each window holds at least
    /// one conv value, since it starts inside the plane or the left padding and the padding is
    /// at most half the kernel). The fast paths only run where their shapes apply
    /// (`ConvReluPool::algo`). So this is always true; it exists so that a caller who builds a
    /// block from a model spec asks instead of assuming, and a future restriction has one place.
    pub fn can_fuse(conv: &Conv2d<T>, pool: &MaxPool2d) -> bool {
        let _ = (conv, pool);
        true
    }

    /// Which way an input of this shape goes (see the module docs). Forward and backward both
    /// ask; the backward of `Direct` with `input_grad` set runs the GEMM way (the direct
    /// backward has no dx).
    pub fn algo(&self, input: &[usize]) -> ConvAlgo {
        if self.direct && direct_conv::worthwhile::<T>() && direct_conv::applies(&self.conv, &self.pool, input) {
            ConvAlgo::Direct
        } else if self.winograd && winograd::applies(&self.conv, &self.pool, input) {
            ConvAlgo::Winograd
        } else {
            ConvAlgo::Gemm
        }
    }

    fn pooled(&self, g: &ConvGeometry) -> (usize, usize) {
        self.pool.out_hw(g.oh, g.ow)
    }

    /// The forward pass proper: y and the winners (kept in `self.argmax`), not the input.
    fn conv_relu_pool(&mut self, x: &Tensor<T>) -> Tensor<T> {
        let (n, c, h, w) = nchw("ConvReluPool", x);
        let g = self.conv.geometry(x.shape());
        let (oc, k, l, (ph, pw)) = (self.conv.out_channels(), g.k(), g.l(), self.pooled(&g));
        let gsize = group_size(l, n);
        let mut y = zeros(&[n, oc, ph, pw]);
        let mut argmax = std::mem::take(&mut self.argmax);
        argmax.resize(n * oc * ph * pw, 0);
        let algo = self.algo(x.shape());
        // The fast paths read an unpadded conv: a padded one reads the padded images instead.
        let mut padded = std::mem::take(&mut self.padded);
        let frame = Padded::new(&g);
        let (gf, xf) = match algo {
            ConvAlgo::Gemm => (g, slice(x)),
            _ => (frame.geometry(), frame.input(slice(x), &mut padded)),
        };
        let (wt, b, pool) = (slice(&self.conv.weight.value), slice(&self.conv.bias.value), &self.pool);
        let out = oc * ph * pw;
        let imgf = c * gf.h * gf.w;
        match algo {
            ConvAlgo::Direct => {
                // One image per task, straight from the pixels (see `direct_conv.rs`).
                let plan = direct_conv::Plan::new(&gf);
                slice_mut(&mut y)
                    .par_chunks_mut(out)
                    .zip(argmax.par_chunks_mut(out))
                    .zip(xf.par_chunks(imgf))
                    .for_each_init(
                        || zero_vec(plan.scratch()),
                        |scratch, ((yi, ai), xi)| direct_conv::forward(&plan, xi, wt, b, yi, ai, scratch),
                    );
            }
            ConvAlgo::Winograd => {
                // Winograd (`Winograd`): a fixed range of images per thread, a group at a
                // time, in that thread's scratch (`tensor::with_scratch`).
                let wg = Winograd::for_forward(&gf, wt, oc, n);
                let ((floats, nwins), group) = (wg.forward_scratch(), wg.group());
                let ranges = batch_ranges(n, rayon::current_num_threads());
                let ys = split_by_ranges(slice_mut(&mut y), &ranges, out);
                let args = split_by_ranges(&mut argmax, &ranges, out);
                ranges.par_iter().zip(ys).zip(args).for_each(|((r, yr), ar)| {
                    let mut wins = vec![0; nwins];
                    let xr = &xf[r.start * imgf..r.end * imgf];
                    let chunks = yr.chunks_mut(group * out).zip(ar.chunks_mut(group * out));
                    with_scratch(floats, |scratch| {
                        for ((yg, ag), xg) in chunks.zip(xr.chunks(group * imgf)) {
                            wg.forward_group(b, xg, yg, ag, scratch, &mut wins);
                        }
                    });
                });
            }
            ConvAlgo::Gemm => {
                // One group of images per task: conv (OC, G*L) = W col + b, then ReLU + pool per plane.
                slice_mut(&mut y)
                    .par_chunks_mut(gsize * out)
                    .zip(argmax.par_chunks_mut(gsize * out))
                    .zip(slice(x).par_chunks(gsize * c * h * w))
                    .for_each_init(
                        || (zero_vec(k * gsize * l), zero_vec(oc * gsize * l), Vec::new()),
                        |(col, conv, phases), ((yg, ag), xg)| {
                            let gs = xg.len() / (c * h * w);
                            im2col_group(&g, xg, col, phases);
                            gemm_nn(oc, gs * l, k, wt, k, 1, col, conv);
                            for (o, row) in conv[..oc * gs * l].chunks_exact_mut(gs * l).enumerate() {
                                row.iter_mut().for_each(|v| *v += b[o]);
                            }
                            for i in 0..gs {
                                for o in 0..oc {
                                    let plane = &conv[o * gs * l + i * l..][..l];
                                    let at = i * out + o * ph * pw;
                                    let (yp, ap) = (&mut yg[at..at + ph * pw], &mut ag[at..at + ph * pw]);
                                    relu_pool_plane(pool, &g, plane, yp, ap);
                                }
                            }
                        },
                    );
            }
        }
        self.argmax = argmax;
        self.padded = padded;
        y
    }
}

/// ReLU + max-pool of one conv output plane c (OH, OW) into y (PH, PW) and the winners.
// `!(v <= best)` rather than `v > best`: the two differ for NaN, which must win (and spread).
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn relu_pool_plane<T: Float>(p: &MaxPool2d, g: &ConvGeometry, c: &[T], y: &mut [T], arg: &mut [u32]) {
    let (ph, pw) = p.out_hw(g.oh, g.ow);
    // `best <= 0` is false for NaN, which then propagates (a diverged run must show it).
    if (p.kernel(), p.stride(), p.padding(), p.ceil_mode()) == (Hw::square(2), Hw::square(2), Hw::square(0), false) {
        // The model's case: 2x2 windows that never leave the plane (floor mode, no padding).
        // Written without branches (selects only), since which candidate wins is data-dependent
        // and unpredictable.
        for i in 0..ph {
            let top = 2 * i * g.ow;
            let rows = (&c[top..][..2 * pw], &c[top + g.ow..][..2 * pw]);
            let outs = (&mut y[i * pw..][..pw], &mut arg[i * pw..][..pw]);
            for (j, ((r0, r1), (yv, av))) in
                rows.0.chunks_exact(2).zip(rows.1.chunks_exact(2)).zip(outs.0.iter_mut().zip(outs.1)).enumerate()
            {
                // Candidates in row-major window order; a later one wins only if `!(v <= best)`.
                let at0 = top + 2 * j;
                let (mut best, mut at) = (r0[0], at0);
                for (v, a) in [(r0[1], at0 + 1), (r1[0], at0 + g.ow), (r1[1], at0 + g.ow + 1)] {
                    let take = !(v <= best);
                    best = if take { v } else { best };
                    at = if take { a } else { at };
                }
                let dead = best <= T::zero();
                *yv = if dead { T::zero() } else { best };
                *av = if dead { DEAD } else { at as u32 };
            }
        }
        return;
    }
    // `m <= 0` is false for NaN, which then propagates (a diverged run must show it).
    let mut put = |at: usize, best: usize| {
        let m = c[best];
        let dead = m <= T::zero();
        y[at] = if dead { T::zero() } else { m };
        arg[at] = if dead { DEAD } else { best as u32 };
    };
    // Any other pool: each window clipped to the plane, as `max_pool_plane` does.
    for i in 0..ph {
        let (h0, h1) = p.rows(i, g.oh);
        for j in 0..pw {
            let (w0, w1) = p.cols(j, g.ow);
            let mut best = h0 * g.ow + w0;
            for r in h0..h1 {
                for s in w0..w1 {
                    if !(c[r * g.ow + s] <= c[best]) {
                        best = r * g.ow + s;
                    }
                }
            }
            put(i * pw + j, best);
        }
    }
}

/// The sum of the pooled gradients `dy` whose window is alive (winner not `DEAD`), in eight
/// interleaved partial sums (a fixed order, so still deterministic) that the compiler can keep
/// in vector registers instead of one long chain of dependent adds.
pub(crate) fn sum_live<T: Float>(dy: &[T], arg: &[u32]) -> T {
    let mut acc = [T::zero(); 8];
    let (dy8, arg8) = (dy.chunks_exact(8), arg.chunks_exact(8));
    let tail = dy8.remainder().iter().zip(arg8.remainder());
    for (d, a) in dy8.zip(arg8) {
        for lane in 0..8 {
            acc[lane] += if a[lane] != DEAD { d[lane] } else { T::zero() };
        }
    }
    let tail = tail.fold(T::zero(), |s, (&d, &a)| s + if a != DEAD { d } else { T::zero() });
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Whether a block is the shape both fast paths need: a 3x3, stride-1 conv (padded or not:
/// a padded one runs on the padded images, see the module docs), then 2x2 pooling with stride
/// 2 in floor mode, on an (N, C, H, W) input of at least 4x4 once padded.
pub(crate) fn conv3x3_pool2<T: Float>(conv: &Conv2d<T>, pool: &MaxPool2d, input: &[usize]) -> bool {
    let (one, two, zero, pad) = (Hw::square(1), Hw::square(2), Hw::square(0), conv.padding());
    input.len() == 4
        && (conv.kernel(), conv.stride()) == (Hw::square(3), one)
        && (pool.kernel(), pool.stride(), pool.padding(), pool.ceil_mode()) == (two, two, zero, false)
        && input[2] + 2 * pad.h >= 4
        && input[3] + 2 * pad.w >= 4
}

impl<T: Float> Layer<T> for ConvReluPool<T> {
    fn describe(&self) -> String {
        format!("{} + ReLU + {}", self.conv.describe(), <MaxPool2d as Layer<T>>::describe(&self.pool))
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        let g = self.conv.geometry(input);
        let (ph, pw) = self.pooled(&g);
        vec![input[0], self.conv.out_channels(), ph, pw]
    }

    fn flops(&self, input: &[usize]) -> u64 {
        self.conv.flops(input)
    }

    fn forward(&mut self, x: &Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let y = self.conv_relu_pool(x);
        self.x = Some(x.clone());
        y
    }

    fn forward_owned(&mut self, x: Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let y = self.conv_relu_pool(&x);
        self.x = Some(x); // kept for backward without a copy
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let x = self.x.as_ref().expect("ConvReluPool::backward called before forward");
        let (n, c, h, w) = nchw("ConvReluPool", x);
        let g = self.conv.geometry(x.shape());
        let (oc, k, l) = (self.conv.out_channels(), g.k(), g.l());
        let (ph, pw) = self.pooled(&g);
        assert_eq!(dy.shape(), &[n, oc, ph, pw], "ConvReluPool: dy shape");
        let wt = slice(&self.conv.weight.value);
        let input_grad = self.input_grad;
        let img = c * h * w;
        let mut dx = zeros(&[if input_grad { n } else { 0 }, c, h, w]);
        let gsize = group_size(l, n);

        // Fixed ranges of images, one per thread, each summing its own dW and db; the ranges'
        // sums are added in order afterwards (deterministic for a given thread count).
        let ranges = batch_ranges(n, rayon::current_num_threads());
        let dx_parts = split_by_ranges(slice_mut(&mut dx), &ranges, if input_grad { img } else { 0 });
        let (xs, dys, args) = (slice(x), slice(dy), &self.argmax);
        let out = oc * ph * pw;
        let algo = match self.algo(x.shape()) {
            // The direct backward computes dW and db only: a one-channel block asked for dx
            // (not the model's first) takes im2col + GEMM, which reads the same winners.
            ConvAlgo::Direct if input_grad => ConvAlgo::Gemm,
            a => a,
        };
        // Each fast path's plan only where it runs (a plan of another shape may not exist:
        // Winograd's needs at least one 2x2 tile).
        // The fast paths read what their forward read: the padded images for a padded conv.
        let frame = Padded::new(&g);
        let padded = algo != ConvAlgo::Gemm && frame.copies();
        let (gf, xf) = if padded { (frame.geometry(), &self.padded[..]) } else { (g, xs) };
        assert_eq!(xf.len(), n * c * gf.h * gf.w, "ConvReluPool: the forward did not keep the padded images");
        let imgf = c * gf.h * gf.w;
        let wplan = (algo == ConvAlgo::Winograd).then(|| Winograd::for_backward(&gf, wt, oc, n));
        let plan = (algo == ConvAlgo::Direct).then(|| direct_conv::Plan::new(&gf));
        let partials: Vec<(Vec<T>, Vec<T>)> = ranges
            .par_iter()
            .zip(dx_parts)
            .map(|(r, dx_part)| {
                let mut dw = zero_vec(oc * k);
                let mut db = zero_vec(oc);
                if let Some(wplan) = &wplan {
                    // By the adjoint of a Winograd forward (`winograd.rs`, or on large maps
                    // `winograd4.rs`: see `Winograd`), a group at a time, in this
                    // thread's scratch (`tensor::with_scratch`).
                    let mut mw = zero_vec(wplan.xi() * oc * c);
                    // A padded conv's dx comes back padded, then loses its border.
                    let dx_range = input_grad.then_some(dx_part);
                    with_scratch(wplan.scratch(), |scratch| {
                        frame.for_each_group(r.clone(), wplan.group(), dx_range, |first, gs, dxg| {
                            let imgs = first..first + gs;
                            let (xg, dyg, ag) = (
                                &xf[imgs.start * imgf..imgs.end * imgf],
                                &dys[imgs.start * out..imgs.end * out],
                                &args[imgs.start * out..imgs.end * out],
                            );
                            wplan.backward_group(xg, dyg, ag, &mut mw, &mut db, dxg, scratch);
                        });
                    });
                    wplan.finish_weight_grad(&mw, &mut dw);
                    return (dw, db);
                }
                if let Some(plan) = &plan {
                    // dW and db straight from the pixels (see `direct_conv.rs`).
                    let mut scratch = zero_vec(plan.scratch());
                    for i in r.clone() {
                        let (xi, dyi, ai) = (&xf[i * imgf..][..imgf], &dys[i * out..][..out], &args[i * out..][..out]);
                        direct_conv::backward(plan, xi, dyi, ai, &mut dw, &mut db, &mut scratch);
                    }
                    return (dw, db);
                }
                // ConvAlgo::Gemm
                let mut col = zero_vec(k * gsize * l);
                let mut dcol = zero_vec(if input_grad { k * gsize * l } else { 0 });
                let mut dc = zero_vec(oc * gsize * l + 1);
                let mut phases = Vec::new();
                let mut first = r.start;
                while first < r.end {
                    let gs = gsize.min(r.end - first);
                    let ld = gs * l;
                    // dc (OC, G*L): each pooled gradient goes to its window's positive winner.
                    // A dead window's gradient goes to the spare slot dc[OC*G*L] instead, so the
                    // scatter has no data-dependent branch. db += sum dc is the sum of the live
                    // pooled gradients, a quarter of dc's entries.
                    dc[..oc * ld + 1].fill(T::zero());
                    let spare = oc * ld;
                    for i in 0..gs {
                        let (dyi, ai) = (&dys[(first + i) * out..][..out], &args[(first + i) * out..][..out]);
                        let planes = dyi.chunks_exact(ph * pw).zip(ai.chunks_exact(ph * pw));
                        for (o, ((dyp, ap), db_o)) in planes.zip(db.iter_mut()).enumerate() {
                            let base = o * ld + i * l;
                            for (&d, &a) in dyp.iter().zip(ap) {
                                dc[if a != DEAD { base + a as usize } else { spare }] += d;
                            }
                            *db_o += sum_live(dyp, ap);
                        }
                    }
                    im2col_group(&g, &xs[first * img..(first + gs) * img], &mut col, &mut phases);
                    weight_grad(&dc[..oc * ld], &col[..k * ld], ld, &mut dw); // dW += dc col^T
                    if input_grad {
                        gemm_nn(k, ld, oc, wt, 1, k, &dc, &mut dcol); // dcol = W^T dc
                        for i in 0..gs {
                            let at = (first - r.start + i) * img;
                            col2im(&g, &dcol[i * l..], &mut dx_part[at..at + img], ld, &mut phases);
                        }
                    }
                    first += gs;
                }
                (dw, db)
            })
            .collect();
        self.conv.add_range_sums(partials);
        dx
    }

    fn params(&self) -> Vec<&Param<T>> {
        self.conv.params()
    }
    fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        self.conv.params_mut()
    }
}
