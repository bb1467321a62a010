//! The call's seccomp filters, compiled with `seccompiler` in the supervisor and installed by
//! the child right before `execve`.
//!
//! Landlock and namespaces do the confining; seccomp closes what they do not see:
//! - sockets other than Unix, TCP and UDP (SCTP, raw, packet and other families). A call's
//!   UDP reaches only its own network namespace, where agentd's DNS stub is the one listener;
//! - io_uring, whose operations bypass seccomp's view of syscalls;
//! - kernel keyrings (not namespaced), bpf, perf events, userfaultfd, module and kexec calls;
//! - new user namespaces and mount-API calls (large attack surface, never needed by a tool);
//! - `clone3`, refused with ENOSYS so libc falls back to `clone`, whose flags we can inspect;
//! - TCP Fast Open connects (`MSG_FASTOPEN`, `TCP_FASTOPEN_CONNECT`), which skip the LSM
//!   connect hook that Landlock relies on;
//! - `memfd_create` where the kernel cannot make memfds non-executable (before 6.3).
//!
//! Syscalls from a foreign ABI (32-bit `int 0x80`, x32) kill the process.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("agentd's seccomp filter is written for x86_64 (syscall numbers, audit arch, x32 check)");

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filter could not be built (a bug, not a host condition).
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter")]
pub struct SeccompError(#[from] seccompiler::BackendError);

/// The compiled filter.
#[derive(Debug, Clone)]
pub struct Filters {
    /// The whole program: ABI checks, `clone3` → ENOSYS, then the EPERM rules.
    pub program: BpfProgram,
}

/// What the plan changes in the filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// `vm.memfd_noexec` protects memfds; otherwise `memfd_create` is refused.
    pub memfd_noexec: bool,
    /// Refuse writable+executable memory here, the kernel having no `PR_SET_MDWE`.
    pub deny_write_execute: bool,
    /// Connects are checked by the call's init (`unix_gate`); otherwise Unix sockets other
    /// than socketpairs are refused.
    pub unix_gate: bool,
}

/// What the filters refuse, for the call's enforcement report.
pub const SUMMARY: &[&str] = &[
    "sockets other than AF_UNIX, and TCP and UDP over AF_INET/AF_INET6",
    "AF_UNIX datagram (and raw) sockets: their sends name destinations seccomp cannot see",
    "io_uring",
    "keyctl/add_key/request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "new user namespaces",
    "mount API, chroot, setns",
    "module and kexec calls",
    "TCP Fast Open connects",
    "memfd_create where memfds cannot be made non-executable",
    "writable+executable mmap, mprotect to executable, shmat with SHM_EXEC (where PR_SET_MDWE is missing)",
    "32-bit and x32 syscall ABIs (kills)",
];

const DENY_ALWAYS: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_setns,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
];

fn cond(arg: u8, op: Op, value: u64) -> Result<Cond, SeccompError> {
    Ok(Cond::new(arg, Len::Dword, op, value)?)
}

/// Unix datagram sockets: a `sendto`/`sendmsg` may name any destination, and seccomp cannot
/// read it. The `type` argument's low bits are the socket type, and the kernel makes a Unix
/// `SOCK_RAW` socket a datagram one.
fn unix_dgram_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    [libc::SOCK_DGRAM, libc::SOCK_RAW]
        .into_iter()
        .map(|ty| {
            Ok(SeccompRule::new(vec![cond(0, Op::Eq, libc::AF_UNIX as u64)?, cond(1, Op::MaskedEq(0xf), ty as u64)?])?)
        })
        .collect()
}

/// socket(domain, type, protocol): refuse anything but AF_UNIX (stream and seqpacket; none
/// at all without the gate), and TCP and UDP over IPv4/IPv6.
fn socket_rules(unix_gate: bool) -> Result<Vec<SeccompRule>, SeccompError> {
    let (unix, inet, inet6) = (libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64);
    let mut rules =
        vec![SeccompRule::new(vec![cond(0, Op::Ne, unix)?, cond(0, Op::Ne, inet)?, cond(0, Op::Ne, inet6)?])?];
    if unix_gate {
        rules.extend(unix_dgram_rules()?);
    } else {
        rules.push(SeccompRule::new(vec![cond(0, Op::Eq, unix)?])?);
    }
    // SOCK_STREAM and SOCK_DGRAM, alone or with SOCK_NONBLOCK and/or SOCK_CLOEXEC: the only
    // types allowed. Listing the eight values keeps the filter short, and the kernel emulates
    // the filter for every syscall number when it is installed, so its length is paid on
    // each call.
    let (nonblock, cloexec) = (libc::SOCK_NONBLOCK as u64, libc::SOCK_CLOEXEC as u64);
    let types: Vec<u64> = [libc::SOCK_STREAM as u64, libc::SOCK_DGRAM as u64]
        .into_iter()
        .flat_map(|t| [t, t | nonblock, t | cloexec, t | nonblock | cloexec])
        .collect();
    let (tcp, udp) = (libc::IPPROTO_TCP as u64, libc::IPPROTO_UDP as u64);
    for family in [inet, inet6] {
        let mut other_type = vec![cond(0, Op::Eq, family)?];
        for ty in &types {
            other_type.push(cond(1, Op::Ne, *ty)?);
        }
        rules.push(SeccompRule::new(other_type)?);
        let other_protocol =
            vec![cond(0, Op::Eq, family)?, cond(2, Op::Ne, 0)?, cond(2, Op::Ne, tcp)?, cond(2, Op::Ne, udp)?];
        rules.push(SeccompRule::new(other_protocol)?);
    }
    Ok(rules)
}

// Classic BPF opcodes of the hand-written programs.
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x05 | 0x10;
const RET_K: u16 = 0x06;

/// The tool's extra filter for the Unix-socket gate (`unix_gate`): `connect` goes to the
/// listener, everything else on to the other filter. (The architecture is checked there; a
/// foreign one never reaches this far.)
pub(crate) fn connect_notify() -> Vec<libc::sock_filter> {
    const ALLOW: u32 = 0x7fff_0000;
    let ins = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        ins(LD_W_ABS, 0, 0, 0),                         // nr
        ins(JEQ_K, 0, 1, libc::SYS_connect as u32),     // connect → 2, else 3
        ins(RET_K, 0, 0, libc::SECCOMP_RET_USER_NOTIF), // 2
        ins(RET_K, 0, 0, ALLOW),                        // 3
    ]
}

/// Instructions put before seccompiler's program: kill foreign ABIs (seccompiler checks only
/// the audit arch, and x32 syscall numbers share it), and refuse `clone3` with ENOSYS. One
/// program rather than three: each filter is JIT-compiled and emulated per syscall number when
/// installed, which is paid on every call.
fn prefix() -> BpfProgram {
    const JGE_K: u16 = 0x05 | 0x30;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    const KILL_PROCESS: u32 = 0x8000_0000;
    const ERRNO: u32 = 0x0005_0000;
    let ins = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    vec![
        ins(LD_W_ABS, 0, 0, 4),                        // 0: arch
        ins(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),           // 1: x86_64 → 3
        ins(RET_K, 0, 0, KILL_PROCESS),                // 2: foreign arch
        ins(LD_W_ABS, 0, 0, 0),                        // 3: nr
        ins(JGE_K, 0, 1, X32_SYSCALL_BIT),             // 4: x32 → 5, else 6
        ins(RET_K, 0, 0, KILL_PROCESS),                // 5
        ins(JEQ_K, 0, 1, libc::SYS_clone3 as u32),     // 6: clone3 → 7, else 8
        ins(RET_K, 0, 0, ERRNO | libc::ENOSYS as u32), // 7
    ]
}

/// The filters for `opts`, compiled once per process (a daemon spawns many calls).
pub fn filters(opts: Options) -> Result<Filters, SeccompError> {
    static CACHE: std::sync::Mutex<Vec<(Options, Filters)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, f)) = cache.iter().find(|(o, _)| *o == opts) {
        return Ok(f.clone());
    }
    let f = build(opts)?;
    cache.push((opts, f.clone()));
    Ok(f)
}

/// Builds the filters for x86_64.
fn build(opts: Options) -> Result<Filters, SeccompError> {
    let deny = SeccompFilter::new(
        refused(opts)?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    let deny: BpfProgram = deny.try_into()?;
    let mut program = prefix();
    program.extend(deny);
    Ok(Filters { program })
}

/// The syscalls refused with `EPERM`, with the argument conditions under which they are
/// (none: always).
fn refused(opts: Options) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENY_ALWAYS.iter().map(|nr| (*nr, Vec::new())).collect();
    deny.insert(libc::SYS_socket, socket_rules(opts.unix_gate)?);
    deny.insert(libc::SYS_socketpair, unix_dgram_rules()?);
    const MSG_FASTOPEN: u64 = 0x2000_0000;
    const TCP_FASTOPEN_CONNECT: u64 = 30;
    let fastopen = |arg| -> Result<Vec<SeccompRule>, SeccompError> {
        Ok(vec![SeccompRule::new(vec![cond(arg, Op::MaskedEq(MSG_FASTOPEN), MSG_FASTOPEN)?])?])
    };
    deny.insert(libc::SYS_sendto, fastopen(3)?);
    deny.insert(libc::SYS_sendmsg, fastopen(2)?);
    deny.insert(libc::SYS_sendmmsg, fastopen(3)?);
    let tcp = libc::IPPROTO_TCP as u64;
    deny.insert(
        libc::SYS_setsockopt,
        vec![SeccompRule::new(vec![cond(1, Op::Eq, tcp)?, cond(2, Op::Eq, TCP_FASTOPEN_CONNECT)?])?],
    );
    if !opts.memfd_noexec {
        deny.insert(libc::SYS_memfd_create, Vec::new());
    }
    if opts.deny_write_execute {
        // As systemd's MemoryDenyWriteExecute: seccomp cannot see what a mapping held before,
        // so any change to executable is refused, and new mappings may not be both.
        let (w, x) = (libc::PROT_WRITE as u64, libc::PROT_EXEC as u64);
        deny.insert(libc::SYS_mmap, vec![SeccompRule::new(vec![cond(2, Op::MaskedEq(w | x), w | x)?])?]);
        for nr in [libc::SYS_mprotect, libc::SYS_pkey_mprotect] {
            deny.insert(nr, vec![SeccompRule::new(vec![cond(2, Op::MaskedEq(x), x)?])?]);
        }
        let shm_exec = libc::SHM_EXEC as u64;
        deny.insert(libc::SYS_shmat, vec![SeccompRule::new(vec![cond(2, Op::MaskedEq(shm_exec), shm_exec)?])?]);
    }
    let newuser = libc::CLONE_NEWUSER as u64;
    deny.insert(libc::SYS_unshare, vec![SeccompRule::new(vec![cond(0, Op::MaskedEq(newuser), newuser)?])?]);
    deny.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![Cond::new(0, Len::Qword, Op::MaskedEq(newuser), newuser)?])?],
    );
    Ok(deny)
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile() {
        let opts = super::Options { memfd_noexec: false, deny_write_execute: true, unix_gate: true };
        let f = super::build(opts).expect("filters build");
        assert!(f.program.len() > super::prefix().len());
        assert!(f.program.len() < 400, "the filter grew to {} instructions", f.program.len());
    }

    /// The audit layer traces the exits of what the filter refuses, from its own table: the
    /// two must name the same syscalls (but the TCP Fast Open ones, which it leaves out so
    /// that the host's every send does not pay).
    #[test]
    fn the_audit_layer_knows_every_refusal() {
        use agentd_ebpf_common::syscalls::REFUSED_BY_FILTER;
        let opts = super::Options { memfd_noexec: false, deny_write_execute: true, unix_gate: true };
        let fastopen = [libc::SYS_sendto, libc::SYS_sendmsg, libc::SYS_sendmmsg, libc::SYS_setsockopt];
        let filter: std::collections::BTreeSet<i64> =
            super::refused(opts).expect("rules").into_keys().filter(|nr| !fastopen.contains(nr)).collect();
        let audit: std::collections::BTreeSet<i64> = REFUSED_BY_FILTER.iter().map(|s| i64::from(s.nr)).collect();
        assert_eq!(filter, audit);
    }
}
