//! Standard output of the command line, where a reader that went away is a normal end.
//!
//! Rust ignores SIGPIPE, so `println!` panics with "failed printing to stdout: Broken pipe"
//! when the reader closes early (`agentd audit show LOG | head`). Every line the CLI prints
//! goes through [`outln!`] and [`out!`] instead (clippy's `print_stdout` lint keeps it so):
//! - a command that only reports ends quietly with status 0 at a closed pipe;
//! - a command whose work must finish (`agentd exec`, `agentd run`: the call's records, the
//!   task's outputs) calls [`keep_going`] first, and then drops what it would have printed
//!   and goes on.
//!
//! Standard error is written the same way ([`eprintln!`] is shadowed in this crate): a closed
//! stderr (`agentd exec ... 2>&1 | head`) drops the line instead of panicking, so the command
//! ends with its own status and records.
//!
//! SIGPIPE is not set back to its default: the daemon and the clients write to sockets, where
//! a peer that hangs up must be an error to handle, never the end of the process.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether stdout was found closed.
static CLOSED: AtomicBool = AtomicBool::new(false);
/// Whether a closed stdout lets the command go on (see [`keep_going`]).
static GO_ON: AtomicBool = AtomicBool::new(false);

/// Makes a closed stdout drop what is printed instead of ending the process.
pub(crate) fn keep_going() {
    GO_ON.store(true, Ordering::Relaxed);
}

/// Writes to stdout; see the module docs for what a closed pipe does.
pub(crate) fn write(args: std::fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let written = std::io::stdout().lock().write_fmt(args);
    if let Err(e) = written {
        failed(&e);
    }
}

/// Flushes stdout (after a partial line), with the same rules as [`write`].
pub(crate) fn flush() {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    if let Err(e) = std::io::stdout().flush() {
        failed(&e);
    }
}

/// What a failed write to stdout does: a closed pipe is a normal end (status 0); another
/// error (a full disk behind a redirect) is said once (status 1). Either way nothing more is
/// printed, and a command that must finish (see [`keep_going`]) goes on.
fn failed(e: &std::io::Error) {
    CLOSED.store(true, Ordering::Relaxed);
    let broken = e.kind() == std::io::ErrorKind::BrokenPipe;
    if !broken {
        write_err(format_args!("agentd: cannot write to standard output: {e}\n"));
    }
    if !GO_ON.load(Ordering::Relaxed) {
        std::process::exit(if broken { 0 } else { 1 });
    }
}

/// Writes to stderr; a failure (a closed pipe) drops the line.
pub(crate) fn write_err(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `eprintln!` for this crate: a closed stderr drops the line instead of panicking (see
/// [`crate::out`]).
macro_rules! eprintln {
    () => {
        $crate::out::write_err(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `println!` for the CLI: a closed stdout is a normal end (see [`crate::out`]).
macro_rules! outln {
    () => {
        $crate::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the CLI: a closed stdout is a normal end (see [`crate::out`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}
