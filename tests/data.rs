//! Tests of the data layer (loading, splitting, batching) on tiny datasets made on the fly.
//!
//! What it is: every test builds its own images with the `image` crate in a fresh folder
//! under the system temp dir (or a `.tar.gz` in MONAI's layout) and checks what
//! `medcnn::data` makes of it: class order, labels, pixels, conversions, every kind of bad
//! input, and the properties of the split and the batches.
//!
//! What it is not: a test of the real MedNIST, except `real_mednist_archive`, which runs
//! only when `../shared/data/MedNIST.tar.gz` exists.

mod common;

use std::io::{Cursor, Write};
use std::path::Path;

use common::TempDir;
use flate2::write::GzEncoder;
use flate2::Compression;
use image::{DynamicImage, GrayImage, ImageFormat, RgbImage};
use medcnn::data::{
    decode_image, epoch_order, fill_batch, flip_mask, load_dataset, normalize_into, split_dataset, Dataset,
    LoadOptions, LoadReport, IMAGE_PIXELS,
};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// The test pattern of a gray image: distinct per image (`seed`) and per pixel.
fn pattern(seed: u8, x: u32, y: u32) -> u8 {
    (x * 3 + y * 5 + seed as u32 * 17) as u8
}

fn gray(w: u32, h: u32, seed: u8) -> DynamicImage {
    DynamicImage::ImageLuma8(GrayImage::from_fn(w, h, |x, y| image::Luma([pattern(seed, x, y)])))
}

fn gray_png(seed: u8) -> Vec<u8> {
    encode(gray(64, 64, seed), ImageFormat::Png)
}

fn gray_jpeg(seed: u8) -> Vec<u8> {
    encode(gray(64, 64, seed), ImageFormat::Jpeg)
}

fn uniform_rgb_png(rgb: [u8; 3]) -> Vec<u8> {
    encode(DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, image::Rgb(rgb))), ImageFormat::Png)
}

fn uniform_gray_png(w: u32, h: u32, value: u8) -> Vec<u8> {
    encode(DynamicImage::ImageLuma8(GrayImage::from_pixel(w, h, image::Luma([value]))), ImageFormat::Png)
}

/// The standard tiny dataset: three classes of three images, in paths relative to the
/// dataset root. `CXR/001.png` is RGB, `ChestCT/001.png` is 100x80; two non-image files.
/// Byte order puts "CXR" before "ChestCT" ('X' < 'h').
fn tiny_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("ChestCT/000.jpeg".into(), gray_jpeg(6)),
        ("ChestCT/001.png".into(), uniform_gray_png(100, 80, 77)),
        ("ChestCT/002.jpeg".into(), gray_jpeg(7)),
        ("CXR/000.jpeg".into(), gray_jpeg(3)),
        ("CXR/001.png".into(), uniform_rgb_png([200, 100, 50])),
        ("CXR/002.jpg".into(), gray_jpeg(4)),
        ("AbdomenCT/000.png".into(), gray_png(0)),
        ("AbdomenCT/001.jpeg".into(), gray_jpeg(1)),
        ("AbdomenCT/002.JPEG".into(), gray_jpeg(2)),
        ("README.md".into(), b"# not an image\n".to_vec()),
        ("AbdomenCT/.DS_Store".into(), vec![0, 1, 2, 3]),
        ("AbdomenCT/notes.txt".into(), b"ignored".to_vec()),
    ]
}

fn write_files(root: &Path, files: &[(String, Vec<u8>)]) {
    for (rel, bytes) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// A `.tar.gz` with every file under `prefix` (e.g. `"MedNIST/"`), folders included.
fn tar_gz(files: &[(String, Vec<u8>)], prefix: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    let mut dirs: Vec<String> =
        files.iter().filter_map(|(rel, _)| rel.rsplit_once('/').map(|(d, _)| format!("{prefix}{d}/"))).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        builder.append_data(&mut h, dir, std::io::empty()).unwrap();
    }
    for (rel, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        builder.append_data(&mut h, format!("{prefix}{rel}"), bytes.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

/// A `.tar.gz` with one entry whose name is written into the header by hand, because the
/// `tar` crate's `set_path` refuses `..` and absolute paths (exactly what we want to test).
fn tar_gz_with_raw_name(files: &[(String, Vec<u8>)], raw_name: &[u8], bytes: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (rel, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        builder.append_data(&mut h, format!("MedNIST/{rel}"), data.as_slice()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..raw_name.len()].copy_from_slice(raw_name);
    h.set_mode(0o644);
    h.set_size(bytes.len() as u64);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    builder.append(&h, bytes).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

fn tiny_folder(tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    write_files(dir.path(), &tiny_files());
    dir
}

fn load(path: &Path) -> anyhow::Result<Dataset> {
    load_dataset(path, &LoadOptions::default())
}

fn skipping() -> LoadOptions {
    LoadOptions { limit_per_class: None, skip_bad_images: true, ..Default::default() }
}

fn load_err(path: &Path) -> String {
    match load(path) {
        Ok(ds) => panic!("expected an error, loaded {} images", ds.len()),
        Err(e) => {
            // Shown with `cargo test -- --nocapture`, to read the messages as a user would.
            eprintln!("error for {}: {e:#}", path.display());
            format!("{e:#}")
        }
    }
}

// ---------------------------------------------------------------------------------------
// Loading a folder
// ---------------------------------------------------------------------------------------

#[test]
fn folder_classes_in_byte_order_with_labels_and_names() {
    let dir = tiny_folder("order");
    let ds = load(dir.path()).unwrap();
    assert_eq!(ds.classes, ["AbdomenCT", "CXR", "ChestCT"]);
    assert_eq!(ds.len(), 9);
    assert_eq!(ds.labels, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
    assert_eq!(ds.class_counts(), [3, 3, 3]);
    assert_eq!(
        ds.names,
        [
            "AbdomenCT/000.png",
            "AbdomenCT/001.jpeg",
            "AbdomenCT/002.JPEG",
            "CXR/000.jpeg",
            "CXR/001.png",
            "CXR/002.jpg",
            "ChestCT/000.jpeg",
            "ChestCT/001.png",
            "ChestCT/002.jpeg",
        ]
    );
    assert_eq!(ds.images.len(), 9 * IMAGE_PIXELS);
    assert_eq!(ds.hashes.len(), 9);
    assert_eq!(ds.report.converted_to_gray, 1, "the RGB image");
    assert_eq!(ds.report.resized, 1, "the 100x80 image");
    assert!(ds.report.skipped.is_empty());
}

#[test]
fn pixels_survive_decoding() {
    let dir = tiny_folder("pixels");
    let ds = load(dir.path()).unwrap();
    // A PNG is lossless: every pixel exact.
    let png = ds.image(0);
    for y in 0..64 {
        for x in 0..64 {
            assert_eq!(png[y * 64 + x], pattern(0, x as u32, y as u32), "at ({x},{y})");
        }
    }
    // A JPEG is close.
    let jpeg = ds.image(1);
    let worst = (0..IMAGE_PIXELS)
        .map(|i| (jpeg[i] as i32 - pattern(1, (i % 64) as u32, (i / 64) as u32) as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 40, "JPEG differs by up to {worst}");
    // RGB (200,100,50) -> luma about 0.2126*200 + 0.7152*100 + 0.0722*50 = 117.7.
    let rgb = ds.image(4);
    assert!(rgb.iter().all(|&p| (116..=119).contains(&p)), "luma {}", rgb[0]);
    // A uniform 100x80 image stays uniform after resizing.
    assert!(ds.image(7).iter().all(|&p| p == 77));
}

#[test]
fn decode_image_reports_what_it_did() {
    let (px, note) = decode_image(&gray_png(9), "a.png").unwrap();
    assert_eq!(px.len(), IMAGE_PIXELS);
    assert!(!note.converted_to_gray && !note.resized);
    let (px, note) = decode_image(&uniform_rgb_png([10, 10, 10]), "b.png").unwrap();
    assert!(note.converted_to_gray && !note.resized);
    assert!(px.iter().all(|&p| p == 10));
    let (_, note) = decode_image(&uniform_gray_png(30, 200, 5), "c.png").unwrap();
    assert!(!note.converted_to_gray && note.resized);
    let sixteen = DynamicImage::ImageLuma16(image::ImageBuffer::from_pixel(64, 64, image::Luma([65535u16])));
    let (px, note) = decode_image(&encode(sixteen, ImageFormat::Png), "d.png").unwrap();
    assert!(note.converted_to_gray);
    assert!(px.iter().all(|&p| p == 255));
}

#[test]
fn decode_image_refuses_a_decompression_bomb() {
    // A valid PNG header claiming 100000 x 100000 pixels: must be an error, not an OOM.
    let bomb = encode(DynamicImage::ImageLuma8(GrayImage::new(1, 1)), ImageFormat::Png);
    let mut bomb = bomb;
    // IHDR width/height live at bytes 16..24; patch them and fix the chunk CRC.
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32fast::hash(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let err = decode_image(&bomb, "bomb.png").unwrap_err();
    assert!(format!("{err:#}").contains("bomb.png"), "{err:#}");
}

#[test]
fn a_wrapper_folder_is_stepped_into() {
    let dir = TempDir::new("wrapper");
    write_files(&dir.path().join("MedNIST"), &tiny_files());
    let ds = load(dir.path()).unwrap();
    assert_eq!(ds.classes, ["AbdomenCT", "CXR", "ChestCT"]);
    assert_eq!(ds.len(), 9);
}

#[test]
fn limit_per_class_keeps_the_first_files_by_name() {
    let dir = tiny_folder("limit");
    let opts = LoadOptions { limit_per_class: Some(2), skip_bad_images: false, ..Default::default() };
    let ds = load_dataset(dir.path(), &opts).unwrap();
    assert_eq!(ds.class_counts(), [2, 2, 2]);
    assert_eq!(ds.names[..2], ["AbdomenCT/000.png", "AbdomenCT/001.jpeg"]);
    assert_eq!(ds.names[4..], ["ChestCT/000.jpeg", "ChestCT/001.png"]);
    let zero = LoadOptions { limit_per_class: Some(0), skip_bad_images: false, ..Default::default() };
    assert!(load_dataset(dir.path(), &zero).is_err());
}

#[test]
fn non_utf8_file_names_load_without_panic() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tiny_folder("utf8");
    let name = std::ffi::OsStr::from_bytes(b"bad\xffname.png");
    std::fs::write(dir.path().join("CXR").join(name), gray_png(5)).unwrap();
    let ds = load(dir.path()).unwrap();
    assert_eq!(ds.class_counts(), [3, 4, 3]);
    assert!(ds.names.iter().any(|n| n.starts_with("CXR/bad\u{FFFD}name")), "{:?}", ds.names);
}

// ---------------------------------------------------------------------------------------
// Loading an archive
// ---------------------------------------------------------------------------------------

#[test]
fn archive_in_monai_layout_matches_the_folder() {
    let dir = tiny_folder("archive");
    let archive = dir.path().join("MedNIST.tar.gz");
    std::fs::write(&archive, tar_gz(&tiny_files(), "MedNIST/")).unwrap();
    let from_tar = load(&archive).unwrap();
    std::fs::remove_file(&archive).unwrap();
    let from_dir = load(dir.path()).unwrap();
    assert_eq!(from_tar.classes, from_dir.classes);
    assert_eq!(from_tar.labels, from_dir.labels);
    assert_eq!(from_tar.names, from_dir.names);
    assert_eq!(from_tar.hashes, from_dir.hashes);
    assert_eq!(from_tar.images, from_dir.images);
    assert_eq!(from_tar.report, from_dir.report);
}

#[test]
fn archive_with_classes_at_top_level_and_dot_prefix() {
    let dir = TempDir::new("toplevel");
    for prefix in ["", "./", "./MedNIST/"] {
        let archive = dir.path().join("x.tar.gz");
        std::fs::write(&archive, tar_gz(&tiny_files(), prefix)).unwrap();
        let ds = load(&archive).unwrap();
        assert_eq!(ds.classes, ["AbdomenCT", "CXR", "ChestCT"], "prefix {prefix:?}");
        assert_eq!(ds.len(), 9);
    }
}

#[test]
fn archive_entry_with_dotdot_or_absolute_path_is_an_error() {
    let dir = TempDir::new("evil");
    let cases: [&[u8]; 3] = [b"../evil.jpeg", b"MedNIST/Hand/../../evil.jpeg", b"/abs/evil.jpeg"];
    for raw in cases {
        let archive = dir.path().join("evil.tar.gz");
        std::fs::write(&archive, tar_gz_with_raw_name(&tiny_files(), raw, &gray_jpeg(1))).unwrap();
        let err = load_err(&archive);
        assert!(err.contains(std::str::from_utf8(raw).unwrap()), "{err}");
        // Also when the entry is not even an image.
    }
    let archive = dir.path().join("evil2.tar.gz");
    std::fs::write(&archive, tar_gz_with_raw_name(&tiny_files(), b"../README.md", b"hi")).unwrap();
    assert!(load_err(&archive).contains("../README.md"));
}

#[test]
fn truncated_archive_is_an_error() {
    let dir = TempDir::new("truncated");
    let bytes = tar_gz(&tiny_files(), "MedNIST/");
    for cut in [bytes.len() / 2, bytes.len() - 4, 20] {
        let archive = dir.path().join("cut.tar.gz");
        std::fs::write(&archive, &bytes[..cut]).unwrap();
        let err = load_err(&archive);
        assert!(err.contains("cut.tar.gz"), "cut at {cut}: {err}");
    }
}

#[test]
fn non_gzip_archive_is_an_error() {
    let dir = TempDir::new("notgz");
    let archive = dir.path().join("MedNIST.tar.gz");
    std::fs::write(&archive, b"this is not a gzip file at all").unwrap();
    let err = load_err(&archive);
    assert!(err.contains("MedNIST.tar.gz") && err.contains("gzip"), "{err}");
    // A gzip'd file that is not a tar.
    let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
    gz.write_all(&[7u8; 3000]).unwrap();
    std::fs::write(&archive, gz.finish().unwrap()).unwrap();
    assert!(load_err(&archive).contains("MedNIST.tar.gz"));
}

#[test]
fn bad_image_inside_archive_is_named_and_skippable() {
    let dir = TempDir::new("archive-bad");
    let mut files = tiny_files();
    files.push(("CXR/003.jpeg".into(), b"hello".to_vec()));
    let archive = dir.path().join("a.tar.gz");
    std::fs::write(&archive, tar_gz(&files, "MedNIST/")).unwrap();
    assert!(load_err(&archive).contains("CXR/003.jpeg"));
    let ds = load_dataset(&archive, &skipping()).unwrap();
    assert_eq!(ds.len(), 9);
    assert_eq!(ds.report.skipped.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

#[test]
fn missing_folder_is_an_error() {
    let dir = TempDir::new("missing");
    let missing = dir.path().join("nope");
    let err = load_err(&missing);
    assert!(err.contains("does not exist") && err.contains("nope"), "{err}");
}

#[test]
fn empty_folder_is_an_error() {
    let dir = TempDir::new("empty");
    let err = load_err(dir.path());
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn one_class_only_is_an_error() {
    let dir = TempDir::new("oneclass");
    write_files(dir.path(), &[("Hand/0.png".into(), gray_png(1))]);
    let err = load_err(dir.path());
    assert!(err.contains("Hand") && err.contains("two"), "{err}");
}

#[test]
fn class_folder_without_images_is_an_error() {
    let dir = tiny_folder("noimages");
    write_files(dir.path(), &[("Hand/README.md".into(), b"x".to_vec())]);
    let err = load_err(dir.path());
    assert!(err.contains("Hand") && err.contains("no images"), "{err}");
}

/// Each bad file stops the load with its name in the message; `skip_bad_images` skips it.
#[test]
fn bad_files_are_named_or_skipped() {
    let mut truncated = gray_jpeg(1);
    truncated.truncate(truncated.len() / 3);
    let cases: [(&str, Vec<u8>); 3] = [
        ("CXR/zero.jpeg", Vec::new()),
        ("CXR/truncated.jpeg", truncated),
        ("CXR/text.jpeg", b"I am a text file, not a JPEG.\n".to_vec()),
    ];
    for (rel, bytes) in &cases {
        let dir = tiny_folder("bad");
        write_files(dir.path(), &[(rel.to_string(), bytes.clone())]);
        let err = load_err(dir.path());
        let file = rel.rsplit('/').next().unwrap();
        assert!(err.contains(file), "{rel}: {err}");
        let ds = load_dataset(dir.path(), &skipping()).unwrap();
        assert_eq!(ds.len(), 9, "{rel}");
        assert_eq!(ds.report.skipped.len(), 1, "{rel}");
        assert_eq!(ds.report.skipped[0].0, *rel);
    }
    // All three at once.
    let dir = tiny_folder("bad-all");
    write_files(dir.path(), &cases.iter().map(|(r, b)| (r.to_string(), b.clone())).collect::<Vec<_>>());
    let ds = load_dataset(dir.path(), &skipping()).unwrap();
    let skipped: Vec<&str> = ds.report.skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(skipped, ["CXR/text.jpeg", "CXR/truncated.jpeg", "CXR/zero.jpeg"]);
    assert_eq!(ds.class_counts(), [3, 3, 3]);
}

#[test]
fn class_left_empty_after_skipping_is_an_error() {
    let dir = TempDir::new("allbad");
    write_files(dir.path(), &[("A/0.png".into(), gray_png(0)), ("B/0.png".into(), b"junk".to_vec())]);
    let err = load_dataset(dir.path(), &skipping()).unwrap_err();
    assert!(format!("{err:#}").contains('B'));
}

#[test]
fn symlink_loop_is_an_error_naming_it() {
    let dir = tiny_folder("loop");
    let link = dir.path().join("Loop");
    std::os::unix::fs::symlink(&link, &link).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("Loop"), "{err}");
}

// ---------------------------------------------------------------------------------------
// Split
// ---------------------------------------------------------------------------------------

/// A dataset without pixels, for split tests: `counts[c]` images of class `c`, each with
/// its own hash unless `same_hash` puts it in a group.
fn synthetic(counts: &[usize], same_hash: &[(usize, usize)]) -> Dataset {
    let mut labels = Vec::new();
    for (c, &n) in counts.iter().enumerate() {
        labels.extend(std::iter::repeat_n(c as u8, n));
    }
    let mut hashes: Vec<[u8; 32]> = (0..labels.len())
        .map(|i| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
            h
        })
        .collect();
    for &(copy, of) in same_hash {
        hashes[copy] = hashes[of];
    }
    Dataset {
        classes: (0..counts.len()).map(|c| format!("C{c}")).collect(),
        shape: Default::default(),
        stored_channels: 1,
        images: vec![0; labels.len() * IMAGE_PIXELS],
        names: (0..labels.len()).map(|i| format!("C/{i}")).collect(),
        labels,
        hashes,
        report: LoadReport::default(),
    }
}

fn assert_partition(ds: &Dataset, split: &medcnn::data::Split) {
    let mut all: Vec<usize> = [&split.train, &split.val, &split.test].into_iter().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..ds.len()).collect::<Vec<_>>(), "every index exactly once");
}

#[test]
fn split_is_reproducible_and_seed_dependent() {
    let ds = synthetic(&[100, 57, 31], &[]);
    let a = split_dataset(&ds, 7, [0.7, 0.2, 0.1]);
    let b = split_dataset(&ds, 7, [0.7, 0.2, 0.1]);
    let c = split_dataset(&ds, 8, [0.7, 0.2, 0.1]);
    assert_eq!(a, b);
    assert_ne!(a.train, c.train);
    assert_eq!(a.seed, 7);
    assert_partition(&ds, &a);
    assert_partition(&ds, &c);
    let json = serde_json::to_string(&a).unwrap();
    assert_eq!(serde_json::from_str::<medcnn::data::Split>(&json).unwrap(), a);
}

#[test]
fn split_is_stratified_within_one_per_class() {
    let counts = [100, 57, 31, 10000, 8954, 3];
    let ds = synthetic(&counts, &[]);
    let fractions = [0.7, 0.2, 0.1];
    let split = split_dataset(&ds, 1, fractions);
    assert_partition(&ds, &split);
    for (c, &n) in counts.iter().enumerate() {
        for (part, f) in [&split.train, &split.val, &split.test].iter().zip(fractions) {
            let got = part.iter().filter(|&&i| ds.labels[i] as usize == c).count();
            let want = n as f64 * f;
            assert!((got as f64 - want).abs() < 1.0 + 1e-9, "class {c}: {got} vs {want}");
        }
    }
    // The real dataset's class sizes give the documented totals.
    let real = synthetic(&[10000, 8954, 10000, 10000, 10000, 10000], &[]);
    let s = split_dataset(&real, 0, fractions);
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (41267, 11791, 5896));
}

#[test]
fn duplicate_groups_stay_in_one_split() {
    // Twelve groups of 2..5 copies in class 0, and one group that spans classes 0, 1 and 2.
    let mut dups = Vec::new();
    for g in 0..12 {
        let first = g * 7;
        for k in 1..=(g % 4 + 1) {
            dups.push((first + k, first));
        }
    }
    dups.push((120, 3)); // class 1 image copying a class 0 image
    dups.push((175, 3)); // class 2 image copying it too
    let ds = synthetic(&[100, 60, 30], &dups);
    for seed in 0..20 {
        let split = split_dataset(&ds, seed, [0.7, 0.2, 0.1]);
        assert_partition(&ds, &split);
        let which = |i: usize| [&split.train, &split.val, &split.test].iter().position(|p| p.contains(&i)).unwrap();
        for &(copy, of) in &dups {
            assert_eq!(which(copy), which(of), "seed {seed}: {copy} and {of} apart");
        }
        assert_eq!(split.duplicate_groups, 13);
        let files: usize = (0..12).map(|g| g % 4 + 2).sum::<usize>() + 3;
        assert_eq!(split.duplicate_files, files);
    }
}

#[test]
fn duplicate_files_on_disk_are_found_and_kept_together() {
    let dir = TempDir::new("dups");
    let mut files = Vec::new();
    for class in ["A", "B"] {
        for i in 0..20u8 {
            files.push((format!("{class}/{i:03}.png"), gray_png(i + if class == "A" { 0 } else { 100 })));
        }
    }
    let copy = gray_png(200);
    for name in ["A/dup1.png", "A/dup2.png", "A/dup3.png"] {
        files.push((name.into(), copy.clone()));
    }
    write_files(dir.path(), &files);
    let ds = load(dir.path()).unwrap();
    let split = split_dataset(&ds, 3, [0.7, 0.2, 0.1]);
    assert_eq!((split.duplicate_groups, split.duplicate_files), (1, 3));
    let dup_idx: Vec<usize> = (0..ds.len()).filter(|&i| ds.names[i].contains("dup")).collect();
    assert_eq!(dup_idx.len(), 3);
    let all_in = |p: &Vec<usize>| dup_idx.iter().all(|i| p.contains(i));
    assert!(all_in(&split.train) || all_in(&split.val) || all_in(&split.test));
    assert!(split.summary().contains("1 duplicate groups (3 files)"), "{}", split.summary());
}

// ---------------------------------------------------------------------------------------
// Batching
// ---------------------------------------------------------------------------------------

#[test]
fn normalize_maps_0_to_minus_1_and_255_to_1() {
    let mut out = [0f32; 3];
    normalize_into(&[0, 255, 51], &mut out);
    assert_eq!(out[0], -1.0);
    assert_eq!(out[1], 1.0);
    assert!((out[2] - (51.0 / 127.5 - 1.0)).abs() < 1e-6);
}

#[test]
fn fill_batch_lays_out_nchw_and_mirrors() {
    let dir = tiny_folder("batch");
    let ds = load(dir.path()).unwrap();
    let (mut x, mut y) = (vec![9.0; 5], vec![42]);
    fill_batch(&ds, &[0, 4, 0], &[false, false, true], &mut x, &mut y);
    assert_eq!(x.len(), 3 * IMAGE_PIXELS);
    assert_eq!(y, [0, 1, 0]);
    let plain = &x[..IMAGE_PIXELS];
    let flipped = &x[2 * IMAGE_PIXELS..];
    for r in 0..64 {
        for c in 0..64 {
            let want = pattern(0, c as u32, r as u32) as f32 / 127.5 - 1.0;
            assert_eq!(plain[r * 64 + c], want);
            assert_eq!(flipped[r * 64 + (63 - c)], want);
        }
    }
    // No flips at all with an empty mask.
    fill_batch(&ds, &[0], &[], &mut x, &mut y);
    assert_eq!(x[..], plain_copy(&ds, 0)[..]);
}

fn plain_copy(ds: &Dataset, i: usize) -> Vec<f32> {
    let mut out = vec![0.0; IMAGE_PIXELS];
    normalize_into(ds.image(i), &mut out);
    out
}

#[test]
fn epoch_order_and_flips_are_seeded_per_epoch() {
    let a = epoch_order(1000, 5, 3);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_eq!(a, epoch_order(1000, 5, 3));
    assert_ne!(a, epoch_order(1000, 5, 4));
    assert_ne!(a, epoch_order(1000, 6, 3));
    let f = flip_mask(1000, 5, 3);
    assert_eq!(f, flip_mask(1000, 5, 3));
    assert_ne!(f, flip_mask(1000, 5, 4));
    let heads = f.iter().filter(|&&b| b).count();
    assert!((400..=600).contains(&heads), "{heads} heads of 1000");
    assert!(epoch_order(0, 1, 1).is_empty() && flip_mask(0, 1, 1).is_empty());
}

// ---------------------------------------------------------------------------------------
// The real archive, when present
// ---------------------------------------------------------------------------------------

/// Loads the real archive (`common::real_archive`): skipped, saying so, when this machine has
/// none, and a failure under MEDCNN_REQUIRE_DATA=1.
#[test]
fn real_mednist_archive() {
    let Some(path) = common::real_archive() else { return };
    let start = std::time::Instant::now();
    let ds = load(&path).unwrap();
    let load_s = start.elapsed().as_secs_f64();
    assert_eq!(ds.len(), 58954);
    assert_eq!(ds.classes, ["AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT"]);
    assert_eq!(ds.class_counts(), [10000, 8954, 10000, 10000, 10000, 10000]);
    let split = split_dataset(&ds, 0, [0.7, 0.2, 0.1]);
    assert_eq!((split.duplicate_groups, split.duplicate_files), (348, 788));
    assert_eq!(split.train.len() + split.val.len() + split.test.len(), 58954);
    assert_partition(&ds, &split);
    eprintln!(
        "real MedNIST: {} images loaded in {load_s:.2} s; report {:?}; {}",
        ds.len(),
        (ds.report.converted_to_gray, ds.report.resized, ds.report.skipped.len()),
        split.summary()
    );
}
