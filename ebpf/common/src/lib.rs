//! Types shared by agentd's eBPF programs and the supervisor. Every type is `#[repr(C)]`,
//! plain old data, with explicit padding, so both sides agree on every byte.
#![no_std]

pub mod syscalls;

/// A call is audited: events are recorded, nothing is denied by the BPF layer.
pub const MODE_AUDIT: u32 = 0;
/// A call is enforced: what the manifest does not grant is denied, and recorded.
pub const MODE_ENFORCE: u32 = 1;

/// Bytes of each supervisor's event ring buffer (a power of two, a multiple of the page).
pub const RING_BYTES: u32 = 4 << 20;

/// Entries of `RINGS`: event ring buffers that supervisors living at once can hold.
pub const RING_SLOTS: u32 = 4096;

/// Bytes of a path kept in an event (longer paths are cut; `PATH_TRUNCATED` says so).
pub const PATH_LEN: usize = 256;

/// `CALLS` value: a live call, keyed by the cgroup id of its v2 cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallInfo {
    /// [`MODE_AUDIT`] or [`MODE_ENFORCE`].
    pub mode: u32,
    /// The supervisor that registered the call (a random id; its lock file tells whether it
    /// is alive).
    pub owner: u32,
    /// `CALL_*` flags.
    pub flags: u32,
    /// Zero until the call's first exec (the tool's); the LSM programs set it. Before that the
    /// call's process is agentd setting up the sandbox, which is neither checked nor recorded.
    pub armed: u32,
    /// Host pid of the call's init (0 until the supervisor knows it), whose ptrace access to
    /// the tool's processes (made to take their sockets for the Unix-socket gate) is agentd's
    /// own and not recorded.
    pub init_tgid: u32,
    /// The slot in `RINGS` of that supervisor's ring buffer, where the call's events go.
    pub ring: u32,
}

/// The call has network grants: connects and binds are checked against `NET_ALLOW`.
pub const CALL_NET_RULES: u32 = 1;
/// The call has `deny_open` rules in `PATH_RULES`.
pub const CALL_OPEN_RULES: u32 = 2;
/// The call may not make memory executable once it could have been written (no `allow_jit`):
/// anonymous memory gaining execute, or mapped writable and executable at once, is denied.
pub const CALL_DENY_WX: u32 = 4;
/// Every open of the call is recorded on its own: repeats are not counted (a long-lived
/// sandbox serving many calls, whose records are told apart by their time).
pub const CALL_NO_REPEATS: u32 = 8;

/// Files one call may have counted in `REPEATS` at once; past that, its opens are recorded one
/// by one (more records, never fewer), and other calls keep their room.
pub const REPEATS_PER_CALL: u64 = 4096;

/// The open flags the kernel acts on (x86_64 `VALID_OPEN_FLAGS`): open and openat ignore any
/// other bit, so a key keeps only these (junk bits cannot make one file many keys).
pub const VALID_OPEN_FLAGS: u32 = 0o37777703;

/// `PATH_RULES` kind: exec (and executable mappings) allowed at or below the path.
pub const RULE_EXEC: u32 = 0;
/// `PATH_RULES` kind: opening at or below the path is denied.
pub const RULE_DENY_OPEN: u32 = 1;

/// `PATH_RULES` key: a path rule of one call. The path is canonical, without a trailing
/// slash, and zero-filled after its end, so a lookup with the first N bytes of a resolved path
/// (and zeros after) matches a rule for exactly that prefix. The LSM programs look up every
/// prefix that ends at a `/` and the whole path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathKey {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// `RULE_*`.
    pub kind: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// The path, zero-filled.
    pub path: [u8; PATH_LEN],
}

/// Kernel structure offsets the LSM programs need, read from the running kernel's BTF by the
/// supervisor and written into the programs' read-only data before they are verified (the
/// verifier treats them as constants).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct file` → `f_path`.
    pub file_f_path: u32,
    /// `struct file` → `f_flags`.
    pub file_f_flags: u32,
    /// `struct linux_binprm` → `file`.
    pub bprm_file: u32,
    /// `struct socket` → `type`.
    pub socket_type: u32,
    /// `struct task_struct` → `tgid`.
    pub task_tgid: u32,
    /// `struct task_struct` → `cgroups`.
    pub task_cgroups: u32,
    /// `struct css_set` → `dfl_cgrp`.
    pub css_set_dfl_cgrp: u32,
    /// `struct cgroup` → `kn`.
    pub cgroup_kn: u32,
    /// `struct kernfs_node` → `id`.
    pub kernfs_node_id: u32,
    /// `struct unix_sock` → `path.dentry`: where a Unix socket is bound (NULL if abstract or
    /// unnamed).
    pub unix_sock_path_dentry: u32,
    /// `struct dentry` → `d_inode`.
    pub dentry_inode: u32,
    /// `struct dentry` → `d_name.name`.
    pub dentry_name: u32,
    /// `struct inode` → `i_ino`.
    pub inode_ino: u32,
    /// `struct inode` → `i_sb`.
    pub inode_sb: u32,
    /// `struct super_block` → `s_dev`.
    pub sb_dev: u32,
    /// `struct sock` → `sk_cgrp_data.cgroup`: the cgroup of the task that made the socket.
    pub sock_cgroup: u32,
    /// `struct socket` → `sk`.
    pub socket_sk: u32,
    /// 1 when the path-walk offsets below were read (the fallback then names files from
    /// kernel objects); 0 leaves the tool's strings as the only paths.
    pub walk: u32,
    /// `struct task_struct` → `fs`.
    pub task_fs: u32,
    /// `struct fs_struct` → `root`.
    pub fs_root: u32,
    /// `struct fs_struct` → `pwd`.
    pub fs_pwd: u32,
    /// `struct task_struct` → `files`.
    pub task_files: u32,
    /// `struct files_struct` → `fdt`.
    pub files_fdt: u32,
    /// `struct fdtable` → `fd`.
    pub fdt_fd: u32,
    /// `struct fdtable` → `max_fds`.
    pub fdt_max_fds: u32,
    /// `struct dentry` → `d_parent`.
    pub dentry_parent: u32,
    /// `struct vfsmount` → `mnt_root`.
    pub vfsmount_root: u32,
    /// `struct mount` → `mnt` (the `struct vfsmount` inside it).
    pub mount_mnt: u32,
    /// `struct mount` → `mnt_parent`.
    pub mount_parent: u32,
    /// `struct mount` → `mnt_mountpoint`.
    pub mount_mountpoint: u32,
    /// `struct vm_area_struct` → `vm_file` (0 when unknown: `file_mprotect` then records
    /// nothing).
    pub vma_file: u32,
    /// `struct vm_area_struct` → `vm_flags`.
    pub vma_flags: u32,
    /// `struct dentry` → `d_name` (its first 8 bytes are `hash_len`), for telling repeated
    /// opens of one file from opens of another (0: repeats are not counted).
    pub dentry_hash_len: u32,
    /// `struct task_struct` → `self_exec_id` and `start_time`.
    pub task_exec_id: u32,
    pub task_start_time: u32,
    /// Padding, zero.
    pub _pad: u32,
}

/// `UNIX_ALLOW` key: a Unix socket, by the device and inode of its file, that one call may
/// connect to (`net.unix`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixKey {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// The kernel's device number of the socket file's filesystem (major << 20 | minor).
    pub dev: u64,
    /// The socket file's inode number.
    pub ino: u64,
}

/// Which operation a network rule or event is about.
pub const NET_CONNECT: u32 = 0;
/// Binding a local address.
pub const NET_BIND: u32 = 1;

/// `NET_ALLOW` key: one granted (address, port) for one call. An all-zero address with
/// `any_addr = 1` matches every address of the family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetKey {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// `NET_CONNECT` or `NET_BIND`.
    pub op: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Port, host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6; zero with `any_addr`.
    pub addr: [u8; 16],
    /// 1 for a `*:PORT` grant.
    pub any_addr: u32,
    /// Padding, zero.
    pub _pad: u32,
}

/// Event kinds.
pub const EV_EXEC: u32 = 1;
/// A file was opened.
pub const EV_OPEN: u32 = 2;
/// A connect (or a send with an address).
pub const EV_CONNECT: u32 = 3;
/// A bind.
pub const EV_BIND: u32 = 4;
/// A ptrace attach or access check (`target` is the traced process).
pub const EV_PTRACE: u32 = 5;
/// A signal (`target` is the receiving process, `flags` the signal number).
pub const EV_SIGNAL: u32 = 6;
/// A mount (`path` is the filesystem type, `flags` the mount flags).
pub const EV_MOUNT: u32 = 7;
/// A move_mount.
pub const EV_MOVE_MOUNT: u32 = 8;
/// A file mapped executable (`flags` is the protection), or anonymous memory made
/// executable (`arg` holds `MEM_*`).
pub const EV_MMAP_EXEC: u32 = 9;
/// A device node was refused (`flags` is the cgroup access type: device type in the low 16
/// bits, access bits above; `target` is major << 20 | minor).
pub const EV_DEVICE: u32 = 10;
/// The end of the traced syscall number `flags` of thread `tid`, with its `ret` (fallback).
pub const EV_RESULT: u32 = 11;
/// A connect (or datagram) to a Unix socket bound at a path that is not the call's own (LSM):
/// `target` is the socket file's device (major << 20 | minor), `ret` its inode, `path` the
/// last component of its name.
pub const EV_UNIX_CONNECT: u32 = 12;
/// A change to the file system (`flags` is a `CHANGE_*`): `path` names what changed, `target`
/// is the directory fd a relative name is relative to, `arg` the new mode, owner
/// (uid << 32 | gid), length or device. Its result follows as an [`EV_RESULT`]; a second name
/// as an [`EV_NAME`].
pub const EV_CHANGE: u32 = 13;
/// More about the thread's last event (`flags` is a `NAME_*`): a second name, or where a
/// relative name is.
pub const EV_NAME: u32 = 14;
/// A new program image (`sched_process_exec`): `path` is the file the kernel executed, from
/// the kernel's objects; `target` is the thread that called exec.
pub const EV_EXEC_DONE: u32 = 15;
/// A syscall that agentd's seccomp filter refuses ended with `EPERM` (`flags` is its
/// number, `ret` the result): seen at its exit, since seccomp refuses before the entry's
/// tracepoint.
pub const EV_REFUSED: u32 = 16;

/// `EV_CHANGE` operations.
pub const CHANGE_UNLINK: u32 = 1;
/// rmdir.
pub const CHANGE_RMDIR: u32 = 2;
/// rename: `EV_NAME` `NAME_NEW` carries the new name.
pub const CHANGE_RENAME: u32 = 3;
/// link: `EV_NAME` `NAME_NEW` carries the new name.
pub const CHANGE_LINK: u32 = 4;
/// symlink: `path` is the new link, `EV_NAME` `NAME_TARGET` the target text.
pub const CHANGE_SYMLINK: u32 = 5;
/// truncate (`arg` is the length).
pub const CHANGE_TRUNCATE: u32 = 6;
/// chmod (`arg` is the mode).
pub const CHANGE_CHMOD: u32 = 7;
/// chown (`arg` is uid << 32 | gid, each `u32::MAX` when left alone).
pub const CHANGE_CHOWN: u32 = 8;
/// mknod (`arg` is mode << 32 | device).
pub const CHANGE_MKNOD: u32 = 9;
/// mkdir (`arg` is the mode).
pub const CHANGE_MKDIR: u32 = 10;

/// `EV_NAME` roles: the second name of a rename or link.
pub const NAME_NEW: u32 = 1;
/// The text a symlink points to.
pub const NAME_TARGET: u32 = 2;
/// The directory a relative name of the thread's last event is relative to, from the kernel
/// (a directory fd's file, or the working directory).
pub const NAME_DIR: u32 = 3;
/// The same for the second name.
pub const NAME_NEW_DIR: u32 = 4;
/// The object of the change, named by the kernel (an LSM `path_*` hook) after it resolved
/// the tool's string: it replaces the string as the record's `path`.
pub const NAME_KERNEL: u32 = 5;
/// The same for the second name (the new name of a rename or link).
pub const NAME_KERNEL_NEW: u32 = 6;

/// `EV_MMAP_EXEC` `arg` bits: the memory is anonymous (no file).
pub const MEM_ANONYMOUS: u64 = 1;
/// Made executable by mprotect (else by mmap).
pub const MEM_MPROTECT: u64 = 2;

/// Event `flags` of a network event: a datagram sent to an address (checked as a connect).
pub const NET_SEND: u32 = 2;

/// The action was allowed (or only audited).
pub const VERDICT_ALLOWED: u32 = 0;
/// The action was denied.
pub const VERDICT_DENIED: u32 = 1;

/// The path was longer than [`PATH_LEN`] and was cut.
pub const PATH_TRUNCATED: u32 = 1;
/// The path is the kernel's resolution of the object (LSM), not the string the tool passed.
pub const PATH_RESOLVED: u32 = 2;
/// The kernel could not resolve the path (it is empty).
pub const PATH_UNRESOLVED: u32 = 4;
/// The event comes from an LSM hook.
pub const FROM_LSM: u32 = 8;
/// The call is in audit mode: a `denied` verdict was recorded, not enforced.
pub const AUDIT_ONLY: u32 = 16;
/// The path was read from kernel objects by walking dentries up to the task's root, and is
/// stored leaf first: each component followed by `/` (`passwd/etc/` is `/etc/passwd`).
pub const PATH_WALKED: u32 = 32;
/// The walk reached the top of a mount tree without meeting the task's root: the object is
/// outside the call's root (a pipe, socket, memfd or anonymous file).
pub const PATH_OUTSIDE_ROOT: u32 = 64;
/// An event seen at the syscall's end: the kernel refused it before agentd's cgroup or LSM
/// programs ran (Landlock, a file mode, memory-deny-write-execute; `ret` is the error).
pub const REFUSED_EARLY: u32 = 128;
/// A successful open whose file the programs now count in `REPEATS`: the same thread opening
/// the same file with the same flags again is counted there, not recorded again; `arg` is
/// the key's `first_ts`, by which the supervisor finds this record when it reads the count.
pub const REPEAT_TRACKED: u32 = 256;

/// `REPEATS` key: a file one thread of a call opened, as the kernel has it. Every field
/// that tells one file from another is here: a dentry and inode freed and reused for another
/// file come back with another name hash, parent or inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RepeatKey {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// `struct vfsmount *`, `struct dentry *`, its `d_parent` and `d_inode`.
    pub mnt: u64,
    pub dentry: u64,
    pub parent: u64,
    pub inode: u64,
    /// The inode's number, and the dentry's name hash and length (`d_name.hash_len`).
    pub ino: u64,
    pub hash_len: u64,
    /// The open flags the tool passed, of [`VALID_OPEN_FLAGS`].
    pub flags: u32,
    /// The opening thread (its own, so that only one program run at a time updates the
    /// count), its process, its program image (`self_exec_id`: an exec starts a new one) and
    /// its start time (a thread id reused later is another thread).
    pub tid: u32,
    pub tgid: u32,
    pub exec_id: u32,
    pub start_ns: u64,
}

/// `REPEATS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepeatCount {
    /// Opens after the recorded one.
    pub count: u64,
    /// `ts_ns` of the recorded open's result record.
    pub first_ts: u64,
    /// When the last repeat was seen (0: none yet).
    pub last_ts: u64,
}

/// One event, as written to a ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    /// The call's cgroup id.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns`.
    pub ts_ns: u64,
    /// The syscall's return value ([`EV_RESULT`]).
    pub ret: i64,
    /// [`EV_CHANGE`]'s mode, owner, length or device.
    pub arg: u64,
    /// `EV_*`.
    pub kind: u32,
    /// `VERDICT_*`.
    pub verdict: u32,
    /// Thread group id (pid) in the initial pid namespace.
    pub pid: u32,
    /// Thread id in the initial pid namespace (pairs a syscall with its [`EV_RESULT`]).
    pub tid: u32,
    /// Open flags, or `NET_*` for network events.
    pub flags: u32,
    /// Address family (network events).
    pub family: u16,
    /// Port, host byte order (network events).
    pub port: u16,
    /// `PATH_TRUNCATED` and the like.
    pub info: u32,
    /// Target pid (ptrace and signal events), in the initial pid namespace.
    pub target: u32,
    /// Socket type (network events): SOCK_STREAM, SOCK_DGRAM, SOCK_RAW...
    pub sock_type: u32,
    /// Padding, zero.
    pub _pad: u32,
    /// Address (network events).
    pub addr: [u8; 16],
    /// NUL-terminated path (exec and open events).
    pub path: [u8; PATH_LEN],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is #[repr(C)] plain old data with explicit padding fields, valid for
    // any bit pattern.
    unsafe impl aya::Pod for super::CallInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PathKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UnixKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RepeatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RepeatCount {}
}
