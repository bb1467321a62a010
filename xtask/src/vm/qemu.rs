//! Booting the VM under QEMU and reading its serial console.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How the guest CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (only where a standard guest boots).
    Kvm,
    /// Emulation, with the flags known to boot the Debian kernels here (see ENVIRONMENT.md:
    /// `-smp 2` and `-cpu max` panicked the 6.12 kernel under TCG).
    Tcg,
}

/// What one boot printed.
#[derive(Debug)]
pub struct Console {
    /// The line after the marker, if it was seen.
    pub marker: Option<String>,
    /// The guest kernel panicked.
    pub panicked: bool,
}

/// The CPU model TCG emulates (`AGENTD_VM_CPU` overrides it). Without cmpxchg16b: with it,
/// about one boot in four double-faulted inside SLUB's cmpxchg16b fast path under TCG on this
/// host (garbage EFLAGS, so the emulator rather than the guest); without it, none in ten.
const TCG_CPU: &str = "Haswell-noTSX,-cx16";

fn command(accel: Accel, kernel: &Path, initrd: &Path, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    match accel {
        Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host", "-smp", "2"]),
        Accel::Tcg => {
            let cpu = std::env::var("AGENTD_VM_CPU").unwrap_or_else(|_| TCG_CPU.into());
            c.args(["-accel", "tcg", "-cpu", &cpu, "-smp", "1"])
        }
    };
    c.args(["-m", "1024", "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Boots, echoes the console (when `echo`), and returns what follows `marker` on its line.
/// Kills the VM at `timeout`.
pub fn boot(
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    marker: &str,
    timeout: Duration,
    echo: bool,
) -> Result<Console> {
    let mut child = command(accel, kernel, initrd, cmdline).spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let _ = tx.send(String::from_utf8_lossy(&line).trim_end_matches('\r').to_string());
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu: {line}"));
        }
    });
    let deadline = Instant::now() + timeout;
    let mut found = None;
    let mut panicked = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if echo {
                    eprintln!("vm| {line}");
                }
                panicked |= line.contains("Kernel panic - not syncing");
                if let Some(at) = line.find(marker) {
                    found = Some(line[at + marker.len()..].trim().to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                if found.is_some() {
                    // The verdict is in; only the power-off hung.
                    return Ok(Console { marker: found, panicked });
                }
                bail!("the VM did not finish within {} s (killed)", timeout.as_secs());
            }
        }
    }
    let status = child.wait()?;
    if found.is_none() && !status.success() && !panicked {
        bail!("qemu exited with {status} before the guest printed {marker}");
    }
    Ok(Console { marker: found, panicked })
}

/// Whether a KVM guest boots here: `/dev/kvm` exists and a probe boot reaches init.
pub fn kvm_works(kernel: &Path, initrd: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let probe = boot(
        Accel::Kvm,
        kernel,
        initrd,
        "console=ttyS0 panic=-1 quiet agentd.probe",
        "AGENTD-VM-PROBE",
        Duration::from_secs(20),
        false,
    );
    matches!(probe, Ok(Console { marker: Some(_), .. }))
}
