//! The destination's half of a live migration, and of any import of a
//! tenant (`ARCHITECTURE.md`, "Live migration"): a tenant built off to the
//! side from streams of records, then published in one step.
//!
//! An [`Inbound`] holds a tenant object the registry does not list yet. A
//! migration fills it from its source: the functions (modules and assets
//! fetched by hash, compiled and loaded), then the rounds, each applied as
//! it streams in, straight into the staged instances' memory and tensor
//! tables, so no second copy of the tenant is ever held. An import fills
//! it from one stream that carries everything.
//!
//! [`Inbound::commit`] applies nothing: it checks that a final (or whole)
//! stream was applied, writes the functions to the state directory, puts
//! the instances in their pools and the jobs in the table, and publishes
//! the tenant. Commit and [`Inbound::discard`] take the same lock, so a
//! discard after a commit answers that the tenant is committed, and a
//! discard during a pull or a commit cancels it before it publishes.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tensor_wasm_kernels::DType;
use tensor_wasm_shared::api::{FunctionInfo, JobInfo};
use tensor_wasm_shared::snapshot::stream::{BlobKind, Reader, Record, StreamKind};
use tensor_wasm_shared::{FunctionId, JobId, TenantId};

use crate::assets::{AssetUpload, StagedAsset};
use crate::body::RequestBody;
use crate::error::ExecError;
use crate::instance::WarmInstance;
use crate::registry::Registry;
use crate::state::{AssetSource, Registration, Tenant};

fn invalid(msg: impl Into<String>) -> ExecError {
    ExecError::InvalidInput(format!("snapshot refused: {}", msg.into()))
}

pub use tensor_wasm_shared::api::InboundState;

/// An instance being rebuilt.
struct Staged {
    function: FunctionId,
    inst: WarmInstance,
}

/// What the streams built so far.
struct Staging {
    state: InboundState,
    /// By the source's instance id.
    instances: BTreeMap<u64, Staged>,
    jobs: Vec<(JobInfo, Option<RequestBody>)>,
    /// A final or whole stream was applied: the tenant is complete.
    complete: bool,
}

/// Figures of one applied stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    pub bytes: u64,
    pub page_bytes: u64,
    pub tensor_bytes: u64,
    pub instances: u64,
}

/// Where the functions' modules and assets come from while a stream is
/// applied.
pub trait Blobs {
    /// The module of function `info`.
    fn module(&mut self, info: &FunctionInfo) -> Result<Vec<u8>, ExecError>;
    /// The assets file `sha256` of the tenant.
    fn assets(&mut self, sha256: &str) -> Result<AssetSource, ExecError>;
}

/// Blobs carried in the stream itself (a whole snapshot), gathered as
/// their records arrive.
#[derive(Default)]
struct InlineBlobs {
    modules: HashMap<String, Vec<u8>>,
    assets: HashMap<String, StagedAsset>,
}

/// No blobs but those the stream carries (a whole snapshot).
#[derive(Debug)]
pub struct StreamBlobs;

impl Blobs for StreamBlobs {
    fn module(&mut self, info: &FunctionInfo) -> Result<Vec<u8>, ExecError> {
        Err(invalid(format!(
            "the stream does not carry the module of function {}",
            info.id
        )))
    }

    fn assets(&mut self, sha256: &str) -> Result<AssetSource, ExecError> {
        Err(invalid(format!(
            "the stream does not carry assets file {sha256}"
        )))
    }
}

/// Blobs this executor holds already: assets files in the tenant's store
/// (a snapshot that does not carry them); no modules.
#[derive(Debug)]
pub struct StoreBlobs {
    pub store: crate::assets::AssetStore,
    pub tenant: TenantId,
}

impl Blobs for StoreBlobs {
    fn module(&mut self, info: &FunctionInfo) -> Result<Vec<u8>, ExecError> {
        Err(invalid(format!("no module for function {}", info.id)))
    }

    fn assets(&mut self, sha256: &str) -> Result<AssetSource, ExecError> {
        if self.store.contains(self.tenant.as_str(), sha256) {
            Ok(AssetSource::Stored(sha256.to_string()))
        } else {
            Err(invalid(format!("no assets file {sha256}")))
        }
    }
}

/// One tenant being built here.
pub struct Inbound {
    pub tenant: Arc<Tenant>,
    /// The source and session of a migration (none for an import).
    pub origin: Option<(crate::peer::Peer, String)>,
    staging: tokio::sync::Mutex<Staging>,
    cancelled: AtomicBool,
    /// The staged instances of journaled functions go into the tenant's
    /// checkpoint journal as they are staged ([`journal_staged`](
    /// Self::journal_staged)): a migration's destination, a restore.
    pub(crate) journals: bool,
    /// That journal is staged beside the journal of the tenant here,
    /// whose place it takes at the commit
    /// ([`crate::durable::Journal::take_place`]).
    pub(crate) staged_journal: bool,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("tenant", &self.tenant.id)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    pub fn new(tenant: Arc<Tenant>, origin: Option<(crate::peer::Peer, String)>) -> Inbound {
        Inbound {
            tenant,
            origin,
            staging: tokio::sync::Mutex::new(Staging {
                state: InboundState::Staging,
                instances: BTreeMap::new(),
                jobs: Vec::new(),
                complete: false,
            }),
            cancelled: AtomicBool::new(false),
            journals: false,
            staged_journal: false,
        }
    }

    /// Writes a checkpoint frame of every staged instance of a journaled
    /// function into the tenant's journal: the first a fresh copy, the
    /// next what the streams applied since changed. A migration's
    /// destination calls it after each round, so that the bulk of the
    /// tenant goes to disk while it still runs on its source, and after
    /// the final round, with the jobs, so that what it brings is on disk
    /// ([`crate::durable::Journal::durable`] of the number returned)
    /// before it is published here: a crash of this executor after the
    /// move loses none of it. Blocking.
    pub fn journal_staged(&self, registry: &Registry) -> Result<Option<u64>, ExecError> {
        if !self.journals {
            return Ok(None);
        }
        let mut st = self.staging.blocking_lock();
        if st.state != InboundState::Staging {
            return Ok(None);
        }
        let mut journal = None;
        for s in st.instances.values_mut() {
            let Some(f) = self.tenant.function(&s.function) else {
                continue;
            };
            if !crate::durable::journaled(f.config.durability) {
                continue;
            }
            let j = journal.get_or_insert_with(|| registry.journal(&self.tenant));
            j.capture(&mut s.inst, &f)?;
        }
        let Some(journal) = journal else {
            return Ok(None);
        };
        if st.complete {
            journal.rewrite_jobs(|| st.jobs.clone())?;
        }
        Ok(Some(journal.written()))
    }

    /// Waits until the frames [`journal_staged`](Self::journal_staged)
    /// wrote (up to `written`) are on disk.
    pub async fn staged_durable(&self, written: Option<u64>) -> Result<(), ExecError> {
        match (written, self.tenant.journal.get()) {
            (Some(n), Some(journal)) => journal.durable(n).await,
            _ => Ok(()),
        }
    }

    fn check_cancelled(&self) -> Result<(), ExecError> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(ExecError::Capacity(format!(
                "the move of tenant {} here was cancelled",
                self.tenant.id
            )));
        }
        Ok(())
    }

    /// Registers `info` into the staged tenant (not persisted: commit
    /// writes the functions), with its module and assets from `blobs`.
    pub fn stage_function(
        &self,
        registry: &Registry,
        info: FunctionInfo,
        blobs: &mut dyn Blobs,
    ) -> Result<(), ExecError> {
        if let Some(have) = self.tenant.function(&info.id)
            && have.info == info
        {
            return Ok(());
        }
        let wasm = blobs.module(&info)?;
        let assets = match &info.assets_sha256 {
            Some(sha) => Some(blobs.assets(sha)?),
            None => None,
        };
        let reg = Registration {
            name: info.name.clone(),
            wasm,
            assets,
            config: info.config.clone(),
            replace: true,
        };
        registry.register_in(&self.tenant, reg, Some(info), false)?;
        Ok(())
    }

    /// Applies one stream to the staged tenant, record by record, on the
    /// calling (blocking) thread. The stream must be of one of `kinds`.
    pub fn apply(
        &self,
        registry: &Registry,
        reader: &mut Reader<impl Read>,
        kinds: &[StreamKind],
        blobs: &mut dyn Blobs,
    ) -> Result<Applied, ExecError> {
        let mut staging = self.staging.blocking_lock();
        if staging.state != InboundState::Staging {
            return Err(ExecError::Capacity(format!(
                "tenant {} is no longer being staged here",
                self.tenant.id
            )));
        }
        let result = self.apply_locked(&mut staging, registry, reader, kinds, blobs);
        if result.is_err() {
            // What a broken stream left cannot be trusted.
            staging.state = InboundState::Discarded;
            staging.instances.clear();
        }
        result
    }

    /// Applies one checkpoint frame (a round of changes to the staged
    /// instance `instance`) to a tenant being recovered. A frame that
    /// cannot be applied drops that instance only: the others stand.
    pub fn apply_frame(
        &self,
        registry: &Registry,
        reader: &mut Reader<impl Read>,
        instance: u64,
    ) -> Result<Applied, ExecError> {
        let mut staging = self.staging.blocking_lock();
        let mut none = StreamBlobs;
        let result = self.apply_locked(
            &mut staging,
            registry,
            reader,
            &[StreamKind::Round],
            &mut none,
        );
        if result.is_err() {
            staging.instances.remove(&instance);
        }
        result
    }

    /// Drops the staged instance `id`, if there is one.
    pub fn forget_instance(&self, id: u64) {
        self.staging.blocking_lock().instances.remove(&id);
    }

    /// Every staged instance, with the id its records named it by.
    pub fn staged_instances(&self) -> Vec<(u64, Arc<crate::instance::InstanceShared>)> {
        let st = self.staging.blocking_lock();
        st.instances
            .iter()
            .map(|(id, s)| (*id, s.inst.shared().clone()))
            .collect()
    }

    /// Runs `run` on staged instance `id`, with its function's id (a
    /// recovery that runs recorded calls again). `None` when there is no
    /// such instance.
    pub fn with_staged<R>(
        &self,
        id: u64,
        run: impl FnOnce(&mut WarmInstance, &FunctionId) -> R,
    ) -> Option<R> {
        let mut st = self.staging.blocking_lock();
        let s = st.instances.get_mut(&id)?;
        Some(run(&mut s.inst, &s.function))
    }

    /// Puts every staged instance in its function's pool, returning each
    /// with the id its records named it by: the end of a recovery, which
    /// adds instances to a tenant already published.
    pub fn adopt_staged(&self) -> Vec<(u64, Arc<crate::instance::InstanceShared>)> {
        let mut st = self.staging.blocking_lock();
        let mut adopted = Vec::new();
        for (id, s) in std::mem::take(&mut st.instances) {
            if let Some(f) = self.tenant.function(&s.function) {
                adopted.push((id, s.inst.shared().clone()));
                f.pool.adopt(s.inst);
            }
        }
        adopted
    }

    fn apply_locked(
        &self,
        st: &mut Staging,
        registry: &Registry,
        reader: &mut Reader<impl Read>,
        kinds: &[StreamKind],
        blobs: &mut dyn Blobs,
    ) -> Result<Applied, ExecError> {
        let snap = |e| ExecError::Snapshot(e);
        let mut applied = Applied::default();
        let kind = match reader.next_record().map_err(snap)? {
            Some(Record::Tenant { tenant, kind }) => {
                if tenant != self.tenant.id.as_str() {
                    return Err(invalid(format!(
                        "it holds tenant {tenant:?}, not {}",
                        self.tenant.id
                    )));
                }
                if !kinds.contains(&kind) {
                    return Err(invalid(format!(
                        "a {kind:?} stream where {kinds:?} was due"
                    )));
                }
                kind
            }
            _ => return Err(invalid("the stream does not start with its tenant")),
        };
        let whole = matches!(
            kind,
            StreamKind::Whole | StreamKind::Local | StreamKind::Final
        );
        let mut functions_seen: Vec<FunctionId> = Vec::new();
        // Blobs the stream itself carries, looked up before `blobs`.
        let mut inline = InlineBlobs::default();
        let limits = &registry.limits;
        while let Some(rec) = reader.next_record().map_err(snap)? {
            self.check_cancelled()?;
            match rec {
                Record::Tenant { .. } => return Err(invalid("a second tenant record")),
                Record::Blob { kind, sha256, len } => {
                    let sha = hex::encode(sha256);
                    match kind {
                        BlobKind::Module => {
                            if len > limits.max_module_bytes as u64 {
                                return Err(invalid(format!("a module of {len} bytes")));
                            }
                            let bytes = read_data(reader, len)?;
                            if hex::encode(sha2_256(&bytes)) != sha {
                                return Err(invalid("a module does not match its hash"));
                            }
                            inline.modules.insert(sha, bytes);
                        }
                        BlobKind::Assets => {
                            let cap = registry.quotas.asset_cap();
                            if len > cap {
                                return Err(invalid(format!("assets of {len} bytes")));
                            }
                            let mut up = registry
                                .asset_store()
                                .upload(self.tenant.id.as_str(), cap)?;
                            copy_data(reader, len, &mut up)?;
                            let staged = up.finish()?;
                            if staged.sha256 != sha {
                                return Err(invalid("an assets file does not match its hash"));
                            }
                            inline.assets.insert(sha, staged);
                        }
                    }
                }
                Record::Function { info_json } => {
                    if !whole {
                        return Err(invalid("a function record in a round"));
                    }
                    let info: FunctionInfo = serde_json::from_str(&info_json)
                        .map_err(|e| invalid(format!("function record: {e}")))?;
                    if functions_seen.contains(&info.id)
                        || self
                            .tenant
                            .function_list()
                            .iter()
                            .any(|f| f.info.name == info.name && f.info.id != info.id)
                    {
                        return Err(invalid(format!("function {:?} appears twice", info.id)));
                    }
                    if functions_seen.len() >= registry.quotas.functions {
                        return Err(invalid("more functions than the quota"));
                    }
                    functions_seen.push(info.id.clone());
                    let mut both = Chain {
                        first: &mut inline,
                        then: &mut *blobs,
                    };
                    self.stage_function(registry, info, &mut both)?;
                }
                Record::Instance {
                    id,
                    function,
                    memory,
                    fresh,
                } => {
                    let f = self.tenant.function(&function).ok_or_else(|| {
                        invalid(format!("an instance of unknown function {function}"))
                    })?;
                    if memory > f.config.memory_limit_bytes || memory % 65536 != 0 {
                        return Err(invalid(format!("a memory of {memory} bytes")));
                    }
                    if fresh {
                        if st.instances.contains_key(&id) {
                            return Err(invalid(format!("instance {id} is not new")));
                        }
                        let quota = registry.quotas.instances;
                        if st.instances.len() + self.tenant.instance_count() >= quota {
                            return Err(ExecError::Quota(format!("more than {quota} instances")));
                        }
                        let mut inst = WarmInstance::create(&f.pre, &f.setup, false, f.deadline())
                            .map_err(|e| match e {
                                crate::instance::InvokeError::Memory(m) => {
                                    ExecError::Quota(m.to_string())
                                }
                                e => invalid(format!("function {function}: {e}")),
                            })?;
                        inst.zero_memory(memory as usize)
                            .map_err(|e| ExecError::Quota(e.to_string()))?;
                        st.instances.insert(
                            id,
                            Staged {
                                function: f.info.id.clone(),
                                inst,
                            },
                        );
                    } else {
                        let s = staged(st, id)?;
                        if s.function != f.info.id {
                            return Err(invalid(format!("instance {id} changed function")));
                        }
                        s.inst
                            .grow_memory(memory as usize)
                            .map_err(|e| ExecError::Quota(e.to_string()))?;
                    }
                    applied.instances += 1;
                }
                Record::Pages {
                    instance,
                    offset,
                    bytes,
                } => {
                    let s = staged(st, instance)?;
                    let offset = usize::try_from(offset).map_err(|_| invalid("a page offset"))?;
                    s.inst
                        .write_memory(offset, &bytes)
                        .map_err(|e| invalid(e.0))?;
                    applied.page_bytes += bytes.len() as u64;
                    reader.recycle(bytes);
                }
                Record::Tensor {
                    instance,
                    handle,
                    dtype,
                    dims,
                    len,
                } => {
                    let s = staged(st, instance)?;
                    let dtype =
                        DType::from_code(i32::from(dtype)).map_err(|e| invalid(e.to_string()))?;
                    let dims: Vec<usize> = dims
                        .iter()
                        .map(|&d| usize::try_from(d).map_err(|_| invalid("a tensor dim")))
                        .collect::<Result<_, _>>()?;
                    let numel = limits
                        .tensor
                        .check_tensor("snapshot", dtype, &dims)
                        .map_err(|e| invalid(e.to_string()))?;
                    if (numel * dtype.size()) as u64 != len {
                        return Err(invalid(format!(
                            "tensor {handle} has {len} bytes for {dims:?} {dtype}"
                        )));
                    }
                    if handle <= 0 {
                        return Err(invalid(format!("tensor handle {handle}")));
                    }
                    let data = read_data(reader, len)?;
                    let n = data.len();
                    // The CPU backend keeps these bytes as the tensor's
                    // own (no second copy); a device backend uploads them.
                    let tensor = self
                        .tenant
                        .backend
                        .from_shared(dtype, &dims, Arc::new(data), 0..n)
                        .map_err(ExecError::Kernel)?;
                    s.inst
                        .tensors_mut()
                        .restore(handle, tensor)
                        .map_err(|e| ExecError::Quota(e.message))?;
                    applied.tensor_bytes += len;
                }
                Record::Asset {
                    instance,
                    handle,
                    name,
                } => {
                    let s = staged(st, instance)?;
                    let f = self
                        .tenant
                        .function(&s.function)
                        .ok_or_else(|| invalid("an asset of a function that went"))?;
                    let tensor = f
                        .setup
                        .assets
                        .get(&name)
                        .cloned()
                        .ok_or_else(|| invalid(format!("no asset named {name:?}")))?;
                    s.inst
                        .tensors_mut()
                        .restore_asset(&name, handle, tensor)
                        .map_err(|e| invalid(e.message))?;
                }
                Record::Free { instance, handle } => {
                    let s = staged(st, instance)?;
                    s.inst
                        .tensors_mut()
                        .free(handle)
                        .map_err(|e| invalid(e.message))?;
                }
                Record::Gone { instance } => {
                    st.instances.remove(&instance);
                }
                Record::Globals { instance, globals } => {
                    let s = staged(st, instance)?;
                    if globals.iter().any(|g| g.kind > 3) {
                        return Err(invalid("a global of unknown kind"));
                    }
                    s.inst.set_globals(&globals).map_err(|e| invalid(e.0))?;
                }
                Record::Job {
                    info_json,
                    content_type,
                    body,
                } => {
                    if !whole {
                        return Err(invalid("a job in a round"));
                    }
                    let info: JobInfo = serde_json::from_str(&info_json)
                        .map_err(|e| invalid(format!("job record: {e}")))?;
                    if st.jobs.iter().any(|(j, _)| j.id == info.id) {
                        return Err(invalid(format!("job id {:?}", info.id)));
                    }
                    let open = st
                        .jobs
                        .iter()
                        .filter(|(j, _)| !j.status.is_finished())
                        .count();
                    if st.jobs.len() >= registry.quotas.pending_jobs + limits.max_finished_jobs
                        || (!info.status.is_finished() && open >= registry.quotas.pending_jobs)
                    {
                        return Err(ExecError::Quota("more jobs than the quota".into()));
                    }
                    let request = match body {
                        Some(len) => {
                            if len > registry.quotas.pending_job_bytes {
                                return Err(invalid(format!("a job body of {len} bytes")));
                            }
                            Some(RequestBody {
                                content_type,
                                body: bytes::Bytes::from(read_data(reader, len)?),
                            })
                        }
                        None => None,
                    };
                    st.jobs.push((info, request));
                }
                Record::Data(_) => return Err(invalid("data out of place")),
            }
        }
        // End was read and verified.
        if whole {
            // Functions the tenant no longer has, and their instances, go.
            for f in self.tenant.function_list() {
                if !functions_seen.contains(&f.info.id) {
                    self.tenant.remove_function(&f.info.id);
                }
            }
            st.instances
                .retain(|_, s| functions_seen.contains(&s.function));
            st.complete = true;
        }
        applied.bytes = reader.read_bytes();
        Ok(applied)
    }

    /// Publishes the staged tenant: checks it is complete, writes its
    /// functions to the state directory, puts the instances in their pools
    /// and the jobs in its table, and makes it the registry's (replacing a
    /// tenant already there only with `replace`). Returns the pending jobs
    /// to start.
    pub fn commit(&self, registry: &Registry, replace: bool) -> Result<Vec<JobId>, ExecError> {
        let mut st = self.staging.blocking_lock();
        match st.state {
            InboundState::Committed => return Ok(Vec::new()),
            InboundState::Staging => {}
            _ => {
                return Err(ExecError::Capacity(format!(
                    "the move of tenant {} here was cancelled",
                    self.tenant.id
                )));
            }
        }
        self.check_cancelled()?;
        if !st.complete {
            return Err(ExecError::Internal(
                "commit before the tenant's final stream".into(),
            ));
        }
        for (_, s) in std::mem::take(&mut st.instances) {
            let f = self
                .tenant
                .function(&s.function)
                .ok_or_else(|| ExecError::Internal("a staged function went".into()))?;
            f.pool.adopt(s.inst);
        }
        let mut pending = Vec::new();
        {
            let mut jobs = self.tenant.jobs();
            for (info, request) in std::mem::take(&mut st.jobs) {
                let id = info.id.clone();
                if jobs.restore(info, request) {
                    pending.push(id);
                }
            }
        }
        registry.persist_tenant(&self.tenant)?;
        if self.staged_journal
            && let Some(journal) = self.tenant.journal.get()
        {
            let old = registry
                .existing_tenant(&self.tenant.id)
                .and_then(|t| t.journal.get().cloned());
            journal.take_place(registry.state_dir(), old.as_deref())?;
        }
        let old = registry.publish(self.tenant.clone(), replace)?;
        if replace {
            registry.forget_replaced(&old, &self.tenant);
        }
        st.state = InboundState::Committed;
        Ok(pending)
    }

    /// Discards what was staged, unless it was committed; says which. A
    /// pull or commit under way stops at its next record.
    pub async fn discard(&self) -> InboundState {
        self.cancelled.store(true, Ordering::Release);
        let mut st = self.staging.lock().await;
        if st.state == InboundState::Committed {
            return InboundState::Committed;
        }
        st.state = InboundState::Discarded;
        st.instances.clear();
        st.jobs.clear();
        InboundState::Discarded
    }

    /// Where it stands.
    pub async fn state(&self) -> InboundState {
        self.staging.lock().await.state
    }
}

fn staged(st: &mut Staging, id: u64) -> Result<&mut Staged, ExecError> {
    st.instances
        .get_mut(&id)
        .ok_or_else(|| invalid(format!("records of unknown instance {id}")))
}

/// Looks in `first`, then `then`.
struct Chain<'a> {
    first: &'a mut InlineBlobs,
    then: &'a mut dyn Blobs,
}

impl Blobs for Chain<'_> {
    fn module(&mut self, info: &FunctionInfo) -> Result<Vec<u8>, ExecError> {
        match self.first.modules.get(&info.sha256) {
            Some(m) => Ok(m.clone()),
            None => self.then.module(info),
        }
    }

    fn assets(&mut self, sha256: &str) -> Result<AssetSource, ExecError> {
        match self.first.assets.remove(sha256) {
            Some(s) => Ok(AssetSource::Staged(s)),
            None => self.then.assets(sha256),
        }
    }
}

fn sha2_256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// The `len` data bytes that follow, gathered.
pub(crate) fn read_data(reader: &mut Reader<impl Read>, len: u64) -> Result<Vec<u8>, ExecError> {
    let mut out = Vec::with_capacity(usize::try_from(len).map_err(|_| invalid("a length"))?);
    while (out.len() as u64) < len {
        match reader.next_record().map_err(ExecError::Snapshot)? {
            Some(Record::Data(d)) => {
                out.extend_from_slice(&d);
                reader.recycle(d);
            }
            _ => return Err(invalid("data cut short")),
        }
    }
    Ok(out)
}

/// The `len` data bytes that follow, into an assets upload.
fn copy_data(
    reader: &mut Reader<impl Read>,
    len: u64,
    up: &mut AssetUpload,
) -> Result<(), ExecError> {
    let mut got = 0u64;
    while got < len {
        match reader.next_record().map_err(ExecError::Snapshot)? {
            Some(Record::Data(d)) => {
                up.write(&d)?;
                got += d.len() as u64;
                reader.recycle(d);
            }
            _ => return Err(invalid("data cut short")),
        }
    }
    Ok(())
}
