//! Limits of the executor: what one module, instance, invocation and tenant
//! may cost. Every field carries its unit and the reason for its default.

use std::time::Duration;

use tensor_wasm_kernels::Limits;
use tensor_wasm_shared::TenantId;

/// Operator limits of the wasm engine and its guests.
#[derive(Clone, Debug)]
pub struct EngineLimits {
    /// Largest module accepted, in bytes; 32 MiB covers real guests with
    /// embedded tables and keeps compile time bounded.
    pub max_module_bytes: usize,
    /// Longest compilation; 30 s, after which registration fails with
    /// `invalid_wasm` (a module that takes longer is hostile or broken).
    pub compile_timeout: Duration,
    /// Deadline of one invocation unless the function sets its own; 10 s
    /// keeps a stuck guest from holding a warm instance.
    pub default_deadline: Duration,
    /// Largest deadline a function may ask for; 5 min.
    pub max_deadline: Duration,
    /// Linear memory cap of an instance unless the function sets its own;
    /// 256 MiB.
    pub default_memory_limit: u64,
    /// Largest memory cap a function may ask for; 4 GiB, the whole 32-bit
    /// space (the pooling allocator reserves this much address space per
    /// slot, not memory).
    pub max_memory_limit: u64,
    /// Warm instances per function unless it asks for more: 1.
    pub default_max_instances: u32,
    /// Most warm instances a function may ask for: 16.
    pub max_instances_per_function: u32,
    /// Instances the engine can hold at once across all tenants (pooling
    /// allocator slots): 256.
    pub total_instances: u32,
    /// Most table elements in an instance: 100 000, which real toolchains'
    /// indirect-call tables stay far below.
    pub max_table_elements: usize,
    /// Invocations that may wait for a busy function's instances before
    /// further ones get `capacity_exhausted`: 64.
    pub max_queued_per_function: usize,
    /// Bytes of guest stdout+stderr kept per function; 64 KiB.
    pub log_capacity: usize,
    /// Largest raw response body a guest may write with `output_write`;
    /// 64 MiB.
    pub max_output_bytes: usize,
    /// Largest chunk of a streamed answer (`stream_write`, `stream_tensor`);
    /// 1 MiB: a stream holds at most a few chunks waiting for its client.
    pub max_stream_chunk_bytes: usize,
    /// How long a streamed invocation may go without sending a chunk
    /// before it ends with `deadline_exceeded`; 30 s
    /// (`--stream-idle-timeout`).
    pub stream_idle_timeout: Duration,
    /// Longest `set_error` / `last_error` message kept, in bytes; 4 KiB.
    pub max_error_message: usize,
    /// Async jobs running at once across all tenants: 16 (each also waits
    /// for an instance of its function).
    pub job_concurrency: usize,
    /// How long a finished job stays answerable: 1 h.
    pub job_retention: Duration,
    /// Interval of a `periodic` function's checkpoints when it sets none:
    /// 1 s (`--checkpoint-ms`).
    pub default_checkpoint: Duration,
    /// Finished jobs kept per tenant before the oldest go early: 10 000.
    pub max_finished_jobs: usize,
    /// Caps on tensors and ops, passed to the kernel backend.
    pub tensor: Limits,
    /// Host memory all tenants together may hold (linear memory, and
    /// tensors on the CPU backend), in bytes; by default three quarters of
    /// the process's memory limit (`memory::default_budget`).
    pub host_memory_bytes: u64,
    /// Bytes of compiled modules kept on disk; past it the least recently
    /// used go: 2 GiB (`--module-cache-bytes`).
    pub module_cache_bytes: u64,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            max_module_bytes: 32 << 20,
            compile_timeout: Duration::from_secs(30),
            default_deadline: Duration::from_secs(10),
            max_deadline: Duration::from_secs(300),
            default_memory_limit: 256 << 20,
            max_memory_limit: 4 << 30,
            default_max_instances: 1,
            max_instances_per_function: 16,
            total_instances: 256,
            max_table_elements: 100_000,
            max_queued_per_function: 64,
            log_capacity: 64 << 10,
            max_output_bytes: 64 << 20,
            max_stream_chunk_bytes: 1 << 20,
            stream_idle_timeout: Duration::from_secs(30),
            max_error_message: 4 << 10,
            job_concurrency: 16,
            job_retention: Duration::from_secs(3600),
            default_checkpoint: Duration::from_secs(1),
            max_finished_jobs: 10_000,
            tensor: Limits::default(),
            host_memory_bytes: crate::memory::default_budget(1),
            module_cache_bytes: 2 << 30,
        }
    }
}

/// Per-tenant quotas.
#[derive(Clone, Debug)]
pub struct TenantQuotas {
    /// Device memory held by a tenant's live tensors and assets; 2 GiB.
    pub device_memory_bytes: u64,
    /// Live tensors across a tenant's instances (assets excluded); 65 536.
    pub live_tensors: u64,
    /// Registered functions; 64.
    pub functions: usize,
    /// Warm instances across a tenant's functions; 64.
    pub instances: usize,
    /// Largest request body; 64 MiB. Registration is bounded by the module
    /// and assets caps instead.
    pub max_body_bytes: usize,
    /// Host memory a tenant may hold (its instances' linear memory, and its
    /// tensors and assets on the CPU backend); 4 GiB: 1 GiB of weights,
    /// instances of 600 MiB of memory and 2 GiB of tensors fit.
    pub host_memory_bytes: u64,
    /// Largest assets file one registration may send, in bytes; `None`
    /// for the tenant's device-memory quota (a larger file could never
    /// load).
    pub max_asset_bytes: Option<u64>,
    /// Async jobs waiting or running; 256.
    pub pending_jobs: usize,
    /// Async jobs running at once; 4, a quarter of the executor's default
    /// 16 job slots: one tenant's slow jobs leave the rest to others.
    pub running_jobs: usize,
    /// Invocations and jobs running guest code at once, across the
    /// tenant's functions; 16 (`tensor-wasm executor` sets it to the
    /// machine's cores). Others wait, at most their function's deadline.
    pub running_invocations: usize,
    /// Request bodies the waiting jobs may hold, in bytes; 1 GiB (16 bodies
    /// of the largest size).
    pub pending_job_bytes: u64,
    /// Results of finished jobs kept, in bytes of JSON; 256 MiB. Past it,
    /// the oldest finished jobs are forgotten early; the newest is always
    /// kept until its retention ends.
    pub finished_job_bytes: u64,
    /// The operator's weights of tenants' shares of the cores (1 for a
    /// tenant not named): a tenant over its share runs in the background
    /// (`state::cpu`).
    pub cpu_weights: Vec<(TenantId, u32)>,
}

impl TenantQuotas {
    /// The assets cap in force: the operator's, else the device quota.
    pub fn asset_cap(&self) -> u64 {
        self.max_asset_bytes.unwrap_or(self.device_memory_bytes)
    }
}

impl Default for TenantQuotas {
    fn default() -> Self {
        TenantQuotas {
            device_memory_bytes: 2 << 30,
            live_tensors: 65_536,
            functions: 64,
            instances: 64,
            max_body_bytes: 64 << 20,
            max_asset_bytes: None,
            host_memory_bytes: 4 << 30,
            pending_jobs: 256,
            running_jobs: 4,
            running_invocations: 16,
            pending_job_bytes: 1 << 30,
            finished_job_bytes: 256 << 20,
            cpu_weights: Vec::new(),
        }
    }
}
