//! Helpers shared by the test files (each includes this with `mod common;`): temp folders
//! under `CARGO_TARGET_TMPDIR`, a small deterministic random generator, tiny image datasets
//! made with the `image` crate, tiny `.tar.gz` archives, running the real `medcnn` binary, and
//! the one way a test says it cannot do its job (`skip_unless_required`).

#![allow(dead_code)]

pub mod browser;
pub mod grad;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{DynamicImage, GrayImage, ImageFormat};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_medcnn");

/// `CARGO_TARGET_TMPDIR/medcnn-robust/<pid>-<name>`, made empty. The first call of a test
/// process also removes what earlier, finished test processes left there (the folders of
/// failed tests are kept until then, to be looked at).
pub fn scratch_dir(name: &str) -> PathBuf {
    static CLEANED: std::sync::Once = std::sync::Once::new();
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("medcnn-robust");
    CLEANED.call_once(|| {
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
    let dir = root.join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh, empty folder under `CARGO_TARGET_TMPDIR`, removed when dropped (unless the test
/// panicked, so that a failure can be looked at).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        TempDir(scratch_dir(&format!("{tag}-{n}")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A 64x64 gray image that depends on its class (so a model can learn something) and on its
/// index (so no two files are byte-identical duplicates).
pub fn class_image(class: usize, i: usize) -> DynamicImage {
    DynamicImage::ImageLuma8(GrayImage::from_fn(64, 64, |x, y| {
        let base = match class % 3 {
            0 => x * 4,
            1 => y * 4,
            _ => (x + y) * 2,
        };
        let noise = (x * 31 + y * 17 + i as u32 * 97 + class as u32 * 13) % 23;
        image::Luma([(base + noise).min(255) as u8])
    }))
}

pub fn class_png(class: usize, i: usize) -> Vec<u8> {
    encode(class_image(class, i), ImageFormat::Png)
}

pub fn class_jpeg(class: usize, i: usize) -> Vec<u8> {
    encode(class_image(class, i), ImageFormat::Jpeg)
}

/// `root/<Class>/img_NNN.png` for `classes` classes of `per_class` images each; returns `root`.
pub fn make_dataset(root: &Path, classes: usize, per_class: usize) -> PathBuf {
    for c in 0..classes {
        let dir = root.join(class_name(c));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..per_class {
            std::fs::write(dir.join(format!("img_{i:03}.png")), class_png(c, i)).unwrap();
        }
    }
    root.to_path_buf()
}

pub fn class_name(c: usize) -> String {
    ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"][c].to_string()
}

/// A `.tar.gz` holding `entries` (path, bytes), written at `path`.
pub fn make_archive(path: &Path, entries: &[(&str, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // `set_path` refuses `..` and absolute paths, so write the name field by hand: that is
        // exactly what a hostile archive does.
        let field = &mut header.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        tar.append(&header, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

/// The entries of a valid MedNIST-style archive: `MedNIST/<Class>/img_NNN.png`.
pub fn dataset_entries(classes: usize, per_class: usize) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for c in 0..classes {
        for i in 0..per_class {
            out.push((format!("MedNIST/{}/img_{i:03}.png", class_name(c)), class_png(c, i)));
        }
    }
    out
}

/// Runs `medcnn ARGS` to completion.
pub fn medcnn(args: &[&str]) -> Output {
    medcnn_in(args, None)
}

/// Runs `medcnn ARGS` in the working directory `cwd` (when given).
pub fn medcnn_in(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_BACKTRACE", "1").env_remove("MEDCNN_FAULT_NAN_AT_STEP");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().expect("running medcnn")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts a clean failure: a non-zero exit (not a signal), an `error:` line in stderr that
/// holds every one of `needles`, and no panic or backtrace. Returns stderr.
#[track_caller]
pub fn assert_fails(out: &Output, needles: &[&str]) -> String {
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    let ctx = format!("\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(!out.status.success(), "expected a failure, got success{ctx}");
    let code = out.status.code().unwrap_or_else(|| panic!("killed by a signal, not a clean exit{ctx}"));
    assert_ne!(code, 101, "exit code 101 is a Rust panic{ctx}");
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!stderr.contains(bad) && !stdout.contains(bad), "output contains {bad:?}{ctx}");
    }
    let msg = stderr.lines().find(|l| l.starts_with("error")).unwrap_or_else(|| panic!("no error line{ctx}"));
    let rest = stderr.split_once(msg).map(|(_, r)| r).unwrap_or("");
    let full = format!("{msg}{rest}");
    for needle in needles {
        assert!(full.contains(needle), "the error does not mention {needle:?}{ctx}");
    }
    stderr
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn assert_ok(out: &Output) -> String {
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "expected success, got {:?}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    for bad in ["panicked", "stack backtrace"] {
        assert!(!stderr.contains(bad), "stderr contains {bad:?}:\n{stderr}");
    }
    stdout
}

/// The common flags of a quick training run (add `--epochs`).
pub fn quick_train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["train", "--data", data, "--out", out, "--batch-size", "8", "--threads", "2"]
}

/// A small deterministic generator (the tests need no shared RNG state).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64) / ((1u64 << 53) as f64)
    }
    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f64 {
        2.0 * self.next() - 1.0
    }
    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() * n as f64) as usize % n
    }
    pub fn tensor(&mut self, shape: &[usize]) -> medcnn::tensor::Tensor<f64> {
        let n = shape.iter().product();
        medcnn::tensor::from_vec(shape, (0..n).map(|_| self.sym()).collect())
    }
    /// Values at least 0.1 away from 0 (away from the ReLU kink).
    pub fn away_from_zero(&mut self, shape: &[usize]) -> medcnn::tensor::Tensor<f64> {
        self.tensor(shape).mapv(|v| if v >= 0.0 { 0.1 + v } else { v - 0.1 })
    }
    /// Distinct values 0.013 apart in random order: no ties inside a max-pool window, and no
    /// finite-difference step of the checker (0.01 first, then smaller) can make two of them
    /// tie. With a gap of exactly 0.01, x + 0.01 could round one ulp above its neighbour: the
    /// winner changes by 1e-17, the "difference" is 1e-15 against an analytic 0, a relative
    /// error of 1.
    pub fn distinct(&mut self, shape: &[usize]) -> medcnn::tensor::Tensor<f64> {
        let n: usize = shape.iter().product();
        let mut v: Vec<f64> = (0..n).map(|i| i as f64 * 0.013 - 0.5).collect();
        for i in (1..n).rev() {
            let j = (self.next() * (i + 1) as f64) as usize;
            v.swap(i, j);
        }
        medcnn::tensor::from_vec(shape, v)
    }
}

/// MedNIST's six classes, in the order the loader sorts them.
pub const MEDNIST_CLASSES: [&str; 6] = ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"];

/// A model file for MedNIST's six classes with the reference model's initial weights from
/// `seed` (untrained), written at `path`; returns its weights.
pub fn random_model_file(path: &Path, seed: u64) -> Vec<medcnn::model::NamedTensor> {
    use medcnn::model::{reference_model, ModelConfig};
    let cfg = ModelConfig { num_classes: MEDNIST_CLASSES.len(), ..ModelConfig::default() };
    let weights = reference_model::<f32>(&cfg, seed).export_weights();
    let classes: Vec<String> = MEDNIST_CLASSES.iter().map(|c| c.to_string()).collect();
    let spec = medcnn::spec::ModelSpec::reference(Default::default(), cfg.dropout);
    medcnn::model_file::SavedModel::save(path, &classes, &spec, &weights, Default::default()).unwrap();
    weights
}

/// An HTTP client that returns error statuses as replies, uses no proxy, and gives up after a
/// minute.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(std::time::Duration::from_secs(60)))
        .build()
        .into()
}

/// A test that cannot do its job here (no compiler, no GPU, no data...) calls this instead of
/// passing quietly: it prints `skipped: WHY` on stderr and returns, so the caller returns too,
/// unless `MEDCNN_REQUIRE_<THING>=1` is set (CI sets the ones its machines must have), when it
/// fails the test with the same reason. A skip is never a pass that counts as proof.
///
/// The variables: `GXX` (the kernel emulator's C++ compiler), `NVRTC`, `GPU`, `CHROMIUM`,
/// `DATA` (the real MedNIST archive). The unit tests in `src/` use the same rule
/// (`layers::skip_unless_required`, for `AVX512`).
#[track_caller]
pub fn skip_unless_required(thing: &str, why: impl std::fmt::Display) {
    let var = format!("MEDCNN_REQUIRE_{thing}");
    if std::env::var(&var).as_deref() == Ok("1") {
        panic!("{var}=1 but {why}");
    }
    eprintln!("skipped: {why} (set {var}=1 to make this a failure)");
}

/// The real MedNIST archive, if this machine has it: `$MEDCNN_MEDNIST` when set, else
/// `data/MedNIST.tar.gz` (where `medcnn train` downloads it), else `../shared/data/MedNIST.tar.gz`
/// (beside the checkout). `None` after `skip_unless_required("DATA", ...)` otherwise.
pub fn real_archive() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates: Vec<PathBuf> = match std::env::var_os("MEDCNN_MEDNIST") {
        Some(p) => vec![PathBuf::from(p)],
        None => vec![root.join("data/MedNIST.tar.gz"), root.join("../shared/data/MedNIST.tar.gz")],
    };
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Some(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    skip_unless_required("DATA", format!("no MedNIST archive (looked for {})", looked.join(" and ")));
    None
}
