//! Finding the cgroup hierarchies and agentd's place in them, from `/proc/self/mountinfo` and
//! `/proc/self/cgroup`.

use std::path::{Path, PathBuf};

use agentd_policy::mountinfo::unescape_octal;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The cgroup path (relative to the hierarchy root) shown at the mount point.
    pub mount_root: String,
    /// v1 controllers (empty for cgroup2).
    pub controllers: Vec<String>,
}

impl Hierarchy {
    /// Directory of cgroup `path` (as in /proc/self/cgroup) in this mount.
    pub fn dir_of(&self, path: &str) -> PathBuf {
        let rel = path.strip_prefix(self.mount_root.trim_end_matches('/')).unwrap_or(path);
        self.mount.join(rel.trim_start_matches('/'))
    }
}

/// Parses `/proc/self/mountinfo` text: (cgroup2 mounts, cgroup v1 mounts).
pub fn parse_mountinfo(text: &str) -> (Vec<Hierarchy>, Vec<Hierarchy>) {
    let (mut v2, mut v1) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let f: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount), Some(fstype)) = (f.get(3), f.get(4), r.first()) else { continue };
        let mount = PathBuf::from(unescape_octal(mount));
        match *fstype {
            "cgroup2" => v2.push(Hierarchy { mount, mount_root: unescape_octal(root), controllers: Vec::new() }),
            "cgroup" => {
                let opts = r.get(2).copied().unwrap_or_default();
                let controllers = opts.split(',').map(str::to_string).collect();
                v1.push(Hierarchy { mount, mount_root: unescape_octal(root), controllers });
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// Parses `/proc/self/cgroup`: (hierarchy-id-0 path, per-v1-controller paths).
pub fn parse_proc_cgroup(text: &str) -> (Option<String>, Vec<(String, String)>) {
    let mut unified = None;
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if id == "0" && ctrls.is_empty() {
            unified = Some(path.to_string());
        } else {
            for c in ctrls.split(',') {
                v1.push((c.to_string(), path.to_string()));
            }
        }
    }
    (unified, v1)
}

/// Whether the v2 hierarchy mounted at `mount` offers memory, pids and cpu.
pub fn v2_has_controllers(mount: &Path) -> bool {
    let Ok(c) = std::fs::read_to_string(mount.join("cgroup.controllers")) else { return false };
    let have: Vec<&str> = c.split_whitespace().collect();
    ["memory", "pids", "cpu"].iter().all(|w| have.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_hybrid_mounts() {
        let (v2, v1) = parse_mountinfo(HYBRID);
        assert_eq!(v2.len(), 1);
        assert_eq!(v2[0].mount, PathBuf::from("/sys/fs/cgroup/unified"));
        let mem = v1.iter().find(|h| h.controllers.iter().any(|c| c == "memory")).expect("memory");
        assert_eq!(mem.mount, PathBuf::from("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn parses_proc_self_cgroup_and_joins_paths() {
        let (unified, v1) = parse_proc_cgroup("4:memory:/process_api/x\n1:cpu,cpuacct:/\n0::/\n");
        assert_eq!(unified.as_deref(), Some("/"));
        assert!(v1.contains(&("cpuacct".to_string(), "/".to_string())));
        let h = Hierarchy { mount: "/sys/fs/cgroup/memory".into(), mount_root: "/".into(), controllers: vec![] };
        assert_eq!(h.dir_of("/process_api/x"), PathBuf::from("/sys/fs/cgroup/memory/process_api/x"));
        let nested =
            Hierarchy { mount: "/sys/fs/cgroup".into(), mount_root: "/docker/abc".into(), controllers: vec![] };
        assert_eq!(nested.dir_of("/docker/abc/sub"), PathBuf::from("/sys/fs/cgroup/sub"));
    }
}
