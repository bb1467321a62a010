//! The model every hosted agent shares, as the daemon configured it, and the engine each
//! task's loop drives:
//! - `local`: one set of weights and one model thread ([`Batcher`]) for all tasks, each
//!   with its own KV cache, under a KV memory budget ([`KvBudget`]);
//! - `openai`: a chat completions server;
//! - `scripted`: no model at all, for tests and benchmarks: every task calls one tool a set
//!   number of times, then answers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_policy::grammar::ParsedCall;
use agentd_policy::serve::ModelConfig;
use serde_json::{json, Value};

use crate::batch::Batcher;
use crate::engine::{Engine, Observer, Outcome, RunConfig};
use crate::llm::{Counters, Llm, Parked};
use crate::turn::Rules;
use crate::weights::{ModelInfo, Weights};
use crate::{fetch, AgentError};

/// The shared backend.
#[derive(Debug)]
pub enum Backend {
    /// In process.
    Local {
        /// The weights.
        weights: Arc<Weights>,
        /// The model thread.
        batcher: Batcher,
        /// The KV memory budget.
        kv: Arc<KvBudget>,
    },
    /// A server.
    Openai {
        /// API base.
        endpoint: String,
        /// Model name.
        name: String,
        /// The constraint form asked for.
        constraints: crate::openai::Constraints,
    },
    /// Scripted.
    Scripted {
        /// The tool.
        tool: String,
        /// Its arguments.
        args: BTreeMap<String, String>,
        /// Calls per task.
        calls: usize,
    },
}

impl Backend {
    /// Loads what `cfg` names (the local model is fetched and checked like `agentd run`'s).
    pub fn load(cfg: &ModelConfig, state_dir: &std::path::Path) -> Result<Self, AgentError> {
        Ok(match cfg {
            ModelConfig::Local { path, kv_budget_mb, max_batch } => {
                let path = match path {
                    Some(p) => PathBuf::from(p),
                    None => fetch::embedded_model()?,
                };
                // One budget for the KV memory kept aside: a quarter for the prefix cache,
                // the rest for paused conversations. The memory plan counts it, and a live
                // cache per conversation of a batch.
                let total = *kv_budget_mb as usize * (1 << 20);
                let weights = Arc::new(Weights::load_for(&path, *max_batch, total as u64)?);
                let batcher = Batcher::start(Arc::clone(&weights), *max_batch, total / 4)?;
                let swap_dir = state_dir.join("kv");
                std::fs::create_dir_all(&swap_dir)
                    .map_err(|e| AgentError::Io { path: swap_dir.display().to_string(), source: e })?;
                let kv = Arc::new(KvBudget::new(total - total / 4, swap_dir));
                Backend::Local { weights, batcher, kv }
            }
            ModelConfig::Openai { endpoint, name, constraints } => Backend::Openai {
                endpoint: endpoint.clone(),
                name: name.clone(),
                constraints: constraints.parse().map_err(AgentError::Model)?,
            },
            ModelConfig::Scripted { tool, args, calls } => {
                Backend::Scripted { tool: tool.clone(), args: args.clone(), calls: *calls }
            }
        })
    }

    /// A short description, for status.
    pub fn describe(&self) -> Value {
        match self {
            Backend::Local { weights, batcher, kv } => {
                let st = batcher.stats();
                let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                json!({ "backend": "local", "model": weights.info(), "kv_budget_bytes": kv.limit,
                        "kv_held_bytes": kv.held(), "decode_steps": load(&st.steps),
                        "decoded_tokens": load(&st.decoded), "prefill_tokens": load(&st.prefilled),
                        "prefix_hit_tokens": load(&st.prefix_hits), "prefix_cache_bytes": load(&st.prefix_bytes) })
            }
            Backend::Openai { endpoint, name, constraints } => {
                json!({ "backend": "openai", "endpoint": endpoint, "model": name, "constraints": constraints.name() })
            }
            Backend::Scripted { tool, calls, .. } => json!({ "backend": "scripted", "tool": tool, "calls": calls }),
        }
    }
}

/// A decision [`KvBudget`] made, for the task's events.
#[derive(Debug, Clone)]
pub struct KvDecision {
    /// What was done.
    pub action: Parked,
    /// Bytes the cache held.
    pub bytes: usize,
    /// Why.
    pub reason: String,
}

/// The KV memory all paused conversations may hold. When a pause would exceed it, the
/// cheaper of writing the cache to disk and recomputing it is chosen, unless the call is
/// expected to end before either would pay off.
#[derive(Debug)]
pub struct KvBudget {
    /// The budget, in bytes.
    pub limit: usize,
    swap_dir: PathBuf,
    /// Bytes held by paused conversations, by task.
    paused: Mutex<HashMap<String, usize>>,
    /// Mean duration of each tool's calls, in ms (exponentially weighted).
    tool_ms: Mutex<HashMap<String, f64>>,
}

/// Assumed until measured: prefill tokens per second, and disk bytes per second.
const PREFILL_TPS: f64 = 200.0;
const DISK_BPS: f64 = 300.0 * 1024.0 * 1024.0;

impl KvBudget {
    fn new(limit: usize, swap_dir: PathBuf) -> Self {
        Self { limit, swap_dir, paused: Mutex::new(HashMap::new()), tool_ms: Mutex::new(HashMap::new()) }
    }

    /// Bytes paused conversations hold now.
    pub fn held(&self) -> usize {
        self.paused.lock().map(|p| p.values().sum()).unwrap_or(0)
    }

    /// Decides for task `task`, about to wait on `tool`, and parks its cache accordingly.
    pub fn pause(&self, task: &str, llm: &mut Llm, tool: &str) -> KvDecision {
        let bytes = llm.kv_bytes();
        let held_by_others: usize =
            self.paused.lock().map(|p| p.iter().filter(|(k, _)| *k != task).map(|(_, v)| v).sum()).unwrap_or(0);
        let expected_ms = self.tool_ms.lock().ok().and_then(|t| t.get(tool).copied()).unwrap_or(1000.0);
        let tokens = llm.position() as f64;
        let recompute_ms = tokens / (llm.counters.prefill_tps().clamp(PREFILL_TPS / 4.0, 10_000.0)) * 1000.0;
        let swap_ms = 2.0 * bytes as f64 / DISK_BPS * 1000.0;
        let (action, reason) = if held_by_others + bytes <= self.limit {
            (Parked::Kept, format!("{} of {} bytes in use with it", held_by_others + bytes, self.limit))
        } else if expected_ms < swap_ms.min(recompute_ms) {
            (
                Parked::Kept,
                format!("over budget, but {tool} is expected back in {expected_ms:.0} ms, before a swap ({swap_ms:.0} ms) or recompute ({recompute_ms:.0} ms) would pay off"),
            )
        } else if swap_ms <= recompute_ms {
            (Parked::Swapped, format!("over budget; a swap costs {swap_ms:.0} ms, a recompute {recompute_ms:.0} ms"))
        } else {
            (Parked::Dropped, format!("over budget; a recompute costs {recompute_ms:.0} ms, a swap {swap_ms:.0} ms"))
        };
        let path = self.swap_dir.join(format!("{task}.safetensors"));
        let action = match llm.park(action, &path) {
            Ok(()) => action,
            Err(e) => {
                tracing::warn!(task, error = %e, "parking the KV cache failed; keeping it");
                Parked::Kept
            }
        };
        if let Ok(mut p) = self.paused.lock() {
            p.insert(task.to_string(), if action == Parked::Kept { bytes } else { 0 });
        }
        KvDecision { action, bytes, reason }
    }

    /// Task `task` resumed (or ended) after a call of `tool` that took `took`.
    pub fn resumed(&self, task: &str, tool: &str, took: Duration) {
        if let Ok(mut p) = self.paused.lock() {
            p.remove(task);
        }
        if let Ok(mut t) = self.tool_ms.lock() {
            let ms = took.as_secs_f64() * 1000.0;
            let e = t.entry(tool.to_string()).or_insert(ms);
            *e = 0.7 * *e + 0.3 * ms;
        }
    }
}

/// The scripted engine: `calls` calls of `tool`, then an answer.
#[derive(Debug)]
pub struct Scripted {
    tool: String,
    args: BTreeMap<String, String>,
    calls: usize,
    made: usize,
    context: usize,
    counters: Counters,
}

impl Scripted {
    /// A fresh script.
    pub fn new(tool: &str, args: &BTreeMap<String, String>, calls: usize) -> Self {
        Self { tool: tool.to_string(), args: args.clone(), calls, made: 0, context: 0, counters: Counters::default() }
    }
}

impl Engine for Scripted {
    fn begin(&mut self, system: &str, _example: Option<&str>, task: &str) -> Result<usize, AgentError> {
        self.made = 0;
        self.context = (system.len() + task.len()) / 4;
        Ok(self.context)
    }

    fn turn(
        &mut self,
        _rules: &Rules<'_>,
        _cfg: &RunConfig,
        budget: usize,
        obs: &mut dyn Observer,
    ) -> Result<(Outcome, usize), AgentError> {
        if budget == 0 {
            return Ok((Outcome::Budget(String::new()), 0));
        }
        self.counters.decode_tokens += 8;
        if self.made < self.calls {
            self.made += 1;
            let text = format!("Thought: step {} of {}, calling {}.\n", self.made, self.calls, self.tool);
            obs.text(&text);
            let call = ParsedCall { tool: self.tool.clone(), args: self.args.clone() };
            return Ok((Outcome::Call(call, text), 8));
        }
        let text = format!("Answer: done after {} calls.", self.calls);
        obs.text(&text);
        Ok((Outcome::Answer(format!("done after {} calls.", self.calls), text), 8))
    }

    fn resume(&mut self, block: &str) -> Result<(usize, usize), AgentError> {
        let before = self.context;
        self.context += block.len() / 4;
        Ok((before, block.len() / 4))
    }

    fn context_tokens(&self) -> usize {
        self.context
    }

    fn count(&self, block: &str) -> Result<usize, AgentError> {
        Ok(block.len() / 4)
    }

    fn rebuild(
        &mut self,
        system: &str,
        _e: Option<&str>,
        task: &str,
        turns: &[(String, String)],
    ) -> Result<usize, AgentError> {
        self.context = (system.len() + task.len() + turns.iter().map(|(a, b)| a.len() + b.len()).sum::<usize>()) / 4;
        Ok(self.context)
    }

    fn counters(&self) -> Counters {
        self.counters
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            path: String::new(),
            name: "scripted".into(),
            architecture: "scripted".into(),
            vocab: 0,
            context: 0,
            constraints: None,
        }
    }
}
