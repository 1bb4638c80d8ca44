//! `medcnn bench`: per-layer forward and backward timings of a network (the reference by
//! default, or any `--arch` spec) at its real shapes, then whole training steps and inference,
//! in images/s. CPU here; CUDA through
//! `crate::cuda` when built with the feature. Prints the machine; a table for people, JSON for
//! machines, and a bar chart.
//!
//! This measures; it does not assert. Speed targets live in the numbers it prints.

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::backend::{make_backend, AdamConfig, Backend, Device};
use crate::data::InputShape;
use crate::layers::Ctx;
use crate::model::LayerKind;
use crate::spec::{BuildOptions, ModelSpec};
use crate::tensor::{from_vec, Tensor};

/// The class count benchmarks use (MedNIST's).
pub const BENCH_CLASSES: usize = 6;

#[derive(Clone, Debug, Serialize)]
pub struct LayerTiming {
    pub name: String,
    pub layer: String,
    pub input: Vec<usize>,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// GFLOP/s of forward and backward (backward of conv/linear is two GEMMs of the forward's size).
    pub forward_gflops: f64,
    pub backward_gflops: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub device: String,
    /// The network (`--arch` text) and its input.
    pub arch: String,
    pub input: InputShape,
    pub batch_size: usize,
    pub layers: Vec<LayerTiming>,
    pub train_step_ms: f64,
    pub train_images_per_sec: f64,
    pub train_gflops: f64,
    pub infer_images_per_sec: f64,
    pub flops_per_image_forward: u64,
    /// Our CUDA SGEMM at 1024^3 (GPU runs only).
    pub sgemm_1024_gflops: Option<f64>,
    /// The CPU's matmul peak as measured here: matrixmultiply's sgemm at 512^3 from cache on
    /// every thread at once (CPU runs only). The yardstick for "how close to the hardware".
    pub matmul_peak_gflops: Option<f64>,
}

/// matrixmultiply's sgemm at 512^3 on every rayon thread at once, from cache: the best of 5
/// rounds of 20 products per thread, in GFLOP/s summed over the threads.
pub fn cpu_matmul_peak() -> f64 {
    use rayon::prelude::*;
    let n = 512;
    let threads = rayon::current_num_threads();
    let flops = (2 * n * n * n * 20 * threads) as f64;
    let mut best = 0.0f64;
    let bufs: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        (0..threads).map(|_| (vec![0.5; n * n], vec![0.25; n * n], vec![0.0; n * n])).collect();
    let mut bufs = bufs;
    for _ in 0..5 {
        let t = Instant::now();
        bufs.par_iter_mut().for_each(|(a, b, c)| {
            for _ in 0..20 {
                crate::tensor::gemm(false, false, n, n, n, 1.0, a, b, 0.0, c);
            }
        });
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub threads: usize,
}

impl Machine {
    pub fn current() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Machine { cpu, cores, threads: rayon::current_num_threads() }
    }
}

/// Median of `reps` timings of `f`, in ms, after one warm-up call.
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    time_ms_prepared(reps, || (), |()| f())
}

/// `time_ms` of `f`, each call given what an untimed `prepare` made just before it.
fn time_ms_prepared<P>(reps: usize, mut prepare: impl FnMut() -> P, mut f: impl FnMut(P)) -> f64 {
    f(prepare());
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let p = prepare();
            let s = Instant::now();
            f(p);
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// A batch of random-looking 64x64 gray images in [-1, 1] and labels.
pub fn synthetic_batch(n: usize, classes: usize) -> (Vec<f32>, Vec<usize>) {
    synthetic_batch_for(n, classes, InputShape::default())
}

/// A batch of random-looking images of `shape` in [-1, 1] and labels.
pub fn synthetic_batch_for(n: usize, classes: usize, shape: InputShape) -> (Vec<f32>, Vec<usize>) {
    let x = (0..n * shape.len()).map(|i| (i as f32 * 0.618).fract() * 2.0 - 1.0).collect();
    let y = (0..n).map(|i| i % classes).collect();
    (x, y)
}

/// Per-layer CPU timings at the spec's shapes.
pub fn cpu_layer_timings(spec: &ModelSpec, batch: usize, reps: usize) -> Result<Vec<LayerTiming>> {
    // The fused model, as the CPU backend trains it.
    let mut model = spec.build::<f32>(BENCH_CLASSES, BuildOptions { fused: true, gemm_only: false }, 0)?;
    let (x, _) = synthetic_batch_for(batch, BENCH_CLASSES, spec.input);
    let [c, hh, ww] = spec.input.chw();
    let mut h: Tensor<f32> = from_vec(&[batch, c, hh, ww], x);
    let mut out = Vec::new();
    for (i, l) in model.layers.iter_mut().enumerate() {
        let input = h.shape().to_vec();
        let ctx = Ctx::train(1);
        // As the training step calls it: the first layer borrows the batch, every later one
        // is handed its input (`forward_owned`; a conv keeps it for its backward without a
        // copy), here a copy made outside the timer.
        let fwd = if i == 0 {
            time_ms(reps, || {
                l.layer.forward(&h, ctx);
            })
        } else {
            time_ms_prepared(
                reps,
                || h.clone(),
                |x| {
                    l.layer.forward_owned(x, ctx);
                },
            )
        };
        let y = l.layer.forward(&h, ctx);
        let dy = y.mapv(|v| v * 0.01 + 0.001);
        let bwd = time_ms(reps, || {
            l.layer.backward(&dy);
        });
        let flops = l.layer.flops(&input) as f64;
        // Backward is two GEMMs of the forward's size (dW and dx), except in a first conv
        // (fused block or plain), which skips dx (nobody needs the gradient of the images).
        let first_conv = i == 0 && matches!(l.kind, LayerKind::ConvReluPool | LayerKind::Conv2d);
        out.push(LayerTiming {
            name: l.name.clone(),
            layer: l.layer.describe(),
            input,
            forward_ms: fwd,
            backward_ms: bwd,
            forward_gflops: flops / (fwd * 1e6),
            backward_gflops: if first_conv { 1.0 } else { 2.0 } * flops / (bwd * 1e6),
        });
        h = y;
    }
    Ok(out)
}

/// Runs the whole benchmark of `spec` on `device`.
pub fn run(device: Device, spec: &ModelSpec, batch: usize, steps: usize) -> Result<BenchReport> {
    let layers = match device {
        Device::Cpu => cpu_layer_timings(spec, batch, 5)?,
        Device::Cuda => crate::cuda::bench_layers(&crate::backend::cuda_config(spec, BENCH_CLASSES)?, batch, 5)?
            .layers
            .into_iter()
            .map(|l| LayerTiming {
                forward_gflops: l.forward_gflops(),
                backward_gflops: l.backward_gflops(),
                name: l.label,
                layer: String::new(),
                input: Vec::new(),
                forward_ms: l.forward_ms,
                backward_ms: l.backward_ms,
            })
            .collect(),
    };
    let adam = AdamConfig { lr: 1e-3, weight_decay: 0.0 };
    let mut backend: Box<dyn Backend> = make_backend(device, spec, BENCH_CLASSES, 0, adam)?;
    let (x, y) = synthetic_batch_for(batch, BENCH_CLASSES, spec.input);
    // Training: warm up, then `steps` steps; the stats call is the device sync.
    backend.train_step(&x, &y, 1e-3, 0)?;
    backend.take_train_stats()?;
    let t = Instant::now();
    for s in 0..steps {
        backend.train_step(&x, &y, 1e-3, s as u64 + 1)?;
    }
    backend.take_train_stats()?;
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    // Inference.
    backend.predict(&x, batch)?;
    let t = Instant::now();
    for _ in 0..steps {
        backend.predict(&x, batch)?;
    }
    let infer_ms = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let flops: u64 = spec.resolve(BENCH_CLASSES)?.iter().map(|l| l.flops).sum();
    Ok(BenchReport {
        machine: Machine::current(),
        device: backend.describe(),
        arch: spec.arch_text(),
        input: spec.input,
        batch_size: batch,
        layers,
        train_step_ms: step_ms,
        train_images_per_sec: batch as f64 / (step_ms / 1e3),
        train_gflops: 3.0 * flops as f64 * batch as f64 / (step_ms * 1e6),
        infer_images_per_sec: batch as f64 / (infer_ms / 1e3),
        flops_per_image_forward: flops,
        matmul_peak_gflops: match device {
            Device::Cpu => Some(cpu_matmul_peak()),
            Device::Cuda => None,
        },
        sgemm_1024_gflops: match device {
            Device::Cpu => None,
            Device::Cuda => Some(crate::cuda::bench_sgemm(1024)?),
        },
    })
}

/// The report as a table for people.
pub fn table(r: &BenchReport) -> String {
    let mut s = format!(
        "machine: {} ({} cores), {} threads; device: {}; batch {}\nmodel: {} on {} images\n\n",
        r.machine.cpu, r.machine.cores, r.machine.threads, r.device, r.batch_size, r.arch, r.input
    );
    let width = r.layers.iter().map(|l| l.layer.len()).max().unwrap_or(0).max(26);
    s += &format!(
        "{:<14} {:<width$} {:<18} {:>10} {:>9} {:>10} {:>9}\n",
        "layer", "", "input", "fwd ms", "GFLOP/s", "bwd ms", "GFLOP/s"
    );
    for l in &r.layers {
        let g = |v: f64| if v > 0.0 { format!("{v:.1}") } else { "-".into() };
        s += &format!(
            "{:<14} {:<width$} {:<18} {:>10.3} {:>9} {:>10.3} {:>9}\n",
            l.name,
            l.layer,
            format!("{:?}", l.input),
            l.forward_ms,
            g(l.forward_gflops),
            l.backward_ms,
            g(l.backward_gflops)
        );
    }
    let (f, b): (f64, f64) =
        (r.layers.iter().map(|l| l.forward_ms).sum(), r.layers.iter().map(|l| l.backward_ms).sum());
    s += &format!("{:<14} {:<width$} {:<18} {:>10.3} {:>9} {:>10.3}\n\n", "sum", "", "", f, "", b);
    s += &format!(
        "training step: {:.2} ms = {:.0} images/s ({:.1} GFLOP/s, {:.1} MFLOP per image forward)\ninference: {:.0} images/s\n",
        r.train_step_ms,
        r.train_images_per_sec,
        r.train_gflops,
        r.flops_per_image_forward as f64 / 1e6,
        r.infer_images_per_sec
    );
    if let Some(g) = r.sgemm_1024_gflops {
        s += &format!("our SGEMM, 1024x1024x1024: {g:.0} GFLOP/s\n");
    }
    if let Some(peak) = r.matmul_peak_gflops {
        s += &format!(
            "matmul peak (sgemm 512^3 on every thread): {peak:.0} GFLOP/s; the training step runs at {:.0}% of it\n",
            100.0 * r.train_gflops / peak
        );
        s += "GFLOP/s count a direct convolution's operations. Where a block's shape allows it, the CPU computes a\n\
              one-channel first block directly and 3x3 blocks by Winograd F(2x2,3x3), with 2.25x fewer multiplies:\n\
              the rates are effective ones and can pass the peak.\n";
    }
    s
}
