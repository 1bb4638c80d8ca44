//! Loading MedNIST (or any folder of class folders) into memory as a [`Dataset`].
//!
//! What it is: the pipeline "find files -> sort and limit per class -> decode in parallel ->
//! collect". Finding files is delegated to `folder` (a directory tree) and `archive`
//! (a `.tar.gz`, read straight from the gzip stream), decoding to `decode`.
//! The result is deterministic: classes in byte order, files in name order within a class,
//! so the same input always gives the same indices.
//!
//! What it is not: it does not split (see `split`), normalise (see `batch`) or download
//! (see `fetch`). It never panics on bad input; every error names the file or folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::archive;
use super::decode::{decode_image_as, expand_channels, DecodeNote, InputShape};
use super::folder;

/// No image file may be larger than this (MedNIST's are about 2 KiB).
pub const MAX_IMAGE_FILE_BYTES: u64 = 64 * 1024 * 1024;

/// Labels are stored as `u8`.
const MAX_CLASSES: usize = 256;

/// How to load.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Keep only the first N files (by name) of each class. `None` keeps all.
    pub limit_per_class: Option<usize>,
    /// Skip an undecodable image (and record it in [`LoadReport::skipped`]) instead of failing.
    pub skip_bad_images: bool,
    /// The model's input: every image is decoded (and resized) to it. Default 64x64 gray.
    pub shape: InputShape,
}

/// What the loader had to do to the files it was given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Images that were colour or 16-bit and were converted to 8-bit gray.
    pub converted_to_gray: usize,
    /// Images that were not the input size and were resized.
    pub resized: usize,
    /// Files that were skipped (only with `skip_bad_images`): `(file name, reason)`.
    pub skipped: Vec<(String, String)>,
}

/// Every image in memory, at the input size, with its label.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Class names sorted in byte order: `AbdomenCT, BreastMRI, CXR, ChestCT, Hand, HeadCT`.
    /// A label is an index into this list.
    pub classes: Vec<String>,
    /// The model input the images were decoded for.
    pub shape: InputShape,
    /// Planes stored per image: `shape.channels`, except 1 when every image is gray (MedNIST
    /// is), so a three-channel model on gray data holds one plane and the batch repeats it.
    pub stored_channels: usize,
    /// `len() * stored_channels * size * size` pixels; image `i` is the `i`-th run of
    /// [`Dataset::image_len`] bytes, planes one after the other, each row-major.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// `"Class/file.jpeg"` for each image.
    pub names: Vec<String>,
    /// sha256 of each file's bytes, for finding byte-identical duplicates.
    pub hashes: Vec<[u8; 32]>,
    /// Conversions, resizes and skipped files.
    pub report: LoadReport,
}

impl Dataset {
    /// The number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes stored per image: `stored_channels * size * size` (4096 for MedNIST at 64x64 gray).
    pub fn image_len(&self) -> usize {
        self.stored_channels * self.shape.plane()
    }

    /// The stored pixels of image `i` (see [`Dataset::stored_channels`]). Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// How many images each class has, indexed by label.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for &label in &self.labels {
            counts[label as usize] += 1;
        }
        counts
    }
}

/// One image file found by `folder` or `archive`, not yet decoded.
#[derive(Clone, Debug)]
pub struct SourceFile {
    /// The class folder it was found in.
    pub class: String,
    /// Its file name (lossy UTF-8 if the real name is not UTF-8).
    pub file: String,
    /// Where its bytes are.
    pub payload: Payload,
}

impl SourceFile {
    /// `"Class/file.jpeg"`: the name used in the dataset and in error messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.class, self.file)
    }

    /// The file's bytes (read from disk for a folder, already in memory for an archive).
    fn bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match &self.payload {
            Payload::InMemory(bytes) => Ok(bytes.into()),
            Payload::OnDisk(path) => read_capped(path).map(Into::into),
        }
    }
}

/// Reads a whole file, refusing one larger than [`MAX_IMAGE_FILE_BYTES`] (a 10 GB file
/// named `x.jpeg` is an error, not an attempt to hold it in memory).
fn read_capped(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read image file {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_IMAGE_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read image file {}", path.display()))?;
    if bytes.len() as u64 > MAX_IMAGE_FILE_BYTES {
        bail!("image file {} is over {MAX_IMAGE_FILE_BYTES} bytes; refusing it", path.display());
    }
    Ok(bytes)
}

/// Where a [`SourceFile`]'s bytes live.
#[derive(Clone, Debug)]
pub enum Payload {
    /// Read out of an archive.
    InMemory(Vec<u8>),
    /// A file in a folder, read when it is decoded.
    OnDisk(PathBuf),
}

/// True for the file names we treat as images: `*.jpeg`, `*.jpg`, `*.png` (any case),
/// except hidden files such as macOS's `._x.jpeg` resource forks.
pub fn is_image_name(file_name: &str) -> bool {
    if file_name.starts_with('.') {
        return false;
    }
    let Some((_, ext)) = file_name.rsplit_once('.') else {
        return false;
    };
    ["jpeg", "jpg", "png"].iter().any(|known| ext.eq_ignore_ascii_case(known))
}

/// Loads a dataset from a folder of class folders, a folder holding one such folder
/// (e.g. `data/` holding `MedNIST/`), or a `.tar.gz` archive in MONAI's layout.
pub fn load_dataset(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    if opts.limit_per_class == Some(0) {
        bail!("limit_per_class must be at least 1");
    }
    let files = find_source_files(path)?;
    let by_class = group_by_class(files, opts.limit_per_class);
    if by_class.len() < 2 {
        bail!(
            "{} has {} class(es) ({}); need at least two class folders",
            path.display(),
            by_class.len(),
            by_class.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if by_class.len() > MAX_CLASSES {
        bail!(
            "{} has {} class folders; labels are 8-bit, so at most {MAX_CLASSES} are supported",
            path.display(),
            by_class.len()
        );
    }
    let classes: Vec<String> = by_class.keys().cloned().collect();
    let ordered: Vec<(u8, SourceFile)> = by_class
        .into_values()
        .enumerate()
        .flat_map(|(label, files)| files.into_iter().map(move |f| (label as u8, f)))
        .collect();
    let decoded: Vec<Result<Decoded>> = ordered.par_iter().map(|(_, file)| decode_source(file, opts.shape)).collect();
    assemble(classes, opts.shape, &ordered, decoded, opts.skip_bad_images)
}

/// Finds the image files under `path`, choosing the reader by what `path` is.
fn find_source_files(path: &Path) -> Result<Vec<SourceFile>> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            anyhow::anyhow!("data folder {} does not exist", path.display())
        }
        _ => anyhow::anyhow!("cannot read {}: {e}", path.display()),
    })?;
    if meta.is_dir() {
        folder::scan_folder(path)
    } else {
        archive::scan_archive(path, true)
    }
}

/// Groups files by class (classes in byte order), sorts each class by file name and keeps
/// the first `limit` of each.
fn group_by_class(files: Vec<SourceFile>, limit: Option<usize>) -> BTreeMap<String, Vec<SourceFile>> {
    let mut by_class: BTreeMap<String, Vec<SourceFile>> = BTreeMap::new();
    for file in files {
        by_class.entry(file.class.clone()).or_default().push(file);
    }
    for files in by_class.values_mut() {
        files.sort_by(|a, b| a.file.cmp(&b.file));
        if let Some(limit) = limit {
            files.truncate(limit);
        }
    }
    by_class
}

/// One decoded file: its pixels, what decoding had to do, and the hash of its bytes.
struct Decoded {
    pixels: Vec<u8>,
    note: DecodeNote,
    hash: [u8; 32],
}

/// Reads (if needed), hashes and decodes one file. Runs on a rayon worker.
fn decode_source(file: &SourceFile, shape: InputShape) -> Result<Decoded> {
    let bytes = file.bytes()?;
    let (pixels, note) = decode_image_as(&bytes, &file.name(), shape)?;
    Ok(Decoded { pixels, note, hash: sha256(&bytes) })
}

/// The sha256 of `bytes` as a plain array.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = Sha256::digest(bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(&digest);
    out
}

/// Puts decoded files together into a [`Dataset`], in order. The first bad file (in dataset
/// order, so the error is the same on every run) stops the load unless `skip_bad` is set.
fn assemble(
    classes: Vec<String>,
    shape: InputShape,
    ordered: &[(u8, SourceFile)],
    mut decoded: Vec<Result<Decoded>>,
    skip_bad: bool,
) -> Result<Dataset> {
    // Gray files stay one plane unless a colour file makes every image three.
    let colour = decoded.iter().any(|d| d.as_ref().is_ok_and(|d| d.note.colour));
    let stored_channels = if colour { 3 } else { 1 };
    if colour {
        for d in decoded.iter_mut().flatten().filter(|d| !d.note.colour) {
            d.pixels = expand_channels(&d.pixels, 3);
        }
    }
    let mut ds = Dataset {
        classes,
        shape,
        stored_channels,
        images: Vec::with_capacity(ordered.len() * stored_channels * shape.plane()),
        labels: Vec::with_capacity(ordered.len()),
        names: Vec::with_capacity(ordered.len()),
        hashes: Vec::with_capacity(ordered.len()),
        report: LoadReport::default(),
    };
    for ((label, file), result) in ordered.iter().zip(decoded) {
        match result {
            Ok(d) => push_image(&mut ds, *label, file.name(), d),
            Err(e) if skip_bad => ds.report.skipped.push((file.name(), format!("{e:#}"))),
            Err(e) => return Err(e),
        }
    }
    check_no_empty_class(&ds)?;
    Ok(ds)
}

fn push_image(ds: &mut Dataset, label: u8, name: String, d: Decoded) {
    ds.images.extend_from_slice(&d.pixels);
    ds.labels.push(label);
    ds.names.push(name);
    ds.hashes.push(d.hash);
    ds.report.converted_to_gray += d.note.converted_to_gray as usize;
    ds.report.resized += d.note.resized as usize;
}

/// After skipping bad files a class may have nothing left: that is an error, not a
/// silently shorter label list.
fn check_no_empty_class(ds: &Dataset) -> Result<()> {
    for (class, count) in ds.classes.iter().zip(ds.class_counts()) {
        if count == 0 {
            bail!("class {class} has no readable images (all were skipped as bad)");
        }
    }
    Ok(())
}

/// Finds the dataset in `dir` (normally `data/`): `dir/MedNIST.tar.gz`, else `dir/MedNIST/`.
pub fn find_default_data(dir: &Path) -> Result<PathBuf> {
    let archive = dir.join("MedNIST.tar.gz");
    if archive.is_file() {
        return Ok(archive);
    }
    let folder = dir.join("MedNIST");
    if folder.is_dir() {
        return Ok(folder);
    }
    bail!(
        "no MedNIST data found (looked for {} and {}): run `medcnn data fetch` \
         (or `medcnn data fetch --from PATH`)",
        archive.display(),
        folder.display()
    )
}

/// A fingerprint of the images (names and bytes), to make sure a split refers to the same data.
/// It does not depend on the input size: the same files give the same split at any size.
pub fn fingerprint(ds: &Dataset) -> String {
    let mut h = Sha256::new();
    for (name, hash) in ds.names.iter().zip(&ds.hashes) {
        h.update(name.as_bytes());
        h.update(hash);
    }
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Loads the data a command names (or `data/`) for a model taking `shape`, with a limit per
/// class, and says what it found.
pub fn load_data(
    path: Option<&Path>,
    limit: Option<usize>,
    skip_bad_images: bool,
    shape: InputShape,
) -> Result<Dataset> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => super::fetch::find_or_fetch_default_data(Path::new("data"))?,
    };
    let t = std::time::Instant::now();
    let ds = load_dataset(&path, &LoadOptions { limit_per_class: limit, skip_bad_images, shape })?;
    let counts = ds.class_counts();
    println!(
        "data: {} images from {} in {:.1} s; classes: {}",
        ds.len(),
        path.display(),
        t.elapsed().as_secs_f64(),
        ds.classes.iter().zip(&counts).map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    );
    let r = &ds.report;
    if r.converted_to_gray > 0 || r.resized > 0 {
        println!(
            "data: {} images converted to gray, {} resized to {}x{}",
            r.converted_to_gray, r.resized, shape.size, shape.size
        );
    }
    for (file, why) in &r.skipped {
        println!("data: skipped {file}: {why}");
    }
    Ok(ds)
}
