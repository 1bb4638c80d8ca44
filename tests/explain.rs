//! Tests of `medcnn::explain` and `medcnn::inspect`:
//! 1. the input gradient behind the saliency map is the true derivative of the target logit,
//!    checked against central finite differences (f64, tight), and the f32 path used by the
//!    command agrees with it;
//! 2. Grad-CAM points at the evidence: on a synthetic task where only one region R of the
//!    image decides the class, a model trained here highlights R;
//! 3. `medcnn explain` and `medcnn inspect` run end to end on a tiny model trained by the
//!    binary itself, and write readable, non-blank PNGs.
//!
//! Run `cargo test --release --test explain -- --nocapture` to see the numbers.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Lcg;
use medcnn::backend::{AdamConfig, Backend, CpuBackend};
use medcnn::explain::{
    backprop_target, explain, heatmap_overlay_png, model_from_weights, normalise_quantile, render_explanation_png,
    SALIENCY_QUANTILE,
};
use medcnn::layers::Ctx;
use medcnn::model::{reference_model, ModelConfig, Sequential};
use medcnn::tensor::{from_vec, slice};

const SIDE: usize = 64;

/// The logit of `target` for one image, in evaluation mode.
fn logit(model: &mut Sequential<f64>, x: &[f64], target: usize) -> f64 {
    let y = model.forward(&from_vec(&[1, 1, SIDE, SIDE], x.to_vec()), Ctx::eval());
    slice(&y)[target]
}

/// Central difference of the target logit for pixel `i`. The network is piecewise linear, so
/// away from a kink (a ReLU changing sign, a max-pool changing its winner) the quotient is
/// exact up to rounding (about 1e-16 |logit| / h); a step that crosses a kink shows up as
/// unequal one-sided slopes, and h shrinks.
fn finite_difference(model: &mut Sequential<f64>, x: &[f64], target: usize, i: usize, scale: f64) -> f64 {
    let l0 = logit(model, x, target);
    let mut h = 1e-3;
    loop {
        let mut xp = x.to_vec();
        xp[i] += h;
        let mut xm = x.to_vec();
        xm[i] -= h;
        let (lp, lm) = (logit(model, &xp, target), logit(model, &xm, target));
        let (right, left) = ((lp - l0) / h, (l0 - lm) / h);
        if (right - left).abs() <= 1e-7 * scale || h < 1e-7 {
            return (lp - lm) / (2.0 * h);
        }
        h /= 10.0;
    }
}

#[test]
fn saliency_gradient_matches_finite_differences() {
    let cfg = ModelConfig::default();
    let mut model = reference_model::<f64>(&cfg, 7);
    let mut rng = Lcg(11);
    let x: Vec<f64> = (0..SIDE * SIDE).map(|_| rng.sym()).collect();

    for target in [None, Some(4)] {
        let b = backprop_target(&mut model, &x, target).unwrap();
        let t = b.target;
        let g = &b.input_grad;
        assert_eq!(g.len(), SIDE * SIDE);
        let gmax = g.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(gmax > 0.0, "the input gradient is all zero");

        // The pixels with the largest gradients, and random ones.
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        let mut pixels: Vec<usize> = order[..12].to_vec();
        pixels.extend((0..36).map(|_| rng.below(SIDE * SIDE)));

        let mut worst = 0.0f64;
        for &i in &pixels {
            let numeric = finite_difference(&mut model, &x, t, i, gmax);
            // Relative to the larger of the two, with the largest gradient as a floor: pixels
            // whose gradient is 1e-6 of the largest are compared to 1e-12 absolute.
            let err = (g[i] - numeric).abs() / (g[i].abs().max(numeric.abs()) + 1e-6 * gmax);
            worst = worst.max(err);
            assert!(
                err <= 1e-6,
                "target {t}, pixel {i}: analytic {} vs finite difference {numeric} (rel. error {err:.2e})",
                g[i]
            );
        }
        println!("target {t}: {} pixels, max relative error {worst:.2e}, max |gradient| {gmax:.3e}", pixels.len());
    }

    // The f32 model that `medcnn explain` runs, with the same weights, gives the same gradient
    // (to f32 rounding), and the saliency map is that gradient's magnitude, normalised.
    let weights = model.export_weights();
    let mut m32: Sequential<f32> = model_from_weights(&cfg, &weights).unwrap();
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let x64: Vec<f64> = x32.iter().map(|&v| v as f64).collect();
    let mut m64: Sequential<f64> = model_from_weights(&cfg, &weights).unwrap();
    let g64 = backprop_target(&mut m64, &x64, Some(2)).unwrap().input_grad;
    let g32 = backprop_target(&mut m32, &x32, Some(2)).unwrap().input_grad;
    let gmax = g64.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let err = g32.iter().zip(&g64).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max) / gmax;
    assert!(err < 1e-4, "f32 and f64 input gradients differ by {err:.2e} of the largest");

    let e = explain(&mut m32, &x32, Some(2)).unwrap();
    let abs: Vec<f32> = g32.iter().map(|v| v.abs()).collect();
    assert_eq!(e.saliency, normalise_quantile(&abs, SALIENCY_QUANTILE));
    assert_eq!(e.target, 2);
    assert!(e.saliency.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!((e.probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    // Explaining leaves no parameter gradients behind.
    assert!(m32.params_mut().iter().all(|p| p.grad.iter().all(|&g| g == 0.0)));
}

/// The region R that decides the class in the synthetic task: rows 8..28, columns 36..56.
const R_ROWS: std::ops::Range<usize> = 8..28;
const R_COLS: std::ops::Range<usize> = 36..56;

fn in_region(i: usize) -> bool {
    R_ROWS.contains(&(i / SIDE)) && R_COLS.contains(&(i % SIDE))
}

/// Class 1: dark noise everywhere, plus a bright textured patch in R. Class 0: the noise only.
fn synthetic_image(rng: &mut Lcg, class: usize) -> Vec<f32> {
    (0..SIDE * SIDE)
        .map(|i| {
            let noise = rng.sym();
            if class == 1 && in_region(i) {
                (0.5 + 0.5 * noise) as f32
            } else {
                (-0.6 + 0.4 * noise) as f32
            }
        })
        .collect()
}

#[test]
fn gradcam_highlights_the_region_that_decides_the_class() {
    let cfg = ModelConfig { num_classes: 2, ..ModelConfig::default() };
    let mut backend = CpuBackend::new(&cfg, 3, AdamConfig { lr: 1e-3, weight_decay: 0.0 });
    let mut rng = Lcg(5);
    let n = 128;
    let labels: Vec<usize> = (0..n).map(|i| i % 2).collect();
    let images: Vec<f32> = labels.iter().flat_map(|&c| synthetic_image(&mut rng, c)).collect();
    let batch = 32;
    let t0 = std::time::Instant::now();
    for step in 0..20u64 {
        let k = (step as usize * batch) % n;
        backend
            .train_step(&images[k * SIDE * SIDE..(k + batch) * SIDE * SIDE], &labels[k..k + batch], 1e-3, step)
            .unwrap();
    }
    let stats = backend.take_train_stats().unwrap();
    println!(
        "trained 20 steps in {:.1} s: mean loss {:.3}, accuracy {:.2}",
        t0.elapsed().as_secs_f64(),
        stats.loss_sum / stats.images as f64,
        stats.correct as f64 / stats.images as f64
    );

    let mut model: Sequential<f32> = model_from_weights(&cfg, &backend.export_weights().unwrap()).unwrap();
    let inside_n = R_ROWS.len() * R_COLS.len();
    let mut ratios = Vec::new();
    for _ in 0..6 {
        let x = synthetic_image(&mut rng, 1);
        let e = explain(&mut model, &x, None).unwrap();
        assert_eq!(e.class, 1, "the model does not recognise a patch image (p = {:?})", e.probs);
        assert_eq!(e.gradcam_layer, "conv_block.10");
        assert_eq!(e.gradcam_shape, (4, 4));
        let mean = |map: &[f32], inside: bool| -> f64 {
            let v: Vec<f64> =
                map.iter().enumerate().filter(|(i, _)| in_region(*i) == inside).map(|(_, &c)| c as f64).collect();
            v.iter().sum::<f64>() / v.len() as f64
        };
        let (cam_in, cam_out) = (mean(&e.gradcam, true), mean(&e.gradcam, false));
        let (sal_in, sal_out) = (mean(&e.saliency, true), mean(&e.saliency, false));
        let share = e.gradcam.iter().enumerate().filter(|(i, _)| in_region(*i)).map(|(_, &c)| c as f64).sum::<f64>()
            / e.gradcam.iter().map(|&c| c as f64).sum::<f64>();
        println!(
            "p(patch) {:.3}: Grad-CAM mean inside R {cam_in:.3}, outside {cam_out:.3}, share of mass in R {share:.2} (R is {:.2} of the image); saliency inside {sal_in:.3}, outside {sal_out:.3}",
            e.probs[1],
            inside_n as f64 / (SIDE * SIDE) as f64
        );
        ratios.push(cam_in / cam_out.max(1e-6));
        // The Grad-CAM maximum lies in R or next to it (within the 16-pixel cell of the 4x4 map).
        let top = (0..e.gradcam.len()).fold(0, |b, i| if e.gradcam[i] > e.gradcam[b] { i } else { b });
        let (r, c) = (top / SIDE, top % SIDE);
        assert!(
            (R_ROWS.start.saturating_sub(16)..R_ROWS.end + 16).contains(&r)
                && (R_COLS.start.saturating_sub(16)..R_COLS.end + 16).contains(&c),
            "the Grad-CAM maximum is at ({r}, {c}), far from R"
        );
        assert!(sal_in > 2.0 * sal_out, "saliency inside R {sal_in:.3} is not well above outside {sal_out:.3}");
    }
    for r in &ratios {
        assert!(*r > 2.0, "Grad-CAM inside R is only {r:.2}x the mean outside (all: {ratios:?})");
    }
}

// ---------------------------------------------------------------------------------------
// The commands, end to end
// ---------------------------------------------------------------------------------------

/// A fresh directory under Cargo's per-target scratch directory.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("explain-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two classes of 64x64 gray PNGs: "Bright" has a light square, "Dark" a dark disc.
fn make_dataset(root: &Path, per_class: usize) {
    let mut rng = Lcg(9);
    for (c, class) in ["Bright", "Dark"].iter().enumerate() {
        let dir = root.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            let (ox, oy) = (8 + rng.below(24) as i32, 8 + rng.below(24) as i32);
            let img = image::GrayImage::from_fn(SIDE as u32, SIDE as u32, |x, y| {
                let (dx, dy) = (x as i32 - ox - 12, y as i32 - oy - 12);
                let inside = if c == 0 { dx.abs() < 12 && dy.abs() < 12 } else { dx * dx + dy * dy < 144 };
                let base = if c == 0 { 220.0 } else { 30.0 };
                let v = if inside { base } else { 110.0 } + 20.0 * rng.sym();
                image::Luma([v.clamp(0.0, 255.0) as u8])
            });
            img.save(dir.join(format!("{i:04}.png"))).unwrap();
        }
    }
}

fn medcnn(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_medcnn")).args(args).output().expect("running medcnn");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "medcnn {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Opens a PNG, checks its size is at least `min` and that it is not one flat colour.
fn check_png(path: &Path, min: (u32, u32)) -> image::RgbImage {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    let (w, h) = img.dimensions();
    assert!(w >= min.0 && h >= min.1, "{} is only {w}x{h}", path.display());
    let first = img.get_pixel(0, 0);
    assert!(img.pixels().any(|p| p != first), "{} is one flat colour", path.display());
    img
}

#[test]
fn explain_and_inspect_commands_write_pictures() {
    let dir = scratch("e2e");
    let data = dir.join("data");
    make_dataset(&data, 20);
    let model_dir = dir.join("model");
    let (d, m) = (data.to_str().unwrap(), model_dir.to_str().unwrap());
    medcnn(&["train", "--data", d, "--out", m, "--epochs", "1", "--batch-size", "8"]);
    let model = model_dir.join("model.safetensors");
    let model_s = model.to_str().unwrap();

    // explain: one picture per image, named after its folder and file.
    let out = dir.join("explain");
    let (img_a, img_b) = (data.join("Bright/0001.png"), data.join("Dark/0001.png"));
    let stdout = medcnn(&[
        "explain",
        "--model",
        model_s,
        img_a.to_str().unwrap(),
        img_b.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--scale",
        "2",
    ]);
    println!("{stdout}");
    for name in ["Bright_0001.png", "Dark_0001.png"] {
        check_png(&out.join(name), (3 * 128, 128));
    }
    assert!(stdout.contains("Bright_0001.png") && stdout.contains("Dark_0001.png"));
    // --target by name, and an unknown class is an error naming the classes.
    medcnn(&[
        "explain",
        "--model",
        model_s,
        img_a.to_str().unwrap(),
        "--target",
        "Dark",
        "--out",
        out.to_str().unwrap(),
    ]);
    let bad = Command::new(env!("CARGO_BIN_EXE_medcnn"))
        .args(["explain", "--model", model_s, img_a.to_str().unwrap(), "--target", "Nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("Bright, Dark"));

    // inspect: filters, feature maps of every conv layer, mistakes of the test split.
    let out = dir.join("inspect");
    let stdout =
        medcnn(&["inspect", "--model", model_s, "--data", d, "--out", out.to_str().unwrap(), "--split", "all"]);
    println!("{stdout}");
    check_png(&out.join("filters.png"), (200, 100));
    check_png(&out.join("feature_maps.png"), (400, 300));
    for layer in ["1", "4", "7", "10"] {
        check_png(&out.join(format!("features_conv_block_{layer}.png")), (100, 100));
    }
    check_png(&out.join("least_confident.png"), (200, 100));
    let csv = std::fs::read_to_string(out.join("mistakes.csv")).unwrap();
    assert!(csv.starts_with("file,true,predicted,p_predicted,p_true\n"));
    // mistakes.png exists exactly when the model got something wrong.
    assert_eq!(out.join("mistakes.png").exists(), csv.lines().count() > 1);

    // The model's own test split, and feature maps of a given image without data.
    let out2 = dir.join("inspect2");
    medcnn(&["inspect", "--model", model_s, "--data", d, "--out", out2.to_str().unwrap()]);
    check_png(&out2.join("least_confident.png"), (100, 100));
    let out3 = dir.join("inspect3");
    medcnn(&["inspect", "--model", model_s, "--image", img_b.to_str().unwrap(), "--out", out3.to_str().unwrap()]);
    check_png(&out3.join("feature_maps.png"), (400, 300));
    assert!(!out3.join("least_confident.png").exists());
}

#[test]
fn pictures_as_png_bytes_for_the_web_api() {
    let cfg = ModelConfig::default();
    let mut model = reference_model::<f32>(&cfg, 1);
    let pixels: Vec<u8> = (0..SIDE * SIDE).map(|i| ((i % SIDE) * 4) as u8).collect();
    let x: Vec<f32> = pixels.iter().map(|&p| p as f32 / 127.5 - 1.0).collect();
    let e = explain(&mut model, &x, None).unwrap();
    assert_eq!((e.saliency.len(), e.gradcam.len()), (SIDE * SIDE, SIDE * SIDE));
    let classes: Vec<String> = (0..6).map(|k| format!("C{k}")).collect();

    let png = render_explanation_png(&pixels, &e, &classes, 3).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert!(img.width() >= 3 * 192 && img.height() >= 192);

    let png = heatmap_overlay_png(&pixels, &e.gradcam, 2).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (128, 128));

    assert!(heatmap_overlay_png(&pixels, &e.gradcam[..10], 2).is_err());
    assert!(render_explanation_png(&pixels[..100], &e, &classes, 3).is_err());
    assert!(explain(&mut model, &x[..100], None).is_err());
    assert!(explain(&mut model, &x, Some(6)).is_err());
}
