//! Fallback: `raw_tracepoint/sys_enter` records exec and open attempts, with the path the tool
//! passed (not what it resolved to: the LSM layer records that) and the directory fd it is
//! relative to; `raw_tracepoint/sys_exit` records each one's result, which the supervisor
//! pairs with the attempt by thread id. The attempt is recorded on entry, so a tool killed
//! in the middle of a syscall still leaves it in the log.

use agentd_ebpf_common::{EV_EXEC, EV_OPEN, EV_RESULT, PATH_LEN, PATH_TRUNCATED, VERDICT_ALLOWED};
use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_str_bytes};
use aya_ebpf::macros::raw_tracepoint;
use aya_ebpf::programs::RawTracePointContext;
use aya_ebpf::EbpfContext;

use crate::{current_call, reserve, submit};

const SYS_OPEN: u64 = 2;
const SYS_CREAT: u64 = 85;
const SYS_EXECVE: u64 = 59;
const SYS_OPENAT: u64 = 257;
const SYS_EXECVEAT: u64 = 322;
const SYS_OPENAT2: u64 = 437;

/// x86_64 `struct pt_regs` offsets of the syscall argument registers.
const REG_DI: usize = 14 * 8;
const REG_SI: usize = 13 * 8;
const REG_DX: usize = 12 * 8;
const REG_R8: usize = 9 * 8;
const REG_ORIG_AX: usize = 15 * 8;

/// `AT_FDCWD`, as a u32 in the event's `target`.
const AT_FDCWD: u32 = -100i32 as u32;
/// creat() is open(O_CREAT | O_WRONLY | O_TRUNC).
const CREAT_FLAGS: u64 = 0o100 | 0o1 | 0o1000;

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
    let dirfd = || reg(regs, REG_DI) as u32;
    let (kind, path, flags, dir) = match nr {
        SYS_EXECVE => (EV_EXEC, reg(regs, REG_DI), 0, AT_FDCWD),
        // The flags say AT_EMPTY_PATH for a fileless exec of the fd itself.
        SYS_EXECVEAT => (EV_EXEC, reg(regs, REG_SI), reg(regs, REG_R8), dirfd()),
        SYS_OPEN => (EV_OPEN, reg(regs, REG_DI), reg(regs, REG_SI), AT_FDCWD),
        SYS_CREAT => (EV_OPEN, reg(regs, REG_DI), CREAT_FLAGS, AT_FDCWD),
        SYS_OPENAT => (EV_OPEN, reg(regs, REG_SI), reg(regs, REG_DX), dirfd()),
        SYS_OPENAT2 => {
            // struct open_how starts with the u64 flags.
            // SAFETY: a user pointer read through the helper, which cannot fault.
            let flags = unsafe { bpf_probe_read_user(reg(regs, REG_DX) as *const u64) }.unwrap_or(0);
            (EV_OPEN, reg(regs, REG_SI), flags, dirfd())
        }
        _ => return 0,
    };
    if let Some(mut entry) = reserve(cgid, &info, kind, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record; the path is read from user memory by the helper.
        unsafe {
            (*ev).flags = flags as u32;
            (*ev).target = dir;
            let dst = &mut (*ev).path;
            match bpf_probe_read_user_str_bytes(path as *const u8, dst) {
                Ok(s) if s.len() >= PATH_LEN - 1 => (*ev).info = PATH_TRUNCATED,
                Ok(_) => {}
                Err(_) => dst[0] = 0,
            }
        }
        submit(entry, info.slot);
    }
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    let Some((cgid, info)) = current_call() else { return 0 };
    // SAFETY: sys_exit's raw arguments are (struct pt_regs *regs, long ret).
    let (regs, ret) = unsafe {
        let args = ctx.as_ptr() as *const u64;
        (*args as *const u8, *args.add(1) as i64)
    };
    let nr = reg(regs, REG_ORIG_AX);
    if !matches!(nr, SYS_OPEN | SYS_CREAT | SYS_OPENAT | SYS_OPENAT2 | SYS_EXECVE | SYS_EXECVEAT) {
        return 0;
    }
    if let Some(mut entry) = reserve(cgid, &info, EV_RESULT, VERDICT_ALLOWED) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = nr as u32;
            (*ev).ret = ret;
        }
        submit(entry, info.slot);
    }
    0
}
