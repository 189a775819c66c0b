//! Starting and stopping an executor process: pick the device, load the
//! registry from the state directory, serve HTTP until told to stop.

use axum::serve::ListenerExt as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tensor_wasm_kernels::{Backend, CpuBackend, Limits};
use tensor_wasm_shared::api::DeviceDescription;

use crate::config::{EngineLimits, TenantQuotas};
use crate::engine::{EngineError, Runtime};
use crate::http::{self, App};
use crate::metrics::Metrics;
use crate::registry::{BackendFactory, Registry};

/// How often finished jobs past their retention are dropped: 30 s.
const JANITOR_PERIOD: Duration = Duration::from_secs(30);

/// How often the checkpointer looks for instances with a frame due: 100 ms,
/// the shortest interval a function may ask for.
const CHECKPOINT_PERIOD: Duration = crate::state::MIN_CHECKPOINT;

/// Which device the executor drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when there is one (and the binary has the `cuda`
    /// feature), else the CPU.
    Auto,
    Cpu,
    /// The CUDA device with this ordinal (as the process sees it: under
    /// `CUDA_VISIBLE_DEVICES=<uuid>` that is always 0).
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device {s:?}; use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// Everything an executor process is started with.
#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Stable name (`gpu0`, `mig-<uuid8>`, `cpu0`, a pod name).
    pub id: String,
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub internal_token: String,
    pub device: DeviceChoice,
    pub limits: EngineLimits,
    pub quotas: TenantQuotas,
    /// `TENSOR_WASM_SNAPSHOT_KEY`: signs exported snapshots; when set,
    /// imports must carry a valid signature.
    pub snapshot_key: Option<Vec<u8>>,
    /// How migration rounds find the pages written (`--page-tracking`).
    pub page_tracking: crate::tracking::TrackingChoice,
    /// Where compiled modules are cached (a cache, not state: it can be
    /// lost at any time); `<state_dir>/module-cache` when unset.
    pub module_cache_dir: Option<PathBuf>,
}

/// Why an executor could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the internal token is empty; set TENSOR_WASM_INTERNAL_TOKEN")]
    NoToken,
    #[error(
        "TENSOR_WASM_SNAPSHOT_KEY has {0} bytes; a snapshot key needs at least {min} \
         (make one with `openssl rand -hex 32`)",
        min = tensor_wasm_shared::snapshot::MIN_KEY_BYTES
    )]
    WeakKey(usize),
    #[error("cannot use the state directory {0}: {1}")]
    StateDir(PathBuf, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("device: {0}")]
    Device(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
}

fn cpu_description(backend: &CpuBackend) -> DeviceDescription {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    DeviceDescription {
        kind: "cpu".into(),
        name: backend.device_name(),
        uuid: None,
        mig_profile: None,
        memory_total: total,
        memory_used: 0,
    }
}

/// What the CUDA device is: CUDA's UUID and memory, with NVML's name, UUID
/// and MIG profile when discovery knows the device (matched by UUID, never
/// by index: see `tensor_wasm_kernels::discovery`).
#[cfg(feature = "cuda")]
fn cuda_description(base: &tensor_wasm_kernels::cuda::CudaBackend) -> DeviceDescription {
    let uuid = base
        .uuid()
        .map_err(|e| tracing::warn!(error = %e, "cannot read the CUDA device's UUID"))
        .ok();
    let nvml = uuid.as_deref().and_then(|u| {
        tensor_wasm_kernels::discovery::discover_system()
            .into_iter()
            .find(|d| d.has_cuda_uuid(u))
    });
    let memory_total = base
        .memory_total()
        .map_err(|e| tracing::warn!(error = %e, "cannot read the CUDA device's memory"))
        .unwrap_or(0);
    DeviceDescription {
        kind: "cuda".into(),
        name: nvml
            .as_ref()
            .map_or_else(|| base.device_name(), |d| d.name.clone()),
        uuid: nvml.as_ref().map(|d| d.uuid.clone()).or(uuid),
        mig_profile: nvml.and_then(|d| d.mig_profile),
        memory_total,
        memory_used: 0,
    }
}

/// The backend factory and device description for `choice`.
pub fn open_device(
    choice: DeviceChoice,
    limits: Limits,
) -> Result<(BackendFactory, DeviceDescription, &'static str), ServeError> {
    #[cfg(feature = "cuda")]
    {
        use tensor_wasm_kernels::cuda::CudaBackend;
        let ordinal = match choice {
            DeviceChoice::Cuda(n) => Some(n),
            DeviceChoice::Auto => Some(0),
            DeviceChoice::Cpu => None,
        };
        if let Some(n) = ordinal {
            match CudaBackend::new(n, limits) {
                Ok(base) => {
                    let description = cuda_description(&base);
                    let base = Arc::new(base);
                    let factory: BackendFactory = Arc::new(move || {
                        base.new_stream_backend()
                            .map(|b| Arc::new(b) as Arc<dyn Backend>)
                            .map_err(|e| e.to_string())
                    });
                    return Ok((factory, description, "cuda"));
                }
                Err(e) if choice == DeviceChoice::Auto => {
                    tracing::info!(error = %e, "no usable CUDA device; running tensor ops on the CPU");
                }
                Err(e) => return Err(ServeError::Device(e.to_string())),
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    if let DeviceChoice::Cuda(_) = choice {
        return Err(ServeError::Device(
            "this binary was built without the `cuda` feature".into(),
        ));
    }
    let cpu = Arc::new(CpuBackend::new(limits));
    let description = cpu_description(&cpu);
    let factory: BackendFactory = Arc::new(move || Ok(cpu.clone() as Arc<dyn Backend>));
    Ok((factory, description, "cpu"))
}

/// A bound, ready executor.
#[derive(Debug)]
pub struct Executor {
    pub app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown_budget: Duration,
}

/// How long a graceful stop may take, from the signal to the process's
/// exit: 25 s, under `tensor-wasm up`'s 30 s, the systemd units' 120 s and
/// the pods' 60 s (`docs/CONFIG.md`).
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(25);

/// The share of the shutdown budget requests in flight get to finish;
/// the rest is the warm-state save's.
const DRAIN_SHARE: f64 = 0.4;

impl Executor {
    /// Opens the device, reloads persisted functions and binds the listener.
    pub async fn start(cfg: ExecutorConfig, features: &str) -> Result<Executor, ServeError> {
        if cfg.internal_token.is_empty() {
            return Err(ServeError::NoToken);
        }
        if let Some(key) = &cfg.snapshot_key
            && !key.is_empty()
            && key.len() < tensor_wasm_shared::snapshot::MIN_KEY_BYTES
        {
            return Err(ServeError::WeakKey(key.len()));
        }
        tensor_wasm_shared::files::private_dir(&cfg.state_dir)
            .map_err(|e| ServeError::StateDir(cfg.state_dir.clone(), e))?;
        let fences = crate::fence::Fences::open(&cfg.state_dir)
            .map_err(|e| ServeError::StateDir(cfg.state_dir.clone(), e))?;
        let (backends, device, backend_kind) = open_device(cfg.device, cfg.limits.tensor)?;
        let build = tensor_wasm_shared::build::labels("executor", features);
        let metrics = Arc::new(Metrics::new(backend_kind, &build));
        let runtime = Runtime::new(
            cfg.limits.clone(),
            Some(
                &cfg.module_cache_dir
                    .clone()
                    .unwrap_or_else(|| cfg.state_dir.join("module-cache")),
            ),
        )?;
        let registry = Arc::new(
            Registry::new(
                runtime,
                backends,
                cfg.state_dir.clone(),
                cfg.quotas.clone(),
                metrics.clone(),
            )
            .with_snapshot_key(cfg.snapshot_key.clone())
            .with_page_tracking(cfg.page_tracking),
        );
        let warm_files = registry.load_warm_state().await;
        let warm = warm_files.len();
        let reg = registry.clone();
        let loaded = tokio::task::spawn_blocking(move || reg.load_persisted())
            .await
            .unwrap_or(0);
        // Before the listener: `/healthz` answers only once every tenant
        // is back as of its last checkpoint, and the warm state loaded is
        // in the tenants' journals before its files go.
        let resumed = registry.recover_journals().await;
        registry.journal_warm().await;
        for file in warm_files {
            let _ = std::fs::remove_file(file);
        }
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| ServeError::Bind(cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServeError::Bind(cfg.listen, e))?;
        tracing::info!(id = %cfg.id, %addr, device = %device.name, functions = loaded, warm_tenants = warm, resumed_tenants = resumed, "executor ready");
        Ok(Executor {
            shutdown_budget: SHUTDOWN_BUDGET,
            app: Arc::new(App {
                registry,
                metrics,
                forwarder: crate::peer::Forwarder::new(&cfg.internal_token),
                internal_token: cfg.internal_token,
                id: cfg.id,
                addr: addr.to_string(),
                version: tensor_wasm_shared::build::VERSION.to_string(),
                device,
                fences,
            }),
            listener,
        })
    }

    /// Bounds a graceful stop ([`SHUTDOWN_BUDGET`] unless set).
    pub fn with_shutdown_budget(mut self, budget: Duration) -> Executor {
        self.shutdown_budget = budget;
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests
    /// finish and writes every tenant's warm state, within the shutdown
    /// budget: requests get [`DRAIN_SHARE`] of it (those still running
    /// then are cut off), the save the rest, tenants in parallel.
    /// Meanwhile prunes finished jobs past their retention.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let registry = self.app.registry.clone();
        let registry_for_shutdown = registry.clone();
        let checkpoints = registry.clone();
        let janitor = tokio::spawn(async move {
            let mut tick = tokio::time::interval(JANITOR_PERIOD);
            loop {
                tick.tick().await;
                registry.prune_jobs();
            }
        });
        let checkpointer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                checkpoints.checkpoint_pass(false).await;
            }
        });
        let (signalled_tx, mut signalled) = tokio::sync::watch::channel(None);
        let shutdown = async move {
            shutdown.await;
            let _ = signalled_tx.send(Some(tokio::time::Instant::now()));
        };
        let budget = self.shutdown_budget;
        let drain = budget.mul_f64(DRAIN_SHARE);
        // Without TCP_NODELAY a stream's small chunk waits for the peer's
        // delayed ACK of the one before (up to 40 ms on Linux).
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let serving = axum::serve(listener, http::router(self.app))
            .with_graceful_shutdown(shutdown)
            .into_future();
        let drained = async {
            let _ = signalled.wait_for(Option::is_some).await;
            tokio::time::sleep(drain).await;
        };
        let served = tokio::select! {
            served = serving => served.map_err(ServeError::Serve),
            () = drained => {
                tracing::warn!(?drain, "requests still in flight when the drain ended: cut off");
                Ok(())
            }
        };
        janitor.abort();
        checkpointer.abort();
        let since = (*signalled.borrow()).unwrap_or_else(tokio::time::Instant::now);
        // The last checkpoints: what ran since each instance's last frame.
        let left = budget.saturating_sub(since.elapsed());
        if tokio::time::timeout(left, registry_for_shutdown.checkpoint_pass(true))
            .await
            .is_err()
        {
            tracing::error!("the last checkpoints did not finish within the shutdown budget");
        }
        let left = budget.saturating_sub(since.elapsed());
        let saved = registry_for_shutdown.save_warm_state(left).await;
        tracing::info!(tenants = saved, "warm state written");
        served
    }
}
