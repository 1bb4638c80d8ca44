//! `medcnn inspect`: pictures of a trained model's insides. The first layer's filters, the
//! feature maps of every conv layer for one image, and the test images it gets wrong or is
//! least sure of.
//!
//! Files written to `--out`:
//! - `filters.png`: the first conv layer's kernels (conv_block.0's 32 3x3 for the reference) on
//!   one shared scale (red > 0, blue < 0; in colour when the layer reads three channels);
//! - `feature_maps.png`: the image and the 8 most active channels of each conv layer (after
//!   its ReLU when one follows), and `features_<layer>.png` with every channel of that layer;
//! - with `--data`: `mistakes.png` (wrong predictions, most confident first),
//!   `least_confident.png` (the lowest top probabilities, right or wrong) and `mistakes.csv`.
//!
//! What it is not: no gradients (that is `explain`) and no training.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::backend::Device;
use crate::checkpoint::meta_json;
use crate::data::{fingerprint, load_data, Dataset, Split};
use crate::explain::render::{
    self, diverging, gray_rgb, inferno, normalise_max, Align, Canvas, Rgb, Tile, DARK_RGB, GRAY_RGB, GREEN_RGB,
    RED_RGB, WHITE_RGB,
};
use crate::explain::{cpu_model, display_gray, percent, read_image};
use crate::layers::cross_entropy::{argmax, softmax};
use crate::layers::Ctx;
use crate::model::{LayerKind, Sequential};
use crate::model_file::SavedModel;
use crate::tensor::{from_vec, slice, Float};

/// `medcnn inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// A trained model (model.safetensors from `medcnn train`).
    #[arg(long)]
    pub model: PathBuf,
    /// The data the model was trained on (a folder of class folders or a MedNIST .tar.gz),
    /// for the mistakes and least-confident pictures.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The image whose feature maps are drawn (default: the first image of the split).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// train, val, test (the model's own split) or all.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// How many images the mistakes and least-confident pictures show at most.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub count: u64,
    #[arg(long, default_value = "outputs/inspect")]
    pub out: PathBuf,
}

/// The first conv layer's kernels, one tile each, on one symmetric scale around zero.
pub fn filters_picture<T: Float>(model: &Sequential<T>) -> Result<Canvas> {
    let (name, w) = model
        .named_params()
        .into_iter()
        .find(|(n, p)| n.ends_with(".weight") && p.value.ndim() == 4)
        .context("the model has no conv layer")?;
    let s = w.value.shape().to_vec();
    let (oc, ic, kh, kw) = (s[0], s[1], s[2], s[3]);
    let values: Vec<f32> = slice(&w.value).iter().map(|v| v.as_f64() as f32).collect();
    let m = values.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-12);
    // Three input channels (an RGB image) are drawn as colour: each channel's weight is its
    // colour's intensity around mid-gray. With other channel counts only the first is drawn.
    let plane = kh * kw;
    let colour = ic == 3;
    let tiles: Vec<Tile> = values
        .chunks_exact(ic * plane)
        .map(|k| Tile {
            pixels: if colour {
                let level = |v: f32| ((0.5 + 0.5 * v / m) * 255.0).round().clamp(0.0, 255.0) as u8;
                (0..plane).map(|i| [level(k[i]), level(k[plane + i]), level(k[2 * plane + i])]).collect()
            } else {
                k[..plane].iter().map(|&v| diverging(0.5 + 0.5 * v / m)).collect()
            },
            w: kw,
            h: kh,
            caption: Vec::new(),
        })
        .collect();
    let title = format!("{}: {oc} filters of {kh}x{kw}", name.trim_end_matches(".weight"));
    let subtitle = if colour {
        format!("in colour, R G B = the weights on each input channel, mid-gray 0 (|w| up to {m:.3})")
    } else {
        format!("one scale for all: red > 0, white 0, blue < 0 (|w| up to {m:.3})")
    };
    render::tile_grid(&title, &subtitle, &tiles, 8, (72 / kh.max(kw)).max(1))
}

/// The activations of one layer for one image: `channels` maps of `h` x `w`.
pub struct FeatureMaps {
    /// The layer read (the ReLU after a conv, or the conv itself), e.g. `conv_block.4`.
    pub layer: String,
    /// The conv, e.g. `Conv2d(32->64, k3x3, s1, p0)`, and whether the maps are after a ReLU.
    pub conv: String,
    pub after_relu: bool,
    pub channels: usize,
    pub h: usize,
    pub w: usize,
    /// `channels * h * w` values.
    pub values: Vec<f32>,
}

impl FeatureMaps {
    pub fn channel(&self, k: usize) -> &[f32] {
        &self.values[k * self.h * self.w..(k + 1) * self.h * self.w]
    }

    /// Channels by mean activation, largest first.
    pub fn most_active(&self) -> Vec<usize> {
        let mean = |k: usize| self.channel(k).iter().map(|&v| v as f64).sum::<f64>();
        let mut order: Vec<usize> = (0..self.channels).collect();
        order.sort_by(|&a, &b| mean(b).total_cmp(&mean(a)));
        order
    }
}

/// Runs `x` (one image of the model's input) forward in evaluation mode and keeps the output of
/// every conv layer: after the ReLU that follows it, if one does (the layer-by-layer model).
pub fn feature_maps<T: Float>(model: &mut Sequential<T>, x: &[f32]) -> Result<Vec<FeatureMaps>> {
    let [c, hh, ww] = model.input.chw();
    ensure!(x.len() == c * hh * ww, "the input has {} values, the model takes {c} x {hh} x {ww}", x.len());
    let mut h = from_vec(&[1, c, hh, ww], x.iter().map(|&v| T::f(v as f64)).collect());
    let mut out = Vec::new();
    let kinds: Vec<LayerKind> = model.layers.iter().map(|l| l.kind).collect();
    let mut conv: Option<String> = None;
    for (i, l) in model.layers.iter_mut().enumerate() {
        h = l.layer.forward(&h, Ctx::eval());
        if l.kind == LayerKind::Conv2d {
            conv = Some(l.layer.describe());
        }
        let is_conv_output = match l.kind {
            LayerKind::Conv2d => kinds.get(i + 1) != Some(&LayerKind::Relu),
            LayerKind::Relu => i > 0 && kinds[i - 1] == LayerKind::Conv2d,
            _ => false,
        };
        if is_conv_output && h.ndim() == 4 {
            let s = h.shape();
            out.push(FeatureMaps {
                layer: l.name.clone(),
                conv: conv.clone().unwrap_or_default(),
                after_relu: l.kind == LayerKind::Relu,
                channels: s[1],
                h: s[2],
                w: s[3],
                values: slice(&h).iter().map(|v| v.as_f64() as f32).collect(),
            });
        }
    }
    ensure!(!out.is_empty(), "the model has no conv layer (or only fused ones): no feature maps to draw");
    Ok(out)
}

/// Nearest-neighbour resize of an `h` x `w` map to `oh` x `ow`.
fn resize_nearest(map: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    (0..oh * ow).map(|i| map[(i / ow) * h / oh * w + (i % ow) * w / ow]).collect()
}

/// Every channel of one layer, each scaled to its own maximum (black = 0).
pub fn feature_maps_picture(fm: &FeatureMaps) -> Result<Canvas> {
    let tiles: Vec<Tile> = (0..fm.channels)
        .map(|k| Tile {
            pixels: render::colorize(&normalise_max(fm.channel(k)), inferno),
            w: fm.w,
            h: fm.h,
            caption: Vec::new(),
        })
        .collect();
    let dead = (0..fm.channels).filter(|&k| fm.channel(k).iter().all(|&v| v <= 0.0)).count();
    let what = if fm.after_relu { format!("ReLU after {}", fm.conv) } else { fm.conv.clone() };
    let title = format!("{} ({what}): {} maps of {}x{}", fm.layer, fm.channels, fm.h, fm.w);
    let subtitle = format!("channels in order, each scaled to its own maximum; {dead} all zero (black) for this image");
    let cols = if fm.channels <= 32 { 8 } else { 16 };
    render::tile_grid(&title, &subtitle, &tiles, cols, (64 / fm.h.max(fm.w)).max(1))
}

/// One row per conv layer: the image on the left, then the `per_layer` most active channels,
/// all drawn at the same size.
pub fn feature_overview_picture(
    pixels: &[u8],
    maps: &[FeatureMaps],
    per_layer: usize,
    heading: &str,
) -> Result<Canvas> {
    ensure!(!maps.is_empty(), "no feature maps to draw");
    let side = (pixels.len() as f64).sqrt() as usize;
    ensure!(side * side == pixels.len(), "the image is not square");
    let (tile, gap, label_w, top, margin) = (96usize, 6usize, 125usize, 64usize, 14usize);
    let rows = maps.len();
    let width = margin + label_w + per_layer * (tile + gap) + margin;
    let image_side = 2 * tile + gap;
    let height = top + (rows * (tile + gap)).max(image_side + 24) + margin + 18;
    let mut c = Canvas::new(width + image_side + 2 * gap, height, WHITE_RGB)?;
    c.text("Feature maps of each conv layer", c.width as i32 / 2, 10, 20.0, DARK_RGB, Align::Center)?;
    let sub = render::fit_text(
        &format!("{heading}; the {per_layer} most active channels per layer, each scaled to its own maximum"),
        13.0,
        c.width as u32 - 8,
    );
    c.text(&sub, c.width as i32 / 2, 38, 13.0, GRAY_RGB, Align::Center)?;
    // The input, large, on the left.
    let img = resize_nearest(&pixels.iter().map(|&p| p as f32).collect::<Vec<_>>(), side, side, image_side, image_side);
    let img: Vec<u8> = img.iter().map(|&v| v as u8).collect();
    c.blit(margin, top, &gray_rgb(&img), image_side, image_side, 1);
    c.text("input", (margin + image_side / 2) as i32, (top + image_side + 4) as i32, 13.0, DARK_RGB, Align::Center)?;
    let x_label = margin + image_side + 2 * gap;
    for (r, fm) in maps.iter().enumerate() {
        let y = top + r * (tile + gap);
        c.text(&fm.layer, x_label as i32, (y + tile / 2 - 18) as i32, 15.0, DARK_RGB, Align::Left)?;
        let dims = format!("{} x {}x{}", fm.channels, fm.h, fm.w);
        c.text(&dims, x_label as i32, (y + tile / 2 + 2) as i32, 13.0, GRAY_RGB, Align::Left)?;
        for (i, &k) in fm.most_active().iter().take(per_layer).enumerate() {
            let m = resize_nearest(&normalise_max(fm.channel(k)), fm.h, fm.w, tile, tile);
            c.blit(x_label + label_w + i * (tile + gap), y, &render::colorize(&m, inferno), tile, tile, 1);
        }
    }
    Ok(c)
}

/// A test image's prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Index into the dataset.
    pub index: usize,
    pub truth: usize,
    pub pred: usize,
    /// Probability of the predicted class.
    pub p_pred: f64,
    /// Probability of the true class.
    pub p_true: f64,
}

impl Verdict {
    pub fn correct(&self) -> bool {
        self.truth == self.pred
    }
}

/// The model's verdict on each image of `indices`, on the fast CPU path.
pub fn verdicts(saved: &SavedModel, ds: &Dataset, indices: &[usize]) -> Result<Vec<Verdict>> {
    let mut backend = saved.backend(Device::Cpu)?;
    let k = saved.classes.len();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(256) {
        crate::data::fill_batch(ds, chunk, &[], &mut x, &mut y);
        let logits = backend.predict(&x, chunk.len())?;
        for ((z, &truth), &index) in logits.chunks_exact(k).zip(&y).zip(chunk) {
            let p = softmax(z);
            let pred = argmax(&p);
            out.push(Verdict { index, truth, pred, p_pred: p[pred], p_true: p[truth] });
        }
    }
    Ok(out)
}

/// Wrong predictions, the most confident first.
pub fn mistakes(v: &[Verdict]) -> Vec<Verdict> {
    let mut m: Vec<Verdict> = v.iter().filter(|v| !v.correct()).cloned().collect();
    m.sort_by(|a, b| b.p_pred.total_cmp(&a.p_pred).then(a.index.cmp(&b.index)));
    m
}

/// Every prediction, the least sure (lowest top probability) first.
pub fn least_confident(v: &[Verdict]) -> Vec<Verdict> {
    let mut m = v.to_vec();
    m.sort_by(|a, b| a.p_pred.total_cmp(&b.p_pred).then(a.index.cmp(&b.index)));
    m
}

/// A stored image as colours to draw: gray, or three planes R, G, B.
fn image_rgb(planes: &[u8], plane: usize) -> Vec<Rgb> {
    if planes.len() == 3 * plane {
        (0..plane).map(|i| [planes[i], planes[plane + i], planes[2 * plane + i]]).collect()
    } else {
        gray_rgb(&planes[..plane])
    }
}

/// Images with "true -> pred (p)" under each, green when right and red when wrong.
pub fn verdicts_picture(ds: &Dataset, v: &[Verdict], title: &str, subtitle: &str) -> Result<Canvas> {
    let side = ds.shape.size;
    let scale = (128 / side).clamp(1, 2);
    let tiles: Vec<Tile> = v
        .iter()
        .map(|v| Tile {
            pixels: image_rgb(ds.image(v.index), ds.shape.plane()),
            w: side,
            h: side,
            caption: vec![
                (
                    format!("{} -> {}", ds.classes[v.truth], ds.classes[v.pred]),
                    if v.correct() { GREEN_RGB } else { RED_RGB },
                ),
                (format!("p = {}", percent(v.p_pred)), DARK_RGB),
            ],
        })
        .collect();
    render::tile_grid(title, subtitle, &tiles, 8, scale)
}

fn write_verdicts_csv(path: &Path, ds: &Dataset, v: &[Verdict]) -> Result<()> {
    let mut s = String::from("file,true,predicted,p_predicted,p_true\n");
    for v in v {
        s += &format!(
            "{},{},{},{:.6},{:.6}\n",
            ds.names[v.index], ds.classes[v.truth], ds.classes[v.pred], v.p_pred, v.p_true
        );
    }
    crate::metrics::write_atomic(path, s.as_bytes())
}

/// The images of `split_name` in `ds`, from the model's own split.
fn split_indices(saved: &SavedModel, ds: &Dataset, split_name: &str) -> Result<Vec<usize>> {
    if split_name == "all" {
        return Ok((0..ds.len()).collect());
    }
    let split: Split = meta_json(&saved.meta, "split", &saved.path)?;
    if saved.meta.get("data_fingerprint") != Some(&fingerprint(ds)) {
        bail!(
            "{}: these are not the images the model was trained on, so its {split_name} split cannot be found (use --split all to look at every image)",
            saved.path.display()
        );
    }
    Ok(match split_name {
        "train" => split.train,
        "val" => split.val,
        "test" => split.test,
        other => bail!("--split must be train, val, test or all, got {other}"),
    })
}

/// Runs `medcnn inspect`; returns the files written.
pub fn run(args: &InspectArgs) -> Result<Vec<PathBuf>> {
    if !["train", "val", "test", "all"].contains(&args.split.as_str()) {
        bail!("--split must be train, val, test or all, got {}", args.split);
    }
    let saved = SavedModel::load(&args.model)?;
    let mut model = cpu_model(&saved)?;
    crate::metrics::check_output_dir(&args.out)?;
    let mut written = Vec::new();
    let mut save = |c: Canvas, name: &str| -> Result<()> {
        let path = args.out.join(name);
        c.save(&path)?;
        println!("wrote {}", path.display());
        written.push(path);
        Ok(())
    };

    save(filters_picture(&model)?, "filters.png")?;

    let data = match &args.data {
        Some(d) => {
            let limit: Option<usize> = saved.meta.get("limit").and_then(|v| serde_json::from_str(v).ok()).flatten();
            let ds = load_data(Some(d), if args.split == "all" { None } else { limit }, false, saved.spec.input)?;
            if ds.classes != saved.classes {
                bail!("the data's classes {:?} differ from the model's {:?}", ds.classes, saved.classes);
            }
            let indices = split_indices(&saved, &ds, &args.split)?;
            ensure!(!indices.is_empty(), "the {} split has no images", args.split);
            Some((ds, indices))
        }
        None => None,
    };

    // Feature maps of one image: (gray pixels to draw, the model's input, a label).
    let input = saved.spec.input;
    let chosen: Option<(Vec<u8>, Vec<f32>, String)> = match (&args.image, &data) {
        (Some(p), _) => {
            let (pixels, x) = read_image(p, input)?;
            Some((pixels, x, p.display().to_string()))
        }
        (None, Some((ds, idx))) => {
            let (mut x, mut y) = (Vec::new(), Vec::new());
            crate::data::fill_batch(ds, &idx[..1], &[], &mut x, &mut y);
            let pixels = display_gray(ds.image(idx[0]), input.plane());
            Some((pixels, x, format!("{} ({} image 1)", ds.names[idx[0]], args.split)))
        }
        (None, None) => None,
    };
    match chosen {
        Some((pixels, x, label)) => {
            let maps = feature_maps(&mut model, &x)?;
            let [c, h, w] = input.chw();
            let logits = model.forward(&from_vec(&[1, c, h, w], x.clone()), Ctx::eval());
            let p = softmax(slice(&logits));
            let pred = argmax(&p);
            let heading = format!("{label}, predicted {} ({})", saved.classes[pred], percent(p[pred]));
            save(feature_overview_picture(&pixels, &maps, 8, &heading)?, "feature_maps.png")?;
            for fm in &maps {
                save(feature_maps_picture(fm)?, &format!("features_{}.png", fm.layer.replace('.', "_")))?;
            }
        }
        None => println!("feature maps skipped: give --image PATH or --data DATA"),
    }

    match &data {
        Some((ds, indices)) => {
            let v = verdicts(&saved, ds, indices)?;
            let wrong = mistakes(&v);
            let n = args.count as usize;
            println!(
                "{}: {} images, {} wrong ({:.2}% accuracy)",
                args.split,
                v.len(),
                wrong.len(),
                100.0 * (v.len() - wrong.len()) as f64 / v.len() as f64
            );
            for m in wrong.iter().take(n) {
                println!(
                    "  {}: {} -> {} ({})",
                    ds.names[m.index],
                    ds.classes[m.truth],
                    ds.classes[m.pred],
                    percent(m.p_pred)
                );
            }
            if wrong.is_empty() {
                println!("no mistakes on the {} split: mistakes.png not drawn", args.split);
            } else {
                let title = format!("Mistakes: {} of {} {} images wrong", wrong.len(), v.len(), args.split);
                let shown = wrong.len().min(n);
                let sub =
                    format!("true -> predicted (probability of the prediction); the {shown} most confident mistakes");
                save(verdicts_picture(ds, &wrong[..shown], &title, &sub)?, "mistakes.png")?;
            }
            let unsure = least_confident(&v);
            let title = format!(
                "Least confident: the {} {} images with the lowest top probability",
                n.min(v.len()),
                args.split
            );
            let sub = "true -> predicted (probability of the prediction); green right, red wrong";
            save(verdicts_picture(ds, &unsure[..n.min(v.len())], &title, sub)?, "least_confident.png")?;
            let csv = args.out.join("mistakes.csv");
            write_verdicts_csv(&csv, ds, &wrong)?;
            println!("wrote {}", csv.display());
            written.push(csv);
        }
        None => println!("mistakes skipped: give --data (the data the model was trained on)"),
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(index: usize, truth: usize, pred: usize, p: f64) -> Verdict {
        Verdict { index, truth, pred, p_pred: p, p_true: if truth == pred { p } else { 1.0 - p } }
    }

    #[test]
    fn mistakes_and_least_confident_are_ranked() {
        let all = [v(0, 0, 0, 0.99), v(1, 0, 1, 0.6), v(2, 1, 0, 0.9), v(3, 1, 1, 0.5)];
        let m: Vec<usize> = mistakes(&all).iter().map(|v| v.index).collect();
        assert_eq!(m, vec![2, 1]);
        let l: Vec<usize> = least_confident(&all).iter().map(|v| v.index).collect();
        assert_eq!(l, vec![3, 1, 2, 0]);
    }

    #[test]
    fn nearest_resize_repeats_pixels() {
        assert_eq!(resize_nearest(&[1.0, 2.0, 3.0, 4.0], 2, 2, 4, 4)[..8], [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
    }
}
