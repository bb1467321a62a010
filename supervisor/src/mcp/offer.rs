//! A manifest's `[mcp.NAME]` servers offered to a model (`agentd run`, the daemon's tasks),
//! beside its own tools: each tool `NAME.TOOL` whose `inputSchema` the call grammar can
//! hold, so that the model's calls of it are constrained like calls of a tool, and the
//! others refused at start, each with where its schema goes beyond the grammar.
//!
//! A model's call is made as a client's would be (see [`upstream::call`]): in a fresh
//! sandbox of the server, or in the run's (the task's) sandbox of it. Its result comes back
//! in the shape of `agentd exec --json`, so that the loop, the transcript and memory treat
//! it as any tool's: the server's text content as `stdout`, data for the model and never
//! instructions.

use std::sync::Arc;
use std::time::Instant;

use agentd_policy::grammar::{Offered, ParsedCall};
use agentd_policy::schema::{json_of_args, offered_of_mcp};
use agentd_sandbox::runner::EXIT_REFUSED;
use rmcp::model::{CallToolResult, ContentBlock};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::upstream::{self, SessionSandboxes, Upstream};
use super::Calls;

/// The servers' tools a model is offered, and how to call them.
pub struct ModelTools {
    calls: Calls,
    upstreams: Vec<Upstream>,
    offered: Vec<Offered>,
    /// Tools that could not be offered: `(NAME.TOOL, why)`.
    pub refused: Vec<(String, String)>,
}

impl std::fmt::Debug for ModelTools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTools").field("offered", &self.offered).field("refused", &self.refused).finish()
    }
}

impl ModelTools {
    /// The tools of `upstreams` (discovered in their sandboxes) as a model is offered them.
    pub fn new(calls: Calls, upstreams: Vec<Upstream>) -> Self {
        let (mut offered, mut refused) = (Vec::new(), Vec::new());
        for up in &upstreams {
            for tool in &up.tools {
                let Some(original) = up.original(&tool.name) else { continue };
                let description = tool.description.as_deref().unwrap_or_default();
                match offered_of_mcp(&up.name, original, description, &tool.input_schema) {
                    Ok(o) => offered.push(o),
                    Err(e) => {
                        tracing::warn!(tool = %tool.name, at = e.at, reason = e.reason, "mcp: a server's tool cannot be offered to the model");
                        refused.push((tool.name.to_string(), e.to_string()));
                    }
                }
            }
        }
        Self { calls, upstreams, offered, refused }
    }

    /// The servers' tools the model may call.
    pub fn offered(&self) -> &[Offered] {
        &self.offered
    }

    /// What `refused` says, one line each, for people.
    pub fn refusals(&self) -> Vec<String> {
        self.refused
            .iter()
            .map(|(tool, why)| {
                format!(
                    "{tool} is not offered to the model: its inputSchema at {why} (MCP clients of agentd mcp may still call it)"
                )
            })
            .collect()
    }

    /// Makes the model's call of a server's tool, if `call` names one (`None` otherwise),
    /// for `caller`, in `sessions` for `lifetime = "session"` servers, until `ct` cancels
    /// it (which ends its sandbox); the result in `agentd exec --json`'s shape.
    pub async fn call(
        &self,
        call: &ParsedCall,
        call_id: &str,
        caller: Option<u32>,
        sessions: &SessionSandboxes,
        ct: CancellationToken,
    ) -> Option<Value> {
        let offered = self.offered.iter().find(|o| o.name == call.tool)?;
        let (up, original) = self.upstreams.iter().find_map(|u| u.original(&call.tool).map(|o| (u, o)))?;
        let started = Instant::now();
        // The grammar kept the model to the schema; the values are checked once more here,
        // as exec checks a tool's, since a call may come from elsewhere (a scripted model).
        let arguments = match json_of_args(&offered.args, &call.args) {
            Ok(a) => a,
            Err(e) => {
                return Some(agentd_sandbox::runner::refused_value(call_id, &call.tool, &format!("refused: {e}")));
            }
        };
        let _turn = match up.lifetime {
            // A session server's sandbox holds a place of its own while it lives.
            agentd_policy::McpLifetime::Session => None,
            // Waiting for a turn ends with a cancellation too.
            agentd_policy::McpLifetime::Call => tokio::select! {
                biased;
                () = ct.cancelled() => {
                    let why = "cancelled while waiting for a turn";
                    return Some(agentd_sandbox::runner::refused_value(call_id, &call.tool, why));
                }
                t = Arc::clone(&self.calls.max_calls).acquire_owned() => t.ok(),
            },
        };
        let request =
            upstream::Request { call_id: call_id.to_string(), tool: original, arguments: Some(arguments), ct, caller };
        let result = upstream::call(&self.calls, up, request, sessions).await;
        Some(exec_shaped(call_id, &call.tool, &up.name, &result, started))
    }
}

/// A server's result as `agentd exec --json` would give it: its text content as `stdout`,
/// `exit_code` 0 (or 1 for `isError`, or agentd's refusal code when agentd did not make the
/// call), agentd's verdict on the sandbox, and the denied events when they are known.
pub(crate) fn exec_shaped(call_id: &str, tool: &str, server: &str, r: &CallToolResult, started: Instant) -> Value {
    let mut stdout = String::new();
    for block in &r.content {
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        match block {
            ContentBlock::Text(t) => stdout.push_str(&t.text),
            ContentBlock::Image(_) => stdout.push_str("[an image, not shown]"),
            ContentBlock::Audio(_) => stdout.push_str("[audio, not shown]"),
            ContentBlock::Resource(_) | ContentBlock::ResourceLink(_) => stdout.push_str("[a resource, not shown]"),
            _ => stdout.push_str("[content of a kind agentd does not show]"),
        }
    }
    let meta = r.meta.as_ref().map(|m| &m.0);
    let of_meta = |k: &str| meta.and_then(|m| m.get(k)).cloned().unwrap_or(Value::Null);
    let structured = r.structured_content.clone().unwrap_or(Value::Null);
    // agentd's own failures (`upstream::failure`) say their verdict in the structured
    // content; a server's answers carry agentd's verdict in `_meta`.
    let (verdict, error) = match of_meta("agentd/verdict") {
        Value::String(v) => (v, None),
        _ => (
            structured["verdict"].as_str().unwrap_or("failed").to_string(),
            structured["error"].as_str().map(str::to_string),
        ),
    };
    // A server's words reach terminals and the store: no control characters.
    let error = error.map(|e| {
        e.chars()
            .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
            .collect::<String>()
    });
    let exit_code = match (verdict.as_str(), r.is_error) {
        ("refused", _) => i64::from(EXIT_REFUSED),
        (_, Some(true)) => 1,
        _ if error.is_some() => 1,
        _ => 0,
    };
    json!({
        "call_id": call_id,
        "tool": tool,
        "exit_code": exit_code,
        "stdout_bytes": stdout.len(),
        "stdout": stdout,
        "stderr": "",
        "error": error,
        "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "events": {"total": of_meta("agentd/events"), "denied": of_meta("agentd/denied_events")},
        "mcp": {"server": server, "verdict": verdict, "listing": of_meta("agentd/server_listing")},
    })
}
