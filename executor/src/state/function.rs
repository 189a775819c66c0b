//! A registered function: its code, its resolved config and its pool.

use std::sync::Arc;
use std::time::Duration;

use tensor_wasm_shared::api::{Durability, FunctionConfig, FunctionInfo};
use wasmtime::InstancePre;

use crate::assets::{Assets, StagedAsset};
use crate::config::EngineLimits;
use crate::host::HostState;
use crate::instance::InstanceSetup;
use crate::logs::FunctionLog;
use crate::state::Pool;

/// What registration is asked to do.
#[derive(Debug)]
pub struct Registration {
    pub name: String,
    pub wasm: Vec<u8>,
    pub assets: Option<AssetSource>,
    pub config: FunctionConfig,
    pub replace: bool,
}

/// Where a registration's assets file is.
#[derive(Debug)]
pub enum AssetSource {
    /// Just received (an upload, a snapshot): validated before anything is
    /// registered, then committed to the tenant's assets store.
    Staged(StagedAsset),
    /// In the tenant's assets store already, by SHA-256 (a function coming
    /// back from the state directory).
    Stored(String),
}

/// A function's config with the operator's defaults and caps applied: what
/// the function runs under, with nothing left to default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedConfig {
    /// Deadline of one invocation.
    pub deadline: Duration,
    /// Linear memory cap of one instance, in bytes.
    pub memory_limit_bytes: u64,
    /// Most warm instances (the pool's slots).
    pub max_instances: u32,
    /// What a crash may lose of its warm state.
    pub durability: Durability,
    /// Interval of its checkpoints when `periodic`.
    pub checkpoint: Duration,
}

/// Shortest checkpoint interval a function may ask for: 100 ms.
pub const MIN_CHECKPOINT: Duration = Duration::from_millis(100);

/// Longest checkpoint interval a function may ask for: 1 h.
pub const MAX_CHECKPOINT: Duration = Duration::from_secs(3600);

impl ResolvedConfig {
    /// `c` with `limits`' defaults for what it leaves out, each value
    /// clamped to the operator's caps.
    pub fn resolve(c: &FunctionConfig, limits: &EngineLimits) -> ResolvedConfig {
        let max_deadline_ms = limits.max_deadline.as_millis().min(u64::MAX as u128) as u64;
        let deadline_ms = c
            .deadline_ms
            .unwrap_or(limits.default_deadline.as_millis() as u64)
            .clamp(1, max_deadline_ms.max(1));
        ResolvedConfig {
            deadline: Duration::from_millis(deadline_ms),
            memory_limit_bytes: c
                .memory_limit_bytes
                .unwrap_or(limits.default_memory_limit)
                .min(limits.max_memory_limit),
            max_instances: c
                .max_instances
                .unwrap_or(limits.default_max_instances)
                .clamp(1, limits.max_instances_per_function.max(1)),
            durability: c.durability.unwrap_or_default(),
            checkpoint: c
                .checkpoint_ms
                .map_or(limits.default_checkpoint, Duration::from_millis)
                .clamp(MIN_CHECKPOINT, MAX_CHECKPOINT),
        }
    }

    /// The public form, every field filled in but the durability's, which
    /// appear when they are not the defaults: a function record an older
    /// executor (which knows no durability) can still read, so that a
    /// tenant can move back to it.
    pub fn to_config(self, limits: &EngineLimits) -> FunctionConfig {
        let periodic = self.durability == Durability::Periodic;
        FunctionConfig {
            deadline_ms: Some(self.deadline.as_millis() as u64),
            memory_limit_bytes: Some(self.memory_limit_bytes),
            max_instances: Some(self.max_instances),
            durability: (!periodic).then_some(self.durability),
            checkpoint_ms: (periodic && self.checkpoint != limits.default_checkpoint)
                .then_some(self.checkpoint.as_millis() as u64),
        }
    }
}

/// A registered function.
pub struct Function {
    pub info: FunctionInfo,
    pub config: ResolvedConfig,
    pub(crate) wasm: Arc<[u8]>,
    /// The module cache's entry of its compiled module, if there is a
    /// cache: it goes when no function uses it any more.
    pub(crate) cache_entry: Option<String>,
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) setup: InstanceSetup,
    /// Indices of the module's mutable globals, exported by the rewrite.
    pub(crate) mutable_globals: Vec<u32>,
    /// Its assets, shared with the tenant's other functions that carry the
    /// same file; their device memory goes back when the last one goes.
    pub(crate) assets: Assets,
    pub(crate) pool: Pool,
    pub log: FunctionLog,
}

impl Function {
    /// Deadline of one invocation.
    pub fn deadline(&self) -> Duration {
        self.config.deadline
    }
}

impl std::fmt::Debug for Function {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Function")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}
