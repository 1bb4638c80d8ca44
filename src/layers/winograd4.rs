//! The fused block by Winograd's F(4x4, 3x3) (Lavin & Gray, 2015): Conv2d(C -> OC, 3x3,
//! stride 1, no padding) + ReLU + MaxPool2d(2, 2), on maps large enough to fill 4x4 output
//! tiles, where it does 1.78 times fewer multiplies than `winograd.rs`'s F(2x2, 3x3): this
//! file is the same algorithm with 4x4 tiles. The backward (dW, db and dx, given the winners
//! of the forward) runs here on maps of at least 2x2 tiles (`pays`); the forward on maps of
//! at least 4x4 tiles (`pays_forward`); `conv_block.rs` picks each way on its own. The
//! gradients are those of the convolution itself, however the forward rounded its values: the
//! winners are the only thing the backward takes from it. Measured against F(2x2) (AMD Zen 4,
//! benches/README.md): the backward of the reference's second and third blocks takes about a
//! third less time (21.9 -> 14.9 and 13.2 -> 8.5 ms); the forward of the second (7x7 tiles)
//! 8-13% less (medians 7.64 -> 7.00 and 6.81 -> 5.91 ms in two runs), of the third (3x3
//! tiles) no less (its output transform, 16 outputs from 36 products per tile, costs what the
//! GEMMs save), and on the last block (one tile per image) both ways were slower, so neither
//! uses it.
//!
//! Shapes, per image: x (C, H, W) -> conv (OC, OH, OW) = (H-2, W-2) -> y (OC, PH, PW) =
//! (OH/2, OW/2). Tile (i, j) is conv rows 4i .. 4i+4 and columns 4j .. 4j+4, that is pooling
//! windows (2i + wi, 2j + wj) for wi, wj in {0, 1}, computed from the 6x6 input patch d at
//! rows 4i .. 4i+6, columns 4j .. 4j+6 of each channel. There are TH x TW = ceil(PH/2) x
//! ceil(PW/2) tiles; where PH or PW is odd the last tiles' second windows do not exist (their
//! gradient is 0). Only the pixels some window reads (rows and columns 0 ..= 2*PH+1,
//! 0 ..= 2*PW+1) are read; the rest of a patch is taken as 0 and gets no gradient.
//!
//! The math. For one channel and one 3x3 filter g, the 4x4 outputs of the patch d are
//!   Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A
//! with
//!   B^T = | 4  0 -5  0  1  0 |    G = |  1/4    0     0   |    A^T = | 1  1  1  1  1  0 |
//!         | 0 -4 -4  1  1  0 |        | -1/6  -1/6  -1/6  |          | 0  1 -1  2 -2  0 |
//!         | 0  4 -4 -1  1  0 |        | -1/6   1/6  -1/6  |          | 0  1  1  4  4  0 |
//!         | 0 -2 -1  2  1  0 |        |  1/24  1/12  1/6  |          | 0  1 -1  8 -8  1 |
//!         | 0  2 -1 -2  1  0 |        |  1/24 -1/12  1/6  |
//!         | 0  4  0 -5  0  1 |        |  0     0     1    |
//! (the interpolation points 0, 1, -1, 2, -2 and infinity): U = G g G^T, V = B^T d B, 36
//! elementwise products per tile, summed over channels as 36 GEMMs, against 144 multiplies
//! per tile of a direct sum. With dY the tile's 4x4 conv-output gradient (one nonzero per
//! pooling window at most: the pooled gradient at the window's winner when it was alive) and
//! Z = A dY A^T (6x6), the adjoints are
//!   dg = G^T [ V ⊙ Z ] G          (the weight gradient, summed over tiles and images)
//!   dd = B [ U ⊙ Z ] B^T          (the patch's gradient, scattered back onto dx)
//! and summed over channels these are GEMMs again, 36 of each:
//!   Mw[xi] (OC, C) = Z[xi] (OC, T) V[xi]^T (T, C)       then dW[o][c] = G^T Mw[o][c] G
//!   Md[xi] (C, T)  = U[xi]^T (C, OC) Z[xi] (OC, T)      then dd = B Md B^T per tile
//! The price is rounding: the transforms' entries reach 8 and 1/24, so in f32 the gradients
//! are further from a direct sum than F(2x2)'s (the tests bound both and say by how much).
//!
//! The forward's outputs, Y = A^T M A per tile with M[xi] = U[xi] V[xi], are pooled four
//! windows to a tile (`pool_tiles`), in the same order and with the same ReLU as every path.
//!
//! Each transform is applied one dimension at a time, on runs over the tiles so the compiler
//! can vectorise them: the input transform along each input row first (tile j reads columns
//! 4j .. 4j+6; `row_transform`), keeping rows apart by their remainder mod 4, so that its
//! second step is six contiguous runs over all tiles; Z and dd as runs over the group's tiles,
//! dd's last step along each patch row with the scatter onto dx (`add_patch_row`). Where a row
//! has too few tiles for the compiler's vector loops (7 in the reference), `row_transform`
//! and `add_patch_row` run AVX-512 kernels (the `avx512` module) that give the portable
//! code's bits.

use rayon::prelude::*;

use super::conv2d::ConvGeometry;
use super::conv_block::{pool_window, sum_live, DEAD};
use super::gemm::{gemm_nn, gemm_nt};
use crate::tensor::{zero_vec, Float};

/// Elements of a transformed tile (6x6), and so the number of GEMMs each way: xi = 6a + b.
pub const XI: usize = 36;

/// Whether this backward pays on a block whose unpadded conv has geometry `g` (the F(2x2)
/// path's shapes, `winograd::applies`): at least 2x2 tiles per image, and at most 3/4 of
/// F(2x2)'s multiplies once the windows that odd PH or PW leave empty are counted.
pub fn pays(g: &ConvGeometry) -> bool {
    let (ph, pw) = (g.oh / 2, g.ow / 2);
    let tiles = ph.div_ceil(2) * pw.div_ceil(2);
    tiles >= 4 && 4 * XI * tiles <= 3 * super::winograd::XI * ph * pw
}

/// Where a pooling window's gradient goes: its top-left conv position 2pi*OW + 2pj (where
/// the winners point), its tile (pi/2, pj/2) as an index, and the entry 4R + S of that tile's
/// 4x4 dY at the window's top-left, R = 2(pi%2), S = 2(pj%2) (its winner adds 4r + s).
#[derive(Clone, Copy, Debug)]
struct Window {
    corner: u32,
    tile: u32,
    entry: u32,
}

/// Sizes of one image, how many images share a GEMM, and where each tile sits.
#[derive(Clone, Debug)]
pub struct Plan {
    pub c: usize,
    pub oc: usize,
    h: usize,
    w: usize,
    ow: usize,
    ph: usize,
    pw: usize,
    /// Tile rows and columns: ceil(PH/2), ceil(PW/2).
    th: usize,
    tw: usize,
    /// Images per group: enough that each GEMM has at least 64 columns (tiles), but no more
    /// than each thread's share of the batch.
    pub group: usize,
    /// Every pooling window, in the pooled plane's order (pi*PW + pj).
    windows: Vec<Window>,
}

impl Plan {
    pub fn new(g: &ConvGeometry, oc: usize, n: usize) -> Self {
        let (ph, pw) = (g.oh / 2, g.ow / 2);
        let (th, tw) = (ph.div_ceil(2), pw.div_ceil(2));
        let group = 64usize.div_ceil(th * tw).clamp(1, n.div_ceil(rayon::current_num_threads()).max(1));
        let windows = (0..ph * pw)
            .map(|q| (q / pw, q % pw))
            .map(|(pi, pj)| Window {
                corner: (2 * pi * g.ow + 2 * pj) as u32,
                tile: ((pi / 2) * tw + pj / 2) as u32,
                entry: (8 * (pi % 2) + 2 * (pj % 2)) as u32,
            })
            .collect();
        Plan { c: g.c, oc, h: g.h, w: g.w, ow: g.ow, ph, pw, th, tw, group, windows }
    }
    /// Tiles (2x2 blocks of pooling windows) per image.
    pub fn tiles(&self) -> usize {
        self.th * self.tw
    }
    /// Floats of one channel's row transform: 4 row phases x 6 x (TH+1, TW), and one input
    /// row padded to the 4*TW+2 columns the tiles read.
    fn rows_scratch(&self) -> usize {
        24 * (self.th + 1) * self.tw + 4 * self.tw + 2
    }
}

/// G applied to a column (g0, g1, g2) of a filter: the six rows of G above.
#[inline(always)]
fn g6<T: Float>(g0: T, g1: T, g2: T) -> [T; 6] {
    let (sixth, twelfth, q24) = (T::f(1.0 / 6.0), T::f(1.0 / 12.0), T::f(1.0 / 24.0));
    let (s, e, o) = (g0 + g2, q24 * g0 + sixth * g2, twelfth * g1);
    [T::f(0.25) * g0, -(sixth * (s + g1)), -(sixth * (s - g1)), e + o, e - o, g2]
}

/// B^T applied to six values d of a patch row or column.
#[inline(always)]
fn bt6<T: Float>(d: [T; 6]) -> [T; 6] {
    let (four, two, five) = (T::f(4.0), T::f(2.0), T::f(5.0));
    let (s34, d42, d31) = (d[3] + d[4], d[4] - d[2], d[3] - d[1]);
    [
        four * d[0] - five * d[2] + d[4],
        s34 - four * (d[1] + d[2]),
        (d[4] - d[3]) + four * (d[1] - d[2]),
        d42 + two * d31,
        d42 - two * d31,
        four * d[1] - five * d[3] + d[5],
    ]
}

/// U (OC, 36, C) = G g G^T for every filter g = W[o][c] (3x3), xi = 6a + b: filter by filter,
/// each in parallel (the layout `winograd::transform_weights` describes).
pub fn transform_weights<T: Float>(p: &Plan, w: &[T]) -> Vec<T> {
    let mut u = zero_vec(XI * p.oc * p.c);
    u.par_chunks_mut(XI * p.c).zip(w.par_chunks(9 * p.c)).for_each(|(uo, wo)| {
        for (c, g) in wo.chunks_exact(9).enumerate() {
            // t = G g (6x3): transform each of the 3 columns.
            let cols = [g6(g[0], g[3], g[6]), g6(g[1], g[4], g[7]), g6(g[2], g[5], g[8])];
            for a in 0..6 {
                // Row a of (G g) G^T = G applied to row a of t.
                let row = g6(cols[0][a], cols[1][a], cols[2][a]);
                for (b, &v) in row.iter().enumerate() {
                    uo[(6 * a + b) * p.c + c] = v;
                }
            }
        }
    });
    u
}

/// B^T along one input row for every tile column j < TW: dst[b * plane + at + j] = (B^T d)[b]
/// with d = row[4j .. 4j + 6] (`row` holds 4*TW + 2 pixels). By the AVX-512 kernel below
/// where `gemm::kernels_run` (seven tiles per step, with the same operations in the same
/// order, so the same bits), else one tile at a time: a row has too few tiles (7 in the
/// reference) for the compiler's vector loop, and this was two thirds of the transform.
#[inline(always)]
fn row_transform<T: Float>(row: &[T], tw: usize, dst: &mut [T], plane: usize, at: usize) {
    assert!(row.len() >= 4 * tw + 2 && (tw == 0 || dst.len() >= 5 * plane + at + tw), "row_transform: short slices");
    #[cfg(target_arch = "x86_64")]
    if super::gemm::kernels_run::<T>() {
        // SAFETY: T is f32 (`kernels_run`) and the CPU has AVX-512F; the lengths were checked.
        unsafe { avx512::row_transform(super::gemm::f32s(row), tw, super::gemm::f32s_mut(dst), plane, at) };
        return;
    }
    row_transform_portable(row, tw, dst, plane, at);
}

/// `row_transform` one tile at a time: the definition the kernel is tested against.
#[inline(always)]
fn row_transform_portable<T: Float>(row: &[T], tw: usize, dst: &mut [T], plane: usize, at: usize) {
    for j in 0..tw {
        let d = &row[4 * j..][..6];
        let rt = bt6([d[0], d[1], d[2], d[3], d[4], d[5]]);
        for (b, v) in rt.into_iter().enumerate() {
            dst[b * plane + at + j] = v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Tiles per step: tile j of a step reads pixels 4j .. 4j + 6 of the 32 in two registers.
    const STEP: usize = 7;

    /// The index vector whose lane p is f(p), for `permutex2var`.
    #[target_feature(enable = "avx512f")]
    fn index(f: impl Fn(i32) -> i32) -> __m512i {
        let lanes: [i32; 16] = std::array::from_fn(|p| f(p as i32));
        // SAFETY: 16 i32s, an unaligned load.
        unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
    }

    /// `row_transform` for f32, seven tiles at a time: the step's 30 pixels in two registers
    /// (masked loads: nothing past the row is read), the six taps of each tile gathered into
    /// lanes by `permutex2var`, `bt6` on the lanes, and masked stores of the step's tiles.
    #[target_feature(enable = "avx512f")]
    pub(super) fn row_transform(row: &[f32], tw: usize, dst: &mut [f32], plane: usize, at: usize) {
        assert!(
            row.len() >= 4 * tw + 2 && (tw == 0 || dst.len() >= 5 * plane + at + tw),
            "row_transform: short slices"
        );
        // Lane j of tap q reads pixel 4j + q (lanes past the step's tiles are not stored).
        let tap = |q: i32| index(|j| if j < STEP as i32 { 4 * j + q } else { 0 });
        let idx = [tap(0), tap(1), tap(2), tap(3), tap(4), tap(5)];
        let (four, two, five) = (_mm512_set1_ps(4.0), _mm512_set1_ps(2.0), _mm512_set1_ps(5.0));
        let lanes = |k: usize| -> u16 { ((1u32 << k.min(16)) - 1) as u16 };
        let mut j0 = 0;
        while j0 < tw {
            let tiles = (tw - j0).min(STEP);
            let len = 4 * tiles + 2; // pixels this step reads
            let src = row[4 * j0..].as_ptr();
            // SAFETY: the masks cover the step's `len` pixels, inside `row` (asserted above); a
            // lane the mask leaves out is not read (the second pointer may lie past the row).
            let (lo, hi) = unsafe {
                (
                    _mm512_maskz_loadu_ps(lanes(len), src),
                    _mm512_maskz_loadu_ps(lanes(len.saturating_sub(16)), src.wrapping_add(16)),
                )
            };
            let d = [
                _mm512_permutex2var_ps(lo, idx[0], hi),
                _mm512_permutex2var_ps(lo, idx[1], hi),
                _mm512_permutex2var_ps(lo, idx[2], hi),
                _mm512_permutex2var_ps(lo, idx[3], hi),
                _mm512_permutex2var_ps(lo, idx[4], hi),
                _mm512_permutex2var_ps(lo, idx[5], hi),
            ];
            // bt6, operation for operation.
            let (s34, d42, d31) = (_mm512_add_ps(d[3], d[4]), _mm512_sub_ps(d[4], d[2]), _mm512_sub_ps(d[3], d[1]));
            let two31 = _mm512_mul_ps(two, d31);
            let r = [
                _mm512_add_ps(_mm512_sub_ps(_mm512_mul_ps(four, d[0]), _mm512_mul_ps(five, d[2])), d[4]),
                _mm512_sub_ps(s34, _mm512_mul_ps(four, _mm512_add_ps(d[1], d[2]))),
                _mm512_add_ps(_mm512_sub_ps(d[4], d[3]), _mm512_mul_ps(four, _mm512_sub_ps(d[1], d[2]))),
                _mm512_add_ps(d42, two31),
                _mm512_sub_ps(d42, two31),
                _mm512_add_ps(_mm512_sub_ps(_mm512_mul_ps(four, d[1]), _mm512_mul_ps(five, d[3])), d[5]),
            ];
            let dst = dst[at + j0..].as_mut_ptr();
            for (b, v) in r.into_iter().enumerate() {
                // SAFETY: lanes 0..tiles of row b: dst[at + j0 + b plane ..][..tiles], inside `dst`.
                unsafe { _mm512_mask_storeu_ps(dst.add(b * plane), lanes(tiles), v) };
            }
            j0 += tiles;
        }
    }

    /// `add_patch_row` for f32, seven tiles per step: their q runs in six registers (lane j:
    /// tile j), B along b on the lanes, then the six outputs of each tile spread to pixels by
    /// `permutex2var` into two 16-pixel registers: the main part (b < 4: pixel 4j + b) and the
    /// overlap (b = 4, 5: pixel 4j + 4, 4j + 5, shared with tile j + 1). The row's pixels get the
    /// overlap first and the main part second, as one tile after another gives them.
    #[target_feature(enable = "avx512f")]
    pub(super) fn add_patch_row(q: [&[f32]; 6], tw: usize, row: &mut [f32]) {
        assert!(q.iter().all(|r| r.len() >= tw), "add_patch_row: short runs");
        // Lane p (pixel 4j + b of the step, j = p/4 + first) from source lane j of c[b]: main
        // from c0, c1 (b = 0, 1: index j, 16 + j) and c2, c3 (b = 2, 3); the overlap at pixel
        // 4j + 4 + b from c4, c5 (b = 0, 1) of tile j.
        let main = |first: i32, odd: i32| {
            index(|p| if p % 4 == odd || p % 4 == odd + 1 { (p / 4 + first) + 16 * (p % 2) } else { 0 })
        };
        let over = |first: i32| {
            index(|p| if p % 4 < 2 && p / 4 + first >= 1 { (p / 4 + first - 1) + 16 * (p % 2) } else { 0 })
        };
        let (m01, m23, ov) = ([main(0, 0), main(4, 0)], [main(0, 2), main(4, 2)], [over(0), over(4)]);
        let (four, two, five) = (_mm512_set1_ps(4.0), _mm512_set1_ps(2.0), _mm512_set1_ps(5.0));
        let sign = _mm512_set1_epi32(i32::MIN);
        let lanes = |k: usize| -> u16 { ((1u32 << k.min(16)) - 1) as u16 };
        let mut j0 = 0;
        while j0 < tw {
            let tiles = (tw - j0).min(STEP);
            let load = |r: &[f32]| {
                // SAFETY: lanes 0..tiles of the run from j0, inside it (asserted above).
                unsafe { _mm512_maskz_loadu_ps(lanes(tiles), r[j0..].as_ptr()) }
            };
            let m = [load(q[0]), load(q[1]), load(q[2]), load(q[3]), load(q[4]), load(q[5])];
            // b6, operation for operation.
            let (p12, m21, p34, m43) = (
                _mm512_add_ps(m[1], m[2]),
                _mm512_sub_ps(m[2], m[1]),
                _mm512_add_ps(m[3], m[4]),
                _mm512_sub_ps(m[4], m[3]),
            );
            // Negation flips the sign bit, as `-x` does (0 - x would turn -0.0 into +0.0).
            let neg = |x: __m512| _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), sign));
            let two43 = _mm512_mul_ps(two, m43);
            let c = [
                _mm512_mul_ps(four, m[0]),
                _mm512_add_ps(_mm512_mul_ps(four, _mm512_add_ps(m21, m[5])), two43),
                neg(_mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(five, m[0]), _mm512_mul_ps(four, p12)), p34)),
                _mm512_sub_ps(_mm512_sub_ps(neg(m21), two43), _mm512_mul_ps(five, m[5])),
                _mm512_add_ps(_mm512_add_ps(m[0], p12), p34),
                m[5],
            ];
            let base = 4 * j0; // the step's first pixel
            let valid = row.len().saturating_sub(base); // pixels of the row from there
            for h in 0..2 {
                // Pixels 16h .. 16h + 16 of the step: main for p < 4 tiles, overlap for
                // p % 4 < 2, 4 <= p < 4 tiles + 4.
                let lo = 16 * h;
                let main_mask = lanes((4 * tiles).saturating_sub(lo));
                let over_mask = 0x3333 & lanes((4 * tiles + 4).saturating_sub(lo)) & !lanes(4usize.saturating_sub(lo));
                let row_mask = lanes(valid.saturating_sub(lo));
                let touched = (main_mask | over_mask) & row_mask;
                if touched == 0 {
                    continue;
                }
                let mv = _mm512_mask_blend_ps(
                    0xCCCC,
                    _mm512_permutex2var_ps(c[0], m01[h], c[1]),
                    _mm512_permutex2var_ps(c[2], m23[h], c[3]),
                );
                let ovv = _mm512_permutex2var_ps(c[4], ov[h], c[5]);
                let at = row[base..].as_mut_ptr().wrapping_add(lo);
                // SAFETY: `touched` keeps to the row's pixels (row_mask); masked-out lanes are
                // neither read nor written.
                unsafe {
                    let x = _mm512_maskz_loadu_ps(touched, at);
                    let x = _mm512_mask_add_ps(x, over_mask & row_mask, x, ovv);
                    let x = _mm512_mask_add_ps(x, main_mask & row_mask, x, mv);
                    _mm512_mask_storeu_ps(at, touched, x);
                }
            }
            j0 += tiles;
        }
    }
}

/// V (36, C, ld) for one image's tiles, written at column offset `at` of each row. `rows` is
/// scratch for one channel's row transform, `plan.rows_scratch()` floats.
///
/// First B^T along each input row r, for every tile column j (d = x[r][4j .. 4j+6]), into
/// R[r mod 4][b] (6, TH+1, TW), so that rows 4i .. 4i+6 of tile row i are, for t = i*TW + j,
/// R[0][t], R[1][t], R[2][t], R[3][t], R[0][t + TW], R[1][t + TW]. Then B^T along the columns
/// is six contiguous runs over all T tiles at once.
#[inline(always)]
fn transform_input<T: Float>(p: &Plan, x: &[T], v: &mut [T], ld: usize, at: usize, rows: &mut [T]) {
    let (tw, t) = (p.tw, p.tiles());
    let plane = (p.th + 1) * tw; // one (phase, b) plane of R
    let (r4, pad) = rows[..p.rows_scratch()].split_at_mut(24 * plane);
    let (rows_in, cols_in) = (2 * p.ph + 2, 2 * p.pw + 2); // the pixels some window reads
    pad[cols_in..].fill(T::zero());
    for c in 0..p.c {
        let xc = &x[c * p.h * p.w..][..p.h * p.w];
        for r in 0..4 * p.th + 2 {
            // The row as the tiles read it: straight from x where the tiles' 4 TW + 2 columns
            // are the pixels some window reads (PW even); else copied, zeros past those.
            let row = if r < rows_in && cols_in == 4 * tw + 2 {
                &xc[r * p.w..][..cols_in]
            } else {
                if r < rows_in {
                    pad[..cols_in].copy_from_slice(&xc[r * p.w..][..cols_in]);
                } else {
                    pad[..cols_in].fill(T::zero());
                }
                &pad[..4 * tw + 2]
            };
            row_transform(row, tw, &mut r4[(r % 4) * 6 * plane..][..6 * plane], plane, (r / 4) * tw);
        }
        for b in 0..6 {
            let run = |q: usize, next: usize| &r4[(q * 6 + b) * plane + next * tw..][..t];
            let (d0, d1, d2, d3, d4, d5) = (run(0, 0), run(1, 0), run(2, 0), run(3, 0), run(0, 1), run(1, 1));
            // The six rows a of V for this (b, c), 6*C*ld apart.
            let mut outs = v[(b * p.c + c) * ld + at..].chunks_mut(6 * p.c * ld);
            let [v0, v1, v2, v3, v4, v5]: [&mut [T]; 6] = std::array::from_fn(|_| &mut outs.next().unwrap()[..t]);
            for k in 0..t {
                let r = bt6([d0[k], d1[k], d2[k], d3[k], d4[k], d5[k]]);
                (v0[k], v1[k], v2[k], v3[k], v4[k], v5[k]) = (r[0], r[1], r[2], r[3], r[4], r[5]);
            }
        }
    }
}

/// A^T applied to six values m: four conv outputs along a row or column of a tile.
#[inline(always)]
fn at6<T: Float>(m: [T; 6]) -> [T; 4] {
    let (p12, m12, p34, m34) = (m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]);
    [m[0] + p12 + p34, m12 + T::f(2.0) * m34, p12 + T::f(4.0) * p34, m12 + T::f(8.0) * m34 + m[5]]
}

/// For each tile k of the runs s[xi] = M[xi] of one filter: its 16 conv outputs A^T M A plus
/// the bias, and its four windows (wi, wj) pooled (`pool_window`) into vals[2wi + wj][k] and
/// wins[2wi + wj][k]. Eight output slices, each its own argument (so the compiler knows they
/// do not overlap, and the loop over the tiles is a vector loop).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_tiles<T: Float>(
    s: &[&[T]; XI],
    bias: T,
    offs: [u32; 4],
    v0: &mut [T],
    v1: &mut [T],
    v2: &mut [T],
    v3: &mut [T],
    w0: &mut [u32],
    w1: &mut [u32],
    w2: &mut [u32],
    w3: &mut [u32],
) {
    let n = v0.len();
    let (v1, v2, v3, w0, w1, w2, w3) =
        (&mut v1[..n], &mut v2[..n], &mut v3[..n], &mut w0[..n], &mut w1[..n], &mut w2[..n], &mut w3[..n]);
    for k in 0..n {
        // u = A^T M (4x6), column by column; then the outputs u A (4x4), row by row (written
        // out: closures or `array::from_fn` here are not always inlined, and then the loop is
        // not vectorised).
        let u0 = at6([s[0][k], s[6][k], s[12][k], s[18][k], s[24][k], s[30][k]]);
        let u1 = at6([s[1][k], s[7][k], s[13][k], s[19][k], s[25][k], s[31][k]]);
        let u2 = at6([s[2][k], s[8][k], s[14][k], s[20][k], s[26][k], s[32][k]]);
        let u3 = at6([s[3][k], s[9][k], s[15][k], s[21][k], s[27][k], s[33][k]]);
        let u4 = at6([s[4][k], s[10][k], s[16][k], s[22][k], s[28][k], s[34][k]]);
        let u5 = at6([s[5][k], s[11][k], s[17][k], s[23][k], s[29][k], s[35][k]]);
        let y0 = at6([u0[0], u1[0], u2[0], u3[0], u4[0], u5[0]]);
        let y1 = at6([u0[1], u1[1], u2[1], u3[1], u4[1], u5[1]]);
        let y2 = at6([u0[2], u1[2], u2[2], u3[2], u4[2], u5[2]]);
        let y3 = at6([u0[3], u1[3], u2[3], u3[3], u4[3], u5[3]]);
        (v0[k], w0[k]) = pool_window([y0[0] + bias, y0[1] + bias, y1[0] + bias, y1[1] + bias], offs);
        (v1[k], w1[k]) = pool_window([y0[2] + bias, y0[3] + bias, y1[2] + bias, y1[3] + bias], offs);
        (v2[k], w2[k]) = pool_window([y2[0] + bias, y2[1] + bias, y3[0] + bias, y3[1] + bias], offs);
        (v3[k], w3[k]) = pool_window([y2[2] + bias, y2[3] + bias, y3[2] + bias, y3[3] + bias], offs);
    }
}

/// Whether the forward pays by F(4x4) rather than F(2x2) on a block whose unpadded conv has
/// geometry `g`: the backward's condition (`pays`), on maps of at least 4x4 tiles (on the
/// reference's third block, 3x3 tiles, it was no faster: see the header).
pub fn pays_forward(g: &ConvGeometry) -> bool {
    pays(g) && (g.oh / 2).div_ceil(2) >= 4 && (g.ow / 2).div_ceil(2) >= 4
}

/// Floats of scratch for one group's forward: V (36, C, n), M (36, OC, n), one filter's
/// pooled values (4 windows, n), and the row transform. The winners take 4n u32s.
pub fn forward_scratch(p: &Plan) -> usize {
    let n = p.group * p.tiles();
    XI * (p.c + p.oc) * n + 4 * n + p.rows_scratch()
}

/// Forward for a group of images by F(4x4, 3x3): xs (G, C, H, W) -> y (G, OC, PH, PW) and
/// the winners, given `u` from `transform_weights`; `scratch` of `forward_scratch` floats and
/// `wins` of 4 x G x T. Per tile: M[xi] = U[xi] V[xi] (36 GEMMs), its 16 conv outputs
/// A^T M A + bias, and its four windows pooled with the ReLU exactly as `conv_block.rs` pools
/// (candidates in row-major order, a later one wins only if `!(v <= best)`, dead if the best
/// is <= 0); the windows an odd PH or PW leaves out are computed (from zero pixels) and dropped.
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
    let (img, t, plane) = (p.c * p.h * p.w, p.tiles(), p.ph * p.pw);
    let gs = xs.len() / img;
    let n = gs * t; // columns of V and M: every tile of the group
    let (v, rest) = scratch.split_at_mut(XI * p.c * n);
    let (m, rest) = rest.split_at_mut(XI * p.oc * n);
    let (vals, rows) = rest.split_at_mut(4 * n);
    for (i, x) in xs.chunks_exact(img).enumerate() {
        transform_input(p, x, v, n, i * t, rows);
    }
    super::winograd::multiply(XI, p.oc, p.c, u, v, n, m); // M[xi] = U[xi] V[xi]
    let offs = [0, 1, p.ow as u32, p.ow as u32 + 1];
    let wins = &mut wins[..4 * n];
    for o in 0..p.oc {
        // s[6a + b]: M[6a + b] for this filter, as a run over the group's tiles.
        let s: [&[T]; XI] = std::array::from_fn(|xi| &m[(xi * p.oc + o) * n..][..n]);
        let bias = b[o];
        let (v01, v23) = vals.split_at_mut(2 * n);
        let ((v0, v1), (v2, v3)) = (v01.split_at_mut(n), v23.split_at_mut(n));
        let (w01, w23) = wins.split_at_mut(2 * n);
        let ((w0, w1), (w2, w3)) = (w01.split_at_mut(n), w23.split_at_mut(n));
        pool_tiles(&s, bias, offs, v0, v1, v2, v3, w0, w1, w2, w3);
        // Each window to its place in its image: pooled row pi = 2ti + wi interleaves the
        // windows (wi, 0) and (wi, 1) of tile row ti.
        for i in 0..gs {
            let at = (i * p.oc + o) * plane;
            let (yo, ao) = (&mut y[at..at + plane], &mut arg[at..at + plane]);
            for (pi, (yr, ar)) in yo.chunks_exact_mut(p.pw).zip(ao.chunks_exact_mut(p.pw)).enumerate() {
                let from = i * t + (pi / 2) * p.tw;
                let run = |win: usize| from + win * n..from + win * n + p.tw;
                let (a, b) = (2 * (pi % 2), 2 * (pi % 2) + 1);
                let (va, vb, wa, wb) = (&vals[run(a)], &vals[run(b)], &wins[run(a)], &wins[run(b)]);
                let top = (2 * pi * p.ow) as u32; // the conv row of the windows' top-left
                for (j, (yy, aa)) in yr.chunks_mut(2).zip(ar.chunks_mut(2)).enumerate() {
                    let corner = top + 4 * j as u32;
                    yy[0] = va[j];
                    aa[0] = if wa[j] == DEAD { DEAD } else { corner + wa[j] };
                    if let (Some(y1), Some(a1)) = (yy.get_mut(1), aa.get_mut(1)) {
                        *y1 = vb[j];
                        *a1 = if wb[j] == DEAD { DEAD } else { corner + 2 + wb[j] };
                    }
                }
            }
        }
    }
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

/// A applied to four values y (a column of A^T's transpose): six values of Z's row or column.
#[inline(always)]
fn a6<T: Float>(y: [T; 4]) -> [T; 6] {
    let (e, o) = (y[0] + y[2], y[1] + y[3]);
    let (e4, o2) = (y[0] + T::f(4.0) * y[2], T::f(2.0) * y[1] + T::f(8.0) * y[3]);
    [y[0], e + o, e - o, e4 + o2, e4 - o2, y[3]]
}

/// B applied to six values m: a row or column of a patch's gradient.
#[inline(always)]
fn b6<T: Float>(m: [T; 6]) -> [T; 6] {
    let (four, two, five) = (T::f(4.0), T::f(2.0), T::f(5.0));
    let (p12, m21, p34, m43) = (m[1] + m[2], m[2] - m[1], m[3] + m[4], m[4] - m[3]);
    [
        four * m[0],
        four * (m21 + m[5]) + two * m43,
        -(five * m[0] + four * p12 + p34),
        -m21 - two * m43 - five * m[5],
        m[0] + p12 + p34,
        m[5],
    ]
}

/// G^T applied to six values m: a row or column of a filter's gradient.
#[inline(always)]
fn gt6<T: Float>(m: [T; 6]) -> [T; 3] {
    let (sixth, twelfth, q24) = (T::f(1.0 / 6.0), T::f(1.0 / 12.0), T::f(1.0 / 24.0));
    let (p12, m21, p34, m34) = (m[1] + m[2], m[2] - m[1], m[3] + m[4], m[3] - m[4]);
    [T::f(0.25) * m[0] - sixth * p12 + q24 * p34, sixth * m21 + twelfth * m34, sixth * (p34 - p12) + m[5]]
}

/// Floats of per-thread scratch for the backward of a group: V (36, C, n), Z (36, OC, n),
/// Md (36, C, n), and the row transform or, after it, the runs Z is built from (52 per tile)
/// and then dd's (2 x 36 per tile).
pub fn backward_scratch(p: &Plan) -> usize {
    let n = p.group * p.tiles();
    XI * (2 * p.c + p.oc) * n + p.rows_scratch().max(2 * XI * n)
}

/// One group's share of the backward: Mw (36, OC, C) += this group's products (turn it into
/// dW with `finish_weight_grad` once every group is in), db (OC) += the sum of its live
/// windows' dy, and, when `dx` is given, dx (gs, C, H, W) += the group's input gradient.
/// xs (gs, C, H, W), dy and winners (gs, OC, PH, PW); `u` from `transform_weights`.
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
    let (img, plane, t) = (p.c * p.h * p.w, p.ph * p.pw, p.tiles());
    let out = p.oc * plane;
    let gs = xs.len() / img;
    let n = gs * t;
    let (v, rest) = scratch.split_at_mut(XI * p.c * n);
    let (z, rest) = rest.split_at_mut(XI * p.oc * n);
    let (md, rows) = rest.split_at_mut(XI * p.c * n);
    for (i, x) in xs.chunks_exact(img).enumerate() {
        transform_input(p, x, v, n, i * t, rows);
    }
    // Z = A dY A^T for each filter, as runs over the group's tiles: dY (16, n), the tiles'
    // 4x4 conv-output gradients, is 0 but for one entry per live window, its pooled gradient
    // at the winner's place (windows that an odd PH or PW leaves out stay 0); then A along
    // each row of dY, then along each column.
    let (dyt, rest) = rows.split_at_mut(16 * n); // the row-transform scratch is free again
    let tz = &mut rest[..24 * n];
    let ow = p.ow as u32;
    for o in 0..p.oc {
        dyt.fill(T::zero());
        for i in 0..gs {
            let (dyr, ar) = (&dy[i * out + o * plane..][..plane], &arg[i * out + o * plane..][..plane]);
            for ((w, &a), &d) in p.windows.iter().zip(ar).zip(dyr) {
                // A dead window writes its 0 at its own top-left entry, which no other
                // window's winner can take: no branch on which windows live.
                let live = a != DEAD;
                let off = if live { a - w.corner } else { 0 }; // one of 0, 1, OW, OW + 1
                let rs = if off >= ow { off - ow + 4 } else { off }; // 4r + s
                dyt[(w.entry + rs) as usize * n + i * t + w.tile as usize] = if live { d } else { T::zero() };
            }
            db[o] += sum_live(dyr, ar); // the live windows' dy
        }
        // tz[r][b] = (dY A^T)[r][b]: A along each row of dY.
        for r in 0..4 {
            let y = |s: usize| &dyt[(4 * r + s) * n..][..n];
            let (y0, y1, y2, y3) = (y(0), y(1), y(2), y(3));
            let mut outs = tz[6 * r * n..].chunks_mut(n);
            let [t0, t1, t2, t3, t4, t5]: [&mut [T]; 6] = std::array::from_fn(|_| outs.next().unwrap());
            for k in 0..n {
                let z = a6([y0[k], y1[k], y2[k], y3[k]]);
                (t0[k], t1[k], t2[k], t3[k], t4[k], t5[k]) = (z[0], z[1], z[2], z[3], z[4], z[5]);
            }
        }
        // Z[6a + b] = (A tz)[a][b]: A along each column of tz.
        for b in 0..6 {
            let y = |r: usize| &tz[(6 * r + b) * n..][..n];
            let (y0, y1, y2, y3) = (y(0), y(1), y(2), y(3));
            let mut outs = z[(b * p.oc + o) * n..].chunks_mut(6 * p.oc * n);
            let [z0, z1, z2, z3, z4, z5]: [&mut [T]; 6] = std::array::from_fn(|_| &mut outs.next().unwrap()[..n]);
            for k in 0..n {
                let v = a6([y0[k], y1[k], y2[k], y3[k]]);
                (z0[k], z1[k], z2[k], z3[k], z4[k], z5[k]) = (v[0], v[1], v[2], v[3], v[4], v[5]);
            }
        }
    }
    for xi in 0..XI {
        let (zk, vk) = (&z[xi * p.oc * n..][..p.oc * n], &v[xi * p.c * n..][..p.c * n]);
        let mwk = &mut mw[xi * p.oc * p.c..][..p.oc * p.c];
        gemm_nt(p.oc, p.c, n, zk, vk, mwk); // Mw[xi] += Z[xi] V[xi]^T
    }
    let Some(dx) = dx else { return };
    for xi in 0..XI {
        let (uk, zk) = (&u[xi * p.c..], &z[xi * p.oc * n..][..p.oc * n]);
        let mdk = &mut md[xi * p.c * n..][..p.c * n];
        gemm_nn(p.c, n, p.oc, uk, 1, XI * p.c, zk, mdk); // Md[xi] = U[xi]^T Z[xi]
    }
    // dd = B Md B^T per tile: for each channel, B along a (each column b of Md) as runs over
    // the group's tiles, into pa; then for each patch row a of each tile row i, B along b and
    // the row's patches added to dx[c][4i + a] (`add_patch_row`): dd's element (a, b) of tile
    // (i, j) lands on column 4j + b, so neighbouring patches overlap by two columns (and two
    // rows). Only pixels some window reads get a share (the rest of a patch was zeros).
    let pa = &mut rows[..XI * n]; // the Z runs' scratch is free again
    let (rows_in, cols_in) = (2 * p.ph + 2, 2 * p.pw + 2);
    let img_plane = p.h * p.w;
    for c in 0..p.c {
        for b in 0..6 {
            let m = |a: usize| &md[((6 * a + b) * p.c + c) * n..][..n];
            let (m0, m1, m2, m3, m4, m5) = (m(0), m(1), m(2), m(3), m(4), m(5));
            let mut outs = pa[b * n..].chunks_mut(6 * n); // pa[6a + b]
            let [q0, q1, q2, q3, q4, q5]: [&mut [T]; 6] = std::array::from_fn(|_| &mut outs.next().unwrap()[..n]);
            for k in 0..n {
                let v = b6([m0[k], m1[k], m2[k], m3[k], m4[k], m5[k]]);
                (q0[k], q1[k], q2[k], q3[k], q4[k], q5[k]) = (v[0], v[1], v[2], v[3], v[4], v[5]);
            }
        }
        for i in 0..gs {
            let dxc = &mut dx[i * img + c * img_plane..][..img_plane];
            for ti in 0..p.th {
                for a in 0..6.min(rows_in - 4 * ti) {
                    let from = i * t + ti * p.tw; // the tile row's first tile
                    let q = |b: usize| &pa[(6 * a + b) * n + from..][..p.tw];
                    let row = &mut dxc[(4 * ti + a) * p.w..][..cols_in];
                    add_patch_row([q(0), q(1), q(2), q(3), q(4), q(5)], p.tw, row);
                }
            }
        }
    }
}

/// B along b for one patch row of a tile row, added to its image row: row[4j + b] +=
/// (B q_j)[b] for j < tw, b < 6, q_j = (q[0][j], ..., q[5][j]) (one row a of B Md), tile by
/// tile, the columns past `row` dropped. By the AVX-512 kernel below where
/// `gemm::kernels_run` (seven tiles per step, the same sums in the same order), else one tile
/// at a time: that scalar scatter was the F(4x4) backward's largest piece of own code.
#[inline(always)]
fn add_patch_row<T: Float>(q: [&[T]; 6], tw: usize, row: &mut [T]) {
    assert!(q.iter().all(|r| r.len() >= tw), "add_patch_row: short runs");
    #[cfg(target_arch = "x86_64")]
    if super::gemm::kernels_run::<T>() {
        // SAFETY: T is f32 (`kernels_run`) and the CPU has AVX-512F.
        unsafe { avx512::add_patch_row(q.map(|r| super::gemm::f32s(r)), tw, super::gemm::f32s_mut(row)) };
        return;
    }
    add_patch_row_portable(q, tw, row);
}

/// `add_patch_row` one tile at a time: the definition the kernel is tested against. A pixel
/// shared by tiles j - 1 and j gets j - 1's share first.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // tile j of six runs
fn add_patch_row_portable<T: Float>(q: [&[T]; 6], tw: usize, row: &mut [T]) {
    for j in 0..tw {
        let v = b6([q[0][j], q[1][j], q[2][j], q[3][j], q[4][j], q[5][j]]);
        for (d, x) in row.iter_mut().skip(4 * j).take(6).zip(v) {
            *d += x;
        }
    }
}

/// dW (OC, C, 3, 3) += G^T Mw[o][c] G, Mw (36, OC, C) summed over every group: for each
/// filter, as runs over the channels (G^T along a, then along b), then added to dW.
pub fn finish_weight_grad<T: Float>(p: &Plan, mw: &[T], dw: &mut [T]) {
    let c = p.c;
    let (mut ga, mut g) = (zero_vec(18 * c), zero_vec(9 * c));
    for o in 0..p.oc {
        for b in 0..6 {
            let m = |a: usize| &mw[((6 * a + b) * p.oc + o) * c..][..c];
            let (m0, m1, m2, m3, m4, m5) = (m(0), m(1), m(2), m(3), m(4), m(5));
            let mut outs = ga[b * c..].chunks_mut(6 * c); // ga[6kh + b]
            let [r0, r1, r2]: [&mut [T]; 3] = std::array::from_fn(|_| &mut outs.next().unwrap()[..c]);
            for j in 0..c {
                let v = gt6([m0[j], m1[j], m2[j], m3[j], m4[j], m5[j]]);
                (r0[j], r1[j], r2[j]) = (v[0], v[1], v[2]);
            }
        }
        for kh in 0..3 {
            let q = |b: usize| &ga[(6 * kh + b) * c..][..c];
            let (q0, q1, q2, q3, q4, q5) = (q(0), q(1), q(2), q(3), q(4), q(5));
            let mut outs = g[3 * kh * c..].chunks_mut(c); // g[3kh + kw]
            let [w0, w1, w2]: [&mut [T]; 3] = std::array::from_fn(|_| outs.next().unwrap());
            for j in 0..c {
                let v = gt6([q0[j], q1[j], q2[j], q3[j], q4[j], q5[j]]);
                (w0[j], w1[j], w2[j]) = (v[0], v[1], v[2]);
            }
        }
        for (j, dwj) in dw[o * c * 9..][..c * 9].chunks_exact_mut(9).enumerate() {
            for (tap, d) in dwj.iter_mut().enumerate() {
                *d += g[tap * c + j];
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
mod tests {
    use super::*;
    use crate::layers::winograd::{
        self,
        tests::{block, check_row_kernel, fill, rel, Guarded},
    };
    use crate::layers::Isa;
    use crate::layers::{Conv2d, ConvReluPool, Ctx, Layer, MaxPool2d};
    use crate::tensor::{from_vec, slice, Tensor};

    /// (N, C, OC, H, W): the reference's second and third blocks (14 and 6 pooled rows: 7x7
    /// and 3x3 tiles), odd pooled sizes (the last tiles' second windows missing), one filter,
    /// and 361 windows per image (one image per group, several groups per thread).
    const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
        (3, 32, 64, 31, 31),
        (9, 64, 128, 14, 14),
        (2, 3, 5, 17, 19),
        (5, 2, 3, 16, 17),
        (4, 3, 1, 18, 18),
        (4, 2, 3, 40, 40),
        (2, 3, 2, 11, 12),
    ];

    /// Which pooled maps (PH x PW) take this backward: F(2x2) does 16 products per window,
    /// F(4x4) 36 per tile of four, counting the windows an odd size leaves empty.
    #[test]
    fn pays_on_maps_of_several_tiles_that_waste_little() {
        let takes = |ph: usize, pw: usize| pays(&ConvGeometry::new(2, 2 * ph + 2, 2 * pw + 2, 3, 3, 1, 0));
        // The reference's blocks: 14x14 and 6x6 pooled (49 and 9 tiles) do, 2x2 (one tile) not.
        assert!(takes(14, 14) && takes(6, 6) && !takes(2, 2));
        // 3x3: 4 tiles, 144 products for 9 windows, as many as F(2x2). 5x5: 9 tiles, 324
        // against 400, more than 3/4. 7x7: 576 against 784. 4x4: 4 tiles, 576 against 256 * 3.
        assert!(!takes(3, 3) && !takes(5, 5) && takes(7, 7) && takes(4, 4));
        // A map one window high (or wide) leaves half of every tile empty: 1x8 pooled is 4
        // tiles, 576 products for 8 windows. 8x4 is 8 full tiles.
        assert!(!takes(1, 8) && !takes(8, 1) && takes(8, 4));
    }

    /// The AVX-512 row transform gives the portable one's bits for rows of 1 to 23 tiles (one
    /// to four steps of seven, full and partial); see `winograd::tests::check_row_kernel`.
    #[test]
    fn row_kernel_matches_portable_bit_for_bit() {
        check_row_kernel(4, 6, 23, row_transform::<f32>, row_transform_portable::<f32>);
    }

    /// The AVX-512 patch-row kernel gives the portable one's bits for rows of 1 to 23 tiles,
    /// the row as long as its patches (4 TW + 2 pixels, PW even) or two pixels short (PW odd:
    /// the last patch's overhang dropped), on values that overlap and on signed zeros (where
    /// `-x` and `0 - x` differ); it reads and writes nothing past the row or the runs (they end
    /// at pages that fault).
    #[test]
    fn patch_row_kernel_matches_portable_bit_for_bit() {
        if !crate::layers::gemm::kernels_run::<f32>() {
            crate::layers::skip_unless_required(
                "AVX512",
                "no AVX-512F and FMA on this CPU: the patch-row kernel is not checked",
            );
            return;
        }
        for tw in 1..=23 {
            for short in [0, 2] {
                // Values; zeros of both signs; and -0.0 everywhere, where an add of +0.0 that
                // does not belong (a wider mask) turns a pixel's -0.0 into +0.0.
                for zeros in [0, 1, 2] {
                    let len = 4 * tw + 2 - short;
                    let mut q = fill::<f32>(6 * tw, tw as u64);
                    let mut start = fill::<f32>(len + 8, 3 + tw as u64);
                    if zeros > 0 {
                        let sign =
                            |i: usize, every: usize| if zeros == 2 || i.is_multiple_of(every) { -0.0 } else { 0.0 };
                        q.iter_mut().enumerate().for_each(|(i, v)| *v = sign(i, 3));
                        start.iter_mut().enumerate().for_each(|(i, v)| *v = sign(i, 2));
                    }
                    start[len..].fill(f32::NAN); // past the row
                                                 // The last run and the row end at pages that fault: a read or write past
                                                 // either stops the test.
                    let last = Guarded::new(&q[5 * tw..][..tw]);
                    let runs: [&[f32]; 6] =
                        std::array::from_fn(|b| if b < 5 { &q[b * tw..][..tw] } else { last.slice() });
                    let run = |f: fn([&[f32]; 6], usize, &mut [f32])| {
                        let mut row = Guarded::new(&start[..len]);
                        f(runs, tw, row.slice_mut());
                        let mut out = row.slice().to_vec();
                        out.extend_from_slice(&start[len..]);
                        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    };
                    let (kernel, portable) = (run(add_patch_row::<f32>), run(add_patch_row_portable::<f32>));
                    assert_eq!(kernel, portable, "{tw} tiles, {short} short, zeros {zeros}");
                    let before = start.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert!(zeros > 0 || portable[..len] != before[..len], "{tw} tiles: the row changed");
                }
            }
        }
    }

    /// Which maps take the F(4x4) forward: those that take its backward, with at least 4x4
    /// tiles (the reference's second block, 7x7 tiles, does; its third, 3x3, does not).
    #[test]
    fn forward_pays_on_maps_of_4x4_tiles() {
        let takes = |ph: usize, pw: usize| pays_forward(&ConvGeometry::new(2, 2 * ph + 2, 2 * pw + 2, 3, 3, 1, 0));
        assert!(takes(14, 14) && takes(8, 8) && takes(7, 8) && takes(8, 7));
        assert!(!takes(6, 6) && !takes(6, 14) && !takes(14, 6) && !takes(2, 2));
        // 4 tiles high but wasting too much for `pays`: one window wide.
        assert!(!takes(8, 1) && !takes(1, 8));
    }

    /// The shapes that take the F(4x4) forward (the reference's second block; odd pooled
    /// sizes, whose last tiles' windows are dropped; one filter; 361 windows per image), as
    /// a block computes them: y and the winners are those of im2col + GEMM, in f64 to 1e-12
    /// with the same winners, and in f32 close (the error printed beside F(2x2)'s).
    #[test]
    fn forward_matches_the_gemm_path() {
        let shapes = [(3, 32, 64, 31, 31), (2, 3, 5, 17, 19), (5, 2, 3, 19, 16), (4, 3, 1, 18, 18), (4, 2, 3, 40, 40)];
        for (n, c, oc, h, w) in shapes {
            let shape = [n, c, h, w];
            assert!(pays_forward(&ConvGeometry::new(c, h, w, 3, 3, 1, 0)), "{shape:?} should take F(4x4)");
            let x = from_vec(&shape, fill::<f64>(n * c * h * w, 7));
            let (mut a, mut b) = (block::<f64>(c, oc, true), block::<f64>(c, oc, false));
            let (ya, yb) = (a.forward(&x, Ctx::eval()), b.forward(&x, Ctx::eval()));
            let e = rel(slice(&yb), slice(&ya));
            assert!(e < 1e-12, "f64 {shape:?} y: {e:.2e}");
            assert_eq!(a.winners(), b.winners(), "f64 {shape:?}: the winners");
            assert!(
                slice(&ya).contains(&0.0) && slice(&ya).iter().any(|&v| v > 0.0),
                "{shape:?}: dead and live windows"
            );

            // f32: against the f64 GEMM path on the same numbers, beside F(2x2)'s error.
            let x32 = fill::<f32>(n * c * h * w, 7);
            let mut b = block::<f64>(c, oc, false);
            b.conv.weight.value =
                from_vec(&[oc, c, 3, 3], fill::<f32>(oc * c * 9, 5).iter().map(|&v| v as f64).collect());
            b.conv.bias.value = from_vec(&[oc], fill::<f32>(oc, 6).iter().map(|&v| v as f64).collect());
            let want = b.forward(&from_vec(&shape, x32.iter().map(|&v| v as f64).collect()), Ctx::eval());
            let g = ConvGeometry::new(c, h, w, 3, 3, 1, 0);
            let (wt, bias) = (fill::<f32>(oc * c * 9, 5), fill::<f32>(oc, 6));
            let (out, img) = (want.len() / n, c * h * w);
            let (mut y4, mut a4) = (vec![0.0f32; want.len()], vec![0u32; want.len()]);
            let p = Plan::new(&g, oc, n);
            let u = transform_weights(&p, &wt);
            let (mut s, mut wins) = (vec![0.0; forward_scratch(&p)], vec![0; 4 * p.group * p.tiles()]);
            for first in (0..n).step_by(p.group) {
                let gs = p.group.min(n - first);
                let (yg, ag) = (&mut y4[first * out..][..gs * out], &mut a4[first * out..][..gs * out]);
                forward_group(&p, &u, &bias, &x32[first * img..][..gs * img], yg, ag, &mut s, &mut wins);
            }
            let (mut y2, mut a2) = (vec![0.0f32; want.len()], vec![0u32; want.len()]);
            let p = winograd::Plan::new(&g, oc, n);
            let u = winograd::transform_weights(&p, &wt);
            let (mut s, mut wins) = (vec![0.0; p.forward_scratch()], vec![0; p.group * p.tiles()]);
            for first in (0..n).step_by(p.group) {
                let gs = p.group.min(n - first);
                let (yg, ag) = (&mut y2[first * out..][..gs * out], &mut a2[first * out..][..gs * out]);
                winograd::forward_group(&p, &u, &bias, &x32[first * img..][..gs * img], yg, ag, &mut s, &mut wins);
            }
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let (e4, e2) = (rel(slice(&want), &f64s(&y4)), rel(slice(&want), &f64s(&y2)));
            eprintln!("f32 {shape:?} forward y: F(4x4) {e4:.1e}, F(2x2) {e2:.1e}");
            assert!(e4 < 1e-5, "f32 {shape:?} y: F(4x4) off by {e4:.2e} of the largest");
            // Where a window's two best values are closer than the rounding, the winner may
            // differ; that is all that may.
            let differ = a4.iter().zip(&a2).filter(|(a, b)| a != b).count();
            assert!(differ * 1000 <= a4.len(), "f32 {shape:?}: {differ} of {} winners differ", a4.len());
        }
    }

    /// dx, dW and db of block a (by Winograd) are those of block b (by im2col + GEMM) within
    /// 1e-12 of the largest (f64).
    fn same_gradients(
        what: &str,
        (a, dxa): (&ConvReluPool<f64>, &Tensor<f64>),
        (b, dxb): (&ConvReluPool<f64>, &Tensor<f64>),
    ) {
        let pairs: [(&str, &Tensor<f64>, &Tensor<f64>); 3] = [
            ("dx", dxb, dxa),
            ("dW", &b.conv.weight.grad, &a.conv.weight.grad),
            ("db", &b.conv.bias.grad, &a.conv.bias.grad),
        ];
        for (name, want, got) in pairs {
            let e = rel(slice(want), slice(got));
            assert!(e < 1e-12, "{what} {name}: {e:.2e}");
        }
    }

    /// The pixels no pooling window reads (rows past 2 PH + 1, columns past 2 PW + 1: the last
    /// row or column of an odd conv plane) take no part, both ways: with NaN there, a block by
    /// F(4x4) gives what im2col + GEMM gives with zeros there (y, winners, dx, dW, db; f64),
    /// and dx is 0 on them. Shapes with odd and even conv planes, so that some tiles overhang
    /// those pixels and some read the image rows directly.
    #[test]
    fn pixels_no_window_reads_take_no_part() {
        for (n, c, oc, h, w) in
            [(2, 3, 4, 19, 20), (2, 2, 3, 20, 19), (2, 2, 3, 21, 19), (3, 2, 2, 21, 21), (2, 3, 2, 19, 19)]
        {
            let shape = [n, c, h, w];
            assert!(pays_forward(&ConvGeometry::new(c, h, w, 3, 3, 1, 0)), "{shape:?} should take F(4x4) both ways");
            let (rows_in, cols_in) = (2 * ((h - 2) / 2) + 2, 2 * ((w - 2) / 2) + 2);
            assert!(rows_in < h || cols_in < w, "{shape:?}: some pixels unread");
            let unread = |i: usize| (i / w) % h >= rows_in || i % w >= cols_in;
            let values = fill::<f64>(n * c * h * w, 7);
            let with = |v: f64| {
                from_vec(&shape, values.iter().enumerate().map(|(i, &x)| if unread(i) { v } else { x }).collect())
            };
            let (mut a, mut b) = (block::<f64>(c, oc, true), block::<f64>(c, oc, false));
            let (ya, yb) = (a.forward(&with(f64::NAN), Ctx::eval()), b.forward(&with(0.0), Ctx::eval()));
            let e = rel(slice(&yb), slice(&ya));
            assert!(e < 1e-12, "{shape:?} y: {e:.2e}");
            assert_eq!(a.winners(), b.winners(), "{shape:?}: the winners");
            let dy = from_vec(ya.shape(), fill::<f64>(ya.len(), 8));
            let (dxa, dxb) = (a.backward(&dy), b.backward(&dy));
            same_gradients(&format!("{shape:?}"), (&a, &dxa), (&b, &dxb));
            assert!(
                slice(&dxa).iter().enumerate().all(|(i, &d)| !unread(i) || d == 0.0),
                "{shape:?}: dx on unread pixels"
            );
        }
    }

    /// Each shape takes this backward, and a block's gradients by it are those of im2col +
    /// GEMM (the forward, F(2x2), picks the same winners in f64): dx, dW and db.
    #[test]
    fn backward_matches_the_gemm_path() {
        for (n, c, oc, h, w) in SHAPES {
            let shape = [n, c, h, w];
            assert!(pays(&ConvGeometry::new(c, h, w, 3, 3, 1, 0)), "{shape:?} should take F(4x4)");
            let x = from_vec(&shape, fill::<f64>(n * c * h * w, 7));
            let (mut a, mut b) = (block::<f64>(c, oc, true), block::<f64>(c, oc, false));
            let (ya, yb) = (a.forward(&x, Ctx::eval()), b.forward(&x, Ctx::eval()));
            assert_eq!(a.winners(), b.winners(), "{shape:?}: the forwards' winners");
            let dy = from_vec(ya.shape(), fill::<f64>(ya.len(), 8));
            let (dxa, dxb) = (a.backward(&dy), b.backward(&dy));
            same_gradients(&format!("f64 {shape:?}"), (&a, &dxa), (&b, &dxb));
            assert!(
                slice(&yb).contains(&0.0) && slice(&dxa).iter().any(|&v| v != 0.0),
                "{shape:?}: dead and live windows"
            );
        }
    }

    /// A padded block (PyTorch's usual `Conv2d(c, 3, padding=1)`): its fast paths run on the
    /// images with the zero border written out, and each group's padded dx is cropped into dx.
    /// With several groups in one thread's range of images, each group must start from a
    /// zeroed padded dx: by F(4x4) (34x34 images, one image per group) and by F(2x2) (a 6x6
    /// pooled map, 29 images per group, 64 images).
    #[test]
    fn padded_blocks_with_several_groups_per_thread_range() {
        for (n, c, oc, h, w, four) in [(4, 2, 3, 34, 34, true), (64, 2, 3, 6, 6, false)] {
            let shape = [n, c, h, w];
            assert_eq!(pays(&ConvGeometry::new(c, h + 2, w + 2, 3, 3, 1, 0)), four, "{shape:?}");
            let padded = |winograd: bool| {
                let mut b = ConvReluPool::new(Conv2d::<f64>::new(c, oc, (3, 3), 1, 1), MaxPool2d::new(2, 2));
                b.winograd = winograd;
                b.conv.weight.value = from_vec(&[oc, c, 3, 3], fill(oc * c * 9, 5));
                b.conv.bias.value = from_vec(&[oc], fill(oc, 6));
                b
            };
            let (mut a, mut b) = (padded(true), padded(false));
            let x = from_vec(&shape, fill::<f64>(n * c * h * w, 7));
            let ya = a.forward(&x, Ctx::eval());
            b.forward(&x, Ctx::eval());
            let dy = from_vec(ya.shape(), fill::<f64>(ya.len(), 8));
            let (dxa, dxb) = (a.backward(&dy), b.backward(&dy));
            let e = rel(slice(&dxb), slice(&dxa));
            assert!(e < 1e-12, "{shape:?} padded dx: {e:.2e}");
            let e = rel(slice(&b.conv.weight.grad), slice(&a.conv.weight.grad));
            assert!(e < 1e-12, "{shape:?} padded dW: {e:.2e}");
        }
    }

    /// In f32, the gradients of both Winograd backwards against the f64 GEMM path's, on the
    /// same winners: F(4x4)'s error stays under 2e-5 of the largest gradient (F(2x2)'s is
    /// printed beside it; `cargo test -- --nocapture` shows both).
    #[test]
    fn f32_error_against_f64() {
        for (n, c, oc, h, w) in SHAPES {
            let g = ConvGeometry::new(c, h, w, 3, 3, 1, 0);
            let (x32, wt32) = (fill::<f32>(n * c * h * w, 7), fill::<f32>(oc * c * 9, 5));
            // The reference: f64 on the same (f32-representable) numbers, im2col + GEMM.
            let mut b = block::<f64>(c, oc, false);
            b.conv.weight.value = from_vec(&[oc, c, 3, 3], wt32.iter().map(|&v| v as f64).collect());
            let y = b.forward(&from_vec(&[n, c, h, w], x32.iter().map(|&v| v as f64).collect()), Ctx::eval());
            let dy32 = fill::<f32>(y.len(), 8);
            let dx = b.backward(&from_vec(y.shape(), dy32.iter().map(|&v| v as f64).collect()));
            let want = [slice(&dx).to_vec(), slice(&b.conv.weight.grad).to_vec(), slice(&b.conv.bias.grad).to_vec()];
            let arg = b.winners().to_vec();

            let (mut dw4, mut db4, mut dx4) = (vec![0.0f32; oc * c * 9], vec![0.0f32; oc], vec![0.0f32; x32.len()]);
            let p = Plan::new(&g, oc, n);
            let u = transform_weights(&p, &wt32);
            let mut mw = vec![0.0; XI * oc * c];
            let mut s = vec![0.0; backward_scratch(&p)];
            let (img, out) = (c * h * w, y.len() / n);
            for first in (0..n).step_by(p.group) {
                let gs = p.group.min(n - first);
                let (xg, dyg, ag) = (
                    &x32[first * img..][..gs * img],
                    &dy32[first * out..][..gs * out],
                    &arg[first * out..][..gs * out],
                );
                backward_group(
                    &p,
                    &u,
                    xg,
                    dyg,
                    ag,
                    &mut mw,
                    &mut db4,
                    Some(&mut dx4[first * img..][..gs * img]),
                    &mut s,
                );
            }
            finish_weight_grad(&p, &mw, &mut dw4);

            let (mut dw2, mut db2, mut dx2) = (vec![0.0f32; oc * c * 9], vec![0.0f32; oc], vec![0.0f32; x32.len()]);
            let p = winograd::Plan::new(&g, oc, n);
            let u = winograd::transform_weights(&p, &wt32);
            let mut mw = vec![0.0; winograd::XI * oc * c];
            let mut s = vec![0.0; winograd::backward_scratch(&p)];
            for first in (0..n).step_by(p.group) {
                let gs = p.group.min(n - first);
                let (xg, dyg, ag) = (
                    &x32[first * img..][..gs * img],
                    &dy32[first * out..][..gs * out],
                    &arg[first * out..][..gs * out],
                );
                winograd::backward_group(
                    &p,
                    &u,
                    xg,
                    dyg,
                    ag,
                    &mut mw,
                    &mut db2,
                    Some(&mut dx2[first * img..][..gs * img]),
                    &mut s,
                );
            }
            winograd::finish_weight_grad(&p, &mw, &mut dw2);

            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            for (i, what) in ["dx", "dW", "db"].into_iter().enumerate() {
                let (e4, e2) = match i {
                    0 => (rel(&want[0], &f64s(&dx4)), rel(&want[0], &f64s(&dx2))),
                    1 => (rel(&want[1], &f64s(&dw4)), rel(&want[1], &f64s(&dw2))),
                    _ => (rel(&want[2], &f64s(&db4)), rel(&want[2], &f64s(&db2))),
                };
                eprintln!("f32 {:?} {what}: F(4x4) {e4:.1e}, F(2x2) {e2:.1e}", (n, c, oc, h, w));
                assert!(e4 < 2e-5, "f32 {:?} {what}: F(4x4) off by {e4:.2e} of the largest", (n, c, oc, h, w));
            }
        }
    }

    /// The AVX-512 and AVX2 builds give the portable build's bits, each checked where the CPU
    /// runs it (an AVX-512 CPU runs both).
    #[test]
    fn vector_builds_match_portable_bit_for_bit() {
        crate::layers::check_each_vector_isa("its F(4x4) Winograd build", build_matches_portable);
    }

    fn build_matches_portable(build: Isa) {
        let (c, oc, h, w) = (5, 7, 17, 15); // PH 7, PW 6: a missing window in the last tile row
        let g = ConvGeometry::new(c, h, w, 3, 3, 1, 0);
        let p = Plan::new(&g, oc, 3);
        let n = p.group; // one whole group (2 or 3 images, as the thread count allows)
        let u = transform_weights(&p, &fill::<f32>(oc * c * 9, 1));
        let x = fill::<f32>(n * c * h * w, 3);
        // Winners from the forward of the f32 block (im2col + GEMM), whose windows live or not.
        let mut b = block::<f32>(c, oc, false);
        let y = b.forward(&from_vec(&[n, c, h, w], x.clone()), Ctx::eval());
        let (arg, dy) = (b.winners().to_vec(), fill::<f32>(y.len(), 4));
        assert!(arg.contains(&DEAD) && arg.iter().any(|&a| a != DEAD), "dead and live windows");
        // The forward, with a NaN pixel (its windows' values must be NaN both ways).
        let (bias, mut xn) = (fill::<f32>(oc, 2), x.clone());
        xn[17] = f32::NAN;
        let out = n * oc * p.ph * p.pw;
        let (mut s, mut wins) = (vec![0.0; forward_scratch(&p)], vec![0; 4 * n * p.tiles()]);
        let (mut y1, mut a1, mut y2, mut a2) = (vec![0.0; out], vec![0; out], vec![0.0; out], vec![0; out]);
        forward_group_on(build, &p, &u, &bias, &xn, &mut y1, &mut a1, &mut s, &mut wins);
        forward_group_impl(&p, &u, &bias, &xn, &mut y2, &mut a2, &mut s, &mut wins);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y1), bits(&y2), "{build:?} forward y");
        assert_eq!(a1, a2, "{build:?} forward winners");
        assert!(y1.iter().any(|v| v.is_nan()) && a1.contains(&DEAD), "a NaN window and a dead one");

        let mut s = vec![0.0; backward_scratch(&p)];
        let (mut mw1, mut mw2) = (vec![0.0; XI * oc * c], vec![0.0; XI * oc * c]);
        let (mut dx1, mut dx2) = (vec![0.0; n * c * h * w], vec![0.0; n * c * h * w]);
        let (mut db1, mut db2) = (vec![0.0; oc], vec![0.0; oc]);
        backward_group_on(build, &p, &u, &x, &dy, &arg, &mut mw1, &mut db1, Some(&mut dx1), &mut s);
        backward_group_impl(&p, &u, &x, &dy, &arg, &mut mw2, &mut db2, Some(&mut dx2), &mut s);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&mw1), bits(&mw2), "{build:?} backward dW");
        assert_eq!(bits(&db1), bits(&db2), "{build:?} backward db");
        assert_eq!(bits(&dx1), bits(&dx2), "{build:?} backward dx");
        assert!(dx1.iter().any(|&v| v != 0.0) && mw1.iter().any(|&v| v != 0.0));
    }
}
