//! `agentd bench ...`: measurements that print comparisons. They never pass or fail on a
//! timing; they exit non-zero only if a run itself breaks.

mod audit;
mod spawn;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Spawn-to-reaped-exit of /bin/true: bare fork+exec, a full agentd sandbox, and
    /// bubblewrap with equivalent binds (when installed), interleaved in one run.
    Spawn {
        /// Runs per variant.
        #[arg(long, default_value_t = 200)]
        n: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A syscall-heavy loop (open/close) in a sandbox with the eBPF layer attached and
    /// without it, interleaved: overhead and events/s delivered.
    Audit {
        /// open/close pairs per call.
        #[arg(long, default_value_t = 200_000)]
        n: u64,
        /// Calls per variant.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: BenchCommand) -> i32 {
    let (name, result) = match cmd {
        BenchCommand::Spawn { n, json } => ("spawn", spawn::run(n.max(1), json)),
        BenchCommand::Audit { n, rounds, json } => ("audit", audit::run(n.max(1), rounds.max(1), json)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentd: bench {name}: {e}");
            1
        }
    }
}
