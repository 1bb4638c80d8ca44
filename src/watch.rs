//! What a training run shows while it goes: the per-layer statistics (`OUT/layer_stats.csv`
//! and `.png`, always on) and, with `--dashboard`, the live page ([`crate::dashboard`]).
//!
//! The training loop calls four hooks and nothing else: [`Watch::after_step`] after every
//! step (a counter check; the statistics every `--stats-every` steps), [`Watch::train_point`]
//! where the loop reads the loss sums anyway, [`Watch::end_epoch`] after validation, and the
//! drop at the end. None of them waits for a web client: the dashboard gets a snapshot.
//!
//! What it is not: it never changes what is trained; a run with and without it computes the
//! same weights (the statistics only read the model).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::backend::{Backend, TrainStats};
use crate::dashboard::{Dashboard, RunInfo};
use crate::data::Dataset;
use crate::metrics::{ConfusionMatrix, EpochMetrics};
use crate::stats::{StatsLog, StatsRow};
use crate::train::{Progress, TrainConfig};

/// Layer outputs are measured on at most this many images of the batch (means, deviations
/// and zero fractions over 16 x 32 x 31 x 31 values and more are stable; a forward over them
/// costs a quarter of one over a batch of 64).
pub const STATS_IMAGES: usize = 16;

/// The hooks' state for one run.
pub struct Watch {
    log: StatsLog,
    out: PathBuf,
    dashboard: Option<Dashboard>,
    /// Seconds spent in statistics steps, for the end-of-run line.
    stats_seconds: f64,
}

/// `--stats-every` when not given: about four times per epoch, at least every 20 and at most
/// every 200 steps.
pub fn default_stats_every(steps_per_epoch: usize) -> u64 {
    ((steps_per_epoch / 4) as u64).clamp(20, 200)
}

impl Watch {
    /// Starts the statistics log (continuing `layer_stats.csv` on a resumed run) and, when
    /// `cfg.dashboard` names an address, the dashboard's server. `val_image` is the validation
    /// image whose feature maps the dashboard shows.
    pub fn new(
        cfg: &TrainConfig,
        ds: &Dataset,
        val_image: Option<usize>,
        steps_per_epoch: usize,
        progress: &Progress,
        device: &str,
    ) -> Result<Watch> {
        let every = cfg.stats_every.filter(|&n| n > 0).unwrap_or_else(|| default_stats_every(steps_per_epoch));
        let csv = cfg.out.join("layer_stats.csv");
        let log = if progress.step > 0 && csv.exists() {
            StatsLog::read_csv(&csv, every, progress.step).unwrap_or_else(|e| {
                eprintln!("warning: {e:#}; the statistics start afresh");
                StatsLog::new(every)
            })
        } else {
            StatsLog::new(every)
        };
        let dashboard = match &cfg.dashboard {
            None => None,
            Some(addr) => {
                let info = RunInfo {
                    epochs: cfg.epochs,
                    steps_per_epoch,
                    batch_size: cfg.batch_size,
                    classes: ds.classes.clone(),
                    device: device.to_string(),
                    spec: cfg.spec()?,
                };
                let image = val_image.map(|i| ds.image(i).to_vec());
                let mut d = Dashboard::start(addr, info, image, progress).context("--dashboard")?;
                d.publish_stats(&log.rows);
                Some(d)
            }
        };
        Ok(Watch { log, out: cfg.out.clone(), dashboard, stats_seconds: 0.0 })
    }

    /// After a step; `p.step` counts it already, `x` is its batch of `n` images.
    pub fn after_step(&mut self, backend: &mut dyn Backend, p: &Progress, x: &[f32], n: usize) -> Result<()> {
        if self.log.due(p.step) {
            let t = Instant::now();
            let k = n.min(STATS_IMAGES);
            let stats =
                backend.layer_stats(&x[..x.len() / n.max(1) * k], k).context("collecting the layer statistics")?;
            self.log.rows.push(StatsRow { step: p.step, epoch: p.epoch + 1, stats });
            self.stats_seconds += t.elapsed().as_secs_f64();
            if let Some(d) = &mut self.dashboard {
                d.publish_stats(&self.log.rows);
            }
        }
        if let Some(d) = &mut self.dashboard {
            d.step(p, n);
        }
        Ok(())
    }

    /// Where the loop takes the backend's loss sums: `s` covers the steps since the last call.
    pub fn train_point(&mut self, p: &Progress, s: &TrainStats) {
        if let Some(d) = &mut self.dashboard {
            d.train_point(p, s);
        }
    }

    /// After validation: the statistics files, and the epoch's numbers, filters, feature maps
    /// and confusion matrix on the dashboard.
    pub fn end_epoch(&mut self, backend: &mut dyn Backend, row: &EpochMetrics, cm: &ConfusionMatrix) -> Result<()> {
        if !self.log.rows.is_empty() {
            self.log.write_csv(&self.out.join("layer_stats.csv"))?;
            crate::report::plot_layer_stats(&self.log.rows, &self.out.join("layer_stats.png"))?;
        }
        if let Some(d) = &mut self.dashboard {
            let weights = backend.export_weights()?;
            d.end_epoch(row, cm, &weights);
        }
        Ok(())
    }

    /// Seconds the statistics steps took so far.
    pub fn stats_seconds(&self) -> f64 {
        self.stats_seconds
    }
}

impl Drop for Watch {
    /// The run is over (finished, interrupted or failed): the dashboard says so and keeps
    /// serving until `dashboard::linger` returns.
    fn drop(&mut self) {
        if self.stats_seconds > 0.0 {
            println!(
                "layer statistics: {} steps (every {}), {:.2} s in all",
                self.log.rows.len(),
                self.log.every,
                self.stats_seconds
            );
        }
        if let Some(d) = self.dashboard.take() {
            d.finish();
        }
    }
}
