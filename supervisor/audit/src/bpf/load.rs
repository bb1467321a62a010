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

use super::btf::Btf;
use super::{setup, BpfError, Layer, OBJECT};
use crate::sys;

pub(super) const BPFFS: &str = "/sys/fs/bpf";
/// agentd's runtime directory. The daemon's socket is here too, so others may enter it.
pub(super) const RUN_DIR: &str = "/run/agentd";
/// Lock files and the loader's notes: root's alone, so that no other user can take a lock
/// and stall every call.
pub(super) const LOCK_DIR: &str = "/run/agentd/lock";
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
pub const LSM_PROGRAMS: [&str; 11] = [
    "bprm_check_security",
    "mmap_file",
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

/// Program names of the fallback layer's own links, besides its syscall tracepoints.
pub const FALLBACK_PROGRAMS: [&str; 5] = ["connect4", "connect6", "bind4", "bind6", "sched_process_exec"];

/// The syscalls the fallback traces (`syscalls/sys_enter_NAME` and `sys_exit_NAME`), in the
/// order their links are pinned: the last one's pair tells that all were. Those this kernel
/// does not have (openat2 before 5.6, fchmodat2 before 6.6) are left out.
pub const TRACED_SYSCALLS: [&str; 32] = [
    "open",
    "creat",
    "openat",
    "openat2",
    "execve",
    "execveat",
    "unlink",
    "unlinkat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "truncate",
    "ftruncate",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "lchown",
    "fchown",
    "fchownat",
    "mknod",
    "mknodat",
    "mkdir",
    "connect",
    "bind",
    "mkdirat",
];

/// Link names of the raw `sys_enter`/`sys_exit` pair, used where per-syscall tracepoint links
/// cannot be pinned (before Linux 5.15).
const RAW_SYSCALL_LINKS: [&str; 2] = ["sys_enter", "sys_exit"];

/// How the fallback's syscall programs are attached, from its pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallHook {
    /// `syscalls/sys_enter_*` and `sys_exit_*` of [`TRACED_SYSCALLS`] only.
    PerSyscall,
    /// `raw_tracepoint/sys_enter` and `sys_exit`: every syscall of the host runs them.
    Raw,
}

/// The fallback's syscall hook pinned in `links`, if complete.
pub(super) fn syscall_hook(links: &Path) -> Option<SyscallHook> {
    let last = TRACED_SYSCALLS[TRACED_SYSCALLS.len() - 1];
    if ["enter", "exit"].iter().all(|d| links.join(format!("{d}_{last}")).exists()) {
        Some(SyscallHook::PerSyscall)
    } else if RAW_SYSCALL_LINKS.iter().all(|n| links.join(n).exists()) {
        Some(SyscallHook::Raw)
    } else {
        None
    }
}

/// Program names both layers attach.
pub const COMMON_PROGRAMS: [&str; 3] = ["sendmsg4", "sendmsg6", "devices"];

/// The names under `links/` of a complete `layer`.
fn link_names(layer: Layer) -> impl Iterator<Item = &'static str> {
    let own: &'static [&'static str] = match layer {
        Layer::Lsm => &LSM_PROGRAMS,
        Layer::Fallback => &FALLBACK_PROGRAMS,
    };
    own.iter().chain(COMMON_PROGRAMS.iter()).copied()
}

/// The layer pinned in `dir`, if its pins are complete.
pub(super) fn pinned_layer(dir: &Path) -> Option<Layer> {
    let links = dir.join("links");
    [Layer::Lsm, Layer::Fallback].into_iter().find(|layer| {
        link_names(*layer).all(|n| links.join(n).exists()) && (*layer == Layer::Lsm || syscall_hook(&links).is_some())
    })
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

/// Opens (0600, never through a symlink) and locks `path`, trying until `wait` has passed;
/// `Ok(None)` if someone else still holds it then.
pub(super) fn lock_file(path: PathBuf, wait: std::time::Duration) -> Result<Option<File>, BpfError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(setup(format!("opening {}", path.display())))?;
    // A file made by someone else (root's flock(1), an older agentd) keeps its mode otherwise.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(setup(format!("chmod {}", path.display())))?;
    let start = std::time::Instant::now();
    loop {
        match sys::flock(f.as_raw_fd(), true) {
            Ok(true) => return Ok(Some(f)),
            Ok(false) if start.elapsed() >= wait => return Ok(None),
            Ok(false) => std::thread::sleep(std::time::Duration::from_millis(20)),
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

/// Unpins programs and maps of other builds of agentd (their links detach with the pins).
pub(super) fn remove_stale(base: &Path, keep: &str) {
    for entry in fs::read_dir(base).into_iter().flatten().flatten() {
        if entry.file_name().as_bytes() != keep.as_bytes() {
            let _ = fs::remove_dir_all(entry.path());
            warn!(pins = %entry.path().display(), "removed BPF pins of another agentd build");
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

/// Creates and pins `RINGS`, the map from each call's cgroup id to its supervisor's ring
/// buffer, before the object is loaded (which then reuses the pin): a map of maps needs a
/// template of its values, which aya 0.13 cannot give.
fn pin_rings(maps: &Path) -> Result<(), BpfError> {
    let template = new_ring()?;
    let rings = sys::bpf_map_create(MAP_TYPE_HASH_OF_MAPS, 8, 4, 4096, Some(template.as_fd()), "RINGS")
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
    match layer {
        Layer::Lsm => {
            let btf = aya::Btf::from_sys_fs().map_err(setup("reading the kernel's BTF"))?;
            for name in LSM_PROGRAMS {
                let prog: &mut Lsm = program(&mut ebpf, name)?;
                prog.load(name, &btf).map_err(setup(format!("verifying the LSM program {name}")))?;
                let id = prog.attach().map_err(setup(format!("attaching {name}")))?;
                let link = FdLink::from(prog.take_link(id).map_err(setup(format!("{name} link")))?);
                link.pin(links.join(name)).map_err(setup(format!("pinning {name}")))?;
            }
        }
        Layer::Fallback => {
            let name = "sched_process_exec";
            let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
            prog.load().map_err(setup(format!("verifying {name}")))?;
            let id = prog.attach(name).map_err(setup(format!("attaching {name}")))?;
            let link = FdLink::from(prog.take_link(id).map_err(setup(format!("{name} link")))?);
            link.pin(links.join(name)).map_err(setup(format!("pinning {name}")))?;
            match pin_per_syscall(&mut ebpf, &links) {
                Ok(()) => {}
                Err(e) => {
                    warn!(
                        error = %agentd_policy::error_chain(&e),
                        "per-syscall tracepoints cannot be pinned here; every syscall will run the raw tracepoint programs"
                    );
                    for entry in fs::read_dir(&links).into_iter().flatten().flatten() {
                        let n = entry.file_name().to_string_lossy().into_owned();
                        if n.starts_with("enter_") || n.starts_with("exit_") {
                            let _ = fs::remove_file(entry.path());
                        }
                    }
                    for name in RAW_SYSCALL_LINKS {
                        let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
                        prog.load().map_err(setup(format!("verifying {name}")))?;
                        let id = prog.attach(name).map_err(setup(format!("attaching {name}")))?;
                        let link = FdLink::from(prog.take_link(id).map_err(setup(format!("{name} link")))?);
                        link.pin(links.join(name)).map_err(setup(format!("pinning {name}")))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Attaches `traced_enter` and `traced_exit` to each of [`TRACED_SYSCALLS`]' tracepoints and
/// pins the links (`enter_NAME`, `exit_NAME`). Fails where the kernel cannot make such links
/// pinnable (before 5.15) or has no tracefs.
fn pin_per_syscall(ebpf: &mut Ebpf, links: &Path) -> Result<(), BpfError> {
    ensure_mounted(TRACEFS, "tracefs")?;
    let events = Path::new(TRACEFS).join("events/syscalls");
    for (dir, name) in [("enter", "traced_enter"), ("exit", "traced_exit")] {
        let prog: &mut TracePoint = program(ebpf, name)?;
        prog.load().map_err(setup(format!("verifying {name}")))?;
        for call in TRACED_SYSCALLS {
            let tp = format!("sys_{dir}_{call}");
            if !events.join(&tp).exists() {
                continue;
            }
            let id = prog.attach("syscalls", &tp).map_err(setup(format!("attaching {name} to {tp}")))?;
            let link = prog.take_link(id).map_err(setup(format!("{tp} link")))?;
            let link = FdLink::try_from(link).map_err(setup(format!("{tp}: a link that can be pinned")))?;
            link.pin(links.join(format!("{dir}_{call}"))).map_err(setup(format!("pinning {tp}")))?;
        }
    }
    Ok(())
}
