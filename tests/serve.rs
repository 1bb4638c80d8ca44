//! `medcnn serve` over real HTTP on loopback: good images (PNG, JPEG, raw or multipart), every
//! kind of refusal (text, truncated JPEG, decompression bomb, too large, wrong method, unknown
//! path, malformed requests, slow clients), the Grad-CAM PNG, a burst of 200 concurrent requests
//! from 16 clients, a panic inside a handler, and the binary itself.
//!
//! The model has random weights (saved in the model format, no training): what is tested is the
//! server, and a random model still gives a deterministic answer for each image.
//! `cargo test --release --test serve -- --nocapture` shows the timings.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use medcnn::backend::{Device, NamedTensor};
use medcnn::serve::{start, start_with, weights_id, ServeConfig, ServerHandle};
use serde_json::Value;

use common::{http_agent, random_model_file, MEDNIST_CLASSES};

const CLASSES: [&str; 6] = MEDNIST_CLASSES;
const MAX_UPLOAD: usize = 8 << 20;

/// A model file with random weights (written once per test run) and its weights.
fn model() -> &'static (PathBuf, Vec<NamedTensor>) {
    static MODEL: OnceLock<(PathBuf, Vec<NamedTensor>)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-test");
        std::fs::create_dir_all(&dir).unwrap();
        // One file per test process; those of runs over an hour old are removed.
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a > Duration::from_secs(3600)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let path = dir.join(format!("model-{}.safetensors", std::process::id()));
        let weights = random_model_file(&path, 7);
        (path, weights)
    })
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn server() -> ServerHandle {
    start(&model().0, loopback(), Device::Cpu).unwrap()
}

fn agent() -> ureq::Agent {
    http_agent()
}

/// Status, headers we care about, body.
struct Reply {
    status: u16,
    content_type: String,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let r = r.expect("the request failed at the transport level");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = r.into_body().with_config().limit(64 << 20).read_to_vec().unwrap();
    Reply { status, content_type, headers, body }
}

fn get(a: &ureq::Agent, url: &str) -> Reply {
    reply(a.get(url).call())
}

fn post(a: &ureq::Agent, url: &str, content_type: &str, body: &[u8]) -> Reply {
    reply(a.post(url).header("Content-Type", content_type).send(body))
}

/// A 64x64 gray test picture; `seed` changes it.
fn picture(seed: u32) -> image::GrayImage {
    image::GrayImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as i32 - 20 - seed as i32 * 5, y as i32 - 32);
        let disc = if dx * dx + dy * dy < 200 { 120 } else { 0 };
        image::Luma([((x * 2 + y * seed + disc) % 256) as u8])
    })
}

fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn png(seed: u32) -> Vec<u8> {
    encode(&image::DynamicImage::ImageLuma8(picture(seed)), image::ImageFormat::Png)
}

fn jpeg(seed: u32) -> Vec<u8> {
    encode(&image::DynamicImage::ImageLuma8(picture(seed)), image::ImageFormat::Jpeg)
}

fn multipart(boundary: &str, filename: &str, data: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nfrom the test\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(data);
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

/// Checks a prediction's JSON and returns (class, probabilities in class order).
fn check_prediction(j: &Value, model_id: &str) -> (String, Vec<f64>) {
    let classes: Vec<String> = serde_json::from_value(j["classes"].clone()).unwrap();
    assert_eq!(classes, CLASSES);
    let probs: Vec<f64> = classes.iter().map(|c| j["probabilities"][c].as_f64().unwrap()).collect();
    assert_eq!(j["probabilities"].as_object().unwrap().len(), CLASSES.len());
    let sum: f64 = probs.iter().sum();
    assert!((sum - 1.0).abs() < 1e-9, "probabilities sum to {sum}");
    assert!(probs.iter().all(|p| (0.0..=1.0).contains(p)));
    let best = (0..probs.len()).fold(0, |b, k| if probs[k] > probs[b] { k } else { b });
    let class = j["class"].as_str().unwrap().to_string();
    assert_eq!(class, CLASSES[best]);
    assert_eq!(j["class_index"].as_u64(), Some(best as u64));
    assert_eq!(j["probability"].as_f64(), Some(probs[best]));
    assert_eq!(j["model_id"].as_str(), Some(model_id));
    (class, probs)
}

fn check_error(r: &Reply, status: u16, contains: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.content_type.starts_with("application/json"), "content type {}", r.content_type);
    let j = r.json();
    let msg = j["error"].as_str().unwrap_or_else(|| panic!("no error message in {j}"));
    assert!(msg.to_lowercase().contains(&contains.to_lowercase()), "error {msg:?} does not mention {contains:?}");
    assert_eq!(j["status"].as_u64(), Some(status as u64));
}

/// Sends raw bytes and returns the status line and the whole answer.
fn raw(addr: SocketAddr, bytes: &[u8]) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    (text.lines().next().unwrap_or_default().to_string(), text)
}

#[test]
fn predicts_png_and_jpeg_sent_raw_or_as_multipart() {
    let srv = server();
    let (url, a) = (srv.url(), agent());
    let id = weights_id(&model().1);
    assert_eq!(id.len(), 16);
    assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(srv.model_id(), id);

    let h = get(&a, &format!("{url}/health"));
    assert_eq!(h.status, 200);
    let hj = h.json();
    assert_eq!(hj["status"], "ok");
    assert_eq!(hj["model_id"].as_str(), Some(id.as_str()));
    assert_eq!(hj["max_upload_bytes"].as_u64(), Some(MAX_UPLOAD as u64));

    let img = png(1);
    let r = post(&a, &format!("{url}/api/predict"), "image/png", &img);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let (class, probs) = check_prediction(&r.json(), &id);
    assert_eq!(r.json()["image"]["converted_to_gray"], false);
    assert_eq!(r.json()["image"]["resized"], false);

    // The same bytes as a multipart form give the same answer, and the file's name.
    let form = multipart("----medcnnTestBoundary7", "scan 1.png", &img);
    let r = post(&a, &format!("{url}/api/predict"), "multipart/form-data; boundary=----medcnnTestBoundary7", &form);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(check_prediction(&r.json(), &id), (class, probs));
    assert_eq!(r.json()["image"]["name"], "scan 1.png");

    // JPEG, with no Content-Type at all (the format comes from the bytes).
    let r = reply(a.post(format!("{url}/api/predict")).send(&jpeg(2)[..]));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    check_prediction(&r.json(), &id);

    // A colour image of another size is converted and resized, and says so.
    let rgb = image::RgbImage::from_fn(100, 80, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let r = post(&a, &format!("{url}/api/predict"), "image/png", &encode(&rgb.into(), image::ImageFormat::Png));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["image"]["converted_to_gray"], true);
    assert_eq!(r.json()["image"]["resized"], true);

    // The page: self-contained, with the elements the browser test reads.
    let page = get(&a, &format!("{url}/"));
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"));
    let html = String::from_utf8(page.body.clone()).unwrap();
    assert!(html.contains("id=\"file-input\"") && html.contains("/api/predict") && html.contains("/api/explain"));
    assert!(!html.contains("http://") && !html.contains("https://"), "the page must not load anything from elsewhere");
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'none'"));
    let head = reply(a.head(format!("{url}/")).call());
    assert_eq!((head.status, head.body.len()), (200, 0));
    srv.shutdown();
}

#[test]
fn refuses_what_is_not_a_readable_image_with_json_errors() {
    let srv = server();
    let (url, a) = (srv.url(), agent());
    let predict = format!("{url}/api/predict");

    check_error(
        &post(&a, &predict, "text/plain", b"this is a radiology report, not an image\n"),
        400,
        "looks like text",
    );
    check_error(&post(&a, &predict, "image/png", b""), 400, "empty");
    let j = jpeg(3);
    check_error(&post(&a, &predict, "image/jpeg", &j[..j.len() / 2]), 400, "truncated");
    let p = png(3);
    check_error(&post(&a, &predict, "image/png", &p[..p.len() / 2]), 400, "cannot decode");
    check_error(&post(&a, &predict, "image/png", &decompression_bomb()), 400, "too large");

    // Multipart without a boundary, cut short, or without a file.
    check_error(&post(&a, &predict, "multipart/form-data", b"--x\r\n"), 400, "boundary");
    let form = multipart("b0", "a.png", &p);
    check_error(
        &post(&a, &predict, "multipart/form-data; boundary=b0", &form[..form.len() - 10]),
        400,
        "closing boundary",
    );
    let text_only = b"--b1\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b1\r\nContent-Disposition: form-data; name=\"b\"\r\n\r\n2\r\n--b1--\r\n";
    check_error(&post(&a, &predict, "multipart/form-data; boundary=b1", text_only), 400, "no file");

    // One byte over the limit: 413, answered even though the client sends its whole body first.
    let t = Instant::now();
    let big = vec![0u8; MAX_UPLOAD + 1];
    check_error(&post(&a, &predict, "image/png", &big), 413, "limit is 8 MiB");
    println!("413 for {} bytes in {:.2} s", big.len(), t.elapsed().as_secs_f64());
    // Exactly the limit is accepted (and then is not an image).
    check_error(&post(&a, &predict, "image/png", &big[..MAX_UPLOAD]), 400, "cannot decode");

    // Wrong methods and unknown paths.
    let r = get(&a, &predict);
    check_error(&r, 405, "use POST");
    assert_eq!(r.header("allow").as_deref(), Some("POST"));
    check_error(&get(&a, &format!("{url}/api/explain")), 405, "POST");
    let r = post(&a, &format!("{url}/health"), "text/plain", b"x");
    check_error(&r, 405, "GET");
    assert_eq!(r.header("allow").as_deref(), Some("GET, HEAD"));
    check_error(&get(&a, &format!("{url}/etc/passwd")), 404, "no such page");

    // Malformed HTTP, a hostile Content-Length, chunked bodies, oversized headers.
    let addr = srv.addr();
    let (line, body) = raw(addr, b"POST /api/predict HTTP/1.1\r\nContent-Length: 1000000000000000\r\n\r\nabc");
    assert!(line.contains("413") && body.contains("limit is 8 MiB"), "{body}");
    assert!(raw(addr, b"NONSENSE\r\n\r\n").0.contains("400"));
    // hyper's parser takes any version but 1.0 and 1.1 for a malformed request line: 400 (the
    // hand-written server said 505); either refuses it.
    let version = raw(addr, b"GET / HTTP/2.0\r\n\r\n").0;
    assert!(version.contains("400") || version.contains("505"), "{version}");
    assert!(raw(addr, b"POST /api/predict HTTP/1.1\r\nContent-Length: x\r\n\r\n").0.contains("400"));
    assert!(raw(addr, b"POST /api/predict HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")
        .0
        .contains("400"));
    assert!(raw(addr, b"POST /api/predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .0
        .contains("411"));
    let mut huge_head = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
    huge_head.extend(std::iter::repeat_n(b'a', 20_000));
    huge_head.extend_from_slice(b"\r\n\r\n");
    assert!(raw(addr, &huge_head).0.contains("431"));
    // A body that stops short (the client hangs up after 3 of 100 bytes): a 400 that says so, or
    // (the hand-written server) a closed connection; never a hang or a prediction.
    let (line, body) = raw(addr, b"POST /api/predict HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc");
    assert!(line.is_empty() || (line.contains("400") && body.contains("cut short")), "{body}");

    // After all of that, it still answers.
    let r = post(&a, &predict, "image/png", &png(4));
    assert_eq!(r.status, 200);
    srv.shutdown();
}

/// A valid PNG header claiming 100000 x 100000 pixels, with a few bytes of data.
fn decompression_bomb() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut h = crc32fast::Hasher::new();
        h.update(kind);
        h.update(data);
        out.extend_from_slice(&h.finalize().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![0u8; 1 << 16]).unwrap();
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", b"");
    out
}

#[test]
fn explain_returns_the_heatmap_as_a_png() {
    let srv = server();
    let (url, a) = (srv.url(), agent());
    let img = png(5);
    let predicted =
        post(&a, &format!("{url}/api/predict"), "image/png", &img).json()["class"].as_str().unwrap().to_string();

    for (query, side) in [("", 256), ("?scale=2", 128), ("?scale=1", 64)] {
        let r = post(&a, &format!("{url}/api/explain{query}"), "image/png", &img);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.content_type, "image/png");
        assert!(r.body.starts_with(b"\x89PNG\r\n\x1a\n"));
        let decoded = image::load_from_memory(&r.body).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (side, side));
        assert_eq!(r.header("x-medcnn-class"), Some(predicted.clone()));
        assert_eq!(r.header("x-medcnn-model-id").as_deref(), Some(srv.model_id()));
    }
    // Multipart works here too, and another class can be explained.
    let form = multipart("zz", "x.png", &img);
    let r = post(&a, &format!("{url}/api/explain?target=headct"), "multipart/form-data; boundary=zz", &form);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-medcnn-target").as_deref(), Some("HeadCT"));

    check_error(&post(&a, &format!("{url}/api/explain?scale=0"), "image/png", &img), 400, "scale");
    check_error(&post(&a, &format!("{url}/api/explain?scale=99"), "image/png", &img), 400, "scale");
    check_error(&post(&a, &format!("{url}/api/explain?target=Foot"), "image/png", &img), 400, "unknown class");
    check_error(&post(&a, &format!("{url}/api/explain"), "text/plain", b"hello"), 400, "looks like text");
    srv.shutdown();
}

#[test]
fn a_burst_of_200_requests_from_16_clients_is_answered_correctly() {
    let srv = server();
    let url = srv.url();
    let a = agent();
    let images: Vec<Vec<u8>> = vec![png(1), png(2), jpeg(3), jpeg(4)];
    // The answers, one request at a time.
    let expected: Vec<(String, Vec<f64>)> = images
        .iter()
        .map(|img| check_prediction(&post(&a, &format!("{url}/api/predict"), "image/png", img).json(), srv.model_id()))
        .collect();

    let (clients, per_client) = (16, 200 / 16 + 1);
    let t = Instant::now();
    let done: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (url, images, expected, a) = (&url, &images, &expected, a.clone());
                let id = srv.model_id();
                s.spawn(move || {
                    let mut n = 0;
                    for i in 0..per_client {
                        let k = c * per_client + i;
                        if k >= 200 {
                            break;
                        }
                        let which = k % images.len();
                        if k % 5 == 4 {
                            let r = post(&a, &format!("{url}/api/explain"), "image/png", &images[which]);
                            assert_eq!(r.status, 200, "request {k}");
                            assert!(r.body.starts_with(b"\x89PNG"));
                            assert_eq!(r.header("x-medcnn-class").as_deref(), Some(expected[which].0.as_str()));
                        } else {
                            let r = post(&a, &format!("{url}/api/predict"), "image/png", &images[which]);
                            assert_eq!(r.status, 200, "request {k}: {}", String::from_utf8_lossy(&r.body));
                            assert_eq!(check_prediction(&r.json(), id), expected[which], "request {k}");
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a client failed")).sum()
    });
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{done} requests (1 in 5 Grad-CAM) from {clients} clients in {secs:.2} s: {:.0} requests/s",
        done as f64 / secs
    );
    assert_eq!(done, 200);
    assert!(secs < 60.0, "the burst took {secs:.1} s");
    srv.shutdown();
}

#[test]
fn a_panicking_handler_answers_500_and_the_server_keeps_serving() {
    let mut cfg = ServeConfig::new(&model().0, loopback(), Device::Cpu);
    cfg.fault_injection = true;
    let srv = start_with(cfg).unwrap();
    let (url, a) = (srv.url(), agent());
    let img = png(6);
    let before = post(&a, &format!("{url}/api/predict"), "image/png", &img).json();
    for _ in 0..3 {
        check_error(&post(&a, &format!("{url}/api/predict?panic=1"), "image/png", &img), 500, "keeps running");
    }
    // The model's lock was poisoned by the panics; it is still used, with the same answers.
    let after = post(&a, &format!("{url}/api/predict"), "image/png", &img);
    assert_eq!(after.status, 200);
    assert_eq!(check_prediction(&after.json(), srv.model_id()), check_prediction(&before, srv.model_id()));
    assert_eq!(post(&a, &format!("{url}/api/explain"), "image/png", &img).status, 200);
    srv.shutdown();
}

#[test]
fn slow_clients_time_out_and_do_not_starve_the_others() {
    let mut cfg = ServeConfig::new(&model().0, loopback(), Device::Cpu);
    cfg.workers = 3;
    cfg.head_timeout = Duration::from_millis(800);
    cfg.body_timeout = Duration::from_millis(1500);
    let srv = start_with(cfg).unwrap();
    let addr = srv.addr();
    // As many stalled connections as workers: half a request line, and half a body.
    let mut stalled: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /health HT").unwrap();
            s
        })
        .collect();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /api/predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\nabc").unwrap();
    stalled.push(s);
    let t = Instant::now();
    let r = get(&agent(), &format!("{}/health", srv.url()));
    assert_eq!(r.status, 200);
    let waited = t.elapsed().as_secs_f64();
    println!("/health answered after {waited:.2} s behind 3 stalled connections");
    assert!(waited < 10.0);
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 408"), "a stalled client got {out:?}");
    }
    srv.shutdown();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(), "still listening after shutdown");
}

#[test]
fn the_binary_serves_and_says_where() {
    let exe = env!("CARGO_BIN_EXE_medcnn");
    let (path, _) = model();

    // A missing model: a clear error and a non-zero exit, before anything listens.
    let out = Command::new(exe)
        .args(["serve", "--model", "/nonexistent/model.safetensors", "--addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));

    // An address other than loopback works only when asked for, with a warning.
    let mut child = Command::new(exe)
        .args(["serve", "--model", path.to_str().unwrap(), "--addr", "0.0.0.0:0", "--quiet"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut url, mut warned) = (None, false);
    while url.is_none() || !warned {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else { break };
        warned |= line.starts_with("warning: listening on 0.0.0.0:");
        if let Some(rest) = line.strip_prefix("serving on ") {
            url = rest.split_whitespace().next().map(|u| u.trim_end_matches('/').to_string());
        }
    }
    let result = std::panic::catch_unwind(|| {
        let url = url.expect("the binary did not say where it serves");
        assert!(warned, "no warning for a non-loopback address");
        let h = get(&agent(), &format!("{url}/health"));
        assert_eq!(h.status, 200);
        assert_eq!(h.json()["model_id"].as_str(), Some(weights_id(&model().1).as_str()));
        let r = post(&agent(), &format!("{url}/api/predict"), "image/png", &png(1));
        assert_eq!(r.status, 200);
    });
    let _ = child.kill();
    let _ = child.wait();
    result.unwrap();
}

/// Reads one whole answer (the server closes or says how long it is) within `within`.
fn read_answer(s: &mut TcpStream, within: Duration) -> String {
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| out.len() >= end + 4 + n) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_client_sending_its_headers_a_byte_at_a_time_holds_up_nobody() {
    let mut cfg = ServeConfig::new(&model().0, loopback(), Device::Cpu);
    cfg.workers = 1;
    let srv = start_with(cfg).unwrap();
    let addr = srv.addr();
    let request = b"GET /health HTTP/1.1\r\nHost: medcnn\r\nUser-Agent: a very slow client\r\n\r\n";
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        for b in request {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(25));
        }
        (read_answer(&mut s, Duration::from_secs(10)), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let a = agent();
    let t = Instant::now();
    let mut slowest = 0.0f64;
    for i in 0..20 {
        let t1 = Instant::now();
        let r = if i % 2 == 0 {
            get(&a, &format!("{}/health", srv.url()))
        } else {
            post(&a, &format!("{}/api/predict", srv.url()), "image/png", &png(1))
        };
        assert_eq!(r.status, 200);
        slowest = slowest.max(t1.elapsed().as_secs_f64());
    }
    let others = t.elapsed();
    let (answer, slow_took) = slow.join().unwrap();
    println!(
        "20 requests in {:.3} s (slowest {:.3} s) while one client took {:.2} s to send its headers",
        others.as_secs_f64(),
        slowest,
        slow_took.as_secs_f64()
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "the slow client got {answer:?}");
    assert!(others < slow_took, "the other requests waited for the slow client");
    assert!(slowest < 1.0, "one request took {slowest:.2} s");
    srv.shutdown();
}

#[test]
fn oversized_headers_get_431_and_lying_lengths_never_hang() {
    let mut cfg = ServeConfig::new(&model().0, loopback(), Device::Cpu);
    cfg.body_timeout = Duration::from_millis(1000);
    let srv = start_with(cfg).unwrap();
    let addr = srv.addr();
    // One header line over 16 KiB, and 200 small headers.
    let mut big = b"GET /health HTTP/1.1\r\nX-Filler: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 17 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    assert!(raw(addr, &big).0.contains("431"));
    let mut many = b"GET /health HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("X-H{i}: {i}\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert!(raw(addr, &many).0.contains("431"));
    // Just under the limit is fine.
    let mut fine = b"GET /health HTTP/1.1\r\nX-Filler: ".to_vec();
    fine.extend(std::iter::repeat_n(b'a', 12 * 1024));
    fine.extend_from_slice(b"\r\n\r\n");
    assert!(raw(addr, &fine).0.contains("200"));

    // A length longer than the body, the connection left open: 408 after the body deadline.
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /api/predict HTTP/1.1\r\nContent-Length: 5000\r\n\r\nabc").unwrap();
    let answer = read_answer(&mut s, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("did not arrive in time (3 of 5000 bytes)"), "{answer}");
    println!("a body 4997 bytes short: 408 after {:.2} s", t.elapsed().as_secs_f64());
    assert!(t.elapsed() < Duration::from_secs(5));
    // A length shorter than the body: the first 3 bytes are the (refused) upload, the rest is
    // taken as the next request and refused as malformed; the connection ends either way.
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"POST /api/predict HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcdefgh\r\n\r\n").unwrap();
    let answer = read_answer(&mut s, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let mut rest = String::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_string(&mut rest);
    assert!(rest.is_empty() || rest.starts_with("HTTP/1.1 400"), "{rest:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "the connection stayed open {:?}", t.elapsed());
    // The server still answers.
    assert_eq!(get(&agent(), &format!("{}/health", srv.url())).status, 200);
    srv.shutdown();
}

#[test]
fn three_hundred_simultaneous_connections_are_served_or_refused_cleanly() {
    // Default limits: 300 connections at once, each one request, all served.
    let srv = server();
    let addr = srv.addr();
    let mut conns: Vec<TcpStream> = (0..300).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let t = Instant::now();
    for s in &mut conns {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: medcnn\r\nConnection: close\r\n\r\n").unwrap();
    }
    let mut ok = 0;
    for s in &mut conns {
        let a = read_answer(s, Duration::from_secs(30));
        assert!(a.starts_with("HTTP/1.1 200"), "{a:?}");
        ok += 1;
    }
    println!("300 simultaneous connections: {ok} answered 200 in {:.2} s", t.elapsed().as_secs_f64());
    drop(conns);
    srv.shutdown();

    // A server allowing 64: 64 idle connections hold every slot, the next ones get 503 (JSON)
    // at once; once they close, requests are served again.
    let mut cfg = ServeConfig::new(&model().0, loopback(), Device::Cpu);
    cfg.max_connections = 64;
    let srv = start_with(cfg).unwrap();
    let addr = srv.addr();
    let held: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut refused = 0;
    for _ in 0..200 {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(b"GET /health HTTP/1.1\r\n\r\n");
        let a = read_answer(&mut s, Duration::from_secs(10));
        assert!(a.starts_with("HTTP/1.1 503") && a.contains("\"status\": 503"), "{a:?}");
        refused += 1;
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = reply(agent().get(format!("{}/health", srv.url())).call());
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(Instant::now() < deadline, "still busy 10 s after the connections closed");
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("64-connection server: {refused} extra connections refused with 503, then served again");
    srv.shutdown();
}
