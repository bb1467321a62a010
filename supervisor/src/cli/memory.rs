//! `agentd memory ingest|query|stats`: an agent's memory store from the command line.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use agentd_memory::embed::Embedder;
use agentd_memory::store::{Limits, Store};
use agentd_memory::{ingest, MemoryError, Provenance, Source};

/// Size limits of a store, per agent: beyond them the oldest L3 items are evicted (counted
/// in `stats`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct LimitArgs {
    /// Most L3 items in the store.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_items)]
    pub memory_max_items: u64,
    /// Most megabytes of L3 text and vectors in the store.
    #[arg(long, value_name = "MB", default_value_t = Limits::default().max_bytes >> 20)]
    pub memory_max_mb: u64,
}

impl LimitArgs {
    pub(crate) fn limits(self) -> Limits {
        Limits {
            max_items: self.memory_max_items,
            max_bytes: self.memory_max_mb.saturating_mul(1 << 20),
            ..Limits::default()
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum MemoryCommand {
    /// Split, embed and store text files (each in one transaction).
    Ingest {
        /// The store's directory (created if missing).
        #[arg(long)]
        store: PathBuf,
        /// Text files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print one JSON report instead of lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// The K stored items most similar to TEXT, with score, source and provenance.
    Query {
        /// The store's directory.
        #[arg(long)]
        store: PathBuf,
        /// How many.
        #[arg(long, default_value_t = 5)]
        k: usize,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
        /// What to look for.
        text: String,
    },
    /// Counts per tier, bytes and compression ratios.
    Stats {
        /// The store's directory.
        #[arg(long)]
        store: PathBuf,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: MemoryCommand) -> i32 {
    let result = match cmd {
        MemoryCommand::Ingest { store, files, json, limits } => ingest_files(&store, &files, json, limits.limits()),
        MemoryCommand::Query { store, k, json, text } => query(&store, k, json, &text),
        MemoryCommand::Stats { store, json } => stats(&store, json),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentd: memory: {e}");
            1
        }
    }
}

/// Opens an existing store (query and stats never create one).
fn open_existing(dir: &Path) -> Result<Store, MemoryError> {
    if !dir.join(agentd_memory::store::FILE).is_file() {
        return Err(MemoryError::Store {
            path: dir.display().to_string(),
            reason: "no memory store here (agentd memory ingest creates one)".into(),
        });
    }
    Store::open(dir, Limits::default())
}

fn ingest_files(dir: &Path, files: &[PathBuf], json: bool, limits: Limits) -> Result<(), MemoryError> {
    // Read everything first: a missing file fails the command before anything is stored.
    let mut texts = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| MemoryError::Io { path: f.display().to_string(), source: e })?;
        let text = String::from_utf8(bytes).map_err(|e| MemoryError::Io {
            path: f.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not UTF-8 text: {e}")),
        })?;
        texts.push(text);
    }
    let mut store = Store::open(dir, limits)?;
    let embedder = Embedder::load()?;
    let origin = format!("ingest-{}", uuid::Uuid::now_v7());
    let mut reports = Vec::new();
    for (f, text) in files.iter().zip(&texts) {
        let started = std::time::Instant::now();
        let provenance = Provenance::now(Source::File { path: f.display().to_string() }, &origin);
        let r = ingest::ingest(&mut store, &embedder, text, &provenance)?;
        let secs = started.elapsed().as_secs_f64();
        if !json {
            eprintln!(
                "agentd: memory: {}: {} sentences, {} segments (L2, {:.0}% of the bytes kept), {} items (L3), {:.1} s",
                f.display(),
                r.sentences,
                r.segments,
                100.0 * r.compressed_bytes as f64 / r.bytes.max(1) as f64,
                r.items,
                secs
            );
        }
        reports.push(serde_json::json!({ "file": f.display().to_string(), "report": r, "seconds": secs }));
    }
    if json {
        outln!("{}", serde_json::json!({ "store": dir.display().to_string(), "origin": origin, "files": reports }));
    }
    Ok(())
}

fn query(dir: &Path, k: usize, json: bool, text: &str) -> Result<(), MemoryError> {
    let store = open_existing(dir)?;
    let embedder = Embedder::load()?;
    let v = embedder.embed(&[text])?.pop().unwrap_or_default();
    let hits = store.search(&v, k)?;
    if json {
        let rows: Vec<serde_json::Value> = hits
            .iter()
            .map(|(score, item)| {
                serde_json::json!({
                    "score": score, "id": item.id, "text": item.text, "segment": item.segment,
                    "provenance": item.provenance,
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    for (score, item) in &hits {
        outln!("{score:.3}  #{}  {}  [{}]", item.id, item.text, item.provenance.source);
    }
    Ok(())
}

fn stats(dir: &Path, json: bool) -> Result<(), MemoryError> {
    let s = open_existing(dir)?.stats()?;
    if json {
        outln!("{}", serde_json::to_string(&s).unwrap_or_default());
        return Ok(());
    }
    outln!("store {}  ({} bytes on disk)", dir.display(), s.file_bytes);
    outln!(
        "  L2 semantic RAM   {} segments, {} bytes from {} (ratio min {:.2}, mean {:.2}, max {:.2}); {} retired",
        s.l2_items,
        s.l2_bytes,
        s.l2_original_bytes,
        s.l2_ratio_min,
        s.l2_ratio_mean,
        s.l2_ratio_max,
        s.l2_retired
    );
    outln!(
        "  L3 vector store   {} items, {} text bytes, {} vector bytes; {} evicted by the limits",
        s.l3_items,
        s.l3_text_bytes,
        s.l3_vector_bytes,
        s.l3_evicted
    );
    Ok(())
}
