//! Headless Chromium driven through chromedriver's WebDriver HTTP API (plain JSON over HTTP,
//! with ureq), for the page tests (`serve_browser`, `dashboard`). Without `/usr/bin/chromium`
//! and `/usr/bin/chromedriver` (Debian's `chromium` and `chromium-driver` packages;
//! `MEDCNN_CHROMIUM` and `MEDCNN_CHROMEDRIVER` override the paths) [`browser_tools`] prints
//! SKIP and the test passes, unless `MEDCNN_REQUIRE_CHROMIUM=1`, as in CI.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http_agent;

/// Chromium and chromedriver, or `None` (after printing SKIP) when they are not installed.
pub fn browser_tools() -> Option<(PathBuf, PathBuf)> {
    let path = |var: &str, default: &str| PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_string()));
    let chromium = path("MEDCNN_CHROMIUM", "/usr/bin/chromium");
    let driver = path("MEDCNN_CHROMEDRIVER", "/usr/bin/chromedriver");
    let missing: Vec<String> =
        [&chromium, &driver].iter().filter(|p| !p.exists()).map(|p| p.display().to_string()).collect();
    if missing.is_empty() {
        return Some((chromium, driver));
    }
    super::skip_unless_required(
        "CHROMIUM",
        format!("{} not installed (apt-get install -y chromium chromium-driver)", missing.join(" and ")),
    );
    None
}

/// A chromedriver process and one browser session in it; both end on drop.
pub struct Browser {
    base: String,
    session: String,
    agent: ureq::Agent,
    driver: Child,
}

impl Browser {
    pub fn start(chromium: &Path, chromedriver: &Path, profile: &Path, window: (u32, u32)) -> Browser {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(profile.with_extension("chromedriver.log")).unwrap();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let base = format!("http://127.0.0.1:{port}");
        let agent = http_agent();
        let mut browser = Browser { base, session: String::new(), agent, driver };
        // Ready within a bound.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = browser.agent.get(format!("{}/status", browser.base)).call().ok().and_then(|r| {
                let v: Value = serde_json::from_slice(&r.into_body().read_to_vec().ok()?).ok()?;
                v["value"]["ready"].as_bool()
            });
            if ready == Some(true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_str().unwrap(),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1",
                    format!("--window-size={},{}", window.0, window.1),
                    format!("--user-data-dir={}", profile.display()),
                ]
            }
        }}});
        let v = browser.call("POST", "/session", Some(caps));
        browser.session = v["sessionId"].as_str().expect("no session id").to_string();
        browser
    }

    /// One WebDriver command; returns its `value`, panicking with the driver's message on error.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let r = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(&body.unwrap_or(json!({}))).unwrap()),
        }
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let status = r.status().as_u16();
        let v: Value =
            serde_json::from_slice(&r.into_body().with_config().limit(64 << 20).read_to_vec().unwrap()).unwrap();
        assert_eq!(status, 200, "WebDriver {method} {path}: {}", v["value"]);
        v["value"].clone()
    }

    pub fn find(&self, css: &str) -> Option<String> {
        let url = format!("{}/session/{}/element", self.base, self.session);
        let r = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(&json!({ "using": "css selector", "value": css })).unwrap())
            .ok()?;
        if r.status().as_u16() != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&r.into_body().read_to_vec().ok()?).ok()?;
        // The element reference is the object's only value (its key is a fixed W3C string).
        v["value"].as_object()?.values().next()?.as_str().map(str::to_string)
    }

    pub fn wait_for(&self, css: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            assert!(Instant::now() < deadline, "{css} did not appear within {within:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn text(&self, element: &str) -> String {
        self.call("GET", &format!("/element/{element}/text"), None).as_str().unwrap_or_default().to_string()
    }

    pub fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": js, "args": [] })))
    }

    /// Chooses files with the page's file input (several paths: one per line).
    pub fn choose_files(&self, files: &[PathBuf]) {
        let input = self.wait_for("#file-input", Duration::from_secs(10));
        let text = files.iter().map(|f| f.canonicalize().unwrap().display().to_string()).collect::<Vec<_>>().join("\n");
        self.call("POST", &format!("/element/{input}/value"), Some(json!({ "text": text })));
    }

    pub fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("no screenshot data"));
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.agent.delete(format!("{}/session/{}", self.base, self.session)).call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
