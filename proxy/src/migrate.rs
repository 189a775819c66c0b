//! Live migration of tenants between executors (`ARCHITECTURE.md`, "Live
//! migration"), and the admin operations built on it: drain, rebalance,
//! snapshot, restore, purge.
//!
//! Moving tenant T from executor A to B, pre-copy:
//!
//! 1. A starts an outbound session for T (it tracks the pages T writes);
//!    the placement file records "T moving A→B, session S".
//! 2. B pulls T from A while T runs: modules and assets by hash, then
//!    rounds of what changed since the last, until one is small. The gate
//!    stays open: T's requests go to A.
//! 3. T's gate closes; the proxy waits until T has no request in flight to
//!    A (deadline: the queue's; on timeout the move is undone).
//! 4. B commits: it takes the final round from A (A freezes T first),
//!    applies it, persists T's functions and publishes T.
//! 5. The placement file points T at B, the gate opens and the queue
//!    drains to B; then A drops T.
//!
//! Undo (a failure before step 5): B discards what it staged, A ends the
//! session (thawing T), the record goes, the gate opens at A. A failed
//! commit is first asked of B (`Orchestrator::decide`): a discard answers
//! whether B committed, and if it did the move is finished instead; if B
//! does not answer, the move is held for recovery, gate closed.
//!
//! Why no request is lost: a request is either in flight before step 3 (and
//! step 3 waits for its answer), or it waits at the gate until step 5 or
//! the undo decides where T lives, and then goes there. T is frozen on A
//! only from its final round, while the gate is closed; B serves T only
//! once the placement says B, after B published it.
//!
//! A proxy that starts and finds a move recorded ([`Orchestrator::recover`])
//! holds T's gate and decides as after a failed commit: finished if B
//! committed, undone otherwise, held while B does not answer.
//!
//! Executors of an older release have no outbound or inbound routes
//! (`not_found`): T then moves by stop-and-copy, the protocol before
//! pre-copy, whose pause grows with T:
//!
//! 0. B compiles T's modules (fetched from A) into its module cache while T
//!    runs; best effort.
//! 1. Record "T moving A→B", close T's gate, wait for its requests in
//!    flight.
//! 2. A exports T (freezing it), sealed to a random move id; the proxy
//!    writes the bytes to `<state>/moves/<T>.twsnap` (fsync) and records
//!    the path and the id, so the bytes outlive A and nothing else stands
//!    in for them (`docs/SNAPSHOT-COMPATIBILITY.md`, "The seal").
//! 3. B imports them as that move's; if B fails, A thaws T and the move
//!    is undone.
//! 4. The placement points T at B, the gate opens, A drops T, the stored
//!    bytes go. A recovering proxy imports stored bytes to B (unless B has
//!    T), or, without them, thaws T on A.
//!
//! Each executor call above is one method of
//! [`crate::upstream::ExecutorApi`]; proxy/src/migrate/tests.rs walks the
//! steps and their failures against in-memory executors.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tensor_wasm_shared::{ApiError, ErrorCode, ExecutorId, TenantId};
use tokio::time::Instant;

use crate::fleet::{CloseError, Executor, Fleet};
use crate::metrics::ProxyMetrics;
use crate::placement::{Candidate, PlacementError};
use crate::upstream::{CONTROL_TIMEOUT, InboundState, UpstreamError};

/// How often drain tries a move refused for requests still in flight.
const MOVE_TRIES: u32 = 3;

/// One finished move.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MoveReport {
    pub tenant: String,
    pub from: ExecutorId,
    pub to: ExecutorId,
    /// How long the tenant's requests were held, in ms.
    pub pause_ms: f64,
    /// Bytes moved in all.
    pub bytes: u64,
    /// Bytes moved while the tenant ran (modules, assets, pre-copy rounds).
    pub precopy_bytes: u64,
    /// Bytes moved in the pause (the final round, or the whole snapshot).
    pub pause_bytes: u64,
    /// Streams sent: the pre-copy rounds and the final one.
    pub rounds: u32,
    /// How long the copy while the tenant ran took, in ms, and its last
    /// round (whose start the final round's changes are counted from).
    pub precopy_ms: f64,
    pub last_round_ms: f64,
    pub protocol: Protocol,
}

impl MoveReport {
    /// A move to where the tenant is.
    fn none(t: &TenantId, at: &ExecutorId) -> MoveReport {
        MoveReport {
            tenant: t.to_string(),
            from: at.clone(),
            to: at.clone(),
            pause_ms: 0.0,
            bytes: 0,
            precopy_bytes: 0,
            pause_bytes: 0,
            rounds: 0,
            precopy_ms: 0.0,
            last_round_ms: 0.0,
            protocol: Protocol::None,
        }
    }
}

/// How a tenant moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// Copied while it ran; only the last changes in the pause.
    PreCopy,
    /// Exported and imported whole in the pause (executors of an older
    /// release).
    StopAndCopy,
    /// It was there already.
    None,
}

/// Why pre-copy did not move a tenant.
enum Fallback {
    /// The destination is of an older release: move by stop-and-copy.
    StopAndCopy,
    Failed(MigrateError),
}

/// What a destination says of a tenant after a failed or unknown commit.
enum Decided {
    Committed,
    Undone,
    Unknown,
}

/// A move that did not happen.
#[derive(Clone, Debug, Serialize)]
pub struct MoveFailure {
    pub tenant: String,
    pub error: ApiError,
}

/// Why a migration or tenant operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{0:?} is not a valid tenant id")]
    BadTenant(String),
    #[error("tenant {0} has no placement")]
    UnknownTenant(String),
    /// Not registered, or not an executor id at all.
    #[error("executor {0} is not registered")]
    UnknownExecutor(String),
    #[error("a migration or snapshot of tenant {0} is already running")]
    AlreadyMoving(String),
    #[error(
        "requests of tenant {0} still in flight after {1:?} (an open stream stays in flight until it ends); the move was undone and the tenant stays where it was"
    )]
    Busy(String, Duration),
    #[error(
        "proxies {1:?} did not report holding tenant {0} with no request in flight within {2:?}; the move was undone and the tenant stays where it was"
    )]
    NotHeld(String, Vec<String>, Duration),
    #[error("executor {0} is unhealthy")]
    ExecutorDown(ExecutorId),
    #[error("export from {0} failed: {1}")]
    ExportFailed(ExecutorId, UpstreamError),
    #[error("import into {0} failed: {1}")]
    ImportFailed(ExecutorId, UpstreamError),
    #[error("executor {0} refused the snapshot: {1}")]
    SnapshotRefused(ExecutorId, UpstreamError),
    #[error("executor {0} refused: {1}")]
    Executor(ExecutorId, UpstreamError),
    #[error("placement table: {0}")]
    Placement(#[from] PlacementError),
    #[error("snapshot store {0}: {1}")]
    Store(PathBuf, std::io::Error),
    #[error("the migration task failed: {0}")]
    Task(String),
}

impl MigrateError {
    /// The admin API's answer for this error.
    pub fn api_error(&self) -> ApiError {
        let code = match self {
            MigrateError::BadTenant(_) => ErrorCode::InvalidInput,
            MigrateError::UnknownTenant(_) | MigrateError::UnknownExecutor(_) => {
                ErrorCode::NotFound
            }
            MigrateError::AlreadyMoving(_) => ErrorCode::MigrationRunning,
            MigrateError::Busy(..) | MigrateError::NotHeld(..) => ErrorCode::DeadlineExceeded,
            MigrateError::ExecutorDown(_) | MigrateError::ExportFailed(..) => {
                ErrorCode::ExecutorUnavailable
            }
            MigrateError::ImportFailed(..) => ErrorCode::ImportFailed,
            MigrateError::SnapshotRefused(..) => ErrorCode::InvalidInput,
            MigrateError::Executor(_, e) => match e.code() {
                Some(ErrorCode::TenantExists) => ErrorCode::TenantExists,
                Some(ErrorCode::TenantNotHere | ErrorCode::NotFound) => ErrorCode::NotFound,
                _ if e.is_unreachable() => ErrorCode::ExecutorUnavailable,
                _ => ErrorCode::ImportFailed,
            },
            MigrateError::Placement(e) => e.code(),
            MigrateError::Store(..) | MigrateError::Task(_) => ErrorCode::Internal,
        };
        ApiError::new(code, self.to_string())
    }
}

/// A recorded move found at start-up, its tenant's gate held closed.
#[derive(Debug)]
pub struct HeldMove {
    pub tenant: TenantId,
    pub mv: crate::placement::Move,
    _closed: crate::fleet::Closed,
}

/// Runs migrations and the operations built on them.
#[derive(Debug)]
pub struct Orchestrator {
    fleet: Arc<Fleet>,
    metrics: Arc<ProxyMetrics>,
    /// One fleet-wide operation (drain, rebalance) at a time; single moves
    /// are serialised per tenant by its gate.
    bulk: tokio::sync::Mutex<()>,
    /// Moves that recovery must finish or undo, their tenants' gates held
    /// closed meanwhile: found at start-up, or left undecided by a failed
    /// commit.
    held: tokio::sync::Mutex<Vec<HeldMove>>,
}

impl Orchestrator {
    pub fn new(fleet: Arc<Fleet>, metrics: Arc<ProxyMetrics>) -> Orchestrator {
        Orchestrator {
            fleet,
            metrics,
            bulk: tokio::sync::Mutex::new(()),
            held: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    fn tenant(s: &str) -> Result<TenantId, MigrateError> {
        TenantId::new(s).map_err(|_| MigrateError::BadTenant(s.to_string()))
    }

    fn known(&self, id: &str) -> Result<Arc<Executor>, MigrateError> {
        self.fleet
            .executor(id)
            .ok_or_else(|| MigrateError::UnknownExecutor(id.to_string()))
    }

    fn home(&self, tenant: &TenantId) -> Result<Arc<Executor>, MigrateError> {
        let id = self
            .fleet
            .table()
            .get(tenant)
            .ok_or_else(|| MigrateError::UnknownTenant(tenant.to_string()))?;
        self.known(id.as_str())
    }

    fn snapshot_path(&self, tenant: &TenantId) -> PathBuf {
        self.fleet
            .state_dir()
            .join("moves")
            .join(format!("{tenant}.twsnap"))
    }

    /// Moves `tenant` to executor `to` (module doc, steps 1–5).
    ///
    /// The move runs on its own task: a caller that goes away (an admin
    /// client that disconnects) cannot cancel it half way, with the tenant
    /// frozen and its move recorded.
    pub async fn migrate(
        self: &Arc<Self>,
        tenant: &str,
        to: &str,
    ) -> Result<MoveReport, MigrateError> {
        self.migrate_with(tenant, to, false).await
    }

    /// As [`migrate`](Self::migrate); with `stop_and_copy`, by the protocol
    /// before pre-copy whatever the executors offer.
    pub async fn migrate_with(
        self: &Arc<Self>,
        tenant: &str,
        to: &str,
        stop_and_copy: bool,
    ) -> Result<MoveReport, MigrateError> {
        let (this, tenant, to) = (self.clone(), tenant.to_string(), to.to_string());
        match tokio::spawn(async move { this.migrate_logged(&tenant, &to, stop_and_copy).await })
            .await
        {
            Ok(r) => r,
            Err(e) => Err(MigrateError::Task(e.to_string())),
        }
    }

    async fn migrate_logged(
        &self,
        tenant: &str,
        to: &str,
        stop_and_copy: bool,
    ) -> Result<MoveReport, MigrateError> {
        let result = self.migrate_inner(tenant, to, stop_and_copy).await;
        let label = if result.is_ok() { "success" } else { "failed" };
        self.metrics.migrations.with_label_values(&[label]).inc();
        match &result {
            Ok(r) => {
                self.metrics.migration_pause.observe(r.pause_ms / 1e3);
                tracing::info!(tenant = %r.tenant, from = %r.from, to = %r.to, pause_ms = r.pause_ms, bytes = r.bytes, "tenant migrated");
            }
            Err(e) => tracing::warn!(%tenant, %to, error = %e, "migration failed"),
        }
        result
    }

    async fn migrate_inner(
        &self,
        tenant: &str,
        to: &str,
        stop_and_copy: bool,
    ) -> Result<MoveReport, MigrateError> {
        let t = Self::tenant(tenant)?;
        let src = self.home(&t)?;
        let dest = self.known(to)?;
        if src.id == dest.id {
            return Ok(MoveReport::none(&t, &src.id));
        }
        if !dest.is_healthy() {
            return Err(MigrateError::ExecutorDown(dest.id.clone()));
        }
        if stop_and_copy {
            return self.stop_and_copy(&t, &src, &dest).await;
        }
        // Step 1: an outbound session on the source. A source of an older
        // release has no such route: it moves by stop-and-copy.
        match self.fleet.client(&src).start_outbound(&t).await {
            Ok(session) => match self.precopy(&t, &src, &dest, session).await {
                Err(Fallback::StopAndCopy) => self.stop_and_copy(&t, &src, &dest).await,
                Err(Fallback::Failed(e)) => Err(e),
                Ok(r) => Ok(r),
            },
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                self.stop_and_copy(&t, &src, &dest).await
            }
            // A has never seen T: there is nothing to carry.
            Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => {
                self.stop_and_copy(&t, &src, &dest).await
            }
            Err(e) => Err(MigrateError::ExportFailed(src.id.clone(), e)),
        }
    }

    /// Pre-copy, steps 1–5 of the module doc; `session` is the source's.
    async fn precopy(
        &self,
        t: &TenantId,
        src: &Executor,
        dest: &Executor,
        session: String,
    ) -> Result<MoveReport, Fallback> {
        let to = self.fleet.client(dest);
        // 1. Record the move with its session.
        let recorded = self
            .fleet
            .table()
            .begin_move(t, &dest.id, Some(session.clone()))
            .await;
        if let Err(e) = recorded {
            self.end_session(src, &session).await;
            return Err(Fallback::Failed(match e {
                PlacementError::AlreadyMoving(t) => MigrateError::AlreadyMoving(t),
                e => e.into(),
            }));
        }
        // 2. B pulls T from A while T runs.
        let pull_started = Instant::now();
        let pulled = match to.pull(t, &src.addr, &session).await {
            Ok(p) => p,
            Err(e) => {
                self.undo(t, src, dest, &session).await;
                // A destination of an older release has no such route (a
                // pull answers `not_found` for nothing else: the source's
                // refusals come back as its own codes).
                if e.code() == Some(ErrorCode::NotFound) {
                    return Err(Fallback::StopAndCopy);
                }
                return Err(Fallback::Failed(MigrateError::ImportFailed(
                    dest.id.clone(),
                    e,
                )));
            }
        };
        let precopy_ms = pull_started.elapsed().as_secs_f64() * 1e3;
        // 3. Close the gate and wait for T's requests in flight to A; with
        //    proxies sharing the table, every other proxy does the same and
        //    reports it.
        let closed = match self.pause(t).await {
            Ok(c) => c,
            Err(e) => {
                self.undo(t, src, dest, &session).await;
                return Err(Fallback::Failed(e));
            }
        };
        let paused_at = Instant::now();
        // 4. B takes the final round (A freezes T) and publishes T.
        let pause_bytes = match to.commit(t).await {
            Ok(c) => c.bytes,
            Err(e) => match self.decide(t, dest).await {
                Decided::Committed => 0,
                Decided::Undone => {
                    self.end_session(src, &session).await;
                    self.abort_record(t).await;
                    drop(closed);
                    return Err(Fallback::Failed(MigrateError::ImportFailed(
                        dest.id.clone(),
                        e,
                    )));
                }
                Decided::Unknown => {
                    // B may have published T: recovery holds T's gate and
                    // asks B again until it answers.
                    tracing::error!(tenant = %t, to = %dest.id, error = %e, "commit failed and the destination does not say whether it published the tenant; recovery decides");
                    self.hand_to_recovery(t, closed).await;
                    return Err(Fallback::Failed(MigrateError::ImportFailed(
                        dest.id.clone(),
                        e,
                    )));
                }
            },
        };
        // 5. Point T at B, release the queue, and let A drop its copy.
        if let Err(e) = self.fleet.table().finish_move(t).await {
            return Err(Fallback::Failed(e.into()));
        }
        drop(closed);
        let pause_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        self.drop_on(src, t).await;
        Ok(MoveReport {
            tenant: t.to_string(),
            from: src.id.clone(),
            to: dest.id.clone(),
            pause_ms,
            bytes: pulled.bytes + pulled.blob_bytes + pause_bytes,
            precopy_bytes: pulled.bytes + pulled.blob_bytes,
            pause_bytes,
            rounds: pulled.rounds + 1,
            precopy_ms,
            last_round_ms: pulled.last_round_ms,
            protocol: Protocol::PreCopy,
        })
    }

    /// Whether `dest` published `t`: its answer to a discard (which also
    /// cancels anything it still staged), else whether it lists `t`.
    async fn decide(&self, t: &TenantId, dest: &Executor) -> Decided {
        let client = self.fleet.client(dest);
        match client.discard(t).await {
            Ok(InboundState::Committed) => return Decided::Committed,
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {}
            Err(e) => {
                tracing::warn!(tenant = %t, executor = %dest.id, error = %e, "the destination did not answer a discard");
                return Decided::Unknown;
            }
        }
        // It discarded (or had nothing): unless it serves T already (it
        // committed, then restarted).
        match client.info(CONTROL_TIMEOUT).await {
            Ok(info) if info.tenants.iter().any(|x| x == t.as_str()) => Decided::Committed,
            Ok(_) => Decided::Undone,
            Err(e) if e.is_unreachable() => Decided::Unknown,
            Err(_) => Decided::Undone,
        }
    }

    /// Undo before the commit: B discards, A ends the session, the record
    /// goes. Best effort on each executor: a session of a restarted source
    /// is gone with its freeze.
    async fn undo(&self, t: &TenantId, src: &Executor, dest: &Executor, session: &str) {
        if let Err(e) = self.fleet.client(dest).discard(t).await {
            tracing::warn!(tenant = %t, executor = %dest.id, error = %e, "discard on an undone move failed");
        }
        self.end_session(src, session).await;
        self.abort_record(t).await;
    }

    /// Ends `session` on `src` (thawing the tenant if it froze it).
    async fn end_session(&self, src: &Executor, session: &str) {
        match self.fleet.client(src).end_outbound(session).await {
            Ok(()) => {}
            // Ended already, or gone with a restart of the source.
            Err(e) if e.code() == Some(ErrorCode::MoveNotFound) => {}
            Err(e) => {
                tracing::warn!(executor = %src.id, %session, error = %e, "could not end an outbound session")
            }
        }
    }

    /// The pause of `t`'s move (`ARCHITECTURE.md`, "Moves across
    /// proxies"): marks the record pausing, so that every other proxy
    /// sharing the table closes its gate and reports when none of its
    /// requests is in flight; closes this proxy's gate; waits for the
    /// reports of every live proxy. All within the hold deadline.
    async fn pause(&self, t: &TenantId) -> Result<crate::fleet::Closed, MigrateError> {
        let deadline = self.fleet.queue.deadline;
        let until = Instant::now() + deadline;
        self.fleet.table().pause(t).await?;
        let closed = self
            .fleet
            .close_gate(t.as_str(), deadline)
            .await
            .map_err(|e| match e {
                CloseError::AlreadyClosed => MigrateError::AlreadyMoving(t.to_string()),
                CloseError::Busy(d) => MigrateError::Busy(t.to_string(), d),
            })?;
        if let Err(missing) = self.fleet.await_holds(t, until).await {
            return Err(MigrateError::NotHeld(t.to_string(), missing, deadline));
        }
        Ok(closed)
    }

    /// Takes over the moves whose proxy's lease in etcd ran out (it died,
    /// or lost etcd, mid-move): holds each tenant's gate and hands the move
    /// to [`recover`](Self::recover), which finishes or undoes it.
    pub async fn adopt_orphaned_moves(&self) {
        for (t, mv) in self.fleet.table().orphaned_moves() {
            let mover = mv.mover.clone().unwrap_or_default();
            let mv = match self.fleet.table().take_over(&t).await {
                Ok(mv) => mv,
                Err(e) => {
                    tracing::debug!(tenant = %t, error = %e, "orphaned move not taken over");
                    continue;
                }
            };
            let closed = match self.fleet.take_remote_hold(t.as_str()) {
                Some(c) => c,
                None => match self
                    .fleet
                    .close_gate(t.as_str(), self.fleet.queue.deadline)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(tenant = %t, error = %e, "an adopted move waits for the tenant's gate");
                        continue;
                    }
                },
            };
            tracing::warn!(tenant = %t, %mover, from = %mv.from, to = %mv.to, "took over a move whose proxy is gone; finishing or undoing it");
            self.held.lock().await.push(HeldMove {
                tenant: t,
                mv,
                _closed: closed,
            });
        }
    }

    async fn abort_record(&self, t: &TenantId) {
        if let Err(e) = self.fleet.table().abort_move(t).await {
            tracing::error!(tenant = %t, error = %e, "cannot clear an aborted move");
        }
    }

    /// Keeps `t`'s gate closed and its move recorded for recovery, which
    /// finishes or undoes it once the executors answer.
    async fn hand_to_recovery(&self, t: &TenantId, closed: crate::fleet::Closed) {
        let mv = self.fleet.table().moving(t);
        if let Some(mv) = mv {
            self.held.lock().await.push(HeldMove {
                tenant: t.clone(),
                mv,
                _closed: closed,
            });
        }
    }

    /// Stop-and-copy (the protocol before pre-copy, for executors of an
    /// older release): prewarm, record, close the gate, export through the
    /// proxy's state directory, import, drop.
    async fn stop_and_copy(
        &self,
        t: &TenantId,
        src: &Executor,
        dest: &Executor,
    ) -> Result<MoveReport, MigrateError> {
        let t = t.clone();
        // 0. While T still runs, B compiles T's modules into its cache, so
        //    that the import inside the pause does not compile.
        self.prewarm(src, dest, &t).await;
        // 1. Record, then close the gate.
        self.fleet
            .table()
            .begin_move(&t, &dest.id, None)
            .await
            .map_err(|e| match e {
                PlacementError::AlreadyMoving(t) => MigrateError::AlreadyMoving(t),
                e => e.into(),
            })?;
        // 2. Wait for requests in flight (at every proxy).
        let closed = match self.pause(&t).await {
            Ok(c) => c,
            Err(e) => {
                self.abort_record(&t).await;
                return Err(e);
            }
        };
        let paused_at = Instant::now();
        // 3. Export and keep the bytes, sealed to this move: recovery
        // imports them as this move's only, so no other signed snapshot
        // of T can stand in for them.
        let move_id = hex::encode(&tensor_wasm_shared::identity::nonce()[..16]);
        let snapshot = match self.fleet.client(src).export_sealed(&t, &move_id).await {
            Ok(b) => Some(b),
            // A has never seen T: there is nothing to carry.
            Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => None,
            Err(e) => {
                self.thaw(src, &t).await;
                self.abort_record(&t).await;
                return Err(MigrateError::ExportFailed(src.id.clone(), e));
            }
        };
        let bytes = snapshot.as_ref().map_or(0, |b| b.len() as u64);
        if let Some(snapshot) = &snapshot {
            let path = self.snapshot_path(&t);
            if let Err(e) = store(&path, snapshot.clone()).await {
                self.thaw(src, &t).await;
                self.abort_record(&t).await;
                return Err(MigrateError::Store(path, e));
            }
            // A source of an earlier release cannot seal.
            let seal = tensor_wasm_shared::snapshot::sealed_for_move(snapshot).then_some(move_id);
            let recorded = self
                .fleet
                .table()
                .record_snapshot(&t, path.clone(), seal.clone())
                .await;
            if let Err(e) = recorded {
                self.thaw(src, &t).await;
                self.abort_record(&t).await;
                remove_file(&path).await;
                return Err(e.into());
            }
            match &seal {
                Some(id) => {
                    tracing::info!(tenant = %t, bytes, path = %path.display(), move_id = %id, "snapshot of the move stored, sealed to the move")
                }
                None => {
                    tracing::info!(tenant = %t, bytes, path = %path.display(), "snapshot of the move stored unsealed (the source is of an earlier release)")
                }
            }
            // 4. Import on B; on failure A thaws T and keeps it.
            let dest_client = self.fleet.client(dest);
            let imported = dest_client.import_sealed(&t, snapshot.clone(), seal.as_deref());
            if let Err(e) = imported.await {
                if self.thaw(src, &t).await {
                    self.abort_record(&t).await;
                    remove_file(&path).await;
                } else {
                    // Keep the record and the bytes: recovery thaws T on A
                    // (or finishes the move) once A answers again.
                    tracing::error!(tenant = %t, from = %src.id, "import failed and the source did not thaw; the move stays recorded for recovery");
                }
                return Err(MigrateError::ImportFailed(dest.id.clone(), e));
            }
        }
        // 5. Point T at B, release the queue, clean up A and the bytes.
        self.fleet.table().finish_move(&t).await?;
        drop(closed);
        let pause_ms = paused_at.elapsed().as_secs_f64() * 1e3;
        if snapshot.is_some() {
            self.drop_on(src, &t).await;
            remove_file(&self.snapshot_path(&t)).await;
        }
        Ok(MoveReport {
            tenant: t.to_string(),
            from: src.id.clone(),
            to: dest.id.clone(),
            pause_ms,
            bytes,
            precopy_bytes: 0,
            pause_bytes: bytes,
            rounds: 1,
            precopy_ms: 0.0,
            last_round_ms: 0.0,
            protocol: Protocol::StopAndCopy,
        })
    }

    /// Step 0: copies `t`'s modules from `src` to `dest`'s compile cache.
    /// Best effort: a failure only means the import compiles them itself.
    async fn prewarm(&self, src: &Executor, dest: &Executor, t: &TenantId) {
        let (from, to) = (self.fleet.client(src), self.fleet.client(dest));
        let started = Instant::now();
        let ids = match from.modules(t).await {
            Ok(ids) => ids,
            Err(e) => {
                if e.code() != Some(ErrorCode::TenantNotHere) {
                    tracing::debug!(tenant = %t, error = %e, "no module list to prewarm");
                }
                return;
            }
        };
        for id in &ids {
            let wasm = match from.module(t, id).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(tenant = %t, function = %id, error = %e, "module not fetched");
                    continue;
                }
            };
            if let Err(e) = to.precompile(wasm).await {
                tracing::debug!(tenant = %t, function = %id, error = %e, "module not precompiled");
            }
        }
        tracing::debug!(tenant = %t, modules = ids.len(), ms = started.elapsed().as_secs_f64() * 1e3, "destination prewarmed");
    }

    /// Thaws `t` on `exec`; true when it is (or was never) frozen there.
    async fn thaw(&self, exec: &Executor, t: &TenantId) -> bool {
        match self.fleet.client(exec).thaw(t).await {
            Ok(()) => true,
            Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => true,
            Err(e) => {
                tracing::error!(tenant = %t, executor = %exec.id, error = %e, "thaw failed");
                false
            }
        }
    }

    /// Drops `t` from `exec`, which it has left, best effort (a leftover
    /// copy is frozen and unreachable, and is dropped when `exec` next
    /// restarts empty of it): requests routed by a placement older than
    /// the one now in the table are sent on from there to its home.
    async fn drop_on(&self, exec: &Executor, t: &TenantId) {
        let client = self.fleet.client(exec);
        let dropped = match self.fleet.table().locate(t) {
            Some((home, epoch)) => {
                let to = self.fleet.executor(&home).map(|e| e.addr.clone());
                client.drop_moved(t, epoch, to.as_deref()).await
            }
            None => client.drop_tenant(t).await,
        };
        match dropped {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => {}
            Err(e) => {
                tracing::warn!(tenant = %t, executor = %exec.id, error = %e, "could not drop a moved tenant from its source")
            }
        }
    }

    /// Drops from `exec` the tenants it holds that are placed on another
    /// executor and not moving: copies a move left behind because its
    /// source was down when the move ended (it came back with the tenant's
    /// functions from its state directory). The placement file decides
    /// where a tenant lives; such a copy is never served, and would make a
    /// later move to `exec` fail with `tenant_exists`.
    pub async fn reconcile(&self, exec: &Executor) {
        let info = match self.fleet.client(exec).info(CONTROL_TIMEOUT).await {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(executor = %exec.id, error = %e, "no info to reconcile");
                return;
            }
        };
        for name in info.tenants {
            let Ok(t) = TenantId::new(&name) else {
                continue;
            };
            let table = self.fleet.table();
            let stale =
                table.get(&t).is_some_and(|home| home != exec.id) && table.moving(&t).is_none();
            if !stale {
                continue;
            }
            // The copy may be behind (a proxy cut off from etcd): only the
            // store itself may condemn a copy of a tenant.
            let (home, epoch) = match table.confirm(&t).await {
                Ok((Some((home, epoch)), false)) if home != exec.id => (home, epoch),
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(tenant = %t, error = %e, "placement not confirmed; copy kept");
                    continue;
                }
            };
            tracing::warn!(tenant = %t, executor = %exec.id, epoch, "dropping a copy left behind by a move; the tenant lives elsewhere");
            let to = self.fleet.executor(&home).map(|e| e.addr.clone());
            match self
                .fleet
                .client(exec)
                .drop_moved(&t, epoch, to.as_deref())
                .await
            {
                Ok(()) => {}
                Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => {}
                Err(e) => {
                    tracing::warn!(tenant = %t, executor = %exec.id, error = %e, "could not drop a copy left behind")
                }
            }
        }
    }

    /// Closes the gates of tenants whose move is recorded in the placement
    /// file, so none of their requests reaches an executor before the move
    /// is finished or undone, and holds them for [`recover`](Self::recover).
    /// Call at start-up, before serving; returns how many.
    pub fn hold_recorded_moves(&self) -> usize {
        let pending = self.fleet.table().pending_moves();
        let me = self.fleet.table().member();
        let found: Vec<HeldMove> = pending
            .into_iter()
            // Moves another proxy runs are its own; those whose proxy is
            // gone are adopted by `adopt_orphaned_moves`.
            .filter(|(_, mv)| mv.mover.is_none() || mv.mover == me)
            .filter_map(|(tenant, mv)| {
                let closed = self.fleet.close_now(tenant.as_str())?;
                Some(HeldMove {
                    tenant,
                    mv,
                    _closed: closed,
                })
            })
            .collect();
        let n = found.len();
        match self.held.try_lock() {
            Ok(mut held) => held.extend(found),
            Err(_) => tracing::error!("recorded moves found while recovery runs"),
        }
        n
    }

    /// Finishes or undoes the held moves (module doc); those whose
    /// executors do not answer yet stay held (gate still closed) for the
    /// next call, at the next upkeep tick.
    pub async fn recover(&self) {
        let mut held = self.held.lock().await;
        let mut left = Vec::new();
        for h in held.drain(..) {
            match self.recover_one(&h.tenant, &h.mv).await {
                Ok(true) => {}
                Ok(false) => left.push(h),
                Err(e) => {
                    tracing::error!(tenant = %h.tenant, error = %e, "recovering a recorded move failed")
                }
            }
        }
        *held = left;
    }

    /// Moves held for recovery now.
    pub async fn held_moves(&self) -> usize {
        self.held.lock().await.len()
    }

    /// Takes the held moves out, for a test to recover them one by one.
    #[cfg(test)]
    pub(crate) async fn take_held(&self) -> Vec<HeldMove> {
        std::mem::take(&mut *self.held.lock().await)
    }

    async fn recover_one(
        &self,
        t: &TenantId,
        mv: &crate::placement::Move,
    ) -> Result<bool, MigrateError> {
        let src = self.fleet.executor(mv.from.as_str());
        let dest = self.fleet.executor(mv.to.as_str());
        if let Some(session) = &mv.session {
            return self.recover_precopy(t, mv, src, dest, session).await;
        }
        let stored = match &mv.snapshot {
            Some(path) => tokio::fs::read(path).await.ok().map(Bytes::from),
            None => None,
        };
        let Some(bytes) = stored else {
            // The export never completed: T is still on A (maybe frozen).
            let Some(src) = src else {
                self.fleet.table().abort_move(t).await?;
                return Ok(true);
            };
            if !self.thaw(&src, t).await {
                return Ok(false);
            }
            self.fleet.table().abort_move(t).await?;
            tracing::info!(tenant = %t, executor = %src.id, "unfinished move undone; tenant thawed on its source");
            return Ok(true);
        };
        let Some(dest) = dest else {
            return Err(MigrateError::UnknownExecutor(mv.to.to_string()));
        };
        let dest_client = self.fleet.client(&dest);
        let info = match dest_client.info(CONTROL_TIMEOUT).await {
            Ok(info) => Some(info),
            // An answer, but not one that lists tenants: import, and let
            // the destination say whether it holds T already.
            Err(UpstreamError::BadAnswer { .. }) => None,
            Err(_) => return Ok(false),
        };
        let has_it = info.is_some_and(|i| i.tenants.iter().any(|x| x == t.as_str()));
        if !has_it {
            match dest_client
                .import_sealed(t, bytes, mv.seal.as_deref())
                .await
            {
                Ok(()) => {}
                Err(e) if e.is_unreachable() => return Ok(false),
                Err(e) => {
                    // B refuses the bytes: keep T on A.
                    if let Some(src) = &src
                        && !self.thaw(src, t).await
                    {
                        return Ok(false);
                    }
                    self.fleet.table().abort_move(t).await?;
                    if let Some(p) = &mv.snapshot {
                        remove_file(p).await;
                    }
                    return Err(MigrateError::ImportFailed(dest.id.clone(), e));
                }
            }
        }
        self.fleet.table().finish_move(t).await?;
        if let Some(src) = &src {
            self.drop_on(src, t).await;
        }
        if let Some(p) = &mv.snapshot {
            remove_file(p).await;
        }
        tracing::info!(tenant = %t, from = %mv.from, to = %mv.to, "recorded move finished");
        Ok(true)
    }

    /// Recovery of a pre-copy move: finished if the destination published
    /// the tenant, undone otherwise; held while the destination does not
    /// answer (it may have published it).
    async fn recover_precopy(
        &self,
        t: &TenantId,
        mv: &crate::placement::Move,
        src: Option<Arc<Executor>>,
        dest: Option<Arc<Executor>>,
        session: &str,
    ) -> Result<bool, MigrateError> {
        let decided = match &dest {
            Some(dest) => self.decide(t, dest).await,
            // A destination no longer registered cannot have it.
            None => Decided::Undone,
        };
        match decided {
            Decided::Unknown => Ok(false),
            Decided::Committed => {
                self.fleet.table().finish_move(t).await?;
                if let Some(src) = &src {
                    self.drop_on(src, t).await;
                }
                tracing::info!(tenant = %t, from = %mv.from, to = %mv.to, "recorded move finished: the destination had committed");
                Ok(true)
            }
            Decided::Undone => {
                if let Some(src) = &src {
                    self.end_session(src, session).await;
                }
                self.fleet.table().abort_move(t).await?;
                tracing::info!(tenant = %t, from = %mv.from, to = %mv.to, "recorded move undone: the tenant stays on its source");
                Ok(true)
            }
        }
    }

    /// Stops placing on `executor` and moves each of its tenants to where
    /// consistent hashing puts it among the others.
    pub async fn drain(
        self: &Arc<Self>,
        executor: &str,
    ) -> Result<(Vec<MoveReport>, Vec<MoveFailure>), MigrateError> {
        let _bulk = self.bulk.lock().await;
        let drained = self.known(executor)?;
        self.fleet.table().set_draining(&drained.id, true).await?;
        let tenants = self.fleet.table().tenants_of(executor);
        let mut moves = Vec::new();
        let mut failed = Vec::new();
        for tenant in tenants {
            let others: Vec<Candidate> = self
                .fleet
                .candidates()
                .into_iter()
                .filter(|c| c.id.as_str() != executor)
                .collect();
            let target = match Self::tenant(&tenant)
                .and_then(|t| Ok(self.fleet.table().choose(&t, &others)?))
            {
                Ok(target) => target,
                Err(e) => {
                    failed.push(MoveFailure {
                        tenant,
                        error: e.api_error(),
                    });
                    continue;
                }
            };
            match self.migrate_patiently(&tenant, target.as_str()).await {
                Ok(r) => moves.push(r),
                Err(e) => failed.push(MoveFailure {
                    tenant,
                    error: e.api_error(),
                }),
            }
        }
        Ok((moves, failed))
    }

    /// [`migrate`](Self::migrate), tried again while it is refused because
    /// the tenant's requests (an open stream) did not end within the hold
    /// deadline: up to [`MOVE_TRIES`] times, a second more apart each time.
    async fn migrate_patiently(
        self: &Arc<Self>,
        tenant: &str,
        to: &str,
    ) -> Result<MoveReport, MigrateError> {
        let mut tries = 1;
        loop {
            match self.migrate(tenant, to).await {
                Err(MigrateError::Busy(..)) if tries < MOVE_TRIES => {
                    tracing::info!(%tenant, %to, tries, "requests still in flight; moving again shortly");
                    tokio::time::sleep(Duration::from_secs(u64::from(tries))).await;
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    /// Moves tenants from the fullest to the emptiest healthy executor
    /// (draining ones excluded) until every count is within one of the
    /// mean.
    pub async fn rebalance(self: &Arc<Self>) -> (Vec<MoveReport>, Vec<MoveFailure>) {
        let _bulk = self.bulk.lock().await;
        let mut moves = Vec::new();
        let mut failed: Vec<MoveFailure> = Vec::new();
        let budget = self.fleet.table().len();
        for _ in 0..budget {
            let (open, counts) = {
                let p = self.fleet.table();
                let open: Vec<ExecutorId> = self
                    .fleet
                    .candidates()
                    .into_iter()
                    .map(|c| c.id)
                    .filter(|id| !p.is_draining(id))
                    .collect();
                let counts: Vec<(ExecutorId, Vec<String>)> = open
                    .iter()
                    .map(|id| (id.clone(), p.tenants_of(id.as_str())))
                    .collect();
                (open, counts)
            };
            if open.len() < 2 {
                break;
            }
            let (Some(max), Some(min)) = (
                counts.iter().max_by_key(|(_, t)| t.len()),
                counts.iter().min_by_key(|(_, t)| t.len()),
            ) else {
                break;
            };
            if max.1.len() <= min.1.len() + 1 {
                break;
            }
            let Some(tenant) = max
                .1
                .iter()
                .find(|t| !failed.iter().any(|f| &f.tenant == *t))
            else {
                break;
            };
            match self.migrate(tenant, min.0.as_str()).await {
                Ok(r) => moves.push(r),
                Err(e) => failed.push(MoveFailure {
                    tenant: tenant.clone(),
                    error: e.api_error(),
                }),
            }
        }
        (moves, failed)
    }

    /// A consistent snapshot of `tenant`: paused while its executor exports
    /// it, then thawed where it is.
    pub async fn snapshot(&self, tenant: &str) -> Result<Bytes, MigrateError> {
        let t = Self::tenant(tenant)?;
        let exec = self.home(&t)?;
        let closed = self.close(&t).await?;
        let result = self.fleet.client(&exec).export(&t).await;
        let thawed = self.thaw(&exec, &t).await;
        drop(closed);
        let bytes = result.map_err(|e| MigrateError::Executor(exec.id.clone(), e))?;
        if !thawed {
            tracing::error!(tenant = %t, executor = %exec.id, "snapshot taken but the tenant did not thaw");
        }
        Ok(bytes)
    }

    /// Replaces `tenant`'s state on its executor (placing it first if it is
    /// new) with `snapshot`. The executor builds the new state off to the
    /// side and swaps it in, so the tenant is never dropped before its new
    /// state is in place, and is left as it was if the executor refuses
    /// the snapshot.
    pub async fn restore(&self, tenant: &str, snapshot: Bytes) -> Result<ExecutorId, MigrateError> {
        let t = Self::tenant(tenant)?;
        let (exec, placed_now) = match self.home(&t) {
            Ok(e) => (e, false),
            Err(MigrateError::UnknownTenant(_)) => {
                let candidates = self.fleet.candidates();
                let (id, _) = self.fleet.table().place(&t, &candidates).await?;
                (self.known(id.as_str())?, true)
            }
            Err(e) => return Err(e),
        };
        let closed = self.close(&t).await?;
        let client = self.fleet.client(&exec);
        // The executor swaps the state in one step; one of an older
        // release holding the tenant refuses, and is restored by saving,
        // dropping and importing.
        let imported = match client.import_replacing(&t, snapshot.clone()).await {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::TenantExists) => {
                self.restore_by_dropping(&t, &exec, snapshot).await
            }
            // Unreachable: the tenant, if it is there, is as it was.
            Err(e) if e.code().is_none() => Err(MigrateError::Executor(exec.id.clone(), e)),
            Err(e) => Err(import_error(&exec.id, e)),
        };
        if let Err(e) = imported {
            if placed_now {
                // A tenant that came only with this snapshot stays unknown.
                self.fleet.table().remove(&t).await?;
            }
            drop(closed);
            return Err(e);
        }
        drop(closed);
        tracing::info!(tenant = %t, executor = %exec.id, "tenant restored from a snapshot");
        Ok(exec.id.clone())
    }

    /// A restore on an executor of an older release, which cannot swap a
    /// tenant's state: saves the state, drops the tenant, imports the
    /// snapshot, and puts the saved state back if the import fails. The
    /// tenant's gate is closed.
    async fn restore_by_dropping(
        &self,
        t: &TenantId,
        exec: &Executor,
        snapshot: Bytes,
    ) -> Result<(), MigrateError> {
        let client = self.fleet.client(exec);
        let previous = match client.export(t).await {
            Ok(b) => Some(b),
            Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => None,
            Err(e) => return Err(MigrateError::Executor(exec.id.clone(), e)),
        };
        if previous.is_some() {
            client
                .drop_tenant(t)
                .await
                .map_err(|e| MigrateError::Executor(exec.id.clone(), e))?;
        }
        if let Err(e) = client.import(t, snapshot).await {
            if let Some(previous) = previous
                && let Err(back) = client.import(t, previous).await
            {
                tracing::error!(tenant = %t, error = %back, "restore failed and the previous state could not be put back");
            }
            return Err(import_error(&exec.id, e));
        }
        Ok(())
    }

    /// Purges `tenant` everywhere: its executor drops it, the proxy forgets
    /// its placement.
    pub async fn purge(&self, tenant: &str) -> Result<(), MigrateError> {
        let t = Self::tenant(tenant)?;
        let exec = self.home(&t)?;
        let closed = self.close(&t).await?;
        match self.fleet.client(&exec).drop_tenant(&t).await {
            Ok(()) => {}
            Err(e) if e.code() == Some(ErrorCode::TenantNotHere) => {}
            Err(e) => return Err(MigrateError::Executor(exec.id.clone(), e)),
        }
        self.fleet.table().remove(&t).await?;
        drop(closed);
        tracing::info!(tenant = %t, executor = %exec.id, "tenant purged");
        Ok(())
    }

    async fn close(&self, t: &TenantId) -> Result<crate::fleet::Closed, MigrateError> {
        self.fleet
            .close_gate(t.as_str(), self.fleet.queue.deadline)
            .await
            .map_err(|e| match e {
                CloseError::AlreadyClosed => MigrateError::AlreadyMoving(t.to_string()),
                CloseError::Busy(d) => MigrateError::Busy(t.to_string(), d),
            })
    }
}

/// Writes `bytes` to `path` durably (temp file, fsync, rename, fsync dir).
async fn store(path: &Path, bytes: Bytes) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("twsnap.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn remove_file(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "could not delete a stored snapshot");
    }
}

/// An import's failure: a snapshot the executor refuses (corrupt,
/// unsigned, another tenant's) is the request's fault, not the fleet's.
fn import_error(at: &ExecutorId, e: UpstreamError) -> MigrateError {
    if e.code() == Some(ErrorCode::InvalidInput) {
        MigrateError::SnapshotRefused(at.clone(), e)
    } else {
        MigrateError::ImportFailed(at.clone(), e)
    }
}

#[cfg(test)]
mod tests;
