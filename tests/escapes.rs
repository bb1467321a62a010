//! The escape battery: each attack must be blocked, and the test shows that nothing leaked.
//! Runs the real `agentd` binary as root.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixListener};
use std::process::Command;
use std::time::Duration;

use agentd_tests::{sandbox_ready, sh, Fixture};

#[test]
fn reads_outside_the_manifest_fail_and_leak_nothing() {
    if !sandbox_ready("reads_outside_the_manifest_fail_and_leak_nothing") {
        return;
    }
    let fx = Fixture::new("read");
    // A file in a granted directory that only root's group may read: supplementary groups of
    // agentd must not carry into the call.
    let group_only = fx.dir.join("data/group-only");
    fs::write(&group_only, &fx.secret).expect("write");
    fs::set_permissions(&group_only, fs::Permissions::from_mode(0o640)).expect("chmod");
    let m = fx.manifest("");
    // Each attempt alone, so that one missing file cannot make the others look blocked.
    let attempts = [
        format!("cat {}", fx.path("secret/token")),
        format!("cat {}", fx.path("data/group-only")),
        format!("ls -la {}", fx.path("secret")),
        "cat /etc/shadow".to_string(),
        "cat /etc/passwd".to_string(),
        "ls -la /root".to_string(),
        "cat /proc/1/environ".to_string(),
        format!("cat /proc/1/root{}", fx.path("secret/token")),
    ];
    for cmd in &attempts {
        let r = sh(&m, cmd);
        fx.assert_no_leak(&r);
        assert_ne!(r.exit_code(), 0, "{cmd} should have failed: {}", r.json);
        assert_eq!(r.stdout(), "", "{cmd} printed something: {}", r.json);
    }
    // The fixture's own directory shows only what was granted in it.
    let r = sh(&m, &format!("ls {}", fx.path("")));
    assert_eq!(r.stdout(), "data\nout\n", "{}", r.json);
    // Positive control: the granted file is readable.
    let r = sh(&m, &format!("cat {}", fx.path("data/file.txt")));
    assert_eq!((r.exit_code(), r.stdout().as_str()), (0, "public data\n"), "{}", r.json);
}

#[test]
fn writes_to_readonly_or_unlisted_paths_fail() {
    if !sandbox_ready("writes_to_readonly_or_unlisted_paths_fail") {
        return;
    }
    let fx = Fixture::new("write");
    let m = fx.manifest("");
    for target in [fx.path("data/file.txt"), fx.path("data/new"), fx.path("secret/token"), "/usr/bin/planted".into()] {
        let r = sh(&m, &format!("echo pwned > {target}"));
        assert_ne!(r.exit_code(), 0, "writing {target} should fail: {}", r.json);
    }
    assert_eq!(fs::read_to_string(fx.dir.join("data/file.txt")).ok().as_deref(), Some("public data\n"));
    assert!(!fx.dir.join("data/new").exists());
    assert_eq!(fs::read_to_string(fx.dir.join("secret/token")).ok(), Some(fx.secret.clone()));
    assert!(!std::path::Path::new("/usr/bin/planted").exists());
    // Writing next to the granted directories lands in the call's private /tmp, never on the host.
    // (The call may well succeed: it writes into its own private /tmp.)
    sh(&m, &format!("echo pwned > {} ; rm -rf {}", fx.path("unlisted"), fx.path("secret")));
    assert!(!fx.dir.join("unlisted").exists(), "an unlisted host path was created");
    assert!(fx.dir.join("secret/token").exists(), "an unlisted host path was removed");
    // Positive control: the writable grant works.
    let r = sh(&m, &format!("echo ok > {}", fx.path("out/written")));
    assert_eq!(r.exit_code(), 0, "{}", r.json);
    assert_eq!(fs::read_to_string(fx.dir.join("out/written")).ok().as_deref(), Some("ok\n"));
}

#[test]
fn symlink_and_hardlink_escapes_fail() {
    if !sandbox_ready("symlink_and_hardlink_escapes_fail") {
        return;
    }
    let fx = Fixture::new("links");
    symlink(fx.dir.join("secret/token"), fx.dir.join("out/abs-link")).expect("symlink");
    symlink("../secret/token", fx.dir.join("out/rel-link")).expect("symlink");
    let m = fx.manifest("");
    let data = fx.path("data/file.txt");
    let out = fx.path("out");
    let attempts = [
        format!("cat {out}/abs-link"),
        format!("cat {out}/rel-link"),
        format!("ln {} {out}/hard", fx.path("secret/token")),
        format!("ln {data} {out}/hard-data && echo pwned >> {out}/hard-data"),
        format!("ln -s {data} {out}/sym-data && echo pwned >> {out}/sym-data"),
        format!("mv {data} {out}/moved"),
    ];
    for cmd in &attempts {
        let r = sh(&m, cmd);
        fx.assert_no_leak(&r);
        assert_ne!(r.exit_code(), 0, "{cmd} should have failed: {}", r.json);
    }
    assert_eq!(fs::read_to_string(fx.dir.join("data/file.txt")).ok().as_deref(), Some("public data\n"));
    assert!(!fx.dir.join("out/hard").exists(), "a hard link to the secret was made");
    // Positive control: links inside the writable grant work, and a symlink to granted data
    // reads it.
    let r = sh(&m, &format!("ln -s {data} {out}/ok-link && cat {out}/ok-link && echo x > {out}/f && ln {out}/f {out}/f2 && cat {out}/f2"));
    assert_eq!((r.exit_code(), r.stdout().as_str()), (0, "public data\nx\n"), "{}", r.json);
    // (`mv` may leave a copy of the readable file in out/: copying readable data is allowed;
    // the original must stay where it is.)
}

#[test]
fn binaries_placed_in_writable_places_do_not_run() {
    if !sandbox_ready("binaries_placed_in_writable_places_do_not_run") {
        return;
    }
    let fx = Fixture::new("exec");
    // A binary that is readable but outside fs.exec, planted by someone else.
    fs::copy("/usr/bin/echo", fx.dir.join("data/echo")).expect("copy");
    fs::write(
        fx.dir.join("data/memfd.pl"),
        "open(my $s,'<','/usr/bin/echo') or die; binmode $s; local $/; my $b=<$s>;\n\
         my $nm='x'; my $fd=syscall(319,$nm,0); die \"memfd_create: $!\" if $fd<0;\n\
         open(my $m,'>&=',$fd) or die; binmode $m; print $m $b; $m->flush;\n\
         exec {\"/proc/self/fd/$fd\"} 'echo','RAN-memfd' or die \"exec memfd: $!\";\n",
    )
    .expect("write script");
    let m = fx.manifest("");
    let out = fx.path("out");
    // (command, evidence in stderr that the block, not something else, stopped it)
    let attempts = [
        (format!("cp /usr/bin/echo {out}/e && chmod +x {out}/e && {out}/e RAN-out"), "Permission denied"),
        ("cp /usr/bin/echo /tmp/e && chmod +x /tmp/e && /tmp/e RAN-tmp".to_string(), "Permission denied"),
        (format!("{} RAN-data", fx.path("data/echo")), "Permission denied"),
        (format!("/lib64/ld-linux-x86-64.so.2 {} RAN-ldso || exit 1", fx.path("data/echo")), "failed to map segment"),
        (
            format!("cp /usr/bin/echo {out}/e2 && /lib64/ld-linux-x86-64.so.2 {out}/e2 RAN-ldso-out || exit 1"),
            "failed to map segment",
        ),
    ];
    let mut attempts = attempts.to_vec();
    // Linux 6.3+: the memfd is made non-executable (vm.memfd_noexec); before: seccomp refuses
    // to create it.
    let evidence = if std::path::Path::new("/proc/sys/vm/memfd_noexec").exists() {
        "exec memfd: Permission denied"
    } else {
        "memfd_create: Operation not permitted"
    };
    attempts.push((format!("perl {}", fx.path("data/memfd.pl")), evidence));
    for (cmd, evidence) in &attempts {
        let r = sh(&m, cmd);
        assert!(!r.stdout().contains("RAN-"), "{cmd} ran a binary outside fs.exec: {}", r.json);
        assert_ne!(r.exit_code(), 0, "{cmd}: {}", r.json);
        assert!(r.stderr().contains(evidence), "{cmd}: expected {evidence:?} in stderr: {}", r.json);
    }
    // Positive control.
    let r = sh(&m, "echo RAN-usr");
    assert_eq!(r.stdout(), "RAN-usr\n", "{}", r.json);
}

fn listener_with_banner(banner: &str) -> (u16, std::thread::JoinHandle<bool>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    l.set_nonblocking(true).expect("nonblocking");
    let banner = banner.to_string();
    let h = std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(banner.as_bytes());
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    (port, h)
}

fn perl_connect(port: u16) -> String {
    format!("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(PeerAddr=>\"127.0.0.1:{port}\",Timeout=>3) or die \"connect: $!\\n\"; print <$s>'")
}

#[test]
fn network_is_denied_unless_granted_and_only_granted_ports() {
    if !sandbox_ready("network_is_denied_unless_granted_and_only_granted_ports") {
        return;
    }
    let fx = Fixture::new("net");
    let (denied_port, denied) = listener_with_banner(&fx.secret);
    let (granted_port, granted) = listener_with_banner("BANNER-granted");

    // No network granted: nothing reachable, whether the call's namespace is made at spawn
    // or prepared beforehand (as a long-running supervisor does).
    let m = fx.manifest("");
    for prepared in [false, true] {
        let flags: &[&str] = if prepared { &["--prepared-netns"] } else { &[] };
        let command = format!("{}; cat /proc/net/dev", perl_connect(granted_port));
        let r = agentd_tests::exec_with(&m, "sh", &[("command", &command)], flags);
        fx.assert_no_leak(&r);
        assert!(!r.stdout().contains("BANNER"), "prepared={prepared}: reached the host without a grant: {}", r.json);
        assert!(r.stderr().contains("connect: Permission denied"), "prepared={prepared}: {}", r.json);
        let devices: Vec<String> = r
            .stdout()
            .lines()
            .skip_while(|l| !l.contains("Inter-"))
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|d| d.trim().to_string()))
            .collect();
        assert_eq!(devices, ["lo"], "prepared={prepared}: the call must see only loopback: {}", r.json);
    }

    // A granted network is served by agentd into the call's own namespace, on any kernel:
    // no Landlock network rules are needed (where the kernel has them, they are a second
    // check, as are agentd's BPF programs; so a refusal may come from any of the three).
    let exact = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"127.0.0.1:{granted_port}\"]"));
    let refused = |r: &agentd_tests::Call, what: &str| {
        fx.assert_no_leak(r);
        let e = r.stderr();
        let said = ["Permission denied", "Operation not permitted", "Connection refused", "Connection reset"];
        assert!(said.iter().any(|s| e.contains(s)), "{what}: not refused: {}", r.json);
    };
    let perl6 = |addr: &str, port: u16| {
        format!("perl -MSocket=:all -e 'socket(my $s, PF_INET6, SOCK_STREAM, 0) or die; connect($s, pack_sockaddr_in6({port}, inet_pton(AF_INET6, \"{addr}\"))) or die \"connect6: $!\\n\"; defined(recv($s, my $b, 64, 0)) or die \"recv: $!\\n\"; print $b'")
    };
    for (cmd, what) in [
        (perl_connect(denied_port), "another port of the granted address"),
        (perl6("::1", denied_port), "another port over IPv6"),
        (perl6("::ffff:127.0.0.1", denied_port), "another port, IPv4-mapped"),
        (perl6("::ffff:127.0.0.2", granted_port), "the granted port at another address, IPv4-mapped"),
        (perl6("::1", granted_port), "the granted port over IPv6 loopback"),
    ] {
        let r = sh(&exact, &cmd);
        assert_eq!(r.json["enforcement"]["network"], "forwarded", "{}", r.json);
        let served = r.json["enforcement"]["forwarded"].to_string();
        let grant = format!("connect 127.0.0.1:{granted_port}");
        assert!(served.contains(&grant) && served.contains("dns 127.0.0.1:53"), "{}", r.json);
        assert!(!r.stdout().contains("BANNER"), "{what}: reached a listener: {}", r.json);
        refused(&r, what);
    }
    // TCP Fast Open would connect without the connect hook Landlock relies on.
    for (cmd, evidence) in [
        (format!("perl -MSocket -e 'socket(my $s, PF_INET, SOCK_STREAM, 0) or die; send($s, \"x\", 0x20000000, pack_sockaddr_in({denied_port}, inet_aton(\"127.0.0.1\"))) or die \"fastopen: $!\\n\"; print <$s>'"), "fastopen: Operation not permitted"),
        ("perl -MSocket -e 'socket(my $s, PF_INET, SOCK_STREAM, 0) or die; setsockopt($s, 6, 30, 1) or die \"tfo: $!\\n\"'".to_string(), "tfo: Operation not permitted"),
    ] {
        let r = sh(&exact, &cmd);
        assert!(r.stderr().contains(evidence), "{cmd}: expected {evidence:?}: {}", r.json);
    }
    // The call's namespace is its own: only loopback, and none of the host's sockets (the
    // host's listener is not in its tables; agentd's listener on the granted port is).
    let r = sh(&exact, "cat /proc/self/net/dev; echo ---; cat /proc/self/net/tcp /proc/self/net/tcp6");
    let out = r.stdout();
    let (devs, tcp) = out.split_once("---").unwrap_or_default();
    let names: Vec<&str> = devs.lines().filter_map(|l| l.split_once(':')).map(|(n, _)| n.trim()).collect();
    assert_eq!(names, ["lo"], "{}", r.json);
    let local_port = |port: u16| format!(":{port:04X} ");
    assert!(!tcp.contains(&local_port(denied_port)), "the host's listener shows in the call's tables: {tcp}");
    assert!(tcp.contains(&local_port(granted_port)), "agentd's listener is missing: {tcp}");
    // UDP works only inside: a datagram to the host's socket goes nowhere.
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let udp_port = udp.local_addr().expect("addr").port();
    let _ = sh(
        &exact,
        &format!("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(PeerAddr=>\"127.0.0.1:{udp_port}\",Proto=>\"udp\") or die \"udp: $!\\n\"; $s->send(\"UDP-LEAK\") or die'"),
    );
    let mut buf = [0u8; 64];
    assert!(udp.recv(&mut buf).is_err(), "a UDP datagram reached the host");
    // `*:PORT` is any public address: loopback, as every special range, needs a grant that
    // names it. The refusal is recorded.
    let any = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"*:{granted_port}\"]"));
    let r = sh(&any, &perl_connect(granted_port));
    assert!(!r.stdout().contains("BANNER"), "`*:PORT` reached loopback: {}", r.json);
    let log = fs::read_to_string(agentd_tests::audit_log_for(&any)).unwrap_or_default();
    let said = log.lines().any(|l| l.contains("\"denied\"") && l.contains("covers public addresses only"));
    assert!(said, "no record of the refusal: {log}");
    // Positive control: the granted pair works, and its IPv4-mapped spelling is the same
    // destination.
    let r = sh(&exact, &perl_connect(granted_port));
    assert_eq!(r.stdout(), "BANNER-granted", "the granted port must work: {}", r.json);
    assert!(granted.join().unwrap_or(false));
    let (mapped_port, mapped) = listener_with_banner("BANNER-mapped");
    let m = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"127.0.0.1:{mapped_port}\"]"));
    let r = sh(&m, &perl6("::ffff:127.0.0.1", mapped_port));
    assert_eq!(r.stdout(), "BANNER-mapped", "{}", r.json);
    assert!(mapped.join().unwrap_or(false));
    drop(denied);
}

#[test]
fn seccomp_refuses_what_landlock_and_namespaces_do_not_see() {
    if !sandbox_ready("seccomp_refuses_what_landlock_and_namespaces_do_not_see") {
        return;
    }
    let fx = Fixture::new("seccomp");
    let m = fx.manifest("");
    // Each probe prints "<name>: <errno text>" when the syscall fails.
    let probes = [
        ("clone3", "syscall(435, 0, 0)", "Function not implemented"),
        ("unshare-user", "syscall(272, 0x10000000)", "Operation not permitted"),
        ("clone-user", "syscall(56, 0x10000000 | 17, 0, 0, 0, 0)", "Operation not permitted"),
        ("io_uring", "syscall(425, 8, 0)", "Operation not permitted"),
        ("keyctl", "syscall(250, 0, 0)", "Operation not permitted"),
        ("bpf", "syscall(321, 0, 0, 0)", "Operation not permitted"),
        ("perf", "syscall(298, 0, 0, -1, -1, 0)", "Operation not permitted"),
        ("userfaultfd", "syscall(323, 0)", "Operation not permitted"),
        ("netlink", "socket(my $s, 16, 3, 0)", "Operation not permitted"),
        ("packet", "socket(my $s, 17, 3, 0)", "Operation not permitted"),
        ("raw", "socket(my $s, 2, 3, 1)", "Operation not permitted"),
        ("icmp", "socket(my $s, 2, 2, 1)", "Operation not permitted"),
        ("sctp", "socket(my $s, 2, 1, 132)", "Operation not permitted"),
    ];
    for (name, call, errno) in probes {
        let perl = if call.starts_with("socket") {
            format!("perl -e '{call} or die \"{name}: $!\\n\"'")
        } else {
            format!("perl -e '{call} == -1 and die \"{name}: $!\\n\"'")
        };
        let r = sh(&m, &perl);
        let want = format!("{name}: {errno}");
        assert!(r.stderr().contains(&want), "{name}: expected {want:?}: {}", r.json);
    }
    // An x32 syscall number kills the process (SIGSYS), whatever the kernel would have said.
    let r = agentd_tests::exec(&m, "sh", &[], &["perl", "-e", "syscall(0x40000027)"]);
    assert_eq!((r.json["signal"].as_i64(), r.code), (Some(31), 159), "{}", r.json);
    // Positive control: a TCP socket is fine.
    let r = sh(&m, "perl -e 'socket(my $s, 2, 1, 0) or die \"tcp: $!\\n\"; print \"ok\\n\"'");
    assert_eq!(r.stdout(), "ok\n", "{}", r.json);
}

#[test]
fn host_processes_are_invisible_and_cannot_be_signalled() {
    if !sandbox_ready("host_processes_are_invisible_and_cannot_be_signalled") {
        return;
    }
    let fx = Fixture::new("procs");
    let mut victim = Command::new("sleep").arg("600").spawn().expect("spawn victim");
    let pid = victim.id();
    let m = fx.manifest("");
    let r = sh(&m, &format!("ls /proc; kill -9 {pid}; kill -9 -1; kill -0 {pid} && echo VISIBLE"));
    assert!(!r.stdout().contains("VISIBLE"), "{}", r.json);
    let listed: Vec<u32> = r.stdout().lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert!(listed.contains(&1) && listed.contains(&2), "the call's own init and tool must be listed: {listed:?}");
    assert!(!listed.contains(&pid) && !listed.contains(&std::process::id()), "host pids visible: {listed:?}");
    assert!(listed.len() < 10, "more processes than the call's own: {listed:?}");
    assert!(victim.try_wait().expect("wait").is_none(), "the host process was killed from the sandbox");
    let _ = victim.kill();
    let _ = victim.wait();
}

#[test]
fn supervisor_environment_and_fds_do_not_leak() {
    if !sandbox_ready("supervisor_environment_and_fds_do_not_leak") {
        return;
    }
    let fx = Fixture::new("env");
    // The base manifest passes nothing from agentd's environment and sets only PATH.
    let m = fx.manifest("");
    let bin = agentd_tests::agentd_bin();
    // Both ways agentd starts calls: every namespace made at spawn, or the network namespace
    // prepared beforehand (agentd then holds more fds of its own).
    for flags in ["", "--prepared-netns"] {
        // The tool lists its fds with a shell glob: no helper process adds an fd of its own.
        let script = format!(
            "exec 7<{secret_file}; exec {bin} exec --json {flags} --audit-log {log} --manifest {m} --tool sh --arg command='env; echo FDS /proc/self/fd/*; cat <&7; cat /proc/1/environ; cat /proc/self/fd/7'",
            log = agentd_tests::audit_log_for(&m).display(),
            secret_file = fx.path("secret/token"),
            bin = bin.display(),
            m = m.display()
        );
        let out =
            Command::new("/bin/sh").arg("-c").arg(&script).env("AGENTD_IT_SECRET", &fx.secret).output().expect("run");
        let r = agentd_tests::parse(out);
        fx.assert_no_leak(&r);
        let stdout = r.stdout();
        let names: Vec<&str> =
            stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, _)| k).filter(|k| !k.contains(' ')).collect();
        assert!(names.contains(&"PATH"), "{}", r.json);
        for name in names {
            assert!(["PATH", "PWD", "SHLVL", "_"].contains(&name), "{name} reached the call's environment: {}", r.json);
        }
        let fds: Vec<u32> = stdout
            .lines()
            .find_map(|l| l.strip_prefix("FDS "))
            .map(|l| l.split(' ').filter_map(|p| p.rsplit('/').next()?.parse().ok()).collect())
            .unwrap_or_default();
        // 0-2, plus the one the glob itself has open on /proc/self/fd.
        assert!(fds.len() <= 4 && fds.iter().filter(|f| **f > 2).count() <= 1, "{flags}: inherited fds {fds:?}");
        assert!(fds.starts_with(&[0, 1, 2]), "{flags}: fds {fds:?}");
    }
}

#[test]
fn no_privileges_and_no_mounts() {
    if !sandbox_ready("no_privileges_and_no_mounts") {
        return;
    }
    let fx = Fixture::new("privs");
    let m = fx.manifest("");
    let r = sh(&m, "grep -E '^(NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status");
    let status = r.stdout();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let caps: Vec<&str> = status.lines().filter(|l| l.starts_with("Cap")).collect();
    assert_eq!(caps.len(), 5, "{status}");
    for line in caps {
        assert!(line.ends_with("0000000000000000"), "capabilities left: {line}");
    }
    let mounts_before = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().count();
    for cmd in [
        "mount -t tmpfs none /tmp",
        "mount --bind /usr /tmp",
        "umount /usr",
        "unshare -r true",
        "unshare -rm mount -t tmpfs none /tmp",
        "perl -e 'syscall(165, \"none\", \"/tmp\", \"tmpfs\", 0, 0) == 0 or die \"mount: $!\\n\"'",
    ] {
        let r = sh(&m, cmd);
        assert_ne!(r.exit_code(), 0, "{cmd} should fail: {}", r.json);
    }
    let mounts_after = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().count();
    assert_eq!(mounts_before, mounts_after, "the host's mount table changed");
}

#[test]
fn host_abstract_unix_sockets_are_unreachable() {
    if !sandbox_ready("host_abstract_unix_sockets_are_unreachable") {
        return;
    }
    let fx = Fixture::new("abstract");
    let name = agentd_tests::token("agentd-it-abstract");
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let listener = UnixListener::bind_addr(&addr).expect("bind abstract socket");
    listener.set_nonblocking(true).expect("nonblocking");
    let connect = format!(
        "perl -MSocket -e 'socket(my $s, PF_UNIX, SOCK_STREAM, 0) or die; connect($s, pack_sockaddr_un(\"\\0{name}\")) or die \"connect: $!\\n\"; print \"CONNECTED\\n\"'"
    );
    let isolated = fx.manifest("");
    let r = agentd_tests::exec_with(&isolated, "sh", &[("command", &connect)], &["--prepared-netns"]);
    assert!(!r.stdout().contains("CONNECTED"), "prepared namespace: reached a host abstract socket: {}", r.json);
    // Its own network namespace has no such socket at all.
    assert!(r.stderr().contains("connect: Connection refused"), "prepared namespace: {}", r.json);
    // With network grants too: the call's own namespace has no such socket either.
    let forwarded = fx.manifest("[tools.sh.net]\nconnect = [\"127.0.0.1:9\"]");
    let any = fx.manifest("[tools.sh.net]\nconnect = [\"*:9\"]\nbind = [\"127.0.0.1:10\"]");
    let manifests = vec![
        ("isolated", isolated, "connect: Connection refused"),
        ("forwarded", forwarded, "connect: Connection refused"),
        ("any address and a bind", any, "connect: Connection refused"),
    ];
    for (what, m, evidence) in manifests {
        let r = sh(&m, &connect);
        assert!(!r.stdout().contains("CONNECTED"), "{what}: reached a host abstract socket: {}", r.json);
        assert!(r.stderr().contains(evidence), "{what}: expected {evidence:?}: {}", r.json);
    }
    let mut accepted = listener.accept();
    if let Ok((s, _)) = accepted.as_mut() {
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
    }
    assert!(accepted.is_err(), "the host socket accepted a connection from the sandbox");
}

/// Grants by name, as each kind of client uses them: curl, Python's socket and urllib, and
/// git, through the DNS stub (no proxy settings) or through the proxy agentd names in the
/// environment. A name resolving to a metadata or private address is withheld, an ungranted
/// one does not exist, a wildcard does not cover its parent, and each is recorded.
///
/// Everything runs in network namespaces this test makes: agentd's, and the server's, on a
/// documentation address (so that it is not special) at the other end of a veth pair;
/// agentd's resolver reads a hosts file.
#[test]
fn names_are_served_by_agentd_to_every_kind_of_client() {
    let test = "names_are_served_by_agentd_to_every_kind_of_client";
    if !sandbox_ready(test) {
        return;
    }
    let git = Command::new("sh").args(["-c", "command -v git"]).output().map(|o| o.stdout).unwrap_or_default();
    let git = String::from_utf8_lossy(&git).trim().to_string();
    // git is one of the client classes this test is about: without it the test would prove
    // less, so it fails rather than skip.
    assert!(!git.is_empty(), "{test}: git is not installed, and it is one of the clients tested");
    let fx = Fixture::new("names");
    let run = |cmd: &str| {
        let ok = Command::new("sh").args(["-c", cmd]).status().is_ok_and(|s| s.success());
        assert!(ok, "{cmd}");
    };
    // The served tree: a file, and a git repository over git's plain ("dumb") HTTP.
    let srv = fx.dir.join("srv");
    let work = fx.dir.join("work");
    fs::create_dir_all(&srv).expect("mkdir");
    fs::write(srv.join("hello.txt"), "HELLO-BY-NAME\n").expect("write");
    run(&format!(
        "git init -q {w} && echo REPO-BY-NAME > {w}/README && git -C {w} add README && git -C {w} -c user.email=t@t -c user.name=t commit -qm x && git clone -q --bare {w} {s}/repo.git && git -C {s}/repo.git update-server-info",
        w = work.display(),
        s = srv.display()
    ));
    // A package index (PEP 503) with one wheel, for pip.
    let index = srv.join("simple/agentdprobe");
    fs::create_dir_all(&index).expect("mkdir");
    let wheel = "agentdprobe-1.0-py3-none-any.whl";
    fs::write(index.join("index.html"), format!("<a href=\"../../{wheel}\">{wheel}</a>\n")).expect("index");
    run(&format!(
        "python3 -c \"import zipfile; z = zipfile.ZipFile('{w}', 'w'); z.writestr('agentdprobe/__init__.py', ''); z.writestr('agentdprobe-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: agentdprobe\\nVersion: 1.0\\n'); z.writestr('agentdprobe-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: t\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n'); z.writestr('agentdprobe-1.0.dist-info/RECORD', ''); z.close()\"",
        w = srv.join(wheel).display()
    ));
    let hosts = fx.dir.join("hosts");
    fs::write(
        &hosts,
        "192.0.2.77 svc.agentd.test a.wild.agentd.test wild.agentd.test\n169.254.169.254 meta.agentd.test\n10.1.2.3 private.agentd.test\n",
    )
    .expect("hosts");
    let git_prefix =
        std::path::Path::new(&git).parent().and_then(|p| p.parent()).expect("prefix").display().to_string();
    let port = 18_000 + (std::process::id() % 1000) as u16;
    let manifest = fx.dir.join("names.toml");
    fs::write(
        &manifest,
        format!(
            r#"version = 1
[agent]
name = "it"
[tools.sh]
argv = ["/bin/sh", "-c", "{{command}}"]
[tools.sh.fs]
read = ["/usr", "/etc/ld.so.cache", "/etc/nsswitch.conf", "/etc/ssl", "{git_prefix}"]
exec = ["/usr/bin", "/usr/lib", "{git_prefix}/bin", "{git_prefix}/libexec"]
[tools.sh.env]
set = {{ PATH = "{git_prefix}/bin:/usr/bin:/bin", HOME = "/tmp" }}
[tools.sh.net]
connect = ["svc.agentd.test:{port}", "*.wild.agentd.test:{port}", "meta.agentd.test:{port}", "private.agentd.test:{port}"]
"#
        ),
    )
    .expect("manifest");
    let log = agentd_tests::audit_log_for(&manifest);
    let hosts_env = hosts.display().to_string();
    let env = [("AGENTD_HOSTS_FILE", hosts_env.as_str())];

    std::thread::scope(|scope| {
        scope.spawn(|| {
        // This thread's namespace, and that of every process it starts.
        agentd_tests::enter_new_netns();
        // The server is in a namespace of its own, over a veth pair: an address of the
        // host's own would be refused to names.
        let remote = agentd_tests::Remote::start();
        let mut server = remote
            .command("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "192.0.2.77", "--directory"])
            .arg(&srv)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("http server");
        let up = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("192.0.2.77", port)).is_ok()
        });
        assert!(up, "the test's server did not start");
        let call = |cmd: &str| agentd_tests::exec_env(&manifest, "sh", &[("command", cmd)], &env);
        let url = format!("http://svc.agentd.test:{port}/hello.txt");
        let py_socket = format!(
            "python3 -c \"import socket; s=socket.create_connection(('svc.agentd.test', {port})); s.sendall(b'GET /hello.txt HTTP/1.0\\r\\n\\r\\n'); print(s.makefile('rb').read().decode())\""
        );
        let py_urllib =
            format!("python3 -c \"import urllib.request; print(urllib.request.urlopen('{url}').read().decode())\"");
        let git_clone = format!("git clone -q http://svc.agentd.test:{port}/repo.git /tmp/c && cat /tmp/c/README");
        let pip = format!(
            "python3 -m pip download -q --no-deps --no-cache-dir --disable-pip-version-check --trusted-host svc.agentd.test --index-url http://svc.agentd.test:{port}/simple/ -d /tmp/dl agentdprobe && ls /tmp/dl"
        );
        // (client, command, what it must print, the path it takes)
        let clients = [
            ("curl", format!("curl -sS --noproxy '*' {url}"), "HELLO-BY-NAME", "forwarder"),
            ("curl through the proxy", format!("curl -sS {url}"), "HELLO-BY-NAME", "proxy"),
            ("python socket", py_socket, "HELLO-BY-NAME", "forwarder"),
            ("python urllib", py_urllib, "HELLO-BY-NAME", "proxy"),
            ("git", git_clone.clone(), "REPO-BY-NAME", "proxy"),
            ("git without proxy settings", format!("unset http_proxy HTTP_PROXY all_proxy ALL_PROXY; {git_clone}"), "REPO-BY-NAME", "forwarder"),
            ("pip", pip.clone(), "agentdprobe-1.0", "proxy"),
            ("pip without proxy settings", format!("unset http_proxy HTTP_PROXY all_proxy ALL_PROXY; {pip}"), "agentdprobe-1.0", "forwarder"),
            (
                "a name below a wildcard",
                format!("curl -sS --noproxy '*' http://a.wild.agentd.test:{port}/hello.txt"),
                "HELLO-BY-NAME",
                "forwarder",
            ),
        ];
        for (client, cmd, want, via) in &clients {
            let r = call(cmd);
            assert!(r.stdout().contains(want), "{client}: {}", r.json);
            let call_id = r.json["call_id"].as_str().unwrap_or_default().to_string();
            let text = fs::read_to_string(&log).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["call_id"] == call_id.as_str())
                .collect();
            let connected = records.iter().any(|v| {
                v["kind"] == "connect" && v["details"]["via"] == *via && v["details"]["connected"] == true
                    && v["details"]["name"].as_str().is_some_and(|n| n.ends_with("agentd.test"))
            });
            assert!(connected, "{client}: no {via} connection by name recorded: {records:?}");
            eprintln!("{client}: went through the {via}");
        }
        // Refused names, both ways.
        for (name, why) in [
            ("meta.agentd.test", "link-local"),
            ("private.agentd.test", "private"),
            ("other.agentd.test", "not granted"),
            ("wild.agentd.test", "not granted"),
        ] {
            for proxy in [false, true] {
                let flag = if proxy { "" } else { "--noproxy '*'" };
                let r = call(&format!("curl -fsS {flag} http://{name}:{port}/hello.txt"));
                assert!(!r.stdout().contains("HELLO"), "{name} (proxy: {proxy}) reached the server: {}", r.json);
                assert_ne!(r.exit_code(), 0, "{}", r.json);
            }
            let text = fs::read_to_string(&log).unwrap_or_default();
            let recorded = text.lines().any(|l| l.contains("\"denied\"") && l.contains(name) && l.contains(why));
            assert!(recorded, "no denial recorded for {name} ({why})");
        }
        let _ = server.kill();
        let _ = server.wait();
        });
    });
}
