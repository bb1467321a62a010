//! The BPF layer: agentd's kernel programs, loaded once and kept pinned under
//! `/sys/fs/bpf/agentd/<object hash>/`, so later `agentd exec` runs (and the daemon) reuse
//! them instead of loading again.
//!
//! Where the kernel runs the BPF LSM, the LSM programs record and deny (exec, executable
//! mappings, opens, connect and bind, ptrace, signals, mounts). On kernels without it (like
//! the build hosts) the fallback programs run: `cgroup/connect4|6` and `cgroup/bind4|6` on
//! agentd's parent v2 cgroup allow exactly the manifest's `host:port` pairs, and
//! `raw_tracepoint/sys_enter` records exec and open attempts. Each program acts only on tasks
//! whose cgroup id is a registered call.
//!
//! Each supervisor holds a ring buffer of its own while it lives, and each call it registers
//! names that ring's slot in `RINGS`: concurrent supervisors never read each other's events.
//! The rings are kept (pinned, in `RINGS`) after their holders end, and a supervisor takes the
//! first free one, by its slot's lock file, or adds one: so a call adds nothing to `RINGS`,
//! whose every update waits for an RCU grace period (about 10 ms each, twice a call, when each
//! supervisor made its own). Up to [`RING_SLOTS`] supervisors run at once; the idle detacher
//! frees rings beyond the first [`KEPT_RINGS`] that nobody holds. A supervisor also holds a
//! lock file named by a random owner id while it lives, which tells a later one whether calls
//! it left registered are orphans.
//!
//! The programs that every process of the host would run (the LSM hooks, the syscall
//! tracepoints, `sched_process_exec`) are pinned as programs and attached only while calls
//! run: each supervisor with a running call holds `active.lock` shared, and attaches what is
//! missing; when its last call ends it marks the time on its build's idle lock and, unless a
//! detacher holds that lock already, starts `agentd __bpf-idle`, which waits until a short grace after
//! the last call's end, takes `active.lock` exclusively, without waiting (so only when no
//! call runs anywhere), and detaches them. The cgroup programs stay attached: they act on agentd's cgroups alone.

mod btf;
mod events;
mod load;
pub mod programs_log;

use std::fs::{self, File};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd_ebpf_common::{
    CallInfo, NetKey, PathKey, RepeatCount, RepeatKey, UnixKey, CALL_DENY_WX, CALL_NET_RULES, CALL_NO_REPEATS,
    CALL_OPEN_RULES, MODE_AUDIT, MODE_ENFORCE, NET_BIND, NET_CONNECT, PATH_LEN, RING_BYTES, RING_SLOTS, RULE_DENY_OPEN,
    RULE_EXEC,
};
use agentd_policy::{AuditMode, BpfPlan, NetOp};
use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use sha2::{Digest, Sha256};
use tracing::warn;

pub use self::events::{add_kernel_path, add_name, add_result, late_result, to_entry};
use self::load::{
    lock_file, lock_holder, ACTIVE_LOCK, BPFFS, IDLE_LOCK_PREFIX, LOADER_LOCK, LOCK_DIR, RING_LOCK_PREFIX,
};
use crate::sys;

/// The compiled programs (empty when agentd was built without them).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentd.bpf.o"));

/// Which set of programs is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// BPF LSM hooks.
    Lsm,
    /// cgroup socket programs and syscall tracepoints.
    Fallback,
}

impl Layer {
    /// As `enforcement.bpf.layer` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Lsm => "lsm",
            Layer::Fallback => "fallback",
        }
    }
}

/// Why the BPF layer is not available.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// This binary carries no programs.
    #[error("agentd was built without its eBPF programs (nightly and bpf-linker were missing at build time)")]
    NotBuilt,
    /// Loading, attaching or pinning failed.
    #[error("{what}")]
    Setup {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The layer is loaded (and acting on every call), but this process could not join it:
    /// its maps, its ring buffer or its owner lock.
    #[error("the BPF layer is loaded, but this process could not join it")]
    Join(#[source] Box<BpfError>),
    /// agentd's runtime or lock directory is not safely its own.
    #[error("{dir} {why}: another user could take or swap agentd's locks; remove it and retry")]
    UnsafeDir {
        /// The directory.
        dir: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// Another process held the loader's lock past the deadline.
    #[error("{} was held by {holder} for {waited:?}; refusing to wait longer", path.display())]
    LockHeld {
        /// The lock file.
        path: PathBuf,
        /// Who holds it.
        holder: String,
        /// How long agentd waited.
        waited: std::time::Duration,
    },
    /// A path rule is longer than the programs can match.
    #[error("{what} path {path} is longer than the {max} bytes the BPF layer can match")]
    PathTooLong {
        /// Which rule.
        what: &'static str,
        /// The path.
        path: String,
        /// The limit.
        max: usize,
    },
}

fn setup<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> BpfError {
    let what = what.into();
    move |e| BpfError::Setup { what, source: Box::new(e) }
}

/// The loaded layer, with this process's ring buffer.
pub struct Bpf {
    layer: Layer,
    /// How the syscall programs are attached (`None` on an LSM layer without them).
    hook: Option<load::SyscallHook>,
    note: Option<String>,
    calls: HashMap<MapData, u64, CallInfo>,
    net: HashMap<MapData, NetKey, u8>,
    paths: HashMap<MapData, PathKey, u8>,
    unix: HashMap<MapData, UnixKey, u8>,
    /// Calls of dead supervisors whose cgroups are still there: (cgroup id, directory name).
    orphans: Vec<(u64, String)>,
    /// Path rules this process inserted, per call, to remove them after it.
    own_paths: Vec<PathKey>,
    lost: PerCpuHashMap<MapData, u64, u64>,
    /// Repeated opens counted by the fallback's programs (`REPEATS`).
    repeats: HashMap<MapData, RepeatKey, RepeatCount>,
    /// Keys each call has in `REPEATS` (`REPEAT_QUOTA`): a call without an entry has none.
    repeat_quota: HashMap<MapData, u64, u64>,
    ring: sys::Ring,
    /// The ring's slot in `RINGS`, and its lock, held for this process's life.
    slot: u32,
    _slot_lock: File,
    owner: u32,
    _owner_lock: File,
    /// The pins' directory.
    dir: PathBuf,
    /// Calls of this process between `register` and `unregister`, by cgroup id.
    active: std::collections::HashSet<u64>,
    /// `active.lock`, held shared while `active` is not empty.
    active_lock: Option<File>,
}

impl std::fmt::Debug for Bpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpf").field("layer", &self.layer).field("owner", &self.owner).finish_non_exhaustive()
    }
}

impl Bpf {
    /// Loads agentd's programs (or reuses the pinned ones) with the cgroup programs attached
    /// to `cgroup_parent`, and takes a ring buffer for this process.
    pub fn open(cgroup_parent: &Path) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        load::ensure_mounted(BPFFS, "bpf")?;
        let (base, hash) = (Path::new(BPFFS).join("agentd"), object_hash());
        let dir = base.join(&hash);
        load::private_dirs()?;
        let lock = held(LOADER_LOCK, false)?;
        let note_file = load::note_path(&hash);
        let (layer, note) = match load::pinned_layer(&dir) {
            Some(Layer::Lsm) => (Layer::Lsm, None),
            Some(Layer::Fallback) => (Layer::Fallback, Some(fallback_note(&note_file))),
            None => {
                load::remove_stale(&base, &hash);
                load::load_and_pin(&dir, cgroup_parent, &note_file)?
            }
        };
        drop(lock);
        Self::join(layer, note, &dir, cgroup_parent).map_err(|e| BpfError::Join(Box::new(e)))
    }

    /// Opens the pinned maps, takes this process's ring buffer and owner lock, and sweeps
    /// what dead supervisors left.
    fn join(layer: Layer, note: Option<String>, dir: &Path, cgroup_parent: &Path) -> Result<Self, BpfError> {
        let maps = dir.join("maps");
        let open =
            |name: &str| MapData::from_pin(maps.join(name)).map_err(setup(format!("opening the pinned map {name}")));
        let calls = HashMap::try_from(Map::HashMap(open("CALLS")?)).map_err(setup("CALLS"))?;
        let net = HashMap::try_from(Map::HashMap(open("NET_ALLOW")?)).map_err(setup("NET_ALLOW"))?;
        let lost = PerCpuHashMap::try_from(Map::PerCpuHashMap(open("LOST")?)).map_err(setup("LOST"))?;
        let paths = HashMap::try_from(Map::HashMap(open("PATH_RULES")?)).map_err(setup("PATH_RULES"))?;
        let unix = HashMap::try_from(Map::HashMap(open("UNIX_ALLOW")?)).map_err(setup("UNIX_ALLOW"))?;
        // A map of maps, which aya has no type for: its keys and values (inner map fds on
        // update) are those of a hash map.
        let mut rings = HashMap::try_from(Map::HashMap(open("RINGS")?)).map_err(setup("RINGS"))?;
        let repeats = HashMap::try_from(Map::HashMap(open("REPEATS")?)).map_err(setup("REPEATS"))?;
        let repeat_quota = HashMap::try_from(Map::HashMap(open("REPEAT_QUOTA")?)).map_err(setup("REPEAT_QUOTA"))?;

        let (owner, owner_lock) = claim_owner()?;
        // Kernels before 5.11 charge the ring buffer to RLIMIT_MEMLOCK.
        if let Err(e) = sys::raise_memlock() {
            tracing::debug!(error = %e, "RLIMIT_MEMLOCK left as it is");
        }
        let (slot, slot_lock, ring) = claim_ring(dir, &mut rings)?;
        let mut ring = sys::Ring::open(ring, RING_BYTES as usize).map_err(setup("mapping the ring buffer"))?;
        // What an earlier holder left unread is not this process's (its calls' events carry
        // their cgroup ids, and those calls are over or orphans): at most a ring's worth,
        // so that an orphan writing on cannot keep this here.
        let stale = ring.consume(RING_BYTES as usize / std::mem::size_of::<agentd_ebpf_common::Event>(), |_| {});
        if stale > 0 {
            tracing::debug!(slot, stale, "dropped events an earlier holder of the ring left unread");
        }
        let hook = load::syscall_hook(dir);
        let mut bpf = Self {
            layer,
            hook,
            note,
            calls,
            net,
            paths,
            unix,
            orphans: Vec::new(),
            own_paths: Vec::new(),
            lost,
            repeats,
            repeat_quota,
            ring,
            slot,
            _slot_lock: slot_lock,
            owner,
            _owner_lock: owner_lock,
            dir: dir.to_path_buf(),
            active: std::collections::HashSet::new(),
            active_lock: None,
        };
        sweep_dead_calls(&mut bpf, cgroup_parent);
        Ok(bpf)
    }

    /// Calls that supervisors killed before they could end them left registered, with their
    /// cgroups still there: (cgroup id, cgroup directory name). The caller ends what is left
    /// of each (its processes, its cgroups), then [`Bpf::unregister`]s it.
    pub fn take_orphans(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.orphans)
    }

    /// The attached layer.
    pub fn layer(&self) -> Layer {
        self.layer
    }

    /// Why BPF LSM is not in use, for the fallback layer.
    pub fn note(&self) -> Option<&str> {
        self.note.as_deref()
    }

    /// What this layer cannot record here, if anything.
    pub fn gap(&self) -> Option<&'static str> {
        (self.layer == Layer::Lsm && self.hook.is_none()).then_some(
            "file changes and what Landlock refuses are not recorded: this kernel cannot pin per-syscall \
             tracepoints (Linux 5.15 adds them)",
        )
    }

    /// The programs acting on calls, as `enforcement.bpf.active` lists them.
    pub fn programs(&self) -> Vec<String> {
        let mut out: Vec<String> = match self.layer {
            Layer::Lsm => load::LSM_PROGRAMS
                .iter()
                .chain(load::PATH_PROGRAMS.iter().filter(|p| self.dir.join("progs").join(p).exists()))
                .map(|p| format!("lsm/{p}"))
                .collect(),
            Layer::Fallback => load::FALLBACK_PROGRAMS
                .iter()
                .map(|p| format!("cgroup/{p}"))
                .chain([format!("raw_tracepoint/{}", load::EXEC_PROGRAM)])
                .collect(),
        };
        match self.hook {
            Some(load::SyscallHook::PerSyscall) => {
                use agentd_ebpf_common::syscalls::{entered, exit_only, Syscall, TRACED};
                let names =
                    |t: &mut dyn Iterator<Item = &Syscall>| t.map(|s| s.tracepoint).collect::<Vec<_>>().join(" ");
                let both = names(&mut TRACED.iter().filter(|s| entered(s)));
                out.push(format!("tracepoint/syscalls/sys_enter_* and sys_exit_* ({both})"));
                let exits = names(&mut TRACED.iter().filter(|s| !entered(s)).chain(exit_only()));
                out.push(format!("tracepoint/syscalls/sys_exit_* ({exits})"));
            }
            Some(load::SyscallHook::Raw) => {
                out.extend(["raw_tracepoint/sys_enter".to_string(), "raw_tracepoint/sys_exit".to_string()])
            }
            None => {}
        }
        out.extend(load::COMMON_PROGRAMS.iter().map(|p| {
            if *p == "devices" {
                "cgroup/dev".into()
            } else {
                format!("cgroup/{p}")
            }
        }));
        out
    }

    /// Registers a call before its tool runs: from now on the programs act on `cgroup_id`.
    pub fn register(&mut self, cgroup_id: u64, plan: &BpfPlan) -> Result<(), BpfError> {
        self.register_counting(cgroup_id, plan, true)
    }

    /// [`Bpf::register`], saying whether a thread's repeated opens of one file may be counted
    /// (written as one record when the call ends) rather than recorded one by one: not for a
    /// long-lived sandbox that serves many calls, whose records are told apart by their time.
    pub fn register_counting(&mut self, cgroup_id: u64, plan: &BpfPlan, repeats: bool) -> Result<(), BpfError> {
        if let Err(e) = self.activate(cgroup_id) {
            // What was attached before the failure must not stay attached for good.
            if self.active.is_empty() {
                spawn_idle_detacher();
            }
            return Err(e);
        }
        let registered = self.register_call(cgroup_id, plan, repeats);
        if registered.is_err() {
            self.deactivate(cgroup_id);
        }
        registered
    }

    /// Makes sure the programs that act on every process are all attached, and keeps them so
    /// until [`Bpf::deactivate`] (an idle detacher waits for that): fails, and the call is
    /// refused, when they cannot be.
    fn activate(&mut self, cgroup_id: u64) -> Result<(), BpfError> {
        if self.active.is_empty() {
            let lock = held(ACTIVE_LOCK, true)?;
            let missing = load::missing_links(&self.dir, self.layer)?;
            if !missing.is_empty() {
                let guard = held(LOADER_LOCK, false)?;
                let start = std::time::Instant::now();
                load::attach_switched(&self.dir, self.layer)?;
                let still = load::missing_links(&self.dir, self.layer)?;
                drop(guard);
                if !still.is_empty() {
                    return Err(BpfError::Setup {
                        what: format!("attaching agentd's programs: {} missing", still.join(", ")),
                        source: "their pinned programs are gone (removed by hand, or by another agentd build)".into(),
                    });
                }
                tracing::debug!(
                    links = missing.len(),
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    "attached the programs calls need"
                );
            }
            self.active_lock = Some(lock);
        }
        self.active.insert(cgroup_id);
        Ok(())
    }

    /// The end of call `cgroup_id`'s [`Bpf::activate`]: after the last, the shared lock goes
    /// and an idle detacher is started.
    fn deactivate(&mut self, cgroup_id: u64) {
        if self.active.remove(&cgroup_id) && self.active.is_empty() && self.active_lock.take().is_some() {
            spawn_idle_detacher();
        }
    }

    fn register_call(&mut self, cgroup_id: u64, plan: &BpfPlan, repeats: bool) -> Result<(), BpfError> {
        let rules = plan.exec_paths.iter().map(|p| ("fs.exec", RULE_EXEC, p));
        for (what, kind, p) in rules.chain(plan.deny_open.iter().map(|p| ("audit.deny_open", RULE_DENY_OPEN, p))) {
            let bytes = p.trim_end_matches('/').as_bytes();
            if bytes.len() >= PATH_LEN {
                return Err(BpfError::PathTooLong { what, path: p.clone(), max: PATH_LEN - 1 });
            }
            let mut key = PathKey { cgroup_id, kind, _pad: 0, path: [0; PATH_LEN] };
            key.path[..bytes.len()].copy_from_slice(bytes);
            self.paths.insert(key, 1, 0).map_err(setup(format!("adding the {what} rule for {p}")))?;
            self.own_paths.push(key);
        }
        for rule in &plan.net_rules {
            let (family, addr, any_addr) = match rule.addr {
                None => (0, [0u8; 16], 1),
                Some(std::net::IpAddr::V4(ip)) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&ip.octets());
                    (libc::AF_INET as u16, a, 0)
                }
                Some(std::net::IpAddr::V6(ip)) => (libc::AF_INET6 as u16, ip.octets(), 0),
            };
            let op = match rule.op {
                NetOp::Connect => NET_CONNECT,
                NetOp::Bind => NET_BIND,
            };
            // An IPv4 address is also allowed in its IPv4-mapped IPv6 spelling: the same
            // destination, reached through an IPv6 socket.
            let mut keys: Vec<(u16, [u8; 16])> = if any_addr == 1 {
                vec![(libc::AF_INET as u16, addr), (libc::AF_INET6 as u16, addr)]
            } else {
                vec![(family, addr)]
            };
            if let Some(std::net::IpAddr::V4(ip)) = rule.addr {
                keys.push((libc::AF_INET6 as u16, ip.to_ipv6_mapped().octets()));
            }
            for (family, addr) in keys {
                let key = NetKey { cgroup_id, op, family, port: rule.port, addr, any_addr, _pad: 0 };
                self.net.insert(key, 1, 0).map_err(setup("adding a network rule"))?;
            }
        }
        let mountinfo = if plan.unix_sockets.is_empty() {
            String::new()
        } else {
            fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
        };
        for p in &plan.unix_sockets {
            // The socket file as the kernel names it: the device of its filesystem's superblock
            // (major << 20 | minor; from the mount table, since stat shows a btrfs subvolume's
            // own) and its inode. Gone since the plan: nothing to allow.
            let Ok(md) = fs::metadata(p) else { continue };
            use std::os::unix::fs::MetadataExt;
            let (major, minor) = agentd_policy::mountinfo::holder_device(&mountinfo, Path::new(p))
                .unwrap_or((libc::major(md.dev()), libc::minor(md.dev())));
            let dev = (u64::from(major) << 20) | u64::from(minor);
            let key = UnixKey { cgroup_id, dev, ino: md.ino() };
            self.unix.insert(key, 1, 0).map_err(setup(format!("adding the net.unix rule for {p}")))?;
        }
        let info = CallInfo {
            mode: match plan.mode {
                AuditMode::Enforce => MODE_ENFORCE,
                AuditMode::Audit => MODE_AUDIT,
            },
            owner: self.owner,
            flags: if plan.net_rules.is_empty() { 0 } else { CALL_NET_RULES }
                | if plan.deny_open.is_empty() { 0 } else { CALL_OPEN_RULES }
                | if plan.deny_write_exec { CALL_DENY_WX } else { 0 }
                | if repeats { 0 } else { CALL_NO_REPEATS },
            armed: 0,
            init_tgid: 0,
            ring: self.slot,
        };
        self.calls.insert(cgroup_id, info, 0).map_err(setup("registering the call"))
    }

    /// Tells the programs the host pid of the call's init, once it runs: its ptrace access to
    /// the tool's processes (the Unix-socket gate taking their sockets) is not recorded.
    pub fn set_init(&mut self, cgroup_id: u64, pid: u32) {
        if let Ok(mut info) = self.calls.get(&cgroup_id, 0) {
            info.init_tgid = pid;
            let _ = self.calls.insert(cgroup_id, info, 0);
        }
    }

    /// The counts of repeated opens of call `cgroup_id` (see `REPEATS`), taken out of the
    /// kernel: read once its processes are gone and its last events drained, so that none
    /// can still change. Each is (the file and thread, how many opens after the recorded one).
    pub fn take_repeats(&mut self, cgroup_id: u64) -> Vec<(RepeatKey, RepeatCount)> {
        // A call with keys has its quota entry, written before the first: without one there
        // is nothing to look for (and the map is not walked).
        if self.repeat_quota.get(&cgroup_id, 0).is_err() {
            return Vec::new();
        }
        let keys: Vec<RepeatKey> =
            self.repeats.keys().filter_map(Result::ok).filter(|k| k.cgroup_id == cgroup_id).collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Ok(c) = self.repeats.get(&k, 0) {
                out.push((k, c));
            }
            let _ = self.repeats.remove(&k);
        }
        let _ = self.repeat_quota.remove(&cgroup_id);
        out
    }

    /// Forgets a call after it ended; returns how many of its events were lost.
    pub fn unregister(&mut self, cgroup_id: u64) -> u64 {
        let _ = self.calls.remove(&cgroup_id);
        let _ = self.take_repeats(cgroup_id);
        let keys: Vec<NetKey> = self.net.keys().filter_map(Result::ok).filter(|k| k.cgroup_id == cgroup_id).collect();
        for k in keys {
            let _ = self.net.remove(&k);
        }
        let keys: Vec<UnixKey> = self.unix.keys().filter_map(Result::ok).filter(|k| k.cgroup_id == cgroup_id).collect();
        for k in keys {
            let _ = self.unix.remove(&k);
        }
        let (mine, others): (Vec<PathKey>, Vec<PathKey>) =
            self.own_paths.iter().partition(|k| k.cgroup_id == cgroup_id);
        for k in &mine {
            let _ = self.paths.remove(k);
        }
        self.own_paths = others;
        let lost = self.lost(cgroup_id);
        let _ = self.lost.remove(&cgroup_id);
        self.deactivate(cgroup_id);
        lost
    }

    /// Events of the call lost so far (ring buffer full).
    pub fn lost(&self, cgroup_id: u64) -> u64 {
        self.lost.get(&cgroup_id, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// The fd to poll for events: ready when the programs ask to be read (a filling ring),
    /// not for every record. A caller must also [`Bpf::drain`] on a timer (the runner's
    /// tick): a trickle of events never wakes it.
    pub fn wake_fd(&self) -> RawFd {
        self.ring.wake_fd()
    }

    /// Hands every pending event of the call `cgroup_id` to `f`, and drops the rest (events
    /// of calls whose supervisor died before reading them). At most `limit` events per call,
    /// so that a flood cannot keep the caller here forever.
    pub fn drain(&mut self, cgroup_id: u64, limit: usize, mut f: impl FnMut(agentd_ebpf_common::Event)) -> usize {
        self.ring.consume(limit, |record| {
            if let Some(ev) = sys::read_event(record).filter(|ev| ev.cgroup_id == cgroup_id) {
                f(ev);
            }
        })
    }
}

/// Finds the calls whose supervisor was killed before it could unregister them: their
/// owner's lock file is gone or free. A live supervisor holds its lock, so its calls (even one
/// registered a moment ago) are never touched. A call's cgroup is a directory under
/// `cgroup_parent` whose inode number is its id. Those whose cgroup is gone are forgotten
/// here; those whose cgroup is still there are left in [`Bpf::orphans`], for the caller to
/// end their processes and cgroups, then unregister. Lock files of dead owners are removed.
fn sweep_dead_calls(bpf: &mut Bpf, cgroup_parent: &Path) {
    use std::os::unix::fs::MetadataExt;
    // Keys first, directories second: a call made in between is seen as live.
    let candidates: Vec<(u64, u32)> = bpf.calls.iter().filter_map(Result::ok).map(|(id, i)| (id, i.owner)).collect();
    let own = bpf.owner;
    let mut alive: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
    let mut is_alive = |owner: u32| *alive.entry(owner).or_insert_with(|| owner == own || owner_alive(owner));
    let abandoned: Vec<u64> = candidates.into_iter().filter(|(_, owner)| !is_alive(*owner)).map(|(id, _)| id).collect();
    remove_dead_owner_locks(own);
    if abandoned.is_empty() {
        return;
    }
    // Only now the directories (a stat each): most runs find no call abandoned.
    let dirs: std::collections::HashMap<u64, String> = fs::read_dir(cgroup_parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let ino = e.metadata().ok().filter(|m| m.is_dir())?.ino();
            Some((ino, e.file_name().to_string_lossy().into_owned()))
        })
        .collect();
    let (orphans, dead): (Vec<u64>, Vec<u64>) = abandoned.into_iter().partition(|id| dirs.contains_key(id));
    bpf.orphans = orphans.iter().map(|id| (*id, dirs[id].clone())).collect();
    // Counts of calls whose supervisor died are gone with their unread events. The map is
    // walked only if one of them has keys there (a quota entry says so).
    let counted: Vec<u64> = dead.iter().copied().filter(|id| bpf.repeat_quota.get(id, 0).is_ok()).collect();
    if !counted.is_empty() {
        let dead_repeats: Vec<RepeatKey> =
            bpf.repeats.keys().filter_map(Result::ok).filter(|k| counted.contains(&k.cgroup_id)).collect();
        for k in &dead_repeats {
            let _ = bpf.repeats.remove(k);
        }
        for id in &counted {
            let _ = bpf.repeat_quota.remove(id);
        }
    }
    let (calls, net, paths, lost) = (&mut bpf.calls, &mut bpf.net, &mut bpf.paths, &mut bpf.lost);
    for id in &dead {
        let _ = calls.remove(id);
        let _ = lost.remove(id);
    }
    let dead_rules: Vec<NetKey> = net.keys().filter_map(Result::ok).filter(|k| dead.contains(&k.cgroup_id)).collect();
    for k in &dead_rules {
        let _ = net.remove(k);
    }
    let dead_paths: Vec<PathKey> =
        paths.keys().filter_map(Result::ok).filter(|k| dead.contains(&k.cgroup_id)).collect();
    for k in &dead_paths {
        let _ = paths.remove(k);
    }
    let dead_unix: Vec<UnixKey> =
        bpf.unix.keys().filter_map(Result::ok).filter(|k| dead.contains(&k.cgroup_id)).collect();
    for k in &dead_unix {
        let _ = bpf.unix.remove(k);
    }
    if !dead.is_empty() {
        warn!(calls = dead.len(), "removed BPF entries of calls whose supervisor died");
    }
}

/// Rings nobody holds that the idle detacher keeps, so that the next supervisors need not add
/// theirs to `RINGS` (4 MiB of kernel memory each).
pub const KEPT_RINGS: usize = 2;

/// Rings the idle detacher frees at most at each pass (each removal waits for an RCU grace
/// period); the next pass frees more.
const FREED_PER_PASS: usize = 64;

/// The lock file of ring slot `slot` of this build, held by the supervisor using that ring.
/// Never removed while the build's pins are there: a lock on a file that was unlinked and
/// made again would not exclude a holder of the new one.
fn ring_lock_path(slot: u32) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{RING_LOCK_PREFIX}{}-{slot}.lock", object_hash()))
}

/// The pin of ring slot `slot` under this build's pins `dir`, as the kernel takes a path.
fn ring_pin(dir: &Path, slot: u32) -> (PathBuf, std::ffi::CString) {
    use std::os::unix::ffi::OsStrExt;
    let pin = dir.join("rings").join(slot.to_string());
    let c = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap_or_default();
    (pin, c)
}

/// Takes the first ring slot nobody holds, and its ring: the pinned one, or a new one added
/// to `RINGS` and pinned (the only time a supervisor updates the map of maps).
fn claim_ring(dir: &Path, rings: &mut HashMap<MapData, u32, u32>) -> Result<(u32, File, OwnedFd), BpfError> {
    use std::os::fd::{AsFd, AsRawFd};
    let pins = dir.join("rings");
    fs::create_dir_all(&pins).map_err(setup(format!("creating {}", pins.display())))?;
    for slot in 0..RING_SLOTS {
        // A lock that cannot be taken at all (not a file?) is a slot skipped, not a refusal.
        let Ok(Some(lock)) = lock_file(ring_lock_path(slot), Duration::ZERO) else { continue };
        let (pin, pin_c) = ring_pin(dir, slot);
        if let Ok(fd) = sys::bpf_obj_get(&pin_c) {
            // The pinned ring is the one `RINGS` has for the slot, unless a detacher was
            // killed between unpinning and removing it (then it is put back).
            let id = sys::bpf_obj_id(fd.as_fd()).ok();
            if id.is_some() && rings.get(&slot, 0).ok() == id {
                return Ok((slot, lock, fd));
            }
            rings
                .insert(slot, fd.as_raw_fd() as u32, 0)
                .map_err(setup("putting an event ring buffer back in RINGS"))?;
            return Ok((slot, lock, fd));
        }
        let fd = load::new_ring()?;
        rings.insert(slot, fd.as_raw_fd() as u32, 0).map_err(setup("adding an event ring buffer to RINGS"))?;
        // Something that is not a ring (it cannot be opened as one): replaced.
        let _ = fs::remove_file(&pin);
        sys::bpf_obj_pin(fd.as_fd(), &pin_c).map_err(setup(format!("pinning {}", pin.display())))?;
        tracing::debug!(slot, "added an event ring buffer");
        return Ok((slot, lock, fd));
    }
    Err(BpfError::Setup {
        what: "taking an event ring buffer".into(),
        source: format!("all {RING_SLOTS} are held by running agentd processes").into(),
    })
}

/// Frees rings nobody holds, but the first [`KEPT_RINGS`] of them (and at most
/// [`FREED_PER_PASS`]): run by the idle detacher once no call runs. Unpinned first, then
/// removed from `RINGS`: a detacher killed in between leaves an entry that the slot's next
/// holder replaces, never a pin that `RINGS` does not have. Returns how many.
fn free_idle_rings(dir: &Path) -> usize {
    let Ok(data) = MapData::from_pin(dir.join("maps").join("RINGS")) else { return 0 };
    let Ok(mut rings) = HashMap::<MapData, u32, u32>::try_from(Map::HashMap(data)) else { return 0 };
    let mut slots: Vec<u32> = fs::read_dir(dir.join("rings"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .collect();
    slots.sort_unstable();
    let (mut kept, mut freed) = (0, 0);
    for slot in slots {
        if freed >= FREED_PER_PASS {
            break;
        }
        let Ok(Some(_held)) = lock_file(ring_lock_path(slot), Duration::ZERO) else { continue };
        if kept < KEPT_RINGS {
            kept += 1;
            continue;
        }
        let (pin, _) = ring_pin(dir, slot);
        if fs::remove_file(&pin).is_ok() {
            let _ = rings.remove(&slot);
            freed += 1;
        }
    }
    freed
}

/// The lock file a supervisor holds while it lives.
fn owner_lock_path(owner: u32) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("owner-{owner:08x}.lock"))
}

/// Whether the supervisor `owner` still holds its lock.
fn owner_alive(owner: u32) -> bool {
    let path = owner_lock_path(owner);
    if !path.exists() {
        return false;
    }
    // Taking the lock means nobody holds it; dropping the file releases it again.
    !matches!(lock_file(path, Duration::ZERO), Ok(Some(_)))
}

/// Removes the lock files of supervisors that are gone (free locks), other than `own`.
fn remove_dead_owner_locks(own: u32) {
    for entry in fs::read_dir(LOCK_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("owner-").and_then(|n| n.strip_suffix(".lock")) else { continue };
        if u32::from_str_radix(id, 16).is_ok_and(|id| id != own) {
            if let Ok(Some(_held)) = lock_file(entry.path(), Duration::ZERO) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// A fresh owner id, and its lock, held for this process's life.
fn claim_owner() -> Result<(u32, File), BpfError> {
    loop {
        let mut b = [0u8; 4];
        sys::getrandom(&mut b).map_err(setup("choosing an owner id"))?;
        let owner = u32::from_ne_bytes(b);
        let path = owner_lock_path(owner);
        if owner == 0 || path.exists() {
            continue;
        }
        let Some(f) = lock_file(path.clone(), Duration::ZERO)? else { continue };
        // Between creating the file and locking it, another supervisor's sweep may have
        // found it free and removed it: a lock on a removed file tells no one we are alive,
        // and our calls would later be taken for orphans. Keep it only if it is still there.
        use std::os::unix::fs::MetadataExt;
        let same = match (f.metadata(), fs::symlink_metadata(&path)) {
            (Ok(held), Ok(named)) => held.ino() == named.ino() && held.dev() == named.dev(),
            _ => false,
        };
        if same {
            return Ok((owner, f));
        }
    }
}

/// The command that runs [`detach_if_idle`] (`agentd __bpf-idle`), set by the binary.
static IDLE_COMMAND: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Tells this process how to start the idle detacher: `program __bpf-idle`. A process that
/// does not (a library user) leaves the programs attached after its calls, until another
/// supervisor's detacher runs.
pub fn set_idle_detacher(program: PathBuf) {
    let _ = IDLE_COMMAND.set(program);
}

/// How long the idle detacher waits before it looks: calls that follow each other closely
/// then keep the programs attached. `AGENTD_BPF_IDLE_MS` sets it (at most a minute).
pub fn idle_grace() -> Duration {
    let ms = std::env::var("AGENTD_BPF_IDLE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000u64);
    Duration::from_millis(ms.min(60_000))
}

/// Idle detachers this process started and has not reaped yet. Reaped without waiting at
/// the next start (no thread: sandboxes are spawned only from a single-threaded process).
static IDLE_CHILDREN: std::sync::Mutex<Vec<std::process::Child>> = std::sync::Mutex::new(Vec::new());

fn spawn_idle_detacher() {
    let Some(program) = IDLE_COMMAND.get() else { return };
    let mut children = IDLE_CHILDREN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    children.retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    // The idle lock's time is when a call last ended: a detacher waits until a grace after
    // it. One is waiting already (it holds the lock): it sees this call's end too, and no
    // process needs starting (a one-shot `agentd exec` would otherwise start one per call,
    // and each would detach between two calls a second apart, for the next to attach again).
    match idle_stamp() {
        Ok(false) => return,
        Ok(true) => {}
        Err(e) => warn!(error = %e, "could not mark the end of a call for the idle BPF detacher"),
    }
    // A process group of its own: a Ctrl-C to the supervisor's group does not take it.
    let child = std::process::Command::new(program)
        .arg("__bpf-idle")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match child {
        Ok(c) => children.push(c),
        Err(e) => warn!(error = %e, program = %program.display(), "could not start the idle BPF detacher"),
    }
}

/// Marks the end of a call on the idle lock (its modification time); true when no detacher
/// holds the lock, so one must be started.
fn idle_stamp() -> Result<bool, BpfError> {
    use std::os::fd::AsRawFd;
    let path = idle_lock();
    let what = || format!("marking a call's end on {}", path.display());
    let f = load::open_lock(&path)?;
    f.set_modified(std::time::SystemTime::now()).map_err(setup(what()))?;
    // Taken: no detacher holds it. Closing the file lets go of it for the one started next.
    sys::flock(f.as_raw_fd(), true).map_err(setup(what()))
}

/// What [`detach_if_idle`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// A call was running: nothing was detached.
    Busy,
    /// Another detacher is waiting: it will detach.
    Another,
    /// No pins of this build.
    NotLoaded,
    /// This many links were detached, taking this long.
    Detached(usize, Duration),
}

/// Detaches the programs that act on every process of the host once no call has run for
/// `grace`: the detacher started when a call ends (`agentd __bpf-idle`) holds the idle lock,
/// so that one waits at a time, and waits until `grace` after the last call's end (the idle
/// lock's time, which every call's end moves), then detaches if no call runs anywhere
/// (nobody holds `active.lock`), or waits again. With no grace, it looks once: `Busy` if a
/// call runs.
pub fn detach_if_idle(grace: Duration) -> Result<Idle, BpfError> {
    let dir = pins_dir();
    if OBJECT.is_empty() || !dir.exists() {
        return Ok(Idle::NotLoaded);
    }
    load::private_dirs()?;
    let idle = if grace.is_zero() {
        None
    } else {
        // A moment's wait: a supervisor marking a call's end holds it for a few syscalls.
        match lock_file(idle_lock(), Duration::from_millis(50))? {
            Some(l) => Some(l),
            None => return Ok(Idle::Another),
        }
    };
    loop {
        let ended = idle.as_ref().and_then(|f| f.metadata().ok()?.modified().ok()?.elapsed().ok());
        if let Some(wait) = ended.and_then(|since| grace.checked_sub(since)).filter(|w| !w.is_zero()) {
            std::thread::sleep(wait);
            continue;
        }
        if !dir.exists() {
            return Ok(Idle::NotLoaded);
        }
        let Some(_active) = lock_file(Path::new(LOCK_DIR).join(ACTIVE_LOCK), Duration::ZERO)? else {
            if grace.is_zero() {
                return Ok(Idle::Busy);
            }
            // A call runs: its end moves the idle lock's time, and this waits on (looking
            // at most ten times a second, whatever the grace).
            std::thread::sleep(grace.max(Duration::from_millis(100)));
            continue;
        };
        let _guard = held(LOADER_LOCK, false)?;
        // The idle lock goes before `active.lock`: a call that starts once this detached
        // ends after, finds the idle lock free, and starts a detacher of its own.
        drop(idle);
        let start = std::time::Instant::now();
        let n = load::detach_switched(&dir);
        let took = start.elapsed();
        // Rings are freed without the locks: the slot locks alone keep their holders' rings,
        // and each removal's RCU wait must not hold up calls that start now.
        drop((_guard, _active));
        let freed = free_idle_rings(&dir);
        if freed > 0 {
            tracing::debug!(freed, "freed event ring buffers nobody holds");
        }
        return Ok(Idle::Detached(n, took));
    }
}

/// The idle lock of this build's programs (a detacher detaches its own build's): its time is
/// when a call of this build last ended.
fn idle_lock() -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{IDLE_LOCK_PREFIX}{}.lock", object_hash()))
}

/// The first bytes of the programs' hash, which names their pins (computed once).
fn object_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| Sha256::digest(OBJECT).iter().take(8).map(|b| format!("{b:02x}")).collect()).clone()
}

/// Where this build's programs are pinned.
fn pins_dir() -> PathBuf {
    Path::new(BPFFS).join("agentd").join(object_hash())
}

/// How many links that act on every process of the host (LSM hooks, syscall tracepoints,
/// `sched_process_exec`) are attached now; `None` when this build's programs are not loaded.
pub fn attached_host_wide() -> Option<usize> {
    let links = fs::read_dir(pins_dir().join("links")).ok()?;
    Some(links.flatten().filter(|e| load::is_switched_link(&e.file_name().to_string_lossy())).count())
}

/// The lock `name` in [`LOCK_DIR`], taken (shared or not) within [`lock_wait`], or an error
/// naming who holds it.
fn held(name: &str, shared: bool) -> Result<File, BpfError> {
    let path = Path::new(LOCK_DIR).join(name);
    let lock =
        if shared { load::lock_shared(path.clone(), lock_wait())? } else { lock_file(path.clone(), lock_wait())? };
    lock.ok_or_else(|| BpfError::LockHeld { holder: lock_holder(&path), path, waited: lock_wait() })
}

fn lock_wait() -> std::time::Duration {
    let ms = std::env::var("AGENTD_LOCK_WAIT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(60_000u64);
    std::time::Duration::from_millis(ms.min(60_000))
}

/// Why the pinned layer is the fallback: what its loader found, or what the kernel says now.
fn fallback_note(note_file: &Path) -> String {
    match fs::read_to_string(note_file) {
        Ok(n) if !n.trim().is_empty() => n.trim().to_string(),
        _ => match load::lsm_support() {
            Err(why) => why,
            Ok(_) => "the pinned programs are the fallback layer (remove /sys/fs/bpf/agentd to reload)".into(),
        },
    }
}
