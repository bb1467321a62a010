//! Which Unix sockets a tool may connect to by path: those the manifest grants (`net.unix`),
//! and those on the call's own `/tmp`. No other, wherever a read or write grant shows one.
//!
//! Landlock before ABI 9 has no right for connecting to a Unix socket, and seccomp cannot read
//! the path a `connect` names. So the tool runs with one more seccomp filter, which hands every
//! `connect` to the call's init (a seccomp user notification), and init makes the connect on
//! the tool's behalf:
//! 1. it takes its own fd for the tool's socket (`pidfd_getfd`: the same open socket) and
//!    copies the address out of the tool's memory once;
//! 2. for a Unix socket named by path, it opens that path itself (`O_PATH`, from the tool's
//!    working directory, following links as the kernel would), checks the inode it got, and
//!    connects the socket to exactly that inode through `/proc/1/fd/N`;
//! 3. any other address (TCP, abstract or unnamed Unix) it connects as given;
//! 4. it answers the notification with the result. A connect that would block (a blocking
//!    socket: TCP in progress, a Unix listener's full backlog) is made without blocking and
//!    answered when it completes, so init keeps serving the tool's other threads and reaping.
//!
//! Nothing the tool does after the check can change what is connected: init never lets the
//! kernel re-read the tool's memory or fd table (no `SECCOMP_USER_NOTIF_FLAG_CONTINUE`), and
//! the inode is held open from the check to the connect. Init runs as the tool's uid and gid,
//! in its Landlock domain, cgroup and namespaces, so every other layer applies to these
//! connects as to the tool's own; the server sees the tool's uid and gid, and init's pid.
//!
//! Datagram sends name their destination in each `sendto`/`sendmsg`, where seccomp cannot see
//! it either, so Unix datagram sockets are refused at creation (`socket` and `socketpair`;
//! stream and seqpacket ones ignore or refuse a destination).

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys::notify::{self as n, Notif};
use crate::sys::{self, Errno};

/// What init lets through, found inside the sandbox before the tool starts.
#[derive(Debug)]
pub(crate) struct Rules {
    /// `st_dev` of the call's own `/tmp` tmpfs, if it has one.
    tmp_dev: Option<u64>,
    /// (dev, inode) of each granted socket, as found at the start of the call (the BPF LSM
    /// layer registers the same).
    granted: Vec<(u64, u64)>,
}

impl Rules {
    /// Looks up `/tmp` (when `tmp`) and the granted sockets, in the fresh root.
    pub(crate) fn find(granted: &[CString], tmp: bool) -> Self {
        let tmp_dev = if tmp { n::stat_id(c"/tmp").ok().map(|(dev, ..)| dev) } else { None };
        let granted = granted.iter().filter_map(|p| socket_at(p)).collect();
        Self { tmp_dev, granted }
    }

    /// Whether the socket file (dev, ino) may be connected to: on the call's `/tmp`, or a
    /// granted socket.
    fn allows(&self, dev: u64, ino: u64) -> bool {
        self.tmp_dev == Some(dev) || self.granted.contains(&(dev, ino))
    }
}

/// (dev, inode) of the socket file at `path` itself, if that is one.
fn socket_at(path: &CStr) -> Option<(u64, u64)> {
    n::lstat_id(path).ok().filter(|(_, _, mode)| mode & libc::S_IFMT == libc::S_IFSOCK).map(|(d, i, _)| (d, i))
}

/// Largest socket address the kernel accepts (`sizeof(struct sockaddr_storage)`), and the
/// largest Unix one (`sizeof(struct sockaddr_un)`).
const ADDR_MAX: usize = 128;
const UNIX_ADDR_MAX: usize = 110;

/// How often a blocking connect to a Unix listener with a full backlog is tried again.
pub(crate) const RETRY_MS: i32 = 20;

/// A blocking connect under way, answered when it completes.
#[derive(Debug)]
struct Pending {
    id: u64,
    sock: OwnedFd,
    /// `None`: TCP in progress, done when the socket is writable. `Some`: a Unix listener's
    /// backlog was full; the address to try again (with the inode it names, held open).
    retry: Option<(Vec<u8>, Option<OwnedFd>)>,
}

/// Refusals written to the supervisor during a call; the rest are counted. They go into the
/// pipe init reports the tool's exit through, which nobody reads until init has exited: at
/// most this many records (each under 120 bytes) can never fill it, so init never blocks.
pub(crate) const MAX_REPORTED: u32 = 64;

/// The gate as init runs it.
#[derive(Debug)]
pub(crate) struct Gate {
    pub(crate) listener: RawFd,
    rules: Rules,
    pending: Vec<Pending>,
    /// Where refusals are reported (the exit report pipe).
    report: RawFd,
    /// Refusals so far.
    pub(crate) refused: u32,
}

impl Gate {
    pub(crate) fn new(listener: RawFd, rules: Rules, report: RawFd) -> Self {
        Self { listener, rules, pending: Vec::new(), report, refused: 0 }
    }

    /// Reports a refused connect: `U`, the thread id (in the call's pid namespace), the path's
    /// length (u16) and the path, as the tool named it.
    fn report_refusal(&mut self, tid: u32, path: &[u8]) {
        self.refused += 1;
        if self.refused > MAX_REPORTED {
            return;
        }
        let path = &path[..path.iter().position(|b| *b == 0).unwrap_or(path.len()).min(UNIX_ADDR_MAX)];
        let mut msg = Vec::with_capacity(7 + path.len());
        msg.push(b'U');
        msg.extend_from_slice(&tid.to_le_bytes());
        msg.extend_from_slice(&(path.len() as u16).to_le_bytes());
        msg.extend_from_slice(path);
        let _ = sys::write_all(self.report, &msg);
    }

    /// The fds to poll for pending TCP connects, and the poll timeout (retries pending).
    pub(crate) fn wants(&self, out: &mut Vec<libc::pollfd>) -> i32 {
        for p in self.pending.iter().filter(|p| p.retry.is_none()) {
            out.push(libc::pollfd { fd: p.sock.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
        }
        if self.pending.iter().any(|p| p.retry.is_some()) {
            RETRY_MS
        } else {
            -1
        }
    }

    /// Takes the next notification, and answers it now or once its connect completes.
    pub(crate) fn serve_one(&mut self) {
        let Ok(notif) = n::notif_recv(self.listener) else { return };
        let mut refused = None;
        let step = connect_for(self.listener, &notif, &self.rules, &mut refused);
        if let Some(path) = refused {
            self.report_refusal(notif.pid, &path);
        }
        match step {
            Some(Step::Done(r)) => self.answer(notif.id, r),
            Some(Step::Later(p)) => self.pending.push(Pending { id: notif.id, ..p }),
            // The task is gone: there is no one to answer.
            None => {}
        }
    }

    /// Moves pending connects on: answers those that completed, retries full backlogs, and
    /// forgets those whose task went away.
    pub(crate) fn progress(&mut self, ready: &[libc::pollfd]) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            let result = match &p.retry {
                None if !ready.iter().any(|r| r.fd == p.sock.as_raw_fd() && r.revents != 0) => None,
                None => Some(match n::socket_error(p.sock.as_raw_fd()) {
                    Ok(0) => Ok(()),
                    Ok(e) => Err(e),
                    Err(e) => Err(e),
                }),
                Some((addr, _)) => match nonblocking_connect(p.sock.as_raw_fd(), addr) {
                    Err(libc::EAGAIN) => None,
                    other => Some(other),
                },
            };
            match result {
                Some(r) => {
                    let p = self.pending.swap_remove(i);
                    self.answer(p.id, r);
                }
                None if !n::notif_valid(self.listener, p.id) => {
                    self.pending.swap_remove(i);
                }
                None => i += 1,
            }
        }
    }

    fn answer(&self, id: u64, r: Result<(), Errno>) {
        let _ = n::notif_respond(self.listener, id, 0, r.err().unwrap_or(0));
    }
}

/// What became of a connect.
enum Step {
    /// Done, with this result.
    Done(Result<(), Errno>),
    /// Under way (the `id` is filled in by the caller).
    Later(Pending),
}

/// `connect` on a socket whose file may be blocking, without blocking: the file is made
/// non-blocking for the call (it is the tool's, which waits for our answer meanwhile).
fn nonblocking_connect(sock: RawFd, addr: &[u8]) -> Result<(), Errno> {
    let flags = n::status_flags(sock)?;
    if flags & libc::O_NONBLOCK != 0 {
        return n::connect_raw(sock, addr);
    }
    n::set_status_flags(sock, flags | libc::O_NONBLOCK)?;
    let r = n::connect_raw(sock, addr);
    let _ = n::set_status_flags(sock, flags);
    r
}

/// Makes the connect of `notif` here; `None` if its task went away meanwhile. A path the
/// rules refuse is left in `refused`.
fn connect_for(listener: RawFd, notif: &Notif, rules: &Rules, refused: &mut Option<Vec<u8>>) -> Option<Step> {
    let done = |r| Some(Step::Done(r));
    if notif.nr != libc::SYS_connect as i32 {
        return done(Err(libc::ENOSYS));
    }
    // The kernel reads the fd and the length as ints: their upper bits are not the tool's.
    let (fd, addr, len) = (notif.args[0] as i32, notif.args[1], notif.args[2] as u32 as usize);
    if len > ADDR_MAX {
        return done(Err(libc::EINVAL));
    }
    let pidfd = match n::pidfd_open_task(notif.pid) {
        Ok(p) => p,
        // Gone, or (notif_valid says which) something else: answer either way, so that no
        // thread of the tool waits forever.
        Err(e) => return n::notif_valid(listener, notif.id).then_some(Step::Done(Err(e))),
    };
    // The pid might have been reused between the notification and pidfd_open: only a
    // notification still pending proves the pidfd is the caller's.
    if !n::notif_valid(listener, notif.id) {
        return None;
    }
    let sock = match n::pidfd_getfd(&pidfd, fd) {
        Ok(s) => s,
        Err(e) => return done(Err(e)),
    };
    let mut buf = [0u8; ADDR_MAX];
    match n::read_remote(notif.pid, addr, &mut buf[..len]) {
        Ok(got) if got == len => {}
        _ => return done(Err(libc::EFAULT)),
    }
    let addr = &buf[..len];
    let domain = match n::socket_domain(sock.as_raw_fd()) {
        Ok(d) => d,
        Err(e) => return done(Err(e)),
    };
    let family = if len >= 2 { i32::from(u16::from_ne_bytes([addr[0], addr[1]])) } else { -1 };
    let unix = domain == libc::AF_UNIX && family == libc::AF_UNIX;
    if unix && len > UNIX_ADDR_MAX {
        return done(Err(libc::EINVAL));
    }
    let (target, held) = if unix && len > 2 && addr[2] != 0 {
        match check_path(notif.pid, &addr[2..], rules) {
            Ok((un, held)) => (un, Some(held)),
            Err(Refusal::Rules) => {
                *refused = Some(addr[2..].to_vec());
                return done(Err(libc::EACCES));
            }
            Err(Refusal::Errno(e)) => return done(Err(e)),
        }
    } else {
        (addr.to_vec(), None)
    };
    // The last moment to notice that the tool gave up on this connect (its fd may be another
    // socket by now).
    if !n::notif_valid(listener, notif.id) {
        return None;
    }
    Some(match nonblocking_connect(sock.as_raw_fd(), &target) {
        // A blocking socket: the tool waits until it is done.
        Err(libc::EINPROGRESS) if blocking(sock.as_raw_fd()) => Step::Later(Pending { id: 0, sock, retry: None }),
        Err(libc::EAGAIN) if unix && blocking(sock.as_raw_fd()) => {
            Step::Later(Pending { id: 0, sock, retry: Some((target, held)) })
        }
        r => Step::Done(r),
    })
}

fn blocking(sock: RawFd) -> bool {
    n::status_flags(sock).is_ok_and(|f| f & libc::O_NONBLOCK == 0)
}

/// Why a path was not connected.
enum Refusal {
    /// The rules refuse the socket found there.
    Rules,
    /// Opening or checking it failed, as a connect would have.
    Errno(Errno),
}

impl From<Errno> for Refusal {
    fn from(e: Errno) -> Self {
        Refusal::Errno(e)
    }
}

/// Opens the socket at `path` (as the tool named it, relative to its working directory) and
/// checks the inode found there against the rules. Returns the address that connects to that
/// very inode (`/proc/1/fd/N`: init is pid 1, and its fds are there even where `/proc` shows
/// only processes), with the fd that holds it.
fn check_path(pid: u32, path: &[u8], rules: &Rules) -> Result<(Vec<u8>, OwnedFd), Refusal> {
    let path = &path[..path.iter().position(|b| *b == 0).unwrap_or(path.len())];
    // /proc/self and /proc/thread-self would be init's: name the tool's thread instead.
    let path = if let Some(rest) = path.strip_prefix(b"/proc/self/") {
        [format!("/proc/{}/", n::tgid_of(pid)?).as_bytes(), rest].concat()
    } else if let Some(rest) = path.strip_prefix(b"/proc/thread-self/") {
        [format!("/proc/{}/task/{pid}/", n::tgid_of(pid)?).as_bytes(), rest].concat()
    } else {
        path.to_vec()
    };
    let path = path.as_slice();
    let cpath = CString::new(path).map_err(|_| libc::EINVAL)?;
    let cwd = if path.first() == Some(&b'/') {
        None
    } else {
        let proc_cwd = CString::new(format!("/proc/{pid}/cwd")).map_err(|_| libc::EINVAL)?;
        Some(n::open_path_at(None, &proc_cwd)?)
    };
    let target = n::open_path_at(cwd.as_ref(), &cpath)?;
    let (dev, ino, mode) = n::fstat_id(target.as_raw_fd())?;
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Refusal::Errno(libc::ECONNREFUSED));
    }
    if !rules.allows(dev, ino) {
        return Err(Refusal::Rules);
    }
    let held = format!("/proc/1/fd/{}", target.as_raw_fd());
    let mut un = Vec::with_capacity(2 + held.len() + 1);
    un.extend_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
    un.extend_from_slice(held.as_bytes());
    un.push(0);
    Ok((un, target))
}
