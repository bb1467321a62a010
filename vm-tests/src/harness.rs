//! Running the tests, and what they share: manifests, `agentd exec --json` calls and the
//! audit log.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use serde_json::{json, Value};

/// The prefix of the verdict line `cargo xtask vm-test` looks for.
pub const VERDICT: &str = "AGENTD-VM-VERDICT";

/// One test: a name and a body that says why it failed.
pub type Case = (&'static str, fn(&Ctx) -> Result<(), Fail>);

/// Why a test did not pass.
#[derive(Debug)]
pub enum Fail {
    /// It failed.
    Failed(String),
    /// This kernel cannot run it, and agentd behaved as it must there (for example, refused
    /// the call); the reason says which feature is missing.
    Limited(String),
}

impl From<String> for Fail {
    fn from(why: String) -> Self {
        Fail::Failed(why)
    }
}

/// Fails the test with a message unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

/// Shared state of a run.
#[derive(Debug)]
pub struct Ctx {
    /// The agentd binary.
    pub agentd: PathBuf,
    /// Scratch root: `data/` (readable by tools), `out/` (writable), manifests.
    pub root: PathBuf,
    /// The audit log every call writes to.
    pub audit: PathBuf,
    /// Whether the kernel has Landlock. Without it (before 5.13), every manifest says
    /// `landlock_abi = 0`, which agentd requires to run a call at all there.
    pub landlock: bool,
}

/// One `agentd exec --json` result.
#[derive(Debug)]
pub struct Call {
    /// The parsed result.
    pub json: Value,
    /// agentd's exit code.
    pub code: i32,
    /// agentd's stderr (diagnostics).
    pub stderr: String,
}

impl Call {
    /// The tool's stdout.
    pub fn stdout(&self) -> &str {
        self.json["stdout"].as_str().unwrap_or("")
    }

    /// The call id.
    pub fn call_id(&self) -> &str {
        self.json["call_id"].as_str().unwrap_or("")
    }

    /// A one-line account for failure messages.
    pub fn brief(&self) -> String {
        format!(
            "exit {} stdout={:?} stderr={:?} error={} bpf={} agentd-stderr={:?}",
            self.code,
            self.stdout(),
            self.json["stderr"].as_str().unwrap_or(""),
            self.json["error"],
            self.json["enforcement"]["bpf"],
            self.stderr
        )
    }
}

impl Ctx {
    fn new() -> Result<Self, String> {
        let me = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let agentd = std::env::var_os("AGENTD_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/agentd".into());
        let root = PathBuf::from("/tmp/vmt");
        let _ = std::fs::remove_dir_all(&root);
        for d in ["data", "out", "manifests"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| format!("creating {d}: {e}"))?;
        }
        let w = |p: &str, s: &[u8]| std::fs::write(root.join(p), s).map_err(|e| format!("writing {p}: {e}"));
        w("data/hello.txt", b"hello from the data folder\n")?;
        w("data/secret.txt", b"TOKEN-7f3a9c-not-for-tools\n")?;
        // A dynamically linked program in a folder that is readable but not executable.
        std::fs::copy(&me, root.join("data/prog")).map_err(|e| format!("copying the test binary: {e}"))?;
        Command::new("chmod").args(["-R", "a+rX", "/tmp/vmt"]).status().map_err(|e| e.to_string())?;
        Command::new("chmod").args(["0777", "/tmp/vmt/out"]).status().map_err(|e| e.to_string())?;
        let audit = root.join("audit.log");
        let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
        Ok(Self { agentd, root, audit, landlock: lsms.split(',').any(|l| l.trim() == "landlock") })
    }

    /// Writes a manifest `name` whose tool `sh` runs `/bin/sh -c {command}` with the standard
    /// grants (read /usr and data/, write out/, exec /usr/bin and /usr/lib), plus `extra`
    /// (more TOML for `[tools.sh.*]` or `[requires]`).
    pub fn sh_manifest(&self, name: &str, extra: &str) -> PathBuf {
        let extra = match (self.landlock, extra.contains("[requires]")) {
            (true, _) => extra.to_string(),
            (false, true) => extra.replace("[requires]", "[requires]\nlandlock_abi = 0"),
            (false, false) => format!("{extra}\n[requires]\nlandlock_abi = 0\n"),
        };
        self.manifest(name, &extra)
    }

    /// [`Ctx::sh_manifest`] as written, whatever the kernel has.
    pub fn manifest(&self, name: &str, extra: &str) -> PathBuf {
        let limits = if extra.contains("[tools.sh.limits]") { "" } else { "[tools.sh.limits]\ntimeout_ms = 20000\n" };
        let body = format!(
            r#"version = 1
[agent]
name = "vm"

[tools.sh]
description = "a shell"
argv = ["/bin/sh", "-c", "{{command}}"]

[tools.sh.fs]
read = ["/usr", "/tmp/vmt/data"]
write = ["/tmp/vmt/out"]
exec = ["/usr/bin", "/usr/lib"]

{limits}
{extra}
"#
        );
        let path = self.root.join("manifests").join(format!("{name}.toml"));
        if let Err(e) = std::fs::write(&path, body) {
            eprintln!("agentd-vm: cannot write {}: {e}", path.display());
        }
        path
    }

    /// `agentd exec --json --manifest M --tool sh --arg command=C`.
    pub fn sh(&self, manifest: &Path, command: &str) -> Call {
        self.sh_env(manifest, command, &[])
    }

    /// The `agentd exec` command [`Ctx::sh`] runs, for a test that starts it itself.
    pub fn sh_command(&self, manifest: &Path, command: &str) -> Command {
        let mut c = Command::new(&self.agentd);
        c.args(["exec", "--json", "--audit-log"]).arg(&self.audit).arg("--manifest").arg(manifest);
        c.args(["--tool", "sh", "--arg"]).arg(format!("command={command}"));
        c
    }

    /// [`Ctx::sh`] with variables added to agentd's environment.
    pub fn sh_env(&self, manifest: &Path, command: &str, env: &[(&str, &str)]) -> Call {
        let out = self.sh_command(manifest, command).envs(env.iter().copied()).output();
        match out {
            Ok(o) => Call {
                json: serde_json::from_slice(&o.stdout).unwrap_or_else(|e| json!({ "parse_error": e.to_string() })),
                code: o.status.code().unwrap_or(-1),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            Err(e) => Call { json: json!({}), code: -1, stderr: format!("cannot run agentd: {e}") },
        }
    }

    /// The audit records of one call.
    pub fn records(&self, call_id: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["call_id"] == call_id)
            .collect()
    }

    /// The records of `call` of `kind` with `verdict`.
    pub fn find(&self, call: &Call, kind: &str, verdict: &str) -> Vec<Value> {
        self.records(call.call_id()).into_iter().filter(|r| r["kind"] == kind && r["verdict"] == verdict).collect()
    }
}

/// Asserts the call ran under the LSM layer.
pub fn lsm_layer(call: &Call) -> Result<(), Fail> {
    let bpf = &call.json["enforcement"]["bpf"];
    if bpf["layer"] == "fallback" {
        // The kernel has BPF LSM, but agentd's LSM programs do not load on it (an older
        // kernel lacks hooks or helpers they use): agentd ran the call under its fallback
        // programs, and said why.
        let note = bpf["note"].as_str().unwrap_or_default();
        // The note carries the verifier's log: its first line says which program, its last
        // lines why.
        let first: String = note.chars().take(240).collect();
        let n = note.chars().count();
        let last: String = note.chars().skip(n.saturating_sub(600).max(240)).collect();
        return Err(Fail::Limited(format!("agentd's LSM programs do not load here: {first} ... {last}")));
    }
    check!(bpf["layer"] == "lsm", "enforcement.bpf.layer is not \"lsm\": {}", call.brief());
    Ok(())
}

/// Asserts the call ran under agentd's BPF layer, LSM or fallback.
pub fn bpf_layer(call: &Call) -> Result<(), Fail> {
    let layer = &call.json["enforcement"]["bpf"]["layer"];
    check!(layer == "lsm" || layer == "fallback", "no BPF layer: {}", call.brief());
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// Runs `cases` (or those named in `only`) and prints the verdict line.
pub fn run_all(cases: &[Case], only: &[String]) -> ExitCode {
    let unknown: Vec<&String> = only.iter().filter(|n| !cases.iter().any(|(c, _)| c == n)).collect();
    let mut failed: Vec<Value> =
        unknown.iter().map(|n| json!({ "name": n, "why": "no such test (agentd-vm-tests --list)" })).collect();
    let mut passed = Vec::new();
    let mut limited = Vec::new();
    match Ctx::new() {
        Err(why) => failed.push(json!({ "name": "setup", "why": why })),
        Ok(ctx) => {
            for (name, case) in cases.iter().filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n)) {
                let start = Instant::now();
                println!("agentd-vm: test {name} ...");
                let result = std::panic::catch_unwind(|| case(&ctx))
                    .unwrap_or_else(|p| Err(format!("panicked: {:?}", p.downcast_ref::<String>()).into()));
                let ms = start.elapsed().as_millis();
                match result {
                    Ok(()) => {
                        println!("agentd-vm: test {name} ok ({ms} ms)");
                        passed.push(json!(name));
                    }
                    Err(Fail::Limited(why)) => {
                        println!("agentd-vm: test {name} limited by this kernel ({ms} ms): {why}");
                        limited.push(json!({ "name": name, "why": why }));
                    }
                    Err(Fail::Failed(why)) => {
                        println!("agentd-vm: test {name} FAILED ({ms} ms): {why}");
                        failed.push(json!({ "name": name, "why": why }));
                    }
                }
            }
        }
    }
    let verdict = json!({ "kernel": kernel(), "passed": passed, "limited": limited, "failed": failed });
    println!("{VERDICT} {verdict}");
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
