//! Fresh network namespaces prepared ahead of calls.
//!
//! Creating a network namespace is the most expensive part of starting a call (about 0.7 ms
//! of the clone on the build host). A supervisor that runs many calls keeps one prepared:
//! created with `unshare(CLONE_NEWNET)` by agentd itself, loopback brought up, and agentd
//! back in its own namespace. The next isolated call is born into it and it is never reused:
//! each call still gets a namespace of its own, with only loopback. Because agentd (host
//! root) created it, the call holds no capability over it at all, so it cannot even
//! reconfigure its loopback.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::sys;

/// At most one prepared namespace, and the supervisor's own to return to.
#[derive(Debug)]
pub struct NetnsPool {
    home: OwnedFd,
    ready: Option<OwnedFd>,
}

impl NetnsPool {
    /// A pool with nothing prepared yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self { home: sys::open_ns(c"/proc/thread-self/ns/net")?, ready: None })
    }

    /// Prepares a namespace if none is waiting. Call when nothing else is pressing (after a
    /// call has been reaped).
    pub fn prepare(&mut self) -> io::Result<()> {
        if self.ready.is_some() {
            return Ok(());
        }
        sys::unshare(libc::CLONE_NEWNET)?;
        let made = sys::open_ns(c"/proc/thread-self/ns/net")
            .and_then(|fd| sys::loopback_up().map(|()| fd).map_err(io::Error::from_raw_os_error));
        // Whatever happened, agentd goes home.
        self.go_home();
        self.ready = Some(made?);
        Ok(())
    }

    /// Runs `f` inside the prepared namespace (preparing one first if none is waiting), and
    /// comes back: for what agentd sets up there before a call is born into it.
    pub fn in_prepared<T>(&mut self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        self.prepare()?;
        let ns = self.ready.as_ref().ok_or_else(|| io::Error::other("no prepared network namespace"))?;
        self.enter(ns.as_fd())?;
        let r = f();
        self.go_home();
        r
    }

    /// Takes the prepared namespace, if any.
    pub fn take(&mut self) -> Option<OwnedFd> {
        self.ready.take()
    }

    /// Puts agentd inside `ns` for the clone of a call; [`NetnsPool::go_home`] right after.
    pub fn enter(&self, ns: BorrowedFd<'_>) -> io::Result<()> {
        sys::setns(ns, libc::CLONE_NEWNET)
    }

    /// Returns agentd to its own network namespace. If even that fails, agentd cannot know
    /// where its next connection would go, so it stops rather than run on.
    pub fn go_home(&self) {
        if let Err(e) = sys::setns(self.home.as_fd(), libc::CLONE_NEWNET) {
            eprintln!("agentd: fatal: cannot return to its own network namespace: {e}");
            std::process::abort();
        }
    }
}
