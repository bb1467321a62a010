//! A supervisor that cannot get a BPF event slot refuses its calls rather than run them
//! unrecorded.

use std::process::{Child, Command};
use std::time::Duration;

use agentd_tests::{exec, need, sandbox_ready, sh, Fixture};

#[test]
fn calls_are_refused_when_every_event_slot_is_taken() {
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
                .arg(format!("/run/agentd/events-{slot}.lock"))
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
}
