//! Bounded capture of a tool's output: the first `limit` bytes are kept (and optionally
//! streamed through), the rest is read, counted and dropped, so a flood can neither block
//! the tool nor grow agentd's memory.

use std::fs::File;
use std::io::{self, Read, Write};

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
    tee: Tee,
}

const CHUNK: usize = 64 * 1024;

impl Stream {
    /// A stream keeping at most `limit` bytes.
    pub fn new(pipe: File, limit: u64, tee: Tee) -> Self {
        Self { pipe: Some(pipe), kept: Vec::new(), total: 0, limit, tee }
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
        let keep = &buf[..n.min(room)];
        if !keep.is_empty() {
            self.kept.extend_from_slice(keep);
            // A closed terminal or pipe on our side must not stop the capture.
            let _ = match self.tee {
                Tee::None => Ok(()),
                Tee::Stdout => io::stdout().write_all(keep).and_then(|()| io::stdout().flush()),
                Tee::Stderr => io::stderr().write_all(keep),
            };
        }
        Ok(true)
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
