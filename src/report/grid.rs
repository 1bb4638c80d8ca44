//! Tiled grayscale maps (conv filters, feature maps) saved as one PNG.

use std::path::Path;

use anyhow::{bail, ensure};

use super::{finite_range, save_rgb_png};

/// Width in pixels of the gaps between tiles and of the border around them.
pub const GRID_GAP: usize = 2;
/// Colour of the gaps and border (a muted blue, so it stands apart from gray tiles).
const GAP_RGB: [u8; 3] = [70, 100, 150];
/// Largest width or height accepted for the output image.
const MAX_SIDE: usize = 32_768;

/// Saves `images` (each `w * h` values, row-major) as a grid of grayscale tiles, `cols`
/// per row (fewer if there are fewer images), each tile scaled up `scale` times by
/// nearest neighbour. Every tile is min-max normalised on its own finite values (black =
/// min, white = max); a constant tile is mid-gray and NaN / infinite pixels are black.
///
/// Tiles are separated by [`GRID_GAP`]-pixel gaps, with a border of the same width, so
/// the image is `c * w * scale + (c + 1) * GRID_GAP` wide, where `c = min(cols, n)`, and
/// `r * h * scale + (r + 1) * GRID_GAP` high with `r = ceil(n / c)`.
///
/// Errors on an empty `images`, a zero size, `cols` or `scale`, or an image of the wrong
/// length.
pub fn save_gray_grid(
    images: &[Vec<f32>],
    w: usize,
    h: usize,
    cols: usize,
    scale: usize,
    path: &Path,
) -> anyhow::Result<()> {
    if images.is_empty() {
        bail!("save_gray_grid: no images to tile");
    }
    ensure!(
        w > 0 && h > 0 && cols > 0 && scale > 0,
        "save_gray_grid: w, h, cols and scale must be positive (got w={w}, h={h}, cols={cols}, scale={scale})"
    );
    for (i, img) in images.iter().enumerate() {
        ensure!(img.len() == w * h, "save_gray_grid: image {i} has {} values, expected {w}x{h} = {}", img.len(), w * h);
    }
    let n = images.len();
    let c = cols.min(n);
    let r = n.div_ceil(c);
    let (tw, th) = (w * scale, h * scale);
    let width = c * tw + (c + 1) * GRID_GAP;
    let height = r * th + (r + 1) * GRID_GAP;
    ensure!(width <= MAX_SIDE && height <= MAX_SIDE, "save_gray_grid: a {width}x{height} image is too large");

    let mut buf: Vec<u8> = GAP_RGB.iter().copied().cycle().take(width * height * 3).collect();
    for (k, img) in images.iter().enumerate() {
        let (ox, oy) = (GRID_GAP + (k % c) * (tw + GRID_GAP), GRID_GAP + (k / c) * (th + GRID_GAP));
        let range = finite_range(img.iter().map(|&v| v as f64));
        let gray = |v: f32| -> u8 {
            let v = v as f64;
            match range {
                _ if !v.is_finite() => 0,
                Some((lo, hi)) if hi > lo => ((v - lo) / (hi - lo) * 255.0).round() as u8,
                _ => 128,
            }
        };
        for y in 0..th {
            let row = &img[(y / scale) * w..(y / scale + 1) * w];
            let start = ((oy + y) * width + ox) * 3;
            for (x, px) in buf[start..start + tw * 3].chunks_exact_mut(3).enumerate() {
                let g = gray(row[x / scale]);
                px.copy_from_slice(&[g, g, g]);
            }
        }
    }
    save_rgb_png(path, width as u32, height as u32, buf)
}
