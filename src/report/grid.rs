//! Tiled grayscale or colour maps (conv filters, feature maps) saved as one PNG.

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
    save_grid(images, 1, w, h, cols, scale, path)
}

/// [`save_gray_grid`] for `channels` = 1 (gray) or 3 (colour) planes per tile: a colour tile is
/// `3 * w * h` values, planes R, G, B, min-max normalised over all three together (so a filter's
/// colours keep their balance).
pub fn save_grid(
    images: &[Vec<f32>],
    channels: usize,
    w: usize,
    h: usize,
    cols: usize,
    scale: usize,
    path: &Path,
) -> anyhow::Result<()> {
    if images.is_empty() {
        bail!("save_gray_grid: no images to tile");
    }
    ensure!(channels == 1 || channels == 3, "save_grid: tiles have 1 or 3 channels, not {channels}");
    ensure!(
        w > 0 && h > 0 && cols > 0 && scale > 0,
        "save_gray_grid: w, h, cols and scale must be positive (got w={w}, h={h}, cols={cols}, scale={scale})"
    );
    for (i, img) in images.iter().enumerate() {
        ensure!(
            img.len() == channels * w * h,
            "save_gray_grid: image {i} has {} values, expected {channels}x{w}x{h} = {}",
            img.len(),
            channels * w * h
        );
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
        let plane = w * h;
        for y in 0..th {
            let start = ((oy + y) * width + ox) * 3;
            for (x, px) in buf[start..start + tw * 3].chunks_exact_mut(3).enumerate() {
                let at = (y / scale) * w + x / scale;
                if channels == 1 {
                    let g = gray(img[at]);
                    px.copy_from_slice(&[g, g, g]);
                } else {
                    px.copy_from_slice(&[gray(img[at]), gray(img[plane + at]), gray(img[2 * plane + at])]);
                }
            }
        }
    }
    save_rgb_png(path, width as u32, height as u32, buf)
}

/// A conv layer's filters `(OC, C, KH, KW)` as a grid, 8 per row: in colour when the layer reads
/// three channels (an RGB input's first layer), else each filter's first input channel in gray.
pub fn save_filter_grid(weight: &crate::backend::NamedTensor, path: &Path) -> anyhow::Result<()> {
    let [_, c, kh, kw] = weight.shape[..] else {
        bail!("{}: a conv weight has 4 dimensions, this one {:?}", weight.name, weight.shape);
    };
    let channels = if c == 3 { 3 } else { 1 };
    let per = c * kh * kw;
    let tiles: Vec<Vec<f32>> = weight.data.chunks_exact(per).map(|f| f[..channels * kh * kw].to_vec()).collect();
    let scale = (48 / kh.max(kw)).clamp(2, 16);
    save_grid(&tiles, channels, kw, kh, 8, scale, path)
}
