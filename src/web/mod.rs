//! The HTTP stack that `medcnn serve` and the training dashboard share: hyper's HTTP/1.1 server
//! on a tokio runtime of its own, requests routed by axum, with the limits a page facing the
//! network needs.
//!
//! What it is:
//! - [`Server::start`] binds (an error names the address), then runs an accept loop on its own
//!   runtime threads, so nothing here ever runs on, or waits for, the caller's thread. Each
//!   connection is one task: a client that sends its headers a byte at a time holds only its
//!   own task, never a thread.
//! - Limits, each answered with a JSON error (`{"error": ..., "status": ...}`): headers over
//!   [`MAX_HEAD_BYTES`] or more than [`MAX_HEADERS`] of them get 431 (hyper's parser); headers
//!   that do not arrive within `head_timeout` get 408; a body over `max_body` gets 413 before a
//!   byte of it is buffered; a body that does not arrive within `body_timeout` gets 408; a body
//!   shorter than its `Content-Length` (the client hung up) is a 400 or a closed connection;
//!   more than `max_connections` at once get 503 at once. A handler that panics answers 500.
//! - [`Request`] and [`Reply`]: a request with its body read within those limits, and a
//!   response as plain data, so that the code answering a route (serve's model) is ordinary
//!   synchronous Rust and can run on a blocking thread.
//!
//! What it is not: no TLS, no authentication, no HTTP/2. It answers on the address it is given;
//! [`warn_if_exposed`] says so when that address is reachable from other machines.
//!
//! Why these crates: hyper is the HTTP implementation under most Rust web servers (axum,
//! warp, reqwest's client side), tokio the runtime they run on; axum adds the router and
//! server-sent events, tower-http the panic catcher and common response headers, multer the
//! `multipart/form-data` parser (axum's own `Multipart` uses it). They replace a hand-written
//! server that handled one request per connection on a fixed pool of threads.

pub mod form;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::http::{self, header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

/// The request line and headers together may not exceed this (431 otherwise).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// At most this many header lines (431 otherwise).
pub const MAX_HEADERS: usize = 100;
/// Connections open at once; beyond that a new one gets a 503 and is closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// After refusing a body (413, 411) the server reads and discards at most this much of it, for
/// at most [`DRAIN_TIME`], so that a client that sends its whole body before reading still sees
/// the answer instead of a reset connection.
pub const DRAIN_BYTES: usize = 64 << 20;
pub const DRAIN_TIME: Duration = Duration::from_secs(3);

/// Sizes and deadlines.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The largest body accepted (413 above it).
    pub max_body: usize,
    /// From the first byte of a request until the blank line after its headers (408 after it).
    pub head_timeout: Duration,
    /// From the end of the headers until the last byte of the body (408 after it).
    pub body_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 8 << 20,
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(120),
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// How to run one server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Thread names start with this.
    pub name: String,
    pub addr: SocketAddr,
    /// Threads that read and write sockets (the async runtime's workers).
    pub io_threads: usize,
    /// Threads for blocking work that handlers hand over with `spawn_blocking` (the model).
    pub blocking_threads: usize,
    pub limits: Limits,
    /// One line per request on stderr.
    pub log: bool,
}

/// A running server. Dropping it (or [`Server::shutdown`]) stops it.
pub struct Server {
    addr: SocketAddr,
    stop: Option<watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `cfg.addr` and serves `router` there on a runtime of its own.
    pub fn start(cfg: ServerConfig, router: axum::Router) -> Result<Server> {
        let listener =
            std::net::TcpListener::bind(cfg.addr).with_context(|| format!("cannot listen on {}", cfg.addr))?;
        listener.set_nonblocking(true).context("making the listening socket non-blocking")?;
        let addr = listener.local_addr()?;
        let name = cfg.name.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.io_threads.max(1))
            .max_blocking_threads(cfg.blocking_threads.max(1))
            .thread_name(format!("{name}-io"))
            .enable_all()
            .build()
            .context("starting the server's runtime")?;
        let listener = {
            let _enter = rt.enter();
            tokio::net::TcpListener::from_std(listener).context("registering the listening socket")?
        };
        use tower_http::set_header::SetResponseHeaderLayer;
        let router = router
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
            .layer(SetResponseHeaderLayer::if_not_present(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
            .layer(SetResponseHeaderLayer::if_not_present(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || {
                rt.block_on(accept_loop(listener, router, cfg, stop_rx));
                // Requests still running on blocking threads get a moment to finish.
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .context("starting the server thread")?;
        Ok(Server { addr, stop: Some(stop_tx), thread: Some(thread) })
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, a wildcard address written as loopback (where this machine reaches it).
    pub fn url(&self) -> String {
        url_of(self.addr)
    }

    /// Blocks while the server runs (until `shutdown` is called from elsewhere: never, here).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stops accepting, lets the connections finish what they are answering (at most a few
    /// seconds), closes idle ones and joins the server's threads.
    pub fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `http://ADDR`, with a wildcard IP replaced by loopback.
pub fn url_of(mut a: SocketAddr) -> String {
    if a.ip().is_unspecified() {
        a.set_ip(if a.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    format!("http://{a}")
}

/// Prints a warning on stderr when `addr` can be reached from other machines.
pub fn warn_if_exposed(addr: SocketAddr, what: &str) {
    if !addr.ip().is_loopback() {
        eprintln!(
            "warning: listening on {addr}, which other machines can reach; {what} has no login and no \
             encryption, so expose it only on a network you trust"
        );
    }
}

/// A JSON 500 for a panic in an async handler (blocking handlers catch their own).
fn panicked(_: Box<dyn std::any::Any + Send>) -> Response {
    Reply::error(500, "internal error while answering this request (the server keeps running)").into_response()
}

/// Accepts until told to stop, then shuts the connections down gracefully.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    cfg: ServerConfig,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(cfg.limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // half_close: a client may shut down its sending side and still wait for the answer.
    http.timer(hyper_util::rt::TokioTimer::new())
        .half_close(true)
        .header_read_timeout(cfg.limits.head_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: wait a little, keep accepting.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(answer_raw(tcp, Reply::error(503, "the server is busy; try again in a moment")));
            continue;
        };
        let state = Arc::new(ConnState::default());
        let io = hyper_util::rt::TokioIo::new(WatchedStream { inner: Some(tcp), state: state.clone() });
        let (router, log) = (router.clone(), cfg.log);
        let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(Remote(remote));
            let router = router.clone();
            async move {
                let start = Instant::now();
                let what = format!("{} {}", req.method(), req.uri().path());
                let resp = tower::ServiceExt::oneshot(router, req.map(Body::new)).await?;
                if log {
                    let len = axum::body::HttpBody::size_hint(resp.body()).exact().map(|n| n.to_string());
                    eprintln!(
                        "{} \"{what}\" {} {} {:.1} ms",
                        remote.ip(),
                        resp.status().as_u16(),
                        len.as_deref().unwrap_or("-"),
                        start.elapsed().as_secs_f64() * 1e3
                    );
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            let result = conn.await;
            // hyper closes a connection whose headers did not arrive in time without a word;
            // when part of a request had come, answer 408 on the socket it handed back.
            if result.is_err_and(|e| e.is_timeout()) && state.unanswered.load(Ordering::SeqCst) > 0 {
                let back = state.returned.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some(tcp) = back {
                    answer_raw(tcp, Reply::error(408, "the request headers did not arrive in time")).await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// Writes a whole response on a socket hyper does not own and closes it.
async fn answer_raw(mut tcp: TcpStream, reply: Reply) {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\
         Cache-Control: no-store\r\n\r\n",
        reply.status,
        StatusCode::from_u16(reply.status).ok().and_then(|s| s.canonical_reason()).unwrap_or(""),
        reply.content_type,
        reply.body.len()
    );
    let write = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(&reply.body).await?;
        tcp.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), write).await;
}

/// What the connection task learns from the socket under hyper.
#[derive(Default)]
struct ConnState {
    /// Bytes received since the last byte written (a request under way, not yet answered).
    unanswered: AtomicUsize,
    /// The socket, handed back when hyper drops it.
    returned: Mutex<Option<TcpStream>>,
}

/// A TCP stream that counts what arrives and, when dropped, hands the socket back instead of
/// closing it (see `accept_loop`).
struct WatchedStream {
    inner: Option<TcpStream>,
    state: Arc<ConnState>,
}

impl WatchedStream {
    fn tcp(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.inner.as_mut().expect("the stream is present until drop"))
    }
}

impl Drop for WatchedStream {
    fn drop(&mut self) {
        if let Some(tcp) = self.inner.take() {
            *self.state.returned.lock().unwrap_or_else(PoisonError::into_inner) = Some(tcp);
        }
    }
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = self.tcp().poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.state.unanswered.fetch_add(n, Ordering::SeqCst);
        }
        r
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = self.tcp().poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.unanswered.store(0, Ordering::SeqCst);
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = self.tcp().poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.state.unanswered.store(0, Ordering::SeqCst);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|t| t.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        self.tcp().poll_shutdown(cx)
    }
}

/// The client's address, in every request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct Remote(pub SocketAddr);

/// One request, its body read within the limits.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query, e.g. `/api/predict`.
    pub path: String,
    /// What follows `?`, undecoded (may be empty).
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub remote: Option<SocketAddr>,
    /// For a `multipart/form-data` POST: the form's file part (`None` when it has none), or
    /// what is wrong with the form.
    pub form: Option<Result<Option<form::FormFile>, String>>,
}

impl Request {
    /// Reads `req`'s body within `limits`; a refusal is the reply to send instead.
    pub async fn read(req: axum::extract::Request, limits: &Limits) -> Result<Request, Reply> {
        let (parts, body) = req.into_parts();
        let body = read_body(&parts.headers, body, limits).await?;
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let form = if parts.method == http::Method::POST && form::is_multipart(content_type) {
            Some(form::file_part(content_type, body.clone()).await)
        } else {
            None
        };
        Ok(Request {
            form,
            method: parts.method.as_str().to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            remote: parts.extensions.get::<Remote>().map(|r| r.0),
            headers: parts.headers,
            body,
        })
    }

    /// The first header called `name` (case-insensitive), if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The percent-decoded value of query parameter `key` (`None` when absent).
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.split('&').filter_map(|kv| kv.split_once('=').or(Some((kv, "")))).find_map(|(k, v)| {
            (percent_decode(k).as_deref() == Some(key)).then(|| percent_decode(v).unwrap_or_default())
        })
    }
}

/// The body, at most `limits.max_body` bytes, within `limits.body_timeout`.
pub async fn read_body(headers: &HeaderMap, mut body: Body, limits: &Limits) -> Result<Bytes, Reply> {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        tokio::spawn(drain(body));
        return Err(Reply::error(411, "chunked uploads are not supported: send the image with a Content-Length"));
    }
    // hyper has already refused a Content-Length that is not a number or that contradicts another.
    let length: u64 =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or_default();
    if length > limits.max_body as u64 {
        tokio::spawn(drain(body));
        return Err(Reply::error(
            413,
            format!(
                "the upload is {length} bytes; the limit is {} ({} bytes)",
                human_bytes(limits.max_body),
                limits.max_body
            ),
        ));
    }
    let mut out = Vec::with_capacity(length as usize);
    let deadline = tokio::time::Instant::now() + limits.body_timeout;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(Reply::error(
                    408,
                    format!("the body did not arrive in time ({} of {length} bytes)", out.len()),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(Reply::error(
                    400,
                    format!("the request body was cut short ({} of {length} bytes): {e}", out.len()),
                ))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    out.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(Bytes::from(out))
}

/// Reads and discards what the client still sends, bounded in bytes and time.
async fn drain(mut body: Body) {
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    let mut total = 0;
    while total < DRAIN_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => total += f.data_ref().map_or(0, |d| d.len()),
            _ => break,
        }
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

/// A response as plain data: status, content type, extra headers, body.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, content_type: &str, body: Vec<u8>) -> Reply {
        Reply { status, content_type: content_type.to_string(), headers: Vec::new(), body }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        let mut body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
        body.push(b'\n');
        Reply::new(status, "application/json", body)
    }

    /// `{"error": message, "status": status}`.
    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": message.into(), "status": status }))
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Reply {
        self.headers.push((name.to_string(), value.into()));
        self
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut r = Response::new(Body::from(self.body));
        *r.status_mut() = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let h = r.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.content_type) {
            h.insert(header::CONTENT_TYPE, v);
        }
        for (k, v) in self.headers {
            // Header values come from this crate, but never let one split the head.
            let v: String = v.chars().filter(|c| !c.is_control()).collect();
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(&v)) {
                h.append(k, v);
            }
        }
        r
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
            headers: HeaderMap::new(),
            body: Bytes::new(),
            remote: None,
            form: None,
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
