//! Times our backend on the shapes of the GPU targets, and cuBLAS called
//! directly as the GEMM peer, and writes one JSON file in the schema that
//! `bench/gpu/report.py` merges with the PyTorch peer's (`bench/gpu/peer.py`).
//!
//! ```text
//! gpu-bench [--device cuda|cuda:N|cpu] [--quick] [--out FILE]
//! ```
//!
//! Every measurement warms up, then runs 5 rounds of `reps` enqueues, each
//! round ended by a device synchronize; the reported time is the median
//! round's time per rep. What is timed:
//!
//! - `matmul_f32`, `matmul_bf16`: 8192³ through [`Backend::matmul`], and the
//!   same GEMM through cuBLAS directly (`impl: "cublas"`);
//! - `add_f32`: `a + b` over two 256 MiB f32 tensors (3 × 256 MiB moved);
//! - `softmax_f32`, `layer_norm_f32`: 4096 × 8192 f32, last axis;
//! - `attention_causal_bf16`: q, k, v of `[8, 16, 2048, 128]` bf16, causal;
//! - `small_add_enqueue`: a guest that runs `free(binary(add, a, a))` on a
//!   1024-element f32 tensor 10 000 times per invocation, through wasmtime
//!   and the ABI exactly as the executor runs it; time per op. Beside it,
//!   `impl: "tensor-wasm-direct"` makes the same calls on the backend from
//!   Rust, without the guest;
//! - `upload_64mib`: a guest whose `handle` calls `new` on 64 MiB of its
//!   linear memory and frees the handle; the invocation ends with the
//!   executor's device synchronize, so the time runs from the call to the
//!   data on the device.
//!
//! `--quick` shrinks every shape, for a dry run on the CPU backend. Without
//! `--out`, the JSON goes to stdout; progress goes to stderr.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tensor_wasm_bench::{matmul_flops, random_tensor};
use tensor_wasm_executor::config::EngineLimits;
use tensor_wasm_executor::engine::Runtime;
use tensor_wasm_executor::instance::{InstanceSetup, Request, WarmInstance};
use tensor_wasm_executor::logs::FunctionLog;
use tensor_wasm_executor::metrics::Metrics;
use tensor_wasm_executor::tensors::TenantUsage;
use tensor_wasm_kernels::{Backend, BinaryOp, CpuBackend, DType};

/// Timed rounds per measurement; the median is reported.
const ROUNDS: usize = 5;

/// Guest ops per invocation in `small_add_enqueue`.
const SMALL_OPS: usize = 10_000;

/// Elements of the small add.
const SMALL_ELEMS: usize = 1024;

struct Args {
    device: String,
    quick: bool,
    out: Option<String>,
    /// `--only`: the benchmark names (or prefixes) to run; empty runs all.
    only: Vec<String>,
}

impl Args {
    /// Whether the benchmark `name` runs.
    fn wants(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| name.starts_with(p.as_str()))
    }
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        device: "cuda".into(),
        quick: false,
        out: None,
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => {
                bail!(
                    "usage: gpu-bench [--device cuda|cuda:N|cpu] [--quick] [--out FILE] \
                     [--only NAME,...]"
                )
            }
            "--quick" => args.quick = true,
            "--device" => args.device = it.next().context("--device needs a value")?,
            "--out" => args.out = Some(it.next().context("--out needs a value")?),
            "--only" => {
                let v = it.next().context("--only needs a value")?;
                args.only = v.split(',').map(str::to_owned).collect();
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// The shapes measured: the targets' shapes, or small ones for `--quick`.
struct Shapes {
    matmul_n: usize,
    add_elems: usize,
    rows: usize,
    cols: usize,
    attention: [usize; 4],
    upload_bytes: usize,
}

impl Shapes {
    fn new(quick: bool) -> Shapes {
        if quick {
            Shapes {
                matmul_n: 256,
                add_elems: 1 << 20,
                rows: 256,
                cols: 512,
                attention: [1, 2, 128, 64],
                upload_bytes: 4 << 20,
            }
        } else {
            Shapes {
                matmul_n: 8192,
                add_elems: 64 << 20,
                rows: 4096,
                cols: 8192,
                attention: [8, 16, 2048, 128],
                upload_bytes: 64 << 20,
            }
        }
    }
}

/// One measurement's median time per rep and its per-round times.
struct Timed {
    seconds: f64,
    rounds: Vec<f64>,
}

impl Timed {
    /// The same times divided by the `n` operations each rep ran.
    fn per(&self, n: usize) -> Timed {
        Timed {
            seconds: self.seconds / n as f64,
            rounds: self.rounds.iter().map(|s| s / n as f64).collect(),
        }
    }
}

/// What a measurement's rate is counted in.
enum Work {
    Flops(f64),
    Bytes(f64),
    None,
}

/// The result entries, in the JSON schema `bench/gpu/report.py` reads;
/// each is also logged to stderr as it comes.
#[derive(Default)]
struct Results(Vec<Value>);

impl Results {
    fn add(&mut self, name: &str, imp: &str, shape: &str, t: &Timed, work: Work, detail: &str) {
        eprintln!("  {name:<24} {imp:<20} {:>12.3} µs", t.seconds * 1e6);
        let mut v = json!({
            "name": name,
            "impl": imp,
            "shape": shape,
            "seconds": t.seconds,
            "rounds": t.rounds,
            "detail": detail,
        });
        match work {
            Work::Flops(f) => v["flops"] = json!(f),
            Work::Bytes(b) => v["bytes"] = json!(b),
            Work::None => {}
        }
        self.0.push(v);
    }
}

/// Runs `warmup` untimed reps, then [`ROUNDS`] rounds of `reps`, each
/// closed by `sync` (which waits for the device). What a rep returns (an
/// op's output tensor) is dropped at once.
fn rounds<R, E: Into<anyhow::Error>>(
    warmup: usize,
    reps: usize,
    mut rep: impl FnMut() -> std::result::Result<R, E>,
    mut sync: impl FnMut() -> Result<()>,
) -> Result<Timed> {
    for _ in 0..warmup {
        rep().map_err(Into::into)?;
    }
    sync()?;
    let mut per_rep = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for _ in 0..reps {
            rep().map_err(Into::into)?;
        }
        sync()?;
        per_rep.push(start.elapsed().as_secs_f64() / reps as f64);
    }
    let mut sorted = per_rep.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Timed {
        seconds: sorted[sorted.len() / 2],
        rounds: per_rep,
    })
}

fn open_backend(device: &str) -> Result<Arc<dyn Backend>> {
    if device == "cpu" {
        return Ok(Arc::new(CpuBackend::default()));
    }
    cuda_backend(device, false)
}

/// A backend on `device` whose attention never takes the fused kernel
/// (None for the CPU, or without the `cuda` feature).
fn gemm_attention_backend(device: &str) -> Result<Option<Arc<dyn Backend>>> {
    if device == "cpu" || !cfg!(feature = "cuda") {
        return Ok(None);
    }
    cuda_backend(device, true).map(Some)
}

#[cfg(feature = "cuda")]
/// `gemm_attention`: attention always on the two-GEMM path; otherwise as
/// the backend chooses (`TENSOR_WASM_CUDA_ATTENTION` included).
fn cuda_backend(device: &str, gemm_attention: bool) -> Result<Arc<dyn Backend>> {
    let ordinal = cuda_ordinal(device)?;
    let mut b = tensor_wasm_kernels::cuda::CudaBackend::new(ordinal, Default::default())
        .with_context(|| format!("opening {device}"))?;
    if gemm_attention {
        b = b.with_fused_attention(false);
    }
    Ok(Arc::new(b))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(device: &str, _gemm_attention: bool) -> Result<Arc<dyn Backend>> {
    bail!("{device}: this gpu-bench was built without the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn cuda_ordinal(device: &str) -> Result<usize> {
    match device {
        "cuda" => Ok(0),
        d => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unknown device {d:?}: cpu, cuda or cuda:N")),
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let shapes = Shapes::new(args.quick);
    let backend = open_backend(&args.device)?;
    let b = backend.as_ref();
    eprintln!("gpu-bench: {} ({})", b.device_name(), args.device);
    let sync = || Ok(b.synchronize()?);
    let mut results = Results::default();

    // Matmul, ours then cuBLAS directly.
    let n = shapes.matmul_n;
    let mm_shape = format!("{n}x{n}x{n}");
    let flops = matmul_flops(n, n, n) as f64;
    for (name, dtype, reps) in [
        ("matmul_f32", DType::F32, 3),
        ("matmul_bf16", DType::BF16, 20),
    ] {
        if !args.wants(name) {
            continue;
        }
        let a = random_tensor(b, dtype, &[n, n], 1)?;
        let bb = random_tensor(b, dtype, &[n, n], 2)?;
        let t = rounds(2, reps, || b.matmul(&a, &bb), sync).with_context(|| name.to_string())?;
        results.add(name, "tensor-wasm", &mm_shape, &t, Work::Flops(flops), "");
        drop((a, bb));
        if args.device != "cpu" {
            let t = cublas_peer(&args.device, dtype, n, reps)?;
            let detail = "cuBLAS called directly, compute type f32, no TF32";
            results.add(name, "cublas", &mm_shape, &t, Work::Flops(flops), detail);
        }
    }

    // Elementwise add: two inputs and one output.
    if args.wants("add_f32") {
        let e = shapes.add_elems;
        let a = random_tensor(b, DType::F32, &[e], 3)?;
        let c = random_tensor(b, DType::F32, &[e], 4)?;
        let t = rounds(3, 50, || b.binary(BinaryOp::Add, &a, &c), sync)?;
        let shape = format!("3x{} MiB", (e * 4) >> 20);
        let work = Work::Bytes((3 * e * 4) as f64);
        results.add("add_f32", "tensor-wasm", &shape, &t, work, "");
    }

    // Softmax and layer norm over rows × cols.
    if args.wants("softmax_f32") || args.wants("layer_norm_f32") {
        let (r, c) = (shapes.rows, shapes.cols);
        let x = random_tensor(b, DType::F32, &[r, c], 5)?;
        let gamma = random_tensor(b, DType::F32, &[c], 6)?;
        let beta = random_tensor(b, DType::F32, &[c], 7)?;
        let bytes = (2 * r * c * 4) as f64;
        let shape = format!("{r}x{c}");
        if args.wants("softmax_f32") {
            let t = rounds(3, 100, || b.softmax(&x, -1), sync)?;
            let work = Work::Bytes(bytes);
            results.add("softmax_f32", "tensor-wasm", &shape, &t, work, "");
        }
        if args.wants("layer_norm_f32") {
            let norm = || b.layer_norm(&x, Some(&gamma), Some(&beta), 1e-5);
            let t = rounds(3, 100, norm, sync)?;
            let work = Work::Bytes(bytes);
            results.add("layer_norm_f32", "tensor-wasm", &shape, &t, work, "");
        }
    }

    // Causal attention.
    if args.wants("attention_causal_bf16") {
        let dims = shapes.attention;
        let [bt, h, s, d] = dims;
        let q = random_tensor(b, DType::BF16, &dims, 8)?;
        let k = random_tensor(b, DType::BF16, &dims, 9)?;
        let v = random_tensor(b, DType::BF16, &dims, 10)?;
        let t = rounds(2, 20, || b.attention(&q, &k, &v, true), sync)?;
        let flops = (4 * bt * h * s * s * d / 2) as f64;
        let shape = format!("{bt}x{h}x{s}x{d}");
        let detail = "flops = 4*B*H*S^2*D / 2 (causal half)";
        let name = "attention_causal_bf16";
        results.add(name, "tensor-wasm", &shape, &t, Work::Flops(flops), detail);
        // The unfused path (two GEMMs around a softmax kernel), for
        // comparison on the same card.
        if let Some(gemm) = gemm_attention_backend(&args.device)? {
            let g = gemm.as_ref();
            let t = rounds(
                2,
                20,
                || g.attention(&q, &k, &v, true),
                || Ok(g.synchronize()?),
            )?;
            let work = Work::Flops(flops);
            results.add(name, "tensor-wasm-gemm", &shape, &t, work, detail);
        }
    }

    // Guest-issued ops: a small add through the ABI, and an upload.
    let runtime = Runtime::new(
        EngineLimits {
            total_instances: 4,
            ..EngineLimits::default()
        },
        None,
    )?;
    if args.wants("small_add_enqueue") {
        let shape = format!("{SMALL_ELEMS} f32");
        let mut inst = warm(&runtime, &backend, &small_add_wat())?;
        let t = rounds(1, 1, || invoke(&mut inst), || Ok(()))?;
        let detail = "per op: free(binary(add, a, a)) issued by a guest, \
                      10 000 per invocation, ended by the executor's synchronize";
        let per_op = t.per(SMALL_OPS);
        results.add(
            "small_add_enqueue",
            "tensor-wasm",
            &shape,
            &per_op,
            Work::None,
            detail,
        );

        let a = b.zeros(DType::F32, &[SMALL_ELEMS])?;
        let direct = || -> Result<()> {
            for _ in 0..SMALL_OPS {
                drop(b.binary(BinaryOp::Add, &a, &a)?);
            }
            Ok(b.synchronize()?)
        };
        let t = rounds(1, 1, direct, || Ok(()))?;
        let detail = "per op: Backend::binary(add) from Rust and drop, no guest";
        let per_op = t.per(SMALL_OPS);
        results.add(
            "small_add_enqueue",
            "tensor-wasm-direct",
            &shape,
            &per_op,
            Work::None,
            detail,
        );
    }
    if args.wants("upload_64mib") {
        let bytes = shapes.upload_bytes;
        let mut inst = warm(&runtime, &backend, &upload_wat(bytes))?;
        let t = rounds(2, 10, || invoke(&mut inst), || Ok(()))?;
        let detail = "guest new() of bytes in its linear memory, then free; \
                      timed from the call to the executor's synchronize";
        let shape = format!("{} MiB", bytes >> 20);
        results.add(
            "upload_64mib",
            "tensor-wasm",
            &shape,
            &t,
            Work::Bytes(bytes as f64),
            detail,
        );
    }

    let report = json!({
        "source": "tensor-wasm",
        "device": b.device_name(),
        "quick": args.quick,
        "version": env!("CARGO_PKG_VERSION"),
        "results": results.0,
    });
    let text = serde_json::to_string_pretty(&report)?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, text + "\n").with_context(|| format!("writing {path}"))?
        }
        None => println!("{text}"),
    }
    Ok(())
}

/// A warm instance of `wat` on `backend`, set up as the executor does.
fn warm(runtime: &Runtime, backend: &Arc<dyn Backend>, wat: &str) -> Result<WarmInstance> {
    let wasm = wat::parse_str(wat)?;
    let info = tensor_wasm_executor::wasm::inspect(&wasm, 1 << 20)?;
    let module = runtime.compile(&info.rewritten)?;
    let pre = runtime
        .linker()
        .instantiate_pre(&module)
        .map_err(|e| anyhow::anyhow!("linking the guest: {e}"))?;
    let setup = InstanceSetup {
        backend: backend.clone(),
        assets: Arc::new(HashMap::new()),
        usage: Arc::new(TenantUsage::new(8 << 30, 1 << 20)),
        host: Arc::new(tensor_wasm_executor::memory::HostUsage::new(
            u64::MAX,
            tensor_wasm_executor::memory::HostBudget::new(u64::MAX),
        )),
        log: FunctionLog::new(1024),
        metrics: Arc::new(Metrics::new(
            backend.kind().as_str(),
            &[("component", "bench")],
        )),
        memory_limit: 256 << 20,
        max_output_bytes: 1 << 20,
        max_error_message: 1024,
        max_table_elements: 1000,
    };
    WarmInstance::create(&pre, &setup, true, Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("creating the instance: {e}"))
}

fn invoke(inst: &mut WarmInstance) -> Result<()> {
    inst.invoke(Request::default(), Duration::from_secs(60), None)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("invoke: {e}"))
}

/// `free(binary(add, a, a))` [`SMALL_OPS`] times on a [`SMALL_ELEMS`] f32
/// tensor made once in `init`; a failed op makes `handle` return 1.
fn small_add_wat() -> String {
    format!(
        r#"(module
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "binary" (func $binary (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (memory (export "memory") 1)
  (global $a (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (i32.store (i32.const 0) (i32.const {SMALL_ELEMS}))
    (global.set $a (call $zeros (i32.const 0) (i32.const 0) (i32.const 1)))
    (i32.lt_s (global.get $a) (i32.const 0)))
  (func (export "handle") (result i32)
    (local $i i32) (local $h i32)
    (loop $l
      (local.set $h (call $binary (i32.const 0) (global.get $a) (global.get $a)))
      (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (i32.const 1))))
      (drop (call $free (local.get $h)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const {SMALL_OPS}))))
    (i32.const 0)))"#
    )
}

/// A guest holding `bytes` of data (filled in `init`, so every page is
/// real) at 64 KiB, whose `handle` uploads them as a `[bytes / 4]` f32
/// tensor with `new` and frees it.
fn upload_wat(bytes: usize) -> String {
    let pages = bytes.div_ceil(65536) + 1;
    let elems = bytes / 4;
    format!(
        r#"(module
  (import "tensor" "new" (func $new (param i32 i32 i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (memory (export "memory") {pages})
  (func (export "init") (result i32)
    (i32.store (i32.const 0) (i32.const {elems}))
    (memory.fill (i32.const 65536) (i32.const 0x3c) (i32.const {bytes}))
    (i32.const 0))
  (func (export "handle") (result i32)
    (local $h i32)
    (local.set $h (call $new (i32.const 0) (i32.const 0) (i32.const 1)
                             (i32.const 65536) (i32.const {bytes})))
    (if (i32.lt_s (local.get $h) (i32.const 0)) (then (return (i32.const 1))))
    (drop (call $free (local.get $h)))
    (i32.const 0)))"#
    )
}

#[cfg(feature = "cuda")]
fn cublas_peer(device: &str, dtype: DType, n: usize, reps: usize) -> Result<Timed> {
    let ordinal = cuda_ordinal(device)?;
    let mut peer = sys::CublasPeer::new(ordinal, dtype, n)?;
    let stream = peer.stream();
    rounds(2, reps, || peer.gemm(), || Ok(stream.synchronize()?))
}

#[cfg(not(feature = "cuda"))]
fn cublas_peer(device: &str, _dtype: DType, _n: usize, _reps: usize) -> Result<Timed> {
    bail!("{device}: this gpu-bench was built without the `cuda` feature")
}

/// cuBLAS called directly through cudarc: the GEMM peer. Its `unsafe` is
/// the cuBLAS call itself.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod sys {
    use std::sync::Arc;

    use anyhow::{Result, bail};
    use cudarc::cublas::sys::cublasOperation_t;
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use half::bf16;
    use tensor_wasm_bench::random_f32;
    use tensor_wasm_kernels::DType;

    enum Buffers {
        F32([CudaSlice<f32>; 3]),
        Bf16([CudaSlice<bf16>; 3]),
    }

    /// Square `n × n` operands on their own stream, with random values
    /// from the same seeds as our backend's inputs.
    pub struct CublasPeer {
        stream: Arc<CudaStream>,
        blas: CudaBlas,
        n: i32,
        bufs: Buffers,
    }

    impl CublasPeer {
        pub fn new(ordinal: usize, dtype: DType, n: usize) -> Result<CublasPeer> {
            let ctx = CudaContext::new(ordinal)?;
            let stream = ctx.new_stream()?;
            let blas = CudaBlas::new(stream.clone())?;
            let a = random_f32(n * n, 1);
            let b = random_f32(n * n, 2);
            let bufs = match dtype {
                DType::F32 => Buffers::F32([
                    stream.clone_htod(&a)?,
                    stream.clone_htod(&b)?,
                    stream.alloc_zeros::<f32>(n * n)?,
                ]),
                DType::BF16 => {
                    let conv = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
                    Buffers::Bf16([
                        stream.clone_htod(&conv(&a))?,
                        stream.clone_htod(&conv(&b))?,
                        stream.alloc_zeros::<bf16>(n * n)?,
                    ])
                }
                other => bail!("no cuBLAS peer for {other}"),
            };
            Ok(CublasPeer {
                stream,
                blas,
                n: i32::try_from(n)?,
                bufs,
            })
        }

        /// Enqueues one `n × n · n × n` GEMM.
        pub fn gemm(&mut self) -> Result<()> {
            let n = self.n;
            match &mut self.bufs {
                // SAFETY: the three buffers hold n·n elements each on this
                // handle's stream, matching m = n = k = n and the leading
                // dimensions n; the output does not alias an input.
                Buffers::F32([a, b, c]) => unsafe { self.blas.gemm(config(n, 1.0, 0.0), a, b, c) }?,
                // SAFETY: as above, for bf16 buffers.
                Buffers::Bf16([a, b, c]) => {
                    unsafe { self.blas.gemm(config(n, bf16::ONE, bf16::ZERO), a, b, c) }?
                }
            }
            Ok(())
        }

        /// The stream the GEMMs run on.
        pub fn stream(&self) -> Arc<CudaStream> {
            self.stream.clone()
        }
    }

    /// `n × n · n × n`, column-major, no transposes.
    fn config<T>(n: i32, alpha: T, beta: T) -> GemmConfig<T> {
        GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n,
            n,
            k: n,
            alpha,
            lda: n,
            ldb: n,
            beta,
            ldc: n,
        }
    }
}
