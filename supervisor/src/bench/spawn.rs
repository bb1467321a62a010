//! `agentd bench ...`: measurements that print comparisons. They never pass or fail on a
//! timing; they exit non-zero only if a run itself breaks.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_policy::{compile, CallRequest, ExecPlan};
use serde::Serialize;

use agentd_audit::AuditLog;
use agentd_sandbox::host::{Host, RealFs};
use agentd_sandbox::runner::{OutputMode, Runner};
use agentd_sandbox::spawn::NetnsPool;

const MANIFEST: &str = r#"
version = 1
[agent]
name = "bench"
[tools.true]
argv = ["/bin/true"]
[tools.true.fs]
read = ["/usr", "/etc/ld.so.cache"]
exec = ["/usr/bin", "/usr/lib"]
"#;

/// bubblewrap with the same view: /usr read-only, merged-/usr links, own /proc, /dev, /tmp.
const BWRAP: &[&str] = &[
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--ro-bind",
    "/etc/ld.so.cache",
    "/etc/ld.so.cache",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--tmpfs",
    "/tmp",
    "/bin/true",
];

#[derive(Debug, Serialize)]
struct Stats {
    name: &'static str,
    runs: usize,
    p50_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
}

fn stats(name: &'static str, mut v: Vec<Duration>) -> Stats {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    Stats { name, runs: v.len(), p50_ms: at(0.5), p99_ms: at(0.99), mean_ms: mean }
}

fn time_command(cmd: &mut Command) -> Result<Duration, String> {
    let t = Instant::now();
    let status = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let d = t.elapsed();
    match status {
        Ok(s) if s.success() => Ok(d),
        Ok(s) => Err(format!("{cmd:?} exited with {s}")),
        Err(e) => Err(format!("{cmd:?}: {e}")),
    }
}

/// (cgroup setup + spawn to reaped exit, the whole call including cleanup and the result).
fn time_sandbox(runner: &mut Runner<'_>, plan: &ExecPlan) -> Result<(Duration, Duration), String> {
    let t = Instant::now();
    let r = runner.run(plan, OutputMode::Capture);
    let whole = t.elapsed();
    if r.exit_code != 0 {
        return Err(format!("sandboxed /bin/true exited {}: {}", r.exit_code, r.error.unwrap_or(r.stderr)));
    }
    Ok((r.timing.cgroup_setup + r.timing.spawn_to_reaped, whole))
}

/// One interleaved pass: fork+exec, an agentd call, bwrap; per run.
#[derive(Debug, Serialize)]
struct Pass {
    mode: &'static str,
    fork_exec: Stats,
    agentd: Stats,
    agentd_whole_call: Stats,
    bwrap: Option<Stats>,
    b_over_a_p50: f64,
    b_over_c_p50: Option<f64>,
}

fn pass(mode: &'static str, n: usize, bwrap: bool, progress: bool, pool: Option<NetnsPool>) -> Result<Pass, String> {
    let manifest = agentd_policy::parse("bench.toml", MANIFEST).map_err(|e| e.to_string())?;
    let host = Host::probe();
    // Calls are audited as always, to a scratch log.
    let log_dir = std::env::temp_dir().join(format!("agentd-bench-{}-{mode}", std::process::id()));
    let log = AuditLog::open(&log_dir.join("audit.jsonl")).map_err(|e| agentd_policy::error_chain(&e))?;
    let mut runner = Runner::new(&host).with_audit(log);
    if let Some(pool) = pool {
        runner = runner.with_netns_pool(pool);
    }
    let mut req = CallRequest { tool: "true".into(), ..CallRequest::default() };
    let [mut a, mut b, mut whole, mut c]: [Vec<Duration>; 4] = Default::default();
    for i in 0..n {
        req.call_id = format!("bench-{}-{mode}-{i}", std::process::id());
        let plan = compile(&manifest, &req, &host.facts, &RealFs::default()).map_err(|e| e.to_string())?;
        a.push(time_command(&mut Command::new("/bin/true"))?);
        let (spawned, call) = time_sandbox(&mut runner, &plan)?;
        b.push(spawned);
        whole.push(call);
        if bwrap {
            c.push(time_command(Command::new("bwrap").args(BWRAP))?);
        }
        if progress && (i + 1) % (n / 10).max(1) == 0 {
            eprint!("\ragentd: bench spawn ({mode}) {}/{n}", i + 1);
        }
    }
    if progress {
        eprintln!();
    }
    drop(runner);
    let _ = std::fs::remove_dir_all(&log_dir);
    let (a, b) = (stats("fork+exec", a), stats("agentd sandbox", b));
    let c = bwrap.then(|| stats("bwrap --unshare-all", c));
    Ok(Pass {
        mode,
        b_over_a_p50: b.p50_ms / a.p50_ms,
        b_over_c_p50: c.as_ref().map(|c| b.p50_ms / c.p50_ms),
        fork_exec: a,
        agentd: b,
        agentd_whole_call: stats("  whole call", whole),
        bwrap: c,
    })
}

pub(crate) fn run(n: usize, json: bool) -> Result<(), String> {
    let bwrap = Command::new("bwrap").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !bwrap && !json {
        eprintln!("agentd: bubblewrap is not installed: comparing with bare fork+exec only");
    }
    let progress = n >= 50 && !json;
    let pool = NetnsPool::new().map_err(|e| format!("network namespace pool: {e}"))?;
    // Separate passes: the two modes make and tear down network namespaces at different
    // rates, and the kernel's teardown of one slows the creation of the next.
    let passes = [pass("cold", n, bwrap, progress, None)?, pass("warm", n, bwrap, progress, Some(pool))?];
    if json {
        outln!("{}", serde_json::json!({ "runs": n, "passes": passes }));
        return Ok(());
    }
    for p in &passes {
        outln!("{} ({} runs, interleaved)", p.mode, n);
        outln!("  {:<22} {:>9} {:>9} {:>9}", "variant", "p50 ms", "p99 ms", "mean ms");
        let rows = [Some(&p.fork_exec), Some(&p.agentd), Some(&p.agentd_whole_call), p.bwrap.as_ref()];
        for s in rows.into_iter().flatten() {
            outln!("  {:<22} {:>9.3} {:>9.3} {:>9.3}", s.name, s.p50_ms, s.p99_ms, s.mean_ms);
        }
        let c = p.b_over_c_p50.map(|r| format!(", b/c {r:.2} (target <= 0.5)")).unwrap_or_default();
        outln!("  b/a {:.2} (target <= 3){c}", p.b_over_a_p50);
    }
    outln!();
    outln!("agentd sandbox = cgroup setup + spawn to reaped exit. The whole call adds its audit records");
    outln!("(the summary flushed to disk), removing the cgroup and, warm, preparing the next network namespace.");
    outln!("cold: every layer is made on the spawn path, as in one `agentd exec`; warm: a supervisor");
    outln!("running many calls, which prepares each call's fresh network namespace after the previous one.");
    Ok(())
}

/// `agentd bench spawn --whole-process`: one `agentd exec` of `/bin/true` as a process of its
/// own (this binary), against `bwrap` with the same view, interleaved.
pub(crate) fn whole_process(n: usize, json: bool) -> Result<(), String> {
    let bwrap = Command::new("bwrap").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !bwrap {
        return Err("bubblewrap is not installed (apt-get install bubblewrap): nothing to compare with".into());
    }
    let me = std::env::current_exe().map_err(|e| format!("finding agentd's own binary: {e}"))?;
    let dir = std::env::temp_dir().join(format!("agentd-bench-whole-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let manifest = dir.join("bench.toml");
    std::fs::write(&manifest, MANIFEST).map_err(|e| format!("{}: {e}", manifest.display()))?;
    let log = dir.join("audit").join("audit.jsonl");
    let mut exec = Command::new(&me);
    exec.arg("exec").arg("--manifest").arg(&manifest).args(["--tool", "true", "--audit-log"]).arg(&log);
    // One call first, outside the timings: it loads and pins the programs if no call has yet.
    time_command(&mut exec)?;
    let (mut a, mut c) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        a.push(time_command(&mut exec)?);
        c.push(time_command(Command::new("bwrap").args(BWRAP))?);
        if !json && n >= 20 && (i + 1) % (n / 10).max(1) == 0 {
            eprint!("\ragentd: bench spawn --whole-process {}/{n}", i + 1);
        }
    }
    if !json && n >= 20 {
        eprintln!();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (a, c) = (stats("agentd exec", a), stats("bwrap --unshare-all", c));
    let ratio = a.p50_ms / c.p50_ms;
    if json {
        let report = serde_json::json!({ "runs": n, "agentd_exec": a, "bwrap": c, "agentd_over_bwrap_p50": ratio });
        outln!("{report}");
        return Ok(());
    }
    outln!("/bin/true as a whole process ({n} runs each, interleaved)");
    outln!("  {:<22} {:>9} {:>9} {:>9}", "variant", "p50 ms", "p99 ms", "mean ms");
    for s in [&a, &c] {
        outln!("  {:<22} {:>9.3} {:>9.3} {:>9.3}", s.name, s.p50_ms, s.p99_ms, s.mean_ms);
    }
    outln!("  agentd exec / bwrap {ratio:.2} (target <= 1.0)");
    outln!();
    outln!("agentd exec = the process from start to exit: the manifest compiled, the eBPF layer joined,");
    outln!("the call sandboxed and audited, its summary flushed to disk before it exits.");
    Ok(())
}
