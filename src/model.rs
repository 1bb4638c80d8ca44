//! The model: a sequence of named layers run in order, the walk over their parameters, and
//! PyTorch's default initialisation. What the layers are comes from a `crate::spec::ModelSpec`
//! (the reference network is one); this file only runs them.
//!
//! Layer names follow PyTorch's `state_dict` (`3.weight` for layer 3 of an `nn.Sequential`,
//! `conv_block.0.weight`, ..., `classifier.2.bias` for the reference module), so weights can be
//! exchanged with it.

use anyhow::{bail, Result};
use rand::{rngs::StdRng, RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::InputShape;
use crate::layers::{Ctx, Layer, Param};
use crate::spec::{BuildOptions, ModelSpec};
use crate::tensor::{slice, slice_mut, Float, Tensor};

/// What a layer is, so that code finds "the last conv layer" by kind, never by its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Conv2d,
    /// A fused Conv2d + ReLU + MaxPool2d (`layers::ConvReluPool`).
    ConvReluPool,
    Relu,
    MaxPool2d,
    AvgPool2d,
    GlobalAvgPool2d,
    Dropout,
    Flatten,
    Linear,
    /// A layer pushed by hand (tests) without saying what it is.
    Other,
}

/// A layer, the name its parameters are saved under, and what kind of layer it is.
pub struct NamedLayer<T: Float> {
    pub name: String,
    pub kind: LayerKind,
    pub layer: Box<dyn Layer<T>>,
}

/// Layers applied in order: forward walks them first to last, backward last to first.
pub struct Sequential<T: Float> {
    pub layers: Vec<NamedLayer<T>>,
    /// The input the layers were built for (set by `ModelSpec::build`; 64x64 gray otherwise).
    pub input: InputShape,
}

impl<T: Float> Sequential<T> {
    pub fn new() -> Self {
        Sequential { layers: Vec::new(), input: InputShape::default() }
    }

    pub fn push(&mut self, name: impl Into<String>, layer: impl Layer<T> + 'static) {
        self.push_kind(name, LayerKind::Other, layer);
    }

    pub fn push_kind(&mut self, name: impl Into<String>, kind: LayerKind, layer: impl Layer<T> + 'static) {
        self.layers.push(NamedLayer { name: name.into(), kind, layer: Box::new(layer) });
    }

    /// Indices of the layers of `kind`, in order.
    pub fn find(&self, kind: LayerKind) -> Vec<usize> {
        (0..self.layers.len()).filter(|&i| self.layers[i].kind == kind).collect()
    }

    pub fn forward(&mut self, x: &Tensor<T>, ctx: Ctx) -> Tensor<T> {
        self.forward_range(x, 0..self.layers.len(), ctx)
    }

    /// `forward` on an input the caller gives away: no layer needs to copy what it keeps.
    pub fn forward_owned(&mut self, x: Tensor<T>, ctx: Ctx) -> Tensor<T> {
        let mut h = x;
        for l in &mut self.layers {
            h = l.layer.forward_owned(h, ctx);
        }
        h
    }

    /// Runs layers `range` only (Grad-CAM stops at the last conv layer, for example).
    pub fn forward_range(&mut self, x: &Tensor<T>, range: std::ops::Range<usize>, ctx: Ctx) -> Tensor<T> {
        let mut layers = self.layers[range].iter_mut();
        let Some(first) = layers.next() else { return x.clone() };
        // The first layer borrows x; each later one owns its input, as it is nobody else's.
        let mut h = first.layer.forward(x, ctx);
        for l in layers {
            h = l.layer.forward_owned(h, ctx);
        }
        h
    }

    /// `forward`, calling `observe(layer name, its output)` after each layer: for the training
    /// statistics (`crate::stats`), every few hundred steps, never on a normal step.
    pub fn forward_observed(
        &mut self,
        x: &Tensor<T>,
        ctx: Ctx,
        observe: &mut dyn FnMut(&str, &Tensor<T>),
    ) -> Tensor<T> {
        let mut h = x.clone();
        for l in &mut self.layers {
            h = l.layer.forward_owned(h, ctx);
            observe(&l.name, &h);
        }
        h
    }

    /// Backpropagates dy through every layer; returns dL/dinput. Accumulates parameter grads.
    pub fn backward(&mut self, dy: &Tensor<T>) -> Tensor<T> {
        self.backward_range(dy, 0..self.layers.len())
    }

    /// Backpropagates through layers `range` (last to first).
    pub fn backward_range(&mut self, dy: &Tensor<T>, range: std::ops::Range<usize>) -> Tensor<T> {
        let mut d = dy.clone();
        for l in self.layers[range].iter_mut().rev() {
            d = l.layer.backward(&d);
        }
        d
    }

    pub fn zero_grad(&mut self) {
        for p in self.params_mut() {
            p.grad.fill(T::zero());
        }
    }

    /// Every parameter, in a fixed order (layer order, weight before bias).
    pub fn params_mut(&mut self) -> Vec<&mut Param<T>> {
        self.layers.iter_mut().flat_map(|l| l.layer.params_mut()).collect()
    }

    /// `(name, param)` pairs, names as in the PyTorch `state_dict`.
    pub fn named_params(&self) -> Vec<(String, &Param<T>)> {
        let mut out = Vec::new();
        for l in &self.layers {
            let ps = l.layer.params();
            let kinds: &[&str] = if ps.len() == 2 { &["weight", "bias"] } else { &["weight"] };
            for (p, kind) in ps.into_iter().zip(kinds) {
                out.push((format!("{}.{kind}", l.name), p));
            }
        }
        out
    }

    /// The parameters as f32 tensors named as the PyTorch `state_dict`, in order.
    pub fn export_weights(&self) -> Vec<NamedTensor> {
        self.named_params()
            .into_iter()
            .map(|(name, p)| NamedTensor {
                name,
                shape: p.value.shape().to_vec(),
                data: slice(&p.value).iter().map(|v| v.as_f64() as f32).collect(),
            })
            .collect()
    }

    /// Sets every parameter from `weights`, which must be exactly `export_weights`' names and
    /// shapes in order (an error names the first tensor that is not).
    pub fn import_weights(&mut self, weights: &[NamedTensor]) -> Result<()> {
        let names: Vec<String> = self.named_params().into_iter().map(|(n, _)| n).collect();
        check_names(&names, weights)?;
        for (p, w) in self.params_mut().into_iter().zip(weights) {
            if p.value.shape() != w.shape.as_slice() {
                bail!("weight {} has shape {:?}, the model expects {:?}", w.name, w.shape, p.value.shape());
            }
            for (v, &x) in slice_mut(&mut p.value).iter_mut().zip(&w.data) {
                *v = T::f(x as f64);
            }
        }
        Ok(())
    }

    pub fn param_count(&self) -> usize {
        self.named_params().iter().map(|(_, p)| p.value.len()).sum()
    }

    /// Output shapes layer by layer for an input shape, without computing anything.
    pub fn shapes(&self, input: &[usize]) -> Vec<Vec<usize>> {
        let mut s = input.to_vec();
        self.layers
            .iter()
            .map(|l| {
                s = l.layer.output_shape(&s);
                s.clone()
            })
            .collect()
    }

    /// A table of the layers, output shapes and parameter counts.
    pub fn summary(&self, input: &[usize]) -> String {
        let mut out = format!("{:<14} {:<28} {:<18} {:>9}\n", "name", "layer", "output", "params");
        for (l, s) in self.layers.iter().zip(self.shapes(input)) {
            let n: usize = l.layer.params().iter().map(|p| p.value.len()).sum();
            out += &format!("{:<14} {:<28} {:<18} {:>9}\n", l.name, l.layer.describe(), format!("{s:?}"), n);
        }
        out + &format!("total parameters: {}\n", self.param_count())
    }
}

impl<T: Float> Default for Sequential<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A named f32 tensor as it travels between backends, checkpoints and safetensors files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Checks that `tensors` are exactly `names`, in order, with a message naming the first mismatch.
pub fn check_names(names: &[String], tensors: &[NamedTensor]) -> Result<()> {
    for (i, want) in names.iter().enumerate() {
        match tensors.get(i) {
            Some(t) if &t.name == want => {
                if t.data.len() != t.shape.iter().product::<usize>() {
                    bail!("tensor {} has {} values for shape {:?}", t.name, t.data.len(), t.shape);
                }
            }
            Some(t) => bail!("expected tensor {want} at position {i}, found {}", t.name),
            None => bail!("tensor {want} is missing"),
        }
    }
    if tensors.len() > names.len() {
        bail!("unexpected extra tensor {}", tensors[names.len()].name);
    }
    Ok(())
}

/// The settings of the reference architecture that a user can change (the CUDA engine and
/// older callers build from this; everything else builds from a `ModelSpec`).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub num_classes: usize,
    pub dropout: f64,
    /// Build each conv block as one fused `ConvReluPool` layer (the fast CPU path) instead of
    /// three layers (the readable reference). Same parameters, names and results.
    pub fused: bool,
    /// Fused blocks compute every convolution by im2col + GEMM, without the direct first-block
    /// path or the Winograd forward. The CUDA checks compare against this path: its sums are
    /// the closest to the device's, so near ties in a pooling window break the same way.
    pub gemm_only: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { num_classes: 6, dropout: 0.4, fused: false, gemm_only: false }
    }
}

/// The reference model on 64x64 gray images (`ModelSpec::reference`, drawn in its docs):
/// 421,510 parameters for 6 classes, weights drawn from `seed` as PyTorch's defaults.
pub fn reference_model<T: Float>(cfg: &ModelConfig, seed: u64) -> Sequential<T> {
    let opts = BuildOptions { fused: cfg.fused, gemm_only: cfg.gemm_only };
    ModelSpec::reference(InputShape::default(), cfg.dropout)
        .build(cfg.num_classes, opts, seed)
        .expect("the reference network fits a 64x64 input")
}

/// PyTorch's default initialisation for Conv2d and Linear: weight from kaiming_uniform with
/// a = sqrt(5), which works out to U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and bias from the same
/// bound. fan_in = in_channels * kh * kw (conv) or in_features (linear), i.e. weight[0].len().
///
/// Values are drawn in f64 and rounded, so an f32 and an f64 model from one seed agree.
pub fn init_pytorch_default<T: Float>(model: &mut Sequential<T>, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for l in &mut model.layers {
        let mut params = l.layer.params_mut();
        let Some(weight) = params.first() else { continue };
        let fan_in: usize = weight.value.shape()[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        for p in params.iter_mut() {
            for v in slice_mut(&mut p.value) {
                *v = T::f(rng.random_range(-bound..bound));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_model_has_the_pytorch_parameter_count_and_names() {
        let m = reference_model::<f32>(&ModelConfig::default(), 0);
        assert_eq!(m.param_count(), 421_510);
        let names: Vec<String> = m.named_params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "conv_block.0.weight");
        assert_eq!(names[6], "conv_block.9.weight");
        assert_eq!(names.last().unwrap(), "classifier.2.bias");
        assert_eq!(m.shapes(&[2, 1, 64, 64]).last().unwrap(), &vec![2, 6]);
    }
}
