//! The fused block by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, 2015):
//! Conv2d(C -> OC, 3x3, stride 1, no padding) + ReLU + MaxPool2d(2, 2), with 2.25 times fewer
//! multiplications than im2col + GEMM. Its 2x2 output tiles are exactly the pooling windows, so
//! each tile is pooled the moment it is formed. The backward (dW and dx) is the same algorithm
//! run in reverse, on the same tiles (see "Backward" below). `conv_block.rs` runs both for
//! every block but the first, except on large maps, where `winograd4.rs`'s F(4x4, 3x3) takes
//! the backward (2x2 tiles of four windows or more) and the forward (4x4 tiles or more)
//! instead; the results agree with its im2col + GEMM path up to rounding, and pick the same
//! winners (tests check it).
//!
//! Shapes, per image: x (C, H, W) -> conv (OC, OH, OW) = (H-2, W-2) -> y (OC, PH, PW) =
//! (OH/2, OW/2). Tile (i, j) is pooling window (i, j): conv rows 2i, 2i+1, columns 2j, 2j+1,
//! computed from the 4x4 input patch d at rows 2i..2i+4, columns 2j..2j+4 of each channel.
//!
//! The math. For one channel and one 3x3 filter g, the 2x2 outputs of the patch d are
//!   Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A
//! with
//!   B^T = | 1  0 -1  0 |    G = | 1    0    0  |    A^T = | 1  1  1  0 |
//!         | 0  1  1  0 |        | 1/2  1/2  1/2 |          | 0  1 -1 -1 |
//!         | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
//!         | 0  1  0 -1 |        | 0    0    1  |
//! Summed over input channels, the 16 elementwise products become 16 matrix products:
//!   U[xi] (OC, C) = (G g G^T)[xi]   for every (o, c)        filter transform
//!   V[xi] (C, T)  = (B^T d B)[xi]   for every (c, tile)     input transform
//!   M[xi] (OC, T) = U[xi] V[xi]                            16 GEMMs, K = C
//!   Y (2x2)       = A^T M A         for every (o, tile)     output transform, + bias
//! 16*OC*C*T multiplies instead of 36*OC*C*T (4 outputs x 9 taps per tile).
//!
//! Each transform is applied one dimension at a time, on runs over the tiles so the compiler
//! can vectorise them: the output transform over all T tiles of an image at once; the input
//! transform along each input row first (tile j reads columns 2j .. 2j+4), keeping even and
//! odd rows apart, so that its second step is four contiguous runs over all tiles too.
//!
//! File order: the forward (filter, input and output transforms, then a group of images), the
//! backward (its adjoint), and the tests.

use rayon::prelude::*;

use super::conv2d::ConvGeometry;
use super::conv_block::{conv3x3_pool2, pool_window, DEAD};
use super::gemm::{gemm_nn, gemm_nt};
use super::{Conv2d, MaxPool2d};
use crate::tensor::{sum, zero_vec, Float};

/// Elements of a transformed tile (4x4), and so the number of GEMMs each way: xi = 4a + b.
pub const XI: usize = 16;

/// Whether this path computes the block for input shape (N, C, H, W): a 3x3, stride-1,
/// unpadded conv of several channels (one channel is `direct_conv.rs`'s) with 2x2 pooling.
pub fn applies<T: Float>(conv: &Conv2d<T>, pool: &MaxPool2d, input: &[usize]) -> bool {
    conv3x3_pool2(conv, pool, input) && input[1] > 1
}

/// Sizes of one image, how many images share a GEMM, and where each tile sits.
#[derive(Clone, Debug)]
pub struct Plan {
    pub c: usize,
    pub oc: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    ow: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
    /// Images per group: enough that each GEMM has at least 256 columns (tiles), but no more
    /// than each thread's share of the batch (the last block has only 4 tiles per image).
    pub group: usize,
    /// Per tile k = i*PW + j: its top-left conv position 2i*OW + 2j (where the winners point)
    /// and its top-left pixel 2i*W + 2j (where its input patch starts).
    corner: Vec<u32>,
    origin: Vec<usize>,
}

impl Plan {
    pub fn new(g: &ConvGeometry, oc: usize, n: usize) -> Self {
        let (ph, pw) = (g.oh / 2, g.ow / 2);
        let group = 256usize.div_ceil(ph * pw).clamp(1, n.div_ceil(rayon::current_num_threads()).max(1));
        let corner = (0..ph * pw).map(|k| (2 * (k / pw) * g.ow + 2 * (k % pw)) as u32).collect();
        let origin = (0..ph * pw).map(|k| 2 * (k / pw) * g.w + 2 * (k % pw)).collect();
        Plan { c: g.c, oc, h: g.h, w: g.w, ow: g.ow, ph, pw, group, corner, origin }
    }
    /// Tiles (pooling windows) per image.
    pub fn tiles(&self) -> usize {
        self.ph * self.pw
    }
    /// Floats of scratch for one group's forward: V (16, C, G*T), M (16, OC, G*T), one
    /// filter's pooled values over the group's G*T tiles before they go to their images, and
    /// one channel's row transform (2 parities, 4, PH+1, PW). The winners take G*T more u32s.
    pub fn forward_scratch(&self) -> usize {
        let n = self.group * self.tiles();
        16 * (self.c + self.oc) * n + n + 8 * (self.ph + 1) * self.pw
    }
}

/// U (OC, 16, C) = G g G^T for every filter g = W[o][c] (3x3), xi = 4a + b: filter by filter
/// (each in parallel); U[xi] (OC, C) is then the rows xi*C.. of every filter's block, which
/// `gemm_nn` reads by strides (16C between rows), as U[xi] or as U[xi]^T.
pub fn transform_weights<T: Float>(p: &Plan, w: &[T]) -> Vec<T> {
    let half = T::f(0.5);
    // G g for a column (g0, g1, g2): the four rows of G applied to it.
    let g4 = |g0: T, g1: T, g2: T| [g0, half * (g0 + g1 + g2), half * (g0 - g1 + g2), g2];
    let mut u = zero_vec(16 * p.oc * p.c);
    u.par_chunks_mut(16 * p.c).zip(w.par_chunks(9 * p.c)).for_each(|(uo, wo)| {
        for (c, g) in wo.chunks_exact(9).enumerate() {
            // t = G g (4x3): transform each of the 3 columns.
            let cols = [g4(g[0], g[3], g[6]), g4(g[1], g[4], g[7]), g4(g[2], g[5], g[8])];
            for a in 0..4 {
                // Row a of (G g) G^T = G applied to row a of t.
                let row = g4(cols[0][a], cols[1][a], cols[2][a]);
                for (b, &v) in row.iter().enumerate() {
                    uo[(4 * a + b) * p.c + c] = v;
                }
            }
        }
    });
    u
}

/// B^T along one input row for every tile column j < PW: dst[b * plane + at + j] = (B^T d)[b]
/// with d = row[2j .. 2j + 4] (`row` holds 2*PW + 2 pixels): d0 - d2, d1 + d2, d2 - d1,
/// d1 - d3. By the AVX-512 kernel below where `gemm::kernels_run` (fifteen tiles per step, the
/// same operations, so the same bits), else one tile at a time: a row has too few tiles (14, 6
/// and 2 in the reference) for the compiler's vector loop.
#[inline(always)]
fn row_transform<T: Float>(row: &[T], pw: usize, dst: &mut [T], plane: usize, at: usize) {
    assert!(row.len() >= 2 * pw + 2 && (pw == 0 || dst.len() >= 3 * plane + at + pw), "row_transform: short slices");
    #[cfg(target_arch = "x86_64")]
    if super::gemm::kernels_run::<T>() {
        // SAFETY: T is f32 (`kernels_run`) and the CPU has AVX-512F; the lengths were checked.
        unsafe { avx512::row_transform(super::gemm::f32s(row), pw, super::gemm::f32s_mut(dst), plane, at) };
        return;
    }
    row_transform_portable(row, pw, dst, plane, at);
}

/// `row_transform` one tile at a time: the definition the kernel is tested against.
#[inline(always)]
fn row_transform_portable<T: Float>(row: &[T], pw: usize, dst: &mut [T], plane: usize, at: usize) {
    let (r0, rest) = dst[at..].split_at_mut(plane);
    let (r1, rest) = rest.split_at_mut(plane);
    let (r2, r3) = rest.split_at_mut(plane);
    // Iterators rather than indices: no bounds check per element.
    let outs = r0[..pw].iter_mut().zip(&mut r1[..pw]).zip(r2[..pw].iter_mut().zip(&mut r3[..pw]));
    for (((o0, o1), (o2, o3)), (a, b)) in outs.zip(row.chunks_exact(2).zip(row[2..].chunks_exact(2))) {
        let (d0, d1, d2, d3) = (a[0], a[1], b[0], b[1]);
        (*o0, *o1, *o2, *o3) = (d0 - d2, d1 + d2, d2 - d1, d1 - d3);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Tiles per step: tile j of a step reads pixels 2j .. 2j + 4 of the 32 in two registers.
    const STEP: usize = 15;

    /// `row_transform` for f32, fifteen tiles at a time: the step's pixels in two registers
    /// (masked loads: nothing past the row is read), each tile's four taps gathered into lanes
    /// by `permutex2var`, and masked stores of the step's tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) fn row_transform(row: &[f32], pw: usize, dst: &mut [f32], plane: usize, at: usize) {
        assert!(
            row.len() >= 2 * pw + 2 && (pw == 0 || dst.len() >= 3 * plane + at + pw),
            "row_transform: short slices"
        );
        // Lane j of tap q reads pixel 2j + q (lane 15, past the step's tiles, is not stored).
        let tap = |q: i32| {
            let l = |j: i32| 2 * j + q;
            _mm512_setr_epi32(
                l(0),
                l(1),
                l(2),
                l(3),
                l(4),
                l(5),
                l(6),
                l(7),
                l(8),
                l(9),
                l(10),
                l(11),
                l(12),
                l(13),
                l(14),
                0,
            )
        };
        let idx = [tap(0), tap(1), tap(2), tap(3)];
        let lanes = |k: usize| -> u16 { ((1u32 << k.min(16)) - 1) as u16 };
        let mut j0 = 0;
        while j0 < pw {
            let tiles = (pw - j0).min(STEP);
            let len = 2 * tiles + 2; // pixels this step reads
            let src = row[2 * j0..].as_ptr();
            // SAFETY: the masks cover the step's `len` pixels, inside `row` (asserted above); a
            // lane the mask leaves out is not read (the second pointer may lie past the row).
            let (lo, hi) = unsafe {
                (
                    _mm512_maskz_loadu_ps(lanes(len), src),
                    _mm512_maskz_loadu_ps(lanes(len.saturating_sub(16)), src.wrapping_add(16)),
                )
            };
            let d0 = _mm512_permutex2var_ps(lo, idx[0], hi);
            let d1 = _mm512_permutex2var_ps(lo, idx[1], hi);
            let d2 = _mm512_permutex2var_ps(lo, idx[2], hi);
            let d3 = _mm512_permutex2var_ps(lo, idx[3], hi);
            let r = [_mm512_sub_ps(d0, d2), _mm512_add_ps(d1, d2), _mm512_sub_ps(d2, d1), _mm512_sub_ps(d1, d3)];
            let dst = dst[at + j0..].as_mut_ptr();
            for (b, v) in r.into_iter().enumerate() {
                // SAFETY: lanes 0..tiles of row b: dst[at + j0 + b plane ..][..tiles], inside `dst`.
                unsafe { _mm512_mask_storeu_ps(dst.add(b * plane), lanes(tiles), v) };
            }
            j0 += tiles;
        }
    }
}

/// V (16, C, ld) for one image's tiles, written at column offset `at` of each row. `rows` is
/// scratch for one channel's row transform, 8 * (PH+1) * PW floats.
///
/// First B^T along each input row r, for every tile column j (d = x[r][2j .. 2j+4]):
///   R[0] = d0 - d2,  R[1] = d1 + d2,  R[2] = d2 - d1,  R[3] = d1 - d3,
/// kept apart for even and odd rows (re, ro: (4, PH+1, PW)), so that rows 2i, 2i+1, 2i+2, 2i+3
/// of every tile row i are re[t], ro[t], re[t + PW], ro[t + PW] with t = i*PW + j. Then B^T
/// along the columns is four contiguous runs over all T tiles at once.
#[inline(always)]
pub(super) fn transform_input<T: Float>(p: &Plan, x: &[T], v: &mut [T], ld: usize, at: usize, rows: &mut [T]) {
    let (pw, t) = (p.pw, p.tiles());
    let half = (p.ph + 1) * pw; // one b of re or ro
    let (re, ro) = rows[..8 * half].split_at_mut(4 * half);
    for c in 0..p.c {
        let xc = &x[c * p.h * p.w..][..p.h * p.w];
        for r in 0..2 * p.ph + 2 {
            let xr = &xc[r * p.w..][..2 * pw + 2];
            let dst = if r % 2 == 0 { &mut *re } else { &mut *ro };
            row_transform(xr, pw, dst, half, (r / 2) * pw);
        }
        for b in 0..4 {
            let (e0, e1) = (&re[b * half..][..t], &re[b * half + pw..][..t]); // rows 2i, 2i+2
            let (o0, o1) = (&ro[b * half..][..t], &ro[b * half + pw..][..t]); // rows 2i+1, 2i+3
            let row = |a: usize| ((4 * a + b) * p.c + c) * ld + at;
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            for (k, dst) in v[r0..r0 + t].iter_mut().enumerate() {
                *dst = e0[k] - e1[k];
            }
            for (k, dst) in v[r1..r1 + t].iter_mut().enumerate() {
                *dst = o0[k] + e1[k];
            }
            for (k, dst) in v[r2..r2 + t].iter_mut().enumerate() {
                *dst = e1[k] - o0[k];
            }
            for (k, dst) in v[r3..r3 + t].iter_mut().enumerate() {
                *dst = o0[k] - o1[k];
            }
        }
    }
}

/// The 2x2 conv outputs of tile k, + bias, from s[xi] = M[xi] of one filter as runs over the
/// tiles: u = A^T M (2x4), then u A. In the order c00, c01, c10, c11.
#[inline(always)]
pub(super) fn tile_outputs<T: Float>(s: &[&[T]; 16], k: usize, bias: T) -> [T; 4] {
    let u0 = [
        s[0][k] + s[4][k] + s[8][k],
        s[1][k] + s[5][k] + s[9][k],
        s[2][k] + s[6][k] + s[10][k],
        s[3][k] + s[7][k] + s[11][k],
    ];
    let u1 = [
        s[4][k] - s[8][k] - s[12][k],
        s[5][k] - s[9][k] - s[13][k],
        s[6][k] - s[10][k] - s[14][k],
        s[7][k] - s[11][k] - s[15][k],
    ];
    [
        u0[0] + u0[1] + u0[2] + bias,
        u0[1] - u0[2] - u0[3] + bias,
        u1[0] + u1[1] + u1[2] + bias,
        u1[1] - u1[2] - u1[3] + bias,
    ]
}

/// M[xi] (OC, n) = U[xi] (OC, C) V[xi] (C, n) for each of the `xi` transformed elements (16
/// here, 36 in `winograd4.rs`): the products of a forward. U is (OC, xi, C), as
/// `transform_weights` stores it, so U[xi]'s rows are xi*C apart.
#[inline(always)]
pub(super) fn multiply<T: Float>(xi: usize, oc: usize, c: usize, u: &[T], v: &[T], n: usize, m: &mut [T]) {
    for k in 0..xi {
        let (uk, vk, mk) = (&u[k * c..], &v[k * c * n..][..c * n], &mut m[k * oc * n..][..oc * n]);
        gemm_nn(oc, n, c, uk, xi * c, 1, vk, mk); // M[k] = U[k] V[k]
    }
}

/// y (G, OC, PH, PW) and winners for a group of G images, from M (16, OC, G*T): A^T M A per
/// tile, + bias, then pool and ReLU exactly as `conv_block.rs` does (candidates in row-major
/// order, a later one wins only if `!(v <= best)`, dead if the best is <= 0). Each filter's
/// transform runs over the whole group's tiles at once, into `vals` and `wins` (the winner's
/// offset in its window), and then each image's T values go to their place: a vector loop even
/// where an image has only 4 tiles (the last reference block; per image it was scalar code,
/// a third of that block's forward).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transform_output<T: Float>(
    p: &Plan,
    m: &[T],
    gs: usize,
    b: &[T],
    y: &mut [T],
    arg: &mut [u32],
    vals: &mut [T],
    wins: &mut [u32],
) {
    let (t, n) = (p.tiles(), gs * p.tiles());
    let offs = [0, 1, p.ow as u32, p.ow as u32 + 1];
    let (vals, wins) = (&mut vals[..n], &mut wins[..n]);
    for o in 0..p.oc {
        // s[4a + b]: M[4a + b] for this filter, as a run over the group's tiles.
        let s: [&[T]; 16] = std::array::from_fn(|xi| &m[(xi * p.oc + o) * n..][..n]);
        let bias = b[o];
        for k in 0..n {
            (vals[k], wins[k]) = pool_window(tile_outputs(&s, k, bias), offs);
        }
        for i in 0..gs {
            let at = (i * p.oc + o) * t;
            y[at..at + t].copy_from_slice(&vals[i * t..][..t]);
            for ((a, &w), &corner) in arg[at..at + t].iter_mut().zip(&wins[i * t..][..t]).zip(&p.corner[..t]) {
                *a = if w == DEAD { DEAD } else { corner + w };
            }
        }
    }
}

/// Forward for a group of images: xs (G, C, H, W) -> y (G, OC, PH, PW) and winners, given
/// the transformed weights `u` from `transform_weights`; `scratch` of `plan.forward_scratch()`
/// floats and `wins` of G*T.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_group_impl<T: Float>(
    p: &Plan,
    u: &[T],
    b: &[T],
    xs: &[T],
    y: &mut [T],
    arg: &mut [u32],
    scratch: &mut [T],
    wins: &mut [u32],
) {
    let (img, t) = (p.c * p.h * p.w, p.tiles());
    let gs = xs.len() / img;
    let n = gs * t; // columns of V and M: every tile of the group
    let (v, rest) = scratch.split_at_mut(16 * p.c * p.group * t);
    let (m, rest) = rest.split_at_mut(16 * p.oc * p.group * t);
    let (vals, rows) = rest.split_at_mut(p.group * t);
    for (i, x) in xs.chunks_exact(img).enumerate() {
        transform_input(p, x, v, n, i * t, rows);
    }
    multiply(XI, p.oc, p.c, u, v, n, m);
    transform_output(p, m, gs, b, y, arg, vals, wins);
}

vector_builds!(
    /// Forward for a group of images (see `forward_group_impl`), in the widest build the CPU runs.
    pub fn forward_group / forward_group_on = forward_group_impl(
        p: &Plan,
        u: &[T],
        b: &[T],
        xs: &[T],
        y: &mut [T],
        arg: &mut [u32],
        scratch: &mut [T],
        wins: &mut [u32],
    )
);

// ---------------------------------------------------------------------------------------
// Backward, by the adjoint of the same algorithm.
//
// Per tile the forward is linear in the filter g and in the patch d:
//   Y = A^T [ U ⊙ V ] A,   U = G g G^T,   V = B^T d B.
// With dY the tile's 2x2 conv-output gradient and Z = A dY A^T (4x4), the adjoints are
//   dg = G^T [ V ⊙ Z ] G          (the weight gradient, summed over tiles and images)
//   dd = B [ U ⊙ Z ] B^T          (the patch's gradient, scattered back onto dx)
// and summed over channels these become GEMMs again, 16 of each:
//   Mw[xi] (OC, C) = Z[xi] (OC, T) V[xi]^T (T, C)       then dW[o][c] = G^T Mw[o][c] G
//   Md[xi] (C, T)  = U[xi]^T (C, OC) Z[xi] (OC, T)      then dd = B Md B^T per tile
// dY has one nonzero at most: the pooled gradient at the window's winner (r, s) when it was
// alive. Then Z = dy a_r a_s^T with a_0 = (1, 1, 1, 0), a_1 = (0, 1, -1, -1) (A's columns).

/// Column r of A (row r of A^T): the Z pattern of a winner in tile row (or column) r.
const A_COL: [[i8; 4]; 2] = [[1, 1, 1, 0], [0, 1, -1, -1]];

/// Floats of per-thread scratch for the backward of a group: V (16, C, n), Z (16, OC, n),
/// Md (16, C, n), and the row transform or, after it, four runs over the group's tiles.
pub fn backward_scratch(p: &Plan) -> usize {
    let n = p.group * p.tiles();
    16 * (2 * p.c + p.oc) * n + (8 * (p.ph + 1) * p.pw).max(4 * n)
}

/// One group's share of the backward: Mw (16, OC, C) += this group's products (turn it into
/// dW with `finish_weight_grad` once every group is in), db (OC) += the sum of its live
/// windows' dy, and, when `dx` is given, dx (gs, C, H, W) += the group's input gradient.
/// xs (gs, C, H, W), dy and winners (gs, OC, PH, PW); `u` the forward's transformed weights.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group_impl<T: Float>(
    p: &Plan,
    u: &[T],
    xs: &[T],
    dy: &[T],
    arg: &[u32],
    mw: &mut [T],
    db: &mut [T],
    dx: Option<&mut [T]>,
    scratch: &mut [T],
) {
    let (img, out, t) = (p.c * p.h * p.w, p.oc * p.tiles(), p.tiles());
    let gs = xs.len() / img;
    let n = gs * t;
    let (v, rest) = scratch.split_at_mut(16 * p.c * n);
    let (z, rest) = rest.split_at_mut(16 * p.oc * n);
    let (md, rows) = rest.split_at_mut(16 * p.c * n);
    for (i, x) in xs.chunks_exact(img).enumerate() {
        transform_input(p, x, v, n, i * t, rows);
    }
    // Z from the winners, for each filter as runs over the group's tiles: d = the pooled
    // gradient where the window is alive (else 0), fa[a] = A[a][r], fb[b] = A[b][s] for the
    // winner (r, s), and Z[4a + b] = (d fa[a]) fb[b] (products with 1, -1 or 0: exact). The
    // runs cover the whole group, so they are vector loops even where an image has 4 tiles.
    let (rr, rest) = rows.split_at_mut(n); // the row-transform scratch is free again
    let (ss, rest) = rest.split_at_mut(n);
    let (dd, da) = rest.split_at_mut(n);
    let acol = A_COL.map(|col| col.map(|v| T::f(v as f64)));
    // Tile k's top-left conv position 2i*OW + 2j.
    let corner = &p.corner[..t];
    for o in 0..p.oc {
        for i in 0..gs {
            let (dyr, ar) = (&dy[i * out + o * t..][..t], &arg[i * out + o * t..][..t]);
            let (rr, ss, dd) = (&mut rr[i * t..][..t], &mut ss[i * t..][..t], &mut dd[i * t..][..t]);
            // Per tile: d, and the winner's row r and column s (as 0 or 1, in T).
            for k in 0..t {
                let live = ar[k] != DEAD;
                let off = if live { ar[k] - corner[k] } else { 0 }; // one of 0, 1, OW, OW + 1
                let r = off >= p.ow as u32;
                rr[k] = if r { T::one() } else { T::zero() };
                ss[k] = if off - u32::from(r) * p.ow as u32 == 1 { T::one() } else { T::zero() };
                dd[k] = if live { dyr[k] } else { T::zero() };
            }
            db[o] += sum(dd); // the live windows' dy
        }
        for a in 0..4 {
            let (a0, a1) = (acol[0][a], acol[1][a]);
            let da = &mut da[..n];
            for k in 0..n {
                da[k] = dd[k] * if rr[k] > T::zero() { a1 } else { a0 };
            }
            for b in 0..4 {
                let (b0, b1) = (acol[0][b], acol[1][b]);
                let dst = &mut z[((4 * a + b) * p.oc + o) * n..][..n];
                for k in 0..n {
                    dst[k] = da[k] * if ss[k] > T::zero() { b1 } else { b0 };
                }
            }
        }
    }
    grads_from_z(p, u, v, z, gs, mw, dx, md);
}

/// The part of a group's backward that follows Z (16, OC, n), whatever made it (the pooled
/// block's winners here, a plain conv's output gradient in `winograd_conv.rs`): Mw (16, OC, C)
/// += Z V^T, and, when `dx` is given, Md = U^T Z into `md` (16, C, n) and dx (gs, C, H, W) +=
/// B Md B^T per tile. V (16, C, n) is the group's input transform.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn grads_from_z<T: Float>(
    p: &Plan,
    u: &[T],
    v: &[T],
    z: &[T],
    gs: usize,
    mw: &mut [T],
    dx: Option<&mut [T]>,
    md: &mut [T],
) {
    let (img, t) = (p.c * p.h * p.w, p.tiles());
    let n = gs * t;
    for xi in 0..16 {
        let (zk, vk) = (&z[xi * p.oc * n..][..p.oc * n], &v[xi * p.c * n..][..p.c * n]);
        let mwk = &mut mw[xi * p.oc * p.c..][..p.oc * p.c];
        gemm_nt(p.oc, p.c, n, zk, vk, mwk); // Mw[xi] += Z[xi] V[xi]^T
    }
    let Some(dx) = dx else { return };
    let origin = &p.origin[..t]; // tile k's top-left pixel 2i*W + 2j
    for xi in 0..16 {
        let (uk, zk) = (&u[xi * p.c..], &z[xi * p.oc * n..][..p.oc * n]);
        let mdk = &mut md[xi * p.c * n..][..p.c * n];
        gemm_nn(p.c, n, p.oc, uk, 1, 16 * p.c, zk, mdk); // Md[xi] = U[xi]^T Z[xi]
    }
    // dd = B Md B^T per tile, B = (B^T)^T: for a column m of Md, B m = (m0, m1 - m2 + m3,
    // m1 + m2 - m0, -m3), first along a (columns), then along b (rows). dd's element (a, b)
    // lands on dx[c][2i + a][2j + b]; the patches of neighbouring tiles overlap by two.
    let bt = |m0: T, m1: T, m2: T, m3: T| [m0, m1 - m2 + m3, m1 + m2 - m0, -m3];
    let plane = p.h * p.w;
    for i in 0..gs {
        for c in 0..p.c {
            let dxc = &mut dx[i * img + c * plane..][..plane];
            for k in 0..t {
                let m = |a: usize, b: usize| md[((4 * a + b) * p.c + c) * n + i * t + k];
                // (written out: `array::from_fn` here was not inlined and cost 5% of a step)
                let cols = [
                    bt(m(0, 0), m(1, 0), m(2, 0), m(3, 0)),
                    bt(m(0, 1), m(1, 1), m(2, 1), m(3, 1)),
                    bt(m(0, 2), m(1, 2), m(2, 2), m(3, 2)),
                    bt(m(0, 3), m(1, 3), m(2, 3), m(3, 3)),
                ];
                for (a, ((c0, c1), (c2, c3))) in
                    cols[0].iter().zip(&cols[1]).zip(cols[2].iter().zip(&cols[3])).enumerate()
                {
                    let row = bt(*c0, *c1, *c2, *c3);
                    let at = origin[k] + a * p.w;
                    for (b, v) in row.iter().enumerate() {
                        dxc[at + b] += *v;
                    }
                }
            }
        }
    }
}

/// dW (OC, C, 3, 3) += G^T Mw[o][c] G, Mw (16, OC, C) summed over every group.
pub fn finish_weight_grad<T: Float>(p: &Plan, mw: &[T], dw: &mut [T]) {
    let half = T::f(0.5);
    // G^T applied to a 4-vector m: (m0 + (m1 + m2)/2, (m1 - m2)/2, (m1 + m2)/2 + m3).
    let gt = |m: [T; 4]| [m[0] + half * (m[1] + m[2]), half * (m[1] - m[2]), half * (m[1] + m[2]) + m[3]];
    for o in 0..p.oc {
        for c in 0..p.c {
            let m = |a: usize, b: usize| mw[((4 * a + b) * p.oc + o) * p.c + c];
            let cols: [[T; 3]; 4] = std::array::from_fn(|b| gt([m(0, b), m(1, b), m(2, b), m(3, b)]));
            for kh in 0..3 {
                let row = gt([cols[0][kh], cols[1][kh], cols[2][kh], cols[3][kh]]);
                for kw in 0..3 {
                    dw[(o * p.c + c) * 9 + 3 * kh + kw] += row[kw];
                }
            }
        }
    }
}

vector_builds!(
    /// One group's backward (see `backward_group_impl`), in the widest build the CPU runs.
    pub fn backward_group / backward_group_on = backward_group_impl(
        p: &Plan,
        u: &[T],
        xs: &[T],
        dy: &[T],
        arg: &[u32],
        mw: &mut [T],
        db: &mut [T],
        dx: Option<&mut [T]>,
        scratch: &mut [T],
    )
);

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::layers::Isa;
    use crate::layers::{ConvReluPool, Ctx, Layer};
    use crate::tensor::{from_vec, slice};

    /// A deterministic pseudo-random fill in [-1, 1) (`winograd4.rs`'s tests use it too).
    pub(in crate::layers) fn fill<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                T::f(((z >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
            })
            .collect()
    }

    /// `len` floats that end where an inaccessible page begins, so that a kernel reading or
    /// writing one element past them faults (the row kernels' tests: a wider load mask would
    /// read pixels no lane keeps, which values alone cannot show). Linux only; elsewhere, plain
    /// memory with the test saying so.
    pub(in crate::layers) struct Guarded {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        map: (*mut libc::c_void, usize),
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        plain: Vec<f32>,
        at: *mut f32,
        len: usize,
    }

    impl Guarded {
        pub(in crate::layers) fn new(values: &[f32]) -> Self {
            let len = values.len();
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            {
                let page = 4096;
                let data = (4 * len).div_ceil(page) * page;
                // SAFETY: a fresh anonymous mapping of data + one page; the last page loses its
                // access, and the floats are written inside the mapping, ending at that page.
                unsafe {
                    let base = libc::mmap(
                        std::ptr::null_mut(),
                        data + page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    );
                    assert!(base != libc::MAP_FAILED, "mmap failed");
                    let guard = base.cast::<u8>().add(data);
                    assert_eq!(libc::mprotect(guard.cast(), page, libc::PROT_NONE), 0, "mprotect failed");
                    let at = guard.cast::<f32>().sub(len);
                    std::ptr::copy_nonoverlapping(values.as_ptr(), at, len);
                    Guarded { map: (base, data + page), at, len }
                }
            }
            #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
            {
                eprintln!("skipped: no guard page on this platform: reads past a row are not checked");
                let mut plain = values.to_vec();
                let at = plain.as_mut_ptr();
                Guarded { plain, at, len }
            }
        }
        pub(in crate::layers) fn slice(&self) -> &[f32] {
            // SAFETY: `len` floats written in `new`, alive until drop.
            unsafe { std::slice::from_raw_parts(self.at, self.len) }
        }
        pub(in crate::layers) fn slice_mut(&mut self) -> &mut [f32] {
            // SAFETY: as in `slice`, borrowed uniquely.
            unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
        }
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    impl Drop for Guarded {
        fn drop(&mut self) {
            // SAFETY: the mapping `new` made, unmapped once.
            unsafe { libc::munmap(self.map.0, self.map.1) };
        }
    }

    /// Which blocks take Winograd: a 3x3 stride-1 conv (padded or not) with several input
    /// channels, pooled 2x2 with stride 2 in floor mode, on a plane of at least 4x4 once padded.
    /// One channel goes to the direct path instead (its products would be one wide).
    #[test]
    fn applies_to_3x3_convs_of_several_channels_pooled_2x2() {
        let conv = |c: usize, k: usize, s: usize, p: usize| Conv2d::<f32>::new(c, 4, k, s, p);
        let pool2 = MaxPool2d::new(2, 2);
        let yes =
            [(conv(2, 3, 1, 0), [1, 2, 4, 4]), (conv(3, 3, 1, 1), [2, 3, 2, 2]), (conv(8, 3, 1, 2), [1, 8, 9, 5])];
        for (c, x) in &yes {
            assert!(applies(c, &pool2, x), "{x:?} with padding {}", c.padding());
        }
        let no: [(Conv2d<f32>, MaxPool2d, &[usize]); 10] = [
            (conv(1, 3, 1, 0), MaxPool2d::new(2, 2), &[1, 1, 8, 8]),
            (conv(2, 5, 1, 0), MaxPool2d::new(2, 2), &[1, 2, 8, 8]),
            (conv(2, 3, 2, 0), MaxPool2d::new(2, 2), &[1, 2, 8, 8]),
            (conv(2, 3, 1, 0), MaxPool2d::new(3, 2), &[1, 2, 8, 8]),
            (conv(2, 3, 1, 0), MaxPool2d::new(2, 1), &[1, 2, 8, 8]),
            (conv(2, 3, 1, 0), MaxPool2d::with_options(2, 2, 0, true), &[1, 2, 8, 8]),
            (conv(2, 3, 1, 0), MaxPool2d::with_options(2, 2, 1, false), &[1, 2, 8, 8]),
            (conv(2, 3, 1, 0), MaxPool2d::new(2, 2), &[1, 2, 3, 8]),
            (conv(2, 3, 1, 0), MaxPool2d::new(2, 2), &[1, 2, 8, 3]),
            (conv(2, 3, 1, 0), MaxPool2d::new(2, 2), &[2, 8, 8]),
        ];
        for (i, (c, p, x)) in no.iter().enumerate() {
            assert!(!applies(c, p, x), "case {i}: {x:?}");
        }
    }

    /// A block with random weights, Winograd on or off (`winograd4.rs`'s tests use it too).
    pub(in crate::layers) fn block<T: Float>(c: usize, oc: usize, winograd: bool) -> ConvReluPool<T> {
        let mut b = ConvReluPool::new(Conv2d::<T>::new(c, oc, (3, 3), 1, 0), MaxPool2d::new(2, 2));
        b.winograd = winograd;
        b.conv.weight.value = from_vec(&[oc, c, 3, 3], fill(oc * c * 9, 5));
        b.conv.bias.value = from_vec(&[oc], fill(oc, 6));
        b
    }

    /// Largest |a - b| over the largest |a| (`winograd4.rs`'s and `winograd_conv.rs`'s tests
    /// use it too).
    pub(in crate::layers) fn rel<T: Float>(a: &[T], b: &[T]) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0.0f64, |m, v| m.max(v.as_f64().abs())).max(1e-30);
        a.iter().zip(b).fold(0.0f64, |m, (p, q)| m.max((p.as_f64() - q.as_f64()).abs())) / scale
    }

    /// Winograd's forward gives what im2col + GEMM gives and picks the same winners, and its
    /// backward gives the same dx, dW and db: the model's shapes (the last block's in fewer
    /// channels), odd sizes that leave a conv row or column unpooled, groups split unevenly.
    #[test]
    fn winograd_matches_the_gemm_path() {
        // (4, 3, 1, 9, 8) has a single filter (OC = 1), the smallest scratch; (4, 2, 3, 40, 40)
        // has 361 tiles per image, so a group is one image and a thread's range holds several
        // groups, each writing its own images' dx.
        let shapes = [
            (3, 32, 64, 31, 31),
            (9, 64, 128, 14, 14),
            (33, 16, 8, 6, 6),
            (2, 3, 5, 11, 12),
            (5, 2, 3, 10, 13),
            (4, 3, 1, 9, 8),
            (4, 2, 3, 40, 40),
        ];
        for (n, c, oc, h, w) in shapes {
            let shape = [n, c, h, w];
            assert!(applies(&block::<f64>(c, oc, true).conv, &MaxPool2d::new(2, 2), &shape), "{shape:?}");
            let x64 = from_vec(&shape, fill::<f64>(n * c * h * w, 7));
            let (mut a, mut b) = (block::<f64>(c, oc, true), block::<f64>(c, oc, false));
            let (ya, yb) = (a.forward(&x64, Ctx::eval()), b.forward(&x64, Ctx::eval()));
            assert!(rel(slice(&yb), slice(&ya)) < 1e-12, "f64 {shape:?}: {:.2e}", rel(slice(&yb), slice(&ya)));
            let dy = from_vec(ya.shape(), fill::<f64>(ya.len(), 8));
            let (dxa, dxb) = (a.backward(&dy), b.backward(&dy));
            assert!(rel(slice(&dxb), slice(&dxa)) < 1e-12, "f64 {shape:?} dx: {:.2e}", rel(slice(&dxb), slice(&dxa)));
            let (ga, gb) = (&a.conv.weight.grad, &b.conv.weight.grad);
            assert!(rel(slice(gb), slice(ga)) < 1e-12, "f64 {shape:?} dW: {:.2e}", rel(slice(gb), slice(ga)));
            let (ga, gb) = (&a.conv.bias.grad, &b.conv.bias.grad);
            assert!(rel(slice(gb), slice(ga)) < 1e-12, "f64 {shape:?} db: {:.2e}", rel(slice(gb), slice(ga)));

            // f32: the products are rounded differently, so only close.
            let x32 = from_vec(&shape, fill::<f32>(n * c * h * w, 7));
            let (mut a, mut b) = (block::<f32>(c, oc, true), block::<f32>(c, oc, false));
            let (ya, yb) = (a.forward(&x32, Ctx::eval()), b.forward(&x32, Ctx::eval()));
            assert!(rel(slice(&yb), slice(&ya)) < 1e-5, "f32 {shape:?}: {:.2e}", rel(slice(&yb), slice(&ya)));
            assert!(slice(&ya).iter().any(|&v| v > 0.0) && slice(&ya).contains(&0.0), "live and dead windows");
        }
    }

    /// The AVX-512 row transform gives the portable one's bits for rows of 1 to 47 tiles (one
    /// to four steps of fifteen, full and partial); see `check_row_kernel`.
    #[test]
    fn row_kernel_matches_portable_bit_for_bit() {
        check_row_kernel(2, 4, 47, row_transform::<f32>, row_transform_portable::<f32>);
    }

    /// Checks a row transform's AVX-512 kernel (`kernel`, which dispatches to it) against its
    /// portable definition, bit for bit, for rows of 1 to `max` tiles, tile j reading pixels
    /// `step` j .. `step` j + 2 + `step`: the row ends at a page that faults (nothing past it
    /// may be read), and the `outs` output rows have NaN guards around the tiles' entries
    /// (nothing else may be written, and every tile must be).
    pub(in crate::layers) fn check_row_kernel(
        step: usize,
        outs: usize,
        max: usize,
        kernel: fn(&[f32], usize, &mut [f32], usize, usize),
        portable: fn(&[f32], usize, &mut [f32], usize, usize),
    ) {
        if !crate::layers::gemm::kernels_run::<f32>() {
            crate::layers::skip_unless_required(
                "AVX512",
                "no AVX-512F and FMA on this CPU: the row kernel is not checked",
            );
            return;
        }
        for tiles in 1..=max {
            let len = step * tiles + 2;
            let row = Guarded::new(&fill::<f32>(len, tiles as u64));
            let (plane, at) = (tiles + 9, 3);
            let run = |f: fn(&[f32], usize, &mut [f32], usize, usize)| {
                let mut dst = vec![f32::NAN; outs * plane];
                f(row.slice(), tiles, &mut dst, plane, at);
                dst.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let (got, want) = (run(kernel), run(portable));
            assert_eq!(got, want, "{tiles} tiles");
            let nan = |v: &u32| f32::from_bits(*v).is_nan();
            for written in want.chunks_exact(plane) {
                assert!(
                    written[..at].iter().all(nan) && written[at + tiles..].iter().all(nan),
                    "{tiles} tiles: guards"
                );
                assert!(!written[at..at + tiles].iter().any(nan), "{tiles} tiles: every tile written");
            }
        }
    }

    /// The AVX-512 and AVX2 builds of the group forward and backward give the portable
    /// build's bits, each checked where the CPU runs it (an AVX-512 CPU runs both).
    #[test]
    fn vector_builds_match_portable_bit_for_bit() {
        crate::layers::check_each_vector_isa("its Winograd build", build_matches_portable);
    }

    fn build_matches_portable(build: Isa) {
        let (c, oc, h, w) = (5, 7, 12, 15);
        let g = ConvGeometry::new(c, h, w, 3, 3, 1, 0);
        let p = Plan::new(&g, oc, 3);
        let n = p.group; // one whole group (2 or 3 images, as the thread count allows)
        let u = transform_weights(&p, &fill::<f32>(oc * c * 9, 1));
        let (bias, mut x) = (fill::<f32>(oc, 2), fill::<f32>(n * c * h * w, 3));
        x[17] = f32::NAN;
        let out = n * oc * p.tiles();
        let (mut s, mut wins) = (vec![0.0; p.forward_scratch()], vec![0; n * p.tiles()]);
        let (mut y1, mut a1, mut y2, mut a2) = (vec![0.0; out], vec![0; out], vec![0.0; out], vec![0; out]);
        forward_group_on(build, &p, &u, &bias, &x, &mut y1, &mut a1, &mut s, &mut wins);
        forward_group_impl(&p, &u, &bias, &x, &mut y2, &mut a2, &mut s, &mut wins);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y1), bits(&y2), "{build:?} forward y");
        assert_eq!(a1, a2, "{build:?} forward winners");
        assert!(y1.iter().any(|v| v.is_nan()), "the NaN pixel spreads to its windows");

        // Backward, on a NaN-free input so that every number is compared.
        x[17] = 0.25;
        forward_group(&p, &u, &bias, &x, &mut y1, &mut a1, &mut s, &mut wins);
        let dy = fill::<f32>(out, 4);
        let mut s = vec![0.0; backward_scratch(&p)];
        let (mut mw1, mut mw2) = (vec![0.0; 16 * oc * c], vec![0.0; 16 * oc * c]);
        let (mut dx1, mut dx2) = (vec![0.0; n * c * h * w], vec![0.0; n * c * h * w]);
        let (mut db1, mut db2) = (vec![0.0; oc], vec![0.0; oc]);
        backward_group_on(build, &p, &u, &x, &dy, &a1, &mut mw1, &mut db1, Some(&mut dx1), &mut s);
        backward_group_impl(&p, &u, &x, &dy, &a1, &mut mw2, &mut db2, Some(&mut dx2), &mut s);
        assert_eq!(bits(&mw1), bits(&mw2), "{build:?} backward dW");
        assert_eq!(bits(&db1), bits(&db2), "{build:?} backward db");
        assert_eq!(bits(&dx1), bits(&dx2), "{build:?} backward dx");
        assert!(dx1.iter().any(|&v| v != 0.0) && mw1.iter().any(|&v| v != 0.0));
    }
}
