//! Bounded capture of a tool's output: the first `limit` bytes are kept (and optionally
//! relayed to agentd's own stdout/stderr), the rest is read, counted and dropped, so a flood
//! can neither block the tool nor grow agentd's memory.
//!
//! Relaying never blocks the supervision loop: kept bytes wait in `pending` and are written
//! in small pieces only when the destination polls writable, so a reader that stops reading
//! cannot stall the timeout.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::RawFd;

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
    /// Destination fd of the relay, if any.
    tee: Option<RawFd>,
    /// Offset in `kept` up to which bytes have been relayed.
    relayed: usize,
}

const CHUNK: usize = 64 * 1024;

/// Relayed per writable poll: at most what a pipe guarantees to take without blocking.
const RELAY_CHUNK: usize = 512;

impl Stream {
    /// A stream keeping at most `limit` bytes.
    pub fn new(pipe: File, limit: u64, tee: Tee) -> Self {
        let tee = match tee {
            Tee::None => None,
            Tee::Stdout => Some(1),
            Tee::Stderr => Some(2),
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
        self.tee.filter(|_| self.relayed < self.kept.len())
    }

    /// Relays one piece; call when [`Stream::relay_fd`] polled writable. A closed or failing
    /// destination ends the relay (the capture goes on).
    pub fn relay_some(&mut self) {
        let Some(fd) = self.tee else { return };
        let end = self.kept.len().min(self.relayed + RELAY_CHUNK);
        match sys::write_some(fd, &self.kept[self.relayed..end]) {
            Ok(n) => self.relayed += n,
            Err(libc::EINTR | libc::EAGAIN) => {}
            Err(_) => self.tee = None,
        }
    }

    /// Stops relaying (the reader is not keeping up after the call ended).
    pub fn abandon_relay(&mut self) {
        self.tee = None;
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
