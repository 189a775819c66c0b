//! Folders that hold tenants' state (`SECURITY.md`, "Files on disk"), and
//! the keys of cache folders.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The file of a cache folder's key ([`dir_key`]).
pub const KEY_FILE: &str = "cache.key";

/// Creates `dir` (with its missing parents) for this user only, and makes
/// an existing one so: a state directory, whose files (functions, assets,
/// journals, warm state, moves, the audit log) are the tenants'. Files in
/// it are out of reach of other users whatever their own mode. A folder
/// this user may not change (a volume's mount point owned by root, as on
/// Kubernetes) keeps its mode.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Ok(()),
        other => other,
    }
}

/// The key of the cache folder `dir` (its [`KEY_FILE`]: 32 random bytes,
/// 0600), which its entries are signed with, so that a reader accepts only
/// what a process holding the key wrote (the compiled-module and kernel
/// caches). Made when `create` and it has none, or one of the wrong size;
/// of two processes making it at once, the first one's stands.
pub fn dir_key(dir: &Path, create: bool) -> std::io::Result<[u8; 32]> {
    let path = dir.join(KEY_FILE);
    let replace = match std::fs::read(&path) {
        Ok(k) => match <[u8; 32]>::try_from(k.as_slice()) {
            Ok(key) => return Ok(key),
            Err(_) if create => true,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a cache key of the wrong size",
                ));
            }
        },
        Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    let mut key = [0u8; 32];
    rand::RngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut key)
        .map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&key)?;
    f.sync_all()?;
    // A link fails where another process made the key meanwhile; a key of
    // the wrong size is replaced.
    let placed = if replace {
        std::fs::rename(&tmp, &path)
    } else {
        std::fs::hard_link(&tmp, &path)
    };
    let _ = std::fs::remove_file(&tmp);
    match placed {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => dir_key(dir, false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_dir_is_for_its_user_only_new_or_not() {
        let root = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = root.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700, "its parents too");
        let old = root.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&old).unwrap();
        assert_eq!(mode(&old), 0o700, "an existing one is tightened");
    }

    /// A cache folder's key is made once, for its user only, read back
    /// as it is, and replaced only when it is not a key.
    #[test]
    fn a_cache_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            dir_key(dir.path(), false).is_err(),
            "none made when reading"
        );
        let key = dir_key(dir.path(), true).unwrap();
        let path = dir.path().join(KEY_FILE);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(dir_key(dir.path(), true).unwrap(), key);
        assert_eq!(dir_key(dir.path(), false).unwrap(), key);
        std::fs::write(&path, b"short").unwrap();
        assert!(dir_key(dir.path(), false).is_err());
        let new = dir_key(dir.path(), true).unwrap();
        assert_ne!(new, key);
        assert_eq!(dir_key(dir.path(), false).unwrap(), new);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file is left");
    }
}
