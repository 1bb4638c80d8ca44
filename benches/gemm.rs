//! `cargo bench --bench gemm`: our own GEMMs (`src/layers/gemm.rs`) against matrixmultiply,
//! one thread, on the shapes the layers make (the reference's Winograd products, the stride-2
//! spec's im2col products), alternating the two several times. Prints GFLOP/s, the median and
//! range of the rounds, and the largest difference between the two results.
//!
//! MEDCNN_BENCH_ROUNDS (5) rounds; each times the best of 5 batches of about 1 GFLOP.

use std::time::Instant;

use medcnn::layers::gemm::{gemm_nn, gemm_nt};
use medcnn::tensor::gemm;

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

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("thread pool");
    let rounds: usize = std::env::var("MEDCNN_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    println!("one thread, {rounds} rounds alternating; GFLOP/s median (range)");
    println!("C += A B^T (weight gradients)        m     n     k   matrixmultiply          gemm_nt   max diff");
    let nt = [
        ("F(4x4) Mw, 2nd block", 64, 32, 98),
        ("F(4x4) Mw, 3rd block", 128, 64, 72),
        ("F(2x2) Mw, 4th block", 256, 128, 128),
        ("im2col dW, 288 taps", 64, 288, 1024),
        ("im2col dW, 9 taps", 32, 9, 4096),
    ];
    for (name, m, n, k) in nt {
        let (a, b, c0) = (fill(m * k, 1), fill(n * k, 2), fill(m * n, 3));
        let (mut c1, mut c2) = (c0.clone(), c0.clone());
        gemm(false, true, m, n, k, 1.0, &a, &b, 1.0, &mut c1);
        gemm_nt(m, n, k, &a, &b, &mut c2);
        let diff = c1.iter().zip(&c2).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        let flops = 2.0 * (m * n * k) as f64;
        let (mut theirs, mut ours) = (vec![], vec![]);
        for _ in 0..rounds {
            theirs.push(rate(|| gemm(false, true, m, n, k, 1.0, &a, &b, 1.0, &mut c1), flops));
            ours.push(rate(|| gemm_nt(m, n, k, &a, &b, &mut c2), flops));
        }
        println!("{name:34} {m:5} {n:5} {k:5}   {}  {}   {diff:.1e}", summary(theirs), summary(ours));
    }
    println!("C = A B (forward, dx; A^T by strides)  m     n     k   matrixmultiply          gemm_nn   max diff");
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
        let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
        let (rsa, csa) = if ta { (1, m) } else { (k, 1) };
        gemm(ta, false, m, n, k, 1.0, &a, &b, 0.0, &mut c1);
        gemm_nn(m, n, k, &a, rsa, csa, &b, &mut c2);
        let diff = c1.iter().zip(&c2).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        let flops = 2.0 * (m * n * k) as f64;
        let (mut theirs, mut ours) = (vec![], vec![]);
        for _ in 0..rounds {
            theirs.push(rate(|| gemm(ta, false, m, n, k, 1.0, &a, &b, 0.0, &mut c1), flops));
            ours.push(rate(|| gemm_nn(m, n, k, &a, rsa, csa, &b, &mut c2), flops));
        }
        println!("{name:34} {m:5} {n:5} {k:5}   {}  {}   {diff:.1e}", summary(theirs), summary(ours));
    }
}
