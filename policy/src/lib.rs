//! agentd's policy: parse a TOML manifest, validate it, and compile one tool call into an
//! [`ExecPlan`]. This crate performs no syscalls; host facts come in as values and through
//! the [`HostFs`] trait, so every decision can be tested as a pure function.
//!
//! The three steps:
//! 1. [`parse`] turns manifest text into a validated [`Manifest`], or into [`Diagnostics`] that
//!    name the file, line, column and key of every problem (unknown keys are errors, with the
//!    closest valid key suggested).
//! 2. [`compile`] turns `(manifest, call, host)` into an [`ExecPlan`]: mounts, Landlock rules at
//!    the ABI the kernel offers, cgroup limits, environment, and which features are required.
//! 3. The supervisor refuses the call if [`ExecPlan::unmet_requirement`] is `Some`, and
//!    otherwise spawns exactly what the plan says.

pub mod access;
mod argv;
pub mod cases;
mod compile;
mod diag;
pub mod diff;
pub mod draft;
pub mod grammar;
pub mod keys;
pub mod lint;
mod load;
mod model;
pub mod mountinfo;
pub mod net;
mod plan;
pub mod schema;
pub mod serve;
mod template;
mod types;

pub use argv::render;
pub use compile::{compile, compile_mcp_server, CallRequest, CompileError, ElfDeps, HostFacts, HostFs, DEV_NODES};
pub use diag::{error_chain, Diagnostic, Diagnostics, Severity};
pub use load::{parse, parse_bytes, parse_bytes_with_warnings, parse_with_warnings};
pub use model::{
    agent_id, fits_decimals, is_mcp_tool_name, is_plain_number, path_is_under, Agent, AnswerMode, ArgKind, ArgSpec,
    AuditMode, AuditPolicy, EnvPolicy, Finite, FsGrants, LimitSpec, Limits, LossAction, Manifest, McpLifetime,
    McpServer, NetGrants, Requires, Tool, AGENT_ID_BASE, AGENT_ID_COUNT, DEFAULT_ARG_MAX_LENGTH, LIMITS,
    MANIFEST_VERSION, MAX_LANDLOCK_ABI, NUMBER_DECIMALS, NUMBER_LIMIT,
};
pub use plan::*;
pub use template::{ArgTemplate, Piece, RenderError};
pub use types::{normalize_name, AbsPath, DomainName, EnvName, HostAddr, HostPort, Name, Port, RESERVED_TREES};

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_agent;
#[cfg(test)]
mod tests_keys;
#[cfg(test)]
mod tests_lint;
