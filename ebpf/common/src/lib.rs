//! Types shared by agentd's eBPF programs and the supervisor. Every type is `#[repr(C)]`,
//! plain old data, with explicit padding, so both sides agree on every byte.
#![no_std]

/// A call is audited: events are recorded, nothing is denied by the BPF layer.
pub const MODE_AUDIT: u32 = 0;
/// A call is enforced: what the manifest does not grant is denied, and recorded.
pub const MODE_ENFORCE: u32 = 1;

/// Number of event ring buffers; each running call uses one, chosen by its supervisor.
pub const SLOTS: u32 = 8;

/// Bytes of a path kept in an event (longer paths are cut; `PATH_TRUNCATED` says so).
pub const PATH_LEN: usize = 256;

/// `CALLS` value: a live call, keyed by the cgroup id of its v2 cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallInfo {
    /// [`MODE_AUDIT`] or [`MODE_ENFORCE`].
    pub mode: u32,
    /// Ring buffer the call's events go to, `0..SLOTS`.
    pub slot: u32,
    /// `CALL_*` flags.
    pub flags: u32,
    /// Padding, zero.
    pub _pad: u32,
}

/// The call has network grants: connects and binds are checked against `NET_ALLOW`.
pub const CALL_NET_RULES: u32 = 1;

/// Which operation a network rule or event is about.
pub const NET_CONNECT: u32 = 0;
/// Binding a local address.
pub const NET_BIND: u32 = 1;

/// `NET_ALLOW` key: one granted (address, port) for one call. An all-zero address with
/// `any_addr = 1` matches every address of the family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetKey {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// `NET_CONNECT` or `NET_BIND`.
    pub op: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Port, host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6; zero with `any_addr`.
    pub addr: [u8; 16],
    /// 1 for a `*:PORT` grant.
    pub any_addr: u32,
    /// Padding, zero.
    pub _pad: u32,
}

/// Event kinds.
pub const EV_EXEC: u32 = 1;
/// A file was opened.
pub const EV_OPEN: u32 = 2;
/// A connect (or a send with an address).
pub const EV_CONNECT: u32 = 3;
/// A bind.
pub const EV_BIND: u32 = 4;

/// The action was allowed (or only audited).
pub const VERDICT_ALLOWED: u32 = 0;
/// The action was denied.
pub const VERDICT_DENIED: u32 = 1;

/// The path was longer than [`PATH_LEN`] and was cut.
pub const PATH_TRUNCATED: u32 = 1;

/// One event, as written to a ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// `EV_*`.
    pub kind: u32,
    /// `VERDICT_*`.
    pub verdict: u32,
    /// Thread group id (pid) in the initial pid namespace.
    pub pid: u32,
    /// Open flags, or `NET_*` for network events.
    pub flags: u32,
    /// Address family (network events).
    pub family: u16,
    /// Port, host byte order (network events).
    pub port: u16,
    /// `PATH_TRUNCATED` and the like.
    pub info: u32,
    /// Address (network events).
    pub addr: [u8; 16],
    /// NUL-terminated path (exec and open events).
    pub path: [u8; PATH_LEN],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)] plain old data with explicit padding fields, valid for
    // any bit pattern.
    unsafe impl aya::Pod for super::CallInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetKey {}
}
