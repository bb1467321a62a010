//! `agentd bench audit`: what the eBPF layer costs a syscall-heavy tool, how many events per
//! second it delivers, and what it costs the host's other processes, with no call running
//! and while one runs.

use agentd_policy::{compile, CallRequest};
use serde::Serialize;

use agentd_audit::AuditLog;
use agentd_policy::error_chain;
use agentd_sandbox::host::{Host, RealFs};
use agentd_sandbox::runner::{OutputMode, Runner};

#[derive(Debug, Serialize)]
struct Report {
    opens_per_call: u64,
    rounds: usize,
    /// The loop with nothing of agentd's attached to any hook (the host-wide programs
    /// detached before each such run).
    without_bpf_ms_p50: f64,
    with_bpf_ms_p50: f64,
    overhead_percent: f64,
    /// Whether every run without the layer really had nothing attached (another
    /// supervisor's call keeps the host-wide programs attached).
    without_was_clean: bool,
    events_per_call_p50: u64,
    lost_events_total: u64,
    ring_events_per_call_p50: u64,
    flood: Flood,
    bpf_layer: &'static str,
    outside: Option<Outside>,
}

/// A tool opening distinct files, each once: every open is a record of its own (nothing to
/// count as a repeat), so this is the rate at which events are delivered into the log.
#[derive(Debug, Serialize)]
struct Flood {
    files: u64,
    /// The same tool with nothing of agentd's attached: how fast it can open the files at all.
    without_bpf_ms_p50: f64,
    ms_p50: f64,
    events_per_call_p50: u64,
    events_per_second: f64,
    lost_events_total: u64,
    /// agentd's own CPU time for the call (reading the ring, writing the log, and setting up
    /// and ending the sandbox), and the events per second of it: what agentd could deliver
    /// with a CPU to itself, whatever the tool's speed.
    agentd_cpu_ms_p50: f64,
    events_per_agentd_cpu_second: f64,
}

/// Processes outside agentd, timed with no call running and while one is registered.
#[derive(Debug, Serialize)]
struct Outside {
    /// Host-wide links attached while no call ran (0: nothing of agentd's on any hook an
    /// outside process reaches).
    idle_links: usize,
    /// Host-wide links attached while the call ran.
    active_links: usize,
    syscall_loop_idle_ms_p50: f64,
    syscall_loop_active_ms_p50: f64,
    syscall_loop_overhead_percent: f64,
    tar_find_idle_ms_p50: f64,
    tar_find_active_ms_p50: f64,
    tar_find_overhead_percent: f64,
    attach_ms_p50: f64,
    detach_ms_p50: f64,
    /// Whether every idle round really had the programs detached (another supervisor's call
    /// keeps them attached).
    idle_was_clean: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn run(n: u64, rounds: usize, json: bool) -> Result<(), String> {
    let manifest = format!(
        r#"version = 1
[agent]
name = "bench"
[tools.loop]
argv = ["/usr/bin/perl", "-e", "for (1..{n}) {{{{ open(my $f, '<', '/dev/null') or die; close $f }}}}"]
[tools.loop.fs]
read = ["/usr", "/etc/ld.so.cache"]
exec = ["/usr/bin", "/usr/lib"]
[tools.loop.limits]
timeout_ms = 600000
[tools.loop.audit]
on_audit_loss = "record"
[tools.flood]
argv = ["/usr/bin/perl", "-e", "opendir(my $d, '{dir}') or die; for (readdir $d) {{{{ open(my $f, '<', \"{dir}/$_\") and close $f }}}}"]
[tools.flood.fs]
read = ["/usr", "/etc/ld.so.cache", "{dir}"]
exec = ["/usr/bin", "/usr/lib"]
[tools.flood.limits]
timeout_ms = 600000
[tools.flood.audit]
on_audit_loss = "record"
"#,
        dir = flood_dir().display()
    );
    let manifest = agentd_policy::parse("bench-audit.toml", &manifest).map_err(|e| e.to_string())?;
    let mut host = Host::probe();
    let bpf = host
        .open_bpf()
        .ok_or_else(|| format!("the eBPF layer is not available: {}", host.bpf_note.clone().unwrap_or_default()))?;
    let layer = bpf.layer().name();
    let dir = std::env::temp_dir().join(format!("agentd-bench-audit-{}", std::process::id()));
    let files = flood_files(&dir, n)?;
    let log = |name: &str| AuditLog::open(&dir.join(name)).map_err(|e| error_chain(&e));
    let mut with = Runner::new(&host).with_audit(log("with.jsonl")?).with_bpf(bpf);
    let mut without = Runner::new(&host).with_audit(log("without.jsonl")?);
    let (mut t_with, mut t_without, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let mut lost = 0;
    let mut ring = Vec::new();
    let mut clean = true;
    let (mut t_flood, mut flood_events, mut flood_lost) = (Vec::new(), Vec::new(), 0);
    let (mut t_flood_bare, mut flood_cpu) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for which in ["with", "without", "flood", "flood-without"] {
            let bare = which.ends_with("without");
            let runner = if bare { &mut without } else { &mut with };
            if bare {
                // Nothing of agentd's on any hook: the baseline the layer is measured against.
                clean &= detach_now()?.1;
            }
            let req = CallRequest {
                call_id: format!("bench-audit-{}-{round}-{which}", std::process::id()),
                tool: if which.starts_with("flood") { "flood".into() } else { "loop".into() },
                ..CallRequest::default()
            };
            let plan = compile(&manifest, &req, &host.facts, &RealFs::default()).map_err(|e| e.to_string())?;
            let cpu = self_cpu_ms();
            let r = runner.run(&plan, OutputMode::Capture);
            let cpu = self_cpu_ms() - cpu;
            if r.exit_code != 0 {
                return Err(format!("the loop exited {}: {}", r.exit_code, r.error.unwrap_or(r.stderr)));
            }
            let ms = r.timing.spawn_to_reaped.as_secs_f64() * 1000.0;
            if which == "flood-without" {
                t_flood_bare.push(ms);
            } else if which == "flood" {
                t_flood.push(ms);
                flood_cpu.push(cpu);
                flood_events.push(r.events.total as f64);
                flood_lost += r.events.lost;
            } else if which == "with" {
                t_with.push(ms);
                events.push(r.events.total as f64);
                ring.push(r.events.ring as f64);
                lost += r.events.lost;
            } else {
                t_without.push(ms);
            }
        }
        if !json {
            eprint!("\ragentd: bench audit {}/{rounds}", round + 1);
        }
    }
    if !json {
        eprintln!();
    }
    drop((with, without));
    let _ = std::fs::remove_dir_all(&dir);
    let outside = outside(&mut host, rounds, json)?;
    let (a, b, ev, rv) = (median(t_with), median(t_without), median(events), median(ring));
    let (fm, fe) = (median(t_flood), median(flood_events));
    let report = Report {
        opens_per_call: n,
        rounds,
        without_bpf_ms_p50: b,
        with_bpf_ms_p50: a,
        overhead_percent: (a - b) / b * 100.0,
        without_was_clean: clean,
        events_per_call_p50: ev as u64,
        lost_events_total: lost,
        ring_events_per_call_p50: rv as u64,
        flood: Flood {
            files,
            without_bpf_ms_p50: median(t_flood_bare),
            ms_p50: fm,
            events_per_call_p50: fe as u64,
            events_per_second: fe / (fm / 1000.0),
            agentd_cpu_ms_p50: median(flood_cpu.clone()),
            events_per_agentd_cpu_second: fe / (median(flood_cpu) / 1000.0),
            lost_events_total: flood_lost,
        },
        bpf_layer: layer,
        outside,
    };
    if json {
        outln!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    outln!("{n} open/close pairs of one file per call, {rounds} calls per variant, interleaved (p50), {layer} layer:");
    outln!(
        "  without the eBPF layer  {b:>9.1} ms   (nothing of agentd's attached to any hook{})",
        if clean { "" } else { "; another supervisor's call kept the programs attached in some runs" }
    );
    outln!("  with the eBPF layer     {a:>9.1} ms   overhead {:+.1}%  (target <= 5%)", report.overhead_percent);
    outln!(
        "  events recorded: {} per call, {lost} lost in all; {} ring records per call (repeats are counted \
         in the kernel)",
        report.events_per_call_p50,
        report.ring_events_per_call_p50
    );
    let f = &report.flood;
    outln!("{} distinct files, each opened once per call (p50):", f.files);
    outln!(
        "  without the eBPF layer  {:>9.1} ms   ({:.0} opens/s: the most the tool could produce)",
        f.without_bpf_ms_p50,
        f.files as f64 / (f.without_bpf_ms_p50 / 1000.0)
    );
    outln!(
        "  with the eBPF layer     {:>9.1} ms   {} events per call, {:.0} events/s delivered, {} lost in all  \
         (target >= 200000/s, none lost)",
        f.ms_p50,
        f.events_per_call_p50,
        f.events_per_second,
        f.lost_events_total
    );
    outln!(
        "  agentd's own CPU time    {:>9.1} ms   {:.0} events per second of it (reading, recording, the sandbox)",
        f.agentd_cpu_ms_p50,
        f.events_per_agentd_cpu_second
    );
    if let Some(o) = &report.outside {
        outln!(
            "processes outside agentd, no call running vs one call running ({rounds} rounds each, interleaved, p50):"
        );
        outln!(
            "  host-wide links attached: {} vs {}   (attach {:.1} ms, detach {:.1} ms){}",
            o.idle_links,
            o.active_links,
            o.attach_ms_p50,
            o.detach_ms_p50,
            if o.idle_was_clean { "" } else { "  [another supervisor's call kept them attached in some idle rounds]" }
        );
        outln!(
            "  3M getppid + 300k open/close   {:>8.1} ms vs {:>8.1} ms   {:+.1}%  (target <= 10%)",
            o.syscall_loop_idle_ms_p50,
            o.syscall_loop_active_ms_p50,
            o.syscall_loop_overhead_percent
        );
        outln!(
            "  tar /usr/lib/python3* + find    {:>8.1} ms vs {:>8.1} ms   {:+.1}%  (target <= 2%)",
            o.tar_find_idle_ms_p50,
            o.tar_find_active_ms_p50,
            o.tar_find_overhead_percent
        );
    }
    Ok(())
}

/// This process's CPU time so far (user and system, all threads), in ms.
fn self_cpu_ms() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else { return 0.0 };
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1000.0 + t.tv_usec() as f64 / 1000.0;
    ms(u.user_time()) + ms(u.system_time())
}

/// The directory of the flood's files.
fn flood_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("agentd-bench-audit-{}", std::process::id())).join("flood")
}

/// Makes `n` empty files for the flood (at most 200,000) and returns how many.
fn flood_files(dir: &std::path::Path, n: u64) -> Result<u64, String> {
    let flood = dir.join("flood");
    std::fs::create_dir_all(&flood).map_err(|e| format!("creating {}: {e}", flood.display()))?;
    let n = n.min(200_000);
    for i in 0..n {
        let p = flood.join(format!("f{i}"));
        std::fs::write(&p, b"").map_err(|e| format!("creating {}: {e}", p.display()))?;
    }
    Ok(n)
}

/// BPF rules of a call that no task is in: registering it attaches the host-wide programs.
fn bare_plan() -> agentd_policy::BpfPlan {
    agentd_policy::BpfPlan {
        mode: agentd_policy::AuditMode::Audit,
        on_audit_loss: agentd_policy::LossAction::Record,
        net_rules: Vec::new(),
        exec_paths: Vec::new(),
        deny_open: Vec::new(),
        unix_sockets: Vec::new(),
        deny_write_exec: false,
    }
}

/// The host-wide links attached now (LSM hooks, syscall tracepoints, `sched_process_exec`).
fn host_wide_links() -> usize {
    agentd_audit::bpf::attached_host_wide().unwrap_or(0)
}

/// Detaches the host-wide programs now, unless another supervisor's call runs: how long it
/// took (if it detached anything), and whether nothing of agentd's is on any hook after.
fn detach_now() -> Result<(Option<f64>, bool), String> {
    use agentd_audit::bpf::{detach_if_idle, Idle};
    let took = match detach_if_idle(std::time::Duration::ZERO).map_err(|e| error_chain(&e))? {
        Idle::Detached(_, took) => Some(took.as_secs_f64() * 1000.0),
        Idle::Busy | Idle::Another => return Ok((None, false)),
        Idle::NotLoaded => None,
    };
    Ok((took, host_wide_links() == 0))
}

/// 3M `getppid` and 300k open/close of /dev/null, in this process (outside every call).
fn syscall_loop() -> f64 {
    let start = std::time::Instant::now();
    for _ in 0..3_000_000 {
        // SAFETY: a syscall without arguments.
        unsafe { libc::getppid() };
    }
    for _ in 0..300_000 {
        drop(std::fs::File::open("/dev/null"));
    }
    start.elapsed().as_secs_f64() * 1000.0
}

/// `tar` of Python's library and `find` of headers, as child processes outside every call.
fn tar_find() -> Result<f64, String> {
    let start = std::time::Instant::now();
    let status = std::process::Command::new("/bin/sh")
        .args(["-c", "tar cf /dev/null /usr/lib/python3* 2>/dev/null; find /usr -name '*.h' >/dev/null 2>&1"])
        .status()
        .map_err(|e| format!("running tar and find: {e}"))?;
    if !status.success() && status.code() != Some(2) {
        return Err(format!("tar and find exited {status}"));
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Times the outside workloads with no call running (the host-wide programs detached) and
/// while a call is registered (attached), interleaved. The registered call is a cgroup id no
/// task has: outside processes pay exactly what a running call makes them pay.
fn outside(host: &mut Host, rounds: usize, json: bool) -> Result<Option<Outside>, String> {
    let Some(mut bpf) = host.open_bpf() else { return Ok(None) };
    let plan = bare_plan();
    let fake_cgroup = u64::MAX - u64::from(std::process::id());
    let (mut idle_loop, mut active_loop, mut idle_tar, mut active_tar) = (vec![], vec![], vec![], vec![]);
    let (mut attach, mut detach) = (vec![], vec![]);
    let (mut idle_links, mut active_links, mut clean) = (0, 0, true);
    // Warm the caches tar and find read.
    tar_find()?;
    for round in 0..rounds {
        let (took, detached) = detach_now()?;
        detach.extend(took);
        clean &= detached;
        idle_links = idle_links.max(host_wide_links());
        idle_loop.push(syscall_loop());
        idle_tar.push(tar_find()?);
        let start = std::time::Instant::now();
        bpf.register(fake_cgroup, &plan).map_err(|e| error_chain(&e))?;
        attach.push(start.elapsed().as_secs_f64() * 1000.0);
        active_links = active_links.max(host_wide_links());
        active_loop.push(syscall_loop());
        active_tar.push(tar_find()?);
        bpf.unregister(fake_cgroup);
        if !json {
            eprint!("\ragentd: bench audit, outside processes {}/{rounds}", round + 1);
        }
    }
    if !json {
        eprintln!();
    }
    let pct = |a: f64, b: f64| (a - b) / b * 100.0;
    let (il, al, it, at) = (median(idle_loop), median(active_loop), median(idle_tar), median(active_tar));
    Ok(Some(Outside {
        idle_links,
        active_links,
        syscall_loop_idle_ms_p50: il,
        syscall_loop_active_ms_p50: al,
        syscall_loop_overhead_percent: pct(al, il),
        tar_find_idle_ms_p50: it,
        tar_find_active_ms_p50: at,
        tar_find_overhead_percent: pct(at, it),
        attach_ms_p50: median(attach),
        detach_ms_p50: if detach.is_empty() { 0.0 } else { median(detach) },
        idle_was_clean: clean,
    }))
}
