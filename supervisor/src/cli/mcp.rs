//! `agentd mcp`: the manifest's tools as an MCP server on stdio (or Streamable HTTP on
//! loopback); or, with `--socket`, a stdio relay to a hosted agent of `agentd serve`.

use std::path::PathBuf;

use clap::Args;
use rmcp::ServiceExt;

use crate::manifest::ManifestFile;
use crate::mcp::{Calls, Server};
use crate::sys;
use agentd_audit::AuditLog;
use agentd_policy::error_chain;
use agentd_sandbox::runner::EXIT_REFUSED;

#[derive(Debug, Args)]
pub(crate) struct McpArgs {
    /// Manifest whose tools are served.
    #[arg(long, required_unless_present = "socket")]
    manifest: Option<PathBuf>,
    /// Relay stdio to the MCP endpoint of `agentd serve` at this control socket instead: the
    /// calls run in the daemon, under the role of the user running this command.
    #[arg(long, value_name = "PATH", requires = "agent", conflicts_with_all = ["manifest", "listen"])]
    socket: Option<PathBuf>,
    /// With --socket: the hosted agent whose tools are wanted.
    #[arg(long, value_name = "NAME", requires = "socket")]
    agent: Option<String>,
    /// The hash-chained audit log every call's records go to.
    #[arg(long, value_name = "PATH", default_value = agentd_audit::DEFAULT_PATH)]
    audit_log: PathBuf,
    /// Serve MCP's Streamable HTTP transport at http://ADDR/mcp instead of stdio. Loopback
    /// addresses only: the endpoint has no authentication of its own. Port 0 picks one.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// With --listen: a file (root's, mode 0600) holding the secret every request must send
    /// as `Authorization: Bearer SECRET`.
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
    /// With --listen: no secret. Any local user (and any tool granted loopback) could then run
    /// the manifest's tools through this root process; for tests and single-user hosts.
    #[arg(long, requires = "listen", conflicts_with = "token_file")]
    unauthenticated: bool,
    /// Calls running at once; more wait their turn.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    max_calls: u16,
}

/// The bearer secret of `--token-file`: at least 16 characters, in a file only root can read.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("--token-file {shown}: {e}"))?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "--token-file {shown}: must be owned by root and readable by it alone (mode 0600); it is uid {} mode {:o}",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let token = std::fs::read_to_string(path).map_err(|e| format!("--token-file {shown}: {e}"))?.trim().to_string();
    if token.len() < 16 || token.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(format!("--token-file {shown}: the secret must be at least 16 printable characters, no spaces"));
    }
    Ok(token)
}

pub(crate) fn run(a: McpArgs) -> i32 {
    // The call (or task, or daemon) must finish and be recorded even if no one reads stdout.
    crate::out::keep_going();
    match serve(a) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("agentd: {msg}");
            EXIT_REFUSED
        }
    }
}

fn serve(a: McpArgs) -> Result<(), String> {
    if let (Some(socket), Some(agent)) = (&a.socket, &a.agent) {
        return relay(socket, agent);
    }
    let Some(manifest_path) = a.manifest.clone() else { return Err("--manifest FILE is needed".into()) };
    if let Some(addr) = a.listen.filter(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--listen {addr}: only a loopback address is allowed (the MCP endpoint has no authentication)"
        ));
    }
    if a.listen.is_some() && a.token_file.is_none() && !a.unauthenticated {
        return Err("--listen needs --token-file FILE (a secret each request sends as `Authorization: Bearer`), \
                    or --unauthenticated (any local user could then run the manifest's tools)"
            .into());
    }
    let token = a.token_file.as_deref().map(read_token).transpose()?;
    if sys::geteuid() != 0 {
        return Err("agentd mcp must run as root: each tools/call runs in a sandbox (cgroups, uid mapping)".into());
    }
    let invalid = |lines: Vec<String>| format!("invalid manifest:\n{}", lines.join("\n"));
    let file = ManifestFile::read(&manifest_path).map_err(invalid)?;
    let (manifest, _) = file.parse().map_err(invalid)?;
    // What every call checks the manifest against (the bytes just parsed): it cannot change
    // under a running server.
    let manifest_sha256 = file.sha256();
    // Fail now, not at the first call, if no call could be recorded.
    drop(
        AuditLog::open(&a.audit_log)
            .map_err(|e| format!("the audit log cannot be opened, so no call may run: {}", error_chain(&e)))?,
    );
    let exe = std::env::current_exe().map_err(|e| format!("cannot find agentd's own binary: {e}"))?;
    // Calls are processes of their own: one thread serves the protocol, and the calls'
    // `agentd exec` get SIGTERM when it ends (see `sys::signal_with_parent`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let calls = Calls {
        manifest_path: manifest_path.clone(),
        audit_log: a.audit_log.clone(),
        exe,
        manifest_sha256,
        max_calls: std::sync::Arc::new(tokio::sync::Semaphore::new(usize::from(a.max_calls))),
        session_sandboxes: std::sync::Arc::new(tokio::sync::Semaphore::new(usize::from(a.max_calls))),
    };
    let (tools, servers) = (manifest.tools.len(), manifest.mcp.len());
    tracing::info!(manifest = %manifest_path.display(), tools, servers, "mcp: starting");
    runtime.block_on(async move {
        // Each third-party server's tools, fetched once in its sandbox. One that cannot be
        // listed stops agentd mcp: the manifest says its tools are there.
        let upstreams = crate::mcp::upstream::discover_all(&calls, &manifest)
            .await
            .map_err(|e| format!("{}: {e}", manifest_path.display()))?;
        let server = Server::new(&manifest, calls, upstreams);
        match a.listen {
            Some(addr) => serve_http(server, addr, token).await,
            None => {
                let running = server
                    .serve(rmcp::transport::stdio())
                    .await
                    .map_err(|e| format!("MCP initialization failed: {e}"))?;
                running.waiting().await.map_err(|e| format!("the MCP session ended abnormally: {e}"))?;
                Ok(())
            }
        }
    })
}

/// Streamable HTTP at `http://addr/mcp`, with rmcp's sessions, its `Host` check (against
/// DNS rebinding) and `Origin` check, and the bearer secret when there is one, until agentd
/// is stopped.
async fn serve_http(server: Server, addr: std::net::SocketAddr, token: Option<String>) -> Result<(), String> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--listen {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("--listen {addr}: {e}"))?;
    let mut config = StreamableHttpServerConfig::default();
    // The address it was given, besides the usual loopback names.
    config.allowed_hosts.push(bound.ip().to_string());
    config.allowed_hosts.push(bound.to_string());
    let stopping = config.cancellation_token.clone();
    let service = StreamableHttpService::new(
        move || Ok(server.for_new_session()),
        std::sync::Arc::new(LocalSessionManager::default()),
        config,
    );
    let mut router = axum::Router::new().nest_service("/mcp", service);
    if let Some(secret) = token {
        let secret = std::sync::Arc::new(secret);
        router = router.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let secret = secret.clone();
                async move {
                    let sent = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
                    let ok = sent
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .is_some_and(|t| same(t.as_bytes(), secret.as_bytes()));
                    if ok {
                        next.run(req).await
                    } else {
                        use axum::response::IntoResponse;
                        (axum::http::StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, "Bearer")], "")
                            .into_response()
                    }
                }
            },
        ));
    }
    eprintln!("agentd: mcp: serving MCP (Streamable HTTP) at http://{bound}/mcp");
    let stop = async move {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        // Open event streams would hold a graceful shutdown forever: end the sessions.
        stopping.cancel();
    };
    axum::serve(listener, router).with_graceful_shutdown(stop).await.map_err(|e| format!("serving HTTP: {e}"))
}

/// Compares two secrets in time that depends on their lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Relays MCP between stdio and `agent`'s endpoint on the daemon's `socket`, message by
/// message: the daemon runs the calls and decides, from this process's credentials, whether
/// they may be made. Ends when either side ends.
/// How often the bridge checks that the daemon is still there while answers are awaited.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the daemon that was listening on `socket` (its inode `inode` then) still is. Only
/// a socket that is gone, replaced, or refusing connections says no: a busy daemon (a full
/// backlog, its connection limit) is still there.
async fn daemon_there(socket: &str, inode: Option<u64>) -> bool {
    use std::io::ErrorKind;
    match std::fs::metadata(socket) {
        Err(e) if e.kind() == ErrorKind::NotFound => return false,
        Ok(m) if inode.is_some_and(|i| i != std::os::unix::fs::MetadataExt::ino(&m)) => return false,
        _ => {}
    }
    match tokio::net::UnixStream::connect(socket).await {
        Ok(_) => true,
        Err(e) => !matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound),
    }
}

fn relay(socket: &std::path::Path, agent: &str) -> Result<(), String> {
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use rmcp::transport::{IntoTransport, StreamableHttpClientTransport, Transport};
    if agent.is_empty() || !agent.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(format!("--agent {agent:?}: not an agent name"));
    }
    let socket = socket.to_str().ok_or_else(|| format!("--socket {}: not UTF-8", socket.display()))?.to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let config = StreamableHttpClientTransportConfig::with_uri(format!("http://agentd/mcp/{agent}"));
        let mut daemon = StreamableHttpClientTransport::from_unix_socket_with_config(&socket, config);
        let mut client = IntoTransport::<rmcp::RoleServer, _, _>::into_transport(rmcp::transport::stdio());
        // Requests the client sent and the daemon has not answered: when the client's input
        // ends, their answers are still relayed before the bridge ends.
        let mut waiting = std::collections::HashSet::new();
        let mut input_open = true;
        // Whether the daemon answered anything yet: until it has, there is no session to go on.
        let mut answered = false;
        // Asked to stop (the client going away): the session is closed on the way out, so
        // that it does not hold one of this user's places at the daemon.
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int, mut hup) = (
            signal(SignalKind::terminate()).map_err(|e| e.to_string())?,
            signal(SignalKind::interrupt()).map_err(|e| e.to_string())?,
            signal(SignalKind::hangup()).map_err(|e| e.to_string())?,
        );
        // While answers are awaited, whether the daemon is still there: one that went away
        // (killed, crashed, or replaced by another at the same path) will never answer, and
        // its session is gone with it. Checked every PROBE_EVERY, never in a burst.
        let socket_inode = std::fs::metadata(&socket).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            if !input_open && waiting.is_empty() {
                break Ok(());
            }
            tokio::select! {
                _ = probe.tick(), if !waiting.is_empty() => {
                    if daemon_there(&socket, socket_inode).await {
                        continue;
                    }
                    let why = format!("agentd serve at {socket} went away before it answered");
                    for id in waiting.drain() {
                        let error = rmcp::ErrorData::internal_error(why.clone(), None);
                        let _ = client.send(rmcp::model::ServerJsonRpcMessage::error(error, Some(id))).await;
                    }
                    break Err(why);
                }
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
                _ = hup.recv() => break Ok(()),
                from_client = client.receive(), if input_open => {
                    let Some(m) = from_client else {
                        input_open = false;
                        continue;
                    };
                    let mut asked = None;
                    match &m {
                        rmcp::model::JsonRpcMessage::Request(r) => {
                            if waiting.is_empty() {
                                // The first check a full period from now.
                                probe.reset();
                            }
                            waiting.insert(r.id.clone());
                            asked = Some(r.id.clone());
                        }
                        // A cancelled request gets no answer.
                        rmcp::model::JsonRpcMessage::Notification(n) => {
                            if let rmcp::model::ClientNotification::CancelledNotification(c) = &n.notification {
                                if let Some(id) = &c.params.request_id {
                                    waiting.remove(id);
                                }
                            }
                        }
                        _ => {}
                    }
                    if let Err(e) = daemon.send(m).await {
                        // That request fails, not the session: the client is told, and goes on.
                        let Some(id) = asked else { break Err(format!("agentd serve at {socket}: {e}")) };
                        waiting.remove(&id);
                        let error = rmcp::ErrorData::internal_error(format!("agentd serve at {socket}: {e}"), None);
                        let answer = rmcp::model::ServerJsonRpcMessage::error(error, Some(id));
                        if let Err(e) = client.send(answer).await {
                            break Err(format!("writing to the MCP client: {e}"));
                        }
                        if !answered {
                            // Not even the session's start got through (refused, or no daemon).
                            break Err(format!("agentd serve at {socket}: {e}"));
                        }
                    }
                }
                from_daemon = daemon.receive() => {
                    let Some(m) = from_daemon else {
                        break Err(format!("agentd serve at {socket} ended the MCP session"));
                    };
                    answered = true;
                    match &m {
                        rmcp::model::JsonRpcMessage::Response(r) => { waiting.remove(&r.id); }
                        rmcp::model::JsonRpcMessage::Error(e) => {
                            if let Some(id) = &e.id { waiting.remove(id); }
                        }
                        _ => {}
                    }
                    if let Err(e) = client.send(m).await {
                        break Err(format!("writing to the MCP client: {e}"));
                    }
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), daemon.close()).await;
        ended
    })
}
