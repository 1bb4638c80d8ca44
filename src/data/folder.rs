//! Finding the image files in a folder of class folders: `ROOT/<Class>/*.jpeg|*.jpg|*.png`.
//!
//! What it is: a directory walk, one level of class folders deep, that returns the image
//! files it found (not their bytes: those are read later, in parallel, by `load`).
//! `ROOT` may also be a wrapper holding a single folder of class folders, as in
//! `data/MedNIST/<Class>/...`: the walk then steps into that folder.
//!
//! What it is not: it does not decode, sort or limit (see `load`). It does not recurse
//! below the class folders. Hidden entries (`.DS_Store`, `.git/`) and `__MACOSX/` are
//! ignored, and so are files that are not images by extension (e.g. `README.md`).
//! Symbolic links are followed; a link loop or an unreadable entry is an error naming it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::load::{is_image_name, Payload, SourceFile};

/// Lists every image file under `root`, with its class (the name of its folder).
pub fn scan_folder(root: &Path) -> Result<Vec<SourceFile>> {
    let root = step_into_wrapper(root)?;
    let class_dirs = subfolders(&root)?;
    if class_dirs.is_empty() {
        bail!("data folder {} is empty: expected one folder per class, each holding images", root.display());
    }
    let mut files = Vec::new();
    for dir in class_dirs {
        files.extend(images_in_class(&dir)?);
    }
    Ok(files)
}

/// If `root` holds exactly one folder and that folder holds folders but no images,
/// it is a wrapper (like `data/` around `MedNIST/`): return the inner folder.
fn step_into_wrapper(root: &Path) -> Result<PathBuf> {
    let subs = subfolders(root)?;
    if let [only] = subs.as_slice() {
        let holds_folders = !subfolders(only)?.is_empty();
        let holds_images = !image_files(only)?.is_empty();
        if holds_folders && !holds_images {
            return Ok(only.clone());
        }
    }
    Ok(root.to_path_buf())
}

/// The image files of one class folder; a class folder without any is an error.
fn images_in_class(dir: &Path) -> Result<Vec<SourceFile>> {
    let class = lossy_file_name(dir);
    let images = image_files(dir)?;
    if images.is_empty() {
        bail!("class folder {} has no images (*.jpeg, *.jpg or *.png)", dir.display());
    }
    Ok(images
        .into_iter()
        .map(|path| SourceFile { class: class.clone(), file: lossy_file_name(&path), payload: Payload::OnDisk(path) })
        .collect())
}

/// The visible subfolders of `dir` (following symlinks).
fn subfolders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (path, meta) in visible_entries(dir)? {
        let name = lossy_file_name(&path);
        if meta.is_dir() && name != "__MACOSX" {
            out.push(path);
        }
    }
    Ok(out)
}

/// The files in `dir` whose names say they are images (following symlinks).
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (path, meta) in visible_entries(dir)? {
        if meta.is_file() && is_image_name(&lossy_file_name(&path)) {
            out.push(path);
        }
    }
    Ok(out)
}

/// Every entry of `dir` whose name does not start with `.`, with its metadata.
/// `fs::metadata` follows symlinks, so a dangling link or a link loop shows up here as an
/// error naming the entry, rather than as an endless walk.
fn visible_entries(dir: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>> {
    let reader = fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    let mut out = Vec::new();
    for entry in reader {
        let entry = entry.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let path = entry.path();
        if lossy_file_name(&path).starts_with('.') {
            continue;
        }
        let meta = fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        out.push((path, meta));
    }
    Ok(out)
}

/// The last component of `path` as a `String`; bytes that are not UTF-8 become `U+FFFD`.
fn lossy_file_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}
