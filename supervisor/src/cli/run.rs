//! `agentd run`: an agent does a task under a manifest, with the in-process model. Every
//! tool call is an `agentd exec --json` of this same binary, with the call id the run
//! announced and the same audit log: sandboxes are spawned only from a single-threaded
//! process, and the model's kernels run on a thread pool. The tools of the manifest's
//! `[mcp.NAME]` servers are offered too, as `NAME.TOOL` (see `crate::mcp::offer`): each call
//! is an `agentd exec --mcp-server` that agentd speaks MCP to.

use std::path::PathBuf;

use agentd_policy::grammar::ParsedCall;
use clap::Args;
use serde_json::Value;

use crate::agent::recall::AgentMemory;
use crate::agent::run::{self, verdict, Stop, Transcript};
use crate::manifest::ManifestFile;
use crate::mcp::offer::ModelTools;
use crate::mcp::upstream::SessionSandboxes;
use crate::sys;
use agentd_audit::AuditLog;
use agentd_memory::embed::Embedder;
use agentd_memory::store::Store;
use agentd_model::engine::{Local, Observer, RunConfig};
use agentd_model::llm::Llm;
use agentd_model::openai::{Constraints, Remote};
use agentd_model::{fetch, AgentError};
use agentd_policy::error_chain;
use agentd_sandbox::runner::EXIT_REFUSED;

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Manifest file: the agent and the tools it may call.
    #[arg(long)]
    manifest: PathBuf,
    /// What the agent should do.
    #[arg(long)]
    task: String,
    /// Most assistant turns.
    #[arg(long, default_value_t = 6)]
    max_steps: usize,
    /// Most generated tokens in all.
    #[arg(long, default_value_t = 768)]
    max_tokens: usize,
    /// Sample with this seed (reproducible) instead of greedy decoding.
    #[arg(long)]
    seed: Option<u64>,
    /// Sampling temperature (with --seed).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// The model: with the local backend, a llama-family GGUF to use instead of the embedded
    /// SmolLM2-135M-Instruct; with `--backend openai`, the server's model name.
    #[arg(long, value_name = "PATH.gguf|NAME")]
    model: Option<String>,
    /// Where the model runs: `local` (in process) or `openai` (a chat completions server).
    #[arg(long, default_value = "local", value_parser = ["local", "openai"])]
    backend: String,
    /// With `--backend openai`: the API base, e.g. http://127.0.0.1:8080/v1.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// With `--backend openai`: how the server holds its model to the protocol: the
    /// strongest form it takes (`auto`), a grammar of the turn, a JSON schema of it, native
    /// tools with strict schemas, or nothing but the check of each reply.
    #[arg(long, value_name = "FORM", value_parser = ["auto", "grammar", "json_schema", "tools", "none"])]
    server_constraints: Option<String>,
    /// Print one JSON transcript instead of the live view.
    #[arg(long)]
    json: bool,
    /// The hash-chained audit log the tool calls are recorded in.
    #[arg(long, value_name = "PATH", default_value = agentd_audit::DEFAULT_PATH)]
    audit_log: PathBuf,
    /// The agent's memory store (created if missing): the task, tool results and answer are
    /// kept there across runs, recalled when relevant, and old results are paged out to it
    /// when the context budget is full.
    #[arg(long, value_name = "DIR")]
    memory: Option<PathBuf>,
    #[command(flatten)]
    memory_limits: super::memory::LimitArgs,
    /// Most tokens in the model's context [the model's context length].
    #[arg(long, value_name = "TOKENS", default_value_t = 0)]
    context_budget: usize,
}

/// The live view: tokens as they come, a line while a tool runs.
struct Live {
    quiet: bool,
}

impl Observer for Live {
    fn text(&mut self, text: &str) {
        if !self.quiet {
            out!("{text}");
            crate::out::flush();
        }
    }

    fn tool_start(&mut self, call: &ParsedCall, call_id: &str) {
        if !self.quiet {
            outln!();
            eprintln!("agentd: ⏳ running {} in a sandbox (call {call_id})...", call.tool);
        }
    }

    fn tool_end(&mut self, r: &Value) {
        if !self.quiet {
            let verdict = verdict(r);
            // An MCP server's call knows its denials, and not yet always its total.
            let events = match (r["events"]["total"].as_u64(), r["events"]["denied"].as_u64()) {
                (Some(total), denied) => format!(", {total} audit events ({} denied)", denied.unwrap_or(0)),
                (None, Some(denied)) => format!(", {denied} denied audit events"),
                (None, None) => String::new(),
            };
            eprintln!(
                "agentd: {} {} exit {} in {} ms{events}{}",
                if matches!(verdict, "ok" | "ok, denials unknown") { "✓" } else { "✗" },
                r["tool"].as_str().unwrap_or("?"),
                r["exit_code"],
                r["duration_ms"],
                r["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
            );
        }
    }
}

/// Runs one call as `agentd exec --json`, under the manifest as the run read it; a failure
/// to run it at all becomes a refusal.
fn exec_call(a: &RunArgs, manifest_sha256: &str, call: &ParsedCall, call_id: &str) -> Value {
    let refused = |msg: String| agentd_sandbox::runner::refused_value(call_id, &call.tool, &msg);
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return refused(format!("cannot find agentd's own binary: {e}")),
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["exec", "--json", "--call-id", call_id, "--tool", &call.tool])
        .arg("--manifest")
        .arg(&a.manifest)
        .arg("--audit-log")
        .arg(&a.audit_log)
        .args(["--manifest-sha256", manifest_sha256]);
    for (k, v) in &call.args {
        cmd.arg("--arg").arg(format!("{k}={v}"));
    }
    // Killed, `agentd run` takes its call with it (exec's sandbox dies with exec in turn).
    // This runs on the thread that runs the whole task.
    crate::sys::die_with_parent(&mut cmd);
    match cmd.stdin(std::process::Stdio::null()).output() {
        Ok(out) => serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            refused(format!("agentd exec gave no result ({e}): {}", String::from_utf8_lossy(&out.stderr).trim()))
        }),
        Err(e) => refused(format!("running agentd exec: {e}")),
    }
}

pub(crate) fn run(a: RunArgs) -> i32 {
    // The call (or task, or daemon) must finish and be recorded even if no one reads stdout.
    crate::out::keep_going();
    let _bpf_log = super::audit::BpfLogReader::start_if_asked();
    match go(&a) {
        Ok(t) => {
            if a.json {
                match serde_json::to_string(&t) {
                    Ok(s) => outln!("{s}"),
                    Err(e) => {
                        eprintln!("agentd: cannot encode the transcript: {e}");
                        return EXIT_REFUSED;
                    }
                }
            } else {
                summary(&t);
            }
            if t.stop == Stop::Answer {
                0
            } else {
                1
            }
        }
        Err(msg) => {
            eprintln!("agentd: {msg}");
            EXIT_REFUSED
        }
    }
}

fn go(a: &RunArgs) -> Result<Transcript, String> {
    if sys::geteuid() != 0 {
        return Err("agentd run must run as root: its tool calls run in sandboxes (cgroups, uid mapping)".into());
    }
    sys::harden_self().map_err(|e| format!("hardening agentd itself: {e}"))?;
    let invalid = |lines: Vec<String>| format!("invalid manifest:\n{}", lines.join("\n"));
    let file = ManifestFile::read(&a.manifest).map_err(invalid)?;
    let (manifest, _) = file.parse().map_err(invalid)?;
    // Every call checks the manifest against the bytes read now: editing it during the run
    // changes nothing the run does.
    let manifest_sha256 = file.sha256();
    // Fail before loading the model if no call could be recorded.
    drop(
        AuditLog::open(&a.audit_log)
            .map_err(|e| format!("the audit log cannot be opened, so no call may run: {}", error_chain(&e)))?,
    );
    let servers = Servers::discover(a, &manifest, &manifest_sha256)?;
    let mut agent = run::Agent::of_manifest(&manifest);
    if let Some(s) = &servers {
        for line in s.tools.refusals() {
            eprintln!("agentd: {line}");
        }
        agent.tools.extend(s.tools.offered().iter().cloned());
    }
    let mut exec = |call: &ParsedCall, call_id: &str| {
        servers
            .as_ref()
            .and_then(|s| s.call(call, call_id))
            .unwrap_or_else(|| exec_call(a, &manifest_sha256, call, call_id))
    };
    let t = with_model(a, &agent, &mut exec);
    if let Some(s) = servers {
        s.close();
    }
    t
}

/// The manifest's MCP servers, for the run: discovered in their sandboxes at start, their
/// calls made from a runtime of their own while the model's thread waits, and their
/// `lifetime = "session"` sandboxes (one per server for the run) ended with the run.
struct Servers {
    runtime: tokio::runtime::Runtime,
    tools: ModelTools,
    sessions: SessionSandboxes,
}

impl Servers {
    /// None when the manifest has no `[mcp.*]`; an error when a server cannot be listed,
    /// as for `agentd mcp`: the manifest says its tools are there.
    fn discover(a: &RunArgs, manifest: &agentd_policy::Manifest, sha256: &str) -> Result<Option<Self>, String> {
        if manifest.mcp.is_empty() {
            return Ok(None);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agentd-run-mcp")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the MCP runtime: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find agentd's own binary: {e}"))?;
        let calls = crate::mcp::Calls {
            manifest_path: a.manifest.clone(),
            audit_log: a.audit_log.clone(),
            exe,
            manifest_sha256: sha256.to_string(),
            // The loop makes one call at a time.
            max_calls: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            session_sandboxes: std::sync::Arc::new(tokio::sync::Semaphore::new(manifest.mcp.len())),
        };
        if !a.json {
            eprintln!("agentd: listing the tools of {} MCP server(s), each in its sandbox...", manifest.mcp.len());
        }
        let upstreams = runtime
            .block_on(crate::mcp::upstream::discover_all(&calls, manifest))
            .map_err(|e| format!("{}: {e}", a.manifest.display()))?;
        let tools = ModelTools::new(calls, upstreams);
        Ok(Some(Self { runtime, tools, sessions: SessionSandboxes::default() }))
    }

    /// The call, if it is of a server's tool.
    fn call(&self, call: &ParsedCall, call_id: &str) -> Option<Value> {
        let ct = tokio_util::sync::CancellationToken::new();
        self.runtime.block_on(self.tools.call(call, call_id, None, &self.sessions, ct))
    }

    /// Ends the session sandboxes, and waits for their records.
    fn close(self) {
        self.runtime.block_on(self.sessions.close_all());
    }
}

/// The run itself, on the backend `a` names.
fn with_model(
    a: &RunArgs,
    agent: &run::Agent,
    exec: &mut dyn FnMut(&ParsedCall, &str) -> Value,
) -> Result<Transcript, String> {
    let cfg = RunConfig {
        max_steps: a.max_steps,
        max_tokens: a.max_tokens,
        seed: a.seed,
        temperature: a.temperature,
        context_budget: a.context_budget,
    };
    let mut memory = match &a.memory {
        Some(dir) => {
            let store = Store::open(dir, a.memory_limits.limits()).map_err(|e| e.to_string())?;
            let embedder = Embedder::load().map_err(|e| e.to_string())?;
            Some(AgentMemory::new(store, embedder, format!("run-{}", uuid::Uuid::now_v7())))
        }
        None => None,
    };

    let mut live = Live { quiet: a.json };
    if !a.json {
        eprintln!("agentd: task: {}", a.task);
    }
    if a.backend == "openai" {
        let endpoint = a.endpoint.as_deref().ok_or("--backend openai needs --endpoint URL")?;
        let model = a.model.as_deref().ok_or("--backend openai needs --model NAME")?;
        let want: Constraints = a.server_constraints.as_deref().unwrap_or("auto").parse()?;
        let mut engine = Remote::new(endpoint, model).constraints(want);
        engine.offer(&agent.tools);
        let form = engine.resolve().map_err(|e| e.to_string())?;
        if !a.json {
            eprintln!("agentd: server constraints: {form}");
        }
        return run::run(&mut engine, agent, &a.task, &cfg, exec, &mut live, recall(&mut memory))
            .map_err(|e: AgentError| e.to_string());
    }
    if a.endpoint.is_some() || a.server_constraints.is_some() {
        return Err("--endpoint and --server-constraints are for --backend openai".into());
    }
    let model_path = match &a.model {
        Some(p) => PathBuf::from(p),
        None => fetch::embedded_model().map_err(|e| e.to_string())?,
    };
    if !a.json {
        eprintln!("agentd: loading {}", model_path.display());
    }
    let mut llm = Llm::load(&model_path).map_err(|e| e.to_string())?;
    let mut engine = Local::new(&mut llm, cfg.seed);
    run::run(&mut engine, agent, &a.task, &cfg, exec, &mut live, recall(&mut memory))
        .map_err(|e: AgentError| e.to_string())
}

fn recall(memory: &mut Option<AgentMemory>) -> Option<&mut dyn run::Recall> {
    memory.as_mut().map(|m| m as &mut dyn run::Recall)
}

fn summary(t: &Transcript) {
    outln!();
    eprintln!();
    eprintln!("agentd: ─── summary ───");
    eprintln!("  stopped because   {:?}", t.stop);
    eprintln!("  steps             {}", t.steps);
    eprintln!("  prompt tokens     {}", t.prompt_tokens);
    eprintln!("  generated tokens  {}", t.counters.decode_tokens);
    if t.prefill_tps > 0.0 {
        eprintln!("  prefill           {} tokens, {:.1} tok/s", t.counters.prefill_tokens, t.prefill_tps);
    } else {
        eprintln!("  prefill           {} tokens (timed with decoding)", t.counters.prefill_tokens);
    }
    eprintln!("  decode            {} tokens, {:.1} tok/s", t.counters.decode_tokens, t.decode_tps);
    eprintln!("  tool time         {} ms of {} ms", run::tool_time(t).as_millis(), t.duration_ms);
    if !t.tool_calls.is_empty() {
        eprintln!("  tool calls:");
        // MCP servers' tools have longer names (`NAME.TOOL`).
        let width = t.tool_calls.iter().map(|c| c.tool.len()).max().unwrap_or(0).max(12);
        eprintln!("    {:<width$} {:<18} {:>6} {:>9} {:>7}  call id", "tool", "verdict", "exit", "ms", "events");
        for c in &t.tool_calls {
            let r = &c.result;
            // A server's call in a session's sandbox has no total of its own.
            let events = r["events"]["total"].as_u64().map_or_else(|| "-".to_string(), |n| n.to_string());
            eprintln!(
                "    {:<width$} {:<18} {:>6} {:>9} {:>7}  {}",
                c.tool,
                verdict(r),
                r["exit_code"].to_string(),
                r["duration_ms"].to_string(),
                events,
                r["call_id"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(a) = &t.answer {
        eprintln!("  answer            {a}");
    }
}
