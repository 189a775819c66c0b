//! Function assets: weights shipped as a safetensors file.
//!
//! An assets file is never held whole in memory. Registration streams it to
//! a temporary file in the tenant's folder of the [`AssetStore`], hashing it
//! on the way ([`AssetUpload`]); the file is then validated ([`inspect`]:
//! header bounds, dtypes, shapes, offsets that tile the data exactly, with
//! no gap or overlap) before anything is registered, and renamed to its
//! SHA-256 (`<state>/assets/<tenant>/<sha256>.safetensors`), with the
//! BLAKE3 of its bytes beside it (`<sha256>.blake3`): what a migration's
//! destination checks the bytes it fetches against, at a third of the cost
//! of recomputing the SHA-256 ([`AssetStore::upload_vouched`]).
//!
//! A file is loaded once per tenant ([`LoadedAssets`]): memory-mapped and
//! borrowed without a copy by the CPU backend, uploaded once to the device
//! by CUDA. Functions of the same tenant that carry the same bytes share that
//! one load and are charged for it once. Files are kept per tenant, so no
//! tenant's upload can reveal whether another holds the same bytes.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use tensor_wasm_kernels::{Backend, DType, Limits, SharedBytes, Tensor};

use crate::tensors::TenantUsage;

/// Largest safetensors header accepted, in bytes: 16 MiB. The header is
/// JSON parsed whole; a model of hundreds of billions of parameters has one
/// of a few hundred KiB.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// Most tensors in one assets file: 1 Mi, far past any real model, so that a
/// header cannot make the index cost more than its own size.
pub const MAX_ASSET_TENSORS: usize = 1 << 20;

/// Why an assets file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("assets are not a valid safetensors file: {0}")]
    Malformed(String),
    #[error("asset {name:?} has dtype {dtype:?}; supported are F32, F16, BF16, I32, I64, U8")]
    UnsupportedDType { name: String, dtype: String },
    #[error("asset {name:?}: {source}")]
    Tensor {
        name: String,
        #[source]
        source: tensor_wasm_kernels::KernelError,
    },
    #[error("assets exceed the tenant's device memory quota: {0}")]
    Quota(String),
    #[error("assets are limited to {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("assets store: {0}")]
    Io(#[source] std::io::Error),
    /// Bytes a peer sent are not the file it named.
    #[error("assets file does not match: {0}")]
    Mismatch(String),
}

/// The dtype of a safetensors tensor, when we support it.
pub fn dtype_from_safetensors(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// The safetensors dtype of ours.
pub fn dtype_to_safetensors(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::U8 => Dtype::U8,
    }
}

/// One tensor of a validated assets file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssetEntry {
    pub name: String,
    pub dtype: DType,
    pub dims: Vec<usize>,
    /// Its bytes within the file.
    pub range: Range<usize>,
}

/// The layout of a valid assets file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssetIndex {
    pub entries: Vec<AssetEntry>,
    /// Bytes of tensor data: what the tensors cost their device.
    pub data_bytes: u64,
}

impl AssetIndex {
    /// Names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.entries.iter().map(|e| e.name.clone()).collect();
        n.sort();
        n
    }
}

/// Checks that `file` is a safetensors file whose every tensor this
/// executor can hold under `limits`, and returns its layout. Reads only
/// what the header points at; never allocates more than the header's size.
pub fn inspect(file: &[u8], limits: &Limits) -> Result<AssetIndex, AssetError> {
    let declared = file
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .ok_or_else(|| AssetError::Malformed("shorter than the 8-byte header length".into()))?;
    if declared > MAX_HEADER_BYTES {
        return Err(AssetError::Malformed(format!(
            "a header of {declared} bytes is over the {MAX_HEADER_BYTES} allowed"
        )));
    }
    let st = SafeTensors::deserialize(file).map_err(|e| AssetError::Malformed(e.to_string()))?;
    if st.len() > MAX_ASSET_TENSORS {
        return Err(AssetError::Malformed(format!(
            "{} tensors; at most {MAX_ASSET_TENSORS} are allowed",
            st.len()
        )));
    }
    // `deserialize` checked that the offsets tile the data exactly; the
    // data starts right after the header.
    let base = 8 + declared as usize;
    let mut entries = Vec::with_capacity(st.len());
    let mut data_bytes = 0u64;
    for (name, view) in st.iter() {
        let dtype =
            dtype_from_safetensors(view.dtype()).ok_or_else(|| AssetError::UnsupportedDType {
                name: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            })?;
        limits
            .check_tensor("asset", dtype, view.shape())
            .map_err(|source| AssetError::Tensor {
                name: name.to_string(),
                source,
            })?;
        let data = view.data();
        // The view borrows `file`: its offset in the file is its address
        // minus the file's.
        let start = data.as_ptr() as usize - file.as_ptr() as usize;
        debug_assert!(start >= base);
        entries.push(AssetEntry {
            name: name.to_string(),
            dtype,
            dims: view.shape().to_vec(),
            range: start..start + data.len(),
        });
        data_bytes += data.len() as u64;
    }
    entries.sort_by_key(|e| e.range.start);
    Ok(AssetIndex {
        entries,
        data_bytes,
    })
}

/// A tenant's assets file, loaded once on the tenant's device and charged
/// to its device memory once, however many functions use it. Gives the
/// charge back when the last function using it goes.
#[derive(Debug)]
pub struct LoadedAssets {
    /// SHA-256 of the file, hex.
    pub sha256: String,
    pub tensors: Arc<HashMap<String, Tensor>>,
    pub index: AssetIndex,
    bytes: u64,
    usage: Arc<TenantUsage>,
}

impl LoadedAssets {
    /// Makes every tensor of `index` over `file` (which it describes) on
    /// `backend`, charging `usage` first: the CPU backend borrows the
    /// mapped bytes, others upload them.
    pub fn load(
        sha256: String,
        file: SharedBytes,
        index: AssetIndex,
        backend: &dyn Backend,
        usage: Arc<TenantUsage>,
    ) -> Result<LoadedAssets, AssetError> {
        usage
            .reserve(index.data_bytes, true)
            .map_err(|e| AssetError::Quota(e.message))?;
        let bytes = index.data_bytes;
        // Built first, so that a failure below gives the charge back.
        let mut loaded = LoadedAssets {
            sha256,
            tensors: Arc::new(HashMap::new()),
            index,
            bytes,
            usage,
        };
        let mut tensors = HashMap::with_capacity(loaded.index.entries.len());
        for e in &loaded.index.entries {
            let t = backend
                .from_shared(e.dtype, &e.dims, file.clone(), e.range.clone())
                .map_err(|source| AssetError::Tensor {
                    name: e.name.clone(),
                    source,
                })?;
            tensors.insert(e.name.clone(), t);
        }
        loaded.tensors = Arc::new(tensors);
        Ok(loaded)
    }

    /// Device bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for LoadedAssets {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.usage.release(self.bytes, true);
        }
    }
}

/// A function's view of its assets: none, or a shared [`LoadedAssets`].
#[derive(Clone, Debug, Default)]
pub struct Assets {
    loaded: Option<Arc<LoadedAssets>>,
}

impl Assets {
    /// No assets.
    pub fn none() -> Assets {
        Assets { loaded: None }
    }

    pub fn of(loaded: Arc<LoadedAssets>) -> Assets {
        Assets {
            loaded: Some(loaded),
        }
    }

    /// The tensors by name (empty without assets).
    pub fn tensors(&self) -> Arc<HashMap<String, Tensor>> {
        self.loaded
            .as_ref()
            .map_or_else(|| Arc::new(HashMap::new()), |l| l.tensors.clone())
    }

    /// SHA-256 of the file, if any.
    pub fn sha256(&self) -> Option<&str> {
        self.loaded.as_ref().map(|l| l.sha256.as_str())
    }

    /// Names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.loaded
            .as_ref()
            .map_or_else(Vec::new, |l| l.index.names())
    }
}

/// Every tenant's assets files on disk, by content:
/// `<state>/assets/<tenant>/<sha256>.safetensors`. A file is written once
/// (as `.upload-*` beside its final name, synced, renamed into place) and
/// never changed after; it is removed when no function of its tenant uses it.
#[derive(Clone, Debug)]
pub struct AssetStore {
    root: PathBuf,
}

/// Name prefix of uploads in progress; leftovers are removed at start-up.
const UPLOAD_PREFIX: &str = ".upload-";

/// Writes of an upload are gathered up to 64 KiB; larger chunks (what a
/// peer's stream brings) go to the file without a copy.
const UPLOAD_BUFFER: usize = 64 << 10;

/// Writeback of an upload starts every 8 MiB.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Suffix of the file beside `<sha256>.safetensors` that records the
/// BLAKE3 digest of its bytes, which a destination of a move checks
/// instead of recomputing the SHA-256.
const DIGEST_SUFFIX: &str = ".blake3";

impl AssetStore {
    /// The store under `state_dir`.
    pub fn new(state_dir: &Path) -> AssetStore {
        AssetStore {
            root: state_dir.join("assets"),
        }
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.root.join(tenant)
    }

    /// Where the file of `sha256` lives for `tenant`.
    pub fn path(&self, tenant: &str, sha256: &str) -> PathBuf {
        self.tenant_dir(tenant)
            .join(format!("{sha256}.safetensors"))
    }

    /// Whether `tenant` holds the file of `sha256`.
    pub fn contains(&self, tenant: &str, sha256: &str) -> bool {
        is_sha256(sha256) && self.path(tenant, sha256).is_file()
    }

    /// Starts receiving an assets file of at most `cap` bytes for `tenant`.
    pub fn upload(&self, tenant: &str, cap: u64) -> Result<AssetUpload, AssetError> {
        let dir = self.tenant_dir(tenant);
        std::fs::create_dir_all(&dir).map_err(AssetError::Io)?;
        let path = dir.join(format!("{UPLOAD_PREFIX}{:016x}", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(AssetError::Io)?;
        Ok(AssetUpload {
            file: std::io::BufWriter::with_capacity(UPLOAD_BUFFER, file),
            staged: StagedAsset {
                path,
                sha256: String::new(),
                blake3: String::new(),
                len: 0,
                synced: false,
            },
            hasher: Digests::naming(),
            aside: None,
            cap,
            vouched: None,
            written_back: 0,
        })
    }

    /// As [`upload`](Self::upload), for the bytes a peer executor vouches
    /// are its file `sha256` with BLAKE3 digest `blake3`: only the BLAKE3
    /// is computed (several times cheaper than SHA-256), and
    /// [`finish`](AssetUpload::finish) fails unless the bytes match it.
    pub fn upload_vouched(
        &self,
        tenant: &str,
        cap: u64,
        sha256: &str,
        blake3: &str,
    ) -> Result<AssetUpload, AssetError> {
        if !is_sha256(sha256) {
            return Err(AssetError::Mismatch(format!("{sha256:?} is not a SHA-256")));
        }
        let blake3 = blake3::Hash::from_hex(blake3)
            .map_err(|_| AssetError::Mismatch(format!("{blake3:?} is not a BLAKE3 digest")))?;
        let mut up = self.upload(tenant, cap)?;
        up.hasher = Digests::default();
        up.vouched = Some((sha256.to_string(), blake3));
        Ok(up)
    }

    /// The BLAKE3 digest of `tenant`'s file `sha256`, recorded beside it
    /// when it was stored; `None` for a file stored by a release that did
    /// not record it.
    pub fn blake3(&self, tenant: &str, sha256: &str) -> Option<String> {
        if !is_sha256(sha256) {
            return None;
        }
        let hex = std::fs::read_to_string(self.digest_path(tenant, sha256)).ok()?;
        let hex = hex.trim();
        blake3::Hash::from_hex(hex).ok().map(|_| hex.to_string())
    }

    /// Where the BLAKE3 digest of the file of `sha256` is recorded.
    fn digest_path(&self, tenant: &str, sha256: &str) -> PathBuf {
        self.tenant_dir(tenant)
            .join(format!("{sha256}{DIGEST_SUFFIX}"))
    }

    /// Stages bytes already in memory (a snapshot's, an older layout's).
    pub fn stage_bytes(&self, tenant: &str, bytes: &[u8]) -> Result<StagedAsset, AssetError> {
        let mut up = self.upload(tenant, u64::MAX)?;
        up.write(bytes)?;
        up.finish()
    }

    /// Moves a validated upload to its content address (dropping it if the
    /// tenant holds those bytes already); returns the final path. The name
    /// is synced to disk with the file, unless the file was not synced
    /// ([`AssetUpload::finish_unsynced`]): then its caller syncs both, the
    /// file and then [`sync_dir`](Self::sync_dir), before relying on them
    /// (on ext4, syncing the folder writes the new file's data too, which
    /// a migration does while it copies the tenant's memory).
    pub fn commit(&self, tenant: &str, mut staged: StagedAsset) -> Result<PathBuf, AssetError> {
        let fin = self.path(tenant, &staged.sha256);
        if fin.is_file() {
            return Ok(fin);
        }
        // The digest first: a crash before the rename leaves it alone,
        // and `retain` removes it with the file's other leftovers.
        std::fs::write(self.digest_path(tenant, &staged.sha256), &staged.blake3)
            .map_err(AssetError::Io)?;
        std::fs::rename(&staged.path, &fin).map_err(AssetError::Io)?;
        staged.path = PathBuf::new();
        if staged.synced {
            self.sync_dir(tenant)?;
        }
        Ok(fin)
    }

    /// Syncs the names of `tenant`'s files to disk.
    pub fn sync_dir(&self, tenant: &str) -> Result<(), AssetError> {
        std::fs::File::open(self.tenant_dir(tenant))
            .and_then(|d| d.sync_all())
            .map_err(AssetError::Io)
    }

    /// Removes `tenant`'s file `sha256` and its digest; a file that is not
    /// there is no error.
    pub fn remove(&self, tenant: &str, sha256: &str) -> std::io::Result<()> {
        for path in [self.path(tenant, sha256), self.digest_path(tenant, sha256)] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes `tenant`'s files that are not in `keep`, and any upload left
    /// half-way; best effort.
    pub fn retain(&self, tenant: &str, keep: &[&str]) {
        let Ok(entries) = std::fs::read_dir(self.tenant_dir(tenant)) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let kept = name
                .strip_suffix(".safetensors")
                .or_else(|| name.strip_suffix(DIGEST_SUFFIX))
                .is_some_and(|h| keep.contains(&h));
            if !kept {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Removes the folders of tenants not in `keep`, best effort.
    pub fn retain_tenants(&self, keep: &[&str]) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name.as_str()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes every file of `tenant`, best effort.
    pub fn remove_tenant(&self, tenant: &str) {
        let _ = std::fs::remove_dir_all(self.tenant_dir(tenant));
    }
}

/// Whether `s` is a SHA-256 in lowercase hex.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An assets file being received: written to disk as it arrives and
/// hashed on the way. Dropped before [`finish`](Self::finish), the partial
/// file is removed.
#[derive(Debug)]
pub struct AssetUpload {
    file: std::io::BufWriter<std::fs::File>,
    staged: StagedAsset,
    hasher: Digests,
    /// Set by [`hash_aside`](AssetUpload::hash_aside).
    aside: Option<AsideHasher>,
    cap: u64,
    /// The name and BLAKE3 digest a peer vouched for.
    vouched: Option<(String, blake3::Hash)>,
    /// Bytes handed to the disk's writeback so far.
    written_back: u64,
}

/// The digests an upload computes: SHA-256, the file's name, unless a
/// peer vouched for it; BLAKE3 always, recorded beside the file.
#[derive(Clone, Default)]
struct Digests {
    sha256: Option<Sha256>,
    blake3: blake3::Hasher,
}

impl Digests {
    fn naming() -> Digests {
        Digests {
            sha256: Some(Sha256::new()),
            blake3: blake3::Hasher::new(),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        if let Some(s) = &mut self.sha256 {
            s.update(bytes);
        }
        self.blake3.update(bytes);
    }
}

impl std::fmt::Debug for Digests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Digests")
            .field("sha256", &self.sha256.is_some())
            .finish_non_exhaustive()
    }
}

/// Hashes an upload's bytes on a thread of its own.
#[derive(Debug)]
struct AsideHasher {
    tx: std::sync::mpsc::SyncSender<bytes::Bytes>,
    thread: std::thread::JoinHandle<Digests>,
}

impl AssetUpload {
    /// Appends `chunk`; past the cap, [`AssetError::TooLarge`].
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), AssetError> {
        if self.aside.is_some() {
            return self.write_bytes(bytes::Bytes::copy_from_slice(chunk));
        }
        self.append(chunk)?;
        self.hasher.update(chunk);
        Ok(())
    }

    /// As [`write`](Self::write), handing the bytes to the hashing thread
    /// without a copy when there is one.
    pub fn write_bytes(&mut self, chunk: bytes::Bytes) -> Result<(), AssetError> {
        self.append(&chunk)?;
        match &self.aside {
            Some(a) => {
                a.tx.send(chunk)
                    .map_err(|_| AssetError::Io(std::io::Error::other("the hashing thread went")))
            }
            None => {
                self.hasher.update(&chunk);
                Ok(())
            }
        }
    }

    fn append(&mut self, chunk: &[u8]) -> Result<(), AssetError> {
        let len = self.staged.len + chunk.len() as u64;
        if len > self.cap {
            return Err(AssetError::TooLarge { limit: self.cap });
        }
        self.file.write_all(chunk).map_err(AssetError::Io)?;
        self.staged.len = len;
        // The disk writes the file while the rest arrives, so that the
        // sync at the end has little left to do.
        let written = len - self.file.buffer().len() as u64;
        if written >= self.written_back + WRITEBACK_STEP {
            crate::sys::start_writeback(self.file.get_ref(), self.written_back);
            self.written_back = written;
        }
        Ok(())
    }

    /// Hashes what is written from here on on a thread of its own, so that
    /// writing the file and hashing it (about as costly) overlap: for a
    /// fetch that has nothing else to do meanwhile (a migration's).
    pub fn hash_aside(&mut self) -> Result<(), AssetError> {
        if self.aside.is_some() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
        let mut hasher = std::mem::take(&mut self.hasher);
        let thread = std::thread::Builder::new()
            .name("assets-hash".into())
            .spawn(move || {
                for chunk in rx {
                    hasher.update(&chunk);
                }
                hasher
            })
            .map_err(AssetError::Io)?;
        self.aside = Some(AsideHasher { tx, thread });
        Ok(())
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.staged.len
    }

    pub fn is_empty(&self) -> bool {
        self.staged.len == 0
    }

    /// Flushes and syncs the file; its hash is known from here on.
    pub fn finish(self) -> Result<StagedAsset, AssetError> {
        let (mut staged, file) = self.finish_unsynced()?;
        file.sync_all().map_err(AssetError::Io)?;
        staged.synced = true;
        Ok(staged)
    }

    /// Flushes the file, and hands back with it a handle that syncs it to
    /// disk: for a caller that syncs while it goes on (a migration syncs
    /// fetched files while it copies the tenant's memory, and waits for
    /// them before the tenant moves).
    pub fn finish_unsynced(mut self) -> Result<(StagedAsset, std::fs::File), AssetError> {
        self.file.flush().map_err(AssetError::Io)?;
        let file = self.file.get_ref().try_clone().map_err(AssetError::Io)?;
        if let Some(AsideHasher { tx, thread }) = self.aside.take() {
            drop(tx);
            self.hasher = thread.join().map_err(|_| {
                AssetError::Io(std::io::Error::other("the hashing thread panicked"))
            })?;
        }
        let digests = std::mem::take(&mut self.hasher);
        let blake3 = digests.blake3.finalize();
        let sha256 = match (digests.sha256, self.vouched.take()) {
            (Some(s), _) => hex::encode(s.finalize()),
            (None, Some((sha256, expected))) if expected == blake3 => sha256,
            (None, Some((sha256, expected))) => {
                return Err(AssetError::Mismatch(format!(
                    "the bytes of {sha256} hash to BLAKE3 {blake3}, not {expected}"
                )));
            }
            (None, None) => {
                return Err(AssetError::Mismatch(
                    "an upload with nothing to name it".into(),
                ));
            }
        };
        let mut staged = std::mem::take(&mut self.staged);
        staged.sha256 = sha256;
        staged.blake3 = blake3.to_hex().to_string();
        Ok((staged, file))
    }
}

/// A received assets file, not yet committed to the store. Removed on drop
/// unless [`AssetStore::commit`] took it.
#[derive(Debug, Default)]
pub struct StagedAsset {
    path: PathBuf,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// BLAKE3 of the bytes, hex.
    pub blake3: String,
    /// Size in bytes.
    pub len: u64,
    /// Whether the file is on disk (else its receiver syncs it).
    synced: bool,
}

impl StagedAsset {
    /// Where the bytes are now.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagedAsset {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for AssetUpload {
    fn drop(&mut self) {
        // `finish` took the staged file; otherwise the partial file goes.
        if !self.staged.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.staged.path);
            self.staged.path = PathBuf::new();
        }
    }
}

/// Opens `path` (a committed assets file) mapped read-only.
pub fn map(path: &Path) -> Result<SharedBytes, AssetError> {
    let file = std::fs::File::open(path).map_err(AssetError::Io)?;
    let mapped = crate::sys::map_readonly(&file).map_err(AssetError::Io)?;
    Ok(Arc::new(mapped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    /// A file with a hand-written header and `data` after it.
    fn raw(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn a_valid_file_is_indexed_with_its_ranges() {
        let f = file(&[
            ("w", Dtype::F32, vec![2, 2], vec![0; 16]),
            ("b", Dtype::I64, vec![1], vec![7; 8]),
        ]);
        let index = inspect(&f, &Limits::default()).unwrap();
        assert_eq!(index.names(), ["b", "w"]);
        assert_eq!(index.data_bytes, 24);
        for e in &index.entries {
            assert!(e.range.end <= f.len());
        }
        let b = index.entries.iter().find(|e| e.name == "b").unwrap();
        assert_eq!(&f[b.range.clone()], &[7; 8]);
    }

    #[test]
    fn bad_headers_are_refused_with_the_reason() {
        let limits = Limits::default();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("length past the end", {
                let mut v = 1000u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"{}");
                v
            }),
            ("huge header length", u64::MAX.to_le_bytes().to_vec()),
            (
                "offsets past the end",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    &[0; 8],
                ),
            ),
            (
                "overlapping tensors",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    &[0; 12],
                ),
            ),
            (
                "a gap",
                raw(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
            ),
            (
                "absurd shape",
                raw(
                    r#"{"a":{"dtype":"U8","shape":[4294967295,4294967295,4294967295],"data_offsets":[0,0]}}"#,
                    &[],
                ),
            ),
            (
                "unsupported dtype",
                raw(
                    r#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
            ),
            ("not JSON", raw("{oops", &[])),
        ];
        for (what, bytes) in cases {
            assert!(inspect(&bytes, &limits).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn uploads_are_hashed_committed_once_and_cleaned_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::new(dir.path());
        let mut up = store.upload("t", 10).unwrap();
        up.write(b"hello").unwrap();
        assert!(matches!(
            up.write(b"world!"),
            Err(AssetError::TooLarge { limit: 10 })
        ));
        drop(up);
        let tdir = dir.path().join("assets").join("t");
        assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), 0, "no leftover");

        let staged = store.stage_bytes("t", b"hello").unwrap();
        assert_eq!(
            staged.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let path = store.commit("t", staged).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        // The same bytes again: one file.
        let again = store.stage_bytes("t", b"hello").unwrap();
        assert_eq!(store.commit("t", again).unwrap(), path);
        // The file and its recorded BLAKE3 digest.
        assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), 2);
        let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert!(store.contains("t", sha));
        assert!(!store.contains("u", sha), "per tenant");
        assert_eq!(
            store.blake3("t", sha).unwrap(),
            blake3::hash(b"hello").to_hex().as_str()
        );
        store.retain("t", &[sha]);
        assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), 2, "kept");
        store.retain("t", &[]);
        assert!(!store.contains("t", sha));
        assert_eq!(store.blake3("t", sha), None);
        assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), 0);
    }

    #[test]
    fn vouched_uploads_are_checked_by_their_blake3() {
        let dir = tempfile::tempdir().unwrap();
        let store = AssetStore::new(dir.path());
        let sha = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let good = blake3::hash(b"hello").to_hex();
        for aside in [false, true] {
            let mut up = store.upload_vouched("t", 10, sha, &good).unwrap();
            if aside {
                up.hash_aside().unwrap();
            }
            up.write(b"hello").unwrap();
            let staged = up.finish().unwrap();
            assert_eq!(
                (staged.sha256.as_str(), staged.blake3.as_str()),
                (sha, good.as_str())
            );

            // Other bytes under the same name and digest are refused.
            let mut up = store.upload_vouched("t", 10, sha, &good).unwrap();
            if aside {
                up.hash_aside().unwrap();
            }
            up.write(b"hellO").unwrap();
            assert!(matches!(up.finish(), Err(AssetError::Mismatch(_))));
        }
        // A name or digest that is not one is refused before any byte.
        assert!(store.upload_vouched("t", 10, "../x", &good).is_err());
        assert!(store.upload_vouched("t", 10, sha, "nope").is_err());
        let tdir = dir.path().join("assets").join("t");
        assert_eq!(std::fs::read_dir(&tdir).unwrap().count(), 0, "no leftover");
    }
}
