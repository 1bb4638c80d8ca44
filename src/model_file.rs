//! The model file, `model.safetensors`: the weights (named as PyTorch's `state_dict`, so
//! `load_state_dict` takes them), plus the metadata that makes them usable on their own: the
//! class names, the model spec (`arch`), the input size and channels, and what training adds
//! (split, data fingerprint, epoch, validation accuracy).
//!
//! What it is not: the checkpoint (`checkpoint.safetensors`, which `--resume` reads, see
//! `train`), and the byte format itself (`checkpoint`: checksums, atomic writes).
//!
//! Files written before the model spec existed have no `arch` entry: they load as the reference
//! network on 64x64 gray images, with the dropout they recorded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::backend::{make_backend, AdamConfig, Backend, Device, NamedTensor};
use crate::checkpoint::{self, meta_json, MODEL_FORMAT};
use crate::data::InputShape;
use crate::model::{ModelConfig, Sequential};
use crate::spec::{BuildOptions, ModelSpec, REFERENCE_DROPOUT};
use crate::tensor::Float;

/// A trained model file, read back: weights and what they need to be used.
#[derive(Clone, Debug)]
pub struct SavedModel {
    pub path: PathBuf,
    pub classes: Vec<String>,
    pub spec: ModelSpec,
    pub weights: Vec<NamedTensor>,
    pub meta: BTreeMap<String, String>,
}

/// `OUT/model.safetensors`.
pub fn model_path(out: &Path) -> PathBuf {
    out.join("model.safetensors")
}

/// The spec's metadata entries: `arch` (the `--arch` text), `image_size`, `channels`, and for
/// the reference its `dropout`.
pub fn spec_metadata(spec: &ModelSpec) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("arch".into(), spec.arch_text());
    m.insert("image_size".into(), spec.input.size.to_string());
    m.insert("channels".into(), spec.input.channels.to_string());
    if let Some(p) = spec.reference_dropout() {
        m.insert("dropout".into(), p.to_string());
    }
    m
}

/// The spec a file's metadata describes (the reference on 64x64 gray for files without one).
pub fn spec_from_metadata(meta: &BTreeMap<String, String>, path: &Path) -> Result<ModelSpec> {
    let dropout = match meta.get("dropout") {
        Some(v) => v.parse().with_context(|| format!("{}: metadata entry dropout is malformed", path.display()))?,
        None => REFERENCE_DROPOUT,
    };
    let Some(arch) = meta.get("arch") else {
        return Ok(ModelSpec::reference(InputShape::default(), dropout));
    };
    let number = |key: &str| -> Result<usize> {
        let v = meta.get(key).with_context(|| format!("{}: has an arch but no {key} entry", path.display()))?;
        v.parse().with_context(|| format!("{}: metadata entry {key} is malformed", path.display()))
    };
    let input =
        InputShape::new(number("channels")?, number("image_size")?).with_context(|| path.display().to_string())?;
    if arch.starts_with('@') {
        bail!("{}: metadata entry arch names a file ({arch}); a model file holds its layers", path.display());
    }
    ModelSpec::parse(arch, input, dropout).with_context(|| format!("{}: the stored model spec", path.display()))
}

/// Checks that each tensor read from `path` has the shape the model needs (names and order were
/// checked by `checkpoint::load`), naming the file and the tensor when one does not.
pub fn check_shapes(path: &Path, expected: &[(String, Vec<usize>)], tensors: &[NamedTensor]) -> Result<()> {
    for ((name, shape), t) in expected.iter().zip(tensors) {
        if &t.shape != shape {
            bail!(
                "{}: tensor {name} has shape {:?}, the model needs {shape:?} (another architecture or class count?)",
                path.display(),
                t.shape
            );
        }
    }
    Ok(())
}

impl SavedModel {
    /// Writes a model file: the weights, the class names and spec that `load` reads back, and
    /// `extra` metadata (a training run adds its split, data fingerprint, epoch, ...).
    pub fn save(
        path: &Path,
        classes: &[String],
        spec: &ModelSpec,
        weights: &[NamedTensor],
        mut extra: BTreeMap<String, String>,
    ) -> Result<()> {
        extra.insert("classes".into(), serde_json::to_string(classes)?);
        extra.extend(spec_metadata(spec));
        checkpoint::save(path, MODEL_FORMAT, weights, &extra)
    }

    /// Reads and checks a model file: format, version, spec, checksum, then that the weights
    /// have the shapes the spec and the listed classes need. Every error names the file.
    pub fn load(path: &Path) -> Result<SavedModel> {
        if !path.exists() {
            bail!("model file {} does not exist", path.display());
        }
        let mut spec = None;
        let (weights, meta) = checkpoint::load_with(path, MODEL_FORMAT, |meta| {
            let s = spec_from_metadata(meta, path)?;
            let names = s.param_names();
            spec = Some(s);
            Ok(names)
        })?;
        let spec = spec.expect("load_with asked for the names");
        let classes: Vec<String> = meta_json(&meta, "classes", path)?;
        if classes.len() < 2 {
            bail!("{}: the metadata lists {} classes; a model has at least two", path.display(), classes.len());
        }
        let shapes = spec.weight_shapes(classes.len()).with_context(|| path.display().to_string())?;
        check_shapes(path, &shapes, &weights)?;
        Ok(SavedModel { path: path.to_path_buf(), classes, spec, weights, meta })
    }

    /// A backend on `device` holding these weights.
    pub fn backend(&self, device: Device) -> Result<Box<dyn Backend>> {
        let adam = AdamConfig { lr: 1e-3, weight_decay: 0.0 };
        let mut b = make_backend(device, &self.spec, self.classes.len(), 0, adam)?;
        b.import_weights(&self.weights)?;
        Ok(b)
    }

    /// The CPU layers holding these weights (unfused: explain and inspect read every layer's
    /// output; fused for speed otherwise).
    pub fn cpu_model<T: Float>(&self, opts: BuildOptions) -> Result<Sequential<T>> {
        let mut m = self.spec.build::<T>(self.classes.len(), opts, 0)?;
        m.import_weights(&self.weights).with_context(|| self.path.display().to_string())?;
        Ok(m)
    }
}

/// The parameter names of the reference model, in order.
pub fn weight_names(cfg: &ModelConfig) -> Vec<String> {
    ModelSpec::reference(InputShape::default(), cfg.dropout).param_names()
}
