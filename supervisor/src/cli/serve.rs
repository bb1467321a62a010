//! `agentd serve`: the daemon (see `crate::serve`).

use std::path::PathBuf;

use clap::Args;

use agentd_sandbox::runner::EXIT_REFUSED;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The daemon's config: agents, model, paths, limits, roles.
    #[arg(long, value_name = "FILE", default_value = "/etc/agentd/agentd.toml")]
    config: PathBuf,
    /// Check the config and every manifest it names, then exit (0 if valid).
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The audit log the worker's calls are recorded in.
    #[arg(long)]
    pub(crate) audit_log: PathBuf,
}

pub(crate) fn run(a: &ServeArgs) -> i32 {
    // The call (or task, or daemon) must finish and be recorded even if no one reads stdout.
    crate::out::keep_going();
    if a.check {
        return match crate::serve::load(&a.config) {
            Ok(l) => {
                outln!("{}: ok, {} agents, {} roles", a.config.display(), l.agents.len(), l.cfg.roles.len());
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        };
    }
    let _bpf_log = super::audit::BpfLogReader::start_if_asked();
    match crate::serve::run(&a.config) {
        Ok(()) => 0,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("agentd: {line}");
            }
            EXIT_REFUSED
        }
    }
}
