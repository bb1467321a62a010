//! Diagnostics on stderr, each line prefixed `agentd:` so they cannot be mistaken for the
//! tool's own output. `AGENTD_LOG` (an `EnvFilter` directive, default `warn`) sets the level.
//! Targets are the crates' module paths: `agentd` (this binary), `agentd_sandbox`,
//! `agentd_audit`, `agentd_model`, `agentd_memory` and `agentd_policy`, so
//! `AGENTD_LOG=agentd_sandbox::runner=debug` follows calls and `AGENTD_LOG=debug` everything.
//! The BPF programs' own lines (target `agentd::bpf`) are asked for with `AGENTD_BPF_LOG`.

use std::fmt;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

struct Prefixed;

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        write!(w, "agentd: {}: ", event.metadata().level().as_str().to_lowercase())?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Installs the subscriber. Call once, first thing in `main`.
pub fn init() {
    // By default the MCP SDK's own warnings (a client's bad request, answered with an error)
    // stay out of agentd's stderr, and so does aya's warning that the ring buffers' map of
    // maps is a kind it does not handle: agentd loads it with `allow_unsupported_maps` and
    // creates it itself.
    let filter = EnvFilter::try_from_env("AGENTD_LOG").unwrap_or_else(|_| EnvFilter::new("warn,rmcp=error,aya=error"));
    // The BPF programs' own lines, which `agentd audit bpf-log` filters by its own level.
    let filter = match "agentd::bpf=trace".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Prefixed)
        .init();
}
