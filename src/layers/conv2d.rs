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

use rayon::prelude::*;

use super::{batch_ranges, nchw, out_len, split_by_ranges, Ctx, Hw, Layer, Param};
use crate::tensor::{gemm, slice, slice_mut, zero_vec, zeros, Float, Tensor};

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

/// col (K, L) from one image x (C, H, W). Rows of `col` are `ld` apart (`ld` = L for one image;
/// several images side by side, (K, G*L), start at column offsets with ld = G*L).
pub fn im2col<T: Float>(g: &ConvGeometry, x: &[T], col: &mut [T], ld: usize) {
    let l = g.l();
    for c in 0..g.c {
        for i in 0..g.kh {
            let (oh_lo, oh_hi) = valid_range(g.oh, i, g.h, g.sh, g.ph);
            for j in 0..g.kw {
                let (ow_lo, ow_hi) = valid_range(g.ow, j, g.w, g.sw, g.pw);
                let row = &mut col[((c * g.kh + i) * g.kw + j) * ld..][..l];
                row[..oh_lo * g.ow].fill(T::zero());
                row[oh_hi * g.ow..].fill(T::zero());
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.sh + i - g.ph;
                    let xrow = &x[(c * g.h + ih) * g.w..][..g.w];
                    let out = &mut row[oh * g.ow..][..g.ow];
                    out[..ow_lo].fill(T::zero());
                    out[ow_hi..].fill(T::zero());
                    if ow_hi > ow_lo {
                        let first = ow_lo * g.sw + j - g.pw;
                        let out = &mut out[ow_lo..ow_hi];
                        if g.sw == 1 {
                            out.copy_from_slice(&xrow[first..first + out.len()]);
                        } else {
                            // Every SW-th pixel: the first of each chunk of SW, which the
                            // compiler can vectorise (`step_by` reads one at a time), and the
                            // last on its own (its chunk may run past the row).
                            match g.sw {
                                2 => every_nth::<T, 2>(&xrow[first..], out),
                                _ => every_nth_dyn(&xrow[first..], out, g.sw),
                            }
                        }
                    }
                }
            }
        }
    }
}

/// out[t] = src[t * N] for every t: the first of each chunk of N, then the last pixel on its
/// own (its chunk may run past the row). N a constant (stride 2, the common one) lets the
/// compiler vectorise the strided reads, which `step_by` or a run-time N would not.
#[inline]
fn every_nth<T: Float, const N: usize>(src: &[T], out: &mut [T]) {
    let (head, last) = out.split_at_mut(out.len() - 1);
    for (o, p) in head.iter_mut().zip(src.chunks_exact(N)) {
        *o = p[0];
    }
    last[0] = src[head.len() * N];
}

/// dst[t * N] += d[t] for every t, the adjoint of `every_nth` (the same split).
#[inline]
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

/// dx (C, H, W) += col2im(dcol (K, L)): the adjoint of `im2col` (rows of `dcol` `ld` apart).
pub fn col2im<T: Float>(g: &ConvGeometry, dcol: &[T], dx: &mut [T], ld: usize) {
    let l = g.l();
    for c in 0..g.c {
        for i in 0..g.kh {
            let (oh_lo, oh_hi) = valid_range(g.oh, i, g.h, g.sh, g.ph);
            for j in 0..g.kw {
                let (ow_lo, ow_hi) = valid_range(g.ow, j, g.w, g.sw, g.pw);
                if ow_hi <= ow_lo {
                    continue;
                }
                let row = &dcol[((c * g.kh + i) * g.kw + j) * ld..][..l];
                for oh in oh_lo..oh_hi {
                    let ih = oh * g.sh + i - g.ph;
                    let dxrow = &mut dx[(c * g.h + ih) * g.w..][..g.w];
                    let first = ow_lo * g.sw + j - g.pw;
                    let d = &row[oh * g.ow + ow_lo..oh * g.ow + ow_hi];
                    if g.sw == 1 {
                        // Contiguous: a plain slice add, which the compiler vectorises.
                        dxrow[first..first + d.len()].iter_mut().zip(d).for_each(|(x, v)| *x += *v);
                    } else {
                        match g.sw {
                            2 => add_every_nth::<T, 2>(d, &mut dxrow[first..]),
                            _ => dxrow[first..].iter_mut().step_by(g.sw).zip(d).for_each(|(x, v)| *x += *v),
                        }
                    }
                }
            }
        }
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
pub(crate) fn im2col_group<T: Float>(g: &ConvGeometry, xs: &[T], col: &mut [T]) {
    let (img, l) = (g.c * g.h * g.w, g.l());
    let gs = xs.len() / img;
    for (i, x) in xs.chunks_exact(img).enumerate() {
        im2col(g, x, &mut col[i * l..], gs * l);
    }
}

/// Forward of a group of G images xs (G, C, H, W) side by side, one GEMM for all:
/// Y (OC, G*L) = W (OC, K) col (K, G*L), then y_i (OC, L) = Y[:, i*L..(i+1)*L] + b for each
/// image into ys (G, OC, L). One image (G = 1) needs no reordering: its GEMM writes ys itself.
/// `col` and `yc` are scratch of at least K*G*L and OC*G*L.
pub fn conv_forward_group<T: Float>(
    g: &ConvGeometry,
    w: &[T],
    b: &[T],
    xs: &[T],
    col: &mut [T],
    yc: &mut [T],
    ys: &mut [T],
) {
    let (oc, k, l) = (b.len(), g.k(), g.l());
    let gs = xs.len() / (g.c * g.h * g.w);
    let ld = gs * l;
    im2col_group(g, xs, &mut col[..k * ld]);
    if gs == 1 {
        gemm(false, false, oc, l, k, T::one(), w, col, T::zero(), ys);
    } else {
        gemm(false, false, oc, ld, k, T::one(), w, col, T::zero(), &mut yc[..oc * ld]);
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
}

impl<T: Float> Conv2d<T> {
    /// grad(W) += dW, grad(b) += db for each range's (dW, db), in range order: the same sum for
    /// a given thread count, whichever thread finished first. Every conv backward ends here.
    pub(crate) fn add_range_sums(&mut self, partials: Vec<(Vec<T>, Vec<T>)>) {
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

    pub fn geometry(&self, input: &[usize]) -> ConvGeometry {
        assert_eq!(input.len(), 4, "Conv2d: expected an (N, C, H, W) input, got {input:?}");
        assert_eq!(input[1], self.in_channels, "Conv2d: expected {} input channels, got {input:?}", self.in_channels);
        ConvGeometry::with_hw(input[1], input[2], input[3], self.kernel, self.stride, self.padding)
    }
}

impl<T: Float> Layer<T> for Conv2d<T> {
    fn describe(&self) -> String {
        format!(
            "Conv2d({}->{}, k{}x{}, s{}, p{})",
            self.in_channels,
            self.out_channels,
            self.kernel.h,
            self.kernel.w,
            axes(self.stride),
            axes(self.padding)
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
        let gsize = group_size(l, n);
        let mut y = zeros(&[n, oc, g.oh, g.ow]);
        let (wt, b) = (slice(&self.weight.value), slice(&self.bias.value));
        // One group of images per task; each task keeps its own col and GEMM-output buffers.
        slice_mut(&mut y).par_chunks_mut(gsize * oc * l).zip(slice(&x).par_chunks(gsize * c * h * w)).for_each_init(
            || (zero_vec(k * gsize * l), zero_vec(if gsize > 1 { oc * gsize * l } else { 0 })),
            |(col, yc), (ys, xs)| conv_forward_group(&g, wt, b, xs, col, yc, ys),
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
                let mut dc = zero_vec(if gsize > 1 { oc * gsize * l } else { 0 });
                let mut first = r.start;
                while first < r.end {
                    let gs = gsize.min(r.end - first);
                    let ld = gs * l;
                    let dyg = &dys[first * oc * l..(first + gs) * oc * l];
                    // dY (OC, G*L): the group's dy side by side (one image's dy already is).
                    let dcg: &[T] = if gs == 1 {
                        dyg
                    } else {
                        for (i, dyi) in dyg.chunks_exact(oc * l).enumerate() {
                            for (o, row) in dyi.chunks_exact(l).enumerate() {
                                dc[o * ld + i * l..][..l].copy_from_slice(row);
                            }
                        }
                        &dc[..oc * ld]
                    };
                    // db += row sums of dY
                    for (d, row) in db.iter_mut().zip(dcg.chunks_exact(ld)) {
                        *d += row.iter().fold(T::zero(), |s, &v| s + v);
                    }
                    // dW += dY col^T
                    im2col_group(&g, &xs[first * img..(first + gs) * img], &mut col[..k * ld]);
                    gemm(false, true, oc, k, ld, T::one(), dcg, &col, T::one(), &mut dw);
                    if input_grad {
                        // dcol = W^T dY, then dx_i = col2im(dcol's columns of image i)
                        gemm(true, false, k, ld, oc, T::one(), wt, dcg, T::zero(), &mut dcol[..k * ld]);
                        for i in 0..gs {
                            let at = (first - r.start + i) * img;
                            col2im(&g, &dcol[i * l..], &mut dx_part[at..at + img], ld);
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

    /// col2im is the adjoint of im2col: <im2col(x), c> == <x, col2im(c)> for any x, c.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        for g in [
            ConvGeometry::new(2, 5, 7, 3, 2, 2, 1),
            ConvGeometry::with_hw(2, 6, 5, Hw { h: 2, w: 4 }, Hw { h: 1, w: 3 }, Hw { h: 1, w: 2 }),
            ConvGeometry::with_hw(1, 7, 4, Hw { h: 5, w: 1 }, Hw { h: 3, w: 1 }, Hw { h: 2, w: 0 }),
        ] {
            adjoint(&g);
        }
    }

    fn adjoint(g: &ConvGeometry) {
        let x: Vec<f64> = (0..g.c * g.h * g.w).map(|i| (i as f64 * 0.37).sin()).collect();
        let c: Vec<f64> = (0..g.k() * g.l()).map(|i| (i as f64 * 0.11).cos()).collect();
        let mut col = vec![0.0; g.k() * g.l()];
        im2col(g, &x, &mut col, g.l());
        let mut back = vec![0.0; x.len()];
        col2im(g, &c, &mut back, g.l());
        let lhs: f64 = col.iter().zip(&c).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&back).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-10, "{g:?}: {lhs} vs {rhs}");
    }
}
