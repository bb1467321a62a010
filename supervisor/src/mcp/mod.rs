//! agentd as an MCP server: a manifest's tools, each `tools/call` run as one `agentd exec`
//! (its own sandbox, audit records and call id), through the official Rust SDK (`rmcp`).
//!
//! - `tools/list`: each tool with its description and an `inputSchema` generated from
//!   `[tools.X.args]` ([`agentd_policy::schema::input_schema`]).
//! - `tools/call`: the arguments go to `agentd exec --args-json -`, which checks them with
//!   the same code as `--arg` and records a refusal like any other. The result's content is
//!   the tool's stdout (and stderr); `isError` is set for anything but a clean exit; the
//!   structured content carries the verdict, the call id and the event counts.
//! - A call that runs longer than a second sends progress notifications, when the client
//!   asked for them with a progress token.
//! - `notifications/cancelled`: the call's `agentd exec` gets SIGTERM, which kills the call's
//!   cgroup and records it; its cgroup is killed again after a grace, in case exec had not
//!   yet set up its own handling.
//!
//! Each call is a process of its own rather than a thread of this one so that a call that
//! brings its supervisor down takes nothing else with it, and so that exactly the code of
//! `agentd exec` runs it.
//!
//! The manifest's third-party MCP servers (`[mcp.NAME]`) are offered too, as `NAME.TOOL`:
//! see [`upstream`].

pub mod offer;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentd_policy::{Manifest, McpLifetime};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// How long a cancelled call's `agentd exec` has to end the call itself before its cgroup is
/// killed from here.
const CANCEL_GRACE: Duration = Duration::from_secs(3);

/// How often a running call reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What every call needs: where the manifest and the audit log are, and agentd's binary.
#[derive(Debug, Clone)]
pub struct Calls {
    /// `agentd exec --manifest`.
    pub manifest_path: PathBuf,
    /// `agentd exec --audit-log`.
    pub audit_log: PathBuf,
    /// agentd's own binary.
    pub exe: PathBuf,
    /// The manifest's SHA-256 when the server read it: a call refuses to run under an
    /// edited one (`agentd exec --manifest-sha256`).
    pub manifest_sha256: String,
    /// Calls that may run at once, over every session.
    pub max_calls: Arc<tokio::sync::Semaphore>,
    /// Sandboxes of `lifetime = "session"` servers that may be alive at once, over every
    /// session: each holds a place from its start to its end.
    pub session_sandboxes: Arc<tokio::sync::Semaphore>,
}

impl Calls {
    /// `agentd exec` for this manifest and audit log, with `args`, its stdio piped; it gets
    /// SIGTERM if this server goes away, and then ends its call and records it.
    pub fn exec_command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("exec")
            .args(args)
            .arg("--manifest")
            .arg(&self.manifest_path)
            .arg("--audit-log")
            .arg(&self.audit_log)
            .arg("--manifest-sha256")
            .arg(&self.manifest_sha256)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        crate::sys::signal_with_parent(&mut cmd, libc::SIGTERM);
        cmd
    }
}

/// Where a daemon runs the manifest's own tools: its pool of sandbox workers, for the caller
/// its transport says (see `serve::mcp`), rather than an `agentd exec` per call.
pub trait Pool: Send + Sync + 'static {
    /// The uid a request came from, if it may call this agent's tools now; `Err` says why
    /// not (its role, or a daemon that is stopping).
    fn caller(&self, request: &rmcp::model::Extensions) -> Result<u32, String>;
    /// Runs one call to its end (blocking) and returns its result, in the shape of
    /// `agentd exec --json`.
    fn run(&self, uid: u32, call_id: &str, tool: &str, args: std::collections::BTreeMap<String, String>) -> Value;
    /// Ends a call: a waiting one is dropped, a running one killed (blocking).
    fn cancel(&self, call_id: &str);
    /// Records, before it runs, that `uid` calls the server tool `tool` under `call_id`
    /// (blocking); `Err` says why it could not be, and the call then does not run.
    fn server_call_started(&self, uid: u32, call_id: &str, tool: &str) -> Result<(), String>;
    /// Records the end of that call, with its result in `agentd exec --json`'s shape.
    fn server_call_ended(&self, call_id: &str, result: &Value);
}

/// The MCP server of one manifest, in one client session.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
    /// This session's sandboxes of `lifetime = "session"` servers.
    sessions: Arc<upstream::SessionSandboxes>,
}

/// Calls one uid may have in flight on one agent's MCP endpoint of a daemon, waiting ones
/// included: what a uid's requests may hold of the daemon's memory and turns is bounded.
pub const PER_UID_IN_FLIGHT: usize = 16;

/// Calls in flight per uid.
#[derive(Default)]
struct Held(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// One call's place among its uid's, given back when dropped.
struct Place<'a>(&'a Held, u32);

impl Held {
    fn admit(&self, uid: u32) -> Option<Place<'_>> {
        let mut m = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(uid).or_default();
        if *n >= PER_UID_IN_FLIGHT {
            return None;
        }
        *n += 1;
        Some(Place(self, uid))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut m = (self.0).0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

struct Inner {
    held: Held,
    calls: Calls,
    agent: String,
    tools: Vec<Tool>,
    upstreams: Vec<upstream::Upstream>,
    pool: Option<Arc<dyn Pool>>,
}

impl Server {
    /// A server for `manifest`'s tools, and the tools `upstreams` offer.
    pub fn new(manifest: &Manifest, calls: Calls, upstreams: Vec<upstream::Upstream>) -> Self {
        let tools = manifest
            .tools
            .iter()
            .map(|(name, tool)| {
                Tool::new(
                    name.to_string(),
                    tool.description.clone(),
                    Arc::new(agentd_policy::schema::input_schema(tool)),
                )
            })
            .chain(upstreams.iter().flat_map(|u| u.tools.iter().cloned()))
            .collect();
        Self {
            inner: Arc::new(Inner {
                held: Held::default(),
                calls,
                agent: manifest.agent.name.to_string(),
                tools,
                upstreams,
                pool: None,
            }),
            sessions: Arc::default(),
        }
    }

    /// The same server for another client session: its own session sandboxes.
    pub fn for_new_session(&self) -> Self {
        Self { inner: Arc::clone(&self.inner), sessions: Arc::default() }
    }

    /// The same, with the manifest's own tools run by a daemon's `pool`.
    pub fn with_pool(
        manifest: &Manifest,
        calls: Calls,
        upstreams: Vec<upstream::Upstream>,
        pool: Arc<dyn Pool>,
    ) -> Self {
        let mut server = Self::new(manifest, calls, upstreams);
        if let Some(inner) = Arc::get_mut(&mut server.inner) {
            inner.pool = Some(pool);
        }
        server
    }

    /// Runs one call of a manifest tool in a daemon's pool: the arguments are turned into
    /// texts as `agentd exec --args-json` does, and checked by the worker as any call's.
    async fn call_in_pool(
        &self,
        pool: &Arc<dyn Pool>,
        uid: u32,
        params: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> CallToolResult {
        let call_id = uuid::Uuid::now_v7().to_string();
        let tool = params.name.to_string();
        let args = match agentd_policy::schema::args_from_json(&params.arguments.unwrap_or_default()) {
            Ok(a) => a,
            Err(e) => {
                let why = format!("--args-json: {e}");
                self.record_refusal(&call_id, &tool, &why).await;
                return render(&agentd_sandbox::runner::refused_value(&call_id, &tool, &why), &call_id, false);
            }
        };
        tracing::info!(call_id, tool, uid, agent = %self.inner.agent, "mcp: tools/call in the daemon's pool");
        let run = {
            let (pool, call_id, tool) = (Arc::clone(pool), call_id.clone(), tool.clone());
            tokio::task::spawn_blocking(move || pool.run(uid, &call_id, &tool, args))
        };
        let cancel = {
            let (pool, call_id) = (Arc::clone(pool), call_id.clone());
            move || {
                tokio::task::spawn_blocking(move || pool.cancel(&call_id));
            }
        };
        let (out, cancelled) = follow(run, &ctx, &tool, &call_id, cancel).await;
        match out {
            Ok(r) => render(&r, &call_id, cancelled),
            Err(e) => failure(&call_id, "failed", &format!("the daemon's call ended abnormally: {e}")),
        }
    }

    /// Runs one call of a server's tool (`exposed`, as the client named it); in a daemon,
    /// recorded in its store, with the caller, before and after.
    async fn call_server(
        &self,
        up: &upstream::Upstream,
        req: upstream::Request<'_>,
        exposed: &str,
        caller: Option<u32>,
    ) -> CallToolResult {
        let (Some(pool), Some(uid)) = (self.inner.pool.clone(), caller) else {
            return upstream::call(&self.inner.calls, up, req, &self.sessions).await;
        };
        let (call_id, tool, started) = (req.call_id.clone(), exposed.to_string(), std::time::Instant::now());
        let recorded = {
            let (pool, call_id, tool) = (Arc::clone(&pool), call_id.clone(), tool.clone());
            tokio::task::spawn_blocking(move || pool.server_call_started(uid, &call_id, &tool)).await
        };
        match recorded {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return failure(&call_id, "refused", &why),
            Err(e) => return failure(&call_id, "refused", &format!("the call could not be recorded: {e}")),
        }
        let result = upstream::call(&self.inner.calls, up, req, &self.sessions).await;
        let shaped = offer::exec_shaped(&call_id, &tool, &up.name, &result, started);
        let _ = tokio::task::spawn_blocking(move || pool.server_call_ended(&call_id, &shaped)).await;
        result
    }

    /// Runs one call to its end (or its cancellation) and renders its result.
    async fn call(&self, params: CallToolRequestParams, ctx: RequestContext<RoleServer>) -> CallToolResult {
        let call_id = uuid::Uuid::now_v7().to_string();
        let tool = params.name.to_string();
        let args = Value::Object(params.arguments.unwrap_or_default()).to_string();
        let cmd =
            self.inner.calls.exec_command(&["--json", "--call-id", &call_id, "--tool", &tool, "--args-json", "-"]);
        let mut child = match tokio::process::Command::from(cmd).spawn() {
            Ok(c) => c,
            Err(e) => return failure(&call_id, "failed", &format!("running agentd exec: {e}")),
        };
        let pid = child.id();
        if let Some(mut stdin) = child.stdin.take() {
            // A failed write leaves exec with partial JSON, which it refuses (and records).
            let _ = stdin.write_all(args.as_bytes()).await;
        }
        tracing::info!(call_id, tool, agent = %self.inner.agent, "mcp: tools/call");
        // The child is not reaped before its output is complete, so its pid is its own.
        let cancel = {
            let call_id = call_id.clone();
            move || cancel_call(pid, &call_id)
        };
        let (out, cancelled) = follow(child.wait_with_output(), &ctx, &tool, &call_id, cancel).await;
        let out = match out {
            Ok(o) => o,
            Err(e) => return failure(&call_id, "failed", &format!("waiting for agentd exec: {e}")),
        };
        match serde_json::from_slice::<Value>(&out.stdout) {
            Ok(r) => render(&r, &call_id, cancelled),
            Err(e) => failure(
                &call_id,
                "failed",
                &format!("agentd exec gave no result ({e}): {}", String::from_utf8_lossy(&out.stderr).trim()),
            ),
        }
    }

    /// Records a call refused before any sandbox was asked for (a tool that is not offered,
    /// arguments that are not texts).
    async fn record_refusal(&self, call_id: &str, tool: &str, msg: &str) {
        let call_id = call_id.to_string();
        // The name is the client's: bounded, as a record's field.
        let tool: String = tool.chars().take(200).collect();
        let (log, msg) = (self.inner.calls.audit_log.clone(), msg.chars().take(2000).collect::<String>());
        let recorded = tokio::task::spawn_blocking(move || {
            let mut log = agentd_audit::AuditLog::open(&log).map_err(|e| agentd_policy::error_chain(&e))?;
            agentd_sandbox::runner::refuse_recorded(&mut log, &call_id, &tool, msg);
            Ok::<(), String>(())
        })
        .await;
        if !matches!(recorded, Ok(Ok(()))) {
            tracing::warn!(?recorded, "mcp: a refused call could not be recorded");
        }
    }
}

/// Waits for a call (`run`) while reporting progress every [`PROGRESS_EVERY`] to a client
/// that asked for it, and calls `cancel` once if the client cancels. Returns the call's end
/// and whether it was cancelled.
async fn follow<T>(
    run: impl std::future::Future<Output = T>,
    ctx: &RequestContext<RoleServer>,
    tool: &str,
    call_id: &str,
    cancel: impl FnOnce(),
) -> (T, bool) {
    let progress = ctx.meta.get_progress_token();
    let mut run = std::pin::pin!(run);
    let mut cancel = Some(cancel);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let mut seconds = 0u64;
    loop {
        tokio::select! {
            biased;
            out = &mut run => return (out, cancel.is_none()),
            () = ctx.ct.cancelled(), if cancel.is_some() => {
                tracing::info!(call_id, "mcp: the client cancelled the call");
                if let Some(c) = cancel.take() {
                    c();
                }
            }
            _ = tick.tick() => {
                seconds += 1;
                if let Some(token) = &progress {
                    let note = ProgressNotificationParam::new(token.clone(), seconds as f64)
                        .with_message(format!("{tool} has run {seconds} s in its sandbox (call {call_id})"));
                    // Not waited for here: a client that does not read must not hold up the
                    // call, its cancellation or its end. A note it cannot take is dropped.
                    let peer = ctx.peer.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(PROGRESS_EVERY, peer.notify_progress(note)).await;
                    });
                }
            }
        }
    }
}

/// How much of the audit log's end is searched for a call's summary: it is written as the
/// call ends, so only calls that ended since (from other supervisors) can be after it.
const SUMMARY_TAIL: u64 = 8 << 20;

/// The summary record of `call_id` (its `details`), in the shape of an `agentd exec --json`
/// result: what agentd itself says of a call whose output went elsewhere (a server's).
async fn sandbox_result(audit_log: &std::path::Path, call_id: &str) -> Option<Value> {
    let (log, id) = (audit_log.to_path_buf(), call_id.to_string());
    let found = tokio::task::spawn_blocking(move || -> Option<Value> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&log).ok()?;
        let len = f.metadata().ok()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(SUMMARY_TAIL))).ok()?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).ok()?;
        String::from_utf8_lossy(&tail)
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["call_id"] == id.as_str() && r["kind"] == "summary")
    })
    .await
    .ok()??;
    let d = &found["details"];
    Some(json!({
        "exit_code": d["exit_code"],
        "signal": d["signal"],
        "timed_out": d["timed_out"],
        "oom_killed": d["oom_killed"],
        "error": d["error"],
        "events": {"total": d["events"], "denied": d["denied_events"], "lost": d["lost_events"]},
    }))
}

/// The verdict of an `agentd exec --json` result.
fn verdict(r: &Value, cancelled: bool) -> &'static str {
    let denied = r["events"]["denied"].as_u64().unwrap_or(0);
    match r["exit_code"].as_i64() {
        _ if cancelled => "cancelled",
        _ if r["timed_out"].as_bool() == Some(true) => "timed_out",
        _ if r["oom_killed"].as_bool() == Some(true) => "oom_killed",
        _ if crate::agent::run::succeeded(r) && denied == 0 => "ok",
        _ if crate::agent::run::succeeded(r) => "ok_with_denials",
        // A tool may exit 125 itself: only a call agentd refused says why.
        Some(n) if n == i64::from(agentd_sandbox::runner::EXIT_REFUSED) && r["error"].is_string() => "refused",
        _ => "failed",
    }
}

/// An exec result as an MCP tool result.
fn render(r: &Value, call_id: &str, cancelled: bool) -> CallToolResult {
    let verdict = verdict(r, cancelled);
    let text = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    // The most telling block first: an error's first block is its message when the tool
    // printed nothing.
    let mut content = Vec::new();
    if !text("stdout").is_empty() {
        content.push(ContentBlock::text(text("stdout")));
    }
    if !text("stderr").is_empty() {
        content.push(ContentBlock::text(format!("stderr:\n{}", text("stderr"))));
    }
    if let Some(e) = r["error"].as_str() {
        content.push(ContentBlock::text(format!("agentd: {e}")));
    } else if verdict != "ok" {
        content.push(ContentBlock::text(format!("agentd: {verdict}, exit {}", r["exit_code"])));
    }
    if content.is_empty() {
        content.push(ContentBlock::text(String::new()));
    }
    let structured = json!({
        "call_id": r["call_id"].as_str().unwrap_or(call_id),
        "verdict": verdict,
        "exit_code": r["exit_code"],
        "signal": r["signal"],
        "timed_out": r["timed_out"],
        "oom_killed": r["oom_killed"],
        "duration_ms": r["duration_ms"],
        "stdout_truncated": r["stdout_truncated"],
        "stderr_truncated": r["stderr_truncated"],
        "events": r["events"],
        "error": r["error"],
    });
    let mut result = if matches!(verdict, "ok" | "ok_with_denials") {
        CallToolResult::success(content)
    } else {
        CallToolResult::error(content)
    };
    result.structured_content = Some(structured);
    result
}

/// A call that could not be run, or did not end, as a result with `verdict`.
fn failure(call_id: &str, verdict: &str, msg: &str) -> CallToolResult {
    tracing::warn!(call_id, verdict, error = msg, "mcp: the call did not complete");
    let mut result = CallToolResult::error(vec![ContentBlock::text(format!("agentd: {msg} (call {call_id})"))]);
    result.structured_content = Some(json!({"call_id": call_id, "verdict": verdict, "error": msg}));
    result
}

/// Ends a cancelled call: SIGTERM to its `agentd exec` (not yet reaped), which kills the
/// call's cgroup and records it; and the cgroup killed from here after [`CANCEL_GRACE`], in
/// case exec never got to.
fn cancel_call(pid: Option<u32>, call_id: &str) {
    sigterm(pid);
    kill_cgroup_later(call_id);
}

/// Kills `call_id`'s cgroup after [`CANCEL_GRACE`], from a thread of its own: no runtime is
/// needed, so it also serves an exec dropped while its runtime goes away.
fn kill_cgroup_later(call_id: &str) {
    let id = call_id.to_string();
    let _ = std::thread::Builder::new().name("agentd-mcp-end".into()).spawn(move || {
        std::thread::sleep(CANCEL_GRACE);
        agentd_sandbox::cgroup::Cgroups::detect().kill_call(&id, Duration::from_millis(500));
    });
}

/// SIGTERM to an `agentd exec` child not yet reaped (so `pid` is still its own): exec then
/// ends its call and records it.
fn sigterm(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
}

impl ServerHandler for Server {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("agentd", env!("CARGO_PKG_VERSION")))
            .with_instructions(format!(
                "The tools of agent {:?}. Each call runs in its own short-lived sandbox (namespaces, \
                 Landlock, seccomp, cgroup limits) built from the manifest, and is recorded in agentd's \
                 audit log under the call id in the result.",
                self.inner.agent
            ))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.inner.tools.clone()))
    }

    async fn call_tool(
        &self,
        params: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        // In a daemon, who calls comes first: everything after is counted against that uid.
        let caller = match &self.inner.pool {
            Some(pool) => Some(pool.caller(&ctx.extensions).map_err(|e| McpError::invalid_request(e, None))?),
            None => None,
        };
        let _held = match caller {
            Some(uid) => Some(self.inner.held.admit(uid).ok_or_else(|| {
                McpError::invalid_request(
                    format!("uid {uid} has {PER_UID_IN_FLIGHT} calls in flight on this agent; wait for one to end"),
                    None,
                )
            })?),
            None => None,
        };
        if !self.inner.tools.iter().any(|t| t.name == params.name) {
            let known: Vec<&str> = self.inner.tools.iter().map(|t| t.name.as_ref()).collect();
            let msg = format!("unknown tool {:?} (this server has: {})", params.name, known.join(", "));
            let recorded = match caller {
                Some(uid) => format!("{msg}; asked by uid {uid}"),
                None => msg.clone(),
            };
            self.record_refusal(&uuid::Uuid::now_v7().to_string(), &params.name, &recorded).await;
            return Err(McpError::invalid_params(msg, None));
        }
        let upstream = self.inner.upstreams.iter().find_map(|u| u.original(&params.name).map(|o| (u, o.to_string())));
        // A session server's calls wait on its sandbox, which holds a place of its own while
        // it lives (see `upstream::SessionSandboxes`): they take no turn here.
        let request = |tool, arguments| upstream::Request {
            call_id: uuid::Uuid::now_v7().to_string(),
            tool,
            arguments,
            ct: ctx.ct.clone(),
            caller,
        };
        if let Some((up, original)) = upstream.as_ref().filter(|(u, _)| u.lifetime == McpLifetime::Session) {
            let req = request(original, params.arguments);
            return Ok(self.call_server(up, req, &params.name, caller).await.into());
        }
        // Waiting for a turn ends with the client's cancellation, too.
        let _turn = tokio::select! {
            biased;
            () = ctx.ct.cancelled() => return Err(McpError::internal_error("cancelled while waiting for a turn", None)),
            t = self.inner.calls.max_calls.clone().acquire_owned() => t,
        };
        if let Some((up, original)) = &upstream {
            let req = request(original, params.arguments);
            return Ok(self.call_server(up, req, &params.name, caller).await.into());
        }
        if let (Some(pool), Some(uid)) = (&self.inner.pool, caller) {
            return Ok(self.call_in_pool(pool, uid, params, ctx).await.into());
        }
        Ok(self.call(params, ctx).await.into())
    }
}
