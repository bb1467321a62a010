//! Harness for the privileged integration tests: find the real `agentd` binary, decide
//! whether the host can run a test (and fail instead of skipping when CI expects it), build
//! fixtures with secrets to leak, and run calls.
//!
//! `AGENTD_TEST_EXPECT` is a comma-separated list of features CI guarantees (`root`,
//! `userns`, `landlock`, `cgroup`, or `all`). A test whose feature is missing prints
//! `skipping <name>: <reason>` and returns, unless the feature is expected: then it fails.

pub mod unit;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The `agentd` binary under test: `$AGENTD_BIN`, or `target/<profile>/agentd` next to the
/// test executable's `deps/` directory.
pub fn agentd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AGENTD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("agentd");
    assert!(bin.exists(), "{} is missing: build it first (cargo build -p agentd) or set AGENTD_BIN", bin.display());
    bin
}

fn expected(feature: &str) -> bool {
    let list = std::env::var("AGENTD_TEST_EXPECT").unwrap_or_default();
    list.split(',').map(str::trim).any(|f| f == feature || f == "all")
}

/// Returns true if the test may proceed. If `available` is false, prints a skip line, or
/// panics when CI expects `feature`.
pub fn need(test: &str, feature: &str, available: bool, reason: &str) -> bool {
    if available {
        return true;
    }
    assert!(!expected(feature), "{test}: {feature} is expected (AGENTD_TEST_EXPECT) but unavailable: {reason}");
    let line = format!("skipping {test}: {reason} (feature {feature})");
    println!("{line}");
    record_skip(&line);
    false
}

/// Appends a skip to `target/agentd-test-skips.txt`, which `cargo xtask test` prints at the
/// end (cargo test hides the output of passing tests).
fn record_skip(line: &str) {
    let Ok(exe) = std::env::current_exe() else { return };
    let Some(target) = exe.ancestors().find(|p| p.file_name().is_some_and(|n| n == "target")) else { return };
    let file = std::fs::OpenOptions::new().create(true).append(true).open(target.join("agentd-test-skips.txt"));
    if let Ok(mut f) = file {
        use std::io::Write;
        let _ = writeln!(f, "{line}");
    }
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into a new network namespace (with loopback up), where every
/// process it starts is born too.
pub fn enter_new_netns() {
    // SAFETY: integer argument only; it affects only the calling thread.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().is_ok_and(|s| s.success());
    assert!(up, "ip link set lo up");
}

/// A network namespace for servers that are not on "the host" (the calling thread's
/// namespace): named, and joined to the calling thread's namespace by a veth pair, with
/// `192.0.2.1/24` on this side and `192.0.2.77/24` on the other. So its address is neither
/// special nor one of the host's own. Deleted on drop.
#[derive(Debug)]
pub struct Remote {
    /// Its name under `/run/netns`.
    pub name: String,
    /// Its address.
    pub addr: std::net::IpAddr,
}

impl Remote {
    /// Makes it. Call from a thread in a namespace the test made itself.
    pub fn start() -> Self {
        let name = token("agentd-r");
        let r = Remote { name, addr: std::net::IpAddr::from([192, 0, 2, 77]) };
        let n = &r.name;
        let script = format!(
            "ip netns add {n} && ip link add agv0 type veth peer name agv1 && ip link set agv1 netns {n} \
             && ip addr add 192.0.2.1/24 dev agv0 && ip link set agv0 up \
             && ip netns exec {n} sh -c 'ip link set lo up && ip addr add 192.0.2.77/24 dev agv1 && ip link set agv1 up'"
        );
        let ok = Command::new("sh").args(["-c", &script]).status().is_ok_and(|s| s.success());
        assert!(ok, "setting up the remote namespace: {script}");
        r
    }

    /// A command run inside it.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Its namespace file, to enter with setns.
    pub fn ns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn landlock_abi() -> i64 {
    // SAFETY: NULL attr, size 0 and flag 1 (VERSION) only query the ABI.
    unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<u8>(), 0usize, 1u32) }
}

fn userns_works() -> bool {
    Command::new("unshare").args(["-U", "true"]).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn cgroups_mounted() -> bool {
    let mi = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mi.contains(" - cgroup2 ") || mi.contains(" - cgroup ")
}

/// The checks every sandbox test needs: root, user namespaces, Landlock, cgroups.
pub fn sandbox_ready(test: &str) -> bool {
    need(test, "root", is_root(), "agentd exec must run as root")
        && need(test, "userns", userns_works(), "user namespaces are unavailable")
        && need(test, "landlock", landlock_abi() >= 1, "Landlock is not enabled in this kernel")
        && need(test, "cgroup", cgroups_mounted(), "no cgroup hierarchy is mounted")
}

/// The running kernel's Landlock ABI (0 if none).
pub fn kernel_landlock_abi() -> i64 {
    landlock_abi().max(0)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique, unguessable-enough marker for one test: a "secret" whose appearance in any
/// output proves a leak.
pub fn token(label: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    format!("{label}-{}-{nanos:x}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A scratch tree on the host, removed on drop:
/// - `data/`: granted read-only, holds `data/file.txt`;
/// - `out/`: granted writable (mode 0777, the sandbox runs as uid 65534);
/// - `secret/token`: never granted, holds [`Fixture::secret`].
#[derive(Debug)]
pub struct Fixture {
    /// Root of the tree.
    pub dir: PathBuf,
    /// Content of `secret/token`, which must never appear in a call's output.
    pub secret: String,
}

impl Fixture {
    /// Creates the tree under `/tmp`.
    pub fn new(test: &str) -> Self {
        let dir = PathBuf::from(format!("/tmp/agentd-it-{}", token(test)));
        let secret = token("SECRET");
        fs::create_dir_all(dir.join("data")).expect("mkdir data");
        fs::create_dir_all(dir.join("out")).expect("mkdir out");
        fs::create_dir_all(dir.join("secret")).expect("mkdir secret");
        fs::set_permissions(dir.join("out"), fs::Permissions::from_mode(0o777)).expect("chmod out");
        fs::write(dir.join("data/file.txt"), "public data\n").expect("write data");
        fs::write(dir.join("secret/token"), &secret).expect("write secret");
        Self { dir, secret }
    }

    /// A path inside the tree, as a string.
    pub fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    /// Writes a manifest with one tool `sh` (`/bin/sh -c {command}`) reading `/usr`, `data/`
    /// and `extra_read`, writing `out/`, executing from `/usr/bin` and `/usr/lib`, plus the
    /// TOML in `extra` appended under `[tools.sh]` sub-tables.
    pub fn manifest(&self, extra: &str) -> PathBuf {
        self.manifest_granting(&[], &[], extra)
    }

    /// [`Fixture::manifest`], also reading `read` and executing from `exec`.
    pub fn manifest_granting(&self, read: &[&str], exec: &[&str], extra: &str) -> PathBuf {
        let list = |base: &[&str], more: &[&str]| {
            base.iter().chain(more).map(|p| format!("{p:?}")).collect::<Vec<_>>().join(", ")
        };
        let data = self.path("data");
        let text = format!(
            r#"version = 1
[agent]
name = "it"
[tools.sh]
description = "shell"
argv = ["/bin/sh", "-c", "{{command}}"]
[tools.sh.fs]
read = [{read}]
write = ["{out}"]
exec = [{exec}]
[tools.sh.env]
set = {{ PATH = "/usr/bin:/bin" }}
{extra}
"#,
            read = list(&["/usr", "/etc/ld.so.cache", &data], read),
            exec = list(&["/usr/bin", "/usr/lib"], exec),
            out = self.path("out"),
        );
        let path = self.dir.join(format!("{}.toml", token("manifest")));
        fs::write(&path, text).expect("write manifest");
        path
    }

    /// Asserts that the secret appears nowhere in `r`.
    pub fn assert_no_leak(&self, r: &Call) {
        for (name, text) in [("stdout", &r.stdout()), ("stderr", &r.stderr()), ("agentd stderr", &r.agentd_stderr)] {
            assert!(!text.contains(&self.secret), "the secret leaked into {name}: {text}");
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// One `agentd exec --json` run.
#[derive(Debug)]
pub struct Call {
    /// agentd's exit code.
    pub code: i32,
    /// The JSON result.
    pub json: Value,
    /// agentd's own stderr.
    pub agentd_stderr: String,
}

impl Call {
    /// The tool's stdout.
    pub fn stdout(&self) -> String {
        self.json["stdout"].as_str().unwrap_or_default().to_string()
    }
    /// The tool's stderr.
    pub fn stderr(&self) -> String {
        self.json["stderr"].as_str().unwrap_or_default().to_string()
    }
    /// `exit_code` from the result.
    pub fn exit_code(&self) -> i64 {
        self.json["exit_code"].as_i64().unwrap_or(-1)
    }
}

/// Runs `agentd exec --json --manifest M --tool T [--arg k=v]... [-- argv...]`.
pub fn exec(manifest: &Path, tool: &str, args: &[(&str, &str)], argv: &[&str]) -> Call {
    exec_argv(manifest, tool, args, argv, &[])
}

/// [`exec`] with extra agentd flags.
pub fn exec_with(manifest: &Path, tool: &str, args: &[(&str, &str)], flags: &[&str]) -> Call {
    exec_argv(manifest, tool, args, &[], flags)
}

/// [`exec`] with variables added to agentd's environment (host configuration such as
/// `AGENTD_HOSTS_FILE`).
pub fn exec_env(manifest: &Path, tool: &str, args: &[(&str, &str)], env: &[(&str, &str)]) -> Call {
    let mut cmd = Command::new(agentd_bin());
    cmd.envs(env.iter().copied());
    exec_cmd(cmd, manifest, tool, args, &[], &[])
}

fn exec_argv(manifest: &Path, tool: &str, args: &[(&str, &str)], argv: &[&str], flags: &[&str]) -> Call {
    exec_cmd(Command::new(agentd_bin()), manifest, tool, args, argv, flags)
}

fn exec_cmd(
    mut cmd: Command,
    manifest: &Path,
    tool: &str,
    args: &[(&str, &str)],
    argv: &[&str],
    flags: &[&str],
) -> Call {
    cmd.arg("exec").arg("--json").args(flags).arg("--audit-log").arg(audit_log_for(manifest));
    cmd.arg("--manifest").arg(manifest).arg("--tool").arg(tool);
    for (k, v) in args {
        cmd.arg("--arg").arg(format!("{k}={v}"));
    }
    if !argv.is_empty() {
        cmd.arg("--").args(argv);
    }
    parse(cmd.output().expect("run agentd"))
}

/// Like [`sh`], and also returns the peak RSS in KiB of agentd and everything it reaped.
#[allow(clippy::zombie_processes, reason = "reaped by wait4, which also yields the rusage")]
pub fn sh_with_peak_rss(manifest: &Path, command: &str) -> (Call, i64) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(agentd_bin())
        .arg("exec")
        .arg("--json")
        .arg("--audit-log")
        .arg(audit_log_for(manifest))
        .arg("--manifest")
        .arg(manifest)
        .args(["--tool", "sh", "--arg"])
        .arg(format!("command={command}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agentd");
    let mut status = 0;
    // SAFETY: rusage is plain old data; wait4 fills it and the status for this child's pid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointers; the pid is our own unreaped child.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    use std::io::Read;
    child.stdout.take().map(|mut s| s.read_to_end(&mut stdout));
    child.stderr.take().map(|mut s| s.read_to_end(&mut stderr));
    let out = Output { status: std::process::ExitStatus::from_raw(status), stdout, stderr };
    (parse(out), usage.ru_maxrss)
}

/// The audit log the harness gives calls of `manifest`: one per fixture, beside it.
pub fn audit_log_for(manifest: &Path) -> PathBuf {
    manifest.parent().unwrap_or(Path::new("/tmp")).join("audit.jsonl")
}

/// Runs the `sh` tool of a [`Fixture::manifest`] with `command`.
/// A command that was not found (127) is a bug in the test, never evidence of a block, and
/// so is a call agentd refused: the attempt must actually have run.
pub fn sh(manifest: &Path, command: &str) -> Call {
    let r = exec(manifest, "sh", &[("command", command)], &[]);
    assert_ne!(r.exit_code(), 127, "a program was missing in the sandbox: {command}: {}", r.json);
    assert!(r.json["error"].is_null(), "agentd did not run the call: {command}: {}", r.json);
    r
}

/// Parses the output of an `agentd exec --json` process.
pub fn parse(out: Output) -> Call {
    let code = out.status.code().unwrap_or(-1);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let agentd_stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("agentd printed no JSON object ({e}); stdout={stdout:?} stderr={agentd_stderr:?}"));
    assert_eq!(json["exit_code"].as_i64(), Some(i64::from(code)), "exit code and result disagree: {json}");
    Call { code, json, agentd_stderr }
}

/// Runs agentd with arbitrary arguments.
pub fn agentd<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(agentd_bin()).args(args).output().expect("run agentd")
}

/// Host processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(marker) {
                found.push(pid);
            }
        }
    }
    found
}

/// Call cgroups left under agentd's parents (there should be none after a call).
pub fn leftover_cgroups(call_id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) && !entry.file_type().is_ok_and(|t| t.is_symlink()) {
                if p.file_name().is_some_and(|n| n == call_id) {
                    found.push(p.clone());
                }
                stack.push(p);
            }
        }
    }
    found
}

/// `agentd run --json` under `manifest` (with its audit log), with `args`.
pub fn run_json(manifest: &Path, args: &[&str]) -> Output {
    Command::new(agentd_bin())
        .args(["run", "--json"])
        .args(args)
        .arg("--manifest")
        .arg(manifest)
        .arg("--audit-log")
        .arg(audit_log_for(manifest))
        .output()
        .expect("run agentd")
}

/// The demo as shipped (`examples/demo`), its data in `fx` and its manifest pointed there:
/// the manifest's path and the task.
pub fn stage_demo(fx: &Fixture) -> (PathBuf, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = fs::read_to_string(root.join("examples/demo/agent.toml")).expect("the demo manifest");
    assert!(shipped.contains("answer = \"quote\""), "the demo quotes");
    let data = fx.path("data");
    for entry in fs::read_dir(root.join("examples/demo/data")).expect("the demo data") {
        let entry = entry.expect("a data file");
        fs::copy(entry.path(), fx.dir.join("data").join(entry.file_name())).expect("copy data");
    }
    let out_dir = fx.dir.join("out");
    fs::create_dir_all(&out_dir).expect("out dir");
    let manifest = fx.dir.join("agent.toml");
    let text =
        shipped.replace("/tmp/agentd-demo/data", &data).replace("/tmp/agentd-demo/out", &out_dir.to_string_lossy());
    fs::write(&manifest, text).expect("write manifest");
    let task = fs::read_to_string(root.join("examples/demo/task.txt")).expect("task");
    (manifest, task.trim().to_string())
}

/// A chat completions server on loopback that replies with `replies`, one per request, and
/// sends each request it got to the receiver: a scripted model for `--backend openai`. It
/// takes no constraint: agentd's probes for one (see [`is_probe`]) get a plain "Hello." and
/// are not sent on.
pub fn chat_server<S: Into<String>>(replies: Vec<S>) -> (String, std::sync::mpsc::Receiver<Value>) {
    let mut replies: std::collections::VecDeque<String> = replies.into_iter().map(Into::into).collect();
    chat_server_with(move |req| {
        if is_probe(req) {
            return Some(Reply::Json(completion("Hello.")));
        }
        replies.pop_front().map(|r| Reply::Json(completion(&r)))
    })
}

/// Whether `req` is one of agentd's probes for the constraints a server takes.
pub fn is_probe(req: &Value) -> bool {
    req["messages"].as_array().is_some_and(|m| m.len() == 1 && m[0]["content"] == "Say hello.")
}

/// A chat completion's JSON with `content`.
pub fn completion(content: &str) -> Value {
    serde_json::json!({
        "choices": [{ "message": { "role": "assistant", "content": content } }],
        "usage": { "prompt_tokens": 100, "completion_tokens": 20 }
    })
}

/// What a scripted server sends back.
#[derive(Debug)]
pub enum Reply {
    /// One JSON body.
    Json(Value),
    /// Server-sent events: each `data:` line's JSON, then `[DONE]`.
    Events(Vec<Value>),
}

/// A chat completions server on loopback whose replies `handle` writes from each request
/// (`None`: it stops); the requests that were not probes ([`is_probe`]) go to the receiver.
pub fn chat_server_with(
    mut handle: impl FnMut(&Value) -> Option<Reply> + Send + 'static,
) -> (String, std::sync::mpsc::Receiver<Value>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        let Ok((stream, _)) = listener.accept() else { return };
        let mut r = BufReader::new(stream);
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        let _ = r.read_exact(&mut body);
        let req: Value = serde_json::from_slice(&body).unwrap_or_default();
        let Some(reply) = handle(&req) else { return };
        if !is_probe(&req) {
            let _ = tx.send(req);
        }
        let (kind, text) = match reply {
            Reply::Json(v) => ("application/json", v.to_string()),
            Reply::Events(events) => {
                let mut t: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
                t.push_str("data: [DONE]\n\n");
                ("text/event-stream", t)
            }
        };
        let mut s = r.into_inner();
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
    });
    (format!("http://{addr}/v1"), rx)
}

/// `agentd serve --config CONFIG`, returned once it listens on `socket`; panics if it exits
/// first or takes over 30 s.
pub fn serve(config: &Path, socket: &Path) -> Child {
    let mut child = Command::new(agentd_bin())
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .spawn()
        .expect("start agentd serve");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(st) = child.try_wait().ok().flatten() {
            panic!("agentd serve exited at start: {st}");
        }
        if std::time::Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agentd serve did not start listening on {} within 30 s", socket.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child
}
