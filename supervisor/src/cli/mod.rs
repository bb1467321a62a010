//! Command-line interface. The subcommands, their flags and exit codes are a contract.

mod audit;
pub(crate) mod ctl;
mod exec;
mod learn;
mod mcp;
pub(crate) mod memory;
mod model;
mod policy;
mod policy_draft;
mod policy_test;
mod run;
mod serve;

use clap::{Parser, Subcommand};

/// Host supervisor for AI agents: every tool call runs in a confined, audited, short-lived
/// sandbox compiled from a TOML manifest.
#[derive(Debug, Parser)]
#[command(name = "agentd", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check and explain manifests.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Run one tool call under a manifest.
    Exec(exec::ExecArgs),
    /// An agent does a task under a manifest, with the in-process model.
    Run(run::RunArgs),
    /// Serve a manifest's tools over MCP on stdio: each tools/call runs as one sandboxed,
    /// audited call.
    Mcp(mcp::McpArgs),
    /// Verify and read audit logs.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// An agent's memory: ingest text, query it, and see what it holds.
    Memory {
        #[command(subcommand)]
        command: memory::MemoryCommand,
    },
    /// The embedded default model.
    Model {
        #[command(subcommand)]
        command: model::ModelCommand,
    },
    /// Host many agents behind a local control API (the daemon).
    Serve(serve::ServeArgs),
    /// Talk to `agentd serve`: submit, watch, status, cancel, ls, audit.
    Ctl(ctl::CtlArgs),
    /// A sandbox worker of `agentd serve` (started by the daemon, not by hand).
    #[command(name = "__serve-worker", hide = true)]
    ServeWorker(serve::WorkerArgs),
    /// Detaches the BPF programs that act on every process once no call runs (started by
    /// agentd after a call, not by hand).
    #[command(name = "__bpf-idle", hide = true)]
    BpfIdle,
    /// Measure agentd (benchmarks print comparisons; they never fail on timings).
    Bench {
        #[command(subcommand)]
        command: crate::bench::BenchCommand,
    },
}

/// Runs the parsed command and returns the process exit code.
pub fn dispatch(cli: Cli) -> i32 {
    match cli.command {
        Command::Policy { command } => policy::run(command),
        Command::Exec(args) => exec::run(args),
        Command::Run(args) => run::run(args),
        Command::Mcp(args) => mcp::run(args),
        Command::Audit { command } => audit::run(command),
        Command::Memory { command } => memory::run(command),
        Command::Model { command } => model::run(command),
        Command::Serve(args) => serve::run(&args),
        Command::Ctl(args) => ctl::run(args),
        Command::ServeWorker(args) => crate::serve::worker::main(&args.audit_log),
        Command::BpfIdle => bpf_idle(),
        Command::Bench { command } => crate::bench::run(command),
    }
}

/// `agentd __bpf-idle`: see [`agentd_audit::bpf::detach_if_idle`].
fn bpf_idle() -> i32 {
    match agentd_audit::bpf::detach_if_idle(agentd_audit::bpf::idle_grace()) {
        Ok(agentd_audit::bpf::Idle::Detached(n, took)) => {
            tracing::info!(links = n, ms = took.as_secs_f64() * 1e3, "detached the BPF programs: no call runs");
            0
        }
        Ok(_) => 0,
        Err(e) => {
            tracing::warn!(error = %agentd_policy::error_chain(&e), "could not detach the BPF programs");
            1
        }
    }
}
