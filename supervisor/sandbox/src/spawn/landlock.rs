//! The call's Landlock ruleset, built with the `landlock` crate.
//!
//! The supervisor creates the ruleset and adds the rules for host paths before the call
//! starts; the child adds the rules for the paths that only exist in its fresh root (`/`,
//! `/proc`, `/dev`, `/tmp`) after mounting them, then restricts itself. Compatibility levels
//! mirror the manifest: what `requires.landlock_abi` asks for is a hard requirement, the rest
//! (up to the ABI we pin) is best effort, and the child reports the real status back.

use std::ffi::CString;

use agentd_policy::access::FsRight;
use agentd_policy::{ExecPlan, RuleOrigin};
use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, NetPort, PathBeneath, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// Why the ruleset could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// Creating the ruleset or adding a rule failed.
    #[error("building the Landlock ruleset")]
    Ruleset(#[from] landlock::RulesetError),
    /// A granted path could not be opened.
    #[error("opening {path} for a Landlock rule")]
    Open {
        /// The path.
        path: String,
        /// Why (ELOOP: a symlink appeared on the path since the plan was compiled).
        #[source]
        source: std::io::Error,
    },
}

/// The ABI whose rights we handle: the one agentd was tested against.
const PINNED: ABI = ABI::V6;

fn abi(n: u32) -> ABI {
    ABI::from(i32::try_from(n).unwrap_or(i32::MAX))
}

/// Maps the plan's rights to the crate's flags.
pub fn access(rights: &[FsRight]) -> BitFlags<AccessFs> {
    rights.iter().fold(BitFlags::empty(), |acc, r| {
        acc | match r {
            FsRight::Execute => AccessFs::Execute,
            FsRight::WriteFile => AccessFs::WriteFile,
            FsRight::ReadFile => AccessFs::ReadFile,
            FsRight::ReadDir => AccessFs::ReadDir,
            FsRight::RemoveDir => AccessFs::RemoveDir,
            FsRight::RemoveFile => AccessFs::RemoveFile,
            FsRight::MakeChar => AccessFs::MakeChar,
            FsRight::MakeDir => AccessFs::MakeDir,
            FsRight::MakeReg => AccessFs::MakeReg,
            FsRight::MakeSock => AccessFs::MakeSock,
            FsRight::MakeFifo => AccessFs::MakeFifo,
            FsRight::MakeBlock => AccessFs::MakeBlock,
            FsRight::MakeSym => AccessFs::MakeSym,
            FsRight::Refer => AccessFs::Refer,
            FsRight::Truncate => AccessFs::Truncate,
            FsRight::IoctlDev => AccessFs::IoctlDev,
        }
    })
}

/// Creates the ruleset and adds the host-path rules; `None` where the kernel has no
/// Landlock at all (a plan runs there only if its manifest says `landlock_abi = 0`).
pub fn build(plan: &ExecPlan) -> Result<Option<RulesetCreated>, LandlockError> {
    let ll = &plan.landlock;
    if ll.abi_kernel == 0 && ll.abi_required == 0 {
        return Ok(None);
    }
    let required = abi(ll.abi_required);
    let mut ruleset = Ruleset::default();
    if ll.abi_required > 0 {
        ruleset =
            ruleset.set_compatibility(CompatLevel::HardRequirement).handle_access(AccessFs::from_all(required))?;
    }
    ruleset = ruleset.set_compatibility(CompatLevel::BestEffort).handle_access(AccessFs::from_all(PINNED))?;
    // A second check: the call's own namespace is the first.
    let net_level = CompatLevel::BestEffort;
    ruleset = ruleset.set_compatibility(net_level).handle_access(AccessNet::from_all(PINNED))?;
    ruleset = ruleset.set_compatibility(CompatLevel::BestEffort).scope(Scope::from_all(PINNED))?;
    let mut created = ruleset.create()?;
    for rule in ll.rules.iter().filter(|r| r.origin == RuleOrigin::Host) {
        // Opened without following symlinks: the path was checked when the plan was compiled.
        let path = CString::new(rule.path.as_str()).map_err(|_| LandlockError::Open {
            path: rule.path.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let fd = crate::sys::open_path_nofollow(&path).map_err(|e| LandlockError::Open {
            path: rule.path.clone(),
            source: std::io::Error::from_raw_os_error(e),
        })?;
        created = created.add_rule(PathBeneath::new(fd, access(&rule.rights)))?;
    }
    let proxy = plan.network.proxy.map(|p| p.port());
    for port in plan.network.connect_ports.iter().chain(proxy.as_ref()) {
        created = created.set_compatibility(net_level).add_rule(NetPort::new(*port, AccessNet::ConnectTcp))?;
    }
    for port in &plan.network.bind_ports {
        created = created.set_compatibility(net_level).add_rule(NetPort::new(*port, AccessNet::BindTcp))?;
    }
    Ok(Some(created))
}

/// Landlock outcome reported by the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every requested restriction is enforced.
    Full,
    /// Some are (older kernel): see the plan's `degraded` list.
    Partial,
    /// None are.
    None,
}

impl Status {
    /// Encodes for the child-to-parent pipe.
    pub fn from_ruleset(s: &RulesetStatus) -> Self {
        match s {
            RulesetStatus::FullyEnforced => Status::Full,
            RulesetStatus::PartiallyEnforced => Status::Partial,
            RulesetStatus::NotEnforced => Status::None,
        }
    }

    /// Wire encoding.
    pub fn to_byte(self) -> u8 {
        match self {
            Status::None => 0,
            Status::Partial => 1,
            Status::Full => 2,
        }
    }

    /// Wire decoding.
    pub fn from_byte(b: u8) -> Self {
        match b {
            2 => Status::Full,
            1 => Status::Partial,
            _ => Status::None,
        }
    }
}
