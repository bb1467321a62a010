//! The memory an `agentd run` uses: before each model turn, the L3 items most like the
//! current step, with the L2 segment each belongs to, that this run has not shown yet; and
//! every piece of the conversation stored with its provenance as it happens.

use std::collections::HashSet;

use agentd_memory::embed::Embedder;
use agentd_memory::store::Store;
use agentd_memory::{ingest, Provenance, Source};
use agentd_model::{prompt, AgentError};

use super::run::Recall;

/// Items recalled per step.
const K: usize = 3;
/// Below this similarity an item is not relevant enough to spend context on.
const MIN_SCORE: f32 = 0.35;
/// Longest recalled text, in bytes.
const ITEM_BYTES: usize = 400;

/// An agent's store and embedder, for one run.
#[derive(Debug)]
pub struct AgentMemory {
    store: Store,
    embedder: Embedder,
    origin: String,
    shown: HashSet<u64>,
    /// Texts already shown: the same words stored twice (two runs' answers) are shown once.
    texts: HashSet<String>,
}

fn err(e: impl std::fmt::Display) -> AgentError {
    AgentError::Model(format!("memory: {e}"))
}

fn cut(s: &str) -> String {
    if s.len() <= ITEM_BYTES {
        return s.to_string();
    }
    let mut end = ITEM_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// An item as the prompt shows it: its text (cut) and where and when it came from.
fn recalled(p: &Provenance, text: &str) -> prompt::Recalled {
    prompt::Recalled { source: p.source.to_string(), origin: p.origin.clone(), stored_ms: p.stored_ms, text: cut(text) }
}

impl AgentMemory {
    /// Memory backed by `store`, for the run `origin`.
    pub fn new(store: Store, embedder: Embedder, origin: String) -> Self {
        Self { store, embedder, origin, shown: HashSet::new(), texts: HashSet::new() }
    }
}

impl Recall for AgentMemory {
    fn recall(&mut self, query: &str) -> Result<String, AgentError> {
        let v = self.embedder.embed(&[query]).map_err(err)?.pop().unwrap_or_default();
        let mut blocks = Vec::new();
        for (score, item) in self.store.search(&v, K * 3).map_err(err)? {
            if blocks.len() >= K * 2 || score < MIN_SCORE || !self.shown.insert(item.id) {
                continue;
            }
            // The segment it came from, compressed, when that holds the item and says more;
            // an item whose segment was already shown adds nothing.
            if let Some(seg) = item.segment.and_then(|id| self.store.get(id).ok().flatten()) {
                if seg.text != item.text && seg.text.contains(&item.text) && seg.text.len() <= ITEM_BYTES {
                    if self.shown.insert(seg.id) && self.texts.insert(seg.text.clone()) {
                        blocks.push(recalled(&seg.provenance, &seg.text));
                    }
                    continue;
                }
            }
            if self.texts.insert(item.text.clone()) {
                blocks.push(recalled(&item.provenance, &item.text));
            }
        }
        Ok(prompt::memory_blocks(&blocks))
    }

    fn remember(&mut self, text: &str, source: Source) -> Result<(), AgentError> {
        let provenance = Provenance::now(source, &self.origin);
        ingest::ingest(&mut self.store, &self.embedder, text, &provenance).map_err(err)?;
        Ok(())
    }
}
