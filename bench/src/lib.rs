//! Helpers shared by the TensorWasm benchmarks: seeded random tensors made
//! through the [`Backend`] trait (so a bench measures exactly what a guest's
//! call would run), a small repetition timer, and FLOP arithmetic; and
//! [`pingora_minimal`], the pingora yardstick of `bench/proxy-vs-peers`.
//!
//! The benches themselves live in `benches/` (criterion, `cargo bench -p
//! tensor-wasm-bench`) and `src/bin/` (single-purpose timers that print one
//! JSON line, used by the peer-comparison scripts such as
//! `bench/matmul-vs-numpy`). See `bench/README.md`.

#![forbid(unsafe_code)]

pub mod pingora_minimal;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tensor_wasm_kernels::{Backend, DType, Tensor};

/// `n` values uniform in [-1, 1), the same for the same `seed`. The range
/// keeps sums of products well inside every float dtype's range, so no
/// bench ever times overflow or denormal paths.
pub fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// A tensor of `dims` filled by [`random_f32`], made by `backend` and then
/// cast to `dtype` (a float dtype) by the backend itself, so bf16 and f16
/// inputs round exactly as a guest's would.
pub fn random_tensor(
    backend: &dyn Backend,
    dtype: DType,
    dims: &[usize],
    seed: u64,
) -> Result<Tensor> {
    let numel: usize = dims.iter().product();
    let bytes: Vec<u8> = random_f32(numel, seed)
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let t = backend
        .from_bytes(DType::F32, dims, &bytes)
        .with_context(|| format!("making a {dims:?} f32 tensor"))?;
    if dtype == DType::F32 {
        return Ok(t);
    }
    backend
        .cast(&t, dtype)
        .with_context(|| format!("casting a {dims:?} tensor to {dtype}"))
}

/// Floating-point operations of an `m×k · k×n` matmul: one multiply and
/// one add per inner-product term, the count BLAS benchmarks and numpy
/// users quote GFLOP/s against.
pub fn matmul_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * m as u64 * k as u64 * n as u64
}

/// Wall-clock times of repeated runs of one operation.
#[derive(Clone, Debug)]
pub struct Timings {
    samples: Vec<Duration>,
}

impl Timings {
    /// Runs `op` `warmup` times untimed (page faults, BLAS thread start-up,
    /// CPU frequency ramp), then `reps` times timed, one sample per run.
    /// Stops at the first error.
    pub fn measure(
        warmup: usize,
        reps: usize,
        mut op: impl FnMut() -> Result<()>,
    ) -> Result<Timings> {
        for _ in 0..warmup {
            op()?;
        }
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            let start = Instant::now();
            op()?;
            samples.push(start.elapsed());
        }
        anyhow::ensure!(!samples.is_empty(), "no timed repetitions");
        samples.sort_unstable();
        Ok(Timings { samples })
    }

    /// The fastest run: the least disturbed by other processes, so the best
    /// estimate of what the code itself can do.
    pub fn best(&self) -> Duration {
        self.samples[0]
    }

    /// The median run: what a caller typically sees.
    pub fn median(&self) -> Duration {
        self.samples[self.samples.len() / 2]
    }

    /// Number of timed runs.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Always false: [`Timings::measure`] refuses zero repetitions.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// `flops` done in `time`, in GFLOP/s (10⁹ FLOP per second).
pub fn gflops(flops: u64, time: Duration) -> f64 {
    flops as f64 / time.as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_are_seeded_and_bounded() {
        let a = random_f32(1000, 7);
        assert_eq!(a, random_f32(1000, 7));
        assert_ne!(a, random_f32(1000, 8));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn flop_arithmetic() {
        assert_eq!(matmul_flops(1024, 1024, 1024), 2 << 30);
        let g = gflops(2_000_000_000, Duration::from_millis(500));
        assert!((g - 4.0).abs() < 1e-9);
    }

    #[test]
    fn timings_sort_samples() {
        let mut calls = 0;
        let t = Timings::measure(2, 5, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 7);
        assert_eq!(t.len(), 5);
        assert!(t.best() <= t.median());
        assert!(Timings::measure(0, 0, || Ok(())).is_err());
    }
}
