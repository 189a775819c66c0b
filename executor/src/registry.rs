//! Every tenant of this executor, and the operations that span a tenant
//! and its functions: registration, lookup, delete, invocation.
//!
//! A function is registered once (inspected, rewritten, compiled, its assets
//! uploaded), persisted through the [`FunctionStore`], and from then on
//! invoked through its [`Pool`](crate::state::Pool) of at most
//! `max_instances` warm instances. Invocations beyond that wait in a bounded
//! queue; past the queue they get `capacity_exhausted` at once rather than
//! piling up. Who owns which state, and the invariants between the counts,
//! are in [`crate::state`].
//!
//! An invocation resolves `(tenant, function)` once into a [`Target`], is
//! admitted by the tenant, and is submitted to the function's pool, which
//! runs it on the thread of a free slot (or of the first to come free):
//! that thread decodes the body, runs the guest and encodes the result
//! ([`Registry::invoke`]). Only registration and import
//! create a tenant; every read path answers for a tenant it does not know
//! as for one with nothing in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use sha2::{Digest, Sha256};
use tensor_wasm_kernels::{Backend, BackendKind, SharedBytes};
use tensor_wasm_shared::api::{Durability, FunctionInfo};
use tensor_wasm_shared::{FunctionId, TenantId};
use tokio::sync::Semaphore;

use crate::assets::AssetStore;
use crate::assets::{self, AssetError, Assets, LoadedAssets};
use crate::body::RequestBody;
use crate::config::{EngineLimits, TenantQuotas};
use crate::engine::Runtime;
use crate::error::ExecError;
use crate::inbound::{Inbound, InboundState};
use crate::instance::{InstanceSetup, Response, WarmInstance};
use crate::logs::FunctionLog;
use crate::memory::{HostBudget, HostUsage};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, Sessions};
use crate::state::cpu::CpuShares;
use crate::state::{
    AssetSource, Function, FunctionStore, Inflight, JobCaps, Pool, Registration, ResolvedConfig,
    Slot, Tenant,
};
use crate::sync::{lock, now_rfc3339, random_bits, read_lock, write_lock};
use crate::tensors::TenantUsage;
use crate::tracking::PageTracking;
use crate::wasm;

/// Makes the backend a tenant's tensors live on (one per tenant, so that on
/// a GPU each tenant has its own stream).
pub type BackendFactory = Arc<dyn Fn() -> Result<Arc<dyn Backend>, String> + Send + Sync>;

/// A function of a tenant, resolved once for one invocation or job.
#[derive(Clone, Debug)]
pub struct Target {
    pub tenant: Arc<Tenant>,
    pub function: Arc<Function>,
}

/// How a `strict` invocation's effects reach the disk.
enum Strict {
    /// In this frame, which it wrote.
    Frame(Result<u64, ExecError>),
    /// In a later frame of its instance, covering its invocation count.
    Later(Arc<crate::instance::InstanceShared>, u64),
}

/// Sets its flag when dropped: a synchronous invocation's future holds
/// one, so that the flag is set once its client is gone (the future is
/// dropped with the connection) or the answer is out (when nothing reads
/// it any more).
#[derive(Default)]
pub(crate) struct ClientGone(Arc<AtomicBool>);

impl ClientGone {
    /// The flag this sets.
    pub(crate) fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Drop for ClientGone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// What an invocation needs on the thread that holds its slot.
struct Held {
    tenant: Arc<Tenant>,
    function: Arc<Function>,
    backend: Arc<dyn Backend>,
    journal: Option<Arc<crate::durable::Journal>>,
    /// Set once the client is gone (`docs/GUEST-ABI.md`, "Cancellation").
    cancel: Option<Arc<AtomicBool>>,
    /// Where a streamed invocation's chunks go.
    stream: Option<Arc<crate::stream::Sink>>,
}

impl Held {
    fn new(target: &Target, journal: Option<Arc<crate::durable::Journal>>) -> Held {
        Held {
            tenant: target.tenant.clone(),
            function: target.function.clone(),
            backend: target.tenant.backend.clone(),
            journal,
            cancel: None,
            stream: None,
        }
    }

    /// Decodes `body` onto the tenant's backend, runs the guest on an idle
    /// (or new) instance of the slot's pool, puts the instance back and
    /// encodes the response with `encode`. A `strict` invocation leaves its
    /// frame to the journal's committer (`Journal::covered`), unless the
    /// committer asked the instance's holder for one (`Journal::wants`).
    /// The guest runs only once the tenant has a place among its running
    /// invocations (`Tenant::running`), waited for at most the function's
    /// deadline. Blocking.
    fn run<T, E>(
        self,
        slot: &Slot,
        body: RequestBody,
        encode: E,
    ) -> Result<(T, Option<Strict>), ExecError>
    where
        E: FnOnce(Response, &dyn Backend) -> Result<T, ExecError>,
    {
        let (tenant, f) = (self.tenant.clone(), self.function.clone());
        let _running = tenant.running.enter(f.deadline()).ok_or_else(|| {
            ExecError::Capacity(format!(
                "tenant {} runs as many invocations as its quota allows, and none ended within function {}'s deadline",
                tenant.id, f.info.id
            ))
        })?;
        let cpu = tenant.cpu.clone();
        if cpu.over_share() {
            // Over its share of the cores: this guest thread goes to the
            // background for good, and ends once its job does
            // (`state::cpu`).
            crate::state::cpu::enter_background();
        }
        let _busy = cpu.busy();
        self.run_guest(slot, body, encode)
    }

    /// [`run`](Self::run) once the tenant has its place: on this thread.
    fn run_guest<T, E>(
        self,
        slot: &Slot,
        body: RequestBody,
        encode: E,
    ) -> Result<(T, Option<Strict>), ExecError>
    where
        E: FnOnce(Response, &dyn Backend) -> Result<T, ExecError>,
    {
        let f = &self.function;
        let strict = f.config.durability == Durability::Strict;
        // A `strict` call's request, kept for its record in the journal
        // (`Journal::call`): on the CPU, whose kernels give the same bits
        // again, and not for a stream, whose chunks are gone once sent.
        let recordable = (strict
            && self.journal.is_some()
            && self.stream.is_none()
            && body.body.len() <= crate::durable::MAX_CALL_REQUEST
            && self.backend.kind() == BackendKind::Cpu)
            .then(|| body.clone());
        let mut request = body.decode(self.backend.as_ref())?;
        request.stream = self.stream.clone();
        let mut inst = f.pool.checkout(slot, || {
            WarmInstance::create(&f.pre, &f.setup, true, f.deadline())
        })?;
        let (response, frame) = match inst.inst.invoke(request, f.deadline(), self.cancel.clone()) {
            Ok(r) => {
                let shared = inst.inst.shared().clone();
                let count = shared.invocations.load(Ordering::Relaxed);
                let frame = match &self.journal {
                    Some(j) if strict && j.wants(&shared) => {
                        Some(Strict::Frame(j.capture(&mut inst.inst, f)))
                    }
                    Some(j) if strict => match self.record(j, &shared, count, recordable, &r) {
                        Some(n) => Some(Strict::Frame(n)),
                        None => Some(Strict::Later(shared, count)),
                    },
                    _ => None,
                };
                f.pool.checkin(inst);
                (r, frame)
            }
            // A trap or a deadline leaves the instance unusable: it is
            // dropped, and its claim with it.
            Err(e) if e.kills_instance() => {
                if let Some(j) = &self.journal {
                    j.gone(inst.inst.shared());
                }
                return Err(ExecError::Invoke(e));
            }
            Err(e) => {
                f.pool.checkin(inst);
                return Err(ExecError::Invoke(e));
            }
        };
        Ok((encode(response, self.backend.as_ref())?, frame))
    }

    /// Writes the record of a `strict` call (its instance `shared` held,
    /// as its invocation `count`) that answered `answer` to `request`,
    /// when it can go as one: no one told the guest its client went (a
    /// replay would not), its instance's chain of records goes on
    /// (`Journal::chains`), and its answer can be hashed. `None` leaves
    /// the call to a frame of what it changed.
    fn record(
        &self,
        j: &crate::durable::Journal,
        shared: &crate::instance::InstanceShared,
        count: u64,
        request: Option<RequestBody>,
        answer: &Response,
    ) -> Option<Result<u64, ExecError>> {
        let request = request?;
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
            || !j.chains(shared, count)
        {
            return None;
        }
        let digest = crate::durable::answer_digest(answer, self.backend.as_ref())?;
        j.call(shared, &self.function, count, &request, digest)
    }
}

/// Every tenant of this executor.
pub struct Registry {
    runtime: Runtime,
    backends: BackendFactory,
    tenants: RwLock<BTreeMap<TenantId, Arc<Tenant>>>,
    state_dir: PathBuf,
    store: FunctionStore,
    asset_store: AssetStore,
    pub limits: EngineLimits,
    pub quotas: TenantQuotas,
    pub metrics: Arc<Metrics>,
    /// Host memory all tenants together may hold.
    host_budget: Arc<HostBudget>,
    /// Slots for running async jobs (`job_concurrency`).
    pub(crate) job_slots: Arc<Semaphore>,
    /// The cores, shared among tenants by weight.
    cpu: Arc<CpuShares>,
    /// `TENSOR_WASM_SNAPSHOT_KEY`: signs exports, and imports must carry a
    /// valid signature when set.
    snapshot_key: Option<Vec<u8>>,
    /// How memory pages written are tracked for migrations.
    tracking: PageTracking,
    /// Tenants on their way out (migration sources), by session.
    pub(crate) outbound: Sessions,
    /// Tenants being built here (migration destinations, imports).
    inbound: std::sync::Mutex<BTreeMap<TenantId, Arc<Inbound>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// A function's name: 1 to 128 printable characters.
fn check_name(name: &str) -> Result<(), ExecError> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ExecError::InvalidInput(
            "function names are 1 to 128 printable characters".into(),
        ));
    }
    Ok(())
}

fn new_function_id() -> FunctionId {
    FunctionId::generated(random_bits())
}

impl Registry {
    /// A registry persisting under `state_dir`, creating each
    /// tenant's backend with `backends`.
    pub fn new(
        runtime: Runtime,
        backends: BackendFactory,
        state_dir: PathBuf,
        quotas: TenantQuotas,
        metrics: Arc<Metrics>,
    ) -> Registry {
        let job_slots = runtime.limits().job_concurrency.max(1);
        let host_memory = runtime.limits().host_memory_bytes;
        let cpu = CpuShares::new(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            quotas.cpu_weights.iter().cloned().collect(),
            ["started", "moved"].map(|how| metrics.background_guests.with_label_values(&[how])),
        );
        Registry {
            limits: runtime.limits().clone(),
            runtime,
            backends,
            tenants: RwLock::new(BTreeMap::new()),
            store: FunctionStore::new(&state_dir),
            asset_store: AssetStore::new(&state_dir),
            state_dir,
            quotas,
            job_slots: Arc::new(Semaphore::new(job_slots)),
            cpu,
            host_budget: HostBudget::new(host_memory),
            snapshot_key: None,
            tracking: PageTracking::open(),
            outbound: Sessions::default(),
            inbound: std::sync::Mutex::new(BTreeMap::new()),
            metrics,
        }
    }

    /// Tracks written pages as `choice` says.
    pub fn with_page_tracking(mut self, choice: crate::tracking::TrackingChoice) -> Registry {
        if choice != crate::tracking::TrackingChoice::Auto {
            self.tracking = PageTracking::choose(choice);
        }
        self
    }

    /// Signs and checks snapshots with `key`.
    pub fn with_snapshot_key(mut self, key: Option<Vec<u8>>) -> Registry {
        self.snapshot_key = key.filter(|k| !k.is_empty());
        self
    }

    /// The tenant, created on first use: for registration and import only.
    pub(crate) fn tenant_or_create(&self, id: &TenantId) -> Result<Arc<Tenant>, ExecError> {
        self.tenant_or_create_fenced(id, &|| Ok(()))
    }

    /// As [`tenant_or_create`](Self::tenant_or_create), for a request that
    /// a placement routed here: a tenant that is not here is made only if
    /// `fence` (the request's placement check, `crate::fence`) still
    /// admits it. Asked under the lock that dropping a tenant takes, it
    /// sees every move that took the tenant away: a move marks its fence
    /// before it drops the tenant, so a stale request can never make the
    /// tenant anew here after it left.
    pub(crate) fn tenant_or_create_fenced(
        &self,
        id: &TenantId,
        fence: &dyn Fn() -> Result<(), ExecError>,
    ) -> Result<Arc<Tenant>, ExecError> {
        if let Some(t) = self.existing_tenant(id) {
            return Ok(t);
        }
        let mut tenants = write_lock(&self.tenants);
        if let Some(t) = tenants.get(id) {
            return Ok(t.clone());
        }
        fence()?;
        let t = self.new_tenant(id)?;
        tenants.insert(id.clone(), t.clone());
        Ok(t)
    }

    /// A tenant object with no functions, not yet in the registry: what an
    /// import or a migration builds before it publishes it
    /// ([`publish`](Self::publish)).
    pub(crate) fn new_tenant(&self, id: &TenantId) -> Result<Arc<Tenant>, ExecError> {
        let backend = (self.backends)().map_err(ExecError::Internal)?;
        let host = Arc::new(HostUsage::new(
            self.quotas.host_memory_bytes,
            self.host_budget.clone(),
        ));
        let mut usage = TenantUsage::new(self.quotas.device_memory_bytes, self.quotas.live_tensors);
        if backend.kind() == BackendKind::Cpu {
            usage = usage.in_host_memory(host.clone());
        }
        Ok(Arc::new(Tenant::new(
            id.clone(),
            backend,
            usage,
            host,
            JobCaps {
                count: self.limits.max_finished_jobs,
                bytes: self.quotas.finished_job_bytes,
                running: self.quotas.running_jobs,
            },
            self.quotas.running_invocations,
            self.cpu.tenant(id),
        )))
    }

    /// Makes `t` the registry's tenant of its id. With `replace`, a tenant
    /// already there is swapped out in the same step (removed: its pending
    /// jobs stop) and its functions returned; without, a tenant there with
    /// functions is `tenant_exists`.
    pub(crate) fn publish(
        &self,
        t: Arc<Tenant>,
        replace: bool,
    ) -> Result<Vec<Arc<Function>>, ExecError> {
        let mut tenants = write_lock(&self.tenants);
        if let Some(old) = tenants.get(&t.id)
            && old.function_count() > 0
            && !replace
        {
            return Err(ExecError::TenantExists(t.id.to_string()));
        }
        let old = tenants.insert(t.id.clone(), t);
        drop(tenants);
        Ok(old.map(|old| old.remove()).unwrap_or_default())
    }

    /// The engine registrations compile with.
    pub(crate) fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The tenant if it exists here.
    pub fn existing_tenant(&self, id: &TenantId) -> Option<Arc<Tenant>> {
        read_lock(&self.tenants).get(id).cloned()
    }

    /// The tenant, or `tenant_not_here`: for the internal routes, which
    /// name a tenant rather than one of its functions.
    pub fn tenant_here(&self, id: &TenantId) -> Result<Arc<Tenant>, ExecError> {
        self.existing_tenant(id)
            .ok_or_else(|| ExecError::TenantNotHere(id.to_string()))
    }

    /// Function `id` of `tenant`, resolved for a call. An unknown tenant,
    /// or another tenant's id, is "function not found".
    pub fn resolve(&self, tenant: &TenantId, id: &str) -> Result<Target, ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        let f = t
            .function(id)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        Ok(Target {
            tenant: t,
            function: f,
        })
    }

    /// Forgets a tenant: its functions (and their files), instances, jobs.
    /// Its pending jobs stop waiting.
    pub fn drop_tenant(&self, id: &TenantId) -> Result<(), ExecError> {
        let gone = self
            .existing_tenant(id)
            .map(|t| t.function_list())
            .unwrap_or_default();
        if !self.forget_tenant(id) {
            return Err(ExecError::TenantNotHere(id.to_string()));
        }
        self.store.remove_tenant(id);
        self.asset_store.remove_tenant(id.as_str());
        crate::durable::remove_journal(&self.state_dir, id);
        self.release_modules(&gone);
        Ok(())
    }

    /// Removes the compiled modules of the functions `gone` from the
    /// module cache, unless a function here still uses them.
    fn release_modules(&self, gone: &[Arc<Function>]) {
        let in_use: std::collections::HashSet<String> = self
            .tenant_list()
            .iter()
            .flat_map(|t| t.function_list())
            .filter_map(|f| f.cache_entry.clone())
            .collect();
        for name in gone.iter().filter_map(|f| f.cache_entry.as_deref()) {
            if !in_use.contains(name) {
                self.runtime.evict(name);
            }
        }
    }

    /// Forgets `id` in memory only (its instances, sessions and entry):
    /// its functions and assets stay on disk, to be registered again from
    /// there ([`Registry::load_persisted`]). Whether it was here.
    pub fn forget_tenant(&self, id: &TenantId) -> bool {
        let Some(t) = write_lock(&self.tenants).remove(id) else {
            return false;
        };
        t.remove();
        if let Some(session) = self.outbound.remove_tenant(id) {
            session.end();
        }
        lock(&self.inbound).remove(id);
        true
    }

    /// `t`'s checkpoint journal, made empty at its first use.
    pub(crate) fn journal(&self, t: &Tenant) -> Arc<crate::durable::Journal> {
        t.journal
            .get_or_init(|| {
                Arc::new(crate::durable::Journal::new(
                    &self.state_dir,
                    t.id.clone(),
                    self.tracking.clone(),
                    self.metrics.journal.clone(),
                ))
            })
            .clone()
    }

    /// How this executor tracks the pages a migration's rounds carry.
    pub fn page_tracking(&self) -> &PageTracking {
        &self.tracking
    }

    /// Starts moving `tenant` out: a new outbound session (ending any
    /// earlier one of the tenant).
    pub fn start_outbound(&self, tenant: &TenantId) -> Result<Arc<Outbound>, ExecError> {
        let t = self.tenant_here(tenant)?;
        let id = format!("{:016x}{:016x}", random_bits(), random_bits());
        let session = Arc::new(Outbound::new(
            id,
            t,
            self.tracking.clone(),
            self.snapshot_key.clone(),
        ));
        if let Some(old) = self.outbound.insert(session.clone()) {
            old.end();
        }
        Ok(session)
    }

    /// An outbound session by id.
    pub fn outbound_session(&self, id: &str) -> Result<Arc<Outbound>, ExecError> {
        self.outbound
            .get(id)
            .ok_or_else(|| ExecError::MoveNotFound(format!("migration session {id}")))
    }

    /// Ends an outbound session without a move: its tenant thaws.
    pub fn end_outbound(&self, id: &str) -> Result<(), ExecError> {
        let s = self
            .outbound
            .remove(id)
            .ok_or_else(|| ExecError::MoveNotFound(format!("migration session {id}")))?;
        s.end();
        Ok(())
    }

    /// Starts building `tenant` here (a migration from `origin`, or an
    /// import). A tenant here with functions is `tenant_exists` unless
    /// `replace`; an earlier inbound of the tenant is discarded.
    pub async fn start_inbound(
        &self,
        tenant: &TenantId,
        origin: Option<(crate::peer::Peer, String)>,
        replace: bool,
    ) -> Result<Arc<Inbound>, ExecError> {
        if !replace
            && self
                .existing_tenant(tenant)
                .is_some_and(|t| t.function_count() > 0)
        {
            return Err(ExecError::TenantExists(tenant.to_string()));
        }
        let earlier = lock(&self.inbound).remove(tenant);
        if let Some(earlier) = earlier {
            earlier.discard().await;
        }
        let mut inbound = Inbound::new(self.new_tenant(tenant)?, origin);
        // What a move or a restore stages is journaled as it comes,
        // starting from nothing: beside the journal of the tenant here,
        // which it replaces at the commit, or in the tenant's place, where
        // a journal left is of another life of the tenant.
        inbound.journals = true;
        if self.existing_tenant(tenant).is_some() {
            let journal = crate::durable::Journal::staged(
                &self.state_dir,
                tenant.clone(),
                self.tracking.clone(),
                self.metrics.journal.clone(),
            );
            let _ = inbound.tenant.journal.set(Arc::new(journal));
            inbound.staged_journal = true;
        } else {
            crate::durable::remove_journal(&self.state_dir, tenant);
        }
        let inbound = Arc::new(inbound);
        lock(&self.inbound).insert(tenant.clone(), inbound.clone());
        Ok(inbound)
    }

    /// The inbound tenant of that id, if any.
    pub fn inbound(&self, tenant: &TenantId) -> Option<Arc<Inbound>> {
        lock(&self.inbound).get(tenant).cloned()
    }

    /// Discards an inbound tenant, unless it was committed; says which.
    pub async fn discard_inbound(&self, tenant: &TenantId) -> InboundState {
        let Some(inbound) = self.inbound(tenant) else {
            return InboundState::None;
        };
        let state = inbound.discard().await;
        if state == InboundState::Discarded {
            let mut map = lock(&self.inbound);
            if map.get(tenant).is_some_and(|i| Arc::ptr_eq(i, &inbound)) {
                map.remove(tenant);
            }
            drop(map);
            // Assets files fetched for it, unless the tenant lives here.
            if self
                .existing_tenant(tenant)
                .is_none_or(|t| t.function_count() == 0)
            {
                self.asset_store.remove_tenant(tenant.as_str());
            }
            // What it journaled while staged.
            if inbound.staged_journal {
                crate::durable::remove_staged_journal(&self.state_dir, tenant);
            } else if inbound.journals {
                crate::durable::remove_journal(&self.state_dir, tenant);
            }
        }
        state
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Every tenant's assets files.
    pub fn asset_store(&self) -> &AssetStore {
        &self.asset_store
    }

    /// How many bytes of a new assets file `tenant`'s device-memory quota
    /// could still hold: the quota less what the tenant's tensors (not its
    /// assets, which a new file may share or replace) use now. The load
    /// checks the exact figure; this lets an upload that could never fit
    /// stop early.
    pub fn asset_headroom(&self, tenant: &TenantId) -> u64 {
        let used = self
            .existing_tenant(tenant)
            .map_or(0, |t| t.usage.bytes().saturating_sub(t.asset_bytes()));
        self.quotas.device_memory_bytes.saturating_sub(used)
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
            .filter(|t| t.function_count() > 0)
            .map(|t| t.id.clone())
            .collect()
    }

    /// Host memory held by all tenants, and what they may hold.
    pub fn host_memory(&self) -> (u64, u64) {
        (self.host_budget.used(), self.host_budget.max())
    }

    /// Device bytes held by all tenants.
    pub fn device_bytes(&self) -> u64 {
        read_lock(&self.tenants)
            .values()
            .map(|t| t.usage.bytes())
            .sum()
    }

    /// Each tenant with functions: whether it is frozen, and the device
    /// bytes it holds.
    pub fn tenant_states(&self) -> Vec<(TenantId, bool, u64)> {
        read_lock(&self.tenants)
            .values()
            .filter(|t| t.function_count() > 0)
            .map(|t| (t.id.clone(), t.is_frozen(), t.usage.bytes()))
            .collect()
    }

    /// The guest ABI versions the functions here use, ascending: v2 for a
    /// module that imports `cancelled`, v1 for any other.
    pub fn guest_abi_used(&self) -> Vec<u32> {
        let mut used = std::collections::BTreeSet::new();
        for t in read_lock(&self.tenants).values() {
            for f in t.function_list() {
                used.insert(wasm::guest_abi_of(f.pre.module()));
            }
        }
        used.into_iter().collect()
    }

    /// Warm instances of all tenants, idle or running.
    pub fn active_instances(&self) -> u64 {
        read_lock(&self.tenants)
            .values()
            .map(|t| t.instance_count() as u64)
            .sum()
    }

    /// Synchronous invocations of all tenants waiting for an instance slot.
    pub fn invocations_waiting(&self) -> u64 {
        read_lock(&self.tenants)
            .values()
            .map(|t| t.invocations_waiting() as u64)
            .sum()
    }

    /// Jobs of all tenants pending or running.
    pub fn jobs_in_flight(&self) -> u64 {
        read_lock(&self.tenants)
            .values()
            .map(|t| t.jobs().in_flight() as u64)
            .sum()
    }

    /// Registers (or replaces) a function. Compiles on the calling thread:
    /// call it from a blocking context.
    pub fn register(
        &self,
        tenant: &TenantId,
        reg: Registration,
    ) -> Result<FunctionInfo, ExecError> {
        self.register_fenced(tenant, reg, &|| Ok(()))
    }

    /// As [`register`](Self::register), for a request that a placement
    /// routed here: `fence` is asked before the tenant is made here
    /// ([`tenant_or_create_fenced`](Self::tenant_or_create_fenced)).
    pub fn register_fenced(
        &self,
        tenant: &TenantId,
        reg: Registration,
        fence: &dyn Fn() -> Result<(), ExecError>,
    ) -> Result<FunctionInfo, ExecError> {
        check_name(&reg.name)?;
        let tenant = self.tenant_or_create_fenced(tenant, fence)?;
        self.register_in(&tenant, reg, None, true)
    }

    /// Registers `reg`; `restored` is the record of a function coming back
    /// (a snapshot or the state directory), which keeps its id and skips
    /// the checks a new registration answers to the client.
    pub(crate) fn register_inner(
        &self,
        tenant_id: &TenantId,
        reg: Registration,
        restored: Option<FunctionInfo>,
        persist: bool,
    ) -> Result<FunctionInfo, ExecError> {
        check_name(&reg.name)?;
        let tenant = self.tenant_or_create(tenant_id)?;
        self.register_in(&tenant, reg, restored, persist)
    }

    /// Registers `reg` into `tenant`, published or not (an import builds a
    /// tenant before it publishes it).
    pub(crate) fn register_in(
        &self,
        tenant: &Arc<Tenant>,
        reg: Registration,
        restored: Option<FunctionInfo>,
        persist: bool,
    ) -> Result<FunctionInfo, ExecError> {
        let tenant_id = &tenant.id;
        check_name(&reg.name)?;
        let tenant = tenant.clone();
        // A new registration is work of the tenant, admitted as an
        // invocation is: an export freezes the tenant and waits for it, so
        // a function answered as registered is in the snapshot (or the
        // registration is refused, the tenant frozen).
        let _work = match restored {
            None => Some(tenant.admit()?),
            Some(_) => None,
        };
        // One registration or delete of a tenant at a time: the function
        // quota and the assets files' reference counts hold across them.
        let _serial = lock(&tenant.registering);
        let existing = tenant.function_named(&reg.name);
        if existing.is_some() && !reg.replace && restored.is_none() {
            return Err(ExecError::FunctionExists(reg.name));
        }
        if existing.is_none()
            && restored.is_none()
            && tenant.function_count() >= self.quotas.functions
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
        let config = ResolvedConfig::resolve(&reg.config, &self.limits);
        // A module whose memory starts over the limit could never run.
        let initial_memory = module
            .get_export("memory")
            .and_then(|e| e.memory().map(|m| m.minimum().saturating_mul(65_536)));
        if let Some(initial) = initial_memory
            && initial > config.memory_limit_bytes
            && restored.is_none()
        {
            return Err(ExecError::InvalidInput(format!(
                "the module's memory starts at {initial} bytes, over the function's memory \
                 limit of {} bytes (config memory_limit_bytes, at most {})",
                config.memory_limit_bytes, self.limits.max_memory_limit
            )));
        }
        let assets = match reg.assets {
            Some(source) => Assets::of(self.install_assets(&tenant, source)?),
            None => Assets::none(),
        };
        let info = match restored {
            Some(mut info) => {
                info.config = config.to_config(&self.limits);
                info.assets = assets.names();
                info.assets_sha256 = assets.sha256().map(str::to_string);
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
                config: config.to_config(&self.limits),
                assets: assets.names(),
                assets_sha256: assets.sha256().map(str::to_string),
            },
        };
        let log = existing.as_ref().map_or_else(
            || FunctionLog::new(self.limits.log_capacity),
            |f| f.log.clone(),
        );
        let function = Arc::new(Function {
            setup: InstanceSetup {
                backend: tenant.backend.clone(),
                assets: assets.tensors(),
                usage: tenant.usage.clone(),
                host: tenant.host.clone(),
                log: log.clone(),
                metrics: self.metrics.clone(),
                memory_limit: config.memory_limit_bytes,
                max_output_bytes: self.limits.max_output_bytes,
                max_error_message: self.limits.max_error_message,
                max_table_elements: self.limits.max_table_elements,
            },
            config,
            info: info.clone(),
            mutable_globals: inspected.mutable_globals.clone(),
            wasm: Arc::from(reg.wasm),
            cache_entry: self.runtime.cache_entry(&inspected.rewritten),
            pre,
            assets,
            pool: Pool::new(
                config.max_instances as usize,
                self.limits.max_queued_per_function,
                tenant.instances().clone(),
                self.quotas.instances,
            ),
            log,
        });
        if persist && let Err(e) = self.store.save(tenant_id, &function.info, &function.wasm) {
            if let Some(sha) = function.assets.sha256() {
                let sha = sha.to_string();
                drop(function);
                self.forget_unused_assets(&tenant, &sha);
            }
            return Err(ExecError::Persist(e));
        }
        let replaced = tenant.insert_function(function);
        if let Some(old) = replaced.as_ref().and_then(|f| f.assets.sha256()) {
            self.forget_unused_assets(&tenant, old);
        }
        Ok(info)
    }

    /// Writes every function of `tenant` to the state directory (an
    /// imported tenant, before it is published).
    pub(crate) fn persist_tenant(&self, tenant: &Tenant) -> Result<(), ExecError> {
        for f in tenant.function_list() {
            self.store
                .save(&tenant.id, &f.info, &f.wasm)
                .map_err(ExecError::Persist)?;
        }
        Ok(())
    }

    /// After `new` replaced a tenant whose functions were `old` (a
    /// restore): the files of those functions that `new` lacks, and assets
    /// files it does not use, go.
    pub(crate) fn forget_replaced(&self, old: &[Arc<Function>], new: &Tenant) {
        for f in old {
            if new.function(&f.info.id).is_none() {
                self.store.remove(&new.id, &f.info.id);
            }
        }
        let keep = new.asset_files();
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        self.asset_store.retain(new.id.as_str(), &keep);
    }

    /// Validates (when just received), loads and stores `source` for
    /// `tenant`, sharing the load with any function of the tenant that
    /// carries the same bytes. Called with the tenant's registration lock.
    fn install_assets(
        &self,
        tenant: &Tenant,
        source: AssetSource,
    ) -> Result<Arc<LoadedAssets>, ExecError> {
        let t = tenant.id.as_str();
        let load = |sha: &str, file: SharedBytes, index| {
            LoadedAssets::load(
                sha.to_string(),
                file,
                index,
                tenant.backend.as_ref(),
                tenant.usage.clone(),
            )
        };
        let loaded = match source {
            AssetSource::Staged(staged) => {
                let sha = staged.sha256.clone();
                if let Some(live) = tenant.loaded_assets(&sha) {
                    // The same bytes as a file already loaded (and checked);
                    // the store may have let it go if only a deleted
                    // function's running instance still holds it.
                    if !self.asset_store.contains(t, &sha) {
                        self.asset_store.commit(t, staged)?;
                    }
                    return Ok(live);
                }
                tenant.assets_of(&sha, || -> Result<LoadedAssets, AssetError> {
                    let file = assets::map(staged.path())?;
                    let index = assets::inspect((*file).as_ref(), tenant.backend.limits())?;
                    let loaded = load(&sha, file, index)?;
                    // The mapping stays valid across the rename.
                    self.asset_store.commit(t, staged)?;
                    Ok(loaded)
                })?
            }
            AssetSource::Stored(sha) => {
                if !assets::is_sha256(&sha) {
                    return Err(ExecError::InvalidInput(format!(
                        "{sha:?} is not a SHA-256 of an assets file"
                    )));
                }
                tenant.assets_of(&sha, || -> Result<LoadedAssets, AssetError> {
                    let file = assets::map(&self.asset_store.path(t, &sha))?;
                    let index = assets::inspect((*file).as_ref(), tenant.backend.limits())?;
                    load(&sha, file, index)
                })?
            }
        };
        Ok(loaded)
    }

    /// Removes `tenant`'s assets file `sha256` from the store unless one of
    /// its functions still uses it. Called with the tenant's registration
    /// lock.
    fn forget_unused_assets(&self, tenant: &Tenant, sha256: &str) {
        if !tenant.asset_files().iter().any(|s| s == sha256)
            && let Err(e) = self.asset_store.remove(tenant.id.as_str(), sha256)
        {
            tracing::warn!(tenant = %tenant.id, file = %sha256, error = %e, "cannot remove an unused assets file");
        }
    }

    /// A function of a tenant. Another tenant's id is "not found".
    pub fn function(&self, tenant: &TenantId, id: &str) -> Result<Arc<Function>, ExecError> {
        self.resolve(tenant, id).map(|t| t.function)
    }

    /// The tenant's functions, by id.
    pub fn functions(&self, tenant: &TenantId) -> Vec<FunctionInfo> {
        self.existing_tenant(tenant)
            .map(|t| t.function_list().iter().map(|f| f.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Deletes a function, its instances, assets and files. Its pending
    /// jobs fail now rather than when an instance frees.
    /// Waits for the tenant's registration lock: call it from a blocking
    /// context.
    pub fn delete(&self, tenant: &TenantId, id: &str) -> Result<(), ExecError> {
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))?;
        // Admitted work, as a registration is: an export waits for it.
        let _work = t.admit()?;
        let _serial = lock(&t.registering);
        let Some(gone) = t.remove_function(id) else {
            return Err(ExecError::FunctionNotFound(id.to_string()));
        };
        self.store.remove(tenant, id);
        if let Some(sha) = gone.assets.sha256() {
            self.forget_unused_assets(&t, sha);
        }
        self.release_modules(std::slice::from_ref(&gone));
        t.jobs()
            .fail_pending_of(id, &ExecError::FunctionNotFound(id.to_string()).to_api());
        Ok(())
    }

    /// Runs one invocation of `target` with `body`, waiting in the
    /// function's bounded queue if all its instances are busy, and encodes
    /// the result with `encode` on the same thread. A queued invocation
    /// runs on the thread of the first slot to come free
    /// ([`Pool::submit`]); one still queued at the function's deadline is
    /// given up (`capacity_exhausted`).
    pub async fn invoke<T, E>(
        &self,
        target: &Target,
        body: RequestBody,
        encode: E,
    ) -> Result<T, ExecError>
    where
        T: Send + 'static,
        E: FnOnce(Response, &dyn Backend) -> Result<T, ExecError> + Send + 'static,
    {
        // Dropped with this future: when the client goes away before the
        // answer, the guest sees it (`cancelled`).
        let gone = ClientGone::default();
        self.invoke_linked(target, body, gone.flag(), None, encode)
            .await
    }

    /// [`invoke`](Self::invoke) whose client is gone once `cancel` is set,
    /// and whose chunks go to `stream` (a streamed invocation).
    pub async fn invoke_linked<T, E>(
        &self,
        target: &Target,
        body: RequestBody,
        cancel: Arc<AtomicBool>,
        stream: Option<Arc<crate::stream::Sink>>,
        encode: E,
    ) -> Result<T, ExecError>
    where
        T: Send + 'static,
        E: FnOnce(Response, &dyn Backend) -> Result<T, ExecError> + Send + 'static,
    {
        let admitted = target.tenant.admit()?;
        let f = &target.function;
        let journal = self.invocation_journal(target);
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let held = Held {
            cancel: Some(cancel),
            stream,
            ..Held::new(target, journal.clone())
        };
        let ticket = f.pool.submit(
            &f.info.id,
            Box::new(move |slot: &Slot| {
                let _ = tx.send(held.run(slot, body, encode));
            }),
        )?;
        let ran = match tokio::time::timeout(f.deadline(), &mut rx).await {
            Ok(ran) => ran,
            Err(_) if ticket.cancel() => {
                return Err(ExecError::Capacity(format!(
                    "no instance of function {} came free within its deadline",
                    f.info.id
                )));
            }
            // Taken meanwhile: it runs, within its own deadline.
            Err(_) => (&mut rx).await,
        };
        let ran = ran.map_err(|_| ExecError::Internal("the invocation's runner went".into()));
        let result = Self::settle(target, journal, ran.and_then(|r| r)).await;
        drop(admitted);
        result
    }

    /// The journal a `strict` or `periodic` invocation of `target` writes
    /// to.
    fn invocation_journal(&self, target: &Target) -> Option<Arc<crate::durable::Journal>> {
        crate::durable::journaled(target.function.config.durability)
            .then(|| self.journal(&target.tenant))
    }

    /// Runs an admitted invocation of `target` on the instance slot `slot`:
    /// one blocking hop that does what [`Held::run`] does, then gives the
    /// slot up; a `strict` answer then waits as [`settle`](Self::settle)
    /// says.
    pub(crate) async fn run<T, E>(
        &self,
        target: &Target,
        slot: Slot,
        admitted: Inflight,
        body: RequestBody,
        encode: E,
    ) -> Result<T, ExecError>
    where
        T: Send + 'static,
        E: FnOnce(Response, &dyn Backend) -> Result<T, ExecError> + Send + 'static,
    {
        let journal = self.invocation_journal(target);
        let held = Held::new(target, journal.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        crate::state::cpu::spawn_guest(move || {
            let _ = tx.send(held.run(&slot, body, encode));
        });
        let ran = rx
            .await
            .map_err(|_| ExecError::Internal("the invocation's thread went".into()))
            .and_then(|r| r);
        let result = Self::settle(target, journal, ran).await;
        drop(admitted);
        result
    }

    /// A `strict` function's answer waits, off the blocking pool, until a
    /// synced checkpoint frame holds what the call did
    /// ([`crate::durable`]); one sync answers every call it covers.
    async fn settle<T>(
        target: &Target,
        journal: Option<Arc<crate::durable::Journal>>,
        ran: Result<(T, Option<Strict>), ExecError>,
    ) -> Result<T, ExecError> {
        let (out, frame) = ran?;
        match (&journal, frame) {
            (Some(j), Some(Strict::Frame(n))) => j.durable(n?).await?,
            (Some(j), Some(Strict::Later(shared, count))) => {
                j.covered(&target.function, &shared, count).await?
            }
            _ => {}
        }
        Ok(out)
    }

    /// Registers every function persisted under the state directory.
    /// Returns how many came back; failures are logged and skipped.
    pub fn load_persisted(&self) -> usize {
        let mut loaded = 0;
        for (tenant, p) in self.store.load_all() {
            // Functions that came back warm are registered already.
            if self.function(&tenant, &p.info.id).is_ok() {
                loaded += 1;
                continue;
            }
            let id = p.info.id.clone();
            // An older layout kept the assets beside the module: they move
            // to the store, and the function is written again without them.
            let (assets, rewrite) = match (&p.info.assets_sha256, &p.legacy_assets) {
                (Some(sha), _) => (Some(AssetSource::Stored(sha.clone())), false),
                (None, Some(bytes)) => match self.asset_store.stage_bytes(tenant.as_str(), bytes) {
                    Ok(staged) => (Some(AssetSource::Staged(staged)), true),
                    Err(e) => {
                        tracing::error!(%tenant, function = %id, error = %e, "cannot restore function");
                        continue;
                    }
                },
                (None, None) => (None, false),
            };
            let reg = Registration {
                name: p.info.name.clone(),
                wasm: p.wasm,
                assets,
                config: p.info.config.clone(),
                replace: true,
            };
            match self.register_inner(&tenant, reg, Some(p.info), rewrite) {
                Ok(_) => loaded += 1,
                Err(e) => {
                    tracing::error!(%tenant, function = %id, error = %e, "cannot restore function")
                }
            }
        }
        // Files no function uses (a registration cut short, a delete whose
        // removal failed) and uploads left half-way go.
        for t in self.tenant_list() {
            let keep = t.asset_files();
            let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
            self.asset_store.retain(t.id.as_str(), &keep);
        }
        self.asset_store.retain_tenants(
            &self
                .tenant_ids()
                .iter()
                .map(|t| t.as_str())
                .collect::<Vec<_>>(),
        );
        loaded
    }
}
