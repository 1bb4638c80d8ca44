//! Getting `MedNIST.tar.gz` into the data folder: downloaded (with an md5 check) or copied
//! from a local file.
//!
//! What it is: a streaming HTTP(S) download with `ureq` and an `indicatif` progress bar,
//! written to `MedNIST.tar.gz.part` and renamed to `MedNIST.tar.gz` only once it is complete
//! and verified, so a half-finished or corrupted download never looks like the real thing.
//! `import_archive` does the same for a copy the user already has, and
//! `find_or_fetch_default_data` downloads MedNIST when `train` finds no data.
//!
//! What it is not: it does not extract or decode anything (`load` reads the archive as it
//! is) and does not retry or resume; run it again.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use md5::{Digest, Md5};

use super::archive;
use super::load::find_default_data;

/// Where MONAI publishes MedNIST.
pub const MEDNIST_URL: &str =
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/MedNIST.tar.gz";
/// The md5 MONAI publishes for that file.
pub const MEDNIST_MD5: &str = "0bc7306e7427e00ad1c5526a6677552d";

/// Set to use a mirror of MedNIST instead of MONAI's release when `train` downloads it.
pub const MEDNIST_URL_ENV: &str = "MEDCNN_MEDNIST_URL";
/// The md5 the mirror's file must have (default: [`MEDNIST_MD5`], a true mirror's).
pub const MEDNIST_MD5_ENV: &str = "MEDCNN_MEDNIST_MD5";

/// The file name the archive gets in the data folder.
const ARCHIVE_NAME: &str = "MedNIST.tar.gz";
const PART_NAME: &str = "MedNIST.tar.gz.part";

/// Downloads `url` to `dest_dir/MedNIST.tar.gz` and returns that path.
///
/// With `expected_md5`, the download is checked against it; on a mismatch nothing is left
/// behind and the error gives both checksums. Without it, the file is instead checked to be
/// a readable `.tar.gz` with at least two class folders.
pub fn fetch(url: &str, expected_md5: Option<&str>, dest_dir: &Path, progress: bool) -> Result<PathBuf> {
    fs::create_dir_all(dest_dir).with_context(|| format!("cannot create data folder {}", dest_dir.display()))?;
    let part = PartFile::new(dest_dir.join(PART_NAME));
    let actual_md5 = download(url, part.path(), progress)?;
    match expected_md5 {
        Some(expected) if !expected.trim().eq_ignore_ascii_case(&actual_md5) => bail!(
            "checksum mismatch for {url}: expected md5 {expected}, got md5 {actual_md5} \
             (the download was deleted; try again)"
        ),
        Some(_) => {}
        None => check_archive(part.path())?,
    }
    part.rename_to(&dest_dir.join(ARCHIVE_NAME))
}

/// The data a plain `medcnn train` uses: `dir/MedNIST.tar.gz` or `dir/MedNIST/` when one is
/// there (see [`find_default_data`]); otherwise MedNIST is first downloaded into `dir`, exactly
/// as `medcnn data fetch` does (md5-checked, with a progress bar on a terminal), saying so.
///
/// The download comes from MONAI's release, or from `$MEDCNN_MEDNIST_URL` (a mirror) checked
/// against `$MEDCNN_MEDNIST_MD5` (default: the release's md5). A failed or corrupted download
/// is an error naming the URL, and leaves nothing in `dir`: no archive, no `.part` file, and not
/// even `dir` itself when this call created it.
pub fn find_or_fetch_default_data(dir: &Path) -> Result<PathBuf> {
    if let Ok(found) = find_default_data(dir) {
        return Ok(found);
    }
    let url = std::env::var(MEDNIST_URL_ENV).unwrap_or_else(|_| MEDNIST_URL.to_string());
    let md5 = std::env::var(MEDNIST_MD5_ENV).unwrap_or_else(|_| MEDNIST_MD5.to_string());
    println!(
        "data: no MedNIST in {} (neither MedNIST.tar.gz nor MedNIST/): downloading it from {url} \
         (about 60 MB, md5-checked); `--data PATH` trains on a copy you already have",
        dir.display()
    );
    let existed = dir.exists();
    match fetch(&url, Some(&md5), dir, true) {
        Ok(path) => {
            println!("data: saved {}", path.display());
            Ok(path)
        }
        Err(e) => {
            if !existed {
                let _ = fs::remove_dir(dir); // only if still empty, which fetch leaves it
            }
            Err(e.context(format!("no MedNIST data in {} and the download failed", dir.display())))
        }
    }
}

/// Copies the local archive `from` to `dest_dir/MedNIST.tar.gz` (via a `.part` file and a
/// rename) after checking that it is a readable `.tar.gz` with at least two class folders.
/// There is no checksum: local copies are often repacked and differ byte-wise.
pub fn import_archive(from: &Path, dest_dir: &Path) -> Result<PathBuf> {
    check_archive(from)?;
    fs::create_dir_all(dest_dir).with_context(|| format!("cannot create data folder {}", dest_dir.display()))?;
    let part = PartFile::new(dest_dir.join(PART_NAME));
    fs::copy(from, part.path())
        .with_context(|| format!("cannot copy {} to {}", from.display(), part.path().display()))?;
    part.rename_to(&dest_dir.join(ARCHIVE_NAME))
}

/// The md5 of a file, as 32 lowercase hex digits.
pub fn file_md5(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Md5::new();
    io::copy(&mut file, &mut HashWriter(&mut hasher)).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&hasher.finalize()))
}

/// Checks that `path` is a `.tar.gz` whose images sit in at least two class folders.
fn check_archive(path: &Path) -> Result<()> {
    let files = archive::scan_archive(path, false)?;
    let mut classes: Vec<&str> = files.iter().map(|f| f.class.as_str()).collect();
    classes.sort_unstable();
    classes.dedup();
    if classes.len() < 2 {
        bail!(
            "archive {} has images in {} class folder(s) ({}); need at least two",
            path.display(),
            classes.len(),
            classes.join(", ")
        );
    }
    Ok(())
}

/// Streams `url` into the file at `to`, returning the md5 of what was written.
fn download(url: &str, to: &Path, progress: bool) -> Result<String> {
    let mut response = http_agent().get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => {
            anyhow::anyhow!("download of {url} failed: HTTP status {code}")
        }
        other => anyhow::anyhow!("download of {url} failed: {other}"),
    })?;
    let body = response.body_mut();
    let bar = progress_bar(body.content_length(), progress);
    let mut reader = body.as_reader();
    let file = File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    let mut writer = BufWriter::new(file);
    let md5 =
        copy_hashing(&mut reader, &mut writer, &bar).with_context(|| format!("download of {url} was interrupted"))?;
    writer
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot write {}", to.display()))?;
    bar.finish_and_clear();
    Ok(md5)
}

/// An HTTP client with timeouts, so a dead or stalled server cannot hang `fetch` forever
/// (a slow but live download is fine: only a read that waits a whole minute fails).
fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// A byte-counting bar when the size is known, a spinner when not, nothing if `!show`.
fn progress_bar(len: Option<u64>, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let (bar, template) = match len {
        Some(len) => (ProgressBar::new(len), "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"),
        None => (ProgressBar::new_spinner(), "{spinner} {bytes} {bytes_per_sec}"),
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Copies `reader` to `writer`, hashing as it goes and advancing `bar`.
fn copy_hashing(reader: &mut impl Read, writer: &mut impl Write, bar: &ProgressBar) -> io::Result<String> {
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Feeds everything written to it into an md5 hasher (so `io::copy` can hash a file).
struct HashWriter<'a>(&'a mut Md5);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `.part` file that deletes itself when dropped, unless it was renamed into place.
/// This is how every error path (a failed download, a bad checksum, a failed copy)
/// leaves no partial file behind without each one having to remember to clean up.
struct PartFile {
    path: PathBuf,
    keep: bool,
}

impl PartFile {
    fn new(path: PathBuf) -> Self {
        PartFile { path, keep: false }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Atomically moves the finished file to `dest` (replacing any old one).
    fn rename_to(mut self, dest: &Path) -> Result<PathBuf> {
        fs::rename(&self.path, dest)
            .with_context(|| format!("cannot rename {} to {}", self.path.display(), dest.display()))?;
        self.keep = true;
        Ok(dest.to_path_buf())
    }
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}
