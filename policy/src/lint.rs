//! Over-broad grants: what `policy lint`, `policy diff`, `policy draft` and `policy suggest`
//! point out, each with a risk level and what to write instead.
//!
//! The findings are judgements, not errors: a manifest with findings is valid. They come in
//! two kinds:
//! - [`lint`], from the manifest alone (home directories, credential paths, `/etc` whole,
//!   sockets, wildcards, special address ranges, low bind ports, relaxed audit);
//! - [`host_findings`], from the manifest and the host (write grants the agent's uid cannot
//!   write, interpreter library directories granted read-only).
//!
//! The list of secrets ([`secret`]) is shared with learn mode, which never shows them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::compile::HostFs;
use crate::model::{AuditMode, LossAction, Manifest, Tool};
use crate::net::special_range;
use crate::types::{AbsPath, HostAddr, HostPort};

/// How much a finding widens what a tool can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Risk {
    /// Reaches secrets or the host's integrity: fix before use.
    High,
    /// Wider than a tool usually needs: justify it or narrow it.
    Medium,
    /// Worth a look.
    Low,
}

impl Risk {
    /// The word printed for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::High => "high",
            Risk::Medium => "medium",
            Risk::Low => "low",
        }
    }
}

/// One over-broad grant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Finding {
    /// How serious.
    pub risk: Risk,
    /// A stable name for the kind of finding (`home`, `secret`, `wildcard_name`, ...).
    pub code: &'static str,
    /// The manifest key, e.g. `tools.shell.fs.read`.
    pub key: String,
    /// The grant as written (a path, an endpoint, a name), or empty.
    pub subject: String,
    /// What it means, and what to write instead.
    pub message: String,
}

impl Finding {
    fn new(risk: Risk, code: &'static str, key: &str, subject: impl ToString, message: impl Into<String>) -> Self {
        Self { risk, code, key: key.to_string(), subject: subject.to_string(), message: message.into() }
    }
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subject.is_empty() {
            write!(f, "{}: `{}`: {}", self.risk.as_str(), self.key, self.message)
        } else {
            write!(f, "{}: `{}` {}: {}", self.risk.as_str(), self.key, self.subject, self.message)
        }
    }
}

/// Files and trees that hold credentials, as absolute paths or as paths under any home
/// directory (`~/`). Learn mode hides them; a grant that reaches one is a `secret` finding.
pub const SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/ssl/private",
    "/etc/krb5.keytab",
    "/etc/security/opasswd",
    "/etc/libvirt",
    "/etc/NetworkManager/system-connections",
    "/etc/wireguard",
    "/etc/agentd",
    "/var/lib/agentd",
    "/run/secrets",
    "/var/run/secrets",
    "/var/lib/docker",
    "/var/lib/kubelet",
    "/var/lib/containers",
    "/var/lib/sss",
    "/var/lib/private",
    "/var/backups",
    "/var/spool/cron",
    "/var/mail",
    "/var/roothome",
    "/etc/pki/tls/private",
    "/etc/letsencrypt",
    "/etc/kubernetes",
    "/etc/rancher",
    "/etc/containers/auth.json",
    "/etc/credstore",
    "/etc/credstore.encrypted",
    "/etc/ipsec.secrets",
    "/etc/mysql/debian.cnf",
    "/.snapshots",
    "/root",
    "~/.ssh",
    "~/.gnupg",
    "~/.aws",
    "~/.azure",
    "~/.config/gcloud",
    "~/.kube",
    "~/.docker",
    "~/.netrc",
    "~/.git-credentials",
    "~/.config/git/credentials",
    "~/.pgpass",
    "~/.my.cnf",
    "~/.npmrc",
    "~/.pypirc",
    "~/.cargo/credentials",
    "~/.cargo/credentials.toml",
    "~/.password-store",
    "~/.local/share/keyrings",
    "~/.config/gh",
    "~/.terraform.d",
    "~/.vault-token",
    "~/.bash_history",
    "~/.zsh_history",
];

/// Directories whose children are home directories.
const HOME_PARENTS: &[&str] = &["/home", "/Users", "/var/home"];

/// Whether `path` is a home directory or at or below one; `Some(home)` if so. `/root` counts.
pub fn home_of(path: &Path) -> Option<PathBuf> {
    if path.starts_with("/root") {
        return Some(PathBuf::from("/root"));
    }
    HOME_PARENTS.iter().find_map(|parent| {
        let rest = path.strip_prefix(parent).ok()?;
        let user = rest.components().next()?;
        Some(Path::new(parent).join(user))
    })
}

/// Why `path` is a secret (the entry of [`SECRETS`] it is at or below), if it is.
pub fn secret(path: &Path) -> Option<&'static str> {
    SECRETS.iter().copied().find(|s| match s.strip_prefix("~/") {
        Some(rel) => home_of(path).is_some_and(|home| path.starts_with(home.join(rel))),
        None => path.starts_with(s),
    })
}

/// The secrets at or below `path` that a grant of it shows: the absolute entries of
/// [`SECRETS`] under it, and `~/...` entries where it holds home directories.
fn secrets_below(path: &Path) -> Vec<&'static str> {
    let holds_homes =
        HOME_PARENTS.iter().any(|h| Path::new(h).starts_with(path)) || home_of(path).is_some_and(|home| home == path);
    SECRETS
        .iter()
        .copied()
        .filter(|s| match s.strip_prefix("~/") {
            Some(_) => holds_homes,
            None => Path::new(s).starts_with(path) && Path::new(s) != path,
        })
        .collect()
}

/// Trees that a tool should not get whole.
const WHOLESALE: &[(&str, &str)] = &[
    ("/", "the whole host"),
    ("/etc", "the host's whole configuration"),
    ("/var", "the host's whole state (logs, databases, caches, spools)"),
    ("/home", "every user's home directory"),
    ("/run", "the host's runtime state and its sockets"),
    ("/tmp", "every user's temporary files"),
    ("/var/tmp", "every user's temporary files"),
    ("/boot", "the kernel and boot loader"),
];

/// Trees whose change alters the host for everyone.
const SYSTEM_TREES: &[&str] =
    &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/boot", "/opt", "/var/lib", "/var/log", "/var/spool"];

/// Environment variable names that usually carry credentials.
const SECRET_ENV: &[&str] =
    &["TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "APIKEY", "PRIVATE_KEY", "CREDENTIAL"];

/// Sockets that give their client root on the host.
const ROOT_SOCKETS: &[&str] = &["docker.sock", "containerd.sock", "podman.sock", "crio.sock", "libvirt-sock"];

/// The findings of a whole manifest, from the manifest alone, in key order.
pub fn lint(m: &Manifest) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, tool) in &m.tools {
        out.extend(unit(&format!("tools.{}", name.as_str()), tool));
    }
    for (name, server) in &m.mcp {
        out.extend(unit(&format!("mcp.{}", name.as_str()), &server.sandbox));
    }
    out.extend(shared_exec(m));
    out.sort();
    out.dedup();
    out
}

/// The findings of one tool (or MCP server's sandbox), written as `[{prefix}]`.
pub fn unit(prefix: &str, tool: &Tool) -> Vec<Finding> {
    let mut out = Vec::new();
    for (right, list) in [("read", &tool.fs.read), ("write", &tool.fs.write), ("exec", &tool.fs.exec)] {
        let key = format!("{prefix}.fs.{right}");
        for g in list {
            path_findings(&mut out, &key, right, g);
        }
    }
    for s in &tool.net.unix {
        let key = format!("{prefix}.net.unix");
        let name = s.as_path().file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if ROOT_SOCKETS.contains(&name) {
            out.push(Finding::new(
                Risk::High,
                "root_socket",
                &key,
                s,
                "a client of this socket can start privileged containers or machines: root on the host",
            ));
        } else {
            out.push(Finding::new(
                Risk::Medium,
                "socket",
                &key,
                s,
                "the tool can talk to the service behind this socket with the agent's identity; check what that \
                 service lets its clients do",
            ));
        }
    }
    for hp in &tool.net.connect {
        endpoint_findings(&mut out, &format!("{prefix}.net.connect"), hp);
    }
    for hp in &tool.net.bind {
        let key = format!("{prefix}.net.bind");
        if hp.port.get() != 0 && hp.port.get() < 1024 {
            out.push(Finding::new(
                Risk::Medium,
                "low_port_bind",
                &key,
                hp,
                format!(
                    "port {} is below 1024, where the host's own services listen; a tool's server belongs on a \
                     high port",
                    hp.port.get()
                ),
            ));
        }
        if matches!(hp.addr, HostAddr::Any) || matches!(hp.addr, HostAddr::Ip(ip) if ip.is_unspecified()) {
            out.push(Finding::new(
                Risk::Medium,
                "bind_any",
                &key,
                hp,
                "binds every address: reachable from the network, not only from this host; bind 127.0.0.1",
            ));
        }
    }
    for name in &tool.env.pass {
        let upper = name.as_str().to_ascii_uppercase();
        if SECRET_ENV.iter().any(|s| upper.contains(s)) || upper.starts_with("AWS_") {
            out.push(Finding::new(
                Risk::Medium,
                "secret_env",
                &format!("{prefix}.env.pass"),
                name.as_str(),
                "passes what looks like a credential from agentd's environment into every call of the tool",
            ));
        }
    }
    if tool.audit.mode == AuditMode::Audit {
        out.push(Finding::new(
            Risk::Medium,
            "audit_only",
            &format!("{prefix}.audit.mode"),
            "audit",
            "the BPF layer records but does not deny; Landlock and the mounts still hold",
        ));
    }
    if tool.audit.on_audit_loss == LossAction::Record {
        out.push(Finding::new(
            Risk::Low,
            "audit_loss",
            &format!("{prefix}.audit.on_audit_loss"),
            "record",
            "a call whose events are lost keeps running: what it did then is not all in the log",
        ));
    }
    if tool.allow_jit {
        out.push(Finding::new(
            Risk::Low,
            "allow_jit",
            &format!("{prefix}.allow_jit"),
            "true",
            "written memory may become executable (JIT compilers need it; nothing else should)",
        ));
    }
    out
}

fn path_findings(out: &mut Vec<Finding>, key: &str, right: &str, g: &AbsPath) {
    let p = g.as_path();
    let mut reported = false;
    if let Some(s) = secret(p) {
        reported = true;
        out.push(Finding::new(
            Risk::High,
            "secret",
            key,
            g,
            format!("reaches credentials ({s}); a tool should never see them"),
        ));
    } else if let Some(home) = home_of(p).filter(|h| h == p) {
        reported = true;
        out.push(Finding::new(
            Risk::High,
            "home",
            key,
            g,
            format!(
                "the whole home directory {}, with its keys, tokens and history; grant the project directory in it",
                home.display()
            ),
        ));
    }
    if let Some((_, what)) = WHOLESALE.iter().find(|(w, _)| Path::new(w) == p) {
        // Reading /etc or /var whole is common (resolvers, locales, certificates); writing
        // any of these trees, or reading / or /home, is not.
        let common = matches!(p.to_str(), Some("/etc" | "/var" | "/run" | "/tmp" | "/var/tmp"));
        let risk = if right == "read" && common { Risk::Medium } else { Risk::High };
        out.push(Finding::new(risk, "wholesale", key, g, format!("grants {what}; grant the files the tool uses")));
    }
    let below = secrets_below(p);
    if !below.is_empty() && !reported {
        let shown: Vec<&str> = below.iter().take(3).copied().collect();
        let more = below.len().saturating_sub(3);
        out.push(Finding::new(
            Risk::High,
            "holds_secrets",
            key,
            g,
            format!(
                "holds credentials ({}{}); grant narrower paths beside them",
                shown.join(", "),
                if more > 0 { format!(" and {more} more") } else { String::new() }
            ),
        ));
    }
    if right != "read" {
        if let Some(tree) = SYSTEM_TREES.iter().find(|t| p.starts_with(t) || Path::new(t).starts_with(p)) {
            if right == "write" {
                out.push(Finding::new(
                    Risk::High,
                    "system_write",
                    key,
                    g,
                    format!("a write here changes {tree}, which every program of the host uses"),
                ));
            }
        }
    }
}

fn endpoint_findings(out: &mut Vec<Finding>, key: &str, hp: &HostPort) {
    match &hp.addr {
        HostAddr::Any => out.push(Finding::new(
            Risk::High,
            "any_address",
            key,
            hp,
            "any public address on this port: the tool can send what it read anywhere; name the hosts",
        )),
        HostAddr::Name(n) if n.wildcard => out.push(Finding::new(
            Risk::Medium,
            "wildcard_name",
            key,
            hp,
            format!("every name under {}: anyone who can add a name there can receive data; name the hosts", n.base),
        )),
        HostAddr::Name(_) => {}
        HostAddr::Ip(ip) => {
            if let Some(why) = special_range(*ip) {
                out.push(special(key, hp, why));
            }
        }
        HostAddr::Range(net) => {
            if let Some(why) = special_range(net.network()) {
                out.push(special(key, hp, why));
            } else {
                out.push(Finding::new(
                    Risk::Medium,
                    "address_range",
                    key,
                    hp,
                    format!("{} addresses; name the hosts or the addresses", range_size(net)),
                ));
            }
        }
    }
}

fn special(key: &str, hp: &HostPort, why: &str) -> Finding {
    let risk = if why.starts_with("link-local") { Risk::High } else { Risk::Medium };
    let code = if why.starts_with("loopback") { "loopback" } else { "special_range" };
    Finding::new(
        risk,
        code,
        key,
        hp,
        format!("a {why} address: services of this host or its network that are not on the internet"),
    )
}

fn range_size(net: &ipnet::IpNet) -> String {
    let bits = u32::from(net.max_prefix_len() - net.prefix_len());
    if bits >= 64 {
        format!("2^{bits}")
    } else {
        (1u128 << bits).to_string()
    }
}

/// Tools that share write and exec grants (`fs.exec_shared_with`): one can plant a program
/// the other runs with its own grants.
fn shared_exec(m: &Manifest) -> Vec<Finding> {
    let mut out = Vec::new();
    for (name, tool) in &m.tools {
        for other in &tool.fs.exec_shared_with {
            out.push(Finding::new(
                Risk::Medium,
                "shared_exec",
                &format!("tools.{}.fs.exec_shared_with", name.as_str()),
                other.as_str(),
                format!(
                    "{} may execute what {} writes (or the reverse): together they can run any program with the \
                     wider grants of the two",
                    name.as_str(),
                    other.as_str()
                ),
            ));
        }
    }
    out
}

/// Peaks measured over a tool's calls, to judge its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Peaks {
    /// Calls measured.
    pub calls: u64,
    /// Longest call, in milliseconds.
    pub duration_ms: u64,
    /// Most memory of a call's cgroup, in MiB (rounded up).
    pub memory_mb: u64,
    /// Most tasks at once.
    pub pids: u64,
    /// Most bytes on one output stream.
    pub output_bytes: u64,
}

/// Limits far above what the tool was measured to use (more than 16 times the peak, and
/// more than the default would give).
pub fn limit_findings(prefix: &str, tool: &Tool, peaks: &Peaks) -> Vec<Finding> {
    let l = &tool.limits;
    let mut out = Vec::new();
    if peaks.calls == 0 {
        return out;
    }
    for (key, limit, peak, unit) in [
        ("timeout_ms", l.timeout_ms, peaks.duration_ms, "ms"),
        ("memory_mb", l.memory_mb, peaks.memory_mb, "MiB"),
        ("pids", l.pids, peaks.pids, "tasks"),
        ("output_bytes", l.output_bytes, peaks.output_bytes, "bytes"),
    ] {
        let default = crate::model::LIMITS.iter().find(|s| s.key == key).map_or(0, |s| s.default);
        if limit > peak.max(1).saturating_mul(16) && limit > default {
            out.push(Finding::new(
                Risk::Low,
                "limit_above_peak",
                &format!("{prefix}.limits.{key}"),
                limit,
                format!("{limit} {unit}, over 16 times the peak measured in {} calls ({peak} {unit})", peaks.calls),
            ));
        }
    }
    out
}

/// Interpreters whose extensions are shared objects, with the names of their library
/// directories: a grant path with one of these components is such a directory.
const INTERPRETERS: &[(&str, &[&str])] = &[
    ("python", &["python3", "python2", "site-packages", "dist-packages", "lib-dynload"]),
    ("perl", &["perl", "perl5", "perl-base"]),
    ("ruby", &["ruby", "gems"]),
    ("node", &["node_modules"]),
    ("php", &["php"]),
];

/// Where the host keeps each interpreter's extensions (checked for existence).
const LIB_DIRS: &[(&str, &[&str])] = &[
    (
        "python",
        &[
            "/usr/lib/python3",
            "/usr/lib/python3.9",
            "/usr/lib/python3.10",
            "/usr/lib/python3.11",
            "/usr/lib/python3.12",
            "/usr/lib/python3.13",
            "/usr/lib/python3.14",
            "/usr/lib64/python3.9",
            "/usr/lib64/python3.11",
            "/usr/lib64/python3.12",
            "/usr/lib64/python3.13",
            "/usr/local/lib/python3.11",
            "/usr/local/lib/python3.12",
            "/usr/local/lib/python3.13",
        ],
    ),
    (
        "perl",
        &[
            "/usr/lib/x86_64-linux-gnu/perl5",
            "/usr/lib/x86_64-linux-gnu/perl",
            "/usr/lib64/perl5",
            "/usr/lib/aarch64-linux-gnu/perl5",
        ],
    ),
    ("ruby", &["/usr/lib/ruby", "/usr/lib64/ruby", "/usr/lib/x86_64-linux-gnu/ruby"]),
    ("node", &["/usr/lib/node_modules", "/usr/local/lib/node_modules", "/usr/share/nodejs"]),
    ("php", &["/usr/lib/php", "/usr/lib64/php"]),
];

/// The findings that need the host: write grants the agent's uid cannot write, and
/// interpreter library directories that are only readable (their C extensions then fail
/// with "failed to map segment").
pub fn host_findings(m: &Manifest, fs: &dyn HostFs) -> Vec<Finding> {
    let mut out = Vec::new();
    let units = m
        .tools
        .iter()
        .map(|(n, t)| (format!("tools.{}", n.as_str()), t))
        .chain(m.mcp.iter().map(|(n, s)| (format!("mcp.{}", n.as_str()), &s.sandbox)));
    for (prefix, tool) in units {
        for g in &tool.fs.write {
            if let Some(why) = unwritable(g.as_path(), m.agent.uid, m.agent.gid, fs) {
                out.push(Finding::new(Risk::Medium, "not_writable", &format!("{prefix}.fs.write"), g, why));
            }
        }
        out.extend(readonly_libraries(&prefix, tool, fs));
    }
    out.sort();
    out
}

/// Why `uid`/`gid` (no supplementary groups, as in the sandbox) cannot write `path`, if so.
fn unwritable(path: &Path, uid: u32, gid: u32, fs: &dyn HostFs) -> Option<String> {
    let canon = fs.canonicalize(path).ok()?;
    let allows = |(o, g, mode): (u32, u32, u32), bit: u32| {
        if o == uid {
            mode & (bit << 6) != 0
        } else if g == gid {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    };
    let fix = format!(
        "make it the agent's (chown {uid}:{gid}), give its group write (chgrp {gid}; chmod g+w), or set `agent.uid` \
         to its owner"
    );
    for dir in canon.ancestors().skip(1) {
        let meta = fs.owner_mode(dir)?;
        if !allows(meta, 0o1) {
            return Some(format!(
                "uid {uid} cannot reach it: {} (owner {}, mode {:o}) has no search permission for it; {fix}",
                dir.display(),
                meta.0,
                meta.2 & 0o7777
            ));
        }
    }
    let meta = fs.owner_mode(&canon)?;
    let is_dir = meta.2 & 0o170_000 == 0o040_000;
    // A directory is written through (new files) with write and search permission.
    if allows(meta, 0o2) && (!is_dir || allows(meta, 0o1)) {
        return None;
    }
    Some(format!(
        "uid {uid} gid {gid} cannot write {} (owner {}, group {}, mode {:o}): the tool would get EACCES; {fix}",
        canon.display(),
        meta.0,
        meta.1,
        meta.2 & 0o7777
    ))
}

/// Read-only grants that cover an interpreter's extension directories, for a tool that runs
/// that interpreter and has no exec grant there.
fn readonly_libraries(prefix: &str, tool: &Tool, fs: &dyn HostFs) -> Vec<Finding> {
    let mut out = Vec::new();
    // What the tool runs, as far as the manifest says: argv[0] and the exec grants that are
    // programs. (A shell that runs python is not seen; `policy test` then finds it.)
    let programs: Vec<&str> = tool
        .argv
        .first()
        .and_then(|a| a.literal())
        .into_iter()
        .chain(tool.fs.exec.iter().filter(|e| !fs.is_dir(e.as_path())).filter_map(|e| e.as_path().to_str()))
        .collect();
    let runs = |family: &str| {
        programs
            .iter()
            .any(|p| Path::new(p).file_name().and_then(|n| n.to_str()).is_some_and(|b| b.starts_with(family)))
    };
    let exec_covers = |p: &Path| tool.fs.exec.iter().any(|e| p.starts_with(e.as_path()));
    for (family, dirs) in INTERPRETERS {
        if !runs(family) {
            continue;
        }
        for g in &tool.fs.read {
            let gp = g.as_path();
            if exec_covers(gp) {
                continue;
            }
            // The grant is a library directory of the family, or holds one of the host's
            // that no exec grant covers.
            let family_dir =
                |p: &Path| p.components().any(|c| dirs.iter().any(|d| c.as_os_str().to_string_lossy().starts_with(d)));
            let named = family_dir(gp);
            let lib_dirs = LIB_DIRS.iter().find(|(f, _)| f == family).map_or(&[][..], |(_, d)| *d);
            let holds = lib_dirs
                .iter()
                .any(|d| Path::new(d).starts_with(gp) && fs.is_dir(Path::new(d)) && !exec_covers(Path::new(d)));
            // An exec grant inside it says the author has chosen which parts run.
            let chosen = tool.fs.exec.iter().any(|e| e.as_path().starts_with(gp) && family_dir(e.as_path()));
            if (named || holds) && !chosen {
                out.push(Finding::new(
                    Risk::Low,
                    "noexec_library",
                    &format!("{prefix}.fs.read"),
                    g,
                    format!(
                        "{family} loads C extensions from here, and `read` grants cannot be mapped executable (\"failed \
                         to map segment\"); add the extension directories (e.g. lib-dynload, site-packages) to `{prefix}.fs.exec`"
                    ),
                ));
                break;
            }
        }
    }
    out
}

/// The findings of `new` that `old` does not have: what a change adds (same key and subject).
pub fn added(old: &[Finding], new: &[Finding]) -> Vec<Finding> {
    new.iter()
        .filter(|f| !old.iter().any(|o| o.key == f.key && o.subject == f.subject && o.code == f.code))
        .cloned()
        .collect()
}

/// Findings grouped by their unit (`tools.NAME` or `mcp.NAME`), for reports.
pub fn by_unit(findings: &[Finding]) -> BTreeMap<String, Vec<&Finding>> {
    let mut out: BTreeMap<String, Vec<&Finding>> = BTreeMap::new();
    for f in findings {
        let unit = f.key.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
        out.entry(unit).or_default().push(f);
    }
    out
}
