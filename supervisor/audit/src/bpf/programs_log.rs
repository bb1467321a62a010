//! The programs' own diagnostic log (aya-log): a call armed, a file no walk could name. Off
//! by default; `AGENTD_BPF_LOG=debug` (or `agentd audit bpf-log`) streams it through
//! `tracing`, so that a hook problem on a user's kernel can be seen. Audit records never go
//! this way: they have their ring buffers.
//!
//! aya-log's reader needs a tokio runtime, and a supervisor that spawns sandboxes must stay
//! single-threaded, so the log is read by a process of its own (`agentd audit bpf-log`).

use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use super::{pins_dir, setup, BpfError};
use crate::sys;

/// The level `AGENTD_BPF_LOG` asks for: `None` when unset, empty or `off`.
pub fn level_from_env() -> Result<Option<tracing::Level>, String> {
    match std::env::var("AGENTD_BPF_LOG").unwrap_or_default().trim().to_ascii_lowercase().as_str() {
        "" | "off" | "none" | "0" => Ok(None),
        other => other
            .parse::<tracing::Level>()
            .map(Some)
            .map_err(|_| format!("AGENTD_BPF_LOG={other}: use one of error, warn, info, debug, trace or off")),
    }
}

/// Forwards aya-log's records to `tracing`, from `level` up.
struct Forward {
    level: tracing::Level,
}

fn to_tracing(level: log::Level) -> tracing::Level {
    match level {
        log::Level::Error => tracing::Level::ERROR,
        log::Level::Warn => tracing::Level::WARN,
        log::Level::Info => tracing::Level::INFO,
        log::Level::Debug => tracing::Level::DEBUG,
        log::Level::Trace => tracing::Level::TRACE,
    }
}

impl log::Log for Forward {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        to_tracing(metadata.level()) <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let (at, text) = (record.module_path().unwrap_or("?"), record.args().to_string());
        match to_tracing(record.level()) {
            tracing::Level::ERROR => tracing::error!(target: "agentd::bpf", program = at, "{text}"),
            tracing::Level::WARN => tracing::warn!(target: "agentd::bpf", program = at, "{text}"),
            tracing::Level::INFO => tracing::info!(target: "agentd::bpf", program = at, "{text}"),
            tracing::Level::DEBUG => tracing::debug!(target: "agentd::bpf", program = at, "{text}"),
            tracing::Level::TRACE => tracing::trace!(target: "agentd::bpf", program = at, "{text}"),
        }
    }

    fn flush(&self) {}
}

/// The ids of this build's pinned programs. Those that log share one log map; the others
/// do not refer to it.
fn pinned_program_ids() -> Result<Vec<u32>, BpfError> {
    let progs = pins_dir().join("progs");
    let entries = std::fs::read_dir(&progs)
        .map_err(setup(format!("reading {} (run a call first, to load the programs)", progs.display())))?;
    let mut ids = Vec::new();
    for entry in entries.flatten() {
        let pin = std::ffi::CString::new(entry.path().as_os_str().as_bytes()).unwrap_or_default();
        let fd = sys::bpf_obj_get(&pin).map_err(setup(format!("opening {}", entry.path().display())))?;
        ids.push(sys::bpf_obj_id(fd.as_fd()).map_err(setup("reading a program's id"))?);
    }
    Ok(ids)
}

/// Starts streaming the programs' log lines from `level` up; the caller keeps the tokio
/// runtime (current-thread is enough) running for as long as it wants them.
pub fn stream(level: tracing::Level) -> Result<(), BpfError> {
    let mut last = None;
    for id in pinned_program_ids()? {
        match aya_log::EbpfLogger::init_from_id_with_logger(id, Forward { level }) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => setup("reading the programs' log (AYA_LOGS)")(e),
        None => BpfError::Setup {
            what: "no pinned program to read the log of".into(),
            source: "run a call first, to load the programs".into(),
        },
    })
}
