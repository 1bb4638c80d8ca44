//! Tensors, the `Float` trait (f32 for training, f64 for gradient checks) and the one matrix
//! multiply every layer is built on.
//!
//! A tensor is an `ndarray::ArrayD` in standard (row-major, NCHW) layout; layers work on its
//! contiguous slice. This file is not an autograd: each layer writes its own backward pass.

use std::cell::RefCell;
use std::fmt::{Debug, Display};
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};
use std::thread::LocalKey;

use ndarray::{ArrayD, IxDyn};

/// A dense n-dimensional array in row-major order (NCHW for images, (N, features) for vectors).
pub type Tensor<T> = ArrayD<T>;

/// The element types the CPU layers run in: `f32` to train, `f64` to check gradients tightly.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Default
    + Send
    + Sync
    + Debug
    + Display
    + 'static
{
    /// Raw strided GEMM: `C = alpha * A * B + beta * C` with A (m x k), B (k x n), C (m x n)
    /// given by row and column strides. Single-threaded: callers parallelise around it.
    ///
    /// # Safety
    /// The pointers and strides must describe valid, non-overlapping (for C) memory.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// This thread's scratch buffer of this type (see `with_scratch`).
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>>;

    /// Lossy conversion from f64 (exact for f64, rounding for f32).
    fn f(x: f64) -> Self {
        <Self as num_traits::FromPrimitive>::from_f64(x).expect("f64 converts to every Float")
    }

    /// Conversion to f64, for reporting.
    fn as_f64(self) -> f64 {
        num_traits::ToPrimitive::to_f64(&self).unwrap_or(f64::NAN)
    }
}

impl Float for f32 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
    fn scratch() -> &'static LocalKey<RefCell<Vec<f32>>> {
        thread_local!(static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) });
        &SCRATCH
    }
}

impl Float for f64 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
    fn scratch() -> &'static LocalKey<RefCell<Vec<f64>>> {
        thread_local!(static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) });
        &SCRATCH
    }
}

/// `C = alpha * op(A) * op(B) + beta * C` on contiguous row-major matrices.
///
/// op(A) is (m x k): A is stored (m, k), or (k, m) when `trans_a`.
/// op(B) is (k x n): B is stored (k, n), or (n, k) when `trans_b`.
/// C is (m, n). With `beta == 0` the old contents of C are never read.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Float>(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: &[T],
    b: &[T],
    beta: T,
    c: &mut [T],
) {
    assert!(a.len() >= m * k, "gemm: A has {} elements, needs {m}x{k}", a.len());
    assert!(b.len() >= k * n, "gemm: B has {} elements, needs {k}x{n}", b.len());
    assert!(c.len() >= m * n, "gemm: C has {} elements, needs {m}x{n}", c.len());
    let (rsa, csa) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the asserts above bound every index the strides can reach; `c` is a unique borrow.
    unsafe {
        T::gemm_raw(m, k, n, alpha, a.as_ptr(), rsa, csa, b.as_ptr(), rsb, csb, beta, c.as_mut_ptr(), n as isize, 1)
    }
}

/// A tensor of zeros with the given shape.
pub fn zeros<T: Float>(shape: &[usize]) -> Tensor<T> {
    from_vec(shape, zero_vec(shape.iter().product()))
}

/// Asks glibc's allocator to keep freed memory for the next allocation instead of handing it
/// back to the kernel. A training step allocates and frees the same few dozen megabytes of
/// activations and gradients every step; by default glibc serves each block over 128 KiB
/// (later, a few MiB) with its own mmap and unmaps it on free, or trims the heap's top, so
/// every step faults every page in afresh (4 KiB at a time, zeroed by the kernel). With
/// blocks up to 32 MiB from the heap and no trimming under 1 GiB, the pages stay mapped.
/// Measured with `medcnn bench` (AMD EPYC, Zen 3, no AVX-512; 2 threads, batch 64), old and new binary
/// alternating: the stride-2 spec of the README went from 92 ms a step (86-96, 5 runs) to 71
/// (61-72), the reference from 162 (160-163, 3 runs) to 154 (146-158). Called once, first
/// thing in `main`; tests and other binaries keep glibc's defaults.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of the allocator's thresholds; it is called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// n zeros, written out. `vec![0.0; n]` (and ndarray's `zeros`) ask the allocator for calloc'd
/// memory, which for a large n is fresh pages that all map the kernel's one shared zero page:
/// the first write to each page (`+=` reads first) then faults, and the kernel flushes that
/// page from every core's TLB, an interrupt to each other core, page by page. In the profile
/// of a training step that was 18% of the time (Intel Xeon, 2 threads, a padded-3x3 spec).
/// Zeros written out fault once each, cheaply, as plain first touches.
///
/// A large n (a layer's whole-batch output or gradient, allocated before its parallel work
/// starts) is written by every thread, not by the caller alone.
pub fn zero_vec<T: Float>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    if n >= PARALLEL_ZEROS {
        rayon::iter::ParallelExtend::par_extend(&mut v, rayon::iter::repeat_n(T::zero(), n));
        return v;
    }
    // black_box: else the optimiser may turn allocate-then-fill back into calloc.
    v.resize(std::hint::black_box(n), T::zero());
    v
}

/// Elements from which `zero_vec` splits the writing over the threads (1 MiB of f32).
const PARALLEL_ZEROS: usize = 1 << 18;

/// The sum of `xs` in eight interleaved partial sums (lane i adds xs[8k + i]), added up in a
/// fixed order at the end: deterministic, and the compiler keeps the lanes in a vector register
/// instead of one long chain of dependent adds (a bias gradient summed as one chain over a
/// 1,024-pixel plane took a third of a first conv layer's backward).
pub fn sum<T: Float>(xs: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let x8 = xs.chunks_exact(8);
    let tail = x8.remainder().iter().fold(T::zero(), |s, &v| s + v);
    for x in x8 {
        for lane in 0..8 {
            acc[lane] += x[lane];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Runs `f` on `len` floats of this thread's scratch buffer: one buffer per thread and float
/// type, shared by every layer and kept from call to call, so a fast path's scratch costs no
/// allocation and no zeroing once the buffer is large enough, and is memory the previous
/// layer left in cache. Measured on the reference's training step (Zen 4, 6 alternating
/// rounds): as fast as a fresh zeroed buffer per call (median pair ratio 1.00), where one
/// buffer per layer kept from step to step was 5% slower (0.95: four layers' buffers no
/// longer share the cache). It holds whatever its last user left: callers write every float
/// before they read it. Not
/// re-entrant: `f` must not ask for scratch of the same type (the `RefCell` panics if it does).
pub fn with_scratch<T: Float, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::scratch().with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            *buf = zero_vec(len);
        }
        f(&mut buf[..len])
    })
}

/// A tensor from a shape and row-major data. Panics if the sizes disagree (a programming error).
pub fn from_vec<T: Float>(shape: &[usize], data: Vec<T>) -> Tensor<T> {
    Tensor::from_shape_vec(IxDyn(shape), data).expect("shape matches data length")
}

/// The contiguous row-major slice of a tensor. Every tensor medcnn makes is contiguous.
pub fn slice<T: Float>(t: &Tensor<T>) -> &[T] {
    t.as_slice().expect("medcnn tensors are contiguous and row-major")
}

/// The mutable contiguous row-major slice of a tensor.
pub fn slice_mut<T: Float>(t: &mut Tensor<T>) -> &mut [T] {
    t.as_slice_mut().expect("medcnn tensors are contiguous and row-major")
}

/// Converts a tensor between float types (f32 <-> f64), keeping the shape.
pub fn cast<A: Float, B: Float>(t: &Tensor<A>) -> Tensor<B> {
    t.mapv(|v| B::f(v.as_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n zeros on either side of the parallel threshold, +0.0 each (not -0.0, nothing left over).
    #[test]
    fn zero_vec_writes_n_zeros() {
        for n in [0, 5, PARALLEL_ZEROS - 1, PARALLEL_ZEROS, PARALLEL_ZEROS + 3] {
            let v = zero_vec::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| x.to_bits() == 0), "n = {n}");
        }
    }

    /// `sum` adds every element once, whatever the length against its eight lanes (empty,
    /// shorter than eight, a tail, whole chunks): checked on integers, where the order of the
    /// additions cannot change the result, and in lane order on values where it does.
    #[test]
    fn sum_adds_every_element_once_in_lane_order() {
        for len in [0usize, 1, 7, 8, 9, 16, 23, 1024] {
            let xs: Vec<f64> = (0..len).map(|i| (i * i % 97) as f64).collect();
            assert_eq!(sum(&xs), xs.iter().sum::<f64>(), "length {len}");
        }
        // Lane 0 adds 1e16 and 1.0 (lost: f64's spacing there is 2), lane 1 holds 1.0, the
        // tail 2.0; the lanes then go onto the tail in lane order. One chain in element order
        // would lose both ones: 1e16 + 2.
        let mut xs = vec![0.0f64; 17];
        (xs[0], xs[8], xs[1], xs[16]) = (1e16, 1.0, 1.0, 2.0);
        let lanes = (2.0 + (1e16 + 1.0)) + 1.0;
        assert_eq!(sum(&xs), lanes);
        assert_ne!(lanes, xs.iter().fold(0.0, |s, &v| s + v), "the test tells the two orders apart");
    }

    #[test]
    fn gemm_matches_naive_for_every_transpose() {
        let (m, n, k) = (3, 5, 4);
        let a: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 2.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64).sin()).collect();
        // Transposed copies: at is (k, m), bt is (n, k).
        let at: Vec<f64> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut want = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                want[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut c = vec![0.0; m * n];
            let aa = if ta { &at } else { &a };
            let bb = if tb { &bt } else { &b };
            gemm(ta, tb, m, n, k, 1.0, aa, bb, 0.0, &mut c);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-12, "ta={ta} tb={tb}: {x} vs {y}");
            }
        }
    }
}
