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
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| CtlError::Connect(format!("cannot reach agentd serve at {}: {e}", socket.display())))?;
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

/// One request to the daemon, with its JSON answer.
pub async fn get_json(socket: &Path, method: Method, path: &str, body: Option<Value>) -> Result<Value, CtlError> {
    let resp = send(socket, method, path, body).await?;
    let body = resp.into_body().collect().await.map_err(|e| CtlError::Connect(format!("reading the answer: {e}")))?;
    serde_json::from_slice(&body.to_bytes()).map_err(|e| CtlError::Connect(format!("the answer is not JSON: {e}")))
}
