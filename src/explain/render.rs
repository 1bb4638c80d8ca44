//! Pictures for `explain` and `inspect`: colour maps, an RGB canvas that takes pixel tiles and
//! text, and a captioned tile grid. Everything ends as PNG bytes (for the web API) or a file.
//!
//! What it is not: no plotting (axes, curves); that is `crate::report`. Text goes through
//! plotters (ab_glyph, the shipped DejaVu Sans), drawn straight into the canvas's buffer.

use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::{perr, register_font, FONT};

pub type Rgb = [u8; 3];

pub const WHITE_RGB: Rgb = [255, 255, 255];
pub const DARK_RGB: Rgb = [30, 30, 30];
pub const GRAY_RGB: Rgb = [100, 100, 100];
pub const RED_RGB: Rgb = [190, 30, 30];
pub const GREEN_RGB: Rgb = [20, 120, 40];

/// Largest canvas side accepted (a bad `--scale` must not allocate gigabytes).
const MAX_SIDE: usize = 16_384;

/// Linear interpolation between colour stops spread evenly over [0, 1]; NaN maps to stop 0.
fn ramp(stops: &[Rgb], t: f32) -> Rgb {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let x = t * (stops.len() - 1) as f32;
    let i = (x.floor() as usize).min(stops.len() - 2);
    let f = x - i as f32;
    let (a, b) = (stops[i], stops[i + 1]);
    [0, 1, 2].map(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * f).round() as u8)
}

/// The "jet" colour map (blue -> cyan -> yellow -> red) at t in [0, 1]; the usual Grad-CAM look.
pub fn jet(t: f32) -> Rgb {
    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.0 };
    let c = |x: f32| ((1.5 - (4.0 * t - x).abs()).clamp(0.0, 1.0) * 255.0).round() as u8;
    [c(3.0), c(2.0), c(1.0)]
}

/// matplotlib's "inferno" (black -> purple -> orange -> pale yellow), sampled at 9 points.
pub fn inferno(t: f32) -> Rgb {
    const STOPS: [Rgb; 9] = [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ];
    ramp(&STOPS, t)
}

/// A diverging map for signed values at t in [0, 1] (0.5 is zero): blue -> white -> red.
pub fn diverging(t: f32) -> Rgb {
    const STOPS: [Rgb; 5] = [[5, 48, 97], [103, 169, 207], [247, 247, 247], [239, 138, 98], [103, 0, 31]];
    ramp(&STOPS, t)
}

/// Gray pixels as RGB.
pub fn gray_rgb(pixels: &[u8]) -> Vec<Rgb> {
    pixels.iter().map(|&g| [g, g, g]).collect()
}

/// Values in [0, 1] through a colour map.
pub fn colorize(values: &[f32], map: fn(f32) -> Rgb) -> Vec<Rgb> {
    values.iter().map(|&v| map(v)).collect()
}

/// A heat map laid over a gray image: `alpha` of the colour map's colour, the rest gray.
pub fn overlay(pixels: &[u8], heat: &[f32], map: fn(f32) -> Rgb, alpha: f32) -> Vec<Rgb> {
    pixels
        .iter()
        .zip(heat)
        .map(|(&g, &h)| {
            let c = map(h);
            [0, 1, 2].map(|k| (g as f32 * (1.0 - alpha) + c[k] as f32 * alpha).round().clamp(0.0, 255.0) as u8)
        })
        .collect()
}

/// Each value divided by the largest (ReLU outputs, maps >= 0): 0 stays black, a map of
/// zeros stays zeros. NaN becomes 0.
pub fn normalise_max(values: &[f32]) -> Vec<f32> {
    let max = values.iter().copied().filter(|v| v.is_finite()).fold(0.0f32, f32::max);
    values.iter().map(|&v| if v.is_finite() && max > 0.0 { (v / max).clamp(0.0, 1.0) } else { 0.0 }).collect()
}

/// Width and height in pixels of `text` at `size` in the shipped font.
pub fn text_size(text: &str, size: f64) -> (u32, u32) {
    register_font();
    (FONT, size).into_font().box_size(text).unwrap_or((0, 0))
}

/// `text` shortened with "..." until it is at most `max_w` pixels wide at `size`.
pub fn fit_text(text: &str, size: f64, max_w: u32) -> String {
    if text_size(text, size).0 <= max_w {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().collect::<String>() + "...";
        if text_size(&s, size).0 <= max_w {
            return s;
        }
    }
    String::new()
}

/// Where a text's anchor point sits: its left edge or its centre, always its top.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Center,
}

/// A packed RGB8 picture that takes pixel tiles (scaled up by nearest neighbour) and text.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pub buf: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Result<Canvas> {
        ensure!(width > 0 && height > 0, "cannot draw a {width}x{height} picture");
        ensure!(width <= MAX_SIDE && height <= MAX_SIDE, "a {width}x{height} picture is too large");
        Ok(Canvas { width, height, buf: background.iter().copied().cycle().take(width * height * 3).collect() })
    }

    /// Fills a rectangle (clipped to the canvas).
    pub fn fill_rect(&mut self, x0: usize, y0: usize, w: usize, h: usize, color: Rgb) {
        for y in y0..(y0 + h).min(self.height) {
            for x in x0..(x0 + w).min(self.width) {
                let i = (y * self.width + x) * 3;
                self.buf[i..i + 3].copy_from_slice(&color);
            }
        }
    }

    /// Draws a `w` x `h` tile of pixels with its top-left corner at (x0, y0), each pixel
    /// `scale` x `scale` (clipped to the canvas).
    pub fn blit(&mut self, x0: usize, y0: usize, pixels: &[Rgb], w: usize, h: usize, scale: usize) {
        debug_assert_eq!(pixels.len(), w * h);
        for y in 0..h * scale {
            let yy = y0 + y;
            if yy >= self.height {
                break;
            }
            let row = &pixels[(y / scale) * w..(y / scale + 1) * w];
            for x in 0..w * scale {
                let xx = x0 + x;
                if xx >= self.width {
                    break;
                }
                let i = (yy * self.width + xx) * 3;
                self.buf[i..i + 3].copy_from_slice(&row[x / scale]);
            }
        }
    }

    /// Writes one line of `text` at `size` px with its top at `y`; `x` is its left edge or
    /// centre as `align` says.
    pub fn text(&mut self, text: &str, x: i32, y: i32, size: f64, color: Rgb, align: Align) -> Result<()> {
        register_font();
        let h = match align {
            Align::Left => HPos::Left,
            Align::Center => HPos::Center,
        };
        let rgb = RGBColor(color[0], color[1], color[2]);
        let style = TextStyle::from((FONT, size).into_font()).color(&rgb).pos(Pos::new(h, VPos::Top));
        let root =
            BitMapBackend::with_buffer(&mut self.buf, (self.width as u32, self.height as u32)).into_drawing_area();
        root.draw(&Text::new(text.to_string(), (x, y), style)).map_err(perr)?;
        root.present().map_err(perr)?;
        Ok(())
    }

    /// The picture as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        let img = image::RgbImage::from_raw(self.width as u32, self.height as u32, self.buf.clone())
            .ok_or_else(|| anyhow!("RGB buffer does not match {}x{}", self.width, self.height))?;
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).context("encoding PNG")?;
        Ok(png.into_inner())
    }

    /// Saves the picture as a PNG (atomically, creating the folder).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::metrics::write_atomic(path, &self.png()?).with_context(|| format!("writing {}", path.display()))
    }
}

/// One tile of a grid: `w` x `h` pixels and up to two caption lines under it.
pub struct Tile {
    pub pixels: Vec<Rgb>,
    pub w: usize,
    pub h: usize,
    pub caption: Vec<(String, Rgb)>,
}

/// Tiles `cols` to a row, each drawn `scale` times larger, with a title (and an optional
/// second line) on top and each tile's captions under it (cut to the tile's width).
pub fn tile_grid(title: &str, subtitle: &str, tiles: &[Tile], cols: usize, scale: usize) -> Result<Canvas> {
    ensure!(!tiles.is_empty(), "no tiles to draw");
    ensure!(cols > 0 && scale > 0, "cols and scale must be positive");
    let (tw, th) = (tiles[0].w * scale, tiles[0].h * scale);
    ensure!(tiles.iter().all(|t| t.w * scale == tw && t.h * scale == th), "tiles differ in size");
    let caption_lines = tiles.iter().map(|t| t.caption.len()).max().unwrap_or(0);
    let caption_size = 12.0;
    let line_h = 15;
    let gap = 8;
    let c = cols.min(tiles.len());
    let r = tiles.len().div_ceil(c);
    let widest = tiles.iter().flat_map(|t| &t.caption).map(|(l, _)| text_size(l, caption_size).0 as usize + 4).max();
    let cell_w = tw.max(widest.unwrap_or(0).min(2 * tw));
    let cell_h = th + caption_lines * line_h + if caption_lines > 0 { 4 } else { 0 };
    let title_h = 34 + if subtitle.is_empty() { 0 } else { 20 };
    let text_w = (text_size(title, 18.0).0 as usize).max(text_size(subtitle, 13.0).0 as usize).min(1600);
    let width = (c * cell_w + (c + 1) * gap).max(text_w + 4 * gap);
    let height = title_h + r * cell_h + (r + 1) * gap;
    let mut canvas = Canvas::new(width, height, WHITE_RGB)?;
    canvas.text(title, width as i32 / 2, 8, 18.0, DARK_RGB, Align::Center)?;
    if !subtitle.is_empty() {
        let sub = fit_text(subtitle, 13.0, width as u32 - 8);
        canvas.text(&sub, width as i32 / 2, 32, 13.0, GRAY_RGB, Align::Center)?;
    }
    let x_start = (width - (c * cell_w + (c - 1) * gap)) / 2;
    for (k, tile) in tiles.iter().enumerate() {
        let x0 = x_start + (k % c) * (cell_w + gap);
        let y0 = title_h + gap + (k / c) * (cell_h + gap);
        canvas.blit(x0 + (cell_w - tw) / 2, y0, &tile.pixels, tile.w, tile.h, scale);
        for (i, (line, color)) in tile.caption.iter().enumerate() {
            let text = fit_text(line, caption_size, cell_w as u32 + gap as u32 - 2);
            canvas.text(
                &text,
                (x0 + cell_w / 2) as i32,
                (y0 + th + 3 + i * line_h) as i32,
                caption_size,
                *color,
                Align::Center,
            )?;
        }
    }
    Ok(canvas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_maps_span_their_range() {
        assert_eq!(jet(0.0), [0, 0, 128]);
        assert_eq!(jet(1.0), [128, 0, 0]);
        assert_eq!(inferno(0.0), [0, 0, 4]);
        assert_eq!(inferno(1.0), [252, 255, 164]);
        assert_eq!(inferno(f32::NAN), [0, 0, 4]);
        assert_eq!(diverging(0.5), [247, 247, 247]);
    }

    #[test]
    fn normalise_max_keeps_zero_and_handles_nan() {
        assert_eq!(normalise_max(&[0.0, 2.0, 1.0, f32::NAN]), vec![0.0, 1.0, 0.5, 0.0]);
        assert_eq!(normalise_max(&[0.0, 0.0]), vec![0.0, 0.0]);
    }

    #[test]
    fn canvas_makes_a_png_with_text() {
        let mut c = Canvas::new(80, 30, WHITE_RGB).unwrap();
        c.text("Hand", 40, 5, 16.0, DARK_RGB, Align::Center).unwrap();
        let png = c.png().unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (80, 30));
        assert!(img.pixels().any(|p| p.0 != [255, 255, 255]), "the text drew nothing");
    }
}
