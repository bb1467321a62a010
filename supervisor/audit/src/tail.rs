//! Reading a log from its end: the newest records first, without reading further back than
//! the caller needs (a restart looks for the records of its last moments in a log of any
//! size).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::record::Record;

/// Bytes read per step back.
const CHUNK: u64 = 256 * 1024;

/// Calls `f` with each record of the log at `path`, newest first, until `f` returns false or
/// the log's start. Lines that do not parse as records (a torn last line) are skipped.
pub fn scan_back(path: &Path, mut f: impl FnMut(&Record) -> bool) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut end = file.seek(SeekFrom::End(0))?;
    // The part of a line cut at the previous step's start: it ends the next step's text.
    let mut cut: Vec<u8> = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        buf.extend_from_slice(&cut);
        // Unless this is the log's start, the text before the first newline may be the end of
        // a line that begins further back: it waits for the next step.
        let first = if start == 0 { None } else { buf.iter().position(|b| *b == b'\n') };
        let (head, whole) = match first {
            Some(i) => (&buf[..i], &buf[i + 1..]),
            None if start == 0 => (&buf[..0], &buf[..]),
            None => (&buf[..], &buf[..0]),
        };
        for line in whole.split(|b| *b == b'\n').rev().filter(|l| !l.is_empty()) {
            if let Ok(r) = serde_json::from_slice::<Record>(line) {
                if !f(&r) {
                    return Ok(());
                }
            }
        }
        cut = head.to_vec();
        end = start;
    }
    Ok(())
}

/// When a record was made, in milliseconds since the epoch, if its `ts` reads.
pub fn ts_ms(r: &Record) -> Option<u64> {
    let t = humantime::parse_rfc3339(&r.ts).ok()?;
    let d = t.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(d.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuditLog, Entry, Kind, Verdict};

    /// Every record, newest first, across chunk boundaries and lines longer than a chunk.
    #[test]
    fn reads_every_record_newest_first() {
        let dir = std::env::temp_dir().join(format!("agentd-tail-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open(&path).expect("open");
        let big = "x".repeat(300 * 1024);
        for i in 0..40 {
            let details = if i % 13 == 0 { serde_json::json!({ "pad": big }) } else { serde_json::json!({ "i": i }) };
            log.append(&[Entry::new(&format!("c{i}"), "t", Kind::CallStart, Verdict::Allowed, details)])
                .expect("append");
        }
        let mut seen = Vec::new();
        scan_back(&path, |r| {
            seen.push(r.call_id.clone());
            true
        })
        .expect("scan");
        let want: Vec<String> = (0..40).rev().map(|i| format!("c{i}")).collect();
        assert_eq!(seen, want);
        let mut n = 0;
        scan_back(&path, |_| {
            n += 1;
            n < 3
        })
        .expect("scan");
        assert_eq!(n, 3, "stops when told");
        let mut first = None;
        scan_back(&path, |r| {
            first = ts_ms(r);
            false
        })
        .expect("scan");
        assert!(first.is_some_and(|t| t > 1_700_000_000_000));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
