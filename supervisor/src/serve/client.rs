//! The client side of the daemon's control API: one HTTP/1.1 request over its Unix socket
//! (hyper's client on a tokio `UnixStream`), for `agentd ctl` and `agentd bench serve`.

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

/// Why a request failed.
pub enum CtlError {
    /// Not reachable.
    Connect(String),
    /// An answer with an error status.
    Api(StatusCode, Value),
}

impl std::fmt::Display for CtlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CtlError::Connect(m) => f.write_str(m),
            CtlError::Api(s, v) => write!(f, "{s}: {}", v["error"]["message"].as_str().unwrap_or("")),
        }
    }
}

/// One request to the daemon; an answer with an error status comes back as
/// [`CtlError::Api`], with its JSON body.
pub async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Response<Incoming>, CtlError> {
    let stream = connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| CtlError::Connect(format!("HTTP handshake with {}: {e}", socket.display())))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "agentd")
        .header("content-type", "application/json")
        .body(Full::new(bytes))
        .map_err(|e| CtlError::Connect(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(|e| CtlError::Connect(format!("request failed: {e}")))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!({ "error": { "message": String::from_utf8_lossy(&body) } }));
    Err(CtlError::Api(status, v))
}

/// How long a connect may wait for the daemon to accept.
const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Connects to the daemon. A blocking connect, on a thread of its own, that gives up after
/// [`CONNECT_WITHIN`] (`SO_SNDTIMEO` bounds a Unix connect's wait): when a flood of other
/// peers' connections fills the socket's backlog, a non-blocking connect fails at once with
/// EAGAIN, while a blocking one waits in the kernel's queue for its turn.
async fn connect(socket: &Path) -> Result<tokio::net::UnixStream, CtlError> {
    use nix::sys::socket::{self as s, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
    let fail = |e: String| CtlError::Connect(format!("cannot reach agentd serve at {}: {e}", socket.display()));
    let path = socket.to_path_buf();
    let connected = tokio::task::spawn_blocking(move || -> nix::Result<std::os::unix::net::UnixStream> {
        let fd = s::socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        let within = nix::sys::time::TimeVal::new(i64::try_from(CONNECT_WITHIN.as_secs()).unwrap_or(10), 0);
        s::setsockopt(&fd, sockopt::SendTimeout, &within)?;
        s::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path.as_path())?)?;
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true).map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
        Ok(stream)
    });
    match connected.await {
        Ok(Ok(stream)) => tokio::net::UnixStream::from_std(stream).map_err(|e| fail(e.to_string())),
        Ok(Err(nix::errno::Errno::EAGAIN)) => {
            Err(fail(format!("it did not accept within {} s (its backlog stayed full)", CONNECT_WITHIN.as_secs())))
        }
        Ok(Err(e)) => Err(fail(std::io::Error::from(e).to_string())),
        Err(e) => Err(fail(e.to_string())),
    }
}

/// One request to the daemon, with its JSON answer.
pub async fn get_json(socket: &Path, method: Method, path: &str, body: Option<Value>) -> Result<Value, CtlError> {
    let resp = send(socket, method, path, body).await?;
    let body = resp.into_body().collect().await.map_err(|e| CtlError::Connect(format!("reading the answer: {e}")))?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| CtlError::Connect(format!("the answer is not JSON: {e}")))
}
