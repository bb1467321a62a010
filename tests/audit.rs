//! The audit log through the real binary: every call is recorded before it starts and after
//! it ends, and `audit verify` tells an intact chain from tampering and from a crash.

use std::fs;

use agentd_tests::{agentd, audit_log_for, sandbox_ready, sh, Fixture};
use serde_json::Value;

fn records(log: &std::path::Path) -> Vec<Value> {
    fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn verify(log: &std::path::Path) -> (i32, String) {
    let out = agentd(["audit".as_ref(), "verify".as_ref(), log.as_os_str()]);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn verify_with(log: &std::path::Path, key: &str) -> (i32, String) {
    let out = agentd(["audit".as_ref(), "verify".as_ref(), log.as_os_str(), "--key".as_ref(), key.as_ref()]);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `recs` as the log with every `prev` recomputed and a head file naming the last
/// one: what someone who can write the log, and does not have the key, can do. A record
/// that comes out the same as a line of `original` keeps that line's bytes.
fn rechain(log: &std::path::Path, original: &[u8], recs: &[Value]) {
    let lines: Vec<&str> = std::str::from_utf8(original).expect("utf-8").lines().collect();
    let mut prev = "0".repeat(64);
    let mut text = String::new();
    for (i, r) in recs.iter().enumerate() {
        let mut r = r.clone();
        r["seq"] = i.into();
        r["prev"] = prev.clone().into();
        let same = lines.get(i).filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|o| o == r));
        let line = same.map(|l| l.to_string()).unwrap_or_else(|| serde_json::to_string(&r).expect("json"));
        prev = sha256_hex(line.as_bytes());
        text.push_str(&line);
        text.push('\n');
    }
    fs::write(log, text).expect("write log");
    let head = serde_json::json!({ "seq": recs.len() - 1, "hash": prev });
    fs::write(format!("{}.head", log.display()), head.to_string()).expect("write head");
}

#[test]
fn calls_are_recorded_and_the_chain_verifies() {
    if !sandbox_ready("calls_are_recorded_and_the_chain_verifies") {
        return;
    }
    let fx = Fixture::new("audit");
    let m = fx.manifest("[tools.sh.limits]\ntimeout_ms = 2000");
    let ok = sh(&m, "echo hi");
    let failed = sh(&m, "exit 3");
    let refused = agentd_tests::exec(&m, "nope", &[], &[]);
    let log = audit_log_for(&m);
    let recs = records(&log);
    for (call, kinds) in
        [(&ok, vec!["call_start", "summary"]), (&failed, vec!["call_start", "summary"]), (&refused, vec!["summary"])]
    {
        let id = call.json["call_id"].as_str().unwrap_or_default();
        let mine: Vec<&Value> = recs.iter().filter(|r| r["call_id"] == id).collect();
        let got: Vec<&str> = mine
            .iter()
            .map(|r| r["kind"].as_str().unwrap_or_default())
            .filter(|k| ["call_start", "summary"].contains(k))
            .collect();
        assert_eq!(got, kinds, "records of call {id}: {mine:?}");
        assert_eq!(mine.last().map(|r| r["kind"].as_str()), Some(Some("summary")), "the summary comes last");
        let summary = mine.last().map(|r| &r["details"]).cloned().unwrap_or_default();
        assert_eq!(summary["exit_code"], call.json["exit_code"], "{summary}");
    }
    // With the BPF layer, the call's own actions are recorded between its start and summary.
    if ok.json["enforcement"]["bpf"]["layer"] != "none" {
        let id = ok.json["call_id"].as_str().unwrap_or_default();
        let execs: Vec<&Value> = recs.iter().filter(|r| r["call_id"] == id && r["kind"] == "exec").collect();
        // The tool's own string, and what the kernel ran (/bin/sh may be a symlink).
        let named = |r: &&Value| r["details"]["path"] == "/bin/sh" || r["details"]["claimed_path"] == "/bin/sh";
        assert!(execs.iter().any(named), "no exec event for the tool: {execs:?}");
    }
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("intact: "), "{out}");
    let show = agentd([
        "audit".as_ref(),
        "show".as_ref(),
        log.as_os_str(),
        "--call".as_ref(),
        ok.json["call_id"].as_str().unwrap_or_default().as_ref(),
    ]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("call_start") && text.contains("exit 0"), "{text}");
}

#[test]
fn verify_catches_a_flipped_byte_a_deleted_record_and_a_torn_tail() {
    if !sandbox_ready("verify_catches_a_flipped_byte_a_deleted_record_and_a_torn_tail") {
        return;
    }
    let fx = Fixture::new("tamper");
    let m = fx.manifest("");
    for i in 0..3 {
        sh(&m, &format!("echo {i}"));
    }
    let log = audit_log_for(&m);
    let pristine = fs::read(&log).expect("log");
    let lines: Vec<&[u8]> = pristine.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    assert!(lines.len() >= 6, "{}", lines.len());

    // A flipped byte inside the third record (seq 2).
    let mut flipped = pristine.clone();
    let at = lines[0].len() + lines[1].len() + 2 + lines[2].len() / 2;
    flipped[at] ^= 0x01;
    fs::write(&log, &flipped).expect("write");
    let (code, out) = verify(&log);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":3: TAMPERED"), "{out}");

    // A deleted record (the fourth).
    let mut deleted: Vec<u8> = Vec::new();
    for (i, l) in lines.iter().enumerate().filter(|(i, _)| *i != 3) {
        let _ = i;
        deleted.extend_from_slice(l);
        deleted.push(b'\n');
    }
    fs::write(&log, &deleted).expect("write");
    let (code, out) = verify(&log);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":4: TAMPERED") && out.contains("removed"), "{out}");

    // A torn tail, as a crash mid-write leaves it: part of a record after the last flushed
    // one. Distinct from tampering.
    let mut torn = pristine.clone();
    torn.extend_from_slice(&lines[lines.len() - 1][..40]);
    fs::write(&log, &torn).expect("write");
    let (code, out) = verify(&log);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("torn final record") && !out.contains("TAMPERED"), "{out}");

    // Cutting into the last flushed record is not a crash: the head file knows better.
    fs::write(&log, &pristine[..pristine.len() - 20]).expect("write");
    let (code, out) = verify(&log);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("cut off"), "{out}");
    // And a writer refuses to chain onto a cut log.
    let r = agentd_tests::exec(&m, "sh", &[("command", "true")], &[]);
    assert_eq!(r.code, 125, "{}", r.json);
    assert!(r.json["error"].as_str().unwrap_or_default().contains("cut off"), "{}", r.json);
    fs::write(&log, &torn).expect("write");

    // The next call recovers: the chain goes on and verifies again.
    sh(&m, "echo after the crash");
    let (code, out) = verify(&log);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("recovered"), "{out}");
}

#[test]
fn a_rewritten_chain_fails_the_signed_checkpoints() {
    if !sandbox_ready("a_rewritten_chain_fails_the_signed_checkpoints") {
        return;
    }
    let fx = Fixture::new("signed");
    let m = fx.manifest("");
    for i in 0..3 {
        sh(&m, &format!("echo {i}"));
    }
    let key = String::from_utf8_lossy(&agentd(["audit", "key"]).stdout).trim().to_string();
    assert!(key.starts_with("ed25519:"), "{key}");
    let log = audit_log_for(&m);
    let (pristine, head) = (fs::read(&log).expect("log"), fs::read(format!("{}.head", log.display())).expect("head"));
    let restore = || {
        fs::write(&log, &pristine).expect("restore log");
        fs::write(format!("{}.head", log.display()), &head).expect("restore head");
    };
    let (code, out) = verify_with(&log, &key);
    assert_eq!(code, 0, "{out}");
    let recs = records(&log);
    let checkpoints: Vec<usize> = (0..recs.len()).filter(|i| recs[*i]["kind"] == "checkpoint").collect();
    assert_eq!(checkpoints.len(), 3, "a checkpoint after each call: {recs:#?}");
    assert_eq!(checkpoints.last(), Some(&(recs.len() - 1)), "the log ends with one");

    // An edited record with the chain and head recomputed: the chain alone cannot tell...
    let mut edited = recs.clone();
    edited[1]["details"]["argv"] = serde_json::json!(["/bin/sh", "-c", "echo nothing to see"]);
    rechain(&log, &pristine, &edited);
    assert_eq!(verify(&log).0, 0, "the chain was recomputed");
    // ...the checkpoint after it can.
    let (code, out) = verify_with(&log, &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED") && out.contains("checkpoint"), "{out}");

    // A record added after the last checkpoint is not signed.
    let mut added = recs.clone();
    added.push(recs[1].clone());
    rechain(&log, &pristine, &added);
    let (code, out) = verify_with(&log, &key);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not covered by a signed checkpoint"), "{out}");

    // A checkpoint from another key, or with its signature changed.
    let mut other = recs.clone();
    other[checkpoints[0]]["details"]["key"] = format!("ed25519:{}", "1".repeat(64)).into();
    rechain(&log, &pristine, &other);
    let (code, out) = verify_with(&log, &key);
    assert!(code == 1 && out.contains("another key"), "{out}");
    let mut forged = recs.clone();
    let sig = forged[checkpoints[0]]["details"]["signature"]
        .as_str()
        .unwrap_or_default()
        .replacen('a', "b", 1)
        .replacen('0', "1", 1);
    forged[checkpoints[0]]["details"]["signature"] = sig.into();
    rechain(&log, &pristine, &forged);
    let (code, out) = verify_with(&log, &key);
    assert!(code == 1 && out.contains("does not match"), "{out}");

    // The last call cut off in its middle, head rewritten: its start is not signed.
    rechain(&log, &pristine, &recs[..checkpoints[2] - 1]);
    let (code, out) = verify_with(&log, &key);
    assert_eq!(code, 3, "{out}");

    // Cut back to an earlier checkpoint, head rewritten: every check passes. Only the last
    // checkpoint, which verify prints, told apart from a copy kept off the host shows it.
    rechain(&log, &pristine, &recs[..=checkpoints[1]]);
    let (code, out) = verify_with(&log, &key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("last checkpoint: seq {}", checkpoints[1])), "{out}");

    // No head file: not intact.
    restore();
    fs::remove_file(format!("{}.head", log.display())).expect("rm head");
    let (code, out) = verify_with(&log, &key);
    assert!(code == 1 && out.contains("head file is missing"), "{out}");
    restore();
    assert_eq!(verify_with(&log, &key).0, 0);
}
