//! Forwarded network grants: a call's network namespace holds only loopback and, for each
//! granted `address:port`, that address on its loopback and a listening socket agentd made
//! there. agentd accepts each connection the tool makes to it and opens the real one from its
//! own namespace, then moves bytes both ways with `splice` (kernel to kernel, through a
//! pipe). Anything not granted has no route inside the namespace: default deny by
//! construction, on any kernel with network namespaces.
//!
//! Everything runs in the supervisor's one thread, driven from its poll loop
//! ([`Forwarder::pollfds`] and [`Forwarder::progress`]): sandboxes are spawned from a
//! single-threaded process.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use nix::sys::socket::{self as so, sockopt, AddressFamily, SockFlag, SockType};

use crate::sys;

/// Bytes one splice moves at most.
const CHUNK: usize = 256 * 1024;

/// Connections one call may have open through its forwarders at once. Each holds six of
/// agentd's descriptors (two sockets, two pipes); past it, new ones are closed at once and
/// recorded, so that a tool cannot exhaust the supervisor's descriptors.
pub const MAX_CONNECTIONS: usize = 256;

/// One forwarded connection, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// Where the tool connected (inside its namespace), which is the real destination.
    pub to: SocketAddr,
    /// Whether the real connection was made.
    pub connected: bool,
    /// Bytes from the tool to the destination.
    pub sent: u64,
    /// Bytes from the destination to the tool.
    pub received: u64,
    /// From accept to close.
    pub duration_ms: u64,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl Flow {
    /// A connection to `to` that never got going, and why.
    fn failed(to: SocketAddr, error: String) -> Self {
        Flow { to, connected: false, sent: 0, received: 0, duration_ms: 0, error: Some(error) }
    }
}

/// One direction of a connection: bytes read from `from` wait in a pipe for `to`.
#[derive(Debug)]
struct Half {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    queued: usize,
    /// The pipe took nothing while it held bytes: it is full (its size is the kernel's, not
    /// ours), so `from` is not waited on until some of them leave. Waiting on a readable
    /// `from` meanwhile would wake the loop at once, again and again.
    full: bool,
    eof: bool,
    shut: bool,
    moved: u64,
}

impl Half {
    fn new() -> std::io::Result<Self> {
        let (pipe_r, pipe_w) = sys::pipe_nonblocking()?;
        Ok(Half { pipe_r, pipe_w, queued: 0, full: false, eof: false, shut: false, moved: 0 })
    }

    /// Moves what it can from `from` to `to`; an error ends the connection.
    fn pump(&mut self, from: &TcpStream, to: &TcpStream) -> std::io::Result<()> {
        use std::io::ErrorKind::WouldBlock;
        loop {
            let mut progressed = false;
            if !self.eof && !self.full {
                match sys::splice(from.as_fd(), self.pipe_w.as_fd(), CHUNK) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.queued += n;
                        progressed = true;
                    }
                    Err(e) if e.kind() == WouldBlock => self.full = self.queued > 0,
                    Err(e) => return Err(e),
                }
            }
            if self.queued > 0 {
                match sys::splice(self.pipe_r.as_fd(), to.as_fd(), self.queued) {
                    Ok(n) => {
                        self.queued -= n;
                        self.moved += n as u64;
                        progressed |= n > 0;
                        self.full &= n == 0;
                    }
                    Err(e) if e.kind() == WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if self.eof && self.queued == 0 && !self.shut {
                let _ = to.shutdown(std::net::Shutdown::Write);
                self.shut = true;
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    /// What to wait for: readable `from`, writable `to`.
    fn wants(&self) -> (bool, bool) {
        (!self.eof && !self.full, self.queued > 0)
    }
}

#[derive(Debug)]
struct Conn {
    inbound: TcpStream,
    outbound: TcpStream,
    to: SocketAddr,
    connected: bool,
    up: Half,
    down: Half,
    started: Instant,
}

/// The listeners of one call and the connections through them.
#[derive(Debug)]
pub struct Forwarder {
    listeners: Vec<(TcpListener, SocketAddr)>,
    conns: Vec<Conn>,
    done: Vec<Flow>,
    /// Connections closed at once past [`MAX_CONNECTIONS`], by destination.
    refused: std::collections::BTreeMap<SocketAddr, u64>,
}

impl Forwarder {
    /// Sets up, in the current network namespace (the call's, entered by the caller), each
    /// target's address on loopback and a listening socket at it.
    pub fn listen(targets: &[SocketAddr]) -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        for t in targets {
            if !t.ip().is_loopback() {
                sys::add_loopback_address(t.ip())?;
            }
            let l = TcpListener::bind(t)?;
            l.set_nonblocking(true)?;
            if !t.ip().is_loopback() {
                answers(&l, t)?;
            }
            listeners.push((l, *t));
        }
        Ok(Forwarder { listeners, conns: Vec::new(), done: Vec::new(), refused: Default::default() })
    }

    /// What to poll: each entry's fd and events.
    pub fn pollfds(&self) -> Vec<libc::pollfd> {
        let fd = |fd: i32, events: libc::c_short| libc::pollfd { fd, events, revents: 0 };
        let mut out: Vec<libc::pollfd> = self.listeners.iter().map(|(l, _)| fd(l.as_raw_fd(), libc::POLLIN)).collect();
        for c in &self.conns {
            if !c.connected {
                out.push(fd(c.outbound.as_raw_fd(), libc::POLLOUT));
                continue;
            }
            let (up_in, up_out) = c.up.wants();
            let (down_in, down_out) = c.down.wants();
            let events = |read: bool, write: bool| {
                (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 })
            };
            out.push(fd(c.inbound.as_raw_fd(), events(up_in, down_out)));
            out.push(fd(c.outbound.as_raw_fd(), events(down_in, up_out)));
        }
        out
    }

    /// Accepts what is waiting, completes connects, moves bytes, and retires connections
    /// that are over. Never blocks.
    pub fn progress(&mut self) {
        for i in 0..self.listeners.len() {
            while let Ok((inbound, _)) = self.listeners[i].0.accept() {
                let to = self.listeners[i].1;
                let started = Instant::now();
                if self.conns.len() >= MAX_CONNECTIONS {
                    // Counted, and recorded once per destination when the call ends.
                    drop(inbound);
                    *self.refused.entry(to).or_default() += 1;
                    continue;
                }
                match connect(to).and_then(|outbound| {
                    inbound.set_nonblocking(true)?;
                    Ok(Conn { inbound, outbound, to, connected: false, up: Half::new()?, down: Half::new()?, started })
                }) {
                    Ok(c) => self.conns.push(c),
                    Err(e) => self.done.push(Flow::failed(to, e.to_string())),
                }
            }
        }
        let mut i = 0;
        while i < self.conns.len() {
            match step(&mut self.conns[i]) {
                Ok(false) => i += 1,
                Ok(true) => {
                    let c = self.conns.swap_remove(i);
                    self.done.push(flow(&c, None));
                }
                Err(e) => {
                    let c = self.conns.swap_remove(i);
                    self.done.push(flow(&c, Some(e.to_string())));
                }
            }
        }
    }

    /// Connections that ended since the last call.
    pub fn take_done(&mut self) -> Vec<Flow> {
        std::mem::take(&mut self.done)
    }

    /// Ends everything (the call is over): what was open is recorded as ended here.
    pub fn close(mut self) -> Vec<Flow> {
        self.progress();
        let mut out = std::mem::take(&mut self.done);
        out.extend(self.conns.iter().map(|c| flow(c, None)));
        out.extend(self.refused.iter().map(|(to, n)| {
            Flow::failed(*to, format!("{n} connections refused: the call had {MAX_CONNECTIONS} open already"))
        }));
        out
    }
}

/// Waits until a connection to `t` reaches its listener `l`. A new address can take a moment
/// before the kernel delivers to it (an IPv6 one on a loopback that just came up stays
/// tentative until the device is ready, and a SYN sent meanwhile is dropped and retried a
/// second later), and a call started before then would wait or fail. So agentd connects to
/// it itself, non-blocking, until one completes at once; that connection is accepted and
/// dropped here, never forwarded.
fn answers(l: &TcpListener, t: &SocketAddr) -> std::io::Result<()> {
    let until = Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let probe = connect(*t)?;
        let mut fds = [libc::pollfd { fd: probe.as_raw_fd(), events: libc::POLLOUT, revents: 0 }];
        let _ = sys::poll(&mut fds, 5);
        let done = fds[0].revents & libc::POLLOUT != 0
            && so::getsockopt(&probe, sockopt::SocketError).is_ok_and(|e| e == 0)
            && probe.peer_addr().is_ok();
        if done {
            let accepted = Instant::now() + std::time::Duration::from_millis(100);
            while l.accept().is_err() && Instant::now() < accepted {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            return Ok(());
        }
        drop(probe);
        if Instant::now() >= until {
            return Err(std::io::Error::other(format!("{t} did not become reachable in the call's namespace")));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn flow(c: &Conn, error: Option<String>) -> Flow {
    Flow {
        to: c.to,
        connected: c.connected,
        sent: c.up.moved,
        received: c.down.moved,
        duration_ms: u64::try_from(c.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        error,
    }
}

/// Moves a connection along; true once both directions are over.
fn step(c: &mut Conn) -> std::io::Result<bool> {
    if !c.connected {
        match so::getsockopt(&c.outbound, sockopt::SocketError)? {
            0 => {}
            e if e == libc::EINPROGRESS || e == libc::EALREADY => return Ok(false),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
        // Writable with no error: connected (or still in progress, which peer_addr tells).
        if c.outbound.peer_addr().is_err() {
            return Ok(false);
        }
        c.connected = true;
    }
    c.up.pump(&c.inbound, &c.outbound)?;
    c.down.pump(&c.outbound, &c.inbound)?;
    Ok(c.up.shut && c.down.shut)
}

/// Starts a non-blocking connect to `to` from the current (agentd's own) namespace.
fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let family = if to.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = so::socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    let started = match to {
        SocketAddr::V4(a) => so::connect(fd.as_raw_fd(), &so::SockaddrIn::from(a)),
        SocketAddr::V6(a) => so::connect(fd.as_raw_fd(), &so::SockaddrIn6::from(a)),
    };
    match started {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// In a namespace of its own with only loopback, a client reaches a server of the host's
    /// namespace through the forwarder, both ways, with the bytes counted; a port that is not
    /// forwarded is unreachable there.
    #[test]
    fn a_forwarded_address_reaches_the_host_and_nothing_else_does() {
        let test = "forward::tests::a_forwarded_address_reaches_the_host_and_nothing_else_does";
        if !agentd_tests::need(test, "root", agentd_tests::is_root(), "a network namespace needs root") {
            return;
        }
        // An echo server in the host's namespace, on an address only a forwarder can reach
        // from the call's namespace (whose 127.0.0.0/8 is its own).
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let target = server.local_addr().expect("addr");
        let echo = std::thread::spawn(move || {
            let (mut s, _) = server.accept().expect("accept");
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => s.write_all(&buf[..n]).expect("echo"),
                }
            }
        });
        // A server that takes every connection and keeps it, for the limit below.
        let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
        let held_at = holder.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for s in holder.incoming().flatten() {
                kept.push(s);
            }
        });
        // The namespace is the thread's: this test thread enters one and comes back.
        std::thread::spawn(move || {
            let home = sys::open_ns(c"/proc/thread-self/ns/net").expect("home");
            sys::unshare(libc::CLONE_NEWNET).expect("unshare");
            let ns = sys::open_ns(c"/proc/thread-self/ns/net").expect("ns");
            sys::loopback_up().expect("lo up");
            // Addresses that are not loopback's are added to it, IPv4 and IPv6.
            let v4: SocketAddr = "192.0.2.10:8080".parse().expect("addr");
            let v6: SocketAddr = "[2001:db8::10]:8443".parse().expect("addr");
            let mut fwd = Forwarder::listen(&[target, v4, v6, held_at]).expect("listen");
            for extra in [v4, v6] {
                if let Err(e) = TcpStream::connect(extra) {
                    panic!("{extra} is not reachable in the namespace: {e}");
                }
            }
            let mut client = TcpStream::connect(target).expect("connect through the backlog");
            let other = SocketAddr::new(target.ip(), target.port().wrapping_add(1).max(1));
            assert!(TcpStream::connect(other).is_err(), "an address that is not forwarded answers");
            let elsewhere: SocketAddr = "192.0.2.1:80".parse().expect("addr");
            let refused = TcpStream::connect_timeout(&elsewhere, std::time::Duration::from_millis(200));
            assert!(refused.is_err(), "no route outside the namespace");
            sys::setns(home.as_fd(), libc::CLONE_NEWNET).expect("home");
            client.set_nonblocking(true).expect("nonblocking");
            let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let (mut written, mut got) = (0usize, Vec::new());
            let until = Instant::now() + std::time::Duration::from_secs(10);
            while got.len() < payload.len() {
                assert!(Instant::now() < until, "only {} of {} bytes came back", got.len(), payload.len());
                if written < payload.len() {
                    if let Ok(n) = client.write(&payload[written..]) {
                        written += n;
                    }
                }
                fwd.progress();
                let mut buf = [0u8; 65536];
                if let Ok(n) = client.read(&mut buf) {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            assert_eq!(got, payload);
            drop(client);
            let until = Instant::now() + std::time::Duration::from_secs(5);
            let mut flows = Vec::new();
            while !flows.iter().any(|f: &Flow| f.to == target) && Instant::now() < until {
                fwd.progress();
                flows.extend(fwd.take_done());
            }
            let mine: Vec<&Flow> = flows.iter().filter(|f| f.to == target).collect();
            assert_eq!(mine.len(), 1, "{flows:?}");
            let f = mine[0];
            assert!(f.connected && f.error.is_none() && f.to == target, "{f:?}");
            assert_eq!((f.sent, f.received), (300_000, 300_000));

            // A destination that never reads: once the buffers and the pipe are full, the
            // forwarder sleeps until something can move, rather than spin on a readable tool
            // socket it has no room to read.
            sys::setns(ns.as_fd(), libc::CLONE_NEWNET).expect("ns");
            let mut stalled = TcpStream::connect(held_at).expect("connect");
            sys::setns(home.as_fd(), libc::CLONE_NEWNET).expect("home");
            stalled.set_nonblocking(true).expect("nonblocking");
            let chunk = vec![7u8; 1 << 20];
            let until = Instant::now() + std::time::Duration::from_millis(500);
            while Instant::now() < until {
                let _ = stalled.write(&chunk);
                fwd.progress();
            }
            let mut wakeups = 0;
            let until = Instant::now() + std::time::Duration::from_millis(500);
            while Instant::now() < until {
                let mut fds = fwd.pollfds();
                if sys::poll(&mut fds, 100).expect("poll") > 0 {
                    wakeups += 1;
                }
                fwd.progress();
            }
            assert!(wakeups < 20, "the forwarder woke {wakeups} times in 500 ms with nothing to move");
            drop(stalled);

            // A tool that opens connection after connection gets MAX_CONNECTIONS of them; the
            // rest are closed at once and counted in one record.
            let mut held = Vec::new();
            for _ in 0..MAX_CONNECTIONS + 40 {
                sys::setns(ns.as_fd(), libc::CLONE_NEWNET).expect("ns");
                let c = TcpStream::connect(held_at).expect("connect");
                sys::setns(home.as_fd(), libc::CLONE_NEWNET).expect("home");
                fwd.progress();
                held.push(c);
            }
            let flows = fwd.close();
            let refused: Vec<&Flow> = flows
                .iter()
                .filter(|f| f.error.as_deref().is_some_and(|e| e.contains("connections refused")))
                .collect();
            assert_eq!(refused.len(), 1, "{refused:?}");
            // 40 past the limit, and as many more as the connections above that are still
            // open take: two to the unreachable addresses, still trying, and the stalled one,
            // whose bytes the holder never reads.
            let n: u64 = refused[0].error.as_deref().and_then(|e| e.split(' ').next()?.parse().ok()).unwrap_or(0);
            assert!((40..=43).contains(&n), "{refused:?}");
            drop(held);
        })
        .join()
        .expect("the namespace thread");
        echo.join().expect("echo");
    }
}
