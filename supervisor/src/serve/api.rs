//! The control API: HTTP/1.1 and JSON over the daemon's Unix socket (axum).
//!
//! Who calls is known from the socket itself (`SO_PEERCRED`, and `SO_PEERGROUPS` for
//! supplementary groups), never from anything the client says. The config's roles map
//! uids and gids to the agents a caller may submit to, whether it may see and cancel other
//! uids' tasks of those agents (`all_tasks`; by default only its own), and whether it may
//! read audit records. A caller with no role is refused with 403.
//!
//! | method and path | what |
//! | --- | --- |
//! | `GET /v1/agents` | hosted agents the caller may use |
//! | `POST /v1/tasks` `{"agent", "task"}` | submit: 202 with the task, 429 busy (`Retry-After`), 503 draining |
//! | `GET /v1/tasks?agent=&state=&limit=&after=` | a page of the tasks it may see, oldest first, and `next` |
//! | `GET /v1/tasks/{id}` | one task: status and result |
//! | `GET /v1/tasks/{id}/events?from=N` | its events as server-sent events (`Last-Event-ID` resumes) |
//! | `POST /v1/tasks/{id}/cancel` | cancel |
//! | `GET /v1/calls?task=ID` or `?agent=&limit=&after=` | one task's calls, or a page of those it may see |
//! | `GET /v1/audit` | the audit log's summary (audit roles only) |
//! | `GET /v1/status` | the daemon: model, queues, calls in flight |
//! | `/mcp/{agent}` | MCP (Streamable HTTP) for roles with `tools = true`: see [`super::mcp`] |

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd_policy::serve::Role;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use super::store::{Event, Scope, State as TaskState, TaskRecord};
use super::tasks::{SubmitError, Tasks};

/// The caller, from the socket (see [`super::conn`], which admits it).
#[derive(Debug, Clone)]
pub struct Peer {
    /// uid, gid and pid, if the kernel said.
    pub cred: Option<(u32, u32, Option<i32>)>,
    /// The roles that apply to it, decided at accept from its uid, gid and groups.
    pub roles: Vec<Role>,
}

/// What the API serves from.
#[derive(Debug)]
pub struct Api {
    /// The tasks.
    pub tasks: Arc<Tasks>,
    /// Connection admission and its counters.
    pub admission: Arc<super::conn::Admission>,
    /// The audit log.
    pub audit_log: PathBuf,
    /// Fires when the daemon stops, to end event streams.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Lists read at once ([`LISTS_AT_ONCE`]); the others wait their turn.
    pub lists: Arc<tokio::sync::Semaphore>,
}

/// Lists read from the store at once, whoever asks: what a burst of large pages may hold in
/// memory and CPU is bounded by this many pages.
pub const LISTS_AT_ONCE: usize = 4;

/// A caller and the roles that apply to it.
struct Caller {
    uid: u32,
    roles: Vec<Role>,
}

impl Caller {
    fn may_use(&self, agent: &str) -> bool {
        self.roles.iter().any(|r| r.allows(agent))
    }
    /// Whether it may see (and cancel) a task of `agent` that `submitter` submitted: its own,
    /// or anyone's with a role that has `all_tasks`.
    fn may_see(&self, agent: &str, submitter: Option<u32>) -> bool {
        self.roles.iter().any(|r| r.allows(agent) && (r.all_tasks || submitter == Some(self.uid)))
    }
    fn may_audit(&self) -> bool {
        self.roles.iter().any(|r| r.audit)
    }
    /// The parts of the store it may see, narrowed to `agent` if given: every record of the
    /// agents it has `all_tasks` on, and its own of the others.
    fn scopes(&self, agent: Option<&str>) -> Vec<Scope> {
        let mut everything = false;
        let mut agents_all = BTreeSet::new();
        let mut own_any = false;
        let mut own = BTreeSet::new();
        for r in &self.roles {
            for a in &r.agents {
                match (a.as_str(), r.all_tasks) {
                    ("*", true) => everything = true,
                    ("*", false) => own_any = true,
                    (a, true) => {
                        agents_all.insert(a.to_string());
                    }
                    (a, false) => {
                        own.insert(a.to_string());
                    }
                }
            }
        }
        if let Some(a) = agent {
            if everything || agents_all.contains(a) {
                return vec![Scope::Agent(a.to_string())];
            }
            if own_any || own.contains(a) {
                return vec![Scope::Submitter { uid: self.uid, agents: Some(BTreeSet::from([a.to_string()])) }];
            }
            return Vec::new();
        }
        if everything {
            return vec![Scope::All];
        }
        let mut scopes: Vec<Scope> = agents_all.iter().cloned().map(Scope::Agent).collect();
        if own_any {
            scopes.push(Scope::Submitter { uid: self.uid, agents: None });
        } else if !own.is_empty() {
            scopes.push(Scope::Submitter { uid: self.uid, agents: Some(own) });
        }
        scopes
    }
}

/// A JSON error answer.
pub(super) fn error(status: StatusCode, code: &str, message: String) -> Response {
    (status, Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

// The error is the response itself, built once per request; boxing it gains nothing.
#[allow(clippy::result_large_err)]
fn caller(peer: &Peer) -> Result<Caller, Response> {
    // Peers without credentials or roles are refused at accept; this is the second lock.
    match peer.cred {
        Some((uid, _, _)) if !peer.roles.is_empty() => Ok(Caller { uid, roles: peer.roles.clone() }),
        _ => Err(error(StatusCode::FORBIDDEN, "forbidden", "the peer has no role on this agentd".into())),
    }
}

fn denied(c: &Caller, what: &str) -> Response {
    let names: Vec<&str> = c.roles.iter().map(|r| r.name.as_str()).collect();
    error(StatusCode::FORBIDDEN, "forbidden", format!("uid {} (roles: {}) may not {what}", c.uid, names.join(", ")))
}

fn internal(e: impl std::fmt::Display) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// The router.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/agents", get(agents))
        .route("/v1/tasks", post(submit).get(list_tasks))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/tasks/{id}/events", get(events))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/calls", get(calls))
        .route("/v1/audit", get(audit))
        .route("/v1/status", get(status))
        .fallback(|| async {
            error(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see `agentd ctl --help`".into())
        })
        .with_state(api)
}

type Ctx = (State<Arc<Api>>, ConnectInfo<Peer>);

async fn agents((State(api), ConnectInfo(peer)): Ctx) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let list: Vec<Value> = api
        .tasks
        .agents
        .iter()
        .filter(|(name, _)| c.may_use(name))
        .map(|(name, a)| {
            json!({ "name": name, "manifest": a.manifest_path, "tools": a.manifest.tools.keys().map(ToString::to_string).collect::<Vec<_>>(),
                    "max_concurrent_calls": a.cfg.max_concurrent_calls, "max_queued_tasks": a.cfg.max_queued_tasks })
        })
        .collect();
    Json(json!({ "agents": list })).into_response()
}

#[derive(Deserialize)]
struct SubmitBody {
    agent: String,
    task: String,
}

async fn submit(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    body: Result<Json<SubmitBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body must be {{\"agent\": ..., \"task\": ...}}: {e}"),
            )
        }
    };
    if !c.may_use(&body.agent) {
        return denied(&c, &format!("submit to agent {:?}", body.agent));
    }
    let tasks = Arc::clone(&api.tasks);
    let uid = c.uid;
    match tokio::task::spawn_blocking(move || tasks.submit(&body.agent, &body.task, uid)).await {
        Ok(Ok(r)) => (StatusCode::ACCEPTED, Json(r)).into_response(),
        Ok(Err(e)) => submit_error(&e),
        Err(e) => internal(e),
    }
}

fn submit_error(e: &SubmitError) -> Response {
    match e {
        SubmitError::UnknownAgent(_) => error(StatusCode::NOT_FOUND, "unknown_agent", e.to_string()),
        SubmitError::BadTask(_) => error(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
        SubmitError::Busy { retry_after_ms, .. } => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(
                    json!({ "error": { "code": "busy", "message": e.to_string(), "retry_after_ms": retry_after_ms } }),
                ),
            )
                .into_response();
            let secs = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                r.headers_mut().insert("retry-after", v);
            }
            r
        }
        SubmitError::Draining => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "draining", e.to_string());
            r.headers_mut().insert("retry-after", HeaderValue::from_static("5"));
            r
        }
        SubmitError::Store(_) => internal(e),
    }
}

/// A visible task, or the response to give instead.
#[allow(clippy::result_large_err)]
fn visible(api: &Api, c: &Caller, id: &str) -> Result<TaskRecord, Response> {
    match api.tasks.get(id) {
        Ok(Some(t)) if c.may_see(&t.agent, Some(t.submitter_uid)) => Ok(t),
        // Another uid's task, or a task of an agent the caller may not use: as if there were
        // none, so that the answer neither confirms that it exists nor names its agent or
        // submitter.
        Ok(Some(_) | None) => Err(error(StatusCode::NOT_FOUND, "not_found", format!("no task {id}"))),
        Err(e) => Err(internal(e)),
    }
}

async fn task((State(api), ConnectInfo(peer)): Ctx, Path(id): Path<String>) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match visible(&api, &c, &id) {
        Ok(t) => Json(t).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ListQuery {
    agent: Option<String>,
    state: Option<String>,
    task: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

/// Entries in a page unless `?limit=` says otherwise, and the most it may say.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

impl ListQuery {
    // The error is the response itself, built once per request; boxing it gains nothing.
    #[allow(clippy::result_large_err)]
    fn limit(&self) -> Result<usize, Response> {
        match self.limit {
            None => Ok(PAGE),
            Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            Some(n) => Err(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("limit must be between 1 and {MAX_PAGE}, not {n}"),
            )),
        }
    }
}

async fn list_tasks((State(api), ConnectInfo(peer)): Ctx, Query(q): Query<ListQuery>) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let limit = match q.limit() {
        Ok(n) => n,
        Err(r) => return r,
    };
    let state = match q.state.as_deref().map(|s| serde_json::from_value::<TaskState>(json!(s))) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "state must be queued, running, succeeded, failed or cancelled".into(),
            )
        }
    };
    let scopes = c.scopes(q.agent.as_deref());
    page(&api, "tasks", move |tasks| tasks.page(&scopes, state, q.after.as_deref(), limit)).await
}

/// A page of a list as `{key: [...], "next": ...}`, read on a blocking thread once one of
/// [`LISTS_AT_ONCE`] places is free. The place goes with the work: a client that hangs up
/// does not free it early.
async fn page<T: serde::Serialize + Send + 'static>(
    api: &Api,
    key: &str,
    read: impl FnOnce(&Tasks) -> Result<(Vec<T>, Option<String>), SubmitError> + Send + 'static,
) -> Response {
    let Ok(turn) = Arc::clone(&api.lists).acquire_owned().await else { return internal("the daemon is stopping") };
    let tasks = Arc::clone(&api.tasks);
    let read = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        read(&tasks)
    });
    match read.await {
        Ok(Ok((list, next))) => Json(json!({ key: list, "next": next })).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn cancel((State(api), ConnectInfo(peer)): Ctx, Path(id): Path<String>) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = visible(&api, &c, &id) {
        return r;
    }
    let tasks = Arc::clone(&api.tasks);
    let who = format!("uid {}", c.uid);
    match tokio::task::spawn_blocking(move || tasks.cancel(&id, &who)).await {
        Ok(Ok(Some(t))) => Json(t).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "not_found", "no such task".into()),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn calls((State(api), ConnectInfo(peer)): Ctx, Query(q): Query<ListQuery>) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let limit = match q.limit() {
        Ok(n) => n,
        Err(r) => return r,
    };
    // One task's calls: as visible as the task, and as many as it made.
    if let Some(id) = &q.task {
        let t = match visible(&api, &c, id) {
            Ok(t) => t,
            Err(r) => return r,
        };
        let tasks = Arc::clone(&api.tasks);
        return match tokio::task::spawn_blocking(move || tasks.calls_of(&t.calls)).await {
            Ok(Ok(list)) => Json(json!({ "calls": list, "next": null })).into_response(),
            Ok(Err(e)) => internal(e),
            Err(e) => internal(e),
        };
    }
    let scopes = c.scopes(q.agent.as_deref());
    page(&api, "calls", move |tasks| {
        let (ids, next) = tasks.store.page(super::store::Kind::Calls, &scopes, None, q.after.as_deref(), limit)?;
        Ok((tasks.calls_of(&ids)?, next))
    })
    .await
}

async fn audit((State(api), ConnectInfo(peer)): Ctx) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !c.may_audit() {
        return denied(&c, "read audit records");
    }
    let path = api.audit_log.clone();
    match tokio::task::spawn_blocking(move || super::audit_summary(&path)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => internal(e),
    }
}

async fn status((State(api), ConnectInfo(peer)): Ctx) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    // The model's counters (prefix-cache hits among them) say something about other
    // users' prompts: audit roles only.
    let model = if c.may_audit() { api.tasks.backend.describe() } else { json!({ "hidden": "audit roles only" }) };
    let (queued, running) = api.tasks.counts();
    Json(json!({
        "draining": api.tasks.draining(),
        "queued_tasks": queued,
        "running_tasks": running,
        "calls_in_flight": api.tasks.calls.in_flight().len(),
        "max_concurrent_calls": api.tasks.limits.max_concurrent_calls,
        "store": api.tasks.store.counts(),
        "connections": api.admission.counters.snapshot(),
        "model": model,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct EventsQuery {
    from: Option<u64>,
}

fn sse(e: &Event) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.clone())
        .data(serde_json::to_string(e).unwrap_or_else(|_| "{}".into()))
}

fn is_final(e: &Event) -> bool {
    e.kind == "state" && matches!(e.data["state"].as_str(), Some("succeeded" | "failed" | "cancelled"))
}

async fn events(
    (State(api), ConnectInfo(peer)): Ctx,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let c = match caller(&peer) {
        Ok(c) => c,
        Err(r) => return r,
    };
    if let Err(r) = visible(&api, &c, &id) {
        return r;
    }
    let resume =
        headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).map(|n| n + 1);
    let from = resume.or(q.from).unwrap_or(0);
    let (past, rx) = match api.tasks.watch(&id, from) {
        Ok(x) => x,
        Err(e) => return internal(e),
    };
    let done = past.iter().any(is_final) || rx.is_none();
    let mut next = past.last().map_or(from, |e| e.seq + 1);
    let head = tokio_stream::iter(past.iter().map(sse).map(Ok::<_, Infallible>).collect::<Vec<_>>());
    let tasks = Arc::clone(&api.tasks);
    let live = async_stream(rx.filter(|_| !done), api.stopping.clone(), move |e: &Event| {
        // Events a slow watcher missed are read back from the live task or the store.
        if e.seq < next {
            return (Vec::new(), false);
        }
        let mut out = Vec::new();
        if e.seq > next {
            if let Ok((missed, _)) = tasks.watch(&id, next) {
                out.extend(missed.into_iter().filter(|m| m.seq < e.seq));
            }
        }
        out.push(e.clone());
        next = e.seq + 1;
        let end = out.iter().any(is_final);
        (out, end)
    });
    let stream = head.chain(live.map(|e| Ok::<_, Infallible>(sse(&e))));
    // Keep-alives count as traffic for the idle timeout, so they come well within it.
    let every = Duration::from_millis(api.admission.limits.idle_timeout_ms / 3).min(Duration::from_secs(15));
    Sse::new(stream).keep_alive(KeepAlive::new().interval(every)).into_response()
}

/// The live part of an event stream: each broadcast event goes through `f`, which returns
/// the events to send and whether the stream ends after them. It also ends when the daemon
/// stops (`stopping`), so that open streams never hold up its shutdown.
fn async_stream(
    rx: Option<tokio::sync::broadcast::Receiver<Event>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    mut f: impl FnMut(&Event) -> (Vec<Event>, bool) + Send + 'static,
) -> impl tokio_stream::Stream<Item = Event> + Send {
    let (tx, out) = tokio::sync::mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let Some(mut rx) = rx else { return };
        loop {
            let got = tokio::select! {
                got = rx.recv() => got,
                _ = stopping.wait_for(|s| *s) => return,
                () = tx.closed() => return,
            };
            let e = match got {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let (send, end) = f(&e);
            for ev in send {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(out)
}
