//! The page of `medcnn serve` in headless Chromium, end to end: open it, choose an image with the
//! file input, wait for the result card, and read the predicted class off the page; it must be
//! the class `/api/predict` gives for the same file. The bars and the Grad-CAM image must be
//! there too, and a screenshot is saved.
//!
//! Chromium is driven through chromedriver's WebDriver HTTP API (plain JSON over HTTP, with
//! ureq). Without `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian's `chromium` and
//! `chromium-driver` packages; `MEDCNN_CHROMIUM` and `MEDCNN_CHROMEDRIVER` override the paths)
//! the test prints `skipped: why` and passes, unless `MEDCNN_REQUIRE_CHROMIUM=1` (CI), when it fails.
//!
//! The README's screenshot is made by the ignored test `readme_screenshot`:
//! `MEDCNN_SCREENSHOT_MODEL=model.safetensors MEDCNN_SCREENSHOT_IMAGES=a.jpeg,b.jpeg
//!  MEDCNN_SCREENSHOT_OUT=outputs/serve.png cargo test --release --test serve_browser -- --ignored`

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use medcnn::backend::Device;
use medcnn::serve::ServerHandle;
use serde_json::{json, Value};

use common::browser::{browser_tools, Browser};
use common::{http_agent, random_model_file, MEDNIST_CLASSES};

const CLASSES: [&str; 6] = MEDNIST_CLASSES;

/// A fresh folder for this process under target/tmp; those of runs over an hour old are removed.
fn tmp_dir(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("serve-browser-{name}-");
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        if e.file_name().to_string_lossy().starts_with(&prefix) && old.is_some_and(|a| a > Duration::from_secs(3600)) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let d = root.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A model file with random weights in `dir`.
fn random_model(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    random_model_file(&path, 3);
    path
}

fn agent() -> ureq::Agent {
    http_agent()
}

/// The class `/api/predict` gives for a file.
fn api_class(srv: &ServerHandle, file: &Path) -> String {
    let bytes = std::fs::read(file).unwrap();
    let r = agent().post(format!("{}/api/predict", srv.url())).send(&bytes[..]).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let j: Value = serde_json::from_slice(&r.into_body().read_to_vec().unwrap()).unwrap();
    j["class"].as_str().unwrap().to_string()
}

/// Waits until result card `n` is finished, failing on an error card; returns its class text.
fn finished_class(b: &Browser, n: usize) -> String {
    b.wait_for(
        &format!("#result-{n}[data-state=\"done\"], #result-{n}[data-state=\"error\"]"),
        Duration::from_secs(60),
    );
    if let Some(e) = b.find(&format!("#result-{n} .error")) {
        panic!("result {n} shows an error: {}", b.text(&e));
    }
    let class = b.wait_for(&format!("#result-{n} .pred-class"), Duration::from_secs(5));
    b.text(&class)
}

#[test]
fn the_page_shows_the_prediction_of_an_uploaded_image() {
    let Some((chromium, chromedriver)) = browser_tools() else { return };
    let t0 = Instant::now();
    let dir = tmp_dir("e2e");
    let model = random_model(&dir);
    let srv = medcnn::serve::start(&model, "127.0.0.1:0".parse().unwrap(), Device::Cpu).unwrap();
    let image_path = dir.join("scan.png");
    image::GrayImage::from_fn(64, 64, |x, y| image::Luma([((x * 3 + y * 2) % 256) as u8])).save(&image_path).unwrap();
    let expected = api_class(&srv, &image_path);

    let browser = Browser::start(&chromium, &chromedriver, &dir.join("profile"), (1200, 900));
    browser.call("POST", "/url", Some(json!({ "url": format!("{}/", srv.url()) })));
    // The page asked /health and shows the model's identity.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !browser.text(&browser.wait_for("#model-info", Duration::from_secs(10))).contains(srv.model_id()) {
        assert!(Instant::now() < deadline, "the page does not show the model id {}", srv.model_id());
        std::thread::sleep(Duration::from_millis(100));
    }

    browser.choose_files(std::slice::from_ref(&image_path));
    let shown = finished_class(&browser, 0);
    assert_eq!(shown, expected, "the page shows {shown:?}, /api/predict says {expected:?}");

    let bars = browser.script("return document.querySelectorAll('#result-0 .bar').length");
    assert_eq!(bars.as_u64(), Some(CLASSES.len() as u64));
    let heatmap =
        browser.script("const i = document.querySelector('#result-0 img.heatmap'); return i ? i.naturalWidth : 0");
    assert_eq!(heatmap.as_u64(), Some(256), "the Grad-CAM image did not load");
    let name = browser.text(&browser.wait_for("#result-0 .file", Duration::from_secs(5)));
    assert_eq!(name, "scan.png");

    // A file that is not an image gets an error card, listed above the first result.
    let text_path = dir.join("notes.png");
    std::fs::write(&text_path, "not an image\n").unwrap();
    browser.choose_files(&[text_path]);
    browser.wait_for("#result-1[data-state=\"error\"]", Duration::from_secs(30));
    let err = browser.text(&browser.wait_for("#result-1 .error", Duration::from_secs(5)));
    assert!(err.contains("cannot decode image"), "error card says {err:?}");
    let order = browser.script("return Array.from(document.querySelectorAll('#results .result')).map(e => e.id)");
    assert_eq!(order, json!(["result-1", "result-0"]), "newest first");

    let shot = dir.join("page.png");
    browser.screenshot(&shot);
    println!("page shows {shown} like the API; screenshot {} ; {:.1} s", shot.display(), t0.elapsed().as_secs_f64());
}

/// The README's screenshot: a real model and real images (paths from the environment).
#[test]
#[ignore = "makes the README screenshot; needs MEDCNN_SCREENSHOT_{MODEL,IMAGES,OUT}"]
fn readme_screenshot() {
    let Some((chromium, chromedriver)) = browser_tools() else { return };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("set {k}"));
    let model = PathBuf::from(var("MEDCNN_SCREENSHOT_MODEL"));
    let images: Vec<PathBuf> = var("MEDCNN_SCREENSHOT_IMAGES").split(',').map(PathBuf::from).collect();
    let out = PathBuf::from(var("MEDCNN_SCREENSHOT_OUT"));
    let (w, h) = std::env::var("MEDCNN_SCREENSHOT_SIZE")
        .ok()
        .and_then(|s| s.split_once('x').map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())))
        .unwrap_or((1100, 1000));
    let dir = tmp_dir("readme");
    let srv = medcnn::serve::start(&model, "127.0.0.1:0".parse().unwrap(), Device::Cpu).unwrap();
    let browser = Browser::start(&chromium, &chromedriver, &dir.join("profile"), (w, h));
    browser.call("POST", "/url", Some(json!({ "url": format!("{}/", srv.url()) })));
    browser.wait_for("#model-info code", Duration::from_secs(20));
    for (n, img) in images.iter().enumerate() {
        browser.choose_files(std::slice::from_ref(img));
        let shown = finished_class(&browser, n);
        println!("{}: {shown} (API: {})", img.display(), api_class(&srv, img));
    }
    std::thread::sleep(Duration::from_millis(600)); // the bars' transition
    browser.screenshot(&out);
    println!("wrote {}", out.display());
}
