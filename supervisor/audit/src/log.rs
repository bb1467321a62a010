//! Appending to the hash-chained audit log.
//!
//! Every append takes an exclusive `flock` on the log, reads the last line to chain to it,
//! and writes each record as one `write(2)` of a whole line with `O_APPEND`. A durable append
//! then fsyncs (outside the lock: the flush covers every write before it, and other writers
//! need not wait for the disk) and moves the `.head` file beside the log (last seq and hash)
//! forward to its record, so that cutting records off the end is detectable too. A crash can
//! only leave a torn last line: the next writer keeps it (evidence is never deleted), starts
//! a new line, and records a `recovered` record that names the torn bytes by hash, so the
//! chain continues and `audit verify` can tell a crash from tampering.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{line_hash, now, Entry, Kind, Record, RecordRef, Verdict, GENESIS};
use crate::sign::{self, KeyError, Signer};
use crate::sys;

/// Default location of the log.
pub const DEFAULT_PATH: &str = "/var/lib/agentd/audit/audit.jsonl";

/// Why the log could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// An I/O operation on the log failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The last complete line is not a record of ours: refuse to chain to it.
    #[error("the last line of {path} is not an audit record; run `agentd audit verify` on it")]
    Foreign {
        /// The file.
        path: PathBuf,
    },
    /// The log's directory could be written by someone else.
    #[error("the audit log's directory {} {why}; it must be writable by its owner (root) alone", dir.display())]
    UnsafeDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The host's signing key could not be loaded or made.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The log ends before the record its head file names: records were cut off the end.
    #[error("{path} ends at seq {last:?} but was written up to seq {head}: records were cut off; run `agentd audit verify` on it")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// seq of its last record.
        last: Option<u64>,
        /// seq the head file names.
        head: u64,
    },
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> AuditError + 'p {
    move |source| AuditError::Io { op, path: path.to_path_buf(), source }
}

/// The `.head` file: where the log ended after the last append.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// seq of the last record.
    pub seq: u64,
    /// Hash of the last line.
    pub hash: String,
    /// seq of the last signed checkpoint, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
}

/// Path of the head file of `log`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".head");
    log.with_file_name(name)
}

/// An audit log open for appending.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    signer: Option<Signer>,
    /// seq of the last checkpoint this writer wrote or saw in the head file.
    last_checkpoint: Option<u64>,
}

impl AuditLog {
    /// Opens (creating if needed, mode 0600, its directory 0700) the log at `path`, signing
    /// checkpoints with the host's key ([`sign::key_path`], made at first use). The directory
    /// must be ours and writable by no one else: whoever can write there could replace the
    /// log or its head file.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let signer = Signer::load_or_create(&sign::key_path())?;
        Self::open_with(path, Some(signer))
    }

    /// [`AuditLog::open`] with the given signer, or none (no checkpoints).
    pub fn open_with(path: &Path, signer: Option<Signer>) -> Result<Self, AuditError> {
        let io = |op| io_err(op, path);
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("creating the directory of"))?;
        check_dir(dir)?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
            .map_err(io("opening"))?;
        Ok(Self { path: path.to_path_buf(), file, signer, last_checkpoint: None })
    }

    /// Appends `entries` as one batch, chained, fsynced, and moves the head file to it.
    /// Returns the seq of the last one.
    pub fn append(&mut self, entries: &[Entry]) -> Result<u64, AuditError> {
        self.append_with(entries, true)
    }

    /// Appends without waiting for the disk: the records survive agentd being killed (they
    /// are in the kernel's page cache), not a power loss until the next [`AuditLog::append`].
    /// For the record written just before a call starts, where a disk flush would delay it.
    pub fn append_buffered(&mut self, entries: &[Entry]) -> Result<u64, AuditError> {
        self.append_with(entries, false)
    }

    fn append_with(&mut self, entries: &[Entry], durable: bool) -> Result<u64, AuditError> {
        let path = self.path.clone();
        let io = |op| io_err(op, &path);
        let fd = self.file.as_raw_fd();
        sys::flock(fd, false).map_err(io("locking"))?;
        let result = self.append_locked(entries);
        let _ = sys::flock_unlock(fd);
        let (last, written) = result?;
        let Some(hash) = written.filter(|_| durable) else { return Ok(last) };
        self.file.sync_data().map_err(io("syncing"))?;
        // The head only moves forward: a writer whose record is behind one already named
        // (and so already flushed with it) leaves the head alone.
        sys::flock(fd, false).map_err(io("locking"))?;
        let moved = match read_head(&self.path) {
            Some(h) if h.seq >= last => Ok(()),
            _ => write_head(&self.path, &Head { seq: last, hash, checkpoint: self.last_checkpoint }),
        };
        let _ = sys::flock_unlock(fd);
        moved.map_err(io("updating the head file of"))?;
        Ok(last)
    }

    /// Appends under the lock; returns the last seq, and the hash of the last line if it
    /// wrote any.
    fn append_locked(&mut self, entries: &[Entry]) -> Result<(u64, Option<String>), AuditError> {
        let path = self.path.clone();
        let io = |op| io_err(op, &path);
        let tail = read_tail(&mut self.file).map_err(io("reading the end of"))?;
        if entries.is_empty() && tail.torn.is_none() {
            let last = match &tail.last_line {
                Some(line) => serde_json::from_slice::<Record>(line).map(|r| r.seq).unwrap_or(0),
                None => 0,
            };
            return Ok((last, None));
        }
        let (mut seq, mut prev) = match &tail.last_line {
            None => (0, GENESIS.to_string()),
            Some(line) => {
                let rec: Record =
                    serde_json::from_slice(line).map_err(|_| AuditError::Foreign { path: self.path.clone() })?;
                (rec.seq + 1, line_hash(line))
            }
        };
        // Torn bytes that are in fact a whole record chained to the last line (a crash right
        // before its newline): keep it as a record, not as a torn line.
        let mut torn = tail.torn.clone();
        if let Some(bytes) = &torn {
            if let Ok(rec) = serde_json::from_slice::<Record>(bytes) {
                if rec.seq == seq && rec.prev == prev {
                    seq += 1;
                    prev = line_hash(bytes);
                    torn = None;
                    self.file.write_all(b"\n").map_err(io("appending to"))?;
                }
            }
        }
        // Records cut off the end must not be papered over by chaining onto what is left.
        let head = read_head(&self.path);
        if let Some(head) = &head {
            let last = seq.checked_sub(1);
            if last.is_none_or(|l| l < head.seq) {
                return Err(AuditError::Truncated { path: self.path.clone(), last, head: head.seq });
            }
        }
        let mut out = Vec::with_capacity(512 * (entries.len() + 2).min(1024));
        let mut recovered = None;
        if let Some(torn) = &torn {
            // Finish the torn line so the next record starts on a line of its own.
            out.push(b'\n');
            let details = serde_json::json!({ "torn_bytes": torn.len(), "torn_sha256": line_hash(torn) });
            recovered = Some(Entry::new("", "", Kind::Recovered, Verdict::Allowed, details));
        }
        // One time for the whole batch: its records are written together (each event's own
        // time is in its details).
        let ts = now();
        let add = |e: &Entry, seq: &mut u64, prev: &mut String, out: &mut Vec<u8>| -> Result<(), AuditError> {
            let start = out.len();
            encode(&self.path, out, *seq, &ts, prev, e)?;
            *prev = line_hash(&out[start..]);
            *seq += 1;
            out.push(b'\n');
            Ok(())
        };
        for e in recovered.iter().chain(entries) {
            add(e, &mut seq, &mut prev, &mut out)?;
        }
        // A signed checkpoint after every call's end, and at least every CHECKPOINT_EVERY
        // records: it signs this record's seq and prev, so everything before it.
        let since = self.last_checkpoint.max(head.and_then(|h| h.checkpoint));
        self.last_checkpoint = since;
        let ends_call = entries.iter().any(|e| matches!(e.kind, Kind::Summary | Kind::Killed));
        let due = seq.saturating_sub(since.map_or(0, |c| c + 1)) >= sign::CHECKPOINT_EVERY;
        if let Some(signer) = self.signer.as_ref().filter(|_| ends_call || due) {
            let checkpoint = Entry::new("", "", Kind::Checkpoint, Verdict::Allowed, signer.checkpoint(seq, &prev));
            self.last_checkpoint = Some(seq);
            add(&checkpoint, &mut seq, &mut prev, &mut out)?;
        }
        // One write: with O_APPEND a crash leaves at most one torn line at the end.
        self.file.write_all(&out).map_err(io("appending to"))?;
        Ok((seq.saturating_sub(1), Some(prev)))
    }
}

/// Appends one record of the log at `path` to `out` as a line (without its newline),
/// chained to `prev`.
fn encode(path: &Path, out: &mut Vec<u8>, seq: u64, ts: &str, prev: &str, entry: &Entry) -> Result<(), AuditError> {
    let rec = RecordRef {
        seq,
        ts,
        call_id: &entry.call_id,
        tool: &entry.tool,
        kind: entry.kind,
        verdict: entry.verdict,
        details: &entry.details,
        prev,
    };
    serde_json::to_writer(out, &rec).map_err(|e| AuditError::Io {
        op: "encoding a record for",
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })
}

/// The end of the log: its last complete line, and any torn bytes after it.
#[derive(Debug, Default)]
struct Tail {
    last_line: Option<Vec<u8>>,
    torn: Option<Vec<u8>>,
}

/// Reads back from the end far enough to find the last complete line (and torn bytes).
fn read_tail(file: &mut File) -> io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    // A record is a few hundred bytes; the window grows fourfold until it holds a whole line.
    let mut want: u64 = 4 * 1024;
    loop {
        let start = len.saturating_sub(want);
        let mut buf = vec![0u8; usize::try_from(len - start).unwrap_or(usize::MAX)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        let whole = start == 0;
        let (complete, torn) = match buf.last() {
            None => return Ok(Tail::default()),
            Some(b'\n') => (&buf[..buf.len() - 1], None),
            Some(_) => match buf.iter().rposition(|b| *b == b'\n') {
                Some(i) => (&buf[..i], Some(buf[i + 1..].to_vec())),
                None if whole => (&buf[..0], Some(buf.clone())),
                None => {
                    want *= 4;
                    continue;
                }
            },
        };
        let last_line = match complete.iter().rposition(|b| *b == b'\n') {
            Some(i) => Some(complete[i + 1..].to_vec()),
            None if whole => (!complete.is_empty()).then(|| complete.to_vec()),
            None => {
                want *= 4;
                continue;
            }
        };
        return Ok(Tail { last_line, torn });
    }
}

/// The head file of `log`, if there is a readable one.
pub fn read_head(log: &Path) -> Option<Head> {
    serde_json::from_str(&fs::read_to_string(head_path(log)).ok()?).ok()
}

/// Refuses a log directory that is not ours, or that others may write; and one below a
/// directory that someone else could rename it out of (an ancestor another user owns, or
/// may write without the sticky bit).
fn check_dir(dir: &Path) -> Result<(), AuditError> {
    use std::os::unix::fs::MetadataExt;
    let dir = fs::canonicalize(dir).map_err(io_err("checking the directory of", dir))?;
    let me = sys::geteuid();
    for (i, d) in dir.ancestors().enumerate() {
        let md = fs::metadata(d).map_err(io_err("checking the directory of", d))?;
        let (mode, sticky) = (md.mode() & 0o7777, md.mode() & 0o1000 != 0);
        let why = if md.uid() != me && (i == 0 || md.uid() != 0) {
            format!("is owned by uid {}, not {me}", md.uid())
        } else if mode & 0o022 != 0 && (i == 0 || !sticky) {
            format!("has mode {mode:o}: group or others may write it")
        } else {
            continue;
        };
        let why = if i == 0 { why } else { format!("is below {}, which {why}", d.display()) };
        return Err(AuditError::UnsafeDir { dir: dir.clone(), why });
    }
    Ok(())
}

/// Replaces the head file atomically. The temporary file is created afresh, never opened
/// through a symlink or reused: a planted link must not make agentd write elsewhere.
fn write_head(log: &Path, head: &Head) -> io::Result<()> {
    let path = head_path(log);
    let tmp = path.with_extension("head.tmp");
    let create = || {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
    };
    let mut f = match create() {
        // Left by a writer that crashed between creating and renaming it.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_file(&tmp)?;
            create()?
        }
        other => other?,
    };
    f.write_all(serde_json::to_string(head).map_err(io::Error::other)?.as_bytes())?;
    f.sync_data()?;
    fs::rename(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agentd-audit-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir.join("audit.jsonl")
    }

    fn entry(n: u64) -> Entry {
        Entry::new("c1", "sh", Kind::Exec, Verdict::Allowed, serde_json::json!({ "n": n }))
    }

    #[test]
    fn chains_records_across_appends_and_reopens() {
        let path = scratch("chain");
        let mut log = AuditLog::open(&path).expect("open");
        assert_eq!(log.append(&[entry(0), entry(1)]).expect("append"), 1);
        drop(log);
        let mut log = AuditLog::open(&path).expect("reopen");
        assert_eq!(log.append(&[entry(2)]).expect("append"), 2);
        let text = fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        let recs: Vec<Record> = lines.iter().map(|l| serde_json::from_str(l).expect("record")).collect();
        assert_eq!(recs[0].prev, GENESIS);
        assert_eq!(recs[1].prev, line_hash(lines[0].as_bytes()));
        assert_eq!(recs[2].prev, line_hash(lines[1].as_bytes()));
        let head: Head = serde_json::from_str(&fs::read_to_string(head_path(&path)).expect("head")).expect("json");
        assert_eq!((head.seq, head.hash), (2, line_hash(lines[2].as_bytes())));
        let _ = fs::remove_dir_all(path.parent().unwrap_or(&path));
    }

    #[test]
    fn a_torn_tail_is_kept_and_recovered_from() {
        let path = scratch("torn");
        let mut log = AuditLog::open(&path).expect("open");
        log.append(&[entry(0)]).expect("append");
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"seq\":1,\"ts\":\"20"))
            .expect("tear");
        log.append(&[entry(1)]).expect("append after a crash");
        let text = fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], "{\"seq\":1,\"ts\":\"20", "the torn bytes are kept as evidence");
        let rec: Record = serde_json::from_str(lines[2]).expect("recovered record");
        assert_eq!(rec.kind, Kind::Recovered);
        assert_eq!(rec.seq, 1);
        assert_eq!(rec.prev, line_hash(lines[0].as_bytes()), "chains to the last complete record");
        assert_eq!(rec.details["torn_sha256"], line_hash(lines[1].as_bytes()));
        let _ = fs::remove_dir_all(path.parent().unwrap_or(&path));
    }

    /// Writers in parallel, each flushing outside the lock: every record is chained once,
    /// the log verifies, and the head names the last record, never one behind it.
    #[test]
    fn concurrent_durable_appends_chain_and_the_head_ends_at_the_last() {
        let path = scratch("concurrent");
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let path = path.clone();
                s.spawn(move || {
                    let mut log = AuditLog::open(&path).expect("open");
                    for i in 0..50 {
                        log.append(&[entry(t * 100 + i)]).expect("append");
                    }
                });
            }
        });
        let report = crate::verify(&path).expect("verify");
        assert_eq!((report.records, report.outcome, report.head_checked), (200, crate::Outcome::Intact, true));
        assert_eq!(read_head(&path).map(|h| h.seq), Some(199));
        let _ = fs::remove_dir_all(path.parent().expect("dir"));
    }
}
