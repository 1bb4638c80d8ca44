//! 2-D convolution (cross-correlation, as in PyTorch), any kernel size, stride and zero padding,
//! each given per axis (height, width), with bias. CPU path: im2col + GEMM per group of images
//! (one image, or several side by side where the output plane is small), groups in parallel
//! with rayon. Not here: dilation and groups (PyTorch's other two arguments).
//!
//! Shapes: x (N, C, H, W), weight (OC, C, KH, KW), bias (OC), y (N, OC, OH, OW),
//! OH = floor((H + 2PH - KH) / SH) + 1, OW = floor((W + 2PW - KW) / SW) + 1.
//!
//! The math. Write K = C*KH*KW and L = OH*OW. im2col unrolls the receptive field of every output
//! pixel of one image into a column: col (K, L),
//! col[(c,i,j), (oh,ow)] = x[c, oh*SH-PH+i, ow*SW-PW+j] (0 outside the image). Then the
//! convolution is one matrix product per image:
//!
//!   y_n = W col_n + b          W viewed as (OC, K), y_n as (OC, L)
//!
//! and its derivatives follow from the product rule of a matrix product:
//!
//!   dW   += dy_n col_n^T       (OC, L) x (L, K)   summed over the batch
//!   db   += sum_l dy_n[:, l]   summed over the batch
//!   dcol  = W^T dy_n           (K, OC) x (OC, L)
//!   dx_n  = col2im(dcol)       each column entry adds back into the pixel it was copied from
//!
//! col2im is the transpose (adjoint) of im2col: where im2col copies one pixel into several
//! columns, col2im sums those columns' gradients into that pixel.
//!
//! The three products are our own GEMMs (`gemm.rs`): W col and W^T dy by `gemm_nn`, dW (every
//! entry a dot product of two rows stored along L) by `gemm_nt`. A 3x3 stride-1 conv of
//! several channels goes by Winograd instead (`winograd_conv.rs`), tested against this path.
//!
//! With a ReLU fused in (`relu`, set by the training build where no max pool follows), either
//! path ends each group with y = max(0, y), keeping [y > 0], and its backward starts each group
//! from dy * [y > 0] (`relu::mask_into`) before the products above: the `Relu` layer's math,
//! done while the group is in cache instead of in a pass of its own over the whole batch.

use rayon::prelude::*;

use super::gemm::{gemm_nn, gemm_nt};
use super::relu::{mask_into, relu_in_place};
use super::{batch_ranges, nchw, out_len, split_by_ranges, winograd_conv, Ctx, Hw, Layer, Param};
use crate::tensor::{slice, slice_mut, sum, zero_vec, zeros, Float, Tensor};

/// The sizes of one convolution, shared by im2col, col2im and the layer: input (C, H, W),
/// kernel (KH, KW), vertical and horizontal stride (SH, SW) and padding (PH, PW), output (OH, OW).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeometry {
    /// Any kernel, stride and padding per axis. Panics if the kernel is larger than the padded
    /// input or a stride is 0 (`layers::window_out_len` is the check that does not panic).
    pub fn with_hw(c: usize, h: usize, w: usize, kernel: Hw, stride: Hw, pad: Hw) -> Self {
        assert!(stride.h > 0 && stride.w > 0, "conv stride must be positive");
        let oh = out_len(h, kernel.h, stride.h, pad.h);
        let ow = out_len(w, kernel.w, stride.w, pad.w);
        let (kh, kw, sh, sw, ph, pw) = (kernel.h, kernel.w, stride.h, stride.w, pad.h, pad.w);
        ConvGeometry { c, h, w, kh, kw, sh, sw, ph, pw, oh, ow }
    }
    /// The same stride and padding on both axes (the CUDA kernels' case).
    pub fn new(c: usize, h: usize, w: usize, kh: usize, kw: usize, stride: usize, pad: usize) -> Self {
        Self::with_hw(c, h, w, Hw { h: kh, w: kw }, Hw::square(stride), Hw::square(pad))
    }
    /// Rows of col: K = C*KH*KW.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Columns of col: L = OH*OW.
    pub fn l(&self) -> usize {
        self.oh * self.ow
    }
}

/// What a fast path (`direct_conv.rs`, `winograd.rs`, `winograd_conv.rs`) reads for a padded
/// conv: the same conv, unpadded, on the images with their zero border written out,
/// x_p[c, i + PH, j + PW] = x[c, i, j] in planes of (HP, WP), zero elsewhere. Both give the
/// same conv plane. HP >= H + 2PH and WP >= W + 2PW: a path whose tiles need an even output
/// asks for one more zero row or column, whose outputs nobody reads. Backward, the border's
/// gradient belongs to constants and is dropped (`crop_add`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Padded {
    /// The conv as written, on the images as they are.
    g: ConvGeometry,
    hp: usize,
    wp: usize,
}

impl Padded {
    /// Planes of exactly (H + 2PH, W + 2PW).
    pub fn new(g: &ConvGeometry) -> Self {
        Padded { g: *g, hp: g.h + 2 * g.ph, wp: g.w + 2 * g.pw }
    }
    /// Planes of (HP, WP), at least the padded size.
    pub fn with_size(g: &ConvGeometry, hp: usize, wp: usize) -> Self {
        assert!(hp >= g.h + 2 * g.ph && wp >= g.w + 2 * g.pw, "Padded: {hp}x{wp} is smaller than the padded input");
        Padded { g: *g, hp, wp }
    }
    /// Whether the fast path needs the copy at all (it does not for the images as they are).
    pub fn copies(&self) -> bool {
        (self.hp, self.wp) != (self.g.h, self.g.w)
    }
    /// The unpadded conv on the padded planes: input (C, HP, WP), the same kernel and stride.
    pub fn geometry(&self) -> ConvGeometry {
        let g = &self.g;
        ConvGeometry::with_hw(g.c, self.hp, self.wp, Hw { h: g.kh, w: g.kw }, Hw { h: g.sh, w: g.sw }, Hw::square(0))
    }
    /// What the fast path reads: x itself where no copy is needed (`buf` emptied), else `buf`
    /// filled with the padded planes of x (reusing its allocation).
    pub fn input<'a, T: Float>(&self, x: &'a [T], buf: &'a mut Vec<T>) -> &'a [T] {
        if !self.copies() {
            buf.clear();
            return x;
        }
        let (g, wp) = (&self.g, self.wp);
        buf.resize(x.len() / (g.h * g.w) * self.hp * wp, T::zero());
        buf.par_chunks_mut(self.hp * wp).zip(x.par_chunks(g.h * g.w)).for_each(|(p, xp)| {
            p[..g.ph * wp].fill(T::zero());
            p[(g.ph + g.h) * wp..].fill(T::zero());
            for (row, xrow) in p[g.ph * wp..].chunks_exact_mut(wp).zip(xp.chunks_exact(g.w)) {
                row[..g.pw].fill(T::zero());
                row[g.pw..g.pw + g.w].copy_from_slice(xrow);
                row[g.pw + g.w..].fill(T::zero());
            }
        });
        buf
    }
    /// A fast path's backward over one thread's `range` of images, `group` at a time: runs
    /// `f(first, count, dx)` for each group in order, where `dx` is what the group's input
    /// gradient is added to: its images' part of `dx_range` (the range's dx, (images, C, H, W))
    /// where the forward read x itself, else a zeroed buffer of padded planes whose interior is
    /// then added to `dx_range` (`crop_add`); `None` when no input gradient is asked for.
    pub fn for_each_group<T: Float>(
        &self,
        range: std::ops::Range<usize>,
        group: usize,
        dx_range: Option<&mut [T]>,
        mut f: impl FnMut(usize, usize, Option<&mut [T]>),
    ) {
        let (img, imgp) = (self.g.c * self.g.h * self.g.w, self.g.c * self.hp * self.wp);
        let copies = self.copies();
        let mut dxp = match (&dx_range, copies) {
            (Some(_), true) => zero_vec(group * imgp),
            _ => Vec::new(),
        };
        let mut dx_range = dx_range;
        let mut first = range.start;
        while first < range.end {
            let count = group.min(range.end - first);
            let at = (first - range.start) * img;
            match (dx_range.as_deref_mut(), copies) {
                (None, _) => f(first, count, None),
                (Some(dx), false) => f(first, count, Some(&mut dx[at..at + count * img])),
                (Some(dx), true) => {
                    dxp[..count * imgp].fill(T::zero());
                    f(first, count, Some(&mut dxp[..count * imgp]));
                    self.crop_add(&dxp[..count * imgp], &mut dx[at..at + count * img]);
                }
            }
            first += count;
        }
    }
    /// dx (planes, H, W) += the interior of dx_p (planes, HP, WP): the adjoint of `input`.
    pub fn crop_add<T: Float>(&self, dxp: &[T], dx: &mut [T]) {
        let g = &self.g;
        for (d, p) in dx.chunks_exact_mut(g.h * g.w).zip(dxp.chunks_exact(self.hp * self.wp)) {
            for (drow, prow) in d.chunks_exact_mut(g.w).zip(p[g.ph * self.wp..].chunks_exact(self.wp)) {
                drow.iter_mut().zip(&prow[g.pw..g.pw + g.w]).for_each(|(a, b)| *a += *b);
            }
        }
    }
}

/// The outputs o in [lo, hi) whose input index o*stride + k - pad falls inside [0, len); the
/// others read the zero padding. Precomputing the range keeps the copy loops branch-free.
#[inline]
fn valid_range(outs: usize, k: usize, len: usize, stride: usize, pad: usize) -> (usize, usize) {
    let lo = if pad > k { (pad - k).div_ceil(stride) } else { 0 };
    if len + pad <= k {
        return (0, 0);
    }
    let hi = ((len - 1 + pad - k) / stride + 1).min(outs);
    (lo.min(hi), hi)
}

// How im2col copies. A direct copy (for each row (c,i,j) and output row oh, the OW pixels
// x[c, oh*SH-PH+i, ow*SW-PW+j]) is thousands of short, strided, bounds-clipped copies per image
// (a 3x3 conv on 8x8 planes with 64 channels: 576 rows of 8 runs of 8 pixels), and their loop
// control cost more than the GEMM they feed. So im2col first rewrites the image once as its
// stride phases with the zero border written out:
//
//   phase[c, a, b][r, q] = x[c, r*SH + a - PH, q*SW + b - PW]   (0 outside x), a < SH, b < SW
//
// (one plane for stride 1: the padded image). Tap (i, j) of output (oh, ow) reads padded pixel
// (oh*SH + i, ow*SW + j) = phase[c, i%SH, j%SW][oh + i/SH, ow + j/SW]: for every stride, each
// output row of each col row is OW consecutive values of one phase plane, a fixed-length copy
// with no clipping. col2im is the same in reverse: it sums into the phase planes, tap after tap
// in the order a direct col2im would, then adds the planes' inner pixels into dx.

impl ConvGeometry {
    /// Rows R and columns Q of each phase plane: the padded image's size over the stride.
    fn phase_dims(&self) -> (usize, usize) {
        ((self.h + 2 * self.ph).div_ceil(self.sh), (self.w + 2 * self.pw).div_ceil(self.sw))
    }
    /// Elements of one image's phase planes (C, SH, SW, R, Q): im2col's and col2im's scratch.
    pub fn phases_len(&self) -> usize {
        let (r, q) = self.phase_dims();
        self.c * self.sh * self.sw * r * q
    }
    /// Where tap (i, j) reads: its phase plane's offset in the scratch, and the first value's
    /// offset inside that plane.
    fn tap(&self, c: usize, i: usize, j: usize) -> (usize, usize) {
        let (r, q) = self.phase_dims();
        let plane = ((c * self.sh + i % self.sh) * self.sw + j % self.sw) * r * q;
        (plane, (i / self.sh) * q + j / self.sw)
    }
    /// Plane p of the phases, p = (c*SH + a)*SW + b: which of its rows and columns hold pixels
    /// of x (the others are padding).
    fn phase_plane(&self, p: usize) -> PhasePlane {
        let (rr, qq) = self.phase_dims();
        let (c, a, b) = (p / (self.sh * self.sw), p / self.sw % self.sh, p % self.sw);
        let (r_lo, r_hi) = valid_range(rr, a, self.h, self.sh, self.ph);
        let (q_lo, q_hi) = valid_range(qq, b, self.w, self.sw, self.pw);
        PhasePlane { c, a, b, rows: r_lo..r_hi, cols: q_lo..q_hi }
    }
}

/// See `ConvGeometry::phase_plane`.
struct PhasePlane {
    c: usize,
    a: usize,
    b: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl PhasePlane {
    /// Where in x (C, H, W) the first pixel of row r's columns `cols` is (every SW-th after it
    /// follows); `cols` must not be empty.
    fn pixel(&self, g: &ConvGeometry, r: usize) -> usize {
        (self.c * g.h + r * g.sh + self.a - g.ph) * g.w + self.cols.start * g.sw + self.b - g.pw
    }
}

/// The first `g.phases_len()` values of im2col's and col2im's scratch, grown to that if shorter.
fn phases_for<'a, T: Float>(g: &ConvGeometry, phases: &'a mut Vec<T>) -> &'a mut [T] {
    if phases.len() < g.phases_len() {
        phases.resize(g.phases_len(), T::zero());
    }
    &mut phases[..g.phases_len()]
}

/// phases (C, SH, SW, R, Q) of one image x (C, H, W), every value written (see above).
fn split_phases<T: Float>(g: &ConvGeometry, x: &[T], phases: &mut [T]) {
    let (rr, qq) = g.phase_dims();
    for (p, plane) in phases.chunks_exact_mut(rr * qq).enumerate() {
        let pp = g.phase_plane(p);
        let (rows, cols) = (pp.rows.clone(), pp.cols.clone());
        plane[..rows.start * qq].fill(T::zero());
        plane[rows.end * qq..].fill(T::zero());
        for r in rows {
            let row = &mut plane[r * qq..][..qq];
            row[..cols.start].fill(T::zero());
            row[cols.end..].fill(T::zero());
            if cols.end > cols.start {
                let (src, out) = (&x[pp.pixel(g, r)..], &mut row[cols.clone()]);
                match g.sw {
                    1 => out.copy_from_slice(&src[..out.len()]),
                    2 => every_nth::<T, 2>(src, out),
                    _ => every_nth_dyn(src, out, g.sw),
                }
            }
        }
    }
}

/// dx (C, H, W) += the inner (not padding) values of phases: the adjoint of `split_phases`.
fn add_phases<T: Float>(g: &ConvGeometry, phases: &[T], dx: &mut [T]) {
    let (rr, qq) = g.phase_dims();
    for (p, plane) in phases.chunks_exact(rr * qq).enumerate() {
        let pp = g.phase_plane(p);
        if pp.cols.end <= pp.cols.start {
            continue;
        }
        for r in pp.rows.clone() {
            let (d, dst) = (&plane[r * qq..][pp.cols.clone()], &mut dx[pp.pixel(g, r)..]);
            match g.sw {
                1 => dst.iter_mut().zip(d).for_each(|(x, v)| *x += *v),
                2 => add_every_nth::<T, 2>(d, dst),
                _ => dst.iter_mut().step_by(g.sw).zip(d).for_each(|(x, v)| *x += *v),
            }
        }
    }
}

/// `dst` (OH runs of `N` values) from `src`, run o starting at o*stride: with `N` a constant each
/// run is a few vector moves, where a run-time length would call memcpy for 8 values.
#[inline(always)]
fn copy_runs<T: Float, const N: usize>(src: &[T], stride: usize, dst: &mut [T]) {
    for (o, d) in dst.chunks_exact_mut(N).enumerate() {
        d.copy_from_slice(&src[o * stride..][..N]);
    }
}

/// `dst`'s runs (run o at o*stride) += `d`'s runs of `n` values: the adjoint of `copy_runs`
/// (any length: the compiler vectorises a sum).
#[inline(always)]
fn add_runs<T: Float>(d: &[T], stride: usize, dst: &mut [T], n: usize) {
    for (o, run) in d.chunks_exact(n).enumerate() {
        dst[o * stride..][..n].iter_mut().zip(run).for_each(|(x, v)| *x += *v);
    }
}

/// col (K, L) from one image x (C, H, W). Rows of `col` are `ld` apart (`ld` = L for one image;
/// several images side by side, (K, G*L), start at column offsets with ld = G*L). `phases` is
/// scratch, grown to `g.phases_len()` if shorter.
pub fn im2col<T: Float>(g: &ConvGeometry, x: &[T], col: &mut [T], ld: usize, phases: &mut Vec<T>) {
    let (l, (_, qq)) = (g.l(), g.phase_dims());
    let phases = phases_for(g, phases);
    split_phases(g, x, phases);
    for (row_index, (c, i, j)) in col_rows(g).enumerate() {
        let (plane, first) = g.tap(c, i, j);
        let src = &phases[plane + first..];
        let row = &mut col[row_index * ld..][..l];
        if qq == g.ow {
            row.copy_from_slice(&src[..l]); // the runs are contiguous in the plane too
            continue;
        }
        match g.ow {
            1 => copy_runs::<T, 1>(src, qq, row),
            2 => copy_runs::<T, 2>(src, qq, row),
            4 => copy_runs::<T, 4>(src, qq, row),
            8 => copy_runs::<T, 8>(src, qq, row),
            16 => copy_runs::<T, 16>(src, qq, row),
            32 => copy_runs::<T, 32>(src, qq, row),
            ow => row.chunks_exact_mut(ow).enumerate().for_each(|(o, d)| d.copy_from_slice(&src[o * qq..][..ow])),
        }
    }
}

/// dx (C, H, W) += col2im(dcol (K, L)): the adjoint of `im2col` (rows of `dcol` `ld` apart).
/// Each pixel's column entries are summed in the order of a direct col2im (tap (i, j) after
/// tap), then added to dx: the same bits as adding them to dx one by one where dx starts at
/// zero, as in every backward here. `phases` is scratch, as in `im2col`.
pub fn col2im<T: Float>(g: &ConvGeometry, dcol: &[T], dx: &mut [T], ld: usize, phases: &mut Vec<T>) {
    let (l, (_, qq)) = (g.l(), g.phase_dims());
    let phases = phases_for(g, phases);
    phases.fill(T::zero());
    for (row_index, (c, i, j)) in col_rows(g).enumerate() {
        let (plane, first) = g.tap(c, i, j);
        add_runs(&dcol[row_index * ld..][..l], qq, &mut phases[plane + first..], g.ow);
    }
    add_phases(g, phases, dx);
}

/// The rows of col, (c, i, j) in order.
fn col_rows(g: &ConvGeometry) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..g.c).flat_map(move |c| (0..g.kh).flat_map(move |i| (0..g.kw).map(move |j| (c, i, j))))
}

/// out[t] = src[t * N] for every t: the first of each chunk of N, then the last pixel on its
/// own (its chunk may run past the row). N a constant (stride 2, the common one) lets the
/// compiler vectorise the strided reads, which `step_by` or a run-time N would not. Not inlined:
/// as a call its two slices are known not to overlap, and the vector loop needs no overlap
/// check (inlined into im2col the check failed and a scalar loop ran; 40% of im2col's time).
#[inline(never)]
fn every_nth<T: Float, const N: usize>(src: &[T], out: &mut [T]) {
    let (head, last) = out.split_at_mut(out.len() - 1);
    for (o, p) in head.iter_mut().zip(src.chunks_exact(N)) {
        *o = p[0];
    }
    last[0] = src[head.len() * N];
}

/// dst[t * N] += d[t] for every t, the adjoint of `every_nth` (the same split), not inlined
/// for the same reason.
#[inline(never)]
fn add_every_nth<T: Float, const N: usize>(d: &[T], dst: &mut [T]) {
    let (head, last) = d.split_at(d.len() - 1);
    for (p, v) in dst.chunks_exact_mut(N).zip(head) {
        p[0] += *v;
    }
    dst[head.len() * N] += last[0];
}

/// `every_nth` for any stride.
fn every_nth_dyn<T: Float>(src: &[T], out: &mut [T], n: usize) {
    for (o, v) in out.iter_mut().zip(src.iter().step_by(n)) {
        *o = *v;
    }
}

/// A stride or padding in `describe`: `2` when square (today's spelling), `2x1` otherwise.
fn axes(v: Hw) -> String {
    if v.is_square() {
        v.h.to_string()
    } else {
        format!("{}x{}", v.h, v.w)
    }
}

/// Images per GEMM: enough that the GEMM's N = G*L is at least 256 columns. Late layers have
/// tiny planes (L = 64 for an 8x8 output), where one image per GEMM would starve it.
pub fn group_size(l: usize, n: usize) -> usize {
    256usize.div_ceil(l).clamp(1, n.max(1))
}

/// col (K, G*L) for a group of images side by side: image i fills columns i*L .. (i+1)*L.
/// `phases` is `im2col`'s scratch.
pub(crate) fn im2col_group<T: Float>(g: &ConvGeometry, xs: &[T], col: &mut [T], phases: &mut Vec<T>) {
    let (img, l) = (g.c * g.h * g.w, g.l());
    let gs = xs.len() / img;
    for (i, x) in xs.chunks_exact(img).enumerate() {
        im2col(g, x, &mut col[i * l..], gs * l, phases);
    }
}

/// Forward of a group of G images xs (G, C, H, W) side by side, one GEMM for all:
/// Y (OC, G*L) = W (OC, K) col (K, G*L), then y_i (OC, L) = Y[:, i*L..(i+1)*L] + b for each
/// image into ys (G, OC, L). One image (G = 1) needs no reordering: its GEMM writes ys itself.
/// `col` and `yc` are scratch of at least K*G*L and OC*G*L, `phases` im2col's.
#[allow(clippy::too_many_arguments)]
pub fn conv_forward_group<T: Float>(
    g: &ConvGeometry,
    w: &[T],
    b: &[T],
    xs: &[T],
    col: &mut [T],
    yc: &mut [T],
    phases: &mut Vec<T>,
    ys: &mut [T],
) {
    let (oc, k, l) = (b.len(), g.k(), g.l());
    let gs = xs.len() / (g.c * g.h * g.w);
    let ld = gs * l;
    im2col_group(g, xs, &mut col[..k * ld], phases);
    if gs == 1 {
        gemm_nn(oc, l, k, w, k, 1, col, ys);
    } else {
        gemm_nn(oc, ld, k, w, k, 1, col, &mut yc[..oc * ld]);
        for (i, yi) in ys.chunks_exact_mut(oc * l).enumerate() {
            for (o, yrow) in yi.chunks_exact_mut(l).enumerate() {
                yrow.copy_from_slice(&yc[o * ld + i * l..][..l]);
            }
        }
    }
    // ys's rows of L are (image, channel) in order: row r belongs to channel r mod OC.
    for (r, yrow) in ys.chunks_exact_mut(l).enumerate() {
        let bias = b[r % oc];
        yrow.iter_mut().for_each(|v| *v += bias);
    }
}

/// dW (OC, K) += dY (OC, ld) col^T, col (K, ld): the im2col paths' weight gradient, every
/// entry a dot product of two rows (`gemm_nt`: no packing of either operand).
pub(crate) fn weight_grad<T: Float>(dy: &[T], col: &[T], ld: usize, dw: &mut [T]) {
    let (oc, k) = (dy.len() / ld, col.len() / ld);
    gemm_nt(oc, k, ld, dy, col, dw);
}

/// Each thread range's (dW, db) of a conv backward, in range order (`Conv2d::add_range_sums`).
pub(crate) type RangeSums<T> = Vec<(Vec<T>, Vec<T>)>;

pub struct Conv2d<T: Float> {
    in_channels: usize,
    out_channels: usize,
    kernel: Hw,
    stride: Hw,
    padding: Hw,
    /// (OC, C, KH, KW)
    pub weight: Param<T>,
    /// (OC)
    pub bias: Param<T>,
    /// The input of the last forward call: backward rebuilds each group's col from it (one
    /// group's col at a time stays in cache, the whole batch's would not).
    x: Option<Tensor<T>>,
    /// Whether backward computes dx. The model's first layer is told not to (nobody needs the
    /// gradient of the images, and it is the most expensive GEMM of its backward); backward
    /// then returns an empty (0, C, H, W) tensor. Explain's models keep it on (saliency).
    pub input_grad: bool,
    /// Run a 3x3 stride-1 conv of several channels by Winograd F(2x2, 3x3)
    /// (`winograd_conv.rs`) instead of im2col + GEMM. On by default; tests turn it off to
    /// compare the two paths.
    pub winograd: bool,
    /// On the Winograd path: the last forward's input with its zero border written out, kept
    /// for the backward (empty where the input needs no border).
    padded: Vec<T>,
    /// A ReLU fused in: y = max(0, conv), applied to each group's output while it is still in
    /// cache, instead of a `Relu` layer's own pass over the whole batch (the training build
    /// sets it for a conv that a ReLU, but no max pool, follows). Backward then starts from
    /// dy * [y > 0], a group at a time. Off by default.
    pub relu: bool,
    /// With `relu`: [y > 0] of the last forward, as the `Relu` layer keeps it.
    live: Vec<bool>,
}

impl<T: Float> Conv2d<T> {
    /// grad(W) += dW, grad(b) += db for each range's (dW, db), in range order: the same sum for
    /// a given thread count, whichever thread finished first. Every conv backward ends here.
    pub(crate) fn add_range_sums(&mut self, partials: RangeSums<T>) {
        let gw = slice_mut(&mut self.weight.grad);
        let gb = slice_mut(&mut self.bias.grad);
        for (dw, db) in partials {
            gw.iter_mut().zip(&dw).for_each(|(g, d)| *g += *d);
            gb.iter_mut().zip(&db).for_each(|(g, d)| *g += *d);
        }
    }

    /// A zero-initialised layer; `model::init_pytorch_default` gives PyTorch's initialisation.
    /// Kernel, stride and padding take an int (both axes) or an (h, w) pair, as in PyTorch's
    /// `nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: impl Into<Hw>,
        stride: impl Into<Hw>,
        padding: impl Into<Hw>,
    ) -> Self {
        let (kernel, stride, padding) = (kernel.into(), stride.into(), padding.into());
        assert!(kernel.h > 0 && kernel.w > 0, "Conv2d: kernel size must be positive, got {kernel}");
        assert!(stride.h > 0 && stride.w > 0, "Conv2d: stride must be positive, got {stride}");
        Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            weight: Param::new(zeros(&[out_channels, in_channels, kernel.h, kernel.w])),
            bias: Param::new(zeros(&[out_channels])),
            x: None,
            input_grad: true,
            winograd: true,
            padded: Vec::new(),
            relu: false,
            live: Vec::new(),
        }
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }
    /// (KH, KW)
    pub fn kernel(&self) -> Hw {
        self.kernel
    }
    /// (SH, SW)
    pub fn stride(&self) -> Hw {
        self.stride
    }
    /// (PH, PW), zeros added on each side.
    pub fn padding(&self) -> Hw {
        self.padding
    }

    /// Whether an input of this shape runs the Winograd path (forward and backward both ask).
    fn runs_winograd(&self, input: &[usize]) -> bool {
        self.winograd && winograd_conv::applies(self, input)
    }

    pub fn geometry(&self, input: &[usize]) -> ConvGeometry {
        assert_eq!(input.len(), 4, "Conv2d: expected an (N, C, H, W) input, got {input:?}");
        assert_eq!(input[1], self.in_channels, "Conv2d: expected {} input channels, got {input:?}", self.in_channels);
        ConvGeometry::with_hw(input[1], input[2], input[3], self.kernel, self.stride, self.padding)
    }
}

impl<T: Float> Layer<T> for Conv2d<T> {
    fn describe(&self) -> String {
        format!(
            "Conv2d({}->{}, k{}x{}, s{}, p{}){}",
            self.in_channels,
            self.out_channels,
            self.kernel.h,
            self.kernel.w,
            axes(self.stride),
            axes(self.padding),
            if self.relu { " + ReLU" } else { "" }
        )
    }

    fn output_shape(&self, input: &[usize]) -> Vec<usize> {
        let g = self.geometry(input);
        vec![input[0], self.out_channels, g.oh, g.ow]
    }

    fn flops(&self, input: &[usize]) -> u64 {
        let g = self.geometry(input);
        (2 * input[0] * self.out_channels * g.k() * g.l()) as u64
    }

    fn forward(&mut self, x: &Tensor<T>, ctx: Ctx) -> Tensor<T> {
        self.forward_owned(x.clone(), ctx)
    }

    fn forward_owned(&mut self, x: Tensor<T>, _ctx: Ctx) -> Tensor<T> {
        let (n, c, h, w) = nchw("Conv2d", &x);
        let g = self.geometry(x.shape());
        let (oc, k, l) = (self.out_channels, g.k(), g.l());
        let (wt, b) = (slice(&self.weight.value), slice(&self.bias.value));
        self.live.resize(if self.relu { n * oc * l } else { 0 }, false);
        let winograd = self.runs_winograd(x.shape());
        let live = &mut self.live[..];
        if winograd {
            let y = winograd_conv::forward(&g, wt, b, slice(&x), n, &mut self.padded, live);
            self.x = Some(x);
            return y;
        }
        let gsize = group_size(l, n);
        let mut y = zeros(&[n, oc, g.oh, g.ow]);
        let chunk = gsize * oc * l;
        // Each group's part of the ReLU mask (none without one).
        let lives: Vec<&mut [bool]> = if self.relu {
            live.chunks_mut(chunk).collect()
        } else {
            (0..n.div_ceil(gsize)).map(|_| <&mut [bool]>::default()).collect()
        };
        // One group of images per task; each task keeps its own col and GEMM-output buffers.
        slice_mut(&mut y).par_chunks_mut(chunk).zip(slice(&x).par_chunks(gsize * c * h * w)).zip(lives).for_each_init(
            || (zero_vec(k * gsize * l), zero_vec(if gsize > 1 { oc * gsize * l } else { 0 }), Vec::new()),
            |(col, yc, phases), ((ys, xs), live)| {
                conv_forward_group(&g, wt, b, xs, col, yc, phases, ys);
                if !live.is_empty() {
                    relu_in_place(ys, live);
                }
            },
        );
        self.x = Some(x); // kept for backward without a copy
        y
    }

    fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        let x = self.x.as_ref().expect("Conv2d::backward called before forward");
        let (n, c, h, w) = nchw("Conv2d", x);
        let g = self.geometry(x.shape());
        let (oc, k, l) = (self.out_channels, g.k(), g.l());
        assert_eq!(dy.shape(), &[n, oc, g.oh, g.ow], "Conv2d: dy shape");
        let wt = slice(&self.weight.value);
        let input_grad = self.input_grad;
        let live = &self.live[..];
        assert_eq!(live.len(), if self.relu { dy.len() } else { 0 }, "Conv2d: the forward's ReLU mask");
        if self.runs_winograd(x.shape()) {
            let (xs, dys) = (slice(x), slice(dy));
            let (dx, partials) = winograd_conv::backward(&g, wt, oc, xs, &self.padded, dys, live, n, input_grad);
            self.add_range_sums(partials);
            return dx;
        }
        let img = c * h * w;
        let mut dx = zeros(&[if input_grad { n } else { 0 }, c, h, w]);
        let gsize = group_size(l, n);

        // Fixed ranges of images, one per thread; each range sums its own dW and db, a group of
        // images (side by side, as in forward) per GEMM.
        let ranges = batch_ranges(n, rayon::current_num_threads());
        let (xs, dys) = (slice(x), slice(dy));
        let dx_parts = split_by_ranges(slice_mut(&mut dx), &ranges, if input_grad { img } else { 0 });
        let partials: Vec<(Vec<T>, Vec<T>)> = ranges
            .par_iter()
            .zip(dx_parts)
            .map(|(r, dx_part)| {
                let mut dw = zero_vec(oc * k);
                let mut db = zero_vec(oc);
                let mut col = zero_vec(k * gsize * l);
                let mut dcol = zero_vec(if input_grad { k * gsize * l } else { 0 });
                let mut dc = zero_vec(if gsize > 1 || !live.is_empty() { oc * gsize * l } else { 0 });
                let mut phases = Vec::new();
                let mut first = r.start;
                while first < r.end {
                    let gs = gsize.min(r.end - first);
                    let ld = gs * l;
                    let span = first * oc * l..(first + gs) * oc * l;
                    let dyg = &dys[span.clone()];
                    let live_g = (!live.is_empty()).then(|| &live[span]);
                    // dY (OC, G*L): the group's dy side by side (one image's dy already is),
                    // times the fused ReLU's mask where there is one.
                    let dcg: &[T] = if live_g.is_none() && gs == 1 {
                        dyg
                    } else {
                        for (at, row) in dyg.chunks_exact(l).enumerate() {
                            // row `at` of dyg is (image i, channel o)
                            let (i, o) = (at / oc, at % oc);
                            let to = &mut dc[o * ld + i * l..][..l];
                            match live_g {
                                Some(lg) => mask_into(row, &lg[at * l..][..l], to),
                                None => to.copy_from_slice(row),
                            }
                        }
                        &dc[..oc * ld]
                    };
                    // db += row sums of dY
                    for (d, row) in db.iter_mut().zip(dcg.chunks_exact(ld)) {
                        *d += sum(row);
                    }
                    // dW += dY col^T
                    im2col_group(&g, &xs[first * img..(first + gs) * img], &mut col[..k * ld], &mut phases);
                    weight_grad(dcg, &col[..k * ld], ld, &mut dw);
                    if input_grad {
                        // dcol = W^T dY, then dx_i = col2im(dcol's columns of image i)
                        gemm_nn(k, ld, oc, wt, 1, k, dcg, &mut dcol[..k * ld]);
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

        self.add_range_sums(partials);
        dx
    }

    fn params(&self) -> Vec<&Param<T>> {
        vec![&self.weight, &self.bias]
    }
    fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        vec![&mut self.weight, &mut self.bias]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Geometries that reach every branch of the phase split: strides 1, 2 and 3 (the constant
    /// and run-time strided copies), kernels smaller than, equal to and larger than the stride,
    /// padding wider than the kernel, rectangular everything, output widths with and without a
    /// fixed-length copy, and planes whose runs are contiguous (kernel 2, stride 2, no padding).
    fn geometries() -> Vec<ConvGeometry> {
        let hw = |h, w| Hw { h, w };
        vec![
            ConvGeometry::new(2, 5, 7, 3, 3, 2, 1),
            ConvGeometry::new(3, 8, 8, 3, 3, 1, 1),
            ConvGeometry::new(2, 16, 16, 3, 3, 2, 1),
            ConvGeometry::new(1, 9, 9, 5, 5, 2, 2),
            ConvGeometry::new(2, 8, 8, 2, 2, 2, 0),
            ConvGeometry::new(1, 7, 7, 1, 1, 3, 0),
            ConvGeometry::new(2, 4, 4, 3, 3, 1, 3),
            ConvGeometry::new(1, 6, 6, 6, 6, 1, 0),
            ConvGeometry::with_hw(2, 6, 5, hw(2, 4), hw(1, 3), hw(1, 2)),
            ConvGeometry::with_hw(1, 7, 4, hw(5, 1), hw(3, 1), hw(2, 0)),
            ConvGeometry::with_hw(2, 10, 33, hw(3, 2), hw(2, 1), hw(0, 1)),
            // One column and padding 2 at stride 2: a phase whose every column is padding.
            ConvGeometry::with_hw(1, 3, 1, hw(3, 3), hw(2, 2), hw(2, 2)),
            // Phases with one image row and padding rows below it.
            ConvGeometry::with_hw(2, 2, 3, hw(3, 1), hw(2, 1), hw(2, 0)),
            ConvGeometry::with_hw(1, 1, 4, hw(4, 2), hw(3, 1), hw(2, 1)),
        ]
    }

    /// A value that is different for every pixel, never zero.
    fn pixel(i: usize) -> f64 {
        1.0 + (i as f64 * 0.37).sin()
    }

    /// Images per GEMM: enough for 256 columns, at least one, at most the batch.
    #[test]
    fn groups_fill_256_columns_within_the_batch() {
        assert_eq!(group_size(64, 10), 4); // 8x8 planes: 4 images, 256 columns
        assert_eq!(group_size(100, 10), 3); // 300 columns, the fewest images past 256
        assert_eq!(group_size(62 * 62, 10), 1); // a large plane alone
        assert_eq!(group_size(4, 10), 10); // tiny planes: the whole batch, not 64
        assert_eq!(group_size(4, 0), 1);
    }

    /// im2col against its definition, col[(c,i,j), (oh,ow)] = x[c, oh*SH-PH+i, ow*SW-PW+j]
    /// (0 outside the image), into a wider col (ld > L, a column offset), with scratch full of
    /// NaN (a phase value or col entry left unwritten shows); col2im against the direct sum of
    /// every column entry into the pixel it came from, tap after tap (the same order, so the
    /// same bits).
    #[test]
    fn im2col_and_col2im_match_their_definitions() {
        for g in geometries() {
            let mut phases = vec![f64::NAN; g.phases_len() + 5];
            let (k, l) = (g.k(), g.l());
            let x: Vec<f64> = (0..g.c * g.h * g.w).map(pixel).collect();
            let (ld, at) = (l + 3, 2);
            let mut col = vec![f64::NAN; k * ld + at];
            im2col(&g, &x, &mut col[at..], ld, &mut phases);
            let mut want_dx = vec![0.0; x.len()];
            let dcol: Vec<f64> = (0..k * ld).map(|i| (i as f64 * 0.11).cos()).collect();
            for c in 0..g.c {
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let row = (c * g.kh + i) * g.kw + j;
                        for oh in 0..g.oh {
                            for ow in 0..g.ow {
                                let (ih, iw) = (
                                    (oh * g.sh + i) as isize - g.ph as isize,
                                    (ow * g.sw + j) as isize - g.pw as isize,
                                );
                                let inside = ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w;
                                let p = if inside { (c * g.h + ih as usize) * g.w + iw as usize } else { usize::MAX };
                                let got = col[at + row * ld + oh * g.ow + ow];
                                let want = if inside { x[p] } else { 0.0 };
                                assert_eq!(got.to_bits(), want.to_bits(), "{g:?}: col row {row}, output ({oh}, {ow})");
                                if inside {
                                    want_dx[p] += dcol[row * ld + oh * g.ow + ow];
                                }
                            }
                        }
                    }
                }
            }
            let mut dx = vec![0.0; x.len()];
            phases.fill(f64::NAN);
            col2im(&g, &dcol, &mut dx, ld, &mut phases);
            for (p, (a, b)) in dx.iter().zip(&want_dx).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{g:?}: dx pixel {p}: {a} vs {b}");
            }
            // It adds: a second call doubles dx (with scratch it has to grow from nothing).
            col2im(&g, &dcol, &mut dx, ld, &mut Vec::new());
            for (p, (a, b)) in dx.iter().zip(&want_dx).enumerate() {
                assert!(
                    (a - 2.0 * b).abs() <= 1e-12 * b.abs().max(1.0),
                    "{g:?}: dx pixel {p} after two calls: {a} vs 2 x {b}"
                );
            }
        }
    }

    /// col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)> for any x, c.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        for g in geometries() {
            adjoint(&g);
        }
    }

    fn adjoint(g: &ConvGeometry) {
        let x: Vec<f64> = (0..g.c * g.h * g.w).map(|i| (i as f64 * 0.37).sin()).collect();
        let c: Vec<f64> = (0..g.k() * g.l()).map(|i| (i as f64 * 0.11).cos()).collect();
        let mut col = vec![0.0; g.k() * g.l()];
        let mut phases = Vec::new();
        im2col(g, &x, &mut col, g.l(), &mut phases);
        let mut back = vec![0.0; x.len()];
        col2im(g, &c, &mut back, g.l(), &mut phases);
        let lhs: f64 = col.iter().zip(&c).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-10, "{g:?}: {lhs} vs {rhs}");
    }

    /// A conv with its ReLU fused in (`Conv2d::relu`) gives the bits of `Conv2d` then `Relu`:
    /// y, dx, dW and db, on the im2col path with one image per GEMM (L = 256) and with several
    /// (L = 16, groups cut short by the batch), and on the Winograd path; in f32 (where the CPU
    /// runs its AVX-512 kernels) and f64; about half the outputs negative, a NaN pixel (its
    /// outputs stay NaN and live, as the layer keeps them), and each layer run on a larger
    /// batch first (the mask is resized, nothing of it kept).
    #[test]
    fn fused_relu_gives_the_bits_of_conv_then_relu() {
        fn check<T: Float>() {
            use crate::layers::{Ctx, Relu};
            use crate::tensor::from_vec;
            // (C, OC, kernel, stride, padding, N, H): which path it takes is asserted below.
            // The Winograd case's 8x8 tiles make groups of four images: on one to three
            // threads, some thread runs more than one group.
            let cases = [(1, 8, 5, 2, 2, 3, 32, false), (3, 5, 3, 2, 1, 7, 8, false), (4, 6, 3, 1, 1, 12, 16, true)];
            for (c, oc, k, st, pad, n, h, winograd) in cases {
                let make = |relu: bool| {
                    let mut l = Conv2d::<T>::new(c, oc, k, st, pad);
                    let w: Vec<T> = (0..oc * c * k * k).map(|i| T::f(pixel(i) - 1.0)).collect();
                    l.weight.value = from_vec(&[oc, c, k, k], w);
                    l.bias.value = from_vec(&[oc], (0..oc).map(|i| T::f(0.1 * i as f64 - 0.2)).collect());
                    l.relu = relu;
                    l
                };
                let (mut fused, mut conv, mut relu) = (make(true), make(false), Relu::<T>::new());
                assert_eq!(fused.describe(), format!("{} + ReLU", conv.describe()));
                let shape = |n: usize| [n, c, h, h];
                assert_eq!(fused.runs_winograd(&shape(n)), winograd, "C{c} k{k} s{st}");
                for n in [n + 2, n] {
                    let mut x: Vec<T> = (0..n * c * h * h).map(|i| T::f(pixel(3 * i + 1) - 1.0)).collect();
                    x[5] = T::nan();
                    let x = from_vec(&shape(n), x);
                    let yf = fused.forward(&x, Ctx::train(1));
                    let yp = relu.forward_owned(conv.forward(&x, Ctx::train(1)), Ctx::train(1));
                    let bits = |t: &Tensor<T>| slice(t).iter().map(|v| v.as_f64().to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&yf), bits(&yp), "C{c} k{k} s{st}: y");
                    let dead = slice(&yf).iter().filter(|v| **v == T::zero()).count();
                    assert!(dead > yf.len() / 5 && dead < yf.len() * 4 / 5, "C{c}: {dead} of {} dead", yf.len());
                    assert!(slice(&yf).iter().any(|v| v.is_nan()), "C{c}: the NaN pixel's outputs");
                    let dy = from_vec(yf.shape(), (0..yf.len()).map(|i| T::f(pixel(i + 7) - 0.4)).collect());
                    for l in [&mut fused, &mut conv] {
                        l.weight.grad.fill(T::zero());
                        l.bias.grad.fill(T::zero());
                    }
                    let dxf = fused.backward(&dy);
                    let dxp = conv.backward(&relu.backward(&dy));
                    assert_eq!(bits(&dxf), bits(&dxp), "C{c} k{k} s{st}: dx");
                    assert_eq!(bits(&fused.weight.grad), bits(&conv.weight.grad), "C{c}: dW");
                    assert_eq!(bits(&fused.bias.grad), bits(&conv.bias.grad), "C{c}: db");
                }
            }
        }
        check::<f32>();
        check::<f64>();
    }
}
