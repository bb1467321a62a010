//! Landlock filesystem rights as the plan names them, with the ABI that introduced each.
//!
//! The policy crate stays free of syscalls, so it does not use the `landlock` crate's types;
//! the supervisor maps each [`FsRight`] to `landlock::AccessFs` one to one.

use serde::Serialize;

/// One Landlock filesystem access right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsRight {
    /// Execute a file.
    Execute,
    /// Open a file for writing.
    WriteFile,
    /// Open a file for reading.
    ReadFile,
    /// List a directory.
    ReadDir,
    /// Remove a directory.
    RemoveDir,
    /// Remove a non-directory.
    RemoveFile,
    /// Create a character device.
    MakeChar,
    /// Create a directory.
    MakeDir,
    /// Create a regular file.
    MakeReg,
    /// Create a Unix socket file.
    MakeSock,
    /// Create a named pipe.
    MakeFifo,
    /// Create a block device.
    MakeBlock,
    /// Create a symbolic link.
    MakeSym,
    /// Link or rename a file across directories (ABI 2).
    Refer,
    /// Truncate a file (ABI 3).
    Truncate,
    /// ioctl on a device file (ABI 5).
    IoctlDev,
}

impl FsRight {
    /// Every right, in kernel bit order.
    pub const ALL: [FsRight; 16] = [
        FsRight::Execute,
        FsRight::WriteFile,
        FsRight::ReadFile,
        FsRight::ReadDir,
        FsRight::RemoveDir,
        FsRight::RemoveFile,
        FsRight::MakeChar,
        FsRight::MakeDir,
        FsRight::MakeReg,
        FsRight::MakeSock,
        FsRight::MakeFifo,
        FsRight::MakeBlock,
        FsRight::MakeSym,
        FsRight::Refer,
        FsRight::Truncate,
        FsRight::IoctlDev,
    ];

    /// The Landlock ABI that introduced this right.
    pub fn min_abi(self) -> u32 {
        match self {
            FsRight::Refer => 2,
            FsRight::Truncate => 3,
            FsRight::IoctlDev => 5,
            FsRight::Execute
            | FsRight::WriteFile
            | FsRight::ReadFile
            | FsRight::ReadDir
            | FsRight::RemoveDir
            | FsRight::RemoveFile
            | FsRight::MakeChar
            | FsRight::MakeDir
            | FsRight::MakeReg
            | FsRight::MakeSock
            | FsRight::MakeFifo
            | FsRight::MakeBlock
            | FsRight::MakeSym => 1,
        }
    }

    /// Whether the right means anything on a non-directory.
    pub fn applies_to_files(self) -> bool {
        match self {
            FsRight::Execute | FsRight::WriteFile | FsRight::ReadFile | FsRight::Truncate | FsRight::IoctlDev => true,
            FsRight::ReadDir
            | FsRight::RemoveDir
            | FsRight::RemoveFile
            | FsRight::MakeChar
            | FsRight::MakeDir
            | FsRight::MakeReg
            | FsRight::MakeSock
            | FsRight::MakeFifo
            | FsRight::MakeBlock
            | FsRight::MakeSym
            | FsRight::Refer => false,
        }
    }
}

/// Rights for a path that is only read.
pub const READ: &[FsRight] = &[FsRight::ReadFile, FsRight::ReadDir];

/// Rights for a path that is read and written. Device nodes cannot be made here.
pub const WRITE: &[FsRight] = &[
    FsRight::ReadFile,
    FsRight::ReadDir,
    FsRight::WriteFile,
    FsRight::Truncate,
    FsRight::RemoveDir,
    FsRight::RemoveFile,
    FsRight::MakeDir,
    FsRight::MakeReg,
    FsRight::MakeSym,
    FsRight::MakeFifo,
    FsRight::MakeSock,
    FsRight::Refer,
];

/// Rights for a path executables run from (the loader and libraries are read).
pub const EXEC: &[FsRight] = &[FsRight::Execute, FsRight::ReadFile, FsRight::ReadDir];

/// Rights on the sandbox's minimal `/dev`.
pub const DEV: &[FsRight] = &[FsRight::ReadFile, FsRight::WriteFile, FsRight::ReadDir, FsRight::IoctlDev];

/// Rights on the sandbox's own root directory: listing its mount points.
pub const ROOT: &[FsRight] = &[FsRight::ReadDir];

/// Rights the ruleset handles (denies unless granted): every right we know, so anything
/// not granted is denied.
pub const HANDLED: &[FsRight] = &FsRight::ALL;

/// The highest Landlock ABI whose semantics this version of agentd was tested against.
pub const PINNED_ABI: u32 = 6;

/// Landlock ABI that added TCP bind/connect port rules.
pub const NET_ABI: u32 = 4;

/// Landlock ABI that added signal and abstract-unix-socket scoping.
pub const SCOPE_ABI: u32 = 6;

/// The ABI whose `LANDLOCK_ACCESS_FS_RESOLVE_UNIX` restricts connects to Unix sockets by path
/// (Linux 7.1). Used, beside the pinned ruleset, in a ruleset of its own.
pub const RESOLVE_UNIX_ABI: u32 = 9;
