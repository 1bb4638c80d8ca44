//! `medcnn train --dashboard [ADDR]`: a live page of the run, and its JSON API.
//!
//! - `GET /`: one self-contained page ([`PAGE_HTML`]: inline CSS and JS, charts drawn by hand on
//!   canvases, nothing fetched from elsewhere): loss and accuracy curves, images/s, epoch,
//!   step and ETA, the per-layer statistics with plain-words hints, the first conv layer's
//!   filters and one validation image's feature maps, the validation confusion matrix.
//! - `GET /api/progress`: the whole state as JSON ([`Snapshot`]).
//! - `GET /api/events`: the same snapshot as server-sent events (`event: progress`), sent at
//!   once and then whenever it changes, at most a few times a second.
//! - `GET /api/filters.png`, `/api/maps.png`, `/api/image.png`: the pictures, refreshed every
//!   epoch (404 before the first epoch ends).
//!
//! How training and the page meet: the training thread owns a [`Snapshot`], updates it in
//! place (a few field writes per step) and, at most every [`PUBLISH_EVERY`] and at each event
//! (a loss point, statistics, an epoch's end), publishes a copy behind an `Arc` into a tokio
//! `watch` channel: a pointer swap. The server, on its own runtime thread ([`crate::web`]),
//! only ever reads the latest copy; serialising it, and a client reading slowly or going away,
//! happen there. Nothing the training thread does waits for a client.
//!
//! After the run the server keeps serving the final state until Ctrl-C ([`linger`]).
//!
//! What it is not: no control over the run (read-only), no authentication, no history of
//! earlier runs.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tokio::sync::watch;

use crate::backend::{NamedTensor, TrainStats};
use crate::metrics::{ConfusionMatrix, EpochMetrics};
use crate::stats::{hints, OutputStats, StatsRow};
use crate::train::{Progress, INTERRUPTED};
use crate::web::{self, Reply};

mod pictures;

/// The page, embedded in the binary.
pub const PAGE_HTML: &str = include_str!("page.html");
/// Where `--dashboard` listens when given no address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8090";
/// The shortest time between two published snapshots on normal steps.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(200);

const PAGE_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                        img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                        frame-ancestors 'none'";

/// What does not change during a run.
#[derive(Clone, Debug)]
pub struct RunInfo {
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub batch_size: usize,
    pub classes: Vec<String>,
    pub device: String,
    /// The network (its pictures are computed from the exported weights with the CPU layers).
    pub spec: crate::spec::ModelSpec,
}

/// A training loss point: the mean over the steps since the previous one.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryPoint {
    pub step: u64,
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
}

/// One epoch's validation.
#[derive(Clone, Debug, Serialize)]
pub struct ValPoint {
    pub epoch: usize,
    pub loss: f64,
    pub accuracy: f64,
}

/// A parameter's latest statistics.
#[derive(Clone, Debug, Serialize)]
pub struct LayerNow {
    pub name: String,
    pub weight_norm: f64,
    pub grad_norm: f64,
    pub update_ratio: f64,
}

/// The statistics of the weight tensors at one statistics step, in `layer_names` order.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPoint {
    pub step: u64,
    pub grad_norm: Vec<f64>,
    pub update_ratio: Vec<f64>,
}

/// The last validation's confusion matrix, `counts[true][predicted]`.
#[derive(Clone, Debug, Serialize)]
pub struct Confusion {
    pub epoch: usize,
    pub counts: Vec<Vec<u64>>,
}

/// Everything the page shows; `/api/progress` is this as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// `training`, then `finished`, `interrupted` or `stopped` (an error ended the run).
    pub status: &'static str,
    /// The epoch in progress, 1-based (the last one once finished).
    pub epoch: usize,
    pub epochs: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub steps_per_epoch: usize,
    /// Steps taken in the epoch in progress.
    pub batch: usize,
    pub batch_size: usize,
    pub images_per_sec: f64,
    /// Seconds left at the current speed (validation not counted); `null` before a speed is known.
    pub eta_s: Option<f64>,
    pub elapsed_s: f64,
    pub device: String,
    pub classes: Vec<String>,
    pub history: Vec<HistoryPoint>,
    pub val: Vec<ValPoint>,
    /// Every parameter at the latest statistics step.
    pub layers: Vec<LayerNow>,
    pub stats_step: Option<u64>,
    /// Every layer's output at the latest statistics step.
    pub outputs: Vec<OutputStats>,
    /// The weight tensors the layer history follows.
    pub layer_names: Vec<String>,
    pub layer_history: Vec<LayerPoint>,
    /// Rules of thumb that the latest statistics break, in plain words.
    pub hints: Vec<String>,
    pub confusion: Option<Confusion>,
    /// The epoch the pictures are from (0: none yet).
    pub pictures_epoch: usize,
    #[serde(skip)]
    pub pictures: Option<Arc<pictures::Pictures>>,
}

/// What the server holds: the latest snapshot and the stop signal of the event streams.
struct Shared {
    latest: watch::Receiver<Arc<Snapshot>>,
    stop: watch::Receiver<bool>,
}

/// The server of the run, kept after the run for [`linger`].
struct Running {
    server: web::Server,
    stop: watch::Sender<bool>,
    url: String,
}

static RUNNING: Mutex<Option<Running>> = Mutex::new(None);
static LINGERING: AtomicBool = AtomicBool::new(false);

/// Whether the run is over and only the dashboard is left (the Ctrl-C handler's message).
pub fn lingering() -> bool {
    LINGERING.load(Ordering::SeqCst)
}

/// After the run: keeps the dashboard (if one was started) serving until Ctrl-C, unless the
/// run itself was stopped by Ctrl-C; then stops it.
pub fn linger() {
    let Some(r) = RUNNING.lock().unwrap_or_else(PoisonError::into_inner).take() else { return };
    if !INTERRUPTED.load(Ordering::SeqCst) {
        LINGERING.store(true, Ordering::SeqCst);
        println!("the dashboard stays at {}/ (Ctrl-C to stop)", r.url);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        while !INTERRUPTED.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = r.stop.send(true);
    let mut server = r.server;
    server.shutdown();
}

/// The training side: owns the snapshot, publishes copies.
pub struct Dashboard {
    snap: Snapshot,
    tx: watch::Sender<Arc<Snapshot>>,
    info: RunInfo,
    started: Instant,
    last_publish: Instant,
    /// Images trained since the start, and a (time, images) mark for the speed.
    images: u64,
    mark: (Instant, u64),
    image: Option<Vec<u8>>,
}

impl Dashboard {
    /// Starts the server on `addr` (an error names it) and prints its URL.
    pub fn start(addr: &str, info: RunInfo, image: Option<Vec<u8>>, progress: &Progress) -> Result<Dashboard> {
        let addr: SocketAddr = crate::serve::parse_addr(addr)?;
        let snap = Snapshot {
            status: "training",
            epoch: progress.epoch + 1,
            epochs: info.epochs,
            step: progress.step,
            steps_per_epoch: info.steps_per_epoch,
            batch: progress.batch,
            batch_size: info.batch_size,
            images_per_sec: 0.0,
            eta_s: None,
            elapsed_s: 0.0,
            device: info.device.clone(),
            classes: info.classes.clone(),
            history: Vec::new(),
            val: progress
                .history
                .iter()
                .map(|r| ValPoint { epoch: r.epoch, loss: r.val_loss, accuracy: r.val_acc })
                .collect(),
            layers: Vec::new(),
            stats_step: None,
            outputs: Vec::new(),
            layer_names: Vec::new(),
            layer_history: Vec::new(),
            hints: Vec::new(),
            confusion: None,
            pictures_epoch: 0,
            pictures: None,
        };
        let (tx, rx) = watch::channel(Arc::new(snap.clone()));
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared { latest: rx, stop: stop_rx });
        let server = web::Server::start(
            web::ServerConfig {
                name: "dashboard".into(),
                addr,
                io_threads: 1,
                blocking_threads: 1,
                limits: web::Limits { max_body: 64 << 10, ..web::Limits::default() },
                log: false,
            },
            router(shared),
        )?;
        web::warn_if_exposed(server.addr(), "the dashboard");
        let url = server.url();
        println!("dashboard: {url}/");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        *RUNNING.lock().unwrap_or_else(PoisonError::into_inner) = Some(Running { server, stop: stop_tx, url });
        let now = Instant::now();
        Ok(Dashboard { snap, tx, info, started: now, last_publish: now, images: 0, mark: (now, 0), image })
    }

    /// Copies the snapshot into the channel (the server's readers see it from now on).
    fn publish(&mut self) {
        let now = Instant::now();
        self.snap.elapsed_s = self.started.elapsed().as_secs_f64();
        let window = now.duration_since(self.mark.0).as_secs_f64();
        // The speed of the last second or more of training (kept as it was once the run ends).
        if window >= 1.0 && self.snap.status == "training" {
            self.snap.images_per_sec = (self.images - self.mark.1) as f64 / window;
            self.mark = (now, self.images);
        }
        let total = (self.info.epochs * self.info.steps_per_epoch) as u64;
        self.snap.eta_s = (self.snap.images_per_sec > 0.0 && self.snap.status == "training").then(|| {
            total.saturating_sub(self.snap.step) as f64 * self.info.batch_size as f64 / self.snap.images_per_sec
        });
        self.tx.send_replace(Arc::new(self.snap.clone()));
        self.last_publish = now;
    }

    /// After every step: counters, and a publish when the last one is old enough.
    pub fn step(&mut self, p: &Progress, n: usize) {
        self.images += n as u64;
        (self.snap.step, self.snap.epoch, self.snap.batch) = (p.step, p.epoch + 1, p.batch);
        if self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.publish();
        }
    }

    /// A training loss point from the backend's sums since the last one.
    pub fn train_point(&mut self, p: &Progress, s: &TrainStats) {
        if s.images > 0 {
            let n = s.images as f64;
            self.snap.history.push(HistoryPoint {
                step: p.step,
                epoch: p.epoch + 1,
                train_loss: s.loss_sum / n,
                train_acc: s.correct as f64 / n,
            });
            self.publish();
        }
    }

    /// The statistics so far (all rows: the page draws their history).
    pub fn publish_stats(&mut self, rows: &[StatsRow]) {
        let Some(last) = rows.last() else { return };
        let snap = &mut self.snap;
        snap.layers = last
            .stats
            .params
            .iter()
            .map(|p| LayerNow {
                name: p.name.clone(),
                weight_norm: p.weight_norm,
                grad_norm: p.grad_norm,
                update_ratio: p.update_ratio,
            })
            .collect();
        snap.stats_step = Some(last.step);
        snap.outputs = last.stats.outputs.clone();
        snap.hints = hints(&last.stats);
        snap.layer_names = last.stats.params.iter().map(|p| p.name.clone()).filter(|n| n.ends_with("weight")).collect();
        snap.layer_history = rows
            .iter()
            .map(|r| {
                let pick = |f: fn(&crate::stats::ParamStats) -> f64| {
                    snap.layer_names
                        .iter()
                        .map(|n| r.stats.params.iter().find(|p| &p.name == n).map_or(f64::NAN, f))
                        .collect()
                };
                LayerPoint { step: r.step, grad_norm: pick(|p| p.grad_norm), update_ratio: pick(|p| p.update_ratio) }
            })
            .collect();
        self.publish();
    }

    /// An epoch's end: its validation, its confusion matrix, and the pictures from `weights`.
    pub fn end_epoch(&mut self, row: &EpochMetrics, cm: &ConfusionMatrix, weights: &[NamedTensor]) {
        self.snap.val.push(ValPoint { epoch: row.epoch, loss: row.val_loss, accuracy: row.val_acc });
        self.snap.confusion = Some(Confusion { epoch: row.epoch, counts: cm.counts.clone() });
        match pictures::render(&self.info.spec, self.info.classes.len(), weights, self.image.as_deref()) {
            Ok(p) => {
                self.snap.pictures = Some(Arc::new(p));
                self.snap.pictures_epoch = row.epoch;
            }
            Err(e) => eprintln!("dashboard: no pictures for epoch {}: {e:#}", row.epoch),
        }
        self.publish();
    }

    /// The run is over: the final state, published.
    pub fn finish(mut self) {
        let done = self.snap.val.last().is_some_and(|v| v.epoch == self.info.epochs);
        self.snap.status = if done {
            "finished"
        } else if INTERRUPTED.load(Ordering::SeqCst) {
            "interrupted"
        } else {
            "stopped"
        };
        self.publish();
    }
}

fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(move |req: axum::extract::Request| answer(shared.clone(), req))
}

/// Every path in one place, so that 404 and 405 answer in JSON like the rest.
async fn answer(shared: Arc<Shared>, req: axum::extract::Request) -> Response {
    let path = req.uri().path().to_string();
    let known =
        ["/", "/index.html", "/api/progress", "/api/events", "/api/filters.png", "/api/maps.png", "/api/image.png"];
    if !known.contains(&path.as_str()) {
        let shown: String = path.chars().take(200).collect();
        return Reply::error(404, format!("no such page: {shown} (try GET /, /api/progress, /api/events)"))
            .into_response();
    }
    if req.method() != axum::http::Method::GET && req.method() != axum::http::Method::HEAD {
        return Reply::error(405, format!("{path} does not accept {}; use GET", req.method()))
            .with_header("Allow", "GET, HEAD")
            .into_response();
    }
    let snap = shared.latest.borrow().clone();
    match path.as_str() {
        "/" | "/index.html" => Reply::new(200, "text/html; charset=utf-8", PAGE_HTML.as_bytes().to_vec())
            .with_header("Content-Security-Policy", PAGE_CSP)
            .with_header("Referrer-Policy", "no-referrer")
            .into_response(),
        "/api/progress" => match serde_json::to_vec(&*snap) {
            Ok(body) => Reply::new(200, "application/json", body).into_response(),
            Err(e) => Reply::error(500, format!("serialising the progress failed: {e}")).into_response(),
        },
        "/api/events" => events(shared).into_response(),
        png => {
            let Some(p) = &snap.pictures else {
                return Reply::error(404, "no pictures yet: they appear after the first epoch").into_response();
            };
            let bytes = match png {
                "/api/filters.png" => &p.filters,
                "/api/maps.png" => &p.maps,
                _ => &p.image,
            };
            match bytes {
                Some(b) => Reply::new(200, "image/png", b.clone()).into_response(),
                None => Reply::error(404, "this run has no validation image to show").into_response(),
            }
        }
    }
}

/// The snapshot at once, then at every change, until the server stops.
fn events(shared: Arc<Shared>) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let (rx, stop) = (shared.latest.clone(), shared.stop.clone());
    let stream = futures_util::stream::unfold((rx, stop, true), |(mut rx, mut stop, first)| async move {
        if !first {
            tokio::select! {
                changed = rx.changed() => changed.ok()?,
                _ = stop.changed() => return None,
            }
        }
        let snap = rx.borrow_and_update().clone();
        let event = Event::default().event("progress").json_data(&*snap).ok()?;
        Some((Ok(event), (rx, stop, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
