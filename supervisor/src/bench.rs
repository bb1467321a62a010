//! `agentd bench ...`: measurements that print comparisons (never pass/fail).

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {}

pub(crate) fn run(cmd: BenchCommand) -> i32 {
    match cmd {}
}
