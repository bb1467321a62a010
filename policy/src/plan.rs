//! The execution plan: everything the sandbox will do for one call, as a plain value.
//!
//! [`compile`](crate::compile) builds it from the manifest, the call and facts about the host;
//! the supervisor consumes it. Nothing here performs a syscall.

use serde::Serialize;

use crate::access::FsRight;
use std::net::SocketAddr;

use crate::types::HostPort;

/// What one tool call will run under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecPlan {
    /// Unique id of the call, used in logs, cgroup names and audit records.
    pub call_id: String,
    /// The agent's name.
    pub agent: String,
    /// The tool's name.
    pub tool: String,
    /// The final argv.
    pub argv: Vec<String>,
    /// Exit codes that mean success (the tool's `ok_exit`).
    pub ok_exit: Vec<i32>,
    /// Grants learn mode (`agentd exec --learn`) added to the manifest's, as `read PATH` and
    /// `exec PATH`; empty for every other call. The call's start record lists them.
    pub learn: Vec<String>,
    /// Paths tried in order for `argv[0]`, as `execvp` does with the sandbox's `PATH`.
    pub program_candidates: Vec<String>,
    /// The loaders and libraries brought in for the programs the tool runs by name.
    pub loader: LoaderPlan,
    /// The complete environment of the call.
    pub env: Vec<(String, String)>,
    /// The host identity the call runs as.
    pub identity: Identity,
    /// Namespaces created for the call.
    pub namespaces: Namespaces,
    /// Network access.
    pub network: NetworkPlan,
    /// Mounts of the fresh root, in the order they are made.
    pub mounts: Vec<Mount>,
    /// Symbolic links created in the fresh root (merged-/usr links and the like).
    pub symlinks: Vec<Symlink>,
    /// The Landlock ruleset.
    pub landlock: LandlockPlan,
    /// The call's cgroup.
    pub cgroup: CgroupPlan,
    /// Whether executable memfds are forbidden in the call's pid namespace. Landlock does not
    /// see exec of a memfd, so without this a tool could run arbitrary code it wrote.
    pub memfd_noexec: bool,
    /// Resource limits set with `setrlimit`.
    pub rlimits: Vec<Rlimit>,
    /// How connects to Unix sockets by path are decided.
    pub unix_connect: UnixConnect,
    /// How memory that is writable and executable at once, or made executable after being
    /// written, is refused (memory-deny-write-execute); allowed only for `allow_jit` tools.
    pub write_execute: WriteExecute,
    /// Wall-clock limit in milliseconds.
    pub timeout_ms: u64,
    /// Bytes kept per output stream.
    pub output_bytes: u64,
    /// Each enforcement feature: whether it is required, and whether this host has it.
    pub requirements: Vec<Requirement>,
    /// What the BPF layer does for the call.
    pub bpf: BpfPlan,
}

/// The call's BPF rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BpfPlan {
    /// Deny and record, or only record.
    pub mode: crate::model::AuditMode,
    /// What to do when the call's events are lost.
    pub on_audit_loss: crate::model::LossAction,
    /// Exact address rules; empty when the call has no network grants.
    pub net_rules: Vec<NetRule>,
    /// Canonical `fs.exec` grants: exec and executable mappings are allowed at or below them.
    pub exec_paths: Vec<String>,
    /// Canonical `audit.deny_open` paths: opening at or below them is denied.
    pub deny_open: Vec<String>,
    /// Canonical `net.unix` sockets: the only host Unix sockets the call may connect to (the
    /// call's own sockets aside).
    pub unix_sockets: Vec<String>,
    /// Anonymous memory may not gain execute, nor be mapped writable and executable (no
    /// `allow_jit`): the LSM layer's `mmap_file` and `file_mprotect` deny it too.
    pub deny_write_exec: bool,
}

/// One network rule, for the BPF layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NetRule {
    /// `connect` or `bind`.
    pub op: NetOp,
    /// The exact address, or `None` for any address on the port.
    pub addr: Option<std::net::IpAddr>,
    /// The port.
    pub port: u16,
}

/// Which socket operation a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetOp {
    /// connect (and sendmsg with an address).
    Connect,
    /// bind.
    Bind,
}

/// Host uid and gid of the call. Inside its user namespace it has the same ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// Host uid (never 0).
    pub uid: u32,
    /// Host gid (never 0).
    pub gid: u32,
}

/// Which namespaces the call gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Namespaces {
    /// New user namespace.
    pub user: bool,
    /// New pid namespace; the tool is its init, so its exit ends every process in it.
    pub pid: bool,
    /// New mount namespace.
    pub mount: bool,
    /// New IPC namespace.
    pub ipc: bool,
    /// New UTS namespace.
    pub uts: bool,
    /// New cgroup namespace.
    pub cgroup: bool,
    /// New network namespace: only loopback, and agentd's listeners for the grants. Always.
    pub net: bool,
}

/// How the call reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPlan {
    /// `isolated` (own namespace, loopback only) or `forwarded` (own namespace, where agentd
    /// serves the grants).
    pub mode: NetMode,
    /// Granted destinations, as written (addresses, ranges, names, `*:PORT`).
    pub connect: Vec<HostPort>,
    /// Granted local addresses, as written: agentd listens there on the host and forwards
    /// each connection to the tool's listener in its namespace.
    pub bind: Vec<HostPort>,
    /// Ports agentd listens on in the call's namespace, on every address (all of them are
    /// routed to its loopback), checking each connection's destination against `connect`.
    pub connect_ports: Vec<u16>,
    /// TCP ports the tool may bind (Landlock's second check).
    pub bind_ports: Vec<u16>,
    /// The DNS stub's address in the namespace, named by the call's `/etc/resolv.conf`.
    pub dns: Option<SocketAddr>,
    /// The HTTP CONNECT proxy's address in the namespace, named by `HTTP_PROXY`,
    /// `HTTPS_PROXY` and `ALL_PROXY` in the call's environment.
    pub proxy: Option<SocketAddr>,
    /// Host Unix sockets the call may connect to (canonical paths).
    pub unix: Vec<String>,
}

/// Network mode of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// A fresh network namespace with only loopback.
    Isolated,
    /// A fresh network namespace where every address is routed to loopback and only agentd
    /// listens: on each granted port (forwarding what the grants allow from its own
    /// namespace), and its DNS stub and proxy. Nothing else leaves the namespace, on any
    /// kernel with network namespaces; Landlock's port rules are a second check.
    Forwarded,
}

/// One mount in the fresh root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mount {
    /// A bind mount of a host path at the same path.
    Bind {
        /// Canonical host path, also the target inside the sandbox.
        path: String,
        /// Whether the source is a directory (else a file is bound).
        dir: bool,
        /// Read-write, else read-only.
        writable: bool,
        /// Whether `noexec` is left off.
        exec: bool,
    },
    /// A size-limited private tmpfs (`/tmp`).
    Tmpfs {
        /// Mount point.
        path: String,
        /// Size limit in bytes.
        size_bytes: u64,
    },
    /// A read-only file whose contents agentd provides (the call's `/etc/resolv.conf`).
    File {
        /// Where it appears in the fresh root.
        path: String,
        /// What it says.
        contents: String,
    },
    /// The call's own `/proc`.
    Proc {
        /// Mount point.
        path: String,
        /// Only process directories (`subset=pid`): no `/proc/net`, `/proc/sys` and the like.
        pids_only: bool,
    },
    /// A minimal `/dev`: a read-only tmpfs holding the listed host device nodes.
    Dev {
        /// Mount point.
        path: String,
        /// Device node names bound in.
        nodes: Vec<String>,
    },
}

/// The loaders and shared libraries of a tool's programs, brought into its sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LoaderPlan {
    /// What was brought, read-only and executable.
    pub brought: Vec<Brought>,
    /// What a program needs and cannot have (not on the host, or where the agent writes): a
    /// call of it fails to start, and the refusal says why.
    pub missing: Vec<String>,
}

/// One file brought for a program.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Brought {
    /// The program that needs it.
    pub program: String,
    /// `loader`, or the library's name (`libc.so.6`).
    pub what: String,
    /// Where the loader opens it.
    pub path: String,
    /// Where it is.
    pub canonical: String,
}

/// A symbolic link in the fresh root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Symlink {
    /// Where the link is made.
    pub link: String,
    /// What it points to.
    pub target: String,
}

/// Where a Landlock rule's path is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleOrigin {
    /// A host path, opened by the supervisor before the call starts.
    Host,
    /// A path of the fresh root (`/tmp`, `/dev`, `/proc`), opened inside the call after mounting.
    Sandbox,
}

/// One Landlock path rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockRule {
    /// The path whose subtree the rule covers.
    pub path: String,
    /// Where the path is opened.
    pub origin: RuleOrigin,
    /// Rights granted, already reduced to those that exist at the ABI used.
    pub rights: Vec<FsRight>,
}

/// The Landlock ruleset of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LandlockPlan {
    /// Highest ABI agentd was tested against.
    pub abi_pinned: u32,
    /// ABI the running kernel offers (0 if Landlock is unavailable).
    pub abi_kernel: u32,
    /// ABI actually used: the lower of the two.
    pub abi_used: u32,
    /// `requires.landlock_abi` from the manifest.
    pub abi_required: u32,
    /// Rights handled (denied unless granted) at the ABI used.
    pub handled: Vec<FsRight>,
    /// Whether TCP bind/connect is handled (ABI 4).
    pub handles_tcp: bool,
    /// Whether signals and abstract unix sockets are scoped to the sandbox (ABI 6).
    pub scoped: bool,
    /// Whether a second ruleset handles `LANDLOCK_ACCESS_FS_RESOLVE_UNIX` (ABI 9): connects
    /// to Unix sockets by path only beneath the call's `/tmp`, at its `net.unix` sockets, or
    /// to sockets made in the call's own domain.
    pub resolve_unix: bool,
    /// Path rules.
    pub rules: Vec<LandlockRule>,
    /// What the ABI used cannot express, for the report.
    pub degraded: Vec<String>,
}

/// cgroup hierarchy flavour on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupFlavor {
    /// Pure cgroup v2 with the memory, pids and cpu controllers.
    V2,
    /// cgroup v1 memory, pids and cpu controllers, with a controller-less v2 tree beside them.
    Hybrid,
    /// Neither: limits cannot be enforced.
    Unavailable,
}

/// The call's cgroup limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CgroupPlan {
    /// Which hierarchy is used.
    pub flavor: CgroupFlavor,
    /// Memory limit in bytes; swap is limited to zero on top.
    pub memory_bytes: u64,
    /// Maximum number of tasks.
    pub pids: u64,
    /// CPU quota per period, in microseconds.
    pub cpu_quota_us: u64,
    /// CPU period, in microseconds.
    pub cpu_period_us: u64,
}

/// One `setrlimit` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    /// Which resource.
    pub resource: RlimitResource,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Resources agentd sets limits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RlimitResource {
    /// Core file size.
    Core,
    /// Open file descriptors.
    Nofile,
    /// Largest file size written.
    Fsize,
}

/// How a call's connects to Unix sockets named by path are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnixConnect {
    /// Every connect of the tool is handed to the call's init (a seccomp user notification),
    /// which connects it only to a granted socket or one on the call's own `/tmp`.
    Gate,
    /// The kernel lacks seccomp listeners or `pidfd_getfd` (before 5.6): Unix sockets other
    /// than `socketpair`s are refused.
    Refused,
}

/// How a call is kept from running code it wrote into memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteExecute {
    /// `allow_jit`: nothing is refused (JIT compilers need it).
    Allowed,
    /// The kernel's `PR_SET_MDWE` (Linux 6.3): no mapping gains execute permission once it
    /// could have been written.
    Prctl,
    /// seccomp, where the kernel has no `PR_SET_MDWE`: `mmap` with write and execute together,
    /// and `mprotect`/`pkey_mprotect` adding execute, are refused.
    Seccomp,
}

/// Whether a feature must be present for the call to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// The call is refused if the host lacks it.
    Required,
    /// Used when present; its absence is reported.
    BestEffort,
}

/// One enforcement feature of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Requirement {
    /// Short name, e.g. `landlock.net`.
    pub feature: String,
    /// Required or best effort.
    pub level: Level,
    /// Whether this host has it.
    pub available: bool,
    /// What it protects, or why it is missing.
    pub note: String,
}

impl Namespaces {
    /// The names of the namespaces created, in creation order.
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.user, "user"),
            (self.pid, "pid"),
            (self.mount, "mount"),
            (self.ipc, "ipc"),
            (self.uts, "uts"),
            (self.cgroup, "cgroup"),
            (self.net, "net"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect()
    }
}

impl ExecPlan {
    /// The first required feature this host lacks, if any: the call must then be refused.
    pub fn unmet_requirement(&self) -> Option<&Requirement> {
        self.requirements.iter().find(|r| r.level == Level::Required && !r.available)
    }
}
