//! `medcnn serve`: a web page and a small JSON API around one trained model.
//!
//! - `GET /`: one self-contained page (inline CSS and JS, nothing fetched from elsewhere): drop
//!   or choose JPEG/PNG images, see each one's predicted class, the probabilities as bars and
//!   the Grad-CAM heatmap over the image, newest first.
//! - `POST /api/predict`: the image as the body, or as a `multipart/form-data` file field;
//!   answers JSON with the class, the probabilities and the model's identity.
//! - `POST /api/explain[?scale=N][&target=CLASS]`: the Grad-CAM heatmap over the image, a PNG.
//! - `GET /health`: status, model identity, classes, limits.
//!
//! The model file is read once; one CPU model (the layer-by-layer reference, which Grad-CAM
//! needs) sits behind a mutex and answers both endpoints (a forward pass is about a millisecond).
//! With `--device cuda`, predictions go to one CUDA backend owned by a dedicated thread, and
//! Grad-CAM stays on the CPU model. Requests are read by the shared HTTP stack ([`crate::web`],
//! hyper and axum on tokio) and answered on `workers` blocking threads, where images are
//! decoded in parallel; every limit (upload size, decoded pixels, header size, deadlines)
//! answers with a 4xx JSON error, and a panic answers 500 without stopping anything.
//!
//! What it is not: not a medical device, not authenticated, no TLS. It listens on loopback
//! unless an address is given, and warns when that address is reachable from other machines.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::backend::check_device;
use crate::backend::{Device, NamedTensor};
use crate::data::{DecodeNote, InputShape};
use crate::explain::{cpu_model, explain, heatmap_overlay_png, parse_class};
use crate::layers::cross_entropy::{argmax, softmax};
use crate::layers::Ctx;
use crate::model::Sequential;
use crate::model_file::SavedModel;
use crate::tensor::{from_vec, slice};
use crate::web::{self, Reply, Request};

/// The page, embedded in the binary.
pub const PAGE_HTML: &str = include_str!("page.html");
/// Default largest upload.
pub const DEFAULT_MAX_UPLOAD: usize = 8 << 20;
/// Default number of worker threads.
pub const DEFAULT_WORKERS: usize = 8;
/// Default (and largest) heatmap scale: the 64x64 map drawn `scale` times larger.
pub const DEFAULT_SCALE: usize = 4;
pub const MAX_SCALE: usize = 16;

/// The content security policy of the page: nothing may be loaded from anywhere else.
const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                        img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                        frame-ancestors 'none'";

/// `medcnn serve`: the page and the API around a trained model.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A trained model (model.safetensors from `medcnn train`).
    #[arg(long)]
    pub model: PathBuf,
    /// Where to listen. The default is reachable from this machine only; an address such as
    /// 0.0.0.0:8080 exposes the (unauthenticated) page to the network.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Where predictions run (Grad-CAM heatmaps always run on the CPU).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Threads answering requests.
    #[arg(long, default_value_t = DEFAULT_WORKERS as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub workers: u64,
    /// The largest upload accepted, in MiB (413 above it).
    #[arg(long, default_value_t = (DEFAULT_MAX_UPLOAD >> 20) as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_upload_mb: u64,
    /// Threads for the model's own computations (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Do not log one line per request to stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// Everything [`start_with`] needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub addr: SocketAddr,
    pub device: Device,
    pub workers: usize,
    pub max_upload: usize,
    /// Deadline for the request line and headers, from the connection's start.
    pub head_timeout: Duration,
    /// Deadline for the whole request, body included, from the connection's start.
    pub body_timeout: Duration,
    /// Connections open at once; more get a 503 at once.
    pub max_connections: usize,
    /// One line per request on stderr.
    pub log: bool,
    /// Tests only: `?panic=1` on `/api/predict` panics while holding the model, to show that
    /// the server survives it.
    #[doc(hidden)]
    pub fault_injection: bool,
}

impl ServeConfig {
    pub fn new(model: impl Into<PathBuf>, addr: SocketAddr, device: Device) -> ServeConfig {
        ServeConfig {
            model: model.into(),
            addr,
            device,
            workers: DEFAULT_WORKERS,
            max_upload: DEFAULT_MAX_UPLOAD,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(120),
            max_connections: web::MAX_CONNECTIONS,
            log: false,
            fault_injection: false,
        }
    }
}

/// A running server. Dropping it (or [`ServerHandle::shutdown`]) stops it.
pub struct ServerHandle {
    server: web::Server,
    model_id: String,
    classes: Vec<String>,
}

impl ServerHandle {
    /// The bound address (with the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://ADDR` (a wildcard address is written as loopback, which is where it can be reached
    /// from this machine).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The model's identity: the first 16 hex digits of the sha256 of its weights.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Stops accepting, finishes the requests in progress and joins every thread.
    pub fn shutdown(mut self) {
        self.server.shutdown();
    }

    /// Blocks while the server runs.
    pub fn wait(self) {
        self.server.wait();
    }
}

/// Loads `model_path` once and serves it on `addr` with the default settings.
pub fn start(model_path: &Path, addr: SocketAddr, device: Device) -> Result<ServerHandle> {
    start_with(ServeConfig::new(model_path, addr, device))
}

/// Loads the model once and starts the server as `cfg` says.
pub fn start_with(cfg: ServeConfig) -> Result<ServerHandle> {
    check_device(cfg.device)?;
    let saved = SavedModel::load(&cfg.model)?;
    let model = cpu_model(&saved).with_context(|| format!("{}: building the CPU model", cfg.model.display()))?;
    let gpu = match cfg.device {
        Device::Cpu => None,
        Device::Cuda => Some(GpuPredictor::start(saved.clone())?),
    };
    let model_id = weights_id(&saved.weights);
    let app = Arc::new(App {
        model: Mutex::new(model),
        gpu,
        classes: saved.classes.clone(),
        input: saved.spec.input,
        model_id: model_id.clone(),
        model_file: cfg.model.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        device: cfg.device,
        max_upload: cfg.max_upload,
        started: Instant::now(),
        fault_injection: cfg.fault_injection,
    });
    let limits = web::Limits {
        max_body: cfg.max_upload,
        head_timeout: cfg.head_timeout,
        body_timeout: cfg.body_timeout,
        max_connections: cfg.max_connections,
    };
    let limits2 = limits.clone();
    // One handler for every path: `App::route` answers 404 and 405 itself, in JSON.
    let router =
        axum::Router::new().fallback(move |req: axum::extract::Request| answer(app.clone(), req, limits2.clone()));
    let server = web::Server::start(
        web::ServerConfig {
            name: "serve".into(),
            addr: cfg.addr,
            io_threads: 2,
            blocking_threads: cfg.workers,
            limits,
            log: cfg.log,
        },
        router,
    )?;
    Ok(ServerHandle { server, model_id, classes: saved.classes })
}

/// Reads the request within the limits, then answers it on a blocking thread (decoding and
/// the model are plain CPU work); a panic there answers 500.
async fn answer(app: Arc<App>, req: axum::extract::Request, limits: web::Limits) -> axum::response::Response {
    use axum::response::IntoResponse;
    let req = match Request::read(req, &limits).await {
        Ok(r) => r,
        Err(refusal) => return refusal.into_response(),
    };
    match tokio::task::spawn_blocking(move || app.route(&req)).await {
        Ok(reply) => reply.into_response(),
        Err(_) => {
            Reply::error(500, "internal error while answering this request (the server keeps running)").into_response()
        }
    }
}

/// Parses `--addr`: `IP:PORT` or `HOST:PORT` (the first address it resolves to).
pub fn parse_addr(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .with_context(|| format!("--addr {s}: expected IP:PORT, e.g. 127.0.0.1:8080"))?
        .next()
        .with_context(|| format!("--addr {s}: resolves to no address"))
}

/// Runs `medcnn serve` until the process is stopped.
pub fn run(args: &ServeArgs) -> Result<()> {
    let addr = parse_addr(&args.addr)?;
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new().num_threads(args.threads).build_global().context("starting the thread pool")?;
    }
    let cfg = ServeConfig {
        workers: args.workers as usize,
        max_upload: (args.max_upload_mb as usize) << 20,
        log: !args.quiet,
        ..ServeConfig::new(&args.model, addr, args.device)
    };
    let handle = start_with(cfg)?;
    web::warn_if_exposed(handle.addr(), "this page");
    println!(
        "model {} ({}; {} classes: {}) on {}",
        args.model.display(),
        handle.model_id(),
        handle.classes().len(),
        handle.classes().join(", "),
        args.device
    );
    println!("serving on {}/ (Ctrl-C to stop)", handle.url());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    handle.wait();
    Ok(())
}

/// The first 16 hex digits of a sha256 over the weights' names, shapes and little-endian bytes.
pub fn weights_id(weights: &[NamedTensor]) -> String {
    let mut h = Sha256::new();
    for t in weights {
        h.update(t.name.as_bytes());
        h.update([0]);
        for d in &t.shape {
            h.update((*d as u64).to_le_bytes());
        }
        for v in &t.data {
            h.update(v.to_le_bytes());
        }
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

type GpuJob = (Vec<f32>, SyncSender<Result<Vec<f32>>>);

/// A backend (CUDA) owned by one thread; requests reach it through a channel, one at a time.
struct GpuPredictor {
    jobs: Mutex<Sender<GpuJob>>,
}

impl GpuPredictor {
    fn start(saved: SavedModel) -> Result<GpuPredictor> {
        let (tx, rx) = channel::<GpuJob>();
        let (ready_tx, ready_rx) = sync_channel::<Result<String>>(1);
        std::thread::Builder::new()
            .name("serve-device".into())
            .spawn(move || {
                let mut backend = match saved.backend(Device::Cuda) {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(b.describe()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for (x, reply) in rx {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| backend.predict(&x, 1)))
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("the device backend panicked")));
                    let _ = reply.send(r);
                }
            })
            .context("starting the device thread")?;
        let describe = ready_rx.recv().context("the device thread stopped before it was ready")??;
        eprintln!("predictions on {describe}");
        Ok(GpuPredictor { jobs: Mutex::new(tx) })
    }

    fn predict(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        let (tx, rx) = sync_channel(1);
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send((x, tx))
            .ok()
            .context("the device thread stopped")?;
        rx.recv().context("the device thread stopped")?
    }
}

/// The server's state, shared by every worker.
struct App {
    model: Mutex<Sequential<f32>>,
    gpu: Option<GpuPredictor>,
    classes: Vec<String>,
    /// The model's input: uploads are decoded and resized to it.
    input: InputShape,
    model_id: String,
    model_file: String,
    device: Device,
    max_upload: usize,
    started: Instant,
    fault_injection: bool,
}

/// What answers one path.
type Endpoint = fn(&App, &Request) -> Reply;

/// An uploaded image as the model sees it.
struct Upload {
    name: String,
    bytes: usize,
    pixels: Vec<u8>,
    x: Vec<f32>,
    note: DecodeNote,
}

impl App {
    fn route(&self, req: &Request) -> Reply {
        let (allowed, resp): (&[&str], Endpoint) = match req.path.as_str() {
            "/" | "/index.html" => (&["GET", "HEAD"], App::page),
            "/health" => (&["GET", "HEAD"], App::health),
            "/api/predict" => (&["POST"], App::predict),
            "/api/explain" => (&["POST"], App::explain),
            other => {
                let shown: String = other.chars().take(200).collect();
                return Reply::error(
                    404,
                    format!("no such page: {shown} (try GET /, GET /health, POST /api/predict, POST /api/explain)"),
                );
            }
        };
        if !allowed.contains(&req.method.as_str()) {
            return Reply::error(
                405,
                format!("{} does not accept {}; use {}", req.path, req.method, allowed.join(" or ")),
            )
            .with_header("Allow", allowed.join(", "));
        }
        resp(self, req)
    }

    fn page(&self, _req: &Request) -> Reply {
        Reply::new(200, "text/html; charset=utf-8", PAGE_HTML.as_bytes().to_vec())
            .with_header("Content-Security-Policy", PAGE_CSP)
            .with_header("Referrer-Policy", "no-referrer")
    }

    fn health(&self, _req: &Request) -> Reply {
        Reply::json(
            200,
            &json!({
                "status": "ok",
                "model_id": self.model_id,
                "model_file": self.model_file,
                "classes": self.classes,
                "device": self.device.to_string(),
                "max_upload_bytes": self.max_upload,
                "image_size": self.input.size,
                "channels": self.input.channels,
                "uptime_s": self.started.elapsed().as_secs_f64(),
            }),
        )
    }

    /// The image in the request: the whole body, or the file field of a multipart form.
    fn upload(&self, req: &Request) -> Result<Upload, Reply> {
        let (name, bytes): (String, &[u8]) = if let Some(form) = &req.form {
            let part =
                form.as_ref().map_err(|e| Reply::error(400, e.clone()))?.as_ref().ok_or_else(|| {
                    Reply::error(400, "the form holds no file: send the image in a field named \"file\"")
                })?;
            let name = part.filename.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "upload".into());
            (name, &part.data[..])
        } else {
            ("upload".to_string(), &req.body[..])
        };
        let name: String = name.chars().filter(|c| !c.is_control()).take(200).collect();
        if bytes.is_empty() {
            return Err(Reply::error(400, format!("{name}: no image in the request (the body is empty)")));
        }
        let (pixels, x, note) = crate::explain::decode_for_model_noted(bytes, &name, self.input)
            .map_err(|e| Reply::error(400, format!("{e:#}")))?;
        Ok(Upload { name, bytes: bytes.len(), pixels, x, note })
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Sequential<f32>> {
        // A panic while the model was held leaves it usable: every call overwrites its state.
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        if let Some(gpu) = &self.gpu {
            return gpu.predict(x.to_vec());
        }
        let [c, h, w] = self.input.chw();
        let input = from_vec(&[1, c, h, w], x.to_vec());
        let out = self.model().forward(&input, Ctx::eval());
        Ok(slice(&out).to_vec())
    }

    fn predict(&self, req: &Request) -> Reply {
        let up = match self.upload(req) {
            Ok(u) => u,
            Err(r) => return r,
        };
        if self.fault_injection && req.query_param("panic").is_some() {
            let _held = self.model();
            panic!("injected fault (ServeConfig::fault_injection)");
        }
        let t = Instant::now();
        let logits = match self.logits(&up.x) {
            Ok(z) => z,
            Err(e) => return Reply::error(500, format!("prediction failed: {e:#}")),
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if logits.len() != self.classes.len() || logits.iter().any(|v| !v.is_finite()) {
            return Reply::error(500, "the model produced invalid scores");
        }
        let p = softmax(&logits);
        let best = argmax(&p);
        let probabilities: serde_json::Map<String, serde_json::Value> =
            self.classes.iter().zip(&p).map(|(c, &v)| (c.clone(), json!(v))).collect();
        Reply::json(
            200,
            &json!({
                "class": self.classes[best],
                "class_index": best,
                "probability": p[best],
                "probabilities": probabilities,
                "classes": self.classes,
                "model_id": self.model_id,
                "device": self.device.to_string(),
                "image": {
                    "name": up.name,
                    "bytes": up.bytes,
                    "converted_to_gray": up.note.converted_to_gray,
                    "resized": up.note.resized,
                },
                "inference_ms": ms,
            }),
        )
    }

    fn explain(&self, req: &Request) -> Reply {
        let scale = match req.query_param("scale") {
            None => DEFAULT_SCALE,
            Some(s) => match s.parse::<usize>() {
                Ok(k) if (1..=MAX_SCALE).contains(&k) => k,
                _ => {
                    return Reply::error(400, format!("scale must be a whole number from 1 to {MAX_SCALE}, got {s:?}"))
                }
            },
        };
        let target = match req.query_param("target").map(|t| parse_class(&t, &self.classes)).transpose() {
            Ok(t) => t,
            Err(e) => return Reply::error(400, e.to_string()),
        };
        let up = match self.upload(req) {
            Ok(u) => u,
            Err(r) => return r,
        };
        let e = match explain(&mut *self.model(), &up.x, target) {
            Ok(e) => e,
            Err(e) => return Reply::error(500, format!("Grad-CAM failed: {e:#}")),
        };
        match heatmap_overlay_png(&up.pixels, &e.gradcam, scale) {
            Ok(png) => Reply::new(200, "image/png", png)
                .with_header("X-Medcnn-Class", header_safe(&self.classes[e.class]))
                .with_header("X-Medcnn-Target", header_safe(&self.classes[e.target]))
                .with_header("X-Medcnn-Probability", format!("{:.6}", e.probs[e.class]))
                .with_header("X-Medcnn-Model-Id", self.model_id.clone()),
            Err(e) => Reply::error(500, format!("drawing the heatmap failed: {e:#}")),
        }
    }
}

/// A class name as a header value: printable ASCII kept, anything else percent-encoded.
fn header_safe(s: &str) -> String {
    s.bytes()
        .map(|b| if (0x20..0x7f).contains(&b) && b != b'%' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}
