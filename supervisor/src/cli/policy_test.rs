//! `agentd policy test`: run a manifest's tests file. Static checks are answered from the
//! compiled plan; each case runs for real, as `agentd exec --json` in its sandbox, and is
//! judged from its result and its records in the audit log.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use agentd_audit::{Kind, Record, Verdict};
use agentd_policy::cases::{self, Case, Denial, Expect, TestFile};
use agentd_policy::{Manifest, Name};
use agentd_sandbox::host::Host;
use agentd_sandbox::runner::EXIT_REFUSED;
use serde_json::Value;

use crate::manifest::load_manifest;

/// What one check or case came to.
#[derive(Debug)]
struct Outcome {
    /// `check` or `case`.
    what: &'static str,
    name: String,
    passed: bool,
    /// Why, with the evidence (errno, audit record, mount and rule).
    evidence: String,
    seconds: f64,
}

/// Options of `agentd policy test`.
#[derive(Debug, clap::Args)]
pub(crate) struct TestArgs {
    /// Tests files, or manifests or directories with an `agent.tests.toml` beside or in them
    /// (default: ./agent.tests.toml).
    paths: Vec<PathBuf>,
    /// Also write the results as JUnit XML to this file, for CI.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// The audit log the cases' calls append to (default: a fresh one in a private temporary
    /// directory, kept and named when a case fails).
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
}

pub(crate) fn run(a: TestArgs) -> i32 {
    let files: Vec<PathBuf> = if a.paths.is_empty() { vec![PathBuf::from(cases::TESTS_FILE)] } else { a.paths.clone() };
    let (log, scratch) = match &a.audit_log {
        Some(p) => (p.clone(), None),
        None => match scratch_dir() {
            Ok(d) => (d.join("audit.jsonl"), Some(d)),
            Err(e) => {
                eprintln!("agentd: cannot make a private directory for the cases' audit log: {e}");
                return 1;
            }
        },
    };
    // The host is looked at once: every check's plan and every case's judgement use it.
    let host = Host::probe();
    let mut suites: Vec<(String, Vec<Outcome>)> = Vec::new();
    let mut broken = false;
    for path in &files {
        let tests_path = tests_file_of(path);
        match load(&tests_path) {
            Ok((tests, manifest_path, manifest)) => {
                outln!("{} (manifest {})", tests_path.display(), manifest_path.display());
                let mut outcomes = Vec::new();
                for c in &tests.checks {
                    let o = check(c, &manifest, &host);
                    print_outcome(&o);
                    outcomes.push(o);
                }
                for c in &tests.cases {
                    let o = case(c, &manifest, &manifest_path, &log, &host);
                    print_outcome(&o);
                    outcomes.push(o);
                }
                if tests.checks.is_empty() && tests.cases.is_empty() {
                    eprintln!("agentd: {}: no [[case]] or [[check]]: nothing to test", tests_path.display());
                    broken = true;
                }
                suites.push((tests_path.display().to_string(), outcomes));
            }
            Err(lines) => {
                broken = true;
                for l in lines {
                    eprintln!("{l}");
                }
            }
        }
    }
    let all: Vec<&Outcome> = suites.iter().flat_map(|(_, o)| o).collect();
    let failed = all.iter().filter(|o| !o.passed).count();
    outln!("{} passed, {failed} failed", all.len() - failed);
    if let Some(j) = &a.junit {
        if let Err(e) = std::fs::write(j, junit(&suites)) {
            eprintln!("agentd: cannot write {}: {e}", j.display());
            broken = true;
        }
    }
    match scratch {
        Some(dir) if failed == 0 && !broken => {
            let _ = std::fs::remove_dir_all(dir);
        }
        _ if failed > 0 => eprintln!("agentd: the cases' audit records are in {}", log.display()),
        _ => {}
    }
    i32::from(failed > 0 || broken)
}

/// A private (0700) directory for a run's audit log.
fn scratch_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = std::env::temp_dir().join(format!("agentd-policy-test-{}", uuid::Uuid::now_v7()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// `path` itself if it is a tests file; the tests file beside a manifest or in a directory.
fn tests_file_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.join(cases::TESTS_FILE);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".tests.toml") {
        path.to_path_buf()
    } else {
        // A manifest: its tests are beside it, named after it.
        let stem = name.strip_suffix(".toml").unwrap_or(name);
        path.with_file_name(format!("{stem}.tests.toml"))
    }
}

fn load(tests_path: &Path) -> Result<(TestFile, PathBuf, Manifest), Vec<String>> {
    let name = tests_path.display().to_string();
    let src = std::fs::read_to_string(tests_path)
        .map_err(|e| vec![format!("{name}: error: cannot read the tests file: {e}")])?;
    let tests = cases::parse_tests(&name, &src).map_err(|d| d.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let manifest_path = tests_path.parent().unwrap_or(Path::new(".")).join(&tests.manifest);
    let manifest = load_manifest(&manifest_path)?;
    let known: Vec<&str> = manifest.tools.keys().map(Name::as_str).collect();
    let mut errors = Vec::new();
    for tool in tests.checks.iter().map(|c| &c.tool).chain(tests.cases.iter().map(|c| &c.tool)) {
        if !known.contains(&tool.as_str()) {
            errors.push(format!(
                "{name}: error: tool {tool:?} is not in {} (it has: {})",
                manifest_path.display(),
                known.join(", ")
            ));
        }
    }
    if errors.is_empty() {
        Ok((tests, manifest_path, manifest))
    } else {
        Err(errors)
    }
}

fn print_outcome(o: &Outcome) {
    let mark = if o.passed { "ok  " } else { "FAIL" };
    outln!("  {mark}  {:<5}  {}", o.what, o.name);
    outln!("               {}", o.evidence);
}

fn check(c: &cases::Check, manifest: &Manifest, host: &Host) -> Outcome {
    let start = Instant::now();
    let canonical = |p: &str| std::fs::canonicalize(p).map_or_else(|_| p.to_string(), |c| c.display().to_string());
    let (passed, evidence) = match super::policy::plan_of(manifest, &c.tool, host) {
        Ok(plan) => match cases::answer(c, &plan, &canonical) {
            Ok(e) => (true, e),
            Err(e) => (false, format!("expected {}: {e}", expect_word(c.expect))),
        },
        Err(e) => (false, format!("the tool's plan cannot be compiled: {e}")),
    };
    Outcome { what: "check", name: c.label(), passed, evidence, seconds: start.elapsed().as_secs_f64() }
}

fn expect_word(e: Expect) -> &'static str {
    match e {
        Expect::Allow => "allowed",
        Expect::Deny => "denied",
    }
}

fn case(c: &Case, manifest: &Manifest, path: &Path, log: &Path, host: &Host) -> Outcome {
    let start = Instant::now();
    let call_id = format!("test-{}", uuid::Uuid::now_v7());
    // The plan tells a refusal by the policy from one by a file's mode or a missing file.
    let plan = super::policy::plan_of(manifest, &c.tool, host).ok();
    let judged = exec(c, path, log, &call_id).map(|result| {
        let records = records_of(log, &call_id);
        judge(c, &result, &records, plan.as_ref())
    });
    let (passed, evidence) = match judged {
        Ok(Ok(e)) => (true, e),
        Ok(Err(e)) => (false, e),
        Err(e) => (false, e),
    };
    Outcome { what: "case", name: c.name.clone(), passed, evidence, seconds: start.elapsed().as_secs_f64() }
}

/// Runs the case as `agentd exec --json` and returns its result object.
fn exec(c: &Case, manifest: &Path, log: &Path, call_id: &str) -> Result<Value, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find agentd's own binary: {e}"))?;
    let mut cmd = Command::new(me);
    cmd.args(["exec", "--json", "--tool", &c.tool, "--call-id", call_id])
        .arg("--manifest")
        .arg(manifest)
        .arg("--audit-log")
        .arg(log);
    if !c.args.is_empty() {
        cmd.arg("--args-json").arg(cases::args_json(&c.args).to_string());
    }
    if let Some(argv) = &c.argv {
        cmd.arg("--").args(argv);
    }
    let out =
        cmd.stdin(Stdio::null()).stderr(Stdio::piped()).output().map_err(|e| format!("cannot run agentd exec: {e}"))?;
    serde_json::from_slice(&out.stdout).map_err(|_| {
        format!(
            "agentd exec printed no result (status {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// The records of `call_id` in `log`.
fn records_of(log: &Path, call_id: &str) -> Vec<Record> {
    super::policy_draft::calls_in(log, |r| r.call_id == call_id)
        .ok()
        .and_then(|mut calls| calls.remove(call_id))
        .unwrap_or_default()
}

/// A refusal or failure found in a call: its kind, what it was about, and the evidence.
#[derive(Debug)]
struct Refusal {
    kind: Denial,
    subject: String,
    evidence: String,
    /// Only "not found" (ENOENT): counts as a refusal only where the case names its subject
    /// and the plan does not show it.
    hidden: bool,
    /// The plan allows it: the file's own mode, or its absence, refused it, not the policy.
    not_policy: bool,
}

fn refusals(result: &Value, records: &[Record], plan: Option<&agentd_policy::ExecPlan>) -> Vec<Refusal> {
    let mut out = Vec::new();
    let error = result["error"].as_str().unwrap_or_default();
    if result["exit_code"].as_i64() == Some(i64::from(EXIT_REFUSED)) && !error.is_empty() {
        let kind = if error.contains("argument \"") { Denial::Argument } else { Denial::Refused };
        out.push(Refusal {
            kind,
            subject: String::new(),
            evidence: format!("refused before it ran: {error}"),
            hidden: false,
            not_policy: false,
        });
    }
    if error.starts_with("cannot execute") {
        // The program is outside the exec grants (or not visible): the sandbox refused it;
        // unless it is not on the host at all, which says nothing of the policy.
        let program = result["argv"][0].as_str().unwrap_or_default().to_string();
        let absent = !Path::new(&program).exists();
        let evidence = if absent {
            format!("exec {program}: not on this host: {error}")
        } else {
            format!("exec {program}: refused by the sandbox: {error}")
        };
        out.push(Refusal { kind: Denial::FsExec, subject: program, evidence, hidden: false, not_policy: absent });
    }
    if result["timed_out"] == true {
        out.push(Refusal {
            kind: Denial::Timeout,
            subject: String::new(),
            evidence: "timed out".into(),
            hidden: false,
            not_policy: false,
        });
    }
    for r in records {
        let d = &r.details;
        let hidden = r.verdict == Verdict::Allowed && d["errno"] == "ENOENT";
        if r.verdict != Verdict::Denied && !hidden {
            continue;
        }
        let flags = d["flags"].as_u64().unwrap_or(0);
        let kind = match r.kind {
            Kind::Open if !agentd_audit::opens_for_writing(flags) => Denial::FsRead,
            Kind::Open | Kind::Change => Denial::FsWrite,
            Kind::Exec if d["memory"].is_string() => Denial::Memory,
            Kind::Exec => Denial::FsExec,
            Kind::Connect | Kind::Resolve => Denial::Connect,
            Kind::Bind => Denial::Bind,
            Kind::UnixConnect => Denial::Unix,
            Kind::Ptrace | Kind::Signal | Kind::Mount | Kind::Device | Kind::Syscall => Denial::Process,
            _ => continue,
        };
        let subject = ["path", "address", "name", "to", "socket_name"]
            .iter()
            .find_map(|k| d[*k].as_str().filter(|s| !s.is_empty()))
            .unwrap_or_default()
            .to_string();
        let how = match (d["errno"].as_str(), d["by"].as_str()) {
            (Some("ENOENT"), _) => "not found (not visible in the sandbox, or absent)".to_string(),
            (Some(e), Some(by)) => format!("{e} by {by}"),
            (Some(e), None) => e.to_string(),
            (None, Some(by)) => format!("denied by {by}"),
            (None, None) => "denied".to_string(),
        };
        // What the plan allows was refused by the file's mode (EACCES) or is absent (ENOENT).
        let canonical = std::fs::canonicalize(&subject).map_or_else(|_| subject.clone(), |c| c.display().to_string());
        let allowed = plan.and_then(|p| agentd_policy::cases::plan_allows(p, &canonical, kind)).unwrap_or(false);
        let how = if allowed && !hidden {
            format!("{how}, but the plan allows it: the file's own mode refused it")
        } else {
            how
        };
        let evidence = format!("{} {subject}: {how} (audit record {})", super::audit::kind_name(r.kind), r.seq);
        out.push(Refusal { kind, subject, evidence, hidden, not_policy: allowed });
    }
    out
}

/// Whether `subject` is what `on` names: the path or below it, or the address.
fn about(subject: &str, on: &str) -> bool {
    subject == on || Path::new(subject).starts_with(on) || subject.ends_with(&format!(" {on}"))
}

fn judge(
    c: &Case,
    result: &Value,
    records: &[Record],
    plan: Option<&agentd_policy::ExecPlan>,
) -> Result<String, String> {
    let stdout = result["stdout"].as_str().unwrap_or_default();
    if let Some(lacks) = &c.stdout_lacks {
        if stdout.contains(lacks.as_str()) {
            return Err(format!("stdout contains {lacks:?}, which must not appear"));
        }
    }
    let found = refusals(result, records, plan);
    let summary = format!(
        "exit {} in {} ms, {} audit events ({} denied)",
        result["exit_code"], result["duration_ms"], result["events"]["total"], result["events"]["denied"]
    );
    match c.expect {
        Expect::Allow => {
            let ok = result["ok"].as_bool().unwrap_or(false);
            if let Some(r) = found.iter().find(|r| !r.hidden) {
                return Err(format!("expected allowed, but {}; {summary}", r.evidence));
            }
            if !ok {
                let err = result["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
                let stderr =
                    result["stderr"].as_str().unwrap_or_default().lines().last().unwrap_or_default().to_string();
                let tail = if stderr.is_empty() { String::new() } else { format!("; stderr ends: {stderr}") };
                let hidden = found.iter().filter(|r| r.hidden).map(|r| r.subject.as_str()).take(3).collect::<Vec<_>>();
                let seen =
                    if hidden.is_empty() { String::new() } else { format!("; not found: {}", hidden.join(", ")) };
                return Err(format!("expected allowed, but the call failed{err}; {summary}{tail}{seen}"));
            }
            if let Some(want) = &c.stdout_contains {
                if !stdout.contains(want.as_str()) {
                    let shown: String = stdout.chars().take(200).collect();
                    return Err(format!("stdout lacks {want:?}; it begins {shown:?}; {summary}"));
                }
            }
            Ok(summary)
        }
        Expect::Deny => {
            let kind = c.denial.unwrap_or(Denial::Any);
            let fits = |r: &&Refusal| {
                // `any` is a refusal by the policy: not one for the host's sake (a missing
                // requirement), a timeout, or what a file's mode refused.
                let policy = !matches!(r.kind, Denial::Refused | Denial::Timeout);
                let kind_ok = (kind == Denial::Any && policy)
                    || r.kind == kind
                    || (kind == Denial::Refused && r.kind == Denial::Argument);
                let kind_ok = kind_ok && !r.not_policy;
                let on_ok = match &c.on {
                    Some(on) => about(&r.subject, on),
                    None => !r.hidden,
                };
                kind_ok && on_ok
            };
            match found.iter().find(fits) {
                Some(r) => Ok(r.evidence.clone()),
                None => {
                    let seen: Vec<&str> =
                        found.iter().filter(|r| !r.hidden).map(|r| r.evidence.as_str()).take(3).collect();
                    let hint = if c.on.is_none() {
                        " (a path the sandbox does not show is \"not found\", not denied: name it with `on`)"
                    } else {
                        ""
                    };
                    Err(format!(
                        "expected a {} refusal{}, found {}{hint}; {summary}",
                        kind.as_str(),
                        c.on.as_deref().map(|o| format!(" on {o}")).unwrap_or_default(),
                        if seen.is_empty() { "none".to_string() } else { seen.join("; ") }
                    ))
                }
            }
        }
    }
}

/// JUnit XML, as CI systems read it: a suite per tests file, a test case per check and case.
fn junit(suites: &[(String, Vec<Outcome>)]) -> String {
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"agentd policy test\">\n");
    for (file, outcomes) in suites {
        let failures = outcomes.iter().filter(|o| !o.passed).count();
        let time: f64 = outcomes.iter().map(|o| o.seconds).sum();
        s.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{time:.3}\">\n",
            xml(file),
            outcomes.len()
        ));
        for o in outcomes {
            s.push_str(&format!(
                "    <testcase classname=\"{}\" name=\"{}: {}\" time=\"{:.3}\"",
                xml(file),
                o.what,
                xml(&o.name),
                o.seconds
            ));
            if o.passed {
                s.push_str(&format!(">\n      <system-out>{}</system-out>\n    </testcase>\n", xml(&o.evidence)));
            } else {
                s.push_str(&format!(
                    ">\n      <failure message=\"{}\">{}</failure>\n    </testcase>\n",
                    xml(&o.evidence.chars().take(200).collect::<String>()),
                    xml(&o.evidence)
                ));
            }
        }
        s.push_str("  </testsuite>\n");
    }
    s.push_str("</testsuites>\n");
    s
}

/// Text for XML content and attributes; characters XML 1.0 cannot hold become U+FFFD.
fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}
