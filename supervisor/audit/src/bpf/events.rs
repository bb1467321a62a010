//! Turning kernel events into audit records.

use std::net::{Ipv4Addr, Ipv6Addr};

use agentd_ebpf_common::{
    Event, AUDIT_ONLY, EV_BIND, EV_CONNECT, EV_DEVICE, EV_EXEC, EV_MMAP_EXEC, EV_MOUNT, EV_MOVE_MOUNT, EV_OPEN,
    EV_PTRACE, EV_SIGNAL, EV_UNIX_CONNECT, FROM_LSM, NET_BIND, NET_SEND, PATH_RESOLVED, PATH_TRUNCATED,
    PATH_UNRESOLVED, VERDICT_DENIED,
};
use serde_json::{Map, Value};

use crate::{Entry, Kind, Verdict};

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
    // The LSM hooks see the object itself; the tracer only the string the tool passed,
    // relative to a directory fd unless that is AT_FDCWD.
    let resolved = ev.info & PATH_RESOLVED != 0;
    d.insert("path_source".into(), if resolved { "resolved" } else { "as_passed" }.into());
    if !resolved && ev.info & FROM_LSM == 0 && ev.target as i32 != libc::AT_FDCWD {
        d.insert("dirfd".into(), (ev.target as i32).into());
    }
}

/// Linux errno names for the results the audit log shows most.
fn errno_name(ret: i64) -> Option<&'static str> {
    Some(match i32::try_from(-ret).ok()? {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EACCES => "EACCES",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EROFS => "EROFS",
        libc::ELOOP => "ELOOP",
        libc::EXDEV => "EXDEV",
        libc::ENOEXEC => "ENOEXEC",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        _ => return None,
    })
}

/// Adds a syscall's result to the record of its attempt: the result, and `denied` when the
/// kernel refused it for lack of permission (Landlock, mount flags, file modes, seccomp).
pub fn add_result(entry: &mut Entry, ret: i64) {
    if let Value::Object(d) = &mut entry.details {
        d.insert("result".into(), ret.into());
        if let Some(name) = errno_name(ret) {
            d.insert("errno".into(), name.into());
        }
    }
    if ret == -i64::from(libc::EACCES) || ret == -i64::from(libc::EPERM) {
        entry.verdict = Verdict::Denied;
    }
}

/// The audit record for one event of call `call_id` (tool `tool`).
pub fn to_entry(ev: &Event, call_id: &str, tool: &str) -> Entry {
    let verdict = if ev.verdict == VERDICT_DENIED { Verdict::Denied } else { Verdict::Allowed };
    let mut d = Map::new();
    d.insert("pid".into(), ev.pid.into());
    let kind = match ev.kind {
        EV_EXEC => {
            path_fields(ev, &mut d);
            if ev.info & FROM_LSM == 0 && ev.flags as i32 & libc::AT_EMPTY_PATH != 0 {
                d.insert("empty_path".into(), true.into());
            }
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
            if ev.flags == NET_SEND {
                d.insert("operation".into(), "sendmsg".into());
            }
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
        EV_UNIX_CONNECT => {
            d.insert("socket_name".into(), path(ev).into());
            d.insert("device".into(), format!("{}:{}", ev.target >> 20, ev.target & 0xfffff).into());
            d.insert("inode".into(), ev.ret.into());
            Kind::UnixConnect
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
        EV_DEVICE => {
            let (ty, access) = (ev.flags & 0xffff, ev.flags >> 16);
            let ty = match ty {
                1 => "block",
                2 => "char",
                _ => "any",
            };
            d.insert("device".into(), format!("{ty} {}:{}", ev.target >> 20, ev.target & 0xfffff).into());
            let names = [(1, "mknod"), (2, "read"), (4, "write")];
            let access: Vec<&str> = names.iter().filter(|(b, _)| access & b != 0).map(|(_, n)| *n).collect();
            d.insert("access".into(), access.into());
            Kind::Device
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
            _pad: 0,
            ret: 0,
            tid: 7,
            addr: [0; 16],
            path: [0; agentd_ebpf_common::PATH_LEN],
        }
    }

    #[test]
    fn unix_connects_name_the_socket_and_its_inode() {
        let mut ev = event(EV_UNIX_CONNECT);
        ev.target = (8 << 20) | 3;
        ev.ret = 4242;
        ev.path[..8].copy_from_slice(b"app.sock");
        let e = to_entry(&ev, "c1", "t");
        assert_eq!((e.kind, e.verdict), (Kind::UnixConnect, Verdict::Denied));
        let d = &e.details;
        assert_eq!(
            (d["socket_name"].as_str(), d["device"].as_str(), d["inode"].as_i64()),
            (Some("app.sock"), Some("8:3"), Some(4242))
        );
        assert_eq!(d["hook"], "lsm");
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
