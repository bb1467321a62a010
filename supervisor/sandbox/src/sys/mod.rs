//! The sandbox crate's syscall seam: every `unsafe` block of the crate lives here, each with a
//! SAFETY line. Functions used in the child between `clone3` and `execve` take only
//! pre-built `&CStr`s and raw fds, and neither allocate nor lock.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use libc::{c_int, c_long, c_ulong, c_void};

pub mod notify;

/// An errno value, as returned from the child-side wrappers.
pub type Errno = i32;

fn errno() -> Errno {
    // SAFETY: __errno_location returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn check(ret: c_long) -> Result<c_long, Errno> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

fn check_int(ret: c_int) -> Result<c_int, Errno> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

/// Result of [`clone3`] on each side.
#[derive(Debug)]
pub enum Forked {
    /// In the parent: the child's pid (in our pid namespace) and a pidfd for it.
    Parent {
        /// Host pid of the child.
        pid: libc::pid_t,
        /// pidfd referring to the child.
        pidfd: OwnedFd,
    },
    /// In the child.
    Child,
}

/// `clone3` with `flags` (namespaces, `CLONE_PIDFD`, optionally `CLONE_INTO_CGROUP`), like
/// `fork`: the child continues on a copy of the caller's stack.
///
/// The caller must be single-threaded (see `spawn::spawn`), so the child may use the
/// allocator safely: no other thread can be holding its lock at the time of the copy.
pub fn clone3(flags: u64, cgroup: Option<BorrowedFd<'_>>) -> io::Result<Forked> {
    let mut pidfd: c_int = -1;
    // SAFETY: clone_args is plain old data; all-zero is a valid starting value.
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags | libc::CLONE_PIDFD as u64;
    args.pidfd = ptr::addr_of_mut!(pidfd) as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    if let Some(fd) = cgroup {
        const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: args is a valid clone_args of the size passed; with no CLONE_VM and no stack the
    // child gets a copy-on-write copy of this address space and returns here, as with fork.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, ptr::addr_of!(args), std::mem::size_of::<libc::clone_args>()) };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        pid => {
            // SAFETY: the kernel stored a fresh pidfd that nothing else owns.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            Ok(Forked::Parent { pid: pid as libc::pid_t, pidfd })
        }
    }
}

/// The running kernel's Landlock ABI version, or 0 if Landlock is unavailable.
pub fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: c_ulong = 1;
    // SAFETY: a NULL attribute with size 0 and the VERSION flag only queries the ABI.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, ptr::null::<c_void>(), 0usize, LANDLOCK_CREATE_RULESET_VERSION)
    };
    u32::try_from(v).unwrap_or(0)
}

/// Sends `sig` to the process behind `pidfd`. ESRCH (already gone) is not an error.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: c_int) -> io::Result<()> {
    // SAFETY: pidfd is a valid pidfd; a NULL siginfo with flags 0 behaves like kill(2).
    let r = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, ptr::null::<c_void>(), 0) };
    if r < 0 && errno() != libc::ESRCH {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// `kill(2)`, ignoring errors (the process may already be gone).
pub fn kill(pid: i32, sig: c_int) {
    // SAFETY: integer arguments only.
    unsafe { libc::kill(pid, sig) };
}

/// Reaps the child behind `pidfd`, blocking until it has exited.
pub fn wait_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<Exit> {
    loop {
        // SAFETY: siginfo_t is plain old data; all-zero is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out pointer; P_PIDFD takes the pidfd as id.
        let r = unsafe { libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(io::Error::last_os_error());
        }
        // SAFETY: after a successful waitid with WEXITED, si_status holds the status.
        let status = unsafe { info.si_status() };
        return Ok(match info.si_code {
            libc::CLD_EXITED => Exit::Code(status),
            _ => Exit::Signal(status),
        });
    }
}

/// `poll(2)` on `fds` for up to `timeout_ms` (-1: forever). Returns the number ready.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: c_int) -> io::Result<usize> {
    // SAFETY: fds is a valid mutable slice of pollfd of the given length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(e) };
    }
    Ok(r as usize)
}

/// A pipe whose both ends are close-on-exec: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: fds is a valid array of two ints for pipe2 to fill.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Blocks `signals` for this thread and returns a signalfd that reads them, so the poll loop
/// can see them. Children must call [`reset_signals`] before `execve`.
pub fn signalfd(signals: &[c_int]) -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: set is a valid, initialised sigset_t.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    // SAFETY: set is valid; the old mask is not needed.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: set is valid; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads and discards what is pending on a non-blocking fd (a signalfd).
pub fn drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 512];
    // SAFETY: buf is a valid writable buffer of the length passed.
    while unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

// ---- child side: between clone3 and execve. No allocation, no locks. ----

/// Blocking read of one byte; `Ok(false)` at end of file.
pub fn read_byte(fd: RawFd) -> Result<bool, Errno> {
    let mut b = 0u8;
    loop {
        // SAFETY: b is a valid one-byte buffer.
        let r = unsafe { libc::read(fd, ptr::addr_of_mut!(b).cast(), 1) };
        match r {
            1 => return Ok(true),
            0 => return Ok(false),
            _ if errno() == libc::EINTR => continue,
            _ => return Err(errno()),
        }
    }
}

/// What kind of file `fd` is (`S_IFMT` bits of its mode), if it can be stat'ed.
pub fn file_kind(fd: RawFd) -> Option<libc::mode_t> {
    // SAFETY: stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a valid out pointer.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_mode & libc::S_IFMT)
}

/// A new, non-blocking open file description for what `fd` refers to (a pipe or terminal),
/// through `/proc/self/fd`, so that setting `O_NONBLOCK` does not change the shared one.
pub fn reopen_nonblocking(fd: RawFd) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).map_err(io::Error::other)?;
    // SAFETY: path is NUL-terminated.
    let new =
        unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: new is fresh and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `send(2)` with `MSG_DONTWAIT`: how many bytes went out.
pub fn send_some(fd: RawFd, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: buf is a valid readable slice.
    let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    usize::try_from(r).map_err(|_| errno())
}

/// One `write(2)`: how many bytes went out.
pub fn write_some(fd: RawFd, buf: &[u8]) -> Result<usize, Errno> {
    // SAFETY: buf is a valid readable slice.
    let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    usize::try_from(r).map_err(|_| errno())
}

/// Writes all of `buf` to `fd`.
pub fn write_all(fd: RawFd, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice.
        let r = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(errno());
        }
        buf = &buf[r as usize..];
    }
    Ok(())
}

/// `prctl` with integer arguments only.
pub fn prctl(op: c_int, a: c_ulong, b: c_ulong) -> Result<(), Errno> {
    // SAFETY: every prctl op used here takes integer arguments, no pointers.
    check_int(unsafe { libc::prctl(op, a, b, 0 as c_ulong, 0 as c_ulong) }).map(drop)
}

/// `mount(2)`.
pub fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: c_ulong,
    data: Option<&CStr>,
) -> Result<(), Errno> {
    let p = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: all pointers are NUL-terminated strings or NULL, as mount(2) accepts.
    check_int(unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) }).map(drop)
}

/// `openat2(AT_FDCWD, path, O_PATH | O_CLOEXEC, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`:
/// an fd for `path` that fails (ELOOP) if any component is a symlink, so a path checked
/// earlier cannot be re-pointed elsewhere in between.
pub fn open_path_nofollow(path: &CStr) -> Result<OwnedFd, Errno> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: path is NUL-terminated; how is a valid open_how of the size passed.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            ptr::addr_of!(how),
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `open_tree(fd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH [| AT_RECURSIVE])`:
/// a detached copy of the mount at `fd` (with the mounts below it if `recursive`).
pub fn open_tree_clone(fd: BorrowedFd<'_>, recursive: bool) -> Result<RawFd, Errno> {
    const OPEN_TREE_CLONE: c_ulong = 1;
    let below = if recursive { libc::AT_RECURSIVE as c_ulong } else { 0 };
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as c_ulong | below | libc::AT_EMPTY_PATH as c_ulong;
    // SAFETY: "" with AT_EMPTY_PATH names fd; the flags take no pointers.
    check(unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) }).map(|fd| fd as RawFd)
}

/// Per-mount attributes for [`mount_setattr`].
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// No set-user-id.
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
/// No device access.
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
/// No execution.
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// The `mount(2)` flags of `MOUNT_ATTR_*` bits, for kernels without `mount_setattr`.
pub fn ms_flags(attrs: u64) -> c_ulong {
    [
        (MOUNT_ATTR_RDONLY, libc::MS_RDONLY),
        (MOUNT_ATTR_NOSUID, libc::MS_NOSUID),
        (MOUNT_ATTR_NODEV, libc::MS_NODEV),
        (MOUNT_ATTR_NOEXEC, libc::MS_NOEXEC),
    ]
    .iter()
    .filter(|(a, _)| attrs & a != 0)
    .fold(0, |f, (_, m)| f | m)
}

/// Sets `attrs` on the whole detached tree `fd` (recursively) and makes it private.
pub fn mount_setattr(fd: RawFd, attrs: u64) -> Result<(), Errno> {
    let attr = MountAttr { attr_set: attrs, attr_clr: 0, propagation: libc::MS_PRIVATE, userns_fd: 0 };
    let flags = (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as c_ulong;
    // SAFETY: attr is a valid mount_attr of the size passed; "" with AT_EMPTY_PATH names fd.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            flags,
            ptr::addr_of!(attr),
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Attaches the detached tree `fd` onto the directory or file `target` (an fd, so the mount
/// point cannot be swapped for a symlink after it was opened).
pub fn move_mount(fd: RawFd, target: BorrowedFd<'_>) -> Result<(), Errno> {
    const MOVE_MOUNT_F_EMPTY_PATH: c_ulong = 0x4;
    const MOVE_MOUNT_T_EMPTY_PATH: c_ulong = 0x40;
    let flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: "" with the EMPTY_PATH flags names the two fds.
    check(unsafe { libc::syscall(libc::SYS_move_mount, fd, c"".as_ptr(), target.as_raw_fd(), c"".as_ptr(), flags) })
        .map(drop)
}

/// `mkdir(2)`; an existing directory is not an error.
pub fn mkdir(path: &CStr, mode: libc::mode_t) -> Result<(), Errno> {
    // SAFETY: path is NUL-terminated.
    match check_int(unsafe { libc::mkdir(path.as_ptr(), mode) }) {
        Err(libc::EEXIST) | Ok(_) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates an empty file to bind a file onto.
pub fn touch(path: &CStr) -> Result<(), Errno> {
    // SAFETY: path is NUL-terminated; the returned fd is closed right away.
    let fd = check_int(unsafe { libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644) })?;
    close(fd);
    Ok(())
}

/// `symlink(2)`.
pub fn symlink(target: &CStr, link: &CStr) -> Result<(), Errno> {
    // SAFETY: both are NUL-terminated.
    check_int(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }).map(drop)
}

/// `open(path, O_PATH | O_CLOEXEC)`.
pub fn open_path(path: &CStr) -> Result<OwnedFd, Errno> {
    // SAFETY: path is NUL-terminated.
    let fd = check_int(unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) })?;
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Closes every fd except `keep` and `also` (ignored when negative).
pub fn close_all_except_two(keep: RawFd, also: RawFd) {
    if also < 0 || also == keep {
        return close_all_except(keep);
    }
    let (keep, also) = (keep.min(also), keep.max(also));
    let (keep, also) = (u32::try_from(keep).unwrap_or(0), u32::try_from(also).unwrap_or(0));
    // SAFETY: integer arguments only; the caller owns all these fds and uses none afterwards.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, keep - 1, 0u32);
        }
        if also > keep + 1 {
            libc::syscall(libc::SYS_close_range, keep + 1, also - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, also + 1, u32::MAX, 0u32);
    }
}

/// Closes every fd except `keep`.
pub fn close_all_except(keep: RawFd) {
    let keep = u32::try_from(keep).unwrap_or(0);
    // SAFETY: integer arguments only; the caller owns all these fds and uses none afterwards.
    unsafe {
        if keep > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, keep - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, keep + 1, u32::MAX, 0u32);
    }
}

/// `close(2)`, ignoring errors.
pub fn close(fd: RawFd) {
    // SAFETY: the caller owns fd and does not use it afterwards.
    unsafe { libc::close(fd) };
}

/// Writes `value` to an existing file (a sysctl).
pub fn write_file(path: &CStr, value: &[u8]) -> Result<(), Errno> {
    // SAFETY: path is NUL-terminated; the fd is closed below.
    let fd = check_int(unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    let r = write_all(fd, value);
    close(fd);
    r
}

/// `chdir(2)`.
pub fn chdir(path: &CStr) -> Result<(), Errno> {
    // SAFETY: path is NUL-terminated.
    check_int(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

/// `pivot_root(".", ".")` then detach the old root stacked on top: the cwd becomes `/`.
pub fn pivot_to_cwd() -> Result<(), Errno> {
    // SAFETY: both arguments are the NUL-terminated string ".".
    check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) })?;
    // SAFETY: "." is NUL-terminated.
    check_int(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) })?;
    chdir(c"/")
}

/// `sethostname(2)`.
pub fn sethostname(name: &CStr) -> Result<(), Errno> {
    let bytes = name.to_bytes();
    // SAFETY: bytes is valid for its length.
    check_int(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) }).map(drop)
}

/// `setsid(2)`.
pub fn setsid() -> Result<(), Errno> {
    // SAFETY: no arguments.
    check_int(unsafe { libc::setsid() }).map(drop)
}

/// `setrlimit(2)`.
pub fn setrlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> Result<(), Errno> {
    let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: lim is a valid rlimit.
    check_int(unsafe { libc::setrlimit(resource, &lim) }).map(drop)
}

/// Drops supplementary groups, then sets real, effective and saved gid and uid.
pub fn set_identity(uid: u32, gid: u32) -> Result<(), Errno> {
    // SAFETY: a zero-length list with a NULL pointer clears the supplementary groups.
    check_int(unsafe { libc::setgroups(0, ptr::null()) })?;
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// Clears the ambient set, drops every capability up to `last_cap` from the bounding set,
/// then empties the effective, permitted and inheritable sets.
pub fn drop_all_caps(last_cap: u32) -> Result<(), Errno> {
    prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong, 0)?;
    for cap in 0..=last_cap {
        match prctl(libc::PR_CAPBSET_DROP, c_ulong::from(cap), 0) {
            Ok(()) | Err(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: header and data are the v3 layout capset expects (two 32-bit words each).
    check(unsafe { libc::syscall(libc::SYS_capset, ptr::addr_of_mut!(header), data.as_ptr()) }).map(drop)
}

/// `unshare(2)` for the calling thread.
pub fn unshare(flags: c_int) -> io::Result<()> {
    // SAFETY: integer argument only.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `setns(2)` into the namespace behind `fd`.
pub fn setns(fd: BorrowedFd<'_>, nstype: c_int) -> io::Result<()> {
    // SAFETY: fd is a valid namespace fd; integer arguments only.
    if unsafe { libc::setns(fd.as_raw_fd(), nstype) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a namespace file (`/proc/thread-self/ns/...`) read-only, close-on-exec.
pub fn open_ns(path: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: path is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Brings the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    let sock = check_int(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: req is a valid ifreq naming "lo"; SIOCGIFFLAGS fills ifru_flags.
    let r = check_int(unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, ptr::addr_of_mut!(req)) }).and_then(|_| {
        // SAFETY: reading and writing the flags member of the union SIOCGIFFLAGS filled.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: req is a valid ifreq.
        check_int(unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, ptr::addr_of!(req)) })
    });
    close(sock);
    r.map(drop)
}

/// `dup2(2)` for setting up stdio.
pub fn dup2(from: RawFd, to: RawFd) -> Result<(), Errno> {
    if from == to {
        // Already in place: only clear close-on-exec.
        // SAFETY: integer arguments only.
        return check_int(unsafe { libc::fcntl(to, libc::F_SETFD, 0) }).map(drop);
    }
    // SAFETY: integer arguments only.
    check_int(unsafe { libc::dup2(from, to) }).map(drop)
}

/// Marks every fd from `first` up as close-on-exec.
pub fn cloexec_from(first: u32, highest: RawFd) -> Result<(), Errno> {
    if !has_close_range_cloexec() {
        // Before Linux 5.11: one fcntl per possible fd, up to the highest the parent had open.
        for fd in first as RawFd..=highest {
            // SAFETY: integer arguments only; an fd that is not open fails with EBADF.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        return Ok(());
    }
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) }).map(drop)
}

/// Whether `close_range` takes `CLOSE_RANGE_CLOEXEC` (Linux 5.11). Asked once, of a range
/// where no fd is open.
pub fn has_close_range_cloexec() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        // SAFETY: integer arguments only; no fd is open that high.
        unsafe { libc::syscall(libc::SYS_close_range, u32::MAX - 1, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) == 0 }
    })
}

/// The highest fd this process has open (for [`cloexec_from`] on kernels without
/// `CLOSE_RANGE_CLOEXEC`).
pub fn highest_open_fd() -> RawFd {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok()).max().unwrap_or(1024))
        .unwrap_or(65_535)
}

/// Runs `f(ctx)` in a child that shares this process's memory and fd table (`CLONE_VM |
/// CLONE_VFORK | CLONE_FILES`) on `stack`; returns its pid once it has exec'd or exited. `f`
/// may only exec, write to fds and `_exit`: it runs on borrowed memory while this process is
/// suspended. An fd it opens close-on-exec stays ours alone once it execs (execve gives the
/// child a table of its own first).
pub fn vfork_run<T>(f: fn(&T) -> c_int, ctx: &T, stack: &mut [u8]) -> Result<libc::pid_t, Errno> {
    struct Call<'a, T> {
        f: fn(&T) -> c_int,
        ctx: &'a T,
    }
    extern "C" fn entry<T>(arg: *mut c_void) -> c_int {
        // SAFETY: `arg` points at the `Call` on the caller's stack below, which stays alive and
        // untouched while this child runs: the caller is suspended until it execs or exits.
        let call = unsafe { &*arg.cast::<Call<'_, T>>() };
        (call.f)(call.ctx)
    }
    let call = Call { f, ctx };
    let arg = ptr::addr_of!(call).cast_mut().cast::<c_void>();
    // Stacks grow down on x86_64; the top must be 16-byte aligned.
    let top = stack.as_mut_ptr().wrapping_add(stack.len());
    let top = top.wrapping_sub(top as usize % 16);
    let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD;
    // SAFETY: `top` is inside `stack`, which outlives the child's run (we are suspended until
    // it execs or exits); `entry::<T>` and `arg` (which borrows `call`) are valid for that time.
    check_int(unsafe { libc::clone(entry::<T>, top.cast(), flags, arg) })
}

/// Waits for any child: (pid, raw wait status).
pub fn wait_any() -> Result<(libc::pid_t, c_int), Errno> {
    loop {
        let mut status: c_int = 0;
        // SAFETY: status is a valid out pointer.
        match check_int(unsafe { libc::waitpid(-1, &mut status, 0) }) {
            Ok(pid) => return Ok((pid, status)),
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Zeroes this process's argv and environment strings, so that `/proc/<pid>/cmdline` and
/// `environ` of a forked copy of agentd show nothing of agentd. Best effort.
pub fn scrub_proc_strings() {
    let mut buf = [0u8; 2048];
    // SAFETY: the path is NUL-terminated; the fd is closed below.
    let fd = unsafe { libc::open(c"/proc/self/stat".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: buf is a valid writable buffer of the length passed.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    close(fd);
    let Ok(n) = usize::try_from(n) else { return };
    // Fields after the command name (which may contain spaces) start at field 3.
    let Some(close_paren) = buf[..n].iter().rposition(|b| *b == b')') else { return };
    let mut fields = buf[close_paren + 2..n].split(|b| *b == b' ');
    let mut nth = |skip: usize| -> Option<usize> {
        let f = fields.nth(skip)?;
        f.iter().try_fold(0usize, |acc, d| d.is_ascii_digit().then(|| acc * 10 + usize::from(d - b'0')))
    };
    // arg_start is field 48: the 46th after field 3.
    let (Some(arg_start), Some(arg_end), Some(env_start), Some(env_end)) = (nth(45), nth(0), nth(0), nth(0)) else {
        return;
    };
    for (start, end) in [(arg_start, arg_end), (env_start, env_end)] {
        if start != 0 && end > start {
            // SAFETY: the kernel reports [start, end) as this process's argv/environ strings,
            // which live in its own writable stack mapping.
            unsafe { ptr::write_bytes(start as *mut u8, 0, end - start) };
        }
    }
}

/// `execve(2)`; returns only on failure, with its errno.
pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> Errno {
    // SAFETY: argv and envp are NULL-terminated arrays of pointers to NUL-terminated strings
    // that the caller keeps alive.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    errno()
}

/// Gives the tool default signal handling: every disposition back to `SIG_DFL` (Rust ignores
/// SIGPIPE, and ignored signals survive `execve`) and an empty signal mask.
pub fn reset_signals() -> Result<(), Errno> {
    for sig in 1..libc::SIGRTMIN() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: SIG_DFL is a valid disposition for every catchable signal.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
    }
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    // SAFETY: set is a valid, initialised sigset_t.
    check_int(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut()) }).map(drop)
}

/// Sets `sig` to be ignored (a disposition `execve` keeps).
pub fn ignore_signal(sig: c_int) {
    // SAFETY: SIG_IGN is a valid disposition for every catchable signal.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
}

/// Whether the kernel has `PR_SET_MDWE` (Linux 6.3): `PR_GET_MDWE` fails with EINVAL before.
pub fn has_mdwe() -> bool {
    const PR_GET_MDWE: c_int = 66;
    // SAFETY: PR_GET_MDWE takes no pointers; the unused arguments must be zero.
    unsafe { libc::prctl(PR_GET_MDWE, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong, 0 as c_ulong) >= 0 }
}

/// `_exit(2)`: ends the child without running any of the parent's destructors or atexit hooks.
pub fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit never returns and touches no user-space state.
    unsafe { libc::_exit(code) }
}
