//! Turning kernel events into audit records.

use std::net::{Ipv4Addr, Ipv6Addr};

use agentd_ebpf_common::{Event, EV_BIND, EV_CONNECT, EV_EXEC, EV_OPEN, NET_BIND, PATH_TRUNCATED, VERDICT_DENIED};

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

/// The audit record for one event of call `call_id` (tool `tool`).
pub fn to_entry(ev: &Event, call_id: &str, tool: &str) -> Entry {
    let verdict = if ev.verdict == VERDICT_DENIED { Verdict::Denied } else { Verdict::Allowed };
    let truncated = ev.info & PATH_TRUNCATED != 0;
    let (kind, details) = match ev.kind {
        EV_EXEC => (Kind::Exec, serde_json::json!({ "path": path(ev), "path_truncated": truncated, "pid": ev.pid })),
        EV_OPEN => (
            Kind::Open,
            serde_json::json!({ "path": path(ev), "path_truncated": truncated, "flags": ev.flags, "pid": ev.pid }),
        ),
        EV_CONNECT | EV_BIND => {
            let kind = if ev.flags == NET_BIND || ev.kind == EV_BIND { Kind::Bind } else { Kind::Connect };
            (kind, serde_json::json!({ "address": address(ev), "pid": ev.pid }))
        }
        other => (Kind::Syscall, serde_json::json!({ "event": other, "pid": ev.pid })),
    };
    Entry::new(call_id, tool, kind, verdict, details)
}
