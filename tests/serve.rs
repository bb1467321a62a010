//! `agentd serve` end to end: a real daemon on a temporary socket, with the scripted model
//! (every task calls `sh` a few times, then answers), driven by `agentd ctl`.
//! - roles from peer credentials: allowed and denied, by uid and by supplementary gid;
//! - no local user can lock the operator out: floods of idle, slow and half-sent connections
//!   from a uid with no role and from a role holder, with the daemon's fds and RSS bounded;
//! - submit, watch and cancel (the running call's processes are gone);
//! - SIGTERM drains: no new tasks, the running call is killed at the deadline and recorded;
//! - after `kill -9`, a restart leaves no sandbox processes, fails the running task with the
//!   reason, resumes the queued one, and the audit log still verifies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentd_tests::{agentd, agentd_bin, processes_with, sandbox_ready, Fixture};
use serde_json::Value;

/// A daemon and its files.
struct Daemon {
    child: Option<Child>,
    config: PathBuf,
    socket: PathBuf,
    audit: PathBuf,
    step: PathBuf,
}

/// The config: agents `main` and `other` over one `sh` tool that runs `data/step.sh`.
fn config(fx: &Fixture, extra: &str) -> PathBuf {
    let manifest = fx.manifest("");
    let step = fx.dir.join("data/step.sh");
    std::fs::write(&step, "echo hi\n").expect("write step");
    let cfg = format!(
        r#"version = 1
[paths]
socket = "{dir}/agentd.sock"
state_dir = "{dir}/state"
audit_log = "{dir}/audit.jsonl"
[model]
backend = "scripted"
tool = "sh"
args = {{ command = "sh {step}" }}
calls = 2
[limits]
drain_timeout_ms = 1500
max_running_tasks = 1
[agents.main]
manifest = "{manifest}"
[agents.other]
manifest = "{manifest}"
[roles.admin]
uids = [0]
agents = ["*"]
all_tasks = true
audit = true
[roles.viewer]
uids = [1000]
agents = ["other"]
[roles.team]
gids = [2345]
agents = ["main"]
{extra}
"#,
        dir = fx.dir.display(),
        step = step.display(),
        manifest = manifest.display(),
    );
    let path = fx.dir.join("agentd.toml");
    std::fs::write(&path, cfg).expect("write config");
    path
}

/// [`config`], with some of its text replaced.
fn config_with(fx: &Fixture, edits: &[(&str, &str)]) -> PathBuf {
    let path = config(fx, "");
    let mut cfg = std::fs::read_to_string(&path).expect("config");
    for (from, to) in edits {
        assert!(cfg.contains(from), "the config has no {from:?}");
        cfg = cfg.replace(from, to);
    }
    std::fs::write(&path, cfg).expect("config");
    path
}

impl Daemon {
    fn start(fx: &Fixture, config: &Path) -> Self {
        let mut d = Daemon {
            child: None,
            config: config.to_path_buf(),
            socket: fx.dir.join("agentd.sock"),
            audit: fx.dir.join("audit.jsonl"),
            step: fx.dir.join("data/step.sh"),
        };
        d.restart();
        d
    }

    fn restart(&mut self) {
        self.child = Some(agentd_tests::serve(&self.config, &self.socket));
    }

    /// `kill -9`, and reaped.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9");
            c.wait().expect("reap");
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn ctl_as(&self, ids: Option<(u32, u32, &[u32])>, args: &[&str]) -> Output {
        // setpriv (util-linux) drops to the uid, gid and groups: what the daemon must read
        // from the socket.
        let mut cmd = match ids {
            Some((uid, gid, groups)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}"));
                if groups.is_empty() {
                    c.arg("--clear-groups");
                } else {
                    c.arg(format!("--groups={}", groups.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")));
                }
                c.arg(agentd_bin());
                c
            }
            None => Command::new(agentd_bin()),
        };
        cmd.arg("ctl").arg("--socket").arg(&self.socket).args(args);
        cmd.output().expect("run agentd ctl")
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as(None, args)
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ctl(&a);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("ctl {args:?}: {e}: {}", String::from_utf8_lossy(&out.stderr)))
    }

    fn submit(&self, agent: &str) -> String {
        let out = self.ctl(&["submit", agent, "a task"]);
        assert!(out.status.success(), "submit: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits until `pred` holds for the task's record.
    fn wait_task(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let t = self.json(&["status", id]);
            if pred(&t) {
                return t;
            }
            assert!(Instant::now() < until, "task {id} never became {what}: {t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_exit(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()).is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Processes whose parent is `pid`.
fn children_of(pid: i32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn audit_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn verify(path: &Path) {
    let out = agentd(["audit", "verify", &path.display().to_string()]);
    assert!(
        out.status.success(),
        "the audit log must verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

#[test]
fn roles_from_peer_credentials_allow_and_deny() {
    if !sandbox_ready("roles_from_peer_credentials_allow_and_deny") {
        return;
    }
    let fx = Fixture::new("serve-roles");
    let d = Daemon::start(&fx, &config(&fx, ""));
    // Root (admin): everything.
    let id = d.submit("main");
    d.wait_task(&id, "succeeded", |t| t["state"] == "succeeded");
    assert!(d.ctl(&["audit"]).status.success());
    // uid 1000 (viewer): only agent `other`, no audit, and cannot see `main`'s tasks.
    let viewer = Some((1000, 1000, &[][..]));
    let out = d.ctl_as(viewer, &["submit", "main", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("403") && stderr(&out).contains("may not submit to agent \"main\""),
        "{}",
        stderr(&out)
    );
    let out = d.ctl_as(viewer, &["submit", "other", "x"]);
    assert!(out.status.success(), "viewer may submit to other: {}", stderr(&out));
    // Another agent's task is as unknown as one that never was: 404, and not its agent's name.
    for verb in ["status", "watch", "cancel"] {
        let out = d.ctl_as(viewer, &[verb, &id]);
        let err = stderr(&out);
        assert!(err.contains("404") && !err.contains("main"), "viewer may not {verb} main's task: {err}");
    }
    // What users and agents wrote never reaches an operator's terminal as control sequences.
    let hostile = "list the notes\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31m\u{202e}";
    let out = d.ctl_as(None, &["submit", "other", hostile]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed = d.ctl_as(None, &["ls", "tasks"]);
    let shown = String::from_utf8_lossy(&listed.stdout);
    assert!(shown.contains("list the notes\\u{1b}]0;owned"), "{shown}");
    assert!(!shown.chars().any(|c| c.is_control() && c != '\n') && !shown.contains('\u{202e}'), "{shown:?}");
    let calls = d.ctl_as(viewer, &["--json", "ls", "calls"]);
    let v: Value = serde_json::from_slice(&calls.stdout).expect("json");
    assert!(v["calls"].as_array().is_some_and(|c| c.iter().all(|c| c["agent"] == "other")), "{v}");
    let st = d.ctl_as(viewer, &["--json", "ls", "status"]);
    let v: Value = serde_json::from_slice(&st.stdout).expect("json");
    assert!(v["model"].get("backend").is_none(), "the model's counters are for audit roles: {v}");
    let out = d.ctl_as(viewer, &["audit"]);
    assert!(stderr(&out).contains("403") && stderr(&out).contains("may not read audit records"), "{}", stderr(&out));
    let listed = d.ctl_as(viewer, &["--json", "ls", "tasks"]);
    let v: Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert!(v["tasks"].as_array().is_some_and(|t| t.iter().all(|t| t["agent"] == "other")), "{v}");
    // A supplementary group grants the team role.
    let member = Some((1002, 1002, &[2345][..]));
    let out = d.ctl_as(member, &["submit", "main", "x"]);
    assert!(out.status.success(), "gid 2345 may submit to main: {}", stderr(&out));
    let theirs = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // A teammate with the same role but another uid sees and cancels only their own tasks.
    let mate = Some((1003, 1003, &[2345][..]));
    for verb in ["status", "watch", "cancel"] {
        let out = d.ctl_as(mate, &[verb, &theirs]);
        assert!(
            stderr(&out).contains("404") && !stderr(&out).contains("uid 1002"),
            "a teammate may not {verb} uid 1002's task, nor learn it exists: {}",
            stderr(&out)
        );
    }
    let listed = d.ctl_as(mate, &["--json", "ls", "tasks"]);
    let v: Value = serde_json::from_slice(&listed.stdout).expect("json");
    assert!(v["tasks"].as_array().is_some_and(Vec::is_empty), "the teammate submitted nothing: {v}");
    let calls = d.ctl_as(mate, &["--json", "ls", "calls"]);
    let v: Value = serde_json::from_slice(&calls.stdout).expect("json");
    assert!(v["calls"].as_array().is_some_and(Vec::is_empty), "nor may it list their calls: {v}");
    // The submitter sees it, and so does a role with all_tasks.
    assert!(d.ctl_as(member, &["status", &theirs]).status.success(), "the submitter sees its task");
    assert!(d.ctl(&["status", &theirs]).status.success(), "admin (all_tasks) sees everyone's");
    // No role at all: a clear 403.
    let out = d.ctl_as(Some((1001, 1001, &[][..])), &["ls", "agents"]);
    assert!(stderr(&out).contains("403") && stderr(&out).contains("has no role"), "{}", stderr(&out));
}

#[test]
fn submit_watch_and_cancel() {
    if !sandbox_ready("submit_watch_and_cancel") {
        return;
    }
    let fx = Fixture::new("serve-watch");
    let d = Daemon::start(&fx, &config(&fx, ""));
    let out = d.ctl(&["--json", "submit", "main", "say hi", "--watch"]);
    assert!(out.status.success(), "the task succeeds: {}", stderr(&out));
    let events: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "tool_call").count(), 2, "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "tool_result").count(), 2, "{kinds:?}");
    assert!(kinds.contains(&"text") && kinds.last() == Some(&"state"), "{kinds:?}");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "events in order, none missing: {seqs:?}");
    // Every call is in the audit log under its id.
    let calls: Vec<String> = events
        .iter()
        .filter(|e| e["kind"] == "tool_call")
        .filter_map(|e| e["data"]["call_id"].as_str().map(String::from))
        .collect();
    let recs = audit_records(&d.audit);
    for c in &calls {
        assert!(recs.iter().any(|r| r["call_id"] == c.as_str() && r["kind"] == "summary"), "call {c} has a summary");
    }
    // A late watcher gets the whole stream again.
    let tasks = d.json(&["ls", "tasks"]);
    let id = tasks["tasks"][0]["id"].as_str().unwrap_or_default().to_string();
    let replay = d.ctl(&["--json", "watch", &id]);
    assert_eq!(String::from_utf8_lossy(&replay.stdout).lines().count(), events.len());

    // Cancel: a long call is killed, and its processes are gone.
    std::fs::write(&d.step, "sleep 987.125\n").expect("write step");
    let id = d.submit("main");
    d.wait_task(&id, "in a call", |t| t["calls"].as_array().is_some_and(|c| !c.is_empty()));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!processes_with("987.125").is_empty(), "the call runs");
    let out = d.ctl(&["cancel", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = d.wait_task(&id, "cancelled", |t| t["state"] == "cancelled");
    assert!(t["error"].as_str().is_some_and(|e| e.contains("cancelled by uid 0")), "{t}");
    assert!(processes_with("987.125").is_empty(), "the cancelled call's processes are gone");
    verify(&d.audit);
}

#[test]
fn full_queues_answer_busy_with_a_retry_hint_at_once() {
    if !sandbox_ready("full_queues_answer_busy_with_a_retry_hint_at_once") {
        return;
    }
    let fx = Fixture::new("serve-busy");
    let cfg = config(&fx, "").display().to_string();
    let text = std::fs::read_to_string(&cfg)
        .expect("config")
        .replace("max_running_tasks = 1", "max_running_tasks = 1\nmax_queued_tasks = 2");
    std::fs::write(&cfg, text).expect("config");
    let d = Daemon::start(&fx, Path::new(&cfg));
    std::fs::write(&d.step, "sleep 984.125\n").expect("write step");
    let first = d.submit("main");
    d.submit("main");
    let started = Instant::now();
    let out = d.ctl(&["submit", "main", "one too many"]);
    assert!(started.elapsed() < Duration::from_secs(5), "busy is answered at once, never a hang");
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("429") && err.contains("busy") && err.contains("retry in"), "{err}");
    d.ctl(&["cancel", &first]);
}

#[test]
fn one_user_cannot_take_an_agents_whole_queue() {
    if !sandbox_ready("one_user_cannot_take_an_agents_whole_queue") {
        return;
    }
    let fx = Fixture::new("serve-share");
    let cfg = config(&fx, "").display().to_string();
    let text = std::fs::read_to_string(&cfg).expect("config");
    let main = text.lines().find(|l| l.starts_with("manifest = ")).unwrap_or_default().to_string();
    let text =
        text.replacen(&format!("[agents.main]\n{main}"), &format!("[agents.main]\n{main}\nmax_queued_tasks = 4"), 1);
    std::fs::write(&cfg, text).expect("config");
    let d = Daemon::start(&fx, Path::new(&cfg));
    std::fs::write(&d.step, "sleep 983.125\n").expect("write step");
    // uid 1001 in group 2345 (role team: agent main) fills its half of main's queue.
    let team = Some((1001, 2345, &[][..]));
    let mut ids = Vec::new();
    for i in 0..2 {
        let out = d.ctl_as(team, &["submit", "main", &format!("task {i}")]);
        assert!(out.status.success(), "{}", stderr(&out));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let out = d.ctl_as(team, &["submit", "main", "one too many for one user"]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("max_queued_per_uid"), "{}", stderr(&out));
    // Another user still gets a place.
    let out = d.ctl(&["submit", "main", "root's task"]);
    assert!(out.status.success(), "root was starved: {}", stderr(&out));
    ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    for id in &ids {
        d.ctl(&["cancel", id]);
    }
}

#[test]
fn sigterm_drains_and_records_the_killed_call() {
    if !sandbox_ready("sigterm_drains_and_records_the_killed_call") {
        return;
    }
    let fx = Fixture::new("serve-drain");
    let mut d = Daemon::start(&fx, &config(&fx, ""));
    std::fs::write(&d.step, "sleep 986.125\n").expect("write step");
    let id = d.submit("main");
    let t = d.wait_task(&id, "in a call", |t| t["calls"].as_array().is_some_and(|c| !c.is_empty()));
    let call = t["calls"][0].as_str().unwrap_or_default().to_string();
    // The call is recorded before a worker takes it; one still waiting for a worker would be
    // refused at once by the drain, and the daemon would be gone before the submit below.
    let until = Instant::now() + Duration::from_secs(30);
    while processes_with("986.125").is_empty() {
        assert!(Instant::now() < until, "the call's tool never started: {}", d.json(&["status", &id]));
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let sent = Command::new("kill").args(["-TERM", &d.pid().to_string()]).status().expect("kill");
    assert!(sent.success());
    std::thread::sleep(Duration::from_millis(200));
    let out = d.ctl(&["submit", "main", "too late"]);
    assert_eq!(out.status.code(), Some(75), "draining refuses new work: {}", stderr(&out));
    assert!(stderr(&out).contains("stopping"), "{}", stderr(&out));
    assert!(d.wait_exit(Duration::from_secs(20)), "the daemon exits after the drain");
    assert!(started.elapsed() >= Duration::from_millis(1400), "the call had its deadline");
    assert!(processes_with("986.125").is_empty(), "the call was killed at the deadline");
    let recs = audit_records(&d.audit);
    assert!(recs.iter().any(|r| r["call_id"] == call.as_str() && r["kind"] == "killed"), "the kill is recorded");
    assert!(recs.iter().any(|r| r["call_id"] == call.as_str() && r["kind"] == "summary"), "and the call's summary");
    verify(&d.audit);
    d.restart();
    let t = d.json(&["status", &id]);
    assert_eq!(t["state"], "failed", "{t}");
    assert!(t["error"].as_str().is_some_and(|e| e.contains("SIGTERM")), "{t}");
}

#[test]
fn sigterm_ends_in_bounded_time_whatever_clients_do() {
    if !sandbox_ready("sigterm_ends_in_bounded_time_whatever_clients_do") {
        return;
    }
    use std::io::Write;
    let fx = Fixture::new("serve-stuck-client");
    let mut d = Daemon::start(&fx, &config(&fx, ""));
    // A client that stopped in the middle of its headers, and one that never said anything.
    let mut half = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    half.write_all(b"GET /v1/status HTTP/1.1\r\nHost: agentd\r\nX-Slow: ").expect("write");
    let idle = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let sent = Command::new("kill").args(["-TERM", &d.pid().to_string()]).status().expect("kill");
    assert!(sent.success());
    // drain_timeout_ms is 1500 in this config; the rest is a one-second grace and slack.
    assert!(d.wait_exit(Duration::from_secs(6)), "the daemon waited for its stuck clients past the deadline");
    assert!(started.elapsed() < Duration::from_secs(6));
    drop((half, idle));
}

#[test]
fn after_kill_9_a_restart_cleans_up_fails_the_running_task_and_resumes_the_queued_one() {
    if !sandbox_ready("after_kill_9_a_restart_cleans_up_fails_the_running_task_and_resumes_the_queued_one") {
        return;
    }
    let fx = Fixture::new("serve-kill9");
    let mut d = Daemon::start(&fx, &config(&fx, ""));
    std::fs::write(&d.step, "sleep 985.125\n").expect("write step");
    let running = d.submit("main");
    let t = d.wait_task(&running, "in a call", |t| t["calls"].as_array().is_some_and(|c| !c.is_empty()));
    let call = t["calls"][0].as_str().unwrap_or_default().to_string();
    // max_running_tasks = 1: this one waits.
    let queued = d.submit("other");
    assert_eq!(d.json(&["status", &queued])["state"], "queued");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!processes_with("985.125").is_empty(), "the call runs");
    let workers = children_of(d.pid());
    assert!(!workers.is_empty(), "a sandbox worker runs the call");
    d.kill9();
    std::fs::write(&d.step, "echo back\n").expect("write step");
    d.restart();
    assert!(processes_with("985.125").is_empty(), "no sandbox process is left behind");
    for w in &workers {
        // Gone, or a zombie waiting for init to reap it: nothing of it runs.
        let stat = std::fs::read_to_string(format!("/proc/{w}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(str::to_string));
        assert!(
            state.as_deref().is_none_or(|s| s == "Z" || s == "X"),
            "worker {w} of the killed daemon still runs: {stat}"
        );
    }
    let t = d.json(&["status", &running]);
    assert_eq!(t["state"], "failed", "{t}");
    let why = t["error"].as_str().unwrap_or_default();
    assert!(why.contains("killed") && why.contains(&call), "the reason names the call: {why}");
    d.wait_task(&queued, "succeeded after the restart", |t| t["state"] == "succeeded");
    let recs = audit_records(&d.audit);
    assert!(
        recs.iter().any(|r| r["call_id"] == call.as_str() && r["kind"] == "summary"),
        "the killed call has its summary in the audit log"
    );
    verify(&d.audit);
    assert!(agentd_tests::leftover_cgroups(&call).is_empty(), "the call's cgroups were removed");
}

/// Retention: at start the store forgets ended tasks past `limits.keep_finished_tasks`, with
/// their calls, and the audit log keeps every record of them.
#[test]
fn ended_tasks_past_the_retention_are_forgotten_and_the_audit_log_keeps_them() {
    if !sandbox_ready("ended_tasks_past_the_retention_are_forgotten_and_the_audit_log_keeps_them") {
        return;
    }
    let fx = Fixture::new("serve-retain");
    let path = config(&fx, "");
    let text = std::fs::read_to_string(&path).expect("read config");
    std::fs::write(&path, text.replace("max_running_tasks = 1\n", "max_running_tasks = 1\nkeep_finished_tasks = 1\n"))
        .expect("write config");
    let mut d = Daemon::start(&fx, &path);
    let first = d.submit("main");
    let old = d.wait_task(&first, "succeeded", |t| t["state"] == "succeeded");
    let second = d.submit("main");
    d.wait_task(&second, "succeeded", |t| t["state"] == "succeeded");
    let sent = Command::new("kill").args(["-TERM", &d.pid().to_string()]).status().expect("kill");
    assert!(sent.success());
    if let Some(c) = d.child.as_mut() {
        c.wait().expect("the daemon exits after its drain");
    }
    d.child = None;
    d.restart();
    let tasks = d.json(&["ls", "tasks"]);
    let ids: Vec<&str> = tasks["tasks"].as_array().into_iter().flatten().filter_map(|t| t["id"].as_str()).collect();
    assert_eq!(ids, [second.as_str()], "only the newest ended task is kept");
    let out = d.ctl(&["status", &first]);
    assert!(!out.status.success() && stderr(&out).contains("404"), "the first is forgotten: {}", stderr(&out));
    let calls = d.json(&["ls", "calls"]);
    let old_calls: Vec<&str> = old["calls"].as_array().into_iter().flatten().filter_map(|c| c.as_str()).collect();
    assert_eq!(old_calls.len(), 2, "{old}");
    assert!(
        calls["calls"].as_array().is_some_and(|c| c.iter().all(|c| c["task_id"] == second.as_str())),
        "its calls are forgotten too: {calls}"
    );
    let recs = audit_records(&d.audit);
    for c in old_calls {
        assert!(recs.iter().any(|r| r["call_id"] == c && r["kind"] == "summary"), "the audit log keeps call {c}");
    }
    verify(&d.audit);
}

/// `hold` (tests/src/bin/hold.rs) under another uid: connections held open until released.
struct Hold(Child);

impl Hold {
    fn start(uid: u32, socket: &Path, count: usize, prefix: &str, pad: usize) -> Self {
        Self::start_with(uid, socket, count, prefix, pad, 0.0)
    }

    /// [`Hold::start`], then a byte per write on each connection in turn for `drip` seconds.
    fn start_with(uid: u32, socket: &Path, count: usize, prefix: &str, pad: usize, drip: f64) -> Self {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(env!("CARGO_BIN_EXE_hold"))
            .arg(socket)
            .arg(count.to_string())
            .arg(prefix)
            .arg(pad.to_string())
            .arg(drip.to_string())
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start hold");
        let mut line = String::new();
        let out = child.stdout.as_mut().expect("stdout");
        std::io::BufReader::new(out).read_line(&mut line).expect("read ready");
        assert_eq!(line.trim(), format!("ready {count}"), "hold could not open its connections");
        Hold(child)
    }

    /// Lets go, and says what the daemon answered on each connection.
    fn release(mut self) -> Value {
        use std::io::{Read, Write};
        let _ = self.0.stdin.take().expect("stdin").write_all(b"\n");
        let mut text = String::new();
        let _ = self.0.stdout.take().expect("stdout").read_to_string(&mut text);
        serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {text}"))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Open file descriptors and resident memory (KiB) of a process.
fn fds_and_rss(pid: i32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// Root's `ctl status` answers within `within`.
fn answers_root_within(d: &Daemon, within: Duration, what: &str) {
    let started = Instant::now();
    let out = d.ctl(&["--json", "ls", "status"]);
    assert!(out.status.success(), "{what}: root's status failed: {}", stderr(&out));
    assert!(started.elapsed() < within, "{what}: root waited {:?}", started.elapsed());
}

const API_LIMITS: &str = "[api]\nmax_connections = 64\nmax_connections_per_uid = 8\nheader_timeout_ms = 3000\n\
                          body_timeout_ms = 1000\nidle_timeout_ms = 10000\nmax_body_kb = 64\n";

#[test]
fn no_local_user_can_lock_out_the_operator() {
    use std::os::unix::process::CommandExt;
    if !sandbox_ready("no_local_user_can_lock_out_the_operator") {
        return;
    }
    let fx = Fixture::new("serve-flood");
    let d = Daemon::start(&fx, &config(&fx, API_LIMITS));
    let (fds0, rss0) = fds_and_rss(d.pid());

    // 1,100 idle connections from a uid with no role: each answered 403 as it connects, so
    // none of them holds a descriptor of the daemon.
    let nobody = Hold::start(65534, &d.socket, 1100, "", 0);
    let (fds, rss) = fds_and_rss(d.pid());
    eprintln!("1,100 idle no-role connections: daemon fds {fds0} -> {fds}, RSS {rss0} -> {rss} KiB");
    assert!(fds < fds0 + 80, "no-role connections hold daemon descriptors: {fds0} -> {fds}");
    answers_root_within(&d, Duration::from_secs(5), "under 1,100 idle no-role connections");
    let id = d.submit("main");
    let got = nobody.release();
    assert_eq!(got["status"]["403"], 1100, "every no-role connection gets a 403: {got}");
    assert!(got["bodies"][0].as_str().is_some_and(|b| b.contains("uid 65534") && b.contains("has no role")), "{got}");

    // A storm of connections from the same uid keeps the socket's backlog full: root's
    // client waits its turn in the kernel's queue rather than failing.
    let storm = Command::new(env!("CARGO_BIN_EXE_hold"))
        .arg(&d.socket)
        .args(["storm", "4"])
        .uid(65534)
        .gid(65534)
        .stdout(Stdio::piped())
        .spawn()
        .expect("storm");
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        answers_root_within(&d, Duration::from_secs(5), "during a connect storm");
    }
    let stormed = storm.wait_with_output().expect("storm");
    eprintln!("connect storm: {} connections in 4 s", String::from_utf8_lossy(&stormed.stdout).trim());

    // 100 half-sent 2 MB bodies from the same uid: refused before the body, so not buffered.
    let post = "POST /v1/tasks HTTP/1.1\\r\\nHost: agentd\\r\\nContent-Type: application/json\\r\\n\
                Content-Length: 2000000\\r\\n\\r\\n";
    let bodies = Hold::start(65534, &d.socket, 100, post, 1_000_000);
    let (fds, rss) = fds_and_rss(d.pid());
    eprintln!("100 half-sent 2 MB bodies without a role: daemon fds {fds0} -> {fds}, RSS {rss0} -> {rss} KiB");
    assert!(rss < rss0 + 30 * 1024, "the daemon buffered bodies of callers with no role: {rss0} -> {rss} KiB");
    answers_root_within(&d, Duration::from_secs(5), "under half-sent bodies");
    let got = bodies.release();
    assert_eq!(got["status"]["403"], 100, "{got}");

    // A role holder is held to its share: 8 connections, the rest answered 503 before a read.
    let viewer = Hold::start(1000, &d.socket, 100, "GET /v1/status HTTP/1.1\\r\\nX-Slow: ", 0);
    let (fds, rss) = fds_and_rss(d.pid());
    eprintln!("100 slow connections of a role holder: daemon fds {fds0} -> {fds}, RSS {rss0} -> {rss} KiB");
    assert!(fds < fds0 + 80, "{fds0} -> {fds}");
    answers_root_within(&d, Duration::from_secs(5), "under a role holder's 100 slow connections");
    // Its refused connections had their answers; a moment later (the daemon lets a refused
    // client finish its request for 250 ms) its next one is refused with the reason.
    std::thread::sleep(Duration::from_millis(400));
    let out = d.ctl_as(Some((1000, 1000, &[][..])), &["ls", "agents"]);
    assert!(
        stderr(&out).contains("503") && stderr(&out).contains("api.max_connections_per_uid"),
        "the ninth connection of uid 1000 is refused, and says why: {}",
        stderr(&out)
    );
    // Past the header timeout (3 s), the eight admitted ones are closed.
    std::thread::sleep(Duration::from_millis(3600));
    let got = viewer.release();
    assert_eq!(got["status"]["503"], 92, "{got}");
    assert_eq!(got["closed"], 8, "the admitted slow clients were cut at the header timeout: {got}");
    assert!(d.ctl_as(Some((1000, 1000, &[][..])), &["ls", "agents"]).status.success(), "uid 1000 may connect again");

    // Bodies: over the route's limit (refused on its Content-Length), on a route that takes
    // none, and one that stalls past body_timeout_ms.
    let big = "POST /v1/tasks HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 600000\\r\\n\\r\\n";
    let got = Hold::start(1000, &d.socket, 1, big, 0).release();
    assert_eq!(got["status"]["413"], 1, "{got}");
    let nobody = "GET /v1/status HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 5\\r\\n\\r\\n";
    let got = Hold::start(1000, &d.socket, 1, nobody, 5).release();
    assert_eq!(got["status"]["413"], 1, "{got}");
    let stall = "POST /v1/tasks HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 1000\\r\\n\\r\\n{\"agent\":";
    let h = Hold::start(1000, &d.socket, 1, stall, 0);
    std::thread::sleep(Duration::from_millis(1400));
    let got = h.release();
    assert_eq!(got["status"]["408"], 1, "{got}");
    // A body dripped one byte per write on every connection the uid may hold: each write
    // is its own frame, and the daemon keeps the bytes, not the frames.
    let (_, rss0) = fds_and_rss(d.pid());
    let drip = "POST /v1/tasks HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 60000\\r\\n\\r\\n";
    let h = Hold::start_with(1000, &d.socket, 8, drip, 0, 2.0);
    let (_, rss) = fds_and_rss(d.pid());
    let got = h.release();
    eprintln!("8 bodies dripped a byte per write for 2 s: RSS {rss0} -> {rss} KiB, {} bytes taken", got["written"]);
    assert!(got["written"].as_u64() > Some(100_000), "the daemon took the drip: {got}");
    assert!(rss < rss0 + 16 * 1024, "dripped bodies cost the daemon {rss0} -> {rss} KiB");

    // Every refusal is counted.
    let st = d.json(&["ls", "status"]);
    let c = &st["connections"]["refused"];
    eprintln!("refusals: {c}");
    assert!(c["no_role"].as_u64() >= Some(1200), "{st}");
    assert!(c["per_uid_limit"].as_u64() >= Some(93), "{st}");
    assert!(c["header_timeout"].as_u64() >= Some(8), "{st}");
    assert!(c["body_too_large"].as_u64() >= Some(2) && c["body_timeout"].as_u64() >= Some(1), "{st}");
    d.wait_task(&id, "succeeded", |t| t["state"] == "succeeded");
}

#[test]
fn a_stalled_client_is_cut_at_the_idle_timeout() {
    if !sandbox_ready("a_stalled_client_is_cut_at_the_idle_timeout") {
        return;
    }
    let fx = Fixture::new("serve-idle");
    let limits = API_LIMITS
        .replace("body_timeout_ms = 1000", "body_timeout_ms = 30000")
        .replace("idle_timeout_ms = 10000", "idle_timeout_ms = 1500");
    let d = Daemon::start(&fx, &config(&fx, &limits));
    // A body that stops: the body deadline is 30 s, but nothing moved for 1.5 s.
    let stall = "POST /v1/tasks HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 1000\\r\\n\\r\\n{\"agent\":";
    let h = Hold::start(1000, &d.socket, 1, stall, 0);
    std::thread::sleep(Duration::from_millis(2500));
    let got = h.release();
    assert_eq!(got["closed"], 1, "{got}");
    let st = d.json(&["ls", "status"]);
    assert_eq!(st["connections"]["refused"]["idle_timeout"], 1, "{st}");
}

/// One request on a connection of its own, as root: the status and the JSON answer.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read");
    let status = got.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let json = got.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null);
    (status, json)
}

#[test]
fn lists_are_pages_of_what_the_caller_may_see_and_the_store_is_never_loaded_whole() {
    if !sandbox_ready("lists_are_pages_of_what_the_caller_may_see_and_the_store_is_never_loaded_whole") {
        return;
    }
    let fx = Fixture::new("serve-pages");
    // Tasks that answer at once (no calls), and queues that take them all.
    let path = config_with(
        &fx,
        &[
            ("calls = 2", "calls = 0"),
            ("[limits]\n", "[limits]\nmax_queued_tasks = 5000\n"),
            ("[agents.main]\n", "[agents.main]\nmax_queued_tasks = 5000\nmax_queued_per_uid = 5000\n"),
        ],
    );
    let mut d = Daemon::start(&fx, &path);
    // 1,200 tasks of 60 KB each: some 70 MB of task text in the store.
    let text = "x".repeat(60_000);
    let body = serde_json::json!({ "agent": "main", "task": text }).to_string();
    for i in 0..1200 {
        let (status, v) = http(&d.socket, "POST", "/v1/tasks", &body);
        assert_eq!(status, 202, "submit {i}: {v}");
    }
    let until = Instant::now() + Duration::from_secs(120);
    while d.json(&["ls", "status"])["queued_tasks"] != 0 || d.json(&["ls", "status"])["running_tasks"] != 0 {
        assert!(Instant::now() < until, "the tasks did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A fresh start reads the store one record at a time.
    let sent = Command::new("kill").args(["-TERM", &d.pid().to_string()]).status().expect("kill");
    assert!(sent.success() && d.wait_exit(Duration::from_secs(10)));
    d.restart();
    let (_, rss0) = fds_and_rss(d.pid());
    eprintln!("after a restart over 1,200 tasks of 60 KB: RSS {rss0} KiB");
    assert!(rss0 < 64 * 1024, "the daemon loaded the store at start: {rss0} KiB");

    // A peer with no tasks of its own: an empty page, read from its own (empty) range.
    for _ in 0..20 {
        let out = d.ctl_as(Some((1000, 1000, &[][..])), &["--json", "ls", "tasks"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("json");
        assert!(v["tasks"].as_array().is_some_and(Vec::is_empty) && v["next"].is_null(), "{v}");
    }
    let (_, rss) = fds_and_rss(d.pid());
    eprintln!("after 20 lists by a peer with no tasks: RSS {rss} KiB");
    assert!(rss < rss0 + 8 * 1024, "{rss0} -> {rss} KiB");

    // Root pages through everything: each task once, in order, memory bounded by a page.
    let (mut seen, mut after, mut peak) = (Vec::<String>::new(), None::<String>, rss0);
    loop {
        let q = after.as_ref().map_or(String::new(), |a| format!("&after={a}"));
        let (status, v) = http(&d.socket, "GET", &format!("/v1/tasks?limit=100{q}"), "");
        assert_eq!(status, 200, "{v}");
        let page = v["tasks"].as_array().expect("tasks");
        assert!(page.len() <= 100);
        seen.extend(page.iter().map(|t| t["id"].as_str().expect("id").to_string()));
        peak = peak.max(fds_and_rss(d.pid()).1);
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    eprintln!("paging through 1,200 tasks, 100 at a time: peak RSS {peak} KiB");
    assert_eq!(seen.len(), 1200);
    // Many large pages at once: each shows only summaries, and a few are read at a time.
    let (_, v) = http(&d.socket, "GET", "/v1/tasks?limit=1", "");
    let first = &v["tasks"][0];
    assert!(first["task"].as_str().is_some_and(|t| t.len() == 200) && first["task_truncated"] == true, "{first}");
    assert_eq!(first["call_count"], 0, "{first}");
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let socket = d.socket.clone();
            std::thread::spawn(move || {
                http(&socket, "GET", "/v1/tasks?limit=1000", "").1["tasks"].as_array().map(Vec::len)
            })
        })
        .collect();
    let mut burst_peak = 0;
    while !burst.iter().all(std::thread::JoinHandle::is_finished) {
        burst_peak = burst_peak.max(fds_and_rss(d.pid()).1);
        std::thread::sleep(Duration::from_millis(5));
    }
    for b in burst {
        assert_eq!(b.join().expect("list"), Some(1000));
    }
    eprintln!("16 pages of 1,000 at once: peak RSS {burst_peak} KiB");
    assert!(burst_peak < rss0 + 96 * 1024, "{rss0} -> {burst_peak} KiB");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "pages are in order, without repeats");
    assert!(peak < rss0 + 48 * 1024, "{rss0} -> {peak} KiB");
    // Filters and bounds.
    let (_, v) = http(&d.socket, "GET", "/v1/tasks?state=succeeded&limit=5", "");
    assert_eq!(v["tasks"].as_array().map(Vec::len), Some(5), "{v}");
    let (_, v) = http(&d.socket, "GET", "/v1/tasks?state=queued", "");
    assert!(v["tasks"].as_array().is_some_and(Vec::is_empty) && v["next"].is_null(), "{v}");
    let (status, v) = http(&d.socket, "GET", "/v1/tasks?limit=0", "");
    assert!(status == 400 && v["error"]["message"].as_str().is_some_and(|m| m.contains("limit")), "{v}");
    let (_, v) = http(&d.socket, "GET", "/v1/tasks?agent=other", "");
    assert!(v["tasks"].as_array().is_some_and(Vec::is_empty), "{v}");
}

#[test]
fn after_kill_9_a_call_that_never_started_is_recorded_as_not_run_and_its_task_starts_over() {
    if !sandbox_ready("after_kill_9_a_call_that_never_started_is_recorded_as_not_run_and_its_task_starts_over") {
        return;
    }
    let fx = Fixture::new("serve-kill9-waiting");
    // One sandbox worker, two task loops: the second task's call waits for the worker.
    let path = config_with(&fx, &[("max_running_tasks = 1", "max_running_tasks = 2\nmax_concurrent_calls = 1")]);
    let mut d = Daemon::start(&fx, &path);
    std::fs::write(&d.step, "sleep 986.125\n").expect("write step");
    let busy = d.submit("main");
    d.wait_task(&busy, "in a call", |t| t["calls"].as_array().is_some_and(|c| !c.is_empty()));
    let waiting = d.submit("other");
    let t = d.wait_task(&waiting, "waiting for a worker", |t| t["calls"].as_array().is_some_and(|c| !c.is_empty()));
    let never = t["calls"][0].as_str().unwrap_or_default().to_string();
    let calls = d.json(&["ls", "calls", "--task", &waiting]);
    assert_eq!(calls["calls"][0]["phase"], "waiting", "{calls}");
    let until = Instant::now() + Duration::from_secs(20);
    while d.json(&["ls", "calls", "--task", &busy])["calls"][0]["phase"] != "handed" {
        assert!(Instant::now() < until, "the running call is never recorded as handed to a worker");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.kill9();
    std::fs::write(&d.step, "echo back\n").expect("write step");
    d.restart();
    // The task whose call ran is failed; the one whose call never started runs again.
    assert_eq!(d.json(&["status", &busy])["state"], "failed");
    let t = d.wait_task(&waiting, "succeeded after the restart", |t| t["state"] == "succeeded");
    assert!(t["calls"].as_array().is_some_and(|c| c.len() == 3), "the old call and two new ones: {t}");
    let calls = d.json(&["ls", "calls", "--task", &waiting]);
    let old = &calls["calls"][0];
    assert_eq!(old["call_id"], never.as_str());
    assert!(old["in_flight"] == false && old["error"].as_str().is_some_and(|e| e.starts_with("not run")), "{old}");
    let recs = audit_records(&d.audit);
    let mine: Vec<&Value> = recs.iter().filter(|r| r["call_id"] == never.as_str()).collect();
    assert!(
        mine.len() == 1 && mine[0]["details"]["not_run"] == true && mine[0]["details"].get("signal").is_none(),
        "one record, saying it did not run (not that it was killed): {mine:?}"
    );
    assert!(!recs.iter().any(|r| r["call_id"] == never.as_str() && r["kind"] == "call_start"));
    let events = d.ctl(&["watch", &waiting]);
    assert!(stderr(&events).contains("queued again"), "the events say it started over: {}", stderr(&events));
    verify(&d.audit);
}

/// A call with a network grant, run by the daemon's worker (in a namespace the worker
/// prepared): the granted server answers, and its connection is in the audit log under the
/// call's id; another port does not answer.
#[test]
fn a_workers_call_reaches_its_grant_and_nothing_else() {
    if !sandbox_ready("a_workers_call_reaches_its_grant_and_nothing_else") {
        return;
    }
    let fx = Fixture::new("serve-net");
    let banner = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = banner.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut s in banner.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut s, b"BANNER-from-the-host\n");
        }
    });
    let cfg = config(&fx, "");
    let text = std::fs::read_to_string(&cfg).expect("config");
    let manifest = text
        .lines()
        .find_map(|l| l.strip_prefix("manifest = \"").and_then(|m| m.strip_suffix('"')))
        .expect("the agent's manifest")
        .to_string();
    let mut m = std::fs::OpenOptions::new().append(true).open(&manifest).expect("manifest");
    std::io::Write::write_all(&mut m, format!("\n[tools.sh.net]\nconnect = [\"127.0.0.1:{port}\"]\n").as_bytes())
        .expect("grant");
    let d = Daemon::start(&fx, &cfg);
    let other = port.wrapping_add(1).max(1);
    let connect = |p: u16| {
        format!("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(PeerAddr=>\"127.0.0.1:{p}\",Timeout=>3) or die \"connect {p}: $!\\n\"; print <$s>'")
    };
    std::fs::write(&d.step, format!("{}; {}\n", connect(port), connect(other))).expect("step");
    let out = d.ctl(&["--json", "submit", "main", "reach the host", "--watch"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    // The banner (21 bytes) came back; the second connect failed, so the step did.
    let results: Vec<&Value> = events.iter().filter(|e| e["kind"] == "tool_result").map(|e| &e["data"]).collect();
    assert!(!results.is_empty(), "{events:?}");
    assert!(results.iter().all(|r| r["stdout_bytes"] == 21 && r["exit_code"] != 0), "{results:?}");
    let call_ids: Vec<String> = events
        .iter()
        .filter(|e| e["kind"] == "tool_call")
        .filter_map(|e| e["data"]["call_id"].as_str().map(String::from))
        .collect();
    let recs = audit_records(&d.audit);
    for c in &call_ids {
        let mine: Vec<&Value> = recs.iter().filter(|r| r["call_id"] == c.as_str()).collect();
        let forwarded = mine
            .iter()
            .any(|r| r["kind"] == "connect" && r["details"]["via"] == "forwarder" && r["details"]["connected"] == true);
        assert!(forwarded, "call {c}: no forwarded connection recorded: {mine:?}");
        // (The other port is refused by Landlock's port rules here, before any program that
        // records; recording those denials is issue 19's.)
    }
    verify(&d.audit);
}
