//! The tamper-evident audit log: one JSON object per line, each carrying the SHA-256 of the
//! line before it. One `call_start` record is written before a call starts, event records
//! while it runs, and one `summary` record after it ends (with the count of lost events).

mod log;
mod record;
mod verify;

pub use self::log::{AuditError, AuditLog, DEFAULT_PATH};
pub use self::record::{Entry, Kind, Record, Verdict};
pub use self::verify::{verify, Outcome};
