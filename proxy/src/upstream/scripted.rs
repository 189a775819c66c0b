//! In-memory executors behind [`ExecutorApi`], for the proxy's unit tests.
//!
//! A [`Net`] is a [`Connector`] over [`Scripted`] executors, one per
//! address. Each keeps its tenants as the real executor's internal API
//! describes them (executor/src/http.rs): an export freezes a tenant it
//! holds and returns its state, an import of a tenant it holds already is
//! `tenant_exists`, a call naming a tenant it does not hold is
//! `tenant_not_here`. On top of that a test scripts faults (an error answer
//! or no answer to one kind of call) and holds (a call that waits until the
//! test releases it, to look at the proxy mid-protocol).
//!
//! Every call is written to the net's one log as `"<executor> <call>
//! [<tenant> [<module>]]"` when it is made, before any fault or hold, so
//! tests assert which executor got which call in which order.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tensor_wasm_shared::api::{DeviceDescription, ExecutorInfo, ExecutorStats};
use tensor_wasm_shared::identity::{self, Identity};
use tensor_wasm_shared::{ErrorCode, TenantId};
use tokio::sync::Semaphore;

use super::{Connector, ExecutorApi, InboundState, Transfer, UpstreamError};
use crate::fleet::lock;

/// The internal token the scripted executors hold: a fleet opened with
/// another one cannot verify them.
pub(crate) const TOKEN: &str = "internal";

/// The kinds of call, as the log names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    Health,
    Identity,
    Info,
    Modules,
    Module,
    Precompile,
    Export,
    Import,
    Restore,
    Thaw,
    Drop,
    StartOutbound,
    EndOutbound,
    Pull,
    Commit,
    Discard,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Health => "health",
            Op::Identity => "identity",
            Op::Info => "info",
            Op::Modules => "modules",
            Op::Module => "module",
            Op::Precompile => "precompile",
            Op::Export => "export",
            Op::Import => "import",
            Op::Restore => "restore",
            Op::Thaw => "thaw",
            Op::Drop => "drop",
            Op::StartOutbound => "outbound",
            Op::EndOutbound => "end-outbound",
            Op::Pull => "pull",
            Op::Commit => "commit",
            Op::Discard => "discard",
        }
    }
}

/// How a scripted call fails.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// Connection refused.
    Unreachable,
    /// An error answer with this code (and its HTTP status).
    Answer(ErrorCode),
}

/// A call that waits for the test.
#[derive(Debug)]
pub(crate) struct Hold {
    reached: AtomicBool,
    release: Semaphore,
}

impl Hold {
    /// Whether the held call has been made.
    pub(crate) fn reached(&self) -> bool {
        self.reached.load(Ordering::Acquire)
    }

    /// Lets the held call go on.
    pub(crate) fn release(&self) {
        self.release.add_permits(1);
    }
}

/// One tenant on a scripted executor.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tenant {
    pub(crate) state: Bytes,
    pub(crate) frozen: bool,
    /// Function id → wasm.
    pub(crate) modules: BTreeMap<String, Bytes>,
}

/// One in-memory executor.
#[derive(Debug)]
pub(crate) struct Scripted {
    id: String,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    tenants: Mutex<BTreeMap<String, Tenant>>,
    precompiled: Mutex<Vec<Bytes>>,
    down: AtomicBool,
    faults: Mutex<HashMap<Op, Fault>>,
    /// Faults of the next call only; before `faults`.
    once: Mutex<HashMap<Op, Fault>>,
    holds: Mutex<HashMap<Op, Arc<Hold>>>,
    /// Whether it has the pre-copy routes (an older release has not: they
    /// answer `not_found`).
    precopy: bool,
    /// Outbound sessions: id → (tenant, whether its final round froze it).
    sessions: Mutex<HashMap<String, (String, bool)>>,
    /// Inbound tenants pulled and not committed: tenant → (state, source
    /// address, session).
    staged: Mutex<HashMap<String, (Bytes, String, String)>>,
    /// Tenants it committed since.
    committed: Mutex<Vec<String>>,
    /// The other executors, by address, for pulls.
    peers: Arc<Mutex<HashMap<String, Arc<Scripted>>>>,
}

impl Scripted {
    /// Its outbound sessions, by id.
    pub(crate) fn sessions(&self) -> HashMap<String, (String, bool)> {
        lock(&self.sessions).clone()
    }

    /// Forgets its inbound moves, as a restart does.
    pub(crate) fn forget_inbound(&self) {
        lock(&self.staged).clear();
        lock(&self.committed).clear();
    }

    /// The tenants it holds staged.
    pub(crate) fn staged(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.staged).keys().cloned().collect();
        v.sort();
        v
    }

    fn peer(&self, addr: &str) -> Result<Arc<Scripted>, UpstreamError> {
        lock(&self.peers)
            .get(addr)
            .filter(|p| !p.down.load(Ordering::Acquire))
            .cloned()
            .ok_or_else(|| self.answer(ErrorCode::ExecutorUnavailable))
    }

    fn route(&self) -> Result<(), UpstreamError> {
        if self.precopy {
            Ok(())
        } else {
            Err(self.answer(ErrorCode::NotFound))
        }
    }
    /// Gives it `tenant` with `state`, thawed, and these modules.
    pub(crate) fn hold_tenant(&self, tenant: &str, state: &[u8], modules: &[(&str, &[u8])]) {
        let t = Tenant {
            state: Bytes::copy_from_slice(state),
            frozen: false,
            modules: modules
                .iter()
                .map(|(id, w)| (id.to_string(), Bytes::copy_from_slice(w)))
                .collect(),
        };
        lock(&self.tenants).insert(tenant.to_string(), t);
    }

    /// Its copy of `tenant`, if it holds one.
    pub(crate) fn tenant(&self, tenant: &str) -> Option<Tenant> {
        lock(&self.tenants).get(tenant).cloned()
    }

    /// The wasm it was asked to precompile, in order.
    pub(crate) fn precompiled(&self) -> Vec<Bytes> {
        lock(&self.precompiled).clone()
    }

    /// Refuses every connection from now on (or again accepts them).
    pub(crate) fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Release);
    }

    /// Fails every `op` call from now on.
    pub(crate) fn fail(&self, op: Op, fault: Fault) {
        lock(&self.faults).insert(op, fault);
    }

    /// Fails the next `op` call only.
    pub(crate) fn fail_once(&self, op: Op, fault: Fault) {
        lock(&self.once).insert(op, fault);
    }

    /// Makes the next `op` call wait until [`Hold::release`].
    pub(crate) fn hold(&self, op: Op) -> Arc<Hold> {
        let h = Arc::new(Hold {
            reached: AtomicBool::new(false),
            release: Semaphore::new(0),
        });
        lock(&self.holds).insert(op, h.clone());
        h
    }

    /// Logs the call, waits on its hold, then applies its fault.
    async fn enter(
        &self,
        op: Op,
        tenant: Option<&TenantId>,
        module: Option<&str>,
    ) -> Result<(), UpstreamError> {
        let mut line = format!("{} {}", self.id, op.name());
        for part in [tenant.map(TenantId::as_str), module].into_iter().flatten() {
            line.push(' ');
            line.push_str(part);
        }
        lock(&self.log).push(line);
        let hold = lock(&self.holds).remove(&op);
        if let Some(h) = hold {
            h.reached.store(true, Ordering::Release);
            if let Ok(permit) = h.release.acquire().await {
                permit.forget();
            }
        }
        let once = lock(&self.once).remove(&op);
        let fault = once.or_else(|| lock(&self.faults).get(&op).copied());
        if self.down.load(Ordering::Acquire) || matches!(fault, Some(Fault::Unreachable)) {
            return Err(UpstreamError::Connect {
                addr: self.addr.clone(),
                source: std::io::ErrorKind::ConnectionRefused.into(),
            });
        }
        match fault {
            Some(Fault::Answer(code)) => Err(self.answer(code)),
            _ => Ok(()),
        }
    }

    fn answer(&self, code: ErrorCode) -> UpstreamError {
        UpstreamError::Status {
            addr: self.addr.clone(),
            status: code.http_status(),
            code: Some(code),
            message: format!("scripted {}", code.as_str()),
        }
    }

    /// Runs `f` on `tenant`, or answers `tenant_not_here`.
    fn with_tenant<R>(
        &self,
        tenant: &TenantId,
        f: impl FnOnce(&mut Tenant) -> Result<R, UpstreamError>,
    ) -> Result<R, UpstreamError> {
        match lock(&self.tenants).get_mut(tenant.as_str()) {
            Some(t) => f(t),
            None => Err(self.answer(ErrorCode::TenantNotHere)),
        }
    }
}

#[async_trait::async_trait]
impl ExecutorApi for Scripted {
    async fn health(&self) -> Result<(), UpstreamError> {
        self.enter(Op::Health, None, None).await
    }

    async fn identity(&self, nonce: &[u8]) -> Result<Identity, UpstreamError> {
        self.enter(Op::Identity, None, None).await?;
        Ok(identity::prove(TOKEN, &self.id, nonce))
    }

    async fn info(&self, _within: Duration) -> Result<ExecutorInfo, UpstreamError> {
        self.enter(Op::Info, None, None).await?;
        Ok(ExecutorInfo {
            id: self.id.clone(),
            addr: self.addr.clone(),
            version: "scripted".into(),
            healthy: true,
            device: DeviceDescription {
                kind: "cpu".into(),
                name: "scripted".into(),
                uuid: None,
                mig_profile: None,
                memory_total: 0,
                memory_used: 0,
            },
            tenants: lock(&self.tenants).keys().cloned().collect(),
            stats: ExecutorStats::default(),
            snapshot_formats: None,
            guest_abi: None,
            frozen: None,
            tenant_device_bytes: None,
            guest_abi_used: None,
        })
    }

    async fn modules(&self, tenant: &TenantId) -> Result<Vec<String>, UpstreamError> {
        self.enter(Op::Modules, Some(tenant), None).await?;
        self.with_tenant(tenant, |t| Ok(t.modules.keys().cloned().collect()))
    }

    async fn module(&self, tenant: &TenantId, id: &str) -> Result<Bytes, UpstreamError> {
        self.enter(Op::Module, Some(tenant), Some(id)).await?;
        self.with_tenant(tenant, |t| {
            t.modules
                .get(id)
                .cloned()
                .ok_or_else(|| self.answer(ErrorCode::FunctionNotFound))
        })
    }

    async fn precompile(&self, wasm: Bytes) -> Result<(), UpstreamError> {
        self.enter(Op::Precompile, None, None).await?;
        lock(&self.precompiled).push(wasm);
        Ok(())
    }

    async fn export(&self, tenant: &TenantId) -> Result<Bytes, UpstreamError> {
        self.enter(Op::Export, Some(tenant), None).await?;
        self.with_tenant(tenant, |t| {
            t.frozen = true;
            Ok(t.state.clone())
        })
    }

    async fn import_replacing(
        &self,
        tenant: &TenantId,
        snapshot: Bytes,
    ) -> Result<(), UpstreamError> {
        self.enter(Op::Restore, Some(tenant), None).await?;
        let t = Tenant {
            state: snapshot,
            ..Tenant::default()
        };
        lock(&self.tenants).insert(tenant.to_string(), t);
        Ok(())
    }

    async fn import(&self, tenant: &TenantId, snapshot: Bytes) -> Result<(), UpstreamError> {
        self.enter(Op::Import, Some(tenant), None).await?;
        let mut tenants = lock(&self.tenants);
        if tenants.contains_key(tenant.as_str()) {
            return Err(self.answer(ErrorCode::TenantExists));
        }
        let t = Tenant {
            state: snapshot,
            ..Tenant::default()
        };
        tenants.insert(tenant.to_string(), t);
        Ok(())
    }

    async fn thaw(&self, tenant: &TenantId) -> Result<(), UpstreamError> {
        self.enter(Op::Thaw, Some(tenant), None).await?;
        self.with_tenant(tenant, |t| {
            t.frozen = false;
            Ok(())
        })
    }

    async fn drop_tenant(&self, tenant: &TenantId) -> Result<(), UpstreamError> {
        self.enter(Op::Drop, Some(tenant), None).await?;
        lock(&self.sessions).retain(|_, (t, _)| t != tenant.as_str());
        match lock(&self.tenants).remove(tenant.as_str()) {
            Some(_) => Ok(()),
            None => Err(self.answer(ErrorCode::TenantNotHere)),
        }
    }

    async fn start_outbound(&self, tenant: &TenantId) -> Result<String, UpstreamError> {
        self.enter(Op::StartOutbound, Some(tenant), None).await?;
        self.route()?;
        self.with_tenant(tenant, |_| Ok(()))?;
        let id = format!("s-{}-{}", self.id, tenant);
        lock(&self.sessions).insert(id.clone(), (tenant.to_string(), false));
        Ok(id)
    }

    async fn end_outbound(&self, session: &str) -> Result<(), UpstreamError> {
        self.enter(Op::EndOutbound, None, Some(session)).await?;
        self.route()?;
        let (tenant, froze) = lock(&self.sessions)
            .remove(session)
            .ok_or_else(|| self.answer(ErrorCode::MoveNotFound))?;
        if froze && let Some(t) = lock(&self.tenants).get_mut(&tenant) {
            t.frozen = false;
        }
        Ok(())
    }

    async fn pull(
        &self,
        tenant: &TenantId,
        source: &str,
        session: &str,
    ) -> Result<Transfer, UpstreamError> {
        self.enter(Op::Pull, Some(tenant), None).await?;
        self.route()?;
        if lock(&self.tenants).contains_key(tenant.as_str()) {
            return Err(self.answer(ErrorCode::TenantExists));
        }
        let src = self.peer(source)?;
        if lock(&src.sessions).get(session).map(|(t, _)| t.as_str()) != Some(tenant.as_str()) {
            // The source's refusal, as a destination passes it on.
            return Err(self.answer(ErrorCode::CapacityExhausted));
        }
        let state = src
            .tenant(tenant.as_str())
            .ok_or_else(|| self.answer(ErrorCode::TenantNotHere))?
            .state;
        let bytes = state.len() as u64;
        lock(&self.staged).insert(
            tenant.to_string(),
            (state, source.to_string(), session.to_string()),
        );
        Ok(Transfer {
            bytes,
            rounds: 1,
            ..Transfer::default()
        })
    }

    async fn commit(&self, tenant: &TenantId) -> Result<Transfer, UpstreamError> {
        self.enter(Op::Commit, Some(tenant), None).await?;
        self.route()?;
        let (_, source, session) = lock(&self.staged)
            .get(tenant.as_str())
            .cloned()
            .ok_or_else(|| self.answer(ErrorCode::MoveNotFound))?;
        // The final round: the source freezes the tenant and sends it.
        let src = self.peer(&source)?;
        let state = {
            let mut sessions = lock(&src.sessions);
            let entry = sessions
                .get_mut(&session)
                .ok_or_else(|| self.answer(ErrorCode::CapacityExhausted))?;
            entry.1 = true;
            let mut tenants = lock(&src.tenants);
            let t = tenants
                .get_mut(tenant.as_str())
                .ok_or_else(|| self.answer(ErrorCode::TenantNotHere))?;
            t.frozen = true;
            t.state.clone()
        };
        lock(&self.staged).remove(tenant.as_str());
        let bytes = state.len() as u64;
        lock(&self.tenants).insert(
            tenant.to_string(),
            Tenant {
                state,
                ..Tenant::default()
            },
        );
        lock(&self.committed).push(tenant.to_string());
        Ok(Transfer {
            bytes,
            ..Transfer::default()
        })
    }

    async fn discard(&self, tenant: &TenantId) -> Result<InboundState, UpstreamError> {
        self.enter(Op::Discard, Some(tenant), None).await?;
        self.route()?;
        if lock(&self.staged).remove(tenant.as_str()).is_some() {
            return Ok(InboundState::Discarded);
        }
        if lock(&self.committed).iter().any(|t| t == tenant.as_str()) {
            return Ok(InboundState::Committed);
        }
        Ok(InboundState::None)
    }
}

/// The scripted executors by address, and the log of their calls.
#[derive(Debug, Default)]
pub(crate) struct Net {
    log: Arc<Mutex<Vec<String>>>,
    executors: Arc<Mutex<HashMap<String, Arc<Scripted>>>>,
}

impl Net {
    /// Adds executor `id` at `addr`, of a release that moves tenants by
    /// stop-and-copy only.
    pub(crate) fn add(&self, id: &str, addr: &str) -> Arc<Scripted> {
        self.add_with(id, addr, false)
    }

    /// Adds executor `id` at `addr`, with the pre-copy routes.
    pub(crate) fn add_precopy(&self, id: &str, addr: &str) -> Arc<Scripted> {
        self.add_with(id, addr, true)
    }

    fn add_with(&self, id: &str, addr: &str, precopy: bool) -> Arc<Scripted> {
        let e = Arc::new(Scripted {
            id: id.to_string(),
            addr: addr.to_string(),
            log: self.log.clone(),
            tenants: Mutex::new(BTreeMap::new()),
            precompiled: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
            faults: Mutex::new(HashMap::new()),
            once: Mutex::new(HashMap::new()),
            holds: Mutex::new(HashMap::new()),
            precopy,
            sessions: Mutex::new(HashMap::new()),
            staged: Mutex::new(HashMap::new()),
            committed: Mutex::new(Vec::new()),
            peers: self.executors.clone(),
        });
        lock(&self.executors).insert(addr.to_string(), e.clone());
        e
    }

    /// The calls made so far, in order, and forgets them.
    pub(crate) fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.log))
    }
}

impl Connector for Net {
    /// The executor at `addr`; one nobody added refuses connections.
    fn connect(&self, addr: &str) -> Arc<dyn ExecutorApi> {
        if let Some(e) = lock(&self.executors).get(addr) {
            return e.clone();
        }
        let nobody = Net {
            log: self.log.clone(),
            executors: Arc::new(Mutex::new(HashMap::new())),
        }
        .add(addr, addr);
        nobody.set_down(true);
        nobody
    }
}

/// Waits, by polling, until `cond` holds: how tests order themselves
/// after an event in another task, instead of sleeping for it.
pub(crate) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..60_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never happened: {what}");
}
