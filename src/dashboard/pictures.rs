//! The dashboard's pictures, as PNG bytes: the first conv layer's filters, one validation
//! image, and that image's feature maps at the first conv layer (after its ReLU when one
//! follows).
//!
//! The maps are computed here on the host from the exported weights, with the CPU layers of
//! the run's own spec (one image forward, once per epoch), so they look the same whichever
//! backend trains and whatever the network is (`inspect::feature_maps` walks it). With several
//! input channels the filters show their first channel.
//!
//! What it is not: not the fused block's pooled output, and no other layer's maps.

use anyhow::{bail, Context, Result};
use image::{GrayImage, Luma};

use crate::backend::NamedTensor;
use crate::data::normalize_into;
use crate::spec::{BuildOptions, ModelSpec};

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

/// The pictures from the weights of an epoch's end and the validation image's stored pixels
/// (one gray plane, or `spec.input.channels` planes).
pub fn render(spec: &ModelSpec, classes: usize, weights: &[NamedTensor], image: Option<&[u8]>) -> Result<Pictures> {
    let Some(w) = weights.iter().find(|w| w.shape.len() == 4) else {
        return Ok(Pictures { filters: None, maps: None, image: None }); // no conv layer
    };
    let [oc, ic, kh, kw] = w.shape[..] else { bail!("{} has shape {:?}", w.name, w.shape) };
    // Filters: one gray scale for all, 128 = 0, symmetric around it.
    let max = w.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let filters: Vec<Vec<u8>> = w
        .data
        .chunks_exact(ic * kh * kw)
        .map(|f| f[..kh * kw].iter().map(|v| (128.0 + 127.0 * v / max).round().clamp(0.0, 255.0) as u8).collect())
        .collect();
    let cols = 8.min(oc.max(1));
    let filters = Some(png(&tile(&filters, kw, kh, cols, (48 / kh.max(kw)).clamp(2, 12)))?);
    let Some(pixels) = image else { return Ok(Pictures { filters, maps: None, image: None }) };
    let input = spec.input;
    let plane = input.plane();
    if pixels.len() != plane && pixels.len() != input.len() {
        bail!("the validation image has {} pixels, the model takes {input}", pixels.len());
    }
    let planes = if pixels.len() == plane { pixels.repeat(input.channels) } else { pixels.to_vec() };
    let mut x = vec![0f32; input.len()];
    normalize_into(&planes, &mut x);
    let mut model = spec.build::<f32>(classes, BuildOptions::default(), 0)?;
    model.import_weights(weights)?;
    let first = crate::inspect::feature_maps(&mut model, &x)?.into_iter().next().context("no feature maps")?;
    let maps: Vec<Vec<u8>> = (0..first.channels)
        .map(|c| {
            // Each map on its own scale: black 0 (or its minimum when negative), white its top.
            let m = first.channel(c);
            let lo = m.iter().fold(0f32, |a, &v| a.min(v));
            let top = m.iter().fold(lo, |a, &v| a.max(v));
            let span = (top - lo).max(1e-12);
            m.iter().map(|v| (255.0 * (v - lo) / span).round() as u8).collect()
        })
        .collect();
    let scale = (128 / first.h.max(first.w)).clamp(1, 4);
    let maps = Some(png(&tile(&maps, first.w, first.h, 8.min(first.channels.max(1)), scale))?);
    let side = input.size;
    let gray = crate::explain::display_gray(&planes, plane);
    let image = Some(png(&tile(&[gray], side, side, 1, (192 / side).clamp(1, 3)))?);
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
        let spec = ModelSpec::parse("Conv2d(1, 3) ReLU Flatten Linear(2)", Default::default(), 0.4).unwrap();
        let mut weights = weights;
        weights.push(NamedTensor { name: "3.weight".into(), shape: vec![2, 62 * 62], data: vec![0.0; 2 * 62 * 62] });
        weights.push(NamedTensor { name: "3.bias".into(), shape: vec![2], data: vec![0.0; 2] });
        for (t, name) in weights.iter_mut().zip(["0.weight", "0.bias"]) {
            t.name = name.into();
        }
        let p = render(&spec, 2, &weights, Some(&pixels)).unwrap();
        let maps = image::load_from_memory(p.maps.as_ref().unwrap()).unwrap().to_luma8();
        // 1 column: 2 + 62*2 + 2 pixels wide.
        assert_eq!(maps.dimensions(), (128, 128));
        assert_eq!(maps.get_pixel(2 + 10, 2 + 10).0[0], 255, "inside the bright square");
        assert!(maps.get_pixel(2 + 100, 2 + 100).0[0] < 255);
        assert!(p.filters.is_some() && p.image.is_some());
        // A spec the weights do not fit is an error, not a wrong picture.
        assert!(render(&spec, 2, &weights[..2], Some(&pixels)).is_err());
    }
}
