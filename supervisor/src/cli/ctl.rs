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
                println!("{v}");
            }
            let msg = v["error"]["message"].as_str().unwrap_or("(no message)");
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
                println!("{v}");
            } else if !a.json {
                println!("{id}");
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
                println!("{v}");
            } else {
                print_task(&v);
            }
            Ok(0)
        }
        CtlCommand::Cancel { id } => {
            let v = get_json(s, Method::POST, &format!("/v1/tasks/{id}/cancel"), None).await?;
            if a.json {
                println!("{v}");
            } else {
                println!("{id}: cancel requested (state {})", v["state"].as_str().unwrap_or("?"));
            }
            Ok(0)
        }
        CtlCommand::Ls { what, task, agent } => {
            let mut q = Vec::new();
            if let Some(t) = task {
                q.push(format!("task={t}"));
            }
            if let Some(ag) = agent {
                q.push(format!("agent={ag}"));
            }
            let path = format!("/v1/{what}{}{}", if q.is_empty() { "" } else { "?" }, q.join("&"));
            let v = get_json(s, Method::GET, &path, None).await?;
            if a.json {
                println!("{v}");
                return Ok(0);
            }
            match what.as_str() {
                "agents" => {
                    for ag in v["agents"].as_array().into_iter().flatten() {
                        println!("{:<20} tools: {}", ag["name"].as_str().unwrap_or(""), ag["tools"]);
                    }
                }
                "calls" => {
                    for c in v["calls"].as_array().into_iter().flatten() {
                        println!(
                            "{}  {:<12} {:<10} exit {:<5} {} ms{}",
                            c["call_id"].as_str().unwrap_or(""),
                            c["agent"].as_str().unwrap_or(""),
                            c["tool"].as_str().unwrap_or(""),
                            c["exit_code"],
                            c["duration_ms"],
                            if c["in_flight"] == true { "  (running)" } else { "" }
                        );
                    }
                }
                "status" => println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
                _ => {
                    for t in v["tasks"].as_array().into_iter().flatten() {
                        println!(
                            "{}  {:<12} {:<10} {}",
                            t["id"].as_str().unwrap_or(""),
                            t["agent"].as_str().unwrap_or(""),
                            t["state"].as_str().unwrap_or(""),
                            t["task"].as_str().unwrap_or("").chars().take(60).collect::<String>()
                        );
                    }
                }
            }
            Ok(0)
        }
        CtlCommand::Audit => {
            let v = get_json(s, Method::GET, "/v1/audit", None).await?;
            if a.json {
                println!("{v}");
            } else {
                println!("log          {}", v["log"].as_str().unwrap_or(""));
                println!("verify       {}", v["verify"]["outcome"]["status"].as_str().unwrap_or("error"));
                println!("calls        {} ({} refused, {} killed)", v["calls"], v["refused_calls"], v["killed_calls"]);
                println!("events       {} denied, {} lost", v["denied_events"], v["lost_events"]);
            }
            Ok(0)
        }
    }
}

fn print_task(v: &Value) {
    println!("task     {}", v["id"].as_str().unwrap_or(""));
    println!("agent    {}", v["agent"].as_str().unwrap_or(""));
    println!("state    {}", v["state"].as_str().unwrap_or(""));
    println!("steps    {}, {} generated tokens", v["steps"], v["generated_tokens"]);
    println!("calls    {}", v["calls"].as_array().map_or(0, Vec::len));
    if let Some(a) = v["answer"].as_str() {
        println!("answer   {a}");
    }
    if let Some(e) = v["error"].as_str() {
        println!("error    {e}");
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
                println!("{ev}");
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
    use std::io::Write;
    let d = &ev["data"];
    match ev["kind"].as_str().unwrap_or("") {
        "text" => {
            print!("{}", d["text"].as_str().unwrap_or(""));
            let _ = std::io::stdout().flush();
        }
        "tool_call" => eprintln!(
            "\nagentd: ⏳ {} {} (call {})",
            d["tool"].as_str().unwrap_or(""),
            d["arguments"],
            d["call_id"].as_str().unwrap_or("")
        ),
        "tool_result" => eprintln!(
            "agentd: {} {} exit {} in {} ms, {} audit events ({} denied){}",
            if d["verdict"] == "ok" { "✓" } else { "✗" },
            d["tool"].as_str().unwrap_or(""),
            d["exit_code"],
            d["duration_ms"],
            d["events"]["total"],
            d["events"]["denied"],
            d["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
        ),
        "kv" => eprintln!(
            "agentd: KV cache {} ({} bytes): {}",
            d["action"].as_str().unwrap_or(""),
            d["bytes"],
            d["reason"].as_str().unwrap_or("")
        ),
        "answer" => {}
        "state" => {
            let st = d["state"].as_str().unwrap_or("");
            if st != "queued" && st != "running" {
                println!();
            }
            eprintln!("agentd: task {st}{}", d["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default());
        }
        _ => {}
    }
}
