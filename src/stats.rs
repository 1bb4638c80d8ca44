//! Per-layer training statistics: the numbers a student looks at to ask "is the learning rate
//! right? is a layer dead? which layer still learns?", taken every `--stats-every` steps.
//!
//! For every parameter tensor w with gradient g, after the step:
//!
//!   weight_norm  = ||w||_2
//!   grad_norm    = ||g||_2                              (the gradient of the last batch)
//!   update_ratio = ||dw||_2 / ||w_before||_2            (the last Adam step, relative)
//!
//! Adam's last update is recomputed from its state rather than stored, so normal steps pay
//! nothing: after step t the moments m, v are those the update used, and
//!
//!   dw = lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps),   w_before = w + dw.
//!
//! For every layer's output y on the last training batch: mean, standard deviation (over
//! all elements) and the fraction of exact zeros, which only a ReLU (or a pooling of ReLU
//! outputs) produces; a layer whose outputs are almost all zero has stopped learning.
//!
//! What it is not: no histograms, no per-channel numbers. The backends fill [`LayerStats`]
//! (`Backend::layer_stats`); [`StatsLog`] keeps the rows and writes `layer_stats.csv`; the plot
//! is `report::plot_layer_stats`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::optim::Adam;
use crate::tensor::Float;

/// One parameter tensor's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamStats {
    /// As in the state_dict, e.g. `conv_block.0.weight`.
    pub name: String,
    pub weight_norm: f64,
    pub grad_norm: f64,
    pub update_ratio: f64,
}

/// One layer output's numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutputStats {
    /// The layer, e.g. `conv_block.3`.
    pub name: String,
    pub mean: f64,
    pub std: f64,
    pub zero_frac: f64,
}

/// What a backend reports at a statistics step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    pub params: Vec<ParamStats>,
    pub outputs: Vec<OutputStats>,
}

/// The settings of the Adam step just taken, to recompute its update.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken (the last update was step t; 0: none yet).
    pub t: u64,
}

impl AdamStep {
    pub fn of<T: Float>(a: &Adam<T>) -> AdamStep {
        AdamStep { lr: a.lr, beta1: a.beta1, beta2: a.beta2, eps: a.eps, t: a.t }
    }
}

/// sqrt(sum x^2), accumulated in f64.
pub fn l2_norm<T: Float>(x: &[T]) -> f64 {
    x.iter().map(|v| v.as_f64() * v.as_f64()).sum::<f64>().sqrt()
}

/// The numbers of one parameter: `w` after the step, `g` its gradient, `m` and `v` Adam's
/// moments after the step (empty before the first step: the ratio is then 0).
pub fn param_stats<T: Float>(name: &str, w: &[T], g: &[T], m: &[T], v: &[T], adam: AdamStep) -> ParamStats {
    let (weight_norm, grad_norm) = (l2_norm(w), l2_norm(g));
    let mut update_ratio = 0.0;
    if adam.t > 0 && m.len() == w.len() && v.len() == w.len() {
        let t = adam.t as i32;
        let step_size = adam.lr / (1.0 - adam.beta1.powi(t));
        let bc2_sqrt = (1.0 - adam.beta2.powi(t)).sqrt();
        let (mut du2, mut wb2) = (0.0f64, 0.0f64);
        for ((w, m), v) in w.iter().zip(m).zip(v) {
            let dw = step_size * m.as_f64() / (v.as_f64().sqrt() / bc2_sqrt + adam.eps);
            let before = w.as_f64() + dw;
            du2 += dw * dw;
            wb2 += before * before;
        }
        update_ratio = if wb2 > 0.0 { (du2 / wb2).sqrt() } else { 0.0 };
    }
    ParamStats { name: name.to_string(), weight_norm, grad_norm, update_ratio }
}

/// Mean, standard deviation (population) and fraction of exact zeros of `y`.
pub fn output_stats<T: Float>(name: &str, y: &[T]) -> OutputStats {
    let n = y.len().max(1) as f64;
    let (mut s, mut s2, mut zeros) = (0.0f64, 0.0f64, 0usize);
    for v in y {
        let v = v.as_f64();
        s += v;
        s2 += v * v;
        zeros += usize::from(v == 0.0);
    }
    let mean = s / n;
    // E[y^2] - E[y]^2, never below 0 from rounding.
    let std = (s2 / n - mean * mean).max(0.0).sqrt();
    OutputStats { name: name.to_string(), mean, std, zero_frac: zeros as f64 / n }
}

/// Rules of thumb, in plain words: one line for each thing that looks off.
///
/// - An update ratio far from about 1e-3 (below 1e-5 or above 1e-1): the layer barely moves
///   (learning rate too low, or the gradient vanished) or moves too fast (too high).
/// - Outputs more than 95% exact zeros: the ReLUs of that layer are (almost) all dead.
/// - A gradient under 1e-7 of the weight's norm: it has vanished.
pub fn hints(s: &LayerStats) -> Vec<String> {
    let mut out = Vec::new();
    for p in &s.params {
        if !p.name.ends_with("weight") {
            continue;
        }
        if !p.grad_norm.is_finite() || !p.weight_norm.is_finite() {
            out.push(format!("{}: the weight or its gradient is not finite; training has diverged", p.name));
            continue;
        }
        if p.weight_norm > 0.0 && p.grad_norm < 1e-7 * p.weight_norm {
            out.push(format!(
                "{}: the gradient has vanished (norm {:.1e} for a weight of norm {:.2}); this layer no longer learns",
                p.name, p.grad_norm, p.weight_norm
            ));
        } else if p.update_ratio > 0.0 && p.update_ratio < 1e-5 {
            out.push(format!(
                "{}: updates are tiny ({:.1e} of the weight per step, about 1e-3 is typical); the learning rate may be too low",
                p.name, p.update_ratio
            ));
        } else if p.update_ratio > 1e-1 {
            out.push(format!(
                "{}: updates are large ({:.1e} of the weight per step, about 1e-3 is typical); the learning rate may be too high",
                p.name, p.update_ratio
            ));
        }
    }
    for o in &s.outputs {
        if o.zero_frac > 0.95 {
            out.push(format!(
                "{}: {:.1}% of its outputs are zero; its ReLUs are (almost) all dead",
                o.name,
                100.0 * o.zero_frac
            ));
        }
    }
    out
}

/// One statistics step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsRow {
    pub step: u64,
    /// 1-based.
    pub epoch: usize,
    pub stats: LayerStats,
}

/// The rows of a run; `layer_stats.csv` is rewritten from them at every epoch's end.
#[derive(Clone, Debug, Default)]
pub struct StatsLog {
    /// Steps between two statistics steps (the first step is always one).
    pub every: u64,
    pub rows: Vec<StatsRow>,
}

/// The CSV header: one row per parameter (`kind` = param) and per layer output (`output`),
/// the other kind's columns left empty.
pub const CSV_HEADER: &str = "step,epoch,kind,name,weight_norm,grad_norm,update_ratio,mean,std,zero_frac";

impl StatsLog {
    pub fn new(every: u64) -> StatsLog {
        StatsLog { every: every.max(1), rows: Vec::new() }
    }

    /// Whether the step that made `steps_done` steps in all is a statistics step.
    pub fn due(&self, steps_done: u64) -> bool {
        steps_done == 1 || steps_done.is_multiple_of(self.every)
    }

    pub fn csv(&self) -> String {
        let mut s = String::from(CSV_HEADER);
        s.push('\n');
        for r in &self.rows {
            for p in &r.stats.params {
                let _ = writeln!(
                    s,
                    "{},{},param,{},{:e},{:e},{:e},,,",
                    r.step, r.epoch, p.name, p.weight_norm, p.grad_norm, p.update_ratio
                );
            }
            for o in &r.stats.outputs {
                let _ = writeln!(
                    s,
                    "{},{},output,{},,,,{:e},{:e},{:e}",
                    r.step, r.epoch, o.name, o.mean, o.std, o.zero_frac
                );
            }
        }
        s
    }

    /// Writes `layer_stats.csv` (atomically).
    pub fn write_csv(&self, path: &Path) -> Result<()> {
        crate::metrics::write_atomic(path, self.csv().as_bytes())
    }

    /// The rows of a `layer_stats.csv` this module wrote, up to and including `last_step`
    /// (a resumed run keeps the statistics of the steps before the checkpoint).
    pub fn read_csv(path: &Path, every: u64, last_step: u64) -> Result<StatsLog> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut log = StatsLog::new(every);
        let num = |s: &str| -> f64 { s.parse().unwrap_or(f64::NAN) };
        for (i, line) in text.lines().enumerate().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            anyhow::ensure!(f.len() == 10, "{}: line {} has {} fields, expected 10", path.display(), i + 1, f.len());
            let step: u64 = f[0].parse().with_context(|| format!("{}: line {}: step", path.display(), i + 1))?;
            if step > last_step {
                continue;
            }
            let epoch: usize = f[1].parse().with_context(|| format!("{}: line {}: epoch", path.display(), i + 1))?;
            if log.rows.last().is_none_or(|r| r.step != step) {
                log.rows.push(StatsRow { step, epoch, stats: LayerStats::default() });
            }
            let row = &mut log.rows.last_mut().expect("just pushed").stats;
            match f[2] {
                "param" => row.params.push(ParamStats {
                    name: f[3].into(),
                    weight_norm: num(f[4]),
                    grad_norm: num(f[5]),
                    update_ratio: num(f[6]),
                }),
                "output" => row.outputs.push(OutputStats {
                    name: f[3].into(),
                    mean: num(f[7]),
                    std: num(f[8]),
                    zero_frac: num(f[9]),
                }),
                other => anyhow::bail!("{}: line {}: unknown kind {other:?}", path.display(), i + 1),
            }
        }
        Ok(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_and_the_update_ratio_match_a_hand_computation() {
        // w = (3, -4): ||w|| = 5; g = (1, 2, 2) would be 3, here g = (0.6, 0.8): ||g|| = 1.
        let (w, g) = ([3.0f32, -4.0], [0.6f32, 0.8]);
        // After Adam's first step from zero moments: m = 0.1 g, v = 0.001 g^2, and
        // dw = lr / 0.1 * 0.1 g / (sqrt(0.001) |g| / sqrt(0.001) + eps) = lr * g / (|g| + eps),
        // so ||dw|| = lr * sqrt(2) (both gradients non-zero).
        let (m, v) = ([0.06f32, 0.08], [0.001f32 * 0.36, 0.001 * 0.64]);
        let adam = AdamStep { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, t: 1 };
        let s = param_stats("fc.weight", &w, &g, &m, &v, adam);
        assert!((s.weight_norm - 5.0).abs() < 1e-6, "{s:?}");
        assert!((s.grad_norm - 1.0).abs() < 1e-6, "{s:?}");
        // w_before = w + dw = (3 + 0.01, -4 + 0.01)
        let expected = 0.01 * 2f64.sqrt() / (3.01f64 * 3.01 + 3.99 * 3.99).sqrt();
        assert!((s.update_ratio - expected).abs() < 1e-6 * expected, "{} vs {expected}", s.update_ratio);
        // No step yet: no update.
        assert_eq!(param_stats("b", &w, &g, &[], &[], AdamStep { t: 0, ..adam }).update_ratio, 0.0);
    }

    #[test]
    fn output_statistics_and_the_dead_layer_hint() {
        let o = output_stats("conv_block.0", &[0.0f32, 2.0, 0.0, 2.0]);
        assert_eq!((o.mean, o.std, o.zero_frac), (1.0, 1.0, 0.5));
        let healthy = LayerStats {
            params: vec![ParamStats { name: "c.weight".into(), weight_norm: 3.0, grad_norm: 0.1, update_ratio: 1e-3 }],
            outputs: vec![o],
        };
        assert!(hints(&healthy).is_empty(), "{:?}", hints(&healthy));
        let dead = LayerStats { params: vec![], outputs: vec![output_stats("conv_block.6", &vec![0.0f32; 1000])] };
        let h = hints(&dead);
        assert_eq!(h.len(), 1);
        assert!(h[0].starts_with("conv_block.6") && h[0].contains("dead"), "{h:?}");
        let vanished = LayerStats {
            params: vec![ParamStats { name: "c.weight".into(), weight_norm: 3.0, grad_norm: 1e-9, update_ratio: 1e-6 }],
            outputs: vec![],
        };
        assert!(hints(&vanished)[0].contains("vanished"));
        let fast = LayerStats {
            params: vec![ParamStats { name: "c.weight".into(), weight_norm: 3.0, grad_norm: 1.0, update_ratio: 0.5 }],
            outputs: vec![],
        };
        assert!(hints(&fast)[0].contains("too high"));
    }

    #[test]
    fn the_csv_reads_back() {
        let mut log = StatsLog::new(10);
        assert!(log.due(1) && log.due(20) && !log.due(21));
        for step in [1, 10, 20] {
            log.rows.push(StatsRow {
                step,
                epoch: 1,
                stats: LayerStats {
                    params: vec![param_stats(
                        "a.weight",
                        &[1.0f32, 2.0],
                        &[0.5, 0.5],
                        &[],
                        &[],
                        AdamStep::of(&Adam::<f32>::new(1e-3)),
                    )],
                    outputs: vec![output_stats("a", &[0.0f32, 1.0])],
                },
            });
        }
        let dir = std::env::temp_dir().join(format!("medcnn-stats-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("layer_stats.csv");
        log.write_csv(&path).unwrap();
        let back = StatsLog::read_csv(&path, 10, 10).unwrap();
        assert_eq!(back.rows, log.rows[..2]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
