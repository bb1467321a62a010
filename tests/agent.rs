//! The agent is the unit: an attacker who controls the model has every tool of the agent, many
//! calls, and neighbours on the host. Each test tries one class of attack across calls or
//! tools, shows it refused (with the exact reason), and has a positive control.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use agentd_tests::{agentd, exec, parse, sandbox_ready, sh, Call, Fixture};

/// The fixture's manifest with the agent renamed.
fn manifest_named(fx: &Fixture, agent: &str, extra: &str) -> std::path::PathBuf {
    let m = fx.manifest(extra);
    let text = fs::read_to_string(&m).expect("manifest").replace("name = \"it\"", &format!("name = \"{agent}\""));
    let renamed = m.with_file_name(format!("{agent}.toml"));
    fs::write(&renamed, text).expect("write manifest");
    renamed
}

/// A refused call: agentd's exit 125, the tool never ran, and the error says `why`.
fn assert_refused(r: &Call, why: &str) {
    assert_eq!(r.exit_code(), 125, "{}", r.json);
    let error = r.json["error"].as_str().unwrap_or_default();
    assert!(error.contains(why), "expected {why:?} in: {error}");
}

#[test]
fn values_that_could_become_options_are_refused() {
    if !sandbox_ready("values_that_could_become_options_are_refused") {
        return;
    }
    let fx = Fixture::new("options");
    fs::write(fx.dir.join("out/keep.txt"), "keep\n").expect("write");
    // A listing tool whose argument is meant to be a directory.
    let m = fx.manifest(&format!(
        "[tools.list]\nargv = [\"/usr/bin/find\", \"{{start}}\"]\n[tools.list.fs]\n\
         read = [\"/usr\", \"/etc/ld.so.cache\"]\nwrite = [\"{out}\"]\nexec = [\"/usr/bin\", \"/usr/lib\"]\n",
        out = fx.path("out")
    ));
    for value in ["-delete", "-fprint", "--help", "-exec"] {
        let r = exec(&m, "list", &[("start", value)], &[]);
        assert_refused(&r, "begins with '-' where the program could read it as an option");
    }
    assert!(fx.dir.join("out/keep.txt").exists(), "the listing tool deleted files");
    // Positive control: a directory is listed.
    let r = exec(&m, "list", &[("start", &fx.path("out"))], &[]);
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    assert!(r.stdout().contains("keep.txt"), "{}", r.json);
    // `policy check` warns where a manifest lets a value start an element as an option.
    let lax = fx.manifest("[tools.sh.args.command]\nallow_leading_dash = true\n");
    let out = agentd(["policy", "check", lax.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: `tools.sh.argv`: {command} starts an argv element"), "{stderr}");
}

#[test]
fn one_tool_cannot_plant_a_program_for_another() {
    if !sandbox_ready("one_tool_cannot_plant_a_program_for_another") {
        return;
    }
    let fx = Fixture::new("plant");
    let out = fx.path("out");
    let m = fx.manifest(&format!(
        "[tools.run]\nargv = [\"{out}/prog\"]\n[tools.run.fs]\nread = [\"/usr\", \"/etc/ld.so.cache\"]\n\
         exec = [\"{out}\", \"/usr/bin\", \"/usr/lib\"]\n[tools.run.net]\nconnect = [\"127.0.0.1:9\"]\n"
    ));
    // The manifest is refused as a whole, with the place to fix.
    let check = agentd(["policy", "check", m.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    let line =
        fs::read_to_string(&m).expect("manifest").lines().position(|l| l.starts_with("exec = [\"/tmp")).map(|i| i + 1);
    assert!(stderr.contains(&format!(":{}:", line.unwrap_or(0))), "located at the exec grant: {stderr}");
    assert!(stderr.contains("`tools.run.fs.exec` path"), "{stderr}");
    assert!(stderr.contains("overlaps `tools.sh.fs.write` path"), "{stderr}");
    // The attack, had it been accepted: plant with one tool, run with the other.
    let plant = exec(&m, "sh", &[("command", &format!("printf '#!/bin/sh\\necho PWNED\\n' > {out}/prog"))], &[]);
    assert_eq!(plant.exit_code(), 125, "{}", plant.json);
    let run = exec(&m, "run", &[], &[]);
    assert_refused(&run, "overlaps");
    assert!(!run.stdout().contains("PWNED"));
    // Positive control: both tools name each other, and the author's intent is accepted.
    let ok = fx.manifest(&format!(
        "[tools.run]\nargv = [\"{out}/prog\"]\n[tools.run.fs]\nread = [\"/usr\", \"/etc/ld.so.cache\"]\n\
         exec = [\"{out}\", \"/usr/bin\", \"/usr/lib\"]\nexec_shared_with = [\"sh\"]\n"
    ));
    let text = fs::read_to_string(&ok).expect("manifest").replace(
        "exec = [\"/usr/bin\", \"/usr/lib\"]\n[tools.sh.env]",
        "exec = [\"/usr/bin\", \"/usr/lib\"]\nexec_shared_with = [\"run\"]\n[tools.sh.env]",
    );
    fs::write(&ok, text).expect("write");
    let check = agentd(["policy", "check", ok.to_str().expect("utf-8")]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn a_tool_cannot_redirect_another_tools_grant_with_a_symlink() {
    if !sandbox_ready("a_tool_cannot_redirect_another_tools_grant_with_a_symlink") {
        return;
    }
    let fx = Fixture::new("redirect");
    let target = fx.dir.join("out/report.txt");
    fs::write(&target, "benign report\n").expect("write");
    let m = fx.manifest(&format!(
        "[tools.show]\nargv = [\"/usr/bin/cat\", \"{t}\"]\n[tools.show.fs]\n\
         read = [\"/usr\", \"/etc/ld.so.cache\", \"{t}\"]\nexec = [\"/usr/bin\", \"/usr/lib\"]\n",
        t = target.display()
    ));
    // Positive control: the report is shown.
    let r = exec(&m, "show", &[], &[]);
    assert_eq!((r.exit_code(), r.stdout().as_str()), (0, "benign report\n"), "{}", r.json);
    // The attack: the writing tool turns the file into a link to a secret of the host.
    let r =
        sh(&m, &format!("rm {t} && ln -s {s} {t} && echo relinked", t = target.display(), s = fx.path("secret/token")));
    assert_eq!(r.stdout(), "relinked\n", "{}", r.json);
    let r = exec(&m, "show", &[], &[]);
    fx.assert_no_leak(&r);
    assert_refused(&r, &format!("goes through the symlink {} inside the writable grant", target.display()));
}

#[test]
fn each_agent_runs_as_its_own_uid() {
    if !sandbox_ready("each_agent_runs_as_its_own_uid") {
        return;
    }
    let fx = Fixture::new("uids");
    let (alpha, beta) = (manifest_named(&fx, "alpha", ""), manifest_named(&fx, "beta", ""));
    let private = fx.path("out/alpha-notes");
    let r = sh(&alpha, &format!("umask 077; echo {} > {private}; id -u", fx.secret));
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    let alpha_uid: u32 = r.stdout().trim().parse().expect("uid");
    let r = sh(&beta, &format!("id -u; cat {private}"));
    fx.assert_no_leak(&r);
    assert!(r.stderr().contains("Permission denied"), "{}", r.json);
    let beta_uid: u32 = r.stdout().trim().parse().expect("uid");
    assert_ne!(alpha_uid, beta_uid);
    for uid in [alpha_uid, beta_uid] {
        assert!(uid != 65534 && uid >= 1_900_000_000, "uid {uid} is not from agentd's range");
    }
    assert_eq!(fs::metadata(&private).expect("written").uid(), alpha_uid);
    assert_eq!(r.json["enforcement"]["identity"]["uid"].as_u64(), Some(u64::from(beta_uid)));
    // Positive control: the agent itself reads its own file.
    assert_eq!(sh(&alpha, &format!("cat {private}")).stdout().trim(), fx.secret);
}

/// Runs the fixture's `sh` tool with an explicit audit log and extra environment for agentd.
fn exec_logged(manifest: &Path, log: &Path, command: &str, env: &[(&str, &str)]) -> Call {
    let out = Command::new(agentd_tests::agentd_bin())
        .envs(env.iter().copied())
        .args(["exec", "--json", "--audit-log"])
        .arg(log)
        .arg("--manifest")
        .arg(manifest)
        .args(["--tool", "sh", "--arg"])
        .arg(format!("command={command}"))
        .output()
        .expect("run agentd");
    parse(out)
}

#[test]
fn the_audit_directory_and_head_file_cannot_be_hijacked() {
    if !sandbox_ready("the_audit_directory_and_head_file_cannot_be_hijacked") {
        return;
    }
    let fx = Fixture::new("audithead");
    let m = fx.manifest("");
    let dir = fx.dir.join("audit");
    fs::create_dir(&dir).expect("mkdir");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod");
    let victim = fx.dir.join("precious");
    fs::write(&victim, "precious\n").expect("write");
    // The attack: a link where agentd writes its temporary head file.
    symlink(&victim, dir.join("audit.jsonl.head.tmp")).expect("symlink");
    let log = dir.join("audit.jsonl");
    let r = exec_logged(&m, &log, "echo ran", &[]);
    assert_eq!((r.exit_code(), r.stdout().as_str()), (0, "ran\n"), "{}", r.json);
    assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious\n", "agentd wrote through the link");
    assert!(fs::symlink_metadata(dir.join("audit.jsonl.head")).expect("head").is_file());
    // A directory others may write is refused before anything runs.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
    let r = exec_logged(&m, &log, "echo should-not-run", &[]);
    assert_ne!(r.exit_code(), 0, "{}", r.json);
    assert!(!r.stdout().contains("should-not-run"));
    let shown = format!("{} {}", r.json, r.agentd_stderr);
    assert!(shown.contains("has mode 777: group or others may write it"), "{shown}");
}

#[test]
fn a_grant_inside_a_kernel_filesystem_is_refused() {
    if !sandbox_ready("a_grant_inside_a_kernel_filesystem_is_refused") {
        return;
    }
    let fx = Fixture::new("procabove");
    let proc_dir = fx.dir.join("chroot/proc");
    fs::create_dir_all(&proc_dir).expect("mkdir");
    let mounted = Command::new("mount").args(["-t", "proc", "proc"]).arg(&proc_dir).status().expect("mount");
    assert!(mounted.success());
    let grant = proc_dir.join("1");
    let m = fx.manifest(&format!(
        "[tools.peek]\nargv = [\"/usr/bin/cat\", \"{g}/cmdline\"]\n[tools.peek.fs]\n\
         read = [\"/usr\", \"/etc/ld.so.cache\", \"{g}\"]\nexec = [\"/usr/bin\", \"/usr/lib\"]\n",
        g = grant.display()
    ));
    let r = exec(&m, "peek", &[], &[]);
    let _ = Command::new("umount").arg(&proc_dir).status();
    assert_refused(&r, &format!("{} (proc) holds it and would expose host kernel state", proc_dir.display()));
    assert_eq!(r.stdout(), "");
}

/// Maps anonymous memory writable and executable, then makes written memory executable.
const WX: &str =
    "perl -e '$r = syscall(9, 0, 4096, 7, 0x22, -1, 0); print $r == -1 ? \"wx denied: $!\\n\" : \"wx mapped\\n\"; \
                  $m = syscall(9, 0, 4096, 3, 0x22, -1, 0); $p = syscall(10, $m, 4096, 5); \
                  print $p == -1 ? \"exec gain denied: $!\\n\" : \"exec gain allowed\\n\"'";

#[test]
fn written_memory_never_becomes_executable_unless_the_tool_allows_jit() {
    if !sandbox_ready("written_memory_never_becomes_executable_unless_the_tool_allows_jit") {
        return;
    }
    let fx = Fixture::new("mdwe");
    let m = fx.manifest("");
    let r = sh(&m, WX);
    assert_eq!(r.stdout(), "wx denied: Permission denied\nexec gain denied: Permission denied\n", "{}", r.json);
    assert_eq!(r.json["enforcement"]["write_execute"], "prctl", "{}", r.json);
    // Where the kernel has no PR_SET_MDWE, seccomp refuses the same (set for this agentd
    // only: the tests of this binary run in parallel).
    let r = exec_logged(&m, &agentd_tests::audit_log_for(&m), WX, &[("AGENTD_NO_MDWE", "1")]);
    assert_eq!(
        r.stdout(),
        "wx denied: Operation not permitted\nexec gain denied: Operation not permitted\n",
        "{}",
        r.json
    );
    assert_eq!(r.json["enforcement"]["write_execute"], "seccomp", "{}", r.json);
    // Positive control: a JIT tool opts in.
    let jit = fx.manifest("").to_string_lossy().into_owned();
    let text = fs::read_to_string(&jit).expect("manifest").replace("[tools.sh.fs]", "allow_jit = true\n[tools.sh.fs]");
    fs::write(&jit, text).expect("write");
    let r = sh(Path::new(&jit), WX);
    assert_eq!(r.stdout(), "wx mapped\nexec gain allowed\n", "{}", r.json);
    assert_eq!(r.json["enforcement"]["write_execute"], "allowed", "{}", r.json);
}

#[test]
fn files_a_tool_writes_are_bounded() {
    if !sandbox_ready("files_a_tool_writes_are_bounded") {
        return;
    }
    let fx = Fixture::new("fsize");
    let r = sh(&fx.manifest(""), "grep 'Max file size' /proc/self/limits");
    assert!(r.stdout().split_whitespace().filter(|w| *w == "1073741824").count() == 2, "default 1 GiB: {}", r.json);
    let m = fx.manifest("[tools.sh.limits]\nfile_mb = 1\n");
    let big = fx.path("out/big");
    let r = sh(&m, &format!("head -c 3000000 /dev/zero > {big}; echo rc=$?"));
    assert_eq!(r.stdout(), "rc=1\n", "{}", r.json);
    assert!(r.stderr().contains("File too large"), "{}", r.json);
    assert_eq!(fs::metadata(&big).expect("written").len(), 1 << 20);
    // Positive control: a file under the bound is written whole.
    let r = sh(&m, &format!("head -c 1000 /dev/zero > {big}; echo rc=$?"));
    assert_eq!(r.stdout(), "rc=0\n", "{}", r.json);
    assert_eq!(fs::metadata(&big).expect("written").len(), 1000);
}

/// A host Unix socket server at `path` (mode 0666) that answers each connection with `banner`
/// and records the peer's uid, until `stop` is set.
fn unix_server(
    path: &Path,
    banner: &'static str,
) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<Vec<u32>>) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind host socket");
    fs::set_permissions(path, fs::Permissions::from_mode(0o666)).expect("chmod socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut peers = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
                    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
                    // SAFETY: cred and len are valid out pointers of the sizes given.
                    let r = unsafe {
                        libc::getsockopt(
                            s.as_raw_fd(),
                            libc::SOL_SOCKET,
                            libc::SO_PEERCRED,
                            std::ptr::addr_of_mut!(cred).cast(),
                            &mut len,
                        )
                    };
                    peers.push(if r == 0 { cred.uid } else { u32::MAX });
                    let _ = s.write_all(banner.as_bytes());
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        peers
    });
    (stop, handle)
}

/// Connects to the Unix socket `path` (as the tool names it) and prints what it says, or why not.
fn perl_unix(path: &str) -> String {
    format!(
        "perl -MSocket -e 'socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die \"socket: $!\\n\"; \
         connect($s, pack_sockaddr_un(\"{path}\")) or die \"connect {path}: $!\\n\"; print scalar <$s>'"
    )
}

#[test]
fn host_unix_sockets_are_unreachable_unless_granted() {
    if !sandbox_ready("host_unix_sockets_are_unreachable_unless_granted") {
        return;
    }
    let fx = Fixture::new("unixsock");
    let run = fx.dir.join("run");
    fs::create_dir(&run).expect("mkdir run");
    // A host daemon's socket in a directory the tool may read: the container runtime's, say.
    let (stop_host, host) = unix_server(&run.join("daemon.sock"), "HOST-DAEMON-ANSWER\n");
    let (stop_app, app) = unix_server(&run.join("app.sock"), "APP-OK\n");
    let daemon = run.join("daemon.sock").display().to_string();
    let app_path = run.join("app.sock").display().to_string();
    let out = fx.path("out");
    let base = fx.manifest("");
    let text = fs::read_to_string(&base).expect("manifest");
    let with_run = |net: &str| {
        let t = text.replace(
            "read = [\"/usr\", \"/etc/ld.so.cache\", ",
            &format!("read = [\"/usr\", \"/etc/ld.so.cache\", \"{}\", ", run.display()),
        );
        let p = fx.dir.join(format!("{}.toml", agentd_tests::token("unix")));
        fs::write(&p, format!("{t}{net}")).expect("write manifest");
        p
    };
    let m = with_run("");
    // Every way to name the daemon's socket: directly, relative to the working directory,
    // through links in /tmp and in the write grant, through /proc.
    let attempts = [
        perl_unix(&daemon),
        format!("cd {} && {}", run.display(), perl_unix("daemon.sock")),
        format!("ln -s {daemon} /tmp/l && {}", perl_unix("/tmp/l")),
        format!("ln -s {} /tmp/d && {}", run.display(), perl_unix("/tmp/d/daemon.sock")),
        format!("ln -s {daemon} {out}/l && {}", perl_unix(&format!("{out}/l"))),
        perl_unix(&format!("/proc/self/root{daemon}")),
        perl_unix(&app_path),
    ];
    for cmd in &attempts {
        let r = sh(&m, cmd);
        assert!(!r.stdout().contains("HOST-DAEMON-ANSWER") && !r.stdout().contains("APP-OK"), "{cmd}: {}", r.json);
        assert!(r.stderr().contains("Permission denied"), "{cmd}: expected EACCES: {}", r.json);
        let _ = fs::remove_file(fx.dir.join("out/l"));
        // Each refusal is in the audit log, with the path as the tool named it.
        let call_id = r.json["call_id"].as_str().unwrap_or_default().to_string();
        let log = fs::read_to_string(agentd_tests::audit_log_for(&m)).unwrap_or_default();
        let refused = log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|rec| {
            rec["call_id"] == call_id.as_str()
                && rec["kind"] == "unix_connect"
                && rec["verdict"] == "denied"
                && rec["details"]["hook"] == "gate"
        });
        assert!(refused, "{cmd}: no unix_connect record of the refusal in the audit log");
    }
    // Datagram sockets, whose every send may name a destination, are refused at creation;
    // so are raw ones, which the kernel makes datagram ones.
    for ty in ["SOCK_DGRAM", "SOCK_RAW"] {
        for call in [format!("socket(my $s, PF_UNIX, {ty}, 0)"), format!("socketpair(my $a, my $b, AF_UNIX, {ty}, 0)")]
        {
            let r = sh(&m, &format!("perl -MSocket -e '{call} or die \"refused: $!\\n\"'"));
            assert!(r.stderr().contains("refused: Operation not permitted"), "{call}: {}", r.json);
        }
    }
    // Positive controls: socketpair, and a socket the call makes in its own /tmp.
    let r = sh(
        &m,
        "perl -MSocket -e 'socketpair(my $a, my $b, AF_UNIX, SOCK_STREAM, 0) or die; print $a \"pair-ok\\n\"; \
         close $a; print scalar <$b>'",
    );
    assert_eq!(r.stdout(), "pair-ok\n", "{}", r.json);
    let own = "perl -MSocket -e 'socket(my $l, PF_UNIX, SOCK_STREAM, 0) or die; \
               bind($l, pack_sockaddr_un(\"/tmp/own.sock\")) or die \"bind: $!\\n\"; listen($l, 5); \
               if (fork() == 0) { socket(my $c, PF_UNIX, SOCK_STREAM, 0); \
               connect($c, pack_sockaddr_un(\"/tmp/own.sock\")) or die \"own: $!\\n\"; print $c \"own-ok\\n\"; exit 0 } \
               accept(my $a, $l); print scalar <$a>'";
    assert_eq!(sh(&m, own).stdout(), "own-ok\n");
    // From a thread other than the main one, too.
    let threaded = format!(
        "python3 -c 'import socket, threading\n\
         def go():\n    s = socket.socket(socket.AF_UNIX); s.connect(\"{app_path}\"); print(\"thread\", s.recv(9))\n\
         t = threading.Thread(target=go); t.start(); t.join()'"
    );
    let granted_early = with_run(&format!("[tools.sh.net]\nunix = [\"{app_path}\"]\n"));
    let r = sh(&granted_early, &threaded);
    assert_eq!(r.stdout(), "thread b'APP-OK\\n'\n", "{}", r.json);
    // A connect that blocks (a listener whose backlog is full) holds up neither the tool's
    // exit nor its other connects.
    let blocked = "python3 -c 'import socket, os, threading, time\n\
                   l = socket.socket(socket.AF_UNIX); l.bind(\"/tmp/full.sock\"); l.listen(0)\n\
                   fill = []\n\
                   for i in range(4):\n    c = socket.socket(socket.AF_UNIX); c.setblocking(False)\n    \
                   try: c.connect(\"/tmp/full.sock\"); fill.append(c)\n    except OSError: break\n\
                   def stuck():\n    s = socket.socket(socket.AF_UNIX); s.connect(\"/tmp/full.sock\")\n\
                   threading.Thread(target=stuck, daemon=True).start(); time.sleep(0.3)\n\
                   k = socket.socket(socket.AF_UNIX); k.bind(\"/tmp/ok.sock\"); k.listen(1)\n\
                   c = socket.socket(socket.AF_UNIX); c.connect(\"/tmp/ok.sock\")\n\
                   print(\"still serving\", flush=True); os._exit(0)'";
    let started = std::time::Instant::now();
    let r = sh(&m, blocked);
    assert_eq!((r.exit_code(), r.stdout().as_str()), (0, "still serving\n"), "{}", r.json);
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "the call waited {:?}", started.elapsed());
    // A grant names the one socket the tool may reach, and the server sees the agent's uid.
    let granted = with_run(&format!("[tools.sh.net]\nunix = [\"{app_path}\"]\n"));
    let r = sh(&granted, &perl_unix(&app_path));
    assert_eq!(r.stdout(), "APP-OK\n", "{}", r.json);
    let agent_uid = r.json["enforcement"]["identity"]["uid"].as_u64().expect("uid");
    let r = sh(&granted, &perl_unix(&daemon));
    assert!(r.stderr().contains("Permission denied"), "{}", r.json);
    // policy check names the sockets a grant holds.
    let check = agentd(["policy", "check", m.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(stderr.contains("holds Unix sockets") && stderr.contains(&daemon), "{stderr}");
    stop_host.store(true, std::sync::atomic::Ordering::Relaxed);
    stop_app.store(true, std::sync::atomic::Ordering::Relaxed);
    let host_peers = host.join().expect("host server");
    let app_peers = app.join().expect("app server");
    assert!(host_peers.is_empty(), "the host daemon accepted connections from {host_peers:?}");
    // The threaded connect and the granted one, both as the agent's uid.
    assert_eq!(app_peers, vec![u32::try_from(agent_uid).expect("u32"); 2]);
}
