//! The CUDA backend on a real GPU against the CPU path: every kernel on random inputs
//! (`cuda::selftest`, the same checks the emulator runs), the model's own layer shapes, a
//! whole training step (CpuBackend vs CudaBackend from one seed and batch: loss, every
//! gradient, every weight after Adam), bit-for-bit repeatability, chunked prediction,
//! checkpoint round trips, and the speed of our SGEMM and of a training step.
//!
//! Needs `--features cuda`, an NVIDIA driver, a GPU and NVRTC. Without them each test prints
//! why it skipped and passes, unless MEDCNN_REQUIRE_GPU=1, when it fails:
//!
//!     LD_LIBRARY_PATH=/path/to/nvidia/cu13/lib MEDCNN_REQUIRE_GPU=1 \
//!         cargo test --release --features cuda --test cuda_vs_cpu -- --nocapture --test-threads 1
//!
//! Without `--features cuda` this file compiles to nothing (no test, so nothing counts).
#![cfg(feature = "cuda")]

mod common;

use medcnn::backend::{AdamConfig, Backend, CpuBackend, IMAGE_SIDE};
use medcnn::cuda::device::CudaExec;
use medcnn::cuda::engine::Engine;
use medcnn::cuda::selftest::{self, Check};
use medcnn::cuda::CudaBackend;
use medcnn::model::ModelConfig;

/// GPU 0, or None after printing why (a failure under MEDCNN_REQUIRE_GPU=1).
fn gpu() -> Option<CudaExec> {
    match CudaExec::new(0) {
        Ok(ex) => Some(ex),
        Err(e) => {
            common::skip_unless_required("GPU", format!("no usable GPU: {e:#}"));
            None
        }
    }
}

fn report(title: &str, checks: &[Check]) {
    println!("{title}:");
    for c in checks {
        println!("  {c}");
    }
    let bad: Vec<String> = checks.iter().filter(|c| !c.ok()).map(|c| format!("  {c}")).collect();
    assert!(bad.is_empty(), "{} of {} checks failed:\n{}", bad.len(), checks.len(), bad.join("\n"));
}

fn batch(n: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
    let x = (0..n * IMAGE_SIDE * IMAGE_SIDE)
        .map(|i| (((i as u64 * 2654435761 + seed) % 1000) as f32) / 500.0 - 1.0)
        .collect();
    let y = (0..n).map(|i| (i * 7 + seed as usize) % 6).collect();
    (x, y)
}

#[test]
fn every_kernel_matches_the_cpu() {
    let Some(mut ex) = gpu() else { return };
    println!("{}", medcnn::cuda::exec::Exec::describe(&ex));
    report("kernels (GPU) vs CPU", &selftest::kernel_checks(&mut ex, 1).unwrap());
}

#[test]
fn the_models_conv_shapes_match_the_cpu() {
    let Some(mut ex) = gpu() else { return };
    let mut checks = Vec::new();
    // conv_block.0 .. 9 at batch 8 (long-k split dW products, all tiles in play).
    for (i, &(c, h, oc)) in [(1, 64, 32), (32, 31, 64), (64, 14, 128), (128, 6, 256)].iter().enumerate() {
        checks.extend(selftest::conv_checks(&mut ex, 10 + i as u64, 8, c, h, h, oc, 3, 1, 0).unwrap());
    }
    report("the model's convolutions (GPU) vs CPU", &checks);
}

#[test]
fn a_training_step_matches_the_cpu() {
    let Some(ex) = gpu() else { return };
    report("training step (CudaBackend) vs CpuBackend", &selftest::train_step_checks(ex, 16, 7, 0.4).unwrap());
}

#[test]
fn training_repeats_bit_for_bit() {
    let Some(ex1) = gpu() else { return };
    let Some(ex2) = gpu() else { return };
    let cfg = ModelConfig::default();
    let adam = AdamConfig { lr: 1e-3, weight_decay: 1e-4 };
    let (mut a, mut b) = (Engine::new(ex1, &cfg, 3, adam).unwrap(), Engine::new(ex2, &cfg, 3, adam).unwrap());
    for step in 0..3 {
        let (x, y) = batch(64, step);
        a.train_step(&x, &y, 1e-3, step).unwrap();
        b.train_step(&x, &y, 1e-3, step).unwrap();
    }
    assert_eq!(a.take_train_stats().unwrap(), b.take_train_stats().unwrap());
    assert_eq!(a.export_weights().unwrap(), b.export_weights().unwrap(), "no float atomics: runs must repeat exactly");
}

#[test]
fn predict_in_chunks_matches_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let cfg = ModelConfig::default();
    let adam = AdamConfig { lr: 1e-3, weight_decay: 0.0 };
    let mut dev = CudaBackend::new(&cfg, 5, adam).unwrap();
    let mut cpu = CpuBackend::new(&cfg, 5, adam);
    let (x, _) = batch(300, 1); // more than one predict chunk
    let (pd, pc) = (dev.predict(&x, 300).unwrap(), cpu.predict(&x, 300).unwrap());
    let err = selftest::rel_err(&pd, &pc);
    println!("predict 300 images: err {err:.2e}");
    assert!(err < selftest::TOL, "{err}");
}

#[test]
fn weights_and_optimizer_round_trip_through_the_cpu() {
    if gpu().is_none() {
        return;
    }
    let cfg = ModelConfig::default();
    let adam = AdamConfig { lr: 1e-3, weight_decay: 0.0 };
    let mut dev = CudaBackend::new(&cfg, 1, adam).unwrap();
    let mut cpu = CpuBackend::new(&cfg, 2, adam);
    let (x, y) = batch(8, 2);
    cpu.train_step(&x, &y, 1e-3, 0).unwrap();
    dev.import_weights(&cpu.export_weights().unwrap()).unwrap();
    dev.import_optimizer(&cpu.export_optimizer().unwrap()).unwrap();
    assert_eq!(dev.export_weights().unwrap(), cpu.export_weights().unwrap());
    assert_eq!(dev.export_optimizer().unwrap(), cpu.export_optimizer().unwrap());
}

#[test]
fn speed() {
    if gpu().is_none() {
        return;
    }
    for n in [512, 1024, 2048] {
        println!("our SGEMM {n}^3 (planned): {:.0} GFLOP/s", medcnn::cuda::bench_sgemm(n).unwrap());
        for (plan, gflops) in medcnn::cuda::bench_sgemm_plans(n).unwrap() {
            println!("    {:?} split {}: {gflops:.0} GFLOP/s", plan.tile, plan.splits);
        }
    }
    let b = medcnn::cuda::bench_layers(&ModelConfig::default(), 64, 20).unwrap();
    println!("{} batch {}: step {:.3} ms, {:.0} images/s", b.device, b.batch, b.step_ms, b.images_per_s);
    for l in &b.layers {
        println!(
            "  {:<26} forward {:>8.3} ms {:>7.0} GFLOP/s   backward {:>8.3} ms {:>7.0} GFLOP/s",
            l.label,
            l.forward_ms,
            l.forward_gflops(),
            l.backward_ms,
            l.backward_gflops()
        );
    }
}
