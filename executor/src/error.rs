//! The executor's errors and, in one place, their public `code`.
//!
//! Each variant says who failed; where a lower layer's error is the cause
//! it travels as the `#[source]`, and [`ExecError::code`] is the one place
//! that decides which public code (and so which HTTP status) it answers.

use tensor_wasm_kernels::KernelError;
use tensor_wasm_shared::api::TensorCodecError;
use tensor_wasm_shared::snapshot::SnapshotError;
use tensor_wasm_shared::{AbiError, ApiError, ErrorCode};

use crate::assets::AssetError;
use crate::engine::CompileError;
use crate::instance::InvokeError;
use crate::memory::HostMemoryError;
use crate::wasm::WasmError;

/// Everything the executor's API can answer with besides success.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    InvalidJson(String),
    #[error("missing or invalid internal token")]
    Unauthorized,
    #[error("function {0} not found")]
    FunctionNotFound(String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("this route does not take {0}")]
    MethodNotAllowed(String),
    #[error("job {0} is running and cannot be cancelled")]
    JobRunning(String),
    #[error("a function named {0:?} exists; use ?replace=true to replace it")]
    FunctionExists(String),
    #[error("tenant {0} is frozen for migration")]
    TenantFrozen(String),
    #[error("routed by a stale placement: {0}")]
    PlacementStale(String),
    #[error("tenant {0} already exists here")]
    TenantExists(String),
    #[error("tenant {0} is not on this executor")]
    TenantNotHere(String),
    #[error("{0} is not here")]
    MoveNotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error(transparent)]
    Wasm(#[from] WasmError),
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    Capacity(String),
    #[error(transparent)]
    Invoke(#[from] InvokeError),
    /// A streamed invocation sent no chunk for its idle-chunk timeout.
    #[error("the stream sent nothing for {} (its idle-chunk timeout)", humantime::format_duration(*.0))]
    StreamIdle(std::time::Duration),
    /// A kernel refused or failed an op outside a guest call (decoding
    /// inputs, encoding outputs, restoring tensors).
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Codec(#[from] TensorCodecError),
    #[error("snapshot refused: {0}")]
    Snapshot(#[source] SnapshotError),
    #[error("cannot persist the function: {0}")]
    Persist(#[source] std::io::Error),
    /// A blocking task panicked or was cancelled.
    #[error("{task} task failed: {source}")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// A `strict` invocation ran, but its checkpoint could not be made
    /// durable (a full or failing disk): its effects may or may not
    /// survive a crash.
    #[error("the invocation ran but its checkpoint failed: {0}")]
    Checkpoint(String),
    #[error("{0}")]
    Internal(String),
}

impl From<CompileError> for ExecError {
    fn from(e: CompileError) -> Self {
        match e {
            CompileError::Timeout(_) => ExecError::Wasm(WasmError::Invalid(e.to_string())),
            CompileError::Rejected(m) => ExecError::Wasm(WasmError::Invalid(m)),
            CompileError::Busy(_) => ExecError::Capacity(e.to_string()),
        }
    }
}

impl ExecError {
    /// The public code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ExecError::InvalidInput(_) => ErrorCode::InvalidInput,
            ExecError::InvalidJson(_) => ErrorCode::InvalidJson,
            ExecError::Unauthorized => ErrorCode::Unauthorized,
            ExecError::FunctionNotFound(_) => ErrorCode::FunctionNotFound,
            ExecError::JobNotFound(_) => ErrorCode::JobNotFound,
            ExecError::NotFound(_) => ErrorCode::NotFound,
            ExecError::MethodNotAllowed(_) => ErrorCode::MethodNotAllowed,
            ExecError::JobRunning(_) => ErrorCode::JobRunning,
            ExecError::FunctionExists(_) => ErrorCode::FunctionExists,
            ExecError::TenantFrozen(_) => ErrorCode::TenantFrozen,
            ExecError::PlacementStale(_) => ErrorCode::PlacementStale,
            ExecError::TenantExists(_) => ErrorCode::TenantExists,
            ExecError::TenantNotHere(_) => ErrorCode::TenantNotHere,
            ExecError::MoveNotFound(_) => ErrorCode::MoveNotFound,
            ExecError::PayloadTooLarge(_) => ErrorCode::PayloadTooLarge,
            ExecError::UnsupportedMediaType(_) => ErrorCode::UnsupportedMediaType,
            ExecError::Wasm(WasmError::Invalid(_)) => ErrorCode::InvalidWasm,
            ExecError::Wasm(WasmError::ImportNotAllowed { .. }) => ErrorCode::ImportNotAllowed,
            ExecError::Wasm(WasmError::MissingExport(_)) => ErrorCode::MissingExport,
            ExecError::Quota(_) => ErrorCode::QuotaExceeded,
            ExecError::Capacity(_) => ErrorCode::CapacityExhausted,
            ExecError::Invoke(e) => match e {
                InvokeError::Trap(_) | InvokeError::Instantiate(_) => ErrorCode::GuestTrap,
                InvokeError::Memory(HostMemoryError::Tenant { .. }) => ErrorCode::QuotaExceeded,
                InvokeError::Memory(HostMemoryError::Executor { .. }) => {
                    ErrorCode::CapacityExhausted
                }
                InvokeError::Deadline(_) => ErrorCode::DeadlineExceeded,
                InvokeError::Function { .. } => ErrorCode::FunctionError,
                InvokeError::Device(_) => ErrorCode::Internal,
            },
            ExecError::StreamIdle(_) => ErrorCode::DeadlineExceeded,
            ExecError::Kernel(e) => match e.abi() {
                AbiError::QuotaExceeded => ErrorCode::QuotaExceeded,
                AbiError::DeviceError => ErrorCode::Internal,
                _ => ErrorCode::InvalidInput,
            },
            ExecError::Asset(AssetError::Quota(_)) => ErrorCode::QuotaExceeded,
            ExecError::Asset(AssetError::TooLarge { .. }) => ErrorCode::PayloadTooLarge,
            ExecError::Asset(AssetError::Io(_)) => ErrorCode::Internal,
            ExecError::Asset(_) | ExecError::Codec(_) | ExecError::Snapshot(_) => {
                ErrorCode::InvalidInput
            }
            ExecError::Checkpoint(_) => ErrorCode::CheckpointFailed,
            ExecError::Persist(_) | ExecError::Task { .. } | ExecError::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// The public error.
    pub fn to_api(&self) -> ApiError {
        ApiError::new(self.code(), self.to_string())
    }

    /// The failure of a blocking task, `task` naming what it did.
    pub fn task(task: &'static str) -> impl FnOnce(tokio::task::JoinError) -> ExecError {
        move |source| ExecError::Task { task, source }
    }
}
