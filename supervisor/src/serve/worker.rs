//! A sandbox worker of `agentd serve` (`agentd __serve-worker`): a single-threaded process
//! that runs tool calls one at a time, as `agentd exec` does, for the daemon. Sandboxes are
//! only spawned from single-threaded processes, and the daemon has many threads.
//!
//! The protocol is JSON lines: the daemon writes a [`WorkRequest`], the worker answers with
//! the call's result (the `agentd exec --json` object). The worker keeps its audit log, its
//! BPF event ring buffer and a prepared network namespace across calls.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use agentd_policy::{compile, CallRequest, Manifest};
use serde::{Deserialize, Serialize};

use crate::sys;
use agentd_audit::AuditLog;
use agentd_policy::error_chain;
use agentd_sandbox::host::{Host, MountTable, RealFs};
use agentd_sandbox::runner::{self, CallResult, OutputMode, Runner, EXIT_REFUSED};
use agentd_sandbox::spawn::NetnsPool;

/// One call for a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkRequest {
    /// The call id, announced before.
    pub call_id: String,
    /// The manifest file of the agent.
    pub manifest: PathBuf,
    /// The tool.
    pub tool: String,
    /// Its arguments.
    pub args: BTreeMap<String, String>,
}

/// Runs the worker until its input ends; returns the exit code.
pub fn main(audit_log: &Path) -> i32 {
    if sys::geteuid() != 0 {
        eprintln!("agentd: the serve worker must run as root");
        return EXIT_REFUSED;
    }
    if let Err(e) = sys::harden_self() {
        eprintln!("agentd: hardening the serve worker: {e}");
        return EXIT_REFUSED;
    }
    let (audit, mut refusals) = match (AuditLog::open(audit_log), AuditLog::open(audit_log)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("agentd: the audit log cannot be opened, so no call may run: {}", error_chain(&e));
            return EXIT_REFUSED;
        }
    };
    let mut host = Host::probe();
    let bpf = host.open_bpf();
    let mut runner = Runner::new(&host).with_audit(audit);
    if let Some(bpf) = bpf {
        runner = runner.with_bpf(bpf);
    }
    match NetnsPool::new().and_then(|mut p| p.prepare().map(|()| p)) {
        Ok(pool) => runner = runner.with_netns_pool(pool),
        Err(e) => tracing::warn!(error = %e, "no prepared network namespaces; each call makes its own"),
    }
    let mounts = MountTable::open();
    let mut manifests: HashMap<PathBuf, Result<Manifest, String>> = HashMap::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let result = match serde_json::from_str::<WorkRequest>(&line) {
            Ok(req) => {
                let manifest = manifests
                    .entry(req.manifest.clone())
                    .or_insert_with(|| {
                        crate::manifest::load_manifest(&req.manifest)
                            .map_err(|l| format!("invalid manifest:\n{}", l.join("\n")))
                    })
                    .clone();
                call(&host, &mounts, &mut runner, &mut refusals, manifest, &req)
            }
            Err(e) => runner::refused(None, "", "", EXIT_REFUSED, format!("a malformed request from the daemon: {e}")),
        };
        let Ok(json) = serde_json::to_string(&result) else { break };
        if writeln!(out, "{json}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    0
}

fn call(
    host: &Host,
    mounts: &MountTable,
    runner: &mut Runner<'_>,
    refusals: &mut AuditLog,
    manifest: Result<Manifest, String>,
    req: &WorkRequest,
) -> CallResult {
    let mut refuse = |msg: String| runner::refuse_recorded(refusals, &req.call_id, &req.tool, msg);
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => return refuse(e),
    };
    let creq = CallRequest {
        call_id: req.call_id.clone(),
        tool: req.tool.clone(),
        args: req.args.clone(),
        argv_override: None,
        agent_env: std::env::vars().collect(),
    };
    match compile(&manifest, &creq, &host.facts, &RealFs::with_table(mounts)) {
        Ok(plan) => runner.run(&plan, OutputMode::Capture),
        Err(e) => refuse(format!("{}: {}", req.manifest.display(), error_chain(&e))),
    }
}
