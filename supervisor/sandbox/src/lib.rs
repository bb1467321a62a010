//! One agentd tool call, from its compiled plan to its reaped exit.
//!
//! - [`host`]: what this kernel offers (probed, never assumed) and the filesystem as the policy
//!   compiler sees it, so that `agentd_policy::compile` can turn a manifest into a plan here;
//! - [`spawn`]: the plan becomes a confined process: namespaces, a fresh root, Landlock,
//!   seccomp, no privileges, in a fixed order in the child;
//! - [`cgroup`]: the call's own cgroup on v2 and on hybrid hosts, its limits and its kill;
//! - [`runner`]: a call to completion: its records in the audit log, the BPF layer's events,
//!   bounded output, the timeout, reaping and cleanup.
//!
//! Sandboxes are spawned only from single-threaded processes (`clone3` without an exec
//! copies the caller). Every syscall of the crate goes through `sys`, its one unsafe seam.

pub mod cgroup;
pub mod elf;
pub mod host;
pub mod runner;
pub mod spawn;
mod sys;
