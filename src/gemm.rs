//! Our own matrix multiply for the Winograd products, the one place medcnn does not call
//! matrixmultiply: C (m, n) = A (m, k) B (k, n) with A packed once and B read where it lies.
//!
//! Why. A Winograd block runs 16 small GEMMs per group of images, M[xi] = U[xi] V[xi] forward
//! and Md[xi] = U[xi]^T Z[xi] backward, with K = the channels (32 to 256) and a few hundred
//! columns. matrixmultiply packs both operands again on every call: U, the transformed
//! weights, is the same for the whole step, and V and Z are already row-major runs over the
//! tiles, which is the layout its kernel wants B in, sixteen columns at a time. Here A is
//! packed once per step (`PackedA`) and B is read in place, so a call only multiplies.
//!
//! The kernel. A register block of MR x NR = 6 x 16 outputs (12 AVX registers of 8 floats)
//! stays in registers for the whole K loop: per k it loads B's 16 values of row k (two
//! registers), broadcasts the 6 values of A's column k from the packed panel, and does 12
//! fused multiply-adds. 12 independent sums cover the FMA units' latency (2 units x 4 cycles
//! on Zen 3 need 8); 8 loads per 12 FMAs leave the load ports idle a third of the time.
//! The last columns of a row (n not a multiple of 16) use masked loads and stores.
//!
//! The sums. Every output is   c = fma(a[k-1], b[k-1], ... fma(a[1], b[1], fma(a[0], b[0], 0)))
//! with k in order, each step one rounding (a fused multiply-add). So the result does not
//! depend on the blocking, the thread or the columns' position, and `reference` (scalar
//! `mul_add` in the same order) gives the same bits, which the tests check. On a CPU without
//! AVX2 and FMA (and on f64, where the gradient checks run) the same product goes to
//! matrixmultiply instead: the same values up to rounding, not the same bits.
//!
//! What it is not: a general GEMM. No alpha, no beta (C is overwritten), no transposes
//! beyond what packing A takes, no threads (the Winograd loops run one group per thread).

/// Rows of A per packed panel, and of C per register block.
pub const MR: usize = 6;
/// Columns of B and C per register block (two AVX registers).
pub const NR: usize = 16;

/// A (m, k) packed as ceil(m / MR) panels, each k columns of MR values (column-major within
/// the panel: panel p, column q, row r at `(p * k + q) * MR + r`). Rows past m are zero, so
/// the kernel always computes MR rows and the caller stores only the real ones.
#[derive(Clone, Debug, Default)]
pub struct PackedA {
    pub m: usize,
    pub k: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs A given by strides: element (i, q) at `a[i * rs + q * cs]`. A row-major A is
    /// (rs, cs) = (k, 1); its transpose, read from the same memory, is (1, m).
    pub fn pack(m: usize, k: usize, a: &[f32], rs: usize, cs: usize) -> Self {
        let mut packed = PackedA::default();
        packed.repack(m, k, a, rs, cs);
        packed
    }

    /// `pack` into this buffer, reusing its allocation.
    pub fn repack(&mut self, m: usize, k: usize, a: &[f32], rs: usize, cs: usize) {
        assert!(m == 0 || k == 0 || (m - 1) * rs + (k - 1) * cs < a.len(), "A ({m}, {k}) outside its slice");
        self.m = m;
        self.k = k;
        self.data.clear();
        self.data.resize(m.div_ceil(MR) * k * MR, 0.0);
        for (p, panel) in self.data.chunks_exact_mut(k * MR).enumerate() {
            for (q, col) in panel.chunks_exact_mut(MR).enumerate() {
                for (r, v) in col.iter_mut().enumerate().take(m.saturating_sub(p * MR)) {
                    *v = a[(p * MR + r) * rs + q * cs];
                }
            }
        }
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.data[p * self.k * MR..][..self.k * MR]
    }
}

/// C (m, n) = A B: A packed (m, k), B (k, n) row-major with row stride `ldb`, C (m, n) with
/// row stride `ldc`, overwritten (never read). Single-threaded.
pub fn gemm_packed(a: &PackedA, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize) {
    let (m, k) = (a.m, a.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= ldb && n <= ldc, "n = {n} beyond a row stride ({ldb}, {ldc})");
    assert!(k == 0 || b.len() >= (k - 1) * ldb + n, "B ({k}, {n}) outside its slice");
    assert!(c.len() >= (m - 1) * ldc + n, "C ({m}, {n}) outside its slice");
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            row[..n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU has AVX2 and FMA; the asserts above keep every access in bounds.
        unsafe { avx2::gemm(a, b, ldb, n, c, ldc) };
        return;
    }
    // No FMA: matrixmultiply on the unpacked A (rebuilt from the panels, which the tests
    // never see on this path's machines; it is the fallback for old CPUs).
    let mut a_rows = vec![0.0f32; m * k];
    for i in 0..m {
        for q in 0..k {
            a_rows[i * k + q] = a.panel(i / MR)[q * MR + i % MR];
        }
    }
    // SAFETY: the slices hold (m, k), (k, n) with stride ldb, and (m, n) with stride ldc.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a_rows.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            ldb as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}

/// Whether `gemm_packed` runs its own kernel here (AVX2 and FMA), i.e. gives `reference`'s bits.
pub fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The definition, for tests: each output a chain of fused multiply-adds in k order from 0.
pub fn reference(a: &PackedA, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize) {
    for i in 0..a.m {
        let panel = a.panel(i / MR);
        for j in 0..n {
            let mut s = 0.0f32;
            for q in 0..a.k {
                s = panel[q * MR + i % MR].mul_add(b[q * ldb + j], s);
            }
            c[i * ldc + j] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{PackedA, MR, NR};
    use std::arch::x86_64::*;

    /// Column blocks of NR outer, panels of A inner: one block of B (k x 16, 64 bytes a row)
    /// stays in L1 while every panel of A passes over it.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gemm(a: &PackedA, b: &[f32], ldb: usize, n: usize, c: &mut [f32], ldc: usize) {
        let (m, k) = (a.m, a.k);
        for j in (0..n).step_by(NR) {
            let cols = NR.min(n - j);
            for p in 0..m.div_ceil(MR) {
                let rows = MR.min(m - p * MR);
                let (bp, cp) = (b.as_ptr().add(j), c.as_mut_ptr().add(p * MR * ldc + j));
                if cols == NR {
                    block::<false>(k, a.panel(p).as_ptr(), bp, ldb, cp, ldc, rows, cols);
                } else {
                    block::<true>(k, a.panel(p).as_ptr(), bp, ldb, cp, ldc, rows, cols);
                }
            }
        }
    }

    /// Lane masks for the first `cols` of 16 columns (two registers of 8).
    #[inline(always)]
    unsafe fn masks(cols: usize) -> [__m256i; 2] {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let lo = _mm256_set1_epi32(cols as i32);
        let hi = _mm256_set1_epi32(cols as i32 - 8);
        [_mm256_cmpgt_epi32(lo, lane), _mm256_cmpgt_epi32(hi, lane)]
    }

    /// One MR x NR block of C: rows < `rows` and columns < `cols` are stored.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const MASKED: bool>(
        k: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        let mask = masks(cols);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for q in 0..k {
            let row = b.add(q * ldb);
            let (b0, b1) = if MASKED {
                (_mm256_maskload_ps(row, mask[0]), _mm256_maskload_ps(row.add(8), mask[1]))
            } else {
                (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
            };
            let col = a.add(q * MR);
            for (r, acc) in acc.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*col.add(r));
                acc[0] = _mm256_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let out = c.add(r * ldc);
            if MASKED {
                _mm256_maskstore_ps(out, mask[0], acc[0]);
                _mm256_maskstore_ps(out.add(8), mask[1], acc[1]);
            } else {
                _mm256_storeu_ps(out, acc[0]);
                _mm256_storeu_ps(out.add(8), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, RngExt, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect()
    }

    /// Every shape class: m below, at and past a panel, n below, at and past a column block
    /// and with a masked tail, k of 1 and long; row strides past n; C prefilled with NaN so
    /// an unwritten output or a read of C shows.
    #[test]
    fn same_bits_as_the_definition() {
        if !has_fma() {
            crate::layers::skip_unless_required("AVX2", "no AVX2 + FMA on this CPU: the GEMM kernel is not checked");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (6, 3, 16),
            (5, 7, 15),
            (7, 1, 17),
            (13, 32, 33),
            (64, 32, 392),
            (12, 130, 40),
            (2, 5, 8),
            (6, 64, 31),
        ] {
            let (ldb, ldc) = (n + 3, n + 5);
            let a_rows = random(m * k, 1);
            let b = random(k * ldb, 2);
            for (a, what) in
                [(PackedA::pack(m, k, &a_rows, k, 1), "row-major"), (PackedA::pack(m, k, &a_rows, 1, m), "transposed")]
            {
                let mut got = vec![f32::NAN; m * ldc];
                let mut want = got.clone();
                gemm_packed(&a, &b, ldb, n, &mut got, ldc);
                reference(&a, &b, ldb, n, &mut want, ldc);
                for i in 0..m {
                    for j in 0..ldc {
                        let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                        if j < n {
                            assert_eq!(g.to_bits(), w.to_bits(), "({m}, {k}, {n}) {what}: C[{i}][{j}] {g} != {w}");
                        } else {
                            assert!(g.is_nan(), "({m}, {k}, {n}) {what}: C[{i}][{j}] past n written");
                        }
                    }
                }
            }
        }
    }

    /// Packing places element (i, q) where the kernel reads it, zero past m, for both strides.
    #[test]
    fn packing_layout() {
        let (m, k) = (7, 3);
        let a: Vec<f32> = (0..m * k).map(|v| v as f32 + 1.0).collect();
        let p = PackedA::pack(m, k, &a, k, 1);
        assert_eq!(p.data.len(), 2 * k * MR);
        for i in 0..2 * MR {
            for q in 0..k {
                let want = if i < m { a[i * k + q] } else { 0.0 };
                assert_eq!(p.panel(i / MR)[q * MR + i % MR], want, "({i}, {q})");
            }
        }
        let t = PackedA::pack(k, m, &a, 1, k); // A^T (k, m) from the same memory
        assert_eq!((t.m, t.k), (k, m));
        assert_eq!(t.panel(0)[4 * MR + 2], a[4 * k + 2]);
    }
}
