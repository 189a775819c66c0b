//! The wasmtime engine: configuration, compilation with a size and time
//! limit, the on-disk cache of compiled modules, and the epoch ticker that
//! enforces deadlines.
//!
//! Engine settings and why:
//! - pooling allocator: instance slots are reserved once, so creating a
//!   fresh instance after a trap costs microseconds, and linear memories are
//!   initialized copy-on-write from the module image;
//! - epoch interruption, ticking every [`EPOCH_TICK`]: a guest spinning
//!   without calling an import still traps at its deadline;
//! - memory64, threads, multi-memory, GC and components off: what a
//!   snapshot cannot carry is refused at registration (see `wasm`) and the
//!   engine would refuse it again.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Linker, Module, PoolingAllocationConfig,
};

use crate::config::EngineLimits;
use crate::host::{self, HostState};
use crate::sys;

/// Epoch tick: deadlines are enforced to within this; 10 ms costs one
/// atomic increment per tick and keeps a 10 s deadline within 0.1 %.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// A failure of the engine itself (configuration, linking, cache I/O).
#[derive(Debug, thiserror::Error)]
#[error("wasm engine: {0}")]
pub struct EngineError(pub String);

impl From<wasmtime::Error> for EngineError {
    fn from(e: wasmtime::Error) -> Self {
        EngineError(format!("{e:#}"))
    }
}

impl From<std::io::Error> for EngineError {
    fn from(e: std::io::Error) -> Self {
        EngineError(e.to_string())
    }
}

/// Why a module could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("compilation took longer than {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Rejected(String),
    #[error("{0} compilations are running, the most at once; retry later")]
    Busy(usize),
}

/// The engine, its linker, and its module cache.
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    cache: Option<ModuleCache>,
    limits: EngineLimits,
    stop: Arc<AtomicBool>,
    /// Compiler threads alive, those abandoned at their time limit too.
    compiling: Arc<AtomicUsize>,
    max_compiles: usize,
}

/// Counts one compiler thread until it ends.
struct CompilerThread(Arc<AtomicUsize>);

impl Drop for CompilerThread {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// An engine with `limits`, caching compiled modules under `cache_dir`
    /// when given.
    pub fn new(limits: EngineLimits, cache_dir: Option<&Path>) -> Result<Runtime, EngineError> {
        let mut config = Config::new();
        config
            .epoch_interruption(true)
            .wasm_memory64(false)
            .wasm_multi_memory(false)
            .wasm_gc(false)
            .memory_init_cow(true);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(limits.total_instances)
            .total_memories(limits.total_instances)
            .total_tables(limits.total_instances)
            .max_memories_per_module(1)
            .max_tables_per_module(4)
            .max_memory_size(limits.max_memory_limit as usize)
            .table_elements(limits.max_table_elements);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker)?;
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut HostState| &mut s.wasi)?;

        let cache = cache_dir
            .map(|d| ModuleCache::open(d, &engine, limits.module_cache_bytes))
            .transpose()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (e, s) = (engine.weak(), stop.clone());
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match e.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(Runtime {
            engine,
            linker: Arc::new(linker),
            cache,
            limits,
            stop,
            compiling: Arc::new(AtomicUsize::new(0)),
            max_compiles: std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    /// Epoch ticks that cover `d`.
    pub fn deadline_ticks(d: Duration) -> u64 {
        (d.as_nanos() / EPOCH_TICK.as_nanos()) as u64 + 1
    }

    /// The cache entry `wasm` (inspected and rewritten) compiles to, when
    /// there is a cache.
    pub fn cache_entry(&self, wasm: &[u8]) -> Option<String> {
        self.cache.as_ref().map(|c| c.name(wasm))
    }

    /// Removes the cache entry `name`: its module's last function went.
    pub fn evict(&self, name: &str) {
        if let Some(c) = &self.cache {
            c.remove(name);
        }
    }

    /// Compiles `wasm` (already inspected and rewritten), from the cache
    /// when it holds this module for this engine.
    pub fn compile(&self, wasm: &[u8]) -> Result<Module, CompileError> {
        if let Some(module) = self.cache.as_ref().and_then(|c| c.load(&self.engine, wasm)) {
            return Ok(module);
        }
        // Compilation cannot be interrupted; a module that runs over the
        // limit is abandoned to its thread, and the module size cap bounds
        // what that thread can still cost. Abandoned threads count until
        // they end, so hostile modules cannot pile them up.
        if self.compiling.fetch_add(1, Ordering::AcqRel) >= self.max_compiles {
            self.compiling.fetch_sub(1, Ordering::AcqRel);
            return Err(CompileError::Busy(self.max_compiles));
        }
        let running = CompilerThread(self.compiling.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let (engine, bytes) = (self.engine.clone(), wasm.to_vec());
        std::thread::Builder::new()
            .name("compile".into())
            .spawn(move || {
                let compiled = Module::new(&engine, &bytes);
                // Uncounted before the answer goes: whoever receives it
                // sees this thread's slot free (its work is done).
                drop(running);
                let _ = tx.send(compiled);
            })
            .map_err(|e| CompileError::Rejected(format!("cannot start compiler thread: {e}")))?;
        let module = match rx.recv_timeout(self.limits.compile_timeout) {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(CompileError::Rejected(format!("{e:#}"))),
            Err(_) => return Err(CompileError::Timeout(self.limits.compile_timeout)),
        };
        if let Some(Err(e)) = self.cache.as_ref().map(|c| c.store(wasm, &module)) {
            tracing::warn!(error = %e, "could not write the module cache");
        }
        Ok(module)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type HmacSha256 = Hmac<Sha256>;

/// Compiled modules on disk, keyed by the wasm's SHA-256 and the engine's
/// compatibility hash. Each entry is the serialized module followed by an
/// HMAC-SHA256 of it under a key kept in the cache directory (0600), so the
/// executor only ever deserializes bytes it wrote itself; anything else (a
/// torn write, a stray file, another build) is ignored and recompiled.
///
/// The cache keeps to `max_bytes`: past it, the entries used least
/// recently go (a use sets an entry's modification time, so the order
/// survives a restart, and the cache is brought within its size when it
/// opens). An entry only costs a compilation when it is needed again.
#[derive(Debug)]
pub struct ModuleCache {
    dir: PathBuf,
    key: [u8; 32],
    engine_hash: String,
    max_bytes: u64,
    entries: Mutex<Entries>,
}

/// The entries on disk, by file name: their size and last use.
#[derive(Debug, Default)]
struct Entries {
    files: HashMap<String, (u64, SystemTime)>,
    bytes: u64,
}

impl Entries {
    fn insert(&mut self, name: String, size: u64, used: SystemTime) {
        if let Some((old, _)) = self.files.insert(name, (size, used)) {
            self.bytes -= old;
        }
        self.bytes += size;
    }

    /// Removes the least recently used entries of `dir` until the rest fit
    /// in `max`, sparing `keep`.
    fn evict(&mut self, dir: &Path, max: u64, keep: Option<&str>) {
        while self.bytes > max {
            let Some(oldest) = self
                .files
                .iter()
                .filter(|(name, _)| Some(name.as_str()) != keep)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone())
            else {
                return;
            };
            if let Err(e) = std::fs::remove_file(dir.join(&oldest))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, entry = %oldest, "cannot evict a module cache entry");
                return;
            }
            if let Some((size, _)) = self.files.remove(&oldest) {
                self.bytes -= size;
            }
        }
    }
}

impl ModuleCache {
    fn open(dir: &Path, engine: &Engine, max_bytes: u64) -> std::io::Result<ModuleCache> {
        std::fs::create_dir_all(dir)?;
        let key = tensor_wasm_shared::files::dir_key(dir, true)?;
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let mut entries = Entries::default();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if name.ends_with(".cwasm") {
                entries.insert(
                    name,
                    meta.len(),
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                );
            } else if name.contains(".tmp") {
                // A write cut short by a crash.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        entries.evict(dir, max_bytes, None);
        Ok(ModuleCache {
            dir: dir.to_path_buf(),
            key,
            engine_hash: format!("{:016x}", h.finish()),
            max_bytes,
            entries: Mutex::new(entries),
        })
    }

    /// Bytes of the entries on disk.
    pub fn bytes(&self) -> u64 {
        crate::sync::lock(&self.entries).bytes
    }

    /// Removes the entry `name`, if there is one.
    fn remove(&self, name: &str) {
        let mut entries = crate::sync::lock(&self.entries);
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(error = %e, entry = %name, "cannot remove a module cache entry");
                return;
            }
        }
        if let Some((size, _)) = entries.files.remove(name) {
            entries.bytes -= size;
        }
    }

    fn name(&self, wasm: &[u8]) -> String {
        let digest = hex::encode(Sha256::digest(wasm));
        format!("{digest}-{}.cwasm", self.engine_hash)
    }

    fn mac(&self, bytes: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(bytes);
        mac
    }

    fn load(&self, engine: &Engine, wasm: &[u8]) -> Option<Module> {
        let name = self.name(wasm);
        let path = self.dir.join(&name);
        let data = std::fs::read(&path).ok()?;
        let (body, tag) = data.split_at_checked(data.len().checked_sub(32)?)?;
        self.mac(body).verify_slice(tag).ok()?;
        match sys::deserialize_module(engine, sys::Authenticated(body)) {
            Ok(m) => {
                // A use: the entry is now the most recent.
                let now = SystemTime::now();
                let _ = std::fs::File::options()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_modified(now));
                crate::sync::lock(&self.entries).insert(name, data.len() as u64, now);
                Some(m)
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a module cache entry");
                None
            }
        }
    }

    fn store(&self, wasm: &[u8], module: &Module) -> Result<(), EngineError> {
        let mut bytes = module.serialize()?;
        let tag = self.mac(&bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag);
        if bytes.len() as u64 > self.max_bytes {
            return Ok(()); // it would evict everything, itself included
        }
        let name = self.name(wasm);
        let path = self.dir.join(&name);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path)?;
        let mut entries = crate::sync::lock(&self.entries);
        entries.insert(name.clone(), bytes.len() as u64, SystemTime::now());
        entries.evict(&self.dir, self.max_bytes, Some(&name));
        Ok(())
    }
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAT: &str = r#"(module (memory (export "memory") 1)
        (func (export "handle") (result i32) (i32.const 0)))"#;

    fn limits() -> EngineLimits {
        EngineLimits {
            total_instances: 2,
            ..EngineLimits::default()
        }
    }

    #[test]
    fn the_cache_serves_what_it_wrote_and_ignores_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let wasm = wat::parse_str(WAT).unwrap();
        let rt = Runtime::new(limits(), Some(dir.path())).unwrap();
        rt.compile(&wasm).unwrap();
        let cache = rt.cache.as_ref().unwrap();
        let entry = cache.dir.join(cache.name(&wasm));
        assert!(entry.exists(), "compiling wrote an entry");
        assert!(
            cache.load(rt.engine(), &wasm).is_some(),
            "and the entry loads"
        );

        // A tampered entry is not loaded (compilation runs again instead).
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&entry, &bytes).unwrap();
        assert!(cache.load(rt.engine(), &wasm).is_none());
        rt.compile(&wasm).unwrap();
        assert!(
            cache.load(rt.engine(), &wasm).is_some(),
            "recompiling rewrote it"
        );

        // Bytes another process wrote without our key are not loaded either.
        let other = tempfile::tempdir().unwrap();
        let rt2 = Runtime::new(limits(), Some(other.path())).unwrap();
        let cache2 = rt2.cache.as_ref().unwrap();
        let foreign = cache2.dir.join(cache2.name(&wasm));
        std::fs::copy(&entry, &foreign).unwrap();
        assert!(
            rt2.cache
                .as_ref()
                .unwrap()
                .load(rt2.engine(), &wasm)
                .is_none()
        );
    }

    #[test]
    fn compiler_threads_are_bounded_and_counted_until_they_end() {
        let rt = Runtime::new(limits(), None).unwrap();
        let wasm = wat::parse_str(WAT).unwrap();
        rt.compile(&wasm).unwrap();
        assert_eq!(rt.compiling.load(Ordering::Acquire), 0, "the thread ended");
        // Threads left running at their time limit still count.
        let held: Vec<CompilerThread> = (0..rt.max_compiles)
            .map(|_| {
                rt.compiling.fetch_add(1, Ordering::AcqRel);
                CompilerThread(rt.compiling.clone())
            })
            .collect();
        assert!(matches!(rt.compile(&wasm), Err(CompileError::Busy(_))));
        drop(held);
        rt.compile(&wasm).unwrap();
    }

    /// A module of its own: `n` makes its code differ.
    fn module(n: u32) -> Vec<u8> {
        wat::parse_str(format!(
            r#"(module (memory (export "memory") 1)
                (func (export "handle") (result i32) (i32.const {n})))"#
        ))
        .unwrap()
    }

    fn cached(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cwasm"))
            .collect();
        names.sort();
        names
    }

    /// The cache keeps to its size: past it the least recently used entry
    /// goes, a use renews an entry, and the order holds across a restart
    /// (which brings a cache within a smaller size).
    #[test]
    fn the_cache_keeps_to_its_size_evicting_the_least_recently_used() {
        let (a, b, c) = (module(1), module(2), module(3));
        let probe = tempfile::tempdir().unwrap();
        let size = {
            let rt = Runtime::new(limits(), Some(probe.path())).unwrap();
            rt.compile(&a).unwrap();
            rt.cache.as_ref().unwrap().bytes()
        };
        assert!(size > 0);
        let dir = tempfile::tempdir().unwrap();
        let two = EngineLimits {
            module_cache_bytes: 2 * size + size / 2,
            ..limits()
        };
        let rt = Runtime::new(two, Some(dir.path())).unwrap();
        let cache = rt.cache.as_ref().unwrap();
        rt.compile(&a).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        rt.compile(&b).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        rt.compile(&a).unwrap(); // a use of `a`: `b` is now the oldest
        std::thread::sleep(Duration::from_millis(20));
        rt.compile(&c).unwrap();
        assert_eq!(
            cached(dir.path()),
            {
                let mut v = vec![cache.name(&a), cache.name(&c)];
                v.sort();
                v
            },
            "`b`, used least recently, went"
        );
        assert!(cache.bytes() <= 2 * size + size / 2);
        drop(rt);

        // Opened again with room for one: the most recent stays.
        let one = EngineLimits {
            module_cache_bytes: size + size / 2,
            ..limits()
        };
        let rt = Runtime::new(one, Some(dir.path())).unwrap();
        assert_eq!(cached(dir.path()), [rt.cache.as_ref().unwrap().name(&c)]);
    }
}
