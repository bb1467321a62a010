//! The net crate's syscall seam: every `unsafe` block of the crate lives here, each with a
//! SAFETY line.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;

/// Whether `fd` can be written to now (a zero-timeout poll).
pub fn writable(fd: &impl AsRawFd) -> io::Result<bool> {
    let mut p = [libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 }];
    // Errors and hang-ups count as writable: the write that follows reports them.
    Ok(poll(&mut p, 0)? > 0)
}

/// `poll(2)`, retried on EINTR.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: fds is a valid, writable array of its length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        match usize::try_from(r) {
            Ok(n) => return Ok(n),
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
}

/// Random bytes from the kernel (DNS query ids and source ports must not be guessable).
pub fn random_u16() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: b is writable for its length; flags 0 blocks only before the pool is ready.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 2 {
        // Never expected after boot; a time-derived id is still better than none.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        return (t ^ (t >> 16)) as u16;
    }
    u16::from_ne_bytes(b)
}

/// An open handle on the current thread's network namespace.
pub fn current_netns() -> io::Result<OwnedFd> {
    let path = c"/proc/thread-self/ns/net";
    // SAFETY: path is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Moves the current thread into the network namespace `ns`.
pub fn enter_netns(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: ns is a valid namespace fd; integer arguments only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Routes every IPv4 and IPv6 address to loopback in the current network namespace
/// (`local 0.0.0.0/0` and `local ::/0` on `lo`, in the local table): a connection to any
/// address then reaches a listener bound to the wildcard address of its port, which sees the
/// destination the tool asked for as its local address. Nothing leaves the namespace.
pub fn route_everything_to_loopback() -> io::Result<()> {
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        // rtmsg: family, dst_len 0, src_len, tos, table RT_TABLE_LOCAL, protocol RTPROT_BOOT,
        // scope RT_SCOPE_HOST, type RTN_LOCAL; flags.
        let mut body =
            vec![family, 0, 0, 0, libc::RT_TABLE_LOCAL, libc::RTPROT_BOOT, libc::RT_SCOPE_HOST, libc::RTN_LOCAL];
        body.extend_from_slice(&0u32.to_ne_bytes());
        // RTA_OIF = 1 (ifindex 1 is `lo` in every namespace).
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&libc::RTA_OIF.to_ne_bytes());
        body.extend_from_slice(&1u32.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        netlink_request(libc::RTM_NEWROUTE, flags, &body)?;
    }
    Ok(())
}

/// Sends one rtnetlink request and reads its acknowledgement. "Already there" is success.
fn netlink_request(kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
    let total = u32::try_from(16 + body.len()).unwrap_or(u32::MAX);
    let mut msg = Vec::with_capacity(total as usize);
    msg.extend_from_slice(&total.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
    msg.extend_from_slice(body);
    // SAFETY: integer arguments only.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: msg and kernel are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            ptr::addr_of!(kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ack = [0u8; 512];
    // SAFETY: ack is writable for its length.
    let got = unsafe { libc::recv(sock.as_raw_fd(), ack.as_mut_ptr().cast(), ack.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    // nlmsghdr (16 bytes), then nlmsgerr's error (i32): 0 is success.
    let code = ack.get(16..20).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match -code {
        0 | libc::EEXIST => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}
