//! Helpers for the crates' own unit tests that need a namespace of their own (a dev-dependency
//! of agentd-sandbox, agentd-memory and agentd): an outer test runs an ignored inner one under
//! `unshare`, and the inner one mounts, fills disks or polls the mount table there.

use std::path::{Path, PathBuf};

/// A fresh, empty directory under the temporary directory, for `what`.
pub fn scratch_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("agentd-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// Runs the ignored test `test` (its full path) of this test binary under `unshare` with
/// `unshare_args`, giving it a fresh scratch directory named for `what` in `AGENTD_TEST_DIR`
/// (removed after), and asserts that it passed. Inside a new pid namespace the inner test's
/// pid is 1, so names it makes must come from that directory.
pub fn run_in_namespaces(test: &str, unshare_args: &[&str], what: &str) {
    let dir = scratch_dir(what);
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new("unshare")
        .args(unshare_args)
        .arg(exe)
        .args(["--exact", test, "--ignored", "--test-threads=1"])
        .env("AGENTD_TEST_DIR", &dir)
        .output()
        .expect("running unshare");
    let _ = std::fs::remove_dir(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("1 passed"), "{text}{}", String::from_utf8_lossy(&out.stderr));
}

/// The directory the outer test gave an inner one.
pub fn given_dir(outer: &str) -> PathBuf {
    std::env::var_os("AGENTD_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| panic!("run by {outer}"))
}

/// Mounts a 2 MiB tmpfs on `dir` (inside a test's own mount namespace).
pub fn mount_small_tmpfs(dir: &Path) {
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "agentd-test"])
        .arg(dir)
        .status()
        .expect("running mount");
    assert!(st.success(), "mounting a tmpfs on {} failed", dir.display());
}

/// Fills the filesystem of `dir` with a file, whose path is returned (remove it to make room).
pub fn fill_disk(dir: &Path) -> PathBuf {
    use std::io::Write as _;
    let fill = dir.join("fill");
    let mut f = std::fs::File::create(&fill).expect("creating the fill file");
    while f.write_all(&[7u8; 64 * 1024]).is_ok() {}
    fill
}
