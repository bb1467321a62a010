//! `agentd serve`: one daemon hosts many agents, shares one model between them, and takes
//! work over a local control API.
//!
//! - [`store`]: tasks, their events and calls, durable in `STATE_DIR/tasks.redb`;
//! - [`calls`] and [`worker`]: tool calls, run by single-threaded sandbox workers, under
//!   host and per-agent limits, round-robin over agents;
//! - `agentd_model::shared`: the shared model (batched in-process, a server, or scripted)
//!   and the KV memory budget;
//! - [`tasks`]: accepting (or refusing as busy), queueing, running, cancelling;
//! - [`conn`]: who may hold a connection, how many and for how long (before any handler);
//! - [`api`]: HTTP/JSON over the Unix socket, with roles from peer credentials;
//! - [`client`]: the other end of the socket, for `agentd ctl` and `agentd bench serve`.
//!
//! Start: the config is checked, then what a killed daemon left is cleaned up (its calls'
//! processes and cgroups; tasks it was running are marked failed with the reason; queued
//! ones are resumed), the BPF layer is loaded and pinned once, and the socket is bound.
//! SIGTERM (or SIGINT) drains: no new tasks or calls, running calls get until the deadline
//! and are then killed (and the audit log says so), running tasks end as failed, queued
//! tasks stay queued for the next start.

pub mod api;
pub mod calls;
pub mod client;
pub mod conn;
pub mod mcp;
pub mod store;
pub mod tasks;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_policy::serve::{parse_config, ServeConfig};
use serde_json::{json, Value};

use self::store::{State, Store, Write};
use self::tasks::{Agent, Tasks};
use agentd_audit::{AuditLog, Entry, Kind, Verdict};
use agentd_policy::error_chain;
use agentd_sandbox::cgroup::Cgroups;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The config or a manifest is invalid (every problem, one per line).
    #[error("{0}")]
    Config(String),
    /// Something the daemon needs failed.
    #[error("{what}: {reason}")]
    Setup {
        /// What was being done.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

fn setup(what: impl Into<String>) -> impl FnOnce(String) -> ServeError {
    let what = what.into();
    move |reason| ServeError::Setup { what, reason }
}

/// A config with its paths resolved and its agents' manifests loaded.
#[derive(Debug)]
pub struct Loaded {
    /// The config.
    pub cfg: ServeConfig,
    /// Its agents.
    pub agents: BTreeMap<String, Agent>,
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Reads and checks the config at `path` and every manifest it names; all problems at once.
pub fn load(path: &Path) -> Result<Loaded, ServeError> {
    let name = path.display().to_string();
    let src = std::fs::read_to_string(path)
        .map_err(|e| ServeError::Config(format!("{name}: error: cannot read the config: {e}")))?;
    let mut cfg = parse_config(&name, &src).map_err(|d| ServeError::Config(d.to_string()))?;
    let base = path.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    cfg.socket = resolve(&base, &cfg.socket).display().to_string();
    cfg.state_dir = resolve(&base, &cfg.state_dir).display().to_string();
    cfg.audit_log = resolve(&base, &cfg.audit_log).display().to_string();
    let mut agents = BTreeMap::new();
    let mut problems = Vec::new();
    for (agent, a) in &cfg.agents {
        let manifest_path = resolve(&base, &a.manifest);
        match crate::manifest::load_manifest(&manifest_path) {
            Ok(manifest) => {
                agents.insert(agent.clone(), Agent { cfg: a.clone(), manifest_path, manifest });
            }
            Err(lines) => {
                problems.push(format!("{name}: error: agent {agent}: its manifest is not valid:"));
                problems.extend(lines);
            }
        }
    }
    // One agent's files must not be another's: two manifests whose agents would run as the
    // same uid are refused, whether the ids are derived (names that collide, or the same name
    // twice) or written. Two config entries over one manifest file are one agent.
    let mut by_uid: BTreeMap<u32, (&str, PathBuf)> = BTreeMap::new();
    for (name, a) in &agents {
        let file = std::fs::canonicalize(&a.manifest_path).unwrap_or_else(|_| a.manifest_path.clone());
        match by_uid.insert(a.manifest.agent.uid, (name, file.clone())) {
            Some((other, other_file)) if other_file != file => problems.push(format!(
                "{}: error: agents {other} and {name} (manifests {} and {}) would both run as uid {}; give \
                 each its own name, or its own `agent.uid` and `agent.gid`",
                a.manifest_path.display(),
                other_file.display(),
                file.display(),
                a.manifest.agent.uid
            )),
            _ => {}
        }
    }
    if !problems.is_empty() {
        return Err(ServeError::Config(problems.join("\n")));
    }
    Ok(Loaded { cfg, agents })
}

/// The audit log's summary for `GET /v1/audit`: verification, and counts over the log.
pub fn audit_summary(path: &Path) -> Value {
    let verified = match agentd_audit::verify(path) {
        Ok(r) => json!(r),
        Err(e) => json!({ "error": format!("{}: {e}", path.display()) }),
    };
    let (mut calls, mut denied, mut lost, mut killed, mut refused) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut last = std::collections::VecDeque::new();
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            let Ok(r) = serde_json::from_str::<agentd_audit::Record>(line) else { continue };
            match r.kind {
                Kind::Summary => {
                    calls += 1;
                    denied += r.details["denied_events"].as_u64().unwrap_or(0);
                    lost += r.details["lost_events"].as_u64().unwrap_or(0);
                    if r.verdict == Verdict::Denied {
                        refused += 1;
                    }
                    last.push_back(json!({ "call_id": r.call_id, "tool": r.tool, "exit_code": r.details["exit_code"],
                                           "denied_events": r.details["denied_events"], "error": r.details["error"] }));
                    if last.len() > 20 {
                        last.pop_front();
                    }
                }
                Kind::Killed => killed += 1,
                _ => {}
            }
        }
    }
    json!({ "log": path, "verify": verified, "calls": calls, "refused_calls": refused, "denied_events": denied,
            "lost_events": lost, "killed_calls": killed, "recent": last })
}

/// Appends a record for a call the daemon killed.
pub(super) fn record_kill(audit: &Path, call_id: &str, tool: &str, details: Value, summary: bool) {
    let kind = if summary { Kind::Summary } else { Kind::Killed };
    let entry = Entry::new(call_id, tool, kind, Verdict::Denied, details);
    match AuditLog::open(audit) {
        Ok(mut log) => {
            if let Err(e) = log.append(&[entry]) {
                tracing::error!(call_id, error = %error_chain(&e), "the kill could not be recorded");
            }
        }
        Err(e) => tracing::error!(call_id, error = %error_chain(&e), "the audit log cannot be opened"),
    }
}

/// Cleans up after a daemon that was killed: calls it left in flight are killed and
/// recorded, tasks it was running are marked failed, and the ones it had queued are
/// returned (to be resumed). Also drops stale KV swap files.
fn recover(
    store: &Store,
    cgroups: &Cgroups,
    audit: &Path,
    state_dir: &Path,
) -> Result<Vec<store::TaskRecord>, ServeError> {
    let kv = state_dir.join("kv");
    if let Ok(dir) = std::fs::read_dir(&kv) {
        for f in dir.flatten() {
            let _ = std::fs::remove_file(f.path());
        }
    }
    let mut writes = Vec::new();
    let mut leftover = HashMap::new();
    // The store is read one record at a time; only what needs recovering is kept.
    let mut in_flight = Vec::new();
    store
        .each_call(|c| {
            if c.in_flight {
                in_flight.push(c);
            }
        })
        .map_err(|e| setup("reading the task store")(e.to_string()))?;
    let never_started = never_started(store, audit, &in_flight);
    writes.push(Write::Meta("boot", boot_id()));
    for mut c in in_flight {
        c.in_flight = false;
        if never_started.contains(&c.call_id) {
            // Nothing of it ran, so there is nothing to kill, and its task may start over.
            let why =
                "not run: agentd serve was stopped or killed while the call waited for a sandbox worker".to_string();
            tracing::info!(call_id = %c.call_id, "a call a killed daemon left had not started");
            record_kill(
                audit,
                &c.call_id,
                &c.tool,
                json!({ "exit_code": null, "not_run": true, "error": why, "events": 0, "denied_events": 0,
                        "lost_events": 0, "recovered_at_start": true }),
                true,
            );
            c.error = Some(why);
            writes.push(Write::Call(c));
            continue;
        }
        let found = cgroups.kill_call(&c.call_id, Duration::from_secs(5));
        cgroups.remove_call(&c.call_id);
        let why = format!(
            "agentd serve was stopped or killed during this call; at restart its {found} remaining processes were killed"
        );
        tracing::warn!(call_id = %c.call_id, found, "cleaned up a call a killed daemon left");
        record_kill(
            audit,
            &c.call_id,
            &c.tool,
            json!({ "exit_code": null, "signal": 9, "error": why, "killed_processes": found, "events": 0,
                    "denied_events": 0, "lost_events": 0, "recovered_at_start": true }),
            true,
        );
        c.error = Some(why);
        leftover.insert(c.task_id.clone(), c.call_id.clone());
        writes.push(Write::Call(c));
    }
    let swept = cgroups.sweep_stale(Duration::from_secs(60));
    if swept > 0 {
        tracing::info!(swept, "removed stale call cgroups");
    }
    let mut queued = Vec::new();
    let mut unfinished = Vec::new();
    store
        .each_task(|t| {
            if !t.state.is_final() {
                unfinished.push(t);
            }
        })
        .map_err(|e| setup("reading the task store")(e.to_string()))?;
    for mut t in unfinished {
        if t.state != State::Running {
            queued.push(t);
            continue;
        }
        let seq = store.events(&t.id, 0).ok().and_then(|e| e.last().map(|e| e.seq + 1)).unwrap_or(t.events);
        // A task none of whose calls reached a worker had no effect but thinking: it starts
        // over. One with a call that may have run is not repeated.
        let started: Vec<&String> = t
            .calls
            .iter()
            .filter(|id| {
                let not_run = |c: &store::CallRecord| c.phase == store::Phase::Waiting && !c.in_flight;
                !never_started.contains(*id) && store.call(id).ok().flatten().is_none_or(|c| !not_run(&c))
            })
            .collect();
        let (state, why) = if started.is_empty() {
            let why = format!(
                "agentd serve was stopped or killed while this task ran; none of its {} tool calls had started, so it was queued again",
                t.calls.len()
            );
            (State::Queued, why)
        } else {
            let mut why = format!(
                "agentd serve was stopped or killed while this task ran ({} tool calls started); it was not resumed, since its calls may have had effects",
                started.len()
            );
            if let Some(call) = leftover.get(&t.id) {
                why.push_str(&format!("; call {call} was in flight and was killed at restart"));
            }
            (State::Failed, why)
        };
        tracing::info!(task = %t.id, state = state.name(), "recovered a task a killed daemon was running");
        let mut data = json!({ "state": state });
        data[if state == State::Queued { "note" } else { "error" }] = json!(why);
        let ev = store::Event { seq, kind: "state".into(), at_ms: store::now_ms(), data };
        t.state = state;
        t.events = seq + 1;
        if state == State::Queued {
            t.started_ms = None;
        } else {
            t.finished_ms = Some(store::now_ms());
            t.error = Some(why);
        }
        writes.push(Write::Event(t.id.clone(), ev));
        writes.push(Write::Task(t.clone()));
        if state == State::Queued {
            queued.push(t);
        }
    }
    if !writes.is_empty() {
        store.write(writes).map_err(|e| setup("recording the recovery")(e.to_string()))?;
    }
    Ok(queued)
}

/// This boot of the host (`/proc/sys/kernel/random/boot_id`).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Of calls a killed daemon left in flight, those that never started. A call still
/// `waiting` in the store may have been given to a worker since (that record is not waited
/// for), so the audit log decides: a worker writes the call's `call_start` before anything of
/// it runs, with write(2), so on the same boot it is in the file even if agentd was killed
/// the moment after. A call without one never started. After a reboot (a power loss may
/// have taken records not yet on disk) nothing is taken as not started.
fn never_started(store: &Store, audit: &Path, in_flight: &[store::CallRecord]) -> std::collections::HashSet<String> {
    let mut waiting: std::collections::HashSet<String> =
        in_flight.iter().filter(|c| c.phase == store::Phase::Waiting).map(|c| c.call_id.clone()).collect();
    if waiting.is_empty() {
        return waiting;
    }
    let same_boot = store.meta("boot").ok().flatten().is_some_and(|b| !b.is_empty() && b == boot_id());
    if !same_boot {
        tracing::warn!(
            calls = waiting.len(),
            "the host rebooted since the last start: calls left waiting count as started"
        );
        return std::collections::HashSet::new();
    }
    // Back to a little before the earliest of them was recorded (clocks may step).
    let since = in_flight.iter().map(|c| c.started_ms).min().unwrap_or(0).saturating_sub(60_000);
    let scanned = agentd_audit::scan_back(audit, |r| {
        if r.kind == Kind::CallStart {
            waiting.remove(&r.call_id);
        }
        !waiting.is_empty() && agentd_audit::ts_ms(r).is_none_or(|t| t >= since)
    });
    if let Err(e) = scanned {
        tracing::warn!(error = %e, "reading the audit log's end: calls left waiting count as started");
        return std::collections::HashSet::new();
    }
    waiting
}

/// Runs the daemon until SIGTERM or SIGINT; returns the exit code.
pub fn run(config: &Path) -> Result<(), ServeError> {
    let Loaded { cfg, agents } = load(config)?;
    if crate::sys::geteuid() != 0 {
        return Err(setup("starting")("agentd serve must run as root: its tool calls run in sandboxes".into()));
    }
    crate::sys::harden_self().map_err(|e| setup("hardening agentd itself")(e.to_string()))?;
    descriptors(&cfg.api)?;
    let socket = PathBuf::from(&cfg.socket);
    let state_dir = PathBuf::from(&cfg.state_dir);
    let audit_log = PathBuf::from(&cfg.audit_log);
    make_private_dir(&state_dir)?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| setup(format!("creating {}", dir.display()))(e.to_string()))?;
    }
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        return Err(setup("binding the socket")(format!("another agentd serve is listening on {}", socket.display())));
    }
    drop(AuditLog::open(&audit_log).map_err(|e| setup("opening the audit log, so no call may run")(error_chain(&e)))?);
    let store = Store::open(&state_dir).map_err(|e| setup("opening the task store")(e.to_string()))?;
    let mut host = agentd_sandbox::host::Host::probe();
    let queued = recover(&store, &host.cgroups, &audit_log, &state_dir)?;
    // Loaded and pinned once, here; the workers join the pinned programs.
    let bpf_layer = match host.open_bpf() {
        Some(b) => b.layer().name().to_string(),
        None => format!("none ({})", host.bpf_note.clone().unwrap_or_default()),
    };
    tracing::info!(layer = %bpf_layer, "BPF layer");
    let backend = agentd_model::shared::Backend::load(&cfg.model, &state_dir)
        .map_err(|e| setup("loading the model")(e.to_string()))?;
    let limits: HashMap<String, usize> = agents.iter().map(|(n, a)| (n.clone(), a.cfg.max_concurrent_calls)).collect();
    let calls = calls::Calls::start(cfg.limits.max_concurrent_calls, audit_log.clone(), limits, host.cgroups.clone())
        .map_err(|e| setup("starting the sandbox workers")(e.to_string()))?;
    let tasks = Tasks::new(agents, store, calls, backend, cfg.limits);
    retain(Arc::clone(&tasks), cfg.limits);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agentd-api")
        .build()
        .map_err(|e| setup("starting the API runtime")(e.to_string()))?;
    runtime.block_on(serve(cfg, tasks, queued, socket, audit_log, host.cgroups.clone()))
}

/// File descriptors the daemon needs besides its connections: the store, the audit log,
/// workers' pipes, BPF maps and programs, refusals being answered.
const FD_RESERVE: u64 = 512;

/// Raises the soft `RLIMIT_NOFILE` to the hard one (systemd gives services 1,024 soft), and
/// refuses to start if even that cannot hold `api.max_connections` and the reserve: a daemon
/// that runs out of descriptors cannot answer its operator.
fn descriptors(api: &agentd_policy::serve::ApiLimits) -> Result<(), ServeError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| setup("reading RLIMIT_NOFILE")(e.to_string()))?;
    let need = api.max_connections as u64 + FD_RESERVE;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| setup("raising RLIMIT_NOFILE")(e.to_string()))?;
    }
    if hard < need {
        return Err(setup("checking file descriptors")(format!(
            "api.max_connections = {} needs {need} file descriptors, and RLIMIT_NOFILE allows {hard}; raise it (LimitNOFILE= in the unit) or lower api.max_connections",
            api.max_connections
        )));
    }
    tracing::debug!(soft = hard, need, "file descriptor limit");
    Ok(())
}

/// How often the task store is pruned (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Prunes the task store now and every [`PRUNE_EVERY`] (see [`Store::prune`]), and retries
/// final records it refused before, on a thread of its own that lives as long as the daemon.
fn retain(tasks: Arc<Tasks>, limits: agentd_policy::serve::HostLimits) {
    let prune = move || {
        tasks.store_unstored();
        let store = &tasks.store;
        let days = u64::try_from(limits.keep_finished_days).unwrap_or(u64::MAX);
        let cutoff = store::now_ms().saturating_sub(days.saturating_mul(86_400_000));
        match store.prune(limits.keep_finished_tasks, cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(n, "forgot ended tasks past the store's retention"),
            Err(e) => tracing::error!(error = %e, "pruning the task store"),
        }
    };
    let spawned = std::thread::Builder::new().name("agentd-prune".into()).spawn(move || loop {
        prune();
        std::thread::sleep(PRUNE_EVERY);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "starting the task store's pruning; the store is not pruned");
    }
}

/// Binds the socket in a directory only root can enter, makes it 0666 there (anyone may
/// connect; what they may do is decided by their credentials and the roles), and renames it
/// into place: no one can swap the path between the bind and the chmod.
fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let parent = socket.parent().unwrap_or(Path::new("/"));
    let private = parent.join(format!(".agentd-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    make_private_dir(&private)?;
    let tmp = private.join("sock");
    let done = (|| -> Result<tokio::net::UnixListener, String> {
        let listener = tokio::net::UnixListener::bind(&tmp).map_err(|e| format!("binding: {e}"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).map_err(|e| format!("chmod: {e}"))?;
        if std::fs::symlink_metadata(socket).is_ok_and(|m| !m.file_type().is_socket()) {
            return Err("the path exists and is not a socket".into());
        }
        std::fs::rename(&tmp, socket).map_err(|e| format!("renaming into place: {e}"))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    done.map_err(|e| setup(format!("binding {}", socket.display()))(e))
}

fn make_private_dir(dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| setup(format!("creating {}", dir.display()))(e.to_string()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| setup(format!("making {} private", dir.display()))(e.to_string()))
}

async fn serve(
    cfg: ServeConfig,
    tasks: Arc<Tasks>,
    queued: Vec<store::TaskRecord>,
    socket: PathBuf,
    audit_log: PathBuf,
    cgroups: Cgroups,
) -> Result<(), ServeError> {
    let idle_timeout = Duration::from_millis(cfg.api.idle_timeout_ms);
    // Every agent's MCP endpoint, its servers' tools listed now: before the socket exists,
    // so that no client sees the daemon before it can serve them, and before any task runs,
    // so that every task's model is offered them.
    let mcp_stopping = tokio_util::sync::CancellationToken::new();
    let mcp = mcp::routes(&tasks, &audit_log, idle_timeout, &mcp_stopping)
        .await
        .map_err(setup("starting the MCP endpoints"))?;
    if !queued.is_empty() {
        tracing::info!(n = queued.len(), "resuming queued tasks");
    }
    let resumed = Arc::clone(&tasks);
    tokio::task::spawn_blocking(move || resumed.requeue(queued))
        .await
        .map_err(|e| setup("resuming queued tasks")(e.to_string()))?
        .map_err(|e| setup("resuming queued tasks")(e.to_string()))?;
    let listener = bind(&socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admission = conn::Admission::new(cfg.api, cfg.roles.clone());
    let api = Arc::new(api::Api {
        tasks: Arc::clone(&tasks),
        admission: Arc::clone(&admission),
        audit_log: audit_log.clone(),
        stopping: stop_rx,
        lists: Arc::new(tokio::sync::Semaphore::new(api::LISTS_AT_ONCE)),
    });
    let app = api::router(api).merge(mcp);
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<&'static str>();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            return;
        };
        let which = tokio::select! { _ = term.recv() => "SIGTERM", _ = int.recv() => "SIGINT" };
        let _ = signalled_tx.send(which);
    });
    outln!("agentd: serving {} agents on {}", tasks.agents.len(), socket.display());
    tracing::info!(socket = %socket.display(), agents = tasks.agents.len(), "agentd serve is ready");
    let deadline = Duration::from_millis(cfg.limits.drain_timeout_ms);
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let accepting = conn::accept(listener, app, admission, Arc::clone(&graceful));
    let drain_tasks = Arc::clone(&tasks);
    let stopped = async move {
        let which = signalled_rx.await.unwrap_or("a stop request");
        tracing::info!(signal = which, deadline_ms = deadline.as_millis() as u64, "draining");
        let t = Arc::clone(&drain_tasks);
        let _ = tokio::task::spawn_blocking(move || drain(&t, deadline, &audit_log, &cgroups, which)).await;
        let _ = stop_tx.send(true);
        // Open MCP streams end with their sessions.
        mcp_stopping.cancel();
    };
    // The socket keeps answering during the drain (submit gets 503, watchers see tasks end);
    // after it, no new connections, and those still open get a short grace.
    tokio::select! {
        () = accepting => {}
        () = stopped => {}
    }
    let _ = std::fs::remove_file(&socket);
    let graceful = Arc::try_unwrap(graceful).unwrap_or_else(|_| hyper_util::server::graceful::GracefulShutdown::new());
    if tokio::time::timeout(CLOSE_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace_ms = CLOSE_GRACE.as_millis() as u64, "closing connections still open after the drain");
    }
    tracing::info!("agentd serve stopped");
    Ok(())
}

/// How long connections may stay open once the drain is done (answers being written).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The drain: no new tasks or calls; running calls until `deadline`, then killed and
/// recorded; running tasks end as failed; queued ones stay for the next start.
fn drain(tasks: &Arc<Tasks>, deadline: Duration, audit: &Path, cgroups: &Cgroups, which: &str) {
    tasks.start_drain();
    let stopped = tasks.stop_running(&format!("agentd serve stopped ({which}) before the task finished"));
    tasks.calls.close();
    let end = Instant::now() + deadline;
    let left = tasks.calls.wait_idle(end);
    for call_id in &left {
        let found = cgroups.kill_call(call_id, Duration::from_secs(2));
        let tool = tasks.store.call(call_id).ok().flatten().map(|c| c.tool).unwrap_or_default();
        tracing::warn!(call_id, found, "killed a call at the drain deadline");
        record_kill(
            audit,
            call_id,
            &tool,
            json!({ "reason": format!("agentd serve was asked to stop ({which}) and the call ran past the {} ms drain deadline", deadline.as_millis()), "killed_processes": found }),
            false,
        );
    }
    tasks.calls.wait_idle(Instant::now() + Duration::from_secs(5));
    // Calls of MCP servers' tools run outside the pool: those past the deadline are
    // cancelled, which ends their sandboxes (and each records its end).
    let cancelled = tasks.end_server_calls(end);
    if cancelled > 0 {
        tracing::warn!(cancelled, "cancelled calls of MCP servers' tools at the drain deadline");
    }
    let until = Instant::now() + Duration::from_secs(5);
    while tasks.counts().1 > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    tasks.store_unstored();
    tracing::info!(killed_calls = left.len(), stopped_tasks = stopped, "drained");
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_audit::{Entry, Kind, Verdict};

    fn call(id: &str, phase: store::Phase) -> store::CallRecord {
        store::CallRecord {
            call_id: id.into(),
            task_id: "t".into(),
            agent: "a".into(),
            submitter_uid: 0,
            tool: "sh".into(),
            in_flight: true,
            phase,
            started_ms: store::now_ms(),
            handed_ms: None,
            exit_code: None,
            duration_ms: None,
            events: None,
            error: None,
        }
    }

    /// A call left `waiting` counts as never started only if the audit log has no
    /// `call_start` for it, and only on the boot the store last started on.
    #[test]
    fn a_waiting_call_with_a_start_record_counts_as_started() {
        let dir = std::env::temp_dir().join(format!("agentd-never-started-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let audit = dir.join("audit.jsonl");
        let mut log = AuditLog::open(&audit).expect("audit");
        // `ran` reached a worker, which wrote its start, but the store still says waiting.
        log.append(&[Entry::new("ran", "sh", Kind::CallStart, Verdict::Allowed, json!({}))]).expect("append");
        log.append(&[Entry::new("other", "sh", Kind::Summary, Verdict::Allowed, json!({}))]).expect("append");
        let store = Store::open(&dir.join("state")).expect("store");
        let calls = [
            call("ran", store::Phase::Waiting),
            call("never", store::Phase::Waiting),
            call("handed", store::Phase::Handed),
            call("old", store::Phase::Unknown),
        ];
        // No boot recorded (a store from before, or another boot): nothing is taken as not run.
        assert!(never_started(&store, &audit, &calls).is_empty());
        store.write(vec![Write::Meta("boot", boot_id())]).expect("write");
        let got = never_started(&store, &audit, &calls);
        assert_eq!(got, std::collections::HashSet::from(["never".to_string()]));
        store.write(vec![Write::Meta("boot", "another boot".into())]).expect("write");
        assert!(never_started(&store, &audit, &calls).is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
