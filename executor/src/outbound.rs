//! The source's half of a live migration (`ARCHITECTURE.md`, "Live
//! migration"): an outbound session per tenant being moved, which answers
//! the destination's rounds with what changed since the last one.
//!
//! A session starts tracking the pages every instance of the tenant writes
//! ([`crate::tracking`]) and remembers, per instance, which tensors (by
//! handle and serial) the destination has. A round then writes, in snapshot
//! format 2 ([`tensor_wasm_shared::snapshot::stream`]):
//!
//! - for an instance the destination has not seen: its size, every page
//!   that is not zeros, every tensor and asset handle;
//! - for one it has: its size, the pages written since the last round,
//!   the tensors made and the handles freed since;
//! - `Gone` for an instance that went (a trap, a deadline).
//!
//! Rounds read memory and tables while the tenant runs. The final round
//! first freezes the tenant and waits for its work to finish, as an export
//! does, and adds the function records, every instance's mutable globals
//! and the jobs; the tenant stays frozen until the session ends without a
//! move ([`Outbound::end`], which thaws it) or the tenant is dropped.
//!
//! A round that fails half-way (the destination went) poisons the session:
//! what the trackers marked clean never reached the destination, so only a
//! new session may move the tenant.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tensor_wasm_kernels::{Backend, Storage, Tensor};
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::snapshot::stream::{CHUNK, Record, StreamKind, Writer};

use crate::error::ExecError;
use crate::instance::InstanceShared;
use crate::state::Tenant;
use crate::sync::lock;
use crate::tracking::{MemoryTracker, PageTracking, nonzero_runs};

/// What a reader (a migration's destination, the checkpoint journal) has
/// of one instance, and the tracking of what changed since.
#[derive(Debug)]
pub struct Sent {
    pub shared: Arc<InstanceShared>,
    tracker: MemoryTracker,
    /// Handle → serial of every tensor and asset handle it has.
    tensors: HashMap<i32, u64>,
}

impl Sent {
    /// A reader that has nothing of `shared` yet.
    pub fn new(shared: Arc<InstanceShared>, tracking: &PageTracking) -> Sent {
        let tracker = tracking.start(&shared.memory, &shared.readers);
        Sent {
            shared,
            tracker,
            tensors: HashMap::new(),
        }
    }

    /// A reader that has `shared` as it is now (an instance just rebuilt
    /// from what the reader holds).
    pub fn synced(shared: Arc<InstanceShared>, tracking: &PageTracking) -> Sent {
        let tracker = tracking.start_synced(&shared.memory, &shared.readers);
        let tensors = shared
            .tensors
            .listing()
            .iter()
            .map(|e| (e.handle, e.serial))
            .collect();
        Sent {
            shared,
            tracker,
            tensors,
        }
    }

    /// Stops tracking (the instance may live on).
    pub fn stop(self) {
        self.tracker.stop(&self.shared.memory, &self.shared.readers);
    }
}

/// How a round names one instance.
#[derive(Clone, Copy, Debug)]
pub struct Named<'a> {
    /// The id its records carry.
    pub id: u64,
    pub function: &'a str,
    /// Its memory's size.
    pub size: usize,
    /// The reader has nothing of it.
    pub fresh: bool,
}

/// Writes what the reader of `sent` lacks of its instance: the instance
/// record, the pages written since its last look (every page that is not
/// zeros when `fresh`), the tensors made and the handles freed. False when
/// the instance went as it was read (then nothing but its record went).
pub fn write_instance<W: Write>(
    w: &mut Writer<W>,
    sent: &mut Sent,
    named: Named<'_>,
    scratch: &mut Vec<u8>,
    backend: &dyn Backend,
    stats: &mut RoundStats,
) -> std::io::Result<bool> {
    let shared = sent.shared.clone();
    w.record(&Record::Instance {
        id: named.id,
        function: named.function.to_string(),
        memory: named.size as u64,
        fresh: named.fresh,
    })?;
    let Ok(ranges) = sent
        .tracker
        .changed(&shared.memory, &shared.readers, scratch)
    else {
        return Ok(false);
    };
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let n = CHUNK.min(range.end - at);
            scratch.resize(n, 0);
            if !shared.memory.read(at, &mut scratch[..n]) {
                break;
            }
            if named.fresh {
                // The reader's copy starts zeroed.
                for run in nonzero_runs(&scratch[..n]) {
                    let bytes = &scratch[run.clone()];
                    w.pages(named.id, (at + run.start) as u64, bytes)?;
                    stats.page_bytes += bytes.len() as u64;
                }
            } else {
                w.pages(named.id, at as u64, &scratch[..n])?;
                stats.page_bytes += n as u64;
            }
            at += n;
        }
    }
    stats.tensor_bytes += write_tensors(w, sent, named.id, backend)?;
    Ok(true)
}

/// The state a round reads and advances.
#[derive(Default)]
struct Rounds {
    done: u64,
    instances: BTreeMap<u64, Sent>,
    /// A round failed half-way: the destination's copy is unknown.
    poisoned: bool,
    /// A read buffer, kept between rounds.
    scratch: Vec<u8>,
}

/// Figures of one round, for logs and the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoundStats {
    /// Bytes of the stream.
    pub bytes: u64,
    /// Bytes of memory pages in it.
    pub page_bytes: u64,
    /// Bytes of tensors in it.
    pub tensor_bytes: u64,
    pub instances: u64,
}

/// One tenant on its way out.
pub struct Outbound {
    pub id: String,
    pub tenant: Arc<Tenant>,
    tracking: PageTracking,
    key: Option<Vec<u8>>,
    rounds: Mutex<Rounds>,
    /// Set when the final round froze the tenant.
    froze: AtomicBool,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("id", &self.id)
            .field("tenant", &self.tenant.id)
            .finish_non_exhaustive()
    }
}

impl Outbound {
    pub fn new(
        id: String,
        tenant: Arc<Tenant>,
        tracking: PageTracking,
        key: Option<Vec<u8>>,
    ) -> Outbound {
        Outbound {
            id,
            tenant,
            tracking,
            key,
            rounds: Mutex::new(Rounds::default()),
            froze: AtomicBool::new(false),
        }
    }

    pub fn tenant_id(&self) -> &TenantId {
        &self.tenant.id
    }

    /// Rounds written so far.
    pub fn rounds_done(&self) -> u64 {
        lock(&self.rounds).done
    }

    /// Writes one round to `out`: what changed since the last (everything,
    /// the first time). Blocking: call it on the blocking pool. With
    /// `kind` [`StreamKind::Final`] the tenant must be frozen and drained.
    pub fn round(&self, kind: StreamKind, out: impl Write) -> Result<RoundStats, ExecError> {
        let mut r = lock(&self.rounds);
        if r.poisoned {
            return Err(ExecError::Capacity(format!(
                "the migration session of tenant {} failed a round; start a new one",
                self.tenant.id
            )));
        }
        let result = self.write_round(&mut r, kind, out);
        match &result {
            Ok(_) => r.done += 1,
            Err(_) => r.poisoned = true,
        }
        result
    }

    fn write_round(
        &self,
        r: &mut Rounds,
        kind: StreamKind,
        out: impl Write,
    ) -> Result<RoundStats, ExecError> {
        let io = |e: std::io::Error| ExecError::Internal(format!("writing a round: {e}"));
        let mut stats = RoundStats::default();
        let mut w = Writer::new(out, self.key.as_deref()).map_err(io)?;
        w.record(&Record::Tenant {
            tenant: self.tenant.id.to_string(),
            kind,
        })
        .map_err(io)?;
        let functions = self.tenant.function_list();
        if kind == StreamKind::Final {
            for f in &functions {
                let info_json = serde_json::to_string(&f.info)
                    .map_err(|e| ExecError::Internal(e.to_string()))?;
                w.record(&Record::Function { info_json }).map_err(io)?;
            }
        }
        let backend = self.tenant.backend.clone();
        let mut seen = Vec::new();
        for f in &functions {
            for shared in f.pool.live() {
                let Some(size) = shared.memory.region().map(|reg| reg.size) else {
                    continue; // going as we look: the next round says Gone
                };
                seen.push(shared.id);
                let fresh = !r.instances.contains_key(&shared.id);
                let sent = r
                    .instances
                    .entry(shared.id)
                    .or_insert_with(|| Sent::new(shared.clone(), &self.tracking));
                let id = shared.id;
                let written = write_instance(
                    &mut w,
                    sent,
                    Named {
                        id,
                        function: &f.info.id,
                        size,
                        fresh,
                    },
                    &mut r.scratch,
                    backend.as_ref(),
                    &mut stats,
                )
                .map_err(io)?;
                if !written {
                    continue; // gone since: Gone follows next round
                }
                stats.instances += 1;
            }
        }
        let gone: Vec<u64> = r
            .instances
            .keys()
            .filter(|id| !seen.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(sent) = r.instances.remove(&id) {
                sent.stop();
            }
            w.record(&Record::Gone { instance: id }).map_err(io)?;
        }
        if kind == StreamKind::Final {
            self.write_finals(&mut w, &functions).map_err(|e| match e {
                FinalError::Io(e) => io(e),
                FinalError::Exec(e) => e,
            })?;
        }
        stats.bytes = w.written();
        w.finish().map_err(io)?;
        Ok(stats)
    }

    /// Globals of every instance (all idle: the tenant is frozen and
    /// drained) and every job.
    fn write_finals<W: Write>(
        &self,
        w: &mut Writer<W>,
        functions: &[Arc<crate::state::Function>],
    ) -> Result<(), FinalError> {
        for f in functions {
            let globals: Vec<(u64, Vec<_>)> = f.pool.with_idle(|idle| {
                idle.iter_mut()
                    .map(|p| {
                        let id = p.inst.shared().id;
                        p.inst
                            .globals(&f.mutable_globals)
                            .map(|g| (id, g))
                            .map_err(|e| ExecError::Internal(format!("instance {id}: {e}")))
                    })
                    .collect::<Result<_, _>>()
            })?;
            for (instance, globals) in globals {
                w.record(&Record::Globals { instance, globals })?;
            }
        }
        let jobs: Vec<(String, Option<String>, Option<bytes::Bytes>)> = self
            .tenant
            .jobs()
            .records()
            .map(|j| {
                Ok((
                    serde_json::to_string(&j.info)
                        .map_err(|e| ExecError::Internal(e.to_string()))?,
                    j.request.as_ref().and_then(|r| r.content_type.clone()),
                    j.request.as_ref().map(|r| r.body.clone()),
                ))
            })
            .collect::<Result<_, ExecError>>()?;
        for (info_json, content_type, body) in jobs {
            w.record(&Record::Job {
                info_json,
                content_type,
                body: body.as_ref().map(|b| b.len() as u64),
            })?;
            if let Some(b) = body {
                w.data(&b)?;
            }
        }
        Ok(())
    }

    /// Freezes the tenant for the final round and waits until its work
    /// has finished (up to `timeout`); false if some is still running (the
    /// tenant is thawed again).
    pub async fn freeze(&self, timeout: std::time::Duration) -> bool {
        self.tenant.freeze();
        self.froze.store(true, Ordering::Release);
        if self.tenant.wait_drained(timeout).await {
            return true;
        }
        self.thaw();
        false
    }

    /// Ends the session without a move: stops tracking, and thaws the
    /// tenant if the final round froze it.
    pub fn end(&self) {
        let mut r = lock(&self.rounds);
        for (_, sent) in std::mem::take(&mut r.instances) {
            sent.stop();
        }
        r.poisoned = true;
        drop(r);
        self.thaw();
    }

    fn thaw(&self) {
        if self.froze.swap(false, Ordering::AcqRel) {
            self.tenant.thaw();
        }
    }
}

enum FinalError {
    Io(std::io::Error),
    Exec(ExecError),
}

impl From<std::io::Error> for FinalError {
    fn from(e: std::io::Error) -> Self {
        FinalError::Io(e)
    }
}

impl From<ExecError> for FinalError {
    fn from(e: ExecError) -> Self {
        FinalError::Exec(e)
    }
}

/// Writes the tensors of `sent` that its reader lacks (new handles, or
/// handles now naming another tensor) as records of `instance`, and frees
/// the handles that went; returns the tensor bytes written.
fn write_tensors<W: Write>(
    w: &mut Writer<W>,
    sent: &mut Sent,
    instance: u64,
    backend: &dyn Backend,
) -> std::io::Result<u64> {
    let listing = sent.shared.tensors.listing();
    let mut bytes = 0;
    let now: HashMap<i32, u64> = listing.iter().map(|e| (e.handle, e.serial)).collect();
    let freed: Vec<i32> = sent
        .tensors
        .keys()
        .filter(|h| !now.contains_key(h))
        .copied()
        .collect();
    for handle in freed {
        sent.tensors.remove(&handle);
        w.record(&Record::Free { instance, handle })?;
    }
    for e in listing {
        if sent.tensors.get(&e.handle) == Some(&e.serial) {
            continue;
        }
        match &e.asset {
            Some(name) => w.record(&Record::Asset {
                instance,
                handle: e.handle,
                name: name.clone(),
            })?,
            None => {
                let len = e.tensor.nbytes();
                w.record(&Record::Tensor {
                    instance,
                    handle: e.handle,
                    dtype: e.tensor.dtype().code() as u8,
                    dims: e.tensor.dims().iter().map(|&d| d as u64).collect(),
                    len,
                })?;
                with_tensor_bytes(backend, &e.tensor, |b| w.data(b))?;
                bytes += len;
            }
        }
        sent.tensors.insert(e.handle, e.serial);
    }
    Ok(bytes)
}

/// Calls `f` with the tensor's bytes: in place for host storage, read
/// back from the device otherwise.
pub fn with_tensor_bytes(
    backend: &dyn Backend,
    t: &Tensor,
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    match t.storage() {
        Storage::Cpu(s) => f(s.as_le_bytes()),
        #[allow(unreachable_patterns)]
        _ => {
            let bytes = backend
                .to_bytes(t)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            f(&bytes)
        }
    }
}

/// Outbound sessions by id, at most one per tenant.
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Arc<Outbound>>>,
}

impl Sessions {
    /// Adds `s`, ending (and returning) any earlier session of its tenant.
    pub fn insert(&self, s: Arc<Outbound>) -> Option<Arc<Outbound>> {
        let mut m = lock(&self.by_id);
        let old_id = m
            .values()
            .find(|o| o.tenant.id == s.tenant.id)
            .map(|o| o.id.clone());
        let old = old_id.and_then(|id| m.remove(&id));
        m.insert(s.id.clone(), s);
        old
    }

    pub fn get(&self, id: &str) -> Option<Arc<Outbound>> {
        lock(&self.by_id).get(id).cloned()
    }

    /// Removes a session.
    pub fn remove(&self, id: &str) -> Option<Arc<Outbound>> {
        lock(&self.by_id).remove(id)
    }

    /// Removes the session of `tenant`, if any.
    pub fn remove_tenant(&self, tenant: &TenantId) -> Option<Arc<Outbound>> {
        let mut m = lock(&self.by_id);
        let id = m
            .values()
            .find(|o| &o.tenant.id == tenant)
            .map(|o| o.id.clone())?;
        m.remove(&id)
    }

    /// Sessions open.
    pub fn count(&self) -> usize {
        lock(&self.by_id).len()
    }
}
