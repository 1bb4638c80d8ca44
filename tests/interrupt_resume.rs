//! Never lose work: a real training run (the `medcnn` binary, 3 classes x 20 small images,
//! 4 epochs, 2 threads) is interrupted and resumed, and must end with exactly the weights of an
//! uninterrupted run with the same seed and thread count.
//!
//! - Ctrl-C (SIGINT, sent with `kill -INT`): the run finishes its step, saves a checkpoint,
//!   exits with 130, and `--resume` continues from the middle of the epoch.
//! - `kill -9` at seeded random moments, several times: after every kill the last checkpoint
//!   (and model) still load and never go backwards, and resuming until the run completes gives
//!   the uninterrupted run's weights, bit for bit.
//! - Divergence (forced with the `MEDCNN_FAULT_NAN_AT_STEP` test hook, and for real with an
//!   absurd learning rate): the run stops with "training diverged" and a non-zero exit, and the
//!   checkpoint and model of the last good epoch are left byte for byte as they were.
//!
//! Set `MEDCNN_KILL_SEED` to try other kill moments.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

const EPOCHS: &str = "4";

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The shared dataset: 3 classes x 20 images (train 42, val 12, test 6: 6 steps an epoch).
fn data() -> &'static Path {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| make_dataset(&scratch_dir("resume-data"), 3, 20))
}

/// `medcnn train` on the shared data into `out`, for `epochs`, with the fixed seed and threads.
fn train_command(out: &Path, epochs: &str, resume: bool) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["train", "--data", s(data()), "--out", s(out), "--epochs", epochs])
        .args(["--batch-size", "8", "--threads", "2", "--seed", "7"])
        .env_remove("MEDCNN_FAULT_NAN_AT_STEP");
    if resume {
        cmd.arg("--resume");
    }
    cmd
}

/// The uninterrupted run every interrupted one is compared with.
fn reference() -> &'static Path {
    &reference_run().0
}

/// The uninterrupted run's folder and how long it took.
fn reference_run() -> &'static (PathBuf, Duration) {
    static RUN: OnceLock<(PathBuf, Duration)> = OnceLock::new();
    RUN.get_or_init(|| {
        let out = scratch_dir("resume-reference");
        let start = Instant::now();
        assert_ok(&train_command(&out, EPOCHS, false).output().unwrap());
        (out, start.elapsed())
    })
}

/// Every tensor of a safetensors file, as raw bytes.
fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// The final model and checkpoint in `out` hold exactly the reference run's tensors (weights and,
/// for the checkpoint, Adam's moments), and the checkpoint says the run is complete.
#[track_caller]
fn assert_same_as_reference(out: &Path) {
    for file in ["model.safetensors", "checkpoint.safetensors"] {
        let (want, got) = (tensors(&reference().join(file)), tensors(&out.join(file)));
        assert_eq!(want.len(), got.len(), "{file}: tensor count");
        for (name, w) in &want {
            assert!(got.get(name) == Some(w), "{file}: tensor {name} differs from the uninterrupted run");
        }
    }
    let a = medcnn::train::read_checkpoint(&reference().join("checkpoint.safetensors")).unwrap();
    let b = medcnn::train::read_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(
        (a.progress.epoch, a.progress.batch, a.progress.step),
        (b.progress.epoch, b.progress.batch, b.progress.step)
    );
    assert_eq!(a.optimizer.t, b.optimizer.t);
    assert_eq!(a.progress.best_epoch, b.progress.best_epoch);
    // metrics.csv: the same epochs and validation results, bit for bit. The training loss is a
    // sum taken in pieces, and an interruption changes where the pieces break, so it may differ
    // in the last bits.
    let metrics = |o: &Path| medcnn::metrics::read_metrics_csv(&o.join("metrics.csv")).unwrap();
    let (want, got) = (metrics(reference()), metrics(out));
    assert_eq!(want.len(), got.len(), "metrics.csv rows");
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(
            (w.epoch, w.val_loss.to_bits(), w.val_acc.to_bits()),
            (g.epoch, g.val_loss.to_bits(), g.val_acc.to_bits())
        );
        assert!((w.train_loss - g.train_loss).abs() <= 1e-9 * w.train_loss.abs(), "train loss {w:?} vs {g:?}");
        assert_eq!(w.train_acc, g.train_acc);
    }
}

/// A running `medcnn train` whose stdout lines arrive on a channel (and are all kept).
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Run {
    fn start(mut cmd: Command) -> Run {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Run { child, lines, seen: Vec::new() }
    }

    /// Waits (at most 60 s) for a stdout line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.starts_with(prefix);
                    self.seen.push(line);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no line starting with {prefix:?}; stdout so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for the exit; returns the code (None: killed by a signal), stdout and stderr.
    fn finish(mut self) -> (Option<i32>, String, String) {
        let out = self.child.wait_with_output().unwrap();
        self.seen.extend(self.lines.iter());
        (out.status.code(), self.seen.join("\n"), text(&out.stderr))
    }
}

fn sigint(child: &Child) {
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -INT failed");
}

/// Ctrl-C in the middle of an epoch, twice: each time the step finishes, a checkpoint is saved
/// and the exit code is 130; resuming to the end gives the uninterrupted run's weights.
#[test]
fn sigint_saves_a_checkpoint_and_resume_matches() {
    let t = TempDir::new("sigint");
    let out = t.join("out");
    reference();

    // Each step sleeps 40 ms (a test hook that changes no number), so the run lasts about a
    // second and the Ctrl-Cs below land mid-run however fast the machine is.
    let slow = |mut c: Command| {
        c.env("MEDCNN_TEST_STEP_DELAY_MS", "40");
        c
    };
    // 1: during the first epoch, before any checkpoint exists.
    let mut run = Run::start(slow(train_command(&out, EPOCHS, false)));
    run.wait_for("training on");
    std::thread::sleep(Duration::from_millis(150));
    sigint(&run.child);
    let (code, stdout, stderr) = run.finish();
    assert_eq!(code, Some(130), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("interrupted: checkpoint saved"), "{stdout}");
    assert!(stderr.contains("Ctrl-C: finishing this step"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let first = medcnn::train::read_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
    assert!(first.progress.step >= 1, "no step was saved");
    eprintln!(
        "first Ctrl-C: epoch {}, batch {}, step {}",
        first.progress.epoch, first.progress.batch, first.progress.step
    );

    // 2: resumed, then interrupted again a moment later.
    let mut run = Run::start(slow(train_command(&out, EPOCHS, true)));
    run.wait_for("resuming from");
    std::thread::sleep(Duration::from_millis(400));
    sigint(&run.child);
    let (code, stdout, stderr) = run.finish();
    assert_eq!(code, Some(130), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let second = medcnn::train::read_checkpoint(&out.join("checkpoint.safetensors")).unwrap();
    assert!(second.progress.step > first.progress.step, "the second run made no progress");
    eprintln!(
        "second Ctrl-C: epoch {}, batch {}, step {}",
        second.progress.epoch, second.progress.batch, second.progress.step
    );

    // 3: resumed to the end.
    let o = train_command(&out, EPOCHS, true).output().unwrap();
    assert_ok(&o);
    assert_same_as_reference(&out);
}

/// A small deterministic generator for the kill moments (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// `kill -9` at random moments, resuming each time, until the run completes.
#[test]
fn kill_9_at_random_moments_then_resume_matches() {
    let t = TempDir::new("kill9");
    let out = t.join("out");
    let ckpt = out.join("checkpoint.safetensors");
    let model = out.join("model.safetensors");
    let full = reference_run().1.as_millis() as u64;
    let seed = std::env::var("MEDCNN_KILL_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_u64);
    let mut rng = Rng(seed | 1);
    let mut last_step = 0;
    let mut kills = 0;
    let mut log = Vec::new();
    for attempt in 0.. {
        assert!(attempt < 40, "the run never completed: {log:?}");
        let resume = ckpt.exists();
        let mut child =
            train_command(&out, EPOCHS, resume).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        // Up to 6 kills, each 2% to 45% of an uninterrupted run's time after the start (so a run
        // gains at most about one epoch before it is killed); then the run may finish.
        let delay = (kills < 6).then(|| Duration::from_millis(rng.between(full / 50, full * 45 / 100)));
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if delay.is_some_and(|d| started.elapsed() >= d) {
                child.kill().unwrap(); // SIGKILL, as `kill -9`
                child.wait().unwrap();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        match status {
            Some(status) => {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                assert!(status.success(), "run {attempt} failed: {status:?}\n{stderr}\nkills so far: {log:?}");
                break;
            }
            None => {
                kills += 1;
                // Whatever the moment, what is on disk loads, and never goes backwards.
                if ckpt.exists() {
                    let r = medcnn::train::read_checkpoint(&ckpt)
                        .unwrap_or_else(|e| panic!("after kill {kills} the checkpoint does not load: {e:#}"));
                    assert!(
                        r.progress.step >= last_step,
                        "the checkpoint went back from step {last_step} to {}",
                        r.progress.step
                    );
                    last_step = r.progress.step;
                }
                if model.exists() {
                    medcnn::model_file::SavedModel::load(&model)
                        .unwrap_or_else(|e| panic!("after kill {kills} the model does not load: {e:#}"));
                }
                log.push((delay.unwrap().as_millis(), resume, last_step));
            }
        }
    }
    eprintln!("kill -9 moments (ms after start, resumed?, checkpoint step after; a full run takes {full} ms): {log:?}");
    assert!(kills >= 3, "too few kills landed: {log:?}");
    assert_same_as_reference(&out);
}

// ---------------------------------------------------------------------------------------
// Divergence
// ---------------------------------------------------------------------------------------

/// Runs with the NaN test hook at `step`; expects a clean "training diverged" failure.
#[track_caller]
fn diverges(out: &Path, epochs: &str, resume: bool, step: u64) -> String {
    let mut cmd = train_command(out, epochs, resume);
    cmd.env("MEDCNN_FAULT_NAN_AT_STEP", step.to_string());
    let o = cmd.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}\n{}", text(&o.stdout), text(&o.stderr));
    assert_fails(&o, &["training diverged"])
}

/// NaN in the middle of epoch 2 (and at the last step of epoch 2, where only the validation
/// loss shows it): the run stops, and the checkpoint and model of epoch 1 are untouched.
#[test]
fn divergence_keeps_the_last_good_checkpoint() {
    let t = TempDir::new("diverge");
    let out = t.join("out");
    let (ckpt, model) = (out.join("checkpoint.safetensors"), out.join("model.safetensors"));
    assert_ok(&train_command(&out, "1", false).output().unwrap());
    let (ckpt_bytes, model_bytes) = (std::fs::read(&ckpt).unwrap(), std::fs::read(&model).unwrap());
    // Epoch 2 is steps 6..=11.
    for step in [7, 11] {
        let stderr = diverges(&out, "3", true, step);
        assert!(stderr.contains("last good checkpoint is kept at") && stderr.contains(s(&ckpt)), "{stderr}");
        assert!(std::fs::read(&ckpt).unwrap() == ckpt_bytes, "the checkpoint was overwritten (fault at step {step})");
        assert!(std::fs::read(&model).unwrap() == model_bytes, "the model was overwritten (fault at step {step})");
        let r = medcnn::train::read_checkpoint(&ckpt).unwrap();
        assert_eq!((r.progress.epoch, r.progress.step), (1, 6));
    }
    // And the run can still go on from there.
    assert_ok(&train_command(&out, "2", true).output().unwrap());
}

/// NaN in the first epoch: no checkpoint or model is written at all (none with NaN weights).
#[test]
fn divergence_in_the_first_epoch_saves_nothing() {
    let t = TempDir::new("diverge-first");
    for step in [0, 5] {
        let out = t.join(format!("out-{step}"));
        let stderr = diverges(&out, "2", false, step);
        assert!(stderr.contains("no earlier checkpoint"), "{stderr}");
        assert!(!out.join("checkpoint.safetensors").exists() && !out.join("model.safetensors").exists());
    }
}

/// An absurd learning rate really diverges: the run stops with "training diverged", and no
/// file it leaves holds NaN or infinity.
#[test]
fn divergence_with_a_real_learning_rate() {
    let t = TempDir::new("diverge-lr");
    let out = t.join("out");
    let o = Command::new(BIN)
        .args(["train", "--data", s(data()), "--out", s(&out), "--epochs", "2", "--batch-size", "8"])
        .args(["--threads", "2", "--lr", "1e30"])
        .env_remove("MEDCNN_FAULT_NAN_AT_STEP")
        .output()
        .unwrap();
    assert_fails(&o, &["training diverged"]);
    for file in ["checkpoint.safetensors", "model.safetensors"] {
        let p = out.join(file);
        if p.exists() {
            for (name, (_, bytes)) in tensors(&p) {
                let finite = bytes.chunks_exact(4).all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite());
                assert!(finite, "{file}: {name} holds NaN or infinity");
            }
        }
    }
}
