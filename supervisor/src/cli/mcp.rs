//! `agentd mcp`: the manifest's tools as an MCP server on stdio.

use std::path::PathBuf;

use clap::Args;
use rmcp::ServiceExt;

use crate::manifest::load_manifest;
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
    if sys::geteuid() != 0 {
        return Err("agentd mcp must run as root: each tools/call runs in a sandbox (cgroups, uid mapping)".into());
    }
    let manifest = load_manifest(&a.manifest).map_err(|lines| format!("invalid manifest:\n{}", lines.join("\n")))?;
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
    let calls = Calls { manifest_path: a.manifest.clone(), audit_log: a.audit_log.clone(), exe };
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
            Some(addr) => serve_http(server, addr).await,
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

/// Streamable HTTP at `http://addr/mcp`, with rmcp's sessions and its loopback-only `Host`
/// check (against DNS rebinding), until agentd is stopped.
async fn serve_http(server: Server, addr: std::net::SocketAddr) -> Result<(), String> {
    use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
    use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
    let service = StreamableHttpService::new(
        move || Ok(server.clone()),
        std::sync::Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--listen {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| format!("--listen {addr}: {e}"))?;
    eprintln!("agentd: mcp: serving MCP (Streamable HTTP) at http://{bound}/mcp");
    let stop = async {
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
    };
    axum::serve(listener, router).with_graceful_shutdown(stop).await.map_err(|e| format!("serving HTTP: {e}"))
}
