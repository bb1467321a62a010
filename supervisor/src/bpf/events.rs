//! Turning kernel events into audit records.

use std::net::{Ipv4Addr, Ipv6Addr};

use agentd_ebpf_common::{
    Event, AUDIT_ONLY, EV_BIND, EV_CONNECT, EV_EXEC, EV_MMAP_EXEC, EV_MOUNT, EV_MOVE_MOUNT, EV_OPEN, EV_PTRACE,
    EV_SIGNAL, FROM_LSM, NET_BIND, PATH_RESOLVED, PATH_TRUNCATED, PATH_UNRESOLVED, VERDICT_DENIED,
};
use serde_json::{Map, Value};

use crate::audit::{Entry, Kind, Verdict};

fn path(ev: &Event) -> String {
    let end = ev.path.iter().position(|b| *b == 0).unwrap_or(ev.path.len());
    String::from_utf8_lossy(&ev.path[..end]).into_owned()
}

fn address(ev: &Event) -> String {
    if ev.family == libc::AF_INET6 as u16 {
        format!("[{}]:{}", Ipv6Addr::from(ev.addr), ev.port)
    } else {
        let [a, b, c, d, ..] = ev.addr;
        format!("{}:{}", Ipv4Addr::new(a, b, c, d), ev.port)
    }
}

fn sock_type(t: u32) -> Value {
    match t as i32 {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        0 => Value::Null,
        other => other.into(),
    }
}

/// Path fields: the path, and how it was obtained.
fn path_fields(ev: &Event, d: &mut Map<String, Value>) {
    d.insert("path".into(), path(ev).into());
    d.insert("path_truncated".into(), (ev.info & PATH_TRUNCATED != 0).into());
    if ev.info & PATH_UNRESOLVED != 0 {
        d.insert("path_unresolved".into(), true.into());
    }
    // The LSM hooks see the object itself; the tracer only the string the tool passed.
    let source = if ev.info & PATH_RESOLVED != 0 { "resolved" } else { "as_passed" };
    d.insert("path_source".into(), source.into());
}

/// The audit record for one event of call `call_id` (tool `tool`).
pub fn to_entry(ev: &Event, call_id: &str, tool: &str) -> Entry {
    let verdict = if ev.verdict == VERDICT_DENIED { Verdict::Denied } else { Verdict::Allowed };
    let mut d = Map::new();
    d.insert("pid".into(), ev.pid.into());
    let kind = match ev.kind {
        EV_EXEC => {
            path_fields(ev, &mut d);
            Kind::Exec
        }
        EV_MMAP_EXEC => {
            path_fields(ev, &mut d);
            d.insert("mapping".into(), "executable".into());
            Kind::Exec
        }
        EV_OPEN => {
            path_fields(ev, &mut d);
            d.insert("flags".into(), ev.flags.into());
            Kind::Open
        }
        EV_CONNECT | EV_BIND => {
            d.insert("address".into(), address(ev).into());
            d.insert("socket".into(), sock_type(ev.sock_type));
            if ev.flags == NET_BIND || ev.kind == EV_BIND {
                Kind::Bind
            } else {
                Kind::Connect
            }
        }
        EV_PTRACE => {
            d.insert("target_pid".into(), ev.target.into());
            d.insert("mode".into(), ev.flags.into());
            Kind::Ptrace
        }
        EV_SIGNAL => {
            d.insert("target_pid".into(), ev.target.into());
            d.insert("signal".into(), ev.flags.into());
            Kind::Signal
        }
        EV_MOUNT | EV_MOVE_MOUNT => {
            let op = if ev.kind == EV_MOUNT { "mount" } else { "move_mount" };
            d.insert("operation".into(), op.into());
            if ev.kind == EV_MOUNT {
                d.insert("fstype".into(), path(ev).into());
                d.insert("flags".into(), ev.flags.into());
            }
            Kind::Mount
        }
        other => {
            d.insert("event".into(), other.into());
            Kind::Syscall
        }
    };
    d.insert("hook".into(), if ev.info & FROM_LSM != 0 { "lsm" } else { "fallback" }.into());
    if ev.info & AUDIT_ONLY != 0 {
        // Audit mode: the rules would have denied this, and it was let through.
        d.insert("enforced".into(), false.into());
    }
    Entry::new(call_id, tool, kind, verdict, Value::Object(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u32) -> Event {
        Event {
            cgroup_id: 1,
            ts_ns: 0,
            kind,
            verdict: VERDICT_DENIED,
            pid: 7,
            flags: 9,
            family: 0,
            port: 0,
            info: FROM_LSM | AUDIT_ONLY,
            target: 42,
            sock_type: 0,
            addr: [0; 16],
            path: [0; agentd_ebpf_common::PATH_LEN],
        }
    }

    #[test]
    fn lsm_events_keep_their_details() {
        let e = to_entry(&event(EV_SIGNAL), "c1", "t");
        assert_eq!((e.kind, e.verdict), (Kind::Signal, Verdict::Denied));
        let d = &e.details;
        assert_eq!(d["target_pid"], 42);
        assert_eq!(d["signal"], 9);
        assert_eq!(d["enforced"], false);
        assert_eq!(d["hook"], "lsm");
    }
}
