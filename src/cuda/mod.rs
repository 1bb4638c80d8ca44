//! The CUDA backend: `kernels/*.cu` compiled at run time by NVRTC and driven through cudarc,
//! with parameters, activations, gradients and Adam's state on the GPU.
//!
//! - `exec`: the device seam (memory, copies, launches by name); `device::CudaExec` is the GPU
//!   (feature `cuda`), `emulator::EmuExec` the same kernels compiled for the CPU (tests).
//! - `params`: the kernels' parameter structs, mirrored in `kernels/common.cuh`.
//! - `ops`: one launcher per kernel, and the GEMM planner.
//! - `engine`: the reference model as a fixed sequence of launches (`Engine<E>`), which is the
//!   `Backend`; `CudaBackend` is `Engine<CudaExec>`.
//! - `selftest`: every kernel against the CPU layers, on any device.
//! - `bench`: SGEMM and per-layer timings.
//!
//! Without the `cuda` feature, `CudaBackend::new` and the benchmarks return an error that says
//! how to get them, so the rest of the crate needs no `#[cfg]`. The emulator, launchers and
//! engine build either way: they need no CUDA library.

pub mod bench;
pub mod emulator;
pub mod engine;
pub mod exec;
pub mod ops;
pub mod params;
pub mod selftest;
pub mod sources;

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod nvrtc;

pub use bench::{LayerBench, LayerTiming};

use anyhow::Result;

use crate::backend::{AdamConfig, Backend, NamedTensor, OptimizerState, TrainStats};
use crate::model::ModelConfig;

#[cfg(feature = "cuda")]
mod real {
    use super::*;
    use crate::cuda::device::CudaExec;
    use crate::cuda::engine::Engine;

    /// The reference model on GPU 0 (`CUDA_VISIBLE_DEVICES` picks which one that is).
    pub struct CudaBackend(pub Engine<CudaExec>);

    impl CudaBackend {
        /// Opens the GPU, compiles the kernels and uploads `reference_model(cfg, seed)`: the same
        /// initial weights as `CpuBackend::new(cfg, seed, adam)`.
        pub fn new(cfg: &ModelConfig, seed: u64, adam: AdamConfig) -> Result<Self> {
            Ok(CudaBackend(Engine::new(CudaExec::new(0)?, cfg, seed, adam)?))
        }
    }

    impl Backend for CudaBackend {
        fn describe(&self) -> String {
            self.0.describe()
        }
        fn train_step(&mut self, x: &[f32], y: &[usize], lr: f64, step: u64) -> Result<()> {
            self.0.train_step(x, y, lr, step)
        }
        fn take_train_stats(&mut self) -> Result<TrainStats> {
            self.0.take_train_stats()
        }
        fn predict(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>> {
            self.0.predict(x, n)
        }
        fn export_weights(&mut self) -> Result<Vec<NamedTensor>> {
            self.0.export_weights()
        }
        fn import_weights(&mut self, weights: &[NamedTensor]) -> Result<()> {
            self.0.import_weights(weights)
        }
        fn export_optimizer(&mut self) -> Result<OptimizerState> {
            self.0.export_optimizer()
        }
        fn import_optimizer(&mut self, state: &OptimizerState) -> Result<()> {
            self.0.import_optimizer(state)
        }
        fn layer_stats(&mut self, x: &[f32], n: usize) -> Result<crate::stats::LayerStats> {
            self.0.layer_stats(x, n)
        }
    }

    /// GFLOP/s of our SGEMM on an n x n x n product on GPU 0.
    pub fn bench_sgemm(n: usize) -> Result<f64> {
        crate::cuda::bench::sgemm_gflops(&mut CudaExec::new(0)?, n)
    }

    /// GFLOP/s of our SGEMM on an n x n x n product under each candidate plan, on GPU 0.
    pub fn bench_sgemm_plans(n: usize) -> Result<Vec<(crate::cuda::ops::GemmPlan, f64)>> {
        crate::cuda::bench::sgemm_gflops_by_plan(&mut CudaExec::new(0)?, n, &crate::cuda::bench::candidate_plans(n))
    }

    /// Per-layer forward/backward times and the step time of the reference model on GPU 0.
    pub fn bench_layers(cfg: &ModelConfig, batch: usize, iters: usize) -> Result<super::LayerBench> {
        crate::cuda::bench::layer_bench(CudaExec::new(0)?, cfg, batch, iters)
    }
}

#[cfg(feature = "cuda")]
pub use real::{bench_layers, bench_sgemm, bench_sgemm_plans, CudaBackend};

#[cfg(not(feature = "cuda"))]
mod stub {
    use super::*;
    use anyhow::bail;

    const NO_CUDA: &str =
        "--device cuda: this medcnn was built without CUDA support; rebuild with `cargo build --release --features cuda`";

    /// Stands in for the CUDA backend in a build without the `cuda` feature. It has no values,
    /// so the methods below can never run.
    pub enum CudaBackend {}

    impl CudaBackend {
        pub fn new(_cfg: &ModelConfig, _seed: u64, _adam: AdamConfig) -> Result<Self> {
            bail!(NO_CUDA)
        }
    }

    impl Backend for CudaBackend {
        fn describe(&self) -> String {
            match *self {}
        }
        fn train_step(&mut self, _: &[f32], _: &[usize], _: f64, _: u64) -> Result<()> {
            match *self {}
        }
        fn take_train_stats(&mut self) -> Result<TrainStats> {
            match *self {}
        }
        fn predict(&mut self, _: &[f32], _: usize) -> Result<Vec<f32>> {
            match *self {}
        }
        fn export_weights(&mut self) -> Result<Vec<NamedTensor>> {
            match *self {}
        }
        fn import_weights(&mut self, _: &[NamedTensor]) -> Result<()> {
            match *self {}
        }
        fn export_optimizer(&mut self) -> Result<OptimizerState> {
            match *self {}
        }
        fn import_optimizer(&mut self, _: &OptimizerState) -> Result<()> {
            match *self {}
        }
    }

    pub fn bench_sgemm(_n: usize) -> Result<f64> {
        bail!(NO_CUDA)
    }

    pub fn bench_sgemm_plans(_n: usize) -> Result<Vec<(crate::cuda::ops::GemmPlan, f64)>> {
        bail!(NO_CUDA)
    }

    pub fn bench_layers(_cfg: &ModelConfig, _batch: usize, _iters: usize) -> Result<super::LayerBench> {
        bail!(NO_CUDA)
    }
}

#[cfg(not(feature = "cuda"))]
pub use stub::{bench_layers, bench_sgemm, bench_sgemm_plans, CudaBackend};
