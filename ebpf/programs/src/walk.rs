//! Naming a file from the kernel's objects: a `struct path` (mount and dentry) walked up to the
//! current task's root, the way `d_path` does, in a bounded loop. The fallback layer uses it
//! for what a syscall really opened or executed, whatever string the tool passed.
//!
//! The name is built leaf first, each component followed by `/` (`passwd/etc/` for
//! `/etc/passwd`): a path longer than the buffer keeps its file name and nearest directories,
//! and the supervisor puts the components back in order.

use agentd_ebpf_common::{KernelOffsets, PATH_LEN, PATH_OUTSIDE_ROOT, PATH_TRUNCATED, PATH_WALKED};
use aya_ebpf::helpers::gen::bpf_get_current_task;
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes};
use aya_ebpf::macros::map;
use aya_ebpf::maps::PerCpuArray;

use crate::OFFSETS;

/// Bytes of the name kept (a power of two, for the verifier's bounds).
const KEPT: usize = 512;
/// At most this much of one component is read (longer names are cut).
const COMPONENT: usize = 256;
/// Steps of the walk: components plus mount crossings.
const STEPS: usize = 40;

/// Per-CPU room for a name: too big for the 512-byte BPF stack. Everything the walk carries
/// from one step to the next lives here too, not in registers: the verifier does not track
/// values in map memory, so every path into the next step looks the same to it and one
/// verification covers them all, instead of their number doubling at each step.
#[repr(C)]
pub struct Name {
    mnt: u64,
    dentry: u64,
    mount: u64,
    root_mnt: u64,
    root_dentry: u64,
    len: u64,
    flags: u32,
    ended: u32,
    buf: [u8; KEPT + COMPONENT],
}

#[map(name = "WALK_BUF")]
static WALK_BUF: PerCpuArray<Name> = PerCpuArray::with_max_entries(1, 0);

fn offsets() -> KernelOffsets {
    // SAFETY: a read of the program's read-only data.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Reads a pointer-sized value of kernel memory at `base + off` (0 if it cannot be read).
#[inline(always)]
pub(crate) fn read(base: u64, off: u32) -> u64 {
    if base == 0 {
        return 0;
    }
    // SAFETY: the helper reads kernel memory and fails instead of faulting.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const u64) }.unwrap_or(0)
}

/// The walk's state in map memory, read and written as memory every time (see [`Name`]).
fn get(v: &u64) -> u64 {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(v) }
}

fn set(v: &mut u64, x: u64) {
    // SAFETY: a valid reference.
    unsafe { core::ptr::write_volatile(v, x) }
}

fn get32(v: &u32) -> u32 {
    // SAFETY: a valid reference.
    unsafe { core::ptr::read_volatile(v) }
}

fn set32(v: &mut u32, x: u32) {
    // SAFETY: a valid reference.
    unsafe { core::ptr::write_volatile(v, x) }
}

fn or32(v: &mut u32, bits: u32) {
    let x = get32(v) | bits;
    set32(v, x);
}

/// Whether the offsets for walking were provided (the kernel has BTF).
pub fn enabled() -> bool {
    offsets().walk != 0
}

/// The `struct file *` of the current task's descriptor `fd` (0 if none).
pub fn file_of_fd(fd: i64) -> u64 {
    let o = offsets();
    if fd < 0 {
        return 0;
    }
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let files = read(task, o.task_files);
    let fdt = read(files, o.files_fdt);
    // SAFETY: as in `read`.
    let max = unsafe { bpf_probe_read_kernel((fdt + u64::from(o.fdt_max_fds)) as *const u32) }.unwrap_or(0);
    if fdt == 0 || fd as u64 >= u64::from(max) {
        return 0;
    }
    let array = read(fdt, o.fdt_fd);
    read(array + fd as u64 * 8, 0)
}

/// The current task's working directory, as (vfsmount, dentry).
pub fn cwd() -> (u64, u64) {
    let o = offsets();
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let fs = read(task, o.task_fs);
    (read(fs, o.fs_pwd), read(fs, o.fs_pwd + 8))
}

/// A file's `f_path`, as (vfsmount, dentry): one read of the two.
pub fn file_path(file: u64) -> (u64, u64) {
    if file == 0 {
        return (0, 0);
    }
    let o = offsets();
    // SAFETY: the helper reads kernel memory and fails instead of faulting.
    let [mnt, dentry] =
        unsafe { bpf_probe_read_kernel((file + u64::from(o.file_f_path)) as *const [u64; 2]) }.unwrap_or([0; 2]);
    (mnt, dentry)
}

/// Writes the name of (`mnt`, `dentry`) into `out` (NUL-terminated, leaf first) and returns
/// the `PATH_*` flags; 0 (and an empty name) when there is nothing to walk.
#[inline(never)]
pub fn name(mnt: u64, dentry: u64, out: &mut [u8; PATH_LEN]) -> u32 {
    out[0] = 0;
    if mnt == 0 || dentry == 0 || !enabled() {
        return 0;
    }
    let Some(w) = WALK_BUF.get_ptr_mut(0) else { return 0 };
    // SAFETY: this CPU's copy; tracing programs do not nest on a CPU.
    let w = unsafe { &mut *w };
    let o = offsets();
    // SAFETY: a helper without arguments.
    let task = unsafe { bpf_get_current_task() };
    let fs = read(task, o.task_fs);
    set(&mut w.root_mnt, read(fs, o.fs_root));
    set(&mut w.root_dentry, read(fs, o.fs_root + 8));
    set(&mut w.mnt, mnt);
    set(&mut w.dentry, dentry);
    set(&mut w.mount, mnt.wrapping_sub(u64::from(o.mount_mnt)));
    set(&mut w.len, 0);
    set32(&mut w.flags, PATH_WALKED);
    set32(&mut w.ended, 0);
    for _ in 0..STEPS {
        let (mnt, dentry, mount) = (get(&w.mnt), get(&w.dentry), get(&w.mount));
        if dentry == get(&w.root_dentry) && mnt == get(&w.root_mnt) {
            set32(&mut w.ended, 1);
            break;
        }
        if dentry == read(mnt, o.vfsmount_root) {
            // The top of this mount: go on from where it is mounted.
            let parent = read(mount, o.mount_parent);
            if parent == mount || parent == 0 {
                or32(&mut w.flags, PATH_OUTSIDE_ROOT);
                set32(&mut w.ended, 1);
                break;
            }
            set(&mut w.dentry, read(mount, o.mount_mountpoint));
            set(&mut w.mount, parent);
            set(&mut w.mnt, parent + u64::from(o.mount_mnt));
            continue;
        }
        let at = (get(&w.len) as usize) & (KEPT - 1);
        let Some(dst) = w.buf.get_mut(at..at + COMPONENT) else { break };
        let src = read(dentry, o.dentry_name) as *const u8;
        // SAFETY: the helper reads a kernel string into `dst` and fails instead of faulting.
        let n = match unsafe { bpf_probe_read_kernel_str_bytes(src, dst) } {
            Ok(s) => s.len() & (COMPONENT - 1),
            Err(_) => break,
        };
        if let Some(slash) = w.buf.get_mut(at + n) {
            *slash = b'/';
        }
        set(&mut w.len, (at + n + 1) as u64);
        if at + n + 1 >= KEPT || n >= COMPONENT - 1 {
            or32(&mut w.flags, PATH_TRUNCATED);
            set32(&mut w.ended, 1);
            break;
        }
        let parent = read(dentry, o.dentry_parent);
        if parent == dentry || parent == 0 {
            or32(&mut w.flags, PATH_OUTSIDE_ROOT);
            set32(&mut w.ended, 1);
            break;
        }
        set(&mut w.dentry, parent);
    }
    let len = get(&w.len) as usize;
    let mut flags = get32(&w.flags);
    if get32(&w.ended) == 0 {
        flags |= PATH_TRUNCATED;
    }
    let keep = if len > PATH_LEN - 1 { PATH_LEN - 1 } else { len };
    if keep < len {
        flags |= PATH_TRUNCATED;
    }
    // SAFETY: reads PATH_LEN bytes of this CPU's buffer (which is longer) into `out`.
    unsafe {
        let _ = aya_ebpf::helpers::gen::bpf_probe_read_kernel(
            out.as_mut_ptr() as *mut core::ffi::c_void,
            PATH_LEN as u32,
            w.buf.as_ptr() as *const core::ffi::c_void,
        );
    }
    if let Some(end) = out.get_mut(keep) {
        *end = 0;
    }
    flags
}
