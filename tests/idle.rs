//! The BPF programs that every process of the host would run (syscall tracepoints, LSM
//! hooks, `sched_process_exec`) are attached only while calls run. A test binary of its own:
//! other tests' calls would keep them attached.

use std::time::{Duration, Instant};

use agentd_tests::{agentd_bin, audit_log_for, exec_env, need, sandbox_ready, Call, Fixture};
use serde_json::Value;

/// Links of the cgroup programs, which act on agentd's own cgroups alone and stay attached.
const CGROUP_LINKS: [&str; 7] = ["connect4", "connect6", "bind4", "bind6", "sendmsg4", "sendmsg6", "devices"];

/// Links of agentd's programs that every process of the host runs, attached now.
fn host_wide_links() -> usize {
    let Ok(builds) = std::fs::read_dir("/sys/fs/bpf/agentd") else { return 0 };
    builds
        .flatten()
        .filter_map(|b| std::fs::read_dir(b.path().join("links")).ok())
        .flat_map(|links| links.flatten())
        .filter(|l| !CGROUP_LINKS.contains(&l.file_name().to_string_lossy().as_ref()))
        .count()
}

/// Event ring buffers kept for supervisors (pinned under each build's `rings/`).
fn ring_pins() -> usize {
    let Ok(builds) = std::fs::read_dir("/sys/fs/bpf/agentd") else { return 0 };
    builds.flatten().filter_map(|b| std::fs::read_dir(b.path().join("rings")).ok()).map(|r| r.count()).sum()
}

fn wait_for(limit: Duration, what: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if what() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    what()
}

const ENV: [(&str, &str); 1] = [("AGENTD_BPF_IDLE_MS", "100")];

/// The tests of this file one at a time: each counts what is attached on the whole host.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Processes of `agentd __bpf-idle` alive now.
fn detachers() -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    procs
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .filter(|c| c.split(|b| *b == 0).any(|a| a == b"__bpf-idle"))
        .count()
}

fn run(m: &std::path::Path, command: &str) -> Call {
    exec_env(m, "sh", &[("command", command)], &ENV)
}

fn records(m: &std::path::Path, call: &Call) -> Vec<Value> {
    let id = call.json["call_id"].as_str().unwrap_or_default().to_string();
    std::fs::read_to_string(audit_log_for(m))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["call_id"] == id.as_str())
        .collect()
}

#[test]
fn host_wide_programs_are_attached_only_while_calls_run() {
    let test = "host_wide_programs_are_attached_only_while_calls_run";
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("idle");
    let m = fx.manifest("");
    let file = fx.path("data/file.txt");
    let probe = run(&m, "true");
    let layer = probe.json["enforcement"]["bpf"]["layer"].as_str().unwrap_or("none").to_string();
    if !need(test, "bpf", layer != "none", "no BPF layer") {
        return;
    }
    // After a call, with no other running, its supervisor's idle detacher removes them.
    assert!(wait_for(Duration::from_secs(20), || host_wide_links() == 0), "{} links still attached", host_wide_links());

    // A call that runs for a while: attached while it runs.
    let bg = {
        let m = m.clone();
        let cmd = format!("sleep 3; cat {file}");
        std::thread::spawn(move || run(&m, &cmd))
    };
    assert!(wait_for(Duration::from_secs(10), || host_wide_links() > 0), "nothing attached while a call ran");
    // An idle detacher started now must leave them: a call runs.
    let out = std::process::Command::new(agentd_bin())
        .arg("__bpf-idle")
        .env("AGENTD_BPF_IDLE_MS", "0")
        .output()
        .expect("run agentd __bpf-idle");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(host_wide_links() > 0, "the idle detacher detached during a call");
    let long = bg.join().expect("the background call");
    assert_eq!(long.exit_code(), 0, "{}", long.json);
    assert_eq!(long.json["events"]["lost"], 0, "{}", long.json["events"]);
    let recs = records(&m, &long);
    assert!(
        recs.iter().any(|r| r["kind"] == "open" && r["details"]["path"] == file.as_str()),
        "the open after the detacher's attempt was not recorded: {recs:#?}"
    );
    assert!(wait_for(Duration::from_secs(20), || host_wide_links() == 0), "still attached after the last call");

    // The next call attaches them again, and its events are all recorded.
    let again = run(&m, &format!("cat {file}"));
    assert_eq!(again.exit_code(), 0, "{}", again.json);
    assert_eq!(again.json["events"]["lost"], 0, "{}", again.json["events"]);
    let recs = records(&m, &again);
    assert!(
        recs.iter().any(|r| r["kind"] == "open" && r["details"]["path"] == file.as_str()),
        "no open record after attaching again: {recs:#?}"
    );
    assert!(wait_for(Duration::from_secs(20), || host_wide_links() == 0), "still attached after the last call");
}

/// One-shot calls a fraction of a second apart (an MCP client starting a tool per call) keep
/// the programs attached between them, with one idle detacher waiting, not one per call; a
/// grace after the last, they are detached.
#[test]
fn one_shot_calls_in_a_row_share_one_idle_detacher_and_stay_attached() {
    let test = "one_shot_calls_in_a_row_share_one_idle_detacher_and_stay_attached";
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("idle-row");
    let m = fx.manifest("");
    let env = [("AGENTD_BPF_IDLE_MS", "1500")];
    let probe = exec_env(&m, "sh", &[("command", "true")], &env);
    let layer = probe.json["enforcement"]["bpf"]["layer"].as_str().unwrap_or("none").to_string();
    if !need(test, "bpf", layer != "none", "no BPF layer") {
        return;
    }
    // The probe's detacher takes the idle lock first.
    std::thread::sleep(Duration::from_millis(300));
    // Calls one after another take the same ring buffer: none adds one (an update of the map
    // of maps, which waits for an RCU grace period).
    let rings = ring_pins();
    assert!(rings >= 1, "the probe's ring buffer is not kept");
    for i in 0..6 {
        let call = exec_env(&m, "sh", &[("command", "true")], &env);
        assert_eq!(call.exit_code(), 0, "call {i}: {}", call.json);
        assert!(host_wide_links() > 0, "detached between one-shot calls (after call {i})");
        assert!(detachers() <= 1, "{} idle detachers wait after call {i}", detachers());
        assert_eq!(ring_pins(), rings, "call {i} added a ring buffer");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(wait_for(Duration::from_secs(20), || host_wide_links() == 0), "still attached after the last call");
    assert!(wait_for(Duration::from_secs(5), || detachers() == 0), "{} idle detachers left", detachers());
}
