//! Bad input to the real `medcnn` binary: every case makes its input in a temp folder, runs the
//! binary and checks the outcome. A failure must be a non-zero exit with one `error:` message
//! that names the file or flag and the problem, and never a panic or a backtrace. Inputs that
//! are unusual but valid (a PNG with alpha, a 16-bit PNG, a file name that is not UTF-8) must
//! train, evaluate and predict normally.
//!
//! Each case runs on a few 64x64 images and at most one epoch, so it takes about a second.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgba};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Trains on `data` for one epoch into `out` and expects a failure naming `needles`.
#[track_caller]
fn train_fails(data: &Path, out: &Path, extra: &[&str], needles: &[&str]) -> String {
    let mut args = quick_train_args(s(data), s(out));
    args.extend_from_slice(extra);
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs", "1"]);
    }
    assert_fails(&medcnn(&args), needles)
}

/// Trains on `data` for one epoch into `out` and expects success; returns stdout.
#[track_caller]
fn train_ok(data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = quick_train_args(s(data), s(out));
    args.extend_from_slice(extra);
    if !extra.contains(&"--epochs") {
        args.extend(["--epochs", "1"]);
    }
    assert_ok(&medcnn(&args))
}

// ---------------------------------------------------------------------------------------
// The data folder
// ---------------------------------------------------------------------------------------

#[test]
fn missing_data_folder() {
    let t = TempDir::new("missing-data");
    let missing = t.join("no-such-folder");
    train_fails(&missing, &t.join("out"), &[], &["no-such-folder", "does not exist"]);
}

#[test]
fn empty_data_folder() {
    let t = TempDir::new("empty-data");
    std::fs::create_dir_all(t.join("data")).unwrap();
    train_fails(&t.join("data"), &t.join("out"), &[], &["data", "is empty"]);
}

#[test]
fn class_folder_without_images() {
    let t = TempDir::new("empty-class");
    let data = make_dataset(&t.join("data"), 2, 4);
    std::fs::create_dir_all(data.join("Gamma")).unwrap();
    std::fs::write(data.join("Gamma/README.md"), "not an image").unwrap();
    train_fails(&data, &t.join("out"), &[], &["Gamma", "has no images"]);
    // Skipping bad images does not make an empty class acceptable.
    train_fails(&data, &t.join("out"), &["--skip-bad-images"], &["Gamma", "has no images"]);
}

#[test]
fn fewer_than_two_classes() {
    let t = TempDir::new("one-class");
    let data = make_dataset(&t.join("data"), 1, 6);
    train_fails(&data, &t.join("out"), &[], &["1 class", "at least two"]);
}

/// A two-class dataset with one extra file `Beta/<name>` holding `bytes`.
fn dataset_with(t: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let data = make_dataset(&t.join("data"), 2, 6);
    std::fs::write(data.join("Beta").join(name), bytes).unwrap();
    data
}

/// A bad file stops the load, naming it; with `--skip-bad-images` it is skipped and listed.
#[track_caller]
fn bad_image_case(tag: &str, name: &str, bytes: &[u8], problem: &str) {
    let t = TempDir::new(tag);
    let data = dataset_with(&t, name, bytes);
    let shown = format!("Beta/{name}");
    train_fails(&data, &t.join("out"), &[], &[&shown, problem]);
    let stdout = train_ok(&data, &t.join("out"), &["--skip-bad-images"]);
    assert!(stdout.contains(&format!("skipped {shown}")), "the skipped file is not listed:\n{stdout}");
    assert!(stdout.contains("data: 12 images"), "the bad file was not left out:\n{stdout}");
}

#[test]
fn zero_byte_file() {
    bad_image_case("zero-byte", "empty.png", &[], "empty (0 bytes)");
}

#[test]
fn truncated_jpeg() {
    let jpeg = class_jpeg(1, 99);
    bad_image_case("truncated-jpeg", "cut.jpeg", &jpeg[..jpeg.len() / 2], "truncated JPEG");
}

#[test]
fn truncated_png() {
    let png = class_png(1, 99);
    bad_image_case("truncated-png", "cut.png", &png[..png.len() / 2], "cannot decode");
}

#[test]
fn text_file_named_jpeg() {
    bad_image_case("text-jpeg", "notes.jpeg", b"these are my notes, not an image\n", "looks like text");
}

/// A PNG whose header claims 100000 x 100000 pixels (40 GB of gray), with no real pixel data.
fn decompression_bomb() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut png, b"IEND", &[]);
    png
}

#[test]
fn decompression_bomb_png() {
    let start = std::time::Instant::now();
    bad_image_case("bomb", "bomb.png", &decompression_bomb(), "too large");
    assert!(start.elapsed().as_secs() < 20, "the bomb took {:?}", start.elapsed());
}

#[test]
fn symlink_loop_in_class_folder() {
    let t = TempDir::new("symlink-loop");
    let data = make_dataset(&t.join("data"), 2, 4);
    std::os::unix::fs::symlink("loop.png", data.join("Beta/loop.png")).unwrap();
    train_fails(&data, &t.join("out"), &[], &["loop.png"]);
}

#[test]
fn dangling_symlink() {
    let t = TempDir::new("symlink-dangling");
    let data = make_dataset(&t.join("data"), 2, 4);
    std::os::unix::fs::symlink("gone.png", data.join("Alpha/link.png")).unwrap();
    train_fails(&data, &t.join("out"), &[], &["Alpha/link.png"]);
}

/// A file over 64 MiB named `.png` is refused without being read into memory whole (the test
/// file is sparse, so it costs no disk).
#[test]
fn huge_image_file() {
    let t = TempDir::new("huge-file");
    let data = make_dataset(&t.join("data"), 2, 6);
    let f = std::fs::File::create(data.join("Beta/huge.png")).unwrap();
    f.set_len(65 << 20).unwrap();
    train_fails(&data, &t.join("out"), &[], &["huge.png", "refusing"]);
    let stdout = train_ok(&data, &t.join("out"), &["--skip-bad-images"]);
    assert!(stdout.contains("skipped Beta/huge.png"), "{stdout}");
}

#[test]
fn symlink_loop_as_class_folder() {
    let t = TempDir::new("symlink-loop-dir");
    let data = make_dataset(&t.join("data"), 2, 4);
    std::os::unix::fs::symlink("Loop", data.join("Loop")).unwrap();
    train_fails(&data, &t.join("out"), &[], &["Loop"]);
}

/// A symlink to a folder above the data (a cycle for a recursive walk) must not hang.
#[test]
fn symlink_cycle_to_parent_folder() {
    let t = TempDir::new("symlink-cycle");
    let data = make_dataset(&t.join("data"), 2, 4);
    std::os::unix::fs::symlink("..", data.join("Beta/up")).unwrap();
    std::os::unix::fs::symlink("../..", data.join("Cycle")).unwrap();
    // `Cycle` is a class folder (the link's target) holding folders but no images.
    train_fails(&data, &t.join("out"), &[], &["Cycle", "has no images"]);
}

#[test]
fn file_name_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let t = TempDir::new("non-utf8");
    let data = make_dataset(&t.join("data"), 2, 6);
    let name = std::ffi::OsStr::from_bytes(b"img_\xff\xfe.png");
    // A valid image with such a name is loaded (its name is shown with U+FFFD).
    std::fs::write(data.join("Beta").join(name), class_png(1, 50)).unwrap();
    let stdout = train_ok(&data, &t.join("out"), &[]);
    assert!(stdout.contains("data: 13 images"), "{stdout}");
    // A bad one is named in the error.
    std::fs::write(data.join("Alpha").join(name), b"junk junk junk").unwrap();
    train_fails(&data, &t.join("out2"), &[], &["Alpha/img_\u{FFFD}\u{FFFD}.png", "cannot decode"]);
}

/// A data or output path that is not UTF-8 is refused at once (the checkpoint records the
/// paths as text, and `--resume` must find them again).
#[test]
fn non_utf8_data_path() {
    use std::os::unix::ffi::OsStrExt;
    let t = TempDir::new("non-utf8-path");
    let data = t.path().join(std::ffi::OsStr::from_bytes(b"d\xffta"));
    make_dataset(&data, 2, 6);
    let out = t.join("out");
    let args = |data: &std::ffi::OsStr, out: &std::ffi::OsStr| {
        let mut v: Vec<std::ffi::OsString> =
            vec!["train".into(), "--data".into(), data.into(), "--out".into(), out.into()];
        v.extend(["--epochs", "1", "--threads", "2"].map(Into::into));
        medcnn_os(&v)
    };
    let o = args(data.as_os_str(), out.as_os_str());
    assert_fails(&o, &["--data", "not valid UTF-8"]);
    assert!(!out.exists() && !text(&o.stdout).contains("data:"));
    let good = make_dataset(&t.join("good"), 2, 4);
    let bad_out = t.path().join(std::ffi::OsStr::from_bytes(b"\xffout"));
    assert_fails(&args(good.as_os_str(), bad_out.as_os_str()), &["--out", "not valid UTF-8"]);
    assert!(!bad_out.exists());
}

fn medcnn_os(args: &[std::ffi::OsString]) -> std::process::Output {
    std::process::Command::new(BIN).args(args).env("RUST_BACKTRACE", "1").output().unwrap()
}

/// Valid images that need conversion (alpha, 16-bit, colour, other sizes) train, evaluate and
/// predict normally.
#[test]
fn alpha_and_16_bit_png_are_valid() {
    let t = TempDir::new("alpha-16bit");
    let data = make_dataset(&t.join("data"), 2, 6);
    let alpha = DynamicImage::ImageLumaA8(ImageBuffer::from_fn(64, 64, |x, y| LumaA([(x * 4) as u8, (y * 4) as u8])));
    let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_fn(48, 80, |x, _| Rgba([(x * 5) as u8, 9, 200, 128])));
    let deep = DynamicImage::ImageLuma16(ImageBuffer::from_fn(64, 64, |x, y| Luma([(x * 1000 + y) as u16])));
    let files = [("alpha.png", alpha), ("rgba.png", rgba), ("deep16.png", deep)];
    for (name, img) in &files {
        std::fs::write(data.join("Beta").join(name), encode(img.clone(), ImageFormat::Png)).unwrap();
    }
    let out = t.join("out");
    let stdout = train_ok(&data, &out, &[]);
    assert!(stdout.contains("data: 15 images"), "{stdout}");
    assert!(stdout.contains("3 images converted to gray, 1 resized"), "{stdout}");

    let model = out.join("model.safetensors");
    let mut args = vec!["predict", "--model", s(&model), "--json", "--threads", "2"];
    let paths: Vec<PathBuf> = files.iter().map(|(n, _)| data.join("Beta").join(n)).collect();
    args.extend(paths.iter().map(|p| s(p)));
    let json: serde_json::Value = serde_json::from_str(&assert_ok(&medcnn(&args))).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    for p in json.as_array().unwrap() {
        let sum: f64 = p["probabilities"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-6, "{p}");
    }
    for split in ["test", "all"] {
        let stdout = assert_ok(&medcnn(&["eval", "--model", s(&model), "--data", s(&data), "--split", split]));
        assert!(stdout.contains("accuracy"), "{stdout}");
    }
}

// ---------------------------------------------------------------------------------------
// Archives
// ---------------------------------------------------------------------------------------

fn good_archive(path: &Path) {
    let entries = dataset_entries(2, 6);
    let refs: Vec<(&str, Vec<u8>)> = entries.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    make_archive(path, &refs);
}

#[test]
fn good_archive_trains() {
    let t = TempDir::new("archive-ok");
    good_archive(&t.join("MedNIST.tar.gz"));
    let stdout = train_ok(&t.join("MedNIST.tar.gz"), &t.join("out"), &[]);
    assert!(stdout.contains("data: 12 images"), "{stdout}");
}

#[test]
fn truncated_archive() {
    let t = TempDir::new("archive-truncated");
    let full = t.join("full.tar.gz");
    good_archive(&full);
    let bytes = std::fs::read(&full).unwrap();
    for (name, len) in [("cut-half.tar.gz", bytes.len() / 2), ("cut-tail.tar.gz", bytes.len() - 4)] {
        std::fs::write(t.join(name), &bytes[..len]).unwrap();
        train_fails(&t.join(name), &t.join("out"), &[], &[name, "truncated"]);
        let out = medcnn(&["data", "fetch", "--from", s(&t.join(name)), "--dir", s(&t.join("d"))]);
        assert_fails(&out, &[name, "truncated"]);
        assert!(!t.join("d/MedNIST.tar.gz").exists());
    }
}

#[test]
fn archive_not_gzip() {
    let t = TempDir::new("archive-not-gzip");
    std::fs::write(t.join("fake.tar.gz"), b"PK\x03\x04 this is a zip, or anything else").unwrap();
    train_fails(&t.join("fake.tar.gz"), &t.join("out"), &[], &["fake.tar.gz", "not a gzip"]);
    let out = medcnn(&["data", "fetch", "--from", s(&t.join("fake.tar.gz")), "--dir", s(&t.join("d"))]);
    assert_fails(&out, &["fake.tar.gz", "not a gzip"]);
    // gzip of something that is not tar.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &[7u8; 3000]).unwrap();
    std::fs::write(t.join("notar.tar.gz"), gz.finish().unwrap()).unwrap();
    train_fails(&t.join("notar.tar.gz"), &t.join("out"), &[], &["notar.tar.gz"]);
}

#[test]
fn archive_entries_escaping_the_target() {
    let t = TempDir::new("archive-escape");
    std::fs::create_dir_all(t.join("inner/deeper")).unwrap();
    let evil_abs = t.join("abs-evil.png");
    let cases = [
        ("dotdot.tar.gz", "MedNIST/Alpha/../../../evil.png".to_string()),
        ("absolute.tar.gz", s(&evil_abs).to_string()),
    ];
    for (archive_name, evil_entry) in &cases {
        let mut entries = dataset_entries(2, 4);
        entries.push((evil_entry.clone(), class_png(0, 77)));
        let refs: Vec<(&str, Vec<u8>)> = entries.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        let archive = t.join("inner/deeper").join(archive_name);
        make_archive(&archive, &refs);
        train_fails(&archive, &t.join("inner/deeper/out"), &[], &[archive_name, "refusing"]);
        let out = medcnn(&["data", "fetch", "--from", s(&archive), "--dir", s(&t.join("inner/deeper/d"))]);
        assert_fails(&out, &[archive_name, "refusing"]);
    }
    // Nothing was written outside (or inside) the target.
    assert!(!t.join("evil.png").exists() && !t.join("inner/evil.png").exists());
    assert!(!evil_abs.exists());
    assert!(!t.join("inner/deeper/d/MedNIST.tar.gz").exists());
}

// ---------------------------------------------------------------------------------------
// Model and checkpoint files
// ---------------------------------------------------------------------------------------

/// One small trained run (2 classes, 1 epoch) shared by the model-file tests: its folder,
/// data, model and checkpoint. Tests copy the files before damaging them.
struct Trained {
    data: PathBuf,
    out: PathBuf,
}

fn trained() -> &'static Trained {
    static RUN: OnceLock<Trained> = OnceLock::new();
    RUN.get_or_init(|| {
        let root = scratch_dir("trained");
        let data = make_dataset(&root.join("data"), 2, 8);
        let out = root.join("out");
        train_ok(&data, &out, &[]);
        Trained { data, out }
    })
}

/// Copies the trained model (or checkpoint) into `t` after passing its bytes through `edit`.
fn damaged(t: &TempDir, file: &str, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(trained().out.join(file)).unwrap();
    edit(&mut bytes);
    let path = t.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// A tensor as plain values: name, shape, bytes.
type RawTensor = (String, Vec<usize>, Vec<u8>);

/// The tensors and metadata of a safetensors file, as plain values.
fn read_st(path: &Path) -> (Vec<RawTensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors: Vec<_> =
        st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (tensors, meta)
}

fn write_st(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)], meta: BTreeMap<String, String>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, shape, d)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), d).unwrap())
        })
        .collect();
    let bytes = safetensors::serialize(views, Some(meta.into_iter().collect())).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Re-saves a file through the library (so its checksum is valid) after `edit` changed it.
fn resaved(
    t: &TempDir,
    file: &str,
    name: &str,
    edit: impl FnOnce(&mut Vec<medcnn::backend::NamedTensor>, &mut BTreeMap<String, String>),
) -> PathBuf {
    let (tensors, mut meta) = read_st(&trained().out.join(file));
    let format = meta.remove("format").unwrap();
    meta.remove("format_version");
    meta.remove("checksum");
    let mut named: Vec<medcnn::backend::NamedTensor> = tensors
        .into_iter()
        .map(|(name, shape, d)| medcnn::backend::NamedTensor {
            name,
            shape,
            data: d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        })
        .collect();
    // The checksum covers the tensors in the model's order (as the library saves them).
    let weights = medcnn::model_file::weight_names(&medcnn::model::ModelConfig::default());
    let order: Vec<String> = weights
        .iter()
        .cloned()
        .chain(weights.iter().flat_map(|n| [format!("optimizer.{n}.exp_avg"), format!("optimizer.{n}.exp_avg_sq")]))
        .collect();
    named.sort_by_key(|t| order.iter().position(|n| *n == t.name).unwrap());
    edit(&mut named, &mut meta);
    let path = t.join(name);
    medcnn::checkpoint::save(&path, &format, &named, &meta).unwrap();
    path
}

/// `eval` and `predict` both refuse `model`, naming it and `problem`.
#[track_caller]
fn model_refused(model: &Path, problem: &str) {
    let tr = trained();
    let name = model.file_name().unwrap().to_str().unwrap();
    let image = tr.data.join("Alpha/img_000.png");
    assert_fails(&medcnn(&["predict", "--model", s(model), s(&image)]), &[name, problem]);
    assert_fails(&medcnn(&["eval", "--model", s(model), "--data", s(&tr.data)]), &[name, problem]);
}

/// `train --resume` refuses `checkpoint` (copied into a fresh out folder), naming it and `problem`.
#[track_caller]
fn checkpoint_refused(t: &TempDir, checkpoint: &Path, problem: &str) {
    let out = t.join("resume-out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(checkpoint, out.join("checkpoint.safetensors")).unwrap();
    let mut args = quick_train_args(s(&trained().data), s(&out));
    args.extend(["--epochs", "2", "--resume"]);
    assert_fails(&medcnn(&args), &["checkpoint.safetensors", problem]);
}

#[test]
fn the_trained_files_are_fine() {
    let tr = trained();
    let model = tr.out.join("model.safetensors");
    assert_ok(&medcnn(&["eval", "--model", s(&model), "--data", s(&tr.data)]));
    assert_ok(&medcnn(&["predict", "--model", s(&model), s(&tr.data.join("Beta/img_001.png"))]));
}

#[test]
fn missing_model_file() {
    let t = TempDir::new("model-missing");
    model_refused(&t.join("nothing-here.safetensors"), "does not exist");
}

#[test]
fn truncated_model_and_checkpoint() {
    let t = TempDir::new("model-truncated");
    let m = damaged(&t, "model.safetensors", "cut-model.safetensors", |b| b.truncate(b.len() / 2));
    model_refused(&m, "truncated");
    let m = damaged(&t, "model.safetensors", "cut-header.safetensors", |b| b.truncate(20));
    model_refused(&m, "truncated");
    let m = damaged(&t, "model.safetensors", "zero.safetensors", |b| b.clear());
    model_refused(&m, "truncated");
    let c = damaged(&t, "checkpoint.safetensors", "cut-ckpt.safetensors", |b| b.truncate(b.len() - 100));
    checkpoint_refused(&t, &c, "truncated");
}

#[test]
fn bit_flipped_model_and_checkpoint() {
    let t = TempDir::new("model-bitflip");
    // A flipped bit in the last tensor's data: only the checksum can tell.
    let m = damaged(&t, "model.safetensors", "flip-model.safetensors", |b| {
        let n = b.len();
        b[n - 3] ^= 0x10;
    });
    model_refused(&m, "checksum mismatch");
    let c = damaged(&t, "checkpoint.safetensors", "flip-ckpt.safetensors", |b| {
        let n = b.len();
        b[n / 2 + 7] ^= 0x01;
    });
    checkpoint_refused(&t, &c, "checksum mismatch");
}

#[test]
fn bit_flipped_metadata_is_caught() {
    // A flipped bit inside a metadata value (still valid JSON and UTF-8): the checksum catches it.
    let t = TempDir::new("meta-bitflip");
    for file in ["model.safetensors", "checkpoint.safetensors"] {
        let name = format!("meta-{file}");
        let p = damaged(&t, file, &name, |b| {
            let header_len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            let header = std::str::from_utf8(&b[8..8 + header_len]).unwrap();
            let at = 8 + header.find("\"data_fingerprint\":\"").unwrap() + "\"data_fingerprint\":\"".len();
            b[at] = if b[at] == b'a' { b'b' } else { b'a' };
        });
        if file == "model.safetensors" {
            model_refused(&p, "checksum mismatch");
        } else {
            checkpoint_refused(&t, &p, "checksum mismatch");
        }
    }
}

#[test]
fn not_a_safetensors_file() {
    let t = TempDir::new("model-text");
    let p = t.join("notes.safetensors");
    std::fs::write(&p, "hello, I am a text file and not a model at all\n").unwrap();
    model_refused(&p, "not a readable");
    checkpoint_refused(&t, &p, "not a readable");
}

#[test]
fn unknown_format_version() {
    let t = TempDir::new("model-version");
    for file in ["model.safetensors", "checkpoint.safetensors"] {
        let (tensors, mut meta) = read_st(&trained().out.join(file));
        meta.insert("format_version".into(), "99".into());
        let p = t.join(format!("v99-{file}"));
        write_st(&p, &tensors, meta);
        if file == "model.safetensors" {
            model_refused(&p, "format version");
        } else {
            checkpoint_refused(&t, &p, "format version");
        }
    }
}

#[test]
fn model_and_checkpoint_swapped() {
    let t = TempDir::new("model-swapped");
    let ckpt = damaged(&t, "checkpoint.safetensors", "ckpt-as-model.safetensors", |_| {});
    model_refused(&ckpt, "expected a medcnn-model file");
    let model = damaged(&t, "model.safetensors", "model-as-ckpt.safetensors", |_| {});
    checkpoint_refused(&t, &model, "expected a medcnn-checkpoint file");
}

#[test]
fn model_of_another_architecture() {
    let t = TempDir::new("model-arch");
    let p = resaved(&t, "model.safetensors", "dropped.safetensors", |ts, _| {
        ts.retain(|x| x.name != "conv_block.0.bias");
    });
    model_refused(&p, "conv_block.0.bias");
    let p = resaved(&t, "model.safetensors", "extra.safetensors", |ts, _| {
        ts.push(medcnn::backend::NamedTensor {
            name: "conv_block.99.weight".into(),
            shape: vec![2],
            data: vec![0.0; 2],
        });
    });
    model_refused(&p, "conv_block.99.weight");
    let p = resaved(&t, "model.safetensors", "reshaped.safetensors", |ts, _| {
        let w = ts.iter_mut().find(|x| x.name == "conv_block.0.weight").unwrap();
        let n = w.data.len() / 2;
        w.data.truncate(n);
        w.shape[0] /= 2;
    });
    model_refused(&p, "conv_block.0.weight");
    let p = resaved(&t, "checkpoint.safetensors", "ckpt-dropped.safetensors", |ts, _| {
        ts.retain(|x| x.name != "optimizer.conv_block.0.weight.exp_avg");
    });
    checkpoint_refused(&t, &p, "optimizer.conv_block.0.weight.exp_avg");
    let p = resaved(&t, "checkpoint.safetensors", "ckpt-reshaped.safetensors", |ts, _| {
        let w = ts.iter_mut().find(|x| x.name == "conv_block.0.weight").unwrap();
        w.data.truncate(w.data.len() / 2);
        w.shape[0] /= 2;
    });
    checkpoint_refused(&t, &p, "conv_block.0.weight");
}

#[test]
fn model_of_another_class_count() {
    let t = TempDir::new("model-classes");
    // The metadata lists three classes, the weights have two outputs.
    let p = resaved(&t, "model.safetensors", "three-names.safetensors", |_, meta| {
        meta.insert("classes".into(), r#"["Alpha","Beta","Gamma"]"#.into());
    });
    model_refused(&p, "classifier.2");
    // No classes at all.
    let p = resaved(&t, "model.safetensors", "no-classes.safetensors", |_, meta| {
        meta.insert("classes".into(), "[]".into());
    });
    model_refused(&p, "classes");
    // A good two-class model evaluated on three-class data.
    let data3 = make_dataset(&t.join("data3"), 3, 4);
    let model = trained().out.join("model.safetensors");
    let out = medcnn(&["eval", "--model", s(&model), "--data", s(&data3), "--split", "all"]);
    assert_fails(&out, &["classes", "Gamma"]);
}

#[test]
fn resume_without_checkpoint() {
    let t = TempDir::new("resume-none");
    let data = make_dataset(&t.join("data"), 2, 4);
    train_fails(&data, &t.join("out"), &["--resume"], &["--resume", "no checkpoint"]);
}

/// Resuming on data that changed since the checkpoint was written is refused.
#[test]
fn resume_on_changed_data() {
    let t = TempDir::new("resume-changed");
    let data = make_dataset(&t.join("data"), 2, 6);
    let out = t.join("out");
    train_ok(&data, &out, &[]);
    std::fs::write(data.join("Alpha/img_000.png"), class_png(0, 500)).unwrap();
    train_fails(&data, &out, &["--epochs", "2", "--resume"], &["checkpoint.safetensors", "data differs"]);
}

// ---------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------

/// A bad flag fails before any data is read: the data path does not even exist, and the
/// output folder is not created.
#[track_caller]
fn flag_refused(extra: &[&str], needles: &[&str]) {
    let t = TempDir::new("flags");
    let out = t.join("out");
    let data = t.join("no-data-here");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&out), "--threads", "2"];
    args.extend_from_slice(extra);
    let stderr = assert_fails(&medcnn(&args), needles);
    assert!(!stderr.contains("no-data-here"), "the data was looked at before the flags:\n{stderr}");
    assert!(!out.exists(), "the output folder was created despite a bad flag");
}

#[test]
fn bad_training_flags() {
    flag_refused(&["--batch-size", "0"], &["--batch-size"]);
    flag_refused(&["--lr", "-0.1"], &["--lr", "-0.1"]);
    flag_refused(&["--lr", "0"], &["--lr"]);
    flag_refused(&["--lr", "NaN"], &["--lr"]);
    flag_refused(&["--lr", "fast"], &["--lr", "fast"]);
    flag_refused(&["--epochs", "0"], &["--epochs"]);
    flag_refused(&["--epochs", "-3"], &["--epochs", "-3"]);
    flag_refused(&["--batch-size", "-8"], &["--batch-size", "-8"]);
    flag_refused(&["--limit", "-1"], &["--limit", "-1"]);
    flag_refused(&["--dropout", "1.5"], &["--dropout"]);
    flag_refused(&["--weight-decay", "-1"], &["--weight-decay"]);
    flag_refused(&["--limit", "0"], &["--limit"]);
    flag_refused(&["--schedule", "zigzag"], &["--schedule", "zigzag"]);
    flag_refused(&["--device", "tpu"], &["--device", "tpu"]);
    flag_refused(&["--threads", "many"], &["--threads"]);
    flag_refused(&["--bogus-flag"], &["--bogus-flag"]);
}

#[test]
fn bad_eval_and_predict_flags() {
    let t = TempDir::new("eval-flags");
    let model = t.join("no-model.safetensors");
    let data = t.join("no-data");
    let m = s(&model);
    let d = s(&data);
    let cases: [(&[&str], &[&str]); 5] = [
        (&["eval", "--model", m, "--data", d, "--batch-size", "0"], &["--batch-size"]),
        (&["eval", "--model", m, "--data", d, "--split", "holdout"], &["--split", "holdout"]),
        (&["eval", "--model", m, "--data", d, "--device", "tpu"], &["--device", "tpu"]),
        (&["predict", "--model", m], &["IMAGES"]),
        (&["predict", "--model", m, "--device", "gpu", "x.png"], &["--device", "gpu"]),
    ];
    for (args, needles) in cases {
        let stderr = assert_fails(&medcnn(args), needles);
        assert!(!stderr.contains("no-data"), "the data was read before the flags were checked:\n{stderr}");
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_without_the_feature() {
    let t = TempDir::new("cuda");
    let needles = ["--device cuda", "--features cuda"];
    flag_refused(&["--device", "cuda"], &needles);
    let m = t.join("no-model.safetensors");
    let d = t.join("no-data");
    assert_fails(&medcnn(&["eval", "--model", s(&m), "--data", s(&d), "--device", "cuda"]), &needles);
    assert_fails(&medcnn(&["predict", "--model", s(&m), "--device", "cuda", "x.png"]), &needles);
}

/// With the `cuda` feature, `--device cuda` on a machine without a driver, NVRTC or GPU fails
/// before the data is read, saying what is missing. (With a GPU, the device check passes and the
/// missing data is what fails.)
#[cfg(feature = "cuda")]
#[test]
fn device_cuda_without_a_gpu() {
    let t = TempDir::new("cuda-nogpu");
    let data = t.join("no-data-here");
    let o = medcnn(&["train", "--data", s(&data), "--out", s(&t.join("out")), "--device", "cuda", "--epochs", "1"]);
    let stderr = assert_fails(&o, &[]);
    assert!(
        stderr.contains("--device cuda") != stderr.contains("no-data-here"),
        "expected either a device error or (on a GPU machine) a data error:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// The output folder
// ---------------------------------------------------------------------------------------

/// An output folder that cannot be created fails before any data is read. Tests run as root,
/// for whom a read-only folder is still writable, so the folder is put under a regular file
/// (which no user can create a folder in).
#[test]
fn output_folder_cannot_be_created() {
    let t = TempDir::new("out-under-file");
    let data = make_dataset(&t.join("data"), 2, 4);
    std::fs::write(t.join("a-file"), "x").unwrap();
    let out = t.join("a-file/sub");
    let mut args = quick_train_args(s(&data), s(&out));
    args[2] = "no-data-here"; // the data is never looked at
    args.extend(["--epochs", "1"]);
    let o = medcnn(&args);
    let stderr = assert_fails(&o, &["output folder", "a-file/sub", "cannot be created"]);
    assert!(!text(&o.stdout).contains("data:") && !stderr.contains("no-data-here"));
    // The output "folder" is an existing regular file.
    let o = medcnn(&[quick_train_args(s(&data), s(&t.join("a-file"))), vec!["--epochs", "1"]].concat());
    assert_fails(&o, &["output folder", "a-file"]);
}

/// A missing output folder is created, parents included.
#[test]
fn missing_output_folder_is_created() {
    let t = TempDir::new("out-missing");
    let data = make_dataset(&t.join("data"), 2, 4);
    let out = t.join("not/yet/there");
    train_ok(&data, &out, &[]);
    assert!(out.join("model.safetensors").is_file() && out.join("checkpoint.safetensors").is_file());
}

/// A read-only output folder is refused before training. Only meaningful when not root
/// (root may write anywhere); as root the case is checked to be writable, and skipped.
#[test]
fn read_only_output_folder() {
    use std::os::unix::fs::PermissionsExt;
    let t = TempDir::new("out-readonly");
    let data = make_dataset(&t.join("data"), 2, 4);
    let out = t.join("ro");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(out.join("probe"), "x").is_ok() {
        eprintln!("read_only_output_folder: running as root, a read-only folder is writable; skipped");
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
        return;
    }
    let o = medcnn(&[quick_train_args(s(&data), s(&out)), vec!["--epochs", "1"]].concat());
    assert_fails(&o, &["output folder", "not writable"]);
    assert!(!text(&o.stdout).contains("data:"));
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Prediction of an image that is missing or bad names it.
#[test]
fn predict_bad_images() {
    let t = TempDir::new("predict-bad");
    let model = trained().out.join("model.safetensors");
    let jpeg = class_jpeg(0, 3);
    let cases: [(&str, &[u8], &str); 4] = [
        ("empty.png", &[], "empty (0 bytes)"),
        ("cut.jpeg", &jpeg[..jpeg.len() / 2], "truncated JPEG"),
        ("notes.jpeg", b"plain text here", "looks like text"),
        ("bomb.png", &decompression_bomb(), "too large"),
    ];
    for (name, bytes, problem) in cases {
        std::fs::write(t.join(name), bytes).unwrap();
        assert_fails(&medcnn(&["predict", "--model", s(&model), s(&t.join(name))]), &[name, problem]);
    }
    let missing = t.join("missing.png");
    assert_fails(&medcnn(&["predict", "--model", s(&model), s(&missing)]), &["missing.png"]);
    assert_fails(
        &medcnn(&["predict", "--model", s(&model), s(t.path())]),
        &[t.path().file_name().unwrap().to_str().unwrap()],
    );
}
