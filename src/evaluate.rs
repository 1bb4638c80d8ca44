//! Using a trained model: its loss, accuracy and confusion matrix on a split (`medcnn eval`, and
//! the training loop's validation), and the class of single images (`medcnn predict`).
//!
//! What it is not: training (see `train`) or reading the model file (see `model_file`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::backend::{check_device, Backend, Device};
use crate::checkpoint::meta_json;
use crate::data::{self, fingerprint, Dataset, DecodeNote, InputShape, Split};
use crate::layers::cross_entropy::{argmax, row_loss, softmax};
use crate::metrics::ConfusionMatrix;
use crate::model_file::SavedModel;

/// Mean loss, accuracy and confusion matrix of the model on `indices`, in evaluation mode.
pub fn evaluate(
    backend: &mut dyn Backend,
    ds: &Dataset,
    indices: &[usize],
    batch: usize,
) -> Result<(f64, f64, ConfusionMatrix)> {
    let k = ds.classes.len();
    let mut cm = ConfusionMatrix::new(ds.classes.clone());
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut loss_sum = 0.0;
    for chunk in indices.chunks(batch.max(1)) {
        data::fill_batch(ds, chunk, &[], &mut x, &mut y);
        let logits = backend.predict(&x, chunk.len())?;
        for (z, &t) in logits.chunks_exact(k).zip(&y) {
            loss_sum += row_loss(z, t);
            cm.add(t, argmax(z));
        }
    }
    let n = indices.len().max(1) as f64;
    Ok((loss_sum / n, cm.accuracy(), cm))
}

/// `medcnn eval`: accuracy, loss and confusion matrix of a saved model on a split.
pub fn eval_command(
    model: &Path,
    data_path: Option<&Path>,
    split_name: &str,
    device: Device,
    batch: usize,
) -> Result<()> {
    if !["train", "val", "test", "all"].contains(&split_name) {
        bail!("--split must be train, val, test or all, got {split_name}");
    }
    check_device(device)?;
    let saved = SavedModel::load(model)?;
    if device == Device::Cuda {
        crate::backend::cuda_config(&saved.spec, saved.classes.len())?;
    }
    let limit: Option<usize> = saved.meta.get("limit").and_then(|v| serde_json::from_str(v).ok()).flatten();
    let ds = data::load_data(data_path, if split_name == "all" { None } else { limit }, false, saved.spec.input)?;
    if ds.classes != saved.classes {
        bail!("the data's classes {:?} differ from the model's {:?}", ds.classes, saved.classes);
    }
    let indices: Vec<usize> = if split_name == "all" {
        (0..ds.len()).collect()
    } else {
        let split: Split = meta_json(&saved.meta, "split", model)?;
        if saved.meta.get("data_fingerprint") != Some(&fingerprint(&ds)) {
            bail!("{}: these are not the images the model was trained on, so its {split_name} split cannot be found (use --split all to evaluate every image)", model.display());
        }
        match split_name {
            "train" => split.train,
            "val" => split.val,
            "test" => split.test,
            other => bail!("--split must be train, val, test or all, got {other}"),
        }
    };
    let mut backend = saved.backend(device)?;
    let (loss, acc, cm) = evaluate(backend.as_mut(), &ds, &indices, batch)?;
    println!("{split_name}: {} images, loss {loss:.4}, accuracy {:.2}%", indices.len(), 100.0 * acc);
    println!("{}", cm.table());
    Ok(())
}

/// One image's prediction.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub file: String,
    pub class: String,
    pub probability: f64,
    pub probabilities: BTreeMap<String, f64>,
}

/// The class and probabilities for one row of logits.
pub fn prediction(file: String, classes: &[String], logits: &[f32]) -> Prediction {
    let p = softmax(logits);
    let best = argmax(&p);
    Prediction {
        file,
        class: classes[best].clone(),
        probability: p[best],
        probabilities: classes.iter().cloned().zip(p.iter().copied()).collect(),
    }
}

/// Reads, decodes (to the model's size and channels) and normalises an image file.
pub fn read_image_input(path: &Path, shape: InputShape) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    Ok(normalised_input(&bytes, &path.display().to_string(), shape)?.1)
}

/// Image file bytes as the model sees them: the pixels (`shape.channels` planes) and the
/// normalised input (`x / 127.5 - 1`), with what decoding had to do.
pub fn normalised_input(bytes: &[u8], name: &str, shape: InputShape) -> Result<(Vec<u8>, Vec<f32>, DecodeNote)> {
    let (mut pixels, note) = data::decode_image_as(bytes, name, shape)?;
    if shape.channels == 3 && !note.colour {
        pixels = data::expand_channels(&pixels, 3);
    }
    let mut x = vec![0.0; shape.len()];
    data::normalize_into(&pixels, &mut x);
    Ok((pixels, x, note))
}

/// `medcnn predict`: the class and the probabilities for each image.
pub fn predict_command(model: &Path, images: &[PathBuf], device: Device, json: bool) -> Result<()> {
    check_device(device)?;
    let saved = SavedModel::load(model)?;
    let mut backend = saved.backend(device)?;
    let mut out = Vec::new();
    for path in images {
        let x = read_image_input(path, saved.spec.input)?;
        out.push(prediction(path.display().to_string(), &saved.classes, &backend.predict(&x, 1)?));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for p in &out {
            let all: Vec<String> = saved.classes.iter().map(|c| format!("{c} {:.4}", p.probabilities[c])).collect();
            println!("{}: {} ({:.2}%)  [{}]", p.file, p.class, 100.0 * p.probability, all.join(", "));
        }
    }
    Ok(())
}
