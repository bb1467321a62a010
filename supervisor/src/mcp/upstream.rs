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

use std::time::Duration;

use agentd_policy::{McpLifetime, McpServer};
use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, JsonObject, Tool};
use rmcp::service::{RequestContext, RunningService, ServiceExt};
use rmcp::{RoleClient, RoleServer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::process::Child;

use super::Calls;

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
async fn start(calls: &Calls, name: &str, call_id: &str) -> Result<Session, String> {
    let mut cmd = calls.exec_command(&["--mcp-server", name, "--call-id", call_id]);
    cmd.stderr(std::process::Stdio::piped());
    let mut child = tokio::process::Command::from(cmd)
        .spawn()
        .map_err(|e| format!("running agentd exec --mcp-server {name}: {e}"))?;
    let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
        return Err("agentd exec has no stdio".into());
    };
    let mut stderr = child.stderr.take();
    // The server's own stderr, and agentd exec's refusals, go to agentd's stderr.
    if let Some(mut err) = stderr.take() {
        let name = name.to_string();
        tokio::spawn(async move {
            let mut text = String::new();
            let _ = err.read_to_string(&mut text).await;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                eprintln!("agentd: mcp.{name}: {line}");
            }
        });
    }
    match tokio::time::timeout(START, ().serve((stdout, stdin))).await {
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
    terminate(&child);
    let _ = child.wait().await;
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
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
    let s = start(calls, name, &call_id).await?;
    let listed = tokio::time::timeout(START, s.client.list_all_tools()).await;
    close(s).await;
    let listed = match listed {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("MCP server {name}: tools/list failed (call {call_id}): {e}")),
        Err(_) => {
            return Err(format!("MCP server {name}: tools/list took over {} s (call {call_id})", START.as_secs()))
        }
    };
    let mut offered: Vec<Tool> = listed.into_iter().filter(|t| server.tools.iter().any(|n| *n == t.name)).collect();
    offered.sort_by(|a, b| a.name.cmp(&b.name));
    for missing in server.tools.iter().filter(|n| !offered.iter().any(|t| t.name == n.as_str())) {
        tracing::warn!(server = name, tool = %missing, "mcp: [mcp.{name}].tools lists a tool the server does not have");
    }
    let listing = hex(&Sha256::digest(serde_json::to_vec(&offered).unwrap_or_default()));
    tracing::info!(server = name, tools = offered.len(), listing = %listing, call_id, "mcp: server discovered");
    let tools = offered
        .into_iter()
        .map(|mut t| {
            t.name = format!("{name}.{}", t.name).into();
            t
        })
        .collect();
    Ok(Upstream { name: name.to_string(), tools, listing })
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
    let failed = |msg: String| {
        tracing::warn!(call_id, error = %msg, "mcp: the server's call failed");
        let mut r = CallToolResult::error(vec![ContentBlock::text(format!("agentd: {msg}"))]);
        r.structured_content = Some(json!({"call_id": call_id, "verdict": "failed", "error": msg}));
        r
    };
    let s = match start(calls, &up.name, &call_id).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let mut params = CallToolRequestParams::new(tool.to_string());
    if let Some(a) = arguments {
        params = params.with_arguments(a);
    }
    let outcome = tokio::select! {
        r = s.client.call_tool(params) => Some(r),
        () = ctx.ct.cancelled() => None,
    };
    let Some(outcome) = outcome else {
        tracing::info!(call_id, "mcp: the client cancelled the call");
        terminate(&s.child);
        close(s).await;
        return failed("cancelled by the client".into());
    };
    close(s).await;
    match outcome {
        Ok(mut r) => {
            let mut meta = r.meta.take().unwrap_or_default();
            meta.0.insert("agentd/call_id".into(), Value::from(call_id.clone()));
            meta.0.insert("agentd/server_listing".into(), Value::from(up.listing.clone()));
            r.meta = Some(meta);
            r
        }
        Err(e) => failed(format!("MCP server {} failed the call: {e}", up.name)),
    }
}
