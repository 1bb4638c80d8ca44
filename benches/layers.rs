//! `cargo bench`: the same measurements as `medcnn bench` (per-layer forward and backward at
//! the model's shapes, then whole training steps and inference), printed as a table.
//!
//! Settings come from the environment so the harness needs no flags:
//! MEDCNN_BENCH_BATCH (64), MEDCNN_BENCH_STEPS (20), MEDCNN_BENCH_THREADS (all cores),
//! MEDCNN_BENCH_DEVICE (cpu | cuda), MEDCNN_BENCH_ARCH (reference), MEDCNN_BENCH_IMAGE_SIZE (64),
//! MEDCNN_BENCH_CHANNELS (1).

use medcnn::backend::Device;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let threads = env("MEDCNN_BENCH_THREADS", 0usize);
    if threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().expect("thread pool");
    }
    let device = match std::env::var("MEDCNN_BENCH_DEVICE").as_deref() {
        Ok("cuda") => Device::Cuda,
        _ => Device::Cpu,
    };
    let spec = medcnn::data::InputShape::new(env("MEDCNN_BENCH_CHANNELS", 1), env("MEDCNN_BENCH_IMAGE_SIZE", 64))
        .and_then(|input| {
            medcnn::spec::ModelSpec::parse(&env("MEDCNN_BENCH_ARCH", "reference".to_string()), input, 0.4)
        });
    let run =
        spec.and_then(|s| medcnn::bench::run(device, &s, env("MEDCNN_BENCH_BATCH", 64), env("MEDCNN_BENCH_STEPS", 20)));
    match run {
        Ok(r) => print!("{}", medcnn::bench::table(&r)),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
