//! The BPF layer: agentd's kernel programs, loaded once and kept pinned under
//! `/sys/fs/bpf/agentd/<object hash>/`, so later `agentd exec` runs (and the daemon) reuse
//! them instead of loading again.
//!
//! On kernels without BPF LSM (like the build hosts) the fallback programs run:
//! `cgroup/connect4|6` and `cgroup/bind4|6` on agentd's parent v2 cgroup allow exactly the
//! manifest's `host:port` pairs, and `raw_tracepoint/sys_enter` records exec and open
//! attempts. Each program acts only on tasks whose cgroup id is a registered call.
//!
//! Events go to one of `SLOTS` ring buffers; each agentd process claims a slot with a lock
//! file, so concurrent supervisors never read each other's events.

mod events;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use agentd_ebpf_common::{CallInfo, NetKey, CALL_NET_RULES, MODE_AUDIT, MODE_ENFORCE, NET_BIND, NET_CONNECT, SLOTS};
use agentd_policy::{AuditMode, BpfPlan, HostAddr, NetOp};
use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use aya::programs::links::FdLink;
use aya::programs::{CgroupSockAddr, RawTracePoint};
use aya::EbpfLoader;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use self::events::to_entry;
use crate::sys;

/// The compiled programs (empty when agentd was built without them).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agentd.bpf.o"));

const BPFFS: &str = "/sys/fs/bpf";

/// Size of each event ring buffer, as the programs declare it.
const RING_BYTES: usize = 4 << 20;
const LOCK_DIR: &str = "/run/agentd";

/// The cgroup socket programs and their attach types (`enum bpf_attach_type`).
const SOCK_PROGRAMS: [(&str, u32); 4] = [("bind4", 8), ("bind6", 9), ("connect4", 10), ("connect6", 11)];

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
    /// Every event slot is taken by other supervisors.
    #[error("all {SLOTS} BPF event slots are in use by other agentd processes")]
    NoSlot,
}

fn setup<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> BpfError {
    let what = what.into();
    move |e| BpfError::Setup { what, source: Box::new(e) }
}

/// The loaded layer, with this process's event slot.
pub struct Bpf {
    calls: HashMap<MapData, u64, CallInfo>,
    net: HashMap<MapData, NetKey, u8>,
    lost: PerCpuHashMap<MapData, u64, u64>,
    ring: sys::Ring,
    slot: u32,
    _slot_lock: File,
}

impl std::fmt::Debug for Bpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bpf").field("slot", &self.slot).finish_non_exhaustive()
    }
}

/// Program names active in the fallback layer, for `enforcement.bpf`.
pub const FALLBACK_PROGRAMS: &[&str] =
    &["cgroup/connect4", "cgroup/connect6", "cgroup/bind4", "cgroup/bind6", "raw_tracepoint/sys_enter"];

impl Bpf {
    /// Loads agentd's programs (or reuses the pinned ones) with the cgroup programs attached
    /// to `cgroup_parent`, and claims an event slot.
    pub fn open(cgroup_parent: &Path) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        ensure_bpffs()?;
        let hash: String = Sha256::digest(OBJECT).iter().take(8).map(|b| format!("{b:02x}")).collect();
        let base = Path::new(BPFFS).join("agentd");
        let dir = base.join(&hash);
        fs::create_dir_all(LOCK_DIR).map_err(setup(format!("creating {LOCK_DIR}")))?;
        let lock = lock_file(Path::new(LOCK_DIR).join("bpf.lock"), false)?.ok_or(BpfError::NoSlot)?;
        let links = dir.join("links");
        let complete = SOCK_PROGRAMS.iter().map(|(n, _)| *n).chain(["sys_enter"]).all(|n| links.join(n).exists());
        if !complete {
            remove_stale(&base, &hash);
            load_and_pin(&dir, cgroup_parent)?;
            info!(pins = %dir.display(), "loaded and pinned agentd's BPF programs");
        }
        drop(lock);
        let maps = dir.join("maps");
        let open =
            |name: &str| MapData::from_pin(maps.join(name)).map_err(setup(format!("opening the pinned map {name}")));
        let calls = HashMap::try_from(Map::HashMap(open("CALLS")?)).map_err(setup("CALLS"))?;
        let net = HashMap::try_from(Map::HashMap(open("NET_ALLOW")?)).map_err(setup("NET_ALLOW"))?;
        let lost = PerCpuHashMap::try_from(Map::PerCpuHashMap(open("LOST")?)).map_err(setup("LOST"))?;

        let (slot, slot_lock) = claim_slot()?;
        // Events a crashed owner of this slot never read belong to calls that are gone; they
        // are skipped by cgroup id when drained.
        let ring_map = open(&format!("EVENTS{slot}"))?;
        let ring_fd = ring_map.fd().as_fd().try_clone_to_owned().map_err(setup("duplicating the ring buffer fd"))?;
        let ring = sys::Ring::open(ring_fd, RING_BYTES).map_err(setup("mapping the ring buffer"))?;
        let mut bpf = Self { calls, net, lost, ring, slot, _slot_lock: slot_lock };
        sweep_dead_calls(&mut bpf, cgroup_parent);
        Ok(bpf)
    }

    /// Registers a call before its tool runs: from now on the programs act on `cgroup_id`.
    pub fn register(&mut self, cgroup_id: u64, plan: &BpfPlan) -> Result<(), BpfError> {
        for rule in &plan.net_rules {
            let (family, addr, any_addr) = match rule.grant.addr {
                HostAddr::Any => (0, [0u8; 16], 1),
                HostAddr::Ip(std::net::IpAddr::V4(ip)) => {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&ip.octets());
                    (libc::AF_INET as u16, a, 0)
                }
                HostAddr::Ip(std::net::IpAddr::V6(ip)) => (libc::AF_INET6 as u16, ip.octets(), 0),
            };
            let op = match rule.op {
                NetOp::Connect => NET_CONNECT,
                NetOp::Bind => NET_BIND,
            };
            let families: &[u16] =
                if any_addr == 1 { &[libc::AF_INET as u16, libc::AF_INET6 as u16] } else { &[family] };
            for family in families {
                let key =
                    NetKey { cgroup_id, op, family: *family, port: rule.grant.port.get(), addr, any_addr, _pad: 0 };
                self.net.insert(key, 1, 0).map_err(setup("adding a network rule"))?;
            }
        }
        let info = CallInfo {
            mode: match plan.mode {
                AuditMode::Enforce => MODE_ENFORCE,
                AuditMode::Audit => MODE_AUDIT,
            },
            slot: self.slot,
            flags: if plan.net_rules.is_empty() { 0 } else { CALL_NET_RULES },
            _pad: 0,
        };
        self.calls.insert(cgroup_id, info, 0).map_err(setup("registering the call"))
    }

    /// Forgets a call after it ended; returns how many of its events were lost.
    pub fn unregister(&mut self, cgroup_id: u64) -> u64 {
        let _ = self.calls.remove(&cgroup_id);
        let keys: Vec<NetKey> = self.net.keys().filter_map(Result::ok).filter(|k| k.cgroup_id == cgroup_id).collect();
        for k in keys {
            let _ = self.net.remove(&k);
        }
        let lost = self.lost(cgroup_id);
        let _ = self.lost.remove(&cgroup_id);
        lost
    }

    /// Events of the call lost so far (ring buffer full).
    pub fn lost(&self, cgroup_id: u64) -> u64 {
        self.lost.get(&cgroup_id, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// The fd to poll for events.
    pub fn ring_fd(&self) -> RawFd {
        self.ring.fd()
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

/// Removes the entries of calls whose supervisor was killed before it could unregister them:
/// their cgroup is gone and their slot is free. A live supervisor holds its slot's lock, so
/// its calls (even one registered a moment ago) are never touched. A call's cgroup is a
/// directory under `cgroup_parent` whose inode number is its id.
fn sweep_dead_calls(bpf: &mut Bpf, cgroup_parent: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (calls, net, lost, own_slot) = (&mut bpf.calls, &mut bpf.net, &mut bpf.lost, bpf.slot);
    // Keys first, directories second: a call made in between is seen as live.
    let candidates: Vec<(u64, u32)> = calls
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, info)| info.slot != own_slot)
        .map(|(id, i)| (id, i.slot))
        .collect();
    let live: std::collections::HashSet<u64> = fs::read_dir(cgroup_parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok().filter(|m| m.is_dir()).map(|m| m.ino()))
        .collect();
    let slot_free = |slot: u32| matches!(lock_file(slot_lock_path(slot), true), Ok(Some(_)));
    let dead: Vec<u64> =
        candidates.into_iter().filter(|(id, slot)| !live.contains(id) && slot_free(*slot)).map(|(id, _)| id).collect();
    for id in &dead {
        let _ = calls.remove(id);
        let _ = lost.remove(id);
    }
    let dead_rules: Vec<NetKey> = net.keys().filter_map(Result::ok).filter(|k| dead.contains(&k.cgroup_id)).collect();
    for k in &dead_rules {
        let _ = net.remove(k);
    }
    if !dead.is_empty() {
        warn!(calls = dead.len(), "removed BPF entries of calls whose supervisor died");
    }
}

fn ensure_bpffs() -> Result<(), BpfError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = crate::host::mounts_below(&mountinfo, Path::new(BPFFS))
        .iter()
        .any(|(point, fstype)| point == Path::new(BPFFS) && fstype == "bpf");
    if mounted {
        return Ok(());
    }
    fs::create_dir_all(BPFFS).map_err(setup(format!("creating {BPFFS}")))?;
    let path = CString::new(BPFFS).unwrap_or_default();
    sys::mount_bpffs(&path).map_err(setup(format!("mounting bpffs on {BPFFS}")))
}

/// Opens and locks `path`; `Ok(None)` if `nonblocking` and someone else holds it.
fn lock_file(path: PathBuf, nonblocking: bool) -> Result<Option<File>, BpfError> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&path)
        .map_err(setup(format!("opening {}", path.display())))?;
    match sys::flock(f.as_raw_fd(), nonblocking) {
        Ok(true) => Ok(Some(f)),
        Ok(false) => Ok(None),
        Err(e) => Err(setup(format!("locking {}", path.display()))(e)),
    }
}

/// The lock file a supervisor holds while it owns event slot `slot`.
fn slot_lock_path(slot: u32) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("events-{slot}.lock"))
}

fn claim_slot() -> Result<(u32, File), BpfError> {
    for slot in 0..SLOTS {
        if let Some(f) = lock_file(slot_lock_path(slot), true)? {
            return Ok((slot, f));
        }
    }
    Err(BpfError::NoSlot)
}

/// Unpins programs and maps of other builds of agentd (their links detach with the pins).
fn remove_stale(base: &Path, keep: &str) {
    for entry in fs::read_dir(base).into_iter().flatten().flatten() {
        if entry.file_name().as_bytes() != keep.as_bytes() {
            let _ = fs::remove_dir_all(entry.path());
            warn!(pins = %entry.path().display(), "removed BPF pins of another agentd build");
        }
    }
    let _ = fs::remove_dir_all(base.join(keep));
}

fn load_and_pin(dir: &Path, cgroup_parent: &Path) -> Result<(), BpfError> {
    let maps = dir.join("maps");
    let links = dir.join("links");
    for d in [&maps, &links] {
        fs::create_dir_all(d).map_err(setup(format!("creating {}", d.display())))?;
    }
    let mut ebpf = EbpfLoader::new().map_pin_path(&maps).load(OBJECT).map_err(setup("loading agentd's BPF object"))?;
    let cgroup = File::open(cgroup_parent).map_err(setup(format!("opening {}", cgroup_parent.display())))?;
    for (name, attach_type) in SOCK_PROGRAMS {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| BpfError::Setup {
                what: format!("the object has no program {name}"),
                source: "missing".into(),
            })?
            .try_into()
            .map_err(setup(format!("program {name}")))?;
        prog.load().map_err(setup(format!("verifying {name}")))?;
        let prog_fd = prog.fd().map_err(setup(format!("program {name}")))?;
        let link = sys::bpf_link_create(prog_fd.as_fd(), cgroup.as_fd(), attach_type)
            .map_err(setup(format!("attaching {name} to {}", cgroup_parent.display())))?;
        let pin = CString::new(links.join(name).as_os_str().as_bytes()).unwrap_or_default();
        sys::bpf_obj_pin(link.as_fd(), &pin).map_err(setup(format!("pinning {name}")))?;
    }
    let prog: &mut RawTracePoint = ebpf
        .program_mut("sys_enter")
        .ok_or_else(|| BpfError::Setup {
            what: "the object has no program sys_enter".into(),
            source: "missing".into(),
        })?
        .try_into()
        .map_err(setup("program sys_enter"))?;
    prog.load().map_err(setup("verifying sys_enter"))?;
    let id = prog.attach("sys_enter").map_err(setup("attaching sys_enter"))?;
    let link = FdLink::from(prog.take_link(id).map_err(setup("sys_enter link"))?);
    link.pin(links.join("sys_enter")).map_err(setup("pinning sys_enter"))?;
    Ok(())
}
