//! Matmul and attention on cuBLAS.
//!
//! cuBLAS is column-major; a row-major `r×c` matrix is the column-major
//! `c×r` matrix of the same memory. So row-major `C = A·B` (`m×k · k×n`) is
//! the column-major GEMM `Cᵀ = Bᵀ·Aᵀ`: B first, `m` and `n` swapped, every
//! leading dimension the row length of its row-major matrix.
//!
//! Batches run as strided-batched GEMMs over maximal runs of batch entries
//! whose matrices are evenly spaced (all of them when the plan's offsets are
//! uniform; one run per broadcast pattern otherwise), so batch broadcasting
//! never degenerates into one call per matrix unless the layout forces it.
//!
//! All GEMMs compute in f32 (no TF32); f16 and bf16 operands are read as
//! such and accumulate in f32.

use std::ops::Range;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use tensor_wasm_shared::DType;

use super::device::{driver_error, dtype_suffix};
use super::launch::Launch;
use super::{CudaBackend, tensor};
use crate::error::{KernelError, Result};
use crate::shape::{checked_numel, plan_attention, plan_matmul};
use crate::sys::cuda::{Gemm, GemmType, gemm, memset_raw};
use crate::tensor::Tensor;

/// Most bytes of f32 attention scores materialized at once: batches are
/// processed in chunks whose `lq×lk` score matrices fit in 256 MiB (at least
/// one batch entry, which the plan caps like a tensor), bounding the
/// workspace whatever the batch size.
const ATTENTION_SCORES_BUDGET_BYTES: usize = 256 << 20;

fn blas_error(op: &'static str, e: CublasError) -> KernelError {
    if e.0 == cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED {
        KernelError::OutOfMemory { op, bytes: 0 }
    } else {
        KernelError::Device(format!("{op}: cuBLAS: {e}"))
    }
}

fn gemm_type(op: &'static str, d: DType) -> Result<GemmType> {
    match d {
        DType::F32 => Ok(GemmType::F32),
        DType::F16 => Ok(GemmType::F16),
        DType::BF16 => Ok(GemmType::BF16),
        other => Err(KernelError::DTypeUnsupported { op, dtype: other }),
    }
}

/// A run of consecutive batch entries `start..start + len` over which every
/// offset table advances by a constant, non-negative step (in elements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: usize,
    pub len: usize,
    pub steps: Vec<usize>,
}

/// Splits `range` into maximal [`Run`]s for the offset tables `offsets`.
pub(crate) fn uniform_runs(offsets: &[&[usize]], range: Range<usize>) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut i = range.start;
    while i < range.end {
        let mut steps = vec![0; offsets.len()];
        let mut j = i + 1;
        if j < range.end && offsets.iter().all(|o| o[j] >= o[i]) {
            for (s, o) in steps.iter_mut().zip(offsets) {
                *s = o[j] - o[i];
            }
            j += 1;
            while j < range.end
                && offsets
                    .iter()
                    .zip(&steps)
                    .all(|(o, &s)| o[j] >= o[j - 1] && o[j] - o[j - 1] == s)
            {
                j += 1;
            }
        }
        runs.push(Run {
            start: i,
            len: j - i,
            steps,
        });
        i = j;
    }
    runs
}

impl CudaBackend {
    pub(super) fn matmul_impl(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        const OP: &str = "matmul";
        let sa = self.storage(OP, a)?;
        let sb = self.storage(OP, b)?;
        let dtype = super::ops::same_dtype(OP, a, b)?;
        let plan = plan_matmul(&self.limits, dtype, a.dims(), b.dims())?;
        let t = gemm_type(OP, dtype)?;
        let numel = checked_numel(&plan.out_dims).unwrap_or(usize::MAX);
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel == 0 {
            return tensor(&plan.out_dims, out);
        }
        if plan.k == 0 {
            // An empty sum: every element is 0 (and cuBLAS would reject the
            // zero leading dimensions).
            self.fill_bytes(OP, &mut out, 0)?;
            return tensor(&plan.out_dims, out);
        }
        let es = dtype.size() as u64;
        let (m, n, k) = (plan.m as i64, plan.n as i64, plan.k as i64);
        {
            let (pa, _ga) = sa.read_ptr(&self.stream);
            let (pb, _gb) = sb.read_ptr(&self.stream);
            let (pc, _gc) = out.write_ptr(&self.stream);
            let blas = self
                .blas
                .lock()
                .map_err(|_| KernelError::Device("cuBLAS handle lock poisoned".into()))?;
            for run in uniform_runs(&[&plan.a_offsets, &plan.b_offsets], 0..plan.batch()) {
                let g = Gemm {
                    trans_a: false,
                    trans_b: false,
                    m: n,
                    n: m,
                    k,
                    alpha: 1.0,
                    beta: 0.0,
                    a: pb + plan.b_offsets[run.start] as u64 * es,
                    a_type: t,
                    lda: n,
                    stride_a: run.steps[1] as i64,
                    b: pa + plan.a_offsets[run.start] as u64 * es,
                    b_type: t,
                    ldb: k,
                    stride_b: run.steps[0] as i64,
                    c: pc + (run.start as u64) * (m * n) as u64 * es,
                    c_type: t,
                    ldc: n,
                    stride_c: m * n,
                    batch: run.len as i64,
                };
                gemm(&blas, &g).map_err(|e| blas_error(OP, e))?;
            }
        }
        tensor(&plan.out_dims, out)
    }

    pub(super) fn attention_impl(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
    ) -> Result<Tensor> {
        const OP: &str = "attention";
        let sq = self.storage(OP, q)?;
        let sk = self.storage(OP, k)?;
        let sv = self.storage(OP, v)?;
        let dtype = super::ops::same_dtype(OP, q, k)?;
        super::ops::same_dtype(OP, q, v)?;
        let plan = plan_attention(&self.limits, dtype, q.dims(), k.dims(), v.dims())?;
        let t = gemm_type(OP, dtype)?;
        let numel = checked_numel(&plan.out_dims).unwrap_or(usize::MAX);
        let mut out = self.alloc(OP, dtype, numel)?;
        if numel == 0 {
            return tensor(&plan.out_dims, out);
        }
        if plan.lk == 0 {
            // No keys: every output row is an empty sum of values.
            self.fill_bytes(OP, &mut out, 0)?;
            return tensor(&plan.out_dims, out);
        }
        let batch = plan.batch();
        let (lq, lk, d, dv) = (plan.lq, plan.lk, plan.d, plan.dv);
        let es = dtype.size() as u64;
        let per_batch = lq * lk;
        let chunk = (ATTENTION_SCORES_BUDGET_BYTES / (per_batch * 4)).clamp(1, batch);
        // d = 0 has no scale to speak of; the scores are all 0 then anyway.
        let scale = 1.0f32 / (d.max(1) as f32).sqrt();
        let mut scores = self.alloc(OP, DType::F32, chunk * per_batch)?;
        let mut probs = match dtype {
            DType::F32 => None,
            _ => Some(self.alloc(OP, dtype, chunk * per_batch)?),
        };
        let sfx = dtype_suffix(dtype);
        {
            let (pq, _gq) = sq.read_ptr(&self.stream);
            let (pk, _gk) = sk.read_ptr(&self.stream);
            let (pv, _gv) = sv.read_ptr(&self.stream);
            let (ps, _gs) = scores.write_ptr(&self.stream);
            let (pp, _gp) = match probs.as_mut() {
                Some(p) => p.write_ptr(&self.stream),
                None => (ps, None),
            };
            let (po, _go) = out.write_ptr(&self.stream);
            let blas = self
                .blas
                .lock()
                .map_err(|_| KernelError::Device("cuBLAS handle lock poisoned".into()))?;
            let mut c0 = 0;
            while c0 < batch {
                let c1 = (c0 + chunk).min(batch);
                let rows = (c1 - c0) * lq;
                // 1. scores = scale · q·kᵀ, f32: per batch, the column-major
                //    lk×lq matrix K·Qᵀ (K read transposed).
                if d == 0 {
                    // Empty dot products: every score is 0, so attention is
                    // uniform over the visible keys (the CPU reference's
                    // convention).
                    memset_raw(&self.stream, ps, rows * lk * 4, 0)
                        .map_err(|e| driver_error(OP, e))?;
                } else {
                    for run in uniform_runs(&[&plan.q_offsets, &plan.k_offsets], c0..c1) {
                        let g = Gemm {
                            trans_a: true,
                            trans_b: false,
                            m: lk as i64,
                            n: lq as i64,
                            k: d as i64,
                            alpha: scale,
                            beta: 0.0,
                            a: pk + plan.k_offsets[run.start] as u64 * es,
                            a_type: t,
                            lda: d as i64,
                            stride_a: run.steps[1] as i64,
                            b: pq + plan.q_offsets[run.start] as u64 * es,
                            b_type: t,
                            ldb: d as i64,
                            stride_b: run.steps[0] as i64,
                            c: ps + ((run.start - c0) * per_batch * 4) as u64,
                            c_type: GemmType::F32,
                            ldc: lk as i64,
                            stride_c: per_batch as i64,
                            batch: run.len as i64,
                        };
                        gemm(&blas, &g).map_err(|e| blas_error(OP, e))?;
                    }
                }
                // 2. probabilities (masked, stable softmax), in the dtype.
                Launch::new(&self.stream)
                    .usize(rows)
                    .usize(lq)
                    .usize(lk)
                    .i32(i32::from(causal))
                    .raw(ps)
                    .raw(pp)
                    .run(
                        &self.dev,
                        OP,
                        &format!("attn_softmax_{sfx}"),
                        self.dev.row_grid(rows as u64),
                    )?;
                // 3. out = p·v: per batch, the column-major dv×lq matrix Vᵀ·Pᵀ.
                for run in uniform_runs(&[&plan.v_offsets], c0..c1) {
                    let g = Gemm {
                        trans_a: false,
                        trans_b: false,
                        m: dv as i64,
                        n: lq as i64,
                        k: lk as i64,
                        alpha: 1.0,
                        beta: 0.0,
                        a: pv + plan.v_offsets[run.start] as u64 * es,
                        a_type: t,
                        lda: dv as i64,
                        stride_a: run.steps[0] as i64,
                        b: pp + ((run.start - c0) * per_batch) as u64 * es,
                        b_type: t,
                        ldb: lk as i64,
                        stride_b: per_batch as i64,
                        c: po + (run.start * lq * dv) as u64 * es,
                        c_type: t,
                        ldc: dv as i64,
                        stride_c: (lq * dv) as i64,
                        batch: run.len as i64,
                    };
                    gemm(&blas, &g).map_err(|e| blas_error(OP, e))?;
                }
                c0 = c1;
            }
        }
        tensor(&plan.out_dims, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_offsets_make_one_run() {
        let a = [0, 12, 24, 36];
        let b = [0, 0, 0, 0];
        let runs = uniform_runs(&[&a, &b], 0..4);
        assert_eq!(
            runs,
            vec![Run {
                start: 0,
                len: 4,
                steps: vec![12, 0]
            }]
        );
    }

    #[test]
    fn broadcast_batches_split_into_runs() {
        // [2, 1] × [1, 3] batch dims: a repeats each matrix 3 times, b
        // cycles through 3 matrices (offsets from plan_matmul).
        let a = [0, 0, 0, 12, 12, 12];
        let b = [0, 24, 48, 0, 24, 48];
        let runs = uniform_runs(&[&a, &b], 0..6);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].start, runs[0].len), (0, 3));
        assert_eq!(runs[0].steps, vec![0, 24]);
        assert_eq!((runs[1].start, runs[1].len), (3, 3));
        // Every entry is covered exactly once, also for sub-ranges.
        let runs = uniform_runs(&[&a, &b], 2..5);
        assert_eq!(runs.iter().map(|r| r.len).sum::<usize>(), 3);
        assert_eq!(runs[0].start, 2);
        assert!(uniform_runs(&[&a], 3..3).is_empty());
        let single = uniform_runs(&[&a], 5..6);
        assert_eq!(
            single,
            vec![Run {
                start: 5,
                len: 1,
                steps: vec![0]
            }]
        );
    }
}
