//! Bounded capture of a tool's output: the first `limit` bytes are kept (and optionally
//! relayed to agentd's own stdout/stderr), the rest is read, counted and dropped, so a flood
//! can neither block the tool nor grow agentd's memory.
//!
//! Relaying never blocks the supervision loop: kept bytes are written only when the
//! destination polls writable, through a non-blocking file description of their own (or
//! `MSG_DONTWAIT` for a socket), so a reader that stops reading cannot stall the timeout.
//! A regular file never stalls, and is written as it is.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::sys;

/// Where kept bytes are also written as they arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tee {
    /// Capture only.
    None,
    /// Also write to agentd's stdout.
    Stdout,
    /// Also write to agentd's stderr.
    Stderr,
}

/// One output stream of a call.
#[derive(Debug)]
pub struct Stream {
    /// Read end of the pipe; `None` once it reached end of file.
    pub pipe: Option<File>,
    kept: Vec<u8>,
    total: u64,
    limit: u64,
    /// Destination of the relay, if any.
    tee: Option<Sink>,
    /// Offset in `kept` up to which bytes have been relayed.
    relayed: usize,
}

/// Where relayed bytes go.
#[derive(Debug)]
enum Sink {
    /// A regular file (or what could not be reopened): plain writes.
    Plain(RawFd),
    /// A pipe or terminal, reopened non-blocking.
    NonBlocking(OwnedFd),
    /// A socket: sends with `MSG_DONTWAIT`.
    Socket(RawFd),
}

impl Sink {
    fn for_fd(fd: RawFd) -> Self {
        match sys::file_kind(fd) {
            Some(libc::S_IFREG) | None => Sink::Plain(fd),
            Some(libc::S_IFSOCK) => Sink::Socket(fd),
            Some(_) => sys::reopen_nonblocking(fd).map_or(Sink::Plain(fd), Sink::NonBlocking),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Sink::Plain(fd) | Sink::Socket(fd) => *fd,
            Sink::NonBlocking(fd) => fd.as_raw_fd(),
        }
    }

    fn write(&self, buf: &[u8]) -> Result<usize, sys::Errno> {
        match self {
            Sink::Socket(fd) => sys::send_some(*fd, buf),
            Sink::Plain(_) | Sink::NonBlocking(_) => sys::write_some(self.fd(), buf),
        }
    }
}

const CHUNK: usize = 64 * 1024;

/// Relayed per writable poll at most (writes are non-blocking, so partial writes are fine).
const RELAY_CHUNK: usize = 64 * 1024;

impl Stream {
    /// A stream keeping at most `limit` bytes.
    pub fn new(pipe: File, limit: u64, tee: Tee) -> Self {
        let tee = match tee {
            Tee::None => None,
            Tee::Stdout => Some(Sink::for_fd(1)),
            Tee::Stderr => Some(Sink::for_fd(2)),
        };
        Self { pipe: Some(pipe), kept: Vec::new(), total: 0, limit, tee, relayed: 0 }
    }

    /// Reads what is available (one read). Returns false at end of file.
    pub fn pump(&mut self) -> io::Result<bool> {
        let Some(pipe) = self.pipe.as_mut() else { return Ok(false) };
        let mut buf = [0u8; CHUNK];
        let n = match pipe.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        if n == 0 {
            self.pipe = None;
            return Ok(false);
        }
        self.total += n as u64;
        let room = usize::try_from(self.limit.saturating_sub(self.kept.len() as u64)).unwrap_or(usize::MAX);
        self.kept.extend_from_slice(&buf[..n.min(room)]);
        Ok(true)
    }

    /// The fd to poll for writability, if bytes are waiting to be relayed.
    pub fn relay_fd(&self) -> Option<RawFd> {
        self.tee.as_ref().filter(|_| self.relayed < self.kept.len()).map(Sink::fd)
    }

    /// Relays one piece; call when [`Stream::relay_fd`] polled writable. A closed or failing
    /// destination ends the relay (the capture goes on).
    pub fn relay_some(&mut self) {
        let Some(sink) = &self.tee else { return };
        let end = self.kept.len().min(self.relayed + RELAY_CHUNK);
        match sink.write(&self.kept[self.relayed..end]) {
            Ok(n) => self.relayed += n,
            Err(libc::EINTR | libc::EAGAIN) => {}
            Err(_) => self.tee = None,
        }
    }

    /// Stops relaying (the reader is not keeping up after the call ended); returns how many
    /// kept bytes were never relayed.
    pub fn abandon_relay(&mut self) -> usize {
        let left = if self.tee.is_some() { self.kept.len() - self.relayed } else { 0 };
        self.tee = None;
        left
    }

    /// Whether bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// Total bytes the tool wrote.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The kept bytes as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.kept).into_owned()
    }
}
