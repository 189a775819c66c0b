//! The proxy's metrics (`docs/SLO.md`, "Metrics"), registered under one
//! prefix in one registry. Names come from `tensor_wasm_shared::names`.
//!
//! Label values are bounded: `route` is a template from
//! [`crate::routes::classify`], `method` one of a handful, `status` a
//! three-digit code, `executor` an executor the proxy has routed to (the
//! fleet's size, plus one per replacement an upgrade starts). Tenant ids
//! never become labels.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tensor_wasm_shared::names::{BUILD_INFO, proxy_metrics as m};

use crate::conn::ConnMetrics;

/// Request latency buckets, in seconds: 100 µs to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.5, 1.0, 5.0, 30.0,
];

/// Migration pause buckets, in seconds: 1 ms to 10 s.
const PAUSE_BUCKETS: [f64; 12] = [
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Stream duration buckets, in seconds: 10 ms to 5 min (the longest
/// deadline).
const STREAM_BUCKETS: [f64; 11] = [1e-2, 5e-2, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub in_flight: IntGauge,
    pub rate_limited: IntCounter,
    pub migrations: IntCounterVec,
    pub migration_pause: Histogram,
    pub audit_records: IntCounter,
    pub audit_failures: IntCounter,
    /// Requests routed to an executor, by executor and status: what an
    /// upgrade's canary compares before and after (`docs/UPGRADE.md`).
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    /// The public listener's connections ([`crate::conn`]).
    pub connections: ConnMetrics,
    /// Streamed answers, by outcome, and how long each lasted.
    pub streams: IntCounterVec,
    pub stream_duration: Histogram,
}

impl ProxyMetrics {
    /// The proxy's metrics, labelled with its build.
    pub fn new(build: &[(&str, &str)]) -> ProxyMetrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let requests = IntCounterVec::new(
            Opts::new(
                m::HTTP_REQUESTS_TOTAL,
                "Requests answered, by route template and status.",
            ),
            &["method", "route", "status"],
        )
        .expect("valid");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                m::HTTP_REQUEST_DURATION_SECONDS,
                "Time from a request's arrival to the end of its answer.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid");
        let in_flight = IntGauge::new(m::HTTP_REQUESTS_IN_FLIGHT, "Requests being answered now.")
            .expect("valid");
        let rate_limited = IntCounter::new(
            m::RATE_LIMITED_TOTAL,
            "Requests refused by a tenant's rate limit.",
        )
        .expect("valid");
        let migrations = IntCounterVec::new(
            Opts::new(m::MIGRATIONS_TOTAL, "Tenant migrations, by result."),
            &["result"],
        )
        .expect("valid");
        let migration_pause = Histogram::with_opts(
            HistogramOpts::new(
                m::MIGRATION_PAUSE_SECONDS,
                "How long a migrating tenant's requests were held.",
            )
            .buckets(PAUSE_BUCKETS.to_vec()),
        )
        .expect("valid");
        let audit_records =
            IntCounter::new(m::AUDIT_RECORDS_TOTAL, "Audit records written.").expect("valid");
        let audit_failures = IntCounter::new(
            m::AUDIT_FAILURES_TOTAL,
            "Audit log writes, flushes, fsyncs and rotations that failed.",
        )
        .expect("valid");
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                m::UPSTREAM_REQUESTS_TOTAL,
                "Requests routed to an executor, by executor and status.",
            ),
            &["executor", "status"],
        )
        .expect("valid");
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                m::UPSTREAM_REQUEST_DURATION_SECONDS,
                "Time from the arrival of a request routed to an executor to the end of its answer.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["executor"],
        )
        .expect("valid");
        let streams = IntCounterVec::new(
            Opts::new(
                m::HTTP_STREAMS_TOTAL,
                "Streamed answers, by outcome (ok, error, client_gone, cut).",
            ),
            &["outcome"],
        )
        .expect("valid");
        let stream_duration = Histogram::with_opts(
            HistogramOpts::new(
                m::HTTP_STREAM_DURATION_SECONDS,
                "Time from a streamed request's arrival to the end of its stream.",
            )
            .buckets(STREAM_BUCKETS.to_vec()),
        )
        .expect("valid");
        let connections = ConnMetrics {
            open: IntGauge::new(
                m::CONNECTIONS_OPEN,
                "Client connections of the public listener open now.",
            )
            .expect("valid"),
            refused: IntCounterVec::new(
                Opts::new(
                    m::CONNECTIONS_REFUSED_TOTAL,
                    "Client connections refused for being over a cap, by reason (total, per_client).",
                ),
                &["reason"],
            )
            .expect("valid"),
            timed_out: IntCounterVec::new(
                Opts::new(
                    m::CONNECTIONS_TIMED_OUT_TOTAL,
                    "Client connections closed for a request header or an idle spell that took too long, by phase (header, idle).",
                ),
                &["phase"],
            )
            .expect("valid"),
        };
        let (names, values): (Vec<&str>, Vec<&str>) = build.iter().copied().unzip();
        let build_info = IntGaugeVec::new(Opts::new(BUILD_INFO, "Build of this process."), &names)
            .expect("valid");
        build_info.with_label_values(&values).set(1);
        reg(Box::new(connections.open.clone()));
        reg(Box::new(connections.refused.clone()));
        reg(Box::new(connections.timed_out.clone()));
        reg(Box::new(requests.clone()));
        reg(Box::new(duration.clone()));
        reg(Box::new(in_flight.clone()));
        reg(Box::new(rate_limited.clone()));
        reg(Box::new(migrations.clone()));
        reg(Box::new(migration_pause.clone()));
        reg(Box::new(audit_records.clone()));
        reg(Box::new(audit_failures.clone()));
        reg(Box::new(upstream_requests.clone()));
        reg(Box::new(upstream_duration.clone()));
        reg(Box::new(streams.clone()));
        reg(Box::new(stream_duration.clone()));
        reg(Box::new(build_info));
        // Show the result series from the start so that alerts on their
        // rate see a zero rather than no data.
        for result in ["success", "failed"] {
            migrations.with_label_values(&[result]);
        }
        ProxyMetrics {
            registry,
            requests,
            duration,
            in_flight,
            rate_limited,
            migrations,
            migration_pause,
            audit_records,
            audit_failures,
            upstream_requests,
            upstream_duration,
            connections,
            streams,
            stream_duration,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
