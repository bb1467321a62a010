//! Many supervisors at once: each one's events reach it, with up to 4096 running together,
//! and their ring buffers are reused; and no lock agentd takes can be held by another user or
//! make it wait forever.
//! Its own binary: the tests here hold agentd's locks, and start many calls at once.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentd_tests::{audit_log_for, exec, need, sandbox_ready, sh, Fixture};
use serde_json::Value;

/// The tests here hold agentd's locks: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn sixty_four_one_shot_calls_run_together_and_keep_every_event() {
    let test = "sixty_four_one_shot_calls_run_together_and_keep_every_event";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("together");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 150000");
    let probe = sh(&m, "true");
    if !need(test, "bpf", probe.json["enforcement"]["bpf"]["layer"].as_str() != Some("none"), "no BPF layer") {
        return;
    }
    const N: usize = 64;
    let (out, data) = (fx.path("out"), fx.path("data/file.txt"));
    // Each call marks that it started, then waits until all N have: with a cap on concurrent
    // supervisors below N, the ones running would wait for calls that cannot start, and time
    // out. Then each reads a file, which its supervisor must record.
    let calls: Vec<std::thread::JoinHandle<agentd_tests::Call>> = (0..N)
        .map(|i| {
            let (m, out, data) = (m.clone(), out.clone(), data.clone());
            std::thread::spawn(move || {
                // The wait is bounded by the clock, not a count of rounds: 64 shells on two
                // cores can take well over 0.1 s a round.
                let cmd = format!(
                    "touch {out}/started-{i}; end=$(($(date +%s)+100)); while [ $(ls {out} | wc -l) -lt {N} ] && [ $(date +%s) -lt $end ]; do sleep 0.2; done; ls {out} | wc -l; cat {data}"
                );
                exec(&m, "sh", &[("command", &cmd)], &[])
            })
        })
        .collect();
    let results: Vec<agentd_tests::Call> = calls.into_iter().map(|h| h.join().expect("call thread")).collect();
    let log: Vec<Value> = std::fs::read_to_string(audit_log_for(&m))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for r in &results {
        assert_eq!(r.stdout(), format!("{N}\npublic data\n"), "{}", r.json);
        assert_eq!(r.json["events"]["lost"].as_u64(), Some(0), "{}", r.json);
        let id = r.json["call_id"].as_str().unwrap_or_default();
        let read =
            log.iter().any(|x| x["call_id"] == id && x["kind"] == "open" && x["details"]["path"] == data.as_str());
        assert!(read, "call {id}'s read of {data} is not in the log");
    }
    // Each held a ring buffer of its own. Once no call runs, the idle detacher frees those
    // nobody holds but the first two, which later supervisors take without adding one.
    let rings = || -> usize {
        let Ok(builds) = std::fs::read_dir("/sys/fs/bpf/agentd") else { return 0 };
        builds.flatten().filter_map(|b| std::fs::read_dir(b.path().join("rings")).ok()).map(|r| r.count()).sum()
    };
    let start = std::time::Instant::now();
    while rings() > 2 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(rings() <= 2, "{} ring buffers kept after the calls ended", rings());
}

/// Every file under `dir`, recursively.
fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(files_below(&p));
        } else if e.file_type().is_ok_and(|t| t.is_file()) {
            out.push(p);
        }
    }
    out
}

#[test]
fn no_other_user_can_take_agentd_locks_and_no_lock_stalls_a_call() {
    let test = "no_other_user_can_take_agentd_locks_and_no_lock_stalls_a_call";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("locks");
    let m = fx.manifest("");
    let probe = sh(&m, "true");
    if !need(test, "bpf", probe.json["enforcement"]["bpf"]["layer"].as_str() != Some("none"), "no BPF layer") {
        return;
    }
    // The lock directory is root's alone, and so is every lock in it.
    let md = std::fs::symlink_metadata("/run/agentd/lock").expect("/run/agentd/lock");
    assert!(md.is_dir());
    assert_eq!((md.uid(), md.permissions().mode() & 0o7777), (0, 0o700));
    // Files agentd binds into calls (`provided/`, such as a call's resolv.conf) are readable
    // by all on purpose, and agentd never locks them.
    let files: Vec<PathBuf> =
        files_below(Path::new("/run/agentd")).into_iter().filter(|f| !f.starts_with("/run/agentd/provided")).collect();
    assert!(files.iter().any(|f| f.ends_with("bpf.lock")), "{files:?}");
    for f in &files {
        // The attack: an unprivileged user takes the lock and never lets go.
        let out = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "flock", "-n"])
            .arg(f)
            .arg("true")
            .output()
            .expect("setpriv and flock from util-linux");
        assert!(!out.status.success(), "uid 65534 could lock {}", f.display());
    }
    for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "lock")) {
        let mode = std::fs::metadata(f).expect("lock file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // Held by anyone (here root, who can), the loader's lock delays a call by a bounded time,
    // and the refusal says who holds it.
    let mut holder =
        Command::new("flock").args(["-o", "/run/agentd/lock/bpf.lock", "sleep", "30"]).spawn().expect("flock");
    std::thread::sleep(Duration::from_millis(300));
    std::env::set_var("AGENTD_LOCK_WAIT_MS", "700");
    let started = std::time::Instant::now();
    let r = exec(&m, "sh", &[("command", "echo should-not-run")], &[]);
    let took = started.elapsed();
    std::env::remove_var("AGENTD_LOCK_WAIT_MS");
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(took < Duration::from_secs(20), "the call waited {took:?}");
    assert_eq!(r.exit_code(), 125, "{}", r.json);
    assert!(!r.stdout().contains("should-not-run"), "{}", r.json);
    let error = r.json["error"].as_str().unwrap_or_default();
    assert!(error.contains(&format!("bpf.lock was held by pid {} (flock", holder.id())), "{error}");
    // Positive control: with the lock free, calls run again.
    assert_eq!(sh(&m, "echo ok").stdout(), "ok\n");
}
