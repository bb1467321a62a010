//! What a manifest change grants or removes, tool by tool, in words a reviewer reads: new
//! paths and rights, new endpoints, looser limits, and the over-broad findings of what is new.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::lint::{self, Finding};
use crate::model::{Limits, Manifest, Tool, LIMITS};

/// Whether a change gives a tool more or less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// More access or looser bounds.
    Wider,
    /// Less.
    Narrower,
    /// Neither (a description, or a grant already covered by another).
    Neutral,
}

/// One change of one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The key under the unit, e.g. `fs.read` or `limits.memory_mb`.
    pub key: String,
    /// What changed, in words (`+ /data`, `512 -> 1024`).
    pub what: String,
    /// Whether it widens.
    pub direction: Direction,
    /// More to say (the grant that already covers a new path).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The changes of one tool or MCP server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnitDiff {
    /// `tools.NAME`, `mcp.NAME`, `agent` or `requires`.
    pub unit: String,
    /// `added`, `removed` or `changed`.
    pub status: &'static str,
    /// Key by key (for an added unit, what it is granted).
    pub changes: Vec<Change>,
    /// Over-broad findings that the new manifest has and the old one did not.
    pub new_findings: Vec<Finding>,
}

/// A whole diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Units that changed, in name order.
    pub units: Vec<UnitDiff>,
    /// Whether anything widens.
    pub wider: bool,
}

/// The difference from `old` to `new`; only `only` (a unit like `tools.NAME`, or a bare tool
/// name) when given.
pub fn diff(old: &Manifest, new: &Manifest, only: Option<&str>) -> Diff {
    let units = |m: &Manifest| -> BTreeMap<String, Tool> {
        m.tools
            .iter()
            .map(|(n, t)| (format!("tools.{}", n.as_str()), t.clone()))
            .chain(m.mcp.iter().map(|(n, s)| (format!("mcp.{}", n.as_str()), server_as_tool(s))))
            .collect()
    };
    let (a, b) = (units(old), units(new));
    let old_findings = lint::lint(old);
    let new_findings = lint::added(&old_findings, &lint::lint(new));
    let wanted = |unit: &str| match only {
        None => true,
        Some(o) => unit == o || unit.split_once('.').is_some_and(|(_, n)| n == o),
    };
    let mut out = Vec::new();
    if only.is_none() {
        out.extend(agent_and_requires(old, new));
    }
    let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for unit in names.into_iter().filter(|u| wanted(u)) {
        let findings: Vec<Finding> =
            new_findings.iter().filter(|f| f.key.starts_with(&format!("{unit}."))).cloned().collect();
        let (status, changes) = match (a.get(unit), b.get(unit)) {
            (None, Some(t)) => ("added", unit_changes(&Tool::empty(), t)),
            (Some(_), None) => ("removed", Vec::new()),
            (Some(x), Some(y)) => ("changed", unit_changes(x, y)),
            (None, None) => continue,
        };
        if status == "changed" && changes.is_empty() && findings.is_empty() {
            continue;
        }
        out.push(UnitDiff { unit: unit.clone(), status, changes, new_findings: findings });
    }
    let wider = out.iter().any(|u| {
        u.status == "added" || !u.new_findings.is_empty() || u.changes.iter().any(|c| c.direction == Direction::Wider)
    });
    Diff { units: out, wider }
}

/// An MCP server's sandbox, with its offered tools shown as argument-free entries of `args`
/// would not be: they are compared as a list of their own (see [`unit_changes`]).
fn server_as_tool(s: &crate::model::McpServer) -> Tool {
    let mut t = s.sandbox.clone();
    t.description = format!("offers: {}", s.tools.join(", "));
    t
}

impl Tool {
    /// A tool with nothing granted: what an added tool is compared against.
    fn empty() -> Tool {
        Tool {
            description: String::new(),
            argv: Vec::new(),
            args: Vec::new(),
            fs: Default::default(),
            net: Default::default(),
            limits: Limits::default(),
            env: Default::default(),
            audit: Default::default(),
            allow_jit: false,
            ok_exit: vec![0],
        }
    }
}

fn agent_and_requires(old: &Manifest, new: &Manifest) -> Vec<UnitDiff> {
    let mut out = Vec::new();
    let mut agent = Vec::new();
    let (a, b) = (&old.agent, &new.agent);
    if a.name != b.name {
        agent.push(change("name", format!("{} -> {}", a.name, b.name), Direction::Neutral, ""));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        let note = "another identity: files the old one owns are not the new one's";
        agent.push(change("uid/gid", format!("{}:{} -> {}:{}", a.uid, a.gid, b.uid, b.gid), Direction::Wider, note));
    }
    if a.answer != b.answer {
        let dir = if b.answer == crate::model::AnswerMode::Free { Direction::Wider } else { Direction::Narrower };
        agent.push(change("answer", format!("{:?} -> {:?}", a.answer, b.answer).to_lowercase(), dir, ""));
    }
    if !agent.is_empty() {
        out.push(UnitDiff { unit: "agent".into(), status: "changed", changes: agent, new_findings: Vec::new() });
    }
    let mut req = Vec::new();
    let (a, b) = (&old.requires, &new.requires);
    if a.landlock_abi != b.landlock_abi {
        let dir = if b.landlock_abi < a.landlock_abi { Direction::Wider } else { Direction::Narrower };
        req.push(change("landlock_abi", format!("{} -> {}", a.landlock_abi, b.landlock_abi), dir, ""));
    }
    if a.bpf_lsm != b.bpf_lsm {
        let dir = if b.bpf_lsm { Direction::Narrower } else { Direction::Wider };
        req.push(change("bpf_lsm", format!("{} -> {}", a.bpf_lsm, b.bpf_lsm), dir, ""));
    }
    if !req.is_empty() {
        out.push(UnitDiff { unit: "requires".into(), status: "changed", changes: req, new_findings: Vec::new() });
    }
    out
}

fn change(key: &str, what: String, direction: Direction, note: &str) -> Change {
    Change { key: key.into(), what, direction, note: note.into() }
}

/// The changes from `a` to `b`, key by key.
fn unit_changes(a: &Tool, b: &Tool) -> Vec<Change> {
    let mut out = Vec::new();
    if a.description != b.description {
        out.push(change("description", format!("{:?} -> {:?}", a.description, b.description), Direction::Neutral, ""));
    }
    let argv = |t: &Tool| t.argv.iter().map(ToString::to_string).collect::<Vec<_>>();
    if argv(a) != argv(b) {
        let what = format!("{:?} -> {:?}", argv(a), argv(b));
        out.push(change("argv", what, Direction::Wider, "a different command runs with the tool's grants"));
    }
    let args = |t: &Tool| {
        t.args.iter().map(|s| (s.name.to_string(), serde_json::to_string(&s.kind).unwrap_or_default())).collect()
    };
    lists(&mut out, "args", &args(a), &args(b), |_| None);
    let paths = |v: &[crate::types::AbsPath]| v.iter().map(|p| (p.to_string(), String::new())).collect();
    for (key, x, y) in [
        ("fs.read", &a.fs.read, &b.fs.read),
        ("fs.write", &a.fs.write, &b.fs.write),
        ("fs.exec", &a.fs.exec, &b.fs.exec),
        ("net.unix", &a.net.unix, &b.net.unix),
    ] {
        // A new path within another grant of the same right is no wider.
        let covered = |p: &str| {
            y.iter().find(|g| g.to_string() != p && Path::new(p).starts_with(g.as_path())).map(ToString::to_string)
        };
        lists(&mut out, key, &paths(x), &paths(y), covered);
    }
    let deny = |t: &Tool| t.audit.deny_open.iter().map(|p| (p.to_string(), String::new())).collect();
    // Fewer deny_open paths is wider: flip the direction.
    let mut denied = Vec::new();
    lists(&mut denied, "audit.deny_open", &deny(a), &deny(b), |_| None);
    for mut c in denied {
        c.direction = match c.direction {
            Direction::Wider => Direction::Narrower,
            Direction::Narrower => Direction::Wider,
            d => d,
        };
        out.push(c);
    }
    let eps = |v: &[crate::types::HostPort]| v.iter().map(|h| (h.to_string(), String::new())).collect();
    lists(&mut out, "net.connect", &eps(&a.net.connect), &eps(&b.net.connect), |_| None);
    lists(&mut out, "net.bind", &eps(&a.net.bind), &eps(&b.net.bind), |_| None);
    let names = |v: &[crate::types::Name]| v.iter().map(|n| (n.to_string(), String::new())).collect();
    lists(&mut out, "fs.exec_shared_with", &names(&a.fs.exec_shared_with), &names(&b.fs.exec_shared_with), |_| None);
    let env = |v: &[crate::types::EnvName]| v.iter().map(|n| (n.as_str().to_string(), String::new())).collect();
    lists(&mut out, "env.pass", &env(&a.env.pass), &env(&b.env.pass), |_| None);
    let set = |t: &Tool| t.env.set.iter().map(|(k, v)| (k.as_str().to_string(), v.clone())).collect();
    lists(&mut out, "env.set", &set(a), &set(b), |_| None);
    let codes = |t: &Tool| t.ok_exit.iter().map(|c| (c.to_string(), String::new())).collect();
    lists(&mut out, "ok_exit", &codes(a), &codes(b), |_| None);
    limits(&mut out, &a.limits, &b.limits);
    if a.allow_jit != b.allow_jit {
        let dir = if b.allow_jit { Direction::Wider } else { Direction::Narrower };
        out.push(change("allow_jit", format!("{} -> {}", a.allow_jit, b.allow_jit), dir, ""));
    }
    if a.audit.mode != b.audit.mode {
        let dir = if b.audit.mode == crate::model::AuditMode::Audit { Direction::Wider } else { Direction::Narrower };
        out.push(change("audit.mode", format!("{:?} -> {:?}", a.audit.mode, b.audit.mode).to_lowercase(), dir, ""));
    }
    if a.audit.on_audit_loss != b.audit.on_audit_loss {
        let dir = if b.audit.on_audit_loss == crate::model::LossAction::Record {
            Direction::Wider
        } else {
            Direction::Narrower
        };
        let what = format!("{:?} -> {:?}", a.audit.on_audit_loss, b.audit.on_audit_loss).to_lowercase();
        out.push(change("audit.on_audit_loss", what, dir, ""));
    }
    out
}

/// Added entries are wider (unless `covered` names a grant that already covers them), removed
/// ones narrower; an entry whose value changed (same name) is wider.
fn lists(
    out: &mut Vec<Change>,
    key: &str,
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
    covered: impl Fn(&str) -> Option<String>,
) {
    for (k, v) in b {
        let shown = if v.is_empty() { k.clone() } else { format!("{k} = {v}") };
        match a.get(k) {
            None => match covered(k) {
                Some(g) => out.push(change(key, format!("+ {shown}"), Direction::Neutral, &format!("within {g}"))),
                None => out.push(change(key, format!("+ {shown}"), Direction::Wider, "")),
            },
            Some(old) if old != v => {
                out.push(change(key, format!("{k}: {old} -> {v}"), Direction::Wider, "changed"));
            }
            Some(_) => {}
        }
    }
    for (k, v) in a {
        if !b.contains_key(k) {
            let shown = if v.is_empty() { k.clone() } else { format!("{k} = {v}") };
            out.push(change(key, format!("- {shown}"), Direction::Narrower, ""));
        }
    }
}

fn limits(out: &mut Vec<Change>, a: &Limits, b: &Limits) {
    let values = |l: &Limits| [l.timeout_ms, l.memory_mb, l.pids, l.cpu_percent, l.output_bytes, l.tmp_mb, l.file_mb];
    for ((spec, x), y) in LIMITS.iter().zip(values(a)).zip(values(b)) {
        if x != y {
            let dir = if y > x { Direction::Wider } else { Direction::Narrower };
            let word = if y > x { "looser" } else { "tighter" };
            out.push(change(&format!("limits.{}", spec.key), format!("{x} -> {y} ({word})"), dir, ""));
        }
    }
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.units.is_empty() {
            return writeln!(f, "no change in what any tool may do");
        }
        for u in &self.units {
            writeln!(f, "{} ({})", u.unit, u.status)?;
            for c in &u.changes {
                let mark = match c.direction {
                    Direction::Wider => "wider",
                    Direction::Narrower => "narrower",
                    Direction::Neutral => "same",
                };
                let note = if c.note.is_empty() { String::new() } else { format!("  ({})", c.note) };
                writeln!(f, "  {:<9} {:<20} {}{note}", mark, c.key, c.what)?;
            }
            for finding in &u.new_findings {
                writeln!(f, "  finding   {finding}")?;
            }
        }
        if self.wider {
            writeln!(f, "this change widens what the agent's tools may do")?;
        }
        Ok(())
    }
}
