//! The `medcnn` command line: train, eval, predict, arch, bench, data fetch (and, from other
//! modules, explain, inspect, serve). Every error ends here as one message and a non-zero exit.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use medcnn::backend::Device;
use medcnn::data::InputShape;
use medcnn::optim::LrSchedule;
use medcnn::spec::{ModelSpec, REFERENCE_DROPOUT};
use medcnn::train::{self, Outcome, TrainConfig};

#[derive(Parser)]
#[command(
    name = "medcnn",
    version,
    about = "A from-scratch CNN trainer for MedNIST, with hand-written CPU and CUDA kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The network and its input, as `train`, `arch` and `bench` take them.
#[derive(Args, Clone)]
struct SpecArgs {
    /// The network: `reference` (the default), the layers as PyTorch names them separated by
    /// spaces, e.g. "Conv2d(16, 5, padding=2) ReLU MaxPool2d(2) AdaptiveAvgPool2d(1) Flatten Linear",
    /// or @FILE (one layer per line, # comments). See `medcnn arch`.
    #[arg(long, default_value = "reference")]
    arch: String,
    /// Images are resized to N x N.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    image_size: usize,
    /// 1 (gray) or 3 (RGB: a gray image becomes three equal channels).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    channels: usize,
}

impl SpecArgs {
    fn spec(&self, dropout: Option<f64>) -> Result<ModelSpec> {
        check_dropout(&self.arch, dropout)?;
        ModelSpec::parse(
            &self.arch,
            InputShape::new(self.channels, self.image_size)?,
            dropout.unwrap_or(REFERENCE_DROPOUT),
        )
    }
}

/// `--dropout` sets the reference's dropout; a written spec says `Dropout(p=...)` itself.
fn check_dropout(arch: &str, dropout: Option<f64>) -> Result<()> {
    if dropout.is_some() && arch.trim() != "reference" {
        anyhow::bail!("--dropout applies to --arch reference; in your own spec write Dropout(p=...) where you want it");
    }
    Ok(())
}

#[derive(Subcommand)]
enum Command {
    /// Train a network (the reference by default, or --arch); writes metrics, plots, the best
    /// model and a checkpoint to --out.
    Train(TrainArgs),
    /// A table of a network's layers: output shapes, parameters and MFLOP per image.
    Arch {
        #[command(flatten)]
        spec: SpecArgs,
        /// Classes (the outputs of a last Linear without a size).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..))]
        classes: u64,
        /// The reference's dropout.
        #[arg(long, allow_negative_numbers = true)]
        dropout: Option<f64>,
        /// Print a Python module defining the same network in PyTorch (`model`), whose
        /// state_dict names and shapes are the tensors medcnn saves.
        #[arg(long)]
        pytorch: bool,
    },
    /// Accuracy, loss and confusion matrix of a saved model on a split.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// A folder of class folders or a MedNIST .tar.gz (default: data/, where MedNIST is downloaded when missing).
        #[arg(long)]
        data: Option<PathBuf>,
        /// train, val, test (the model's own split) or all.
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
        batch_size: u64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// The class and the probabilities of each image.
    Predict {
        #[arg(long)]
        model: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Per-layer forward/backward timings, training and inference throughput.
    Bench {
        #[command(flatten)]
        spec: SpecArgs,
        /// Benchmark the network of this model file instead of --arch.
        #[arg(long, conflicts_with_all = ["arch", "image_size", "channels"])]
        model: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Device::Cpu)]
        device: Device,
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
        batch_size: u64,
        /// Timed training steps (after one warm-up).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        steps: u64,
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Where to draw the per-layer chart.
        #[arg(long, default_value = "outputs/bench.png")]
        plot: PathBuf,
    },
    /// Saliency and Grad-CAM pictures of what the model looks at in each image.
    Explain(medcnn::explain::ExplainArgs),
    /// The first layer's filters, feature maps and the test images the model gets wrong.
    Inspect(medcnn::inspect::InspectArgs),
    /// A web page and JSON API: upload an image, see the class, the probabilities and Grad-CAM.
    Serve(medcnn::serve::ServeArgs),
    /// Get the MedNIST archive into data/.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download MedNIST.tar.gz from MONAI (md5-checked), or import a local copy with --from.
    Fetch {
        /// Import this local archive instead of downloading.
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        #[arg(long, default_value = medcnn::data::MEDNIST_URL)]
        url: String,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// A folder of class folders or a MedNIST .tar.gz (default: data/, where MedNIST is downloaded when missing).
    #[arg(long)]
    data: Option<PathBuf>,
    #[arg(long, default_value = "outputs")]
    out: PathBuf,
    // Negative numbers are taken as values, so `--epochs -3` is refused naming --epochs.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    epochs: usize,
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    weight_decay: f64,
    #[command(flatten)]
    spec: SpecArgs,
    /// The reference network's dropout probability (default 0.4).
    #[arg(long, allow_negative_numbers = true)]
    dropout: Option<f64>,
    /// constant, step:EVERY:GAMMA or cosine[:MIN_LR]
    #[arg(long, default_value = "constant", value_parser = parse_schedule)]
    schedule: LrSchedule,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    device: Device,
    /// At most N images per class (quick runs).
    #[arg(long, allow_negative_numbers = true)]
    limit: Option<usize>,
    /// Random horizontal flips of training images.
    #[arg(long)]
    augment: bool,
    /// Skip images that cannot be decoded (and list them) instead of stopping.
    #[arg(long)]
    skip_bad_images: bool,
    /// Save the first conv layer's filters after every epoch (OUT/filters/).
    #[arg(long)]
    save_filters: bool,
    /// Continue from OUT/checkpoint.safetensors.
    #[arg(long)]
    resume: bool,
    /// Per-layer statistics (OUT/layer_stats.csv, .png) every N steps (default: about 4 per epoch).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stats_every: Option<u64>,
    /// Serve a live page of the run at ADDR (default 127.0.0.1:8090), until Ctrl-C after it ends.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = medcnn::dashboard::DEFAULT_ADDR)]
    dashboard: Option<String>,
}

fn parse_schedule(s: &str) -> std::result::Result<LrSchedule, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |i: usize, what: &str| -> std::result::Result<f64, String> {
        parts.get(i).ok_or(format!("{s}: missing {what}"))?.parse::<f64>().map_err(|e| format!("{s}: {what}: {e}"))
    };
    match parts[0] {
        "constant" => Ok(LrSchedule::Constant),
        "step" => Ok(LrSchedule::Step { every: num(1, "EVERY")? as usize, gamma: num(2, "GAMMA")? }),
        "cosine" => Ok(LrSchedule::Cosine { epochs: 0, min_lr: if parts.len() > 1 { num(1, "MIN_LR")? } else { 0.0 } }),
        other => Err(format!("unknown schedule {other}: use constant, step:EVERY:GAMMA or cosine[:MIN_LR]")),
    }
}

fn set_threads(threads: usize) -> Result<()> {
    let n = if threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { threads };
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("starting the thread pool")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train(a) => {
            set_threads(a.threads)?;
            let schedule = match a.schedule {
                LrSchedule::Cosine { min_lr, .. } => LrSchedule::Cosine { epochs: a.epochs, min_lr },
                s => s,
            };
            check_dropout(&a.spec.arch, a.dropout)?;
            let cfg = TrainConfig {
                data: a.data,
                out: a.out,
                epochs: a.epochs,
                batch_size: a.batch_size,
                lr: a.lr,
                weight_decay: a.weight_decay,
                dropout: a.dropout.unwrap_or(REFERENCE_DROPOUT),
                arch: a.spec.arch,
                image_size: a.spec.image_size,
                channels: a.spec.channels,
                schedule,
                seed: a.seed,
                threads: a.threads,
                device: a.device,
                limit: a.limit,
                augment: a.augment,
                skip_bad_images: a.skip_bad_images,
                save_filters: a.save_filters,
                stats_every: a.stats_every,
                dashboard: a.dashboard,
            };
            cfg.validate()?;
            ctrlc::set_handler(|| {
                if train::INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::process::exit(130); // a second Ctrl-C: stop now
                }
                if medcnn::dashboard::lingering() {
                    eprintln!("\nCtrl-C: stopping the dashboard");
                } else {
                    eprintln!("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to quit now)");
                }
            })
            .context("installing the Ctrl-C handler")?;
            let outcome = train::train(&cfg, a.resume);
            medcnn::dashboard::linger(); // with --dashboard: keeps serving until Ctrl-C
            match outcome? {
                Outcome::Finished(_) => Ok(ExitCode::SUCCESS),
                Outcome::Interrupted { .. } => Ok(ExitCode::from(130)),
            }
        }
        Command::Eval { model, data, split, device, batch_size, threads } => {
            set_threads(threads)?;
            medcnn::evaluate::eval_command(&model, data.as_deref(), &split, device, batch_size as usize)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Predict { model, images, json, device, threads } => {
            set_threads(threads)?;
            medcnn::evaluate::predict_command(&model, &images, device, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Arch { spec, classes, dropout, pytorch } => {
            let spec = spec.spec(dropout)?;
            if pytorch {
                print!("{}", spec.pytorch_module(classes as usize)?);
            } else {
                print!("{}", spec.summary(classes as usize)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { spec, model, device, batch_size, steps, threads, json, plot } => {
            set_threads(threads)?;
            let spec = match model {
                Some(path) => medcnn::model_file::SavedModel::load(&path)?.spec,
                None => spec.spec(None)?,
            };
            medcnn::backend::check_device(device)?;
            let r = medcnn::bench::run(device, &spec, batch_size as usize, steps as usize)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", medcnn::bench::table(&r));
            }
            if !r.layers.is_empty() {
                let bars: Vec<_> = r
                    .layers
                    .iter()
                    .filter(|l| l.forward_ms + l.backward_ms > 0.0)
                    .map(|l| medcnn::report::BenchBar {
                        label: l.name.clone(),
                        forward_ms: l.forward_ms,
                        backward_ms: l.backward_ms,
                    })
                    .collect();
                let title =
                    format!("{} - batch {} - {:.0} img/s training", r.device, r.batch_size, r.train_images_per_sec);
                medcnn::report::plot_bench(&title, &bars, &plot)?;
                if !json {
                    println!("chart: {}", plot.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain(a) => medcnn::explain::run(&a).map(|_| ExitCode::SUCCESS),
        Command::Inspect(a) => medcnn::inspect::run(&a).map(|_| ExitCode::SUCCESS),
        Command::Serve(a) => medcnn::serve::run(&a).map(|_| ExitCode::SUCCESS),
        Command::Data { command: DataCommand::Fetch { from, dir, url } } => {
            let path = match from {
                Some(src) => medcnn::data::import_archive(&src, &dir)?,
                None => medcnn::data::fetch(&url, Some(medcnn::data::MEDNIST_MD5), &dir, true)?,
            };
            println!("MedNIST archive ready at {} (train with `medcnn train`)", path.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    medcnn::tensor::keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
