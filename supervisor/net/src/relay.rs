//! Moving a connection's bytes both ways with `splice` (kernel to kernel, through a pipe),
//! never blocking, driven from the supervisor's poll loop.

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use crate::sys;

/// Bytes one splice moves at most. Each pipe keeps the kernel's default size (64 KiB): a
/// larger one barely helped throughput here (45-48% of direct against 44%, `agentd bench
/// net`) and would let a tool that stalls its destinations make agentd hold more kernel
/// memory (two pipes per connection, 256 connections per call).
const CHUNK: usize = 256 * 1024;

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

/// Two connected sockets and the bytes between them: `near` is the tool's side, `far` the
/// destination's.
#[derive(Debug)]
pub struct Relay {
    near: TcpStream,
    far: TcpStream,
    up: Half,
    down: Half,
}

impl Relay {
    /// Relays between two non-blocking sockets.
    pub fn new(near: TcpStream, far: TcpStream) -> std::io::Result<Self> {
        Ok(Relay { near, far, up: Half::new()?, down: Half::new()? })
    }

    /// Moves what can move; true once both directions are over.
    pub fn step(&mut self) -> std::io::Result<bool> {
        self.up.pump(&self.near, &self.far)?;
        self.down.pump(&self.far, &self.near)?;
        Ok(self.up.shut && self.down.shut)
    }

    /// Bytes moved (tool to destination, destination to tool).
    pub fn moved(&self) -> (u64, u64) {
        (self.up.moved, self.down.moved)
    }

    /// What to poll for.
    pub fn pollfds(&self, out: &mut Vec<libc::pollfd>) {
        let (up_in, up_out) = self.up.wants();
        let (down_in, down_out) = self.down.wants();
        out.push(pollfd(self.near.as_raw_fd(), up_in, down_out));
        out.push(pollfd(self.far.as_raw_fd(), down_in, up_out));
    }
}

/// A poll entry for reading and/or writing `fd`. With neither, the entry is left out (a
/// negative fd): the kernel reports hang-ups and errors whatever was asked, and a socket that
/// is not waited on must not wake the loop again and again (its error is seen when its
/// direction can move again, or when the call ends).
pub fn pollfd(fd: i32, read: bool, write: bool) -> libc::pollfd {
    let events = (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 });
    libc::pollfd { fd: if events == 0 { -1 } else { fd }, events, revents: 0 }
}
