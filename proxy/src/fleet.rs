//! The executor set and the route of each tenant's requests.
//!
//! [`Fleet`] joins the persisted placement table with what the proxy knows
//! at run time: which executors are healthy, and, per tenant, a [`Gate`]
//! that counts requests in flight and holds new ones while the tenant
//! moves. The gate is the whole of the proxy's side of "no request fails
//! because of a migration":
//!
//! 1. A request takes a [`Lease`] on its tenant's gate *before* it looks up
//!    the executor, and holds it until its answer is written. A lease is
//!    only granted while the gate is open.
//! 2. A migration closes the gate, then waits until no lease is held: from
//!    then on no request of the tenant is anywhere but in the queue, so the
//!    executor can export a tenant that nobody is using.
//! 3. Requests that find the gate closed wait in a bounded queue (capacity
//!    and deadline from [`QueueLimits`]); when the gate opens they look the
//!    placement up again and so go wherever the tenant now lives.
//! 4. Only a request that waits past the deadline, or finds the queue full,
//!    is refused (`503 tenant_moving` with `Retry-After`).

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tensor_wasm_shared::api::ExecutorInfo;
use tensor_wasm_shared::identity;
use tensor_wasm_shared::{ApiError, ErrorCode, ExecutorId, TenantId};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::placement::{Candidate, PlacementError, PlacementStore, Placements};
use crate::upstream::{Connector, ExecutorApi, HttpConnector};

/// How often a request refused for a stale placement looks at the table
/// again while it waits for a newer one.
const STALE_POLL: Duration = Duration::from_millis(10);

/// How long and how many requests of a moving tenant may wait.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Longest a request waits for its tenant's move; 5 s covers a move of
    /// hundreds of MiB of state while staying under common client timeouts.
    pub deadline: Duration,
    /// Requests of one tenant that may wait at once; beyond it they are
    /// refused at once rather than piling up memory.
    pub capacity: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            deadline: Duration::from_secs(5),
            capacity: 1024,
        }
    }
}

/// One executor as the proxy knows it.
#[derive(Debug)]
pub struct Executor {
    pub id: ExecutorId,
    /// As registered (`host:port`).
    pub addr: String,
    /// Resolved once at registration.
    pub sock: SocketAddr,
    healthy: AtomicBool,
    /// When it last went down (a failed probe or connection); none while
    /// it answers.
    down_since: Mutex<Option<Instant>>,
    /// Woken when it answers again.
    recovered: Notify,
    /// The last `/internal/info` it gave.
    info: Mutex<Option<ExecutorInfo>>,
    /// Health probes in a row that it did not answer in time.
    slow_probes: AtomicU32,
}

/// What one health probe of an executor got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An answer in time.
    Answered,
    /// No answer in time, though the connection was taken.
    Late,
    /// No connection, or an error.
    Failed,
}

/// Health probes in a row that an executor which still takes connections
/// may leave unanswered (busy for a moment, say freeing a large tenant)
/// before it is marked down. One that refuses them is down at once.
pub const SLOW_PROBES_DOWN: u32 = 2;

impl Executor {
    fn new(id: ExecutorId, addr: &str, sock: SocketAddr) -> Executor {
        Executor {
            id,
            addr: addr.to_string(),
            sock,
            healthy: AtomicBool::new(true),
            down_since: Mutex::new(None),
            recovered: Notify::new(),
            info: Mutex::new(None),
            slow_probes: AtomicU32::new(0),
        }
    }

    /// Records a health probe's outcome: whether the executor counts as
    /// healthy now. A late probe marks it down only after
    /// [`SLOW_PROBES_DOWN`] in a row.
    pub fn probed(&self, probe: Probe) -> bool {
        match probe {
            Probe::Answered => {
                self.slow_probes.store(0, Ordering::Release);
                true
            }
            Probe::Late => {
                let slow = self.slow_probes.fetch_add(1, Ordering::AcqRel) + 1;
                self.is_healthy() && slow < SLOW_PROBES_DOWN
            }
            Probe::Failed => false,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records a probe's verdict; true when it changed.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let changed = self.healthy.swap(healthy, Ordering::AcqRel) != healthy;
        if changed {
            *lock(&self.down_since) = (!healthy).then(Instant::now);
            if healthy {
                self.recovered.notify_waiters();
            }
        }
        changed
    }

    /// Waits for the executor to answer again (a restart: `docs/API.md`,
    /// "Errors", `executor_unavailable`), while it has been down less than
    /// `window` and `until` has not passed: whether it answers. Requests
    /// arriving later than `window` after it went down are not held: an
    /// executor that does not come back costs each request one wait at
    /// most, and only in the first `window`.
    pub async fn wait_recovered(&self, window: Duration, until: Instant) -> bool {
        loop {
            let notified = self.recovered.notified();
            let mut notified = pin!(notified);
            notified.as_mut().enable();
            if self.is_healthy() {
                return true;
            }
            let Some(since) = *lock(&self.down_since) else {
                return false;
            };
            let give_up = (since + window).min(until);
            if Instant::now() >= give_up {
                return false;
            }
            if tokio::time::timeout_at(give_up, notified).await.is_err() {
                return self.is_healthy();
            }
        }
    }

    pub fn last_info(&self) -> Option<ExecutorInfo> {
        lock(&self.info).clone()
    }

    pub fn set_info(&self, info: ExecutorInfo) {
        *lock(&self.info) = Some(info);
    }
}

/// Why a request could not be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("tenant {0} is moving and the wait for it ran out")]
    MovingTooLong(String),
    #[error("too many requests of tenant {0} are waiting for its move")]
    QueueFull(String),
    #[error("executor {0} of this tenant is unavailable")]
    ExecutorDown(ExecutorId),
    #[error("executor {0} of this tenant is not registered")]
    ExecutorGone(ExecutorId),
    #[error("no healthy executor takes new tenants")]
    NoExecutor,
    #[error("placement table: {0}")]
    Placement(PlacementError),
}

impl RouteError {
    /// The public error a client gets.
    pub fn api_error(&self) -> ApiError {
        let code = match self {
            RouteError::MovingTooLong(_) | RouteError::QueueFull(_) => ErrorCode::TenantMoving,
            RouteError::ExecutorDown(_) | RouteError::ExecutorGone(_) | RouteError::NoExecutor => {
                ErrorCode::ExecutorUnavailable
            }
            RouteError::Placement(e) => e.code(),
        };
        ApiError::new(code, self.to_string())
    }
}

#[derive(Debug, Default)]
struct GateState {
    closed: bool,
    in_flight: usize,
    waiting: usize,
}

/// One request waiting at a closed gate.
struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).waiting -= 1;
    }
}

/// A tenant's gate (module doc, steps 1–3).
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Notify,
}

/// A request's hold on its tenant's gate; released on drop.
#[derive(Debug)]
pub struct Lease {
    gate: Arc<Gate>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = lock(&self.gate.state);
        st.in_flight -= 1;
        if st.in_flight == 0 && st.closed {
            self.gate.changed.notify_waiters();
        }
    }
}

/// A closed gate; opened again on drop, releasing the queue.
#[derive(Debug)]
pub struct Closed {
    gate: Arc<Gate>,
}

impl Drop for Closed {
    fn drop(&mut self) {
        lock(&self.gate.state).closed = false;
        self.gate.changed.notify_waiters();
    }
}

/// Where one request goes.
#[derive(Debug)]
pub struct Route {
    pub executor: Arc<Executor>,
    pub lease: Lease,
    /// The epoch of the placement that chose the executor; none for a
    /// tenant routed but not recorded (a hand-off).
    pub epoch: Option<i64>,
}

/// Why a gate could not be closed.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    #[error("a migration of this tenant is already running")]
    AlreadyClosed,
    #[error("requests of this tenant still in flight after {0:?}")]
    Busy(Duration),
}

/// The executor set, the placement table and the tenants' gates.
#[derive(Debug)]
pub struct Fleet {
    table: PlacementStore,
    executors: RwLock<BTreeMap<ExecutorId, Arc<Executor>>>,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    /// Set while this process hands its sockets to a successor: it routes
    /// new tenants where the successor will place them but records nothing.
    handing_off: AtomicBool,
    internal_token: String,
    /// Gates this proxy holds closed for moves other proxies run
    /// (`ARCHITECTURE.md`, "Moves across proxies"); opened when the move
    /// ends.
    remote: Mutex<HashMap<String, Closed>>,
    /// Makes the clients of [`Fleet::client`].
    connector: Arc<dyn Connector>,
    pub queue: QueueLimits,
    state_dir: PathBuf,
}

/// Why an executor could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("executor id {0:?} is not valid (1–63 of a-z 0-9 _ - .)")]
    BadId(String),
    #[error("executor address {0:?} does not resolve: {1}")]
    BadAddr(String, String),
    #[error("executor {id} is registered at {addr} already; forget it first to move it")]
    Exists { id: String, addr: String },
    #[error("nothing at {addr} answered the identity check: {why}")]
    Unanswered { addr: String, why: String },
    #[error("the executor at {addr} did not prove that it is fleet executor {id:?}: {why}")]
    Unverified {
        id: String,
        addr: String,
        why: String,
    },
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

impl Fleet {
    /// Loads the placement table from `state_dir` and registers the
    /// executors it names plus `extra` (id, address) pairs; executors are
    /// called over HTTP with `internal_token`.
    pub async fn open(
        state_dir: &Path,
        internal_token: &str,
        queue: QueueLimits,
        extra: &[(String, String)],
    ) -> Result<Fleet, RegisterError> {
        let connector = Arc::new(HttpConnector::new(internal_token));
        Fleet::open_with(state_dir, internal_token, connector, queue, extra).await
    }

    /// [`Fleet::open`], with executors called through `connector`.
    pub async fn open_with(
        state_dir: &Path,
        internal_token: &str,
        connector: Arc<dyn Connector>,
        queue: QueueLimits,
        extra: &[(String, String)],
    ) -> Result<Fleet, RegisterError> {
        let table = Placements::load(&state_dir.join("placements.json"))?.into();
        Fleet::open_store(table, state_dir, internal_token, connector, queue, extra).await
    }

    /// [`Fleet::open_with`], with the placement table in `table` (etcd, or
    /// a file); `state_dir` keeps the proxy's other files.
    pub async fn open_store(
        table: PlacementStore,
        state_dir: &Path,
        internal_token: &str,
        connector: Arc<dyn Connector>,
        queue: QueueLimits,
        extra: &[(String, String)],
    ) -> Result<Fleet, RegisterError> {
        let known: Vec<(String, String)> = table
            .state()
            .executors
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let fleet = Fleet {
            table,
            executors: RwLock::new(BTreeMap::new()),
            gates: Mutex::new(HashMap::new()),
            handing_off: AtomicBool::new(false),
            internal_token: internal_token.to_string(),
            remote: Mutex::new(HashMap::new()),
            connector,
            queue,
            state_dir: state_dir.to_path_buf(),
        };
        for (id, addr) in known.iter().chain(extra) {
            fleet.register(id, addr).await?;
        }
        Ok(fleet)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Adds (or re-addresses) an executor that the operator's own
    /// configuration names: the placement table, `--executor`. It counts as
    /// healthy until the first probe says otherwise. Addresses named over
    /// the network go through [`Fleet::register_proven`] instead.
    pub async fn register(&self, id: &str, addr: &str) -> Result<Arc<Executor>, RegisterError> {
        let id = ExecutorId::new(id).map_err(|e| RegisterError::BadId(e.value))?;
        let sock = resolve(addr)?;
        if let Some(old) = self.executor(&id).filter(|old| old.addr != addr) {
            tracing::warn!(executor = %id, from = %old.addr, to = %addr, "executor re-addressed by the operator's configuration");
        }
        self.insert(id, addr, sock).await
    }

    async fn insert(
        &self,
        id: ExecutorId,
        addr: &str,
        sock: SocketAddr,
    ) -> Result<Arc<Executor>, RegisterError> {
        self.table.add_executor(&id, addr).await?;
        let exec = Arc::new(Executor::new(id.clone(), addr, sock));
        self.executors
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, exec.clone());
        Ok(exec)
    }

    /// Registers executor `id` at `addr`, named by the admin API, once
    /// whoever answers there proves that it holds the internal token and is
    /// `id` ([`tensor_wasm_shared::identity`]); until then nothing sent
    /// there carries a credential. An id registered at the same address
    /// already is answered as it is; one registered at another address is
    /// [`RegisterError::Exists`].
    pub async fn register_proven(
        &self,
        id: &str,
        addr: &str,
    ) -> Result<Arc<Executor>, RegisterError> {
        let id = ExecutorId::new(id).map_err(|e| RegisterError::BadId(e.value))?;
        if let Some(old) = self.executor(&id) {
            return if old.addr == addr {
                Ok(old)
            } else {
                Err(exists(&id, &old))
            };
        }
        let sock = resolve(addr)?;
        let proven = self.prove(addr).await?;
        if proven != id {
            return Err(RegisterError::Unverified {
                id: id.to_string(),
                addr: addr.to_string(),
                why: format!("it says it is {:?}", proven.as_str()),
            });
        }
        self.insert_proven(id, addr, sock, None).await
    }

    /// Registers whoever answers at `addr`, found by DNS, under the id it
    /// proves. An id registered at another address moves only if `listed`
    /// says the name no longer resolves to that address (a pod that came
    /// back with a new IP), and the move is logged.
    pub async fn discover(
        &self,
        addr: &str,
        listed: impl Fn(SocketAddr) -> bool,
    ) -> Result<Arc<Executor>, RegisterError> {
        let sock = resolve(addr)?;
        let id = self.prove(addr).await?;
        let old = self.executor(&id);
        match &old {
            Some(old) if old.addr == addr => return Ok(old.clone()),
            Some(old) if listed(old.sock) => return Err(exists(&id, old)),
            _ => {}
        }
        self.insert_proven(id, addr, sock, old).await
    }

    /// Adds `id` at `addr` once proven, unless another registration won the
    /// id meanwhile; `old` is the registration it replaces, if any.
    async fn insert_proven(
        &self,
        id: ExecutorId,
        addr: &str,
        sock: SocketAddr,
        old: Option<Arc<Executor>>,
    ) -> Result<Arc<Executor>, RegisterError> {
        let now = self.executor(&id);
        if let Some(now) = now.filter(|now| old.as_ref().is_none_or(|old| !Arc::ptr_eq(old, now))) {
            return if now.addr == addr {
                Ok(now)
            } else {
                Err(exists(&id, &now))
            };
        }
        if let Some(old) = &old {
            tracing::warn!(executor = %id, from = %old.addr, to = %addr, "executor re-addressed: the old address is gone and the new one proved the id");
        }
        self.insert(id, addr, sock).await
    }

    /// Asks whoever answers at `addr` to prove that it holds the internal
    /// token; the id it proved.
    async fn prove(&self, addr: &str) -> Result<ExecutorId, RegisterError> {
        let unverified = |id: &str, why: String| RegisterError::Unverified {
            id: id.to_string(),
            addr: addr.to_string(),
            why,
        };
        let nonce = identity::nonce();
        let answer =
            self.client_at(addr)
                .identity(&nonce)
                .await
                .map_err(|e| RegisterError::Unanswered {
                    addr: addr.to_string(),
                    why: e.to_string(),
                })?;
        let id = ExecutorId::new(&answer.id)
            .map_err(|e| unverified(&answer.id, format!("its id is not valid: {}", e.value)))?;
        if !identity::verify(&self.internal_token, &id, &nonce, &answer) {
            return Err(unverified(&answer.id, "its proof is wrong".into()));
        }
        Ok(id)
    }

    /// Forgets an executor.
    pub async fn forget(&self, id: &str) -> Result<(), PlacementError> {
        self.table.remove_executor(id).await?;
        self.executors
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    /// Executor `id`; with a shared table, one that another proxy
    /// registered a moment ago is adopted here first
    /// ([`follow_executors`](Self::follow_executors)).
    pub fn executor(&self, id: &str) -> Option<Arc<Executor>> {
        let known = || {
            self.executors
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(id)
                .cloned()
        };
        known().or_else(|| {
            if !self.table.is_shared() {
                return None;
            }
            self.follow_executors();
            known()
        })
    }

    /// Takes the executor set from a table shared with other proxies
    /// (etcd): executors another proxy registered or re-addressed are
    /// adopted, probed and routed to from now on; those it forgot are
    /// forgotten here too. A file table changes only through this proxy,
    /// which keeps both in step itself.
    pub fn follow_executors(&self) {
        if !self.table.is_shared() {
            return;
        }
        let listed = self.table.executors();
        let mut known = self.executors.write().unwrap_or_else(|p| p.into_inner());
        known.retain(|id, _| {
            let keep = listed.contains_key(id);
            if !keep {
                tracing::info!(executor = %id, "executor forgotten by another proxy");
            }
            keep
        });
        for (id, addr) in listed {
            if known.get(&id).is_some_and(|e| e.addr == addr) {
                continue;
            }
            match resolve(&addr) {
                Ok(sock) => {
                    tracing::info!(executor = %id, %addr, "executor registered by another proxy");
                    known.insert(id.clone(), Arc::new(Executor::new(id, &addr, sock)));
                }
                Err(e) => {
                    tracing::warn!(executor = %id, error = %e, "executor in the shared table has no usable address")
                }
            }
        }
    }

    pub fn executors(&self) -> Vec<Arc<Executor>> {
        self.executors
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A client for `exec`'s internal API.
    pub fn client(&self, exec: &Executor) -> Arc<dyn ExecutorApi> {
        self.connector.connect(&exec.addr)
    }

    /// A client for the internal API of an executor at `addr` that is not
    /// registered (yet): DNS discovery asks it for its id.
    pub fn client_at(&self, addr: &str) -> Arc<dyn ExecutorApi> {
        self.connector.connect(addr)
    }

    pub fn internal_token(&self) -> &str {
        &self.internal_token
    }

    /// The placement table.
    pub fn table(&self) -> &PlacementStore {
        &self.table
    }

    /// Healthy executors, as placement candidates.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.executors()
            .into_iter()
            .filter(|e| e.is_healthy())
            .map(|e| Candidate {
                id: e.id.clone(),
                addr: e.sock,
            })
            .collect()
    }

    /// Stops recording placements (module doc of [`crate::server`]).
    pub fn begin_handoff(&self) {
        self.handing_off.store(true, Ordering::Release);
    }

    pub fn handing_off(&self) -> bool {
        self.handing_off.load(Ordering::Acquire)
    }

    fn gate(&self, tenant: &str) -> Arc<Gate> {
        let mut gates = lock(&self.gates);
        if let Some(g) = gates.get(tenant) {
            return g.clone();
        }
        let g = Arc::new(Gate::default());
        gates.insert(tenant.to_string(), g.clone());
        g
    }

    /// Routes one request of `tenant` (module doc, steps 1, 3, 4).
    pub async fn route(&self, tenant: &TenantId) -> Result<Route, RouteError> {
        let gate = self.gate(tenant.as_str());
        let deadline = Instant::now() + self.queue.deadline;
        loop {
            let notified = gate.changed.notified();
            let mut notified = pin!(notified);
            let open = {
                let mut st = lock(&gate.state);
                if st.closed {
                    if st.waiting >= self.queue.capacity {
                        return Err(RouteError::QueueFull(tenant.to_string()));
                    }
                    st.waiting += 1;
                    // Registered before the lock is released, so an
                    // opening between here and the await is not missed.
                    notified.as_mut().enable();
                } else {
                    st.in_flight += 1;
                }
                !st.closed
            };
            if open {
                let lease = Lease { gate: gate.clone() };
                match self.executor_for(tenant).await {
                    Ok((executor, epoch)) => {
                        return Ok(Route {
                            executor,
                            lease,
                            epoch,
                        });
                    }
                    // Down: held while it may be restarting, then routed
                    // again.
                    Err(RouteError::ExecutorDown(id)) => {
                        drop(lease);
                        // Counted with the tenant's requests waiting for a
                        // move: the same cap holds.
                        {
                            let mut st = lock(&gate.state);
                            if st.waiting >= self.queue.capacity {
                                return Err(RouteError::QueueFull(tenant.to_string()));
                            }
                            st.waiting += 1;
                        }
                        let _waiting = Waiting(&gate);
                        let back = match self.executor(id.as_str()) {
                            Some(exec) => exec.wait_recovered(self.queue.deadline, deadline).await,
                            None => false,
                        };
                        if back {
                            continue;
                        }
                        return Err(RouteError::ExecutorDown(id));
                    }
                    Err(e) => return Err(e),
                }
            }
            // Counted out when the wait ends, or when the request is
            // dropped while it waits.
            let waiting = Waiting(&gate);
            let waited = tokio::time::timeout_at(deadline, notified).await;
            drop(waiting);
            if waited.is_err() {
                return Err(RouteError::MovingTooLong(tenant.to_string()));
            }
        }
    }

    /// The executor that owns `tenant`, placing it if it is new, and the
    /// placement's epoch.
    async fn executor_for(
        &self,
        tenant: &TenantId,
    ) -> Result<(Arc<Executor>, Option<i64>), RouteError> {
        let unplaced = |e| match e {
            PlacementError::NoExecutor => RouteError::NoExecutor,
            e => RouteError::Placement(e),
        };
        let (id, epoch) = match self.table.locate(tenant) {
            Some((id, epoch)) => (id, Some(epoch)),
            // Routed where the successor will place it, recorded nowhere.
            None if self.handing_off() => {
                let id = self.table.choose(tenant, &self.candidates());
                (id.map_err(unplaced)?, None)
            }
            None => {
                let placed = self.table.place(tenant, &self.candidates()).await;
                let (id, epoch) = placed.map_err(unplaced)?;
                tracing::info!(tenant = %tenant, executor = %id, "tenant placed");
                (id, Some(epoch))
            }
        };
        let exec = self
            .executor(id.as_str())
            .ok_or_else(|| RouteError::ExecutorGone(id.clone()))?;
        if !exec.is_healthy() {
            return Err(RouteError::ExecutorDown(id));
        }
        Ok((exec, epoch))
    }

    /// Follows the moves other proxies sharing the table run: when one
    /// pauses, holds the tenant's requests here and reports it once none is
    /// in flight; when it ends, lets them go where the tenant now lives.
    /// Call from within the runtime that is to run the follower.
    pub fn follow_moves(self: &Arc<Self>) {
        let PlacementStore::Etcd(table) = &self.table else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        table.follow_moves(tx);
        let me = table.member();
        // Moves pausing already when this proxy started.
        for (tenant, mv) in self.table.pending_moves() {
            if mv.pausing && mv.mover != me {
                let fleet = self.clone();
                tokio::spawn(async move { fleet.hold_for(tenant).await });
            }
        }
        let fleet = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some((tenant, mv)) = rx.recv().await {
                let Some(fleet) = fleet.upgrade() else { return };
                match mv {
                    Some(mv) if mv.pausing && mv.mover != me => {
                        tokio::spawn(async move { fleet.hold_for(tenant).await });
                    }
                    Some(_) => {}
                    None => {
                        if lock(&fleet.remote).remove(tenant.as_str()).is_some() {
                            tracing::info!(tenant = %tenant, "move by another proxy ended; requests released");
                        }
                    }
                }
            }
        });
    }

    /// Closes `tenant`'s gate for another proxy's move, then reports it.
    async fn hold_for(&self, tenant: TenantId) {
        let closed = match self.close_gate(tenant.as_str(), self.queue.deadline).await {
            Ok(c) => c,
            Err(CloseError::AlreadyClosed) => {
                // Held already: the record changed (taken over); report
                // again in case the report was lost.
                let held = lock(&self.remote).contains_key(tenant.as_str());
                if held && let Err(e) = self.table.hold(&tenant).await {
                    tracing::warn!(tenant = %tenant, error = %e, "could not report holding a moving tenant");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "could not hold a tenant another proxy moves; its move will be undone");
                return;
            }
        };
        {
            let mut remote = lock(&self.remote);
            if !self.table.moving(&tenant).is_some_and(|m| m.pausing) {
                // The move ended while the gate closed.
                return;
            }
            remote.insert(tenant.to_string(), closed);
        }
        match self.table.hold(&tenant).await {
            Ok(()) => {
                tracing::info!(tenant = %tenant, "holding requests for a move by another proxy")
            }
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "could not report holding a moving tenant")
            }
        }
    }

    /// Waits until every other live proxy sharing the table reports that it
    /// holds `tenant`'s requests (none for a table of one's own), or until
    /// `until`: the proxies that did not, then.
    pub async fn await_holds(&self, tenant: &TenantId, until: Instant) -> Result<(), Vec<String>> {
        loop {
            let missing = self.table.not_holding(tenant);
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(missing);
            }
            tokio::time::sleep_until((Instant::now() + STALE_POLL).min(until)).await;
        }
    }

    /// The gate this proxy held closed for another proxy's move of
    /// `tenant`, handed to this proxy's own handling of the move.
    pub fn take_remote_hold(&self, tenant: &str) -> Option<Closed> {
        lock(&self.remote).remove(tenant)
    }

    /// Waits until `tenant`'s placement is newer than `epoch` (an executor
    /// refused a request routed by it), or until `until`: whether it is.
    /// The table changes by this proxy's own moves, or, shared, by the
    /// watch of other proxies' writes.
    pub async fn wait_newer(&self, tenant: &TenantId, epoch: i64, until: Instant) -> bool {
        loop {
            if self.table.locate(tenant).is_some_and(|(_, e)| e > epoch) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep_until((Instant::now() + STALE_POLL).min(until)).await;
        }
    }

    /// Closes `tenant`'s gate and waits until none of its requests is in
    /// flight (module doc, step 2). Dropping the result opens it again.
    pub async fn close_gate(&self, tenant: &str, wait: Duration) -> Result<Closed, CloseError> {
        let gate = self.gate(tenant);
        {
            let mut st = lock(&gate.state);
            if st.closed {
                return Err(CloseError::AlreadyClosed);
            }
            st.closed = true;
        }
        let closed = Closed { gate: gate.clone() };
        let deadline = Instant::now() + wait;
        loop {
            let notified = gate.changed.notified();
            let mut notified = pin!(notified);
            {
                let st = lock(&gate.state);
                if st.in_flight == 0 {
                    return Ok(closed);
                }
                notified.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(CloseError::Busy(wait));
            }
        }
    }

    /// Closes `tenant`'s gate without waiting; `None` if it is closed
    /// already. Only for start-up, before any request holds a lease.
    pub fn close_now(&self, tenant: &str) -> Option<Closed> {
        let gate = self.gate(tenant);
        let mut st = lock(&gate.state);
        if st.closed {
            return None;
        }
        st.closed = true;
        drop(st);
        Some(Closed { gate })
    }

    /// Whether `tenant`'s gate is closed now.
    pub fn gate_closed(&self, tenant: &str) -> bool {
        lock(&self.gate(tenant).state).closed
    }

    /// Requests of `tenant` in flight and waiting now.
    pub fn gate_counts(&self, tenant: &str) -> (usize, usize) {
        let gate = self.gate(tenant);
        let st = lock(&gate.state);
        (st.in_flight, st.waiting)
    }
}

/// Locks a mutex, taking over a poisoned one: every critical section here
/// leaves the data consistent before anything that could panic.
/// `id` is registered at another address than asked.
fn exists(id: &ExecutorId, old: &Executor) -> RegisterError {
    RegisterError::Exists {
        id: id.to_string(),
        addr: old.addr.clone(),
    }
}

/// The first socket address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr, RegisterError> {
    addr.to_socket_addrs()
        .map_err(|e| RegisterError::BadAddr(addr.to_string(), e.to_string()))?
        .next()
        .ok_or_else(|| RegisterError::BadAddr(addr.to_string(), "no address".into()))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::scripted::until;

    async fn fleet(dir: &Path) -> Fleet {
        Fleet::open(
            dir,
            "internal",
            QueueLimits {
                deadline: Duration::from_millis(300),
                capacity: 2,
            },
            &[
                ("cpu0".into(), "127.0.0.1:7100".into()),
                ("cpu1".into(), "127.0.0.1:7101".into()),
            ],
        )
        .await
        .unwrap()
    }

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[tokio::test]
    async fn a_closed_gate_waits_for_leases_then_holds_requests_until_it_opens() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Arc::new(fleet(dir.path()).await);
        let first = fleet.route(&t("acme")).await.unwrap();
        let home = first.executor.id.to_string();
        // Closing waits for the lease in flight.
        let busy = fleet.close_gate("acme", Duration::from_millis(50)).await;
        assert!(matches!(busy, Err(CloseError::Busy(_))));
        assert_eq!(fleet.gate_counts("acme"), (1, 0));
        let closer = {
            let fleet = fleet.clone();
            tokio::spawn(async move { fleet.close_gate("acme", Duration::from_secs(5)).await })
        };
        until("the gate closes", || fleet.gate_closed("acme")).await;
        drop(first);
        let closed = closer.await.unwrap().unwrap();
        // A request now waits; moving the placement meanwhile sends it to
        // the new home once the gate opens.
        let waiter = {
            let fleet = fleet.clone();
            tokio::spawn(async move {
                fleet
                    .route(&t("acme"))
                    .await
                    .map(|r| r.executor.id.to_string())
            })
        };
        until("the request waits", || fleet.gate_counts("acme") == (0, 1)).await;
        let other = if home == "cpu0" { "cpu1" } else { "cpu0" };
        let p = fleet.table();
        p.begin_move(&t("acme"), &ExecutorId::new(other).unwrap(), None)
            .await
            .unwrap();
        p.finish_move(&t("acme")).await.unwrap();
        drop(closed);
        assert_eq!(waiter.await.unwrap().unwrap(), other);
        // Other tenants never waited.
        assert!(fleet.route(&t("other")).await.is_ok());
    }

    #[tokio::test]
    async fn a_long_move_or_a_full_queue_refuses_with_tenant_moving() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Arc::new(fleet(dir.path()).await);
        let closed = fleet
            .close_gate("acme", Duration::from_secs(1))
            .await
            .unwrap();
        assert!(matches!(
            fleet.close_gate("acme", Duration::from_secs(1)).await,
            Err(CloseError::AlreadyClosed)
        ));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let fleet = fleet.clone();
                tokio::spawn(async move { fleet.route(&t("acme")).await.map(|_| ()) })
            })
            .collect();
        until("both wait", || fleet.gate_counts("acme") == (0, 2)).await;
        let full = fleet.route(&t("acme")).await.unwrap_err();
        assert!(matches!(full, RouteError::QueueFull(_)));
        assert_eq!(full.api_error().code, ErrorCode::TenantMoving);
        for w in waiters {
            let e = w.await.unwrap().unwrap_err();
            assert!(matches!(e, RouteError::MovingTooLong(_)), "{e}");
        }
        assert_eq!(fleet.gate_counts("acme"), (0, 0));
        // A request dropped while it waits (its client gone) leaves the
        // queue too.
        let gone = {
            let fleet = fleet.clone();
            tokio::spawn(async move { fleet.route(&t("acme")).await.map(|_| ()) })
        };
        until("it waits", || fleet.gate_counts("acme") == (0, 1)).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(fleet.gate_counts("acme"), (0, 0));
        drop(closed);
        assert!(fleet.route(&t("acme")).await.is_ok());
    }

    #[tokio::test]
    async fn only_an_executor_that_proves_its_id_is_registered_and_never_silently_moved() {
        use crate::upstream::scripted::{Net, TOKEN};
        let dir = tempfile::tempdir().unwrap();
        let net = Arc::new(Net::default());
        net.add("cpu0", "127.0.0.1:7200");
        net.add("cpu0", "127.0.0.1:7201");
        net.add("cpu1", "127.0.0.1:7202");
        async fn open(net: &Arc<Net>, dir: &Path, token: &str) -> Fleet {
            Fleet::open_with(dir, token, net.clone(), QueueLimits::default(), &[])
                .await
                .unwrap()
        }
        let fleet = open(&net, dir.path(), TOKEN).await;
        fleet
            .register_proven("cpu0", "127.0.0.1:7200")
            .await
            .unwrap();
        assert_eq!(net.take_calls(), ["cpu0 identity"]);
        // Again at the same address: as it is, nothing asked.
        fleet
            .register_proven("cpu0", "127.0.0.1:7200")
            .await
            .unwrap();
        assert!(net.take_calls().is_empty());

        // An address that answers as another id, or nobody, or without the
        // fleet's token, is refused and never registered.
        let refused = |e: RegisterError| {
            matches!(
                e,
                RegisterError::Unverified { .. } | RegisterError::Unanswered { .. }
            )
        };
        let e = fleet
            .register_proven("cpu9", "127.0.0.1:7202")
            .await
            .unwrap_err();
        assert!(refused(e));
        let e = fleet
            .register_proven("cpu9", "127.0.0.1:7299")
            .await
            .unwrap_err();
        assert!(refused(e));
        let other = tempfile::tempdir().unwrap();
        let e = open(&net, other.path(), "another token")
            .await
            .register_proven("cpu1", "127.0.0.1:7202")
            .await
            .unwrap_err();
        assert!(refused(e), "a proof made with another token");
        assert!(fleet.executor("cpu9").is_none());
        // Only identity challenges went out: no call that carries the token.
        let calls = net.take_calls();
        assert!(calls.iter().all(|c| c.ends_with(" identity")), "{calls:?}");

        // A registered id is not moved to another address, even one that
        // proves it, unless the caller allows it (DNS, once the old address
        // is gone).
        let e = fleet
            .register_proven("cpu0", "127.0.0.1:7201")
            .await
            .unwrap_err();
        assert!(matches!(e, RegisterError::Exists { .. }), "{e}");
        assert_eq!(fleet.executor("cpu0").unwrap().addr, "127.0.0.1:7200");
        fleet.discover("127.0.0.1:7201", |_| false).await.unwrap();
        assert_eq!(fleet.executor("cpu0").unwrap().addr, "127.0.0.1:7201");
        // The move persists.
        let again = open(&net, dir.path(), TOKEN).await;
        assert_eq!(again.executor("cpu0").unwrap().addr, "127.0.0.1:7201");
    }

    /// A probe answered late marks an executor down only the second time
    /// in a row; one that could not connect marks it down at once.
    #[test]
    fn a_late_probe_marks_an_executor_down_only_the_second_time_in_a_row() {
        let e = Executor::new(
            ExecutorId::new("cpu0").unwrap(),
            "127.0.0.1:7200",
            "127.0.0.1:7200".parse().unwrap(),
        );
        let probe = |p| {
            let ok = e.probed(p);
            e.set_healthy(ok);
            ok
        };
        assert!(probe(Probe::Late), "one late answer");
        assert!(probe(Probe::Answered));
        assert!(probe(Probe::Late), "one late answer again, after an answer");
        assert!(!probe(Probe::Late), "two in a row");
        assert!(!probe(Probe::Late), "down while it answers late");
        assert!(probe(Probe::Answered), "up once it answers");
        assert!(!probe(Probe::Failed), "a refused connection");
        assert!(!probe(Probe::Late), "down stays down while it answers late");
        assert!(probe(Probe::Answered));
    }

    #[tokio::test]
    async fn an_unhealthy_executor_refuses_its_tenants_only() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = fleet(dir.path()).await;
        let mut on = BTreeMap::new();
        for i in 0..20 {
            let r = fleet.route(&t(&format!("t{i}"))).await.unwrap();
            on.insert(format!("t{i}"), r.executor.id.to_string());
        }
        fleet.executor("cpu0").unwrap().set_healthy(false);
        for (tenant, exec) in &on {
            let r = fleet.route(&t(tenant)).await;
            if exec == "cpu0" {
                let e = r.unwrap_err();
                assert_eq!(e.api_error().code, ErrorCode::ExecutorUnavailable);
            } else {
                assert_eq!(r.unwrap().executor.id.as_str(), exec);
            }
        }
        // New tenants go to the healthy one.
        for i in 0..10 {
            let r = fleet.route(&t(&format!("new{i}"))).await.unwrap();
            assert_eq!(r.executor.id.as_str(), "cpu1");
        }
    }

    #[tokio::test]
    async fn the_executor_set_persists_and_bad_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(fleet(dir.path()).await);
        let again = Fleet::open(dir.path(), "i", QueueLimits::default(), &[])
            .await
            .unwrap();
        assert_eq!(again.executors().len(), 2);
        assert!(matches!(
            again.register("Bad Id", "127.0.0.1:1").await,
            Err(RegisterError::BadId(_))
        ));
        assert!(matches!(
            again.register("ok", "not an address").await,
            Err(RegisterError::BadAddr(..))
        ));
        again.forget("cpu1").await.unwrap();
        let third = Fleet::open(dir.path(), "i", QueueLimits::default(), &[])
            .await
            .unwrap();
        assert_eq!(third.executors().len(), 1);
    }
}
