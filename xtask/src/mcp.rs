//! The real MCP components the tests talk to, none of them written here: the official
//! Python SDK (a client), `mcp-server-time`, the MCP conformance suite and
//! `@modelcontextprotocol/server-filesystem`. Installed once, at pinned versions, under
//! `~/.cache/agentd/mcp` (`AGENTD_MCP_TOOLS` for the tests); nothing is fetched while a test
//! runs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::{ensure_packages, run, step};

/// PyPI packages, into `venv/`.
const PYTHON: &[&str] = &["mcp==2.3.0", "mcp-server-time==2026.10.19"];

/// npm packages, into `npm/`. The conformance suite from 0.1.14 on needs Node 22
/// (`fs.globSync`); Debian's Node is 20. `@taplo/cli` (a JS and WebAssembly build of the
/// TOML toolkit editors use) validates the example manifests against the shipped schema.
const NPM: &[&str] = &[
    "@modelcontextprotocol/conformance@0.1.13",
    "@modelcontextprotocol/server-filesystem@2026.8.31",
    "@taplo/cli@0.7.0",
];

/// Where they go.
pub fn dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/agentd/mcp")
}

/// Installs what is missing or at another version; returns the directory.
pub fn ensure() -> Result<PathBuf> {
    let dir = dir();
    let stamp = dir.join("installed");
    let want = format!("venv of /usr/bin/python3: {}\n{}\n", PYTHON.join(" "), NPM.join(" "));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        eprintln!("xtask: MCP test components present in {} ({})", dir.display(), want.replace('\n', " "));
        return Ok(dir);
    }
    ensure_packages(&[("node", "nodejs"), ("npm", "npm")])?;
    let venv_ok =
        Command::new("/usr/bin/python3").args(["-c", "import ensurepip"]).output().is_ok_and(|o| o.status.success());
    if !venv_ok {
        ensure_packages(&[("venv-is-missing", "python3-venv")])?;
    }
    step(&format!("installing the MCP test components into {} (once)", dir.display()));
    std::fs::create_dir_all(dir.join("npm")).with_context(|| format!("creating {}", dir.display()))?;
    let _ = std::fs::remove_file(&stamp);
    // Debian's interpreter, not one under a home directory (pyenv): the tests copy the venv
    // into a sandbox, which sees /usr but no home.
    let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let _ = std::fs::remove_dir_all(dir.join("venv"));
    run(Command::new(python).args(["-m", "venv"]).arg(dir.join("venv")))?;
    run(Command::new(dir.join("venv/bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PYTHON))?;
    let npm = dir.join("npm");
    if !npm.join("package.json").exists() {
        std::fs::write(npm.join("package.json"), "{\"name\": \"agentd-mcp-tests\", \"private\": true}\n")
            .context("writing package.json")?;
    }
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix"])
        .arg(&npm)
        .args(NPM))?;
    std::fs::write(&stamp, want).context("writing the install stamp")?;
    Ok(dir)
}
