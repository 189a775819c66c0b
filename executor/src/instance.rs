//! Warm instances: a store, its tensors and its linear memory, kept between
//! invocations the way a durable object keeps its state.
//!
//! An instance lives until it traps or misses its deadline; the next
//! invocation then gets a fresh one (with `init` run again). Between
//! invocations nothing of the request survives but what the guest kept:
//! input handles the guest did not free are freed when `handle` returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tensor_wasm_kernels::{Backend, DType, Tensor};
use tensor_wasm_shared::snapshot::{AssetHandle, GlobalSnapshot, InstanceSnapshot, TensorSnapshot};
use wasmtime::{InstancePre, Memory, Store, StoreLimitsBuilder, Trap, TypedFunc, Val};
use wasmtime_wasi::WasiCtxBuilder;

use crate::engine::Runtime;
use crate::host::{CallCtx, DeadlineExceeded, HostState};
use crate::logs::FunctionLog;
use crate::memory::{HostMemoryError, HostUsage, InstanceLimiter};
use crate::metrics::Metrics;
use crate::sys::MemoryView;
use crate::tensors::{TableView, TenantUsage, TensorTable};
use crate::wasm::GLOBAL_EXPORT_PREFIX;

/// What an instance is made from, besides its module.
#[derive(Clone, Debug)]
pub struct InstanceSetup {
    pub backend: Arc<dyn Backend>,
    pub assets: Arc<HashMap<String, Tensor>>,
    pub usage: Arc<TenantUsage>,
    /// The tenant's host memory, charged for linear memory.
    pub host: Arc<HostUsage>,
    pub log: FunctionLog,
    pub metrics: Arc<Metrics>,
    /// Linear memory cap, in bytes.
    pub memory_limit: u64,
    /// Raw response cap, in bytes.
    pub max_output_bytes: usize,
    /// Error message cap, in bytes.
    pub max_error_message: usize,
    /// Table element cap.
    pub max_table_elements: usize,
}

/// One invocation's request.
#[derive(Debug, Default)]
pub struct Request {
    pub inputs: HashMap<String, Tensor>,
    pub body: Arc<[u8]>,
    /// Where its chunks go, when it is streamed (`crate::stream`).
    pub stream: Option<Arc<crate::stream::Sink>>,
}

/// One invocation's result.
#[derive(Debug, Default)]
pub struct Response {
    /// Named outputs, in the order first set.
    pub outputs: Vec<(String, Tensor)>,
    /// Raw bytes written with `output_write`.
    pub raw: Vec<u8>,
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    /// The guest trapped; the instance is gone.
    #[error("guest trapped: {0}")]
    Trap(String),
    /// The deadline passed; the instance is gone.
    #[error("the invocation exceeded its deadline of {0:?}")]
    Deadline(Duration),
    /// `handle` (or `init`) returned non-zero.
    #[error("function returned {code}: {message}")]
    Function { code: i32, message: String },
    /// The device failed while finishing the invocation.
    #[error("device error: {0}")]
    Device(String),
    /// The instance could not be created.
    #[error("cannot create an instance: {0}")]
    Instantiate(String),
    /// Host memory for the instance's linear memory was refused.
    #[error("cannot create an instance: {0}")]
    Memory(#[from] HostMemoryError),
}

impl InvokeError {
    /// Whether the instance must be thrown away.
    pub fn kills_instance(&self) -> bool {
        !matches!(self, InvokeError::Function { .. })
    }
}

/// A fixed wall clock: guests see the Unix epoch, always, so their runs do
/// not depend on when or where they happen.
struct FixedWall;
impl wasmtime_wasi::HostWallClock for FixedWall {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

/// A fixed monotonic clock, for the same reason.
struct FixedMonotonic;
impl wasmtime_wasi::HostMonotonicClock for FixedMonotonic {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// What the rest of the executor may see of a live instance while it runs:
/// its id, its linear memory and its tensor table. A migration reads an
/// instance through this, without taking it from its pool.
#[derive(Debug)]
pub struct InstanceShared {
    /// Unique among this executor's instances, for its life.
    pub id: u64,
    pub memory: MemoryView,
    /// Those reading the memory's written pages.
    pub readers: crate::tracking::Readers,
    pub tensors: TableView,
    /// Invocations run on it so far.
    pub invocations: AtomicU64,
}

/// Ids of instances, in order of creation.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A live instance.
pub struct WarmInstance {
    store: Store<HostState>,
    handle: TypedFunc<(), i32>,
    instance: wasmtime::Instance,
    shared: Arc<InstanceShared>,
    /// Bytes of address space reserved for the memory (its limit).
    reserved: usize,
}

impl Drop for WarmInstance {
    fn drop(&mut self) {
        // Before the store (and the memory's slot) goes.
        self.shared.memory.close();
    }
}

impl std::fmt::Debug for WarmInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmInstance").finish_non_exhaustive()
    }
}

fn classify(e: wasmtime::Error, deadline: Duration) -> InvokeError {
    if e.downcast_ref::<DeadlineExceeded>().is_some()
        || e.downcast_ref::<Trap>() == Some(&Trap::Interrupt)
    {
        InvokeError::Deadline(deadline)
    } else {
        InvokeError::Trap(format!("{e:#}"))
    }
}

impl WarmInstance {
    /// Instantiates, then runs `init` when `run_init` and the module has
    /// it (instances restored from a snapshot skip it).
    pub fn create(
        pre: &InstancePre<HostState>,
        setup: &InstanceSetup,
        run_init: bool,
        deadline: Duration,
    ) -> Result<WarmInstance, InvokeError> {
        let engine = pre.module().engine();
        let wasi = WasiCtxBuilder::new()
            .stdout(setup.log.clone())
            .stderr(setup.log.clone())
            .wall_clock(FixedWall)
            .monotonic_clock(FixedMonotonic)
            .secure_random(wasmtime_wasi::Deterministic::new(vec![0x5a; 32]))
            .insecure_random(wasmtime_wasi::Deterministic::new(vec![0xa5; 32]))
            .insecure_random_seed(0)
            .build_p1();
        let limits = StoreLimitsBuilder::new()
            .memory_size(setup.memory_limit as usize)
            .table_elements(setup.max_table_elements)
            .instances(1)
            .tables(4)
            .memories(1)
            .trap_on_grow_failure(false)
            .build();
        let state = HostState {
            wasi,
            limits: InstanceLimiter::new(limits, setup.host.clone()),
            tensors: TensorTable::new(setup.usage.clone()),
            call: CallCtx::default(),
            last_error: String::new(),
            backend: setup.backend.clone(),
            assets: setup.assets.clone(),
            deadline: Some(Instant::now() + deadline),
            memory: None,
            metrics: setup.metrics.clone(),
            call_started: Instant::now(),
            max_output_bytes: setup.max_output_bytes,
            max_error_message: setup.max_error_message,
            cancel_aware: crate::wasm::guest_abi_of(pre.module()) >= 2,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(Runtime::deadline_ticks(deadline));
        store.epoch_deadline_trap();
        let instance = match pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => {
                if let Some(refused) = store.data_mut().limits.refused.take() {
                    return Err(InvokeError::Memory(refused));
                }
                return Err(match classify(e, deadline) {
                    InvokeError::Trap(m) => InvokeError::Instantiate(m),
                    other => other,
                });
            }
        };
        let memory: Memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| InvokeError::Instantiate("no exported memory".into()))?;
        store.data_mut().memory = Some(memory);
        let handle = instance
            .get_typed_func::<(), i32>(&mut store, "handle")
            .map_err(|e| InvokeError::Instantiate(format!("{e:#}")))?;
        let shared = Arc::new(InstanceShared {
            id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            memory: MemoryView::default(),
            readers: Default::default(),
            tensors: store.data().tensors.view(),
            invocations: AtomicU64::new(0),
        });
        let mut inst = WarmInstance {
            store,
            handle,
            instance,
            shared,
            reserved: usize::try_from(setup.memory_limit).unwrap_or(usize::MAX),
        };
        inst.publish_memory();
        let init = run_init
            .then(|| {
                inst.instance
                    .get_typed_func::<(), i32>(&mut inst.store, "init")
                    .ok()
            })
            .flatten();
        if let Some(init) = init {
            let result = init.call(&mut inst.store, ());
            let call = inst.store.data_mut().end_call();
            let code = result.map_err(|e| classify(e, deadline))?;
            if code != 0 {
                let message = call.error_message.unwrap_or_default();
                return Err(InvokeError::Function { code, message });
            }
        }
        inst.store.data_mut().deadline = None;
        Ok(inst)
    }

    /// Runs `handle` once.
    pub fn invoke(
        &mut self,
        request: Request,
        deadline: Duration,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Response, InvokeError> {
        self.shared.invocations.fetch_add(1, Ordering::Relaxed);
        {
            let st = self.store.data_mut();
            st.call = CallCtx {
                inputs: request.inputs,
                body: request.body,
                cancel,
                stream: request.stream,
                ..CallCtx::default()
            };
            st.deadline = Some(Instant::now() + deadline);
        }
        self.store
            .set_epoch_deadline(Runtime::deadline_ticks(deadline));
        let result = self.handle.call(&mut self.store, ());
        self.publish_memory();
        let st = self.store.data_mut();
        st.deadline = None;
        let call = st.end_call();
        let code = result.map_err(|e| classify(e, deadline))?;
        // Device faults of enqueued ops surface here, at the end of handle.
        st.backend
            .synchronize()
            .map_err(|e| InvokeError::Device(e.to_string()))?;
        if code != 0 {
            return Err(InvokeError::Function {
                code,
                message: call.error_message.unwrap_or_default(),
            });
        }
        Ok(Response {
            outputs: call.outputs,
            raw: call.raw_out,
        })
    }

    /// What others may see of this instance.
    pub fn shared(&self) -> &Arc<InstanceShared> {
        &self.shared
    }

    /// Tells the shared view where the memory is and how large, after a
    /// call may have grown it.
    fn publish_memory(&mut self) {
        if let Some(memory) = self.store.data().memory {
            let size = memory.data_size(&self.store);
            let base = memory.data_ptr(&self.store);
            self.shared.memory.update(base, size, self.reserved);
        }
    }

    /// The store, for snapshots.
    pub fn store_mut(&mut self) -> &mut Store<HostState> {
        &mut self.store
    }

    /// The wasmtime instance, for snapshots.
    pub fn instance(&self) -> wasmtime::Instance {
        self.instance
    }
}

/// Why an instance could not be captured or restored.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SnapshotStateError(pub String);

impl WarmInstance {
    /// The instance's state: memory, the mutable globals at `globals`
    /// (exported as `__tw_global_<index>` by the rewrite), and every tensor
    /// with its handle, read back from the device.
    pub fn capture(&mut self, globals: &[u32]) -> Result<InstanceSnapshot, SnapshotStateError> {
        let memory = self
            .store
            .data()
            .memory
            .ok_or_else(|| SnapshotStateError("instance has no memory".into()))?;
        let mem = memory.data(&self.store).to_vec();
        let out_globals = self.globals(globals)?;
        let st = self.store.data();
        let mut tensors = Vec::new();
        for (handle, t) in st.tensors.owned() {
            let data = st
                .backend
                .to_bytes(&t)
                .map_err(|e| SnapshotStateError(format!("tensor {handle}: {e}")))?;
            tensors.push(TensorSnapshot {
                handle,
                dtype: t.dtype().code() as u8,
                dims: t.dims().iter().map(|&d| d as u64).collect(),
                data,
            });
        }
        let mut asset_handles: Vec<AssetHandle> = st
            .tensors
            .asset_handles()
            .iter()
            .map(|(name, &handle)| AssetHandle {
                name: name.clone(),
                handle,
            })
            .collect();
        asset_handles.sort_by_key(|a| a.handle);
        Ok(InstanceSnapshot {
            memory: mem,
            globals: out_globals,
            tensors,
            asset_handles,
        })
    }

    /// Makes the linear memory `size` bytes of zeros (an instance being
    /// rebuilt from a stream of pages, whose source sends only the pages
    /// that are not zeros): what instantiation wrote is cleared, and the
    /// memory grows to `size`, charged to the tenant's host memory.
    pub fn zero_memory(&mut self, size: usize) -> Result<(), SnapshotStateError> {
        let memory = self
            .store
            .data()
            .memory
            .ok_or_else(|| SnapshotStateError("instance has no memory".into()))?;
        memory.data_mut(&mut self.store).fill(0);
        self.grow_memory(size)
    }

    /// Grows the linear memory to `size` bytes (whole 64 KiB pages), if it
    /// is smaller.
    pub fn grow_memory(&mut self, size: usize) -> Result<(), SnapshotStateError> {
        let memory = self
            .store
            .data()
            .memory
            .ok_or_else(|| SnapshotStateError("instance has no memory".into()))?;
        if !size.is_multiple_of(65536) {
            return Err(SnapshotStateError(format!(
                "a memory of {size} bytes is not whole pages"
            )));
        }
        let have = memory.data_size(&self.store);
        if size > have {
            memory
                .grow(&mut self.store, ((size - have) / 65536) as u64)
                .map_err(|e| {
                    let refused = self.store.data_mut().limits.refused.take();
                    SnapshotStateError(match refused {
                        Some(r) => format!("a memory of {size} bytes: {r}"),
                        None => format!("a memory of {size} bytes: {e}"),
                    })
                })?;
        }
        self.publish_memory();
        Ok(())
    }

    /// Writes `bytes` into the linear memory at `offset`.
    pub fn write_memory(&mut self, offset: usize, bytes: &[u8]) -> Result<(), SnapshotStateError> {
        let memory = self
            .store
            .data()
            .memory
            .ok_or_else(|| SnapshotStateError("instance has no memory".into()))?;
        let data = memory.data_mut(&mut self.store);
        let end = offset
            .checked_add(bytes.len())
            .filter(|&e| e <= data.len())
            .ok_or_else(|| {
                SnapshotStateError(format!(
                    "{} bytes at {offset} lie past a memory of {}",
                    bytes.len(),
                    data.len()
                ))
            })?;
        data[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    /// The instance's tensor table.
    pub fn tensors_mut(&mut self) -> &mut TensorTable {
        &mut self.store.data_mut().tensors
    }

    /// The mutable globals at `globals` (exported as `__tw_global_<index>`
    /// by the rewrite).
    pub fn globals(&mut self, globals: &[u32]) -> Result<Vec<GlobalSnapshot>, SnapshotStateError> {
        let mut out = Vec::with_capacity(globals.len());
        for &index in globals {
            let g = self
                .instance
                .get_global(&mut self.store, &format!("{GLOBAL_EXPORT_PREFIX}{index}"))
                .ok_or_else(|| SnapshotStateError(format!("global {index} is not exported")))?;
            let (kind, bits) = match g.get(&mut self.store) {
                Val::I32(v) => (0, u64::from(v as u32)),
                Val::I64(v) => (1, v as u64),
                Val::F32(v) => (2, u64::from(v)),
                Val::F64(v) => (3, v),
                other => {
                    return Err(SnapshotStateError(format!(
                        "global {index} holds {other:?}, which cannot be snapshotted"
                    )));
                }
            };
            out.push(GlobalSnapshot { index, kind, bits });
        }
        Ok(out)
    }

    /// Sets the mutable globals `globals` names.
    pub fn set_globals(&mut self, globals: &[GlobalSnapshot]) -> Result<(), SnapshotStateError> {
        for g in globals {
            let name = format!("{GLOBAL_EXPORT_PREFIX}{}", g.index);
            let global = self
                .instance
                .get_global(&mut self.store, &name)
                .ok_or_else(|| SnapshotStateError(format!("global {} is not exported", g.index)))?;
            let val = match g.kind {
                0 => Val::I32(g.bits as u32 as i32),
                1 => Val::I64(g.bits as i64),
                2 => Val::F32(g.bits as u32),
                3 => Val::F64(g.bits),
                k => return Err(SnapshotStateError(format!("global kind {k}"))),
            };
            global
                .set(&mut self.store, val)
                .map_err(|e| SnapshotStateError(format!("global {}: {e}", g.index)))?;
        }
        Ok(())
    }

    /// An instance resumed from `snap`: instantiated without `init`, its
    /// memory, globals and tensors put back (tensors uploaded to the device
    /// and charged to the tenant).
    pub fn restore(
        pre: &InstancePre<HostState>,
        setup: &InstanceSetup,
        snap: &InstanceSnapshot,
        deadline: Duration,
    ) -> Result<WarmInstance, SnapshotStateError> {
        let mut inst = WarmInstance::create(pre, setup, false, deadline)
            .map_err(|e| SnapshotStateError(e.to_string()))?;
        let memory = inst
            .store
            .data()
            .memory
            .ok_or_else(|| SnapshotStateError("instance has no memory".into()))?;
        let have = memory.data_size(&inst.store);
        let want = snap.memory.len();
        if want < have || !want.is_multiple_of(65536) {
            return Err(SnapshotStateError(format!(
                "memory of {want} bytes cannot replace the module's {have}"
            )));
        }
        memory
            .grow(&mut inst.store, ((want - have) / 65536) as u64)
            .map_err(|e| SnapshotStateError(format!("memory of {want} bytes: {e}")))?;
        memory.data_mut(&mut inst.store)[..want].copy_from_slice(&snap.memory);
        inst.publish_memory();
        inst.set_globals(&snap.globals)?;
        let st = inst.store.data_mut();
        for t in &snap.tensors {
            let dtype = DType::from_code(i32::from(t.dtype))
                .map_err(|e| SnapshotStateError(format!("tensor {}: {e}", t.handle)))?;
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            let tensor = st
                .backend
                .from_bytes(dtype, &dims, &t.data)
                .map_err(|e| SnapshotStateError(format!("tensor {}: {e}", t.handle)))?;
            st.tensors
                .restore(t.handle, tensor)
                .map_err(|e| SnapshotStateError(format!("tensor {}: {}", t.handle, e.message)))?;
        }
        for a in &snap.asset_handles {
            let tensor = st
                .assets
                .get(&a.name)
                .cloned()
                .ok_or_else(|| SnapshotStateError(format!("no asset named {:?}", a.name)))?;
            st.tensors
                .restore_asset(&a.name, a.handle, tensor)
                .map_err(|e| SnapshotStateError(e.message))?;
        }
        Ok(inst)
    }
}
