//! The CUDA backend. Without the `cuda` feature this is a stub whose constructor explains how to
//! get the real one, so the rest of the crate needs no `#[cfg]`.

use anyhow::{bail, Result};

use crate::backend::{AdamConfig, Backend, NamedTensor, OptimizerState, TrainStats};
use crate::model::ModelConfig;

/// Stands in for the CUDA backend in a build without the `cuda` feature. It has no values, so
/// the methods below can never run.
pub enum CudaBackend {}

impl CudaBackend {
    pub fn new(_cfg: &ModelConfig, _seed: u64, _adam: AdamConfig) -> Result<Self> {
        bail!("--device cuda: this medcnn was built without CUDA support; rebuild with `cargo build --release --features cuda`")
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
