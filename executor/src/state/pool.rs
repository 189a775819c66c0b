//! A function's warm instances: the one owner of its instance slots, its
//! idle instances and the tenant-wide instance count they hold.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

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

/// The right to run one instance of a function, held for the run. One
/// given up while invocations are queued goes on to run them
/// ([`Pool::submit`]), unless a caller waits for a slot of its own.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    slots: Arc<Slots>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.slots.release(permit);
        }
    }
}

/// A queued invocation's state: whoever moves it out of `QUEUED` first
/// (a holder of a slot, to run it; its caller, giving up) owns it.
const QUEUED: u8 = 0;
const RUNNING: u8 = 1;
const CANCELLED: u8 = 2;

/// What runs a queued invocation, on the thread of the slot that takes it.
pub type QueuedRun = Box<dyn FnOnce(&Slot) + Send>;

/// A synchronous invocation waiting for a slot.
struct Queued {
    state: Arc<AtomicU8>,
    run: QueuedRun,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// A function's slots and the invocations queued for them. Queued
/// invocations do not wait on the semaphore: a slot that comes free runs
/// them one after another on its own thread, so that a busy function's
/// next call starts without a hop through the async runtime
/// (`ARCHITECTURE.md`, "Executor").
#[derive(Debug)]
struct Slots {
    sem: Arc<Semaphore>,
    queue: std::sync::Mutex<VecDeque<Queued>>,
    /// Queued invocations not yet taken or given up.
    waiting: AtomicUsize,
    /// Callers waiting on the semaphore itself (jobs, checkpoints): a
    /// slot that comes free goes to them before the queue, so that a
    /// queue that never empties does not starve them.
    others: AtomicUsize,
}

impl Slots {
    /// Gives `permit` up: to a runner of the queue, if invocations wait
    /// and no other caller does; to the semaphore otherwise. Under the
    /// queue's lock, so that a caller queuing meanwhile either finds the
    /// permit free or is found.
    fn release(self: &Arc<Self>, permit: OwnedSemaphorePermit) {
        let queue = lock(&self.queue);
        if !queue.is_empty() && self.others.load(Ordering::Acquire) == 0 {
            drop(queue);
            self.clone().spawn_runner(permit, None);
        } else {
            drop(permit);
        }
    }

    /// Runs `first`, then the queue, on a guest thread holding `permit`.
    fn spawn_runner(self: Arc<Self>, permit: OwnedSemaphorePermit, first: Option<QueuedRun>) {
        let run = move || {
            let mut slot = Slot {
                permit: Some(permit),
                slots: self.clone(),
            };
            if let Some(first) = first {
                first(&slot);
            }
            while let Some(next) = self.next_or_release(&mut slot) {
                (next.run)(&slot);
            }
        };
        super::cpu::spawn_guest(run);
    }

    /// The next queued invocation for `slot`'s holder to run, or none,
    /// the slot then given up (to the semaphore: other callers wait, or
    /// the queue is empty).
    fn next_or_release(&self, slot: &mut Slot) -> Option<Queued> {
        let mut queue = lock(&self.queue);
        while self.others.load(Ordering::Acquire) == 0 {
            let Some(q) = queue.pop_front() else { break };
            if q.state
                .compare_exchange(QUEUED, RUNNING, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                return Some(q);
            }
        }
        drop(slot.permit.take());
        None
    }

    /// Starts a runner if invocations are queued and a slot is free: after
    /// a caller of the semaphore went without taking the slot it was
    /// given one for.
    fn kick(self: &Arc<Self>) {
        let queue = lock(&self.queue);
        if queue.is_empty() {
            return;
        }
        if let Ok(permit) = self.sem.clone().try_acquire_owned() {
            drop(queue);
            self.clone().spawn_runner(permit, None);
        }
    }
}

/// A caller waiting on the semaphore, counted in [`Slots::others`] for as
/// long as it waits.
struct Other<'a>(&'a Arc<Slots>);

impl Drop for Other<'_> {
    fn drop(&mut self) {
        self.0.others.fetch_sub(1, Ordering::AcqRel);
        self.0.kick();
    }
}

/// A queued invocation's claim, from its caller's side: dropped before
/// the invocation was taken, it gives its place in the queue up.
#[derive(Debug)]
pub struct Ticket {
    state: Arc<AtomicU8>,
    slots: Arc<Slots>,
}

impl Ticket {
    /// Gives the place up, unless a slot took the invocation already.
    /// True when given up: the invocation will not run.
    pub fn cancel(&self) -> bool {
        let given_up = self
            .state
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if given_up {
            self.slots.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        given_up
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A function's instance slots and idle instances.
pub struct Pool {
    idle: std::sync::Mutex<Vec<PooledInstance>>,
    /// Every instance of the function alive now, idle or running, as others
    /// may see it (a migration reads them while they run).
    live: std::sync::Mutex<Vec<Weak<InstanceShared>>>,
    slots: Arc<Slots>,
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
            .field("free_slots", &self.slots.sem.available_permits())
            .field("waiting", &self.waiting())
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
            slots: Arc::new(Slots {
                sem: Arc::new(Semaphore::new(max_instances)),
                queue: std::sync::Mutex::new(VecDeque::new()),
                waiting: AtomicUsize::new(0),
                others: AtomicUsize::new(0),
            }),
            max_waiting,
            instances,
            max_tenant_instances,
        }
    }

    /// A slot for a caller that is not a synchronous invocation (a job, a
    /// checkpoint), waiting as long as it takes: slots that come free go
    /// to such callers before the queue of invocations.
    pub async fn acquire(&self) -> Result<Slot, ExecError> {
        let slots = &self.slots;
        let permit = match slots.sem.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                slots.others.fetch_add(1, Ordering::AcqRel);
                let _other = Other(slots);
                slots
                    .sem
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| ExecError::Internal("instance pool closed".into()))?
            }
        };
        Ok(Slot {
            permit: Some(permit),
            slots: slots.clone(),
        })
    }

    /// Runs `run` on a slot: now, on a blocking thread, if one is free;
    /// otherwise queued (at most `max_waiting` invocations wait), on the
    /// thread of the first slot to come free. `function` names the
    /// function in errors. The caller waits for what `run` sends and
    /// drops the ticket (or [`cancel`](Ticket::cancel)s it) to give up
    /// before it runs.
    pub fn submit(&self, function: &str, run: QueuedRun) -> Result<Ticket, ExecError> {
        let slots = &self.slots;
        let state = Arc::new(AtomicU8::new(QUEUED));
        let ticket = Ticket {
            state: state.clone(),
            slots: slots.clone(),
        };
        let mut queue = lock(&slots.queue);
        if queue.is_empty()
            && let Ok(permit) = slots.sem.clone().try_acquire_owned()
        {
            drop(queue);
            state.store(RUNNING, Ordering::Release);
            slots.clone().spawn_runner(permit, Some(run));
            return Ok(ticket);
        }
        if slots.waiting.load(Ordering::Acquire) >= self.max_waiting {
            state.store(CANCELLED, Ordering::Release);
            return Err(ExecError::Capacity(format!(
                "function {function} has {} invocations waiting already",
                self.max_waiting
            )));
        }
        slots.waiting.fetch_add(1, Ordering::AcqRel);
        queue.push_back(Queued { state, run });
        Ok(ticket)
    }

    /// Synchronous callers waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.slots.waiting.load(Ordering::Acquire)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    fn pool(slots: usize, waiting: usize) -> Pool {
        Pool::new(slots, waiting, Arc::new(InstanceCount::default()), 8)
    }

    /// Queues `n` on `p`, recording it in `ran` when it runs; returns its
    /// ticket and what it sends once run.
    fn submit(
        p: &Pool,
        ran: &Arc<Mutex<Vec<u32>>>,
        n: u32,
    ) -> Result<(Ticket, oneshot::Receiver<()>), ExecError> {
        let (tx, rx) = oneshot::channel();
        let ran = ran.clone();
        let ticket = p.submit(
            "f",
            Box::new(move |_slot: &Slot| {
                lock(&ran).push(n);
                let _ = tx.send(());
            }),
        )?;
        Ok((ticket, rx))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_invocations_run_in_order_on_the_slot_that_comes_free() {
        let p = pool(1, 8);
        let ran = Arc::new(Mutex::new(Vec::new()));
        let held = p.acquire().await.unwrap();
        let mut waits = Vec::new();
        for n in 0..5 {
            waits.push(submit(&p, &ran, n).unwrap());
        }
        assert_eq!(p.waiting(), 5);
        assert!(lock(&ran).is_empty(), "nothing runs while the slot is held");
        drop(held);
        for (_ticket, rx) in waits {
            rx.await.unwrap();
        }
        assert_eq!(*lock(&ran), vec![0, 1, 2, 3, 4]);
        assert_eq!(p.waiting(), 0);
        // The next runs at once, and the slot is given up after it (its
        // runner's thread gives it up just after it answers).
        let (_t, rx) = submit(&p, &ran, 5).unwrap();
        rx.await.unwrap();
        let given_up = async {
            while p.slots.sem.available_permits() != 1 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), given_up)
            .await
            .expect("the slot was given up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_refuses_and_a_given_up_place_never_runs() {
        let p = pool(1, 2);
        let ran = Arc::new(Mutex::new(Vec::new()));
        let held = p.acquire().await.unwrap();
        let (gone, _) = submit(&p, &ran, 0).unwrap();
        let (_kept, kept_rx) = submit(&p, &ran, 1).unwrap();
        let full = submit(&p, &ran, 2).err().unwrap();
        assert!(matches!(full, ExecError::Capacity(_)), "{full}");
        drop(gone);
        assert_eq!(p.waiting(), 1);
        drop(held);
        kept_rx.await.unwrap();
        assert_eq!(*lock(&ran), vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_of_the_semaphore_gets_the_slot_before_the_queue() {
        let p = Arc::new(pool(1, 8));
        let ran = Arc::new(Mutex::new(Vec::new()));
        let held = p.acquire().await.unwrap();
        let (_t0, rx0) = submit(&p, &ran, 0).unwrap();
        let (_t1, rx1) = submit(&p, &ran, 1).unwrap();
        let (p2, ran2) = (p.clone(), ran.clone());
        let other = tokio::spawn(async move {
            let slot = p2.acquire().await.unwrap();
            lock(&ran2).push(100);
            drop(slot);
        });
        while p.slots.others.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        other.await.unwrap();
        rx0.await.unwrap();
        rx1.await.unwrap();
        assert_eq!(*lock(&ran), vec![100, 0, 1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_runs_when_a_caller_of_the_semaphore_gives_up() {
        let p = Arc::new(pool(1, 8));
        let ran = Arc::new(Mutex::new(Vec::new()));
        let held = p.acquire().await.unwrap();
        let (_t0, rx0) = submit(&p, &ran, 0).unwrap();
        let p2 = p.clone();
        let other = tokio::spawn(async move { p2.acquire().await.map(drop) });
        while p.slots.others.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // The slot goes to the semaphore, for the other caller, which
        // gives up (most likely before it takes it): the queue runs anyway.
        drop(held);
        other.abort();
        let _ = other.await;
        tokio::time::timeout(std::time::Duration::from_secs(10), rx0)
            .await
            .expect("the queued invocation ran")
            .unwrap();
        assert_eq!(*lock(&ran), vec![0]);
    }
}
