//! Matmul and attention on OpenBLAS's sgemm. f16 and bf16 operands are
//! widened to f32 first, so every product accumulates in f32.

use std::borrow::Cow;

use tensor_wasm_shared::DType;

use super::element::Element;
use super::elementwise::map;
use crate::deadline;
use crate::error::{KernelError, Result};
use crate::shape::{AttentionPlan, MatmulPlan};
use crate::sys::blas::{MAX_DIM, sgemm};

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
        // In chunks of rows of `a` (and of the output), the deadline
        // looked at before each.
        let rows = deadline::rows_per_chunk(p.m, p.n.saturating_mul(p.k));
        for (i, c) in out.chunks_mut(mn).enumerate() {
            let (ao, bo) = (p.a_offsets.at(i), p.b_offsets.at(i));
            let (a, b) = (&a32[ao..ao + mk], &b32[bo..bo + kn]);
            for r0 in (0..p.m).step_by(rows) {
                deadline::check("matmul")?;
                let r1 = (r0 + rows).min(p.m);
                sgemm(
                    r1 - r0,
                    p.n,
                    p.k,
                    1.0,
                    &a[r0 * p.k..r1 * p.k],
                    b,
                    false,
                    &mut c[r0 * p.n..r1 * p.n],
                );
            }
        }
    }
    Ok(narrow(out))
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
        .min(deadline::rows_per_chunk(
            lq,
            lk.saturating_mul(d.saturating_add(dv)),
        ))
        .clamp(1, lq);
    let mut scores = vec![0f32; rows * lk];
    for b in 0..p.batch() {
        let (qo, ko, vo) = (p.q_offsets.at(b), p.k_offsets.at(b), p.v_offsets.at(b));
        let o = &mut out[b * lq * dv..(b + 1) * lq * dv];
        for r0 in (0..lq).step_by(rows) {
            deadline::check("attention")?;
            let r1 = (r0 + rows).min(lq);
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
            sgemm(
                r1 - r0,
                dv,
                lk,
                1.0,
                s,
                &v32[vo..vo + lk * dv],
                false,
                &mut o[r0 * dv..r1 * dv],
            );
        }
    }
    Ok(narrow(out))
}

fn narrow<T: Element>(v: Vec<f32>) -> Vec<T> {
    if T::DTYPE != DType::F32 {
        return map(&v, T::from_f32);
    }
    bytemuck::allocation::try_cast_vec(v).unwrap_or_else(|(_, v)| map(&v, T::from_f32))
}
