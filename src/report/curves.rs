//! Loss and accuracy curves: train and validation values against the epoch number.

use std::path::Path;

use anyhow::bail;
use plotters::prelude::*;

use super::{finite_range, perr, render_png, tick_label, FONT, PLOT_SIZE};
use crate::metrics::EpochMetrics;

/// matplotlib's tab10 blue and orange.
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VAL_COLOR: RGBColor = RGBColor(255, 127, 14);

struct Curve {
    name: &'static str,
    color: RGBColor,
    /// `(epoch, value)` for every row, sorted by epoch; values may be NaN.
    points: Vec<(f64, f64)>,
}

struct CurvePlot<'a> {
    title: String,
    y_desc: &'a str,
    curves: Vec<Curve>,
    legend_pos: SeriesLabelPosition,
    /// The y axis never goes below this (0 for loss and accuracy).
    y_floor: f64,
    /// The y axis never goes above this (just over 100 for accuracy in %).
    y_ceil: f64,
    /// The smallest half-height of the y range when all values are equal.
    min_pad: f64,
}

/// Plots train and validation loss against the epoch: a line with a marker per epoch,
/// NaN epochs left out (the line breaks there), the best validation loss in the title.
/// Errors on an empty `rows`.
pub fn plot_loss(rows: &[EpochMetrics], path: &Path) -> anyhow::Result<()> {
    if rows.is_empty() {
        bail!("plot_loss: no epochs to plot (empty metrics)");
    }
    let rows = sorted(rows);
    let title = match best(&rows, |r| r.val_loss, false) {
        Some((e, v)) => format!("Loss (best validation {} at epoch {e})", fmt_loss(v)),
        None => "Loss".to_string(),
    };
    draw_curves(
        CurvePlot {
            title,
            y_desc: "Cross-entropy loss",
            curves: vec![
                curve("train", TRAIN_COLOR, &rows, |r| r.train_loss),
                curve("validation", VAL_COLOR, &rows, |r| r.val_loss),
            ],
            legend_pos: SeriesLabelPosition::UpperRight,
            y_floor: 0.0,
            y_ceil: f64::INFINITY,
            min_pad: 0.05,
        },
        path,
    )
}

/// Plots train and validation accuracy, in percent, against the epoch. The metrics hold
/// fractions in [0, 1]; if any finite accuracy exceeds 1 the values are taken to be
/// percentages already and are not scaled. NaN epochs are left out; the best validation
/// accuracy is in the title. Errors on an empty `rows`.
pub fn plot_accuracy(rows: &[EpochMetrics], path: &Path) -> anyhow::Result<()> {
    if rows.is_empty() {
        bail!("plot_accuracy: no epochs to plot (empty metrics)");
    }
    let rows = sorted(rows);
    let already_percent = rows.iter().flat_map(|r| [r.train_acc, r.val_acc]).any(|v| v.is_finite() && v > 1.0 + 1e-9);
    let scale = if already_percent { 1.0 } else { 100.0 };
    let title = match best(&rows, |r| r.val_acc, true) {
        Some((e, v)) => format!("Accuracy (best validation {:.2}% at epoch {e})", v * scale),
        None => "Accuracy".to_string(),
    };
    draw_curves(
        CurvePlot {
            title,
            y_desc: "Accuracy (%)",
            curves: vec![
                curve("train", TRAIN_COLOR, &rows, |r| r.train_acc * scale),
                curve("validation", VAL_COLOR, &rows, |r| r.val_acc * scale),
            ],
            legend_pos: SeriesLabelPosition::LowerRight,
            y_floor: 0.0,
            y_ceil: 101.0,
            min_pad: 0.5,
        },
        path,
    )
}

fn fmt_loss(v: f64) -> String {
    format!("{v:.4}")
}

fn sorted(rows: &[EpochMetrics]) -> Vec<EpochMetrics> {
    let mut rows = rows.to_vec();
    rows.sort_by_key(|r| r.epoch);
    rows
}

/// The epoch and value of the best finite `key` (largest if `max`, else smallest).
fn best(rows: &[EpochMetrics], key: fn(&EpochMetrics) -> f64, max: bool) -> Option<(usize, f64)> {
    rows.iter().map(|r| (r.epoch, key(r))).filter(|(_, v)| v.is_finite()).reduce(|a, b| {
        let better = if max { b.1 > a.1 } else { b.1 < a.1 };
        if better {
            b
        } else {
            a
        }
    })
}

fn curve(name: &'static str, color: RGBColor, rows: &[EpochMetrics], key: impl Fn(&EpochMetrics) -> f64) -> Curve {
    Curve { name, color, points: rows.iter().map(|r| (r.epoch as f64, key(r))).collect() }
}

/// Runs of consecutive finite points: the line is broken at NaN / infinite values.
fn finite_segments(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut segs: Vec<Vec<(f64, f64)>> = vec![];
    let mut cur = vec![];
    for &(x, y) in points {
        if y.is_finite() {
            cur.push((x, y));
        } else if !cur.is_empty() {
            segs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        segs.push(cur);
    }
    segs
}

fn draw_curves(plot: CurvePlot<'_>, path: &Path) -> anyhow::Result<()> {
    let (x_lo, x_hi) =
        finite_range(plot.curves.iter().flat_map(|c| c.points.iter().map(|p| p.0))).unwrap_or((0.0, 1.0));
    let x_span = x_hi - x_lo;
    let x_pad = (x_span * 0.03).max(0.5);
    // At most one label per integer epoch, so the ticks land on whole epochs.
    let x_labels = ((x_span as usize) + 1).clamp(1, 10);

    let (y_lo, y_hi) = match finite_range(plot.curves.iter().flat_map(|c| c.points.iter().map(|p| p.1))) {
        Some((lo, hi)) => {
            let pad = ((hi - lo) * 0.08).max(plot.min_pad);
            let lo = if lo >= plot.y_floor { (lo - pad).max(plot.y_floor) } else { lo - pad };
            let hi = if hi <= plot.y_ceil { (hi + pad).min(plot.y_ceil) } else { hi + pad };
            (lo, hi)
        }
        None => (0.0, 1.0),
    };

    let x_fmt = |x: &f64| {
        if (x - x.round()).abs() < 1e-6 {
            format!("{}", x.round() as i64)
        } else {
            String::new()
        }
    };
    let y_fmt = |y: &f64| tick_label(*y);

    render_png(path, PLOT_SIZE, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(&plot.title, (FONT, 26))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d((x_lo - x_pad)..(x_hi + x_pad), y_lo..y_hi)
            .map_err(perr)?;
        chart
            .configure_mesh()
            .x_desc("Epoch")
            .y_desc(plot.y_desc)
            .x_labels(x_labels)
            .y_labels(8)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .bold_line_style(RGBColor(215, 215, 215))
            .light_line_style(RGBColor(240, 240, 240))
            .max_light_lines(4)
            .axis_style(RGBColor(90, 90, 90))
            .draw()
            .map_err(perr)?;

        let mut any_legend = false;
        for c in &plot.curves {
            let color = c.color;
            for seg in finite_segments(&c.points) {
                if seg.len() > 1 {
                    chart.draw_series(LineSeries::new(seg, color.stroke_width(2))).map_err(perr)?;
                }
            }
            let markers: Vec<(f64, f64)> = c.points.iter().copied().filter(|p| p.1.is_finite()).collect();
            if markers.is_empty() {
                continue;
            }
            let size = if markers.len() > 60 { 2 } else { 4 };
            chart
                .draw_series(markers.into_iter().map(|p| Circle::new(p, size, color.filled())))
                .map_err(perr)?
                .label(c.name)
                .legend(move |(x, y)| PathElement::new(vec![(x - 2, y), (x + 22, y)], color.stroke_width(3)));
            any_legend = true;
        }
        if any_legend {
            chart
                .configure_series_labels()
                .position(plot.legend_pos.clone())
                .margin(12)
                .label_font((FONT, 17))
                .background_style(WHITE.mix(0.9))
                .border_style(RGBColor(160, 160, 160))
                .draw()
                .map_err(perr)?;
        }
        Ok(())
    })
}
