//! PNG plots of a training run: loss and accuracy curves, the confusion matrix, per-layer
//! benchmark bars, and tiled grayscale maps (conv filters, feature maps).
//!
//! Drawing goes through plotters' `BitMapBackend` into an in-memory RGB buffer, which
//! `image` then encodes as PNG; files are written atomically (`<path>.tmp`, then a rename).
//! Text is rendered with the DejaVu Sans font shipped in this directory
//! (`DejaVuSans.ttf`, licence in `DejaVuSans-LICENSE.txt`), embedded in the binary, so
//! no system fonts are needed. Every plot function registers it itself
//! ([`register_font`] is idempotent).
//!
//! Robustness: an empty input is an error, never a panic; NaN / infinite values are
//! skipped; a single epoch (one point per curve) plots fine.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, bail, Context};
use plotters::coord::Shift;
use plotters::prelude::*;

mod bench;
mod confusion;
mod curves;
mod grid;
mod layer_stats;

pub use bench::{plot_bench, BenchBar};
pub use confusion::plot_confusion;
pub use curves::{plot_accuracy, plot_loss};
pub use grid::{save_filter_grid, save_gray_grid, save_grid, GRID_GAP};
pub use layer_stats::plot_layer_stats;

/// DejaVu Sans (Bitstream Vera licence, see `DejaVuSans-LICENSE.txt`).
static FONT_BYTES: &[u8] = include_bytes!("DejaVuSans.ttf");

/// The font family every plot in this module uses.
pub(crate) const FONT: &str = "sans-serif";

/// Width and height of the line plots.
pub const PLOT_SIZE: (u32, u32) = (900, 600);

/// Registers the shipped DejaVu Sans with plotters under the family names "sans-serif",
/// "serif" and "monospace" (all the same face), so text renders. Idempotent and
/// thread-safe; the plot functions call it themselves.
pub fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for family in ["sans-serif", "serif", "monospace"] {
            // The bytes are a valid TrueType font compiled into the binary; failure here
            // would be a build defect, and the only effect would be missing text.
            if plotters::style::register_font(family, FontStyle::Normal, FONT_BYTES).is_err() {
                eprintln!("medcnn::report: could not load the embedded DejaVu Sans font");
            }
        }
    });
}

/// Converts a plotters error (which borrows nothing but is not always `Send + Sync`)
/// into an `anyhow::Error`.
pub(crate) fn perr<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// Renders a `w` x `h` white canvas through `draw` and saves it as a PNG at `path`.
pub(crate) fn render_png<F>(path: &Path, (w, h): (u32, u32), draw: F) -> anyhow::Result<()>
where
    F: FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> anyhow::Result<()>,
{
    register_font();
    if w == 0 || h == 0 {
        bail!("cannot draw a {w}x{h} image");
    }
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(perr)?;
        draw(&root)?;
        root.present().map_err(perr)?;
    }
    save_rgb_png(path, w, h, buf)
}

/// Saves a packed RGB8 buffer as a PNG, atomically, creating the parent directory.
pub(crate) fn save_rgb_png(path: &Path, w: u32, h: u32, buf: Vec<u8>) -> anyhow::Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("RGB buffer does not match {w}x{h}"))?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).with_context(|| format!("encoding PNG for {}", path.display()))?;
    crate::metrics::write_atomic(path, &png.into_inner())
}

/// `(lo, hi)` of the finite values, or `None` when there are none.
pub(crate) fn finite_range(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values.into_iter().filter(|v| v.is_finite()).fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Formats a tick value compactly: no trailing zeros, at most 4 significant decimals.
pub(crate) fn tick_label(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}
