//! The result of one call: what `agentd exec --json` prints, field names being a contract.

use agentd_policy::{ExecPlan, Level, NetMode};
use serde::Serialize;

use crate::cgroup::Applied;
use crate::spawn::{LandlockStatus, SECCOMP_SUMMARY};

/// One finished (or refused) call.
#[derive(Debug, Clone, Serialize)]
pub struct CallResult {
    /// Unique id of the call.
    pub call_id: String,
    /// Agent name from the manifest.
    pub agent: String,
    /// Tool name.
    pub tool: String,
    /// The argv that ran.
    pub argv: Vec<String>,
    /// Exit status as `agentd exec` exits: the tool's, 128+N for signal N, 124 on timeout,
    /// 125 if agentd refused or failed, 126/127 if the program could not be executed/found.
    pub exit_code: i32,
    /// Whether the call succeeded: it ran, was not killed (timeout, OOM, signal) and exited
    /// with a code of the tool's `ok_exit` (0 unless the manifest says more).
    pub ok: bool,
    /// The signal that ended the tool, if any.
    pub signal: Option<i32>,
    /// Whether the timeout fired (the whole process tree was killed).
    pub timed_out: bool,
    /// Whether the kernel OOM-killed a process of the call.
    pub oom_killed: bool,
    /// Wall time from spawn to reaped exit, milliseconds.
    pub duration_ms: u64,
    /// The most memory the call's cgroup held, in bytes, where the kernel says.
    pub memory_peak_bytes: Option<u64>,
    /// The most tasks the call's cgroup held at once (agentd's init among them), where the
    /// kernel says.
    pub pids_peak: Option<u64>,
    /// Captured stdout (lossy UTF-8), at most `output_bytes`.
    pub stdout: String,
    /// Captured stderr (lossy UTF-8), at most `output_bytes`.
    pub stderr: String,
    /// Whether stdout was cut at `output_bytes`.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at `output_bytes`.
    pub stderr_truncated: bool,
    /// Bytes the tool wrote to stdout in all.
    pub stdout_bytes: u64,
    /// Bytes the tool wrote to stderr in all.
    pub stderr_bytes: u64,
    /// Why agentd refused or failed, when it did.
    pub error: Option<String>,
    /// What was actually enforced.
    pub enforcement: Enforcement,
    /// Events the BPF layer recorded for the call (all in the audit log).
    pub events: EventCounts,
    /// Where the time went (for benchmarks; not part of the JSON contract).
    #[serde(skip)]
    pub timing: Timing,
}

/// Event counts of one call.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EventCounts {
    /// Events recorded.
    pub total: u64,
    /// Of which denied.
    pub denied: u64,
    /// Events lost (ring buffer full), never recorded.
    pub lost: u64,
    /// Records read from the ring buffers, syscall results included (for `bench audit`).
    #[serde(skip)]
    pub ring: u64,
}

/// The BPF layer as applied to a call.
#[derive(Debug, Clone, Serialize)]
pub struct BpfReport {
    /// `lsm`, `fallback` or `none`.
    pub layer: &'static str,
    /// Programs acting on the call.
    pub active: Vec<String>,
    /// `enforce` or `audit` (per the manifest), when a layer is active.
    pub mode: Option<agentd_policy::AuditMode>,
    /// Why there is no layer, when there is none.
    pub note: Option<String>,
}

impl BpfReport {
    /// No BPF layer.
    pub fn none(note: impl Into<String>) -> Self {
        Self { layer: "none", active: Vec::new(), mode: None, note: Some(note.into()) }
    }
}

/// Phases of one call, for `agentd bench`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Creating the call's cgroups.
    pub cgroup_setup: std::time::Duration,
    /// From starting the sandbox to reaping it.
    pub spawn_to_reaped: std::time::Duration,
}

/// What was applied to the call.
#[derive(Debug, Clone, Serialize)]
pub struct Enforcement {
    /// Landlock.
    pub landlock: LandlockReport,
    /// Namespaces created.
    pub namespaces: Vec<&'static str>,
    /// `isolated` or `forwarded`.
    pub network: Option<NetMode>,
    /// In `forwarded` mode, what agentd serves in the call's namespace: each grant
    /// (`connect ...`, `bind ...`), the DNS stub (`dns ...`) and the proxy (`proxy ...`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forwarded: Vec<String>,
    /// cgroup version and limits applied.
    pub cgroup: Option<Applied>,
    /// seccomp.
    pub seccomp: SeccompReport,
    /// The BPF layer.
    pub bpf: BpfReport,
    /// Host uid/gid the call ran as.
    pub identity: Option<Identity>,
    /// Whether every capability was dropped.
    pub capabilities_dropped: bool,
    /// Whether executable memfds are forbidden in the call (`vm.memfd_noexec = 2`).
    pub memfd_noexec: bool,
    /// How writable+executable memory was refused (`prctl`, `seccomp`), or `allowed`
    /// (`allow_jit`); absent when the call did not run.
    pub write_execute: Option<agentd_policy::WriteExecute>,
    /// Best-effort features this host lacks.
    pub missing_best_effort: Vec<String>,
}

/// Host identity.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Identity {
    /// Host uid.
    pub uid: u32,
    /// Host gid.
    pub gid: u32,
}

/// Landlock as applied.
#[derive(Debug, Clone, Serialize)]
pub struct LandlockReport {
    /// `full`, `partial` or `none`.
    pub status: LandlockStatus,
    /// ABI of the kernel.
    pub abi_kernel: u32,
    /// ABI used.
    pub abi_used: u32,
    /// ABI the manifest requires.
    pub abi_required: u32,
    /// Whether `no_new_privs` was set.
    pub no_new_privs: bool,
    /// What the ABI used cannot restrict.
    pub degraded: Vec<String>,
    /// Whether Landlock's Unix-socket right (ABI 9) restricts connects by path too.
    pub resolve_unix: bool,
}

/// seccomp as applied.
#[derive(Debug, Clone, Serialize)]
pub struct SeccompReport {
    /// Whether the filters were installed.
    pub enabled: bool,
    /// What they refuse.
    pub refuses: Vec<&'static str>,
}

impl Enforcement {
    /// The report for a call that never started: nothing was applied.
    pub fn none(plan: Option<&ExecPlan>) -> Self {
        Self {
            landlock: LandlockReport {
                status: LandlockStatus::None,
                abi_kernel: plan.map_or(0, |p| p.landlock.abi_kernel),
                abi_used: 0,
                abi_required: plan.map_or(0, |p| p.landlock.abi_required),
                no_new_privs: false,
                degraded: plan.map(|p| p.landlock.degraded.clone()).unwrap_or_default(),
                resolve_unix: false,
            },
            namespaces: Vec::new(),
            network: None,
            forwarded: Vec::new(),
            cgroup: None,
            seccomp: SeccompReport { enabled: false, refuses: Vec::new() },
            bpf: BpfReport::none("the call did not run"),
            identity: None,
            capabilities_dropped: false,
            memfd_noexec: false,
            write_execute: None,
            missing_best_effort: plan.map(missing_best_effort).unwrap_or_default(),
        }
    }

    /// The report for a call that ran under `plan`.
    pub fn applied(
        plan: &ExecPlan,
        landlock: LandlockStatus,
        no_new_privs: bool,
        cgroup: Applied,
        bpf: BpfReport,
    ) -> Self {
        Self {
            landlock: LandlockReport {
                status: landlock,
                abi_kernel: plan.landlock.abi_kernel,
                abi_used: if landlock == LandlockStatus::None { 0 } else { plan.landlock.abi_used },
                abi_required: plan.landlock.abi_required,
                no_new_privs,
                degraded: plan.landlock.degraded.clone(),
                resolve_unix: plan.landlock.resolve_unix && landlock != LandlockStatus::None,
            },
            namespaces: plan.namespaces.names(),
            network: Some(plan.network.mode),
            forwarded: forwarded(&plan.network),
            cgroup: Some(cgroup),
            seccomp: SeccompReport { enabled: true, refuses: SECCOMP_SUMMARY.to_vec() },
            bpf,
            identity: Some(Identity { uid: plan.identity.uid, gid: plan.identity.gid }),
            capabilities_dropped: true,
            memfd_noexec: plan.memfd_noexec,
            write_execute: Some(plan.write_execute),
            missing_best_effort: missing_best_effort(plan),
        }
    }
}

fn missing_best_effort(plan: &ExecPlan) -> Vec<String> {
    plan.requirements
        .iter()
        .filter(|r| r.level == Level::BestEffort && !r.available)
        .map(|r| format!("{}: {}", r.feature, r.note))
        .collect()
}

/// What agentd serves in a forwarded call's namespace, one line each.
fn forwarded(n: &agentd_policy::NetworkPlan) -> Vec<String> {
    let grants = n.connect.iter().map(|g| format!("connect {g}")).chain(n.bind.iter().map(|g| format!("bind {g}")));
    let served = n.dns.map(|d| format!("dns {d}")).into_iter().chain(n.proxy.map(|p| format!("proxy {p}")));
    grants.chain(served).collect()
}
