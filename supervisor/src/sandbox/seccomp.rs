//! The call's seccomp filters, compiled with `seccompiler` in the supervisor and installed by
//! the child right before `execve`.
//!
//! Landlock and namespaces do the confining; seccomp closes what they do not see:
//! - sockets other than Unix and TCP (Landlock's port rules only know TCP, so UDP, SCTP and
//!   raw sockets in a shared network namespace would be unfiltered);
//! - io_uring, whose operations bypass seccomp's view of syscalls;
//! - kernel keyrings (not namespaced), bpf, perf events, userfaultfd, module and kexec calls;
//! - new user namespaces and mount-API calls (large attack surface, never needed by a tool);
//! - `clone3`, refused with ENOSYS so libc falls back to `clone`, whose flags we can inspect.
//!
//! Syscalls from a foreign ABI (32-bit `int 0x80`) kill the process.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Why the filter could not be built (a bug, not a host condition).
#[derive(Debug, thiserror::Error)]
#[error("building the seccomp filter")]
pub struct SeccompError(#[from] seccompiler::BackendError);

/// The compiled filters, in install order.
#[derive(Debug, Clone)]
pub struct Filters {
    /// Calls refused with EPERM.
    pub deny: BpfProgram,
    /// `clone3`, refused with ENOSYS.
    pub enosys: BpfProgram,
}

/// What the filters refuse, for the call's enforcement report.
pub const SUMMARY: &[&str] = &[
    "sockets other than AF_UNIX and TCP over AF_INET/AF_INET6",
    "io_uring",
    "keyctl/add_key/request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "new user namespaces",
    "mount API, chroot, setns",
    "module and kexec calls",
    "32-bit syscall ABI (kills)",
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

/// socket(domain, type, protocol): refuse anything but AF_UNIX and TCP over IPv4/IPv6.
fn socket_rules() -> Result<Vec<SeccompRule>, SeccompError> {
    let (unix, inet, inet6) = (libc::AF_UNIX as u64, libc::AF_INET as u64, libc::AF_INET6 as u64);
    let mut rules =
        vec![SeccompRule::new(vec![cond(0, Op::Ne, unix)?, cond(0, Op::Ne, inet)?, cond(0, Op::Ne, inet6)?])?];
    for family in [inet, inet6] {
        // The socket type sits in the low 4 bits; SOCK_NONBLOCK/SOCK_CLOEXEC above them.
        for ty in (0..16u64).filter(|t| *t != libc::SOCK_STREAM as u64) {
            rules.push(SeccompRule::new(vec![cond(0, Op::Eq, family)?, cond(1, Op::MaskedEq(0xf), ty)?])?);
        }
        let tcp = libc::IPPROTO_TCP as u64;
        rules.push(SeccompRule::new(vec![cond(0, Op::Eq, family)?, cond(2, Op::Ne, 0)?, cond(2, Op::Ne, tcp)?])?);
    }
    Ok(rules)
}

/// Builds both filters for x86_64.
pub fn build() -> Result<Filters, SeccompError> {
    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = DENY_ALWAYS.iter().map(|nr| (*nr, Vec::new())).collect();
    deny.insert(libc::SYS_socket, socket_rules()?);
    let newuser = libc::CLONE_NEWUSER as u64;
    deny.insert(libc::SYS_unshare, vec![SeccompRule::new(vec![cond(0, Op::MaskedEq(newuser), newuser)?])?]);
    deny.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![Cond::new(0, Len::Qword, Op::MaskedEq(newuser), newuser)?])?],
    );
    let deny =
        SeccompFilter::new(deny, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), TargetArch::x86_64)?;
    let enosys: BTreeMap<i64, Vec<SeccompRule>> = [(libc::SYS_clone3, Vec::new())].into();
    let enosys = SeccompFilter::new(
        enosys,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok(Filters { deny: deny.try_into()?, enosys: enosys.try_into()? })
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile() {
        let f = super::build().expect("filters build");
        assert!(!f.deny.is_empty() && !f.enosys.is_empty());
    }
}
