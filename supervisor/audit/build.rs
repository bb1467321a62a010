//! Builds agentd's eBPF programs (ebpf/programs) and embeds the object in the binary.
//!
//! The programs need a nightly toolchain with rust-src and bpf-linker (`cargo xtask test`
//! and `cargo xtask demo` install both). Without them agentd still builds, embeds an empty
//! object and reports the BPF layer as unavailable at run time; `AGENTD_REQUIRE_BPF=1` turns
//! that into a build error (xtask and CI set it).
//!
//! Written here rather than with `aya-build`: that crate builds a package of the current
//! workspace, and ours is a separate workspace so that `cargo build --workspace` on stable
//! never tries to compile BPF code for the host.

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    // This crate is supervisor/audit: the workspace root is two levels up.
    let root = manifest_dir.ancestors().nth(2).expect("workspace root").to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    for dir in ["ebpf/programs/src", "ebpf/programs/Cargo.toml", "ebpf/common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=AGENTD_REQUIRE_BPF");
    let object = out.join("agentd.bpf.o");
    match build(&root) {
        Ok(built) => {
            fs::copy(&built, &object).expect("copy the eBPF object");
        }
        Err(why) => {
            if env::var("AGENTD_REQUIRE_BPF").is_ok_and(|v| v == "1") {
                panic!("agentd's eBPF programs could not be built: {why}");
            }
            println!("cargo:warning=building agentd without its eBPF programs: {why}");
            fs::write(&object, b"").expect("write an empty eBPF object");
        }
    }
}

fn build(root: &std::path::Path) -> Result<PathBuf, String> {
    let have = |cmd: &str, args: &[&str]| Command::new(cmd).args(args).output().is_ok_and(|o| o.status.success());
    if !have("bpf-linker", &["--version"]) {
        return Err("bpf-linker is not installed (cargo xtask installs it)".into());
    }
    if !have("rustup", &["run", "nightly", "rustc", "--version"]) {
        return Err("no nightly toolchain (cargo xtask installs it)".into());
    }
    // One target directory for every profile of the outer build: the object (and so the hash
    // its pins are named by) is then the same for debug and release agentd binaries.
    let target_dir =
        env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target")).join("ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "-Z", "build-std=core"])
        .args(["--target", "bpfel-unknown-none", "--manifest-path"])
        .arg(root.join("ebpf/programs/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer (stable) build's settings must not leak into the nightly BPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd.output().map_err(|e| format!("running cargo +nightly: {e}"))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = err.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!("cargo +nightly build failed:\n{}", tail.join("\n")));
    }
    let built = target_dir.join("bpfel-unknown-none/release/agentd-ebpf");
    if !built.exists() {
        return Err(format!("{} was not produced", built.display()));
    }
    Ok(built)
}
