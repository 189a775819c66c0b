//! Warm instances: a store, its tensors and its linear memory, kept between
//! invocations the way a durable object keeps its state.
//!
//! An instance lives until it traps or misses its deadline; the next
//! invocation then gets a fresh one (with `init` run again). Between
//! invocations nothing of the request survives but what the guest kept:
//! input handles the guest did not free are freed when `handle` returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tensor_wasm_kernels::{Backend, Tensor};
use wasmtime::{InstancePre, Memory, Store, StoreLimitsBuilder, Trap, TypedFunc};
use wasmtime_wasi::WasiCtxBuilder;

use crate::engine::Runtime;
use crate::host::{CallCtx, DeadlineExceeded, HostState};
use crate::logs::FunctionLog;
use crate::metrics::Metrics;
use crate::tensors::{TenantUsage, TensorTable};

/// What an instance is made from, besides its module.
#[derive(Clone, Debug)]
pub struct InstanceSetup {
    pub backend: Arc<dyn Backend>,
    pub assets: Arc<HashMap<String, Tensor>>,
    pub usage: Arc<TenantUsage>,
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

/// A live instance.
pub struct WarmInstance {
    store: Store<HostState>,
    handle: TypedFunc<(), i32>,
    instance: wasmtime::Instance,
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
            limits,
            tensors: TensorTable::new(setup.usage.clone()),
            call: CallCtx::default(),
            last_error: String::new(),
            backend: setup.backend.clone(),
            assets: setup.assets.clone(),
            deadline: Some(Instant::now() + deadline),
            memory: None,
            metrics: setup.metrics.clone(),
            max_output_bytes: setup.max_output_bytes,
            max_error_message: setup.max_error_message,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(Runtime::deadline_ticks(deadline));
        store.epoch_deadline_trap();
        let instance = pre
            .instantiate(&mut store)
            .map_err(|e| match classify(e, deadline) {
                InvokeError::Trap(m) => InvokeError::Instantiate(m),
                other => other,
            })?;
        let memory: Memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| InvokeError::Instantiate("no exported memory".into()))?;
        store.data_mut().memory = Some(memory);
        let handle = instance
            .get_typed_func::<(), i32>(&mut store, "handle")
            .map_err(|e| InvokeError::Instantiate(format!("{e:#}")))?;
        let mut inst = WarmInstance {
            store,
            handle,
            instance,
        };
        let init = run_init
            .then(|| {
                inst.instance
                    .get_typed_func::<(), i32>(&mut inst.store, "init")
                    .ok()
            })
            .flatten();
        if let Some(init) = init {
            let code = init
                .call(&mut inst.store, ())
                .map_err(|e| classify(e, deadline))?;
            if code != 0 {
                let st = inst.store.data_mut();
                let message = st.call.error_message.take().unwrap_or_default();
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
    ) -> Result<Response, InvokeError> {
        {
            let st = self.store.data_mut();
            st.call = CallCtx {
                inputs: request.inputs,
                body: request.body,
                ..CallCtx::default()
            };
            st.deadline = Some(Instant::now() + deadline);
        }
        self.store
            .set_epoch_deadline(Runtime::deadline_ticks(deadline));
        let result = self.handle.call(&mut self.store, ());
        let st = self.store.data_mut();
        st.deadline = None;
        let call = std::mem::take(&mut st.call);
        for h in call.input_handles {
            // Already freed by the guest, or not: either way it is gone now.
            let _ = st.tensors.free(h);
        }
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

    /// The store, for snapshots.
    pub fn store_mut(&mut self) -> &mut Store<HostState> {
        &mut self.store
    }

    /// The wasmtime instance, for snapshots.
    pub fn instance(&self) -> wasmtime::Instance {
        self.instance
    }
}
