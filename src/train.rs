//! The training loop: data -> batches -> backend steps -> validation -> metrics, plots, model and
//! checkpoint every epoch -> test-set evaluation and `summary.json` at the end.
//!
//! What it is not: evaluation and prediction (`evaluate`), the model file (`model_file`), the
//! network (`spec`, built from `--arch`).
//!
//! Everything random is derived from the seed: weights (`spec::ModelSpec::build`), the split,
//! each epoch's order and flips (`data::epoch_order(seed, epoch)`), and dropout
//! (hash of seed, step, index). So a checkpoint only needs to store *where* the run is (epoch,
//! batch, step) to continue exactly as the uninterrupted run would have.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use crate::backend::check_device;
use crate::backend::{make_backend, AdamConfig, Backend, Device, NamedTensor, OptimizerState, TrainStats};
use crate::checkpoint::{self, meta_json, CHECKPOINT_FORMAT, MODEL_FORMAT};
pub use crate::data::load_data;
use crate::data::{self, fingerprint, Dataset, InputShape, Split};
use crate::evaluate::evaluate;
pub use crate::metrics::check_output_dir;
use crate::metrics::{write_metrics_csv, EpochMetrics};
use crate::model_file::{check_shapes, model_path, SavedModel};
use crate::optim::LrSchedule;
use crate::report;
use crate::spec::{ModelSpec, REFERENCE_DROPOUT};
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
    /// The reference network's dropout (a written spec has its own `Dropout(p)` layers).
    pub dropout: f64,
    /// The network: `reference`, or the layers as `--arch` takes them (a spec file is read
    /// once, at the start, and stored as its layers).
    #[serde(default = "reference_arch")]
    pub arch: String,
    /// The input: `image_size` x `image_size`, 1 (gray) or 3 (RGB) channels.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub channels: usize,
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

fn reference_arch() -> String {
    "reference".into()
}
fn default_image_size() -> usize {
    InputShape::default().size
}
fn default_channels() -> usize {
    InputShape::default().channels
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
            dropout: REFERENCE_DROPOUT,
            arch: reference_arch(),
            image_size: default_image_size(),
            channels: default_channels(),
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
        // A bad spec fails here, before any data is read.
        let spec = self.spec()?;
        spec.check()?;
        check_device(self.device)?;
        if self.device == Device::Cuda {
            crate::backend::cuda_config(&spec, 2)?;
        }
        Ok(())
    }

    /// The network this run trains (reads an `@FILE` spec).
    pub fn spec(&self) -> Result<ModelSpec> {
        let input = InputShape::new(self.channels, self.image_size)?;
        ModelSpec::parse(&self.arch, input, self.dropout)
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

pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint.safetensors")
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
    m.insert("data_fingerprint".into(), fingerprint(ds));
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
    let spec = cfg.spec()?;
    // A spec file is read once: the run (and its checkpoint) keeps the layers themselves.
    cfg.arch = spec.arch_text();
    println!("model: {} on {} images", cfg.arch, spec.input);

    let ds = load_data(cfg.data.as_deref(), cfg.limit, cfg.skip_bad_images, spec.input)?;
    if ds.classes.len() < 2 {
        bail!("the data has {} class(es); training needs at least two", ds.classes.len());
    }
    spec.resolve(ds.classes.len())?;
    let fingerprint = fingerprint(&ds);
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

    let adam = AdamConfig { lr: cfg.lr, weight_decay: cfg.weight_decay };
    let mut backend = make_backend(cfg.device, &spec, ds.classes.len(), cfg.seed, adam)?;
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
    let (mut x, mut y) = (Vec::with_capacity(bs * spec.input.len()), Vec::with_capacity(bs));
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
            SavedModel::save(&model_path(&cfg.out), &ds.classes, &spec, &weights, meta)?;
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
    let (best_weights, _) = checkpoint::load(&model_path(&cfg.out), MODEL_FORMAT, &spec.param_names())?;
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

fn optimizer_names(weights: &[String]) -> Vec<String> {
    weights.iter().flat_map(|n| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq")]).collect()
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
    // The names come from the run's spec (in its config) and do not depend on the class count;
    // `load` checks the names and the checksum, the shapes are checked after.
    let mut spec = None;
    let (mut tensors, meta) = checkpoint::load_with(path, CHECKPOINT_FORMAT, |meta| {
        let config: TrainConfig = meta_json(meta, "config", path)?;
        let s = config.spec().with_context(|| format!("{}: the stored model spec", path.display()))?;
        let names = s.param_names();
        spec = Some(s);
        Ok(names.iter().cloned().chain(optimizer_names(&names).iter().map(|n| format!("optimizer.{n}"))).collect())
    })?;
    let spec = spec.expect("load_with asked for the names");
    let wn = spec.param_names();
    let on = optimizer_names(&wn);
    let moments = tensors.split_off(wn.len());
    let classes = classes_of(path, &tensors)?;
    let shapes = spec.weight_shapes(classes).with_context(|| path.display().to_string())?;
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

/// The first conv layer's filters as a grid picture (nothing for a network without a conv).
fn save_first_layer_filters(backend: &mut dyn Backend, path: &Path) -> Result<()> {
    let weights = backend.export_weights()?;
    match weights.iter().find(|w| w.shape.len() == 4) {
        Some(w) => report::save_filter_grid(w, path),
        None => Ok(()),
    }
}
