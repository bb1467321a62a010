//! `ChildSpec`: the plan turned into the C strings and flags the child needs, built before
//! `clone3` so that the child does no string handling of its own.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;

use agentd_policy::{ExecPlan, Mount, NetMode, RlimitResource, RuleOrigin};
use landlock::{AccessFs, BitFlags};

use super::landlock::access;
use super::seccomp::Filters;
use super::SpawnError;
use crate::sys::{MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY};

/// A host path captured with `open_tree` before the fresh root exists.
#[derive(Debug)]
pub(crate) struct Capture {
    pub source: CString,
    pub attrs: u64,
}

/// One step of building the fresh root, done in order after every capture is taken.
#[derive(Debug)]
pub(crate) enum Op {
    /// `mkdir` (an existing directory is fine).
    Mkdir(CString),
    /// Create an empty file to bind a file onto.
    Touch(CString),
    /// Attach capture number `.0` at `.1`.
    Attach(usize, CString),
    /// Mount a tmpfs with these flags and options.
    Tmpfs(CString, libc::c_ulong, CString),
    /// Mount the call's own proc, with these options.
    Proc(CString, Option<CString>),
    /// Make a symlink: (target, link).
    Symlink(CString, CString),
    /// Remount read-only (bind remount, keeping nosuid and noexec).
    ReadOnly(CString),
}

/// Everything the child does, in plain data.
#[derive(Debug)]
pub(crate) struct ChildSpec {
    pub hostname: CString,
    /// Host directory the fresh root's tmpfs is mounted on (private to the call's mount ns).
    pub root: CString,
    pub root_opts: CString,
    pub captures: Vec<Capture>,
    /// Scratch space: the detached mount fd of each capture, filled in by the child.
    pub capture_fds: Vec<RawFd>,
    pub ops: Vec<Op>,
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
    pub isolate_net: bool,
    /// Set `vm.memfd_noexec = 2` for the call's pid namespace.
    pub memfd_noexec: bool,
    /// Set `PR_SET_MDWE` before exec.
    pub mdwe: bool,
    pub uid: u32,
    pub gid: u32,
    pub last_cap: u32,
    /// Landlock rules on paths of the fresh root, added by the child after `pivot_root`.
    pub sandbox_rules: Vec<(CString, BitFlags<AccessFs>)>,
    pub seccomp: Filters,
    /// Owns the strings `argv_ptrs` points into.
    pub _argv: Vec<CString>,
    /// Owns the strings `envp_ptrs` points into.
    pub _envp: Vec<CString>,
    /// NULL-terminated pointer arrays into `argv` and `envp` (whose heap buffers never move).
    pub argv_ptrs: Vec<*const libc::c_char>,
    pub envp_ptrs: Vec<*const libc::c_char>,
    pub candidates: Vec<CString>,
    /// Stack for the vfork-style start of the tool (it only calls execve, or reports and exits).
    pub tool_stack: Vec<u8>,
    /// The Unix-socket gate: the tool's extra filter, and what init lets through.
    pub unix_gate: Option<GateSpec>,
    /// The highest fd open when the child was cloned, where the kernel cannot mark every fd
    /// close-on-exec at once (before 5.11).
    pub highest_fd: RawFd,
}

/// What the child needs for the Unix-socket gate (`unix_gate`).
#[derive(Debug)]
pub(crate) struct GateSpec {
    /// The filter the tool installs before exec.
    pub program: Vec<crate::sys::notify::Insn>,
    /// Granted sockets, by path in the fresh root.
    pub granted: Vec<CString>,
    /// Whether the call has its own `/tmp`.
    pub tmp: bool,
    /// Whether to add the Landlock ruleset for `LANDLOCK_ACCESS_FS_RESOLVE_UNIX` (ABI 9).
    pub landlock: bool,
}

fn cstr(s: &str) -> Result<CString, SpawnError> {
    CString::new(s).map_err(|_| SpawnError::Nul(s.to_string()))
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

/// Where the fresh root's tmpfs is mounted: a directory every host has. Its host content is
/// hidden only inside the call's private mount namespace, and bind sources are captured
/// before it is mounted, so granting paths under it is fine.
const ROOT_MOUNTPOINT: &str = "/tmp";

/// Where agentd keeps the files it binds into calls (root's, like the rest of `/run`).
const PROVIDED: &str = "/run/agentd/provided";

/// The host path of a file holding `contents`, written once (named by a hash of its
/// contents, replaced atomically, readable by all).
fn provided_file(contents: &str) -> std::io::Result<String> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    // FNV-1a: stable across builds and runs, unlike std's default hasher.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    contents.hash(&mut h);
    let path = format!("{PROVIDED}/{:016x}", h.finish());
    if std::fs::read_to_string(&path).is_ok_and(|c| c == contents) {
        return Ok(path);
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o755).create(PROVIDED)?;
    let tmp = format!("{path}.{}", std::process::id());
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
    std::io::Write::write_all(&mut f, contents.as_bytes())?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Highest capability number the kernel knows (fixed while it runs: read once).
fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(63)
    })
}

/// Builds the op list: for each mount, its mount point (parents first), then the mount.
struct Builder {
    root: &'static str,
    ops: Vec<Op>,
    captures: Vec<Capture>,
    made: Vec<String>,
    /// Binds made so far: paths below them already exist.
    binds: Vec<String>,
}

impl Builder {
    fn at(&self, p: &str) -> Result<CString, SpawnError> {
        cstr(&format!("{}{p}", self.root))
    }

    /// Creates the missing directories leading to `path` (and `path` itself if `dir`).
    fn mount_point(&mut self, path: &str, dir: bool) -> Result<(), SpawnError> {
        if self.binds.iter().any(|b| Path::new(path).starts_with(b)) {
            return Ok(());
        }
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let mut cur = String::new();
        for (i, part) in parts.iter().enumerate() {
            cur = format!("{cur}/{part}");
            let last = i + 1 == parts.len();
            if self.made.contains(&cur) {
                continue;
            }
            if last && !dir {
                self.ops.push(Op::Touch(self.at(&cur)?));
            } else {
                self.ops.push(Op::Mkdir(self.at(&cur)?));
            }
            self.made.push(cur.clone());
        }
        Ok(())
    }

    fn bind(&mut self, source: &str, target: &str, dir: bool, attrs: u64) -> Result<(), SpawnError> {
        self.mount_point(target, dir)?;
        self.captures.push(Capture { source: cstr(source)?, attrs });
        self.ops.push(Op::Attach(self.captures.len() - 1, self.at(target)?));
        self.binds.push(target.to_string());
        Ok(())
    }
}

impl ChildSpec {
    pub(crate) fn new(plan: &ExecPlan, seccomp: Filters) -> Result<Self, SpawnError> {
        let mut b = Builder {
            root: ROOT_MOUNTPOINT,
            ops: Vec::new(),
            captures: Vec::new(),
            made: Vec::new(),
            binds: Vec::new(),
        };
        let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
        for m in &plan.mounts {
            match m {
                Mount::Bind { path, dir, writable, exec } => {
                    let mut attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
                    if !writable {
                        attrs |= MOUNT_ATTR_RDONLY;
                    }
                    if !exec {
                        attrs |= MOUNT_ATTR_NOEXEC;
                    }
                    b.bind(path, path, *dir, attrs)?;
                }
                Mount::File { path, contents } => {
                    let source = provided_file(contents)
                        .map_err(|source| SpawnError::Io { call: "writing a file agentd provides to calls", source })?;
                    let attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC | MOUNT_ATTR_RDONLY;
                    b.bind(&source, path, false, attrs)?;
                }
                Mount::Proc { path, pids_only } => {
                    b.mount_point(path, true)?;
                    let data = if *pids_only { Some(cstr("subset=pid")?) } else { None };
                    b.ops.push(Op::Proc(b.at(path)?, data));
                }
                Mount::Dev { path, nodes } => {
                    b.mount_point(path, true)?;
                    let opts = cstr("mode=0755,size=64k")?;
                    b.ops.push(Op::Tmpfs(b.at(path)?, libc::MS_NOSUID | libc::MS_NOEXEC, opts));
                    b.made.retain(|m| !Path::new(m).starts_with(path));
                    for node in nodes {
                        let node = format!("{path}/{node}");
                        // Device nodes keep device access: that is their point.
                        b.bind(&node, &node, false, MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC)?;
                    }
                    for (target, link) in [
                        ("/proc/self/fd", "fd"),
                        ("/proc/self/fd/0", "stdin"),
                        ("/proc/self/fd/1", "stdout"),
                        ("/proc/self/fd/2", "stderr"),
                    ] {
                        b.ops.push(Op::Symlink(cstr(target)?, b.at(&format!("{path}/{link}"))?));
                    }
                    b.ops.push(Op::ReadOnly(b.at(path)?));
                }
                Mount::Tmpfs { path, size_bytes } => {
                    b.mount_point(path, true)?;
                    let opts = cstr(&format!("mode=1777,size={size_bytes}"))?;
                    b.ops.push(Op::Tmpfs(b.at(path)?, nosuid_nodev | libc::MS_NOEXEC, opts));
                    b.made.retain(|m| !Path::new(m).starts_with(path));
                }
            }
        }
        for s in &plan.symlinks {
            if let Some(parent) = Path::new(&s.link).parent().and_then(Path::to_str) {
                b.mount_point(parent, true)?;
            }
            b.ops.push(Op::Symlink(cstr(&s.target)?, b.at(&s.link)?));
        }
        let rlimits = plan
            .rlimits
            .iter()
            .map(|r| {
                let res = match r.resource {
                    RlimitResource::Core => libc::RLIMIT_CORE,
                    RlimitResource::Nofile => libc::RLIMIT_NOFILE,
                    RlimitResource::Fsize => libc::RLIMIT_FSIZE,
                };
                (res, r.soft, r.hard)
            })
            .collect();
        let sandbox_rules = plan
            .landlock
            .rules
            .iter()
            .filter(|r| r.origin == RuleOrigin::Sandbox)
            .map(|r| Ok((cstr(&r.path)?, access(&r.rights))))
            .collect::<Result<_, SpawnError>>()?;
        let argv: Vec<CString> = plan.argv.iter().map(|a| cstr(a)).collect::<Result<_, _>>()?;
        let envp: Vec<CString> = plan.env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect::<Result<_, _>>()?;
        Ok(Self {
            hostname: cstr("agentd")?,
            root: cstr(ROOT_MOUNTPOINT)?,
            root_opts: cstr("mode=0755,size=1m,nr_inodes=4096")?,
            capture_fds: vec![-1; b.captures.len()],
            captures: b.captures,
            ops: b.ops,
            rlimits,
            isolate_net: plan.network.mode == NetMode::Isolated,
            memfd_noexec: plan.memfd_noexec,
            mdwe: plan.write_execute == agentd_policy::WriteExecute::Prctl,
            uid: plan.identity.uid,
            gid: plan.identity.gid,
            last_cap: last_cap(),
            sandbox_rules,
            seccomp,
            argv_ptrs: pointers(&argv),
            envp_ptrs: pointers(&envp),
            _argv: argv,
            _envp: envp,
            candidates: plan.program_candidates.iter().map(|c| cstr(c)).collect::<Result<_, _>>()?,
            tool_stack: vec![0; 64 * 1024],
            unix_gate: match plan.unix_connect {
                agentd_policy::UnixConnect::Gate => Some(GateSpec {
                    program: super::seccomp::connect_notify(),
                    granted: plan.network.unix.iter().map(|p| cstr(p)).collect::<Result<_, _>>()?,
                    tmp: plan
                        .mounts
                        .iter()
                        .any(|m| matches!(m, agentd_policy::Mount::Tmpfs { path, .. } if path == "/tmp")),
                    landlock: plan.landlock.resolve_unix,
                }),
                agentd_policy::UnixConnect::Refused => None,
            },
            highest_fd: 0,
        })
    }

    /// A readable name for op number `i`, for error messages.
    pub(crate) fn describe_op(&self, i: usize) -> String {
        let show = |c: &CString| c.to_string_lossy().trim_start_matches(ROOT_MOUNTPOINT).to_string();
        match self.ops.get(i) {
            Some(Op::Mkdir(p)) => format!("creating mount point {}", show(p)),
            Some(Op::Touch(p)) => format!("creating mount point {}", show(p)),
            Some(Op::Attach(c, p)) => {
                let src = self.captures.get(*c).map(|c| c.source.to_string_lossy().into_owned()).unwrap_or_default();
                format!("bind-mounting {src} at {}", show(p))
            }
            Some(Op::Tmpfs(p, ..)) => format!("mounting a tmpfs at {}", show(p)),
            Some(Op::Proc(p, _)) => format!("mounting proc at {}", show(p)),
            Some(Op::Symlink(_, l)) => format!("creating symlink {}", show(l)),
            Some(Op::ReadOnly(p)) => format!("making {} read-only", show(p)),
            None => "building the fresh root".into(),
        }
    }
}
