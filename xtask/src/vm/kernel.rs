//! Getting a Debian cloud kernel with BPF LSM, through a private apt state (the host's apt
//! sources and state are never touched), cached under `target/vm/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run, step};

/// Which kernel to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// bookworm-backports' 6.12 cloud kernel (the default).
    V612,
    /// bookworm's 6.1 cloud kernel (Landlock ABI 2).
    V61,
    /// bullseye's 5.10 cloud kernel: no Landlock at all (5.13 added it), like the oldest hosts
    /// people still run.
    V510,
    /// trixie-backports' newest cloud kernel (7.1 or later: Landlock ABI 9, whose Unix-socket
    /// right agentd uses).
    Latest,
}

impl Which {
    /// From `--kernel`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "6.12" => Ok(Which::V612),
            "6.1" => Ok(Which::V61),
            "5.10" => Ok(Which::V510),
            "latest" => Ok(Which::Latest),
            other => bail!("--kernel {other}: choose 6.12 (default), 6.1, 5.10 or latest"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Which::V612 => "6.12",
            Which::V61 => "6.1",
            Which::V510 => "5.10",
            Which::Latest => "latest",
        }
    }

    /// Whether every test's kernel features are there (nothing may be excused).
    pub fn complete(self) -> bool {
        matches!(self, Which::V612 | Which::Latest)
    }

    fn suite(self) -> &'static str {
        match self {
            Which::V612 => "bookworm-backports",
            Which::V61 => "bookworm",
            Which::V510 => "bullseye",
            Which::Latest => "trixie-backports",
        }
    }
}

/// An unpacked kernel.
#[derive(Debug)]
pub struct Kernel {
    /// Its release, e.g. `6.12.95+deb12-cloud-amd64`.
    pub release: String,
    /// The bootable image.
    pub vmlinuz: PathBuf,
}

/// The Debian mirror the host uses (its deb822 or one-line sources), or deb.debian.org.
fn mirror() -> String {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let from_deb822 = deb822
        .lines()
        .filter_map(|l| l.strip_prefix("URIs:"))
        .flat_map(str::split_whitespace)
        .find(|u| u.ends_with("/debian") || u.ends_with("/debian/"));
    let oneline = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    let from_list = oneline
        .lines()
        .filter(|l| l.starts_with("deb "))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("http")))
        .find(|u| u.trim_end_matches('/').ends_with("/debian"));
    from_deb822.or(from_list).unwrap_or("http://deb.debian.org/debian").trim_end_matches('/').to_string()
}

fn apt(dir: &Path, tool: &str) -> Command {
    let mut c = Command::new(tool);
    for (k, v) in [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache::Archives", dir.join("archives")),
        ("Dir::State::Status", dir.join("status")),
        ("APT::Sandbox::User", PathBuf::from("root")),
    ] {
        c.arg("-o").arg(format!("{k}={}", v.display()));
    }
    c
}

/// Where an unpacked kernel keeps `what` (`vmlinuz`, `config`): `boot/WHAT-RELEASE` up to
/// bookworm, `usr/lib/modules/RELEASE/WHAT` from trixie on.
fn unpacked(dest: &Path, release: &str, what: &str) -> PathBuf {
    let old = dest.join(format!("boot/{what}-{release}"));
    if old.exists() {
        old
    } else {
        dest.join(format!("usr/lib/modules/{release}/{what}"))
    }
}

/// Downloads `package` into the private state's archives; the `.deb`.
fn download(apt_dir: &Path, package: &str) -> Result<PathBuf> {
    let archives = apt_dir.join("archives");
    // `apt-get download` writes to the working directory (so not through `run`, which sets it).
    let status = apt(apt_dir, "apt-get").args(["download", "-qq", package]).current_dir(&archives).status()?;
    if !status.success() {
        bail!("apt-get download {package} failed ({status})");
    }
    fs::read_dir(&archives)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
        .with_context(|| format!("apt-get download left no {package}_*.deb in {}", archives.display()))
}

/// Fetches (once) and unpacks the kernel, and checks it can run BPF LSM programs.
pub fn fetch(which: Which) -> Result<Kernel> {
    let base = root().join("target/vm");
    let dest = base.join(format!("kernel-{}", which.label()));
    let marker = dest.join("release");
    if let Ok(release) = fs::read_to_string(&marker) {
        let release = release.trim().to_string();
        let vmlinuz = unpacked(&dest, &release, "vmlinuz");
        if vmlinuz.exists() {
            eprintln!("xtask: using the cached kernel {release} ({})", dest.display());
            return Ok(Kernel { release, vmlinuz });
        }
    }
    let apt_dir = base.join(format!("apt-{}", which.label()));
    for d in ["lists/partial", "archives/partial"] {
        fs::create_dir_all(apt_dir.join(d))?;
    }
    fs::write(apt_dir.join("status"), "")?;
    let source = format!("deb {} {} main\n", mirror(), which.suite());
    fs::write(apt_dir.join("sources.list"), &source)?;
    step(&format!("fetching Debian's {} cloud kernel (private apt state: {source})", which.label()));
    run(apt(&apt_dir, "apt-get").args(["update", "-qq"]))?;
    let deps = apt(&apt_dir, "apt-cache").args(["depends", "linux-image-cloud-amd64"]).output()?;
    let deps = String::from_utf8_lossy(&deps.stdout).into_owned();
    let package = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .with_context(|| format!("linux-image-cloud-amd64 in {} names no kernel package: {deps}", which.suite()))?
        .to_string();
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&dest)?;
    let deb = download(&apt_dir, &package)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    // Newer Debian kernels (trixie on) split the image: the kernel and its config are in the
    // linux-binary-* and linux-base-* packages the image package depends on.
    let depends = Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends").output()?;
    for part in String::from_utf8_lossy(&depends.stdout).split(',') {
        let name = part.split_whitespace().next().unwrap_or_default();
        if name.starts_with("linux-binary-") || name.starts_with("linux-base-") {
            let deb = download(&apt_dir, name)?;
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
        }
    }

    let release = package.trim_start_matches("linux-image-").to_string();
    let config = fs::read_to_string(unpacked(&dest, &release, "config"))
        .with_context(|| format!("{package} has no boot/config-{release} nor usr/lib/modules/{release}/config"))?;
    if !config.lines().any(|l| l == "CONFIG_BPF_LSM=y") {
        if which != Which::V510 {
            bail!("{package} is built without CONFIG_BPF_LSM=y: it cannot run BPF LSM programs");
        }
        eprintln!("xtask: {release}: no CONFIG_BPF_LSM: agentd runs its fallback programs there");
    }
    let lsm = config.lines().find_map(|l| l.strip_prefix("CONFIG_LSM=")).unwrap_or("\"\"");
    if lsm.contains("bpf") {
        eprintln!("xtask: {release}: CONFIG_BPF_LSM=y, and bpf is in its default LSM list {lsm}");
    } else {
        eprintln!("xtask: {release}: CONFIG_BPF_LSM=y; bpf is not in its default LSM list ({lsm}): lsm= on the command line adds it");
    }
    let vmlinuz = unpacked(&dest, &release, "vmlinuz");
    if !vmlinuz.exists() {
        bail!("{package} has no {}", vmlinuz.display());
    }
    fs::write(&marker, &release)?;
    Ok(Kernel { release, vmlinuz })
}
