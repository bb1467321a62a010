//! A manifest's tests file (`agent.tests.toml`): cases that `agentd policy test` runs for real,
//! and static checks answered from the compiled plan without running anything.
//!
//! ```toml
//! manifest = "agent.toml"          # beside this file unless absolute; this is the default
//!
//! [[case]]
//! name = "finds who is on call"
//! tool = "search"
//! args = { pattern = "billing-worker" }
//! expect = "allow"                 # the call succeeds, nothing is denied
//! stdout_contains = "kenji"
//!
//! [[case]]
//! name = "cannot read the host's password hashes"
//! tool = "shell"
//! args = { command = "cat /etc/shadow" }
//! expect = "deny"
//! denial = "fs_read"               # what must have been refused
//! on = "/etc/shadow"               # and about what (a path or an address)
//!
//! [[check]]
//! tool = "shell"
//! can_read = "/etc/shadow"
//! expect = "deny"
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::Deserialize;

use crate::access::FsRight;
use crate::diag::{Diagnostics, Sink};
use crate::plan::{ExecPlan, Mount};

/// The default name of a manifest's tests file, beside `agent.toml`.
pub const TESTS_FILE: &str = "agent.tests.toml";

/// A whole tests file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// The manifest under test, relative to the tests file (default `agent.toml`).
    #[serde(default = "default_manifest")]
    pub manifest: String,
    /// Cases run in a sandbox.
    #[serde(default, rename = "case")]
    pub cases: Vec<Case>,
    /// Checks answered from the plan.
    #[serde(default, rename = "check")]
    pub checks: Vec<Check>,
}

fn default_manifest() -> String {
    "agent.toml".into()
}

/// What a case or check expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Allowed: the call succeeds with nothing denied (or the access is granted).
    Allow,
    /// Denied: something was refused (or the access is not granted).
    Deny,
}

/// What kind of refusal a `deny` case needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Denial {
    /// Any refusal.
    Any,
    /// Opening a file to read it: refused, or not visible in the sandbox.
    FsRead,
    /// Writing or changing a file: refused, read-only, or not visible.
    FsWrite,
    /// Executing a program: refused, or not visible.
    FsExec,
    /// An IP connect (or a name agentd would not resolve).
    Connect,
    /// A bind.
    Bind,
    /// A connect to a host Unix socket.
    Unix,
    /// Memory made executable.
    Memory,
    /// A signal, ptrace, mount or device outside the call.
    Process,
    /// The call was refused before it ran, for its arguments.
    Argument,
    /// The call was refused before it ran, for any reason (a missing requirement, say).
    Refused,
    /// The call ran out of time.
    Timeout,
}

impl Denial {
    /// The name used in tests files.
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Any => "any",
            Denial::FsRead => "fs_read",
            Denial::FsWrite => "fs_write",
            Denial::FsExec => "fs_exec",
            Denial::Connect => "connect",
            Denial::Bind => "bind",
            Denial::Unix => "unix",
            Denial::Memory => "memory",
            Denial::Process => "process",
            Denial::Argument => "argument",
            Denial::Refused => "refused",
            Denial::Timeout => "timeout",
        }
    }
}

/// One case, run for real.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What the case shows, in words.
    pub name: String,
    /// The tool called.
    pub tool: String,
    /// Its arguments: strings, numbers, booleans, or lists of them.
    #[serde(default)]
    pub args: BTreeMap<String, toml::Value>,
    /// A command that replaces the tool's argv template (as `agentd exec -- ARGV`), to probe
    /// the sandbox with programs the template does not run.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Allowed or denied.
    pub expect: Expect,
    /// For `deny`: the kind of refusal (default `any`).
    #[serde(default)]
    pub denial: Option<Denial>,
    /// For `deny`: the path or address the refusal must be about (a prefix of a path; an
    /// address as `host:port`).
    #[serde(default)]
    pub on: Option<String>,
    /// Text the tool's stdout must contain.
    #[serde(default)]
    pub stdout_contains: Option<String>,
    /// Text the tool's stdout must not contain (a secret that must not leak).
    #[serde(default)]
    pub stdout_lacks: Option<String>,
}

/// One static check: what the plan of `tool` grants, with nothing run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// The tool.
    pub tool: String,
    /// A path the tool can open for reading.
    #[serde(default)]
    pub can_read: Option<String>,
    /// A path the tool can write (create, change, remove).
    #[serde(default)]
    pub can_write: Option<String>,
    /// A program the tool can execute.
    #[serde(default)]
    pub can_exec: Option<String>,
    /// `ip:port` or `name:port` the tool can connect to.
    #[serde(default)]
    pub can_connect: Option<String>,
    /// Allowed (default) or denied.
    #[serde(default = "allow")]
    pub expect: Expect,
}

fn allow() -> Expect {
    Expect::Allow
}

impl Check {
    /// The check in words, e.g. `shell can_read /etc/shadow`.
    pub fn label(&self) -> String {
        let (what, value) = self.question().unwrap_or(("?", ""));
        let not = if self.expect == Expect::Deny { "not " } else { "" };
        format!("{} {not}{what} {value}", self.tool)
    }

    fn question(&self) -> Option<(&'static str, &str)> {
        [
            ("can_read", &self.can_read),
            ("can_write", &self.can_write),
            ("can_exec", &self.can_exec),
            ("can_connect", &self.can_connect),
        ]
        .into_iter()
        .find_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

/// Parses a tests file; errors name the file, line, column and key.
pub fn parse_tests(file: &str, src: &str) -> Result<TestFile, Diagnostics> {
    let mut sink = Sink::new(file, src);
    let parsed: Result<TestFile, toml::de::Error> = toml::from_str(src);
    match parsed {
        Ok(t) => {
            // Each check asks exactly one question, and each case names itself.
            for (i, c) in t.checks.iter().enumerate() {
                let asked =
                    [&c.can_read, &c.can_write, &c.can_exec, &c.can_connect].iter().filter(|v| v.is_some()).count();
                if asked != 1 {
                    let at = nth_table(src, "check", i);
                    sink.error(
                        at..at,
                        &format!("check[{i}]"),
                        format!(
                            "`check[{i}]` ({}) must ask exactly one of can_read, can_write, can_exec, can_connect",
                            c.tool
                        ),
                    );
                }
            }
            for (i, c) in t.cases.iter().enumerate() {
                let at = nth_table(src, "case", i);
                if c.expect == Expect::Allow && (c.denial.is_some() || c.on.is_some()) {
                    let msg = format!("`case[{i}]` ({}) expects allow: `denial` and `on` are for deny", c.name);
                    sink.error(at..at, &format!("case[{i}]"), msg);
                }
                for (k, v) in &c.args {
                    if arg_text(v).is_none() {
                        let msg = format!(
                            "`case[{i}].args.{k}` must be a string, number, boolean or a list of them, not a {}",
                            v.type_str()
                        );
                        sink.error(at..at, &format!("case[{i}].args.{k}"), msg);
                    }
                }
            }
            sink.finish().map(|_| t)
        }
        Err(e) => {
            sink.error(e.span().unwrap_or(0..0), "", e.message().trim().to_string());
            Err(sink.finish().err().unwrap_or(Diagnostics(Vec::new())))
        }
    }
}

/// Where the `i`th `[[name]]` header is, for a located error (0 if not found).
fn nth_table(src: &str, name: &str, i: usize) -> usize {
    let header = format!("[[{name}]]");
    src.match_indices(&header).nth(i).map_or(0, |(at, _)| at)
}

/// A case's arguments as the JSON object `agentd exec --args-json` takes.
pub fn args_json(args: &BTreeMap<String, toml::Value>) -> serde_json::Value {
    serde_json::Value::Object(args.iter().filter_map(|(k, v)| Some((k.clone(), json_of(v)?))).collect())
}

fn json_of(v: &toml::Value) -> Option<serde_json::Value> {
    arg_text(v)?;
    serde_json::to_value(v).ok()
}

/// Whether a value can be an argument (scalars, and lists of scalars).
fn arg_text(v: &toml::Value) -> Option<()> {
    match v {
        toml::Value::String(_) | toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => Some(()),
        toml::Value::Array(items) => {
            items.iter().all(|i| !matches!(i, toml::Value::Array(_) | toml::Value::Table(_))).then_some(())
        }
        _ => None,
    }
}

/// Answers a static check from the plan of its tool: `Ok` with the evidence (the mount and
/// rule that grant it, or why not) when the answer is what the check expects, else `Err`
/// with the same evidence.
pub fn answer(check: &Check, plan: &ExecPlan, canonical: &dyn Fn(&str) -> String) -> Result<String, String> {
    let (granted, evidence) = match check.question() {
        Some(("can_read", p)) => fs_access(plan, &canonical(p), FsRight::ReadFile, false, false),
        Some(("can_write", p)) => fs_access(plan, &canonical(p), FsRight::WriteFile, true, false),
        Some(("can_exec", p)) => fs_access(plan, &canonical(p), FsRight::Execute, false, true),
        Some(("can_connect", to)) => connect(plan, to),
        _ => return Err("the check asks nothing".into()),
    };
    if granted == (check.expect == Expect::Allow) {
        Ok(evidence)
    } else {
        Err(evidence)
    }
}

/// Whether `path` (canonical) is visible, with the mount flags and Landlock right asked.
fn fs_access(plan: &ExecPlan, path: &str, right: FsRight, write: bool, exec: bool) -> (bool, String) {
    let under = |base: &str| Path::new(path).starts_with(base);
    // The deepest mount that shows the path decides its flags.
    let mount = plan
        .mounts
        .iter()
        .filter_map(|m| match m {
            Mount::Bind { path: p, writable, exec: x, .. } if under(p) => Some((p.as_str(), *writable, *x)),
            Mount::Tmpfs { path: p, .. } if under(p) => Some((p.as_str(), true, false)),
            _ => None,
        })
        .max_by_key(|(p, _, _)| p.len());
    let Some((at, writable, executable)) = mount else {
        return (false, format!("{path} is not visible in the sandbox (no grant shows it)"));
    };
    let private = plan.mounts.iter().any(|m| matches!(m, Mount::Tmpfs { path: p, .. } if p == at));
    if private {
        return (false, format!("{path} is under the call's own empty {at} (a tmpfs): the host's file is not there"));
    }
    if write && !writable {
        return (false, format!("{path} is shown read-only (mount {at})"));
    }
    if exec && !executable {
        return (false, format!("{path} is shown noexec (mount {at}): only fs.exec grants may run programs"));
    }
    let lsm = plan.requirements.iter().any(|r| r.feature == "bpf_lsm" && r.available);
    if lsm && plan.bpf.deny_open.iter().any(|d| under(d)) && !exec {
        return (false, format!("{path} is under audit.deny_open (refused where BPF LSM runs)"));
    }
    let ll = &plan.landlock;
    if ll.abi_used == 0 || !ll.handled.contains(&right) {
        return (true, format!("mount {at}; Landlock does not handle {right:?} here"));
    }
    match ll.rules.iter().filter(|r| under(&r.path)).find(|r| r.rights.contains(&right)) {
        Some(r) => (true, format!("mount {at}, Landlock rule {} grants {right:?}", r.path)),
        None => (false, format!("mount {at} shows it, but no Landlock rule grants {right:?}")),
    }
}

/// Whether the plan lets the tool do `kind` (`fs_read`, `fs_write`, `fs_exec`) to `path`
/// (canonical): a refusal of it then came from the file's own mode, or the file is absent,
/// not from the policy. `None` for other kinds.
pub fn plan_allows(plan: &ExecPlan, path: &str, kind: Denial) -> Option<bool> {
    let (right, write, exec) = match kind {
        Denial::FsRead => (FsRight::ReadFile, false, false),
        Denial::FsWrite => (FsRight::WriteFile, true, false),
        Denial::FsExec => (FsRight::Execute, false, true),
        _ => return None,
    };
    Some(fs_access(plan, path, right, write, exec).0)
}

fn connect(plan: &ExecPlan, to: &str) -> (bool, String) {
    let Some((host, port)) = to.rsplit_once(':') else {
        return (false, format!("{to:?} is not host:port"));
    };
    let Ok(port) = port.parse::<u16>() else {
        return (false, format!("{to:?}: the port is not a number"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let n = &plan.network;
    match host.parse::<IpAddr>() {
        Ok(ip) => match n.allows_address(SocketAddr::new(ip, port)) {
            Ok(()) => (true, format!("{to} is granted by address")),
            Err(r) => (false, r.0),
        },
        Err(_) => {
            let ports = n.name_ports(host);
            if ports.contains(&port) {
                (true, format!("{host} is granted on port {port} (resolved by agentd; public addresses only)"))
            } else if ports.is_empty() {
                (false, format!("no grant names {host}"))
            } else {
                (false, format!("{host} is granted on ports {ports:?}, not {port}"))
            }
        }
    }
}
