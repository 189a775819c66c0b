//! A function's warm instances: the one owner of its instance slots, its
//! idle instances and the tenant-wide instance count they hold.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ExecError;
use crate::instance::{InstanceShared, InvokeError, WarmInstance};
use crate::sync::lock;

/// How many warm instances a tenant has. Only an [`InstanceClaim`] moves
/// it, so it always equals the number of claims alive.
#[derive(Debug, Default)]
pub struct InstanceCount(AtomicUsize);

impl InstanceCount {
    /// Instances alive now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// One more instance, unless `max` are alive already.
    fn try_claim(self: &Arc<Self>, max: usize) -> Option<InstanceClaim> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InstanceClaim(self.clone()))
    }

    /// One more instance whatever the quota: for instances a snapshot
    /// brings, which were within a quota where they were made.
    fn claim(self: &Arc<Self>) -> InstanceClaim {
        self.0.fetch_add(1, Ordering::AcqRel);
        InstanceClaim(self.clone())
    }
}

/// One instance's place in its tenant's [`InstanceCount`], given back on
/// drop.
#[derive(Debug)]
pub struct InstanceClaim(Arc<InstanceCount>);

impl Drop for InstanceClaim {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A warm instance with its claim: dropping it (a trap, a purge) gives its
/// place in the count back.
pub struct PooledInstance {
    pub inst: WarmInstance,
    _claim: InstanceClaim,
}

impl std::fmt::Debug for PooledInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledInstance").finish_non_exhaustive()
    }
}

/// How a caller waits for a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Synchronous invocations: at most `max_waiting` wait, each at most
    /// the function's deadline; past either, `capacity_exhausted`.
    Queued,
    /// Jobs: wait as long as it takes, bounded by the pending-job quota
    /// instead.
    Unbounded,
}

/// The right to run one instance of a function, held for the run.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

/// A function's instance slots and idle instances.
pub struct Pool {
    idle: std::sync::Mutex<Vec<PooledInstance>>,
    /// Every instance of the function alive now, idle or running, as others
    /// may see it (a migration reads them while they run).
    live: std::sync::Mutex<Vec<Weak<InstanceShared>>>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// The tenant's count, shared by all its functions' pools.
    instances: Arc<InstanceCount>,
    /// The most instances the tenant may have (its quota).
    max_tenant_instances: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &lock(&self.idle).len())
            .field("free_slots", &self.slots.available_permits())
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of `max_instances` slots, with at most `max_waiting`
    /// synchronous callers waiting, counting into `instances`.
    pub fn new(
        max_instances: usize,
        max_waiting: usize,
        instances: Arc<InstanceCount>,
        max_tenant_instances: usize,
    ) -> Pool {
        Pool {
            idle: std::sync::Mutex::new(Vec::new()),
            live: std::sync::Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_instances)),
            waiting: AtomicUsize::new(0),
            max_waiting,
            instances,
            max_tenant_instances,
        }
    }

    /// A slot, waiting as `wait` says. `function` and `deadline` name the
    /// function in errors and cap a queued wait.
    pub async fn acquire(
        &self,
        wait: Wait,
        function: &str,
        deadline: Duration,
    ) -> Result<Slot, ExecError> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(Slot(p));
        }
        if wait == Wait::Unbounded {
            return self
                .slots
                .clone()
                .acquire_owned()
                .await
                .map(Slot)
                .map_err(|_| ExecError::Internal("instance pool closed".into()));
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(ExecError::Capacity(format!(
                "function {function} has {} invocations waiting already",
                self.max_waiting
            )));
        }
        let waited = tokio::time::timeout(deadline, self.slots.clone().acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(Ok(p)) => Ok(Slot(p)),
            _ => Err(ExecError::Capacity(format!(
                "no instance of function {function} came free within its deadline"
            ))),
        }
    }

    /// Synchronous callers waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// An idle instance, or a new one from `create` within the tenant's
    /// quota. The caller holds a [`Slot`]; blocking (instantiation runs
    /// the guest's `init`).
    pub fn checkout(
        &self,
        _slot: &Slot,
        create: impl FnOnce() -> Result<WarmInstance, InvokeError>,
    ) -> Result<PooledInstance, ExecError> {
        if let Some(p) = lock(&self.idle).pop() {
            return Ok(p);
        }
        let claim = self
            .instances
            .try_claim(self.max_tenant_instances)
            .ok_or_else(|| {
                ExecError::Quota(format!(
                    "the tenant already has {} warm instances",
                    self.max_tenant_instances
                ))
            })?;
        let inst = create().map_err(ExecError::Invoke)?;
        self.track(&inst);
        Ok(PooledInstance {
            inst,
            _claim: claim,
        })
    }

    /// Puts an instance back after a run.
    pub fn checkin(&self, p: PooledInstance) {
        lock(&self.idle).push(p);
    }

    /// Takes the idle instance `id` out of the pool, if it is idle; the
    /// caller holds a [`Slot`] and checks it back in.
    pub fn take_idle(&self, _slot: &Slot, id: u64) -> Option<PooledInstance> {
        let mut idle = lock(&self.idle);
        let at = idle.iter().position(|p| p.inst.shared().id == id)?;
        Some(idle.swap_remove(at))
    }

    /// Adds an instance restored from a snapshot.
    pub fn adopt(&self, inst: WarmInstance) {
        self.track(&inst);
        let claim = self.instances.claim();
        lock(&self.idle).push(PooledInstance {
            inst,
            _claim: claim,
        });
    }

    fn track(&self, inst: &WarmInstance) {
        let mut live = lock(&self.live);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(inst.shared()));
    }

    /// Every instance alive now, idle or running, by id.
    pub fn live(&self) -> Vec<Arc<InstanceShared>> {
        let mut v: Vec<Arc<InstanceShared>> =
            lock(&self.live).iter().filter_map(Weak::upgrade).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Runs `f` over the idle instances, the lock held: for an export,
    /// when the tenant is frozen and drained, so every instance is idle.
    pub fn with_idle<R>(&self, f: impl FnOnce(&mut [PooledInstance]) -> R) -> R {
        f(&mut lock(&self.idle))
    }
}
