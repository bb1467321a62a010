//! `agentd ctl`: the client of `agentd serve`'s control API, over its Unix socket (hyper's
//! HTTP/1.1 client on a tokio `UnixStream`).
//!
//! Exit codes: 0 success (for `watch` and `submit --watch`: the task succeeded); 1 the task
//! failed or was cancelled, or the daemon refused the request (403, 404...); 2 the daemon
//! could not be reached; 75 busy or draining (try again after the hint).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::serve::client::{get_json, send, CtlError};

#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The daemon's socket.
    #[arg(long, global = true, value_name = "PATH", default_value = agentd_policy::serve::DEFAULT_SOCKET, env = "AGENTD_SOCKET")]
    socket: PathBuf,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Submit a task to an agent; prints its id.
    Submit {
        /// The agent.
        agent: String,
        /// What it should do.
        task: String,
        /// Follow its events until it ends.
        #[arg(long)]
        watch: bool,
    },
    /// Follow a task's events (tokens, tool calls, verdicts) until it ends.
    Watch {
        /// The task id.
        id: String,
        /// Start at this event (0 replays everything).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// A task's status and result.
    Status {
        /// The task id.
        id: String,
    },
    /// Cancel a task (a running call is killed).
    Cancel {
        /// The task id.
        id: String,
    },
    /// List agents, tasks or calls.
    Ls {
        /// What to list.
        #[arg(default_value = "tasks", value_parser = ["agents", "tasks", "calls", "status"])]
        what: String,
        /// Only this task's calls, or this agent's tasks.
        #[arg(long)]
        task: Option<String>,
        /// Only this agent's tasks or calls.
        #[arg(long)]
        agent: Option<String>,
        /// Only tasks in this state.
        #[arg(long, value_parser = ["queued", "running", "succeeded", "failed", "cancelled"])]
        state: Option<String>,
        /// One page of at most this many (the next page's `--after` is printed on stderr);
        /// without it, every page is fetched and printed in turn.
        #[arg(long)]
        limit: Option<usize>,
        /// Start after this id.
        #[arg(long)]
        after: Option<String>,
    },
    /// The audit log's summary (roles with `audit = true`).
    Audit,
}

/// Exit code when the daemon is busy or draining.
const EXIT_BUSY: i32 = 75;

pub(crate) fn run(a: CtlArgs) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: {e}");
            return 2;
        }
    };
    match rt.block_on(go(&a)) {
        Ok(code) => code,
        Err(CtlError::Connect(msg)) => {
            eprintln!("agentd: {msg}");
            2
        }
        Err(CtlError::Api(status, v)) => {
            if a.json {
                outln!("{v}");
            }
            let msg = line(&v["error"]["message"]);
            eprintln!("agentd: {} {}: {msg}", status.as_u16(), status.canonical_reason().unwrap_or(""));
            if let Some(ms) = v["error"]["retry_after_ms"].as_u64() {
                eprintln!("agentd: retry in {ms} ms");
            }
            if matches!(status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
                EXIT_BUSY
            } else {
                1
            }
        }
    }
}

async fn go(a: &CtlArgs) -> Result<i32, CtlError> {
    let s = &a.socket;
    match &a.command {
        CtlCommand::Submit { agent, task, watch } => {
            let v = get_json(s, Method::POST, "/v1/tasks", Some(json!({ "agent": agent, "task": task }))).await?;
            let id = v["id"].as_str().unwrap_or_default().to_string();
            if a.json && !watch {
                outln!("{v}");
            } else if !a.json {
                outln!("{id}");
            }
            if *watch {
                return follow(s, &id, 0, a.json).await;
            }
            Ok(0)
        }
        CtlCommand::Watch { id, from } => follow(s, id, *from, a.json).await,
        CtlCommand::Status { id } => {
            let v = get_json(s, Method::GET, &format!("/v1/tasks/{id}"), None).await?;
            if a.json {
                outln!("{v}");
            } else {
                print_task(&v);
            }
            Ok(0)
        }
        CtlCommand::Cancel { id } => {
            let v = get_json(s, Method::POST, &format!("/v1/tasks/{id}/cancel"), None).await?;
            if a.json {
                outln!("{v}");
            } else {
                outln!("{id}: cancel requested (state {})", v["state"].as_str().unwrap_or("?"));
            }
            Ok(0)
        }
        CtlCommand::Ls { what, task, agent, state, limit, after } => {
            let mut q = Vec::new();
            for (k, v) in [("task", task), ("agent", agent), ("state", state)] {
                if let Some(v) = v {
                    q.push(format!("{k}={v}"));
                }
            }
            if let Some(n) = limit {
                q.push(format!("limit={n}"));
            }
            let mut after = after.clone();
            loop {
                let mut q = q.clone();
                if let Some(a) = &after {
                    q.push(format!("after={a}"));
                }
                let path = format!("/v1/{what}{}{}", if q.is_empty() { "" } else { "?" }, q.join("&"));
                let v = get_json(s, Method::GET, &path, None).await?;
                if a.json {
                    outln!("{v}");
                    return Ok(0);
                }
                print_list(what, &v);
                after = v["next"].as_str().map(str::to_string);
                match (&after, limit) {
                    (None, _) => return Ok(0),
                    (Some(next), Some(_)) => {
                        eprintln!("more after this page: --after {}", line(&json!(next)));
                        return Ok(0);
                    }
                    (Some(_), None) => {}
                }
            }
        }
        CtlCommand::Audit => {
            let v = get_json(s, Method::GET, "/v1/audit", None).await?;
            if a.json {
                outln!("{v}");
            } else {
                outln!("log          {}", line(&v["log"]));
                outln!("verify       {}", v["verify"]["outcome"]["status"].as_str().unwrap_or("error"));
                outln!("calls        {} ({} refused, {} killed)", v["calls"], v["refused_calls"], v["killed_calls"]);
                outln!("events       {} denied, {} lost", v["denied_events"], v["lost_events"]);
            }
            Ok(0)
        }
    }
}

/// One page of `ls`, or the status.
fn print_list(what: &str, v: &Value) {
    match what {
        "agents" => {
            for ag in v["agents"].as_array().into_iter().flatten() {
                outln!("{:<20} tools: {}", line(&ag["name"]), ag["tools"]);
            }
        }
        "calls" => {
            for c in v["calls"].as_array().into_iter().flatten() {
                outln!(
                    "{}  {:<12} {:<10} exit {:<5} {} ms{}",
                    line(&c["call_id"]),
                    line(&c["agent"]),
                    line(&c["tool"]),
                    c["exit_code"],
                    c["duration_ms"],
                    if c["in_flight"] == true { "  (running)" } else { "" }
                );
            }
        }
        "status" => outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        _ => {
            for t in v["tasks"].as_array().into_iter().flatten() {
                outln!(
                    "{}  {:<12} {:<10} {}",
                    line(&t["id"]),
                    line(&t["agent"]),
                    line(&t["state"]),
                    line(&t["task"]).chars().take(60).collect::<String>()
                );
            }
        }
    }
}

fn print_task(v: &Value) {
    outln!("task     {}", line(&v["id"]));
    outln!("agent    {}", line(&v["agent"]));
    outln!("state    {}", line(&v["state"]));
    outln!("steps    {}, {} generated tokens", v["steps"], v["generated_tokens"]);
    outln!("calls    {}", v["calls"].as_array().map_or(0, Vec::len));
    if let Some(a) = v["answer"].as_str() {
        outln!("answer   {}", printable(a, true));
    }
    if let Some(e) = v["error"].as_str() {
        outln!("error    {}", printable(e, true));
    }
}

/// Streams a task's events; returns 0 if it succeeded.
async fn follow(s: &std::path::Path, id: &str, from: u64, json_out: bool) -> Result<i32, CtlError> {
    let resp = send(s, Method::GET, &format!("/v1/tasks/{id}/events?from={from}"), None).await?;
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut code = 1;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CtlError::Connect(format!("the event stream broke: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let payload: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            let Ok(ev) = serde_json::from_str::<Value>(&payload) else { continue };
            if json_out {
                outln!("{ev}");
            } else {
                show(&ev);
            }
            if ev["kind"] == "state" {
                match ev["data"]["state"].as_str() {
                    Some("succeeded") => code = 0,
                    Some("failed" | "cancelled") => code = 1,
                    _ => {}
                }
            }
        }
    }
    Ok(code)
}

fn show(ev: &Value) {
    let d = &ev["data"];
    match ev["kind"].as_str().unwrap_or("") {
        "text" => {
            out!("{}", printable(d["text"].as_str().unwrap_or(""), true));
            crate::out::flush();
        }
        "tool_call" => eprintln!("\nagentd: ⏳ {} {} (call {})", line(&d["tool"]), d["arguments"], line(&d["call_id"])),
        "tool_result" => eprintln!(
            "agentd: {} {} exit {} in {} ms, {} audit events ({} denied){}",
            if d["verdict"] == "ok" { "✓" } else { "✗" },
            line(&d["tool"]),
            d["exit_code"],
            d["duration_ms"],
            d["events"]["total"],
            d["events"]["denied"],
            d["error"].as_str().map(|e| format!(": {}", printable(e, false))).unwrap_or_default()
        ),
        "kv" => eprintln!("agentd: KV cache {} ({} bytes): {}", line(&d["action"]), d["bytes"], line(&d["reason"])),
        "answer" => {}
        "state" => {
            let st = line(&d["state"]);
            if st != "queued" && st != "running" {
                outln!();
            }
            eprintln!(
                "agentd: task {st}{}",
                d["error"]
                    .as_str()
                    .or(d["note"].as_str())
                    .map(|e| format!(": {}", printable(e, false)))
                    .unwrap_or_default()
            );
        }
        _ => {}
    }
}

/// A string from the daemon (task text, answers, errors, names: what agents, tools and other
/// users wrote) made safe for a terminal: control characters, including escape sequences,
/// DEL, C1 controls and bidirectional overrides, are shown as `\u{..}` escapes. Newlines
/// and tabs are kept where `multiline`.
pub(crate) fn printable(s: &str, multiline: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}');
        if (c == '\n' || c == '\t') && multiline {
            out.push(c);
        } else if c.is_control() || bidi {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// A one-line string field of a daemon reply, made safe for a terminal.
fn line(v: &Value) -> String {
    printable(v.as_str().unwrap_or(""), false)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn terminal_controls_from_the_daemon_are_escaped() {
        let hostile = "done\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}31m\u{202e}txt.exe\nnext\tline\u{7f}";
        let shown = printable(hostile, true);
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{shown:?}");
        assert!(!shown.contains('\u{202e}'));
        assert!(shown.contains("\\u{1b}]0;pwned") && shown.contains("next\tline"), "{shown:?}");
        assert!(!printable(hostile, false).contains('\n'));
        assert_eq!(printable("plain text, é ✓", false), "plain text, é ✓");
    }
}
