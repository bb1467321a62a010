//! Signed checkpoints: agentd signs the chain's head with an Ed25519 key of the host, so that
//! whoever can write the log cannot edit a record and recompute the chain after it without
//! the key.
//!
//! A checkpoint is a record of kind `checkpoint` whose details sign its own `seq` and `prev`
//! (the hash of the line before it, which chains everything before). It is written after
//! every call's summary and at least every [`CHECKPOINT_EVERY`] records. `agentd audit
//! verify --key PUBLIC` checks every checkpoint's signature and that no record comes after
//! the last one.
//!
//! What this proves, and what not: a record covered by a valid checkpoint was in the log when
//! agentd signed it. Root on the host can read the key and sign a rewritten log, and can cut
//! the log back to an earlier checkpoint; only checkpoints kept elsewhere (shipped off the
//! host as they are written) anchor it against that. docs/audit.md says so too.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};

/// Records between two checkpoints at most (a call's end always makes one).
pub const CHECKPOINT_EVERY: u64 = 1000;

/// Where the host's signing key is, unless `AGENTD_AUDIT_KEY` says otherwise.
pub const DEFAULT_KEY_PATH: &str = "/var/lib/agentd/audit-signing.key";

/// What a checkpoint's signature covers.
const CONTEXT: &str = "agentd audit checkpoint v1";

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading, creating or checking the key file failed.
    #[error("{op} the audit signing key {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The key file is not ours alone, or not a key.
    #[error("the audit signing key {} {why}", path.display())]
    Unsafe {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A public key given to verify with is not one.
    #[error(
        "{0:?} is not an agentd audit public key (expected ed25519:<64 hex digits>, as `agentd audit key` prints)"
    )]
    BadPublic(String),
}

/// The path of the host's signing key.
pub fn key_path() -> PathBuf {
    std::env::var_os("AGENTD_AUDIT_KEY").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_PATH))
}

/// The host's signing key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("public", &self.public()).finish()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl Signer {
    /// Loads the key at `path`, creating it (mode 0600, from the kernel's random numbers) if
    /// there is none. A key readable by others, owned by another user, or reached through a
    /// symlink is refused.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let io = |op: &'static str| move |source| KeyError::Io { op, path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io("creating the directory of"))?;
            }
        }
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut seed = [0u8; 32];
                crate::sys::getrandom(&mut seed).map_err(io("making"))?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(path)
                    .map_err(io("creating"))?;
                f.write_all(format!("{}\n", hex(&seed)).as_bytes()).map_err(io("writing"))?;
                f.sync_all().map_err(io("syncing"))?;
                tracing::info!(key = %path.display(), "created the audit signing key");
            }
            Err(e) => return Err(io("reading")(e)),
            Ok(_) => {}
        }
        let md = fs::symlink_metadata(path).map_err(io("reading"))?;
        let me = crate::sys::geteuid();
        let why = if !md.is_file() {
            Some("is not a regular file (a symlink?)".to_string())
        } else if md.uid() != me {
            Some(format!("is owned by uid {}, not {me}", md.uid()))
        } else if md.permissions().mode() & 0o077 != 0 {
            Some(format!(
                "is readable or writable by others (mode {:o}); chmod 600 it",
                md.permissions().mode() & 0o777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(KeyError::Unsafe { path: path.to_path_buf(), why });
        }
        let text = fs::read_to_string(path).map_err(io("reading"))?;
        let seed: [u8; 32] = unhex(text.trim())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::Unsafe { path: path.to_path_buf(), why: "does not hold a key".into() })?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    /// The public key, as `agentd audit key` prints it and `--key` takes it.
    pub fn public(&self) -> String {
        format!("ed25519:{}", hex(self.key.verifying_key().as_bytes()))
    }

    /// The details of a checkpoint record at `seq` whose `prev` is `prev`.
    pub fn checkpoint(&self, seq: u64, prev: &str) -> serde_json::Value {
        let sig = self.key.sign(message(seq, prev).as_bytes());
        serde_json::json!({ "key": self.public(), "signature": hex(&sig.to_bytes()) })
    }
}

fn message(seq: u64, prev: &str) -> String {
    format!("{CONTEXT}\nseq {seq}\nprev {prev}\n")
}

/// A public key to check checkpoints with.
#[derive(Debug, Clone)]
pub struct Public {
    key: VerifyingKey,
    text: String,
}

impl Public {
    /// Parses `ed25519:<hex>` (or the name of a file holding it).
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let text = if s.starts_with("ed25519:") { s.to_string() } else { fs::read_to_string(s).unwrap_or_default() };
        let text = text.trim().to_string();
        let bytes: [u8; 32] = text
            .strip_prefix("ed25519:")
            .and_then(unhex)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| KeyError::BadPublic(s.to_string()))?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::BadPublic(s.to_string()))?;
        Ok(Self { key, text })
    }

    /// As `agentd audit key` prints it.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `details` (a checkpoint's) hold this key's valid signature of (`seq`, `prev`).
    pub fn check(&self, seq: u64, prev: &str, details: &serde_json::Value) -> Result<(), String> {
        if details["key"].as_str() != Some(self.text.as_str()) {
            return Err(format!("signed by another key ({})", details["key"]));
        }
        let sig: [u8; 64] = details["signature"]
            .as_str()
            .and_then(unhex)
            .and_then(|b| b.try_into().ok())
            .ok_or("the signature is not valid hex")?;
        self.key
            .verify(message(seq, prev).as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| "the signature does not match: the log before it was altered".to_string())
    }
}
