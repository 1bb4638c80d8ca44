//! Layers with (height, width) settings: rectangular kernels, per-axis strides and paddings,
//! max- and average-pool padding and ceil mode, and the fused conv + ReLU + max-pool block on all
//! of them. What this file is not: the per-layer checks of the square settings (`gradcheck.rs`,
//! `pytorch_literals.rs`) or the model-spec parser.
//!
//! Three kinds of evidence:
//! - gradient checks (f64, every element of dx, dW and db, against central differences, <= 1e-6,
//!   the checker of `common/grad.rs`; max-pool inputs are distinct values so no window ties);
//! - the fused `ConvReluPool` against `Conv2d` + `Relu` + `MaxPool2d` in a row: forward output,
//!   dx, dW and db, on fixed settings (each asserting which algorithm ran), a seeded sweep, and
//!   a block run on a second input size; with what both report of themselves (description,
//!   output shape, operations) checked against their settings;
//! - numbers produced once by PyTorch 2.15.0 (float64), the script pasted above each test:
//!   an average pool with padding, one in ceil mode, a conv with a (2, 1) stride.
//!
//! Run `cargo test --release --features cuda --test layers_pairs -- --nocapture` for the tables.

mod common;

use common::grad::{check, max_err, row, TOLERANCE};
use common::Lcg;
use medcnn::layers::{window_out_len, AvgPool2d, Conv2d, ConvAlgo, ConvReluPool, Ctx, Hw, Layer, MaxPool2d, Relu};
use medcnn::tensor::{from_vec, Tensor};

/// Fills every parameter of `layer` from `rng`, in [-1, 1).
fn randomize(layer: &mut dyn Layer<f64>, rng: &mut Lcg) {
    for p in layer.params_mut() {
        p.value = rng.tensor(p.value.shape());
    }
}

#[test]
fn pair_settings_match_finite_differences() {
    let mut rng = Lcg(2024);
    type Case = (&'static str, Box<dyn Layer<f64>>, Tensor<f64>);
    let conv = |c, oc, k: (usize, usize), s: (usize, usize), p: (usize, usize), rng: &mut Lcg| {
        let mut l = Conv2d::<f64>::new(c, oc, k, s, p);
        randomize(&mut l, rng);
        Box::new(l)
    };
    let fused = |conv: Box<Conv2d<f64>>, pool: MaxPool2d| Box::new(ConvReluPool::new(*conv, pool));
    let cases: Vec<Case> = vec![
        ("Conv2d 2->3 k(3,5) s(2,1) p(1,2)", conv(2, 3, (3, 5), (2, 1), (1, 2), &mut rng), rng.tensor(&[2, 2, 7, 6])),
        ("Conv2d 3->2 k(2,3) s(1,2) p(0,1)", conv(3, 2, (2, 3), (1, 2), (0, 1), &mut rng), rng.tensor(&[2, 3, 5, 7])),
        ("Conv2d 2->2 k5 s2 p2", conv(2, 2, (5, 5), (2, 2), (2, 2), &mut rng), rng.tensor(&[2, 2, 7, 8])),
        ("Conv2d 1->3 k(1,3) s(3,1) p(1,0)", conv(1, 3, (1, 3), (3, 1), (1, 0), &mut rng), rng.tensor(&[3, 1, 8, 5])),
        (
            "MaxPool2d k(3,2) s(2,1) p(1,1)",
            Box::new(MaxPool2d::with_options((3, 2), (2, 1), (1, 1), false)),
            rng.distinct(&[2, 2, 7, 6]),
        ),
        ("MaxPool2d k3 s2 p1 ceil", Box::new(MaxPool2d::with_options(3, 2, 1, true)), rng.distinct(&[2, 2, 6, 7])),
        (
            "MaxPool2d k(2,3) s2 p1 ceil",
            Box::new(MaxPool2d::with_options((2, 3), 2, 1, true)),
            rng.distinct(&[1, 2, 5, 8]),
        ),
        ("MaxPool2d k2 s2 ceil", Box::new(MaxPool2d::with_options(2, 2, 0, true)), rng.distinct(&[2, 1, 5, 7])),
        (
            "AvgPool2d k(3,2) s(2,1) p(1,1)",
            Box::new(AvgPool2d::with_options((3, 2), (2, 1), (1, 1), false)),
            rng.tensor(&[2, 2, 7, 6]),
        ),
        ("AvgPool2d k3 s2 p1 ceil", Box::new(AvgPool2d::with_options(3, 2, 1, true)), rng.tensor(&[2, 2, 6, 7])),
        ("AvgPool2d k2 s2 ceil", Box::new(AvgPool2d::with_options(2, 2, 0, true)), rng.tensor(&[2, 1, 5, 7])),
        (
            "AvgPool2d k(2,4) s(1,3) p(1,2) ceil",
            Box::new(AvgPool2d::with_options((2, 4), (1, 3), (1, 2), true)),
            rng.tensor(&[2, 2, 4, 9]),
        ),
        (
            "ConvReluPool k(3,5) s(2,1) p(1,2), pool (2,3)/(2,1)",
            fused(conv(2, 3, (3, 5), (2, 1), (1, 2), &mut rng), MaxPool2d::new((2, 3), (2, 1))),
            rng.tensor(&[2, 2, 9, 8]),
        ),
        (
            "ConvReluPool k3 p1, pool 3/2 p1 ceil",
            fused(conv(3, 2, (3, 3), (1, 1), (1, 1), &mut rng), MaxPool2d::with_options(3, 2, 1, true)),
            rng.tensor(&[2, 3, 6, 7]),
        ),
        (
            "ConvReluPool k5 s2 p2, pool 2/2 ceil",
            fused(conv(2, 2, (5, 5), (2, 2), (2, 2), &mut rng), MaxPool2d::with_options(2, 2, 0, true)),
            rng.tensor(&[2, 2, 9, 11]),
        ),
    ];
    println!(
        "\n{:<44} {:<16} {:<18} {:<18} {:<18}",
        "layer", "input", "dx max rel (n)", "dw max rel (n)", "db max rel (n)"
    );
    let mut failures = Vec::new();
    for (i, (name, mut layer, x)) in cases.into_iter().enumerate() {
        let worst = check(layer.as_mut(), &x, Ctx::train(1), 300 + i as u64, usize::MAX);
        println!("{}", row(name, x.shape(), &worst));
        assert!(worst[0].count == x.len(), "{name}: every dx element is checked");
        if max_err(&worst) > TOLERANCE {
            failures.push(format!("{name}: {:.3e}", max_err(&worst)));
        }
    }
    assert!(failures.is_empty(), "gradient check failed (tolerance {TOLERANCE:e}): {failures:?}");
}

// ---------------------------------------------------------------------------------------------
// The fused block against the three layers in a row

/// Largest |a - b| over the largest |a|: the error relative to the tensor's scale.
fn rel_diff(a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter().zip(b.iter()).fold(0.0f64, |m, (p, q)| m.max((p - q).abs())) / scale
}

/// Fused and plain agree to 1e-12 of each tensor's largest value. Both compute the same sums in
/// f64; only their order differs (the fused GEMM multiplies a group of images at once and sums
/// dW over them in one product; Winograd adds its transforms' rounding, a few ulps of each
/// product). Each output is a sum of at most C*KH*KW = 75 products here and each weight gradient
/// of at most N*OH*OW = 400, so reordering moves it by ~400 * 2^-53 ~ 5e-14 of the scale; 1e-12
/// leaves 20x for Winograd. A wrong winner, window or padding moves an element by O(1).
const FUSED_TOL: f64 = 1e-12;

/// [y, dx, dW, db] errors as `[1.2e-15, ...]`.
fn sci(errs: &[f64]) -> String {
    format!("[{}]", errs.iter().map(|e| format!("{e:.2e}")).collect::<Vec<_>>().join(", "))
}

/// One conv + ReLU + max-pool setting.
#[derive(Clone, Copy, Debug)]
struct Block {
    c: usize,
    oc: usize,
    kernel: Hw,
    stride: Hw,
    padding: Hw,
    pool: (Hw, Hw, Hw, bool),
    input: [usize; 4],
    input_grad: bool,
}

impl Block {
    fn pool(&self) -> MaxPool2d {
        MaxPool2d::with_options(self.pool.0, self.pool.1, self.pool.2, self.pool.3)
    }
    /// Whether the conv and then the pool fit in the input.
    fn fits(&self) -> bool {
        let oh = window_out_len(self.input[2], self.kernel.h, self.stride.h, self.padding.h, false);
        let ow = window_out_len(self.input[3], self.kernel.w, self.stride.w, self.padding.w, false);
        match (oh, ow) {
            (Some(oh), Some(ow)) => self.pool().checked_out_hw(oh, ow).is_some(),
            _ => false,
        }
    }
}

/// Runs `b` fused (with the fast paths on or off) and as three layers from the same weights,
/// input and upstream gradient. Returns the algorithm the fused forward took and the worst
/// relative difference of [y, dx, dW, db].
fn fused_vs_plain(b: &Block, fast: bool, seed: u64) -> (ConvAlgo, [f64; 4]) {
    fused_vs_plain_after(b, fast, seed, None)
}

/// `fused_vs_plain`, with the fused block first run forward and backward on an input of shape
/// `before` (its buffers then hold that input's values) when one is given.
fn fused_vs_plain_after(b: &Block, fast: bool, seed: u64, before: Option<[usize; 4]>) -> (ConvAlgo, [f64; 4]) {
    let mut rng = Lcg(seed);
    let mut conv = Conv2d::<f64>::new(b.c, b.oc, b.kernel, b.stride, b.padding);
    conv.winograd = false; // the reference: the three layers in a row, by im2col + GEMM
    randomize(&mut conv, &mut rng);
    let mut twin = Conv2d::<f64>::new(b.c, b.oc, b.kernel, b.stride, b.padding);
    twin.weight.value = conv.weight.value.clone();
    twin.bias.value = conv.bias.value.clone();
    let pool = b.pool();
    assert!(ConvReluPool::can_fuse(&twin, &pool), "{b:?}: can_fuse");
    let mut fused = ConvReluPool::new(twin, pool);
    fused.input_grad = b.input_grad;
    (fused.direct, fused.winograd) = (fast, fast);
    let (mut relu, mut plain_pool) = (Relu::<f64>::new(), b.pool());

    let ctx = Ctx::train(0);
    if let Some(shape) = before {
        let y = fused.forward(&rng.tensor(&shape).mapv(|v| v + 2.0), ctx);
        fused.backward(&rng.tensor(y.shape()));
        fused.conv.weight.grad.fill(0.0);
        fused.conv.bias.grad.fill(0.0);
    }
    let x = rng.tensor(&b.input);
    let y_plain = plain_pool.forward(&relu.forward(&conv.forward(&x, ctx), ctx), ctx);
    let y_fused = fused.forward(&x, ctx);
    let dy = rng.tensor(y_plain.shape());
    let dx_plain = conv.backward(&relu.backward(&Layer::<f64>::backward(&mut plain_pool, &dy)));
    let dx_fused = fused.backward(&dy);
    let dx = if b.input_grad { rel_diff(&dx_plain, &dx_fused) } else { 0.0 };
    let errs = [
        rel_diff(&y_plain, &y_fused),
        dx,
        rel_diff(&conv.weight.grad, &fused.conv.weight.grad),
        rel_diff(&conv.bias.grad, &fused.conv.bias.grad),
    ];
    (fused.algo(&b.input), errs)
}

#[test]
fn fused_block_equals_conv_relu_pool() {
    let (one, two, zero) = (Hw::square(1), Hw::square(2), Hw::square(0));
    let pool2 = (two, two, zero, false);
    let b = |c, oc, k: Hw, s: Hw, p: Hw, pool, input| Block {
        c,
        oc,
        kernel: k,
        stride: s,
        padding: p,
        pool,
        input,
        input_grad: true,
    };
    #[rustfmt::skip]
    let settings: Vec<(&str, Block, ConvAlgo)> = vec![
        ("padded 3x3", b(2, 4, Hw::square(3), one, one, pool2, [2, 2, 9, 8]), ConvAlgo::Winograd),
        ("stride 2, padding 1, pool 3/2", b(2, 3, Hw::square(3), two, one, (Hw::square(3), two, zero, false), [3, 2, 11, 9]), ConvAlgo::Gemm),
        ("5x5, padding 2", b(2, 3, Hw::square(5), one, two, pool2, [2, 2, 10, 9]), ConvAlgo::Gemm),
        ("rectangular k(3,5) s(2,1) p(1,2), pool (2,3)/(2,1)", b(2, 3, Hw { h: 3, w: 5 }, Hw { h: 2, w: 1 }, Hw { h: 1, w: 2 }, (Hw { h: 2, w: 3 }, Hw { h: 2, w: 1 }, zero, false), [2, 2, 9, 8]), ConvAlgo::Gemm),
        ("ceil mode, pool padding: pool 3/2 p1 ceil", b(2, 3, Hw::square(3), one, one, (Hw::square(3), two, one, true), [2, 2, 8, 7]), ConvAlgo::Gemm),
        ("pool (3,2)/(2,1) p(1,1) ceil", b(3, 2, Hw::square(2), one, zero, (Hw { h: 3, w: 2 }, Hw { h: 2, w: 1 }, one, true), [2, 3, 7, 6]), ConvAlgo::Gemm),
        ("3 input channels, 3x3 p1", b(3, 4, Hw::square(3), one, one, pool2, [2, 3, 10, 10]), ConvAlgo::Winograd),
        ("batch 5, 2x2 pool ceil on odd planes", b(2, 3, Hw::square(3), one, zero, (two, two, zero, true), [5, 2, 9, 10]), ConvAlgo::Gemm),
        // The reference shapes: 3x3/s1/p0 + 2x2/2, on the fast paths.
        ("reference shape, 1 channel", b(1, 8, Hw::square(3), one, zero, pool2, [3, 1, 20, 18]), ConvAlgo::Direct),
        ("reference shape, 3 channels", b(3, 8, Hw::square(3), one, zero, pool2, [3, 3, 14, 12]), ConvAlgo::Winograd),
        ("reference shape, 8 channels", b(8, 16, Hw::square(3), one, zero, pool2, [4, 8, 12, 12]), ConvAlgo::Winograd),
        // Padded 3x3 convs run the same fast paths on the padded images.
        ("1 channel, 3x3 p1", b(1, 8, Hw::square(3), one, one, pool2, [3, 1, 20, 18]), ConvAlgo::Direct),
        ("1 channel, 3x3 p(2,1), odd planes", b(1, 5, Hw::square(3), one, Hw { h: 2, w: 1 }, pool2, [2, 1, 9, 11]), ConvAlgo::Direct),
        ("4 channels, 3x3 p(1,2), odd planes", b(4, 6, Hw::square(3), one, Hw { h: 1, w: 2 }, pool2, [3, 4, 9, 11]), ConvAlgo::Winograd),
        ("4 channels, 3x3 p2, planes 2x3", b(4, 6, Hw::square(3), one, two, pool2, [2, 4, 2, 3]), ConvAlgo::Winograd),
        // The least a Winograd group can hold: one image of one pooling window (one tile).
        ("one image of one pooling window", b(2, 3, Hw::square(3), one, zero, pool2, [1, 2, 4, 5]), ConvAlgo::Winograd),
    ];
    println!("\n{:<52} {:<9} {:>9} {:>9} {:>9} {:>9}", "setting", "algo", "y", "dx", "dW", "db");
    let mut failures = Vec::new();
    for (i, (name, mut block, want_algo)) in settings.into_iter().enumerate() {
        // The direct path's backward has no dx: the reference's first block runs without it.
        if want_algo == ConvAlgo::Direct {
            block.input_grad = false;
        }
        for fast in [true, false] {
            let (algo, errs) = fused_vs_plain(&block, fast, 500 + i as u64);
            let want = if fast { want_algo } else { ConvAlgo::Gemm };
            println!(
                "{:<52} {:<9} {:>9.1e} {:>9.1e} {:>9.1e} {:>9.1e}",
                name,
                format!("{algo:?}"),
                errs[0],
                errs[1],
                errs[2],
                errs[3]
            );
            assert_eq!(algo, want, "{name}: the fused block took {algo:?}, expected {want:?}");
            if errs.iter().any(|&e| e > FUSED_TOL) {
                failures.push(format!("{name} ({algo:?}): {}", sci(&errs)));
            }
            if want_algo == ConvAlgo::Gemm {
                break; // the fast paths do not apply: both runs are the same
            }
        }
    }
    assert!(failures.is_empty(), "fused and plain differ by more than {FUSED_TOL:e}: {failures:?}");
}

/// A block's buffers outlive a batch: a padded fast path keeps its padded copy of the input
/// (`ConvReluPool::padded`) from one forward to the next and writes only what the new shape
/// needs. Run on a larger input first (values 1 to 3, so nothing of it is zero), then on a
/// smaller one, each fast path must still give what the plain layers give: a border left from
/// the last input would move the conv next to it by O(1).
#[test]
fn a_block_run_on_another_input_size_keeps_nothing_of_the_last() {
    let (one, two, zero) = (Hw::square(1), Hw::square(2), Hw::square(0));
    let pool2 = (two, two, zero, false);
    let b = |c, padding, input| Block {
        c,
        oc: 3,
        kernel: Hw::square(3),
        stride: one,
        padding,
        pool: pool2,
        input,
        input_grad: c > 1,
    };
    #[rustfmt::skip]
    let settings = [
        ("1 channel, p1, 9x8 after 12x13", b(1, one, [2, 1, 9, 8]), [3, 1, 12, 13], ConvAlgo::Direct),
        ("1 channel, p2, 6x7 after 12x13", b(1, two, [2, 1, 6, 7]), [3, 1, 12, 13], ConvAlgo::Direct),
        ("2 channels, p1, 9x8 after 12x13", b(2, one, [2, 2, 9, 8]), [3, 2, 12, 13], ConvAlgo::Winograd),
        ("2 channels, p2, 6x7 after 12x13", b(2, two, [2, 2, 6, 7]), [3, 2, 12, 13], ConvAlgo::Winograd),
    ];
    for (i, (name, block, before, want)) in settings.into_iter().enumerate() {
        let (algo, errs) = fused_vs_plain_after(&block, true, 700 + i as u64, Some(before));
        println!("{name:<36} {algo:?} {}", sci(&errs));
        assert_eq!(algo, want, "{name}");
        assert!(errs.iter().all(|&e| e <= FUSED_TOL), "{name}: fused and plain differ by {}", sci(&errs));
    }
}

/// What the model summary, the spec checks and `medcnn bench` read from a conv layer and a
/// fused block: its description, its output shape (the one `forward` returns) and its
/// operations (a multiply-add as 2: 2 N OC C KH KW OH OW, counted here from the settings).
#[test]
fn conv_and_fused_block_describe_their_shapes_and_operations() {
    let cases = [
        // (C, OC, kernel, stride, padding, input, OH, OW, description)
        (1, 32, Hw::square(3), Hw::square(1), Hw::square(0), [2, 1, 64, 64], 62, 62, "Conv2d(1->32, k3x3, s1, p0)"),
        (
            3,
            5,
            Hw { h: 3, w: 5 },
            Hw { h: 2, w: 1 },
            Hw { h: 1, w: 2 },
            [3, 3, 9, 8],
            5,
            8,
            "Conv2d(3->5, k3x5, s2x1, p1x2)",
        ),
        (2, 4, Hw::square(5), Hw::square(2), Hw::square(2), [1, 2, 11, 10], 6, 5, "Conv2d(2->4, k5x5, s2, p2)"),
    ];
    for (c, oc, kernel, stride, padding, input, oh, ow, text) in cases {
        let mut conv = Conv2d::<f64>::new(c, oc, kernel, stride, padding);
        assert_eq!((conv.in_channels(), conv.out_channels()), (c, oc));
        assert_eq!(Layer::<f64>::describe(&conv), text);
        let want = [input[0], oc, oh, ow];
        assert_eq!(conv.output_shape(&input), want, "{text}");
        let x = Lcg(3).tensor(&input);
        assert_eq!(conv.forward(&x, Ctx::eval()).shape(), want, "{text}: forward");
        let ops = 2 * input[0] * oc * c * kernel.h * kernel.w * oh * ow;
        assert_eq!(conv.flops(&input), ops as u64, "{text}");

        let pool = MaxPool2d::new(2, 2);
        let pooled = [input[0], oc, oh / 2, ow / 2];
        let mut fused = ConvReluPool::new(conv, pool);
        assert_eq!(fused.describe(), format!("{text} + ReLU + MaxPool2d(k2, s2, p0)"));
        assert_eq!(fused.output_shape(&input), pooled, "{text} fused");
        assert_eq!(fused.forward(&x, Ctx::eval()).shape(), pooled, "{text} fused: forward");
        assert_eq!(fused.flops(&input), ops as u64, "{text} fused: the conv's operations (ReLU and pool count none)");
    }
}

/// A seeded sweep over kernels 1..5, strides 1..3 and paddings per axis, pools of every kind
/// (padding up to half the kernel, ceil mode or not), 1..3 channels, batches 1..3, odd and even
/// planes: `can_fuse` says yes to each and the fused block agrees with the plain layers.
#[test]
fn every_conv_and_pool_pair_fuses() {
    let mut rng = Lcg(77);
    let mut pick = |lo: usize, hi: usize| lo + rng.below(hi - lo + 1);
    let (mut tried, mut worst) = (0, 0.0f64);
    while tried < 60 {
        let kernel = Hw { h: pick(1, 5), w: pick(1, 5) };
        let pool_k = Hw { h: pick(1, 3), w: pick(1, 3) };
        let block = Block {
            c: pick(1, 3),
            oc: pick(1, 3),
            kernel,
            stride: Hw { h: pick(1, 3), w: pick(1, 3) },
            padding: Hw { h: pick(0, kernel.h - 1), w: pick(0, kernel.w - 1) },
            pool: (
                pool_k,
                Hw { h: pick(1, 3), w: pick(1, 3) },
                Hw { h: pick(0, pool_k.h / 2), w: pick(0, pool_k.w / 2) },
                pick(0, 1) == 1,
            ),
            input: [pick(1, 3), 0, pick(4, 12), pick(4, 12)],
            input_grad: pick(0, 3) > 0,
        };
        let block = Block { input: [block.input[0], block.c, block.input[2], block.input[3]], ..block };
        if !block.fits() {
            continue;
        }
        let (_, errs) = fused_vs_plain(&block, true, 900 + tried as u64);
        let err = errs.iter().fold(0.0f64, |m, &e| m.max(e));
        assert!(err <= FUSED_TOL, "{block:?}: fused and plain differ by {} (y, dx, dW, db)", sci(&errs));
        worst = worst.max(err);
        tried += 1;
    }
    println!("\n{tried} random conv + pool pairs, worst relative difference {worst:.2e}");
}

// ---------------------------------------------------------------------------------------------
// PyTorch literals

/// |got - want| <= 1e-10 |want| + 1e-13 everywhere (the f64 tolerance of `pytorch_literals.rs`:
/// the same sums in another order, a few ulps).
fn assert_close(what: &str, got: &Tensor<f64>, shape: &[usize], want: &[f64]) {
    assert_eq!(got.shape(), shape, "{what}: shape");
    assert_eq!(want.len(), got.len(), "{what}: literal length");
    let mut max = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(err <= 1e-10 * w.abs() + 1e-13, "{what} (flat {i}): got {g:e}, PyTorch {w:e}, |diff| {err:e}");
        max = max.max(err);
    }
    println!("{what:<40} {:>4} elements  max |diff| {max:.3e}", got.len());
}

fn t64(shape: &[usize], data: &[f64]) -> Tensor<f64> {
    from_vec(shape, data.to_vec())
}

/// `F.conv2d`, batch 2, 2 -> 3 channels, input 5x6, kernel (3, 5), stride (2, 1), padding
/// (1, 2), with bias; backward with a non-uniform upstream gradient g.
///
/// Generated by:
///
/// ```python
/// import torch
/// import torch.nn.functional as F
///
/// def show(name, t):
///     print(name, list(t.shape), repr(t.detach().flatten().tolist()))
///
/// x = (torch.arange(2 * 2 * 5 * 6, dtype=torch.float64) * 0.41).sin().reshape(2, 2, 5, 6).requires_grad_()
/// w = ((torch.arange(3 * 2 * 3 * 5, dtype=torch.float64) * 0.29).cos() * 0.5).reshape(3, 2, 3, 5).requires_grad_()
/// b = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64, requires_grad=True)
/// y = F.conv2d(x, w, b, stride=(2, 1), padding=(1, 2))
/// g = (torch.arange(y.numel(), dtype=torch.float64) * 0.23 + 0.4).sin().reshape(y.shape)
/// y.backward(g)
/// for name, t in [("x", x), ("w", w), ("b", b), ("g", g), ("y", y), ("dx", x.grad), ("dw", w.grad), ("db", b.grad)]:
///     show(name, t)
/// ```
#[test]
fn conv2d_k3x5_s2x1_p1x2() {
    const X_SHAPE: [usize; 4] = [2, 2, 5, 6];
    #[rustfmt::skip]
    const X: [f64; 120] = [
        0.0, 0.3986093279844229, 0.7311458297268958, 0.9424888019316975,
        0.9976063813191737, 0.8873623686333755, 0.6300306299958922, 0.26826605092961836,
        -0.13796586727122684, -0.5213287903544065, -0.8182771110644103, -0.9795891644283669,
        -0.9785261299411385, -0.8152642144499634, -0.5168654443974295, -0.1327919088525176,
        0.27329299497701237, 0.6340773016991814, 0.8897579983503596, 0.9979538734102932,
        0.9407305566797731, 0.7275732909714597, 0.39381467387048763, -0.005222015496750621,
        -0.4033931121687696, -0.7346984304047954, -0.9442213458610589, -0.9972316848693977,
        -0.8849425408713646, -0.6259667775893284, -0.26323179136580266, 0.14313606341154064,
        0.5257779198672465, 0.8212676935633636, 0.9806254858798086, 0.9774364114066826,
        0.8122290858806043, 0.5123880037101151, 0.12761432924735416, -0.27831248642507134,
        -0.6381066823479474, -0.8921293646943759, -0.9982741516667748, -0.9389466580519858,
        -0.7239809115603028, -0.38900928057541545, 0.010443888591061618, 0.4081658959714942,
        0.7382309961270456, 0.9459281412220217, 0.9968297942787993, 0.8824985810521372,
        0.6218858552992458, 0.2581903535679677, -0.14830235628411279, -0.5302127116098249,
        -0.8242358803947389, -0.9816350660353589, -0.9763200385412226, -0.8091718081231724,
        -0.5078965903906252, -0.1224332696464244, 0.2833243883941131, 0.6421186620624653,
        0.8944764029991382, 0.9985672073547485, 0.9371371546945946, 0.7203687894562888,
        0.3841932791405121, -0.015665476884376632, -0.4129275492405401, -0.7417434305618801,
        -0.9476091414709055, -0.996400720506787, -0.8800305558215797, -0.6177879744108987,
        -0.25314187501427304, 0.15346460500604223, 0.5346330446470065, 0.8271815906171784,
        0.9826178773641395, 0.9751770417878339, 0.806092464548504, 0.5033913269181404,
        0.11724887133531664, -0.2883285642114191, -0.6461131314375246, -0.8967990492617742,
        -0.9988330324826934, -0.9353020959520906, -0.7167370231606575, -0.3793668008963666,
        0.020886637985905718, 0.4176779421273729, 0.7452356379265054, 0.949264300767451,
        0.9959444752540446, 0.8775385324818322, 0.6136732466719804, 0.2480864933748611,
        -0.158622668804709, -0.5390387984379358, -0.830104743902244, -0.9835738930652471,
        -0.974007452315619, -0.8029911391291659, -0.4988723361495442, -0.1120612756906637,
        0.293324877414944, 0.6500899815454165, 0.8990972401445789, 0.9990716198016564,
        0.9334415318658477, 0.7130857117103383, 0.3745299774592567, -0.026107229516508294,
        -0.4224169450905343, -0.7487075229897125, -0.9508935739760762, -0.9954610709622121,
    ];
    const W_SHAPE: [usize; 4] = [3, 2, 3, 5];
    #[rustfmt::skip]
    const W: [f64; 90] = [
        0.5, 0.4791219377563486, 0.41823132495759346, 0.32241327362000066,
        0.1996697647031366, 0.06025138468368331, -0.0841987239745384, -0.22161720783285446,
        -0.34052794025357624, -0.43100041854503174, -0.4854790825747953, -0.4994142965886093,
        -0.471642299524238, -0.4044823933150429, -0.3035432527694776, -0.17725453252406598,
        -0.03616288762662724, 0.10794880134592708, 0.24304544314397009, 0.3578448133820305,
        0.44275975847065946, 0.49069884037395045, 0.49765855854838176, 0.46305769127697727,
        0.38978583480204404, 0.2839620866443478, 0.15442402600746025, 0.011989667662976678,
        -0.13144597479250017, -0.2639042682743964, -0.37432332279869934, -0.4534817947924362,
        -0.4947689822340157, -0.4947368992463561, -0.4533882251519103, -0.3741760807164239,
        -0.2637156502678048, -0.1312317327755215, 0.012211641857680915, 0.15463519481567511,
        0.2841448148839868, 0.38992486242686303, 0.4631414077773588, 0.497679972571102,
        0.49065616358581254, 0.44265655490621997, 0.3576897018030576, 0.24285137726726638,
        0.10773198804930544, -0.036384341777159164, -0.17746213339435166, -0.30371966314395116,
        -0.40461288076658897, -0.4717159667523155, -0.4994249914773255, -0.48542591196994084,
        -0.43088782284339766, -0.34036532257543106, -0.2214181487462217, -0.083979847351423,
        0.06047179996423707, 0.19987331126534125, 0.32258295283267685, 0.418352966528085,
        0.47918538312353504, 0.4999999506985809, 0.4790583979035965, 0.4181096009095105,
        0.3222435308255972, 0.19946617876492076, 0.06003095752121513, -0.0844175839931879,
        -0.2218162232153154, -0.34069049077767893, -0.43111292925093647, -0.4855321574404189,
        -0.49940350321255894, -0.47156853928562176, -0.4043518260972728, -0.3033667825345508,
        -0.17704689669817947, -0.0359414263445686, 0.10816559335443232, 0.243239461090732,
        0.3579998543919749, 0.44286287472036123, 0.4907414203934914, 0.4976370463845689,
        0.4629738834589905, 0.38964673030924524,
    ];
    const B_SHAPE: [usize; 1] = [3];
    #[rustfmt::skip]
    const B: [f64; 3] = [
        0.1, -0.2, 0.3,
    ];
    const G_SHAPE: [usize; 4] = [2, 3, 3, 6];
    #[rustfmt::skip]
    const G: [f64; 108] = [
        0.3894183423086505, 0.5891447579422695, 0.7578425628952771, 0.8866269144494873,
        0.9687151001182652, 0.999783764189357, 0.9781966068080447, 0.9050905633252009,
        0.7843159250844198, 0.6222335553193047, 0.4273798802338298, 0.21001729925089915,
        -0.01840630693305381, -0.24586050428463702, -0.4603659148289983, -0.6506251370651673,
        -0.8066177485832405, -0.920128053755624, -0.9851777815038596, -0.9983409441568876,
        -0.9589242746631382, -0.8690037390319161, -0.733315200995656, -0.5590049972802488,
        -0.3552535599880418, -0.13279190885251674, 0.09666352163141811, 0.32102795412328977,
        0.5284847399429315, 0.7081077089878838, 0.8504366206285648, 0.9479754081880525,
        0.9955869758598549, 0.9907637552114834, 0.9337597718176507, 0.827577266441983,
        0.6778085753922855, 0.49234159776988917, 0.2809443618313018, 0.05475057019284918,
        -0.1743267812229814, -0.39422282744538945, -0.5933562572321768, -0.7612392684208814,
        -0.8890299312076, -0.9699978679206785, -0.9998787232348542, -0.9770987558686361,
        -0.9028577231468491, -0.7810656931296704, -0.6181371122370333, -0.4226529742520583,
        -0.20490888331956883, 0.023627186799375192, 0.25091887890969955, 0.46499537373422123,
        0.6545818595662526, 0.8096933451453541, 0.9221605412887859, 0.9860601145603612,
        0.9980266527163616, 0.9574299115788806, 0.866408008238286, 0.7297548123914368,
        0.5546674665997017, 0.35036733287035443, 0.12761432924735064, -0.10185976505175898,
        -0.325969189715432, -0.5329107266143382, -0.711785342369123, -0.8531722100300827,
        -0.9496248777483951, -0.996063452619316, -0.9900421444685187, -0.93187807879679,
        -0.8246345946646914, -0.673959907170987, -0.4877896317219724, -0.2759288373084776,
        -0.04953564087836742, 0.17946645955183582, 0.39901656227079196, 0.5975515759154469,
        0.7646152152319554, 0.8914087044468666, 0.9712541842384289, 0.9999464159557676,
        0.9759742598059655, 0.9006002623708592, 0.7777941618010951, 0.614023812783338,
        0.4179145426793206, 0.1997948795984498, -0.028847422361009564, -0.25597041106933305,
        -0.4696121523868332, -0.6585207318610721, -0.8127468616681088, -0.9241678818435658,
        -0.9869155581206487, -0.9976851454565332, -0.9559094397335024, -0.8637886508173204,
        -0.7261745236422112, -0.5503148103415938, -0.345471551364521, -0.1224332696464244,
    ];
    const Y_SHAPE: [usize; 4] = [2, 3, 3, 6];
    #[rustfmt::skip]
    const Y: [f64; 108] = [
        -0.6657106167311805, -0.17675477190184782, 0.7321231803592319, 1.9906320833921898,
        2.3302271825678242, 2.142883635442386, -1.3036232681116726, -2.379825134940921,
        -3.3780982181446255, -3.424325401715507, -2.399607694456803, -1.3195395048663223,
        1.7539642497737937, 1.8729394048967316, 1.5059186597235092, 0.5471640904533688,
        -0.26757914155853313, -0.6640042766902255, -0.3486842133768682, -1.2175937659873997,
        -2.3064492224658584, -3.084045052709013, -2.6790787599975965, -1.9784391808543118,
        1.738750157935236, 2.3815327146234866, 2.609993353952132, 1.7652724251812892,
        0.5313934152160451, -0.34844215646412857, -0.6958321900005136, -0.14778329553349254,
        0.781180104400677, 1.648042375708273, 1.8073352622485988, 1.5142282134996814,
        1.288334491926941, 2.1003910908764287, 2.8218491086813944, 2.72762922553256,
        1.781680813120093, 0.9199614188487477, -1.1992543366676078, -1.085486479664721,
        -0.4292859790298705, 0.8817361841214344, 1.7044972406297672, 1.941800949870551,
        -0.6115580381275978, -1.551123126182733, -2.575033047496453, -2.914225541445061,
        -2.3379904797850446, -1.5026981269596917, -1.5074282157260297, -1.5115933802368997,
        -1.0257873324221414, 0.3247236430621023, 1.1469777083023551, 1.4682557134298684,
        -0.1825246995490298, -1.2059663734526362, -2.4699001431489997, -3.2491929317357995,
        -2.7365480927875634, -1.8953666432436087, 1.6582178005768369, 2.193149776780399,
        2.3842331153669574, 1.7540343782502164, 0.7243884095405876, -0.0056835766610630195,
        0.7637148957363882, 0.20352180506067474, -0.8012972111577334, -1.9981398376573973,
        -2.1492023929108135, -1.8693488743108435, 1.2043410287842606, 2.1754664542357927,
        3.000156518020828, 2.776777590056975, 1.6378800442777104, 0.5940775210343001,
        -1.2577861472999918, -1.126329785619493, -0.562939681012425, 0.48256345243316817,
        1.1555369007877567, 1.31581834177069, 0.4644643677154426, 1.307402888668736,
        2.326105612702756, 2.767619072492421, 2.1715499577838506, 1.4312491567393446,
        -1.5201857013992401, -1.9508036119329086, -1.9216727420568918, -0.8079161832355279,
        0.38470263246974906, 1.1063996983103532, 0.32559830129423434, -0.4061624033384155,
        -1.4408059658786712, -2.376032056393157, -2.354024717057082, -1.863941057142214,
    ];
    const DX_SHAPE: [usize; 4] = [2, 2, 5, 6];
    #[rustfmt::skip]
    const DX: [f64; 120] = [
        1.320856083727546, 1.0097020216631059, 0.26255320171114693, -0.4482953937124075,
        -1.030720506925262, -1.2136379054037323, -1.1014803493975323, -2.4502350229276044,
        -4.117358508454286, -4.972199343799685, -4.571572272873084, -3.6652993789859947,
        -1.257546817569875, -2.1151420707789663, -2.9819146174870506, -3.0956548524159877,
        -2.2756047190330855, -1.4213120647596926, -3.4042288451994085, -4.383432539525536,
        -4.929411840064473, -4.060645432428005, -2.443264845964999, -1.1128047561880645,
        -1.79782053148734, -1.8119366228941975, -1.393538735549963, -0.7258297255342768,
        0.16762536567984426, 0.6745603024143939, 1.6963161336539276, 2.7504096390274446,
        3.832434541779807, 3.890863440296058, 3.1431693849647693, 2.232372030757273,
        3.1796444159803365, 4.255373047555032, 4.987211432381342, 4.60359968586887,
        2.972004208684382, 1.5464906142302783, 1.5656951819518752, 1.6757501591964716,
        1.4130776881443032, 0.5482314574344075, -0.34626688358458874, -0.8473348244042093,
        1.633628917619494, 1.0518472143899007, -0.14074261990270892, -1.3012191231153274,
        -1.9281056646901742, -1.9927117054479235, -1.1024766619251924, -2.1148283325524497,
        -3.2964800868435913, -3.682929301633088, -3.2745020642725526, -2.5537505917325105,
        1.5307417549820876, 1.3415403610916794, 0.7100875811291094, 0.0037109547995470005,
        -0.7107067645140509, -1.02372111433997, -0.6150528465934685, -1.8419247377217756,
        -3.457082475136964, -4.455913427799498, -4.288536918913031, -3.564057097965244,
        -1.0124693186243465, -1.8829558637312094, -2.827027482430749, -3.041939767665423,
        -2.3402751151937466, -1.5463542079744121, -3.435548377091309, -4.577046706840472,
        -5.349448881607358, -4.641426961265085, -3.0273920024215637, -1.6140162324182585,
        -1.9147528014770308, -2.0557109916819125, -1.7823272648690887, -1.1574629273955706,
        -0.17691667210790446, 0.4372173193776254, 1.4933878316543328, 2.5495556669699164,
        3.689509509516693, 3.8774273507206916, 3.2495383087973773, 2.39725366406457,
        2.992549021672583, 4.173498339148451, 5.095279184413993, 4.877344981537485,
        3.31035446515703, 1.8695240783461424, 1.756825142257581, 2.0191823879912625,
        1.9274465689356175, 1.1048902007684172, 0.1340893062788618, -0.482799137266314,
        2.0424583909156167, 1.6430796363271525, 0.6055477826613591, -0.5668122712591122,
        -1.4116999066299905, -1.6855467555427959, -0.8270562708090047, -1.7837168137686954,
        -2.958464370286471, -3.4583627583875804, -3.198680693775627, -2.58037052354669,
    ];
    const DW_SHAPE: [usize; 4] = [3, 2, 3, 5];
    #[rustfmt::skip]
    const DW: [f64; 90] = [
        -2.595811624870585, -2.5205568271129017, -2.0117423023319, -2.7756106287380966,
        -3.2678038848909363, 2.3739333600236594, 4.14505322743015, 5.478987978117571,
        5.115313853380053, 4.4626213858406025, 5.423212315784214, 5.261788111578519,
        4.404662734549039, 3.404252607043226, 2.23318214057452, -1.623225695977072,
        -1.5708518377083511, -1.1503381159593429, -1.7372710069920754, -2.2243779826319185,
        -0.29167701025060677, 1.5650831366692848, 3.388977069293155, 3.1881708593250306,
        2.7965073375818195, 6.444453021408398, 6.598687591449875, 5.960822512005381,
        5.145169405513915, 3.9454416856215686, 6.470514758776359, 6.279332643409353,
        5.1873022742238835, 4.868570494258189, 4.2124688752755715, -7.483732187741016,
        -9.581311252558068, -11.034409356193795, -12.012243602005025, -11.491085587677961,
        0.16546725116254002, 0.16226344125208758, 0.051736154071014506, 1.0851557399645004,
        1.9507102957196416, 6.660142949689375, 6.755318873665301, 5.913171139103904,
        5.62805535016055, 4.943838203645226, -5.015966189082354, -7.0734434058451185,
        -8.802831690686808, -10.28701996889981, -10.358330511398439, -1.0545456105627902,
        -1.1578835936242695, -1.2759739628794637, -0.46411178979729617, 0.4079573409136217,
        -4.41359079121533, -4.281741141904362, -3.607577094876131, -2.4984318636387366,
        -1.2954944944218039, 5.733070863549409, 6.234223962512028, 6.474406532957225,
        7.897352443733754, 7.985482989853919, -5.602460272603827, -5.437565433716934,
        -4.460707660936463, -4.579784005873555, -4.346354580426384, -5.59159782632622,
        -5.747074200598817, -5.2553031064714055, -4.35950896183082, -3.1312007837044433,
        5.725390839134297, 6.097461984911421, 6.146985991050185, 7.95558899788397,
        8.424502059658652, -5.3020810732529995, -5.3443713026742605, -4.57858086482592,
        -4.642404722638151, -4.387375175871529,
    ];
    const DB_SHAPE: [usize; 1] = [3];
    #[rustfmt::skip]
    const DB: [f64; 3] = [
        11.563742999540596, 2.10894779077125, -13.848331520103152,
    ];

    let mut conv = Conv2d::<f64>::new(2, 3, (3, 5), (2, 1), (1, 2));
    conv.weight.value = t64(&W_SHAPE, &W);
    conv.bias.value = t64(&B_SHAPE, &B);
    let y = conv.forward(&t64(&X_SHAPE, &X), Ctx::eval());
    assert_close("conv2d k(3,5) s(2,1) p(1,2) y", &y, &Y_SHAPE, &Y);
    let dx = conv.backward(&t64(&G_SHAPE, &G));
    assert_close("conv2d k(3,5) s(2,1) p(1,2) dx", &dx, &DX_SHAPE, &DX);
    assert_close("conv2d k(3,5) s(2,1) p(1,2) dw", &conv.weight.grad, &DW_SHAPE, &DW);
    assert_close("conv2d k(3,5) s(2,1) p(1,2) db", &conv.bias.grad, &DB_SHAPE, &DB);
}

/// `F.avg_pool2d`, kernel (3, 2), stride (2, 1), padding (1, 1), floor mode, PyTorch's default
/// `count_include_pad=True`: windows at the border divide by their full size, padding included.
///
/// Generated by:
///
/// ```python
/// import torch
/// import torch.nn.functional as F
///
/// def show(name, t):
///     print(name, list(t.shape), repr(t.detach().flatten().tolist()))
///
/// x = (torch.arange(2 * 2 * 5 * 4, dtype=torch.float64) * 0.57 + 0.3).sin().reshape(2, 2, 5, 4).requires_grad_()
/// y = F.avg_pool2d(x, (3, 2), stride=(2, 1), padding=(1, 1))  # count_include_pad=True, floor mode
/// g = (torch.arange(y.numel(), dtype=torch.float64) * 0.31 + 0.1).cos().reshape(y.shape)
/// y.backward(g)
/// for name, t in [("x", x), ("g", g), ("y", y), ("dx", x.grad)]:
///     show(name, t)
/// ```
#[test]
fn avg_pool2d_k3x2_s2x1_p1x1() {
    const X_SHAPE: [usize; 4] = [2, 2, 5, 4];
    #[rustfmt::skip]
    const X: [f64; 80] = [
        0.29552020666133955, 0.764328937025505, 0.9914583481916864, 0.905090563325201,
        0.5325349075556215, -0.008407247367148174, -0.5466910470692868, -0.9121122039130803,
        -0.9891252607943699, -0.7533788393277465, -0.27941549819892675, 0.2828984785094921,
        0.7557605080570537, 0.9896525389352379, 0.9106183671457304, 0.5436484436660883,
        0.0047779425901285115, -0.5356033346142913, -0.9066278820139979, -0.990978461339483,
        -0.7619835839190333, -0.29205098337866586, 0.2702275685118367, 0.747060690270354,
        0.9876746787761803, 0.9159878601391399, 0.5546674665997031, 0.017962301903010295,
        -0.5244225076230947, -0.9009859430328635, -0.9926593804706332, -0.7704558578115354,
        -0.3046356955513944, 0.2575096795036255, 0.7382309961270456, 0.9855251115651197,
        0.92119810882011, 0.5655900607014568, 0.031143538473179848, -0.5131505098803122,
        -0.8951873678196802, -0.9941677259603542, -0.7787941881020741, -0.3171674468673327,
        0.24474702248740526, 0.729272960667749, 0.9832042110039001, 0.9262482073879157,
        0.5764143270804788, 0.04431936074520363, -0.5017893010205711, -0.8892331644556275,
        -0.9955032355830743, -0.7869971251735404, -0.32964405868393676, 0.23194181624863142,
        0.7201881412451978, 0.9807123805806345, 0.9311372778838992, 0.5871383839401556,
        0.057487478104931655, -0.4903408561878325, -0.8831243680778075, -0.9966656771607041,
        -0.7950632429469117, -0.34206336194465703, 0.21909628696993003, 0.7109781172534897,
        0.9780500534995634, 0.9358644703440931, 0.5977603669052606, 0.0706456012776955,
        -0.47880716569202725, -0.8768620406992947, -0.997654848602999, -0.8029911391291701,
        -0.3544231975560188, 0.20621266784408684, 0.7016444898535182, 0.9752176926057321,
    ];
    const G_SHAPE: [usize; 4] = [2, 2, 3, 5];
    #[rustfmt::skip]
    const G: [f64; 60] = [
        0.9950041652780258, 0.9171208228166051, 0.751805729140895, 0.5148188449699553,
        0.22875280780845939, -0.07912088880673408, -0.3794517647881545, -0.6436084187135406,
        -0.8464080412157756, -0.9685171642284466, -0.9982947757947531, -0.9329020910333035,
        -0.7785731816204325, -0.5500206639064251, -0.2690331031173999, 0.03760215288797655,
        0.34065268810778926, 0.6112278282257344, 0.823532871227622, 0.9573281701231305,
        0.9998586363834151, 0.9470697190130278, 0.8039939364932571, 0.5842711124011549,
        0.3088480520149205, 0.003981623454079739, -0.3012643846589916, -0.5777899972975187,
        -0.7992332368822151, -0.944483286005189, -0.9996930420352065, -0.9595992010174046,
        -0.8280240234935597, -0.6175109474721022, -0.3481287866056745, -0.0455585127842237,
        0.2613549843687072, 0.5433527633267751, 0.7735511692438012, 0.9300047296636599,
        0.9977982791785807, 0.970468864808259, 0.8506218777929894, 0.6496826741947139,
        0.3868073630245079, 0.0870565995797052, -0.22099351850480609, -0.507975692378278,
        -0.7465310905707375, -0.9139175446495339, -0.9941776251838151, -0.9796599091340726,
        -0.8717484118953137, -0.6807306451508596, -0.42481687895893255, -0.12840410462247173,
        0.18024980027273496, 0.47171997615231287, 0.7182197374783393, 0.8962495569579382,
    ];
    const Y_SHAPE: [usize; 4] = [2, 2, 3, 5];
    #[rustfmt::skip]
    const Y: [f64; 60] = [
        0.13800918570282683, 0.2639961339792196, 0.20011483179679276, 0.07295761008908673,
        -0.0011702734313132253, 0.049861692469717556, 0.08783943450977477, 0.05206304568631002,
        -0.0001755766433305106, -0.014260880289583314, 0.12675640844119704, 0.20243127582802142,
        0.07633994824211317, -0.07388992209027705, -0.07455500294556577, 0.03761518247619117,
        0.14160466193627017, 0.2414719853120023, 0.2649863378808174, 0.12750383202889407,
        0.02643607926694853, 0.07185467870193218, 0.09545844647766955, 0.08887843965211835,
        0.03883859260943243, 0.10276040221145259, 0.23994369224563297, 0.26541237913421795,
        0.2069581893808388, 0.07872910028080125, -0.10840672422204582, -0.15255585177081335,
        -0.010080790398463213, 0.13558179723706817, 0.10151346008676383, -0.029056981002531717,
        -0.03129111496262962, 0.02306100792313409, 0.07012128508005196, 0.044826143196819934,
        -0.045885849056312746, -0.013599973155130377, 0.13253474576784274, 0.2367622365647916,
        0.13651336669813116, -0.12292929414033, -0.2616633304957449, -0.24940538320672787,
        -0.15828594016918196, -0.04761459331786907, -0.049303392523229246, -0.0964802145732057,
        -0.0773098545046112, -0.03369426922096554, -0.0035612367663308184, -0.13887172720800767,
        -0.25064662268387566, -0.16110995526744815, -0.020630634212153165, 0.028704425579427,
    ];
    const DX_SHAPE: [usize; 4] = [2, 2, 5, 4];
    #[rustfmt::skip]
    const DX: [f64; 80] = [
        0.3186874980157718, 0.27815442532625, 0.2111040956851417, 0.12392860879640247,
        0.24225872241662372, 0.10764439474263417, -0.037231980969744324, -0.17855892544430124,
        -0.0764287755991481, -0.17051003058361586, -0.24833607665488605, -0.30248753424070374,
        -0.39829492007049083, -0.4557559093592385, -0.4697683842426957, -0.4389964954113412,
        -0.32186614447134276, -0.2852458787756227, -0.22143230758780963, -0.1365089611706375,
        0.0630424734992943, 0.15864675272225395, 0.23912678324222605, 0.29681017355845873,
        0.38753053273203475, 0.45049069530663477, 0.47050429139129474, 0.4456633676278046,
        0.3244880592327405, 0.29184394258438084, 0.23137750814906868, 0.1488531940693459,
        0.2749409323652552, 0.14533487892496247, 0.0018736357857797037, -0.14176622641188813,
        -0.04954712686748531, -0.14650906365941838, -0.22950387236328898, -0.290619420481234,
        -0.32654870717543516, -0.2979372040851607, -0.24092249516094366, -0.16093995567962943,
        -0.29058262857802125, -0.16381924613591364, -0.021438506399180934, 0.12298602747161408,
        0.03596607859741391, 0.13411795794924705, 0.21948398876176273, 0.2839259831512435,
        0.36401060259522056, 0.4376330817161218, 0.4695347474263799, 0.45667432268778047,
        0.3280445239978066, 0.30351512376687473, 0.25005075866461723, 0.17274833953653695,
        -0.022322819820850145, -0.12149486848051401, -0.20908446382483592, -0.27674143920337857,
        -0.35129574220716475, -0.43006292198541174, -0.4678309733325315, -0.46099935988834395,
        -0.3289729223863146, -0.3085680535048977, -0.2587465095076955, -0.18425792068496535,
        -0.3203319731112707, -0.199906424100723, -0.060423223902586795, 0.08482029505441423,
        0.008640949275043872, 0.10866162940417465, 0.1983232856051087, 0.26907821573937957,
    ];

    let mut pool = AvgPool2d::with_options((3, 2), (2, 1), (1, 1), false);
    let y = pool.forward(&t64(&X_SHAPE, &X), Ctx::eval());
    assert_close("avg_pool2d k(3,2) s(2,1) p(1,1) y", &y, &Y_SHAPE, &Y);
    let dx = Layer::<f64>::backward(&mut pool, &t64(&G_SHAPE, &G));
    assert_close("avg_pool2d k(3,2) s(2,1) p(1,1) dx", &dx, &DX_SHAPE, &DX);
}

/// `F.avg_pool2d` in ceil mode: kernel 3, stride 2, padding 1 on 6x7 (the last window row
/// hangs past the padded input and divides by 2 x 3), and kernel 2, stride 2, no padding on 5x5
/// (the last window row and column hold one input each: the corner divides by 1).
///
/// Generated by:
///
/// ```python
/// import torch
/// import torch.nn.functional as F
///
/// def show(name, t):
///     print(name, list(t.shape), repr(t.detach().flatten().tolist()))
///
/// # Padding 1 and ceil mode: the last row and column of windows hang past the padded input.
/// x = (torch.arange(1 * 2 * 6 * 7, dtype=torch.float64) * 0.43 - 0.2).sin().reshape(1, 2, 6, 7).requires_grad_()
/// y = F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)
/// g = (torch.arange(y.numel(), dtype=torch.float64) * 0.37 + 0.5).sin().reshape(y.shape)
/// y.backward(g)
/// # No padding, ceil mode: the last window holds one row (column) and divides by it alone.
/// x2 = (torch.arange(1 * 1 * 5 * 5, dtype=torch.float64) * 0.71 + 0.1).cos().reshape(1, 1, 5, 5).requires_grad_()
/// y2 = F.avg_pool2d(x2, 2, stride=2, ceil_mode=True)
/// g2 = (torch.arange(y2.numel(), dtype=torch.float64) * 0.53 - 0.3).cos().reshape(y2.shape)
/// y2.backward(g2)
/// for name, t in [("x", x), ("g", g), ("y", y), ("dx", x.grad), ("x2", x2), ("g2", g2), ("y2", y2), ("dx2", x2.grad)]:
///     show(name, t)
/// ```
#[test]
fn avg_pool2d_ceil_mode() {
    const X_SHAPE: [usize; 4] = [1, 2, 6, 7];
    #[rustfmt::skip]
    const X: [f64; 84] = [
        -0.19866933079506122, 0.22797752353518838, 0.6131168519734337, 0.8866269144494873,
        0.998710143975583, 0.9289597150038693, 0.6900749835569364, 0.32554933451756046,
        -0.09824859374510825, -0.5041585478536115, -0.8182771110644103, -0.9834131875473106,
        -0.9695006994538088, -0.7790726726314031, -0.4468000524054308, -0.03317921654755682,
        0.38648250951987934, 0.735777944551493, 0.951111392407109, 0.9932774150958098,
        0.8545989080882804, 0.5603248592277947, 0.1640333033706535, -0.2621235500878886,
        -0.6405559617968117, -0.9023633099588236, -0.9998787232348542, -0.915347716539449,
        -0.6641607235200951, -0.29205098337866414, 0.13323204141994396, 0.5342577081986536,
        0.8380118750848066, 0.9891904763471814, 0.9602686507235385, 0.7565121516412421,
        0.415018619385944, -0.002036730642880013, -0.4187212561773265, -0.7591698304091865,
        -0.9613974918795568, -0.9885849534745251, -0.8357822348250097, -0.5308098978108067,
        -0.1291937985718886, 0.2959444218663244, 0.6672004851395332, 0.9169803564502815,
        0.999806989136414, 0.9006002623708592, 0.6374225961502389, 0.2581903535679677,
        -0.16805021957077595, -0.5636941411983266, -0.8567071157125791, -0.9937407101726596,
        -0.9498454234965098, -0.7330132047148681, -0.38272237079396737, 0.03725015134268981,
        0.4504405942753893, 0.7816199935763704, 0.9704910125686596, 0.98266618800805,
        0.8159288039571381, 0.500636485932415, 0.09419403354317746, -0.3293981853034639,
        -0.693017370434997, -0.9304599220068656, -0.9984950306638146, -0.8847356461810963,
        -0.6098937691263742, -0.22400944797089567, 0.20265993750812936, 0.5924313320231772,
        0.8743396421785503, 0.9970582446234166, 0.9382439474087477, 0.7086049814452153,
        0.3499513689566688, -0.07241736457831363, -0.48160117712348144, -0.8031005854383914,
    ];
    const G_SHAPE: [usize; 4] = [1, 2, 4, 4];
    #[rustfmt::skip]
    const G: [f64; 32] = [
        0.479425538604203, 0.7643289370255051, 0.945783999449539, 0.9992316344213905,
        0.9174379552818098, 0.7114733527908443, 0.40921416967201774, 0.05156976839853464,
        -0.3130543591029702, -0.6353080477042756, -0.8715757724135882, -0.9898798050735039,
        -0.9742082498528093, -0.8266821782320363, -0.5672685519289686, -0.23107778829939224,
        0.13638826994159764, 0.48539481567229026, 0.7687054501917558, 0.9479754081880525,
        0.998941341839772, 0.9147052511191576, 0.706668095735878, 0.40298672872464775,
        0.044762998476742054, -0.31951919362227366, -0.6405559617968104, -0.8748964855260087,
        -0.9908238742642129, -0.972647899785673, -0.8228285949687089, -0.5616432998861642,
    ];
    const Y_SHAPE: [usize; 4] = [1, 2, 4, 4];
    #[rustfmt::skip]
    const Y: [f64; 32] = [
        0.02851210372361993, 0.034115226366108815, 0.004789530595934443, -0.014393185947156242,
        0.05240884826865698, -0.11891658040592902, -0.2926469156668452, -0.20176927651949164,
        0.10440858074743055, -0.04099408996759733, -0.2578473904251019, -0.21286108422862948,
        0.195255128504531, -0.0009565612390437517, -0.35654809641101165, -0.3249970742256803,
        0.01904785843169797, 0.040389272847895535, 0.03240819855271751, 0.007371057744606298,
        0.18375102469721202, 0.11775962549044618, -0.13859580660916843, -0.19131267913134126,
        0.20562961190582682, 0.18765786199611068, -0.06235631926444431, -0.1601564534224453,
        0.3225503653386941, 0.3328000496351053, -0.03401119545752104, -0.2141169604269788,
    ];
    const DX_SHAPE: [usize; 4] = [1, 2, 6, 7];
    #[rustfmt::skip]
    const DX: [f64; 84] = [
        0.05326950428935589, 0.13819494173663424, 0.08492543744727835, 0.19001254849722712,
        0.10508711104994878, 0.21611284820788107, 0.11102573715793228, 0.15520705487622366,
        0.3191850870780403, 0.16397803220181661, 0.314533384326434, 0.1505553521246174,
        0.26731106354905354, 0.11675571142443612, 0.10193755058686776, 0.180990145341406,
        0.07905259475453826, 0.1245208358292069, 0.04546824107466864, 0.051198215341172484,
        0.005729974266503849, 0.06715373290875996, 0.07561654458504537, 0.008462811676285403,
        -0.04291069973944464, -0.051373511415730044, -0.1556301821573933, -0.10425667074166325,
        -0.0347838176781078, -0.10537360075636065, -0.07058978307825285, -0.16743153556865153,
        -0.09684175249039868, -0.2068283974985658, -0.1099866450081671, -0.1971518593202427,
        -0.4055220054371682, -0.20837014611692556, -0.3997566572621523, -0.19138651114522678,
        -0.3398861208699593, -0.14849960972473247, 0.01515425221573307, 0.0690870095126542,
        0.05393275729692114, 0.13934447398489402, 0.08541171668797287, 0.19074231759775648,
        0.1053306009097836, 0.12614773464237442, 0.28171440873031306, 0.15556667408793864,
        0.319497068079898, 0.1639303939919593, 0.31403729809337044, 0.15010690410141114,
        0.11099348242664134, 0.21262739921765883, 0.1016339167910175, 0.18015259409500395,
        0.07851867730398644, 0.12329498049561396, 0.04477630319162753, 0.11596714892405713,
        0.18209893309037756, 0.06613178416632043, 0.07347757682621683, 0.007345792659896391,
        -0.04508862476247706, -0.052434417422373446, 0.004973666497415784, -0.030528466127281287,
        -0.03550213262469707, -0.10667501726878711, -0.07117288464409005, -0.16838360525809104,
        -0.09721072061400098, -0.16016364587995302, -0.3577737618022623, -0.19761011592230923,
        -0.40592109972785073, -0.20831098380554153, -0.3991289210672366, -0.19081793726169502,
    ];
    const X2_SHAPE: [usize; 4] = [1, 1, 5, 5];
    #[rustfmt::skip]
    const X2: [f64; 25] = [
        0.9950041652780258, 0.6894984329517471, 0.05077448493357918, -0.6124875656583851,
        -0.9797489235606842, -0.8735208976839379, -0.3451409698083239, 0.3500373909938903,
        0.8760509948102233, 0.9786899607813735, 0.6083513145322552, -0.05598907248142789,
        -0.6932712706162236, -0.9955119302282575, -0.8166453193414427, -0.24311342256103172,
        0.4479094169177297, 0.9224682739361195, 0.951220124610113, 0.5202698824223821,
        -0.16211443649971652, -0.7661526988005202, -0.9999275594153891, -0.7504611808252095,
        -0.13831473848192571,
    ];
    const G2_SHAPE: [usize; 4] = [1, 1, 3, 3];
    #[rustfmt::skip]
    const G2: [f64; 9] = [
        0.955336489125606, 0.9736663950053748, 0.7248360107409052, 0.2771208750565576,
        -0.24663230996883403, -0.7027130767735542, -0.9659793123979749, -0.9641944846423657,
        -0.6978483250035634,
    ];
    const Y2_SHAPE: [usize; 4] = [1, 1, 3, 3];
    #[rustfmt::skip]
    const Y2: [f64; 9] = [
        0.11646018268437779, 0.1660938262698269, -0.0005294813896553618, 0.1892895591018813,
        0.04622629942543788, -0.14818771845953027, -0.4641335676501184, -0.8751943701202993,
        -0.13831473848192571,
    ];
    const DX2_SHAPE: [usize; 4] = [1, 1, 5, 5];
    #[rustfmt::skip]
    const DX2: [f64; 25] = [
        0.2388341222814015, 0.2388341222814015, 0.2434165987513437, 0.2434165987513437,
        0.3624180053704526, 0.2388341222814015, 0.2388341222814015, 0.2434165987513437,
        0.2434165987513437, 0.3624180053704526, 0.0692802187641394, 0.0692802187641394,
        -0.06165807749220851, -0.06165807749220851, -0.3513565383867771, 0.0692802187641394,
        0.0692802187641394, -0.06165807749220851, -0.06165807749220851, -0.3513565383867771,
        -0.4829896561989874, -0.4829896561989874, -0.48209724232118284, -0.48209724232118284,
        -0.6978483250035634,
    ];

    let mut pool = AvgPool2d::with_options(3, 2, 1, true);
    let y = pool.forward(&t64(&X_SHAPE, &X), Ctx::eval());
    assert_close("avg_pool2d k3 s2 p1 ceil y", &y, &Y_SHAPE, &Y);
    let dx = Layer::<f64>::backward(&mut pool, &t64(&G_SHAPE, &G));
    assert_close("avg_pool2d k3 s2 p1 ceil dx", &dx, &DX_SHAPE, &DX);

    let mut pool = AvgPool2d::with_options(2, 2, 0, true);
    let y = pool.forward(&t64(&X2_SHAPE, &X2), Ctx::eval());
    assert_close("avg_pool2d k2 s2 ceil y", &y, &Y2_SHAPE, &Y2);
    // The corner window holds x2[4][4] alone, and its divisor is 1 (not 4).
    assert_eq!(y.iter().last().copied(), Some(X2[24]));
    let dx = Layer::<f64>::backward(&mut pool, &t64(&G2_SHAPE, &G2));
    assert_close("avg_pool2d k2 s2 ceil dx", &dx, &DX2_SHAPE, &DX2);
}
