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
}

impl Which {
    /// From `--kernel`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "6.12" => Ok(Which::V612),
            "6.1" => Ok(Which::V61),
            other => bail!("--kernel {other}: choose 6.12 (default) or 6.1"),
        }
    }

    fn label(self) -> &'static str {
        match self {
            Which::V612 => "6.12",
            Which::V61 => "6.1",
        }
    }

    fn suite(self) -> &'static str {
        match self {
            Which::V612 => "bookworm-backports",
            Which::V61 => "bookworm",
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

/// Fetches (once) and unpacks the kernel, and checks it can run BPF LSM programs.
pub fn fetch(which: Which) -> Result<Kernel> {
    let base = root().join("target/vm");
    let dest = base.join(format!("kernel-{}", which.label()));
    let marker = dest.join("release");
    if let Ok(release) = fs::read_to_string(&marker) {
        let release = release.trim().to_string();
        let vmlinuz = dest.join(format!("boot/vmlinuz-{release}"));
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
    let archives = apt_dir.join("archives");
    // `apt-get download` writes to the working directory (so not through `run`, which sets it).
    let status = apt(&apt_dir, "apt-get").args(["download", "-qq", &package]).current_dir(&archives).status()?;
    if !status.success() {
        bail!("apt-get download {package} failed ({status})");
    }
    let deb = fs::read_dir(&archives)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
        .with_context(|| format!("apt-get download left no {package}_*.deb in {}", archives.display()))?;
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir_all(&dest)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    let release = package.trim_start_matches("linux-image-").to_string();
    let config = fs::read_to_string(dest.join(format!("boot/config-{release}")))
        .with_context(|| format!("{package} has no boot/config-{release}"))?;
    if !config.lines().any(|l| l == "CONFIG_BPF_LSM=y") {
        bail!("{package} is built without CONFIG_BPF_LSM=y: it cannot run BPF LSM programs");
    }
    let lsm = config.lines().find_map(|l| l.strip_prefix("CONFIG_LSM=")).unwrap_or("\"\"");
    if lsm.contains("bpf") {
        eprintln!("xtask: {release}: CONFIG_BPF_LSM=y, and bpf is in its default LSM list {lsm}");
    } else {
        eprintln!("xtask: {release}: CONFIG_BPF_LSM=y; bpf is not in its default LSM list ({lsm}): lsm= on the command line adds it");
    }
    let vmlinuz = dest.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{package} has no {}", vmlinuz.display());
    }
    fs::write(&marker, &release)?;
    Ok(Kernel { release, vmlinuz })
}
