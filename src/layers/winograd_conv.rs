//! A plain 3x3 convolution (stride 1, any padding, several input channels) by Winograd's
//! F(2x2, 3x3): the convs that no max pool follows (`Conv2d` runs this; a conv with a 2x2 max
//! pool after it runs `winograd.rs` fused with the pool instead). The same transforms and the
//! same 16 GEMMs as `winograd.rs` (the math is written there), 2.25 times fewer multiplies
//! than im2col + GEMM; only the two ends differ.
//!
//! Forward: the output transform writes all four outputs of each 2x2 tile,
//!   y[2i + r, 2j + s] = (A^T M A)[r][s] + b,
//! where the fused block pools them.
//!
//! Backward: Z comes from the tile's whole 2x2 output gradient instead of one winner's,
//!   Z = A dY A^T,   dY = | dy[2i, 2j]      dy[2i, 2j + 1]     |
//!                        | dy[2i + 1, 2j]  dy[2i + 1, 2j + 1] |
//! done one dimension at a time: q_r = dY[r] A^T = (dY[r][0], dY[r][0] + dY[r][1],
//! dY[r][0] - dY[r][1], -dY[r][1]) for r = 0, 1, then the same along the other dimension.
//! The rest (dW += G^T (Z V^T) G, dx += B (U^T Z) B^T) is `winograd::grads_from_z`, and
//! db = the sum of dy.
//!
//! Sizes: the conv plane (OH, OW) = (H + 2PH - 2, W + 2PW - 2) is covered by TH x TW tiles,
//! TH = ceil(OH / 2), TW = ceil(OW / 2). The tiles read the input with its zero border written
//! out (`conv2d::Padded`), planes of (2TH + 2, 2TW + 2): one more zero row (column) than the
//! padding gives where OH (OW) is odd. The outputs of that extra row (column) are not written,
//! and their gradient is zero.

use rayon::prelude::*;

use super::conv2d::{ConvGeometry, Padded, RangeSums};
use super::relu::{mask_into, relu_in_place};
use super::winograd::{backward_scratch, finish_weight_grad, grads_from_z, multiply, tile_outputs};
use super::winograd::{transform_input, transform_weights, Plan, XI};
use super::{batch_ranges, split_by_ranges, Conv2d, Hw};
use crate::tensor::{slice_mut, sum, with_scratch, zero_vec, zeros, Float, Tensor};

/// Whether `Conv2d` runs this path for input shape (N, C, H, W): a 3x3, stride-1 conv (any
/// padding) of several input channels (one channel would make every product one wide), with a
/// conv plane of at least 2x2.
pub fn applies<T: Float>(conv: &Conv2d<T>, input: &[usize]) -> bool {
    let pad = conv.padding();
    input.len() == 4
        && input[1] > 1
        && (conv.kernel(), conv.stride()) == (Hw::square(3), Hw::square(1))
        && input[2] + 2 * pad.h >= 4
        && input[3] + 2 * pad.w >= 4
}

/// One input shape's plan: the tiles' Winograd plan (on the padded planes) and the padding.
struct Shape {
    plan: Plan,
    frame: Padded,
    /// The conv plane (OH, OW).
    oh: usize,
    ow: usize,
}

impl Shape {
    /// For `n` images of the conv `g` (3x3, stride 1) with `oc` filters.
    fn new(g: &ConvGeometry, oc: usize, n: usize) -> Self {
        let (th, tw) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        let frame = Padded::with_size(g, 2 * th + 2, 2 * tw + 2);
        Shape { plan: Plan::new(&frame.geometry(), oc, n), frame, oh: g.oh, ow: g.ow }
    }
    /// Floats of one task's forward scratch: V (16, C, n), M (16, OC, n), the four output runs
    /// (4n) and the row transform, for n = a group's tiles.
    fn forward_scratch(&self) -> usize {
        let p = &self.plan;
        let n = p.group * p.tiles();
        16 * (p.c + p.oc) * n + 4 * n + 8 * (p.ph + 1) * p.pw
    }
}

/// y (G, OC, OH, OW) for a group of G padded images xs (G, C, 2TH + 2, 2TW + 2), given the
/// transformed weights `u` (`winograd::transform_weights`) and `scratch` of
/// `Shape::forward_scratch` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_group_impl<T: Float>(
    p: &Plan,
    oh: usize,
    ow: usize,
    u: &[T],
    b: &[T],
    xs: &[T],
    y: &mut [T],
    scratch: &mut [T],
) {
    let (img, t, plane) = (p.c * p.h * p.w, p.tiles(), oh * ow);
    let gs = xs.len() / img;
    let n = gs * t;
    let (v, rest) = scratch.split_at_mut(16 * p.c * n);
    let (m, rest) = rest.split_at_mut(16 * p.oc * n);
    let (q, rows) = rest.split_at_mut(4 * n);
    for (i, x) in xs.chunks_exact(img).enumerate() {
        transform_input(p, x, v, n, i * t, rows);
    }
    multiply(XI, p.oc, p.c, u, v, n, m);
    let (q0, rest) = q.split_at_mut(n);
    let (q1, rest) = rest.split_at_mut(n);
    let (q2, q3) = rest.split_at_mut(n);
    for o in 0..p.oc {
        // The four outputs of every tile of the group, as runs (vector loops even for few tiles).
        let s: [&[T]; 16] = std::array::from_fn(|xi| &m[(xi * p.oc + o) * n..][..n]);
        for k in 0..n {
            [q0[k], q1[k], q2[k], q3[k]] = tile_outputs(&s, k, b[o]);
        }
        // Tile row i of image g: conv rows 2i (c00, c01 interleaved) and 2i + 1 (c10, c11).
        for g in 0..gs {
            let yo = &mut y[(g * p.oc + o) * plane..][..plane];
            for i in 0..p.ph {
                let at = g * t + i * p.pw;
                for (r, left, right) in [(2 * i, &*q0, &*q1), (2 * i + 1, &*q2, &*q3)] {
                    if r < oh {
                        interleave(&left[at..][..p.pw], &right[at..][..p.pw], &mut yo[r * ow..][..ow]);
                    }
                }
            }
        }
    }
}

/// row[2j] = left[j], row[2j + 1] = right[j] for as much of the row as there is (an odd row
/// leaves the last `right` out).
#[inline(always)]
fn interleave<T: Float>(left: &[T], right: &[T], row: &mut [T]) {
    for (pair, (&l, &r)) in row.chunks_exact_mut(2).zip(left.iter().zip(right)) {
        pair[0] = l;
        pair[1] = r;
    }
    if row.len() % 2 == 1 {
        row[row.len() - 1] = left[row.len() / 2];
    }
}

vector_builds!(
    /// Forward for a group of images (see `forward_group_impl`), in the widest build the CPU runs.
    pub fn forward_group / forward_group_on = forward_group_impl(
        p: &Plan,
        oh: usize,
        ow: usize,
        u: &[T],
        b: &[T],
        xs: &[T],
        y: &mut [T],
        scratch: &mut [T],
    )
);

/// One group's backward: Mw (16, OC, C) += this group's products (`winograd::finish_weight_grad`
/// turns the sum over groups into dW), db (OC) += the sum of dy, and, when `dx` is given, dx (G,
/// C, 2TH + 2, 2TW + 2) += the padded images' gradient. xs (G, C, 2TH + 2, 2TW + 2) the padded
/// images, dy (G, OC, OH, OW); scratch of `winograd::backward_scratch` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group_impl<T: Float>(
    p: &Plan,
    oh: usize,
    ow: usize,
    u: &[T],
    xs: &[T],
    dy: &[T],
    mw: &mut [T],
    db: &mut [T],
    dx: Option<&mut [T]>,
    scratch: &mut [T],
) {
    let (img, t, plane) = (p.c * p.h * p.w, p.tiles(), oh * ow);
    let gs = xs.len() / img;
    let n = gs * t;
    let (v, rest) = scratch.split_at_mut(16 * p.c * n);
    let (z, rest) = rest.split_at_mut(16 * p.oc * n);
    let (md, rows) = rest.split_at_mut(16 * p.c * n);
    for (i, x) in xs.chunks_exact(img).enumerate() {
        transform_input(p, x, v, n, i * t, rows);
    }
    // dY of every tile as four runs over the group's tiles (the row-transform scratch is free
    // again): d0 = dY[0][0], d1 = dY[0][1], d2 = dY[1][0], d3 = dY[1][1].
    let (d0, rest) = rows.split_at_mut(n);
    let (d1, rest) = rest.split_at_mut(n);
    let (d2, rest) = rest.split_at_mut(n);
    let d3 = &mut rest[..n];
    for o in 0..p.oc {
        for g in 0..gs {
            let dyo = &dy[(g * p.oc + o) * plane..][..plane];
            db[o] += sum(dyo);
            for i in 0..p.ph {
                let at = g * t + i * p.pw;
                for (r, left, right) in [(2 * i, &mut *d0, &mut *d1), (2 * i + 1, &mut *d2, &mut *d3)] {
                    let (left, right) = (&mut left[at..][..p.pw], &mut right[at..][..p.pw]);
                    if r < oh {
                        deinterleave(&dyo[r * ow..][..ow], left, right);
                    } else {
                        left.fill(T::zero());
                        right.fill(T::zero());
                    }
                }
            }
        }
        // Z = A dY A^T, one dimension at a time: row b of A^T applied to a pair (x, y) is
        // x ca[b] + y cb[b] (products with 1, -1 or 0: exact, and a vector loop per row of Z).
        let [ca, cb] = a_t::<T>();
        for a in 0..4 {
            for b in 0..4 {
                let dst = &mut z[((4 * a + b) * p.oc + o) * n..][..n];
                for k in 0..n {
                    let q0 = d0[k] * ca[b] + d1[k] * cb[b]; // (dY A^T)[0][b]
                    let q1 = d2[k] * ca[b] + d3[k] * cb[b]; // (dY A^T)[1][b]
                    dst[k] = q0 * ca[a] + q1 * cb[a];
                }
            }
        }
    }
    grads_from_z(p, u, v, z, gs, mw, dx, md);
}

/// A's two columns (A^T's rows) as the pairs' coefficients: A[a] = (ca[a], cb[a]).
fn a_t<T: Float>() -> [[T; 4]; 2] {
    [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]].map(|row| row.map(T::f))
}

/// left[j] = row[2j], right[j] = row[2j + 1], and 0 where the row has no such entry (an odd
/// row's last tile has no right column).
#[inline(always)]
fn deinterleave<T: Float>(row: &[T], left: &mut [T], right: &mut [T]) {
    for (pair, (l, r)) in row.chunks_exact(2).zip(left.iter_mut().zip(right.iter_mut())) {
        *l = pair[0];
        *r = pair[1];
    }
    if row.len() % 2 == 1 {
        let j = row.len() / 2;
        (left[j], right[j]) = (row[row.len() - 1], T::zero());
    }
}

vector_builds!(
    /// One group's backward (see `backward_group_impl`), in the widest build the CPU runs.
    pub fn backward_group / backward_group_on = backward_group_impl(
        p: &Plan,
        oh: usize,
        ow: usize,
        u: &[T],
        xs: &[T],
        dy: &[T],
        mw: &mut [T],
        db: &mut [T],
        dx: Option<&mut [T]>,
        scratch: &mut [T],
    )
);

/// The conv's forward on x (N, C, H, W): y (N, OC, OH, OW), a fixed range of images per
/// thread, a group at a time in that thread's scratch (`tensor::with_scratch`). `padded`
/// receives the padded images (kept for the backward). A fused ReLU (`Conv2d::relu`) passes
/// its mask `live`, one entry per output, and each group's y goes through the ReLU as soon as
/// it is written; without one `live` is empty.
pub fn forward<T: Float>(
    g: &ConvGeometry,
    wt: &[T],
    b: &[T],
    x: &[T],
    n: usize,
    padded: &mut Vec<T>,
    live: &mut [bool],
) -> Tensor<T> {
    let oc = b.len();
    let s = Shape::new(g, oc, n);
    let p = &s.plan;
    let xp = s.frame.input(x, padded);
    let u = transform_weights(p, wt);
    let mut y = zeros(&[n, oc, s.oh, s.ow]);
    let (img, out) = (p.c * p.h * p.w, oc * s.oh * s.ow);
    let ranges = batch_ranges(n, rayon::current_num_threads());
    let ys = split_by_ranges(slice_mut(&mut y), &ranges, out);
    let relu = !live.is_empty();
    let lives = split_by_ranges(live, &ranges, if relu { out } else { 0 });
    ranges.par_iter().zip(ys).zip(lives).for_each(|((r, yr), lr)| {
        let xr = &xp[r.start * img..r.end * img];
        with_scratch(s.forward_scratch(), |scratch| {
            for (i, (yg, xg)) in yr.chunks_mut(p.group * out).zip(xr.chunks(p.group * img)).enumerate() {
                forward_group(p, s.oh, s.ow, &u, b, xg, yg, scratch);
                if relu {
                    relu_in_place(yg, &mut lr[i * p.group * out..][..yg.len()]);
                }
            }
        });
    });
    y
}

/// The conv's backward: dx (N, C, H, W) (or (0, C, H, W) without `input_grad`) and each
/// thread range's (dW, db), in range order, for `Conv2d::add_range_sums`. x (N, C, H, W) is the
/// forward's input and `padded` the padded images it kept; `live` the fused ReLU's mask from
/// the forward (each group's dy is masked by it first), or empty.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(
    g: &ConvGeometry,
    wt: &[T],
    oc: usize,
    x: &[T],
    padded: &[T],
    dy: &[T],
    live: &[bool],
    n: usize,
    input_grad: bool,
) -> (Tensor<T>, RangeSums<T>) {
    let s = Shape::new(g, oc, n);
    let p = &s.plan;
    let copies = s.frame.copies();
    let xp = if copies { padded } else { x };
    let (img, imgp, out) = (g.c * g.h * g.w, p.c * p.h * p.w, oc * s.oh * s.ow);
    assert_eq!(xp.len(), n * imgp, "winograd_conv: the forward did not keep the padded images");
    let u = transform_weights(p, wt);
    let mut dx = zeros(&[if input_grad { n } else { 0 }, g.c, g.h, g.w]);
    let ranges = batch_ranges(n, rayon::current_num_threads());
    let dx_parts = split_by_ranges(slice_mut(&mut dx), &ranges, if input_grad { img } else { 0 });
    let partials = ranges
        .par_iter()
        .zip(dx_parts)
        .map(|(r, dx_part)| {
            let (mut mw, mut db) = (zero_vec(16 * oc * g.c), zero_vec(oc));
            let dx_range = input_grad.then_some(dx_part);
            let mut masked = zero_vec(if live.is_empty() { 0 } else { p.group * out });
            with_scratch(backward_scratch(p), |scratch| {
                s.frame.for_each_group(r.clone(), p.group, dx_range, |first, gs, dxg| {
                    let (xg, mut dyg) = (&xp[first * imgp..][..gs * imgp], &dy[first * out..][..gs * out]);
                    if !live.is_empty() {
                        mask_into(dyg, &live[first * out..][..gs * out], &mut masked[..gs * out]);
                        dyg = &masked[..gs * out];
                    }
                    backward_group(p, s.oh, s.ow, &u, xg, dyg, &mut mw, &mut db, dxg, scratch);
                });
            });
            let mut dw = zero_vec(oc * g.c * 9);
            finish_weight_grad(p, &mw, &mut dw);
            (dw, db)
        })
        .collect();
    (dx, partials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::winograd::tests::{fill, rel};
    use crate::layers::{Ctx, Isa, Layer};
    use crate::tensor::{from_vec, slice};

    /// A conv with random weights, Winograd on or off.
    fn conv<T: Float>(c: usize, oc: usize, pad: (usize, usize), winograd: bool) -> Conv2d<T> {
        let mut l = Conv2d::<T>::new(c, oc, 3, 1, pad);
        l.winograd = winograd;
        l.weight.value = from_vec(&[oc, c, 3, 3], fill(oc * c * 9, 5));
        l.bias.value = from_vec(&[oc], fill(oc, 6));
        l
    }

    /// Which convs take this path: 3x3, stride 1, any padding, several channels, a conv plane
    /// of at least 2x2.
    #[test]
    fn applies_to_3x3_stride_1_convs_of_several_channels() {
        let yes: [(Conv2d<f32>, &[usize]); 4] = [
            (Conv2d::new(2, 4, 3, 1, 0), &[1, 2, 4, 4]),
            (Conv2d::new(3, 4, 3, 1, 1), &[2, 3, 2, 2]),
            (Conv2d::new(8, 4, 3, 1, (0, 2)), &[1, 8, 4, 1]),
            (Conv2d::new(2, 1, 3, 1, 0), &[1, 2, 5, 4]),
        ];
        for (i, (c, x)) in yes.iter().enumerate() {
            assert!(applies(c, x), "case {i}: {x:?}");
        }
        let no: [(Conv2d<f32>, &[usize]); 7] = [
            (Conv2d::new(1, 4, 3, 1, 1), &[1, 1, 8, 8]),
            (Conv2d::new(2, 4, 5, 1, 2), &[1, 2, 8, 8]),
            (Conv2d::new(2, 4, (3, 1), 1, 0), &[1, 2, 8, 8]),
            (Conv2d::new(2, 4, 3, 2, 1), &[1, 2, 8, 8]),
            (Conv2d::new(2, 4, 3, (1, 2), 1), &[1, 2, 8, 8]),
            (Conv2d::new(2, 4, 3, 1, 0), &[1, 2, 3, 8]),
            (Conv2d::new(2, 4, 3, 1, 0), &[1, 2, 8, 3]),
        ];
        for (i, (c, x)) in no.iter().enumerate() {
            assert!(!applies(c, x), "case {i}: {x:?}");
        }
        assert!(!applies(&Conv2d::<f32>::new(2, 4, 3, 1, 0), &[2, 8, 8]), "not NCHW");
    }

    /// The Winograd conv gives what im2col + GEMM gives, forward and backward (dx, dW, db):
    /// the stride-2 spec's third conv, even and odd planes (an extra tile row, column or both),
    /// padding on one axis or none, a plane of one tile, several groups in a thread's range.
    #[test]
    fn winograd_conv_matches_im2col() {
        // (n, c, oc, h, w, padding)
        let shapes = [
            (5, 64, 128, 8, 8, (1, 1)),
            (3, 3, 5, 7, 9, (1, 1)),
            (4, 2, 3, 6, 5, (0, 0)),
            (2, 4, 1, 9, 4, (0, 2)),
            (3, 2, 2, 2, 2, (1, 1)),
            (33, 3, 4, 4, 4, (0, 0)),
            (2, 2, 3, 30, 31, (2, 1)),
            // 256 tiles an image: groups of one, so each thread's range holds several groups,
            // each writing its own images' padded dx.
            (8, 2, 3, 32, 31, (1, 1)),
        ];
        for (n, c, oc, h, w, pad) in shapes {
            let shape = [n, c, h, w];
            assert!(applies(&conv::<f64>(c, oc, pad, true), &shape), "{shape:?}");
            let x = from_vec(&shape, fill::<f64>(n * c * h * w, 7));
            let (mut a, mut b) = (conv::<f64>(c, oc, pad, true), conv::<f64>(c, oc, pad, false));
            let (ya, yb) = (a.forward(&x, Ctx::train(0)), b.forward(&x, Ctx::train(0)));
            assert_eq!(ya.shape(), yb.shape());
            assert!(rel(slice(&yb), slice(&ya)) < 1e-12, "{shape:?} pad {pad:?} y");
            let dy = from_vec(ya.shape(), fill::<f64>(ya.len(), 8));
            let (dxa, dxb) = (a.backward(&dy), b.backward(&dy));
            assert!(rel(slice(&dxb), slice(&dxa)) < 1e-12, "{shape:?} pad {pad:?} dx");
            let (ga, gb) = (&a.weight.grad, &b.weight.grad);
            assert!(rel(slice(gb), slice(ga)) < 1e-12, "{shape:?} pad {pad:?} dW");
            let (ga, gb) = (&a.bias.grad, &b.bias.grad);
            assert!(rel(slice(gb), slice(ga)) < 1e-12, "{shape:?} pad {pad:?} db");

            // f32: rounded differently, so close only; a second forward reuses the buffers.
            let x = from_vec(&shape, fill::<f32>(n * c * h * w, 7));
            let (mut a, mut b) = (conv::<f32>(c, oc, pad, true), conv::<f32>(c, oc, pad, false));
            let (ya, yb) = (a.forward(&x, Ctx::train(0)), b.forward(&x, Ctx::train(0)));
            assert!(rel(slice(&yb), slice(&ya)) < 1e-5, "f32 {shape:?}: {:.2e}", rel(slice(&yb), slice(&ya)));
        }
    }

    /// Without `input_grad` the backward gives the same dW and db and an empty dx; and a conv
    /// that ran forward and backward on another size first (its padded images and scratch then
    /// hold that size's numbers) gives the same as a fresh one.
    #[test]
    fn backward_without_dx_and_after_another_size() {
        let (c, oc, pad) = (3, 4, (1, 1));
        let (mut a, mut b) = (conv::<f64>(c, oc, pad, true), conv::<f64>(c, oc, pad, false));
        a.input_grad = false;
        let big = from_vec(&[4, c, 9, 10], fill::<f64>(4 * c * 90, 3));
        let y = a.forward(&big, Ctx::train(0));
        a.backward(&from_vec(y.shape(), fill::<f64>(y.len(), 5)));
        for p in a.params_mut() {
            p.grad.fill(0.0);
        }
        let x = from_vec(&[3, c, 6, 7], fill::<f64>(3 * c * 42, 4));
        let ya = a.forward(&x, Ctx::train(0));
        b.forward(&x, Ctx::train(0));
        let dy = from_vec(ya.shape(), fill::<f64>(ya.len(), 9));
        let (dxa, _) = (a.backward(&dy), b.backward(&dy));
        assert_eq!(dxa.shape(), &[0, c, 6, 7]);
        assert!(rel(slice(&b.weight.grad), slice(&a.weight.grad)) < 1e-12);
        assert!(rel(slice(&b.bias.grad), slice(&a.bias.grad)) < 1e-12);
    }

    /// The AVX-512 and AVX2 builds of the group forward and backward give the portable
    /// build's bits, each checked where the CPU runs it (an AVX-512 CPU runs both).
    #[test]
    fn vector_builds_match_portable_bit_for_bit() {
        crate::layers::check_each_vector_isa("its plain Winograd conv build", build_matches_portable);
    }

    fn build_matches_portable(build: Isa) {
        // An odd plane (7x9: an extra tile row and column) with padding 1.
        let (c, oc, h, w) = (5, 7, 7, 9);
        let g = ConvGeometry::new(c, h, w, 3, 3, 1, 1);
        let s = Shape::new(&g, oc, 3);
        let p = &s.plan;
        let n = p.group;
        let u = transform_weights(p, &fill::<f32>(oc * c * 9, 1));
        let bias = fill::<f32>(oc, 2);
        let mut padded = Vec::new();
        let x = fill::<f32>(n * c * h * w, 3);
        let xp = s.frame.input(&x, &mut padded).to_vec();
        let out = n * oc * s.oh * s.ow;
        let mut scratch = vec![0.0; s.forward_scratch()];
        let (mut y1, mut y2) = (vec![0.0; out], vec![0.0; out]);
        forward_group_on(build, p, s.oh, s.ow, &u, &bias, &xp, &mut y1, &mut scratch);
        forward_group_impl(p, s.oh, s.ow, &u, &bias, &xp, &mut y2, &mut scratch);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y1), bits(&y2), "{build:?} forward");
        assert!(y1.iter().all(|v| *v != 0.0), "every output written");

        let dy = fill::<f32>(out, 4);
        let mut scratch = vec![0.0; backward_scratch(p)];
        let (mut mw1, mut mw2) = (vec![0.0; 16 * oc * c], vec![0.0; 16 * oc * c]);
        let (mut dx1, mut dx2) = (vec![0.0; xp.len()], vec![0.0; xp.len()]);
        let (mut db1, mut db2) = (vec![0.0; oc], vec![0.0; oc]);
        backward_group_on(build, p, s.oh, s.ow, &u, &xp, &dy, &mut mw1, &mut db1, Some(&mut dx1), &mut scratch);
        backward_group_impl(p, s.oh, s.ow, &u, &xp, &dy, &mut mw2, &mut db2, Some(&mut dx2), &mut scratch);
        assert_eq!(bits(&mw1), bits(&mw2), "{build:?} backward dW");
        assert_eq!(bits(&db1), bits(&db2), "{build:?} backward db");
        assert_eq!(bits(&dx1), bits(&dx2), "{build:?} backward dx");
        assert!(dx1.iter().any(|&v| v != 0.0) && mw1.iter().any(|&v| v != 0.0));
    }
}
