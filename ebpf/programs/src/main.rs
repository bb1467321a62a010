//! agentd's kernel-side programs.
//!
//! Every program first looks up the current task's cgroup id in `CALLS`. Tasks that are not
//! in a live tool call's cgroup are left alone at once; the supervisor fills `CALLS` before a
//! call's tool runs and clears it after the call ends.
//!
//! Two layers, of which the supervisor attaches one:
//! - [`lsm`]: BPF LSM hooks (exec, executable mappings, file opens, connect and bind, Unix
//!   socket connects, ptrace, signals, mounts) that record and, in enforce mode, deny. Used
//!   where the kernel has BPF LSM.
//! - the fallback, for kernels without it: [`net`]'s `cgroup/connect4|6` and `cgroup/bind4|6`
//!   allow exactly the manifest's `host:port` pairs (Landlock only knows ports), and
//!   [`trace`]'s syscall tracepoints record opens, execs and file-system changes with their
//!   results, naming what was opened or executed from the kernel's objects ([`walk`]).
//!
//! In both layers, [`net`]'s `cgroup/sendmsg4|6` check datagrams sent to an address and
//! [`devices`]' `cgroup/dev` allows only the device nodes of the sandbox's `/dev`.
//!
//! The programs' own diagnostics (a call armed, a file that could not be named) go through
//! aya-log's `AYA_LOGS`, which nobody reads unless asked (`AGENTD_BPF_LOG`); the audit
//! records never do.
//!
//! Events go to the ring buffer of the call's supervisor (`RINGS`, by the slot in the call's `CALLS` entry); a full
//! buffer, or a call without one, is counted in `LOST` per call, never dropped silently.

#![no_std]
#![no_main]

mod devices;
mod lsm;
mod net;
mod trace;
mod walk;

use core::cell::UnsafeCell;
use core::ffi::c_void;

use agentd_ebpf_common::{
    CallInfo, Event, KernelOffsets, NetKey, PathKey, RepeatCount, RepeatKey, UnixKey, RING_BYTES,
};
use aya_ebpf::bindings::bpf_map_def;
use aya_ebpf::helpers::gen::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_ringbuf_query,
    bpf_ringbuf_reserve, bpf_ringbuf_submit,
};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, PerCpuHashMap};

#[map(name = "CALLS")]
static CALLS: HashMap<u64, CallInfo> = HashMap::pinned(4096, 0);

#[map(name = "NET_ALLOW")]
static NET_ALLOW: HashMap<NetKey, u8> = HashMap::pinned(16384, 0);

#[map(name = "PATH_RULES")]
static PATH_RULES: HashMap<PathKey, u8> = HashMap::pinned(16384, 0);

/// The Unix sockets each call may connect to (`net.unix`), by device and inode.
#[map(name = "UNIX_ALLOW")]
static UNIX_ALLOW: HashMap<UnixKey, u8> = HashMap::pinned(4096, 0);

/// Files each thread of a call opened, with how many times it opened them again (the
/// fallback records the first open and counts the rest; the supervisor reads and removes a
/// call's counts when it ends). A full map means more records, never fewer.
#[map(name = "REPEATS")]
static REPEATS: HashMap<RepeatKey, RepeatCount> = HashMap::pinned(65536, 0);

/// How many keys each call has in `REPEATS` (at most `REPEATS_PER_CALL`). Written before a
/// key is added, so a call with keys always has an entry here: the supervisor reads the
/// call's counts only if it has one.
#[map(name = "REPEAT_QUOTA")]
static REPEAT_QUOTA: HashMap<u64, u64> = HashMap::pinned(4096, 0);

/// Events that found their ring buffer full, per call and per CPU (no atomics needed).
#[map(name = "LOST")]
static LOST: PerCpuHashMap<u64, u64> = PerCpuHashMap::pinned(4096, 0);

/// Kernel structure offsets, written by the supervisor from the kernel's BTF before the
/// programs are verified. Read-only data: the verifier sees the values as constants.
#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets {
    file_f_path: 0,
    file_f_flags: 0,
    bprm_file: 0,
    socket_type: 0,
    task_tgid: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    unix_sock_path_dentry: 0,
    dentry_inode: 0,
    dentry_name: 0,
    inode_ino: 0,
    inode_sb: 0,
    sb_dev: 0,
    sock_cgroup: 0,
    socket_sk: 0,
    walk: 0,
    task_fs: 0,
    fs_root: 0,
    fs_pwd: 0,
    task_files: 0,
    files_fdt: 0,
    fdt_fd: 0,
    fdt_max_fds: 0,
    dentry_parent: 0,
    vfsmount_root: 0,
    mount_mnt: 0,
    mount_parent: 0,
    mount_mountpoint: 0,
    vma_file: 0,
    vma_flags: 0,
    dentry_hash_len: 0,
    task_exec_id: 0,
    task_start_time: 0,
    _pad: 0,
};

/// `RINGS`: slot → a supervisor's ring buffer (a map of maps; `CallInfo::ring` names a call's
/// slot). Slots and their rings outlive the supervisors that hold them, so that a call adds
/// no entry here: every update of a map of maps waits for an RCU grace period. aya-ebpf
/// has no such map type, so it is declared as the kernel's legacy `bpf_map_def`; agentd's
/// loader creates and pins it before loading (the kernel needs a template ring buffer for the
/// inner maps), and the loader then reuses the pin by name.
#[repr(transparent)]
pub struct MapOfMaps(UnsafeCell<bpf_map_def>);

// SAFETY: the definition is only read, by the loader and the kernel.
unsafe impl Sync for MapOfMaps {}

const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;
const PIN_BY_NAME: u32 = 1;

#[link_section = "maps"]
#[export_name = "RINGS"]
static RINGS: MapOfMaps = MapOfMaps(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_HASH_OF_MAPS,
    key_size: 4,
    value_size: 4,
    max_entries: agentd_ebpf_common::RING_SLOTS,
    map_flags: 0,
    id: 0,
    pinning: PIN_BY_NAME,
}));

/// A record reserved in a supervisor's ring buffer: to be filled, then [`submit`]ted.
pub struct Reserved {
    ev: *mut Event,
    ring: *mut c_void,
}

impl Reserved {
    /// The record.
    pub fn as_mut_ptr(&mut self) -> *mut Event {
        self.ev
    }
}

/// The current task's call, if it is in one.
fn current_call() -> Option<(u64, CallInfo)> {
    // SAFETY: a helper without arguments.
    let cgid = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out before any other map operation.
    let info = unsafe { CALLS.get(&cgid) }.copied()?;
    Some((cgid, info))
}

fn count_lost(cgid: u64) {
    match LOST.get_ptr_mut(&cgid) {
        // SAFETY: the pointer is to this CPU's copy of the value, valid for this program run,
        // and no other program run on this CPU can interleave with it.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = LOST.insert(&cgid, &1, 0);
        }
    }
}

/// Reserves an event in the call's ring buffer and fills the common fields; the caller fills
/// the rest and submits. `None` (counted as lost) when the buffer is full or the call has
/// none.
fn reserve(cgid: u64, ring: u32, kind: u32, verdict: u32) -> Option<Reserved> {
    reserve_for(cgid, ring, kind, verdict, true)
}

/// [`reserve`], with the task's ids only where `task` (the cgroup device programs of kernels
/// before 6.x may not ask for them: Linux 5.10 refuses such a program).
fn reserve_for(cgid: u64, slot: u32, kind: u32, verdict: u32, task: bool) -> Option<Reserved> {
    // SAFETY: a lookup in the map of maps: the result is the inner ring buffer, or null.
    let ring = unsafe { bpf_map_lookup_elem(RINGS.0.get() as *mut c_void, &slot as *const u32 as *const c_void) };
    if ring.is_null() {
        count_lost(cgid);
        return None;
    }
    // SAFETY: `ring` is a ring buffer map; the helper returns room for one Event, or null.
    let ev = unsafe { bpf_ringbuf_reserve(ring, core::mem::size_of::<Event>() as u64, 0) } as *mut Event;
    if ev.is_null() {
        count_lost(cgid);
        return None;
    }
    // SAFETY: `ev` points to a reserved, writable ring buffer record of size_of::<Event>().
    unsafe {
        (*ev).cgroup_id = cgid;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).ret = 0;
        (*ev).arg = 0;
        (*ev).kind = kind;
        (*ev).verdict = verdict;
        let pid_tgid = if task { bpf_get_current_pid_tgid() } else { 0 };
        (*ev).pid = (pid_tgid >> 32) as u32;
        (*ev).tid = pid_tgid as u32;
        (*ev).flags = 0;
        (*ev).family = 0;
        (*ev).port = 0;
        (*ev).info = 0;
        (*ev).target = 0;
        (*ev).sock_type = 0;
        (*ev)._pad = 0;
        (*ev).addr = [0; 16];
        (*ev).path[0] = 0;
    }
    Some(Reserved { ev, ring })
}

/// `bpf_ringbuf_submit` flags and `bpf_ringbuf_query`'s "bytes not yet consumed".
const RB_NO_WAKEUP: u64 = 1;
const RB_FORCE_WAKEUP: u64 = 2;
const RB_AVAIL_DATA: u64 = 0;

/// Submits an event without waking the supervisor, unless this record is the one that filled
/// its ring past another eighth, or the ring is half full: the supervisor drains every few
/// milliseconds anyway, and a wakeup (an IPI each) per event while the ring stayed an eighth
/// full was most of the cost a busy tool paid for being audited. Past half, every event
/// wakes it again: the IPIs then slow the tool down, which is what keeps a flood from
/// overrunning the ring.
fn submit(entry: Reserved) {
    // SAFETY: `entry.ring` is the ring buffer the record was reserved in.
    let queued = unsafe { bpf_ringbuf_query(entry.ring, RB_AVAIL_DATA) };
    let step = u64::from(RING_BYTES / 8);
    // Records are 8 bytes of header and an Event: the one whose end passed a multiple of
    // `step` is the one that crossed it.
    let crossed = queued % step < (core::mem::size_of::<Event>() as u64 + 8) && queued >= step;
    let flags = if crossed || queued >= 4 * step { RB_FORCE_WAKEUP } else { RB_NO_WAKEUP };
    // SAFETY: the record was reserved by `reserve` and is submitted once.
    unsafe { bpf_ringbuf_submit(entry.ev as *mut c_void, flags) };
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
