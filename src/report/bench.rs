//! Per-layer benchmark bars: forward and backward time of each layer, side by side.

use std::path::Path;

use anyhow::bail;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{finite_range, perr, register_font, render_png, tick_label, FONT};

const FORWARD_COLOR: RGBColor = RGBColor(31, 119, 180);
const BACKWARD_COLOR: RGBColor = RGBColor(255, 127, 14);

/// One group of bars in [`plot_bench`]: a layer (or any labelled piece of work) and its
/// forward and backward times in milliseconds.
#[derive(Clone, Debug)]
pub struct BenchBar {
    pub label: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
}

fn fmt_ms(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0} ms")
    } else if a >= 10.0 {
        format!("{v:.1} ms")
    } else if a >= 1.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.3} ms")
    }
}

/// Horizontal grouped bars, one group per row in the given order (top to bottom): the
/// forward time above the backward time, each with its value written at the bar's end.
/// A NaN, infinite or negative time draws no bar. The image is 900 wide and
/// `max(600, 130 + 48 * rows.len())` high. Errors on an empty `rows`.
pub fn plot_bench(title: &str, rows: &[BenchBar], path: &Path) -> anyhow::Result<()> {
    if rows.is_empty() {
        bail!("plot_bench: no rows to plot");
    }
    register_font();
    let n = rows.len();
    let height = (130 + 48 * n).max(600) as u32;
    let valid = |v: f64| v.is_finite() && v >= 0.0;
    let x_max = finite_range(rows.iter().flat_map(|r| [r.forward_ms, r.backward_ms]).filter(|&v| valid(v)))
        .map(|(_, hi)| hi)
        .filter(|&hi| hi > 0.0)
        .unwrap_or(1.0)
        * 1.2;

    let label_w =
        rows.iter().map(|r| (FONT, 15).into_font().box_size(&r.label).map(|(w, _)| w).unwrap_or(0)).max().unwrap_or(0);
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    // Row i is drawn at y = n - 1 - i so the first row is at the top.
    let y_fmt = move |y: &f64| {
        let k = y.round();
        if (y - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < n {
            labels[n - 1 - k as usize].clone()
        } else {
            String::new()
        }
    };
    let x_fmt = |x: &f64| tick_label(*x);

    render_png(path, (900, height), |root| {
        // Title and a one-line legend above the chart, so the legend never hides a bar.
        let (head, body) = root.split_vertically(78);
        let dark = RGBColor(30, 30, 30);
        head.draw(&Text::new(
            title.to_string(),
            (450, 30),
            TextStyle::from((FONT, 24).into_font()).color(&dark).pos(Pos::new(HPos::Center, VPos::Center)),
        ))
        .map_err(perr)?;
        let legend_style = TextStyle::from((FONT, 16).into_font()).color(&dark).pos(Pos::new(HPos::Left, VPos::Center));
        let mut x = 450 - 95;
        for (name, color) in [("forward", FORWARD_COLOR), ("backward", BACKWARD_COLOR)] {
            head.draw(&Rectangle::new([(x, 58), (x + 16, 70)], color.filled())).map_err(perr)?;
            head.draw(&Text::new(name.to_string(), (x + 22, 64), legend_style.clone())).map_err(perr)?;
            x += 110;
        }

        let mut chart = ChartBuilder::on(&body)
            .margin(20)
            .margin_top(5)
            .x_label_area_size(50)
            .y_label_area_size(label_w + 20)
            .build_cartesian_2d(0.0..x_max, -0.5..(n as f64 - 0.5))
            .map_err(perr)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(n)
            .x_labels(8)
            .y_label_formatter(&y_fmt)
            .x_label_formatter(&x_fmt)
            .x_desc("Time per call (ms)")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .bold_line_style(RGBColor(215, 215, 215))
            .light_line_style(RGBColor(240, 240, 240))
            .max_light_lines(4)
            .axis_style(RGBColor(90, 90, 90))
            .draw()
            .map_err(perr)?;

        let value_style = TextStyle::from((FONT, 13).into_font())
            .color(&RGBColor(50, 50, 50))
            .pos(Pos::new(HPos::Left, VPos::Center));
        for (color, lo, hi, get) in [
            (FORWARD_COLOR, 0.04, 0.40, (|r: &BenchBar| r.forward_ms) as fn(&BenchBar) -> f64),
            (BACKWARD_COLOR, -0.40, -0.04, |r: &BenchBar| r.backward_ms),
        ] {
            let bars: Vec<(f64, f64)> =
                rows.iter().enumerate().map(|(i, r)| ((n - 1 - i) as f64, get(r))).filter(|&(_, v)| valid(v)).collect();
            chart
                .draw_series(bars.iter().map(|&(y, v)| Rectangle::new([(0.0, y + lo), (v, y + hi)], color.filled())))
                .map_err(perr)?;
            let style = value_style.clone();
            chart
                .draw_series(bars.iter().map(|&(y, v)| {
                    EmptyElement::at((v, y + (lo + hi) / 2.0)) + Text::new(fmt_ms(v), (5, 0), style.clone())
                }))
                .map_err(perr)?;
        }
        Ok(())
    })
}
