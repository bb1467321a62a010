//! The model thread of `agentd serve`: one set of weights, many conversations.
//!
//! Conversations ([`crate::llm::Llm`] with a [`Batcher`]) send their feeds here, each with
//! its own KV cache, and get the cache back with the logits. Each turn of the loop:
//! - every waiting single-token feed (a decode step) runs in **one batched step**
//!   ([`Model::decode_batch`]), up to `max_batch`, oldest first;
//! - then one chunk of one prompt or tool result (a prefill), so a long prefill never stalls
//!   the agents that are decoding. Among waiting prefills, the one whose prompt prefix is
//!   already hot in the prefix cache goes first (it costs least), unless another has waited
//!   longer than [`MAX_WAIT`]: no one starves.
//!
//! The prefix cache keeps the KV of a few recent opening prompts, within a byte budget (the
//! daemon gives it a quarter of `model.kv_budget_mb`). A new conversation whose prompt
//! shares at least [`MIN_PREFIX`] tokens with one starts from a copy of those positions
//! instead of computing them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::forward::{KvCache, Step};
use crate::weights::Weights;
use crate::AgentError;

/// Tokens of a prefill computed between two decode steps.
const PREFILL_CHUNK: usize = 128;
/// A prefill that waited this long goes next, hot prefix or not.
pub const MAX_WAIT: Duration = Duration::from_millis(500);
/// How long a decode step waits for the rest of the previous step's conversations.
const GATHER: Duration = Duration::from_millis(3);
/// Shortest shared prefix worth copying.
const MIN_PREFIX: usize = 32;
/// Opening prompts kept in the prefix cache.
const PREFIXES: usize = 4;

/// A feed and where to answer it.
struct Request {
    /// Conversations share cached prefixes only with the same key (the daemon uses one per
    /// agent and submitter, so that no one learns another's prompts through the cache).
    key: u64,
    cache: KvCache,
    tokens: Vec<u32>,
    pos: usize,
    queued: Instant,
    reply: SyncSender<(KvCache, Result<Vec<f32>, String>)>,
}

/// A prefill in progress: `done` of its tokens are in the cache.
struct Prefill {
    req: Request,
    done: usize,
    /// Tokens the prefix cache would save if it started now (0 once started).
    hot: usize,
}

/// What the scheduler did, for benchmarks and status.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Batched decode steps run.
    pub steps: AtomicU64,
    /// Sequences decoded in them (steps × mean batch size).
    pub decoded: AtomicU64,
    /// Prefill tokens computed.
    pub prefilled: AtomicU64,
    /// Prefill tokens copied from the prefix cache instead.
    pub prefix_hits: AtomicU64,
    /// Bytes the prefix cache holds now.
    pub prefix_bytes: AtomicU64,
}

/// A handle to the model thread; clones share it.
#[derive(Debug, Clone)]
pub struct Batcher {
    tx: Sender<Request>,
    stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the model thread over `weights`, batching up to `max_batch` decode steps, with a
    /// prefix cache of at most `prefix_bytes`.
    pub fn start(weights: Arc<Weights>, max_batch: usize, prefix_bytes: usize) -> Result<Self, AgentError> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let s = Arc::clone(&stats);
        let sched = Scheduler { weights, max_batch: max_batch.max(1), stats: s, prefixes: Vec::new(), prefix_bytes };
        std::thread::Builder::new()
            .name("agentd-model".into())
            .spawn(move || sched.run(&rx))
            .map_err(|e| AgentError::Model(format!("starting the model thread: {e}")))?;
        Ok(Self { tx, stats })
    }

    /// What it did so far.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Feeds `tokens` at `pos` on `cache`; returns the cache and the logits after the last one.
    pub fn feed(
        &self,
        key: u64,
        cache: KvCache,
        tokens: Vec<u32>,
        pos: usize,
    ) -> Result<(KvCache, Result<Vec<f32>, String>), AgentError> {
        let (reply, rx) = mpsc::sync_channel(1);
        let gone = || AgentError::Model("the model thread has stopped".into());
        self.tx.send(Request { key, cache, tokens, pos, queued: Instant::now(), reply }).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }
}

struct Scheduler {
    weights: Arc<Weights>,
    max_batch: usize,
    stats: Arc<BatchStats>,
    /// Recent opening prompts: their key, tokens, KV, and when last used.
    prefixes: Vec<(u64, Vec<u32>, KvCache, Instant)>,
    /// Most bytes `prefixes` may hold.
    prefix_bytes: usize,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Scheduler {
    fn run(mut self, rx: &Receiver<Request>) {
        let mut decodes: VecDeque<Request> = VecDeque::new();
        let mut prefills: Vec<Prefill> = Vec::new();
        let mut last_batch = 0usize;
        loop {
            // Wait for work when idle; then take everything that is waiting.
            if decodes.is_empty() && prefills.is_empty() {
                match rx.recv() {
                    Ok(r) => self.admit(r, &mut decodes, &mut prefills),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv() {
                self.admit(r, &mut decodes, &mut prefills);
            }
            // The conversations of the last step are picking their next tokens: give them a
            // moment to send them, so the step is batched rather than one at a time.
            let gather = Instant::now() + GATHER;
            while decodes.len() < last_batch && prefills.is_empty() {
                let left = gather.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(r) => self.admit(r, &mut decodes, &mut prefills),
                    Err(_) => break,
                }
            }
            last_batch = 0;
            if !decodes.is_empty() {
                let n = decodes.len().min(self.max_batch);
                last_batch = n;
                let batch: Vec<Request> = decodes.drain(..n).collect();
                self.decode(batch);
            }
            if let Some(i) = self.pick(&prefills) {
                if let Some(done) = self.prefill_chunk(&mut prefills[i]) {
                    let p = prefills.swap_remove(i);
                    let _ = p.req.reply.send((p.req.cache, done));
                }
            }
        }
    }

    fn admit(&self, r: Request, decodes: &mut VecDeque<Request>, prefills: &mut Vec<Prefill>) {
        if r.tokens.len() == 1 {
            decodes.push_back(r);
        } else {
            let hot = if r.pos == 0 { self.best_prefix(r.key, &r.tokens).map_or(0, |(_, n)| n) } else { 0 };
            prefills.push(Prefill { req: r, done: 0, hot });
        }
    }

    /// The cached prefix sharing most tokens with `tokens` (leaving at least one to feed).
    fn best_prefix(&self, key: u64, tokens: &[u32]) -> Option<(usize, usize)> {
        self.prefixes
            .iter()
            .enumerate()
            .filter(|(_, (k, _, _, _))| *k == key)
            .map(|(i, (_, p, _, _))| (i, common_prefix(p, tokens).min(tokens.len().saturating_sub(1))))
            .filter(|(_, n)| *n >= MIN_PREFIX)
            .max_by_key(|(_, n)| *n)
    }

    /// Which prefill goes next: one in progress; else one that waited too long; else the
    /// one with the least left to compute after its hot prefix.
    fn pick(&self, prefills: &[Prefill]) -> Option<usize> {
        if let Some(i) = prefills.iter().position(|p| p.done > 0) {
            return Some(i);
        }
        if let Some((i, _)) = prefills
            .iter()
            .enumerate()
            .filter(|(_, p)| p.req.queued.elapsed() > MAX_WAIT)
            .min_by_key(|(_, p)| p.req.queued)
        {
            return Some(i);
        }
        prefills.iter().enumerate().min_by_key(|(_, p)| (p.req.tokens.len() - p.hot, p.req.queued)).map(|(i, _)| i)
    }

    fn decode(&self, mut batch: Vec<Request>) {
        let mut steps: Vec<Step<'_>> =
            batch.iter_mut().map(|r| Step { cache: &mut r.cache, token: r.tokens[0], pos: r.pos }).collect();
        let started = Instant::now();
        // A panic in a kernel fails this step's conversations, not the model thread.
        let out =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.weights.model.decode_batch(&mut steps)))
                .unwrap_or_else(|_| Err(candle_core::Error::Msg("the decode step panicked".into())));
        tracing::trace!(batch = steps.len(), us = started.elapsed().as_micros() as u64, "decode step");
        drop(steps);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.decoded.fetch_add(batch.len() as u64, Ordering::Relaxed);
        match out {
            Ok(rows) => {
                for (r, logits) in batch.into_iter().zip(rows) {
                    let _ = r.reply.send((r.cache, Ok(logits)));
                }
            }
            Err(e) => {
                for r in batch {
                    let _ = r.reply.send((r.cache, Err(format!("batched decode: {e}"))));
                }
            }
        }
    }

    /// Runs the next chunk of `p`; returns its result once the last chunk ran.
    fn prefill_chunk(&mut self, p: &mut Prefill) -> Option<Result<Vec<f32>, String>> {
        let model = &self.weights.model;
        if p.done == 0 && p.req.pos == 0 {
            if let Some((i, n)) = self.best_prefix(p.req.key, &p.req.tokens) {
                match model.copy_prefix(&self.prefixes[i].2, n) {
                    Ok(c) => {
                        p.req.cache = c;
                        p.done = n;
                        self.prefixes[i].3 = Instant::now();
                        self.stats.prefix_hits.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e, "copying a cached prefix failed; computing it"),
                }
            }
        }
        let end = (p.done + PREFILL_CHUNK).min(p.req.tokens.len());
        let (cache, tokens, at) = (&mut p.req.cache, &p.req.tokens[p.done..end], p.req.pos + p.done);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.forward(cache, tokens, at)))
            .unwrap_or_else(|_| Err(candle_core::Error::Msg("the prefill panicked".into())));
        self.stats.prefilled.fetch_add((end - p.done) as u64, Ordering::Relaxed);
        p.done = end;
        match out {
            Err(e) => Some(Err(format!("forward pass: {e}"))),
            Ok(_) if end < p.req.tokens.len() => None,
            Ok(logits) => {
                if p.req.pos == 0 {
                    self.remember_prefix(p.req.key, &p.req.tokens, &p.req.cache);
                }
                Some(Ok(logits))
            }
        }
    }

    /// Keeps a new opening prompt's KV, unless a cached one already covers its shared part.
    fn remember_prefix(&mut self, key: u64, tokens: &[u32], cache: &KvCache) {
        if self.best_prefix(key, tokens).is_some() {
            return;
        }
        let Ok(copy) = self.weights.model.copy_prefix(cache, tokens.len()) else { return };
        if copy.bytes() > self.prefix_bytes {
            return;
        }
        // The least recently used go until it fits, in count and in bytes.
        let held = |p: &[(u64, Vec<u32>, KvCache, Instant)]| p.iter().map(|e| e.2.bytes()).sum::<usize>();
        while self.prefixes.len() >= PREFIXES || held(&self.prefixes) + copy.bytes() > self.prefix_bytes {
            let Some(oldest) = self.prefixes.iter().enumerate().min_by_key(|(_, p)| p.3).map(|(i, _)| i) else {
                break;
            };
            self.prefixes.swap_remove(oldest);
        }
        self.prefixes.push((key, tokens.to_vec(), copy, Instant::now()));
        self.stats.prefix_bytes.store(held(&self.prefixes) as u64, Ordering::Relaxed);
    }
}
