//! Our own GEMMs for every product the conv layers make (the Winograd paths' and im2col's),
//! where a GEMM library's packing took a third of the products' time (17% of the step against
//! its kernel's 36%): operands here are read as they lie. `tensor::gemm` (matrixmultiply)
//! keeps the linear layers' products, and every product where these kernels do not run.
//!
//! `gemm_nt`: C (M, N) += A (M, K) B (N, K)^T, with both operands stored along K: every
//! entry of C is the dot product of a row of A and a row of B. The weight gradients are
//! products of this shape (the Winograd paths' Mw[xi] = Z[xi] V[xi]^T over a group's tiles,
//! the im2col paths' dW = dY col^T over its columns). A GEMM library packs both operands into
//! panels across K, element by element (neither is stored that way): that packing was 15-17%
//! of the reference's training step (AMD Zen 4, benches/README.md).
//!
//! One dot product, the order the kernel keeps (the portable `dot` below is its definition,
//! and the tests hold the kernel to its bits):
//!   s[l] = fma(a[q + l], b[q + l], s[l])  for q = 0, 16, 32, ... and l = 0..16
//!   (the last, partial chunk only for the lanes l < K mod 16),
//! then the 16 lanes summed as a tree: s[l] + s[l + 8], then + 4, + 2, + 1; then C += that.
//! A fused multiply-add rounds once; `mul_add` is the same operation as the kernel's FMA.
//! The AVX-512 micro-kernel takes 4 rows of A and 4 rows of B: 16 dot products in 16
//! registers, 8 loads per 16 FMAs, and at the end the 16 trees in 30 shuffles and 15 adds
//! instead of 240 scalar adds (see `reduce16`).
//!
//! `gemm_nn`: C (M, N) = A (M, K) B (K, N), B row-major, A by row and column strides (U or
//! U^T, W or W^T): the Winograd forward's M[xi] = U[xi] V[xi] and the backward's Md[xi] =
//! U[xi]^T Z[xi]; im2col's W col and W^T dY.
//! Each entry is c = fma(a[i][q], b[q][j], c) for q = 0, 1, ..., K-1 from c = 0. The AVX-512
//! micro-kernel keeps 8 rows x 48 columns of C in 24 registers: per q, three loads of B's row,
//! eight broadcasts of A's column, 24 FMAs.
//!
//! An AVX2 micro-kernel of `gemm_nn` serves CPUs without AVX-512: 6 rows x 16 columns of C in
//! 12 of AVX2's 16 registers (two loads of B's row, six broadcasts, 12 FMAs per q); plain
//! loads and stores for whole blocks, masked ones only for the last columns (AMD's masked moves
//! are slow: masked everywhere, the kernel ran at half its rate). `gemm_nt` has no AVX2 kernel
//! (`Kernel::Avx2` says why).
//!
//! Where they run (`Kernel::best`, `Kernel::best_nt`): f32 on a CPU with AVX-512F and FMA
//! (`kernels_run`); `gemm_nn` also on one with AVX2 and FMA. Everywhere else (f64, the
//! gradient checks; `gemm_nt` on AVX2-only CPUs; other architectures) the same calls go to
//! `tensor::gemm` (matrixmultiply, with its own AVX2/FMA kernels). The portable code below
//! compiled for AVX2 ran at 13-40 GFLOP/s on one Zen 4 core, so it stays the definition of the
//! order only: one row (`gemm_nn`) or one product (`gemm_nt`) at a time, the tests checking
//! every kernel's bits against it. The results on the two sides differ in rounding only
//! (matrixmultiply's `gemm_nn` order is the same; its dot products are not trees).

use crate::tensor::{gemm, Float};

/// Lanes of partial sums per dot product.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const LANES: usize = 16;

/// Whether our kernels run for T on this CPU: f32 with AVX-512F and FMA (detected once, then
/// cached by std).
pub(crate) fn kernels_run<T: Float>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Which code computes a product. `Kernel::best` is what `gemm_nn` runs and `Kernel::best_nt`
/// what `gemm_nt` runs; the `_on` forms take one by name (the benchmark and the tests compare
/// them on one CPU).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kernel {
    /// Our AVX-512 micro-kernels (f32).
    Avx512,
    /// Our AVX2 micro-kernel of `gemm_nn` (f32), for CPUs without AVX-512. `gemm_nt` has none:
    /// its dot products keep two 256-bit registers each, so a block holds 2 x 3 of them and
    /// reads 10 loads per 12 FMAs, and it ran at 43-75 GFLOP/s where matrixmultiply's AVX2
    /// kernel ran at 66-88 (benches/README.md).
    Avx2,
    /// matrixmultiply (`tensor::gemm`): f64, and CPUs with neither.
    Library,
}

impl Kernel {
    /// The kernel `gemm_nn` runs for T here: AVX-512, else AVX2 (with FMA), else the library.
    pub fn best<T: Float>() -> Kernel {
        [Kernel::Avx512, Kernel::Avx2].into_iter().find(|k| k.runs::<T>()).unwrap_or(Kernel::Library)
    }

    /// The kernel `gemm_nt` runs for T here: AVX-512, else the library.
    pub fn best_nt<T: Float>() -> Kernel {
        if Kernel::Avx512.runs::<T>() {
            Kernel::Avx512
        } else {
            Kernel::Library
        }
    }

    /// Whether this CPU runs the kernel for T.
    pub fn runs<T: Float>(self) -> bool {
        match self {
            Kernel::Library => true,
            Kernel::Avx512 => kernels_run::<T>(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
        }
    }
}

/// C (m, n) += A (m, k) B (n, k)^T, all row-major and contiguous.
pub fn gemm_nt<T: Float>(m: usize, n: usize, k: usize, a: &[T], b: &[T], c: &mut [T]) {
    gemm_nt_on(Kernel::best_nt::<T>(), m, n, k, a, b, c);
}

/// `gemm_nt` by a given kernel (AVX-512 or the library), which this CPU must run for T
/// (`Kernel::runs`).
pub fn gemm_nt_on<T: Float>(kernel: Kernel, m: usize, n: usize, k: usize, a: &[T], b: &[T], c: &mut [T]) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "gemm_nt: operands too short for {m}x{n}x{k}");
    assert!(kernel.runs::<T>(), "gemm_nt: this CPU does not run {kernel:?} for this type");
    assert!(kernel != Kernel::Avx2, "gemm_nt: no Avx2 kernel (see `Kernel::Avx2`)");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        // SAFETY: T is f32 and the CPU has AVX-512F and FMA (`Kernel::runs`), so these are f32
        // slices; the lengths were checked above.
        unsafe { avx512::gemm_nt(m, n, k, f32s(a), f32s(b), f32s_mut(c)) };
        return;
    }
    gemm(false, true, m, n, k, T::one(), a, b, T::one(), c);
}

/// C (m, n) = A B, A (m, k) at `a[i * rsa + q * csa]`, B (k, n) and C row-major.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn<T: Float>(m: usize, n: usize, k: usize, a: &[T], rsa: usize, csa: usize, b: &[T], c: &mut [T]) {
    gemm_nn_on(Kernel::best::<T>(), m, n, k, a, rsa, csa, b, c);
}

/// `gemm_nn` by a given kernel, which this CPU must run for T (`Kernel::runs`).
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_on<T: Float>(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    c: &mut [T],
) {
    let a_end = if m == 0 || k == 0 { 0 } else { (m - 1) * rsa + (k - 1) * csa + 1 };
    assert!(a.len() >= a_end && b.len() >= k * n && c.len() >= m * n, "gemm_nn: operands too short for {m}x{n}x{k}");
    assert!(kernel.runs::<T>(), "gemm_nn: this CPU does not run {kernel:?} for this type");
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: T is f32 and the CPU has the kernel's features (`Kernel::runs`), so these are
        // f32 slices; the lengths were checked above.
        Kernel::Avx512 => return unsafe { avx512::gemm_nn(m, n, k, f32s(a), rsa, csa, f32s(b), f32s_mut(c)) },
        // SAFETY: as above.
        Kernel::Avx2 => return unsafe { avx2::gemm_nn(m, n, k, f32s(a), rsa, csa, f32s(b), f32s_mut(c)) },
        Kernel::Library => {}
    }
    // SAFETY: A's m x k elements at these strides end by `a_end` <= a.len() (checked above),
    // B and C are contiguous and long enough, and C is a unique borrow.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            T::one(),
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            n as isize,
            1,
            T::zero(),
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

/// The f32 slice a `&[T]` is when T is f32.
///
/// # Safety
/// T must be f32.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn f32s<T: Float>(s: &[T]) -> &[f32] {
    std::slice::from_raw_parts(s.as_ptr().cast::<f32>(), s.len())
}

/// # Safety
/// T must be f32.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn f32s_mut<T: Float>(s: &mut [T]) -> &mut [f32] {
    std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len())
}

/// C (m, n) += A B^T one product at a time, in the order the module doc gives: the
/// definition the AVX-512 kernel is tested against.
#[cfg(test)]
fn portable<T: Float>(m: usize, n: usize, k: usize, a: &[T], b: &[T], c: &mut [T]) {
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] += dot(&a[i * k..][..k], &b[j * k..][..k]);
        }
    }
}

/// Rows `rows` of C = A B, one row at a time: c = 0, then c += a[i][q] * b[q] (fused) for each
/// q in order, a run over the row.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn portable_nn<T: Float>(
    rows: std::ops::Range<usize>,
    n: usize,
    k: usize,
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    c: &mut [T],
) {
    for i in rows {
        let ci = &mut c[i * n..][..n];
        ci.fill(T::zero());
        for q in 0..k {
            let s = a[i * rsa + q * csa];
            for (cv, &bv) in ci.iter_mut().zip(&b[q * n..][..n]) {
                *cv = s.mul_add(bv, *cv);
            }
        }
    }
}

/// One dot product: 16 lane sums by FMA, the last chunk partial, then the tree.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    let mut s = [T::zero(); LANES];
    let (xc, yc) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (xs, ys) in xc.zip(yc) {
        for l in 0..LANES {
            s[l] = xs[l].mul_add(ys[l], s[l]);
        }
    }
    for l in 0..xt.len() {
        s[l] = xt[l].mul_add(yt[l], s[l]);
    }
    tree(s)
}

/// The 16 lanes summed as a tree: (l, l + 8), then (l, l + 4), (l, l + 2), (0, 1).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn tree<T: Float>(s: [T; LANES]) -> T {
    let t: [T; 8] = std::array::from_fn(|l| s[l] + s[l + 8]);
    let u: [T; 4] = std::array::from_fn(|l| t[l] + t[l + 4]);
    let v: [T; 2] = std::array::from_fn(|l| u[l] + u[l + 2]);
    v[0] + v[1]
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Full 4x4 blocks by the micro-kernel; the edges (m or n not a multiple of 4) one
    /// product at a time, in the same order.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m4, n4) = (m / 4 * 4, n / 4 * 4);
        for i in (0..m4).step_by(4) {
            for j in (0..n4).step_by(4) {
                // SAFETY: rows i..i+4 of A and j..j+4 of B have k elements each, and C's
                // rows i..i+4 have n >= j + 4 (the caller checked the lengths).
                unsafe { block4x4(a.as_ptr().add(i * k), b.as_ptr().add(j * k), k, c.as_mut_ptr().add(i * n + j), n) }
            }
        }
        for i in 0..m {
            let js = if i < m4 { n4..n } else { 0..n };
            for j in js {
                c[i * n + j] += super::dot(&a[i * k..][..k], &b[j * k..][..k]);
            }
        }
    }

    /// Blocks of 8 rows by the micro-kernel, 48 columns at a time (the last run in as few
    /// vectors as it needs, masked); the rows left over one at a time in the portable order.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_nn(m: usize, n: usize, k: usize, a: &[f32], rsa: usize, csa: usize, b: &[f32], c: &mut [f32]) {
        let m8 = m / 8 * 8;
        for j in (0..n).step_by(48) {
            for i in (0..m8).step_by(8) {
                // SAFETY: rows i..i+8 of A reach a[(i+7)*rsa + (k-1)*csa] < a.len(), B's rows
                // have n columns and the masks stop at n, C's rows i..i+8 exist (the caller
                // checked the lengths).
                unsafe {
                    let (a, b, c, left) =
                        (a.as_ptr().add(i * rsa), b.as_ptr().add(j), c.as_mut_ptr().add(i * n + j), n - j);
                    match left {
                        0..=16 => block8::<1>(a, rsa, csa, b, n, k, c, left),
                        17..=32 => block8::<2>(a, rsa, csa, b, n, k, c, left),
                        _ => block8::<3>(a, rsa, csa, b, n, k, c, left),
                    }
                }
            }
        }
        super::portable_nn(m8..m, n, k, a, rsa, csa, b, c);
    }

    /// C (8 rows at `c`, row stride n) = A's 8 rows x B's columns j..j + min(16 NV, left):
    /// 8 x NV accumulators.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block8<const NV: usize>(
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        n: usize,
        k: usize,
        c: *mut f32,
        left: usize,
    ) {
        let masks: [__mmask16; NV] = std::array::from_fn(|v| {
            let w = left.saturating_sub(16 * v);
            if w >= 16 {
                0xffff
            } else {
                ((1u32 << w) - 1) as u16
            }
        });
        let mut acc = [[_mm512_setzero_ps(); NV]; 8];
        for q in 0..k {
            let row = b.add(q * n);
            let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], row.wrapping_add(16 * v)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let s = _mm512_set1_ps(*a.add(i * rsa + q * csa));
                for v in 0..NV {
                    acc[v] = _mm512_fmadd_ps(s, bv[v], acc[v]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..NV {
                // (a vector's lanes past n are all off)
                _mm512_mask_storeu_ps(c.add(i * n).wrapping_add(16 * v), masks[v], acc[v]);
            }
        }
    }

    /// C[i][j] += row i of A . row j of B for the 4x4 block at `c` (row stride ldc).
    /// Accumulator p = i + 4j.
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn block4x4(a: *const f32, b: *const f32, k: usize, c: *mut f32, ldc: usize) {
        let mut acc = [_mm512_setzero_ps(); 16];
        let whole = k / 16 * 16;
        let mut q = 0;
        while q < whole {
            let ar = [0, 1, 2, 3].map(|i| _mm512_loadu_ps(a.add(i * k + q)));
            let br = [0, 1, 2, 3].map(|j| _mm512_loadu_ps(b.add(j * k + q)));
            for j in 0..4 {
                for i in 0..4 {
                    acc[i + 4 * j] = _mm512_fmadd_ps(ar[i], br[j], acc[i + 4 * j]);
                }
            }
            q += 16;
        }
        if whole < k {
            // The partial chunk: only its lanes take the FMA (mask3 keeps the others as they are).
            let mask: __mmask16 = (1u32 << (k - whole)) as u16 - 1;
            let ar = [0, 1, 2, 3].map(|i| _mm512_maskz_loadu_ps(mask, a.add(i * k + q)));
            let br = [0, 1, 2, 3].map(|j| _mm512_maskz_loadu_ps(mask, b.add(j * k + q)));
            for j in 0..4 {
                for i in 0..4 {
                    acc[i + 4 * j] = _mm512_mask3_fmadd_ps(ar[i], br[j], acc[i + 4 * j], mask);
                }
            }
        }
        let sums = reduce16(acc);
        // 128-bit lane i holds row i: p = i + 4j for j = 0..4.
        let lanes = [
            _mm512_extractf32x4_ps::<0>(sums),
            _mm512_extractf32x4_ps::<1>(sums),
            _mm512_extractf32x4_ps::<2>(sums),
            _mm512_extractf32x4_ps::<3>(sums),
        ];
        for (i, lane) in lanes.into_iter().enumerate() {
            let row = c.add(i * ldc);
            _mm_storeu_ps(row, _mm_add_ps(_mm_loadu_ps(row), lane));
        }
    }

    /// The 16 accumulators' trees at once (`tree`'s adds, the same pairs): 128-bit lane i of
    /// the result holds the sums of accumulators i, i + 4, i + 8, i + 12.
    #[target_feature(enable = "avx512f")]
    fn reduce16(acc: [__m512; 16]) -> __m512 {
        // t = s[l] + s[l + 8]: two accumulators per register, as [t_2p | t_2p+1].
        let t: [__m512; 8] = std::array::from_fn(|p| {
            let (x, y) = (acc[2 * p], acc[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y))
        });
        // u = t[l] + t[l + 4]: four per register, [u_4q | u_4q+1 | u_4q+2 | u_4q+3].
        let u: [__m512; 4] = std::array::from_fn(|q| {
            let (x, y) = (t[2 * q], t[2 * q + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
        });
        // v = u[l] + u[l + 2]: 128-bit lane i of w_r is [v_8r+i (2) | v_8r+4+i (2)].
        let v: [__m512; 2] = std::array::from_fn(|r| {
            let (x, y) = (u[2 * r], u[2 * r + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y))
        });
        // w = v[0] + v[1]: lane i is [w_i, w_4+i, w_8+i, w_12+i].
        _mm512_add_ps(_mm512_shuffle_ps::<0x88>(v[0], v[1]), _mm512_shuffle_ps::<0xDD>(v[0], v[1]))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Lane masks for `maskload` / `maskstore`: the first `w` of eight lanes (w <= 8).
    #[target_feature(enable = "avx2")]
    fn first(w: usize) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(w as i32), lanes)
    }

    /// Blocks of 6 rows by 16 columns (12 accumulators, two loads of B's row and six
    /// broadcasts of A's column per q), the last columns masked, the last rows (m mod 6) a
    /// smaller block.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm_nn(m: usize, n: usize, k: usize, a: &[f32], rsa: usize, csa: usize, b: &[f32], c: &mut [f32]) {
        for j in (0..n).step_by(16) {
            for i in (0..m).step_by(6) {
                // SAFETY: rows i..min(i+6, m) of A reach a[(m-1)*rsa + (k-1)*csa] < a.len(),
                // B's rows have n columns and the masks stop at n, C's rows exist (the caller
                // checked the lengths).
                unsafe {
                    let (a, b, c, left) =
                        (a.as_ptr().add(i * rsa), b.as_ptr().add(j), c.as_mut_ptr().add(i * n + j), n - j);
                    macro_rules! rows {
                        ($r:literal) => {
                            if left >= 16 {
                                block::<$r, true>(a, rsa, csa, b, n, k, c, left)
                            } else {
                                block::<$r, false>(a, rsa, csa, b, n, k, c, left)
                            }
                        };
                    }
                    match m - i {
                        1 => rows!(1),
                        2 => rows!(2),
                        3 => rows!(3),
                        4 => rows!(4),
                        5 => rows!(5),
                        _ => rows!(6),
                    }
                }
            }
        }
    }

    /// C (R rows at `c`, row stride n) = A's R rows x B's columns j..j + min(16, left); WHOLE
    /// (left >= 16) with plain loads and stores, else masked ones (AMD's masked moves are slow:
    /// in every block they halved the kernel's rate).
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize, const WHOLE: bool>(
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        n: usize,
        k: usize,
        c: *mut f32,
        left: usize,
    ) {
        let masks = [first(left.min(8)), first(left.saturating_sub(8).min(8))];
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for q in 0..k {
            let row = b.add(q * n);
            let bv = [0, 1].map(|v| {
                if WHOLE {
                    _mm256_loadu_ps(row.add(8 * v))
                } else {
                    _mm256_maskload_ps(row.wrapping_add(8 * v), masks[v])
                }
            });
            for (i, acc) in acc.iter_mut().enumerate() {
                let s = _mm256_broadcast_ss(&*a.add(i * rsa + q * csa));
                for v in 0..2 {
                    acc[v] = _mm256_fmadd_ps(s, bv[v], acc[v]);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for v in 0..2 {
                if WHOLE {
                    _mm256_storeu_ps(c.add(i * n + 8 * v), acc[v]);
                } else {
                    // (a vector's lanes past n are all off)
                    _mm256_maskstore_ps(c.add(i * n).wrapping_add(8 * v), masks[v], acc[v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::winograd::tests::fill;

    /// The largest difference of `got` from the f64 sums `want`.
    fn worst<T: Float>(want: &[f64], got: &[T]) -> f64 {
        want.iter().zip(got).fold(0.0f64, |w, (x, y)| w.max((x - y.as_f64()).abs()))
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    /// Shapes that reach every branch: whole 4x4 blocks, edge rows and columns (m or n not a
    /// multiple of 4, or below 4), K shorter than, equal to and longer than 16, with and without
    /// a partial chunk.
    const SHAPES: [(usize, usize, usize); 13] = [
        (1, 1, 1),
        (8, 3, 20),
        (2, 2, 16),
        (3, 5, 7),
        (4, 4, 16),
        (4, 4, 17),
        (4, 25, 1024),
        (5, 4, 33),
        (8, 8, 15),
        (9, 13, 98),
        (7, 9, 100),
        (12, 8, 3),
        (64, 32, 450),
    ];

    /// C += A B^T, against the sums taken in f64 one term at a time, onto a C that already
    /// holds values, in f32 (the kernel's type) and f64 (the portable code).
    #[test]
    fn adds_the_products_of_rows() {
        for (m, n, k) in SHAPES {
            let (a, b, c0) = (fill::<f64>(m * k, 1), fill::<f64>(n * k, 2), fill::<f64>(m * n, 3));
            let want: Vec<f64> = (0..m * n)
                .map(|e| c0[e] + (0..k).map(|q| a[(e / n) * k + q] * b[(e % n) * k + q]).sum::<f64>())
                .collect();
            let mut got = c0.clone();
            gemm_nt(m, n, k, &a, &b, &mut got);
            assert!(worst(&want, &got) < 1e-13 * k as f64, "f64 ({m}, {n}, {k}): {:e}", worst(&want, &got));
            let mut got32 = to_f32(&c0);
            gemm_nt(m, n, k, &to_f32(&a), &to_f32(&b), &mut got32);
            assert!(worst(&want, &got32) < 1e-6 * k as f64, "f32 ({m}, {n}, {k}): {:e}", worst(&want, &got32));
        }
    }

    /// Runs `check` for each of `kernels` this CPU runs; for one it does not, says `skipped` (a
    /// failure under MEDCNN_REQUIRE_AVX512=1 / MEDCNN_REQUIRE_AVX2=1).
    fn with_kernels(kernels: &[Kernel], what: &str, check: impl Fn(Kernel)) {
        for &kernel in kernels {
            let (name, needs) = match kernel {
                Kernel::Avx512 => ("AVX512", "AVX-512F and FMA"),
                _ => ("AVX2", "AVX2 and FMA"),
            };
            if kernel.runs::<f32>() {
                check(kernel);
            } else {
                crate::layers::skip_unless_required(
                    name,
                    &format!("no {needs} on this CPU: {what} ({kernel:?}) is not checked"),
                );
            }
        }
    }

    /// The AVX-512 micro-kernel (its shuffled trees included) gives the portable code's bits,
    /// for every shape above, and writes nothing past C.
    #[test]
    fn kernel_matches_portable_bit_for_bit() {
        with_kernels(&[Kernel::Avx512], "gemm_nt's kernel", |kernel| {
            for (m, n, k) in SHAPES {
                // NaN past A and B, and four guard elements past C: a kernel that ran past the
                // last rows would read the NaNs into the guards.
                let nan_tail = |mut v: Vec<f32>, len: usize| {
                    v.resize(len + 4 * k, f32::NAN);
                    v
                };
                let (a, b) = (nan_tail(fill::<f32>(m * k, 4), m * k), nan_tail(fill::<f32>(n * k, 5), n * k));
                let (a, b) = (&a[..m * k], &b[..n * k]);
                let (mut got, mut want) = (fill::<f32>(m * n + 4, 6), fill::<f32>(m * n + 4, 6));
                gemm_nt_on(kernel, m, n, k, a, b, &mut got[..m * n]);
                portable(m, n, k, a, b, &mut want[..m * n]);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{kernel:?} ({m}, {n}, {k})");
            }
        });
    }

    /// Shapes for `gemm_nn`: whole 8-row (AVX-512) and 6-row (AVX2) blocks and every count of
    /// rows left over, runs of 48 (16) columns and a last run of one, two or three vectors (one
    /// or two halves), whole or masked; K of 1 and more.
    const NN_SHAPES: [(usize, usize, usize); 11] = [
        (14, 17, 7),
        (9, 33, 4),
        (1, 1, 1),
        (12, 32, 1),
        (12, 7, 5),
        (13, 20, 9),
        (24, 33, 16),
        (25, 64, 32),
        (5, 48, 3),
        (36, 450, 32),
        (64, 98, 128),
    ];

    /// C = A B against sums in f64, A as stored (rows along K) and transposed (`U^T`: rows
    /// along M), over a C full of old values that must go.
    #[test]
    fn gemm_nn_gives_the_product() {
        for (m, n, k) in NN_SHAPES {
            let (a, b) = (fill::<f64>(m * k, 7), fill::<f64>(k * n, 8));
            for (rsa, csa) in [(k, 1), (1, m)] {
                let at = |i: usize, q: usize| a[i * rsa + q * csa];
                let want: Vec<f64> =
                    (0..m * n).map(|e| (0..k).map(|q| at(e / n, q) * b[q * n + e % n]).sum()).collect();
                let mut got = fill::<f64>(m * n, 9);
                gemm_nn(m, n, k, &a, rsa, csa, &b, &mut got);
                let what = format!("({m}, {n}, {k}) strides ({rsa}, {csa})");
                assert!(worst(&want, &got) < 1e-13 * k as f64, "f64 {what}: {:e}", worst(&want, &got));
                let mut got32 = to_f32(&fill::<f64>(m * n, 9));
                gemm_nn(m, n, k, &to_f32(&a), rsa, csa, &to_f32(&b), &mut got32);
                assert!(worst(&want, &got32) < 1e-6 * k as f64, "f32 {what}: {:e}", worst(&want, &got32));
            }
        }
    }

    /// Each micro-kernel of `gemm_nn` (masked ends included) gives the portable code's bits;
    /// nothing past a row's n columns is written.
    #[test]
    fn gemm_nn_kernel_matches_portable_bit_for_bit() {
        with_kernels(&[Kernel::Avx512, Kernel::Avx2], "gemm_nn's kernel", |kernel| {
            for (m, n, k) in NN_SHAPES {
                let (a, b) = (fill::<f32>(m * k, 10), fill::<f32>(k * n, 11));
                for (rsa, csa) in [(k, 1), (1, m)] {
                    // One guard element past C: the masked stores must leave it.
                    let (mut got, mut want) = (fill::<f32>(m * n + 1, 12), fill::<f32>(m * n + 1, 12));
                    gemm_nn_on(kernel, m, n, k, &a, rsa, csa, &b, &mut got[..m * n]);
                    portable_nn(0..m, n, k, &a, rsa, csa, &b, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{kernel:?} ({m}, {n}, {k}) strides ({rsa}, {csa})");
                }
            }
        });
    }

    /// Empty products: no rows or columns leave C as it is (`gemm_nt` adds nothing); K = 0
    /// makes C = A B all zeros (`gemm_nn` overwrites), and neither reads A or B.
    #[test]
    fn empty_shapes() {
        for (m, n, k) in [(0, 5, 3), (4, 0, 3), (3, 4, 0), (0, 0, 0)] {
            let (a, b) = (fill::<f32>(m * k, 13), fill::<f32>(n * k, 14));
            let mut c = fill::<f32>(m * n, 15);
            gemm_nt(m, n, k, &a, &b, &mut c);
            assert_eq!(c, fill::<f32>(m * n, 15), "gemm_nt ({m}, {n}, {k})");
            gemm_nn(m, n, k, &a, k, 1, &b, &mut c);
            assert!(c.iter().all(|&v| v == 0.0), "gemm_nn ({m}, {n}, {k}): {c:?}");
        }
    }

    /// An operand one element short is refused with the checks' message (on either path, before
    /// any unchecked read), A by either stride order.
    #[test]
    fn short_operands_are_refused() {
        let refused = |f: &dyn Fn()| {
            let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("accepted");
            let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(msg.contains("operands too short"), "{msg}");
        };
        let (m, n, k) = (5, 6, 7);
        let (a, b, c) = (fill::<f32>(m * k, 1), fill::<f32>(n * k, 2), fill::<f32>(m * n, 3));
        refused(&|| gemm_nt(m, n, k, &a[1..], &b, &mut c.clone()));
        refused(&|| gemm_nt(m, n, k, &a, &b[1..], &mut c.clone()));
        refused(&|| gemm_nt(m, n, k, &a, &b, &mut c.clone()[1..]));
        let bn = fill::<f32>(k * n, 2);
        for (rsa, csa) in [(k, 1), (1, m)] {
            refused(&|| gemm_nn(m, n, k, &a[1..], rsa, csa, &bn, &mut c.clone()));
            refused(&|| gemm_nn(m, n, k, &a, rsa, csa, &bn[1..], &mut c.clone()));
            refused(&|| gemm_nn(m, n, k, &a, rsa, csa, &bn, &mut c.clone()[1..]));
        }
    }

    /// The order is the one the module doc gives: the lanes' tree, not a running sum. With
    /// 1e8 in lane 0 and ones elsewhere (f32's spacing at 1e8 is 8), a running sum loses every
    /// one. The tree: t = (1e8, 2, ..., 2) (1e8 + 1 rounds back), u = (1e8, 4, 4, 4), v = (1e8,
    /// 8) (1e8 + 4 is a tie, to even), w = 1e8 + 8.
    #[test]
    fn sums_lanes_as_a_tree() {
        // Four rows each way (the micro-kernel's block) and one more (the edge code).
        let mut a = vec![1.0f32; 5 * 16];
        a.iter_mut().step_by(16).for_each(|v| *v = 1e8);
        let b = vec![1.0f32; 5 * 16];
        let mut c = vec![0.0f32; 25];
        portable(5, 5, 16, &a, &b, &mut c);
        assert!(c.iter().all(|&v| v == 100_000_008.0), "portable: {c:?}");
        with_kernels(&[Kernel::Avx512], "the kernel's tree", |kernel| {
            let mut c = vec![0.0f32; 25];
            gemm_nt_on(kernel, 5, 5, 16, &a, &b, &mut c);
            assert!(c.iter().all(|&v| v == 100_000_008.0), "{kernel:?}: {c:?}");
        });
    }

    /// Lanes past K's last partial chunk keep their sums exactly, a -0 included (an FMA of
    /// masked-off zeros would make it +0): every product underflows to -0 (-1e-30 x 1e-30), so
    /// all 16 lane sums are -0, their tree is -0 and C = -0 + -0 stays -0. K = 21: one whole
    /// chunk, then five lanes of a partial one. Blocks and edges (5 x 5).
    #[test]
    fn partial_chunks_keep_signed_zeros() {
        let (a, b) = (vec![-1e-30f32; 5 * 21], vec![1e-30f32; 5 * 21]);
        let mut c = vec![-0.0f32; 25];
        portable(5, 5, 21, &a, &b, &mut c);
        assert!(c.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()), "portable: {c:?}");
        with_kernels(&[Kernel::Avx512], "the partial chunk's lanes", |kernel| {
            let mut c = vec![-0.0f32; 25];
            gemm_nt_on(kernel, 5, 5, 21, &a, &b, &mut c);
            assert!(c.iter().all(|v| v.to_bits() == (-0.0f32).to_bits()), "{kernel:?}: {c:?}");
        });
    }

    /// A kernel this CPU does not run for the type is refused by name, before any read (f64
    /// has no kernel of ours), and so is the AVX2 kernel `gemm_nt` does not have.
    #[test]
    fn kernels_refuse_what_they_do_not_run() {
        assert_eq!((Kernel::best::<f64>(), Kernel::best_nt::<f64>()), (Kernel::Library, Kernel::Library));
        let refused = |f: &dyn Fn(), want: &str| {
            let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("accepted");
            let msg = err.downcast_ref::<String>().cloned().or(err.downcast_ref::<&str>().map(|s| s.to_string()));
            assert!(msg.as_deref().unwrap_or_default().contains(want), "{msg:?}");
        };
        for kernel in [Kernel::Avx512, Kernel::Avx2] {
            assert!(!kernel.runs::<f64>());
            let want = format!("does not run {kernel:?}");
            refused(&|| gemm_nt_on(kernel, 1, 1, 1, &[1.0f64], &[1.0], &mut [0.0]), &want);
            refused(&|| gemm_nn_on(kernel, 1, 1, 1, &[1.0f64], 1, 1, &[1.0], &mut [0.0]), &want);
        }
        if Kernel::Avx2.runs::<f32>() {
            refused(&|| gemm_nt_on(Kernel::Avx2, 1, 1, 1, &[1.0f32], &[1.0], &mut [0.0]), "no Avx2 kernel");
        }
    }
}
