//! Third-party MCP servers of a manifest (`[mcp.NAME]`), offered through `agentd mcp` as
//! `NAME.TOOL`. Each server runs as `agentd exec --mcp-server NAME`: in its own sandbox,
//! under its own call id, speaking MCP on exec's stdin and stdout, to which agentd is the
//! client (rmcp).
//!
//! - At start, the server's `tools/list` is fetched once, in a sandbox; only the tools the
//!   manifest lists are offered, and the listing's SHA-256 is kept. A listed tool the server
//!   does not have is reported.
//! - `lifetime = "call"`: each `tools/call` starts the server in a fresh sandbox,
//!   initializes it, makes the one call and ends it. Nothing persists between calls.
//! - `lifetime = "session"`: one sandbox of the server per client session, started at the
//!   session's first call of it and ended with the session (or when a call is cancelled, or
//!   the sandbox's `timeout_ms` ends it: the next call starts a fresh one). Its calls are
//!   made one at a time. Each still has its own call id: a `call_start` and a `summary`
//!   record that name the sandbox's call id and the call's window of kernel time
//!   (`from_ktime_ns`, `to_ktime_ns`, CLOCK_MONOTONIC): the sandbox's records whose
//!   `ktime_ns` is in it are that call's. (Records are written in batches, up to a moment
//!   after the events, so their place in the log does not say which call they belong to.)
//! - A call of a tool the manifest does not list never reaches a server.
//! - What a server says about itself is not trusted: its tools are rebuilt from their name,
//!   description and schemas (no annotations such as `readOnlyHint`, no icons a client would
//!   fetch), and `agentd/*` keys in its results' `_meta` are agentd's alone. A message from
//!   the server longer than the server's `limits.output_bytes` ends the call.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use agentd_policy::{McpLifetime, McpServer};
use rmcp::model::{CallToolRequestParams, CallToolResult, JsonObject, Tool};
use rmcp::service::{RunningService, ServiceExt};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::RoleClient;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use super::{cancel_call, failure, sandbox_result, sigterm, verdict, Calls};

/// MCP's longest tool name.
const MAX_TOOL_NAME: usize = 128;

/// How long a server has to start and answer `initialize` and `tools/list`.
const START: Duration = Duration::from_secs(30);

/// How long a server has to exit once its client has gone, before its sandbox is ended.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// One `[mcp.NAME]` server, as discovered at start.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `NAME`.
    pub name: String,
    /// The tools offered, renamed `NAME.TOOL`.
    pub tools: Vec<Tool>,
    /// SHA-256 of the server's own listing of the offered tools, hex.
    pub listing: String,
    /// The longest message taken from the server: its `limits.output_bytes`.
    pub max_message: usize,
    /// A sandbox per call, or per client session.
    pub lifetime: McpLifetime,
}

impl Upstream {
    /// The server's own name of the offered tool `exposed` (`NAME.TOOL`), if it is one.
    pub fn original<'a>(&self, exposed: &'a str) -> Option<&'a str> {
        let tool = exposed.strip_prefix(self.name.as_str())?.strip_prefix('.')?;
        self.tools.iter().any(|t| t.name == exposed).then_some(tool)
    }
}

/// A server's `agentd exec`, ended with its sandbox if it is dropped while it runs (a call
/// abandoned while its server starts, a session's handler dropped): SIGTERM, which ends the
/// call and records it, and the call's cgroup killed after a grace.
struct Exec {
    child: Child,
    call_id: String,
}

impl Exec {
    fn id(&self) -> Option<u32> {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Ends the sandbox now: SIGTERM to exec, and its cgroup killed after a grace.
    fn kill(&mut self) {
        if !self.exited() {
            cancel_call(self.id(), &self.call_id);
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server started in its sandbox, with agentd as its client.
struct Session {
    child: Exec,
    client: RunningService<RoleClient, ()>,
}

/// Starts `[mcp.NAME]` under `call_id` and initializes it.
async fn start(calls: &Calls, name: &str, call_id: &str, max_message: usize) -> Result<Session, String> {
    let cmd = calls.exec_command(&["--mcp-server", name, "--call-id", call_id]);
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| format!("running agentd exec --mcp-server {name}: {e}"))?;
    // From here, dropping this (the caller gave up) ends the sandbox.
    let mut child = Exec { child, call_id: call_id.to_string() };
    let (Some(stdout), Some(stdin)) = (child.child.stdout.take(), child.child.stdin.take()) else {
        return Err("agentd exec has no stdio".into());
    };
    // The server's own stderr, and agentd exec's refusals, as they come, line by line.
    if let Some(err) = child.child.stderr.take() {
        let (server, call) = (name.to_string(), call_id.to_string());
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(err);
            let mut line = Vec::new();
            while lines.read_until(b'\n', &mut line).await.is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if text.starts_with("agentd: ") {
                    tracing::warn!(server, call_id = call, line = text, "mcp: agentd exec");
                } else if !text.is_empty() {
                    tracing::info!(server, call_id = call, line = text, "mcp: the server's stderr");
                }
                line.clear();
            }
        });
    }
    let transport = AsyncRwTransport::<RoleClient, _, _>::new(stdout, stdin).with_max_line_length(max_message);
    match tokio::time::timeout(START, ().serve(transport)).await {
        Ok(Ok(client)) => Ok(Session { child, client }),
        Ok(Err(e)) => {
            end(child, EXIT_GRACE).await;
            Err(format!("MCP server {name} did not start (call {call_id}): {e}"))
        }
        Err(_) => {
            end(child, Duration::ZERO).await;
            Err(format!("MCP server {name} did not answer initialize within {} s (call {call_id})", START.as_secs()))
        }
    }
}

/// Waits up to `grace` for the server's `agentd exec` to end; then SIGTERM, which ends the
/// call and records it.
async fn end(mut child: Exec, grace: Duration) {
    if tokio::time::timeout(grace, child.child.wait()).await.is_ok() {
        return;
    }
    sigterm(child.id());
    let _ = child.child.wait().await;
}

/// Closes the session: the client goes, the server sees end of file on its stdin.
async fn close(s: Session) {
    let Session { child, client } = s;
    // A server that does not read its input could hold the client's last write.
    let _ = tokio::time::timeout(EXIT_GRACE, client.cancel()).await;
    end(child, EXIT_GRACE).await;
}

/// Fetches `[mcp.NAME]`'s tools in a sandbox and keeps those the manifest offers.
pub async fn discover(calls: &Calls, name: &str, server: &McpServer) -> Result<Upstream, String> {
    let call_id = uuid::Uuid::now_v7().to_string();
    let max_message = usize::try_from(server.sandbox.limits.output_bytes).unwrap_or(usize::MAX).max(4096);
    let s = start(calls, name, &call_id, max_message).await?;
    let listed = tokio::time::timeout(START, s.client.list_all_tools()).await;
    close(s).await;
    let listed = match listed {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("MCP server {name}: tools/list failed (call {call_id}): {e}")),
        Err(_) => {
            return Err(format!("MCP server {name}: tools/list took over {} s (call {call_id})", START.as_secs()))
        }
    };
    let mut offered: Vec<Tool> = Vec::new();
    for t in listed {
        let wanted = server.tools.iter().any(|n| *n == t.name);
        if !wanted || offered.iter().any(|o| o.name == t.name) {
            continue;
        }
        if name.len() + 1 + t.name.len() > MAX_TOOL_NAME {
            tracing::warn!(server = name, tool = %t.name, "mcp: NAME.TOOL would be longer than MCP's 128; not offered");
            continue;
        }
        // Only what a client needs to call it: hints and icons are the server's word.
        let mut tool = Tool::new(t.name.clone(), t.description.clone().unwrap_or_default(), t.input_schema.clone());
        tool.output_schema = t.output_schema.clone();
        offered.push(tool);
    }
    offered.sort_by(|a, b| a.name.cmp(&b.name));
    for missing in server.tools.iter().filter(|n| !offered.iter().any(|t| t.name == n.as_str())) {
        tracing::warn!(server = name, tool = %missing, "mcp: a tool the manifest lists is not offered by the server");
    }
    let bytes = serde_json::to_vec(&offered).map_err(|e| format!("MCP server {name}: its tool list: {e}"))?;
    let listing = hex(&Sha256::digest(&bytes));
    if let Some(pinned) = server.listing_sha256.as_deref().filter(|p| *p != listing) {
        return Err(format!(
            "MCP server {name}: its listing of the offered tools changed: the manifest pins listing_sha256 = \"{pinned}\", \
             and the server now lists {listing} (call {call_id}). Review what its tools now say (`agentd exec \
             --mcp-server {name}` speaks MCP on stdio), then update the pin"
        ));
    }
    tracing::info!(server = name, tools = offered.len(), listing = %listing, call_id, pinned = server.listing_sha256.is_some(), "mcp: server discovered");
    let tools = offered
        .into_iter()
        .map(|mut t| {
            t.name = format!("{name}.{}", t.name).into();
            t
        })
        .collect();
    Ok(Upstream { name: name.to_string(), tools, listing, max_message, lifetime: server.lifetime })
}

/// Fetches the tools of every `[mcp.NAME]` server of `manifest`, one after another, each in
/// its sandbox. The first server that cannot be listed (or whose pinned listing changed)
/// stops it: the manifest says its tools are there.
pub async fn discover_all(calls: &Calls, manifest: &agentd_policy::Manifest) -> Result<Vec<Upstream>, String> {
    let mut upstreams = Vec::new();
    for (name, server) in &manifest.mcp {
        upstreams.push(discover(calls, name.as_str(), server).await?);
    }
    Ok(upstreams)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One `tools/call` of a server's tool: which, with what, for whom.
pub struct Request<'a> {
    /// The call's id: the sandbox's with `lifetime = "call"`, the call's own records' with
    /// `lifetime = "session"`.
    pub call_id: String,
    /// The server's own name of the tool.
    pub tool: &'a str,
    /// Its arguments.
    pub arguments: Option<JsonObject>,
    /// Cancelled when the client gives up: the call's sandbox is then ended.
    pub ct: CancellationToken,
    /// The uid the call is made for, when it is known.
    pub caller: Option<u32>,
}

/// Runs one `tools/call` of `up`'s tool: in a fresh sandbox of the server, or in the
/// client session's sandbox of it (`sessions`).
pub async fn call(calls: &Calls, up: &Upstream, req: Request<'_>, sessions: &SessionSandboxes) -> CallToolResult {
    if up.lifetime == McpLifetime::Session {
        return call_in_session(calls, up, req, sessions).await;
    }
    let Request { call_id, tool, arguments, ct, caller } = req;
    tracing::info!(server = up.name, tool, caller, call_id, "mcp: a call of a server's tool");
    let cancelled = || cancelled(&call_id);
    let s = tokio::select! {
        biased;
        () = ct.cancelled() => return cancelled(),
        s = start(calls, &up.name, &call_id, up.max_message) => s,
    };
    let s = match s {
        Ok(s) => s,
        Err(e) => return failure(&call_id, "failed", &e),
    };
    let params = request(tool, arguments);
    let outcome = tokio::select! {
        biased;
        () = ct.cancelled() => None,
        r = s.client.call_tool(params) => Some(r),
    };
    let Some(outcome) = outcome else {
        cancel_call(s.child.id(), &call_id);
        close(s).await;
        return cancelled();
    };
    close(s).await;
    // What agentd says of the server's sandbox, beside what the server said.
    let sandbox = sandbox_result(&calls.audit_log, &call_id).await;
    let agentd_verdict = sandbox.as_ref().map_or("unknown", |r| verdict(r, false));
    let events = sandbox.as_ref().map(|r| r["events"].clone()).unwrap_or_else(|| json!({"denied": 0}));
    answer(up, &call_id, outcome, agentd_verdict, Some(&events))
}

/// The `tools/call` request of the server's `tool`.
fn request(tool: &str, arguments: Option<JsonObject>) -> CallToolRequestParams {
    let params = CallToolRequestParams::new(tool.to_string());
    match arguments {
        Some(a) => params.with_arguments(a),
        None => params,
    }
}

/// A cancelled call's result.
fn cancelled(call_id: &str) -> CallToolResult {
    tracing::info!(call_id, "mcp: the client cancelled the call");
    failure(call_id, "cancelled", "cancelled by the client")
}

/// What the server answered, with agentd's verdict on its sandbox (`agentd_verdict`, and its
/// audit `events` counts, `total` and `denied`, when they are known by now) in `_meta`; a call
/// whose sandbox ran out of time or memory fails, whatever the server managed to write before.
fn answer(
    up: &Upstream,
    call_id: &str,
    outcome: Result<CallToolResult, rmcp::ServiceError>,
    agentd_verdict: &str,
    events: Option<&Value>,
) -> CallToolResult {
    match outcome {
        Ok(_) | Err(_) if matches!(agentd_verdict, "timed_out" | "oom_killed") => failure(
            call_id,
            agentd_verdict,
            &format!("MCP server {}: its sandbox was ended: {agentd_verdict}", up.name),
        ),
        Ok(mut r) => {
            let mut meta = r.meta.take().unwrap_or_default();
            // agentd's keys are agentd's: a server cannot speak for it.
            meta.0.retain(|k, _| !k.starts_with("agentd/"));
            meta.0.insert("agentd/call_id".into(), Value::from(call_id));
            meta.0.insert("agentd/server_listing".into(), Value::from(up.listing.clone()));
            meta.0.insert("agentd/verdict".into(), Value::from(agentd_verdict));
            if let Some(events) = events {
                meta.0.insert("agentd/denied_events".into(), Value::from(events["denied"].as_u64().unwrap_or(0)));
                if let Some(total) = events["total"].as_u64() {
                    meta.0.insert("agentd/events".into(), Value::from(total));
                }
            }
            r.meta = Some(meta);
            r
        }
        Err(e) => failure(
            call_id,
            "failed",
            &format!(
                "MCP server {} did not answer the call ({e}): it exited, or wrote something that is not MCP",
                up.name
            ),
        ),
    }
}

/// The sandboxes of one client session's `lifetime = "session"` servers, by server name.
/// Dropped with the session, and each sandbox then ended (see [`Live`]).
#[derive(Default)]
pub struct SessionSandboxes(std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Live>>>>>);

impl SessionSandboxes {
    /// The place of `server`'s sandbox; its lock makes the server's calls one at a time.
    fn slot(&self, server: &str) -> Arc<tokio::sync::Mutex<Option<Live>>> {
        let mut m = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(m.entry(server.to_string()).or_default())
    }

    /// Ends every sandbox now, each as a session's end does (the server sees its input end;
    /// its exec gets SIGTERM after a grace), and waits for them: for a client that goes
    /// away itself (`agentd run`, a daemon's task) rather than with its runtime.
    pub async fn close_all(&self) {
        let slots: Vec<_> = self.0.lock().unwrap_or_else(PoisonError::into_inner).drain().map(|(_, s)| s).collect();
        for slot in slots {
            let session = slot.lock().await.as_mut().and_then(|l| l.session.take());
            if let Some(s) = session {
                close(s).await;
            }
        }
    }
}

/// A session's sandbox of a server, running under its own call id; ended when dropped.
pub struct Live {
    session: Option<Session>,
    call_id: String,
    /// Its place among the session sandboxes alive ([`Calls::session_sandboxes`]).
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl Live {
    /// Whether its `agentd exec` has ended (the server exited, or the sandbox's timeout).
    fn ended(&mut self) -> bool {
        self.session.as_mut().is_none_or(|s| s.child.exited())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let Some(s) = self.session.take() else { return };
        tracing::info!(call_id = self.call_id, "mcp: ending a session's server sandbox");
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // The server sees its input end and exits; if it does not, exec gets SIGTERM
            // (and if the runtime goes first, dropping the exec ends the sandbox).
            rt.spawn(close(s));
        }
    }
}

/// Appends one record of `call_id` to the audit log; whether it was written.
async fn mark(calls: &Calls, call_id: &str, tool: &str, kind: agentd_audit::Kind, details: Value) -> bool {
    let (log, entry) = (
        calls.audit_log.clone(),
        agentd_audit::Entry::new(call_id, tool, kind, agentd_audit::Verdict::Allowed, details),
    );
    let written = tokio::task::spawn_blocking(move || {
        agentd_audit::AuditLog::open(&log).and_then(|mut l| l.append(&[entry])).map_err(|e| e.to_string())
    })
    .await;
    let ok = matches!(written, Ok(Ok(_)));
    if !ok {
        tracing::warn!(call_id, ?written, "mcp: a record of a session call could not be written");
    }
    ok
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the BPF layer's `ktime_ns`.
fn ktime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |t| u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0))
}

/// One call in the client session's sandbox of the server, started if there is none (or
/// the last one ended).
async fn call_in_session(
    calls: &Calls,
    up: &Upstream,
    req: Request<'_>,
    sessions: &SessionSandboxes,
) -> CallToolResult {
    let Request { call_id, tool, arguments, ct, caller } = req;
    let exposed = format!("{}.{tool}", up.name);
    let slot = sessions.slot(&up.name);
    let mut live = tokio::select! {
        biased;
        () = ct.cancelled() => return cancelled(&call_id),
        l = slot.lock_owned() => l,
    };
    if live.as_mut().is_some_and(Live::ended) {
        *live = None;
    }
    if live.is_none() {
        let Ok(place) = Arc::clone(&calls.session_sandboxes).try_acquire_owned() else {
            return failure(
                &call_id,
                "refused",
                "busy: as many session sandboxes of MCP servers as allowed (the limit of calls at once) are \
                 alive; one must end first (with its client's session)",
            );
        };
        let sandbox_id = uuid::Uuid::now_v7().to_string();
        let started = tokio::select! {
            biased;
            () = ct.cancelled() => return cancelled(&call_id),
            s = start(calls, &up.name, &sandbox_id, up.max_message) => s,
        };
        match started {
            Ok(s) => *live = Some(Live { session: Some(s), call_id: sandbox_id, _place: place }),
            Err(e) => return failure(&call_id, "failed", &e),
        }
    }
    let Some((l, Some(session))) = live.as_mut().map(|l| (l.call_id.clone(), l.session.as_ref())) else {
        return failure(&call_id, "failed", "the session's sandbox is gone");
    };
    let sandbox_id = l;
    let started = mark(
        calls,
        &call_id,
        &exposed,
        agentd_audit::Kind::CallStart,
        json!({"mcp_server": up.name, "lifetime": "session", "sandbox_call_id": sandbox_id, "caller_uid": caller}),
    )
    .await;
    if !started {
        // Nothing runs unrecorded.
        return failure(&call_id, "refused", "the call could not be recorded in the audit log");
    }
    let params = request(tool, arguments);
    let from = ktime_ns();
    let outcome = tokio::select! {
        biased;
        () = ct.cancelled() => None,
        r = session.client.call_tool(params) => Some(r),
    };
    let to = ktime_ns();
    if outcome.is_none() {
        // A cancelled call ends the sandbox at once: what the server was doing for it stops.
        if let Some(s) = live.as_mut().and_then(|l| l.session.as_mut()) {
            s.child.kill();
        }
    }
    let ended = outcome.is_none() || live.as_mut().is_some_and(Live::ended);
    if ended {
        *live = None;
    }
    let sandbox = if ended { sandbox_result(&calls.audit_log, &sandbox_id).await } else { None };
    // While the sandbox lives, agentd cannot yet say what it did during the call: its
    // records may still be on their way, and its verdict is its summary's, at its end.
    let agentd_verdict = match (&outcome, &sandbox) {
        (None, _) => "cancelled",
        (_, Some(r)) => verdict(r, false),
        _ => "unknown",
    };
    mark(
        calls,
        &call_id,
        &exposed,
        agentd_audit::Kind::Summary,
        json!({"exit_code": null, "mcp_server": up.name, "lifetime": "session", "sandbox_call_id": sandbox_id, "caller_uid": caller,
               "from_ktime_ns": from, "to_ktime_ns": to, "verdict": agentd_verdict, "sandbox_ended": ended}),
    )
    .await;
    match outcome {
        None => cancelled(&call_id),
        Some(outcome) => answer(up, &call_id, outcome, agentd_verdict, None),
    }
}
