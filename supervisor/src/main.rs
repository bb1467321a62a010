//! `agentd`: the host supervisor for AI agents. Every tool call runs in a short-lived,
//! namespaced, Landlock-confined, cgroup-limited process built from a TOML manifest.
//!
//! This crate is the binary: the command line ([`cli`]), the agent loop that ties the model to
//! the sandbox ([`agent`]), the daemon ([`serve`]) and the benchmarks ([`bench`]). The
//! subsystems are crates of their own, which this one uses and none of which reaches up:
//! `agentd-policy` (manifests into plans), `agentd-sandbox` (a call from plan to exit),
//! `agentd-audit` (the BPF layer and the audit log), `agentd-model` and `agentd-memory`.

#![deny(clippy::print_stdout)]

#[macro_use]
mod out;

mod agent;
mod bench;
mod cli;
mod log;
mod manifest;
mod mcp;
mod serve;
mod sys;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    sys::ensure_stdio_open();
    log::init();
    let args = cli::Cli::parse();
    // The programs every process of the host runs are detached by a process of this binary
    // once no call runs (see agentd_audit::bpf).
    if let Ok(me) = std::env::current_exe() {
        agentd_audit::bpf::set_idle_detacher(me);
    }
    let code = cli::dispatch(args);
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}
