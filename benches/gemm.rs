//! `cargo bench --bench gemm`: our own GEMM kernels (`src/layers/gemm.rs`: AVX-512 and AVX2,
//! each where this CPU runs it) against matrixmultiply, one thread, on the shapes the layers
//! make (the reference's Winograd products, the stride-2 spec's im2col products), alternating
//! them several times. Prints GFLOP/s, the median and range of the rounds, and the largest
//! difference between the results. On a CPU with AVX-512 the AVX2 column is what a CPU without
//! it would run (at this CPU's speed: Zen 4 runs 256-bit FMAs as fast per FLOP as 512-bit ones),
//! and the library column is matrixmultiply's AVX-512 kernel, not the AVX2 one such a CPU would
//! run; benches/README.md says how its AVX2 kernel was measured beside ours.
//!
//! MEDCNN_BENCH_ROUNDS (5) rounds; each times the best of 5 batches of about 1 GFLOP.

use std::time::Instant;

use medcnn::layers::gemm::{gemm_nn_on, gemm_nt_on, Kernel};

/// GFLOP/s of `f`, the best of five batches of about 1 GFLOP each.
fn rate(mut f: impl FnMut(), flops: f64) -> f64 {
    let reps = (1e9 / flops) as usize + 1;
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64
        })
        .fold(f64::MAX, f64::min);
    flops / best / 1e9
}

fn summary(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!("{:6.1} ({:.1}-{:.1})", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fill(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + seed * 104_729) % 97) as f32 / 48.0 - 1.0).collect()
}

/// The kernels to compare: the library, then ours that this CPU runs (`gemm_nt` has no AVX2
/// kernel: `Kernel::Avx2` says why).
fn kernels(nt: bool) -> Vec<Kernel> {
    let ours = if nt { &[Kernel::Avx512][..] } else { &[Kernel::Avx512, Kernel::Avx2] };
    std::iter::once(Kernel::Library).chain(ours.iter().copied()).filter(|k| k.runs::<f32>()).collect()
}

fn header(what: &str, ks: &[Kernel]) {
    let names: String = ks.iter().map(|k| format!("{:>21}", format!("{k:?}"))).collect();
    println!("{what:34} {:>5} {:>5} {:>5} {names}   max diff", "m", "n", "k");
}

/// Times `run(kernel)` for each kernel, alternating, `rounds` times; prints the row.
fn row(
    name: &str,
    (m, n, k): (usize, usize, usize),
    ks: &[Kernel],
    rounds: usize,
    diff: f32,
    mut run: impl FnMut(Kernel),
) {
    let flops = 2.0 * (m * n * k) as f64;
    let mut rates = vec![vec![]; ks.len()];
    for _ in 0..rounds {
        for (i, &kernel) in ks.iter().enumerate() {
            rates[i].push(rate(|| run(kernel), flops));
        }
    }
    let cols: String = rates.into_iter().map(|r| format!(" {:>20}", summary(r))).collect();
    println!("{name:34} {m:5} {n:5} {k:5}{cols}   {diff:.1e}");
}

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("thread pool");
    let rounds: usize = std::env::var("MEDCNN_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let ks = kernels(true);
    println!("one thread, {rounds} rounds alternating; GFLOP/s median (range); Library = matrixmultiply");
    println!("max diff: the largest |difference| of any kernel's C from the library's");
    header("C += A B^T (weight gradients)", &ks);
    let nt = [
        ("F(4x4) Mw, 2nd block", 64, 32, 98),
        ("F(4x4) Mw, 3rd block", 128, 64, 72),
        ("F(2x2) Mw, 4th block", 256, 128, 128),
        ("im2col dW, 288 taps", 64, 288, 1024),
        ("im2col dW, 9 taps", 32, 9, 4096),
    ];
    for (name, m, n, k) in nt {
        let (a, b, c0) = (fill(m * k, 1), fill(n * k, 2), fill(m * n, 3));
        let cs: Vec<Vec<f32>> = ks
            .iter()
            .map(|&kernel| {
                let mut c = c0.clone();
                gemm_nt_on(kernel, m, n, k, &a, &b, &mut c);
                c
            })
            .collect();
        let diff = cs.iter().flat_map(|c| c.iter().zip(&cs[0]).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
        let mut c = c0.clone();
        row(name, (m, n, k), &ks, rounds, diff, |kernel| gemm_nt_on(kernel, m, n, k, &a, &b, &mut c));
    }
    let ks = kernels(false);
    header("C = A B (forward, dx; A^T by strides)", &ks);
    let nn = [
        ("F(2x2) U V, 2nd block", 64, 450, 32, false),
        ("F(2x2) U V, 4th block", 256, 128, 128, false),
        ("F(4x4) U^T Z, 2nd block", 32, 98, 64, true),
        ("F(4x4) U^T Z, 3rd block", 64, 72, 128, true),
        ("im2col W col, 288 taps", 64, 1024, 288, false),
        ("im2col W^T dY, 288 taps", 288, 1024, 64, true),
        ("im2col W col, 25 taps", 32, 2048, 25, false),
    ];
    for (name, m, n, k, ta) in nn {
        let (a, b) = (fill(m * k, 4), fill(k * n, 5));
        let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
        let cs: Vec<Vec<f32>> = ks
            .iter()
            .map(|&kernel| {
                let mut c = vec![0f32; m * n];
                gemm_nn_on(kernel, m, n, k, &a, rsa, csa, &b, &mut c);
                c
            })
            .collect();
        let diff = cs.iter().flat_map(|c| c.iter().zip(&cs[0]).map(|(x, y)| (x - y).abs())).fold(0f32, f32::max);
        let mut c = vec![0f32; m * n];
        row(name, (m, n, k), &ks, rounds, diff, |kernel| gemm_nn_on(kernel, m, n, k, &a, rsa, csa, &b, &mut c));
    }
}
