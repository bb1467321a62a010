//! agentd's record of what calls do, in two parts that share one record format:
//!
//! - [`bpf`]: the kernel side. agentd's BPF programs (LSM hooks where the kernel has BPF LSM, a
//!   cgroup and tracepoint fallback where it does not), loaded once and pinned, the kernel
//!   struct offsets read from BTF, and the events they report turned into records.
//! - The tamper-evident audit log ([`AuditLog`]): one JSON object per line, each carrying the
//!   SHA-256 of the line before it. One `call_start` record is written before a call starts,
//!   event records while it runs, and one `summary` record after it ends (with the count of
//!   lost events). [`verify`] checks a log's chain.
//! - [`sign`]: checkpoints signed with the host's key after every call and every
//!   [`sign::CHECKPOINT_EVERY`] records, which [`verify_signed`] checks.
//!
//! The crate records and enforces through the kernel; it spawns nothing. The sandbox crate's
//! runner registers each call here before its tool runs. Its syscalls are in `sys`.

pub mod bpf;
mod details;
mod log;
mod record;
pub mod sign;
mod sys;
mod tail;
mod verify;

pub use self::details::{Details, Field, Fields};
pub use self::log::{AuditError, AuditLog, DEFAULT_PATH};
pub use self::record::{opens_for_writing, Entry, Kind, Record, Verdict};
pub use self::tail::{scan_back, ts_ms};
pub use self::verify::{verify, verify_signed, Outcome};
