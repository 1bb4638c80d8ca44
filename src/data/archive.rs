//! Reading image files straight out of a `.tar.gz`, without extracting anything to disk.
//!
//! What it is: one pass over the gzip stream with the `tar` crate, keeping the bytes of every
//! image entry in memory. The layout is MONAI's, `MedNIST/<Class>/000000.jpeg`, or the same
//! without the top folder, `<Class>/x.jpeg`: an image's class is the folder it sits in, and
//! every image must sit at the same depth under the same top folder.
//!
//! What it is not: an extractor. Nothing is written to disk and no path from the archive is
//! ever joined to a real path, but an entry whose path is absolute or contains `..` still
//! makes the whole archive an error (it is hostile or broken). Links inside the archive are
//! never followed. Non-image entries (`README.md`, folders, hidden files) are ignored.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Component, Path};

use anyhow::{anyhow, bail, Context, Result};
use flate2::read::GzDecoder;
use tar::EntryType;

use super::load::{is_image_name, Payload, SourceFile, MAX_IMAGE_FILE_BYTES};

/// What a failure of the tar or gzip reader most likely means.
const NOT_A_TAR: &str = "truncated, corrupt, or not a tar archive inside the gzip";

/// The two bytes every gzip file starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Lists the image entries of the `.tar.gz` at `path`, with their bytes when `read_bytes`
/// is true (when false, `Payload::InMemory` holds an empty vector: a cheap validity check).
pub fn scan_archive(path: &Path, read_bytes: bool) -> Result<Vec<SourceFile>> {
    let shown = path.display();
    let file = File::open(path).with_context(|| format!("cannot open archive {shown}"))?;
    let mut reader = BufReader::new(file);
    check_gzip_magic(&mut reader, path)?;
    let mut tar = tar::Archive::new(GzDecoder::new(reader));
    let files = read_entries(&mut tar, read_bytes).with_context(|| format!("archive {shown}"))?;
    // The tar reader stops at the end-of-archive marker; read the gzip stream to its end
    // so that its CRC is checked and a truncated tail is noticed.
    io::copy(&mut tar.into_inner(), &mut io::sink())
        .with_context(|| format!("archive {shown} is truncated or corrupt (gzip stream)"))?;
    if files.is_empty() {
        bail!("archive {shown} holds no images (*.jpeg, *.jpg or *.png)");
    }
    Ok(files)
}

/// Fails early, with a clear message, when the file is not gzip at all.
fn check_gzip_magic(reader: &mut BufReader<File>, path: &Path) -> Result<()> {
    use std::io::BufRead;
    let head = reader.fill_buf().with_context(|| format!("cannot read archive {}", path.display()))?;
    if !head.starts_with(&GZIP_MAGIC) {
        bail!("{} is not a gzip'd tar archive (.tar.gz): it does not start with the gzip signature", path.display());
    }
    Ok(())
}

/// Walks every entry once, checking its path and keeping the images.
fn read_entries<R: Read>(tar: &mut tar::Archive<R>, read_bytes: bool) -> Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    let mut layout: Option<Vec<String>> = None; // the folders above the class folders
    for entry in tar.entries().context(NOT_A_TAR)? {
        let mut entry = entry.context(NOT_A_TAR)?;
        let parts = safe_components(&entry)?;
        let Some(file_name) = parts.last() else {
            continue;
        };
        if !is_image_name(file_name) || parts.len() < 2 || is_hidden_path(&parts) {
            continue;
        }
        let entry_name = parts.join("/");
        check_is_plain_file(entry.header().entry_type(), &entry_name)?;
        check_same_layout(&mut layout, &parts, &entry_name)?;
        let bytes = if read_bytes { read_entry(&mut entry, &entry_name)? } else { Vec::new() };
        files.push(SourceFile {
            class: parts[parts.len() - 2].clone(),
            file: file_name.clone(),
            payload: Payload::InMemory(bytes),
        });
    }
    Ok(files)
}

/// The entry's path as plain names, with `.` dropped. An absolute path or `..` is an error.
fn safe_components<R: Read>(entry: &tar::Entry<R>) -> Result<Vec<String>> {
    let path = entry.path().context(NOT_A_TAR)?;
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => parts.push(name.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                bail!("entry {:?} has an absolute path or `..`; refusing to read this archive", path.to_string_lossy())
            }
        }
    }
    Ok(parts)
}

/// True for entries under a hidden folder, or under `__MACOSX/` (macOS zip leftovers).
fn is_hidden_path(parts: &[String]) -> bool {
    parts.iter().any(|p| p.starts_with('.') || p == "__MACOSX")
}

/// An image entry must be a regular file: a link is never followed.
fn check_is_plain_file(kind: EntryType, entry_name: &str) -> Result<()> {
    match kind {
        EntryType::Regular | EntryType::Continuous => Ok(()),
        other => Err(anyhow!("entry {entry_name} is not a regular file ({other:?}); links are not followed")),
    }
}

/// Every image must have the same folders above its class folder (e.g. `MedNIST/`), so
/// that "the folder an image sits in" means the same thing for all of them.
fn check_same_layout(layout: &mut Option<Vec<String>>, parts: &[String], entry_name: &str) -> Result<()> {
    let prefix = &parts[..parts.len() - 2];
    match layout {
        None => *layout = Some(prefix.to_vec()),
        Some(expected) if expected.as_slice() == prefix => {}
        Some(expected) => bail!(
            "entry {entry_name} is not under the same top folder as the others \
             (expected {:?}/<Class>/<file>)",
            expected.join("/")
        ),
    }
    Ok(())
}

/// Reads one entry's bytes, refusing absurdly large ones.
fn read_entry<R: Read>(entry: &mut tar::Entry<R>, entry_name: &str) -> Result<Vec<u8>> {
    let size = entry.header().size().context(NOT_A_TAR)?;
    if size > MAX_IMAGE_FILE_BYTES {
        bail!("entry {entry_name} is {size} bytes; images over {MAX_IMAGE_FILE_BYTES} bytes are refused");
    }
    let mut bytes = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut bytes).with_context(|| format!("cannot read entry {entry_name} ({NOT_A_TAR})"))?;
    Ok(bytes)
}
