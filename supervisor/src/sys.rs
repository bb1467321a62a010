//! The binary's syscall seam: every `unsafe` block of the crate lives here, each with a
//! SAFETY line. What the CLI and the daemon need for their own process: standard fds, hardening,
//! the API socket's peer groups, and workers that die with the daemon. Sandboxes are spawned
//! by `agentd-sandbox`, through its own seam.

use std::io;
use std::os::fd::RawFd;

/// Makes the supervisor itself non-dumpable (no ptrace by peers, no core files of its memory).
pub fn harden_self() -> io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE with 0 takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: zero is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Supplementary groups of the peer of a connected Unix socket (`SO_PEERGROUPS`): what
/// its process had when it connected. `SO_PEERCRED` only has the primary gid.
pub fn peer_groups(fd: RawFd) -> io::Result<Vec<u32>> {
    let mut groups = vec![0u32; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * 4).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: `groups` has room for `len` bytes, and `len` is a valid out pointer.
        let r = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        let n = len as usize / 4;
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

/// Makes `cmd`'s process receive SIGKILL when the thread that spawns it exits, so that the
/// daemon's sandbox workers never outlive it (spawn them from a thread that lives as long).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    signal_with_parent(cmd, libc::SIGKILL);
}

/// Makes `cmd`'s process receive `signal` when the thread that spawns it exits.
/// `agentd exec` takes SIGTERM as "kill the call and record it": what `agentd mcp` sends.
pub fn signal_with_parent(cmd: &mut std::process::Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    let parent = i32::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl and
    // getppid, which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Effective uid of the supervisor.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure fds 0, 1 and 2 are open (on /dev/null if they were closed), so that no pipe
/// agentd creates later can land on them.
pub fn ensure_stdio_open() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            // SAFETY: the path is NUL-terminated; the lowest free fd (this one) is taken.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}
