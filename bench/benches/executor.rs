//! Criterion benches of the executor's hot paths, in-process (no HTTP):
//!
//! - `invoke/warm_instance`: one `handle` call of a trivial function on a
//!   warm instance — the floor of every invocation.
//! - `invoke/registry`: the same through `Registry::invoke` (admission, the
//!   instance pool, the one blocking-thread hop that decodes, runs and
//!   encodes), as the HTTP layer calls it, with an empty raw body.
//! - `abi/add16`: a guest that calls `binary(add)` on two 16-element f32
//!   tensors, then `free`, 1000 times per invocation; next to it,
//!   `abi/direct_add16` does the same 1000 adds and drops straight on the
//!   backend. (guest − direct) / 1000 is the cost of one guest→host tensor
//!   op beyond the kernel itself.
//! - `snapshot/{export,import}_64mib`: a tenant whose warm instance holds a
//!   64 MiB tensor; throughput in bytes of snapshot per second.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tensor_wasm_executor::body::RequestBody;
use tensor_wasm_executor::config::{EngineLimits, TenantQuotas};
use tensor_wasm_executor::engine::Runtime;
use tensor_wasm_executor::instance::{InstanceSetup, Request, WarmInstance};
use tensor_wasm_executor::logs::FunctionLog;
use tensor_wasm_executor::metrics::Metrics;
use tensor_wasm_executor::registry::{BackendFactory, Registry};
use tensor_wasm_executor::state::Registration;
use tensor_wasm_executor::tensors::TenantUsage;
use tensor_wasm_kernels::{Backend, BinaryOp, CpuBackend, DType};
use tensor_wasm_shared::api::FunctionConfig;
use tensor_wasm_shared::{FunctionId, TenantId};

/// Guest ops per invocation in the ABI bench: enough that the invocation's
/// own cost is under 1 % of the total.
const OPS_PER_CALL: usize = 1000;

const TRIVIAL: &str = r#"(module (memory (export "memory") 1)
    (func (export "handle") (result i32) (i32.const 0)))"#;

const ADD16: &str = r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "binary" (func $binary (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\10\00\00\00")
  (global $a (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (global.set $a (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
    (i32.const 0))
  (func (export "handle") (result i32)
    (local $i i32)
    (loop $l
      (drop (call $free (call $binary (i32.const 0) (global.get $a) (global.get $a))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 1000))))
    (i32.const 0)))"#;

/// 64 MiB of state: init keeps a [16 Mi] f32 tensor.
const BIG_STATE: &str = r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\00\00\00\01")
  (global $t (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (global.set $t (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
    (i32.const 0))
  (func (export "handle") (result i32) (i32.const 0)))"#;

fn limits() -> EngineLimits {
    EngineLimits {
        total_instances: 8,
        ..EngineLimits::default()
    }
}

fn warm(rt: &Runtime, wat: &str) -> WarmInstance {
    let info = tensor_wasm_executor::wasm::inspect(&wat::parse_str(wat).unwrap(), 1 << 20).unwrap();
    let module = rt.compile(&info.rewritten).unwrap();
    let pre = rt.linker().instantiate_pre(&module).unwrap();
    let setup = InstanceSetup {
        backend: Arc::new(CpuBackend::default()),
        assets: Arc::new(HashMap::new()),
        usage: Arc::new(TenantUsage::new(1 << 30, 1 << 20)),
        host: Arc::new(tensor_wasm_executor::memory::HostUsage::new(
            u64::MAX,
            tensor_wasm_executor::memory::HostBudget::new(u64::MAX),
        )),
        log: FunctionLog::new(1024),
        metrics: Arc::new(Metrics::new("cpu", &[("component", "bench")])),
        memory_limit: 16 << 20,
        max_output_bytes: 1 << 20,
        max_error_message: 1024,
        max_table_elements: 1000,
    };
    WarmInstance::create(&pre, &setup, true, Duration::from_secs(10)).unwrap()
}

fn registry() -> Arc<Registry> {
    let runtime = Runtime::new(limits(), None).unwrap();
    let cpu: Arc<dyn Backend> = Arc::new(CpuBackend::default());
    let factory: BackendFactory = Arc::new(move || Ok(cpu.clone()));
    let metrics = Arc::new(Metrics::new("cpu", &[("component", "bench")]));
    // The registry's files live for the bench's process.
    let dir = tempfile::tempdir().unwrap().keep();
    Arc::new(Registry::new(
        runtime,
        factory,
        dir,
        TenantQuotas::default(),
        metrics,
    ))
}

fn register(reg: &Registry, tenant: &TenantId, wat: &str) -> FunctionId {
    reg.register(
        tenant,
        Registration {
            name: "f".into(),
            wasm: wat::parse_str(wat).unwrap(),
            assets: None,
            config: FunctionConfig::default(),
            replace: false,
        },
    )
    .unwrap()
    .id
}

fn invoke(c: &mut Criterion) {
    let rt = Runtime::new(limits(), None).unwrap();
    let mut g = c.benchmark_group("invoke");
    let mut inst = warm(&rt, TRIVIAL);
    g.bench_function("warm_instance", |b| {
        b.iter(|| {
            inst.invoke(Request::default(), Duration::from_secs(10), None)
                .unwrap()
        })
    });
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let reg = registry();
    let tenant = TenantId::new("bench").unwrap();
    let id = register(&reg, &tenant, TRIVIAL);
    let target = reg.resolve(&tenant, &id).unwrap();
    g.bench_function("registry", |b| {
        b.iter(|| {
            tokio
                .block_on(reg.invoke(&target, RequestBody::default(), |r, _| Ok(r)))
                .unwrap()
        })
    });
    g.finish();
}

fn abi(c: &mut Criterion) {
    let rt = Runtime::new(limits(), None).unwrap();
    let mut g = c.benchmark_group("abi");
    g.throughput(Throughput::Elements(OPS_PER_CALL as u64));
    let mut inst = warm(&rt, ADD16);
    g.bench_function("add16", |b| {
        b.iter(|| {
            inst.invoke(Request::default(), Duration::from_secs(10), None)
                .unwrap()
        })
    });
    let cpu = CpuBackend::default();
    let a = cpu.zeros(DType::F32, &[16]).unwrap();
    g.bench_function("direct_add16", |b| {
        b.iter(|| {
            for _ in 0..OPS_PER_CALL {
                black_box(cpu.binary(BinaryOp::Add, &a, &a).unwrap());
            }
        })
    });
    g.finish();
}

fn snapshot(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let source = registry();
    let tenant = TenantId::new("bench").unwrap();
    let id = register(&source, &tenant, BIG_STATE);
    tokio
        .block_on(source.invoke(
            &source.resolve(&tenant, &id).unwrap(),
            RequestBody::default(),
            |r, _| Ok(r),
        ))
        .unwrap();
    let bytes = tokio.block_on(source.export_tenant(&tenant)).unwrap();
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("export_64mib", |b| {
        b.iter(|| {
            source.thaw_tenant(&tenant).unwrap();
            black_box(tokio.block_on(source.export_tenant(&tenant)).unwrap())
        })
    });
    let target = registry();
    let shared = bytes::Bytes::from(bytes);
    g.bench_function("import_64mib", |b| {
        b.iter(|| {
            tokio
                .block_on(target.import_tenant(&tenant, shared.clone()))
                .unwrap();
            target.drop_tenant(&tenant).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, invoke, abi, snapshot);
criterion_main!(benches);
