//! Times the CPU backend's matmul through the [`Backend`] trait and prints
//! one JSON line, for `bench/matmul-vs-numpy` to set beside numpy.
//!
//! ```text
//! cpu-matmul [--n 1024] [--reps 10] [--warmup 3] [--dtype f32|bf16]
//! ```
//!
//! Each rep is one `matmul` call of two `n×n` tensors, output allocation
//! included (as in numpy's `a @ b`), followed by `synchronize`. The line
//! reports the best and the median rep, and the thread settings the run
//! saw, so that a comparison can check both sides used the same count.

#![forbid(unsafe_code)]
// This binary's output is its stdout line.
#![allow(clippy::print_stdout)]

use std::str::FromStr;

use anyhow::{Context, Result, bail};
use tensor_wasm_bench::{Timings, gflops, matmul_flops, random_tensor};
use tensor_wasm_kernels::{Backend, CpuBackend, DType, Tensor};

/// Default matrix side: 1024³, the size `bench/matmul-vs-numpy` compares
/// with numpy at: large enough for BLAS to reach its steady rate, small
/// enough for 0.01 s reps.
const DEFAULT_N: usize = 1024;
/// Timed reps by default: enough for a stable median in about a second.
const DEFAULT_REPS: usize = 10;
/// Untimed reps first: BLAS thread pools start and pages fault in.
const DEFAULT_WARMUP: usize = 3;
/// Output elements spot-checked against a naive dot product, so that a
/// broken kernel cannot post a fast time.
const CHECKED_OUTPUTS: usize = 8;

#[derive(Debug)]
struct Args {
    n: usize,
    reps: usize,
    warmup: usize,
    dtype: DType,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        n: DEFAULT_N,
        reps: DEFAULT_REPS,
        warmup: DEFAULT_WARMUP,
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            bail!("usage: cpu-matmul [--n N] [--reps R] [--warmup W] [--dtype f32|f16|bf16]");
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--n" => args.n = value.parse().context("--n")?,
            "--reps" => args.reps = value.parse().context("--reps")?,
            "--warmup" => args.warmup = value.parse().context("--warmup")?,
            "--dtype" => args.dtype = DType::from_str(&value).context("--dtype")?,
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.n == 0 || args.reps == 0 {
        bail!("--n and --reps must be positive");
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let backend = CpuBackend::default();
    let n = args.n;
    let a = random_tensor(&backend, args.dtype, &[n, n], 1)?;
    let b = random_tensor(&backend, args.dtype, &[n, n], 2)?;

    let product = backend.matmul(&a, &b).context("matmul")?;
    check_product(&backend, &a, &b, &product)?;

    let timings = Timings::measure(args.warmup, args.reps, || {
        let c = backend.matmul(&a, &b)?;
        backend.synchronize()?;
        drop(c);
        Ok(())
    })?;

    let flops = matmul_flops(n, n, n);
    let line = serde_json::json!({
        "impl": "tensor-wasm",
        "device": backend.device_name(),
        "dtype": args.dtype.to_string(),
        "n": n,
        "reps": timings.len(),
        "warmup": args.warmup,
        "best_ms": timings.best().as_secs_f64() * 1e3,
        "median_ms": timings.median().as_secs_f64() * 1e3,
        "gflops": gflops(flops, timings.best()),
        "gflops_median": gflops(flops, timings.median()),
        "threads": {
            "OPENBLAS_NUM_THREADS": std::env::var("OPENBLAS_NUM_THREADS").ok(),
            "rayon": rayon::current_num_threads(),
            "available_parallelism": std::thread::available_parallelism().map_or(0, usize::from),
        },
    });
    println!("{line}");
    Ok(())
}

/// Compares the first [`CHECKED_OUTPUTS`] elements of row 0 of `c` with a
/// naive f64 dot product of the f32 values of `a` and `b`.
fn check_product(backend: &dyn Backend, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<()> {
    let f32s = |t: &Tensor| -> Result<Vec<f32>> {
        let t = backend.cast(t, DType::F32)?;
        let bytes = backend.to_bytes(&t)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|w| f32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect())
    };
    let (av, bv, cv) = (f32s(a)?, f32s(b)?, f32s(c)?);
    let n = a.dims()[1];
    let cols = c.dims()[1];
    // bf16/f16 outputs round to 8/11 significant bits; f32 sums differ from
    // f64 only by accumulated rounding.
    let rel_tol = if c.dtype() == DType::F32 { 1e-4 } else { 1e-2 };
    for j in 0..CHECKED_OUTPUTS.min(cols) {
        let want: f64 = (0..n)
            .map(|k| f64::from(av[k]) * f64::from(bv[k * cols + j]))
            .sum();
        let got = f64::from(cv[j]);
        // Scale by √n: the typical size of a sum of n unit-range products.
        let scale = (n as f64).sqrt().max(1.0);
        if (got - want).abs() > rel_tol * scale {
            bail!("matmul result wrong at [0, {j}]: got {got}, want {want}");
        }
    }
    Ok(())
}
