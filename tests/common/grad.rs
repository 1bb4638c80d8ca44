//! The finite-difference gradient checker shared by `gradcheck.rs` and `layers_pairs.rs`.
//!
//! For a layer y = f(x; W, b) it fixes random, non-uniform loss weights w of y's shape and
//! checks L = sum(w * y): `backward(w)` must return dL/dx and accumulate dL/dW, dL/db, and
//! central differences give the same numbers one element at a time,
//! dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h, shrinking h when a step crosses a kink
//! (a ReLU changing sign, a max-pool changing its winner). See `gradcheck.rs` for the full story.

use super::Lcg;
use medcnn::layers::{Ctx, Layer};
use medcnn::tensor::{from_vec, Tensor};

pub const TOLERANCE: f64 = 1e-6;

/// The smallest scale an element's error is measured against. Where the exact gradient is 0,
/// a backward that sums rounded terms which cancel (Winograd F(4x4, 3x3)'s, whose transforms
/// hold 1/6 and 1/24) leaves noise of a few 1e-16 where finite differences give exactly 0:
/// relative to 0 that would be an error of 1. Against 1e-8 it is below 1e-7. The gradients
/// checked here are of order 0.1 to 10, so a wrong one still fails by far.
pub const ZERO_FLOOR: f64 = 1e-8;

/// The worst relative error of one gradient, and how many elements were checked.
#[derive(Default, Clone, Copy)]
pub struct Worst {
    pub err: f64,
    pub count: usize,
}

impl Worst {
    pub fn add(&mut self, analytic: f64, numeric: f64) {
        let scale = analytic.abs().max(numeric.abs()).max(ZERO_FLOOR);
        let err = (analytic - numeric).abs() / scale;
        self.err = self.err.max(err);
        self.count += 1;
    }
}

/// sum(w * (a - b)), the loss difference of two outputs.
fn weighted_diff(w: &[f64], a: &Tensor<f64>, b: &Tensor<f64>) -> f64 {
    w.iter().zip(a.iter().zip(b.iter())).map(|(w, (a, b))| w * (a - b)).sum()
}

/// Which value the checker perturbs: an input element or a parameter element.
#[derive(Clone, Copy)]
enum Target {
    Input(usize),
    Param(usize, usize),
}

/// Runs the layer with element `target` moved by `delta`, returns the output and restores it.
fn forward_moved(layer: &mut dyn Layer<f64>, x: &Tensor<f64>, ctx: Ctx, target: Target, delta: f64) -> Tensor<f64> {
    match target {
        Target::Input(i) => {
            let mut xm = x.clone();
            xm.as_slice_mut().unwrap()[i] += delta;
            layer.forward(&xm, ctx)
        }
        Target::Param(p, i) => {
            let old = layer.params()[p].value.as_slice().unwrap()[i];
            layer.params_mut()[p].value.as_slice_mut().unwrap()[i] = old + delta;
            let y = layer.forward(x, ctx);
            layer.params_mut()[p].value.as_slice_mut().unwrap()[i] = old;
            y
        }
    }
}

/// The central difference of L = sum(w * y) for one element, shrinking h past kinks.
fn numeric(layer: &mut dyn Layer<f64>, x: &Tensor<f64>, ctx: Ctx, w: &[f64], y0: &Tensor<f64>, target: Target) -> f64 {
    let mut h = 1e-2;
    loop {
        let yp = forward_moved(layer, x, ctx, target, h);
        let ym = forward_moved(layer, x, ctx, target, -h);
        let (up, down) = (weighted_diff(w, &yp, y0), weighted_diff(w, y0, &ym));
        let linear = (up - down).abs() <= 1e-9 * up.abs().max(down.abs()) + 1e-14;
        if linear || h < 1e-7 {
            return (up + down) / (2.0 * h);
        }
        h /= 10.0; // crossed a kink: step closer
    }
}

/// Checks dx and every parameter gradient of `layer` at `x`, for up to `max_per_tensor`
/// elements of each tensor (all of them when the tensor is smaller). Returns the worst errors:
/// [dx, param 0, param 1, ...].
pub fn check(layer: &mut dyn Layer<f64>, x: &Tensor<f64>, ctx: Ctx, seed: u64, max_per_tensor: usize) -> Vec<Worst> {
    let mut rng = Lcg(seed);
    let y0 = layer.forward(x, ctx);
    // Loss weights in +-[0.5, 1.5): non-uniform, so a gradient routed to the wrong output shows.
    let w: Vec<f64> = (0..y0.len())
        .map(|_| {
            let v = 0.5 + rng.next();
            if rng.next() < 0.5 {
                -v
            } else {
                v
            }
        })
        .collect();
    // The contract is grad += dL/dW, not grad = dL/dW: start every gradient at seeded random
    // values and check what backward *added*. A backward that overwrites fails (see
    // `an_overwriting_backward_fails_the_checker` in gradcheck.rs).
    let prefill: Vec<Vec<f64>> = layer
        .params_mut()
        .into_iter()
        .map(|p| {
            p.grad = rng.tensor(p.grad.shape());
            p.grad.as_slice().unwrap().to_vec()
        })
        .collect();
    let dx = layer.backward(&from_vec(y0.shape(), w.clone()));
    let grads: Vec<Vec<f64>> = layer
        .params()
        .iter()
        .zip(&prefill)
        .map(|(p, pre)| p.grad.iter().zip(pre).map(|(g, pre)| g - pre).collect())
        .collect();

    let pick = |n: usize, rng: &mut Lcg| -> Vec<usize> {
        if n <= max_per_tensor {
            (0..n).collect()
        } else {
            (0..max_per_tensor).map(|_| (rng.next() * n as f64) as usize).collect()
        }
    };
    let mut out = vec![Worst::default(); 1 + grads.len()];
    // A layer told not to compute dx (the first conv block) returns an empty one: skip it.
    for i in pick(if dx.is_empty() { 0 } else { x.len() }, &mut rng) {
        let n = numeric(layer, x, ctx, &w, &y0, Target::Input(i));
        out[0].add(dx.as_slice().unwrap()[i], n);
    }
    for (p, g) in grads.iter().enumerate() {
        for i in pick(g.len(), &mut rng) {
            let n = numeric(layer, x, ctx, &w, &y0, Target::Param(p, i));
            out[1 + p].add(g[i], n);
        }
    }
    out
}

pub fn row(name: &str, shape: &[usize], worst: &[Worst]) -> String {
    let cell = |i: usize| {
        worst.get(i).filter(|w| w.count > 0).map_or("-".to_string(), |w| format!("{:.2e} ({})", w.err, w.count))
    };
    format!("{:<44} {:<16} {:<18} {:<18} {:<18}", name, format!("{shape:?}"), cell(0), cell(1), cell(2))
}

pub fn max_err(worst: &[Worst]) -> f64 {
    worst.iter().map(|w| w.err).fold(0.0, f64::max)
}
