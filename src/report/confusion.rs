//! The confusion matrix as a heatmap: true class down the rows, predicted class across
//! the columns, the count (and the share of the true class) written in each cell.

use std::path::Path;

use anyhow::bail;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{perr, register_font, render_png, FONT};
use crate::metrics::ConfusionMatrix;

/// A "Blues" colour ramp (as in matplotlib), sampled at 0, 1/4, 1/2, 3/4 and 1.
const RAMP: [(f64, f64, f64); 5] =
    [(247.0, 251.0, 255.0), (198.0, 219.0, 239.0), (107.0, 174.0, 214.0), (33.0, 113.0, 181.0), (8.0, 48.0, 107.0)];

fn ramp(t: f64) -> RGBColor {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (RAMP.len() - 1) as f64;
    let i = (x.floor() as usize).min(RAMP.len() - 2);
    let f = x - i as f64;
    let (a, b) = (RAMP[i], RAMP[i + 1]);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Width in pixels of `text` at `size` in the shipped font (0 if it cannot be measured).
fn text_width(text: &str, size: f64) -> i32 {
    (FONT, size).into_font().box_size(text).map(|(w, _)| w as i32).unwrap_or(0)
}

/// Groups digits in threes: 12345 -> "12,345".
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Draws `cm` as a heatmap PNG at `path`. Each cell shows its count and, when there is
/// room, its share of the row (the true class); the colour is that share, so a perfect
/// classifier is a dark diagonal whatever the class sizes. The title gives the overall
/// accuracy. The image is about 800 x 750 for 6 classes and grows with more classes.
/// Errors if the matrix has no classes.
pub fn plot_confusion(cm: &ConfusionMatrix, path: &Path) -> anyhow::Result<()> {
    let n = cm.classes.len();
    if n == 0 {
        bail!("plot_confusion: the confusion matrix has no classes");
    }
    register_font();

    let label_size = 16.0;
    let cell = (560 / n as i32).clamp(14, 110);
    let grid = cell * n as i32;
    let label_w = cm.classes.iter().map(|c| text_width(c, label_size)).max().unwrap_or(0);
    // Column labels are written vertically when they do not fit under their cell.
    let rotate_x = label_w > cell - 8;
    let count_size = (cell as f64 * 0.24).max((cell as f64 * 0.36).min(11.0)).min(24.0);
    let show_counts = cell >= 18;
    let show_share = cell >= 64;

    let (outer, desc_h) = (20, 24);
    let left = outer + desc_h + 12 + label_w + 10;
    let top = 86;
    let x_label_h = if rotate_x { label_w } else { 20 };
    let bottom = 10 + x_label_h + 12 + desc_h + outer;
    let bar_x = left + grid + 30;
    let bar_w = 18;
    let right = 30 + bar_w + 8 + text_width("100%", 14.0) + outer;
    let width = (left + grid + right).max(600) as u32;
    let height = (top + grid + bottom) as u32;

    let total = cm.total();
    let title = format!(
        "Confusion matrix: accuracy {:.2}% ({} / {})",
        100.0 * cm.accuracy(),
        grouped(cm.correct()),
        grouped(total)
    );
    let row_totals: Vec<u64> = (0..n).map(|t| (0..n).map(|p| cm.count(t, p)).sum()).collect();

    render_png(path, (width, height), |root| {
        let center = Pos::new(HPos::Center, VPos::Center);
        let text = |size: f64, color: &RGBColor| TextStyle {
            font: (FONT, size).into_font(),
            color: color.to_backend_color(),
            pos: Pos::new(HPos::Left, VPos::Top),
        };
        let dark = RGBColor(30, 30, 30);
        let gray = RGBColor(100, 100, 100);
        let grid_mid = left + grid / 2;

        root.draw(&Text::new(title.clone(), (width as i32 / 2, 28), text(24.0, &dark).pos(center))).map_err(perr)?;
        root.draw(&Text::new(
            "rows: true class, columns: predicted class, colour: share of the true class".to_string(),
            (width as i32 / 2, 58),
            text(14.0, &gray).pos(center),
        ))
        .map_err(perr)?;

        for (t, &row_total) in row_totals.iter().enumerate() {
            for p in 0..n {
                let count = cm.count(t, p);
                let share = if row_total == 0 { 0.0 } else { count as f64 / row_total as f64 };
                let (x0, y0) = (left + p as i32 * cell, top + t as i32 * cell);
                root.draw(&Rectangle::new([(x0, y0), (x0 + cell, y0 + cell)], ramp(share).filled())).map_err(perr)?;
                root.draw(&Rectangle::new([(x0, y0), (x0 + cell, y0 + cell)], RGBColor(255, 255, 255).stroke_width(1)))
                    .map_err(perr)?;
                if show_counts {
                    let fg = if share > 0.5 { RGBColor(255, 255, 255) } else { dark };
                    let cx = x0 + cell / 2;
                    let cy = y0 + cell / 2;
                    let count_y = if show_share { cy - (count_size * 0.45) as i32 } else { cy };
                    root.draw(&Text::new(grouped(count), (cx, count_y), text(count_size, &fg).pos(center)))
                        .map_err(perr)?;
                    if show_share {
                        root.draw(&Text::new(
                            format!("{:.1}%", 100.0 * share),
                            (cx, cy + (count_size * 0.65) as i32),
                            text(count_size * 0.62, &fg).pos(center),
                        ))
                        .map_err(perr)?;
                    }
                }
            }
        }
        root.draw(&Rectangle::new([(left, top), (left + grid, top + grid)], RGBColor(120, 120, 120).stroke_width(1)))
            .map_err(perr)?;

        // Class names: rows on the left (right-aligned), columns underneath.
        for (i, name) in cm.classes.iter().enumerate() {
            let mid = i as i32 * cell + cell / 2;
            root.draw(&Text::new(
                name.clone(),
                (left - 10, top + mid),
                text(label_size, &dark).pos(Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(perr)?;
            let style = if rotate_x {
                text(label_size, &dark).transform(FontTransform::Rotate270).pos(Pos::new(HPos::Right, VPos::Center))
            } else {
                text(label_size, &dark).pos(Pos::new(HPos::Center, VPos::Top))
            };
            root.draw(&Text::new(name.clone(), (left + mid, top + grid + 10), style)).map_err(perr)?;
        }

        // Axis descriptions.
        root.draw(&Text::new(
            "Predicted class".to_string(),
            (grid_mid, top + grid + 10 + x_label_h + 12 + desc_h / 2),
            text(18.0, &dark).pos(center),
        ))
        .map_err(perr)?;
        root.draw(&Text::new(
            "True class".to_string(),
            (outer + desc_h / 2, top + grid / 2),
            text(18.0, &dark).transform(FontTransform::Rotate270).pos(center),
        ))
        .map_err(perr)?;

        // Colour bar for the row share.
        for y in 0..grid {
            let t = 1.0 - y as f64 / (grid - 1).max(1) as f64;
            root.draw(&Rectangle::new([(bar_x, top + y), (bar_x + bar_w, top + y + 1)], ramp(t).filled()))
                .map_err(perr)?;
        }
        root.draw(&Rectangle::new(
            [(bar_x, top), (bar_x + bar_w, top + grid)],
            RGBColor(120, 120, 120).stroke_width(1),
        ))
        .map_err(perr)?;
        for (frac, label) in [(1.0, "100%"), (0.5, "50%"), (0.0, "0%")] {
            let y = top + ((1.0 - frac) * (grid - 1) as f64).round() as i32;
            root.draw(&Text::new(
                label.to_string(),
                (bar_x + bar_w + 6, y),
                text(14.0, &gray).pos(Pos::new(HPos::Left, VPos::Center)),
            ))
            .map_err(perr)?;
        }
        Ok(())
    })
}
