//! The CUDA kernels on a machine without a GPU: `kernels/*.cu` compiled as C++20 by g++ with
//! the small CUDA emulation in `kernels/emulate/` (blocks in turn; each CUDA thread a fiber, or
//! an OS thread under the sanitizers; a real barrier for `__syncthreads`), driven by the same
//! host code as on a GPU (`medcnn::cuda::ops` and `engine`), and compared with the CPU layers:
//!
//! - every parameter struct has the size the kernels expect, and every kernel is launchable;
//! - every kernel's outputs and gradients match the CPU path (`cuda::selftest::kernel_checks`);
//! - one whole training step of the reference model matches `CpuBackend` (loss, every
//!   gradient, every weight after Adam, predictions);
//! - the engine's other duties (weights and optimizer state in and out, stats, chunked
//!   prediction, errors) and the benchmark code work;
//! - the kernels have no out-of-bounds accesses (AddressSanitizer build) and no data races on
//!   shared memory, i.e. no missing `__syncthreads` (ThreadSanitizer build);
//! - and the emulator does catch such bugs: deliberately broken probe kernels must fail.
//!
//! It says nothing about GPU speed or GPU-only behaviour (see tests/cuda_vs_cpu.rs). Without a
//! C++ compiler every test prints `skipped: why` and passes, unless MEDCNN_REQUIRE_GXX=1
//! (`.ci/run` sets it), when it fails. The harness binaries are cached in
//! the cargo target folder by source hash.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use medcnn::backend::{AdamConfig, Backend, CpuBackend, IMAGE_SIDE};
use medcnn::cuda::emulator::{self, EmuExec, Flavor};
use medcnn::cuda::engine::Engine;
use medcnn::cuda::exec::{bytes_of, bytes_of_mut, launch, Buf, DevPtr, Exec, Launch};
use medcnn::cuda::params::{self, ReluParams};
use medcnn::cuda::selftest::{self, Check};
use medcnn::cuda::sources;
use medcnn::model::ModelConfig;

/// The harness of `flavor`, built once per test run (flavors in parallel); None (with a
/// message) without g++.
fn harness(flavor: Flavor) -> Option<PathBuf> {
    static BUILT: [OnceLock<PathBuf>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    if !emulator::compiler_available() {
        let why =
            format!("no C++ compiler (`{}`, from $CXX or g++) to build the kernel emulator", emulator::compiler());
        common::skip_unless_required("GXX", why);
        return None;
    }
    let slot = match flavor {
        Flavor::Release => &BUILT[0],
        Flavor::Address => &BUILT[1],
        Flavor::Thread => &BUILT[2],
    };
    let exe = slot.get_or_init(|| {
        emulator::build_harness(Path::new(env!("CARGO_TARGET_TMPDIR")), flavor).unwrap_or_else(|e| panic!("{e:#}"))
    });
    Some(exe.clone())
}

fn emu(flavor: Flavor) -> Option<EmuExec> {
    harness(flavor).map(|p| EmuExec::spawn(&p).expect("start the emulator"))
}

fn report(title: &str, checks: &[Check]) {
    println!("{title}:");
    for c in checks {
        println!("  {c}");
    }
    let bad: Vec<&Check> = checks.iter().filter(|c| !c.ok()).collect();
    assert!(
        bad.is_empty(),
        "{} of {} checks failed:\n{}",
        bad.len(),
        checks.len(),
        bad.iter().map(|c| format!("  {c}")).collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn param_structs_have_the_kernels_sizes() {
    let Some(mut ex) = emu(Flavor::Release) else { return };
    let cxx = ex.struct_sizes().unwrap();
    let rust = params::all_sizes();
    assert_eq!(cxx.len(), rust.len(), "C++ structs {cxx:?}\nRust structs {rust:?}");
    for (name, size) in rust {
        let c = cxx.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} is not in kernels/common.cuh"));
        assert_eq!(c.1, size, "{name}: {} bytes in C++, {size} in Rust", c.1);
    }
}

#[test]
fn every_kernel_in_the_sources_is_launchable() {
    let Some(mut ex) = emu(Flavor::Release) else { return };
    let mut launchable: Vec<String> =
        ex.kernel_names().unwrap().into_iter().filter(|k| !k.starts_with("emu_probe_")).collect();
    let mut defined: Vec<String> = sources::all_kernels().into_iter().map(|(k, _)| k).collect();
    launchable.sort();
    defined.sort();
    assert_eq!(launchable, defined, "kernels/emulate/harness.cpp must register every extern \"C\" kernel");
}

#[test]
fn a_launch_with_the_wrong_parameter_struct_is_refused() {
    let Some(mut ex) = emu(Flavor::Release) else { return };
    let x = Buf::<f32>::alloc(&mut ex, 4).unwrap();
    // relu_forward takes ReluParams; give it a ConvParams.
    let err = launch(&mut ex, "relu_forward", [1, 1, 1], [32, 1, 1], &params::ConvParams::default(), &[x.ptr, x.ptr])
        .unwrap_err();
    assert!(format!("{err}").contains("parameter struct of 44 bytes"), "{err}");
    let err = launch(&mut ex, "relu_forward", [1, 1, 1], [32, 1, 1], &ReluParams { n: 4 }, &[x.ptr]).unwrap_err();
    assert!(format!("{err}").contains("pointers"), "{err}");
    launch(&mut ex, "relu_forward", [1, 1, 1], [32, 1, 1], &ReluParams { n: 4 }, &[x.ptr, x.ptr]).unwrap();
    assert_eq!(ex.sm_count(), 4);
}

#[test]
fn every_kernel_matches_the_cpu() {
    let Some(mut ex) = emu(Flavor::Release) else { return };
    let checks = selftest::kernel_checks(&mut ex, 1).unwrap();
    report("kernels (emulated) vs CPU", &checks);
}

#[test]
fn a_training_step_matches_the_cpu() {
    let Some(ex) = emu(Flavor::Release) else { return };
    let checks = selftest::train_step_checks(ex, 3, 7, 0.4).unwrap();
    report("training step (emulated engine) vs CpuBackend", &checks);
}

/// A device whose max-pool forward picks the wrong winner: after each `max_pool_forward`, the
/// argmax of every window moves to its horizontal neighbour in the same 2x2 window (iw XOR 1),
/// a value of the window but not its maximum. The pooled values stay right, so only the
/// backward routes wrongly: the flip check must fail, not excuse the gradients.
struct WrongArgmax<E: Exec>(E);

impl<E: Exec> Exec for WrongArgmax<E> {
    fn describe(&self) -> String {
        format!("{} with a wrong max-pool argmax", self.0.describe())
    }
    fn sm_count(&self) -> u32 {
        self.0.sm_count()
    }
    fn max_grid_blocks(&self) -> u32 {
        self.0.max_grid_blocks()
    }
    fn alloc(&mut self, bytes: usize) -> anyhow::Result<DevPtr> {
        self.0.alloc(bytes)
    }
    fn free(&mut self, ptr: DevPtr) -> anyhow::Result<()> {
        self.0.free(ptr)
    }
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> anyhow::Result<()> {
        self.0.upload(dst, src)
    }
    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> anyhow::Result<()> {
        self.0.download(src, dst)
    }
    fn zero(&mut self, dst: DevPtr, bytes: usize) -> anyhow::Result<()> {
        self.0.zero(dst, bytes)
    }
    fn sync(&mut self) -> anyhow::Result<()> {
        self.0.sync()
    }
    fn launch(&mut self, l: &Launch) -> anyhow::Result<()> {
        self.0.launch(l)?;
        if l.kernel == "max_pool_forward" {
            // PoolParams starts with planes, h, w, oh, ow (i32); the pointers are x, y, argmax.
            let int = |i: usize| i32::from_le_bytes(l.params[4 * i..4 * i + 4].try_into().unwrap()) as usize;
            let (planes, w, oh, ow) = (int(0), int(2), int(3), int(4));
            let mut arg = vec![0i32; planes * oh * ow];
            self.0.download(l.ptrs[2], bytes_of_mut(&mut arg))?;
            arg.iter_mut().for_each(|a| *a = ((*a as usize / w) * w + (*a as usize % w ^ 1)) as i32);
            self.0.upload(l.ptrs[2], bytes_of(&arg))?;
        }
        Ok(())
    }
}

/// A deliberately wrong argmax must fail the training-step checks, by the flip check and not
/// only by the gradients it is allowed to excuse.
#[test]
fn a_wrong_max_pool_argmax_fails_the_checks() {
    let Some(ex) = emu(Flavor::Release) else { return };
    let checks = selftest::train_step_checks(WrongArgmax(ex), 3, 7, 0.4).unwrap();
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok()).collect();
    for c in &failed {
        println!("  (expected) {c}");
    }
    assert!(
        failed.iter().any(|c| c.name.contains("winners that are not near ties")),
        "a wrong argmax passed the winner check:\n{}",
        checks.iter().map(|c| format!("  {c}")).collect::<Vec<_>>().join("\n")
    );
    // And the gradients it reroutes are compared, not excused as near ties.
    assert!(
        failed.iter().any(|c| c.name.ends_with("grad conv_block.0.weight")),
        "the conv gradients were not compared"
    );
}

/// The launch sequence an H100 runs (132 SMs, so the same GEMM plans and split-K factors) at
/// the training batch size, 64.
#[test]
fn a_batch_64_training_step_with_h100_plans_matches_the_cpu() {
    let Some(ex) = emu(Flavor::Release) else { return };
    let checks = selftest::train_step_checks(ex.with_shape(132, 4), 64, 11, 0.4).unwrap();
    report("training step at batch 64 with H100 plans (emulated) vs CpuBackend", &checks);
}

/// The engine's other `Backend` duties on the emulator: weights and optimizer state in and
/// out (bit for bit), stats that reset, prediction in chunks with buffers that grow with the
/// batch, and clear errors for bad input.
#[test]
fn the_engine_round_trips_state_and_predicts_in_chunks() {
    let Some(ex) = emu(Flavor::Release) else { return };
    let cfg = ModelConfig::default();
    let adam = AdamConfig { lr: 1e-3, weight_decay: 0.0 };
    // One seed (it also seeds dropout); the CPU trains a step first, so importing matters.
    let mut dev = Engine::new(ex, &cfg, 2, adam).unwrap().with_predict_chunk(2);
    let mut cpu = CpuBackend::new(&cfg, 2, adam);
    let x: Vec<f32> = (0..5 * IMAGE_SIDE * IMAGE_SIDE).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
    cpu.train_step(&x[..2 * IMAGE_SIDE * IMAGE_SIDE], &[0, 3], 1e-3, 0).unwrap();
    cpu.take_train_stats().unwrap();
    dev.import_weights(&cpu.export_weights().unwrap()).unwrap();
    dev.import_optimizer(&cpu.export_optimizer().unwrap()).unwrap();
    assert_eq!(dev.export_weights().unwrap(), cpu.export_weights().unwrap());
    assert_eq!(dev.export_optimizer().unwrap(), cpu.export_optimizer().unwrap());
    assert_eq!(dev.take_train_stats().unwrap().images, 0);

    // 5 images in chunks of 2 (the last one short), after a training step at batch 1.
    dev.train_step(&x[..IMAGE_SIDE * IMAGE_SIDE], &[4], 1e-3, 1).unwrap();
    cpu.train_step(&x[..IMAGE_SIDE * IMAGE_SIDE], &[4], 1e-3, 1).unwrap();
    let (pd, pc) = (dev.predict(&x, 5).unwrap(), cpu.predict(&x, 5).unwrap());
    let err = selftest::rel_err(&pd, &pc);
    assert!(err < 1e-3, "predict in chunks: {err}");
    let (sd, sc) = (dev.take_train_stats().unwrap(), cpu.take_train_stats().unwrap());
    assert_eq!((sd.images, sd.correct), (sc.images, sc.correct));
    assert!(((sd.loss_sum - sc.loss_sum) / sc.loss_sum).abs() < 1e-4, "{sd:?} {sc:?}");
    assert_eq!(dev.take_train_stats().unwrap().images, 0);

    let mut bad = cpu.export_weights().unwrap();
    bad[0].name = "nope".into();
    assert!(format!("{:#}", dev.import_weights(&bad).unwrap_err()).contains("nope"));
    assert!(
        format!("{:#}", dev.train_step(&x[..IMAGE_SIDE * IMAGE_SIDE], &[6], 1e-3, 2).unwrap_err()).contains("label 6")
    );
    assert!(format!("{:#}", dev.predict(&x[..10], 1).unwrap_err()).contains("values"));
}

/// The engine's per-layer statistics (what it copies to the host at a statistics step) against
/// the CPU's after the same step from the same weights: every parameter's norms and update
/// ratio, and the conv blocks' outputs. The device reports the outputs its training forward
/// left (with the weights before the update), so they are compared with the CPU's outputs
/// before the step.
#[test]
fn the_engine_reports_the_layer_statistics_the_cpu_does() {
    let Some(ex) = emu(Flavor::Release) else { return };
    let cfg = ModelConfig { dropout: 0.0, gemm_only: true, ..ModelConfig::default() };
    let adam = AdamConfig { lr: 2e-3, weight_decay: 0.0 };
    let mut dev = Engine::new(ex, &cfg, 5, adam).unwrap();
    let mut cpu = CpuBackend::new(&cfg, 5, adam);
    let n = 3;
    let x: Vec<f32> = (0..n * IMAGE_SIDE * IMAGE_SIDE).map(|i| ((i * 53 % 97) as f32) / 48.0 - 1.0).collect();
    let before = cpu.layer_stats(&x, n).unwrap();
    for b in [&mut dev as &mut dyn Backend, &mut cpu] {
        b.train_step(&x, &[1, 4, 2], 2e-3, 0).unwrap();
    }
    let (sd, sc) = (dev.layer_stats(&x, n).unwrap(), cpu.layer_stats(&x, n).unwrap());
    assert_eq!(sd.params.len(), 12);
    for (d, c) in sd.params.iter().zip(&sc.params) {
        assert_eq!(d.name, c.name);
        for (what, a, b) in [
            ("weight norm", d.weight_norm, c.weight_norm),
            ("grad norm", d.grad_norm, c.grad_norm),
            ("update ratio", d.update_ratio, c.update_ratio),
        ] {
            assert!(a.is_finite() && a > 0.0, "{} {what}: {a}", d.name);
            assert!((a - b).abs() <= 2e-3 * b.abs(), "{} {what}: device {a}, cpu {b}", d.name);
        }
    }
    for block in ["conv_block.0", "conv_block.3", "conv_block.6", "conv_block.9"] {
        let d = sd.outputs.iter().find(|o| o.name == block).expect("the device reports every conv block");
        let c = before.outputs.iter().find(|o| o.name == block).unwrap();
        assert!((d.mean - c.mean).abs() <= 1e-3 * c.mean.abs().max(1e-3), "{block} mean: {} vs {}", d.mean, c.mean);
        assert!((d.std - c.std).abs() <= 1e-3 * c.std.max(1e-3), "{block} std: {} vs {}", d.std, c.std);
        assert!((d.zero_frac - c.zero_frac).abs() < 0.005, "{block} zeros: {} vs {}", d.zero_frac, c.zero_frac);
    }
    println!("{} parameters and {} outputs agree", sd.params.len(), sd.outputs.len());
}

/// The benchmark code runs on any device: on the emulator its numbers mean nothing, but its
/// labels, flop counts and plans are checked.
#[test]
fn the_benchmarks_run() {
    let Some(ex) = emu(Flavor::Release) else { return };
    let b = medcnn::cuda::bench::layer_bench(ex, &ModelConfig::default(), 2, 1).unwrap();
    let labels: Vec<&str> = b.layers.iter().map(|l| l.label.as_str()).collect();
    assert_eq!(labels.len(), 14, "{labels:?}");
    assert!(labels.contains(&"conv_block.9 conv+relu") && labels.contains(&"adam") && labels.contains(&"loss"));
    let conv0 = &b.layers[0];
    assert_eq!(conv0.label, "conv_block.0 conv+relu");
    assert_eq!(conv0.forward_flops, 2 * 32 * 9 * 2 * 62 * 62);
    assert!(b.step_ms > 0.0 && b.layers.iter().all(|l| l.forward_ms >= 0.0 && l.backward_ms >= 0.0));
    let Some(mut ex) = emu(Flavor::Release) else { return };
    let runs =
        medcnn::cuda::bench::sgemm_gflops_by_plan(&mut ex, 40, &medcnn::cuda::bench::candidate_plans(40)).unwrap();
    assert_eq!(runs.len(), 5);
    assert!(runs.iter().all(|(_, g)| *g > 0.0));
}

#[test]
fn kernels_stay_in_bounds() {
    let Some(mut ex) = emu(Flavor::Address) else { return };
    let checks = selftest::kernel_checks(&mut ex, 2).unwrap();
    report("kernels under AddressSanitizer", &checks);
}

#[test]
fn kernels_have_no_shared_memory_races() {
    let Some(mut ex) = emu(Flavor::Thread) else { return };
    let checks = selftest::shared_memory_checks(&mut ex, 3).unwrap();
    report("shared-memory kernels under ThreadSanitizer", &checks);
}

/// Runs probe kernel `name` (one block of 64 threads over a 64-float buffer) on `flavor`.
fn probe(flavor: Flavor, name: &'static str) -> Option<anyhow::Result<Vec<f32>>> {
    probe_n(flavor, name, 64)
}

/// `probe` with `ReluParams { n }`.
fn probe_n(flavor: Flavor, name: &'static str, n: i32) -> Option<anyhow::Result<Vec<f32>>> {
    let mut ex = EmuExec::spawn_quiet(&harness(flavor)?).expect("start the emulator");
    let out = Buf::<f32>::alloc(&mut ex, 64).unwrap();
    let run =
        launch(&mut ex, name, [1, 1, 1], [64, 1, 1], &ReluParams { n }, &[out.ptr]).and_then(|_| out.read(&mut ex));
    Some(run)
}

/// A grid-stride loop cannot wrap: at the top of the int range every thread's index steps
/// past the end once and stops (the probe caps a runaway loop at 8 iterations, which is what
/// `e += stride` would give: a negative e, still below the bound). The launchers refuse a
/// launch that does not fit a 32-bit index, with the kernel's name, before touching memory.
#[test]
fn grid_stride_indices_do_not_wrap() {
    let Some(run) = probe_n(Flavor::Address, "emu_probe_grid_end", i32::MAX) else { return };
    assert_eq!(run.unwrap(), vec![1.0f32; 64], "a grid-stride index near 2^31 did not stop");
    let mut ex = emu(Flavor::Release).unwrap();
    let err = medcnn::cuda::ops::relu_forward(&mut ex, 1 << 31, Default::default(), Default::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("relu") && msg.contains("32-bit"), "{msg}");
}

/// The emulator catches the bugs it is there for: each deliberately wrong probe kernel must
/// give a wrong result or an error.
#[test]
fn the_emulator_catches_broken_kernels() {
    // A missing __syncthreads: fibers run in order, so the reads see unwritten values.
    let Some(run) = probe(Flavor::Release, "emu_probe_missing_sync") else { return };
    let right: Vec<f32> = (0..64).map(|t| ((t + 1) % 64 + 1) as f32).collect();
    assert_ne!(run.unwrap(), right, "a missing barrier went unnoticed");
    // ThreadSanitizer reports it as a race and stops the process.
    let err = probe(Flavor::Thread, "emu_probe_missing_sync").unwrap().unwrap_err();
    assert!(format!("{err:#}").contains("died"), "{err:#}");
    // A barrier that only some threads reach.
    let err = probe(Flavor::Release, "emu_probe_divergent_sync").unwrap().unwrap_err();
    assert!(format!("{err:#}").contains("divergent barrier"), "{err:#}");
    // A write past the end of a buffer: AddressSanitizer stops the process.
    let err = probe(Flavor::Address, "emu_probe_out_of_bounds").unwrap().unwrap_err();
    assert!(format!("{err:#}").contains("died"), "{err:#}");
}
