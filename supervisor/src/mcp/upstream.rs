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
//! - A call of a tool the manifest does not list never reaches a server.
//! - What a server says about itself is not trusted: its tools are rebuilt from their name,
//!   description and schemas (no annotations such as `readOnlyHint`, no icons a client would
//!   fetch), and `agentd/*` keys in its results' `_meta` are agentd's alone. A message from
//!   the server longer than the server's `limits.output_bytes` ends the call.

use std::time::Duration;

use agentd_policy::{McpLifetime, McpServer};
use rmcp::model::{CallToolRequestParams, CallToolResult, JsonObject, Tool};
use rmcp::service::{RequestContext, RunningService, ServiceExt};
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::{RoleClient, RoleServer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;

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
}

impl Upstream {
    /// The server's own name of the offered tool `exposed` (`NAME.TOOL`), if it is one.
    pub fn original<'a>(&self, exposed: &'a str) -> Option<&'a str> {
        let tool = exposed.strip_prefix(self.name.as_str())?.strip_prefix('.')?;
        self.tools.iter().any(|t| t.name == exposed).then_some(tool)
    }
}

/// A server started in its sandbox, with agentd as its client.
struct Session {
    child: Child,
    client: RunningService<RoleClient, ()>,
}

/// Starts `[mcp.NAME]` under `call_id` and initializes it.
async fn start(calls: &Calls, name: &str, call_id: &str, max_message: usize) -> Result<Session, String> {
    let cmd = calls.exec_command(&["--mcp-server", name, "--call-id", call_id]);
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| format!("running agentd exec --mcp-server {name}: {e}"))?;
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        return Err("agentd exec has no stdio".into());
    };
    // The server's own stderr, and agentd exec's refusals, as they come, line by line.
    if let Some(err) = child.stderr.take() {
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
async fn end(mut child: Child, grace: Duration) {
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return;
    }
    sigterm(child.id());
    let _ = child.wait().await;
}

/// Closes the session: the client goes, the server sees end of file on its stdin.
async fn close(s: Session) {
    let Session { child, client } = s;
    let _ = client.cancel().await;
    end(child, EXIT_GRACE).await;
}

/// Fetches `[mcp.NAME]`'s tools in a sandbox and keeps those the manifest offers.
pub async fn discover(calls: &Calls, name: &str, server: &McpServer) -> Result<Upstream, String> {
    if server.lifetime == McpLifetime::Session {
        return Err(format!("[mcp.{name}]: lifetime = \"session\" is not served yet; use \"call\""));
    }
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
    tracing::info!(server = name, tools = offered.len(), listing = %listing, call_id, "mcp: server discovered");
    let tools = offered
        .into_iter()
        .map(|mut t| {
            t.name = format!("{name}.{}", t.name).into();
            t
        })
        .collect();
    Ok(Upstream { name: name.to_string(), tools, listing, max_message })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one `tools/call` of `up`'s tool `tool` in a fresh sandbox of the server.
pub async fn call(
    calls: &Calls,
    up: &Upstream,
    tool: &str,
    arguments: Option<JsonObject>,
    ctx: &RequestContext<RoleServer>,
) -> CallToolResult {
    let call_id = uuid::Uuid::now_v7().to_string();
    let cancelled = || {
        tracing::info!(call_id, "mcp: the client cancelled the call");
        failure(&call_id, "cancelled", "cancelled by the client")
    };
    let s = tokio::select! {
        biased;
        () = ctx.ct.cancelled() => return cancelled(),
        s = start(calls, &up.name, &call_id, up.max_message) => s,
    };
    let s = match s {
        Ok(s) => s,
        Err(e) => return failure(&call_id, "failed", &e),
    };
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Some(a) = arguments {
        params = params.with_arguments(a);
    }
    let outcome = tokio::select! {
        biased;
        () = ctx.ct.cancelled() => None,
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
    match outcome {
        // A sandbox that ran out of time or memory did not give a whole answer, whatever
        // the server managed to write before.
        Ok(_) if matches!(agentd_verdict, "timed_out" | "oom_killed") => failure(
            &call_id,
            agentd_verdict,
            &format!("MCP server {}: its sandbox was ended: {agentd_verdict}", up.name),
        ),
        Ok(mut r) => {
            let mut meta = r.meta.take().unwrap_or_default();
            // agentd's keys are agentd's: a server cannot speak for it.
            meta.0.retain(|k, _| !k.starts_with("agentd/"));
            meta.0.insert("agentd/call_id".into(), Value::from(call_id.clone()));
            meta.0.insert("agentd/server_listing".into(), Value::from(up.listing.clone()));
            meta.0.insert("agentd/verdict".into(), Value::from(agentd_verdict));
            let denied = sandbox.as_ref().and_then(|r| r["events"]["denied"].as_u64()).unwrap_or(0);
            meta.0.insert("agentd/denied_events".into(), Value::from(denied));
            r.meta = Some(meta);
            r
        }
        Err(_) if matches!(agentd_verdict, "timed_out" | "oom_killed") => failure(
            &call_id,
            agentd_verdict,
            &format!("MCP server {}: its sandbox was ended: {agentd_verdict}", up.name),
        ),
        Err(e) => failure(
            &call_id,
            "failed",
            &format!(
                "MCP server {} did not answer the call ({e}): it exited, or wrote something that is not MCP",
                up.name
            ),
        ),
    }
}
