//! Loading agentd's programs once and pinning them, choosing the layer the kernel supports.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupDevice, CgroupSockAddr, Lsm, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use tracing::{info, warn};

use agentd_ebpf_common::syscalls::{entered, exit_only, TRACED};

use super::btf::Btf;
use super::{setup, BpfError, Layer, OBJECT};
use crate::sys;

pub(super) const BPFFS: &str = "/sys/fs/bpf";
/// agentd's runtime directory. The daemon's socket is here too, so others may enter it.
pub(super) const RUN_DIR: &str = "/run/agentd";
/// Lock files and the loader's notes: root's alone, so that no other user can take a lock
/// and stall every call.
pub(super) const LOCK_DIR: &str = "/run/agentd/lock";
/// The loader's lock in [`LOCK_DIR`]: held while programs are loaded, attached or detached.
pub(super) const LOADER_LOCK: &str = "bpf.lock";
/// The lock every supervisor with a running call holds shared, in [`LOCK_DIR`].
pub(super) const ACTIVE_LOCK: &str = "active.lock";
/// The lock the one waiting idle detacher of a build holds, in [`LOCK_DIR`], named by the
/// build's programs (`idle-<hash>.lock`); its modification time is when a call of that build
/// last ended.
pub(super) const IDLE_LOCK_PREFIX: &str = "idle-";
/// Ring slot locks: `ring-<hash>-<slot>.lock`, held by the supervisor using that build's ring
/// of that slot.
pub(super) const RING_LOCK_PREFIX: &str = "ring-";
const SECURITYFS: &str = "/sys/kernel/security";
const TRACEFS: &str = "/sys/kernel/tracing";
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The cgroup socket programs of the fallback and their attach types (`enum bpf_attach_type`).
const SOCK_PROGRAMS: [(&str, u32); 4] = [("bind4", 8), ("bind6", 9), ("connect4", 10), ("connect6", 11)];

/// cgroup programs both layers attach: datagrams sent to an address (the LSM layer has no
/// sendmsg hook) and device access.
const COMMON_SOCK_PROGRAMS: [(&str, u32); 2] = [("sendmsg4", 14), ("sendmsg6", 15)];
const DEVICE_PROGRAM: (&str, u32) = ("devices", 6);

/// The LSM programs; each is named after its hook.
pub const LSM_PROGRAMS: [&str; 12] = [
    "bprm_check_security",
    "mmap_file",
    "file_mprotect",
    "file_open",
    "socket_connect",
    "socket_bind",
    "unix_stream_connect",
    "unix_may_send",
    "ptrace_access_check",
    "task_kill",
    "sb_mount",
    "move_mount",
];

/// The LSM layer's `path_*` hooks, which name the objects of file-system changes from the
/// kernel. The kernel has them with `CONFIG_SECURITY_PATH` (Debian's, Ubuntu's and RHEL's
/// kernels do); without, changes are named as on the fallback.
pub const PATH_PROGRAMS: [&str; 10] = [
    "path_unlink",
    "path_rmdir",
    "path_mkdir",
    "path_mknod",
    "path_symlink",
    "path_link",
    "path_rename",
    "path_truncate",
    "path_chmod",
    "path_chown",
];

/// The fallback's cgroup programs, attached for good (they act on agentd's cgroups alone).
pub const FALLBACK_PROGRAMS: [&str; 4] = ["connect4", "connect6", "bind4", "bind6"];

/// The fallback's program for each new program image.
pub const EXEC_PROGRAM: &str = "sched_process_exec";

/// The syscalls whose `dir` (`enter` or `exit`) tracepoints the per-syscall programs are
/// attached to.
fn traced(dir: &str) -> impl Iterator<Item = &'static str> {
    let exit = dir == "exit";
    exit_only().filter(move |_| exit).chain(TRACED.iter().filter(move |s| exit || entered(s))).map(|s| s.tracepoint)
}

/// The per-syscall tracepoint programs: pinned (under `progs/`) where the kernel can pin such
/// links (Linux 5.15 and later).
const PER_SYSCALL_PROGRAMS: [(&str, &str); 2] = [("enter", "traced_enter"), ("exit", "traced_exit")];

/// The raw `sys_enter`/`sys_exit` pair, the fallback's syscall hook before Linux 5.15.
const RAW_SYSCALL_PROGRAMS: [&str; 2] = ["sys_enter", "sys_exit"];

/// How the syscall programs are attached, from the pinned programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallHook {
    /// `syscalls/sys_enter_*` and `sys_exit_*` of [`TRACED`] only (and the exits of
    /// [`REFUSED_BY_FILTER`](agentd_ebpf_common::syscalls::REFUSED_BY_FILTER)).
    PerSyscall,
    /// `raw_tracepoint/sys_enter` and `sys_exit`: every syscall of the host runs them.
    Raw,
}

/// The syscall hook whose programs are pinned in `dir`.
pub(super) fn syscall_hook(dir: &Path) -> Option<SyscallHook> {
    let progs = dir.join("progs");
    if PER_SYSCALL_PROGRAMS.iter().all(|(_, n)| progs.join(n).exists()) {
        Some(SyscallHook::PerSyscall)
    } else if RAW_SYSCALL_PROGRAMS.iter().all(|n| progs.join(n).exists()) {
        Some(SyscallHook::Raw)
    } else {
        None
    }
}

/// Program names both layers attach.
pub const COMMON_PROGRAMS: [&str; 3] = ["sendmsg4", "sendmsg6", "devices"];

/// The layer pinned in `dir`, if its pins are complete: the cgroup programs' links, and the
/// programs that are attached while calls run.
pub(super) fn pinned_layer(dir: &Path) -> Option<Layer> {
    let (links, progs) = (dir.join("links"), dir.join("progs"));
    let cgroup_ok = |own: &[&str]| own.iter().chain(COMMON_PROGRAMS.iter()).all(|n| links.join(n).exists());
    if cgroup_ok(&[]) && LSM_PROGRAMS.iter().all(|n| progs.join(n).exists()) {
        return Some(Layer::Lsm);
    }
    let fallback = cgroup_ok(&FALLBACK_PROGRAMS) && progs.join(EXEC_PROGRAM).exists() && syscall_hook(dir).is_some();
    fallback.then_some(Layer::Fallback)
}

/// Where the loader leaves why it pinned the fallback (bpffs holds only BPF objects).
pub(super) fn note_path(hash: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("bpf-{hash}.note"))
}

/// The kernel offsets the programs need, from the kernel's BTF.
pub(super) fn kernel_offsets() -> Result<agentd_ebpf_common::KernelOffsets, String> {
    let raw = fs::read(KERNEL_BTF).map_err(|e| format!("no kernel BTF at {KERNEL_BTF}: {e}"))?;
    let btf = Btf::parse(&raw).map_err(|e| format!("{KERNEL_BTF}: {e}"))?;
    btf.kernel_offsets().map_err(|e| format!("{KERNEL_BTF}: {e}"))
}

/// Why BPF LSM programs cannot run here, or the kernel offsets they need.
pub(super) fn lsm_support() -> Result<agentd_ebpf_common::KernelOffsets, String> {
    ensure_mounted(SECURITYFS, "securityfs").map_err(|e| format!("cannot read the active LSMs: {e}"))?;
    let lsms = fs::read_to_string(Path::new(SECURITYFS).join("lsm"))
        .map_err(|e| format!("cannot read {SECURITYFS}/lsm: {e}"))?;
    if !lsms.trim().split(',').any(|l| l == "bpf") {
        return Err(format!(
            "the kernel does not run the BPF LSM (active LSMs: {}; boot with lsm=...,bpf)",
            lsms.trim()
        ));
    }
    kernel_offsets()
}

/// Mounts `fstype` on `point` unless something of that type is mounted there.
pub(super) fn ensure_mounted(point: &str, fstype: &str) -> Result<(), BpfError> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = agentd_policy::mountinfo::mounts_below(&mountinfo, Path::new(point))
        .iter()
        .any(|(p, t)| p == Path::new(point) && t == fstype);
    if mounted {
        return Ok(());
    }
    fs::create_dir_all(point).map_err(setup(format!("creating {point}")))?;
    let (path, ty) = (CString::new(point).unwrap_or_default(), CString::new(fstype).unwrap_or_default());
    sys::mount_pseudo(&ty, &path).map_err(setup(format!("mounting {fstype} on {point}")))
}

/// Makes sure [`RUN_DIR`] (0755) and [`LOCK_DIR`] (0700) are directories of ours that no
/// one else can write, tightening modes left by older versions. A directory another user
/// owns, or a symlink in its place, is refused: they could swap agentd's locks.
pub(super) fn private_dirs() -> Result<(), BpfError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    for (dir, mode) in [(RUN_DIR, 0o755), (LOCK_DIR, 0o700)] {
        match fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(setup(format!("creating {dir}"))(e)),
        }
        let md = fs::symlink_metadata(dir).map_err(setup(format!("checking {dir}")))?;
        let me = sys::geteuid();
        let problem = if !md.is_dir() {
            Some("is not a directory (a symlink?)".to_string())
        } else if md.uid() != me {
            Some(format!("is owned by uid {}, not {me}", md.uid()))
        } else {
            None
        };
        if let Some(why) = problem {
            return Err(BpfError::UnsafeDir { dir, why });
        }
        if md.mode() & 0o7777 != mode {
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(setup(format!("chmod {dir}")))?;
        }
    }
    // Event slot locks of older versions: one ring buffer per supervisor replaced them.
    for entry in fs::read_dir(LOCK_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("events-") && name.ends_with(".lock") {
            let _ = fs::remove_file(entry.path());
        }
    }
    // Locks and notes of older versions sat in RUN_DIR, where anyone could lock them.
    for entry in fs::read_dir(RUN_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let legacy = name == "bpf.lock"
            || (name.starts_with("events-") && name.ends_with(".lock"))
            || (name.starts_with("bpf-") && name.ends_with(".note"));
        if legacy && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// Opens (0600, never through a symlink) and locks `path` exclusively, trying until `wait`
/// has passed; `Ok(None)` if someone else still holds it then.
pub(super) fn lock_file(path: PathBuf, wait: std::time::Duration) -> Result<Option<File>, BpfError> {
    lock(path, wait, true)
}

/// [`lock_file`], shared: several holders at once, none while someone holds it exclusively.
pub(super) fn lock_shared(path: PathBuf, wait: std::time::Duration) -> Result<Option<File>, BpfError> {
    lock(path, wait, false)
}

/// Opens (making it if needed, never through a symlink) the lock file `path`, mode 0600.
pub(super) fn open_lock(path: &Path) -> Result<File, BpfError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(setup(format!("opening {}", path.display())))?;
    // A file made by someone else (root's flock(1), an older agentd) keeps its mode otherwise.
    f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(setup(format!("chmod {}", path.display())))?;
    Ok(f)
}

fn lock(path: PathBuf, wait: std::time::Duration, exclusive: bool) -> Result<Option<File>, BpfError> {
    let f = open_lock(&path)?;
    let start = std::time::Instant::now();
    loop {
        let taken = if exclusive { sys::flock(f.as_raw_fd(), true) } else { sys::flock_shared(f.as_raw_fd()) };
        match taken {
            Ok(true) => return Ok(Some(f)),
            Ok(false) if start.elapsed() >= wait => return Ok(None),
            Ok(false) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(e) => return Err(setup(format!("locking {}", path.display()))(e)),
        }
    }
}

/// Who holds the `flock` on `path`, from `/proc/locks`: "pid N (comm, uid U)", or a note
/// that it could not be told.
pub(super) fn lock_holder(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = fs::metadata(path) else { return "an unknown process".into() };
    let (major, minor) = (libc::major(md.dev()), libc::minor(md.dev()));
    let id = format!("{major:02x}:{minor:02x}:{}", md.ino());
    let locks = fs::read_to_string("/proc/locks").unwrap_or_default();
    let pid = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF"; a waiter's line has "->" first.
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&id.as_str())).then(|| f[4].to_string())
    });
    let Some(pid) = pid else { return "an unknown process".into() };
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_else(|| "?".into());
    format!("pid {pid} ({}, uid {uid})", comm.trim())
}

/// Unpins programs and maps of other builds of agentd (their links detach with the pins), but
/// only while no call runs: a running call of another build would lose its hooks. Then the
/// incomplete pins of this build.
pub(super) fn remove_stale(base: &Path, keep: &str) {
    let idle = lock_file(Path::new(LOCK_DIR).join(ACTIVE_LOCK), std::time::Duration::ZERO).ok().flatten();
    for entry in fs::read_dir(base).into_iter().flatten().flatten() {
        if entry.file_name().as_bytes() == keep.as_bytes() {
            continue;
        }
        if idle.is_some() {
            let _ = fs::remove_dir_all(entry.path());
            warn!(pins = %entry.path().display(), "removed BPF pins of another agentd build");
            // Its ring slot locks, but those a process of it still holds.
            let prefix = format!("{RING_LOCK_PREFIX}{}-", entry.file_name().to_string_lossy());
            for lock in fs::read_dir(LOCK_DIR).into_iter().flatten().flatten() {
                let name = lock.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && name.ends_with(".lock") {
                    if let Ok(Some(_held)) = lock_file(lock.path(), std::time::Duration::ZERO) {
                        let _ = fs::remove_file(lock.path());
                    }
                }
            }
        } else {
            warn!(pins = %entry.path().display(), "left the BPF pins of another agentd build: its calls are running");
        }
    }
    let _ = fs::remove_dir_all(base.join(keep));
}

/// Loads and pins the LSM layer where the kernel has it, else the fallback. Returns the layer
/// and, for the fallback, why LSM is not in use.
pub(super) fn load_and_pin(
    dir: &Path,
    cgroup_parent: &Path,
    note_file: &Path,
) -> Result<(Layer, Option<String>), BpfError> {
    let _ = fs::remove_file(note_file);
    let (layer, note) = match lsm_support() {
        Ok(offsets) => match pin_layer(dir, Layer::Lsm, cgroup_parent, offsets) {
            Ok(()) => (Layer::Lsm, None),
            Err(e) => {
                let why = format!(
                    "the kernel lists bpf among its LSMs, but loading agentd's LSM programs failed: {}",
                    agentd_policy::error_chain(&e)
                );
                warn!(error = %why, "falling back to the cgroup and tracepoint programs");
                let _ = fs::remove_dir_all(dir);
                pin_layer(dir, Layer::Fallback, cgroup_parent, offsets)?;
                (Layer::Fallback, Some(why))
            }
        },
        Err(why) => {
            // Without BTF the fallback still records, by the tools' strings alone.
            let offsets = kernel_offsets().unwrap_or_else(|e| {
                warn!(error = %e, "no kernel offsets: the fallback will not name files from the kernel's objects");
                Default::default()
            });
            pin_layer(dir, Layer::Fallback, cgroup_parent, offsets)?;
            (Layer::Fallback, Some(why))
        }
    };
    if let Some(why) = &note {
        fs::write(note_file, why).map_err(setup(format!("writing {}", note_file.display())))?;
    }
    info!(pins = %dir.display(), layer = layer.name(), "loaded and pinned agentd's BPF programs");
    Ok((layer, note))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| BpfError::Setup { what: format!("the object has no program {name}"), source: "missing".into() })?
        .try_into()
        .map_err(setup(format!("program {name}")))
}

/// `enum bpf_map_type` values.
pub(super) const MAP_TYPE_HASH_OF_MAPS: u32 = 13;
pub(super) const MAP_TYPE_RINGBUF: u32 = 27;

/// A ring buffer for one supervisor's events.
pub(super) fn new_ring() -> Result<std::os::fd::OwnedFd, BpfError> {
    sys::bpf_map_create(MAP_TYPE_RINGBUF, 0, 0, agentd_ebpf_common::RING_BYTES, None, "agentd_events")
        .map_err(setup("creating an event ring buffer"))
}

/// Creates and pins `RINGS`, the map from slots to supervisors' ring buffers, before the
/// object is loaded (which then reuses the pin): a map of maps needs a template of its
/// values, which aya 0.13 cannot give.
fn pin_rings(maps: &Path) -> Result<(), BpfError> {
    let template = new_ring()?;
    let slots = agentd_ebpf_common::RING_SLOTS;
    let rings = sys::bpf_map_create(MAP_TYPE_HASH_OF_MAPS, 4, 4, slots, Some(template.as_fd()), "RINGS")
        .map_err(setup("creating the map of event ring buffers"))?;
    let pin = CString::new(maps.join("RINGS").as_os_str().as_bytes()).unwrap_or_default();
    sys::bpf_obj_pin(rings.as_fd(), &pin).map_err(setup("pinning the map of event ring buffers"))
}

fn pin_layer(
    dir: &Path,
    layer: Layer,
    cgroup_parent: &Path,
    offsets: agentd_ebpf_common::KernelOffsets,
) -> Result<(), BpfError> {
    let maps = dir.join("maps");
    let links = dir.join("links");
    for d in [&maps, &links] {
        fs::create_dir_all(d).map_err(setup(format!("creating {}", d.display())))?;
    }
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use the memory cgroup,
    // so a refusal (no CAP_SYS_RESOURCE) only matters there, where loading then says so.
    if let Err(e) = sys::raise_memlock() {
        tracing::debug!(error = %e, "RLIMIT_MEMLOCK left as it is");
    }
    pin_rings(&maps)?;
    let mut ebpf = EbpfLoader::new()
        .allow_unsupported_maps()
        .map_pin_path(&maps)
        .set_global("OFFSETS", &offsets, true)
        .set_global("LSM_LAYER", &u32::from(layer == Layer::Lsm), true)
        .load(OBJECT)
        .map_err(setup("loading agentd's BPF object"))?;
    let cgroup = File::open(cgroup_parent).map_err(setup(format!("opening {}", cgroup_parent.display())))?;
    let attach_cgroup = |prog_fd: std::os::fd::BorrowedFd<'_>, name: &str, attach_type: u32| {
        let link = sys::bpf_link_create(prog_fd, cgroup.as_fd(), attach_type)
            .map_err(setup(format!("attaching {name} to {}", cgroup_parent.display())))?;
        let pin = CString::new(links.join(name).as_os_str().as_bytes()).unwrap_or_default();
        sys::bpf_obj_pin(link.as_fd(), &pin).map_err(setup(format!("pinning {name}")))
    };
    let sock: &[(&str, u32)] = match layer {
        Layer::Lsm => &COMMON_SOCK_PROGRAMS,
        Layer::Fallback => &[SOCK_PROGRAMS.as_slice(), COMMON_SOCK_PROGRAMS.as_slice()].concat(),
    };
    for (name, attach_type) in sock {
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        prog.load().map_err(setup(format!("verifying {name}")))?;
        attach_cgroup(prog.fd().map_err(setup(format!("program {name}")))?.as_fd(), name, *attach_type)?;
    }
    let (name, attach_type) = DEVICE_PROGRAM;
    let prog: &mut CgroupDevice = program(&mut ebpf, name)?;
    prog.load().map_err(setup(format!("verifying {name}")))?;
    attach_cgroup(prog.fd().map_err(setup(format!("program {name}")))?.as_fd(), name, attach_type)?;
    // The programs every process of the host would run are pinned as programs; their links
    // are made while calls run ([`attach_switched`]).
    let progs = dir.join("progs");
    fs::create_dir_all(&progs).map_err(setup(format!("creating {}", progs.display())))?;
    match layer {
        Layer::Lsm => {
            let btf = aya::Btf::from_sys_fs().map_err(setup("reading the kernel's BTF"))?;
            for name in LSM_PROGRAMS {
                let prog: &mut Lsm = program(&mut ebpf, name)?;
                prog.load(name, &btf).map_err(setup(format!("verifying the LSM program {name}")))?;
                prog.pin(progs.join(name)).map_err(setup(format!("pinning {name}")))?;
            }
            for name in PATH_PROGRAMS {
                let prog: &mut Lsm = program(&mut ebpf, name)?;
                let pinned = prog
                    .load(name, &btf)
                    .map_err(setup(format!("verifying the LSM program {name}")))
                    .and_then(|()| prog.pin(progs.join(name)).map_err(setup(format!("pinning {name}"))));
                if let Err(e) = pinned {
                    warn!(error = %agentd_policy::error_chain(&e), "changes will be named by the tools' strings");
                    for n in PATH_PROGRAMS {
                        let _ = fs::remove_file(progs.join(n));
                    }
                    break;
                }
            }
            // Changes, and what Landlock refuses before the hooks run, come from the syscalls.
            if let Err(e) = pin_per_syscall(&mut ebpf, &progs) {
                warn!(
                    error = %agentd_policy::error_chain(&e),
                    "per-syscall tracepoints cannot be pinned here: file changes and Landlock's refusals go unrecorded"
                );
            }
        }
        Layer::Fallback => {
            let prog: &mut RawTracePoint = program(&mut ebpf, EXEC_PROGRAM)?;
            prog.load().map_err(setup(format!("verifying {EXEC_PROGRAM}")))?;
            prog.pin(progs.join(EXEC_PROGRAM)).map_err(setup(format!("pinning {EXEC_PROGRAM}")))?;
            if let Err(e) = pin_per_syscall(&mut ebpf, &progs) {
                warn!(
                    error = %agentd_policy::error_chain(&e),
                    "per-syscall tracepoints cannot be pinned here; every syscall will run the raw tracepoint programs"
                );
                for name in RAW_SYSCALL_PROGRAMS {
                    let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
                    prog.load().map_err(setup(format!("verifying {name}")))?;
                    prog.pin(progs.join(name)).map_err(setup(format!("pinning {name}")))?;
                }
            }
        }
    }
    drop(ebpf);
    attach_switched(dir, layer)
}

/// Loads `traced_enter` and `traced_exit` and pins them in `progs`, after checking that this
/// kernel can make (and pin) a link of them to a per-syscall tracepoint (Linux 5.15 and
/// later, with tracefs).
fn pin_per_syscall(ebpf: &mut Ebpf, progs: &Path) -> Result<(), BpfError> {
    ensure_mounted(TRACEFS, "tracefs")?;
    for (dir, name) in PER_SYSCALL_PROGRAMS {
        let prog: &mut TracePoint = program(ebpf, name)?;
        prog.load().map_err(setup(format!("verifying {name}")))?;
        let tp = format!("sys_{dir}_openat");
        let id = prog.attach("syscalls", &tp).map_err(setup(format!("attaching {name} to {tp}")))?;
        let link = prog.take_link(id).map_err(setup(format!("{tp} link")))?;
        // Dropped at once: only whether it could be made matters here.
        FdLink::try_from(link).map_err(setup(format!("{tp}: a link that can be pinned")))?;
    }
    for (_, name) in PER_SYSCALL_PROGRAMS {
        let prog: &mut TracePoint = program(ebpf, name)?;
        prog.pin(progs.join(name)).map_err(setup(format!("pinning {name}")))?;
    }
    Ok(())
}

/// Whether `name` under `links/` is one of the links made only while calls run.
pub(super) fn is_switched_link(name: &str) -> bool {
    ((LSM_PROGRAMS.contains(&name) || PATH_PROGRAMS.contains(&name)) && lsm_links_switch())
        || RAW_SYSCALL_PROGRAMS.contains(&name)
        || name == EXEC_PROGRAM
        || name.starts_with("enter_")
        || name.starts_with("exit_")
}

/// Makes (and pins under `links/`) the links of the programs pinned under `progs/` that
/// [`missing_links`] finds missing: the LSM hooks, the syscall tracepoints and
/// `sched_process_exec`. Each costs every process of the host, so they exist only while calls
/// run. The caller holds the loader's lock.
pub(super) fn attach_switched(dir: &Path, layer: Layer) -> Result<(), BpfError> {
    let (progs, links) = (dir.join("progs"), dir.join("links"));
    // The per-syscall programs, opened once each: `enter` and `exit`.
    let mut traced: std::collections::HashMap<&str, TracePoint> = std::collections::HashMap::new();
    for name in missing_links(dir, layer)? {
        let pin =
            |link: FdLink| link.pin(links.join(&name)).map(drop).map_err(setup(format!("pinning the {name} link")));
        if let Some((dir, call)) = name.split_once('_').filter(|(d, _)| *d == "enter" || *d == "exit") {
            let tp = format!("sys_{dir}_{call}");
            let (_, program) = PER_SYSCALL_PROGRAMS.iter().find(|(d, _)| *d == dir).copied().unwrap_or_default();
            let prog = match traced.entry(program) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(
                    TracePoint::from_pin(progs.join(program))
                        .map_err(setup(format!("opening the pinned {program}")))?,
                ),
            };
            retrying(&tp, || {
                let id = prog.attach("syscalls", &tp).map_err(setup(format!("attaching to {tp}")))?;
                let link = prog.take_link(id).map_err(setup(format!("{tp} link")))?;
                pin(FdLink::try_from(link).map_err(setup(format!("{tp}: a link that can be pinned")))?)
            })?;
        } else if name == EXEC_PROGRAM || RAW_SYSCALL_PROGRAMS.contains(&name.as_str()) {
            retrying(&name, || {
                let mut prog =
                    RawTracePoint::from_pin(progs.join(&name)).map_err(setup(format!("opening the pinned {name}")))?;
                let id = prog.attach(&name).map_err(setup(format!("attaching {name}")))?;
                pin(FdLink::from(prog.take_link(id).map_err(setup(format!("{name} link")))?))
            })?;
        } else {
            retrying(&name, || {
                let mut prog = Lsm::from_pin(progs.join(&name)).map_err(setup(format!("opening the pinned {name}")))?;
                let id = prog.attach().map_err(setup(format!("attaching {name}")))?;
                pin(FdLink::from(prog.take_link(id).map_err(setup(format!("{name} link")))?))
            })?;
        }
    }
    Ok(())
}

/// Runs `attach` until it succeeds, for up to 3 s: the kernel refuses a program on a hook
/// where its previous link is still being freed (`EBUSY`, `EEXIST`), which lasts a moment
/// after an idle detacher ran.
fn retrying(what: &str, mut attach: impl FnMut() -> Result<(), BpfError>) -> Result<(), BpfError> {
    let start = std::time::Instant::now();
    loop {
        match attach() {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() < std::time::Duration::from_secs(3) => {
                tracing::debug!(what, error = %agentd_policy::error_chain(&e), "attaching again");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The links made while calls run that are missing now (empty: all attached). An error when
/// the pinned programs they come from are gone.
pub(super) fn missing_links(dir: &Path, layer: Layer) -> Result<Vec<String>, BpfError> {
    let names = |d: &Path| -> std::collections::HashSet<String> {
        fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    let (progs, links) = (names(&dir.join("progs")), names(&dir.join("links")));
    let required: &[&str] = match layer {
        Layer::Lsm => &LSM_PROGRAMS,
        Layer::Fallback => &[EXEC_PROGRAM],
    };
    let hook = syscall_hook(dir);
    if let Some(gone) = required.iter().find(|n| !progs.contains(**n)) {
        return Err(BpfError::Setup {
            what: format!("agentd's pinned program {gone} is gone from {}", dir.display()),
            source: "removed by hand, or by another agentd build".into(),
        });
    }
    if layer == Layer::Fallback && hook.is_none() {
        return Err(BpfError::Setup {
            what: format!("agentd's pinned syscall programs are gone from {}", dir.display()),
            source: "removed by hand, or by another agentd build".into(),
        });
    }
    let mut missing: Vec<String> = LSM_PROGRAMS
        .iter()
        .chain(PATH_PROGRAMS.iter())
        .chain([EXEC_PROGRAM].iter())
        .chain(RAW_SYSCALL_PROGRAMS.iter())
        .filter(|n| progs.contains(**n) && !links.contains(**n))
        .map(|n| n.to_string())
        .collect();
    if hook == Some(SyscallHook::PerSyscall) {
        let absent: Vec<(String, String)> = PER_SYSCALL_PROGRAMS
            .iter()
            .flat_map(|(d, _)| traced(d).map(move |c| (format!("{d}_{c}"), format!("sys_{d}_{c}"))))
            .filter(|(link, _)| !links.contains(link))
            .collect();
        if !absent.is_empty() {
            // Syscalls this kernel lacks (openat2 before 5.6, fchmodat2 before 6.6) have no
            // tracepoint, and need no link.
            ensure_mounted(TRACEFS, "tracefs")?;
            let events = Path::new(TRACEFS).join("events/syscalls");
            missing.extend(absent.into_iter().filter(|(_, tp)| events.join(tp).exists()).map(|(link, _)| link));
        }
    }
    Ok(missing)
}

/// Whether this kernel can attach an LSM program again after its link was removed (Linux
/// 5.13 and later); before, its LSM links stay attached for good.
fn lsm_links_switch() -> bool {
    static SWITCH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SWITCH.get_or_init(|| {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (5, 13)
    })
}

/// Removes the links [`attach_switched`] made, and returns how many, once their programs no
/// longer run: the kernel frees an unpinned link after an RCU grace period, in a worker, and
/// takes its id away as it starts; the program comes off its hook right after. Closing the
/// tracepoints themselves (an RCU wait each, about 30 ms, serialized in the kernel) goes on
/// in the kernel's workers; a link attached meanwhile is a new one, and the old ones no longer
/// run anything of agentd's. The caller holds the loader's lock, and no call runs.
pub(super) fn detach_switched(dir: &Path) -> usize {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir.join("links")).into_iter().flatten().flatten() {
        if !is_switched_link(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let pin = CString::new(path.as_os_str().as_bytes()).unwrap_or_default();
        // The descriptor is closed at once: the pin is what holds the link.
        if let Ok(id) = sys::bpf_obj_get(&pin).and_then(|fd| sys::bpf_obj_id(fd.as_fd())) {
            ids.push(id);
        }
        if let Err(e) = fs::remove_file(&path) {
            warn!(link = %path.display(), error = %e, "could not unpin a link");
        }
    }
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        match sys::bpf_link_ids() {
            Ok(live) if ids.iter().any(|id| live.contains(id)) => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            _ => break,
        }
    }
    // The worker takes each program off its hook just after the id; then every run that
    // began before ends within a grace period.
    std::thread::sleep(std::time::Duration::from_millis(5));
    if let Err(e) = sys::rcu_barrier_global() {
        tracing::debug!(error = %e, "membarrier: waiting a moment instead");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ids.len()
}
