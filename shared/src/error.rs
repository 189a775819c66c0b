//! The public API's error codes and their HTTP statuses (`docs/API.md`,
//! "Status codes and error codes").
//!
//! Every error a client sees is JSON `{"error": {"code", "message"}}`. The
//! `code` is one of [`ErrorCode`]; its status is fixed here, in one place, so
//! that the proxy and the executors can never disagree about it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The stable `code` of a public error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidJson,
    InvalidInput,
    Unauthorized,
    TenantScopeDenied,
    FunctionNotFound,
    JobNotFound,
    NotFound,
    /// The route exists, but not with this method.
    MethodNotAllowed,
    JobRunning,
    FunctionExists,
    TenantFrozen,
    TenantExists,
    /// An internal route named a tenant this executor does not hold. Only
    /// between the proxy and executors; distinct from `not_found`, which an
    /// executor answers for a route it does not have.
    TenantNotHere,
    /// An internal route of a move named what this executor does not hold:
    /// a migration session, an inbound move, or an assets file of the
    /// tenant. Only between executors and the proxy; distinct from
    /// `not_found` for the same reason as `tenant_not_here`.
    MoveNotFound,
    /// A migration, snapshot or restore of the tenant is already running.
    MigrationRunning,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidWasm,
    ImportNotAllowed,
    MissingExport,
    QuotaExceeded,
    RateLimited,
    GuestTrap,
    FunctionError,
    Internal,
    ImportFailed,
    ExecutorUnavailable,
    CapacityExhausted,
    TenantMoving,
    DeadlineExceeded,
    CheckpointFailed,
    JobInterrupted,
    /// Admin: the executor id is registered at another address already; it
    /// is never re-addressed silently (forget it first).
    ExecutorExists,
    /// Admin: whoever answers at the address did not prove that it is a
    /// fleet executor with that id (`POST /internal/identity`), so the
    /// proxy sent it no credential and did not register it.
    ExecutorUnverified,
    /// The shared placement table (etcd) cannot be reached: tenants placed
    /// already are served, but no new tenant is placed and no tenant moves
    /// until it answers again.
    PlacementUnavailable,
    /// Only between the proxy and executors: the executor refused a
    /// request routed by a placement it has moved past (it exported or
    /// dropped the tenant, or saw a newer placement epoch). The proxy reads
    /// the placement again and sends the request where the tenant lives.
    PlacementStale,
}

impl ErrorCode {
    /// Every code, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 36] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidInput,
        ErrorCode::Unauthorized,
        ErrorCode::TenantScopeDenied,
        ErrorCode::FunctionNotFound,
        ErrorCode::JobNotFound,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::JobRunning,
        ErrorCode::FunctionExists,
        ErrorCode::TenantFrozen,
        ErrorCode::TenantExists,
        ErrorCode::TenantNotHere,
        ErrorCode::MoveNotFound,
        ErrorCode::MigrationRunning,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InvalidWasm,
        ErrorCode::ImportNotAllowed,
        ErrorCode::MissingExport,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::GuestTrap,
        ErrorCode::FunctionError,
        ErrorCode::Internal,
        ErrorCode::ImportFailed,
        ErrorCode::ExecutorUnavailable,
        ErrorCode::CapacityExhausted,
        ErrorCode::TenantMoving,
        ErrorCode::DeadlineExceeded,
        ErrorCode::CheckpointFailed,
        ErrorCode::JobInterrupted,
        ErrorCode::ExecutorExists,
        ErrorCode::ExecutorUnverified,
        ErrorCode::PlacementUnavailable,
        ErrorCode::PlacementStale,
    ];

    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            InvalidJson | InvalidInput => 400,
            Unauthorized => 401,
            TenantScopeDenied => 403,
            FunctionNotFound | JobNotFound | NotFound | TenantNotHere | MoveNotFound => 404,
            MethodNotAllowed => 405,
            FunctionExists | JobRunning | TenantFrozen | TenantExists | MigrationRunning
            | ExecutorExists => 409,
            PayloadTooLarge => 413,
            UnsupportedMediaType => 415,
            InvalidWasm | ImportNotAllowed | MissingExport | QuotaExceeded => 422,
            PlacementStale => 421,
            RateLimited => 429,
            GuestTrap | FunctionError | Internal | JobInterrupted => 500,
            ImportFailed | ExecutorUnverified => 502,
            ExecutorUnavailable | CapacityExhausted | TenantMoving | PlacementUnavailable => 503,
            DeadlineExceeded => 504,
            CheckpointFailed => 507,
        }
    }

    /// The wire form, e.g. `"function_not_found"`.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidJson => "invalid_json",
            InvalidInput => "invalid_input",
            Unauthorized => "unauthorized",
            TenantScopeDenied => "tenant_scope_denied",
            FunctionNotFound => "function_not_found",
            JobNotFound => "job_not_found",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            JobRunning => "job_running",
            FunctionExists => "function_exists",
            TenantFrozen => "tenant_frozen",
            TenantExists => "tenant_exists",
            TenantNotHere => "tenant_not_here",
            MoveNotFound => "move_not_found",
            MigrationRunning => "migration_running",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            InvalidWasm => "invalid_wasm",
            ImportNotAllowed => "import_not_allowed",
            MissingExport => "missing_export",
            QuotaExceeded => "quota_exceeded",
            RateLimited => "rate_limited",
            GuestTrap => "guest_trap",
            FunctionError => "function_error",
            Internal => "internal",
            ImportFailed => "import_failed",
            ExecutorUnavailable => "executor_unavailable",
            CapacityExhausted => "capacity_exhausted",
            TenantMoving => "tenant_moving",
            DeadlineExceeded => "deadline_exceeded",
            CheckpointFailed => "checkpoint_failed",
            JobInterrupted => "job_interrupted",
            ExecutorExists => "executor_exists",
            ExecutorUnverified => "executor_unverified",
            PlacementUnavailable => "placement_unavailable",
            PlacementStale => "placement_stale",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A public error: the body `{"error": {"code", "message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// The JSON envelope an error travels in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ApiError,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status of this error.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// This error wrapped in its JSON envelope.
    pub fn into_body(self) -> ErrorBody {
        ErrorBody { error: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).unwrap();
            assert_eq!(back, code);
        }
    }

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(ErrorCode::Unauthorized.http_status(), 401);
        assert_eq!(ErrorCode::TenantScopeDenied.http_status(), 403);
        assert_eq!(ErrorCode::FunctionNotFound.http_status(), 404);
        assert_eq!(ErrorCode::RateLimited.http_status(), 429);
        assert_eq!(ErrorCode::QuotaExceeded.http_status(), 422);
        assert_eq!(ErrorCode::TenantNotHere.http_status(), 404);
        assert_ne!(ErrorCode::TenantNotHere, ErrorCode::NotFound);
        assert_eq!(ErrorCode::TenantMoving.http_status(), 503);
        assert_eq!(ErrorCode::DeadlineExceeded.http_status(), 504);
        assert_eq!(ErrorCode::ImportFailed.http_status(), 502);
    }

    #[test]
    fn error_body_shape() {
        let body = ApiError::new(ErrorCode::InvalidJson, "expected an object").into_body();
        let v: serde_json::Value = serde_json::to_value(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_json");
        assert_eq!(v["error"]["message"], "expected an object");
    }
}
