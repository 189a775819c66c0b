//! Criterion benches of the CPU backend's kernels, called through the
//! `Backend` trait exactly as the executor calls them.
//!
//! - `matmul/{f32,bf16}/{256,1024,2048}`: square `n×n · n×n`. Throughput is
//!   declared as `Elements(2·n³)`, so the "elements/s" criterion prints are
//!   **FLOP/s** (one multiply and one add per inner-product term).
//! - `elementwise/add` and `elementwise/softmax` over 16 MiB of f32 per
//!   operand, with `Bytes` throughput counting the bytes an ideal kernel
//!   moves: add reads two operands and writes one (3 × 16 MiB); softmax
//!   reads its input once and writes its output once (2 × 16 MiB), so a
//!   multi-pass softmax shows up as lower GB/s.
//!
//! Sample counts and times are small so that the whole run stays within a
//! few minutes on 2 cores; 2048³ alone is ~17 GFLOP per call. For numbers
//! to quote, raise them (`-- --sample-size 50 --measurement-time 20`) or use
//! `bench/matmul-vs-numpy`, which compares against numpy in one run.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tensor_wasm_bench::{matmul_flops, random_tensor};
use tensor_wasm_kernels::{Backend, BinaryOp, CpuBackend, DType};

/// Matrix sides: 256 is cache-resident and shows per-call overhead, 1024
/// is the size `bench/matmul-vs-numpy` compares with numpy at, 2048 is past
/// the last-level cache.
const MATMUL_SIZES: [usize; 3] = [256, 1024, 2048];

/// Elements per elementwise operand: 4 Mi f32 = 16 MiB, past the L2 and,
/// on most CPUs, the L3 share of a few cores, so these measure memory
/// bandwidth, not cache.
const ELEMENTWISE_ELEMENTS: usize = 4 << 20;

/// Softmax row length: a 1024-wide last axis (4096 rows), the shape of an
/// attention score row in a small model.
const SOFTMAX_ROW: usize = 1024;

/// Criterion's minimum sample count; enough for the short runs these are.
const SAMPLE_SIZE: usize = 10;

/// Time per benchmark after warm-up: 3 s keeps the full run to minutes on
/// 2 cores (criterion stretches it when 10 samples need longer, as 2048³
/// bf16 may).
const MEASUREMENT_TIME: Duration = Duration::from_secs(3);

/// Warm-up per benchmark: long enough for BLAS threads to start and pages
/// to fault in.
const WARM_UP_TIME: Duration = Duration::from_secs(1);

fn matmul(c: &mut Criterion) {
    let backend = CpuBackend::default();
    let mut group = c.benchmark_group("matmul");
    group
        .sample_size(SAMPLE_SIZE)
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME);
    for dtype in [DType::F32, DType::BF16] {
        for n in MATMUL_SIZES {
            let a = random_tensor(&backend, dtype, &[n, n], 1).expect("operand a");
            let b = random_tensor(&backend, dtype, &[n, n], 2).expect("operand b");
            // Elements(FLOP): criterion's "elements/s" is FLOP/s here.
            group.throughput(Throughput::Elements(matmul_flops(n, n, n)));
            group.bench_function(BenchmarkId::new(dtype.to_string(), n), |bench| {
                bench.iter(|| {
                    let out = backend
                        .matmul(black_box(&a), black_box(&b))
                        .expect("matmul");
                    backend.synchronize().expect("synchronize");
                    out
                });
            });
        }
    }
    group.finish();
}

fn elementwise(c: &mut Criterion) {
    let backend = CpuBackend::default();
    let operand_bytes = (ELEMENTWISE_ELEMENTS * DType::F32.size()) as u64;
    let a = random_tensor(&backend, DType::F32, &[ELEMENTWISE_ELEMENTS], 1).expect("operand a");
    let b = random_tensor(&backend, DType::F32, &[ELEMENTWISE_ELEMENTS], 2).expect("operand b");
    let rows = ELEMENTWISE_ELEMENTS / SOFTMAX_ROW;
    let scores =
        random_tensor(&backend, DType::F32, &[rows, SOFTMAX_ROW], 3).expect("softmax input");

    let mut group = c.benchmark_group("elementwise");
    group
        .sample_size(SAMPLE_SIZE)
        .measurement_time(MEASUREMENT_TIME)
        .warm_up_time(WARM_UP_TIME);

    // Reads a and b, writes the sum.
    group.throughput(Throughput::Bytes(3 * operand_bytes));
    group.bench_function("add/f32/16MiB", |bench| {
        bench.iter(|| {
            let out = backend
                .binary(BinaryOp::Add, black_box(&a), black_box(&b))
                .expect("add");
            backend.synchronize().expect("synchronize");
            out
        });
    });

    // Reads the input, writes the output (the minimum any softmax moves).
    group.throughput(Throughput::Bytes(2 * operand_bytes));
    group.bench_function("softmax/f32/16MiB", |bench| {
        bench.iter(|| {
            let out = backend.softmax(black_box(&scores), -1).expect("softmax");
            backend.synchronize().expect("synchronize");
            out
        });
    });
    group.finish();
}

criterion_group!(benches, matmul, elementwise);
criterion_main!(benches);
