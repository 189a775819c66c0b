//! Each tenant's use of the cores, and which of its invocations run in the
//! background (`SECURITY.md`, "Tenants and each other").
//!
//! A tenant's use is the time its guests ran (invocations and jobs, from
//! the start of the guest to its end, less what a streaming guest waited
//! for a slow client), decayed with a one-second time
//! constant, plus the time so far of those running now: about the cores it
//! has kept busy lately. Its fair share is the executor's cores times its
//! weight over the weights of every tenant that used the cores lately
//! (weights are the operator's, 1 by default). A tenant over its share
//! runs its next invocations on background threads
//! ([`tensor_wasm_kernels::threads`]), which the kernel schedules only
//! when no other thread wants a core: a tenant within its share is then
//! never kept waiting by one over it, and one over it still gets every
//! core that nobody else wants.
//!
//! Every guest runs on one of [`spawn_guest`]'s threads; one over its
//! share makes its thread a background one, which then ends with its job,
//! so that no other work ever runs on it. When a
//! tenant within its share starts a guest, the guests already running of
//! tenants now over theirs are moved to the background where they are
//! (their threads made `SCHED_IDLE`), so that a tenant that arrives does
//! not wait for another's long invocations, started while it was away, to
//! end. Such a thread cannot be brought back (it takes a privilege): it
//! ends with its guest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tensor_wasm_shared::TenantId;

use crate::sync::lock;

/// How fast past use is forgotten: e^-1 of it per second.
const TAU: f64 = 1.0;

/// Tenants using less than this many cores do not count as active: they
/// take no share from the others.
const ACTIVE: f64 = 0.02;

/// How long the sum of active weights is reused before it is counted
/// again.
const RECOUNT: Duration = Duration::from_millis(50);

/// The executor's cores and its tenants' use of them.
#[derive(Debug)]
pub struct CpuShares {
    cores: f64,
    weights: HashMap<TenantId, f64>,
    origin: Instant,
    tenants: Mutex<Vec<Weak<TenantCpu>>>,
    /// The weights of the tenants active at the last count (f64 bits), and
    /// when that was (ns after `origin`).
    active_weight: AtomicU64,
    counted_at: AtomicU64,
    /// When guests over their share were last looked for (ns after
    /// `origin`).
    demoted_at: AtomicU64,
    started: prometheus::IntCounter,
    moved: prometheus::IntCounter,
}

impl CpuShares {
    /// `cores` to share; `weights` the operator's, by tenant; `counted`
    /// the counters of guests started in the background and of those
    /// moved there while they ran.
    pub fn new(
        cores: usize,
        weights: HashMap<TenantId, u32>,
        counted: [prometheus::IntCounter; 2],
    ) -> Arc<CpuShares> {
        let [started, moved] = counted;
        Arc::new(CpuShares {
            started,
            moved,
            cores: cores.max(1) as f64,
            weights: weights
                .into_iter()
                .map(|(t, w)| (t, f64::from(w.max(1))))
                .collect(),
            origin: Instant::now(),
            tenants: Mutex::new(Vec::new()),
            active_weight: AtomicU64::new(0f64.to_bits()),
            counted_at: AtomicU64::new(u64::MAX),
            demoted_at: AtomicU64::new(u64::MAX),
        })
    }

    /// The account of a new tenant.
    pub fn tenant(self: &Arc<Self>, id: &TenantId) -> Arc<TenantCpu> {
        let t = Arc::new(TenantCpu {
            id: id.clone(),
            logged_at: AtomicU64::new(0),
            shares: self.clone(),
            weight: self.weights.get(id).copied().unwrap_or(1.0),
            running: AtomicU64::new(0),
            started_sum: AtomicU64::new(0),
            done: AtomicU64::new(0),
            decayed: AtomicU64::new(0f64.to_bits()),
            sampled_at: AtomicU64::new(self.nanos(Instant::now())),
            sampled_done: AtomicU64::new(0),
            decided_until: AtomicU64::new(0),
        });
        let mut all = lock(&self.tenants);
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&t));
        t
    }

    /// Moves to the background the guests running on normal threads of
    /// tenants over their share, counting `caller` (about to run a guest
    /// within its share) as active. At most every [`RECOUNT`].
    fn demote_over_share(&self, now: Instant, caller: &TenantCpu) {
        let ns = self.nanos(now);
        let at = self.demoted_at.load(Ordering::Acquire);
        if at != u64::MAX && ns.saturating_sub(at) < RECOUNT.as_nanos() as u64 {
            return;
        }
        if self
            .demoted_at
            .compare_exchange(at, ns, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return; // another caller looks now
        }
        let tenants: Vec<Arc<TenantCpu>> = lock(&self.tenants)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let used: Vec<f64> = tenants.iter().map(|t| t.cores(now)).collect();
        let mut total: f64 = tenants
            .iter()
            .zip(&used)
            .filter(|(_, c)| **c > ACTIVE)
            .map(|(t, _)| t.weight)
            .sum();
        if caller.cores(now) <= ACTIVE {
            total += caller.weight;
        }
        let over: Vec<usize> = tenants
            .iter()
            .zip(used)
            .filter(|(t, used)| {
                !std::ptr::eq(Arc::as_ptr(t), caller)
                    && *used > self.cores * t.weight / total.max(t.weight)
            })
            .map(|(t, _)| Arc::as_ptr(t) as usize)
            .collect();
        if over.is_empty() {
            return;
        }
        for slot in lock(&GUESTS).iter() {
            if over.contains(&slot.tenant.load(Ordering::Acquire))
                && !slot.demoted.swap(true, Ordering::AcqRel)
            {
                crate::sys::idle_thread(slot.tid);
                self.moved.inc();
            }
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The weights of the tenants active now, counted at most every
    /// [`RECOUNT`].
    fn active_weight(&self, now: Instant) -> f64 {
        let ns = self.nanos(now);
        let at = self.counted_at.load(Ordering::Acquire);
        if at != u64::MAX && ns.saturating_sub(at) < RECOUNT.as_nanos() as u64 {
            return f64::from_bits(self.active_weight.load(Ordering::Acquire));
        }
        let sum: f64 = lock(&self.tenants)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|t| t.cores(now) > ACTIVE)
            .map(|t| t.weight)
            .sum();
        self.active_weight.store(sum.to_bits(), Ordering::Release);
        self.counted_at.store(ns, Ordering::Release);
        sum
    }
}

/// One tenant's account. Lock-free: every guest's start and end touch it.
#[derive(Debug)]
pub struct TenantCpu {
    id: TenantId,
    /// When a change of its standing was last logged (ns).
    logged_at: AtomicU64,
    shares: Arc<CpuShares>,
    weight: f64,
    /// Guests running now, and the sum of their starts (ns after the
    /// shares' origin).
    running: AtomicU64,
    started_sum: AtomicU64,
    /// Busy ns of the guests that ended, in all.
    done: AtomicU64,
    /// Busy seconds decayed to the last sample (f64 bits), when that was
    /// (ns), and `done` then.
    decayed: AtomicU64,
    sampled_at: AtomicU64,
    sampled_done: AtomicU64,
    /// Until when (ns, shifted left by one) the last answer of
    /// [`over_share`](Self::over_share) holds, and that answer (the low
    /// bit).
    decided_until: AtomicU64,
}

/// How long an answer of [`TenantCpu::over_share`] is reused.
const DECIDE_NS: u64 = 1_000_000;

/// How often a tenant's decayed use is brought up to date.
const SAMPLE_NS: u64 = 10_000_000;

impl TenantCpu {
    /// About how many cores the tenant kept busy lately.
    pub fn cores(&self, now: Instant) -> f64 {
        let ns = self.shares.nanos(now);
        let at = self.sampled_at.load(Ordering::Acquire);
        let done = self.done.load(Ordering::Acquire);
        let fresh = done.saturating_sub(self.sampled_done.load(Ordering::Acquire));
        let decay = (-(ns.saturating_sub(at) as f64) / 1e9 / TAU).exp();
        let base =
            f64::from_bits(self.decayed.load(Ordering::Acquire)) * decay + fresh as f64 / 1e9;
        if ns.saturating_sub(at) >= SAMPLE_NS
            && self
                .sampled_at
                .compare_exchange(at, ns, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.decayed.store(base.to_bits(), Ordering::Release);
            self.sampled_done.store(done, Ordering::Release);
        }
        let running = self.running.load(Ordering::Acquire);
        let started = self.started_sum.load(Ordering::Acquire);
        let inflight = (u128::from(running) * u128::from(ns)).saturating_sub(u128::from(started));
        (base + inflight as f64 / 1e9) / TAU
    }

    /// Its share of the cores now.
    pub fn fair_cores(&self, now: Instant) -> f64 {
        self.fair_given(now, self.cores(now))
    }

    /// Its share of the cores now, when it uses `used`.
    fn fair_given(&self, now: Instant, used: f64) -> f64 {
        let others = self.shares.active_weight(now);
        // It counts itself in even before it is active.
        let total = if used > ACTIVE {
            others
        } else {
            others + self.weight
        };
        self.shares.cores * self.weight / total.max(self.weight)
    }

    /// Whether its next guest runs in the background: it is over its
    /// share (counted in `background_guests_total{how="started"}`: call
    /// it once per guest). One within it first moves other tenants' guests
    /// over theirs to the background.
    pub fn over_share(&self) -> bool {
        let now = Instant::now();
        let ns = self.shares.nanos(now);
        let until = self.decided_until.load(Ordering::Acquire);
        if ns < until >> 1 {
            let over = until & 1 == 1;
            if over {
                self.shares.started.inc();
            }
            return over;
        }
        let used = self.cores(now);
        let fair = self.fair_given(now, used);
        let over = used > fair;
        let before = self.decided_until.swap(
            (ns.saturating_add(DECIDE_NS) << 1) | u64::from(over),
            Ordering::AcqRel,
        );
        // A change of standing, at most once a second per tenant.
        let last = self.logged_at.load(Ordering::Acquire);
        if (before & 1 == 1) != over
            && ns.saturating_sub(last) >= 1_000_000_000
            && self
                .logged_at
                .compare_exchange(last, ns, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            if over {
                tracing::info!(tenant = %self.id, cores = used, share = fair, "tenant over its share of the cores: its guests run in the background");
            } else {
                tracing::info!(tenant = %self.id, cores = used, share = fair, "tenant within its share of the cores again");
            }
        }
        if over {
            self.shares.started.inc();
        } else {
            self.shares.demote_over_share(now, self);
        }
        over
    }

    /// Counts a guest running on this thread from now until the guard
    /// drops. On a thread of [`spawn_guest`], the guest may be moved to the
    /// background meanwhile; the thread then ends once its job does.
    pub fn busy(self: &Arc<Self>) -> Busy {
        WAITED.with(|w| w.set(0));
        let since = Instant::now();
        let start = self.shares.nanos(since);
        self.started_sum.fetch_add(start, Ordering::AcqRel);
        self.running.fetch_add(1, Ordering::AcqRel);
        // A background thread has nowhere lower to go.
        let slot = SLOT
            .with(|s| s.get().cloned())
            .filter(|_| !tensor_wasm_kernels::threads::is_background());
        if let Some(slot) = &slot {
            slot.tenant
                .store(Arc::as_ptr(self) as usize, Ordering::Release);
        }
        Busy {
            cpu: self.clone(),
            start,
            since,
            slot,
        }
    }
}

/// A guest running; its time is counted when this drops.
#[derive(Debug)]
pub struct Busy {
    cpu: Arc<TenantCpu>,
    start: u64,
    since: Instant,
    slot: Option<Arc<GuestSlot>>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.tenant.store(0, Ordering::Release);
            if slot.demoted.load(Ordering::Acquire) {
                // For good: `spawn_guest` ends the thread after this.
                tensor_wasm_kernels::threads::enter_background();
            }
        }
        let took = u64::try_from(self.since.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_sub(WAITED.with(|w| w.replace(0)));
        let c = &self.cpu;
        c.done.fetch_add(took, Ordering::AcqRel);
        c.running.fetch_sub(1, Ordering::AcqRel);
        c.started_sum.fetch_sub(self.start, Ordering::AcqRel);
    }
}

/// A thread of [`spawn_guest`]: whose guest it runs now, so that it can be
/// moved to the background.
#[derive(Debug)]
struct GuestSlot {
    tid: libc::pid_t,
    /// The running guest's tenant (the address of its account), or 0.
    tenant: AtomicUsize,
    /// The thread was made `SCHED_IDLE`.
    demoted: AtomicBool,
}

/// Every guest thread alive.
static GUESTS: Mutex<Vec<Arc<GuestSlot>>> = Mutex::new(Vec::new());

thread_local! {
    /// How long the guest running on this thread has waited for its
    /// client (a stream's back-pressure), in ns: time that uses no core.
    static WAITED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts `d` of the guest running on this thread as waiting for its
/// client rather than using a core: a stream whose client reads slowly
/// does not put its tenant over its share.
pub fn waited(d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    WAITED.with(|w| w.set(w.get().saturating_add(ns)));
}

thread_local! {
    /// This thread's slot, if it is a guest thread.
    static SLOT: std::cell::OnceCell<Arc<GuestSlot>> = const { std::cell::OnceCell::new() };
}

/// Stack of a guest's thread: as much as the async runtime's blocking
/// threads have.
const GUEST_STACK: usize = 2 << 20;

/// How long a guest thread waits for more work before it ends.
const GUEST_IDLE: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// Guest threads waiting for work, newest last.
static IDLE: Mutex<Vec<std::sync::mpsc::Sender<Job>>> = Mutex::new(Vec::new());

/// Runs `job` on a guest thread: an idle one, or a new one. A thread whose
/// guest was moved to the background ends after its job instead of
/// taking another (module doc); an idle one ends after [`GUEST_IDLE`].
pub fn spawn_guest(job: impl FnOnce() + Send + 'static) {
    // In the caller's async runtime, as a blocking task would be.
    let runtime = tokio::runtime::Handle::try_current().ok();
    let mut job: Job = Box::new(move || {
        let _in = runtime.as_ref().map(|r| r.enter());
        job()
    });
    loop {
        let Some(tx) = lock(&IDLE).pop() else { break };
        match tx.send(job) {
            Ok(()) => return,
            // It ended meanwhile.
            Err(std::sync::mpsc::SendError(back)) => job = back,
        }
    }
    let started = std::thread::Builder::new()
        .name("tw-guest".into())
        .stack_size(GUEST_STACK)
        .spawn(move || guest_thread(job));
    if let Err(e) = started {
        // Without a thread the job cannot run; its caller sees its
        // channel close.
        tracing::error!(error = %e, "cannot start a guest thread");
    }
}

/// Makes this thread a background one for the guest about to run on it,
/// if it is a guest thread ([`spawn_guest`], which ends it after its job).
/// Any other thread is shared with other work and stays as it is.
pub fn enter_background() {
    if SLOT.with(|s| s.get().is_some()) {
        tensor_wasm_kernels::threads::enter_background();
    }
}

fn guest_thread(first: Job) {
    let slot = Arc::new(GuestSlot {
        tid: crate::sys::thread_id(),
        tenant: AtomicUsize::new(0),
        demoted: AtomicBool::new(false),
    });
    SLOT.with(|s| s.set(slot.clone()).ok());
    lock(&GUESTS).push(slot.clone());
    struct Gone(Arc<GuestSlot>);
    impl Drop for Gone {
        fn drop(&mut self) {
            lock(&GUESTS).retain(|s| !Arc::ptr_eq(s, &self.0));
        }
    }
    let _gone = Gone(slot);
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let mut job = first;
    loop {
        job();
        if tensor_wasm_kernels::threads::is_background() {
            return;
        }
        lock(&IDLE).push(tx.clone());
        match rx.recv_timeout(GUEST_IDLE) {
            Ok(next) => job = next,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn counter() -> [prometheus::IntCounter; 2] {
        ["started", "moved"].map(|n| prometheus::IntCounter::new(n, n).unwrap())
    }

    /// Keeps `cpu` busy `n` times for `each`, one after another, on this
    /// thread.
    fn run(cpu: &Arc<TenantCpu>, n: usize, each: Duration) {
        for _ in 0..n {
            let _b = cpu.busy();
            std::thread::sleep(each);
        }
    }

    #[test]
    fn a_tenant_over_its_share_goes_to_the_background_and_one_within_does_not() {
        let shares = CpuShares::new(2, HashMap::new(), counter());
        let a = shares.tenant(&t("a"));
        let b = shares.tenant(&t("b"));
        // Alone, a may use both cores.
        assert!(!a.over_share());
        let (a2, a3) = (a.clone(), a.clone());
        let hogs = [
            std::thread::spawn(move || run(&a2, 4, Duration::from_millis(100))),
            std::thread::spawn(move || run(&a3, 4, Duration::from_millis(100))),
        ];
        std::thread::sleep(Duration::from_millis(200));
        // About two cores busy: within a share of two while b is idle.
        assert!(a.cores(Instant::now()) > 0.2, "{}", a.cores(Instant::now()));
        assert!(!a.over_share());
        // b starts working a little: a's share is now one core, b's too.
        run(&b, 10, Duration::from_millis(5));
        std::thread::sleep(RECOUNT);
        assert!(b.cores(Instant::now()) > ACTIVE);
        assert!(b.cores(Instant::now()) < 1.0);
        assert!((a.fair_cores(Instant::now()) - 1.0).abs() < 1e-9);
        assert!(!b.over_share());
        for h in hogs {
            h.join().unwrap();
        }
        // a's use decays once it stops.
        let before = a.cores(Instant::now());
        std::thread::sleep(Duration::from_millis(300));
        assert!(a.cores(Instant::now()) < before);
    }

    #[test]
    fn weights_divide_the_cores() {
        let shares = CpuShares::new(4, HashMap::from([(t("big"), 3)]), counter());
        let big = shares.tenant(&t("big"));
        let small = shares.tenant(&t("small"));
        run(&big, 1, Duration::from_millis(60));
        run(&small, 1, Duration::from_millis(60));
        std::thread::sleep(RECOUNT);
        let now = Instant::now();
        assert!((big.fair_cores(now) - 3.0).abs() < 1e-9);
        assert!((small.fair_cores(now) - 1.0).abs() < 1e-9);
    }
}
