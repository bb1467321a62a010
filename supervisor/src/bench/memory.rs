//! `agentd bench memory`: needle in a haystack. Facts are planted at 10 evenly spaced
//! positions of a long generated history, the history goes through the memory pipeline
//! (slicing, embedding, the store), and each fact is asked for in other words: recall@5 per
//! position, against a baseline that keeps only the most recent window of the history (what
//! a context window alone remembers). Also the embedding throughput.

use std::time::Instant;

use serde::Serialize;

use agentd_memory::embed::Embedder;
use agentd_memory::store::{Limits, Store};
use agentd_memory::{ingest, Provenance, Source};

/// Positions (tenths of the history) where facts are planted.
const POSITIONS: usize = 10;

/// Facts and the questions that ask for them in other words. `{}` is a per-trial value.
const NEEDLES: [(&str, &str); 10] = [
    ("The vault code for project Heron is {}.", "What is the access code of the Heron project's vault?"),
    (
        "Ingrid Solberg approved a budget of {} euros for the lab move.",
        "How much money did Ingrid sign off for moving the lab?",
    ),
    (
        "The staging cluster lives in rack {} of the Leeds data centre.",
        "Which rack in Leeds holds the staging cluster?",
    ),
    ("Our supplier Norrvik ships pallets every {} days.", "How often does Norrvik deliver pallets?"),
    ("The wifi password in the Oslo office is otter{}.", "What is the Oslo office wireless password?"),
    ("Dr. Achebe's clinic opens at {} on Saturdays.", "When does the Achebe clinic open on Saturday?"),
    ("Release 7 was delayed by {} weeks because of the audit.", "How long did the audit push back release 7?"),
    ("The greenhouse sensor alarm triggers above {} degrees.", "At what temperature does the greenhouse alarm go off?"),
    ("Tomasz parked the company van on level {} of the garage.", "On which garage level is the company van?"),
    ("The escrow account number ends in {}.", "What are the last digits of the escrow account?"),
];

/// Filler that looks like an agent's working history.
fn filler(rng: &mut u64, n: usize) -> String {
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let services = ["api-gateway", "billing-worker", "search-indexer", "mailer", "auth", "thumbnailer"];
    let verbs = ["restarted", "scaled up", "paused", "redeployed", "patched", "drained"];
    let mut out = String::new();
    for _ in 0..n {
        let (a, b, c) = (next(), next(), next());
        let line = match a % 6 {
            0 => format!(
                "The {} service was {} after {} failed health checks.",
                services[(b % 6) as usize],
                verbs[(c % 6) as usize],
                b % 40
            ),
            1 => format!("The user asked for a summary of ticket {} and I listed its {} comments.", b % 9000, c % 30),
            2 => format!("Disk usage on node-{} reached {} percent, so old logs were compressed.", b % 64, 50 + c % 50),
            3 => {
                format!("I ran the test suite for module {} and {} of {} tests passed.", b % 300, c % 100, 100 + c % 50)
            }
            4 => format!("The nightly report showed {} new sign-ups and {} cancellations.", b % 500, c % 80),
            _ => "Okay, I will keep going with the next step of the plan.".to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[derive(Debug, Serialize)]
struct Report {
    trials: usize,
    history_tokens: usize,
    sentences_per_trial: usize,
    recall_at_5: Vec<f64>,
    baseline_recall: Vec<f64>,
    baseline_window_tokens: usize,
    embed_sentences_per_s: f64,
    seconds: f64,
}

pub(crate) fn run(trials: usize, tokens: usize, window: usize, json: bool) -> Result<(), String> {
    let started = Instant::now();
    let embedder = Embedder::load().map_err(|e| e.to_string())?;
    let mut hits = vec![0usize; POSITIONS];
    let mut base = vec![0usize; POSITIONS];
    let (mut embedded, mut embed_secs, mut history_tokens, mut sentences) = (0usize, 0f64, 0usize, 0usize);
    for trial in 0..trials {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (trial as u64 + 1);
        // About 15 tokens per filler line; the total is measured below.
        let per = (tokens / 15 + 1) / POSITIONS + 1;
        let mut history = String::new();
        let mut planted = Vec::new();
        for (fact, _) in NEEDLES.iter().take(POSITIONS) {
            history.push_str(&filler(&mut rng, per / 2));
            let value = format!("{}", 1000 + (rng % 9000) + trial as u64);
            planted.push((fact.replace("{}", &value), history.lines().count()));
            history.push_str(&planted.last().map(|p| p.0.clone()).unwrap_or_default());
            history.push('\n');
            history.push_str(&filler(&mut rng, per - per / 2));
        }
        let lines: Vec<&str> = history.lines().collect();
        let counts = embedder.count_tokens(&lines).map_err(|e| e.to_string())?;
        history_tokens = counts.iter().sum();
        // The baseline remembers the last `window` tokens: the lines from `first` on.
        let mut first = lines.len();
        let mut kept = 0;
        for i in (0..lines.len()).rev() {
            kept += counts[i];
            if kept > window {
                break;
            }
            first = i;
        }
        let dir = std::env::temp_dir().join(format!("agentd-bench-memory-{}-{trial}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = Store::open(&dir, Limits::default()).map_err(|e| e.to_string())?;
        let prov = Provenance { source: Source::Task, origin: "bench".into(), stored_ms: 0 };
        let before = embedder.counters();
        let r = ingest::ingest(&mut store, &embedder, &history, &prov).map_err(|e| e.to_string())?;
        let after = embedder.counters();
        embedded += after.0 - before.0;
        embed_secs += (after.1 - before.1).as_secs_f64();
        sentences = r.sentences;
        for (p, ((sentence, line), (_, question))) in planted.iter().zip(NEEDLES.iter()).enumerate() {
            let q = embedder.embed(&[question]).map_err(|e| e.to_string())?.pop().unwrap_or_default();
            let found = store.search(&q, 5).map_err(|e| e.to_string())?;
            hits[p] += usize::from(found.iter().any(|(_, item)| item.text == *sentence));
            base[p] += usize::from(*line >= first);
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("agentd: bench memory: trial {}/{trials} done ({:.0} s)", trial + 1, started.elapsed().as_secs_f64());
    }
    let frac = |v: &[usize]| v.iter().map(|h| *h as f64 / trials.max(1) as f64).collect::<Vec<_>>();
    let report = Report {
        trials,
        history_tokens,
        sentences_per_trial: sentences,
        recall_at_5: frac(&hits),
        baseline_recall: frac(&base),
        baseline_window_tokens: window,
        embed_sentences_per_s: embedded as f64 / embed_secs.max(1e-9),
        seconds: started.elapsed().as_secs_f64(),
    };
    if json {
        outln!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    outln!(
        "needle in a haystack: {} trials, {} tokens of history ({} sentences), facts at {} positions",
        trials,
        report.history_tokens,
        report.sentences_per_trial,
        POSITIONS
    );
    outln!("{:<10} {:>12} {:>28}", "position", "recall@5", format!("last {window} tokens only"));
    for p in 0..POSITIONS {
        outln!(
            "{:<10} {:>12.2} {:>28.2}",
            format!("{}%", p * 10 + 5),
            report.recall_at_5[p],
            report.baseline_recall[p]
        );
    }
    outln!(
        "embedding: {:.0} sentences/s (target >= 150); recall target >= 0.95 at every position",
        report.embed_sentences_per_s
    );
    Ok(())
}
