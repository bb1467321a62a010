//! What the policy compiler needs to know about this host: kernel features (probed, never
//! assumed) and read-only filesystem answers.

use std::path::{Path, PathBuf};

use agentd_policy::{mountinfo, HostFacts, HostFs};

use crate::cgroup::Cgroups;
use crate::sys;
use agentd_audit::bpf::{Bpf, BpfError, Layer};
use agentd_policy::error_chain;

/// The per-pid-namespace sysctl that forbids executable memfds.
pub const MEMFD_NOEXEC: &str = "/proc/sys/vm/memfd_noexec";

/// Probed facts about the running kernel, plus the cgroup hierarchies found.
#[derive(Debug, Clone)]
pub struct Host {
    /// Facts the plan depends on.
    pub facts: HostFacts,
    /// Where calls' cgroups go.
    pub cgroups: Cgroups,
    /// Why the BPF layer is not in use, once someone tried to open it.
    pub bpf_note: Option<String>,
    /// Set when the layer is loaded but this process could not join it: its calls would go
    /// unrecorded, so they are refused.
    pub bpf_blocked: Option<String>,
}

impl Host {
    /// Opens agentd's BPF layer (loading and pinning it the first time). On failure the host
    /// runs without it, and says why in every result.
    pub fn open_bpf(&mut self) -> Option<Bpf> {
        let opened = match self.cgroups.v2_parent() {
            Ok(Some(parent)) => Bpf::open(&parent).map_err(|e| {
                // The layer may be loaded and enforcing, but this process cannot join it: its
                // calls would go unrecorded.
                if matches!(e, BpfError::Join(_) | BpfError::LockHeld { .. } | BpfError::UnsafeDir { .. }) {
                    self.bpf_blocked = Some(format!("{}, so this call could not be recorded", error_chain(&e)));
                }
                error_chain(&e)
            }),
            Ok(None) => Err("no cgroup v2 hierarchy to attach the cgroup programs to".to_string()),
            Err(e) => Err(error_chain(&e)),
        };
        match opened {
            Ok(mut bpf) => {
                // What killed supervisors left: their calls must not run on unsupervised (their
                // events would go unread), and their cgroups and registrations must go.
                for (id, call) in bpf.take_orphans() {
                    let found = self.cgroups.kill_call(&call, std::time::Duration::from_secs(2));
                    self.cgroups.remove_call(&call);
                    let _ = bpf.unregister(id);
                    tracing::warn!(call_id = %call, processes = found, "ended a call whose supervisor was killed");
                }
                self.facts.bpf_lsm = bpf.layer() == Layer::Lsm;
                self.facts.bpf_fallback = bpf.layer() == Layer::Fallback;
                if let Some(why) = bpf.note() {
                    self.bpf_note = Some(why.to_string());
                }
                Some(bpf)
            }
            Err(why) => {
                tracing::debug!(reason = %why, "running without the BPF layer");
                self.bpf_note = Some(why);
                None
            }
        }
    }

    /// Probes Landlock, cgroups and BPF LSM.
    pub fn probe() -> Self {
        let cgroups = Cgroups::detect();
        let facts = HostFacts {
            landlock_abi: sys::landlock_abi(),
            cgroup: cgroups.flavor(),
            bpf_lsm: false,
            memfd_noexec: Path::new(MEMFD_NOEXEC).exists(),
            // Set by whoever opens the BPF layer (see `Host::open_bpf`).
            bpf_fallback: false,
            // AGENTD_NO_MDWE=1 takes the seccomp way (as on kernels before 6.3), for tests.
            mdwe: sys::has_mdwe() && std::env::var_os("AGENTD_NO_MDWE").is_none(),
            unix_gate: sys::notify::has_gate_support(),
        };
        Self { facts, cgroups, bpf_note: None, bpf_blocked: None }
    }
}

/// The supervisor's mount table, kept between compiles: the kernel marks
/// `/proc/self/mountinfo` with `POLLPRI` when a mount or unmount changes the namespace, and
/// only then is it read again. A long-lived supervisor (a serve worker) thus does not format
/// and parse the whole table for every call, and still never checks a grant against a table
/// older than the last change.
#[derive(Debug)]
pub struct MountTable {
    file: Option<std::fs::File>,
    text: std::cell::RefCell<Option<std::rc::Rc<str>>>,
}

impl MountTable {
    /// Opens the table; if it cannot be opened, every compile reads it afresh. The table is
    /// that of the caller's mount namespace at this moment: a process that enters another
    /// must open a new one.
    pub fn open() -> Self {
        Self { file: std::fs::File::open("/proc/self/mountinfo").ok(), text: std::cell::RefCell::new(None) }
    }

    /// The table as of now.
    pub fn current(&self) -> std::io::Result<std::rc::Rc<str>> {
        use std::io::{Read, Seek};
        use std::os::fd::AsRawFd;
        let Some(mut file) = self.file.as_ref() else { return read_mountinfo() };
        let mut fds = [libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLPRI, revents: 0 }];
        // Polling consumes the change: from here on, whatever goes wrong must not leave the old
        // text in place. Anything but plain readability counts as a change.
        let changed = match sys::poll(&mut fds, 0) {
            Ok(_) => fds[0].revents & !(libc::POLLIN | libc::POLLRDNORM) != 0,
            Err(_) => true,
        };
        let mut cached = self.text.borrow_mut();
        if let (false, Some(text)) = (changed, cached.as_ref()) {
            return Ok(text.clone());
        }
        *cached = None;
        // Read after the poll: a change during the read is flagged for the next one.
        let mut text = String::new();
        file.rewind().and_then(|()| file.read_to_string(&mut text))?;
        let fresh = std::rc::Rc::<str>::from(text);
        *cached = Some(fresh.clone());
        Ok(fresh)
    }
}

fn read_mountinfo() -> std::io::Result<std::rc::Rc<str>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(Into::into)
}

/// The real filesystem, as seen by the supervisor. The mount table is taken once per value
/// (make one per compile): a manifest's grants are then checked against one snapshot, and a
/// compile does not re-read `/proc/self/mountinfo` for every grant.
#[derive(Debug, Default)]
pub struct RealFs<'t> {
    table: Option<&'t MountTable>,
    mountinfo: std::cell::OnceCell<Result<std::rc::Rc<str>, String>>,
}

impl<'t> RealFs<'t> {
    /// Takes the mount table from `table` (read again only if it changed) rather than
    /// reading it.
    pub fn with_table(table: &'t MountTable) -> Self {
        Self { table: Some(table), mountinfo: std::cell::OnceCell::new() }
    }
}

impl HostFs for RealFs<'_> {
    fn canonicalize(&self, path: &Path) -> Result<PathBuf, String> {
        std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist on this host".to_string(),
            _ => e.to_string(),
        })
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        std::fs::read_link(path).ok()
    }

    fn account_with(&self, uid: u32, gid: u32) -> Option<String> {
        use nix::unistd::{Gid, Group, Uid, User};
        if let Ok(Some(u)) = User::from_uid(Uid::from_raw(uid)) {
            return Some(format!("user {}", u.name));
        }
        match Group::from_gid(Gid::from_raw(gid)) {
            Ok(Some(g)) => Some(format!("group {}", g.name)),
            _ => None,
        }
    }

    fn elf_deps(&self, program: &Path) -> Option<agentd_policy::ElfDeps> {
        crate::elf::deps(program, Path::new("/etc/ld.so.cache"))
    }

    fn owner_mode(&self, path: &Path) -> Option<(u32, u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path).ok().map(|m| (m.uid(), m.gid(), m.mode()))
    }

    fn mounts_below(&self, path: &Path) -> Result<Vec<(PathBuf, String)>, String> {
        let text = self.mountinfo.get_or_init(|| {
            self.table
                .map_or_else(read_mountinfo, MountTable::current)
                .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))
        });
        text.as_deref().map(|t| mountinfo::mounts_below(t, path)).map_err(Clone::clone)
    }
}

/// What [`sockets_below`] found.
#[derive(Debug, Default)]
pub struct FoundSockets {
    /// Unix sockets at or below the path.
    pub sockets: Vec<PathBuf>,
    /// Whether the search stopped at its limit.
    pub truncated: bool,
}

/// Unix sockets at or below `path`, looking at no more than `limit` entries, never following
/// symlinks (submounts are looked into: a grant brings them along).
pub fn sockets_below(path: &Path, limit: usize) -> FoundSockets {
    use std::os::unix::fs::FileTypeExt;
    let mut found = FoundSockets::default();
    let Ok(top) = std::fs::symlink_metadata(path) else { return found };
    if top.file_type().is_socket() {
        found.sockets.push(path.to_path_buf());
        return found;
    }
    let mut stack = vec![path.to_path_buf()];
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            seen += 1;
            if seen > limit {
                found.truncated = true;
                return found;
            }
            let Ok(md) = entry.metadata() else { continue };
            if md.file_type().is_socket() {
                found.sockets.push(entry.path());
            } else if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    found.sockets.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run by the next test inside a mount namespace of its own (it mounts and unmounts).
    #[test]
    #[ignore = "run by mount_table_reads_again_after_the_namespace_changes, in a new mount namespace"]
    fn mount_table_in_own_namespace() {
        let dir = agentd_tests::unit::given_dir("mount_table_reads_again_after_the_namespace_changes");
        let run = |args: &[&str]| {
            let st = std::process::Command::new(args[0]).args(&args[1..]).status().expect("run");
            assert!(st.success(), "{args:?} failed");
        };
        let table = MountTable::open();
        let before = table.current().expect("table");
        // What holds the directory (its parent's filesystem), and nothing at or below it.
        let proc_at = |t: &str| mountinfo::mounts_below(t, &dir).iter().any(|(p, fs)| *p == dir && fs == "proc");
        assert!(!proc_at(&before));
        assert!(std::rc::Rc::ptr_eq(&before, &table.current().expect("table")), "an unchanged table is not read again");
        let d = dir.to_str().expect("utf-8");
        run(&["mount", "-t", "proc", "proc", d]);
        let mounted = table.current().expect("table");
        assert_eq!(mountinfo::mounts_below(&mounted, &dir), vec![(dir.clone(), "proc".to_string())]);
        run(&["umount", d]);
        assert!(!proc_at(&table.current().expect("table")));
    }

    /// A kept table must follow mounts made after it was read: a grant checked against a
    /// stale one could miss a kernel filesystem mounted below it.
    #[test]
    fn mount_table_reads_again_after_the_namespace_changes() {
        let args = ["--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc"];
        agentd_tests::unit::run_in_namespaces("host::tests::mount_table_in_own_namespace", &args, "mount-table");
    }
}
