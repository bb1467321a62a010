//! `agentd audit verify`, `agentd audit show` and `agentd audit key`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use agentd_audit::sign::{key_path, Public, Signer};
use agentd_audit::{verify_signed, Kind, Outcome, Record, Verdict};

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain, and with --key the signed checkpoints. Exit 0 if intact, 1 if
    /// tampered (naming the first bad record), 2 if only the final record is torn (a crash
    /// mid-write), 3 if, with --key, records after the last checkpoint are not signed (calls
    /// still running, or records added since), 125 if the file cannot be read.
    Verify {
        /// The audit log.
        file: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The public key to check checkpoints with (`ed25519:...` as `agentd audit key`
        /// prints it, or a file holding it), kept where the log's host cannot change it.
        #[arg(long)]
        key: Option<String>,
    },
    /// Print this host's audit signing public key (creating the key at first use).
    Key,
    /// Stream the BPF programs' own diagnostic log until interrupted (a call armed, a file no
    /// walk could name), to see a hook problem on this kernel. `AGENTD_BPF_LOG=LEVEL` on
    /// exec, run or serve starts this alongside them.
    BpfLog {
        /// From this level up: error, warn, info, debug or trace.
        #[arg(long, default_value = "debug")]
        level: tracing::Level,
    },
    /// Print a readable summary, per call.
    Show {
        /// The audit log.
        file: PathBuf,
        /// Only this call.
        #[arg(long = "call")]
        call_id: Option<String>,
    },
}

pub(crate) fn run(cmd: AuditCommand) -> i32 {
    match cmd {
        AuditCommand::Verify { file, json, key } => verify_cmd(&file, json, key.as_deref()),
        AuditCommand::BpfLog { level } => bpf_log(level),
        AuditCommand::Key => match Signer::load_or_create(&key_path()) {
            Ok(s) => {
                outln!("{}", s.public());
                0
            }
            Err(e) => {
                eprintln!("agentd: {e}");
                125
            }
        },
        AuditCommand::Show { file, call_id } => show(&file, call_id.as_deref()),
    }
}

fn verify_cmd(file: &Path, json: bool, key: Option<&str>) -> i32 {
    let key = match key.map(Public::parse).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("agentd: {e}");
            return 125;
        }
    };
    let report = match verify_signed(file, key.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("agentd: cannot read {}: {e}", file.display());
            return 125;
        }
    };
    let code = match report.outcome {
        Outcome::Intact => 0,
        Outcome::Tampered { .. } => 1,
        Outcome::TornTail { .. } => 2,
        Outcome::UnsignedTail { .. } => 3,
    };
    if json {
        outln!("{}", serde_json::to_string(&report).unwrap_or_default());
        return code;
    }
    let name = file.display();
    for line in &report.recovered {
        outln!("{name}:{line}: note: torn record from a crash mid-write; a later writer recovered and chained past it");
    }
    match &report.outcome {
        Outcome::Intact => {
            let signed = match (&report.key, report.checkpoints) {
                (Some(k), n) => format!(", {n} checkpoints signed by {k}"),
                (None, 0) => String::new(),
                (None, n) => format!(", {n} checkpoints (signatures not checked: pass --key)"),
            };
            outln!("{name}: intact: {} records{signed}", report.records);
        }
        Outcome::UnsignedTail { after, records } => {
            let after = after.map(|s| format!("after seq {s}")).unwrap_or_else(|| "anywhere".into());
            outln!(
                "{name}: {records} records {after} are not covered by a signed checkpoint: calls still running, or records added since; the {} before are intact and signed",
                report.records - records
            );
        }
        Outcome::Tampered { line, seq, reason } => {
            let seq = seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
            outln!("{name}:{line}: TAMPERED: record{seq}: {reason}");
            outln!("{name}: {} records verified before it", report.records);
        }
        Outcome::TornTail { line, bytes } => {
            outln!("{name}:{line}: torn final record ({bytes} bytes): a crash mid-write, not tampering");
            outln!("{name}: the {} records before it are intact", report.records);
        }
    }
    if let Some((seq, hash)) = &report.last_checkpoint {
        outln!("{name}: last checkpoint: seq {seq}, sha256 {hash} (compare with a copy kept off this host)");
    }
    if !report.unfinished_calls.is_empty() {
        outln!(
            "{name}: {} calls started and have no summary (still running, or their supervisor was killed): {}",
            report.unfinished_calls.len(),
            report.unfinished_calls.join(", ")
        );
    }
    code
}

fn show(file: &Path, only: Option<&str>) -> i32 {
    let text = match std::fs::read(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentd: cannot read {}: {e}", file.display());
            return 125;
        }
    };
    let mut calls: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut unreadable = 0;
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Record>(line) {
            Ok(r) if only.is_none_or(|c| c == r.call_id) => {
                if !calls.contains_key(&r.call_id) {
                    order.push(r.call_id.clone());
                }
                calls.entry(r.call_id.clone()).or_default().push(r);
            }
            Ok(_) => {}
            Err(_) => unreadable += 1,
        }
    }
    if let Some(c) = only.filter(|c| !calls.contains_key(*c)) {
        eprintln!("agentd: no records of call {c} in {}", file.display());
        return 1;
    }
    for id in order {
        let recs = &calls[&id];
        if id.is_empty() {
            for r in recs {
                outln!("{}  log: {:?} {}", r.ts, r.kind, r.details);
            }
            continue;
        }
        let tool = recs.first().map(|r| r.tool.as_str()).unwrap_or_default();
        let denied = recs.iter().filter(|r| r.verdict == Verdict::Denied).count();
        outln!("call {id}  tool {tool}  ({} records, {denied} denied)", recs.len());
        for r in recs {
            outln!("  {}  {:<10} {:<9}  {}", r.ts, kind_name(r.kind), verdict_name(r), brief(r));
        }
    }
    if unreadable > 0 {
        outln!("({unreadable} lines are not records: run `agentd audit verify`)");
    }
    0
}

/// A record kind as the log spells it (`call_start`, `open`, ...).
pub(super) fn kind_name(k: Kind) -> String {
    serde_json::to_value(k).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// The verdict column. An open or exec the policy let through but that found nothing
/// (ENOENT) is `not found`, not `allowed`: `audit show` is how an author sees what a program
/// looks for.
fn verdict_name(r: &Record) -> &'static str {
    match r.verdict {
        Verdict::Denied => "DENIED",
        Verdict::Allowed if matches!(r.kind, Kind::Open | Kind::Exec) && r.details["errno"] == "ENOENT" => "not found",
        Verdict::Allowed => "allowed",
    }
}

/// A syscall's outcome, when the record has one: its error and who refused it.
fn outcome(d: &serde_json::Value) -> String {
    match (d["result"].as_i64(), d["errno"].as_str()) {
        (Some(r), _) if r >= 0 => String::new(),
        (Some(r), e) => format!(
            " -> {}{}",
            e.map(String::from).unwrap_or_else(|| r.to_string()),
            d["by"].as_str().map(|b| format!(" (by {b})")).unwrap_or_default()
        ),
        (None, _) if d["hook"] == "tracepoint" => " (no result seen)".into(),
        (None, _) => String::new(),
    }
}

fn brief(r: &Record) -> String {
    let d = &r.details;
    match r.kind {
        Kind::CallStart => match d["learn"].as_array() {
            Some(added) => format!("argv {} (learn mode: {} grants added to the manifest's)", d["argv"], added.len()),
            None => format!("argv {}", d["argv"]),
        },
        Kind::Summary => format!(
            "exit {} in {} ms{}{}; events {} ({} lost){}",
            d["exit_code"],
            d["duration_ms"],
            if d["timed_out"] == true { ", timed out" } else { "" },
            if d["oom_killed"] == true { ", OOM-killed" } else { "" },
            d["events"],
            d["lost_events"],
            d["error"].as_str().map(|e| format!("; error: {e}")).unwrap_or_default()
        ),
        Kind::Exec if d["memory"].is_string() => format!(
            "{} made {} memory executable{}{}",
            d["operation"].as_str().unwrap_or("?"),
            d["memory"].as_str().unwrap_or("?"),
            if d["writable"] == true { " (and writable)" } else { "" },
            outcome(d)
        ),
        Kind::Exec | Kind::Open => {
            let mut out = d["path"].as_str().unwrap_or("").to_string();
            if d["path_source"] != "kernel" {
                out.push_str(&format!(" ({} path)", d["path_source"].as_str().unwrap_or("?")));
            }
            if d["path_mismatch"] == true {
                out.push_str(&format!(" [the tool named {}]", d["claimed_path"]));
            }
            out.push_str(&outcome(d));
            out
        }
        Kind::Checkpoint => format!("signed by {}", d["key"].as_str().unwrap_or("?")),
        Kind::Change => {
            let mut out = format!("{} {}", d["operation"].as_str().unwrap_or("?"), d["path"].as_str().unwrap_or(""));
            if d["path_mismatch"] == true {
                out.push_str(&format!(" [the tool named {}]", d["claimed_path"]));
            }
            if let Some(new) = d["new_path"].as_str() {
                out.push_str(&format!(" -> {new}"));
            }
            if d["new_path_mismatch"] == true {
                out.push_str(&format!(" [the tool named {}]", d["claimed_new_path"]));
            }
            if let Some(t) = d["target"].as_str() {
                out.push_str(&format!(" (pointing to {t})"));
            }
            if let Some(m) = d["mode"].as_str() {
                out.push_str(&format!(" mode {m}"));
            }
            for flag in ["setuid", "setgid", "world_writable"] {
                if d[flag] == true {
                    out.push_str(&format!(" {}", flag.to_uppercase()));
                }
            }
            for k in ["uid", "gid", "length", "device"] {
                if !d[k].is_null() {
                    out.push_str(&format!(" {k} {}", d[k]));
                }
            }
            out.push_str(&outcome(d));
            out
        }
        Kind::Connect
        | Kind::Bind
        | Kind::Resolve
        | Kind::UnixConnect
        | Kind::Ptrace
        | Kind::Signal
        | Kind::Mount
        | Kind::Device
        | Kind::Syscall
        | Kind::Recovered
        | Kind::Killed => d.to_string(),
    }
}

/// `agentd audit bpf-log`: waits (up to 10 s) for the programs to be loaded, then streams
/// their log until interrupted.
fn bpf_log(level: tracing::Level) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: cannot start the log reader: {e}");
            return 125;
        }
    };
    rt.block_on(async {
        let start = std::time::Instant::now();
        loop {
            match agentd_audit::bpf::programs_log::stream(level) {
                Ok(()) => break,
                Err(_) if start.elapsed() < std::time::Duration::from_secs(10) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => {
                    eprintln!("agentd: {}", agentd_policy::error_chain(&e));
                    return 125;
                }
            }
        }
        eprintln!("agentd: streaming the BPF programs' log from {level} up; interrupt to stop");
        let _ = tokio::signal::ctrl_c().await;
        0
    })
}

/// `agentd audit bpf-log`, started alongside a command when `AGENTD_BPF_LOG` asks for it, and
/// stopped when this is dropped.
pub(crate) struct BpfLogReader(Option<std::process::Child>);

impl BpfLogReader {
    /// Starts the reader if `AGENTD_BPF_LOG` names a level (a bad value is reported).
    pub(crate) fn start_if_asked() -> Self {
        let level = match agentd_audit::bpf::programs_log::level_from_env() {
            Ok(Some(level)) => level,
            Ok(None) => return Self(None),
            Err(e) => {
                tracing::warn!(error = %e, "the BPF programs' log is not streamed");
                return Self(None);
            }
        };
        let child = std::env::current_exe().and_then(|me| {
            std::process::Command::new(me)
                .args(["audit", "bpf-log", "--level", level.as_str()])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
        });
        match child {
            Ok(c) => Self(Some(c)),
            Err(e) => {
                tracing::warn!(error = %e, "could not start the BPF programs' log reader");
                Self(None)
            }
        }
    }
}

impl Drop for BpfLogReader {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // Its last lines come with the call's end: a moment to read them.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
