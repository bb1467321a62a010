//! A supervisor killed with SIGKILL leaves nothing behind: its tool stops, and the next agentd
//! removes its cgroups and BPF registration.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_tests::{agentd_bin, audit_log_for, leftover_cgroups, processes_with, sandbox_ready, sh, token, Fixture};

/// The tool's processes (`/bin/sh -c ...MARKER`), not agentd's, whose arguments name it too.
fn tools_with(marker: &str) -> Vec<u32> {
    processes_with(marker)
        .into_iter()
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"/bin/sh\0")))
        .collect()
}

/// Waits up to `limit` for `done`.
fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// The id of the last call started in `manifest`'s audit log.
fn last_call_id(manifest: &std::path::Path) -> String {
    let log = std::fs::read_to_string(audit_log_for(manifest)).unwrap_or_default();
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "call_start")
        .find_map(|r| r["call_id"].as_str().map(String::from))
        .unwrap_or_default()
}

#[test]
fn a_killed_exec_leaves_no_process_cgroup_or_registration() {
    if !sandbox_ready("a_killed_exec_leaves_no_process_cgroup_or_registration") {
        return;
    }
    let fx = Fixture::new("killexec");
    let m = fx.manifest("");
    let marker = token("KILLED-EXEC");
    let mut exec = Command::new(agentd_bin())
        .args(["exec", "--json", "--audit-log"])
        .arg(audit_log_for(&m))
        .arg("--manifest")
        .arg(&m)
        .args(["--tool", "sh", "--arg"])
        .arg(format!("command=sleep 30; echo {marker}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("agentd exec");
    assert!(wait_for(Duration::from_secs(10), || !tools_with(&marker).is_empty()), "the tool never started");
    let call_id = last_call_id(&m);
    assert!(!call_id.is_empty());
    let _ = exec.kill();
    let _ = exec.wait();
    assert!(wait_for(Duration::from_secs(5), || tools_with(&marker).is_empty()), "the tool outlived agentd exec");
    // The next call cleans up what the killed one left.
    let r = sh(&m, "echo next");
    assert_eq!(r.stdout(), "next\n", "{}", r.json);
    assert_eq!(leftover_cgroups(&call_id), Vec::<std::path::PathBuf>::new(), "cgroups of the killed call remain");
    // The audit log shows a call that started and never ended.
    let out =
        agentd_tests::agentd(["audit".as_ref(), "verify".as_ref(), "--json".as_ref(), audit_log_for(&m).as_os_str()]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    assert_eq!(report["unfinished_calls"], serde_json::json!([call_id]), "{report}");
}

/// An OpenAI-style server that answers every request with one reply: a call of tool `sh`.
fn scripted_model(command: &str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let content =
        format!("<tool_call>\n{{\"name\": \"sh\", \"arguments\": {{\"command\": \"{command}\"}}}}\n</tool_call>");
    let body =
        serde_json::json!({ "choices": [{ "message": { "role": "assistant", "content": content } }] }).to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut req = vec![0u8; len];
            let _ = reader.read_exact(&mut req);
            let mut s = reader.into_inner();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn a_killed_run_takes_its_tool_with_it() {
    if !sandbox_ready("a_killed_run_takes_its_tool_with_it") {
        return;
    }
    let fx = Fixture::new("killrun");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 60000\n");
    let marker = token("KILLED-RUN");
    let port = scripted_model(&format!("sleep 30; echo {marker}"));
    let mut run = Command::new(agentd_bin())
        .args(["run", "--json", "--backend", "openai", "--model", "scripted", "--endpoint"])
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .arg("--manifest")
        .arg(&m)
        .arg("--audit-log")
        .arg(audit_log_for(&m))
        .args(["--task", "wait a while"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agentd run");
    assert!(wait_for(Duration::from_secs(15), || !tools_with(&marker).is_empty()), "the tool never started");
    let _ = run.kill();
    let _ = run.wait();
    assert!(
        wait_for(Duration::from_secs(5), || tools_with(&marker).is_empty()),
        "the tool kept running after agentd run was killed: {:?}",
        tools_with(&marker)
    );
}
