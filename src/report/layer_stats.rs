//! `layer_stats.png`: the gradient norm and the Adam update/weight ratio of every layer's
//! weight against the training step, one line per layer, both on a log scale, side by side.
//! The band of about 1e-3, the update ratio a rule of thumb calls healthy, is shaded.

use std::path::Path;

use anyhow::bail;
use plotters::prelude::*;

use super::{perr, render_png, FONT};
use crate::stats::StatsRow;

/// One colour per layer (matplotlib's tab10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws `rows` (as `StatsLog::rows`) to `path`. Only `.weight` tensors are drawn; values that
/// are zero or not finite are left out (a log scale has no place for them).
pub fn plot_layer_stats(rows: &[StatsRow], path: &Path) -> anyhow::Result<()> {
    let Some(first) = rows.first() else { bail!("plot_layer_stats: no statistics to plot") };
    let layers: Vec<String> =
        first.stats.params.iter().map(|p| p.name.clone()).filter(|n| n.ends_with("weight")).collect();
    if layers.is_empty() {
        bail!("plot_layer_stats: no weight tensors in the statistics");
    }
    let series = |pick: fn(&crate::stats::ParamStats) -> f64| -> Vec<Vec<(f64, f64)>> {
        layers
            .iter()
            .map(|name| {
                rows.iter()
                    .filter_map(|r| {
                        let p = r.stats.params.iter().find(|p| &p.name == name)?;
                        let v = pick(p);
                        (v.is_finite() && v > 0.0).then_some((r.step as f64, v))
                    })
                    .collect()
            })
            .collect()
    };
    let grads = series(|p| p.grad_norm);
    let ratios = series(|p| p.update_ratio);
    let (w, h) = (1400u32, 620u32);
    render_png(path, (w, h), |root| {
        let (left, right) = root.split_horizontally(w / 2);
        panel(&left, "Gradient norm per layer", "||grad||", &layers, &grads, None)?;
        panel(&right, "Update / weight ratio per Adam step", "||dw|| / ||w||", &layers, &ratios, Some((1e-4, 1e-2)))?;
        Ok(())
    })
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    names: &[String],
    series: &[Vec<(f64, f64)>],
    band: Option<(f64, f64)>,
) -> anyhow::Result<()> {
    let all = || series.iter().flatten();
    let x_hi = all().map(|p| p.0).fold(1.0f64, f64::max);
    let (mut lo, mut hi) = all().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if !lo.is_finite() {
        (lo, hi) = (1e-4, 1.0);
    }
    if let Some((a, b)) = band {
        (lo, hi) = (lo.min(a), hi.max(b));
    }
    let (lo, hi) = (lo / 2.0, hi * 2.0);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0.0..x_hi * 1.02, (lo..hi).log_scale())
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc("Step")
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .bold_line_style(RGBColor(215, 215, 215))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(perr)?;
    if let Some((a, b)) = band {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, a), (x_hi * 1.02, b)],
                RGBColor(220, 240, 220).filled(),
            )))
            .map_err(perr)?;
    }
    for (i, (name, pts)) in names.iter().zip(series).enumerate() {
        let color = COLORS[i % COLORS.len()];
        let label = name.trim_end_matches(".weight").to_string();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(perr)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(3)));
        if pts.len() == 1 {
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(perr)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .draw()
        .map_err(perr)?;
    Ok(())
}
