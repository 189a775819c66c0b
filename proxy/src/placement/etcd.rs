//! The placement table in etcd, shared by every proxy of a fleet
//! (`ARCHITECTURE.md`, "Placement in etcd").
//!
//! Keys, under a prefix (`/tensor-wasm/` by default):
//!
//! | key | value |
//! |---|---|
//! | `tenants/<tenant>` | the executor id it is placed on; the key's `mod_revision` (plus the epoch base) is the placement's epoch |
//! | `executors/<id>` | its `host:port` |
//! | `draining/<id>` | empty: it takes no new tenants |
//! | `moves/<tenant>` | the migration in progress, JSON ([`Move`]) |
//! | `proxies/<id>` | a live proxy, on its lease: gone when the proxy stops renewing it |
//! | `holds/<tenant>/<proxy>` | empty, on the proxy's lease: it holds the pausing tenant's requests and has none in flight |
//! | `epoch-base` | the time the table was made, in µs since the Unix epoch: added to a key's `mod_revision`, it makes the placement's epoch |
//!
//! Every proxy keeps a copy of the table, loaded once and then fed by a
//! watch from the revision it loaded, so that routing a request never
//! waits for etcd. Placing a new tenant is one transaction that creates
//! its key only if no proxy has: two proxies placing the same tenant at
//! once agree on the one that won. When the watch breaks (etcd restarts,
//! the network parts), the copy keeps serving what it holds, and the
//! watcher loads the table again and watches on from there once etcd
//! answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tensor_wasm_shared::{ExecutorId, TenantId};

use super::{Candidate, Move, PlacementError, PlacementState, choose};

/// The prefix of every key when none is given.
pub const DEFAULT_PREFIX: &str = "/tensor-wasm/";

/// How long to wait before loading the table again after the watch broke.
const RESYNC_PAUSE: Duration = Duration::from_millis(500);

/// How long a proxy's lease outlives its last renewal: a proxy that dies
/// (or loses etcd) mid-move has its move taken over this long after.
pub const PROXY_TTL_SECS: i64 = 5;

/// Keys written by one transaction of an import: etcd refuses
/// transactions of more than 128 operations unless told otherwise.
const IMPORT_BATCH: usize = 100;

/// A change of a tenant's move, as the watch saw it: the record now, or
/// none once the move ended.
pub type MoveEvent = (TenantId, Option<Move>);

/// Why etcd could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints}: {source}")]
    Unreachable {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl EtcdError {
    /// Whether trying again may help: etcd, or the way to it, is not up
    /// yet or too slow. Not so when etcd refuses this proxy (a wrong
    /// password, no permission), the address is wrong, or the table is
    /// corrupt.
    pub fn is_transient(&self) -> bool {
        match self {
            EtcdError::Unreachable { source, .. } => match source {
                // InvalidArgument, PermissionDenied, FailedPrecondition,
                // Unauthenticated.
                etcd_client::Error::GRpcStatus(s) => !matches!(i32::from(s.code()), 3 | 7 | 9 | 16),
                etcd_client::Error::InvalidArgs(_)
                | etcd_client::Error::InvalidUri(_)
                | etcd_client::Error::InvalidMetadataValue(_) => false,
                _ => true,
            },
            EtcdError::Corrupt { .. } => false,
        }
    }
}

/// The proxy's copy of the table, and how far it has read etcd's history.
#[derive(Debug, Default)]
struct Copy {
    state: PlacementState,
    /// Key → the revision of a change applied ahead of the watch (this
    /// proxy's own writes, deletions too), so that an older event never
    /// undoes it. Dropped once the watch has read past it: every event
    /// still to come is newer.
    changed: BTreeMap<String, i64>,
    /// How far the watch (or the last load) has read etcd's history: every
    /// change up to it is in the copy. This proxy's own writes, applied at
    /// once, do not move it.
    watched: i64,
    /// The revision of this proxy's last own write.
    written: i64,
    /// Live proxies (`proxies/<id>`).
    proxies: BTreeSet<String>,
    /// Tenant → proxies that hold its requests for its move.
    holds: BTreeMap<String, BTreeSet<String>>,
    /// Tenant → the revision of its move record, which a write to the
    /// record compares: a move taken over by another proxy is not
    /// finished or undone by the one that lost it.
    move_revs: BTreeMap<String, i64>,
}

/// One kind of key under the prefix.
enum Entry<'k> {
    Tenant(&'k str),
    Executor(&'k str),
    Draining(&'k str),
    Move(&'k str),
    Proxy(&'k str),
    Hold(&'k str, &'k str),
}

impl Copy {
    /// Applies a put (`value` given) or delete of `key` (the part after
    /// the prefix) at `revision`.
    fn apply(&mut self, key: &str, value: Option<&[u8]>, revision: i64) -> Result<(), EtcdError> {
        if self.changed.get(key).is_some_and(|&r| r > revision) {
            return Ok(());
        }
        self.changed.insert(key.to_string(), revision);
        let text = |v: &[u8]| {
            String::from_utf8(v.to_vec()).map_err(|_| EtcdError::Corrupt {
                key: key.into(),
                reason: "not UTF-8".into(),
            })
        };
        let id = |v: &[u8]| {
            ExecutorId::new(&text(v)?).map_err(|e| EtcdError::Corrupt {
                key: key.into(),
                reason: e.to_string(),
            })
        };
        match (entry(key), value) {
            (Some(Entry::Tenant(t)), Some(v)) => {
                self.state.placements.insert(t.into(), id(v)?);
                self.state.epochs.insert(t.into(), revision);
            }
            (Some(Entry::Tenant(t)), None) => {
                self.state.placements.remove(t);
                self.state.epochs.remove(t);
            }
            (Some(Entry::Executor(e)), Some(v)) => {
                self.state.executors.insert(id(e.as_bytes())?, text(v)?);
            }
            (Some(Entry::Executor(e)), None) => {
                self.state.executors.retain(|k, _| k.as_str() != e);
            }
            (Some(Entry::Draining(e)), Some(_)) => {
                self.state.draining.insert(id(e.as_bytes())?);
            }
            (Some(Entry::Draining(e)), None) => {
                self.state.draining.retain(|k| k.as_str() != e);
            }
            (Some(Entry::Move(t)), Some(v)) => {
                let mv: Move = serde_json::from_slice(v).map_err(|e| EtcdError::Corrupt {
                    key: key.into(),
                    reason: e.to_string(),
                })?;
                self.state.moving.insert(t.into(), mv);
                self.move_revs.insert(t.into(), revision);
            }
            (Some(Entry::Move(t)), None) => {
                self.state.moving.remove(t);
                self.move_revs.remove(t);
            }
            (Some(Entry::Proxy(p)), Some(_)) => {
                self.proxies.insert(p.into());
            }
            (Some(Entry::Proxy(p)), None) => {
                self.proxies.remove(p);
            }
            (Some(Entry::Hold(t, p)), Some(_)) => {
                self.holds.entry(t.into()).or_default().insert(p.into());
            }
            (Some(Entry::Hold(t, p)), None) => {
                if let Some(h) = self.holds.get_mut(t) {
                    h.remove(p);
                    if h.is_empty() {
                        self.holds.remove(t);
                    }
                }
            }
            // Keys of a later release: left alone.
            (None, _) => {}
        }
        Ok(())
    }
}

fn entry(key: &str) -> Option<Entry<'_>> {
    let (kind, name) = key.split_once('/')?;
    if name.is_empty() {
        return None;
    }
    Some(match kind {
        "tenants" => Entry::Tenant(name),
        "executors" => Entry::Executor(name),
        "draining" => Entry::Draining(name),
        "moves" => Entry::Move(name),
        "proxies" => Entry::Proxy(name),
        "holds" => {
            let (t, p) = name.split_once('/')?;
            if t.is_empty() || p.is_empty() {
                return None;
            }
            Entry::Hold(t, p)
        }
        _ => return None,
    })
}

/// The placement table in etcd, and this proxy's copy of it.
pub struct EtcdPlacements {
    client: Client,
    prefix: String,
    endpoints: String,
    copy: Arc<RwLock<Copy>>,
    /// How far the watch has read, for [`wait_for`](Self::wait_for).
    applied: tokio::sync::watch::Receiver<i64>,
    /// Whether the watch is reading etcd: while it is not, writes fail at
    /// once rather than each waiting out the client's timeout.
    watching: Arc<AtomicBool>,
    /// Added to a placement's revision to make its epoch: the time the
    /// table was made ([`super::epoch_base`]), kept in etcd.
    epoch_base: i64,
    /// This proxy's id among the fleet's proxies, once it [joined](Self::join).
    member: OnceLock<String>,
    /// The lease `proxies/<member>` and its holds live on.
    lease: Arc<AtomicI64>,
    /// Renews the lease.
    keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Told of every change of a move the watch brings.
    listener: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<MoveEvent>>>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for EtcdPlacements {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdPlacements")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("revision", &self.revision())
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdPlacements {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some(k) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            k.abort();
        }
    }
}

impl EtcdPlacements {
    /// Connects to etcd at `endpoints`, loads the table under `prefix` and
    /// starts watching it.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        options: Option<ConnectOptions>,
    ) -> Result<EtcdPlacements, EtcdError> {
        let names = endpoints.join(",");
        let unreachable = |source| EtcdError::Unreachable {
            endpoints: names.clone(),
            source,
        };
        let mut client = Client::connect(endpoints, options)
            .await
            .map_err(unreachable)?;
        let epoch_base = load_epoch_base(&mut client, prefix)
            .await
            .map_err(|e| match e {
                Loaded::Etcd(source) => unreachable(source),
                Loaded::Corrupt(e) => e,
            })?;
        let copy = load(&mut client.clone(), prefix)
            .await
            .map_err(|e| match e {
                Loaded::Etcd(source) => unreachable(source),
                Loaded::Corrupt(e) => e,
            })?;
        let (tx, applied) = tokio::sync::watch::channel(copy.watched);
        let copy = Arc::new(RwLock::new(copy));
        let watching = Arc::new(AtomicBool::new(true));
        let listener = Arc::new(Mutex::new(None));
        let watcher = tokio::spawn(watch(
            client.clone(),
            prefix.to_string(),
            copy.clone(),
            tx,
            watching.clone(),
            listener.clone(),
        ));
        Ok(EtcdPlacements {
            client,
            prefix: prefix.to_string(),
            endpoints: names,
            copy,
            applied,
            watching,
            epoch_base,
            member: OnceLock::new(),
            lease: Arc::new(AtomicI64::new(0)),
            keeper: Mutex::new(None),
            listener,
            watcher,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Copy> {
        self.copy.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Copy> {
        self.copy.write().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}/{name}", self.prefix)
    }

    fn unreachable(&self, source: etcd_client::Error) -> PlacementError {
        PlacementError::Store(
            EtcdError::Unreachable {
                endpoints: self.endpoints.clone(),
                source,
            }
            .to_string(),
        )
    }

    /// The copy of the whole table.
    pub fn state(&self) -> PlacementState {
        self.read().state.clone()
    }

    /// Where `tenant` lives, and the revision that placed it there (its
    /// epoch), from the copy: never waits for etcd.
    pub fn get(&self, tenant: &TenantId) -> Option<(ExecutorId, i64)> {
        let copy = self.read();
        let id = copy.state.placements.get(tenant.as_str())?.clone();
        let revision = copy.state.epochs.get(tenant.as_str()).copied();
        Some((id, self.epoch(revision.unwrap_or(0))))
    }

    /// The epoch of a placement written at etcd `revision`.
    fn epoch(&self, revision: i64) -> i64 {
        self.epoch_base.saturating_add(revision)
    }

    /// Every move in progress, from the copy.
    pub fn moves(&self) -> BTreeMap<String, Move> {
        self.read().state.moving.clone()
    }

    /// `tenant`'s move in progress, from the copy.
    pub fn moving(&self, tenant: &TenantId) -> Option<Move> {
        self.read().state.moving.get(tenant.as_str()).cloned()
    }

    /// Whether `executor` takes no new tenants, from the copy.
    pub fn is_draining(&self, executor: &ExecutorId) -> bool {
        self.read().state.draining.contains(executor)
    }

    /// The address recorded for `executor`, from the copy.
    pub fn state_executor(&self, executor: &ExecutorId) -> Option<String> {
        self.read().state.executors.get(executor).cloned()
    }

    /// The executor set, from the copy.
    pub fn executors(&self) -> BTreeMap<ExecutorId, String> {
        self.read().state.executors.clone()
    }

    /// Tenants on `executor`, from the copy.
    pub fn tenants_of(&self, executor: &str) -> Vec<String> {
        self.read()
            .state
            .placements
            .iter()
            .filter(|(_, e)| e.as_str() == executor)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// How many tenants are placed, from the copy.
    pub fn len(&self) -> usize {
        self.read().state.placements.len()
    }

    /// Whether no tenant is placed, from the copy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where [`place`](Self::place) would put a new tenant, recording
    /// nothing.
    pub fn choose(
        &self,
        tenant: &TenantId,
        healthy: &[Candidate],
    ) -> Result<ExecutorId, PlacementError> {
        choose(&self.read().state.draining, tenant, healthy)
    }

    /// How far the copy has read etcd's history: it holds every change up
    /// to this revision.
    pub fn revision(&self) -> i64 {
        *self.applied.borrow()
    }

    /// The revision of this proxy's last own write: another proxy that
    /// [waits for](Self::wait_for) it sees the write.
    pub fn written(&self) -> i64 {
        self.read().written
    }

    /// Waits until the copy holds every change up to `revision` (at most
    /// `timeout`); whether it does.
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut applied = self.applied.clone();
        tokio::time::timeout(timeout, applied.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Where `tenant` lives, placing it first if it is new: consistent
    /// hashing over `healthy` executors that are not draining, recorded
    /// only if no proxy placed it meanwhile. Every proxy gets the same
    /// answer.
    pub async fn place(
        &self,
        tenant: &TenantId,
        healthy: &[Candidate],
    ) -> Result<(ExecutorId, i64), PlacementError> {
        if let Some(placed) = self.get(tenant) {
            return Ok(placed);
        }
        let chosen = choose(&self.read().state.draining, tenant, healthy)?;
        let key = self.key("tenants", tenant.as_str());
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), chosen.as_str(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = self.txn(txn).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            self.apply_local(
                &format!("tenants/{tenant}"),
                Some(chosen.as_str().as_bytes()),
                revision,
            )?;
            return Ok((chosen, self.epoch(revision)));
        }
        // Another proxy placed it first: its answer is the answer.
        let won = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().cloned(),
            _ => None,
        });
        let kv = won.ok_or_else(|| PlacementError::Unplaced(tenant.to_string()))?;
        let id = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| ExecutorId::new(v).ok())
            .ok_or_else(|| {
                PlacementError::Store(format!("tenant {tenant}: not an executor id in etcd"))
            })?;
        self.write()
            .apply(
                &format!("tenants/{tenant}"),
                Some(kv.value()),
                kv.mod_revision(),
            )
            .map_err(|e| PlacementError::Store(e.to_string()))?;
        Ok((id, self.epoch(kv.mod_revision())))
    }

    /// Records an executor (or its new address).
    pub async fn add_executor(&self, id: &ExecutorId, addr: &str) -> Result<(), PlacementError> {
        self.put("executors", id.as_str(), addr.as_bytes()).await
    }

    /// Forgets an executor.
    pub async fn remove_executor(&self, id: &str) -> Result<(), PlacementError> {
        self.delete("executors", id).await
    }

    /// Stops (or resumes) placing new tenants on `executor`.
    pub async fn set_draining(
        &self,
        executor: &ExecutorId,
        on: bool,
    ) -> Result<(), PlacementError> {
        if on {
            self.put("draining", executor.as_str(), b"").await
        } else {
            self.delete("draining", executor.as_str()).await
        }
    }

    /// Joins the fleet's proxies as `id`: `proxies/<id>` on a lease of
    /// [`PROXY_TTL_SECS`], renewed until this proxy stops (and granted
    /// anew after etcd comes back).
    pub async fn join(&self, id: &str) -> Result<(), PlacementError> {
        self.reachable()?;
        if self.member.get().is_some() {
            return Ok(());
        }
        let key = self.key("proxies", id);
        let lease = register(&mut self.client.clone(), &key)
            .await
            .map_err(|e| self.unreachable(e))?;
        // Joined once registered: a join that failed may be tried again.
        if self.member.set(id.to_string()).is_err() {
            return Ok(());
        }
        self.lease.store(lease, Ordering::Release);
        self.apply_local(&format!("proxies/{id}"), Some(&[]), 0)?;
        let task = tokio::spawn(keep_registered(
            self.client.clone(),
            key,
            lease,
            self.lease.clone(),
        ));
        *self.keeper.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Leaves the fleet's proxies at once (a graceful stop): revokes the
    /// lease, so that moves stop waiting for this proxy's reports now
    /// rather than when the lease would have run out.
    pub async fn leave(&self) {
        if let Some(k) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            k.abort();
        }
        let lease = self.lease.swap(0, Ordering::AcqRel);
        if lease == 0 {
            return;
        }
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => tracing::info!(proxy = ?self.member(), "left the fleet's proxies"),
            Err(e) => {
                tracing::warn!(error = %e, "could not leave the fleet's proxies; the lease runs out instead")
            }
        }
    }

    /// The live proxies sharing the table, from the copy.
    pub fn proxies(&self) -> Vec<String> {
        self.read().proxies.iter().cloned().collect()
    }

    /// This proxy's id, once it joined.
    pub fn member(&self) -> Option<String> {
        self.member.get().cloned()
    }

    /// Sends every change of a move the watch brings to `tx`.
    pub fn follow_moves(&self, tx: tokio::sync::mpsc::UnboundedSender<MoveEvent>) {
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// The revision of `tenant`'s move record in the copy.
    fn move_rev(&self, tenant: &TenantId) -> Result<i64, PlacementError> {
        self.read()
            .move_revs
            .get(tenant.as_str())
            .copied()
            .ok_or_else(|| PlacementError::NotMoving(tenant.to_string()))
    }

    /// Writes `mv` as `tenant`'s move record if the record is still the
    /// one the copy holds.
    async fn rewrite_move(&self, tenant: &TenantId, mv: &Move) -> Result<(), PlacementError> {
        let rev = self.move_rev(tenant)?;
        let key = self.key("moves", tenant.as_str());
        let value = serde_json::to_vec(mv).map_err(|e| PlacementError::Store(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key, value.clone(), None)]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(PlacementError::NotMoving(tenant.to_string()));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("moves/{tenant}"), Some(&value), revision)
    }

    /// `tenant`'s move reaches its pause: other proxies hold its requests.
    pub async fn pause(&self, tenant: &TenantId) -> Result<(), PlacementError> {
        let mut mv = self.own_move(tenant)?;
        mv.pausing = true;
        self.rewrite_move(tenant, &mv).await
    }

    /// Reports that this proxy holds `tenant`'s requests, none in flight.
    pub async fn hold(&self, tenant: &TenantId) -> Result<(), PlacementError> {
        self.reachable()?;
        let Some(id) = self.member() else {
            return Ok(());
        };
        let lease = self.lease.load(Ordering::Acquire);
        let resp = self
            .client
            .clone()
            .put(
                self.key("holds", &format!("{tenant}/{id}")),
                "",
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("holds/{tenant}/{id}"), Some(&[]), revision)
    }

    /// Live proxies other than this one that do not hold `tenant`.
    pub fn not_holding(&self, tenant: &TenantId) -> Vec<String> {
        let copy = self.read();
        let me = self.member.get();
        let held = copy.holds.get(tenant.as_str());
        copy.proxies
            .iter()
            .filter(|p| Some(*p) != me && !held.is_some_and(|h| h.contains(*p)))
            .cloned()
            .collect()
    }

    /// Moves whose mover is no longer among the live proxies; none while
    /// the copy is not current.
    pub fn orphaned_moves(&self) -> Vec<(TenantId, Move)> {
        if !self.watching.load(Ordering::Acquire) {
            return Vec::new();
        }
        let copy = self.read();
        let me = self.member.get();
        copy.state
            .moving
            .iter()
            .filter(|(_, m)| {
                m.mover
                    .as_ref()
                    .is_some_and(|p| Some(p) != me && !copy.proxies.contains(p))
            })
            .filter_map(|(t, m)| TenantId::new(t).ok().map(|t| (t, m.clone())))
            .collect()
    }

    /// Makes this proxy the mover of `tenant`'s move, unless the record
    /// changed since the copy read it.
    pub async fn take_over(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        let mut mv = self.recorded_move(tenant)?;
        mv.mover = self.member();
        self.rewrite_move(tenant, &mv).await?;
        Ok(mv)
    }

    /// Records `mv` for `tenant`, unless a move of it is recorded already
    /// (by any proxy).
    pub async fn begin_move(&self, tenant: &TenantId, mv: &Move) -> Result<(), PlacementError> {
        let key = self.key("moves", tenant.as_str());
        let value = serde_json::to_vec(mv).map_err(|e| PlacementError::Store(e.to_string()))?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.clone(), None)]);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(PlacementError::AlreadyMoving(tenant.to_string()));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("moves/{tenant}"), Some(&value), revision)
    }

    /// Ends `tenant`'s move: it now lives on the move's destination. One
    /// transaction: the placement and the end of the record go together.
    pub async fn finish_move(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        let mv = self.own_move(tenant)?;
        let put = TxnOp::put(self.key("tenants", tenant.as_str()), mv.to.as_str(), None);
        let revision = self.end_move(tenant, Some(put)).await?;
        self.apply_local(
            &format!("tenants/{tenant}"),
            Some(mv.to.as_str().as_bytes()),
            revision,
        )?;
        Ok(mv)
    }

    /// Drops `tenant`'s move record; it stays where it was.
    pub async fn abort_move(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        let mv = self.own_move(tenant)?;
        self.end_move(tenant, None).await?;
        Ok(mv)
    }

    /// Deletes `tenant`'s move record and the proxies' reports, with
    /// `also` in the same transaction, if the record is still the one the
    /// copy holds; the transaction's revision.
    async fn end_move(
        &self,
        tenant: &TenantId,
        also: Option<TxnOp>,
    ) -> Result<i64, PlacementError> {
        let rev = self.move_rev(tenant)?;
        let moves = self.key("moves", tenant.as_str());
        let mut ops: Vec<TxnOp> = also.into_iter().collect();
        ops.push(TxnOp::delete(moves.clone(), None));
        ops.push(TxnOp::delete(
            self.key("holds", &format!("{tenant}/")),
            Some(DeleteOptions::new().with_prefix()),
        ));
        let txn = Txn::new()
            .when([Compare::mod_revision(moves, CompareOp::Equal, rev)])
            .and_then(ops);
        let resp = self.txn(txn).await?;
        if !resp.succeeded() {
            return Err(PlacementError::NotMoving(tenant.to_string()));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("moves/{tenant}"), None, revision)?;
        self.write().holds.remove(tenant.as_str());
        Ok(revision)
    }

    /// Records where `tenant`'s exported snapshot was kept, and the move
    /// id it is sealed to, if its move is still recorded.
    pub async fn record_snapshot(
        &self,
        tenant: &TenantId,
        path: std::path::PathBuf,
        seal: Option<String>,
    ) -> Result<(), PlacementError> {
        let mut mv = self.own_move(tenant)?;
        mv.snapshot = Some(path);
        mv.seal = seal;
        self.rewrite_move(tenant, &mv).await
    }

    /// Seeds a table that holds no tenant yet from a file-backed one
    /// (`state`, a single proxy's `placements.json`): its executors,
    /// cordons and placements, so a fleet that moves from the file to etcd
    /// keeps every tenant where its functions are. Each tenant is written
    /// only if no proxy placed it meanwhile. `Ok(None)`: etcd holds tenants
    /// already, and nothing was written.
    ///
    /// Refused when the file records a move in progress (its proxy must
    /// finish it first), or when one of its epochs is not below those this
    /// table gives, which executors would take for newer placements.
    pub async fn import(&self, state: &PlacementState) -> Result<Option<usize>, PlacementError> {
        if let Some(t) = state.moving.keys().next() {
            return Err(PlacementError::Store(format!(
                "cannot import a table with a move in progress (tenant {t}): start its proxy once more with the file, which finishes it"
            )));
        }
        let newest = state.epochs.values().copied().max().unwrap_or(0);
        if newest >= self.epoch_base {
            return Err(PlacementError::Store(format!(
                "cannot import a table whose epochs (up to {newest}) reach this etcd table's ({}): import into a new prefix",
                self.epoch_base
            )));
        }
        self.reachable()?;
        let any = self
            .client
            .clone()
            .get(
                format!("{}tenants/", self.prefix),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
            .map_err(|e| self.unreachable(e))?;
        if any.count() > 0 {
            return Ok(None);
        }
        let set: Vec<(String, Vec<u8>)> = state
            .executors
            .iter()
            .map(|(id, addr)| (format!("executors/{id}"), addr.as_bytes().to_vec()))
            .chain(
                state
                    .draining
                    .iter()
                    .map(|id| (format!("draining/{id}"), Vec::new())),
            )
            .collect();
        for batch in set.chunks(IMPORT_BATCH) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(k, v)| TxnOp::put(format!("{}{k}", self.prefix), v.clone(), None))
                .collect();
            let resp = self.txn(Txn::new().and_then(ops)).await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            for (k, v) in batch {
                self.apply_local(k, Some(v), revision)?;
            }
        }
        let placed: Vec<(String, Vec<u8>)> = state
            .placements
            .iter()
            .map(|(t, id)| (format!("tenants/{t}"), id.as_str().as_bytes().to_vec()))
            .collect();
        let mut imported = 0;
        for batch in placed.chunks(IMPORT_BATCH) {
            // Each key only where no proxy placed the tenant meanwhile:
            // the batch at once when none did, else one by one.
            let absent = |k: &str| {
                Compare::create_revision(format!("{}{k}", self.prefix), CompareOp::Equal, 0)
            };
            let put = |k: &str, v: &[u8]| TxnOp::put(format!("{}{k}", self.prefix), v, None);
            let txn = Txn::new()
                .when(batch.iter().map(|(k, _)| absent(k)).collect::<Vec<_>>())
                .and_then(batch.iter().map(|(k, v)| put(k, v)).collect::<Vec<_>>());
            let resp = self.txn(txn).await?;
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision());
                for (k, v) in batch {
                    self.apply_local(k, Some(v), revision)?;
                }
                imported += batch.len();
                continue;
            }
            for (k, v) in batch {
                let txn = Txn::new().when([absent(k)]).and_then([put(k, v)]);
                let resp = self.txn(txn).await?;
                if resp.succeeded() {
                    let revision = resp.header().map_or(0, |h| h.revision());
                    self.apply_local(k, Some(v), revision)?;
                    imported += 1;
                }
            }
        }
        Ok(Some(imported))
    }

    /// Forgets `tenant` (purge): its placement and any move, together.
    pub async fn remove(&self, tenant: &TenantId) -> Result<(), PlacementError> {
        let txn = Txn::new().and_then([
            TxnOp::delete(self.key("tenants", tenant.as_str()), None),
            TxnOp::delete(self.key("moves", tenant.as_str()), None),
        ]);
        let resp = self.txn(txn).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("tenants/{tenant}"), None, revision)?;
        self.apply_local(&format!("moves/{tenant}"), None, revision)
    }

    /// Where `tenant` lives (and its epoch) and whether it is moving, read
    /// from etcd itself, not the copy: for decisions that destroy
    /// something, which a stale copy must not make.
    pub async fn confirm(
        &self,
        tenant: &TenantId,
    ) -> Result<(Option<(ExecutorId, i64)>, bool), PlacementError> {
        let txn = Txn::new().and_then([
            TxnOp::get(self.key("tenants", tenant.as_str()), None),
            TxnOp::get(self.key("moves", tenant.as_str()), None),
        ]);
        let resp = self.txn(txn).await?;
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().cloned()),
            _ => None,
        });
        let placed = gets.next().flatten();
        let moving = gets.next().flatten().is_some();
        let placed = match placed {
            Some(kv) => {
                let id = std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|v| ExecutorId::new(v).ok())
                    .ok_or_else(|| {
                        PlacementError::Store(format!(
                            "tenant {tenant}: not an executor id in etcd"
                        ))
                    })?;
                Some((id, self.epoch(kv.mod_revision())))
            }
            None => None,
        };
        Ok((placed, moving))
    }

    /// The move of `tenant` the copy holds, if this proxy runs it (or it
    /// names no mover): a proxy never finishes, undoes or changes a move
    /// another took over.
    fn own_move(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        let mv = self.recorded_move(tenant)?;
        match &mv.mover {
            Some(m) if Some(m) != self.member.get() => {
                Err(PlacementError::NotMoving(tenant.to_string()))
            }
            _ => Ok(mv),
        }
    }

    /// The move of `tenant` the copy holds.
    fn recorded_move(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        self.read()
            .state
            .moving
            .get(tenant.as_str())
            .cloned()
            .ok_or_else(|| PlacementError::NotMoving(tenant.to_string()))
    }

    /// A write's first check: whether the watch reads etcd now.
    fn reachable(&self) -> Result<(), PlacementError> {
        if self.watching.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(PlacementError::Store(format!(
                "etcd at {} is unreachable; this proxy serves placed tenants from its copy",
                self.endpoints
            )))
        }
    }

    async fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, PlacementError> {
        self.reachable()?;
        self.client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| self.unreachable(e))
    }

    async fn put(&self, kind: &str, name: &str, value: &[u8]) -> Result<(), PlacementError> {
        self.reachable()?;
        let resp = self
            .client
            .clone()
            .put(self.key(kind, name), value, None)
            .await
            .map_err(|e| self.unreachable(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("{kind}/{name}"), Some(value), revision)
    }

    async fn delete(&self, kind: &str, name: &str) -> Result<(), PlacementError> {
        self.reachable()?;
        let resp = self
            .client
            .clone()
            .delete(self.key(kind, name), None)
            .await
            .map_err(|e| self.unreachable(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        self.apply_local(&format!("{kind}/{name}"), None, revision)
    }

    /// Applies this proxy's own write to its copy at once (the watch
    /// brings it again, to the same effect).
    fn apply_local(
        &self,
        key: &str,
        value: Option<&[u8]>,
        revision: i64,
    ) -> Result<(), PlacementError> {
        let mut copy = self.write();
        copy.written = copy.written.max(revision);
        copy.apply(key, value, revision)
            .map_err(|e| PlacementError::Store(e.to_string()))
    }
}

/// Grants a lease of [`PROXY_TTL_SECS`] and writes `key` on it; the
/// lease's id.
async fn register(client: &mut Client, key: &str) -> Result<i64, etcd_client::Error> {
    let lease = client.lease_grant(PROXY_TTL_SECS, None).await?.id();
    client
        .put(key, "", Some(PutOptions::new().with_lease(lease)))
        .await?;
    Ok(lease)
}

/// Renews `lease` a few times per TTL; when it is lost (etcd was away
/// longer than the TTL), registers `key` on a new one once etcd answers.
async fn keep_registered(mut client: Client, key: String, mut lease: i64, current: Arc<AtomicI64>) {
    let every = Duration::from_millis((PROXY_TTL_SECS as u64 * 1000) / 4);
    loop {
        if let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await {
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match answers.message().await {
                    Ok(Some(a)) if a.ttl() > 0 => {}
                    _ => break,
                }
                tokio::time::sleep(every).await;
            }
        }
        tracing::warn!(%key, "this proxy's lease in etcd lapsed; registering again");
        loop {
            tokio::time::sleep(RESYNC_PAUSE).await;
            match register(&mut client, &key).await {
                Ok(l) => {
                    lease = l;
                    current.store(l, Ordering::Release);
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "etcd still unreachable"),
            }
        }
    }
}

/// Why the table could not be loaded.
enum Loaded {
    Etcd(etcd_client::Error),
    Corrupt(EtcdError),
}

/// The table's epoch base (`<prefix>epoch-base`), written by the first
/// proxy that connects.
async fn load_epoch_base(client: &mut Client, prefix: &str) -> Result<i64, Loaded> {
    let key = format!("{prefix}epoch-base");
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            super::epoch_base().to_string(),
            None,
        )])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = client.txn(txn).await.map_err(Loaded::Etcd)?;
    if resp.succeeded() {
        let txn = Txn::new().and_then([TxnOp::get(key.clone(), None)]);
        return read_base(&key, client.txn(txn).await.map_err(Loaded::Etcd)?);
    }
    read_base(&key, resp)
}

fn read_base(key: &str, resp: etcd_client::TxnResponse) -> Result<i64, Loaded> {
    let value = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    value
        .and_then(|v| String::from_utf8(v).ok())
        .and_then(|v| v.parse::<i64>().ok())
        .filter(|b| *b >= 0)
        .ok_or_else(|| {
            Loaded::Corrupt(EtcdError::Corrupt {
                key: key.to_string(),
                reason: "not an epoch base".into(),
            })
        })
}

/// The whole table under `prefix`, as of one revision.
async fn load(client: &mut Client, prefix: &str) -> Result<Copy, Loaded> {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(Loaded::Etcd)?;
    let mut copy = Copy::default();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        copy.apply(rest, Some(kv.value()), kv.mod_revision())
            .map_err(Loaded::Corrupt)?;
    }
    copy.watched = resp.header().map_or(0, |h| h.revision());
    // Every change loaded is at or before `watched`.
    copy.changed.clear();
    Ok(copy)
}

/// Feeds `copy` from etcd's history under `prefix`, from the revision after
/// the one it has read; when the watch breaks, loads the table again once
/// etcd answers (history may have been compacted meanwhile) and watches on
/// from there.
async fn watch(
    mut client: Client,
    prefix: String,
    copy: Arc<RwLock<Copy>>,
    applied: tokio::sync::watch::Sender<i64>,
    watching: Arc<AtomicBool>,
    listener: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<MoveEvent>>>>,
) {
    let lock = || copy.write().unwrap_or_else(|p| p.into_inner());
    // Tells the listener of every move that began, changed or ended
    // between `before` and the copy now.
    let tell = |before: &BTreeMap<String, Move>, now: &BTreeMap<String, Move>| {
        let listener = listener.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = listener.as_ref() else { return };
        let changed = now
            .iter()
            .filter(|(t, m)| before.get(*t) != Some(*m))
            .map(|(t, m)| (t, Some(m.clone())));
        let ended = before
            .keys()
            .filter(|t| !now.contains_key(*t))
            .map(|t| (t, None));
        for (t, m) in changed.chain(ended) {
            if let Ok(t) = TenantId::new(t) {
                let _ = tx.send((t, m));
            }
        }
    };
    let mut loaded = true;
    loop {
        while !loaded {
            match load(&mut client, &prefix).await {
                Ok(fresh) => {
                    let revision = fresh.watched;
                    let mut c = lock();
                    tell(&c.state.moving, &fresh.state.moving);
                    *c = fresh;
                    drop(c);
                    let _ = applied.send(revision);
                    watching.store(true, Ordering::Release);
                    tracing::info!(revision, "placements loaded from etcd again");
                    loaded = true;
                }
                Err(Loaded::Etcd(e)) => {
                    tracing::debug!(error = %e, "etcd still unreachable");
                    tokio::time::sleep(RESYNC_PAUSE).await;
                }
                Err(Loaded::Corrupt(e)) => {
                    tracing::error!(error = %e, "placements in etcd unreadable");
                    tokio::time::sleep(RESYNC_PAUSE).await;
                }
            }
        }
        let from = copy.read().unwrap_or_else(|p| p.into_inner()).watched + 1;
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        match client.watch(prefix.clone(), Some(options)).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            tracing::warn!(reason = resp.cancel_reason(), "etcd watch cancelled");
                            break;
                        }
                        let mut c = lock();
                        let before = c.state.moving.clone();
                        for event in resp.events() {
                            let Some(kv) = event.kv() else { continue };
                            let key = String::from_utf8_lossy(kv.key());
                            let Some(rest) = key.strip_prefix(prefix.as_str()) else {
                                continue;
                            };
                            let value = (event.event_type() == EventType::Put).then(|| kv.value());
                            if let Err(e) = c.apply(rest, value, kv.mod_revision()) {
                                tracing::error!(error = %e, "placement entry ignored");
                            }
                            // Events come in revision order, each revision
                            // whole: all before this one are in.
                            c.watched = c.watched.max(kv.mod_revision());
                        }
                        let watched = c.watched;
                        c.changed.retain(|_, r| *r > watched);
                        tell(&before, &c.state.moving);
                        drop(c);
                        let _ = applied.send(watched);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd watch broke; placements served from this proxy's copy");
                        break;
                    }
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch etcd; placements served from this proxy's copy")
            }
        }
        loaded = false;
        watching.store(false, Ordering::Release);
        tokio::time::sleep(RESYNC_PAUSE).await;
    }
}

#[cfg(test)]
mod tests;
