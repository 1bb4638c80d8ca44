//! What the network looks at: gradient saliency and Grad-CAM for one image, the composite
//! picture of both, and the `medcnn explain` command.
//!
//! The math, for one image x and a target class t, with z = logits(x) in evaluation mode
//! (dropout off) and the score z_t taken before the softmax:
//! - saliency: |dz_t / dx| per pixel. One forward, then backward from dy = one-hot(t) on the
//!   logits; the first layer's dx is the gradient.
//!   With three input channels a pixel's saliency is the largest |gradient| of its channels.
//! - Grad-CAM (Selvaraju et al. 2017): A = the activations of the last conv layer (after its
//!   ReLU when one follows it: `conv_block.10`, 256 x 4 x 4 for the reference on 64x64) and
//!   dA = dz_t / dA, read off the same backward pass where it crosses that layer.
//!   alpha_k = mean over space of dA_k, and cam = ReLU(sum_k alpha_k A_k): the places whose
//!   features push the score of t up. The map is upsampled bilinearly to the image and scaled to
//!   [0, 1] by its minimum and maximum (as pytorch-grad-cam does), so it shows where the
//!   evidence is relatively strongest. A network without a conv layer has no Grad-CAM (the map
//!   is left at zero and `gradcam_layer` says so); its saliency is as for any other.
//!
//! What it is not: it trains nothing and needs the layer-by-layer model (built without fused
//! conv blocks, as [`cpu_model`] does), since it reads the activations and gradients between
//! the conv, the ReLU and the pool. Layers are found by kind (`model::LayerKind`). Parameter
//! gradients are cleared after use.

pub mod render;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::backend::NamedTensor;
use crate::data::InputShape;
use crate::layers::cross_entropy::{argmax, softmax};
use crate::layers::Ctx;
use crate::model::{reference_model, LayerKind, ModelConfig, Sequential};
use crate::model_file::SavedModel;
use crate::spec::BuildOptions;
use crate::tensor::{from_vec, slice, slice_mut, Float, Tensor};
use render::{colorize, gray_rgb, inferno, jet, overlay, Align, Canvas, DARK_RGB, GRAY_RGB, WHITE_RGB};

/// How much of the jet colour a Grad-CAM overlay mixes over the gray image.
pub const OVERLAY_ALPHA: f32 = 0.45;
/// Saliency is divided by this quantile of |gradient| (then clipped at 1), so that one extreme
/// pixel does not leave the rest of the map black.
pub const SALIENCY_QUANTILE: f64 = 0.995;

/// Saliency and Grad-CAM of one image, for the class `target`.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The logits (pre-softmax scores), one per class.
    pub logits: Vec<f64>,
    /// Softmax of the logits.
    pub probs: Vec<f64>,
    /// The predicted class (argmax).
    pub class: usize,
    /// The class explained: the one asked for, else the predicted one.
    pub target: usize,
    /// Side of the (square) image; the maps below are `side * side`, row-major.
    pub side: usize,
    /// |dz_target / dx| divided by its 99.5th percentile and clipped to [0, 1].
    pub saliency: Vec<f32>,
    /// Grad-CAM upsampled (bilinear) to the image, scaled to [0, 1] by its minimum and maximum.
    /// All zero when the map is flat (e.g. no feature speaks for the target).
    pub gradcam: Vec<f32>,
    /// Grad-CAM at the conv layer's resolution, before upsampling and normalising (>= 0).
    pub gradcam_raw: Vec<f32>,
    /// (height, width) of `gradcam_raw`.
    pub gradcam_shape: (usize, usize),
    /// The layer Grad-CAM reads, e.g. `conv_block.10`.
    pub gradcam_layer: String,
}

/// One forward and one backward pass of a single image for the score of one class.
pub struct Backprop<T: Float> {
    /// The logits (1, classes) flattened.
    pub logits: Vec<T>,
    /// The class whose logit was differentiated.
    pub target: usize,
    /// dz_target / dx, one value per input pixel.
    pub input_grad: Vec<T>,
    /// Index into `model.layers` of the layer Grad-CAM reads (the last conv, or the ReLU right
    /// after it); the last layer when the network has no conv (then A is the logits).
    pub cam_layer: usize,
    /// False for a network without a conv layer: no Grad-CAM.
    pub has_cam: bool,
    /// That layer's output A (1, C, h, w) and dz_target / dA, same shape.
    pub activations: Tensor<T>,
    pub activation_grad: Tensor<T>,
}

/// The index of the layer Grad-CAM reads: the last `Conv2d`, or the ReLU right after it;
/// `None` for a network without a conv. Errors for a model with fused conv blocks, whose conv
/// outputs are never materialised.
pub fn gradcam_layer<T: Float>(model: &Sequential<T>) -> Result<Option<usize>> {
    if !model.find(LayerKind::ConvReluPool).is_empty() {
        bail!("Grad-CAM needs the layer-by-layer model (its conv outputs), not one with fused conv blocks");
    }
    let Some(&i) = model.find(LayerKind::Conv2d).last() else { return Ok(None) };
    Ok(Some(if model.layers.get(i + 1).is_some_and(|l| l.kind == LayerKind::Relu) { i + 1 } else { i }))
}

/// Checks that `len` values are one image of the model's input.
fn check_input(len: usize, input: InputShape) -> Result<()> {
    let [c, h, w] = input.chw();
    ensure!(len == input.len(), "the input has {len} values, the model takes {c} x {h} x {w} = {}", input.len());
    Ok(())
}

/// Runs `x` (one image of the model's input shape, normalised as for training) forward in
/// evaluation mode and back from the logit of `target` (default: the predicted class).
pub fn backprop_target<T: Float>(model: &mut Sequential<T>, x: &[T], target: Option<usize>) -> Result<Backprop<T>> {
    check_input(x.len(), model.input)?;
    let n = model.layers.len();
    ensure!(n > 0, "the model has no layers");
    let found = gradcam_layer(model)?;
    let cam_layer = found.unwrap_or(n - 1);
    let [c, h, w] = model.input.chw();
    let input = from_vec(&[1, c, h, w], x.to_vec());
    let activations = model.forward_range(&input, 0..cam_layer + 1, Ctx::eval());
    let logits_t = model.forward_range(&activations, cam_layer + 1..n, Ctx::eval());
    let logits = slice(&logits_t).to_vec();
    ensure!(
        !logits.is_empty() && logits_t.len() == logits_t.shape()[logits_t.ndim() - 1],
        "the model does not end in one row of logits"
    );
    let predicted = argmax(&logits);
    let target = target.unwrap_or(predicted);
    ensure!(target < logits.len(), "class {target} out of range for {} classes", logits.len());

    let mut dy = Tensor::<T>::zeros(logits_t.raw_dim());
    slice_mut(&mut dy)[target] = T::one();
    let activation_grad = model.backward_range(&dy, cam_layer + 1..n);
    let dx = model.backward_range(&activation_grad, 0..cam_layer + 1);
    model.zero_grad();
    Ok(Backprop {
        logits,
        target,
        input_grad: slice(&dx).to_vec(),
        cam_layer,
        has_cam: found.is_some(),
        activations,
        activation_grad,
    })
}

/// Grad-CAM at the layer's resolution: ReLU(sum_k alpha_k A_k) with alpha_k the spatial mean
/// of dA_k. `a` and `da` are (1, C, h, w). Returns h * w values, row-major.
pub fn gradcam_map<T: Float>(a: &Tensor<T>, da: &Tensor<T>) -> Vec<f32> {
    let s = a.shape();
    assert_eq!(s, da.shape(), "gradcam_map: activations and gradients differ in shape");
    assert!(s.len() == 4 && s[0] == 1, "gradcam_map: expected (1, C, h, w), got {s:?}");
    let hw = s[2] * s[3];
    let mut cam = vec![0.0f64; hw];
    for (ak, dk) in slice(a).chunks_exact(hw).zip(slice(da).chunks_exact(hw)) {
        let alpha = dk.iter().map(|v| v.as_f64()).sum::<f64>() / hw as f64;
        for (c, v) in cam.iter_mut().zip(ak) {
            *c += alpha * v.as_f64();
        }
    }
    cam.into_iter().map(|v| v.max(0.0) as f32).collect()
}

/// Bilinear resize of an `h` x `w` map to `oh` x `ow`, sampling at pixel centres
/// (PyTorch's `interpolate(mode="bilinear", align_corners=False)`).
pub fn upsample_bilinear(map: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "upsample_bilinear: map has {} values for {h}x{w}", map.len());
    let coord = |o: usize, n_in: usize, n_out: usize| -> (usize, usize, f32) {
        let src = ((o as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).clamp(0.0, (n_in - 1) as f32);
        let i0 = src.floor() as usize;
        (i0, (i0 + 1).min(n_in - 1), src - i0 as f32)
    };
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        let (y0, y1, fy) = coord(y, h, oh);
        for x in 0..ow {
            let (x0, x1, fx) = coord(x, w, ow);
            let top = map[y0 * w + x0] * (1.0 - fx) + map[y0 * w + x1] * fx;
            let bottom = map[y1 * w + x0] * (1.0 - fx) + map[y1 * w + x1] * fx;
            out[y * ow + x] = top * (1.0 - fy) + bottom * fy;
        }
    }
    out
}

/// Divides by the `q` quantile of the values (or their maximum if that is 0) and clips to
/// [0, 1]; all zeros stay zeros.
pub fn normalise_quantile(values: &[f32], q: f64) -> Vec<f32> {
    let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f32::total_cmp);
    let Some(&max) = sorted.last() else { return vec![0.0; values.len()] };
    let k = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    let scale = if sorted[k] > 0.0 { sorted[k] } else { max };
    values.iter().map(|&v| if v.is_finite() && scale > 0.0 { (v / scale).clamp(0.0, 1.0) } else { 0.0 }).collect()
}

/// (v - min) / (max - min) over the finite values; a flat map (or a map of NaN) becomes zeros.
pub fn normalise_min_max(values: &[f32]) -> Vec<f32> {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = hi - lo;
    // A span within rounding of the values is flat: its "pattern" would be noise.
    if span.is_nan() || span <= 1e-6 * hi.abs().max(lo.abs()) {
        return vec![0.0; values.len()];
    }
    values.iter().map(|&v| if v.is_finite() { ((v - lo) / span).clamp(0.0, 1.0) } else { 0.0 }).collect()
}

/// Saliency and Grad-CAM of one image `x` (normalised as for training, in the model's input
/// shape: 4096 values for MedNIST) for class `target`, or the predicted class when `None`.
pub fn explain<T: Float>(model: &mut Sequential<T>, x: &[f32], target: Option<usize>) -> Result<Explanation> {
    let input = model.input;
    check_input(x.len(), input)?;
    let side = input.size;
    let xt: Vec<T> = x.iter().map(|&v| T::f(v as f64)).collect();
    let b = backprop_target(model, &xt, target)?;
    let logits: Vec<f64> = b.logits.iter().map(|v| v.as_f64()).collect();
    // One value per pixel: the largest |gradient| over the input channels.
    let plane = input.plane();
    let saliency: Vec<f32> = (0..plane)
        .map(|i| (0..input.channels).map(|c| b.input_grad[c * plane + i].as_f64().abs()).fold(0.0, f64::max) as f32)
        .collect();
    let (raw, (h, w), layer) = if b.has_cam {
        let s = b.activations.shape();
        (gradcam_map(&b.activations, &b.activation_grad), (s[2], s[3]), model.layers[b.cam_layer].name.clone())
    } else {
        (vec![0.0], (1, 1), "none (the network has no conv layer)".to_string())
    };
    Ok(Explanation {
        probs: softmax(&logits),
        class: argmax(&b.logits),
        target: b.target,
        side,
        saliency: normalise_quantile(&saliency, SALIENCY_QUANTILE),
        gradcam: normalise_min_max(&upsample_bilinear(&raw, h, w, side, side)),
        gradcam_raw: raw,
        gradcam_shape: (h, w),
        gradcam_layer: layer,
        logits,
    })
}

/// The layer-by-layer CPU model holding a saved model's weights.
pub fn cpu_model(saved: &SavedModel) -> Result<Sequential<f32>> {
    saved.cpu_model(BuildOptions::default())
}

/// The layer-by-layer reference model (`reference_model(cfg)`, 64x64 gray) with `weights`
/// (named and ordered as `named_params`) copied in.
pub fn model_from_weights<T: Float>(cfg: &ModelConfig, weights: &[NamedTensor]) -> Result<Sequential<T>> {
    let mut model = reference_model::<T>(&ModelConfig { fused: false, ..cfg.clone() }, 0);
    model.import_weights(weights)?;
    Ok(model)
}

/// A class given by name (exact, then case-insensitive) or by index.
pub fn parse_class(s: &str, classes: &[String]) -> Result<usize> {
    if let Some(i) = classes.iter().position(|c| c == s) {
        return Ok(i);
    }
    if let Some(i) = classes.iter().position(|c| c.eq_ignore_ascii_case(s)) {
        return Ok(i);
    }
    match s.parse::<usize>() {
        Ok(i) if i < classes.len() => Ok(i),
        _ => bail!("unknown class {s:?}: use one of {} (or an index 0..{})", classes.join(", "), classes.len()),
    }
}

fn check_pixels(pixels: &[u8], e: &Explanation, scale: usize) -> Result<()> {
    ensure!(
        pixels.len() == e.side * e.side && e.saliency.len() == pixels.len() && e.gradcam.len() == pixels.len(),
        "the image has {} pixels, the maps {} and {} ({}x{} expected)",
        pixels.len(),
        e.saliency.len(),
        e.gradcam.len(),
        e.side,
        e.side
    );
    ensure!((1..=32).contains(&scale), "scale must be 1 to 32, got {scale}");
    Ok(())
}

/// The Grad-CAM map `cam` (values in [0, 1]) in jet colours over the gray image `pixels`
/// (same square size), `scale` times larger, as PNG bytes.
pub fn heatmap_overlay_png(pixels: &[u8], cam: &[f32], scale: usize) -> Result<Vec<u8>> {
    let side = (pixels.len() as f64).sqrt().round() as usize;
    ensure!(side * side == pixels.len() && side > 0, "the image has {} pixels, not a square", pixels.len());
    ensure!(cam.len() == pixels.len(), "the map has {} values for {} pixels", cam.len(), pixels.len());
    ensure!((1..=32).contains(&scale), "scale must be 1 to 32, got {scale}");
    let mut c = Canvas::new(side * scale, side * scale, WHITE_RGB)?;
    c.blit(0, 0, &overlay(pixels, cam, jet, OVERLAY_ALPHA), side, side, scale);
    c.png()
}

/// A probability as a percentage that never rounds to 0% or 100% unless it is exactly that:
/// "97.3%", "99.97%", ">99.99%", "<0.1%".
pub fn percent(p: f64) -> String {
    match p {
        _ if p <= 0.0 || p >= 1.0 || (0.001..=0.999).contains(&p) => format!("{:.1}%", 100.0 * p),
        _ if p < 0.001 => "<0.1%".into(),
        _ if p < 0.9999 => format!("{:.2}%", 100.0 * p),
        _ => ">99.99%".into(),
    }
}

/// The composite picture: the image, the saliency map and the Grad-CAM overlay side by side,
/// each `scale` times larger, with the prediction (and the explained class, if different)
/// written above. Returns PNG bytes.
pub fn render_explanation_png(pixels: &[u8], e: &Explanation, classes: &[String], scale: usize) -> Result<Vec<u8>> {
    render_explanation(pixels, e, classes, scale, None)?.png()
}

/// [`render_explanation_png`] as a canvas, with an optional first title line (e.g. the file).
pub fn render_explanation(
    pixels: &[u8],
    e: &Explanation,
    classes: &[String],
    scale: usize,
    heading: Option<&str>,
) -> Result<Canvas> {
    check_pixels(pixels, e, scale)?;
    let name = |k: usize| classes.get(k).cloned().unwrap_or_else(|| format!("class {k}"));
    let panel = e.side * scale;
    let (gap, margin) = (12, 14);
    let head_h = if heading.is_some() { 22 } else { 0 };
    let top = margin + head_h + 52;
    let caption_h = 40;
    let width = 3 * panel + 2 * gap + 2 * margin;
    let height = top + panel + caption_h;
    let mut c = Canvas::new(width.max(360), height, WHITE_RGB)?;
    let mid = c.width as i32 / 2;
    if let Some(h) = heading {
        let h = render::fit_text(h, 14.0, c.width as u32 - 8);
        c.text(&h, mid, margin as i32, 14.0, GRAY_RGB, Align::Center)?;
    }
    let y = (margin + head_h) as i32;
    let title = format!("predicted: {} ({})", name(e.class), percent(e.probs[e.class]));
    c.text(&title, mid, y, 20.0, DARK_RGB, Align::Center)?;
    let sub = if e.target == e.class {
        let mut order: Vec<usize> = (0..e.probs.len()).collect();
        order.sort_by(|&a, &b| e.probs[b].total_cmp(&e.probs[a]));
        let rest: Vec<String> =
            order[1..order.len().min(3)].iter().map(|&k| format!("{} {}", name(k), percent(e.probs[k]))).collect();
        if rest.is_empty() {
            "maps explain the predicted class".to_string()
        } else {
            format!("next: {}", rest.join(", "))
        }
    } else {
        format!("maps explain {} ({})", name(e.target), percent(e.probs[e.target]))
    };
    let sub = render::fit_text(&sub, 14.0, c.width as u32 - 8);
    c.text(&sub, mid, y + 28, 14.0, GRAY_RGB, Align::Center)?;

    let x0 = (c.width - (3 * panel + 2 * gap)) / 2;
    let s = e.side;
    let panels = [
        (gray_rgb(pixels), "image".to_string()),
        (colorize(&e.saliency, inferno), "saliency |d score / d pixel|".to_string()),
        (overlay(pixels, &e.gradcam, jet, OVERLAY_ALPHA), format!("Grad-CAM ({})", e.gradcam_layer)),
    ];
    for (i, (px, label)) in panels.iter().enumerate() {
        let x = x0 + i * (panel + gap);
        c.blit(x, top, px, s, s, scale);
        let label = render::fit_text(label, 13.0, (panel + gap) as u32);
        c.text(&label, (x + panel / 2) as i32, (top + panel + 6) as i32, 13.0, DARK_RGB, Align::Center)?;
    }
    // A small colour key under the Grad-CAM panel: low .. high.
    let kx = x0 + 2 * (panel + gap) + panel / 4;
    let kw = panel / 2;
    let ramp: Vec<render::Rgb> = (0..kw).map(|i| jet(i as f32 / (kw.max(2) - 1) as f32)).collect();
    for dy in 0..5 {
        c.blit(kx, top + panel + 24 + dy, &ramp, kw, 1, 1);
    }
    c.text("low", kx as i32 - 14, (top + panel + 21) as i32, 10.0, GRAY_RGB, Align::Center)?;
    c.text("high", (kx + kw) as i32 + 16, (top + panel + 21) as i32, 10.0, GRAY_RGB, Align::Center)?;
    Ok(c)
}

/// `medcnn explain`: a picture per image with its prediction, saliency and Grad-CAM.
#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// A trained model (model.safetensors from `medcnn train`).
    #[arg(long)]
    pub model: PathBuf,
    /// Image files (JPEG or PNG; converted to the model's input size and channels as for training).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Explain this class (name or index) instead of the predicted one.
    #[arg(long)]
    pub target: Option<String>,
    /// Where to write the pictures.
    #[arg(long, default_value = "outputs/explain")]
    pub out: PathBuf,
    /// Each panel (the model's input size) is drawn this many times larger.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub scale: u64,
}

/// A file name for an image's picture: `<parent>_<stem>.png` (MedNIST files are numbered
/// within each class folder, so the stem alone repeats), made unique within `taken`.
fn output_name(image: &Path, taken: &mut std::collections::HashSet<String>) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
    };
    let stem = image.file_stem().map(|s| clean(&s.to_string_lossy())).unwrap_or_else(|| "image".into());
    let parent = image.parent().and_then(|p| p.file_name()).map(|s| clean(&s.to_string_lossy()));
    let base = match parent {
        Some(p) if !p.is_empty() => format!("{p}_{stem}"),
        _ => stem,
    };
    let mut name = format!("{base}.png");
    let mut k = 2;
    while !taken.insert(name.clone()) {
        name = format!("{base}_{k}.png");
        k += 1;
    }
    name
}

/// The last two components of a path (`Hand/000001.jpeg`): enough to name a MedNIST image.
fn short_name(path: &Path) -> String {
    let parts: Vec<String> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    parts[parts.len().saturating_sub(2)..].join("/")
}

/// Image file bytes (JPEG or PNG) as a model taking `input` sees them: one gray plane for the
/// pictures (the luma of a colour image) and the normalised input (for [`explain`]).
/// `name` is for error messages.
pub fn decode_for_model(bytes: &[u8], name: &str, input: InputShape) -> Result<(Vec<u8>, Vec<f32>)> {
    let (pixels, x, _) = decode_for_model_noted(bytes, name, input)?;
    Ok((pixels, x))
}

/// [`decode_for_model`], with what decoding had to do (converted, resized).
pub fn decode_for_model_noted(
    bytes: &[u8],
    name: &str,
    input: InputShape,
) -> Result<(Vec<u8>, Vec<f32>, crate::data::DecodeNote)> {
    let (planes, x, note) = crate::evaluate::normalised_input(bytes, name, input)?;
    Ok((display_gray(&planes, input.plane()), x, note))
}

/// One gray plane to draw: the image itself, or the luma (ITU-R 601) of three planes R, G, B.
pub fn display_gray(planes: &[u8], plane: usize) -> Vec<u8> {
    if planes.len() != 3 * plane {
        return planes[..plane.min(planes.len())].to_vec();
    }
    (0..plane)
        .map(|i| {
            let (r, g, b) = (planes[i] as f32, planes[plane + i] as f32, planes[2 * plane + i] as f32);
            (0.299 * r + 0.587 * g + 0.114 * b).round().clamp(0.0, 255.0) as u8
        })
        .collect()
}

/// Reads an image file as a model taking `input` sees it: see [`decode_for_model`].
pub fn read_image(path: &Path, input: InputShape) -> Result<(Vec<u8>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading image {}", path.display()))?;
    decode_for_model(&bytes, &path.display().to_string(), input)
}

/// Runs `medcnn explain`.
pub fn run(args: &ExplainArgs) -> Result<()> {
    let saved = SavedModel::load(&args.model)?;
    let mut model = cpu_model(&saved)?;
    let target = args.target.as_deref().map(|t| parse_class(t, &saved.classes)).transpose()?;
    crate::metrics::check_output_dir(&args.out)?;
    let mut taken = std::collections::HashSet::new();
    for path in &args.images {
        let (pixels, x) = read_image(path, saved.spec.input)?;
        let e = explain(&mut model, &x, target)?;
        let picture = render_explanation(&pixels, &e, &saved.classes, args.scale as usize, Some(&short_name(path)))?;
        let out = args.out.join(output_name(path, &mut taken));
        picture.save(&out)?;
        let explained =
            if e.target == e.class { String::new() } else { format!(", explaining {}", saved.classes[e.target]) };
        println!(
            "{}: {} ({}){explained} -> {}",
            path.display(),
            saved.classes[e.class],
            percent(e.probs[e.class]),
            out.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_a_constant_is_constant_and_corners_are_kept() {
        let up = upsample_bilinear(&[2.0; 16], 4, 4, 64, 64);
        assert!(up.iter().all(|&v| (v - 2.0).abs() < 1e-6));
        let map = [1.0, 0.0, 0.0, 0.0];
        let up = upsample_bilinear(&map, 2, 2, 8, 8);
        assert_eq!(up[0], 1.0);
        assert_eq!(up[63], 0.0);
        // Pixel (2, 2) samples the 2x2 map at (0.125, 0.125): (1 - 0.125)^2 of the corner.
        assert_eq!(up[9], 1.0);
        assert!((up[18] - 0.875 * 0.875).abs() < 1e-6);
        assert!(up[27] < up[18]);
    }

    #[test]
    fn min_max_normalisation() {
        assert_eq!(normalise_min_max(&[2.0, 4.0, 3.0, f32::NAN]), vec![0.0, 1.0, 0.5, 0.0]);
        assert_eq!(normalise_min_max(&[0.0, 0.0]), vec![0.0, 0.0]);
        assert_eq!(normalise_min_max(&[5.0, 5.0]), vec![0.0, 0.0]);
        assert_eq!(normalise_min_max(&[]), Vec::<f32>::new());
    }

    #[test]
    fn gradcam_map_weights_channels_by_mean_gradient() {
        // Two channels of 1x2: alpha = (1, -1) -> cam = ReLU(A0 - A1).
        let a = from_vec(&[1, 2, 1, 2], vec![3.0f64, 1.0, 1.0, 2.0]);
        let da = from_vec(&[1, 2, 1, 2], vec![0.5f64, 1.5, -1.0, -1.0]);
        assert_eq!(gradcam_map(&a, &da), vec![2.0, 0.0]);
    }

    #[test]
    fn classes_by_name_or_index() {
        let classes: Vec<String> = ["AbdomenCT", "Hand"].iter().map(|s| s.to_string()).collect();
        assert_eq!(parse_class("Hand", &classes).unwrap(), 1);
        assert_eq!(parse_class("hand", &classes).unwrap(), 1);
        assert_eq!(parse_class("0", &classes).unwrap(), 0);
        assert!(parse_class("2", &classes).is_err());
        assert!(parse_class("Foot", &classes).unwrap_err().to_string().contains("AbdomenCT, Hand"));
    }

    #[test]
    fn percentages_never_round_to_certainty() {
        assert_eq!(percent(0.973), "97.3%");
        assert_eq!(percent(0.99971), "99.97%");
        assert_eq!(percent(0.999999), ">99.99%");
        assert_eq!(percent(0.00001), "<0.1%");
        assert_eq!(percent(1.0), "100.0%");
        assert_eq!(percent(0.0), "0.0%");
    }

    #[test]
    fn output_names_are_unique() {
        let mut taken = std::collections::HashSet::new();
        assert_eq!(output_name(Path::new("MedNIST/Hand/000001.jpeg"), &mut taken), "Hand_000001.png");
        assert_eq!(output_name(Path::new("x/Hand/000001.jpeg"), &mut taken), "Hand_000001_2.png");
        assert_eq!(output_name(Path::new("a b.png"), &mut taken), "a_b.png");
    }
}
