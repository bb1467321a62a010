//! One audit record: a JSON object on one line, chained to the line before it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::details::Details;

/// `prev` of the first record of a log.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A call was about to start (written before the sandbox exists).
    CallStart,
    /// A call ended: exit status, flags, event counts (one per call).
    Summary,
    /// A program was executed.
    Exec,
    /// A file was opened.
    Open,
    /// A socket connected or sent to an address.
    Connect,
    /// A socket was bound.
    Bind,
    /// A name was asked of agentd's DNS stub or proxy: what it resolved to, or why not.
    Resolve,
    /// A connect to a Unix socket bound at a path that is not the call's own.
    UnixConnect,
    /// ptrace was attempted.
    Ptrace,
    /// A signal was sent.
    Signal,
    /// A mount was attempted.
    Mount,
    /// A device node was refused.
    Device,
    /// The file system was changed: unlink, rmdir, rename, link, symlink, truncate, chmod,
    /// chown, mknod or mkdir (`operation` says which).
    Change,
    /// A syscall seen by the fallback tracer.
    Syscall,
    /// A writer found a torn final line (a crash mid-write) and continued after it.
    Recovered,
    /// The host's key signed the chain up to here: `details` hold the public key and the
    /// signature of this record's `seq` and `prev` (see [`crate::sign`]).
    Checkpoint,
    /// The supervisor killed a running call: a cancel, the end of a drain, or a call left
    /// behind by a daemon that was killed (then it is also the call's summary).
    Killed,
}

/// Whether the action was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed (or only audited).
    Allowed,
    /// Denied.
    Denied,
}

/// A record as written. Field order is the line's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Position in the log, from 0, without gaps.
    pub seq: u64,
    /// When the record was made (RFC 3339, UTC, microseconds).
    pub ts: String,
    /// The call the record belongs to (empty for log-level records).
    pub call_id: String,
    /// The tool of that call.
    pub tool: String,
    /// What the record is about.
    pub kind: Kind,
    /// The verdict.
    pub verdict: Verdict,
    /// Kind-specific details.
    pub details: serde_json::Value,
    /// SHA-256 (hex) of the previous line, or [`GENESIS`].
    pub prev: String,
}

/// A record before it is placed in a log (no `seq`, `prev` yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// See [`Record::call_id`].
    pub call_id: String,
    /// See [`Record::tool`].
    pub tool: String,
    /// See [`Record::kind`].
    pub kind: Kind,
    /// See [`Record::verdict`].
    pub verdict: Verdict,
    /// See [`Record::details`].
    pub details: Details,
}

impl Entry {
    /// An entry for a call.
    pub fn new(call_id: &str, tool: &str, kind: Kind, verdict: Verdict, details: impl Into<Details>) -> Self {
        Self { call_id: call_id.into(), tool: tool.into(), kind, verdict, details: details.into() }
    }
}

/// Whether an open with these `flags` (an `open` record's `flags`) opens for writing:
/// `O_WRONLY` or `O_RDWR`, or `O_CREAT` or `O_TRUNC`, which change the file whatever the mode.
pub fn opens_for_writing(flags: u64) -> bool {
    let flags = flags as i64;
    flags & i64::from(libc::O_ACCMODE) != i64::from(libc::O_RDONLY)
        || flags & i64::from(libc::O_CREAT | libc::O_TRUNC) != 0
}

/// Hex SHA-256 of `line` (its bytes without the newline).
pub fn line_hash(line: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(line);
    let mut out = String::with_capacity(64);
    for b in digest.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// A record as it is written: [`Record`]'s fields, borrowed (the log serializes each entry
/// without copying its details).
#[derive(Serialize)]
pub(crate) struct RecordRef<'a> {
    pub seq: u64,
    pub ts: &'a str,
    pub call_id: &'a str,
    pub tool: &'a str,
    pub kind: Kind,
    pub verdict: Verdict,
    pub details: &'a Details,
    pub prev: &'a str,
}

/// The current time as the log writes it.
pub fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(line_hash(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(GENESIS.len(), 64);
    }
}
