//! The VM's initramfs: a static busybox, our binaries and the libraries they need, and an
//! init that switches to a tmpfs root (pivot_root, which the sandbox uses, refuses the
//! initramfs itself), mounts a pure cgroup v2 hierarchy with memory, pids and cpu enabled,
//! runs the tests and powers off.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// First stage: copy everything into a tmpfs and switch to it.
const INIT: &str = r#"#!/usr/bin/busybox sh
B=/usr/bin/busybox
$B mount -t proc proc /proc
$B mount -t tmpfs -o size=700m,mode=0755 tmpfs /newroot
for d in usr bin sbin lib lib64 etc init2; do $B cp -a /$d /newroot/; done
for d in proc sys dev tmp run; do $B mkdir -p /newroot/$d; done
$B umount /proc
exec $B switch_root /newroot /init2
"#;

/// Second stage: the test machine.
const INIT2: &str = r#"#!/usr/bin/busybox sh
export PATH=/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
echo "+memory +pids +cpu" > /sys/fs/cgroup/cgroup.subtree_control
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
ip link set lo up
echo "agentd-vm: booted $(uname -r); LSMs: $(cat /sys/kernel/security/lsm); cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
if grep -q agentd.probe /proc/cmdline; then
  echo "AGENTD-VM-PROBE ok"
else
  tests=$(sed -n 's/.*agentd.tests=\([^ ]*\).*/\1/p' /proc/cmdline | tr ',' ' ')
  RUST_BACKTRACE=1 /usr/bin/agentd-vm-tests $tests
fi
echo "agentd-vm: powering off"
poweroff -f
"#;

fn busybox() -> Result<PathBuf> {
    for p in ["/usr/bin/busybox", "/bin/busybox"] {
        let out = Command::new("ldd").arg(p).output();
        let dynamic = out.is_ok_and(|o| o.status.success());
        if Path::new(p).exists() && !dynamic {
            return Ok(PathBuf::from(p));
        }
    }
    bail!("no static busybox (install busybox-static)")
}

/// The shared libraries `binary` loads, as `ldd` lists them.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output().with_context(|| format!("ldd {}", binary.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

fn inside(stage: &Path, p: &Path) -> PathBuf {
    stage.join(p.strip_prefix("/").unwrap_or(p))
}

/// Copies `lib` to its canonical place, and links its listed path to it.
fn copy_library(stage: &Path, lib: &Path) -> Result<()> {
    let real = fs::canonicalize(lib).with_context(|| format!("resolving {}", lib.display()))?;
    let dst = inside(stage, &real);
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    if !dst.exists() {
        fs::copy(&real, &dst).with_context(|| format!("copying {}", real.display()))?;
    }
    let (Some(dir), Some(name)) = (lib.parent(), lib.file_name()) else { return Ok(()) };
    let listed = fs::canonicalize(dir)?.join(name);
    if listed != real {
        let at = inside(stage, &listed);
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::symlink_metadata(&at).is_err() {
            symlink(&real, &at)?;
        }
    }
    Ok(())
}

/// Builds `out` (gzip'd newc cpio) with `binaries` in /usr/bin.
pub fn build(stage: &Path, binaries: &[PathBuf], out: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(stage);
    for d in ["usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp", "run", "etc", "newroot"] {
        fs::create_dir_all(stage.join(d))?;
    }
    for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        symlink(target, stage.join(link))?;
    }
    let bb = busybox()?;
    fs::copy(&bb, stage.join("usr/bin/busybox"))?;
    let applets = Command::new(&bb).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let _ = symlink("busybox", stage.join("usr/bin").join(applet));
    }
    for bin in binaries {
        let name = bin.file_name().context("binary without a name")?;
        fs::copy(bin, stage.join("usr/bin").join(name)).with_context(|| format!("copying {}", bin.display()))?;
        for lib in libraries(bin)? {
            copy_library(stage, &lib)?;
        }
    }
    fs::write(stage.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")?;
    fs::write(stage.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    for (name, text) in [("init", INIT), ("init2", INIT2)] {
        fs::write(stage.join(name), text)?;
        fs::set_permissions(stage.join(name), fs::Permissions::from_mode(0o755))?;
    }
    let script =
        format!("cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'", stage.display(), out.display());
    run(Command::new("sh").args(["-c", &script]))
}
