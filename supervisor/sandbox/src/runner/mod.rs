//! Running one call to completion: cgroup, spawn, bounded output, timeout, reaping, cleanup.

mod output;
mod result;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use agentd_policy::{error_chain, ExecPlan, NetMode};
use tracing::{info, warn};

use self::output::Stream;
pub use self::output::Tee;
pub use self::result::{BpfReport, CallResult, Enforcement, EventCounts, Timing};
use agentd_policy::LossAction;

use crate::cgroup::Applied;
use crate::host::Host;
use crate::spawn::{self, NetnsPool, Spawned};
use crate::sys::{self, Exit};
use agentd_audit::bpf::{self, Bpf, Layer};
use agentd_audit::{AuditError, AuditLog, Entry, Fields, Kind, Verdict};
use agentd_net::{Inside, Network, ResolverConfig};

/// Exit code when the timeout fired.
pub const EXIT_TIMEOUT: i32 = 124;
/// Exit code when agentd refused or failed before the tool ran.
pub const EXIT_REFUSED: i32 = 125;

/// How a call's output is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputMode {
    /// Captured only (for `--json`).
    Capture,
    /// Captured and streamed to agentd's own stdout/stderr.
    Stream,
    /// The tool's stdin and stdout are agentd's own, not captured (an MCP server speaking
    /// over them); stderr is captured and streamed.
    Stdio,
}

/// A result for a call that never ran.
pub fn refused(plan: Option<&ExecPlan>, call_id: &str, tool: &str, exit_code: i32, error: String) -> CallResult {
    CallResult {
        call_id: call_id.to_string(),
        agent: plan.map(|p| p.agent.clone()).unwrap_or_default(),
        tool: tool.to_string(),
        argv: plan.map(|p| p.argv.clone()).unwrap_or_default(),
        exit_code,
        ok: false,
        signal: None,
        timed_out: false,
        oom_killed: false,
        duration_ms: 0,
        memory_peak_bytes: None,
        pids_peak: None,
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        stdout_bytes: 0,
        stderr_bytes: 0,
        error: Some(error),
        enforcement: Enforcement::none(plan),
        events: EventCounts::default(),
        timing: Timing::default(),
    }
}

/// [`refused`] as the JSON object `agentd exec --json` prints: what the agent loop and the
/// daemon pass around for a call that never reached a sandbox.
pub fn refused_value(call_id: &str, tool: &str, error: &str) -> serde_json::Value {
    serde_json::to_value(refused(None, call_id, tool, EXIT_REFUSED, error.to_string())).unwrap_or_default()
}

/// A call refused before it had a plan, with its summary recorded in `log` (a failure to
/// record it is logged).
pub fn refuse_recorded(log: &mut AuditLog, call_id: &str, tool: &str, error: String) -> CallResult {
    let r = refused(None, call_id, tool, EXIT_REFUSED, error);
    if let Err(e) = log.append(&[summary_entry(&r)]) {
        warn!(call_id, error = %error_chain(&e), "the refusal could not be recorded");
    }
    r
}

/// Runs calls on one host: records each in the audit log (before it starts and after it
/// ends), and prepares network namespaces ahead when it runs many.
#[derive(Debug)]
pub struct Runner<'h> {
    host: &'h Host,
    audit: Option<AuditLog>,
    pool: Option<NetnsPool>,
    bpf: Option<Bpf>,
    /// SIGINT, SIGTERM and SIGHUP, blocked and read here for as long as the runner lives:
    /// a request to stop ends the running call (and is seen between calls too).
    signals: Option<OwnedFd>,
    /// Where names of network grants are looked up, read at the first call that needs it.
    resolver: Option<std::sync::Arc<ResolverConfig>>,
}

impl<'h> Runner<'h> {
    /// A runner that neither audits nor prepares anything.
    pub fn new(host: &'h Host) -> Self {
        Self { host, audit: None, pool: None, bpf: None, signals: None, resolver: None }
    }

    /// Records every call in `log`; a call whose start cannot be recorded does not run.
    pub fn with_audit(mut self, log: AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    /// Puts every call under agentd's BPF programs (events recorded, exact network grants).
    pub fn with_bpf(mut self, bpf: Bpf) -> Self {
        self.bpf = Some(bpf);
        self
    }

    /// Prepares each isolated call's network namespace after the previous call.
    pub fn with_netns_pool(mut self, pool: NetnsPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Runs the call described by `plan` and returns its result. Never panics on tool
    /// behaviour; every failure of agentd itself becomes a result with `exit_code` 125
    /// (126/127 for a program that cannot be executed) and `error` set.
    pub fn run(&mut self, plan: &ExecPlan, mode: OutputMode) -> CallResult {
        if let Some(log) = self.audit.as_mut() {
            if let Err(e) = log.append_buffered(&[start_entry(plan)]) {
                let msg = format!("refusing the call: its start could not be recorded: {}", error_chain(&e));
                return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, msg);
            }
        }
        let signals = match &self.signals {
            Some(fd) => fd,
            None => match sys::signalfd(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP]) {
                Ok(fd) => self.signals.insert(fd),
                Err(e) => {
                    return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, format!("signalfd: {e}"))
                }
            },
        };
        let resolver = match (&self.resolver, plan.network.mode) {
            (Some(r), _) => Some(r.clone()),
            (None, NetMode::Forwarded) => match ResolverConfig::from_env() {
                Ok(cfg) => Some(self.resolver.insert(std::sync::Arc::new(cfg)).clone()),
                Err(e) => {
                    let msg = format!("refusing the call: agentd's resolver: {}", error_chain(&e));
                    return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, msg);
                }
            },
            (None, NetMode::Isolated) => None,
        };
        let mut events = EventLog::new(self.audit.as_mut(), plan);
        let ctx = Context { host: self.host, signals: signals.as_fd(), resolver };
        let mut result = run_call(plan, &ctx, mode, self.pool.as_mut(), self.bpf.as_mut(), &mut events);
        if let Err(e) = events.flush(true) {
            let msg = format!("the call's events could not all be recorded: {}", error_chain(&e));
            result.error = Some(result.error.take().map_or(msg.clone(), |p| format!("{p}; {msg}")));
        }
        result.events = events.counts();
        if let Some(log) = self.audit.as_mut() {
            if let Err(e) = log.append(&[summary_entry(&result)]) {
                warn!(call_id = %plan.call_id, error = %error_chain(&e), "the call's summary could not be recorded");
                let msg = format!("the call's summary could not be recorded: {}", error_chain(&e));
                result.error = Some(match result.error.take() {
                    Some(prev) => format!("{prev}; {msg}"),
                    None => msg,
                });
            }
        }
        if let Some(pool) = self.pool.as_mut() {
            if let Err(e) = pool.prepare() {
                warn!(error = %e, "could not prepare a network namespace for the next call");
            }
        }
        result
    }
}

/// The record written before a call starts.
pub fn start_entry(plan: &ExecPlan) -> Entry {
    let mut details = serde_json::json!({
        "agent": plan.agent,
        "argv": plan.argv,
        "uid": plan.identity.uid,
        "network": plan.network.mode,
        "landlock_abi": plan.landlock.abi_used,
        "timeout_ms": plan.timeout_ms,
    });
    if !plan.learn.is_empty() {
        // Learn mode: the call sees more than its manifest grants, and the record says what.
        details["learn"] = serde_json::json!(plan.learn);
    }
    Entry::new(&plan.call_id, &plan.tool, Kind::CallStart, Verdict::Allowed, details)
}

/// The record written after a call ends (or was refused).
pub fn summary_entry(r: &CallResult) -> Entry {
    let ran = r.enforcement.identity.is_some();
    let details = serde_json::json!({
        "exit_code": r.exit_code,
        "signal": r.signal,
        "timed_out": r.timed_out,
        "oom_killed": r.oom_killed,
        "duration_ms": r.duration_ms,
        "memory_peak_bytes": r.memory_peak_bytes,
        "pids_peak": r.pids_peak,
        "stdout_bytes": r.stdout_bytes,
        "stderr_bytes": r.stderr_bytes,
        "error": r.error,
        "landlock": r.enforcement.landlock.status,
        "bpf": r.enforcement.bpf.layer,
        "events": r.events.total,
        "denied_events": r.events.denied,
        "lost_events": r.events.lost,
    });
    let verdict = if ran { Verdict::Allowed } else { Verdict::Denied };
    Entry::new(&r.call_id, &r.tool, Kind::Summary, verdict, details)
}

/// The change record of a successful open for writing (`O_WRONLY`, `O_RDWR`, `O_CREAT` or
/// `O_TRUNC`), the first of its path in the call.
fn first_write(open: &Entry, written: &mut std::collections::HashSet<String>) -> Option<Entry> {
    let d = open.details.fields()?;
    let flags = d.get("flags")?.as_u64()?;
    if open.kind != Kind::Open || !agentd_audit::opens_for_writing(flags) || d.get("result")?.as_i64()? < 0 {
        return None;
    }
    if !written.insert(d.get_str("path")?.to_string()) {
        return None;
    }
    let mut details = d.only(&["path", "path_source", "result", "pid", "hook"]);
    details.insert("operation", "write");
    details.insert("flags", flags);
    Some(Entry::new(&open.call_id, &open.tool, Kind::Change, Verdict::Allowed, details))
}

/// What an open's record says, for the record of its repeats, when the kernel counts them
/// (keyed as `REPEATS` values name it: the first record's time and the thread).
fn tracked(ev: &agentd_ebpf_common::Event, entry: &Entry) -> Option<((u64, u32), Fields)> {
    if ev.info & agentd_ebpf_common::REPEAT_TRACKED == 0 {
        return None;
    }
    let keep = ["path", "path_source", "path_truncated", "outside_root", "pid", "flags", "result"];
    Some(((ev.arg, ev.tid), entry.details.fields()?.only(&keep)))
}

/// Events of one call, streamed into the audit log in batches while it runs.
struct EventLog<'a> {
    audit: Option<&'a mut AuditLog>,
    call_id: String,
    tool: String,
    pending: Vec<Entry>,
    /// Thread id → (index in `pending`, when it arrived) of a syscall attempt awaiting its
    /// result.
    awaiting: std::collections::HashMap<u32, (usize, std::time::Instant)>,
    counts: EventCounts,
    started: bool,
    /// The call runs under Landlock: an `EACCES` is its refusal (or a file mode's).
    landlock: bool,
    /// Files the call has opened for writing: the first such open of each is also a change.
    written: std::collections::HashSet<String>,
    /// Opens whose repeats the kernel counts, by the key's (`first_ts`, thread id): what
    /// their record said, for the record of the count.
    tracked: std::collections::HashMap<(u64, u32), Fields>,
}

impl<'a> EventLog<'a> {
    fn new(audit: Option<&'a mut AuditLog>, plan: &ExecPlan) -> Self {
        Self {
            audit,
            call_id: plan.call_id.clone(),
            tool: plan.tool.clone(),
            pending: Vec::new(),
            awaiting: std::collections::HashMap::new(),
            counts: EventCounts::default(),
            started: false,
            landlock: plan.landlock.abi_used > 0,
            written: std::collections::HashSet::new(),
            tracked: std::collections::HashMap::new(),
        }
    }

    /// Remembers what an open's record says, when the kernel counts its repeats.
    fn track(&mut self, ev: &agentd_ebpf_common::Event, entry: &Entry) {
        if let Some((key, summary)) = tracked(ev, entry) {
            self.tracked.insert(key, summary);
        }
    }

    /// The record of a count of repeated opens (read from the kernel when the call ended):
    /// the same thread opened the file of an earlier record, with the same flags, `count`
    /// more times, between that record and `last_ktime_ns`.
    fn push_repeats(&mut self, key: &agentd_ebpf_common::RepeatKey, c: &agentd_ebpf_common::RepeatCount) {
        if c.count == 0 {
            return;
        }
        let mut d = match self.tracked.get(&(c.first_ts, key.tid)) {
            Some(first) => first.clone(),
            // Its first record was lost (counted as such): the count still says what it can.
            None => {
                let mut d = Fields::new();
                d.insert("path", "");
                d.insert("path_source", "none");
                d.insert("flags", key.flags);
                d
            }
        };
        d.insert("tid", key.tid);
        d.insert("repeats", c.count);
        d.insert("repeat_of_ktime_ns", c.first_ts);
        d.insert("last_ktime_ns", c.last_ts);
        d.insert("ktime_ns", c.last_ts);
        d.insert("hook", "tracepoint");
        let entry = Entry::new(&self.call_id, &self.tool, Kind::Open, Verdict::Allowed, d);
        self.pending.push(entry);
        self.counts.total += c.count;
    }

    fn push(&mut self, ev: &agentd_ebpf_common::Event) {
        use agentd_ebpf_common::{EV_CHANGE, EV_EXEC, EV_EXEC_DONE, EV_NAME, EV_OPEN, EV_RESULT, FROM_LSM};
        // Before its first exec, the call's process is agentd's own code setting up the
        // sandbox (opening the grants it mounts): not the tool's actions.
        if !self.started {
            if ev.kind == EV_RESULT {
                // Its later repeats (agentd's own opens of the same file, by the same thread)
                // are counted: their record names it.
                let entry = bpf::late_result(ev, &self.call_id, &self.tool, self.landlock);
                self.track(ev, &entry);
            }
            if ev.kind != EV_EXEC {
                return;
            }
            self.started = true;
        }
        self.counts.ring += 1;
        // The fallback's later word on an attempt recorded a moment ago (same batch, nearly
        // always), by thread: a second name or a directory, a result, or the file a
        // successful exec ran (found by the thread that called exec). One already written
        // keeps its record as it was.
        let held = match ev.kind {
            EV_NAME | EV_RESULT => Some(ev.tid),
            EV_EXEC_DONE => Some(ev.target),
            _ => None,
        };
        if let Some(tid) = held {
            let slot = if ev.kind == EV_NAME { self.awaiting.get(&tid).copied() } else { self.awaiting.remove(&tid) };
            let (mut write, mut track) = (None, None);
            match slot.and_then(|(i, _)| self.pending.get_mut(i)) {
                Some(entry) => {
                    let was_denied = entry.verdict == Verdict::Denied;
                    match ev.kind {
                        EV_NAME => bpf::add_name(entry, ev),
                        EV_RESULT => {
                            bpf::add_kernel_path(entry, ev);
                            bpf::add_result(entry, ev.ret, self.landlock);
                            write = first_write(entry, &mut self.written);
                            track = tracked(ev, entry);
                        }
                        _ => {
                            bpf::add_kernel_path(entry, ev);
                            bpf::add_result(entry, 0, self.landlock);
                        }
                    }
                    if !was_denied && entry.verdict == Verdict::Denied {
                        self.counts.denied += 1;
                    }
                    if let Some(w) = write {
                        self.push_entry(w);
                    }
                    if let Some((key, summary)) = track {
                        self.tracked.insert(key, summary);
                    }
                    return;
                }
                // An exec whose attempt is not here still ran: recorded on its own.
                None if ev.kind == EV_EXEC_DONE => {}
                // A result after its attempt was written (the syscall took longer than the
                // hold: a blocking open): recorded on its own, with what the kernel named.
                None if ev.kind == EV_RESULT => {
                    let entry = bpf::late_result(ev, &self.call_id, &self.tool, self.landlock);
                    self.track(ev, &entry);
                    self.push_entry(entry);
                    return;
                }
                None => return,
            }
        }
        let entry = bpf::to_entry(ev, &self.call_id, &self.tool);
        self.counts.total += 1;
        if entry.verdict == Verdict::Denied {
            self.counts.denied += 1;
        }
        if ev.info & FROM_LSM == 0 && matches!(ev.kind, EV_EXEC | EV_OPEN | EV_CHANGE) {
            self.awaiting.insert(ev.tid, (self.pending.len(), std::time::Instant::now()));
        }
        self.pending.push(entry);
        if self.pending.len() >= 4096 {
            if let Err(e) = self.flush(false) {
                warn!(error = %error_chain(&e), "could not record a batch of events");
            }
        }
    }

    /// One of the call's network events, as a `connect` or `resolve` record.
    fn push_net(&mut self, e: agentd_net::Event) {
        let kind = match e.kind {
            agentd_net::EventKind::Connect | agentd_net::EventKind::Inbound => Kind::Connect,
            agentd_net::EventKind::Resolve => Kind::Resolve,
        };
        let verdict = if e.allowed { Verdict::Allowed } else { Verdict::Denied };
        let mut details = serde_json::to_value(&e).unwrap_or_default();
        if e.kind == agentd_net::EventKind::Inbound {
            details["direction"] = "inbound".into();
        }
        let entry = Entry::new(&self.call_id, &self.tool, kind, verdict, details);
        self.push_entry(entry);
    }

    /// Adds a record that did not come from the BPF layer (the Unix-socket gate's refusals).
    fn push_entry(&mut self, entry: Entry) {
        self.counts.total += 1;
        if entry.verdict == Verdict::Denied {
            self.counts.denied += 1;
        }
        self.pending.push(entry);
    }

    /// Writes the pending records. Unless `last`, an attempt whose result has not arrived yet
    /// (and the records after it) is held back for up to [`HOLD`], so that its record can
    /// carry the result, unless that holds back more than [`HOLD_MAX`] records; a result that
    /// comes later is a record of its own.
    fn flush(&mut self, last: bool) -> Result<(), AuditError> {
        const HOLD: std::time::Duration = std::time::Duration::from_millis(250);
        const HOLD_MAX: usize = 16_384;
        let cut = if last || self.pending.len() >= HOLD_MAX {
            self.pending.len()
        } else {
            self.awaiting
                .values()
                .filter(|(_, at)| at.elapsed() < HOLD)
                .map(|(i, _)| *i)
                .min()
                .unwrap_or(self.pending.len())
        };
        let batch: Vec<Entry> = self.pending.drain(..cut).collect();
        self.awaiting.retain(|_, (i, _)| {
            if *i < cut {
                return false;
            }
            *i -= cut;
            true
        });
        match self.audit.as_mut() {
            Some(log) if !batch.is_empty() => log.append_buffered(&batch).map(drop),
            _ => Ok(()),
        }
    }

    fn counts(&self) -> EventCounts {
        self.counts
    }
}

/// The BPF side of a running call.
struct Watch<'a> {
    bpf: &'a mut Bpf,
    cgroup_id: u64,
    kill_on_loss: bool,
}

impl Watch<'_> {
    /// The call is over and its cgroup gone: its last events and its counts of repeated opens
    /// go into `log`, and the call is forgotten. Returns how many of its events were lost.
    fn end(&mut self, log: &mut EventLog<'_>) -> u64 {
        self.bpf.drain(self.cgroup_id, usize::MAX, |ev| log.push(&ev));
        for (k, c) in self.bpf.take_repeats(self.cgroup_id) {
            log.push_repeats(&k, &c);
        }
        self.bpf.unregister(self.cgroup_id)
    }
}

/// What every call of a runner shares.
struct Context<'a> {
    host: &'a Host,
    signals: BorrowedFd<'a>,
    resolver: Option<std::sync::Arc<ResolverConfig>>,
}

fn run_call(
    plan: &ExecPlan,
    ctx: &Context<'_>,
    mode: OutputMode,
    pool: Option<&mut NetnsPool>,
    bpf: Option<&mut Bpf>,
    log: &mut EventLog<'_>,
) -> CallResult {
    let host = ctx.host;
    if let Some(why) = &host.bpf_blocked {
        return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, format!("refusing the call: {why}"));
    }
    if let Some(r) = plan.unmet_requirement() {
        let msg = format!("refusing the call: {} is required but not available on this host ({})", r.feature, r.note);
        return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, msg);
    }
    // Network grants: the call's namespace is prepared here, with agentd's listeners in it,
    // and the call is born into it.
    let mut own_pool = None;
    let mut pool = pool;
    let mut network = None;
    if let (NetMode::Forwarded, Some(resolver)) = (plan.network.mode, &ctx.resolver) {
        // A one-shot call has no pool: it makes its namespace here.
        let made = match pool.take() {
            Some(p) => Ok(p),
            None => NetnsPool::new().map(|p| own_pool.insert(p)),
        }
        .and_then(|p| p.in_prepared(|| Inside::setup(&plan.network).map_err(std::io::Error::other)).map(|i| (p, i)))
        .map_err(|e| error_chain(&e))
        .and_then(|(p, inside)| {
            Network::new(&plan.network, inside, resolver.clone()).map(|n| (p, n)).map_err(|e| error_chain(&e))
        });
        match made {
            Ok((p, n)) => (pool, network) = (Some(p), Some(n)),
            Err(e) => {
                let msg = format!("refusing the call: setting up its network: {e}");
                return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, msg);
            }
        }
    }
    let setup = Instant::now();
    let mut cgroup = match host.cgroups.create(&plan.call_id, &plan.cgroup) {
        Ok(cg) => cg,
        Err(e) => return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, error_chain(&e)),
    };
    // The BPF programs must know the call before its tool runs.
    let mut watch = match (bpf, cgroup.id()) {
        // An MCP server's sandbox (its stdio is agentd's) may serve a whole session of calls,
        // told apart by their records' times: every open of it is recorded on its own.
        (Some(bpf), Some(cgroup_id)) => match bpf.register_counting(cgroup_id, &plan.bpf, mode != OutputMode::Stdio) {
            Ok(()) => Some(Watch { bpf, cgroup_id, kill_on_loss: plan.bpf.on_audit_loss == LossAction::Kill }),
            Err(e) => {
                let _ = bpf.unregister(cgroup_id);
                let _ = cgroup.remove();
                return refused(Some(plan), &plan.call_id, &plan.tool, EXIT_REFUSED, error_chain(&e));
            }
        },
        _ => None,
    };
    let start = Instant::now();
    let deadline = start + Duration::from_millis(plan.timeout_ms);
    let spawned = match spawn::spawn(plan, &mut cgroup, deadline, pool, mode == OutputMode::Stdio) {
        Ok(s) => s,
        Err(e) => {
            // As at a call's end: the cgroup first, so nothing of the call still acts while
            // its counts are read.
            let _ = cgroup.remove();
            if let Some(w) = watch.as_mut() {
                w.end(log);
            }
            return refused(Some(plan), &plan.call_id, &plan.tool, e.exit_code(), error_chain(&e));
        }
    };
    info!(call_id = %plan.call_id, tool = %plan.tool, pid = spawned.pid, "call started");
    if let Some(w) = watch.as_mut() {
        w.bpf.set_init(w.cgroup_id, u32::try_from(spawned.pid).unwrap_or(0));
    }
    let Spawned { pidfd, stdout, stderr, exit_report, landlock, no_new_privs, .. } = spawned;
    let tee = |t: Tee| if mode == OutputMode::Capture { Tee::None } else { t };
    let mut out = Stream::new(stdout, plan.output_bytes, tee(Tee::Stdout));
    let mut err = Stream::new(stderr, plan.output_bytes, tee(Tee::Stderr));
    let mut waited = supervise(
        &pidfd,
        ctx.signals,
        Streams { out: &mut out, err: &mut err },
        deadline,
        &cgroup,
        watch.as_mut(),
        network.as_mut(),
        log,
    );
    // The call is over: what was still open, and repeated refusals, go into the log.
    for e in network.map(Network::close).unwrap_or_default() {
        log.push_net(e);
    }

    let oom_killed = cgroup.oom_kills() > 0;
    let (memory_peak_bytes, pids_peak) = cgroup.peaks();
    // The cgroup goes first (removal waits until nothing of the call is left), so no process
    // of the call can act after its rules are gone; then its last events are read.
    if let Err(e) = cgroup.remove() {
        warn!(call_id = %plan.call_id, error = %error_chain(&e), "call cgroup left behind");
    }
    if let Some(w) = watch.as_mut() {
        log.counts.lost = w.end(log);
    }
    let bpf_report = if let Some(w) = watch.as_ref() {
        let layer = w.bpf.layer();
        let mut note = w.bpf.note().map(|n| format!("no BPF LSM: {n}"));
        if layer == Layer::Fallback && !plan.bpf.deny_open.is_empty() {
            let n = note.get_or_insert_with(String::new);
            n.push_str(if n.is_empty() { "" } else { "; " });
            n.push_str("audit.deny_open is not enforced without BPF LSM (opens are recorded)");
        }
        if let Some(gap) = w.bpf.gap() {
            let n = note.get_or_insert_with(String::new);
            n.push_str(if n.is_empty() { "" } else { "; " });
            n.push_str(gap);
        }
        BpfReport { layer: layer.name(), active: w.bpf.programs(), mode: Some(plan.bpf.mode), note }
    } else {
        BpfReport::none(host.bpf_note.clone().unwrap_or_else(|| "agentd's BPF layer is not loaded".into()))
    };
    if waited.exit.is_some() {
        // init is reaped, so its end of the report pipe is closed: this read cannot block.
        let report = init_report(exit_report, waited.exit);
        waited.exit = report.exit;
        for (tid, path) in &report.refused {
            let details = serde_json::json!({ "path": path, "tid": tid, "hook": "gate", "errno": "EACCES" });
            log.push_entry(Entry::new(&plan.call_id, &plan.tool, Kind::UnixConnect, Verdict::Denied, details));
        }
        if report.refused_uncounted > 0 {
            let details = serde_json::json!({ "refused_not_recorded": report.refused_uncounted, "hook": "gate" });
            log.push_entry(Entry::new(&plan.call_id, &plan.tool, Kind::UnixConnect, Verdict::Denied, details));
        }
    }
    // Spawn to reaped exit; relaying output to a slow reader afterwards does not count.
    let ended = waited.reaped_at.unwrap_or_else(Instant::now);
    let duration_ms = u64::try_from(ended.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX);
    let timing = Timing { cgroup_setup: start - setup, spawn_to_reaped: ended.saturating_duration_since(start) };

    let (exit_code, signal) = match waited.exit {
        _ if waited.timed_out => (EXIT_TIMEOUT, signal_of(waited.exit)),
        Some(Exit::Code(c)) => (c, None),
        Some(Exit::Signal(s)) => (128 + s, Some(s)),
        None => (EXIT_REFUSED, None),
    };
    let error = waited.error.or_else(|| waited.exit.is_none().then(|| "the call could not be reaped".to_string()));
    let applied = Applied {
        version: plan.cgroup.flavor,
        memory_bytes: plan.cgroup.memory_bytes,
        pids: plan.cgroup.pids,
        cpu_quota_us: plan.cgroup.cpu_quota_us,
        cpu_period_us: plan.cgroup.cpu_period_us,
    };
    info!(call_id = %plan.call_id, exit_code, timed_out = waited.timed_out, oom_killed, duration_ms, "call finished");
    CallResult {
        call_id: plan.call_id.clone(),
        agent: plan.agent.clone(),
        tool: plan.tool.clone(),
        argv: plan.argv.clone(),
        exit_code,
        ok: signal.is_none()
            && !waited.timed_out
            && !oom_killed
            && error.is_none()
            && plan.ok_exit.contains(&exit_code),
        signal,
        timed_out: waited.timed_out,
        oom_killed,
        duration_ms,
        memory_peak_bytes,
        pids_peak,
        stdout: out.text(),
        stderr: err.text(),
        stdout_truncated: out.truncated(),
        stderr_truncated: err.truncated(),
        stdout_bytes: out.total(),
        stderr_bytes: err.total(),
        error,
        enforcement: Enforcement::applied(plan, landlock, no_new_privs, applied, bpf_report),
        events: EventCounts::default(),
        timing,
    }
}

/// What init reported: how the tool ended, and the connects its Unix-socket gate refused.
#[derive(Debug, Default)]
struct InitReport {
    exit: Option<Exit>,
    /// (thread id in the call, path as the tool named it).
    refused: Vec<(u32, String)>,
    /// Refusals beyond those reported one by one.
    refused_uncounted: u32,
}

/// Parses init's report: `U` refusals (thread id u32, length u16, path), a `D` count of the
/// refusals not sent, then `C` or `S` with the tool's exit code or signal (i32). The exit is
/// init's own status when there is none (init was killed: timeout, OOM of init, or agentd
/// stopping the call).
fn init_report(mut report: File, init: Option<Exit>) -> InitReport {
    let mut msg = Vec::new();
    let _ = report.read_to_end(&mut msg);
    let mut r = InitReport { exit: init, ..InitReport::default() };
    let mut rest = msg.as_slice();
    while let Some((&kind, tail)) = rest.split_first() {
        let u32_at = |b: &[u8]| b.get(..4).map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]]));
        match kind {
            b'U' => {
                let (Some(tid), Some(len)) = (u32_at(tail), tail.get(4..6)) else { break };
                let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
                let Some(path) = tail.get(6..6 + len) else { break };
                r.refused.push((tid, String::from_utf8_lossy(path).into_owned()));
                rest = &tail[6 + len..];
            }
            b'D' => {
                let Some(n) = u32_at(tail) else { break };
                r.refused_uncounted = n;
                rest = &tail[4..];
            }
            b'C' | b'S' => {
                let Some(v) = u32_at(tail) else { break };
                let v = v as i32;
                r.exit = Some(if kind == b'S' { Exit::Signal(v) } else { Exit::Code(v) });
                break;
            }
            _ => break,
        }
    }
    r
}

fn signal_of(exit: Option<Exit>) -> Option<i32> {
    match exit {
        Some(Exit::Signal(s)) => Some(s),
        _ => None,
    }
}

struct Waited {
    exit: Option<Exit>,
    timed_out: bool,
    error: Option<String>,
    reaped_at: Option<Instant>,
}

/// The call's output pipes.
struct Streams<'a> {
    out: &'a mut Stream,
    err: &'a mut Stream,
}

/// How long to keep draining pipes after the tool's init has been reaped. Its pid namespace
/// is gone by then, so the pipes close at once unless something outside holds them.
const DRAIN: Duration = Duration::from_secs(2);

/// How often a watched call's events are drained (the programs wake agentd early only when a
/// ring buffer fills up).
const BPF_TICK_MS: i32 = 5;

/// How long relayed output may wait for a slow reader once the call has ended.
const RELAY_GRACE: Duration = Duration::from_secs(30);

fn poll_in(fd: Option<RawFd>, events: libc::c_short) -> libc::pollfd {
    libc::pollfd { fd: fd.unwrap_or(-1), events, revents: 0 }
}

/// Pumps output until the tool has exited and its pipes are closed, enforcing the deadline
/// and stopping the call if agentd itself is asked to stop. Relaying output to agentd's own
/// stdout/stderr happens here too, only when they poll writable.
#[allow(clippy::too_many_arguments)]
fn supervise(
    pidfd: &OwnedFd,
    signals: BorrowedFd<'_>,
    streams: Streams<'_>,
    deadline: Instant,
    cgroup: &crate::cgroup::CallCgroup,
    mut watch: Option<&mut Watch<'_>>,
    mut network: Option<&mut Network>,
    log: &mut EventLog<'_>,
) -> Waited {
    let Streams { out, err } = streams;
    let mut w = Waited { exit: None, timed_out: false, error: None, reaped_at: None };
    let kill = || {
        cgroup.kill();
        let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
    };
    loop {
        let now = Instant::now();
        if w.exit.is_none() && !w.timed_out && now >= deadline {
            w.timed_out = true;
            kill();
        }
        let mut wake = if w.exit.is_none() && !w.timed_out { deadline } else { now + DRAIN };
        if let Some(t) = w.reaped_at {
            if (out.pipe.is_some() || err.pipe.is_some()) && now >= t + DRAIN {
                // Something outside the call holds its pipes: stop reading, and make sure
                // nothing of the call survives.
                out.pipe = None;
                err.pipe = None;
                cgroup.kill();
            }
            if now >= t + RELAY_GRACE {
                let (o, e) = (out.abandon_relay(), err.abandon_relay());
                if o + e > 0 {
                    warn!(stdout_bytes = o, stderr_bytes = e, "output was not relayed: the reader stopped reading");
                }
            }
            let pipes_open = out.pipe.is_some() || err.pipe.is_some();
            let relaying = out.relay_fd().is_some() || err.relay_fd().is_some();
            if !pipes_open && !relaying {
                break;
            }
            wake = if pipes_open { t + DRAIN } else { t + RELAY_GRACE };
        }
        let mut timeout = i32::try_from(wake.saturating_duration_since(now).as_millis()).unwrap_or(i32::MAX).max(1);
        if watch.is_some() {
            // The programs wake agentd only when a ring fills up; it drains on this tick.
            timeout = timeout.min(BPF_TICK_MS);
        }
        if let Some(at) = network.as_ref().and_then(|n| n.next_deadline()) {
            let ms = at.saturating_duration_since(now).as_millis();
            timeout = timeout.min(i32::try_from(ms).unwrap_or(i32::MAX).max(1));
        }
        let mut fds = vec![
            poll_in(out.pipe.as_ref().map(|f| f.as_raw_fd()), libc::POLLIN),
            poll_in(err.pipe.as_ref().map(|f| f.as_raw_fd()), libc::POLLIN),
            poll_in(w.reaped_at.is_none().then(|| pidfd.as_raw_fd()), libc::POLLIN),
            poll_in(Some(signals.as_raw_fd()), libc::POLLIN),
            poll_in(out.relay_fd(), libc::POLLOUT),
            poll_in(err.relay_fd(), libc::POLLOUT),
            poll_in(watch.as_ref().map(|w| w.bpf.wake_fd()), libc::POLLIN),
        ];
        // The network's listeners, sockets and connections, after the fixed entries.
        if let Some(n) = network.as_ref() {
            fds.extend(n.pollfds());
        }
        if let Err(e) = sys::poll(&mut fds, timeout) {
            w.error = Some(format!("poll: {e}"));
            kill();
        }
        if let Some(n) = network.as_mut() {
            n.progress();
            for e in n.take_events() {
                log.push_net(e);
            }
        }
        let ready = |i: usize| fds[i].revents != 0;
        for (i, s) in [(0, &mut *out), (1, &mut *err)] {
            if ready(i) {
                if let Err(e) = s.pump() {
                    warn!(error = %e, "reading tool output");
                    s.pipe = None;
                }
            }
            if ready(i + 4) {
                s.relay_some();
            }
        }
        if let Some(wt) = watch.as_mut() {
            wt.bpf.drain(wt.cgroup_id, 65_536, |ev| log.push(&ev));
        }
        // Into the log at once (no disk flush): a killed agentd loses no event.
        if let Err(e) = log.flush(false) {
            w.error = Some(format!("the call's events could not be recorded, so it was killed: {}", error_chain(&e)));
            kill();
        }
        if let Some(wt) = watch.as_mut() {
            if wt.kill_on_loss && w.reaped_at.is_none() && w.error.is_none() && wt.bpf.lost(wt.cgroup_id) > 0 {
                w.error = Some("events of the call were lost and on_audit_loss = \"kill\": the call was killed".into());
                kill();
            }
        }
        if ready(3) {
            sys::drain(signals);
            w.error = Some("agentd was asked to stop; the call was killed".into());
            kill();
        }
        if w.reaped_at.is_none() && (ready(2) || w.error.is_some()) {
            match sys::wait_pidfd(pidfd.as_fd()) {
                Ok(exit) => w.exit = Some(exit),
                Err(e) => w.error = Some(format!("waiting for the call: {e}")),
            }
            w.reaped_at = Some(Instant::now());
        }
    }
    w
}
