//! Training metrics: the per-epoch record written to `metrics.csv` (and read back for
//! `--resume`), and the confusion matrix with per-class precision, recall and F1.
//!
//! Conventions:
//! * accuracies (`train_acc`, `val_acc`, [`ConfusionMatrix::accuracy`]) are fractions in
//!   `[0, 1]`, not percentages;
//! * every ratio with a zero denominator is 0, never NaN;
//! * files are written atomically: to `<path>.tmp`, then renamed over `<path>`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// One row of `metrics.csv`: what one epoch of training measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Mean cross-entropy over the training batches of this epoch.
    pub train_loss: f64,
    /// Training accuracy as a fraction in [0, 1].
    pub train_acc: f64,
    pub val_loss: f64,
    /// Validation accuracy as a fraction in [0, 1].
    pub val_acc: f64,
    /// Learning rate used during the epoch.
    pub lr: f64,
    /// Wall-clock seconds the epoch took.
    pub seconds: f64,
    /// Training throughput.
    pub images_per_sec: f64,
}

/// The CSV columns, in the order [`write_metrics_csv`] writes them.
pub const METRICS_CSV_COLUMNS: [&str; 8] =
    ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_sec"];

/// `<path>.tmp`, the name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Writes `bytes` to `path` atomically (via `<path>.tmp` and a rename), creating the
/// parent directory if needed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
        }
    }
    let tmp = tmp_path(path);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        // On disk before the rename, so a crash never leaves a renamed but empty file.
        f.sync_all().with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Writes a header line and one line per epoch. Floats are written with Rust's shortest
/// round-trip formatting, so [`read_metrics_csv`] gives back the exact values (NaN and
/// infinities included, as `NaN`, `inf`, `-inf`).
pub fn write_metrics_csv(path: &Path, rows: &[EpochMetrics]) -> anyhow::Result<()> {
    let mut out = METRICS_CSV_COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{}",
            r.epoch, r.train_loss, r.train_acc, r.val_loss, r.val_acc, r.lr, r.seconds, r.images_per_sec
        )
        .expect("writing to a String cannot fail");
    }
    write_atomic(path, out.as_bytes()).with_context(|| format!("writing metrics CSV {}", path.display()))
}

/// Reads a file written by [`write_metrics_csv`]. Columns are found by their header
/// names (so their order does not matter and extra columns are ignored); blank lines are
/// skipped.
pub fn read_metrics_csv(path: &Path) -> anyhow::Result<Vec<EpochMetrics>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading metrics CSV {}", path.display()))?;
    parse_metrics_csv(&text).with_context(|| format!("parsing metrics CSV {}", path.display()))
}

fn parse_metrics_csv(text: &str) -> anyhow::Result<Vec<EpochMetrics>> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, l)| !l.is_empty());
    let Some((_, header)) = lines.next() else {
        bail!("the file is empty (no header line)");
    };
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let mut idx = [0usize; 8];
    for (slot, col) in idx.iter_mut().zip(METRICS_CSV_COLUMNS) {
        *slot = names
            .iter()
            .position(|n| *n == col)
            .with_context(|| format!("the header has no `{col}` column: {header:?}"))?;
    }
    let mut rows = Vec::new();
    for (lineno, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != names.len() {
            bail!("line {lineno}: {} fields, the header has {}", fields.len(), names.len());
        }
        let f = |k: usize| -> anyhow::Result<f64> {
            let s = fields[idx[k]];
            s.parse::<f64>()
                .with_context(|| format!("line {lineno}: column `{}`: {s:?} is not a number", METRICS_CSV_COLUMNS[k]))
        };
        let epoch_s = fields[idx[0]];
        let epoch =
            epoch_s.parse::<usize>().with_context(|| format!("line {lineno}: epoch {epoch_s:?} is not an integer"))?;
        rows.push(EpochMetrics {
            epoch,
            train_loss: f(1)?,
            train_acc: f(2)?,
            val_loss: f(3)?,
            val_acc: f(4)?,
            lr: f(5)?,
            seconds: f(6)?,
            images_per_sec: f(7)?,
        });
    }
    Ok(rows)
}

/// Precision, recall and F1 of one class, from a [`ConfusionMatrix`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// The class name (or "macro avg" / "weighted avg" for the averages).
    pub class: String,
    /// TP / (TP + FP): of the samples predicted as this class, the fraction that are.
    pub precision: f64,
    /// TP / (TP + FN): of the samples of this class, the fraction predicted as it.
    pub recall: f64,
    /// Harmonic mean of precision and recall.
    pub f1: f64,
    /// Number of samples whose true class is this one.
    pub support: u64,
}

/// `num / den`, or 0 when `den` is 0.
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn f1_of(precision: f64, recall: f64) -> f64 {
    ratio(2.0 * precision * recall, precision + recall)
}

/// Counts of (true class, predicted class) pairs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    pub classes: Vec<String>,
    /// `counts[true][pred]`, `classes.len()` x `classes.len()`.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// An all-zero matrix over `classes`.
    pub fn new(classes: Vec<String>) -> Self {
        let n = classes.len();
        ConfusionMatrix { classes, counts: vec![vec![0; n]; n] }
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Records one sample. Panics if either index is not a class index.
    pub fn add(&mut self, truth: usize, pred: usize) {
        let n = self.classes.len();
        assert!(truth < n && pred < n, "ConfusionMatrix::add({truth}, {pred}): only {n} classes");
        self.counts[truth][pred] += 1;
    }

    /// Records a batch of samples: `truth[i]` against `pred[i]`.
    pub fn add_batch(&mut self, truth: &[usize], pred: &[usize]) {
        assert_eq!(truth.len(), pred.len(), "ConfusionMatrix::add_batch: length mismatch");
        for (&t, &p) in truth.iter().zip(pred) {
            self.add(t, p);
        }
    }

    /// `counts[truth][pred]`, or 0 outside the matrix (robust to a hand-edited JSON).
    pub fn count(&self, truth: usize, pred: usize) -> u64 {
        self.counts.get(truth).and_then(|row| row.get(pred)).copied().unwrap_or(0)
    }

    /// Total number of samples recorded.
    pub fn total(&self) -> u64 {
        let n = self.classes.len();
        (0..n).flat_map(|t| (0..n).map(move |p| (t, p))).map(|(t, p)| self.count(t, p)).sum()
    }

    /// Number of correctly classified samples (the diagonal).
    pub fn correct(&self) -> u64 {
        (0..self.classes.len()).map(|i| self.count(i, i)).sum()
    }

    /// Fraction of samples on the diagonal, in [0, 1]; 0 for an empty matrix.
    pub fn accuracy(&self) -> f64 {
        ratio(self.correct() as f64, self.total() as f64)
    }

    /// Precision, recall, F1 and support of each class, in class order.
    pub fn per_class(&self) -> Vec<ClassStats> {
        let n = self.classes.len();
        (0..n)
            .map(|c| {
                let tp = self.count(c, c) as f64;
                let support: u64 = (0..n).map(|p| self.count(c, p)).sum();
                let predicted: u64 = (0..n).map(|t| self.count(t, c)).sum();
                let precision = ratio(tp, predicted as f64);
                let recall = ratio(tp, support as f64);
                ClassStats { class: self.classes[c].clone(), precision, recall, f1: f1_of(precision, recall), support }
            })
            .collect()
    }

    /// Unweighted mean of the per-class precision, recall and F1 (F1 is the mean of the
    /// per-class F1s, as scikit-learn does); `support` is the total.
    pub fn macro_avg(&self) -> ClassStats {
        let stats = self.per_class();
        let k = stats.len() as f64;
        ClassStats {
            class: "macro avg".into(),
            precision: ratio(stats.iter().map(|s| s.precision).sum(), k),
            recall: ratio(stats.iter().map(|s| s.recall).sum(), k),
            f1: ratio(stats.iter().map(|s| s.f1).sum(), k),
            support: self.total(),
        }
    }

    /// Mean of the per-class precision, recall and F1 weighted by support.
    pub fn weighted_avg(&self) -> ClassStats {
        let stats = self.per_class();
        let total = self.total() as f64;
        let w = |f: fn(&ClassStats) -> f64| ratio(stats.iter().map(|s| f(s) * s.support as f64).sum(), total);
        ClassStats {
            class: "weighted avg".into(),
            precision: w(|s| s.precision),
            recall: w(|s| s.recall),
            f1: w(|s| s.f1),
            support: self.total(),
        }
    }

    /// A plain-text report for the log: the matrix (rows = true class, columns =
    /// predicted class), then per-class precision / recall / F1 / support, then the macro
    /// and weighted averages.
    pub fn table(&self) -> String {
        let n = self.classes.len();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Confusion matrix (rows = true class, columns = predicted): {} samples, accuracy {:.2}%",
            self.total(),
            100.0 * self.accuracy()
        );
        if n == 0 {
            out.push_str("(no classes)\n");
            return out;
        }
        let corner = "true \\ pred";
        let name_w = self
            .classes
            .iter()
            .map(|c| c.chars().count())
            .chain([corner.len(), "weighted avg".len()])
            .max()
            .unwrap_or(0);
        let max_count =
            (0..n).flat_map(|t| (0..n).map(move |p| (t, p))).map(|(t, p)| self.count(t, p)).max().unwrap_or(0);
        let col_w: Vec<usize> =
            self.classes.iter().map(|c| c.chars().count().max(max_count.to_string().len())).collect();

        let _ = write!(out, "{corner:<name_w$}");
        for (c, w) in self.classes.iter().zip(&col_w) {
            let _ = write!(out, "  {c:>w$}");
        }
        out.push('\n');
        for t in 0..n {
            let _ = write!(out, "{:<name_w$}", self.classes[t]);
            for (p, w) in col_w.iter().enumerate() {
                let _ = write!(out, "  {:>w$}", self.count(t, p));
            }
            out.push('\n');
        }
        out.push('\n');

        let _ =
            writeln!(out, "{:<name_w$}  {:>9}  {:>9}  {:>9}  {:>9}", "class", "precision", "recall", "f1", "support");
        let row = |out: &mut String, s: &ClassStats| {
            let _ = writeln!(
                out,
                "{:<name_w$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>9}",
                s.class, s.precision, s.recall, s.f1, s.support
            );
        };
        for s in self.per_class() {
            row(&mut out, &s);
        }
        row(&mut out, &self.macro_avg());
        row(&mut out, &self.weighted_avg());
        out
    }
}

/// Fails early, before any data is read, if `out` cannot be created or written.
pub fn check_output_dir(out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("output folder {} cannot be created", out.display()))?;
    let probe = out.join(".medcnn-write-test");
    std::fs::write(&probe, b"ok").with_context(|| format!("output folder {} is not writable", out.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
