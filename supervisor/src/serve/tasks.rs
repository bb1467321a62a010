//! Tasks of the daemon: accepted (or refused as busy), queued, run by the agent loop on a
//! thread of their own, streamed as events, cancelled, and recorded in the store at every
//! step that matters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agentd_policy::grammar::ParsedCall;
use agentd_policy::serve::{AgentConfig, HostLimits};
use agentd_policy::Manifest;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::calls::{not_run, Call, Calls, Handoff};
use super::store::{now_ms, CallRecord, Event, Kind, Phase, Scope, State, Store, Summary, TaskRecord, Write};
use super::worker::WorkRequest;
use crate::agent::run;
use crate::mcp::offer::ModelTools;
use crate::mcp::upstream::SessionSandboxes;
use agentd_model::engine::{Engine, Local, Observer, Outcome, RunConfig};
use agentd_model::llm::{Counters, Llm};
use agentd_model::openai::Remote;
use agentd_model::shared::{Backend, Scripted};
use agentd_model::turn::Rules;
use agentd_model::weights::ModelInfo;
use agentd_model::AgentError;

/// A hosted agent.
#[derive(Debug)]
pub struct Agent {
    /// Its configuration.
    pub cfg: AgentConfig,
    /// Its manifest file (absolute).
    pub manifest_path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Why a task was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No such agent.
    #[error("no agent named {0:?} is hosted here")]
    UnknownAgent(String),
    /// The task text is empty or too long.
    #[error("{0}")]
    BadTask(String),
    /// Queues are full.
    #[error("busy: {reason}; retry in {retry_after_ms} ms")]
    Busy {
        /// Which queue.
        reason: String,
        /// When a retry may succeed.
        retry_after_ms: u64,
    },
    /// The daemon is stopping.
    #[error("agentd serve is stopping and accepts no new tasks")]
    Draining,
    /// The store failed.
    #[error("{0}")]
    Store(#[from] super::store::StoreError),
}

/// Longest task text accepted.
pub const MAX_TASK_BYTES: usize = 64 * 1024;

/// A task that is queued or running.
#[derive(Debug)]
pub struct Live {
    record: Mutex<TaskRecord>,
    events: Mutex<Vec<Event>>,
    tx: broadcast::Sender<Event>,
    /// Set (with the reason) to stop the task.
    stop: Arc<Mutex<Option<String>>>,
    /// The call running now.
    call: Mutex<Option<String>>,
    /// Cancels the call of an MCP server's tool running now (it runs outside the pool).
    server_call: Mutex<Option<CancellationToken>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Live {
    fn new(record: TaskRecord, events: Vec<Event>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(Self {
            record: Mutex::new(record),
            events: Mutex::new(events),
            tx,
            stop: Arc::new(Mutex::new(None)),
            call: Mutex::new(None),
            server_call: Mutex::new(None),
        })
    }

    /// Appends an event to the stream, for watchers now and later.
    fn emit(&self, store: &Store, kind: &str, data: Value, durable: bool) {
        let (id, ev) = {
            let mut evs = lock(&self.events);
            let ev = Event { seq: evs.len() as u64, kind: kind.to_string(), at_ms: now_ms(), data };
            evs.push(ev.clone());
            let _ = self.tx.send(ev.clone());
            (lock(&self.record).id.clone(), ev)
        };
        let w = vec![Write::Event(id, ev)];
        if durable {
            if let Err(e) = store.write(w) {
                tracing::error!(error = %e, "an event could not be stored");
            }
        } else {
            store.write_later(w);
        }
    }

    fn snapshot(&self) -> TaskRecord {
        let mut r = lock(&self.record).clone();
        r.events = lock(&self.events).len() as u64;
        r
    }

    fn stopped(&self) -> Option<String> {
        lock(&self.stop).clone()
    }
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<String>,
    running: usize,
}

/// The daemon's tasks.
#[derive(Debug)]
pub struct Tasks {
    /// Hosted agents.
    pub agents: BTreeMap<String, Agent>,
    /// The store.
    pub store: Store,
    /// The tool-call pool.
    pub calls: Calls,
    /// The model.
    pub backend: Backend,
    /// Host limits.
    pub limits: HostLimits,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Ended tasks whose final record the store did not take: served from memory, and
    /// written again by [`Tasks::store_unstored`] (after the next successful final write,
    /// from the pruning thread, and at drain).
    unstored: Mutex<HashMap<String, Arc<Live>>>,
    queue: Mutex<Queue>,
    draining: AtomicBool,
    /// Each agent's MCP servers, as its tasks' model is offered them.
    servers: Mutex<HashMap<String, Arc<TaskServers>>>,
}

/// An agent's MCP servers' tools as its tasks' model is offered them, and the daemon's
/// runtime that makes their calls (from the tasks' own threads).
pub struct TaskServers {
    /// The tools.
    pub tools: ModelTools,
    /// The runtime.
    pub handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for TaskServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.tools.fmt(f)
    }
}

impl Tasks {
    /// Tasks over these parts; nothing runs until [`Tasks::submit`] or [`Tasks::requeue`].
    pub fn new(
        agents: BTreeMap<String, Agent>,
        store: Store,
        calls: Calls,
        backend: Backend,
        limits: HostLimits,
    ) -> Arc<Self> {
        Arc::new(Self {
            agents,
            store,
            calls,
            backend,
            limits,
            live: Mutex::new(HashMap::new()),
            unstored: Mutex::new(HashMap::new()),
            queue: Mutex::new(Queue::default()),
            draining: AtomicBool::new(false),
            servers: Mutex::new(HashMap::new()),
        })
    }

    /// Offers `agent`'s MCP servers' tools to its tasks' model from now on (set before any
    /// task runs: see `serve::mcp::routes`).
    pub fn offer_servers(&self, agent: &str, servers: TaskServers) {
        for line in servers.tools.refusals() {
            tracing::warn!(agent, "{line}");
        }
        lock(&self.servers).insert(agent.to_string(), Arc::new(servers));
    }

    /// Accepts a task for `agent` from `uid`, or says why not (never waits for room).
    pub fn submit(self: &Arc<Self>, agent: &str, task: &str, uid: u32) -> Result<TaskRecord, SubmitError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Draining);
        }
        let a = self.agents.get(agent).ok_or_else(|| SubmitError::UnknownAgent(agent.to_string()))?;
        if task.trim().is_empty() {
            return Err(SubmitError::BadTask("the task is empty".into()));
        }
        if task.len() > MAX_TASK_BYTES {
            return Err(SubmitError::BadTask(format!("the task has {} bytes; at most {MAX_TASK_BYTES}", task.len())));
        }
        let record = {
            let mut live = lock(&self.live);
            let busy = |reason: String| {
                let retry =
                    250 + 50 * lock(&self.queue).waiting.len() as u64 / (self.limits.max_running_tasks as u64).max(1);
                Err(SubmitError::Busy { reason, retry_after_ms: retry.min(30_000) })
            };
            if live.len() >= self.limits.max_queued_tasks {
                return busy(format!(
                    "{} tasks are queued or running on this host (limits.max_queued_tasks)",
                    live.len()
                ));
            }
            let mine = live.values().filter(|l| lock(&l.record).agent == agent).count();
            if mine >= a.cfg.max_queued_tasks {
                return busy(format!(
                    "agent {agent} has {mine} tasks queued or running (agents.{agent}.max_queued_tasks)"
                ));
            }
            // One user's share: a uid that filled it waits for its own tasks, not others.
            let by_uid = live
                .values()
                .filter(|l| {
                    let r = lock(&l.record);
                    r.agent == agent && r.submitter_uid == uid
                })
                .count();
            if by_uid >= a.cfg.max_queued_per_uid {
                return busy(format!(
                    "uid {uid} has {by_uid} of agent {agent}'s tasks queued or running \
                     (agents.{agent}.max_queued_per_uid); other users keep their share"
                ));
            }
            let record = TaskRecord {
                id: uuid::Uuid::now_v7().to_string(),
                agent: agent.to_string(),
                task: task.to_string(),
                submitter_uid: uid,
                state: State::Queued,
                created_ms: now_ms(),
                started_ms: None,
                finished_ms: None,
                answer: None,
                stop: None,
                error: None,
                calls: Vec::new(),
                steps: 0,
                generated_tokens: 0,
                events: 0,
            };
            live.insert(record.id.clone(), Live::new(record.clone(), Vec::new()));
            record
        };
        let l = self.get_live(&record.id).ok_or_else(|| SubmitError::BadTask("the task vanished".into()))?;
        // Durable before the client hears of it.
        let ev = Event { seq: 0, kind: "state".into(), at_ms: now_ms(), data: json!({ "state": "queued" }) };
        lock(&l.events).push(ev.clone());
        if let Err(e) = self.store.write(vec![Write::Task(l.snapshot()), Write::Event(record.id.clone(), ev)]) {
            lock(&self.live).remove(&record.id);
            return Err(e.into());
        }
        lock(&self.queue).waiting.push_back(record.id.clone());
        self.dispatch();
        Ok(l.snapshot())
    }

    /// Puts tasks found queued in the store at start back in the queue.
    pub fn requeue(self: &Arc<Self>, records: Vec<TaskRecord>) -> Result<(), SubmitError> {
        for r in records {
            let events = self.store.events(&r.id, 0)?;
            let id = r.id.clone();
            lock(&self.live).insert(id.clone(), Live::new(r, events));
            lock(&self.queue).waiting.push_back(id);
        }
        self.dispatch();
        Ok(())
    }

    /// A task that is live, or ended but not yet in the store.
    fn get_live(&self, id: &str) -> Option<Arc<Live>> {
        lock(&self.live).get(id).cloned().or_else(|| lock(&self.unstored).get(id).cloned())
    }

    /// A task's record: live, or from the store.
    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, SubmitError> {
        match self.get_live(id) {
            Some(l) => Ok(Some(l.snapshot())),
            None => Ok(self.store.task(id)?),
        }
    }

    /// A page of summaries of the tasks in `scopes` (in `state`, if given) after `after`,
    /// oldest first, live ones up to date, and where the next page starts (see
    /// [`Store::page`]). Only the page's records are read, and only their summaries kept.
    pub fn page(
        &self,
        scopes: &[Scope],
        state: Option<State>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<Summary>, Option<String>), SubmitError> {
        let (ids, next) = self.store.page(Kind::Tasks, scopes, state, after, limit)?;
        let mut stored = self.store.summaries(&ids)?.into_iter().peekable();
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            let from_store = stored.next_if(|s| s.id == *id);
            match self.get_live(id) {
                Some(l) => out.push(Summary::of_record(&l.snapshot())),
                None => out.extend(from_store),
            }
        }
        Ok((out, next))
    }

    /// Calls of `ids`, in order; those the store no longer has are left out.
    pub fn calls_of(&self, ids: &[String]) -> Result<Vec<CallRecord>, SubmitError> {
        Ok(self.store.calls(ids)?)
    }

    /// Events of a task from `from`, and, while it is live, a receiver for the ones after.
    #[allow(clippy::type_complexity)]
    pub fn watch(&self, id: &str, from: u64) -> Result<(Vec<Event>, Option<broadcast::Receiver<Event>>), SubmitError> {
        if let Some(l) = self.get_live(id) {
            let evs = lock(&l.events);
            let past = evs.iter().skip(from as usize).cloned().collect();
            // An ended task (one the store has not taken yet) has no more events to wait for.
            let more = (!lock(&l.record).state.is_final()).then(|| l.tx.subscribe());
            return Ok((past, more));
        }
        Ok((self.store.events(id, from)?, None))
    }

    /// Cancels a task: a queued one ends at once, a running one stops at its next step (its
    /// running call is killed). Returns the record, or `None` if there is no such task.
    pub fn cancel(self: &Arc<Self>, id: &str, who: &str) -> Result<Option<TaskRecord>, SubmitError> {
        let Some(l) = self.get_live(id) else { return self.get(id) };
        let why = format!("cancelled by {who}");
        *lock(&l.stop) = Some(why.clone());
        let was_queued = {
            let mut q = lock(&self.queue);
            let before = q.waiting.len();
            q.waiting.retain(|t| t != id);
            q.waiting.len() < before
        };
        if was_queued {
            self.finish(&l, State::Cancelled, None, Some(why), None);
        } else {
            if let Some(ct) = lock(&l.server_call).clone() {
                ct.cancel();
            }
            let call = lock(&l.call).clone();
            if let Some(call) = call {
                self.calls.cancel(&call, &why);
            }
        }
        Ok(Some(l.snapshot()))
    }

    /// Queued and running counts.
    pub fn counts(&self) -> (usize, usize) {
        let q = lock(&self.queue);
        (q.waiting.len(), q.running)
    }

    /// Stops accepting tasks and calls (SIGTERM).
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops every running task with `why` at its next step (a drain): a call it is
    /// running goes on. Queued ones stay queued in the store, for the next start.
    pub fn stop_running(&self, why: &str) -> usize {
        let live: Vec<Arc<Live>> = lock(&self.live).values().cloned().collect();
        let mut n = 0;
        for l in live {
            if lock(&l.record).state == State::Running {
                *lock(&l.stop) = Some(why.to_string());
                n += 1;
            }
        }
        n
    }

    /// Waits until `end` (a drain's deadline) for the calls of MCP servers' tools that tasks
    /// are making, and cancels those still running then, which ends their sandboxes; how
    /// many were cancelled.
    pub fn end_server_calls(&self, end: Instant) -> usize {
        loop {
            let running: Vec<CancellationToken> =
                lock(&self.live).values().filter_map(|l| lock(&l.server_call).clone()).collect();
            if running.is_empty() {
                return 0;
            }
            if Instant::now() >= end {
                for t in &running {
                    t.cancel();
                }
                return running.len();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts queued tasks while there is room.
    fn dispatch(self: &Arc<Self>) {
        loop {
            let id = {
                let mut q = lock(&self.queue);
                if self.draining() || q.running >= self.limits.max_running_tasks {
                    return;
                }
                let Some(id) = q.waiting.pop_front() else { return };
                q.running += 1;
                id
            };
            let Some(l) = self.get_live(&id) else {
                lock(&self.queue).running -= 1;
                continue;
            };
            let me = Arc::clone(self);
            let spawned = std::thread::Builder::new().name("agentd-task".into()).spawn(move || {
                // A panic fails this task, and the daemon goes on.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.run_task(&l))).is_err() {
                    me.finish(&l, State::Failed, None, Some("internal error: the task's loop panicked".into()), None);
                }
                lock(&me.queue).running -= 1;
                me.dispatch();
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "no thread for a task; it stays queued");
                let mut q = lock(&self.queue);
                q.running -= 1;
                q.waiting.push_front(id);
                return;
            }
        }
    }

    fn run_task(&self, l: &Arc<Live>) {
        if self.draining() {
            // Not started: it stays queued in the store for the next start.
            let id = lock(&l.record).id.clone();
            lock(&self.live).remove(&id);
            return;
        }
        let (id, agent_name, task) = {
            let mut r = lock(&l.record);
            r.state = State::Running;
            r.started_ms = Some(now_ms());
            (r.id.clone(), r.agent.clone(), r.task.clone())
        };
        if let Err(e) = self.store.write(vec![Write::Task(l.snapshot())]) {
            tracing::error!(task = %id, error = %e, "the task's start could not be stored");
        }
        l.emit(&self.store, "state", json!({ "state": "running" }), false);
        let Some(agent) = self.agents.get(&agent_name) else {
            self.finish(l, State::Failed, None, Some(format!("agent {agent_name} is no longer configured")), None);
            return;
        };
        tracing::info!(task = %id, agent = %agent_name, "task started");
        let cfg = RunConfig {
            max_steps: agent.cfg.max_steps,
            max_tokens: agent.cfg.max_tokens,
            seed: None,
            temperature: 0.7,
            context_budget: 0,
        };
        let mut obs =
            TaskObserver { live: Arc::clone(l), store: self.store.clone(), buf: String::new(), last: Instant::now() };
        let servers = lock(&self.servers).get(&agent_name).cloned();
        let mut offer = run::Agent::of_manifest(&agent.manifest);
        if let Some(s) = &servers {
            offer.tools.extend(s.tools.offered().iter().cloned());
        }
        // The task is the client session of its `lifetime = "session"` servers.
        let sessions = SessionSandboxes::default();
        let with = servers.as_deref().map(|s| (s, &sessions));
        let mut exec = |call: &ParsedCall, call_id: &str| self.exec(l, agent, &agent_name, call, call_id, with);
        let result = match &self.backend {
            Backend::Scripted { tool, args, calls } => {
                let mut e = Stoppable { inner: Scripted::new(tool, args, *calls), stop: Arc::clone(&l.stop) };
                run::run(&mut e, &offer, &task, &cfg, &mut exec, &mut obs, None)
            }
            Backend::Openai { endpoint, name, constraints } => {
                let mut remote = Remote::new(endpoint, name).constraints(*constraints);
                remote.offer(&offer.tools);
                let mut e = Stoppable { inner: remote, stop: Arc::clone(&l.stop) };
                run::run(&mut e, &offer, &task, &cfg, &mut exec, &mut obs, None)
            }
            Backend::Local { weights, batcher, kv } => {
                let mut llm = Llm::new(Arc::clone(weights), Some(batcher.clone()));
                llm.stop_when(Arc::clone(&l.stop));
                // Cached prompt prefixes are shared only within one agent and submitter.
                let submitter = lock(&l.record).submitter_uid;
                llm.share_prefixes_with(prefix_key(&agent_name, submitter));
                let (kv2, l2, store, id2) = (Arc::clone(kv), Arc::clone(l), self.store.clone(), id.clone());
                let local = Local::new(&mut llm, None).on_pause(Box::new(move |llm: &mut Llm, tool: &str| {
                    let d = kv2.pause(&id2, llm, tool);
                    l2.emit(
                        &store,
                        "kv",
                        json!({ "action": d.action, "bytes": d.bytes, "reason": d.reason, "tool": tool }),
                        false,
                    );
                }));
                let mut e = Stoppable { inner: local, stop: Arc::clone(&l.stop) };
                let r = run::run(&mut e, &offer, &task, &cfg, &mut exec, &mut obs, None);
                kv.resumed(&id, "", std::time::Duration::ZERO);
                r
            }
        };
        obs.flush();
        if let Some(s) = &servers {
            s.handle.block_on(sessions.close_all());
        }
        match result {
            Ok(t) => {
                let counters = t.counters;
                match (&t.answer, l.stopped()) {
                    (_, Some(why)) => self.finish(l, self.stopped_state(), None, Some(why), Some((t.steps, counters))),
                    (Some(a), None) => {
                        l.emit(&self.store, "answer", json!({ "answer": a }), false);
                        self.finish(l, State::Succeeded, Some(a.clone()), None, Some((t.steps, counters)));
                    }
                    (None, None) => {
                        let why = format!("the agent stopped without an answer ({:?})", t.stop);
                        self.finish(l, State::Failed, None, Some(why), Some((t.steps, counters)));
                    }
                }
            }
            Err(AgentError::Cancelled(why)) => self.finish(l, self.stopped_state(), None, Some(why), None),
            Err(e) => self.finish(l, State::Failed, None, Some(e.to_string()), None),
        }
    }

    /// How a stopped task ends: cancelled by a client, or failed when the daemon stopped it.
    fn stopped_state(&self) -> State {
        if self.draining() {
            State::Failed
        } else {
            State::Cancelled
        }
    }

    /// Runs one tool call of task `l` through the pool, recording it before and after.
    fn exec(
        &self,
        l: &Arc<Live>,
        agent: &Agent,
        agent_name: &str,
        call: &ParsedCall,
        call_id: &str,
        servers: Option<(&TaskServers, &SessionSandboxes)>,
    ) -> Value {
        if let Some(why) = l.stopped() {
            return not_run(call_id, &call.tool, &why);
        }
        let task_id = lock(&l.record).id.clone();
        let submitter = lock(&l.record).submitter_uid;
        let mut rec = CallRecord::waiting(call_id, &task_id, agent_name, submitter, &call.tool);
        lock(&l.record).calls.push(call_id.to_string());
        // Known as this task's call before anything else, so that a cancel from now on kills it.
        *lock(&l.call) = Some(call_id.to_string());
        // Durable before the call exists: a restart must know to clean it up.
        if let Err(e) = self.store.write(vec![Write::Call(rec.clone()), Write::Task(l.snapshot())]) {
            *lock(&l.call) = None;
            return not_run(call_id, &call.tool, &format!("the call could not be recorded in the task store: {e}"));
        }
        if let Some(why) = l.stopped() {
            *lock(&l.call) = None;
            rec.in_flight = false;
            rec.error = Some(why.clone());
            let _ = self.store.write(vec![Write::Call(rec)]);
            return not_run(call_id, &call.tool, &why);
        }
        let started = Instant::now();
        let server = servers.filter(|(s, _)| s.tools.offered().iter().any(|o| o.name == call.tool));
        let result = match server {
            Some((s, sessions)) => {
                // Outside the pool: the call is an `agentd exec --mcp-server` made from here.
                // Stored as started before it is: after a crash, a restart must not take it
                // for a call that never ran, and run its task (and the call) again.
                let mut rec = rec;
                rec.phase = Phase::Handed;
                rec.handed_ms = Some(now_ms());
                if let Err(e) = self.store.write(vec![Write::Call(rec.clone())]) {
                    *lock(&l.call) = None;
                    let why = format!("the call could not be recorded in the task store: {e}");
                    let r = not_run(call_id, &call.tool, &why);
                    self.store_end(rec, &r);
                    return r;
                }
                let ct = CancellationToken::new();
                *lock(&l.server_call) = Some(ct.clone());
                if l.stopped().is_some() {
                    ct.cancel();
                }
                let r = s.handle.block_on(s.tools.call(call, call_id, Some(submitter), sessions, ct));
                *lock(&l.server_call) = None;
                let r = r.unwrap_or_else(|| not_run(call_id, &call.tool, "no such tool"));
                self.store_end(rec, &r);
                r
            }
            None => self.run_recorded(agent, agent_name, rec, call.args.clone()),
        };
        *lock(&l.call) = None;
        if let Backend::Local { kv, .. } = &self.backend {
            kv.resumed(&task_id, &call.tool, started.elapsed());
        }
        result
    }

    /// Runs call `rec` (stored as waiting) through the pool, and stores its hand-off to a
    /// worker and its end.
    fn run_recorded(
        &self,
        agent: &Agent,
        agent_name: &str,
        mut rec: CallRecord,
        args: BTreeMap<String, String>,
    ) -> Value {
        let work = WorkRequest {
            call_id: rec.call_id.clone(),
            manifest: agent.manifest_path.clone(),
            tool: rec.tool.clone(),
            args,
        };
        let tool = agentd_policy::Name::parse(&rec.tool).ok().and_then(|n| agent.manifest.tools.get(&n));
        let timeout = tool.map_or(0, |t| t.limits.timeout_ms);
        let deadline = Duration::from_millis(timeout) + super::calls::GRACE;
        // When a worker takes it. Not waited for: after a crash, whether a call still
        // `waiting` in the store had started is read from the audit log (see `recover`).
        let handed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handoff = {
            let (store, handed) = (self.store.clone(), Arc::clone(&handed));
            let mut rec = rec.clone();
            Handoff(Box::new(move || {
                let at = now_ms();
                rec.phase = Phase::Handed;
                rec.handed_ms = Some(at);
                store.write_later(vec![Write::Call(rec)]);
                handed.store(at, Ordering::SeqCst);
            }))
        };
        let result = self.calls.run(Call { agent: agent_name.to_string(), work, deadline, handoff: Some(handoff) });
        let at = handed.load(Ordering::SeqCst);
        if at > 0 {
            rec.phase = Phase::Handed;
            rec.handed_ms = Some(at);
        }
        self.store_end(rec, &result);
        result
    }

    /// Stores the end of call `rec` with its `result`.
    pub fn store_end(&self, mut rec: CallRecord, result: &Value) {
        rec.in_flight = false;
        rec.exit_code = result["exit_code"].as_i64();
        rec.duration_ms = result["duration_ms"].as_u64();
        rec.events = Some(result["events"].clone());
        rec.error = result["error"].as_str().map(str::to_string);
        let rec_id = rec.call_id.clone();
        if let Err(e) = self.store.write(vec![Write::Call(rec)]) {
            tracing::error!(call_id = %rec_id, error = %e, "the call's end could not be stored");
        }
    }

    /// Runs one call that a client made directly (over MCP), with no task and no model:
    /// recorded in the store like a task's calls (with an empty task id), durable before it
    /// exists, and run through the same pool under the agent's limits.
    pub fn direct_call(
        &self,
        agent_name: &str,
        uid: u32,
        call_id: &str,
        tool: &str,
        args: BTreeMap<String, String>,
    ) -> Value {
        let Some(agent) = self.agents.get(agent_name) else {
            return not_run(call_id, tool, &format!("no agent named {agent_name:?} is hosted here"));
        };
        if self.draining() {
            return not_run(call_id, tool, "agentd serve is stopping and takes no new calls");
        }
        let rec = CallRecord::waiting(call_id, "", agent_name, uid, tool);
        if let Err(e) = self.store.write(vec![Write::Call(rec.clone())]) {
            return not_run(call_id, tool, &format!("the call could not be recorded in the task store: {e}"));
        }
        self.run_recorded(agent, agent_name, rec, args)
    }

    /// Ends a task: final record and event, durable; then it is no longer live.
    fn finish(
        &self,
        l: &Arc<Live>,
        state: State,
        answer: Option<String>,
        error: Option<String>,
        run: Option<(usize, Counters)>,
    ) {
        let id = {
            let mut r = lock(&l.record);
            if r.state.is_final() {
                return;
            }
            r.state = state;
            r.finished_ms = Some(now_ms());
            r.answer = answer;
            r.error.clone_from(&error);
            if let Some((steps, c)) = run {
                r.steps = steps;
                r.generated_tokens = c.decode_tokens;
            }
            r.id.clone()
        };
        tracing::info!(task = %id, state = ?state, error = error.as_deref().unwrap_or(""), "task ended");
        l.emit(&self.store, "state", json!({ "state": state, "error": error }), false);
        // Its end is served from memory until the store has it: a failed write must not
        // leave readers with the state before.
        let mut stored = false;
        for attempt in 1..=3u64 {
            match self.store.write(vec![Write::Task(l.snapshot())]) {
                Ok(()) => {
                    stored = true;
                    break;
                }
                Err(e) => {
                    tracing::error!(task = %id, attempt, error = %e, "the task's end could not be stored");
                    std::thread::sleep(Duration::from_millis(100 * attempt));
                }
            }
        }
        if stored {
            self.store_unstored();
        } else {
            lock(&self.unstored).insert(id.clone(), Arc::clone(l));
        }
        lock(&self.live).remove(&id);
    }

    /// Writes the ended tasks the store did not take before (with their events).
    pub fn store_unstored(&self) {
        let waiting: Vec<Arc<Live>> = lock(&self.unstored).values().cloned().collect();
        for l in waiting {
            let snap = l.snapshot();
            let events: Vec<Write> =
                lock(&l.events).iter().cloned().map(|e| Write::Event(snap.id.clone(), e)).collect();
            if self.store.write(events.into_iter().chain([Write::Task(snap.clone())]).collect()).is_ok() {
                lock(&self.unstored).remove(&snap.id);
            }
        }
    }
}

/// The prefix-cache partition of an agent and submitter.
fn prefix_key(agent: &str, uid: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (agent, uid).hash(&mut h);
    h.finish()
}

/// Streams a task's text and calls as events; text is sent in pieces of at most 50 ms.
struct TaskObserver {
    live: Arc<Live>,
    store: Store,
    buf: String,
    last: Instant,
}

impl TaskObserver {
    fn flush(&mut self) {
        if !self.buf.is_empty() {
            let text = std::mem::take(&mut self.buf);
            self.live.emit(&self.store, "text", json!({ "text": text }), false);
        }
        self.last = Instant::now();
    }
}

impl Observer for TaskObserver {
    fn text(&mut self, text: &str) {
        self.buf.push_str(text);
        if self.last.elapsed().as_millis() >= 50 || self.buf.len() >= 512 {
            self.flush();
        }
    }

    fn tool_start(&mut self, call: &ParsedCall, call_id: &str) {
        self.flush();
        self.live.emit(
            &self.store,
            "tool_call",
            json!({ "call_id": call_id, "tool": call.tool, "arguments": call.args }),
            false,
        );
    }

    fn tool_end(&mut self, r: &Value) {
        let verdict = run::verdict(r);
        let data = json!({ "call_id": r["call_id"], "tool": r["tool"], "exit_code": r["exit_code"],
            "signal": r["signal"], "timed_out": r["timed_out"], "duration_ms": r["duration_ms"], "verdict": verdict,
            "events": r["events"], "error": r["error"], "stdout_bytes": r["stdout_bytes"] });
        self.live.emit(&self.store, "tool_result", data, false);
        self.last = Instant::now();
    }
}

/// An engine that stops (with [`AgentError::Cancelled`]) once its task is cancelled.
struct Stoppable<E> {
    inner: E,
    stop: Arc<Mutex<Option<String>>>,
}

impl<E> Stoppable<E> {
    fn check(&self) -> Result<(), AgentError> {
        match lock(&self.stop).clone() {
            Some(why) => Err(AgentError::Cancelled(why)),
            None => Ok(()),
        }
    }
}

impl<E: Engine> Engine for Stoppable<E> {
    fn begin(&mut self, system: &str, example: Option<&str>, task: &str) -> Result<usize, AgentError> {
        self.check()?;
        self.inner.begin(system, example, task)
    }

    fn turn(
        &mut self,
        rules: &Rules<'_>,
        cfg: &RunConfig,
        budget: usize,
        obs: &mut dyn Observer,
    ) -> Result<(Outcome, usize), AgentError> {
        self.check()?;
        self.inner.turn(rules, cfg, budget, obs)
    }

    fn resume(&mut self, block: &str) -> Result<(usize, usize), AgentError> {
        self.check()?;
        self.inner.resume(block)
    }

    fn context_tokens(&self) -> usize {
        self.inner.context_tokens()
    }

    fn count(&self, block: &str) -> Result<usize, AgentError> {
        self.inner.count(block)
    }

    fn rebuild(&mut self, s: &str, e: Option<&str>, t: &str, turns: &[(String, String)]) -> Result<usize, AgentError> {
        self.check()?;
        self.inner.rebuild(s, e, t, turns)
    }

    fn counters(&self) -> Counters {
        self.inner.counters()
    }

    fn info(&self) -> ModelInfo {
        self.inner.info()
    }

    fn pause(&mut self, tool: &str) {
        self.inner.pause(tool);
    }
}
