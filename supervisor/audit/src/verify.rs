//! Checking an audit log's chain: `agentd audit verify`.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use serde::Serialize;

use super::log::{head_path, Head};
use super::record::{line_hash, Kind, Record, GENESIS};
use crate::sign::Public;

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Every record chains to the one before, and the end matches the head file.
    Intact,
    /// The chain is broken: the first bad record, by line (1-based) and seq.
    Tampered {
        /// Line of the first record that does not verify.
        line: usize,
        /// Its seq, if it could be read.
        seq: Option<u64>,
        /// What is wrong.
        reason: String,
    },
    /// The chain is intact up to a final line cut short (a crash mid-write).
    TornTail {
        /// Line of the torn record.
        line: usize,
        /// Its length in bytes.
        bytes: usize,
    },
    /// Verified with a key: the chain and every checkpoint are intact, but records after the
    /// last checkpoint are signed by none (calls still running, or records edited or added
    /// since: the chain alone cannot tell).
    UnsignedTail {
        /// seq of the last checkpoint, if there is one.
        after: Option<u64>,
        /// Records after it.
        records: u64,
    },
}

/// The result of verifying one log.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Complete records that verified.
    pub records: u64,
    /// Lines of torn records that a later writer recovered from (crashes, not tampering).
    pub recovered: Vec<usize>,
    /// Whether a head file was there to check the end against.
    pub head_checked: bool,
    /// The verdict.
    pub outcome: Outcome,
    /// Calls with a `call_start` record and neither a `summary` nor a `killed` one: running
    /// while the log was read, or their supervisor died before it could record their end.
    pub unfinished_calls: Vec<String>,
    /// Checkpoint records seen (their signatures checked when verifying with a key).
    pub checkpoints: u64,
    /// seq and hash of the last checkpoint: what to compare with a copy kept off the host.
    pub last_checkpoint: Option<(u64, String)>,
    /// The key the checkpoints were checked with.
    pub key: Option<String>,
}

struct Line {
    bytes: Vec<u8>,
    complete: bool,
}

fn lines(path: &Path) -> io::Result<Vec<Line>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut out = Vec::new();
    loop {
        let mut buf = Vec::new();
        if r.read_until(b'\n', &mut buf)? == 0 {
            return Ok(out);
        }
        let complete = buf.last() == Some(&b'\n');
        if complete {
            buf.pop();
        }
        out.push(Line { bytes: buf, complete });
    }
}

/// Verifies the chain of the log at `path` and its head file.
pub fn verify(path: &Path) -> io::Result<Report> {
    verify_signed(path, None)
}

/// [`verify`], and with `key` every checkpoint's signature, and that none of the log comes
/// after the last checkpoint.
pub fn verify_signed(path: &Path, key: Option<&Public>) -> io::Result<Report> {
    // The head first: it only moves forward and always names a record already written, so
    // the log read after it holds that record even while writers append.
    let head = std::fs::read_to_string(head_path(path)).ok();
    let lines = lines(path)?;
    let mut report = Report {
        records: 0,
        recovered: Vec::new(),
        head_checked: false,
        outcome: Outcome::Intact,
        unfinished_calls: Vec::new(),
        checkpoints: 0,
        last_checkpoint: None,
        key: key.map(|k| k.text().to_string()),
    };
    // Started calls without an end yet, in the order they started.
    let mut open_calls: Vec<String> = Vec::new();
    let (mut expect_seq, mut expect_prev) = (0u64, GENESIS.to_string());
    // (line, hash) of each record, indexed by seq.
    let mut chain: Vec<(usize, String)> = Vec::new();
    let mut pending_torn: Option<(usize, String)> = None;
    let tampered = |line: usize, seq: Option<u64>, reason: String| Outcome::Tampered { line, seq, reason };
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        if !line.complete {
            // A whole record missing only its newline (a crash right before it) still counts.
            let whole = serde_json::from_slice::<Record>(&line.bytes)
                .is_ok_and(|r| r.seq == expect_seq && r.prev == expect_prev && pending_torn.is_none());
            if whole {
                chain.push((n, line_hash(&line.bytes)));
                report.records += 1;
                break;
            }
            // A crash only tears what was written after the last flush the head records.
            report.outcome = match check_head(head.as_deref(), &chain, &mut report.head_checked) {
                Outcome::Tampered { reason, .. } if reason.contains("cut off") => {
                    Outcome::Tampered { line: n, seq: None, reason }
                }
                _ => Outcome::TornTail { line: n, bytes: line.bytes.len() },
            };
            return Ok(report);
        }
        let rec: Record = match serde_json::from_slice(&line.bytes) {
            Ok(r) => r,
            Err(_) if pending_torn.is_none() => {
                // Possibly a torn line some writer recovered from: the next record says so.
                pending_torn = Some((n, line_hash(&line.bytes)));
                continue;
            }
            Err(e) => {
                report.outcome = tampered(n, None, format!("not an audit record: {e}"));
                return Ok(report);
            }
        };
        if let Some((torn_line, torn_hash)) = pending_torn.take() {
            let vouched = rec.kind == Kind::Recovered && rec.details["torn_sha256"] == torn_hash.as_str();
            if !vouched {
                report.outcome = tampered(torn_line, None, "not an audit record".into());
                return Ok(report);
            }
            report.recovered.push(torn_line);
        }
        if rec.seq != expect_seq {
            let reason = if rec.seq > expect_seq {
                format!(
                    "seq {} follows seq {}: records were removed before this line",
                    rec.seq,
                    expect_seq.wrapping_sub(1)
                )
            } else {
                format!("seq {} repeats or goes back (expected {expect_seq})", rec.seq)
            };
            report.outcome = tampered(n, Some(rec.seq), reason);
            return Ok(report);
        }
        if rec.prev != expect_prev {
            let reason = if n == 1 {
                "the first record does not start the chain".to_string()
            } else {
                format!("its prev hash does not match line {}: that record was altered", n - 1)
            };
            let (line, seq) = if n == 1 { (n, Some(rec.seq)) } else { (n - 1, rec.seq.checked_sub(1)) };
            report.outcome = tampered(line, seq, reason);
            return Ok(report);
        }
        if rec.kind == Kind::Checkpoint {
            if let Some(Err(why)) = key.map(|k| k.check(rec.seq, &rec.prev, &rec.details)) {
                report.outcome = tampered(n, Some(rec.seq), format!("checkpoint: {why}"));
                return Ok(report);
            }
            report.checkpoints += 1;
            report.last_checkpoint = Some((rec.seq, line_hash(&line.bytes)));
        }
        expect_prev = line_hash(&line.bytes);
        chain.push((n, expect_prev.clone()));
        expect_seq += 1;
        report.records += 1;
        match rec.kind {
            Kind::CallStart => open_calls.push(rec.call_id.clone()),
            Kind::Summary | Kind::Killed => open_calls.retain(|c| *c != rec.call_id),
            _ => {}
        }
    }
    report.unfinished_calls = open_calls;
    if let Some((torn_line, _)) = pending_torn {
        report.outcome = tampered(torn_line, None, "not an audit record".into());
        return Ok(report);
    }
    report.outcome = check_head(head.as_deref(), &chain, &mut report.head_checked);
    if key.is_some() && report.outcome == Outcome::Intact {
        let after = report.last_checkpoint.as_ref().map(|(s, _)| *s);
        let records = report.records - after.map_or(0, |s| s + 1);
        if records > 0 {
            report.outcome = Outcome::UnsignedTail { after, records };
        }
    }
    Ok(report)
}

/// Compares the chain with the head file written after the last durable append: the record
/// the head names must be there, unchanged. Records after it are normal (written without a
/// flush before a call started, or a crash came before the head moved).
fn check_head(text: Option<&str>, chain: &[(usize, String)], checked: &mut bool) -> Outcome {
    let last_line = chain.last().map_or(0, |(l, _)| *l);
    let Some(text) = text else {
        if chain.is_empty() {
            return Outcome::Intact;
        }
        // Every call's end is written durably, which writes the head: a log with records and
        // no head lost it, and whatever was cut off its end would go unnoticed.
        return Outcome::Tampered {
            line: last_line,
            seq: None,
            reason: "the head file is missing: records cut off the end could not be detected".into(),
        };
    };
    *checked = true;
    let Ok(head) = serde_json::from_str::<Head>(text) else {
        return Outcome::Tampered { line: last_line, seq: None, reason: "the head file is not valid".into() };
    };
    match usize::try_from(head.seq).ok().and_then(|s| chain.get(s)) {
        Some((_, hash)) if *hash == head.hash => Outcome::Intact,
        Some((line, _)) => Outcome::Tampered {
            line: *line,
            seq: Some(head.seq),
            reason: "the record does not match the head file: it was altered".into(),
        },
        None => Outcome::Tampered {
            line: last_line,
            seq: chain.len().checked_sub(1).map(|s| s as u64),
            reason: format!(
                "the log ends at seq {} but was written up to seq {}: records were cut off the end",
                chain.len() as i64 - 1,
                head.seq
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::log::AuditLog;
    use crate::record::{Entry, Verdict};

    fn log_with(name: &str, n: u64) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("agentd-verify-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let mut log = AuditLog::open(&path).expect("open");
        for i in 0..n {
            let e = Entry::new(
                "call",
                "sh",
                Kind::Open,
                Verdict::Allowed,
                serde_json::json!({ "path": format!("/data/{i}") }),
            );
            log.append(&[e]).expect("append");
        }
        path
    }

    fn edit(path: &Path, f: impl FnOnce(&mut Vec<String>)) {
        let mut lines: Vec<String> = fs::read_to_string(path).expect("read").lines().map(String::from).collect();
        f(&mut lines);
        fs::write(path, lines.join("\n") + "\n").expect("write");
    }

    #[test]
    fn intact_log_verifies() {
        let p = log_with("intact", 5);
        let r = verify(&p).expect("verify");
        assert_eq!((r.records, r.outcome.clone(), r.head_checked), (5, Outcome::Intact, true));
        assert!(r.unfinished_calls.is_empty());
    }

    #[test]
    fn calls_started_without_an_end_are_reported() {
        let p = log_with("unfinished", 0);
        let mut log = AuditLog::open(&p).expect("open");
        let rec = |call: &str, kind| Entry::new(call, "sh", kind, Verdict::Allowed, serde_json::json!({}));
        let entries = [
            rec("ended", Kind::CallStart),
            rec("crashed", Kind::CallStart),
            rec("ended", Kind::Summary),
            rec("killed", Kind::CallStart),
            rec("killed", Kind::Killed),
        ];
        log.append(&entries).expect("append");
        let r = verify(&p).expect("verify");
        assert_eq!((r.outcome.clone(), r.unfinished_calls.clone()), (Outcome::Intact, vec!["crashed".to_string()]));
    }

    #[test]
    fn a_flipped_byte_names_the_altered_record() {
        let p = log_with("flip", 5);
        edit(&p, |l| l[2] = l[2].replace("/data/2", "/data/X"));
        let r = verify(&p).expect("verify");
        assert!(matches!(r.outcome, Outcome::Tampered { line: 3, seq: Some(2), .. }), "{:?}", r.outcome);
        let p = log_with("flip-last", 3);
        edit(&p, |l| l[2] = l[2].replace("/data/2", "/data/Y"));
        assert!(matches!(verify(&p).expect("verify").outcome, Outcome::Tampered { line: 3, .. }));
    }

    #[test]
    fn a_deleted_record_is_found() {
        let p = log_with("delete", 5);
        edit(&p, |l| {
            l.remove(2);
        });
        let r = verify(&p).expect("verify");
        match r.outcome {
            Outcome::Tampered { line: 3, seq: Some(3), reason } => assert!(reason.contains("removed"), "{reason}"),
            o => panic!("{o:?}"),
        }
        let p = log_with("cut", 5);
        edit(&p, |l| l.truncate(3));
        match verify(&p).expect("verify").outcome {
            Outcome::Tampered { reason, .. } => assert!(reason.contains("cut off the end"), "{reason}"),
            o => panic!("{o:?}"),
        }
        // Records after the head (buffered appends, or a crash before the head moved) are fine.
        let p = log_with("beyond", 2);
        let e = Entry::new("call", "sh", Kind::CallStart, Verdict::Allowed, serde_json::json!({}));
        AuditLog::open(&p).expect("open").append_buffered(&[e]).expect("append");
        assert_eq!(verify(&p).expect("verify").outcome, Outcome::Intact);
        let p = log_with("cut2", 5);
        edit(&p, |l| l.truncate(3));
        match verify(&p).expect("verify").outcome {
            Outcome::Tampered { reason, .. } => assert!(reason.contains("cut off the end"), "{reason}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_torn_tail_is_not_tampering_and_recovery_verifies() {
        let p = log_with("torn", 3);
        let mut bytes = fs::read(&p).expect("read");
        bytes.extend_from_slice(b"{\"seq\":3,\"ts\":\"2026");
        fs::write(&p, &bytes).expect("write");
        assert_eq!(verify(&p).expect("verify").outcome, Outcome::TornTail { line: 4, bytes: 19 });
        AuditLog::open(&p).expect("open").append(&[]).expect("recover");
        let r = verify(&p).expect("verify");
        assert_eq!((r.outcome, r.recovered), (Outcome::Intact, vec![4]));
    }
}
