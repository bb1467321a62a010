//! The command-line contract: diagnostics, exit codes and refusals, through the real binary.

use std::fs;

use agentd_tests::{agentd, exec, sandbox_ready, sh, Fixture};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn policy_check_reports_every_error_with_position() {
    let fx = Fixture::new("check");
    let bad = fx.dir.join("bad.toml");
    fs::write(
        &bad,
        "version = 1\n[agent]\nname = \"x\"\n[tools.t]\nargv = [\"/bin/true\"]\n[tools.t.fs]\nraed = [\"/usr\"]\nwrite = [\"rel/path\"]\n[tools.t.limits]\npids = 0\n",
    )
    .expect("write");
    let good = fx.manifest("");
    let out = agentd(["policy".as_ref(), "check".as_ref(), good.as_os_str(), bad.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    let name = bad.display().to_string();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0]
            .starts_with(&format!("{name}:7:1: error: unknown key `tools.t.fs.raed`; did you mean `tools.t.fs.read`?")),
        "{err}"
    );
    assert!(lines[1].starts_with(&format!("{name}:8:10: error: ")) && lines[1].contains("relative"), "{err}");
    assert!(lines[2].starts_with(&format!("{name}:10:8: error: ")) && lines[2].contains("pids"), "{err}");
    let out = agentd(["policy".as_ref(), "check".as_ref(), good.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn policy_check_never_panics_on_garbage() {
    let fx = Fixture::new("garbage");
    let inputs: [&[u8]; 5] =
        [b"\xff\xfe\x00\x01", b"[[[[", b"version = 1\n[agent]\nname = 1\n[tools]\nx = 3", b"", &[b'a'; 70000]];
    for (i, bytes) in inputs.iter().enumerate() {
        let f = fx.dir.join(format!("g{i}.toml"));
        fs::write(&f, bytes).expect("write");
        let out = agentd(["policy".as_ref(), "check".as_ref(), f.as_os_str()]);
        assert_eq!(out.status.code(), Some(1), "input {i}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(": error: "), "input {i}: {}", text(&out.stderr));
    }
    let out = agentd(["policy", "check", "/nonexistent/manifest.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read"), "{}", text(&out.stderr));
}

#[test]
fn policy_explain_shows_the_plan() {
    let fx = Fixture::new("explain");
    let m = fx.manifest("[tools.sh.limits]\nmemory_mb = 100");
    let out = agentd(["policy".as_ref(), "explain".as_ref(), m.as_os_str(), "--tool".as_ref(), "sh".as_ref()]);
    let s = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for want in [
        "namespaces: user, pid, mount, ipc, uts, cgroup, net",
        "memory 100 MiB",
        "landlock: ABI",
        "/usr  bind ro,noexec",
        "/usr/bin  bind ro",
        "requirements:",
    ] {
        assert!(s.contains(want), "missing {want:?} in:\n{s}");
    }
    let out = agentd([
        "policy".as_ref(),
        "explain".as_ref(),
        m.as_os_str(),
        "--tool".as_ref(),
        "sh".as_ref(),
        "--json".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    assert_eq!(v["cgroup"]["memory_bytes"].as_u64(), Some(100 << 20));
    let out = agentd(["policy".as_ref(), "explain".as_ref(), m.as_os_str(), "--tool".as_ref(), "nope".as_ref()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("has: sh"));
}

#[test]
fn refusals_exit_125_with_a_reason() {
    if !sandbox_ready("refusals_exit_125_with_a_reason") {
        return;
    }
    let fx = Fixture::new("refuse");
    let cases = [
        ("[requires]\nlandlock_abi = 64", "landlock.fs is required"),
        ("[requires]\nbpf_lsm = true", "bpf_lsm is required"),
        ("[tools.sh.fs]\n", "TOML syntax"),
    ];
    for (extra, want) in cases {
        let r = exec(&fx.manifest(extra), "sh", &[("command", "echo SHOULD-NOT-RUN")], &[]);
        assert_eq!(r.code, 125, "{}", r.json);
        assert!(!r.stdout().contains("SHOULD-NOT-RUN"));
        let err = r.json["error"].as_str().unwrap_or_default();
        assert!(err.contains(want), "{want:?} not in {err:?}");
    }
    // A grant the call's uid cannot reach: the child's own setup error is what is reported.
    let private = fx.dir.join("private");
    fs::create_dir_all(private.join("inner")).expect("mkdir");
    fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let m = fx.manifest(&format!(
        "[tools.other]\nargv = [\"/bin/true\"]\n[tools.other.fs]\nread = [\"{}\"]",
        private.join("inner").display()
    ));
    let r = exec(&m, "other", &[], &[]);
    let err = r.json["error"].as_str().unwrap_or_default();
    assert_eq!(r.code, 125, "{}", r.json);
    assert!(err.contains("capturing") && err.contains("Permission denied"), "{err}");
    let m = fx.manifest("");
    let r = exec(&m, "sh", &[("command", "true"), ("bogus", "x")], &[]);
    assert_eq!(r.code, 125);
    let r = exec(&m, "nope", &[], &[]);
    assert!(r.json["error"].as_str().unwrap_or_default().contains("has: sh"), "{}", r.json);
    let r = exec(&fx.dir.join("missing.toml"), "sh", &[], &[]);
    assert_eq!(r.code, 125);
    let m = fx.manifest(&format!("[tools.sh.limits]\ntimeout_ms = 1000\n[tools.other]\nargv = [\"/bin/true\"]\n[tools.other.fs]\nread = [\"{}\"]", fx.path("does-not-exist")));
    let r = exec(&m, "other", &[], &[]);
    assert_eq!(r.code, 125);
    assert!(r.json["error"].as_str().unwrap_or_default().contains("does-not-exist"), "{}", r.json);
}

#[test]
fn exit_codes_follow_the_tool() {
    if !sandbox_ready("exit_codes_follow_the_tool") {
        return;
    }
    let fx = Fixture::new("codes");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 2000");
    assert_eq!(sh(&m, "exit 3").code, 3);
    let r = sh(&m, "kill -TERM $$");
    assert_eq!((r.code, r.json["signal"].as_i64()), (128 + 15, Some(15)), "{}", r.json);
    let r = sh(&m, "sleep 30");
    assert_eq!((r.code, r.json["timed_out"].as_bool()), (124, Some(true)));
    let r = exec(&m, "sh", &[], &["no-such-program"]);
    assert_eq!(r.code, 127, "{}", r.json);
    let r = exec(&m, "sh", &[], &["echo", "argv", "replaced"]);
    assert_eq!((r.code, r.stdout().as_str()), (0, "argv replaced\n"), "{}", r.json);
    let e = &r.json["enforcement"];
    assert_eq!(e["landlock"]["status"].as_str(), Some("full"), "{e}");
    assert_eq!(e["landlock"]["no_new_privs"].as_bool(), Some(true));
    let layer = e["bpf"]["layer"].as_str().unwrap_or_default();
    assert!(["lsm", "fallback", "none"].contains(&layer), "{e}");
    if layer == "none" {
        assert!(e["bpf"]["note"].is_string(), "a missing BPF layer must say why: {e}");
        agentd_tests::need("exit_codes_follow_the_tool", "bpf", false, e["bpf"]["note"].as_str().unwrap_or_default());
    }
    assert!(e["cgroup"]["version"].as_str().is_some_and(|v| v == "v2" || v == "hybrid"), "{e}");
    assert_eq!(e["namespaces"].as_array().map(Vec::len), Some(7), "{e}");
}

#[test]
fn a_reader_that_stops_reading_cannot_stall_the_timeout() {
    if !sandbox_ready("a_reader_that_stops_reading_cannot_stall_the_timeout") {
        return;
    }
    let fx = Fixture::new("slowreader");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 1000");
    let child = std::process::Command::new(agentd_tests::agentd_bin())
        .args(["exec", "--audit-log"])
        .arg(agentd_tests::audit_log_for(&m))
        .arg("--manifest")
        .arg(&m)
        .args(["--tool", "sh", "--arg", "command=head -c 600000 /dev/zero; while :; do :; done"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn agentd");
    // Nobody reads for a while: the call must still be killed at its timeout.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = child.wait_with_output().expect("agentd output");
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 600_000, "relayed output was lost");
    assert!(text(&out.stderr).contains("timed out after"), "{}", text(&out.stderr));
    let reported: u64 = text(&out.stderr)
        .split("timed out after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(reported < 2900, "the timeout fired only after the reader came back ({reported} ms)");
}

/// `agentd exec --manifest M --tool sh REST...` without `--json`.
fn streaming(manifest: &std::path::Path, rest: &[&str]) -> std::process::Output {
    let mut args: Vec<std::ffi::OsString> = vec![
        "exec".into(),
        "--audit-log".into(),
        agentd_tests::audit_log_for(manifest).into(),
        "--manifest".into(),
        manifest.into(),
        "--tool".into(),
        "sh".into(),
    ];
    args.extend(rest.iter().map(Into::into));
    agentd(args)
}

#[test]
fn streaming_mode_passes_output_through() {
    if !sandbox_ready("streaming_mode_passes_output_through") {
        return;
    }
    let fx = Fixture::new("stream");
    let m = fx.manifest("");
    let out = streaming(&m, &["--arg", "command=echo to-out; echo to-err >&2; exit 4"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert_eq!(text(&out.stderr), "to-err\n");
    let out = streaming(&m, &["--", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).starts_with("agentd: "), "{}", text(&out.stderr));
}
