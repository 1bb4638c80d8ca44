//! Every kernel against the CPU layers (the reference), on random inputs and small odd
//! shapes, for any device: `tests/kernels_emulated.rs` runs these on the CPU emulator and
//! `tests/cuda_vs_cpu.rs` on a GPU. Each check returns the largest error relative to the
//! largest magnitude of the CPU's result (so 1e-4 means "agrees to about four digits of the
//! tensor's scale"); data movement (im2col, col2im, argmax, dropout masks) must match exactly.

use anyhow::{ensure, Result};
use rand::{rngs::StdRng, RngExt, SeedableRng};

use super::engine::Engine;
use super::exec::{Buf, Exec};
use super::ops::{self, Bias, Gemm, GemmPlan, Tile};
use crate::backend::{AdamConfig, Backend, CpuBackend, IMAGE_SIDE};
use crate::layers::{self, Ctx, Layer};
use crate::model::{reference_model, ModelConfig};
use crate::tensor::{from_vec, gemm, slice, Tensor};

/// The tolerance of float results.
pub const TOL: f64 = 1e-4;

/// One comparison: what, its error, the tolerance it must meet.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub err: f64,
    pub tol: f64,
    /// Anything else worth printing.
    pub note: String,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.err <= self.tol
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = if self.ok() { "ok  " } else { "FAIL" };
        write!(f, "{status} {:<58} err {:>9.2e} (tol {:.0e}) {}", self.name, self.err, self.tol, self.note)
    }
}

/// max |got - want| / max |want| (infinite on a length mismatch or a NaN).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs())).max(1e-30);
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w as f64).abs();
        if d.is_nan() {
            return f64::INFINITY;
        }
        worst = worst.max(d);
    }
    worst / scale
}

fn check(name: impl Into<String>, got: &[f32], want: &[f32], tol: f64) -> Check {
    Check { name: name.into(), err: rel_err(got, want), tol, note: String::new() }
}

/// Exact equality, counted: err is the number of differing elements.
fn check_exact<T: PartialEq>(name: impl Into<String>, got: &[T], want: &[T]) -> Check {
    let diff = if got.len() != want.len() { usize::MAX } else { got.iter().zip(want).filter(|(a, b)| a != b).count() };
    Check { name: name.into(), err: diff as f64, tol: 0.0, note: "(exact)".into() }
}

fn random(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect()
}

/// (N, C, H, W) -> (C, N, H, W), the CUDA engine's image layout.
pub fn nchw_to_cnhw(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..n {
        for j in 0..c {
            out[(j * n + i) * hw..][..hw].copy_from_slice(&x[(i * c + j) * hw..][..hw]);
        }
    }
    out
}

/// (C, N, H, W) -> (N, C, H, W).
pub fn cnhw_to_nchw(x: &[f32], n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for i in 0..n {
        for j in 0..c {
            out[(i * c + j) * hw..][..hw].copy_from_slice(&x[(j * n + i) * hw..][..hw]);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// GEMM

/// One product on the device against `tensor::gemm` (plus the epilogue on the host).
pub fn check_gemm<E: Exec>(ex: &mut E, rng: &mut StdRng, g: &Gemm, plan: &GemmPlan, label: &str) -> Result<Check> {
    let (m, n, k) = (g.m, g.n, g.k);
    ensure!(
        g.lda == if g.ta { m } else { k } && g.ldb == if g.tb { k } else { n } && g.ldc == n,
        "check_gemm: packed only"
    );
    let a = random(rng, m * k);
    let b = random(rng, k * n);
    let c0 = random(rng, m * n);
    let bias = random(rng, m.max(n));
    let mut want = c0.clone();
    gemm(g.ta, g.tb, m, n, k, g.alpha, &a, &b, g.beta, &mut want);
    for r in 0..m {
        for c in 0..n {
            let v = &mut want[r * n + c];
            match g.bias {
                Bias::None => {}
                Bias::Rows(_) => *v += bias[r],
                Bias::Cols(_) => *v += bias[c],
            }
            if g.relu && *v < 0.0 {
                *v = 0.0;
            }
        }
    }
    let (da, db, dc, dbias) =
        (Buf::from_host(ex, &a)?, Buf::from_host(ex, &b)?, Buf::from_host(ex, &c0)?, Buf::from_host(ex, &bias)?);
    let ws = Buf::<f32>::alloc(ex, plan.workspace(m, n))?;
    let mut g2 = *g;
    g2.bias = match g.bias {
        Bias::None => Bias::None,
        Bias::Rows(_) => Bias::Rows(dbias.ptr),
        Bias::Cols(_) => Bias::Cols(dbias.ptr),
    };
    ops::gemm(ex, &g2, da.ptr, db.ptr, dc.ptr, plan, Some(&ws))?;
    let got = dc.read(ex)?;
    for b in [da, db, dc, dbias, ws] {
        b.free(ex)?;
    }
    let t = |x: bool| if x { "t" } else { "n" };
    let mut name = format!("sgemm {}{} {:?} {m}x{n}x{k}", t(g.ta), t(g.tb), plan.tile);
    if plan.splits > 1 {
        name += &format!(" split{}", plan.splits);
    }
    match g.bias {
        Bias::None => {}
        Bias::Rows(_) => name += " +bias_r",
        Bias::Cols(_) => name += " +bias_c",
    }
    if g.relu {
        name += " relu";
    }
    if !label.is_empty() {
        name += &format!(" {label}");
    }
    Ok(check(name, &got, &want, TOL))
}

/// Every tile and transpose on sizes that are not multiples of any tile, split-K, the fused
/// epilogues, alpha/beta, and the planner's own choice.
pub fn gemm_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for tile in Tile::ALL {
        // Sizes just past the tile, so every block has ragged edges somewhere.
        let (bmn, bk, _) = tile.shape();
        let (m, n, k) = (bmn + 3, bmn + 5, 3 * bk + 1);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let g = Gemm::new(ta, tb, m, n, k);
            out.push(check_gemm(ex, &mut rng, &g, &GemmPlan::simple(tile, k), "")?);
        }
    }
    // Odd small shapes, k not a multiple of the k step, on the small tiles.
    for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (33, 17, 29), (6, 128, 3)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let g = Gemm::new(ta, tb, m, n, k);
            out.push(check_gemm(ex, &mut rng, &g, &GemmPlan::simple(Tile::T16, k), "")?);
        }
        out.push(check_gemm(ex, &mut rng, &Gemm::new(false, true, m, n, k), &GemmPlan::simple(Tile::T64, k), "")?);
    }
    // Split-K (deterministic partial sums) with every epilogue.
    for tile in Tile::ALL {
        let (m, n, k) = (19, 23, 301);
        for splits in [2, 5] {
            let plan = GemmPlan::split(tile, k, splits);
            out.push(check_gemm(ex, &mut rng, &Gemm::new(false, true, m, n, k), &plan, "")?);
            let g = Gemm::new(true, false, m, n, k).bias(Bias::Rows(Default::default())).relu().alpha_beta(0.5, 0.25);
            out.push(check_gemm(ex, &mut rng, &g, &plan, "a0.5 b0.25")?);
        }
    }
    // Fused epilogues without a split.
    let g = Gemm::new(false, false, 21, 37, 19).bias(Bias::Rows(Default::default())).relu();
    out.push(check_gemm(ex, &mut rng, &g, &GemmPlan::simple(Tile::T64, 19), "")?);
    let g = Gemm::new(true, true, 21, 37, 19).bias(Bias::Cols(Default::default())).alpha_beta(-1.5, 1.0);
    out.push(check_gemm(ex, &mut rng, &g, &GemmPlan::simple(Tile::T128, 19), "a-1.5 b1")?);
    // Whatever the planner picks for a long thin product (conv dW-like).
    let (m, n, k) = (9, 18, 2000);
    let plan = ops::plan_gemm(m, n, k, ex.sm_count(), true);
    out.push(check_gemm(ex, &mut rng, &Gemm::new(false, true, m, n, k), &plan, "planned")?);
    Ok(out)
}

/// The kernels that use shared memory and __syncthreads (SGEMM in every tile and transpose,
/// split-K, the block reductions of bias_grad and cross-entropy), on small shapes: for the
/// race detector, which is slow.
pub fn shared_memory_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        out.push(check_gemm(ex, &mut rng, &Gemm::new(ta, tb, 19, 21, 13), &GemmPlan::simple(Tile::T16, 13), "")?);
    }
    for tile in [Tile::T64, Tile::T128] {
        out.push(check_gemm(ex, &mut rng, &Gemm::new(true, true, 9, 7, 27), &GemmPlan::split(tile, 27, 2), "")?);
    }
    out.extend(elementwise_checks(ex, seed + 1)?.into_iter().filter(|c| c.name.starts_with("bias_grad")));
    out.extend(cross_entropy_checks(ex, seed + 2)?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Convolution

/// A conv layer's forward and backward on the device (im2col, GEMMs, bias, col2im) against
/// `layers::Conv2d`: y, col, dW, db, dx.
#[allow(clippy::too_many_arguments)]
pub fn conv_checks<E: Exec>(
    ex: &mut E,
    seed: u64,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oc: usize,
    ksz: usize,
    stride: usize,
    pad: usize,
) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let label = format!("conv n{n} c{c} {h}x{w} oc{oc} k{ksz} s{stride} p{pad}");
    let mut conv = layers::Conv2d::<f32>::new(c, oc, (ksz, ksz), stride, pad);
    conv.weight.value = from_vec(&[oc, c, ksz, ksz], random(&mut rng, oc * c * ksz * ksz));
    conv.bias.value = from_vec(&[oc], random(&mut rng, oc));
    let x = random(&mut rng, n * c * h * w);
    let xt = from_vec(&[n, c, h, w], x.clone());
    let y_cpu = conv.forward(&xt, Ctx::train(0));
    let (oh, ow) = (y_cpu.shape()[2], y_cpu.shape()[3]);
    let (kk, l) = (c * ksz * ksz, oh * ow);
    let dy = random(&mut rng, n * oc * l);
    let dx_cpu = conv.backward(&from_vec(&[n, oc, oh, ow], dy.clone()));
    // The CPU's im2col of each image, as the device's (K, N*L) layout.
    let geo = conv.geometry(&[n, c, h, w]);
    let mut col_cpu = vec![0.0; kk * n * l];
    let mut phases = Vec::new();
    for i in 0..n {
        layers::conv2d::im2col(&geo, &x[i * c * h * w..][..c * h * w], &mut col_cpu[i * l..], n * l, &mut phases);
    }

    let p = ops::conv_params(n, c, h, w, oc, ksz, ksz, stride, pad)?;
    let dxin = Buf::from_host(ex, &nchw_to_cnhw(&x, n, c, h * w))?;
    let dwt = Buf::from_host(ex, slice(&conv.weight.value))?;
    let db = Buf::from_host(ex, slice(&conv.bias.value))?;
    let col = Buf::<f32>::alloc(ex, kk * n * l)?;
    let y = Buf::<f32>::alloc(ex, oc * n * l)?;
    ops::im2col(ex, &p, dxin.ptr, col.ptr)?;
    let gf = Gemm::new(false, false, oc, n * l, kk).bias(Bias::Rows(db.ptr));
    ops::gemm(ex, &gf, dwt.ptr, col.ptr, y.ptr, &ops::plan_gemm(gf.m, gf.n, gf.k, ex.sm_count(), false), None)?;
    let col_dev = col.read(ex)?;
    let y_dev = cnhw_to_nchw(&y.read(ex)?, n, oc, l);

    // Backward: db = row sums, dW = dy col^T (split-K as planned), dcol = W^T dy, col2im.
    let ddy = Buf::from_host(ex, &nchw_to_cnhw(&dy, n, oc, l))?;
    let gw_dev = Buf::<f32>::alloc(ex, oc * kk)?;
    let gb_dev = Buf::<f32>::alloc(ex, oc)?;
    let dx = Buf::<f32>::alloc(ex, n * c * h * w)?;
    ops::bias_grad(ex, &ops::row_sums(oc, n * l, 0.0)?, gb_dev.ptr, ddy.ptr)?;
    let gw = Gemm::new(false, true, oc, kk, n * l);
    let plan = ops::plan_gemm(gw.m, gw.n, gw.k, ex.sm_count(), true);
    let ws = Buf::<f32>::alloc(ex, plan.workspace(gw.m, gw.n))?;
    ops::gemm(ex, &gw, ddy.ptr, col.ptr, gw_dev.ptr, &plan, Some(&ws))?;
    let gx = Gemm::new(true, false, kk, n * l, oc);
    ops::gemm(ex, &gx, dwt.ptr, ddy.ptr, col.ptr, &ops::plan_gemm(gx.m, gx.n, gx.k, ex.sm_count(), false), None)?;
    ops::col2im(ex, &p, col.ptr, dx.ptr)?;
    let dx_dev = cnhw_to_nchw(&dx.read(ex)?, n, c, h * w);
    let (gw_host, gb_host) = (gw_dev.read(ex)?, gb_dev.read(ex)?);
    for b in [dxin, dwt, db, col, y, ddy, gw_dev, gb_dev, dx, ws] {
        b.free(ex)?;
    }
    let split = if plan.splits > 1 { format!(" (dW split {})", plan.splits) } else { String::new() };
    Ok(vec![
        check_exact(format!("{label} im2col"), &col_dev, &col_cpu),
        check(format!("{label} y"), &y_dev, slice(&y_cpu), TOL),
        check(format!("{label} dW{split}"), &gw_host, slice(&conv.weight.grad), TOL),
        check(format!("{label} db"), &gb_host, slice(&conv.bias.grad), TOL),
        check(format!("{label} dx"), &dx_dev, slice(&dx_cpu), TOL),
    ])
}

/// col2im against the CPU's on a random dcol: the same sums in the same order, so exact.
pub fn col2im_check<E: Exec>(ex: &mut E, seed: u64) -> Result<Check> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (c, h, w, k, s, pad) = (2, 7, 6, 3, 2, 1);
    let geo = layers::conv2d::ConvGeometry::new(c, h, w, k, k, s, pad);
    let (kk, l) = (geo.k(), geo.l());
    let dcol = random(&mut rng, kk * l);
    let mut want = vec![0.0; c * h * w];
    layers::conv2d::col2im(&geo, &dcol, &mut want, l, &mut Vec::new());
    let p = ops::conv_params(1, c, h, w, 1, k, k, s, pad)?;
    let d = Buf::from_host(ex, &dcol)?;
    let dx = Buf::<f32>::alloc(ex, c * h * w)?;
    ops::col2im(ex, &p, d.ptr, dx.ptr)?;
    let got = dx.read(ex)?;
    d.free(ex)?;
    dx.free(ex)?;
    Ok(check_exact("col2im c2 7x6 k3 s2 p1", &got, &want))
}

// ---------------------------------------------------------------------------------------
// Pools, ReLU, bias, dropout, loss, Adam

fn run_layer<L: Layer<f32>>(
    layer: &mut L,
    x: &[f32],
    shape: &[usize],
    dy: &[f32],
    ctx: Ctx,
) -> (Tensor<f32>, Tensor<f32>) {
    let y = layer.forward(&from_vec(shape, x.to_vec()), ctx);
    let dx = layer.backward(&from_vec(y.shape(), dy.to_vec()));
    (y, dx)
}

/// Max pooling (with padding, ceil mode, overlapping windows, ties), the fused ReLU
/// backward, average and global average pooling.
pub fn pool_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let (planes, h, w) = (5, 9, 7);
    for &(k, s, pad, ceil) in &[(2, 2, 0, false), (3, 2, 1, true), (3, 1, 1, false), (2, 2, 1, true)] {
        let label = format!("max_pool k{k} s{s} p{pad}{}", if ceil { " ceil" } else { "" });
        // Rounded values make ties, which must go to the first maximum.
        let x: Vec<f32> = random(&mut rng, planes * h * w).iter().map(|v| (v * 4.0).round() / 4.0).collect();
        let mut layer = layers::MaxPool2d::with_options(k, s, pad, ceil);
        let pp = ops::max_pool_params(planes, h, w, k, s, pad, ceil)?;
        let outs = (pp.oh * pp.ow) as usize;
        let dy = random(&mut rng, planes * outs);
        let (y_cpu, dx_cpu) = run_layer(&mut layer, &x, &[1, planes, h, w], &dy, Ctx::eval());
        let mut arg_cpu = vec![0u32; planes * outs];
        let mut scratch = vec![0.0f32; outs];
        for p in 0..planes {
            layers::max_pool2d::max_pool_plane(
                &layer,
                &x[p * h * w..][..h * w],
                h,
                w,
                &mut scratch,
                &mut arg_cpu[p * outs..][..outs],
            );
        }
        let (dxb, dyb) = (Buf::from_host(ex, &x)?, Buf::from_host(ex, &dy)?);
        let (yb, ab, dxo) = (
            Buf::<f32>::alloc(ex, planes * outs)?,
            Buf::<i32>::alloc(ex, planes * outs)?,
            Buf::<f32>::alloc(ex, x.len())?,
        );
        ops::max_pool_forward(ex, &pp, dxb.ptr, yb.ptr, ab.ptr)?;
        ops::max_pool_backward(ex, &pp, dyb.ptr, ab.ptr, dxb.ptr, dxo.ptr)?;
        let arg_dev: Vec<u32> = ab.read(ex)?.into_iter().map(|a| a as u32).collect();
        out.push(check_exact(format!("{label} y"), &yb.read(ex)?, slice(&y_cpu)));
        out.push(check_exact(format!("{label} argmax"), &arg_dev, &arg_cpu));
        out.push(check(format!("{label} dx"), &dxo.read(ex)?, slice(&dx_cpu), TOL));
        for b in [dxb, dyb, yb, dxo] {
            b.free(ex)?;
        }
        ab.free(ex)?;
    }
    // ReLU -> max-pool, backward fused through PoolParams::relu_mask.
    {
        let x = random(&mut rng, planes * h * w);
        let mut relu = layers::Relu::<f32>::new();
        let mut pool = layers::MaxPool2d::new(2, 2);
        let r = relu.forward(&from_vec(&[1, planes, h, w], x.clone()), Ctx::eval());
        let y = Layer::<f32>::forward(&mut pool, &r, Ctx::eval());
        let dy = random(&mut rng, y.len());
        let dr = Layer::<f32>::backward(&mut pool, &from_vec(y.shape(), dy.clone()));
        let dx_cpu = relu.backward(&dr);
        let mut pp = ops::max_pool_params(planes, h, w, 2, 2, 0, false)?;
        let (rb, dyb) = (Buf::from_host(ex, slice(&r))?, Buf::from_host(ex, &dy)?);
        let (yb, ab, dxo) =
            (Buf::<f32>::alloc(ex, y.len())?, Buf::<i32>::alloc(ex, y.len())?, Buf::<f32>::alloc(ex, x.len())?);
        ops::max_pool_forward(ex, &pp, rb.ptr, yb.ptr, ab.ptr)?;
        pp.relu_mask = 1;
        ops::max_pool_backward(ex, &pp, dyb.ptr, ab.ptr, rb.ptr, dxo.ptr)?;
        out.push(check("relu -> max_pool k2 s2 dx (fused relu_mask)", &dxo.read(ex)?, slice(&dx_cpu), TOL));
        for b in [rb, dyb, yb, dxo] {
            b.free(ex)?;
        }
        ab.free(ex)?;
    }
    // Average pooling.
    for &(k, s) in &[(2, 2), (3, 2), (2, 1)] {
        let label = format!("avg_pool k{k} s{s}");
        let x = random(&mut rng, planes * h * w);
        let mut layer = layers::AvgPool2d::new(k, s);
        let pp = ops::avg_pool_params(planes, h, w, k, s)?;
        let dy = random(&mut rng, planes * (pp.oh * pp.ow) as usize);
        let (y_cpu, dx_cpu) = run_layer(&mut layer, &x, &[1, planes, h, w], &dy, Ctx::eval());
        let (xb, dyb) = (Buf::from_host(ex, &x)?, Buf::from_host(ex, &dy)?);
        let (yb, dxo) = (Buf::<f32>::alloc(ex, dy.len())?, Buf::<f32>::alloc(ex, x.len())?);
        ops::avg_pool_forward(ex, &pp, xb.ptr, yb.ptr)?;
        ops::avg_pool_backward(ex, &pp, dyb.ptr, dxo.ptr)?;
        out.push(check(format!("{label} y"), &yb.read(ex)?, slice(&y_cpu), TOL));
        out.push(check(format!("{label} dx"), &dxo.read(ex)?, slice(&dx_cpu), TOL));
        for b in [xb, dyb, yb, dxo] {
            b.free(ex)?;
        }
    }
    // Global average pooling.
    {
        let (n, c, hh, ww) = (3, 5, 4, 3);
        let x = random(&mut rng, n * c * hh * ww);
        let dy = random(&mut rng, n * c);
        let mut layer = layers::GlobalAvgPool2d::new();
        let (y_cpu, dx_cpu) = run_layer(&mut layer, &x, &[n, c, hh, ww], &dy, Ctx::eval());
        let (xb, dyb) = (Buf::from_host(ex, &x)?, Buf::from_host(ex, &dy)?);
        let (yb, dxo) = (Buf::<f32>::alloc(ex, n * c)?, Buf::<f32>::alloc(ex, x.len())?);
        ops::global_avg_pool_forward(ex, n * c, hh * ww, xb.ptr, yb.ptr)?;
        ops::global_avg_pool_backward(ex, n * c, hh * ww, dyb.ptr, dxo.ptr)?;
        out.push(check("global_avg_pool y", &yb.read(ex)?, slice(&y_cpu), TOL));
        out.push(check("global_avg_pool dx", &dxo.read(ex)?, slice(&dx_cpu), TOL));
        for b in [xb, dyb, yb, dxo] {
            b.free(ex)?;
        }
    }
    Ok(out)
}

/// ReLU forward/backward (with NaN and exact zeros) and the bias kernels.
pub fn elementwise_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    {
        let mut x = random(&mut rng, 1001);
        x[3] = 0.0;
        x[10] = -0.0;
        let dy = random(&mut rng, x.len());
        let mut relu = layers::Relu::<f32>::new();
        let (y_cpu, dx_cpu) = run_layer(&mut relu, &x, &[x.len()], &dy, Ctx::eval());
        let (xb, dyb, yb, dxo) = (
            Buf::from_host(ex, &x)?,
            Buf::from_host(ex, &dy)?,
            Buf::<f32>::alloc(ex, x.len())?,
            Buf::<f32>::alloc(ex, x.len())?,
        );
        ops::relu_forward(ex, x.len(), xb.ptr, yb.ptr)?;
        ops::relu_backward(ex, x.len(), yb.ptr, dyb.ptr, dxo.ptr)?;
        out.push(check_exact("relu y", &yb.read(ex)?, slice(&y_cpu)));
        out.push(check_exact("relu dx", &dxo.read(ex)?, slice(&dx_cpu)));
        // In place, as the kernels allow.
        ops::relu_backward(ex, x.len(), yb.ptr, dyb.ptr, dyb.ptr)?;
        out.push(check_exact("relu dx in place", &dyb.read(ex)?, slice(&dx_cpu)));
        for b in [xb, dyb, yb, dxo] {
            b.free(ex)?;
        }
    }
    {
        let (rows, cols) = (13, 300);
        let y0 = random(&mut rng, rows * cols);
        let bias = random(&mut rng, rows.max(cols));
        for per_row in [true, false] {
            let want: Vec<f32> =
                (0..rows * cols).map(|e| y0[e] + if per_row { bias[e / cols] } else { bias[e % cols] }).collect();
            let (yb, bb) = (Buf::from_host(ex, &y0)?, Buf::from_host(ex, &bias)?);
            ops::bias_add(ex, rows, cols, per_row, yb.ptr, bb.ptr)?;
            out.push(check(
                format!("bias_add per {}", if per_row { "row" } else { "column" }),
                &yb.read(ex)?,
                &want,
                TOL,
            ));
            yb.free(ex)?;
            bb.free(ex)?;
        }
        let dy = random(&mut rng, rows * cols);
        let row_want: Vec<f32> = (0..rows).map(|r| dy[r * cols..][..cols].iter().sum()).collect();
        let col_want: Vec<f32> = (0..cols).map(|c| (0..rows).map(|r| dy[r * cols + c]).sum()).collect();
        let dyb = Buf::from_host(ex, &dy)?;
        let rb = Buf::<f32>::alloc(ex, rows)?;
        let cb = Buf::from_host(ex, &vec![1.0f32; cols])?;
        ops::bias_grad(ex, &ops::row_sums(rows, cols, 0.0)?, rb.ptr, dyb.ptr)?;
        ops::bias_grad(ex, &ops::col_sums(rows, cols, 1.0)?, cb.ptr, dyb.ptr)?;
        out.push(check("bias_grad row sums", &rb.read(ex)?, &row_want, TOL));
        let col_want1: Vec<f32> = col_want.iter().map(|v| v + 1.0).collect();
        out.push(check("bias_grad column sums, accumulating", &cb.read(ex)?, &col_want1, TOL));
        for b in [dyb, rb, cb] {
            b.free(ex)?;
        }
    }
    Ok(out)
}

/// The dropout masks are the CPU's, element for element, at several steps.
pub fn dropout_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let (n, f) = (7, 129);
    for &(p, step) in &[(0.4, 0u64), (0.4, 12345), (0.1, 7), (0.9, u64::MAX - 3)] {
        let x = random(&mut rng, n * f);
        let dy = random(&mut rng, n * f);
        let mut layer = layers::Dropout::<f32>::new(p, seed ^ 0xD50F);
        let (y_cpu, dx_cpu) = run_layer(&mut layer, &x, &[n, f], &dy, Ctx::train(step));
        let dp = ops::dropout_params(n * f, p, seed ^ 0xD50F, step)?;
        let (xb, dyb, yb) = (Buf::from_host(ex, &x)?, Buf::from_host(ex, &dy)?, Buf::<f32>::alloc(ex, n * f)?);
        ops::dropout_forward(ex, &dp, xb.ptr, yb.ptr)?;
        ops::dropout_backward(ex, &dp, dyb.ptr, dyb.ptr)?;
        let y = yb.read(ex)?;
        let kept_dev: Vec<bool> = y.iter().map(|&v| v != 0.0).collect();
        let kept_cpu: Vec<bool> = slice(&y_cpu).iter().map(|&v| v != 0.0).collect();
        let frac = kept_dev.iter().filter(|&&k| k).count() as f64 / kept_dev.len() as f64;
        let mut c = check_exact(format!("dropout p{p} step {step} mask"), &kept_dev, &kept_cpu);
        c.note = format!("(exact; kept {:.2})", frac);
        out.push(c);
        out.push(check_exact(format!("dropout p{p} step {step} y"), &y, slice(&y_cpu)));
        out.push(check_exact(format!("dropout p{p} step {step} dx (in place)"), &dyb.read(ex)?, slice(&dx_cpu)));
        for b in [xb, dyb, yb] {
            b.free(ex)?;
        }
    }
    Ok(out)
}

/// Softmax cross-entropy: dlogits, the loss sum and the correct count, accumulated over two
/// batches on the device (one with more rows than the block has threads).
pub fn cross_entropy_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let stats = Buf::<f64>::alloc(ex, 2)?;
    let (mut loss_sum, mut correct) = (0.0f64, 0u64);
    for &(n, k) in &[(5, 6), (300, 7)] {
        let logits: Vec<f32> = random(&mut rng, n * k).iter().map(|v| v * 4.0).collect();
        let targets: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
        let lt = from_vec(&[n, k], logits.clone());
        let mut ce = layers::SoftmaxCrossEntropy::<f32>::new();
        let loss = ce.forward(&lt, &targets);
        let dz = ce.backward();
        loss_sum += loss as f64 * n as f64;
        correct += layers::cross_entropy::argmax_rows(&lt).iter().zip(&targets).filter(|(a, b)| a == b).count() as u64;
        let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
        let (lb, tb, db) = (Buf::from_host(ex, &logits)?, Buf::from_host(ex, &t32)?, Buf::<f32>::alloc(ex, n * k)?);
        ops::cross_entropy(ex, n, k, lb.ptr, tb.ptr, db.ptr, stats.ptr)?;
        out.push(check(format!("cross_entropy n{n} k{k} dlogits"), &db.read(ex)?, slice(&dz), TOL));
        lb.free(ex)?;
        tb.free(ex)?;
        db.free(ex)?;
    }
    let s = stats.read(ex)?;
    stats.free(ex)?;
    out.push(Check {
        name: "cross_entropy loss sum".into(),
        err: ((s[0] - loss_sum) / loss_sum).abs(),
        tol: TOL,
        note: format!("({:.6} vs {loss_sum:.6})", s[0]),
    });
    out.push(check_exact("cross_entropy correct count", &[s[1] as u64], &[correct]));
    Ok(out)
}

/// Three Adam steps with weight decay on the device against `optim::Adam`: parameters and
/// both moments (the update rounds as the CPU's, so these agree to the last bit).
pub fn adam_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 1003;
    let mut p = layers::Param::new(from_vec(&[n], random(&mut rng, n)));
    let mut adam = crate::optim::Adam::<f32>::new(1e-2).with_weight_decay(1e-3);
    let (pb, gb, mb, vb) = (
        Buf::from_host(ex, slice(&p.value))?,
        Buf::<f32>::alloc(ex, n)?,
        Buf::<f32>::alloc(ex, n)?,
        Buf::<f32>::alloc(ex, n)?,
    );
    let mut host = crate::optim::Adam::<f32>::new(1e-2).with_weight_decay(1e-3);
    for step in 1..=3u64 {
        let g: Vec<f32> = random(&mut rng, n).iter().map(|v| v * 0.1).collect();
        p.grad = from_vec(&[n], g.clone());
        adam.step(&mut [&mut p]);
        gb.write(ex, 0, &g)?;
        host.lr = 1e-2;
        let ap = ops::adam_params(n, &host, step)?;
        ops::adam_step(ex, &ap, pb.ptr, gb.ptr, mb.ptr, vb.ptr)?;
    }
    let out = vec![
        check("adam x3 parameters", &pb.read(ex)?, slice(&p.value), 1e-6),
        check("adam x3 first moment", &mb.read(ex)?, &adam.m[0], 1e-6),
        check("adam x3 second moment", &vb.read(ex)?, &adam.v[0], 1e-6),
    ];
    for b in [pb, gb, mb, vb] {
        b.free(ex)?;
    }
    Ok(out)
}

/// Every kernel check above, on shapes small enough for the emulator.
pub fn kernel_checks<E: Exec>(ex: &mut E, seed: u64) -> Result<Vec<Check>> {
    let mut out = gemm_checks(ex, seed)?;
    out.extend(conv_checks(ex, seed + 1, 3, 2, 9, 8, 5, 3, 1, 0)?);
    out.extend(conv_checks(ex, seed + 2, 2, 3, 9, 10, 4, 3, 2, 1)?);
    out.push(col2im_check(ex, seed + 3)?);
    out.extend(pool_checks(ex, seed + 4)?);
    out.extend(elementwise_checks(ex, seed + 5)?);
    out.extend(dropout_checks(ex, seed + 6)?);
    out.extend(cross_entropy_checks(ex, seed + 7)?);
    out.extend(adam_checks(ex, seed + 8)?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// A whole training step

/// A winner may differ from the reference's only where the window's best and the other
/// side's pick are this close, relative to the largest value entering the pool: a near tie,
/// which rounding in another order of sums can legitimately break the other way. Measured on
/// the emulator at batch 64 (H100 plans): one flip in 1.6 million windows, its gap 5e-8 of the
/// scale; a wrong argmax kernel's picks lie up to 0.9 of the scale below the best.
pub const TIE_REL: f64 = 1e-4;

/// At most this fraction of a pool's windows may be near-tie flips (measured: 6e-7). More
/// would mean the two sides compute something different, not merely round differently.
pub const FLIP_BOUND: f64 = 1e-3;

/// How one side's max-pool winners (the device's, or the CPU backend's fused blocks') compare
/// with a layer-by-layer reference forward of the same batch from the same weights.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Winners {
    /// Windows compared.
    pub windows: usize,
    /// Winners (or liveness: max > 0 or not) that differ at a near tie (within `TIE_REL`).
    pub near_ties: usize,
    /// Winners that differ and are not near ties, or lie outside their window: a bug.
    pub wrong: usize,
    /// The largest gap, relative to the pool input's scale, among the near ties and among the
    /// wrong ones (infinite for a winner outside its window).
    pub tie_gap: f64,
    pub wrong_gap: f64,
}

impl Winners {
    fn add(&mut self, other: Winners) {
        self.windows += other.windows;
        self.near_ties += other.near_ties;
        self.wrong += other.wrong;
        self.tie_gap = self.tie_gap.max(other.tie_gap);
        self.wrong_gap = self.wrong_gap.max(other.wrong_gap);
    }
}

/// Compares one plane's winners with the reference's. `plane` (H, W) is the pool's input as
/// the reference computed it (a ReLU output, so >= 0), `want` the reference's winners (flat
/// indices into the plane), `got` the other side's: an index into the plane, or None where it
/// found the window dead (its max <= 0), with the value it pooled. `scale` is the largest value
/// entering this pool (over every plane).
///
/// Per window, with m the reference's maximum: both dead (m = 0 and the other's value <= 0)
/// is the same result (no gradient either way); one side alive is a near tie when the alive
/// side's value is within the tie bound of 0; both alive with different winners g is a near
/// tie when m - plane[g] is within it. Anything else, and any g outside its window, is wrong.
pub fn compare_winners(
    pool: &layers::MaxPool2d,
    plane: &[f32],
    (h, w): (usize, usize),
    want: &[u32],
    got: impl Iterator<Item = (Option<usize>, f32)>,
    scale: f64,
) -> Winners {
    let (_, q) = pool.out_hw(h, w);
    let tie = TIE_REL * scale;
    let mut out = Winners::default();
    for (k, (&a, (g, value))) in want.iter().zip(got).enumerate() {
        out.windows += 1;
        let (rows, cols) = ((k / q) * pool.stride().h, (k % q) * pool.stride().w);
        let inside = |i: usize| {
            let (r, c) = (i / w, i % w);
            let (pr, pc) = (pool.padding().h, pool.padding().w);
            i < h * w
                && r + pr >= rows
                && r + pr < rows + pool.kernel().h
                && c + pc >= cols
                && c + pc < cols + pool.kernel().w
        };
        let m = plane[a as usize] as f64;
        let gap = match g {
            Some(g) if !inside(g) => f64::INFINITY,
            Some(g) => {
                let v = (value as f64).max(plane[g] as f64);
                match (m > 0.0, v > 0.0) {
                    (false, false) => continue,
                    (true, true) if g == a as usize => continue,
                    (true, true) => m - plane[g] as f64,
                    _ => m.max(v),
                }
            }
            None if m > 0.0 => m,
            None => continue,
        };
        let rel = gap / scale.max(1e-30);
        if gap <= tie {
            out.near_ties += 1;
            out.tie_gap = out.tie_gap.max(rel);
        } else {
            // NaN lands here too: a NaN gap is never a tie.
            out.wrong += 1;
            out.wrong_gap = out.wrong_gap.max(if rel.is_nan() { f64::INFINITY } else { rel });
        }
    }
    out
}

/// Per max-pool (one per conv block), how the device's last forward and the CPU backend's fused
/// blocks compare with a layer-by-layer reference forward of the same batch from the same
/// initial weights (`compare_winners`). Both sides compute their convolutions in another order
/// of sums (the CPU backend even directly or by Winograd), so each can break a near tie the
/// other way; nothing else may differ.
fn pool_winners<E: Exec>(
    dev: &mut Engine<E>,
    cfg: &ModelConfig,
    seed: u64,
    x: &[f32],
    n: usize,
) -> Result<Vec<Winners>> {
    // Layer by layer (not fused), to read each ReLU's output.
    let mut probe = reference_model::<f32>(&ModelConfig { fused: false, ..cfg.clone() }, seed);
    let xt = from_vec(&[n, 1, IMAGE_SIDE, IMAGE_SIDE], x.to_vec());
    // The CPU backend's own blocks, same weights and paths, chained as its forward chains them.
    let mut cpu = Vec::new();
    let mut h = xt.clone();
    for block in 0..4 {
        let params = probe.layers[3 * block].layer.params();
        let (wt, b) = (&params[0].value, &params[1].value);
        let mut conv = layers::Conv2d::<f32>::new(wt.shape()[1], wt.shape()[0], (3, 3), 1, 0);
        (conv.weight.value, conv.bias.value) = (wt.clone(), b.clone());
        let mut fused = layers::ConvReluPool::new(conv, layers::MaxPool2d::new(2, 2));
        (fused.direct, fused.winograd) = (!cfg.gemm_only, !cfg.gemm_only);
        h = fused.forward(&h, Ctx::eval());
        cpu.push((fused.winners().to_vec(), slice(&h).to_vec()));
    }
    let mut out = Vec::new();
    for (block, (cpu_winners, cpu_y)) in cpu.iter().enumerate() {
        // The ReLU's output of conv block `block` is the input of its pool (layer 3*block + 2).
        let r = probe.forward_range(&xt, 0..3 * block + 2, Ctx::eval());
        let (c, h, w) = (r.shape()[1], r.shape()[2], r.shape()[3]);
        let scale = slice(&r).iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
        let pool = layers::MaxPool2d::new(2, 2);
        let (p, q) = pool.out_hw(h, w);
        let mut y = vec![0.0f32; p * q];
        let mut arg = vec![0u32; p * q];
        let dev_arg = dev.pool_argmax(block)?;
        let mut stats = Winners::default();
        for i in 0..n {
            for ch in 0..c {
                let plane = &slice(&r)[(i * c + ch) * h * w..][..h * w];
                layers::max_pool2d::max_pool_plane(&pool, plane, h, w, &mut y, &mut arg);
                // The device's winners, (C, N, P, Q) channel-major; it pools the ReLU output, so
                // its value is the plane's at its winner.
                let d = &dev_arg[(ch * n + i) * p * q..][..p * q];
                let dev_side = d.iter().map(|&g| {
                    let g = usize::try_from(g).unwrap_or(usize::MAX);
                    (Some(g), plane.get(g).copied().unwrap_or(f32::NAN))
                });
                stats.add(compare_winners(&pool, plane, (h, w), &arg, dev_side, scale));
                // The CPU backend's, NCHW, u32::MAX for a dead window, with its pooled values.
                let at = (i * c + ch) * p * q;
                let cpu_side = cpu_winners[at..at + p * q]
                    .iter()
                    .zip(&cpu_y[at..at + p * q])
                    .map(|(&g, &v)| ((g != u32::MAX).then_some(g as usize), v));
                stats.add(compare_winners(&pool, plane, (h, w), &arg, cpu_side, scale));
            }
        }
        out.push(stats);
    }
    Ok(out)
}

/// One training step of the reference model on the device (`Engine<E>`) and on the CPU
/// (`CpuBackend`), from the same seed and batch: the loss and correct count, every gradient,
/// every weight after the Adam step, the first Adam moments, and the logits of `predict` after
/// it. Every max-pool winner of both sides is compared with a reference forward: one that
/// differs other than at a near tie fails, and so do near-tie flips in more than `FLIP_BOUND`
/// of a pool's windows. Only when every difference is a near tie are the gradients below the
/// deepest pool with one left out (their tensors are then marked "not compared").
///
/// Weights: Adam's first step moves each weight by u(g) = lr * g / (|g| + eps) (g the gradient
/// plus weight decay), about lr * sign(g), so a gradient that is zero up to rounding may move
/// its weight by up to 2 lr differently on the two devices. Each weight is therefore allowed,
/// besides TOL of the tensor's scale, the spread of u over g +- TOL * (the tensor's largest
/// gradient), i.e. what the gradient check above cannot resolve; the note counts the weights
/// that needed it.
pub fn train_step_checks<E: Exec>(ex: E, batch: usize, seed: u64, dropout: f64) -> Result<Vec<Check>> {
    // The CPU side computes by im2col + GEMM, like the device (see `ModelConfig::gemm_only`).
    let cfg = ModelConfig { num_classes: 6, dropout, gemm_only: true, ..ModelConfig::default() };
    let adam = AdamConfig { lr: 1e-3, weight_decay: 1e-4 };
    let mut dev = Engine::new(ex, &cfg, seed, adam)?;
    let mut cpu = CpuBackend::new(&cfg, seed, adam);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED);
    let x: Vec<f32> = (0..batch * IMAGE_SIDE * IMAGE_SIDE).map(|_| rng.random_range(-1.0..2.0f32)).collect();
    let y: Vec<usize> = (0..batch).map(|i| i % cfg.num_classes).collect();
    let step = 17;
    let mut out = Vec::new();

    let w0_dev = dev.export_weights()?;
    let w0_cpu = cpu.export_weights()?;
    let mut init_err = 0.0f64;
    for (a, b) in w0_dev.iter().zip(&w0_cpu) {
        init_err = init_err.max(rel_err(&a.data, &b.data));
    }
    out.push(Check { name: "initial weights identical".into(), err: init_err, tol: 0.0, note: String::new() });

    dev.train_step(&x, &y, adam.lr, step)?;
    cpu.train_step(&x, &y, adam.lr, step)?;
    let (sd, sc) = (dev.take_train_stats()?, cpu.take_train_stats()?);
    out.push(Check {
        name: format!("train step b{batch} loss"),
        err: ((sd.loss_sum - sc.loss_sum) / sc.loss_sum).abs(),
        tol: TOL,
        note: format!("(mean {:.6} vs {:.6})", sd.loss_sum / batch as f64, sc.loss_sum / batch as f64),
    });
    out.push(check_exact(
        format!("train step b{batch} correct, images"),
        &[sd.correct, sd.images],
        &[sc.correct, sc.images],
    ));

    // Near ties in a max-pool window can round to different winners on the two devices (their
    // sums differ in the last bits); the gradient is then routed differently, legitimately. Any
    // other difference in a winner fails, and so do near-tie flips in more than FLIP_BOUND of
    // a pool's windows. The parameters at or below the deepest pool with a near-tie flip are
    // not compared element by element (a flip moves their gradients by O(1)).
    let winners = pool_winners(&mut dev, &cfg, seed, &x, batch)?;
    let per_pool = |f: &dyn Fn(&Winners) -> String| winners.iter().map(f).collect::<Vec<_>>().join(" ");
    out.push(Check {
        name: format!("train step b{batch} max-pool winners that are not near ties"),
        err: winners.iter().map(|s| s.wrong).sum::<usize>() as f64,
        tol: 0.0,
        note: format!(
            "(per pool: {}; largest gap {:.1e} of the scale)",
            per_pool(&|s| format!("{}/{}", s.wrong, s.windows)),
            winners.iter().fold(0.0f64, |m, s| m.max(s.wrong_gap))
        ),
    });
    out.push(Check {
        name: format!("train step b{batch} max-pool near-tie flips (fraction)"),
        err: winners.iter().fold(0.0f64, |m, s| m.max(s.near_ties as f64 / s.windows.max(1) as f64)),
        tol: FLIP_BOUND,
        note: format!(
            "(per pool: {}; largest tie gap {:.1e} of the scale, bound {TIE_REL:.0e})",
            per_pool(&|s| format!("{}/{}", s.near_ties, s.windows)),
            winners.iter().fold(0.0f64, |m, s| m.max(s.tie_gap))
        ),
    });
    // With a wrong winner nothing is excused: the gradients below it then fail as well.
    let any_wrong = winners.iter().any(|s| s.wrong > 0);
    let deepest = if any_wrong { None } else { winners.iter().rposition(|s| s.near_ties > 0) };
    // Parameter tensors 2i, 2i+1 belong to conv block i; the rest to the classifier.
    let comparable = |t: usize| deepest.is_none_or(|d| t / 2 > d || t >= 8);
    let grads_dev = dev.gradients()?;
    let named = cpu.model.named_params();
    let grads_cpu: Vec<Vec<f32>> = named.iter().map(|(_, p)| slice(&p.grad).to_vec()).collect();
    for (t, (gd, gc)) in grads_dev.iter().zip(&grads_cpu).enumerate() {
        let mut c = check(format!("train step grad {}", gd.name), &gd.data, gc, TOL);
        if !comparable(t) {
            c.tol = f64::INFINITY;
            c.note = "(not compared: below a pool with a flipped near tie)".into();
        }
        out.push(c);
    }
    let w_dev = dev.export_weights()?;
    let w_cpu = cpu.export_weights()?;
    let u = |g: f64| adam.lr * g / (g.abs() + 1e-8);
    for (t, (((wd, wc), gc), w0)) in w_dev.iter().zip(&w_cpu).zip(&grads_cpu).zip(&w0_cpu).enumerate() {
        if !comparable(t) {
            continue;
        }
        let wscale = wc.data.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
        let delta = TOL * gc.iter().fold(0.0f64, |m, &v| m.max((v as f64).abs()));
        let (mut worst, mut slack_used) = (0.0f64, 0);
        for (((&a, &b), &gi), &w) in wd.data.iter().zip(&wc.data).zip(gc).zip(&w0.data) {
            let d = (a as f64 - b as f64).abs();
            let g = gi as f64 + adam.weight_decay * w as f64;
            let spread = u(g + delta) - u(g - delta);
            if d > TOL * wscale {
                slack_used += 1;
            }
            worst = worst.max(d / (TOL * wscale + spread) * TOL);
        }
        out.push(Check {
            name: format!("train step weight {}", wd.name),
            err: if worst.is_nan() { f64::INFINITY } else { worst },
            tol: TOL,
            note: if slack_used > 0 {
                format!("({slack_used} weights with near-zero gradients used the slack)")
            } else {
                String::new()
            },
        });
    }
    let (od, oc) = (dev.export_optimizer()?, cpu.export_optimizer()?);
    out.push(check_exact("adam step count", &[od.t], &[oc.t]));
    let mut merr = 0.0f64;
    for (i, (a, b)) in od.moments.iter().zip(&oc.moments).enumerate() {
        if a.name.ends_with("exp_avg") && comparable(i / 2) {
            merr = merr.max(rel_err(&a.data, &b.data));
        }
    }
    out.push(Check { name: "adam first moments (= 0.1 grad)".into(), err: merr, tol: TOL, note: String::new() });

    let pd = dev.predict(&x, batch)?;
    let pc = cpu.predict(&x, batch)?;
    // The weights below a flipped pool differ by Adam steps in either direction, so the logits
    // then agree less closely.
    let tol = if deepest.is_some() { 1e-2 } else { 1e-3 };
    out.push(check(format!("predict b{batch} logits after the step"), &pd, &pc, tol));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One 4x4 plane, four 2x2 windows with the reference's winners; each way of differing.
    #[test]
    fn winners_are_same_near_ties_or_wrong() {
        let pool = layers::MaxPool2d::new(2, 2);
        #[rustfmt::skip]
        let plane = [
            1.0, 0.2,   0.0, 0.0,
            0.3, 0.99995, 0.0, 0.0,
            0.5, 0.1,   2.0, 1.9,
            0.4, 0.2,   0.0, 0.0f32,
        ];
        let want = [0u32, 2, 8, 10];
        let cmp = |got: [(Option<usize>, f32); 4]| compare_winners(&pool, &plane, (4, 4), &want, got.into_iter(), 2.0);
        let same = [(Some(0), 1.0), (Some(3), 0.0), (Some(8), 0.5), (Some(10), 2.0)];
        let s = cmp(same);
        assert_eq!((s.windows, s.near_ties, s.wrong), (4, 0, 0), "a dead window's winner may differ: {s:?}");
        // 0.99995 vs 1.0: within 1e-4 of the scale 2.0, a near tie.
        let s = cmp([(Some(5), 0.99995), same[1], same[2], same[3]]);
        assert_eq!((s.near_ties, s.wrong), (1, 0), "{s:?}");
        // 0.2 vs 1.0, and 1.9 vs 2.0: wrong.
        let s = cmp([(Some(1), 0.2), same[1], same[2], (Some(11), 1.9)]);
        assert_eq!((s.near_ties, s.wrong), (0, 2), "{s:?}");
        assert!((s.wrong_gap - 0.4).abs() < 1e-6, "{s:?}");
        // A winner outside its window, or none at all where the maximum is 2.0: wrong.
        let s = cmp([(Some(2), 0.0), same[1], same[2], (None, 0.0)]);
        assert_eq!(s.wrong, 2, "{s:?}");
        assert!(s.wrong_gap.is_infinite());
        // Alive where the reference is dead, by a hair (a near tie) or clearly (wrong).
        let s = cmp([same[0], (Some(3), 1e-5), same[2], same[3]]);
        assert_eq!((s.near_ties, s.wrong), (1, 0), "{s:?}");
        let s = cmp([same[0], (Some(2), 0.5), same[2], same[3]]);
        assert_eq!((s.near_ties, s.wrong), (0, 1), "same winner, but alive where the reference is dead: {s:?}");
    }
}
