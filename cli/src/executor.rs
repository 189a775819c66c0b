//! `tensor-wasm executor`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};
use tensor_wasm_executor::server::{DeviceChoice, Executor, ExecutorConfig};
use tensor_wasm_executor::tracking::TrackingChoice;
use tensor_wasm_shared::TenantId;
use tensor_wasm_shared::names::env;

/// Flags of `tensor-wasm executor`; each has an environment fallback.
/// `--page-tracking`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum PageTrackingArg {
    Auto,
    Hashing,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Stable executor name: gpu0, mig-<uuid8>, cpu0, or a pod name.
    #[arg(long, env = env::EXECUTOR_ID, default_value = "cpu0")]
    id: String,
    /// Address to listen on; keep it private (loopback or a pod network).
    #[arg(
        long,
        env = env::EXECUTOR_LISTEN,
        default_value = "127.0.0.1:7070"
    )]
    listen: SocketAddr,
    /// Where functions, the module cache and warm state are kept.
    #[arg(
        long,
        env = env::STATE_DIR,
        default_value = "./tensor-wasm-state/executor"
    )]
    state_dir: PathBuf,
    /// Token the proxy presents on every route but /healthz and /metrics.
    #[arg(long, env = env::INTERNAL_TOKEN, hide_env_values = true)]
    internal_token: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = env::DEVICE, default_value = "auto")]
    device: DeviceChoice,
    /// Default deadline of one invocation, in milliseconds.
    #[arg(
        long,
        env = env::DEFAULT_DEADLINE_MS,
        default_value_t = 10_000
    )]
    default_deadline_ms: u64,
    /// Default linear-memory cap of an instance, in bytes.
    #[arg(long, env = env::DEFAULT_MEMORY_LIMIT_BYTES, default_value_t = 256 << 20)]
    default_memory_limit_bytes: u64,
    /// Largest module accepted, in bytes.
    #[arg(long, env = env::MAX_MODULE_BYTES, default_value_t = 32 << 20)]
    max_module_bytes: usize,
    /// Instance slots of the engine across all tenants.
    #[arg(long, env = env::TOTAL_INSTANCES, default_value_t = 256)]
    total_instances: u32,
    /// Device memory a tenant's tensors and assets may hold, in bytes.
    #[arg(long, env = env::TENANT_DEVICE_MEMORY_BYTES, default_value_t = 2 << 30)]
    tenant_device_memory_bytes: u64,
    /// Host memory a tenant may hold, in bytes: its instances' linear
    /// memory, and its tensors and assets on the CPU backend.
    #[arg(long, env = env::TENANT_HOST_MEMORY_BYTES, default_value_t = 4 << 30)]
    tenant_host_memory_bytes: u64,
    /// Host memory all tenants together may hold, in bytes [default:
    /// three quarters of this process's memory limit: its cgroup's, else
    /// the machine's].
    #[arg(long, env = env::HOST_MEMORY_BYTES)]
    host_memory_bytes: Option<u64>,
    /// Live tensors a tenant may hold.
    #[arg(
        long,
        env = env::TENANT_LIVE_TENSORS,
        default_value_t = 65_536
    )]
    tenant_live_tensors: u64,
    /// Functions a tenant may register.
    #[arg(long, env = env::TENANT_FUNCTIONS, default_value_t = 64)]
    tenant_functions: usize,
    /// Warm instances a tenant may hold.
    #[arg(long, env = env::TENANT_INSTANCES, default_value_t = 64)]
    tenant_instances: usize,
    /// Key that signs exported snapshots and migration rounds; when set,
    /// imported snapshots and rounds must be signed with it.
    #[arg(long, env = env::SNAPSHOT_KEY, hide_env_values = true)]
    snapshot_key: Option<String>,
    /// How a live migration finds the pages a tenant wrote between rounds:
    /// `auto` (userfaultfd write-protection where the kernel offers it,
    /// else hashing) or `hashing`.
    #[arg(long, env = env::PAGE_TRACKING, value_enum, default_value_t = PageTrackingArg::Auto)]
    page_tracking: PageTrackingArg,
    /// Largest invoke body, in bytes.
    #[arg(long, env = env::MAX_BODY_BYTES, default_value_t = 64 << 20)]
    max_body_bytes: usize,
    /// Largest assets file one registration may send, in bytes [default:
    /// the tenant device-memory quota].
    #[arg(long, env = env::MAX_ASSET_BYTES)]
    max_asset_bytes: Option<u64>,
    /// Async jobs a tenant may have waiting or running.
    #[arg(long, env = env::TENANT_PENDING_JOBS, default_value_t = 256)]
    tenant_pending_jobs: usize,
    /// Async jobs a tenant may run at once (of `--job-concurrency`).
    #[arg(long, env = env::TENANT_RUNNING_JOBS, default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    tenant_running_jobs: u32,
    /// Invocations and jobs a tenant may run at once, across its functions
    /// [default: the machine's cores]: one tenant's busy instances cannot
    /// take more than the cores, leaving others their share.
    #[arg(long, env = env::TENANT_RUNNING_INVOCATIONS,
          value_parser = clap::value_parser!(u32).range(1..))]
    tenant_running_invocations: Option<u32>,
    /// Weights of tenants' shares of the cores, `tenant=weight`, comma
    /// separated or repeated (1 for a tenant not named): a tenant over its
    /// share runs in the background.
    #[arg(long, env = env::TENANT_CPU_WEIGHTS, value_delimiter = ',')]
    tenant_cpu_weight: Vec<String>,
    /// Async jobs the executor runs at once, all tenants together.
    #[arg(long, env = env::JOB_CONCURRENCY, default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..))]
    job_concurrency: u32,
    /// Bytes of request bodies a tenant's waiting jobs may hold.
    #[arg(
        long,
        env = env::TENANT_PENDING_JOB_BYTES,
        default_value_t = 1 << 30
    )]
    tenant_pending_job_bytes: u64,
    /// Bytes of finished jobs' results (as JSON) kept per tenant; past it
    /// the oldest go before their retention ends.
    #[arg(
        long,
        env = env::TENANT_FINISHED_JOB_BYTES,
        default_value_t = 256 << 20
    )]
    tenant_finished_job_bytes: u64,
    /// How long finished jobs stay answerable, in seconds.
    #[arg(long, env = env::JOB_RETENTION_SECS, default_value_t = 3600)]
    job_retention_secs: u64,
    /// How long a graceful stop (SIGTERM) may take: 40 % of it for the
    /// requests in flight, the rest for saving every tenant's warm state.
    /// Keep it under the supervisor's stop timeout.
    #[arg(
        long,
        env = env::SHUTDOWN_BUDGET_SECS,
        default_value_t = tensor_wasm_executor::server::SHUTDOWN_BUDGET.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    shutdown_budget_secs: u64,
    /// Interval of a `periodic` function's checkpoints when it sets no
    /// `checkpoint_ms`, in milliseconds: a crash loses at most this much
    /// of its work.
    #[arg(
        long,
        env = env::CHECKPOINT_MS,
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(100..=3_600_000)
    )]
    checkpoint_ms: u64,
    /// How long a streamed invocation may go without sending a chunk, in
    /// milliseconds; past it the stream ends with `deadline_exceeded` and
    /// the guest is cancelled. The invocation's deadline bounds the whole
    /// stream besides.
    #[arg(
        long,
        env = env::STREAM_IDLE_TIMEOUT_MS,
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(10..=3_600_000)
    )]
    stream_idle_timeout_ms: u64,
    /// Where compiled modules are cached [default: STATE_DIR/module-cache].
    /// A cache, not state: put it on a volume apart from the state
    /// directory so that it cannot fill the tenants' state.
    #[arg(long, env = env::MODULE_CACHE_DIR)]
    module_cache_dir: Option<PathBuf>,
    /// Bytes of compiled modules kept in the cache; past it the least
    /// recently used go.
    #[arg(long, env = env::MODULE_CACHE_BYTES, default_value_t = 2 << 30)]
    module_cache_bytes: u64,
}

pub fn run(args: Args, features: &str) -> anyhow::Result<()> {
    let limits = EngineLimits {
        default_deadline: Duration::from_millis(args.default_deadline_ms),
        default_memory_limit: args.default_memory_limit_bytes,
        max_module_bytes: args.max_module_bytes,
        total_instances: args.total_instances,
        job_concurrency: args.job_concurrency as usize,
        job_retention: Duration::from_secs(args.job_retention_secs),
        default_checkpoint: Duration::from_millis(args.checkpoint_ms),
        stream_idle_timeout: Duration::from_millis(args.stream_idle_timeout_ms),
        module_cache_bytes: args.module_cache_bytes,
        host_memory_bytes: args
            .host_memory_bytes
            .unwrap_or_else(|| tensor_wasm_executor::memory::default_budget(1)),
        ..EngineLimits::default()
    };
    let quotas = TenantQuotas {
        device_memory_bytes: args.tenant_device_memory_bytes,
        live_tensors: args.tenant_live_tensors,
        functions: args.tenant_functions,
        instances: args.tenant_instances,
        max_body_bytes: args.max_body_bytes,
        max_asset_bytes: args.max_asset_bytes,
        host_memory_bytes: args.tenant_host_memory_bytes,
        pending_jobs: args.tenant_pending_jobs,
        running_jobs: args.tenant_running_jobs as usize,
        running_invocations: args.tenant_running_invocations.map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |n| n as usize,
        ),
        pending_job_bytes: args.tenant_pending_job_bytes,
        finished_job_bytes: args.tenant_finished_job_bytes,
        cpu_weights: args
            .tenant_cpu_weight
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| parse_weight(s))
            .collect::<anyhow::Result<_>>()?,
    };
    let shutdown_budget = Duration::from_secs(args.shutdown_budget_secs);
    let cfg = ExecutorConfig {
        id: args.id,
        listen: args.listen,
        state_dir: args.state_dir,
        internal_token: args.internal_token,
        device: args.device,
        limits,
        quotas,
        snapshot_key: args.snapshot_key.map(String::into_bytes),
        module_cache_dir: args.module_cache_dir,
        page_tracking: match args.page_tracking {
            PageTrackingArg::Auto => TrackingChoice::Auto,
            PageTrackingArg::Hashing => TrackingChoice::Hashing,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let executor = Executor::start(cfg, features)
            .await?
            .with_shutdown_budget(shutdown_budget);
        executor.serve(shutdown_signal()).await?;
        tracing::info!("executor stopped");
        Ok(())
    });
    // An invocation cut off by the end of the drain still runs on a
    // blocking thread until its deadline: the process does not wait for it.
    runtime.shutdown_background();
    result
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down: finishing in-flight requests");
}

/// A `tenant=weight` entry of `--tenant-cpu-weight`.
fn parse_weight(s: &str) -> anyhow::Result<(TenantId, u32)> {
    let (tenant, weight) = s
        .split_once('=')
        .with_context(|| format!("cpu weight {s:?}: expected tenant=weight"))?;
    let tenant =
        TenantId::new(tenant.trim()).map_err(|e| anyhow::anyhow!("cpu weight {s:?}: {e}"))?;
    let weight: u32 = weight
        .trim()
        .parse()
        .ok()
        .filter(|w| (1..=1000).contains(w))
        .with_context(|| {
            format!("cpu weight {s:?}: the weight is a whole number from 1 to 1000")
        })?;
    Ok((tenant, weight))
}
