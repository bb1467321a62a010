//! Loading agentd's programs once and pinning them, choosing the layer the kernel supports.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aya::programs::links::FdLink;
use aya::programs::{CgroupDevice, CgroupSockAddr, Lsm, RawTracePoint};
use aya::{Ebpf, EbpfLoader};
use tracing::{info, warn};

use super::btf::Btf;
use super::{setup, BpfError, Layer, OBJECT};
use crate::sys;

pub(super) const BPFFS: &str = "/sys/fs/bpf";
pub(super) const LOCK_DIR: &str = "/run/agentd";
const SECURITYFS: &str = "/sys/kernel/security";
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The cgroup socket programs of the fallback and their attach types (`enum bpf_attach_type`).
const SOCK_PROGRAMS: [(&str, u32); 4] = [("bind4", 8), ("bind6", 9), ("connect4", 10), ("connect6", 11)];

/// cgroup programs both layers attach: datagrams sent to an address (the LSM layer has no
/// sendmsg hook) and device access.
const COMMON_SOCK_PROGRAMS: [(&str, u32); 2] = [("sendmsg4", 14), ("sendmsg6", 15)];
const DEVICE_PROGRAM: (&str, u32) = ("devices", 6);

/// The LSM programs; each is named after its hook.
pub const LSM_PROGRAMS: [&str; 9] = [
    "bprm_check_security",
    "mmap_file",
    "file_open",
    "socket_connect",
    "socket_bind",
    "ptrace_access_check",
    "task_kill",
    "sb_mount",
    "move_mount",
];

/// Program names of the fallback layer's own links.
pub const FALLBACK_PROGRAMS: [&str; 6] = ["connect4", "connect6", "bind4", "bind6", "sys_enter", "sys_exit"];

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
    [Layer::Lsm, Layer::Fallback]
        .into_iter()
        .find(|layer| link_names(*layer).all(|n| dir.join("links").join(n).exists()))
}

/// Where the loader leaves why it pinned the fallback (bpffs holds only BPF objects).
pub(super) fn note_path(hash: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("bpf-{hash}.note"))
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
    let raw = fs::read(KERNEL_BTF).map_err(|e| format!("no kernel BTF at {KERNEL_BTF}: {e}"))?;
    let btf = Btf::parse(&raw).map_err(|e| format!("{KERNEL_BTF}: {e}"))?;
    btf.kernel_offsets().map_err(|e| format!("{KERNEL_BTF}: {e}"))
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

/// Opens and locks `path`; `Ok(None)` if `nonblocking` and someone else holds it.
pub(super) fn lock_file(path: PathBuf, nonblocking: bool) -> Result<Option<File>, BpfError> {
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
                pin_layer(dir, Layer::Fallback, cgroup_parent, Default::default())?;
                (Layer::Fallback, Some(why))
            }
        },
        Err(why) => {
            pin_layer(dir, Layer::Fallback, cgroup_parent, Default::default())?;
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
    let mut ebpf = EbpfLoader::new()
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
            for name in ["sys_enter", "sys_exit"] {
                let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
                prog.load().map_err(setup(format!("verifying {name}")))?;
                let id = prog.attach(name).map_err(setup(format!("attaching {name}")))?;
                let link = FdLink::from(prog.take_link(id).map_err(setup(format!("{name} link")))?);
                link.pin(links.join(name)).map_err(setup(format!("pinning {name}")))?;
            }
        }
    }
    Ok(())
}
