//! The dashboard's pictures, as PNG bytes: the first conv layer's filters, one validation
//! image, and that image's feature maps after the first conv layer and its ReLU.
//!
//! The feature maps are computed here on the host from the exported weights (32 filters of
//! 3x3 over one 64x64 image: about a million multiply-adds, once per epoch), so they look the
//! same whichever backend trains:
//!
//!   map[c][i][j] = max(0, b[c] + sum_{u,v} w[c][0][u][v] * x[i+u][j+v])      (62 x 62)
//!
//! What it is not: not the fused block's pooled output, and no other layer's maps.

use anyhow::{bail, Context, Result};
use image::{GrayImage, Luma};

use crate::backend::NamedTensor;
use crate::data::normalize_into;

/// PNG bytes of each picture (the image and maps only when the run has a validation image).
#[derive(Debug)]
pub struct Pictures {
    pub filters: Option<Vec<u8>>,
    pub maps: Option<Vec<u8>>,
    pub image: Option<Vec<u8>>,
}

/// Tiles `tiles` (each `w` x `h`, values already in 0..=255) into `cols` columns, each pixel
/// drawn `scale` x `scale`, with a 2-pixel white gap.
fn tile(tiles: &[Vec<u8>], w: usize, h: usize, cols: usize, scale: usize) -> GrayImage {
    let gap = 2;
    let rows = tiles.len().div_ceil(cols);
    let (tw, th) = (w * scale + gap, h * scale + gap);
    let mut img = GrayImage::from_pixel((cols * tw + gap) as u32, (rows * th + gap) as u32, Luma([255]));
    for (k, t) in tiles.iter().enumerate() {
        let (x0, y0) = (gap + (k % cols) * tw, gap + (k / cols) * th);
        for y in 0..h * scale {
            for x in 0..w * scale {
                img.put_pixel((x0 + x) as u32, (y0 + y) as u32, Luma([t[(y / scale) * w + x / scale]]));
            }
        }
    }
    img
}

fn png(img: &GrayImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).context("encoding a PNG")?;
    Ok(out.into_inner())
}

/// The pictures from the weights of an epoch's end and the image's 64x64 gray pixels.
pub fn render(weights: &[NamedTensor], image: Option<&[u8]>) -> Result<Pictures> {
    let Some(w) = weights.first() else { bail!("no weights") };
    let Some(b) = weights.get(1) else { bail!("no bias after {}", w.name) };
    let [oc, 1, kh, kw] = w.shape[..] else { bail!("{} has shape {:?}, expected (C, 1, k, k)", w.name, w.shape) };
    if b.data.len() != oc {
        bail!("{} has {} values for {oc} filters", b.name, b.data.len());
    }
    // Filters: one gray scale for all, 128 = 0, symmetric around it.
    let max = w.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let filters: Vec<Vec<u8>> = w
        .data
        .chunks_exact(kh * kw)
        .map(|f| f.iter().map(|v| (128.0 + 127.0 * v / max).round().clamp(0.0, 255.0) as u8).collect())
        .collect();
    let cols = 8.min(oc.max(1));
    let filters = Some(png(&tile(&filters, kw, kh, cols, 12))?);
    let Some(pixels) = image else { return Ok(Pictures { filters, maps: None, image: None }) };
    let side = (pixels.len() as f64).sqrt() as usize;
    if side * side != pixels.len() || side < kh {
        bail!("the validation image has {} pixels, not a square of at least {kh}x{kh}", pixels.len());
    }
    let mut x = vec![0f32; pixels.len()];
    normalize_into(pixels, &mut x);
    let (oh, ow) = (side - kh + 1, side - kw + 1);
    let maps: Vec<Vec<u8>> = (0..oc)
        .map(|c| {
            let f = &w.data[c * kh * kw..(c + 1) * kh * kw];
            let mut m = vec![0f32; oh * ow];
            for i in 0..oh {
                for j in 0..ow {
                    let mut s = b.data[c];
                    for u in 0..kh {
                        for v in 0..kw {
                            s += f[u * kw + v] * x[(i + u) * side + j + v];
                        }
                    }
                    m[i * ow + j] = s.max(0.0);
                }
            }
            // Each map on its own scale: black 0, white its largest value.
            let top = m.iter().fold(0f32, |a, &v| a.max(v)).max(1e-12);
            m.iter().map(|v| (255.0 * v / top).round() as u8).collect()
        })
        .collect();
    let maps = Some(png(&tile(&maps, ow, oh, cols, 2))?);
    let image = Some(png(&tile(&[pixels.to_vec()], side, side, 1, 3))?);
    Ok(Pictures { filters, maps, image })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_that_picks_one_pixel_maps_the_image() {
        // One filter, the centre tap 1, bias 0: the map is the ReLU of the (normalised) image's
        // inner 62x62 pixels, so a bright square shows as the map's brightest part.
        let mut w = vec![0f32; 9];
        w[4] = 1.0;
        let weights = vec![
            NamedTensor { name: "c.weight".into(), shape: vec![1, 1, 3, 3], data: w },
            NamedTensor { name: "c.bias".into(), shape: vec![1], data: vec![0.0] },
        ];
        let pixels: Vec<u8> = (0..64 * 64).map(|k| if (k / 64) < 32 && (k % 64) < 32 { 250 } else { 10 }).collect();
        let p = render(&weights, Some(&pixels)).unwrap();
        let maps = image::load_from_memory(p.maps.as_ref().unwrap()).unwrap().to_luma8();
        // 1 column: 2 + 62*2 + 2 pixels wide.
        assert_eq!(maps.dimensions(), (128, 128));
        assert_eq!(maps.get_pixel(2 + 10, 2 + 10).0[0], 255, "inside the bright square");
        assert!(maps.get_pixel(2 + 100, 2 + 100).0[0] < 255);
        assert!(p.filters.is_some() && p.image.is_some());
        assert!(render(&weights[..1], None).is_err());
    }
}
