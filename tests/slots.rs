//! A supervisor that cannot get a BPF event slot refuses its calls rather than run them
//! unrecorded, and no lock agentd takes can be held by another user or make it wait forever.
//! Its own binary: holding the locks would block the calls of tests running beside it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use agentd_tests::{exec, need, sandbox_ready, sh, Fixture};

/// The tests here hold agentd's locks: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn calls_are_refused_when_every_event_slot_is_taken() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !sandbox_ready("calls_are_refused_when_every_event_slot_is_taken") {
        return;
    }
    let fx = Fixture::new("slots");
    let m = fx.manifest("");
    // Load the layer first (a normal call), so that the slots exist to be taken.
    let probe = sh(&m, "true");
    let layer = probe.json["enforcement"]["bpf"]["layer"].as_str().unwrap_or("none").to_string();
    if !need("calls_are_refused_when_every_event_slot_is_taken", "bpf", layer != "none", "no BPF layer") {
        return;
    }
    let holders: Vec<Child> = (0..8)
        .map(|slot| {
            // -o: only flock itself holds the lock, so killing it frees the slot.
            Command::new("flock")
                .arg("-o")
                .arg(format!("/run/agentd/lock/events-{slot}.lock"))
                .args(["sleep", "30"])
                .spawn()
                .expect("flock(1) from util-linux")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    std::env::set_var("AGENTD_SLOT_WAIT_MS", "500");
    let r = exec(&m, "sh", &[("command", "echo should-not-run")], &[]);
    std::env::remove_var("AGENTD_SLOT_WAIT_MS");
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    assert_eq!(r.exit_code(), 125, "{}", r.json);
    assert!(!r.stdout().contains("should-not-run"), "{}", r.json);
    let error = r.json["error"].as_str().unwrap_or_default();
    assert!(error.contains("event slots are in use"), "{error}");
    assert!(error.contains("slot 0 is held by pid"), "the refusal names who holds the slots: {error}");
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
    std::env::set_var("AGENTD_SLOT_WAIT_MS", "700");
    let started = std::time::Instant::now();
    let r = exec(&m, "sh", &[("command", "echo should-not-run")], &[]);
    let took = started.elapsed();
    std::env::remove_var("AGENTD_SLOT_WAIT_MS");
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
