//! GPU benchmarks for `medcnn bench --device cuda`: our SGEMM on square matrices, and the
//! per-layer forward/backward times of a training step. Every timer read follows a device
//! sync; each number is the mean of several runs after warm-up runs.

use std::time::Instant;

use anyhow::Result;

use super::engine::{Engine, Phase};
use super::exec::{Buf, Exec};
use super::ops::{self, Gemm, GemmPlan, Tile};
use crate::backend::{AdamConfig, Backend, IMAGE_SIDE};
use crate::model::ModelConfig;

/// One row of `bench_layers`: a layer (or fused group, as launched) and its times.
#[derive(Clone, Debug)]
pub struct LayerTiming {
    pub label: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Floating-point operations of this piece at the benchmark's batch (0 for data movement).
    pub forward_flops: u64,
    pub backward_flops: u64,
}

impl LayerTiming {
    pub fn forward_gflops(&self) -> f64 {
        self.forward_flops as f64 / (self.forward_ms * 1e6)
    }
    pub fn backward_gflops(&self) -> f64 {
        self.backward_flops as f64 / (self.backward_ms * 1e6)
    }
}

/// What `bench_layers` measured.
#[derive(Clone, Debug)]
pub struct LayerBench {
    pub device: String,
    pub batch: usize,
    /// Per layer (as launched: the conv includes its bias and ReLU, the pool's backward the
    /// ReLU's; "loss" and "adam" have backward times only), with a device sync after each, so
    /// each time includes one launch latency.
    pub layers: Vec<LayerTiming>,
    /// A whole training step (forward, backward, Adam) without the per-layer syncs.
    pub step_ms: f64,
    pub images_per_s: f64,
}

/// Runs `f` `warmup` times, then `iters` times between two device syncs; mean ms per run.
pub fn time_ms<E: Exec>(
    ex: &mut E,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut(&mut E) -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f(ex)?;
    }
    ex.sync()?;
    let t0 = Instant::now();
    for _ in 0..iters {
        f(ex)?;
    }
    ex.sync()?;
    Ok(t0.elapsed().as_secs_f64() * 1e3 / iters.max(1) as f64)
}

/// GFLOP/s of our SGEMM (the planner's tile) on an n x n x n product on `ex`.
pub fn sgemm_gflops<E: Exec>(ex: &mut E, n: usize) -> Result<f64> {
    let plan = ops::plan_gemm(n, n, n, ex.sm_count(), false);
    Ok(sgemm_gflops_by_plan(ex, n, &[plan])?[0].1)
}

/// GFLOP/s of an n x n x n product under each plan (every tile, and T128 split in 2 and 4),
/// to tune `ops::plan_gemm` on a real device.
pub fn sgemm_gflops_by_plan<E: Exec>(ex: &mut E, n: usize, plans: &[GemmPlan]) -> Result<Vec<(GemmPlan, f64)>> {
    let host: Vec<f32> = (0..n * n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let (a, b) = (Buf::from_host(ex, &host)?, Buf::from_host(ex, &host)?);
    let c = Buf::<f32>::alloc(ex, n * n)?;
    let ws_len = plans.iter().map(|p| p.workspace(n, n)).max().unwrap_or(0);
    let ws = Buf::<f32>::alloc(ex, ws_len)?;
    let g = Gemm::new(false, false, n, n, n);
    let iters = (2e10 / (2.0 * (n as f64).powi(3))).clamp(3.0, 200.0) as usize;
    let mut out = Vec::new();
    for plan in plans {
        let ms = time_ms(ex, 3, iters, |ex| ops::gemm(ex, &g, a.ptr, b.ptr, c.ptr, plan, Some(&ws)))?;
        out.push((*plan, 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e9));
    }
    for buf in [a, b, c, ws] {
        buf.free(ex)?;
    }
    Ok(out)
}

/// The plans `sgemm_gflops_by_plan` compares by default for size n.
pub fn candidate_plans(n: usize) -> Vec<GemmPlan> {
    let mut plans: Vec<GemmPlan> = Tile::ALL.iter().map(|&t| GemmPlan::simple(t, n)).collect();
    plans.push(GemmPlan::split(Tile::T128, n, 2));
    plans.push(GemmPlan::split(Tile::T128, n, 4));
    plans
}

/// Per-layer times and the whole-step time of the reference model at `batch` on `ex`.
pub fn layer_bench<E: Exec>(ex: E, cfg: &ModelConfig, batch: usize, iters: usize) -> Result<LayerBench> {
    let device = ex.describe();
    let mut engine = Engine::new(ex, cfg, 0, AdamConfig { lr: 1e-3, weight_decay: 0.0 })?;
    let x: Vec<f32> = (0..batch * IMAGE_SIDE * IMAGE_SIDE).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let y: Vec<usize> = (0..batch).map(|i| i % cfg.num_classes).collect();
    let iters = iters.max(1);
    for step in 0..3 {
        engine.train_step(&x, &y, 1e-3, step)?;
    }
    engine.ex.sync()?;
    let flops = engine.layer_flops(batch);
    let mut layers: Vec<LayerTiming> = Vec::new();
    for step in 0..iters as u64 {
        for (label, phase, ms) in engine.profile_step(&x, &y, step)? {
            let row = match layers.iter().position(|l| l.label == label) {
                Some(i) => &mut layers[i],
                None => {
                    let (forward_flops, backward_flops) =
                        flops.iter().find(|f| f.0 == label).map_or((0, 0), |f| (f.1, f.2));
                    layers.push(LayerTiming {
                        label,
                        forward_ms: 0.0,
                        backward_ms: 0.0,
                        forward_flops,
                        backward_flops,
                    });
                    layers.last_mut().expect("just pushed")
                }
            };
            match phase {
                Phase::Forward => row.forward_ms += ms / iters as f64,
                Phase::Backward => row.backward_ms += ms / iters as f64,
            }
        }
    }
    engine.ex.sync()?;
    let t0 = Instant::now();
    for step in 0..iters as u64 {
        engine.train_step(&x, &y, 1e-3, step)?;
    }
    engine.ex.sync()?;
    let step_ms = t0.elapsed().as_secs_f64() * 1e3 / iters as f64;
    engine.take_train_stats()?;
    Ok(LayerBench { device, batch, layers, step_ms, images_per_s: batch as f64 / (step_ms * 1e-3) })
}
