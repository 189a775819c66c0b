"""Every error `code` of the API (docs/API.md, "Status codes and error
codes") as its own exception class, so that callers catch what they mean:

    try:
        fn(x=x)
    except tensorwasm.RateLimited as e:
        time.sleep(e.retry_after or 1)
"""

from __future__ import annotations


class TensorWasmError(Exception):
    """An error answer of the API, or a failure to get one."""

    code: str = "unknown"

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code}: {self.message}{where}"


class InvalidJson(TensorWasmError):
    code = "invalid_json"


class InvalidInput(TensorWasmError):
    code = "invalid_input"


class Unauthorized(TensorWasmError):
    code = "unauthorized"


class TenantScopeDenied(TensorWasmError):
    code = "tenant_scope_denied"


class FunctionNotFound(TensorWasmError):
    code = "function_not_found"


class JobNotFound(TensorWasmError):
    code = "job_not_found"


class NotFound(TensorWasmError):
    code = "not_found"


class MethodNotAllowed(TensorWasmError):
    code = "method_not_allowed"


class JobRunning(TensorWasmError):
    code = "job_running"


class FunctionExists(TensorWasmError):
    code = "function_exists"


class TenantFrozen(TensorWasmError):
    code = "tenant_frozen"


class TenantExists(TensorWasmError):
    code = "tenant_exists"


class TenantNotHere(TensorWasmError):
    code = "tenant_not_here"


class MoveNotFound(TensorWasmError):
    code = "move_not_found"


class MigrationRunning(TensorWasmError):
    code = "migration_running"


class PayloadTooLarge(TensorWasmError):
    code = "payload_too_large"


class UnsupportedMediaType(TensorWasmError):
    code = "unsupported_media_type"


class InvalidWasm(TensorWasmError):
    code = "invalid_wasm"


class ImportNotAllowed(TensorWasmError):
    code = "import_not_allowed"


class MissingExport(TensorWasmError):
    code = "missing_export"


class QuotaExceeded(TensorWasmError):
    code = "quota_exceeded"


class RateLimited(TensorWasmError):
    """429: the tenant's rate limit; `retry_after` says when to try again."""

    code = "rate_limited"


class GuestTrap(TensorWasmError):
    code = "guest_trap"


class FunctionError(TensorWasmError):
    """The function returned an error of its own (`set_error`)."""

    code = "function_error"


class Internal(TensorWasmError):
    code = "internal"


class ImportFailed(TensorWasmError):
    code = "import_failed"


class ExecutorUnavailable(TensorWasmError):
    code = "executor_unavailable"


class CapacityExhausted(TensorWasmError):
    code = "capacity_exhausted"


class TenantMoving(TensorWasmError):
    code = "tenant_moving"


class DeadlineExceeded(TensorWasmError):
    code = "deadline_exceeded"


class CheckpointFailed(TensorWasmError):
    code = "checkpoint_failed"


class JobInterrupted(TensorWasmError):
    code = "job_interrupted"


class ExecutorExists(TensorWasmError):
    code = "executor_exists"


class ExecutorUnverified(TensorWasmError):
    code = "executor_unverified"


class PlacementUnavailable(TensorWasmError):
    """The fleet's shared placement table (etcd) cannot be reached: placed
    tenants are served, new ones wait for it."""

    code = "placement_unavailable"


class PlacementStale(TensorWasmError):
    code = "placement_stale"


class Unreachable(TensorWasmError):
    """No answer came: the URL is wrong, or the fleet is down."""

    code = "unreachable"


BY_CODE: dict[str, type[TensorWasmError]] = {
    cls.code: cls for cls in TensorWasmError.__subclasses__() if cls is not Unreachable
}


def from_answer(
    status: int,
    code: str | None,
    message: str,
    request_id: str | None,
    retry_after: float | None,
) -> TensorWasmError:
    """The exception for an error answer: the class of its code, or the
    base class for a code this client does not know."""
    cls = BY_CODE.get(code or "", TensorWasmError)
    return cls(
        message,
        status=status,
        code=code or f"http_{status}",
        request_id=request_id,
        retry_after=retry_after,
    )
