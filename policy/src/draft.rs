//! A manifest section drafted from what a tool's calls did (`agentd policy draft`): reads,
//! writes and execs grouped into the fewest grants the grouping rule allows, endpoints, and
//! limits with headroom over the peaks measured. Every grant says what it rests on.
//!
//! **The grouping rule.** Files become their directory only where the directory held two or
//! more of the files seen, lies three or more levels deep in the host's shared trees
//! (`/usr/lib/python3.11`, never `/usr/lib` or `/etc/ssl`) or two elsewhere (`/srv/app`),
//! is not one of the trees in [`NEVER`], is a project in a home rather than the home or a dot
//! directory, and neither is nor holds a secret ([`crate::lint::SECRETS`]). Programs stay files. A
//! write becomes the directory it was made in, under the same rule; otherwise the file.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::lint::{self, Finding, Peaks};
use crate::model::Tool;

/// Directories a draft never grants whole, whatever was seen in them.
pub const NEVER: &[&str] = &[
    "/",
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/home",
    "/lib",
    "/lib32",
    "/lib64",
    "/media",
    "/mnt",
    "/opt",
    "/proc",
    "/root",
    "/run",
    "/sbin",
    "/srv",
    "/sys",
    "/tmp",
    "/usr",
    "/usr/bin",
    "/usr/include",
    "/usr/lib",
    "/usr/lib32",
    "/usr/lib64",
    "/usr/libexec",
    "/usr/local",
    "/usr/local/bin",
    "/usr/local/lib",
    "/usr/local/share",
    "/usr/sbin",
    "/usr/share",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/var",
    "/var/cache",
    "/var/lib",
    "/var/log",
    "/var/tmp",
    "/var/spool",
    "/var/mail",
];

/// Top-level directories of the host's shared trees, where a grant needs three levels.
const SHARED_TOPS: &[&str] =
    &["bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "proc", "run", "sbin", "sys", "tmp", "usr", "var"];

/// What a tool's calls were seen to do.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Calls looked at.
    pub calls: u64,
    /// The first call's argv.
    pub argv: Vec<String>,
    /// Files opened for reading, with how often.
    pub reads: BTreeMap<PathBuf, u64>,
    /// Directories opened (to list them, or on the way to a file).
    pub listed: BTreeMap<PathBuf, u64>,
    /// Files opened for writing or changed (created, removed, renamed).
    pub writes: BTreeMap<PathBuf, u64>,
    /// Programs executed.
    pub programs: BTreeMap<PathBuf, u64>,
    /// Shared objects mapped executable (a C extension of an interpreter).
    pub mapped: BTreeMap<PathBuf, u64>,
    /// Endpoints connected to (`name:port` where a name was used, else `address:port`).
    pub connects: BTreeMap<String, u64>,
    /// Peaks over the calls.
    pub peaks: Peaks,
    /// The host's home directories (from its accounts): never granted whole, nor what holds
    /// one, wherever they are (`/var/lib/postgresql`, `/srv/home/bob`).
    pub homes: Vec<PathBuf>,
}

/// One grant of a draft with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drafted {
    /// The path or endpoint granted.
    pub grant: String,
    /// Events it covers.
    pub events: u64,
    /// One of them.
    pub example: String,
}

/// Whether `dir` may be granted whole in place of files seen in it.
pub fn groupable(dir: &Path) -> bool {
    groupable_among(dir, &[])
}

/// [`groupable`], with the host's home directories `homes` also off limits.
pub fn groupable_among(dir: &Path, homes: &[PathBuf]) -> bool {
    if homes.iter().any(|h| h.starts_with(dir)) {
        return false;
    }
    let holds_secret = lint::secret(dir).is_some()
        || lint::SECRETS.iter().any(|s| !s.starts_with('~') && Path::new(s).starts_with(dir));
    if holds_secret || NEVER.iter().any(|n| Path::new(n) == dir) {
        return false;
    }
    match lint::home_of(dir) {
        // In a home, a project directory (never the home, never a dot directory).
        Some(_) => deep_in_home(dir),
        // Three levels or more in the host's shared trees (`/usr/lib/python3.11`, never
        // `/etc/ssl`), two elsewhere (`/srv/app`, `/opt/tool`); the root is a component too.
        None => {
            let top = dir.components().nth(1).map(|c| c.as_os_str().to_string_lossy().into_owned()).unwrap_or_default();
            let min = if SHARED_TOPS.contains(&top.as_str()) { 3 } else { 2 };
            dir.components().count() > min
        }
    }
}

/// A directory inside a home (a project), never the home or a dot directory of it.
fn deep_in_home(dir: &Path) -> bool {
    let Some(home) = lint::home_of(dir) else { return false };
    let rest = dir.strip_prefix(&home).unwrap_or(dir);
    rest.components().count() >= 1
        && !rest.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
        && lint::secret(dir).is_none()
}

/// Groups files into the fewest grants the rule allows: deepest directories first, each
/// taking the place of two or more entries below it.
pub fn group(files: &BTreeMap<PathBuf, u64>) -> Vec<Drafted> {
    group_among(files, &[])
}

/// [`group`], with the host's home directories `homes` never granted whole.
pub fn group_among(files: &BTreeMap<PathBuf, u64>, homes: &[PathBuf]) -> Vec<Drafted> {
    // grant → (events, example)
    let mut grants: BTreeMap<PathBuf, (u64, PathBuf)> =
        files.iter().map(|(p, n)| (p.clone(), (*n, p.clone()))).collect();
    loop {
        // Candidate directories with how many current grants lie strictly below them.
        let mut below: BTreeMap<PathBuf, usize> = BTreeMap::new();
        for g in grants.keys() {
            for dir in g.ancestors().skip(1) {
                *below.entry(dir.to_path_buf()).or_default() += 1;
            }
        }
        let pick = below
            .iter()
            .filter(|(d, n)| **n >= 2 && groupable_among(d, homes))
            .max_by_key(|(d, _)| d.components().count())
            .map(|(d, _)| d.clone());
        let Some(dir) = pick else { break };
        let merged: Vec<PathBuf> = grants.keys().filter(|g| g.starts_with(&dir) && **g != dir).cloned().collect();
        let mut events = 0;
        let mut example = None;
        for g in merged {
            if let Some((n, ex)) = grants.remove(&g) {
                events += n;
                example.get_or_insert(ex);
            }
        }
        let entry = grants.entry(dir.clone()).or_insert((0, dir.clone()));
        entry.0 += events;
        if let Some(ex) = example {
            entry.1 = ex;
        }
    }
    grants
        .into_iter()
        .map(|(g, (events, example))| Drafted {
            grant: g.display().to_string(),
            events,
            example: example.display().to_string(),
        })
        .collect()
}

/// Writes become the directory they were made in where the rule allows, else the file.
fn group_writes(files: &BTreeMap<PathBuf, u64>, homes: &[PathBuf]) -> Vec<Drafted> {
    let mut dirs: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut examples: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    for (p, n) in files {
        let at = p.parent().filter(|d| groupable_among(d, homes)).map_or_else(|| p.clone(), Path::to_path_buf);
        *dirs.entry(at.clone()).or_default() += n;
        examples.entry(at).or_insert_with(|| p.clone());
    }
    // A directory below another one kept is covered by it.
    let kept: Vec<PathBuf> = dirs.keys().cloned().collect();
    dirs.into_iter()
        .filter(|(d, _)| !kept.iter().any(|k| k != d && d.starts_with(k)))
        .map(|(d, events)| Drafted {
            example: examples.get(&d).map(|e| e.display().to_string()).unwrap_or_default(),
            grant: d.display().to_string(),
            events,
        })
        .collect()
}

/// A TOML string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(out: &mut String, key: &str, items: &[Drafted], what: &str) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(out, "{key} = [");
    for d in items {
        let note = if d.example == d.grant {
            format!("{} {what}", d.events)
        } else {
            format!("{} {what}, e.g. {}", d.events, d.example)
        };
        let _ = writeln!(out, "  {},  # {note}", quote(&d.grant));
    }
    let _ = writeln!(out, "]");
}

/// Limits with headroom: four times the peak, rounded up, never below a floor.
fn headroom(peak: u64, floor: u64, round: u64) -> u64 {
    let v = peak.saturating_mul(4).max(floor);
    v.div_ceil(round).saturating_mul(round)
}

/// The drafted section `[tools.NAME]` and the findings of what it grants. `base`, the tool
/// as a manifest has it, gives the argv, arguments and description to keep.
pub fn draft(name: &str, obs: &Observed, base: Option<&Tool>, source: &str) -> (String, Vec<Finding>) {
    let mut out = String::new();
    let _ = writeln!(out, "# Drafted by `agentd policy draft` from {} call(s) of {name} in {source}.", obs.calls);
    let _ = writeln!(out, "# A draft is what the tool did, not what it should do: review every grant.");
    if base.is_some_and(|t| !t.args.is_empty()) {
        let _ = writeln!(out, "# Keep the tool's [tools.{name}.args] tables: a draft does not repeat them.");
    }
    let _ = writeln!(out, "[tools.{name}]");
    match base {
        Some(t) => {
            if !t.description.is_empty() {
                let _ = writeln!(out, "description = {}", quote(&t.description));
            }
            let argv: Vec<String> = t.argv.iter().map(|a| quote(&a.to_string())).collect();
            let _ = writeln!(out, "argv = [{}]", argv.join(", "));
            if t.ok_exit != [0] {
                let codes: Vec<String> = t.ok_exit.iter().map(ToString::to_string).collect();
                let _ = writeln!(out, "ok_exit = [{}]", codes.join(", "));
            }
        }
        None => {
            let argv: Vec<String> = obs.argv.iter().map(|a| quote(a)).collect();
            let _ = writeln!(
                out,
                "argv = [{}]  # the first call's; put {{placeholders}} where callers choose",
                argv.join(", ")
            );
        }
    }
    let writes = group_writes(&obs.writes, &obs.homes);
    let written: Vec<PathBuf> = writes.iter().map(|d| PathBuf::from(&d.grant)).collect();
    let under_write = |p: &Path| written.iter().any(|w| p.starts_with(w));
    let reads: BTreeMap<PathBuf, u64> =
        obs.reads.iter().filter(|(p, _)| !under_write(p)).map(|(p, n)| (p.clone(), *n)).collect();
    let mut execs: BTreeMap<PathBuf, u64> = obs.programs.clone();
    let mapped = group_among(&obs.mapped, &obs.homes);
    let mapped_dirs: Vec<PathBuf> = mapped.iter().map(|d| PathBuf::from(&d.grant)).collect();
    // A read of a program or of a mapped library is covered by its exec grant.
    let reads: BTreeMap<PathBuf, u64> = reads
        .into_iter()
        .filter(|(p, _)| !execs.contains_key(p) && !mapped_dirs.iter().any(|m| p.starts_with(m)))
        .collect();
    // A directory opened on the way to what was read is covered; one listed for itself is
    // a grant if the rule allows it, else it is said and left out.
    let seen: Vec<PathBuf> =
        reads.keys().chain(obs.writes.keys()).chain(obs.programs.keys()).chain(obs.mapped.keys()).cloned().collect();
    let mut reads = reads;
    let mut unlisted = Vec::new();
    for (dir, n) in &obs.listed {
        if seen.iter().any(|p| p.starts_with(dir) && p.as_path() != dir.as_path()) || under_write(dir) {
            continue;
        }
        if groupable_among(dir, &obs.homes) {
            *reads.entry(dir.clone()).or_default() += n;
        } else {
            unlisted.push(dir.display().to_string());
        }
    }
    let reads = group_among(&reads, &obs.homes);
    let _ = writeln!(out, "\n[tools.{name}.fs]");
    list(&mut out, "read", &reads, "reads");
    if !unlisted.is_empty() {
        let _ = writeln!(out, "# listed but not granted (shared trees the rule keeps whole): {}", unlisted.join(", "));
    }
    list(&mut out, "write", &writes, "writes");
    let mut exec: Vec<Drafted> = std::mem::take(&mut execs)
        .into_iter()
        .map(|(p, n)| Drafted { grant: p.display().to_string(), events: n, example: p.display().to_string() })
        .collect();
    for m in mapped {
        exec.push(Drafted { events: m.events, example: m.example, grant: m.grant });
    }
    exec.sort_by(|a, b| a.grant.cmp(&b.grant));
    // A program stays a grant of its own even inside a directory granted for libraries: an
    // exec grant of a file is what brings the program's own libraries into the sandbox.
    list(&mut out, "exec", &exec, "execs or executable mappings");
    let overlap: Vec<&Drafted> = exec.iter().filter(|e| under_write(Path::new(&e.grant))).collect();
    for e in overlap {
        let _ = writeln!(
            out,
            "# note: {} is executed where the tool writes; agentd refuses that (a tool could plant a program). \
             Move the program out of the write grant.",
            e.grant
        );
    }
    if !obs.connects.is_empty() {
        let _ = writeln!(out, "\n[tools.{name}.net]");
        let eps: Vec<Drafted> =
            obs.connects.iter().map(|(e, n)| Drafted { grant: e.clone(), events: *n, example: e.clone() }).collect();
        list(&mut out, "connect", &eps, "connects");
    }
    let p = &obs.peaks;
    let _ = writeln!(out, "\n[tools.{name}.limits]");
    let _ = writeln!(out, "timeout_ms = {}  # longest call {} ms", headroom(p.duration_ms, 1000, 1000), p.duration_ms);
    if p.memory_mb > 0 {
        let _ = writeln!(out, "memory_mb = {}  # peak {} MiB", headroom(p.memory_mb, 16, 16), p.memory_mb);
    } else {
        let _ = writeln!(out, "# memory_mb: not measured on this host (no memory.peak); the default is 512");
    }
    if p.pids > 0 {
        let _ = writeln!(out, "pids = {}  # peak {} tasks", headroom(p.pids, 8, 1), p.pids);
    }
    let _ = writeln!(
        out,
        "output_bytes = {}  # most output {} bytes",
        headroom(p.output_bytes, 65_536, 1024),
        p.output_bytes
    );
    // The findings of the draft as a manifest would hold it.
    let mut findings = Vec::new();
    let wrapped = format!("version = 1\n[agent]\nname = \"draft\"\n{out}");
    if let Ok(m) = crate::parse("draft.toml", &wrapped) {
        findings = lint::lint(&m);
        if let Some(t) = m.tools.values().next() {
            findings.extend(lint::limit_findings(&format!("tools.{name}"), t, p));
        }
    }
    for f in &findings {
        let _ = writeln!(out, "# finding: {f}");
    }
    (out, findings)
}
