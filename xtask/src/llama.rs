//! llama.cpp's OpenAI-compatible server, through llama-cpp-python with its server extra: the
//! real model server the tests of `--backend openai` start on loopback, and the peer
//! `agentd bench infer` measures against. Built once from PyPI's source release (a few
//! minutes: it compiles llama.cpp) into `~/.cache/agentd/llama-venv` (`AGENTD_LLAMA_VENV`
//! for the tests); nothing is fetched while a test runs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::{ensure_packages, run, step};

/// The package, pinned.
const PACKAGE: &str = "llama-cpp-python[server]==0.3.36";

/// Where it goes.
pub fn dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/agentd/llama-venv")
}

/// Whether the venv at `dir` imports the server at the pinned version.
fn works(dir: &std::path::Path) -> bool {
    let version = PACKAGE.rsplit("==").next().unwrap_or_default();
    Command::new(dir.join("bin/python"))
        .args([
            "-c",
            "import llama_cpp, llama_cpp.server.app, sys; sys.exit(llama_cpp.__version__ != sys.argv[1])",
            version,
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the venv if it is missing or at another version; returns it.
pub fn ensure() -> Result<PathBuf> {
    let dir = dir();
    let stamp = dir.join("agentd-installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == PACKAGE) && works(&dir) {
        eprintln!("xtask: llama.cpp's server present in {} ({PACKAGE})", dir.display());
        return Ok(dir);
    }
    // A venv built by hand with the same version is taken as it is.
    if works(&dir) {
        std::fs::write(&stamp, PACKAGE).context("writing the install stamp")?;
        eprintln!("xtask: llama.cpp's server present in {} ({PACKAGE})", dir.display());
        return Ok(dir);
    }
    ensure_packages(&[("g++", "g++"), ("cmake", "cmake"), ("make", "make")])?;
    let venv_ok =
        Command::new("/usr/bin/python3").args(["-c", "import ensurepip"]).output().is_ok_and(|o| o.status.success());
    if !venv_ok {
        ensure_packages(&[("venv-is-missing", "python3-venv")])?;
    }
    step(&format!("building {PACKAGE} into {} (once; it compiles llama.cpp, a few minutes)", dir.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    run(Command::new(python).args(["-m", "venv"]).arg(&dir))?;
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--disable-pip-version-check", "--no-cache-dir", "--progress-bar", "off", PACKAGE])
        // Two cores: the build uses both.
        .env("CMAKE_BUILD_PARALLEL_LEVEL", "2"))?;
    anyhow::ensure!(works(&dir), "{PACKAGE} installed into {} but does not import", dir.display());
    std::fs::write(&stamp, PACKAGE).context("writing the install stamp")?;
    Ok(dir)
}
