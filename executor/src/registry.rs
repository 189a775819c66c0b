//! Tenants, their functions, and each function's warm instances.
//!
//! A function is registered once (inspected, rewritten, compiled, its assets
//! uploaded), persisted under the state directory, and from then on invoked
//! through a pool of at most `max_instances` warm instances. Invocations
//! beyond that wait in a bounded queue; past the queue they get
//! `capacity_exhausted` at once rather than piling up.
//!
//! Persistence: `<state>/functions/<tenant>/<id>/` holds `function.json`,
//! `module.wasm` (the original bytes) and, if any, `assets.safetensors`. A
//! function directory is written beside its final name and renamed into
//! place, so a crash leaves either the old function or the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tensor_wasm_kernels::Backend;
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::api::{FunctionConfig, FunctionInfo, JobStatus};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::InstancePre;

use crate::assets::Assets;
use crate::config::{EngineLimits, TenantQuotas};
use crate::engine::Runtime;
use crate::error::ExecError;
use crate::host::HostState;
use crate::instance::{InstanceSetup, Request, Response, WarmInstance};
use crate::jobs::JobRecord;
use crate::logs::FunctionLog;
use crate::metrics::Metrics;
use crate::sync::{lock, now_rfc3339, random_id, read_lock, write_lock};
use crate::tensors::TenantUsage;
use crate::wasm;

/// Makes the backend a tenant's tensors live on (one per tenant, so that on
/// a GPU each tenant has its own stream).
pub type BackendFactory = Arc<dyn Fn() -> Result<Arc<dyn Backend>, String> + Send + Sync>;

/// What registration is asked to do.
#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub wasm: Vec<u8>,
    pub assets: Option<Vec<u8>>,
    pub config: FunctionConfig,
    pub replace: bool,
}

/// A registered function.
pub struct Function {
    pub info: FunctionInfo,
    pub(crate) wasm: Arc<[u8]>,
    pub(crate) assets_file: Option<Arc<[u8]>>,
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) setup: InstanceSetup,
    pub(crate) deadline: Duration,
    /// Indices of the module's mutable globals, exported by the rewrite.
    pub(crate) mutable_globals: Vec<u32>,
    /// Held for the device memory it gives back when the function goes.
    #[allow(dead_code)]
    assets: Assets,
    pub(crate) pool: Pool,
    pub log: FunctionLog,
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Pool {
    pub(crate) idle: Mutex<Vec<PooledInstance>>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// A warm instance that gives its slot back to the counters when dropped.
pub(crate) struct PooledInstance {
    pub(crate) inst: WarmInstance,
    counters: Arc<Counters>,
    tenant_instances: Arc<AtomicUsize>,
}

impl Drop for PooledInstance {
    fn drop(&mut self) {
        self.counters
            .active_instances
            .fetch_sub(1, Ordering::Relaxed);
        self.tenant_instances.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Executor-wide counters read by `/internal/info` and `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub active_instances: AtomicU64,
    pub jobs_in_flight: AtomicU64,
}

/// One tenant on this executor.
pub struct Tenant {
    pub id: TenantId,
    functions: RwLock<BTreeMap<String, Arc<Function>>>,
    pub usage: Arc<TenantUsage>,
    pub backend: Arc<dyn Backend>,
    instances: Arc<AtomicUsize>,
    admission: Mutex<Admission>,
    drained: tokio::sync::Notify,
    /// Set once the tenant is dropped from this executor (migrated away or
    /// purged): its pending jobs stop waiting.
    pub removed: AtomicBool,
    pub(crate) jobs: Mutex<BTreeMap<String, JobRecord>>,
}

/// Whether a tenant takes work, and how much it has in flight.
#[derive(Debug, Default)]
struct Admission {
    frozen: bool,
    inflight: usize,
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
    /// The function registered as `id` now.
    pub(crate) fn function(&self, id: &str) -> Option<Arc<Function>> {
        read_lock(&self.functions).get(id).cloned()
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

    /// The tenant's functions.
    pub fn function_list(&self) -> Vec<Arc<Function>> {
        read_lock(&self.functions).values().cloned().collect()
    }
}

impl std::fmt::Debug for Tenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tenant")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Every tenant of this executor.
pub struct Registry {
    runtime: Runtime,
    backends: BackendFactory,
    tenants: RwLock<BTreeMap<TenantId, Arc<Tenant>>>,
    state_dir: Option<PathBuf>,
    pub limits: EngineLimits,
    pub quotas: TenantQuotas,
    pub counters: Arc<Counters>,
    pub metrics: Arc<Metrics>,
    /// Slots for running async jobs (`job_concurrency`).
    pub(crate) job_slots: Arc<Semaphore>,
    /// `TENSOR_WASM_SNAPSHOT_KEY`: signs exports, and imports must carry a
    /// valid signature when set.
    snapshot_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

fn new_function_id() -> String {
    random_id("fn")
}

impl Registry {
    /// A registry persisting under `state_dir` (if any), creating each
    /// tenant's backend with `backends`.
    pub fn new(
        runtime: Runtime,
        backends: BackendFactory,
        state_dir: Option<PathBuf>,
        quotas: TenantQuotas,
        metrics: Arc<Metrics>,
    ) -> Registry {
        let runtime_job_slots = runtime.limits().job_concurrency.max(1);
        Registry {
            limits: runtime.limits().clone(),
            runtime,
            backends,
            tenants: RwLock::new(BTreeMap::new()),
            state_dir,
            quotas,
            counters: Arc::new(Counters::default()),
            job_slots: Arc::new(Semaphore::new(runtime_job_slots)),
            snapshot_key: None,
            metrics,
        }
    }

    /// Signs and checks snapshots with `key`.
    pub fn with_snapshot_key(mut self, key: Option<Vec<u8>>) -> Registry {
        self.snapshot_key = key.filter(|k| !k.is_empty());
        self
    }

    /// The tenant, created on first use.
    pub fn tenant(&self, id: &TenantId) -> Result<Arc<Tenant>, ExecError> {
        if let Some(t) = read_lock(&self.tenants).get(id) {
            return Ok(t.clone());
        }
        let mut tenants = write_lock(&self.tenants);
        if let Some(t) = tenants.get(id) {
            return Ok(t.clone());
        }
        let backend = (self.backends)().map_err(ExecError::Internal)?;
        let t = Arc::new(Tenant {
            id: id.clone(),
            functions: RwLock::new(BTreeMap::new()),
            usage: Arc::new(TenantUsage::new(
                self.quotas.device_memory_bytes,
                self.quotas.live_tensors,
            )),
            backend,
            instances: Arc::new(AtomicUsize::new(0)),
            admission: Mutex::new(Admission::default()),
            drained: tokio::sync::Notify::new(),
            removed: AtomicBool::new(false),
            jobs: Mutex::new(BTreeMap::new()),
        });
        tenants.insert(id.clone(), t.clone());
        Ok(t)
    }

    /// The engine registrations compile with.
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The tenant if it exists here.
    pub fn existing_tenant(&self, id: &TenantId) -> Option<Arc<Tenant>> {
        read_lock(&self.tenants).get(id).cloned()
    }

    /// Wraps a restored instance for a function's pool, counting it.
    pub(crate) fn pooled(&self, t: &Tenant, inst: WarmInstance) -> PooledInstance {
        self.counters
            .active_instances
            .fetch_add(1, Ordering::Relaxed);
        t.instances.fetch_add(1, Ordering::AcqRel);
        PooledInstance {
            inst,
            counters: self.counters.clone(),
            tenant_instances: t.instances.clone(),
        }
    }

    /// Forgets a tenant: its functions (and their files), instances, jobs.
    /// Its pending jobs stop waiting.
    pub fn drop_tenant(&self, id: &TenantId) -> Result<(), ExecError> {
        let t = write_lock(&self.tenants)
            .remove(id)
            .ok_or_else(|| ExecError::TenantNotHere(id.to_string()))?;
        t.removed.store(true, Ordering::Release);
        // Its jobs go now: a job still running finds its record gone and
        // counts nothing twice.
        let unfinished = {
            let mut jobs = lock(&t.jobs);
            let n = jobs
                .values()
                .filter(|j| !j.info.status.is_finished())
                .count();
            jobs.clear();
            n as u64
        };
        self.counters
            .jobs_in_flight
            .fetch_sub(unfinished, Ordering::Relaxed);
        write_lock(&t.functions).clear();
        if let Some(dir) = self
            .state_dir
            .as_ref()
            .map(|d| d.join("functions").join(id.as_str()))
        {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    /// The state directory, if this registry persists.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// The key snapshots are signed and checked with, if any.
    pub fn snapshot_key(&self) -> Option<&[u8]> {
        self.snapshot_key.as_deref()
    }

    /// Every tenant object.
    pub fn tenant_list(&self) -> Vec<Arc<Tenant>> {
        read_lock(&self.tenants).values().cloned().collect()
    }

    /// Ids of the tenants that have functions here.
    pub fn tenant_ids(&self) -> Vec<TenantId> {
        read_lock(&self.tenants)
            .values()
            .filter(|t| !read_lock(&t.functions).is_empty())
            .map(|t| t.id.clone())
            .collect()
    }

    /// Device bytes held by all tenants.
    pub fn device_bytes(&self) -> u64 {
        read_lock(&self.tenants)
            .values()
            .map(|t| t.usage.bytes())
            .sum()
    }

    fn resolve_config(&self, c: &FunctionConfig) -> FunctionConfig {
        let l = &self.limits;
        FunctionConfig {
            deadline_ms: Some(
                c.deadline_ms
                    .unwrap_or(l.default_deadline.as_millis() as u64)
                    .clamp(1, l.max_deadline.as_millis() as u64),
            ),
            memory_limit_bytes: Some(
                c.memory_limit_bytes
                    .unwrap_or(l.default_memory_limit)
                    .min(l.max_memory_limit),
            ),
            max_instances: Some(
                c.max_instances
                    .unwrap_or(l.default_max_instances)
                    .clamp(1, l.max_instances_per_function),
            ),
        }
    }

    /// Registers (or replaces) a function. Compiles on the calling thread:
    /// call it from a blocking context.
    pub fn register(
        &self,
        tenant: &TenantId,
        reg: Registration,
    ) -> Result<FunctionInfo, ExecError> {
        self.register_inner(tenant, reg, None, true)
    }

    pub(crate) fn register_inner(
        &self,
        tenant_id: &TenantId,
        reg: Registration,
        restored: Option<FunctionInfo>,
        persist: bool,
    ) -> Result<FunctionInfo, ExecError> {
        if reg.name.is_empty() || reg.name.len() > 128 || reg.name.chars().any(char::is_control) {
            return Err(ExecError::InvalidInput(
                "function names are 1 to 128 printable characters".into(),
            ));
        }
        let tenant = self.tenant(tenant_id)?;
        if restored.is_none() && tenant.is_frozen() {
            return Err(ExecError::TenantFrozen(tenant_id.to_string()));
        }
        let existing = read_lock(&tenant.functions)
            .values()
            .find(|f| f.info.name == reg.name)
            .cloned();
        if existing.is_some() && !reg.replace && restored.is_none() {
            return Err(ExecError::FunctionExists(reg.name));
        }
        if existing.is_none()
            && restored.is_none()
            && read_lock(&tenant.functions).len() >= self.quotas.functions
        {
            return Err(ExecError::Quota(format!(
                "the tenant already has {} functions, the most allowed",
                self.quotas.functions
            )));
        }
        if reg.config.deadline_ms == Some(0) || reg.config.max_instances == Some(0) {
            return Err(ExecError::InvalidInput(
                "config: deadline_ms and max_instances are at least 1".into(),
            ));
        }
        let inspected = wasm::inspect(&reg.wasm, self.limits.max_module_bytes)?;
        let module = self
            .runtime
            .compile(&inspected.rewritten)
            .map_err(ExecError::from)?;
        let pre = self
            .runtime
            .linker()
            .instantiate_pre(&module)
            .map_err(|e| ExecError::Wasm(wasm::WasmError::Invalid(format!("{e:#}"))))?;
        let assets = match &reg.assets {
            Some(file) => Assets::load(file, tenant.backend.as_ref(), tenant.usage.clone())?,
            None => Assets::none(tenant.usage.clone()),
        };
        let config = self.resolve_config(&reg.config);
        // A module whose memory starts over the limit could never run.
        let initial_memory = module
            .get_export("memory")
            .and_then(|e| e.memory().map(|m| m.minimum().saturating_mul(65_536)));
        if let (Some(initial), Some(limit)) = (initial_memory, config.memory_limit_bytes)
            && initial > limit
            && restored.is_none()
        {
            return Err(ExecError::InvalidInput(format!(
                "the module's memory starts at {initial} bytes, over the function's memory \
                 limit of {limit} bytes (config memory_limit_bytes, at most {})",
                self.limits.max_memory_limit
            )));
        }
        let info = match restored {
            Some(mut info) => {
                info.config = config.clone();
                info
            }
            None => FunctionInfo {
                id: existing
                    .as_ref()
                    .map_or_else(new_function_id, |f| f.info.id.clone()),
                name: reg.name.clone(),
                sha256: hex::encode(Sha256::digest(&reg.wasm)),
                exports: inspected.exports.clone(),
                created_at: now_rfc3339(),
                config: config.clone(),
                assets: assets.names(),
            },
        };
        let log = existing.as_ref().map_or_else(
            || FunctionLog::new(self.limits.log_capacity),
            |f| f.log.clone(),
        );
        let max_instances = config.max_instances.unwrap_or(1) as usize;
        let function = Arc::new(Function {
            setup: InstanceSetup {
                backend: tenant.backend.clone(),
                assets: assets.tensors.clone(),
                usage: tenant.usage.clone(),
                log: log.clone(),
                metrics: self.metrics.clone(),
                memory_limit: config
                    .memory_limit_bytes
                    .unwrap_or(self.limits.default_memory_limit),
                max_output_bytes: self.limits.max_output_bytes,
                max_error_message: self.limits.max_error_message,
                max_table_elements: self.limits.max_table_elements,
            },
            deadline: Duration::from_millis(config.deadline_ms.unwrap_or(10_000)),
            info: info.clone(),
            mutable_globals: inspected.mutable_globals.clone(),
            wasm: Arc::from(reg.wasm),
            assets_file: reg.assets.map(Arc::from),
            pre,
            assets,
            pool: Pool {
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(max_instances)),
                waiting: AtomicUsize::new(0),
                max_waiting: self.limits.max_queued_per_function,
            },
            log,
        });
        if persist {
            self.persist(tenant_id, &function)
                .map_err(|e| ExecError::Internal(format!("cannot persist the function: {e}")))?;
        }
        write_lock(&tenant.functions).insert(info.id.clone(), function);
        Ok(info)
    }

    /// A function of a tenant. Another tenant's id is "not found".
    pub fn function(&self, tenant: &TenantId, id: &str) -> Result<Arc<Function>, ExecError> {
        self.existing_tenant(tenant)
            .and_then(|t| read_lock(&t.functions).get(id).cloned())
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))
    }

    /// The tenant's functions, by id.
    pub fn functions(&self, tenant: &TenantId) -> Vec<FunctionInfo> {
        self.existing_tenant(tenant)
            .map(|t| {
                read_lock(&t.functions)
                    .values()
                    .map(|f| f.info.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes a function, its instances, assets and files.
    pub fn delete(&self, tenant: &TenantId, id: &str) -> Result<(), ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        if t.is_frozen() {
            return Err(ExecError::TenantFrozen(tenant.to_string()));
        }
        write_lock(&t.functions)
            .remove(id)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        if let Some(dir) = self.function_dir(tenant, id) {
            let _ = std::fs::remove_dir_all(dir);
        }
        // Its waiting jobs fail now rather than when an instance frees.
        let waiting: Vec<String> = lock(&t.jobs)
            .iter()
            .filter(|(_, j)| j.info.function_id == id && j.info.status == JobStatus::Pending)
            .map(|(job_id, _)| job_id.clone())
            .collect();
        for job_id in waiting {
            self.finish_job(
                &t,
                &job_id,
                Err(ExecError::FunctionNotFound(id.to_string())),
            );
        }
        Ok(())
    }

    /// Runs one invocation on a warm instance (waiting in the function's
    /// bounded queue if all are busy).
    pub async fn invoke(
        &self,
        tenant: &TenantId,
        id: &str,
        request: Request,
    ) -> Result<Response, ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        let admitted = t.admit()?;
        let f = t
            .function(id)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        let permit = self.acquire(&f, true).await?;
        self.run(&t, f, permit, request, admitted).await
    }

    /// Runs an admitted invocation of `f` on the instance slot `permit`.
    pub(crate) async fn run(
        &self,
        t: &Arc<Tenant>,
        f: Arc<Function>,
        permit: OwnedSemaphorePermit,
        request: Request,
        _admitted: Inflight,
    ) -> Result<Response, ExecError> {
        let pooled = lock(&f.pool.idle).pop();
        let (counters, tenant_instances) = (self.counters.clone(), t.instances.clone());
        let max_tenant_instances = self.quotas.instances;
        let func = f.clone();
        let (back, result) = tokio::task::spawn_blocking(move || {
            let mut inst = match pooled {
                Some(p) => p,
                None => {
                    if tenant_instances.fetch_add(1, Ordering::AcqRel) >= max_tenant_instances {
                        tenant_instances.fetch_sub(1, Ordering::AcqRel);
                        return (
                            None,
                            Err(ExecError::Quota(format!(
                                "the tenant already has {max_tenant_instances} warm instances"
                            ))),
                        );
                    }
                    counters.active_instances.fetch_add(1, Ordering::Relaxed);
                    let created = WarmInstance::create(&func.pre, &func.setup, true, func.deadline);
                    match created {
                        Ok(inst) => PooledInstance {
                            inst,
                            counters,
                            tenant_instances,
                        },
                        Err(e) => {
                            counters.active_instances.fetch_sub(1, Ordering::Relaxed);
                            tenant_instances.fetch_sub(1, Ordering::AcqRel);
                            return (None, Err(ExecError::Invoke(e)));
                        }
                    }
                }
            };
            match inst.inst.invoke(request, func.deadline) {
                Ok(r) => (Some(inst), Ok(r)),
                Err(e) if e.kills_instance() => (None, Err(ExecError::Invoke(e))),
                Err(e) => (Some(inst), Err(ExecError::Invoke(e))),
            }
        })
        .await
        .map_err(|e| ExecError::Internal(format!("invocation task failed: {e}")))?;
        if let Some(inst) = back {
            lock(&f.pool.idle).push(inst);
        }
        drop(permit);
        result
    }

    /// An instance slot of `f`. `queued` caps the wait behind busy
    /// instances (synchronous requests); jobs wait without that cap, being
    /// bounded by the pending-job quota instead.
    pub(crate) async fn acquire(
        &self,
        f: &Function,
        queued: bool,
    ) -> Result<OwnedSemaphorePermit, ExecError> {
        if let Ok(p) = f.pool.permits.clone().try_acquire_owned() {
            return Ok(p);
        }
        if !queued {
            return f
                .pool
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ExecError::Internal("instance pool closed".into()));
        }
        if f.pool.waiting.fetch_add(1, Ordering::AcqRel) >= f.pool.max_waiting {
            f.pool.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ExecError::Capacity(format!(
                "function {} has {} invocations waiting already",
                f.info.id, f.pool.max_waiting
            )));
        }
        let waited = tokio::time::timeout(f.deadline, f.pool.permits.clone().acquire_owned()).await;
        f.pool.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(p)) => Ok(p),
            _ => Err(ExecError::Capacity(format!(
                "no instance of function {} came free within its deadline",
                f.info.id
            ))),
        }
    }

    fn function_dir(&self, tenant: &TenantId, id: &str) -> Option<PathBuf> {
        self.state_dir
            .as_ref()
            .map(|d| d.join("functions").join(tenant.as_str()).join(id))
    }

    fn persist(&self, tenant: &TenantId, f: &Function) -> std::io::Result<()> {
        let Some(dir) = self.function_dir(tenant, &f.info.id) else {
            return Ok(());
        };
        let parent = dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join(format!(".{}.tmp", f.info.id));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        std::fs::write(tmp.join("module.wasm"), &f.wasm)?;
        if let Some(a) = &f.assets_file {
            std::fs::write(tmp.join("assets.safetensors"), a)?;
        }
        let json = serde_json::to_vec_pretty(&f.info).map_err(std::io::Error::other)?;
        std::fs::write(tmp.join("function.json"), json)?;
        for file in std::fs::read_dir(&tmp)? {
            std::fs::File::open(file?.path())?.sync_all()?;
        }
        let old = parent.join(format!(".{}.old", f.info.id));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old)?;
        }
        std::fs::rename(&tmp, &dir)?;
        let _ = std::fs::remove_dir_all(&old);
        std::fs::File::open(parent)?.sync_all()
    }

    /// Registers every function persisted under the state directory.
    /// Returns how many came back; failures are logged and skipped.
    pub fn load_persisted(&self) -> usize {
        let Some(root) = self.state_dir.as_ref().map(|d| d.join("functions")) else {
            return 0;
        };
        let Ok(tenants) = std::fs::read_dir(&root) else {
            return 0;
        };
        let mut loaded = 0;
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
                if name.starts_with('.') {
                    // A `.old` beside a missing function is the last good
                    // copy of an interrupted replace: put it back.
                    if let Some(id) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".old")) {
                        let fin = tdir.path().join(id);
                        if !fin.exists() {
                            let _ = std::fs::rename(fdir.path(), &fin);
                            match self.load_function(&tenant, &fin) {
                                Ok(()) => loaded += 1,
                                Err(e) => {
                                    tracing::error!(%tenant, function = id, error = %e, "cannot restore function")
                                }
                            }
                            continue;
                        }
                    }
                    let _ = std::fs::remove_dir_all(fdir.path());
                    continue;
                }
                match self.load_function(&tenant, &fdir.path()) {
                    Ok(()) => loaded += 1,
                    Err(e) => {
                        tracing::error!(%tenant, function = name, error = %e, "cannot restore function")
                    }
                }
            }
        }
        loaded
    }

    fn load_function(&self, tenant: &TenantId, dir: &Path) -> Result<(), ExecError> {
        // Functions that came back warm are registered already.
        let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if self.function(tenant, id).is_ok() {
            return Ok(());
        }
        let io = |e: std::io::Error| ExecError::Internal(format!("{}: {e}", dir.display()));
        let info: FunctionInfo =
            serde_json::from_slice(&std::fs::read(dir.join("function.json")).map_err(io)?)
                .map_err(|e| ExecError::Internal(format!("{}: {e}", dir.display())))?;
        let wasm = std::fs::read(dir.join("module.wasm")).map_err(io)?;
        let assets = match std::fs::read(dir.join("assets.safetensors")) {
            Ok(a) => Some(a),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        let reg = Registration {
            name: info.name.clone(),
            wasm,
            assets,
            config: info.config.clone(),
            replace: true,
        };
        self.register_inner(tenant, reg, Some(info), false)
            .map(|_| ())
    }
}
