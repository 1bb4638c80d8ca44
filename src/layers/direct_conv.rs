//! The fused block's direct path for a one-channel input: Conv2d(1 -> OC, 3x3, stride 1, no
//! padding) + ReLU + MaxPool2d(2, 2), computed straight from the image, with no im2col and no
//! GEMM. The model's first block is this case, and through im2col it is a poor GEMM: K = 9, so
//! every product is written out to a (OC, 62*62) plane, read back for the bias, read again for
//! the pool. Here the four conv values of each pooling window are formed in registers, pooled
//! at once, and only the winner leaves. `conv_block.rs` calls this when its shapes allow; the
//! results are the same math in a different order of sums (a test checks both paths agree).
//!
//! Shapes: x (H, W) one image -> conv c (OH, OW) = (H-2, W-2) -> y (PH, PW) = (OH/2, OW/2).
//!
//! The trick that makes it vectorise: split each input row into its even and odd columns,
//!   ev[r][j] = x[r][2j],   od[r][j] = x[r][2j+1].
//! Pooling window (i, j) holds the conv values at rows 2i+dr, columns 2j+dc (dr, dc in {0,1}),
//!   c[2i+dr][2j+dc] = b + sum_{kh,kw} w[kh][kw] x[2i+dr+kh][2j+dc+kw],
//! and column 2j+m of x is ev[j + m/2] for even m, od[j + (m-1)/2] for odd m. So for LANES
//! neighbouring windows j..j+LANES every operand is a contiguous run of ev or od: no gathers,
//! no shuffles, and every lane does the same work.
//!
//! Backward (dW and db only: the images' own gradient is never needed). The pooled gradient
//! dy[i][j] flows to the window's winner (dr*, dc*) when it was positive, so
//!   dW[kh][kw] = sum_{i,j} sum_{dr,dc} D_{dr,dc}[i][j] x[2i+dr+kh][2j+dc+kw],
//! with D_{dr,dc}[i][j] = dy[i][j] if (dr, dc) won window (i, j) alive, else 0. Masking dy four
//! ways costs four compares; the sum then runs over contiguous ev/od runs exactly as forward.
//! db = the sum of the live windows' dy, taken in the same pass over dy.

use super::conv2d::ConvGeometry;
use super::conv_block::{conv3x3_pool2, DEAD};
use super::{Conv2d, Isa, MaxPool2d};
use crate::tensor::Float;

/// Windows handled side by side: one 512-bit vector of f32 with AVX-512, two 256-bit ones with
/// AVX2 (the f64 checks use it too).
const LANES: usize = 16;

/// Whether the direct path computes this block for input shape (N, C, H, W).
pub fn applies<T: Float>(conv: &Conv2d<T>, pool: &MaxPool2d, input: &[usize]) -> bool {
    conv3x3_pool2(conv, pool, input) && input[1] == 1
}

/// Sizes of one image on the direct path.
#[derive(Clone, Copy)]
pub struct Plan {
    h: usize,
    /// Conv output width (OW = W - 2): winners are stored as oh * OW + ow, like the GEMM path.
    ow: usize,
    ph: usize,
    pw: usize,
    /// Row length of ev and od: PW rounded up to LANES, plus LANES (room to read j + 1).
    stride: usize,
}

impl Plan {
    pub fn new(g: &ConvGeometry) -> Self {
        let (ph, pw) = (g.oh / 2, g.ow / 2);
        Plan { h: g.h, ow: g.ow, ph, pw, stride: pw.div_ceil(LANES) * LANES + LANES }
    }
    /// Floats of scratch one image needs (ev and od).
    pub fn scratch(&self) -> usize {
        2 * self.h * self.stride
    }
}

/// ev and od (H, stride) each, from one image x (H, W); columns past the image are zero.
#[inline(always)]
/// Only the pixels some pooled window reads are copied (rows and columns 0 ..= 2*PH+1 and
/// 0 ..= 2*PW+1): an odd last conv row or column is never pooled, and its pixels must not reach
/// the lanes of the runs that hang over a row's end either.
fn deinterleave<T: Float>(p: &Plan, x: &[T], scratch: &mut [T]) {
    let w = x.len() / p.h;
    let (ev, od) = scratch.split_at_mut(p.h * p.stride);
    ev.fill(T::zero());
    od.fill(T::zero());
    for (r, row) in x.chunks_exact(w).take(2 * p.ph + 2).enumerate() {
        for (j, pair) in row[..2 * p.pw + 2].chunks(2).enumerate() {
            ev[r * p.stride + j] = pair[0];
            if let Some(&v) = pair.get(1) {
                od[r * p.stride + j] = v;
            }
        }
    }
}

/// One run of LANES values of ev or od, starting at `at`.
#[inline(always)]
fn run<T: Float>(v: &[T], at: usize) -> &[T; LANES] {
    v[at..at + LANES].try_into().unwrap()
}

/// Forward for one image: y (OC, PH, PW) and winners (OC, PH, PW), from x (H, W), weights
/// (OC, 9) and bias (OC). `scratch` holds `plan.scratch()` floats.
/// This is the portable version, the readable reference; `forward` picks the AVX-512 one when it
/// can, and a test checks the two agree bit for bit.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::neg_cmp_op_on_partial_ord)]
pub fn forward_image<T: Float>(p: &Plan, x: &[T], wt: &[T], b: &[T], y: &mut [T], arg: &mut [u32], scratch: &mut [T]) {
    deinterleave(p, x, scratch);
    let (ev, od) = scratch.split_at(p.h * p.stride);
    let plane = p.ph * p.pw;
    for (o, (yo, ao)) in y.chunks_exact_mut(plane).zip(arg.chunks_exact_mut(plane)).enumerate() {
        let w: &[T; 9] = wt[o * 9..][..9].try_into().unwrap();
        for i in 0..p.ph {
            for jb in (0..p.pw).step_by(LANES) {
                // c[2*dr + dc][l]: conv at (2i+dr, 2(jb+l)+dc), the window's candidates in
                // row-major order, the order the reference pool compares them in.
                let mut c = [[b[o]; LANES]; 4];
                for dr in 0..2 {
                    for kh in 0..3 {
                        let at = (2 * i + dr + kh) * p.stride + jb;
                        let (e0, o0, e1, o1) = (run(ev, at), run(od, at), run(ev, at + 1), run(od, at + 1));
                        let (w0, w1, w2) = (w[3 * kh], w[3 * kh + 1], w[3 * kh + 2]);
                        for l in 0..LANES {
                            c[2 * dr][l] += w0 * e0[l] + w1 * o0[l] + w2 * e1[l]; // columns 2j, 2j+1, 2j+2
                            c[2 * dr + 1][l] += w0 * o0[l] + w1 * e1[l] + w2 * o1[l];
                            // columns 2j+1 .. 2j+3
                        }
                    }
                }
                // Pool + ReLU, branch-free as in `conv_block.rs`: a later candidate wins only
                // if `!(v <= best)` (so NaN wins and spreads); the window is dead if best <= 0.
                let (mut best, mut win) = (c[0], [0u32; LANES]);
                for (s, cs) in c.iter().enumerate().skip(1) {
                    for l in 0..LANES {
                        let take = !(cs[l] <= best[l]);
                        best[l] = if take { cs[l] } else { best[l] };
                        win[l] = if take { s as u32 } else { win[l] };
                    }
                }
                let (mut yv, mut av) = ([T::zero(); LANES], [DEAD; LANES]);
                for l in 0..LANES {
                    let (dr, dc) = (win[l] >> 1, win[l] & 1);
                    let at = (2 * i as u32 + dr) * p.ow as u32 + 2 * (jb + l) as u32 + dc;
                    let dead = best[l] <= T::zero();
                    yv[l] = if dead { T::zero() } else { best[l] };
                    av[l] = if dead { DEAD } else { at };
                }
                let live = LANES.min(p.pw - jb); // the last run of a row may hang over its end
                yo[i * p.pw + jb..][..live].copy_from_slice(&yv[..live]);
                ao[i * p.pw + jb..][..live].copy_from_slice(&av[..live]);
            }
        }
    }
}

/// dW (OC, 9) and db (OC) += this image's share, from x (H, W), dy (OC, PH, PW) and the
/// forward's winners (db: the sum of the live windows' dy, in the same pass over dy).
/// The portable version, as `forward_image`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn backward_image<T: Float>(
    p: &Plan,
    x: &[T],
    dy: &[T],
    arg: &[u32],
    dw: &mut [T],
    db: &mut [T],
    scratch: &mut [T],
) {
    deinterleave(p, x, scratch);
    let (ev, od) = scratch.split_at(p.h * p.stride);
    let plane = p.ph * p.pw;
    for (o, (dyo, ao)) in dy.chunks_exact(plane).zip(arg.chunks_exact(plane)).enumerate() {
        // acc[3*kh + kw][l]: lane l's running share of dW[o][kh][kw], summed at the end.
        let (mut acc, mut dba) = ([[T::zero(); LANES]; 9], [T::zero(); LANES]);
        for i in 0..p.ph {
            for jb in (0..p.pw).step_by(LANES) {
                // d[2*dr + dc][l] = dy of window (i, jb+l) if candidate (dr, dc) won it alive.
                // Lanes past the row's end stay 0 (their windows do not exist).
                let (mut dyv, mut av) = ([T::zero(); LANES], [DEAD; LANES]);
                let live = LANES.min(p.pw - jb);
                dyv[..live].copy_from_slice(&dyo[i * p.pw + jb..][..live]);
                av[..live].copy_from_slice(&ao[i * p.pw + jb..][..live]);
                for l in 0..LANES {
                    dba[l] += if av[l] != DEAD { dyv[l] } else { T::zero() };
                }
                let mut d = [[T::zero(); LANES]; 4];
                for (s, off) in [0, 1, p.ow as u32, p.ow as u32 + 1].into_iter().enumerate() {
                    for l in 0..LANES {
                        let corner = (2 * i * p.ow + 2 * (jb + l)) as u32;
                        d[s][l] = if av[l] == corner + off { dyv[l] } else { T::zero() };
                    }
                }
                for dr in 0..2 {
                    for kh in 0..3 {
                        let at = (2 * i + dr + kh) * p.stride + jb;
                        let (e0, o0, e1, o1) = (run(ev, at), run(od, at), run(ev, at + 1), run(od, at + 1));
                        let (d0, d1) = (&d[2 * dr], &d[2 * dr + 1]);
                        for l in 0..LANES {
                            acc[3 * kh][l] += d0[l] * e0[l] + d1[l] * o0[l]; // kw = 0: columns 2j, 2j+1
                            acc[3 * kh + 1][l] += d0[l] * o0[l] + d1[l] * e1[l]; // kw = 1: 2j+1, 2j+2
                            acc[3 * kh + 2][l] += d0[l] * e1[l] + d1[l] * o1[l];
                            // kw = 2: 2j+2, 2j+3
                        }
                    }
                }
            }
        }
        for (t, a) in acc.iter().enumerate() {
            dw[o * 9 + t] += a.iter().fold(T::zero(), |s, &v| s + v);
        }
        db[o] += dba.iter().fold(T::zero(), |s, &v| s + v);
    }
}

/// The same two functions for f32 written with AVX-512 intrinsics, one 16-float vector per run
/// of LANES windows, 32 registers (no spills). Every operation is the portable one in the same
/// order (a product, then the sums as written above; no FMA), so both paths give the same bits,
/// which a test checks. A run hanging over a row's end is loaded and stored under a lane mask.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Plan, DEAD, LANES};
    use std::arch::x86_64::*;

    /// Window corners' column offsets 2l within a run.
    const TWO_L: [i32; LANES] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];

    #[target_feature(enable = "avx512f")]
    fn load(v: &[f32], at: usize) -> __m512 {
        let r: &[f32; LANES] = v[at..at + LANES].try_into().unwrap();
        // SAFETY: `r` is LANES readable floats.
        unsafe { _mm512_loadu_ps(r.as_ptr()) }
    }

    /// What forward and backward both start with: the image split into even and odd columns,
    /// the corners' column offsets 2l, and the four candidates' offsets from a window's corner
    /// in the conv plane (0, 1, OW, OW + 1).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::type_complexity)]
    fn setup<'s>(p: &Plan, x: &[f32], s: &'s mut [f32]) -> (&'s [f32], &'s [f32], __m512i, [__m512i; 4]) {
        super::deinterleave(p, x, s);
        let (ev, od) = s.split_at(p.h * p.stride);
        // SAFETY: TWO_L holds LANES i32.
        let two_l = unsafe { _mm512_loadu_si512(TWO_L.as_ptr().cast()) };
        let ow = p.ow as i32;
        (ev, od, two_l, [0, 1, ow, ow + 1].map(|v| _mm512_set1_epi32(v)))
    }

    /// The lanes of a run starting at column jb that are real windows (jb + l < PW).
    fn live_mask(p: &Plan, jb: usize) -> __mmask16 {
        let live = LANES.min(p.pw - jb);
        ((1u32 << live) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    pub fn forward_image(p: &Plan, x: &[f32], wt: &[f32], b: &[f32], y: &mut [f32], arg: &mut [u32], s: &mut [f32]) {
        let (ev, od, two_l, offs) = setup(p, x, s);
        let plane = p.ph * p.pw;
        for (o, (yo, ao)) in y.chunks_exact_mut(plane).zip(arg.chunks_exact_mut(plane)).enumerate() {
            let w: [__m512; 9] = std::array::from_fn(|t| _mm512_set1_ps(wt[o * 9 + t]));
            for i in 0..p.ph {
                for jb in (0..p.pw).step_by(LANES) {
                    let mut c = [_mm512_set1_ps(b[o]); 4];
                    for dr in 0..2 {
                        for kh in 0..3 {
                            let at = (2 * i + dr + kh) * p.stride + jb;
                            let (e0, o0, e1, o1) = (load(ev, at), load(od, at), load(ev, at + 1), load(od, at + 1));
                            let (w0, w1, w2) = (w[3 * kh], w[3 * kh + 1], w[3 * kh + 2]);
                            let t0 = _mm512_add_ps(
                                _mm512_add_ps(_mm512_mul_ps(w0, e0), _mm512_mul_ps(w1, o0)),
                                _mm512_mul_ps(w2, e1),
                            );
                            let t1 = _mm512_add_ps(
                                _mm512_add_ps(_mm512_mul_ps(w0, o0), _mm512_mul_ps(w1, e1)),
                                _mm512_mul_ps(w2, o1),
                            );
                            c[2 * dr] = _mm512_add_ps(c[2 * dr], t0);
                            c[2 * dr + 1] = _mm512_add_ps(c[2 * dr + 1], t1);
                        }
                    }
                    // !(v <= best) is "not less-or-equal, unordered": true for NaN too.
                    let (mut best, mut off) = (c[0], offs[0]);
                    for s in 1..4 {
                        let take = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(c[s], best);
                        best = _mm512_mask_blend_ps(take, best, c[s]);
                        off = _mm512_mask_blend_epi32(take, off, offs[s]);
                    }
                    let corner = _mm512_add_epi32(_mm512_set1_epi32((2 * i * p.ow + 2 * jb) as i32), two_l);
                    let dead = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(best, _mm512_setzero_ps()); // false for NaN
                    let yv = _mm512_mask_blend_ps(dead, best, _mm512_setzero_ps());
                    let at =
                        _mm512_mask_blend_epi32(dead, _mm512_add_epi32(corner, off), _mm512_set1_epi32(DEAD as i32));
                    let (yr, ar) = (&mut yo[i * p.pw + jb..], &mut ao[i * p.pw + jb..]);
                    let live = live_mask(p, jb);
                    // SAFETY: the mask covers min(LANES, PW - jb) lanes, all inside both rows.
                    unsafe {
                        _mm512_mask_storeu_ps(yr.as_mut_ptr(), live, yv);
                        _mm512_mask_storeu_epi32(ar.as_mut_ptr().cast(), live, at);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_image(p: &Plan, x: &[f32], dy: &[f32], arg: &[u32], dw: &mut [f32], db: &mut [f32], s: &mut [f32]) {
        let (ev, od, two_l, offs) = setup(p, x, s);
        let plane = p.ph * p.pw;
        let dead = _mm512_set1_epi32(DEAD as i32);
        for (o, (dyo, ao)) in dy.chunks_exact(plane).zip(arg.chunks_exact(plane)).enumerate() {
            let (mut acc, mut dba) = ([_mm512_setzero_ps(); 9], _mm512_setzero_ps());
            for i in 0..p.ph {
                for jb in (0..p.pw).step_by(LANES) {
                    let (dyr, ar) = (&dyo[i * p.pw + jb..], &ao[i * p.pw + jb..]);
                    // Lanes past the row's end: dy = 0 and no winner, as on the portable path.
                    let live = live_mask(p, jb);
                    // SAFETY: the mask covers min(LANES, PW - jb) lanes, all inside both rows.
                    let (dyv, av) = unsafe {
                        let av = _mm512_mask_loadu_epi32(_mm512_set1_epi32(DEAD as i32), live, ar.as_ptr().cast());
                        (_mm512_maskz_loadu_ps(live, dyr.as_ptr()), av)
                    };
                    dba = _mm512_add_ps(dba, _mm512_maskz_mov_ps(_mm512_cmpneq_epi32_mask(av, dead), dyv));
                    let corner = _mm512_add_epi32(_mm512_set1_epi32((2 * i * p.ow + 2 * jb) as i32), two_l);
                    let d: [__m512; 4] = std::array::from_fn(|s| {
                        let won = _mm512_cmpeq_epi32_mask(av, _mm512_add_epi32(corner, offs[s]));
                        _mm512_maskz_mov_ps(won, dyv)
                    });
                    for dr in 0..2 {
                        for kh in 0..3 {
                            let at = (2 * i + dr + kh) * p.stride + jb;
                            let (e0, o0, e1, o1) = (load(ev, at), load(od, at), load(ev, at + 1), load(od, at + 1));
                            let (d0, d1) = (d[2 * dr], d[2 * dr + 1]);
                            let mac = |a: __m512, x0: __m512, x1: __m512| {
                                _mm512_add_ps(a, _mm512_add_ps(_mm512_mul_ps(d0, x0), _mm512_mul_ps(d1, x1)))
                            };
                            acc[3 * kh] = mac(acc[3 * kh], e0, o0);
                            acc[3 * kh + 1] = mac(acc[3 * kh + 1], o0, e1);
                            acc[3 * kh + 2] = mac(acc[3 * kh + 2], e1, o1);
                        }
                    }
                }
            }
            for (t, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; LANES];
                // SAFETY: `lanes` holds LANES floats.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
                dw[o * 9 + t] += lanes.iter().fold(0.0, |s, &v| s + v);
            }
            let mut lanes = [0f32; LANES];
            // SAFETY: `lanes` holds LANES floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), dba) };
            db[o] += lanes.iter().fold(0.0, |s, &v| s + v);
        }
    }
}

/// The same two functions for f32 with AVX2, for CPUs without AVX-512 (an AMD Zen 3, say): a
/// run of LANES = 16 windows is two 8-float vectors, every operation the portable one in the same
/// order (no FMA), so the bits are again the portable code's, which a test checks. The run that
/// hangs over a row's end goes through a 16-float buffer instead of a lane mask.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Plan, DEAD, LANES};
    use std::arch::x86_64::*;

    /// LANES floats (or i32) as two halves.
    type V = [__m256; 2];
    type Vi = [__m256i; 2];

    #[target_feature(enable = "avx2")]
    fn load(v: &[f32], at: usize) -> V {
        let r: &[f32; LANES] = v[at..at + LANES].try_into().unwrap();
        // SAFETY: `r` is LANES readable floats; each half reads 8 of them.
        unsafe { [_mm256_loadu_ps(r.as_ptr()), _mm256_loadu_ps(r.as_ptr().add(8))] }
    }
    #[target_feature(enable = "avx2")]
    fn load_i(v: &[u32; LANES]) -> Vi {
        // SAFETY: `v` is LANES readable u32; each half reads 8 of them.
        unsafe { [_mm256_loadu_si256(v.as_ptr().cast()), _mm256_loadu_si256(v.as_ptr().add(8).cast())] }
    }
    #[target_feature(enable = "avx2")]
    fn store(v: V) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        // SAFETY: `out` holds LANES floats; each half writes 8 of them.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
        }
        out
    }
    #[target_feature(enable = "avx2")]
    fn store_i(v: Vi) -> [u32; LANES] {
        let mut out = [0u32; LANES];
        // SAFETY: `out` holds LANES u32; each half writes 8 of them.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().cast(), v[0]);
            _mm256_storeu_si256(out.as_mut_ptr().add(8).cast(), v[1]);
        }
        out
    }
    #[target_feature(enable = "avx2")]
    fn splat(v: f32) -> V {
        [_mm256_set1_ps(v); 2]
    }
    #[target_feature(enable = "avx2")]
    fn splat_i(v: u32) -> Vi {
        [_mm256_set1_epi32(v as i32); 2]
    }
    #[target_feature(enable = "avx2")]
    fn add(a: V, b: V) -> V {
        [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])]
    }
    #[target_feature(enable = "avx2")]
    fn mul(a: V, b: V) -> V {
        [_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])]
    }
    #[target_feature(enable = "avx2")]
    fn add_i(a: Vi, b: Vi) -> Vi {
        [_mm256_add_epi32(a[0], b[0]), _mm256_add_epi32(a[1], b[1])]
    }
    /// All-ones lanes where a == b.
    #[target_feature(enable = "avx2")]
    fn eq_i(a: Vi, b: Vi) -> V {
        [_mm256_castsi256_ps(_mm256_cmpeq_epi32(a[0], b[0])), _mm256_castsi256_ps(_mm256_cmpeq_epi32(a[1], b[1]))]
    }
    /// v where the mask is set, +0 elsewhere (as the portable `if won { dy } else { 0 }`).
    #[target_feature(enable = "avx2")]
    fn and(mask: V, v: V) -> V {
        [_mm256_and_ps(mask[0], v[0]), _mm256_and_ps(mask[1], v[1])]
    }
    /// b where the mask is set, a elsewhere.
    #[target_feature(enable = "avx2")]
    fn blend(a: V, b: V, mask: V) -> V {
        [_mm256_blendv_ps(a[0], b[0], mask[0]), _mm256_blendv_ps(a[1], b[1], mask[1])]
    }
    #[target_feature(enable = "avx2")]
    fn blend_i(a: Vi, b: Vi, mask: V) -> Vi {
        let f = |a: __m256i, b: __m256i, m: __m256| {
            _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), m))
        };
        [f(a[0], b[0], mask[0]), f(a[1], b[1], mask[1])]
    }

    #[target_feature(enable = "avx2")]
    pub fn forward_image(p: &Plan, x: &[f32], wt: &[f32], b: &[f32], y: &mut [f32], arg: &mut [u32], s: &mut [f32]) {
        super::deinterleave(p, x, s);
        let (ev, od) = s.split_at(p.h * p.stride);
        let plane = p.ph * p.pw;
        let two_l = load_i(&std::array::from_fn(|l| 2 * l as u32));
        let ow = p.ow as u32;
        let offs = [0, 1, ow, ow + 1].map(|v| splat_i(v));
        for (o, (yo, ao)) in y.chunks_exact_mut(plane).zip(arg.chunks_exact_mut(plane)).enumerate() {
            let w: [V; 9] = std::array::from_fn(|t| splat(wt[o * 9 + t]));
            for i in 0..p.ph {
                for jb in (0..p.pw).step_by(LANES) {
                    let mut c = [splat(b[o]); 4];
                    for dr in 0..2 {
                        for kh in 0..3 {
                            let at = (2 * i + dr + kh) * p.stride + jb;
                            let (e0, o0, e1, o1) = (load(ev, at), load(od, at), load(ev, at + 1), load(od, at + 1));
                            let (w0, w1, w2) = (w[3 * kh], w[3 * kh + 1], w[3 * kh + 2]);
                            let t0 = add(add(mul(w0, e0), mul(w1, o0)), mul(w2, e1));
                            let t1 = add(add(mul(w0, o0), mul(w1, e1)), mul(w2, o1));
                            c[2 * dr] = add(c[2 * dr], t0);
                            c[2 * dr + 1] = add(c[2 * dr + 1], t1);
                        }
                    }
                    // !(v <= best) is "not less-or-equal, unordered": true for NaN too.
                    let (mut best, mut off) = (c[0], offs[0]);
                    for s in 1..4 {
                        let take = [
                            _mm256_cmp_ps::<_CMP_NLE_UQ>(c[s][0], best[0]),
                            _mm256_cmp_ps::<_CMP_NLE_UQ>(c[s][1], best[1]),
                        ];
                        best = blend(best, c[s], take);
                        off = blend_i(off, offs[s], take);
                    }
                    let corner = add_i(splat_i((2 * i * p.ow + 2 * jb) as u32), two_l);
                    let zero = splat(0.0);
                    // false for NaN, which stays alive and spreads, as on the portable path
                    let dead =
                        [_mm256_cmp_ps::<_CMP_LE_OQ>(best[0], zero[0]), _mm256_cmp_ps::<_CMP_LE_OQ>(best[1], zero[1])];
                    let (yv, at) =
                        (store(blend(best, zero, dead)), store_i(blend_i(add_i(corner, off), splat_i(DEAD), dead)));
                    let live = LANES.min(p.pw - jb);
                    yo[i * p.pw + jb..][..live].copy_from_slice(&yv[..live]);
                    ao[i * p.pw + jb..][..live].copy_from_slice(&at[..live]);
                }
            }
        }
    }

    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_image(p: &Plan, x: &[f32], dy: &[f32], arg: &[u32], dw: &mut [f32], db: &mut [f32], s: &mut [f32]) {
        super::deinterleave(p, x, s);
        let (ev, od) = s.split_at(p.h * p.stride);
        let plane = p.ph * p.pw;
        let two_l = load_i(&std::array::from_fn(|l| 2 * l as u32));
        let ow = p.ow as u32;
        let offs = [0, 1, ow, ow + 1].map(|v| splat_i(v));
        let dead = splat_i(DEAD);
        for (o, (dyo, ao)) in dy.chunks_exact(plane).zip(arg.chunks_exact(plane)).enumerate() {
            let (mut acc, mut dba) = ([splat(0.0); 9], splat(0.0));
            for i in 0..p.ph {
                for jb in (0..p.pw).step_by(LANES) {
                    // Lanes past the row's end: dy = 0 and no winner, as on the portable path.
                    let (mut dyl, mut al) = ([0f32; LANES], [DEAD; LANES]);
                    let live = LANES.min(p.pw - jb);
                    dyl[..live].copy_from_slice(&dyo[i * p.pw + jb..][..live]);
                    al[..live].copy_from_slice(&ao[i * p.pw + jb..][..live]);
                    let (dyv, av) = (load(&dyl, 0), load_i(&al));
                    let is_dead = eq_i(av, dead);
                    dba = add(dba, [_mm256_andnot_ps(is_dead[0], dyv[0]), _mm256_andnot_ps(is_dead[1], dyv[1])]);
                    let corner = add_i(splat_i((2 * i * p.ow + 2 * jb) as u32), two_l);
                    let d: [V; 4] = std::array::from_fn(|s| and(eq_i(av, add_i(corner, offs[s])), dyv));
                    for dr in 0..2 {
                        for kh in 0..3 {
                            let at = (2 * i + dr + kh) * p.stride + jb;
                            let (e0, o0, e1, o1) = (load(ev, at), load(od, at), load(ev, at + 1), load(od, at + 1));
                            let (d0, d1) = (d[2 * dr], d[2 * dr + 1]);
                            acc[3 * kh] = add(acc[3 * kh], add(mul(d0, e0), mul(d1, o0)));
                            acc[3 * kh + 1] = add(acc[3 * kh + 1], add(mul(d0, o0), mul(d1, e1)));
                            acc[3 * kh + 2] = add(acc[3 * kh + 2], add(mul(d0, e1), mul(d1, o1)));
                        }
                    }
                }
            }
            for (t, a) in acc.iter().enumerate() {
                dw[o * 9 + t] += store(*a).iter().fold(0.0, |s, &v| s + v);
            }
            db[o] += store(dba).iter().fold(0.0, |s, &v| s + v);
        }
    }
}

/// `v` as f32 when T is f32.
fn as_f32<T: Float>(v: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 exactly when the TypeIds agree, so the cast is the identity.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) })
}

fn as_f32_mut<T: Float>(v: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) })
}

/// The build the direct path runs: the CPU's widest vectors for f32, the portable code for f64.
fn isa<T: Float>() -> Isa {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        super::isa()
    } else {
        Isa::Portable
    }
}

/// Whether the direct path beats im2col + GEMM here: with AVX-512 or AVX2 for f32, always for
/// f64 (the gradient checks, which keep the portable version tested). Portable f32 code is
/// slower than the GEMM path (measured against matrixmultiply's), so f32 on a CPU with neither
/// keeps the GEMM path.
pub fn worthwhile<T: Float>() -> bool {
    isa::<T>() != Isa::Portable || std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>()
}

/// Forward for one image (see `forward_image`), on the fastest instruction set available.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Float>(p: &Plan, x: &[T], wt: &[T], b: &[T], y: &mut [T], arg: &mut [u32], scratch: &mut [T]) {
    forward_on(isa::<T>(), p, x, wt, b, y, arg, scratch)
}

/// dW and db for one image (see `backward_image`), on the fastest instruction set available.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Float>(p: &Plan, x: &[T], dy: &[T], arg: &[u32], dw: &mut [T], db: &mut [T], scratch: &mut [T]) {
    backward_on(isa::<T>(), p, x, dy, arg, dw, db, scratch)
}

/// `forward` on a given instruction set, which the caller has checked this CPU runs (and which
/// is Portable for f64).
#[allow(clippy::too_many_arguments)]
fn forward_on<T: Float>(
    isa: Isa,
    p: &Plan,
    x: &[T],
    wt: &[T],
    b: &[T],
    y: &mut [T],
    arg: &mut [u32],
    scratch: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let (x, wt, b) = (as_f32(x).unwrap(), as_f32(wt).unwrap(), as_f32(b).unwrap());
        let (y, scratch) = (as_f32_mut(y).unwrap(), as_f32_mut(scratch).unwrap());
        // SAFETY: the caller checked that the CPU has the instruction set.
        return unsafe {
            match isa {
                Isa::Avx512 => avx512::forward_image(p, x, wt, b, y, arg, scratch),
                _ => avx2::forward_image(p, x, wt, b, y, arg, scratch),
            }
        };
    }
    let _ = isa;
    forward_image(p, x, wt, b, y, arg, scratch)
}

/// `backward` on a given instruction set, as `forward_on`.
#[allow(clippy::too_many_arguments)]
fn backward_on<T: Float>(
    isa: Isa,
    p: &Plan,
    x: &[T],
    dy: &[T],
    arg: &[u32],
    dw: &mut [T],
    db: &mut [T],
    scratch: &mut [T],
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        let (x, dy) = (as_f32(x).unwrap(), as_f32(dy).unwrap());
        let (dw, db, scratch) = (as_f32_mut(dw).unwrap(), as_f32_mut(db).unwrap(), as_f32_mut(scratch).unwrap());
        // SAFETY: the caller checked that the CPU has the instruction set.
        return unsafe {
            match isa {
                Isa::Avx512 => avx512::backward_image(p, x, dy, arg, dw, db, scratch),
                _ => avx2::backward_image(p, x, dy, arg, dw, db, scratch),
            }
        };
    }
    let _ = isa;
    backward_image(p, x, dy, arg, dw, db, scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random fill in [-1, 1).
    fn fill(n: usize, seed: u64) -> Vec<f32> {
        let mut z = seed;
        (0..n)
            .map(|_| {
                z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The dispatching entry points (AVX-512 on this CPU when it has it) give exactly the bits of the
    /// portable reference, for even and odd sizes (odd ones leave a conv row/column unpooled and
    /// a run hanging over the end of a pooled row), and with a NaN pixel.
    /// Each of the AVX-512 and AVX2 versions this CPU runs is checked on its own (an AVX-512
    /// CPU runs both); one it lacks says `skipped`.
    #[test]
    fn fast_paths_match_portable_bit_for_bit() {
        crate::layers::check_each_vector_isa("its direct path", matches_portable);
    }

    /// Which build runs and whether the direct path is taken at all: f32 runs the CPU's widest
    /// vectors and takes the path wherever it has AVX2 or AVX-512; f64 (the gradient checks)
    /// always takes it, in the portable build.
    #[test]
    fn the_build_and_the_choice_follow_the_cpu() {
        assert_eq!(isa::<f32>(), crate::layers::isa());
        assert_eq!(isa::<f64>(), Isa::Portable);
        assert_eq!(worthwhile::<f32>(), crate::layers::isa() != Isa::Portable);
        assert!(worthwhile::<f64>());
    }

    fn matches_portable(isa: Isa) {
        for (h, w, oc) in [(64, 64, 32), (9, 12, 3), (11, 13, 5), (6, 21, 2)] {
            let g = ConvGeometry::new(1, h, w, 3, 3, 1, 0);
            let p = Plan::new(&g);
            let mut x = fill(h * w, 1);
            let (wt, b) = (fill(oc * 9, 2), fill(oc, 3));
            let out = oc * (g.oh / 2) * (g.ow / 2);
            for nan in [false, true] {
                if nan {
                    x[w + 3] = f32::NAN;
                }
                let mut s = vec![0.0; p.scratch()];
                let (mut y1, mut a1) = (vec![0.0; out], vec![0; out]);
                let (mut y2, mut a2) = (vec![0.0; out], vec![0; out]);
                forward_on(isa, &p, &x, &wt, &b, &mut y1, &mut a1, &mut s);
                forward_image(&p, &x, &wt, &b, &mut y2, &mut a2, &mut s);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y1), bits(&y2), "{isa:?} forward y at {h}x{w}, nan={nan}");
                assert_eq!(a1, a2, "{isa:?} forward winners at {h}x{w}, nan={nan}");
                assert!(a1.contains(&DEAD) && a1.iter().any(|&a| a != DEAD), "both kinds of window occur");
                let dy = fill(out, 4);
                let (mut dw1, mut dw2) = (vec![0.5; oc * 9], vec![0.5; oc * 9]);
                let (mut db1, mut db2) = (vec![0.25; oc], vec![0.25; oc]);
                backward_on(isa, &p, &x, &dy, &a1, &mut dw1, &mut db1, &mut s);
                backward_image(&p, &x, &dy, &a1, &mut dw2, &mut db2, &mut s);
                assert_eq!(bits(&dw1), bits(&dw2), "{isa:?} backward dW at {h}x{w}, nan={nan}");
                assert_eq!(bits(&db1), bits(&db2), "{isa:?} backward db at {h}x{w}, nan={nan}");
            }
        }
    }
}
