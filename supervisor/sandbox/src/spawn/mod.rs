//! Spawning one tool call into a fresh, confined process: namespaces, a fresh root, Landlock,
//! seccomp, no privileges. [`spawn`] returns once the tool has been exec'd (or has failed to
//! be), with pipes for its output and a pidfd to wait on.

mod child;
mod landlock;
mod netns;
mod seccomp;
mod spec;
mod unix_gate;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use agentd_policy::ExecPlan;
use tracing::debug;

pub use self::landlock::{LandlockError, Status as LandlockStatus};
pub use self::netns::NetnsPool;
pub use self::seccomp::{SeccompError, SUMMARY as SECCOMP_SUMMARY};
use self::spec::ChildSpec;
use crate::cgroup::CallCgroup;
use crate::sys::{self, Forked};

/// Setup steps of the child, reported with an errno when one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Step {
    Sync = 1,
    MemfdNoexec,
    Hostname,
    MakePrivate,
    Capture,
    RootTmpfs,
    Build,
    RootReadOnly,
    Pivot,
    Setsid,
    Rlimit,
    Loopback,
    Identity,
    NoNewPrivs,
    Mdwe,
    DropCaps,
    Landlock,
    Seccomp,
    Stdio,
    Fork,
    Exec,
}

impl Step {
    const ALL: [Step; 21] = [
        Step::Sync,
        Step::MemfdNoexec,
        Step::Hostname,
        Step::MakePrivate,
        Step::Capture,
        Step::RootTmpfs,
        Step::Build,
        Step::RootReadOnly,
        Step::Pivot,
        Step::Setsid,
        Step::Rlimit,
        Step::Loopback,
        Step::Identity,
        Step::NoNewPrivs,
        Step::Mdwe,
        Step::DropCaps,
        Step::Landlock,
        Step::Seccomp,
        Step::Stdio,
        Step::Fork,
        Step::Exec,
    ];

    fn from_byte(b: u8) -> Option<Step> {
        Self::ALL.iter().copied().find(|s| *s as u8 == b)
    }

    fn describe(self, spec: &ChildSpec, index: u16) -> String {
        let i = usize::from(index);
        let show = |c: Option<&std::ffi::CString>| c.map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        match self {
            Step::Sync => "waiting for the supervisor".into(),
            Step::MemfdNoexec => "setting vm.memfd_noexec for the call's pid namespace".into(),
            Step::Hostname => "setting the hostname".into(),
            Step::MakePrivate => "making the mount namespace private".into(),
            Step::Capture => format!(
                "capturing {} for a bind mount (the call runs as uid {}: every directory on the way must be searchable by it)",
                show(spec.captures.get(i).map(|c| &c.source)),
                spec.uid
            ),
            Step::RootTmpfs => format!("mounting the fresh root on {}", show(Some(&spec.root))),
            Step::Build => spec.describe_op(i),
            Step::RootReadOnly => "making the fresh root read-only".into(),
            Step::Pivot => "pivoting into the fresh root".into(),
            Step::Setsid => "starting a new session".into(),
            Step::Rlimit => "setting rlimits".into(),
            Step::Loopback => "bringing up loopback".into(),
            Step::Identity => format!("switching to uid {} gid {}", spec.uid, spec.gid),
            Step::NoNewPrivs => "setting no_new_privs".into(),
            Step::Mdwe => "setting memory-deny-write-execute (PR_SET_MDWE)".into(),
            Step::DropCaps => "dropping capabilities".into(),
            Step::Landlock => "applying the Landlock ruleset".into(),
            Step::Seccomp => "installing the seccomp filter".into(),
            Step::Stdio => "setting up stdio".into(),
            Step::Fork => "starting the tool beside the namespace's init".into(),
            Step::Exec => "executing the tool".into(),
        }
    }
}

/// Why a call could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Spawning must happen from a single-threaded process (see [`spawn`]).
    #[error("agentd spawns sandboxes only from a single-threaded process ({0} threads running)")]
    MultiThreaded(usize),
    /// A string for the child held a NUL byte.
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    /// The Landlock ruleset could not be built.
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    /// The seccomp filter could not be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// A syscall in the supervisor failed.
    #[error("{call} failed")]
    Io {
        /// What was being done.
        call: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The child failed while setting itself up.
    #[error("sandbox setup failed while {step}")]
    Setup {
        /// The step, described.
        step: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The program could not be executed.
    #[error("cannot execute {program:?} (searched: {searched}; execve is allowed only under fs.exec){missing}")]
    Exec {
        /// `argv[0]`.
        program: String,
        /// The paths tried.
        searched: String,
        /// What the program needs and the sandbox could not be given (its loader or
        /// libraries), when the plan knows: `; it needs ...`.
        missing: String,
        /// ENOENT, EACCES, ...
        #[source]
        source: io::Error,
    },
    /// The call's cgroups could not be set up.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// Setup did not finish before the call's deadline.
    #[error("sandbox setup did not finish before the call's timeout")]
    SetupTimeout,
    /// The child vanished without reporting.
    #[error("the sandbox died during setup (killed from outside?)")]
    Vanished,
}

impl SpawnError {
    /// Exit code for `agentd exec`: 127 not found, 126 not executable, else 125.
    pub fn exit_code(&self) -> i32 {
        match self {
            SpawnError::Exec { source, .. } if source.raw_os_error() == Some(libc::ENOENT) => 127,
            SpawnError::Exec { .. } => 126,
            _ => 125,
        }
    }
}

fn io_err(call: &'static str) -> impl FnOnce(io::Error) -> SpawnError {
    move |source| SpawnError::Io { call, source }
}

/// A started call.
#[derive(Debug)]
pub(crate) struct Spawned {
    /// Host pid of the call's init (the tool is its child).
    pub pid: i32,
    /// pidfd of the call's init.
    pub pidfd: OwnedFd,
    /// Read end of the tool's stdout.
    pub stdout: File,
    /// Read end of the tool's stderr.
    pub stderr: File,
    /// Where the namespace's init reports how the tool ended (read after reaping init).
    pub exit_report: File,
    /// What Landlock enforces.
    pub landlock: LandlockStatus,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
}

/// Reads the child's setup report until it closes (exec or failure), or the deadline passes
/// (a capture stuck on a hung network filesystem, say).
fn read_report(mut status: File, deadline: Instant) -> Result<Vec<u8>, SpawnError> {
    let mut report = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SpawnError::SetupTimeout);
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        let mut fds = [libc::pollfd { fd: status.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        if sys::poll(&mut fds, ms).map_err(io_err("polling the setup report"))? == 0 {
            continue;
        }
        match status.read(&mut buf) {
            Ok(0) => return Ok(report),
            Ok(n) => report.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SpawnError::Io { call: "reading the sandbox's setup report", source: e }),
        }
    }
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(0)
}

/// Starts the call described by `plan` inside `cgroup`.
///
/// Must be called from a single-threaded process: the child is a `clone3` copy of this
/// process and runs Rust code (the Landlock crate) before `execve`; with one thread, no lock
/// (the allocator's included) can be held by someone who does not exist in the copy.
///
/// With a `pool` holding a prepared network namespace, an isolated call is born into it
/// instead of creating one.
///
/// Only the runner calls this: after the call's start is in its audit log, and its cgroup is
/// registered with its BPF layer, when it has them. Outside the crate, a call starts through
/// the runner or not at all.
///
/// With `stdio`, the tool's stdin and stdout are agentd's own (an MCP server speaking over
/// them); otherwise its stdin is `/dev/null` and its stdout a pipe to the runner.
pub(crate) fn spawn(
    plan: &ExecPlan,
    cgroup: &mut CallCgroup,
    deadline: Instant,
    pool: Option<&mut NetnsPool>,
    stdio: bool,
) -> Result<Spawned, SpawnError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(SpawnError::MultiThreaded(threads));
    }
    let filters = seccomp::filters(seccomp::Options {
        memfd_noexec: plan.memfd_noexec,
        deny_write_execute: plan.write_execute == agentd_policy::WriteExecute::Seccomp,
        unix_gate: plan.unix_connect == agentd_policy::UnixConnect::Gate,
    })?;
    let mut spec = ChildSpec::new(plan, filters)?;
    let ruleset = landlock::build(plan)?;
    let (sync_r, sync_w) = sys::pipe().map_err(io_err("pipe"))?;
    let (status_r, status_w) = sys::pipe().map_err(io_err("pipe"))?;
    let (out_r, out_w) = sys::pipe().map_err(io_err("pipe"))?;
    let (err_r, err_w) = sys::pipe().map_err(io_err("pipe"))?;
    let (exit_r, exit_w) = sys::pipe().map_err(io_err("pipe"))?;
    let (stdin, out_w) = if stdio {
        // The runner's stdout pipe then sees end of file at once: the output is not its.
        drop(out_w);
        let stdin = io::stdin().as_fd().try_clone_to_owned().map_err(io_err("duplicating agentd's stdin"))?;
        let stdout = io::stdout().as_fd().try_clone_to_owned().map_err(io_err("duplicating agentd's stdout"))?;
        (File::from(stdin), stdout)
    } else {
        (File::open("/dev/null").map_err(io_err("opening /dev/null"))?, out_w)
    };

    let mut flags = (libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;
    let prepared = match pool {
        Some(pool) if plan.namespaces.net => pool.take().map(|ns| (pool, ns)),
        _ => None,
    };
    if plan.namespaces.net && prepared.is_none() {
        flags |= libc::CLONE_NEWNET as u64;
    }
    // A prepared namespace already has loopback up, and the call holds no capability over it.
    spec.isolate_net = plan.namespaces.net && prepared.is_none();
    if !sys::has_close_range_cloexec() {
        spec.highest_fd = sys::highest_open_fd();
    }
    // Hybrid hosts: this thread steps into the call's v1 cgroups so that the child is born
    // there, and back out right after (see `CallCgroup::enter`). Before the namespace, so
    // that a failure here leaves this thread where it was.
    cgroup.enter().map_err(SpawnError::Cgroup)?;
    if let Some((pool, ns)) = &prepared {
        if let Err(e) = pool.enter(ns.as_fd()) {
            let _ = cgroup.leave();
            return Err(io_err("entering the prepared network namespace")(e));
        }
    }
    let forked = sys::clone3(flags, cgroup.clone_into_fd());
    let mut left = Ok(());
    if !matches!(forked, Ok(Forked::Child)) {
        if let Some((pool, _)) = &prepared {
            pool.go_home();
        }
        left = cgroup.leave();
    }
    let forked = forked.map_err(io_err("clone3"))?;
    let (pid, pidfd) = match forked {
        Forked::Child => {
            let fds = child::ChildFds {
                sync: sync_r.as_raw_fd(),
                status: status_w.as_raw_fd(),
                stdin: stdin.as_raw_fd(),
                stdout: out_w.as_raw_fd(),
                stderr: err_w.as_raw_fd(),
                exit: exit_w.as_raw_fd(),
            };
            let parent_fds =
                [sync_w.as_raw_fd(), status_r.as_raw_fd(), out_r.as_raw_fd(), err_r.as_raw_fd(), exit_r.as_raw_fd()];
            child::run(&mut spec, ruleset, fds, &parent_fds)
        }
        Forked::Parent { pid, pidfd } => (pid, pidfd),
    };
    drop((sync_r, status_w, out_w, err_w, exit_w, stdin, ruleset));
    debug!(call_id = %plan.call_id, pid, "sandbox cloned");

    let abort = |e: SpawnError| {
        let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
        let _ = sys::wait_pidfd(pidfd.as_fd());
        e
    };
    let map = |file: &str, id: u32| std::fs::write(format!("/proc/{pid}/{file}"), format!("{id} {id} 1\n"));
    // Two releases: setup may start once the maps exist; the tool only once the call's
    // cgroups have their limits (v1 ones, on hybrid hosts, are set while setup runs).
    let mut sync = File::from(sync_w);
    let release = |e| SpawnError::Io { call: "releasing the sandbox", source: e };
    let released = left
        .map_err(SpawnError::Cgroup)
        .and_then(|()| {
            map("uid_map", plan.identity.uid)
                .and_then(|()| map("gid_map", plan.identity.gid))
                .map_err(|source| SpawnError::Io { call: "writing the sandbox's uid/gid map", source })
        })
        .and_then(|()| sync.write_all(b"g").map_err(release))
        .and_then(|()| cgroup.attach(pid).map_err(SpawnError::Cgroup))
        .and_then(|()| sync.write_all(b"c").map_err(release));
    // On failure the child reads end-of-file and exits; if it failed first (which is why a
    // release failed), its own report says why, and that is the error worth showing.
    drop(sync);

    let report = match read_report(File::from(status_r), deadline) {
        Ok(r) => r,
        Err(e) => return Err(abort(released.err().unwrap_or(e))),
    };
    let mut landlock = None;
    let mut rest = report.as_slice();
    while let Some((&tag, tail)) = rest.split_first() {
        match (tag, tail) {
            (b'L', [status, nnp, tail @ ..]) => {
                landlock = Some((LandlockStatus::from_byte(*status), *nnp == 1));
                rest = tail;
            }
            (b'E', [step, i0, i1, e0, e1, e2, e3, ..]) => {
                let step = Step::from_byte(*step);
                let index = u16::from_le_bytes([*i0, *i1]);
                let source = io::Error::from_raw_os_error(i32::from_le_bytes([*e0, *e1, *e2, *e3]));
                let _ = sys::wait_pidfd(pidfd.as_fd());
                return Err(match step {
                    Some(Step::Exec) => SpawnError::Exec {
                        program: plan.argv[0].clone(),
                        searched: plan.program_candidates.join(", "),
                        missing: match plan.loader.missing.as_slice() {
                            [] => String::new(),
                            m => format!("; what it needs is missing: {}", m.join("; ")),
                        },
                        source,
                    },
                    Some(step) => SpawnError::Setup { step: step.describe(&spec, index), source },
                    None => SpawnError::Vanished,
                });
            }
            _ => break,
        }
    }
    if let Err(e) = released {
        return Err(abort(e));
    }
    let Some((landlock, no_new_privs)) = landlock else {
        return Err(abort(SpawnError::Vanished));
    };
    Ok(Spawned {
        pid,
        pidfd,
        stdout: File::from(out_r),
        stderr: File::from(err_r),
        exit_report: File::from(exit_r),
        landlock,
        no_new_privs,
    })
}
