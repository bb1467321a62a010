//! `agentd exec`: run one tool call.

use std::collections::BTreeMap;
use std::path::PathBuf;

use agentd_policy::{compile, CallRequest};
use clap::Args;

use crate::manifest::ManifestFile;
use crate::sys;
use agentd_audit::AuditLog;
use agentd_policy::error_chain;
use agentd_sandbox::host::{Host, RealFs};
use agentd_sandbox::runner::{self, CallResult, OutputMode, Runner, EXIT_REFUSED};
use agentd_sandbox::spawn::NetnsPool;

#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Manifest file.
    #[arg(long)]
    manifest: PathBuf,
    /// Tool to call.
    #[arg(long, required_unless_present = "mcp_server", default_value = "")]
    tool: String,
    /// Instead of a tool, run the manifest's `[mcp.NAME]` server in its sandbox, speaking MCP
    /// on this process's stdin and stdout (what `agentd mcp` does for each call).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["tool", "args", "args_json", "json", "argv"])]
    mcp_server: Option<String>,
    /// A call argument for the tool's argv template (repeatable).
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    args: Vec<(String, String)>,
    /// The call's arguments as one JSON object (`-`: read it from stdin), instead of --arg:
    /// strings, numbers, booleans and lists of them.
    #[arg(long, value_name = "JSON", conflicts_with = "args")]
    args_json: Option<String>,
    /// Capture output and print exactly one JSON result object.
    #[arg(long)]
    json: bool,
    /// Learn mode, for trusted inputs only: the call sees the host read-only (without its
    /// secrets, homes, /run and /tmp) and may run programs under /usr and /opt; writes and
    /// the network stay as the manifest says. Its audit records are what `agentd policy
    /// draft` turns into grants.
    #[arg(long, conflicts_with = "mcp_server")]
    learn: bool,
    /// The hash-chained audit log to append the call's records to.
    #[arg(long, value_name = "PATH", default_value = agentd_audit::DEFAULT_PATH)]
    audit_log: PathBuf,
    /// Run the call the way a long-running supervisor does, in a network namespace prepared
    /// beforehand (for tests of that path until `agentd serve` exists).
    #[arg(long, hide = true)]
    prepared_netns: bool,
    /// Refuse the call unless the manifest's SHA-256 is this (hex): `agentd mcp` passes what
    /// it read at start, so a manifest edited since cannot change what its calls may do.
    #[arg(long, hide = true, value_name = "HEX")]
    manifest_sha256: Option<String>,
    /// Use this call id (letters, digits and dashes) instead of a new one: `agentd run` runs
    /// each of its tool calls as an `agentd exec` with the id it announced.
    #[arg(long, hide = true, value_parser = parse_call_id)]
    call_id: Option<String>,
    /// Replaces the tool's argv template; ARGV[0] is searched in the sandbox's PATH.
    #[arg(last = true, value_name = "ARGV")]
    argv: Vec<String>,
}

fn parse_call_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then(|| s.to_string()).ok_or_else(|| format!("{s:?} is not a call id (1-64 letters, digits and dashes)"))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub(crate) fn run(a: ExecArgs) -> i32 {
    // The call (or task, or daemon) must finish and be recorded even if no one reads stdout.
    crate::out::keep_going();
    // A stop asked for from now on waits for the runner, which ends the call and records it;
    // the default action would kill agentd between a call's records. (Refused before the
    // runner, agentd exits anyway.)
    {
        use nix::sys::signal::{SigSet, Signal};
        let mut stops = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            stops.add(s);
        }
        if let Err(e) = stops.thread_block() {
            tracing::warn!(error = %e, "could not hold SIGINT, SIGTERM and SIGHUP until the call starts");
        }
    }
    let _bpf_log = super::audit::BpfLogReader::start_if_asked();
    let call_id = a.call_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let result = call(&a, &call_id);
    if a.json {
        match serde_json::to_string(&result) {
            Ok(s) => outln!("{s}"),
            Err(e) => {
                eprintln!("agentd: cannot encode the result: {e}");
                return EXIT_REFUSED;
            }
        }
    } else {
        report(&result);
    }
    result.exit_code
}

fn call(a: &ExecArgs, call_id: &str) -> CallResult {
    // What the records name: the tool, or the MCP server.
    let unit = a.mcp_server.as_ref().map_or_else(|| a.tool.clone(), |n| format!("mcp.{n}"));
    let refuse = |msg: String| runner::refused(None, call_id, &unit, EXIT_REFUSED, msg);
    if sys::geteuid() != 0 {
        return refuse(
            "agentd exec must run as root: it creates cgroups and maps each call to an unprivileged uid".into(),
        );
    }
    if let Err(e) = sys::harden_self() {
        return refuse(format!("hardening agentd itself: {e}"));
    }
    // A call's network may hold 6 descriptors for each of 256 connections: more than the
    // usual soft limit of 1,024. The hard limit is the host's to set.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
    let mut audit = match AuditLog::open(&a.audit_log) {
        Ok(log) => log,
        Err(e) => return refuse(format!("the audit log cannot be opened, so no call may run: {}", error_chain(&e))),
    };
    // A call refused before it has a plan is recorded too.
    let mut refuse = |msg: String| runner::refuse_recorded(&mut audit, call_id, &unit, msg);
    let file = match ManifestFile::read(&a.manifest) {
        Ok(f) => f,
        Err(lines) => return refuse(format!("invalid manifest:\n{}", lines.join("\n"))),
    };
    // The bytes checked are the bytes parsed: the file cannot change between the two.
    if a.manifest_sha256.as_ref().is_some_and(|want| *want != file.sha256()) {
        return refuse(format!(
            "{} changed since the server that runs this call read it; restart it to use the new manifest",
            a.manifest.display()
        ));
    }
    let mut manifest = match file.parse() {
        Ok((m, _)) => m,
        Err(lines) => return refuse(format!("invalid manifest:\n{}", lines.join("\n"))),
    };
    let mut learned = if a.learn {
        eprintln!(
            "agentd: learn mode: the call sees the host read-only (not its secrets or homes) and may run \
             programs under /usr and /opt; use it on trusted inputs only"
        );
        super::learn::widen(&mut manifest, &a.tool)
    } else {
        Vec::new()
    };
    let mut args = BTreeMap::new();
    for (k, v) in &a.args {
        if args.insert(k.clone(), v.clone()).is_some() {
            return refuse(format!("--arg {k} is given twice"));
        }
    }
    if let Some(json) = &a.args_json {
        let text = if json == "-" {
            let mut text = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text) {
                return refuse(format!("reading --args-json from stdin: {e}"));
            }
            text
        } else {
            json.clone()
        };
        args = match agentd_policy::schema::args_from_json_text(&text) {
            Ok(a) => a,
            Err(e) => return refuse(format!("--args-json: {e}")),
        };
    }
    let req = CallRequest {
        call_id: call_id.to_string(),
        tool: a.tool.clone(),
        args,
        argv_override: (!a.argv.is_empty()).then(|| a.argv.clone()),
        agent_env: std::env::vars().collect(),
    };
    let mut host = Host::probe();
    let bpf = host.open_bpf();
    let swept = host.cgroups.sweep_stale(std::time::Duration::from_secs(60));
    if swept > 0 {
        tracing::info!(swept, "removed call cgroups left by an agentd that was killed");
    }
    let compiled = match &a.mcp_server {
        Some(name) => {
            let req = CallRequest { tool: name.clone(), ..req.clone() };
            agentd_policy::compile_mcp_server(&manifest, &req, &host.facts, &RealFs::default())
        }
        None => {
            // In learn mode a widened grant that the plan refuses (a kernel filesystem below
            // it, another tool's write grant inside an exec tree) is dropped, not fatal.
            let mut tries = 0;
            loop {
                let c = compile(&manifest, &req, &host.facts, &RealFs::default());
                match &c {
                    Err(agentd_policy::CompileError::Path { key, path, .. })
                        if tries < 1000
                            && super::learn::drop_added(&mut manifest, &a.tool, &mut learned, key, path) =>
                    {
                        tracing::debug!(path = %path, "learn mode: a grant of the host view is dropped");
                        tries += 1;
                    }
                    _ => break c,
                }
            }
        }
    };
    let mut plan = match compiled {
        Ok(p) => p,
        Err(e) => return refuse(format!("{}: {}", a.manifest.display(), error_chain(&e))),
    };
    plan.learn = learned.iter().map(super::learn::Added::describe).collect();
    // agentd's environment has served `env.pass`; it need not live on into the call's copy.
    drop(req);
    let mode = match (&a.mcp_server, a.json) {
        (Some(_), _) => OutputMode::Stdio,
        (None, true) => OutputMode::Capture,
        (None, false) => OutputMode::Stream,
    };
    let mut runner = Runner::new(&host).with_audit(audit);
    if let Some(bpf) = bpf {
        runner = runner.with_bpf(bpf);
    }
    if a.prepared_netns {
        match NetnsPool::new().and_then(|mut p| p.prepare().map(|()| p)) {
            Ok(pool) => runner = runner.with_netns_pool(pool),
            Err(e) => {
                return runner::refused(
                    Some(&plan),
                    call_id,
                    &unit,
                    EXIT_REFUSED,
                    format!("preparing a network namespace: {e}"),
                )
            }
        }
    }
    runner.run(&plan, mode)
}

fn report(r: &CallResult) {
    if let Some(e) = &r.error {
        for line in e.lines() {
            eprintln!("agentd: {line}");
        }
    }
    if r.stdout_truncated {
        eprintln!("agentd: stdout truncated: kept {} of {} bytes", r.stdout.len(), r.stdout_bytes);
    }
    if r.stderr_truncated {
        eprintln!("agentd: stderr truncated: kept {} of {} bytes", r.stderr.len(), r.stderr_bytes);
    }
    if r.timed_out {
        eprintln!("agentd: timed out after {} ms; the call's whole process tree was killed", r.duration_ms);
    }
    if r.oom_killed {
        eprintln!("agentd: the call ran out of memory and was OOM-killed");
    }
}
