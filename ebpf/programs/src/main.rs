//! agentd's kernel-side programs.
//!
//! Every program first looks up the current task's cgroup id in `CALLS`. Tasks that are not
//! in a live tool call's cgroup are left alone at once; the supervisor fills `CALLS` before a
//! call's tool runs and clears it after the call ends.
//!
//! This file holds the fallback layer for kernels without BPF LSM:
//! - `cgroup/connect4|6` and `cgroup/bind4|6` allow exactly the manifest's `host:port` pairs
//!   (Landlock only knows ports), and record each attempt;
//! - `raw_tracepoint/sys_enter` records exec and open attempts with their paths.
//!
//! Events go to the ring buffer of the call's slot; a full buffer is counted in `LOST` per
//! call, never dropped silently.

#![no_std]
#![no_main]

use agentd_ebpf_common::{
    CallInfo, Event, NetKey, CALL_NET_RULES, EV_BIND, EV_CONNECT, EV_EXEC, EV_OPEN, MODE_ENFORCE, NET_BIND,
    NET_CONNECT, PATH_LEN, PATH_TRUNCATED, VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::helpers::gen::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_str_bytes};
use aya_ebpf::macros::{cgroup_sock_addr, map, raw_tracepoint};
use aya_ebpf::maps::{HashMap, PerCpuHashMap, RingBuf};
use aya_ebpf::programs::{RawTracePointContext, SockAddrContext};
use aya_ebpf::EbpfContext;

#[map(name = "CALLS")]
static CALLS: HashMap<u64, CallInfo> = HashMap::pinned(4096, 0);

#[map(name = "NET_ALLOW")]
static NET_ALLOW: HashMap<NetKey, u8> = HashMap::pinned(16384, 0);

/// Events that found their ring buffer full, per call and per CPU (no atomics needed).
#[map(name = "LOST")]
static LOST: PerCpuHashMap<u64, u64> = PerCpuHashMap::pinned(4096, 0);

const RING_BYTES: u32 = 4 << 20;

#[map(name = "EVENTS0")]
static EVENTS0: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS1")]
static EVENTS1: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS2")]
static EVENTS2: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS3")]
static EVENTS3: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS4")]
static EVENTS4: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS5")]
static EVENTS5: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS6")]
static EVENTS6: RingBuf = RingBuf::pinned(RING_BYTES, 0);
#[map(name = "EVENTS7")]
static EVENTS7: RingBuf = RingBuf::pinned(RING_BYTES, 0);

fn ring(slot: u32) -> &'static RingBuf {
    match slot {
        0 => &EVENTS0,
        1 => &EVENTS1,
        2 => &EVENTS2,
        3 => &EVENTS3,
        4 => &EVENTS4,
        5 => &EVENTS5,
        6 => &EVENTS6,
        _ => &EVENTS7,
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
/// the rest and submits. `None` (counted as lost) when the buffer is full.
fn reserve(
    cgid: u64,
    info: &CallInfo,
    kind: u32,
    verdict: u32,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<Event>> {
    let Some(mut entry) = ring(info.slot).reserve::<Event>(0) else {
        count_lost(cgid);
        return None;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, writable ring buffer record of size_of::<Event>().
    unsafe {
        (*ev).cgroup_id = cgid;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).kind = kind;
        (*ev).verdict = verdict;
        (*ev).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*ev).flags = 0;
        (*ev).family = 0;
        (*ev).port = 0;
        (*ev).info = 0;
        (*ev).addr = [0; 16];
        (*ev).path[0] = 0;
    }
    Some(entry)
}

// ---- network: exact host:port grants ----

fn sock_addr(ctx: &SockAddrContext, op: u32, v6: bool) -> i32 {
    // These programs are attached to agentd's parent cgroup: every task below it belongs to a
    // call. One that is not registered (yet, or any more) gets nothing: fail closed.
    let Some((cgid, info)) = current_call() else { return 0 };
    if info.flags & CALL_NET_RULES == 0 {
        // No network granted: the call has its own empty namespace; Landlock denies TCP.
        return 1;
    }
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    let mut key = NetKey { cgroup_id: cgid, op, ..NetKey::default() };
    // SAFETY: the context pointer is valid for this program run; fields are read as the
    // verifier allows (u32 loads).
    unsafe {
        key.family = (*sa).user_family as u16;
        key.port = u16::from_be((*sa).user_port as u16);
        if v6 {
            for i in 0..4 {
                let w = (*sa).user_ip6[i].to_ne_bytes();
                key.addr[i * 4..i * 4 + 4].copy_from_slice(&w);
            }
        } else {
            key.addr[..4].copy_from_slice(&(*sa).user_ip4.to_ne_bytes());
        }
    }
    // SAFETY: lookups copy nothing out.
    let exact = unsafe { NET_ALLOW.get(&key) }.is_some();
    let allowed = exact || {
        let mut any = key;
        any.addr = [0; 16];
        any.any_addr = 1;
        // SAFETY: as above.
        unsafe { NET_ALLOW.get(&any) }.is_some()
    };
    let deny = !allowed && info.mode == MODE_ENFORCE;
    let kind = if op == NET_BIND { EV_BIND } else { EV_CONNECT };
    if let Some(mut entry) = reserve(cgid, &info, kind, if allowed { VERDICT_ALLOWED } else { VERDICT_DENIED }) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = op;
            (*ev).family = key.family;
            (*ev).port = key.port;
            (*ev).addr = key.addr;
        }
        entry.submit(0);
    }
    i32::from(!deny)
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_CONNECT, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_CONNECT, true)
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_BIND, false)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_BIND, true)
}

// ---- syscall audit ----

const SYS_OPEN: u64 = 2;
const SYS_EXECVE: u64 = 59;
const SYS_OPENAT: u64 = 257;
const SYS_EXECVEAT: u64 = 322;
const SYS_OPENAT2: u64 = 437;

/// x86_64 `struct pt_regs` offsets of the syscall argument registers.
const REG_DI: usize = 14 * 8;
const REG_SI: usize = 13 * 8;
const REG_DX: usize = 12 * 8;

fn reg(regs: *const u8, off: usize) -> u64 {
    // SAFETY: `regs` is the pt_regs pointer sys_enter passes; reading kernel memory through
    // the helper cannot fault.
    unsafe { bpf_probe_read_kernel(regs.add(off) as *const u64) }.unwrap_or(0)
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    let Some((cgid, info)) = current_call() else { return 0 };
    // SAFETY: sys_enter's raw arguments are (struct pt_regs *regs, long id).
    let (regs, nr) = unsafe {
        let args = ctx.as_ptr() as *const u64;
        (*args as *const u8, *args.add(1))
    };
    let (kind, path, flags) = match nr {
        SYS_EXECVE => (EV_EXEC, reg(regs, REG_DI), 0),
        SYS_EXECVEAT => (EV_EXEC, reg(regs, REG_SI), 0),
        SYS_OPEN => (EV_OPEN, reg(regs, REG_DI), reg(regs, REG_SI)),
        SYS_OPENAT => (EV_OPEN, reg(regs, REG_SI), reg(regs, REG_DX)),
        SYS_OPENAT2 => {
            // struct open_how starts with the u64 flags.
            // SAFETY: a user pointer read through the helper, which cannot fault.
            let flags = unsafe { bpf_probe_read_user(reg(regs, REG_DX) as *const u64) }.unwrap_or(0);
            (EV_OPEN, reg(regs, REG_SI), flags)
        }
        _ => return 0,
    };
    if let Some(mut entry) = reserve(cgid, &info, kind, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record; the path is read from user memory by the helper.
        unsafe {
            (*ev).flags = flags as u32;
            let dst = &mut (*ev).path;
            match bpf_probe_read_user_str_bytes(path as *const u8, dst) {
                Ok(s) if s.len() >= PATH_LEN - 1 => (*ev).info = PATH_TRUNCATED,
                Ok(_) => {}
                Err(_) => dst[0] = 0,
            }
        }
        entry.submit(0);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
