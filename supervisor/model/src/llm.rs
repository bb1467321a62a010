//! The in-process model: a llama-family GGUF run on candle, its tokenizer built from the
//! GGUF itself, and one conversation's KV cache.
//!
//! [`Llm::feed`] appends tokens to the context: the first call prefills the prompt, later
//! ones only the new tokens (a tool result, or one sampled token), so a tool call never
//! re-runs the prompt. The counters say how many tokens each phase processed.
//!
//! The weights ([`Weights`], [`crate::weights`]) are shared: `agentd serve` gives each task its
//! own [`Llm`] over one set of weights, and feeds through the batching scheduler
//! ([`crate::batch`]) instead of calling the model directly. While its agent waits on a tool, a conversation's cache
//! can be kept, written to disk, or dropped and recomputed from its tokens ([`Llm::park`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batch::Batcher;
use crate::forward::KvCache;
use crate::weights::{ModelInfo, Weights};
use crate::AgentError;

/// What the model processed, and how long it took.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    /// Tokens fed in batches (the prompt, and each tool result).
    pub prefill_tokens: u64,
    /// Time spent on them.
    #[serde(skip)]
    pub prefill_time: Duration,
    /// Tokens generated one at a time.
    pub decode_tokens: u64,
    /// Time spent on them.
    #[serde(skip)]
    pub decode_time: Duration,
    /// Batches fed (one per prefill).
    pub prefills: u64,
    /// Tokens processed again to rebuild a dropped KV cache.
    pub recomputed_tokens: u64,
    /// A server's replies that did not follow the protocol and were sent back (never run).
    pub refused_replies: u64,
}

impl Counters {
    /// Prefill tokens per second.
    /// 0 when prefill was not timed apart (a server's reply times both).
    pub fn prefill_tps(&self) -> f64 {
        if self.prefill_time.is_zero() {
            return 0.0;
        }
        self.prefill_tokens as f64 / self.prefill_time.as_secs_f64()
    }

    /// Decode tokens per second.
    pub fn decode_tps(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// A point in the conversation to come back to (see [`Llm::snapshot`]).
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pos: usize,
    epoch: u64,
    /// Rewinds that had happened when it was taken.
    rewinds: usize,
}

/// Where a conversation's KV cache is while its agent waits on a tool.
#[derive(Debug)]
enum Kv {
    /// In memory.
    Held,
    /// Written to this file (and dropped from memory).
    OnDisk(PathBuf),
    /// Dropped: rebuilt from the conversation's tokens at the next feed.
    Dropped,
}

/// What [`Llm::park`] did with a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Parked {
    /// Kept in memory.
    Kept,
    /// Written to disk, read back at the resume.
    Swapped,
    /// Dropped, recomputed at the resume.
    Dropped,
}

/// A conversation over a loaded model.
pub struct Llm {
    pub(crate) weights: Arc<Weights>,
    cache: KvCache,
    kv: Kv,
    /// Feeds go through this scheduler (batched with other conversations) when set.
    batcher: Option<Batcher>,
    /// Which conversations may share cached prompt prefixes with this one (see [`Batcher`]).
    prefix_key: u64,
    /// Set by someone else to stop the conversation: the next feed fails with the reason.
    stop: Option<Arc<std::sync::Mutex<Option<String>>>>,
    /// The tokens in the cache, in order, to rebuild it after a drop.
    ids: Vec<u32>,
    /// Tokens in the KV cache.
    pos: usize,
    /// Bumped by [`Llm::reset`], so that a snapshot of an earlier conversation is refused.
    epoch: u64,
    /// Where each rewind of this conversation went, in order.
    rewinds: Vec<usize>,
    /// Tokens that end a turn.
    pub end_ids: Vec<u32>,
    /// What was processed.
    pub counters: Counters,
    /// Static facts.
    pub info: ModelInfo,
}

impl std::fmt::Debug for Llm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llm").field("info", &self.info).field("pos", &self.pos).finish_non_exhaustive()
    }
}

impl Drop for Llm {
    fn drop(&mut self) {
        if let Kv::OnDisk(path) = &self.kv {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Llm {
    /// Loads a GGUF file, for one conversation.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        Ok(Self::new(Arc::new(Weights::load(path)?), None))
    }

    /// A new conversation over shared `weights`; with `batcher`, its feeds are scheduled
    /// with other conversations'.
    pub fn new(weights: Arc<Weights>, batcher: Option<Batcher>) -> Self {
        Self {
            end_ids: weights.end_ids.clone(),
            info: weights.info.clone(),
            weights,
            cache: KvCache::default(),
            kv: Kv::Held,
            batcher,
            prefix_key: 0,
            stop: None,
            ids: Vec::new(),
            pos: 0,
            epoch: 0,
            rewinds: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// Shares cached prompt prefixes only with conversations of the same `key`.
    pub fn share_prefixes_with(&mut self, key: u64) {
        self.prefix_key = key;
    }

    /// Stops the conversation at its next feed once `stop` holds a reason.
    pub fn stop_when(&mut self, stop: Arc<std::sync::Mutex<Option<String>>>) {
        self.stop = Some(stop);
    }
}

impl Llm {
    /// Token ids of a prompt: the template's text with its special tokens (`<|im_start|>`...)
    /// as such, and sealed text ([`crate::prompt::seal`]) with special tokens disabled, so
    /// that nothing it spells becomes one.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, AgentError> {
        let mut ids = Vec::new();
        for (sealed, piece) in crate::prompt::split(text) {
            let t = if sealed { &self.weights.plain_tokenizer } else { &self.weights.tokenizer };
            let enc = t.encode(piece, false).map_err(|e| AgentError::Model(format!("tokenizing: {e}")))?;
            ids.extend_from_slice(enc.get_ids());
        }
        Ok(ids)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.weights.tokenizer.decode(ids, false).unwrap_or_default()
    }

    /// The bytes token `id` stands for (empty for special tokens).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.weights.vocab.get(id as usize).map(Vec::as_slice).unwrap_or_default()
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.weights.vocab.len()
    }

    /// Tokens in the KV cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Appends `tokens` to the context and returns the logits after the last one. More than
    /// one token counts as a prefill, one as a decode step.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, AgentError> {
        if tokens.is_empty() {
            return Err(AgentError::Model("nothing to feed".into()));
        }
        let context = self.weights.model.max_context;
        if self.pos + tokens.len() > context {
            return Err(AgentError::Budget(format!(
                "the context would hold {} tokens; the model allows {context}",
                self.pos + tokens.len()
            )));
        }
        if let Some(why) = self.stop.as_ref().and_then(|s| s.lock().ok().and_then(|g| g.clone())) {
            return Err(AgentError::Cancelled(why));
        }
        self.unpark()?;
        let started = Instant::now();
        let logits = self.forward(tokens, self.pos)?;
        self.ids.truncate(self.pos);
        self.ids.extend_from_slice(tokens);
        self.pos += tokens.len();
        let c = &mut self.counters;
        if tokens.len() > 1 {
            c.prefill_tokens += tokens.len() as u64;
            c.prefill_time += started.elapsed();
            c.prefills += 1;
        } else {
            c.decode_tokens += 1;
            c.decode_time += started.elapsed();
        }
        Ok(logits)
    }

    /// Runs the model on this conversation's cache: directly, or through the scheduler.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, AgentError> {
        let err = |e: candle_core::Error| AgentError::Model(format!("forward pass: {e}"));
        match &self.batcher {
            None => self.weights.model.forward(&mut self.cache, tokens, pos).map_err(err),
            Some(b) => {
                let (cache, logits) = b.feed(self.prefix_key, std::mem::take(&mut self.cache), tokens.to_vec(), pos)?;
                self.cache = cache;
                logits.map_err(AgentError::Model)
            }
        }
    }

    /// Bytes of KV cache this conversation holds in memory.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Frees this conversation's KV cache while its agent waits: `Swapped` writes it to
    /// `swap` first, `Dropped` lets the next feed recompute it from the tokens, `Kept` does
    /// nothing. The next feed brings it back either way.
    pub fn park(&mut self, how: Parked, swap: &Path) -> Result<(), AgentError> {
        match how {
            Parked::Kept => return Ok(()),
            Parked::Swapped => {
                self.cache
                    .save(self.pos, swap)
                    .map_err(|e| AgentError::Model(format!("writing the KV cache to {}: {e}", swap.display())))?;
                self.kv = Kv::OnDisk(swap.to_path_buf());
            }
            Parked::Dropped => self.kv = Kv::Dropped,
        }
        self.cache.clear();
        Ok(())
    }

    /// Brings a parked cache back.
    fn unpark(&mut self) -> Result<(), AgentError> {
        match std::mem::replace(&mut self.kv, Kv::Held) {
            Kv::Held => Ok(()),
            Kv::OnDisk(path) => {
                let loaded = KvCache::load(&path);
                let _ = std::fs::remove_file(&path);
                match loaded {
                    Ok(c) => {
                        self.cache = c;
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "the swapped KV cache is unreadable; recomputing it");
                        self.kv = Kv::Dropped;
                        self.unpark()
                    }
                }
            }
            Kv::Dropped if self.pos == 0 => Ok(()),
            Kv::Dropped => {
                let ids: Vec<u32> = self.ids[..self.pos].to_vec();
                self.forward(&ids, 0)?;
                self.counters.recomputed_tokens += ids.len() as u64;
                Ok(())
            }
        }
    }

    /// The conversation so far, to come back to with [`Llm::restore`].
    pub fn snapshot(&self) -> Snapshot {
        Snapshot { pos: self.pos, epoch: self.epoch, rewinds: self.rewinds.len() }
    }

    /// Rewinds to `snap`: the conversation's first `snap.pos` tokens. Feeds only write at their
    /// own positions, so those are intact unless the conversation was reset since, or rewound
    /// below them (and written over); such a snapshot is refused.
    pub fn restore(&mut self, snap: Snapshot) -> Result<(), AgentError> {
        let overwritten = self.rewinds.get(snap.rewinds..).is_none_or(|later| later.iter().any(|p| *p < snap.pos));
        if snap.epoch != self.epoch || snap.pos > self.pos || overwritten {
            return Err(AgentError::Model("that snapshot's tokens are no longer in the KV cache".into()));
        }
        if snap.pos < self.pos {
            self.rewinds.push(snap.pos);
        }
        self.pos = snap.pos;
        Ok(())
    }

    /// Forgets the conversation: the next feed starts at position 0. The counters go on.
    pub fn clear(&mut self) {
        self.cache.clear();
        if let Kv::OnDisk(path) = std::mem::replace(&mut self.kv, Kv::Held) {
            let _ = std::fs::remove_file(path);
        }
        self.ids.clear();
        self.pos = 0;
        self.epoch += 1;
        self.rewinds.clear();
    }

    /// Forgets the conversation and its counters.
    pub fn reset(&mut self) {
        self.clear();
        self.counters = Counters::default();
    }
}
