//! A small HTTP/1.1 server on `std::net`: one request per connection, bounded everywhere.
//!
//! What it is: an accept thread hands connections to a fixed pool of worker threads through a
//! bounded queue; a worker reads one request (head at most [`MAX_HEAD_BYTES`], body at most
//! `Limits::max_body`, both within deadlines), calls the handler inside `catch_unwind`, writes
//! the response with `Connection: close` and closes. A request over a limit gets its 4xx answer
//! without the body ever being buffered; a handler that panics gets a 500, and the worker lives.
//!
//! What it is not: no keep-alive (an idle browser connection must not pin a worker), no chunked
//! uploads (411: send a Content-Length), no TLS. It answers on whatever address it is given;
//! the caller decides whether that is loopback.
//!
//! Why not a crate: tiny_http 0.12 drains an unread body with `vec![0; remaining]`, `remaining`
//! being the client's Content-Length, so one request claiming a petabyte and hanging up aborts
//! the process; the whole protocol needed here is a page of code.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The request line and headers together may not exceed this (431 otherwise).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// At most this many header lines (431 otherwise).
pub const MAX_HEADERS: usize = 100;
/// Connections waiting for a worker; beyond that a new connection gets a 503 at once.
pub const QUEUE: usize = 256;
/// After refusing a body (413, 411) the server reads and discards at most this much of it, for
/// at most [`DRAIN_TIME`], so that a client that sends its whole body before reading still sees
/// the answer instead of a reset connection.
pub const DRAIN_BYTES: usize = 64 << 20;
pub const DRAIN_TIME: Duration = Duration::from_secs(3);

/// Sizes and deadlines of one request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest body accepted (413 above it).
    pub max_body: usize,
    /// From the connection's start until the blank line after the headers (408 after it).
    pub head_timeout: Duration,
    /// From the connection's start until the last byte of the body (408 after it).
    pub body_timeout: Duration,
    /// Each write of the response.
    pub write_timeout: Duration,
}

/// One parsed request, body included.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query, e.g. `/api/predict`.
    pub path: String,
    /// What follows `?`, undecoded (may be empty).
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub remote: Option<SocketAddr>,
}

impl Request {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The percent-decoded value of query parameter `key` (`None` when absent).
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find_map(|(k, v)| {
            (percent_decode(k).as_deref() == Some(key)).then(|| percent_decode(v).unwrap_or_default())
        })
    }
}

/// `%XX` and `+` decoding of a query component; `None` if the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' => match (b.get(i + 1).and_then(|&c| hex(c)), b.get(i + 2).and_then(|&c| hex(c))) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// A response: status, content type, extra headers, body.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        Response { status, content_type: content_type.to_string(), headers: Vec::new(), body }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    /// `{"error": message, "status": status}`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.into(), "status": status }))
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

/// The reason phrase of the statuses this server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes `resp` (its body left out for HEAD).
fn write_response(stream: &mut TcpStream, resp: &Response, head_only: bool) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    for (k, v) in &resp.headers {
        // Header values come from this crate, but never let one split the head.
        let v: String = v.chars().filter(|c| !c.is_control()).collect();
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(&resp.body)?;
    }
    stream.flush()
}

/// Why no request came out of a connection.
enum Refusal {
    /// Answer with this and close; `drain` says the client may still be sending a body.
    Answer(Response, bool),
    /// The client went away or sent nothing: close without a word.
    Silent,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal::Answer(Response::error(status, message), false)
}

/// Reads into `buf` before `deadline`; a timeout is `ErrorKind::TimedOut`.
fn read_before(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match stream.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(ErrorKind::TimedOut.into()),
            r => return r,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one request from `stream` within `limits`.
fn read_request(stream: &mut TcpStream, limits: &Limits, remote: Option<SocketAddr>) -> Result<Request, Refusal> {
    let start = Instant::now();
    let head_deadline = start + limits.head_timeout;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(refuse(431, format!("the request line and headers exceed {} KiB", MAX_HEAD_BYTES >> 10)));
        }
        match read_before(stream, &mut chunk, head_deadline) {
            Ok(0) => return Err(Refusal::Silent),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::TimedOut && !buf.is_empty() => {
                return Err(refuse(408, "the request headers did not arrive in time"))
            }
            Err(_) => return Err(Refusal::Silent),
        }
    };
    if head_end + 4 > MAX_HEAD_BYTES {
        return Err(refuse(431, format!("the request line and headers exceed {} KiB", MAX_HEAD_BYTES >> 10)));
    }
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| refuse(400, "the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(refuse(400, "malformed request line (expected: METHOD /path HTTP/1.1)"));
    };
    if method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(refuse(400, "malformed request method"));
    }
    if !version.starts_with("HTTP/") {
        return Err(refuse(400, "malformed request line (expected: METHOD /path HTTP/1.1)"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(refuse(505, format!("{version} is not supported; use HTTP/1.1")));
    }
    if !target.starts_with('/') {
        return Err(refuse(400, "the request target must be a path starting with /"));
    }
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(refuse(431, format!("more than {MAX_HEADERS} headers")));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(refuse(400, "malformed header line"));
        };
        if name.is_empty() || name.bytes().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) {
            return Err(refuse(400, "malformed header name"));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body: Vec::new(),
        remote,
    };

    if req.header("Transfer-Encoding").is_some() {
        return Err(Refusal::Answer(
            Response::error(411, "chunked uploads are not supported: send the image with a Content-Length"),
            true,
        ));
    }
    let mut length: Option<u64> = None;
    for (_, v) in req.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("Content-Length")) {
        let n: u64 = v.parse().map_err(|_| refuse(400, format!("invalid Content-Length {v:?}")))?;
        if length.is_some_and(|m| m != n) {
            return Err(refuse(400, "conflicting Content-Length headers"));
        }
        length = Some(n);
    }
    let length = length.unwrap_or(0);
    if length > limits.max_body as u64 {
        return Err(Refusal::Answer(
            Response::error(
                413,
                format!(
                    "the upload is {length} bytes; the limit is {} ({} bytes)",
                    human_bytes(limits.max_body),
                    limits.max_body
                ),
            ),
            true,
        ));
    }
    let length = length as usize;
    if length > 0 && req.header("Expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let body_deadline = start + limits.body_timeout;
    let mut body = Vec::with_capacity(length);
    let early = &buf[head_end + 4..]; // body bytes that came with the head
    body.extend_from_slice(&early[..early.len().min(length)]);
    drop(buf);
    while body.len() < length {
        let want = (length - body.len()).min(chunk.len());
        match read_before(stream, &mut chunk[..want], body_deadline) {
            Ok(0) => return Err(Refusal::Silent),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                return Err(refuse(408, format!("the body did not arrive in time ({} of {length} bytes)", body.len())))
            }
            Err(_) => return Err(Refusal::Silent),
        }
    }
    req.body = body;
    Ok(req)
}

/// "8 MiB", "512 KiB", "100 bytes".
pub fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

/// Reads and discards what the client still sends, bounded in bytes and time.
fn drain(stream: &mut TcpStream) {
    let deadline = Instant::now() + DRAIN_TIME;
    let mut chunk = [0u8; 16384];
    let mut total = 0;
    while total < DRAIN_BYTES {
        match read_before(stream, &mut chunk, deadline) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

/// What the server calls for each request.
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// One log line per request, when enabled.
fn log_line(remote: Option<SocketAddr>, what: &str, resp: &Response, start: Instant) {
    let who = remote.map(|a| a.ip().to_string()).unwrap_or_else(|| "-".into());
    eprintln!("{who} \"{what}\" {} {} {:.1} ms", resp.status, resp.body.len(), start.elapsed().as_secs_f64() * 1e3);
}

/// Serves one connection: one request, one response, close.
fn serve_connection(mut stream: TcpStream, limits: &Limits, handler: &Handler, log: bool) {
    let start = Instant::now();
    let remote = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(limits.write_timeout));
    match read_request(&mut stream, limits, remote) {
        Ok(req) => {
            let resp = catch_unwind(AssertUnwindSafe(|| handler(&req))).unwrap_or_else(|_| {
                Response::error(500, "internal error while answering this request (the server keeps running)")
            });
            let _ = write_response(&mut stream, &resp, req.method == "HEAD");
            if log {
                log_line(remote, &format!("{} {}", req.method, req.path), &resp, start);
            }
            let _ = stream.shutdown(Shutdown::Write);
        }
        Err(Refusal::Answer(resp, must_drain)) => {
            let _ = write_response(&mut stream, &resp, false);
            if log {
                log_line(remote, "-", &resp, start);
            }
            let _ = stream.shutdown(Shutdown::Write);
            if must_drain {
                drain(&mut stream);
            }
        }
        Err(Refusal::Silent) => {}
    }
}

/// A running server: its address and the threads to stop.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` and starts the accept thread and `workers` worker threads.
    pub fn start(addr: SocketAddr, workers: usize, limits: Limits, handler: Arc<Handler>, log: bool) -> Result<Server> {
        let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = sync_channel::<TcpStream>(QUEUE);
        let rx: Arc<Mutex<Receiver<TcpStream>>> = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let (rx, limits, handler) = (rx.clone(), limits.clone(), handler.clone());
            let h = std::thread::Builder::new()
                .name(format!("serve-worker-{i}"))
                .spawn(move || loop {
                    let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    let Ok(stream) = next else { break };
                    // serve_connection catches the handler's panics; this catches its own.
                    let _ = catch_unwind(AssertUnwindSafe(|| serve_connection(stream, &limits, &*handler, log)));
                })
                .context("starting a worker thread")?;
            handles.push(h);
        }
        let stop2 = stop.clone();
        let acceptor = std::thread::Builder::new()
            .name("serve-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(stream) => match tx.try_send(stream) {
                            Ok(()) => {}
                            Err(TrySendError::Full(mut s)) => {
                                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                                let busy = Response::error(503, "the server is busy; try again in a moment")
                                    .with_header("Retry-After", "1");
                                let _ = write_response(&mut s, &busy, false);
                            }
                            Err(TrySendError::Disconnected(_)) => break,
                        },
                        // Out of file descriptors and the like: wait a little, keep accepting.
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })
            .context("starting the accept thread")?;
        Ok(Server { addr, stop, acceptor: Some(acceptor), workers: handles })
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops (i.e. forever, unless `shutdown` is called elsewhere).
    pub fn wait(mut self) {
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    /// Stops accepting, lets the workers finish the requests they hold, and joins every thread.
    pub fn shutdown(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept thread with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(2));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("Chest%20CT+x").as_deref(), Some("Chest CT x"));
        assert_eq!(percent_decode("100%").as_deref(), Some("100%"));
        assert_eq!(percent_decode("%4").as_deref(), Some("%4"));
        assert_eq!(percent_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(percent_decode("%ff"), None);
    }

    #[test]
    fn query_parameters() {
        let req = Request {
            method: "POST".into(),
            path: "/api/explain".into(),
            query: "scale=2&target=Hand&flag".into(),
            headers: vec![],
            body: vec![],
            remote: None,
        };
        assert_eq!(req.query_param("scale").as_deref(), Some("2"));
        assert_eq!(req.query_param("target").as_deref(), Some("Hand"));
        assert_eq!(req.query_param("flag").as_deref(), Some(""));
        assert_eq!(req.query_param("nope"), None);
    }

    #[test]
    fn byte_sizes_read_well() {
        assert_eq!(human_bytes(8 << 20), "8 MiB");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
