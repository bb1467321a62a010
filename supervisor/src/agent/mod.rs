//! The agent loop, which ties the model (`agentd-model`) to the sandbox: generate a turn under
//! the protocol's constraints; on a tool call, pause, run it in its sandbox, append its result,
//! and resume from the KV cache.
//!
//! - [`run`]: the loop, its transcript and its budgets;
//! - [`recall`]: what `agentd run --memory` stores and recalls (`agentd-memory`).

pub mod recall;
pub mod run;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_server;
