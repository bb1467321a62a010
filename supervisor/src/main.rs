//! `agentd`: the host supervisor for AI agents. Every tool call runs in a short-lived,
//! namespaced, Landlock-confined, cgroup-limited process built from a TOML manifest.

mod agent;
mod audit;
mod bench;
mod bpf;
mod cgroup;
mod cli;
mod db;
mod host;
mod log;
mod memory;
mod runner;
mod sandbox;
mod serve;
mod sys;
#[cfg(test)]
mod testing;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    sys::ensure_stdio_open();
    log::init();
    let args = cli::Cli::parse();
    let code = cli::dispatch(args);
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}
