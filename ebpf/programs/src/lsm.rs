//! BPF LSM hooks: record what a call's tool does and, in enforce mode, deny what its manifest
//! does not grant.
//!
//! A call is *armed* by its first exec (the tool's): before that its process is agentd setting
//! up the sandbox (mounting the grants), which is neither checked nor recorded.
//!
//! Paths are the kernel's resolution of the object (`bpf_d_path`, relative to the task's root,
//! which is the sandbox's), so memfds (`/memfd:NAME (deleted)`), deleted files and paths
//! reached through symlinks or `/proc/self/fd` are seen for what they are. A path is under a
//! rule when the rule is the whole path or a prefix of it that ends at a `/`: see
//! [`under_rule`].
//!
//! Kernel structures are read at offsets the supervisor took from the kernel's BTF
//! ([`crate::OFFSETS`]); there is no CO-RE for Rust programs.

use core::ffi::c_void;

use agentd_ebpf_common::{
    CallInfo, PathKey, UnixKey, AUDIT_ONLY, CALL_DENY_WX, CALL_OPEN_RULES, EV_EXEC, EV_MMAP_EXEC, EV_MOUNT,
    EV_MOVE_MOUNT, EV_NAME, EV_OPEN, EV_PTRACE, EV_SIGNAL, EV_UNIX_CONNECT, FROM_LSM, MEM_ANONYMOUS, MEM_MPROTECT,
    MODE_ENFORCE, NAME_KERNEL, NAME_KERNEL_NEW, NAME_TARGET, NET_BIND, NET_CONNECT, PATH_LEN, PATH_RESOLVED,
    PATH_TRUNCATED, PATH_UNRESOLVED, PATH_WALKED, RULE_DENY_OPEN, RULE_EXEC, VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::helpers::gen::{bpf_d_path, bpf_get_current_pid_tgid, bpf_probe_read_kernel as probe_read_raw};
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes};
use aya_ebpf::macros::{lsm, map};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::LsmContext;
use aya_ebpf::EbpfContext;
use aya_log_ebpf::{debug, warn};

use crate::net::{check, Attempt};
use crate::{current_call, reserve, submit, walk, CALLS, OFFSETS, PATH_RULES, UNIX_ALLOW};

/// What a hook returns to deny: -EPERM. Read from read-only data rather than written as a
/// constant, because LLVM turns `if deny { -1 } else { 0 }` into a negation, whose result
/// the verifier cannot bound to the [-4095, 0] an LSM program must return.
#[no_mangle]
static DENY: i32 = -1;

fn deny() -> i32 {
    // SAFETY: a read of the program's read-only data.
    unsafe { core::ptr::read_volatile(&DENY) }
}
const ENAMETOOLONG: i64 = 36;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const VM_EXEC: u64 = 4;
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;

/// Per-CPU working memory: too big for the 512-byte BPF stack.
#[repr(C)]
pub struct Scratch {
    key: PathKey,
    path: [u8; PATH_LEN],
}

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

fn off(field: &u32) -> usize {
    // SAFETY: a read of the program's read-only data, which the verifier folds to a constant.
    unsafe { core::ptr::read_volatile(field) as usize }
}

fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's copy, used by one program run at a time (LSM programs do not nest on
    // a CPU: they run with migration disabled and are not re-entered by the hooks they call).
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The current call, if its tool has started.
fn armed_call() -> Option<(u64, CallInfo)> {
    current_call().filter(|(_, info)| info.armed != 0)
}

/// Resolves `path` (a `struct path *` the verifier knows as such) into `s.path`; returns the
/// `PATH_*` flags.
fn resolve(s: &mut Scratch, path: *const u8) -> u32 {
    // SAFETY: `path` points to a `struct path` inside an object the hook was given; the helper
    // writes at most PATH_LEN bytes into the scratch buffer.
    let n = unsafe { bpf_d_path(path as *mut _, s.path.as_mut_ptr() as *mut _, PATH_LEN as u32) };
    if n < 0 {
        // Too long for the buffer: the walk keeps the file name and the nearest directories
        // (leaf first, `PATH_WALKED`), which no rule can match.
        let walked = walk::name(mnt_of(path), dentry_of(path), &mut s.path);
        if walked != 0 {
            return walked;
        }
        s.path[0] = 0;
        return PATH_UNRESOLVED | if n == -ENAMETOOLONG { PATH_TRUNCATED } else { 0 };
    }
    PATH_RESOLVED
}

/// Whether a resolved path can be held against the rules: whole, and in order.
fn checkable(path_info: u32) -> bool {
    path_info & (PATH_UNRESOLVED | PATH_TRUNCATED | PATH_WALKED) == 0
}

/// Whether `s.path` is at or below a `kind` rule of the call: looks up each prefix of the path
/// that ends before a `/`, and the whole path, with the rest of the key zeroed.
fn under_rule(s: &mut Scratch, cgid: u64, kind: u32) -> bool {
    s.key.cgroup_id = cgid;
    s.key.kind = kind;
    s.key._pad = 0;
    let words = s.key.path.as_mut_ptr() as *mut u64;
    for i in 0..PATH_LEN / 8 {
        // SAFETY: within the key's path array, which is 8-byte aligned in the map value.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let mut i = 0;
    while i < PATH_LEN {
        let c = s.path[i];
        // SAFETY: a lookup that copies nothing out.
        if i > 0 && (c == 0 || c == b'/') && unsafe { PATH_RULES.get(&s.key) }.is_some() {
            return true;
        }
        if c == 0 {
            return false;
        }
        s.key.path[i] = c;
        i += 1;
    }
    false
}

/// Records an event of the call with the resolved path in `s.path`. Always inlined: BPF
/// functions take at most five arguments.
#[inline(always)]
#[allow(clippy::too_many_arguments, reason = "inlined: no BPF call with its five-argument limit")]
fn record_path(s: &Scratch, cgid: u64, info: &CallInfo, kind: u32, denied: bool, flags: u32, path_info: u32, arg: u64) {
    let verdict = if denied { VERDICT_DENIED } else { VERDICT_ALLOWED };
    if let Some(mut entry) = reserve(cgid, info.ring, kind, verdict) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record; the copy reads PATH_LEN bytes of the scratch
        // buffer into the record's path array of the same size.
        unsafe {
            (*ev).flags = flags;
            (*ev).arg = arg;
            (*ev).info = path_info | FROM_LSM | audit_only(info, denied);
            let _ = probe_read_raw(
                (*ev).path.as_mut_ptr() as *mut c_void,
                PATH_LEN as u32,
                s.path.as_ptr() as *const c_void,
            );
        }
        submit(entry);
    }
}

fn audit_only(info: &CallInfo, denied: bool) -> u32 {
    if denied && info.mode != MODE_ENFORCE {
        AUDIT_ONLY
    } else {
        0
    }
}

/// The hook's result for a violation (`denied`) of the call's rules.
fn verdict(info: &CallInfo, denied: bool) -> i32 {
    if denied && info.mode == MODE_ENFORCE {
        deny()
    } else {
        0
    }
}

/// Arms the call (its first exec is the tool's) and returns it.
fn arm(cgid: u64) {
    if let Some(p) = CALLS.get_ptr_mut(&cgid) {
        // SAFETY: a pointer into the map value, valid for this program run.
        unsafe { (*p).armed = 1 };
    }
}

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    let Some((cgid, mut info)) = current_call() else { return 0 };
    if info.armed == 0 {
        arm(cgid);
        info.armed = 1;
        debug!(&ctx, "call {} armed by its first exec", cgid);
    }
    // SAFETY: bprm_check_security(struct linux_binprm *bprm, int ret).
    let (bprm, prev): (*const u8, i32) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    if prev != 0 {
        return prev;
    }
    let Some(s) = scratch() else { return deny() };
    // SAFETY: `bprm->file` is a trusted pointer to the file being executed; the load is
    // checked by the verifier against the kernel's BTF.
    let file = unsafe { core::ptr::read_volatile(bprm.add(off(&OFFSETS.bprm_file)) as *const *const u8) };
    // SAFETY: `f_path` lies inside the file.
    let path_info = resolve(s, unsafe { file.add(off(&OFFSETS.file_f_path)) });
    let denied = !checkable(path_info) || !under_rule(s, cgid, RULE_EXEC);
    record_path(s, cgid, &info, EV_EXEC, denied, 0, path_info, 0);
    verdict(&info, denied)
}

#[lsm(hook = "mmap_file")]
pub fn mmap_file(ctx: LsmContext) -> i32 {
    // SAFETY: mmap_file(struct file *file, unsigned long reqprot, unsigned long prot,
    // unsigned long flags, int ret).
    let (file, prot, prev): (*const u8, u64, i32) = unsafe { (ctx.arg(0), ctx.arg(2), ctx.arg(4)) };
    if prev != 0 {
        return prev;
    }
    if prot & PROT_EXEC == 0 {
        return 0;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    // Tested twice: as the pointer, which the newest verifiers know may be NULL (and then
    // allow no arithmetic on it before the test), and read again as a plain number, since
    // some (6.12's) take a hook's pointer argument for non-NULL and drop the pointer's test,
    // which sent anonymous memory down the file's path.
    // SAFETY: a read of the hook's first argument slot through the helper.
    let unset = unsafe { bpf_probe_read_kernel(ctx.as_ptr() as *const u64) }.unwrap_or(0) == 0;
    if unset || file.is_null() {
        debug!(&ctx, "mmap_file: call {}: anonymous memory mapped with prot {}", cgid, prot);
        // Anonymous executable memory: writable too is what memory-deny-write-execute refuses.
        return anonymous_exec(cgid, &info, prot, 0, prot & PROT_WRITE != 0);
    }
    let Some(s) = scratch() else { return deny() };
    // SAFETY: `f_path` lies inside the file.
    let path_info = resolve(s, unsafe { file.add(off(&OFFSETS.file_f_path)) });
    let denied = !checkable(path_info) || !under_rule(s, cgid, RULE_EXEC);
    // Executable mappings of granted files (the libraries of every exec) are not recorded;
    // the exec is. Refused ones are.
    if denied {
        record_path(s, cgid, &info, EV_MMAP_EXEC, true, prot as u32, path_info, 0);
    }
    verdict(&info, denied)
}

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // SAFETY: file_open(struct file *file, int ret).
    let (file, prev): (*const u8, i32) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    if prev != 0 {
        return prev;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    let Some(s) = scratch() else { return deny() };
    // SAFETY: `f_path` lies inside the file.
    let path_info = resolve(s, unsafe { file.add(off(&OFFSETS.file_f_path)) });
    // SAFETY: `f_flags` is a u32 field of the file, checked by the verifier against BTF.
    let flags = unsafe { core::ptr::read_volatile(file.add(off(&OFFSETS.file_f_flags)) as *const u32) };
    // A path too long to resolve cannot be checked against the deny rules: refuse it.
    let denied = info.flags & CALL_OPEN_RULES != 0 && (!checkable(path_info) || under_rule(s, cgid, RULE_DENY_OPEN));
    if path_info & PATH_UNRESOLVED != 0 {
        warn!(&ctx, "file_open: call {}: neither bpf_d_path nor the walk named the file", cgid);
    }
    record_path(s, cgid, &info, EV_OPEN, denied, flags, path_info, 0);
    verdict(&info, denied)
}

fn sock_attempt(ctx: &LsmContext, op: u32) -> i32 {
    // SAFETY: socket_connect/socket_bind(struct socket *sock, struct sockaddr *address,
    // int addrlen, int ret).
    let (sock, addr, len, prev): (*const u8, *const u8, i32, i32) =
        unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3)) };
    if prev != 0 {
        return prev;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    // SAFETY: reads of kernel memory through the helper, which cannot fault.
    let family = unsafe { bpf_probe_read_kernel(addr as *const u16) }.unwrap_or(0);
    if family != AF_INET && family != AF_INET6 {
        // Unix sockets are Landlock's (scoped) and seccomp's; other families are refused by
        // seccomp before a socket exists.
        return 0;
    }
    let mut a = Attempt { op, family, port: 0, addr: [0; 16], sock_type: 0, info: FROM_LSM, send: false };
    // SAFETY: as above; sockaddr_in and sockaddr_in6 keep the port at offset 2, the IPv4
    // address at 4 and the IPv6 address at 8. A short address reads as zeros (the kernel
    // refuses it anyway).
    unsafe {
        a.port = u16::from_be(bpf_probe_read_kernel(addr.add(2) as *const u16).unwrap_or(0));
        if family == AF_INET && len >= 8 {
            a.addr[..4].copy_from_slice(&bpf_probe_read_kernel(addr.add(4) as *const [u8; 4]).unwrap_or([0; 4]));
        } else if family == AF_INET6 && len >= 24 {
            a.addr = bpf_probe_read_kernel(addr.add(8) as *const [u8; 16]).unwrap_or([0; 16]);
        }
        a.sock_type = bpf_probe_read_kernel(sock.add(off(&OFFSETS.socket_type)) as *const u16).unwrap_or(0) as u32;
    }
    if check(cgid, &info, &a) {
        0
    } else {
        deny()
    }
}

#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    sock_attempt(&ctx, NET_CONNECT)
}

#[lsm(hook = "socket_bind")]
pub fn socket_bind(ctx: LsmContext) -> i32 {
    sock_attempt(&ctx, NET_BIND)
}

/// A connect of the call to the Unix socket `other` (a `struct sock *`), checked by its inode:
/// allowed if it is a `net.unix` grant of the call (`UNIX_ALLOW`), or the call's own (made by
/// a task of its cgroup), or bound to no path (abstract or unnamed sockets are Landlock's
/// scoping's and the network namespace's). The second layer under the call's init, which
/// makes every connect of the tool after the same check (see the sandbox's `unix_gate`).
fn unix_peer(other: *const u8, prev: i32) -> i32 {
    // Zero when the kernel's BTF lacks one of the Unix offsets (before 5.15).
    if prev != 0 || off(&OFFSETS.unix_sock_path_dentry) == 0 {
        return prev;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    let ring = info.ring;
    // SAFETY: a chain of kernel reads through the helper, which cannot fault.
    unsafe {
        let read_ptr = |p: *const u8, o: &u32| {
            bpf_probe_read_kernel(p.add(off(o)) as *const *const u8).ok().filter(|q| !q.is_null())
        };
        let Some(dentry) = read_ptr(other, &OFFSETS.unix_sock_path_dentry) else { return 0 };
        let owner = read_ptr(other, &OFFSETS.sock_cgroup)
            .and_then(|cg| read_ptr(cg, &OFFSETS.cgroup_kn))
            .and_then(|kn| bpf_probe_read_kernel(kn.add(off(&OFFSETS.kernfs_node_id)) as *const u64).ok());
        if owner == Some(cgid) {
            return 0;
        }
        let inode = read_ptr(dentry, &OFFSETS.dentry_inode);
        let ino = inode.and_then(|i| bpf_probe_read_kernel(i.add(off(&OFFSETS.inode_ino)) as *const u64).ok());
        let dev = inode
            .and_then(|i| read_ptr(i, &OFFSETS.inode_sb))
            .and_then(|sb| bpf_probe_read_kernel(sb.add(off(&OFFSETS.sb_dev)) as *const u32).ok());
        let key = UnixKey { cgroup_id: cgid, dev: u64::from(dev.unwrap_or(0)), ino: ino.unwrap_or(0) };
        let denied = UNIX_ALLOW.get(&key).is_none();
        if let Some(mut entry) = reserve(cgid, ring, EV_UNIX_CONNECT, if denied { VERDICT_DENIED } else { VERDICT_ALLOWED }) {
            let ev = entry.as_mut_ptr();
            (*ev).target = key.dev as u32;
            (*ev).ret = key.ino as i64;
            (*ev).info = FROM_LSM | audit_only(&info, denied);
            if let Some(name) = read_ptr(dentry, &OFFSETS.dentry_name) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut (*ev).path);
            }
            submit(entry);
        }
        verdict(&info, denied)
    }
}

#[lsm(hook = "unix_stream_connect")]
pub fn unix_stream_connect(ctx: LsmContext) -> i32 {
    // SAFETY: unix_stream_connect(struct sock *sock, struct sock *other, struct sock *newsk,
    // int ret).
    let (other, prev): (*const u8, i32) = unsafe { (ctx.arg(1), ctx.arg(3)) };
    unix_peer(other, prev)
}

#[lsm(hook = "unix_may_send")]
pub fn unix_may_send(ctx: LsmContext) -> i32 {
    // SAFETY: unix_may_send(struct socket *sock, struct socket *other, int ret).
    let (other, prev): (*const u8, i32) = unsafe { (ctx.arg(1), ctx.arg(2)) };
    if off(&OFFSETS.socket_sk) == 0 {
        return prev;
    }
    // SAFETY: a kernel read through the helper, which cannot fault.
    let sk = unsafe { bpf_probe_read_kernel(other.add(off(&OFFSETS.socket_sk)) as *const *const u8) }
        .unwrap_or(core::ptr::null());
    if sk.is_null() {
        return prev;
    }
    unix_peer(sk, prev)
}

/// The id of the v2 cgroup of `task`, 0 if it cannot be read.
fn task_cgroup_id(task: *const u8) -> u64 {
    // SAFETY: a chain of kernel reads through the helper, which cannot fault.
    unsafe {
        let read_ptr = |p: *const u8, o: &u32| bpf_probe_read_kernel(p.add(off(o)) as *const *const u8).ok();
        let Some(cgroups) = read_ptr(task, &OFFSETS.task_cgroups) else { return 0 };
        let Some(cgroup) = read_ptr(cgroups, &OFFSETS.css_set_dfl_cgrp) else { return 0 };
        let Some(kn) = read_ptr(cgroup, &OFFSETS.cgroup_kn) else { return 0 };
        bpf_probe_read_kernel(kn.add(off(&OFFSETS.kernfs_node_id)) as *const u64).unwrap_or(0)
    }
}

/// A call acting on another task: allowed only within the call's own cgroup.
fn on_task(cgid: u64, info: &CallInfo, kind: u32, task: *const u8, flags: u32) -> i32 {
    let denied = task_cgroup_id(task) != cgid;
    // The call's init taking a socket of the tool's for the Unix-socket gate: agentd's own.
    // SAFETY: a helper without arguments.
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    if !denied && kind == EV_PTRACE && info.init_tgid != 0 && tgid == info.init_tgid {
        return 0;
    }
    // SAFETY: a kernel read through the helper.
    let target = unsafe { bpf_probe_read_kernel(task.add(off(&OFFSETS.task_tgid)) as *const u32) }.unwrap_or(0);
    if let Some(mut entry) = reserve(cgid, info.ring, kind, if denied { VERDICT_DENIED } else { VERDICT_ALLOWED }) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).target = target;
            (*ev).flags = flags;
            (*ev).info = FROM_LSM | audit_only(info, denied);
        }
        submit(entry);
    }
    verdict(info, denied)
}

#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_access_check(ctx: LsmContext) -> i32 {
    // SAFETY: ptrace_access_check(struct task_struct *child, unsigned int mode, int ret).
    let (child, mode, prev): (*const u8, u32, i32) = unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2)) };
    if prev != 0 {
        return prev;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    on_task(cgid, &info, EV_PTRACE, child, mode)
}

#[lsm(hook = "task_kill")]
pub fn task_kill(ctx: LsmContext) -> i32 {
    // SAFETY: task_kill(struct task_struct *p, struct kernel_siginfo *info, int sig,
    // const struct cred *cred, int ret).
    let (task, sig, prev): (*const u8, i32, i32) = unsafe { (ctx.arg(0), ctx.arg(2), ctx.arg(4)) };
    if prev != 0 {
        return prev;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    on_task(cgid, &info, EV_SIGNAL, task, sig as u32)
}

/// A mount operation by an armed call: recorded, and denied in enforce mode.
fn mount_attempt(kind: u32, fstype: *const u8, flags: u32) -> i32 {
    let Some((cgid, info)) = armed_call() else { return 0 };
    let ring = info.ring;
    if let Some(mut entry) = reserve(cgid, ring, kind, VERDICT_DENIED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record; the string is read from kernel memory by the
        // helper into the record's path array.
        unsafe {
            (*ev).flags = flags;
            (*ev).info = FROM_LSM | audit_only(&info, true);
            if !fstype.is_null() {
                let _ = bpf_probe_read_kernel_str_bytes(fstype, &mut (*ev).path);
            }
        }
        submit(entry);
    }
    verdict(&info, true)
}

#[lsm(hook = "sb_mount")]
pub fn sb_mount(ctx: LsmContext) -> i32 {
    // SAFETY: sb_mount(const char *dev_name, const struct path *path, const char *type,
    // unsigned long flags, void *data, int ret).
    let (fstype, flags, prev): (*const u8, u64, i32) = unsafe { (ctx.arg(2), ctx.arg(3), ctx.arg(5)) };
    if prev != 0 {
        return prev;
    }
    mount_attempt(EV_MOUNT, fstype, flags as u32)
}

#[lsm(hook = "move_mount")]
pub fn move_mount(ctx: LsmContext) -> i32 {
    // SAFETY: move_mount(const struct path *from_path, const struct path *to_path, int ret).
    let prev: i32 = unsafe { ctx.arg(2) };
    if prev != 0 {
        return prev;
    }
    mount_attempt(EV_MOVE_MOUNT, core::ptr::null(), 0)
}

/// Anonymous memory made executable (`how`: 0 for mmap, `MEM_MPROTECT`): recorded, and denied
/// (in enforce mode) where the call may not make written memory executable and `gains` says
/// this would.
fn anonymous_exec(cgid: u64, info: &CallInfo, prot: u64, how: u64, gains: bool) -> i32 {
    let denied = gains && info.flags & CALL_DENY_WX != 0;
    if let Some(mut entry) = reserve(cgid, info.ring, EV_MMAP_EXEC, if denied { VERDICT_DENIED } else { VERDICT_ALLOWED }) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = prot as u32;
            (*ev).arg = MEM_ANONYMOUS | how;
            (*ev).info = FROM_LSM | audit_only(info, denied);
        }
        submit(entry);
    }
    verdict(info, denied)
}

#[lsm(hook = "file_mprotect")]
pub fn file_mprotect(ctx: LsmContext) -> i32 {
    // SAFETY: file_mprotect(struct vm_area_struct *vma, unsigned long reqprot,
    // unsigned long prot, int ret).
    let (vma, prot, prev): (*const u8, u64, i32) = unsafe { (ctx.arg(0), ctx.arg(2), ctx.arg(3)) };
    if prev != 0 {
        return prev;
    }
    if prot & PROT_EXEC == 0 || off(&OFFSETS.vma_file) == 0 {
        return 0;
    }
    let Some((cgid, info)) = armed_call() else { return 0 };
    // SAFETY: kernel reads through the helper, which cannot fault.
    let (file, flags) = unsafe {
        (
            bpf_probe_read_kernel(vma.add(off(&OFFSETS.vma_file)) as *const u64).unwrap_or(0),
            bpf_probe_read_kernel(vma.add(off(&OFFSETS.vma_flags)) as *const u64).unwrap_or(0),
        )
    };
    if file != 0 {
        if flags & VM_EXEC != 0 {
            return 0;
        }
        // A file's mapping gaining execute after it was mapped without: `bpf_d_path` is not
        // allowed in this hook, and a walked path is matched against no rule, so it is
        // refused and recorded, whatever the file (the kernel's memory-deny-write-execute
        // refuses it anyway where `allow_jit` is off).
        let Some(s) = scratch() else { return deny() };
        let (mnt, dentry) = walk::file_path(file);
        let path_info = walk::name(mnt, dentry, &mut s.path);
        record_path(s, cgid, &info, EV_MMAP_EXEC, true, prot as u32, path_info, MEM_MPROTECT);
        return verdict(&info, true);
    }
    anonymous_exec(cgid, &info, prot, MEM_MPROTECT, flags & VM_EXEC == 0 || prot & PROT_WRITE != 0)
}

/// Names the object of a change from the kernel (`mnt`, `dentry`), for the record that the
/// syscall's tracepoint made of it from the tool's string (`EV_NAME`, `role`).
#[inline(always)]
fn name_change(cgid: u64, ring: u32, role: u32, mnt: u64, dentry: u64) {
    if let Some(mut entry) = reserve(cgid, ring, EV_NAME, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = role;
            (*ev).info = FROM_LSM | walk::name(mnt, dentry, &mut (*ev).path);
        }
        submit(entry);
    }
}

/// The mount of a `struct path` (at offset 0: the loader checks the layout).
fn mnt_of(path: *const u8) -> u64 {
    // SAFETY: a kernel read through the helper, which cannot fault.
    unsafe { bpf_probe_read_kernel(path as *const u64) }.unwrap_or(0)
}

/// The dentry of a `struct path` (at offset 8).
fn dentry_of(path: *const u8) -> u64 {
    // SAFETY: as in `mnt_of`.
    unsafe { bpf_probe_read_kernel(path.add(8) as *const u64) }.unwrap_or(0)
}

/// A `path_*` hook on an object named by a directory and a dentry in it.
fn in_dir(dir: *const u8, dentry: u64) -> i32 {
    if let Some((cgid, info)) = armed_call() {
        let ring = info.ring;
        name_change(cgid, ring, NAME_KERNEL, mnt_of(dir), dentry);
    }
    0
}

/// A `path_*` hook on an object named by a `struct path`.
fn at_path(path: *const u8) -> i32 {
    if let Some((cgid, info)) = armed_call() {
        let ring = info.ring;
        name_change(cgid, ring, NAME_KERNEL, mnt_of(path), dentry_of(path));
    }
    0
}

// The `path_*` hooks only name what the syscall's tracepoints record (with the result): they
// never deny, so their previous result is not read (its position changed across kernels).

#[lsm(hook = "path_unlink")]
pub fn path_unlink(ctx: LsmContext) -> i32 {
    // SAFETY: path_unlink(const struct path *dir, struct dentry *dentry, ...).
    let (dir, dentry): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    in_dir(dir, dentry)
}

#[lsm(hook = "path_rmdir")]
pub fn path_rmdir(ctx: LsmContext) -> i32 {
    // SAFETY: path_rmdir(const struct path *dir, struct dentry *dentry, ...).
    let (dir, dentry): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    in_dir(dir, dentry)
}

#[lsm(hook = "path_mkdir")]
pub fn path_mkdir(ctx: LsmContext) -> i32 {
    // SAFETY: path_mkdir(const struct path *dir, struct dentry *dentry, umode_t mode, ...).
    let (dir, dentry): (*const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1)) };
    in_dir(dir, dentry)
}

#[lsm(hook = "path_mknod")]
pub fn path_mknod(ctx: LsmContext) -> i32 {
    // SAFETY: path_mknod(const struct path *dir, struct dentry *dentry, umode_t mode,
    // unsigned int dev, ...).
    let (dir, dentry, mode): (*const u8, u64, u32) = unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2)) };
    // Every open that creates a file comes here too, as a regular file: the open's own
    // record names it.
    if mode & S_IFMT == S_IFREG {
        return 0;
    }
    in_dir(dir, dentry)
}

#[lsm(hook = "path_symlink")]
pub fn path_symlink(ctx: LsmContext) -> i32 {
    // SAFETY: path_symlink(const struct path *dir, struct dentry *dentry,
    // const char *old_name, ...).
    let (dir, dentry, target): (*const u8, u64, *const u8) = unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2)) };
    let Some((cgid, info)) = armed_call() else { return 0 };
    let ring = info.ring;
    name_change(cgid, ring, NAME_KERNEL, mnt_of(dir), dentry);
    // The target text as the kernel copied it (the tool's memory could have changed since).
    if let Some(mut entry) = reserve(cgid, ring, EV_NAME, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record; the helper reads a kernel string.
        unsafe {
            (*ev).flags = NAME_TARGET;
            (*ev).info = FROM_LSM;
            if bpf_probe_read_kernel_str_bytes(target, &mut (*ev).path).is_err() {
                (*ev).path[0] = 0;
            }
        }
        submit(entry);
    }
    0
}

#[lsm(hook = "path_link")]
pub fn path_link(ctx: LsmContext) -> i32 {
    // SAFETY: path_link(struct dentry *old_dentry, const struct path *new_dir,
    // struct dentry *new_dentry, ...).
    let (old, dir, new): (u64, *const u8, u64) = unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2)) };
    let Some((cgid, info)) = armed_call() else { return 0 };
    let ring = info.ring;
    // A hard link stays within one mount.
    name_change(cgid, ring, NAME_KERNEL, mnt_of(dir), old);
    name_change(cgid, ring, NAME_KERNEL_NEW, mnt_of(dir), new);
    0
}

#[lsm(hook = "path_rename")]
pub fn path_rename(ctx: LsmContext) -> i32 {
    // SAFETY: path_rename(const struct path *old_dir, struct dentry *old_dentry,
    // const struct path *new_dir, struct dentry *new_dentry, ...).
    let (old_dir, old, new_dir, new): (*const u8, u64, *const u8, u64) =
        unsafe { (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3)) };
    let Some((cgid, info)) = armed_call() else { return 0 };
    let ring = info.ring;
    name_change(cgid, ring, NAME_KERNEL, mnt_of(old_dir), old);
    name_change(cgid, ring, NAME_KERNEL_NEW, mnt_of(new_dir), new);
    0
}

#[lsm(hook = "path_truncate")]
pub fn path_truncate(ctx: LsmContext) -> i32 {
    // SAFETY: path_truncate(const struct path *path, ...).
    let path: *const u8 = unsafe { ctx.arg(0) };
    at_path(path)
}

#[lsm(hook = "path_chmod")]
pub fn path_chmod(ctx: LsmContext) -> i32 {
    // SAFETY: path_chmod(const struct path *path, umode_t mode, ...).
    let path: *const u8 = unsafe { ctx.arg(0) };
    at_path(path)
}

#[lsm(hook = "path_chown")]
pub fn path_chown(ctx: LsmContext) -> i32 {
    // SAFETY: path_chown(const struct path *path, kuid_t uid, kgid_t gid, ...).
    let path: *const u8 = unsafe { ctx.arg(0) };
    at_path(path)
}
