//! Resource attacks are contained: the supervisor survives, the result says what happened,
//! and nothing of the call is left on the host.

use agentd_tests::{leftover_cgroups, processes_with, sandbox_ready, sh, token, Fixture};

fn assert_clean(call: &agentd_tests::Call, marker: &str) {
    let id = call.json["call_id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{}", call.json);
    assert_eq!(processes_with(marker), Vec::<u32>::new(), "processes of the call survived");
    assert_eq!(leftover_cgroups(&id), Vec::<std::path::PathBuf>::new(), "the call's cgroups were left behind");
}

#[test]
fn fork_bomb_is_contained() {
    if !sandbox_ready("fork_bomb_is_contained") {
        return;
    }
    let fx = Fixture::new("forkbomb");
    let m = fx.manifest("[tools.sh.limits]\npids = 32\ntimeout_ms = 3000");
    let marker = token("BOMB");
    let r = sh(&m, &format!("b() {{ b | b & }}; b; sleep 1 # {marker}"));
    // The limit bit (forks failed) and the call still ended, leaving nothing behind.
    assert!(r.stderr().contains("fork"), "the pids limit never bit: {}", r.json);
    assert!(!r.json["timed_out"].as_bool().unwrap_or(true), "{}", r.json);
    assert_clean(&r, &marker);
    // The host can still start processes and agentd still works.
    let r = sh(&m, "echo alive");
    assert_eq!(r.stdout(), "alive\n");
}

#[test]
fn memory_bomb_is_oom_killed_and_reported() {
    if !sandbox_ready("memory_bomb_is_oom_killed_and_reported") {
        return;
    }
    let fx = Fixture::new("membomb");
    let m = fx.manifest("[tools.sh.limits]\nmemory_mb = 64\ntimeout_ms = 20000");
    let marker = token("MEM");
    let r = sh(&m, &format!("exec perl -e '$x = \"x\" x (1024*1024*1024); print length $x' # {marker}"));
    assert_eq!(r.json["oom_killed"].as_bool(), Some(true), "{}", r.json);
    assert_eq!(r.json["signal"].as_i64(), Some(9), "{}", r.json);
    assert_eq!(r.exit_code(), 137, "{}", r.json);
    assert_clean(&r, &marker);
}

#[test]
fn timeout_kills_the_whole_tree_including_double_forked_daemons() {
    if !sandbox_ready("timeout_kills_the_whole_tree_including_double_forked_daemons") {
        return;
    }
    let fx = Fixture::new("loop");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 1000");
    let marker = token("LOOP");
    let r = sh(&m, &format!("(setsid sh -c 'while :; do :; done # {marker}' &); while :; do :; done # {marker}"));
    assert_eq!(r.json["timed_out"].as_bool(), Some(true), "{}", r.json);
    assert_eq!(r.exit_code(), 124, "{}", r.json);
    assert_clean(&r, &marker);

    // A tool that exits at once, leaving a daemon behind, returns at once and takes it along.
    let marker = token("DAEMON");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 20000");
    // The daemon keeps the marker in its own argv (two commands, so sh does not exec sleep),
    // and holds none of the call's pipes: only the namespace's end can take it down.
    let r = sh(&m, &format!("setsid sh -c 'sleep 600; : {marker}' </dev/null >/dev/null 2>&1 & echo started"));
    assert_eq!((r.exit_code(), r.stdout().as_str()), (0, "started\n"), "{}", r.json);
    assert_eq!(r.json["timed_out"].as_bool(), Some(false));
    // Not held up by agentd's 2 s fallback for pipes kept open from outside the call.
    assert!(r.json["duration_ms"].as_u64().unwrap_or(u64::MAX) < 1500, "{}", r.json);
    assert_clean(&r, &marker);
}

#[test]
fn output_flood_is_truncated_with_bounded_memory() {
    if !sandbox_ready("output_flood_is_truncated_with_bounded_memory") {
        return;
    }
    let fx = Fixture::new("flood");
    let m = fx.manifest("[tools.sh.limits]\noutput_bytes = 1000\ntimeout_ms = 60000");
    let total: u64 = 300 << 20;
    let (r, peak_kib) = agentd_tests::sh_with_peak_rss(
        &m,
        &format!("head -c {total} /dev/zero | tr '\\0' x; head -c {total} /dev/zero >&2"),
    );
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    assert_eq!(r.stdout().len(), 1000);
    assert!(r.stdout().bytes().all(|b| b == b'x'));
    assert_eq!(r.json["stdout_truncated"].as_bool(), Some(true));
    assert_eq!(r.json["stderr_truncated"].as_bool(), Some(true));
    assert_eq!(r.json["stdout_bytes"].as_u64(), Some(total));
    assert_eq!(r.json["stderr_bytes"].as_u64(), Some(total));
    // agentd (and what it reaped) stayed far below what it relayed.
    assert!(peak_kib < 64 * 1024, "agentd peaked at {peak_kib} KiB while relaying {} MiB", total >> 20);
}
