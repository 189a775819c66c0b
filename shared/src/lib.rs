//! Contracts shared by every TensorWasm component.
//!
//! This crate holds the vocabulary that the proxy, the executors, the CLI and
//! outside clients agree on (`docs/`): tensor dtypes and their wire codes,
//! the guest ABI's error codes, the public API's error codes and their HTTP
//! statuses, tenant ids, and the names of metrics and configuration
//! variables. It has no runtime: no tokio, wasmtime or pingora, so every
//! other crate can depend on it.
//!
//! Layout:
//! - [`dtype`]: [`DType`], the element types a tensor may hold.
//! - [`abi`]: [`AbiError`], the negative codes a guest ABI call returns.
//! - [`audit`]: [`audit::AuditRecord`], one line of the proxy's audit log.
//! - [`api`]: bodies of the HTTP API: JSON tensors, function records, invoke
//!   bodies, executor descriptions.
//! - [`error`]: [`ErrorCode`], the stable `code` of every public error.
//! - [`tenant`]: [`TenantId`], validated tenant names.
//! - [`ids`]: [`ExecutorId`], [`FunctionId`], [`JobId`], validated likewise.
//! - [`names`]: metric and configuration names.
//! - [`headers`]: the proxy↔executor headers and the request-id rule.
//! - [`build`]: what this binary is (version, commit, compiler).
//! - [`files`]: state directories only their user can read.
//! - [`identity`]: an executor's proof that it holds the internal token.
//! - [`snapshot`]: the tenant snapshot format and its validating reader.

#![forbid(unsafe_code)]

pub mod abi;
pub mod api;
pub mod audit;
pub mod build;
pub mod dtype;
pub mod error;
pub mod files;
pub mod headers;
pub mod identity;
pub mod ids;
pub mod names;
pub mod snapshot;
pub mod tenant;

pub use abi::AbiError;
pub use dtype::DType;
pub use error::{ApiError, ErrorCode};
pub use ids::{ExecutorId, FunctionId, JobId};
pub use tenant::TenantId;
