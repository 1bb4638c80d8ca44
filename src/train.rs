//! The training loop: data -> batches -> backend steps -> validation -> metrics, plots, model and
//! checkpoint every epoch -> test-set evaluation and `summary.json` at the end. Also evaluation
//! of a saved model on a split, and prediction for single images.
//!
//! Everything random is derived from the seed: weights (`model::reference_model`), the split,
//! each epoch's order and flips (`data::epoch_order(seed, epoch)`), and dropout
//! (hash of seed, step, index). So a checkpoint only needs to store *where* the run is (epoch,
//! batch, step) to continue exactly as the uninterrupted run would have.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{make_backend, AdamConfig, Backend, Device, NamedTensor, OptimizerState, TrainStats};
use crate::checkpoint::{self, meta_json, CHECKPOINT_FORMAT, MODEL_FORMAT};
use crate::data::{self, Dataset, LoadOptions, Split, IMAGE_PIXELS};
use crate::metrics::{write_metrics_csv, ConfusionMatrix, EpochMetrics};
use crate::model::{reference_model, ModelConfig};
use crate::optim::LrSchedule;
use crate::report;
use crate::watch::Watch;

/// Train / validation / test fractions of each class.
pub const SPLIT_FRACTIONS: [f64; 3] = [0.7, 0.2, 0.1];

/// Everything that defines a training run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub data: Option<PathBuf>,
    pub out: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub dropout: f64,
    pub schedule: LrSchedule,
    pub seed: u64,
    pub threads: usize,
    pub device: Device,
    pub limit: Option<usize>,
    pub augment: bool,
    pub skip_bad_images: bool,
    /// Save the first conv layer's filters as a picture after every epoch.
    pub save_filters: bool,
    /// Steps between two per-layer statistics steps (`None`: about four per epoch).
    #[serde(default)]
    pub stats_every: Option<u64>,
    /// Serve the live dashboard on this address while training (`--dashboard`).
    #[serde(default)]
    pub dashboard: Option<String>,
}

impl Default for TrainConfig {
    /// The reference's settings: Adam, lr 1e-3, batch 64, 20 epochs, dropout 0.4.
    fn default() -> Self {
        TrainConfig {
            data: None,
            out: PathBuf::from("outputs"),
            epochs: 20,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 0.0,
            dropout: 0.4,
            schedule: LrSchedule::Constant,
            seed: 42,
            threads: 0,
            device: Device::Cpu,
            limit: None,
            augment: false,
            skip_bad_images: false,
            save_filters: false,
            stats_every: None,
            dashboard: None,
        }
    }
}

impl TrainConfig {
    /// Rejects settings that cannot train, naming the flag.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay must be zero or positive, got {}", self.weight_decay);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("--dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.limit == Some(0) {
            bail!("--limit must be at least 1 image per class");
        }
        // The checkpoint records both paths as text, so that `--resume` finds them again.
        for (flag, path) in [("--data", self.data.as_deref()), ("--out", Some(self.out.as_path()))] {
            if let Some(p) = path.filter(|p| p.to_str().is_none()) {
                bail!("{flag}: the path {} is not valid UTF-8; rename it or use a link with a UTF-8 name", p.display());
            }
        }
        check_device(self.device)
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
        crate::cuda::nvrtc::check_available().context("--device cuda")?;
        match cudarc::driver::CudaContext::device_count() {
            Ok(n) if n > 0 => Ok(()),
            Ok(_) => bail!("--device cuda: the CUDA driver sees no GPU (is one visible to nvidia-smi?)"),
            Err(e) => bail!("--device cuda: the CUDA driver failed to start ({e:?}); is a GPU visible (nvidia-smi)?"),
        }
    }
}

/// Where a run stands: stored in the checkpoint, enough to continue exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The epoch in progress (0-based).
    pub epoch: usize,
    /// The next batch of that epoch.
    pub batch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Training sums of the epoch so far, and its seconds so far.
    pub loss_sum: f64,
    pub correct: u64,
    pub images: u64,
    pub seconds: f64,
    pub best_val_acc: f64,
    pub best_epoch: usize,
    pub history: Vec<EpochMetrics>,
}

/// What `summary.json` holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub best_val_accuracy: f64,
    pub best_epoch: usize,
    pub epochs: usize,
    pub train_images_per_sec: f64,
    pub wall_seconds: f64,
    pub device: String,
    pub threads: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub split: SplitSizes,
    pub classes: Vec<String>,
    pub per_class: Vec<crate::metrics::ClassStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SplitSizes {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub duplicate_groups: usize,
    pub duplicate_files: usize,
}

/// Set by Ctrl-C: the loop finishes its step, saves a checkpoint and stops.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The outcome of `train`.
pub enum Outcome {
    Finished(Box<Summary>),
    Interrupted { checkpoint: PathBuf },
}

pub fn model_path(out: &Path) -> PathBuf {
    out.join("model.safetensors")
}
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint.safetensors")
}

/// A fingerprint of the images (names and bytes), to make sure a split refers to the same data.
pub fn data_fingerprint(ds: &Dataset) -> String {
    let mut h = Sha256::new();
    for (name, hash) in ds.names.iter().zip(&ds.hashes) {
        h.update(name.as_bytes());
        h.update(hash);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Fails early, before any data is read, if `out` cannot be created or written.
pub fn check_output_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("output folder {} cannot be created", out.display()))?;
    let probe = out.join(".medcnn-write-test");
    std::fs::write(&probe, b"ok").with_context(|| format!("output folder {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Loads the data a run names (or `data/`), with the run's limit.
pub fn load_data(path: Option<&Path>, limit: Option<usize>, skip_bad_images: bool) -> Result<Dataset> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => data::find_default_data(Path::new("data"))?,
    };
    let t = Instant::now();
    let ds = data::load_dataset(&path, &LoadOptions { limit_per_class: limit, skip_bad_images })?;
    let counts = ds.class_counts();
    println!(
        "data: {} images from {} in {:.1} s; classes: {}",
        ds.len(),
        path.display(),
        t.elapsed().as_secs_f64(),
        ds.classes.iter().zip(&counts).map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    );
    let r = &ds.report;
    if r.converted_to_gray > 0 || r.resized > 0 {
        println!("data: {} images converted to gray, {} resized to 64x64", r.converted_to_gray, r.resized);
    }
    for (file, why) in &r.skipped {
        println!("data: skipped {file}: {why}");
    }
    Ok(ds)
}

/// The model's metadata: what evaluation and prediction need besides the weights.
fn model_metadata(
    ds: &Dataset,
    split: &Split,
    cfg: &TrainConfig,
    epoch: usize,
    val_acc: f64,
) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    m.insert("split".into(), serde_json::to_string(split)?);
    m.insert("data_fingerprint".into(), data_fingerprint(ds));
    m.insert("limit".into(), serde_json::to_string(&cfg.limit)?);
    m.insert("epoch".into(), (epoch + 1).to_string());
    m.insert("val_accuracy".into(), val_acc.to_string());
    Ok(m)
}

/// Trains as `cfg` says. With `resume`, continues from `out/checkpoint.safetensors`.
pub fn train(cfg_in: &TrainConfig, resume: bool) -> Result<Outcome> {
    let wall = Instant::now();
    check_output_dir(&cfg_in.out)?;
    let ckpt_path = checkpoint_path(&cfg_in.out);

    // A resumed run takes its settings from the checkpoint (so the data order, split and dropout
    // repeat), except the number of epochs, which may be extended.
    let resumed = if resume { Some(read_checkpoint(&ckpt_path)?) } else { None };
    let mut cfg = match &resumed {
        Some(r) => {
            let (stats_every, dashboard) = (cfg_in.stats_every, cfg_in.dashboard.clone());
            TrainConfig {
                epochs: cfg_in.epochs,
                out: cfg_in.out.clone(),
                threads: cfg_in.threads,
                stats_every,
                dashboard,
                ..r.config.clone()
            }
        }
        None => cfg_in.clone(),
    };
    cfg.validate()?;
    cfg.threads = rayon::current_num_threads();

    let ds = load_data(cfg.data.as_deref(), cfg.limit, cfg.skip_bad_images)?;
    if ds.classes.len() < 2 {
        bail!("the data has {} class(es); training needs at least two", ds.classes.len());
    }
    let fingerprint = data_fingerprint(&ds);
    let split = match &resumed {
        Some(r) => {
            if r.fingerprint != fingerprint {
                bail!("{}: the data differs from the data this run was started on", ckpt_path.display());
            }
            r.split.clone()
        }
        None => data::split_dataset(&ds, cfg.seed, SPLIT_FRACTIONS),
    };
    println!("{}", split.summary());
    if split.train.is_empty() || split.val.is_empty() {
        bail!("the split left no training or no validation images; use more images per class");
    }

    let model_cfg = ModelConfig { num_classes: ds.classes.len(), dropout: cfg.dropout, ..ModelConfig::default() };
    let adam = AdamConfig { lr: cfg.lr, weight_decay: cfg.weight_decay };
    let mut backend = make_backend(cfg.device, &model_cfg, cfg.seed, adam)?;
    let mut progress = Progress::default();
    if let Some(r) = resumed {
        backend.import_weights(&r.weights)?;
        backend.import_optimizer(&r.optimizer)?;
        progress = r.progress;
        println!("resuming from {} at epoch {}, batch {}", ckpt_path.display(), progress.epoch + 1, progress.batch);
    }
    println!(
        "training on {}: {} epochs, batch {}, lr {:e}, seed {}",
        backend.describe(),
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
        cfg.seed
    );

    let bs = cfg.batch_size;
    let n_batches = split.train.len().div_ceil(bs);
    let mut watch = Watch::new(&cfg, &ds, split.val.first().copied(), n_batches, &progress, &backend.describe())?;
    let fault_step = fault_nan_at_step()?;
    let step_delay = test_step_delay()?;
    let (mut x, mut y) = (Vec::with_capacity(bs * IMAGE_PIXELS), Vec::with_capacity(bs));
    if INTERRUPTED.load(Ordering::SeqCst) {
        // Ctrl-C while the data was loading: nothing was trained, so nothing is saved.
        println!("interrupted before the first step; nothing to save");
        return Ok(Outcome::Interrupted { checkpoint: ckpt_path });
    }
    while progress.epoch < cfg.epochs {
        let epoch = progress.epoch;
        let lr = cfg.schedule.lr(cfg.lr, epoch);
        let order = data::epoch_order(split.train.len(), cfg.seed, epoch as u64);
        let flips = if cfg.augment { data::flip_mask(split.train.len(), cfg.seed, epoch as u64) } else { Vec::new() };
        let bar = progress_bar(n_batches as u64, progress.batch as u64, epoch, cfg.epochs);
        let t0 = Instant::now();
        let seconds_before = progress.seconds;
        let mut idx = Vec::with_capacity(bs);
        while progress.batch < n_batches {
            let range = progress.batch * bs..((progress.batch + 1) * bs).min(order.len());
            idx.clear();
            idx.extend(order[range.clone()].iter().map(|&i| split.train[i]));
            let flip = if flips.is_empty() { &[][..] } else { &flips[range] };
            data::fill_batch(&ds, &idx, flip, &mut x, &mut y);
            backend.train_step(&x, &y, lr, progress.step)?;
            if fault_step == Some(progress.step) {
                poison_weights(backend.as_mut())?;
            }
            if let Some(d) = step_delay {
                std::thread::sleep(d);
            }
            progress.step += 1;
            progress.batch += 1;
            watch.after_step(backend.as_mut(), &progress, &x, y.len())?;
            let interrupted = INTERRUPTED.load(Ordering::SeqCst);
            if progress.batch % 20 == 0 || progress.batch == n_batches || interrupted {
                let sums = backend.take_train_stats()?;
                watch.train_point(&progress, &sums);
                absorb(&mut progress, sums, epoch, &ckpt_path)?;
                let secs = seconds_before + t0.elapsed().as_secs_f64();
                bar.set_position(progress.batch as u64);
                bar.set_message(format!(
                    "loss {:.4} acc {:.2}% {:.0} img/s",
                    progress.loss_sum / progress.images.max(1) as f64,
                    100.0 * progress.correct as f64 / progress.images.max(1) as f64,
                    progress.images as f64 / secs.max(1e-9)
                ));
            }
            if interrupted {
                bar.abandon();
                progress.seconds = seconds_before + t0.elapsed().as_secs_f64();
                save_checkpoint(&ckpt_path, backend.as_mut(), &cfg, &split, &fingerprint, &progress)?;
                println!("interrupted: checkpoint saved to {} (continue with --resume)", ckpt_path.display());
                return Ok(Outcome::Interrupted { checkpoint: ckpt_path });
            }
        }
        bar.finish_and_clear();
        let train_seconds = seconds_before + t0.elapsed().as_secs_f64();

        let (val_loss, val_acc, val_cm) = evaluate(backend.as_mut(), &ds, &split.val, bs.max(256))?;
        let row = EpochMetrics {
            epoch: epoch + 1,
            train_loss: progress.loss_sum / progress.images.max(1) as f64,
            train_acc: progress.correct as f64 / progress.images.max(1) as f64,
            val_loss,
            val_acc,
            lr,
            seconds: train_seconds,
            images_per_sec: progress.images as f64 / train_seconds.max(1e-9),
        };
        let best = val_acc > progress.best_val_acc || progress.history.is_empty();
        println!(
            "epoch {:>3}/{}  train loss {:.4} acc {:6.2}%  val loss {:.4} acc {:6.2}%  lr {:.1e}  {:6.1} s  {:6.0} img/s{}",
            epoch + 1,
            cfg.epochs,
            row.train_loss,
            100.0 * row.train_acc,
            row.val_loss,
            100.0 * row.val_acc,
            lr,
            row.seconds,
            row.images_per_sec,
            if best { "  *best" } else { "" }
        );
        if !row.val_loss.is_finite() {
            bail!(
                "training diverged: the validation loss is {} after epoch {}; {}",
                row.val_loss,
                epoch + 1,
                last_good(&ckpt_path)
            );
        }
        watch.end_epoch(backend.as_mut(), &row, &val_cm)?;
        progress.history.push(row);
        if best {
            progress.best_val_acc = val_acc;
            progress.best_epoch = epoch + 1;
            let meta = model_metadata(&ds, &split, &cfg, epoch, val_acc)?;
            let weights = backend.export_weights()?;
            check_finite(&weights, &progress, &ckpt_path)?;
            SavedModel::save(&model_path(&cfg.out), &ds.classes, cfg.dropout, &weights, meta)?;
        }
        write_metrics_csv(&cfg.out.join("metrics.csv"), &progress.history)?;
        report::plot_loss(&progress.history, &cfg.out.join("loss.png"))?;
        report::plot_accuracy(&progress.history, &cfg.out.join("accuracy.png"))?;
        if cfg.save_filters {
            save_first_layer_filters(backend.as_mut(), &cfg.out.join(format!("filters/epoch_{:03}.png", epoch + 1)))?;
        }
        progress.epoch += 1;
        progress.batch = 0;
        (progress.loss_sum, progress.correct, progress.images, progress.seconds) = (0.0, 0, 0, 0.0);
        save_checkpoint(&ckpt_path, backend.as_mut(), &cfg, &split, &fingerprint, &progress)?;
        // A Ctrl-C during validation or saving stops here, with the epoch's checkpoint saved.
        if INTERRUPTED.load(Ordering::SeqCst) {
            println!("interrupted: checkpoint saved to {} (continue with --resume)", ckpt_path.display());
            return Ok(Outcome::Interrupted { checkpoint: ckpt_path });
        }
    }

    // The test set, once, with the best validation epoch's weights.
    let (best_weights, _) = checkpoint::load(&model_path(&cfg.out), MODEL_FORMAT, &weight_names(&model_cfg))?;
    backend.import_weights(&best_weights)?;
    let (test_loss, test_acc, cm) = evaluate(backend.as_mut(), &ds, &split.test, bs.max(256))?;
    println!(
        "test: loss {test_loss:.4}, accuracy {:.2}% ({} images), best validation epoch {}",
        100.0 * test_acc,
        split.test.len(),
        progress.best_epoch
    );
    println!("{}", cm.table());
    if cm.total() > 0 {
        report::plot_confusion(&cm, &cfg.out.join("confusion.png"))?;
    }
    let total_images: f64 = progress.history.iter().map(|r| r.images_per_sec * r.seconds).sum();
    let total_secs: f64 = progress.history.iter().map(|r| r.seconds).sum();
    let summary = Summary {
        test_accuracy: test_acc,
        test_loss,
        best_val_accuracy: progress.best_val_acc,
        best_epoch: progress.best_epoch,
        epochs: cfg.epochs,
        train_images_per_sec: total_images / total_secs.max(1e-9),
        wall_seconds: wall.elapsed().as_secs_f64(),
        device: backend.describe(),
        threads: cfg.threads,
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        split: SplitSizes {
            train: split.train.len(),
            val: split.val.len(),
            test: split.test.len(),
            duplicate_groups: split.duplicate_groups,
            duplicate_files: split.duplicate_files,
        },
        classes: ds.classes.clone(),
        per_class: cm.per_class(),
    };
    crate::metrics::write_atomic(&cfg.out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    println!("wrote {}/{{model.safetensors, checkpoint.safetensors, metrics.csv, loss.png, accuracy.png, confusion.png, summary.json}}", cfg.out.display());
    Ok(Outcome::Finished(Box::new(summary)))
}

/// Adds a backend's training sums to the epoch's, refusing a diverged loss.
fn absorb(progress: &mut Progress, s: TrainStats, epoch: usize, ckpt_path: &Path) -> Result<()> {
    if !s.loss_sum.is_finite() {
        bail!(
            "training diverged: the training loss became {} in epoch {} (by step {}); {}",
            s.loss_sum,
            epoch + 1,
            progress.step,
            last_good(ckpt_path)
        );
    }
    progress.loss_sum += s.loss_sum;
    progress.correct += s.correct;
    progress.images += s.images;
    Ok(())
}

fn progress_bar(len: u64, pos: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{}/{}", epoch + 1, epochs));
    bar.set_position(pos);
    bar
}

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
            let (loss, pred) = row_loss_and_argmax(z, t);
            loss_sum += loss;
            cm.add(t, pred);
        }
    }
    let n = indices.len().max(1) as f64;
    Ok((loss_sum / n, cm.accuracy(), cm))
}

/// Cross-entropy of one row of logits against class `t` (in f64), and the predicted class.
fn row_loss_and_argmax(z: &[f32], t: usize) -> (f64, usize) {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
    let pred = (0..z.len()).fold(0, |b, j| if z[j] > z[b] { j } else { b });
    (lse - z[t] as f64, pred)
}

/// Softmax of one row of logits.
pub fn softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = z.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// The parameter names of the reference model, in order.
pub fn weight_names(cfg: &ModelConfig) -> Vec<String> {
    weight_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// The parameter names and shapes of the reference model, in order.
pub fn weight_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    reference_model::<f32>(cfg, 0).named_params().into_iter().map(|(n, p)| (n, p.value.shape().to_vec())).collect()
}

/// Checks that each tensor read from `path` has the shape the model needs (names and order were
/// checked by `checkpoint::load`), naming the file and the tensor when one does not.
fn check_shapes(path: &Path, expected: &[(String, Vec<usize>)], tensors: &[NamedTensor]) -> Result<()> {
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

fn optimizer_names(cfg: &ModelConfig) -> Vec<String> {
    weight_names(cfg).iter().flat_map(|n| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")]).collect()
}

/// What is left after a divergence: the checkpoint of the last completed epoch, if any.
fn last_good(ckpt_path: &Path) -> String {
    if ckpt_path.exists() {
        format!("nothing was saved from it; the last good checkpoint is kept at {}", ckpt_path.display())
    } else {
        format!("nothing was saved from it (there is no earlier checkpoint at {})", ckpt_path.display())
    }
}

/// Refuses to save weights (or optimizer moments) holding NaN or infinity: a diverged model
/// must never replace the last good one.
fn check_finite(tensors: &[NamedTensor], progress: &Progress, ckpt_path: &Path) -> Result<()> {
    if let Some(t) = tensors.iter().find(|t| t.data.iter().any(|v| !v.is_finite())) {
        bail!(
            "training diverged: {} holds NaN or infinite values after {} steps; {}",
            t.name,
            progress.step,
            last_good(ckpt_path)
        );
    }
    Ok(())
}

/// A test hook, for the divergence tests only: `MEDCNN_FAULT_NAN_AT_STEP=N` makes optimizer step
/// N (0-based, counted over the whole run) write a NaN into the first weight, as a diverging
/// update would. Unset (always, outside tests), it does nothing.
pub const FAULT_NAN_AT_STEP_ENV: &str = "MEDCNN_FAULT_NAN_AT_STEP";

/// A test hook, for the interruption tests only: `MEDCNN_TEST_STEP_DELAY_MS=N` sleeps N ms
/// after every step, so a tiny run lasts long enough for a Ctrl-C to land mid-epoch however fast
/// the machine is. It changes no number. Unset (always, outside tests), it does nothing.
pub const TEST_STEP_DELAY_ENV: &str = "MEDCNN_TEST_STEP_DELAY_MS";

fn test_step_delay() -> Result<Option<std::time::Duration>> {
    match std::env::var(TEST_STEP_DELAY_ENV) {
        Ok(v) => v
            .trim()
            .parse()
            .map(|ms| Some(std::time::Duration::from_millis(ms)))
            .with_context(|| format!("{TEST_STEP_DELAY_ENV}={v} is not a number of milliseconds")),
        Err(_) => Ok(None),
    }
}

fn fault_nan_at_step() -> Result<Option<u64>> {
    match std::env::var(FAULT_NAN_AT_STEP_ENV) {
        Ok(v) => {
            v.trim().parse().map(Some).with_context(|| format!("{FAULT_NAN_AT_STEP_ENV}={v} is not a step number"))
        }
        Err(_) => Ok(None),
    }
}

fn poison_weights(backend: &mut dyn Backend) -> Result<()> {
    let mut weights = backend.export_weights()?;
    weights[0].data[0] = f32::NAN;
    backend.import_weights(&weights)
}

fn save_checkpoint(
    path: &Path,
    backend: &mut dyn Backend,
    cfg: &TrainConfig,
    split: &Split,
    fingerprint: &str,
    progress: &Progress,
) -> Result<()> {
    let mut tensors: Vec<NamedTensor> = backend.export_weights()?;
    let opt = backend.export_optimizer()?;
    tensors.extend(opt.moments.into_iter().map(|t| NamedTensor { name: format!("optimizer.{}", t.name), ..t }));
    check_finite(&tensors, progress, path)?;
    let mut meta = BTreeMap::new();
    meta.insert("config".into(), serde_json::to_string(cfg)?);
    meta.insert("split".into(), serde_json::to_string(split)?);
    meta.insert("data_fingerprint".into(), fingerprint.to_string());
    meta.insert("progress".into(), serde_json::to_string(progress)?);
    meta.insert("adam_t".into(), opt.t.to_string());
    checkpoint::save(path, CHECKPOINT_FORMAT, &tensors, &meta)
}

/// A checkpoint, read back.
pub struct Resumed {
    pub config: TrainConfig,
    pub split: Split,
    pub fingerprint: String,
    pub progress: Progress,
    pub weights: Vec<NamedTensor>,
    pub optimizer: OptimizerState,
}

pub fn read_checkpoint(path: &Path) -> Result<Resumed> {
    if !path.exists() {
        bail!("--resume: no checkpoint at {} (train without --resume first)", path.display());
    }
    // The names do not depend on the class count, so `load` checks the format, version, names
    // and checksum before any metadata is trusted; the shapes are checked after.
    let names_cfg = ModelConfig::default();
    let wn = weight_names(&names_cfg);
    let on = optimizer_names(&names_cfg);
    let names: Vec<String> = wn.iter().cloned().chain(on.iter().map(|n| format!("optimizer.{n}"))).collect();
    let (mut tensors, meta) = checkpoint::load(path, CHECKPOINT_FORMAT, &names)?;
    let moments = tensors.split_off(wn.len());
    let classes = classes_of(path, &tensors)?;
    let shapes = weight_shapes(&ModelConfig { num_classes: classes, ..names_cfg });
    check_shapes(path, &shapes, &tensors)?;
    let moment_shapes: Vec<(String, Vec<usize>)> = shapes
        .iter()
        .flat_map(|(n, s)| [(format!("{n}.exp_avg"), s.clone()), (format!("{n}.exp_avg_sq"), s.clone())])
        .collect();
    check_shapes(path, &moment_shapes, &moments)?;
    let t: u64 = meta.get("adam_t").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Resumed {
        config: meta_json(&meta, "config", path)?,
        split: meta_json(&meta, "split", path)?,
        fingerprint: meta.get("data_fingerprint").cloned().unwrap_or_default(),
        progress: meta_json(&meta, "progress", path)?,
        weights: tensors,
        optimizer: OptimizerState {
            t,
            moments: moments.into_iter().zip(on).map(|(t, name)| NamedTensor { name, ..t }).collect(),
        },
    })
}

/// The class count of weights read from `path`: the length of the last layer's bias.
fn classes_of(path: &Path, weights: &[NamedTensor]) -> Result<usize> {
    let bias = weights.last().map(|t| t.shape.as_slice()).unwrap_or_default();
    match bias {
        [k] if *k >= 2 => Ok(*k),
        _ => bail!("{}: the last layer has shape {bias:?}; a model has at least two classes", path.display()),
    }
}

/// A trained model file, read back: weights and what they need to be used.
pub struct SavedModel {
    pub path: PathBuf,
    pub classes: Vec<String>,
    pub config: ModelConfig,
    pub weights: Vec<NamedTensor>,
    pub meta: BTreeMap<String, String>,
}

impl SavedModel {
    /// Writes a model file: the weights, the class names and dropout that `load` reads back, and
    /// `extra` metadata (a training run adds its split, data fingerprint, epoch, ...).
    pub fn save(
        path: &Path,
        classes: &[String],
        dropout: f64,
        weights: &[NamedTensor],
        mut extra: BTreeMap<String, String>,
    ) -> Result<()> {
        extra.insert("classes".into(), serde_json::to_string(classes)?);
        extra.insert("dropout".into(), dropout.to_string());
        checkpoint::save(path, MODEL_FORMAT, weights, &extra)
    }

    /// Reads and checks a model file: format, version, checksum, then that the weights have the
    /// shapes the listed classes need. Every error names the file.
    pub fn load(path: &Path) -> Result<SavedModel> {
        if !path.exists() {
            bail!("model file {} does not exist", path.display());
        }
        let (weights, meta) = checkpoint::load(path, MODEL_FORMAT, &weight_names(&ModelConfig::default()))?;
        let classes: Vec<String> = meta_json(&meta, "classes", path)?;
        if classes.len() < 2 {
            bail!("{}: the metadata lists {} classes; a model has at least two", path.display(), classes.len());
        }
        let dropout = meta.get("dropout").and_then(|v| v.parse().ok()).unwrap_or(0.4);
        let config = ModelConfig { num_classes: classes.len(), dropout, ..ModelConfig::default() };
        check_shapes(path, &weight_shapes(&config), &weights)?;
        Ok(SavedModel { path: path.to_path_buf(), classes, config, weights, meta })
    }

    /// A backend on `device` holding these weights.
    pub fn backend(&self, device: Device) -> Result<Box<dyn Backend>> {
        let mut b = make_backend(device, &self.config, 0, AdamConfig { lr: 1e-3, weight_decay: 0.0 })?;
        b.import_weights(&self.weights)?;
        Ok(b)
    }
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
    let limit: Option<usize> = saved.meta.get("limit").and_then(|v| serde_json::from_str(v).ok()).flatten();
    let ds = load_data(data_path, if split_name == "all" { None } else { limit }, false)?;
    if ds.classes != saved.classes {
        bail!("the data's classes {:?} differ from the model's {:?}", ds.classes, saved.classes);
    }
    let indices: Vec<usize> = if split_name == "all" {
        (0..ds.len()).collect()
    } else {
        let split: Split = meta_json(&saved.meta, "split", model)?;
        if saved.meta.get("data_fingerprint") != Some(&data_fingerprint(&ds)) {
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

/// Reads, decodes (gray, 64x64) and normalises an image file for the model.
pub fn read_image_input(path: &Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    let (pixels, _) = data::decode_image(&bytes, &path.display().to_string())?;
    let mut x = vec![0.0; IMAGE_PIXELS];
    data::normalize_into(&pixels, &mut x);
    Ok(x)
}

/// `medcnn predict`: the class and the probabilities for each image.
pub fn predict_command(model: &Path, images: &[PathBuf], device: Device, json: bool) -> Result<()> {
    check_device(device)?;
    let saved = SavedModel::load(model)?;
    let mut backend = saved.backend(device)?;
    let mut out = Vec::new();
    for path in images {
        let x = read_image_input(path)?;
        let p = softmax(&backend.predict(&x, 1)?);
        let best = (0..p.len()).fold(0, |b, j| if p[j] > p[b] { j } else { b });
        out.push(Prediction {
            file: path.display().to_string(),
            class: saved.classes[best].clone(),
            probability: p[best],
            probabilities: saved.classes.iter().cloned().zip(p.iter().copied()).collect(),
        });
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

/// The first conv layer's filters as a grid picture.
fn save_first_layer_filters(backend: &mut dyn Backend, path: &Path) -> Result<()> {
    let weights = backend.export_weights()?;
    let w = &weights[0]; // conv_block.0.weight (32, 1, 3, 3)
    let (kh, kw) = (w.shape[2], w.shape[3]);
    let per = w.shape[1] * kh * kw;
    let tiles: Vec<Vec<f32>> = w.data.chunks_exact(per).map(|c| c[..kh * kw].to_vec()).collect();
    report::save_gray_grid(&tiles, kw, kh, 8, 16, path)
}
