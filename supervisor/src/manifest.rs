//! Reading a manifest file for the CLI and the daemon: the one place a manifest's bytes come
//! from the filesystem before `agentd_policy` parses them.

use std::path::Path;

use agentd_policy::Manifest;

/// A manifest file's bytes, read once: what is parsed is what is hashed.
pub struct ManifestFile {
    name: String,
    bytes: Vec<u8>,
}

impl ManifestFile {
    /// Reads `path`. On failure returns the line to print (`FILE: error: ...`).
    pub fn read(path: &Path) -> Result<Self, Vec<String>> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| vec![format!("{name}: error: cannot read the manifest: {e}")])?;
        Ok(Self { name, bytes })
    }

    /// The SHA-256 of these bytes, hex: what a long-running server read at start, for the
    /// calls it starts to check theirs against.
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(&self.bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Validates these bytes. On failure returns the lines to print (each
    /// `FILE:LINE:COL: error: MESSAGE`); with the warnings, each a line to print.
    pub fn parse(&self) -> Result<(Manifest, Vec<String>), Vec<String>> {
        let (m, warnings) = agentd_policy::parse_bytes_with_warnings(&self.name, &self.bytes)
            .map_err(|d| d.0.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        Ok((m, warnings.iter().map(ToString::to_string).collect()))
    }
}

/// Reads and validates a manifest. On failure returns the lines to print (each
/// `FILE:LINE:COL: error: MESSAGE`, or `FILE: error: ...` when it cannot be read).
pub fn load_manifest(path: &Path) -> Result<Manifest, Vec<String>> {
    load_manifest_with_warnings(path).map(|(m, _)| m)
}

/// [`load_manifest`], also returning the warnings, each a line to print.
pub fn load_manifest_with_warnings(path: &Path) -> Result<(Manifest, Vec<String>), Vec<String>> {
    ManifestFile::read(path)?.parse()
}
