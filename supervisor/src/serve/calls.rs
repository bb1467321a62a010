//! Tool calls of the daemon: a pool of sandbox workers ([`super::worker`]), one call each
//! at a time, fed from one queue.
//!
//! - The host limit is the number of workers (`limits.max_concurrent_calls`).
//! - Each agent has its own limit (`agents.NAME.max_concurrent_calls`) over all its tasks.
//! - Waiting calls are taken round-robin over agents, oldest first within an agent: an agent
//!   with many tasks cannot starve one with few.
//!
//! Each worker is owned by one thread of the daemon that lives as long as the daemon: the
//! worker gets SIGKILL when that thread (the daemon) dies, and its calls die with it. A
//! worker that dies, or does not answer by its call's deadline (the tool's timeout and
//! [`GRACE`]), is killed and restarted; what the call left is killed by its cgroup, the call
//! is reported as failed, and the audit log gets its summary (or, if the worker wrote one
//! before failing, a `killed` record).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::Value;

use super::worker::WorkRequest;
use agentd_sandbox::cgroup::Cgroups;

/// A result for a call that never reached a sandbox.
pub fn not_run(call_id: &str, tool: &str, why: &str) -> Value {
    agentd_sandbox::runner::refused_value(call_id, tool, why)
}

/// Time a worker has beyond the tool's own timeout to answer: building the sandbox, killing
/// a tool that ran out of time, and recording it.
pub const GRACE: Duration = Duration::from_secs(30);

/// One call for the pool.
#[derive(Debug)]
pub struct Call {
    /// Which agent's limit it counts against.
    pub agent: String,
    /// What the worker runs.
    pub work: WorkRequest,
    /// How long its worker may take to answer (the tool's timeout and [`GRACE`]).
    pub deadline: Duration,
    /// Run when a worker is about to be given the call (to record the hand-off).
    pub handoff: Option<Handoff>,
}

/// What records a call's hand-off to a worker.
pub struct Handoff(pub Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoff")
    }
}

struct Pending {
    call: Call,
    reply: SyncSender<Value>,
}

#[derive(Default)]
struct Sched {
    /// Waiting calls per agent.
    queues: HashMap<String, VecDeque<Pending>>,
    /// Agents with waiting calls, in turn order.
    turn: VecDeque<String>,
    /// Calls running per agent.
    running: HashMap<String, usize>,
    /// Running calls: call id → agent.
    in_flight: HashMap<String, String>,
    /// No new calls (draining).
    closed: bool,
    /// Calls cancelled before they reached the pool (a client that cancels at once), and
    /// when: they are refused if they come. Forgotten after [`EARLY_CANCEL`].
    cancelled_early: HashMap<String, Instant>,
}

/// How long a cancel that came before its call is remembered.
const EARLY_CANCEL: Duration = Duration::from_secs(60);

impl Sched {
    /// The next call to run: the first agent in turn order that is under its limit.
    fn next(&mut self, limits: &HashMap<String, usize>) -> Option<Pending> {
        let pos = self.turn.iter().position(|a| {
            self.running.get(a).copied().unwrap_or(0) < limits.get(a).copied().unwrap_or(1)
                && self.queues.get(a).is_some_and(|q| !q.is_empty())
        })?;
        let agent = self.turn.remove(pos)?;
        let q = self.queues.get_mut(&agent)?;
        let p = q.pop_front()?;
        if !q.is_empty() {
            self.turn.push_back(agent.clone());
        }
        *self.running.entry(agent.clone()).or_default() += 1;
        self.in_flight.insert(p.call.work.call_id.clone(), agent);
        Some(p)
    }
}

/// The pool; clones share it.
#[derive(Clone)]
pub struct Calls {
    shared: Arc<(Mutex<Sched>, Condvar)>,
    limits: Arc<HashMap<String, usize>>,
    cgroups: Arc<Cgroups>,
    audit_log: Arc<PathBuf>,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls").field("limits", &self.limits).finish_non_exhaustive()
    }
}

impl Calls {
    /// Starts `workers` sandbox workers recording into `audit_log`; `limits` are the agents'.
    pub fn start(
        workers: usize,
        audit_log: PathBuf,
        limits: HashMap<String, usize>,
        cgroups: Cgroups,
    ) -> std::io::Result<Self> {
        Self::start_with(&std::env::current_exe()?, workers, audit_log, limits, cgroups)
    }

    /// The same with the worker program `exe` (run as `exe __serve-worker --audit-log LOG`).
    fn start_with(
        exe: &std::path::Path,
        workers: usize,
        audit_log: PathBuf,
        limits: HashMap<String, usize>,
        cgroups: Cgroups,
    ) -> std::io::Result<Self> {
        let calls = Self {
            shared: Arc::new((Mutex::new(Sched::default()), Condvar::new())),
            limits: Arc::new(limits),
            cgroups: Arc::new(cgroups),
            audit_log: Arc::new(audit_log.clone()),
        };
        for i in 0..workers {
            let c = calls.clone();
            let (exe, log) = (exe.to_path_buf(), audit_log.clone());
            std::thread::Builder::new().name(format!("agentd-worker-{i}")).spawn(move || c.own_worker(&exe, &log))?;
        }
        Ok(calls)
    }

    fn lock(&self) -> MutexGuard<'_, Sched> {
        self.shared.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `call` when its turn comes and returns its result (a refusal if the pool is
    /// closed or its worker died).
    pub fn run(&self, call: Call) -> Value {
        let (reply, rx) = mpsc::sync_channel(1);
        let (id, tool) = (call.work.call_id.clone(), call.work.tool.clone());
        {
            let mut s = self.lock();
            if s.closed {
                return not_run(&id, &tool, "agentd serve is stopping and takes no new calls");
            }
            if s.cancelled_early.remove(&id).is_some() {
                return not_run(&id, &tool, "cancelled before it started");
            }
            let agent = call.agent.clone();
            s.queues.entry(agent.clone()).or_default().push_back(Pending { call, reply });
            if !s.turn.contains(&agent) {
                s.turn.push_back(agent);
            }
        }
        self.shared.1.notify_all();
        rx.recv().unwrap_or_else(|_| not_run(&id, &tool, "the call was dropped by the daemon"))
    }

    /// Cancels a call: a waiting one is answered at once, a running one is killed (its
    /// result then says so). Returns whether it was found.
    pub fn cancel(&self, call_id: &str, why: &str) -> bool {
        let mut s = self.lock();
        for q in s.queues.values_mut() {
            if let Some(i) = q.iter().position(|p| p.call.work.call_id == call_id) {
                if let Some(p) = q.remove(i) {
                    let _ = p.reply.send(not_run(call_id, &p.call.work.tool, why));
                }
                return true;
            }
        }
        let running = s.in_flight.contains_key(call_id);
        if !running {
            // Not here yet (or over): if it comes, it is refused.
            s.cancelled_early.retain(|_, at| at.elapsed() < EARLY_CANCEL);
            s.cancelled_early.insert(call_id.to_string(), Instant::now());
        }
        drop(s);
        // The worker may not have made the call's cgroup yet, and on a loaded host it may take
        // a while: kill until the call is over. That is bounded by the call's own deadline
        // (its worker is killed then), so no other time limit applies here: a limit shorter
        // than a slow sandbox start would let a cancelled call run on.
        while running && self.lock().in_flight.contains_key(call_id) {
            self.cgroups.kill_call(call_id, Duration::from_millis(200));
            std::thread::sleep(Duration::from_millis(20));
        }
        running
    }

    /// Calls running now.
    pub fn in_flight(&self) -> Vec<String> {
        self.lock().in_flight.keys().cloned().collect()
    }

    /// Stops taking calls: waiting ones are refused at once, running ones go on.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        for (_, q) in s.queues.drain() {
            for p in q {
                let _ = p.reply.send(not_run(&p.call.work.call_id, &p.call.work.tool, "agentd serve is stopping"));
            }
        }
        s.turn.clear();
        drop(s);
        self.shared.1.notify_all();
    }

    /// Waits until no call runs, or `deadline`; returns the calls still running.
    pub fn wait_idle(&self, deadline: Instant) -> Vec<String> {
        let mut s = self.lock();
        while !s.in_flight.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .shared
                .1
                .wait_timeout(s, left.min(Duration::from_millis(50)))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        s.in_flight.keys().cloned().collect()
    }

    /// The thread that owns one worker: takes calls, runs them on it, restarts it if it dies.
    fn own_worker(&self, exe: &std::path::Path, audit_log: &std::path::Path) {
        let mut worker: Option<(Child, ChildStdin, BufReader<ChildStdout>)> = None;
        loop {
            let mut pending = {
                let mut s = self.lock();
                loop {
                    if let Some(p) = s.next(&self.limits) {
                        break p;
                    }
                    s = self.shared.1.wait(s).unwrap_or_else(std::sync::PoisonError::into_inner);
                }
            };
            let id = pending.call.work.call_id.clone();
            if let Some(h) = pending.call.handoff.take() {
                (h.0)();
            }
            if worker.is_none() {
                worker = spawn_worker(exe, audit_log)
                    .map_err(|e| tracing::error!(error = %e, "starting a sandbox worker"))
                    .ok();
            }
            let result = match worker.as_mut().map(|w| exchange(w, &pending.call.work, pending.call.deadline)) {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    tracing::error!(call_id = %id, error = %e, "a sandbox worker failed; restarting it");
                    if let Some((mut child, _, _)) = worker.take() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                    // Whatever the call left is killed (the worker that ran it is gone).
                    self.cgroups.kill_call(&id, Duration::from_secs(2));
                    self.cgroups.remove_call(&id);
                    let why = format!("the sandbox worker failed during the call, so it was killed: {e}");
                    let details = serde_json::json!({ "error": why, "killed": true });
                    // The call's summary, unless the worker wrote it before failing (then a
                    // `killed` record says what happened after).
                    let summary = !has_summary(&self.audit_log, &id);
                    super::record_kill(&self.audit_log, &id, &pending.call.work.tool, details, summary);
                    not_run(&id, &pending.call.work.tool, &why)
                }
                None => not_run(&id, &pending.call.work.tool, "no sandbox worker could be started"),
            };
            self.done(&pending.call.agent, &id);
            let _ = pending.reply.send(result);
        }
    }

    /// A call of `agent` no longer runs: its place is free.
    fn done(&self, agent: &str, id: &str) {
        {
            let mut s = self.lock();
            s.in_flight.remove(id);
            if let Some(n) = s.running.get_mut(agent) {
                *n = n.saturating_sub(1);
            }
        }
        self.shared.1.notify_all();
    }
}

fn spawn_worker(
    exe: &std::path::Path,
    audit_log: &std::path::Path,
) -> std::io::Result<(Child, ChildStdin, BufReader<ChildStdout>)> {
    let mut cmd = Command::new(exe);
    cmd.arg("__serve-worker").arg("--audit-log").arg(audit_log);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    crate::sys::die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        return Err(std::io::Error::other("the worker has no pipes"));
    };
    Ok((child, stdin, BufReader::new(stdout)))
}

/// Sends `req` to the worker and reads its answer, waiting at most `deadline` for it to
/// begin.
fn exchange(
    w: &mut (Child, ChildStdin, BufReader<ChildStdout>),
    req: &WorkRequest,
    deadline: Duration,
) -> Result<Value, String> {
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(w.1, "{line}").and_then(|()| w.1.flush()).map_err(|e| format!("writing to the worker: {e}"))?;
    // The answer is one line, and the deadline holds until its end: a worker that wrote part
    // of a line and hung is treated as one that never answered.
    let until = Instant::now() + deadline;
    let mut answer = Vec::new();
    loop {
        let buffered = w.2.buffer();
        if let Some(end) = buffered.iter().position(|b| *b == b'\n') {
            answer.extend_from_slice(&buffered[..end]);
            w.2.consume(end + 1);
            return serde_json::from_slice(&answer).map_err(|e| format!("the worker's answer is not JSON: {e}"));
        }
        let n = buffered.len();
        answer.extend_from_slice(buffered);
        w.2.consume(n);
        let left = until.saturating_duration_since(Instant::now());
        // At the deadline, one last look without waiting: an answer that just came counts.
        let ms = if left.is_zero() { 0 } else { i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX) };
        let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
        let ready = match poll(&mut [PollFd::new(w.2.get_ref().as_fd(), PollFlags::POLLIN)], timeout) {
            Ok(n) => n,
            // A signal: look again (the deadline is still kept).
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(format!("waiting for the worker: {}", std::io::Error::from(e))),
        };
        if ready == 0 {
            if left.is_zero() {
                let part = if answer.is_empty() { "" } else { " (only part of an answer came)" };
                return Err(format!("the worker did not answer within {} s{part}", deadline.as_secs()));
            }
            continue;
        }
        // Readable: one read, which does not block.
        match w.2.fill_buf() {
            Ok([]) => return Err("the worker exited".into()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading from the worker: {e}")),
        }
    }
}

/// Whether the audit log has `call_id`'s summary: read from the end back to the call's
/// start record (or, for a call that never wrote one, to records older than an hour).
fn has_summary(audit_log: &std::path::Path, call_id: &str) -> bool {
    use agentd_audit::Kind;
    let since = super::store::now_ms().saturating_sub(3_600_000);
    let mut found = false;
    let _ = agentd_audit::scan_back(audit_log, |r| {
        if r.call_id == call_id {
            found = r.kind == Kind::Summary;
            return !found && r.kind != Kind::CallStart;
        }
        agentd_audit::ts_ms(r).is_none_or(|t| t >= since)
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(agent: &str, id: &str) -> (Pending, mpsc::Receiver<Value>) {
        let (reply, rx) = mpsc::sync_channel(1);
        let work =
            WorkRequest { call_id: id.into(), manifest: PathBuf::new(), tool: "t".into(), args: Default::default() };
        (Pending { call: Call { agent: agent.into(), work, deadline: GRACE, handoff: None }, reply }, rx)
    }

    fn push(s: &mut Sched, agent: &str, id: &str) -> mpsc::Receiver<Value> {
        let (p, rx) = pending(agent, id);
        s.queues.entry(agent.into()).or_default().push_back(p);
        if !s.turn.iter().any(|a| a == agent) {
            s.turn.push_back(agent.into());
        }
        rx
    }

    /// A fake worker program: a shell script that writes its pid to `pidfile`, reads one
    /// request and then does `then`.
    fn fake_worker(dir: &std::path::Path, name: &str, then: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let exe = dir.join(name);
        let pidfile = dir.join(format!("{name}.pid"));
        std::fs::write(&exe, format!("#!/bin/sh\necho $$ > {}\nread line\n{then}\n", pidfile.display()))
            .expect("write the fake worker");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        exe
    }

    /// A worker that never answers is killed at its call's deadline, and one that dies is
    /// noticed; either way the call fails with the reason, the worker process is gone, and
    /// the audit log has the call's summary and still verifies.
    #[test]
    fn a_hung_or_dead_worker_is_killed_and_its_call_recorded() {
        let dir = std::env::temp_dir().join(format!("agentd-calls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let audit = dir.join("audit.jsonl");
        for (name, then, deadline, says) in [
            ("hang", "exec sleep 600", Duration::from_millis(300), "did not answer within"),
            (
                "half",
                "printf '{\"exit_code\": 0'; exec sleep 600",
                Duration::from_millis(300),
                "only part of an answer",
            ),
            ("die", "exit 3", GRACE, "the worker exited"),
        ] {
            let exe = fake_worker(&dir, name, then);
            let limits: HashMap<String, usize> = [("a".to_string(), 1)].into();
            let calls = Calls::start_with(&exe, 1, audit.clone(), limits, Cgroups::detect()).expect("start");
            let (pending, _) = pending("a", &format!("call-{name}"));
            let started = Instant::now();
            let result = calls.run(Call { deadline, ..pending.call });
            assert!(started.elapsed() < Duration::from_secs(10), "{name}: the call was answered in time");
            let error = result["error"].as_str().unwrap_or_default();
            assert!(error.contains(says), "{name}: the result says why: {error}");
            let pid = std::fs::read_to_string(dir.join(format!("{name}.pid"))).expect("pid");
            let alive = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .is_ok_and(|st| !st.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'));
            assert!(!alive, "{name}: the worker process is gone");
            let records = std::fs::read_to_string(&audit).expect("audit log");
            assert!(
                records.lines().any(|l| l.contains(&format!("\"call-{name}\"")) && l.contains("\"summary\"")),
                "{name}: the call has a summary record"
            );
        }
        let report = agentd_audit::verify(&audit).expect("verify");
        assert!(
            matches!(report.outcome, agentd_audit::Outcome::Intact),
            "the audit log verifies: {:?}",
            report.outcome
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A worker that failed after writing its call's summary gets a `killed` record, not a
    /// second summary: the log is searched for one first.
    #[test]
    fn a_summary_already_written_is_found() {
        let dir = std::env::temp_dir().join(format!("agentd-calls-summary-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = dir.join("audit.jsonl");
        let mut log = agentd_audit::AuditLog::open(&audit).expect("open");
        let entry = |id: &str, kind| {
            agentd_audit::Entry::new(id, "t", kind, agentd_audit::Verdict::Allowed, serde_json::json!({}))
        };
        log.append(&[entry("done", agentd_audit::Kind::Summary), entry("started", agentd_audit::Kind::Exec)])
            .expect("append");
        assert!(has_summary(&audit, "done"));
        assert!(!has_summary(&audit, "started"), "a call with only other records has no summary");
        assert!(!has_summary(&audit, "do"), "ids match whole");
        assert!(!has_summary(&dir.join("missing.jsonl"), "done"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Round-robin over agents, oldest first within one, and each agent's limit holds: an
    /// agent with many waiting calls does not starve one with a single call.
    #[test]
    fn calls_are_taken_round_robin_under_each_agents_limit() {
        let limits: HashMap<String, usize> = [("busy".to_string(), 2), ("quiet".to_string(), 1)].into();
        let mut s = Sched::default();
        let _rx: Vec<_> = (0..10).map(|i| push(&mut s, "busy", &format!("b{i}"))).collect();
        let _q = push(&mut s, "quiet", "q0");
        let order: Vec<String> = std::iter::from_fn(|| s.next(&limits)).map(|p| p.call.work.call_id).collect();
        assert_eq!(order, ["b0", "q0", "b1"], "busy is held to 2 running calls, and quiet's call goes second");
        // busy's first call ends: its next one may run.
        s.in_flight.remove("b0");
        if let Some(n) = s.running.get_mut("busy") {
            *n -= 1;
        }
        assert_eq!(s.next(&limits).map(|p| p.call.work.call_id).as_deref(), Some("b2"));
        assert!(s.next(&limits).is_none(), "busy is at its limit again and quiet has nothing waiting");
    }
}
