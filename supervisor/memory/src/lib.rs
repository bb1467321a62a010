//! An agent's memory, in the supervisor process, persisted across runs:
//! - **L1**, the active context: the token window the model attends to (the agent loop, in the
//!   binary), with a budget; what no longer fits is paged out to L2 and L3, never dropped.
//! - **L2**, "semantic RAM": older material sliced into segments by topic, each compressed to
//!   its dense sentences (numbers, names, decisions, tool results), with its ratio.
//! - **L3**, a vector store: chunks embedded with all-MiniLM-L6-v2 ([`embed`]), searched
//!   exactly (brute force over unit vectors), persisted in a redb database ([`store`]).
//!
//! Every item records where it came from ([`Source`]). Tool output and ingested files are
//! untrusted: they are shown to the model as data in marked blocks, never as instructions.
//!
//! - [`embed`]: the embedding model;
//! - [`slice`]: semantic slicing and compression;
//! - [`ingest`]: from text to L2 segments and L3 items;
//! - [`store`]: the on-disk store, its limits and search;
//! - [`db`]: opening a redb file (the daemon's task store opens its own the same way).
//!
//! What `agentd run --memory` stores and recalls is the agent loop's (`agent::recall` in the
//! binary).

pub mod db;
pub mod embed;
pub mod ingest;
pub mod slice;
pub mod store;

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Why a memory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Getting, loading or running the embedding model.
    #[error("embedding model: {0}")]
    Model(String),
    /// The database.
    #[error("memory store {path}: {reason}")]
    Store {
        /// The store's directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

impl MemoryError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        MemoryError::Io { path: path.display().to_string(), source }
    }
}

/// Where a memory item came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// The user's task.
    Task,
    /// The model's own words.
    Model,
    /// A tool call's output.
    Tool {
        /// The call, as in the audit log.
        call_id: String,
        /// The tool.
        tool: String,
    },
    /// A file given to `agentd memory ingest`.
    File {
        /// Its path as given.
        path: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Task => f.write_str("task"),
            Source::Model => f.write_str("model"),
            Source::Tool { call_id, tool } => write!(f, "tool {tool}, call {call_id}"),
            Source::File { path } => write!(f, "file {path}"),
        }
    }
}

/// What was stored, with its origin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provenance {
    /// Where it came from.
    pub source: Source,
    /// The run or ingest that stored it.
    pub origin: String,
    /// When, in milliseconds since the epoch.
    pub stored_ms: u64,
}

impl Provenance {
    /// `source`, stored now by `origin`.
    pub fn now(source: Source, origin: &str) -> Self {
        let stored_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self { source, origin: origin.to_string(), stored_ms }
    }
}
