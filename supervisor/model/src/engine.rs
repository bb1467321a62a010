//! Engines: a model the agent loop can drive, turn by turn. [`Local`] runs the in-process
//! model with constrained decoding (every token that could not continue a valid turn is masked
//! out); [`crate::openai::Remote`] talks to a chat completions server and checks each reply
//! against the same automaton instead; [`crate::shared`] serves the daemon's tasks from one
//! model. The loop itself (prompts, tool calls, memory, budgets) lives in the binary.

use agentd_policy::grammar::ParsedCall;
use serde_json::Value;

use crate::llm::{Counters, Llm};
use crate::prompt;
use crate::turn::{self, Rules, Turn};
use crate::weights::ModelInfo;
use crate::AgentError;

/// Limits and sampling of one run.
#[derive(Debug, Clone, Copy)]
pub struct RunConfig {
    /// Most assistant turns.
    pub max_steps: usize,
    /// Most generated tokens in all.
    pub max_tokens: usize,
    /// `None`: greedy. `Some(seed)`: sampling at `temperature`, reproducible for a seed.
    pub seed: Option<u64>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Most tokens in the context (L1); 0 for the model's whole context. Beyond it, the
    /// oldest tool results are paged out to memory, or, without memory, the run stops.
    pub context_budget: usize,
}

impl RunConfig {
    /// Greedy decoding with generous limits.
    pub const GREEDY: RunConfig =
        RunConfig { max_steps: 8, max_tokens: 4096, seed: None, temperature: 0.7, context_budget: 0 };
}

/// What the loop reports as it goes.
pub trait Observer {
    /// A piece of generated text.
    fn text(&mut self, text: &str);
    /// A tool call is about to run.
    fn tool_start(&mut self, call: &ParsedCall, call_id: &str);
    /// It ended; `result` is its `agentd exec --json` object.
    fn tool_end(&mut self, result: &Value);
}

/// An observer that shows nothing.
#[derive(Debug)]
pub struct Silent;

impl Observer for Silent {
    fn text(&mut self, _: &str) {}
    fn tool_start(&mut self, _: &ParsedCall, _: &str) {}
    fn tool_end(&mut self, _: &Value) {}
}

/// A tiny deterministic generator for seeded sampling (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32) / (1u64 << 24) as f32
    }
}

/// Picks a token among the allowed ones: the most likely, or a sample.
fn pick(logits: &[f32], allowed: Option<&[bool]>, cfg: &RunConfig, rng: &mut Rng) -> Option<u32> {
    let ok = |i: usize| allowed.is_none_or(|a| a.get(i).copied().unwrap_or(false));
    let best = (0..logits.len()).filter(|i| ok(*i)).max_by(|a, b| logits[*a].total_cmp(&logits[*b]))?;
    if cfg.seed.is_none() {
        return Some(best as u32);
    }
    let t = cfg.temperature.max(1e-3);
    let top = logits[best];
    let weights: Vec<(usize, f32)> =
        (0..logits.len()).filter(|i| ok(*i)).map(|i| (i, ((logits[i] - top) / t).exp())).collect();
    let total: f32 = weights.iter().map(|(_, w)| w).sum();
    let mut r = rng.next_f32() * total;
    for (i, w) in &weights {
        r -= w;
        if r <= 0.0 {
            return Some(*i as u32);
        }
    }
    Some(best as u32)
}

/// How a turn ended.
#[derive(Debug)]
pub enum Outcome {
    /// A complete, grammar-valid call, and the turn's text.
    Call(ParsedCall, String),
    /// The final answer, and the turn's text.
    Answer(String, String),
    /// The token budget ran out, with the text so far.
    Budget(String),
}

/// A model the loop can drive: in process, or a server.
pub trait Engine {
    /// Starts the conversation; returns the prompt's token count.
    fn begin(&mut self, system: &str, example: Option<&str>, task: &str) -> Result<usize, AgentError>;
    /// Generates one turn, within `budget` tokens, held to `rules` (the granted calls, and
    /// the quotes a quoted answer may copy); returns how it ended and tokens generated.
    fn turn(
        &mut self,
        rules: &Rules<'_>,
        cfg: &RunConfig,
        budget: usize,
        obs: &mut dyn Observer,
    ) -> Result<(Outcome, usize), AgentError>;
    /// Appends a call's result block; returns (context before, tokens processed).
    fn resume(&mut self, block: &str) -> Result<(usize, usize), AgentError>;
    /// Tokens in the context now (an estimate for servers).
    fn context_tokens(&self) -> usize;
    /// Tokens that resuming with `block` would add (an estimate for servers).
    fn count(&self, block: &str) -> Result<usize, AgentError>;
    /// Replaces the context with the opening and `turns` (each an assistant turn that made a
    /// call, and its result block), as after older results were paged out. Returns the
    /// tokens processed.
    fn rebuild(
        &mut self,
        system: &str,
        example: Option<&str>,
        task: &str,
        turns: &[(String, String)],
    ) -> Result<usize, AgentError>;
    /// What the model processed.
    fn counters(&self) -> Counters;
    /// The model.
    fn info(&self) -> ModelInfo;
    /// The run is about to wait for a call of `tool`: a chance to free what the wait does
    /// not need (see [`Local::on_pause`]).
    fn pause(&mut self, _tool: &str) {}
}

/// Decides, when a run pauses for a call of a tool, what happens to its KV cache; it may
/// park the cache ([`Llm::park`]).
pub type Parker<'a> = Box<dyn FnMut(&mut Llm, &str) + Send + 'a>;

/// The in-process model, with constrained decoding.
pub struct Local<'a> {
    llm: &'a mut Llm,
    logits: Vec<f32>,
    rng: Rng,
    parker: Option<Parker<'a>>,
}

impl std::fmt::Debug for Local<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").field("llm", &self.llm).field("parker", &self.parker.is_some()).finish_non_exhaustive()
    }
}

impl<'a> Local<'a> {
    /// Drives `llm`; `seed` seeds sampling (see [`RunConfig::seed`]).
    pub fn new(llm: &'a mut Llm, seed: Option<u64>) -> Self {
        Self { llm, logits: Vec::new(), rng: Rng(seed.unwrap_or(0) | 1), parker: None }
    }

    /// Calls `parker` whenever the run waits for a tool (`agentd serve`'s KV budget).
    pub fn on_pause(mut self, parker: Parker<'a>) -> Self {
        self.parker = Some(parker);
        self
    }
}

impl Local<'_> {
    /// The conversation so far, to come back to with [`Local::restore`].
    pub fn snapshot(&self) -> (crate::llm::Snapshot, Vec<f32>) {
        (self.llm.snapshot(), self.logits.clone())
    }

    /// Returns to a snapshot of this engine.
    pub fn restore(&mut self, snap: &(crate::llm::Snapshot, Vec<f32>)) -> Result<(), AgentError> {
        self.llm.restore(snap.0)?;
        self.logits.clone_from(&snap.1);
        Ok(())
    }

    /// Greedy decoding without any mask, up to an end-of-turn token or `budget` tokens: what
    /// the model writes when nothing holds it to the protocol (for comparisons).
    pub fn unconstrained(&mut self, budget: usize) -> Result<(String, usize), AgentError> {
        let mut ids = Vec::new();
        while ids.len() < budget {
            let Some(id) = pick(&self.logits, None, &RunConfig::GREEDY, &mut self.rng) else { break };
            if self.llm.end_ids.contains(&id) {
                break;
            }
            ids.push(id);
            self.logits = self.llm.feed(&[id])?;
        }
        Ok((self.llm.decode(&ids), ids.len()))
    }
}

impl Engine for Local<'_> {
    fn begin(&mut self, system: &str, example: Option<&str>, task: &str) -> Result<usize, AgentError> {
        self.llm.reset();
        self.rebuild(system, example, task, &[])
    }

    fn turn(
        &mut self,
        rules: &Rules<'_>,
        cfg: &RunConfig,
        budget: usize,
        obs: &mut dyn Observer,
    ) -> Result<(Outcome, usize), AgentError> {
        let llm = &mut *self.llm;
        let vocab = llm.vocab_size();
        let ends = llm.end_ids.clone();
        let mut state = Turn::start();
        let mut ids: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        loop {
            if ids.len() >= budget {
                return Ok((Outcome::Budget(llm.decode(&ids)), ids.len()));
            }
            let allowed = (!matches!(state, Turn::Answer))
                .then(|| turn::mask(rules, &state, vocab, &|id| llm.token_bytes(id), &ends));
            let id = pick(&self.logits, allowed.as_deref(), cfg, &mut self.rng)
                .ok_or_else(|| AgentError::Model("no token is allowed here (a grammar dead end)".into()))?;
            // An end-of-turn token (only allowed while answering), or another special token
            // in the answer's free text, ends the answer.
            if ends.contains(&id) || (matches!(state, Turn::Answer) && llm.token_bytes(id).is_empty()) {
                let text = llm.decode(&ids);
                let (text, answer) = turn::answer_in(&text);
                return Ok((Outcome::Answer(answer.to_string(), text.to_string()), ids.len()));
            }
            if !matches!(state, Turn::Answer) {
                state = turn::feed_all(rules, &state, llm.token_bytes(id))
                    .ok_or_else(|| AgentError::Model("the mask let through a token the grammar refuses".into()))?;
            }
            ids.push(id);
            let text = llm.decode(&ids);
            if state.answering() && llm.token_bytes(id).contains(&b'\n') {
                // The answer is one line.
                let (line, answer) = turn::answer_in(&text);
                obs.text(line.get(shown..).unwrap_or_default());
                return Ok((Outcome::Answer(answer.to_string(), line.to_string()), ids.len()));
            }
            if text.len() > shown && text.is_char_boundary(shown) && !text.ends_with('\u{fffd}') {
                obs.text(&text[shown..]);
                shown = text.len();
            }
            self.logits = llm.feed(&[id])?;
            if let Turn::Call(st) = &state {
                if let Some(call) = rules.calls.is_done(st).then(|| rules.calls.call(st)).flatten() {
                    return Ok((Outcome::Call(call, text), ids.len()));
                }
            }
        }
    }

    fn resume(&mut self, block: &str) -> Result<(usize, usize), AgentError> {
        let new_tokens = self.llm.encode(&prompt::after_call(block))?;
        let before = self.llm.position();
        // The interrupt cycle: only the new tokens are processed; the KV cache holds the rest.
        self.logits = self.llm.feed(&new_tokens)?;
        Ok((before, new_tokens.len()))
    }

    fn context_tokens(&self) -> usize {
        self.llm.position()
    }

    fn count(&self, block: &str) -> Result<usize, AgentError> {
        Ok(self.llm.encode(&prompt::after_call(block))?.len())
    }

    fn rebuild(
        &mut self,
        system: &str,
        example: Option<&str>,
        task: &str,
        turns: &[(String, String)],
    ) -> Result<usize, AgentError> {
        let mut text = prompt::opening(system, example, task);
        for (turn, block) in turns {
            // The model's own words, once generated, are text like any other: sealed.
            text.push_str(&prompt::seal(turn));
            text.push_str(&prompt::after_call(block));
        }
        // A new conversation for the model; the run's counters go on.
        self.llm.clear();
        let ids = self.llm.encode(&text)?;
        self.logits = self.llm.feed(&ids)?;
        Ok(ids.len())
    }

    fn counters(&self) -> Counters {
        self.llm.counters
    }

    fn info(&self) -> ModelInfo {
        self.llm.info.clone()
    }

    fn pause(&mut self, tool: &str) {
        if let Some(p) = self.parker.as_mut() {
            p(self.llm, tool);
        }
    }
}
