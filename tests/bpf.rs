//! The BPF layer on this host: the fallback programs (cgroup socket hooks and the syscall
//! tracer) through the real binary. BPF LSM itself is proven in the VM (`cargo xtask vm-test`).

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use agentd_tests::{audit_log_for, kernel_landlock_abi, need, sandbox_ready, sh, Call, Fixture};
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
    // The tool's string, and what the kernel ran (/bin/sh may be a symlink).
    assert!(has("exec", "path", "/bin/sh") || has("exec", "claimed_path", "/bin/sh"), "{recs:#?}");
    assert!(has("exec", "path", "/usr/bin/cat") || has("exec", "path", "cat"), "{recs:#?}");
    assert!(has("open", "path", &fx.path("data/file.txt")), "{recs:#?}");
    assert!(has("connect", "address", &format!("127.0.0.1:{port}")), "{recs:#?}");
    let events = r.json["events"]["total"].as_u64().unwrap_or(0);
    let kinds = ["exec", "open", "connect", "bind", "change"];
    // Each record is an event, and a count of repeated opens is that many events.
    let recorded: u64 = recs
        .iter()
        .filter(|x| kinds.contains(&x["kind"].as_str().unwrap_or_default()))
        .map(|x| x["details"]["repeats"].as_u64().unwrap_or(1))
        .sum();
    assert_eq!(recorded, events);
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
    // An open of the same file again by the same thread is counted in the kernel: its
    // record (written when the call ends) says how many.
    let recorded: u64 = events_of(&m, &r)
        .iter()
        .filter(|x| x["kind"] == "open" && x["details"]["path"] == "/dev/null")
        .map(|x| x["details"]["repeats"].as_u64().unwrap_or(1))
        .sum();
    assert!(recorded + lost >= opens, "the audit log holds {recorded} of the opens, {lost} lost");
    println!("flood: {total} events recorded, {lost} lost");
}

#[test]
fn repeated_opens_are_counted_within_a_quota_and_never_across_an_exec() {
    if !sandbox_ready("repeated_opens_are_counted_within_a_quota_and_never_across_an_exec") {
        return;
    }
    let fx = Fixture::new("repeats");
    // More distinct files than one call may have counted (4096), each opened twice by one
    // thread: those past the quota are recorded one by one, and nothing is lost either way.
    let files = 5000;
    for i in 0..files {
        std::fs::write(fx.path(&format!("data/f{i}")), "x").expect("write");
    }
    let data = fx.path("data");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 120000\n[tools.sh.audit]\non_audit_loss = \"record\"");
    let r = sh(
        &m,
        &format!(
            "perl -e 'for my $pass (1, 2) {{ for my $i (0..{last}) {{ open(my $f, \"<\", \"{data}/f$i\") or die; close $f }} }}'; \
             perl -e 'open(my $f, \"<\", \"{data}/file.txt\") or die; close $f; exec \"perl\", \"-e\", \"open(my \\$g, q(<), q({data}/file.txt)) or die\"'",
            last = files - 1
        ),
    );
    if !bpf_ready("repeated_opens_are_counted_within_a_quota_and_never_across_an_exec", &r) {
        return;
    }
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    assert_eq!(r.json["events"]["lost"].as_u64(), Some(0), "{}", r.json["events"]);
    let recs = events_of(&m, &r);
    let of_files: Vec<&Value> = recs
        .iter()
        .filter(|x| {
            x["kind"] == "open"
                && x["details"]["path"]
                    .as_str()
                    .is_some_and(|p| p.strip_prefix(&format!("{data}/f")).is_some_and(|n| n.parse::<u32>().is_ok()))
        })
        .collect();
    let opens: u64 = of_files.iter().map(|x| x["details"]["repeats"].as_u64().unwrap_or(1)).sum();
    let counted = of_files.iter().filter(|x| !x["details"]["repeats"].is_null()).count();
    println!("quota: {} opens of {files} files, {} records, {counted} of them counts", opens, of_files.len());
    assert_eq!(opens, 2 * files as u64, "every open is recorded or counted");
    assert!((4000..=4200).contains(&counted), "{counted} files counted; the quota is 4096");
    // The same file opened before and after an exec (same thread id): two records, no count.
    let text: Vec<&Value> = recs
        .iter()
        .filter(|x| x["kind"] == "open" && x["details"]["path"] == fx.path("data/file.txt").as_str())
        .collect();
    assert_eq!(text.len(), 2, "{text:#?}");
    assert!(text.iter().all(|x| x["details"]["repeats"].is_null()), "{text:#?}");
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
    for program in ["sys_exit", "raw_tracepoint/sched_process_exec", "cgroup/sendmsg4", "cgroup/sendmsg6", "cgroup/dev"]
    {
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

/// A manifest like [`Fixture::manifest`]'s whose tool may also run the `paths` helper
/// (tests/src/bin/paths.rs), copied into the fixture's `bin/`; returns it and the helper.
fn paths_manifest(fx: &Fixture) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let bin = fx.path("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let helper = format!("{bin}/paths");
    std::fs::copy(env!("CARGO_BIN_EXE_paths"), &helper).expect("copy the paths helper");
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = fx.manifest_granting(&[&bin], &[&bin], "[tools.sh.limits]\ntimeout_ms = 60000");
    (path, helper)
}

#[test]
fn the_fallback_names_what_the_kernel_opened_not_what_the_tool_claims() {
    if !sandbox_ready("the_fallback_names_what_the_kernel_opened_not_what_the_tool_claims") {
        return;
    }
    let fx = Fixture::new("truth");
    // Two files whose paths have the same length, told apart by their first line.
    let (a, b) = (fx.path("data/aaaa.txt"), fx.path("data/bbbb.txt"));
    std::fs::write(&a, "A\n").expect("write a");
    std::fs::write(&b, "B\n").expect("write b");
    let pathfile = fx.path("data/pathfile");
    std::fs::write(&pathfile, format!("{a}\0")).expect("write pathfile");
    // A path longer than an event holds: 8 directories of 40 characters.
    let mut long = fx.path("out");
    for i in 0..8 {
        long.push_str(&format!("/{}{i}", "d".repeat(39)));
    }
    std::fs::create_dir_all(&long).expect("mkdir long");
    let long_file = format!("{long}/leaf.txt");
    std::fs::write(&long_file, "L\n").expect("write leaf");
    let (m, helper) = paths_manifest(&fx);
    let races = 2000;
    let r = sh(
        &m,
        &format!(
            "{helper} race {a} {b} {races}; {helper} unfaulted {pathfile}; {helper} at {} bbbb.txt; cd {long} && cat ./leaf.txt",
            fx.path("data")
        ),
    );
    if !bpf_ready("the_fallback_names_what_the_kernel_opened_not_what_the_tool_claims", &r) {
        return;
    }
    let out = r.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), races + 3, "{}", r.json);
    let recs = events_of(&m, &r);
    assert_eq!(r.json["events"]["lost"].as_u64(), Some(0), "{}", r.json["events"]);
    let opened = |x: &&Value| x["kind"] == "open" && x["details"]["result"].as_i64().is_some_and(|v| v >= 0);
    let of_ab: Vec<&Value> = recs
        .iter()
        .filter(opened)
        .filter(|x| x["details"]["path"] == a.as_str() || x["details"]["path"] == b.as_str())
        .collect();
    // The races: every successful open's record names the file whose content was read (each
    // from a thread of its own, so none is counted as another's repeat).
    let truth: Vec<&str> = lines[..races]
        .iter()
        .filter_map(|l| l.strip_prefix("opened "))
        .map(|l| if l == "A" { a.as_str() } else { b.as_str() })
        .collect();
    assert!(of_ab.len() >= truth.len() + 2, "{} records for {} opens", of_ab.len(), truth.len());
    let wrong = truth.iter().zip(&of_ab).filter(|(t, x)| x["details"]["path"] != **t).count();
    let swapped = of_ab[..truth.len()].iter().filter(|x| x["details"]["claimed_path"] != x["details"]["path"]).count();
    println!(
        "path-swap race: {} opens, {wrong} records naming another file, {swapped} where the tool's string differed",
        truth.len()
    );
    assert_eq!(wrong, 0, "records must name the file really opened");
    assert!(of_ab.iter().all(|x| x["details"]["repeats"].is_null()), "{of_ab:#?}");
    for x in &of_ab[..truth.len()] {
        let d = &x["details"];
        assert_eq!(d["path_source"], "kernel", "{x}");
        assert_eq!(d["path_mismatch"] == true, d["claimed_path"] != d["path"], "{x}");
    }
    // The unfaulted page: the string is read at the open's end, when the kernel has faulted
    // the page in (so it may be readable by then); the kernel's path is there either way.
    let unf = of_ab[truth.len()];
    assert_eq!(unf["details"]["path"], a.as_str(), "{unf}");
    assert_eq!(unf["details"]["path_source"], "kernel", "{unf}");
    // Relative to a directory fd: the whole path.
    let rel = of_ab[truth.len() + 1];
    assert_eq!(
        (rel["details"]["path"].as_str(), rel["details"]["claimed_path"].as_str()),
        (Some(b.as_str()), Some("bbbb.txt")),
        "{rel}"
    );
    // The long path keeps its file name and nearest directories, and says it was cut.
    let leaf =
        recs.iter().filter(opened).find(|x| x["details"]["path"].as_str().is_some_and(|p| p.ends_with("/leaf.txt")));
    let leaf = leaf.unwrap_or_else(|| panic!("no record of the long path: {recs:#?}"));
    let p = leaf["details"]["path"].as_str().unwrap_or_default();
    assert_eq!(leaf["details"]["path_truncated"], true, "{leaf}");
    assert!(long_file.ends_with(p.trim_start_matches('…')), "{p} is not the end of {long_file}");
    assert!(p.len() > 200, "{p}");
}

#[test]
fn the_fallback_records_every_file_change() {
    if !sandbox_ready("the_fallback_records_every_file_change") {
        return;
    }
    let fx = Fixture::new("changes");
    let m = fx.manifest("");
    let out = fx.path("out");
    let r = sh(
        &m,
        &format!(
            "cd {out} && echo x > f && mv f g && ln g h && ln -s g s && chmod 4755 g && truncate -s 1 g && mkfifo p; mkdir d && rmdir d && rm -f h s p; chown 0 g; echo done"
        ),
    );
    if !bpf_ready("the_fallback_records_every_file_change", &r) {
        return;
    }
    assert!(r.stdout().contains("done"), "{}", r.json);
    let recs = events_of(&m, &r);
    let changes: Vec<&Value> = recs.iter().filter(|x| x["kind"] == "change").collect();
    let find = |op: &str, path: &str| {
        changes
            .iter()
            .find(|x| x["details"]["operation"] == op && x["details"]["path"] == format!("{out}/{path}").as_str())
            .copied()
            .unwrap_or_else(|| panic!("no {op} of {path}: {changes:#?}"))
    };
    // The first open for writing of each file is a change too.
    assert_eq!(find("write", "f")["details"]["path_source"], "kernel");
    let rename = find("rename", "f");
    assert_eq!(rename["details"]["new_path"], format!("{out}/g").as_str(), "{rename}");
    assert_eq!(rename["details"]["result"], 0, "{rename}");
    assert_eq!(find("link", "g")["details"]["new_path"], format!("{out}/h").as_str());
    assert_eq!(find("symlink", "s")["details"]["target"], "g");
    let chmod = find("chmod", "g");
    assert_eq!(
        (chmod["details"]["mode"].as_str(), chmod["details"]["setuid"].as_bool()),
        (Some("4755"), Some(true)),
        "{chmod}"
    );
    assert_eq!(find("truncate", "g")["details"]["length"], 1);
    assert_eq!(find("mknod", "p")["details"]["node"], "fifo");
    find("mkdir", "d");
    find("rmdir", "d");
    for name in ["h", "s", "p"] {
        find("unlink", name);
    }
    // uid 0 is not mapped in the call's user namespace: refused, with the uid asked for.
    let chown = find("chown", "g");
    assert_eq!(chown["details"]["uid"].as_u64(), Some(0), "{chown}");
    assert!(chown["details"]["result"].as_i64().is_some_and(|r| r < 0), "{chown}");
    assert!(changes.iter().all(|x| x["details"]["result"].is_i64()), "every change has its result: {changes:#?}");
}

#[test]
fn a_connect_landlock_refuses_is_a_denied_record() {
    if !sandbox_ready("a_connect_landlock_refuses_is_a_denied_record")
        || !need(
            "a_connect_landlock_refuses_is_a_denied_record",
            "landlock_net",
            kernel_landlock_abi() >= 4,
            "Landlock has no TCP rules before ABI 4",
        )
    {
        return;
    }
    let fx = Fixture::new("landlock-connect");
    let (port, _l) = listener();
    let m = fx.manifest("");
    let r = sh(&m, &connect("127.0.0.1", port));
    if !bpf_ready("a_connect_landlock_refuses_is_a_denied_record", &r) {
        return;
    }
    assert!(r.stderr().contains("connect:"), "{}", r.json);
    let recs = events_of(&m, &r);
    let denied = recs.iter().find(|x| x["kind"] == "connect" && x["verdict"] == "denied");
    let denied = denied.unwrap_or_else(|| panic!("no denied connect: {recs:#?}"));
    let d = &denied["details"];
    assert_eq!((d["by"].as_str(), d["errno"].as_str()), (Some("landlock"), Some("EACCES")), "{denied}");
    assert_eq!(d["address"], format!("127.0.0.1:{port}").as_str(), "{denied}");
}

#[test]
fn memory_the_kernel_refused_to_make_executable_is_recorded() {
    if !sandbox_ready("memory_the_kernel_refused_to_make_executable_is_recorded") {
        return;
    }
    let fx = Fixture::new("wx");
    let (m, helper) = paths_manifest(&fx);
    let r = sh(&m, &format!("{helper} anon-exec"));
    if !bpf_ready("memory_the_kernel_refused_to_make_executable_is_recorded", &r) {
        return;
    }
    let out = r.stdout();
    assert!(!out.contains("mprotect=ok"), "written memory was made executable: {}", r.json);
    // Refused before any hook of agentd's: by the kernel's memory-deny-write-execute
    // (EACCES), or by seccomp's W^X filter (EPERM, where the kernel has no MDWE), which
    // comes before the tracepoints too.
    if out.contains("mprotect=EACCES") {
        let recs = events_of(&m, &r);
        let rec = recs.iter().find(|x| x["kind"] == "exec" && x["details"]["operation"] == "mprotect");
        let rec = rec.unwrap_or_else(|| panic!("no mprotect record: {recs:#?}"));
        assert_eq!(rec["verdict"], "denied", "{rec}");
        assert_eq!(rec["details"]["by"], "kernel", "{rec}");
        assert_eq!(rec["details"]["errno"], "EACCES", "{rec}");
    }
}

#[test]
fn a_blocked_open_is_recorded_when_it_returns_and_when_it_is_killed() {
    if !sandbox_ready("a_blocked_open_is_recorded_when_it_returns_and_when_it_is_killed") {
        return;
    }
    let fx = Fixture::new("late");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 3000");
    let fifo = fx.path("out/fifo");
    // cat's open of the FIFO blocks until the writer comes, a second later: the open is
    // recorded at its end, with the file the kernel opened.
    let r = sh(&m, &format!("mkfifo {fifo} && (sleep 1; echo late > {fifo}) & sleep 0.2; cat {fifo}"));
    if !bpf_ready("a_blocked_open_is_recorded_when_it_returns_and_when_it_is_killed", &r) {
        return;
    }
    assert_eq!(r.stdout(), "late\n", "{}", r.json);
    let recs = events_of(&m, &r);
    let reader =
        |x: &&Value| x["kind"] == "open" && x["details"]["path"] == fifo.as_str() && x["details"]["flags"] == 0;
    let opens: Vec<&Value> = recs.iter().filter(reader).collect();
    assert_eq!(opens.len(), 1, "{recs:#?}");
    assert_eq!(opens[0]["details"]["path_source"], "kernel", "{}", opens[0]);
    assert!(opens[0]["details"]["result"].as_i64().is_some_and(|v| v >= 0), "{}", opens[0]);
    // No writer comes: the call times out and its processes are killed inside the open,
    // which is recorded all the same, with its error, by the name the tool gave.
    let fifo2 = fx.path("out/fifo2");
    let r = sh(&m, &format!("mkfifo {fifo2} && cat {fifo2}"));
    assert_eq!(r.json["timed_out"], true, "{}", r.json);
    let recs = events_of(&m, &r);
    let killed = recs.iter().find(|x| x["kind"] == "open" && x["details"]["path"] == fifo2.as_str());
    let killed = killed.unwrap_or_else(|| panic!("no record of the killed open: {recs:#?}"));
    assert!(killed["details"]["result"].as_i64().is_some_and(|v| v < 0), "{killed}");
}

#[test]
fn the_programs_own_log_streams_when_asked() {
    if !sandbox_ready("the_programs_own_log_streams_when_asked") {
        return;
    }
    let fx = Fixture::new("bpflog");
    let m = fx.manifest("");
    // A first call loads the programs (if nothing had), and says whether there are any.
    let first = sh(&m, "true");
    if !bpf_ready("the_programs_own_log_streams_when_asked", &first) {
        return;
    }
    let mut reader = std::process::Command::new(agentd_tests::agentd_bin())
        .args(["audit", "bpf-log", "--level", "debug"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start agentd audit bpf-log");
    std::thread::sleep(Duration::from_millis(1500));
    let r = sh(&m, "true");
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    std::thread::sleep(Duration::from_millis(300));
    let _ = reader.kill();
    let out = reader.wait_with_output().expect("the reader's output");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("sched_process_exec: call") && text.contains("exec by pid"), "no program log line: {text}");
    // Off by default: a call's own diagnostics carry none of the programs' lines.
    assert!(!r.agentd_stderr.contains("exec by pid"), "{}", r.agentd_stderr);
}

#[test]
fn what_seccomp_refuses_is_recorded_from_the_syscalls_exit() {
    if !sandbox_ready("what_seccomp_refuses_is_recorded_from_the_syscalls_exit") {
        return;
    }
    let fx = Fixture::new("seccomp");
    let m = fx.manifest("");
    // A new user namespace: refused by agentd's seccomp filter, before any hook runs.
    let r = sh(&m, "unshare -U true; echo rc=$?");
    if !bpf_ready("what_seccomp_refuses_is_recorded_from_the_syscalls_exit", &r) {
        return;
    }
    assert!(r.stdout().contains("rc=1"), "unshare -U was not refused: {}", r.json);
    let recs = events_of(&m, &r);
    let rec = recs.iter().find(|x| x["kind"] == "syscall" && x["details"]["syscall"] == "unshare");
    let rec = rec.unwrap_or_else(|| panic!("no record of the refused unshare: {recs:#?}"));
    assert_eq!(rec["verdict"], "denied", "{rec}");
    assert_eq!((rec["details"]["by"].as_str(), rec["details"]["errno"].as_str()), (Some("seccomp"), Some("EPERM")));
}
