//! The BPF layer on this host: the fallback programs (cgroup socket hooks and the syscall
//! tracer) through the real binary. BPF LSM itself is proven in the VM (`cargo xtask vm-test`).

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use agentd_tests::{audit_log_for, need, sandbox_ready, sh, Call, Fixture};
use serde_json::Value;

fn bpf_ready(test: &str, probe: &Call) -> bool {
    let layer = probe.json["enforcement"]["bpf"]["layer"].as_str().unwrap_or_default().to_string();
    let note = probe.json["enforcement"]["bpf"]["note"].as_str().unwrap_or("no BPF layer").to_string();
    need(test, "bpf", layer != "none", &note)
}

fn events_of(fx_manifest: &std::path::Path, call: &Call) -> Vec<Value> {
    let id = call.json["call_id"].as_str().unwrap_or_default().to_string();
    std::fs::read_to_string(audit_log_for(fx_manifest))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["call_id"] == id.as_str())
        .collect()
}

fn listener() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    l.set_nonblocking(true).expect("nonblocking");
    let h = std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if let Ok((mut s, peer)) = l.accept() {
                let _ = writeln!(s, "HELLO {}", peer.ip());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    (port, h)
}

fn connect(ip: &str, port: u16) -> String {
    format!("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(PeerAddr=>\"{ip}:{port}\",Timeout=>3) or die \"connect: $!\\n\"; print <$s>'")
}

#[test]
fn exact_addresses_are_enforced_even_when_the_port_is_granted() {
    if !sandbox_ready("exact_addresses_are_enforced_even_when_the_port_is_granted") {
        return;
    }
    let fx = Fixture::new("exact");
    let (port, _l) = listener();
    let m = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"127.0.0.1:{port}\"]"));
    let granted = sh(&m, &connect("127.0.0.1", port));
    if !bpf_ready("exact_addresses_are_enforced_even_when_the_port_is_granted", &granted) {
        return;
    }
    assert_eq!(granted.stdout(), "HELLO 127.0.0.1\n", "{}", granted.json);
    // Same port, another address: Landlock (ports only) lets it through, the cgroup program
    // does not (and behind it, the call's namespace has no route there).
    let other = sh(&m, &connect("127.0.0.2", port));
    assert!(other.stderr().contains("connect: Operation not permitted"), "{}", other.json);
    assert_eq!(other.stdout(), "");
    let recs = events_of(&m, &other);
    let denied: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "connect" && r["verdict"] == "denied").collect();
    assert_eq!(denied.len(), 1, "{recs:#?}");
    assert_eq!(denied[0]["details"]["address"], format!("127.0.0.2:{port}").as_str());
    assert_eq!(other.json["events"]["denied"].as_u64(), Some(1), "{}", other.json);

    // Audit mode: the attempt is recorded as what enforce would deny. The program lets it
    // through, but in the call's own namespace only agentd listens, and it refuses an address
    // that is not granted (recorded too), so the call reaches nothing.
    let m =
        fx.manifest(&format!("[tools.sh.net]\nconnect = [\"127.0.0.1:{port}\"]\n[tools.sh.audit]\nmode = \"audit\""));
    let audited = sh(&m, &connect("127.0.0.2", port));
    assert_eq!(audited.stdout(), "", "{}", audited.json);
    let recs = events_of(&m, &audited);
    let denied = |hook: bool| {
        recs.iter()
            .any(|r| r["kind"] == "connect" && r["verdict"] == "denied" && (r["details"]["via"] == "forwarder") != hook)
    };
    assert!(denied(true) && denied(false), "both layers must record the attempt: {recs:#?}");
}

#[test]
fn the_fallback_audit_records_exec_open_and_connect_with_the_call_id() {
    if !sandbox_ready("the_fallback_audit_records_exec_open_and_connect_with_the_call_id") {
        return;
    }
    let fx = Fixture::new("events");
    let (port, _l) = listener();
    let m = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"127.0.0.1:{port}\"]"));
    let r = sh(&m, &format!("cat {}; {}", fx.path("data/file.txt"), connect("127.0.0.1", port)));
    if !bpf_ready("the_fallback_audit_records_exec_open_and_connect_with_the_call_id", &r) {
        return;
    }
    assert_eq!(r.stdout(), "public data\nHELLO 127.0.0.1\n", "{}", r.json);
    let recs = events_of(&m, &r);
    let has = |kind: &str, key: &str, want: &str| recs.iter().any(|x| x["kind"] == kind && x["details"][key] == want);
    assert!(has("exec", "path", "/bin/sh"), "{recs:#?}");
    assert!(has("exec", "path", "/usr/bin/cat") || has("exec", "path", "cat"), "{recs:#?}");
    assert!(has("open", "path", &fx.path("data/file.txt")), "{recs:#?}");
    assert!(has("connect", "address", &format!("127.0.0.1:{port}")), "{recs:#?}");
    let events = r.json["events"]["total"].as_u64().unwrap_or(0);
    let kinds = ["exec", "open", "connect", "bind"];
    assert_eq!(recs.iter().filter(|x| kinds.contains(&x["kind"].as_str().unwrap_or_default())).count() as u64, events);
    let summary = recs.last().cloned().unwrap_or_default();
    assert_eq!(summary["kind"], "summary");
    assert_eq!(summary["details"]["events"].as_u64(), Some(events));
}

#[test]
fn a_flood_of_events_is_recorded_or_its_losses_counted() {
    if !sandbox_ready("a_flood_of_events_is_recorded_or_its_losses_counted") {
        return;
    }
    let fx = Fixture::new("flood-events");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 120000\n[tools.sh.audit]\non_audit_loss = \"record\"");
    let opens = 100_000u64;
    let r = sh(&m, &format!("perl -e 'for (1..{opens}) {{ open(my $f, \"<\", \"/dev/null\") or die; close $f }}'"));
    if !bpf_ready("a_flood_of_events_is_recorded_or_its_losses_counted", &r) {
        return;
    }
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    let (total, lost) =
        (r.json["events"]["total"].as_u64().unwrap_or(0), r.json["events"]["lost"].as_u64().unwrap_or(0));
    // Every open is either recorded or counted as lost: nothing vanishes silently.
    assert!(total + lost >= opens, "recorded {total} + lost {lost} < {opens} opens");
    let recorded =
        events_of(&m, &r).iter().filter(|x| x["kind"] == "open" && x["details"]["path"] == "/dev/null").count() as u64;
    assert!(recorded + lost >= opens, "the audit log holds {recorded} of the opens, {lost} lost");
    println!("flood: {total} events recorded, {lost} lost");
}

#[test]
fn the_fallback_records_results_and_kernel_refusals() {
    if !sandbox_ready("the_fallback_records_results_and_kernel_refusals") {
        return;
    }
    let fx = Fixture::new("results");
    let m = fx.manifest("");
    let copy = fx.path("out/t");
    let r = sh(&m, &format!("cp /usr/bin/true {copy} && {copy}; cat /no-such-file-here; echo done"));
    if !bpf_ready("the_fallback_records_results_and_kernel_refusals", &r) {
        return;
    }
    assert!(r.stdout().contains("done"), "{}", r.json);
    let active = r.json["enforcement"]["bpf"]["active"].to_string();
    for program in ["raw_tracepoint/sys_exit", "cgroup/sendmsg4", "cgroup/sendmsg6", "cgroup/dev"] {
        assert!(active.contains(program), "{program} is not active: {active}");
    }
    let recs = events_of(&m, &r);
    // The kernel refused to run the copy (noexec, Landlock): the record says so.
    let exec = recs.iter().find(|x| x["kind"] == "exec" && x["details"]["path"] == copy.as_str());
    let exec = exec.unwrap_or_else(|| panic!("no exec record of {copy}: {recs:#?}"));
    assert_eq!(exec["details"]["result"], -13, "{exec}");
    assert_eq!(exec["details"]["errno"], "EACCES", "{exec}");
    assert_eq!(exec["verdict"], "denied", "{exec}");
    let open = recs.iter().find(|x| x["kind"] == "open" && x["details"]["path"] == "/no-such-file-here");
    let open = open.unwrap_or_else(|| panic!("no open record: {recs:#?}"));
    assert_eq!(open["details"]["errno"], "ENOENT", "{open}");
    assert_eq!(open["verdict"], "allowed", "{open}");
    // The summary counts the refusal.
    assert!(r.json["events"]["denied"].as_u64().unwrap_or(0) >= 1, "{}", r.json["events"]);
}
