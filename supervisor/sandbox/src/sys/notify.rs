//! Syscalls of the Unix-socket gate (`spawn::unix_gate`): seccomp user notifications, pidfds,
//! another process's memory, and the socket calls init makes on a tool's behalf. Used by the
//! call's init after the tool has exec'd: single-threaded, so allocation is safe (a few of
//! these allocate).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use libc::{c_int, c_void};

use super::{check, check_int, Errno};

/// A classic BPF instruction, as `seccomp(2)` takes them.
pub type Insn = libc::sock_filter;

/// Installs `prog` as a seccomp filter of the calling thread and returns its notification
/// listener (close-on-exec). Where the kernel has it (5.19), a notified task waits killably
/// once its notification is received: a signal then cannot cut short a connect that init is
/// making, which would leave the socket connected behind the tool's back.
pub fn seccomp_listener(prog: &[Insn]) -> Result<RawFd, Errno> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
    let install = |flags: libc::c_ulong| {
        // SAFETY: fprog points at `prog`, valid for the call; the kernel copies the program.
        check(unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, ptr::addr_of!(fprog)) })
    };
    let listener = libc::SECCOMP_FILTER_FLAG_NEW_LISTENER;
    match install(listener | libc::SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV) {
        Err(libc::EINVAL) => install(listener),
        other => other,
    }
    .map(|fd| fd as RawFd)
}

/// One notification: who, and the syscall's number and arguments.
#[derive(Debug, Clone, Copy)]
pub struct Notif {
    /// Cookie for the response.
    pub id: u64,
    /// The calling task, in our pid namespace.
    pub pid: u32,
    /// Syscall number.
    pub nr: i32,
    /// Its arguments.
    pub args: [u64; 6],
}

/// Waits for the next notification (`SECCOMP_IOCTL_NOTIF_RECV`).
pub fn notif_recv(listener: RawFd) -> Result<Notif, Errno> {
    // SAFETY: seccomp_notif is plain old data; the kernel wants it zeroed.
    let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: n is a valid seccomp_notif for the kernel to fill.
    check_int(unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_RECV as _, ptr::addr_of_mut!(n)) })?;
    Ok(Notif { id: n.id, pid: n.pid, nr: n.data.nr, args: n.data.args })
}

/// Answers notification `id`: the syscall returns `val`, or fails with `error` if non-zero.
pub fn notif_respond(listener: RawFd, id: u64, val: i64, error: Errno) -> Result<(), Errno> {
    let resp = libc::seccomp_notif_resp { id, val, error: -error, flags: 0 };
    // SAFETY: resp is a valid seccomp_notif_resp.
    check_int(unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_SEND as _, ptr::addr_of!(resp)) }).map(drop)
}

/// Whether notification `id` is still pending: its task has not died (and its pid not been
/// reused) since it was received.
pub fn notif_valid(listener: RawFd, id: u64) -> bool {
    // SAFETY: id is a valid u64 for the kernel to read.
    unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID as _, ptr::addr_of!(id)) == 0 }
}

/// A pidfd for task `tid` (any thread): `PIDFD_THREAD` where the kernel has it (6.9), so that
/// `pidfd_getfd` reads that thread's fd table; else for its process (a thread rarely has a
/// table of its own), found through `/proc/TID/status`.
pub fn pidfd_open_task(tid: u32) -> Result<OwnedFd, Errno> {
    const PIDFD_THREAD: u32 = libc::O_EXCL as u32;
    let open = |pid: u32, flags: u32| {
        // SAFETY: integer arguments only.
        check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid as c_int, flags) }).map(|fd| owned(fd as RawFd))
    };
    match open(tid, PIDFD_THREAD) {
        Err(libc::EINVAL) => {}
        other => return other,
    }
    match open(tid, 0) {
        // Not a thread-group leader: open its process.
        Err(libc::EINVAL) => open(tgid_of(tid)?, 0),
        other => other,
    }
}

/// The process (thread group) of thread `tid`, from `/proc/TID/status`.
pub fn tgid_of(tid: u32) -> Result<u32, Errno> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).map_err(|_| libc::ESRCH)?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok()).ok_or(libc::ESRCH)
}

/// `pidfd_getfd(pidfd, fd, 0)`: our own fd for the open file behind `fd` in that process.
pub fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0u32) }).map(|fd| owned(fd as RawFd))
}

/// Takes ownership of `fd`, which the syscall that returned it has just made.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Copies `buf.len()` bytes at `addr` in process `pid` into `buf`; the count copied.
pub fn read_remote(pid: u32, addr: u64, buf: &mut [u8]) -> Result<usize, Errno> {
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr as *mut c_void, iov_len: buf.len() };
    // SAFETY: `local` describes `buf`, writable for its length; the remote side is only read
    // by the kernel, which checks it.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        Err(super::errno())
    } else {
        Ok(n as usize)
    }
}

/// The address family of socket `fd` (`SO_DOMAIN`).
pub fn socket_domain(fd: RawFd) -> Result<c_int, Errno> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out pointers of the sizes given.
    check_int(unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, ptr::addr_of_mut!(v).cast(), &mut len)
    })?;
    Ok(v)
}

/// `connect(fd, addr, addr.len())` with a raw socket address.
pub fn connect_raw(fd: RawFd, addr: &[u8]) -> Result<(), Errno> {
    loop {
        // SAFETY: addr is a readable buffer of the length passed; the kernel validates it.
        let r = unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len() as libc::socklen_t) };
        match check_int(r) {
            Err(libc::EINTR) => continue,
            other => return other.map(drop),
        }
    }
}

/// `openat(dir, path, O_PATH | O_CLOEXEC)` (relative to the working directory without `dir`),
/// following symlinks as a `connect` would.
pub fn open_path_at(dir: Option<&OwnedFd>, path: &CStr) -> Result<OwnedFd, Errno> {
    let dir = dir.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: path is NUL-terminated.
    check_int(unsafe { libc::openat(dir, path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) }).map(owned)
}

/// (st_dev, st_ino, st_mode) as filled in by `call`, one of the stat family.
fn stat_by(call: impl FnOnce(*mut libc::stat) -> c_int) -> Result<(u64, u64, u32), Errno> {
    // SAFETY: stat is plain old data for the kernel to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check_int(call(&mut st))?;
    Ok((st.st_dev, st.st_ino, st.st_mode))
}

/// (st_dev, st_ino, st_mode) of an open fd.
pub fn fstat_id(fd: RawFd) -> Result<(u64, u64, u32), Errno> {
    // SAFETY: st is a valid out pointer.
    stat_by(|st| unsafe { libc::fstat(fd, st) })
}

/// (st_dev, st_ino, st_mode) of `path` itself (a final symlink not followed).
pub fn lstat_id(path: &CStr) -> Result<(u64, u64, u32), Errno> {
    // SAFETY: path is NUL-terminated; st is a valid out pointer.
    stat_by(|st| unsafe { libc::lstat(path.as_ptr(), st) })
}

/// The file status flags of `fd` (`F_GETFL`).
pub fn status_flags(fd: RawFd) -> Result<c_int, Errno> {
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::fcntl(fd, libc::F_GETFL) })
}

/// Sets the file status flags of `fd` (`F_SETFL`).
pub fn set_status_flags(fd: RawFd, flags: c_int) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

/// The pending error of socket `fd` (`SO_ERROR`): 0 once a connect in progress succeeded.
pub fn socket_error(fd: RawFd) -> Result<c_int, Errno> {
    let mut v: c_int = 0;
    let mut len = std::mem::size_of::<c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out pointers of the sizes given.
    check_int(unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, ptr::addr_of_mut!(v).cast(), &mut len)
    })?;
    Ok(v)
}

/// (st_dev, st_ino, st_mode) of `path`, following symlinks.
pub fn stat_id(path: &CStr) -> Result<(u64, u64, u32), Errno> {
    // SAFETY: path is NUL-terminated; st is a valid out pointer.
    stat_by(|st| unsafe { libc::stat(path.as_ptr(), st) })
}

/// Reaps one exited child without waiting: `Ok(None)` if none has exited.
pub fn wait_nohang() -> Result<Option<(libc::pid_t, c_int)>, Errno> {
    let mut status: c_int = 0;
    // SAFETY: status is a valid out pointer.
    match check_int(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) })? {
        0 => Ok(None),
        pid => Ok(Some((pid, status))),
    }
}

/// Whether this host lets the gate work: seccomp listeners (5.0) and `pidfd_getfd` (5.6),
/// asked of the kernel with arguments that fail fast either way; and a Yama `ptrace_scope`
/// below 2, since `pidfd_getfd` needs ptrace access (init is the tool's ancestor, which
/// scope 1 allows).
pub fn has_gate_support() -> bool {
    // SAFETY: integer arguments only; fd -1 makes the call fail with EBADF where it exists.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, -1, -1, 0u32) };
    let syscalls = r < 0 && super::errno() != libc::ENOSYS;
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(0);
    syscalls && yama < 2
}

/// Adds a Landlock domain that handles only `LANDLOCK_ACCESS_FS_RESOLVE_UNIX` (ABI 9): from
/// now on this task and its children may connect to a Unix socket by path only beneath one of
/// `beneath`, or to one made inside their own domain. A rule on a socket file that the kernel
/// refuses (the right not being one for files) is put on its directory instead. The caller
/// has `no_new_privs`.
pub fn landlock_resolve_unix(beneath: &[&CStr]) -> Result<(), Errno> {
    #[repr(C)]
    struct RulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }
    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }
    const RESOLVE_UNIX: u64 = 1 << 16;
    const RULE_PATH_BENEATH: c_int = 1;
    let attr = RulesetAttr { handled_access_fs: RESOLVE_UNIX, handled_access_net: 0, scoped: 0 };
    // SAFETY: attr is a valid ruleset attribute of the size passed.
    let ruleset = check(unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, ptr::addr_of!(attr), std::mem::size_of::<RulesetAttr>(), 0u32)
    })? as RawFd;
    let add = |path: &CStr| -> Result<(), Errno> {
        let fd = open_path_at(None, path)?;
        let rule = PathBeneath { allowed_access: RESOLVE_UNIX, parent_fd: fd.as_raw_fd() };
        // SAFETY: rule is a valid landlock_path_beneath_attr; fd stays open until it returns.
        check(unsafe {
            libc::syscall(libc::SYS_landlock_add_rule, ruleset, RULE_PATH_BENEATH, ptr::addr_of!(rule), 0u32)
        })
        .map(drop)
    };
    let mut result = Ok(());
    for p in beneath {
        result = match add(p) {
            Err(libc::EINVAL) => match p.to_bytes().iter().rposition(|b| *b == b'/') {
                Some(0) => add(c"/"),
                Some(i) => CString::new(&p.to_bytes()[..i]).map_err(|_| libc::EINVAL).and_then(|d| add(&d)),
                None => Err(libc::EINVAL),
            },
            // A granted socket that is gone since the plan grants nothing.
            Err(libc::ENOENT) => Ok(()),
            other => other,
        };
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        // SAFETY: integer arguments only.
        result = check(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) }).map(drop);
    }
    super::close(ruleset);
    result
}
