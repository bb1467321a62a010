//! `agentd bench serve`: the daemon under load.
//!
//! 1. **Scripted model, N concurrent agents** (N = 1, 10, 60, 200 by default): a real
//!    `agentd serve` (this binary) with the scripted backend, each task making `calls`
//!    sandboxed calls of `/bin/true`. All N tasks are submitted at once over the API. From
//!    the task store afterwards: sandboxed calls per second (first call to last result),
//!    each call's latency from the loop asking for it to its result (queueing in the pool
//!    included), p50 and p99, and lost audit events: events the BPF layer counted as lost,
//!    plus calls with no summary in the audit log.
//!    Beside it, the host's floor for the same shape of work: `workers` loops of util-linux
//!    `unshare` starting `/bin/true` in a user, pid, mount, ipc, uts, network and cgroup
//!    namespace, with none of agentd's cgroups, mounts, Landlock, seccomp, audit or store.
//!    What a call costs above the kernel's share is then visible on any host.
//! 2. **The embedded model, batched**: 1, 4 and 16 conversations decode together through the
//!    daemon's model thread, against the same conversations one after another: aggregate
//!    decode tokens per second and the ratio.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::serve::store::Store;
use agentd_model::batch::Batcher;
use agentd_model::fetch;
use agentd_model::llm::Llm;
use agentd_model::weights::Weights;

/// Runs the benchmark.
pub fn run(agents: &[usize], calls: usize, workers: usize, model: bool, json_out: bool) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("agentd-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut rows = Vec::new();
    for &n in agents {
        if !json_out {
            eprintln!("agentd: bench serve: {n} agents x {calls} calls...");
        }
        let row = scripted(&dir.join(format!("n{n}")), n, calls, workers)?;
        if !json_out {
            print_row(&row);
        }
        rows.push(row);
    }
    let batched = if model { Some(batched(json_out)?) } else { None };
    // Last: the kernel tears its namespaces down for a while after.
    let floor = floor(workers, Duration::from_secs(3));
    if !json_out {
        print_floor(&floor, &rows);
    }
    let floor = floor.ok();
    let _ = std::fs::remove_dir_all(&dir);
    if json_out {
        outln!("{}", json!({ "scripted": rows, "floor_per_s": floor, "batched": batched }));
    }
    Ok(())
}

fn print_row(r: &Value) {
    outln!(
        "  {:>4} agents: {:>6.1} calls/s; latency (queue + call) p50 {:>6.1} ms p99 {:>6.1} ms; in the sandbox p50 {:>5.1} ms p99 {:>5.1} ms; {} calls, {} failed, lost audit events {}",
        r["agents"], r["calls_per_s"].as_f64().unwrap_or(0.0), r["p50_ms"].as_f64().unwrap_or(0.0),
        r["p99_ms"].as_f64().unwrap_or(0.0), r["sandbox_p50_ms"].as_f64().unwrap_or(0.0),
        r["sandbox_p99_ms"].as_f64().unwrap_or(0.0), r["calls"], r["failed_calls"], r["lost_audit_events"]
    );
}

fn print_floor(floor: &Result<f64, String>, rows: &[Value]) {
    let floor = match floor {
        Ok(f) => *f,
        Err(why) => {
            outln!("  floor: not measured ({why})");
            return;
        }
    };
    let best = rows.iter().filter_map(|r| r["calls_per_s"].as_f64()).fold(0.0, f64::max);
    outln!(
        "  floor: {floor:>6.1} sandboxes/s of bare namespaces + exec of /bin/true (`unshare`, no cgroups, \
         mounts, Landlock, seccomp, audit or store); agentd's best calls/s: {:.2} of it",
        best / floor
    );
}

/// Bare namespaces from `loops` parallel loops for `time`: starts per second. Each start
/// also execs `unshare` itself, so the true floor is higher. Any failed start voids it.
fn floor(loops: usize, time: Duration) -> Result<f64, String> {
    let args = ["--user", "--map-root-user", "--pid", "--mount", "--ipc", "--uts", "--net", "--cgroup", "--fork"];
    let once = || {
        std::process::Command::new("unshare")
            .args(args)
            .arg("/bin/true")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !once() {
        return Err("util-linux `unshare` could not start /bin/true in new namespaces here".into());
    }
    let started = Instant::now();
    let counts: Vec<(usize, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..loops.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut n = 0;
                    while started.elapsed() < time {
                        if !once() {
                            return (n, false);
                        }
                        n += 1;
                    }
                    (n, true)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or((0, false))).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let done: usize = counts.iter().map(|(n, _)| n).sum();
    match counts.iter().all(|(_, ok)| *ok) {
        true if done > 0 => Ok(done as f64 / secs),
        _ => Err(format!("a start failed after {done} in {secs:.1} s")),
    }
}

fn scripted(dir: &Path, n: usize, calls: usize, workers: usize) -> Result<Value, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let manifest = dir.join("agent.toml");
    std::fs::write(
        &manifest,
        "version = 1\n[agent]\nname = \"bench\"\n[tools.true]\ndescription = \"do nothing\"\nargv = [\"/bin/true\"]\n\
         [tools.true.fs]\nread = [\"/usr\", \"/etc/ld.so.cache\"]\nexec = [\"/usr/bin\", \"/usr/lib\"]\n\
         [tools.true.limits]\ntmp_mb = 0\n",
    )
    .map_err(|e| e.to_string())?;
    let socket = dir.join("agentd.sock");
    let audit = dir.join("audit.jsonl");
    let config = dir.join("agentd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 1\n[paths]\nsocket = \"{s}\"\nstate_dir = \"{d}/state\"\naudit_log = \"{a}\"\n\
             [model]\nbackend = \"scripted\"\ntool = \"true\"\ncalls = {calls}\n\
             [limits]\nmax_concurrent_calls = {w}\nmax_running_tasks = {n}\nmax_queued_tasks = {q}\n\
             [agents.bench]\nmanifest = \"{m}\"\nmax_concurrent_calls = {w}\nmax_queued_tasks = {q}\nmax_queued_per_uid = {q}\nmax_steps = {steps}\n\
             [api]\nmax_connections = {c}\nmax_connections_per_uid = {c}\n\
             [roles.bench]\nuids = [0]\nagents = [\"*\"]\n",
            s = socket.display(),
            d = dir.display(),
            a = audit.display(),
            m = manifest.display(),
            q = n.max(1),
            steps = calls + 1,
            w = workers,
            // Every task is submitted at once, on a connection of its own.
            c = n + 16,
        ),
    )
    .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut daemon = std::process::Command::new(exe)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting agentd serve: {e}"))?;
    let result = drive(&socket, n);
    let _ = std::process::Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let _ = daemon.wait();
    let (started, ids) = result?;
    measure(dir, &audit, n, &ids, started)
}

/// Submits `n` tasks at once and waits for them all to end.
fn drive(socket: &Path, n: usize) -> Result<(Instant, Vec<String>), String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(60);
        while tokio::net::UnixStream::connect(socket).await.is_err() {
            if Instant::now() > until {
                return Err("agentd serve did not start".to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = Instant::now();
        let submits = (0..n).map(|i| {
            let s = socket.to_path_buf();
            tokio::spawn(async move {
                let body = json!({ "agent": "bench", "task": format!("task {i}") });
                crate::serve::client::get_json(&s, hyper::Method::POST, "/v1/tasks", Some(body))
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        let mut ids = Vec::new();
        for h in submits.collect::<Vec<_>>() {
            let v = h.await.map_err(|e| e.to_string())??;
            ids.push(v["id"].as_str().unwrap_or_default().to_string());
        }
        let until = Instant::now() + Duration::from_secs(600);
        loop {
            let v = crate::serve::client::get_json(socket, hyper::Method::GET, "/v1/status", None)
                .await
                .map_err(|e| e.to_string())?;
            if v["queued_tasks"] == 0 && v["running_tasks"] == 0 {
                break;
            }
            if Instant::now() > until {
                return Err("the tasks did not finish in 10 minutes".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((started, ids))
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn measure(dir: &Path, audit: &Path, n: usize, ids: &[String], started: Instant) -> Result<Value, String> {
    let store = Store::open(&dir.join("state")).map_err(|e| e.to_string())?;
    let mut lat = Vec::new();
    let (mut first, mut last) = (u64::MAX, 0u64);
    let mut failed_tasks = 0;
    for id in ids {
        let t = store.task(id).map_err(|e| e.to_string())?.ok_or("a task is missing from the store")?;
        if t.state != crate::serve::store::State::Succeeded {
            failed_tasks += 1;
        }
        let events = store.events(id, 0).map_err(|e| e.to_string())?;
        let mut open = std::collections::HashMap::new();
        for e in &events {
            let call = e.data["call_id"].as_str().unwrap_or_default().to_string();
            match e.kind.as_str() {
                "tool_call" => {
                    first = first.min(e.at_ms);
                    open.insert(call, e.at_ms);
                }
                "tool_result" => {
                    last = last.max(e.at_ms);
                    if let Some(s) = open.remove(&call) {
                        lat.push((e.at_ms - s) as f64);
                    }
                }
                _ => {}
            }
        }
    }
    let mut calls = Vec::new();
    store.each_call(|c| calls.push(c)).map_err(|e| e.to_string())?;
    let mut sandbox: Vec<f64> = calls.iter().filter_map(|c| c.duration_ms).map(|d| d as f64).collect();
    sandbox.sort_by(f64::total_cmp);
    let failed_calls = calls.iter().filter(|c| c.exit_code != Some(0)).count();
    let lost_bpf: u64 = calls.iter().filter_map(|c| c.events.as_ref()?["lost"].as_u64()).sum();
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    let summaries: std::collections::HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["kind"] == "summary")
        .filter_map(|r| r["call_id"].as_str().map(str::to_string))
        .collect();
    let unrecorded = calls.iter().filter(|c| !summaries.contains(&c.call_id)).count() as u64;
    lat.sort_by(f64::total_cmp);
    let span_s = (last.saturating_sub(first) as f64 / 1000.0).max(1e-3);
    Ok(json!({
        "agents": n, "calls": calls.len(), "failed_calls": failed_calls, "failed_tasks": failed_tasks,
        "calls_per_s": calls.len() as f64 / span_s, "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
        "sandbox_p50_ms": percentile(&sandbox, 0.5), "sandbox_p99_ms": percentile(&sandbox, 0.99),
        "wall_s": started.elapsed().as_secs_f64(), "lost_audit_events": lost_bpf + unrecorded,
        "calls_without_summary": unrecorded,
    }))
}

/// Aggregate decode tokens/s of k conversations through the model thread, together and one
/// after another.
fn batched(json_out: bool) -> Result<Value, String> {
    let path: PathBuf = fetch::embedded_model().map_err(|e| e.to_string())?;
    let weights = Arc::new(Weights::load(&path).map_err(|e| e.to_string())?);
    let batcher = Batcher::start(Arc::clone(&weights), 16, 64 << 20).map_err(|e| e.to_string())?;
    let decode = 32usize;
    let prompt = |k: usize| -> Vec<u32> { (0..120).map(|i| 200 + ((i * 37 + k * 101) % 20_000) as u32).collect() };
    // One conversation: prefill, wait at `gate` (all prefilled), then `decode` greedy steps;
    // returns when its decoding started and ended.
    let one = |k: usize, gate: Option<&std::sync::Barrier>| -> Result<(Instant, Instant), String> {
        let mut llm = Llm::new(Arc::clone(&weights), Some(batcher.clone()));
        let mut logits = llm.feed(&prompt(k)).map_err(|e| e.to_string())?;
        if let Some(g) = gate {
            g.wait();
        }
        let t = Instant::now();
        for _ in 0..decode {
            let next = (0..logits.len()).max_by(|a, b| logits[*a].total_cmp(&logits[*b])).unwrap_or(0) as u32;
            logits = llm.feed(&[next]).map_err(|e| e.to_string())?;
        }
        Ok((t, Instant::now()))
    };
    let mut out = Vec::new();
    for k in [1usize, 4, 16] {
        let mut serial = Duration::ZERO;
        for i in 0..k {
            let (a, b) = one(i, None)?;
            serial += b - a;
        }
        let gate = std::sync::Barrier::new(k);
        let spans: Vec<Result<(Instant, Instant), String>> = std::thread::scope(|s| {
            let (one, gate) = (&one, &gate);
            let hs: Vec<_> = (0..k).map(|i| s.spawn(move || one(i, Some(gate)))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".into()))).collect()
        });
        let spans = spans.into_iter().collect::<Result<Vec<_>, _>>()?;
        let start = spans.iter().map(|s| s.0).min().unwrap_or_else(Instant::now);
        let end = spans.iter().map(|s| s.1).max().unwrap_or_else(Instant::now);
        let tokens = (k * decode) as f64;
        let (ser, tog) = (tokens / serial.as_secs_f64(), tokens / (end - start).as_secs_f64());
        if !json_out {
            outln!(
                "  model, {k:>2} agents: decode {tog:>6.1} tok/s together, {ser:>6.1} tok/s one after another: {:.2}x",
                tog / ser
            );
        }
        out.push(json!({ "agents": k, "together_tps": tog, "serial_tps": ser, "ratio": tog / ser }));
    }
    Ok(json!(out))
}
