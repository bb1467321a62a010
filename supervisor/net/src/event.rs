//! What a call's network reports: each connection, question and refusal, as the audit log
//! records it.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The tool connected out (directly, or through the proxy).
    Connect,
    /// A client on the host connected to the tool through a bind grant.
    Inbound,
    /// The tool asked for a name.
    Resolve,
}

/// One connection, question or refusal, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// What it is about.
    #[serde(skip)]
    pub kind: EventKind,
    /// Whether it was let through.
    #[serde(skip)]
    pub allowed: bool,
    /// `forwarder`, `proxy`, `dns` or `exposed`.
    pub via: &'static str,
    /// The name the tool asked for, if it used one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The destination (for an inbound connection, the tool's listener).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<SocketAddr>,
    /// For an inbound connection, the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<SocketAddr>,
    /// For a name, the addresses it was let resolve to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// For a name, addresses it resolved to that were withheld, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub withheld: Vec<String>,
    /// Whether the real connection was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    /// Bytes from the tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_bytes: Option<u64>,
    /// Bytes to the tool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub received_bytes: Option<u64>,
    /// From accept to close.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why it was refused or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The same refusal happened this many more times (recorded once, at the end).
    #[serde(skip_serializing_if = "is_zero")]
    pub repeated: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Event {
    pub(crate) fn new(kind: EventKind, allowed: bool, via: &'static str) -> Self {
        Event {
            kind,
            allowed,
            via,
            name: None,
            to: None,
            from: None,
            addresses: Vec::new(),
            withheld: Vec::new(),
            connected: None,
            sent_bytes: None,
            received_bytes: None,
            duration_ms: None,
            error: None,
            repeated: 0,
        }
    }

    pub(crate) fn refused(
        kind: EventKind,
        via: &'static str,
        name: Option<String>,
        to: Option<SocketAddr>,
        why: String,
    ) -> Self {
        Event { name, to, error: Some(why), ..Event::new(kind, false, via) }
    }
}
