//! The x86_64 syscalls the fallback's tracepoints see, by number and tracepoint name: one
//! table for the programs (which match numbers), the loader (which attaches by name) and the
//! supervisor (which names what a record's number was).

/// A syscall: its x86_64 number, the name of its `syscalls/sys_{enter,exit}_*` tracepoints,
/// and the name a record gives it (the same, except where the kernel's definition differs
/// from the libc name: `umount` is `umount2`).
#[derive(Clone, Copy, Debug)]
pub struct Syscall {
    pub nr: u32,
    pub tracepoint: &'static str,
    pub name: &'static str,
}

const fn sc(nr: u32, tracepoint: &'static str) -> Syscall {
    Syscall { nr, tracepoint, name: tracepoint }
}

pub const SYS_MMAP: u32 = 9;
pub const SYS_MPROTECT: u32 = 10;
pub const SYS_OPEN: u32 = 2;
pub const SYS_CONNECT: u32 = 42;
pub const SYS_BIND: u32 = 49;
pub const SYS_EXECVE: u32 = 59;
pub const SYS_TRUNCATE: u32 = 76;
pub const SYS_FTRUNCATE: u32 = 77;
pub const SYS_RENAME: u32 = 82;
pub const SYS_MKDIR: u32 = 83;
pub const SYS_RMDIR: u32 = 84;
pub const SYS_CREAT: u32 = 85;
pub const SYS_LINK: u32 = 86;
pub const SYS_UNLINK: u32 = 87;
pub const SYS_SYMLINK: u32 = 88;
pub const SYS_CHMOD: u32 = 90;
pub const SYS_FCHMOD: u32 = 91;
pub const SYS_CHOWN: u32 = 92;
pub const SYS_FCHOWN: u32 = 93;
pub const SYS_LCHOWN: u32 = 94;
pub const SYS_MKNOD: u32 = 133;
pub const SYS_OPENAT: u32 = 257;
pub const SYS_MKDIRAT: u32 = 258;
pub const SYS_MKNODAT: u32 = 259;
pub const SYS_FCHOWNAT: u32 = 260;
pub const SYS_UNLINKAT: u32 = 263;
pub const SYS_RENAMEAT: u32 = 264;
pub const SYS_LINKAT: u32 = 265;
pub const SYS_SYMLINKAT: u32 = 266;
pub const SYS_FCHMODAT: u32 = 268;
pub const SYS_RENAMEAT2: u32 = 316;
pub const SYS_EXECVEAT: u32 = 322;
pub const SYS_PKEY_MPROTECT: u32 = 329;
pub const SYS_OPENAT2: u32 = 437;
pub const SYS_FCHMODAT2: u32 = 452;

/// Traced at entry and exit: opens, execs, file-system changes, connect and bind (for what
/// Landlock refused), and mprotect to executable. Those a kernel does not have (openat2
/// before 5.6, fchmodat2 before 6.6) are left out by the loader.
pub const TRACED: [Syscall; 34] = [
    sc(SYS_OPEN, "open"),
    sc(SYS_CREAT, "creat"),
    sc(SYS_OPENAT, "openat"),
    sc(SYS_OPENAT2, "openat2"),
    sc(SYS_EXECVE, "execve"),
    sc(SYS_EXECVEAT, "execveat"),
    sc(SYS_UNLINK, "unlink"),
    sc(SYS_UNLINKAT, "unlinkat"),
    sc(SYS_RMDIR, "rmdir"),
    sc(SYS_RENAME, "rename"),
    sc(SYS_RENAMEAT, "renameat"),
    sc(SYS_RENAMEAT2, "renameat2"),
    sc(SYS_LINK, "link"),
    sc(SYS_LINKAT, "linkat"),
    sc(SYS_SYMLINK, "symlink"),
    sc(SYS_SYMLINKAT, "symlinkat"),
    sc(SYS_TRUNCATE, "truncate"),
    sc(SYS_FTRUNCATE, "ftruncate"),
    sc(SYS_CHMOD, "chmod"),
    sc(SYS_FCHMOD, "fchmod"),
    sc(SYS_FCHMODAT, "fchmodat"),
    sc(SYS_FCHMODAT2, "fchmodat2"),
    sc(SYS_CHOWN, "chown"),
    sc(SYS_LCHOWN, "lchown"),
    sc(SYS_FCHOWN, "fchown"),
    sc(SYS_FCHOWNAT, "fchownat"),
    sc(SYS_MKNOD, "mknod"),
    sc(SYS_MKNODAT, "mknodat"),
    sc(SYS_MKDIR, "mkdir"),
    sc(SYS_CONNECT, "connect"),
    sc(SYS_BIND, "bind"),
    sc(SYS_MPROTECT, "mprotect"),
    sc(SYS_PKEY_MPROTECT, "pkey_mprotect"),
    sc(SYS_MKDIRAT, "mkdirat"),
];

/// What agentd's seccomp filter refuses with `EPERM` (some only with certain arguments). It
/// refuses before the entry's tracepoint runs, so the exit alone shows the refusal: the
/// loader traces these exits (those not in [`TRACED`] already). The hot ones it refuses
/// only for TCP Fast Open (sendto, sendmsg, sendmmsg, setsockopt) are left out: every
/// process of the host would pay.
pub const REFUSED_BY_FILTER: [Syscall; 40] = [
    sc(SYS_MMAP, "mmap"),
    sc(SYS_MPROTECT, "mprotect"),
    sc(SYS_PKEY_MPROTECT, "pkey_mprotect"),
    sc(30, "shmat"),
    sc(41, "socket"),
    sc(53, "socketpair"),
    sc(56, "clone"),
    sc(272, "unshare"),
    sc(103, "syslog"),
    sc(155, "pivot_root"),
    sc(161, "chroot"),
    sc(163, "acct"),
    sc(165, "mount"),
    Syscall { nr: 166, tracepoint: "umount", name: "umount2" },
    sc(167, "swapon"),
    sc(168, "swapoff"),
    sc(169, "reboot"),
    sc(175, "init_module"),
    sc(313, "finit_module"),
    sc(176, "delete_module"),
    sc(246, "kexec_load"),
    sc(320, "kexec_file_load"),
    sc(248, "add_key"),
    sc(249, "request_key"),
    sc(250, "keyctl"),
    sc(298, "perf_event_open"),
    sc(321, "bpf"),
    sc(323, "userfaultfd"),
    sc(308, "setns"),
    sc(319, "memfd_create"),
    sc(425, "io_uring_setup"),
    sc(426, "io_uring_enter"),
    sc(427, "io_uring_register"),
    sc(428, "open_tree"),
    sc(429, "move_mount"),
    sc(430, "fsopen"),
    sc(431, "fsconfig"),
    sc(432, "fsmount"),
    sc(433, "fspick"),
    sc(442, "mount_setattr"),
];

const fn numbers<const N: usize>(table: &[Syscall; N]) -> [u32; N] {
    let mut out = [0; N];
    let mut i = 0;
    while i < N {
        out[i] = table[i].nr;
        i += 1;
    }
    out
}

/// [`REFUSED_BY_FILTER`]'s numbers alone, for the programs (no strings in their data).
pub const REFUSED_BY_FILTER_NRS: [u32; 40] = numbers(&REFUSED_BY_FILTER);

/// Whether agentd's seccomp filter refuses syscall `nr` (with some arguments).
#[inline(always)]
pub fn refused_by_filter(nr: u64) -> bool {
    let mut i = 0;
    while i < REFUSED_BY_FILTER_NRS.len() {
        if u64::from(REFUSED_BY_FILTER_NRS[i]) == nr {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether a [`TRACED`] syscall's entry is traced too: all but the opens, which are
/// recorded at their end alone.
pub fn entered(s: &Syscall) -> bool {
    !matches!(s.nr, SYS_OPEN | SYS_CREAT | SYS_OPENAT | SYS_OPENAT2)
}

/// [`REFUSED_BY_FILTER`] but those [`TRACED`] already: the syscalls whose exit alone is
/// traced.
pub fn exit_only() -> impl Iterator<Item = &'static Syscall> {
    REFUSED_BY_FILTER.iter().filter(|s| !TRACED.iter().any(|t| t.nr == s.nr))
}

/// The syscall numbered `nr`, if it is one of these tables'.
pub fn by_number(nr: u32) -> Option<&'static Syscall> {
    TRACED.iter().chain(REFUSED_BY_FILTER.iter()).find(|s| s.nr == nr)
}
