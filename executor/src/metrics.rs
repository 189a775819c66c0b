//! The executor's metrics (`docs/SLO.md`, "Metrics"), registered under one
//! prefix in one registry. Names come from `tensor_wasm_shared::names`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tensor_wasm_shared::names::{BUILD_INFO, executor_metrics as m};

/// The ops a guest can dispatch, as metric labels.
pub const OPS: [&str; 19] = [
    "new",
    "zeros",
    "matmul",
    "binary",
    "scalar",
    "unary",
    "reduce",
    "softmax",
    "layer_norm",
    "rms_norm",
    "reshape",
    "transpose",
    "cast",
    "gather",
    "concat",
    "attention",
    "input",
    "read",
    "asset",
];

/// Every metric the executor exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub active_instances: IntGauge,
    pub jobs_in_flight: IntGauge,
    pub invocations_waiting: IntGauge,
    /// Guests of tenants over their share of the cores, by `how` they went
    /// to the background (`started` there, `moved` while running).
    pub background_guests: IntCounterVec,
    /// Streamed answers, by how they ended (`ok`, `error`, `idle`,
    /// `client_gone`).
    pub streams: IntCounterVec,
    /// Routed requests held through their tenant's pause, by how the hold
    /// ended (`ran`, `sent_on`, `refused`; `crate::http`'s fence).
    pub held_requests: IntCounterVec,
    /// Routed requests of tenants that left, sent on to where they moved,
    /// by what came of it (`answered`, `refused`; `crate::http`'s fence).
    pub sent_on_requests: IntCounterVec,
    pub kernel_dispatches: IntCounterVec,
    pub kernel_dispatch_duration: HistogramVec,
    pub invocations: IntCounterVec,
    pub invoke_duration: Histogram,
    pub device_memory: IntGaugeVec,
    pub host_memory: IntGauge,
    pub host_memory_limit: IntGauge,
    /// What the tenants' checkpoint journals do (`crate::durable`).
    pub journal: JournalMetrics,
    /// `kernel_dispatches_total` for each of [`OPS`] on this backend,
    /// resolved once: a label lookup per dispatch would cost more than a
    /// small kernel.
    dispatch_counters: Vec<IntCounter>,
    dispatch_seconds: Histogram,
}

/// The checkpoint journals' metrics, shared by every tenant's journal of
/// an executor (cheap to clone: the counters are shared).
#[derive(Debug, Clone)]
pub struct JournalMetrics {
    /// Syncs that made frames durable, each a batch of frames written
    /// since the last (what `strict` answers wait for), by duration.
    pub sync_duration: Histogram,
    /// Bytes written to journals: frames, and zeros written ahead.
    pub written_bytes: IntCounter,
}

impl JournalMetrics {
    fn new() -> JournalMetrics {
        JournalMetrics {
            sync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    m::JOURNAL_SYNC_DURATION_SECONDS,
                    "Syncs of checkpoint journal frames, a batch each, by duration.",
                )
                .buckets(SYNC_BUCKETS.to_vec()),
            )
            .expect("valid"),
            written_bytes: IntCounter::new(
                m::JOURNAL_WRITTEN_BYTES_TOTAL,
                "Bytes written to checkpoint journals: frames, and zeros written ahead of them.",
            )
            .expect("valid"),
        }
    }
}

/// Journal sync buckets, in seconds: 25 µs to 1 s.
const SYNC_BUCKETS: [f64; 13] = [
    25e-6, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1.0,
];

/// Dispatch latency buckets, in seconds: 1 µs to 1 s.
const DISPATCH_BUCKETS: [f64; 13] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.25, 1.0,
];

impl Metrics {
    /// Metrics of an executor whose kernels run on `backend` ("cpu" or
    /// "cuda"), labelled with its build.
    pub fn new(backend: &'static str, build: &[(&str, &str)]) -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let active_instances =
            IntGauge::new(m::ACTIVE_INSTANCES, "Warm wasm instances.").expect("valid");
        let jobs_in_flight =
            IntGauge::new(m::JOBS_IN_FLIGHT, "Async jobs pending or running.").expect("valid");
        let invocations_waiting = IntGauge::new(
            m::INVOCATIONS_WAITING,
            "Synchronous invocations waiting for an instance slot.",
        )
        .expect("valid");
        let background_guests = IntCounterVec::new(
            Opts::new(
                m::BACKGROUND_GUESTS_TOTAL,
                "Guests run in the background for a tenant over its share of the cores, by how (started, moved).",
            ),
            &["how"],
        )
        .expect("valid");
        let streams = IntCounterVec::new(
            Opts::new(
                m::STREAMS_TOTAL,
                "Streamed answers, by outcome (ok, error, idle, client_gone).",
            ),
            &["outcome"],
        )
        .expect("valid");
        let held_requests = IntCounterVec::new(
            Opts::new(
                m::HELD_REQUESTS_TOTAL,
                "Routed requests whose bodies a proxy could not send again, held through their tenant's pause, by outcome (ran, sent_on, refused).",
            ),
            &["outcome"],
        )
        .expect("valid");
        let sent_on_requests = IntCounterVec::new(
            Opts::new(
                m::SENT_ON_REQUESTS_TOTAL,
                "Routed requests of tenants that left, sent on to the executor they moved to, by outcome (answered, refused).",
            ),
            &["outcome"],
        )
        .expect("valid");
        let kernel_dispatches = IntCounterVec::new(
            Opts::new(
                m::KERNEL_DISPATCHES_TOTAL,
                "Tensor ops dispatched by guests.",
            ),
            &["op", "backend"],
        )
        .expect("valid");
        let kernel_dispatch_duration = HistogramVec::new(
            HistogramOpts::new(
                m::KERNEL_DISPATCH_DURATION_SECONDS,
                "Time to dispatch one tensor op (enqueue on a GPU, compute on the CPU).",
            )
            .buckets(DISPATCH_BUCKETS.to_vec()),
            &["backend"],
        )
        .expect("valid");
        let invocations = IntCounterVec::new(
            Opts::new(m::INVOCATIONS_TOTAL, "Invocations by result code."),
            &["result"],
        )
        .expect("valid");
        let invoke_duration = Histogram::with_opts(HistogramOpts::new(
            m::INVOKE_DURATION_SECONDS,
            "Invocation latency inside the executor.",
        ))
        .expect("valid");
        let device_memory = IntGaugeVec::new(
            Opts::new(
                m::DEVICE_MEMORY_BYTES,
                "Device memory held by tenants' tensors.",
            ),
            &["executor"],
        )
        .expect("valid");
        let (names, values): (Vec<&str>, Vec<&str>) = build.iter().copied().unzip();
        let build_info = IntGaugeVec::new(Opts::new(BUILD_INFO, "Build of this process."), &names)
            .expect("valid");
        build_info.with_label_values(&values).set(1);
        reg(Box::new(active_instances.clone()));
        reg(Box::new(jobs_in_flight.clone()));
        reg(Box::new(invocations_waiting.clone()));
        reg(Box::new(background_guests.clone()));
        reg(Box::new(streams.clone()));
        reg(Box::new(held_requests.clone()));
        reg(Box::new(sent_on_requests.clone()));
        reg(Box::new(kernel_dispatches.clone()));
        reg(Box::new(kernel_dispatch_duration.clone()));
        reg(Box::new(invocations.clone()));
        reg(Box::new(invoke_duration.clone()));
        reg(Box::new(device_memory.clone()));
        let journal = JournalMetrics::new();
        reg(Box::new(journal.sync_duration.clone()));
        reg(Box::new(journal.written_bytes.clone()));
        let host_memory = IntGauge::new(
            m::HOST_MEMORY_BYTES,
            "Host memory held by tenants: linear memory, and tensors on the CPU backend.",
        )
        .expect("valid");
        let host_memory_limit = IntGauge::new(
            m::HOST_MEMORY_LIMIT_BYTES,
            "Host memory all tenants together may hold (--host-memory-bytes).",
        )
        .expect("valid");
        reg(Box::new(host_memory.clone()));
        reg(Box::new(host_memory_limit.clone()));
        reg(Box::new(build_info));
        let dispatch_counters = OPS
            .iter()
            .map(|op| kernel_dispatches.with_label_values(&[op, backend]))
            .collect();
        let dispatch_seconds = kernel_dispatch_duration.with_label_values(&[backend]);
        Metrics {
            dispatch_counters,
            dispatch_seconds,
            registry,
            active_instances,
            jobs_in_flight,
            invocations_waiting,
            background_guests,
            streams,
            held_requests,
            sent_on_requests,
            kernel_dispatches,
            kernel_dispatch_duration,
            invocations,
            invoke_duration,
            device_memory,
            host_memory,
            host_memory_limit,
            journal,
        }
    }

    /// Counts one dispatch of `OPS[op]` that took `seconds`.
    pub fn dispatched(&self, op: usize, seconds: f64) {
        if let Some(c) = self.dispatch_counters.get(op) {
            c.inc();
        }
        self.dispatch_seconds.observe(seconds);
    }

    /// Dispatches counted so far, all ops.
    pub fn dispatches_total(&self) -> u64 {
        self.dispatch_counters.iter().map(|c| c.get()).sum()
    }

    /// The index of `name` in [`OPS`]; a name that is not there fails to
    /// compile where it is used in a `const` block.
    pub const fn op_index(name: &str) -> usize {
        let mut i = 0;
        while i < OPS.len() {
            if const_str_eq(OPS[i], name) {
                return i;
            }
            i += 1;
        }
        panic!("not an op name");
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
