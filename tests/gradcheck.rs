//! Gradient checks: every layer's hand-written backward pass against central finite differences,
//! in f64, on small odd shapes.
//!
//! How to read it. For a layer y = f(x; W, b) we fix random, non-uniform weights w of y's shape
//! and check the scalar loss L = sum(w * y). Its gradient with respect to y is w, so
//! `backward(w)` must return dL/dx and accumulate dL/dW, dL/db. Finite differences give the same
//! numbers independently, one element at a time:
//!
//!   dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h
//!
//! (L+ - L-) is summed as sum(w * (y+ - y-)), so outputs the element does not touch cancel
//! exactly. Every layer here except the cross-entropy is piecewise linear (conv, linear, pools,
//! ReLU, dropout with a fixed mask): away from a kink the difference quotient is exact for any h,
//! so a large h keeps rounding tiny. A step that crosses a kink (a ReLU changing sign, a max-pool
//! changing its winner) shows up as (L+ - L0) != (L0 - L-); the checker then shrinks h.
//!
//! Gradients accumulate: `backward` must *add* dL/dW and dL/db to `Param::grad` (the contract in
//! `layers/mod.rs`). So every parameter gradient is filled with seeded random values before
//! `backward`, and `grad - prefill` is what is compared with the finite differences; a backward
//! that writes `grad = ...` instead of `grad += ...` fails, and a test makes sure it does.
//!
//! The relative error of an element is |analytic - numeric| / max(|analytic|, |numeric|, 1e-8)
//! (the floor, `ZERO_FLOOR`, for elements whose exact gradient is 0, where a Winograd backward
//! leaves rounding noise of ~1e-16). Each layer's maximum over every element of dx, dW and db
//! must be <= 1e-6.
//!
//! Run `cargo test --release --test gradcheck -- --nocapture` to see the table.

mod common;

use common::grad::{check, max_err, row, Worst, TOLERANCE};
use common::Lcg;
use medcnn::layers::{
    AvgPool2d, Conv2d, ConvReluPool, Ctx, Dropout, Flatten, GlobalAvgPool2d, Layer, Linear, MaxPool2d, Relu,
    SoftmaxCrossEntropy,
};
use medcnn::model::{reference_model, ModelConfig, Sequential};
use medcnn::tensor::Tensor;

/// A Sequential is a layer too, for the whole-model check.
struct Whole(Sequential<f64>);
impl Layer<f64> for Whole {
    fn describe(&self) -> String {
        "reference model".into()
    }
    fn forward(&mut self, x: &Tensor<f64>, ctx: Ctx) -> Tensor<f64> {
        self.0.forward(x, ctx)
    }
    fn backward(&mut self, dy: &Tensor<f64>) -> Tensor<f64> {
        self.0.backward(dy)
    }
    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        self.0.shapes(s).last().unwrap().clone()
    }
    fn params(&self) -> Vec<&medcnn::layers::Param<f64>> {
        self.0.named_params().into_iter().map(|(_, p)| p).collect()
    }
    fn params_mut(&mut self) -> Vec<&mut medcnn::layers::Param<f64>> {
        self.0.params_mut()
    }
}

#[test]
fn every_layer_matches_finite_differences() {
    let mut rng = Lcg(42);
    let train = Ctx::train(7);
    let mut conv_s1 = Conv2d::<f64>::new(3, 4, (3, 3), 1, 0);
    let mut conv_s2 = Conv2d::<f64>::new(2, 3, (3, 2), 2, 1);
    let mut conv_1x1 = Conv2d::<f64>::new(3, 2, (1, 1), 1, 0);
    // A 10x10 output plane (L = 100): 3 images per GEMM, so a thread's 4 images are a group of
    // 3 and a group of 1 (`conv2d::group_size`); and the first layer's form, without dx.
    let mut conv_groups = Conv2d::<f64>::new(2, 3, (3, 3), 1, 1);
    let mut conv_no_dx = Conv2d::<f64>::new(2, 3, (5, 5), 2, 2);
    conv_no_dx.input_grad = false;
    // These two by im2col + GEMM; the same shapes otherwise take Winograd (`winograd_conv.rs`),
    // checked below on planes of odd and even size, with and without dx.
    (conv_s1.winograd, conv_groups.winograd) = (false, false);
    let mut wino_conv = Conv2d::<f64>::new(3, 2, (3, 3), 1, 1);
    let mut wino_conv_no_dx = Conv2d::<f64>::new(2, 3, (3, 3), 1, (0, 1));
    wino_conv_no_dx.input_grad = false;
    let mut linear = Linear::<f64>::new(7, 5);
    let mut fused = ConvReluPool::new(Conv2d::<f64>::new(2, 3, (3, 3), 1, 1), MaxPool2d::new(2, 2));
    let mut fused_s2 = ConvReluPool::new(Conv2d::<f64>::new(2, 2, (3, 3), 2, 1), MaxPool2d::new(3, 2));
    // One input channel, 3x3, pool 2/2: the direct path (`direct_conv.rs`), with and without dx.
    let mut direct = ConvReluPool::new(Conv2d::<f64>::new(1, 3, (3, 3), 1, 0), MaxPool2d::new(2, 2));
    let mut direct_no_dx = ConvReluPool::new(Conv2d::<f64>::new(1, 4, (3, 3), 1, 0), MaxPool2d::new(2, 2));
    direct_no_dx.input_grad = false;
    // Several channels, 3x3, pool 2/2: the Winograd forward, F(2x2, 3x3) (`winograd.rs`), and
    // its backward by F(2x2) on a 3x3 pooled map, by F(4x4, 3x3) on a larger one (`winograd4.rs`).
    let mut winograd = ConvReluPool::new(Conv2d::<f64>::new(3, 2, (3, 3), 1, 0), MaxPool2d::new(2, 2));
    let mut winograd_f2 = ConvReluPool::new(Conv2d::<f64>::new(3, 2, (3, 3), 1, 0), MaxPool2d::new(2, 2));
    // The model's other blocks never skip dx, but each path's no-dx branch is checked too.
    let mut winograd_no_dx = ConvReluPool::new(Conv2d::<f64>::new(2, 3, (3, 3), 1, 0), MaxPool2d::new(2, 2));
    winograd_no_dx.input_grad = false;
    let mut gemm_no_dx = ConvReluPool::new(Conv2d::<f64>::new(2, 3, (3, 3), 1, 1), MaxPool2d::new(2, 2));
    gemm_no_dx.input_grad = false;
    let mut direct_rng = Lcg(43);
    for l in [
        &mut direct as &mut dyn Layer<f64>,
        &mut direct_no_dx,
        &mut winograd,
        &mut winograd_no_dx,
        &mut gemm_no_dx,
        &mut winograd_f2,
        &mut wino_conv,
        &mut wino_conv_no_dx,
    ] {
        for p in l.params_mut() {
            p.value = direct_rng.tensor(p.value.shape());
        }
    }
    for l in [
        &mut conv_s1 as &mut dyn Layer<f64>,
        &mut conv_s2,
        &mut conv_1x1,
        &mut conv_groups,
        &mut conv_no_dx,
        &mut linear,
        &mut fused,
        &mut fused_s2,
    ] {
        for p in l.params_mut() {
            p.value = rng.tensor(p.value.shape());
        }
    }

    type Case = (&'static str, Box<dyn Layer<f64>>, Tensor<f64>);
    let cases: Vec<Case> = vec![
        ("Conv2d 3->4 k3 s1 p0", Box::new(conv_s1), rng.tensor(&[2, 3, 7, 6])),
        ("Conv2d 2->3 k3x2 s2 p1", Box::new(conv_s2), rng.tensor(&[3, 2, 7, 5])),
        ("Conv2d 3->2 k1 s1 p0", Box::new(conv_1x1), rng.tensor(&[2, 3, 3, 5])),
        ("Conv2d 2->3 k3 p1, groups of 3+1", Box::new(conv_groups), rng.tensor(&[7, 2, 10, 10])),
        ("Conv2d 2->3 k5 s2 p2, no dx", Box::new(conv_no_dx), rng.tensor(&[3, 2, 9, 8])),
        ("ConvReluPool 2->3 k3 p1, pool 2/2", Box::new(fused), rng.tensor(&[3, 2, 7, 6])),
        ("ConvReluPool 2->2 k3 s2 p1, pool 3/2", Box::new(fused_s2), rng.tensor(&[2, 2, 11, 9])),
        ("MaxPool2d k2 s2", Box::new(MaxPool2d::new(2, 2)), rng.distinct(&[2, 3, 7, 6])),
        ("MaxPool2d k3 s2 p1 ceil", Box::new(MaxPool2d::with_options(3, 2, 1, true)), rng.distinct(&[2, 2, 6, 7])),
        ("AvgPool2d k2 s2", Box::new(AvgPool2d::new(2, 2)), rng.tensor(&[2, 3, 7, 6])),
        ("AvgPool2d k3 s1", Box::new(AvgPool2d::new(3, 1)), rng.tensor(&[2, 2, 5, 4])),
        ("GlobalAvgPool2d", Box::new(GlobalAvgPool2d::new()), rng.tensor(&[3, 4, 5, 3])),
        ("Linear 7->5", Box::new(linear), rng.tensor(&[3, 7])),
        ("ReLU", Box::new(Relu::<f64>::new()), rng.away_from_zero(&[2, 3, 5, 4])),
        ("Dropout p=0.4 (train)", Box::new(Dropout::<f64>::new(0.4, 9)), rng.tensor(&[4, 9])),
        ("Flatten", Box::new(Flatten::new()), rng.tensor(&[2, 3, 2, 3])),
        ("ConvReluPool 1->3 k3 direct", Box::new(direct), direct_rng.tensor(&[2, 1, 9, 12])),
        ("ConvReluPool 1->4 k3 direct, no dx", Box::new(direct_no_dx), direct_rng.tensor(&[3, 1, 13, 11])),
        ("ConvReluPool 3->2 k3 Winograd, F(4x4) bwd", Box::new(winograd), direct_rng.tensor(&[2, 3, 11, 12])),
        ("ConvReluPool 2->3 k3 Winograd, F(4x4), no dx", Box::new(winograd_no_dx), direct_rng.tensor(&[3, 2, 10, 11])),
        ("ConvReluPool 2->3 k3 p1 GEMM, no dx", Box::new(gemm_no_dx), direct_rng.tensor(&[3, 2, 7, 6])),
        ("ConvReluPool 3->2 k3 Winograd, F(2x2) bwd", Box::new(winograd_f2), direct_rng.tensor(&[2, 3, 8, 8])),
        ("Conv2d 3->2 k3 p1 by Winograd, 5x6 plane", Box::new(wino_conv), direct_rng.tensor(&[2, 3, 5, 6])),
        ("Conv2d 2->3 k3 p(0,1) by Winograd, no dx", Box::new(wino_conv_no_dx), direct_rng.tensor(&[3, 2, 6, 5])),
    ];

    println!(
        "\n{:<44} {:<16} {:<18} {:<18} {:<18}",
        "layer", "input", "dx max rel (n)", "dw max rel (n)", "db max rel (n)"
    );
    let mut failures = Vec::new();
    for (i, (name, mut layer, x)) in cases.into_iter().enumerate() {
        let worst = check(layer.as_mut(), &x, train, 100 + i as u64, usize::MAX);
        println!("{}", row(name, x.shape(), &worst));
        if max_err(&worst) > TOLERANCE {
            failures.push(format!("{name}: {:.3e}", max_err(&worst)));
        }
    }

    // The loss itself: dL/dz of the mean softmax cross-entropy, against central differences of L.
    let z = rng.tensor(&[3, 5]).mapv(|v| 3.0 * v);
    let targets = [4, 0, 2];
    let mut ce = SoftmaxCrossEntropy::<f64>::new();
    ce.forward(&z, &targets);
    let dz = ce.backward();
    let mut worst = Worst::default();
    let h = 1e-5;
    for i in 0..z.len() {
        let mut zp = z.clone();
        zp.as_slice_mut().unwrap()[i] += h;
        let mut zm = z.clone();
        zm.as_slice_mut().unwrap()[i] -= h;
        let n = (ce.forward(&zp, &targets) - ce.forward(&zm, &targets)) / (2.0 * h);
        worst.add(dz.as_slice().unwrap()[i], n);
    }
    // A smooth function: central differences are only O(h^2) exact, so 1e-6 still applies.
    println!("{}", row("SoftmaxCrossEntropy (mean)", z.shape(), &[worst]));
    if worst.err > TOLERANCE {
        failures.push(format!("cross-entropy: {:.3e}", worst.err));
    }
    assert!(failures.is_empty(), "gradient check failed (tolerance {TOLERANCE:e}): {failures:?}");
}

/// The whole reference model (4 conv blocks, global pool, classifier with dropout active) on a
/// batch of 2 non-square 46x54 images, the smallest size its four pools allow. 421,510
/// parameters are too many to perturb one by one, so 40 random elements of each parameter tensor
/// (every element of a smaller one) and 40 of dx are checked; each layer alone is checked in full
/// above.
#[test]
fn reference_model_matches_finite_differences() {
    let mut model = Whole(reference_model::<f64>(&ModelConfig::default(), 3));
    let x = Lcg(5).tensor(&[2, 1, 46, 54]);
    let worst = check(&mut model, &x, Ctx::train(11), 77, 40);
    let names: Vec<String> = model.0.named_params().into_iter().map(|(n, _)| n).collect();
    println!("\nreference model, input {:?}", x.shape());
    println!("{:<24} {:>10} {:>8}", "gradient", "max rel", "checked");
    println!("{:<24} {:>10.2e} {:>8}", "dx", worst[0].err, worst[0].count);
    for (n, w) in names.iter().zip(&worst[1..]) {
        println!("{:<24} {:>10.2e} {:>8}", n, w.err, w.count);
    }
    assert!(max_err(&worst) <= TOLERANCE, "reference model gradient check failed: {:.3e}", max_err(&worst));
}

/// A conv layer whose backward is wrong in a classic way: dx uses the kernel flipped by 180
/// degrees (the true-convolution vs cross-correlation mix-up). The checker must catch it.
struct FlippedKernelConv(Conv2d<f64>);
impl Layer<f64> for FlippedKernelConv {
    fn describe(&self) -> String {
        "conv with flipped-kernel backward".into()
    }
    fn forward(&mut self, x: &Tensor<f64>, ctx: Ctx) -> Tensor<f64> {
        self.0.forward(x, ctx)
    }
    fn backward(&mut self, dy: &Tensor<f64>) -> Tensor<f64> {
        let w = self.0.weight.value.clone();
        let mut flipped = w.clone();
        flipped.invert_axis(ndarray::Axis(2));
        flipped.invert_axis(ndarray::Axis(3));
        self.0.weight.value = flipped.as_standard_layout().to_owned();
        let dx = self.0.backward(dy);
        self.0.weight.value = w;
        dx
    }
    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        self.0.output_shape(s)
    }
    fn params(&self) -> Vec<&medcnn::layers::Param<f64>> {
        self.0.params()
    }
    fn params_mut(&mut self) -> Vec<&mut medcnn::layers::Param<f64>> {
        self.0.params_mut()
    }
}

#[test]
fn a_wrong_backward_fails_the_checker() {
    let mut rng = Lcg(8);
    let mut conv = Conv2d::<f64>::new(2, 3, (3, 3), 1, 1);
    conv.weight.value = rng.tensor(&[3, 2, 3, 3]);
    let x = rng.tensor(&[2, 2, 5, 6]);
    let mut bad = FlippedKernelConv(conv);
    let worst = check(&mut bad, &x, Ctx::eval(), 1, usize::MAX);
    println!("\nflipped-kernel backward: dx max rel {:.2e} (must be large), dw {:.2e}", worst[0].err, worst[1].err);
    assert!(worst[0].err > 1e-2, "the checker missed a flipped kernel in dx: {:.3e}", worst[0].err);
    assert!(worst[1].err <= TOLERANCE, "dw is untouched by the flip and must still pass");
}

/// A layer whose backward breaks the accumulation contract: it writes `grad = dL/dW` (clearing
/// the gradient first, then running the real backward) instead of adding to it. dx is right.
struct Overwriting(Box<dyn Layer<f64>>);
impl Layer<f64> for Overwriting {
    fn describe(&self) -> String {
        format!("{} with an overwriting backward", self.0.describe())
    }
    fn forward(&mut self, x: &Tensor<f64>, ctx: Ctx) -> Tensor<f64> {
        self.0.forward(x, ctx)
    }
    fn backward(&mut self, dy: &Tensor<f64>) -> Tensor<f64> {
        for p in self.0.params_mut() {
            p.grad.fill(0.0); // the bug: what the caller accumulated so far is lost
        }
        self.0.backward(dy)
    }
    fn output_shape(&self, s: &[usize]) -> Vec<usize> {
        self.0.output_shape(s)
    }
    fn params(&self) -> Vec<&medcnn::layers::Param<f64>> {
        self.0.params()
    }
    fn params_mut(&mut self) -> Vec<&mut medcnn::layers::Param<f64>> {
        self.0.params_mut()
    }
}

/// `grad = ...` instead of `grad += ...` is caught in every layer with parameters, on each of
/// the fused block's three paths, while dx (which backward returns, never accumulates) passes.
#[test]
fn an_overwriting_backward_fails_the_checker() {
    let mut rng = Lcg(9);
    let fused = |c, pad| ConvReluPool::new(Conv2d::<f64>::new(c, 3, (3, 3), 1, pad), MaxPool2d::new(2, 2));
    // The direct path's own backward runs only when dx is not wanted (the model's first block).
    let no_dx = |mut b: ConvReluPool<f64>| {
        b.input_grad = false;
        b
    };
    let cases: Vec<(&str, Box<dyn Layer<f64>>, Vec<usize>)> = vec![
        ("Conv2d", Box::new(Conv2d::<f64>::new(2, 3, (3, 3), 1, 1)), vec![2, 2, 5, 6]),
        ("Linear", Box::new(Linear::<f64>::new(7, 5)), vec![3, 7]),
        ("ConvReluPool GEMM", Box::new(fused(2, 1)), vec![3, 2, 7, 6]),
        ("ConvReluPool direct, no dx", Box::new(no_dx(fused(1, 0))), vec![2, 1, 9, 12]),
        ("ConvReluPool Winograd", Box::new(fused(3, 0)), vec![2, 3, 11, 12]),
    ];
    for (name, mut inner, shape) in cases {
        for p in inner.params_mut() {
            p.value = rng.tensor(p.value.shape());
        }
        let x = rng.tensor(&shape);
        let mut bad = Overwriting(inner);
        let worst = check(&mut bad, &x, Ctx::eval(), 2, usize::MAX);
        println!("overwriting {name:<22}: dx {:.2e}, dw {:.2e}, db {:.2e}", worst[0].err, worst[1].err, worst[2].err);
        assert!(worst[0].err <= TOLERANCE, "{name}: dx is not accumulated and must still pass");
        for (what, w) in [("dw", worst[1]), ("db", worst[2])] {
            assert!(w.err > 1e-2, "{name}: the checker missed an overwritten {what}: {:.3e}", w.err);
        }
    }
}

/// The fused model (conv + ReLU + pool as one layer, images grouped into shared GEMMs) that the
/// CPU backend trains must compute what the layer-by-layer reference computes: same logits,
/// same gradient for every parameter, up to the order of floating-point sums.
#[test]
fn fused_model_equals_reference_model() {
    let cfg = ModelConfig::default();
    let mut reference = reference_model::<f64>(&cfg, 21);
    let mut fused = reference_model::<f64>(&ModelConfig { fused: true, ..cfg }, 21);
    let x = Lcg(4).tensor(&[5, 1, 64, 64]);
    let ctx = Ctx::train(3);
    let (ya, yb) = (reference.forward(&x, ctx), fused.forward(&x, ctx));
    let dy = Lcg(6).tensor(ya.shape());
    reference.backward(&dy);
    fused.backward(&dy);
    let close = |a: &Tensor<f64>, b: &Tensor<f64>, what: &str| {
        let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
        let err = a.iter().zip(b.iter()).fold(0.0f64, |m, (p, q)| m.max((p - q).abs())) / scale;
        assert!(err < 1e-12, "{what}: fused and reference differ by {err:.3e} (relative to the largest value)");
    };
    close(&ya, &yb, "logits");
    for ((name, pa), (_, pb)) in reference.named_params().into_iter().zip(fused.named_params()) {
        close(&pa.value, &pb.value, &name);
        close(&pa.grad, &pb.grad, &format!("d {name}"));
    }
}
