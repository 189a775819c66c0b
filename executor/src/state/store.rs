//! Registered functions on disk, so that they survive a restart.
//!
//! Layout: `<state>/functions/<tenant>/<id>/` holds `function.json` (the
//! [`FunctionInfo`], which names its assets file by SHA-256 in the
//! tenant's [`AssetStore`](crate::assets::AssetStore)) and `module.wasm`
//! (the original bytes). Releases before the assets store kept an
//! `assets.safetensors` here; it is read once and moved to the store. A
//! function directory is written as
//! `.<id>.tmp` beside its final name, synced, and renamed into place (the
//! old one moved aside to `.<id>.old` first), so a crash leaves either the
//! old function or the new one; [`FunctionStore::load_all`] puts a `.old`
//! back when its function is missing and removes every other leftover.

use std::path::{Path, PathBuf};

use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::FunctionInfo;

/// One function as it was persisted.
#[derive(Debug)]
pub struct PersistedFunction {
    pub info: FunctionInfo,
    pub wasm: Vec<u8>,
    /// The `assets.safetensors` of the older layout.
    pub legacy_assets: Option<Vec<u8>>,
}

/// The `functions/` folder of a state directory.
#[derive(Clone, Debug)]
pub struct FunctionStore {
    root: PathBuf,
}

impl FunctionStore {
    /// The store under `state_dir`.
    pub fn new(state_dir: &Path) -> FunctionStore {
        FunctionStore {
            root: state_dir.join("functions"),
        }
    }

    fn tenant_dir(&self, tenant: &TenantId) -> PathBuf {
        self.root.join(tenant.as_str())
    }

    fn function_dir(&self, tenant: &TenantId, id: &str) -> PathBuf {
        self.tenant_dir(tenant).join(id)
    }

    /// Writes one function, replacing the one of its id.
    pub fn save(&self, tenant: &TenantId, info: &FunctionInfo, wasm: &[u8]) -> std::io::Result<()> {
        let dir = self.function_dir(tenant, &info.id);
        let parent = self.tenant_dir(tenant);
        std::fs::create_dir_all(&parent)?;
        let tmp = parent.join(format!(".{}.tmp", info.id));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join("module.wasm"), wasm)?;
        let json = serde_json::to_vec_pretty(info).map_err(std::io::Error::other)?;
        std::fs::write(tmp.join("function.json"), json)?;
        for file in std::fs::read_dir(&tmp)? {
            std::fs::File::open(file?.path())?.sync_all()?;
        }
        let old = parent.join(format!(".{}.old", info.id));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old)?;
        }
        std::fs::rename(&tmp, &dir)?;
        let _ = std::fs::remove_dir_all(&old);
        std::fs::File::open(&parent)?.sync_all()
    }

    /// Removes one function's files, best effort.
    pub fn remove(&self, tenant: &TenantId, id: &str) {
        let _ = std::fs::remove_dir_all(self.function_dir(tenant, id));
    }

    /// Removes every file of a tenant, best effort.
    pub fn remove_tenant(&self, tenant: &TenantId) {
        let _ = std::fs::remove_dir_all(self.tenant_dir(tenant));
    }

    /// Every persisted function, repairing interrupted replaces first.
    /// Unreadable ones are logged and skipped.
    pub fn load_all(&self) -> Vec<(TenantId, PersistedFunction)> {
        let Ok(tenants) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for tdir in tenants.flatten() {
            let Some(tenant) = tdir
                .file_name()
                .to_str()
                .and_then(|s| TenantId::new(s).ok())
            else {
                continue;
            };
            let Ok(functions) = std::fs::read_dir(tdir.path()) else {
                continue;
            };
            for fdir in functions.flatten() {
                let name = fdir.file_name().to_string_lossy().into_owned();
                let path = if name.starts_with('.') {
                    // A `.old` beside a missing function is the last good
                    // copy of an interrupted replace: put it back. Any
                    // other leftover is a write that never finished.
                    let missing = name
                        .strip_prefix('.')
                        .and_then(|n| n.strip_suffix(".old"))
                        .map(|id| tdir.path().join(id))
                        .filter(|fin| !fin.exists());
                    let Some(fin) = missing else {
                        let _ = std::fs::remove_dir_all(fdir.path());
                        continue;
                    };
                    if let Err(e) = std::fs::rename(fdir.path(), &fin) {
                        tracing::error!(%tenant, function = name, error = %e, "cannot put back the last good copy");
                        continue;
                    }
                    fin
                } else {
                    fdir.path()
                };
                match read_function(&path) {
                    Ok(f) => out.push((tenant.clone(), f)),
                    Err(e) => {
                        tracing::error!(%tenant, function = name, error = %e, "cannot restore function")
                    }
                }
            }
        }
        out
    }
}

fn read_function(dir: &Path) -> Result<PersistedFunction, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.display());
    let info: FunctionInfo =
        serde_json::from_slice(&std::fs::read(dir.join("function.json")).map_err(|e| at(&e))?)
            .map_err(|e| at(&e))?;
    let wasm = std::fs::read(dir.join("module.wasm")).map_err(|e| at(&e))?;
    let legacy_assets = match std::fs::read(dir.join("assets.safetensors")) {
        Ok(a) => Some(a),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(at(&e)),
    };
    Ok(PersistedFunction {
        info,
        wasm,
        legacy_assets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, name: &str) -> FunctionInfo {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": name, "sha256": "", "exports": [],
            "created_at": "", "config": {}, "assets": []
        }))
        .unwrap()
    }

    #[test]
    fn saves_replaces_and_repairs_an_interrupted_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = FunctionStore::new(dir.path());
        let t = TenantId::new("t").unwrap();
        store.save(&t, &info("fn-1", "a"), b"one").unwrap();
        store.save(&t, &info("fn-1", "b"), b"two").unwrap();
        let all = store.load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.info.name, "b");
        assert_eq!(all[0].1.wasm, b"two");
        assert_eq!(all[0].1.legacy_assets, None);
        // A crash between moving the old copy aside and renaming the new
        // one in: the old copy comes back, the half-written one goes.
        let tdir = dir.path().join("functions").join("t");
        std::fs::rename(tdir.join("fn-1"), tdir.join(".fn-1.old")).unwrap();
        std::fs::create_dir(tdir.join(".fn-1.tmp")).unwrap();
        let all = store.load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.wasm, b"two");
        assert!(!tdir.join(".fn-1.tmp").exists());
        store.remove(&t, "fn-1");
        assert!(store.load_all().is_empty());
    }
}
