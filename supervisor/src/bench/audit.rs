//! `agentd bench audit`: what the eBPF layer costs a syscall-heavy tool, and how many events
//! per second it delivers.

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
    without_bpf_ms_p50: f64,
    with_bpf_ms_p50: f64,
    overhead_percent: f64,
    events_per_call_p50: u64,
    lost_events_total: u64,
    events_per_second: f64,
    ring_events_per_call_p50: u64,
    ring_events_per_second: f64,
    bpf_layer: &'static str,
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
"#
    );
    let manifest = agentd_policy::parse("bench-audit.toml", &manifest).map_err(|e| e.to_string())?;
    let mut host = Host::probe();
    let bpf = host
        .open_bpf()
        .ok_or_else(|| format!("the eBPF layer is not available: {}", host.bpf_note.clone().unwrap_or_default()))?;
    let layer = bpf.layer().name();
    let dir = std::env::temp_dir().join(format!("agentd-bench-audit-{}", std::process::id()));
    let log = |name: &str| AuditLog::open(&dir.join(name)).map_err(|e| error_chain(&e));
    let mut with = Runner::new(&host).with_audit(log("with.jsonl")?).with_bpf(bpf);
    let mut without = Runner::new(&host).with_audit(log("without.jsonl")?);
    let (mut t_with, mut t_without, mut events) = (Vec::new(), Vec::new(), Vec::new());
    let mut lost = 0;
    let mut ring = Vec::new();
    for round in 0..rounds {
        for (which, runner) in [("with", &mut with), ("without", &mut without)] {
            let req = CallRequest {
                call_id: format!("bench-audit-{}-{round}-{which}", std::process::id()),
                tool: "loop".into(),
                ..CallRequest::default()
            };
            let plan = compile(&manifest, &req, &host.facts, &RealFs::default()).map_err(|e| e.to_string())?;
            let r = runner.run(&plan, OutputMode::Capture);
            if r.exit_code != 0 {
                return Err(format!("the loop exited {}: {}", r.exit_code, r.error.unwrap_or(r.stderr)));
            }
            let ms = r.timing.spawn_to_reaped.as_secs_f64() * 1000.0;
            if which == "with" {
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
    let (a, b, ev, rv) = (median(t_with), median(t_without), median(events), median(ring));
    let report = Report {
        opens_per_call: n,
        rounds,
        without_bpf_ms_p50: b,
        with_bpf_ms_p50: a,
        overhead_percent: (a - b) / b * 100.0,
        events_per_call_p50: ev as u64,
        lost_events_total: lost,
        events_per_second: ev / (a / 1000.0),
        ring_events_per_call_p50: rv as u64,
        ring_events_per_second: rv / (a / 1000.0),
        bpf_layer: layer,
    };
    if json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("{n} open/close pairs per call, {rounds} calls per variant, interleaved (p50), {layer} layer:");
    println!("  without the eBPF layer  {b:>9.1} ms   (programs stay attached host-wide; the call is not registered,");
    println!("                                       so they return at their first map lookup)");
    println!("  with the eBPF layer     {a:>9.1} ms   overhead {:+.1}%  (target <= 3%)", report.overhead_percent);
    println!(
        "  events delivered: {} per call, {:.0}/s, {lost} lost in all  (target >= 200000/s, none lost)",
        report.events_per_call_p50, report.events_per_second
    );
    println!(
        "  ring records read: {} per call (attempts and their results), {:.0}/s",
        report.ring_events_per_call_p50, report.ring_events_per_second
    );
    Ok(())
}
