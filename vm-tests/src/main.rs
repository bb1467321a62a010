//! `agentd-vm-tests`: runs inside the VM that `cargo xtask vm-test` boots (a BPF-LSM kernel
//! with a pure cgroup v2 hierarchy), drives the real `agentd` binary through real tool calls,
//! and prints one machine-readable verdict line:
//!
//! ```text
//! AGENTD-VM-VERDICT {"kernel":"...","passed":[...],"failed":[{"name":...,"why":...}],"skipped":[...]}
//! ```
//!
//! `agentd-vm-tests [NAME...]` runs the named tests (all by default); `--list` lists them.
//! `agentd-vm-tests tool ACTION ARGS...` is what some tests run *inside* the sandbox, for
//! actions a shell cannot express (memfd exec, exact connect errnos, ptrace).

mod cases;
mod harness;
mod tool;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("tool") => tool::main(&args[1..]),
        Some("--list") => {
            for (name, _) in cases::ALL {
                println!("{name}");
            }
            ExitCode::SUCCESS
        }
        _ => harness::run_all(cases::ALL, &args),
    }
}
