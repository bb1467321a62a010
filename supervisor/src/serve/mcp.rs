//! The daemon's MCP endpoint: MCP's Streamable HTTP transport (rmcp) at `/mcp/{agent}` on
//! the control socket, serving each hosted agent's tools to the peers whose role may call
//! them directly (`tools = true`), under that peer's uid.
//!
//! - The manifest's own tools run in the daemon's pool of sandbox workers, under the agent's
//!   and the host's call limits, and are stored as calls (with an empty task id) like a
//!   task's: `GET /v1/calls` lists them and a restart after a crash cleans them up.
//! - Its `[mcp.NAME]` servers' tools run as with `agentd mcp`: a fresh sandbox of the server
//!   per call (`agentd exec --mcp-server`), their tool lists fetched once at start.
//! - Who calls is the socket's peer, checked on every request, not only at the first: a
//!   session (in MCP versions that have them) is bound to the uid that opened it, and any
//!   other uid that names it is answered as if it did not exist.
//!
//! `agentd mcp --socket PATH --agent NAME` relays a stdio MCP client to this endpoint.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::api::{error, Peer};
use super::store::{now_ms, CallRecord, Phase, Write};
use super::tasks::{TaskServers, Tasks};
use crate::mcp::offer::ModelTools;
use crate::mcp::{upstream, Calls, Pool, Server};

/// Sessions one uid may hold open on one agent's endpoint.
pub const SESSIONS_PER_UID: usize = 16;

/// The header that names a session.
const SESSION_HEADER: &str = "mcp-session-id";

/// What rmcp needs from the daemon to run one agent's calls.
struct DaemonPool {
    tasks: Arc<Tasks>,
    agent: String,
    /// Direct calls of servers' tools running now, as stored at their start.
    server_calls: Mutex<HashMap<String, CallRecord>>,
}

/// The uid of `peer` if a role of its may call `agent`'s tools directly.
fn authorize(peer: &Peer, agent: &str) -> Result<u32, String> {
    match peer.cred {
        Some((uid, _, _)) if peer.roles.iter().any(|r| r.tools && r.allows(agent)) => Ok(uid),
        Some((uid, _, _)) => {
            let names: Vec<&str> = peer.roles.iter().map(|r| r.name.as_str()).collect();
            Err(format!(
                "uid {uid} (roles: {}) may not call agent {agent:?}'s tools directly: that takes a role \
                 with tools = true that names the agent",
                names.join(", ")
            ))
        }
        None => Err("the peer's credentials are unknown".into()),
    }
}

impl Pool for DaemonPool {
    fn caller(&self, request: &rmcp::model::Extensions) -> Result<u32, String> {
        let peer = request
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.extensions.get::<ConnectInfo<Peer>>())
            .ok_or("the request did not come through the daemon's socket")?;
        let uid = authorize(&peer.0, &self.agent)?;
        if self.tasks.draining() {
            return Err("agentd serve is stopping and takes no new calls".into());
        }
        Ok(uid)
    }

    fn run(&self, uid: u32, call_id: &str, tool: &str, args: std::collections::BTreeMap<String, String>) -> Value {
        self.tasks.direct_call(&self.agent, uid, call_id, tool, args)
    }

    fn cancel(&self, call_id: &str) {
        self.tasks.calls.cancel(call_id, "cancelled by the MCP client");
    }

    fn server_call_started(&self, uid: u32, call_id: &str, tool: &str) -> Result<(), String> {
        if self.tasks.draining() {
            return Err("agentd serve is stopping and takes no new calls".into());
        }
        // Durable before the call exists, as the pool's calls are, and as started: after a
        // crash, a restart finds it in flight and ends its sandbox, whose call id it is
        // (`lifetime = "call"`).
        let mut rec = CallRecord::waiting(call_id, "", &self.agent, uid, tool);
        rec.phase = Phase::Handed;
        rec.handed_ms = Some(now_ms());
        self.tasks
            .store
            .write(vec![Write::Call(rec.clone())])
            .map_err(|e| format!("the call could not be recorded in the task store: {e}"))?;
        lock(&self.server_calls).insert(call_id.to_string(), rec);
        Ok(())
    }

    fn server_call_ended(&self, call_id: &str, result: &Value) {
        let rec = lock(&self.server_calls).remove(call_id);
        if let Some(rec) = rec {
            self.tasks.store_end(rec, result);
        }
    }
}

/// The owners of one agent's endpoint's sessions (session id → uid, and when it was opened),
/// beside rmcp's own sessions, which end when their client says so or after rmcp's idle
/// timeout; and the requests that may open one, in progress, per uid.
struct Sessions {
    owners: Mutex<HashMap<String, (u32, std::time::Instant)>>,
    opening: Mutex<HashMap<u32, usize>>,
    rmcp: Arc<LocalSessionManager>,
}

/// A request that may open a session, counted against its uid until it is answered.
struct Opening<'a>(&'a Sessions, u32);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut o = lock(&self.0.opening);
        if let Some(n) = o.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                o.remove(&self.1);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Sessions {
    fn owner(&self, id: &str) -> Option<u32> {
        lock(&self.owners).get(id).map(|(uid, _)| *uid)
    }

    /// A place for a request of `uid` that may open a session, unless the sessions it holds
    /// and the ones it is opening reach [`SESSIONS_PER_UID`]. Sessions rmcp has ended are
    /// forgotten first (not ones opened a moment ago, which rmcp may not list yet).
    async fn open(&self, uid: u32) -> Option<Opening<'_>> {
        let open: std::collections::HashSet<String> =
            self.rmcp.sessions.read().await.keys().map(ToString::to_string).collect();
        let held = {
            let mut owners = lock(&self.owners);
            owners.retain(|id, (_, at)| open.contains(id) || at.elapsed() < Duration::from_secs(10));
            owners.values().filter(|(owner, _)| *owner == uid).count()
        };
        let mut opening = lock(&self.opening);
        let n = opening.entry(uid).or_default();
        if held + *n >= SESSIONS_PER_UID {
            return None;
        }
        *n += 1;
        Some(Opening(self, uid))
    }
}

/// The endpoints of every hosted agent, each with its servers' tools fetched (in their
/// sandboxes) now. A server whose tools cannot be listed stops the daemon from starting, as
/// it stops `agentd mcp`: the manifest says its tools are there.
pub async fn routes(
    tasks: &Arc<Tasks>,
    audit_log: &Path,
    idle_timeout: Duration,
    stopping: &CancellationToken,
) -> Result<Router, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find agentd's own binary: {e}"))?;
    let mut router = Router::new();
    for (name, agent) in &tasks.agents {
        let file = crate::manifest::ManifestFile::read(&agent.manifest_path)
            .map_err(|l| format!("{}: {}", agent.manifest_path.display(), l.join("; ")))?;
        let calls = Calls {
            manifest_path: agent.manifest_path.clone(),
            audit_log: audit_log.to_path_buf(),
            exe: exe.clone(),
            manifest_sha256: file.sha256(),
            max_calls: Arc::new(tokio::sync::Semaphore::new(agent.cfg.max_concurrent_calls.max(1))),
            session_sandboxes: Arc::new(tokio::sync::Semaphore::new(agent.cfg.max_concurrent_calls.max(1))),
        };
        let upstreams = upstream::discover_all(&calls, &agent.manifest)
            .await
            .map_err(|e| format!("agent {name}: {}: {e}", agent.manifest_path.display()))?;
        // The same servers, offered to the agent's tasks' model.
        let servers = TaskServers {
            tools: ModelTools::new(calls.clone(), upstreams.clone()),
            handle: tokio::runtime::Handle::current(),
        };
        tasks.offer_servers(name, servers);
        let pool: Arc<dyn Pool> = Arc::new(DaemonPool {
            tasks: Arc::clone(tasks),
            agent: name.clone(),
            server_calls: Mutex::new(HashMap::new()),
        });
        let server = Server::with_pool(&agent.manifest, calls, upstreams, pool);
        // A Unix socket is out of a browser's reach, so DNS rebinding, which the Host check
        // guards against, does not apply; clients name the host as they like.
        let config = StreamableHttpServerConfig::default()
            .disable_allowed_hosts()
            .with_sse_keep_alive(Some((idle_timeout / 3).clamp(Duration::from_secs(1), Duration::from_secs(15))))
            .with_cancellation_token(stopping.child_token());
        let manager = Arc::new(LocalSessionManager::default());
        let service = StreamableHttpService::new(move || Ok(server.for_new_session()), Arc::clone(&manager), config);
        let sessions = Arc::new(Sessions {
            owners: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            rmcp: manager,
        });
        let agent_name = name.clone();
        let endpoint = Router::new().nest_service(&format!("/mcp/{name}"), service).layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let (agent, sessions) = (agent_name.clone(), Arc::clone(&sessions));
                async move { guard(&agent, &sessions, req, next).await }
            },
        ));
        router = router.merge(endpoint);
    }
    Ok(router)
}

/// Lets a request through to an agent's endpoint only from a peer that may call its tools,
/// and, when it names a session, from the uid that opened it.
async fn guard(agent: &str, sessions: &Sessions, req: Request, next: Next) -> Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<Peer>>().cloned() else {
        return error(StatusCode::FORBIDDEN, "forbidden", "the peer's credentials are unknown".into());
    };
    let uid = match authorize(&peer, agent) {
        Ok(uid) => uid,
        Err(why) => return error(StatusCode::FORBIDDEN, "forbidden", why),
    };
    let named = req.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut opening = None;
    if let Some(id) = &named {
        if sessions.owner(id) != Some(uid) {
            // Someone else's, or none: the same answer, which confirms nothing.
            return error(StatusCode::NOT_FOUND, "not_found", "no such MCP session".into());
        }
    } else {
        opening = sessions.open(uid).await;
        if opening.is_none() {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "busy",
                format!(
                    "uid {uid} has {SESSIONS_PER_UID} MCP sessions open on agent {agent:?}; close one (DELETE), \
                     or wait for an abandoned one to end (5 minutes without a request)"
                ),
            );
        }
    }
    let closing = named.is_some() && req.method() == axum::http::Method::DELETE;
    let response = next.run(req).await;
    if named.is_none() {
        if let Some(id) = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok()) {
            lock(&sessions.owners).insert(id.to_string(), (uid, std::time::Instant::now()));
        }
    }
    if closing && response.status().is_success() {
        if let Some(id) = named {
            lock(&sessions.owners).remove(&id);
        }
    }
    drop(opening);
    response
}
