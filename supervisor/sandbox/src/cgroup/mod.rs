//! Per-call cgroups on pure cgroup v2 hosts and on hybrid hosts (v1 memory/pids/cpu
//! controllers beside a controller-less v2 tree).
//!
//! Each call gets `agentd/<call_id>` in every hierarchy used. The child is born into its v2
//! cgroup (`CLONE_INTO_CGROUP`): on hybrid hosts that is the controller-less unified tree,
//! which still gives `cgroup.kill` and the cgroup id the BPF layer keys on. There the
//! supervisor creates the v1 memory, pids and cpu cgroups while the child sets up, and moves
//! it into them before any tool code runs.

mod detect;

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentd_policy::{CgroupFlavor, CgroupPlan};
use serde::Serialize;
use tracing::warn;

use self::detect::{parse_mountinfo, parse_proc_cgroup, v2_has_controllers, Hierarchy};

/// Why a call's cgroup could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable hierarchy.
    #[error("no cgroup hierarchy with memory, pids and cpu controllers is mounted")]
    Unavailable,
    /// A cgroup file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_at<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> CgroupError + 'p {
    move |source| CgroupError::Io { op, path: path.to_path_buf(), source }
}

/// The hierarchies agentd puts calls in, found once per process.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// Pure v2: calls go under `parent`.
    V2 {
        /// `<mount>/agentd`.
        parent: PathBuf,
    },
    /// v1 controllers, each with an `agentd` parent under agentd's own cgroup.
    Hybrid {
        /// Parent in the controller-less v2 tree, if mounted.
        unified: Option<PathBuf>,
        /// Parent in the v1 memory hierarchy.
        memory: PathBuf,
        /// Parent in the v1 pids hierarchy.
        pids: PathBuf,
        /// Parent in the v1 cpu hierarchy.
        cpu: PathBuf,
    },
    /// Nothing usable.
    Unavailable,
}

impl Cgroups {
    /// Inspects the host's mounts.
    pub fn detect() -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let (v2, v1) = parse_mountinfo(&mountinfo);
        let (_, v1_paths) = parse_proc_cgroup(&own);
        if let Some(h) = v2.iter().find(|h| v2_has_controllers(&h.mount)) {
            return Cgroups::V2 { parent: h.mount.join("agentd") };
        }
        let parent_in = |ctrl: &str| -> Option<PathBuf> {
            let h: &Hierarchy = v1.iter().find(|h| h.controllers.iter().any(|c| c == ctrl))?;
            let path = v1_paths.iter().find(|(c, _)| c == ctrl).map_or("/", |(_, p)| p.as_str());
            Some(h.dir_of(path).join("agentd"))
        };
        match (parent_in("memory"), parent_in("pids"), parent_in("cpu")) {
            (Some(memory), Some(pids), Some(cpu)) => {
                // One parent for every agentd on the host, whatever cgroup each runs in: the BPF
                // cgroup programs attach there once. The unified tree has no controllers, so
                // nothing escapes a service's limits by living at its root.
                let unified = v2.first().map(|h| h.mount.join("agentd"));
                Cgroups::Hybrid { unified, memory, pids, cpu }
            }
            _ => Cgroups::Unavailable,
        }
    }

    /// The v2 cgroup that holds every call's v2 cgroup (created if needed): where the BPF
    /// cgroup programs attach. `None` without a v2 hierarchy.
    pub fn v2_parent(&self) -> Result<Option<PathBuf>, CgroupError> {
        match self {
            Cgroups::V2 { parent } => {
                ensure_v2_parent(parent)?;
                Ok(Some(parent.clone()))
            }
            Cgroups::Hybrid { unified: Some(parent), .. } => {
                make_dir(parent)?;
                Ok(Some(parent.clone()))
            }
            Cgroups::Hybrid { unified: None, .. } | Cgroups::Unavailable => Ok(None),
        }
    }

    /// The flavour, for the plan.
    pub fn flavor(&self) -> CgroupFlavor {
        match self {
            Cgroups::V2 { .. } => CgroupFlavor::V2,
            Cgroups::Hybrid { .. } => CgroupFlavor::Hybrid,
            Cgroups::Unavailable => CgroupFlavor::Unavailable,
        }
    }

    /// Creates the call's cgroups and sets their limits. On failure nothing is left behind.
    ///
    /// On hybrid hosts the v1 cgroups are left to [`CallCgroup::enter`], just before the
    /// child is cloned, and their limits to [`CallCgroup::attach`]; the v2 cgroup must exist
    /// before the child is born into it.
    pub fn create(&self, call_id: &str, plan: &CgroupPlan) -> Result<CallCgroup, CgroupError> {
        let mut cg = CallCgroup {
            flavor: self.flavor(),
            v2: None,
            v1: Vec::new(),
            memory: None,
            deferred: None,
            home: Vec::new(),
            limits: None,
        };
        if let Cgroups::Hybrid { unified, .. } = self {
            // The controller-less v2 cgroup is cheap: the call is born into it, which roots
            // its cgroup namespace there and gives it its cgroup id from the first instant.
            if let Some(parent) = unified {
                let dir = parent.join(call_id);
                let made = make_dir(parent).and_then(|()| make_new_dir(&dir));
                match made.and_then(|()| File::open(&dir).map_err(io_at("opening", &dir))) {
                    Ok(fd) => cg.v2 = Some((dir, fd)),
                    Err(e) => {
                        let _ = fs::remove_dir(&dir);
                        return Err(e);
                    }
                }
            }
            cg.deferred = Some((self.clone(), call_id.to_string(), *plan));
            return Ok(cg);
        }
        match self.fill(&mut cg, call_id, plan) {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    fn fill(&self, cg: &mut CallCgroup, call_id: &str, plan: &CgroupPlan) -> Result<(), CgroupError> {
        match self {
            Cgroups::Unavailable => return Err(CgroupError::Unavailable),
            Cgroups::V2 { parent } => {
                ensure_v2_parent(parent)?;
                let dir = parent.join(call_id);
                make_new_dir(&dir)?;
                cg.v2 = Some((dir.clone(), File::open(&dir).map_err(io_at("opening", &dir))?));
                write(&dir.join("memory.max"), plan.memory_bytes)?;
                write_if_present(&dir.join("memory.swap.max"), 0)?;
                write(&dir.join("memory.oom.group"), 1)?;
                write(&dir.join("pids.max"), plan.pids)?;
                write_str(&dir.join("cpu.max"), &format!("{} {}", plan.cpu_quota_us, plan.cpu_period_us))?;
                cg.memory = Some(dir);
            }
            Cgroups::Hybrid { memory, pids, cpu, .. } => {
                let (m, p, c) = (memory.join(call_id), pids.join(call_id), cpu.join(call_id));
                for dir in [&m, &p, &c] {
                    make_dir(dir.parent().unwrap_or(dir))?;
                    make_new_dir(dir)?;
                    cg.v1.push(dir.clone());
                }
                cg.memory = Some(m);
                cg.limits = Some(*plan);
            }
        }
        Ok(())
    }

    /// Every directory that holds a call's cgroup, one per hierarchy.
    fn parents(&self) -> Vec<&PathBuf> {
        match self {
            Cgroups::V2 { parent } => vec![parent],
            Cgroups::Hybrid { unified, memory, pids, cpu } => unified.iter().chain([memory, pids, cpu]).collect(),
            Cgroups::Unavailable => Vec::new(),
        }
    }

    /// Kills every process of call `call_id` (by its cgroups; another process may run it),
    /// waits up to `wait` for them to go, and removes its cgroups. Returns how many processes
    /// it found. Used to cancel a call, at the end of a drain, and for calls a killed daemon
    /// left behind.
    pub fn kill_call(&self, call_id: &str, wait: Duration) -> usize {
        if call_id.is_empty() || call_id.contains('/') || call_id.starts_with('.') {
            return 0;
        }
        let mut dirs: Vec<PathBuf> =
            self.parents().into_iter().map(|p| p.join(call_id)).filter(|d| d.is_dir()).collect();
        let found: usize = dirs.iter().map(|d| procs(d).len()).max().unwrap_or(0);
        // Where the call has a v2 cgroup, its `cgroup.kill` takes every process of the call,
        // and the call's v1 cgroups are left alone: on hybrid hosts a supervisor's thread is
        // in them for a moment while it clones the call's first process (see
        // `CallCgroup::enter`), and a kill by their member list would take that supervisor.
        match dirs.iter().find(|d| fs::write(d.join("cgroup.kill"), "1").is_ok()).cloned() {
            Some(v2) => dirs = vec![v2],
            None => dirs.iter().for_each(|d| kill_members(d)),
        }
        let deadline = Instant::now() + wait;
        for d in &dirs {
            while !procs(d).is_empty() && Instant::now() < deadline {
                for pid in procs(d) {
                    crate::sys::kill(pid, libc::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        found
    }

    /// Removes the cgroups of call `call_id` if they are empty (its runner normally does).
    pub fn remove_call(&self, call_id: &str) {
        if call_id.is_empty() || call_id.contains('/') || call_id.starts_with('.') {
            return;
        }
        for p in self.parents() {
            let _ = fs::remove_dir(p.join(call_id));
        }
    }

    /// Removes call cgroups left by an agentd that was killed: empty, and older than `age`
    /// (younger ones may belong to a call another agentd is setting up right now).
    pub fn sweep_stale(&self, age: Duration) -> usize {
        let mut removed = 0;
        for parent in self.parents() {
            for entry in fs::read_dir(parent).into_iter().flatten().flatten() {
                let dir = entry.path();
                let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|e| e > age));
                if entry.file_type().is_ok_and(|t| t.is_dir())
                    && old
                    && procs(&dir).is_empty()
                    && fs::remove_dir(&dir).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }
}

/// Whether `/proc/thread-self/cgroup` (`own`) puts this thread in `home` for `controller`:
/// `home` ends with the line's path, or, for `/`, is the root of its hierarchy (a directory
/// whose parent is not a cgroup).
fn still_in(own: &str, controller: &str, home: &Path) -> bool {
    let (_, v1) = parse_proc_cgroup(own);
    let Some((_, path)) = v1.iter().find(|(c, _)| c == controller) else { return false };
    match path.trim_start_matches('/') {
        "" => home.parent().is_some_and(|p| !p.join("cgroup.procs").exists()),
        rel => home.ends_with(rel),
    }
}

/// Creates a call's own directory: it must not exist yet, or two calls would share limits.
fn make_new_dir(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir(dir).map_err(io_at("creating", dir))
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::Io { op: "creating", path: dir.to_path_buf(), source: e }),
    }
}

fn write_str(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_at("writing", path))
}

fn write(path: &Path, value: u64) -> Result<(), CgroupError> {
    write_str(path, &value.to_string())
}

fn write_if_present(path: &Path, value: u64) -> Result<(), CgroupError> {
    if path.exists() {
        write(path, value)?;
    }
    Ok(())
}

/// Creates `<mount>/agentd` and enables memory, pids and cpu for its children.
fn ensure_v2_parent(parent: &Path) -> Result<(), CgroupError> {
    let want = ["memory", "pids", "cpu"];
    let enabled = |dir: &Path| -> bool {
        let s = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        want.iter().all(|w| s.split_whitespace().any(|c| c == *w))
    };
    if enabled(parent) {
        return Ok(());
    }
    let root = parent.parent().unwrap_or(parent);
    let line = "+memory +pids +cpu";
    if !enabled(root) {
        write_str(&root.join("cgroup.subtree_control"), line)?;
    }
    make_dir(parent)?;
    write_str(&parent.join("cgroup.subtree_control"), line)
}

/// Limits as applied, for the call's enforcement report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Applied {
    /// `v2` or `hybrid`.
    pub version: CgroupFlavor,
    /// Memory limit in bytes (no swap on top).
    pub memory_bytes: u64,
    /// Task limit.
    pub pids: u64,
    /// CPU quota per period, microseconds.
    pub cpu_quota_us: u64,
    /// CPU period, microseconds.
    pub cpu_period_us: u64,
}

/// One call's cgroups. Remove with [`CallCgroup::remove`] after the call has been reaped.
#[derive(Debug)]
pub struct CallCgroup {
    flavor: CgroupFlavor,
    /// The v2 (or unified) cgroup and an fd for `CLONE_INTO_CGROUP`.
    v2: Option<(PathBuf, File)>,
    /// v1 cgroups (hybrid only).
    v1: Vec<PathBuf>,
    /// Where OOM kills are counted.
    memory: Option<PathBuf>,
    /// Hybrid hosts: created in `enter`, just before the child is cloned.
    deferred: Option<(Cgroups, String, CgroupPlan)>,
    /// Hybrid hosts: this process's own v1 cgroups, while its thread is in the call's.
    home: Vec<PathBuf>,
    /// Hybrid hosts: the v1 limits, set by `attach` once this process has left.
    limits: Option<CgroupPlan>,
}

impl CallCgroup {
    /// The id of the call's v2 cgroup (what `bpf_get_current_cgroup_id` returns inside it):
    /// the inode number of its directory.
    pub fn id(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.v2.as_ref().and_then(|(_, f)| f.metadata().ok()).map(|m| m.ino())
    }

    /// fd for `clone3(CLONE_INTO_CGROUP)`.
    pub fn clone_into_fd(&self) -> Option<BorrowedFd<'_>> {
        self.v2.as_ref().map(|(_, f)| f.as_fd())
    }

    /// Hybrid hosts: creates the call's v1 cgroups (without limits yet) and moves this
    /// thread into them, so that the child cloned next is born there, as `CLONE_INTO_CGROUP`
    /// does for v2; [`CallCgroup::leave`] right after the clone takes it back.
    ///
    /// Why: moving another process into a v1 cgroup (its pid into `cgroup.procs`) takes the
    /// kernel's thread-group lock for writing, which waits for an RCU grace period: about
    /// 13 ms of a one-shot call's 17 here. A thread moving itself (`0` into `tasks`) takes no
    /// such lock. Sandboxes are spawned from a single thread, so the child has only this one.
    pub fn enter(&mut self) -> Result<(), CgroupError> {
        let Some((cgroups, call_id, plan)) = self.deferred.take() else { return Ok(()) };
        cgroups.fill(self, &call_id, &plan)?;
        let own = match fs::read_to_string("/proc/thread-self/cgroup") {
            Ok(own) => own,
            Err(e) => {
                return Err(CgroupError::Io { op: "reading", path: "/proc/thread-self/cgroup".into(), source: e })
            }
        };
        for (dir, controller) in self.v1.clone().into_iter().zip(["memory", "pids", "cpu"]) {
            // The call's cgroup is `<this process's cgroup>/agentd/<call>`, as found when
            // agentd started; this thread must still be there, or leaving would move it to
            // where it no longer belongs.
            let Some(home) = dir.parent().and_then(Path::parent).map(Path::to_path_buf) else { continue };
            if !still_in(&own, controller, &home) {
                let _ = self.leave();
                return Err(CgroupError::Io {
                    op: "finding this process's cgroup for",
                    path: dir,
                    source: io::Error::other(format!(
                        "agentd is no longer in its {controller} cgroup {} (moved since it started?)",
                        home.display()
                    )),
                });
            }
            let tasks = dir.join("tasks");
            if let Err(e) = fs::write(&tasks, "0") {
                let _ = self.leave();
                return Err(CgroupError::Io { op: "entering", path: tasks, source: e });
            }
            self.home.push(home);
        }
        Ok(())
    }

    /// Takes this thread back to its own v1 cgroups after [`CallCgroup::enter`] (a no-op
    /// otherwise).
    pub fn leave(&mut self) -> Result<(), CgroupError> {
        let mut first = None;
        for home in std::mem::take(&mut self.home) {
            let tasks = home.join("tasks");
            if let Err(e) = fs::write(&tasks, "0") {
                first.get_or_insert(CgroupError::Io { op: "leaving the call's cgroup for", path: tasks, source: e });
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Hybrid hosts: sets the limits of the call's v1 cgroups once the child is in them and
    /// this process has left (it would have been counted against them).
    pub fn attach(&mut self, _pid: i32) -> Result<(), CgroupError> {
        let Some(plan) = self.limits.take() else { return Ok(()) };
        // In `fill`'s order: memory, pids, cpu.
        let [m, p, c] = self.v1.as_slice() else {
            return Err(CgroupError::Io {
                op: "setting the limits of",
                path: self.v1.first().cloned().unwrap_or_default(),
                source: io::Error::other("the call does not have its three v1 cgroups"),
            });
        };
        write(&m.join("memory.limit_in_bytes"), plan.memory_bytes)?;
        write_if_present(&m.join("memory.memsw.limit_in_bytes"), plan.memory_bytes)?;
        write(&p.join("pids.max"), plan.pids)?;
        write(&c.join("cpu.cfs_period_us"), plan.cpu_period_us)?;
        write(&c.join("cpu.cfs_quota_us"), plan.cpu_quota_us)?;
        Ok(())
    }

    /// Kills every process in the call's cgroups.
    pub fn kill(&self) {
        if let Some((dir, _)) = &self.v2 {
            if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for dir in &self.v1 {
            kill_members(dir);
        }
    }

    /// Number of OOM kills in the call's memory cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some(dir) = &self.memory else { return 0 };
        let file = if self.flavor == CgroupFlavor::V2 { "memory.events" } else { "memory.oom_control" };
        let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == "oom_kill")
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }

    /// The most memory (bytes) and tasks the call's cgroups held at once, where the kernel
    /// keeps them (`memory.peak` and `pids.peak` on v2, `memory.max_usage_in_bytes` on v1):
    /// what `policy draft` sets limits from.
    pub fn peaks(&self) -> (Option<u64>, Option<u64>) {
        let read = |p: PathBuf| fs::read_to_string(p).ok().and_then(|t| t.trim().parse::<u64>().ok());
        let memory = self.memory.as_ref().and_then(|d| {
            let file = if self.flavor == CgroupFlavor::V2 { "memory.peak" } else { "memory.max_usage_in_bytes" };
            read(d.join(file))
        });
        let dirs = self.v2.iter().map(|(d, _)| d).chain(&self.v1);
        let pids = dirs.clone().find_map(|d| read(d.join("pids.peak")));
        (memory, pids)
    }

    /// Waits (briefly) for the cgroups to empty, then removes them.
    pub fn remove(self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dirs: Vec<PathBuf> = self.v1.clone();
        dirs.extend(self.v2.iter().map(|(d, _)| d.clone()));
        drop(self.v2);
        for dir in dirs {
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e) if Instant::now() < deadline => {
                        if e.raw_os_error() != Some(libc::EBUSY) {
                            warn!(path = %dir.display(), error = %e, "retrying cgroup removal");
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(CgroupError::Io { op: "removing", path: dir, source: e }),
                }
            }
        }
        Ok(())
    }
}

/// SIGKILLs every process in cgroup `dir`: at once by `cgroup.kill` (v2), else one by one.
fn kill_members(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_err() {
        for pid in procs(dir) {
            crate::sys::kill(pid, libc::SIGKILL);
        }
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::still_in;
    use std::path::Path;

    /// A thread is taken back only to the cgroup it is in, per controller.
    #[test]
    fn a_thread_is_where_proc_says_per_controller() {
        let own = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/e8\n2:cpu,cpuacct:/svc\n0::/\n";
        assert!(still_in(own, "memory", Path::new("/sys/fs/cgroup/memory/process_api/e8")));
        assert!(!still_in(own, "memory", Path::new("/sys/fs/cgroup/memory/other")));
        assert!(still_in(own, "cpu", Path::new("/sys/fs/cgroup/cpu,cpuacct/svc")));
        // "/": the root of the hierarchy, whose parent is no cgroup.
        assert!(still_in(own, "pids", Path::new("/tmp/pids")));
        // No line for the controller.
        assert!(!still_in(own, "blkio", Path::new("/sys/fs/cgroup/blkio")));
    }
}
