//! The seam between devices: one training step, one inference batch and the weights/optimizer
//! state in and out. The CPU implementation (`CpuBackend`) is the reference; the CUDA one lives
//! in `crate::cuda` behind the `cuda` feature (a stub that explains itself otherwise).
//!
//! The device is chosen once, when the backend is made; the training loop above it never asks.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::data::InputShape;
use crate::layers::{cross_entropy::argmax_rows, Ctx, SoftmaxCrossEntropy};
pub use crate::model::{check_names, NamedTensor};
use crate::model::{ModelConfig, Sequential};
use crate::optim::Adam;
use crate::spec::{BuildOptions, ModelSpec};
use crate::stats::{output_stats, param_stats, AdamStep, LayerStats};
use crate::tensor::{from_vec, slice, Tensor};

/// Side length of the reference's default input (64x64 gray, MedNIST's size).
pub const IMAGE_SIDE: usize = 64;

/// Adam's state: the step count and both moments, one tensor per parameter, named
/// `<param>.exp_avg` and `<param>.exp_avg_sq` as in PyTorch.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    pub t: u64,
    pub moments: Vec<NamedTensor>,
}

/// Training sums since the last `take_train_stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TrainStats {
    /// Sum over images of the cross-entropy loss.
    pub loss_sum: f64,
    pub correct: u64,
    pub images: u64,
}

/// Adam's settings (betas and eps are PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub weight_decay: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Device {
    Cpu,
    Cuda,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// What a device must do to train and run a model.
pub trait Backend {
    /// The device in words, e.g. `cpu (2 threads)` or `cuda: NVIDIA H100 80GB HBM3`.
    fn describe(&self) -> String;

    /// One step: forward (training mode) on x (n, C, S, S), mean cross-entropy against y,
    /// backward, one Adam update at learning rate `lr`. `step` seeds dropout. Loss and accuracy
    /// are summed inside the backend; read them with `take_train_stats`.
    fn train_step(&mut self, x: &[f32], y: &[usize], lr: f64, step: u64) -> Result<()>;

    /// The sums since the last call (on a GPU this is where the host waits for the device).
    fn take_train_stats(&mut self) -> Result<TrainStats>;

    /// Logits (n, classes), row-major, in evaluation mode (dropout off).
    fn predict(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>>;

    /// The weights, named as the PyTorch module's `state_dict` (see `spec`).
    fn export_weights(&mut self) -> Result<Vec<NamedTensor>>;
    fn import_weights(&mut self, weights: &[NamedTensor]) -> Result<()>;

    fn export_optimizer(&mut self) -> Result<OptimizerState>;
    fn import_optimizer(&mut self, state: &OptimizerState) -> Result<()>;

    /// Per-layer statistics of the step just taken (`crate::stats`): each parameter's norm, its
    /// gradient's norm and the last Adam update's ratio to it; each layer's output on `x`, the
    /// batch of `n` images just trained on (the CPU runs it again with the updated weights; the
    /// GPU reports what its training forward left, before the update). Called every
    /// `--stats-every` steps only (a GPU copies what it needs to the host here). The default
    /// reports nothing.
    fn layer_stats(&mut self, _x: &[f32], _n: usize) -> Result<LayerStats> {
        Ok(LayerStats::default())
    }
}

/// Makes the backend for `device`, with the network of `spec` for `classes` classes,
/// initialised from `seed`.
pub fn make_backend(
    device: Device,
    spec: &ModelSpec,
    classes: usize,
    seed: u64,
    adam: AdamConfig,
) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(CpuBackend::from_spec(spec, classes, seed, adam)?)),
        Device::Cuda => {
            let cfg = cuda_config(spec, classes)?;
            Ok(Box::new(crate::cuda::CudaBackend::new(&cfg, seed, adam)?))
        }
    }
}

/// Fails at once, before any data is read, when `device` cannot work here: a build without the
/// `cuda` feature, or (with it) a machine without the driver, NVRTC or a GPU. Opening the GPU
/// and compiling the kernels is left to the backend.
pub fn check_device(device: Device) -> Result<()> {
    if device != Device::Cuda {
        return Ok(());
    }
    #[cfg(not(feature = "cuda"))]
    bail!("--device cuda: this medcnn was built without CUDA support; rebuild with `cargo build --release --features cuda`");
    #[cfg(feature = "cuda")]
    {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("--device cuda: {}", crate::cuda::device::DRIVER_HELP);
        }
        anyhow::Context::context(crate::cuda::nvrtc::check_available(), "--device cuda")?;
        match cudarc::driver::CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => bail!("--device cuda: the CUDA driver sees no GPU (is one visible to nvidia-smi?)"),
            Err(e) => bail!("--device cuda: the CUDA driver failed to start ({e:?}); is a GPU visible (nvidia-smi)?"),
        }
    }
}

/// The CUDA engine runs the reference network on 64x64 gray images only (it does not walk a
/// spec yet): anything else is refused here, before any data is read.
pub fn cuda_config(spec: &ModelSpec, classes: usize) -> Result<ModelConfig> {
    match spec.reference_dropout() {
        Some(dropout) if spec.input == InputShape::default() => {
            Ok(ModelConfig { num_classes: classes, dropout, ..ModelConfig::default() })
        }
        _ => bail!(
            "--device cuda runs only the reference network on 64x64 gray images for now; this model is              `{}` on {} images: use --device cpu",
            spec.arch_text(),
            spec.input
        ),
    }
}

/// The reference path: the f32 CPU layers and Adam.
pub struct CpuBackend {
    pub model: Sequential<f32>,
    pub adam: Adam<f32>,
    loss: SoftmaxCrossEntropy<f32>,
    stats: TrainStats,
    num_classes: usize,
    input: InputShape,
}

impl CpuBackend {
    /// The reference network on 64x64 gray images (`model::ModelConfig`).
    pub fn new(cfg: &ModelConfig, seed: u64, adam: AdamConfig) -> Self {
        let spec = ModelSpec::reference(InputShape::default(), cfg.dropout);
        let opts = BuildOptions { fused: true, gemm_only: cfg.gemm_only };
        Self::with_options(&spec, cfg.num_classes, seed, adam, opts).expect("the reference fits 64x64")
    }

    /// The network of `spec`, with fused conv blocks wherever the spec has Conv2d, ReLU,
    /// MaxPool2d in a row (same weights and results as the layer-by-layer network).
    pub fn from_spec(spec: &ModelSpec, classes: usize, seed: u64, adam: AdamConfig) -> Result<Self> {
        Self::with_options(spec, classes, seed, adam, BuildOptions { fused: true, gemm_only: false })
    }

    pub fn with_options(
        spec: &ModelSpec,
        classes: usize,
        seed: u64,
        adam: AdamConfig,
        opts: BuildOptions,
    ) -> Result<Self> {
        Ok(CpuBackend {
            model: spec.build(classes, opts, seed)?,
            adam: Adam::new(adam.lr).with_weight_decay(adam.weight_decay),
            loss: SoftmaxCrossEntropy::new(),
            stats: TrainStats::default(),
            num_classes: classes,
            input: spec.input,
        })
    }

    fn input(&self, x: &[f32], n: usize) -> Result<Tensor<f32>> {
        let [c, h, w] = self.input.chw();
        let want = n * c * h * w;
        if x.len() != want {
            bail!("input batch has {} values, expected {n} x {c} x {h} x {w} = {want}", x.len());
        }
        Ok(from_vec(&[n, c, h, w], x.to_vec()))
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn train_step(&mut self, x: &[f32], y: &[usize], lr: f64, step: u64) -> Result<()> {
        let n = y.len();
        let x = self.input(x, n)?;
        if let Some(&bad) = y.iter().find(|&&t| t >= self.num_classes) {
            bail!("label {bad} out of range for {} classes", self.num_classes);
        }
        let logits = self.model.forward_owned(x, Ctx::train(step));
        let loss = self.loss.forward(&logits, y);
        self.model.zero_grad();
        self.model.backward(&self.loss.backward());
        self.adam.lr = lr;
        self.adam.step(&mut self.model.params_mut());
        let correct = argmax_rows(&logits).iter().zip(y).filter(|(p, t)| p == t).count();
        self.stats.loss_sum += loss as f64 * n as f64;
        self.stats.correct += correct as u64;
        self.stats.images += n as u64;
        Ok(())
    }

    fn take_train_stats(&mut self) -> Result<TrainStats> {
        Ok(std::mem::take(&mut self.stats))
    }

    fn predict(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let logits = self.model.forward(&self.input(x, n)?, Ctx::eval());
        Ok(slice(&logits).to_vec())
    }

    fn export_weights(&mut self) -> Result<Vec<NamedTensor>> {
        Ok(self.model.export_weights())
    }

    fn import_weights(&mut self, weights: &[NamedTensor]) -> Result<()> {
        self.model.import_weights(weights)
    }

    fn export_optimizer(&mut self) -> Result<OptimizerState> {
        let params = self.model.named_params();
        let mut moments = Vec::new();
        for (i, (name, p)) in params.iter().enumerate() {
            let zeros = vec![0.0; p.value.len()];
            let m = self.adam.m.get(i).unwrap_or(&zeros);
            let v = self.adam.v.get(i).unwrap_or(&zeros);
            let shape = p.value.shape().to_vec();
            moments.push(NamedTensor { name: format!("{name}.exp_avg"), shape: shape.clone(), data: m.clone() });
            moments.push(NamedTensor { name: format!("{name}.exp_avg_sq"), shape, data: v.clone() });
        }
        Ok(OptimizerState { t: self.adam.t, moments })
    }

    fn import_optimizer(&mut self, state: &OptimizerState) -> Result<()> {
        let params = self.model.named_params();
        let names: Vec<String> =
            params.iter().flat_map(|(n, _)| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")]).collect();
        check_names(&names, &state.moments)?;
        for ((_, p), pair) in params.iter().zip(state.moments.chunks_exact(2)) {
            for t in pair {
                if t.data.len() != p.value.len() {
                    bail!("optimizer state {} has {} values, expected {}", t.name, t.data.len(), p.value.len());
                }
            }
        }
        self.adam.t = state.t;
        self.adam.m = state.moments.iter().step_by(2).map(|t| t.data.clone()).collect();
        self.adam.v = state.moments.iter().skip(1).step_by(2).map(|t| t.data.clone()).collect();
        Ok(())
    }

    /// Parameters from the model and Adam's state; outputs from one more forward pass over `x`
    /// in evaluation mode (dropout off), observed layer by layer.
    fn layer_stats(&mut self, x: &[f32], n: usize) -> Result<LayerStats> {
        let adam = AdamStep::of(&self.adam);
        fn moment(all: &[Vec<f32>], i: usize) -> &[f32] {
            all.get(i).map_or(&[][..], |m| &m[..])
        }
        let params = (self.model.named_params().into_iter().enumerate())
            .map(|(i, (name, p))| {
                param_stats(
                    &name,
                    slice(&p.value),
                    slice(&p.grad),
                    moment(&self.adam.m, i),
                    moment(&self.adam.v, i),
                    adam,
                )
            })
            .collect();
        let mut outputs = Vec::new();
        let input = self.input(x, n)?;
        self.model.forward_observed(&input, Ctx::eval(), &mut |name, y| outputs.push(output_stats(name, slice(y))));
        Ok(LayerStats { params, outputs })
    }
}
