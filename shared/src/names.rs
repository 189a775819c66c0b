//! Metric and configuration names (`docs/SLO.md`, `docs/CONFIG.md`), kept
//! in one place so that dashboards, alerts and code cannot drift apart.

/// Prefix of every metric.
pub const METRIC_PREFIX: &str = "tensor_wasm_";

/// Metrics counted by the proxy.
pub mod proxy_metrics {
    pub const HTTP_REQUESTS_TOTAL: &str = "tensor_wasm_http_requests_total";
    pub const HTTP_REQUEST_DURATION_SECONDS: &str = "tensor_wasm_http_request_duration_seconds";
    pub const HTTP_REQUESTS_IN_FLIGHT: &str = "tensor_wasm_http_requests_in_flight";
    pub const RATE_LIMITED_TOTAL: &str = "tensor_wasm_rate_limited_total";
    pub const MIGRATIONS_TOTAL: &str = "tensor_wasm_migrations_total";
    pub const MIGRATION_PAUSE_SECONDS: &str = "tensor_wasm_migration_pause_seconds";
    pub const AUDIT_RECORDS_TOTAL: &str = "tensor_wasm_audit_records_total";
    pub const AUDIT_FAILURES_TOTAL: &str = "tensor_wasm_audit_failures_total";
    pub const UPSTREAM_REQUESTS_TOTAL: &str = "tensor_wasm_upstream_requests_total";
    pub const UPSTREAM_REQUEST_DURATION_SECONDS: &str =
        "tensor_wasm_upstream_request_duration_seconds";
    pub const CONNECTIONS_OPEN: &str = "tensor_wasm_connections_open";
    pub const CONNECTIONS_REFUSED_TOTAL: &str = "tensor_wasm_connections_refused_total";
    pub const CONNECTIONS_TIMED_OUT_TOTAL: &str = "tensor_wasm_connections_timed_out_total";
    pub const HTTP_STREAMS_TOTAL: &str = "tensor_wasm_http_streams_total";
    pub const HTTP_STREAM_DURATION_SECONDS: &str = "tensor_wasm_http_stream_duration_seconds";
}

/// Metrics counted by executors.
pub mod executor_metrics {
    pub const ACTIVE_INSTANCES: &str = "tensor_wasm_active_instances";
    pub const JOBS_IN_FLIGHT: &str = "tensor_wasm_jobs_in_flight";
    pub const INVOCATIONS_WAITING: &str = "tensor_wasm_invocations_waiting";
    pub const BACKGROUND_GUESTS_TOTAL: &str = "tensor_wasm_background_guests_total";
    pub const STREAMS_TOTAL: &str = "tensor_wasm_streams_total";
    pub const HELD_REQUESTS_TOTAL: &str = "tensor_wasm_held_requests_total";
    pub const SENT_ON_REQUESTS_TOTAL: &str = "tensor_wasm_sent_on_requests_total";
    pub const KERNEL_DISPATCHES_TOTAL: &str = "tensor_wasm_kernel_dispatches_total";
    pub const KERNEL_DISPATCH_DURATION_SECONDS: &str =
        "tensor_wasm_kernel_dispatch_duration_seconds";
    pub const INVOCATIONS_TOTAL: &str = "tensor_wasm_invocations_total";
    pub const INVOKE_DURATION_SECONDS: &str = "tensor_wasm_invoke_duration_seconds";
    pub const DEVICE_MEMORY_BYTES: &str = "tensor_wasm_device_memory_bytes";
    pub const HOST_MEMORY_BYTES: &str = "tensor_wasm_host_memory_bytes";
    pub const HOST_MEMORY_LIMIT_BYTES: &str = "tensor_wasm_host_memory_limit_bytes";
    pub const JOURNAL_SYNC_DURATION_SECONDS: &str = "tensor_wasm_journal_sync_duration_seconds";
    pub const JOURNAL_WRITTEN_BYTES_TOTAL: &str = "tensor_wasm_journal_written_bytes_total";
}

/// Counted by every component.
pub const BUILD_INFO: &str = "tensor_wasm_build_info";

/// Environment variables of every process and command, one constant per
/// variable (docs/CONFIG.md lists them with their meaning). The binary's
/// flags take their fallbacks from here (`#[arg(env = env::X)]`).
pub mod env {
    // Shared by several processes and commands.
    pub const STATE_DIR: &str = "TENSOR_WASM_STATE_DIR";
    pub const INTERNAL_TOKEN: &str = "TENSOR_WASM_INTERNAL_TOKEN";
    pub const ADMIN_TOKEN: &str = "TENSOR_WASM_ADMIN_TOKEN";
    pub const SNAPSHOT_KEY: &str = "TENSOR_WASM_SNAPSHOT_KEY";

    // The executor (`tensor-wasm executor`).
    pub const EXECUTOR_ID: &str = "TENSOR_WASM_EXECUTOR_ID";
    pub const EXECUTOR_LISTEN: &str = "TENSOR_WASM_EXECUTOR_LISTEN";
    pub const DEVICE: &str = "TENSOR_WASM_DEVICE";
    pub const DEFAULT_DEADLINE_MS: &str = "TENSOR_WASM_DEFAULT_DEADLINE_MS";
    pub const DEFAULT_MEMORY_LIMIT_BYTES: &str = "TENSOR_WASM_DEFAULT_MEMORY_LIMIT_BYTES";
    pub const MAX_MODULE_BYTES: &str = "TENSOR_WASM_MAX_MODULE_BYTES";
    pub const MAX_BODY_BYTES: &str = "TENSOR_WASM_MAX_BODY_BYTES";
    pub const MAX_ASSET_BYTES: &str = "TENSOR_WASM_MAX_ASSET_BYTES";
    pub const PAGE_TRACKING: &str = "TENSOR_WASM_PAGE_TRACKING";
    pub const TENANT_HOST_MEMORY_BYTES: &str = "TENSOR_WASM_TENANT_HOST_MEMORY_BYTES";
    pub const HOST_MEMORY_BYTES: &str = "TENSOR_WASM_HOST_MEMORY_BYTES";
    pub const TOTAL_INSTANCES: &str = "TENSOR_WASM_TOTAL_INSTANCES";
    pub const TENANT_DEVICE_MEMORY_BYTES: &str = "TENSOR_WASM_TENANT_DEVICE_MEMORY_BYTES";
    pub const TENANT_LIVE_TENSORS: &str = "TENSOR_WASM_TENANT_LIVE_TENSORS";
    pub const TENANT_FUNCTIONS: &str = "TENSOR_WASM_TENANT_FUNCTIONS";
    pub const TENANT_INSTANCES: &str = "TENSOR_WASM_TENANT_INSTANCES";
    pub const TENANT_PENDING_JOBS: &str = "TENSOR_WASM_TENANT_PENDING_JOBS";
    pub const TENANT_RUNNING_JOBS: &str = "TENSOR_WASM_TENANT_RUNNING_JOBS";
    pub const TENANT_RUNNING_INVOCATIONS: &str = "TENSOR_WASM_TENANT_RUNNING_INVOCATIONS";
    pub const TENANT_CPU_WEIGHTS: &str = "TENSOR_WASM_TENANT_CPU_WEIGHTS";
    pub const JOB_CONCURRENCY: &str = "TENSOR_WASM_JOB_CONCURRENCY";
    pub const TENANT_PENDING_JOB_BYTES: &str = "TENSOR_WASM_TENANT_PENDING_JOB_BYTES";
    pub const TENANT_FINISHED_JOB_BYTES: &str = "TENSOR_WASM_TENANT_FINISHED_JOB_BYTES";
    pub const JOB_RETENTION_SECS: &str = "TENSOR_WASM_JOB_RETENTION_SECS";
    pub const SHUTDOWN_BUDGET_SECS: &str = "TENSOR_WASM_SHUTDOWN_BUDGET_SECS";
    pub const CHECKPOINT_MS: &str = "TENSOR_WASM_CHECKPOINT_MS";
    pub const STREAM_IDLE_TIMEOUT_MS: &str = "TENSOR_WASM_STREAM_IDLE_TIMEOUT_MS";
    pub const MODULE_CACHE_DIR: &str = "TENSOR_WASM_MODULE_CACHE_DIR";
    pub const MODULE_CACHE_BYTES: &str = "TENSOR_WASM_MODULE_CACHE_BYTES";

    // The proxy (`tensor-wasm proxy`; `up` passes the listeners on).
    pub const PROXY_LISTEN: &str = "TENSOR_WASM_PROXY_LISTEN";
    pub const ADMIN_LISTEN: &str = "TENSOR_WASM_ADMIN_LISTEN";
    pub const TLS_CERT: &str = "TENSOR_WASM_TLS_CERT";
    pub const TLS_KEY: &str = "TENSOR_WASM_TLS_KEY";
    pub const API_TOKENS: &str = "TENSOR_WASM_API_TOKENS";
    pub const API_TOKENS_FILE: &str = "TENSOR_WASM_API_TOKENS_FILE";
    pub const API_RATE_LIMIT_QPS: &str = "TENSOR_WASM_API_RATE_LIMIT_QPS";
    pub const API_RATE_LIMIT_BURST: &str = "TENSOR_WASM_API_RATE_LIMIT_BURST";
    pub const API_RATE_LIMIT_OVERRIDES: &str = "TENSOR_WASM_API_RATE_LIMIT_OVERRIDES";
    pub const API_AUDIT_LOG: &str = "TENSOR_WASM_API_AUDIT_LOG";
    pub const API_AUDIT_MAX_BYTES: &str = "TENSOR_WASM_API_AUDIT_MAX_BYTES";
    pub const API_AUDIT_KEEP: &str = "TENSOR_WASM_API_AUDIT_KEEP";
    pub const EXECUTORS: &str = "TENSOR_WASM_EXECUTORS";
    pub const EXECUTOR_DNS: &str = "TENSOR_WASM_EXECUTOR_DNS";
    pub const PLACEMENT: &str = "TENSOR_WASM_PLACEMENT";
    pub const ETCD_USER: &str = "TENSOR_WASM_ETCD_USER";
    pub const ETCD_PASSWORD: &str = "TENSOR_WASM_ETCD_PASSWORD";
    pub const ETCD_CA: &str = "TENSOR_WASM_ETCD_CA";
    pub const MIGRATION_QUEUE_DEADLINE_MS: &str = "TENSOR_WASM_MIGRATION_QUEUE_DEADLINE_MS";
    pub const MIGRATION_QUEUE_CAPACITY: &str = "TENSOR_WASM_MIGRATION_QUEUE_CAPACITY";
    pub const HEALTH_INTERVAL_MS: &str = "TENSOR_WASM_HEALTH_INTERVAL_MS";
    pub const PROXY_THREADS: &str = "TENSOR_WASM_PROXY_THREADS";
    pub const PROXY_REUSE_PORT: &str = "TENSOR_WASM_PROXY_REUSE_PORT";
    pub const PROXY_GRACE_PERIOD_SECS: &str = "TENSOR_WASM_PROXY_GRACE_PERIOD_SECS";
    pub const PROXY_MAX_CONNECTIONS: &str = "TENSOR_WASM_PROXY_MAX_CONNECTIONS";
    pub const PROXY_MAX_CONNECTIONS_PER_CLIENT: &str =
        "TENSOR_WASM_PROXY_MAX_CONNECTIONS_PER_CLIENT";
    pub const PROXY_CLIENT_HEADER_TIMEOUT_MS: &str = "TENSOR_WASM_PROXY_CLIENT_HEADER_TIMEOUT_MS";
    pub const PROXY_CLIENT_IDLE_TIMEOUT_MS: &str = "TENSOR_WASM_PROXY_CLIENT_IDLE_TIMEOUT_MS";

    // The local fleet (`tensor-wasm up`).
    pub const CPU_EXECUTORS: &str = "TENSOR_WASM_CPU_EXECUTORS";
    pub const PROXIES: &str = "TENSOR_WASM_PROXIES";
    pub const ETCD_BINARY: &str = "TENSOR_WASM_ETCD_BINARY";

    // Client and operator commands.
    pub const URL: &str = "TENSOR_WASM_URL";
    pub const TOKEN: &str = "TENSOR_WASM_TOKEN";
    pub const ADMIN_URL: &str = "TENSOR_WASM_ADMIN_URL";
    pub const CA_CERT: &str = "TENSOR_WASM_CA_CERT";
    pub const TIMEOUT_SECS: &str = "TENSOR_WASM_TIMEOUT_SECS";

    // The CUDA backend.
    /// Directory of the CUDA kernel JIT cache (default: `$XDG_CACHE_HOME` or
    /// `~/.cache`, then `tensor-wasm/kernels`).
    pub const KERNEL_CACHE_DIR: &str = "TENSOR_WASM_KERNEL_CACHE_DIR";
    /// `1` makes the CUDA backend fill every fresh output with 0xFF bytes
    /// (NaN for floats) before its kernel runs, so tests catch elements a
    /// kernel never writes. Off in production: it costs a memset per op.
    pub const CUDA_POISON: &str = "TENSOR_WASM_CUDA_POISON";
    /// `gemm` makes the CUDA backend run all attention as two cuBLAS GEMMs
    /// around a softmax kernel, never the fused tensor-core kernel (for
    /// comparing the two, or as a fallback).
    pub const CUDA_ATTENTION: &str = "TENSOR_WASM_CUDA_ATTENTION";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_the_prefix() {
        let all = [
            proxy_metrics::HTTP_REQUESTS_TOTAL,
            proxy_metrics::HTTP_REQUEST_DURATION_SECONDS,
            proxy_metrics::HTTP_REQUESTS_IN_FLIGHT,
            proxy_metrics::RATE_LIMITED_TOTAL,
            proxy_metrics::MIGRATIONS_TOTAL,
            proxy_metrics::MIGRATION_PAUSE_SECONDS,
            proxy_metrics::AUDIT_RECORDS_TOTAL,
            proxy_metrics::AUDIT_FAILURES_TOTAL,
            proxy_metrics::UPSTREAM_REQUESTS_TOTAL,
            proxy_metrics::UPSTREAM_REQUEST_DURATION_SECONDS,
            proxy_metrics::CONNECTIONS_OPEN,
            proxy_metrics::CONNECTIONS_REFUSED_TOTAL,
            proxy_metrics::CONNECTIONS_TIMED_OUT_TOTAL,
            executor_metrics::ACTIVE_INSTANCES,
            executor_metrics::JOBS_IN_FLIGHT,
            executor_metrics::BACKGROUND_GUESTS_TOTAL,
            executor_metrics::KERNEL_DISPATCHES_TOTAL,
            executor_metrics::KERNEL_DISPATCH_DURATION_SECONDS,
            executor_metrics::INVOCATIONS_TOTAL,
            executor_metrics::INVOKE_DURATION_SECONDS,
            executor_metrics::DEVICE_MEMORY_BYTES,
            BUILD_INFO,
        ];
        for name in all {
            assert!(name.starts_with(METRIC_PREFIX), "{name}");
        }
    }
}
