//! `agentd bench ...`: measurements that print comparisons. They never pass or fail on a
//! timing; they exit non-zero only if a run itself breaks.

mod audit;
mod bfcl;
mod infer;
mod mcp;
mod memory;
mod net;
mod serve;
mod spawn;
mod tasks;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Spawn-to-reaped-exit of /bin/true: bare fork+exec, a full agentd sandbox, and
    /// bubblewrap with equivalent binds (when installed), interleaved in one run.
    Spawn {
        /// Runs per variant.
        #[arg(long, default_value_t = 200)]
        n: usize,
        /// Time whole processes instead: `agentd exec` of the tool against `bwrap`, as a user
        /// or an MCP client that starts one per call pays them (process start, the eBPF
        /// layer, the audit log and its flush included).
        #[arg(long)]
        whole_process: bool,
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
    /// Prefill and decode speed of the in-process model, and resuming after a tool call with
    /// the KV cache kept against re-prefilling the whole context (llama.cpp beside it when
    /// llama-cpp-python is installed).
    Infer {
        /// A llama-family GGUF (default: the embedded model).
        #[arg(long, value_name = "PATH.gguf")]
        model: Option<std::path::PathBuf>,
        /// Tokens of context.
        #[arg(long, default_value_t = 700)]
        context: usize,
        /// Tokens to decode.
        #[arg(long, default_value_t = 64)]
        decode: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Function calling on BFCL v4 (PyPI `bfcl-eval`), scored by BFCL's AST checker, with
    /// constrained decoding and without.
    Bfcl {
        /// A llama-family GGUF (default: the embedded model).
        #[arg(long, value_name = "PATH.gguf")]
        model: Option<std::path::PathBuf>,
        /// Comma-separated: simple_python, multiple, irrelevance.
        #[arg(long, value_delimiter = ',', default_value = "simple_python,irrelevance")]
        category: Vec<String>,
        /// Questions per category, evenly spaced through it; 0 runs them all.
        #[arg(long, default_value_t = 25)]
        limit: usize,
        /// Print one JSON object (with every reply) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Needle in a haystack through the memory tiers: recall@5 of facts planted at 10
    /// positions of a long history, against keeping only the most recent window.
    Memory {
        /// Haystacks to run (each with 10 facts).
        #[arg(long, default_value_t = 3)]
        trials: usize,
        /// Tokens of history per haystack.
        #[arg(long, default_value_t = 50_000)]
        tokens: usize,
        /// Tokens the baseline keeps.
        #[arg(long, default_value_t = 4096)]
        window: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A connection through agentd's network (a call's namespace, its listener, the
    /// relay) against a direct one on loopback, interleaved: connect-to-first-byte latency
    /// (p50/p99) and throughput.
    Net {
        /// Connections per path.
        #[arg(long, default_value_t = 2000)]
        n: usize,
        /// MiB per transfer.
        #[arg(long, default_value_t = 256)]
        mib: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// `agentd serve` under load: N concurrent agents with a scripted model making sandboxed
    /// calls (calls/s, latency, lost audit events), and the embedded model's batched decode
    /// at 1, 4 and 16 agents against the same agents one after another.
    Serve {
        /// Comma-separated numbers of concurrent agents.
        #[arg(long, value_delimiter = ',', default_value = "1,10,60,200")]
        agents: Vec<usize>,
        /// Calls per agent.
        #[arg(long, default_value_t = 5)]
        calls: usize,
        /// Sandbox workers (the host's concurrent calls, 1-7; the daemon's default is 4).
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Skip the embedded model's part.
        #[arg(long)]
        no_model: bool,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Held-out tasks with known answers, done by the demo's manifest: the embedded model in
    /// process, and the same GGUF behind llama.cpp's server (started on loopback when
    /// llama-cpp-python's server is installed) with agentd's grammar and without: success,
    /// steps, tokens, refused replies.
    Tasks {
        /// Run only the first N tasks (the demo's is first); 0 runs them all.
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Print one JSON object (with every run) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Third-party MCP servers under `agentd mcp`: a trivial tool of a Node and of a Python
    /// server, a sandbox per call against one per session, interleaved: calls/s, p50/p99.
    Mcp {
        /// Where the servers are installed (`cargo xtask setup`; default $AGENTD_MCP_TOOLS,
        /// else ~/.cache/agentd/mcp).
        #[arg(long, value_name = "DIR")]
        components: Option<std::path::PathBuf>,
        /// Calls per server.
        #[arg(long, default_value_t = 20)]
        n: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: BenchCommand) -> i32 {
    if matches!(cmd, BenchCommand::Mcp { .. }) && crate::sys::geteuid() != 0 {
        eprintln!("agentd: bench mcp runs servers in sandboxes, which needs root");
        return 1;
    }
    if matches!(cmd, BenchCommand::Tasks { .. }) && crate::sys::geteuid() != 0 {
        eprintln!("agentd: bench tasks runs tool calls in sandboxes, which needs root");
        return 1;
    }
    let (name, result) = match cmd {
        BenchCommand::Spawn { n, whole_process: false, json } => ("spawn", spawn::run(n.max(1), json)),
        BenchCommand::Spawn { n, whole_process: true, json } => ("spawn", spawn::whole_process(n.max(1), json)),
        BenchCommand::Audit { n, rounds, json } => ("audit", audit::run(n.max(1), rounds.max(1), json)),
        BenchCommand::Infer { model, context, decode, json } => {
            ("infer", infer::run(model, context.clamp(2, 3000), decode.max(1), json))
        }
        BenchCommand::Bfcl { model, category, limit, json } => ("bfcl", bfcl::run(model, &category, limit, json)),
        BenchCommand::Memory { trials, tokens, window, json } => {
            ("memory", memory::run(trials.max(1), tokens.max(1000), window, json))
        }
        BenchCommand::Net { n, mib, json } => ("net", net::run(n.max(10), mib.max(1), json)),
        BenchCommand::Serve { agents, calls, workers, no_model, json } => {
            ("serve", serve::run(&agents, calls.max(1), workers.clamp(1, 7), !no_model, json))
        }
        BenchCommand::Mcp { components, n, json } => ("mcp", mcp::run(components, n.max(1), json)),
        BenchCommand::Tasks { limit, json } => ("tasks", tasks::run(limit, json)),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agentd: bench {name}: {e}");
            1
        }
    }
}
