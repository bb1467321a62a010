//! `agentd policy draft` and `agentd policy suggest`: grants from audit records. The records
//! are read here; what becomes a grant is decided in `agentd_policy::draft` and
//! `agentd_policy::lint`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use agentd_audit::{Kind, Record, Verdict};
use agentd_policy::draft::Observed;
use agentd_policy::lint::Finding;
use agentd_policy::{HostFs, Manifest, Name};
use agentd_sandbox::host::RealFs;

use crate::manifest::load_manifest;

/// Options of `agentd policy draft`.
#[derive(Debug, clap::Args)]
pub(crate) struct DraftArgs {
    /// The audit log of the tool's calls (run them with `agentd exec --learn` first).
    #[arg(long, value_name = "PATH")]
    audit_log: PathBuf,
    /// The tool whose calls are drafted from.
    #[arg(long)]
    tool: String,
    /// Only these calls (repeatable); default: every call of the tool in the log.
    #[arg(long = "call", value_name = "ID")]
    calls: Vec<String>,
    /// A manifest whose entry for the tool gives the argv and description to keep.
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
}

/// Options of `agentd policy suggest`.
#[derive(Debug, clap::Args)]
pub(crate) struct SuggestArgs {
    /// The audit log of the calls that were refused.
    #[arg(long, value_name = "PATH")]
    audit_log: PathBuf,
    /// The manifest the calls ran under.
    #[arg(long, value_name = "FILE")]
    manifest: PathBuf,
    /// Only this tool.
    #[arg(long)]
    tool: Option<String>,
    /// Only these calls (repeatable).
    #[arg(long = "call", value_name = "ID")]
    calls: Vec<String>,
    /// Print the suggestions as JSON.
    #[arg(long)]
    json: bool,
}

/// The records of the log, by call, in order; only those `keep` accepts.
pub(super) fn calls_in(log: &Path, keep: impl Fn(&Record) -> bool) -> Result<BTreeMap<String, Vec<Record>>, String> {
    let text = std::fs::read(log).map_err(|e| format!("cannot read {}: {e}", log.display()))?;
    let mut out: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        if let Ok(r) = serde_json::from_slice::<Record>(line) {
            if !r.call_id.is_empty() && keep(&r) {
                out.entry(r.call_id.clone()).or_default().push(r);
            }
        }
    }
    Ok(out)
}

/// A path as the kernel reported it (never the text the tool passed: a draft must not look
/// up on the host, as root, what a tool chose), if a grant could name it: absolute, and not
/// in what every sandbox has of its own (/proc, /dev, /sys, its private /tmp).
fn grantable(d: &serde_json::Value) -> Option<PathBuf> {
    if d["path_source"] != "kernel" {
        return None;
    }
    let p = PathBuf::from(d["path"].as_str()?);
    let own = ["/proc", "/dev", "/sys", "/tmp", "/var/tmp"].iter().any(|o| p.starts_with(o));
    (p.is_absolute() && p != Path::new("/") && !own).then_some(p)
}

/// [`grantable`], also taking paths under `/tmp` that the manifest's own grants name (the
/// host's shared /tmp is never proposed otherwise).
fn grantable_in(d: &serde_json::Value, base: Option<&agentd_policy::Tool>) -> Option<PathBuf> {
    grantable(d).or_else(|| {
        let base = base?;
        if d["path_source"] != "kernel" {
            return None;
        }
        let p = PathBuf::from(d["path"].as_str()?);
        let granted = base.fs.read.iter().chain(&base.fs.write).chain(&base.fs.exec);
        granted.into_iter().any(|g| p.starts_with(g.as_path()) && g.as_path() != Path::new("/tmp")).then_some(p)
    })
}

fn succeeded(d: &serde_json::Value) -> bool {
    d["result"].as_i64().is_none_or(|r| r >= 0)
}

pub(crate) fn draft(a: &DraftArgs) -> i32 {
    let wanted: BTreeSet<&str> = a.calls.iter().map(String::as_str).collect();
    let calls = match calls_in(&a.audit_log, |r| {
        r.tool == a.tool && (wanted.is_empty() || wanted.contains(r.call_id.as_str()))
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: {e}");
            return 1;
        }
    };
    if calls.is_empty() {
        eprintln!("agentd: no calls of tool {:?} in {}", a.tool, a.audit_log.display());
        return 1;
    }
    let base = match &a.manifest {
        Some(f) => match load_manifest(f) {
            Ok(m) => Some(m),
            Err(lines) => {
                for l in lines {
                    eprintln!("{l}");
                }
                return 1;
            }
        },
        None => None,
    };
    let tool = base.as_ref().and_then(|m| Name::parse(&a.tool).ok().and_then(|n| m.tools.get(&n).cloned()));
    let obs = observe(&calls, tool.as_ref());
    let name = Name::parse(&a.tool).map(|n| n.to_string()).unwrap_or_else(|_| "tool".into());
    let (text, findings) = agentd_policy::draft::draft(&name, &obs, tool.as_ref(), &a.audit_log.display().to_string());
    out!("{text}");
    let high = findings.iter().filter(|f| f.risk == agentd_policy::lint::Risk::High).count();
    eprintln!(
        "agentd: drafted from {} call(s): {} reads, {} writes, {} programs, {} endpoints; {} findings ({high} high)",
        obs.calls,
        obs.reads.values().sum::<u64>(),
        obs.writes.values().sum::<u64>(),
        obs.programs.len(),
        obs.connects.len(),
        findings.len()
    );
    0
}

/// What the calls did, minus what the sandbox brings by itself (each program's loader and
/// libraries, the loader's cache).
fn observe(calls: &BTreeMap<String, Vec<Record>>, base: Option<&agentd_policy::Tool>) -> Observed {
    let grantable = |d: &serde_json::Value| grantable_in(d, base);
    let mut obs = Observed { calls: calls.len() as u64, ..Observed::default() };
    // Home directories of the host's accounts, wherever they are, are never granted whole.
    obs.homes = super::learn::passwd_home_dirs(&std::fs::read_to_string("/etc/passwd").unwrap_or_default());
    for records in calls.values() {
        for r in records {
            let d = &r.details;
            match r.kind {
                Kind::CallStart if obs.argv.is_empty() => {
                    obs.argv = d["argv"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect();
                }
                Kind::Summary => {
                    let p = &mut obs.peaks;
                    p.calls += 1;
                    p.duration_ms = p.duration_ms.max(d["duration_ms"].as_u64().unwrap_or(0));
                    let out = d["stdout_bytes"].as_u64().unwrap_or(0).max(d["stderr_bytes"].as_u64().unwrap_or(0));
                    p.output_bytes = p.output_bytes.max(out);
                    let mem = d["memory_peak_bytes"].as_u64().map_or(0, |b| b.div_ceil(1 << 20));
                    p.memory_mb = p.memory_mb.max(mem);
                    // The peak counts agentd's init of the call's pid namespace.
                    p.pids = p.pids.max(d["pids_peak"].as_u64().map_or(0, |n| n.saturating_sub(1)));
                }
                _ if r.verdict == Verdict::Denied || !succeeded(d) => {}
                Kind::Open => {
                    let Some(p) = grantable(d) else { continue };
                    let flags = d["flags"].as_u64().unwrap_or(0);
                    let writes = agentd_audit::opens_for_writing(flags);
                    let set = if writes {
                        &mut obs.writes
                    } else if p.is_dir() {
                        &mut obs.listed
                    } else {
                        &mut obs.reads
                    };
                    *set.entry(p).or_default() += 1;
                }
                Kind::Change => {
                    for key in ["path", "new_path"] {
                        let mut v = d.clone();
                        v["path"] = d[key].clone();
                        v["path_source"] = d[format!("{key}_source")].clone();
                        if let Some(p) = grantable(&v) {
                            *obs.writes.entry(p).or_default() += 1;
                        }
                    }
                }
                Kind::Exec if d["memory"] == "file" => {
                    if let Some(p) = grantable(d) {
                        *obs.mapped.entry(p).or_default() += 1;
                    }
                }
                Kind::Exec if d["memory"].is_null() && d["mapping"].is_null() => {
                    // The name the tool used, where it leads to what ran (/usr/bin/python3
                    // for /usr/bin/python3.11): the grant keeps the link the argv names.
                    let Some(p) = grantable(d) else { continue };
                    // Only where that name leads exactly to what the kernel ran (a link such
                    // as python3 -> python3.11), and never from a place others can write
                    // (/tmp): the tool chose that text.
                    let named = d["claimed_path"]
                        .as_str()
                        .map(PathBuf::from)
                        .filter(|c| c.is_absolute() && !c.starts_with("/tmp") && !c.starts_with("/var/tmp"))
                        .filter(|c| std::fs::canonicalize(c).is_ok_and(|r| r == p));
                    *obs.programs.entry(named.unwrap_or(p)).or_default() += 1;
                }
                // agentd's own records of what it forwarded (`via`), by name where the tool
                // used one; the BPF layer's records of the same connects go to the call's
                // loopback (agentd's listeners and proxy), which no grant names.
                Kind::Connect if d["direction"] != "inbound" && d["via"].is_string() => {
                    let port = d["to"].as_str().and_then(|t| t.rsplit_once(':')).map(|(_, p)| p.to_string());
                    let endpoint = match (d["name"].as_str(), &port) {
                        (Some(n), Some(p)) => Some(format!("{n}:{p}")),
                        _ => d["to"].as_str().or(d["address"].as_str()).map(String::from),
                    };
                    if let Some(e) = endpoint {
                        *obs.connects.entry(e).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
    }
    // Shared objects opened are mapped executable by the loader: they need exec, not read.
    let is_shared_object =
        |p: &Path| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".so") || n.contains(".so."));
    let opened: Vec<PathBuf> = obs.reads.keys().filter(|p| is_shared_object(p)).cloned().collect();
    for p in opened {
        if let Some(n) = obs.reads.remove(&p) {
            *obs.mapped.entry(p).or_default() += n;
        }
    }
    // What the sandbox brings with each program.
    let fs = RealFs::default();
    let mut brought: BTreeSet<PathBuf> = BTreeSet::new();
    for program in obs.programs.keys() {
        let program = std::fs::canonicalize(program).unwrap_or_else(|_| program.clone());
        if let Some(deps) = fs.elf_deps(&program) {
            brought.insert(deps.interpreter.clone());
            brought.extend(deps.libraries.iter().map(|(_, p)| p.clone()));
            brought.insert(PathBuf::from("/etc/ld.so.cache"));
        }
    }
    let brought: BTreeSet<PathBuf> =
        brought.iter().flat_map(|p| [p.clone(), std::fs::canonicalize(p).unwrap_or_else(|_| p.clone())]).collect();
    obs.reads.retain(|p, _| !brought.contains(p));
    obs.mapped.retain(|p, _| !brought.contains(p));
    obs
}

/// One addition that would have let a refused action through.
#[derive(Debug, serde::Serialize)]
struct Suggestion {
    tool: String,
    /// `fs.read`, `fs.write`, `fs.exec` or `net.connect`.
    key: String,
    value: String,
    /// How many refused or not-found events it answers, and one of them.
    events: u64,
    example: String,
    /// The findings of the grant alone (empty: nothing over-broad).
    findings: Vec<Finding>,
}

pub(crate) fn suggest(a: &SuggestArgs) -> i32 {
    let manifest = match load_manifest(&a.manifest) {
        Ok(m) => m,
        Err(lines) => {
            for l in lines {
                eprintln!("{l}");
            }
            return 1;
        }
    };
    let wanted: BTreeSet<&str> = a.calls.iter().map(String::as_str).collect();
    let calls = match calls_in(&a.audit_log, |r| {
        a.tool.as_ref().is_none_or(|t| *t == r.tool) && (wanted.is_empty() || wanted.contains(r.call_id.as_str()))
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: {e}");
            return 1;
        }
    };
    let mut found: BTreeMap<(String, String, String), (u64, String)> = BTreeMap::new();
    for records in calls.values() {
        for r in records {
            if let Some((key, value, example)) = wanted_grant(&manifest, r) {
                let e = found.entry((r.tool.clone(), key, value)).or_insert((0, example));
                e.0 += 1;
            }
        }
    }
    let suggestions: Vec<Suggestion> = found
        .into_iter()
        .map(|((tool, key, value), (events, example))| {
            let findings = findings_of(&manifest, &tool, &key, &value);
            Suggestion { tool, key, value, events, example, findings }
        })
        .collect();
    if a.json {
        outln!("{}", serde_json::to_string_pretty(&suggestions).unwrap_or_default());
        return 0;
    }
    if suggestions.is_empty() {
        outln!("nothing was refused that a grant would allow ({} calls looked at)", calls.len());
        return 0;
    }
    for s in &suggestions {
        outln!("tools.{}.{} += {:?}", s.tool, s.key, s.value);
        outln!("    answers {} event(s), e.g. {}", s.events, s.example);
        if s.findings.is_empty() {
            outln!("    risk: nothing over-broad");
        }
        for f in &s.findings {
            outln!("    risk: {f}");
        }
    }
    0
}

/// The smallest grant that would have let `r` through: a refused or not-found action on
/// something that exists on this host and that the tool's grants do not show.
fn wanted_grant(m: &Manifest, r: &Record) -> Option<(String, String, String)> {
    let tool = Name::parse(&r.tool).ok().and_then(|n| m.tools.get(&n))?;
    let d = &r.details;
    let not_found = d["errno"] == "ENOENT";
    if r.verdict != Verdict::Denied && !not_found {
        return None;
    }
    let shown = |p: &Path| {
        tool.fs.read.iter().chain(&tool.fs.write).chain(&tool.fs.exec).any(|g| {
            let g = std::fs::canonicalize(g.as_path()).unwrap_or_else(|_| g.as_path().to_path_buf());
            p.starts_with(g)
        })
    };
    match r.kind {
        Kind::Open | Kind::Exec | Kind::Change => {
            let p = asked_for(d)?;
            // Python caching bytecode beside a read-only module is no need of the tool's
            // (PYTHONDONTWRITEBYTECODE=1 in env.set quiets it).
            if p.components().any(|c| c.as_os_str() == "__pycache__") {
                return None;
            }
            if !p.exists() || (not_found && shown(&std::fs::canonicalize(&p).unwrap_or_else(|_| p.clone()))) {
                return None;
            }
            let flags = d["flags"].as_u64().unwrap_or(0);
            let key = match r.kind {
                Kind::Exec => "fs.exec",
                Kind::Change => "fs.write",
                _ if agentd_audit::opens_for_writing(flags) => "fs.write",
                _ => "fs.read",
            };
            let how = if not_found {
                "not found in the sandbox".to_string()
            } else {
                format!("{} by {}", d["errno"].as_str().unwrap_or("denied"), d["by"].as_str().unwrap_or("?"))
            };
            Some((
                key.into(),
                p.display().to_string(),
                format!("{} {} ({how})", super::audit::kind_name(r.kind), p.display()),
            ))
        }
        Kind::Connect if r.verdict == Verdict::Denied => {
            let to = d["to"].as_str().or(d["address"].as_str())?.to_string();
            let value = match (d["name"].as_str(), to.rsplit_once(':')) {
                (Some(n), Some((_, port))) => format!("{n}:{port}"),
                _ => to.clone(),
            };
            Some(("net.connect".into(), value, format!("connect {to} (refused)")))
        }
        _ => None,
    }
}

/// The path a refused or not-found action named: the kernel's where it resolved one, else
/// the tool's own text (a file it did not find has no kernel path), if that is a plain
/// absolute path outside what could hang or mislead a lookup on the host (automounts, kernel
/// trees).
fn asked_for(d: &serde_json::Value) -> Option<PathBuf> {
    if let Some(p) = grantable(d) {
        return Some(p);
    }
    let text = d["path"].as_str().filter(|_| d["path_source"] == "user")?;
    let clean = text.starts_with('/') && text[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    let p = PathBuf::from(text);
    let avoid = ["/proc", "/sys", "/dev", "/run", "/mnt", "/media", "/net", "/afs"];
    (clean && !avoid.iter().any(|a| p.starts_with(a))).then_some(p)
}

/// The over-broad findings of one grant on its own.
fn findings_of(m: &Manifest, tool: &str, key: &str, value: &str) -> Vec<Finding> {
    let Some(mut t) = Name::parse(tool).ok().and_then(|n| m.tools.get(&n)).cloned() else { return Vec::new() };
    t.fs = Default::default();
    t.net = Default::default();
    t.env = Default::default();
    let path = agentd_policy::AbsPath::parse(value);
    match (key, path) {
        ("fs.read", Ok(p)) => t.fs.read.push(p),
        ("fs.write", Ok(p)) => t.fs.write.push(p),
        ("fs.exec", Ok(p)) => t.fs.exec.push(p),
        ("net.connect", _) => {
            if let Ok(hp) = agentd_policy::HostPort::parse(value) {
                t.net.connect.push(hp);
            }
        }
        _ => {}
    }
    let mut f = agentd_policy::lint::unit(&format!("tools.{tool}"), &t);
    f.retain(|f| f.subject == value);
    if agentd_policy::lint::secret(Path::new(value)).is_some() {
        f.retain(|f| f.code == "secret");
    }
    f
}
