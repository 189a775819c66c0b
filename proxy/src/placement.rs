//! Which executor owns each tenant, persisted so that a restarted proxy
//! routes every tenant where it was, and finishes any migration it finds
//! recorded (`ARCHITECTURE.md`, "Live migration").
//!
//! At a tenant's first request it is placed by consistent hashing (ketama)
//! of its id over the healthy executors that take new tenants; from then on
//! it is sticky, whatever executors come and go, until a migration moves it.
//! The table lives in one JSON file written atomically (temp file, fsync,
//! rename, fsync of the folder): a crash leaves the old table or the new
//! one, never a torn one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use pingora_ketama::{Bucket, Continuum};
use serde::{Deserialize, Serialize};
use tensor_wasm_shared::{ErrorCode, ExecutorId, TenantId};

pub mod etcd;

use etcd::EtcdPlacements;

/// Why a placement could not be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("no healthy executor takes new tenants")]
    NoExecutor,
    #[error("tenant {0} is already moving")]
    AlreadyMoving(String),
    #[error("tenant {0} is not moving")]
    NotMoving(String),
    #[error("tenant {0} has no placement")]
    Unplaced(String),
    #[error("placement file {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("placement file {0} is corrupt: {1}")]
    Corrupt(PathBuf, String),
    /// The shared store (etcd) failed or could not be reached.
    #[error("placement store: {0}")]
    Store(String),
}

impl PlacementError {
    /// The public code of this error: no executor to place on, etcd out of
    /// reach, or (anything else) a fault.
    pub fn code(&self) -> ErrorCode {
        match self {
            PlacementError::NoExecutor => ErrorCode::ExecutorUnavailable,
            PlacementError::Store(_) => ErrorCode::PlacementUnavailable,
            _ => ErrorCode::Internal,
        }
    }
}

/// A migration in progress: recorded before it starts, cleared when done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub from: ExecutorId,
    pub to: ExecutorId,
    /// The exported snapshot, kept in the state directory until the import
    /// succeeds (stop-and-copy).
    pub snapshot: Option<PathBuf>,
    /// The source's outbound session (pre-copy): the destination pulls from
    /// it, and undoing the move ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The proxy running the move, when proxies share the table: another
    /// takes the move over if this one's lease in etcd runs out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mover: Option<String>,
    /// The move has reached its pause: every proxy holds the tenant's new
    /// requests and reports when none of its own is in flight
    /// (`ARCHITECTURE.md`, "Moves across proxies").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pausing: bool,
    /// The move id the stored snapshot is sealed to: recovery imports it
    /// as that move's only (`docs/SNAPSHOT-COMPATIBILITY.md`, "The seal").
    /// None when the source could not seal it (an earlier release).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
}

/// What the file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementState {
    /// Tenant → executor id.
    pub placements: BTreeMap<String, ExecutorId>,
    /// Tenant → migration in progress.
    #[serde(default)]
    pub moving: BTreeMap<String, Move>,
    /// Executors that take no new tenants (draining, or being replaced).
    #[serde(default)]
    pub draining: BTreeSet<ExecutorId>,
    /// The executor set: id → `host:port`, as registered.
    #[serde(default)]
    pub executors: BTreeMap<ExecutorId, String>,
    /// Tenant → its placement's epoch: the table's revision when the tenant
    /// was placed where it is (executors fence stale routes with it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs: BTreeMap<String, i64>,
    /// Counts the placements made and moved, for their epochs.
    #[serde(default)]
    pub revision: i64,
}

/// An executor that may receive new tenants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: ExecutorId,
    pub addr: SocketAddr,
}

/// The placement table and its file.
#[derive(Debug)]
pub struct Placements {
    path: PathBuf,
    state: PlacementState,
}

/// Where a new placement table starts numbering its epochs: the time, in
/// microseconds since the Unix epoch. Executors refuse a request routed by
/// an older epoch than one they have seen (`ARCHITECTURE.md`, "Fencing
/// stale proxies"); a table made later (a proxy's state lost, a fleet moved
/// from the file to etcd) then starts above every epoch an older one gave,
/// unless that one placed more than a million tenants a second on average.
pub fn epoch_base() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX / 2))
}

/// Where consistent hashing (ketama) puts `tenant` among the `healthy`
/// executors that are not `draining`: the same ring gives the same answer
/// to any proxy that sees the same executors.
pub fn choose(
    draining: &BTreeSet<ExecutorId>,
    tenant: &TenantId,
    healthy: &[Candidate],
) -> Result<ExecutorId, PlacementError> {
    let open: Vec<&Candidate> = healthy
        .iter()
        .filter(|c| !draining.contains(&c.id))
        .collect();
    if open.is_empty() {
        return Err(PlacementError::NoExecutor);
    }
    let buckets: Vec<Bucket> = open.iter().map(|c| Bucket::new(c.addr, 1)).collect();
    let ring = Continuum::new(&buckets);
    let addr = ring
        .node(tenant.as_str().as_bytes())
        .ok_or(PlacementError::NoExecutor)?;
    Ok(open
        .iter()
        .find(|c| c.addr == addr)
        .ok_or(PlacementError::NoExecutor)?
        .id
        .clone())
}

impl Placements {
    /// Loads the table from `path`; a missing file is an empty table.
    pub fn load(path: &Path) -> Result<Placements, PlacementError> {
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| PlacementError::Corrupt(path.to_path_buf(), e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PlacementState::default(),
            Err(e) => return Err(PlacementError::Io(path.to_path_buf(), e)),
        };
        let mut placements = Placements {
            path: path.to_path_buf(),
            state,
        };
        // A table's epochs start from the time it was made (see
        // [`epoch_base`]), so that a table made anew never numbers its
        // placements below those of one that came before it.
        if placements.state.revision == 0 {
            placements.state.revision = epoch_base();
        }
        Ok(placements)
    }

    pub fn state(&self) -> &PlacementState {
        &self.state
    }

    /// Where `tenant` lives, if placed.
    pub fn get(&self, tenant: &TenantId) -> Option<&ExecutorId> {
        self.state.placements.get(tenant.as_str())
    }

    /// The epoch of `tenant`'s placement (0 for one placed before epochs).
    pub fn epoch(&self, tenant: &TenantId) -> i64 {
        self.state.epochs.get(tenant.as_str()).copied().unwrap_or(0)
    }

    /// Points `tenant` at `executor` under a new epoch.
    fn set(&mut self, tenant: &TenantId, executor: ExecutorId) {
        self.state.revision += 1;
        self.state
            .epochs
            .insert(tenant.to_string(), self.state.revision);
        self.state.placements.insert(tenant.to_string(), executor);
    }

    /// Where `tenant` lives, placing it first if it is new: consistent
    /// hashing over `healthy` executors that are not draining.
    pub fn place(
        &mut self,
        tenant: &TenantId,
        healthy: &[Candidate],
    ) -> Result<ExecutorId, PlacementError> {
        if let Some(id) = self.get(tenant) {
            return Ok(id.clone());
        }
        let chosen = self.choose(tenant, healthy)?;
        self.set(tenant, chosen.clone());
        self.save()?;
        Ok(chosen)
    }

    /// Where [`place`](Self::place) would put a new tenant, without
    /// recording it: the same ring gives the same answer to any proxy that
    /// sees the same executors, so a proxy handing its sockets to its
    /// successor routes new tenants where the successor will place them.
    pub fn choose(
        &self,
        tenant: &TenantId,
        healthy: &[Candidate],
    ) -> Result<ExecutorId, PlacementError> {
        choose(&self.state.draining, tenant, healthy)
    }

    /// Records an executor (or its new address).
    pub fn add_executor(&mut self, id: &ExecutorId, addr: &str) -> Result<(), PlacementError> {
        if self.state.executors.get(id).map(String::as_str) == Some(addr) {
            return Ok(());
        }
        self.state.executors.insert(id.clone(), addr.to_string());
        self.save()
    }

    /// Forgets an executor; the caller checks that it holds no tenants.
    pub fn remove_executor(&mut self, id: &str) -> Result<(), PlacementError> {
        self.state.executors.remove(id);
        self.state.draining.remove(id);
        self.save()
    }

    /// Tenant → executor, all of them.
    pub fn all(&self) -> &BTreeMap<String, ExecutorId> {
        &self.state.placements
    }

    /// Records "tenant moving from → to" before any step of the move.
    pub fn begin_move(
        &mut self,
        tenant: &TenantId,
        to: &ExecutorId,
    ) -> Result<Move, PlacementError> {
        self.begin_move_with(tenant, to, None)
    }

    /// Records a move, pre-copy from the source's `session` when given.
    pub fn begin_move_with(
        &mut self,
        tenant: &TenantId,
        to: &ExecutorId,
        session: Option<String>,
    ) -> Result<Move, PlacementError> {
        if self.state.moving.contains_key(tenant.as_str()) {
            return Err(PlacementError::AlreadyMoving(tenant.to_string()));
        }
        let from = self
            .get(tenant)
            .ok_or_else(|| PlacementError::Unplaced(tenant.to_string()))?
            .clone();
        let m = Move {
            from,
            to: to.clone(),
            snapshot: None,
            session,
            mover: None,
            pausing: false,
            seal: None,
        };
        self.state.moving.insert(tenant.to_string(), m.clone());
        self.save()?;
        Ok(m)
    }

    /// Records where the exported snapshot was kept, and the move id it
    /// is sealed to.
    pub fn record_snapshot(
        &mut self,
        tenant: &TenantId,
        path: PathBuf,
        seal: Option<String>,
    ) -> Result<(), PlacementError> {
        let m = self
            .state
            .moving
            .get_mut(tenant.as_str())
            .ok_or_else(|| PlacementError::NotMoving(tenant.to_string()))?;
        m.snapshot = Some(path);
        m.seal = seal;
        self.save()
    }

    /// The move succeeded: the tenant now lives at its destination.
    pub fn finish_move(&mut self, tenant: &TenantId) -> Result<Move, PlacementError> {
        let m = self
            .state
            .moving
            .remove(tenant.as_str())
            .ok_or_else(|| PlacementError::NotMoving(tenant.to_string()))?;
        self.set(tenant, m.to.clone());
        self.save()?;
        Ok(m)
    }

    /// The move failed: the tenant stays at its source.
    pub fn abort_move(&mut self, tenant: &TenantId) -> Result<Move, PlacementError> {
        let m = self
            .state
            .moving
            .remove(tenant.as_str())
            .ok_or_else(|| PlacementError::NotMoving(tenant.to_string()))?;
        self.save()?;
        Ok(m)
    }

    /// Moves recorded but not finished (what a restarted proxy completes).
    pub fn pending_moves(&self) -> Vec<(TenantId, Move)> {
        self.state
            .moving
            .iter()
            .filter_map(|(t, m)| TenantId::new(t.as_str()).ok().map(|t| (t, m.clone())))
            .collect()
    }

    /// Stops or resumes placing new tenants on an executor.
    pub fn set_draining(
        &mut self,
        executor: &ExecutorId,
        draining: bool,
    ) -> Result<(), PlacementError> {
        let changed = if draining {
            self.state.draining.insert(executor.clone())
        } else {
            self.state.draining.remove(executor)
        };
        if changed { self.save() } else { Ok(()) }
    }

    /// Forgets a tenant (purge).
    pub fn remove(&mut self, tenant: &TenantId) -> Result<(), PlacementError> {
        self.state.placements.remove(tenant.as_str());
        self.state.epochs.remove(tenant.as_str());
        self.state.moving.remove(tenant.as_str());
        self.save()
    }

    /// Tenants on an executor.
    pub fn tenants_of(&self, executor: &str) -> Vec<String> {
        self.state
            .placements
            .iter()
            .filter(|(_, e)| e.as_str() == executor)
            .map(|(t, _)| t.clone())
            .collect()
    }

    fn save(&self) -> Result<(), PlacementError> {
        let io = |e| PlacementError::Io(self.path.clone(), e);
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| PlacementError::Corrupt(self.path.clone(), e.to_string()))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }
}

/// Where a proxy keeps the placement table: a file of its own (one proxy,
/// `tensor-wasm up`'s default) or etcd, shared by every proxy of a fleet
/// (`ARCHITECTURE.md`, "Placement in etcd"). Reads come from memory either
/// way; only writes may wait for etcd.
#[derive(Debug)]
pub enum PlacementStore {
    File(Mutex<Placements>),
    Etcd(Box<EtcdPlacements>),
}

impl From<Placements> for PlacementStore {
    fn from(p: Placements) -> Self {
        PlacementStore::File(Mutex::new(p))
    }
}

impl From<EtcdPlacements> for PlacementStore {
    fn from(p: EtcdPlacements) -> Self {
        PlacementStore::Etcd(Box::new(p))
    }
}

impl PlacementStore {
    fn file(m: &Mutex<Placements>) -> MutexGuard<'_, Placements> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the table is shared with other proxies (etcd).
    pub fn is_shared(&self) -> bool {
        matches!(self, PlacementStore::Etcd(_))
    }

    /// A copy of the whole table.
    pub fn state(&self) -> PlacementState {
        match self {
            PlacementStore::File(m) => Self::file(m).state().clone(),
            PlacementStore::Etcd(e) => e.state(),
        }
    }

    /// Where `tenant` lives, if placed.
    pub fn get(&self, tenant: &TenantId) -> Option<ExecutorId> {
        self.locate(tenant).map(|(id, _)| id)
    }

    /// Where `tenant` lives and its placement's epoch, if placed.
    pub fn locate(&self, tenant: &TenantId) -> Option<(ExecutorId, i64)> {
        match self {
            PlacementStore::File(m) => {
                let p = Self::file(m);
                p.get(tenant).map(|id| (id.clone(), p.epoch(tenant)))
            }
            PlacementStore::Etcd(e) => e.get(tenant),
        }
    }

    /// Where `tenant` lives (and its epoch) and whether it is moving, from
    /// the store itself: the file, or etcd read through rather than the
    /// copy. For decisions that destroy something.
    pub async fn confirm(
        &self,
        tenant: &TenantId,
    ) -> Result<(Option<(ExecutorId, i64)>, bool), PlacementError> {
        match self {
            PlacementStore::File(_) => Ok((self.locate(tenant), self.moving(tenant).is_some())),
            PlacementStore::Etcd(e) => e.confirm(tenant).await,
        }
    }

    /// `tenant`'s move in progress, if any.
    pub fn moving(&self, tenant: &TenantId) -> Option<Move> {
        match self {
            PlacementStore::File(m) => Self::file(m).state().moving.get(tenant.as_str()).cloned(),
            PlacementStore::Etcd(e) => e.moving(tenant),
        }
    }

    /// Whether `executor` takes no new tenants.
    pub fn is_draining(&self, executor: &ExecutorId) -> bool {
        match self {
            PlacementStore::File(m) => Self::file(m).state().draining.contains(executor),
            PlacementStore::Etcd(e) => e.is_draining(executor),
        }
    }

    /// The executor set: id → `host:port`.
    pub fn executors(&self) -> BTreeMap<ExecutorId, String> {
        match self {
            PlacementStore::File(m) => Self::file(m).state().executors.clone(),
            PlacementStore::Etcd(e) => e.executors(),
        }
    }

    /// Tenants on `executor`.
    pub fn tenants_of(&self, executor: &str) -> Vec<String> {
        match self {
            PlacementStore::File(m) => Self::file(m).tenants_of(executor),
            PlacementStore::Etcd(e) => e.tenants_of(executor),
        }
    }

    /// How many tenants are placed.
    pub fn len(&self) -> usize {
        match self {
            PlacementStore::File(m) => Self::file(m).all().len(),
            PlacementStore::Etcd(e) => e.len(),
        }
    }

    /// Whether no tenant is placed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves recorded but not finished.
    pub fn pending_moves(&self) -> Vec<(TenantId, Move)> {
        let moving = match self {
            PlacementStore::File(m) => Self::file(m).state().moving.clone(),
            PlacementStore::Etcd(e) => e.moves(),
        };
        moving
            .into_iter()
            .filter_map(|(t, m)| TenantId::new(&t).ok().map(|t| (t, m)))
            .collect()
    }

    /// Where [`place`](Self::place) would put a new tenant, recording
    /// nothing.
    pub fn choose(
        &self,
        tenant: &TenantId,
        healthy: &[Candidate],
    ) -> Result<ExecutorId, PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).choose(tenant, healthy),
            PlacementStore::Etcd(e) => e.choose(tenant, healthy),
        }
    }

    /// Where `tenant` lives and its placement's epoch, placing it first
    /// if it is new.
    pub async fn place(
        &self,
        tenant: &TenantId,
        healthy: &[Candidate],
    ) -> Result<(ExecutorId, i64), PlacementError> {
        match self {
            PlacementStore::File(m) => {
                let mut p = Self::file(m);
                let id = p.place(tenant, healthy)?;
                Ok((id, p.epoch(tenant)))
            }
            PlacementStore::Etcd(e) => e.place(tenant, healthy).await,
        }
    }

    /// Records an executor (or its new address).
    pub async fn add_executor(&self, id: &ExecutorId, addr: &str) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).add_executor(id, addr),
            PlacementStore::Etcd(e) => {
                if e.state_executor(id).as_deref() == Some(addr) {
                    return Ok(());
                }
                e.add_executor(id, addr).await
            }
        }
    }

    /// Forgets an executor.
    pub async fn remove_executor(&self, id: &str) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).remove_executor(id),
            PlacementStore::Etcd(e) => e.remove_executor(id).await,
        }
    }

    /// Stops or resumes placing new tenants on `executor`.
    pub async fn set_draining(
        &self,
        executor: &ExecutorId,
        draining: bool,
    ) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).set_draining(executor, draining),
            PlacementStore::Etcd(e) => {
                if e.is_draining(executor) == draining {
                    return Ok(());
                }
                e.set_draining(executor, draining).await
            }
        }
    }

    /// Records "tenant moving to `to`" (pre-copy from the source's
    /// `session` when given) before any step of the move.
    pub async fn begin_move(
        &self,
        tenant: &TenantId,
        to: &ExecutorId,
        session: Option<String>,
    ) -> Result<Move, PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).begin_move_with(tenant, to, session),
            PlacementStore::Etcd(e) => {
                let from = e
                    .get(tenant)
                    .ok_or_else(|| PlacementError::Unplaced(tenant.to_string()))?
                    .0;
                let mv = Move {
                    from,
                    to: to.clone(),
                    snapshot: None,
                    session,
                    mover: e.member(),
                    pausing: false,
                    seal: None,
                };
                e.begin_move(tenant, &mv).await?;
                Ok(mv)
            }
        }
    }

    /// This proxy's id among the proxies sharing the table, if it shares one.
    pub fn member(&self) -> Option<String> {
        match self {
            PlacementStore::File(_) => None,
            PlacementStore::Etcd(e) => e.member(),
        }
    }

    /// The live proxies sharing the table (none for a file of one's own).
    pub fn proxies(&self) -> Vec<String> {
        match self {
            PlacementStore::File(_) => Vec::new(),
            PlacementStore::Etcd(e) => e.proxies(),
        }
    }

    /// Leaves the proxies sharing the table, at a graceful stop.
    pub async fn leave(&self) {
        if let PlacementStore::Etcd(e) = self {
            e.leave().await;
        }
    }

    /// The move of `tenant` reaches its pause: every other proxy sharing
    /// the table holds the tenant's requests and reports it (`hold`).
    pub async fn pause(&self, tenant: &TenantId) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(_) => Ok(()),
            PlacementStore::Etcd(e) => e.pause(tenant).await,
        }
    }

    /// This proxy holds `tenant`'s requests and has none in flight.
    pub async fn hold(&self, tenant: &TenantId) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(_) => Ok(()),
            PlacementStore::Etcd(e) => e.hold(tenant).await,
        }
    }

    /// The other live proxies that have not reported holding `tenant`.
    pub fn not_holding(&self, tenant: &TenantId) -> Vec<String> {
        match self {
            PlacementStore::File(_) => Vec::new(),
            PlacementStore::Etcd(e) => e.not_holding(tenant),
        }
    }

    /// Moves whose mover's lease has run out (it died, or lost etcd).
    pub fn orphaned_moves(&self) -> Vec<(TenantId, Move)> {
        match self {
            PlacementStore::File(_) => Vec::new(),
            PlacementStore::Etcd(e) => e.orphaned_moves(),
        }
    }

    /// Makes this proxy the mover of `tenant`'s orphaned move `mv`, unless
    /// the record changed meanwhile (another proxy took it first).
    pub async fn take_over(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        match self {
            PlacementStore::File(_) => Err(PlacementError::NotMoving(tenant.to_string())),
            PlacementStore::Etcd(e) => e.take_over(tenant).await,
        }
    }

    /// Records where the exported snapshot was kept, and the move id it
    /// is sealed to.
    pub async fn record_snapshot(
        &self,
        tenant: &TenantId,
        path: PathBuf,
        seal: Option<String>,
    ) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).record_snapshot(tenant, path, seal),
            PlacementStore::Etcd(e) => e.record_snapshot(tenant, path, seal).await,
        }
    }

    /// The move succeeded: the tenant now lives at its destination.
    pub async fn finish_move(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).finish_move(tenant),
            PlacementStore::Etcd(e) => e.finish_move(tenant).await,
        }
    }

    /// The move failed: the tenant stays at its source.
    pub async fn abort_move(&self, tenant: &TenantId) -> Result<Move, PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).abort_move(tenant),
            PlacementStore::Etcd(e) => e.abort_move(tenant).await,
        }
    }

    /// Forgets a tenant (purge).
    pub async fn remove(&self, tenant: &TenantId) -> Result<(), PlacementError> {
        match self {
            PlacementStore::File(m) => Self::file(m).remove(tenant),
            PlacementStore::Etcd(e) => e.remove(tenant).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    fn x(s: &str) -> ExecutorId {
        ExecutorId::new(s).unwrap()
    }

    fn cands(n: u16) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                id: x(&format!("cpu{i}")),
                addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i)),
            })
            .collect()
    }

    #[test]
    fn placement_is_spread_sticky_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("placements.json");
        let mut p = Placements::load(&path).unwrap();
        let execs = cands(3);
        let mut count = BTreeMap::new();
        for i in 0..300 {
            let id = p.place(&t(&format!("tenant-{i}")), &execs).unwrap();
            *count.entry(id).or_insert(0) += 1;
        }
        assert_eq!(count.len(), 3, "every executor gets tenants: {count:?}");
        assert!(count.values().all(|&n| n > 50), "{count:?}");
        // Sticky even when the executor set changes.
        let first = p.get(&t("tenant-7")).unwrap().clone();
        let others: Vec<Candidate> = execs.iter().filter(|c| c.id != first).cloned().collect();
        assert_eq!(p.place(&t("tenant-7"), &others).unwrap(), first);
        // And after a restart.
        let again = Placements::load(&path).unwrap();
        assert_eq!(again.get(&t("tenant-7")), Some(&first));
        assert_eq!(again.state().placements.len(), 300);
    }

    #[test]
    fn draining_executors_get_no_new_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Placements::load(&dir.path().join("p.json")).unwrap();
        let execs = cands(2);
        p.set_draining(&x("cpu0"), true).unwrap();
        for i in 0..50 {
            assert_eq!(p.place(&t(&format!("x{i}")), &execs).unwrap(), x("cpu1"));
        }
        p.set_draining(&x("cpu1"), true).unwrap();
        assert!(matches!(
            p.place(&t("late"), &execs),
            Err(PlacementError::NoExecutor)
        ));
        assert!(matches!(
            p.place(&t("late"), &[]),
            Err(PlacementError::NoExecutor)
        ));
    }

    #[test]
    fn moves_are_recorded_until_finished_or_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let mut p = Placements::load(&path).unwrap();
        let execs = cands(1);
        p.place(&t("a"), &execs).unwrap();
        p.begin_move(&t("a"), &x("cpu9")).unwrap();
        assert!(matches!(
            p.begin_move(&t("a"), &x("cpu8")),
            Err(PlacementError::AlreadyMoving(_))
        ));
        p.record_snapshot(&t("a"), dir.path().join("a.twsnap"), None)
            .unwrap();
        // A proxy restarting now finds the move, snapshot path included.
        let restarted = Placements::load(&path).unwrap();
        let pending = restarted.pending_moves();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].1.from, x("cpu0"));
        assert_eq!(
            pending[0].1.snapshot.as_deref(),
            Some(dir.path().join("a.twsnap").as_path())
        );
        p.finish_move(&t("a")).unwrap();
        assert_eq!(p.get(&t("a")), Some(&x("cpu9")));
        p.begin_move(&t("a"), &x("cpu0")).unwrap();
        p.abort_move(&t("a")).unwrap();
        assert_eq!(p.get(&t("a")), Some(&x("cpu9")));
        assert!(matches!(
            p.finish_move(&t("a")),
            Err(PlacementError::NotMoving(_))
        ));
        assert!(matches!(
            p.begin_move(&t("nobody"), &x("cpu0")),
            Err(PlacementError::Unplaced(_))
        ));
        assert_eq!(p.tenants_of("cpu9"), vec!["a".to_string()]);
        p.remove(&t("a")).unwrap();
        assert_eq!(p.get(&t("a")), None);
    }

    #[test]
    fn every_placement_and_move_is_a_newer_epoch_which_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let mut p = Placements::load(&path).unwrap();
        let execs = cands(2);
        p.place(&t("a"), &execs).unwrap();
        p.place(&t("b"), &execs).unwrap();
        let (a, b) = (p.epoch(&t("a")), p.epoch(&t("b")));
        assert!(b > a && a > epoch_base() - 600_000_000, "{a} {b}");
        p.begin_move(&t("a"), &x("cpu9")).unwrap();
        p.finish_move(&t("a")).unwrap();
        let moved = p.epoch(&t("a"));
        assert!(moved > b);
        let again = Placements::load(&path).unwrap();
        assert_eq!(again.epoch(&t("a")), moved);
        // A table made anew (its file lost) starts above the old one.
        let fresh = Placements::load(&dir.path().join("new.json")).unwrap();
        assert!(fresh.state().revision > moved);
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            Placements::load(&path),
            Err(PlacementError::Corrupt(..))
        ));
    }
}
