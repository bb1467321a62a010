//! `agentd mcp`: a manifest's tools as an MCP server, each `tools/call` a sandboxed, audited
//! call. Tried with a hand-driven JSON-RPC session (cancellation, progress, bad input), with
//! the official Python SDK's client over stdio and Streamable HTTP, and with the MCP
//! conformance suite. The last two are installed by `cargo xtask test` under
//! `$AGENTD_MCP_TOOLS`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentd_tests::{agentd_bin, leftover_cgroups, need, processes_with, sandbox_ready, Fixture};
use serde_json::{json, Value};

/// A manifest with `read` (cat of a path under `data/`), `sh` and `sleep` (seconds).
fn manifest(fx: &Fixture) -> PathBuf {
    let data = fx.path("data");
    let text = format!(
        r#"version = 1
[agent]
name = "mcp-it"
[tools.read]
description = "Read a file of the data directory"
argv = ["/bin/cat", "--", "{{path}}"]
[tools.read.args.path]
type = "path"
[tools.read.fs]
read = ["/usr", "/etc/ld.so.cache", "{data}"]
exec = ["/usr/bin", "/usr/lib"]
[tools.sh]
description = "A shell command"
argv = ["/bin/sh", "-c", "{{command}}"]
[tools.sh.args.command]
max_length = 200
[tools.sh.fs]
read = ["/usr", "/etc/ld.so.cache", "{data}"]
exec = ["/usr/bin", "/usr/lib"]
[tools.sleep]
description = "Sleeps"
argv = ["/bin/sleep", "{{seconds}}"]
[tools.sleep.args.seconds]
type = "number"
min = 0
max = 60
[tools.sleep.fs]
read = ["/usr", "/etc/ld.so.cache"]
exec = ["/usr/bin", "/usr/lib"]
[tools.sleep.limits]
timeout_ms = 60000
"#
    );
    let path = fx.dir.join("mcp.toml");
    std::fs::write(&path, text).expect("write manifest");
    path
}

/// `agentd mcp` on stdio, driven line by line.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
    next_id: u64,
}

/// `agentd mcp` for `manifest`, recording into `audit_log`, with `extra` flags.
fn agentd_mcp(manifest: &Path, audit_log: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(agentd_bin());
    cmd.arg("mcp").args(extra).arg("--manifest").arg(manifest).arg("--audit-log").arg(audit_log);
    cmd
}

/// A session ends with its input; an `agentd mcp` (or bridge) that does not end within 10 s
/// of it is killed, so that a failed test leaves nothing running.
impl Drop for Session {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Session {
    fn start(manifest: &Path, audit_log: &Path) -> Self {
        Self::spawn(agentd_mcp(manifest, audit_log, &[]))
    }

    /// A session with `cmd`, which serves MCP on its stdio, initialized.
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start agentd mcp");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON-RPC ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut s = Self { child, stdin, lines, next_id: 1 };
        let init = s.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "it", "version": "1"}}),
        );
        assert_eq!(init["result"]["serverInfo"]["name"], "agentd", "{init}");
        assert!(init["result"]["capabilities"]["tools"].is_object(), "{init}");
        s.notify("notifications/initialized", json!({}));
        s
    }

    fn send(&mut self, msg: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{msg}").expect("write to agentd mcp");
        stdin.flush().expect("flush");
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    /// Sends a request; returns its id.
    fn send_request(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    /// The next message, within `wait`.
    fn next(&self, wait: Duration) -> Value {
        self.lines.recv_timeout(wait).unwrap_or_else(|e| panic!("no message from agentd mcp within {wait:?}: {e}"))
    }

    /// Messages until the response to `id` (which is last).
    fn until_response(&self, id: u64, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let m = self.next(deadline.saturating_duration_since(Instant::now()));
            let done = m["id"] == json!(id);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.send_request(method, params);
        self.until_response(id, Duration::from_secs(30)).pop().expect("a response")
    }

    fn call(&mut self, tool: &str, args: Value) -> Value {
        let r = self.request("tools/call", json!({"name": tool, "arguments": args}));
        assert!(r["result"].is_object(), "tools/call {tool} gave no result: {r}");
        r["result"].clone()
    }
}

fn text_of(result: &Value) -> String {
    result["content"].as_array().into_iter().flatten().filter_map(|c| c["text"].as_str()).collect::<Vec<_>>().join("\n")
}

/// The audit log's records of `call_id`.
fn records(audit_log: &Path, call_id: &str) -> Vec<Value> {
    std::fs::read_to_string(audit_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["call_id"] == call_id)
        .collect()
}

fn summary(audit_log: &Path, call_id: &str) -> Value {
    records(audit_log, call_id)
        .into_iter()
        .find(|r| r["kind"] == "summary")
        .unwrap_or_else(|| panic!("no summary record of call {call_id} in {}", audit_log.display()))
}

/// Waits up to 15 s for a process whose command line holds `marker` (`note` says whose).
fn wait_for_process(marker: &str, note: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while processes_with(marker).is_empty() {
        assert!(Instant::now() < deadline, "the call is not running: {note}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn agentd_mcp_serves_the_manifests_tools_each_call_in_its_sandbox() {
    if !sandbox_ready("agentd_mcp_serves_the_manifests_tools_each_call_in_its_sandbox") {
        return;
    }
    let fx = Fixture::new("mcp");
    let m = manifest(&fx);
    let log = fx.dir.join("audit.jsonl");
    let mut s = Session::start(&m, &log);

    // tools/list: the manifest's tools, with schemas from their arguments.
    let list = s.request("tools/list", json!({}));
    let tools = list["result"]["tools"].as_array().expect("tools").clone();
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["read", "sh", "sleep"], "{list}");
    let read = &tools[0];
    assert_eq!(read["description"], "Read a file of the data directory");
    assert_eq!(read["inputSchema"]["required"], json!(["path"]));
    assert_eq!(read["inputSchema"]["additionalProperties"], false);
    assert!(read["inputSchema"]["properties"]["path"]["description"]
        .as_str()
        .expect("a description")
        .contains(&fx.path("data")));
    assert_eq!(tools[2]["inputSchema"]["properties"]["seconds"]["maximum"], 60.0);

    // A call inside the grant: the tool's output, the verdict and a call id in the log.
    let ok = s.call("read", json!({"path": fx.path("data/file.txt")}));
    assert_eq!(ok["isError"], false, "{ok}");
    assert_eq!(text_of(&ok), "public data\n");
    assert_eq!(ok["structuredContent"]["verdict"], "ok");
    let id = ok["structuredContent"]["call_id"].as_str().expect("call id").to_string();
    assert_eq!(summary(&log, &id)["details"]["exit_code"], 0);
    assert!(records(&log, &id).iter().any(|r| r["kind"] == "call_start"), "no start record of {id}");

    // Arguments outside the manifest are refused, recorded, and leak nothing.
    for bad in [
        json!({"path": fx.path("secret/token")}),
        json!({"path": format!("{}/../secret/token", fx.path("data"))}),
        json!({"path": 5}),
        json!({"path": fx.path("data/file.txt"), "extra": "x"}),
        json!({}),
    ] {
        let r = s.call("read", bad.clone());
        assert_eq!(r["isError"], true, "{bad}: {r}");
        assert_eq!(r["structuredContent"]["verdict"], "refused", "{bad}: {r}");
        assert!(!r.to_string().contains(&fx.secret), "the secret leaked: {r}");
        let id = r["structuredContent"]["call_id"].as_str().expect("call id");
        assert_eq!(summary(&log, id)["details"]["exit_code"], 125, "{bad}: the refusal was not recorded");
    }

    // A tool that tries to read what its grants leave out: the kernel says no.
    let r = s.call("sh", json!({"command": format!("cat {}", fx.path("secret/token"))}));
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(r["structuredContent"]["verdict"], "failed");
    assert!(!r.to_string().contains(&fx.secret), "the secret leaked: {r}");

    // An unknown tool is a protocol error, and the session goes on.
    let r = s.request("tools/call", json!({"name": "nope", "arguments": {}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");
    assert_eq!(s.request("ping", json!({}))["result"], json!({}));

    // Progress while a call runs longer than a second.
    let id = s.send_request(
        "tools/call",
        json!({"name": "sleep", "arguments": {"seconds": 2.5}, "_meta": {"progressToken": "p-1"}}),
    );
    let seen = s.until_response(id, Duration::from_secs(20));
    let progress: Vec<f64> = seen
        .iter()
        .filter(|m| m["method"] == "notifications/progress" && m["params"]["progressToken"] == "p-1")
        .filter_map(|m| m["params"]["progress"].as_f64())
        .collect();
    assert!(progress.len() >= 2 && progress.windows(2).all(|w| w[0] < w[1]), "progress: {seen:?}");
    assert_eq!(seen.last().expect("the response")["result"]["structuredContent"]["verdict"], "ok");

    // Cancellation kills the call's whole sandbox, and the kill is recorded.
    // Ends in 1, so that the number prints back exactly as written.
    let marker = format!("40.{}1", std::process::id() % 1000);
    let id = s.send_request(
        "tools/call",
        json!({"name": "sleep", "arguments": {"seconds": marker.parse::<f64>().expect("a number")}, "_meta": {"progressToken": "p-2"}}),
    );
    let first = s.next(Duration::from_secs(10));
    assert_eq!(first["method"], "notifications/progress", "{first}");
    let note = first["params"]["message"].as_str().unwrap_or_default().to_string();
    let call_id = note.rsplit("(call ").next().unwrap_or_default().trim_end_matches(')').to_string();
    // The progress clock starts with the call; under load its sandbox may still be on its
    // way to exec the tool.
    wait_for_process(&marker, &note);
    s.notify("notifications/cancelled", json!({"requestId": id, "reason": "test"}));
    let deadline = Instant::now() + Duration::from_secs(15);
    while (!processes_with(&marker).is_empty() || !leftover_cgroups(&call_id).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(processes_with(&marker).is_empty(), "the cancelled call's process survived");
    assert!(leftover_cgroups(&call_id).is_empty(), "the cancelled call's cgroup survived");
    while !records(&log, &call_id).iter().any(|r| r["kind"] == "summary") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let sum = summary(&log, &call_id);
    assert_eq!(sum["details"]["signal"], 9, "{sum}");
    assert_eq!(s.request("ping", json!({}))["result"], json!({}));

    // A manifest edited under a running server does not change what its calls may do.
    let mut text = std::fs::read_to_string(&m).expect("read manifest");
    text.push_str("\n# edited\n");
    std::fs::write(&m, text).expect("edit manifest");
    let r = s.call("read", json!({"path": fx.path("data/file.txt")}));
    assert_eq!(r["structuredContent"]["verdict"], "refused", "{r}");
    assert!(text_of(&r).contains("changed since"), "{r}");

    // Closing stdin ends the server.
    drop(s.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = s.child.try_wait().expect("wait").expect("agentd mcp did not exit when its client left");
    assert!(status.success(), "{status}");
    let verify = agentd_tests::agentd(["audit".as_ref(), "verify".as_ref(), log.as_os_str()]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

#[test]
fn agentd_mcp_listens_on_loopback_only_and_with_a_secret_unless_told_otherwise() {
    let out = agentd_tests::agentd(["mcp", "--manifest", "/nonexistent.toml", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only a loopback address"), "{out:?}");
    let out = agentd_tests::agentd(["mcp", "--manifest", "/nonexistent.toml", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"), "{out:?}");
}

/// The status of a bare `initialize` POST to `url`, with `authorization` if given.
fn http_status(url: &str, authorization: Option<&str>) -> u16 {
    use std::io::Read;
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"it","version":"1"}}}"#;
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = std::net::TcpStream::connect(host).expect("connect");
    s.write_all(req.as_bytes()).expect("send");
    let mut head = [0u8; 12];
    s.read_exact(&mut head).expect("a status line");
    String::from_utf8_lossy(&head[9..12]).parse().expect("a status code")
}

/// `$AGENTD_MCP_TOOLS` (installed by `cargo xtask test`), or why the test cannot run.
fn components(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("AGENTD_MCP_TOOLS").map(PathBuf::from);
    let ready = dir
        .as_ref()
        .is_some_and(|d| d.join("venv/bin/python").exists() && d.join("npm/node_modules/.bin/conformance").exists());
    need(
        test,
        "mcp",
        ready,
        "the MCP test components are not installed (cargo xtask test puts them in $AGENTD_MCP_TOOLS)",
    )
    .then(|| dir.expect("checked"))
}

/// `agentd mcp --listen 127.0.0.1:0`, killed on drop; with its URL.
struct Listening {
    child: Child,
    url: String,
}

impl Listening {
    /// `auth`: `["--token-file", FILE]` or `["--unauthenticated"]`.
    fn start(manifest: &Path, audit_log: &Path, auth: &[&str]) -> Self {
        let flags: Vec<&str> = ["--listen", "127.0.0.1:0"].into_iter().chain(auth.iter().copied()).collect();
        let mut child = agentd_mcp(manifest, audit_log, &flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agentd mcp --listen");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                if let Some(at) = line.find("http://") {
                    let _ = tx.send(line[at..].trim().to_string());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(20)).expect("agentd mcp --listen printed no URL");
        Self { child, url }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_python_sdk_client_uses_agentd_over_stdio_and_http() {
    let test = "the_python_sdk_client_uses_agentd_over_stdio_and_http";
    if !sandbox_ready(test) {
        return;
    }
    let Some(dir) = components(test) else { return };
    let fx = Fixture::new("mcp-py");
    let m = manifest(&fx);
    let log = fx.dir.join("audit.jsonl");
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/client.py");
    let python = dir.join("venv/bin/python");
    let file = fx.path("data/file.txt");
    let secret = agentd_tests::token("bearer");
    let token_file = fx.dir.join("token");
    std::fs::write(&token_file, &secret).expect("write the token");
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    let token_arg = token_file.display().to_string();
    let http = Listening::start(&m, &log, &["--token-file", &token_arg]);
    // Without the secret, or with another, nothing is served.
    for auth in [None, Some("Bearer not-the-secret-at-all")] {
        let status = http_status(&http.url, auth);
        assert_eq!(status, 401, "{auth:?}");
    }
    let runs = [
        Command::new(&python).arg(&client).arg("stdio").arg(agentd_bin()).arg(&m).arg(&log).arg(&file).output(),
        Command::new(&python).arg(&client).args(["http", &http.url, &file, &secret]).output(),
    ];
    for (how, out) in ["stdio", "Streamable HTTP"].iter().zip(runs) {
        let out = out.expect("run the Python client");
        assert!(out.status.success(), "{how}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON");
        let names: Vec<&str> =
            v["tools"].as_array().expect("tools").iter().filter_map(|t| t["name"].as_str()).collect();
        assert_eq!(names, ["read", "sh", "sleep"], "{how}");
        assert_eq!(v["inside"]["isError"], false, "{how}: {v}");
        assert_eq!(v["inside"]["content"][0]["text"], "public data\n", "{how}: {v}");
        assert_eq!(v["outside"]["isError"], true, "{how}: {v}");
        assert_eq!(v["outside"]["structuredContent"]["verdict"], "refused", "{how}: {v}");
        for key in ["inside", "outside"] {
            let id = v[key]["structuredContent"]["call_id"].as_str().expect("call id");
            summary(&log, id);
        }
    }
}

/// Server scenarios of the conformance suite that a server of tools alone can pass; the rest
/// ask for resources, prompts, completion, logging, sampling, elicitation or non-text
/// content, which agentd does not offer (docs/mcp.md says why).
const CONFORMANCE: &[&str] = &[
    "server-initialize",
    "ping",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-error",
    "tools-call-with-progress",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
];

#[test]
fn the_mcp_conformance_suite_passes_its_tools_scenarios() {
    let test = "the_mcp_conformance_suite_passes_its_tools_scenarios";
    if !sandbox_ready(test) {
        return;
    }
    let Some(dir) = components(test) else { return };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/conformance.toml");
    let fx = Fixture::new("mcp-conformance");
    let log = fx.dir.join("audit.jsonl");
    let server = Listening::start(&manifest, &log, &["--unauthenticated"]);
    let mut failed = Vec::new();
    for scenario in CONFORMANCE {
        let out = Command::new(dir.join("npm/node_modules/.bin/conformance"))
            .args(["server", "--url", &server.url, "--scenario", scenario])
            .output()
            .expect("run the conformance suite");
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let passed = out.status.success() && text.contains("0 failed") && !text.contains(" 0 passed");
        if !passed {
            failed.push(format!("{scenario}:\n{text}"));
        }
    }
    assert!(failed.is_empty(), "conformance scenarios failed:\n{}", failed.join("\n"));
}

/// Copies `$AGENTD_MCP_TOOLS/{venv,npm}` into the fixture: a sandbox sees no home directory.
fn copy_components(dir: &Path, fx: &Fixture) {
    for what in ["venv", "npm"] {
        let status = Command::new("cp").arg("-a").arg(dir.join(what)).arg(fx.dir.join(what)).status().expect("cp");
        assert!(status.success(), "copying {what}");
    }
}

/// `@modelcontextprotocol/server-filesystem` (copied into `fx` by [`copy_components`]) as
/// `[mcp.files]` offering `tools`: given "/" as its root, confined by its grants to the
/// fixture's `data/`.
fn files_server(fx: &Fixture, tools: &str) -> String {
    let (npm, data) = (fx.path("npm"), fx.path("data"));
    format!(
        r#"[mcp.files]
command = ["/usr/bin/node", "{npm}/node_modules/@modelcontextprotocol/server-filesystem/dist/index.js", "/"]
tools = {tools}
allow_jit = true
[mcp.files.fs]
read = ["/usr", "/etc/ld.so.cache", "{npm}", "{data}"]
exec = ["/usr/bin", "/usr/lib"]
[mcp.files.limits]
timeout_ms = 30000
memory_mb = 512
"#
    )
}

#[test]
fn third_party_mcp_servers_run_confined_a_sandbox_per_call() {
    let test = "third_party_mcp_servers_run_confined_a_sandbox_per_call";
    if !sandbox_ready(test) {
        return;
    }
    let Some(dir) = components(test) else { return };
    let fx = Fixture::new("mcp-upstream");
    copy_components(&dir, &fx);
    let venv = fx.path("venv");
    let manifest = fx.dir.join("servers.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"version = 1
[agent]
name = "mcp-servers"
{files}[mcp.time]
command = ["{venv}/bin/python", "-m", "mcp_server_time", "--local-timezone", "UTC"]
tools = ["get_current_time"]
[mcp.time.fs]
read = ["/usr", "/etc/ld.so.cache", "{venv}"]
exec = ["/usr/bin", "/usr/lib", "{venv}/bin", "{venv}/lib"]
[mcp.time.limits]
timeout_ms = 30000
memory_mb = 256
"#,
            files = files_server(&fx, r#"["read_text_file", "list_directory"]"#)
        ),
    )
    .expect("write manifest");
    let log = fx.dir.join("audit.jsonl");
    let mut s = Session::start(&manifest, &log);
    let list = s.request("tools/list", json!({}));
    let names: Vec<&str> =
        list["result"]["tools"].as_array().expect("tools").iter().filter_map(|t| t["name"].as_str()).collect();
    // Only what the manifest offers: the filesystem server's write_file is not among them.
    assert_eq!(names, ["files.list_directory", "files.read_text_file", "time.get_current_time"], "{list}");

    // The filesystem server was given "/" as its root; its sandbox holds only its grants.
    let ok = s.call("files.read_text_file", json!({"path": fx.path("data/file.txt")}));
    assert_ne!(ok["isError"], true, "{ok}");
    assert!(text_of(&ok).contains("public data"), "{ok}");
    assert_eq!(ok["_meta"]["agentd/verdict"], "ok", "agentd's word on the sandbox: {ok}");
    let first = ok["_meta"]["agentd/call_id"].as_str().expect("call id").to_string();
    for path in ["/etc/shadow".to_string(), fx.path("secret/token")] {
        let r = s.call("files.read_text_file", json!({"path": path}));
        assert_eq!(r["isError"], true, "{path}: {r}");
        assert!(!r.to_string().contains(&fx.secret), "the secret leaked: {r}");
        let id = r["_meta"]["agentd/call_id"].as_str().expect("call id");
        assert_ne!(id, first, "each call has its own sandbox and call id");
        // The server's attempt is in the audit records of that call, with the kernel's answer.
        let opened = records(&log, id).into_iter().find(|e| e["kind"] == "open" && e["details"]["path"] == path);
        let opened = opened.unwrap_or_else(|| panic!("no open record of {path} in call {id}"));
        assert!(opened["details"]["result"].as_i64().is_some_and(|r| r < 0), "{opened}");
        assert_eq!(summary(&log, id)["tool"], "mcp.files");
    }
    // A tool the manifest does not offer never reaches the server.
    let r =
        s.request("tools/call", json!({"name": "files.write_file", "arguments": {"path": "/tmp/x", "content": "x"}}));
    assert_eq!(r["error"]["code"], -32602, "{r}");

    // A Python server, started in a fresh sandbox for each call.
    let t = s.call("time.get_current_time", json!({"timezone": "Europe/Paris"}));
    assert_ne!(t["isError"], true, "{t}");
    assert!(text_of(&t).contains("Europe/Paris"), "{t}");
    let id = t["_meta"]["agentd/call_id"].as_str().expect("call id");
    assert_eq!(summary(&log, id)["details"]["exit_code"], 0);
    assert_eq!(s.request("ping", json!({}))["result"], json!({}));
    drop(s);

    // A pinned listing: the one the server gives is served; any other stops agentd mcp.
    let listing = t["_meta"]["agentd/server_listing"].as_str().expect("the listing's hash").to_string();
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let pin = |sha: &str| {
        text.replace(
            "tools = [\"get_current_time\"]",
            &format!("tools = [\"get_current_time\"]\nlisting_sha256 = \"{sha}\""),
        )
    };
    std::fs::write(&manifest, pin(&listing)).expect("pin");
    let mut s = Session::start(&manifest, &log);
    let t = s.call("time.get_current_time", json!({"timezone": "UTC"}));
    assert_ne!(t["isError"], true, "{t}");
    drop(s);
    std::fs::write(&manifest, pin(&"0".repeat(64))).expect("pin another");
    let out = agentd_mcp(&manifest, &log, &[]).stdin(Stdio::null()).output().expect("run agentd mcp");
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listing of the offered tools changed") && err.contains(&listing), "{err}");
}

#[test]
fn a_server_that_crashes_or_babbles_fails_its_call_and_the_session_goes_on() {
    let test = "a_server_that_crashes_or_babbles_fails_its_call_and_the_session_goes_on";
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("mcp-flaky");
    let script = fx.dir.join("flaky.py");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/flaky.py"), &script).expect("copy flaky.py");
    let manifest = fx.dir.join("flaky.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"version = 1
[agent]
name = "mcp-flaky"
[mcp.flaky]
command = ["/usr/bin/python3", "{script}"]
tools = ["crash", "garbage", "slow"]
[mcp.flaky.fs]
read = ["/usr", "/etc/ld.so.cache", "{dir}"]
exec = ["/usr/bin", "/usr/lib"]
[mcp.flaky.limits]
timeout_ms = 120000
[mcp.hasty]
command = ["/usr/bin/python3", "{script}"]
tools = ["slow"]
[mcp.hasty.fs]
read = ["/usr", "/etc/ld.so.cache", "{dir}"]
exec = ["/usr/bin", "/usr/lib"]
[mcp.hasty.limits]
timeout_ms = 3000
"#,
            script = script.display(),
            dir = fx.dir.display()
        ),
    )
    .expect("write manifest");
    let log = fx.dir.join("audit.jsonl");
    let mut s = Session::start(&manifest, &log);
    for tool in ["flaky.crash", "flaky.garbage"] {
        let r = s.call(tool, json!({}));
        assert_eq!(r["isError"], true, "{tool}: {r}");
        let id = r["structuredContent"]["call_id"].as_str().expect("call id");
        assert!(text_of(&r).contains(id), "{tool}: the message names the call: {r}");
        assert_eq!(s.request("ping", json!({}))["result"], json!({}), "{tool}: the session ended");
    }
    // A server whose sandbox runs out of time: agentd says so, whatever the server wrote.
    let r = s.call("hasty.slow", json!({}));
    assert_eq!(r["isError"], true, "{r}");
    assert_eq!(r["structuredContent"]["verdict"], "timed_out", "{r}");

    // Cancelling a call ends the server's sandbox.
    let marker = script.display().to_string();
    let id = s.send_request("tools/call", json!({"name": "flaky.slow", "arguments": {}}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_with(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!processes_with(&marker).is_empty(), "the slow server never started");
    s.notify("notifications/cancelled", json!({"requestId": id, "reason": "test"}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_with(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(processes_with(&marker).is_empty(), "the cancelled server's process survived");
    assert_eq!(s.request("ping", json!({}))["result"], json!({}));
}

/// `agentd serve` hosting agent `main` (the manifest of [`manifest`]), killed on drop; roles:
/// root may do anything, uid 1000 may submit tasks but not call tools, uid 1001 may call
/// tools directly.
struct Served {
    child: Child,
    socket: PathBuf,
    audit: PathBuf,
}

impl Served {
    fn start(fx: &Fixture) -> Self {
        Self::start_with(fx, &manifest(fx), "tool = \"sh\"\nargs = { command = \"true\" }\ncalls = 1")
    }

    /// With agent `main` of `m`, and the scripted model's `tool`, `args` and `calls`.
    fn start_with(fx: &Fixture, m: &Path, script: &str) -> Self {
        let cfg = format!(
            r#"version = 1
[paths]
socket = "{dir}/agentd.sock"
state_dir = "{dir}/state"
audit_log = "{dir}/serve-audit.jsonl"
[model]
backend = "scripted"
{script}
[agents.main]
manifest = "{m}"
max_concurrent_calls = 2
[roles.admin]
uids = [0]
agents = ["*"]
tools = true
audit = true
[roles.submitters]
uids = [1000]
agents = ["main"]
[roles.callers]
uids = [1001]
agents = ["main"]
tools = true
"#,
            dir = fx.dir.display(),
            m = m.display()
        );
        let path = fx.dir.join("agentd.toml");
        std::fs::write(&path, cfg).expect("write config");
        let socket = fx.dir.join("agentd.sock");
        let child = agentd_tests::serve(&path, &socket);
        Self { child, socket, audit: fx.dir.join("serve-audit.jsonl") }
    }

    /// `agentd mcp --socket ... --agent AGENT` as `uid` (root when `None`).
    fn bridge(&self, agent: &str, uid: Option<u32>) -> Command {
        let mut cmd = Command::new(agentd_bin());
        cmd.args(["mcp", "--socket"]).arg(&self.socket).args(["--agent", agent]);
        if let Some(uid) = uid {
            std::os::unix::process::CommandExt::uid(&mut cmd, uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        }
        cmd
    }

    /// One HTTP request on the socket as `uid` (a small Python client, so that the kernel
    /// gives the daemon that uid): the status and the `mcp-session-id` it returned, if any.
    fn http_as(&self, uid: u32, method: &str, path: &str, session: Option<&str>, body: &str) -> (u16, Option<String>) {
        const CLIENT: &str = r#"
import http.client, socket, sys
class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(sys.argv[1])
c = Unix("agentd", timeout=30)
h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
if sys.argv[4]:
    h["Mcp-Session-Id"] = sys.argv[4]
c.request(sys.argv[2], sys.argv[3], body=sys.argv[5].encode() or None, headers=h)
r = c.getresponse()
print(r.status, r.getheader("mcp-session-id") or "")
"#;
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.args(["-c", CLIENT]).arg(&self.socket).args([method, path, session.unwrap_or(""), body]);
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, uid);
        let out = cmd.output().expect("run python3");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut words = text.split_whitespace();
        let status = words
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status: {text} {}", String::from_utf8_lossy(&out.stderr)));
        (status, words.next().map(str::to_string))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a failed test needs to say about processes that outlived their call: each one's
/// command line and cgroup, and the daemon's calls as its store has them.
fn survivors(pids: &[u32], socket: &Path) -> String {
    let mut out = String::new();
    for pid in pids {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        out.push_str(&format!(
            "\npid {pid}: {} in {}",
            String::from_utf8_lossy(&cmd).replace('\0', " "),
            cgroup.replace('\n', " ")
        ));
    }
    let calls = agentd_tests::agentd([
        "ctl".as_ref(),
        "--socket".as_ref(),
        socket.as_os_str(),
        "--json".as_ref(),
        "ls".as_ref(),
        "calls".as_ref(),
        "--agent".as_ref(),
        "main".as_ref(),
    ]);
    out.push_str(&format!("\nthe daemon's calls: {}", String::from_utf8_lossy(&calls.stdout)));
    out
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"it","version":"1"}}}"#;

#[test]
fn agentd_serve_offers_its_agents_tools_over_mcp_to_the_roles_that_may_call_them() {
    let test = "agentd_serve_offers_its_agents_tools_over_mcp_to_the_roles_that_may_call_them";
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("mcp-serve");
    let d = Served::start(&fx);

    // The stdio bridge, as root: the calls run in the daemon's workers and are recorded in
    // its audit log and its store.
    let mut s = Session::spawn(d.bridge("main", None));
    let list = s.request("tools/list", json!({}));
    let names: Vec<&str> =
        list["result"]["tools"].as_array().expect("tools").iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["read", "sh", "sleep"], "{list}");
    let ok = s.call("read", json!({"path": fx.path("data/file.txt")}));
    assert_eq!(ok["isError"], false, "{ok}");
    assert_eq!(text_of(&ok), "public data\n");
    let id = ok["structuredContent"]["call_id"].as_str().expect("call id").to_string();
    assert_eq!(summary(&d.audit, &id)["details"]["exit_code"], 0);
    for bad in [json!({"path": "/etc/shadow"}), json!({"path": fx.path("secret/token")}), json!({"path": [1]})] {
        let r = s.call("read", bad.clone());
        assert_eq!(r["structuredContent"]["verdict"], "refused", "{bad}: {r}");
        assert!(!r.to_string().contains(&fx.secret), "the secret leaked: {r}");
        let id = r["structuredContent"]["call_id"].as_str().expect("call id");
        assert_eq!(summary(&d.audit, id)["details"]["exit_code"], 125, "{bad}: the refusal was not recorded");
    }
    let r = s.call("sh", json!({"command": format!("cat {}", fx.path("secret/token"))}));
    assert_eq!(r["structuredContent"]["verdict"], "failed", "{r}");
    assert!(!r.to_string().contains(&fx.secret), "the secret leaked: {r}");

    // Cancelling a call kills its sandbox in the daemon; the session goes on.
    let marker = format!("41.{}1", std::process::id() % 1000);
    let rid = s.send_request(
        "tools/call",
        json!({"name": "sleep", "arguments": {"seconds": marker.parse::<f64>().expect("a number")}, "_meta": {"progressToken": "p"}}),
    );
    let first = s.next(Duration::from_secs(15));
    assert_eq!(first["method"], "notifications/progress", "{first}");
    let note = first["params"]["message"].as_str().unwrap_or_default().to_string();
    let call_id = note.rsplit("(call ").next().unwrap_or_default().trim_end_matches(')').to_string();
    // The progress clock starts with the call; under load its sandbox may still be on its
    // way to exec the tool.
    wait_for_process(&marker, &note);
    s.notify("notifications/cancelled", json!({"requestId": rid, "reason": "test"}));
    let deadline = Instant::now() + Duration::from_secs(15);
    while (!processes_with(&marker).is_empty() || !leftover_cgroups(&call_id).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(processes_with(&marker).is_empty(), "the cancelled call's process survived");
    assert!(leftover_cgroups(&call_id).is_empty(), "the cancelled call's cgroup survived");
    assert_eq!(s.request("ping", json!({}))["result"], json!({}));

    // One uid's calls in flight are bounded, waiting ones included: one more is refused at
    // once, and cancelling them leaves nothing running.
    let marker = format!("42.{}1", std::process::id() % 1000);
    let seconds = marker.parse::<f64>().expect("a number");
    // The bridge sends each request on its own, so they may reach the daemon in any order:
    // of 17, whichever comes last is refused.
    let sent: Vec<u64> = (0..17)
        .map(|_| s.send_request("tools/call", json!({"name": "sleep", "arguments": {"seconds": seconds}})))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    let over = loop {
        let m = s.next(deadline.saturating_duration_since(Instant::now()));
        if m.get("id").is_some() {
            break m;
        }
    };
    assert!(over["error"]["message"].as_str().unwrap_or_default().contains("in flight"), "{over}");
    let held: Vec<u64> = sent.into_iter().filter(|id| over["id"] != json!(id)).collect();
    assert_eq!(held.len(), 16, "{over}");
    for id in held {
        s.notify("notifications/cancelled", json!({"requestId": id, "reason": "test"}));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_with(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = processes_with(&marker);
    assert!(left.is_empty(), "a cancelled call's process survived: {}", survivors(&left, &d.socket));
    assert_eq!(s.request("ping", json!({}))["result"], json!({}));
    drop(s.stdin.take());
    let _ = s.child.wait();

    // The store has the direct calls, with no task.
    let out = agentd_tests::agentd([
        "ctl".as_ref(),
        "--socket".as_ref(),
        d.socket.as_os_str(),
        "--json".as_ref(),
        "ls".as_ref(),
        "calls".as_ref(),
        "--agent".as_ref(),
        "main".as_ref(),
        "--limit".as_ref(),
        "100".as_ref(),
    ]);
    let calls: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ctl calls: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(calls.to_string().contains(&id), "the call is not in the store: {calls}");

    // A role that may submit tasks may not call tools directly, by bridge or by HTTP.
    let denied =
        d.bridge("main", Some(1000)).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut denied = denied.expect("start the bridge as uid 1000");
    writeln!(denied.stdin.as_mut().expect("stdin"), "{INITIALIZE}").expect("write");
    let out = denied.wait_with_output().expect("the bridge ends");
    assert!(!out.status.success(), "uid 1000 was served: {}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("serverInfo"), "uid 1000 was served");
    assert!(String::from_utf8_lossy(&out.stdout).contains("403"), "the client is told why: {out:?}");
    assert_eq!(d.http_as(1000, "POST", "/mcp/main", None, INITIALIZE).0, 403);
    assert_eq!(d.http_as(1001, "POST", "/mcp/nope", None, INITIALIZE).0, 404);

    // A session belongs to the uid that opened it: another caller that names it finds none.
    let (status, session) = d.http_as(0, "POST", "/mcp/main", None, INITIALIZE);
    assert_eq!(status, 200);
    let session = session.expect("a session id");
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{}}"#;
    assert_eq!(d.http_as(1001, "POST", "/mcp/main", Some(&session), list).0, 404);
    assert_eq!(d.http_as(1001, "DELETE", "/mcp/main", Some(&session), "").0, 404);
    assert_ne!(d.http_as(0, "POST", "/mcp/main", Some(&session), list).0, 404, "the owner lost its session");

    // A caller whose role says so is served, under its own uid.
    let mut s = Session::spawn(d.bridge("main", Some(1001)));
    let ok = s.call("read", json!({"path": fx.path("data/file.txt")}));
    assert_eq!(text_of(&ok), "public data\n", "{ok}");

    // The official Python SDK's client, over the daemon's Streamable HTTP on its socket.
    if let Some(dir) = components(test) {
        let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/client.py");
        let out = Command::new(dir.join("venv/bin/python"))
            .arg(client)
            .arg("unix")
            .arg(&d.socket)
            .arg("main")
            .arg(fx.path("data/file.txt"))
            .output()
            .expect("run the Python client");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("the client's JSON");
        assert_eq!(v["inside"]["content"][0]["text"], "public data\n", "{v}");
        assert_eq!(v["outside"]["structuredContent"]["verdict"], "refused", "{v}");
        summary(&d.audit, v["inside"]["structuredContent"]["call_id"].as_str().expect("call id"));
    }
    let verify = agentd_tests::agentd(["audit".as_ref(), "verify".as_ref(), d.audit.as_os_str()]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    // The daemon goes away with a call unanswered: the bridge answers it with an error and
    // ends, rather than wait for ever.
    let mut s = Session::spawn(d.bridge("main", None));
    let rid = s.send_request("tools/call", json!({"name": "sleep", "arguments": {"seconds": 30}}));
    std::thread::sleep(Duration::from_secs(1));
    drop(s.stdin.take());
    let mut d = d;
    let _ = d.child.kill();
    let _ = d.child.wait();
    let answer = s.until_response(rid, Duration::from_secs(15)).pop().expect("an answer");
    assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains("went away")), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.child.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the bridge did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_session_server_keeps_one_sandbox_per_client_session_and_each_call_its_own_records() {
    let test = "a_session_server_keeps_one_sandbox_per_client_session_and_each_call_its_own_records";
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("mcp-session");
    let script = fx.dir.join("counter.py");
    let manifest = fx.dir.join("session.toml");
    let counter = counter_server(&fx, r#"["count", "read", "slow"]"#);
    std::fs::write(&manifest, format!("version = 1\n[agent]\nname = \"mcp-session\"\n{counter}"))
        .expect("write manifest");
    let log = fx.dir.join("audit.jsonl");
    let mut s = Session::start(&manifest, &log);
    let count = |s: &mut Session| {
        let r = s.call("counter.count", json!({}));
        assert_eq!(r["isError"], false, "{r}");
        let text = text_of(&r);
        let (n, pid) = text.split_once(' ').expect("COUNT PID");
        (n.parse::<u32>().expect("a count"), pid.to_string(), r)
    };
    // Calls of one session share the server's process (its counter goes on) ...
    let (one, pid, first) = count(&mut s);
    let (two, pid2, second) = count(&mut s);
    assert_eq!((one, two), (1, 2), "the second call saw the first one's state");
    assert_eq!(pid, pid2, "one process served both calls");
    // ... and each call has its own id, start and summary, naming the sandbox's call.
    let ids: Vec<String> =
        [&first, &second].iter().map(|r| r["_meta"]["agentd/call_id"].as_str().expect("call id").to_string()).collect();
    assert_ne!(ids[0], ids[1]);
    let mut sandboxes = Vec::new();
    for id in &ids {
        let sum = summary(&log, id);
        assert_eq!(sum["details"]["lifetime"], "session", "{sum}");
        assert_eq!(
            sum["details"]["verdict"], "unknown",
            "the sandbox lives on, so its verdict is not yet known: {sum}"
        );
        assert!(sum["details"]["from_ktime_ns"].as_u64() < sum["details"]["to_ktime_ns"].as_u64(), "{sum}");
        assert!(records(&log, id).iter().any(|r| r["kind"] == "call_start"), "no start record of {id}");
        sandboxes.push(sum["details"]["sandbox_call_id"].as_str().expect("the sandbox's call id").to_string());
    }
    assert_eq!(sandboxes[0], sandboxes[1], "both calls ran in one sandbox");
    let sandbox = sandboxes[0].clone();

    // What the server tried during a call is in that call's window of the sandbox's records.
    let r = s.call("counter.read", json!({"path": fx.path("secret/token")}));
    assert!(!r.to_string().contains(&fx.secret), "the secret leaked: {r}");
    assert_eq!(r["isError"], true, "the read failed: {r}");
    let id = r["_meta"]["agentd/call_id"].as_str().expect("call id");
    let sum = summary(&log, id);
    let (from, to) = (sum["details"]["from_ktime_ns"].as_u64(), sum["details"]["to_ktime_ns"].as_u64());
    let deadline = Instant::now() + Duration::from_secs(10);
    let tried = loop {
        let found = records(&log, &sandbox).into_iter().find(|r| {
            r["kind"] == "open" && r["details"]["path"].as_str().is_some_and(|p| p.ends_with("secret/token"))
        });
        match found {
            Some(r) => break r,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("no record of the attempt in sandbox {sandbox}'s records"),
        }
    };
    let at = tried["details"]["ktime_ns"].as_u64();
    assert!(from <= at && at <= to, "the attempt ({at:?}) is in the call's window ({from:?}..={to:?})");
    let r = s.call("counter.read", json!({"path": fx.path("data/file.txt")}));
    assert_eq!(text_of(&r), "public data\n", "{r}");

    // Cancelling a call ends the sandbox; the next call starts a fresh one.
    let server = script.display().to_string();
    let rid = s.send_request("tools/call", json!({"name": "counter.slow", "arguments": {}}));
    std::thread::sleep(Duration::from_millis(500));
    s.notify("notifications/cancelled", json!({"requestId": rid, "reason": "test"}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while (!processes_with(&server).is_empty() || !leftover_cgroups(&sandbox).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(processes_with(&server).is_empty(), "the cancelled session's server survived");
    assert!(leftover_cgroups(&sandbox).is_empty(), "the cancelled session's cgroup survived");
    let (n, _, fresh) = count(&mut s);
    assert_eq!(n, 1, "a fresh sandbox starts from nothing");
    let id = fresh["_meta"]["agentd/call_id"].as_str().expect("call id");
    let sandbox2 = summary(&log, id)["details"]["sandbox_call_id"].as_str().expect("sandbox").to_string();
    assert_ne!(sandbox2, sandbox, "a new sandbox, under a new call id");
    while !records(&log, &sandbox).iter().any(|r| r["kind"] == "summary") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    summary(&log, &sandbox);

    // The end of the client's session ends its sandbox, which is recorded.
    drop(s.stdin.take());
    let _ = s.child.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (!processes_with(&server).is_empty() || !records(&log, &sandbox2).iter().any(|r| r["kind"] == "summary"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(processes_with(&server).is_empty(), "the session's server outlived the session");
    assert!(leftover_cgroups(&sandbox2).is_empty(), "the session's cgroup outlived the session");
    summary(&log, &sandbox2);
    let verify = agentd_tests::agentd(["audit".as_ref(), "verify".as_ref(), log.as_os_str()]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
}

/// The counter server of tests/mcp/counter.py (copied into `fx`) as `[mcp.counter]`
/// offering `tools`, one sandbox per session.
fn counter_server(fx: &Fixture, tools: &str) -> String {
    let script = fx.dir.join("counter.py");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("mcp/counter.py"), &script).expect("copy counter.py");
    format!(
        r#"[mcp.counter]
command = ["/usr/bin/python3", "{script}"]
lifetime = "session"
tools = {tools}
[mcp.counter.fs]
read = ["/usr", "/etc/ld.so.cache", "{script}", "{data}"]
exec = ["/usr/bin", "/usr/lib"]
[mcp.counter.limits]
timeout_ms = 600000
"#,
        script = script.display(),
        data = fx.path("data"),
    )
}

/// The `call_start` record of `call_id`.
fn call_start(audit_log: &Path, call_id: &str) -> Value {
    records(audit_log, call_id)
        .into_iter()
        .find(|r| r["kind"] == "call_start")
        .unwrap_or_else(|| panic!("no call_start record of call {call_id}"))
}

/// Waits up to 20 s for the summary of `call_id` (a session sandbox's comes when it ends).
fn summary_soon(audit_log: &Path, call_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = records(audit_log, call_id).into_iter().find(|r| r["kind"] == "summary") {
            return s;
        }
        assert!(Instant::now() < deadline, "no summary of {call_id} within 20 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agentd_run_offers_the_manifests_mcp_servers_to_the_model_each_call_confined() {
    let test = "agentd_run_offers_the_manifests_mcp_servers_to_the_model_each_call_confined";
    if !sandbox_ready(test) {
        return;
    }
    let Some(dir) = components(test) else { return };
    let fx = Fixture::new("mcp-run");
    copy_components(&dir, &fx);
    let data = fx.path("data");
    let manifest = fx.dir.join("agent.toml");
    let files = files_server(&fx, r#"["read_text_file", "edit_file"]"#);
    std::fs::write(
        &manifest,
        format!("version = 1\n[agent]\nname = \"mcp-run\"\n{files}{}", counter_server(&fx, r#"["count", "read"]"#)),
    )
    .expect("write manifest");
    let log = fx.dir.join("audit.jsonl");
    // Replies in the call grammar's layout.
    let call = |tool: &str, args: &str| format!("<tool_call>\n{{\"name\": \"{tool}\", \"arguments\": {{{args}}}}}");
    let (url, requests) = agentd_tests::chat_server(vec![
        // Not offered (its schema is beyond the call grammar): refused before anything runs.
        call("files.edit_file", &format!("\"edits\": [], \"path\": \"{data}/file.txt\"")),
        call("files.read_text_file", "\"path\": \"/etc/shadow\""),
        call("files.read_text_file", &format!("\"path\": \"{data}/file.txt\"")),
        call("counter.count", ""),
        call("counter.count", ""),
        "Answer: done".to_string(),
    ]);
    let out = Command::new(agentd_bin())
        .args(["run", "--json", "--max-steps", "6", "--backend", "openai", "--model", "scripted", "--endpoint", &url])
        .args(["--task", "Read the data file"])
        .arg("--manifest")
        .arg(&manifest)
        .arg("--audit-log")
        .arg(&log)
        .output()
        .expect("run agentd run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "agentd run failed: {stderr}");
    assert!(
        stderr.contains("files.edit_file is not offered to the model") && stderr.contains("properties.edits.items"),
        "the tool whose schema the grammar cannot hold is refused, saying where: {stderr}"
    );
    let t: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no transcript ({e}): {stderr}"));
    assert_eq!(t["answer"], "done", "{t:#}");

    // The model was offered the servers' tools, in the grammar's names, the server's words as data.
    let first = requests.recv_timeout(Duration::from_secs(5)).expect("the first request");
    let system = first["messages"][0]["content"].as_str().expect("a system message").to_string();
    for offered in ["- files.read_text_file: a tool of the MCP server files", "- counter.count:"] {
        assert!(system.contains(offered), "{offered:?} is not in the prompt: {system}");
    }
    assert!(!system.contains("files.edit_file"), "{system}");

    let calls = t["tool_calls"].as_array().expect("tool calls");
    let tools: Vec<&str> = calls.iter().filter_map(|c| c["tool"].as_str()).collect();
    assert_eq!(
        tools,
        ["files.read_text_file", "files.read_text_file", "counter.count", "counter.count"],
        "the call of a tool not offered never ran: {t:#}"
    );
    let result = |i: usize| &calls[i]["result"];
    // /etc/shadow: the server was given "/", the kernel refused it, and the call's records say so.
    assert_eq!(result(0)["exit_code"], 1, "{}", result(0));
    assert!(!result(0)["stdout"].as_str().unwrap_or_default().contains("root:"), "{}", result(0));
    let shadow = result(0)["call_id"].as_str().expect("call id");
    let opened =
        records(&log, shadow).into_iter().find(|e| e["kind"] == "open" && e["details"]["path"] == "/etc/shadow");
    let opened = opened.unwrap_or_else(|| panic!("no open record of /etc/shadow in call {shadow}"));
    assert!(opened["details"]["result"].as_i64().is_some_and(|r| r < 0), "{opened}");
    assert_eq!(summary(&log, shadow)["tool"], "mcp.files");
    // Inside its grant, the file is read, in a sandbox of its own.
    assert_eq!(result(1)["exit_code"], 0, "{}", result(1));
    assert!(result(1)["stdout"].as_str().unwrap_or_default().contains("public data"), "{}", result(1));
    assert_eq!(result(1)["mcp"]["verdict"], "ok", "{}", result(1));
    assert_ne!(result(1)["call_id"], result(0)["call_id"]);
    assert_eq!(summary(&log, result(1)["call_id"].as_str().expect("id"))["tool"], "mcp.files");
    // The session server: one sandbox for the run, so the counter goes on.
    let counted: Vec<(String, String)> = [2, 3]
        .iter()
        .map(|i| {
            let text = result(*i)["stdout"].as_str().unwrap_or_default().to_string();
            let (n, pid) = text.split_once(' ').unwrap_or_else(|| panic!("COUNT PID: {}", result(*i)));
            (n.to_string(), pid.to_string())
        })
        .collect();
    assert_eq!((counted[0].0.as_str(), counted[1].0.as_str()), ("1", "2"), "{counted:?}");
    assert_eq!(counted[0].1, counted[1].1, "one process served both calls");
    let sandboxes: Vec<String> = [2, 3]
        .iter()
        .map(|i| {
            let id = result(*i)["call_id"].as_str().expect("id");
            let start = call_start(&log, id);
            assert_eq!(start["details"]["lifetime"], "session", "{start}");
            start["details"]["sandbox_call_id"].as_str().expect("sandbox").to_string()
        })
        .collect();
    assert_eq!(sandboxes[0], sandboxes[1]);
    // The run ended the session's sandbox, which recorded its end; nothing is left running.
    assert_eq!(summary_soon(&log, &sandboxes[0])["tool"], "mcp.counter");
    assert!(processes_with(&fx.dir.join("counter.py").display().to_string()).is_empty());
    assert!(leftover_cgroups(&sandboxes[0]).is_empty());
}

#[test]
fn a_daemons_tasks_call_its_agents_mcp_servers_one_session_per_task() {
    let test = "a_daemons_tasks_call_its_agents_mcp_servers_one_session_per_task";
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("mcp-serve-task");
    let manifest = fx.dir.join("agent.toml");
    std::fs::write(
        &manifest,
        format!("version = 1\n[agent]\nname = \"tasks\"\n{}", counter_server(&fx, r#"["count", "read"]"#)),
    )
    .expect("write manifest");
    let d = Served::start_with(&fx, &manifest, "tool = \"counter.count\"\nargs = {}\ncalls = 2");
    let submit = |uid: u32| {
        let mut cmd = Command::new(agentd_bin());
        cmd.args(["ctl", "--json", "--socket"]).arg(&d.socket).args(["submit", "main", "count twice", "--watch"]);
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        let out = cmd.output().expect("run agentd ctl");
        assert!(out.status.success(), "the task failed: {}", String::from_utf8_lossy(&out.stderr));
        let events: Vec<Value> =
            String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        events
    };
    let mut sandboxes = Vec::new();
    for round in 0..2 {
        let events = submit(1000);
        let results: Vec<&Value> = events.iter().filter(|e| e["kind"] == "tool_result").map(|e| &e["data"]).collect();
        assert_eq!(results.len(), 2, "{events:?}");
        let mut mine = Vec::new();
        for r in results {
            // The session sandbox's denials are known when it ends, after the call.
            assert_eq!(r["verdict"], "ok, denials unknown", "{r}");
            assert_eq!(r["tool"], "counter.count", "{r}");
            let start = call_start(&d.audit, r["call_id"].as_str().expect("call id"));
            assert_eq!(start["details"]["caller_uid"], 1000, "the submitter is the caller: {start}");
            mine.push(start["details"]["sandbox_call_id"].as_str().expect("sandbox").to_string());
        }
        assert_eq!(mine[0], mine[1], "round {round}: one sandbox for the task's calls");
        assert!(events.iter().any(|e| e["kind"] == "answer" && e["data"]["answer"] == "done after 2 calls."));
        // The task's end ended its sandbox.
        assert_eq!(summary_soon(&d.audit, &mine[0])["tool"], "mcp.counter");
        assert!(leftover_cgroups(&mine[0]).is_empty());
        sandboxes.push(mine[0].clone());
    }
    assert_ne!(sandboxes[0], sandboxes[1], "each task is a session of its own");
    // The calls are the daemon's calls, listed with their task to their submitter.
    let mut ls = Command::new(agentd_bin());
    ls.args(["ctl", "--json", "--socket"]).arg(&d.socket).args(["ls", "calls"]);
    std::os::unix::process::CommandExt::uid(&mut ls, 1000);
    let out = ls.output().expect("ctl ls calls");
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    let counted = listed["calls"]
        .as_array()
        .expect("calls")
        .iter()
        .filter(|c| {
            c["tool"] == "counter.count" && c["exit_code"] == 0 && c["task_id"].as_str().is_some_and(|t| !t.is_empty())
        })
        .count();
    assert_eq!(counted, 4, "{listed}");

    // A client's direct call of the server's tool is the daemon's call too: stored, with no
    // task, under the caller's uid, before it runs.
    let mut s = Session::spawn(d.bridge("main", None));
    let r = s.call("counter.count", json!({}));
    assert_eq!(r["isError"], false, "{r}");
    let id = r["_meta"]["agentd/call_id"].as_str().expect("call id").to_string();
    let out = Command::new(agentd_bin())
        .args(["ctl", "--json", "--socket"])
        .arg(&d.socket)
        .args(["ls", "calls"])
        .output()
        .expect("ctl ls calls");
    let listed: Value = serde_json::from_slice(&out.stdout).expect("json");
    let mine = listed["calls"].as_array().expect("calls").iter().find(|c| c["call_id"] == id.as_str()).cloned();
    let mine = mine.unwrap_or_else(|| panic!("the direct call is not in the store: {listed}"));
    assert!(mine["task_id"] == "" && mine["in_flight"] == false && mine["exit_code"] == 0, "{mine}");
}

#[test]
fn a_task_killed_in_a_servers_call_is_not_run_again_after_a_restart() {
    let test = "a_task_killed_in_a_servers_call_is_not_run_again_after_a_restart";
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("mcp-serve-kill9");
    let manifest = fx.dir.join("agent.toml");
    let counter = counter_server(&fx, r#"["count", "slow"]"#);
    std::fs::write(&manifest, format!("version = 1\n[agent]\nname = \"tasks\"\n{counter}")).expect("write manifest");
    let script = "tool = \"counter.slow\"\nargs = {}\ncalls = 1";
    let mut d = Served::start_with(&fx, &manifest, script);
    let out = Command::new(agentd_bin())
        .args(["ctl", "--socket"])
        .arg(&d.socket)
        .args(["submit", "main", "wait a minute"])
        .output()
        .expect("ctl submit");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let server = fx.dir.join("counter.py").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_with(&server).is_empty() {
        assert!(Instant::now() < deadline, "the server never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The daemon dies in the middle of the call; its calls' sandboxes die with it.
    let _ = d.child.kill();
    let _ = d.child.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_with(&server).is_empty() {
        assert!(Instant::now() < deadline, "the server outlived the daemon");
        std::thread::sleep(Duration::from_millis(50));
    }
    // After a restart, the task is failed, not run again: its call had started.
    let d = Served::start_with(&fx, &manifest, script);
    let status = Command::new(agentd_bin())
        .args(["ctl", "--json", "--socket"])
        .arg(&d.socket)
        .args(["status", &id])
        .output()
        .expect("ctl status");
    let t: Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(t["state"], "failed", "{t}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(processes_with(&server).is_empty(), "the call was made again");
}
