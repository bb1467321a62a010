//! Fallback: what a call's tool asks of the file system, from the syscalls that ask.
//!
//! - Opens are recorded at their end alone (the entry's tracepoints are not attached for
//!   them: half the cost): the string the tool passed (read from its memory then: a claim),
//!   its flags and the result, and for a successful open the file from the kernel's objects
//!   (the new descriptor's `struct file`, walked to the task's root: [`crate::walk`]). A
//!   thread opening the same file with the same flags again is counted in `REPEATS`, not
//!   recorded again: the supervisor writes each count as a record of its own when the call
//!   ends. Counts are records too; nothing is dropped.
//! - Execs are recorded at entry with the string the tool passed (so a tool killed in the
//!   middle still leaves the attempt), and at exit with the result; a successful exec's
//!   record names the file from `sched_process_exec`'s `linux_binprm`. A string swapped or
//!   unreadable during the call cannot change what the record names.
//! - File-system changes (unlink, rmdir, rename, link, symlink, truncate, chmod, chown,
//!   mknod, mkdir) are recorded at entry with their names and arguments, and at exit with the
//!   result. A name relative to a directory fd or to the working directory comes with that
//!   directory as the kernel names it; a change made through a descriptor names the
//!   descriptor's file.
//! - connect and bind that the kernel refused before agentd's cgroup programs ran (Landlock:
//!   `EACCES`) are recorded at exit, with the address the tool passed; so is an `mprotect`
//!   adding execute that the kernel refused (memory-deny-write-execute, seccomp).
//!
//! The LSM layer attaches these programs too, with [`LSM_LAYER`] set: its hooks record opens
//! and execs, so here those are kept aside at entry and recorded only when the kernel
//! refused them before the hooks ran (Landlock's `EACCES`); changes are recorded as on the
//! fallback, and its `path_*` hooks name their objects from the kernel.
//!
//! The handlers take the syscall number and its arguments, so they serve two attachments:
//! per-syscall tracepoints (`syscalls/sys_enter_*`, where the kernel can pin such links:
//! Linux 5.15 and later), which cost nothing to other syscalls; and the raw `sys_enter` and
//! `sys_exit` tracepoints on older kernels, which see every syscall.

use agentd_ebpf_common::syscalls::*;
use agentd_ebpf_common::{
    CallInfo, RepeatCount, RepeatKey, CALL_NO_REPEATS, REPEATS_PER_CALL, VALID_OPEN_FLAGS, CHANGE_CHMOD, CHANGE_CHOWN, CHANGE_LINK, CHANGE_MKDIR, CHANGE_MKNOD, CHANGE_RENAME,
    CHANGE_RMDIR, CHANGE_SYMLINK, CHANGE_TRUNCATE, CHANGE_UNLINK, EV_BIND, EV_CHANGE, EV_CONNECT, EV_EXEC,
    EV_EXEC_DONE, EV_MMAP_EXEC, EV_NAME, EV_OPEN, EV_REFUSED, EV_RESULT, MEM_MPROTECT, NAME_DIR, NAME_NEW,
    NAME_NEW_DIR, NAME_TARGET, NET_BIND, NET_CONNECT, PATH_LEN, PATH_TRUNCATED, REFUSED_EARLY, REPEAT_TRACKED,
    VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::helpers::gen::{
    bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_task_pt_regs,
};
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_str_bytes};
use aya_ebpf::macros::{map, raw_tracepoint, tracepoint};
use aya_ebpf::maps::{LruHashMap, PerCpuArray};
use aya_ebpf::programs::{RawTracePointContext, TracePointContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::{debug, warn};

use crate::{count_lost, current_call, reserve, submit, walk, OFFSETS, REPEATS, REPEAT_QUOTA};

/// `AT_FDCWD`, as the syscall passes it.
const AT_FDCWD: u64 = -100i64 as u64;
/// unlinkat's flag that makes it rmdir.
const AT_REMOVEDIR: u64 = 0x200;
/// creat() is open(O_CREAT | O_WRONLY | O_TRUNC).
const CREAT_FLAGS: u64 = 0o100 | 0o1 | 0o1000;
const EACCES: i64 = 13;
const O_CREAT: u32 = 0o100;
const O_EXCL: u32 = 0o200;
const O_TRUNC: u32 = 0o1000;
const EPERM: i64 = 1;
const PROT_EXEC: u64 = 4;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// The address a thread passed to connect or bind, kept from entry to exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockArg {
    family: u16,
    port: u16,
    op: u32,
    addr: [u8; 16],
}

#[map(name = "NET_PENDING")]
static NET_PENDING: LruHashMap<u64, SockArg> = LruHashMap::with_max_entries(4096, 0);

/// 1 when the LSM layer attached these programs (set by the loader before verification).
#[no_mangle]
static LSM_LAYER: u32 = 0;

fn lsm_layer() -> bool {
    // SAFETY: a read of the program's read-only data.
    unsafe { core::ptr::read_volatile(&LSM_LAYER) != 0 }
}

/// An attempt kept aside from entry to exit, recorded only if the kernel refused it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Aside {
    kind: u32,
    flags: u32,
    user: u64,
    dirfd: u64,
}

/// By thread. An LRU map, so that entries of threads that never came back (killed in the
/// syscall, or an exec from another thread, which changes the thread's id) go by
/// themselves; large, since every CPU keeps free entries of its own.
#[map(name = "ASIDE")]
static ASIDE: LruHashMap<u64, Aside> = LruHashMap::with_max_entries(32768, 0);

/// What an event names: a string in the tool's memory, or a file as the kernel has it
/// (vfsmount, dentry).
#[derive(Clone, Copy)]
enum Named {
    User(u64),
    Kernel(u64, u64),
}

/// Emits an event naming `what`.
#[inline(always)]
fn emit(cgid: u64, ring: u32, kind: u32, flags: u32, what: Named, target: u64, arg: u64) {
    if let Some(mut entry) = reserve(cgid, ring, kind, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record; a string is read by the helper, which cannot
        // fault.
        unsafe {
            (*ev).flags = flags;
            (*ev).target = target as u32;
            (*ev).arg = arg;
            match what {
                Named::User(user) => {
                    let dst = &mut (*ev).path;
                    match bpf_probe_read_user_str_bytes(user as *const u8, dst) {
                        Ok(s) if s.len() >= PATH_LEN - 1 => (*ev).info = PATH_TRUNCATED,
                        Ok(_) => {}
                        Err(_) => dst[0] = 0,
                    }
                }
                Named::Kernel(mnt, dentry) => (*ev).info = walk::name(mnt, dentry, &mut (*ev).path),
            }
        }
        submit(entry);
    }
}

/// Where a name relative to `dirfd` is: the directory fd's file, or the working directory.
fn dir_of(dirfd: u64) -> (u64, u64) {
    if dirfd == AT_FDCWD || dirfd as u32 == AT_FDCWD as u32 {
        walk::cwd()
    } else {
        walk::file_path(walk::file_of_fd(dirfd as i32 as i64))
    }
}

/// Whether the tool's string at `user` starts with `/` (an unreadable one counts as
/// relative, so its directory is recorded too).
fn absolute(user: u64) -> bool {
    // SAFETY: the helper reads user memory and fails instead of faulting.
    unsafe { bpf_probe_read_user(user as *const u8) }.is_ok_and(|c| c == b'/')
}

fn owner(uid: u64, gid: u64) -> u64 {
    (uid & 0xffff_ffff) << 32 | (gid & 0xffff_ffff)
}

/// What a syscall's entry records, decoded from its arguments. It is written to map memory
/// and read back before anything is emitted: the verifier then sees one set of unknown
/// values, and checks the emitting code (and its path walks) once, not once per syscall.
#[repr(C)]
pub struct Plan {
    kind: u64,
    flags: u64,
    /// The tool's string, or, for a change made through a descriptor, `u64::MAX`.
    user: u64,
    dirfd: u64,
    arg: u64,
    fd: u64,
    /// `NAME_NEW`, `NAME_TARGET` or 0.
    second: u64,
    user2: u64,
    dirfd2: u64,
}

#[map(name = "PLAN")]
static PLAN: PerCpuArray<Plan> = PerCpuArray::with_max_entries(1, 0);

fn put(v: &mut u64, x: u64) {
    // SAFETY: a valid reference.
    unsafe { core::ptr::write_volatile(v, x) }
}

fn take(v: &u64) -> u64 {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(v) }
}

/// Fills `p` for the syscall `nr`; false for syscalls that record nothing here.
fn decode(p: &mut Plan, nr: u32, a: [u64; 6]) -> bool {
    let fd_change = |p: &mut Plan, op: u32, fd: u64, arg: u64| {
        put(&mut p.kind, u64::from(EV_CHANGE));
        put(&mut p.flags, u64::from(op));
        put(&mut p.user, u64::MAX);
        put(&mut p.fd, fd);
        put(&mut p.arg, arg);
    };
    // (kind, flags, dirfd, string, arg)
    let one = |p: &mut Plan, kind: u32, flags: u64, dirfd: u64, user: u64, arg: u64| {
        put(&mut p.kind, u64::from(kind));
        put(&mut p.flags, flags);
        put(&mut p.dirfd, dirfd);
        put(&mut p.user, user);
        put(&mut p.arg, arg);
    };
    let two = |p: &mut Plan, role: u32, dirfd: u64, user: u64| {
        put(&mut p.second, u64::from(role));
        put(&mut p.dirfd2, dirfd);
        put(&mut p.user2, user);
    };
    put(&mut p.second, 0);
    let change = u64::from;
    match nr {
        SYS_EXECVE => one(p, EV_EXEC, 0, AT_FDCWD, a[0], 0),
        // The flags say AT_EMPTY_PATH for a fileless exec of the fd itself.
        SYS_EXECVEAT => one(p, EV_EXEC, a[4], a[0], a[1], 0),
        SYS_UNLINK => one(p, EV_CHANGE, change(CHANGE_UNLINK), AT_FDCWD, a[0], 0),
        SYS_RMDIR => one(p, EV_CHANGE, change(CHANGE_RMDIR), AT_FDCWD, a[0], 0),
        SYS_UNLINKAT => {
            let op = if a[2] & AT_REMOVEDIR != 0 { CHANGE_RMDIR } else { CHANGE_UNLINK };
            one(p, EV_CHANGE, change(op), a[0], a[1], 0)
        }
        SYS_RENAME | SYS_LINK => {
            let op = if nr == SYS_RENAME { CHANGE_RENAME } else { CHANGE_LINK };
            one(p, EV_CHANGE, change(op), AT_FDCWD, a[0], 0);
            two(p, NAME_NEW, AT_FDCWD, a[1]);
        }
        SYS_RENAMEAT | SYS_RENAMEAT2 | SYS_LINKAT => {
            let op = if nr == SYS_LINKAT { CHANGE_LINK } else { CHANGE_RENAME };
            one(p, EV_CHANGE, change(op), a[0], a[1], a[4]);
            two(p, NAME_NEW, a[2], a[3]);
        }
        SYS_SYMLINK | SYS_SYMLINKAT => {
            let (dirfd, link) = if nr == SYS_SYMLINK { (AT_FDCWD, a[1]) } else { (a[1], a[2]) };
            one(p, EV_CHANGE, change(CHANGE_SYMLINK), dirfd, link, 0);
            two(p, NAME_TARGET, AT_FDCWD, a[0]);
        }
        SYS_TRUNCATE => one(p, EV_CHANGE, change(CHANGE_TRUNCATE), AT_FDCWD, a[0], a[1]),
        SYS_FTRUNCATE => fd_change(p, CHANGE_TRUNCATE, a[0], a[1]),
        SYS_CHMOD => one(p, EV_CHANGE, change(CHANGE_CHMOD), AT_FDCWD, a[0], a[1]),
        SYS_FCHMOD => fd_change(p, CHANGE_CHMOD, a[0], a[1]),
        SYS_FCHMODAT | SYS_FCHMODAT2 => one(p, EV_CHANGE, change(CHANGE_CHMOD), a[0], a[1], a[2]),
        SYS_CHOWN | SYS_LCHOWN => one(p, EV_CHANGE, change(CHANGE_CHOWN), AT_FDCWD, a[0], owner(a[1], a[2])),
        SYS_FCHOWN => fd_change(p, CHANGE_CHOWN, a[0], owner(a[1], a[2])),
        SYS_FCHOWNAT => one(p, EV_CHANGE, change(CHANGE_CHOWN), a[0], a[1], owner(a[2], a[3])),
        SYS_MKNOD => one(p, EV_CHANGE, change(CHANGE_MKNOD), AT_FDCWD, a[0], a[1] << 32 | (a[2] & 0xffff_ffff)),
        SYS_MKNODAT => one(p, EV_CHANGE, change(CHANGE_MKNOD), a[0], a[1], a[2] << 32 | (a[3] & 0xffff_ffff)),
        SYS_MKDIR => one(p, EV_CHANGE, change(CHANGE_MKDIR), AT_FDCWD, a[0], a[1]),
        SYS_MKDIRAT => one(p, EV_CHANGE, change(CHANGE_MKDIR), a[0], a[1], a[2]),
        SYS_MPROTECT | SYS_PKEY_MPROTECT if a[2] & PROT_EXEC != 0 => one(p, EV_MMAP_EXEC, a[2], 0, 0, 0),
        _ => return false,
    }
    true
}

/// Records an attempt named by the tool's string `user`, relative to `dirfd`, and, for a
/// change by a relative name, the directory as the kernel names it.
#[inline(always)]
fn attempt(cgid: u64, ring: u32, kind: u32, flags: u32, user: u64, dirfd: u64, arg: u64) {
    emit(cgid, ring, kind, flags, Named::User(user), dirfd, arg);
    if (kind == EV_CHANGE || lsm_layer()) && !absolute(user) {
        let at = dir_of(dirfd);
        emit(cgid, ring, EV_NAME, NAME_DIR, Named::Kernel(at.0, at.1), dirfd, 0);
    }
}

/// The attempt kept aside at entry, if the kernel refused it (`ret`) before any hook of
/// agentd's ran: recorded now. True when the syscall's result is to follow.
fn refused_aside(cgid: u64, ring: u32, nr: u32, ret: i64) -> bool {
    let kind = match nr {
        SYS_MPROTECT | SYS_PKEY_MPROTECT => EV_MMAP_EXEC,
        _ => EV_EXEC,
    };
    // SAFETY: a helper without arguments.
    let id = unsafe { bpf_get_current_pid_tgid() };
    // SAFETY: the value is copied out before the entry is removed.
    let found = (unsafe { ASIDE.get(&id) }).copied();
    if found.is_some() {
        let _ = ASIDE.remove(&id);
    }
    // An entry left by another syscall of this thread id is not this one's.
    let Some(a) = found.filter(|a| a.kind == kind) else {
        if ret == -EACCES && kind != EV_MMAP_EXEC {
            // Refused, and its entry gone: recorded without a name rather than not at all.
            emit(cgid, ring, kind, 0, Named::User(0), AT_FDCWD, 0);
            return true;
        }
        return false;
    };
    if a.kind == EV_MMAP_EXEC {
        // EACCES: the kernel's memory-deny-write-execute. (seccomp's EPERM comes with no
        // entry; an EPERM after one is an LSM hook's, recorded there.)
        if ret == -EACCES {
            if let Some(mut entry) = reserve(cgid, ring, EV_MMAP_EXEC, VERDICT_DENIED) {
                let ev = entry.as_mut_ptr();
                // SAFETY: `ev` is the reserved record.
                unsafe {
                    (*ev).flags = a.flags;
                    (*ev).arg = MEM_MPROTECT;
                    (*ev).info = REFUSED_EARLY;
                    (*ev).ret = ret;
                    (*ev).target = nr;
                }
                submit(entry);
            }
        }
        return false;
    }
    if ret != -EACCES {
        return false;
    }
    attempt(cgid, ring, a.kind, a.flags, a.user, a.dirfd, 0);
    true
}

/// Records a connect's or bind's address until its end.
fn remember_address(nr: u32, a: [u64; 6]) {
    let op = if nr == SYS_BIND { NET_BIND } else { NET_CONNECT };
    let mut s = SockArg { family: 0, port: 0, op, addr: [0; 16] };
    let sa = a[1] as *const u8;
    // SAFETY: user memory read through the helper, which cannot fault.
    unsafe {
        s.family = bpf_probe_read_user(sa as *const u16).unwrap_or(0);
        s.port = u16::from_be(bpf_probe_read_user(sa.add(2) as *const u16).unwrap_or(0));
        if s.family == AF_INET {
            s.addr[..4].copy_from_slice(&bpf_probe_read_user(sa.add(4) as *const [u8; 4]).unwrap_or([0; 4]));
        } else if s.family == AF_INET6 {
            s.addr = bpf_probe_read_user(sa.add(8) as *const [u8; 16]).unwrap_or([0; 16]);
        }
    }
    if s.family == AF_INET || s.family == AF_INET6 {
        // SAFETY: a helper without arguments.
        let id = unsafe { bpf_get_current_pid_tgid() };
        let _ = NET_PENDING.insert(&id, &s, 0);
    }
}

/// The open syscalls, recorded at their end alone ([`opened`]).
fn is_open(nr: u32) -> bool {
    matches!(nr, SYS_OPEN | SYS_CREAT | SYS_OPENAT | SYS_OPENAT2)
}

/// A syscall's entry: `a` are its six arguments.
fn enter(nr: u32, a: [u64; 6]) {
    if is_open(nr) {
        return;
    }
    let Some((cgid, info)) = current_call() else { return };
    let ring = info.ring;
    if nr == SYS_CONNECT || nr == SYS_BIND {
        remember_address(nr, a);
        return;
    }
    let Some(p) = PLAN.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's copy; tracing programs do not nest on a CPU.
    let p = unsafe { &mut *p };
    if !decode(p, nr, a) {
        return;
    }
    let (kind, flags, user, dirfd, arg) =
        (take(&p.kind) as u32, take(&p.flags) as u32, take(&p.user), take(&p.dirfd), take(&p.arg));
    if kind == EV_MMAP_EXEC || (lsm_layer() && kind == EV_EXEC) {
        // SAFETY: a helper without arguments.
        let id = unsafe { bpf_get_current_pid_tgid() };
        if ASIDE.insert(&id, &Aside { kind, flags, user, dirfd }, 0).is_err() {
            count_lost(cgid);
        }
        return;
    }
    if user == u64::MAX {
        let fd = take(&p.fd);
        let at = walk::file_path(walk::file_of_fd(fd as i32 as i64));
        emit(cgid, ring, kind, flags, Named::Kernel(at.0, at.1), fd, arg);
    } else {
        attempt(cgid, ring, kind, flags, user, dirfd, arg);
    }
    let second = take(&p.second) as u32;
    if second != 0 {
        let (user2, dirfd2) = (take(&p.user2), take(&p.dirfd2));
        emit(cgid, ring, EV_NAME, second, Named::User(user2), dirfd2, 0);
        if second == NAME_NEW && !absolute(user2) {
            let at = dir_of(dirfd2);
            emit(cgid, ring, EV_NAME, NAME_NEW_DIR, Named::Kernel(at.0, at.1), dirfd2, 0);
        }
    }
}

/// The current task's saved user registers, where a syscall's arguments are at its end (a
/// helper of Linux 5.15: only the per-syscall tracepoint programs, which need 5.15 too, call
/// it; the raw `sys_exit` program is given its registers).
fn current_regs() -> *const u8 {
    // SAFETY: helpers that take the current task (a trusted pointer) and return its saved user
    // registers.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8 }
}

/// An open's end: one attempt record (the tool's string, read now) and its result, or, for a
/// file this thread already opened with these flags, a count (unless the call's `call_flags`
/// say every open is recorded).
fn opened(cgid: u64, info: &CallInfo, nr: u32, ret: i64, regs: *const u8) {
    let (ring, call_flags) = (info.ring, info.flags);
    // The first three arguments (rdi, rsi, rdx) lie together in pt_regs, rdx first: one read.
    // SAFETY: kernel memory read through the helper, which cannot fault.
    let [dx, si, di] = unsafe { bpf_probe_read_kernel(regs.add(REGS[2]) as *const [u64; 3]) }.unwrap_or([0; 3]);
    let a = |i: usize| [di, si, dx][i];
    let Some(p) = PLAN.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's copy; tracing programs do not nest on a CPU.
    let p = unsafe { &mut *p };
    // Written to map memory and read back, as in `enter`: one verification of what follows.
    match nr {
        SYS_OPEN => (put(&mut p.flags, a(1)), put(&mut p.dirfd, AT_FDCWD), put(&mut p.user, a(0))),
        SYS_CREAT => (put(&mut p.flags, CREAT_FLAGS), put(&mut p.dirfd, AT_FDCWD), put(&mut p.user, a(0))),
        SYS_OPENAT => (put(&mut p.flags, a(2)), put(&mut p.dirfd, a(0)), put(&mut p.user, a(1))),
        _ => {
            // struct open_how starts with the u64 flags.
            // SAFETY: a user pointer read through the helper, which cannot fault.
            let flags = unsafe { bpf_probe_read_user(a(2) as *const u64) }.unwrap_or(0);
            (put(&mut p.flags, flags), put(&mut p.dirfd, a(0)), put(&mut p.user, a(1)))
        }
    };
    let (flags, dirfd, user) = (take(&p.flags) as u32, take(&p.dirfd), take(&p.user));
    if lsm_layer() {
        // The hooks recorded what they saw; what the kernel refused before them, only here.
        if ret == -EACCES {
            attempt(cgid, ring, EV_OPEN, flags, user, dirfd, 0);
            result(cgid, ring, nr, ret, (0, 0), None);
        }
        return;
    }
    if ret < 0 {
        emit(cgid, ring, EV_OPEN, flags, Named::User(user), dirfd, 0);
        result(cgid, ring, nr, ret, (0, 0), None);
        return;
    }
    let file = walk::file_of_fd(ret);
    let flags = if nr == SYS_OPENAT2 {
        // openat2's flags were read from the tool's memory (the kernel copied them at entry):
        // a claim, which another thread could have rewritten since. The access mode and the
        // rest are the new file's own; only what the kernel drops from it after opening
        // (O_CREAT, O_EXCL, O_TRUNC) comes from the claim.
        // SAFETY: a read of the program's read-only data.
        let off = unsafe { core::ptr::read_volatile(&OFFSETS.file_f_flags) };
        (walk::read(file, off) as u32) | (flags & (O_CREAT | O_EXCL | O_TRUNC))
    } else {
        flags
    };
    let at = walk::file_path(file);
    let key = if call_flags & CALL_NO_REPEATS == 0 { repeat_key(cgid, at, flags) } else { None };
    if let Some(k) = &key {
        if let Some(c) = REPEATS.get_ptr_mut(k) {
            // SAFETY: the value stays valid for this program run. The key is this thread's,
            // and a thread makes one syscall at a time: no other program run writes it.
            unsafe {
                let n = core::ptr::read_volatile(&(*c).count);
                core::ptr::write_volatile(&mut (*c).count, n + 1);
                core::ptr::write_volatile(&mut (*c).last_ts, bpf_ktime_get_ns());
            }
            return;
        }
    }
    emit(cgid, ring, EV_OPEN, flags, Named::User(user), dirfd, 0);
    result(cgid, ring, nr, ret, at, key.as_ref());
}

/// What tells the file (`at`, as opened) from every other, for counting repeated opens; none
/// where the kernel's offsets for it are unknown.
fn repeat_key(cgid: u64, at: (u64, u64), flags: u32) -> Option<RepeatKey> {
    // SAFETY: a read of the program's read-only data.
    let o = unsafe { core::ptr::read_volatile(&OFFSETS) };
    let (mnt, dentry) = at;
    if o.dentry_hash_len == 0 || mnt == 0 || dentry == 0 {
        return None;
    }
    let inode = walk::read(dentry, o.dentry_inode);
    // SAFETY: helpers without arguments.
    let (id, task) = unsafe { (bpf_get_current_pid_tgid(), bpf_get_current_task() as u64) };
    Some(RepeatKey {
        cgroup_id: cgid,
        mnt,
        dentry,
        parent: walk::read(dentry, o.dentry_parent),
        inode,
        ino: walk::read(inode, o.inode_ino),
        hash_len: walk::read(dentry, o.dentry_hash_len),
        flags: flags & VALID_OPEN_FLAGS,
        tid: id as u32,
        tgid: (id >> 32) as u32,
        exec_id: walk::read(task, o.task_exec_id) as u32,
        start_ns: walk::read(task, o.task_start_time),
    })
}

/// The record of a syscall's result; for a successful open, with the file the kernel opened
/// (`at`), and counted from now on under `key` if given. Inlined: BPF calls take at most five
/// arguments.
#[inline(always)]
fn result(cgid: u64, ring: u32, nr: u32, ret: i64, at: (u64, u64), key: Option<&RepeatKey>) {
    if let Some(mut entry) = reserve(cgid, ring, EV_RESULT, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = nr;
            (*ev).ret = ret;
            if at.1 != 0 {
                (*ev).info = walk::name(at.0, at.1, &mut (*ev).path);
            }
            if let Some(k) = key.filter(|_| quota(cgid)) {
                let first = RepeatCount { count: 0, first_ts: (*ev).ts_ns, last_ts: 0 };
                // BPF_NOEXIST: a key already there keeps its count.
                if REPEATS.insert(k, &first, 1).is_ok() {
                    (*ev).info |= REPEAT_TRACKED;
                    (*ev).arg = first.first_ts;
                }
            }
        }
        submit(entry);
    }
}

/// Takes one of the call's `REPEATS_PER_CALL` places in `REPEATS`; false when it has none
/// left. Threads of the call on other CPUs may take one at the same moment, so a call can
/// hold a few more.
fn quota(cgid: u64) -> bool {
    match REPEAT_QUOTA.get_ptr_mut(&cgid) {
        // SAFETY: the value stays valid for this program run.
        Some(n) => unsafe {
            let used = core::ptr::read_volatile(n);
            if used >= REPEATS_PER_CALL {
                return false;
            }
            core::ptr::write_volatile(n, used + 1);
            true
        },
        None => REPEAT_QUOTA.insert(&cgid, &1, 0).is_ok(),
    }
}

/// A syscall's end with its result; `regs` gives where its arguments are.
fn exit(nr: u32, ret: i64, regs: impl Fn() -> *const u8) {
    let Some((cgid, info)) = current_call() else { return };
    let ring = info.ring;
    if is_open(nr) {
        return opened(cgid, &info, nr, ret, regs());
    }
    // On the LSM layer, a refused mmap or mprotect to executable is the hooks' (recorded
    // there) where the kernel has memory-deny-write-execute, and seccomp's only where it has
    // not: the exit alone cannot tell, so it is left to the hooks.
    let memory = matches!(nr, SYS_MMAP | SYS_MPROTECT | SYS_PKEY_MPROTECT);
    if ret == -EPERM && refused_by_filter(u64::from(nr)) && !(memory && lsm_layer()) {
        // SAFETY: a helper without arguments.
        let id = unsafe { bpf_get_current_pid_tgid() };
        // An mprotect whose entry was seen (to executable) is not seccomp's.
        // SAFETY: a lookup that copies nothing out.
        if !(matches!(nr, SYS_MPROTECT | SYS_PKEY_MPROTECT) && unsafe { ASIDE.get(&id) }.is_some()) {
            if let Some(mut entry) = reserve(cgid, ring, EV_REFUSED, VERDICT_DENIED) {
                let ev = entry.as_mut_ptr();
                // SAFETY: `ev` is the reserved record.
                unsafe {
                    (*ev).flags = nr;
                    (*ev).ret = ret;
                    (*ev).info = REFUSED_EARLY;
                }
                submit(entry);
            }
            return;
        }
    }
    let aside = match nr {
        SYS_MPROTECT | SYS_PKEY_MPROTECT => true,
        SYS_EXECVE | SYS_EXECVEAT => lsm_layer(),
        _ => false,
    };
    if aside && !refused_aside(cgid, ring, nr, ret) {
        return;
    }
    match nr {
        SYS_CONNECT | SYS_BIND => {
            // SAFETY: a helper without arguments.
            let id = unsafe { bpf_get_current_pid_tgid() };
            // SAFETY: the value is copied out before the entry is removed.
            let Some(s) = (unsafe { NET_PENDING.get(&id) }).copied() else { return };
            let _ = NET_PENDING.remove(&id);
            if ret != -EACCES {
                return;
            }
            let kind = if s.op == NET_BIND { EV_BIND } else { EV_CONNECT };
            if let Some(mut entry) = reserve(cgid, ring, kind, VERDICT_DENIED) {
                let ev = entry.as_mut_ptr();
                // SAFETY: `ev` is the reserved record.
                unsafe {
                    (*ev).flags = s.op;
                    (*ev).family = s.family;
                    (*ev).port = s.port;
                    (*ev).addr = s.addr;
                    (*ev).info = REFUSED_EARLY;
                    (*ev).ret = ret;
                }
                submit(entry);
            }
        }
        // A successful exec is recorded by sched_process_exec, in the new image.
        SYS_EXECVE | SYS_EXECVEAT if ret == 0 => {}
        SYS_EXECVE | SYS_EXECVEAT | SYS_UNLINK | SYS_RMDIR | SYS_UNLINKAT | SYS_RENAME | SYS_RENAMEAT
        | SYS_RENAMEAT2 | SYS_LINK | SYS_LINKAT | SYS_SYMLINK | SYS_SYMLINKAT | SYS_TRUNCATE | SYS_FTRUNCATE
        | SYS_CHMOD | SYS_FCHMOD | SYS_FCHMODAT | SYS_FCHMODAT2 | SYS_CHOWN | SYS_LCHOWN | SYS_FCHOWN
        | SYS_FCHOWNAT | SYS_MKNOD | SYS_MKNODAT | SYS_MKDIR | SYS_MKDIRAT => result(cgid, ring, nr, ret, (0, 0), None),
        _ => {}
    }
}

/// `syscalls/sys_enter_*`: after the common header (8 bytes), the syscall number (with
/// padding, 8 bytes), then its arguments, 8 bytes each.
#[tracepoint]
pub fn traced_enter(ctx: TracePointContext) -> u32 {
    let p = ctx.as_ptr() as *const u64;
    // SAFETY: the number is loaded directly from the record (every record has it); the
    // arguments are copied by one helper call, which cannot fault. They are not loaded
    // directly: the kernel refuses to attach a program whose loads reach past the shortest
    // record it is attached to, and syscalls have one to six arguments. Slots past a shorter
    // record hold what the per-CPU trace buffer held before, and no decoder reads them.
    let (nr, a) = unsafe {
        (
            core::ptr::read_volatile(p.add(1) as *const i32) as u32,
            bpf_probe_read_kernel(p.add(2) as *const [u64; 6]).unwrap_or([0; 6]),
        )
    };
    enter(nr, a);
    0
}

/// `syscalls/sys_exit_*`: the syscall number at 8, its result at 16.
#[tracepoint]
pub fn traced_exit(ctx: TracePointContext) -> u32 {
    let p = ctx.as_ptr() as *const u64;
    // SAFETY: as in `traced_enter`.
    let (nr, ret) = unsafe {
        (core::ptr::read_volatile(p.add(1) as *const i32) as u32, core::ptr::read_volatile(p.add(2) as *const i64))
    };
    exit(nr, ret, current_regs);
    0
}

/// x86_64 `struct pt_regs` offsets of the syscall argument registers.
const REGS: [usize; 6] = [14 * 8, 13 * 8, 12 * 8, 7 * 8, 9 * 8, 8 * 8];
const REG_ORIG_AX: usize = 15 * 8;

fn reg(regs: *const u8, off: usize) -> u64 {
    // SAFETY: `regs` is the pt_regs pointer the raw tracepoint passes; reading kernel memory
    // through the helper cannot fault.
    unsafe { bpf_probe_read_kernel(regs.add(off) as *const u64) }.unwrap_or(0)
}

/// The same on kernels that cannot pin per-syscall tracepoint links (before 5.15).
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // SAFETY: sys_enter's raw arguments are (struct pt_regs *regs, long id).
    let (regs, nr) = unsafe {
        let args = ctx.as_ptr() as *const u64;
        (*args as *const u8, *args.add(1))
    };
    let mut a = [0u64; 6];
    for (i, v) in a.iter_mut().enumerate() {
        *v = reg(regs, REGS[i]);
    }
    // The kernel dispatches on the number's low 32 bits, and so does this.
    enter(nr as u32, a);
    0
}

/// See [`sys_enter`].
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    // SAFETY: sys_exit's raw arguments are (struct pt_regs *regs, long ret).
    let (regs, ret) = unsafe {
        let args = ctx.as_ptr() as *const u64;
        (*args as *const u8, *args.add(1) as i64)
    };
    exit(reg(regs, REG_ORIG_AX) as u32, ret, || regs);
    0
}

/// A new program image: the file the kernel executed, from `linux_binprm`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(ctx: RawTracePointContext) -> i32 {
    let Some((cgid, info)) = current_call() else { return 0 };
    let ring = info.ring;
    // SAFETY: sched_process_exec's raw arguments are (struct task_struct *p, pid_t old_pid,
    // struct linux_binprm *bprm).
    let (old_pid, bprm) = unsafe {
        let args = ctx.as_ptr() as *const u64;
        (*args.add(1), *args.add(2))
    };
    // SAFETY: a read of the program's read-only data.
    let off = unsafe { core::ptr::read_volatile(&OFFSETS.bprm_file) };
    // SAFETY: kernel memory read through the helper.
    let file = unsafe { bpf_probe_read_kernel((bprm + u64::from(off)) as *const u64) }.unwrap_or(0);
    let at = walk::file_path(file);
    debug!(&ctx, "sched_process_exec: call {}: exec by pid {}", cgid, old_pid);
    if at.1 == 0 && walk::enabled() {
        warn!(&ctx, "sched_process_exec: call {}: the executed file has no path to walk", cgid);
    }
    emit(cgid, ring, EV_EXEC_DONE, 0, Named::Kernel(at.0, at.1), old_pid, 0);
    0
}
