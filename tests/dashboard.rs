//! `medcnn train --dashboard` end to end: a real short training run on a tiny synthetic image
//! folder, slowed down with `MEDCNN_TEST_STEP_DELAY_MS` so that it lasts a few seconds, on a
//! free loopback port (`127.0.0.1:0`; the run prints its URL).
//!
//! - `/api/progress` while the run goes: `step` increases and `history` grows; at the end the
//!   status is `finished`, with every field the API promises.
//! - `/api/events` delivers several updates, each a whole snapshot.
//! - headless Chromium loads the page and sees the step counter change and the loss chart
//!   drawn (skipped with a message without Chromium, unless `MEDCNN_REQUIRE_CHROMIUM=1`).
//! - after the run the dashboard stays until SIGINT (Ctrl-C), and then the process exits 0.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::browser::{browser_tools, Browser};
use common::{http_agent, make_dataset, TempDir, BIN};

/// A training run with a dashboard; its output lines arrive on `lines`.
struct Run {
    child: Child,
    lines: Receiver<String>,
    url: String,
    dir: TempDir,
}

impl Run {
    /// 3 classes x `per_class` images, batch 4, `epochs` epochs, `delay_ms` per step.
    fn start(tag: &str, per_class: usize, epochs: usize, delay_ms: u64) -> Run {
        let dir = TempDir::new(tag);
        let data = make_dataset(&dir.join("data"), 3, per_class);
        let mut child = Command::new(BIN)
            .args(["train", "--data", data.to_str().unwrap(), "--out", dir.join("out").to_str().unwrap()])
            .args(["--epochs", &epochs.to_string(), "--batch-size", "4", "--threads", "1", "--stats-every", "3"])
            .args(["--dashboard", "127.0.0.1:0"])
            .env("MEDCNN_TEST_STEP_DELAY_MS", delay_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = channel();
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let tx2 = tx.clone();
        std::thread::spawn(move || BufReader::new(out).lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
        std::thread::spawn(move || BufReader::new(err).lines().map_while(Result::ok).for_each(|l| drop(tx2.send(l))));
        let mut url = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        while url.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = lines.recv_timeout(left).expect("the run did not print its dashboard URL");
            if let Some(u) = line.strip_prefix("dashboard: ") {
                url = Some(u.trim().trim_end_matches('/').to_string());
            }
        }
        Run { child, lines, url: url.unwrap(), dir: dir }
    }

    fn progress(&self) -> Value {
        let r = http_agent().get(format!("{}/api/progress", self.url)).call().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        serde_json::from_slice(&r.into_body().read_to_vec().unwrap()).unwrap()
    }

    /// Waits for a line starting with `prefix`.
    fn wait_line(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(_) => panic!("no line starting with {prefix:?} within {within:?}"),
            }
        }
    }

    /// SIGINT, as Ctrl-C would; returns the exit code.
    fn interrupt(mut self) -> Option<i32> {
        let ok = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill -INT failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "the run did not stop within 20 s of SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads server-sent events from `url` until `want` of them arrived; returns their data.
fn read_events(url: &str, want: usize, within: Duration) -> Vec<Value> {
    let addr = url.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    write!(s, "GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
    let deadline = Instant::now() + within;
    let mut text = String::new();
    let mut buf = [0u8; 65536];
    let mut events = Vec::new();
    while events.len() < want && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
        // Chunked transfer framing aside, each event's JSON sits on one `data:` line.
        while let Some(i) = text.find("data: {") {
            let Some(end) = text[i..].find('\n') else { break };
            let line = text[i + 6..i + end].trim_end().to_string();
            text.drain(..i + end);
            events.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("event not JSON ({e}): {line}")));
        }
    }
    events
}

#[test]
fn progress_and_events_follow_a_real_run_and_it_lingers_until_ctrl_c() {
    // 3 x 20 images: about 42 for training, 11 steps per epoch; 3 epochs of 11 x 80 ms.
    let run = Run::start("dashboard-api", 20, 3, 80);
    let url = run.url.clone();
    let sse = std::thread::spawn(move || read_events(&url, 4, Duration::from_secs(60)));
    // Clients that ask for the event stream and never read it, and one that hangs up at once:
    // they must cost the run nothing (it still finishes on time, below).
    let addr = run.url.trim_start_matches("http://").to_string();
    let stalled: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    drop(TcpStream::connect(&addr).and_then(|mut s| s.write_all(b"GET /api/events HTTP/1.1\r\n\r\n")));
    let t = Instant::now();

    let mut seen: Vec<(u64, usize)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let p = run.progress();
        if p["status"] != "training" {
            break p;
        }
        seen.push((p["step"].as_u64().unwrap(), p["history"].as_array().unwrap().len()));
        assert!(Instant::now() < deadline, "still training after 120 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    let steps: std::collections::BTreeSet<u64> = seen.iter().map(|s| s.0).collect();
    let lens: std::collections::BTreeSet<usize> = seen.iter().map(|s| s.1).collect();
    println!(
        "{} polls while training: {} distinct steps, history lengths {lens:?}; trained in {:.1} s beside 20 stalled event readers",
        seen.len(),
        steps.len(),
        t.elapsed().as_secs_f64()
    );
    // 33 steps of 80 ms and three validations: a few seconds; a run stuck on a client never ends.
    assert!(t.elapsed() < Duration::from_secs(60));
    drop(stalled);
    assert!(steps.len() >= 3, "the step did not increase while training: {seen:?}");
    assert!(seen.windows(2).all(|w| w[1].0 >= w[0].0 && w[1].1 >= w[0].1), "went backwards: {seen:?}");
    assert!(lens.len() >= 2, "history did not grow while training: {seen:?}");

    // The final state: every promised field.
    assert_eq!(last["status"], "finished", "{last}");
    assert_eq!(last["epoch"], 3);
    assert_eq!(last["epochs"], 3);
    let spe = last["steps_per_epoch"].as_u64().unwrap();
    assert_eq!(last["step"].as_u64(), Some(3 * spe));
    assert!(last["images_per_sec"].as_f64().unwrap() > 0.0);
    for h in last["history"].as_array().unwrap() {
        assert!(h["step"].as_u64().is_some() && h["train_loss"].as_f64().unwrap().is_finite());
        assert!((0.0..=1.0).contains(&h["train_acc"].as_f64().unwrap()));
    }
    let val = last["val"].as_array().unwrap();
    assert_eq!(val.len(), 3);
    assert_eq!(val[2]["epoch"], 3);
    assert!(val[2]["loss"].as_f64().unwrap().is_finite() && val[2]["accuracy"].as_f64().is_some());
    let layers = last["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 12, "weight and bias of 6 layers");
    for l in layers {
        assert!(l["name"].as_str().is_some());
        for k in ["weight_norm", "grad_norm", "update_ratio"] {
            let v = l[k].as_f64().unwrap_or_else(|| panic!("{k} in {l}"));
            assert!(v.is_finite() && v > 0.0, "{k} in {l}");
        }
    }
    assert_eq!(last["confusion"]["counts"].as_array().unwrap().len(), 3);
    assert_eq!(last["pictures_epoch"], 3);
    for png in ["filters", "maps", "image"] {
        let r = http_agent().get(format!("{}/api/{png}.png", run.url)).call().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.into_body().read_to_vec().unwrap().starts_with(b"\x89PNG"));
    }
    let r = http_agent().post(format!("{}/api/progress", run.url)).send(&b"x"[..]).unwrap();
    assert_eq!(r.status().as_u16(), 405);

    let events = sse.join().unwrap();
    let ev_steps: Vec<u64> = events.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    println!("server-sent events: steps {ev_steps:?}");
    assert!(events.len() >= 2, "fewer than two events");
    assert!(ev_steps.windows(2).any(|w| w[1] > w[0]), "the events did not move: {ev_steps:?}");
    assert!(events.iter().all(|e| e["history"].is_array() && e["epochs"] == 3));

    // The run is over; the dashboard stays until Ctrl-C, which then ends the process cleanly.
    run.wait_line("the dashboard stays at ", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.progress()["status"], "finished");
    let url = run.url.clone();
    assert_eq!(run.interrupt(), Some(0));
    assert!(http_agent().get(format!("{url}/api/progress")).call().is_err(), "still serving after Ctrl-C");
}

#[test]
fn a_taken_port_is_a_clear_error_before_training() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let dir = TempDir::new("dashboard-busy");
    let data = make_dataset(&dir.join("data"), 2, 6);
    let out = Command::new(BIN)
        .args(["train", "--data", data.to_str().unwrap(), "--out", dir.join("out").to_str().unwrap()])
        .args(["--epochs", "1", "--dashboard", &addr])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dashboard") && err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(!dir.join("out/model.safetensors").exists());
}

#[test]
fn the_page_shows_the_step_counter_moving_and_the_loss_chart() {
    let Some((chromium, chromedriver)) = browser_tools() else { return };
    // Long enough for the browser to start and watch: 4 epochs of 11 x 150 ms.
    let run = Run::start("dashboard-browser", 20, 4, 150);
    let profile = run.dir.join("profile");
    let browser = Browser::start(&chromium, &chromedriver, &profile, (1300, 1500));
    browser.call("POST", "/url", Some(serde_json::json!({ "url": format!("{}/", run.url) })));
    let step_el = browser.wait_for("#step", Duration::from_secs(10));
    let read_step = || browser.text(&step_el).parse::<u64>().ok();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        if let Some(s) = read_step() {
            break s;
        }
        assert!(Instant::now() < deadline, "the step counter never showed a number");
        std::thread::sleep(Duration::from_millis(100));
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let later = loop {
        let s = read_step().unwrap_or(first);
        if s > first {
            break s;
        }
        assert!(Instant::now() < deadline, "the step counter stayed at {first}");
        std::thread::sleep(Duration::from_millis(100));
    };
    // The loss chart: at least two training points drawn, and blue pixels on the canvas.
    let deadline = Instant::now() + Duration::from_secs(60);
    let drawn = loop {
        let v = browser.script(
            "const c = document.getElementById('loss-chart');
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
             let blue = 0;
             for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && d[i + 2] > 150 && d[i] < 80) blue++;
             return [Number(c.dataset.points), blue];",
        );
        let (points, blue) = (v[0].as_u64().unwrap_or(0), v[1].as_u64().unwrap_or(0));
        if points >= 3 && blue > 50 {
            break (points, blue);
        }
        assert!(Instant::now() < deadline, "the loss chart was not drawn: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let shot = run.dir.join("dashboard.png");
    browser.screenshot(&shot);
    if let Ok(keep) = std::env::var("MEDCNN_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, &keep).unwrap();
    }
    println!("page step {first} -> {later}; loss chart {} points, {} blue pixels", drawn.0, drawn.1);
}

/// The README's screenshot of a real run: `MEDCNN_DASHBOARD_URL=http://127.0.0.1:8090
/// MEDCNN_SCREENSHOT_OUT=outputs/dashboard.png cargo test --release --test dashboard -- --ignored`
/// while `medcnn train --dashboard` runs.
#[test]
#[ignore = "screenshots a running dashboard; needs MEDCNN_DASHBOARD_URL and MEDCNN_SCREENSHOT_OUT"]
fn readme_screenshot() {
    let Some((chromium, chromedriver)) = browser_tools() else { return };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("set {k}"));
    let (url, out) = (var("MEDCNN_DASHBOARD_URL"), var("MEDCNN_SCREENSHOT_OUT"));
    let dir = TempDir::new("dashboard-readme");
    let browser = Browser::start(&chromium, &chromedriver, &dir.join("profile"), (1300, 2000));
    browser.call("POST", "/url", Some(serde_json::json!({ "url": format!("{}/", url.trim_end_matches('/')) })));
    browser.wait_for("#layers tr", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    browser.screenshot(std::path::Path::new(&out));
    println!("wrote {out}");
}
