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
//!
//! Causal attention skips the masked half: queries go in blocks
//! ([`query_blocks`]), and block `[r0, r1)` multiplies only by keys
//! `[0, r1)`, the only ones its rows may see. The softmax never reads the
//! scores past a row's last visible key and writes probability 0 from there
//! to the end of its block's keys, so the scores left unwritten are never
//! used and the second GEMM, also cut at `r1` keys, sums exactly the same
//! terms.

use std::ops::Range;

use cudarc::driver::LaunchConfig;

use cudarc::cublas::result::CublasError;
use cudarc::cublas::sys::cublasStatus_t;
use tensor_wasm_shared::DType;

use super::device::{FLASH_ATTENTION, driver_error, dtype_suffix, flash_attention_kernel};
use super::launch::Launch;
use super::{CudaBackend, CudaStorage, tensor};
use crate::error::{KernelError, Result};
use crate::shape::{AttentionPlan, checked_numel, plan_attention, plan_matmul};
use crate::sys::cuda::{Gemm, GemmType, gemm, memset_raw};
use crate::tensor::Tensor;

/// Most bytes of f32 attention scores materialized at once: batches are
/// processed in chunks whose `lq×lk` score matrices fit in 256 MiB (at least
/// one batch entry, which the plan caps like a tensor), bounding the
/// workspace whatever the batch size.
const ATTENTION_SCORES_BUDGET_BYTES: usize = 256 << 20;

/// Queries per block of the fused attention kernel (`FA_BM` in kernels.cu).
const FLASH_QUERIES_PER_BLOCK: usize = 64;
/// Threads per block of the fused attention kernel (`FA_THREADS`).
const FLASH_THREADS: u32 = 128;
/// Batch entries per launch of the fused kernel (the grid's y limit).
const FLASH_MAX_BATCH_PER_LAUNCH: usize = 65_535;

/// Smallest block of queries causal attention cuts at: below this a GEMM
/// per block costs more in launches than the masked work it skips.
const MIN_QUERY_BLOCK: usize = 64;

/// Most query blocks: 8 blocks skip 7/16 of the work of the full score
/// matrix (the whole masked half would need infinitely many).
const MAX_QUERY_BLOCKS: usize = 8;

/// The query blocks `[r0, r1)` of attention over `lq` queries and `lk`
/// keys, each with the number of keys its rows may see: one block with
/// every key unless `causal`; else block `[r0, r1)` sees keys
/// `[0, min(r1, lk))` (key j > query i is masked), in blocks of a multiple
/// of [`MIN_QUERY_BLOCK`] rows, at most [`MAX_QUERY_BLOCKS`] of them (one
/// block below `2 × MIN_QUERY_BLOCK` queries). Every block but the last has
/// the same size, which the softmax kernel relies on.
pub(crate) fn query_blocks(lq: usize, lk: usize, causal: bool) -> Vec<(usize, usize, usize)> {
    if !causal {
        return vec![(0, lq, lk)];
    }
    if lq < 2 * MIN_QUERY_BLOCK {
        // One block; its last query sees keys [0, lq) at most.
        return vec![(0, lq, lq.min(lk))];
    }
    let size = lq
        .div_ceil(MAX_QUERY_BLOCKS)
        .next_multiple_of(MIN_QUERY_BLOCK);
    (0..lq)
        .step_by(size)
        .map(|r0| {
            let r1 = (r0 + size).min(lq);
            (r0, r1, r1.min(lk))
        })
        .collect()
}

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
/// operand's offset advances by a constant, non-negative step (in elements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: usize,
    pub len: usize,
    pub steps: Vec<usize>,
}

/// Splits `range` into maximal [`Run`]s, `at(i)` giving batch entry `i`'s
/// offset in each of the `N` operands. Each entry's offsets are computed
/// about once.
pub(crate) fn uniform_runs<const N: usize>(
    at: impl Fn(usize) -> [usize; N],
    range: Range<usize>,
) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut i = range.start;
    while i < range.end {
        let first = at(i);
        let mut steps = [0; N];
        let mut j = i + 1;
        if j < range.end {
            let second = at(j);
            if second.iter().zip(&first).all(|(s, f)| s >= f) {
                for ((step, s), f) in steps.iter_mut().zip(&second).zip(&first) {
                    *step = s - f;
                }
                let mut prev = second;
                j += 1;
                while j < range.end {
                    let next = at(j);
                    let same_step = next
                        .iter()
                        .zip(&prev)
                        .zip(&steps)
                        .all(|((x, p), s)| x >= p && x - p == *s);
                    if !same_step {
                        break;
                    }
                    prev = next;
                    j += 1;
                }
            }
        }
        runs.push(Run {
            start: i,
            len: j - i,
            steps: steps.to_vec(),
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
            let (pa, _ga) = sa.read_ptr(OP, &self.stream)?;
            let (pb, _gb) = sb.read_ptr(OP, &self.stream)?;
            let (pc, _gc) = out.write_ptr(OP, &self.stream)?;
            let blas = self
                .blas
                .lock()
                .map_err(|_| KernelError::Device("cuBLAS handle lock poisoned".into()))?;
            for run in uniform_runs(
                |i| [plan.a_offsets.at(i), plan.b_offsets.at(i)],
                0..plan.batch(),
            ) {
                let g = Gemm {
                    trans_a: false,
                    trans_b: false,
                    m: n,
                    n: m,
                    k,
                    alpha: 1.0,
                    beta: 0.0,
                    a: pb + plan.b_offsets.at(run.start) as u64 * es,
                    a_type: t,
                    lda: n,
                    stride_a: run.steps[1] as i64,
                    b: pa + plan.a_offsets.at(run.start) as u64 * es,
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

    /// Whether the fused tensor-core kernel runs an attention of `dtype`
    /// with head sizes `d` (q, k) and `dv` (v): bf16 or f16, equal head
    /// sizes of 64 or 128, on sm_80 or later, unless turned off.
    fn flash_applies(&self, dtype: DType, d: usize, dv: usize) -> bool {
        self.fused_attention
            && d == dv
            && FLASH_ATTENTION.contains(&(dtype, d))
            && self.dev.sm_version() >= 80
    }

    /// Attention by the fused kernel: one launch per uniform run of batch
    /// offsets (at most 65 535 entries each), a block per 64 queries of an
    /// entry. `lk` ≥ 1 and the output is contiguous `[batch, lq, d]`.
    fn flash_attention(
        &self,
        plan: &AttentionPlan,
        dtype: DType,
        [sq, sk, sv]: [&CudaStorage; 3],
        out: &mut CudaStorage,
        causal: bool,
    ) -> Result<()> {
        const OP: &str = "attention";
        let (lq, lk, d) = (plan.lq, plan.lk, plan.d);
        let es = dtype.size() as u64;
        let name = flash_attention_kernel(dtype, d);
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let query_blocks = u32::try_from(lq.div_ceil(FLASH_QUERIES_PER_BLOCK))
            .map_err(|_| KernelError::invalid(OP, format!("{lq} queries are too many")))?;
        let (pq, _gq) = sq.read_ptr(OP, &self.stream)?;
        let (pk, _gk) = sk.read_ptr(OP, &self.stream)?;
        let (pv, _gv) = sv.read_ptr(OP, &self.stream)?;
        let (po, _go) = out.write_ptr(OP, &self.stream)?;
        let at = |i| {
            [
                plan.q_offsets.at(i),
                plan.k_offsets.at(i),
                plan.v_offsets.at(i),
            ]
        };
        for run in uniform_runs(at, 0..plan.batch()) {
            let end = run.start + run.len;
            let mut start = run.start;
            while start < end {
                let n = (end - start).min(FLASH_MAX_BATCH_PER_LAUNCH);
                let cfg = LaunchConfig {
                    grid_dim: (query_blocks, n as u32, 1),
                    block_dim: (FLASH_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                Launch::new(&self.stream)
                    .usize(lq)
                    .usize(lk)
                    .i32(i32::from(causal))
                    .f32(scale_log2)
                    .raw(pq + plan.q_offsets.at(start) as u64 * es)
                    .raw(pk + plan.k_offsets.at(start) as u64 * es)
                    .raw(pv + plan.v_offsets.at(start) as u64 * es)
                    .raw(po + (start * lq * d) as u64 * es)
                    .usize(run.steps[0])
                    .usize(run.steps[1])
                    .usize(run.steps[2])
                    .usize(lq * d)
                    .run(&self.dev, OP, &name, cfg)?;
                start += n;
            }
        }
        Ok(())
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
        if self.flash_applies(dtype, plan.d, plan.dv) {
            self.flash_attention(&plan, dtype, [sq, sk, sv], &mut out, causal)?;
            return tensor(&plan.out_dims, out);
        }
        let batch = plan.batch();
        let (lq, lk, d, dv) = (plan.lq, plan.lk, plan.d, plan.dv);
        let es = dtype.size() as u64;
        let per_batch = lq * lk;
        let chunk = (ATTENTION_SCORES_BUDGET_BYTES / (per_batch * 4)).clamp(1, batch);
        // d = 0 has no scale to speak of; the scores are all 0 then anyway.
        let scale = 1.0f32 / (d.max(1) as f32).sqrt();
        let blocks = query_blocks(lq, lk, causal);
        // Every block but the last has this many rows (see query_blocks).
        let qblock = blocks[0].1.max(1);
        let mut scores = self.alloc(OP, DType::F32, chunk * per_batch)?;
        let mut probs = match dtype {
            DType::F32 => None,
            _ => Some(self.alloc(OP, dtype, chunk * per_batch)?),
        };
        let sfx = dtype_suffix(dtype);
        {
            let (pq, _gq) = sq.read_ptr(OP, &self.stream)?;
            let (pk, _gk) = sk.read_ptr(OP, &self.stream)?;
            let (pv, _gv) = sv.read_ptr(OP, &self.stream)?;
            let (ps, _gs) = scores.write_ptr(OP, &self.stream)?;
            let (pp, _gp) = match probs.as_mut() {
                Some(p) => p.write_ptr(OP, &self.stream)?,
                None => (ps, None),
            };
            let (po, _go) = out.write_ptr(OP, &self.stream)?;
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
                    let runs =
                        uniform_runs(|i| [plan.q_offsets.at(i), plan.k_offsets.at(i)], c0..c1);
                    for &(r0, r1, keys) in &blocks {
                        for run in &runs {
                            let g = Gemm {
                                trans_a: true,
                                trans_b: false,
                                m: keys as i64,
                                n: (r1 - r0) as i64,
                                k: d as i64,
                                alpha: scale,
                                beta: 0.0,
                                a: pk + plan.k_offsets.at(run.start) as u64 * es,
                                a_type: t,
                                lda: d as i64,
                                stride_a: run.steps[1] as i64,
                                b: pq + (plan.q_offsets.at(run.start) + r0 * d) as u64 * es,
                                b_type: t,
                                ldb: d as i64,
                                stride_b: run.steps[0] as i64,
                                c: ps + ((run.start - c0) * per_batch + r0 * lk) as u64 * 4,
                                c_type: GemmType::F32,
                                ldc: lk as i64,
                                stride_c: per_batch as i64,
                                batch: run.len as i64,
                            };
                            gemm(&blas, &g).map_err(|e| blas_error(OP, e))?;
                        }
                    }
                }
                // 2. probabilities (masked, stable softmax), in the dtype.
                Launch::new(&self.stream)
                    .usize(rows)
                    .usize(lq)
                    .usize(lk)
                    .usize(qblock)
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
                let runs = uniform_runs(|i| [plan.v_offsets.at(i)], c0..c1);
                for &(r0, r1, keys) in &blocks {
                    for run in &runs {
                        let g = Gemm {
                            trans_a: false,
                            trans_b: false,
                            m: dv as i64,
                            n: (r1 - r0) as i64,
                            k: keys as i64,
                            alpha: 1.0,
                            beta: 0.0,
                            a: pv + plan.v_offsets.at(run.start) as u64 * es,
                            a_type: t,
                            lda: dv as i64,
                            stride_a: run.steps[0] as i64,
                            b: pp + ((run.start - c0) * per_batch + r0 * lk) as u64 * es,
                            b_type: t,
                            ldb: lk as i64,
                            stride_b: per_batch as i64,
                            c: po + (run.start * lq * dv + r0 * dv) as u64 * es,
                            c_type: t,
                            ldc: dv as i64,
                            stride_c: (lq * dv) as i64,
                            batch: run.len as i64,
                        };
                        gemm(&blas, &g).map_err(|e| blas_error(OP, e))?;
                    }
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
    fn causal_query_blocks_cover_every_query_once() {
        assert_eq!(query_blocks(2048, 2048, false), vec![(0, 2048, 2048)]);
        assert_eq!(query_blocks(100, 100, true), vec![(0, 100, 100)]);
        assert_eq!(query_blocks(5, 7, true), vec![(0, 5, 5)]);
        assert_eq!(query_blocks(6, 3, true), vec![(0, 6, 3)]);
        assert_eq!(query_blocks(5, 7, false), vec![(0, 5, 7)]);
        let b = query_blocks(2048, 2048, true);
        assert_eq!(b.len(), MAX_QUERY_BLOCKS);
        assert_eq!(b[0], (0, 256, 256));
        assert_eq!(b[7], (1792, 2048, 2048));
        for (lq, lk) in [(130, 200), (300, 300), (200, 70), (1000, 3), (129, 129)] {
            let b = query_blocks(lq, lk, true);
            assert!(b.len() > 1, "{lq}x{lk}");
            let mut next = 0;
            for &(r0, r1, keys) in &b {
                assert_eq!(r0, next);
                assert!(r1 > r0 && r1 - r0 >= MIN_QUERY_BLOCK.min(lq - r0));
                // Every key a row of the block may see, and none past lk.
                assert_eq!(keys, r1.min(lk));
                next = r1;
            }
            assert_eq!(next, lq);
        }
    }

    #[test]
    fn uniform_offsets_make_one_run() {
        let a = [0, 12, 24, 36];
        let b = [0, 0, 0, 0];
        let runs = uniform_runs(|i| [a[i], b[i]], 0..4);
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
        let runs = uniform_runs(|i| [a[i], b[i]], 0..6);
        assert_eq!(runs.len(), 2);
        assert_eq!((runs[0].start, runs[0].len), (0, 3));
        assert_eq!(runs[0].steps, vec![0, 24]);
        assert_eq!((runs[1].start, runs[1].len), (3, 3));
        // Every entry is covered exactly once, also for sub-ranges.
        let runs = uniform_runs(|i| [a[i], b[i]], 2..5);
        assert_eq!(runs.iter().map(|r| r.len).sum::<usize>(), 3);
        assert_eq!(runs[0].start, 2);
        assert!(uniform_runs(|i| [a[i]], 3..3).is_empty());
        let single = uniform_runs(|i| [a[i]], 5..6);
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
