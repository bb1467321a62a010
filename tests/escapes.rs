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

use agentd_tests::{kernel_landlock_abi, need, sandbox_ready, sh, Fixture};

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

    // A granted network shares the host's namespace, which agentd only allows with Landlock's
    // TCP rules (ABI 4) and abstract-socket scoping (ABI 6).
    let abi = kernel_landlock_abi();
    if !need("network_is_denied_unless_granted", "landlock_scope", abi >= 6, "Landlock ABI < 6: host network refused") {
        return;
    }
    // `*:PORT` shares the host's namespace (Landlock and seccomp hold it); an exact address is
    // forwarded into the call's own namespace (Landlock holds the ports there too, and
    // nothing else has a route).
    let host = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"*:{granted_port}\"]"));
    let forwarded = fx.manifest(&format!("[tools.sh.net]\nconnect = [\"127.0.0.1:{granted_port}\"]"));
    let attempts = [
        (perl_connect(denied_port), "connect: Permission denied"),
        (
            format!("perl -MSocket=:all -e 'socket(my $s, PF_INET6, SOCK_STREAM, 0) or die; connect($s, pack_sockaddr_in6({denied_port}, inet_pton(AF_INET6, \"::1\"))) or die \"connect6: $!\\n\"'"),
            "connect6: Permission denied",
        ),
        (
            "perl -MIO::Socket::INET -e 'IO::Socket::INET->new(LocalAddr=>\"127.0.0.1:0\",Listen=>1) or die \"bind: $!\\n\"'".to_string(),
            "bind: Permission denied",
        ),
        // TCP Fast Open would connect without the connect hook Landlock relies on.
        (
            format!("perl -MSocket -e 'socket(my $s, PF_INET, SOCK_STREAM, 0) or die; send($s, \"x\", 0x20000000, pack_sockaddr_in({denied_port}, inet_aton(\"127.0.0.1\"))) or die \"fastopen: $!\\n\"; print <$s>'"),
            "fastopen: Operation not permitted",
        ),
        (
            "perl -MSocket -e 'socket(my $s, PF_INET, SOCK_STREAM, 0) or die; setsockopt($s, 6, 30, 1) or die \"tfo: $!\\n\"'".to_string(),
            "tfo: Operation not permitted",
        ),
        // listen() on an unbound socket would auto-bind a port Landlock never sees.
        (
            "perl -MSocket -e 'socket(my $s, PF_INET, SOCK_STREAM, 0) or die; listen($s, 1) or die \"listen: $!\\n\"'".to_string(),
            "listen: Operation not permitted",
        ),
    ];
    for (m, mode) in [(&host, "host"), (&forwarded, "forwarded")] {
        for (cmd, evidence) in &attempts {
            let r = sh(m, cmd);
            fx.assert_no_leak(&r);
            assert_eq!(r.json["enforcement"]["network"], mode, "{}", r.json);
            if mode == "forwarded" && evidence.starts_with("listen") {
                // Its own namespace: an autobound port is the call's alone.
                assert_eq!(r.exit_code(), 0, "{}", r.json);
                continue;
            }
            assert!(r.stderr().contains(evidence), "{mode}: {cmd}: expected {evidence:?}: {}", r.json);
        }
    }
    // A forwarded call's namespace is its own: only loopback, and none of the host's sockets
    // (the host's listener is not in its tables; agentd's forwarder listener is).
    let r = sh(&forwarded, "cat /proc/self/net/dev; echo ---; cat /proc/self/net/tcp /proc/self/net/tcp6");
    let out = r.stdout();
    let (devs, tcp) = out.split_once("---").unwrap_or_default();
    let names: Vec<&str> = devs.lines().filter_map(|l| l.split_once(':')).map(|(n, _)| n.trim()).collect();
    assert_eq!(names, ["lo"], "{}", r.json);
    let local_port = |port: u16| format!(":{port:04X} ");
    assert!(!tcp.contains(&local_port(denied_port)), "the host's listener shows in the call's tables: {tcp}");
    assert!(tcp.contains(&local_port(granted_port)), "agentd's forwarder listener is missing: {tcp}");
    let m = forwarded;
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let udp_port = udp.local_addr().expect("addr").port();
    let r = sh(
        &m,
        &format!("perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(PeerAddr=>\"127.0.0.1:{udp_port}\",Proto=>\"udp\") or die \"udp: $!\\n\"; $s->send(\"UDP-LEAK\") or die'"),
    );
    assert!(r.stderr().contains("udp: Operation not permitted"), "UDP was allowed: {}", r.json);
    let mut buf = [0u8; 64];
    assert!(udp.recv(&mut buf).is_err(), "a UDP datagram reached the host");
    // Positive control: the granted pair works.
    let r = sh(&m, &perl_connect(granted_port));
    assert_eq!(r.stdout(), "BANNER-granted", "the granted port must work: {}", r.json);
    assert!(granted.join().unwrap_or(false));
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
        ("udp", "socket(my $s, 2, 2, 0)", "Operation not permitted"),
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
    // A forwarded grant: the call's own namespace has no such socket either.
    let forwarded = fx.manifest("[tools.sh.net]\nconnect = [\"127.0.0.1:9\"]");
    let mut manifests = vec![
        ("isolated", isolated, "connect: Connection refused"),
        ("forwarded", forwarded, "connect: Connection refused"),
    ];
    let scoped = kernel_landlock_abi() >= 6;
    if need("host_abstract_unix_sockets_are_unreachable", "landlock_scope", scoped, "Landlock ABI < 6") {
        // Sharing the host's network namespace: Landlock's scoping must stop it.
        let host = fx.manifest("[tools.sh.net]\nconnect = [\"*:9\"]");
        manifests.push(("host network", host, "connect: Operation not permitted"));
    }
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
