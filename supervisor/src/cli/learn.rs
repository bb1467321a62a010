//! Learn mode (`agentd exec --learn`): the call sees the host read-only, without its secrets,
//! and may run the host's programs, so that its audit records show everything it needs;
//! `agentd policy draft` turns them into grants. For trusted inputs only: the tool can read
//! whatever is not a secret, and the records are the point.
//!
//! What is shown: every top-level directory of the host except `/proc`, `/sys`, `/dev`,
//! `/run`, `/tmp` (the call has its own), `/home` and `/root` (other users' files; the
//! manifest's own grants there stay), `/boot`, `/mnt` and `/media`. Around each entry of
//! [`agentd_policy::lint::SECRETS`] the grant is split into the entries beside it, so a secret
//! is never visible. Writes and the network stay as the manifest says.

use std::path::{Path, PathBuf};

use agentd_policy::lint::SECRETS;
use agentd_policy::{AbsPath, Manifest, Name};

/// Top-level directories never shown.
const HIDDEN: &[&str] = &[
    "proc",
    "sys",
    "dev",
    "run",
    "tmp",
    "home",
    "root",
    "boot",
    "efi",
    "mnt",
    "media",
    "lost+found",
    "snap",
    ".snapshots",
    "var/run",
];

/// Trees where learn mode lets programs run.
const EXEC: &[&str] = &["/usr", "/opt"];

/// What learn mode never shows: the absolute entries of SECRETS, and every home directory
/// the host's accounts have (`/etc/passwd`), wherever it is (`/var/home/alice`,
/// `/var/lib/postgresql`, `/srv/home/bob`), but the system directories some system
/// accounts name as home (`/`, `/usr/...`, `/bin`, `/nonexistent`).
fn secrets() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = SECRETS.iter().filter(|s| s.starts_with('/')).map(PathBuf::from).collect();
    out.push(PathBuf::from("/var/home"));
    out.extend(passwd_homes(&std::fs::read_to_string("/etc/passwd").unwrap_or_default()));
    out
}

/// Every home directory `/etc/passwd` (its text) names, but `/`: what drafts never grant
/// whole.
pub(crate) fn passwd_home_dirs(passwd: &str) -> Vec<PathBuf> {
    passwd
        .lines()
        .filter_map(|l| l.split(':').nth(5))
        .map(PathBuf::from)
        .filter(|h| h.is_absolute() && h != Path::new("/"))
        .collect()
}

/// The home directories learn mode hides: [`passwd_home_dirs`] but the system directories
/// some system accounts name as home (hiding `/usr/sbin` would hide the host's programs).
fn passwd_homes(passwd: &str) -> Vec<PathBuf> {
    const SYSTEM: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/dev", "/proc", "/sys", "/run", "/nonexistent"];
    let mut homes = passwd_home_dirs(passwd);
    homes.retain(|h| !SYSTEM.iter().any(|s| h.starts_with(s)));
    homes
}

/// `dir`, or the entries beside the secrets below it (recursively): read grants that show
/// everything of `dir` but its secrets.
fn around_secrets(dir: &Path, secrets: &[PathBuf], depth: usize, out: &mut Vec<PathBuf>) {
    if secrets.iter().any(|s| dir.starts_with(s)) {
        return;
    }
    if !secrets.iter().any(|s| s.starts_with(dir)) {
        out.push(dir.to_path_buf());
        return;
    }
    if depth > 12 {
        // Deeper than any secret of the list: shown no further (fail closed).
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        // A link is shown where it leads, if that is shown; not on its own.
        if e.file_type().is_ok_and(|t| t.is_symlink()) {
            continue;
        }
        around_secrets(&p, secrets, depth + 1, out);
    }
}

/// The read grants learn mode adds.
pub(crate) fn host_view() -> Vec<PathBuf> {
    let secrets = secrets();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/") else { return out };
    let mut tops: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .filter(|p| !HIDDEN.iter().any(|h| p == Path::new("/").join(h).as_path()))
        .collect();
    tops.sort();
    for top in tops {
        around_secrets(&top, &secrets, 0, &mut out);
    }
    // /var/run is a link to /run on most hosts; never shown.
    out.retain(|p| !HIDDEN.iter().any(|h| p.starts_with(Path::new("/").join(h))));
    out
}

/// A grant learn mode added: which list, and the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Added {
    exec: bool,
    path: AbsPath,
}

impl Added {
    /// `read PATH` or `exec PATH`, as the call's start record lists it.
    pub(crate) fn describe(&self) -> String {
        format!("{} {}", if self.exec { "exec" } else { "read" }, self.path)
    }
}

/// `manifest` with `tool` widened for learn mode; the grants added, so that one the plan
/// refuses (a kernel filesystem below it, a write grant inside an exec tree) can be dropped.
pub(crate) fn widen(manifest: &mut Manifest, tool: &str) -> Vec<Added> {
    let mut added = Vec::new();
    let Some(t) = Name::parse(tool).ok().and_then(|n| manifest.tools.get_mut(&n)) else { return added };
    for p in host_view() {
        if let Ok(a) = AbsPath::parse(&p.display().to_string()) {
            if !t.fs.read.contains(&a) {
                t.fs.read.push(a.clone());
                added.push(Added { exec: false, path: a });
            }
        }
    }
    for e in EXEC.iter().filter(|e| Path::new(e).is_dir()) {
        if let Ok(a) = AbsPath::parse(e) {
            if !t.fs.exec.contains(&a) {
                t.fs.exec.push(a.clone());
                added.push(Added { exec: true, path: a });
            }
        }
    }
    added
}

/// Drops the grant a plan refused (`key`, `path` of its error) if learn mode added it, from
/// the list it was added to only; whether it did. A refusal of the manifest's own grant is
/// never swallowed.
pub(crate) fn drop_added(manifest: &mut Manifest, tool: &str, added: &mut Vec<Added>, key: &str, path: &str) -> bool {
    let exec = if key.ends_with(".fs.exec") {
        true
    } else if key.ends_with(".fs.read") {
        false
    } else {
        return false;
    };
    let Some(i) = added.iter().position(|a| a.exec == exec && a.path.to_string() == path) else { return false };
    let a = added.remove(i);
    let Some(t) = Name::parse(tool).ok().and_then(|n| manifest.tools.get_mut(&n)) else { return false };
    if exec {
        t.fs.exec.retain(|p| *p != a.path);
    } else {
        t.fs.read.retain(|p| *p != a.path);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_account_home_is_hidden_but_system_directories() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                      postgres:x:100:100::/var/lib/postgresql:/bin/bash\nal:x:1000:1000::/var/home/al:/bin/bash\n\
                      nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\nodd:x:5:5::/:/bin/sh\nbob:x:1001:1001::/srv/home/bob:/bin/sh\n";
        let homes = passwd_homes(passwd);
        let want: Vec<PathBuf> =
            ["/root", "/var/lib/postgresql", "/var/home/al", "/srv/home/bob"].iter().map(PathBuf::from).collect();
        assert_eq!(homes, want);
        // A shown tree is split around them.
        let mut out = Vec::new();
        around_secrets(Path::new("/var"), &homes, 0, &mut out);
        assert!(out.iter().all(|p| !p.starts_with("/var/lib/postgresql") && !p.starts_with("/var/home")), "{out:?}");
    }

    #[test]
    fn the_host_view_never_shows_a_secret_or_a_home() {
        let view = host_view();
        assert!(view.iter().any(|p| p.starts_with("/usr")), "{view:?}");
        for p in &view {
            assert!(agentd_policy::lint::secret(p).is_none(), "{p:?} is a secret");
            assert!(!secrets().iter().any(|s| s.starts_with(p)), "{p:?} holds a secret");
            assert!(!p.starts_with("/home") && !p.starts_with("/root") && !p.starts_with("/proc"), "{p:?}");
        }
        // /etc is shown around /etc/shadow, not whole.
        if Path::new("/etc/shadow").exists() {
            assert!(!view.iter().any(|p| p == Path::new("/etc")), "{view:?}");
            assert!(view.iter().any(|p| p == Path::new("/etc/passwd")), "{view:?}");
        }
    }
}
