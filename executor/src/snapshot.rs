//! Whole-tenant export and import, the executor's half of live migration
//! (`ARCHITECTURE.md`, "Live migration"; the format is
//! `docs/SNAPSHOT-COMPATIBILITY.md`).
//!
//! Export:
//! 1. Freeze the tenant: no new invocation or job starts (they get
//!    `tenant_frozen`, which the proxy never shows a client: it holds them).
//! 2. Wait until the tenant's admitted work has finished (running jobs
//!    included), so every instance is idle and consistent.
//! 3. Capture each function (original wasm, assets, record) and each warm
//!    instance (memory, mutable globals, tensors read back from the device
//!    with their handle numbers), and every job (pending ones with their
//!    request). Encode with the snapshot header, signed when a key is set.
//!    The tenant stays frozen until `thaw` or `drop`.
//!
//! Import validates everything before touching live state (format checks
//! in `tensor_wasm_shared::snapshot`, then the semantic limits below), then
//! registers the functions (compiling through the module cache), resumes
//! each instance without running `init`, and restores the jobs; pending ones
//! start running. If any step fails the tenant is removed again, so the
//! importer is left as it was.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tensor_wasm_kernels::DType;
use tensor_wasm_shared::api::{FunctionInfo, JobInfo};
use tensor_wasm_shared::snapshot::stream::{Reader, StreamKind};
use tensor_wasm_shared::snapshot::{self, FunctionSnapshot, JobSnapshot, TenantSnapshot};
use tensor_wasm_shared::{FunctionId, JobId, TenantId};

use crate::assets::AssetError;
use crate::body::RequestBody;
use crate::error::ExecError;
use crate::instance::WarmInstance;
use crate::registry::Registry;
use crate::state::{AssetSource, Registration};

/// Longest wait for a tenant's in-flight work before an export gives up:
/// 30 s (a deadline-bound invocation ends well within it by default).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest snapshot accepted, in bytes: 8 GiB.
pub const MAX_SNAPSHOT_BYTES: u64 = 8 << 30;

fn invalid(msg: impl Into<String>) -> ExecError {
    ExecError::InvalidInput(format!("snapshot refused: {}", msg.into()))
}

impl Registry {
    /// Freezes `tenant`, waits for its work to finish, and returns its
    /// snapshot. The tenant stays frozen.
    pub async fn export_tenant(&self, tenant: &TenantId) -> Result<Vec<u8>, ExecError> {
        self.export_for(tenant, None).await
    }

    /// As [`export_tenant`](Self::export_tenant); with `bound`, a move's
    /// id, the snapshot is sealed to that move: only an import for the
    /// same move reads it (`docs/SNAPSHOT-COMPATIBILITY.md`, "The seal").
    pub async fn export_for(
        &self,
        tenant: &TenantId,
        bound: Option<String>,
    ) -> Result<Vec<u8>, ExecError> {
        let t = self.tenant_here(tenant)?;
        t.freeze();
        if !t.wait_drained(DRAIN_TIMEOUT).await {
            t.thaw();
            return Err(ExecError::Capacity(format!(
                "tenant {tenant} still had work in flight after {DRAIN_TIMEOUT:?}"
            )));
        }
        let key = self.snapshot_key().map(<[u8]>::to_vec);
        let id = tenant.clone();
        let t2 = t.clone();
        let store = self.asset_store().clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut functions = Vec::new();
            for f in t2.function_list() {
                let instances = f.pool.with_idle(|idle| {
                    idle.iter_mut()
                        .map(|p| {
                            p.inst.capture(&f.mutable_globals).map_err(|e| {
                                ExecError::Internal(format!("cannot capture {}: {e}", f.info.id))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })?;
                functions.push(FunctionSnapshot {
                    info_json: serde_json::to_string(&f.info)
                        .map_err(|e| ExecError::Internal(e.to_string()))?,
                    wasm: f.wasm.to_vec(),
                    assets: match f.assets.sha256() {
                        Some(sha) => Some(
                            std::fs::read(store.path(t2.id.as_str(), sha))
                                .map_err(|e| ExecError::Asset(AssetError::Io(e)))?,
                        ),
                        None => None,
                    },
                    instances,
                });
            }
            let jobs = t2
                .jobs()
                .records()
                .map(|j| {
                    Ok(JobSnapshot {
                        info_json: serde_json::to_string(&j.info)
                            .map_err(|e| ExecError::Internal(e.to_string()))?,
                        content_type: j.request.as_ref().and_then(|r| r.content_type.clone()),
                        body: j.request.as_ref().map(|r| r.body.to_vec()),
                    })
                })
                .collect::<Result<Vec<_>, ExecError>>()?;
            let snap = TenantSnapshot {
                tenant: id.to_string(),
                functions,
                jobs,
            };
            snapshot::encode_bound(&snap, key.as_deref(), bound.as_deref())
                .map_err(|e| ExecError::Internal(e.to_string()))
        })
        .await
        .map_err(ExecError::task("export"))?;
        if result.is_err() {
            t.thaw();
        }
        result
    }

    /// Ids of `tenant`'s functions, whose modules [`module`](Self::module)
    /// gives: what a migration destination compiles before the move.
    pub fn module_ids(&self, tenant: &TenantId) -> Result<Vec<FunctionId>, ExecError> {
        let t = self.tenant_here(tenant)?;
        Ok(t.function_list()
            .iter()
            .map(|f| f.info.id.clone())
            .collect())
    }

    /// The module (as registered) of `tenant`'s function `id`.
    pub fn module(&self, tenant: &TenantId, id: &str) -> Result<Arc<[u8]>, ExecError> {
        let t = self.tenant_here(tenant)?;
        t.function_list()
            .into_iter()
            .find(|f| f.info.id.as_str() == id)
            .map(|f| f.wasm.clone())
            .ok_or_else(|| ExecError::FunctionNotFound(id.to_string()))
    }

    /// Compiles `wasm` into the module cache without registering anything,
    /// so that a later import of a tenant using it does not compile inside
    /// the tenant's migration pause. Checked like a registration.
    pub async fn precompile(self: &Arc<Self>, wasm: bytes::Bytes) -> Result<(), ExecError> {
        let registry = self.clone();
        tokio::task::spawn_blocking(move || {
            let inspected = crate::wasm::inspect(&wasm, registry.limits.max_module_bytes)?;
            registry
                .runtime()
                .compile(&inspected.rewritten)
                .map(|_| ())
                .map_err(ExecError::from)
        })
        .await
        .map_err(ExecError::task("compile"))?
    }

    /// Lets a frozen tenant take work again (its export was not imported).
    pub fn thaw_tenant(&self, tenant: &TenantId) -> Result<(), ExecError> {
        let t = self.tenant_here(tenant)?;
        t.thaw();
        Ok(())
    }

    /// Imports a tenant from snapshot bytes. The tenant must not have
    /// functions here. Validates everything first; on any failure the
    /// importer is left without the tenant.
    pub async fn import_tenant(
        self: &Arc<Self>,
        tenant: &TenantId,
        bytes: bytes::Bytes,
    ) -> Result<(), ExecError> {
        self.import(tenant, bytes, OnFailure::Drop, None).await
    }

    /// As [`import_tenant`](Self::import_tenant); with `bound`, of a
    /// snapshot made for the move it names (its seal must say so).
    pub async fn import_for(
        self: &Arc<Self>,
        tenant: &TenantId,
        bytes: bytes::Bytes,
        bound: Option<String>,
    ) -> Result<(), ExecError> {
        self.import(tenant, bytes, OnFailure::Drop, bound).await
    }

    async fn import(
        self: &Arc<Self>,
        tenant: &TenantId,
        bytes: bytes::Bytes,
        on_failure: OnFailure,
        bound: Option<String>,
    ) -> Result<(), ExecError> {
        if self
            .existing_tenant(tenant)
            .is_some_and(|t| !t.function_list().is_empty())
        {
            return Err(ExecError::TenantExists(tenant.to_string()));
        }
        let key = self.snapshot_key().map(<[u8]>::to_vec);
        if matches!(on_failure, OnFailure::Drop) {
            // A journal left by a tenant that was here before is of
            // another life of it.
            crate::durable::remove_journal(self.state_dir(), tenant);
        }
        let registry = self.clone();
        let id = tenant.clone();
        let restored = tokio::task::spawn_blocking(move || -> Result<Vec<JobId>, ExecError> {
            let snap = snapshot::decode_bound(
                &bytes,
                key.as_deref(),
                MAX_SNAPSHOT_BYTES,
                bound.as_deref(),
            )
            .map_err(ExecError::Snapshot)?;
            let plan = registry.check_snapshot(&id, &snap)?;
            registry
                .apply_snapshot(&id, snap, plan)
                .inspect_err(|_| match on_failure {
                    OnFailure::Drop => {
                        let _ = registry.drop_tenant(&id);
                    }
                    OnFailure::KeepFiles => {
                        registry.forget_tenant(&id);
                    }
                })
        })
        .await
        .map_err(ExecError::task("import"))??;
        let t = self
            .existing_tenant(tenant)
            .ok_or_else(|| ExecError::Internal("imported tenant vanished".into()))?;
        match on_failure {
            // Warm state from a graceful stop is newer than the tenant's
            // journal, which goes before any job of it runs (and journals
            // itself); the warm state goes to a new journal before its
            // file is removed (`Registry::journal_warm`).
            OnFailure::KeepFiles => crate::durable::remove_journal(self.state_dir(), tenant),
            // An import is answered once what it brought is on disk: a
            // crash after the answer loses none of it.
            OnFailure::Drop => {
                if let Err(e) = self.journal_tenant(&t).await {
                    let _ = self.drop_tenant(tenant);
                    return Err(e);
                }
            }
        }
        for job_id in restored {
            self.spawn_job(t.clone(), job_id);
        }
        Ok(())
    }

    /// Replaces `tenant`'s state here with a snapshot's without dropping it
    /// first (an admin restore): the snapshot's tenant is built off to the
    /// side, checked record by record as a migration's is, and swapped in
    /// for the tenant in one step. On any failure the tenant here is left
    /// as it was. A tenant not here is imported.
    pub async fn import_replacing(
        self: &Arc<Self>,
        tenant: &TenantId,
        bytes: bytes::Bytes,
    ) -> Result<(), ExecError> {
        let key = self.snapshot_key().map(<[u8]>::to_vec);
        let inbound = self.start_inbound(tenant, None, true).await?;
        let (registry, staged, id) = (self.clone(), inbound.clone(), tenant.clone());
        let applied = tokio::task::spawn_blocking(move || -> Result<Option<u64>, ExecError> {
            let snap = snapshot::decode(&bytes, key.as_deref(), MAX_SNAPSHOT_BYTES)
                .map_err(ExecError::Snapshot)?;
            drop(bytes);
            registry.check_snapshot(&id, &snap)?;
            // The snapshot as a whole format 2 stream, written on a thread
            // into a pipe and applied as it is read.
            let (rx, tx) = std::io::pipe()
                .map_err(|e| ExecError::Internal(format!("a pipe for a restore: {e}")))?;
            let signing = key.clone();
            let writer = std::thread::Builder::new()
                .name("restore-stream".into())
                .spawn(move || {
                    snapshot::stream::write_snapshot(&snap, tx, signing.as_deref()).map(drop)
                })
                .map_err(|e| ExecError::Internal(format!("a thread for a restore: {e}")))?;
            let applied = (|| {
                let mut r = Reader::new(rx, key.as_deref(), MAX_SNAPSHOT_BYTES)
                    .map_err(ExecError::Snapshot)?;
                let mut no_blobs = crate::inbound::StreamBlobs;
                staged.apply(&registry, &mut r, &[StreamKind::Whole], &mut no_blobs)
            })();
            // The reader dropped its end of the pipe: the writer ends.
            let written = writer
                .join()
                .map_err(|_| ExecError::Internal("the restore stream's writer panicked".into()))?;
            applied?;
            written.map_err(|e| ExecError::Internal(format!("writing the restore stream: {e}")))?;
            // What it restores is in its journal before it takes the
            // tenant's place: a crash after the answer loses none of it.
            staged.journal_staged(&registry)
        })
        .await
        .map_err(ExecError::task("restore"));
        let result = async {
            inbound.staged_durable(applied??).await?;
            let (registry, staged) = (self.clone(), inbound.clone());
            tokio::task::spawn_blocking(move || staged.commit(&registry, true))
                .await
                .map_err(ExecError::task("restore"))?
        }
        .await;
        let pending = match result {
            Ok(p) => p,
            Err(e) => {
                self.discard_inbound(tenant).await;
                return Err(e);
            }
        };
        for job in pending {
            self.spawn_job(inbound.tenant.clone(), job);
        }
        Ok(())
    }

    /// Semantic checks of a decoded snapshot against this executor's limits
    /// and quotas, before anything is changed. Returns the parsed records.
    fn check_snapshot(
        &self,
        tenant: &TenantId,
        snap: &TenantSnapshot,
    ) -> Result<ImportPlan, ExecError> {
        if snap.tenant != tenant.as_str() {
            return Err(invalid(format!(
                "it holds tenant {:?}, not {tenant}",
                snap.tenant
            )));
        }
        if snap.functions.len() > self.quotas.functions {
            return Err(invalid(format!(
                "{} functions exceed the quota",
                snap.functions.len()
            )));
        }
        let limits = &self.limits;
        let mut device_bytes = 0u64;
        let mut tensors = 0u64;
        let mut instances = 0usize;
        let mut infos = Vec::with_capacity(snap.functions.len());
        for f in &snap.functions {
            let info: FunctionInfo = serde_json::from_str(&f.info_json)
                .map_err(|e| invalid(format!("function record: {e}")))?;
            if f.wasm.len() > limits.max_module_bytes {
                return Err(invalid(format!(
                    "function {} is over the module size limit",
                    info.id
                )));
            }
            if f.instances.len() > limits.max_instances_per_function as usize {
                return Err(invalid(format!(
                    "function {} has too many instances",
                    info.id
                )));
            }
            instances += f.instances.len();
            for inst in &f.instances {
                if inst.memory.len() as u64 > limits.max_memory_limit
                    || !inst.memory.len().is_multiple_of(65536)
                {
                    return Err(invalid(format!("a memory of {} bytes", inst.memory.len())));
                }
                if inst.globals.iter().any(|g| g.kind > 3) {
                    return Err(invalid("a global of unknown kind"));
                }
                let mut handles = std::collections::HashSet::new();
                for t in &inst.tensors {
                    let dtype =
                        DType::from_code(i32::from(t.dtype)).map_err(|e| invalid(e.to_string()))?;
                    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                    let numel = limits
                        .tensor
                        .check_tensor("snapshot", dtype, &dims)
                        .map_err(|e| invalid(e.to_string()))?;
                    if numel * dtype.size() != t.data.len() {
                        return Err(invalid(format!(
                            "tensor {} has {} bytes for {dims:?} {dtype}",
                            t.handle,
                            t.data.len()
                        )));
                    }
                    if t.handle <= 0 || !handles.insert(t.handle) {
                        return Err(invalid(format!("tensor handle {}", t.handle)));
                    }
                    device_bytes += t.data.len() as u64;
                    tensors += 1;
                }
                for a in &inst.asset_handles {
                    if a.handle <= 0 || !handles.insert(a.handle) {
                        return Err(invalid(format!("asset handle {}", a.handle)));
                    }
                }
            }
            infos.push(info);
        }
        if device_bytes > self.quotas.device_memory_bytes || tensors > self.quotas.live_tensors {
            return Err(ExecError::Quota(format!(
                "snapshot holds {tensors} tensors of {device_bytes} bytes, over the tenant's quota"
            )));
        }
        if instances > self.quotas.instances {
            return Err(ExecError::Quota(format!(
                "snapshot holds {instances} instances, over the quota"
            )));
        }
        // Each function once: a second record of an id or name would
        // silently replace the first.
        let mut seen = std::collections::HashSet::new();
        for info in &infos {
            if !seen.insert(("id", info.id.as_str())) || !seen.insert(("name", info.name.as_str()))
            {
                return Err(invalid(format!("function {:?} appears twice", info.id)));
            }
        }
        if snap.jobs.len() > self.quotas.pending_jobs + limits.max_finished_jobs {
            return Err(invalid(format!("{} jobs", snap.jobs.len())));
        }
        let jobs = snap
            .jobs
            .iter()
            .map(|j| {
                serde_json::from_str::<JobInfo>(&j.info_json)
                    .map_err(|e| invalid(format!("job record: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The job quotas hold for what a snapshot brings as for what a
        // client submits.
        let mut job_ids = std::collections::HashSet::new();
        let (mut open, mut waiting) = (0usize, 0u64);
        for (j, info) in snap.jobs.iter().zip(&jobs) {
            // Ids are valid by their types (the records would not parse
            // otherwise); each may appear once.
            if !job_ids.insert(info.id.as_str()) {
                return Err(invalid(format!("job id {:?}", info.id)));
            }
            if !info.status.is_finished() {
                open += 1;
                waiting += j.body.as_ref().map_or(0, |b| b.len() as u64);
            }
        }
        if open > self.quotas.pending_jobs || waiting > self.quotas.pending_job_bytes {
            return Err(ExecError::Quota(format!(
                "snapshot holds {open} waiting jobs with {waiting} bytes of requests, over the \
                 tenant's quota"
            )));
        }
        Ok(ImportPlan { infos, jobs })
    }

    /// Registers, resumes and restores what `check_snapshot` accepted.
    /// Returns the ids of the pending jobs to start.
    fn apply_snapshot(
        &self,
        tenant: &TenantId,
        snap: TenantSnapshot,
        plan: ImportPlan,
    ) -> Result<Vec<JobId>, ExecError> {
        for (f, info) in snap.functions.into_iter().zip(plan.infos) {
            let reg = Registration {
                name: info.name.clone(),
                wasm: f.wasm,
                assets: match f.assets {
                    Some(bytes) => Some(AssetSource::Staged(
                        self.asset_store().stage_bytes(tenant.as_str(), &bytes)?,
                    )),
                    None => None,
                },
                config: info.config.clone(),
                replace: true,
            };
            let id = info.id.clone();
            self.register_inner(tenant, reg, Some(info), true)?;
            let func = self.function(tenant, &id)?;
            for inst in &f.instances {
                let warm = WarmInstance::restore(&func.pre, &func.setup, inst, func.deadline())
                    .map_err(|e| invalid(format!("function {id}: {e}")))?;
                func.pool.adopt(warm);
            }
        }
        let t = self.tenant_here(tenant)?;
        let mut jobs = t.jobs();
        let mut pending = Vec::new();
        for (j, info) in snap.jobs.into_iter().zip(plan.jobs) {
            let id = info.id.clone();
            let request = RequestBody {
                content_type: j.content_type,
                body: bytes::Bytes::from(j.body.unwrap_or_default()),
            };
            if jobs.restore(info, Some(request)) {
                pending.push(id);
            }
        }
        Ok(pending)
    }
}

/// What a failed import leaves behind.
#[derive(Clone, Copy, Debug)]
enum OnFailure {
    /// Nothing: the tenant is dropped with its files (it came with the
    /// snapshot).
    Drop,
    /// Its files: they were there before the import.
    KeepFiles,
}

/// Folder of the state directory that holds warm state across a graceful
/// restart: one snapshot per tenant.
pub const WARM_DIR: &str = "warm";

impl Registry {
    /// Writes every tenant's warm state (a snapshot) under the state
    /// directory; called on a graceful shutdown, after the last request.
    /// Tenants are saved in parallel, as many at a time as the machine has
    /// cores (each holds its snapshot in memory while it is written), and
    /// the save stops at `budget`: a tenant not written by then (one still
    /// running work, a slow disk) is named in the log and comes back cold.
    /// Returns how many tenants were saved.
    pub async fn save_warm_state(self: &Arc<Self>, budget: Duration) -> usize {
        let dir = self.state_dir().join(WARM_DIR);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(error = %e, "cannot create {}", dir.display());
            return 0;
        }
        let parallel = std::thread::available_parallelism().map_or(2, usize::from);
        let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut saves = tokio::task::JoinSet::new();
        let tenants = self.tenant_ids();
        for tenant in tenants.iter().cloned() {
            let (registry, slots, dir) = (self.clone(), slots.clone(), dir.clone());
            saves.spawn(async move {
                let _slot = slots.acquire_owned().await;
                let saved = registry.save_one(&tenant, &dir).await;
                (tenant, saved)
            });
        }
        let deadline = tokio::time::Instant::now() + budget;
        let mut saved = Vec::new();
        while !saves.is_empty() {
            match tokio::time::timeout_at(deadline, saves.join_next()).await {
                Ok(Some(Ok((tenant, Ok(()))))) => saved.push(tenant),
                Ok(Some(Ok((tenant, Err(e))))) => {
                    tracing::error!(%tenant, error = %e, "cannot save warm state")
                }
                Ok(Some(Err(e))) => tracing::error!(error = %e, "a warm-state save failed"),
                Ok(None) => break,
                Err(_) => {
                    let late: Vec<String> = tenants
                        .iter()
                        .filter(|t| !saved.contains(t))
                        .map(ToString::to_string)
                        .collect();
                    tracing::error!(?budget, tenants = ?late, "warm state not saved within the shutdown budget: these tenants come back cold");
                    saves.abort_all();
                    break;
                }
            }
        }
        saved.len()
    }

    /// Exports `tenant` and writes it to `dir/<tenant>.twsnap` (through a
    /// temporary file and a rename).
    async fn save_one(self: &Arc<Self>, tenant: &TenantId, dir: &Path) -> Result<(), ExecError> {
        let bytes = self.export_tenant(tenant).await?;
        let path = dir.join(format!("{tenant}.twsnap"));
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("tmp");
            crate::engine::write_private(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path))
        })
        .await
        .map_err(ExecError::task("warm-state write"))?
        .map_err(|e| ExecError::Internal(format!("cannot write warm state: {e}")))
    }

    /// Resumes the tenants whose warm state a graceful shutdown wrote.
    /// Returns the files loaded, which the caller removes once those
    /// tenants are in their journals ([`Registry::journal_warm`]): a crash
    /// before then loads them again. A file that is refused (corrupt,
    /// torn, no longer within this executor's limits) is kept as
    /// `<tenant>.twsnap.refused` for inspection, and its tenant starts from
    /// its journal, or cold from its registered functions, which a refused
    /// warm state never removes.
    pub async fn load_warm_state(self: &Arc<Self>) -> Vec<PathBuf> {
        let dir = self.state_dir().join(WARM_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut loaded = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let tenant = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| TenantId::new(s).ok());
            let extension = path.extension().and_then(|e| e.to_str());
            if extension == Some("refused") {
                continue;
            }
            let (Some(tenant), Some("twsnap")) = (tenant, extension) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let result = match std::fs::read(&path) {
                // The tenant's functions are on disk already: a failure
                // leaves them, and it starts cold from there.
                Ok(bytes) => {
                    self.import(
                        &tenant,
                        bytes::Bytes::from(bytes),
                        OnFailure::KeepFiles,
                        None,
                    )
                    .await
                }
                Err(e) => Err(ExecError::Internal(e.to_string())),
            };
            match result {
                Ok(()) => loaded.push(path),
                Err(e) => {
                    let kept = path.with_extension("twsnap.refused");
                    tracing::warn!(%tenant, error = %e, kept = %kept.display(), "warm state not restored; starting the tenant cold");
                    if std::fs::rename(&path, &kept).is_err() {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        loaded
    }
}

/// Parsed records of a snapshot that passed its checks.
#[derive(Debug)]
struct ImportPlan {
    infos: Vec<FunctionInfo>,
    jobs: Vec<JobInfo>,
}
