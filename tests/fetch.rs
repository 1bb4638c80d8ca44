//! Tests of `medcnn::data::fetch`, `import_archive` and the download a plain `medcnn train` does
//! when it finds no data (`find_or_fetch_default_data`), against a tiny HTTP server on loopback.
//!
//! What it is: a std-only HTTP/1.1 server on `127.0.0.1:0` in a thread, serving a small
//! MedNIST-like `.tar.gz` built here: `/good` (the archive), `/corrupt` (one byte changed),
//! `/notgz` (text) and anything else a 404. The server accepts a bounded number of
//! connections and stops by itself after a deadline or when the test drops it.
//!
//! What it is not: a test that touches the network beyond 127.0.0.1, or the real MedNIST.

mod common;

use std::io::{BufRead, BufReader, Cursor, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::TempDir;
use flate2::write::GzEncoder;
use flate2::Compression;
use image::{DynamicImage, GrayImage, ImageFormat};
use md5::{Digest, Md5};
use medcnn::data::{fetch, file_md5, find_or_fetch_default_data, import_archive, load_dataset, LoadOptions};

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

fn png(value: u8) -> Vec<u8> {
    let image = DynamicImage::ImageLuma8(GrayImage::from_pixel(64, 64, image::Luma([value])));
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A MONAI-layout archive with `images_per_class` PNGs in each of `classes`.
fn archive(classes: &[&str], images_per_class: u8) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    for (c, class) in classes.iter().enumerate() {
        for i in 0..images_per_class {
            let bytes = png(c as u8 * 40 + i);
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(bytes.len() as u64);
            let path = format!("MedNIST/{class}/{i:06}.png");
            builder.append_data(&mut h, path, bytes.as_slice()).unwrap();
        }
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP server on loopback
// ---------------------------------------------------------------------------------------

/// Serves `good` at `/good`, a corrupted copy at `/corrupt`, text at `/notgz`, 404 otherwise.
struct TestServer {
    base: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The server gives up after this long even if nobody stops it.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);
/// ... or after this many connections.
const MAX_CONNECTIONS: usize = 50;

impl TestServer {
    fn start(good: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || serve(listener, good, stop_flag));
        TestServer { base, stop, thread: Some(thread) }
    }

    fn url(&self, route: &str) -> String {
        format!("{}{route}", self.base)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(listener: TcpListener, good: Vec<u8>, stop: Arc<AtomicBool>) {
    let deadline = Instant::now() + SERVER_LIFETIME;
    let mut served = 0;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && served < MAX_CONNECTIONS {
        match listener.accept() {
            Ok((stream, _)) => {
                served += 1;
                let _ = answer(stream, &good);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
}

fn answer(stream: TcpStream, good: &[u8]) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let route = read_request_path(&stream)?;
    let (status, body): (&str, Vec<u8>) = match route.as_str() {
        "/good" => ("200 OK", good.to_vec()),
        "/corrupt" => {
            let mut bad = good.to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 0xFF;
            ("200 OK", bad)
        }
        "/notgz" => ("200 OK", b"<html>not an archive</html>".to_vec()),
        _ => ("404 Not Found", b"not found".to_vec()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()
}

/// Reads the request line and headers (at most 100 lines) and returns the path.
fn read_request_path(stream: &TcpStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    for _ in 0..100 {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" {
            break;
        }
    }
    Ok(request_line.split_whitespace().nth(1).unwrap_or("/").to_string())
}

// ---------------------------------------------------------------------------------------
// fetch
// ---------------------------------------------------------------------------------------

#[test]
fn fetch_downloads_and_verifies_md5() {
    let good = archive(&["A", "B", "C"], 3);
    let server = TestServer::start(good.clone());
    let dest = TempDir::new("good");
    let expected = md5_hex(&good);
    let path = fetch(&server.url("/good"), Some(&expected), dest.path(), false).unwrap();
    assert_eq!(path, dest.path().join("MedNIST.tar.gz"));
    assert_eq!(std::fs::read(&path).unwrap(), good);
    assert_eq!(files_in(dest.path()), ["MedNIST.tar.gz"], "no .part left");
    assert_eq!(file_md5(&path).unwrap(), expected);
    let ds = load_dataset(&path, &LoadOptions::default()).unwrap();
    assert_eq!(ds.class_counts(), [3, 3, 3]);
    // Upper-case checksums and a progress bar (hidden off a terminal) are fine too.
    let upper = expected.to_uppercase();
    fetch(&server.url("/good"), Some(&upper), dest.path(), true).unwrap();
}

#[test]
fn fetch_into_a_new_folder_creates_it() {
    let good = archive(&["A", "B"], 2);
    let server = TestServer::start(good.clone());
    let dest = TempDir::new("nested");
    let nested = dest.path().join("data").join("deeper");
    let path = fetch(&server.url("/good"), Some(&md5_hex(&good)), &nested, false).unwrap();
    assert!(path.is_file());
}

#[test]
fn corrupted_download_is_an_md5_error_and_leaves_nothing() {
    let good = archive(&["A", "B"], 2);
    let server = TestServer::start(good.clone());
    let dest = TempDir::new("corrupt");
    let expected = md5_hex(&good);
    let err = fetch(&server.url("/corrupt"), Some(&expected), dest.path(), false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("md5") && msg.contains(&expected), "{msg}");
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xFF;
    assert!(msg.contains(&md5_hex(&bad)), "actual md5 in {msg}");
    assert!(files_in(dest.path()).is_empty(), "{:?}", files_in(dest.path()));
}

#[test]
fn a_failed_download_keeps_the_previous_archive() {
    let good = archive(&["A", "B"], 2);
    let server = TestServer::start(good.clone());
    let dest = TempDir::new("keep");
    let expected = md5_hex(&good);
    fetch(&server.url("/good"), Some(&expected), dest.path(), false).unwrap();
    assert!(fetch(&server.url("/corrupt"), Some(&expected), dest.path(), false).is_err());
    assert_eq!(files_in(dest.path()), ["MedNIST.tar.gz"]);
    assert_eq!(std::fs::read(dest.path().join("MedNIST.tar.gz")).unwrap(), good);
}

#[test]
fn http_404_names_the_url_and_status() {
    let server = TestServer::start(archive(&["A", "B"], 1));
    let dest = TempDir::new("404");
    let url = server.url("/missing");
    let err = fetch(&url, Some("0123"), dest.path(), false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("404") && msg.contains(&url), "{msg}");
    assert!(files_in(dest.path()).is_empty());
}

#[test]
fn without_md5_the_download_must_still_be_an_archive() {
    let good = archive(&["A", "B"], 2);
    let server = TestServer::start(good.clone());
    let dest = TempDir::new("nomd5");
    let path = fetch(&server.url("/good"), None, dest.path(), false).unwrap();
    assert_eq!(std::fs::read(path).unwrap(), good);
    let other = TempDir::new("nomd5-bad");
    let err = fetch(&server.url("/notgz"), None, other.path(), false).unwrap_err();
    assert!(format!("{err:#}").contains("gzip"), "{err:#}");
    assert!(files_in(other.path()).is_empty());
}

#[test]
fn connection_refused_names_the_url() {
    // Bind and drop a listener to get a loopback port that nobody is listening on.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/MedNIST.tar.gz");
    let dest = TempDir::new("refused");
    let err = fetch(&url, None, dest.path(), false).unwrap_err();
    assert!(format!("{err:#}").contains(&url), "{err:#}");
    assert!(files_in(dest.path()).is_empty());
}

// ---------------------------------------------------------------------------------------
// import_archive
// ---------------------------------------------------------------------------------------

#[test]
fn import_copies_a_valid_archive() {
    let src = TempDir::new("import-src");
    let dest = TempDir::new("import-dest");
    let bytes = archive(&["Hand", "CXR"], 2);
    let from = src.path().join("my-copy.tgz");
    std::fs::write(&from, &bytes).unwrap();
    let path = import_archive(&from, dest.path()).unwrap();
    assert_eq!(path, dest.path().join("MedNIST.tar.gz"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(files_in(dest.path()), ["MedNIST.tar.gz"]);
    assert!(from.is_file(), "the source is left alone");
}

#[test]
fn import_refuses_bad_archives_and_leaves_nothing() {
    let src = TempDir::new("import-bad");
    let dest = TempDir::new("import-bad-dest");
    let not_gz = src.path().join("x.tar.gz");
    std::fs::write(&not_gz, b"plain text").unwrap();
    let one_class = src.path().join("one.tar.gz");
    std::fs::write(&one_class, archive(&["Hand"], 3)).unwrap();
    let truncated = src.path().join("cut.tar.gz");
    let bytes = archive(&["A", "B"], 3);
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let missing = src.path().join("missing.tar.gz");
    for (path, needle) in
        [(&not_gz, "gzip"), (&one_class, "two"), (&truncated, "cut.tar.gz"), (&missing, "missing.tar.gz")]
    {
        let err = import_archive(path, dest.path()).unwrap_err();
        assert!(format!("{err:#}").contains(needle), "{}: {err:#}", path.display());
        assert!(files_in(dest.path()).is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// `medcnn train` with no data: download into data/, then train
// ---------------------------------------------------------------------------------------

/// Runs `medcnn ARGS` in `cwd` with MedNIST's URL and md5 pointed at the test server.
fn medcnn_with_mirror(cwd: &Path, url: &str, md5: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::BIN)
        .args(args)
        .current_dir(cwd)
        .env("MEDCNN_MEDNIST_URL", url)
        .env("MEDCNN_MEDNIST_MD5", md5)
        .output()
        .expect("run medcnn")
}

/// The README's first command, `medcnn train` with nothing given, in a folder with no data:
/// it says it is downloading, puts the archive in data/ (md5-checked) and trains on it.
#[test]
fn train_with_no_data_downloads_into_data_then_trains() {
    let good = archive(&["A", "B", "C"], 10);
    let server = TestServer::start(good.clone());
    let cwd = TempDir::new("train-fetch");
    let args = ["train", "--epochs", "1", "--batch-size", "8", "--threads", "2", "--out", "out"];
    let out = medcnn_with_mirror(cwd.path(), &server.url("/good"), &md5_hex(&good), &args);
    let stdout = common::assert_ok(&out);
    assert!(
        stdout.contains("data: no MedNIST in data (")
            && stdout.contains(&format!("downloading it from {}", server.url("/good"))),
        "no message saying it downloads:\n{stdout}"
    );
    assert_eq!(files_in(&cwd.join("data")), ["MedNIST.tar.gz"]);
    assert_eq!(std::fs::read(cwd.join("data/MedNIST.tar.gz")).unwrap(), good);
    assert!(stdout.contains("data: 30 images from data/MedNIST.tar.gz"), "{stdout}");
    assert!(cwd.join("out/model.safetensors").is_file(), "it trained:\n{stdout}");

    // The second time the archive is there: no download (the server's files are not asked for).
    let again = medcnn_with_mirror(cwd.path(), &server.url("/missing"), "0", &args);
    let stdout = common::assert_ok(&again);
    assert!(!stdout.contains("downloading"), "{stdout}");
}

/// A corrupted download (md5 mismatch) or a failed one (404) stops `train` with an error that
/// names the URL and the problem, and leaves no data/ folder behind, so the next run tries again.
#[test]
fn train_with_a_bad_download_fails_clearly_and_leaves_nothing() {
    let good = archive(&["A", "B"], 4);
    let server = TestServer::start(good.clone());
    let expected = md5_hex(&good);
    let args = ["train", "--epochs", "1", "--threads", "2", "--out", "out"];
    for (route, needles) in [("/corrupt", vec!["md5", expected.as_str()]), ("/missing", vec!["404"])] {
        let cwd = TempDir::new("train-fetch-bad");
        let url = server.url(route);
        let out = medcnn_with_mirror(cwd.path(), &url, &expected, &args);
        let mut want = vec![url.as_str(), "no MedNIST data in data"];
        want.extend(needles);
        common::assert_fails(&out, &want);
        assert!(!cwd.join("data").exists(), "{route}: data/ left behind: {:?}", files_in(&cwd.join("data")));
        assert!(!cwd.join("out/model.safetensors").exists());
    }
}

/// The library call: a data folder that holds the archive or a MedNIST/ folder is used as it is,
/// with no download.
#[test]
fn find_or_fetch_uses_what_is_there() {
    let dir = TempDir::new("find-or-fetch");
    std::fs::write(dir.join("MedNIST.tar.gz"), b"anything").unwrap();
    assert_eq!(find_or_fetch_default_data(dir.path()).unwrap(), dir.join("MedNIST.tar.gz"));
    let folder = TempDir::new("find-or-fetch-folder");
    std::fs::create_dir(folder.join("MedNIST")).unwrap();
    assert_eq!(find_or_fetch_default_data(folder.path()).unwrap(), folder.join("MedNIST"));
}
