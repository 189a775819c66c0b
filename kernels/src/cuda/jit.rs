//! The kernel JIT and its on-disk cache.
//!
//! `kernels.cu` is compiled by NVRTC into a CUBIN for the exact GPU
//! architecture (`sm_XY`) at most once per process and architecture, and the
//! CUBIN is kept on disk so that later processes skip both NVRTC (≈5 s for
//! this source) and the driver's PTX JIT (≈3 s).
//!
//! Cache protocol:
//! 1. The key is the SHA-256 of the source, the architecture, the NVRTC
//!    options and NVRTC's version; the file is `<dir>/<key>-<arch>.cubin`.
//!    A changed source or compiler never reads a stale entry.
//! 2. An entry is a header line `tensor-wasm-cubin v2 <HMAC of body>\n`
//!    followed by the CUBIN. The HMAC-SHA256 is under a key of the cache
//!    directory's own (`cache.key`, 32 random bytes, 0600, made by the
//!    first writer), so a reader accepts only entries written by a process
//!    that holds the key: a truncated, corrupt, foreign or planted file is
//!    treated as a miss (and replaced), never handed to the driver, which
//!    would run it as GPU code.
//! 3. Writers write a unique temporary file in the same directory and
//!    rename it over the entry, so a reader sees either no file or a whole
//!    one, even with several processes starting at once.
//! 4. Any cache I/O failure only costs a compile: the cache is an
//!    optimization, never a reason for the backend to be unavailable.
//!
//! The directory is `$TENSOR_WASM_KERNEL_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/tensor-wasm/kernels`, else
//! `~/.cache/tensor-wasm/kernels`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tensor_wasm_shared::files::dir_key;
use tensor_wasm_shared::names::env::KERNEL_CACHE_DIR;

use crate::sys::cuda::{NvrtcOutput, nvrtc_compile, nvrtc_version};

/// The CUDA C++ source of every kernel of the backend.
pub(crate) const KERNEL_SOURCE: &str = include_str!("kernels.cu");

/// Program name NVRTC reports in diagnostics.
const PROGRAM_NAME: &str = "tensor-wasm-kernels.cu";

/// First bytes of a cache entry's header line; bump the version when the
/// entry layout changes.
const CACHE_MAGIC: &str = "tensor-wasm-cubin v2";

/// NVRTC options besides the architecture. Precise division and square
/// root and no flush-to-zero (NVRTC's defaults, spelled out because the
/// parity tests against the CPU reference depend on them).
fn base_options() -> Vec<String> {
    vec![
        "--std=c++17".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--ftz=false".into(),
    ]
}

/// The NVRTC options for `arch` (`sm_90`).
pub(crate) fn compile_options(arch: &str) -> Vec<String> {
    let mut o = base_options();
    o.push(format!("--gpu-architecture={arch}"));
    o
}

/// The cache key: hex SHA-256 over the source, architecture, options and
/// compiler version, each length-prefixed so that no two inputs collide by
/// concatenation.
pub(crate) fn cache_key(source: &str, arch: &str, options: &[String], compiler: &str) -> String {
    let mut h = Sha256::new();
    for part in [source, arch, compiler]
        .into_iter()
        .chain(options.iter().map(String::as_str))
    {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// The cache directory, from an environment lookup (injected for tests).
/// Empty variables count as unset.
pub(crate) fn cache_dir_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(d) = var(KERNEL_CACHE_DIR) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = var("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("tensor-wasm").join("kernels"));
    }
    var("HOME").map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("tensor-wasm")
            .join("kernels")
    })
}

/// The cache directory of this process's environment.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var_os(k))
}

/// The entry file for `key` and `arch` in `dir`.
pub(crate) fn cache_path(dir: &Path, key: &str, arch: &str) -> PathBuf {
    dir.join(format!("{key}-{arch}.cubin"))
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8; 32], body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    mac
}

/// Serializes an entry: header line with the body's HMAC under `key`,
/// then the body.
fn encode_entry(key: &[u8; 32], body: &[u8]) -> Vec<u8> {
    let tag = hex::encode(mac(key, body).finalize().into_bytes());
    let mut out = Vec::with_capacity(body.len() + 100);
    out.extend_from_slice(format!("{CACHE_MAGIC} {tag}\n").as_bytes());
    out.extend_from_slice(body);
    out
}

/// Parses an entry; `None` unless the header is ours and the HMAC under
/// `key` matches.
fn decode_entry<'a>(key: &[u8; 32], bytes: &'a [u8]) -> Option<&'a [u8]> {
    let nl = bytes.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&bytes[..nl]).ok()?;
    let tag = hex::decode(header.strip_prefix(CACHE_MAGIC)?.strip_prefix(' ')?).ok()?;
    let body = &bytes[nl + 1..];
    // `verify_slice` compares in constant time.
    (!body.is_empty() && mac(key, body).verify_slice(&tag).is_ok()).then_some(body)
}

/// Reads a verified entry; any failure is a miss.
pub(crate) fn read_entry(path: &Path) -> Option<Vec<u8>> {
    let key = dir_key(path.parent()?, false).ok()?;
    let bytes = std::fs::read(path).ok()?;
    match decode_entry(&key, &bytes) {
        Some(body) => Some(body.to_vec()),
        None => {
            tracing::warn!(path = %path.display(), "ignoring a corrupt kernel cache entry");
            None
        }
    }
}

/// Writes an entry atomically: a unique temporary file in the same
/// directory, then a rename over `path`.
pub(crate) fn write_entry(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::other("cache path has no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let key = dir_key(dir, true)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&encode_entry(&key, body))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Where a module's CUBIN came from (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Already compiled by this process.
    Memory,
    /// Read from the disk cache.
    Disk,
    /// Compiled by NVRTC now.
    Compiled,
}

/// Returns the entry at `path` if valid, else runs `compile` and stores its
/// result there (best effort).
pub(crate) fn load_or_compile(
    path: Option<&Path>,
    compile: impl FnOnce() -> Result<Vec<u8>, String>,
) -> Result<(Vec<u8>, Origin), String> {
    if let Some(p) = path
        && let Some(body) = read_entry(p)
    {
        return Ok((body, Origin::Disk));
    }
    let body = compile()?;
    if let Some(p) = path
        && let Err(e) = write_entry(p, &body)
    {
        tracing::warn!(path = %p.display(), error = %e, "cannot write the kernel cache");
    }
    Ok((body, Origin::Compiled))
}

/// The CUBIN of [`KERNEL_SOURCE`] for `arch`, compiled at most once per
/// process and architecture, through the disk cache.
pub(crate) fn module_for_arch(arch: &str) -> Result<(Arc<Vec<u8>>, Origin), String> {
    static MODULES: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    // Holding the lock through the compile makes concurrent first users of
    // one architecture wait for a single compile instead of racing.
    let mut map = modules
        .lock()
        .map_err(|_| "kernel module cache lock poisoned".to_string())?;
    if let Some(m) = map.get(arch) {
        return Ok((m.clone(), Origin::Memory));
    }
    let options = compile_options(arch);
    let (major, minor) = nvrtc_version()?;
    let key = cache_key(
        KERNEL_SOURCE,
        arch,
        &options,
        &format!("nvrtc {major}.{minor}"),
    );
    let path = cache_dir().map(|d| cache_path(&d, &key, arch));
    let started = std::time::Instant::now();
    let (cubin, origin) = load_or_compile(path.as_deref(), || {
        nvrtc_compile(KERNEL_SOURCE, PROGRAM_NAME, &options, NvrtcOutput::Cubin)
    })?;
    tracing::info!(
        arch,
        ?origin,
        bytes = cubin.len(),
        ms = started.elapsed().as_millis() as u64,
        "CUDA kernels ready"
    );
    let cubin = Arc::new(cubin);
    map.insert(arch.to_string(), cubin.clone());
    Ok((cubin, origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "tensor-wasm-jit-{tag}-{}-{nanos}",
            std::process::id()
        ))
    }

    #[test]
    fn key_depends_on_every_input() {
        let o = compile_options("sm_90");
        let k = cache_key("src", "sm_90", &o, "nvrtc 13.0");
        assert_eq!(k.len(), 64);
        assert_eq!(k, cache_key("src", "sm_90", &o, "nvrtc 13.0"));
        assert_ne!(k, cache_key("src ", "sm_90", &o, "nvrtc 13.0"));
        assert_ne!(k, cache_key("src", "sm_80", &o, "nvrtc 13.0"));
        assert_ne!(k, cache_key("src", "sm_90", &o, "nvrtc 13.1"));
        assert_ne!(k, cache_key("src", "sm_90", &o[1..], "nvrtc 13.0"));
        // Length prefixes: moving a byte between parts changes the key.
        assert_ne!(
            cache_key("ab", "c", &[], "v"),
            cache_key("a", "bc", &[], "v")
        );
    }

    #[test]
    fn cache_dir_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            cache_dir_from(env(&[
                (KERNEL_CACHE_DIR, "/x"),
                ("XDG_CACHE_HOME", "/y"),
                ("HOME", "/h")
            ])),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(
            cache_dir_from(env(&[
                (KERNEL_CACHE_DIR, ""),
                ("XDG_CACHE_HOME", "/y"),
                ("HOME", "/h")
            ])),
            Some(PathBuf::from("/y/tensor-wasm/kernels"))
        );
        assert_eq!(
            cache_dir_from(env(&[("HOME", "/h")])),
            Some(PathBuf::from("/h/.cache/tensor-wasm/kernels"))
        );
        assert_eq!(cache_dir_from(env(&[])), None);
        assert_eq!(
            cache_path(Path::new("/c"), "ab12", "sm_90"),
            PathBuf::from("/c/ab12-sm_90.cubin")
        );
    }

    #[test]
    fn cache_round_trip_and_corruption_fall_back_to_compiling() {
        let dir = temp_dir("roundtrip");
        let path = cache_path(&dir.join("nested"), "k", "sm_90");
        let body = b"\x7fELF pretend cubin \0 with NUL".to_vec();

        // Miss: compiles and stores.
        let (got, origin) = load_or_compile(Some(&path), || Ok(body.clone())).unwrap();
        assert_eq!(
            (got.as_slice(), origin),
            (body.as_slice(), Origin::Compiled)
        );
        // Hit: the compiler is not called.
        let (got, origin) =
            load_or_compile(Some(&path), || Err("must not compile".into())).unwrap();
        assert_eq!((got.as_slice(), origin), (body.as_slice(), Origin::Disk));

        // A truncated entry is a miss and is replaced.
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        assert_eq!(read_entry(&path), None);
        let (_, origin) = load_or_compile(Some(&path), || Ok(body.clone())).unwrap();
        assert_eq!(origin, Origin::Compiled);
        assert_eq!(read_entry(&path).as_deref(), Some(body.as_slice()));

        // A flipped byte, a foreign header and an empty file are misses.
        let mut flipped = std::fs::read(&path).unwrap();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(read_entry(&path), None);
        std::fs::write(&path, b"something else\nbody").unwrap();
        assert_eq!(read_entry(&path), None);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(read_entry(&path), None);

        // No temporary files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An entry the directory's key did not sign (planted by another
    /// user, or of the format that only carried a digest) is a miss, never
    /// handed to the driver; the key is the owner's only.
    #[test]
    fn an_entry_without_the_directorys_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("planted");
        let path = cache_path(&dir, "k", "sm_90");
        let body = b"\x7fELF genuine".to_vec();
        load_or_compile(Some(&path), || Ok(body.clone())).unwrap();
        let key = dir.join(tensor_wasm_shared::files::KEY_FILE);
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A well-formed entry whose header carries the body's digest.
        let planted = b"\x7fELF planted".to_vec();
        let mut bytes =
            format!("{CACHE_MAGIC} {}\n", hex::encode(Sha256::digest(&planted))).into_bytes();
        bytes.extend_from_slice(&planted);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_entry(&path), None);
        // Signed under another key.
        std::fs::write(&path, encode_entry(&[7; 32], &planted)).unwrap();
        assert_eq!(read_entry(&path), None);
        let (got, origin) = load_or_compile(Some(&path), || Ok(body.clone())).unwrap();
        assert_eq!((got, origin), (body.clone(), Origin::Compiled));
        // Without its key, the directory's entries are all misses.
        std::fs::remove_file(&key).unwrap();
        assert_eq!(read_entry(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_cache_only_costs_a_compile() {
        let dir = temp_dir("unwritable");
        std::fs::write(&dir, b"a file where the directory should be").unwrap();
        let path = cache_path(&dir, "k", "sm_90");
        let (got, origin) = load_or_compile(Some(&path), || Ok(vec![1, 2, 3])).unwrap();
        assert_eq!((got, origin), (vec![1, 2, 3], Origin::Compiled));
        let e = load_or_compile(Some(&path), || Err("nvrtc failed".into())).unwrap_err();
        assert_eq!(e, "nvrtc failed");
        std::fs::remove_file(&dir).unwrap();
    }
}
