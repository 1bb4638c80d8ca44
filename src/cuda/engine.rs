//! The reference model on a device: parameters, gradients, Adam's moments and every activation
//! live in device memory; a training step is a fixed sequence of kernel launches with no host
//! sync. Generic over the device (`Exec`), so the same code runs on a GPU (`CudaBackend`) and
//! in the CPU emulator (tests).
//!
//! Layout. Parameters, gradients and both moments are each one flat buffer (tensors in
//! `Sequential::named_params` order, each at a 256-byte aligned offset), so zeroing is never
//! needed (backward overwrites every gradient; the CPU layers accumulate instead, see
//! `layers/mod.rs`) and Adam is one launch. Image activations are
//! channel-major (C, N, H, W) so each convolution is one GEMM over the whole batch (see
//! `kernels/conv2d.cu`); the input (1, N, 64, 64) is the same in both layouts. After the
//! global pool the features are (256, N), and the linear layers' transposed GEMMs read them as
//! they are; the classifier's activations are (N, features) as on the CPU, so the dropout
//! mask indices match the CPU's.
//!
//! Fusions: bias and ReLU are applied in the convolution GEMM's store, and the ReLU backward
//! in the max-pool backward. Every buffer is allocated once for the largest batch seen (the
//! split-K workspace during the first step at that size); later steps allocate nothing.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::exec::{Buf, DevPtr, Exec};
use super::ops::{self, Bias, Gemm};
use super::params::{ConvParams, PoolParams};
use crate::backend::{check_names, AdamConfig, Backend, NamedTensor, OptimizerState, TrainStats, IMAGE_SIDE};
use crate::model::{reference_model, ModelConfig};
use crate::optim::Adam;
use crate::stats::{output_stats, param_stats, AdamStep, LayerStats};

/// Channel widths of the four conv blocks (as `model::reference_model`).
const WIDTHS: [usize; 5] = [1, 32, 64, 128, 256];
const HIDDEN: usize = 128;
const KSIZE: usize = 3;
/// The largest batch `predict` runs at once by default (it splits bigger ones).
const PREDICT_CHUNK: usize = 256;

/// Sizes of one conv block: conv 3x3 (stride 1, no padding) -> ReLU -> max-pool 2x2.
#[derive(Clone, Copy, Debug)]
struct Stage {
    c: usize,
    h: usize,
    oc: usize,
    /// conv output side
    o: usize,
    /// pooled side
    p: usize,
}

impl Stage {
    /// K = C*3*3
    fn k(&self) -> usize {
        self.c * KSIZE * KSIZE
    }
    /// L = OH*OW
    fn l(&self) -> usize {
        self.o * self.o
    }
}

/// Timing labels: the conv with its fused bias and ReLU, and the pool (whose backward carries
/// the ReLU's).
fn conv_label(i: usize) -> String {
    format!("conv_block.{} conv+relu", 3 * i)
}

fn pool_label(i: usize) -> String {
    format!("conv_block.{} maxpool", 3 * i + 2)
}

fn stages() -> [Stage; 4] {
    let mut side = IMAGE_SIDE;
    std::array::from_fn(|i| {
        let o = side - KSIZE + 1;
        let s = Stage { c: WIDTHS[i], h: side, oc: WIDTHS[i + 1], o, p: o / 2 };
        side = s.p;
        s
    })
}

/// Where a parameter tensor lives in the flat buffers.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    shape: Vec<usize>,
    offset: usize,
    len: usize,
}

/// Every activation buffer for a batch of up to `cap` images.
struct Acts {
    cap: usize,
    x: Buf<f32>,
    targets: Buf<i32>,
    /// im2col of each conv's input (K, N*L); the backward reuses it for dcol.
    col: [Buf<f32>; 4],
    /// ReLU(conv) (OC, N, O, O)
    a: [Buf<f32>; 4],
    /// dL/d(conv output before the ReLU)
    dz: [Buf<f32>; 4],
    /// max-pooled (OC, N, P, P) and its argmax
    pooled: [Buf<f32>; 4],
    argmax: [Buf<i32>; 4],
    dpooled: [Buf<f32>; 4],
    /// global pool (256, N) and its gradient
    g: Buf<f32>,
    dg: Buf<f32>,
    /// classifier.0 output (N, 128), after dropout, and the gradient
    h: Buf<f32>,
    hd: Buf<f32>,
    dh: Buf<f32>,
    logits: Buf<f32>,
    dlogits: Buf<f32>,
}

/// Forward or backward, for per-layer timings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
}

/// Time per piece of work between device syncs, when profiling.
struct Profiler {
    last: Instant,
    marks: Vec<(String, Phase, f64)>,
}

/// The reference model on device `E`.
pub struct Engine<E: Exec> {
    pub ex: E,
    num_classes: usize,
    dropout_p: f64,
    dropout_seed: u64,
    /// Adam's hyper-parameters and step count (its moments live on the device).
    adam: Adam<f32>,
    slots: Vec<Slot>,
    params: Buf<f32>,
    grads: Buf<f32>,
    m: Buf<f32>,
    v: Buf<f32>,
    /// [loss sum, correct] since the last `take_train_stats`
    stats: Buf<f64>,
    /// split-K workspace, grown on demand
    ws: Buf<f32>,
    images: u64,
    acts: Option<Acts>,
    stages: [Stage; 4],
    profiler: Option<Profiler>,
    predict_chunk: usize,
    /// The batch size of the last forward.
    last_batch: usize,
}

impl<E: Exec> Engine<E> {
    /// The reference model from `seed` (the same weights as `CpuBackend::new(cfg, seed, ..)`),
    /// uploaded to `ex`.
    pub fn new(mut ex: E, cfg: &ModelConfig, seed: u64, adam: AdamConfig) -> Result<Self> {
        let model = reference_model::<f32>(cfg, seed);
        let mut slots = Vec::new();
        let mut host = Vec::new();
        for (name, p) in model.named_params() {
            let offset = host.len();
            let data = p.value.as_slice().context("contiguous parameter")?;
            host.extend_from_slice(data);
            host.resize(host.len().div_ceil(64) * 64, 0.0);
            slots.push(Slot { name, shape: p.value.shape().to_vec(), offset, len: data.len() });
        }
        let st = stages();
        // The architecture this engine hard-codes must be the one the CPU model has.
        let mut want: Vec<Vec<usize>> = Vec::new();
        for s in &st {
            want.push(vec![s.oc, s.c, KSIZE, KSIZE]);
            want.push(vec![s.oc]);
        }
        want.extend([vec![HIDDEN, WIDTHS[4]], vec![HIDDEN], vec![cfg.num_classes, HIDDEN], vec![cfg.num_classes]]);
        let got: Vec<Vec<usize>> = slots.iter().map(|s| s.shape.clone()).collect();
        ensure!(got == want, "the CUDA engine implements the reference model only; parameter shapes {got:?}");

        let params = Buf::from_host(&mut ex, &host)?;
        let grads = Buf::alloc(&mut ex, host.len())?;
        let m = Buf::alloc(&mut ex, host.len())?;
        let v = Buf::alloc(&mut ex, host.len())?;
        let stats = Buf::alloc(&mut ex, 2)?;
        let ws = Buf::alloc(&mut ex, 0)?;
        Ok(Engine {
            ex,
            num_classes: cfg.num_classes,
            dropout_p: cfg.dropout,
            dropout_seed: seed ^ 0xD50F,
            adam: Adam::new(adam.lr).with_weight_decay(adam.weight_decay),
            slots,
            params,
            grads,
            m,
            v,
            stats,
            ws,
            images: 0,
            acts: None,
            stages: st,
            profiler: None,
            predict_chunk: PREDICT_CHUNK,
            last_batch: 0,
        })
    }

    /// `predict` runs at most `n` images at once (at least the largest training batch seen).
    pub fn with_predict_chunk(mut self, n: usize) -> Self {
        self.predict_chunk = n.max(1);
        self
    }

    /// Parameter tensor `i` (in `named_params` order) of the flat buffer `b`.
    fn tensor(&self, b: &Buf<f32>, i: usize) -> DevPtr {
        b.at(self.slots[i].offset)
    }

    /// Conv i's weight/bias are tensors 2i, 2i+1; classifier.0 is 8, 9; classifier.2 is 10, 11.
    fn w(&self, i: usize) -> DevPtr {
        self.tensor(&self.params, i)
    }

    fn dw(&self, i: usize) -> DevPtr {
        self.tensor(&self.grads, i)
    }

    fn conv_params(&self, i: usize, n: usize) -> Result<ConvParams> {
        let s = self.stages[i];
        ops::conv_params(n, s.c, s.h, s.h, s.oc, KSIZE, KSIZE, 1, 0)
    }

    fn pool_params(&self, i: usize, n: usize, relu_mask: bool) -> Result<PoolParams> {
        let s = self.stages[i];
        let mut p = ops::max_pool_params(s.oc * n, s.o, s.o, 2, 2, 0, false)?;
        p.relu_mask = relu_mask as i32;
        Ok(p)
    }

    /// Runs one product as `ops::plan_gemm` plans it (split-K where it pays). The split-K
    /// workspace grows to the largest plan's need during the first step of a batch size and is
    /// then reused.
    fn gemm(&mut self, g: &Gemm, a: DevPtr, b: DevPtr, c: DevPtr) -> Result<()> {
        let plan = ops::plan_gemm(g.m, g.n, g.k, self.ex.sm_count(), true);
        let need = plan.workspace(g.m, g.n);
        if self.ws.len < need {
            let old = std::mem::replace(&mut self.ws, Buf::alloc(&mut self.ex, need)?);
            old.free(&mut self.ex)?;
        }
        let ws = self.ws;
        ops::gemm(&mut self.ex, g, a, b, c, &plan, Some(&ws))
    }

    /// Makes sure every activation buffer holds a batch of `n`.
    fn ensure_capacity(&mut self, n: usize) -> Result<()> {
        if self.acts.as_ref().is_some_and(|a| a.cap >= n) {
            return Ok(());
        }
        if let Some(old) = self.acts.take() {
            self.free_acts(old)?;
        }
        let ex = &mut self.ex;
        let st = self.stages;
        let k = self.num_classes;
        let per_stage = |ex: &mut E, f: &dyn Fn(&Stage) -> usize| -> Result<[Buf<f32>; 4]> {
            let v: Vec<Buf<f32>> = st.iter().map(|s| Buf::alloc(ex, f(s))).collect::<Result<_>>()?;
            Ok(v.try_into().expect("four stages"))
        };
        let col = per_stage(ex, &|s| s.k() * n * s.l())?;
        let a = per_stage(ex, &|s| s.oc * n * s.l())?;
        let dz = per_stage(ex, &|s| s.oc * n * s.l())?;
        let pooled = per_stage(ex, &|s| s.oc * n * s.p * s.p)?;
        let dpooled = per_stage(ex, &|s| s.oc * n * s.p * s.p)?;
        let argmax: Vec<Buf<i32>> = st.iter().map(|s| Buf::alloc(ex, s.oc * n * s.p * s.p)).collect::<Result<_>>()?;
        let ex = &mut self.ex;
        let acts = Acts {
            cap: n,
            x: Buf::alloc(ex, n * IMAGE_SIDE * IMAGE_SIDE)?,
            targets: Buf::alloc(ex, n)?,
            col,
            a,
            dz,
            pooled,
            argmax: argmax.try_into().expect("four stages"),
            dpooled,
            g: Buf::alloc(ex, WIDTHS[4] * n)?,
            dg: Buf::alloc(ex, WIDTHS[4] * n)?,
            h: Buf::alloc(ex, n * HIDDEN)?,
            hd: Buf::alloc(ex, n * HIDDEN)?,
            dh: Buf::alloc(ex, n * HIDDEN)?,
            logits: Buf::alloc(ex, n * k)?,
            dlogits: Buf::alloc(ex, n * k)?,
        };
        self.acts = Some(acts);
        Ok(())
    }

    fn free_acts(&mut self, a: Acts) -> Result<()> {
        let ex = &mut self.ex;
        for b in a.col.into_iter().chain(a.a).chain(a.dz).chain(a.pooled).chain(a.dpooled) {
            b.free(ex)?;
        }
        for b in a.argmax {
            b.free(ex)?;
        }
        for b in [a.x, a.g, a.dg, a.h, a.hd, a.dh, a.logits, a.dlogits] {
            b.free(ex)?;
        }
        a.targets.free(ex)
    }

    fn acts(&self) -> &Acts {
        self.acts.as_ref().expect("ensure_capacity before use")
    }

    /// With profiling on: waits for the device and books the time since the last mark.
    fn mark(&mut self, what: &str, phase: Phase) -> Result<()> {
        if self.profiler.is_none() {
            return Ok(());
        }
        self.ex.sync()?;
        if let Some(p) = &mut self.profiler {
            let now = Instant::now();
            p.marks.push((what.to_string(), phase, (now - p.last).as_secs_f64() * 1e3));
            p.last = now;
        }
        Ok(())
    }

    fn dropout_on(train: bool, p: f64) -> bool {
        train && p > 0.0
    }

    /// Forward of a batch of n already in `acts.x`: logits in `acts.logits`.
    fn forward(&mut self, n: usize, train: bool, step: u64) -> Result<()> {
        self.last_batch = n;
        for i in 0..4 {
            let s = self.stages[i];
            let a = self.acts();
            let (input, col, out, pooled, argmax) = (
                if i == 0 { a.x.ptr } else { a.pooled[i - 1].ptr },
                a.col[i].ptr,
                a.a[i].ptr,
                a.pooled[i].ptr,
                a.argmax[i].ptr,
            );
            let p = self.conv_params(i, n)?;
            ops::im2col(&mut self.ex, &p, input, col)?;
            // y (OC, N*L) = relu(W (OC, K) col (K, N*L) + b)
            let g = Gemm::new(false, false, s.oc, n * s.l(), s.k()).bias(Bias::Rows(self.w(2 * i + 1))).relu();
            self.gemm(&g, self.w(2 * i), col, out)?;
            self.mark(&conv_label(i), Phase::Forward)?;
            let pp = self.pool_params(i, n, false)?;
            ops::max_pool_forward(&mut self.ex, &pp, out, pooled, argmax)?;
            self.mark(&pool_label(i), Phase::Forward)?;
        }
        let (p3, g, h, hd, logits) = {
            let a = self.acts();
            (a.pooled[3].ptr, a.g.ptr, a.h.ptr, a.hd.ptr, a.logits.ptr)
        };
        let hw = self.stages[3].p * self.stages[3].p;
        ops::global_avg_pool_forward(&mut self.ex, WIDTHS[4] * n, hw, p3, g)?;
        self.mark("global_pool", Phase::Forward)?;
        // h (N, 128) = g^T W1^T + b1, with g stored (256, N)
        let lin1 = Gemm::new(true, true, n, HIDDEN, WIDTHS[4]).bias(Bias::Cols(self.w(9)));
        self.gemm(&lin1, g, self.w(8), h)?;
        self.mark("classifier.0", Phase::Forward)?;
        let lin2_in = if Self::dropout_on(train, self.dropout_p) {
            let p = ops::dropout_params(n * HIDDEN, self.dropout_p, self.dropout_seed, step)?;
            ops::dropout_forward(&mut self.ex, &p, h, hd)?;
            hd
        } else {
            h
        };
        self.mark("classifier.1", Phase::Forward)?;
        // logits (N, K) = hd W2^T + b2
        let lin2 = Gemm::new(false, true, n, self.num_classes, HIDDEN).bias(Bias::Cols(self.w(11)));
        self.gemm(&lin2, lin2_in, self.w(10), logits)?;
        self.mark("classifier.2", Phase::Forward)?;
        Ok(())
    }

    /// Loss and backward of the last training forward; every gradient is overwritten.
    fn backward(&mut self, n: usize, step: u64) -> Result<()> {
        let k = self.num_classes;
        let drop = Self::dropout_on(true, self.dropout_p);
        let (logits, targets, dlogits, h, hd, dh, g, dg, dp3) = {
            let a = self.acts();
            (
                a.logits.ptr,
                a.targets.ptr,
                a.dlogits.ptr,
                a.h.ptr,
                a.hd.ptr,
                a.dh.ptr,
                a.g.ptr,
                a.dg.ptr,
                a.dpooled[3].ptr,
            )
        };
        ops::cross_entropy(&mut self.ex, n, k, logits, targets, dlogits, self.stats.ptr)?;
        self.mark("loss", Phase::Backward)?;

        // classifier.2: dW2 (K, 128) = dlogits^T hd, db2 = column sums, dhd = dlogits W2
        let lin2_in = if drop { hd } else { h };
        self.gemm(&Gemm::new(true, false, k, HIDDEN, n), dlogits, lin2_in, self.dw(10))?;
        let db2 = self.dw(11);
        ops::bias_grad(&mut self.ex, &ops::col_sums(n, k, 0.0)?, db2, dlogits)?;
        self.gemm(&Gemm::new(false, false, n, HIDDEN, k), dlogits, self.w(10), dh)?;
        self.mark("classifier.2", Phase::Backward)?;
        if drop {
            let p = ops::dropout_params(n * HIDDEN, self.dropout_p, self.dropout_seed, step)?;
            ops::dropout_backward(&mut self.ex, &p, dh, dh)?;
        }
        self.mark("classifier.1", Phase::Backward)?;

        // classifier.0: dW1 (128, 256) = dh^T g^T, db1 = column sums, dg (256, N) = W1^T dh^T
        self.gemm(&Gemm::new(true, true, HIDDEN, WIDTHS[4], n), dh, g, self.dw(8))?;
        let db1 = self.dw(9);
        ops::bias_grad(&mut self.ex, &ops::col_sums(n, HIDDEN, 0.0)?, db1, dh)?;
        self.gemm(&Gemm::new(true, true, WIDTHS[4], n, HIDDEN), self.w(8), dh, dg)?;
        self.mark("classifier.0", Phase::Backward)?;

        let hw = self.stages[3].p * self.stages[3].p;
        ops::global_avg_pool_backward(&mut self.ex, WIDTHS[4] * n, hw, dg, dp3)?;
        self.mark("global_pool", Phase::Backward)?;

        for i in (0..4).rev() {
            let s = self.stages[i];
            let (dpooled, argmax, a_out, dz, col, dx_prev) = {
                let a = self.acts();
                let dx_prev = if i > 0 { a.dpooled[i - 1].ptr } else { DevPtr::NULL };
                (a.dpooled[i].ptr, a.argmax[i].ptr, a.a[i].ptr, a.dz[i].ptr, a.col[i].ptr, dx_prev)
            };
            // max-pool backward, with the ReLU's backward fused (a_out is the ReLU's output)
            let pp = self.pool_params(i, n, true)?;
            ops::max_pool_backward(&mut self.ex, &pp, dpooled, argmax, a_out, dz)?;
            self.mark(&pool_label(i), Phase::Backward)?;
            // db = row sums of dz (OC, N*L); dW (OC, K) = dz col^T over the whole batch
            let db = self.dw(2 * i + 1);
            ops::bias_grad(&mut self.ex, &ops::row_sums(s.oc, n * s.l(), 0.0)?, db, dz)?;
            self.gemm(&Gemm::new(false, true, s.oc, s.k(), n * s.l()), dz, col, self.dw(2 * i))?;
            if i > 0 {
                // dcol (K, N*L) = W^T dz into col's buffer, then dx = col2im(dcol)
                self.gemm(&Gemm::new(true, false, s.k(), n * s.l(), s.oc), self.w(2 * i), dz, col)?;
                let p = self.conv_params(i, n)?;
                ops::col2im(&mut self.ex, &p, col, dx_prev)?;
            }
            self.mark(&conv_label(i), Phase::Backward)?;
        }
        Ok(())
    }

    fn adam_step(&mut self, lr: f64) -> Result<()> {
        self.adam.lr = lr;
        self.adam.t += 1;
        let p = ops::adam_params(self.params.len, &self.adam, self.adam.t)?;
        ops::adam_step(&mut self.ex, &p, self.params.ptr, self.grads.ptr, self.m.ptr, self.v.ptr)?;
        self.mark("adam", Phase::Backward)
    }

    fn check_batch(&self, x: &[f32], n: usize) -> Result<()> {
        let want = n * IMAGE_SIDE * IMAGE_SIDE;
        if x.len() != want {
            bail!("input batch has {} values, expected {n} x 1 x {IMAGE_SIDE} x {IMAGE_SIDE} = {want}", x.len());
        }
        ensure!(n > 0, "empty batch");
        Ok(())
    }

    /// Uploads a training batch and runs forward and backward without the optimizer (the
    /// gradients are then in `grads`); `train_step` adds the Adam update.
    pub fn forward_backward(&mut self, x: &[f32], y: &[usize], step: u64) -> Result<()> {
        let n = y.len();
        self.check_batch(x, n)?;
        if let Some(&bad) = y.iter().find(|&&t| t >= self.num_classes) {
            bail!("label {bad} out of range for {} classes", self.num_classes);
        }
        self.ensure_capacity(n)?;
        let targets: Vec<i32> = y.iter().map(|&t| t as i32).collect();
        let (xb, tb) = (self.acts().x, self.acts().targets);
        xb.write(&mut self.ex, 0, x)?;
        tb.write(&mut self.ex, 0, &targets)?;
        self.forward(n, true, step)?;
        self.backward(n, step)?;
        self.images += n as u64;
        Ok(())
    }

    /// The gradients of the last `forward_backward`, named as the weights (a host sync).
    pub fn gradients(&mut self) -> Result<Vec<NamedTensor>> {
        let all = self.grads.read(&mut self.ex)?;
        Ok(self.split(&all, ""))
    }

    fn split(&self, flat: &[f32], suffix: &str) -> Vec<NamedTensor> {
        self.slots
            .iter()
            .map(|s| NamedTensor {
                name: format!("{}{suffix}", s.name),
                shape: s.shape.clone(),
                data: flat[s.offset..s.offset + s.len].to_vec(),
            })
            .collect()
    }

    /// The argmax of max-pool `block` (0..4) in the last forward, (OC, N, P, P) channel-major,
    /// each the index ih*W + iw in its plane (for tests: where CPU and device round a near tie
    /// differently, their gradients legitimately differ).
    pub fn pool_argmax(&mut self, block: usize) -> Result<Vec<i32>> {
        ensure!(block < 4 && self.acts.is_some(), "pool_argmax: no such pool or no forward yet");
        let s = self.stages[block];
        let len = s.oc * self.last_batch * s.p * s.p;
        let b = self.acts().argmax[block].slice(0, len);
        b.read(&mut self.ex)
    }

    /// Floating-point operations (a multiply-add is 2) of each timed piece of a training step at
    /// batch n, as (label, forward, backward); labels as `profile_step`'s, zero for the pieces
    /// that only move data.
    pub fn layer_flops(&self, n: usize) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            let f = (2 * s.oc * s.k() * n * s.l()) as u64;
            // backward: dW, plus dx for every block but the first (its input is the images)
            out.push((conv_label(i), f, if i == 0 { f } else { 2 * f }));
            out.push((pool_label(i), 0, 0));
        }
        let lin = |i: usize, o: usize| (2 * n * i * o) as u64;
        out.push(("global_pool".into(), 0, 0));
        out.push(("classifier.0".into(), lin(WIDTHS[4], HIDDEN), 2 * lin(WIDTHS[4], HIDDEN)));
        out.push(("classifier.1".into(), 0, 0));
        out.push(("classifier.2".into(), lin(HIDDEN, self.num_classes), 2 * lin(HIDDEN, self.num_classes)));
        out
    }

    /// Per-layer forward and backward times (ms) of one training step of a batch of n, with a
    /// device sync after each layer; labels in execution order.
    pub fn profile_step(&mut self, x: &[f32], y: &[usize], step: u64) -> Result<Vec<(String, Phase, f64)>> {
        self.ex.sync()?;
        self.profiler = Some(Profiler { last: Instant::now(), marks: Vec::new() });
        let run = self.train_step(x, y, 1e-3, step);
        let marks = self.profiler.take().map(|p| p.marks).unwrap_or_default();
        run?;
        Ok(marks)
    }
}

impl<E: Exec> Backend for Engine<E> {
    fn describe(&self) -> String {
        self.ex.describe()
    }

    fn train_step(&mut self, x: &[f32], y: &[usize], lr: f64, step: u64) -> Result<()> {
        self.forward_backward(x, y, step)?;
        self.adam_step(lr)
    }

    fn take_train_stats(&mut self) -> Result<TrainStats> {
        let s = self.stats.read(&mut self.ex)?;
        self.stats.zero(&mut self.ex)?;
        let images = std::mem::take(&mut self.images);
        Ok(TrainStats { loss_sum: s[0], correct: s[1].round() as u64, images })
    }

    fn predict(&mut self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if n == 0 && x.is_empty() {
            return Ok(Vec::new());
        }
        self.check_batch(x, n)?;
        let chunk = n.min(self.predict_chunk.max(self.acts.as_ref().map_or(0, |a| a.cap)));
        self.ensure_capacity(chunk)?;
        let side2 = IMAGE_SIDE * IMAGE_SIDE;
        let k = self.num_classes;
        let mut out = Vec::with_capacity(n * k);
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let (xb, lb) = (self.acts().x, self.acts().logits);
            xb.write(&mut self.ex, 0, &x[start * side2..(start + len) * side2])?;
            self.forward(len, false, 0)?;
            let logits = lb.slice(0, len * k).read(&mut self.ex)?;
            out.extend_from_slice(&logits);
        }
        Ok(out)
    }

    fn export_weights(&mut self) -> Result<Vec<NamedTensor>> {
        let all = self.params.read(&mut self.ex)?;
        Ok(self.split(&all, ""))
    }

    fn import_weights(&mut self, weights: &[NamedTensor]) -> Result<()> {
        let names: Vec<String> = self.slots.iter().map(|s| s.name.clone()).collect();
        check_names(&names, weights)?;
        for (s, w) in self.slots.iter().zip(weights) {
            if s.shape != w.shape {
                bail!("weight {} has shape {:?}, the model expects {:?}", w.name, w.shape, s.shape);
            }
        }
        for (s, w) in self.slots.clone().iter().zip(weights) {
            self.params.write(&mut self.ex, s.offset, &w.data)?;
        }
        Ok(())
    }

    /// Parameters, gradients and both moments copied to the host; the outputs are those the
    /// last training forward left on the device (max-pooled conv blocks, the global pool,
    /// classifier.0 before dropout, the logits), copied for the batch's n images only.
    fn layer_stats(&mut self, _x: &[f32], _n: usize) -> Result<LayerStats> {
        let (w, g) = (self.params.read(&mut self.ex)?, self.grads.read(&mut self.ex)?);
        let (m, v) = (self.m.read(&mut self.ex)?, self.v.read(&mut self.ex)?);
        let adam = AdamStep::of(&self.adam);
        let params = (self.slots.iter())
            .map(|s| {
                let r = s.offset..s.offset + s.len;
                param_stats(&s.name, &w[r.clone()], &g[r.clone()], &m[r.clone()], &v[r], adam)
            })
            .collect();
        let mut outputs = Vec::new();
        let n = self.last_batch;
        if self.acts.is_some() && n > 0 {
            let mut bufs = Vec::new();
            for (i, s) in self.stages.iter().enumerate() {
                bufs.push((format!("conv_block.{}", 3 * i), self.acts().pooled[i].slice(0, s.oc * n * s.p * s.p)));
            }
            bufs.push(("global_pool".into(), self.acts().g.slice(0, WIDTHS[4] * n)));
            bufs.push(("classifier.0".into(), self.acts().h.slice(0, HIDDEN * n)));
            bufs.push(("classifier.2".into(), self.acts().logits.slice(0, self.num_classes * n)));
            for (name, b) in bufs {
                outputs.push(output_stats(&name, &b.read(&mut self.ex)?));
            }
        }
        Ok(LayerStats { params, outputs })
    }

    fn export_optimizer(&mut self) -> Result<OptimizerState> {
        let m = self.m.read(&mut self.ex)?;
        let v = self.v.read(&mut self.ex)?;
        let (m, v) = (self.split(&m, ".exp_avg"), self.split(&v, ".exp_avg_sq"));
        let moments = m.into_iter().zip(v).flat_map(|(a, b)| [a, b]).collect();
        Ok(OptimizerState { t: self.adam.t, moments })
    }

    fn import_optimizer(&mut self, state: &OptimizerState) -> Result<()> {
        let names: Vec<String> =
            self.slots.iter().flat_map(|s| [format!("{}.exp_avg", s.name), format!("{}.exp_avg_sq", s.name)]).collect();
        check_names(&names, &state.moments)?;
        for (s, pair) in self.slots.iter().zip(state.moments.chunks_exact(2)) {
            for t in pair {
                if t.data.len() != s.len {
                    bail!("optimizer state {} has {} values, expected {}", t.name, t.data.len(), s.len);
                }
            }
        }
        for (s, pair) in self.slots.clone().iter().zip(state.moments.chunks_exact(2)) {
            self.m.write(&mut self.ex, s.offset, &pair[0].data)?;
            self.v.write(&mut self.ex, s.offset, &pair[1].data)?;
        }
        self.adam.t = state.t;
        Ok(())
    }
}
