//! Matmul and attention on OpenBLAS's sgemm. f16 and bf16 operands are
//! widened to f32 first, so every product accumulates in f32. OpenBLAS runs
//! single-threaded: the rows are split into tasks over this thread's pool
//! ([`crate::threads`]), each looking at the deadline first.

use std::borrow::Cow;

use tensor_wasm_shared::DType;

use super::element::Element;
use super::elementwise::map;
use rayon::prelude::*;

use crate::deadline;
use crate::error::{KernelError, Result};
use crate::shape::{AttentionPlan, MatmulPlan};
use crate::sys::blas::{MAX_DIM, sgemm};
use crate::threads;

/// The elements as f32: borrowed when they already are.
fn widen<T: Element>(a: &[T]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<T, f32>(a) {
        Ok(f) if T::DTYPE == DType::F32 => Cow::Borrowed(f),
        _ => Cow::Owned(map(a, |x| x.to_f32())),
    }
}

fn check_dims(op: &'static str, dims: &[usize]) -> Result<()> {
    if dims.iter().any(|&d| d > MAX_DIM) {
        return Err(KernelError::invalid(
            op,
            format!("a matrix dim exceeds {MAX_DIM}, the BLAS limit"),
        ));
    }
    Ok(())
}

pub(crate) fn matmul<T: Element>(a: &[T], b: &[T], p: &MatmulPlan) -> Result<Vec<T>> {
    check_dims("matmul", &[p.m, p.n, p.k])?;
    let (a32, b32) = (widen(a), widen(b));
    let (mk, kn, mn) = (p.m * p.k, p.k * p.n, p.m * p.n);
    let mut out = vec![0f32; p.batch() * mn];
    if mn > 0 {
        // Tasks of rows of `a` (and of the output), each at most a
        // deadline chunk's work, the deadline looked at before each.
        let rows = task_rows(p.m, p.n.saturating_mul(p.k));
        let tasks: Vec<(usize, usize, &mut [f32])> = out
            .chunks_mut(mn)
            .enumerate()
            .flat_map(|(i, c)| {
                c.chunks_mut(rows * p.n)
                    .enumerate()
                    .map(move |(j, c)| (i, j * rows, c))
            })
            .collect();
        let deadline = deadline::current();
        let run = |(i, r0, c): (usize, usize, &mut [f32])| {
            deadline::scope(deadline, || {
                deadline::check("matmul")?;
                let (ao, bo) = (p.a_offsets.at(i), p.b_offsets.at(i));
                let (a, b) = (&a32[ao..ao + mk], &b32[bo..bo + kn]);
                let r1 = (r0 + rows).min(p.m);
                sgemm(r1 - r0, p.n, p.k, 1.0, &a[r0 * p.k..r1 * p.k], b, false, c);
                Ok(())
            })
        };
        each(tasks, run)?;
    }
    Ok(narrow(out))
}

/// Work from which an op's rows are split over the pool's threads, in
/// multiply-adds: about 2^21, some tens of microseconds of one core.
const PAR_MIN_WORK: usize = 1 << 21;

/// Rows of an `m`-row operand per task when each row costs `row_work`
/// multiply-adds: at most a deadline chunk's work, and, when the whole is
/// worth splitting, few enough that every thread of the pool gets some.
fn task_rows(m: usize, row_work: usize) -> usize {
    let by_deadline = deadline::rows_per_chunk(m, row_work);
    if m.saturating_mul(row_work) < PAR_MIN_WORK {
        return by_deadline;
    }
    by_deadline.min(m.div_ceil(rayon::current_num_threads()).max(1))
}

/// Runs `run` on every task: on this thread if there is one, else over the
/// pool ([`threads::par`]); the first error wins.
fn each<X: Send>(tasks: Vec<X>, run: impl Fn(X) -> Result<()> + Sync + Send) -> Result<()> {
    if tasks.len() <= 1 {
        return tasks.into_iter().try_for_each(run);
    }
    threads::par(|| tasks.into_par_iter().try_for_each(run))
}

/// The most scores held at once: queries go through in blocks of rows, so
/// a long key sequence costs this much, not `lq × lk × 4` bytes.
const SCORES_BUDGET_BYTES: usize = 16 << 20;

/// `softmax(q·kᵀ/√d)·v` per batch, the scores held in f32.
pub(crate) fn attention<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    causal: bool,
    p: &AttentionPlan,
) -> Result<Vec<T>> {
    check_dims("attention", &[p.lq, p.lk, p.d, p.dv])?;
    let (lq, lk, d, dv) = (p.lq, p.lk, p.d, p.dv);
    let mut out = vec![0f32; p.batch() * lq * dv];
    if out.is_empty() {
        return Ok(Vec::new());
    }
    let (q32, k32, v32) = (widen(q), widen(k), widen(v));
    // d = 0 has no scale to speak of; 1 keeps the scores finite (all 0).
    let scale = 1.0 / (d.max(1) as f32).sqrt();
    let rows = (SCORES_BUDGET_BYTES / (lk.max(1) * 4))
        .min(task_rows(lq, lk.saturating_mul(d.saturating_add(dv))))
        .clamp(1, lq);
    let tasks: Vec<(usize, usize, &mut [f32])> = out
        .chunks_mut(lq * dv)
        .enumerate()
        .flat_map(|(b, o)| {
            o.chunks_mut(rows * dv)
                .enumerate()
                .map(move |(j, o)| (b, j * rows, o))
        })
        .collect();
    let deadline = deadline::current();
    let run = |scores: &mut Vec<f32>, (b, r0, o): (usize, usize, &mut [f32])| {
        deadline::scope(deadline, || {
            deadline::check("attention")?;
            let (qo, ko, vo) = (p.q_offsets.at(b), p.k_offsets.at(b), p.v_offsets.at(b));
            let r1 = (r0 + rows).min(lq);
            scores.resize(rows * lk, 0.0);
            let s = &mut scores[..(r1 - r0) * lk];
            sgemm(
                r1 - r0,
                lk,
                d,
                scale,
                &q32[qo + r0 * d..qo + r1 * d],
                &k32[ko..ko + lk * d],
                true,
                s,
            );
            for (i, row) in s.chunks_mut(lk.max(1)).enumerate() {
                if lk == 0 {
                    break;
                }
                let visible = if causal { (r0 + i + 1).min(lk) } else { lk };
                let max = row[..visible]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (j, s) in row.iter_mut().enumerate() {
                    *s = if j < visible { (*s - max).exp() } else { 0.0 };
                    sum += *s;
                }
                row.iter_mut().for_each(|s| *s /= sum);
            }
            sgemm(r1 - r0, dv, lk, 1.0, s, &v32[vo..vo + lk * dv], false, o);
            Ok(())
        })
    };
    if tasks.len() <= 1 {
        let mut scores = Vec::new();
        tasks.into_iter().try_for_each(|t| run(&mut scores, t))?;
    } else {
        threads::par(|| tasks.into_par_iter().try_for_each_init(Vec::new, run))?;
    }
    Ok(narrow(out))
}

fn narrow<T: Element>(v: Vec<f32>) -> Vec<T> {
    if T::DTYPE != DType::F32 {
        return map(&v, T::from_f32);
    }
    bytemuck::allocation::try_cast_vec(v).unwrap_or_else(|(_, v)| map(&v, T::from_f32))
}
