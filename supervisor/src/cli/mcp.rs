//! `agentd mcp`: the manifest's tools as an MCP server on stdio.

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
    #[arg(long)]
    manifest: PathBuf,
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
    match serve(a) {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("agentd: {msg}");
            EXIT_REFUSED
        }
    }
}

fn serve(a: McpArgs) -> Result<(), String> {
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
    let file = ManifestFile::read(&a.manifest).map_err(invalid)?;
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
        manifest_path: a.manifest.clone(),
        audit_log: a.audit_log.clone(),
        exe,
        manifest_sha256,
        max_calls: std::sync::Arc::new(tokio::sync::Semaphore::new(usize::from(a.max_calls))),
    };
    let (tools, servers) = (manifest.tools.len(), manifest.mcp.len());
    tracing::info!(manifest = %a.manifest.display(), tools, servers, "mcp: starting");
    runtime.block_on(async move {
        // Each third-party server's tools, fetched once in its sandbox. One that cannot be
        // listed stops agentd mcp: the manifest says its tools are there.
        let mut upstreams = Vec::new();
        for (name, server) in &manifest.mcp {
            let up = crate::mcp::upstream::discover(&calls, name.as_str(), server)
                .await
                .map_err(|e| format!("{}: {e}", a.manifest.display()))?;
            upstreams.push(up);
        }
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
        move || Ok(server.clone()),
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
