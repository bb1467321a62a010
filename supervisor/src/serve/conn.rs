//! Connections to the control socket: who may hold one, how many, and for how long.
//!
//! Everything here happens before a handler runs, so that no peer can spend the daemon's
//! memory or file descriptors on requests it may not make:
//! - At accept, the peer's uid, gid and groups come from the socket, and its roles from them.
//!   A peer with no role is answered `403` at once, before a byte it sent is read; so is one
//!   whose credentials cannot be read.
//! - A peer over `api.max_connections_per_uid`, or past `api.max_connections` over all peers
//!   (uid 0 excepted, so the operator can always get in), is answered `503` with
//!   `Retry-After`, also before anything is read.
//! - Admitted connections get `api.header_timeout_ms` for each request's headers (hyper's
//!   header timer, which also runs while a kept-alive connection waits for its next request),
//!   `api.body_timeout_ms` for a body, and are closed when no byte moved either way for
//!   `api.idle_timeout_ms` while the daemon is not working on one of their requests (a body
//!   that stalled, a watcher that stopped reading its event stream).
//! - Bodies: `POST /v1/tasks` takes at most `api.max_body_kb`, read here under its deadline
//!   (a `Content-Length` over the limit is refused before reading); every other route takes
//!   none.
//!
//! Every refusal is counted ([`Counters`], in `GET /v1/status`) and logged at debug level
//! with at most one warning per reason every ten seconds, so a flood cannot flood the journal.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agentd_policy::serve::{ApiLimits, Role};
use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::response::Response;
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

use super::api::{error, Peer};

/// Why a connection or a request was refused or closed; the keys of [`Counters::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer has no role (or its credentials could not be read).
    NoRole,
    /// The peer's uid holds `max_connections_per_uid` connections.
    PerUid,
    /// `max_connections` are open.
    Total,
    /// Headers did not arrive within `header_timeout_ms`.
    HeaderTimeout,
    /// A body did not arrive within `body_timeout_ms`.
    BodyTimeout,
    /// Nothing moved for `idle_timeout_ms`.
    IdleTimeout,
    /// A body over the route's limit.
    BodyTooLarge,
    /// `accept` itself failed (out of file descriptors, most likely).
    AcceptFailed,
}

const REFUSALS: [Refusal; 8] = [
    Refusal::NoRole,
    Refusal::PerUid,
    Refusal::Total,
    Refusal::HeaderTimeout,
    Refusal::BodyTimeout,
    Refusal::IdleTimeout,
    Refusal::BodyTooLarge,
    Refusal::AcceptFailed,
];

impl Refusal {
    fn key(self) -> &'static str {
        match self {
            Refusal::NoRole => "no_role",
            Refusal::PerUid => "per_uid_limit",
            Refusal::Total => "total_limit",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::IdleTimeout => "idle_timeout",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::AcceptFailed => "accept_failed",
        }
    }
}

/// Connection counts and refusals, for `GET /v1/status`.
#[derive(Debug, Default)]
pub struct Counters {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: [AtomicU64; REFUSALS.len()],
    /// When each reason was last warned about (ms since the daemon's start).
    warned: [AtomicU64; REFUSALS.len()],
}

impl Counters {
    /// Counts a refusal, with a warning at most every ten seconds per reason.
    pub fn refuse(&self, why: Refusal, uid: Option<u32>) {
        let i = REFUSALS.iter().position(|r| *r == why).unwrap_or(0);
        let n = self.refused[i].fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(reason = why.key(), uid, "refused a connection or request");
        let now = now_ms();
        let last = self.warned[i].load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 10_000)
            && self.warned[i].compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(reason = why.key(), uid, total = n, "refusing API connections or requests");
        }
    }

    /// Open connections, accepted ones, and refusals by reason.
    pub fn snapshot(&self) -> Value {
        let refused: serde_json::Map<String, Value> = REFUSALS
            .iter()
            .zip(&self.refused)
            .map(|(r, n)| (r.key().to_string(), json!(n.load(Ordering::Relaxed))))
            .collect();
        json!({
            "open": self.open.load(Ordering::Relaxed),
            "accepted": self.accepted.load(Ordering::Relaxed),
            "refused": refused,
        })
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Admission: the limits, the roles, and who holds what.
#[derive(Debug)]
pub struct Admission {
    /// The `[api]` limits.
    pub limits: ApiLimits,
    roles: Vec<Role>,
    per_uid: Mutex<HashMap<u32, usize>>,
    /// Counts, shared with the status endpoint.
    pub counters: Counters,
    /// Refusals still being answered, by uid (each holds a descriptor for a moment).
    answering: Mutex<HashMap<Option<u32>, usize>>,
}

/// A held place: released when the connection ends.
struct Place {
    admission: Arc<Admission>,
    uid: u32,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.counters.open.fetch_sub(1, Ordering::Relaxed);
        release(&self.admission.per_uid, &self.uid);
    }
}

/// Gives back one of `key`'s places in `counts`, forgetting keys that hold none.
fn release<K: std::hash::Hash + Eq>(counts: &Mutex<HashMap<K, usize>>, key: &K) {
    let mut map = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(n) = map.get_mut(key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// Most refusals lingering at once, and per uid; past it, a refused connection gets its answer
/// and is closed at once (its client may then see a broken pipe rather than the answer).
const MAX_ANSWERING: usize = 64;
const MAX_ANSWERING_PER_UID: usize = 8;
/// How long a refused peer gets to finish sending its request before the socket closes, so
/// that its client reads the answer rather than a broken pipe. Nothing it sends is kept.
const ANSWER_LINGER: Duration = Duration::from_millis(250);

impl Admission {
    /// Admission under `limits` for peers with `roles`.
    pub fn new(limits: ApiLimits, roles: Vec<Role>) -> Arc<Self> {
        Arc::new(Admission {
            limits,
            roles,
            per_uid: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            answering: Mutex::new(HashMap::new()),
        })
    }

    /// The roles that apply to a peer.
    pub fn roles_of(&self, uid: u32, gid: u32, groups: &[u32]) -> Vec<Role> {
        self.roles
            .iter()
            .filter(|r| r.uids.contains(&uid) || r.gids.contains(&gid) || groups.iter().any(|g| r.gids.contains(g)))
            .cloned()
            .collect()
    }

    /// Decides on a new connection from what the socket says about its peer.
    fn admit(self: &Arc<Self>, stream: &UnixStream) -> Result<(Peer, Place), (Refusal, Option<u32>, String)> {
        use std::os::fd::AsRawFd;
        let Ok(cred) = stream.peer_cred() else {
            return Err((Refusal::NoRole, None, "the peer's credentials could not be read".into()));
        };
        let (uid, gid) = (cred.uid(), cred.gid());
        let groups = crate::sys::peer_groups(stream.as_raw_fd()).unwrap_or_default();
        let roles = self.roles_of(uid, gid, &groups);
        if roles.is_empty() {
            return Err((
                Refusal::NoRole,
                Some(uid),
                format!(
                    "uid {uid} (gid {gid}) has no role on this agentd; ask its operator to add one in the config's [roles]"
                ),
            ));
        }
        let l = &self.limits;
        let mut map = self.per_uid.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mine = map.get(&uid).copied().unwrap_or(0);
        if mine >= l.max_connections_per_uid {
            return Err((
                Refusal::PerUid,
                Some(uid),
                format!(
                    "uid {uid} already has {mine} connections open to agentd, the most api.max_connections_per_uid allows; close some and retry"
                ),
            ));
        }
        let open = self.counters.open.load(Ordering::Relaxed);
        if uid != 0 && open >= l.max_connections {
            return Err((
                Refusal::Total,
                Some(uid),
                format!("agentd has {open} connections open, the most api.max_connections allows; retry shortly"),
            ));
        }
        *map.entry(uid).or_insert(0) += 1;
        drop(map);
        self.counters.open.fetch_add(1, Ordering::Relaxed);
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        Ok((Peer { cred: Some((uid, gid, cred.pid())), roles }, Place { admission: Arc::clone(self), uid }))
    }

    /// Answers a refused connection and closes it, without keeping anything it sent.
    fn answer(self: &Arc<Self>, stream: UnixStream, why: Refusal, uid: Option<u32>, message: &str) {
        let (status, code) = match why {
            Refusal::NoRole => ("403 Forbidden", "forbidden"),
            _ => ("503 Service Unavailable", "too_many_connections"),
        };
        let body = json!({ "error": { "code": code, "message": message } }).to_string();
        let retry = if why == Refusal::NoRole { "" } else { "Retry-After: 1\r\n" };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n",
            body.len()
        );
        // The answer fits in an empty socket buffer: a non-blocking write either takes it all
        // or the peer is not worth waiting for.
        let _ = stream.try_write(&[head.into_bytes(), body.into_bytes()].concat());
        {
            let mut answering = self.answering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let total: usize = answering.values().sum();
            let mine = answering.entry(uid).or_insert(0);
            if total >= MAX_ANSWERING || *mine >= MAX_ANSWERING_PER_UID {
                return;
            }
            *mine += 1;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            linger(stream).await;
            release(&me.answering, &uid);
        });
    }
}

/// Lets a refused client finish sending its request (read and dropped) so that it reads the
/// answer rather than a broken pipe: until its request is complete, it closes, 64 KiB came,
/// or [`ANSWER_LINGER`] passed.
async fn linger(mut stream: UnixStream) {
    let _ = stream.shutdown().await;
    let end = tokio::time::Instant::now() + ANSWER_LINGER;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 64 * 1024 {
        match tokio::time::timeout_at(end, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return,
        }
        if request_complete(&got) {
            return;
        }
    }
}

/// Whether `got` holds a whole request: its head and as much body as it declared.
fn request_complete(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let body: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    got.len() >= end + 4 + body
}

/// Accepts connections until the future is dropped, serving each admitted one with `app`.
pub async fn accept(
    listener: UnixListener,
    app: Router,
    admission: Arc<Admission>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                admission.counters.refuse(Refusal::AcceptFailed, None);
                tracing::debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match admission.admit(&stream) {
            Ok((peer, place)) => {
                let conn = serve_one(stream, peer, place, app.clone(), Arc::clone(&admission), &graceful);
                tokio::spawn(conn);
            }
            Err((why, uid, message)) => {
                admission.counters.refuse(why, uid);
                admission.answer(stream, why, uid, &message);
            }
        }
    }
}

/// One admitted connection, until it ends, times out, or sits idle.
fn serve_one(
    stream: UnixStream,
    peer: Peer,
    place: Place,
    app: Router,
    admission: Arc<Admission>,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) -> impl Future<Output = ()> + Send + 'static {
    let l = admission.limits;
    let last = Arc::new(AtomicU64::new(now_ms()));
    let working = Arc::new(AtomicUsize::new(0));
    let io = hyper_util::rt::TokioIo::new(Watched { inner: stream, last: Arc::clone(&last) });
    let uid = place.uid;
    let svc = {
        let working = Arc::clone(&working);
        let admission = Arc::clone(&admission);
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (app, peer, admission, working) =
                (app.clone(), peer.clone(), Arc::clone(&admission), Arc::clone(&working));
            async move { Ok::<_, std::convert::Infallible>(handle(req, app, peer, &admission, &working).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_millis(l.header_timeout_ms))
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc);
    let conn = graceful.watch(conn);
    async move {
        let _place = place;
        let idle = Duration::from_millis(l.idle_timeout_ms);
        let watchdog = async {
            loop {
                tokio::time::sleep((idle / 4).max(Duration::from_millis(50))).await;
                let quiet = now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if working.load(Ordering::Relaxed) == 0 && quiet >= l.idle_timeout_ms {
                    return;
                }
            }
        };
        tokio::select! {
            r = conn => {
                if let Err(e) = r {
                    if e.is_timeout() {
                        admission.counters.refuse(Refusal::HeaderTimeout, Some(uid));
                    } else {
                        tracing::debug!(error = %e, uid, "connection ended with an error");
                    }
                }
            }
            () = watchdog => admission.counters.refuse(Refusal::IdleTimeout, Some(uid)),
        }
    }
}

struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request: its body taken under the route's limit and deadline, then the router. While
/// the router works on it, the connection is not idle whatever moves on it.
async fn handle(
    req: Request<hyper::body::Incoming>,
    app: Router,
    peer: Peer,
    admission: &Admission,
    working: &Arc<AtomicUsize>,
) -> Response {
    use tower::ServiceExt;
    let l = &admission.limits;
    let uid = peer.cred.map(|c| c.0);
    let path = req.uri().path();
    let limit = if req.method() == Method::POST && (path == "/v1/tasks" || path.starts_with("/mcp/")) {
        l.max_body_kb * 1024
    } else {
        0
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = req.headers().contains_key(axum::http::header::TRANSFER_ENCODING);
    let too_large = |admission: &Admission| {
        admission.counters.refuse(Refusal::BodyTooLarge, uid);
        let msg = if limit == 0 {
            "this endpoint takes no request body".to_string()
        } else {
            format!("the body is over {} KiB, the most api.max_body_kb allows", limit / 1024)
        };
        closing(error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", msg))
    };
    if declared.is_some_and(|n| n > limit as u64) || (limit == 0 && chunked) {
        return too_large(admission);
    }
    let (mut parts, body) = req.into_parts();
    let bytes = if declared.unwrap_or(0) == 0 && !chunked {
        axum::body::Bytes::new()
    } else {
        match tokio::time::timeout(Duration::from_millis(l.body_timeout_ms), take(body, limit)).await {
            Ok(Ok(b)) => b,
            Ok(Err(None)) => return too_large(admission),
            Ok(Err(Some(e))) => {
                return closing(error(StatusCode::BAD_REQUEST, "bad_request", format!("reading the body: {e}")));
            }
            Err(_) => {
                admission.counters.refuse(Refusal::BodyTimeout, uid);
                return closing(error(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("the body did not arrive within {} ms (api.body_timeout_ms)", l.body_timeout_ms),
                ));
            }
        }
    };
    parts.extensions.insert(ConnectInfo(peer));
    let req = Request::from_parts(parts, Body::from(bytes));
    working.fetch_add(1, Ordering::Relaxed);
    let _done = Decrement(Arc::clone(working));
    match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// A body of at most `limit` bytes, copied into one buffer as its frames come: a frame is a
/// slice of hyper's read buffer, and keeping thousands of one-byte frames would keep as many
/// buffers alive. `Err(None)`: over the limit.
async fn take(mut body: hyper::body::Incoming, limit: usize) -> Result<axum::body::Bytes, Option<hyper::Error>> {
    let mut buf = Vec::with_capacity(limit.min(16 * 1024));
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Some)?.into_data() else { continue };
        if buf.len() + data.len() > limit {
            return Err(None);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.into())
}

/// A response after which the connection is closed (its request was not fully read).
fn closing(mut r: Response) -> Response {
    r.headers_mut().insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// A stream that notes when a byte last moved either way.
struct Watched {
    inner: UnixStream,
    last: Arc<AtomicU64>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.last.store(now_ms(), Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
