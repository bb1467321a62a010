//! Turning kernel events into audit records.

use std::net::{Ipv4Addr, Ipv6Addr};

use agentd_ebpf_common::syscalls;
use agentd_ebpf_common::{
    Event, AUDIT_ONLY, CHANGE_CHMOD, CHANGE_CHOWN, CHANGE_LINK, CHANGE_MKDIR, CHANGE_MKNOD, CHANGE_RENAME,
    CHANGE_RMDIR, CHANGE_SYMLINK, CHANGE_TRUNCATE, CHANGE_UNLINK, EV_BIND, EV_CHANGE, EV_CONNECT, EV_DEVICE, EV_EXEC,
    EV_EXEC_DONE, EV_MMAP_EXEC, EV_MOUNT, EV_MOVE_MOUNT, EV_OPEN, EV_PTRACE, EV_REFUSED, EV_SIGNAL, EV_UNIX_CONNECT,
    FROM_LSM, MEM_ANONYMOUS, MEM_MPROTECT, NAME_DIR, NAME_KERNEL, NAME_KERNEL_NEW, NAME_NEW, NAME_NEW_DIR, NAME_TARGET,
    NET_BIND, NET_SEND, PATH_OUTSIDE_ROOT, PATH_RESOLVED, PATH_TRUNCATED, PATH_UNRESOLVED, PATH_WALKED, REFUSED_EARLY,
    VERDICT_DENIED,
};
use serde_json::Value;

use crate::{Entry, Field, Fields, Kind, Verdict};

/// The event's path bytes, up to the NUL.
fn raw_bytes(ev: &Event) -> &[u8] {
    let end = ev.path.iter().position(|b| *b == 0).unwrap_or(ev.path.len());
    &ev.path[..end]
}

fn raw_path(ev: &Event) -> String {
    String::from_utf8_lossy(raw_bytes(ev)).into_owned()
}

/// The event's path, put back in order when the kernel's walk wrote it leaf first. A path
/// outside the call's root (a memfd, pipe or socket) has no leading `/`; one cut short keeps
/// its file name and nearest directories after a leading `…` (the component where it was
/// cut is dropped: it may be partial).
fn path(ev: &Event) -> String {
    let raw = String::from_utf8_lossy(raw_bytes(ev));
    if ev.info & PATH_WALKED == 0 {
        return raw.into_owned();
    }
    let cut = ev.info & PATH_TRUNCATED != 0;
    let parts = || raw.split('/').filter(|p| !p.is_empty());
    // Leaf first: the last part is the one nearest the root, and the one a cut made partial.
    let skip = usize::from(cut && parts().nth(1).is_some());
    let prefix = if cut {
        "…/"
    } else if ev.info & PATH_OUTSIDE_ROOT != 0 {
        ""
    } else {
        "/"
    };
    let mut out = String::with_capacity(raw.len() + prefix.len());
    out.push_str(prefix);
    for (i, part) in raw.rsplit('/').filter(|p| !p.is_empty()).skip(skip).enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(part);
    }
    out
}

/// The last component of a path (trailing slashes ignored).
fn last_component(p: &str) -> &str {
    p.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// Joins a relative `name` to the directory `dir` (as the kernel named it).
fn join(dir: &str, name: &str) -> String {
    if name.is_empty() {
        return dir.to_string();
    }
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

fn address(ev: &Event) -> String {
    if ev.family == libc::AF_INET6 as u16 {
        format!("[{}]:{}", Ipv6Addr::from(ev.addr), ev.port)
    } else {
        let [a, b, c, d, ..] = ev.addr;
        format!("{}:{}", Ipv4Addr::new(a, b, c, d), ev.port)
    }
}

fn sock_type(t: u32) -> Field {
    match t as i32 {
        libc::SOCK_STREAM => "stream".into(),
        libc::SOCK_DGRAM => "dgram".into(),
        libc::SOCK_RAW => "raw".into(),
        libc::SOCK_SEQPACKET => "seqpacket".into(),
        0 => Field::Json(Value::Null),
        other => other.into(),
    }
}

/// Path fields: the path, and where it came from (`path_source`): `kernel` when read from the
/// kernel's objects (the LSM hooks' resolution, or the fallback's walk), `user` when it is the
/// string the tool passed, `none` when neither could be read (the path is then empty).
fn path_fields(ev: &Event, d: &mut Fields) {
    let p = path(ev);
    let kernel = ev.info & (PATH_RESOLVED | PATH_WALKED) != 0;
    let source = if kernel {
        "kernel"
    } else if p.is_empty() || ev.info & PATH_UNRESOLVED != 0 {
        "none"
    } else {
        "user"
    };
    d.insert("path", p);
    d.insert("path_source", source);
    d.insert("path_truncated", ev.info & PATH_TRUNCATED != 0);
    if ev.info & PATH_OUTSIDE_ROOT != 0 {
        d.insert("outside_root", true);
    }
    if !kernel && ev.info & FROM_LSM == 0 && ev.target as i32 != libc::AT_FDCWD {
        d.insert("dirfd", ev.target as i32);
    }
}

/// What the kernel says was really opened or executed, given to the record of the attempt
/// (which named the tool's string): the kernel's path becomes `path`, the tool's string stays
/// as `claimed_path`, and `path_mismatch` says when the two end in different file names: a
/// string swapped during the call, or a symlink to a file of another name (`/bin/sh` run as
/// `/usr/bin/dash`). The kernel's path is what was opened either way. The claimed path is
/// never looked up on the host: a string the tool chose could name a path whose lookup
/// blocks, or mounts (an automounter), with agentd's privileges.
pub fn add_kernel_path(entry: &mut Entry, ev: &Event) {
    if ev.info & PATH_WALKED == 0 {
        return;
    }
    let Some(d) = entry.details.fields_mut() else { return };
    let kernel = path(ev);
    let claimed = match d.remove("path") {
        Some(Field::Text(s)) => s,
        other => other.as_ref().and_then(Field::as_str).unwrap_or("").to_string(),
    };
    let mismatch = claimed.is_empty() || last_component(&claimed) != last_component(&kernel);
    d.insert("claimed_path", claimed);
    d.insert("path", kernel);
    d.insert("path_source", "kernel");
    d.insert("path_truncated", ev.info & PATH_TRUNCATED != 0);
    d.insert("path_mismatch", mismatch);
    d.remove("dirfd");
    if ev.info & PATH_OUTSIDE_ROOT != 0 {
        d.insert("outside_root", true);
    }
}

/// More about a change (`EV_NAME`): its second name, a symlink's target text, the directory
/// (from the kernel) that a relative name is relative to, or (LSM layer) the object itself as
/// the kernel resolved it.
pub fn add_name(entry: &mut Entry, ev: &Event) {
    if ev.flags == NAME_KERNEL {
        return add_kernel_path(entry, ev);
    }
    let Some(d) = entry.details.fields_mut() else { return };
    let text = path(ev);
    match ev.flags {
        NAME_NEW => {
            d.insert("new_path", text);
        }
        NAME_TARGET => {
            d.insert("target", text);
            if ev.info & FROM_LSM != 0 {
                d.insert("target_source", "kernel");
            }
        }
        NAME_KERNEL_NEW => {
            if ev.info & PATH_WALKED == 0 {
                return;
            }
            let claimed = d.get_str("new_path").unwrap_or("").to_string();
            let mismatch = claimed.is_empty() || last_component(&claimed) != last_component(&text);
            d.insert("claimed_new_path", claimed);
            d.insert("new_path", text);
            d.insert("new_path_source", "kernel");
            d.insert("new_path_mismatch", mismatch);
        }
        NAME_DIR | NAME_NEW_DIR => {
            if ev.info & PATH_WALKED == 0 {
                return;
            }
            let key = if ev.flags == NAME_DIR { "path" } else { "new_path" };
            let name = d.get_str(key).unwrap_or("").to_string();
            d.insert(key, join(&text, &name));
            let source = if ev.flags == NAME_DIR { "dir_source" } else { "new_dir_source" };
            d.insert(source, "kernel");
            if ev.flags == NAME_DIR {
                d.remove("dirfd");
            }
        }
        _ => {}
    }
}

/// The record of a syscall's result whose attempt was already written (the syscall took
/// longer than the supervisor held the attempt back): the kind and operation from the
/// syscall's number, the result, and for an open the file the kernel opened.
pub fn late_result(ev: &Event, call_id: &str, tool: &str, landlock: bool) -> Entry {
    let mut d = Fields::new();
    d.insert("pid", ev.pid);
    use syscalls::*;
    let kind = match ev.flags {
        SYS_OPEN | SYS_CREAT | SYS_OPENAT | SYS_OPENAT2 => Kind::Open,
        SYS_EXECVE | SYS_EXECVEAT => Kind::Exec,
        nr => {
            let op = match nr {
                SYS_UNLINK | SYS_UNLINKAT => "unlink",
                SYS_RMDIR => "rmdir",
                SYS_RENAME | SYS_RENAMEAT | SYS_RENAMEAT2 => "rename",
                SYS_LINK | SYS_LINKAT => "link",
                SYS_SYMLINK | SYS_SYMLINKAT => "symlink",
                SYS_TRUNCATE | SYS_FTRUNCATE => "truncate",
                SYS_CHMOD | SYS_FCHMOD | SYS_FCHMODAT | SYS_FCHMODAT2 => "chmod",
                SYS_CHOWN | SYS_FCHOWN | SYS_LCHOWN | SYS_FCHOWNAT => "chown",
                SYS_MKNOD | SYS_MKNODAT => "mknod",
                SYS_MKDIR | SYS_MKDIRAT => "mkdir",
                _ => "change",
            };
            d.insert("operation", op);
            Kind::Change
        }
    };
    if ev.info & PATH_WALKED != 0 {
        path_fields(ev, &mut d);
    }
    d.insert("late_result", true);
    d.insert("hook", "tracepoint");
    let mut entry = Entry::new(call_id, tool, kind, Verdict::Allowed, d);
    add_result(&mut entry, ev.ret, landlock);
    entry
}

/// The name of a syscall agentd's seccomp filter refuses, by its x86_64 number.
fn refused_syscall_name(nr: u32) -> String {
    match syscalls::by_number(nr) {
        Some(s) => s.name.to_string(),
        None => format!("syscall {nr}"),
    }
}

/// A change's operation name.
fn change_name(op: u32) -> &'static str {
    match op {
        CHANGE_UNLINK => "unlink",
        CHANGE_RMDIR => "rmdir",
        CHANGE_RENAME => "rename",
        CHANGE_LINK => "link",
        CHANGE_SYMLINK => "symlink",
        CHANGE_TRUNCATE => "truncate",
        CHANGE_CHMOD => "chmod",
        CHANGE_CHOWN => "chown",
        CHANGE_MKNOD => "mknod",
        CHANGE_MKDIR => "mkdir",
        _ => "change",
    }
}

/// A mode's fields: the octal mode, and the bits a reviewer looks for.
fn mode_fields(mode: u64, d: &mut Fields) {
    let mode = mode as u32;
    d.insert("mode", format!("{:o}", mode & 0o7777));
    if mode & 0o4000 != 0 {
        d.insert("setuid", true);
    }
    if mode & 0o2000 != 0 {
        d.insert("setgid", true);
    }
    if mode & 0o0002 != 0 {
        d.insert("world_writable", true);
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
/// kernel refused it for lack of permission, with `by`: `landlock` for `EACCES` where the call
/// runs under Landlock (a file's own mode also gives `EACCES`, and the fallback cannot tell
/// the two apart), `mount` for `EROFS` (a write where the sandbox shows a grant read-only),
/// else `kernel` (file modes, mount flags, seccomp's `EPERM`).
pub fn add_result(entry: &mut Entry, ret: i64, landlock: bool) {
    let read_only = ret == -i64::from(libc::EROFS);
    let denied = ret == -i64::from(libc::EACCES) || ret == -i64::from(libc::EPERM) || read_only;
    if let Some(d) = entry.details.fields_mut() {
        d.insert("result", ret);
        if let Some(name) = errno_name(ret) {
            d.insert("errno", name);
        }
        if denied {
            let by = if read_only {
                "mount"
            } else if landlock && ret == -i64::from(libc::EACCES) {
                "landlock"
            } else {
                "kernel"
            };
            d.insert("by", by);
        }
    }
    if denied {
        entry.verdict = Verdict::Denied;
    }
}

/// Which kind of program saw the event: an LSM hook, a syscall tracepoint, or a cgroup
/// program (connect, bind, sendmsg, devices).
fn hook(ev: &Event) -> &'static str {
    if ev.info & FROM_LSM != 0 {
        "lsm"
    } else if matches!(ev.kind, EV_CONNECT | EV_BIND | EV_DEVICE) && ev.info & REFUSED_EARLY == 0 {
        "cgroup"
    } else {
        "tracepoint"
    }
}

/// The audit record for one event of call `call_id` (tool `tool`).
pub fn to_entry(ev: &Event, call_id: &str, tool: &str) -> Entry {
    let verdict = if ev.verdict == VERDICT_DENIED { Verdict::Denied } else { Verdict::Allowed };
    let mut d = Fields::new();
    d.insert("pid", ev.pid);
    // When the kernel saw it (CLOCK_MONOTONIC): records are written in batches, so the time
    // of an event is this, not its place in the log.
    d.insert("ktime_ns", ev.ts_ns);
    let kind = match ev.kind {
        EV_EXEC => {
            path_fields(ev, &mut d);
            if ev.info & FROM_LSM == 0 && ev.flags as i32 & libc::AT_EMPTY_PATH != 0 {
                d.insert("empty_path", true);
            }
            Kind::Exec
        }
        EV_EXEC_DONE => {
            // An exec whose attempt was not seen (its record lost): the kernel's view alone.
            path_fields(ev, &mut d);
            d.insert("result", 0);
            Kind::Exec
        }
        EV_CHANGE => {
            d.insert("operation", change_name(ev.flags));
            path_fields(ev, &mut d);
            match ev.flags {
                CHANGE_CHMOD => mode_fields(ev.arg, &mut d),
                // Before the umask: what was asked for.
                CHANGE_MKDIR => {
                    d.insert("mode", format!("{:o}", ev.arg as u32 & 0o7777));
                }
                CHANGE_MKNOD => {
                    d.insert("mode", format!("{:o}", (ev.arg >> 32) as u32 & 0o7777));
                    let ty = match (ev.arg >> 32) as u32 & libc::S_IFMT {
                        libc::S_IFIFO => "fifo",
                        libc::S_IFCHR => "char",
                        libc::S_IFBLK => "block",
                        libc::S_IFSOCK => "socket",
                        _ => "file",
                    };
                    d.insert("node", ty);
                    let dev = ev.arg & 0xffff_ffff;
                    if dev != 0 {
                        d.insert("device", format!("{}:{}", libc::major(dev), libc::minor(dev)));
                    }
                }
                CHANGE_CHOWN => {
                    for (k, v) in [("uid", ev.arg >> 32), ("gid", ev.arg & 0xffff_ffff)] {
                        if v != 0xffff_ffff {
                            d.insert(k, v);
                        }
                    }
                }
                CHANGE_TRUNCATE => {
                    d.insert("length", ev.arg);
                }
                _ => {}
            }
            Kind::Change
        }
        EV_MMAP_EXEC if ev.arg & (MEM_ANONYMOUS | MEM_MPROTECT) != 0 => {
            // Memory made executable: anonymous (JIT, shellcode) or refused before the hooks.
            let op = if ev.arg & MEM_MPROTECT != 0 { "mprotect" } else { "mmap" };
            d.insert("operation", op);
            let memory = if ev.arg & MEM_ANONYMOUS != 0 {
                "anonymous"
            } else if ev.path[0] != 0 {
                // A file's mapping gaining execute (LSM layer).
                path_fields(ev, &mut d);
                "file"
            } else {
                "unknown"
            };
            d.insert("memory", memory);
            d.insert("mapping", "executable");
            d.insert("writable", ev.flags & libc::PROT_WRITE as u32 != 0);
            if ev.info & REFUSED_EARLY != 0 {
                d.insert("result", ev.ret);
                if let Some(name) = errno_name(ev.ret) {
                    d.insert("errno", name);
                }
                // seccomp's W^X filter answers EPERM; the kernel's memory-deny-write-execute
                // EACCES.
                let by = if ev.ret == -i64::from(libc::EPERM) { "seccomp" } else { "kernel" };
                d.insert("by", by);
            }
            Kind::Exec
        }
        EV_MMAP_EXEC => {
            path_fields(ev, &mut d);
            d.insert("mapping", "executable");
            Kind::Exec
        }
        EV_OPEN => {
            path_fields(ev, &mut d);
            d.insert("flags", ev.flags);
            Kind::Open
        }
        EV_CONNECT | EV_BIND => {
            d.insert("address", address(ev));
            d.insert("socket", sock_type(ev.sock_type));
            if ev.flags == NET_SEND {
                d.insert("operation", "sendmsg");
            }
            if ev.info & REFUSED_EARLY != 0 {
                // Refused before the cgroup programs ran: by Landlock (EACCES).
                d.insert("result", ev.ret);
                if let Some(name) = errno_name(ev.ret) {
                    d.insert("errno", name);
                }
                d.insert("by", "landlock");
                d.insert("address_source", "user");
            } else if verdict == Verdict::Denied {
                d.insert("by", "bpf");
            }
            if ev.flags == NET_BIND || ev.kind == EV_BIND {
                Kind::Bind
            } else {
                Kind::Connect
            }
        }
        EV_PTRACE => {
            d.insert("target_pid", ev.target);
            d.insert("mode", ev.flags);
            Kind::Ptrace
        }
        EV_UNIX_CONNECT => {
            d.insert("socket_name", raw_path(ev));
            d.insert("device", format!("{}:{}", ev.target >> 20, ev.target & 0xfffff));
            d.insert("inode", ev.ret);
            Kind::UnixConnect
        }
        EV_SIGNAL => {
            d.insert("target_pid", ev.target);
            d.insert("signal", ev.flags);
            Kind::Signal
        }
        EV_MOUNT | EV_MOVE_MOUNT => {
            let op = if ev.kind == EV_MOUNT { "mount" } else { "move_mount" };
            d.insert("operation", op);
            if ev.kind == EV_MOUNT {
                d.insert("fstype", raw_path(ev));
                d.insert("flags", ev.flags);
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
            d.insert("device", format!("{ty} {}:{}", ev.target >> 20, ev.target & 0xfffff));
            let names = [(1, "mknod"), (2, "read"), (4, "write")];
            let access: Vec<&str> = names.iter().filter(|(b, _)| access & b != 0).map(|(_, n)| *n).collect();
            d.insert("access", Value::from(access));
            Kind::Device
        }
        EV_REFUSED => {
            d.insert("syscall", refused_syscall_name(ev.flags));
            d.insert("result", ev.ret);
            if let Some(name) = errno_name(ev.ret) {
                d.insert("errno", name);
            }
            // The filter answers EPERM; the kernel itself may too (mount without the
            // capability, a ptrace Yama refuses), and the exit alone cannot tell them apart.
            d.insert("by", "seccomp");
            Kind::Syscall
        }
        other => {
            d.insert("event", other);
            Kind::Syscall
        }
    };
    d.insert("hook", hook(ev));
    if verdict == Verdict::Denied && ev.info & FROM_LSM != 0 && !d.contains("by") {
        d.insert("by", "bpf");
    }
    if ev.info & AUDIT_ONLY != 0 {
        // Audit mode: the rules would have denied this, and it was let through.
        d.insert("enforced", false);
    }
    Entry::new(call_id, tool, kind, verdict, d)
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
            arg: 0,
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
        let d = &e.details.to_value();
        assert_eq!(
            (d["socket_name"].as_str(), d["device"].as_str(), d["inode"].as_i64()),
            (Some("app.sock"), Some("8:3"), Some(4242))
        );
        assert_eq!(d["hook"], "lsm");
    }

    #[test]
    fn anonymous_executable_memory_says_how_it_was_made() {
        let mut ev = event(EV_MMAP_EXEC);
        ev.arg = MEM_ANONYMOUS;
        ev.flags = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u32;
        let e = to_entry(&ev, "c1", "t");
        let d = &e.details.to_value();
        assert_eq!((d["operation"].as_str(), d["memory"].as_str()), (Some("mmap"), Some("anonymous")), "{d}");
        assert_eq!(d["writable"], true);
        ev.arg = MEM_MPROTECT;
        ev.info = REFUSED_EARLY;
        ev.ret = -i64::from(libc::EACCES);
        let e = to_entry(&ev, "c1", "t");
        let d = e.details.to_value();
        assert_eq!((d["operation"].as_str(), d["by"].as_str()), (Some("mprotect"), Some("kernel")));
        assert_eq!(d["hook"], "tracepoint");
    }

    #[test]
    fn lsm_events_keep_their_details() {
        let e = to_entry(&event(EV_SIGNAL), "c1", "t");
        assert_eq!((e.kind, e.verdict), (Kind::Signal, Verdict::Denied));
        let d = &e.details.to_value();
        assert_eq!(d["target_pid"], 42);
        assert_eq!(d["signal"], 9);
        assert_eq!(d["enforced"], false);
        assert_eq!(d["hook"], "lsm");
    }
}
