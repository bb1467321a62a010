//! Opening a redb database file, shared by the memory store and the task store.

use std::path::Path;

use redb::Database;

/// redb's page cache (its default is 1 GiB): reads of a large store, such as a scan at start,
/// would otherwise stay resident up to that.
const CACHE_BYTES: usize = 8 << 20;

/// Opens (or creates) the redb file at `path`; errors are ready to show. A new file is laid
/// out under another name and linked into place: a crash while redb lays out a new file
/// would otherwise leave one that no later open accepts. A file another process has open
/// is refused with `in_use`.
pub fn open(path: &Path, in_use: &str) -> Result<Database, String> {
    if !path.exists() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let fresh = path.with_file_name(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&fresh);
        drop(Database::create(&fresh).map_err(|e| e.to_string())?);
        // A link, not a rename: if another process got there first, its file stays.
        let linked = std::fs::hard_link(&fresh, path);
        let _ = std::fs::remove_file(&fresh);
        match linked {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(format!("{}: {e}", path.display())),
            _ => {}
        }
    }
    Database::builder().set_cache_size(CACHE_BYTES).create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => in_use.to_string(),
        e => e.to_string(),
    })
}
