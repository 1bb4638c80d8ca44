//! Networks built from model specs, checked as a whole: finite-difference gradient checks of
//! every input and parameter element (f64, <= 1e-6) for fixed specs and for seeded random specs
//! that cover every layer and argument of the spec language; the fused CPU path (Conv2d + ReLU +
//! MaxPool2d as one `ConvReluPool`) against the layer-by-layer network; parse/print round trips;
//! and the shapes the spec promises against the layers it builds.
//!
//! The loss is L = sum(w * logits) with fixed non-uniform w, as in `gradcheck.rs`; every layer of
//! a spec is piecewise linear, so away from a kink the central difference is exact and the
//! checker shrinks its step when it straddles one. Gradients are prefilled with random values
//! before `backward`, so a layer that overwrites (`=`) instead of accumulating (`+=`) fails.
//!
//! Run `cargo test --release --test spec_models -- --nocapture` for the table.

mod common;

use common::Lcg;
use medcnn::data::InputShape;
use medcnn::layers::Ctx;
use medcnn::model::{LayerKind, Sequential};
use medcnn::spec::{BuildOptions, Hw, LayerSpec, ModelSpec, PoolSpec};
use medcnn::tensor::{from_vec, slice, Tensor};

const TOLERANCE: f64 = 1e-6;

fn spec(arch: &str, channels: usize, size: usize) -> ModelSpec {
    ModelSpec::parse(arch, InputShape::new(channels, size).unwrap(), 0.4).unwrap()
}

/// The fixed specs the issue names: stride 2 with padding, 5x5, rectangular kernels, ceil mode,
/// 3 channels, no pooling at all, average pooling with padding.
fn fixed_specs() -> Vec<ModelSpec> {
    vec![
        spec("Conv2d(3, 3, stride=2, padding=1) ReLU Conv2d(4, 3, stride=2, padding=1) ReLU Flatten Linear", 1, 11),
        spec("Conv2d(3, 5, padding=2) ReLU MaxPool2d(2) Conv2d(4, 5) ReLU AdaptiveAvgPool2d(1) Flatten Linear", 1, 12),
        spec("Conv2d(3, (3, 5), stride=(1, 2), padding=(1, 2)) ReLU MaxPool2d((2, 3), stride=(2, 1)) Flatten Linear(5) ReLU Linear", 1, 10),
        spec("Conv2d(3, 3) ReLU MaxPool2d(3, stride=2, padding=1, ceil_mode=True) Conv2d(4, 2) ReLU AvgPool2d(2, ceil_mode=True) Flatten Linear", 1, 13),
        spec("Conv2d(4, 3, padding=1) ReLU MaxPool2d(2) Conv2d(4, 3) ReLU AdaptiveAvgPool2d(1) Flatten Linear", 3, 10),
        spec("Conv2d(3, 3) ReLU Conv2d(3, 3, stride=2) ReLU Flatten Linear(6) ReLU Dropout(p=0.3) Linear", 1, 11),
        spec("Conv2d(3, 3) ReLU AvgPool2d(3, stride=2, padding=1, ceil_mode=True) Flatten Linear", 3, 9),
        spec("Flatten Linear(7) ReLU Linear", 1, 6),
    ]
}

fn pick<T: Copy>(rng: &mut Lcg, xs: &[T]) -> T {
    xs[rng.below(xs.len())]
}

/// A seeded random spec drawn from every layer and argument kind; retried until it fits.
fn random_spec(seed: u64) -> ModelSpec {
    let mut rng = Lcg(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    loop {
        let input = InputShape::new(pick(&mut rng, &[1, 3]), 8 + rng.below(9)).unwrap();
        let mut layers = Vec::new();
        for _ in 0..1 + rng.below(2) {
            let kernel =
                pick(&mut rng, &[Hw::square(1), Hw::square(2), Hw::square(3), Hw { h: 2, w: 3 }, Hw { h: 3, w: 1 }]);
            let stride = pick(&mut rng, &[Hw::square(1), Hw::square(1), Hw::square(2), Hw { h: 1, w: 2 }]);
            let padding = pick(&mut rng, &[Hw::square(0), Hw::square(1), Hw { h: 1, w: 0 }]);
            layers.push(LayerSpec::Conv2d { out_channels: 2 + rng.below(3), kernel, stride, padding });
            if rng.next() < 0.8 {
                layers.push(LayerSpec::Relu);
            }
            if rng.next() < 0.7 {
                let kernel = pick(&mut rng, &[Hw::square(2), Hw::square(3), Hw { h: 2, w: 3 }]);
                let stride = pick(&mut rng, &[None, Some(Hw::square(1)), Some(Hw::square(2)), Some(Hw { h: 2, w: 1 })]);
                let padding = if rng.next() < 0.4 { Hw::square(1) } else { Hw::square(0) };
                let p = PoolSpec::new(kernel, stride, padding, rng.next() < 0.5);
                layers.push(if rng.next() < 0.5 { LayerSpec::MaxPool2d(p) } else { LayerSpec::AvgPool2d(p) });
            }
        }
        if rng.next() < 0.5 {
            layers.push(LayerSpec::AdaptiveAvgPool2d);
        }
        layers.push(LayerSpec::Flatten);
        if rng.next() < 0.5 {
            layers.push(LayerSpec::Linear { out_features: Some(3 + rng.below(4)) });
            layers.push(LayerSpec::Relu);
            if rng.next() < 0.5 {
                layers.push(LayerSpec::Dropout { p: pick(&mut rng, &[0.25, 0.5]) });
            }
        }
        layers.push(LayerSpec::Linear { out_features: None });
        let s = ModelSpec { input, layers, reference: false };
        if s.check().is_ok() {
            return s;
        }
    }
}

const RANDOM_SPECS: u64 = 14;

/// Loss weights in +-[0.5, 1.5).
fn loss_weights(rng: &mut Lcg, n: usize) -> Vec<f64> {
    (0..n).map(|_| (0.5 + rng.next()) * if rng.next() < 0.5 { -1.0 } else { 1.0 }).collect()
}

fn weighted(w: &[f64], y: &Tensor<f64>) -> f64 {
    w.iter().zip(slice(y)).map(|(a, b)| a * b).sum()
}

#[derive(Clone, Copy)]
enum Target {
    Input(usize),
    Param(usize, usize),
}

fn loss_moved(m: &mut Sequential<f64>, x: &Tensor<f64>, w: &[f64], ctx: Ctx, t: Target, delta: f64) -> f64 {
    match t {
        Target::Input(i) => {
            let mut xm = x.clone();
            xm.as_slice_mut().unwrap()[i] += delta;
            weighted(w, &m.forward(&xm, ctx))
        }
        Target::Param(p, i) => {
            let old = m.params_mut()[p].value.as_slice().unwrap()[i];
            m.params_mut()[p].value.as_slice_mut().unwrap()[i] = old + delta;
            let l = weighted(w, &m.forward(x, ctx));
            m.params_mut()[p].value.as_slice_mut().unwrap()[i] = old;
            l
        }
    }
}

/// The central difference for one element, shrinking the step past kinks.
fn numeric(m: &mut Sequential<f64>, x: &Tensor<f64>, w: &[f64], ctx: Ctx, t: Target) -> f64 {
    let l0 = weighted(w, &m.forward(x, ctx));
    let mut h = 1e-3;
    loop {
        let (up, down) = (loss_moved(m, x, w, ctx, t, h) - l0, l0 - loss_moved(m, x, w, ctx, t, -h));
        if (up - down).abs() <= 1e-9 * up.abs().max(down.abs()) + 1e-14 || h < 1e-8 {
            return (up + down) / (2.0 * h);
        }
        h /= 10.0;
    }
}

fn rel_err(a: f64, n: f64) -> f64 {
    let scale = a.abs().max(n.abs());
    if scale < 1e-12 {
        0.0
    } else {
        (a - n).abs() / scale
    }
}

/// Checks every element of dx and every parameter gradient of the network; returns the worst
/// relative error and the number of elements checked.
fn gradcheck(s: &ModelSpec, opts: BuildOptions, seed: u64) -> (f64, usize) {
    let classes = 3;
    let mut m = s.build::<f64>(classes, opts, seed).unwrap();
    let mut rng = Lcg(seed ^ 0x5EED);
    let [c, h, w] = s.input.chw();
    let x = rng.distinct(&[2, c, h, w]);
    let ctx = Ctx::train(5);
    let y = m.forward(&x, ctx);
    let lw = loss_weights(&mut rng, y.len());
    // Prefill: backward must add to what is there.
    let prefill: Vec<Vec<f64>> = m
        .params_mut()
        .into_iter()
        .map(|p| {
            let v: Vec<f64> = (0..p.grad.len()).map(|_| rng.sym()).collect();
            p.grad.as_slice_mut().unwrap().copy_from_slice(&v);
            v
        })
        .collect();
    let dx = m.backward(&from_vec(y.shape(), lw.clone()));
    let grads: Vec<Vec<f64>> = m
        .params_mut()
        .into_iter()
        .zip(&prefill)
        .map(|(p, pre)| p.grad.as_slice().unwrap().iter().zip(pre).map(|(g, q)| g - q).collect())
        .collect();
    let (mut worst, mut count) = (0.0f64, 0);
    for (i, &a) in slice(&dx).iter().enumerate() {
        worst = worst.max(rel_err(a, numeric(&mut m, &x, &lw, ctx, Target::Input(i))));
        count += 1;
    }
    for (p, g) in grads.iter().enumerate() {
        for (i, &a) in g.iter().enumerate() {
            worst = worst.max(rel_err(a, numeric(&mut m, &x, &lw, ctx, Target::Param(p, i))));
            count += 1;
        }
    }
    (worst, count)
}

#[test]
fn fixed_spec_networks_match_finite_differences() {
    let mut failures = Vec::new();
    for (k, s) in fixed_specs().iter().enumerate() {
        for fused in [false, true] {
            let (err, n) = gradcheck(s, BuildOptions { fused, gemm_only: false }, 10 + k as u64);
            println!("{err:9.2e} {n:6} elements  fused={fused:<5} {} on {}", s.arch_text(), s.input);
            if err > TOLERANCE {
                failures.push(format!("{} (fused={fused}): {err:.3e}", s.arch_text()));
            }
        }
    }
    assert!(failures.is_empty(), "gradient checks failed:\n{}", failures.join("\n"));
}

#[test]
fn random_spec_networks_match_finite_differences() {
    let mut failures = Vec::new();
    for seed in 0..RANDOM_SPECS {
        let s = random_spec(seed);
        let (err, n) = gradcheck(&s, BuildOptions::default(), seed);
        println!("{err:9.2e} {n:6} elements  {} on {}", s.arch_text(), s.input);
        if err > TOLERANCE {
            failures.push(format!("seed {seed}: {} on {}: {err:.3e}", s.arch_text(), s.input));
        }
    }
    assert!(failures.is_empty(), "gradient checks failed:\n{}", failures.join("\n"));
}

/// The random specs exercise every layer and every argument form (int and pair, padding, ceil
/// mode), so the gradient checks above cover the language, not a corner of it.
#[test]
fn random_specs_cover_every_layer_and_argument() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..RANDOM_SPECS {
        let s = random_spec(seed);
        seen.insert(format!("channels{}", s.input.channels));
        for l in &s.layers {
            let kind = match l {
                LayerSpec::Conv2d { kernel, stride, padding, .. } => {
                    seen.insert(format!("conv kernel pair {}", !kernel.is_square()));
                    seen.insert(format!("conv stride {}", stride.h.max(stride.w) > 1));
                    seen.insert(format!("conv padding {}", padding.h + padding.w > 0));
                    "Conv2d"
                }
                LayerSpec::MaxPool2d(p) | LayerSpec::AvgPool2d(p) => {
                    let which = if matches!(l, LayerSpec::MaxPool2d(_)) { "max" } else { "avg" };
                    seen.insert(format!("{which} ceil {}", p.ceil_mode));
                    seen.insert(format!("{which} padding {}", p.padding.h > 0));
                    seen.insert(format!("{which} kernel pair {}", !p.kernel.is_square()));
                    which
                }
                LayerSpec::AdaptiveAvgPool2d => "global",
                LayerSpec::Relu => "relu",
                LayerSpec::Dropout { .. } => "dropout",
                LayerSpec::Flatten => "flatten",
                LayerSpec::Linear { out_features: Some(_) } => "linear sized",
                LayerSpec::Linear { out_features: None } => "linear lazy",
            };
            seen.insert(kind.to_string());
        }
    }
    let want = [
        "channels1",
        "channels3",
        "Conv2d",
        "max",
        "avg",
        "global",
        "relu",
        "dropout",
        "flatten",
        "linear sized",
        "linear lazy",
        "conv kernel pair true",
        "conv stride true",
        "conv padding true",
        "max ceil true",
        "max padding true",
        "avg ceil true",
        "avg padding true",
        "max kernel pair true",
        "avg kernel pair true",
    ];
    let missing: Vec<&str> = want.iter().copied().filter(|w| !seen.contains(*w)).collect();
    assert!(missing.is_empty(), "the random specs never use: {missing:?}");
}

/// Forward, dx and every parameter gradient of the fused build (conv + ReLU + max-pool blocks,
/// convs with their ReLU fused in) against the layer-by-layer one from the same seed, in f64 (different summation orders: within 1e-10 relative) and in f32 as
/// the CPU backend trains (direct and Winograd paths where they apply: within 1e-4 of the
/// largest value, the f32 rounding of sums over up to a few hundred terms).
#[test]
fn fused_and_layer_by_layer_networks_agree() {
    let mut specs = fixed_specs();
    specs.extend((0..RANDOM_SPECS).map(random_spec));
    specs.push(ModelSpec::reference(InputShape::new(1, 48).unwrap(), 0.4));
    specs.push(ModelSpec::reference(InputShape::new(3, 50).unwrap(), 0.4));
    let (mut fused_blocks, mut fused_relus) = (0, 0);
    for (k, s) in specs.iter().enumerate() {
        let seed = 100 + k as u64;
        let mut plain = s.build::<f64>(3, BuildOptions::default(), seed).unwrap();
        let mut fused = s.build::<f64>(3, BuildOptions { fused: true, gemm_only: false }, seed).unwrap();
        fused_blocks += fused.find(LayerKind::ConvReluPool).len();
        fused_relus += fused.layers.iter().filter(|l| l.layer.describe().ends_with(") + ReLU")).count();
        let [c, h, w] = s.input.chw();
        let mut rng = Lcg(seed);
        let x = rng.distinct(&[3, c, h, w]);
        let ctx = Ctx::train(3);
        let (ya, yb) = (plain.forward(&x, ctx), fused.forward(&x, ctx));
        let dy = from_vec(ya.shape(), loss_weights(&mut rng, ya.len()));
        let (dxa, dxb) = (plain.backward(&dy), fused.backward(&dy));
        let close = |a: &[f64], b: &[f64], what: &str| {
            let scale = a.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= 1e-10 * scale, "{} {what}[{i}]: {p} vs {q}", s.arch_text());
            }
        };
        close(slice(&ya), slice(&yb), "y");
        // The layer-by-layer build computes the images' gradient (explain's saliency needs it);
        // the training build's first conv (fused block or plain) does not (nobody needs it).
        assert_eq!(dxa.len(), x.len(), "{}: the plain build's dx", s.arch_text());
        if matches!(fused.layers[0].kind, LayerKind::ConvReluPool | LayerKind::Conv2d) {
            assert_eq!(dxb.len(), 0, "{}: the training build's first conv computed dx", s.arch_text());
        } else {
            close(slice(&dxa), slice(&dxb), "dx");
        }
        for ((n, pa), (_, pb)) in plain.named_params().iter().zip(fused.named_params().iter()) {
            close(slice(&pa.grad), slice(&pb.grad), n);
        }

        // f32, as trained.
        let mut p32 = s.build::<f32>(3, BuildOptions::default(), seed).unwrap();
        let mut f32m = s.build::<f32>(3, BuildOptions { fused: true, gemm_only: false }, seed).unwrap();
        let x32 = from_vec(x.shape(), slice(&x).iter().map(|&v| v as f32).collect());
        let (a, b) = (p32.forward(&x32, Ctx::eval()), f32m.forward(&x32, Ctx::eval()));
        let scale = slice(&a).iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        for (p, q) in slice(&a).iter().zip(slice(&b)) {
            assert!((p - q).abs() <= 1e-4 * scale, "{} f32 logits: {p} vs {q}", s.arch_text());
        }
    }
    assert!(fused_blocks >= 10, "only {fused_blocks} fused blocks were compared");
    assert!(fused_relus >= 5, "only {fused_relus} convs with a fused ReLU were compared");
}

/// `arch_text` parses back to the same spec, and the shapes `resolve` promises are those of the
/// layers `build` makes (and of the tensors they hold).
#[test]
fn specs_print_parse_and_build_as_promised() {
    let mut specs = fixed_specs();
    specs.extend((0..RANDOM_SPECS).map(random_spec));
    specs.push(ModelSpec::reference(InputShape::default(), 0.25));
    for s in &specs {
        let text = s.arch_text();
        let back = ModelSpec::parse(&text, s.input, s.reference_dropout().unwrap_or(0.4)).unwrap();
        assert_eq!(&back, s, "{text}");
        let infos = s.resolve(5).unwrap();
        let m = s.build::<f32>(5, BuildOptions::default(), 1).unwrap();
        let mut shape = vec![2, s.input.channels, s.input.size, s.input.size];
        for (l, info) in m.layers.iter().zip(&infos) {
            shape = l.layer.output_shape(&shape);
            assert_eq!(shape[1..], info.output[..], "{text}: layer {}", l.name);
        }
        let built: Vec<(String, Vec<usize>)> =
            m.named_params().into_iter().map(|(n, p)| (n, p.value.shape().to_vec())).collect();
        assert_eq!(built, s.weight_shapes(5).unwrap(), "{text}");
        assert_eq!(s.param_names(), built.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        let conv_flops: u64 = m
            .layers
            .iter()
            .zip(std::iter::once(s.input.chw().to_vec()).chain(infos.iter().map(|i| i.output.clone())))
            .map(|(l, input)| {
                let mut with_batch = vec![1];
                with_batch.extend(input);
                l.layer.flops(&with_batch)
            })
            .sum();
        assert_eq!(conv_flops, infos.iter().map(|i| i.flops).sum::<u64>(), "{text}: FLOPs");
    }
}
