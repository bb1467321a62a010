//! `agentd policy`: check, explain, test, draft, suggest, schema, lint and diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentd_policy::{compile, CallRequest, ExecPlan, Mount, Name};
use clap::Subcommand;

use crate::manifest::load_manifest_with_warnings;
use agentd_sandbox::host::{Host, RealFs};

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Validate manifests: exit 0 if all are valid, else print every problem as
    /// FILE:LINE:COL: error: MESSAGE and exit 1.
    Check {
        /// Manifest files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show the compiled plan of one tool on this host.
    Explain {
        /// Manifest file.
        file: PathBuf,
        /// Tool name.
        #[arg(long)]
        tool: String,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Draft a tool's manifest section from what its calls did (run them with `agentd exec
    /// --learn` first): reads, writes and execs grouped by a written rule, endpoints, and
    /// limits over the peaks measured, each grant with its evidence.
    Draft(super::policy_draft::DraftArgs),
    /// For calls that were refused (or did not find what they looked for), the smallest
    /// grants that would have let them through, each with its risk.
    Suggest(super::policy_draft::SuggestArgs),
    /// Run a manifest's tests file (agent.tests.toml): each [[check]] answered from the plan,
    /// each [[case]] run for real in its sandbox and judged from its result and audit
    /// records. Exits 1 if any fails.
    Test(super::policy_test::TestArgs),
    /// Print the JSON Schema of a manifest (what editors validate and complete with; the same
    /// file is docs/manifest.schema.json).
    Schema,
    /// Point out over-broad grants: home directories, credentials, /etc whole, sockets,
    /// wildcards, special address ranges, low bind ports, write grants the agent cannot write.
    /// Exits 1 if any finding is at or above `--fail-on`.
    Lint {
        /// Manifest files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Exit 1 on findings of this risk or higher: high, medium, low, or never.
        #[arg(long, default_value = "high", value_parser = ["high", "medium", "low", "never"])]
        fail_on: String,
    },
    /// What a change of a manifest grants or removes, tool by tool, with the over-broad
    /// findings of what is new. Exits 0 whatever changed (1 if a manifest is invalid).
    Diff {
        /// The manifest before.
        old: PathBuf,
        /// The manifest after.
        new: PathBuf,
        /// Only this tool (or `mcp.NAME`).
        #[arg(long)]
        tool: Option<String>,
        /// Print the diff as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: PolicyCommand) -> i32 {
    match cmd {
        PolicyCommand::Check { files } => check(&files),
        PolicyCommand::Explain { file, tool, json } => explain(&file, &tool, json),
        PolicyCommand::Test(a) => super::policy_test::run(a),
        PolicyCommand::Draft(a) => super::policy_draft::draft(&a),
        PolicyCommand::Suggest(a) => super::policy_draft::suggest(&a),
        PolicyCommand::Schema => {
            out!("{}", agentd_policy::keys::json_schema_text());
            0
        }
        PolicyCommand::Lint { files, json, fail_on } => lint(&files, json, &fail_on),
        PolicyCommand::Diff { old, new, tool, json } => diff(&old, &new, tool.as_deref(), json),
    }
}

/// A manifest, or the lines that say why not (printed here).
fn load_or_report(file: &Path) -> Option<agentd_policy::Manifest> {
    match load_manifest_with_warnings(file) {
        Ok((m, _)) => Some(m),
        Err(lines) => {
            for l in lines {
                eprintln!("{l}");
            }
            None
        }
    }
}

/// The findings of a manifest that need this host, as warning lines: write grants the
/// agent's uid cannot write, and interpreter libraries granted read-only.
fn host_warnings(file: &Path, m: &agentd_policy::Manifest) -> Vec<String> {
    agentd_policy::lint::host_findings(m, &RealFs::default())
        .iter()
        .map(|f| format!("{}: warning: `{}` {}: {}", file.display(), f.key, f.subject, f.message))
        .collect()
}

fn lint(files: &[PathBuf], json: bool, fail_on: &str) -> i32 {
    use agentd_policy::lint::{self, Risk};
    let threshold = match fail_on {
        "high" => Some(Risk::High),
        "medium" => Some(Risk::Medium),
        "low" => Some(Risk::Low),
        _ => None,
    };
    let mut failed = false;
    let mut reports = Vec::new();
    for file in files {
        let Some(m) = load_or_report(file) else {
            failed = true;
            continue;
        };
        let mut findings = lint::lint(&m);
        findings.extend(lint::host_findings(&m, &RealFs::default()));
        findings.extend(socket_findings(&m));
        findings.sort();
        failed |= threshold.is_some_and(|t| findings.iter().any(|f| f.risk <= t));
        if json {
            reports.push(serde_json::json!({ "file": file.display().to_string(), "findings": findings }));
            continue;
        }
        if findings.is_empty() {
            outln!("{}: no findings", file.display());
        }
        for f in &findings {
            outln!("{}: {f}", file.display());
        }
    }
    if json {
        outln!("{}", serde_json::Value::Array(reports));
    }
    i32::from(failed)
}

/// The plan of `tool` on this host, each argument a sample of its kind (the plan does not
/// depend on argument values): what `explain` shows and static checks are answered from.
pub(super) fn plan_of(manifest: &agentd_policy::Manifest, tool: &str, host: &Host) -> Result<ExecPlan, String> {
    let args: BTreeMap<String, String> = Name::parse(tool)
        .ok()
        .and_then(|n| manifest.tools.get(&n))
        .map(|t| t.args.iter().map(|a| (a.name.to_string(), a.kind.sample(a.name.as_str()))).collect())
        .unwrap_or_default();
    let req = CallRequest {
        call_id: "explain".into(),
        tool: tool.into(),
        args,
        argv_override: None,
        agent_env: std::env::vars().collect(),
    };
    compile(manifest, &req, &host.facts, &RealFs::default()).map_err(|e| agentd_policy::error_chain(&e))
}

/// Host sockets that read and write grants show (see [`socket_warnings`]), as findings.
fn socket_findings(m: &agentd_policy::Manifest) -> Vec<agentd_policy::lint::Finding> {
    let mut out = Vec::new();
    for (name, tool) in &m.tools {
        for (key, list) in [("read", &tool.fs.read), ("write", &tool.fs.write)] {
            for grant in list {
                let mut found = agentd_sandbox::host::sockets_below(grant.as_path(), SOCKET_SCAN_LIMIT);
                found.sockets.retain(|s| !tool.net.unix.iter().any(|u| u.as_path() == s));
                if found.sockets.is_empty() {
                    continue;
                }
                let shown: Vec<String> = found.sockets.iter().take(3).map(|p| p.display().to_string()).collect();
                let more = found.sockets.len().saturating_sub(3);
                out.push(agentd_policy::lint::Finding {
                    risk: agentd_policy::lint::Risk::Low,
                    code: "sockets_in_grant",
                    key: format!("tools.{name}.fs.{key}"),
                    subject: grant.to_string(),
                    message: format!(
                        "holds Unix sockets ({}{}{}); they stay unreachable from the tool unless `tools.{name}.net.unix` \
                         names them",
                        shown.join(", "),
                        if more > 0 { format!(" and {more} more") } else { String::new() },
                        if found.truncated { "; stopped looking after a limit" } else { "" },
                    ),
                });
            }
        }
    }
    out
}

fn diff(old: &Path, new: &Path, tool: Option<&str>, json: bool) -> i32 {
    let (Some(a), Some(b)) = (load_or_report(old), load_or_report(new)) else { return 1 };
    if let Some(t) = tool {
        let known = |m: &agentd_policy::Manifest| {
            m.tools.keys().any(|n| n.as_str() == t || format!("tools.{n}") == t)
                || m.mcp.keys().any(|n| n.as_str() == t || format!("mcp.{n}") == t)
        };
        if !known(&a) && !known(&b) {
            eprintln!("agentd: neither manifest has a tool or MCP server {t:?}");
            return 1;
        }
    }
    let d = agentd_policy::diff::diff(&a, &b, tool);
    if json {
        match serde_json::to_string_pretty(&d) {
            Ok(s) => outln!("{s}"),
            Err(e) => {
                eprintln!("agentd: cannot encode the diff: {e}");
                return 1;
            }
        }
    } else {
        out!("{d}");
    }
    0
}

fn check(files: &[PathBuf]) -> i32 {
    let mut failed = false;
    for f in files {
        match load_manifest_with_warnings(f) {
            Ok((m, mut warnings)) => {
                warnings.extend(socket_warnings(f, &m));
                warnings.extend(host_warnings(f, &m));
                for w in &warnings {
                    eprintln!("{w}");
                }
                let note = if warnings.is_empty() { String::new() } else { format!(", {} warnings", warnings.len()) };
                let servers = match m.mcp.len() {
                    0 => String::new(),
                    n => format!(", {n} MCP server{}", if n == 1 { "" } else { "s" }),
                };
                outln!("{}: ok ({} tools{servers}{note})", f.display(), m.tools.len());
            }
            Err(lines) => {
                failed = true;
                for l in lines {
                    eprintln!("{l}");
                }
            }
        }
    }
    i32::from(failed)
}

/// Read and write grants that show host Unix sockets on this host. The sandbox keeps them
/// unreachable unless `net.unix` names them, but a grant that holds one is worth a look: the
/// author may have meant to grant the socket, or granted more than needed.
fn socket_warnings(file: &Path, m: &agentd_policy::Manifest) -> Vec<String> {
    socket_findings(m)
        .iter()
        .map(|f| format!("{}: warning: `{}` path {} {}", file.display(), f.key, f.subject, f.message))
        .collect()
}

/// Entries looked at per grant when searching it for sockets.
const SOCKET_SCAN_LIMIT: usize = 20_000;

fn explain(file: &Path, tool: &str, json: bool) -> i32 {
    let manifest = match load_manifest_with_warnings(file) {
        Ok((m, warnings)) => {
            for w in warnings.iter().chain(&socket_warnings(file, &m)).chain(&host_warnings(file, &m)) {
                eprintln!("{w}");
            }
            m
        }
        Err(lines) => {
            for l in lines {
                eprintln!("{l}");
            }
            return 1;
        }
    };
    let mut host = Host::probe();
    // The plan depends on whether the BPF layer would run (exact network grants).
    let bpf = host.open_bpf();
    let plan = match plan_of(&manifest, tool, &host) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agentd: {}: {e}", file.display());
            return 1;
        }
    };
    if json {
        match serde_json::to_string_pretty(&plan) {
            Ok(s) => outln!("{s}"),
            Err(e) => {
                eprintln!("agentd: cannot encode the plan: {e}");
                return 1;
            }
        }
    } else {
        out!("{}", human(&plan));
        match (&bpf, &host.bpf_note) {
            (Some(b), _) => {
                outln!("bpf: {} layer loaded ({})", b.layer().name(), b.programs().join(", "));
                if let Some(why) = b.note() {
                    outln!("bpf: no BPF LSM: {why}");
                }
            }
            (None, Some(why)) => outln!("bpf: none ({why})"),
            (None, None) => outln!("bpf: none"),
        }
    }
    0
}

/// The call's network namespace as the tool will find it.
fn network_view(s: &mut String, n: &agentd_policy::NetworkPlan) {
    use agentd_policy::{HostAddr, NetMode};
    use std::fmt::Write;
    if n.mode == NetMode::Isolated {
        let _ = writeln!(s, "network: isolated (own namespace, loopback only)");
        return;
    }
    let _ = writeln!(
        s,
        "network: forwarded (own namespace: every address routes to its loopback, where only agentd listens)"
    );
    for g in &n.connect {
        let what = match &g.addr {
            HostAddr::Ip(_) => "this address",
            HostAddr::Range(_) => "any address of this range",
            HostAddr::Name(d) if d.wildcard => "names strictly below this domain, resolved by agentd; public addresses only unless a grant names the range",
            HostAddr::Name(_) => "this name, resolved by agentd; public addresses only unless a grant names the range",
            HostAddr::Any => "any public address (loopback, link-local and private need a grant naming them)",
        };
        let _ = writeln!(s, "  connect {g}: {what}");
    }
    let _ = writeln!(
        s,
        "  agentd listens on ports {:?} on every address, and opens each allowed connection from the host's namespace",
        n.connect_ports
    );
    if let Some(d) = n.dns {
        let _ = writeln!(s, "  dns: stub at {d} (UDP; /etc/resolv.conf names it); it answers granted names only");
    }
    if let Some(p) = n.proxy {
        let _ = writeln!(s, "  proxy: http://{p} (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY; CONNECT and plain HTTP)");
    }
    for g in &n.bind {
        let _ =
            writeln!(s, "  bind {g}: agentd listens there on the host and connects each client to the tool's listener");
    }
}

fn human(p: &ExecPlan) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "tool {} of agent {}", p.tool, p.agent);
    let _ = writeln!(s, "  argv: {:?}", p.argv);
    let _ = writeln!(s, "  runs as host uid {} gid {} (no capabilities, no_new_privs)", p.identity.uid, p.identity.gid);
    let _ = writeln!(s, "namespaces: {}", p.namespaces.names().join(", "));
    network_view(&mut s, &p.network);
    let granted = if p.network.unix.is_empty() { "none of the host's".to_string() } else { p.network.unix.join(", ") };
    let _ = match p.unix_connect {
        agentd_policy::UnixConnect::Gate => writeln!(
            s,
            "unix sockets: {granted} (each connect checked by the call's init; its own /tmp sockets and socketpair work)"
        ),
        agentd_policy::UnixConnect::Refused => {
            writeln!(s, "unix sockets: only socketpair (this kernel cannot check connects by path)")
        }
    };
    let _ = writeln!(s, "mounts (fresh tmpfs root, read-only after setup):");
    for m in &p.mounts {
        let line = match m {
            Mount::Bind { path, writable, exec, dir } => format!(
                "{path}  bind {}{}{}",
                if *writable { "rw" } else { "ro" },
                if *exec { "" } else { ",noexec" },
                if *dir { "" } else { " (file)" }
            ),
            Mount::Tmpfs { path, size_bytes } => format!("{path}  tmpfs {} MiB, noexec", size_bytes >> 20),
            Mount::Proc { path, pids_only } => {
                format!("{path}  proc (own pid namespace{})", if *pids_only { ", processes only" } else { "" })
            }
            Mount::Dev { path, nodes } => format!("{path}  minimal: {}", nodes.join(" ")),
            Mount::File { path, contents } => {
                let said: Vec<&str> = contents.lines().filter(|l| !l.starts_with('#')).collect();
                format!("{path}  file from agentd, ro: {}", said.join("; "))
            }
        };
        let _ = writeln!(s, "  {line}");
    }
    for l in &p.symlinks {
        let _ = writeln!(s, "  {} -> {}  symlink", l.link, l.target);
    }
    if !p.loader.brought.is_empty() || !p.loader.missing.is_empty() {
        let _ = writeln!(s, "loaders and libraries (brought read-only and executable for the programs the tool runs):");
    }
    for b in &p.loader.brought {
        let at = if b.path == b.canonical { String::new() } else { format!(" at {}", b.path) };
        let _ = writeln!(s, "  {}{at}  {} of {}", b.canonical, b.what, b.program);
    }
    for m in &p.loader.missing {
        let _ = writeln!(s, "  MISSING {m}");
    }
    let ll = &p.landlock;
    let _ = writeln!(
        s,
        "landlock: ABI {} used (kernel {}, pinned {}, required >= {})",
        ll.abi_used, ll.abi_kernel, ll.abi_pinned, ll.abi_required
    );
    for r in &ll.rules {
        let rights: Vec<String> = r.rights.iter().map(|r| format!("{r:?}")).collect();
        let _ = writeln!(s, "  {}  {}", r.path, rights.join(" "));
    }
    let _ = writeln!(
        s,
        "  tcp rules: {}, scoped signals/abstract sockets: {}, unix sockets by path (ABI 9): {}",
        ll.handles_tcp, ll.scoped, ll.resolve_unix
    );
    for d in &ll.degraded {
        let _ = writeln!(s, "  degraded: {d}");
    }
    let c = &p.cgroup;
    let _ = writeln!(
        s,
        "cgroup ({:?}): memory {} MiB (no swap), pids {}, cpu {}/{} us",
        c.flavor,
        c.memory_bytes >> 20,
        c.pids,
        c.cpu_quota_us,
        c.cpu_period_us
    );
    let rl: Vec<String> = p.rlimits.iter().map(|r| format!("{:?} {}/{}", r.resource, r.soft, r.hard)).collect();
    let _ = writeln!(s, "rlimits: {}", rl.join(", "));
    let _ = writeln!(s, "timeout {} ms, output {} bytes per stream", p.timeout_ms, p.output_bytes);
    let _ = writeln!(s, "writable+executable memory: {:?}", p.write_execute);
    let env: Vec<String> = p.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ =
        writeln!(s, "environment (nothing else): {}", if env.is_empty() { "(empty)".into() } else { env.join(" ") });
    let _ = writeln!(s, "requirements:");
    for r in &p.requirements {
        let _ = writeln!(
            s,
            "  {:<18} {:<11} {}  {}",
            r.feature,
            format!("{:?}", r.level).to_lowercase(),
            if r.available { "available" } else { "MISSING  " },
            r.note
        );
    }
    if let Some(r) = p.unmet_requirement() {
        let _ = writeln!(s, "=> calls are REFUSED on this host: {} is required but missing", r.feature);
    }
    s
}
