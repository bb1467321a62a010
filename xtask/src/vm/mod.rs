//! `cargo xtask vm-test [--kernel 6.12|6.1|5.10|latest] [--timeout SECS] [NAME...]`: boots a Debian
//! kernel with BPF LSM under QEMU and runs `vm-tests/` inside it, through the real
//! supervisor. Exits non-zero on any failed test, a timeout, or a guest that printed no
//! verdict.

mod initramfs;
mod kernel;
mod qemu;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, ensure_bpf_toolchain, ensure_packages, is_root, root, run, step};

const VERDICT: &str = "AGENTD-VM-VERDICT";

/// Runs the VM tests.
pub fn vm_test(args: &[String]) -> Result<()> {
    let mut which = kernel::Which::V612;
    let mut timeout = Duration::from_secs(240);
    let mut names = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => which = kernel::Which::parse(it.next().context("--kernel needs 6.12, 6.1, 5.10 or latest")?)?,
            "--timeout" => {
                let secs = it.next().and_then(|s| s.parse().ok()).context("--timeout needs seconds")?;
                timeout = Duration::from_secs(secs);
            }
            flag if flag.starts_with('-') => bail!("unknown vm-test flag {flag}"),
            name => names.push(name.to_string()),
        }
    }
    if !is_root() {
        bail!("vm-test installs packages and fetches a kernel with apt: run it as root");
    }
    let started = Instant::now();
    ensure_packages(&[("qemu-system-x86_64", "qemu-system-x86"), ("cpio", "cpio"), ("busybox", "busybox-static")])?;
    if Command::new("ldd").arg("/bin/busybox").output().is_ok_and(|o| o.status.success()) {
        // The dynamic busybox cannot run in the VM without its libraries: use the static one.
        ensure_packages(&[("busybox-static-is-missing", "busybox-static")])?;
    }
    ensure_bpf_toolchain()?;

    step("building agentd and agentd-vm-tests (release)");
    // Two builds, not one: built together, the packages' features of shared dependencies
    // (libc, through nix) are unified, which would rebuild agentd and its dependency tree
    // every time the release agentd alone is built (cargo xtask test, the benchmarks).
    run(cargo().args(["build", "--release", "-p", "agentd"]).env("AGENTD_REQUIRE_BPF", "1"))?;
    run(cargo().args(["build", "--release", "-p", "agentd-vm-tests"]))?;
    // The host tests' helper that makes the audit layer's job hard (path races and the like).
    run(cargo().args(["build", "--release", "-p", "agentd-tests", "--bin", "paths"]))?;
    let bin = root().join("target/release");
    let k = kernel::fetch(which)?;

    step("building the initramfs");
    let vm = root().join("target/vm");
    let initrd = vm.join("initramfs.gz");
    let binaries = [bin.join("agentd"), bin.join("agentd-vm-tests"), bin.join("paths")];
    initramfs::build(&vm.join("initramfs-root"), &binaries, &initrd)?;

    let accel = if qemu::kvm_works(&k.vmlinuz, &initrd) { qemu::Accel::Kvm } else { qemu::Accel::Tcg };
    let mut cmdline = "console=ttyS0 lsm=landlock,bpf panic=-1 quiet loglevel=1".to_string();
    if !names.is_empty() {
        cmdline.push_str(&format!(" agentd.tests={}", names.join(",")));
    }
    step(&format!(
        "booting {} under QEMU ({accel:?}{}), timeout {} s: {cmdline}",
        k.release,
        if accel == qemu::Accel::Tcg { ": KVM is missing or cannot boot a standard guest here" } else { "" },
        timeout.as_secs()
    ));
    let mut console = qemu::boot(accel, &k.vmlinuz, &initrd, &cmdline, VERDICT, timeout, true)?;
    if console.marker.is_none() && console.panicked && accel == qemu::Accel::Tcg {
        // Emulator faults happen (see qemu::TCG_CPU); a second panic is a failure.
        eprintln!("xtask: the guest kernel panicked before a verdict (above); booting once more");
        console = qemu::boot(accel, &k.vmlinuz, &initrd, &cmdline, VERDICT, timeout, true)?;
    }
    let verdict = console.marker.context(if console.panicked {
        "the guest kernel panicked before printing a verdict: the VM tests did not finish"
    } else {
        "the guest printed no verdict line: the VM tests did not run"
    })?;
    // The default kernel has every feature the tests use: nothing may be excused there.
    report(&verdict, started, which.complete())
}

fn report(verdict: &str, started: Instant, strict: bool) -> Result<()> {
    let v: Value = serde_json::from_str(verdict).with_context(|| format!("unreadable verdict line: {verdict}"))?;
    let passed = v["passed"].as_array().map(Vec::len).unwrap_or(0);
    let failed = v["failed"].as_array().cloned().unwrap_or_default();
    let limited = v["limited"].as_array().cloned().unwrap_or_default();
    eprintln!(
        "\nxtask: VM tests on {}: {passed} passed, {} limited by the kernel, {} failed ({:.0} s in all)",
        v["kernel"].as_str().unwrap_or("?"),
        limited.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    for f in &failed {
        eprintln!("xtask:   FAILED {}: {}", f["name"].as_str().unwrap_or("?"), f["why"].as_str().unwrap_or("?"));
    }
    for l in &limited {
        eprintln!(
            "xtask:   needs a newer kernel: {}: {}",
            l["name"].as_str().unwrap_or("?"),
            l["why"].as_str().unwrap_or("?")
        );
    }
    if strict && !limited.is_empty() {
        bail!("tests were limited on a kernel that has every feature they need");
    }
    if passed == 0 || !failed.is_empty() {
        bail!("VM tests failed");
    }
    Ok(())
}
