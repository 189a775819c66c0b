//! One tenant on this executor: its admission gate, its functions, its
//! instance count and its jobs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use tensor_wasm_kernels::Backend;
use tensor_wasm_shared::{FunctionId, TenantId};

use crate::assets::LoadedAssets;
use crate::error::ExecError;
use crate::memory::HostUsage;
use crate::state::{Function, InstanceCount, JobCaps, JobTable};
use crate::sync::{lock, read_lock, write_lock};
use crate::tensors::TenantUsage;

/// Whether a tenant takes work, and how much it has in flight.
#[derive(Debug, Default)]
struct Admission {
    frozen: bool,
    /// Live [`Inflight`] guards.
    inflight: usize,
}

/// One tenant on this executor.
pub struct Tenant {
    pub id: TenantId,
    pub usage: Arc<TenantUsage>,
    /// The tenant's host memory: its instances' linear memory, and its
    /// tensors where they live in host memory.
    pub host: Arc<HostUsage>,
    pub backend: Arc<dyn Backend>,
    functions: RwLock<BTreeMap<FunctionId, Arc<Function>>>,
    instances: Arc<InstanceCount>,
    admission: Mutex<Admission>,
    drained: tokio::sync::Notify,
    /// Woken when the tenant thaws or leaves this executor.
    unfrozen: tokio::sync::Notify,
    /// Set once the tenant is dropped from this executor (migrated away or
    /// purged): its pending jobs stop waiting.
    removed: AtomicBool,
    jobs: Mutex<JobTable>,
    /// Assets files loaded for the tenant's functions, by SHA-256: one load
    /// (and one charge) per file, however many functions carry it. An entry
    /// lives as long as a function holds it.
    assets: Mutex<HashMap<String, Weak<LoadedAssets>>>,
    /// Held by a registration or a delete of the tenant's functions, so
    /// that they happen one at a time.
    pub(crate) registering: Mutex<()>,
    /// Its checkpoints (`crate::durable`), once it has any.
    pub(crate) journal: std::sync::OnceLock<Arc<crate::durable::Journal>>,
    /// Its jobs that may run at once: a job holds one for its run.
    pub(crate) job_permits: Arc<tokio::sync::Semaphore>,
    /// Its invocations and jobs running guest code at once, across its
    /// functions (`TenantQuotas::running_invocations`): one tenant's
    /// busy instances leave the executor's cores to the others.
    pub(crate) running: crate::sync::Gate,
    /// Held by a multipart registration while it receives its parts: a
    /// tenant streams one assets file to disk at a time, so that its
    /// uploads in flight hold at most one file's cap of the disk.
    pub(crate) uploads: Arc<tokio::sync::Semaphore>,
    /// Its recent use of the cores: over its share, its guests run in the
    /// background (`cpu.rs`).
    pub(crate) cpu: Arc<super::cpu::TenantCpu>,
}

/// One admitted unit of work (an invocation or a running job); the tenant
/// counts it until it is dropped.
pub struct Inflight {
    tenant: Arc<Tenant>,
}

impl std::fmt::Debug for Inflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflight")
            .field("tenant", &self.tenant.id)
            .finish()
    }
}

impl Inflight {
    /// One more unit of the same tenant's work, admitted even if the
    /// tenant froze since: this one is still held, so no drain that waits
    /// for it has ended.
    pub fn another(&self) -> Inflight {
        lock(&self.tenant.admission).inflight += 1;
        Inflight {
            tenant: self.tenant.clone(),
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        let mut a = lock(&self.tenant.admission);
        a.inflight -= 1;
        if a.inflight == 0 {
            self.tenant.drained.notify_waiters();
        }
    }
}

impl Tenant {
    /// A tenant with no functions, whose tensors live on `backend` within
    /// `usage`'s quota, and whose finished jobs are kept within `job_caps`.
    pub fn new(
        id: TenantId,
        backend: Arc<dyn Backend>,
        usage: TenantUsage,
        host: Arc<HostUsage>,
        job_caps: JobCaps,
        running: usize,
        cpu: Arc<super::cpu::TenantCpu>,
    ) -> Tenant {
        Tenant {
            id,
            usage: Arc::new(usage),
            host,
            backend,
            functions: RwLock::new(BTreeMap::new()),
            instances: Arc::new(InstanceCount::default()),
            admission: Mutex::new(Admission::default()),
            drained: tokio::sync::Notify::new(),
            unfrozen: tokio::sync::Notify::new(),
            removed: AtomicBool::new(false),
            job_permits: Arc::new(tokio::sync::Semaphore::new(job_caps.running.max(1))),
            running: crate::sync::Gate::new(running),
            uploads: Arc::new(tokio::sync::Semaphore::new(1)),
            cpu,
            jobs: Mutex::new(JobTable::new(job_caps)),
            assets: Mutex::new(HashMap::new()),
            registering: Mutex::new(()),
            journal: std::sync::OnceLock::new(),
        }
    }

    /// Admits one unit of work, unless the tenant is frozen.
    ///
    /// Freezing takes the same lock, so once [`Tenant::freeze`] returns no
    /// new work starts, and [`Tenant::wait_drained`] sees every unit that
    /// did.
    pub fn admit(self: &Arc<Self>) -> Result<Inflight, ExecError> {
        let mut a = lock(&self.admission);
        if a.frozen {
            return Err(ExecError::TenantFrozen(self.id.to_string()));
        }
        a.inflight += 1;
        Ok(Inflight {
            tenant: self.clone(),
        })
    }

    /// Stops admitting work.
    pub fn freeze(&self) {
        lock(&self.admission).frozen = true;
    }

    /// Admits work again.
    pub fn thaw(&self) {
        lock(&self.admission).frozen = false;
        self.unfrozen.notify_waiters();
    }

    /// Waits, up to `deadline`, until the tenant is no longer frozen here:
    /// it thawed, or it left this executor. True if it did.
    pub async fn wait_unfrozen(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            let woken = self.unfrozen.notified();
            if !self.is_frozen() || self.is_removed() {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return !self.is_frozen() || self.is_removed();
            }
        }
    }

    pub fn is_frozen(&self) -> bool {
        lock(&self.admission).frozen
    }

    /// Waits until no admitted work is left, up to `timeout`; true if none
    /// is.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.drained.notified();
            if lock(&self.admission).inflight == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return lock(&self.admission).inflight == 0;
            }
        }
    }

    /// Marks the tenant gone from this executor and forgets its functions
    /// and jobs; a job still running finds its record gone.
    pub fn remove(&self) -> Vec<Arc<Function>> {
        self.removed.store(true, Ordering::Release);
        self.unfrozen.notify_waiters();
        self.jobs().clear();
        std::mem::take(&mut *write_lock(&self.functions))
            .into_values()
            .collect()
    }

    /// True once the tenant has left this executor.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The function registered as `id` now.
    pub fn function(&self, id: &str) -> Option<Arc<Function>> {
        read_lock(&self.functions).get(id).cloned()
    }

    /// The function registered under `name`, if any.
    pub fn function_named(&self, name: &str) -> Option<Arc<Function>> {
        read_lock(&self.functions)
            .values()
            .find(|f| f.info.name == name)
            .cloned()
    }

    /// The tenant's functions, by id.
    pub fn function_list(&self) -> Vec<Arc<Function>> {
        read_lock(&self.functions).values().cloned().collect()
    }

    /// How many functions the tenant has.
    pub fn function_count(&self) -> usize {
        read_lock(&self.functions).len()
    }

    /// Adds `f`, or replaces the function of its id.
    /// Returns the function it replaced, if any.
    pub(crate) fn insert_function(&self, f: Arc<Function>) -> Option<Arc<Function>> {
        write_lock(&self.functions).insert(f.info.id.clone(), f)
    }

    /// Removes the function `id`, returning it; `None` if there was none.
    pub(crate) fn remove_function(&self, id: &str) -> Option<Arc<Function>> {
        write_lock(&self.functions).remove(id)
    }

    /// The count the tenant's pools claim instances from.
    pub(crate) fn instances(&self) -> &Arc<InstanceCount> {
        &self.instances
    }

    /// Warm instances of the tenant, idle or running.
    pub fn instance_count(&self) -> usize {
        self.instances.get()
    }

    /// Synchronous invocations of the tenant waiting for an instance slot.
    pub fn invocations_waiting(&self) -> usize {
        read_lock(&self.functions)
            .values()
            .map(|f| f.pool.waiting())
            .sum()
    }

    /// The loaded assets file of `sha256` if a function holds it, else the
    /// one `load` makes (under the tenant's assets lock, so that two
    /// registrations of one file load it once).
    pub(crate) fn assets_of<E>(
        &self,
        sha256: &str,
        load: impl FnOnce() -> Result<LoadedAssets, E>,
    ) -> Result<Arc<LoadedAssets>, E> {
        let mut cache = lock(&self.assets);
        if let Some(live) = cache.get(sha256).and_then(Weak::upgrade) {
            return Ok(live);
        }
        let loaded = Arc::new(load()?);
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(sha256.to_string(), Arc::downgrade(&loaded));
        Ok(loaded)
    }

    /// The loaded assets file of `sha256`, if a function holds it.
    pub(crate) fn loaded_assets(&self, sha256: &str) -> Option<Arc<LoadedAssets>> {
        lock(&self.assets).get(sha256).and_then(Weak::upgrade)
    }

    /// Device bytes held by the tenant's loaded assets files.
    pub fn asset_bytes(&self) -> u64 {
        lock(&self.assets)
            .values()
            .filter_map(Weak::upgrade)
            .map(|a| a.bytes())
            .sum()
    }

    /// SHA-256 of every assets file the tenant's functions use.
    pub fn asset_files(&self) -> Vec<String> {
        let mut v: Vec<String> = read_lock(&self.functions)
            .values()
            .filter_map(|f| f.assets.sha256().map(str::to_string))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The tenant's job table, locked.
    pub fn jobs(&self) -> MutexGuard<'_, JobTable> {
        lock(&self.jobs)
    }
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
