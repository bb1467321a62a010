//! The tests. Each runs real tool calls through `agentd exec` under the BPF LSM layer and
//! checks the outcome, the exact errors, and the audit records of that call.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::check;
use crate::harness::{bpf_layer, lsm_layer, Call, Case, Ctx, Fail};

/// Every test, in the order they run.
pub const ALL: &[Case] = &[
    ("lsm_layer_records_execs_and_opens", lsm_layer_records_execs_and_opens),
    ("exec_outside_fs_exec_is_denied", exec_outside_fs_exec_is_denied),
    ("memfd_execveat_is_denied", memfd_execveat_is_denied),
    ("deny_open_rule_holds", deny_open_rule_holds),
    ("only_the_granted_address_port_connects", only_the_granted_address_port_connects),
    ("unix_connects_reach_only_granted_sockets", unix_connects_reach_only_granted_sockets),
    ("signals_and_ptrace_outside_the_call_are_denied", signals_and_ptrace_outside_the_call_are_denied),
    ("mount_is_denied", mount_is_denied),
    ("audit_mode_records_without_denying", audit_mode_records_without_denying),
    ("cgroup_v2_limits_hold", cgroup_v2_limits_hold),
    ("requires_bpf_lsm_runs_here", requires_bpf_lsm_runs_here),
    ("names_resolve_only_as_granted", names_resolve_only_as_granted),
    ("the_calls_network_is_its_own", the_calls_network_is_its_own),
    ("without_landlock_the_default_refuses", without_landlock_the_default_refuses),
    ("files_are_named_by_the_kernel", files_are_named_by_the_kernel),
    ("opens_are_named_by_what_was_opened", opens_are_named_by_what_was_opened),
    ("memory_made_executable_is_recorded", memory_made_executable_is_recorded),
    ("audit_log_verifies", audit_log_verifies),
];

const TOOL: &str = "/usr/bin/agentd-vm-tests tool";
/// The host tests' `paths` helper (tests/src/bin/paths.rs): path races, unfaulted pages,
/// relative opens, executable memory.
const PATHS: &str = "/usr/bin/paths";

fn has_path(records: &[Value], path: &str) -> bool {
    records.iter().any(|r| r["details"]["path"] == path)
}

fn lsm_layer_records_execs_and_opens(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("basic", "");
    let call = ctx.sh(&m, "cat /tmp/vmt/data/hello.txt");
    check!(call.code == 0 && call.stdout().contains("hello from"), "the call did not run: {}", call.brief());
    lsm_layer(&call)?;
    let active = &call.json["enforcement"]["bpf"]["active"];
    // Twelve hooks, and the ten path_* hooks of kernels with CONFIG_SECURITY_PATH (Debian's).
    let lsm = active.as_array().map(|a| a.iter().filter(|p| p.as_str().is_some_and(|p| p.starts_with("lsm/"))).count());
    check!(lsm == Some(22), "expected 22 LSM programs, got {active}");
    check!(active.to_string().contains("cgroup/dev"), "the device program is not active: {active}");
    let execs = ctx.find(&call, "exec", "allowed");
    // /bin/sh and cat are busybox applets: the kernel resolves both to the binary itself.
    check!(has_path(&execs, "/usr/bin/busybox"), "no resolved exec record: {execs:?}");
    check!(execs.iter().all(|r| r["details"]["hook"] == "lsm"), "exec records not from the LSM: {execs:?}");
    let opens = ctx.find(&call, "open", "allowed");
    check!(has_path(&opens, "/tmp/vmt/data/hello.txt"), "no open record for hello.txt: {opens:?}");
    check!(call.json["events"]["lost"] == 0, "events lost: {}", call.json["events"]);
    let landlock = &call.json["enforcement"]["landlock"];
    if landlock["abi_kernel"].as_i64().unwrap_or(0) < 3 {
        // Older Landlock cannot express some rights (truncate, device ioctls): the result
        // must say so rather than claim full coverage.
        let degraded = landlock["degraded"].as_array().map(Vec::len).unwrap_or(0);
        check!(degraded > 0, "Landlock ABI {} but nothing reported degraded: {landlock}", landlock["abi_kernel"]);
    }
    Ok(())
}

fn exec_outside_fs_exec_is_denied(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("exec", "");
    // A program the tool wrote, and a program it may read but not run (through ld.so, which
    // maps it executable without an execve of it).
    let call = ctx.sh(
        &m,
        "cp /usr/bin/busybox /tmp/vmt/out/bb && /tmp/vmt/out/bb echo RAN-COPY; echo copy=$?; \
         /usr/lib64/ld-linux-x86-64.so.2 /tmp/vmt/data/prog --list; echo ldso=$?",
    );
    lsm_layer(&call)?;
    let out = call.stdout();
    check!(!out.contains("RAN-COPY") && out.contains("copy=126"), "the copied binary ran: {}", call.brief());
    check!(!out.contains("ldso=0") && out.contains("ldso="), "ld.so ran the unexecutable program: {}", call.brief());
    let denied = ctx.find(&call, "exec", "denied");
    let mapping = denied.iter().any(|r| r["details"]["path"] == "/tmp/vmt/data/prog" && r["details"]["hook"] == "lsm");
    check!(mapping, "no LSM denial of mapping /tmp/vmt/data/prog executable: {denied:?}");
    Ok(())
}

fn memfd_execveat_is_denied(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("memfd", "");
    let call = ctx.sh(&m, &format!("{TOOL} memfd-exec; echo done"));
    lsm_layer(&call)?;
    let out = call.stdout();
    check!(out.contains("done"), "the fileless exec replaced the tool: {}", call.brief());
    for label in ["memfd_exec", "memfd_default"] {
        let refused = out.lines().any(|l| l.starts_with(label) && !l.ends_with("=ok"));
        check!(refused, "{label}: neither memfd_create nor execveat was refused: {out:?}");
    }
    check!(!out.contains("_execveat=ok"), "execveat of a memfd succeeded: {out:?}");
    Ok(())
}

fn deny_open_rule_holds(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("deny-open", "[tools.sh.audit]\ndeny_open = [\"/tmp/vmt/data/secret.txt\"]\n");
    let call = ctx.sh(&m, "cat /tmp/vmt/data/hello.txt; cat /tmp/vmt/data/secret.txt; echo rc=$?");
    lsm_layer(&call)?;
    check!(call.stdout().contains("hello from"), "the granted file was not readable: {}", call.brief());
    check!(!call.stdout().contains("TOKEN") && call.stdout().contains("rc=1"), "the secret was read: {}", call.brief());
    let stderr = call.json["stderr"].as_str().unwrap_or("");
    check!(stderr.contains("Operation not permitted"), "expected EPERM from the LSM, got stderr {stderr:?}");
    let denied = ctx.find(&call, "open", "denied");
    check!(has_path(&denied, "/tmp/vmt/data/secret.txt"), "no denied open record: {denied:?}");
    Ok(())
}

/// Listeners on the granted and an ungranted address, same port.
fn listeners() -> Result<(TcpListener, TcpListener), String> {
    let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    let a = TcpListener::bind("127.0.0.1:8080").map_err(|e| format!("listen 127.0.0.1:8080: {e}"))?;
    let b = TcpListener::bind("127.0.0.2:8080").map_err(|e| format!("listen 127.0.0.2:8080: {e}"))?;
    Ok((a, b))
}

fn connects(ctx: &Ctx, name: &str, extra: &str) -> Result<Call, Fail> {
    let _l = listeners()?;
    let m = ctx.sh_manifest(name, &format!("[tools.sh.net]\nconnect = [\"127.0.0.1:8080\"]\n{extra}"));
    let targets = "127.0.0.1:8080 127.0.0.2:8080 [::ffff:127.0.0.1]:8080 [::ffff:127.0.0.2]:8080 127.0.0.1:9090";
    Ok(ctx.sh(&m, &format!("{TOOL} connect {targets}")))
}

fn only_the_granted_address_port_connects(ctx: &Ctx) -> Result<(), Fail> {
    let call = connects(ctx, "connect", "")?;
    // The LSM's socket_connect hook, or the fallback's cgroup connect programs: both deny
    // with EPERM and record the attempt.
    bpf_layer(&call)?;
    let out = call.stdout();
    check!(out.contains("connect 127.0.0.1:8080=ok"), "the granted pair did not connect: {}", call.brief());
    // It went through agentd's forwarder, from the call's own namespace, on any kernel.
    check!(call.json["enforcement"]["network"] == "forwarded", "not forwarded: {}", call.brief());
    let forwarded = ctx.find(&call, "connect", "allowed");
    check!(
        forwarded.iter().any(|r| r["details"]["via"] == "forwarder" && r["details"]["to"] == "127.0.0.1:8080"),
        "no forwarder record: {forwarded:?}"
    );
    check!(out.contains("connect 127.0.0.2:8080=EPERM"), "the ungranted address was not denied: {}", call.brief());
    // The granted address spelled as IPv4-mapped IPv6 is the same destination; another
    // address spelled so is not granted.
    check!(out.contains("connect [::ffff:127.0.0.1]:8080=ok"), "the mapped spelling failed: {}", call.brief());
    check!(out.contains("connect [::ffff:127.0.0.2]:8080=EPERM"), "a mapped spelling got through: {}", call.brief());
    let denied = ctx.find(&call, "connect", "denied");
    check!(denied.iter().any(|r| r["details"]["address"] == "127.0.0.2:8080"), "no denied record: {denied:?}");
    // A port Landlock does not grant (ABI 4 and later) is refused before any BPF hook runs:
    // the record comes from the syscall's result.
    if out.contains("connect 127.0.0.1:9090=EACCES") {
        let by_landlock =
            denied.iter().any(|r| r["details"]["address"] == "127.0.0.1:9090" && r["details"]["by"] == "landlock");
        check!(by_landlock, "no connect record refused by Landlock: {denied:?}");
    } else {
        check!(out.contains("connect 127.0.0.1:9090=EPERM"), "the ungranted port was not denied: {}", call.brief());
    }
    let allowed = ctx.find(&call, "connect", "allowed");
    check!(allowed.iter().any(|r| r["details"]["address"] == "127.0.0.1:8080"), "no allowed record: {allowed:?}");
    Ok(())
}

/// A Unix socket server at `path` (0666) answering each connection with one line, on a
/// thread, until the process ends.
fn unix_server(path: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("bind {path}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"hello\n");
        }
    });
    Ok(())
}

fn unix_connects_reach_only_granted_sockets(ctx: &Ctx) -> Result<(), Fail> {
    let (app, daemon) = ("/tmp/vmt/data/app.sock", "/tmp/vmt/data/daemon.sock");
    unix_server(app)?;
    unix_server(daemon)?;
    let m = ctx.sh_manifest("unix", &format!("[tools.sh.net]\nunix = [\"{app}\"]\n"));
    let call = ctx.sh(&m, &format!("{TOOL} unix {app} {daemon}; {TOOL} unix-own /tmp/own.sock"));
    lsm_layer(&call)?;
    let out = call.stdout();
    check!(out.contains("unix-own /tmp/own.sock=ok"), "the call's own socket did not connect: {}", call.brief());
    // Where the kernel has Landlock's Unix-socket right, it is applied too (and the calls
    // above show it lets through what the gate does).
    let ll = &call.json["enforcement"]["landlock"];
    let abi9 = ll["abi_kernel"].as_u64().is_some_and(|a| a >= 9);
    check!(ll["resolve_unix"] == abi9, "resolve_unix should be {abi9} on this kernel: {ll}");
    eprintln!("agentd-vm: Landlock ABI {}, Unix-socket right applied: {}", ll["abi_kernel"], ll["resolve_unix"]);
    check!(out.contains(&format!("unix {app}=ok")), "the granted socket did not connect: {}", call.brief());
    check!(out.contains(&format!("unix {daemon}=EACCES")), "the other socket was not refused: {}", call.brief());
    // The LSM hook saw the connect init made for the tool, and matched the granted inode.
    let allowed = ctx.find(&call, "unix_connect", "allowed");
    check!(
        allowed.iter().any(|r| r["details"]["socket_name"] == "app.sock" && r["details"]["hook"] == "lsm"),
        "no allowed unix_connect record: {allowed:?}"
    );
    // The refusal is the gate's (recorded by it), and never reached the kernel.
    let denied = ctx.find(&call, "unix_connect", "denied");
    check!(
        denied.iter().any(|r| r["details"]["hook"] == "gate" && r["details"]["path"] == daemon),
        "no record of the gate's refusal: {denied:?}"
    );
    check!(!denied.iter().any(|r| r["details"]["hook"] == "lsm"), "the refused connect reached the kernel: {denied:?}");
    // init takes the tool's sockets with ptrace access: agentd's own, not recorded as the
    // tool's.
    let traced = ctx.find(&call, "ptrace", "allowed");
    check!(traced.is_empty(), "the gate's ptrace access was recorded: {traced:?}");
    Ok(())
}

/// The host pid of the process of a call whose pid inside the call is `ns_pid`.
fn host_pid(ns_pid: &str) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).unwrap_or("");
        let ids: Vec<&str> = nspid.split_whitespace().collect();
        if cgroup.contains("/agentd/") && ids.len() > 1 && ids.last() == Some(&ns_pid) && status.contains("sleep") {
            return Some(pid);
        }
    }
    None
}

fn signals_and_ptrace_outside_the_call_are_denied(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("signals", "");
    let (child, go) = (ctx.root.join("out/child"), ctx.root.join("out/go"));
    let script = format!(
        "sleep 30 & echo $! > /tmp/vmt/out/child; kill -0 $! && echo inside=ok; \
         while [ ! -e /tmp/vmt/out/go ]; do sleep 0.1; done; \
         {TOOL} kill $(cat /tmp/vmt/out/child); {TOOL} ptrace $(cat /tmp/vmt/out/child)"
    );
    let mut agentd =
        ctx.sh_command(&m, &script).stdout(Stdio::piped()).spawn().map_err(|e| format!("starting agentd: {e}"))?;
    let start = Instant::now();
    let ns_pid = loop {
        if let Some(p) = std::fs::read_to_string(&child).ok().filter(|s| s.ends_with('\n')) {
            break p.trim().to_string();
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = agentd.kill();
            return Err(Fail::Failed("the tool never started its child".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Move the child out of the call's cgroup, as an escaped process would be.
    let outside = Path::new("/sys/fs/cgroup/vmt-outside");
    let _ = std::fs::create_dir(outside);
    let moved =
        host_pid(&ns_pid).ok_or_else(|| format!("no host process for the call's pid {ns_pid}")).and_then(|pid| {
            std::fs::write(outside.join("cgroup.procs"), pid.to_string()).map_err(|e| format!("moving {pid}: {e}"))?;
            Ok(pid)
        });
    let _ = std::fs::write(&go, "");
    let out = agentd.wait_with_output().map_err(|e| format!("waiting for agentd: {e}"))?;
    let pid = moved?;
    let json: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("agentd output: {e}"))?;
    let call = Call { json, code: out.status.code().unwrap_or(-1), stderr: String::new() };
    lsm_layer(&call)?;
    let stdout = call.stdout();
    check!(stdout.contains("inside=ok"), "a signal inside the call failed: {}", call.brief());
    check!(stdout.contains("kill=EPERM"), "the signal to a process outside the call was not denied: {}", call.brief());
    check!(stdout.contains("ptrace=EPERM"), "ptrace of a process outside the call was not denied: {}", call.brief());
    let signals = ctx.find(&call, "signal", "denied");
    check!(signals.iter().any(|r| r["details"]["target_pid"] == pid), "no denied signal record for {pid}: {signals:?}");
    let ptraces = ctx.find(&call, "ptrace", "denied");
    check!(ptraces.iter().any(|r| r["details"]["target_pid"] == pid), "no denied ptrace record for {pid}: {ptraces:?}");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    Ok(())
}

fn mount_is_denied(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("mount", "");
    let call = ctx.sh(&m, &format!("{TOOL} mount"));
    // The LSM's sb_mount hook where it loads; seccomp refuses mount calls on every kernel.
    bpf_layer(&call)?;
    check!(call.stdout().contains("mount=EPERM"), "mount was not denied: {}", call.brief());
    // seccomp refuses before any hook, and even before the entry's tracepoint: the record
    // comes from the syscall's exit (kernels that can pin per-syscall tracepoints: 5.15+).
    if call.json["enforcement"]["bpf"]["active"].to_string().contains("sys_exit_* (") {
        let denied = ctx.find(&call, "syscall", "denied");
        let seen = denied.iter().any(|r| r["details"]["syscall"] == "mount" && r["details"]["by"] == "seccomp");
        check!(seen, "no record of the mount seccomp refused: {denied:?}");
    }
    Ok(())
}

fn audit_mode_records_without_denying(ctx: &Ctx) -> Result<(), Fail> {
    let extra = "[tools.sh.audit]\nmode = \"audit\"\ndeny_open = [\"/tmp/vmt/data/secret.txt\"]\n";
    let m = ctx.sh_manifest("audit-mode-open", extra);
    let call = ctx.sh(&m, "cat /tmp/vmt/data/secret.txt >/dev/null; echo rc=$?");
    lsm_layer(&call)?;
    check!(call.json["enforcement"]["bpf"]["mode"] == "audit", "mode is not audit: {}", call.brief());
    check!(call.stdout().contains("rc=0"), "audit mode denied an open: {}", call.brief());
    let denied = ctx.find(&call, "open", "denied");
    let recorded =
        denied.iter().any(|r| r["details"]["path"] == "/tmp/vmt/data/secret.txt" && r["details"]["enforced"] == false);
    check!(recorded, "the would-be denied open was not recorded as unenforced: {denied:?}");

    let call = connects(ctx, "audit-mode", extra)?;
    lsm_layer(&call)?;
    // Not denied by the hook (no EPERM); in the call's own namespace only agentd listens, and
    // it refuses (and records) an address that is not granted.
    check!(!call.stdout().contains("127.0.0.2:8080=EPERM"), "audit mode denied a connect: {}", call.brief());
    check!(call.json["enforcement"]["network"] == "forwarded", "not forwarded: {}", call.brief());
    let denied = ctx.find(&call, "connect", "denied");
    let recorded =
        denied.iter().any(|r| r["details"]["address"] == "127.0.0.2:8080" && r["details"]["enforced"] == false);
    check!(recorded, "the would-be denied connect was not recorded as unenforced: {denied:?}");
    let refused = denied.iter().any(|r| r["details"]["via"] == "forwarder" && r["details"]["to"] == "127.0.0.2:8080");
    check!(refused, "agentd's listener did not refuse the address: {denied:?}");
    Ok(())
}

/// A server on `at` that sends `banner` to every connection, on a thread.
fn banner_server(at: &str, banner: &'static str) -> Result<(), String> {
    use std::io::Write;
    let l = TcpListener::bind(at).map_err(|e| format!("listen {at}: {e}"))?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(banner.as_bytes());
        }
    });
    Ok(())
}

fn names_resolve_only_as_granted(ctx: &Ctx) -> Result<(), Fail> {
    let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    banner_server("127.0.0.1:8081", "BANNER-by-name\n")?;
    let hosts = ctx.root.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 svc.vm.test\n169.254.169.254 meta.vm.test\n10.0.0.5 private.vm.test\n")
        .map_err(|e| e.to_string())?;
    let grants = r#"connect = ["svc.vm.test:8081", "127.0.0.0/8:8081", "meta.vm.test:8081", "private.vm.test:8081"]"#;
    let m = ctx.sh_manifest("names", &format!("[tools.sh.net]\n{grants}\n"));
    let hosts = hosts.display().to_string();
    let command =
        format!("{TOOL} resolve svc.vm.test meta.vm.test private.vm.test other.vm.test; {TOOL} fetch svc.vm.test:8081");
    let call = ctx.sh_env(&m, &command, &[("AGENTD_HOSTS_FILE", &hosts)]);
    let out = call.stdout();
    check!(out.contains("resolve svc.vm.test=ok 127.0.0.1"), "the granted name did not resolve: {}", call.brief());
    for name in ["meta.vm.test", "private.vm.test", "other.vm.test"] {
        check!(out.contains(&format!("resolve {name}=failed")), "{name} resolved: {}", call.brief());
    }
    check!(out.contains("fetch svc.vm.test:8081=ok BANNER-by-name"), "the name did not connect: {}", call.brief());
    let resolved = ctx.find(&call, "resolve", "allowed");
    check!(resolved.iter().any(|r| r["details"]["name"] == "svc.vm.test"), "no resolve record: {resolved:?}");
    let denied = ctx.find(&call, "resolve", "denied");
    for (name, why) in
        [("meta.vm.test", "link-local"), ("private.vm.test", "private"), ("other.vm.test", "not granted")]
    {
        let said = denied.iter().any(|r| r["details"]["name"] == name && r.to_string().contains(why));
        check!(said, "no denial of {name} ({why}): {denied:?}");
    }
    let connected = ctx.find(&call, "connect", "allowed");
    let by_name = connected.iter().any(|r| r["details"]["via"] == "forwarder" && r["details"]["name"] == "svc.vm.test");
    check!(by_name, "no connection record with the name: {connected:?}");
    Ok(())
}

fn the_calls_network_is_its_own(ctx: &Ctx) -> Result<(), Fail> {
    let _ = Command::new("ip").args(["link", "set", "lo", "up"]).status();
    let _l = TcpListener::bind("127.0.0.1:8082").map_err(|e| format!("listen: {e}"))?;
    let m = ctx.sh_manifest("own-net", "[tools.sh.net]\nconnect = [\"127.0.0.1:8082\"]\n");
    let call = ctx.sh(&m, "cat /proc/self/net/dev /proc/self/net/tcp");
    let out = call.stdout();
    // Where the kernel shows /proc/self/net under `subset=pid` (not 5.10), it is the call's
    // own: loopback only, and not the host's listener on 8082 (0x1F92; agentd's listener
    // there is on every address, in tcp6).
    if call.code == 0 {
        let devices: Vec<&str> = out.lines().filter_map(|l| l.split_once(':')).map(|(d, _)| d.trim()).collect();
        let host_nic = devices.iter().any(|d| d.starts_with("eth") || d.starts_with("en"));
        check!(devices.contains(&"lo") && !host_nic, "the call sees the host's interfaces: {}", call.brief());
        check!(!out.contains(":1F92 "), "the host's listener shows in the call's /proc/net/tcp: {}", call.brief());
    } else {
        let stderr = call.json["stderr"].as_str().unwrap_or("");
        check!(stderr.contains("No such file"), "/proc/self/net: {}", call.brief());
    }
    // A port the kernel autobinds is the call's alone.
    let file = ctx.root.join("out/autobind-port");
    let _ = std::fs::remove_file(&file);
    let mut child = ctx
        .sh_command(&m, &format!("{TOOL} autobind {} 3", file.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("agentd exec: {e}"))?;
    let until = Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&file).ok().and_then(|t| t.trim().parse::<u16>().ok()) {
            break p;
        }
        if Instant::now() > until {
            let _ = child.kill();
            return Err("the tool never wrote its autobound port".to_string().into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let reached = std::net::TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().map_err(|_| "addr".to_string())?,
        Duration::from_secs(1),
    );
    let _ = child.wait();
    check!(reached.is_err(), "the call's autobound port {port} was reachable from the host");
    Ok(())
}

fn without_landlock_the_default_refuses(ctx: &Ctx) -> Result<(), Fail> {
    if ctx.landlock {
        return Ok(());
    }
    // The default manifest (no `landlock_abi`) is refused, saying why.
    let m = ctx.manifest("no-landlock-default", "");
    let call = ctx.sh(&m, "echo ran");
    let error = call.json["error"].as_str().unwrap_or("");
    check!(call.code == 125 && !call.stdout().contains("ran"), "ran without Landlock: {}", call.brief());
    check!(error.contains("landlock"), "the refusal does not name Landlock: {}", call.brief());
    // With `landlock_abi = 0`, the rest holds: a path outside the grants is not even there.
    let m = ctx.sh_manifest("no-landlock-allowed", "");
    let call = ctx.sh(&m, "echo ran; cat /etc/hostname /root/.profile 2>&1; echo rc=$?");
    check!(call.code == 0 && call.stdout().contains("ran"), "refused with landlock_abi = 0: {}", call.brief());
    check!(call.stdout().contains("No such file"), "a path outside the grants is visible: {}", call.brief());
    check!(
        call.json["enforcement"]["landlock"]["status"] != "full",
        "Landlock reported on a kernel without it: {}",
        call.brief()
    );
    Ok(())
}

fn leftover_calls() -> Vec<String> {
    std::fs::read_dir("/sys/fs/cgroup/agentd")
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).map(|e| e.file_name().to_string_lossy().into()).collect())
        .unwrap_or_default()
}

fn cgroup_v2_limits_hold(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("limits", "[tools.sh.limits]\nmemory_mb = 32\npids = 16\ntimeout_ms = 20000\n");
    check!(
        std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().contains(" - cgroup2 "),
        "the VM has no cgroup2 mount"
    );
    let call = ctx.sh(&m, &format!("{TOOL} alloc 256"));
    check!(call.json["enforcement"]["cgroup"]["version"] == "v2", "not the v2 cgroup path: {}", call.brief());
    check!(call.json["oom_killed"] == true, "the memory bomb was not OOM-killed: {}", call.brief());
    check!(!call.stdout().contains("alloc=256MiB"), "256 MiB fit under a 32 MiB limit: {}", call.brief());

    let call = ctx.sh(&m, "i=0; while [ $i -lt 100 ]; do sleep 3 & i=$((i+1)); done; echo spawned; wait");
    let stderr = call.json["stderr"].as_str().unwrap_or("");
    check!(stderr.contains("fork") || stderr.contains("Resource"), "100 processes under pids=16: {}", call.brief());
    check!(call.json["timed_out"] == false, "the fork bomb ran into the timeout: {}", call.brief());
    let left = leftover_calls();
    check!(left.is_empty(), "call cgroups left behind: {left:?}");
    Ok(())
}

fn requires_bpf_lsm_runs_here(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("requires", "[requires]\nbpf_lsm = true\n");
    let call = ctx.sh(&m, "echo ran");
    let error = call.json["error"].as_str().unwrap_or("");
    if call.code == 125 && error.contains("bpf_lsm is required but not available") && !call.stdout().contains("ran") {
        // As the manifest demands: refused where agentd's LSM programs do not load.
        return Err(Fail::Limited(format!("agentd's LSM programs do not load here, so it refused: {error}")));
    }
    check!(call.code == 0 && call.stdout().contains("ran"), "refused under BPF LSM: {}", call.brief());
    lsm_layer(&call)?;
    Ok(())
}

/// Either layer names a file the tool opened as the kernel resolved it, not by the string the
/// tool passed (here a symlink, relative to the working directory). The fallback layer, which
/// kernels without BPF LSM run (5.10 here, with its raw syscall hooks), also records each
/// change to the file system with its names; the LSM layer does not record changes yet.
fn files_are_named_by_the_kernel(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("kernel-names", "");
    let call = ctx.sh(
        &m,
        "cd /tmp/vmt/out && rm -rf d e f x h p && ln -sf /tmp/vmt/data/hello.txt link && cat link && mkdir d && mv d e \
         && rmdir e && echo x > x && chmod 4755 x && ln x h && truncate -s 1 h && mkfifo p && rm p h",
    );
    check!(call.code == 0 && call.stdout().contains("hello from"), "the call did not run: {}", call.brief());
    bpf_layer(&call)?;
    let opens = ctx.find(&call, "open", "allowed");
    let named = opens
        .iter()
        .any(|r| r["details"]["path"] == "/tmp/vmt/data/hello.txt" && r["details"]["path_source"] == "kernel");
    check!(named, "no open of hello.txt named by the kernel: {opens:?}");
    check!(call.json["events"]["lost"] == 0, "events lost: {}", call.json["events"]);
    // Every change is recorded on both layers; on the LSM layer its path_* hooks name the
    // object from the kernel.
    let lsm = call.json["enforcement"]["bpf"]["layer"] == "lsm";
    let path_hooks = call.json["enforcement"]["bpf"]["active"].to_string().contains("lsm/path_unlink");
    let changes = ctx.find(&call, "change", "allowed");
    let change = |op: &str, path: &str| {
        changes.iter().find(|r| r["details"]["operation"] == op && r["details"]["path"] == path).cloned()
    };
    for (op, path) in [
        ("symlink", "/tmp/vmt/out/link"),
        ("mkdir", "/tmp/vmt/out/d"),
        ("rmdir", "/tmp/vmt/out/e"),
        ("chmod", "/tmp/vmt/out/x"),
        ("truncate", "/tmp/vmt/out/h"),
        ("mknod", "/tmp/vmt/out/p"),
        ("unlink", "/tmp/vmt/out/p"),
        ("unlink", "/tmp/vmt/out/h"),
    ] {
        let r = change(op, path);
        check!(r.is_some(), "no {op} of {path}: {changes:?}");
        let r = r.unwrap_or_default();
        check!(r["details"]["result"] == 0, "{op} of {path} has no result: {r}");
        if lsm && path_hooks {
            check!(r["details"]["path_source"] == "kernel", "{op} of {path} not named by the kernel: {r}");
        }
    }
    let chmod = change("chmod", "/tmp/vmt/out/x").unwrap_or_default();
    check!(chmod["details"]["mode"] == "4755" && chmod["details"]["setuid"] == true, "setuid not flagged: {chmod}");
    for (op, from, to) in [("rename", "/tmp/vmt/out/d", "/tmp/vmt/out/e"), ("link", "/tmp/vmt/out/x", "/tmp/vmt/out/h")]
    {
        let r = change(op, from);
        check!(r.as_ref().is_some_and(|r| r["details"]["new_path"] == to), "no {op} of {from} to {to}: {changes:?}");
        if lsm && path_hooks {
            let r = r.unwrap_or_default();
            check!(r["details"]["new_path_source"] == "kernel", "{op}'s new name not from the kernel: {r}");
        }
    }
    let link = change("symlink", "/tmp/vmt/out/link").unwrap_or_default();
    check!(link["details"]["target"] == "/tmp/vmt/data/hello.txt", "no symlink target: {link}");
    Ok(())
}

/// Two files whose paths have the same length, a path file for the unfaulted open, and a
/// directory path longer than an event holds; returns (a, b, pathfile, long directory).
fn naming_fixture() -> Result<(String, String, String, String), String> {
    let (a, b) = ("/tmp/vmt/data/aaaa.txt".to_string(), "/tmp/vmt/data/bbbb.txt".to_string());
    std::fs::write(&a, "A\n").map_err(|e| e.to_string())?;
    std::fs::write(&b, "B\n").map_err(|e| e.to_string())?;
    let pathfile = "/tmp/vmt/data/pathfile".to_string();
    std::fs::write(&pathfile, format!("{a}\0")).map_err(|e| e.to_string())?;
    let mut long = "/tmp/vmt/out".to_string();
    for i in 0..8 {
        long.push_str(&format!("/{}{i}", "d".repeat(39)));
    }
    std::fs::create_dir_all(&long).map_err(|e| e.to_string())?;
    std::fs::write(format!("{long}/leaf.txt"), "L\n").map_err(|e| e.to_string())?;
    Ok((a, b, pathfile, long))
}

/// The path-swap race, a path in a page not yet faulted in, an open relative to a directory
/// fd and a path longer than an event: each record names the file really opened.
fn opens_are_named_by_what_was_opened(ctx: &Ctx) -> Result<(), Fail> {
    let (a, b, pathfile, long) = naming_fixture()?;
    let m = ctx.sh_manifest("naming", "[tools.sh.limits]\ntimeout_ms = 120000\n");
    let races = 2000;
    let call = ctx.sh(
        &m,
        &format!(
            "{PATHS} race {a} {b} {races}; {PATHS} unfaulted {pathfile}; {PATHS} at /tmp/vmt/data bbbb.txt; \
             cd {long} && cat ./leaf.txt"
        ),
    );
    bpf_layer(&call)?;
    let out = call.stdout().to_string();
    let lines: Vec<&str> = out.lines().collect();
    check!(lines.len() == races + 3, "unexpected output: {}", call.brief());
    check!(call.json["events"]["lost"] == 0, "events lost: {}", call.json["events"]);
    let recs = ctx.records(call.call_id());
    let ok = |r: &&Value| r["kind"] == "open" && r["details"]["result"].as_i64().is_none_or(|v| v >= 0);
    let of_ab: Vec<&Value> = recs
        .iter()
        .filter(ok)
        .filter(|r| r["details"]["path"] == a.as_str() || r["details"]["path"] == b.as_str())
        .collect();
    let truth: Vec<&str> = lines[..races]
        .iter()
        .filter_map(|l| l.strip_prefix("opened "))
        .map(|l| if l == "A" { a.as_str() } else { b.as_str() })
        .collect();
    check!(of_ab.len() >= truth.len() + 2, "{} records for {} opens", of_ab.len(), truth.len());
    let wrong = truth.iter().zip(&of_ab).filter(|(t, r)| r["details"]["path"] != **t).count();
    eprintln!("    path-swap race: {} opens, {wrong} records naming another file", truth.len());
    check!(wrong == 0, "{wrong} of {} records name a file that was not opened", truth.len());
    check!(of_ab.iter().all(|r| r["details"]["path_source"] == "kernel"), "a record not named by the kernel");
    check!(of_ab[truth.len()]["details"]["path"] == a.as_str(), "the unfaulted open: {}", of_ab[truth.len()]);
    check!(of_ab[truth.len() + 1]["details"]["path"] == b.as_str(), "the relative open: {}", of_ab[truth.len() + 1]);
    let leaf = recs.iter().filter(ok).find(|r| r["details"]["path"].as_str().is_some_and(|p| p.ends_with("/leaf.txt")));
    check!(leaf.is_some(), "no record of the long path");
    let leaf = leaf.cloned().unwrap_or_default();
    let d = &leaf["details"];
    check!(d["path_truncated"] == true && d["path"].as_str().is_some_and(|p| p.starts_with("…/")), "long path: {leaf}");
    Ok(())
}

/// Anonymous memory made executable: refused without `allow_jit` (and recorded where a hook
/// or the syscall's result shows it), allowed and recorded (LSM) with it.
fn memory_made_executable_is_recorded(ctx: &Ctx) -> Result<(), Fail> {
    let m = ctx.sh_manifest("wx", "");
    let call = ctx.sh(&m, &format!("{PATHS} anon-exec"));
    bpf_layer(&call)?;
    let out = call.stdout();
    check!(!out.contains("mprotect=ok") && !out.contains("mmap_wx=ok"), "W^X memory was allowed: {}", call.brief());
    let lsm = call.json["enforcement"]["bpf"]["layer"] == "lsm";
    let denied = ctx.find(&call, "exec", "denied");
    let by_op = |op: &str| denied.iter().find(|r| r["details"]["operation"] == op).cloned();
    // The kernel's memory-deny-write-execute refuses mprotect before any LSM hook: the record
    // comes from the syscall's result. seccomp's W^X filter (kernels before 6.3) refuses
    // before even the tracepoints.
    if out.contains("mprotect=EACCES") {
        let r = by_op("mprotect");
        check!(r.as_ref().is_some_and(|r| r["details"]["by"] == "kernel"), "no refused mprotect record: {denied:?}");
    }
    if lsm && call.json["enforcement"]["write_execute"] == "prctl" {
        let r = by_op("mmap");
        check!(
            out.contains("mmap_wx=EPERM")
                && r.as_ref()
                    .is_some_and(|r| r["details"]["memory"] == "anonymous" && r["details"]["writable"] == true),
            "no denied anonymous mmap record: {out} {:?}",
            ctx.records(call.call_id()).iter().filter(|r| r["kind"] == "exec").collect::<Vec<_>>()
        );
    }
    if !lsm {
        return Ok(());
    }
    let m = ctx.sh_manifest("jit", "");
    let text = std::fs::read_to_string(&m).map_err(|e| e.to_string())?;
    std::fs::write(&m, text.replace("[tools.sh.fs]", "allow_jit = true\n[tools.sh.fs]")).map_err(|e| e.to_string())?;
    let call = ctx.sh(&m, &format!("{PATHS} anon-exec"));
    let out = call.stdout();
    check!(out.contains("mprotect=ok") && out.contains("mmap_wx=ok"), "allow_jit did not allow: {}", call.brief());
    let allowed = ctx.find(&call, "exec", "allowed");
    for op in ["mprotect", "mmap"] {
        check!(
            allowed.iter().any(|r| r["details"]["operation"] == op && r["details"]["memory"] == "anonymous"),
            "no allowed anonymous {op} record: {allowed:?}"
        );
    }
    Ok(())
}

fn audit_log_verifies(ctx: &Ctx) -> Result<(), Fail> {
    let out = Command::new(&ctx.agentd)
        .args(["audit", "verify"])
        .arg(&ctx.audit)
        .output()
        .map_err(|e| format!("running agentd audit verify: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    check!(out.status.success(), "audit verify failed: {text}");
    Ok(())
}
