//! `agentd bench mcp`: third-party MCP servers under `agentd mcp`, a trivial tool of a Node
//! server (`@modelcontextprotocol/server-filesystem`'s `list_allowed_directories`) and of a
//! Python one (`mcp-server-time`'s `get_current_time`), each with `lifetime = "call"` (a
//! fresh sandbox per call) and `lifetime = "session"` (one sandbox for the session), called
//! in turn from one MCP client session: calls/s and p50/p99 per call.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, Serialize)]
struct Row {
    server: &'static str,
    lifetime: &'static str,
    calls: usize,
    first_ms: f64,
    calls_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The servers: name in the manifest, what it is, its lifetime, and the call made.
const SERVERS: [(&str, &str, &str, &str, &str); 4] = [
    ("node_call", "Node (server-filesystem)", "call", "list_allowed_directories", "{}"),
    ("node_session", "Node (server-filesystem)", "session", "list_allowed_directories", "{}"),
    ("py_call", "Python (mcp-server-time)", "call", "get_current_time", r#"{"timezone": "UTC"}"#),
    ("py_session", "Python (mcp-server-time)", "session", "get_current_time", r#"{"timezone": "UTC"}"#),
];

fn manifest(dir: &Path) -> String {
    let (npm, venv) = (dir.join("npm").display().to_string(), dir.join("venv").display().to_string());
    let mut text = "version = 1\n[agent]\nname = \"bench-mcp\"\n".to_string();
    for (name, _, lifetime, tool, _) in SERVERS {
        if name.starts_with("node") {
            text.push_str(&format!(
                "[mcp.{name}]\ncommand = [\"/usr/bin/node\", \"{npm}/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js\", \"/tmp\"]\n\
                 lifetime = \"{lifetime}\"\ntools = [\"{tool}\"]\nallow_jit = true\n[mcp.{name}.fs]\n\
                 read = [\"/usr\", \"/etc/ld.so.cache\", \"{npm}\"]\nexec = [\"/usr/bin\", \"/usr/lib\"]\n\
                 [mcp.{name}.limits]\ntimeout_ms = 600000\nmemory_mb = 512\n"
            ));
        } else {
            text.push_str(&format!(
                "[mcp.{name}]\ncommand = [\"{venv}/bin/python\", \"-m\", \"mcp_server_time\", \"--local-timezone\", \"UTC\"]\n\
                 lifetime = \"{lifetime}\"\ntools = [\"{tool}\"]\n[mcp.{name}.fs]\n\
                 read = [\"/usr\", \"/etc/ld.so.cache\", \"{venv}\"]\n\
                 exec = [\"/usr/bin\", \"/usr/lib\", \"{venv}/bin\", \"{venv}/lib\"]\n\
                 [mcp.{name}.limits]\ntimeout_ms = 600000\nmemory_mb = 256\n"
            ));
        }
    }
    text
}

/// One MCP client session with `agentd mcp`, line by line.
struct Client {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
    next: u64,
}

impl Client {
    fn request(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next += 1;
        let id = self.next;
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        writeln!(self.stdin, "{msg}").and_then(|()| self.stdin.flush()).map_err(|e| format!("writing: {e}"))?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).map_err(|e| format!("reading: {e}"))? == 0 {
                return Err("agentd mcp ended the session".into());
            }
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("not JSON-RPC ({e}): {line}"))?;
            if v["id"] == json!(id) {
                return Ok(v);
            }
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub(super) fn run(components: Option<PathBuf>, n: usize, json_out: bool) -> Result<(), String> {
    let components = components
        .or_else(|| std::env::var_os("AGENTD_MCP_TOOLS").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/agentd/mcp")))
        .ok_or("--components DIR is needed (what `cargo xtask setup` installs)")?;
    if !components.join("venv/bin/python").exists() || !components.join("npm/node_modules").exists() {
        return Err(format!(
            "{}: no MCP test components (venv, npm); `cargo xtask setup` installs them",
            components.display()
        ));
    }
    // The sandboxes need to read the servers: a copy in a directory of their own, since the
    // components usually sit under root's home (mode 0700).
    // A new directory (never one that exists: another user could have planted it, or a
    // link, in /tmp), root's, which the sandboxes may read but no one else may write.
    let dir = std::env::temp_dir().join(format!("agentd-bench-mcp-{}", uuid::Uuid::new_v4()));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o755)
        .create(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let cleanup = Cleanup(dir.clone());
    eprintln!("agentd: bench mcp: copying the servers to {}", dir.display());
    for what in ["venv", "npm"] {
        let ok = Command::new("cp").arg("-a").arg(components.join(what)).arg(dir.join(what)).status();
        if !ok.is_ok_and(|s| s.success()) {
            return Err(format!("copying {what} from {}", components.display()));
        }
    }
    let m = dir.join("bench.toml");
    std::fs::write(&m, manifest(&dir)).map_err(|e| format!("{}: {e}", m.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    eprintln!("agentd: bench mcp: starting agentd mcp (each server is listed once, in its sandbox)");
    let mut child = Command::new(exe)
        .arg("mcp")
        .arg("--manifest")
        .arg(&m)
        .arg("--audit-log")
        .arg(dir.join("audit.jsonl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting agentd mcp: {e}"))?;
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("agentd mcp has no pipes".into());
    };
    let mut c = Client { child, stdin, stdout: BufReader::new(stdout), next: 0 };
    let init = c.request(
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}),
    )?;
    if !init["result"].is_object() {
        return Err(format!("initialize failed: {init}"));
    }
    writeln!(c.stdin, r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#).map_err(|e| e.to_string())?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); SERVERS.len()];
    // In turn, so that the host's state at any moment weighs on all alike.
    for round in 0..n {
        for (i, (name, _, _, tool, args)) in SERVERS.iter().enumerate() {
            let args: Value = serde_json::from_str(args).map_err(|e| e.to_string())?;
            let t = Instant::now();
            let r = c.request("tools/call", json!({"name": format!("{name}.{tool}"), "arguments": args}))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if !r["result"].is_object() || r["result"]["isError"] == json!(true) {
                return Err(format!("{name}.{tool} failed: {r}"));
            }
            times[i].push(ms);
        }
        if !json_out && (round + 1) % 5 == 0 {
            eprintln!("agentd: bench mcp: {} of {n} rounds", round + 1);
        }
    }
    drop(c.stdin);
    let _ = c.child.wait();
    drop(cleanup);
    let rows: Vec<Row> = SERVERS
        .iter()
        .zip(&times)
        .map(|((_, server, lifetime, _, _), t)| {
            let first = t.first().copied().unwrap_or(0.0);
            let mut sorted = t.clone();
            sorted.sort_by(f64::total_cmp);
            let total: f64 = t.iter().sum();
            Row {
                server,
                lifetime,
                calls: t.len(),
                first_ms: first,
                calls_per_s: if total > 0.0 { t.len() as f64 * 1e3 / total } else { 0.0 },
                p50_ms: quantile(&sorted, 0.5),
                p99_ms: quantile(&sorted, 0.99),
            }
        })
        .collect();
    if json_out {
        outln!("{}", json!({ "bench": "mcp", "rows": rows }));
        return Ok(());
    }
    outln!("MCP servers under agentd mcp, one client session, calls one after another ({n} each, interleaved)");
    outln!(
        "{:<26} {:<8} {:>6} {:>10} {:>8} {:>9} {:>9}",
        "server",
        "lifetime",
        "calls",
        "first ms",
        "calls/s",
        "p50 ms",
        "p99 ms"
    );
    for r in &rows {
        outln!(
            "{:<26} {:<8} {:>6} {:>10.1} {:>8.1} {:>9.1} {:>9.1}",
            r.server,
            r.lifetime,
            r.calls,
            r.first_ms,
            r.calls_per_s,
            r.p50_ms,
            r.p99_ms
        );
    }
    Ok(())
}

/// Removes the bench's directory when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Session sandboxes end just after agentd mcp does, and their execs write their
        // last records here as they go: try again until the directory is gone.
        for _ in 0..50 {
            if std::fs::remove_dir_all(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}
