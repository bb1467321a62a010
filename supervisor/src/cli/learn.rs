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
const HIDDEN: &[&str] =
    &["proc", "sys", "dev", "run", "tmp", "home", "root", "boot", "mnt", "media", "lost+found", "snap", "var/run"];

/// Trees where learn mode lets programs run.
const EXEC: &[&str] = &["/usr", "/opt"];

/// Secrets that exist on this host, as absolute paths (`~/` entries are under the hidden homes).
fn secrets() -> Vec<PathBuf> {
    SECRETS.iter().filter(|s| s.starts_with('/')).map(PathBuf::from).collect()
}

/// `dir`, or the entries beside the secrets below it (recursively): read grants that show
/// everything of `dir` but its secrets.
fn around_secrets(dir: &Path, secrets: &[PathBuf], depth: usize, out: &mut Vec<PathBuf>) {
    if secrets.iter().any(|s| dir.starts_with(s)) {
        return;
    }
    if !secrets.iter().any(|s| s.starts_with(dir)) || depth > 6 {
        out.push(dir.to_path_buf());
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

/// `manifest` with `tool` widened for learn mode; the paths added, so that a grant the
/// plan refuses (a kernel filesystem below it, a write grant inside it) can be dropped.
pub(crate) fn widen(manifest: &mut Manifest, tool: &str) -> Vec<AbsPath> {
    let mut added = Vec::new();
    let Some(t) = Name::parse(tool).ok().and_then(|n| manifest.tools.get_mut(&n)) else { return added };
    for p in host_view() {
        if let Ok(a) = AbsPath::parse(&p.display().to_string()) {
            if !t.fs.read.contains(&a) {
                t.fs.read.push(a.clone());
                added.push(a);
            }
        }
    }
    for e in EXEC.iter().filter(|e| Path::new(e).is_dir()) {
        if let Ok(a) = AbsPath::parse(e) {
            if !t.fs.exec.contains(&a) {
                t.fs.exec.push(a.clone());
                added.push(a);
            }
        }
    }
    added
}

/// Drops `path` from the tool's added read or exec grants; whether it was one of them.
pub(crate) fn drop_added(manifest: &mut Manifest, tool: &str, added: &[AbsPath], path: &str) -> bool {
    let Some(a) = added.iter().find(|a| a.to_string() == path) else { return false };
    let Some(t) = Name::parse(tool).ok().and_then(|n| manifest.tools.get_mut(&n)) else { return false };
    t.fs.read.retain(|p| p != a);
    t.fs.exec.retain(|p| p != a);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

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
